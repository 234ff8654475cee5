//! The daemon's event log: what changed and when (an uplink went down, the box went
//! offline, an operator disabled an uplink, sales waited too long), numbered so a client
//! can ask for what it has not seen, kept in a bounded ring, and streamed to followers.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::core::bond::LinkCondition;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Events kept for `events` queries (older ones are dropped first).
pub const KEEP: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Critical,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing from 1 for the life of the daemon.
    pub seq: u64,
    /// Unix time, milliseconds.
    pub at_ms: i64,
    pub level: Level,
    /// Stable machine-readable kind: `uplink_up`, `uplink_down`, `uplink_degraded`,
    /// `uplink_recovered`, `online`, `offline`, `fallback_on`, `fallback_off`,
    /// `uplink_disabled`, `uplink_enabled`, `uplink_preferred`, `preference_cleared`,
    /// `config_reloaded`, `uplink_added`, `uplink_removed`, `uplink_replaced`,
    /// `uplink_retuned`, `sales_waiting` (and the cap, reachability and modem kinds).
    pub kind: String,
    /// The uplink concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// For people.
    pub message: String,
}

pub struct EventLog {
    ring: Mutex<(u64, VecDeque<Event>)>,
    tx: broadcast::Sender<Event>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl EventLog {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(256);
        Self {
            ring: Mutex::new((0, VecDeque::with_capacity(KEEP))),
            tx,
        }
    }

    /// Records an event (and logs it).
    pub fn push(&self, level: Level, kind: &str, uplink: Option<&str>, message: String) {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        match level {
            Level::Info => tracing::info!(kind, uplink, "{message}"),
            _ => tracing::warn!(kind, uplink, "{message}"),
        }
        let Ok(mut g) = self.ring.lock() else {
            return;
        };
        g.0 += 1;
        let ev = Event {
            seq: g.0,
            at_ms,
            level,
            kind: kind.to_string(),
            uplink: uplink.map(str::to_string),
            message,
        };
        if g.1.len() == KEEP {
            g.1.pop_front();
        }
        g.1.push_back(ev.clone());
        let _ = self.tx.send(ev);
    }

    /// Events after `since` (0: all kept), oldest first, at most `limit`.
    pub fn since(&self, since: u64, limit: usize) -> Vec<Event> {
        let Ok(g) = self.ring.lock() else {
            return Vec::new();
        };
        g.1.iter()
            .filter(|e| e.seq > since)
            .take(limit)
            .cloned()
            .collect()
    }

    /// New events as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

/// What the daemon last saw of one uplink, to turn status snapshots into events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkSeen {
    pub state: Option<LinkCondition>,
    pub degraded: bool,
}

/// Compares an uplink's previous and current state and records the change, if any.
pub fn link_change(log: &EventLog, name: &str, before: &LinkSeen, now: &LinkSeen) {
    if before.state != now.state {
        use LinkCondition::{Absent, Down, Suspect, Up};
        match now.state {
            Some(Up) => log.push(
                Level::Info,
                "uplink_up",
                Some(name),
                format!("{name} is up"),
            ),
            Some(s @ (Down | Absent)) if matches!(before.state, Some(Up | Suspect)) => log.push(
                Level::Warning,
                "uplink_down",
                Some(name),
                format!("{name} is {}", s.name()),
            ),
            _ => {}
        }
    }
    if before.degraded != now.degraded {
        if now.degraded {
            log.push(
                Level::Warning,
                "uplink_degraded",
                Some(name),
                format!("{name} is degraded (losing packets or slow); payments avoid it"),
            );
        } else {
            log.push(
                Level::Info,
                "uplink_recovered",
                Some(name),
                format!("{name} is healthy again"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(state: &str, degraded: bool) -> LinkSeen {
        use LinkCondition::*;
        let state = [
            Up, Suspect, Down, Probing, Absent, Disabled, Captive, Hijacked,
        ]
        .into_iter()
        .find(|c| c.name() == state);
        LinkSeen { state, degraded }
    }

    #[test]
    fn numbered_bounded_and_queried_by_sequence() {
        let log = EventLog::new();
        for i in 0..(KEEP + 5) {
            log.push(Level::Info, "x", None, format!("{i}"));
        }
        let all = log.since(0, usize::MAX);
        assert_eq!(all.len(), KEEP);
        assert_eq!(all[0].seq, 6, "the oldest were dropped");
        let tail = log.since(KEEP as u64 + 3, 10);
        assert_eq!(
            tail.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [KEEP as u64 + 4, KEEP as u64 + 5]
        );
        assert_eq!(log.since(0, 3).len(), 3);
    }

    #[test]
    fn followers_get_new_events() {
        let log = EventLog::new();
        let mut rx = log.subscribe();
        log.push(Level::Warning, "offline", None, "offline".into());
        let ev = rx.try_recv().expect("event");
        assert_eq!((ev.seq, ev.kind.as_str()), (1, "offline"));
    }

    #[test]
    fn link_changes_become_events() {
        let log = EventLog::new();
        link_change(&log, "wifi", &seen("probing", false), &seen("up", false));
        link_change(&log, "wifi", &seen("up", false), &seen("up", true));
        link_change(&log, "wifi", &seen("up", true), &seen("down", true));
        link_change(&log, "wifi", &seen("down", true), &seen("down", true));
        link_change(&log, "wifi", &seen("down", true), &seen("probing", false));
        let kinds: Vec<String> = log.since(0, 100).into_iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                "uplink_up",
                "uplink_degraded",
                "uplink_down",
                "uplink_recovered"
            ]
        );
    }
}

//! What the dashboard shows, derived from the control API's documents: the overall state
//! in words, each uplink with its rates (from byte counters between polls) and history,
//! traffic per class, sales waiting, recent events. Pure: fed documents and `now`, so
//! every screen state can be built in tests.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde_json::Value;

/// Samples kept per uplink for the sparklines (one per poll).
pub const HISTORY: usize = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overall {
    Online,
    Degraded,
    Offline,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UplinkRow {
    pub name: String,
    pub kind: String,
    /// up, degraded, suspect, down, absent, disabled, probing, captive, hijacked.
    pub state: String,
    pub rtt_ms: Option<f64>,
    pub jitter_ms: f64,
    pub loss: f64,
    pub up_bps: f64,
    pub down_bps: f64,
    pub preferred: bool,
    pub backup: bool,
    /// Throughput history (up + down), oldest first.
    pub history: Vec<u64>,
    /// Data used and the allowance, when the uplink has a cap.
    pub cap: Option<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClassRow {
    pub class: String,
    pub bps: f64,
    pub delay_p99_ms: Option<f64>,
    pub dropped: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sales {
    pub waiting: u64,
    pub oldest_s: Option<i64>,
    pub dead: u64,
    pub online: bool,
    /// The box's storage is full: new sales are refused until space is freed.
    pub storage_full: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub at_ms: i64,
    pub level: String,
    pub message: String,
}

/// Everything on screen.
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// `None`: the daemon does not answer (with why).
    pub connected: Option<Connected>,
    pub unreachable: Option<String>,
    pub events: Vec<EventRow>,
    /// Seconds since payment traffic was last seen moving (by this dashboard).
    pub pos_idle_s: Option<f64>,
    counters: HashMap<String, (u64, u64)>,
    class_bytes: HashMap<String, u64>,
    history: HashMap<String, VecDeque<u64>>,
    pos_packets: Option<u64>,
    pos_seen_at: Option<Duration>,
    last_poll: Option<Duration>,
    last_event: u64,
    /// On a hub: the stall whose uplinks and traffic are shown (the operator's choice),
    /// and the one the rates were counted for.
    focus: Option<String>,
    shown: Option<String>,
}

/// One stall of a hub's fleet view.
#[derive(Debug, Clone, PartialEq)]
pub struct StallRow {
    pub name: String,
    /// `online`, `degraded` or `offline`.
    pub state: String,
    /// Seconds since it was last online (`None`: not since the hub started).
    pub last_heard_s: Option<u64>,
    /// (uplink, state).
    pub uplinks: Vec<(String, String)>,
    /// Sales waiting on the box, as it last reported (`None`: it reports none).
    pub sales_waiting: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Connected {
    pub overall: Overall,
    pub role: String,
    pub peer: Option<String>,
    pub uptime_s: u64,
    pub clock: String,
    pub fallback: bool,
    pub uplinks: Vec<UplinkRow>,
    pub classes: Vec<ClassRow>,
    pub sales: Option<Sales>,
    /// A hub's stalls, offline and degraded first (empty on an edge).
    pub fleet: Vec<StallRow>,
    /// On a hub: the stall the uplinks and traffic are of.
    pub shown: Option<String>,
}

impl Model {
    /// On a hub: show stall `name`'s uplinks and traffic from the next update.
    pub fn focus(&mut self, name: Option<String>) {
        self.focus = name;
    }

    /// The daemon did not answer.
    pub fn unreachable(&mut self, why: String) {
        self.connected = None;
        self.unreachable = Some(why);
    }

    /// The sequence number of the newest event held (ask for what follows).
    pub fn last_event(&self) -> u64 {
        self.last_event
    }

    /// New events (oldest first); the newest 50 are kept.
    pub fn add_events(&mut self, doc: &Value) {
        for e in doc["events"].as_array().into_iter().flatten() {
            self.last_event = self.last_event.max(e["seq"].as_u64().unwrap_or(0));
            self.events.push(EventRow {
                at_ms: e["at_ms"].as_i64().unwrap_or(0),
                level: e["level"].as_str().unwrap_or("info").to_string(),
                message: e["message"].as_str().unwrap_or("").to_string(),
            });
        }
        let extra = self.events.len().saturating_sub(50);
        self.events.drain(..extra);
    }

    /// A status document at `now` (a monotonic time): rates come from the byte counters'
    /// change since the previous one.
    pub fn update(&mut self, status: &Value, now: Duration) {
        let dt = self
            .last_poll
            .map(|t| now.saturating_sub(t).as_secs_f64())
            .filter(|d| *d > 0.0);
        self.last_poll = Some(now);
        self.unreachable = None;
        let fleet: Vec<StallRow> = status["stalls"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| StallRow {
                name: r["name"].as_str().unwrap_or("?").to_string(),
                state: r["state"].as_str().unwrap_or("?").to_string(),
                last_heard_s: r["last_heard_s"].as_u64(),
                sales_waiting: r["sales_waiting"].as_u64(),
                uplinks: r["uplinks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|l| {
                        (
                            l["name"].as_str().unwrap_or("?").to_string(),
                            l["state"].as_str().unwrap_or("?").to_string(),
                        )
                    })
                    .collect(),
            })
            .collect();
        let (bond, shown) = match status["role"].as_str() {
            Some("edge") => (&status["bonds"]["hub"], None),
            // The hub: the stall the operator chose, else the first listed (the most in
            // need of attention), else any.
            _ => {
                let name = self
                    .focus
                    .clone()
                    .filter(|f| fleet.iter().any(|r| &r.name == f))
                    .or_else(|| fleet.first().map(|r| r.name.clone()))
                    .or_else(|| {
                        status["bonds"]
                            .as_object()
                            .and_then(|m| m.keys().next().cloned())
                    });
                let bond = name
                    .as_deref()
                    .map_or(&Value::Null, |n| &status["bonds"][n]);
                (bond, name)
            }
        };
        // Another stall's counters say nothing about this one's rates.
        if shown != self.shown {
            self.counters.clear();
            self.class_bytes.clear();
            self.history.clear();
            self.pos_packets = None;
            self.shown = shown.clone();
        }
        let mut uplinks = Vec::new();
        for l in bond["links"].as_array().into_iter().flatten() {
            let name = l["name"].as_str().unwrap_or("?").to_string();
            let (tx, rx) = (
                l["tx_bytes"].as_u64().unwrap_or(0),
                l["rx_bytes"].as_u64().unwrap_or(0),
            );
            let (up_bps, down_bps) = match (self.counters.get(&name), dt) {
                (Some((ptx, prx)), Some(dt)) => (
                    tx.saturating_sub(*ptx) as f64 * 8.0 / dt,
                    rx.saturating_sub(*prx) as f64 * 8.0 / dt,
                ),
                _ => (0.0, 0.0),
            };
            self.counters.insert(name.clone(), (tx, rx));
            let h = self.history.entry(name.clone()).or_default();
            if dt.is_some() {
                h.push_back((up_bps + down_bps) as u64);
                if h.len() > HISTORY {
                    h.pop_front();
                }
            }
            let mut state = l["state"].as_str().unwrap_or("?").to_string();
            if state == "up" && l["degraded"].as_bool() == Some(true) {
                state = "degraded".into();
            }
            uplinks.push(UplinkRow {
                name,
                kind: l["kind"].as_str().unwrap_or("-").to_string(),
                state,
                rtt_ms: l["rtt_ms"].as_f64(),
                jitter_ms: l["jitter_ms"].as_f64().unwrap_or(0.0),
                loss: l["loss"].as_f64().unwrap_or(0.0),
                up_bps,
                down_bps,
                preferred: l["preferred"].as_bool().unwrap_or(false),
                backup: l["backup"].as_bool().unwrap_or(false),
                history: h.iter().copied().collect(),
                cap: l["cap"]["used_bytes"]
                    .as_u64()
                    .zip(l["cap"]["limit_bytes"].as_u64()),
            });
        }
        let mut classes = Vec::new();
        for c in bond["classes"].as_array().into_iter().flatten() {
            let class = c["class"].as_str().unwrap_or("?").to_string();
            let bytes = c["bytes"].as_u64().unwrap_or(0);
            let bps = match (self.class_bytes.get(&class), dt) {
                (Some(p), Some(dt)) => bytes.saturating_sub(*p) as f64 * 8.0 / dt,
                _ => 0.0,
            };
            self.class_bytes.insert(class.clone(), bytes);
            if class == "pos" {
                let packets = c["packets"].as_u64().unwrap_or(0);
                if self.pos_packets.is_some_and(|p| p != packets) {
                    self.pos_seen_at = Some(now);
                }
                self.pos_packets = Some(packets);
            }
            classes.push(ClassRow {
                class,
                bps,
                delay_p99_ms: c["delay_p99_ms"].as_f64(),
                dropped: ["dropped_full", "dropped_codel", "dropped_sojourn"]
                    .iter()
                    .map(|k| c[k].as_u64().unwrap_or(0))
                    .sum(),
            });
        }
        // The daemon's own figure when it has one (payments sent since it started);
        // otherwise what this dashboard saw move.
        let daemon_idle = bond["classes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["class"] == "pos")
            .and_then(|c| c["idle_ms"].as_u64())
            .map(|ms| ms as f64 / 1000.0);
        self.pos_idle_s = daemon_idle.or_else(|| {
            self.pos_seen_at
                .map(|t| now.saturating_sub(t).as_secs_f64())
        });
        let c = &status["commerce"];
        let sales = c.is_object().then(|| Sales {
            waiting: c["undelivered"].as_u64().unwrap_or(0),
            oldest_s: c["oldest_undelivered_age_s"].as_i64(),
            dead: c["dead_letters"].as_u64().unwrap_or(0),
            online: c["online"].as_bool().unwrap_or(false),
            storage_full: c["storage"]["ok"].as_bool() == Some(false),
        });
        let overall = match status["state"].as_str() {
            Some("online") => Overall::Online,
            Some("degraded") => Overall::Degraded,
            _ => Overall::Offline,
        };
        self.connected = Some(Connected {
            overall,
            role: status["role"].as_str().unwrap_or("?").to_string(),
            peer: status["peer"].as_str().map(str::to_string),
            uptime_s: status["uptime_s"].as_u64().unwrap_or(0),
            clock: status["clock"].as_str().unwrap_or("unverified").to_string(),
            fallback: status["fallback_active"].as_bool().unwrap_or(false),
            uplinks,
            classes,
            sales,
            fleet,
            shown,
        });
    }
}

/// "12 s", "4 min", "2h13m", "3 days".
pub fn age(s: i64) -> String {
    match s {
        i64::MIN..=59 => format!("{} s", s.max(0)),
        60..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        86_400..=172_799 => "1 day".to_string(),
        _ => format!("{} days", s / 86_400),
    }
}

/// "1.2/20 GB", "350/500 MB": data used against an allowance.
pub fn usage(used: u64, limit: u64) -> String {
    let (div, unit) = if limit >= 1_000_000_000 {
        (1e9, "GB")
    } else {
        (1e6, "MB")
    };
    let f = |v: u64| {
        let x = v as f64 / div;
        if x >= 100.0 {
            format!("{x:.0}")
        } else {
            format!("{x:.1}")
        }
    };
    let l = limit as f64 / div;
    let lim = if l.fract() == 0.0 {
        format!("{l:.0}")
    } else {
        f(limit)
    };
    format!("{}/{lim} {unit}", f(used))
}

/// A rate for a narrow column: "9.6M", "850k", "120".
pub fn rate_short(bps: f64) -> String {
    if bps >= 100e6 {
        format!("{:.0}M", bps / 1e6)
    } else if bps >= 1e6 {
        format!("{:.1}M", bps / 1e6)
    } else if bps >= 1e3 {
        format!("{:.0}k", bps / 1e3)
    } else {
        format!("{bps:.0}")
    }
}

/// "4.2 Mb/s", "850 kb/s".
pub fn rate(bps: f64) -> String {
    if bps >= 1e6 {
        format!("{:.1} Mb/s", bps / 1e6)
    } else if bps >= 1e3 {
        format!("{:.0} kb/s", bps / 1e3)
    } else {
        format!("{bps:.0} b/s")
    }
}

/// The sales panel's sentence.
pub fn sales_sentence(s: &Sales) -> String {
    let n = s.waiting;
    let sales = if n == 1 { "sale" } else { "sales" };
    let mut out = if s.storage_full {
        "STORAGE FULL: new sales cannot be saved on this box. Free space on the SD card \
         (or get the box online so saved sales upload). "
            .to_string()
    } else {
        String::new()
    };
    out += &match (n, s.online) {
        (0, _) => "All sales are uploaded.".to_string(),
        (_, false) => format!(
            "Offline: {n} {sales} saved on this box; they will upload by themselves when a connection returns."
        ),
        (_, true) => format!("Uploading: {n} {sales} waiting; nothing to do."),
    };
    if let Some(o) = s.oldest_s.filter(|_| n > 0) {
        out.push_str(&format!(" Oldest: {}.", age(o)));
        if o >= 20 * 3600 {
            out.push_str(" Card payments older than 24 h may be void: get the box online now.");
        } else if o >= 12 * 3600 {
            out.push_str(" Get the box online today.");
        }
    }
    if s.dead > 0 {
        out.push_str(&format!(
            " {} refused by the shop's system: call support.",
            s.dead
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(tx: u64, pos: u64, state: &str) -> Value {
        json!({
            "version": 1, "role": "edge", "state": state, "fallback_active": false,
            "uptime_s": 3700, "peer": "203.0.113.10:4433", "clock": "synced",
            "bonds": { "hub": {
                "links": [{ "name": "wifi", "kind": "wifi", "state": "up", "degraded": false,
                            "rtt_ms": 21.0, "jitter_ms": 1.0, "loss": 0.0,
                            "tx_bytes": tx, "rx_bytes": 2 * tx }],
                "classes": [{ "class": "pos", "packets": pos, "bytes": pos * 100 }]
            }},
            "commerce": { "online": true, "undelivered": 0, "dead_letters": 0 }
        })
    }

    #[test]
    fn rates_come_from_counter_changes_and_payments_are_tracked() {
        let mut m = Model::default();
        m.update(&status(0, 5, "online"), Duration::from_secs(10));
        m.update(&status(125_000, 5, "online"), Duration::from_secs(11));
        let c = m.connected.clone().expect("connected");
        assert_eq!(c.uplinks[0].up_bps, 1e6);
        assert_eq!(c.uplinks[0].down_bps, 2e6);
        assert_eq!(c.uplinks[0].history, vec![3_000_000]);
        assert_eq!(m.pos_idle_s, None, "no payment traffic seen yet");
        m.update(&status(125_000, 9, "online"), Duration::from_secs(12));
        m.update(&status(125_000, 9, "online"), Duration::from_secs(15));
        assert_eq!(m.pos_idle_s, Some(3.0));
        m.unreachable("gone".into());
        assert!(m.connected.is_none());
    }

    #[test]
    fn caps_are_said_against_the_allowance() {
        assert_eq!(usage(1_234_000_000, 20_000_000_000), "1.2/20 GB");
        assert_eq!(usage(1_234_000_000, 2_500_000_000), "1.2/2.5 GB");
        assert_eq!(rate_short(9_600_000.0), "9.6M");
        assert_eq!(rate_short(850_000.0), "850k");
        assert_eq!(usage(350_000_000, 500_000_000), "350/500 MB");
        let mut m = Model::default();
        let mut st = status(0, 0, "online");
        st["bonds"]["hub"]["links"][0]["cap"] =
            serde_json::json!({ "used_bytes": 1500000000u64, "limit_bytes": 2000000000u64 });
        m.update(&st, Duration::from_secs(1));
        let c = m.connected.expect("connected");
        assert_eq!(c.uplinks[0].cap, Some((1_500_000_000, 2_000_000_000)));
    }

    #[test]
    fn sales_are_said_in_a_sentence() {
        let s = Sales {
            waiting: 12,
            oldest_s: Some(2 * 3600 + 13 * 60),
            dead: 0,
            online: false,
            storage_full: false,
        };
        assert_eq!(
            sales_sentence(&s),
            "Offline: 12 sales saved on this box; they will upload by themselves when a \
             connection returns. Oldest: 2h13m."
        );
        let late = Sales {
            oldest_s: Some(21 * 3600),
            dead: 2,
            ..s
        };
        assert!(sales_sentence(&late).contains("may be void"));
        assert!(sales_sentence(&late).contains("2 refused"));
        let full = Sales {
            storage_full: true,
            ..s
        };
        assert!(sales_sentence(&full).starts_with("STORAGE FULL"));
        assert!(!sales_sentence(&s).contains("STORAGE FULL"));
    }
}

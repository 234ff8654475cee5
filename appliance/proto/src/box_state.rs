//! What the edge tells its operator about the box as a whole, decided from its uplinks:
//! whether it is online, degraded or offline, and the bitrate a live-stream encoder can
//! count on now.

use super::bond::LinkCondition;

/// The box's state as the status, the dashboard and the events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoxState {
    /// Every uplink the operator has not switched off is up.
    Online,
    /// The hub is reached, but some uplink is not up.
    Degraded,
    /// No uplink reaches the hub: sales are kept on the box.
    Offline,
}

impl BoxState {
    /// `online` is whether any uplink reaches the hub; `links` are the uplinks' states.
    /// An uplink the operator switched off does not make the box degraded.
    pub fn of(online: bool, links: &[LinkCondition]) -> Self {
        if !online {
            return Self::Offline;
        }
        let counted = links.iter().filter(|l| **l != LinkCondition::Disabled);
        if counted.clone().all(|l| *l == LinkCondition::Up) {
            Self::Online
        } else {
            Self::Degraded
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Degraded => "degraded",
            Self::Offline => "offline",
        }
    }
}

/// An uplink as the stream advice sees it.
#[derive(Debug, Clone, Copy)]
pub struct StreamPath<'a> {
    pub name: &'a str,
    /// Whether the stream class may use it.
    pub allowed: bool,
    pub up: bool,
    pub degraded: bool,
    /// What rate control lets the edge send on it, bits per second.
    pub rate_bps: f64,
}

/// Why the advice is what it is.
#[derive(Debug, Clone, PartialEq)]
pub enum AdviceBasis {
    NoUplink,
    /// 80 % of this uplink's current send rate.
    ShareOf(String),
    /// The stream class's `max_rate`.
    ClassMax,
}

/// The bitrate a live-stream encoder can use now: a stream flow rides one uplink (the
/// class is lowest-latency), so 80 % of the best usable uplink's send rate among those
/// the stream class may use, never above the class's `max_rate`. 80 % leaves room for
/// payments, the stream's own audio and retransmissions.
pub fn stream_advice<'a>(
    paths: impl IntoIterator<Item = StreamPath<'a>>,
    class_max_bps: Option<u64>,
) -> (u64, Option<&'a str>, AdviceBasis) {
    let best = paths
        .into_iter()
        .filter(|p| p.allowed && p.up && !p.degraded)
        .max_by(|a, b| a.rate_bps.total_cmp(&b.rate_bps));
    let Some(best) = best else {
        return (0, None, AdviceBasis::NoUplink);
    };
    let share = best.rate_bps * 0.8;
    match class_max_bps {
        Some(m) if (m as f64) < share => (m, Some(best.name), AdviceBasis::ClassMax),
        _ => (
            share as u64,
            Some(best.name),
            AdviceBasis::ShareOf(best.name.to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LinkCondition::*;

    #[test]
    fn the_box_state_follows_the_uplinks() {
        assert_eq!(BoxState::of(false, &[Up, Up]), BoxState::Offline);
        assert_eq!(BoxState::of(true, &[Up, Up]), BoxState::Online);
        assert_eq!(BoxState::of(true, &[Up, Down]), BoxState::Degraded);
        assert_eq!(BoxState::of(true, &[Up, Captive]), BoxState::Degraded);
        // Switched off by the operator: not degraded.
        assert_eq!(BoxState::of(true, &[Up, Disabled]), BoxState::Online);
    }

    #[test]
    fn stream_advice_takes_the_best_usable_allowed_uplink() {
        let p = |name, allowed, up, degraded, mbit: f64| StreamPath {
            name,
            allowed,
            up,
            degraded,
            rate_bps: mbit * 1e6,
        };
        let paths = [
            p("wifi", true, true, false, 20.0),
            p("cell", true, true, true, 50.0),
            p("eth", false, true, false, 90.0),
            p("sat", true, false, false, 80.0),
        ];
        assert_eq!(
            stream_advice(paths, None),
            (
                16_000_000,
                Some("wifi"),
                AdviceBasis::ShareOf("wifi".into())
            )
        );
        assert_eq!(
            stream_advice(paths, Some(4_000_000)),
            (4_000_000, Some("wifi"), AdviceBasis::ClassMax)
        );
        assert_eq!(stream_advice([], None), (0, None, AdviceBasis::NoUplink));
    }
}

//! When to route LAN traffic straight out of an uplink (with NAT) because no uplink
//! reaches the hub, through which uplink, and when to come back to the tunnel.
//!
//! Offline for `after` (and the config allows it): enter the fallback through the best
//! uplink with carrier (primary before backup, then config order). Stay on it while it
//! keeps its carrier (no flapping between uplinks); switch when it loses carrier and
//! another has one. Leave as soon as the hub is reachable again.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub uplink: usize,
    pub carrier: bool,
    pub backup: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Route LAN traffic out of this uplink (entering or switching).
    Use(usize),
    /// Back to the tunnel.
    Leave,
}

#[derive(Debug, Clone)]
pub struct DirectFallback {
    enabled: bool,
    after: Duration,
    offline_since: Option<Instant>,
    active: Option<usize>,
}

impl DirectFallback {
    pub fn new(enabled: bool, after: Duration) -> Self {
        Self {
            enabled,
            after,
            offline_since: None,
            active: None,
        }
    }

    /// The uplink the fallback currently uses.
    pub fn active(&self) -> Option<usize> {
        self.active
    }

    pub fn update(
        &mut self,
        online: bool,
        candidates: &[Candidate],
        now: Instant,
    ) -> Option<Action> {
        if online {
            self.offline_since = None;
            return self.active.take().map(|_| Action::Leave);
        }
        let since = *self.offline_since.get_or_insert(now);
        if !self.enabled || now.saturating_duration_since(since) < self.after {
            return None;
        }
        let has_carrier = |u: usize| candidates.iter().any(|c| c.uplink == u && c.carrier);
        if self.active.is_some_and(has_carrier) {
            return None;
        }
        let best = candidates
            .iter()
            .filter(|c| c.carrier)
            .min_by_key(|c| (c.backup, c.uplink))?
            .uplink;
        self.active = Some(best);
        Some(Action::Use(best))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(uplink: usize, carrier: bool, backup: bool) -> Candidate {
        Candidate {
            uplink,
            carrier,
            backup,
        }
    }

    #[test]
    fn enters_after_the_delay_through_the_best_uplink_and_leaves_when_online() {
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut f = DirectFallback::new(true, s(2));
        let cands = [c(0, true, true), c(1, false, false), c(2, true, false)];
        assert_eq!(f.update(false, &cands, t), None);
        assert_eq!(f.update(false, &cands, t + s(1)), None);
        assert_eq!(f.update(false, &cands, t + s(2)), Some(Action::Use(2)));
        assert_eq!(f.update(false, &cands, t + s(3)), None, "no flapping");
        assert_eq!(f.update(true, &cands, t + s(4)), Some(Action::Leave));
        assert_eq!(f.active(), None);
        assert_eq!(f.update(false, &cands, t + s(5)), None, "delay starts over");
    }

    #[test]
    fn switches_when_its_uplink_loses_carrier() {
        let t = Instant::now();
        let mut f = DirectFallback::new(true, Duration::ZERO);
        assert_eq!(
            f.update(false, &[c(0, true, false), c(1, true, true)], t),
            Some(Action::Use(0))
        );
        assert_eq!(
            f.update(false, &[c(0, false, false), c(1, true, true)], t),
            Some(Action::Use(1))
        );
        // Nothing with carrier: keep what we have.
        assert_eq!(
            f.update(false, &[c(0, false, false), c(1, false, true)], t),
            None
        );
        assert_eq!(f.active(), Some(1));
    }

    #[test]
    fn disabled_never_acts() {
        let t = Instant::now();
        let mut f = DirectFallback::new(false, Duration::ZERO);
        assert_eq!(
            f.update(false, &[c(0, true, false)], t + Duration::from_secs(60)),
            None
        );
    }
}

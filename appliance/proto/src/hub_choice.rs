//! Which hub the whole bond uses, sans-IO. Every uplink connects to the same hub: a bond
//! split across two hubs (whose public addresses differ) breaks every flow spread over
//! both. When one uplink cannot reach the hub, that uplink is down, not moved elsewhere;
//! the bond moves to the next configured hub only when no uplink is connected to the
//! current one and every uplink that tried it has failed its latest [`MOVE_AFTER`]
//! attempts in a row (each attempt waits up to 3 s for the hub; two, so that one
//! uplink's passing glitch while the others are down does not move the bond).
//! It stays on the new hub when the old one comes back (moving back would cut every flow
//! a second time); it moves on again only when the new one fails the same way.
//!
//! A hub that dies leaves its connections open until QUIC's idle timeout: with another
//! hub to go to, connections of a bond that has been offline for [`DEAD_AFTER`] are
//! closed so that the uplinks try again ([`HubChoice::poll_close`]); that silence counts
//! as each one's first failure. With one hub nothing is closed early (a connection that
//! outlives a short outage resumes at once when it ends).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Consecutive failed attempts of every trying uplink before the bond moves.
pub const MOVE_AFTER: u32 = 2;
/// How long the bond may be offline with connections open before they are closed (with
/// another hub configured).
pub const DEAD_AFTER: Duration = Duration::from_secs(2);

/// The bond's hub changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub from: usize,
    pub to: usize,
}

/// The bond's choice among `hubs` configured hubs (in config order).
#[derive(Debug, Clone)]
pub struct HubChoice {
    hubs: usize,
    current: usize,
    /// Per uplink that tried the current hub: consecutive failures (0 while connected).
    tried: BTreeMap<usize, u32>,
    connected: BTreeMap<usize, ()>,
    /// Since when the bond has been offline (no uplink reaches the hub).
    offline_since: Option<Instant>,
    /// The connections of this offline spell were closed already.
    closed: bool,
}

impl HubChoice {
    /// Starts with the first hub.
    pub fn new(hubs: usize) -> Self {
        Self {
            hubs,
            current: 0,
            tried: BTreeMap::new(),
            connected: BTreeMap::new(),
            offline_since: None,
            closed: false,
        }
    }

    /// Whether the bond reaches its hub now (any uplink Up), as the bond says.
    pub fn handle_online(&mut self, online: bool, now: Instant) {
        if online {
            self.offline_since = None;
            self.closed = false;
        } else if self.offline_since.is_none() {
            self.offline_since = Some(now);
        }
    }

    /// True once per offline spell, when the bond has been offline for [`DEAD_AFTER`]
    /// with another hub to go to: the driver closes every uplink's connection.
    pub fn poll_close(&mut self, now: Instant) -> bool {
        let due = self.hubs >= 2
            && !self.closed
            && self
                .offline_since
                .is_some_and(|t| now.saturating_duration_since(t) >= DEAD_AFTER);
        if due {
            self.closed = true;
            // Silence on a connection for that long counts as one failed attempt: the
            // next failure of each moves the bond.
            for (link, ()) in std::mem::take(&mut self.connected) {
                self.tried.insert(link, 1);
            }
        }
        due
    }

    /// The hub every uplink tries now (`None` when none is configured).
    pub fn current(&self) -> Option<usize> {
        (self.current < self.hubs).then_some(self.current)
    }

    /// A new hub list (a config reload): the bond stays on its hub when the list still
    /// has that index, else starts over at the first.
    pub fn set_hubs(&mut self, hubs: usize) {
        self.hubs = hubs;
        if self.current >= hubs {
            self.current = 0;
            self.tried.clear();
            self.connected.clear();
        }
    }

    /// Uplink `link` reached `hub`. A result about a hub the bond has left is ignored (the
    /// driver closes that connection: see [`Self::current`]).
    pub fn handle_connected(&mut self, link: usize, hub: usize) {
        if hub == self.current {
            self.tried.insert(link, 0);
            self.connected.insert(link, ());
        }
    }

    /// Uplink `link` failed to reach `hub`; says when the bond moves because of it.
    pub fn handle_failed(&mut self, link: usize, hub: usize) -> Option<Moved> {
        if hub != self.current || self.hubs < 2 {
            return None;
        }
        let n = self.tried.entry(link).or_insert(0);
        *n = n.saturating_add(1);
        let all_failed = self.connected.is_empty() && self.tried.values().all(|&f| f >= MOVE_AFTER);
        all_failed.then(|| self.move_on())
    }

    /// Uplink `link`'s connection closed, or the uplink stopped trying (removed, no
    /// carrier, disabled): it no longer holds the bond on this hub.
    pub fn handle_closed(&mut self, link: usize) {
        self.connected.remove(&link);
    }

    /// Uplink `link` left the bond or stopped trying (no carrier or address, disabled,
    /// held by the checks): the bond no longer waits for it to give up on the hub.
    pub fn remove(&mut self, link: usize) {
        self.connected.remove(&link);
        self.tried.remove(&link);
    }

    fn move_on(&mut self) -> Moved {
        let from = self.current;
        self.current = (self.current + 1) % self.hubs;
        self.tried.clear();
        Moved {
            from,
            to: self.current,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_uplink_failing_while_another_is_connected_does_not_split_the_bond() {
        let mut h = HubChoice::new(2);
        h.handle_connected(0, 0);
        for _ in 0..10 {
            assert_eq!(h.handle_failed(1, 0), None);
        }
        assert_eq!(h.current(), Some(0));
    }

    #[test]
    fn the_bond_moves_when_every_trying_uplink_fails() {
        let mut h = HubChoice::new(2);
        h.handle_connected(0, 0);
        h.handle_connected(1, 0);
        // The hub dies: both connections close, both uplinks fail to reconnect.
        h.handle_closed(0);
        h.handle_closed(1);
        assert_eq!(h.handle_failed(0, 0), None);
        assert_eq!(h.handle_failed(0, 0), None, "uplink 1 has not given up yet");
        assert_eq!(h.handle_failed(1, 0), None);
        assert_eq!(h.handle_failed(1, 0), Some(Moved { from: 0, to: 1 }));
        assert_eq!(h.current(), Some(1));
        // Late failures about the old hub change nothing.
        assert_eq!(h.handle_failed(0, 0), None);
        // Hub A back: the bond stays on B while B works.
        h.handle_connected(0, 1);
        assert_eq!(h.handle_failed(1, 1), None);
        assert_eq!(h.current(), Some(1));
        // B fails everywhere: back to A (round robin).
        h.handle_closed(0);
        assert_eq!(h.handle_failed(0, 1), None);
        assert_eq!(h.handle_failed(0, 1), None, "uplink 1 has failed once only");
        assert_eq!(h.handle_failed(1, 1), Some(Moved { from: 1, to: 0 }));
    }

    #[test]
    fn a_connection_to_a_hub_the_bond_left_does_not_count() {
        let mut h = HubChoice::new(2);
        h.handle_failed(0, 0);
        assert_eq!(h.handle_failed(0, 0), Some(Moved { from: 0, to: 1 }));
        h.handle_connected(1, 0);
        assert_eq!(h.current(), Some(1));
        h.handle_failed(0, 1);
        assert_eq!(
            h.handle_failed(0, 1),
            Some(Moved { from: 1, to: 0 }),
            "uplink 1's connection to the old hub does not hold the bond on the new one"
        );
    }

    #[test]
    fn one_hub_never_moves_and_a_shorter_list_starts_over() {
        let mut h = HubChoice::new(1);
        for _ in 0..5 {
            assert_eq!(h.handle_failed(0, 0), None);
        }
        let mut h = HubChoice::new(3);
        for hub in [0, 0, 1, 1] {
            h.handle_failed(0, hub);
        }
        assert_eq!(h.current(), Some(2));
        h.set_hubs(2);
        assert_eq!(h.current(), Some(0));
        h.set_hubs(0);
        assert_eq!(h.current(), None);
    }

    #[test]
    fn a_dead_hubs_connections_are_closed_once_per_offline_spell_with_a_hub_to_go_to() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        let mut h = HubChoice::new(2);
        h.handle_connected(0, 0);
        h.handle_online(true, t);
        assert!(!h.poll_close(t + 10 * s));
        h.handle_online(false, t + s);
        h.handle_online(false, t + 2 * s);
        assert!(!h.poll_close(t + 2 * s), "offline for 1 s only");
        assert!(h.poll_close(t + 3 * s));
        assert!(!h.poll_close(t + 5 * s), "once per spell");
        // The closed connection no longer holds the bond on the hub, and its silence
        // was its first failure.
        assert_eq!(h.handle_failed(0, 0), Some(Moved { from: 0, to: 1 }));
        h.handle_online(true, t + 6 * s);
        h.handle_online(false, t + 7 * s);
        assert!(h.poll_close(t + 9 * s), "a new spell");
        // With a single hub, connections outlive an outage.
        let mut one = HubChoice::new(1);
        one.handle_online(false, t);
        assert!(!one.poll_close(t + 60 * s));
    }
}

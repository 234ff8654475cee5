//! One edge uplink's lifecycle, sans-IO: whether it may connect (the operator or its data
//! cap switched it off, the reachability checks hold it, its interface has no carrier or
//! address), when it tries to reach the hub again after a failure (exponential backoff),
//! and when its connection must be closed. Also the rule that decides whether an uplink
//! is a backup ([`is_backup`]).
//!
//! The edge's uplink task feeds it what netlink and the connection attempts say and does
//! what [`UplinkState::poll_action`] asks; it sleeps until [`UplinkState::poll_timeout`].

use std::time::{Duration, Instant};

/// The first retry after a failed attempt; doubled per failure up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// The longest wait between attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// How long one attempt (handshake and hello) may take before it counts as failed.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the interface is read again when nothing else wakes the task (netlink
/// notifications wake it sooner; this catches one that was missed).
pub const RECHECK: Duration = Duration::from_secs(5);

/// What the interface offers, from netlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    /// No such interface (a USB modem unplugged).
    Absent,
    /// Present without carrier.
    NoCarrier,
    /// Carrier, but no IPv4 address yet (DHCP still running).
    NoAddress,
    /// Carrier and an address: the tunnel can be tried.
    Ready,
}

/// Where the uplink is in its life (for status and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Phase {
    /// Switched off by the operator or its data cap.
    Disabled,
    /// Its interface is absent, without carrier or without an address.
    Waiting,
    /// The reachability checks hold it out (a captive portal, no internet).
    Held,
    /// An attempt to reach the hub is running.
    Connecting,
    /// Failed; the next attempt is due then.
    Backoff,
    /// Its connection to the hub is up.
    Connected,
}

/// Why the driver must close the uplink's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Disabled,
    InterfaceGone,
}

impl CloseReason {
    /// The reason as the QUIC close frame carries it.
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Self::Disabled => b"disabled by the operator",
            Self::InterfaceGone => b"interface gone",
        }
    }
}

/// What the driver must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start one attempt to reach the hub (report it with `handle_connected` or
    /// `handle_failed`).
    Connect,
    /// Close the connection (and, for `InterfaceGone`, the endpoint bound to the
    /// interface).
    Close(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    None,
    Connecting,
    Up,
}

/// One uplink's lifecycle.
#[derive(Debug, Clone)]
pub struct UplinkState {
    disabled: bool,
    held: bool,
    iface: Interface,
    conn: Conn,
    backoff: Duration,
    /// No attempt before this (after a failure).
    retry_at: Option<Instant>,
    /// A close the driver has not done yet.
    close: Option<CloseReason>,
}

impl Default for UplinkState {
    fn default() -> Self {
        Self::new()
    }
}

impl UplinkState {
    pub fn new() -> Self {
        Self {
            disabled: false,
            held: false,
            iface: Interface::Absent,
            conn: Conn::None,
            backoff: BACKOFF_MIN,
            retry_at: None,
            close: None,
        }
    }

    pub fn phase(&self, now: Instant) -> Phase {
        match self.conn {
            _ if self.disabled => Phase::Disabled,
            Conn::Up => Phase::Connected,
            Conn::Connecting => Phase::Connecting,
            Conn::None if self.iface != Interface::Ready => Phase::Waiting,
            Conn::None if self.held => Phase::Held,
            Conn::None if self.retry_at.is_some_and(|t| t > now) => Phase::Backoff,
            Conn::None => Phase::Connecting,
        }
    }

    /// The operator or the data cap switched the uplink off (or on again).
    pub fn set_disabled(&mut self, disabled: bool) {
        if disabled && !self.disabled && self.conn != Conn::None {
            self.close = Some(CloseReason::Disabled);
        }
        self.disabled = disabled;
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// The reachability checks hold the uplink out (or release it). A held uplink keeps
    /// a connection it has (the checks decide what it carries) but makes no new one.
    pub fn set_held(&mut self, held: bool) {
        if self.held && !held {
            // Released: try at once, whatever the backoff was.
            self.retry_at = None;
            self.backoff = BACKOFF_MIN;
        }
        self.held = held;
    }

    /// What netlink says of the interface now.
    pub fn handle_interface(&mut self, iface: Interface) {
        if iface == Interface::Absent && self.iface != Interface::Absent {
            // The endpoint was bound to the interface: it goes with it.
            self.close = Some(CloseReason::InterfaceGone);
            if self.conn == Conn::Up {
                self.conn = Conn::None;
            }
        }
        if iface == Interface::Ready && self.iface != Interface::Ready {
            // A new carrier or address: the old failures said nothing about it.
            self.retry_at = None;
            self.backoff = BACKOFF_MIN;
        }
        self.iface = iface;
    }

    /// The attempt the driver started reached the hub.
    pub fn handle_connected(&mut self) {
        self.conn = Conn::Up;
        self.backoff = BACKOFF_MIN;
        self.retry_at = None;
    }

    /// The attempt failed (refused, timed out, the hello was refused).
    pub fn handle_failed(&mut self, now: Instant) {
        self.conn = Conn::None;
        self.retry_at = now.checked_add(self.backoff);
        self.backoff = self.backoff.saturating_mul(2).min(BACKOFF_MAX);
    }

    /// The connection closed (idle timeout, the hub went away, a close the driver did).
    pub fn handle_closed(&mut self) {
        if self.conn == Conn::Up {
            self.conn = Conn::None;
        }
    }

    /// What the driver must do now; call until `None`.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if let Some(r) = self.close.take() {
            if r == CloseReason::Disabled {
                self.conn = Conn::None;
            }
            return Some(Action::Close(r));
        }
        let may = !self.disabled
            && !self.held
            && self.iface == Interface::Ready
            && self.conn == Conn::None
            && self.retry_at.is_none_or(|t| t <= now);
        may.then(|| {
            self.conn = Conn::Connecting;
            self.retry_at = None;
            Action::Connect
        })
    }

    /// When an action is next due (a retry after backoff), if nothing else changes.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let waiting = !self.disabled
            && !self.held
            && self.iface == Interface::Ready
            && self.conn == Conn::None;
        self.retry_at.filter(|_| waiting)
    }
}

/// Whether an uplink is a backup, from everything that decides it, in this order: a data
/// cap past its allowance makes it backup-only; else an operator's preferred uplink makes
/// every other one a backup; else the configured priority.
pub fn is_backup(
    capped: bool,
    preferred: Option<&str>,
    name: &str,
    configured_backup: bool,
) -> bool {
    capped
        || match preferred {
            Some(p) => p != name,
            None => configured_backup,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> (UplinkState, Instant) {
        let mut u = UplinkState::new();
        u.handle_interface(Interface::Ready);
        (u, Instant::now())
    }

    #[test]
    fn a_ready_uplink_connects_at_once_and_only_once() {
        let (mut u, now) = ready();
        assert_eq!(u.poll_action(now), Some(Action::Connect));
        assert_eq!(u.poll_action(now), None, "one attempt at a time");
        assert_eq!(u.phase(now), Phase::Connecting);
        u.handle_connected();
        assert_eq!(u.phase(now), Phase::Connected);
        assert_eq!(u.poll_action(now), None);
        assert_eq!(u.poll_timeout(), None);
    }

    #[test]
    fn failures_back_off_exponentially_up_to_three_seconds() {
        let (mut u, mut now) = ready();
        let mut waits = Vec::new();
        for _ in 0..7 {
            assert_eq!(u.poll_action(now), Some(Action::Connect));
            u.handle_failed(now);
            assert_eq!(u.poll_action(now), None, "not before the backoff");
            let t = u.poll_timeout().expect("a retry time");
            waits.push((t - now).as_millis());
            now = t;
        }
        assert_eq!(waits, [200, 400, 800, 1600, 3000, 3000, 3000]);
        // A success resets the backoff.
        assert_eq!(u.poll_action(now), Some(Action::Connect));
        u.handle_connected();
        u.handle_closed();
        assert_eq!(
            u.poll_action(now),
            Some(Action::Connect),
            "a closed connection is retried at once"
        );
        u.handle_failed(now);
        assert_eq!(u.poll_timeout(), Some(now + BACKOFF_MIN));
    }

    #[test]
    fn nothing_is_tried_without_carrier_address_or_while_held_or_disabled() {
        let now = Instant::now();
        let mut u = UplinkState::new();
        for iface in [
            Interface::Absent,
            Interface::NoCarrier,
            Interface::NoAddress,
        ] {
            u.handle_interface(iface);
            assert_eq!(u.poll_action(now), None);
            assert_eq!(u.phase(now), Phase::Waiting);
        }
        u.handle_interface(Interface::Ready);
        u.set_held(true);
        assert_eq!(u.poll_action(now), None);
        assert_eq!(u.phase(now), Phase::Held);
        u.set_held(false);
        u.set_disabled(true);
        assert_eq!(u.poll_action(now), None);
        assert_eq!(u.phase(now), Phase::Disabled);
        u.set_disabled(false);
        assert_eq!(u.poll_action(now), Some(Action::Connect));
    }

    #[test]
    fn disabling_closes_the_connection_and_a_lost_interface_its_endpoint() {
        let (mut u, now) = ready();
        u.poll_action(now);
        u.handle_connected();
        u.set_disabled(true);
        assert_eq!(
            u.poll_action(now),
            Some(Action::Close(CloseReason::Disabled))
        );
        assert_eq!(u.poll_action(now), None);
        u.set_disabled(false);
        assert_eq!(u.poll_action(now), Some(Action::Connect));
        u.handle_connected();
        u.handle_interface(Interface::Absent);
        assert_eq!(
            u.poll_action(now),
            Some(Action::Close(CloseReason::InterfaceGone))
        );
        assert_eq!(u.phase(now), Phase::Waiting);
    }

    #[test]
    fn a_new_carrier_or_a_release_skips_the_old_backoff() {
        let (mut u, now) = ready();
        for _ in 0..4 {
            u.poll_action(now);
            u.handle_failed(now);
        }
        assert!(u.poll_timeout().is_some_and(|t| t > now));
        u.handle_interface(Interface::NoCarrier);
        assert_eq!(u.poll_timeout(), None, "no retry without carrier");
        u.handle_interface(Interface::Ready);
        assert_eq!(u.poll_action(now), Some(Action::Connect));
        u.handle_failed(now);
        u.set_held(true);
        u.set_held(false);
        assert_eq!(u.poll_action(now), Some(Action::Connect));
    }

    #[test]
    fn a_cap_beats_the_operator_who_beats_the_config() {
        assert!(is_backup(true, Some("lte"), "lte", false), "capped");
        assert!(!is_backup(false, Some("lte"), "lte", true), "preferred");
        assert!(
            is_backup(false, Some("wifi"), "lte", false),
            "another is preferred"
        );
        assert!(is_backup(false, None, "lte", true));
        assert!(!is_backup(false, None, "lte", false));
    }
}

//! One uplink slot of a bond: what the bond knows and decides about it — whether it may
//! carry anything (absent, disabled, held), its health, in-flight cap, rate and pacer,
//! the control frames waiting for it, when it reports what it received, what the peer
//! must hear of it, and the datagram size its connection carries as the tunnel's path MTU
//! counts it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::frame::Frame;
use crate::health::{HealthConfig, LinkHealth, LinkState};
use crate::inflight::{Inflight, RateView};
use crate::qos::{bit, ClassMask};
use crate::rate::{Pacer, RateConfig, RateControl};
use crate::scheduler::LinkView;
use crate::Class;

/// How often each end reports its received bytes on a busy connection.
pub const REPORT_EVERY: Duration = Duration::from_millis(10);
/// Received bytes that make a report worth sending at [`REPORT_EVERY`]: data, not just
/// the peer's probes and reports (which would otherwise answer each other forever).
pub const REPORT_MIN_BYTES: u64 = 1500;
/// A link carrying only control traffic reports this rarely.
pub const REPORT_IDLE: Duration = Duration::from_secs(30);
/// After its data stops, a link answers this many arrivals of control traffic (the
/// peer's probes, mostly) with a report each. The last report of a burst may be lost
/// (an outage began, or plain loss), and then the peer's sender would count what it
/// delivered as in flight until the next report: with its in-flight cap reached, it
/// sends no data, so without these nothing would report for [`REPORT_IDLE`].
pub const CLOSING_REPORTS: u8 = 3;
/// How long a datagram size must hold before it counts in the tunnel's path MTU: a new
/// connection's path-MTU discovery searches upward meanwhile (a handful of probes, one
/// RTT each), and a sudden smaller size may be quinn's black-hole detection misreading an
/// outage (it falls back to 1200 bytes when large packets vanish with the small). Neither
/// pulls the whole tunnel down, nor teaches the LAN a smaller MTU, until it holds.
pub const MTU_SETTLE: Duration = Duration::from_secs(2);

/// The datagram size of one connection as the bond counts it: what the transport says
/// now, and what counts in the tunnel's path MTU (a larger size at once, a smaller one
/// or a new connection's after [`MTU_SETTLE`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatagramSize {
    /// As the driver last said; 0 while unknown.
    now: usize,
    /// The size that counts; None while a new connection settles.
    counted: Option<usize>,
    /// When a pending change (a new connection, a smaller size) counts.
    confirm_at: Option<Instant>,
}

impl DatagramSize {
    /// A new connection: its size counts after [`MTU_SETTLE`].
    pub fn connected(now: Instant) -> Self {
        Self {
            now: 0,
            counted: None,
            confirm_at: Some(now + MTU_SETTLE),
        }
    }

    /// The transport's current size.
    pub fn observe(&mut self, size: usize, now: Instant) {
        self.now = size;
        match self.counted {
            Some(c) if size >= c => {
                self.counted = Some(size);
                self.confirm_at = None;
            }
            Some(_) => {
                self.confirm_at.get_or_insert(now + MTU_SETTLE);
            }
            None if self.confirm_at.is_none() && size > 0 => self.counted = Some(size),
            None => {}
        }
        self.handle_timeout(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.confirm_at.is_some_and(|t| now >= t) {
            self.confirm_at = None;
            if self.now > 0 {
                self.counted = Some(self.now);
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.confirm_at
    }

    /// What the transport says now (0: unknown).
    pub fn current(&self) -> usize {
        self.now
    }

    /// What counts in the tunnel's path MTU, if anything does yet.
    pub fn counted(&self) -> Option<usize> {
        self.counted
    }

    /// The current size counts: no change is pending.
    pub fn settled(&self) -> bool {
        self.counted.is_some_and(|c| c == self.now) && self.confirm_at.is_none()
    }
}

/// Control frames kept for a link that cannot send them (the newest are kept).
const CONTROL_MAX: usize = 16;

/// Why the reachability checks keep an uplink out of the bond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Held {
    /// Behind a login page.
    Captive,
    /// Its DNS answers are forged.
    Hijacked,
}

impl Held {
    pub fn name(self) -> &'static str {
        match self {
            Self::Captive => "captive",
            Self::Hijacked => "hijacked",
        }
    }
}

/// What the other end must know of an uplink to send on it the way this end does: whether
/// it is a backup now and the classes it may carry now (POS off while its HTTPS check
/// fails and a verified uplink carries the tunnel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    pub backup: bool,
    pub classes: ClassMask,
}

/// Totals the transport (QUIC) keeps for a connection, fed by the driver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    pub rtt: Duration,
    pub udp_tx_bytes: u64,
    pub udp_rx_bytes: u64,
    pub lost_bytes: u64,
    /// UDP datagrams sent, and the system calls that sent them (several per call with
    /// segmentation offload).
    pub udp_tx_datagrams: u64,
    pub udp_tx_ios: u64,
}

#[derive(Debug)]
pub(super) struct LinkSlot {
    pub name: String,
    pub health: LinkHealth,
    pub connected: bool,
    /// Probes, probe answers and reports waiting to go out (before data).
    pub control: VecDeque<Bytes>,
    pub inflight: Inflight,
    pub rate: RateControl,
    pub pacer: Pacer,
    /// The pacer held queued traffic back since the last rate sample.
    pub pacer_limited: bool,
    /// Classes this uplink may carry (its config, or what the peer said).
    pub classes: ClassMask,
    /// The transport's latest totals.
    pub stats: TransportStats,
    /// When a link the scheduler was told has no room gets room again without a report
    /// (set by [`Self::view`]): a timer.
    pub room_at: Option<Instant>,
    /// The largest datagram the connection carries (its path-MTU discovery's).
    pub datagram: DatagramSize,
    /// When we last reported our received byte count to the peer, and that count.
    pub reported: (Instant, u64),
    /// Datagram bytes received since that report (what makes the next one due).
    pub rx_since_report: u64,
    /// The highest Data sequence number received on this connection (reported to the
    /// peer, so its resends when this link fails start after it).
    pub rx_max_seq: Option<u64>,
    /// The peer's session version reads [`Self::rx_max_seq`] in reports (an older peer
    /// refuses the longer report).
    pub peer_reads_delivered: bool,
    /// The peer's reports on this connection name what it delivered: their silence
    /// then tells of a dead link (see [`LinkHealth::set_unreported`]).
    pub peer_reports_delivered: bool,
    /// The peer's received byte count in its latest report on this connection.
    pub peer_rx: u64,
    /// Reports still to send for mere control traffic since the last one for data (see
    /// [`CLOSING_REPORTS`]).
    pub closing: u8,
    pub backup: bool,
    pub absent: bool,
    /// Switched off by the operator (or its data cap): carries nothing.
    pub disabled: bool,
    /// Kept out by the reachability checks: like disabled.
    pub held: Option<Held>,
    /// Its HTTPS check has not (or no longer) succeeded: no POS while a verified uplink
    /// carries the tunnel (see [`crate::reach::pos_allowed`]).
    pub unverified: bool,
    /// Carries POS now (the outcome of the above across all uplinks).
    pub pos_ok: bool,
    /// What the peer was last told of this uplink.
    pub peer: PeerView,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

impl LinkSlot {
    pub fn new(
        name: &str,
        backup: bool,
        classes: ClassMask,
        health: HealthConfig,
        rate: RateConfig,
        now: Instant,
    ) -> Self {
        Self {
            name: name.to_string(),
            health: LinkHealth::new(health, now),
            connected: false,
            control: VecDeque::new(),
            inflight: Inflight::new(),
            rate: RateControl::new(rate),
            pacer: Pacer::new(),
            pacer_limited: false,
            classes,
            stats: TransportStats::default(),
            room_at: None,
            datagram: DatagramSize::default(),
            reported: (now, 0),
            rx_since_report: 0,
            rx_max_seq: None,
            peer_reads_delivered: false,
            peer_reports_delivered: false,
            peer_rx: 0,
            closing: 0,
            backup,
            absent: false,
            disabled: false,
            held: None,
            unverified: false,
            pos_ok: true,
            peer: PeerView { backup, classes },
            tx_packets: 0,
            tx_bytes: 0,
            rx_packets: 0,
            rx_bytes: 0,
        }
    }

    /// Kept out of the bond whatever its health: absent, disabled or held.
    pub fn out(&self) -> bool {
        self.absent || self.disabled || self.held.is_some()
    }

    /// Whether the link could carry POS were the HTTPS checks not considered.
    pub fn pos_capable(&self) -> bool {
        self.health.usable() && !self.out() && self.classes & bit(Class::Pos) != 0
    }

    /// The classes it may carry now.
    pub fn classes_now(&self) -> ClassMask {
        if self.pos_ok {
            self.classes
        } else {
            self.classes & !bit(Class::Pos)
        }
    }

    /// What the scheduler is to know of the link at `now`; when it has no room, also
    /// notes when room opens without a report ([`Self::room_at`]).
    pub fn view(&mut self, now: Instant) -> LinkView {
        let room = self.has_room(now);
        self.room_at = if room {
            None
        } else {
            self.inflight.on_full(now);
            // Only a time still to come: one that has passed without freeing room (a
            // rounding, a rate that changed) waits for the next report instead.
            self.inflight
                .room_at(self.rate_view(), now)
                .filter(|t| *t > now)
        };
        LinkView {
            state: self.health.state(),
            backup: self.backup,
            srtt: self.health.srtt(),
            min_rtt: self.health.min_rtt(),
            disabled: self.out(),
            room,
            verified_until: self.health.verified_until(),
            degraded: self.health.degraded(),
            classes: self.classes_now(),
        }
    }

    /// Whether the link may take more shared traffic: under its in-flight cap (see
    /// [`Inflight::cap`]).
    pub fn has_room(&self, now: Instant) -> bool {
        self.inflight.has_room(self.rate_view(), now)
    }

    /// What its rate control says, for the in-flight cap.
    fn rate_view(&self) -> RateView {
        RateView {
            steady: self.rate.phase() == crate::rate::Phase::Steady,
            rate: self.rate.rate(),
        }
    }

    /// Queues a control frame (bounded: a stuck link keeps the newest).
    pub fn push_control(&mut self, frame: Frame<'_>) {
        if self.control.len() >= CONTROL_MAX {
            self.control.pop_front();
        }
        self.control.push_back(Bytes::from(frame.to_vec()));
    }

    /// The transport's totals: RTT for health, sent and lost bytes for the in-flight cap.
    pub fn on_stats(&mut self, stats: TransportStats) {
        self.stats = stats;
        self.health.on_transport_rtt(stats.rtt);
        self.inflight
            .on_transport(stats.udp_tx_bytes, stats.lost_bytes, self.health.min_rtt());
    }

    /// The largest packet this link's datagrams carry now, if it is connected, usable
    /// and its datagram size is known.
    pub fn max_packet(&self) -> Option<usize> {
        let d = self.datagram.current();
        (self.connected && d > 0 && self.health.usable())
            .then(|| d.saturating_sub(crate::frame::DATA_OVERHEAD))
    }

    /// What this link counts for in the tunnel's path MTU, if it is connected, usable and
    /// its size has settled (see [`DatagramSize`]).
    pub fn counted_packet(&self) -> Option<usize> {
        let d = self.datagram.counted()?;
        (self.connected && self.health.usable())
            .then(|| d.saturating_sub(crate::frame::DATA_OVERHEAD))
    }

    /// When the next report of received bytes is due, if one is.
    pub fn report_due(&self) -> Option<Instant> {
        if !self.connected || self.rx_since_report == 0 {
            return None;
        }
        Some(
            if self.rx_since_report >= REPORT_MIN_BYTES || self.closing > 0 {
                self.reported.0 + REPORT_EVERY
            } else {
                self.reported.0 + REPORT_IDLE
            },
        )
    }

    /// Reports what the transport has received, if a report is due.
    pub fn maybe_report(&mut self, now: Instant, at_us: u64) {
        if self.report_due().is_some_and(|t| now >= t) {
            let rx = self.stats.udp_rx_bytes;
            self.reported = (now, rx);
            self.closing = if self.rx_since_report >= REPORT_MIN_BYTES {
                CLOSING_REPORTS
            } else {
                self.closing.saturating_sub(1)
            };
            self.rx_since_report = 0;
            let delivered = self.rx_max_seq.filter(|_| self.peer_reads_delivered);
            self.push_control(Frame::Report {
                rx_bytes: rx,
                at_us,
                delivered,
            });
        }
    }

    /// What the status calls the link's state.
    pub fn condition(&self) -> LinkCondition {
        if self.absent {
            LinkCondition::Absent
        } else if self.disabled {
            LinkCondition::Disabled
        } else if let Some(h) = self.held {
            match h {
                Held::Captive => LinkCondition::Captive,
                Held::Hijacked => LinkCondition::Hijacked,
            }
        } else {
            match self.health.state() {
                LinkState::Up => LinkCondition::Up,
                LinkState::Suspect => LinkCondition::Suspect,
                LinkState::Down => LinkCondition::Down,
                LinkState::Probing => LinkCondition::Probing,
            }
        }
    }
}

/// An uplink's state as the status shows it: its health, or why it is kept out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum LinkCondition {
    Up,
    Suspect,
    Down,
    Probing,
    /// The interface is missing.
    Absent,
    /// Switched off by the operator (or its data cap).
    Disabled,
    /// Behind a login page.
    Captive,
    /// Its DNS answers are forged.
    Hijacked,
}

impl LinkCondition {
    pub fn name(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Suspect => "suspect",
            Self::Down => "down",
            Self::Probing => "probing",
            Self::Absent => "absent",
            Self::Disabled => "disabled",
            Self::Captive => "captive",
            Self::Hijacked => "hijacked",
        }
    }
}

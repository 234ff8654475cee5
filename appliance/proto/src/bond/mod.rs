//! The bond of one side (edge or hub) as one sans-IO state machine: every decision about
//! what goes where, and when, for the uplinks between an edge and the hub.
//!
//! Contract (quinn-proto's): the driver feeds packets from the TUN
//! ([`BondState::handle_tun_packet`]), datagrams from each uplink's connection
//! ([`BondState::handle_datagram`]), uplink events ([`BondState::handle_link_event`]:
//! connected, disconnected, carrier, the transport's totals), the operator's and the
//! checks' verdicts (`set_*`) and the time ([`BondState::handle_timeout`]); it asks what
//! to send on each uplink ([`BondState::poll_transmit`]), what to write to the TUN
//! ([`BondState::poll_tun`]), what to do ([`BondState::poll_event`]: wake a sender, close
//! a connection, tell the peer) and when to call again ([`BondState::poll_timeout`]).
//! Nothing here does IO or reads the clock.
//!
//! Decided here: whether a link may carry anything, POS gating, that a paced link still
//! sends POS, that a backup probes sparsely, when reports go out, which classes the
//! receiver releases at once, the reorder hold from the RTT spread, the one-way-delay
//! sample, the anti-spoofing check and refusing POS when nothing reaches the peer.

pub mod arbitrary;
pub mod link;
pub mod status;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;

use crate::classify::{Classifier, Malformed, Verdict};
use crate::frame::{Frame, DATA_OVERHEAD};
use crate::health::{HealthConfig, LinkState};
use crate::packet;
use crate::qos::{bit, ClassMask, ALL_CLASSES};
use crate::rate::RateConfig;
use crate::reorder::{self, Reorder};
use crate::scheduler::{LinkId, Scheduler, SchedulerConfig, Wake};
use crate::Class;
use link::LinkSlot;
pub use link::{Held, LinkCondition, PeerView, TransportStats, REPORT_EVERY};
pub use status::{BondStatus, Counters, FlowStatus, LinkStatus};

const REORDER_MAX: usize = 2048;
/// Released packets waiting for the TUN writer.
const TUN_QUEUE: usize = 4096;
/// What QUIC adds around a datagram, for pacing.
pub const QUIC_OVERHEAD: usize = 40;
/// Packet bytes sent after what the peer last reported delivered that make it report
/// again (its datagrams carry more than the packets themselves).
const UNREPORTED_MIN: usize = link::REPORT_MIN_BYTES as usize;
/// Window over which the delivery rate is taken for rate control.
const DELIVERY_WINDOW: Duration = Duration::from_millis(200);
/// Flows listed in the status.
const TOP_FLOWS: usize = 10;
/// When a link with work could not send for no reason a timer knows, it looks again this
/// soon.
const RETRY: Duration = Duration::from_millis(1);
/// How often the classifier's flow table is swept of idle flows.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Which end of the bond this is: how packets are classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Classifies by the rules; learns host names from DNS answers coming down the tunnel.
    Edge,
    /// Mirrors the class the edge gave each flow; learns DNS answers it sends down.
    Hub,
}

/// What a bond is built from.
pub struct BondConfig {
    pub side: Side,
    pub sched: SchedulerConfig,
    pub classifier: Classifier,
    /// Sources accepted from the peer (the hub's anti-spoofing); `None` accepts any IP
    /// packet.
    pub accept_src: Option<Vec<IpNet>>,
    /// The TUN device's MTU: the largest packet handed in, and the tunnel's MTU while no
    /// uplink has said what it carries (see [`BondState::path_mtu`]).
    pub mtu: usize,
}

/// How a packet handed to [`BondState::handle_tun_packet`] fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued(Verdict),
    /// Not queued: nothing reaches the peer and the caller asked to be told (fail fast).
    Offline(Verdict),
    /// Not queued: larger than every usable uplink carries and not to be fragmented; the
    /// sender is told the size that fits (ICMP "too big" into the TUN).
    TooBig(Verdict),
}

/// Something that happened to an uplink's connection or interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// A connection is up; `peer_reads_delivered` when its session version (3 and up)
    /// reads the delivered sequence number in reports.
    Connected {
        peer_reads_delivered: bool,
    },
    Disconnected,
    /// Interface presence and carrier, from netlink.
    Carrier {
        present: bool,
        carrier: bool,
    },
    /// The transport's totals for the connection.
    Stats(TransportStats),
}

/// Why the bond wants an uplink's connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Removed,
    Disabled,
    Held(Held),
}

impl CloseReason {
    pub fn text(self) -> &'static str {
        match self {
            Self::Removed => "removed",
            Self::Disabled => "disabled by the operator",
            Self::Held(h) => h.name(),
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BondEvent {
    /// Uplink `0` may have something to send: ask [`BondState::poll_transmit`].
    Wake(LinkId),
    /// Close uplink `0`'s connection.
    Close(LinkId, CloseReason),
    /// What the peer must hear of uplink `0` changed.
    PeerView(LinkId, PeerView),
}

/// What an uplink should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// Send this datagram (it is counted as sent).
    Datagram(Bytes),
    /// Nothing to send now; ask again at `until` (pacer, class caps) or when woken.
    Idle { until: Option<Instant> },
}

pub struct BondState {
    side: Side,
    sched: Scheduler,
    classifier: Classifier,
    last_sweep: Instant,
    reorder: Reorder,
    links: Vec<Option<LinkSlot>>,
    peer_epoch: Option<u64>,
    accept_src: Option<Vec<IpNet>>,
    /// Source of ICMP "too big" answers written into the TUN.
    icmp_source: Option<IpAddr>,
    /// The origin of the microsecond clock carried in probes and reports.
    clock0: Instant,
    health_cfg: HealthConfig,
    rate_cfg: RateConfig,
    /// Released packets, in release order.
    to_tun: VecDeque<Bytes>,
    wake: Wake,
    events: VecDeque<BondEvent>,
    counters: Counters,
    /// Scratch for the reorder buffer's releases.
    out: Vec<Bytes>,
    /// Something happened that may have moved [`Self::poll_timeout`] (see
    /// [`Self::take_timers_moved`]).
    timers_moved: bool,
    /// Data moved (either way) until then; after it the bond is quiet and its links
    /// probe at the quiet rate.
    active_until: Instant,
    /// The links probe at the quiet rate.
    quiet: bool,
    /// Packets handed in from the TUN, ever.
    tun_packets: u64,
    /// See [`BondConfig::mtu`].
    mtu: usize,
}

/// How long after the last data packet (either way) the bond turns quiet.
pub const QUIET_AFTER: Duration = Duration::from_secs(3);

impl BondState {
    pub fn new(cfg: BondConfig, now: Instant) -> Self {
        Self {
            side: cfg.side,
            sched: Scheduler::new(cfg.sched),
            classifier: cfg.classifier,
            last_sweep: now,
            active_until: now + QUIET_AFTER,
            quiet: false,
            tun_packets: 0,
            reorder: Reorder::new(REORDER_MAX, Duration::from_millis(40)),
            links: Vec::new(),
            peer_epoch: None,
            accept_src: cfg.accept_src,
            icmp_source: None,
            clock0: now,
            health_cfg: match cfg.side {
                Side::Edge => HealthConfig::default(),
                Side::Hub => HealthConfig::hub(),
            },
            rate_cfg: RateConfig::default(),
            to_tun: VecDeque::new(),
            wake: Wake::default(),
            events: VecDeque::new(),
            counters: Counters::default(),
            out: Vec::new(),
            timers_moved: true,
            mtu: cfg.mtu,
        }
    }

    /// The tunnel's MTU now: the largest IP packet that every usable, connected uplink's
    /// QUIC datagrams carry (each connection's path-MTU discovery sets its datagram size),
    /// at most the TUN device's MTU. While no uplink is usable it is the TUN device's
    /// MTU: a link that is down tells nothing of what the next one carries.
    ///
    /// Larger packets are cut (IPv4 without "don't fragment") or answered with ICMP
    /// "too big" before they queue, and the drivers clamp TCP's MSS to it, so a flow's
    /// segments fit whichever uplink carries them.
    ///
    /// A link's size counts once it has held for [`link::MTU_SETTLE`] (see
    /// [`link::DatagramSize`]): a new connection still searching upward counts only while
    /// no settled link is usable, and a sudden smaller size (a real change, or quinn
    /// misreading an outage as an MTU black hole) counts only once it lasts. Meanwhile a
    /// packet too large for that link goes to an uplink that carries it (see
    /// [`Self::poll_transmit`]).
    pub fn path_mtu(&self) -> usize {
        let links = || self.links.iter().flatten();
        links()
            .filter_map(LinkSlot::counted_packet)
            .min()
            .or_else(|| links().filter_map(LinkSlot::max_packet).min())
            .map_or(self.mtu, |m| m.min(self.mtu))
    }

    /// The usable uplink other than `from` whose datagrams carry the most, if they carry
    /// `len` bytes of packet.
    fn roomiest(&self, from: LinkId, len: usize) -> Option<LinkId> {
        self.links
            .iter()
            .enumerate()
            .filter(|(id, _)| *id != from)
            .filter_map(|(id, l)| Some((id, l.as_ref()?.max_packet()?)))
            .filter(|(_, m)| *m >= len)
            .max_by_key(|(_, m)| *m)
            .map(|(id, _)| id)
    }

    fn link(&self, id: LinkId) -> Option<&LinkSlot> {
        self.links.get(id).and_then(Option::as_ref)
    }

    fn link_mut(&mut self, id: LinkId) -> Option<&mut LinkSlot> {
        self.links.get_mut(id).and_then(Option::as_mut)
    }

    fn micros(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.clock0).as_micros()).unwrap_or(u64::MAX)
    }

    pub fn set_icmp_source(&mut self, addr: IpAddr) {
        self.icmp_source = Some(addr);
    }

    /// Adds an uplink slot that may carry `classes`, with bounds for its rate control; it
    /// carries nothing until [`LinkEvent::Connected`].
    pub fn add_link(
        &mut self,
        name: &str,
        backup: bool,
        classes: ClassMask,
        rate: Option<RateConfig>,
        now: Instant,
    ) -> LinkId {
        self.timers_moved = true;
        let id = self.sched.add_link();
        let slot = LinkSlot::new(
            name,
            backup,
            classes,
            self.health_cfg.clone(),
            rate.unwrap_or_else(|| self.rate_cfg.clone()),
            now,
        );
        if self.links.len() <= id {
            self.links.resize_with(id + 1, || None);
        }
        self.links[id] = Some(slot);
        id
    }

    /// Removes an uplink slot (its connection is to be closed).
    pub fn remove_link(&mut self, id: LinkId, now: Instant) {
        self.timers_moved = true;
        if self.links.get_mut(id).and_then(Option::take).is_some() {
            self.events
                .push_back(BondEvent::Close(id, CloseReason::Removed));
        }
        self.sched.remove_link(id);
        self.refresh(now);
    }

    /// The peer's sequence space starts anew when its epoch changes. True when it did
    /// (a restarted peer).
    pub fn peer_epoch(&mut self, epoch: u64) -> bool {
        self.timers_moved = true;
        if self.peer_epoch == Some(epoch) {
            return false;
        }
        let restarted = self.peer_epoch.is_some();
        self.peer_epoch = Some(epoch);
        self.reorder.reset();
        restarted
    }

    pub fn handle_link_event(&mut self, now: Instant, id: LinkId, ev: LinkEvent) {
        self.timers_moved = true;
        let Some(l) = self.link_mut(id) else {
            return;
        };
        match ev {
            LinkEvent::Connected {
                peer_reads_delivered,
            } => {
                l.connected = true;
                l.rx_max_seq = None;
                l.peer_reads_delivered = peer_reads_delivered;
                l.peer_reports_delivered = false;
                l.peer_rx = 0;
                l.datagram = link::DatagramSize::connected(now);
                l.health.on_connected(true, now);
                self.wake.0 |= Wake::of(id).0;
            }
            LinkEvent::Disconnected => {
                l.connected = false;
                l.datagram = link::DatagramSize::default();
                l.health.on_connected(false, now);
            }
            LinkEvent::Carrier { present, carrier } => {
                l.absent = !present;
                let up = present && carrier && !l.disabled && l.held.is_none();
                l.health.on_carrier(up, now);
            }
            LinkEvent::Stats(s) => {
                l.on_stats(s);
                return;
            }
        }
        self.refresh(now);
    }

    /// Switches uplink `id` off (it carries nothing and its connection is closed) or on.
    pub fn set_disabled(&mut self, id: LinkId, disabled: bool, now: Instant) {
        let Some(l) = self.link_mut(id) else {
            return;
        };
        l.disabled = disabled;
        if disabled {
            l.health.on_carrier(false, now);
            self.events
                .push_back(BondEvent::Close(id, CloseReason::Disabled));
        }
        self.refresh(now);
    }

    /// Keeps uplink `id` out of the bond for `reason` (its connection is closed, as for
    /// [`Self::set_disabled`]), or lets it back (`None`).
    pub fn set_held(&mut self, id: LinkId, reason: Option<Held>, now: Instant) {
        let Some(l) = self.link_mut(id) else {
            return;
        };
        l.held = reason;
        if let Some(r) = reason {
            l.health.on_carrier(false, now);
            self.events
                .push_back(BondEvent::Close(id, CloseReason::Held(r)));
        }
        self.refresh(now);
    }

    /// Why uplink `id` is kept out of the bond, if it is.
    pub fn held(&self, id: LinkId) -> Option<Held> {
        self.link(id)?.held
    }

    /// Whether uplink `id` is a backup (configured or imposed) idling while a primary
    /// carries the tunnel (the state its probes already follow).
    pub fn idle_backup(&self, id: LinkId) -> bool {
        self.link(id).is_some_and(|l| l.health.sparse())
    }

    /// Whether uplink `id`'s HTTPS check currently succeeds.
    pub fn set_verified(&mut self, id: LinkId, verified: bool, now: Instant) {
        if let Some(l) = self.link_mut(id) {
            l.unverified = !verified;
        }
        self.refresh(now);
    }

    /// Whether uplink `id` only carries traffic when no other uplink can.
    pub fn set_backup(&mut self, id: LinkId, backup: bool, now: Instant) {
        if let Some(l) = self.link_mut(id) {
            l.backup = backup;
        }
        self.refresh(now);
    }

    /// New classes for uplink `id`, and new rate bounds when `rate` is given (its settings
    /// changed by a reload, or the peer says so).
    pub fn set_link_config(
        &mut self,
        id: LinkId,
        classes: ClassMask,
        rate: Option<RateConfig>,
        now: Instant,
    ) {
        if let Some(l) = self.link_mut(id) {
            l.classes = classes;
            if let Some(rate) = rate {
                l.rate.set_config(rate);
            }
            self.wake.0 |= Wake::of(id).0;
        }
        self.refresh(now);
    }

    /// What the peer should hear of uplink `id` now.
    pub fn peer_view(&self, id: LinkId) -> Option<PeerView> {
        self.link(id).map(|l| l.peer)
    }

    pub fn online(&self) -> bool {
        self.sched.online()
    }

    /// What the uplinks together have delivered at most lately, bytes per second (0 when
    /// nothing was measured).
    /// Packets handed in from the TUN so far (any class, carried or not).
    pub fn tun_packets(&self) -> u64 {
        self.tun_packets
    }

    pub fn capacity(&self) -> f64 {
        self.links
            .iter()
            .flatten()
            .map(|l| l.inflight.capacity())
            .sum()
    }

    /// New class settings (the edge's, on the hub); queued packets are kept when only
    /// modes change.
    pub fn configure(&mut self, sched: SchedulerConfig) {
        self.sched.reconfigure(sched);
    }

    /// New classification rules (see [`Classifier::set_rules`]).
    pub fn set_rules(&mut self, rules: &[crate::classify::Rule]) {
        self.classifier.set_rules(rules);
    }

    /// The driver's current addresses for the devices classification rule `index` names.
    pub fn set_resolved(
        &mut self,
        index: usize,
        devices: &crate::classify::DeviceRef,
        prefixes: Vec<IpNet>,
    ) {
        self.classifier.set_resolved(index, devices, prefixes);
    }

    /// Classifies an IP packet read from the TUN device and queues it for the peer. With
    /// `fail_fast`, a POS packet is not queued when no uplink reaches the peer at all, so
    /// the caller can answer it at once.
    pub fn handle_tun_packet(
        &mut self,
        now: Instant,
        packet: Bytes,
        fail_fast: bool,
    ) -> Result<Sent, Malformed> {
        self.tun_packets = self.tun_packets.wrapping_add(1);
        let v = match self.side {
            Side::Hub => self.classifier.classify_and_learn(&packet, now),
            Side::Edge => self.classifier.classify(&packet, now),
        };
        let v = match v {
            Ok(v) => v,
            Err(e) => {
                self.counters.malformed += 1;
                return Err(e);
            }
        };
        if fail_fast && v.flow_class == Class::Pos && self.sched.hopeless() {
            self.counters.refused_offline += 1;
            return Ok(Sent::Offline(v));
        }
        let mtu = self.path_mtu();
        if packet.len() > mtu {
            match packet::fragment_v4(&packet, mtu) {
                Ok(frags) => {
                    self.counters.fragmented += 1;
                    for f in frags {
                        let wake = self.sched.enqueue(v.class, v.flow, Bytes::from(f), now);
                        self.wake.0 |= wake.0;
                    }
                }
                Err(packet::Unfragmentable::DontFragment) => {
                    self.too_big(&packet, mtu);
                    return Ok(Sent::TooBig(v));
                }
                Err(packet::Unfragmentable::Malformed) => {
                    self.counters.malformed += 1;
                    return Err(Malformed::new("an IPv4 header that cannot be fragmented"));
                }
            }
        } else {
            let wake = self.sched.enqueue(v.class, v.flow, packet, now);
            self.wake.0 |= wake.0;
        }
        self.data_moved(now);
        Ok(Sent::Queued(v))
    }

    /// A datagram from the peer on uplink `id`.
    pub fn handle_datagram(&mut self, now: Instant, id: LinkId, d: Bytes) {
        self.timers_moved = true;
        let rx_us = self.micros(now);
        let frame = match Frame::decode(&d) {
            Ok(f) => f,
            Err(_) => {
                self.counters.bad_frames += 1;
                return;
            }
        };
        if let Some(l) = self.link_mut(id) {
            l.rx_since_report = l.rx_since_report.saturating_add(d.len() as u64);
        }
        match frame {
            Frame::Probe { id: pid, echo } => {
                if let Some(l) = self.link_mut(id) {
                    l.push_control(Frame::ProbeAck {
                        id: pid,
                        echo,
                        rx_us,
                    });
                    self.wake.0 |= Wake::of(id).0;
                }
            }
            Frame::ProbeAck {
                id: pid,
                echo,
                rx_us,
            } => {
                if let Some(l) = self.link_mut(id) {
                    if l.health.on_probe_ack(pid, now).is_some() {
                        // One-way delay towards the peer, up to the clocks' offset.
                        let owd = i64::try_from(rx_us)
                            .unwrap_or(i64::MAX)
                            .saturating_sub(i64::try_from(echo).unwrap_or(i64::MAX));
                        let delivered = l.inflight.delivery_rate(now, DELIVERY_WINDOW);
                        let limited = std::mem::take(&mut l.pacer_limited);
                        l.rate.on_sample(now, owd, delivered, limited);
                    }
                }
                self.refresh(now);
            }
            Frame::Report {
                rx_bytes,
                at_us,
                delivered,
            } => {
                if let Some(seq) = delivered {
                    self.sched.on_delivered(id, seq);
                }
                let mut revived = false;
                if let Some(l) = self.links.get_mut(id).and_then(Option::as_mut) {
                    // A report of more received is a sign of life both ways: a Suspect
                    // link is Up again.
                    if rx_bytes > l.peer_rx {
                        let was = l.health.state();
                        l.health.on_delivery_report(now);
                        revived = l.health.state() != was;
                    }
                    l.peer_rx = rx_bytes;
                    if delivered.is_some() {
                        l.peer_reports_delivered = true;
                        if l.health.usable() {
                            l.health
                                .set_unreported(self.sched.unreported_since(id, UNREPORTED_MIN));
                        }
                    }
                    l.inflight.on_report(rx_bytes, at_us, now);
                    // Deliveries free room under the in-flight cap: the scheduler hears
                    // of it now, not at the next timer. Only this link can send more
                    // because of it, so only it is woken.
                    if !self.sched.room(id) {
                        let view = l.view(now);
                        if view.room {
                            let _all = self.sched.update_link(id, view);
                            if self.sched.has_work(id) {
                                self.wake.0 |= Wake::of(id).0;
                            }
                        }
                    }
                }
                if revived {
                    self.refresh(now);
                }
            }
            Frame::Data { seq, packet, class } => {
                if !self.source_ok(packet) {
                    self.counters.spoofed += 1;
                    return;
                }
                match self.side {
                    Side::Hub => self.classifier.mirror(packet, class, now),
                    Side::Edge => self.classifier.observe_download(packet, now),
                }
                if let Some(l) = self.link_mut(id) {
                    l.rx_packets += 1;
                    l.rx_bytes += d.len() as u64;
                    l.rx_max_seq = Some(l.rx_max_seq.map_or(seq, |m| m.max(seq)));
                }
                self.data_moved(now);
                let payload = d.slice(DATA_OVERHEAD..);
                let mut out = std::mem::take(&mut self.out);
                // Bulk and guest wait for their order; the urgent classes go at once.
                if matches!(class, Class::Bulk | Class::Guest) {
                    self.reorder.push(seq, id, payload, now, &mut out);
                } else {
                    self.reorder.push_urgent(seq, id, payload, now, &mut out);
                }
                self.release(&mut out);
                self.out = out;
            }
        }
    }

    /// A data packet was queued or received: the bond is active for [`QUIET_AFTER`]; a
    /// quiet bond's links probe at the regular rate again at once.
    fn data_moved(&mut self, now: Instant) {
        self.active_until = now + QUIET_AFTER;
        if self.quiet {
            self.quiet = false;
            self.timers_moved = true;
            for l in self.links.iter_mut().flatten() {
                l.health.set_quiet(false, now);
            }
        }
    }

    fn source_ok(&self, packet: &[u8]) -> bool {
        let Some(allowed) = &self.accept_src else {
            return packet::addrs(packet).is_some();
        };
        packet::addrs(packet).is_some_and(|(src, _)| allowed.iter().any(|n| n.contains(&src)))
    }

    fn release(&mut self, out: &mut Vec<Bytes>) {
        for p in out.drain(..) {
            if self.to_tun.len() >= TUN_QUEUE {
                self.counters.tun_overflow += 1;
            } else {
                self.to_tun.push_back(p);
            }
        }
    }

    /// The timers: health transitions and probes, reports, reorder holds, the flow sweep.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.timers_moved = true;
        let at_us = self.micros(now);
        self.quiet = now >= self.active_until;
        for (id, l) in self.links.iter_mut().enumerate() {
            let Some(l) = l else { continue };
            l.health.set_quiet(self.quiet, now);
            l.health.handle_timeout(now);
            l.datagram.handle_timeout(now);
            if !l.connected {
                continue;
            }
            let queued = l.control.len();
            l.maybe_report(now, at_us);
            if let Some(pid) = l.health.poll_probe(now) {
                l.push_control(Frame::Probe {
                    id: pid,
                    echo: at_us,
                });
            }
            if l.control.len() != queued {
                self.wake.0 |= Wake::of(id).0;
            }
        }
        self.refresh(now);
        let mut out = std::mem::take(&mut self.out);
        self.reorder.handle_timeout(now, &mut out);
        self.release(&mut out);
        self.out = out;
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_EVERY {
            self.last_sweep = now;
            self.classifier.sweep(now);
        }
    }

    /// Whether [`Self::poll_timeout`] may have changed since this was last asked: a TUN
    /// packet queued or a datagram polled never moves a timer, so the driver's hot path
    /// skips recomputing it.
    pub fn take_timers_moved(&mut self) -> bool {
        std::mem::take(&mut self.timers_moved)
    }

    /// When [`Self::handle_timeout`] next has work (before it, the driver feeds each
    /// connected uplink's [`LinkEvent::Stats`]).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for l in self.links.iter().flatten() {
            at(l.health.poll_timeout());
            at(l.report_due());
            at(l.datagram.poll_timeout());
            at(l.room_at);
        }
        at(self.reorder.poll_timeout());
        at(Some(self.last_sweep + SWEEP_EVERY));
        t
    }

    /// The next datagram for uplink `id` (whose datagrams hold up to `max_datagram`
    /// bytes), or when to ask again.
    pub fn poll_transmit(&mut self, now: Instant, id: LinkId, max_datagram: usize) -> Transmit {
        loop {
            let Some(l) = self.links.get_mut(id).and_then(Option::as_mut) else {
                return Transmit::Idle { until: None };
            };
            if !l.connected {
                return Transmit::Idle { until: None };
            }
            l.datagram.observe(max_datagram, now);
            if let Some(c) = l.control.pop_front() {
                return Transmit::Datagram(c);
            }
            let paced = l.pacer.wait(now, l.rate.rate());
            // Held back by the pacer, a link still sends POS at once.
            let allowed = if paced.is_some() {
                if self.sched.has_work(id) {
                    l.pacer_limited = true;
                }
                bit(Class::Pos)
            } else {
                ALL_CLASSES
            };
            let Some(q) = self.sched.poll(id, allowed, now) else {
                let until = match paced {
                    Some(d) => Some(now + d),
                    // Work held back by a class's maximum rate (or dropped by CoDel on
                    // the way out): look again when the class has tokens.
                    None if self.sched.has_work(id) => Some(
                        self.sched
                            .next_ready()
                            .map_or(now + RETRY, |t| t.max(now + Duration::from_micros(100))),
                    ),
                    None => None,
                };
                return Transmit::Idle { until };
            };
            let mut buf = Vec::with_capacity(q.packet.len() + DATA_OVERHEAD);
            Frame::Data {
                class: q.class,
                seq: q.seq,
                packet: &q.packet,
            }
            .encode(&mut buf);
            if buf.len() > max_datagram {
                // Queued for a tunnel that carries it, too large for this link alone (a
                // new connection still searching upward, or a smaller size not yet
                // settled): another uplink takes it. Otherwise its sender hears what
                // fits, if that size has settled on a usable link; an unsettled one may be
                // an outage misread, and is not taught to the LAN (the packet is dropped).
                match self.roomiest(id, q.packet.len()) {
                    Some(to) => {
                        self.counters.handed_over += 1;
                        let wake = self.sched.hand_over(q, id, to);
                        self.wake.0 |= wake.0;
                    }
                    None => {
                        let settled = self
                            .link(id)
                            .is_some_and(|l| l.datagram.settled() && l.health.usable());
                        if settled {
                            self.too_big(&q.packet, max_datagram.saturating_sub(DATA_OVERHEAD));
                        } else {
                            self.counters.too_big += 1;
                        }
                    }
                }
                continue;
            }
            let Some(l) = self.links.get_mut(id).and_then(Option::as_mut) else {
                return Transmit::Idle { until: None };
            };
            l.tx_packets += 1;
            l.tx_bytes += buf.len() as u64;
            if l.peer_reports_delivered && l.health.usable() && l.health.unreported().is_none() {
                // Enough sent since the last report that the peer must report it: its
                // silence is watched from now on (a timer moved).
                let since = self.sched.unreported_since(id, UNREPORTED_MIN);
                if since.is_some() {
                    l.health.set_unreported(since);
                    self.timers_moved = true;
                }
            }
            l.pacer.spend(buf.len() + QUIC_OVERHEAD);
            l.inflight.on_handed(buf.len() + QUIC_OVERHEAD);
            if self.sched.room(id) && !l.has_room(now) {
                // At its cap: the scheduler hears of it now, so the link stops pulling
                // shared traffic with this datagram, not at the next timer, and the
                // timer learns when room opens again.
                let view = l.view(now);
                self.timers_moved = true;
                let _none = self.sched.update_link(id, view);
            }
            return Transmit::Datagram(Bytes::from(buf));
        }
    }

    /// Answers a packet too large for the uplink with ICMP "too big" into the TUN.
    fn too_big(&mut self, packet: &[u8], mtu: usize) {
        self.counters.too_big += 1;
        let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
        if let Some(reply) = self
            .icmp_source
            .and_then(|s| packet::too_big_reply(packet, mtu, s))
        {
            let mut out = vec![Bytes::from(reply)];
            self.release(&mut out);
        }
    }

    /// The next packet for the TUN device, in release order.
    pub fn poll_tun(&mut self) -> Option<Bytes> {
        self.to_tun.pop_front()
    }

    /// The TUN writer had no room for a packet [`Self::poll_tun`] gave.
    pub fn tun_overflowed(&mut self) {
        self.counters.tun_overflow += 1;
    }

    /// The next thing the driver must do.
    pub fn poll_event(&mut self) -> Option<BondEvent> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        if self.wake.0 != 0 {
            let id = self.wake.0.trailing_zeros() as usize;
            self.wake.0 &= !(1u64 << id);
            return Some(BondEvent::Wake(id));
        }
        None
    }

    /// Pushes each link's health into the scheduler and decides which links carry POS
    /// and what the peer hears; wakes links that may now pull; sets the reorder hold.
    fn refresh(&mut self, now: Instant) {
        self.timers_moved = true;
        let primary_up = self
            .links
            .iter()
            .flatten()
            .any(|l| !l.backup && l.health.usable());
        let gate: Vec<(bool, bool)> = self
            .links
            .iter()
            .map(|l| match l {
                Some(l) => (l.pos_capable(), !l.unverified),
                None => (false, false),
            })
            .collect();
        let pos_ok = crate::reach::pos_allowed(&gate);
        for id in 0..self.links.len() {
            let Some(l) = self.links[id].as_mut() else {
                continue;
            };
            l.pos_ok = pos_ok.get(id).copied().unwrap_or(true);
            l.health.set_sparse(l.backup && primary_up, now);
            if l.health.state() == LinkState::Down {
                l.inflight.forget_in_flight();
            }
            let peer = PeerView {
                backup: l.backup,
                classes: l.classes_now(),
            };
            if peer != l.peer {
                l.peer = peer;
                self.events.push_back(BondEvent::PeerView(id, peer));
            }
            let view = l.view(now);
            let wake = self.sched.update_link(id, view);
            self.wake.0 |= wake.0;
        }
        let paths = self
            .links
            .iter()
            .flatten()
            .filter(|l| l.health.usable())
            .filter_map(|l| l.health.current_rtt().map(|r| (r, l.health.jitter())));
        if let Some(hold) = reorder::hold_for(paths) {
            self.reorder.set_hold(hold);
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn status(&self, now: Instant) -> BondStatus {
        let links = self
            .links
            .iter()
            .flatten()
            .map(|l| {
                let (probes_sent, probes_lost) = l.health.probes();
                let (suspects, silences) = l.health.suspects();
                LinkStatus {
                    name: l.name.clone(),
                    state: l.condition(),
                    connected: l.connected,
                    backup: l.backup,
                    rtt_ms: l.health.srtt().map(|d| d.as_secs_f64() * 1e3),
                    jitter_ms: l.health.jitter().as_secs_f64() * 1e3,
                    loss: l.health.loss(),
                    capacity_mbps: l.inflight.capacity() * 8.0 / 1e6,
                    in_flight_bytes: l.inflight.in_flight(now),
                    tx_packets: l.tx_packets,
                    tx_bytes: l.tx_bytes,
                    rx_packets: l.rx_packets,
                    rx_bytes: l.rx_bytes,
                    probes_sent,
                    probes_lost,
                    flaps: l.health.flaps(),
                    suspects,
                    silences,
                    degraded: l.health.degraded(),
                    carries_pos: l.pos_ok && l.classes & bit(Class::Pos) != 0,
                    rate_mbps: l.rate.rate() * 8.0 / 1e6,
                    queue_delay_ms: l.rate.queue_delay().as_secs_f64() * 1e3,
                    rate_decreases: l.rate.decreases(),
                    max_packet: (l.connected && l.datagram.current() > 0)
                        .then(|| l.datagram.current().saturating_sub(DATA_OVERHEAD)),
                    mtu_settled: l.connected && l.datagram.settled(),
                    tx_datagrams_per_send: if l.stats.udp_tx_ios == 0 {
                        0.0
                    } else {
                        l.stats.udp_tx_datagrams as f64 / l.stats.udp_tx_ios as f64
                    },
                }
            })
            .collect();
        let top_flows = self
            .classifier
            .top_flows(TOP_FLOWS)
            .into_iter()
            .map(|(k, e)| FlowStatus {
                flow: k.to_string(),
                class: e.class.name(),
                bytes: e.bytes,
                packets: e.packets,
                age_s: now.saturating_duration_since(e.first).as_secs_f64(),
                uplink: self
                    .sched
                    .flow_link(e.id)
                    .and_then(|i| self.link(i))
                    .map(|l| l.name.clone()),
            })
            .collect();
        let c = self.counters;
        BondStatus {
            online: self.sched.online(),
            links,
            scheduler: self.sched.stats(),
            classes: self.sched.class_stats(now),
            classify: self.classifier.stats(),
            top_flows,
            malformed: c.malformed,
            refused_offline: c.refused_offline,
            reorder: self.reorder.stats(),
            reorder_hold_ms: self.reorder.hold().as_secs_f64() * 1e3,
            bad_frames: c.bad_frames,
            too_big: c.too_big,
            fragmented: c.fragmented,
            handed_over: c.handed_over,
            path_mtu: self.path_mtu(),
            spoofed: c.spoofed,
            tun_overflow: c.tun_overflow,
        }
    }
}

#[cfg(test)]
mod tests;

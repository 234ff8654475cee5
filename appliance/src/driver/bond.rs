//! One bond: the set of QUIC connections (one per uplink) between an edge and the hub,
//! with the cores that drive them. Used by both roles, for both directions.
//!
//! Tasks per connection: a sender that pulls packets from the scheduler while quinn has
//! room and the uplink's pacer allows, and a receiver that decodes frames, answers probes
//! and feeds the reorder buffer. One ticker per bond pumps the cores' timers (probes,
//! health transitions, reorder holds, capped classes, flow expiry).
//!
//! Packets are classified here, under the same lock as the scheduler: the edge by its
//! rules (learning host names from the DNS answers that come down the tunnel), the hub by
//! mirroring the class the edge gave each flow.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::core::classify::{Classifier, ClassifyStats, Malformed, Verdict};
use crate::core::frame::{Frame, DATA_OVERHEAD};
use crate::core::health::{HealthConfig, LinkHealth, LinkState};
use crate::core::inflight::Inflight;
use crate::core::packet;
use crate::core::qos::{bit, ClassMask, ClassStats, ALL_CLASSES};
use crate::core::rate::{Pacer, RateConfig, RateControl};
use crate::core::reorder::{self, Reorder, ReorderStats};
use crate::core::scheduler::{LinkId, LinkView, SchedStats, Scheduler, SchedulerConfig};
use crate::core::Class;

/// Where released packets go (the TUN device).
pub type Tun = Arc<tun::AsyncDevice>;

const TICK: Duration = Duration::from_millis(5);
const REORDER_MAX: usize = 2048;
const TUN_QUEUE: usize = 4096;
/// How often each end reports its received bytes on a busy connection.
const REPORT_EVERY: Duration = Duration::from_millis(10);
/// Received bytes that make a report worth sending at [`REPORT_EVERY`]: data, not just
/// the peer's probes and reports (which would otherwise answer each other forever).
const REPORT_MIN_BYTES: u64 = 1500;
/// A link carrying only control traffic reports this rarely.
const REPORT_IDLE: Duration = Duration::from_secs(30);
/// What QUIC adds around a datagram, for pacing.
const QUIC_OVERHEAD: usize = 40;
/// Window over which the delivery rate is taken for rate control.
const DELIVERY_WINDOW: Duration = Duration::from_millis(200);
/// Flows listed in the status.
const TOP_FLOWS: usize = 10;

/// Which end of the bond this is: how packets are classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Classifies by the rules; learns host names from DNS answers coming down the tunnel.
    Edge,
    /// Mirrors the class the edge gave each flow; learns DNS answers it sends down.
    Hub,
}

/// What the other end must know of an uplink to send on it the way this end does: whether
/// it is a backup now and the classes it may carry now (POS off while its HTTPS check
/// fails and a verified uplink carries the tunnel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    pub backup: bool,
    pub classes: ClassMask,
}

/// How a packet handed to [`Bond::send`] fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued(Verdict),
    /// Not queued: nothing reaches the peer and the caller asked to be told (fail fast).
    Offline(Verdict),
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub name: String,
    /// `up`, `suspect`, `down`, `probing`, `absent` when the interface is missing,
    /// `disabled` by the operator (or its data cap), `captive` behind a login page or
    /// `dns-hijacked` (kept out by the reachability checks).
    pub state: String,
    pub connected: bool,
    pub backup: bool,
    pub rtt_ms: Option<f64>,
    pub jitter_ms: f64,
    pub loss: f64,
    pub capacity_mbps: f64,
    pub in_flight_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub probes_sent: u64,
    pub probes_lost: u64,
    pub flaps: u32,
    pub degraded: bool,
    /// Whether point-of-sale traffic may use the uplink now (its classes, and the HTTPS
    /// reachability check).
    pub carries_pos: bool,
    /// What rate control lets this end send on the uplink.
    pub rate_mbps: f64,
    pub queue_delay_ms: f64,
    pub rate_decreases: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowStatus {
    pub flow: String,
    pub class: &'static str,
    pub bytes: u64,
    pub packets: u64,
    pub age_s: f64,
    /// The uplink a lowest-latency flow is pinned to; absent for spread or duplicated ones.
    pub uplink: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BondStatus {
    pub online: bool,
    pub links: Vec<LinkStatus>,
    pub scheduler: SchedStats,
    pub classes: Vec<ClassStats>,
    pub classify: ClassifyStats,
    pub top_flows: Vec<FlowStatus>,
    /// Packets that could not be classified (not IP, truncated): dropped.
    pub malformed: u64,
    /// POS packets answered at once (RST / unreachable) because nothing reached the peer.
    pub refused_offline: u64,
    pub reorder: ReorderStats,
    pub reorder_hold_ms: f64,
    pub bad_frames: u64,
    pub too_big: u64,
    pub spoofed: u64,
    pub tun_overflow: u64,
}

struct Link {
    name: String,
    health: LinkHealth,
    conn: Option<quinn::Connection>,
    generation: u64,
    wake: Arc<Notify>,
    /// Probes and probe answers waiting for the sender (sent before data; never through
    /// `send_datagram`, which would evict queued data when quinn's buffer is full).
    control: std::collections::VecDeque<Bytes>,
    inflight: Inflight,
    rate: RateControl,
    pacer: Pacer,
    /// The pacer held queued traffic back since the last rate sample.
    pacer_limited: bool,
    /// Classes this uplink may carry.
    classes: ClassMask,
    /// When we last reported our received byte count to the peer, and that count.
    reported: (Instant, u64),
    backup: bool,
    absent: bool,
    /// Switched off by the operator: carries nothing, its connection closed.
    disabled: bool,
    /// Kept out by the reachability checks (`captive`, `dns-hijacked`): like disabled.
    held: Option<&'static str>,
    /// Its HTTPS check has not (or no longer) succeeded: no POS while a verified uplink
    /// carries the tunnel (see [`crate::core::reach::pos_allowed`]).
    unverified: bool,
    /// Carries POS now (the outcome of the above across all uplinks).
    pos_ok: bool,
    /// What the peer should hear of this uplink (see [`Bond::peer_view`]).
    peer: tokio::sync::watch::Sender<PeerView>,
    tx_packets: u64,
    tx_bytes: u64,
    rx_packets: u64,
    rx_bytes: u64,
}

impl Link {
    /// Queues a control frame for the sender (bounded: a stuck link keeps the newest).
    fn push_control(&mut self, frame: Vec<u8>) {
        if self.control.len() >= 16 {
            self.control.pop_front();
        }
        self.control.push_back(Bytes::from(frame));
        self.wake.notify_one();
    }
}

struct State {
    sched: Scheduler,
    classifier: Classifier,
    last_sweep: Instant,
    reorder: Reorder,
    links: Vec<Option<Link>>,
    peer_epoch: Option<u64>,
    next_generation: u64,
}

pub struct Bond {
    state: Mutex<State>,
    tun: Tun,
    /// Sources accepted from the peer (hub side anti-spoofing); None accepts all.
    accept_src: Option<Vec<IpNet>>,
    /// Source of ICMP "too big" answers written into the TUN.
    icmp_source: Mutex<Option<IpAddr>>,
    clock0: Instant,
    health_cfg: HealthConfig,
    side: Side,
    rate_cfg: RateConfig,
    malformed: AtomicU64,
    refused_offline: AtomicU64,
    /// Released packets in release order; one writer task empties it into the TUN device.
    /// Filled only under the state lock, so no two tasks can reorder what the reorder
    /// buffer put in order.
    to_tun: tokio::sync::mpsc::Sender<Bytes>,
    tun_overflow: AtomicU64,
    bad_frames: AtomicU64,
    too_big: AtomicU64,
    spoofed: AtomicU64,
    cancel: CancellationToken,
}

/// What a bond is built from.
pub struct BondConfig {
    pub side: Side,
    pub sched: SchedulerConfig,
    pub classifier: Classifier,
}

impl Bond {
    pub fn new(
        tun: Tun,
        cfg: BondConfig,
        accept_src: Option<Vec<IpNet>>,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let now = Instant::now();
        let (to_tun, mut from_bond) = tokio::sync::mpsc::channel::<Bytes>(TUN_QUEUE);
        let writer_tun = tun.clone();
        tokio::spawn(async move {
            while let Some(p) = from_bond.recv().await {
                if let Err(e) = writer_tun.send(&p).await {
                    tracing::debug!("tun write: {e}");
                }
            }
        });
        let bond = Arc::new(Self {
            state: Mutex::new(State {
                sched: Scheduler::new(cfg.sched),
                classifier: cfg.classifier,
                last_sweep: now,
                reorder: Reorder::new(REORDER_MAX, Duration::from_millis(40)),
                links: Vec::new(),
                peer_epoch: None,
                next_generation: 1,
            }),
            tun,
            accept_src,
            icmp_source: Mutex::new(None),
            clock0: now,
            to_tun,
            tun_overflow: AtomicU64::new(0),
            health_cfg: HealthConfig::default(),
            side: cfg.side,
            rate_cfg: RateConfig::default(),
            malformed: AtomicU64::new(0),
            refused_offline: AtomicU64::new(0),
            bad_frames: AtomicU64::new(0),
            too_big: AtomicU64::new(0),
            spoofed: AtomicU64::new(0),
            cancel,
        });
        let b = bond.clone();
        tokio::spawn(async move { b.ticker().await });
        bond
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in a core; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_icmp_source(&self, addr: IpAddr) {
        if let Ok(mut s) = self.icmp_source.lock() {
            *s = Some(addr);
        }
    }

    /// Adds an uplink slot that may carry `classes`, with bounds for its rate control; it
    /// carries nothing until a connection is attached.
    pub fn add_link(
        &self,
        name: &str,
        backup: bool,
        classes: ClassMask,
        rate: Option<RateConfig>,
    ) -> LinkId {
        let mut st = self.lock();
        let id = st.sched.add_link();
        let link = Link {
            name: name.to_string(),
            health: LinkHealth::new(self.health_cfg.clone(), Instant::now()),
            conn: None,
            generation: 0,
            wake: Arc::new(Notify::new()),
            control: std::collections::VecDeque::new(),
            inflight: Inflight::new(),
            rate: RateControl::new(rate.unwrap_or_else(|| self.rate_cfg.clone())),
            pacer: Pacer::new(),
            pacer_limited: false,
            classes,
            reported: (Instant::now(), 0),
            backup,
            absent: false,
            disabled: false,
            held: None,
            unverified: false,
            pos_ok: true,
            peer: tokio::sync::watch::Sender::new(PeerView { backup, classes }),
            tx_packets: 0,
            tx_bytes: 0,
            rx_packets: 0,
            rx_bytes: 0,
        };
        if st.links.len() <= id {
            st.links.resize_with(id + 1, || None);
        }
        st.links[id] = Some(link);
        id
    }

    /// Removes an uplink slot and closes its connection.
    pub fn remove_link(&self, id: LinkId) {
        let mut st = self.lock();
        if let Some(Some(l)) = st.links.get_mut(id).map(Option::take) {
            if let Some(c) = l.conn {
                c.close(0u32.into(), b"removed");
            }
            l.wake.notify_one();
        }
        st.sched.remove_link(id);
    }

    /// The peer's sequence space starts anew when its epoch changes.
    pub fn peer_epoch(&self, epoch: u64) {
        let mut st = self.lock();
        if st.peer_epoch != Some(epoch) {
            if st.peer_epoch.is_some() {
                tracing::info!("peer restarted; reorder state reset");
            }
            st.peer_epoch = Some(epoch);
            st.reorder.reset();
        }
    }

    /// Interface presence and carrier, from netlink.
    pub fn set_carrier(&self, id: LinkId, present: bool, carrier: bool) {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(Some(l)) = st.links.get_mut(id) else {
            return;
        };
        l.absent = !present;
        l.health
            .on_carrier(present && carrier && !l.disabled && l.held.is_none(), now);
        Self::refresh(&mut st, now);
    }

    /// Switches uplink `id` off (it carries nothing and its connection is closed) or on.
    pub fn set_disabled(&self, id: LinkId, disabled: bool) {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(Some(l)) = st.links.get_mut(id) else {
            return;
        };
        l.disabled = disabled;
        if disabled {
            if let Some(c) = &l.conn {
                c.close(0u32.into(), b"disabled by the operator");
            }
            l.health.on_carrier(false, now);
        }
        Self::refresh(&mut st, now);
    }

    /// Keeps uplink `id` out of the bond for `reason` (its connection is closed, as for
    /// [`Self::set_disabled`]), or lets it back (`None`).
    pub fn set_held(&self, id: LinkId, reason: Option<&'static str>) {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(Some(l)) = st.links.get_mut(id) else {
            return;
        };
        l.held = reason;
        if let Some(r) = reason {
            if let Some(c) = &l.conn {
                c.close(0u32.into(), r.as_bytes());
            }
            l.health.on_carrier(false, now);
        }
        Self::refresh(&mut st, now);
    }

    /// Why uplink `id` is kept out of the bond, if it is.
    pub fn held(&self, id: LinkId) -> Option<&'static str> {
        self.lock().links.get(id).and_then(|l| l.as_ref()?.held)
    }

    /// Whether uplink `id` is a backup (configured or imposed) idling while a primary
    /// carries the tunnel (the state its probes already follow).
    pub fn idle_backup(&self, id: LinkId) -> bool {
        self.lock()
            .links
            .get(id)
            .and_then(Option::as_ref)
            .is_some_and(|l| l.health.sparse())
    }

    /// Whether uplink `id`'s HTTPS check currently succeeds.
    pub fn set_verified(&self, id: LinkId, verified: bool) {
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(Some(l)) = st.links.get_mut(id) {
            l.unverified = !verified;
        }
        Self::refresh(&mut st, now);
    }

    /// Whether uplink `id` only carries traffic when no other uplink can.
    pub fn set_backup(&self, id: LinkId, backup: bool) {
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(Some(l)) = st.links.get_mut(id) {
            l.backup = backup;
        }
        Self::refresh(&mut st, now);
    }

    /// New classes for uplink `id`, and new rate bounds when `rate` is given (its settings
    /// changed by a reload, or the peer says so).
    pub fn set_link_config(&self, id: LinkId, classes: ClassMask, rate: Option<RateConfig>) {
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(Some(l)) = st.links.get_mut(id) {
            l.classes = classes;
            if let Some(rate) = rate {
                l.rate.set_config(rate);
            }
            l.wake.notify_one();
        }
        Self::refresh(&mut st, now);
    }

    /// Follows what the peer should hear of uplink `id`: its backup flag and the classes
    /// it may carry now, as this end decides them ([`PeerView`]).
    pub fn peer_view(&self, id: LinkId) -> Option<tokio::sync::watch::Receiver<PeerView>> {
        self.lock()
            .links
            .get(id)
            .and_then(Option::as_ref)
            .map(|l| l.peer.subscribe())
    }

    /// A connection on uplink `id` is established: start its sender and receiver.
    pub fn attach(self: &Arc<Self>, id: LinkId, conn: quinn::Connection) {
        let now = Instant::now();
        let (generation, wake) = {
            let mut st = self.lock();
            let generation = st.next_generation;
            st.next_generation += 1;
            let Some(Some(l)) = st.links.get_mut(id) else {
                return;
            };
            if let Some(old) = l.conn.replace(conn.clone()) {
                old.close(0u32.into(), b"replaced");
            }
            l.generation = generation;
            l.health.on_connected(true, now);
            let wake = l.wake.clone();
            Self::refresh(&mut st, now);
            (generation, wake)
        };
        wake.notify_one();
        let (b, c) = (self.clone(), conn.clone());
        tokio::spawn(async move { b.sender(id, generation, c).await });
        let (b, c) = (self.clone(), conn);
        tokio::spawn(async move { b.receiver(id, generation, c).await });
    }

    fn detach(&self, id: LinkId, generation: u64) {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(Some(l)) = st.links.get_mut(id) else {
            return;
        };
        if l.generation != generation {
            return;
        }
        l.conn = None;
        l.health.on_connected(false, now);
        Self::refresh(&mut st, now);
    }

    /// The connection of uplink `id`, if one is attached.
    pub fn connection(&self, id: LinkId) -> Option<quinn::Connection> {
        self.lock()
            .links
            .get(id)
            .and_then(|l| l.as_ref())
            .and_then(|l| l.conn.clone())
    }

    pub fn online(&self) -> bool {
        self.lock().sched.online()
    }

    /// What the uplinks together have delivered at most lately, bytes per second (0 when
    /// nothing was measured).
    pub fn capacity(&self) -> f64 {
        self.lock()
            .links
            .iter()
            .flatten()
            .map(|l| l.inflight.capacity())
            .sum()
    }

    /// Classifies an IP packet read from the TUN device and queues it for the peer. With
    /// `fail_fast`, a POS packet is not queued when no uplink reaches the peer at all, so
    /// the caller can answer it at once.
    pub fn send(&self, packet: Bytes, fail_fast: bool) -> Result<Sent, Malformed> {
        let now = Instant::now();
        let (sent, wake) = {
            let mut st = self.lock();
            let v = match self.side {
                Side::Hub => st.classifier.classify_and_learn(&packet, now),
                Side::Edge => st.classifier.classify(&packet, now),
            };
            let v = match v {
                Ok(v) => v,
                Err(e) => {
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            };
            if fail_fast && v.flow_class == Class::Pos && st.sched.hopeless() {
                self.refused_offline.fetch_add(1, Ordering::Relaxed);
                return Ok(Sent::Offline(v));
            }
            let wake = st.sched.enqueue(v.class, v.flow, packet, now);
            let wake: Vec<_> = st
                .links
                .iter()
                .enumerate()
                .filter(|(i, _)| wake.contains(*i))
                .filter_map(|(_, l)| l.as_ref().map(|l| l.wake.clone()))
                .collect();
            (Sent::Queued(v), wake)
        };
        for w in wake {
            w.notify_one();
        }
        Ok(sent)
    }

    /// New class settings (the edge's, on the hub); queued packets are kept when only
    /// modes change.
    pub fn configure(&self, sched: SchedulerConfig) {
        self.lock().sched.reconfigure(sched);
    }

    /// New classification rules (see [`Classifier::set_rules`]).
    pub fn set_rules(&self, rules: &[stallnet_netconf::Rule]) {
        self.lock().classifier.set_rules(rules);
    }

    /// The driver's current addresses for the devices classification rule `index` names.
    pub fn set_resolved(
        &self,
        index: usize,
        devices: &crate::core::classify::DeviceRef,
        prefixes: Vec<IpNet>,
    ) {
        self.lock()
            .classifier
            .set_resolved(index, devices, prefixes);
    }

    /// Pushes each link's health into the scheduler; wakes links that may now pull.
    fn refresh(st: &mut State, now: Instant) {
        let primary_up = st
            .links
            .iter()
            .flatten()
            .any(|l| !l.backup && l.health.usable());
        let gate: Vec<(bool, bool)> = st
            .links
            .iter()
            .map(|l| match l {
                Some(l) => (
                    l.health.usable()
                        && !l.disabled
                        && !l.absent
                        && l.held.is_none()
                        && l.classes & bit(Class::Pos) != 0,
                    !l.unverified,
                ),
                None => (false, false),
            })
            .collect();
        let pos_ok = crate::core::reach::pos_allowed(&gate);
        let mut wakes = Vec::new();
        for id in 0..st.links.len() {
            let Some(l) = st.links[id].as_mut() else {
                continue;
            };
            l.pos_ok = pos_ok.get(id).copied().unwrap_or(true);
            l.health.set_sparse(l.backup && primary_up, now);
            let classes = if l.pos_ok {
                l.classes
            } else {
                l.classes & !bit(Class::Pos)
            };
            let peer = PeerView {
                backup: l.backup,
                classes,
            };
            l.peer
                .send_if_modified(|v| std::mem::replace(v, peer) != peer);
            let view = LinkView {
                state: l.health.state(),
                backup: l.backup,
                srtt: l.health.srtt(),
                disabled: l.absent || l.disabled || l.held.is_some(),
                room: l.inflight.has_room(),
                verified_until: l.health.verified_until(),
                degraded: l.health.degraded(),
                classes,
            };
            let wake = st.sched.update_link(id, view);
            wakes.push(wake);
        }
        for w in wakes {
            for (i, l) in st.links.iter().enumerate() {
                if let Some(l) = l {
                    if w.contains(i) {
                        l.wake.notify_one();
                    }
                }
            }
        }
        let paths = st
            .links
            .iter()
            .flatten()
            .filter(|l| l.health.usable())
            .filter_map(|l| l.health.current_rtt().map(|r| (r, l.health.jitter())));
        if let Some(hold) = reorder::hold_for(paths) {
            st.reorder.set_hold(hold);
        }
    }

    async fn ticker(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut out = Vec::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.cancel.cancelled() => return,
            }
            let now = Instant::now();
            let echo = now.duration_since(self.clock0).as_micros() as u64;
            {
                let mut st = self.lock();
                for l in st.links.iter_mut().flatten() {
                    l.health.handle_timeout(now);
                    if let Some(c) = &l.conn {
                        let s = c.stats();
                        l.health.on_transport_rtt(s.path.rtt);
                        l.inflight.on_transport(
                            s.udp_tx.bytes,
                            s.path.lost_bytes,
                            l.health.min_rtt(),
                        );
                        let fresh = s.udp_rx.bytes.saturating_sub(l.reported.1);
                        let since = now.duration_since(l.reported.0);
                        if (fresh >= REPORT_MIN_BYTES && since >= REPORT_EVERY)
                            || (fresh > 0 && since >= REPORT_IDLE)
                        {
                            l.reported = (now, s.udp_rx.bytes);
                            l.push_control(
                                Frame::Report {
                                    rx_bytes: s.udp_rx.bytes,
                                    at_us: echo,
                                }
                                .to_vec(),
                            );
                        }
                        if let Some(id) = l.health.poll_probe(now) {
                            l.push_control(Frame::Probe { id, echo }.to_vec());
                        }
                    }
                }
                Self::refresh(&mut st, now);
                st.reorder.handle_timeout(now, &mut out);
                self.release(&mut out);
                // Capped classes and paced links have no event to wake them: look here.
                if st.sched.queued_bytes() > 0 {
                    for (i, l) in st.links.iter().enumerate() {
                        if let Some(l) = l {
                            if st.sched.has_work(i) {
                                l.wake.notify_one();
                            }
                        }
                    }
                }
                if now.duration_since(st.last_sweep) >= Duration::from_secs(1) {
                    st.last_sweep = now;
                    st.classifier.sweep(now);
                }
            }
        }
    }

    /// Hands released packets to the TUN writer, in order. Call with the state locked.
    fn release(&self, out: &mut Vec<Bytes>) {
        for p in out.drain(..) {
            if self.to_tun.try_send(p).is_err() {
                self.tun_overflow.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn sender(self: Arc<Self>, id: LinkId, generation: u64, conn: quinn::Connection) {
        let mut buf = Vec::with_capacity(1500);
        loop {
            let (next, wake, paced) = {
                let mut guard = self.lock();
                let st = &mut *guard;
                let Some(Some(l)) = st.links.get_mut(id) else {
                    return;
                };
                if l.generation != generation {
                    return;
                }
                let wake = l.wake.clone();
                match l.control.pop_front() {
                    Some(c) => (Err(c), wake, None),
                    None => {
                        let now = Instant::now();
                        let paced = l.pacer.wait(now, l.rate.rate());
                        if paced.is_some() && st.sched.has_work(id) {
                            l.pacer_limited = true;
                        }
                        // Held back by the pacer, a link still sends POS at once.
                        let allowed = if paced.is_some() {
                            bit(Class::Pos)
                        } else {
                            ALL_CLASSES
                        };
                        (Ok(st.sched.poll(id, allowed, now)), wake, paced)
                    }
                }
            };
            let q = match next {
                Err(control) => {
                    if conn.send_datagram_wait(control).await.is_err() {
                        self.detach(id, generation);
                        return;
                    }
                    continue;
                }
                Ok(q) => q,
            };
            let Some(q) = q else {
                let pause = paced.unwrap_or(Duration::from_secs(3600));
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(pause) => {}
                    _ = conn.closed() => { self.detach(id, generation); return; }
                }
                continue;
            };
            buf.clear();
            Frame::Data {
                class: q.class,
                seq: q.seq,
                packet: &q.packet,
            }
            .encode(&mut buf);
            let max = conn.max_datagram_size().unwrap_or(0);
            if buf.len() > max {
                self.answer_too_big(&q.packet, max.saturating_sub(DATA_OVERHEAD))
                    .await;
                continue;
            }
            let len = buf.len() as u64;
            if let Err(e) = conn.send_datagram_wait(Bytes::copy_from_slice(&buf)).await {
                tracing::debug!(link = id, "send: {e}");
                self.detach(id, generation);
                return;
            }
            let mut st = self.lock();
            if let Some(Some(l)) = st.links.get_mut(id) {
                l.tx_packets += 1;
                l.tx_bytes += len;
                l.pacer.spend(buf.len() + QUIC_OVERHEAD);
            }
        }
    }

    async fn answer_too_big(&self, packet: &[u8], mtu: usize) {
        self.too_big.fetch_add(1, Ordering::Relaxed);
        let src = self.icmp_source.lock().ok().and_then(|s| *s);
        let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
        if let Some(reply) = src.and_then(|s| packet::too_big_reply(packet, mtu, s)) {
            let _ = self.tun.send(&reply).await;
        }
    }

    async fn receiver(self: Arc<Self>, id: LinkId, generation: u64, conn: quinn::Connection) {
        let mut out = Vec::new();
        loop {
            let d = match conn.read_datagram().await {
                Ok(d) => d,
                Err(e) => {
                    tracing::info!(link = id, "connection ended: {e}");
                    self.detach(id, generation);
                    return;
                }
            };
            let now = Instant::now();
            match Frame::decode(&d) {
                Err(e) => {
                    self.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(link = id, "bad frame: {e}");
                }
                Ok(Frame::Probe { id: pid, echo }) => {
                    let rx_us = now.duration_since(self.clock0).as_micros() as u64;
                    let mut st = self.lock();
                    if let Some(Some(l)) = st.links.get_mut(id) {
                        l.push_control(
                            Frame::ProbeAck {
                                id: pid,
                                echo,
                                rx_us,
                            }
                            .to_vec(),
                        );
                    }
                }
                Ok(Frame::ProbeAck {
                    id: pid,
                    echo,
                    rx_us,
                }) => {
                    let mut st = self.lock();
                    if let Some(Some(l)) = st.links.get_mut(id) {
                        if l.generation == generation && l.health.on_probe_ack(pid, now).is_some() {
                            // One-way delay towards the peer, up to the clocks' offset.
                            let owd = rx_us as i64 - echo as i64;
                            let delivered = l.inflight.delivery_rate(now, DELIVERY_WINDOW);
                            let limited = std::mem::take(&mut l.pacer_limited);
                            l.rate.on_sample(now, owd, delivered, limited);
                        }
                    }
                    Self::refresh(&mut st, now);
                }
                Ok(Frame::Report { rx_bytes, at_us }) => {
                    let mut st = self.lock();
                    if let Some(Some(l)) = st.links.get_mut(id) {
                        l.inflight.on_report(rx_bytes, at_us, now);
                    }
                }
                Ok(Frame::Data { seq, packet, class }) => {
                    if !self.source_ok(packet) {
                        self.spoofed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let payload = d.slice(DATA_OVERHEAD..);
                    let mut st = self.lock();
                    match self.side {
                        Side::Hub => st.classifier.mirror(packet, class, now),
                        Side::Edge => st.classifier.observe_download(packet, now),
                    }
                    if let Some(Some(l)) = st.links.get_mut(id) {
                        l.rx_packets += 1;
                        l.rx_bytes += d.len() as u64;
                    }
                    if matches!(class, Class::Bulk | Class::Guest) {
                        st.reorder.push(seq, id, payload, now, &mut out);
                    } else {
                        st.reorder.push_urgent(seq, id, payload, now, &mut out);
                    }
                    self.release(&mut out);
                }
            }
        }
    }

    fn source_ok(&self, packet: &[u8]) -> bool {
        let Some(allowed) = &self.accept_src else {
            return packet::addrs(packet).is_some();
        };
        packet::addrs(packet).is_some_and(|(src, _)| allowed.iter().any(|n| n.contains(&src)))
    }

    pub fn status(&self) -> BondStatus {
        let st = self.lock();
        let links = st
            .links
            .iter()
            .flatten()
            .map(|l| {
                let state = if l.absent {
                    "absent".to_string()
                } else if l.disabled {
                    "disabled".to_string()
                } else if let Some(r) = l.held {
                    r.to_string()
                } else {
                    match l.health.state() {
                        LinkState::Up => "up",
                        LinkState::Suspect => "suspect",
                        LinkState::Down => "down",
                        LinkState::Probing => "probing",
                    }
                    .to_string()
                };
                let (probes_sent, probes_lost) = l.health.probes();
                LinkStatus {
                    name: l.name.clone(),
                    state,
                    connected: l.conn.is_some(),
                    backup: l.backup,
                    rtt_ms: l.health.srtt().map(|d| d.as_secs_f64() * 1e3),
                    jitter_ms: l.health.jitter().as_secs_f64() * 1e3,
                    loss: l.health.loss(),
                    capacity_mbps: l.inflight.capacity() * 8.0 / 1e6,
                    in_flight_bytes: l.inflight.in_flight(),
                    tx_packets: l.tx_packets,
                    tx_bytes: l.tx_bytes,
                    rx_packets: l.rx_packets,
                    rx_bytes: l.rx_bytes,
                    probes_sent,
                    probes_lost,
                    flaps: l.health.flaps(),
                    degraded: l.health.degraded(),
                    carries_pos: l.pos_ok && l.classes & bit(Class::Pos) != 0,
                    rate_mbps: l.rate.rate() * 8.0 / 1e6,
                    queue_delay_ms: l.rate.queue_delay().as_secs_f64() * 1e3,
                    rate_decreases: l.rate.decreases(),
                }
            })
            .collect();
        let now = Instant::now();
        let top_flows = st
            .classifier
            .top_flows(TOP_FLOWS)
            .into_iter()
            .map(|(k, e)| FlowStatus {
                flow: k.to_string(),
                class: e.class.name(),
                bytes: e.bytes,
                packets: e.packets,
                age_s: now.saturating_duration_since(e.first).as_secs_f64(),
                uplink: st
                    .sched
                    .flow_link(e.id)
                    .and_then(|i| st.links.get(i))
                    .and_then(|l| l.as_ref())
                    .map(|l| l.name.clone()),
            })
            .collect();
        BondStatus {
            online: st.sched.online(),
            links,
            scheduler: st.sched.stats(),
            classes: st.sched.class_stats(Instant::now()),
            classify: st.classifier.stats(),
            top_flows,
            malformed: self.malformed.load(Ordering::Relaxed),
            refused_offline: self.refused_offline.load(Ordering::Relaxed),
            reorder: st.reorder.stats(),
            reorder_hold_ms: st.reorder.hold().as_secs_f64() * 1e3,
            bad_frames: self.bad_frames.load(Ordering::Relaxed),
            too_big: self.too_big.load(Ordering::Relaxed),
            spoofed: self.spoofed.load(Ordering::Relaxed),
            tun_overflow: self.tun_overflow.load(Ordering::Relaxed),
        }
    }
}

//! Deterministic simulator of the bond: an edge [`BondState`] and a hub [`BondState`] —
//! the state machines the daemon runs — over virtual uplinks in virtual time. Every run is
//! reproducible from its seed.
//!
//! Time is event-driven (as quinn's `Pair::drive`): the next event is the earliest of a
//! datagram's arrival, a sender's wake-up (its wire free again, or the time its pacer or
//! a capped class named), either side's `poll_timeout`, a fault's start or end and the
//! next packet of the offered traffic. Between events nothing happens, so a 9 s scenario
//! costs what its packets cost.
//!
//! An uplink has a rate, a one-way delay, jitter (order-preserving, like a real queue),
//! a bottleneck queue (a modem's buffer; none unless a scenario asks), random loss, a
//! largest datagram, and fault windows: a silent black hole (datagrams vanish, carrier
//! stays), carrier loss (the edge hears of it at once, as from netlink; the hub only
//! through its probes) and smaller datagrams (an MTU drop). The transport is a stand-in
//! for QUIC: unreliable datagrams, a sender that takes a datagram only when its wire is
//! free, or its queue has room (quinn's send buffer), and the totals QUIC keeps (bytes sent and received,
//! bytes lost, RTT). Each side is driven the way `driver::bond` drives it: after every
//! call, packets for the TUN are taken, events applied (senders woken, the peer told of an
//! uplink's backup flag and classes after a one-way delay), and the timer re-armed.
//!
//! Traffic: IPv4/UDP packets, each carrying its id, in each direction: POS (a terminal to
//! port 7001), a stream (port 9000) and bulk (port 5201), classified by the edge's rules
//! and mirrored by the hub; optionally a light flow in the default class (port 7002, a
//! telemetry or messaging app beside the bulk transfer).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use stallnet::core::bond::{
    BondConfig, BondEvent, BondState, LinkEvent, Side, Transmit, TransportStats,
};
use stallnet::core::classify::{Classifier, ClassifyConfig, PortRange, Rule};
use stallnet::core::qos::ALL_CLASSES;
use stallnet::core::scheduler::{Mode, SchedulerConfig};
use stallnet::core::Class;

/// What QUIC adds to a datagram on the wire.
const WIRE_OVERHEAD: u64 = 40;
/// The TUN MTU both simulated ends start with (the config's default).
const TUN_MTU: usize = 1424;
/// The LAN behind the edge, and the server the traffic goes to.
const LAN_CLIENT: [u8; 4] = [10, 1, 0, 2];
const POS_CLIENT: [u8; 4] = [10, 1, 0, 10];
const SERVER: [u8; 4] = [198, 18, 0, 1];
/// The port of the light default-class flow (see `Scenario::light_interval`).
const LIGHT_PORT: u16 = 7002;

#[derive(Debug, Clone)]
pub struct SimLink {
    pub rate_bps: u64,
    pub delay: Duration,
    pub jitter: Duration,
    pub loss: f64,
    /// The bottleneck's queue (a modem's buffer): the sender may hand over datagrams
    /// until this much is waiting to be serialized. Zero: the sender is paced by the wire.
    pub queue: Duration,
    /// Largest datagram the uplink carries.
    pub max_datagram: usize,
    /// Configured as a backup (carries traffic only when no primary can).
    pub backup: bool,
    /// (start, end) offsets of silent black holes.
    pub blackholes: Vec<(Duration, Duration)>,
    /// (start, end) offsets of carrier loss.
    pub carrier_down: Vec<(Duration, Duration)>,
    /// (start, end, largest datagram) while the path carries less.
    pub mtu_drops: Vec<(Duration, Duration, usize)>,
}

impl SimLink {
    pub fn new(mbps: u64, delay_ms: u64) -> Self {
        Self {
            rate_bps: mbps * 1_000_000,
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::ZERO,
            loss: 0.0,
            queue: Duration::ZERO,
            max_datagram: 1350,
            backup: false,
            blackholes: Vec::new(),
            carrier_down: Vec::new(),
            mtu_drops: Vec::new(),
        }
    }

    fn in_window(w: &[(Duration, Duration)], t: Duration) -> bool {
        w.iter().any(|(a, b)| t >= *a && t < *b)
    }

    fn carrier(&self, t: Duration) -> bool {
        !Self::in_window(&self.carrier_down, t)
    }

    fn max_datagram(&self, t: Duration) -> usize {
        self.mtu_drops
            .iter()
            .filter(|(a, b, _)| t >= *a && t < *b)
            .map(|w| w.2)
            .min()
            .unwrap_or(self.max_datagram)
    }

    /// Whether a datagram sent at `t` is lost.
    fn drops(&self, t: Duration, rng: &mut impl Rng) -> bool {
        !self.carrier(t) || Self::in_window(&self.blackholes, t) || rng.random_bool(self.loss)
    }

    /// The instants at which something about the link changes.
    fn edges(&self) -> impl Iterator<Item = Duration> + '_ {
        self.blackholes
            .iter()
            .chain(&self.carrier_down)
            .flat_map(|(a, b)| [*a, *b])
            .chain(self.mtu_drops.iter().flat_map(|(a, b, _)| [*a, *b]))
    }
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub links: Vec<SimLink>,
    pub duration: Duration,
    /// Traffic stops this long before the end so everything in flight can land.
    pub drain: Duration,
    /// Interval of each direction's POS packets (300 bytes).
    pub pos_interval: Duration,
    /// Interval of each direction's stream packets (1000 bytes); `None`: no stream.
    pub stream_interval: Option<Duration>,
    /// Interval of each direction's bulk packets (1200 bytes).
    pub bulk_interval: Duration,
    /// Interval of each direction's light default-class packets (200 bytes, port [`LIGHT_PORT`]);
    /// `None`: no such flow.
    pub light_interval: Option<Duration>,
    /// `Some`: every class in this mode (else the defaults: POS redundant, stream
    /// lowest-latency, the rest aggregated).
    pub mode: Option<Mode>,
}

/// Which way a packet travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    /// Edge to hub.
    Up,
    /// Hub to edge.
    Down,
}

#[derive(Debug, Default)]
pub struct Outcome {
    /// (packet id, direction, class, delivery time) in delivery order.
    pub delivered: Vec<(u64, Dir, Class, Duration)>,
    /// Packet id → (direction, class, time offered).
    pub sent: BTreeMap<u64, (Dir, Class, Duration)>,
    /// Ids of the light default-class flow's packets.
    pub light: BTreeSet<u64>,
    /// Data datagrams each side sent per link, after `warmup`, as (edge, hub).
    pub data_sent: Vec<(u64, u64)>,
    /// Per link: when each side sent a data datagram on it, and which way it went.
    pub data_times: Vec<Vec<(Duration, Dir)>>,
    /// Times a side asked to be woken at or before the instant it had just handled.
    pub timer_spins: u64,
    /// ICMP "too big" answers the sides wrote into their TUN devices.
    pub too_big: u64,
    /// (time, edge online) at every change of the edge's verdict.
    pub online: Vec<(Duration, bool)>,
    /// The sides' figures at the end.
    pub edge: String,
    pub hub: String,
    /// Events the run processed.
    pub steps: u64,
}

impl Outcome {
    /// Ids of packets of `class` sent in `[from, to)` that never arrived.
    pub fn lost(&self, class: Option<Class>, from: Duration, to: Duration) -> Vec<u64> {
        let got: std::collections::HashSet<u64> = self.delivered.iter().map(|d| d.0).collect();
        self.sent
            .iter()
            .filter(|(id, (_, c, t))| {
                class.is_none_or(|k| k == *c) && *t >= from && *t < to && !got.contains(id)
            })
            .map(|(id, _)| *id)
            .collect()
    }
}

/// Data datagrams count from this instant on (links are trusted by then).
pub const WARMUP: Duration = Duration::from_millis(2500);

#[derive(Debug)]
enum Ev {
    /// A datagram reaches side `to` over link `l`.
    Arrive { to: Dir, l: usize, d: Bytes },
    /// Side `side`'s sender on link `l` asks for the next datagram.
    Pump { side: Dir, l: usize },
    /// Side `side`'s timer.
    Timer { side: Dir },
    /// The edge's view of uplink `l` reaches the hub (the session's link update).
    PeerView { l: usize, backup: bool, classes: u8 },
    /// A link's faults change.
    Fault,
    /// The next packets of the offered traffic.
    Traffic,
}

/// One direction of one link: its serializer and the order of arrivals.
#[derive(Debug, Default, Clone, Copy)]
struct Wire {
    busy_until: Duration,
    last_arrival: Duration,
    tx_bytes: u64,
    /// Bytes dropped, with when the transport learns of it (a round trip later).
    lost: u64,
}

struct SideState {
    st: BondState,
    /// The armed timer, if any.
    armed: Option<Duration>,
    /// The earliest pending pump per link.
    pump: Vec<Option<Duration>>,
    wires: Vec<Wire>,
    rx_bytes: Vec<u64>,
    /// Losses the transport has not yet noticed: (noticed at, link, bytes).
    unnoticed: Vec<(Duration, usize, u64)>,
}

struct World<'a> {
    sc: &'a Scenario,
    base: Instant,
    now: Duration,
    rng: rand::rngs::StdRng,
    events: BTreeMap<(Duration, u64), Ev>,
    n: u64,
    edge: SideState,
    hub: SideState,
    out: Outcome,
    carrier: Vec<bool>,
}

/// The edge's rules of the simulated traffic.
fn rules() -> Vec<Rule> {
    let port = |class, p: u16| Rule {
        class,
        dst_port: vec![PortRange(p, p)],
        ..Default::default()
    };
    vec![
        port(Class::Pos, 7001),
        port(Class::Stream, 9000),
        port(Class::Bulk, 5201),
    ]
}

/// An IPv4/UDP packet of `len` bytes (at least 36) whose payload starts with `id`.
pub fn udp_packet(src: ([u8; 4], u16), dst: ([u8; 4], u16), id: u64, len: usize) -> Bytes {
    let len = len.max(36);
    let mut p = vec![0u8; len];
    let total = u16::try_from(len).unwrap_or(u16::MAX);
    p[0] = 0x45;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[6] = 0x40; // don't fragment: PMTU discovery, as TCP and QUIC do
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.0);
    p[16..20].copy_from_slice(&dst.0);
    let sum = {
        let mut s: u32 = 0;
        for c in p[..20].chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    };
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..22].copy_from_slice(&src.1.to_be_bytes());
    p[22..24].copy_from_slice(&dst.1.to_be_bytes());
    p[24..26].copy_from_slice(&(total - 20).to_be_bytes());
    p[28..36].copy_from_slice(&id.to_be_bytes());
    Bytes::from(p)
}

/// The id a simulated packet carries, if it is one (not an ICMP answer).
fn packet_id(p: &[u8]) -> Option<u64> {
    (p.len() >= 36 && p[9] == 17).then(|| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&p[28..36]);
        u64::from_be_bytes(a)
    })
}

fn sched_config(mode: Option<Mode>) -> SchedulerConfig {
    let mut cfg = SchedulerConfig::default();
    if let Some(m) = mode {
        cfg.modes = [m; 5];
    }
    cfg
}

impl<'a> World<'a> {
    fn new(sc: &'a Scenario) -> Self {
        let base = Instant::now();
        let n = sc.links.len();
        let edge_rules = rules();
        let side = |side: Side, accept: Option<Vec<ipnet::IpNet>>| {
            let mut st = BondState::new(
                BondConfig {
                    side,
                    sched: sched_config(sc.mode),
                    classifier: Classifier::new(
                        if side == Side::Edge {
                            &edge_rules[..]
                        } else {
                            &[]
                        },
                        ClassifyConfig::default(),
                    ),
                    accept_src: accept,
                    mtu: TUN_MTU,
                },
                base,
            );
            for (i, l) in sc.links.iter().enumerate() {
                st.add_link(&format!("link{i}"), l.backup, ALL_CLASSES, None, base);
            }
            SideState {
                st,
                armed: None,
                pump: vec![None; n],
                wires: vec![Wire::default(); n],
                rx_bytes: vec![0; n],
                unnoticed: Vec::new(),
            }
        };
        let lan: ipnet::IpNet = "10.1.0.0/24".parse().expect("a prefix");
        let mut w = World {
            sc,
            base,
            now: Duration::ZERO,
            rng: rand::rngs::StdRng::seed_from_u64(sc.seed),
            events: BTreeMap::new(),
            n: 0,
            edge: side(Side::Edge, None),
            hub: side(Side::Hub, Some(vec![lan])),
            out: Outcome {
                data_sent: vec![(0, 0); n],
                data_times: vec![Vec::new(); n],
                ..Default::default()
            },
            carrier: vec![true; n],
        };
        // The tunnel addresses (the edge learns its own from the hub's welcome).
        w.hub
            .st
            .set_icmp_source(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)));
        w.edge
            .st
            .set_icmp_source(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)));
        for d in [Dir::Up, Dir::Down] {
            for l in 0..n {
                let now = w.at();
                w.side(d).st.handle_link_event(
                    now,
                    l,
                    LinkEvent::Connected {
                        peer_reads_delivered: true,
                    },
                );
            }
            w.settle(d);
        }
        for t in sc.links.iter().flat_map(SimLink::edges).collect::<Vec<_>>() {
            w.push(t, Ev::Fault);
        }
        w.push(Duration::ZERO, Ev::Traffic);
        w
    }

    fn at(&self) -> Instant {
        self.base + self.now
    }

    fn side(&mut self, d: Dir) -> &mut SideState {
        match d {
            Dir::Up => &mut self.edge,
            Dir::Down => &mut self.hub,
        }
    }

    fn push(&mut self, t: Duration, ev: Ev) {
        self.n += 1;
        self.events.insert((t, self.n), ev);
    }

    /// Schedules side `d`'s sender on link `l` at `t` unless it is due sooner.
    fn pump_at(&mut self, d: Dir, l: usize, t: Duration) {
        let s = self.side(d);
        if s.pump[l].is_some_and(|p| p <= t) {
            return;
        }
        s.pump[l] = Some(t);
        self.push(t, Ev::Pump { side: d, l });
    }

    /// What the driver does after every call into side `d`'s state.
    fn settle(&mut self, d: Dir) {
        let now = self.now;
        while let Some(p) = self.side(d).st.poll_tun() {
            match packet_id(&p) {
                Some(id) => {
                    let class = self.out.sent.get(&id).map_or(Class::Bulk, |s| s.1);
                    let dir = if d == Dir::Down { Dir::Up } else { Dir::Down };
                    self.out.delivered.push((id, dir, class, now));
                }
                None => self.out.too_big += 1,
            }
        }
        while let Some(ev) = self.side(d).st.poll_event() {
            match ev {
                BondEvent::Wake(l) => self.pump_at(d, l, now),
                BondEvent::Close(l, _) => {
                    // The connection ends at both sides.
                    let t = self.at();
                    self.edge
                        .st
                        .handle_link_event(t, l, LinkEvent::Disconnected);
                    self.hub.st.handle_link_event(t, l, LinkEvent::Disconnected);
                }
                BondEvent::PeerView(l, v) => {
                    if d == Dir::Up {
                        let at = now + self.sc.links[l].delay;
                        self.push(
                            at,
                            Ev::PeerView {
                                l,
                                backup: v.backup,
                                classes: v.classes,
                            },
                        );
                    }
                }
            }
        }
        let base = self.base;
        let s = self.side(d);
        if !s.st.take_timers_moved() {
            return;
        }
        let t =
            s.st.poll_timeout()
                .map(|t| t.saturating_duration_since(base));
        if let Some(t) = t.map(|t| t.max(now)) {
            if s.armed.is_none_or(|a| t < a) {
                s.armed = Some(t);
                self.push(t, Ev::Timer { side: d });
            }
        }
    }

    fn on_timer(&mut self, d: Dir, t: Duration) {
        if self.side(d).armed != Some(t) {
            return; // re-armed since
        }
        let now = self.now;
        let at = self.at();
        let rtt: Vec<Duration> = self.sc.links.iter().map(|l| l.delay * 2).collect();
        let s = self.side(d);
        s.armed = None;
        // The transport notices losses a round trip after the send.
        s.unnoticed.retain(|(when, l, bytes)| {
            if *when <= now {
                s.wires[*l].lost += bytes;
                false
            } else {
                true
            }
        });
        for (l, rtt) in rtt.into_iter().enumerate() {
            let stats = TransportStats {
                rtt,
                udp_tx_bytes: s.wires[l].tx_bytes,
                udp_rx_bytes: s.rx_bytes[l],
                lost_bytes: s.wires[l].lost,
                ..TransportStats::default()
            };
            s.st.handle_link_event(at, l, LinkEvent::Stats(stats));
        }
        s.st.handle_timeout(at);
        if s.st.poll_timeout().is_some_and(|t| t <= at) {
            self.out.timer_spins += 1;
        }
        self.settle(d);
    }

    fn on_pump(&mut self, d: Dir, l: usize) {
        let now = self.now;
        if self.side(d).pump[l] != Some(now) {
            return; // a sooner pump ran
        }
        self.side(d).pump[l] = None;
        let link = self.sc.links[l].clone();
        loop {
            let busy = self.side(d).wires[l].busy_until;
            if busy > now + link.queue {
                self.pump_at(d, l, busy - link.queue);
                break;
            }
            let at = self.at();
            let max = link.max_datagram(now);
            match self.side(d).st.poll_transmit(at, l, max) {
                Transmit::Datagram(dg) => {
                    let size = dg.len() as u64 + WIRE_OVERHEAD;
                    let ser = Duration::from_nanos(size * 8 * 1_000_000_000 / link.rate_bps.max(1));
                    if dg.first().is_some_and(|b| b & 0x0f == 0) {
                        self.out.data_times[l].push((now, d));
                    }
                    if now >= WARMUP && dg.first().is_some_and(|b| b & 0x0f == 0) {
                        let c = &mut self.out.data_sent[l];
                        if d == Dir::Up {
                            c.0 += 1;
                        } else {
                            c.1 += 1;
                        }
                    }
                    let lost = link.drops(now, &mut self.rng);
                    let jitter = if link.jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        Duration::from_nanos(
                            self.rng.random_range(0..link.jitter.as_nanos() as u64),
                        )
                    };
                    let w = &mut self.side(d).wires[l];
                    w.busy_until = w.busy_until.max(now) + ser;
                    w.tx_bytes += size;
                    let arrive = (w.busy_until + link.delay + jitter).max(w.last_arrival);
                    if lost {
                        let when = now + link.delay * 2;
                        self.side(d).unnoticed.push((when, l, size));
                    } else {
                        self.side(d).wires[l].last_arrival = arrive;
                        let to = if d == Dir::Up { Dir::Down } else { Dir::Up };
                        self.push(arrive, Ev::Arrive { to, l, d: dg });
                    }
                }
                Transmit::Idle { until } => {
                    if let Some(t) = until {
                        let t = t.saturating_duration_since(self.base).max(now);
                        self.pump_at(d, l, t);
                    }
                    break;
                }
            }
        }
        self.settle(d);
    }

    fn on_arrive(&mut self, to: Dir, l: usize, d: Bytes) {
        let at = self.at();
        let s = self.side(to);
        s.rx_bytes[l] += d.len() as u64 + WIRE_OVERHEAD;
        s.st.handle_datagram(at, l, d);
        self.settle(to);
    }

    fn on_fault(&mut self) {
        let at = self.at();
        for (l, link) in self.sc.links.iter().enumerate() {
            let up = link.carrier(self.now);
            if up != self.carrier[l] {
                self.carrier[l] = up;
                self.edge.st.handle_link_event(
                    at,
                    l,
                    LinkEvent::Carrier {
                        present: true,
                        carrier: up,
                    },
                );
            }
        }
        self.settle(Dir::Up);
        // An MTU change: the senders look again.
        for l in 0..self.sc.links.len() {
            let now = self.now;
            self.pump_at(Dir::Up, l, now);
            self.pump_at(Dir::Down, l, now);
        }
    }

    /// Offers the next packets of each flow due now; schedules the next offer.
    fn on_traffic(&mut self) {
        let sc = self.sc;
        let now = self.now;
        if now + sc.drain >= sc.duration {
            return;
        }
        let mut flows: Vec<(Class, Duration, [u8; 4], u16, usize)> = vec![
            (Class::Pos, sc.pos_interval, POS_CLIENT, 7001, 300),
            (Class::Bulk, sc.bulk_interval, LAN_CLIENT, 5201, 1200),
        ];
        if let Some(i) = sc.stream_interval {
            flows.push((Class::Stream, i, LAN_CLIENT, 9000, 1000));
        }
        if let Some(i) = sc.light_interval {
            flows.push((Class::Bulk, i, LAN_CLIENT, LIGHT_PORT, 200));
        }
        let mut next = sc.duration;
        for (class, interval, client, port, len) in flows {
            let interval = interval.max(Duration::from_micros(50));
            let k = now.as_nanos() / interval.as_nanos();
            if now.as_nanos() % interval.as_nanos() == 0 {
                self.offer(Dir::Up, class, (client, 40_000 + port), (SERVER, port), len);
                // Downloads answer flows the edge has opened (the hub mirrors their class).
                if now >= Duration::from_millis(500) {
                    self.offer(
                        Dir::Down,
                        class,
                        (SERVER, port),
                        (client, 40_000 + port),
                        len,
                    );
                }
            }
            let t = Duration::from_nanos(
                u64::try_from((k + 1) * interval.as_nanos()).unwrap_or(u64::MAX),
            );
            next = next.min(t);
        }
        self.push(next, Ev::Traffic);
    }

    fn offer(
        &mut self,
        d: Dir,
        class: Class,
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        len: usize,
    ) {
        let id = self.out.sent.len() as u64;
        if src.1 == LIGHT_PORT || dst.1 == LIGHT_PORT {
            self.out.light.insert(id);
        }
        let p = udp_packet(src, dst, id, len);
        self.out.sent.insert(id, (d, class, self.now));
        let at = self.at();
        let _ = self.side(d).st.handle_tun_packet(at, p, false);
        self.settle(d);
    }

    fn run(mut self) -> Outcome {
        let mut was_online = None;
        let mut same = 0u32;
        while let Some(((t, _), ev)) = self.events.pop_first() {
            if t > self.sc.duration {
                break;
            }
            if t == self.now {
                same += 1;
                // A state that asks to be called again at the same instant forever is a
                // bug (a driver would spin): stop and say what kept it busy.
                assert!(
                    same < 100_000,
                    "seed {}: no progress at {t:?}: {ev:?}",
                    self.sc.seed
                );
            } else {
                same = 0;
            }
            self.now = t;
            self.out.steps += 1;
            match ev {
                Ev::Arrive { to, l, d } => self.on_arrive(to, l, d),
                Ev::Pump { side, l } => self.on_pump(side, l),
                Ev::Timer { side } => self.on_timer(side, t),
                Ev::PeerView { l, backup, classes } => {
                    let at = self.at();
                    self.hub.st.set_backup(l, backup, at);
                    self.hub.st.set_link_config(l, classes, None, at);
                    self.settle(Dir::Down);
                }
                Ev::Fault => self.on_fault(),
                Ev::Traffic => self.on_traffic(),
            }
            let online = self.edge.st.online();
            if was_online != Some(online) {
                was_online = Some(online);
                self.out.online.push((t, online));
            }
        }
        let at = self.at();
        self.out.edge = format!("{:?}", self.edge.st.status(at));
        self.out.hub = format!("{:?}", self.hub.st.status(at));
        self.out
    }
}

/// Runs a scenario to its end.
pub fn run(sc: &Scenario) -> Outcome {
    World::new(sc).run()
}

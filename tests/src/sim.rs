//! Deterministic simulator for the sans-IO cores: scheduler, link health and reorder
//! driven over virtual links with virtual time. Every run is reproducible from its seed.
//!
//! A link has a rate, a one-way delay, jitter (order-preserving, like a real queue), random
//! loss, and fault windows: a silent black hole (frames vanish, carrier stays) or carrier
//! loss (reported to health at once). The sender side runs one [`Scheduler`] and one
//! [`LinkHealth`] per link with probes answered by the far end; the receiver runs
//! [`Reorder`]. The run records every delivery for property checks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use stallnet::core::health::{HealthConfig, LinkHealth};
use stallnet::core::qos::ALL_CLASSES;
use stallnet::core::reorder::{hold_for, Reorder};
use stallnet::core::scheduler::{LinkView, Mode, Scheduler, SchedulerConfig};
use stallnet::core::Class;

#[derive(Debug, Clone)]
pub struct SimLink {
    pub rate_bps: u64,
    pub delay: Duration,
    pub jitter: Duration,
    pub loss: f64,
    /// (start, end) offsets of silent black holes.
    pub blackholes: Vec<(Duration, Duration)>,
    /// (start, end) offsets of carrier loss.
    pub carrier_down: Vec<(Duration, Duration)>,
}

impl SimLink {
    pub fn new(mbps: u64, delay_ms: u64) -> Self {
        Self {
            rate_bps: mbps * 1_000_000,
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::ZERO,
            loss: 0.0,
            blackholes: Vec::new(),
            carrier_down: Vec::new(),
        }
    }
    fn in_window(w: &[(Duration, Duration)], t: Duration) -> bool {
        w.iter().any(|(a, b)| t >= *a && t < *b)
    }
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub links: Vec<SimLink>,
    pub duration: Duration,
    /// Traffic stops this long before the end so everything in flight can land.
    pub drain: Duration,
    pub pos_interval: Duration,
    pub bulk_interval: Duration,
    pub mode: Mode,
}

#[derive(Debug, Default)]
pub struct Outcome {
    /// (packet id, class, delivery time offset) in delivery order. Packet ids number the
    /// packets in the order they were offered (the wire sequence numbers are the
    /// scheduler's business).
    pub delivered: Vec<(u64, Class, Duration)>,
    pub sent: BTreeMap<u64, (Class, Duration)>,
    pub late: u64,
    pub duplicates_suppressed: u64,
    /// The scheduler's figures at the end (drops per class and why).
    pub sched: String,
}

enum Ev {
    /// A data frame reaches the receiver over link `l`.
    Data {
        l: usize,
        seq: u64,
        packet: Bytes,
    },
    /// A probe reaches the far end (which answers) / its answer comes back.
    Probe {
        l: usize,
        id: u32,
    },
    Ack {
        l: usize,
        id: u32,
    },
}

struct Wire {
    busy_until: Duration,
    last_arrival: Duration,
}

/// A packet of `len` bytes whose first eight carry `id`.
fn tagged(id: u64, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    v[..8].copy_from_slice(&id.to_be_bytes());
    Bytes::from(v)
}

pub fn run(sc: &Scenario) -> Outcome {
    let mut rng = rand::rngs::StdRng::seed_from_u64(sc.seed);
    let base = Instant::now();
    let at = |d: Duration| base + d;
    let mut cfg = SchedulerConfig::default();
    if sc.mode == Mode::Redundant {
        cfg.modes = [Mode::Redundant; 5];
    }
    let mut sched = Scheduler::new(cfg);
    let ids: Vec<usize> = sc.links.iter().map(|_| sched.add_link()).collect();
    let mut health: Vec<LinkHealth> = sc
        .links
        .iter()
        .map(|_| {
            let mut h = LinkHealth::new(HealthConfig::default(), base);
            h.on_connected(true, base);
            h
        })
        .collect();
    let mut wires: Vec<Wire> = sc
        .links
        .iter()
        .map(|_| Wire {
            busy_until: Duration::ZERO,
            last_arrival: Duration::ZERO,
        })
        .collect();
    let mut reorder = Reorder::new(2048, Duration::from_millis(40));
    let mut events: BTreeMap<(Duration, u64), Ev> = BTreeMap::new();
    let mut ev_n = 0u64;
    let mut out = Outcome::default();
    let mut next_pos = Duration::ZERO;
    let mut next_bulk = Duration::ZERO;
    let mut released = Vec::new();
    let step = Duration::from_micros(500);
    let mut now = Duration::ZERO;
    let mut carrier: Vec<bool> = vec![true; sc.links.len()];
    let mut seq_counter = 0u64;

    while now < sc.duration {
        // Carrier changes are reported at once, as netlink would.
        for (i, l) in sc.links.iter().enumerate() {
            let up = !SimLink::in_window(&l.carrier_down, now);
            if up != carrier[i] {
                carrier[i] = up;
                health[i].on_carrier(up, at(now));
            }
        }
        // Traffic.
        if now + sc.drain < sc.duration {
            while next_pos <= now {
                sched.enqueue(Class::Pos, seq_counter, tagged(seq_counter, 300), at(now));
                out.sent.insert(seq_counter, (Class::Pos, now));
                seq_counter += 1;
                next_pos += sc.pos_interval;
            }
            while next_bulk <= now {
                sched.enqueue(Class::Bulk, 0, tagged(seq_counter, 1200), at(now));
                out.sent.insert(seq_counter, (Class::Bulk, now));
                seq_counter += 1;
                next_bulk += sc.bulk_interval;
            }
        }
        // Health: timers and probes.
        for (i, h) in health.iter_mut().enumerate() {
            h.handle_timeout(at(now));
            if let Some(id) = h.poll_probe(at(now)) {
                let l = &sc.links[i];
                if carrier[i] && !SimLink::in_window(&l.blackholes, now) && !rng.random_bool(l.loss)
                {
                    ev_n += 1;
                    events.insert((now + l.delay, ev_n), Ev::Probe { l: i, id });
                }
            }
            let view = LinkView {
                state: h.state(),
                backup: false,
                srtt: h.srtt(),
                disabled: !carrier[i],
                room: true,
                verified_until: h.verified_until(),
                degraded: h.degraded(),
                classes: ALL_CLASSES,
            };
            sched.update_link(ids[i], view);
        }
        // Links pull while their wire is free.
        for (i, l) in sc.links.iter().enumerate() {
            while wires[i].busy_until <= now {
                let Some(q) = sched.poll(ids[i], ALL_CLASSES, at(now)) else {
                    break;
                };
                let bits = (q.packet.len() as u64 + 60) * 8;
                let ser = Duration::from_nanos(bits * 1_000_000_000 / l.rate_bps);
                wires[i].busy_until = wires[i].busy_until.max(now) + ser;
                let lost = !carrier[i]
                    || SimLink::in_window(&l.blackholes, now)
                    || rng.random_bool(l.loss);
                if !lost {
                    let jitter = if l.jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        Duration::from_nanos(rng.random_range(0..l.jitter.as_nanos() as u64))
                    };
                    let arrive =
                        (wires[i].busy_until + l.delay + jitter).max(wires[i].last_arrival);
                    wires[i].last_arrival = arrive;
                    ev_n += 1;
                    events.insert(
                        (arrive, ev_n),
                        Ev::Data {
                            l: i,
                            seq: q.seq,
                            packet: q.packet.clone(),
                        },
                    );
                }
            }
        }
        // Deliver due events.
        let due: Vec<(Duration, u64)> = events.range(..=(now, u64::MAX)).map(|(k, _)| *k).collect();
        for k in due {
            let Some(ev) = events.remove(&k) else {
                continue;
            };
            match ev {
                Ev::Data { l, seq, packet } => {
                    reorder.push(seq, l, packet, at(now), &mut released);
                }
                Ev::Probe { l, id } => {
                    let link = &sc.links[l];
                    if carrier[l]
                        && !SimLink::in_window(&link.blackholes, now)
                        && !rng.random_bool(link.loss)
                    {
                        ev_n += 1;
                        events.insert((now + link.delay, ev_n), Ev::Ack { l, id });
                    }
                }
                Ev::Ack { l, id } => {
                    health[l].on_probe_ack(id, at(now));
                }
            }
        }
        let paths = health
            .iter()
            .filter(|h| h.usable())
            .filter_map(|h| h.current_rtt().map(|r| (r, h.jitter())));
        if let Some(hold) = hold_for(paths) {
            reorder.set_hold(hold);
        }
        reorder.handle_timeout(at(now), &mut released);
        for p in released.drain(..) {
            let mut a = [0u8; 8];
            a.copy_from_slice(&p[..8]);
            let seq = u64::from_be_bytes(a);
            let class = out.sent.get(&seq).map_or(Class::Bulk, |s| s.0);
            out.delivered.push((seq, class, now));
        }
        now += step;
    }
    let st = reorder.stats();
    out.late = st.late;
    out.duplicates_suppressed = st.duplicates;
    out.sched = format!(
        "{:?} {:?}",
        sched.stats(),
        sched.class_stats(at(now))[Class::Bulk as usize]
    );
    out
}

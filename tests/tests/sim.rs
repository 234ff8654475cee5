//! Properties of the bond — the edge's and the hub's `BondState`, as the daemon runs them —
//! over many seeded fault scenarios in virtual time (no IO, no root). A failure prints its
//! seed; `SIM_SEED=N cargo test -p stallnet-tests --test sim` replays it, and
//! `SIM_SEEDS=N` runs N seeds per property instead of the CI's number.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use stallnet::core::health::HealthConfig;
use stallnet::core::scheduler::Mode;
use stallnet::core::Class;
use stallnet_tests::sim::{run, Dir, Scenario, SimLink, WARMUP};

fn seeds(ci: u64) -> Vec<u64> {
    if let Some(s) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![s];
    }
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ci);
    (0..n).collect()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A random two- or three-link scenario with one fault on one link: a black hole, a
/// carrier loss, a flapping carrier or an MTU drop.
fn random_scenario(seed: u64) -> (Scenario, usize) {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let n = r.random_range(2..=3);
    let mut links: Vec<SimLink> = (0..n)
        .map(|_| {
            let mut l = SimLink::new(r.random_range(5..40), r.random_range(5..60));
            l.jitter = ms(r.random_range(0..5));
            l.loss = if r.random_bool(0.3) {
                r.random_range(0.0..0.01)
            } else {
                0.0
            };
            l
        })
        .collect();
    let victim = r.random_range(0..n);
    let start = ms(r.random_range(3000..5000));
    let end = start + ms(r.random_range(200..3000));
    match r.random_range(0..4) {
        0 => links[victim].blackholes.push((start, end)),
        1 => links[victim].carrier_down.push((start, end)),
        2 => {
            // Flaps: short outages in a row.
            let mut t = start;
            while t < end {
                let down = ms(r.random_range(50..400));
                links[victim].carrier_down.push((t, t + down));
                t += down + ms(r.random_range(100..600));
            }
        }
        _ => links[victim].mtu_drops.push((start, end, 1000)),
    }
    let sc = Scenario {
        seed,
        links,
        duration: ms(9000),
        drain: ms(1500),
        pos_interval: ms(10),
        stream_interval: r.random_bool(0.5).then(|| ms(r.random_range(4..20))),
        bulk_interval: Duration::from_micros(r.random_range(800..3000)),
        light_interval: None,
        mode: r.random_bool(0.2).then_some(Mode::Redundant),
    };
    (sc, victim)
}

#[test]
fn no_packet_is_ever_delivered_twice_in_either_direction() {
    let start = Instant::now();
    let mut steps = 0;
    let seeds = seeds(150);
    for &seed in &seeds {
        let (sc, _) = random_scenario(seed);
        let out = run(&sc);
        steps += out.steps;
        let mut seen = HashSet::new();
        for (id, dir, _, _) in &out.delivered {
            assert!(
                seen.insert(*id),
                "seed {seed}: {id} ({dir:?}) delivered twice"
            );
        }
        assert!(!out.delivered.is_empty(), "seed {seed}: nothing delivered");
        assert_eq!(
            out.timer_spins, 0,
            "seed {seed}: a timer asked for the past"
        );
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "measured: {} scenarios in {secs:.1} s ({:.1}/s, {:.0} events/s)",
        seeds.len(),
        seeds.len() as f64 / secs,
        steps as f64 / secs
    );
}

#[test]
fn pos_survives_any_single_uplink_fault_both_ways() {
    for seed in seeds(150) {
        let (mut sc, _) = random_scenario(seed);
        // Loss on the other links is a second fault; this property is about one.
        for l in &mut sc.links {
            l.loss = 0.0;
        }
        let out = run(&sc);
        // Before the links are trusted nothing is usable; from then on every POS packet,
        // up and down, arrives.
        let lost = out.lost(Some(Class::Pos), WARMUP, sc.duration);
        assert!(
            lost.is_empty(),
            "seed {seed}: POS lost {lost:?} in {sc:?}\nedge {}\nhub {}",
            out.edge,
            out.hub
        );
    }
}

#[test]
fn without_faults_each_class_arrives_in_order_both_ways() {
    for seed in seeds(60) {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let links = vec![
            SimLink::new(r.random_range(5..30), r.random_range(5..30)),
            SimLink::new(r.random_range(5..30), r.random_range(30..80)),
        ];
        let sc = Scenario {
            seed,
            links,
            duration: ms(6000),
            drain: ms(1000),
            pos_interval: ms(20),
            stream_interval: Some(ms(10)),
            bulk_interval: ms(1),
            light_interval: None,
            mode: None,
        };
        let out = run(&sc);
        // POS overtakes bulk by design; within a class and direction, packets keep their
        // order.
        let mut max: HashMap<(Dir, Class), u64> = HashMap::new();
        let mut out_of_order = 0;
        for (id, dir, class, t) in &out.delivered {
            if *t < ms(3000) {
                continue; // links settling
            }
            let m = max.entry((*dir, *class)).or_insert(*id);
            if *id < *m {
                out_of_order += 1;
            }
            *m = (*m).max(*id);
        }
        assert_eq!(out_of_order, 0, "seed {seed}: {out_of_order} out of order");
        let got = out.delivered.len() as f64;
        assert!(
            got >= out.sent.len() as f64 * 0.6,
            "seed {seed}: {got} of {} delivered\nedge {}",
            out.sent.len(),
            out.edge
        );
    }
}

#[test]
fn every_class_recovers_from_a_black_hole_and_loses_little_around_it() {
    for seed in seeds(60) {
        let (mut sc, victim) = random_scenario(seed);
        // Enough capacity left on the survivors for the offered load; beside the bulk
        // transfer, a light flow in the same class (200 packets/s).
        sc.bulk_interval = ms(2);
        sc.stream_interval = Some(ms(10));
        sc.light_interval = Some(ms(5));
        for l in &mut sc.links {
            l.loss = 0.0;
            l.carrier_down.clear();
            l.blackholes.clear();
            l.mtu_drops.clear();
            l.rate_bps = l.rate_bps.max(15_000_000);
        }
        sc.links[victim].blackholes.push((ms(4000), ms(9000)));
        let out = run(&sc);
        // Everything sent after detection (a second after the black hole began) arrives.
        let after = out.lost(None, ms(5000), sc.duration);
        assert!(
            after.is_empty(),
            "seed {seed}: {} lost after detection\nedge {}",
            after.len(),
            out.edge
        );
        // What was in flight on the dying link went out again: almost nothing is lost
        // even while the black hole was being detected.
        let around = out
            .sent
            .values()
            .filter(|(_, _, t)| *t >= ms(3500) && *t < ms(5000))
            .count();
        let lost_ids = out.lost(None, ms(3500), ms(5000));
        let lost = lost_ids.len();
        let mut by: HashMap<(Dir, Class), usize> = HashMap::new();
        for id in &lost_ids {
            if let Some((d, c, _)) = out.sent.get(id) {
                *by.entry((*d, *c)).or_default() += 1;
            }
        }
        eprintln!("measured: seed {seed}: {lost} of {around} lost around the fault: {by:?}");
        // The light flow shares bulk's class but builds no queue: it loses nothing.
        let light: Vec<&u64> = lost_ids.iter().filter(|i| out.light.contains(i)).collect();
        assert!(
            light.is_empty(),
            "seed {seed}: the light flow lost {light:?}\nedge {}\nhub {}",
            out.edge,
            out.hub
        );
        // The urgent classes lose nothing, in either direction.
        for (d, c) in by.keys() {
            assert!(
                matches!(c, Class::Bulk),
                "seed {seed}: {c:?} ({d:?}) lost around the fault: {by:?}\nedge {}\nhub {}",
                out.edge,
                out.hub
            );
        }
        // Bulk: in some seeds a few packets outlive the queue's 150 ms hard sojourn limit
        // while the survivors carry the resend burst and the moved load (issue 18, item
        // 4, is to make this 0).
        assert!(
            lost * 100 <= around * 5,
            "seed {seed}: {lost} of {around} lost around the fault: {by:?}\nedge {}\nhub {}",
            out.edge,
            out.hub
        );
    }
}

#[test]
fn a_backup_carries_no_data_while_a_primary_is_usable() {
    for seed in seeds(40) {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let mut backup = SimLink::new(r.random_range(5..30), r.random_range(5..60));
        backup.backup = true;
        let sc = Scenario {
            seed,
            links: vec![
                SimLink::new(r.random_range(10..40), r.random_range(5..60)),
                backup,
            ],
            duration: ms(6000),
            drain: ms(1000),
            pos_interval: ms(10),
            stream_interval: Some(ms(10)),
            bulk_interval: ms(2),
            light_interval: None,
            mode: None,
        };
        let out = run(&sc);
        assert_eq!(
            out.data_sent[1],
            (0, 0),
            "seed {seed}: the backup carried data (edge, hub)\nedge {}",
            out.edge
        );
        assert!(out.data_sent[0].0 > 0 && out.data_sent[0].1 > 0);
        // The primary fails for good: the backup takes everything, both ways.
        let mut sc = sc;
        sc.links[0].carrier_down.push((ms(3000), ms(9000)));
        sc.links[0].blackholes.push((ms(3000), ms(9000)));
        let out = run(&sc);
        let lost = out.lost(Some(Class::Pos), ms(4500), sc.duration);
        assert!(
            lost.is_empty(),
            "seed {seed}: POS lost on the backup {lost:?}"
        );
        assert!(out.data_sent[1].0 > 0 && out.data_sent[1].1 > 0);
    }
}

#[test]
fn the_box_is_online_exactly_while_an_uplink_reaches_the_hub() {
    for seed in seeds(40) {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let mut links = vec![
            SimLink::new(r.random_range(5..30), r.random_range(5..60)),
            SimLink::new(r.random_range(5..30), r.random_range(5..60)),
        ];
        // Both lose carrier together for a while; one of them first for longer.
        let (a, b) = (
            ms(r.random_range(3000..4000)),
            ms(r.random_range(5000..6000)),
        );
        links[0].carrier_down.push((a, ms(8000)));
        links[1].carrier_down.push((ms(4500), b));
        let sc = Scenario {
            seed,
            links,
            duration: ms(10_000),
            drain: ms(1000),
            pos_interval: ms(10),
            stream_interval: None,
            bulk_interval: ms(5),
            light_interval: None,
            mode: None,
        };
        let out = run(&sc);
        let online_at = |t: Duration| {
            out.online
                .iter()
                .take_while(|(at, _)| *at <= t)
                .last()
                .is_some_and(|(_, o)| *o)
        };
        assert!(online_at(ms(4400)), "seed {seed}: {:?}", out.online);
        // Carrier loss on both: offline at once.
        assert!(!online_at(ms(4501)), "seed {seed}: {:?}", out.online);
        assert!(!online_at(b - ms(1)), "seed {seed}: {:?}", out.online);
        // Link 1 back: online again once it has answered probes for its hold.
        // (Link 1's only outage: the short hold of a single flap.)
        let hold = HealthConfig::default().hold_after(1);
        assert!(!online_at(b + hold / 2), "seed {seed}: {:?}", out.online);
        assert!(
            online_at(b + hold + ms(500)),
            "seed {seed}: {:?}",
            out.online
        );
    }
}

#[test]
fn a_smaller_path_mtu_answers_big_packets_and_keeps_pos() {
    for seed in seeds(20) {
        let mut links = vec![SimLink::new(20, 10), SimLink::new(20, 30)];
        for l in &mut links {
            l.mtu_drops.push((ms(3000), ms(6000), 1000));
        }
        let sc = Scenario {
            seed,
            links,
            duration: ms(8000),
            drain: ms(1000),
            pos_interval: ms(10),
            stream_interval: None,
            bulk_interval: ms(5),
            light_interval: None,
            mode: None,
        };
        let out = run(&sc);
        assert!(
            out.too_big > 0,
            "seed {seed}: no ICMP too-big answers\nedge {}\nhub {}",
            out.edge,
            out.hub
        );
        let lost = out.lost(Some(Class::Pos), WARMUP, sc.duration);
        assert!(lost.is_empty(), "seed {seed}: POS lost {lost:?}");
        // Bulk of 1200 bytes does not fit in 1000: refused (and answered) meanwhile,
        // carried again after.
        let late = out.lost(Some(Class::Bulk), ms(6200), sc.duration - sc.drain);
        assert!(
            late.is_empty(),
            "seed {seed}: bulk lost after the MTU came back"
        );
    }
}

/// A restored uplink carries its full share again within a second of coming back (issue
/// 18, item 4): after a single clean outage (carrier loss or a silent black hole) the link
/// is trusted again after a short hold, and neither what it had in flight when it failed
/// nor the time it spent silent holds it back. Both directions, links carrying more
/// than they can.
#[test]
fn a_restored_uplink_carries_its_share_again_within_a_second() {
    for seed in seeds(20) {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ 0xbac);
        let mut links = vec![
            SimLink::new(r.random_range(15..40), r.random_range(5..30)),
            SimLink::new(r.random_range(5..15), r.random_range(10..60)),
        ];
        // Modems' buffers, as the bench's emulator has them.
        for l in &mut links {
            l.queue = ms(50);
        }
        let (down, up) = (ms(4000), ms(6500));
        if seed % 2 == 0 {
            links[0].carrier_down.push((down, up));
        } else {
            links[0].blackholes.push((down, up));
        }
        let sc = Scenario {
            seed,
            links,
            duration: ms(9000),
            drain: ms(300),
            pos_interval: ms(20),
            stream_interval: None,
            bulk_interval: Duration::from_micros(200),
            light_interval: None,
            mode: None,
        };
        let out = run(&sc);
        for dir in [Dir::Up, Dir::Down] {
            let sent = |from: Duration, len: Duration| {
                out.data_times[0]
                    .iter()
                    .filter(|(t, d)| *d == dir && *t >= from && *t < from + len)
                    .count()
            };
            let before = sent(ms(3000), ms(1000));
            let series: Vec<usize> = (60..90).map(|i| sent(ms(i * 100), ms(100))).collect();
            eprintln!("measured: seed {seed} {dir:?}: before {before}/s, after restore per 100 ms {series:?}");
            // Trusted again after the hold (half a second) and carrying nearly its share
            // at once: three quarters of it over the last 300 ms of the second after the
            // restore, all of it over the second after that. (A link resumed at its old
            // in-flight cap queues for a moment, and its rate control answers that.)
            let soon = sent(up + ms(700), ms(300)) * 10 / 3;
            let then = sent(up + ms(1000), ms(1000));
            assert!(
                soon * 100 >= before * 75 && then * 100 >= before * 90,
                "seed {seed} {dir:?}: link 0 carried {soon} datagrams/s 0.7-1 s after the \
                 restore and {then}/s in the second after, {before}/s before the fault: \
                 {series:?}\nedge {}\nhub {}",
                out.edge,
                out.hub
            );
        }
    }
}

/// Issue 18's POS figure in virtual time: both ways, bulk offered beyond what two
/// uplinks carry, each with a modem buffer of 500 ms. The in-flight cap keeps each
/// modem's queue to a few milliseconds, so a payment waits little more than its path
/// takes, and the links stay nearly full.
#[test]
fn pos_waits_only_milliseconds_behind_bulk_that_fills_deep_modem_queues() {
    for seed in seeds(10) {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ 0x905);
        // The slower path at most twice as long as the faster: near enough to
        // aggregate (see the scheduler's eligibility).
        let near = r.random_range(5..30);
        let mut links = vec![
            SimLink::new(r.random_range(15..40), near),
            SimLink::new(r.random_range(5..15), r.random_range(near..=near * 2)),
        ];
        for l in &mut links {
            l.queue = ms(500);
        }
        let base = links.iter().map(|l| l.delay).min().unwrap_or_default();
        let wire_bps: u64 = links.iter().map(|l| l.rate_bps).sum();
        let sc = Scenario {
            seed,
            links,
            duration: ms(9000),
            drain: ms(500),
            pos_interval: ms(10),
            stream_interval: None,
            bulk_interval: Duration::from_micros(150),
            light_interval: None,
            mode: None,
        };
        let out = run(&sc);
        // Once startup is over: from 5 s to the end of the traffic.
        let (from, to) = (ms(5000), ms(8500));
        for dir in [Dir::Up, Dir::Down] {
            let mut waits: Vec<Duration> = out
                .delivered
                .iter()
                .filter(|d| d.1 == dir && d.2 == Class::Pos)
                .filter_map(|d| {
                    let (_, _, at) = out.sent.get(&d.0)?;
                    (*at >= from && *at < to).then(|| d.3.saturating_sub(*at + base))
                })
                .collect();
            waits.sort();
            let p99 = waits
                .get(waits.len() * 99 / 100)
                .copied()
                .unwrap_or(Duration::MAX);
            let bulk = out
                .delivered
                .iter()
                .filter(|d| d.1 == dir && d.2 == Class::Bulk && d.3 >= from && d.3 < to)
                .count();
            // Bulk packets are 1 200 bytes; the wire also carries the tunnel's and QUIC's
            // headers (about 5 %), POS and the probes.
            let share = bulk as f64 * 1200.0 * 8.0 / (to - from).as_secs_f64() / wire_bps as f64;
            eprintln!(
                "measured: seed {seed} {dir:?}: POS wait beyond its path p99 {:.1} ms, \
                 bulk {:.1} % of the wire",
                p99.as_secs_f64() * 1e3,
                share * 100.0
            );
            assert!(
                waits.len() >= 300 && p99 <= ms(5),
                "seed {seed} {dir:?}: POS waited {p99:?} beyond its path at p99 ({} \
                 payments)\nedge {}\nhub {}",
                waits.len(),
                out.edge,
                out.hub
            );
            assert!(
                share >= 0.85,
                "seed {seed} {dir:?}: bulk had {:.1} % of the wire\nedge {}\nhub {}",
                share * 100.0,
                out.edge,
                out.hub
            );
        }
    }
}

//! Properties of the cores over many seeded fault scenarios (virtual time, no IO).
//! A failure prints its seed; `SIM_SEED=N cargo test -p stallnet-tests --test sim` replays it.

use std::collections::HashSet;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use stallnet::core::scheduler::Mode;
use stallnet::core::Class;
use stallnet_tests::sim::{run, Scenario, SimLink};

fn seeds(n: u64) -> Vec<u64> {
    match std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(s) => vec![s],
        None => (0..n).collect(),
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A random two- or three-link scenario with one fault on one link.
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
    if r.random_bool(0.5) {
        links[victim].blackholes.push((start, end));
    } else {
        links[victim].carrier_down.push((start, end));
    }
    let sc = Scenario {
        seed,
        links,
        duration: ms(9000),
        drain: ms(1500),
        pos_interval: ms(10),
        bulk_interval: Duration::from_micros(r.random_range(800..3000)),
        mode: if r.random_bool(0.2) {
            Mode::Redundant
        } else {
            Mode::Aggregate
        },
    };
    (sc, victim)
}

#[test]
fn no_packet_is_ever_delivered_twice() {
    for seed in seeds(120) {
        let (sc, _) = random_scenario(seed);
        let out = run(&sc);
        let mut seen = HashSet::new();
        for (seq, _, _) in &out.delivered {
            assert!(seen.insert(*seq), "seed {seed}: seq {seq} delivered twice");
        }
    }
}

#[test]
fn redundant_pos_survives_any_single_uplink_fault() {
    for seed in seeds(120) {
        let (mut sc, _) = random_scenario(seed);
        // Loss on the other links is a second fault; this property is about one.
        for l in &mut sc.links {
            l.loss = 0.0;
        }
        let out = run(&sc);
        let got: HashSet<u64> = out
            .delivered
            .iter()
            .filter(|d| d.1 == Class::Pos)
            .map(|d| d.0)
            .collect();
        // Before the links are trusted (first ~2 s) nothing is usable; from then on every
        // POS packet must arrive.
        let lost: Vec<u64> = out
            .sent
            .iter()
            .filter(|(s, (c, t))| *c == Class::Pos && *t >= ms(2500) && !got.contains(s))
            .map(|(s, _)| *s)
            .collect();
        assert!(lost.is_empty(), "seed {seed}: POS lost {lost:?} in {sc:?}");
    }
}

#[test]
fn without_faults_delivery_is_in_order() {
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
            bulk_interval: ms(1),
            mode: Mode::Aggregate,
        };
        let out = run(&sc);
        // POS overtakes bulk by design; within a class, packets keep their order.
        let mut max: std::collections::HashMap<Class, u64> = Default::default();
        let mut out_of_order = 0;
        for (id, class, t) in &out.delivered {
            if *t < ms(3000) {
                continue; // links settling
            }
            let m = max.entry(*class).or_insert(*id);
            if *id < *m {
                out_of_order += 1;
            }
            *m = (*m).max(*id);
        }
        assert_eq!(
            out_of_order, 0,
            "seed {seed}: {out_of_order} out of order ({} late)",
            out.late
        );
        assert!(
            out.delivered.len() as f64 >= out.sent.len() as f64 * 0.6,
            "seed {seed}: too little delivered"
        );
    }
}

#[test]
fn bulk_recovers_after_a_black_hole() {
    for seed in seeds(60) {
        let (mut sc, victim) = random_scenario(seed);
        // Enough capacity left on the survivors for the offered load.
        sc.bulk_interval = ms(2);
        for l in &mut sc.links {
            l.loss = 0.0;
            l.carrier_down.clear();
            l.blackholes.clear();
            l.rate_bps = l.rate_bps.max(15_000_000);
        }
        sc.links[victim].blackholes.push((ms(4000), ms(9000)));
        let out = run(&sc);
        let got: HashSet<u64> = out.delivered.iter().map(|d| d.0).collect();
        // Bulk sent after detection (a second after the black hole began) arrives.
        let missing = out
            .sent
            .iter()
            .filter(|(s, (_, t))| *t >= ms(5000) && !got.contains(s))
            .count();
        assert_eq!(missing, 0, "seed {seed}: {missing} lost after detection");
        // What was in flight on the dying link went out again: almost nothing is lost
        // even while the black hole was being detected.
        let window = |t: &Duration| *t >= ms(3500) && *t < ms(5000);
        let around = out.sent.values().filter(|(_, t)| window(t)).count();
        let lost = out
            .sent
            .iter()
            .filter(|(s, (_, t))| window(t) && !got.contains(s))
            .count();
        assert!(
            lost * 100 <= around,
            "seed {seed}: {lost} of {around} lost around the fault: {}",
            out.sched
        );
    }
}

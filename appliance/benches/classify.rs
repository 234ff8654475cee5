//! Classifier cost: packets per second through classify + enqueue + dequeue on one core,
//! with the built-in rules, a few configured ones, a warm flow table of 1000 flows and a
//! DNS cache holding payment hosts. Run with `cargo bench -p stallnet --bench classify`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::PacketBuilder;
use stallnet::classes::core_rules;
use stallnet::core::classify::{Classifier, ClassifyConfig};
use stallnet::core::classify::{PortRange, Rule};
use stallnet::core::health::LinkState;
use stallnet::core::qos::ALL_CLASSES;
use stallnet::core::scheduler::{LinkView, Scheduler, SchedulerConfig};
use stallnet::core::Class;
use stallnet_netconf::classes::default_rules;

fn packets() -> Vec<Bytes> {
    (0..1000u32)
        .map(|i| {
            let mut out = Vec::new();
            let src = [10, 1, (i >> 8) as u8, i as u8];
            let b = PacketBuilder::ipv4(src, [198, 51, 100, (i % 200) as u8], 64);
            if i % 3 == 0 {
                b.udp(40000 + (i % 1000) as u16, 443)
                    .write(&mut out, &[0u8; 1200])
                    .expect("udp");
            } else {
                b.tcp(40000 + (i % 1000) as u16, 443, i, 65535)
                    .ack(1)
                    .write(&mut out, &[0u8; 1200])
                    .expect("tcp");
            }
            Bytes::from(out)
        })
        .collect()
}

fn rules() -> Vec<Rule> {
    let mut r = vec![
        Rule {
            class: Class::Guest,
            src: vec!["10.2.0.0/24".parse().expect("net")],
            ..Default::default()
        },
        Rule {
            class: Class::Stream,
            proto: vec![17],
            dst_port: vec![PortRange(5000, 5100)],
            ..Default::default()
        },
    ];
    r.extend(core_rules(&default_rules()));
    r
}

fn bench(c: &mut Criterion) {
    let pkts = packets();
    let mut g = c.benchmark_group("classify+enqueue+dequeue");
    g.throughput(Throughput::Elements(pkts.len() as u64));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("1000 packets, 1000 flows", |b| {
        let mut cl = Classifier::new(&rules(), ClassifyConfig::default());
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, z) = (s.add_link(), s.add_link());
        for (l, rtt) in [(a, 20), (z, 45)] {
            s.update_link(
                l,
                LinkView {
                    state: LinkState::Up,
                    srtt: Some(Duration::from_millis(rtt)),
                    ..LinkView::down()
                },
            );
        }
        b.iter(|| {
            let now = Instant::now();
            for p in &pkts {
                if let Ok(v) = cl.classify(p, now) {
                    s.enqueue(v.class, v.flow, p.clone(), now);
                }
                let _ = s.poll(a, ALL_CLASSES, now);
                let _ = s.poll(z, ALL_CLASSES, now);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

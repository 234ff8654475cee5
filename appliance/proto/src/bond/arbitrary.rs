//! Drives an edge and a hub [`BondState`] with an arbitrary sequence of inputs read from
//! bytes — datagrams and TUN packets of any content, link events, time jumps, polls — for
//! the fuzz target (`fuzz/fuzz_targets/bond.rs`) and the property tests: whatever comes
//! in, nothing panics and every timer the state names moves time forward.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{BondConfig, BondState, LinkEvent, Side, Transmit, TransportStats};
use crate::classify::{Classifier, ClassifyConfig, Rule};
use crate::qos::ALL_CLASSES;
use crate::scheduler::SchedulerConfig;

/// Reads bytes as input operations, front to back.
struct Ops<'a>(&'a [u8]);

impl Ops<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    fn bytes(&mut self) -> Option<Bytes> {
        let n = usize::from(self.byte()?).min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(Bytes::copy_from_slice(b))
    }
}

/// Runs `data` as a sequence of inputs into both sides of a bond of three uplinks; what
/// one side sends reaches the other (or is lost, as the input says). The edge classifies
/// with `rules`.
pub fn drive(data: &[u8], rules: &[Rule]) {
    let mut now = Instant::now();
    let new = |side: Side| {
        let mut st = BondState::new(
            BondConfig {
                side,
                sched: SchedulerConfig::default(),
                classifier: Classifier::new(rules, ClassifyConfig::default()),
                accept_src: (side == Side::Hub)
                    .then(|| vec!["10.1.0.0/24".parse().expect("a prefix")]),
                mtu: 1280,
            },
            now,
        );
        for i in 0..3 {
            st.add_link(&format!("l{i}"), i == 2, ALL_CLASSES, None, now);
        }
        st
    };
    let mut sides = [new(Side::Edge), new(Side::Hub)];
    let mut ops = Ops(data);
    while let Some(op) = ops.byte() {
        let s = usize::from(op >> 7);
        let link = usize::from((op >> 4) & 3);
        match op & 0x0f {
            0 => {
                if let Some(p) = ops.bytes() {
                    let _ = sides[s].handle_tun_packet(now, p, op & 0x40 != 0);
                }
            }
            1 => {
                if let Some(d) = ops.bytes() {
                    sides[s].handle_datagram(now, link, d);
                }
            }
            2 => sides[s].handle_link_event(
                now,
                link,
                LinkEvent::Connected {
                    peer_reads_delivered: op & 0x40 == 0,
                },
            ),
            3 => sides[s].handle_link_event(now, link, LinkEvent::Disconnected),
            4 => {
                let b = ops.byte().unwrap_or(0);
                let ev = LinkEvent::Carrier {
                    present: b & 1 != 0,
                    carrier: b & 2 != 0,
                };
                sides[s].handle_link_event(now, link, ev);
            }
            5 => {
                let b = u64::from(ops.byte().unwrap_or(0));
                let stats = TransportStats {
                    rtt: Duration::from_millis(b),
                    udp_tx_bytes: b << 20,
                    udp_rx_bytes: b << 19,
                    lost_bytes: b << 10,
                    udp_tx_datagrams: b << 10,
                    udp_tx_ios: b << 8,
                };
                sides[s].handle_link_event(now, link, LinkEvent::Stats(stats));
            }
            6 => {
                now += Duration::from_millis(u64::from(ops.byte().unwrap_or(0)) * 8);
                for side in &mut sides {
                    side.handle_timeout(now);
                    // What the state names next is never in the past.
                    assert!(side.poll_timeout().is_none_or(|t| t > now));
                }
            }
            7 => {
                // One side's uplink sends what it has; the other receives it unless the
                // input drops it.
                let lose = ops.byte().unwrap_or(0);
                let max = 200 + usize::from(lose) * 5;
                let mut n = 0;
                while let Transmit::Datagram(d) = sides[s].poll_transmit(now, link, max) {
                    if lose & (1 << (n % 8)) == 0 {
                        sides[1 - s].handle_datagram(now, link, d);
                    }
                    n += 1;
                    if n > 4096 {
                        break;
                    }
                }
            }
            8 => while sides[s].poll_tun().is_some() {},
            9 => while sides[s].poll_event().is_some() {},
            10 => sides[s].set_disabled(link, op & 0x40 != 0, now),
            11 => sides[s].set_verified(link, op & 0x40 != 0, now),
            12 => sides[s].set_backup(link, op & 0x40 != 0, now),
            13 => {
                let _ = sides[s].status(now);
            }
            14 => sides[s].remove_link(link, now),
            _ => {
                let _ = sides[s].peer_epoch(u64::from(op));
            }
        }
    }
}

//! The hub's address rewrite between a device's own LAN and its block of the hub's map
//! space: stalls flashed from one image share a LAN prefix, so the hub's kernel sees
//! each device's LAN at a block of its own (the blocks come from the config,
//! `stallnet_netconf::lan_map`). Packets from a device get their source moved into the
//! device's block before they reach the hub's TUN ([`LanMap::to_hub`]); packets read
//! from the TUN for that block get their destination moved back
//! ([`LanMap::to_device`]). The edge, its classifier and the hub's bond (spoof check,
//! mirrored classes, download rules) only ever see the device's own addresses.
//!
//! Checksums are updated incrementally (RFC 1624): the IPv4 header's, and TCP's and
//! UDP's (their pseudo-header holds the addresses). An ICMP error quotes the packet it
//! is about, whose addresses are the other way round: the quoted destination (towards
//! the hub) or source (towards the device) is moved too, so that path-MTU discovery and
//! unreachable errors reach the right socket. Anything that is not a well-formed IPv4
//! packet is left as it is.
//!
//! [`Routes`] finds the device a packet read from the hub's TUN is for, by binary search
//! over disjoint address ranges (tunnel addresses and blocks), so a hub of hundreds of
//! stalls does not walk a list per packet.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use crate::packet::checksum_adjust;

/// A LAN prefix and its block are not the same size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{lan} and its block {mapped} differ in size")]
pub struct SizeMismatch {
    pub lan: Ipv4Net,
    pub mapped: Ipv4Net,
}

/// One device's IPv4 LAN prefixes and their blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LanMap {
    pairs: Vec<(Ipv4Net, Ipv4Net)>,
}

impl LanMap {
    /// `(lan, block)` pairs; each block has its LAN prefix's length.
    pub fn new(pairs: impl IntoIterator<Item = (Ipv4Net, Ipv4Net)>) -> Result<Self, SizeMismatch> {
        let pairs: Vec<(Ipv4Net, Ipv4Net)> = pairs
            .into_iter()
            .map(|(l, m)| (l.trunc(), m.trunc()))
            .collect();
        if let Some(&(lan, mapped)) = pairs.iter().find(|(l, m)| l.prefix_len() != m.prefix_len()) {
            return Err(SizeMismatch { lan, mapped });
        }
        Ok(Self { pairs })
    }

    /// The device's own LAN prefixes.
    pub fn lans(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.pairs.iter().map(|(l, _)| *l)
    }

    /// The blocks, as the hub routes them into its TUN.
    pub fn blocks(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.pairs.iter().map(|(_, m)| *m)
    }

    /// Where the device's address `a` appears on the hub (None: not in its LAN).
    pub fn mapped(&self, a: Ipv4Addr) -> Option<Ipv4Addr> {
        self.pairs
            .iter()
            .find(|(l, _)| l.contains(&a))
            .map(|(l, m)| move_into(a, *l, *m))
    }

    /// The device's own address for `a` of its block (None: not in a block).
    pub fn real(&self, a: Ipv4Addr) -> Option<Ipv4Addr> {
        self.pairs
            .iter()
            .find(|(_, m)| m.contains(&a))
            .map(|(l, m)| move_into(a, *m, *l))
    }

    /// A packet from the device on its way into the hub's TUN: its source (and an ICMP
    /// error's quoted destination, also when the hub itself wrote the error) into the
    /// device's block. True when it changed.
    pub fn to_hub(&self, packet: &mut [u8]) -> bool {
        self.rewrite(packet, Side::Source, |a| self.mapped(a))
    }

    /// A packet read from the hub's TUN for the device: its destination (and an ICMP
    /// error's quoted source) back into the device's LAN. True when it changed.
    pub fn to_device(&self, packet: &mut [u8]) -> bool {
        self.rewrite(packet, Side::Destination, |a| self.real(a))
    }

    fn rewrite(
        &self,
        packet: &mut [u8],
        side: Side,
        f: impl Fn(Ipv4Addr) -> Option<Ipv4Addr>,
    ) -> bool {
        if self.pairs.is_empty() {
            return false;
        }
        let Some(ip) = Ipv4View::of(packet) else {
            return false;
        };
        let at = side.offset();
        let mut changed = false;
        if let Some(new) = f(addr_at(packet, at)) {
            set_addr(packet, at, new, &ip);
            changed = true;
        }
        let icmp_error = ip.proto == ICMP
            && ip.first_fragment
            && packet.get(ip.header_len).is_some_and(|&t| is_icmp_error(t));
        if icmp_error {
            // The quoted packet travelled the other way: its other address is ours.
            let quoted = ip.header_len + 8;
            let quote_changed = packet
                .get_mut(quoted..ip.total_len)
                .and_then(|inner| {
                    let q = Ipv4View::of_quoted(inner)?;
                    let qat = side.other().offset();
                    let qnew = f(addr_at(inner, qat))?;
                    set_addr(inner, qat, qnew, &q);
                    Some(())
                })
                .is_some();
            if quote_changed {
                let body = &mut packet[ip.header_len..ip.total_len];
                body[2..4].copy_from_slice(&[0, 0]);
                let sum = internet_checksum(body);
                body[2..4].copy_from_slice(&sum.to_be_bytes());
                changed = true;
            }
        }
        changed
    }
}

const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;

#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

impl Side {
    fn offset(self) -> usize {
        match self {
            Self::Source => 12,
            Self::Destination => 16,
        }
    }
    fn other(self) -> Self {
        match self {
            Self::Source => Self::Destination,
            Self::Destination => Self::Source,
        }
    }
}

/// What the rewrite needs of an IPv4 header that has been checked against the buffer.
struct Ipv4View {
    header_len: usize,
    /// The packet's length by its header, at most the buffer's (a quoted packet is cut).
    total_len: usize,
    proto: u8,
    /// Not a later fragment: the transport header is here.
    first_fragment: bool,
}

impl Ipv4View {
    fn of(p: &[u8]) -> Option<Self> {
        let v = Self::of_quoted(p)?;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        (total >= v.header_len && total <= p.len()).then_some(Self {
            total_len: total,
            ..v
        })
    }

    /// A header that may belong to a packet cut short (inside an ICMP error).
    fn of_quoted(p: &[u8]) -> Option<Self> {
        let first = *p.first()?;
        let header_len = usize::from(first & 0x0f) * 4;
        if first >> 4 != 4 || header_len < 20 || p.len() < header_len {
            return None;
        }
        let frag = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
        Some(Self {
            header_len,
            total_len: p.len(),
            proto: p[9],
            first_fragment: frag == 0,
        })
    }
}

fn is_icmp_error(kind: u8) -> bool {
    matches!(kind, 3 | 4 | 5 | 11 | 12)
}

fn addr_at(p: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3])
}

/// Writes `new` at `at` (12: source, 16: destination) and fixes the header's checksum and
/// the transport's (TCP, UDP) when its checksum field is inside the buffer.
fn set_addr(p: &mut [u8], at: usize, new: Ipv4Addr, ip: &Ipv4View) {
    let old = addr_at(p, at).octets();
    let new = new.octets();
    p[at..at + 4].copy_from_slice(&new);
    let words = |a: [u8; 4]| {
        [
            u16::from_be_bytes([a[0], a[1]]),
            u16::from_be_bytes([a[2], a[3]]),
        ]
    };
    let (ow, nw) = (words(old), words(new));
    let fix = |p: &mut [u8], ck: usize, zero_is_none: bool| {
        let Some(field) = p.get(ck..ck + 2) else {
            return;
        };
        let mut sum = u16::from_be_bytes([field[0], field[1]]);
        if zero_is_none && sum == 0 {
            return; // UDP without a checksum
        }
        for (o, n) in ow.iter().zip(nw) {
            sum = checksum_adjust(sum, *o, n);
        }
        if zero_is_none && sum == 0 {
            sum = 0xffff;
        }
        p[ck..ck + 2].copy_from_slice(&sum.to_be_bytes());
    };
    fix(p, 10, false);
    if ip.first_fragment {
        match ip.proto {
            TCP => fix(p, ip.header_len + 16, false),
            UDP => fix(p, ip.header_len + 6, true),
            _ => {}
        }
    }
}

/// The Internet checksum of `data` (RFC 1071).
fn internet_checksum(data: &[u8]) -> u16 {
    let mut acc: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(u16::from_be_bytes([*last, 0]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// `a` of `from` at the same offset in `to` (same length).
fn move_into(a: Ipv4Addr, from: Ipv4Net, to: Ipv4Net) -> Ipv4Addr {
    let host = u32::from(a) & !u32::from(from.netmask());
    Ipv4Addr::from(u32::from(to.network()) | host)
}

/// Which device an address read from the hub's TUN belongs to.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// Disjoint IPv4 ranges (first, last, device, the prefix), sorted by first.
    v4: Vec<(u32, u32, usize, Ipv4Net)>,
    /// IPv6 LAN prefixes (few; routed as they are).
    v6: Vec<(IpNet, usize)>,
}

/// Two prefixes given to [`Routes::new`] overlap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} overlaps {1}")]
pub struct Overlap(pub IpNet, pub IpNet);

impl Routes {
    /// `(prefix, device)`: the devices' tunnel addresses (as /32), their blocks and their
    /// IPv6 LAN prefixes. Overlapping IPv4 prefixes are refused.
    pub fn new(entries: impl IntoIterator<Item = (IpNet, usize)>) -> Result<Self, Overlap> {
        let mut r = Self::default();
        for (net, dev) in entries {
            match net {
                IpNet::V4(n) => {
                    let n = n.trunc();
                    r.v4.push((u32::from(n.network()), u32::from(n.broadcast()), dev, n));
                }
                IpNet::V6(_) => r.v6.push((net.trunc(), dev)),
            }
        }
        r.v4.sort_unstable_by_key(|e| e.0);
        if let Some(w) = r.v4.windows(2).find(|w| w[1].0 <= w[0].1) {
            return Err(Overlap(IpNet::V4(w[0].3), IpNet::V4(w[1].3)));
        }
        Ok(r)
    }

    /// The device `dst` is for.
    pub fn lookup(&self, dst: IpAddr) -> Option<usize> {
        match dst {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                let i = self.v4.partition_point(|e| e.0 <= a).checked_sub(1)?;
                let (_, last, dev, _) = self.v4[i];
                (a <= last).then_some(dev)
            }
            IpAddr::V6(_) => self.v6.iter().find(|(n, _)| n.contains(&dst)).map(|e| e.1),
        }
    }
}

#[cfg(test)]
mod tests;

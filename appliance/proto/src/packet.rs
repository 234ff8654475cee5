//! Small edits and facts about IP packets on the tunnel path: addresses, TCP MSS clamping
//! on SYNs, ICMP "too big" answers for packets that do not fit, and the fail-fast answers
//! given while offline (a TCP RST for a SYN, ICMP unreachable for UDP).

use std::net::IpAddr;

use etherparse::{Icmpv4Type, Icmpv6Type, IpNumber, Ipv4Header, Ipv6Header, PacketBuilder};

/// Source and destination address of an IPv4 or IPv6 packet, or None if it is not one.
pub fn addrs(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let s: [u8; 4] = packet[12..16].try_into().ok()?;
            let d: [u8; 4] = packet[16..20].try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        6 if packet.len() >= 40 => {
            let s: [u8; 16] = packet[8..24].try_into().ok()?;
            let d: [u8; 16] = packet[24..40].try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        _ => None,
    }
}

/// True for a packet that cannot leave its link: an IPv6 link-local or unspecified
/// source, or a link-scoped multicast destination (the TUN device's own router
/// solicitations and MLD reports). Such a packet is not for the tunnel.
pub fn link_scoped(src: IpAddr, dst: IpAddr) -> bool {
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let link_local = |a: std::net::Ipv6Addr| a.segments()[0] & 0xffc0 == 0xfe80;
            link_local(s)
                || s.is_unspecified()
                || (d.is_multicast() && d.segments()[0] & 0x000f <= 2)
        }
        _ => false,
    }
}

/// Lowers the MSS option of a TCP SYN to `max_mss` in place, fixing the checksum.
/// Returns true when the packet was changed. Anything that is not a well-formed TCP SYN
/// with an MSS option is left alone.
pub fn clamp_mss(packet: &mut [u8], max_mss: u16) -> bool {
    let Some(tcp_off) = tcp_offset(packet) else {
        return false;
    };
    let Some(tcp) = packet.get(tcp_off..) else {
        return false; // header length points past the end
    };
    if tcp.len() < 20 || tcp[13] & 0x02 == 0 {
        return false; // not a SYN
    }
    let hdr_len = usize::from(tcp[12] >> 4) * 4;
    if hdr_len < 20 || hdr_len > tcp.len() {
        return false;
    }
    let mut i = 20;
    while i < hdr_len {
        match packet[tcp_off + i] {
            0 => return false,
            1 => i += 1,
            kind => {
                let Some(&len) = packet.get(tcp_off + i + 1) else {
                    return false;
                };
                let len = usize::from(len);
                if len < 2 || i + len > hdr_len {
                    return false;
                }
                if kind == 2 && len == 4 {
                    let at = tcp_off + i + 2;
                    let old = u16::from_be_bytes([packet[at], packet[at + 1]]);
                    if old <= max_mss {
                        return false;
                    }
                    packet[at..at + 2].copy_from_slice(&max_mss.to_be_bytes());
                    let ck = tcp_off + 16;
                    let sum = u16::from_be_bytes([packet[ck], packet[ck + 1]]);
                    let sum = checksum_adjust(sum, old, max_mss);
                    packet[ck..ck + 2].copy_from_slice(&sum.to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

/// RFC 1624 incremental checksum update for one 16-bit word changing `old` → `new`.
pub(crate) fn checksum_adjust(sum: u16, old: u16, new: u16) -> u16 {
    let mut acc = u32::from(!sum) + u32::from(!old) + u32::from(new);
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Offset of the TCP header in an unfragmented IPv4/IPv6 packet, if it carries TCP.
fn tcp_offset(packet: &[u8]) -> Option<usize> {
    match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x1fff;
            (ihl >= 20 && packet.get(9) == Some(&6) && frag == 0).then_some(ihl)
        }
        6 => (packet.get(6) == Some(&6)).then_some(40),
        _ => None,
    }
}

/// True for ICMPv4 error messages, which never get an ICMP error in reply (RFC 1812).
fn is_icmpv4_error(packet: &[u8], ip: &Ipv4Header) -> bool {
    ip.protocol == IpNumber::ICMP
        && packet
            .get(ip.header_len())
            .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12))
}

/// Builds the ICMP answer telling the sender of `packet` that at most `mtu` bytes fit:
/// IPv4 "fragmentation needed" (only for DF packets) or IPv6 "packet too big". The answer
/// comes from `from` (the tunnel address). None when no answer is due.
pub fn too_big_reply(packet: &[u8], mtu: u16, from: IpAddr) -> Option<Vec<u8>> {
    let quote_len = packet.len().min(548);
    let quote = &packet[..quote_len];
    match packet.first()? >> 4 {
        4 => {
            let (ip, _) = Ipv4Header::from_slice(packet).ok()?;
            if !ip.dont_fragment || is_icmpv4_error(packet, &ip) {
                return None;
            }
            let IpAddr::V4(src) = from else { return None };
            let b = PacketBuilder::ipv4(src.octets(), ip.source, 64).icmpv4(
                Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: mtu,
                    },
                ),
            );
            let mut out = Vec::with_capacity(b.size(quote.len()));
            b.write(&mut out, quote).ok()?;
            Some(out)
        }
        6 => {
            let (ip, _) = Ipv6Header::from_slice(packet).ok()?;
            let IpAddr::V6(src) = from else { return None };
            let b =
                PacketBuilder::ipv6(src.octets(), ip.source, 64).icmpv6(Icmpv6Type::PacketTooBig {
                    mtu: u32::from(mtu),
                });
            let mut out = Vec::with_capacity(b.size(quote.len()));
            b.write(&mut out, quote).ok()?;
            Some(out)
        }
        _ => None,
    }
}

/// The answer that makes a LAN application give up at once while nothing reaches the
/// internet: a RST (with ACK) for a TCP SYN, as if from the destination; an ICMP
/// unreachable (from `from`) for UDP. None for anything else (no answer to an answer).
pub fn offline_reply(packet: &[u8], from: IpAddr) -> Option<Vec<u8>> {
    let ip = etherparse::IpSlice::from_slice(packet).ok()?;
    let p = ip.payload();
    if p.fragmented {
        return None;
    }
    match p.ip_number {
        IpNumber::TCP => {
            let t = etherparse::TcpSlice::from_slice(p.payload).ok()?;
            if !t.syn() || t.ack() || t.rst() {
                return None;
            }
            let ack = t.sequence_number().wrapping_add(1);
            let b = match (ip.destination_addr(), ip.source_addr()) {
                (IpAddr::V4(d), IpAddr::V4(s)) => PacketBuilder::ipv4(d.octets(), s.octets(), 64),
                (IpAddr::V6(d), IpAddr::V6(s)) => PacketBuilder::ipv6(d.octets(), s.octets(), 64),
                _ => return None,
            };
            let b = b
                .tcp(t.destination_port(), t.source_port(), 0, 0)
                .rst()
                .ack(ack);
            let mut out = Vec::with_capacity(b.size(0));
            b.write(&mut out, &[]).ok()?;
            Some(out)
        }
        IpNumber::UDP => {
            let quote = &packet[..packet.len().min(548)];
            match (from, ip.source_addr()) {
                (IpAddr::V4(f), IpAddr::V4(s)) => {
                    let b = PacketBuilder::ipv4(f.octets(), s.octets(), 64).icmpv4(
                        Icmpv4Type::DestinationUnreachable(
                            etherparse::icmpv4::DestUnreachableHeader::Host,
                        ),
                    );
                    let mut out = Vec::with_capacity(b.size(quote.len()));
                    b.write(&mut out, quote).ok()?;
                    Some(out)
                }
                (IpAddr::V6(f), IpAddr::V6(s)) => {
                    let b = PacketBuilder::ipv6(f.octets(), s.octets(), 64).icmpv6(
                        Icmpv6Type::DestinationUnreachable(
                            etherparse::icmpv6::DestUnreachableCode::Address,
                        ),
                    );
                    let mut out = Vec::with_capacity(b.size(quote.len()));
                    b.write(&mut out, quote).ok()?;
                    Some(out)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{SlicedPacket, TcpOptionElement, TransportSlice};

    fn syn(mss: u16) -> Vec<u8> {
        let b = PacketBuilder::ipv4([10, 1, 0, 2], [198, 18, 0, 1], 64)
            .tcp(40000, 443, 1, 65535)
            .syn()
            .options(&[
                TcpOptionElement::MaximumSegmentSize(mss),
                TcpOptionElement::Noop,
                TcpOptionElement::WindowScale(7),
            ])
            .expect("options");
        let mut v = Vec::new();
        b.write(&mut v, &[]).expect("write");
        v
    }

    fn mss_and_checksum_ok(p: &[u8]) -> (u16, bool) {
        let s = SlicedPacket::from_ip(p).expect("parse");
        let Some(TransportSlice::Tcp(tcp)) = s.transport else {
            panic!("tcp")
        };
        let mss = tcp
            .options_iterator()
            .find_map(|o| match o {
                Ok(TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
                _ => None,
            })
            .expect("mss");
        let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
            panic!("v4")
        };
        let expect = tcp
            .to_header()
            .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
            .expect("sum");
        (mss, expect == tcp.checksum())
    }

    #[test]
    fn syn_mss_is_clamped_with_a_valid_checksum() {
        let mut p = syn(1460);
        assert!(clamp_mss(&mut p, 1200));
        assert_eq!(mss_and_checksum_ok(&p), (1200, true));
        let mut q = syn(1000);
        assert!(!clamp_mss(&mut q, 1200));
        assert_eq!(mss_and_checksum_ok(&q), (1000, true));
    }

    #[test]
    fn a_header_length_past_the_end_is_left_alone() {
        // Found by the fuzzer: IHL 15 (60 bytes) in a 16-byte packet claiming TCP.
        let mut p = vec![0x4f, 0, 0, 16, 0, 0, 0, 0, 64, 6, 0, 0, 10, 1, 0, 2];
        assert!(!clamp_mss(&mut p, 1200));
        let mut v6 = vec![0x60, 0, 0, 0, 0, 0, 6, 64];
        assert!(!clamp_mss(&mut v6, 1200));
    }

    #[test]
    fn link_scoped_packets_are_told_apart() {
        let a = |s: &str| s.parse::<IpAddr>().expect("test address");
        assert!(link_scoped(a("fe80::1"), a("ff02::2")));
        assert!(link_scoped(a("::"), a("ff02::16")));
        assert!(link_scoped(a("2001:db8::5"), a("ff02::1")));
        assert!(!link_scoped(a("2001:db8::5"), a("2001:db8:1::1")));
        assert!(!link_scoped(a("2001:db8::5"), a("ff0e::1")));
        assert!(!link_scoped(a("10.1.0.2"), a("224.0.0.1")));
    }

    #[test]
    fn garbage_is_left_alone() {
        for len in 0..80 {
            let mut junk: Vec<u8> = (0..len).map(|i| (i * 37 + 0x45) as u8).collect();
            let _ = clamp_mss(&mut junk, 1200);
            let _ = addrs(&junk);
            let _ = too_big_reply(&junk, 1200, IpAddr::from([10, 99, 0, 2]));
        }
    }

    #[test]
    fn echo_requests_get_an_answer_but_icmp_errors_do_not() {
        let mut echo = Vec::new();
        let b = PacketBuilder::ipv4([10, 1, 0, 2], [198, 18, 0, 1], 64).icmpv4_echo_request(1, 1);
        b.write(&mut echo, &[0u8; 100]).expect("write");
        let from = IpAddr::from([10, 99, 0, 2]);
        assert!(too_big_reply(&echo, 1270, from).is_some());
        let reply = too_big_reply(&syn(1460), 1270, from).expect("reply");
        assert!(
            too_big_reply(&reply, 1270, from).is_none(),
            "no error about an error"
        );
    }

    #[test]
    fn too_big_quotes_the_packet_back_to_its_sender() {
        let p = syn(1460);
        let r = too_big_reply(&p, 1270, IpAddr::from([10, 99, 0, 2])).expect("reply");
        let s = SlicedPacket::from_ip(&r).expect("parse");
        let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
            panic!("v4")
        };
        assert_eq!(ip.header().destination(), [10, 1, 0, 2]);
        let Some(TransportSlice::Icmpv4(icmp)) = s.transport else {
            panic!("icmp")
        };
        assert!(matches!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1270
                }
            )
        ));
    }

    #[test]
    fn offline_answers_a_syn_with_a_reset_and_udp_with_unreachable() {
        let from = IpAddr::from([10, 1, 0, 1]);
        let rst = offline_reply(&syn(1460), from).expect("rst");
        let p = SlicedPacket::from_ip(&rst).expect("parse");
        let Some(TransportSlice::Tcp(t)) = p.transport else {
            panic!("tcp")
        };
        assert!(t.rst() && t.ack());
        assert_eq!((t.source_port(), t.destination_port()), (443, 40000));
        assert_eq!(t.acknowledgment_number(), 2);
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!("v4")
        };
        assert_eq!(ip.header().source(), [198, 18, 0, 1]);
        // Not for a RST or an established segment.
        assert_eq!(offline_reply(&rst, from), None);
        let mut udp = Vec::new();
        PacketBuilder::ipv4([10, 1, 0, 2], [198, 18, 0, 1], 64)
            .udp(5000, 53)
            .write(&mut udp, &[1, 2, 3])
            .expect("udp");
        let icmp = offline_reply(&udp, from).expect("icmp");
        let p = SlicedPacket::from_ip(&icmp).expect("parse");
        assert!(matches!(p.transport, Some(TransportSlice::Icmpv4(_))));
        // Garbage gets nothing.
        assert_eq!(offline_reply(&[0x45, 0, 0], from), None);
    }
}

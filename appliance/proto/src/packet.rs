//! Small edits and facts about IP packets on the tunnel path: addresses, TCP MSS clamping
//! on SYNs, ICMP "too big" answers and IPv4 fragmentation for packets that do not fit, and
//! the fail-fast answers given while offline (a TCP RST for a SYN, ICMP unreachable for
//! UDP).

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

/// Lowers the MSS option of a TCP SYN in place, fixing the checksum, so that the flow's
/// segments fit in `mtu`-byte IP packets (the MSS leaves room for an IPv4 header of 20
/// bytes or an IPv6 header of 40, and a TCP header of 20). Returns true when the packet
/// was changed. Anything that is not a well-formed TCP SYN with an MSS option is left
/// alone.
pub fn clamp_mss(packet: &mut [u8], mtu: u16) -> bool {
    let Some(tcp_off) = tcp_offset(packet) else {
        return false;
    };
    let ip_header = if packet[0] >> 4 == 6 { 40 } else { 20 };
    let max_mss = mtu.saturating_sub(ip_header + 20);
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

/// Why [`fragment_v4`] would not cut a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfragmentable {
    /// IPv6, or IPv4 with "don't fragment": the sender must be told the size instead.
    DontFragment,
    /// Not a well-formed IPv4 packet, or the size leaves no room for data.
    Malformed,
}

/// Cuts an IPv4 packet without "don't fragment" into fragments of at most `mtu` bytes
/// (RFC 791): each carries a copy of the header (of the options, only those marked to be
/// copied go past the first), its offset, and "more fragments" on all but the last,
/// which keeps the original's (the packet may itself be a fragment). A packet that
/// already fits comes back whole.
pub fn fragment_v4(packet: &[u8], mtu: usize) -> Result<Vec<Vec<u8>>, Unfragmentable> {
    use Unfragmentable::{DontFragment, Malformed};
    match packet.first().map(|b| b >> 4) {
        Some(4) => {}
        Some(6) => return Err(DontFragment),
        _ => return Err(Malformed),
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([
        *packet.get(2).ok_or(Malformed)?,
        *packet.get(3).ok_or(Malformed)?,
    ]));
    if ihl < 20 || total < ihl || total > packet.len() {
        return Err(Malformed);
    }
    let flags_offset = u16::from_be_bytes([packet[6], packet[7]]);
    if flags_offset & 0x4000 != 0 {
        return Err(DontFragment);
    }
    let packet = &packet[..total];
    if total <= mtu {
        return Ok(vec![packet.to_vec()]);
    }
    let (header, payload) = packet.split_at(ihl);
    let later_header = copied_options(header);
    // Every fragment but the last carries a multiple of 8 bytes of data; the later
    // headers may be shorter than the first, never longer.
    let room = |h: usize| mtu.checked_sub(h).map(|r| r & !7).filter(|r| *r > 0);
    let first_room = room(ihl).ok_or(Malformed)?;
    let later_room = room(later_header.len()).ok_or(Malformed)?;
    let more_after = flags_offset & 0x2000 != 0;
    let base = usize::from(flags_offset & 0x1fff) * 8;
    let mut out = Vec::with_capacity(payload.len() / later_room + 2);
    let mut at = 0;
    while at < payload.len() {
        let h: &[u8] = if at == 0 { header } else { &later_header };
        let take = (if at == 0 { first_room } else { later_room }).min(payload.len() - at);
        let last = at + take == payload.len();
        let offset = u16::try_from((base + at) / 8)
            .ok()
            .filter(|o| *o <= 0x1fff)
            .ok_or(Malformed)?;
        let len = u16::try_from(h.len() + take).map_err(|_| Malformed)?;
        let mut f = Vec::with_capacity(h.len() + take);
        f.extend_from_slice(h);
        f.extend_from_slice(&payload[at..at + take]);
        f[0] = 0x40 | (h.len() / 4) as u8;
        f[2..4].copy_from_slice(&len.to_be_bytes());
        let mf = if last && !more_after { 0 } else { 0x2000 };
        f[6..8].copy_from_slice(&(mf | offset).to_be_bytes());
        f[10..12].fill(0);
        let sum = header_checksum(&f[..h.len()]);
        f[10..12].copy_from_slice(&sum.to_be_bytes());
        out.push(f);
        at += take;
    }
    Ok(out)
}

/// The IPv4 header for fragments after the first: the fixed 20 bytes and the options
/// marked "copied", padded to a multiple of 4.
fn copied_options(header: &[u8]) -> Vec<u8> {
    let mut h = header[..20].to_vec();
    let mut i = 20;
    while i < header.len() {
        match header[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let len = header.get(i + 1).map_or(0, |l| usize::from(*l));
                if len < 2 || i + len > header.len() {
                    break;
                }
                if kind & 0x80 != 0 {
                    h.extend_from_slice(&header[i..i + len]);
                }
                i += len;
            }
        }
    }
    while h.len() % 4 != 0 {
        h.push(0);
    }
    h
}

/// The IPv4 header checksum of `header` (its checksum field zeroed).
fn header_checksum(header: &[u8]) -> u16 {
    let mut acc: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
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
        assert!(clamp_mss(&mut p, 1240));
        assert_eq!(mss_and_checksum_ok(&p), (1200, true));
        let mut q = syn(1000);
        assert!(!clamp_mss(&mut q, 1240));
        assert_eq!(mss_and_checksum_ok(&q), (1000, true));
    }

    #[test]
    fn an_ipv6_syn_leaves_room_for_the_longer_header() {
        let b = PacketBuilder::ipv6([0x20; 16], [0x30; 16], 64)
            .tcp(40000, 443, 1, 65535)
            .syn()
            .options(&[TcpOptionElement::MaximumSegmentSize(1440)])
            .expect("options");
        let mut p = Vec::new();
        b.write(&mut p, &[]).expect("write");
        assert!(clamp_mss(&mut p, 1400));
        let s = SlicedPacket::from_ip(&p).expect("parse");
        let Some(TransportSlice::Tcp(tcp)) = s.transport else {
            panic!("tcp")
        };
        let mss = tcp.options_iterator().find_map(|o| match o {
            Ok(TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
            _ => None,
        });
        assert_eq!(mss, Some(1340));
    }

    fn udp(len: usize, dont_fragment: bool) -> Vec<u8> {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let b = PacketBuilder::ipv4([10, 1, 0, 2], [198, 18, 0, 1], 64).udp(5000, 4000);
        let mut p = Vec::new();
        b.write(&mut p, &payload).expect("udp");
        if dont_fragment {
            p[6] |= 0x40;
        } else {
            p[6] &= !0x40;
        }
        p[10..12].fill(0);
        let sum = header_checksum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p
    }

    /// The fragments' payloads in offset order, checking each header on the way; and
    /// whether the last one says more follow.
    fn reassemble(frags: &[Vec<u8>], mtu: usize) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut more = true;
        for f in frags {
            assert!(f.len() <= mtu, "{} > {mtu}", f.len());
            let (h, rest) = Ipv4Header::from_slice(f).expect("header");
            assert_eq!(h.calc_header_checksum(), h.header_checksum, "checksum");
            assert_eq!(usize::from(h.total_len), f.len());
            assert_eq!(
                usize::from(h.fragment_offset.value()) * 8,
                out.len(),
                "offset"
            );
            assert!(!h.dont_fragment);
            more = h.more_fragments;
            out.extend_from_slice(rest);
        }
        (out, more)
    }

    #[test]
    fn a_packet_without_dont_fragment_is_cut_to_fit() {
        let p = udp(3000, false);
        for mtu in [576, 1280, 1424] {
            let frags = fragment_v4(&p, mtu).expect("fragments");
            assert!(frags.len() > 1);
            for f in &frags[..frags.len() - 1] {
                assert_eq!(
                    (f.len() - 20) % 8,
                    0,
                    "a middle fragment's data is whole 8-byte units"
                );
            }
            let (payload, more) = reassemble(&frags, mtu);
            assert_eq!(payload, p[20..], "mtu {mtu}");
            assert!(!more, "the last fragment ends the packet");
        }
        // One that fits comes back whole.
        assert_eq!(fragment_v4(&p, 4000), Ok(vec![p.clone()]));
    }

    #[test]
    fn a_fragment_cut_again_keeps_its_place_and_its_more_flag() {
        let p = udp(3000, false);
        let frags = fragment_v4(&p, 1500).expect("fragments");
        let again: Vec<Vec<u8>> = frags
            .iter()
            .flat_map(|f| fragment_v4(f, 600).expect("again"))
            .collect();
        let (payload, more) = reassemble(&again, 600);
        assert_eq!(payload, p[20..]);
        assert!(!more);
    }

    #[test]
    fn only_copied_options_follow_the_first_fragment() {
        let mut p = udp(2000, false);
        // 8 bytes of options: a copied one (kind 0x82, 4 bytes), a record route stub
        // (kind 7, not copied, 3 bytes), end of list.
        let opts = [0x82, 4, 0xaa, 0xbb, 7, 3, 4, 0];
        p.splice(20..20, opts);
        p[0] = 0x47;
        let total = u16::try_from(p.len()).expect("len");
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[10..12].fill(0);
        let sum = header_checksum(&p[..28]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        let frags = fragment_v4(&p, 1000).expect("fragments");
        assert_eq!(&frags[0][20..28], &opts);
        for f in &frags[1..] {
            assert_eq!(f[0], 0x46);
            assert_eq!(&f[20..24], &opts[..4]);
        }
        let (payload, _) = reassemble(&frags, 1000);
        assert_eq!(payload, p[28..]);
    }

    #[test]
    fn dont_fragment_ipv6_and_garbage_are_not_cut() {
        assert_eq!(
            fragment_v4(&udp(3000, true), 1400),
            Err(Unfragmentable::DontFragment)
        );
        let mut v6 = Vec::new();
        PacketBuilder::ipv6([0x20; 16], [0x30; 16], 64)
            .udp(1, 2)
            .write(&mut v6, &[0; 2000])
            .expect("v6");
        assert_eq!(fragment_v4(&v6, 1400), Err(Unfragmentable::DontFragment));
        // No room for 8 bytes of data behind the header.
        assert_eq!(
            fragment_v4(&udp(100, false), 27),
            Err(Unfragmentable::Malformed)
        );
        // A total length past the end.
        let mut short = udp(100, false);
        short.truncate(60);
        assert_eq!(fragment_v4(&short, 40), Err(Unfragmentable::Malformed));
        assert_eq!(fragment_v4(&[], 1400), Err(Unfragmentable::Malformed));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_cut_or_refused_and_cuts_fit(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            mtu in 0usize..2000,
        ) {
            if let Ok(frags) = fragment_v4(&bytes, mtu) {
                if frags.len() > 1 {
                    for f in &frags {
                        proptest::prop_assert!(f.len() <= mtu);
                        let (h, _) = Ipv4Header::from_slice(f).expect("a fragment's header");
                        proptest::prop_assert_eq!(h.calc_header_checksum(), h.header_checksum);
                    }
                }
            }
        }

        #[test]
        fn any_udp_packet_reassembles_from_its_fragments(len in 0usize..4000, mtu in 68usize..1500) {
            let p = udp(len, false);
            let frags = fragment_v4(&p, mtu).expect("fragments");
            let (payload, more) = reassemble(&frags, mtu);
            proptest::prop_assert_eq!(&payload[..], &p[20..]);
            proptest::prop_assert!(!more);
        }
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
            let _ = fragment_v4(&junk, 40);
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

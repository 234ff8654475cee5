//! The rewrite against packets built by etherparse, checksums verified from scratch.

use super::*;
use etherparse::PacketBuilder;
use proptest::prelude::*;

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("test value")
}

/// Stall 2's map: its 10.1.0.0/24 LAN at 10.100.1.0/24 on the hub.
fn map() -> LanMap {
    LanMap::new([(net("10.1.0.0/24"), net("10.100.1.0/24"))]).expect("test value")
}

fn tcp(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64).tcp(40000, 443, 7, 65535);
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("test value");
    out
}

fn udp(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64).udp(5353, 53);
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("test value");
    out
}

fn ipv4_header_ok(p: &[u8]) -> bool {
    let hl = usize::from(p[0] & 0x0f) * 4;
    internet_checksum(&p[..hl]) == 0
}

/// The TCP or UDP checksum over the pseudo-header and segment is valid.
fn l4_ok(p: &[u8]) -> bool {
    let hl = usize::from(p[0] & 0x0f) * 4;
    let seg = &p[hl..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&p[12..20]);
    pseudo.extend_from_slice(&[0, p[9]]);
    pseudo.extend_from_slice(&u16::try_from(seg.len()).expect("test value").to_be_bytes());
    pseudo.extend_from_slice(seg);
    internet_checksum(&pseudo) == 0
}

#[test]
fn a_device_packet_moves_into_its_block_and_back_with_valid_checksums() {
    let m = map();
    let orig = tcp([10, 1, 0, 20], [198, 18, 0, 1], b"card payment");
    let mut p = orig.clone();
    assert!(m.to_hub(&mut p));
    assert_eq!(&p[12..16], &[10, 100, 1, 20]);
    assert_eq!(&p[16..20], &[198, 18, 0, 1]);
    assert!(ipv4_header_ok(&p) && l4_ok(&p));

    // The answer, read from the hub's TUN, goes back to the device's own address.
    let mut r = tcp([198, 18, 0, 1], [10, 100, 1, 20], b"approved");
    assert!(m.to_device(&mut r));
    assert_eq!(&r[16..20], &[10, 1, 0, 20]);
    assert!(ipv4_header_ok(&r) && l4_ok(&r));

    // There and back is the packet as it was.
    let mut back = p.clone();
    // Moving the source back is the reverse map on the source side.
    let rev = LanMap::new([(net("10.100.1.0/24"), net("10.1.0.0/24"))]).expect("test value");
    assert!(rev.to_hub(&mut back));
    assert_eq!(back, orig);
}

#[test]
fn udp_keeps_a_missing_checksum_missing() {
    let m = map();
    let mut p = udp([10, 1, 0, 2], [198, 18, 0, 1], b"query");
    let hl = 20;
    p[hl + 6..hl + 8].copy_from_slice(&[0, 0]);
    assert!(m.to_hub(&mut p));
    assert_eq!(&p[hl + 6..hl + 8], &[0, 0]);
    assert!(ipv4_header_ok(&p));

    let mut q = udp([10, 1, 0, 2], [198, 18, 0, 1], b"query");
    assert!(m.to_hub(&mut q));
    assert!(l4_ok(&q));
}

#[test]
fn addresses_outside_the_lan_or_block_are_left_alone() {
    let m = map();
    // The device's tunnel address is routed as it is.
    let orig = tcp([10, 99, 0, 3], [198, 18, 0, 1], b"outbox");
    let mut p = orig.clone();
    assert!(!m.to_hub(&mut p));
    assert_eq!(p, orig);
    let orig = tcp([198, 18, 0, 1], [10, 1, 0, 20], b"x");
    let mut p = orig.clone();
    assert!(
        !m.to_device(&mut p),
        "a real LAN address is not a block address"
    );
    assert_eq!(p, orig);
    // No map at all (a device with an IPv6 LAN only).
    let mut p = tcp([10, 1, 0, 20], [198, 18, 0, 1], b"x");
    assert!(!LanMap::default().to_hub(&mut p));
}

#[test]
fn an_icmp_error_for_the_device_has_its_quote_moved_back_too() {
    let m = map();
    // What the device sent, as the internet saw it (source in the block)…
    let mut sent = tcp([10, 100, 1, 20], [198, 18, 0, 1], &[0u8; 64]);
    // …and the router's "fragmentation needed" about it, to the block address.
    let b = PacketBuilder::ipv4([198, 18, 0, 254], [10, 100, 1, 20], 64).icmpv4(
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1200 },
        ),
    );
    sent.truncate(48);
    let mut err = Vec::new();
    b.write(&mut err, &sent).expect("test value");
    assert!(m.to_device(&mut err));
    assert_eq!(&err[16..20], &[10, 1, 0, 20], "outer destination");
    let inner = &err[28..];
    assert_eq!(&inner[12..16], &[10, 1, 0, 20], "quoted source");
    assert!(ipv4_header_ok(&err) && ipv4_header_ok(inner));
    assert_eq!(internet_checksum(&err[20..]), 0, "ICMP checksum");
}

#[test]
fn the_hubs_own_too_big_about_a_download_quotes_the_block_address() {
    let m = map();
    // A download, as the device's bond holds it (after `to_device`)…
    let mut download = tcp([198, 18, 0, 1], [10, 1, 0, 20], &[0u8; 64]);
    download.truncate(48);
    // …and the hub's "fragmentation needed" about it, from the hub's tunnel address.
    let b = PacketBuilder::ipv4([10, 99, 0, 1], [198, 18, 0, 1], 64).icmpv4(
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1200 },
        ),
    );
    let mut err = Vec::new();
    b.write(&mut err, &download).expect("test value");
    assert!(m.to_hub(&mut err));
    assert_eq!(&err[12..16], &[10, 99, 0, 1], "the hub's own source stays");
    assert_eq!(
        &err[28 + 16..28 + 20],
        &[10, 100, 1, 20],
        "quoted destination"
    );
    assert!(ipv4_header_ok(&err) && ipv4_header_ok(&err[28..]));
    assert_eq!(internet_checksum(&err[20..]), 0, "ICMP checksum");
}

#[test]
fn an_echo_payload_that_looks_like_a_packet_is_not_touched() {
    let m = map();
    let quote = tcp([10, 100, 1, 20], [198, 18, 0, 1], b"");
    let b = PacketBuilder::ipv4([198, 18, 0, 1], [10, 100, 1, 20], 64).icmpv4_echo_request(1, 1);
    let mut echo = Vec::new();
    b.write(&mut echo, &quote).expect("test value");
    let before = echo[28..].to_vec();
    assert!(m.to_device(&mut echo));
    assert_eq!(echo[28..], before[..]);
    assert_eq!(internet_checksum(&echo[20..]), 0);
}

#[test]
fn a_later_fragment_changes_in_its_header_only() {
    let m = map();
    let mut p = udp([10, 1, 0, 2], [198, 18, 0, 1], &[0xab; 40]);
    p[6..8].copy_from_slice(&(0x0010u16).to_be_bytes()); // offset 128 bytes
    p[10..12].copy_from_slice(&[0, 0]);
    let sum = internet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    let body = p[20..].to_vec();
    assert!(m.to_hub(&mut p));
    assert!(ipv4_header_ok(&p));
    assert_eq!(p[20..], body[..]);
}

#[test]
fn sizes_must_match() {
    assert!(LanMap::new([(net("10.1.0.0/24"), net("10.100.0.0/23"))]).is_err());
}

#[test]
fn routes_find_tunnel_addresses_blocks_and_ipv6_prefixes() {
    let r = Routes::new([
        ("10.99.0.2/32".parse().expect("test value"), 0),
        ("10.99.0.3/32".parse().expect("test value"), 1),
        ("10.100.0.0/24".parse().expect("test value"), 0),
        ("10.100.1.0/24".parse().expect("test value"), 1),
        ("fd00:1::/64".parse().expect("test value"), 1),
    ])
    .expect("test value");
    let at = |s: &str| r.lookup(s.parse().expect("test value"));
    assert_eq!(at("10.99.0.3"), Some(1));
    assert_eq!(at("10.99.0.4"), None);
    assert_eq!(at("10.100.0.255"), Some(0));
    assert_eq!(at("10.100.1.0"), Some(1));
    assert_eq!(at("10.100.2.0"), None);
    assert_eq!(at("10.1.0.20"), None);
    assert_eq!(at("0.0.0.0"), None);
    assert_eq!(at("fd00:1::5"), Some(1));
    let e = Routes::new([
        ("10.100.0.0/23".parse().expect("test value"), 0),
        ("10.100.1.0/24".parse().expect("test value"), 1),
    ])
    .expect_err("test value");
    assert_eq!(e.to_string(), "10.100.0.0/23 overlaps 10.100.1.0/24");
}

proptest! {
    /// Any bytes: no panic, and the length never changes.
    #[test]
    fn any_bytes_are_safe(mut p in proptest::collection::vec(any::<u8>(), 0..200), to_hub in any::<bool>()) {
        let m = map();
        let len = p.len();
        if to_hub { m.to_hub(&mut p); } else { m.to_device(&mut p); }
        prop_assert_eq!(p.len(), len);
    }

    /// Any TCP or UDP packet from any LAN host: valid checksums in the block, and the
    /// reverse map gives the packet back byte for byte.
    #[test]
    fn every_lan_host_maps_with_valid_checksums(
        host in 0u8..=255,
        dst in any::<[u8; 4]>(),
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        is_tcp in any::<bool>(),
    ) {
        let m = map();
        let src = [10, 1, 0, host];
        let orig = if is_tcp { tcp(src, dst, &payload) } else { udp(src, dst, &payload) };
        let mut p = orig.clone();
        prop_assert!(m.to_hub(&mut p));
        prop_assert_eq!(&p[12..16], &[10, 100, 1, host]);
        prop_assert!(ipv4_header_ok(&p) && l4_ok(&p));
        let rev = LanMap::new([(net("10.100.1.0/24"), net("10.1.0.0/24"))]).expect("test value");
        prop_assert!(rev.to_hub(&mut p));
        prop_assert_eq!(p, orig);
    }
}

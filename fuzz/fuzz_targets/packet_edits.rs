//! Packet inspection and edits on the tunnel path must never panic on any input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stallnet::core::packet;

fuzz_target!(|data: &[u8]| {
    let mut p = data.to_vec();
    let _ = packet::addrs(&p);
    let _ = packet::clamp_mss(&mut p, 1240);
    let _ = packet::too_big_reply(&p, 1280, std::net::IpAddr::from([10, 99, 0, 2]));
    // The size to cut to comes from the input too (the first byte scales it).
    let mtu = 20 + usize::from(data.first().copied().unwrap_or(0)) * 6;
    if let Ok(frags) = packet::fragment_v4(&p, mtu) {
        assert!(frags.len() == 1 || frags.iter().all(|f| f.len() <= mtu));
    }
});

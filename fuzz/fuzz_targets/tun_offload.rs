//! What a TUN read brings (a virtio header and a packet, untrusted) is split or refused,
//! and the peer's packets are coalesced or refused: never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stallnet::driver::tun_io::{split, Writer};

fuzz_target!(|data: &[u8]| {
    let mut raw = data.to_vec();
    let mut out = Vec::new();
    let _ = split(&mut raw, &mut out);
    // The same bytes as the peer's batch: cut where the first byte says.
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let size = usize::from(first).max(1) * 8;
    let packets: Vec<bytes::Bytes> = rest
        .chunks(size)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    if !packets.is_empty() {
        let _ = Writer::default().coalesce(&packets, first & 1 == 1);
    }
});

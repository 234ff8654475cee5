//! The TUN device with the kernel's offloads on (IFF_VNET_HDR with TSO and USO): one read
//! brings a whole TCP or UDP super-packet, split here into the packets it stands for; a
//! write takes a batch of the peer's packets coalesced per flow (GRO), so the kernel's
//! stack sees a few large packets instead of many small ones (wireguard-go's approach on
//! Linux, through `tun-rs`).
//!
//! The virtio header in front of every packet is untrusted input like the packet itself:
//! [`split`] checks what the segmentation reads before it runs, and a malformed header
//! or packet is counted ([`TunDevice::malformed`]) and dropped.

use std::io::{self, IoSlice};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use tun_rs::{GROTable, VirtioNetHdr, VIRTIO_NET_HDR_LEN};

/// The most packets one read may stand for (a 64 KiB super-packet of 1 280-byte
/// packets is 52; tun-rs's ideal batch).
pub const MAX_SEGMENTS: usize = tun_rs::IDEAL_BATCH_SIZE;

/// Room for the largest read: the header and a 64 KiB super-packet.
const READ_BUF: usize = VIRTIO_NET_HDR_LEN + 65_535;

/// Room for a coalesced write: the header (coalescing wants it twice) and 64 KiB.
const WRITE_BUF: usize = 2 * VIRTIO_NET_HDR_LEN + 65_535;

/// Why what a read brought was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadOffload {
    #[error("shorter than the virtio header")]
    Short,
    #[error("checksum request outside the packet")]
    Checksum,
    #[error("segmentation request that does not fit the packet")]
    Segmentation,
    #[error("more than {MAX_SEGMENTS} segments")]
    TooMany,
    #[error("longer than a read can be")]
    TooLong,
}

/// The TUN device and what its offloads have dropped.
pub struct TunDevice {
    dev: tun_rs::AsyncDevice,
    malformed: AtomicU64,
}

/// Creates and brings up a TUN device with offloads, and addresses it when `addr` is
/// given.
pub fn open(name: &str, mtu: u16, addr: Option<(Ipv4Addr, u8)>) -> Result<TunDevice> {
    let mut b = tun_rs::DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .offload(true)
        .enable(true);
    if let Some((a, len)) = addr {
        b = b.ipv4(a, len, None);
    }
    let dev = b
        .build_async()
        .with_context(|| format!("creating TUN {name}"))?;
    Ok(TunDevice {
        dev,
        malformed: AtomicU64::new(0),
    })
}

impl TunDevice {
    /// Reads once and puts the packets it brought into `out` (emptied first); a malformed
    /// read is counted and leaves `out` empty. Only the device's own errors are returned.
    pub async fn read(&self, raw: &mut ReadBuf, out: &mut Vec<BytesMut>) -> io::Result<()> {
        out.clear();
        let n = self.dev.recv(&mut raw.0).await?;
        if let Err(e) = split(&mut raw.0[..n], out) {
            let seen = self.malformed.fetch_add(1, Ordering::Relaxed);
            if seen.is_power_of_two() || seen == 0 {
                tracing::warn!("TUN read dropped: {e} ({} so far)", seen + 1);
            }
        }
        Ok(())
    }

    /// Writes one packet as it is (no coalescing).
    pub async fn write_one(&self, packet: &[u8]) -> io::Result<()> {
        let hdr = [0u8; VIRTIO_NET_HDR_LEN];
        self.dev
            .send_vectored(&[IoSlice::new(&hdr), IoSlice::new(packet)])
            .await
            .map(|_| ())
    }

    /// Writes `packets`, coalesced per flow where the kernel can take it.
    pub async fn write(&self, w: &mut Writer, packets: &[Bytes]) -> io::Result<()> {
        // Coalescing costs a table entry and a copy per packet: a batch of many flows
        // (a LAN device spraying small datagrams) is written packet by packet.
        if !worth_coalescing(packets) {
            let mut refused = 0;
            for p in packets {
                match self.write_one(p).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::InvalidInput => refused += 1,
                    Err(e) => return Err(e),
                }
            }
            if refused > 0 {
                self.malformed.fetch_add(refused, Ordering::Relaxed);
            }
            return Ok(());
        }
        let (n, empty) = w.fill(packets);
        if empty > 0 {
            self.malformed.fetch_add(empty, Ordering::Relaxed);
        }
        match self
            .dev
            .send_multiple(&mut w.gro, &mut w.bufs[..n], VIRTIO_NET_HDR_LEN)
            .await
        {
            Ok(_) => Ok(()),
            // The coalescing fails only on an empty packet, which `fill` kept out: this
            // is the kernel refusing one packet (the others of the batch were written).
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("TUN write refused: {e}");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads and writes the offloads refused as malformed.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }
}

/// The buffer one read lands in.
pub struct ReadBuf(Vec<u8>);

impl Default for ReadBuf {
    fn default() -> Self {
        Self(vec![0; READ_BUF])
    }
}

/// A writer's reusable buffers: each packet with room for the virtio header in front.
#[derive(Default)]
pub struct Writer {
    bufs: Vec<BytesMut>,
    gro: GROTable,
}

impl Writer {
    /// What a write does before its system calls: the packets coalesced per flow into
    /// the first buffer of each run (with the virtio header that says so); `Err` for a
    /// batch the coalescing refused. Public for the fuzz target.
    pub fn coalesce(&mut self, packets: &[Bytes], udp: bool) -> io::Result<()> {
        let (n, _) = self.fill(packets);
        self.gro
            .apply_gro(&mut self.bufs[..n], VIRTIO_NET_HDR_LEN, udp)
    }

    /// The buffer packet `i` of the last batch is in, after coalescing (tests).
    #[cfg(test)]
    fn buf(&self, i: usize) -> &[u8] {
        &self.bufs[i]
    }

    /// Copies `packets` behind room for the header, leaving empty ones out (they are
    /// not packets, and the coalescing refuses a whole batch for one): how many
    /// buffers are filled, and how many were left out.
    fn fill(&mut self, packets: &[Bytes]) -> (usize, u64) {
        if self.bufs.len() < packets.len() {
            // Coalescing appends a flow's packets to its first buffer only where the
            // room is there already: each buffer can hold a whole super-packet. Only
            // the pages written to are resident, and a writer has only as many
            // buffers as its largest batch.
            self.bufs
                .resize_with(packets.len(), || BytesMut::with_capacity(WRITE_BUF));
        }
        let mut n = 0;
        for p in packets.iter().filter(|p| !p.is_empty()) {
            let b = &mut self.bufs[n];
            b.clear();
            b.resize(VIRTIO_NET_HDR_LEN, 0);
            b.extend_from_slice(p);
            n += 1;
        }
        (n, (packets.len() - n) as u64)
    }
}

/// Whether at least half the packets of `packets` follow one of the same TCP or UDP flow
/// (what the coalescing can merge).
fn worth_coalescing(packets: &[Bytes]) -> bool {
    let followers = packets
        .windows(2)
        .filter(|w| match (flow_of(&w[0]), flow_of(&w[1])) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        })
        .count();
    packets.len() > 1 && followers * 2 >= packets.len()
}

/// The bytes that name a TCP or UDP packet's flow (addresses, protocol, ports), for an
/// IPv4 header without options or an IPv6 header without extensions.
fn flow_of(p: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (proto, addrs, ports) = match p.first()? >> 4 {
        4 if p[0] & 0x0f == 5 => (*p.get(9)?, p.get(12..20)?, p.get(20..24)?),
        6 => (*p.get(6)?, p.get(8..40)?, p.get(40..44)?),
        _ => return None,
    };
    matches!(proto, 6 | 17).then_some((proto, addrs, ports))
}

/// Splits what one read brought (the virtio header, then a packet or a super-packet)
/// into packets, appended to `out`, each in a buffer of its own (of one allocation per
/// read): the only copy a packet gets on its way to the bond.
pub fn split(raw: &mut [u8], out: &mut Vec<BytesMut>) -> Result<(), BadOffload> {
    if raw.len() <= VIRTIO_NET_HDR_LEN {
        return Err(BadOffload::Short);
    }
    if raw.len() > READ_BUF {
        return Err(BadOffload::TooLong);
    }
    let (head, body) = raw.split_at_mut(VIRTIO_NET_HDR_LEN);
    let mut hdr = VirtioNetHdr::decode(head).map_err(|_| BadOffload::Short)?;
    let len = body.len();
    let csum_start = usize::from(hdr.csum_start);
    let csum_end = csum_start
        .checked_add(usize::from(hdr.csum_offset))
        .and_then(|a| a.checked_add(2));
    if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE {
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            if csum_end.is_none_or(|e| e > len) {
                return Err(BadOffload::Checksum);
            }
            finish_checksum(body, csum_start, usize::from(hdr.csum_offset));
        }
        out.push(BytesMut::from(&body[..]));
        return Ok(());
    }
    if hdr.gso_size == 0 || csum_end.is_none_or(|e| e > len) {
        return Err(BadOffload::Segmentation);
    }
    let is_v6 = match body.first().map(|b| b >> 4) {
        Some(4) => false,
        Some(6) => true,
        _ => return Err(BadOffload::Segmentation),
    };
    // The kernel's hdr_len is not to be trusted (on the forward path it may cover the
    // whole first packet): the transport header's own length, after csum_start, is.
    let transport = match hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        tun_rs::VIRTIO_NET_HDR_GSO_UDP_L4 => 8,
        _ => {
            let off = body.get(csum_start + 12).ok_or(BadOffload::Segmentation)?;
            usize::from(off >> 4) * 4
        }
    };
    let hdr_len = csum_start + transport;
    if hdr_len > len {
        return Err(BadOffload::Segmentation);
    }
    hdr.hdr_len = u16::try_from(hdr_len).map_err(|_| BadOffload::Segmentation)?;
    let gso = usize::from(hdr.gso_size);
    let payload = len - hdr_len;
    if payload == 0 {
        return Err(BadOffload::Segmentation);
    }
    let count = payload.div_ceil(gso);
    if count > MAX_SEGMENTS {
        return Err(BadOffload::TooMany);
    }
    let seg = hdr_len + payload.min(gso);
    let mut arena = BytesMut::zeroed(count * seg);
    let mut bufs: Vec<BytesMut> = (0..count).map(|_| arena.split_to(seg)).collect();
    let mut sizes = [0usize; MAX_SEGMENTS];
    let n = tun_rs::gso_split(body, hdr, &mut bufs, &mut sizes[..count], 0, is_v6)
        .map_err(|_| BadOffload::Segmentation)?;
    for (mut b, size) in bufs.into_iter().zip(sizes).take(n) {
        b.truncate(size);
        out.push(b);
    }
    Ok(())
}

/// virtio_net.h: the packet's checksum is partial, to finish from `csum_start`.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// virtio_net.h: not a super-packet.
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// virtio_net.h: a TCP super-packet with ECN set.
const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// Finishes a partial checksum (CHECKSUM_PARTIAL): the field at `start + offset` holds
/// the pseudo-header's sum; the rest is summed from `start`. The caller has checked that
/// the field lies inside `p`.
fn finish_checksum(p: &mut [u8], start: usize, offset: usize) {
    let at = start + offset;
    let initial = u16::from_be_bytes([p[at], p[at + 1]]);
    p[at] = 0;
    p[at + 1] = 0;
    let sum = tun_rs::checksum(&p[start..], u64::from(initial));
    p[at..at + 2].copy_from_slice(&(!sum).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(h: VirtioNetHdr) -> Vec<u8> {
        let mut v = vec![0u8; VIRTIO_NET_HDR_LEN];
        h.encode(&mut v).expect("room for the header");
        v
    }

    /// An IPv4 TCP packet from 10.0.0.1:1000 to 10.0.0.2:2000 with `payload` bytes.
    fn tcp4(payload: usize) -> Vec<u8> {
        let total = 40 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[20..22].copy_from_slice(&1000u16.to_be_bytes());
        p[22..24].copy_from_slice(&2000u16.to_be_bytes());
        p[24..28].copy_from_slice(&7u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x18;
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    #[test]
    fn a_plain_packet_comes_out_as_it_went_in() {
        let p = tcp4(100);
        let mut raw = header(VirtioNetHdr::default());
        raw.extend_from_slice(&p);
        let mut out = Vec::new();
        split(&mut raw, &mut out).expect("a plain packet");
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0][..], &p[..]);
    }

    #[test]
    fn a_super_packet_is_split_into_mss_sized_packets_with_their_own_sequence_numbers() {
        let p = tcp4(3000);
        let mut raw = header(VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 40,
            gso_size: 1240,
            csum_start: 20,
            csum_offset: 16,
        });
        raw.extend_from_slice(&p);
        let mut out = Vec::new();
        split(&mut raw, &mut out).expect("a TSO packet");
        let lens: Vec<usize> = out.iter().map(|b| b.len()).collect();
        assert_eq!(lens, [1280, 1280, 560]);
        let seqs: Vec<u32> = out
            .iter()
            .map(|b| u32::from_be_bytes([b[24], b[25], b[26], b[27]]))
            .collect();
        assert_eq!(seqs, [7, 7 + 1240, 7 + 2480]);
        for b in &out {
            let total = u16::from_be_bytes([b[2], b[3]]) as usize;
            assert_eq!(total, b.len(), "each packet's IP length is its own");
            let checked = etherparse::Ipv4HeaderSlice::from_slice(b).expect("an IPv4 header");
            assert_eq!(
                checked.header_checksum(),
                checked.to_header().calc_header_checksum()
            );
        }
        assert_eq!(
            &out[1][40..],
            &p[40 + 1240..40 + 2480],
            "the payload in order"
        );
    }

    #[test]
    fn malformed_headers_are_refused_not_obeyed() {
        let p = tcp4(3000);
        let cases = [
            // A checksum to write past the end.
            (
                VirtioNetHdr {
                    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                    csum_start: 3030,
                    csum_offset: 16,
                    ..Default::default()
                },
                BadOffload::Checksum,
            ),
            // Segments of size 0.
            (
                VirtioNetHdr {
                    gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
                    csum_start: 20,
                    csum_offset: 16,
                    ..Default::default()
                },
                BadOffload::Segmentation,
            ),
            // Far more segments than a read may hold.
            (
                VirtioNetHdr {
                    gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
                    gso_size: 1,
                    csum_start: 20,
                    csum_offset: 16,
                    ..Default::default()
                },
                BadOffload::TooMany,
            ),
            // The transport header where the packet ends.
            (
                VirtioNetHdr {
                    gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
                    gso_size: 1240,
                    csum_start: 3039,
                    csum_offset: 0,
                    ..Default::default()
                },
                BadOffload::Segmentation,
            ),
        ];
        for (h, want) in cases {
            let mut raw = header(h);
            raw.extend_from_slice(&p);
            let mut out = Vec::new();
            assert_eq!(split(&mut raw, &mut out), Err(want), "{h:?}");
            assert!(out.is_empty());
        }
        assert_eq!(
            split(&mut [0u8; 5], &mut Vec::new()),
            Err(BadOffload::Short)
        );
    }

    /// `n` packets of one TCP flow, each `payload` bytes, in sequence, with valid
    /// checksums (coalescing checks them), ACK only and IP IDs in a row, as a bulk
    /// transfer's segments are.
    fn tcp_run(n: usize, payload: usize) -> Vec<Bytes> {
        (0..n)
            .map(|i| {
                let data: Vec<u8> = (0..payload).map(|j| (i + j) as u8).collect();
                let mut p = Vec::new();
                etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                    .tcp(1000, 2000, 7 + (i * payload) as u32, 65_535)
                    .ack(1)
                    .write(&mut p, &data)
                    .expect("a packet");
                p[4..6].copy_from_slice(&(i as u16).to_be_bytes());
                let mut ip = etherparse::Ipv4HeaderSlice::from_slice(&p)
                    .expect("an IPv4 header")
                    .to_header();
                ip.header_checksum = ip.calc_header_checksum();
                p[..20].copy_from_slice(&ip.to_bytes());
                Bytes::from(p)
            })
            .collect()
    }

    #[test]
    fn only_batches_that_can_merge_are_coalesced() {
        assert!(worth_coalescing(&tcp_run(8, 1000)));
        // Eight flows, a packet each (a LAN device spraying datagrams).
        let spray: Vec<Bytes> = (0..8u16)
            .map(|i| {
                let mut p = tcp_run(1, 64)[0].to_vec();
                p[20..22].copy_from_slice(&(1000 + i).to_be_bytes());
                Bytes::from(p)
            })
            .collect();
        assert!(!worth_coalescing(&spray));
        // A bulk flow with a few strays among it still is.
        let mut mixed = tcp_run(6, 1000);
        mixed.insert(3, spray[0].clone());
        assert!(worth_coalescing(&mixed));
        assert!(
            !worth_coalescing(&tcp_run(1, 1000)),
            "one packet: nothing to merge"
        );
    }

    #[test]
    fn a_run_of_one_flow_is_written_as_one_super_packet() {
        let mut run = tcp_run(3, 1000);
        // An empty "packet" in the middle is left out, not a reason to write none.
        run.insert(1, Bytes::new());
        let mut w = Writer::default();
        w.coalesce(&run, true).expect("a clean run");
        let first = w.buf(0);
        let hdr = VirtioNetHdr::decode(first).expect("a header");
        assert_eq!(hdr.gso_type, tun_rs::VIRTIO_NET_HDR_GSO_TCPV4, "{hdr:?}");
        assert_eq!(usize::from(hdr.gso_size), 1000);
        assert_eq!(first.len(), VIRTIO_NET_HDR_LEN + 40 + 3000);
        assert_eq!(&first[VIRTIO_NET_HDR_LEN + 40 + 2000..], &run[3][40..]);
    }

    proptest::proptest! {
        /// The peer's packets, however broken, are coalesced or written as they are:
        /// never a panic, never the batch refused.
        #[test]
        fn any_batch_is_coalesced_or_written_as_it_is(
            n in 1usize..12,
            payload in 0usize..1300,
            edits in proptest::collection::vec((0usize..1400, proptest::num::u8::ANY), 0..6),
            cut in proptest::option::of(0usize..1400),
            udp in proptest::bool::ANY,
        ) {
            let mut run: Vec<Bytes> = tcp_run(n, payload);
            // Break one packet of the run: bytes changed, or cut short.
            let victim = edits.len() % n;
            let mut p = run[victim].to_vec();
            for (at, b) in &edits {
                if let Some(x) = p.get_mut(*at) {
                    *x = *b;
                }
            }
            if let Some(c) = cut {
                p.truncate(c.max(1));
            }
            run[victim] = Bytes::from(p);
            // An empty one too, somewhere in the run.
            run.insert(cut.unwrap_or(0) % (n + 1), Bytes::new());
            let mut w = Writer::default();
            // Nothing the peer sends makes the coalescing refuse the batch (which would
            // drop the good packets with the bad).
            proptest::prop_assert!(w.coalesce(&run, udp).is_ok());
        }


        /// Any header in front of any bytes: an answer, never a panic, never more
        /// segments than a read may hold.
        #[test]
        fn any_read_is_split_or_refused(
            h in proptest::array::uniform10(proptest::num::u8::ANY),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..4000),
            tcp in proptest::bool::ANY,
        ) {
            let mut raw = h.to_vec();
            raw.resize(VIRTIO_NET_HDR_LEN, 0);
            // Half the cases start from a real TCP packet, so the checks past the
            // header's own are reached too.
            if tcp {
                let mut p = tcp4(body.len());
                p[40..].copy_from_slice(&body);
                raw.extend_from_slice(&p);
            } else {
                raw.extend_from_slice(&body);
            }
            let mut out = Vec::new();
            if split(&mut raw, &mut out).is_ok() {
                proptest::prop_assert!(!out.is_empty() && out.len() <= MAX_SEGMENTS);
            }
        }
    }
}

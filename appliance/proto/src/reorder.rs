//! Receiver side of the bond: duplicate suppression over a sequence window and a bounded
//! reorder buffer.
//!
//! Packets are released in sequence order. A gap (a packet still in flight on a slower
//! uplink, or lost) is waited for at most `hold`, which the driver derives from the
//! uplinks' RTT spread; then the buffered packets behind it are released. A packet that
//! arrives after its gap was skipped is still delivered once (TCP prefers late to lost); a
//! second copy of any sequence number inside the window is dropped.
//!
//! Urgent packets (POS, the stream, interactive traffic and ACKs: see
//! [`Reorder::push_urgent`]) are released the moment they arrive, never held behind bulk
//! still in flight on a slower uplink; their sequence number is still recorded, so a second
//! copy is dropped and the in-order release of the others does not wait for them.
//!
//! Fast loss detection: each uplink delivers in order, so once every uplink that carried
//! traffic recently has delivered a sequence number beyond a gap, the gap cannot still be
//! in flight and is skipped at once instead of waiting out the hold. This keeps one lost
//! packet from stalling every flow for the whole hold.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

const HOLD_MIN: Duration = Duration::from_millis(5);
const HOLD_MAX: Duration = Duration::from_millis(200);
const HOLD_MARGIN: Duration = Duration::from_millis(15);

/// The hold for a set of usable paths given as (RTT, jitter): the time a packet on the
/// slowest path may trail one on the fastest, plus a margin, capped. None without paths.
pub fn hold_for(paths: impl Iterator<Item = (Duration, Duration)>) -> Option<Duration> {
    let (mut lo, mut hi) = (None::<Duration>, None::<Duration>);
    for (rtt, jitter) in paths {
        lo = Some(lo.map_or(rtt, |l| l.min(rtt)));
        let top = rtt + jitter * 2;
        hi = Some(hi.map_or(top, |h| h.max(top)));
    }
    let spread = hi?.saturating_sub(lo?);
    Some((spread + HOLD_MARGIN).clamp(HOLD_MIN, HOLD_MAX))
}

/// Sequence numbers remembered behind the release point for duplicate suppression.
pub const WINDOW: u64 = 8192;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ReorderStats {
    pub delivered: u64,
    pub duplicates: u64,
    pub too_old: u64,
    pub late: u64,
    pub gaps_skipped: u64,
}

#[derive(Debug)]
pub struct Reorder {
    /// Next sequence number to release in order.
    next: u64,
    /// Out-of-order packets waiting for `next`, with their arrival time.
    buf: BTreeMap<u64, (Bytes, Instant)>,
    max_buf: usize,
    hold: Duration,
    /// Delivered marks for the window `[next - WINDOW, next)`, a ring indexed by seq % WINDOW.
    seen: Vec<u64>,
    started: bool,
    /// Per uplink: highest sequence number received and when.
    paths: Vec<(usize, u64, Instant)>,
    stats: ReorderStats,
}

impl Reorder {
    pub fn new(max_buf: usize, hold: Duration) -> Self {
        Self {
            next: 0,
            buf: BTreeMap::new(),
            max_buf,
            hold,
            seen: vec![0; (WINDOW / 64) as usize],
            started: false,
            paths: Vec::new(),
            stats: ReorderStats::default(),
        }
    }

    pub fn stats(&self) -> ReorderStats {
        self.stats
    }

    pub fn hold(&self) -> Duration {
        self.hold
    }

    pub fn set_hold(&mut self, hold: Duration) {
        self.hold = hold;
    }

    /// Forgets everything: the sender restarted its sequence space.
    pub fn reset(&mut self) {
        *self = Self::new(self.max_buf, self.hold);
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }
    fn mark(&mut self, seq: u64) {
        let (w, b) = Self::bit(seq);
        self.seen[w] |= b;
    }
    fn is_marked(&self, seq: u64) -> bool {
        let (w, b) = Self::bit(seq);
        self.seen[w] & b != 0
    }

    /// Accepts a packet that arrived on uplink `path`; appends what may be released now to
    /// `out` in order.
    pub fn push(
        &mut self,
        seq: u64,
        path: usize,
        packet: Bytes,
        now: Instant,
        out: &mut Vec<Bytes>,
    ) {
        match self.paths.iter_mut().find(|p| p.0 == path) {
            Some(p) => {
                p.1 = p.1.max(seq);
                p.2 = now;
            }
            None => self.paths.push((path, seq, now)),
        }
        self.accept(seq, packet, now, out);
        self.skip_known_lost(now, out);
    }

    /// Like [`Self::push`], but the packet is released at once, whatever it overtakes
    /// (other flows' order does not matter to it, and its own flow is sent on one uplink
    /// or duplicated on the fastest two). A placeholder keeps its place in the sequence.
    pub fn push_urgent(
        &mut self,
        seq: u64,
        path: usize,
        packet: Bytes,
        now: Instant,
        out: &mut Vec<Bytes>,
    ) {
        let ahead = self.started && seq > self.next && seq - self.next < WINDOW;
        if !ahead {
            return self.push(seq, path, packet, now, out);
        }
        if self.buf.contains_key(&seq) {
            self.stats.duplicates += 1;
            return;
        }
        self.stats.delivered += 1;
        out.push(packet);
        // An empty placeholder: released in order as nothing.
        self.push(seq, path, Bytes::new(), now, out);
    }

    /// Every uplink active within twice the hold has delivered beyond this point.
    fn frontier(&self, now: Instant) -> Option<u64> {
        let recent = self.hold * 2;
        self.paths
            .iter()
            .filter(|p| now.saturating_duration_since(p.2) <= recent)
            .map(|p| p.1)
            .min()
    }

    fn skip_known_lost(&mut self, now: Instant, out: &mut Vec<Bytes>) {
        let Some(frontier) = self.frontier(now) else {
            return;
        };
        while let Some((&first, _)) = self.buf.first_key_value() {
            if self.next >= frontier || first > frontier {
                break;
            }
            self.skip_to_first(out);
        }
    }

    fn accept(&mut self, seq: u64, packet: Bytes, now: Instant, out: &mut Vec<Bytes>) {
        if !self.started {
            self.started = true;
            self.next = seq;
        }
        if seq < self.next {
            if self.next - seq >= WINDOW {
                self.stats.too_old += 1;
            } else if self.is_marked(seq) {
                self.stats.duplicates += 1;
            } else {
                self.mark(seq);
                self.stats.late += 1;
                self.stats.delivered += 1;
                out.push(packet);
            }
            return;
        }
        if seq == self.next {
            self.deliver(seq, packet, out);
            self.drain(out);
            return;
        }
        if seq - self.next >= WINDOW {
            // Far ahead: the sender jumped (or we fell far behind). Release everything we
            // hold and restart from here rather than stall.
            self.flush_all(out);
            self.stats.gaps_skipped += 1;
            self.clear_window();
            self.next = seq;
            self.deliver(seq, packet, out);
            return;
        }
        if self.buf.contains_key(&seq) {
            self.stats.duplicates += 1;
            return;
        }
        self.buf.insert(seq, (packet, now));
        if self.buf.len() > self.max_buf {
            self.skip_to_first(out);
        }
    }

    fn clear_window(&mut self) {
        self.seen.iter_mut().for_each(|w| *w = 0);
    }

    fn deliver(&mut self, seq: u64, packet: Bytes, out: &mut Vec<Bytes>) {
        // The ring slot of `seq` last described `seq - WINDOW`, which is now out of the
        // window: overwrite it.
        let (w, b) = Self::bit(seq);
        self.seen[w] |= b;
        // An empty packet is the placeholder of an urgent one, released already.
        if !packet.is_empty() {
            self.stats.delivered += 1;
            out.push(packet);
        }
        self.next = seq + 1;
        // Clear the slot that `next` will describe once delivered, so stale marks from
        // `next - WINDOW` do not look like duplicates.
        self.unmark_ahead();
    }

    /// Clears marks of sequence numbers at or after `next` that belong to an older lap.
    fn unmark_ahead(&mut self) {
        let (w, b) = Self::bit(self.next);
        self.seen[w] &= !b;
    }

    fn drain(&mut self, out: &mut Vec<Bytes>) {
        while let Some(entry) = self.buf.first_entry() {
            if *entry.key() != self.next {
                break;
            }
            let (seq, (p, _)) = entry.remove_entry();
            self.deliver(seq, p, out);
        }
    }

    /// Gives up on the gap in front of the first buffered packet.
    fn skip_to_first(&mut self, out: &mut Vec<Bytes>) {
        let Some((&first, _)) = self.buf.first_key_value() else {
            return;
        };
        self.stats.gaps_skipped += 1;
        while self.next < first {
            self.unmark_ahead();
            self.next += 1;
        }
        self.unmark_ahead();
        self.drain(out);
    }

    fn flush_all(&mut self, out: &mut Vec<Bytes>) {
        while !self.buf.is_empty() {
            self.skip_to_first(out);
        }
    }

    /// When the oldest held packet must be released, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.buf.values().map(|(_, at)| *at + self.hold).min()
    }

    /// Releases packets whose gap has been waited for long enough.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Bytes>) {
        self.paths
            .retain(|p| now.saturating_duration_since(p.2) <= Duration::from_secs(10));
        self.skip_known_lost(now, out);
        while let Some(due) = self.poll_timeout() {
            if due > now {
                break;
            }
            self.skip_to_first(out);
        }
    }

    /// Packets currently held.
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    #[cfg(test)]
    fn next(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: u64) -> Bytes {
        Bytes::from(n.to_be_bytes().to_vec())
    }
    fn seqs(v: &[Bytes]) -> Vec<u64> {
        v.iter()
            .map(|p| {
                let mut a = [0u8; 8];
                a.copy_from_slice(p);
                u64::from_be_bytes(a)
            })
            .collect()
    }

    #[test]
    fn hold_follows_the_rtt_spread_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(hold_for(std::iter::empty()), None);
        assert_eq!(hold_for([(ms(20), ms(0))].into_iter()), Some(ms(15)));
        assert_eq!(
            hold_for([(ms(20), ms(1)), (ms(45), ms(2))].into_iter()),
            Some(ms(44))
        );
        assert_eq!(
            hold_for([(ms(20), ms(0)), (ms(900), ms(0))].into_iter()),
            Some(ms(200))
        );
    }

    #[test]
    fn in_order_passes_straight_through() {
        let t = Instant::now();
        let mut r = Reorder::new(64, Duration::from_millis(50));
        let mut out = vec![];
        for s in 10..20 {
            r.push(s, 0, b(s), t, &mut out);
        }
        assert_eq!(seqs(&out), (10..20).collect::<Vec<_>>());
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn reordered_packets_are_released_in_order() {
        let t = Instant::now();
        let mut r = Reorder::new(64, Duration::from_millis(50));
        let mut out = vec![];
        // Two in-order paths: evens on path 0, odds on path 1.
        for s in [0, 1, 3, 2, 5, 4] {
            r.push(s, (s % 2) as usize, b(s), t, &mut out);
        }
        assert_eq!(seqs(&out), [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn duplicates_are_dropped_even_after_release() {
        let t = Instant::now();
        let mut r = Reorder::new(64, Duration::from_millis(50));
        let mut out = vec![];
        for (s, path) in [(0, 0), (1, 0), (1, 1), (0, 1), (3, 0), (2, 1), (3, 1)] {
            r.push(s, path, b(s), t, &mut out);
        }
        assert_eq!(seqs(&out), [0, 1, 2, 3]);
        assert_eq!(r.stats().duplicates, 3);
    }

    #[test]
    fn a_gap_is_held_then_skipped_and_a_late_packet_still_delivered_once() {
        let t = Instant::now();
        let hold = Duration::from_millis(50);
        let mut r = Reorder::new(64, hold);
        let mut out = vec![];
        r.push(0, 0, b(0), t, &mut out);
        r.push(2, 1, b(2), t, &mut out);
        assert_eq!(r.poll_timeout(), Some(t + hold));
        r.handle_timeout(t + Duration::from_millis(49), &mut out);
        assert_eq!(seqs(&out), [0]);
        r.handle_timeout(t + hold, &mut out);
        assert_eq!(seqs(&out), [0, 2]);
        r.push(1, 0, b(1), t + hold, &mut out);
        r.push(1, 0, b(1), t + hold, &mut out);
        assert_eq!(seqs(&out), [0, 2, 1]);
        assert_eq!(r.stats().late, 1);
        assert_eq!(r.stats().duplicates, 1);
    }

    #[test]
    fn the_buffer_is_bounded() {
        let t = Instant::now();
        let mut r = Reorder::new(4, Duration::from_secs(10));
        let mut out = vec![];
        r.push(0, 0, b(0), t, &mut out);
        for s in 2..8 {
            r.push(s, 0, b(s), t, &mut out);
        }
        assert!(r.held() <= 4);
        assert_eq!(seqs(&out), [0, 2, 3, 4, 5, 6, 7]);
        assert_eq!(r.next(), 8);
    }

    #[test]
    fn a_gap_every_uplink_has_passed_is_skipped_at_once() {
        let t = Instant::now();
        let mut r = Reorder::new(64, Duration::from_millis(100));
        let mut out = vec![];
        r.push(0, 0, b(0), t, &mut out);
        r.push(1, 1, b(1), t, &mut out);
        // 2 was sent on path 0 and lost; 3 arrives on path 1: path 0 may still bring 2.
        r.push(3, 1, b(3), t, &mut out);
        assert_eq!(seqs(&out), [0, 1]);
        // Path 0 delivers 4: 2 cannot be in flight any more on either path.
        r.push(4, 0, b(4), t, &mut out);
        assert_eq!(seqs(&out), [0, 1, 3, 4]);
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn window_wraps_without_false_duplicates() {
        let t = Instant::now();
        let mut r = Reorder::new(64, Duration::from_millis(50));
        let mut out = vec![];
        for s in 0..(3 * WINDOW + 5) {
            r.push(s, 0, b(s), t, &mut out);
        }
        assert_eq!(out.len() as u64, 3 * WINDOW + 5);
        assert_eq!(r.stats().duplicates, 0);
    }

    #[test]
    fn urgent_packets_overtake_a_gap_and_keep_their_place() {
        let t = Instant::now();
        let mut r = Reorder::new(64, Duration::from_millis(50));
        let mut out = Vec::new();
        r.push(0, 0, b(0), t, &mut out);
        // 1 and 2 are bulk still in flight; 3 is POS: out at once.
        r.push_urgent(3, 0, b(3), t, &mut out);
        assert_eq!(seqs(&out), [0, 3]);
        // The slower uplink delivers 1, 2 and then the second copy of 3: a duplicate.
        r.push(1, 1, b(1), t, &mut out);
        r.push(2, 1, b(2), t, &mut out);
        r.push_urgent(3, 1, b(3), t, &mut out);
        assert_eq!(r.stats().duplicates, 1);
        assert_eq!(seqs(&out), [0, 3, 1, 2]);
        r.push(4, 1, b(4), t, &mut out);
        assert_eq!(seqs(&out), [0, 3, 1, 2, 4]);
        assert_eq!(r.held(), 0);
        assert_eq!(r.stats().delivered, 5);
    }
}

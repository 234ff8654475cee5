//! Which uplink(s) each packet goes to.
//!
//! A pull model: the scheduler holds the queues; each uplink's sender asks [`Scheduler::poll`]
//! for the next packet when its QUIC connection has room, so every link is fed at the rate
//! its congestion controller allows and aggregation follows capacity by itself. Modes:
//!
//! - `redundant` (POS, or everything in redundant mode): a copy goes to the private queue of
//!   each of the best two usable uplinks (lowest RTT first), same sequence number, so the
//!   receiver keeps whichever arrives first. A silent black hole on one uplink loses nothing.
//! - `aggregate`: one shared queue pulled by every eligible uplink: usable, not a backup while
//!   a non-backup is usable, with an RTT not far above the best one, and with room under its
//!   in-flight cap. A link at its cap stops pulling until deliveries free room, so each link
//!   is fed at the rate it delivers and no modem buffer fills: aggregation weighted by what
//!   each link really carries. When every link is at its cap, packets wait here (bounded by
//!   `max_sojourn`), not in a modem.
//!
//! Sequence numbers are given when a packet is *sent* (polled), not when it is queued, so
//! that every uplink carries strictly increasing numbers even though POS overtakes bulk:
//! the receiver relies on that to tell a lost packet from a slow one. Both copies of a
//! redundant packet carry the number the first copy was given.
//!
//! A dying uplink costs nothing visible: when a usable link stops being usable (a probe
//! overdue, carrier lost), what it sent after its newest answered probe (at most
//! `resend_window` back) may be lost in flight, so those packets go out again, first in
//! line, on the remaining links with their original sequence numbers; the receiver keeps
//! whichever copy arrives first. A TCP flow then sees
//! reordering instead of loss and never waits for a retransmission timeout.
//!
//! No usable uplink: links that are Suspect or Probing may still pull (better a chance than
//! nothing); Down links never do. A queued packet older than `max_sojourn` is dropped, and the
//! queue is bounded in bytes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::health::LinkState;
use super::Class;

pub type LinkId = usize;

/// What the scheduler knows of an uplink (fed from its [`super::health::LinkHealth`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkView {
    pub state: LinkState,
    pub backup: bool,
    pub srtt: Option<Duration>,
    /// Administratively disabled or interface absent.
    pub disabled: bool,
    /// False while the link has its in-flight cap's worth of data out (see
    /// [`super::inflight`]): it then takes no shared traffic.
    pub room: bool,
    /// What the link sent before this instant is known to have arrived (see
    /// [`super::health::LinkHealth::verified_until`]); only later packets are resent when
    /// it fails.
    pub verified_until: Option<Instant>,
}

impl LinkView {
    pub fn down() -> Self {
        Self {
            state: LinkState::Down,
            backup: false,
            srtt: None,
            disabled: false,
            room: true,
            verified_until: None,
        }
    }
    fn usable(&self) -> bool {
        !self.disabled && self.state == LinkState::Up
    }
    fn last_resort(&self) -> bool {
        !self.disabled && matches!(self.state, LinkState::Suspect | LinkState::Probing)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Redundant,
    Aggregate,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub mode: Mode,
    pub max_queue_bytes: usize,
    pub max_sojourn: Duration,
    /// How far back a failing link's packets are sent again on the others.
    pub resend_window: Duration,
}

/// Packets remembered per link for a resend (bounded memory).
const MAX_RECENT: usize = 1024;

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Aggregate,
            max_queue_bytes: 512 * 1024,
            max_sojourn: Duration::from_millis(250),
            resend_window: Duration::from_millis(300),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Sequence number; meaningful only on packets returned by [`Scheduler::poll`].
    pub seq: u64,
    /// Shared by the two copies of a redundant packet.
    twin: Option<u64>,
    /// A resend of a packet already numbered: keeps `seq`.
    resend: bool,
    pub class: Class,
    pub packet: Bytes,
    pub enqueued: Instant,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SchedStats {
    pub enqueued: u64,
    pub duplicated: u64,
    pub dropped_full: u64,
    pub dropped_sojourn: u64,
    pub resent: u64,
}

/// Set of links that have new work, as a bit mask over [`LinkId`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wake(pub u64);

impl Wake {
    pub fn contains(self, id: LinkId) -> bool {
        id < 64 && self.0 & (1 << id) != 0
    }
    fn add(&mut self, id: LinkId) {
        if id < 64 {
            self.0 |= 1 << id;
        }
    }
}

#[derive(Debug)]
struct Slot {
    view: LinkView,
    private: VecDeque<Queued>,
    /// What this link sent lately, with when, for a resend if it fails.
    recent: VecDeque<(Instant, Queued)>,
    present: bool,
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    links: Vec<Slot>,
    shared: VecDeque<Queued>,
    queued_bytes: usize,
    next_seq: u64,
    next_twin: u64,
    /// Sequence numbers given to the first-sent copy of redundant packets, oldest first.
    twin_seqs: VecDeque<(u64, u64)>,
    stats: SchedStats,
}

/// Redundant packets whose second copy may still be waiting (bounded memory).
const MAX_TWINS: usize = 4096;

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            links: Vec::new(),
            shared: VecDeque::new(),
            queued_bytes: 0,
            next_seq: 0,
            next_twin: 0,
            twin_seqs: VecDeque::new(),
            stats: SchedStats::default(),
        }
    }

    pub fn stats(&self) -> SchedStats {
        self.stats
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Adds an uplink (Down until told otherwise); ids are reused after removal.
    pub fn add_link(&mut self) -> LinkId {
        let slot = Slot {
            view: LinkView::down(),
            private: VecDeque::new(),
            recent: VecDeque::new(),
            present: true,
        };
        if let Some(id) = self.links.iter().position(|s| !s.present) {
            self.links[id] = slot;
            id
        } else {
            self.links.push(slot);
            self.links.len() - 1
        }
    }

    /// Removes an uplink; its private copies go back to the shared queue (the receiver drops
    /// whichever copy arrives second).
    pub fn remove_link(&mut self, id: LinkId) {
        if let Some(slot) = self.links.get_mut(id) {
            slot.present = false;
            let orphans: Vec<_> = slot.private.drain(..).collect();
            for q in orphans.into_iter().rev() {
                self.shared.push_front(q);
            }
        }
    }

    /// Updates what the scheduler knows of an uplink. Returns links that may now pull.
    pub fn update_link(&mut self, id: LinkId, view: LinkView) -> Wake {
        let Some(slot) = self.links.get_mut(id) else {
            return Wake::default();
        };
        let was = slot.view;
        slot.view = view;
        if !view.usable() && was.usable() {
            // Copies waiting for a link that just failed move to the shared queue, where a
            // healthy link picks them up; so do the packets it sent lately.
            let mut orphans: Vec<Queued> = slot.private.drain(..).collect();
            let last = slot.recent.back().map(|r| r.0);
            let window = self.cfg.resend_window;
            let verified = was.verified_until;
            let mut resend: Vec<Queued> = slot
                .recent
                .drain(..)
                .filter(|(at, _)| verified.is_none_or(|v| *at >= v))
                .filter(|(at, _)| last.is_some_and(|l| l.saturating_duration_since(*at) <= window))
                .map(|(at, mut q)| {
                    q.resend = true;
                    q.twin = None;
                    q.enqueued = last.unwrap_or(at);
                    q
                })
                .collect();
            // Only what fits: the newest packets are the ones most likely still missing.
            let mut room = self.cfg.max_queue_bytes.saturating_sub(self.queued_bytes);
            let mut keep = resend.len();
            for (i, q) in resend.iter().enumerate().rev() {
                if q.packet.len() > room {
                    break;
                }
                room -= q.packet.len();
                keep = i;
            }
            resend.drain(..keep);
            self.stats.resent += resend.len() as u64;
            self.queued_bytes += resend.iter().map(|q| q.packet.len()).sum::<usize>();
            orphans.splice(0..0, resend);
            for q in orphans.into_iter().rev() {
                self.shared.push_front(q);
            }
        }
        if self.shared.is_empty() {
            Wake::default()
        } else {
            self.eligible()
        }
    }

    /// True when at least one uplink can carry traffic.
    pub fn online(&self) -> bool {
        self.links.iter().any(|s| s.present && s.view.usable())
    }

    /// Queues an IP packet. Returns the links that have new work.
    pub fn enqueue(&mut self, class: Class, packet: Bytes, now: Instant) -> Wake {
        let len = packet.len();
        // POS is small and rare: it is never refused for lack of room (sojourn still bounds it).
        if class != Class::Pos && self.queued_bytes + len > self.cfg.max_queue_bytes {
            self.stats.dropped_full += 1;
            return Wake::default();
        }
        self.stats.enqueued += 1;
        let mut wake = Wake::default();
        let redundant = class == Class::Pos || self.cfg.mode == Mode::Redundant;
        let best = if redundant {
            self.best_two()
        } else {
            [None, None]
        };
        let twin = if best[1].is_some() {
            self.next_twin += 1;
            Some(self.next_twin)
        } else {
            None
        };
        let q = Queued {
            seq: 0,
            twin,
            resend: false,
            class,
            packet,
            enqueued: now,
        };
        match best {
            [Some(a), second] => {
                if let Some(b) = second {
                    self.links[b].private.push_back(q.clone());
                    self.queued_bytes += len;
                    self.stats.duplicated += 1;
                    wake.add(b);
                }
                self.links[a].private.push_back(q);
                self.queued_bytes += len;
                wake.add(a);
            }
            [None, _] => {
                self.shared.push_back(q);
                self.queued_bytes += len;
                wake = self.eligible();
            }
        }
        wake
    }

    /// The best two usable links by RTT, non-backup first.
    fn best_two(&self) -> [Option<LinkId>; 2] {
        let mut c: Vec<(bool, Duration, LinkId)> = self
            .links
            .iter()
            .enumerate()
            .filter(|(_, s)| s.present && s.view.usable())
            .map(|(i, s)| (s.view.backup, s.view.srtt.unwrap_or(Duration::MAX), i))
            .collect();
        c.sort();
        [c.first().map(|x| x.2), c.get(1).map(|x| x.2)]
    }

    /// Links allowed to pull from the shared queue right now.
    pub fn eligible(&self) -> Wake {
        let present = || self.links.iter().enumerate().filter(|(_, s)| s.present);
        let mut wake = Wake::default();
        let primary_up = present().any(|(_, s)| s.view.usable() && !s.view.backup);
        let pool: Vec<(LinkId, &Slot)> = present()
            .filter(|(_, s)| s.view.usable() && !(primary_up && s.view.backup))
            .collect();
        if pool.is_empty() {
            for (i, s) in present() {
                if s.view.last_resort() {
                    wake.add(i);
                }
            }
            return wake;
        }
        let best = pool.iter().filter_map(|(_, s)| s.view.srtt).min();
        for (i, s) in pool {
            if !s.view.room {
                continue;
            }
            let near = match (best, s.view.srtt) {
                (Some(b), Some(r)) => r <= b * 2 + Duration::from_millis(40),
                _ => true,
            };
            if near {
                wake.add(i);
            }
        }
        wake
    }

    /// The next packet for `link` to send, if any, with its sequence number. Drops packets
    /// that waited too long.
    pub fn poll(&mut self, link: LinkId, now: Instant) -> Option<Queued> {
        let mut q = self.next_for(link, now)?;
        if !q.resend {
            q.seq = self.number(q.twin);
        }
        if let Some(slot) = self.links.get_mut(link) {
            if slot.recent.len() == MAX_RECENT {
                slot.recent.pop_front();
            }
            slot.recent.push_back((now, q.clone()));
            let window = self.cfg.resend_window;
            while slot
                .recent
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) > window)
            {
                slot.recent.pop_front();
            }
        }
        Some(q)
    }

    /// The sequence number for a packet about to be sent (twins share one).
    fn number(&mut self, twin: Option<u64>) -> u64 {
        match twin {
            Some(t) => match self.twin_seqs.iter().position(|(id, _)| *id == t) {
                Some(i) => self.twin_seqs.remove(i).map_or(0, |(_, seq)| seq),
                None => {
                    let seq = self.take_seq();
                    if self.twin_seqs.len() == MAX_TWINS {
                        self.twin_seqs.pop_front();
                    }
                    self.twin_seqs.push_back((t, seq));
                    seq
                }
            },
            None => self.take_seq(),
        }
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn next_for(&mut self, link: LinkId, now: Instant) -> Option<Queued> {
        let max = self.cfg.max_sojourn;
        let slot = self.links.get_mut(link)?;
        while let Some(q) = slot.private.pop_front() {
            self.queued_bytes -= q.packet.len();
            if now.saturating_duration_since(q.enqueued) <= max {
                return Some(q);
            }
            self.stats.dropped_sojourn += 1;
        }
        if !self.eligible().contains(link) {
            return None;
        }
        while let Some(q) = self.shared.pop_front() {
            self.queued_bytes -= q.packet.len();
            if now.saturating_duration_since(q.enqueued) <= max {
                return Some(q);
            }
            self.stats.dropped_sojourn += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(rtt_ms: u64, backup: bool) -> LinkView {
        LinkView {
            state: LinkState::Up,
            backup,
            srtt: Some(Duration::from_millis(rtt_ms)),
            disabled: false,
            room: true,
            verified_until: None,
        }
    }

    fn pkt(n: u8) -> Bytes {
        Bytes::from(vec![n; 100])
    }

    #[test]
    fn a_link_at_its_in_flight_cap_stops_pulling() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b) = (s.add_link(), s.add_link());
        s.update_link(a, up(20, false));
        s.update_link(
            b,
            LinkView {
                room: false,
                ..up(45, false)
            },
        );
        s.enqueue(Class::Bulk, pkt(0), t);
        assert_eq!(s.poll(b, t), None);
        assert!(s.poll(a, t).is_some());
        // Every link full: packets wait in the scheduler, POS copies still go.
        s.update_link(
            a,
            LinkView {
                room: false,
                ..up(20, false)
            },
        );
        s.enqueue(Class::Bulk, pkt(1), t);
        assert_eq!(s.poll(a, t), None);
        assert_eq!(s.poll(b, t), None);
        s.enqueue(Class::Pos, pkt(2), t);
        assert!(s.poll(a, t).is_some());
        // Room again: the waiting bulk packet goes.
        let wake = s.update_link(b, up(45, false));
        assert!(wake.contains(b));
        assert!(s.poll(b, t).is_some());
    }

    #[test]
    fn pos_goes_to_the_best_two() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b, c) = (s.add_link(), s.add_link(), s.add_link());
        s.update_link(a, up(80, false));
        s.update_link(b, up(20, false));
        s.update_link(c, up(45, false));
        let wake = s.enqueue(Class::Pos, pkt(1), t);
        assert!(wake.contains(b) && wake.contains(c) && !wake.contains(a));
        let qb = s.poll(b, t).expect("copy on b");
        let qc = s.poll(c, t).expect("copy on c");
        assert_eq!(qb.seq, qc.seq);
        assert_eq!(s.poll(a, t), None);
    }

    #[test]
    fn bulk_is_pulled_by_whichever_link_has_room() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b) = (s.add_link(), s.add_link());
        s.update_link(a, up(20, false));
        s.update_link(b, up(45, false));
        for i in 0..4 {
            s.enqueue(Class::Bulk, pkt(i), t);
        }
        let seqs: Vec<u64> = [a, b, a, b]
            .iter()
            .map(|&l| s.poll(l, t).expect("pkt").seq)
            .collect();
        assert_eq!(seqs, [0, 1, 2, 3]);
    }

    #[test]
    fn far_slower_and_backup_links_do_not_pull_bulk() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, slow, bk) = (s.add_link(), s.add_link(), s.add_link());
        s.update_link(a, up(20, false));
        s.update_link(slow, up(900, false));
        s.update_link(bk, up(10, true));
        s.enqueue(Class::Bulk, pkt(0), t);
        assert_eq!(s.poll(slow, t), None);
        assert_eq!(s.poll(bk, t), None);
        assert!(s.poll(a, t).is_some());
        // Without any primary, the backup carries traffic.
        s.update_link(a, LinkView::down());
        s.update_link(slow, LinkView::down());
        s.enqueue(Class::Bulk, pkt(1), t);
        assert!(s.poll(bk, t).is_some());
    }

    #[test]
    fn every_link_carries_increasing_sequence_numbers_even_when_pos_overtakes() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b) = (s.add_link(), s.add_link());
        s.update_link(a, up(20, false));
        s.update_link(b, up(30, false));
        for i in 0..3 {
            s.enqueue(Class::Bulk, pkt(i), t);
        }
        s.enqueue(Class::Pos, pkt(9), t);
        let mut per_link: [Vec<u64>; 2] = [vec![], vec![]];
        for l in [a, b, a, b, a, b] {
            if let Some(q) = s.poll(l, t) {
                per_link[l].push(q.seq);
            }
        }
        for v in &per_link {
            assert!(v.windows(2).all(|w| w[0] < w[1]), "{per_link:?}");
        }
        // POS went out first on both links with one shared number.
        assert_eq!(per_link[0][0], per_link[1][0], "{per_link:?}");
    }

    #[test]
    fn what_a_failing_link_sent_lately_goes_out_again_on_another() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b) = (s.add_link(), s.add_link());
        s.update_link(a, up(20, false));
        s.update_link(b, up(30, false));
        s.enqueue(Class::Bulk, pkt(0), t);
        let old = s.poll(a, t).expect("sent long ago").seq;
        for i in 1..4 {
            s.enqueue(Class::Bulk, pkt(i), t + ms(500));
        }
        let recent: Vec<u64> = (0..2)
            .map(|_| s.poll(a, t + ms(500)).expect("sent").seq)
            .collect();
        let on_b = s.poll(b, t + ms(500)).expect("b").seq;
        s.update_link(
            a,
            LinkView {
                state: LinkState::Suspect,
                ..up(20, false)
            },
        );
        assert_eq!(s.stats().resent, 2);
        let again: Vec<u64> = (0..2)
            .map(|_| s.poll(b, t + ms(520)).expect("resent").seq)
            .collect();
        assert_eq!(again, recent, "same numbers, same order");
        assert!(!again.contains(&old) && !again.contains(&on_b));
        assert_eq!(s.poll(b, t + ms(520)), None);
        assert_eq!(s.queued_bytes(), 0);
    }

    #[test]
    fn only_what_was_sent_after_the_last_answered_probe_is_resent() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b) = (s.add_link(), s.add_link());
        s.update_link(b, up(30, false));
        for i in 0..3 {
            s.enqueue(Class::Bulk, pkt(i), t);
        }
        s.update_link(a, up(20, false));
        let first = s.poll(a, t).expect("p0").seq;
        let later: Vec<u64> = (0..2)
            .map(|_| s.poll(a, t + ms(50)).expect("p").seq)
            .collect();
        // A probe sent at t + 10 ms was answered: p0 arrived.
        s.update_link(
            a,
            LinkView {
                verified_until: Some(t + ms(10)),
                ..up(20, false)
            },
        );
        s.update_link(a, LinkView::down());
        assert_eq!(s.stats().resent, 2);
        let again: Vec<u64> = (0..2)
            .map(|_| s.poll(b, t + ms(60)).expect("r").seq)
            .collect();
        assert_eq!(again, later);
        assert!(!again.contains(&first));
    }

    #[test]
    fn copies_of_a_failed_link_move_to_a_healthy_one() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig {
            mode: Mode::Redundant,
            ..Default::default()
        });
        let (a, b, c) = (s.add_link(), s.add_link(), s.add_link());
        s.update_link(a, up(20, false));
        s.update_link(b, up(30, false));
        s.update_link(c, up(60, false));
        s.enqueue(Class::Bulk, pkt(0), t);
        s.update_link(a, LinkView::down());
        assert_eq!(s.poll(c, t).map(|q| q.seq), Some(0));
    }

    #[test]
    fn old_packets_and_overflow_are_dropped() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig {
            max_queue_bytes: 250,
            ..Default::default()
        });
        let a = s.add_link();
        s.enqueue(Class::Bulk, pkt(0), t);
        s.enqueue(Class::Bulk, pkt(1), t);
        s.enqueue(Class::Bulk, pkt(2), t);
        assert_eq!(s.stats().dropped_full, 1);
        s.update_link(a, up(20, false));
        assert_eq!(s.poll(a, t + Duration::from_secs(1)), None);
        assert_eq!(s.stats().dropped_sojourn, 2);
        assert_eq!(s.queued_bytes(), 0);
    }

    #[test]
    fn nothing_usable_lets_suspect_links_try() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b) = (s.add_link(), s.add_link());
        s.update_link(
            a,
            LinkView {
                state: LinkState::Suspect,
                ..up(20, false)
            },
        );
        s.update_link(b, LinkView::down());
        assert!(!s.online());
        s.enqueue(Class::Pos, pkt(0), t);
        assert_eq!(s.poll(b, t), None);
        assert!(s.poll(a, t).is_some());
    }
}

//! Which uplink(s) each packet goes to.
//!
//! A pull model: the scheduler holds the class queues ([`super::qos`]); each uplink's
//! sender asks [`Scheduler::poll`] for the next packet when its QUIC connection has room
//! and its pacer allows, so every link is fed at the rate it can carry. Each class has a
//! mode:
//!
//! - `redundant` (POS): a copy targeted at each of the best two usable uplinks (lowest RTT
//!   first, healthy before degraded), same sequence number, so the receiver keeps whichever
//!   arrives first. A silent black hole on one uplink loses nothing.
//! - `lowest-latency` (stream, interactive): a flow sticks to the lowest-RTT usable uplink
//!   with room and moves only when that uplink stops being usable, degrades or is no longer
//!   allowed for the class (so it never flaps on RTT noise). Its packets go ahead of bulk
//!   on that link, so a link kept full by bulk does not push them elsewhere.
//! - `aggregate` (bulk, guest): free for every eligible uplink: usable, allowed for the
//!   class, not a backup while a non-backup is usable, with an RTT not far above the best
//!   one, and with room under its in-flight cap. A link at its cap stops pulling until
//!   deliveries free room, so each link is fed at the rate it delivers and no modem buffer
//!   fills: aggregation weighted by what each link really carries. When every link is
//!   full, packets wait in the class queues (CoDel-controlled), not in a modem.
//!
//! Degraded links (alive, but lossy or with wild RTT swings) are not chosen for redundant
//! or lowest-latency classes while a healthy link is usable.
//!
//! Sequence numbers are given when a packet is *sent* (polled), not when it is queued, so
//! that every uplink carries strictly increasing numbers even though POS overtakes bulk:
//! the receiver relies on that to tell a lost packet from a slow one. Both copies of a
//! redundant packet carry the number the first copy was given.
//!
//! A dying uplink costs nothing visible: when a usable link stops being usable (a probe
//! overdue, carrier lost), what it sent after its newest answered probe and after the
//! highest sequence number the peer reported delivered on it (at most `resend_window`
//! back) may be lost in flight, so those packets go out again, first in
//! line, on the remaining links with their original sequence numbers; the receiver keeps
//! whichever copy arrives first. A TCP flow then sees
//! reordering instead of loss and never waits for a retransmission timeout. With no
//! other link that could carry them, nothing is resent (the failed link would only send
//! them again on the same path).
//!
//! No usable uplink: links that are Suspect or Probing may still pull (better a chance than
//! nothing); Down links never do.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::health::LinkState;
use super::qos::{bit, ClassMask, ClassStats, QItem, Qos, QosConfig, ALL_CLASSES, CLASSES};
use super::Class;

pub type LinkId = usize;

/// What the scheduler knows of an uplink (fed from its [`super::health::LinkHealth`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkView {
    pub state: LinkState,
    pub backup: bool,
    pub srtt: Option<Duration>,
    /// The lowest RTT seen on the link: its path, without the queue. Whether a link is
    /// far slower than the best is judged on it, so the queue a link's own traffic builds
    /// (or clears) does not switch it in and out of aggregation.
    pub min_rtt: Option<Duration>,
    /// Administratively disabled or interface absent.
    pub disabled: bool,
    /// False while the link has its in-flight cap's worth of data out (see
    /// [`super::inflight`]): it then takes no shared traffic.
    pub room: bool,
    /// What the link sent before this instant is known to have arrived (see
    /// [`super::health::LinkHealth::verified_until`]); only later packets are resent when
    /// it fails.
    pub verified_until: Option<Instant>,
    /// Alive but lossy or with wild RTT swings: kept away from redundant and
    /// lowest-latency classes while a healthy link is usable.
    pub degraded: bool,
    /// Classes this link may carry (the classes' allowed uplinks).
    pub classes: ClassMask,
}

impl LinkView {
    pub fn down() -> Self {
        Self {
            state: LinkState::Down,
            backup: false,
            srtt: None,
            min_rtt: None,
            disabled: false,
            room: true,
            verified_until: None,
            degraded: false,
            classes: ALL_CLASSES,
        }
    }
    fn usable(&self) -> bool {
        !self.disabled && self.state == LinkState::Up
    }
    fn last_resort(&self) -> bool {
        !self.disabled && matches!(self.state, LinkState::Suspect | LinkState::Probing)
    }
    fn carries(&self, c: Class) -> bool {
        self.classes & bit(c) != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Redundant,
    LowestLatency,
    Aggregate,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Mode of each class, indexed by [`Class`].
    pub modes: [Mode; CLASSES],
    pub qos: QosConfig,
    /// How far back a failing link's packets are sent again on the others.
    pub resend_window: Duration,
    /// A flow unseen this long forgets its uplink.
    pub sticky_idle: Duration,
}

/// Packets remembered per link for a resend (bounded memory: 2 048 packets cover the
/// resend window at 20 Mbit/s of full-size packets).
const MAX_RECENT: usize = 2048;
/// Flows remembered with their uplink (bounded memory).
const MAX_STICKY: usize = 16_384;

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            modes: [
                Mode::Redundant,
                Mode::LowestLatency,
                Mode::LowestLatency,
                Mode::Aggregate,
                Mode::Aggregate,
            ],
            qos: QosConfig::default(),
            // Longer than the slowest detection of a silent link (a probe interval, 100 ms,
            // plus the 600 ms ceiling of the overdue threshold): what went out since the
            // newest answered probe is all sent again, however long the link took to turn
            // suspect under load.
            resend_window: Duration::from_millis(800),
            sticky_idle: Duration::from_secs(30),
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
    pub flow: u64,
    pub packet: Bytes,
    pub enqueued: Instant,
    target: Option<LinkId>,
}

impl QItem for Queued {
    fn class(&self) -> Class {
        self.class
    }
    fn size(&self) -> usize {
        self.packet.len()
    }
    fn enqueued(&self) -> Instant {
        self.enqueued
    }
    fn target(&self) -> Option<usize> {
        self.target
    }
    fn set_target(&mut self, t: Option<usize>) {
        self.target = t;
    }
    fn resend(&self) -> bool {
        self.resend
    }
    fn flow(&self) -> u64 {
        self.flow
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SchedStats {
    pub enqueued: u64,
    pub duplicated: u64,
    pub dropped: u64,
    pub resent: u64,
    /// Lowest-latency flows that had to leave their uplink.
    pub flow_moves: u64,
}

/// Set of links that have new work, as a bit mask over [`LinkId`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wake(pub u64);

impl Wake {
    /// Just link `id`.
    pub fn of(id: LinkId) -> Wake {
        let mut w = Wake::default();
        w.add(id);
        w
    }

    pub fn contains(self, id: LinkId) -> bool {
        id < 64 && self.0 & (1 << id) != 0
    }
    fn add(&mut self, id: LinkId) {
        if id < 64 {
            self.0 |= 1 << id;
        }
    }
    fn union(self, o: Wake) -> Wake {
        Wake(self.0 | o.0)
    }
}

#[derive(Debug)]
struct Slot {
    view: LinkView,
    /// What this link sent lately, with when, for a resend if it fails.
    recent: VecDeque<(Instant, Queued)>,
    present: bool,
}

#[derive(Debug, Clone, Copy)]
struct Sticky {
    link: LinkId,
    last: Instant,
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    links: Vec<Slot>,
    qos: Qos<Queued>,
    sticky: HashMap<u64, Sticky>,
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
            qos: Qos::new(cfg.qos.clone()),
            cfg,
            links: Vec::new(),
            sticky: HashMap::new(),
            next_seq: 0,
            next_twin: 0,
            twin_seqs: VecDeque::new(),
            stats: SchedStats::default(),
        }
    }

    /// New class modes and queue parameters; the queues are rebuilt (and emptied) only
    /// when their parameters change.
    pub fn reconfigure(&mut self, cfg: SchedulerConfig) {
        if cfg.qos != self.cfg.qos {
            self.qos = Qos::new(cfg.qos.clone());
        }
        self.cfg = cfg;
    }

    pub fn stats(&self) -> SchedStats {
        let mut s = self.stats;
        s.dropped = self.qos.dropped();
        s
    }

    pub fn class_stats(&self, now: Instant) -> Vec<ClassStats> {
        self.qos.stats(now)
    }

    pub fn queued_bytes(&self) -> usize {
        self.qos.bytes()
    }

    /// Whether `link` was last said to have room under its in-flight cap.
    pub fn room(&self, link: LinkId) -> bool {
        self.links.get(link).is_some_and(|s| s.view.room)
    }

    /// The uplink a lowest-latency flow is pinned to.
    pub fn flow_link(&self, flow: u64) -> Option<LinkId> {
        self.sticky.get(&flow).map(|s| s.link)
    }

    /// Adds an uplink (Down until told otherwise); ids are reused after removal.
    pub fn add_link(&mut self) -> LinkId {
        let slot = Slot {
            view: LinkView::down(),
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

    /// Removes an uplink; its targeted copies become free for the others (the receiver
    /// drops whichever copy arrives second).
    pub fn remove_link(&mut self, id: LinkId) {
        if let Some(slot) = self.links.get_mut(id) {
            slot.present = false;
            slot.recent.clear();
            self.qos.untarget(id);
            self.sticky.retain(|_, s| s.link != id);
        }
    }

    /// The peer reports that `seq` is the highest sequence number it received on `link`:
    /// what the link sent before that packet has arrived or was lost on the way, not in
    /// flight, so it is no longer kept for a resend. A number the link did not send (a
    /// stale report, a packet handed over to another link) forgets nothing.
    pub fn on_delivered(&mut self, link: LinkId, seq: u64) {
        let Some(slot) = self.links.get_mut(link) else {
            return;
        };
        // Only a link's new packets are numbered in send order: a resend keeps an older
        // number, which a new packet on this link may share (a redundant twin), so only
        // new packets are matched. A resend the peer's highest matches nothing: nothing
        // is forgotten, which is safe.
        if let Some(i) = slot
            .recent
            .iter()
            .position(|(_, q)| q.seq == seq && !q.resend)
        {
            slot.recent.drain(..=i);
        }
    }

    /// When `link` had sent `min_bytes` of packets not yet reported delivered (see
    /// [`Self::on_delivered`]): the send time of the packet that made them that many.
    pub fn unreported_since(&self, link: LinkId, min_bytes: usize) -> Option<Instant> {
        let slot = self.links.get(link)?;
        let mut bytes = 0usize;
        for (at, q) in &slot.recent {
            bytes = bytes.saturating_add(q.packet.len());
            if bytes >= min_bytes {
                return Some(*at);
            }
        }
        None
    }

    /// Updates what the scheduler knows of an uplink. Returns links that may now pull.
    pub fn update_link(&mut self, id: LinkId, view: LinkView) -> Wake {
        // Looked at only when the link fails (most updates are a link's room or RTT).
        let fails = !view.usable() && self.links.get(id).is_some_and(|s| s.view.usable());
        let elsewhere =
            fails
                && self.links.iter().enumerate().any(|(i, s)| {
                    i != id && s.present && (s.view.usable() || s.view.last_resort())
                });
        let Some(slot) = self.links.get_mut(id) else {
            return Wake::default();
        };
        let was = slot.view;
        slot.view = view;
        if fails {
            // Copies waiting for a link that just failed become free for a healthy link; so
            // do the packets it sent lately, unless no other link could carry them: the
            // failed one would then send them again itself, duplicates on the same path.
            if !elsewhere {
                slot.recent.clear();
            }
            let last = slot.recent.back().map(|r| r.0);
            let window = self.cfg.resend_window;
            let verified = was.verified_until;
            let resend: Vec<Queued> = slot
                .recent
                .drain(..)
                .filter(|(at, _)| verified.is_none_or(|v| *at >= v))
                .filter(|(at, _)| last.is_some_and(|l| l.saturating_duration_since(*at) <= window))
                .map(|(at, mut q)| {
                    q.resend = true;
                    q.twin = None;
                    q.target = None;
                    q.enqueued = last.unwrap_or(at);
                    q
                })
                .collect();
            // Only what fits: the newest packets are the ones most likely still missing.
            let mut room = self.cfg.qos.max_bytes.saturating_sub(self.qos.bytes());
            let mut keep = resend.len();
            for (i, q) in resend.iter().enumerate().rev() {
                if q.packet.len() > room {
                    break;
                }
                room -= q.packet.len();
                keep = i;
            }
            let resend: Vec<Queued> = resend.into_iter().skip(keep).collect();
            self.stats.resent += resend.len() as u64;
            self.qos.untarget(id);
            self.qos.requeue_front(resend);
        }
        if self.qos.is_empty() {
            Wake::default()
        } else {
            self.all_links()
        }
    }

    fn all_links(&self) -> Wake {
        let mut w = Wake::default();
        for (i, s) in self.links.iter().enumerate() {
            if s.present {
                w.add(i);
            }
        }
        w
    }

    /// True when no uplink can carry anything: none is up, and none is merely suspect
    /// (a probe overdue, which may be a moment's hiccup).
    pub fn hopeless(&self) -> bool {
        !self.links.iter().any(|s| {
            s.present
                && !s.view.disabled
                && matches!(s.view.state, LinkState::Up | LinkState::Suspect)
        })
    }

    /// True when at least one uplink can carry traffic.
    pub fn online(&self) -> bool {
        self.links.iter().any(|s| s.present && s.view.usable())
    }

    /// Queues an IP packet of `class` in flow `flow`. Returns the links that have new work.
    pub fn enqueue(&mut self, class: Class, flow: u64, packet: Bytes, now: Instant) -> Wake {
        self.stats.enqueued += 1;
        let mut q = Queued {
            seq: 0,
            twin: None,
            resend: false,
            class,
            flow,
            packet,
            enqueued: now,
            target: None,
        };
        let mut wake = Wake::default();
        match self.cfg.modes[class as usize] {
            Mode::Redundant => {
                let best = self.best_two(class);
                if let [Some(a), Some(b)] = best {
                    self.next_twin += 1;
                    q.twin = Some(self.next_twin);
                    let mut copy = q.clone();
                    copy.target = Some(b);
                    if self.qos.enqueue(copy) {
                        self.stats.duplicated += 1;
                        wake.add(b);
                    }
                    q.target = Some(a);
                } else if let [Some(a), None] = best {
                    q.target = Some(a);
                }
            }
            Mode::LowestLatency => {
                // Targeted packets do not need the link's in-flight room (bulk fills that);
                // they go ahead of bulk on their link.
                q.target = self.pinned(class, flow, now);
            }
            Mode::Aggregate => {}
        }
        let target = q.target;
        if !self.qos.enqueue(q) {
            return wake;
        }
        match target {
            Some(t) => {
                wake.add(t);
                wake
            }
            None => wake.union(self.eligible(class)),
        }
    }

    /// Links usable for `class`, best first: healthy before degraded, then by RTT; a
    /// backup only when no primary that may carry the class is usable (a backup stays
    /// quiet meanwhile, even for a second copy of a payment).
    fn ranked(&self, class: Class) -> Vec<LinkId> {
        let usable = |s: &&Slot| s.present && s.view.usable() && s.view.carries(class);
        let primary = self.links.iter().filter(usable).any(|s| !s.view.backup);
        let mut c: Vec<(bool, bool, Duration, LinkId)> = self
            .links
            .iter()
            .enumerate()
            .filter(|(_, s)| usable(s) && !(primary && s.view.backup))
            .map(|(i, s)| {
                (
                    s.view.degraded,
                    s.view.backup,
                    s.view.srtt.unwrap_or(Duration::MAX),
                    i,
                )
            })
            .collect();
        c.sort();
        c.into_iter().map(|x| x.3).collect()
    }

    /// The best two links for a redundant class; a degraded link only when there is no
    /// second healthy one.
    fn best_two(&self, class: Class) -> [Option<LinkId>; 2] {
        let r = self.ranked(class);
        [r.first().copied(), r.get(1).copied()]
    }

    /// The uplink of a lowest-latency flow: kept while it stays usable, healthy (when a
    /// healthy one exists) and allowed; otherwise the best link, preferring one with room.
    fn pinned(&mut self, class: Class, flow: u64, now: Instant) -> Option<LinkId> {
        let ranked = self.ranked(class);
        let first = *ranked.first()?;
        let healthy_exists = !self.links[first].view.degraded;
        if let Some(s) = self.sticky.get_mut(&flow) {
            let v = self.links.get(s.link).map(|l| (l.present, l.view));
            // (`ranked` leaves a backup out once a primary is usable: a flow that began
            // on a backup moves to the primary.)
            let keep = ranked.contains(&s.link)
                && v.is_some_and(|(present, v)| {
                    present && v.usable() && v.carries(class) && !(v.degraded && healthy_exists)
                });
            if keep {
                s.last = now;
                return Some(s.link);
            }
            self.stats.flow_moves += 1;
        }
        let pick = ranked
            .iter()
            .copied()
            .find(|&l| self.links[l].view.room)
            .unwrap_or(first);
        if self.sticky.len() >= MAX_STICKY && !self.sticky.contains_key(&flow) {
            let idle = self.cfg.sticky_idle;
            self.sticky
                .retain(|_, s| now.saturating_duration_since(s.last) < idle);
            if self.sticky.len() >= MAX_STICKY {
                return Some(pick);
            }
        }
        self.sticky.insert(
            flow,
            Sticky {
                link: pick,
                last: now,
            },
        );
        Some(pick)
    }

    /// Links allowed to pull free packets of `class` right now.
    pub fn eligible(&self, class: Class) -> Wake {
        let present = || {
            self.links
                .iter()
                .enumerate()
                .filter(|(_, s)| s.present && s.view.carries(class))
        };
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
        let path = |s: &Slot| s.view.min_rtt.or(s.view.srtt);
        let best = pool.iter().filter_map(|(_, s)| path(s)).min();
        for (i, s) in pool {
            if !s.view.room {
                continue;
            }
            let near = match (best, path(s)) {
                (Some(b), Some(r)) => r <= b * 2 + Duration::from_millis(40),
                _ => true,
            };
            if near {
                wake.add(i);
            }
        }
        wake
    }

    /// Classes whose free packets `link` may take now.
    fn free_mask(&self, link: LinkId) -> ClassMask {
        let mut m = 0;
        for c in 0..CLASSES as u8 {
            if let Some(class) = Class::from_u8(c) {
                if self.eligible(class).contains(link) {
                    m |= bit(class);
                }
            }
        }
        m
    }

    /// True when `link` would get a packet from [`Self::poll`].
    pub fn has_work(&self, link: LinkId) -> bool {
        self.qos.has_work(link, self.free_mask(link))
    }

    /// When a class held back by its maximum rate may send again, if one is.
    pub fn next_ready(&self) -> Option<Instant> {
        self.qos.next_ready()
    }

    /// The next packet for `link` to send, if any, with its sequence number. `allowed`
    /// limits the classes (a link held back by its pacer still sends POS).
    pub fn poll(&mut self, link: LinkId, allowed: ClassMask, now: Instant) -> Option<Queued> {
        let free = self.free_mask(link);
        let mut q = self.qos.dequeue(now, link, allowed, free)?;
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

    /// Gives a packet [`Self::poll`] returned to link `to` instead (the link that took it
    /// cannot carry it): first in line there, with its sequence number, like a resend.
    /// `from` never sent it, so it forgets it: it is neither resent when `from` fails nor
    /// waited for in `from`'s delivery reports.
    pub fn hand_over(&mut self, mut q: Queued, from: LinkId, to: LinkId) -> Wake {
        if let Some(slot) = self.links.get_mut(from) {
            // [`Self::poll`] remembered it last.
            if slot
                .recent
                .back()
                .is_some_and(|(_, r)| r.seq == q.seq && r.resend == q.resend)
            {
                slot.recent.pop_back();
            }
        }
        q.resend = true;
        q.twin = None;
        q.target = Some(to);
        self.qos.requeue_front(vec![q]);
        Wake::of(to)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(rtt_ms: u64, backup: bool) -> LinkView {
        LinkView {
            state: LinkState::Up,
            backup,
            srtt: Some(Duration::from_millis(rtt_ms)),
            min_rtt: Some(Duration::from_millis(rtt_ms)),
            disabled: false,
            room: true,
            verified_until: None,
            degraded: false,
            classes: ALL_CLASSES,
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
        s.enqueue(Class::Bulk, 0, pkt(0), t);
        assert_eq!(s.poll(b, ALL_CLASSES, t), None);
        assert!(s.poll(a, ALL_CLASSES, t).is_some());
        // Every link full: packets wait in the scheduler, POS copies still go.
        s.update_link(
            a,
            LinkView {
                room: false,
                ..up(20, false)
            },
        );
        s.enqueue(Class::Bulk, 0, pkt(1), t);
        assert_eq!(s.poll(a, ALL_CLASSES, t), None);
        assert_eq!(s.poll(b, ALL_CLASSES, t), None);
        s.enqueue(Class::Pos, 0, pkt(2), t);
        assert!(s.poll(a, ALL_CLASSES, t).is_some());
        // Room again: the waiting bulk packet goes.
        let wake = s.update_link(b, up(45, false));
        assert!(wake.contains(b));
        assert!(s.poll(b, ALL_CLASSES, t).is_some());
    }

    #[test]
    fn pos_goes_to_the_best_two() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b, c) = (s.add_link(), s.add_link(), s.add_link());
        s.update_link(a, up(80, false));
        s.update_link(b, up(20, false));
        s.update_link(c, up(45, false));
        let wake = s.enqueue(Class::Pos, 0, pkt(1), t);
        assert!(wake.contains(b) && wake.contains(c) && !wake.contains(a));
        let qb = s.poll(b, ALL_CLASSES, t).expect("copy on b");
        let qc = s.poll(c, ALL_CLASSES, t).expect("copy on c");
        assert_eq!(qb.seq, qc.seq);
        assert_eq!(s.poll(a, ALL_CLASSES, t), None);
    }

    #[test]
    fn bulk_is_pulled_by_whichever_link_has_room() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b) = (s.add_link(), s.add_link());
        s.update_link(a, up(20, false));
        s.update_link(b, up(45, false));
        for i in 0..4 {
            s.enqueue(Class::Bulk, 0, pkt(i), t);
        }
        let seqs: Vec<u64> = [a, b, a, b]
            .iter()
            .map(|&l| s.poll(l, ALL_CLASSES, t).expect("pkt").seq)
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
        s.enqueue(Class::Bulk, 0, pkt(0), t);
        assert_eq!(s.poll(slow, ALL_CLASSES, t), None);
        assert_eq!(s.poll(bk, ALL_CLASSES, t), None);
        assert!(s.poll(a, ALL_CLASSES, t).is_some());
        // Without any primary, the backup carries traffic.
        s.update_link(a, LinkView::down());
        s.update_link(slow, LinkView::down());
        s.enqueue(Class::Bulk, 0, pkt(1), t);
        assert!(s.poll(bk, ALL_CLASSES, t).is_some());
    }

    #[test]
    fn far_is_judged_on_the_paths_not_on_the_queues_they_carry() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (fast, slow) = (s.add_link(), s.add_link());
        // Paths of 20 and 70 ms: near enough (under 2 × 20 + 40). The slow link's queue
        // swings its smoothed RTT past that while the fast one's is empty: it still
        // pulls bulk.
        s.update_link(fast, up(20, false));
        s.update_link(
            slow,
            LinkView {
                srtt: Some(Duration::from_millis(95)),
                ..up(70, false)
            },
        );
        s.enqueue(Class::Bulk, 0, pkt(0), t);
        assert!(s.poll(slow, ALL_CLASSES, t).is_some());
        // A path of 90 ms is far, however empty the queues.
        s.update_link(slow, up(90, false));
        s.enqueue(Class::Bulk, 0, pkt(1), t);
        assert_eq!(s.poll(slow, ALL_CLASSES, t), None);
    }

    #[test]
    fn every_link_carries_increasing_sequence_numbers_even_when_pos_overtakes() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b) = (s.add_link(), s.add_link());
        s.update_link(a, up(20, false));
        s.update_link(b, up(30, false));
        for i in 0..3 {
            s.enqueue(Class::Bulk, 0, pkt(i), t);
        }
        s.enqueue(Class::Pos, 0, pkt(9), t);
        let mut per_link: [Vec<u64>; 2] = [vec![], vec![]];
        for l in [a, b, a, b, a, b] {
            if let Some(q) = s.poll(l, ALL_CLASSES, t) {
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
        s.enqueue(Class::Bulk, 0, pkt(0), t);
        let old = s.poll(a, ALL_CLASSES, t).expect("sent long ago").seq;
        for i in 1..4 {
            s.enqueue(Class::Bulk, 0, pkt(i), t + ms(1000));
        }
        let recent: Vec<u64> = (0..2)
            .map(|_| s.poll(a, ALL_CLASSES, t + ms(1000)).expect("sent").seq)
            .collect();
        let on_b = s.poll(b, ALL_CLASSES, t + ms(1000)).expect("b").seq;
        s.update_link(
            a,
            LinkView {
                state: LinkState::Suspect,
                ..up(20, false)
            },
        );
        assert_eq!(s.stats().resent, 2);
        let again: Vec<u64> = (0..2)
            .map(|_| s.poll(b, ALL_CLASSES, t + ms(1020)).expect("resent").seq)
            .collect();
        assert_eq!(again, recent, "same numbers, same order");
        assert!(!again.contains(&old) && !again.contains(&on_b));
        assert_eq!(s.poll(b, ALL_CLASSES, t + ms(1020)), None);
        assert_eq!(s.queued_bytes(), 0);
    }

    #[test]
    fn a_failing_link_with_no_other_to_take_over_does_not_resend_to_itself() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b) = (s.add_link(), s.add_link());
        s.update_link(a, up(20, false));
        s.update_link(b, LinkView::down());
        for i in 0..3 {
            s.enqueue(Class::Bulk, 0, pkt(i), t);
            s.poll(a, ALL_CLASSES, t).expect("sent");
        }
        let suspect = LinkView {
            state: LinkState::Suspect,
            ..up(20, false)
        };
        s.update_link(a, suspect);
        assert_eq!(s.stats().resent, 0);
        assert_eq!(s.queued_bytes(), 0, "nothing queued again");
        // It still carries new traffic as the last resort, and a second link that comes
        // up later does not get the old packets either.
        s.enqueue(Class::Bulk, 0, pkt(9), t + ms(10));
        assert_eq!(s.poll(a, ALL_CLASSES, t + ms(10)).map(|q| q.seq), Some(3));
        s.update_link(b, up(30, false));
        s.update_link(a, LinkView::down());
        assert_eq!(s.poll(b, ALL_CLASSES, t + ms(20)), None);
    }

    #[test]
    fn only_what_was_sent_after_the_last_answered_probe_is_resent() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b) = (s.add_link(), s.add_link());
        s.update_link(b, up(30, false));
        for i in 0..3 {
            s.enqueue(Class::Bulk, 0, pkt(i), t);
        }
        s.update_link(a, up(20, false));
        let first = s.poll(a, ALL_CLASSES, t).expect("p0").seq;
        let later: Vec<u64> = (0..2)
            .map(|_| s.poll(a, ALL_CLASSES, t + ms(50)).expect("p").seq)
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
            .map(|_| s.poll(b, ALL_CLASSES, t + ms(60)).expect("r").seq)
            .collect();
        assert_eq!(again, later);
        assert!(!again.contains(&first));
    }

    #[test]
    fn copies_of_a_failed_link_move_to_a_healthy_one() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig {
            modes: [Mode::Redundant; CLASSES],
            ..Default::default()
        });
        let (a, b, c) = (s.add_link(), s.add_link(), s.add_link());
        s.update_link(a, up(20, false));
        s.update_link(b, up(30, false));
        s.update_link(c, up(60, false));
        s.enqueue(Class::Bulk, 0, pkt(0), t);
        s.update_link(a, LinkView::down());
        assert_eq!(s.poll(c, ALL_CLASSES, t).map(|q| q.seq), Some(0));
    }

    /// What a link sent counts as unreported until the peer reports a later packet
    /// delivered; a packet handed over to another link never counts on the first.
    #[test]
    fn unreported_bytes_end_at_the_reported_packet_and_a_handed_over_one_is_not_counted() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b) = (s.add_link(), s.add_link());
        s.update_link(a, up(20, false));
        s.update_link(b, up(20, false));
        let ms = Duration::from_millis;
        let mut seqs = Vec::new();
        for i in 0..4u8 {
            s.enqueue(Class::Bulk, 0, pkt(i), t);
            let q = s
                .poll(a, ALL_CLASSES, t + ms(u64::from(i)))
                .expect("a packet");
            seqs.push(q.seq);
        }
        // 100-byte packets: 250 bytes are reached by the third.
        assert_eq!(s.unreported_since(a, 250), Some(t + ms(2)));
        s.on_delivered(a, seqs[1]);
        assert_eq!(s.unreported_since(a, 150), Some(t + ms(3)));
        assert_eq!(s.unreported_since(a, 250), None);
        // A number `a` never sent forgets nothing.
        s.on_delivered(a, u64::MAX);
        assert_eq!(s.unreported_since(a, 200), Some(t + ms(3)));
        // Taken by `a`, handed to `b`: not `a`'s to wait for (200 bytes stay, not 300).
        s.enqueue(Class::Bulk, 0, pkt(9), t);
        let q = s.poll(a, ALL_CLASSES, t + ms(5)).expect("a packet");
        let _ = s.hand_over(q, a, b);
        assert_eq!(s.unreported_since(a, 201), None);
        assert!(s.poll(b, ALL_CLASSES, t + ms(6)).is_some());
    }

    #[test]
    fn old_packets_and_overflow_are_dropped() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig {
            qos: QosConfig {
                max_bytes: 250,
                ..Default::default()
            },
            ..Default::default()
        });
        let a = s.add_link();
        s.enqueue(Class::Bulk, 0, pkt(0), t);
        s.enqueue(Class::Bulk, 0, pkt(1), t);
        s.enqueue(Class::Bulk, 0, pkt(2), t);
        assert_eq!(
            s.class_stats(Instant::now())[Class::Bulk as usize].dropped_full,
            1
        );
        s.update_link(a, up(20, false));
        assert_eq!(s.poll(a, ALL_CLASSES, t + Duration::from_secs(1)), None);
        assert_eq!(
            s.class_stats(Instant::now())[Class::Bulk as usize].dropped_sojourn,
            2
        );
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
        s.enqueue(Class::Pos, 0, pkt(0), t);
        assert_eq!(s.poll(b, ALL_CLASSES, t), None);
        assert!(s.poll(a, ALL_CLASSES, t).is_some());
    }

    #[test]
    fn a_lowest_latency_flow_sticks_to_its_link_until_it_degrades() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b) = (s.add_link(), s.add_link());
        s.update_link(a, up(20, false));
        s.update_link(b, up(45, false));
        let w = s.enqueue(Class::Stream, 7, pkt(0), t);
        assert!(w.contains(a) && !w.contains(b));
        assert_eq!(s.poll(b, ALL_CLASSES, t), None, "pinned to a");
        assert!(s.poll(a, ALL_CLASSES, t).is_some());
        // RTTs cross: the flow does not move (no flapping on RTT noise).
        s.update_link(a, up(50, false));
        s.update_link(b, up(30, false));
        s.enqueue(Class::Stream, 7, pkt(1), t);
        assert_eq!(s.flow_link(7), Some(a));
        assert!(s.poll(a, ALL_CLASSES, t).is_some());
        // A new flow picks the now-better link.
        s.enqueue(Class::Stream, 8, pkt(2), t);
        assert_eq!(s.flow_link(8), Some(b));
        // a degrades: flow 7 moves to b, once.
        s.update_link(
            a,
            LinkView {
                degraded: true,
                ..up(50, false)
            },
        );
        s.enqueue(Class::Stream, 7, pkt(3), t);
        assert_eq!(s.flow_link(7), Some(b));
        assert_eq!(s.stats().flow_moves, 1);
    }

    #[test]
    fn degraded_links_lose_pos_while_a_healthy_pair_exists() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (a, b, c) = (s.add_link(), s.add_link(), s.add_link());
        s.update_link(
            a,
            LinkView {
                degraded: true,
                ..up(10, false)
            },
        );
        s.update_link(b, up(40, false));
        s.update_link(c, up(60, false));
        let w = s.enqueue(Class::Pos, 0, pkt(1), t);
        assert!(!w.contains(a) && w.contains(b) && w.contains(c));
        // With only one healthy link, the degraded one is the second copy (better than one).
        s.update_link(c, LinkView::down());
        let w = s.enqueue(Class::Pos, 0, pkt(2), t);
        assert!(w.contains(a) && w.contains(b));
        // Bulk may still use the degraded link.
        assert!(s.eligible(Class::Bulk).contains(a));
    }

    #[test]
    fn a_class_stays_off_links_it_may_not_use() {
        let t = Instant::now();
        let mut s = Scheduler::new(SchedulerConfig::default());
        let (wifi, lte) = (s.add_link(), s.add_link());
        s.update_link(wifi, up(20, false));
        s.update_link(
            lte,
            LinkView {
                classes: ALL_CLASSES & !bit(Class::Bulk),
                ..up(20, false)
            },
        );
        for i in 0..4 {
            s.enqueue(Class::Bulk, 0, pkt(i), t);
        }
        assert_eq!(s.poll(lte, ALL_CLASSES, t), None);
        // Even with wifi gone, bulk never goes on the metered link.
        s.update_link(wifi, LinkView::down());
        assert_eq!(s.poll(lte, ALL_CLASSES, t), None);
        s.enqueue(Class::Pos, 0, pkt(9), t);
        assert!(s.poll(lte, ALL_CLASSES, t).is_some());
        assert!(!s.hopeless());
        s.update_link(lte, LinkView::down());
        assert!(s.hopeless());
    }
}

//! Per-class queues: strict priority for `pos`, then classes under their guaranteed
//! minimum rate, then deficit round robin by weight; per-class maximum rates; a CoDel
//! sojourn-time controller per queue (RFC 8289) plus a hard sojourn limit, so no queue
//! holds more than a few tens of milliseconds; bounded memory, dropping from the lowest
//! class first when full.
//!
//! Within a class, a packet of a flow that has nothing in the class's ordinary queue and
//! less than `SPARSE_QUANTUM` bytes waiting in its *sparse lane* (a DNS query, a call's
//! voice, a 200 packet/s telemetry flow beside four uploads) takes that lane, which is
//! served before the rest of the class and is exempt from CoDel (fq_codel's new-flow
//! idea, without a queue per flow): congestion drops and queueing delay fall on the flows
//! that build the queue, not on the ones that only pass through it. A flow past its
//! allowance joins the back of the class, and stays there while it has packets there, so
//! its order holds. A failed uplink's resends wait at the head of the ordinary queue; a
//! light flow's new packets may overtake its own resends (late beats lost), but a flow
//! with more than its allowance of resends waiting is not light: it carried more than a
//! light flow's rate on the failed uplink, and its new packets wait behind its resends
//! (were they let past, a few bulk flows refilling the lane as fast as the survivor
//! drains it would hold every resend back until its sojourn limit dropped it). The lane
//! is small (`SPARSE_MAX` bytes per class), so a flood of one-packet flows meets the
//! ordinary queue.
//!
//! Items may be *targeted* at one uplink (a redundant copy, a flow pinned to its uplink)
//! or free for any uplink allowed to take their class; [`Qos::dequeue`] is asked on behalf
//! of one uplink and takes only what that uplink may carry.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::Class;

pub const CLASSES: usize = 5;

/// What the queues need to know of an item.
pub trait QItem {
    fn class(&self) -> Class;
    fn size(&self) -> usize;
    fn enqueued(&self) -> Instant;
    fn target(&self) -> Option<usize>;
    fn set_target(&mut self, t: Option<usize>);
    /// Already sent once (a resend after an uplink failed): not a congestion signal, so
    /// CoDel leaves it alone and it gets the POS sojourn limit.
    fn resend(&self) -> bool {
        false
    }
    /// The flow the item belongs to (a hash of its addresses and ports).
    fn flow(&self) -> u64 {
        0
    }
}

/// Bytes a class's sparse lane holds at most.
const SPARSE_MAX: usize = 64 * 1024;
/// Bytes one flow may have waiting in the sparse lane: a 200 packet/s flow of 200-byte
/// packets rides out 200 ms without a free uplink (an uplink failing silently, before it
/// is found out); a bulk flow's first five full-size packets.
const SPARSE_QUANTUM: usize = 8 * 1024;

/// What one flow has queued in a class.
#[derive(Debug, Clone, Copy, Default)]
struct FlowBacklog {
    /// Packets in the ordinary queue.
    ordinary: u32,
    /// Bytes in the sparse lane.
    sparse_bytes: usize,
    /// Bytes of resends in the ordinary queue.
    resend_bytes: usize,
}

impl FlowBacklog {
    fn is_empty(&self) -> bool {
        self.ordinary == 0 && self.sparse_bytes == 0 && self.resend_bytes == 0
    }
}

/// Bit mask over classes.
pub type ClassMask = u8;
pub const ALL_CLASSES: ClassMask = 0b1_1111;

pub fn bit(c: Class) -> ClassMask {
    1 << c as u8
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassParams {
    pub weight: u32,
    /// Bytes per second.
    pub min_rate: Option<f64>,
    pub max_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QosConfig {
    pub classes: [ClassParams; CLASSES],
    /// All queues together (POS has its own small bound and is never dropped for others).
    pub max_bytes: usize,
    pub max_pos_bytes: usize,
    pub codel_target: Duration,
    pub codel_interval: Duration,
    /// Hard limit: older packets are dropped whatever CoDel thinks. CoDel keeps standing
    /// queues near `codel_target`; this bounds transients (an uplink failing over).
    pub max_sojourn: Duration,
    /// POS waits longer before it is given up (it is tiny and precious).
    pub max_pos_sojourn: Duration,
}

impl Default for QosConfig {
    fn default() -> Self {
        let p = |weight| ClassParams {
            weight,
            min_rate: None,
            max_rate: None,
        };
        Self {
            classes: [p(100), p(8), p(4), p(2), p(1)],
            max_bytes: 1024 * 1024,
            max_pos_bytes: 128 * 1024,
            codel_target: Duration::from_millis(5),
            codel_interval: Duration::from_millis(100),
            max_sojourn: Duration::from_millis(150),
            max_pos_sojourn: Duration::from_millis(500),
        }
    }
}

/// Queue delay histogram (upper bounds in milliseconds).
const BOUNDS_MS: [f64; 28] = [
    0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0,
    60.0, 80.0, 100.0, 150.0, 200.0, 300.0, 500.0, 750.0, 1000.0, 2000.0, 5000.0,
];

#[derive(Debug, Clone, Default)]
pub struct DelayHist {
    counts: [u64; BOUNDS_MS.len() + 1],
    total: u64,
}

impl DelayHist {
    pub fn record(&mut self, d: Duration) {
        let ms = d.as_secs_f64() * 1e3;
        let i = BOUNDS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(BOUNDS_MS.len());
        self.counts[i] += 1;
        self.total += 1;
    }
    /// Upper bound (ms) of the bucket holding quantile `q`; None when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let want = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(BOUNDS_MS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        None
    }
}

#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ClassStats {
    pub class: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub dropped_full: u64,
    pub dropped_codel: u64,
    pub dropped_sojourn: u64,
    pub queued_packets: usize,
    pub queued_bytes: usize,
    pub delay_p50_ms: Option<f64>,
    pub delay_p99_ms: Option<f64>,
    /// Milliseconds since a packet of the class was last sent (none yet: `None`).
    pub idle_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn new(rate: f64, burst_time: Duration) -> Self {
        let burst = (rate * burst_time.as_secs_f64()).max(3000.0);
        Self {
            tokens: burst,
            rate,
            burst,
        }
    }
    fn refill(&mut self, dt: Duration) {
        self.tokens = (self.tokens + self.rate * dt.as_secs_f64()).min(self.burst);
    }
}

/// RFC 8289 CoDel state of one queue.
#[derive(Debug, Clone, Default)]
struct Codel {
    first_above: Option<Instant>,
    drop_next: Option<Instant>,
    count: u32,
    last_count: u32,
    dropping: bool,
}

impl Codel {
    fn control_law(t: Instant, interval: Duration, count: u32) -> Instant {
        t + interval.div_f64(f64::from(count.max(1)).sqrt())
    }

    /// Called for each packet leaving the queue; true means drop it.
    fn should_drop(
        &mut self,
        sojourn: Duration,
        backlog: usize,
        now: Instant,
        target: Duration,
        interval: Duration,
    ) -> bool {
        let ok_to_drop = if sojourn < target || backlog <= 1500 {
            self.first_above = None;
            false
        } else {
            match self.first_above {
                None => {
                    self.first_above = Some(now + interval);
                    false
                }
                Some(t) => now >= t,
            }
        };
        if self.dropping {
            if !ok_to_drop {
                self.dropping = false;
                return false;
            }
            if self.drop_next.is_some_and(|t| now >= t) {
                self.count += 1;
                self.drop_next = Some(Self::control_law(
                    self.drop_next.unwrap_or(now),
                    interval,
                    self.count,
                ));
                return true;
            }
            return false;
        }
        if ok_to_drop {
            self.dropping = true;
            let delta = self.count.saturating_sub(self.last_count);
            let recent = self
                .drop_next
                .is_some_and(|t| now.saturating_duration_since(t) < interval * 16);
            self.count = if delta > 1 && recent { delta } else { 1 };
            self.drop_next = Some(Self::control_law(now, interval, self.count));
            self.last_count = self.count;
            return true;
        }
        false
    }
}

#[derive(Debug)]
struct ClassQueue<T> {
    /// The sparse lane: packets of flows that had nothing in the ordinary queue and room
    /// in their allowance when they arrived; served first.
    sparse: VecDeque<T>,
    sparse_bytes: usize,
    /// The rest, in arrival order.
    items: VecDeque<T>,
    /// What each flow has queued (no entry: nothing).
    backlog: HashMap<u64, FlowBacklog>,
    bytes: usize,
    deficit: i64,
    codel: Codel,
    min: Option<Bucket>,
    max: Option<Bucket>,
    stats: ClassStats,
    delay: DelayHist,
    /// When a packet of the class last left the queue.
    last_out: Option<Instant>,
}

impl<T: QItem> ClassQueue<T> {
    fn is_empty(&self) -> bool {
        self.sparse.is_empty() && self.items.is_empty()
    }

    fn len(&self) -> usize {
        self.sparse.len() + self.items.len()
    }

    /// Every queued item, sparse lane first (the order they are served in).
    fn iter(&self) -> impl Iterator<Item = &T> {
        self.sparse.iter().chain(self.items.iter())
    }

    /// Appends an item: to the sparse lane when `sparse_ok`, its flow has nothing in the
    /// ordinary queue, no more than its allowance of resends waiting and room in its
    /// allowance, and the lane has room; else to the back of the class. Returns its size.
    fn push_back(&mut self, item: T, sparse_ok: bool) -> usize {
        let len = item.size();
        let f = self.backlog.entry(item.flow()).or_default();
        if item.resend() {
            f.resend_bytes += len;
            self.bytes += len;
            self.items.push_back(item);
            return len;
        }
        let sparse = sparse_ok
            && f.ordinary == 0
            && f.resend_bytes <= SPARSE_QUANTUM
            && f.sparse_bytes + len <= SPARSE_QUANTUM
            && self.sparse_bytes + len <= SPARSE_MAX;
        self.bytes += len;
        if sparse {
            f.sparse_bytes += len;
            self.sparse_bytes += len;
            self.sparse.push_back(item);
        } else {
            f.ordinary += 1;
            self.items.push_back(item);
        }
        len
    }

    /// Puts an item at the head of the ordinary queue. A resend counts in its flow's
    /// backlog by its bytes, not as a packet: it is already late, and a light flow's new
    /// packets need not queue behind a failed uplink's resend burst (a heavy flow's do:
    /// see [`Self::push_back`]).
    fn push_front(&mut self, item: T) -> usize {
        let len = item.size();
        let f = self.backlog.entry(item.flow()).or_default();
        if item.resend() {
            f.resend_bytes += len;
        } else {
            f.ordinary += 1;
        }
        self.bytes += len;
        self.items.push_front(item);
        len
    }

    /// Removes item `i` of the lane (`sparse` or not); returns it.
    fn remove(&mut self, sparse: bool, i: usize) -> Option<T> {
        let item = if sparse {
            self.sparse.remove(i)?
        } else {
            self.items.remove(i)?
        };
        let len = item.size();
        if sparse {
            self.sparse_bytes -= len;
        }
        self.bytes -= len;
        if let Some(f) = self.backlog.get_mut(&item.flow()) {
            if sparse {
                f.sparse_bytes = f.sparse_bytes.saturating_sub(len);
            } else if item.resend() {
                f.resend_bytes = f.resend_bytes.saturating_sub(len);
            } else {
                f.ordinary = f.ordinary.saturating_sub(1);
            }
            if f.is_empty() {
                self.backlog.remove(&item.flow());
            }
        }
        Some(item)
    }

    /// The first item `link` may take (targeted at it, or free when `take_free`), sparse
    /// lane first: (lane, index).
    fn find(&self, link: usize, take_free: bool) -> Option<(bool, usize)> {
        if let Some(i) = self.sparse.iter().position(|i| fits(i, link, take_free)) {
            return Some((true, i));
        }
        let i = self.items.iter().position(|i| fits(i, link, take_free))?;
        Some((false, i))
    }
}

/// The class queues of one direction of one bond.
#[derive(Debug)]
pub struct Qos<T> {
    cfg: QosConfig,
    queues: [ClassQueue<T>; CLASSES],
    bytes: usize,
    rr: usize,
    last_refill: Option<Instant>,
}

const QUANTUM: i64 = 1500;

impl<T: QItem> Qos<T> {
    pub fn new(cfg: QosConfig) -> Self {
        let queues = std::array::from_fn(|i| {
            let p = cfg.classes[i];
            ClassQueue {
                sparse: VecDeque::new(),
                sparse_bytes: 0,
                items: VecDeque::new(),
                backlog: HashMap::new(),
                bytes: 0,
                deficit: 0,
                codel: Codel::default(),
                min: p
                    .min_rate
                    .map(|r| Bucket::new(r, Duration::from_millis(50))),
                max: p
                    .max_rate
                    .map(|r| Bucket::new(r, Duration::from_millis(10))),
                stats: ClassStats {
                    class: Class::from_u8(i as u8).map_or("?", Class::name),
                    ..Default::default()
                },
                delay: DelayHist::default(),
                last_out: None,
            }
        });
        Self {
            cfg,
            queues,
            bytes: 0,
            rr: 1,
            last_refill: None,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(ClassQueue::is_empty)
    }

    /// Queues an item; false when it (or nothing else) could be kept.
    pub fn enqueue(&mut self, item: T) -> bool {
        let c = item.class() as usize;
        let len = item.size();
        if c == Class::Pos as usize {
            if self.queues[c].bytes + len > self.cfg.max_pos_bytes {
                self.queues[c].stats.dropped_full += 1;
                return false;
            }
        } else {
            // Full: make room by dropping the oldest packets of the lowest classes, never of
            // a class above the newcomer's.
            while self.bytes - self.queues[0].bytes + len > self.cfg.max_bytes {
                let Some(victim) = (c..CLASSES).rev().find(|&v| !self.queues[v].is_empty()) else {
                    self.queues[c].stats.dropped_full += 1;
                    return false;
                };
                // The oldest of the class's ordinary lane, else of its sparse lane.
                let q = &mut self.queues[victim];
                let sparse = q.items.is_empty();
                if let Some(old) = q.remove(sparse, 0) {
                    self.bytes -= old.size();
                    self.queues[victim].stats.dropped_full += 1;
                }
            }
        }
        // Payments have their own class; resends never take a lane (`push_back`).
        self.bytes += self.queues[c].push_back(item, c != Class::Pos as usize);
        true
    }

    /// Puts items back at the head of their class queues (resends), keeping their order.
    pub fn requeue_front(&mut self, items: Vec<T>) {
        for item in items.into_iter().rev() {
            let c = item.class() as usize;
            self.bytes += self.queues[c].push_front(item);
        }
    }

    /// Items targeted at `link` become free for any uplink.
    pub fn untarget(&mut self, link: usize) {
        for q in &mut self.queues {
            for i in q.sparse.iter_mut().chain(q.items.iter_mut()) {
                if i.target() == Some(link) {
                    i.set_target(None);
                }
            }
        }
    }

    /// Classes with an item `link` could take now (targeted at it, or free and in `free`).
    pub fn has_work(&self, link: usize, free: ClassMask) -> bool {
        self.queues
            .iter()
            .enumerate()
            .any(|(c, q)| q.iter().any(|i| fits(i, link, free & (1 << c) != 0)))
    }

    /// When a class with queued items, held back by its maximum rate, has tokens again.
    pub fn next_ready(&self) -> Option<Instant> {
        let since = self.last_refill?;
        self.queues
            .iter()
            .filter(|q| !q.is_empty())
            .filter_map(|q| q.max.filter(|b| b.tokens <= 0.0))
            .map(|b| since + Duration::from_secs_f64((1.0 - b.tokens) / b.rate.max(1.0)))
            .min()
    }

    fn refill(&mut self, now: Instant) {
        let dt = self
            .last_refill
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.last_refill = Some(now);
        for q in &mut self.queues {
            if let Some(b) = &mut q.min {
                b.refill(dt);
            }
            if let Some(b) = &mut q.max {
                b.refill(dt);
            }
        }
    }

    /// Drops items at the head of class `c`'s lanes that waited past the hard limit (the
    /// sparse lane's, like POS and resends, get the longer one: they are few and wanted).
    fn expire(&mut self, c: usize, now: Instant) {
        for sparse in [true, false] {
            loop {
                let q = &self.queues[c];
                let front = if sparse {
                    q.sparse.front()
                } else {
                    q.items.front()
                };
                let Some(front) = front else { break };
                let limit = if c == Class::Pos as usize || sparse || front.resend() {
                    self.cfg.max_pos_sojourn
                } else {
                    self.cfg.max_sojourn
                };
                if now.saturating_duration_since(front.enqueued()) <= limit {
                    break;
                }
                if let Some(old) = self.queues[c].remove(sparse, 0) {
                    self.bytes -= old.size();
                }
                self.queues[c].stats.dropped_sojourn += 1;
            }
        }
    }

    /// The next item for `link`: among classes in `allowed`, items targeted at `link`, and
    /// free items of classes in `free` (the classes `link` may carry right now).
    pub fn dequeue(
        &mut self,
        now: Instant,
        link: usize,
        allowed: ClassMask,
        free: ClassMask,
    ) -> Option<T> {
        self.refill(now);
        for c in 0..CLASSES {
            self.expire(c, now);
        }
        for _attempt in 0..64 {
            let c = self.pick(link, allowed, free)?;
            let q = &mut self.queues[c];
            let take_free = free & (1 << c) != 0;
            let (sparse, i) = q.find(link, take_free)?;
            let item = q.remove(sparse, i)?;
            let len = item.size();
            self.bytes -= len;
            let q = &mut self.queues[c];
            let sojourn = now.saturating_duration_since(item.enqueued());
            if c != Class::Pos as usize
                && !sparse
                && !item.resend()
                && q.codel.should_drop(
                    sojourn,
                    q.bytes,
                    now,
                    self.cfg.codel_target,
                    self.cfg.codel_interval,
                )
            {
                q.stats.dropped_codel += 1;
                continue;
            }
            q.delay.record(sojourn);
            q.last_out = Some(now);
            q.stats.packets += 1;
            q.stats.bytes += len as u64;
            q.deficit -= len as i64;
            for b in [&mut q.min, &mut q.max].into_iter().flatten() {
                b.tokens -= len as f64;
            }
            if let Some(b) = &mut q.min {
                b.tokens = b.tokens.max(0.0);
            }
            return Some(item);
        }
        None
    }

    /// Which class serves next.
    fn pick(&mut self, link: usize, allowed: ClassMask, free: ClassMask) -> Option<usize> {
        let candidate = |c: usize, q: &ClassQueue<T>| {
            allowed & (1 << c) != 0
                && q.max.is_none_or(|b| b.tokens > 0.0)
                && q.iter().any(|i| fits(i, link, free & (1 << c) != 0))
        };
        let cand: [bool; CLASSES] = std::array::from_fn(|c| candidate(c, &self.queues[c]));
        if cand[Class::Pos as usize] {
            return Some(Class::Pos as usize);
        }
        // Guaranteed minimum rates first, most important class first.
        if let Some(c) =
            (1..CLASSES).find(|&c| cand[c] && self.queues[c].min.is_some_and(|b| b.tokens > 0.0))
        {
            return Some(c);
        }
        if !cand.iter().any(|x| *x) {
            return None;
        }
        for _ in 0..4 * 64 {
            let c = self.rr;
            if cand[c] {
                if self.queues[c].deficit > 0 {
                    return Some(c);
                }
                let w = i64::from(self.cfg.classes[c].weight.max(1));
                self.queues[c].deficit += w * QUANTUM;
            } else if self.queues[c].is_empty() {
                self.queues[c].deficit = 0;
            }
            self.rr = if c + 1 >= CLASSES { 1 } else { c + 1 };
        }
        (1..CLASSES).find(|&c| cand[c])
    }

    pub fn stats(&self, now: Instant) -> Vec<ClassStats> {
        self.queues
            .iter()
            .map(|q| ClassStats {
                idle_ms: q
                    .last_out
                    .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                queued_packets: q.len(),
                queued_bytes: q.bytes,
                delay_p50_ms: q.delay.quantile(0.5),
                delay_p99_ms: q.delay.quantile(0.99),
                ..q.stats.clone()
            })
            .collect()
    }

    /// Total packets dropped (any reason) across classes.
    pub fn dropped(&self) -> u64 {
        self.queues
            .iter()
            .map(|q| q.stats.dropped_full + q.stats.dropped_codel + q.stats.dropped_sojourn)
            .sum()
    }
}

fn fits<T: QItem>(i: &T, link: usize, take_free: bool) -> bool {
    match i.target() {
        Some(t) => t == link,
        None => take_free,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct It {
        class: Class,
        size: usize,
        at: Instant,
        target: Option<usize>,
        n: u32,
        flow: u64,
        resend: bool,
    }

    impl QItem for It {
        fn class(&self) -> Class {
            self.class
        }
        fn size(&self) -> usize {
            self.size
        }
        fn enqueued(&self) -> Instant {
            self.at
        }
        fn target(&self) -> Option<usize> {
            self.target
        }
        fn set_target(&mut self, t: Option<usize>) {
            self.target = t;
        }
        fn flow(&self) -> u64 {
            self.flow
        }
        fn resend(&self) -> bool {
            self.resend
        }
    }

    fn it(class: Class, at: Instant, n: u32) -> It {
        It {
            class,
            size: 1000,
            at,
            target: None,
            n,
            flow: 0,
            resend: false,
        }
    }

    fn of_flow(flow: u64, class: Class, at: Instant, n: u32) -> It {
        It {
            flow,
            size: if flow == 0 { 1000 } else { 200 },
            ..it(class, at, n)
        }
    }

    #[test]
    fn a_sparse_flow_passes_a_standing_queue_unharmed() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut q = Qos::new(QosConfig::default());
        // Flow 0 overloads the class (1000-byte packets, two in per 2 ms, one out per 3 ms
        // of link); flow 7 sends a 200-byte packet every 6 ms.
        let (mut sent7, mut got7, mut worst7) = (0, 0, Duration::ZERO);
        for step in 0..6000u64 {
            let now = t + ms(step) / 3;
            if step % 3 == 0 {
                q.enqueue(of_flow(0, Class::Bulk, now, 0));
            }
            if step % 18 == 0 {
                q.enqueue(of_flow(7, Class::Bulk, now, sent7));
                sent7 += 1;
            }
            if step % 9 == 0 {
                if let Some(i) = q.dequeue(now, 0, ALL_CLASSES, ALL_CLASSES) {
                    if i.flow == 7 {
                        assert_eq!(i.n, got7, "flow 7 in order");
                        got7 += 1;
                        // (After the fat flow's first packets, which took the lane.)
                        if i.n >= 20 {
                            worst7 = worst7.max(now.duration_since(i.at));
                        }
                    }
                }
            }
        }
        let s = &q.stats(Instant::now())[Class::Bulk as usize];
        // The queue's drops fell on the flow that built it.
        assert!(s.dropped_codel + s.dropped_sojourn > 0, "{s:?}");
        assert!(sent7 - got7 <= 1, "flow 7: {got7} of {sent7}");
        assert!(worst7 <= ms(4), "flow 7 waited {worst7:?}");
    }

    #[test]
    fn a_flow_keeps_its_order_across_the_lanes_and_floods_meet_the_ordinary_queue() {
        let t = Instant::now();
        let mut q = Qos::new(QosConfig::default());
        // Flow 0's first SPARSE_QUANTUM bytes take the sparse lane, the rest the ordinary
        // queue; flow 5's two small packets the lane too.
        let k = (SPARSE_QUANTUM / 1000) as u32;
        for n in 0..=k {
            q.enqueue(of_flow(0, Class::Bulk, t, n));
        }
        q.enqueue(of_flow(5, Class::Bulk, t, 100));
        q.enqueue(of_flow(5, Class::Bulk, t, 101));
        let order: Vec<u32> = std::iter::from_fn(|| q.dequeue(t, 0, ALL_CLASSES, ALL_CLASSES))
            .map(|i| i.n)
            .collect();
        let mut want: Vec<u32> = (0..k).collect();
        want.extend([100, 101, k]);
        assert_eq!(order, want);
        // Once a flow has packets in the ordinary queue, its next ones follow them there,
        // behind a newcomer's.
        for n in 0..=k {
            q.enqueue(of_flow(0, Class::Bulk, t, n));
        }
        q.enqueue(of_flow(9, Class::Bulk, t, 900));
        q.enqueue(of_flow(0, Class::Bulk, t, k + 1));
        let order: Vec<u32> = std::iter::from_fn(|| q.dequeue(t, 0, ALL_CLASSES, ALL_CLASSES))
            .map(|i| i.n)
            .collect();
        let mut want: Vec<u32> = (0..k).collect();
        want.extend([900, k, k + 1]);
        assert_eq!(order, want);
        // A thousand one-packet flows: the lane takes its share, the rest queue in order.
        for f in 1..=1000u64 {
            q.enqueue(of_flow(f, Class::Bulk, t, f as u32));
        }
        let lane = q.queues[Class::Bulk as usize].sparse_bytes;
        assert!(lane > SPARSE_MAX - 200 && lane <= SPARSE_MAX, "{lane}");
        assert_eq!(q.queues[Class::Bulk as usize].len(), 1000);
        let mut n = 0;
        while q.dequeue(t, 0, ALL_CLASSES, ALL_CLASSES).is_some() {
            n += 1;
        }
        assert_eq!(n, 1000);
        assert_eq!(q.bytes(), 0);
        assert!(q.queues[Class::Bulk as usize].backlog.is_empty());
    }

    #[test]
    fn pos_is_served_first_then_weights_share_the_rest() {
        let t = Instant::now();
        let mut q = Qos::new(QosConfig::default());
        for n in 0..40 {
            q.enqueue(it(Class::Bulk, t, n));
            q.enqueue(it(Class::Stream, t, n));
        }
        q.enqueue(it(Class::Pos, t, 99));
        let first = q.dequeue(t, 0, ALL_CLASSES, ALL_CLASSES).expect("pos");
        assert_eq!(first.class, Class::Pos);
        let mut counts = [0u32; CLASSES];
        for _ in 0..40 {
            let i = q.dequeue(t, 0, ALL_CLASSES, ALL_CLASSES).expect("item");
            counts[i.class as usize] += 1;
        }
        // Weights 8 (stream) : 2 (bulk).
        assert!(counts[1] >= 30 && counts[3] >= 6, "{counts:?}");
    }

    #[test]
    fn a_class_under_its_minimum_rate_goes_before_heavier_weights() {
        let t = Instant::now();
        let mut cfg = QosConfig::default();
        cfg.classes[Class::Bulk as usize].min_rate = Some(1_000_000.0);
        cfg.classes[Class::Bulk as usize].weight = 1;
        let mut q = Qos::new(cfg);
        for n in 0..20 {
            q.enqueue(it(Class::Stream, t, n));
            q.enqueue(it(Class::Bulk, t, n));
        }
        // The bucket's burst (50 ms at 1 MB/s = 50 kB) lets bulk go first.
        let i = q.dequeue(t, 0, ALL_CLASSES, ALL_CLASSES).expect("item");
        assert_eq!(i.class, Class::Bulk);
    }

    #[test]
    fn a_capped_class_waits_for_its_tokens() {
        let t = Instant::now();
        let mut cfg = QosConfig::default();
        cfg.classes[Class::Guest as usize].max_rate = Some(100_000.0); // 3000 B burst
        let mut q = Qos::new(cfg);
        for n in 0..10 {
            q.enqueue(it(Class::Guest, t, n));
        }
        let mut sent = 0;
        while q.dequeue(t, 0, ALL_CLASSES, ALL_CLASSES).is_some() {
            sent += 1;
        }
        assert_eq!(sent, 3);
        // 20 ms later, 2000 more bytes of tokens.
        let later = t + Duration::from_millis(20);
        let mut more = 0;
        while q.dequeue(later, 0, ALL_CLASSES, ALL_CLASSES).is_some() {
            more += 1;
        }
        assert_eq!(more, 2);
    }

    #[test]
    fn full_queues_drop_the_lowest_class_first() {
        let t = Instant::now();
        let mut q = Qos::new(QosConfig {
            max_bytes: 5000,
            ..Default::default()
        });
        for n in 0..5 {
            assert!(q.enqueue(it(Class::Guest, t, n)));
        }
        assert!(q.enqueue(it(Class::Stream, t, 9)));
        assert_eq!(
            q.stats(Instant::now())[Class::Guest as usize].dropped_full,
            1
        );
        assert_eq!(
            q.stats(Instant::now())[Class::Guest as usize].queued_packets,
            4
        );
        // A guest packet cannot push out stream.
        for n in 0..4 {
            q.enqueue(it(Class::Stream, t, n));
        }
        assert!(!q.enqueue(it(Class::Guest, t, 50)));
        assert_eq!(
            q.stats(Instant::now())[Class::Stream as usize].queued_packets,
            5
        );
        assert!(q.bytes() <= 5000);
    }

    #[test]
    fn codel_and_the_hard_limit_keep_queues_short() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut q = Qos::new(QosConfig::default());
        // A standing queue: 1 packet in every 2 ms, 1 out every 3 ms, for 2 s.
        let mut sojourns = Vec::new();
        let mut n = 0;
        for step in 0..6000u64 {
            let now = t + ms(step) / 3;
            if step % 6 == 0 || step % 6 == 3 {
                // two packets in per 2 ms
                q.enqueue(it(Class::Bulk, now, n));
                n += 1;
            }
            if step % 9 == 0 {
                if let Some(i) = q.dequeue(now, 0, ALL_CLASSES, ALL_CLASSES) {
                    sojourns.push(now.duration_since(i.at));
                }
            }
        }
        let s = &q.stats(Instant::now())[Class::Bulk as usize];
        assert!(s.dropped_codel > 0, "{s:?}");
        let late = &sojourns[sojourns.len() / 2..];
        let worst = late.iter().max().copied().unwrap_or_default();
        // An unresponsive source overloading the queue: CoDel drops, and the hard limit
        // bounds what CoDel alone would not.
        assert!(worst <= ms(150), "worst sojourn {worst:?}");
        assert!(s.dropped_sojourn > 0, "{s:?}");
    }

    #[test]
    fn a_light_flow_overtakes_its_resends_and_a_heavy_flow_waits_behind_its_own() {
        let t = Instant::now();
        let mut q = Qos::new(QosConfig::default());
        // A failed uplink's resends: 40 full-size packets of a bulk flow (0), 8 small ones
        // of a 200 packet/s flow (7), interleaved as the uplink carried them.
        let mut resends = Vec::new();
        for n in 0..40 {
            resends.push(It {
                resend: true,
                ..of_flow(0, Class::Bulk, t, n)
            });
            if n % 5 == 0 {
                resends.push(It {
                    resend: true,
                    ..of_flow(7, Class::Bulk, t, n)
                });
            }
        }
        q.requeue_front(resends);
        // Both flows go on sending.
        let later = t + Duration::from_millis(5);
        q.enqueue(of_flow(0, Class::Bulk, later, 100));
        q.enqueue(of_flow(7, Class::Bulk, later, 100));
        // The light flow's new packet goes first (late beats lost for its resends); the
        // bulk flow's waits behind every resend, its own included, so the resends drain
        // at the link's rate instead of being overtaken until their sojourn limit.
        let order: Vec<(u64, u32)> = std::iter::from_fn(|| {
            q.dequeue(later, 0, ALL_CLASSES, ALL_CLASSES)
                .map(|i| (i.flow, i.n))
        })
        .collect();
        assert_eq!(order.first(), Some(&(7, 100)), "{order:?}");
        assert_eq!(order.last(), Some(&(0, 100)), "{order:?}");
        assert_eq!(order.len(), 50);
        assert!(q.queues[Class::Bulk as usize].backlog.is_empty());
    }

    #[test]
    fn targeted_items_go_only_to_their_link_and_free_ones_to_allowed_links() {
        let t = Instant::now();
        let mut q = Qos::new(QosConfig::default());
        q.enqueue(It {
            target: Some(1),
            ..it(Class::Stream, t, 1)
        });
        q.enqueue(it(Class::Bulk, t, 2));
        // Link 0 may not carry bulk: nothing for it.
        assert_eq!(q.dequeue(t, 0, ALL_CLASSES, !bit(Class::Bulk)), None);
        assert_eq!(q.dequeue(t, 1, ALL_CLASSES, 0).map(|i| i.n), Some(1));
        q.enqueue(It {
            target: Some(1),
            ..it(Class::Stream, t, 3)
        });
        q.untarget(1);
        assert_eq!(
            q.dequeue(t, 0, ALL_CLASSES, ALL_CLASSES).map(|i| i.n),
            Some(3)
        );
        // A paced link takes only POS.
        assert_eq!(q.dequeue(t, 0, bit(Class::Pos), ALL_CLASSES), None);
        assert_eq!(
            q.dequeue(t, 0, ALL_CLASSES, ALL_CLASSES).map(|i| i.n),
            Some(2)
        );
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = DelayHist::default();
        for i in 0..100 {
            h.record(Duration::from_micros(100 + i * 10));
        }
        h.record(Duration::from_millis(45));
        assert_eq!(h.quantile(0.5), Some(1.0));
        assert_eq!(h.quantile(1.0), Some(50.0));
    }
}

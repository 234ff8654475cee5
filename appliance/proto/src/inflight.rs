//! How much one uplink may have in flight: one path's worth (the link's delivery rate
//! times its round trip) and a few milliseconds more.
//!
//! The receiver reports, every [`REPORT_EVERY`], how many UDP bytes it has received on
//! the connection. From two reports the sender learns the delivery rate (a windowed
//! maximum is the capacity estimate); from the latest report, the bytes sent (the
//! transport's total plus what the bond handed it since) and the transport's lost bytes
//! it learns what is in flight. Between two reports the link goes on delivering: the
//! bytes it delivered since the latest one are estimated at its recent delivery rate
//! (for at most [`EXTRAPOLATE`]), so room opens as the link drains, smoothly, not in one
//! burst per report. A link whose in-flight bytes reach the cap stops taking shared
//! traffic until room opens ([`Inflight::room_at`] says when, without a new report).
//!
//! Once the link has been found full, it sends about what the link delivers, and its
//! bottleneck queue (a modem's buffer) holds about [`HEADROOM`]: enough to keep the
//! link busy, short enough that a card payment queued behind it waits a few
//! milliseconds, not tens. The tunnel adds no loss of its own, and aggregation follows
//! what each link really carries. A fresh link has no cap until its first report; until
//! it is found full, its cap is [`GROWTH`] times the found-full one, so it ramps up like
//! slow start.
//!
//! [`REPORT_EVERY`]: crate::bond::REPORT_EVERY

use std::collections::VecDeque;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(2);
/// Delivery-rate samples span at least this (µs): shorter ones are mostly noise from
/// report timing, and a maximum over noise overestimates the capacity.
const SAMPLE_US: u64 = 40_000;
/// Reports further apart than this (µs) mean the link carried nothing between them (it
/// was down, or had nothing to carry): no delivery-rate sample spans such a gap, and the
/// samples taken before it keep their age (a link back from an outage or a pause is
/// trusted with what it carried before it, not made to grow again from nothing).
const SILENCE_US: u64 = 250_000;
/// A silence longer than this forgets the samples: what the link carried that long ago
/// says little of what it carries now.
const MEMORY: Duration = Duration::from_secs(60);
/// How long after a report its count is carried forward at the delivery rate: a report
/// and a half. A link whose reports stop (a black hole, a stalled peer) is not assumed
/// to deliver for longer.
const EXTRAPOLATE: Duration = Duration::from_micros(15_000);
/// Room that opens between reports is announced this much after it opens, so that a
/// link at its cap is looked at again every few packets, not after every one.
const ROOM_STEP: Duration = Duration::from_micros(500);
/// The bottleneck queue the cap allows beyond one path's worth.
pub const HEADROOM: Duration = Duration::from_millis(3);
/// While a link grows into its capacity, the cap is this much more than what it delivers
/// (so the delivery rate, and the cap with it, grows by about this much per round trip).
pub const GROWTH: f64 = 1.4;
/// A link not found at its cap for a [`WINDOW`] carried what it was given, not what it
/// can: its delivery rate says little of its capacity. Its cap is then this much more,
/// or what its rate control lets it send in a round trip if that is more, so traffic
/// that moves onto it (another uplink failed, a download began) is carried at once, and
/// the rate control's delay signal, not a stale delivery rate, finds where it fills.
pub const UNTESTED_GAIN: f64 = 2.0;
/// The most of a report's extra delay on its way back (a queue on the reverse path)
/// that is taken as deliveries it has not counted.
const REVERSE_LAG_MAX: Duration = Duration::from_millis(100);
/// How fast the reverse path's baseline delay rises towards a higher one, per report
/// (so a route change or the clocks' drift is followed within tens of seconds, while
/// a queue that comes and goes is not taken for the path).
const REVERSE_RISE: f64 = 0.0005;
/// Never cap below this: a link must be able to start, and a short path's cap must
/// outlast a late wake-up (a timer's millisecond, a busy core). Eight full-size packets:
/// on a path of a millisecond or two, where the cap is this floor, it is what waits in
/// front of the modem, 5 ms at 20 Mbit/s (24 KB held 10 ms there, and POS took that
/// wait on every round trip).
const FLOOR: u64 = 12 * 1024;

#[derive(Debug, Clone, Default)]
pub struct Inflight {
    /// Latest report: receiver's byte count and its clock (µs).
    last: Option<(u64, u64)>,
    /// When the latest report came (our clock): how long a silence lasted.
    last_at: Option<Instant>,
    /// The link went down since the latest report: what it had in flight has either
    /// arrived (a report will say) or is lost, and until a report comes it is not
    /// counted (see [`Inflight::forget_in_flight`]).
    unknown: bool,
    /// Start of the current delivery-rate sample (a report at least `SAMPLE` old).
    anchor: Option<(u64, u64)>,
    /// Delivery-rate samples (bytes/s) with the time they were taken.
    samples: VecDeque<(Instant, f64)>,
    /// The latest sample (bytes/s): the rate at which deliveries since the latest
    /// report are estimated.
    recent: f64,
    sent: u64,
    /// Bytes handed to the transport since its last total (`sent`), counted at once so
    /// that the cap holds between two readings of the transport's totals (which come
    /// with the bond's timer). A new total replaces them, even if a few of them still
    /// wait in the transport's datagram buffer.
    handed: u64,
    lost: u64,
    min_rtt: Option<Duration>,
    /// When the link was last found at its cap (see [`Inflight::on_full`]).
    full_at: Option<Instant>,
    /// Our clock's origin for the reverse path's delay.
    origin: Option<Instant>,
    /// The latest report's delay on its way to us, µs, up to the clocks' offset
    /// (arrival on our clock less its time on the peer's), and its baseline.
    reverse: i64,
    reverse_base: Option<f64>,
}

/// What the link's rate control says, for the cap.
#[derive(Debug, Clone, Copy)]
pub struct RateView {
    /// It has found the link full ([`crate::rate::Phase::Steady`]): no growth margin.
    pub steady: bool,
    /// Its sending rate, bytes per second.
    pub rate: f64,
}

impl Inflight {
    pub fn new() -> Self {
        Self::default()
    }

    /// The receiver's report.
    pub fn on_report(&mut self, rx_bytes: u64, at_us: u64, now: Instant) {
        if let Some((rx0, t0)) = self.last {
            if at_us <= t0 || rx_bytes < rx0 {
                if rx_bytes < rx0 {
                    // The peer restarted its counter.
                    self.last = Some((rx_bytes, at_us));
                    self.anchor = self.last;
                }
                return;
            }
        }
        if let (Some((_, t0)), Some(at)) = (self.last, self.last_at) {
            if at_us.saturating_sub(t0) > SILENCE_US {
                let silent = now.saturating_duration_since(at);
                if silent > MEMORY {
                    self.samples.clear();
                }
                // Nothing flowed during the silence: no deliveries are assumed until
                // the next sample says the link delivers again.
                self.recent = 0.0;
                for s in &mut self.samples {
                    s.0 += silent;
                }
                // Nor does it make what was measured at its cap untested.
                if let Some(t) = &mut self.full_at {
                    *t += silent;
                }
                self.anchor = None;
            }
        }
        self.last = Some((rx_bytes, at_us));
        self.last_at = Some(now);
        self.unknown = false;
        let origin = *self.origin.get_or_insert(now);
        let local_us =
            i64::try_from(now.saturating_duration_since(origin).as_micros()).unwrap_or(i64::MAX);
        self.reverse = local_us.saturating_sub(i64::try_from(at_us).unwrap_or(i64::MAX));
        let d = self.reverse as f64;
        self.reverse_base = Some(match self.reverse_base {
            Some(b) if d > b => b + (d - b) * REVERSE_RISE,
            _ => d,
        });
        let Some((rx0, t0)) = self.anchor else {
            self.anchor = self.last;
            return;
        };
        if at_us.saturating_sub(t0) < SAMPLE_US {
            return;
        }
        let dt = (at_us - t0) as f64 / 1e6;
        self.recent = rx_bytes.saturating_sub(rx0) as f64 / dt;
        self.samples.push_back((now, self.recent));
        self.anchor = self.last;
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Totals from the transport: UDP bytes sent and bytes declared lost.
    pub fn on_transport(&mut self, sent_bytes: u64, lost_bytes: u64, min_rtt: Option<Duration>) {
        self.sent = sent_bytes;
        self.handed = 0;
        self.lost = lost_bytes;
        self.min_rtt = min_rtt;
    }

    /// Mean delivery rate (bytes/s) over the samples of the last `window`.
    pub fn delivery_rate(&self, now: Instant, window: Duration) -> f64 {
        let recent: Vec<f64> = self
            .samples
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) <= window)
            .map(|s| s.1)
            .collect();
        if recent.is_empty() {
            0.0
        } else {
            recent.iter().sum::<f64>() / recent.len() as f64
        }
    }

    /// Windowed maximum delivery rate, bytes per second.
    pub fn capacity(&self) -> f64 {
        self.samples.iter().map(|s| s.1).fold(0.0, f64::max)
    }

    /// A datagram of `bytes` (with the transport's overhead) handed to the transport.
    pub fn on_handed(&mut self, bytes: usize) {
        self.handed = self.handed.saturating_add(bytes as u64);
    }

    /// Bytes in flight as of the latest report: sent, not reported delivered, not lost.
    fn reported_in_flight(&self) -> u64 {
        let delivered = self.last.map_or(0, |l| l.0);
        self.sent
            .saturating_add(self.handed)
            .saturating_sub(delivered)
            .saturating_sub(self.lost)
    }

    /// How much later than its path's least the latest report came (a queue on the way
    /// back, bounded by [`REVERSE_LAG_MAX`]): the link went on delivering meanwhile.
    fn reverse_lag(&self) -> Duration {
        let excess = self
            .reverse_base
            .map_or(0.0, |b| (self.reverse as f64 - b).max(0.0));
        Duration::try_from_secs_f64(excess / 1e6)
            .unwrap_or(Duration::ZERO)
            .min(REVERSE_LAG_MAX)
    }

    /// Bytes in flight at `now`: as of the latest report, less what the link has
    /// delivered since at its recent rate: since the report arrived (for at most
    /// [`EXTRAPOLATE`]) and while it waited in a queue on its way back.
    pub fn in_flight(&self, now: Instant) -> u64 {
        let since = self
            .last_at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at))
            .min(EXTRAPOLATE)
            + self.reverse_lag();
        // Not above the rate and the window it is taken over: both are bounded (the
        // rate by what a report can say over a sample's span), and `as` saturates.
        let drained = (self.recent * since.as_secs_f64()) as u64;
        self.reported_in_flight().saturating_sub(drained)
    }

    /// The link was found at its cap at `now`: its delivery rate is what it can carry.
    pub fn on_full(&mut self, now: Instant) {
        self.full_at = Some(now);
    }

    /// The cap at `now`: with no margin once the rate control has found the link full,
    /// with [`GROWTH`] while it is still growing into its capacity (a new link, or
    /// capacity come back), and as [`UNTESTED_GAIN`] says when the link has not been at
    /// its cap lately.
    pub fn cap(&self, rc: RateView, now: Instant) -> u64 {
        let rtt = self.min_rtt.unwrap_or(Duration::from_millis(100));
        let pipe = (rtt + HEADROOM).as_secs_f64();
        let tested = self
            .full_at
            .is_some_and(|t| now.saturating_duration_since(t) <= WINDOW);
        // Rates and the round trip are finite and bounded; `as` saturates.
        let delivered = self.capacity() * pipe;
        let cap = match (tested, rc.steady) {
            (false, _) => (delivered * UNTESTED_GAIN).max(rc.rate * pipe),
            (true, true) => delivered,
            (true, false) => delivered * GROWTH,
        };
        (cap as u64).max(FLOOR)
    }

    /// When a link at its cap has room again without a new report (its deliveries since
    /// the latest one, at its recent rate, bring it under the cap), if it will; `None`
    /// while it has room, or when only a report can free it.
    pub fn room_at(&self, rc: RateView, now: Instant) -> Option<Instant> {
        if self.last.is_none() || self.unknown || self.recent <= 0.0 {
            return None;
        }
        let lag = self.reverse_lag();
        let over = self.reported_in_flight().checked_sub(self.cap(rc, now))?;
        let at = self.last_at?;
        let wait = Duration::try_from_secs_f64(over as f64 / self.recent)
            .ok()?
            .saturating_sub(lag);
        (wait < EXTRAPOLATE).then(|| at + wait + ROOM_STEP)
    }

    /// The link went down: until the next report, what it had in flight is not counted.
    /// Those bytes either arrived, and the report that said so may have been lost with
    /// the link, or were lost with it; counted, they could keep a link that came back
    /// from taking any data, and so from eliciting the report that would free it.
    pub fn forget_in_flight(&mut self) {
        self.unknown = true;
    }

    /// True while the link may take more shared traffic. Without reports yet (a new link,
    /// an old peer) or since it went down, there is no cap.
    pub fn has_room(&self, rc: RateView, now: Instant) -> bool {
        self.last.is_none() || self.unknown || self.in_flight(now) < self.cap(rc, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rate control that found the link full, and one still growing; both sending
    /// slowly enough that their rate does not set the cap.
    const STEADY: RateView = RateView {
        steady: true,
        rate: 1.0,
    };
    const GROWING: RateView = RateView {
        steady: false,
        rate: 1.0,
    };

    #[test]
    fn cap_follows_the_delivery_rate() {
        let t = Instant::now();
        let mut f = Inflight::new();
        assert!(f.has_room(GROWING, t));
        // 10 Mbit/s = 1.25 MB/s delivered, 45 ms RTT.
        ten_mbit(&mut f, t);
        let now = t + Duration::from_millis(200);
        f.on_transport(250_000 + 40_000, 0, Some(Duration::from_millis(45)));
        // Never found at its cap: what it delivered may be all it was given; 2 × 1.25
        // MB/s × (45 + 3) ms.
        let cap = f.cap(STEADY, now);
        assert!((115_000..=125_000).contains(&cap), "cap {cap}");
        f.on_full(now);
        // Growing: 1.4 × 1.25 MB/s × 48 ms.
        let cap = f.cap(GROWING, now);
        assert!((80_000..=88_000).contains(&cap), "cap {cap}");
        // Found full: 1.25 MB/s × 48 ms.
        let cap = f.cap(STEADY, now);
        assert!((57_000..=63_000).contains(&cap), "cap {cap}");
        assert!(f.has_room(STEADY, now), "40 kB in flight");
        f.on_transport(250_000 + 120_000, 0, Some(Duration::from_millis(45)));
        assert!(!f.has_room(STEADY, now), "120 kB in flight");
        // Handed to the transport, not yet in its totals: in flight at once.
        f.on_transport(250_000 + 40_000, 0, Some(Duration::from_millis(45)));
        f.on_handed(40_000);
        assert!(!f.has_room(STEADY, now), "40 kB sent and 40 kB handed over");
        // Lost bytes are no longer in flight.
        f.on_transport(250_000 + 120_000, 70_000, Some(Duration::from_millis(45)));
        assert!(f.has_room(STEADY, now));
        // Two seconds later without being found at its cap again, it has the untested
        // margin back.
        let later = now + WINDOW + Duration::from_millis(1);
        assert!(f.cap(STEADY, later) > f.cap(STEADY, now) * 19 / 10);
    }

    #[test]
    fn between_reports_the_link_is_taken_to_deliver_at_its_rate() {
        let t = Instant::now();
        let mut f = Inflight::new();
        // 1.25 MB/s delivered, the latest report at 200 ms; 70 kB in flight then, over
        // the found-full cap (60 kB).
        ten_mbit(&mut f, t);
        let at = t + Duration::from_millis(200);
        f.on_full(at);
        f.on_transport(250_000 + 70_000, 0, Some(Duration::from_millis(45)));
        assert!(!f.has_room(STEADY, at));
        // 10 kB over at 1.25 MB/s: room in 8 ms (announced half a millisecond later).
        let room = f.room_at(STEADY, at).expect("room opens without a report");
        assert_eq!(room, at + Duration::from_micros(8_500));
        assert!(!f.has_room(STEADY, at + Duration::from_millis(7)));
        assert!(f.has_room(STEADY, room));
        assert_eq!(f.in_flight(at + Duration::from_millis(10)), 70_000 - 12_500);
        // No report for longer than EXTRAPOLATE: no more deliveries are assumed.
        assert_eq!(f.in_flight(at + Duration::from_secs(1)), 70_000 - 18_750);
        // So room that only more than that would open waits for a report.
        f.on_transport(250_000 + 90_000, 0, Some(Duration::from_millis(45)));
        assert_eq!(f.room_at(STEADY, at), None);
        assert!(!f.has_room(STEADY, at + Duration::from_secs(1)));
        // Under the cap: no time to wait for.
        f.on_transport(250_000 + 30_000, 0, Some(Duration::from_millis(45)));
        assert_eq!(f.room_at(STEADY, at), None);
    }

    #[test]
    fn a_report_held_up_on_its_way_back_counts_what_the_link_delivered_meanwhile() {
        let t = Instant::now();
        let mut f = Inflight::new();
        // 1.25 MB/s, reports every 20 ms taking the path's least time back.
        ten_mbit(&mut f, t);
        f.on_full(t + Duration::from_millis(200));
        f.on_transport(250_000 + 70_000, 0, Some(Duration::from_millis(45)));
        let at = t + Duration::from_millis(200);
        assert_eq!(f.in_flight(at), 70_000);
        // The next report, written at 220 ms, waited 8 ms in a queue on the way back:
        // the link delivered 10 kB more than it says by the time it arrives.
        let late = t + Duration::from_millis(228);
        f.on_report(275_000, 220_000, late);
        f.on_transport(250_000 + 70_000, 0, Some(Duration::from_millis(45)));
        // (Less a few bytes: the path's baseline rises a little towards each report.)
        let left = f.in_flight(late);
        assert!((35_000..=35_010).contains(&left), "{left}");
        // A lag beyond REVERSE_LAG_MAX counts only up to it.
        let later = t + Duration::from_millis(240 + 500);
        f.on_report(300_000, 240_000, later);
        f.on_transport(300_000 + 200_000, 0, Some(Duration::from_millis(45)));
        assert_eq!(f.in_flight(later), 200_000 - 125_000);
    }

    #[test]
    fn a_link_not_at_its_cap_lately_may_take_what_its_rate_control_sends() {
        let t = Instant::now();
        let mut f = Inflight::new();
        // It carried 1.25 MB/s of what it was given; its rate control allows 5 MB/s.
        ten_mbit(&mut f, t);
        f.on_transport(250_000, 0, Some(Duration::from_millis(45)));
        let now = t + Duration::from_millis(200);
        let rc = RateView {
            steady: true,
            rate: 5_000_000.0,
        };
        // 5 MB/s × 48 ms, not 2 × 1.25 MB/s × 48 ms.
        assert_eq!(f.cap(rc, now), 240_000);
        // Once found at its cap, its delivery rate is what it carries.
        f.on_full(now);
        assert_eq!(f.cap(rc, now), 60_000);
    }

    #[test]
    fn old_samples_age_out_and_a_reset_counter_is_survived() {
        let t = Instant::now();
        let mut f = Inflight::new();
        f.on_report(0, 0, t);
        f.on_report(1_000_000, 100_000, t); // 10 MB/s burst
        f.on_report(1_010_000, 200_000, t + Duration::from_secs(3));
        assert!(f.capacity() < 200_000.0, "{}", f.capacity());
        f.on_report(5, 300_000, t + Duration::from_secs(3));
        assert_eq!(f.in_flight(t + Duration::from_secs(3)), 0);
    }

    /// 10 Mbit/s = 1.25 MB/s delivered for 200 ms, reports every 20 ms: 250 kB.
    fn ten_mbit(f: &mut Inflight, t: Instant) {
        for i in 0..=10u64 {
            f.on_report(i * 25_000, i * 20_000, t + Duration::from_millis(i * 20));
        }
    }

    /// 20 Mbit/s = 2.5 MB/s delivered for 400 ms, reports every 10 ms.
    fn busy(f: &mut Inflight, t: Instant) -> (u64, u64) {
        for i in 0..=40u64 {
            f.on_report(i * 25_000, i * 10_000, t + Duration::from_millis(i * 10));
        }
        (40 * 25_000, 400_000)
    }

    #[test]
    fn a_silent_link_keeps_what_it_carried_before() {
        let t = Instant::now();
        let mut f = Inflight::new();
        let (rx, at) = busy(&mut f, t);
        let before = f.capacity();
        assert!((2.4e6..2.6e6).contains(&before), "{before}");
        // Three seconds of outage, then a trickle: the samples from before stay, and no
        // sample spans the silence.
        let back = t + Duration::from_millis(3_400);
        f.on_report(rx + 100, at + 3_000_000, back);
        f.on_report(rx + 300, at + 3_050_000, back + Duration::from_millis(50));
        assert_eq!(f.capacity(), before);
        // Two seconds of reports later they have aged out as usual.
        for i in 1..=30u64 {
            let later = back + Duration::from_millis(50 + i * 70);
            f.on_report(rx + 300 + i * 700, at + 3_050_000 + i * 70_000, later);
        }
        assert!(f.capacity() < 20_000.0, "{}", f.capacity());
        // After a silence longer than MEMORY, nothing of before is kept.
        let mut g = Inflight::new();
        let (rx, at) = busy(&mut g, t);
        let much_later = t + MEMORY + Duration::from_secs(1);
        g.on_report(
            rx + 100,
            at + (MEMORY.as_micros() as u64) + 600_000,
            much_later,
        );
        assert_eq!(g.capacity(), 0.0);
    }

    #[test]
    fn what_a_link_had_in_flight_when_it_went_down_holds_it_back_only_until_a_report() {
        let t = Instant::now();
        let mut f = Inflight::new();
        let (rx, at) = busy(&mut f, t);
        let now = t + Duration::from_millis(400);
        f.on_full(now);
        f.on_transport(rx + 200_000, 0, Some(Duration::from_millis(20)));
        assert!(!f.has_room(STEADY, now), "200 kB in flight");
        f.forget_in_flight();
        assert!(
            f.has_room(STEADY, now),
            "not counted once the link went down"
        );
        // The next report says what arrived: the cap holds again (and nothing is taken
        // as delivered since: the link was silent).
        let later = t + Duration::from_secs(2);
        f.on_report(rx + 10_000, at + 2_000_000, later);
        f.on_full(later);
        assert!(!f.has_room(STEADY, later + EXTRAPOLATE), "190 kB in flight");
    }
}

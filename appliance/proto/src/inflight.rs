//! How much one uplink may have in flight: one path's worth (the link's delivery rate
//! times its round trip and the time between reports) and a few milliseconds more.
//!
//! The receiver reports, every [`REPORT_EVERY`], how many UDP bytes it has received on
//! the connection. From two reports the sender learns the delivery rate (a windowed
//! maximum is the capacity estimate); from the latest report, the bytes sent (the
//! transport's total plus what the bond handed it since) and the transport's lost bytes
//! it learns what is in flight. A link whose in-flight bytes reach the cap stops taking
//! shared traffic until a report frees room.
//!
//! Once the link has been found full, between two reports it sends about what the link
//! delivers in that time, and its bottleneck queue (a modem's buffer) holds about
//! [`HEADROOM`]: enough to keep the link busy while the next report travels, short
//! enough that a card payment queued behind it waits a few milliseconds, not tens. The
//! tunnel adds no loss of its own, and aggregation follows what each link really
//! carries. A fresh link has no cap until its first report; until it is found full, its
//! cap is [`GROWTH`] times the found-full one, so it ramps up like slow start.
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
/// Up to one report interval of delivered bytes is not yet reported: the cap allows it.
const REPORT_LAG: Duration = crate::bond::REPORT_EVERY;
/// The bottleneck queue the cap allows beyond one path's worth.
pub const HEADROOM: Duration = Duration::from_millis(3);
/// While a link grows into its capacity, the cap is this much more than what it delivers
/// (so the delivery rate, and the cap with it, grows by about this much per round trip).
pub const GROWTH: f64 = 1.4;
/// Never cap below this: a link must be able to start.
const FLOOR: u64 = 24 * 1024;

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
    sent: u64,
    /// Bytes handed to the transport since its last total (`sent`), counted at once so
    /// that the cap holds between two readings of the transport's totals (which come
    /// with the bond's timer). A new total replaces them, even if a few of them still
    /// wait in the transport's datagram buffer.
    handed: u64,
    lost: u64,
    min_rtt: Option<Duration>,
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
                for s in &mut self.samples {
                    s.0 += silent;
                }
                self.anchor = None;
            }
        }
        self.last = Some((rx_bytes, at_us));
        self.last_at = Some(now);
        self.unknown = false;
        let Some((rx0, t0)) = self.anchor else {
            self.anchor = self.last;
            return;
        };
        if at_us.saturating_sub(t0) < SAMPLE_US {
            return;
        }
        let dt = (at_us - t0) as f64 / 1e6;
        self.samples
            .push_back((now, rx_bytes.saturating_sub(rx0) as f64 / dt));
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

    pub fn in_flight(&self) -> u64 {
        let delivered = self.last.map_or(0, |l| l.0);
        self.sent
            .saturating_add(self.handed)
            .saturating_sub(delivered)
            .saturating_sub(self.lost)
    }

    /// The cap: `steady` when the link has been found full (its rate control is in
    /// [`crate::rate::Phase::Steady`]: no growth margin), else it is still growing into
    /// its capacity (a new link, or capacity come back).
    pub fn cap(&self, steady: bool) -> u64 {
        let rtt = self.min_rtt.unwrap_or(Duration::from_millis(100));
        let pipe = (rtt + REPORT_LAG + HEADROOM).as_secs_f64();
        let gain = if steady { 1.0 } else { GROWTH };
        ((self.capacity() * pipe * gain) as u64).max(FLOOR)
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
    pub fn has_room(&self, steady: bool) -> bool {
        self.last.is_none() || self.unknown || self.in_flight() < self.cap(steady)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_follows_the_delivery_rate() {
        let t = Instant::now();
        let mut f = Inflight::new();
        assert!(f.has_room(false));
        // 10 Mbit/s = 1.25 MB/s delivered, 45 ms RTT.
        for i in 0..=10u64 {
            f.on_report(i * 25_000, i * 20_000, t + Duration::from_millis(i * 20));
        }
        f.on_transport(250_000 + 40_000, 0, Some(Duration::from_millis(45)));
        // Growing: 1.4 × 1.25 MB/s × (45 + 10 + 3) ms.
        let cap = f.cap(false);
        assert!((95_000..=110_000).contains(&cap), "cap {cap}");
        // Found full: 1.25 MB/s × 58 ms.
        let cap = f.cap(true);
        assert!((68_000..=78_000).contains(&cap), "cap {cap}");
        assert!(f.has_room(true), "40 kB in flight");
        f.on_transport(250_000 + 120_000, 0, Some(Duration::from_millis(45)));
        assert!(!f.has_room(true), "120 kB in flight");
        // Handed to the transport, not yet in its totals: in flight at once.
        f.on_transport(250_000 + 40_000, 0, Some(Duration::from_millis(45)));
        f.on_handed(40_000);
        assert!(!f.has_room(true), "40 kB sent and 40 kB handed over");
        // Lost bytes are no longer in flight.
        f.on_transport(250_000 + 120_000, 60_000, Some(Duration::from_millis(45)));
        assert!(f.has_room(true));
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
        assert_eq!(f.in_flight(), 0);
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
        f.on_transport(rx + 200_000, 0, Some(Duration::from_millis(20)));
        assert!(!f.has_room(true), "200 kB in flight");
        f.forget_in_flight();
        assert!(f.has_room(true), "not counted once the link went down");
        // The next report says what arrived: the cap holds again.
        f.on_report(rx + 10_000, at + 2_000_000, t + Duration::from_secs(2));
        assert!(!f.has_room(true), "190 kB in flight");
    }
}

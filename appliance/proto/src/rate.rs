//! Per-uplink rate control: never send faster than the uplink can carry.
//!
//! The idea of cake-autorate with the hub as the reflector (ICMP reflectors do not answer
//! through carrier NAT): every probe answered by the far end carries the far end's clock
//! at arrival, a one-way delay sample in our sending direction (up to a constant clock
//! offset, which the baseline cancels), so a saturated opposite direction does not slow
//! this one down; every receiver report is a delivery-rate sample. The delay over its
//! baseline (a slowly rising minimum) tells when a queue is building in front of the
//! uplink (a modem's buffer); the delivery rate tells what the link carried meanwhile.
//!
//! - Bufferbloat (2 of the last 4 samples more than `bloat` above the baseline): the rate
//!   drops to 90 % of what was delivered, less what drains the standing queue within about
//!   a second (or by 20 % if the link was barely used and the pacer held nothing back),
//!   at most once per `hold`.
//! - Wanted (the pacer held traffic back since the last sample, or delivery reached a
//!   share of the rate) and no bloat: the rate grows. In [`Phase::Startup`] (a new
//!   uplink, or one whose rate has grown unhindered for a while) it grows by half per
//!   sample, so a gigabit link is found within about a second, BBR's startup idea with the
//!   one-way delay as its exit signal; in [`Phase::Steady`] (after bufferbloat was seen)
//!   by 8 % per sample, probing gently for capacity that has come back.
//! - Otherwise (an idle link) the rate holds.
//!
//! [`Pacer`] turns the rate into send times (a token bucket with a small burst).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The least and the most an uplink's rate may be, bytes per second: both finite and
/// positive, the least not above the most (so keeping a rate within them never panics,
/// whatever the config said).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateBounds {
    min: f64,
    max: f64,
}

impl RateBounds {
    /// 500 kbit/s to 1 Gbit/s.
    pub const DEFAULT: RateBounds = RateBounds {
        min: 62_500.0,
        max: 125_000_000.0,
    };

    /// `None` unless `0 < min <= max` and both are finite.
    pub fn new(min: f64, max: f64) -> Option<Self> {
        (min.is_finite() && max.is_finite() && min > 0.0 && min <= max).then_some(Self { min, max })
    }

    pub fn min(self) -> f64 {
        self.min
    }

    pub fn max(self) -> f64 {
        self.max
    }

    /// `rate` kept within the bounds (NaN becomes the least).
    pub fn fit(self, rate: f64) -> f64 {
        if rate.is_nan() {
            return self.min;
        }
        rate.max(self.min).min(self.max)
    }
}

#[derive(Debug, Clone)]
pub struct RateConfig {
    pub bounds: RateBounds,
    /// Bytes per second before anything was learnt (kept within the bounds).
    pub initial: f64,
    pub bloat: Duration,
    pub hold: Duration,
}

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            bounds: RateBounds::DEFAULT,
            initial: 6_250_000.0, // 50 Mbit/s
            bloat: Duration::from_millis(20),
            hold: Duration::from_millis(200),
        }
    }
}

/// How fast the rate may grow while the uplink is wanted and its delay stays flat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing is known of the capacity (a new uplink), or the link delivers
    /// [`STARTUP_AGAIN`] times what it carried when it last filled: ×[`STARTUP_GAIN`] per
    /// sample while the pacer holds traffic back.
    Startup,
    /// Bufferbloat was seen (or startup found the link full): ×[`STEADY_GAIN`] per
    /// sample while delivery keeps up with the rate.
    Steady,
}

/// Growth per sample in [`Phase::Startup`].
pub const STARTUP_GAIN: f64 = 1.5;
/// Growth per sample in [`Phase::Steady`].
pub const STEADY_GAIN: f64 = 1.08;
/// [`Phase::Steady`] goes back to [`Phase::Startup`] when the link delivers this much more
/// than when it last filled (capacity came back: found in seconds, not minutes).
pub const STARTUP_AGAIN: f64 = 1.25;
/// Samples held back by the pacer without a quarter more delivered that end
/// [`Phase::Startup`].
pub const STARTUP_PLATEAU: u32 = 3;

#[derive(Debug, Clone)]
pub struct RateControl {
    cfg: RateConfig,
    rate: f64,
    phase: Phase,
    /// What the link delivered when [`Phase::Steady`] began (its last bufferbloat, or
    /// the end of startup): delivering a quarter more means capacity came back.
    carried: f64,
    /// In [`Phase::Startup`]: the most delivered so far, and how many samples in a row
    /// held back by the pacer did not deliver a quarter more than that.
    best: f64,
    plateau: u32,
    /// One-way delay baseline, µs (with the clocks' offset in it).
    baseline: Option<i64>,
    recent: VecDeque<bool>,
    last_decrease: Option<Instant>,
    decreases: u64,
    last_excess: i64,
}

impl RateControl {
    pub fn new(cfg: RateConfig) -> Self {
        let rate = cfg.bounds.fit(cfg.initial);
        Self {
            cfg,
            rate,
            phase: Phase::Startup,
            carried: 0.0,
            best: 0.0,
            plateau: 0,
            baseline: None,
            recent: VecDeque::new(),
            last_decrease: None,
            decreases: 0,
            last_excess: 0,
        }
    }

    /// New bounds (a reload): the current rate is kept within them; what was learnt of
    /// the uplink's delay stays.
    pub fn set_config(&mut self, cfg: RateConfig) {
        self.rate = cfg.bounds.fit(self.rate);
        self.cfg = cfg;
    }

    /// Bytes per second the uplink may be fed.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Current queueing delay estimate: the latest sample over the baseline.
    pub fn queue_delay(&self) -> Duration {
        Duration::from_micros(self.last_excess.max(0) as u64)
    }

    pub fn decreases(&self) -> u64 {
        self.decreases
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// One one-way delay sample (µs, any constant offset) in our sending direction, with
    /// the delivery rate (bytes/s) measured over the last moments and whether the pacer
    /// held traffic back since the previous sample (`limited`: the rate, not the demand,
    /// bounded what was sent).
    pub fn on_sample(&mut self, now: Instant, owd_us: i64, delivered: f64, limited: bool) {
        let base = match self.baseline {
            None => owd_us,
            // The baseline follows a lower delay at once and a higher one very slowly (a
            // route change, clock drift), so a standing queue is not taken for the normal.
            Some(b) if owd_us < b => owd_us,
            Some(b) => b + ((owd_us - b) as f64 * 0.002) as i64,
        };
        self.baseline = Some(base);
        let excess = owd_us - base;
        self.last_excess = excess;
        let threshold = self.cfg.bloat.as_micros() as i64;
        let bloated = excess > threshold;
        if self.recent.len() == 4 {
            self.recent.pop_front();
        }
        self.recent.push_back(bloated);
        let bloat_now = self.recent.iter().filter(|b| **b).count() >= 2 && bloated;
        if bloat_now {
            let hold = self
                .cfg
                .hold
                .max(Duration::from_micros((excess + threshold).max(0) as u64));
            if self
                .last_decrease
                .is_none_or(|t| now.saturating_duration_since(t) >= hold)
            {
                // Sending at the rate (held back by the pacer) or a good share of it: the
                // link carried `delivered` and queued the rest.
                let target = if delivered > 0.0 && (limited || delivered >= 0.2 * self.rate) {
                    // Below what was delivered by enough to drain the standing queue
                    // (about `excess` worth of delivery) within a second.
                    let drain = (1.0 - excess as f64 / 1e6).clamp(0.5, 1.0);
                    delivered * 0.9 * drain
                } else {
                    self.rate * 0.8
                };
                self.rate = self.cfg.bounds.fit(target.min(self.rate));
                self.last_decrease = Some(now);
                self.decreases += 1;
                self.enter_steady(delivered);
            }
            return;
        }
        if bloated {
            return;
        }
        match self.phase {
            Phase::Startup => {
                // Grows while the pacer is what holds traffic back; ends when three such
                // samples in a row deliver no quarter more than the best so far (the
                // link is full although its delay did not show it: BBR's full-pipe test).
                if !limited {
                    return;
                }
                if delivered >= 1.25 * self.best {
                    self.best = delivered;
                    self.plateau = 0;
                } else {
                    self.plateau += 1;
                    if self.plateau >= STARTUP_PLATEAU {
                        self.enter_steady(self.best);
                        // What the link carried, less a little so what queued drains.
                        self.rate = self.cfg.bounds.fit(0.9 * self.best);
                        return;
                    }
                }
                self.rate = self.cfg.bounds.fit(self.rate * STARTUP_GAIN);
            }
            Phase::Steady => {
                if delivered < 0.75 * self.rate {
                    return;
                }
                self.rate = self.cfg.bounds.fit(self.rate * STEADY_GAIN);
                if delivered >= STARTUP_AGAIN * self.carried {
                    self.phase = Phase::Startup;
                    self.best = delivered;
                    self.plateau = 0;
                }
            }
        }
    }

    fn enter_steady(&mut self, carried: f64) {
        self.phase = Phase::Steady;
        self.carried = carried;
    }
}

/// Token bucket pacing at a given rate.
#[derive(Debug, Clone)]
pub struct Pacer {
    tokens: f64,
    last: Option<Instant>,
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new()
    }
}

impl Pacer {
    pub fn new() -> Self {
        Self {
            tokens: 0.0,
            last: None,
        }
    }

    fn burst(rate: f64) -> f64 {
        (rate * 0.005).max(3000.0)
    }

    /// None when a packet may go now, else how long to wait.
    pub fn wait(&mut self, now: Instant, rate: f64) -> Option<Duration> {
        let burst = Self::burst(rate);
        self.tokens = match self.last {
            None => burst,
            Some(t) => {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                (self.tokens + rate * dt).min(burst)
            }
        };
        self.last = Some(now);
        if self.tokens > 0.0 {
            None
        } else {
            Some(Duration::from_secs_f64(
                (-self.tokens + 1.0) / rate.max(1.0),
            ))
        }
    }

    /// `bytes` went out (may go into debt: a POS packet never waits for the pacer).
    pub fn spend(&mut self, bytes: usize) {
        self.tokens -= bytes as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A link of `cap` bytes/s with a deep FIFO: returns the RTT a probe sees when the
    /// sender has been sending at `rate` (queue grows while rate > cap).
    struct Modem {
        cap: f64,
        queue: f64,
        base: Duration,
    }

    impl Modem {
        fn step(&mut self, rate: f64, dt: Duration) -> (Duration, f64) {
            let inflow = rate * dt.as_secs_f64();
            let out = (self.queue + inflow).min(self.cap * dt.as_secs_f64());
            self.queue = (self.queue + inflow - out).min(self.cap * 2.0); // ≥ 2 s deep
            let delay = Duration::from_secs_f64(self.queue / self.cap);
            (self.base + delay, out / dt.as_secs_f64())
        }
    }

    fn run(rc: &mut RateControl, m: &mut Modem, t: &mut Instant, secs: u64) -> Vec<Duration> {
        run_with(rc, m, t, secs, f64::INFINITY)
    }

    /// `secs` of 100 ms steps with a sender that has `demand` bytes/s to send (held back
    /// by the pacer above the rate); the round trips a probe saw.
    fn run_with(
        rc: &mut RateControl,
        m: &mut Modem,
        t: &mut Instant,
        secs: u64,
        demand: f64,
    ) -> Vec<Duration> {
        let mut rtts = Vec::new();
        for _ in 0..secs * 10 {
            *t += 100 * MS;
            let limited = demand > rc.rate();
            let (rtt, delivered) = m.step(rc.rate().min(demand), 100 * MS);
            // One-way delay with a clock offset of -7 s.
            rc.on_sample(
                *t,
                rtt.as_micros() as i64 / 2 - 7_000_000,
                delivered,
                limited,
            );
            if std::env::var("RATE_TRACE").is_ok() {
                eprintln!(
                    "cap {:.1} rate {:.1} delivered {:.1} rtt {:?} {:?}",
                    m.cap * 8e-6,
                    rc.rate() * 8e-6,
                    delivered * 8e-6,
                    rtt,
                    rc.phase()
                );
            }
            rtts.push(rtt);
        }
        rtts
    }

    #[test]
    fn finds_the_capacity_and_follows_it_down_and_up() {
        let mut t = Instant::now();
        let mut rc = RateControl::new(RateConfig::default());
        let mut m = Modem {
            cap: 1_250_000.0, // 10 Mbit/s
            queue: 0.0,
            base: 50 * MS,
        };
        run(&mut rc, &mut m, &mut t, 20);
        let r = rc.rate();
        assert!((0.7..=1.3).contains(&(r / m.cap)), "rate {r}");
        // Capacity falls to 3 Mbit/s: within a few seconds the queue is short again.
        m.cap = 375_000.0;
        let rtts = run(&mut rc, &mut m, &mut t, 20);
        let settled = &rtts[50..];
        let p99 = {
            let mut v = settled.to_vec();
            v.sort();
            v[v.len() * 99 / 100]
        };
        assert!(p99 < 200 * MS, "p99 rtt {p99:?} at 3 Mbit/s");
        assert!(rc.rate() < 500_000.0, "rate {}", rc.rate());
        // Back to 10 Mbit/s: the rate climbs back.
        m.cap = 1_250_000.0;
        run(&mut rc, &mut m, &mut t, 20);
        assert!(rc.rate() > 0.7 * m.cap, "rate {}", rc.rate());
    }

    fn p99(v: &[Duration]) -> Duration {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() * 99 / 100]
    }

    #[test]
    fn a_fresh_link_is_used_at_its_capacity_within_seconds() {
        // 1 Mbit/s cellular to 1 Gbit/s ethernet, from the default config.
        for mbit in [1.0, 3.0, 10.0, 50.0, 100.0, 300.0, 1000.0] {
            let cap = mbit * 1e6 / 8.0;
            let mut t = Instant::now();
            let mut rc = RateControl::new(RateConfig::default());
            let mut m = Modem {
                cap,
                queue: 0.0,
                base: 20 * MS,
            };
            // The uplink's connection is up (its probes answered) before the load starts.
            run_with(&mut rc, &mut m, &mut t, 1, 0.0);
            run(&mut rc, &mut m, &mut t, 2);
            let r = rc.rate() / cap;
            // (A slow link overfed by the initial rate drains its queue first: below it.)
            assert!(
                (0.4..=1.6).contains(&r),
                "{mbit} Mbit/s: rate {r:.2}× after 2 s"
            );
            // Then it stays near the capacity with a short queue.
            let rtts = run(&mut rc, &mut m, &mut t, 10);
            let r = rc.rate() / cap;
            assert!(
                (0.6..=1.3).contains(&r),
                "{mbit} Mbit/s: rate {r:.2}× after 12 s"
            );
            let q = p99(&rtts[20..]);
            assert!(q < 150 * MS, "{mbit} Mbit/s: p99 rtt {q:?}");
        }
    }

    #[test]
    fn capacity_that_comes_back_is_found_in_seconds() {
        let mut t = Instant::now();
        let mut rc = RateControl::new(RateConfig::default());
        let mut m = Modem {
            cap: 100e6 / 8.0,
            queue: 0.0,
            base: 10 * MS,
        };
        run_with(&mut rc, &mut m, &mut t, 1, 0.0);
        run(&mut rc, &mut m, &mut t, 5);
        m.cap = 20e6 / 8.0;
        let rtts = run(&mut rc, &mut m, &mut t, 12);
        assert!(
            rc.rate() < 1.3 * m.cap,
            "rate {} after the step down",
            rc.rate()
        );
        let settled = p99(&rtts[60..]);
        assert!(settled < 150 * MS, "p99 {settled:?}");
        assert_eq!(rc.phase(), Phase::Steady);
        // Up to 300 Mbit/s: found within 3 s.
        m.cap = 300e6 / 8.0;
        run(&mut rc, &mut m, &mut t, 3);
        assert!(
            rc.rate() > 0.7 * m.cap,
            "rate {:.0} Mbit/s 3 s after the step up",
            rc.rate() * 8.0 / 1e6
        );
    }

    #[test]
    fn an_unwanted_rate_does_not_grow() {
        // Delivery far below the rate and nothing held back by the pacer: no growth, in
        // either phase.
        let t = Instant::now();
        let mut rc = RateControl::new(RateConfig::default());
        let r0 = rc.rate();
        for i in 0..50 {
            rc.on_sample(t + i * 100 * MS, 10_000, r0 * 0.3, false);
        }
        assert_eq!(rc.rate(), r0);
        // Held back by the pacer: grows although delivery is below the rate.
        rc.on_sample(t + 50 * 100 * MS, 10_000, r0 * 0.3, true);
        assert_eq!(
            rc.rate(),
            RateConfig::default().bounds.fit(r0 * STARTUP_GAIN)
        );
    }

    #[test]
    fn an_idle_link_keeps_its_rate_and_bounds_hold() {
        let t = Instant::now();
        let mut rc = RateControl::new(RateConfig {
            bounds: RateBounds::new(100_000.0, 200_000.0).expect("ordered"),
            initial: 1e9,
            ..Default::default()
        });
        assert_eq!(rc.rate(), 200_000.0);
        for i in 0..100 {
            rc.on_sample(t + i * 100 * MS, 30_000, 0.0, false);
        }
        assert_eq!(rc.rate(), 200_000.0);
        for i in 100..200 {
            rc.on_sample(t + i * 100 * MS, 900_000, 0.0, false);
        }
        assert_eq!(rc.rate(), 100_000.0);
    }

    #[test]
    fn the_pacer_spaces_packets_at_the_rate() {
        let t = Instant::now();
        let mut p = Pacer::new();
        let rate = 1_000_000.0; // 1 MB/s: a 1000-byte packet per ms
        let mut sent = 0;
        let mut now = t;
        while now < t + 100 * MS {
            match p.wait(now, rate) {
                None => {
                    p.spend(1000);
                    sent += 1;
                }
                Some(d) => now += d,
            }
        }
        // 100 ms at 1 MB/s plus the initial burst (5 ms).
        assert!((100..=106).contains(&sent), "sent {sent}");
    }
}

//! Data caps, sans-IO: the bytes an uplink used in its current period (monthly from a
//! reset day, or daily; periods start at 00:00 UTC), counted from the interface's own
//! counters (both directions, so the tunnel's overhead is included) whose resets (a
//! re-created interface, a reboot) are handled; the thresholds crossed (75, 95, 100 %).
//! The state is small and serializable so the daemon keeps it across restarts.

/// Percentages that raise an event, in order.
pub const THRESHOLDS: [u8; 3] = [75, 95, 100];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// From `reset_day` (1–28) of each month.
    Monthly {
        reset_day: u8,
    },
    Daily,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSpec {
    pub limit: u64,
    pub period: Period,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CapState {
    /// Unix time (s) the current period started.
    pub period_start: i64,
    /// Bytes used in it.
    pub used: u64,
    /// The interface counter (rx + tx) last seen; `None` before the first reading.
    pub last_counter: Option<u64>,
    /// The highest threshold already reported in this period (0: none).
    pub reported: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapEvent {
    /// A new period began; usage is back to 0.
    Reset,
    /// Usage passed this percentage.
    Crossed(u8),
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of days since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// When the period containing `now` (unix s) started.
pub fn period_start(period: Period, now: i64) -> i64 {
    let day = now.div_euclid(86_400);
    match period {
        Period::Daily => day * 86_400,
        Period::Monthly { reset_day } => {
            let (y, m, d) = civil_from_days(day);
            let rd = i64::from(reset_day.clamp(1, 28));
            let (y, m) = if d >= rd {
                (y, m)
            } else if m == 1 {
                (y - 1, 12)
            } else {
                (y, m - 1)
            };
            days_from_civil(y, m, rd) * 86_400
        }
    }
}

impl CapState {
    /// A reading of the interface's counter (rx + tx bytes) at `now`.
    pub fn observe(&mut self, spec: &CapSpec, counter: u64, now: i64) -> Vec<CapEvent> {
        let mut events = Vec::new();
        let start = period_start(spec.period, now);
        if start != self.period_start {
            // A fresh state, or the period rolled over (also while the box was off).
            if self.period_start != 0 {
                events.push(CapEvent::Reset);
            }
            self.period_start = start;
            self.used = 0;
            self.reported = 0;
        }
        let delta = match self.last_counter {
            // The counter went back: the interface was re-created; count from zero.
            Some(last) if counter < last => counter,
            Some(last) => counter - last,
            // First reading of this process: a baseline, nothing to add.
            None => 0,
        };
        self.last_counter = Some(counter);
        self.used = self.used.saturating_add(delta);
        for t in THRESHOLDS {
            if self.reported < t && self.percent(spec) >= f64::from(t) {
                self.reported = t;
                events.push(CapEvent::Crossed(t));
            }
        }
        events
    }

    pub fn percent(&self, spec: &CapSpec) -> f64 {
        if spec.limit == 0 {
            return 100.0;
        }
        self.used as f64 * 100.0 / spec.limit as f64
    }

    /// The allowance is used up.
    pub fn exhausted(&self, spec: &CapSpec) -> bool {
        self.used >= spec.limit
    }

    /// After a restart: the counter baseline is the kernel's new one, not the old.
    pub fn restarted(&mut self) {
        self.last_counter = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i64, m: i64, d: i64, h: i64) -> i64 {
        days_from_civil(y, m, d) * 86_400 + h * 3600
    }

    #[test]
    fn calendar_round_trips() {
        for day in [-1, 0, 59, 60, 365, 10_957, 20_000, 25_000] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2028, 2, 29)), (2028, 2, 29));
    }

    #[test]
    fn periods_start_on_the_reset_day_at_midnight_utc() {
        let monthly = Period::Monthly { reset_day: 15 };
        assert_eq!(
            period_start(monthly, at(2026, 11, 21, 10)),
            at(2026, 11, 15, 0)
        );
        assert_eq!(
            period_start(monthly, at(2026, 11, 14, 23)),
            at(2026, 10, 15, 0)
        );
        assert_eq!(
            period_start(monthly, at(2026, 1, 3, 5)),
            at(2025, 12, 15, 0)
        );
        assert_eq!(
            period_start(monthly, at(2026, 11, 15, 0)),
            at(2026, 11, 15, 0)
        );
        assert_eq!(
            period_start(Period::Daily, at(2026, 11, 21, 10)),
            at(2026, 11, 21, 0)
        );
        // Day 28 exists in every month, February of a leap year included.
        let end = Period::Monthly { reset_day: 28 };
        assert_eq!(period_start(end, at(2028, 3, 1, 0)), at(2028, 2, 28, 0));
    }

    #[test]
    fn usage_thresholds_counter_resets_and_the_new_period() {
        let spec = CapSpec {
            limit: 1000,
            period: Period::Monthly { reset_day: 1 },
        };
        let mut s = CapState::default();
        let t0 = at(2026, 11, 20, 12);
        assert!(s.observe(&spec, 5_000, t0).is_empty(), "a baseline only");
        assert_eq!(s.used, 0);
        assert!(s.observe(&spec, 5_700, t0 + 10).is_empty());
        assert_eq!(s.observe(&spec, 5_760, t0 + 20), [CapEvent::Crossed(75)]);
        // The interface was re-created: its counter starts again.
        assert_eq!(
            s.observe(&spec, 300, t0 + 30),
            [CapEvent::Crossed(95), CapEvent::Crossed(100)]
        );
        assert!(s.exhausted(&spec));
        assert_eq!(s.used, 760 + 300);
        // A restart: the old baseline is not trusted, the usage is kept.
        s.restarted();
        assert!(s.observe(&spec, 9_999_999, t0 + 40).is_empty());
        assert_eq!(s.used, 1060);
        // The reset day (time injected): back to zero, one Reset event.
        let next = at(2026, 12, 1, 0) + 5;
        assert_eq!(s.observe(&spec, 10_000_099, next), [CapEvent::Reset]);
        assert_eq!((s.used, s.reported), (100, 0));
        assert!(!s.exhausted(&spec));
    }
}

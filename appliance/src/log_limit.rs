//! Rate limit for a log line that strangers can trigger at will (a refused handshake):
//! the first one is written at once, then at most one per interval, saying how many were
//! left out meanwhile. The exact count lives in a counter beside it (status, metrics).

use std::time::{Duration, Instant};

/// One log line's limiter; fed `now`, it says whether to write.
#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    last: Option<Instant>,
    skipped: u64,
}

impl LogLimit {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            skipped: 0,
        }
    }

    /// Another occurrence at `now`: `Some(n)` when the line may be written (`n`
    /// occurrences were left out since the last one written), `None` when it is skipped.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= self.every);
        if !due {
            self.skipped = self.skipped.saturating_add(1);
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_writes_one_line_per_interval_with_the_count_left_out() {
        let t = Instant::now();
        let mut l = LogLimit::new(Duration::from_secs(10));
        assert_eq!(l.allow(t), Some(0), "the first is written at once");
        // 3 000 refusals in 4.5 s: none written.
        let written = (1..=3000u64)
            .filter(|i| l.allow(t + Duration::from_micros(i * 1500)).is_some())
            .count();
        assert_eq!(written, 0);
        // Ten seconds after the first line: one line, counting the 3 000.
        assert_eq!(l.allow(t + Duration::from_secs(10)), Some(3000));
        assert_eq!(l.allow(t + Duration::from_secs(11)), None);
        assert_eq!(l.allow(t + Duration::from_secs(25)), Some(1));
    }
}

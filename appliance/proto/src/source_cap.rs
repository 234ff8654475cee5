//! The per-source packet-rate cap on traffic entering the tunnel from the LAN: one device
//! gone wrong (tens of thousands of small packets a second) must not fill the TUN
//! device's queue, which the kernel drops from blindly, before any class is known. The
//! kernel enforces the cap per source address (IPv4) or /64 (IPv6) ahead of the TUN, so
//! it costs nothing per packet here; POS sources are never capped. This decides the
//! figure (sans-IO: fed the uplinks' capacity and `now`).
//!
//! The cap follows what the uplinks can carry: [`SourceCapConfig::headroom`] times the
//! full-size packets per second of the bond's measured capacity, never below
//! [`SourceCapConfig::floor_pps`]; before anything is measured it is
//! [`SourceCapConfig::unmeasured_pps`]. A device sending full-size packets as fast as
//! the uplinks go, or the acknowledgements of a download, stays far below it. It rises at
//! once (a fast uplink is never held back) and falls after [`SourceCapConfig::hold`]
//! (a second: a flood is capped quickly), only by more than a quarter, so the kernel's
//! rule is not rewritten for every wobble of the estimate.

use std::time::{Duration, Instant};

/// How the cap is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceCapConfig {
    /// Packets per second of one source, at least.
    pub floor_pps: u32,
    /// Before the uplinks' capacity is measured (nothing sent yet).
    pub unmeasured_pps: u32,
    /// The cap in full-size packets of the bond's capacity.
    pub headroom: f64,
    /// Bytes of a full-size packet.
    pub packet_bytes: f64,
    /// A lower cap waits this long.
    pub hold: Duration,
}

impl Default for SourceCapConfig {
    fn default() -> Self {
        Self {
            floor_pps: 10_000,
            unmeasured_pps: 50_000,
            headroom: 4.0,
            packet_bytes: 1280.0,
            hold: Duration::from_secs(1),
        }
    }
}

/// The cap in force and when it last changed.
#[derive(Debug, Clone)]
pub struct SourceCap {
    cfg: SourceCapConfig,
    current: Option<u32>,
    /// Since when a lower cap than `current` has been wanted.
    lower_since: Option<Instant>,
}

impl SourceCap {
    pub fn new(cfg: SourceCapConfig) -> Self {
        Self {
            cfg,
            current: None,
            lower_since: None,
        }
    }

    /// The cap for a bond that carries `capacity` bytes per second (0: not measured).
    pub fn target(&self, capacity: f64) -> u32 {
        if !(capacity.is_finite() && capacity > 0.0) {
            return self.cfg.unmeasured_pps;
        }
        let pps = capacity / self.cfg.packet_bytes * self.cfg.headroom;
        // Saturating float-to-int: a huge capacity is a huge cap, not a wrap.
        (pps.min(f64::from(u32::MAX)) as u32).max(self.cfg.floor_pps)
    }

    /// The cap in force (`None` before the first [`Self::update`]).
    pub fn current(&self) -> Option<u32> {
        self.current
    }

    /// Feeds the bond's capacity now; the new cap when the kernel's rule should change.
    pub fn update(&mut self, capacity: f64, now: Instant) -> Option<u32> {
        let want = self.target(capacity);
        let Some(cur) = self.current else {
            self.current = Some(want);
            return Some(want);
        };
        if want >= cur {
            self.lower_since = None;
            // Up at once, but not for a rise of a few percent.
            if f64::from(want) > f64::from(cur) * 1.25 {
                self.current = Some(want);
                return Some(want);
            }
            return None;
        }
        if f64::from(want) > f64::from(cur) * 0.75 {
            self.lower_since = None;
            return None;
        }
        let since = *self.lower_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.cfg.hold {
            self.lower_since = None;
            self.current = Some(want);
            return Some(want);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MBIT: f64 = 1e6 / 8.0;

    #[test]
    fn the_cap_follows_the_uplinks_with_a_floor() {
        let c = SourceCap::new(SourceCapConfig::default());
        assert_eq!(c.target(0.0), 50_000, "unmeasured");
        assert_eq!(c.target(f64::NAN), 50_000);
        // 30 Mbit/s of uplinks: 2 930 full-size packets/s, four times that is under the
        // floor.
        assert_eq!(c.target(30.0 * MBIT), 11_718);
        assert_eq!(c.target(5.0 * MBIT), 10_000, "the floor");
        // A gigabit: far above anything one device sends into the tunnel.
        assert!(c.target(1000.0 * MBIT) > 390_000);
        assert_eq!(c.target(f64::MAX), u32::MAX);
    }

    #[test]
    fn it_rises_at_once_and_falls_after_the_hold() {
        let t = Instant::now();
        let ms = |n: u64| t + Duration::from_millis(n);
        let mut c = SourceCap::new(SourceCapConfig::default());
        assert_eq!(c.update(0.0, t), Some(50_000));
        // Traffic measured: a lower cap waits a second.
        assert_eq!(c.update(30.0 * MBIT, t), None);
        assert_eq!(c.update(30.0 * MBIT, ms(900)), None);
        assert_eq!(c.update(30.0 * MBIT, ms(1000)), Some(11_718));
        // Small wobbles change nothing.
        assert_eq!(c.update(32.0 * MBIT, ms(2000)), None);
        assert_eq!(c.update(28.0 * MBIT, ms(60_000)), None);
        // A fast uplink: up at once.
        assert_eq!(c.update(300.0 * MBIT, ms(61_000)), Some(117_187));
        // A dip that recovers before the hold ends changes nothing.
        assert_eq!(c.update(30.0 * MBIT, ms(62_000)), None);
        assert_eq!(c.update(300.0 * MBIT, ms(62_500)), None);
        assert_eq!(c.update(30.0 * MBIT, ms(63_000)), None);
        assert_eq!(c.update(30.0 * MBIT, ms(63_900)), None);
        assert_eq!(c.current(), Some(117_187));
    }
}

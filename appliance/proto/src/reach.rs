//! Reachability of one uplink beyond the tunnel, sans-IO: when to run the two checks
//! (the portal check: a plain-HTTP URL that must answer `204` and a DNS name that must not
//! exist; the HTTPS check: a URL that must answer over a verified TLS session), and what
//! their outcomes mean:
//!
//! - a redirect or a page instead of the `204` is a **captive portal**, and an answer for
//!   a name that cannot exist is **forged DNS**: either keeps the uplink out of the bond
//!   until a check comes back clean;
//! - the uplink is **verified** for point-of-sale traffic once an HTTPS check succeeded,
//!   and loses that after [`ReachConfig::https_failures`] failures in a row.
//!
//! Checks run often on uplinks that carry traffic and rarely on idle backups, so a backup
//! stays quiet (its idle byte cost is in the benchmarks). Network errors on the portal
//! check change nothing: a dead link is the tunnel health's business.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ReachConfig {
    /// Portal check period on uplinks that carry traffic (and on any uplink whose portal
    /// or HTTPS verdict is bad, to notice it clearing).
    pub interval: Duration,
    /// HTTPS check period on a verified uplink that carries traffic.
    pub https_interval: Duration,
    /// Period of both checks on an idle backup uplink.
    pub backup_interval: Duration,
    /// Failed HTTPS checks in a row before a verified uplink stops carrying POS.
    pub https_failures: u32,
}

impl Default for ReachConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            https_interval: Duration::from_secs(60),
            backup_interval: Duration::from_secs(300),
            https_failures: 2,
        }
    }
}

/// The portal check's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Portal {
    /// Not checked yet (or the link went away since).
    Unknown,
    Clear,
    /// HTTP answered with a redirect (to `location`) or a page.
    Captive {
        location: Option<String>,
    },
    /// A name that cannot exist resolved (to `answer`).
    DnsForged {
        answer: String,
    },
}

impl Portal {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Clear => "clear",
            Self::Captive { .. } => "captive",
            Self::DnsForged { .. } => "dns-hijacked",
        }
    }
    /// Whether this verdict keeps the uplink out of the bond.
    pub fn holds(&self) -> bool {
        matches!(self, Self::Captive { .. } | Self::DnsForged { .. })
    }
}

/// What one portal check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortalOutcome {
    Clear,
    Captive {
        location: Option<String>,
    },
    DnsForged {
        answer: String,
    },
    /// No answer at all (timeout, refused): says nothing about a portal.
    Failed(String),
}

/// The HTTPS check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Https {
    Unknown,
    Verified,
    Failing,
}

impl Https {
    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Verified => "verified",
            Self::Failing => "failing",
        }
    }
}

/// Checks due now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Due {
    pub portal: bool,
    pub https: bool,
}

/// A verdict changed (for events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Portal { from: Portal, to: Portal },
    Https { from: Https, to: Https },
}

#[derive(Debug)]
pub struct Reach {
    cfg: ReachConfig,
    present: bool,
    idle_backup: bool,
    portal: Portal,
    https: Https,
    https_fails: u32,
    last_error: Option<String>,
    next_portal: Instant,
    next_https: Instant,
    /// Checks handed out and not answered yet.
    pending: Due,
}

impl Reach {
    pub fn new(cfg: ReachConfig, now: Instant) -> Self {
        Self {
            cfg,
            present: false,
            idle_backup: false,
            portal: Portal::Unknown,
            https: Https::Unknown,
            https_fails: 0,
            last_error: None,
            next_portal: now,
            next_https: now,
            pending: Due::default(),
        }
    }

    pub fn portal(&self) -> &Portal {
        &self.portal
    }
    pub fn https(&self) -> Https {
        self.https
    }
    /// The last check's error, if the last check of either kind failed.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The uplink has (`true`) or lost (`false`) carrier and an address. A link that comes
    /// back is checked at once; one that went away forgets its verdicts (the next network
    /// it joins may be another venue's).
    pub fn on_link(&mut self, present: bool, now: Instant) -> Vec<Change> {
        if present == self.present {
            return Vec::new();
        }
        self.present = present;
        let mut changes = Vec::new();
        if present {
            self.next_portal = now;
            self.next_https = now;
        } else {
            changes.extend(self.set_portal(Portal::Unknown));
            changes.extend(self.set_https(Https::Unknown));
            self.https_fails = 0;
            self.pending = Due::default();
        }
        changes
    }

    /// Whether the uplink is an idle backup (checked rarely).
    pub fn set_idle_backup(&mut self, idle: bool, now: Instant) {
        if idle != self.idle_backup {
            self.idle_backup = idle;
            if !idle {
                // Becoming active: check soon rather than after a long backup period.
                self.next_portal = self.next_portal.min(now);
                if self.https != Https::Verified {
                    self.next_https = self.next_https.min(now);
                }
            }
        }
    }

    /// Re-checks at once (after `stallnet uplink login`, for instance).
    pub fn recheck(&mut self, now: Instant) {
        self.next_portal = now;
        self.next_https = now;
    }

    fn portal_period(&self) -> Duration {
        if self.idle_backup && !self.portal.holds() {
            self.cfg.backup_interval
        } else {
            self.cfg.interval
        }
    }

    fn https_period(&self) -> Duration {
        match (self.idle_backup, self.https) {
            (true, _) => self.cfg.backup_interval,
            (false, Https::Verified) => self.cfg.https_interval,
            (false, _) => self.cfg.interval,
        }
    }

    /// The checks to run now; each is handed out once and then awaits its result.
    pub fn poll(&mut self, now: Instant) -> Due {
        if !self.present {
            return Due::default();
        }
        let mut due = Due::default();
        if !self.pending.portal && now >= self.next_portal {
            due.portal = true;
            self.pending.portal = true;
        }
        // HTTPS through a captive link is pointless; its verdict waits for the portal.
        if !self.pending.https && !self.portal.holds() && now >= self.next_https {
            due.https = true;
            self.pending.https = true;
        }
        due
    }

    /// When [`Self::poll`] next has something.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.present {
            return None;
        }
        let p = (!self.pending.portal).then_some(self.next_portal);
        let h = (!self.pending.https && !self.portal.holds()).then_some(self.next_https);
        match (p, h) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn on_portal(&mut self, outcome: PortalOutcome, now: Instant) -> Vec<Change> {
        self.pending.portal = false;
        if !self.present {
            return Vec::new();
        }
        let to = match outcome {
            PortalOutcome::Clear => Portal::Clear,
            PortalOutcome::Captive { location } => Portal::Captive { location },
            PortalOutcome::DnsForged { answer } => Portal::DnsForged { answer },
            PortalOutcome::Failed(e) => {
                self.last_error = Some(e);
                self.next_portal = now + self.portal_period();
                return Vec::new();
            }
        };
        if to == Portal::Clear {
            self.last_error = None;
        }
        let mut changes: Vec<Change> = self.set_portal(to).into_iter().collect();
        if self.portal.holds() {
            // Whatever the HTTPS check said was said through the portal's network.
            changes.extend(self.set_https(Https::Unknown));
            self.https_fails = 0;
        } else if matches!(changes.first(), Some(Change::Portal { from, .. }) if from.holds()) {
            self.next_https = now;
        }
        self.next_portal = now + self.portal_period();
        changes
    }

    pub fn on_https(&mut self, result: Result<(), String>, now: Instant) -> Vec<Change> {
        self.pending.https = false;
        if !self.present || self.portal.holds() {
            return Vec::new();
        }
        let changes = match result {
            Ok(()) => {
                self.https_fails = 0;
                self.last_error = None;
                self.set_https(Https::Verified)
            }
            Err(e) => {
                self.last_error = Some(e);
                self.https_fails += 1;
                if self.https != Https::Verified || self.https_fails >= self.cfg.https_failures {
                    self.set_https(Https::Failing)
                } else {
                    None
                }
            }
        };
        self.next_https = now + self.https_period();
        changes.into_iter().collect()
    }

    fn set_portal(&mut self, to: Portal) -> Option<Change> {
        if self.portal == to {
            return None;
        }
        let from = std::mem::replace(&mut self.portal, to.clone());
        Some(Change::Portal { from, to })
    }

    fn set_https(&mut self, to: Https) -> Option<Change> {
        if self.https == to {
            return None;
        }
        let from = std::mem::replace(&mut self.https, to);
        Some(Change::Https { from, to })
    }
}

/// Which uplinks may carry POS, given per uplink (carries the tunnel now, HTTPS
/// verified): only verified ones while one of them carries the tunnel; when none does,
/// every uplink (payments through an unverified path beat no payments; the status says
/// so).
pub fn pos_allowed(links: &[(bool, bool)]) -> Vec<bool> {
    let any_verified = links.iter().any(|&(up, verified)| up && verified);
    links
        .iter()
        .map(|&(_, verified)| verified || !any_verified)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn up(now: Instant) -> Reach {
        let mut r = Reach::new(ReachConfig::default(), now);
        r.on_link(true, now);
        r
    }

    #[test]
    fn a_new_link_is_checked_at_once_and_each_check_is_handed_out_once() {
        let t = Instant::now();
        let mut r = Reach::new(ReachConfig::default(), t);
        assert_eq!(r.poll(t), Due::default(), "no link, no checks");
        r.on_link(true, t);
        assert_eq!(
            r.poll(t),
            Due {
                portal: true,
                https: true
            }
        );
        assert_eq!(r.poll(t + s(30)), Due::default(), "awaiting results");
        assert_eq!(r.poll_timeout(), None);
        r.on_portal(PortalOutcome::Clear, t + s(1));
        assert_eq!(r.poll_timeout(), Some(t + s(6)));
    }

    #[test]
    fn a_redirect_holds_the_link_and_a_clean_check_releases_it() {
        let t = Instant::now();
        let mut r = up(t);
        r.poll(t);
        r.on_portal(PortalOutcome::Clear, t);
        r.on_https(Ok(()), t);
        assert_eq!(r.https(), Https::Verified);
        let ch = r.on_portal(
            PortalOutcome::Captive {
                location: Some("http://portal/login".into()),
            },
            t + s(5),
        );
        assert!(r.portal().holds());
        assert_eq!(r.portal().name(), "captive");
        assert!(ch.contains(&Change::Https {
            from: Https::Verified,
            to: Https::Unknown
        }));
        // No HTTPS check through the portal; the portal check keeps its fast period.
        assert!(!r.poll(t + s(10)).https);
        assert_eq!(r.poll_timeout(), None, "portal check handed out");
        r.on_portal(PortalOutcome::Clear, t + s(10));
        assert!(!r.portal().holds());
        assert_eq!(
            r.poll(t + s(10)),
            Due {
                portal: false,
                https: true
            },
            "released: HTTPS re-verified at once"
        );
    }

    #[test]
    fn forged_dns_holds_the_link() {
        let t = Instant::now();
        let mut r = up(t);
        r.poll(t);
        r.on_portal(
            PortalOutcome::DnsForged {
                answer: "10.9.9.9".into(),
            },
            t,
        );
        assert_eq!(r.portal().name(), "dns-hijacked");
        assert!(r.portal().holds());
    }

    #[test]
    fn network_errors_change_no_verdict() {
        let t = Instant::now();
        let mut r = up(t);
        r.poll(t);
        r.on_portal(PortalOutcome::Clear, t);
        r.poll(t + s(5));
        assert!(r
            .on_portal(PortalOutcome::Failed("timed out".into()), t + s(5))
            .is_empty());
        assert_eq!(r.portal(), &Portal::Clear);
        assert_eq!(r.last_error(), Some("timed out"));
    }

    #[test]
    fn https_is_lost_after_consecutive_failures_only() {
        let t = Instant::now();
        let mut r = up(t);
        r.poll(t);
        r.on_https(Ok(()), t);
        r.on_https(Err("reset".into()), t + s(60));
        assert_eq!(r.https(), Https::Verified, "one failure is forgiven");
        r.on_https(Ok(()), t + s(120));
        r.on_https(Err("reset".into()), t + s(180));
        let ch = r.on_https(Err("reset".into()), t + s(185));
        assert_eq!(r.https(), Https::Failing);
        assert_eq!(
            ch,
            vec![Change::Https {
                from: Https::Verified,
                to: Https::Failing
            }]
        );
        // Failing: retried at the fast period.
        assert_eq!(r.next_https, t + s(190));
    }

    #[test]
    fn idle_backups_are_checked_rarely_and_promptly_when_they_take_over() {
        let t = Instant::now();
        let mut r = up(t);
        r.set_idle_backup(true, t);
        r.poll(t);
        r.on_portal(PortalOutcome::Clear, t);
        r.on_https(Ok(()), t);
        assert_eq!(r.poll_timeout(), Some(t + s(300)));
        r.set_idle_backup(false, t + s(20));
        assert_eq!(
            r.poll(t + s(20)),
            Due {
                portal: true,
                https: false
            }
        );
    }

    #[test]
    fn losing_the_link_forgets_the_verdicts() {
        let t = Instant::now();
        let mut r = up(t);
        r.poll(t);
        r.on_portal(PortalOutcome::Captive { location: None }, t);
        let ch = r.on_link(false, t + s(1));
        assert_eq!(r.portal(), &Portal::Unknown);
        assert_eq!(ch.len(), 1);
        // A late answer from before is ignored.
        r.on_portal(PortalOutcome::Captive { location: None }, t + s(2));
        assert_eq!(r.portal(), &Portal::Unknown);
    }

    #[test]
    fn pos_uses_verified_uplinks_while_one_carries_the_tunnel() {
        assert_eq!(
            pos_allowed(&[(true, true), (true, false)]),
            vec![true, false]
        );
        // The verified one's tunnel is down: nothing is verified and usable.
        assert_eq!(
            pos_allowed(&[(false, true), (true, false)]),
            vec![true, true]
        );
        assert_eq!(pos_allowed(&[(true, false)]), vec![true]);
    }
}

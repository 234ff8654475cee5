//! Per-uplink health: RTT, jitter and loss estimates, and the state machine
//! `Up → Suspect → Down → Probing → Up` with hysteresis.
//!
//! The driver calls [`LinkHealth::poll_probe`] to learn when to send a probe, feeds back
//! acknowledgements, carrier and connection events and the transport's RTT, and calls
//! [`LinkHealth::handle_timeout`] at [`LinkHealth::poll_timeout`]. Probes are sent on every
//! active uplink every `probe_interval`; while the whole bond is quiet (no data either way
//! for a few seconds) an Up link probes every `quiet_probe_interval`, and at the regular
//! rate again from the first packet; a backup uplink that carries no traffic probes only
//! every `backup_probe_interval` so a capped SIM does not drain while idle.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum LinkState {
    /// Carries traffic.
    Up,
    /// A probe is overdue: no new traffic, but not yet given up.
    Suspect,
    /// Carrier lost, connection gone, or silent for `down_after`.
    Down,
    /// Answering again; must stay clean for the hold time before it is trusted.
    Probing,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub probe_interval: Duration,
    /// An Up link's probe interval while the bond carries no data.
    pub quiet_probe_interval: Duration,
    pub backup_probe_interval: Duration,
    /// Floor of the overdue-probe threshold.
    pub suspect_min: Duration,
    /// Ceiling of the overdue-probe threshold.
    pub suspect_max: Duration,
    /// Time in Suspect before the link is declared Down.
    pub down_after: Duration,
    /// Clean time in Probing before Up after a single outage (no other flap within
    /// `flap_forget`): a link that failed once and is clean again rejoins within a second.
    pub hold_first: Duration,
    /// Clean time in Probing before a new link is Up, and after a second recent flap
    /// (doubled per further one).
    pub hold_base: Duration,
    pub hold_max: Duration,
    /// Time Up after which the flap count is forgotten.
    pub flap_forget: Duration,
}

impl HealthConfig {
    /// How long a link must answer cleanly in Probing before it is Up, after `flaps`
    /// recent flaps: `hold_base` for a new link (it has yet to show what it carries; until
    /// then it still carries traffic as a last resort), `hold_first` after a single
    /// outage, then `hold_base` doubling per further flap up to `hold_max`.
    pub fn hold_after(&self, flaps: u32) -> Duration {
        let hold = match flaps {
            0 => self.hold_base,
            1 => self.hold_first,
            n => self.hold_base * (1u32 << (n - 2).min(8)),
        };
        hold.min(self.hold_max)
    }
}

impl HealthConfig {
    /// The hub's: on a quiet bond its Up links probe every 2 s, not every second. The
    /// edge's own probes (every second) already keep each uplink's state for the box,
    /// where uploads and payments are decided; the hub's are for downloads, and a
    /// download turns the bond active, back to the regular rate, at its first packet.
    /// Halving them takes a quarter of an idle stall's datagrams off the hub (measured
    /// in the `scale` bench: this is what keeps 500 idle stalls under a quarter of a
    /// core).
    pub fn hub() -> Self {
        Self {
            quiet_probe_interval: Duration::from_secs(2),
            ..Self::default()
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_millis(100),
            quiet_probe_interval: Duration::from_secs(1),
            backup_probe_interval: Duration::from_secs(4),
            suspect_min: Duration::from_millis(60),
            suspect_max: Duration::from_millis(600),
            down_after: Duration::from_millis(1500),
            hold_first: Duration::from_millis(100),
            hold_base: Duration::from_secs(2),
            hold_max: Duration::from_secs(30),
            flap_forget: Duration::from_secs(60),
        }
    }
}

const MAX_OUTSTANDING: usize = 64;
/// A Probing link is probed at least this often within its hold (and at least every
/// `probe_interval`).
const PROBES_PER_HOLD: u32 = 4;
/// How much later than a probe's answer a delivery report may come: the peer reports at
/// most every 10 ms (`bond::link::REPORT_EVERY`), plus its timer's slack.
const REPORT_SLACK: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct LinkHealth {
    cfg: HealthConfig,
    state: LinkState,
    since: Instant,
    carrier: bool,
    connected: bool,
    /// Backup uplinks probe sparsely while the scheduler does not use them.
    sparse: bool,
    /// The bond carries no data: probe at the quiet rate.
    quiet: bool,
    srtt: Option<Duration>,
    rttvar: Duration,
    min_rtt: Option<Duration>,
    loss: f64,
    /// Latest smoothed RTT reported by QUIC (updated on every acknowledgement).
    transport_rtt: Option<Duration>,
    outstanding: VecDeque<(u32, Instant)>,
    next_probe_id: u32,
    next_probe_at: Instant,
    /// When the latest probe went out.
    last_probe_at: Option<Instant>,
    /// Send time of the newest answered probe.
    verified: Option<Instant>,
    /// Since when data the peer should have reported by now has gone unreported (see
    /// [`Self::set_unreported`]).
    unreported: Option<Instant>,
    flaps: u32,
    /// Times the link turned Suspect, and how many of those for its reports' silence.
    suspects: u64,
    silences: u64,
    probes_sent: u64,
    probes_lost: u64,
    /// Outcomes of the latest probes (true = lost), for the degraded verdict.
    outcomes: VecDeque<bool>,
    degraded: bool,
    /// Since when the link has looked clean again while degraded.
    clean_since: Option<Instant>,
    /// The degraded verdict as of the newest answered probe: what a single outage
    /// returns the link to (the probes lost in it are the outage, counted as a flap).
    degraded_when_answered: bool,
}

/// Probes looked at for the degraded verdict, and how many of them lost makes a link
/// degraded (about 5 %).
const DEGRADE_WINDOW: usize = 50;
const DEGRADE_LOST: usize = 3;
/// RTT deviation that makes a link degraded.
const DEGRADE_JITTER: Duration = Duration::from_millis(80);
/// A degraded link must look clean this long before it is trusted with POS again.
const DEGRADE_CLEAR: Duration = Duration::from_secs(10);

impl LinkHealth {
    /// A new link starts Down until the connection is up and probes are answered.
    pub fn new(cfg: HealthConfig, now: Instant) -> Self {
        Self {
            cfg,
            state: LinkState::Down,
            since: now,
            carrier: true,
            connected: false,
            sparse: false,
            quiet: false,
            srtt: None,
            rttvar: Duration::ZERO,
            min_rtt: None,
            loss: 0.0,
            transport_rtt: None,
            outstanding: VecDeque::new(),
            next_probe_id: 1,
            next_probe_at: now,
            last_probe_at: None,
            verified: None,
            unreported: None,
            flaps: 0,
            suspects: 0,
            silences: 0,
            probes_sent: 0,
            probes_lost: 0,
            outcomes: VecDeque::new(),
            degraded: false,
            clean_since: None,
            degraded_when_answered: false,
        }
    }

    /// Alive but lossy (about 5 % of recent probes lost) or with wild RTT swings (a
    /// deviation over 80 ms, or an RTT far above its minimum), or flapping (a second
    /// outage within `flap_forget`): fit for bulk, not for POS or the stream. Clears after
    /// 10 s of clean behaviour. The probes lost in a single outage do not count: the
    /// outage is a flap, and a link that comes back clean is trusted as before.
    pub fn degraded(&self) -> bool {
        self.degraded
    }

    fn judge(&mut self, now: Instant) {
        let lost = self.outcomes.iter().filter(|l| **l).count();
        let swinging = self.rttvar >= DEGRADE_JITTER
            || match (self.srtt, self.min_rtt) {
                (Some(s), Some(m)) => s > m * 4 + Duration::from_millis(150),
                _ => false,
            };
        let bad = lost >= DEGRADE_LOST || swinging;
        if bad {
            self.degraded = true;
            self.clean_since = None;
        } else if self.degraded {
            let since = *self.clean_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= DEGRADE_CLEAR {
                self.degraded = false;
                self.clean_since = None;
            }
        }
    }

    pub fn state(&self) -> LinkState {
        self.state
    }
    /// True when the scheduler may give this link new traffic.
    pub fn usable(&self) -> bool {
        self.state == LinkState::Up
    }
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }
    /// Everything this link carried before this instant has reached the far end: the
    /// newest answered probe was sent then, behind it on the same in-order connection.
    pub fn verified_until(&self) -> Option<Instant> {
        self.verified
    }

    /// The most recent RTT estimate: QUIC's (updated per acknowledgement) when it has one,
    /// else the probes'.
    pub fn current_rtt(&self) -> Option<Duration> {
        self.transport_rtt.or(self.srtt)
    }
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }
    /// Mean deviation of the RTT (RFC 6298's RTTVAR): the jitter figure.
    pub fn jitter(&self) -> Duration {
        self.rttvar
    }
    /// Smoothed probe loss, 0.0 to 1.0.
    pub fn loss(&self) -> f64 {
        self.loss
    }
    pub fn flaps(&self) -> u32 {
        self.flaps
    }
    /// Times the link turned Suspect, and how many of those because its delivery reports
    /// fell silent before a probe was overdue.
    pub fn suspects(&self) -> (u64, u64) {
        (self.suspects, self.silences)
    }
    pub fn probes(&self) -> (u64, u64) {
        (self.probes_sent, self.probes_lost)
    }

    /// Switches between the regular and the sparse (idle backup) probe rate.
    pub fn set_sparse(&mut self, sparse: bool, now: Instant) {
        if self.sparse && !sparse {
            self.resume_regular_rate(now);
        }
        self.sparse = sparse;
    }

    /// Switches between the regular and the quiet (no data in the bond) probe rate; the
    /// regular rate resumes at once, with a probe due now.
    pub fn set_quiet(&mut self, quiet: bool, now: Instant) {
        if self.quiet && !quiet {
            self.resume_regular_rate(now);
        }
        self.quiet = quiet;
    }

    /// Leaving a slow probe rate: the next probe is due one regular interval after the
    /// latest one, or now if that is past (never in the past, and never twice at once).
    fn resume_regular_rate(&mut self, now: Instant) {
        let due = self
            .last_probe_at
            .map_or(now, |sent| (sent + self.cfg.probe_interval).max(now));
        self.next_probe_at = self.next_probe_at.min(due);
    }

    /// Whether the link probes at the sparse (idle backup) rate.
    pub fn sparse(&self) -> bool {
        self.sparse
    }

    fn interval(&self) -> Duration {
        match self.state {
            LinkState::Up if self.sparse => self.cfg.backup_probe_interval,
            LinkState::Up if self.quiet => self.cfg.quiet_probe_interval,
            // A link that answers again is judged on several answers within its hold, not
            // one or two, so a short hold (a single outage's) is one of evidence too.
            // Only while it answers: a Down link stays at the normal rate, however long
            // its outage.
            LinkState::Probing => self.cfg.probe_interval.min(self.hold() / PROBES_PER_HOLD),
            _ => self.cfg.probe_interval,
        }
    }

    /// How long a probe may stay unanswered before the link is Suspect.
    pub fn overdue_after(&self) -> Duration {
        let base = match self.srtt {
            Some(srtt) => srtt * 2 + self.rttvar * 4,
            None => self.cfg.suspect_max,
        };
        base.clamp(self.cfg.suspect_min, self.cfg.suspect_max)
    }

    /// Data the link sent at `since` and after, enough that the peer reports it when it
    /// arrives, has not been reported delivered (`None`: everything it sent is, or too
    /// little is waiting to make the peer report). A busy link hears reports every few
    /// milliseconds, so their silence is noticed sooner than an overdue probe (probes go
    /// out every `probe_interval`): an Up link is Suspect when such data has gone
    /// unreported for [`Self::silence_after`] plus [`REPORT_SLACK`].
    pub fn set_unreported(&mut self, since: Option<Instant>) {
        self.unreported = since;
    }

    /// Since when data has gone unreported (see [`Self::set_unreported`]).
    pub fn unreported(&self) -> Option<Instant> {
        self.unreported
    }

    /// How long data may go unreported before an Up link is Suspect, less
    /// [`REPORT_SLACK`]: 1.5 × RTT + 2 × its deviation, within the overdue-probe
    /// threshold's floor and ceiling, on the larger of the probes' and the transport's
    /// RTT (the transport's follows a growing queue with every acknowledgement, where the
    /// probes' lags). Tighter than an overdue probe's 2 × RTT + 4 × deviation: a report
    /// answers within one RTT plus the peer's report interval (the slack), and the
    /// transport's RTT already carries the queue the data waits in, so the half RTT is
    /// room for that queue to grow. A false alarm costs resends of what went unreported
    /// and lasts until the next report; a late one costs every flow on the link a stall.
    pub fn silence_after(&self) -> Option<Duration> {
        let rtt = match (self.srtt, self.transport_rtt) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b)?,
        };
        Some((rtt * 3 / 2 + self.rttvar * 2).clamp(self.cfg.suspect_min, self.cfg.suspect_max))
    }

    /// When unreported data makes an Up link Suspect (see [`Self::silence_after`]).
    fn silent_at(&self) -> Option<Instant> {
        Some(self.unreported? + self.silence_after()? + REPORT_SLACK)
    }

    /// The peer reported deliveries: the link is alive (a Suspect link is Up again, as on
    /// a probe's answer).
    pub fn on_delivery_report(&mut self, now: Instant) {
        if self.state == LinkState::Suspect {
            self.set_state(LinkState::Up, now);
        }
    }

    /// Returns a probe id to send now, if one is due.
    pub fn poll_probe(&mut self, now: Instant) -> Option<u32> {
        if !self.connected || !self.carrier || now < self.next_probe_at {
            return None;
        }
        let id = self.next_probe_id;
        self.next_probe_id = self.next_probe_id.wrapping_add(1);
        self.next_probe_at = now + self.interval();
        self.last_probe_at = Some(now);
        if self.outstanding.len() == MAX_OUTSTANDING {
            self.outstanding.pop_front();
            self.resolve(true);
        }
        self.outstanding.push_back((id, now));
        self.probes_sent += 1;
        Some(id)
    }

    /// The peer answered probe `id`; returns the RTT sample it gave.
    pub fn on_probe_ack(&mut self, id: u32, now: Instant) -> Option<Duration> {
        let Some(pos) = self.outstanding.iter().position(|(i, _)| *i == id) else {
            return None; // late answer to a probe already counted lost, or a stray
        };
        // Older probes still outstanding were overtaken: count them lost.
        for _ in 0..pos {
            self.outstanding.pop_front();
            self.resolve(true);
        }
        let (_, sent) = self.outstanding.pop_front()?;
        self.resolve(false);
        self.verified = Some(self.verified.map_or(sent, |v| v.max(sent)));
        let rtt = now.saturating_duration_since(sent);
        self.rtt_sample(rtt);
        self.judge(now);
        self.degraded_when_answered = self.degraded;
        match self.state {
            LinkState::Suspect => self.set_state(LinkState::Up, now),
            LinkState::Down => self.set_state(LinkState::Probing, now),
            LinkState::Up | LinkState::Probing => {}
        }
        self.handle_timeout(now);
        Some(rtt)
    }

    fn resolve(&mut self, lost: bool) {
        if lost {
            self.probes_lost += 1;
        }
        // A Down link's lost probes are the outage itself (counted as a flap), and a
        // Probing one's its end (a link is trusted only after a clean hold): not the loss
        // rate of the link it is once Up.
        if lost && matches!(self.state, LinkState::Down | LinkState::Probing) {
            return;
        }
        if self.outcomes.len() == DEGRADE_WINDOW {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back(lost);
        let sample = if lost { 1.0 } else { 0.0 };
        self.loss = 0.9 * self.loss + 0.1 * sample;
    }

    /// The link went Down from Up or Suspect (a flap): the probes lost since the newest
    /// answer were the outage, and are taken back out of the degraded verdict. After a
    /// single outage the verdict is what it was at that answer; a further one within
    /// `flap_forget` means a flapping link, degraded until clean for a while.
    fn on_outage(&mut self) {
        while self.outcomes.back() == Some(&true) {
            self.outcomes.pop_back();
        }
        self.degraded = self.flaps > 1 || self.degraded_when_answered;
        self.clean_since = None;
    }

    fn rtt_sample(&mut self, rtt: Duration) {
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let dev = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + dev) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    /// Carrier from netlink: loss is believed at once.
    pub fn on_carrier(&mut self, up: bool, now: Instant) {
        self.carrier = up;
        if !up {
            self.go_down(now);
        }
    }

    /// The QUIC connection on this uplink came up or went away.
    pub fn on_connected(&mut self, connected: bool, now: Instant) {
        self.connected = connected;
        if connected {
            self.next_probe_at = now;
        } else {
            self.go_down(now);
        }
    }

    /// The transport's smoothed RTT (QUIC path statistics, updated per acknowledgement).
    pub fn on_transport_rtt(&mut self, rtt: Duration) {
        if rtt.is_zero() {
            return;
        }
        self.transport_rtt = Some(rtt);
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
    }

    fn go_down(&mut self, now: Instant) {
        self.outstanding.clear();
        self.transport_rtt = None;
        if self.state != LinkState::Down {
            self.set_state(LinkState::Down, now);
        }
    }

    fn set_state(&mut self, to: LinkState, now: Instant) {
        // What the link sent is resent elsewhere once it is not Up; its silence is told
        // anew.
        self.unreported = None;
        let outage =
            to == LinkState::Down && matches!(self.state, LinkState::Up | LinkState::Suspect);
        self.state = to;
        self.since = now;
        if to == LinkState::Probing && self.hold() < self.cfg.probe_interval * PROBES_PER_HOLD {
            // A short hold starts its answers at once.
            self.next_probe_at = now;
        }
        if outage {
            self.flaps = self.flaps.saturating_add(1);
            self.on_outage();
        }
    }

    fn hold(&self) -> Duration {
        self.cfg.hold_after(self.flaps)
    }

    fn oldest_overdue_at(&self) -> Option<Instant> {
        self.outstanding
            .front()
            .map(|(_, sent)| *sent + self.overdue_after())
    }

    /// Applies every transition that is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let overdue = self.oldest_overdue_at().is_some_and(|t| now >= t);
        // Probes unanswered for twice the threshold are counted lost.
        let expire = self.overdue_after() * 2;
        while self
            .outstanding
            .front()
            .is_some_and(|(_, sent)| now >= *sent + expire)
        {
            self.outstanding.pop_front();
            self.resolve(true);
            self.judge(now);
        }
        let silent = self.silent_at().is_some_and(|t| now >= t);
        match self.state {
            LinkState::Up => {
                if overdue || silent {
                    self.suspects += 1;
                    if !overdue {
                        self.silences += 1;
                    }
                    self.set_state(LinkState::Suspect, now);
                } else if self.flaps > 0 && now >= self.since + self.cfg.flap_forget {
                    self.flaps = 0;
                }
            }
            LinkState::Suspect => {
                if now >= self.since + self.cfg.down_after {
                    self.set_state(LinkState::Down, now);
                }
            }
            LinkState::Probing => {
                if overdue {
                    self.set_state(LinkState::Down, now);
                } else if now >= self.since + self.hold() {
                    self.set_state(LinkState::Up, now);
                }
            }
            LinkState::Down => {}
        }
    }

    /// The next instant at which [`Self::handle_timeout`] or [`Self::poll_probe`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if self.connected && self.carrier {
            at(self.next_probe_at);
        }
        // An overdue probe turns an Up link Suspect and a Probing one Down; in any state
        // an unanswered probe is counted lost at twice that (only times that change
        // something: a time already past would have the caller spin).
        if let Some(o) = self.oldest_overdue_at() {
            if matches!(self.state, LinkState::Up | LinkState::Probing) {
                at(o);
            }
        }
        if let Some((_, sent)) = self.outstanding.front() {
            at(*sent + self.overdue_after() * 2);
        }
        if self.state == LinkState::Up {
            if let Some(t) = self.silent_at() {
                at(t);
            }
        }
        match self.state {
            LinkState::Suspect => at(self.since + self.cfg.down_after),
            LinkState::Probing => at(self.since + self.hold()),
            LinkState::Up if self.flaps > 0 => at(self.since + self.cfg.flap_forget),
            _ => {}
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Drives a link that answers every probe after `rtt`, until `until`.
    fn run(h: &mut LinkHealth, t: &mut Instant, until: Instant, rtt: Option<Duration>) {
        run_while(h, t, until, rtt, |_| true);
    }

    /// [`run`] while `go` holds.
    fn run_while(
        h: &mut LinkHealth,
        t: &mut Instant,
        until: Instant,
        rtt: Option<Duration>,
        go: impl Fn(&LinkHealth) -> bool,
    ) {
        let mut pending: Vec<(u32, Instant)> = Vec::new();
        while *t < until && go(h) {
            if let Some(id) = h.poll_probe(*t) {
                if let Some(rtt) = rtt {
                    pending.push((id, *t + rtt));
                }
            }
            pending.retain(|&(id, at)| {
                if at <= *t {
                    h.on_probe_ack(id, *t);
                    false
                } else {
                    true
                }
            });
            h.handle_timeout(*t);
            *t += ms(5);
        }
    }

    fn up_link(now: &mut Instant) -> LinkHealth {
        let mut h = LinkHealth::new(HealthConfig::default(), *now);
        h.on_connected(true, *now);
        let until = *now + ms(2500);
        run(&mut h, now, until, Some(ms(40)));
        assert_eq!(h.state(), LinkState::Up);
        h
    }

    #[test]
    fn new_link_is_trusted_only_after_the_hold() {
        let mut t = Instant::now();
        let mut h = LinkHealth::new(HealthConfig::default(), t);
        h.on_connected(true, t);
        let until = t + ms(1000);
        run(&mut h, &mut t, until, Some(ms(40)));
        assert_eq!(h.state(), LinkState::Probing);
        let until = t + ms(1100);
        run(&mut h, &mut t, until, Some(ms(40)));
        assert_eq!(h.state(), LinkState::Up);
        let srtt = h.srtt().expect("rtt");
        assert!(srtt >= ms(40) && srtt <= ms(46), "{srtt:?}");
    }

    #[test]
    fn silent_black_hole_is_suspect_within_250ms_and_down_later() {
        let mut t = Instant::now();
        let mut h = up_link(&mut t);
        let start = t;
        while h.state() == LinkState::Up {
            let until = t + ms(5);
            run(&mut h, &mut t, until, None);
        }
        let detect = t - start;
        assert!(detect <= ms(250), "suspect after {detect:?}");
        let until = t + ms(1600);
        run(&mut h, &mut t, until, None);
        assert_eq!(h.state(), LinkState::Down);
        assert!(h.loss() > 0.5);
    }

    #[test]
    fn unreported_data_turns_a_link_suspect_before_its_next_probe_would() {
        let mut t = Instant::now();
        let mut h = up_link(&mut t);
        // Right after a probe's answer (none outstanding, the next one due in 60 ms),
        // the link goes silent.
        let v = h.verified_until();
        let until = t + ms(500);
        run_while(&mut h, &mut t, until, Some(ms(40)), |h| {
            h.verified_until() == v
        });
        let start = t;
        // The same link, with data sent now that the peer never reports.
        let mut busy = h.clone();
        busy.set_unreported(Some(start));
        let (mut by_probe, mut by_data) = (start, start);
        let until = start + ms(1000);
        run_while(&mut h, &mut by_probe, until, None, |h| {
            h.state() == LinkState::Up
        });
        run_while(&mut busy, &mut by_data, until, None, |h| {
            h.state() == LinkState::Up
        });
        let (by_probe, by_data) = (by_probe - start, by_data - start);
        assert_eq!(busy.state(), LinkState::Suspect);
        assert_eq!(busy.suspects(), (1, 1), "counted as a silence");
        assert_eq!(h.suspects(), (1, 0), "counted as an overdue probe");
        // (The drive steps 5 ms and stops one step past the change.)
        assert!(
            by_data <= busy.silence_after().unwrap_or(ms(600)) + REPORT_SLACK + ms(10),
            "suspect after {by_data:?}"
        );
        assert!(
            by_data + ms(30) <= by_probe,
            "silence of the reports {by_data:?}, overdue probe {by_probe:?}"
        );
        // A report is a sign of life: Up again, no flap, silence watched anew.
        busy.on_delivery_report(start + by_data + ms(5));
        assert_eq!(busy.state(), LinkState::Up);
        assert_eq!(busy.flaps(), 0);
        assert_eq!(busy.unreported(), None);
    }

    #[test]
    fn verified_until_is_the_newest_answered_probe() {
        let mut t = Instant::now();
        let mut h = up_link(&mut t);
        let v = h.verified_until().expect("answered probes");
        assert!(t - v <= ms(150), "{:?}", t - v);
        let until = t + ms(500);
        run(&mut h, &mut t, until, None);
        assert_eq!(
            h.verified_until(),
            Some(v),
            "nothing answered in the black hole"
        );
    }

    #[test]
    fn carrier_loss_is_immediate() {
        let mut t = Instant::now();
        let mut h = up_link(&mut t);
        h.on_carrier(false, t);
        assert_eq!(h.state(), LinkState::Down);
        assert_eq!(h.poll_probe(t + ms(500)), None);
    }

    #[test]
    fn a_flapping_link_waits_longer_each_time() {
        let mut t = Instant::now();
        let mut h = up_link(&mut t);
        // A single outage costs a tenth of a second; each further flap within a minute
        // more.
        for (i, min_hold, max_hold) in [
            (1, 100, 300),
            (2, 2000, 2200),
            (3, 4000, 4200),
            (4, 8000, 8200),
        ] {
            h.on_carrier(false, t);
            h.on_carrier(true, t);
            assert_eq!(h.flaps(), i);
            let restored = t;
            let limit = t + ms(20_000);
            run_while(&mut h, &mut t, limit, Some(ms(40)), |h| {
                h.state() != LinkState::Up
            });
            let took = t - restored;
            assert!(
                took >= ms(min_hold) && took <= ms(max_hold),
                "flap {i}: up again after {took:?}"
            );
        }
    }

    #[test]
    fn jitter_alone_does_not_take_a_link_down() {
        let mut t = Instant::now();
        let mut h = up_link(&mut t);
        // One probe answered late, then normal again.
        let until = t + ms(5000);
        let mut late = true;
        let mut pending: Vec<(u32, Instant)> = Vec::new();
        while t < until {
            if let Some(id) = h.poll_probe(t) {
                let rtt = if late { ms(150) } else { ms(40) };
                late = false;
                pending.push((id, t + rtt));
            }
            pending.retain(|&(id, at)| {
                if at <= t {
                    h.on_probe_ack(id, t);
                    false
                } else {
                    true
                }
            });
            h.handle_timeout(t);
            assert_ne!(h.state(), LinkState::Down);
            t += ms(5);
        }
        assert_eq!(h.state(), LinkState::Up);
    }

    #[test]
    fn idle_backup_probes_sparsely() {
        let mut t = Instant::now();
        let mut h = up_link(&mut t);
        h.set_sparse(true, t);
        let (before, _) = h.probes();
        let until = t + Duration::from_secs(60);
        run(&mut h, &mut t, until, Some(ms(40)));
        let sent = h.probes().0 - before;
        assert!(sent <= 16, "{sent} probes in a minute");
        assert_eq!(h.state(), LinkState::Up);
    }

    /// `probes` probes 100 ms apart, one in `every` lost, the rest answered after 40 ms.
    fn lossy(h: &mut LinkHealth, t: &mut Instant, probes: u32, every: u32) {
        for i in 0..probes {
            if let Some(id) = h.poll_probe(*t) {
                if i % every != 0 {
                    h.on_probe_ack(id, *t + ms(40));
                }
            }
            *t += ms(100);
            h.handle_timeout(*t);
        }
    }

    #[test]
    fn a_lossy_or_swinging_link_is_degraded_until_clean_for_a_while() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut h = LinkHealth::new(HealthConfig::default(), t0);
        h.on_connected(true, t0);
        let mut t = t0;
        // Clean 40 ms link.
        for _ in 0..50 {
            if let Some(id) = h.poll_probe(t) {
                h.on_probe_ack(id, t + ms(40));
            }
            t += ms(100);
            h.handle_timeout(t);
        }
        assert!(h.usable() && !h.degraded());
        // 10 % loss: still up, but degraded.
        lossy(&mut h, &mut t, 60, 10);
        assert!(h.degraded(), "loss {}", h.loss());
        assert!(h.usable());
        // Clean again: degraded until the window forgets the losses and 10 s pass.
        let mut cleared_at = None;
        for _ in 0..300 {
            if let Some(id) = h.poll_probe(t) {
                h.on_probe_ack(id, t + ms(40));
            }
            t += ms(100);
            h.handle_timeout(t);
            if !h.degraded() && cleared_at.is_none() {
                cleared_at = Some(t);
            }
        }
        let cleared = cleared_at.expect("clears").duration_since(t0);
        assert!(cleared >= Duration::from_secs(5 + 6 + 10), "{cleared:?}");
        // RTT swinging between 100 and 1200 ms, no loss.
        for i in 0..40u64 {
            if let Some(id) = h.poll_probe(t) {
                h.on_probe_ack(id, t + ms(if i % 2 == 0 { 100 } else { 1200 }));
            }
            t += ms(100);
            h.handle_timeout(t);
        }
        assert!(h.degraded());
    }

    /// Answers every probe after `rtt` until the link is Up (at most 10 s).
    fn answer_until_up(h: &mut LinkHealth, t: &mut Instant, rtt: Duration) {
        let limit = *t + ms(10_000);
        run_while(h, t, limit, Some(rtt), |h| h.state() != LinkState::Up);
        assert_eq!(h.state(), LinkState::Up, "not up again within 10 s");
    }

    /// A black hole of `outage` on an Up link, then clean answers until it is Up again.
    fn black_hole(h: &mut LinkHealth, t: &mut Instant, outage: Duration) {
        let until = *t + outage;
        run(h, t, until, None);
        answer_until_up(h, t, ms(40));
    }

    #[test]
    fn a_single_clean_outage_leaves_the_link_trusted_and_a_second_one_does_not() {
        let mut t = Instant::now();
        let mut h = up_link(&mut t);
        let start = t;
        black_hole(&mut h, &mut t, ms(2500));
        assert_eq!(h.flaps(), 1);
        assert!(
            t - start <= ms(2500 + 300),
            "up again {:?} after the outage began",
            t - start
        );
        // Its 40-odd lost probes were the outage: POS may use the link again at once.
        assert!(!h.degraded(), "degraded after a single clean outage");
        assert!(
            h.probes().1 >= 20,
            "lost probes still counted: {:?}",
            h.probes()
        );
        let until = t + ms(10_000);
        run(&mut h, &mut t, until, Some(ms(40)));
        assert!(!h.degraded());
        // A second outage within a minute: flapping, not for POS until clean for a while.
        black_hole(&mut h, &mut t, ms(2500));
        assert_eq!(h.flaps(), 2);
        assert!(h.degraded(), "a flapping link is trusted with POS");
        // Up after a 2 s hold; clean answers from the first probe after the outage.
        let until = t + ms(7_000);
        run(&mut h, &mut t, until, Some(ms(40)));
        assert!(h.degraded(), "clean for 9 s");
        let until = t + ms(2_000);
        run(&mut h, &mut t, until, Some(ms(40)));
        assert!(!h.degraded(), "clean for 11 s after the second outage");
    }

    #[test]
    fn a_link_answering_again_is_probed_densely_through_its_hold_only() {
        let mut t = Instant::now();
        let mut h = up_link(&mut t);
        h.on_carrier(false, t);
        // Down: probes at the normal interval, however long the outage.
        h.on_carrier(true, t);
        let until = t + ms(1000);
        let mut down_probes = 0;
        while t < until {
            if h.poll_probe(t).is_some() {
                down_probes += 1;
            }
            t += ms(1);
        }
        assert!(down_probes <= 11, "{down_probes} probes in a second Down");
        assert_eq!(h.state(), LinkState::Down);
        // It answers: Probing, probed at once and then every 25 ms, Up after its 0.1 s
        // hold, on five clean answers.
        let mut answered = 0;
        let mut pending: Vec<(u32, Instant)> = Vec::new();
        let first = t;
        while h.state() != LinkState::Up && t < first + ms(1000) {
            if let Some(id) = h.poll_probe(t) {
                pending.push((id, t + ms(10)));
            }
            pending.retain(|(id, at)| {
                if *at <= t {
                    h.on_probe_ack(*id, t);
                    answered += 1;
                    false
                } else {
                    true
                }
            });
            h.handle_timeout(t);
            t += ms(1);
        }
        assert_eq!(h.state(), LinkState::Up);
        assert!(
            t - first <= ms(100 + 100 + 10 + 2),
            "up {:?} after the first answer could go out",
            t - first
        );
        assert!(answered >= 5, "trusted on {answered} answers");
    }

    #[test]
    fn a_lossy_link_stays_degraded_through_an_outage() {
        let mut t = Instant::now();
        let mut h = up_link(&mut t);
        // 20 % loss for 3 s: degraded.
        lossy(&mut h, &mut t, 30, 5);
        assert!(h.degraded());
        black_hole(&mut h, &mut t, ms(2500));
        assert_eq!(h.flaps(), 1);
        assert!(h.degraded(), "the outage washed a lossy link clean");
    }

    #[test]
    fn a_carrier_loss_leaves_a_clean_link_trusted() {
        let mut t = Instant::now();
        let mut h = up_link(&mut t);
        // A modem fading out: its probes go unanswered for a while, then the carrier goes.
        // Those probes were the outage too.
        let until = t + ms(400);
        run(&mut h, &mut t, until, None);
        assert!(h.degraded(), "3 probes lost");
        h.on_carrier(false, t);
        t += ms(2500);
        h.on_carrier(true, t);
        answer_until_up(&mut h, &mut t, ms(40));
        assert!(!h.degraded());
    }

    #[test]
    fn leaving_a_slow_rate_right_after_a_probe_waits_one_regular_interval() {
        let mut t = Instant::now();
        let mut h = up_link(&mut t);
        h.set_sparse(true, t);
        t += ms(5000);
        assert!(h.poll_probe(t).is_some(), "a sparse probe is due after 4 s");
        // The primaries fail in the same instant: the regular rate resumes, but the probe
        // just sent counts, so the next is 100 ms on, not now again.
        h.set_sparse(false, t);
        assert_eq!(h.poll_probe(t), None);
        assert!(h.poll_timeout().is_some_and(|at| at > t));
        // Quiet: the next probe is a second on; data 600 ms later makes one due at once.
        h.set_quiet(true, t);
        t += ms(100);
        assert!(h.poll_probe(t).is_some());
        t += ms(600);
        assert_eq!(h.poll_probe(t), None);
        h.set_quiet(false, t);
        assert!(h.poll_probe(t).is_some());
    }
}

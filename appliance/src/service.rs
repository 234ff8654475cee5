//! Talks to systemd when it is the service manager (`Type=notify`): READY once the data
//! plane is up, a watchdog ping from the main loop at half the watchdog period, and a
//! one-line STATUS for `systemctl status`. Without `NOTIFY_SOCKET` (a shell, the tests)
//! every call does nothing.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

pub struct Notifier {
    watchdog: Option<Duration>,
    last_ping: Instant,
    status: String,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifier {
    pub fn new() -> Self {
        let mut usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec))
            .filter(|d| !d.is_zero());
        Self {
            watchdog,
            last_ping: Instant::now(),
            status: String::new(),
        }
    }

    fn send(states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::debug!("sd_notify: {e}");
        }
    }

    /// The data plane is up: systemd may start what is ordered after us.
    pub fn ready(&mut self, status: &str) {
        self.status = status.to_string();
        Self::send(&[NotifyState::Ready, NotifyState::Status(status)]);
        self.last_ping = Instant::now();
    }

    /// Called from the main loop: pings the watchdog when due and updates the status
    /// line when it changed. A main loop that stops calling this gets the service
    /// restarted by systemd.
    pub fn tick(&mut self, status: &str) {
        let due = self
            .watchdog
            .is_some_and(|w| self.last_ping.elapsed() >= w / 2);
        if due {
            Self::send(&[NotifyState::Watchdog]);
            self.last_ping = Instant::now();
        }
        if status != self.status {
            self.status = status.to_string();
            Self::send(&[NotifyState::Status(status)]);
        }
    }

    pub fn stopping(&self) {
        Self::send(&[NotifyState::Stopping]);
    }
}

//! Counts each capped uplink's bytes from its interface counters
//! (`/sys/class/net/IF/statistics`), keeps the count in the state directory across
//! restarts, reports 75/95/100 % as events, and applies the configured action when the
//! allowance is used up (backup only, or off) until the period starts again.

use std::path::PathBuf;
use std::time::Duration;

use stallnet_netconf::{CapAction, CapPeriod, Uplink};

use crate::core::cap::{CapEvent, CapSpec, CapState, Period};

/// How often the counters are read.
pub const INTERVAL: Duration = Duration::from_secs(1);

pub fn spec(u: &Uplink) -> Option<CapSpec> {
    let c = u.cap.as_ref()?;
    Some(CapSpec {
        limit: stallnet_netconf::parse_bytes(&c.bytes)?,
        period: match c.period {
            CapPeriod::Daily => Period::Daily,
            CapPeriod::Monthly => Period::Monthly {
                reset_day: c.reset_day.unwrap_or(1),
            },
        },
    })
}

/// The interface's rx + tx byte counters; `None` while it does not exist.
pub fn counter(iface: &str) -> Option<u64> {
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/class/net/{iface}/statistics/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(read("rx_bytes")? + read("tx_bytes")?)
}

pub fn state_path(state_dir: &std::path::Path, uplink: &str) -> PathBuf {
    state_dir.join("caps").join(format!("{uplink}.json"))
}

/// The saved state (a fresh one when there is none or it does not parse).
pub fn load(path: &std::path::Path) -> CapState {
    let mut s: CapState = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    s.restarted();
    s
}

pub fn save(path: &std::path::Path, s: &CapState) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let res = serde_json::to_vec(s)
        .map_err(|e| e.to_string())
        .and_then(|b| {
            stallnet_netconf::revisions::write_atomic(path, &b).map_err(|e| e.to_string())
        });
    if let Err(e) = res {
        tracing::warn!("saving the data cap count {}: {e}", path.display());
    }
}

/// What the uplink may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Normal,
    BackupOnly,
    Off,
}

pub fn verdict(u: &Uplink, spec: &CapSpec, s: &CapState) -> Verdict {
    match (s.exhausted(spec), u.cap.as_ref().map(|c| c.action)) {
        (true, Some(CapAction::Off)) => Verdict::Off,
        (true, _) => Verdict::BackupOnly,
        (false, _) => Verdict::Normal,
    }
}

/// The event's words.
pub fn describe(u: &Uplink, spec: &CapSpec, ev: CapEvent) -> String {
    let gb = spec.limit as f64 / 1e9;
    match ev {
        CapEvent::Reset => format!("{}: a new data period began; the allowance is back", u.name),
        CapEvent::Crossed(100) => format!(
            "{}: the {gb:.2} GB allowance is used up: {}",
            u.name,
            match u.cap.as_ref().map(|c| c.action) {
                Some(CapAction::Off) => "switched off until the period starts again",
                _ => "backup only until the period starts again",
            }
        ),
        CapEvent::Crossed(p) => format!("{}: {p} % of the {gb:.2} GB allowance used", u.name),
    }
}

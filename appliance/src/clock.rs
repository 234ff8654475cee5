//! The clock of a box without a real-time clock. At boot the kernel starts from whatever
//! the image was built with (or 1970); the box must never believe a time earlier than
//! one it has already seen. So the daemon saves the time regularly (`<state_dir>/clock`),
//! `stallnet clock restore` (an early-boot unit) moves the clock forward to it, and NTP
//! (chrony) corrects it once an uplink works. Whether the clock is trustworthy yet is in
//! the status (and on the dashboard).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Unix time this release cannot predate (2026-01-01): an earlier clock is wrong.
pub const FLOOR: i64 = 1_767_225_600;
/// How often the daemon saves the time.
pub const SAVE_EVERY: Duration = Duration::from_secs(600);

pub fn file(state_dir: &Path) -> PathBuf {
    state_dir.join("clock")
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Saves the current time (atomically: a power cut leaves the old or the new one).
pub fn save(state_dir: &Path) -> Result<()> {
    let path = file(state_dir);
    let tmp = state_dir.join(".clock.tmp");
    std::fs::write(&tmp, format!("{}\n", now()))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// The time saved last, if any (a file that does not parse counts as none).
pub fn saved(state_dir: &Path) -> Option<i64> {
    std::fs::read_to_string(file(state_dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Where the clock should jump to at boot: forward to the latest time known (the saved
/// one, or the release floor), never backwards.
pub fn restore_target(now: i64, saved: Option<i64>) -> Option<i64> {
    let known = saved.unwrap_or(FLOOR).max(FLOOR);
    (now < known).then_some(known)
}

/// Sets the wall clock (needs CAP_SYS_TIME).
pub fn set(unix: i64) -> Result<()> {
    use nix::sys::time::TimeSpec;
    use nix::time::{clock_settime, ClockId};
    clock_settime(ClockId::CLOCK_REALTIME, TimeSpec::new(unix, 0))
        .context("setting the clock (needs CAP_SYS_TIME)")
}

/// `synced` (NTP said so: systemd-timesyncd's flag file, or chrony's leap status),
/// `unverified` (plausible, not confirmed yet) or `wrong` (before this release).
pub fn state() -> &'static str {
    if now() < FLOOR {
        "wrong"
    } else if synced() {
        "synced"
    } else {
        "unverified"
    }
}

fn synced() -> bool {
    if Path::new("/run/systemd/timesync/synchronized").exists() {
        return true;
    }
    chrony_synced()
}

/// Asks chrony at most once a minute (`chronyc -c tracking`: the last field is the leap
/// status, `Normal` once synchronised).
fn chrony_synced() -> bool {
    use std::sync::Mutex;
    static CACHE: Mutex<Option<(Instant, bool)>> = Mutex::new(None);
    let Ok(mut c) = CACHE.lock() else {
        return false;
    };
    if let Some((at, v)) = *c {
        if at.elapsed() < Duration::from_secs(60) {
            return v;
        }
    }
    let v = std::process::Command::new("chronyc")
        .args(["-c", "-n", "tracking"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .rsplit(',')
                .next()
                .is_some_and(|leap| leap == "Normal")
        });
    *c = Some((Instant::now(), v));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_only_ever_moves_forward_at_boot() {
        let later = FLOOR + 86_400 * 30;
        // Booted at 1970 with a saved time: jump to it.
        assert_eq!(restore_target(0, Some(later)), Some(later));
        // Never saved: at least the release date.
        assert_eq!(restore_target(0, None), Some(FLOOR));
        // A saved time before the floor (a wrong clock was saved) does not pull back.
        assert_eq!(restore_target(0, Some(100)), Some(FLOOR));
        // Already later than anything known (NTP ran before): leave it.
        assert_eq!(restore_target(later + 5, Some(later)), None);
        assert_eq!(restore_target(later, Some(later)), None);
    }

    #[test]
    fn saved_time_survives_and_garbage_is_ignored() {
        let dir = std::env::temp_dir().join(format!("stallnet-clock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        save(&dir).expect("save");
        let t = saved(&dir).expect("saved");
        assert!((t - now()).abs() <= 1);
        std::fs::write(file(&dir), "yesterday").expect("write");
        assert_eq!(saved(&dir), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

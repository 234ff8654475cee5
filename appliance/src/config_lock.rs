//! One config change at a time: `stallnet config apply`, `set`, `confirm` and `rollback`,
//! and the daemon's automatic rollback, each hold an exclusive lock on `<config>.lock`
//! (flock) from reading the live config to writing its revision, so two techs applying at
//! once are serialized instead of losing one change while both are told it applied.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Held while a config change runs; released when dropped (or when the process ends).
pub struct ConfigLock {
    _lock: Flock<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another config change (apply, set, confirm, rollback, or the daemon rolling back) \
         holds {}; nothing was changed: try again when it is done",
        .0.display()
    )]
    Busy(PathBuf),
    #[error("locking {path}: {why}", path = .0.display(), why = .1)]
    Io(PathBuf, String),
}

/// The lock file of the live config `live`.
pub fn lock_path(live: &Path) -> PathBuf {
    let mut p = live.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes the lock, waiting up to `wait` for another change to finish.
pub fn lock(live: &Path, wait: Duration) -> Result<ConfigLock, LockError> {
    let path = lock_path(live);
    let start = Instant::now();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| LockError::Io(path.clone(), e.to_string()))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(ConfigLock { _lock: l }),
            Err((f, Errno::EWOULDBLOCK)) if start.elapsed() < wait => {
                file = f;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((_, Errno::EWOULDBLOCK)) => return Err(LockError::Busy(path)),
            Err((_, e)) => return Err(LockError::Io(path, e.to_string())),
        }
    }
}

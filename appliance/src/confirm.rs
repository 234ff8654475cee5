//! The daemon's half of the confirmed commit: an applied config that is not confirmed by
//! its deadline is replaced by the previous revision — checked once a second while
//! running and once at start-up, before the config is read, so neither a daemon restart
//! nor a reboot lets an unconfirmed change stay (see `stallnet_netconf::revisions`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_netconf::revisions::{self, Decision, Store};
use tokio_util::sync::CancellationToken;

use crate::events::{EventLog, Level};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// If an unconfirmed apply's deadline has passed, restores the previous revision into
/// `config_path` and returns what was done (for the log and the event).
pub fn roll_back_if_due(config_path: &Path, state_dir: &Path) -> Result<Option<String>> {
    let store = Store::open(&Store::dir_for(state_dir))?;
    if !matches!(
        revisions::decide(store.pending()?.as_ref(), now()),
        Decision::RollBack(_)
    ) {
        return Ok(None);
    }
    // Due: under the config lock, and looked at again (a confirm may have just won it).
    let _lock = match crate::config_lock::lock(config_path, Duration::from_secs(2)) {
        Ok(l) => l,
        // A tech's change is running: the next look decides.
        Err(crate::config_lock::LockError::Busy(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let pending = store.pending()?;
    let Decision::RollBack(previous) = revisions::decide(pending.as_ref(), now()) else {
        return Ok(None);
    };
    let failed = pending.map_or(0, |p| p.revision);
    let msg = match previous {
        Some(n) => {
            let text = store.text(n)?;
            revisions::write_atomic(config_path, text.as_bytes())?;
            store.set_active(n)?;
            format!(
                "revision {failed} was not confirmed in time: revision {n} restored to {}",
                config_path.display()
            )
        }
        None => format!(
            "revision {failed} was not confirmed in time, but no earlier revision exists: kept"
        ),
    };
    store.set_pending(None)?;
    Ok(Some(msg))
}

/// Watches the pending confirmation while the daemon runs; on a rollback, records the
/// event and calls `after` (which reloads, or asks for a restart).
pub async fn guard(
    config_path: PathBuf,
    state_dir: PathBuf,
    events: Arc<EventLog>,
    after: impl Fn() + Send + Sync + 'static,
    cancel: CancellationToken,
) {
    let after = Arc::new(after);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        let (p, s) = (config_path.clone(), state_dir.clone());
        match tokio::task::spawn_blocking(move || roll_back_if_due(&p, &s)).await {
            Ok(Ok(Some(msg))) => {
                events.push(Level::Critical, "config_rolled_back", None, msg);
                // A reload may block on the runtime: off the async threads.
                let a = after.clone();
                let _ = tokio::task::spawn_blocking(move || a()).await;
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!("config confirmation: {e:#}"),
            Err(e) => tracing::warn!("config confirmation: {e}"),
        }
    }
}

/// At start-up: roll back first if due, then read the config.
pub fn load_at_start(config_path: &Path) -> Result<(stallnet_netconf::Config, Option<String>)> {
    let cfg = stallnet_netconf::load_file(config_path)?;
    match roll_back_if_due(config_path, &cfg.state_dir).context("config confirmation")? {
        Some(msg) => {
            let cfg = stallnet_netconf::load_file(config_path)?;
            Ok((cfg, Some(msg)))
        }
        None => Ok((cfg, None)),
    }
}

//! An invite code waiting on the box: written into the SD card's `stallnet.toml` as
//! `enroll = "SN-…"` ([`crate::boot_import`] keeps it in `<state_dir>/enroll-pending`),
//! redeemed by the running edge as soon as an uplink reaches the hub, then the hub pinned
//! in the config as a new revision, exactly as `stallnet enroll` does; the code is kept
//! until then (the hub answers the same box with the same code again). Until the hub
//! answers (or while it cannot record the box), the edge tries again (2 s doubling to
//! 30 s); a refusal (used, expired, forged) is a critical event and the code is set
//! aside as `enroll-refused`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use super::code::Code;
use crate::events::{EventLog, Level};

const FILE: &str = "enroll-pending";
const REFUSED: &str = "enroll-refused";

/// Keeps `code` (already decoded once, so known good) for the edge to redeem.
pub fn save(state_dir: &Path, code: &str) -> Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    crate::identity::write_private(&state_dir.join(FILE), code.as_bytes())
}

/// The code waiting, if any (a file that no longer decodes is set aside).
pub fn load(state_dir: &Path) -> Option<Code> {
    let text = std::fs::read_to_string(state_dir.join(FILE)).ok()?;
    match Code::decode(&text) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("the waiting invite code is unreadable ({e}): set aside");
            set_aside(state_dir);
            None
        }
    }
}

fn set_aside(state_dir: &Path) {
    let _ = std::fs::rename(state_dir.join(FILE), state_dir.join(REFUSED));
}

/// The `edge.hubs` assignment that pins the hub a code names, at every address it gives.
pub fn hubs_assignment(code: &Code) -> String {
    let hubs: Vec<String> = code
        .hub_addresses
        .iter()
        .map(|a| {
            format!(
                "{{ address = \"{a}\", identity = \"{}\" }}",
                code.hub_identity
            )
        })
        .collect();
    format!("edge.hubs=[{}]", hubs.join(", "))
}

/// Redeems `code` for the box with identity `me`, then pins the hub in `live` (a new
/// revision; the daemon reloads). Runs until done, refused or cancelled.
pub async fn run(
    code: Code,
    me: String,
    state_dir: PathBuf,
    live: PathBuf,
    events: Arc<EventLog>,
    cancel: CancellationToken,
) {
    let mut wait = Duration::from_secs(2);
    let name = loop {
        let attempt = tokio::select! {
            r = super::enroll(&code, &me) => r,
            _ = cancel.cancelled() => return,
        };
        let why = match attempt {
            Ok(Ok(name)) => break name,
            // The hub could not record the box (its disk, say): the code is still good.
            Ok(Err(super::Refusal::HubError)) => "the hub could not record this box".to_string(),
            Ok(Err(refusal)) => {
                events.push(
                    Level::Critical,
                    "enroll_refused",
                    None,
                    format!("the hub refused the SD card's invite code: {refusal}; ask the organiser for a new one"),
                );
                set_aside(&state_dir);
                return;
            }
            Err(e) => format!("{e:#}"),
        };
        tracing::info!("enrolling: {why}; trying again in {} s", wait.as_secs());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return,
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    };
    // The hub has admitted the box: pin it. The code is kept until that is done (asked
    // again, the hub gives the same box the same answer).
    let assignment = hubs_assignment(&code);
    let message = format!("enrolled as {name}");
    let pinned = tokio::task::spawn_blocking(move || {
        crate::config_cmd::set_quietly(live, assignment, message)
    })
    .await;
    match pinned {
        Ok(Ok(said)) => {
            let _ = std::fs::remove_file(state_dir.join(FILE));
            events.push(
            Level::Info,
            "enrolled",
            None,
            format!(
                "enrolled as {name} on hub {} with the SD card's code: {}",
                code.hub_identity,
                said.lines().next().unwrap_or("")
            ),
            )
        }
        Ok(Err(why)) => events.push(
            Level::Critical,
            "enroll_pin_failed",
            None,
            format!("enrolled as {name}, but pinning the hub failed: {why}; the next start tries again, or run `stallnet config set '{}'`", hubs_assignment(&code)),
        ),
        Err(e) => tracing::error!("pinning the hub: {e}"),
    }
}

//! The status document both roles publish to `<runtime_dir>/status.json` every half
//! second (written atomically), and its reading for `stallnet status`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const FILE: &str = "status.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: u32,
    pub role: String,
    /// `online`, `degraded` (some uplinks down), `offline` (no uplink reaches the hub).
    pub state: String,
    pub fallback_active: bool,
    pub tunnel_address: Option<String>,
    pub refused_handshakes: u64,
    pub bonds: serde_json::Value,
    /// The edge's commerce figures (online, undelivered, oldest age, dead letters, alerts,
    /// per-client last sync), when the commerce service is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commerce: Option<serde_json::Value>,
}

pub fn path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(FILE)
}

pub fn write(runtime_dir: &Path, status: &Status) -> Result<()> {
    let tmp = runtime_dir.join(".status.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(status)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path(runtime_dir))?;
    Ok(())
}

pub fn read(runtime_dir: &Path) -> Result<Status> {
    let p = path(runtime_dir);
    let text = std::fs::read(&p)
        .with_context(|| format!("reading {} (is stallnet running?)", p.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", p.display()))
}

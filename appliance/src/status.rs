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
    /// TUN reads and coalesced writes dropped for a malformed offload header (see
    /// `driver::tun_io`).
    #[serde(default)]
    pub tun_malformed: u64,
    pub bonds: serde_json::Value,
    /// The edge's commerce figures (online, undelivered, oldest age, dead letters, alerts,
    /// per-client last sync), when the commerce service is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commerce: Option<serde_json::Value>,
    /// Seconds since the daemon started.
    #[serde(default)]
    pub uptime_s: u64,
    /// The edge's hub (address), for the dashboard's header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Whether the wall clock can be trusted: `synced` (NTP said so), `unverified` (no
    /// NTP confirmation yet; the time is the saved or the hardware one), `wrong` (before
    /// this software was built).
    #[serde(default)]
    pub clock: String,
    /// The edge's advice for a live-stream encoder: the bitrate the stream class can
    /// count on now (`{"bitrate_bps", "uplink", "basis"}`), or null when nothing carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_advice: Option<serde_json::Value>,
    /// The edge's cap on what one LAN source sends into the tunnel (`{"pps", "dropped"}`:
    /// packets per second, and packets dropped over it since the daemon started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan_source_cap: Option<serde_json::Value>,
    /// The hub's isolation of stalls (`{"between_stalls", "to_hub"}`: packets from stalls
    /// dropped on their way to another stall or a link-local address, and to the hub
    /// itself, since the hub started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<serde_json::Value>,
    /// The hub's fleet view: every stall, offline and degraded first (see `stallnet
    /// stalls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalls: Option<serde_json::Value>,
    /// The hub's connection attempts (`{"in_progress", "retried", "refused",
    /// "timed_out"}`: handshakes running now; attempts answered with a QUIC Retry or
    /// refused while handshakes piled up; handshakes given up after 5 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshakes: Option<serde_json::Value>,
    /// The hub's enrollment figures (`{"attempts", "refused", "pending_invites"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment: Option<serde_json::Value>,
}

/// The clock's trustworthiness (see [`Status::clock`]).
pub fn clock_state() -> String {
    crate::clock::state().into()
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

/// The status document for people: the state in words, sales waiting, each uplink and
/// each class.
pub fn human(s: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} ({}){}",
        s["state"].as_str().unwrap_or("?").to_uppercase(),
        s["role"].as_str().unwrap_or("?"),
        if s["fallback_active"].as_bool() == Some(true) {
            ", direct fallback active"
        } else {
            ""
        }
    );
    let c = &s["commerce"];
    if c.is_object() {
        let n = c["undelivered"].as_u64().unwrap_or(0);
        let age = c["oldest_undelivered_age_s"]
            .as_i64()
            .map_or(String::new(), |a| {
                format!(", oldest {}h{:02}m", a / 3600, (a % 3600) / 60)
            });
        let dead = c["dead_letters"].as_u64().unwrap_or(0);
        if c["storage"]["ok"].as_bool() == Some(false) {
            let _ = writeln!(
                out,
                "STORAGE FULL: new sales are refused; free space on the SD card ({} free)",
                c["storage"]["free_bytes"]
                    .as_u64()
                    .map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
            );
        }
        let _ = writeln!(
            out,
            "sales: {n} waiting to upload{age}{}",
            if dead > 0 {
                format!(", {dead} refused by the backend (dead letters)")
            } else {
                String::new()
            }
        );
    }
    for (name, b) in s["bonds"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "{name}:");
        for l in b["links"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {:<10} {:<8}{} rtt {:>7} loss {:>5.1}%  rate {:>6.1} Mbit/s  tx {:>10} rx {:>10}",
                l["name"].as_str().unwrap_or("?"),
                l["state"].as_str().unwrap_or("?"),
                if l["degraded"].as_bool() == Some(true) {
                    " (degraded)"
                } else {
                    ""
                },
                l["rtt_ms"]
                    .as_f64()
                    .map_or("-".into(), |r| format!("{r:.1}ms")),
                l["loss"].as_f64().unwrap_or(0.0) * 100.0,
                l["rate_mbps"].as_f64().unwrap_or(0.0),
                l["tx_bytes"].as_u64().unwrap_or(0),
                l["rx_bytes"].as_u64().unwrap_or(0),
            );
        }
        for c in b["classes"].as_array().into_iter().flatten() {
            let ms = |k: &str| c[k].as_f64().map_or("-".into(), |v| format!("{v}ms"));
            let _ = writeln!(
                out,
                "  {:<12} {:>9} pkts {:>12} bytes  dropped {:>6}  delay p50 {:>7} p99 {:>7}",
                c["class"].as_str().unwrap_or("?"),
                c["packets"].as_u64().unwrap_or(0),
                c["bytes"].as_u64().unwrap_or(0),
                c["dropped_full"].as_u64().unwrap_or(0)
                    + c["dropped_codel"].as_u64().unwrap_or(0)
                    + c["dropped_sojourn"].as_u64().unwrap_or(0),
                ms("delay_p50_ms"),
                ms("delay_p99_ms"),
            );
        }
    }
    out
}

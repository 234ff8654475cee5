//! Cellular modem facts from ModemManager: operator, access technology, signal (RSRP,
//! RSRQ, SINR) of the modem behind an uplink's interface, read with `mmcli`'s JSON
//! output. Without ModemManager (or without a modem on that interface) every field is
//! unknown and the source says so; a modem reports `--` for what it does not know, which
//! becomes unknown too.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the box knows of the modem behind a cellular uplink.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModemFacts {
    /// `modemmanager`, or `unknown` when ModemManager is absent or has no modem for the
    /// interface.
    pub source: String,
    pub model: Option<String>,
    /// ModemManager's state: `connected`, `registered`, `searching`, `locked`, …
    pub state: Option<String>,
    pub operator: Option<String>,
    /// `home`, `roaming`, `searching`, `denied`, …
    pub registration: Option<String>,
    /// The best radio technology in use: `5gnr`, `lte`, `umts`, `hspa`, `edge`, `gsm`, …
    pub access_technology: Option<String>,
    /// ModemManager's 0–100 signal quality.
    pub signal_quality: Option<u8>,
    /// Which radio the signal figures below are from (`5g` or `lte`).
    pub signal_radio: Option<String>,
    pub rsrp_dbm: Option<f64>,
    pub rsrq_db: Option<f64>,
    pub sinr_db: Option<f64>,
    /// Set when the SIM waits for a PIN or PUK (`sim-pin`, …).
    pub unlock_required: Option<String>,
}

impl ModemFacts {
    pub fn unknown() -> Self {
        Self {
            source: "unknown".into(),
            ..Self::default()
        }
    }
}

/// A string field, `None` for ModemManager's `--` (unknown) and empty strings.
fn text(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "--")
        .map(str::to_string)
}

fn number(v: &Value) -> Option<f64> {
    text(v)?.parse().ok().filter(|x: &f64| x.is_finite())
}

/// The modem object paths in `mmcli -L -J` output.
pub fn parse_list(doc: &Value) -> Vec<String> {
    doc["modem-list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(text)
        .collect()
}

/// Whether `mmcli -m X -J` output describes the modem whose network port is `iface`.
pub fn serves(doc: &Value, iface: &str) -> bool {
    doc["modem"]["generic"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .any(|p| p == format!("{iface} (net)"))
}

/// Ranks access technologies, best first.
fn rank(tech: &str) -> usize {
    const ORDER: [&str; 10] = [
        "5gnr",
        "lte",
        "hspa-plus",
        "hspa",
        "hsupa",
        "hsdpa",
        "umts",
        "edge",
        "gprs",
        "gsm",
    ];
    ORDER.iter().position(|t| *t == tech).unwrap_or(ORDER.len())
}

/// The facts in `mmcli -m X -J` output.
pub fn parse_modem(doc: &Value) -> ModemFacts {
    let m = &doc["modem"];
    let g = &m["generic"];
    let gpp = &m["3gpp"];
    let access_technology = g["access-technologies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(text)
        .min_by_key(|t| rank(t));
    ModemFacts {
        source: "modemmanager".into(),
        model: text(&g["model"]),
        state: text(&g["state"]),
        operator: text(&gpp["operator-name"]).or_else(|| text(&gpp["operator-code"])),
        registration: text(&gpp["registration-state"]),
        access_technology,
        signal_quality: number(&g["signal-quality"]["value"])
            .filter(|q| (0.0..=100.0).contains(q))
            .map(|q| q as u8),
        unlock_required: text(&g["unlock-required"]),
        ..ModemFacts::default()
    }
}

/// Adds the figures of `mmcli -m X --signal-get -J` output: 5G NR's when the modem
/// reports them, else LTE's. Returns whether signal refresh is off (rate 0), in which
/// case ModemManager reports nothing until `--signal-setup` switches it on.
pub fn add_signal(facts: &mut ModemFacts, doc: &Value) -> bool {
    let s = &doc["modem"]["signal"];
    for (radio, key) in [("5g", "5g"), ("lte", "lte")] {
        let r = &s[key];
        let (rsrp, rsrq, sinr) = (number(&r["rsrp"]), number(&r["rsrq"]), number(&r["snr"]));
        if rsrp.is_some() || rsrq.is_some() || sinr.is_some() {
            facts.signal_radio = Some(radio.into());
            facts.rsrp_dbm = rsrp;
            facts.rsrq_db = rsrq;
            facts.sinr_db = sinr;
            break;
        }
    }
    number(&s["refresh"]["rate"]).is_none_or(|r| r == 0.0)
}

async fn mmcli(program: &Path, args: &[&str]) -> Option<Value> {
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Reads the facts of the modem whose network interface is `iface`.
pub async fn read(iface: &str) -> ModemFacts {
    read_with(Path::new("mmcli"), iface).await
}

/// The ModemManager object path of the modem whose network port is `iface`, and its
/// `mmcli -m X -J` document.
async fn find(program: &Path, iface: &str) -> Option<(String, Value)> {
    let list = mmcli(program, &["-L", "-J"]).await?;
    for path in parse_list(&list) {
        let Some(doc) = mmcli(program, &["-m", &path, "-J"]).await else {
            continue;
        };
        if serves(&doc, iface) {
            return Some((path, doc));
        }
    }
    None
}

/// [`read`] with another `mmcli` program (a stand-in replaying recorded outputs in tests).
pub async fn read_with(program: &Path, iface: &str) -> ModemFacts {
    let Some((path, doc)) = find(program, iface).await else {
        return ModemFacts::unknown();
    };
    let mut facts = parse_modem(&doc);
    if let Some(sig) = mmcli(program, &["-m", &path, "--signal-get", "-J"]).await {
        if add_signal(&mut facts, &sig) {
            // Signal figures need polling switched on once (every 10 s).
            let _ = mmcli(program, &["-m", &path, "--signal-setup=10"]).await;
        }
    }
    facts
}

/// Whether a modem in this state should be told to connect with the configured APN.
pub fn wants_connect(facts: &ModemFacts) -> bool {
    facts.source == "modemmanager"
        && facts.unlock_required.is_none()
        && matches!(facts.state.as_deref(), Some("registered" | "enabled"))
}

/// Connects the modem behind `iface` with `apn` (`mmcli --simple-connect`).
pub async fn connect_with(program: &Path, iface: &str, apn: &str) -> Result<(), String> {
    let (path, _) = find(program, iface)
        .await
        .ok_or_else(|| format!("no ModemManager modem on {iface}"))?;
    let arg = format!("--simple-connect=apn={apn}");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program)
            .args(["-m", &path, &arg])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "mmcli --simple-connect took over 60 s".to_string())?
    .map_err(|e| format!("mmcli: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// One line for people: "vodafone UK, LTE, RSRP -95 dBm, RSRQ -11 dB, SINR 10.4 dB".
pub fn describe(f: &ModemFacts) -> String {
    if f.source == "unknown" {
        return "modem: unknown (no ModemManager modem on this interface)".into();
    }
    let mut parts = vec![f.operator.clone().unwrap_or_else(|| "no operator".into())];
    if let Some(t) = &f.access_technology {
        parts.push(t.to_uppercase());
    }
    if let Some(v) = f.rsrp_dbm {
        parts.push(format!("RSRP {v:.0} dBm"));
    }
    if let Some(v) = f.rsrq_db {
        parts.push(format!("RSRQ {v:.0} dB"));
    }
    if let Some(v) = f.sinr_db {
        parts.push(format!("SINR {v:.1} dB"));
    }
    if let Some(u) = &f.unlock_required {
        parts.push(format!("SIM needs {u}"));
    }
    parts.join(", ")
}

//! The CLI's control commands (`status`, `uplinks`, `classes`, `flows`, `events`,
//! `uplink disable|enable|prefer`, `reload`): one request to the control API each; human
//! tables by default, the API's versioned JSON document with `--json`; errors as JSON on
//! stderr with `--json`; a non-zero exit on any failure.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{json, Value};
use stallnet::control_client::{Client, ClientError};

#[derive(clap::Subcommand)]
pub enum Ctl {
    /// The daemon's state: online/degraded/offline, uplinks, classes, sales.
    Status {
        #[command(flatten)]
        at: At,
    },
    /// Each uplink: state, RTT, jitter, loss, rate, bytes.
    Uplinks {
        #[command(flatten)]
        at: At,
    },
    /// Each traffic class: packets, bytes, drops, queue delay.
    Classes {
        #[command(flatten)]
        at: At,
    },
    /// The busiest flows.
    Flows {
        #[command(flatten)]
        at: At,
    },
    /// The bitrate a live-stream encoder can use now (for scripts that set it).
    StreamAdvice {
        #[command(flatten)]
        at: At,
    },
    /// Recent events; `--follow` keeps printing new ones.
    Events {
        #[command(flatten)]
        at: At,
        #[arg(long, short)]
        follow: bool,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Switch an uplink off or on, or prefer it (until a restart).
    Uplink {
        #[command(flatten)]
        at: At,
        #[command(subcommand)]
        action: UplinkAction,
    },
    /// Re-read the config file: class settings apply at once; says what needs a restart.
    Reload {
        #[command(flatten)]
        at: At,
    },
    /// On the hub: every stall, offline and degraded first: its uplinks, when it was last
    /// heard, where its LAN appears on the hub.
    Stalls {
        #[command(flatten)]
        at: At,
    },
    /// On the hub: invite a new stall (prints a one-time code for `stallnet enroll`), or
    /// revoke one (its connections close at once).
    Hub {
        #[command(flatten)]
        at: At,
        #[command(subcommand)]
        action: HubAction,
    },
}

#[derive(clap::Subcommand)]
pub enum HubAction {
    /// Print a one-time code for a new device NAME; `stallnet enroll CODE` on the box
    /// uses it (good once, until it expires).
    Invite {
        name: String,
        /// The box's LAN prefixes (IPv4; repeatable). Default: the image's 10.1.0.0/24.
        #[arg(long)]
        lan: Vec<ipnet::Ipv4Net>,
        /// How long the code is good for: 30m, 24h, 7d (1 minute to 30 days).
        #[arg(long, default_value = "24h")]
        expires: String,
        /// Where boxes reach the hub (IPv4:port; repeatable). Default: `hub.listen`
        /// when it is a specific address.
        #[arg(long)]
        address: Vec<std::net::SocketAddrV4>,
    },
    /// Take an enrolled device (or a pending invite) out at once.
    Revoke { name: String },
}

/// Seconds in `30m`, `24h`, `7d` or plain seconds.
fn duration_s(s: &str) -> Option<u64> {
    let (n, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(s.trim().len()),
    );
    let n: u64 = n.parse().ok()?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Which daemon to talk to.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct At {
    /// The daemon's config: its control socket is found from the config's `runtime_dir`,
    /// as `stallnet run --config` puts it (instead of `--runtime-dir`).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
}

impl Ctl {
    /// Where this command's daemon is.
    pub fn at(&self) -> &At {
        match self {
            Ctl::Status { at }
            | Ctl::Uplinks { at }
            | Ctl::Classes { at }
            | Ctl::Flows { at }
            | Ctl::StreamAdvice { at }
            | Ctl::Reload { at }
            | Ctl::Events { at, .. }
            | Ctl::Hub { at, .. }
            | Ctl::Stalls { at }
            | Ctl::Uplink { at, .. } => at,
        }
    }
}

#[derive(clap::Subcommand)]
pub enum UplinkAction {
    Disable {
        name: String,
    },
    Enable {
        name: String,
    },
    /// Carry traffic on NAME; the others only when it cannot. `--clear` undoes it.
    Prefer {
        #[arg(required_unless_present = "clear")]
        name: Option<String>,
        #[arg(long)]
        clear: bool,
    },
    /// Let one LAN device (the operator's phone) reach NAME's captive portal directly for
    /// a while, to sign in; the uplink is checked again meanwhile and afterwards.
    Login {
        name: String,
        /// The device's LAN address (the phone's IPv4 on the stall's network).
        #[arg(long)]
        device: std::net::Ipv4Addr,
        /// How long the device may go straight out (1–30).
        #[arg(long, default_value_t = 5)]
        minutes: u64,
    },
}

pub fn run(cmd: Ctl, runtime_dir: PathBuf, json_out: bool) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = Client::new(&runtime_dir);
    let result = rt.block_on(async {
        match cmd {
            Ctl::Events {
                follow: true,
                since,
                ..
            } => {
                let path = format!("/v1/events/stream?since={since}");
                client
                    .follow(&path, |ev| {
                        if json_out {
                            println!("{ev}");
                        } else {
                            println!("{}", event_line(&ev));
                        }
                        true
                    })
                    .await?;
                Ok(None)
            }
            Ctl::Events { since, .. } => client
                .get(&format!("/v1/events?since={since}"))
                .await
                .map(Some),
            Ctl::Status { .. } => client.get("/v1/status").await.map(Some),
            Ctl::Uplinks { .. } => client.get("/v1/uplinks").await.map(Some),
            Ctl::Classes { .. } => client.get("/v1/classes").await.map(Some),
            Ctl::Flows { .. } => client.get("/v1/flows").await.map(Some),
            Ctl::StreamAdvice { .. } => client.get("/v1/stream").await.map(Some),
            Ctl::Stalls { .. } => client.get("/v1/stalls").await.map(Some),
            Ctl::Reload { .. } => client
                .request(hyper::Method::POST, "/v1/reload")
                .await
                .map(Some),
            Ctl::Hub { action, .. } => {
                let path = match &action {
                    HubAction::Invite {
                        name,
                        lan,
                        expires,
                        address,
                    } => {
                        let Some(valid_s) = duration_s(expires) else {
                            return Err(ClientError::Usage(format!(
                                "--expires: expected a duration like 30m, 24h or 7d, got {expires:?}"
                            )));
                        };
                        let join = |v: Vec<String>| v.join(",");
                        let mut p = format!("/v1/devices/{name}/invite?valid_s={valid_s}");
                        if !lan.is_empty() {
                            p.push_str(&format!("&lan={}", join(lan.iter().map(ToString::to_string).collect())));
                        }
                        if !address.is_empty() {
                            p.push_str(&format!("&address={}", join(address.iter().map(ToString::to_string).collect())));
                        }
                        p
                    }
                    HubAction::Revoke { name } => format!("/v1/devices/{name}/revoke"),
                };
                client.request(hyper::Method::POST, &path).await.map(Some)
            }
            Ctl::Uplink { action, .. } => {
                let (method, path) = match &action {
                    UplinkAction::Disable { name } => {
                        (hyper::Method::POST, format!("/v1/uplinks/{name}/disable"))
                    }
                    UplinkAction::Enable { name } => {
                        (hyper::Method::POST, format!("/v1/uplinks/{name}/enable"))
                    }
                    UplinkAction::Prefer { clear: true, .. } => {
                        (hyper::Method::DELETE, "/v1/uplinks/preference".to_string())
                    }
                    UplinkAction::Login {
                        name,
                        device,
                        minutes,
                    } => (
                        hyper::Method::POST,
                        format!("/v1/uplinks/{name}/login?device={device}&minutes={minutes}"),
                    ),
                    UplinkAction::Prefer { name, .. } => (
                        hyper::Method::POST,
                        format!("/v1/uplinks/{}/prefer", name.as_deref().unwrap_or("")),
                    ),
                };
                client.request(method, &path).await.map(Some)
            }
        }
        .map(|doc| (doc, ()))
    });
    match result {
        Ok((None, ())) => Ok(ExitCode::SUCCESS),
        Ok((Some(doc), ())) => {
            if json_out {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print_human(&doc);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            report(&e, json_out);
            Ok(ExitCode::FAILURE)
        }
    }
}

fn report(e: &ClientError, json_out: bool) {
    if json_out {
        eprintln!(
            "{}",
            json!({ "version": 1, "error": { "code": e.code(), "message": e.to_string() } })
        );
    } else {
        eprintln!("stallnet: {e}");
    }
}

/// Human form of any control document.
fn print_human(doc: &Value) {
    if doc.get("state").is_some() && doc.get("bonds").is_some() {
        print!("{}", stallnet::status::human(doc));
    } else if let Some(links) = doc.get("uplinks") {
        print!("{}", uplinks_table(links));
    } else if let Some(classes) = doc.get("classes") {
        print!("{}", classes_table(classes));
    } else if let Some(stalls) = doc.get("stalls") {
        print!("{}", stalls_table(stalls));
    } else if let Some(flows) = doc.get("flows") {
        print!("{}", flows_table(flows));
    } else if let Some(a) = doc.get("advice") {
        match a["uplink"].as_str() {
            Some(u) => println!(
                "stream: up to {:.1} Mbit/s now (on {u}; {})",
                a["bitrate_bps"].as_f64().unwrap_or(0.0) / 1e6,
                a["basis"].as_str().unwrap_or("")
            ),
            None => println!("stream: nothing can carry it now"),
        }
    } else if let Some(events) = doc["events"].as_array() {
        for e in events {
            println!("{}", event_line(e));
        }
    } else if let Some(m) = doc["message"].as_str() {
        println!("{m}");
    } else {
        println!("{doc}");
    }
}

/// Per device on the hub, or the edge's own list.
fn per_device(v: &Value) -> Vec<(Option<&str>, &Value)> {
    match v {
        Value::Object(m) => m.iter().map(|(k, v)| (Some(k.as_str()), v)).collect(),
        other => vec![(None, other)],
    }
}

/// The fleet view in plain words, one stall a line (fits 80 columns).
fn stalls_table(v: &Value) -> String {
    let mut out = format!(
        "{:<14} {:<9} {:>5} {:<11} {}\n",
        "STALL", "STATE", "SALES", "LAST HEARD", "UPLINKS"
    );
    for s in v.as_array().into_iter().flatten() {
        let heard = match (s["state"].as_str(), s["last_heard_s"].as_u64()) {
            (Some("offline"), Some(secs)) => format!("{secs} s ago"),
            (Some("offline"), None) => "never".into(),
            _ => "now".into(),
        };
        let links: Vec<String> = s["uplinks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                format!(
                    "{} {}",
                    l["name"].as_str().unwrap_or("?"),
                    l["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        out.push_str(&format!(
            "{:<14} {:<9} {:>5} {:<11} {}\n",
            s["name"].as_str().unwrap_or("?"),
            s["state"].as_str().unwrap_or("?"),
            s["sales_waiting"]
                .as_u64()
                .map_or("-".to_string(), |n| n.to_string()),
            heard,
            if links.is_empty() {
                "none".to_string()
            } else {
                links.join(", ")
            },
        ));
    }
    out
}

fn uplinks_table(v: &Value) -> String {
    let mut out = String::new();
    for (device, links) in per_device(v) {
        if let Some(d) = device {
            out.push_str(&format!("{d}:\n"));
        }
        out.push_str(&format!(
            "{:<10} {:<9} {:<9} {:>8} {:>8} {:>6} {:>9} {:>11} {:>11}\n",
            "UPLINK", "KIND", "STATE", "RTT", "JITTER", "LOSS", "RATE", "SENT", "RECEIVED"
        ));
        for l in links.as_array().into_iter().flatten() {
            let state = match (l["state"].as_str(), l["degraded"].as_bool()) {
                (Some("up"), Some(true)) => "degraded",
                (Some(s), _) => s,
                _ => "?",
            };
            out.push_str(&format!(
                "{:<10} {:<9} {:<9} {:>8} {:>8} {:>5.1}% {:>9} {:>11} {:>11}{}\n",
                l["name"].as_str().unwrap_or("?"),
                l["kind"].as_str().unwrap_or("-"),
                state,
                l["rtt_ms"]
                    .as_f64()
                    .map_or("-".into(), |r| format!("{r:.1}ms")),
                format!("{:.1}ms", l["jitter_ms"].as_f64().unwrap_or(0.0)),
                l["loss"].as_f64().unwrap_or(0.0) * 100.0,
                format!("{:.1}Mb/s", l["rate_mbps"].as_f64().unwrap_or(0.0)),
                bytes(l["tx_bytes"].as_u64().unwrap_or(0)),
                bytes(l["rx_bytes"].as_u64().unwrap_or(0)),
                match (
                    l["cap"]["used_bytes"].as_u64(),
                    l["cap"]["limit_bytes"].as_u64()
                ) {
                    (Some(u), Some(lim)) => format!("  {} of {} used", bytes(u), bytes(lim)),
                    _ => String::new(),
                } + &reach_note(l)
                    + if l["preferred"].as_bool() == Some(true) {
                        "  (preferred)"
                    } else if l["backup"].as_bool() == Some(true) {
                        "  (backup)"
                    } else {
                        ""
                    }
            ));
        }
        out.push_str(&modem_lines(links));
    }
    out
}

/// What the reachability checks say of an uplink, when it matters to the operator.
fn reach_note(l: &Value) -> String {
    let r = &l["reachability"];
    let name = l["name"].as_str().unwrap_or("?");
    match (r["portal"].as_str(), r["https"].as_str()) {
        (Some("captive"), _) => match r["login"]["device"].as_str() {
            Some(d) => format!("  (login page: {d} may sign in)"),
            None => format!("  (login page: stallnet uplink login {name} --device IP)"),
        },
        (Some("dns-hijacked"), _) => "  (DNS answers forged)".into(),
        (_, Some("failing")) if l["carries_pos"] == false => "  (no POS: HTTPS fails)".into(),
        _ => String::new(),
    }
}

/// One line per cellular uplink with what its modem says.
fn modem_lines(links: &Value) -> String {
    let mut out = String::new();
    for l in links.as_array().into_iter().flatten() {
        let Ok(f) = serde_json::from_value::<stallnet::modem::ModemFacts>(l["modem"].clone())
        else {
            continue;
        };
        out.push_str(&format!(
            "  {}: {}\n",
            l["name"].as_str().unwrap_or("?"),
            stallnet::modem::describe(&f)
        ));
    }
    out
}

fn classes_table(v: &Value) -> String {
    let mut out = String::new();
    for (device, classes) in per_device(v) {
        if let Some(d) = device {
            out.push_str(&format!("{d}:\n"));
        }
        out.push_str(&format!(
            "{:<12} {:>10} {:>11} {:>8} {:>9} {:>9}\n",
            "CLASS", "PACKETS", "BYTES", "DROPPED", "DELAY50", "DELAY99"
        ));
        for c in classes.as_array().into_iter().flatten() {
            let ms = |k: &str| c[k].as_f64().map_or("-".into(), |v| format!("{v:.1}ms"));
            out.push_str(&format!(
                "{:<12} {:>10} {:>11} {:>8} {:>9} {:>9}\n",
                c["class"].as_str().unwrap_or("?"),
                c["packets"].as_u64().unwrap_or(0),
                bytes(c["bytes"].as_u64().unwrap_or(0)),
                c["dropped_full"].as_u64().unwrap_or(0)
                    + c["dropped_codel"].as_u64().unwrap_or(0)
                    + c["dropped_sojourn"].as_u64().unwrap_or(0),
                ms("delay_p50_ms"),
                ms("delay_p99_ms"),
            ));
        }
    }
    out
}

fn flows_table(v: &Value) -> String {
    let mut out = String::new();
    for (device, flows) in per_device(v) {
        if let Some(d) = device {
            out.push_str(&format!("{d}:\n"));
        }
        out.push_str(&format!(
            "{:<12} {:>11} {:>8} {:<10} FLOW\n",
            "CLASS", "BYTES", "AGE", "UPLINK"
        ));
        for f in flows.as_array().into_iter().flatten() {
            out.push_str(&format!(
                "{:<12} {:>11} {:>7.0}s {:<10} {}\n",
                f["class"].as_str().unwrap_or("?"),
                bytes(f["bytes"].as_u64().unwrap_or(0)),
                f["age_s"].as_f64().unwrap_or(0.0),
                f["uplink"].as_str().unwrap_or("-"),
                f["flow"].as_str().unwrap_or("?"),
            ));
        }
    }
    out
}

fn event_line(e: &Value) -> String {
    let at = e["at_ms"].as_i64().unwrap_or(0) / 1000;
    let (h, m, s) = ((at / 3600) % 24, (at / 60) % 60, at % 60);
    format!(
        "#{:<5} {h:02}:{m:02}:{s:02} UTC {:<8} {}",
        e["seq"].as_u64().unwrap_or(0),
        e["level"].as_str().unwrap_or("?"),
        e["message"].as_str().unwrap_or("")
    )
}

/// Bytes for people: 1.2 MB.
pub fn bytes(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.1} GB", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1} MB", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1} kB", f / 1e3)
    } else {
        format!("{n} B")
    }
}

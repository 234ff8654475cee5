//! End-to-end: the control API and the CLI against a real edge and hub in the netns
//! topology: versioned JSON documents, uplink disable/enable/prefer with traffic still
//! flowing, events (also followed live), reload, and clear errors.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use stallnet_tests::topo::{
    any_link, bin, hub_tx, wait_for, Options, Topology, UplinkSpec, LAN_CLIENT,
};

fn cli(t: &Topology, role: &str, args: &[&str]) -> Result<std::process::Output> {
    let dir = t.dir.join(format!("{role}-run"));
    Ok(Command::new(bin("stallnet"))
        .args(args)
        .arg("--runtime-dir")
        .arg(dir)
        .output()?)
}

/// Checks `doc` against `docs/schemas/<schema>.schema.json` (what scripts rely on).
fn conforms(doc: &serde_json::Value, schema: &str) -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/schemas")
        .join(format!("{schema}.schema.json"));
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let v = jsonschema::validator_for(&s).map_err(|e| anyhow::anyhow!("{schema}: {e}"))?;
    let errors: Vec<String> = v
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    anyhow::ensure!(errors.is_empty(), "{schema}: {errors:#?}\n{doc}");
    Ok(())
}

/// Runs `stallnet ARGS --json`; the document must match the command's schema.
fn json(t: &Topology, role: &str, args: &[&str]) -> Result<serde_json::Value> {
    let mut a = args.to_vec();
    a.push("--json");
    let out = cli(t, role, &a)?;
    anyhow::ensure!(
        out.status.success(),
        "stallnet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let schema = match args[0] {
        "uplink" | "reload" => "action",
        other => other,
    };
    conforms(&doc, schema)?;
    Ok(doc)
}

/// Runs a command that must fail; its stderr is a JSON error document.
fn json_err(t: &Topology, role: &str, args: &[&str]) -> Result<serde_json::Value> {
    let mut a = args.to_vec();
    a.push("--json");
    let out = cli(t, role, &a)?;
    anyhow::ensure!(!out.status.success(), "stallnet {args:?} should fail");
    anyhow::ensure!(out.stdout.is_empty(), "nothing on stdout on failure");
    let doc: serde_json::Value = serde_json::from_slice(&out.stderr)?;
    conforms(&doc, "error")?;
    Ok(doc)
}

fn state_of(doc: &serde_json::Value, name: &str) -> String {
    doc["uplinks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["name"] == name)
        .and_then(|l| l["state"].as_str())
        .unwrap_or("")
        .to_string()
}

#[test]
fn the_cli_reads_and_steers_a_running_edge() -> Result<()> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options {
            edge_extra: Some("\n[metrics]\nlisten = \"10.1.0.1:9108\"\n".into()),
            ..Options::default()
        },
    )?;
    t.start()?;
    t.start_echo(7001)?;

    // The schemas do refuse what scripts could not rely on.
    assert!(conforms(
        &serde_json::json!({ "version": 2, "role": "edge" }),
        "uplinks"
    )
    .is_err());
    // Documents are versioned and carry what the dashboard needs.
    let up = json(&t, "edge", &["uplinks"])?;
    assert_eq!(up["version"], 1);
    assert_eq!(up["role"], "edge");
    let links = up["uplinks"].as_array().context("uplinks")?;
    assert_eq!(links.len(), 2);
    for l in links {
        for k in [
            "name",
            "kind",
            "state",
            "rtt_ms",
            "jitter_ms",
            "loss",
            "tx_bytes",
            "rx_bytes",
        ] {
            assert!(l.get(k).is_some(), "uplink without {k}: {l}");
        }
    }
    assert_eq!(links[0]["kind"], "wifi");
    let classes = json(&t, "edge", &["classes"])?;
    assert_eq!(classes["classes"].as_array().map(Vec::len), Some(5));
    let status = json(&t, "edge", &["status"])?;
    assert_eq!(status["state"], "online");
    json(&t, "edge", &["flows"])?;
    // Encoder advice: a bitrate and the uplink it rides.
    let advice = json(&t, "edge", &["stream-advice"])?;
    assert!(
        advice["advice"]["bitrate_bps"].as_u64().unwrap_or(0) > 0,
        "{advice}"
    );
    assert!(advice["advice"]["uplink"].is_string(), "{advice}");
    let events = json(&t, "edge", &["events"])?;
    assert!(
        events["events"].as_array().is_some_and(|e| !e.is_empty()),
        "{events}"
    );
    let human = cli(&t, "edge", &["uplinks"])?;
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("UPLINK") && text.contains("wifi") && text.contains("cell"),
        "{text}"
    );

    // Follow events live while the operator disables wifi.
    let mut follower = Command::new(bin("stallnet"))
        .args(["events", "--follow", "--json", "--runtime-dir"])
        .arg(t.dir.join("edge-run"))
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = follower.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // Some LAN traffic through the tunnel for the byte counters below.
    let warm = t.udp_flow(LAN_CLIENT, 7001, 100, 0.5)?;
    assert_eq!(warm["lost"], 0, "{warm}");
    std::thread::sleep(std::time::Duration::from_millis(600));
    // Prometheus scrapes the same facts from the LAN.
    let advice = json(&t, "edge", &["stream-advice"])?;
    assert_eq!(
        advice["advice"]["uplink"], "cell",
        "with wifi off: {advice}"
    );
    let m = scrape(&t)?;
    assert!(
        m.contains_key("stallnet_stream_advice_bits_per_second"),
        "{m:?}"
    );
    assert_eq!(
        m.get(r#"stallnet_uplink_up{device="local",uplink="wifi",kind="wifi"}"#),
        Some(&1.0)
    );
    assert_eq!(m.get("stallnet_tunnel_online"), Some(&1.0));
    let sent: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("stallnet_uplink_sent_bytes_total{"))
        .map(|(_, v)| v)
        .sum();
    assert!(sent > 0.0, "{m:?}");
    assert!(
        m.keys()
            .any(|k| k.starts_with("stallnet_class_queue_delay_seconds{")),
        "{m:?}"
    );

    let msg = json(&t, "edge", &["uplink", "disable", "wifi"])?;
    assert_eq!(msg["ok"], true, "{msg}");
    wait_for(Duration::from_secs(3), || {
        Ok(state_of(&json(&t, "edge", &["uplinks"])?, "wifi") == "disabled")
    })?;
    // Traffic goes on over cell, and a disabled uplink does not make the box "degraded".
    let flow = t.udp_flow(LAN_CLIENT, 7001, 100, 2.0)?;
    assert_eq!(flow["lost"], 0, "{flow}");
    let s = t.wait_status("edge", Duration::from_secs(3), |s| s["state"] == "online")?;
    let wifi_tx = |s: &serde_json::Value| s["bonds"]["hub"]["links"][0]["tx_packets"].as_u64();
    let before = wifi_tx(&s);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        wifi_tx(&t.status("edge")?),
        before,
        "a disabled uplink carries nothing"
    );

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut kinds = Vec::new();
    while Instant::now() < deadline && !kinds.iter().any(|k| k == "uplink_disabled") {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let ev: serde_json::Value = serde_json::from_str(&line)?;
            conforms(&ev, "event")?;
            kinds.push(ev["kind"].as_str().unwrap_or("").to_string());
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(
        kinds.iter().any(|k| k == "started"),
        "backlog first: {kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "uplink_disabled"), "{kinds:?}");

    let m = scrape(&t)?;
    assert_eq!(
        m.get(r#"stallnet_uplink_up{device="local",uplink="wifi",kind="wifi"}"#),
        Some(&0.0)
    );
    assert_eq!(
        m.get(r#"stallnet_uplink_state{device="local",uplink="wifi",state="disabled"}"#),
        Some(&1.0)
    );

    json(&t, "edge", &["uplink", "enable", "wifi"])?;
    wait_for(Duration::from_secs(10), || {
        Ok(state_of(&json(&t, "edge", &["uplinks"])?, "wifi") == "up")
    })?;

    // Prefer cell: wifi becomes a backup until the preference is cleared — both ways:
    // the hub hears it on the running connection and sends the replies down cell too.
    let pid = t.pid("edge");
    json(&t, "edge", &["uplink", "prefer", "cell"])?;
    wait_for(Duration::from_secs(2), || {
        let up = json(&t, "edge", &["uplinks"])?;
        Ok(up["uplinks"][0]["backup"] == true && up["uplinks"][1]["preferred"] == true)
    })?;
    t.wait_status("hub", Duration::from_secs(3), |s| {
        any_link(s, "wifi")["backup"] == true && any_link(s, "cell")["backup"] == false
    })
    .with_context(|| {
        format!(
            "the hub heard the preference; hub log:\n{}\nedge log:\n{}",
            t.log("hub"),
            t.log("edge")
        )
    })?;
    let (down_wifi, down_cell) = (hub_tx(&t, "wifi")?, hub_tx(&t, "cell")?);
    let flow = t.udp_flow(LAN_CLIENT, 7001, 100, 2.0)?;
    assert_eq!(flow["lost"], 0, "{flow}");
    let (wifi_after, cell_after) = (hub_tx(&t, "wifi")?, hub_tx(&t, "cell")?);
    eprintln!(
        "figure: replies with cell preferred: {} down wifi (backup), {} down cell",
        wifi_after - down_wifi,
        cell_after - down_cell
    );
    assert!(
        wifi_after - down_wifi < 10 && cell_after - down_cell >= 190,
        "replies avoid the backup: {} down wifi, {} down cell",
        wifi_after - down_wifi,
        cell_after - down_cell
    );
    json(&t, "edge", &["uplink", "prefer", "--clear"])?;
    wait_for(Duration::from_secs(2), || {
        let up = json(&t, "edge", &["uplinks"])?;
        Ok(up["uplinks"][0]["backup"] == false && up["uplinks"][1]["preferred"] == false)
    })?;
    t.wait_status("hub", Duration::from_secs(3), |s| {
        any_link(s, "wifi")["backup"] == false
    })
    .context("the hub heard the preference cleared")?;
    assert_eq!(t.pid("edge"), pid, "no restart");

    // Mistakes get clear errors and a failure exit.
    let err = json_err(&t, "edge", &["uplink", "disable", "lte"])?;
    assert_eq!(err["error"]["code"], "unknown_uplink");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("wifi, cell"),
        "{err}"
    );
    let err = json_err(&t, "hub", &["uplink", "disable", "wifi"])?;
    assert_eq!(err["error"]["code"], "not_on_hub");

    // Reload: a valid file applies; a broken one is refused with its position.
    let r = json(&t, "edge", &["reload"])?;
    assert!(
        r["message"].as_str().unwrap_or("").contains("is valid"),
        "{r}"
    );
    let cfg = t.dir.join("edge.toml");
    let good = std::fs::read_to_string(&cfg)?;
    std::fs::write(&cfg, format!("{good}\nbogus = 1\n"))?;
    let err = json_err(&t, "edge", &["reload"]);
    std::fs::write(&cfg, good)?;
    let err = err?;
    assert_eq!(err["error"]["code"], "invalid_config");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("edge.toml:"),
        "{err}"
    );

    // The hub answers too, per device.
    let hub = json(&t, "hub", &["uplinks"])?;
    assert_eq!(hub["role"], "hub");
    assert!(hub["uplinks"]["stall"].is_array(), "{hub}");
    Ok(())
}

/// Scrapes the edge's metrics from the LAN and parses the exposition: every sample line
/// is `name{labels} value`, every family has `# TYPE`; returns sample → value.
fn scrape(t: &Topology) -> Result<std::collections::HashMap<String, f64>> {
    let out = t.exec(
        "lan",
        &[
            "curl",
            "-sS",
            "--max-time",
            "3",
            "http://10.1.0.1:9108/metrics",
        ],
    )?;
    let text = String::from_utf8(out.stdout)?;
    let mut samples = std::collections::HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap_or("").to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, value) = line.rsplit_once(' ').context("sample without value")?;
        let v: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        let family = name.split('{').next().unwrap_or("");
        let base = ["_total", "_info"]
            .iter()
            .find_map(|s| family.strip_suffix(s))
            .unwrap_or(family);
        anyhow::ensure!(
            typed.contains(family) || typed.contains(base),
            "{family} has no # TYPE"
        );
        samples.insert(name.to_string(), v);
    }
    anyhow::ensure!(
        text.trim_end().ends_with("# EOF"),
        "exposition not terminated"
    );
    Ok(samples)
}

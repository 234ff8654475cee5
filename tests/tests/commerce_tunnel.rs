//! End-to-end: the edge's commerce service in the netns topology. Sales made while every
//! uplink is black-holed wait on the box; when an uplink returns they reach a real HTTP
//! upstream in the internet namespace through the bonded tunnel (they arrive from the
//! hub's address), each exactly once, also while one uplink is dead.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_tests::topo::{
    bin, post_outbox, wait_for, Options, Topology, UplinkSpec, HUB_ADDR, SERVER,
};

const KEY: &str = "till-e2e-key-0123456789abcdef";
const API: &str = "10.1.0.1:8080";

fn post_sale(t: &Topology, key: &str) -> Result<()> {
    let code = post_sale_as(t, KEY, key)?;
    anyhow::ensure!(code.starts_with('2'), "POST {key}: HTTP {code}");
    Ok(())
}

/// Posts a sale with bearer key `bearer`; the HTTP status.
fn post_sale_as(t: &Topology, bearer: &str, key: &str) -> Result<String> {
    let body = format!(r#"{{"group":"sales","body":{{"sale":"{key}"}}}}"#);
    post_outbox(&t.ns("lan"), API, bearer, key, &body)
}

/// What the upstream received: the till's key (the last part of the upstream key,
/// DEVICE:CLIENT:KIND:KEY) → the source addresses it came from.
fn received(log: &std::path::Path) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            let key = v["key"].as_str().unwrap_or("");
            m.entry(key.rsplit(':').next().unwrap_or("").to_string())
                .or_default()
                .push(v["peer"].as_str().unwrap_or("").to_string());
        }
    }
    m
}

/// What `stallnet VERB` prints in `role`'s namespace, over that daemon's control socket.
fn ctl(t: &Topology, role: &str, verb: &str) -> Result<String> {
    let run = t.dir.join(format!("{role}-run"));
    let out = t.exec(
        role,
        &[
            bin("stallnet").to_str().context("path")?,
            verb,
            "--runtime-dir",
            run.to_str().context("path")?,
        ],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// What `stallnet status` prints for the edge.
fn status_text(t: &Topology) -> Result<String> {
    ctl(t, "edge", "status")
}

#[test]
fn offline_sales_reach_the_upstream_through_the_tunnel_exactly_once() -> Result<()> {
    let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, KEY.as_bytes()));
    let extra = format!(
        "\n[commerce]\nlisten = \"{API}\"\nclients = [{{ name = \"till\", key_sha256 = \"{hash}\" }}]\n\
         [commerce.upstream]\nurl = \"http://{SERVER}:8090/sales\"\ntimeout_ms = 3000\n"
    );
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options {
            edge_extra: Some(extra),
            ..Options::default()
        },
    )?;
    let log = t.dir.join("upstream.jsonl");
    t.start()?;
    // The organiser's fleet view hears the box: nothing waiting.
    t.wait_status("hub", Duration::from_secs(10), |s| {
        s["stalls"][0]["state"] == "online" && s["stalls"][0]["sales_waiting"] == 0
    })?;

    // Every uplink silently dead: sales are taken and wait on the box.
    t.isp_blackhole(1, true)?;
    t.isp_blackhole(2, true)?;
    t.wait_status("edge", Duration::from_secs(10), |s| s["state"] == "offline")?;
    let offline: Vec<String> = (0..20).map(|i| format!("offline-{i:02}")).collect();
    // The API answers as soon as its address exists (the daemon retries the bind).
    wait_for(Duration::from_secs(10), || {
        Ok(post_sale(&t, "probe").is_ok())
    })
    .or_else(|_| post_sale(&t, "probe"))?;
    for k in &offline {
        post_sale(&t, k)?;
    }
    let s = t.wait_status("edge", Duration::from_secs(5), |s| {
        s["commerce"]["undelivered"] == 21
    })?;
    assert_eq!(s["commerce"]["online"], false, "{s}");
    assert!(received(&log).is_empty(), "nothing may leave while offline");

    // The cellular uplink returns while the upstream is not up yet: the hub's fleet view
    // says what waits on the box.
    t.isp_blackhole(2, false)?;
    let s = t.wait_status("hub", Duration::from_secs(15), |s| {
        s["stalls"][0]["sales_waiting"] == 21 && s["stalls"][0]["state"] == "degraded"
    })?;
    let row = &s["stalls"][0];
    assert!(row["oldest_waiting_s"].as_u64().is_some(), "{s}");
    let table = ctl(&t, "hub", "stalls")?;
    assert!(
        table
            .lines()
            .any(|l| l.contains("degraded") && l.contains(" 21 ")),
        "{table}"
    );
    // The upstream comes up: everything is delivered, through the tunnel, and the fleet
    // view sees the box empty.
    t.start_http_sink(8090, &log)?;
    wait_for(Duration::from_secs(30), || Ok(received(&log).len() >= 21))?;
    t.wait_status("hub", Duration::from_secs(5), |s| {
        s["stalls"][0]["sales_waiting"] == 0
    })?;
    // Then wifi returns and dies again while more sales are made.
    t.isp_blackhole(1, false)?;
    let online: Vec<String> = (0..20).map(|i| format!("online-{i:02}")).collect();
    for (i, k) in online.iter().enumerate() {
        if i == 5 {
            t.isp_blackhole(1, true)?;
        }
        post_sale(&t, k)?;
    }
    wait_for(Duration::from_secs(30), || Ok(received(&log).len() >= 41))?;
    let s = t.wait_status("edge", Duration::from_secs(5), |s| {
        s["commerce"]["undelivered"] == 0
    })?;
    assert_eq!(s["commerce"]["dead_letters"], 0, "{s}");

    let got = received(&log);
    for k in offline.iter().chain(&online) {
        let peers = got.get(k).with_context(|| format!("{k} never arrived"))?;
        assert_eq!(peers.len(), 1, "{k} delivered {} times", peers.len());
        // Masqueraded by the hub: the delivery crossed the tunnel, not an ISP directly.
        assert_eq!(peers[0], HUB_ADDR, "{k} came from {}", peers[0]);
    }
    // `stallnet status` says it in words, too.
    let text = status_text(&t)?;
    assert!(text.contains("sales: 0 waiting to upload"), "{text}");

    // A till replaced without a restart: the new key works, the old one is refused.
    const KEY2: &str = "till-2-e2e-key-fedcba9876543210";
    let hash2 = hex::encode(ring::digest::digest(&ring::digest::SHA256, KEY2.as_bytes()));
    let live = t.dir.join("edge.toml");
    let pid = t.pid("edge");
    let cfg = std::fs::read_to_string(&live)?.replace(
        &format!("clients = [{{ name = \"till\", key_sha256 = \"{hash}\" }}]"),
        &format!("clients = [{{ name = \"till-2\", key_sha256 = \"{hash2}\" }}]"),
    );
    anyhow::ensure!(cfg.contains(&hash2), "config rewritten");
    std::fs::write(&live, cfg)?;
    assert_eq!(post_sale_as(&t, KEY2, "new-till-before")?, "401");
    let text = ctl(&t, "edge", "reload")?;
    assert!(!text.contains("need a restart"), "{text}");
    assert_eq!(post_sale_as(&t, KEY2, "new-till-after")?, "202");
    assert_eq!(post_sale_as(&t, KEY, "old-till-after")?, "401");
    assert_eq!(t.pid("edge"), pid, "no restart");
    Ok(())
}

/// The edge's state directory on a real tmpfs mounted for the test; unmounted when the
/// test ends (before the topology removes its directory), also on failure.
struct StateOnTmpfs(std::path::PathBuf);

impl StateOnTmpfs {
    /// Moves `dir`'s files (the keys) onto a fresh tmpfs of `size` mounted there.
    fn mount(dir: &std::path::Path, size: &str) -> Result<Self> {
        let aside = dir.with_extension("aside");
        std::fs::rename(dir, &aside)?;
        std::fs::create_dir_all(dir)?;
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()?;
        anyhow::ensure!(st.success(), "mount tmpfs on {}", dir.display());
        let guard = Self(dir.to_path_buf());
        for e in std::fs::read_dir(&aside)? {
            let e = e?;
            std::fs::copy(e.path(), dir.join(e.file_name()))?;
        }
        std::fs::remove_dir_all(&aside)?;
        Ok(guard)
    }

    fn resize(&self, size: &str) -> Result<()> {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()?;
        anyhow::ensure!(st.success(), "remount {}", self.0.display());
        Ok(())
    }
}

impl Drop for StateOnTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Loss (%) of `n` pings from the LAN through the tunnel to the internet server.
fn tunnel_loss(t: &Topology, n: u32) -> Result<f64> {
    let out = t.exec(
        "lan",
        &[
            "ping",
            "-c",
            &n.to_string(),
            "-i",
            "0.1",
            "-W",
            "1",
            "-q",
            SERVER,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let loss = text
        .split(',')
        .find_map(|p| p.trim().strip_suffix("% packet loss"))
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("ping said: {text}"))?;
    Ok(loss)
}

/// The SD card fills with sales while the box runs: the API refuses with 507
/// storage_full, the status and `stallnet status` (over the control socket) say
/// STORAGE FULL, the tunnel carries the LAN's traffic as before; when space returns the
/// same daemon takes sales again by itself.
#[test]
fn a_full_sd_card_refuses_sales_but_never_the_tunnel_and_recovers_without_a_restart() -> Result<()>
{
    let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, KEY.as_bytes()));
    let extra = format!(
        "\n[commerce]\nlisten = \"{API}\"\nclients = [{{ name = \"till\", key_sha256 = \"{hash}\" }}]\n"
    );
    let mut t = Topology::build(
        vec![UplinkSpec::wifi()],
        Options {
            edge_extra: Some(extra),
            ..Options::default()
        },
    )?;
    let state = StateOnTmpfs::mount(&t.dir.join("edge-state"), "16m")?;
    t.start()?;
    wait_for(Duration::from_secs(10), || {
        Ok(post_sale(&t, "probe").is_ok())
    })?;
    let before = tunnel_loss(&t, 20)?;
    let pid = t.pid("edge");
    // 48 KB events until the card is full.
    let pad = "x".repeat(48 * 1024);
    let mut n = 0;
    let code = loop {
        let body = format!(r#"{{"group":"g{n}","body":{{"pad":"{pad}"}}}}"#);
        let code = post_outbox(&t.ns("lan"), API, KEY, &format!("fill-{n}"), &body)?;
        if code != "202" {
            break code;
        }
        n += 1;
        anyhow::ensure!(n < 1000, "a 16 MB card never filled");
    };
    eprintln!("{n} events of 48 KB taken, then HTTP {code}");
    assert_eq!(code, "507");
    let s = t.wait_status("edge", Duration::from_secs(5), |s| {
        s["commerce"]["storage"]["ok"] == false
    })?;
    assert_eq!(s["state"], "online", "{s}");
    let text = status_text(&t)?;
    assert!(text.contains("STORAGE FULL"), "{text}");
    let during = tunnel_loss(&t, 20)?;
    eprintln!("tunnel loss before {before}%, with the card full {during}%");
    assert!(
        during <= 5.0,
        "the tunnel lost {during}% with the card full"
    );
    // Space returns: sales are taken again, by the same daemon.
    state.resize("64m")?;
    wait_for(Duration::from_secs(10), || {
        Ok(post_sale(&t, "after-space").is_ok())
    })?;
    t.wait_status("edge", Duration::from_secs(5), |s| {
        s["commerce"]["storage"]["ok"] == true
    })?;
    assert_eq!(t.pid("edge"), pid, "no restart");
    t.stop("edge");
    drop(state);
    Ok(())
}

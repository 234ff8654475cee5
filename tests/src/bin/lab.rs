//! `stallnet-lab`: the lab. Builds the two-uplink topology (wifi 20 Mbit/s, cell
//! 10 Mbit/s), starts hub and edge with the whole product: a POS-like and a stream-like
//! traffic source (the stream in the `stream` class by a rule on its port), the commerce
//! API with a till that makes a sale every few seconds, and an HTTP upstream in the
//! internet namespace that records what it receives. It opens the dashboard, or prints
//! the edge's state and the sales every second until interrupted. Faults are injected
//! from another shell with `tests/lab.sh fault …` (see README): black-holing both uplinks
//! shows sales piling up on the box, and an uplink's return drains them, each once.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use stallnet_tests::topo::{link_state, Options, Topology, UplinkSpec, SERVER};

/// The lab till's API key (its SHA-256 is in the edge's config).
const TILL_KEY: &str = "lab-till-key-not-a-secret";
const API: &str = "10.1.0.1:8080";
/// The stream-like flow's port: a rule puts it in the `stream` class.
const STREAM_PORT: u16 = 7002;
/// Seconds between the till's sales.
const SALE_EVERY: Duration = Duration::from_secs(3);

fn main() -> Result<()> {
    let hash = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        TILL_KEY.as_bytes(),
    ));
    let extra = format!(
        "\n# The lab's stream-like flow: RTMP/SRT/WebRTC ports are `stream` by the built-in\n\
         # rules; this one is made `stream` by a rule on its port.\n\
         [[edge.rules]]\nclass = \"stream\"\nproto = [\"udp\"]\ndst_port = [{STREAM_PORT}]\n\
         \n[commerce]\nlisten = \"{API}\"\nclients = [{{ name = \"till\", key_sha256 = \"{hash}\" }}]\n\
         [commerce.upstream]\nurl = \"http://{SERVER}:8090/sales\"\ntimeout_ms = 3000\n"
    );
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options {
            edge_extra: Some(extra),
            ..Options::default()
        },
    )?;
    let sink_log = t.dir.join("upstream.jsonl");
    t.start_http_sink(8090, &sink_log)?;
    std::fs::write(
        "/tmp/stallnet-lab.env",
        format!("PREFIX={}\nDIR={}\n", t.prefix, t.dir.display()),
    )?;
    println!(
        "lab namespaces: {}-*; logs and control sockets in {}",
        t.prefix,
        t.dir.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let _ = ctrlc_flag(s);
    t.start_hub()?;
    t.start_edge()?;
    t.start_echo(7001)?;
    t.start_echo(STREAM_PORT)?;
    let traffic = stallnet_tests::topo::bin("stallnet-traffic");
    let traffic = traffic.to_string_lossy().to_string();
    // POS-like: 10 small exchanges a second; stream-like: 4 Mbit/s of 1000-byte datagrams.
    t.spawn(
        "pos",
        "lan",
        &[
            &traffic,
            "udp-flow",
            "198.18.0.1:7001",
            "10.1.0.10:0",
            "10",
            "86400",
        ],
    )?;
    t.spawn(
        "stream",
        "lan",
        &[
            &traffic,
            "udp-flow",
            &format!("{SERVER}:{STREAM_PORT}"),
            "10.1.0.2:0",
            "500",
            "86400",
        ],
    )?;
    // The till: a sale every few seconds, online or not (offline, the box keeps it).
    let till_ns = t.ns("lan");
    let till_stop = stop.clone();
    std::thread::spawn(move || till(&till_ns, &till_stop));
    // On a terminal the lab opens the dashboard; quitting it (q) ends the lab.
    let dashboard = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && !std::env::args().any(|a| a == "--no-dashboard");
    if dashboard {
        let status = std::process::Command::new(stallnet_tests::topo::bin("stallnet-tui"))
            .arg("--runtime-dir")
            .arg(t.dir.join("edge-run"))
            .status();
        if let Err(e) = status {
            eprintln!("dashboard: {e}");
        }
        return Ok(());
    }
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        match t.status("edge") {
            Ok(s) => {
                let links: Vec<String> = t
                    .uplinks
                    .iter()
                    .map(|u| format!("{}={}", u.name, link_state(&s, u.name)))
                    .collect();
                let delivered = std::fs::read_to_string(&sink_log)
                    .map(|l| l.lines().count())
                    .unwrap_or(0);
                println!(
                    "{} {}  sales: {} waiting on the box, {} delivered upstream",
                    s["state"].as_str().unwrap_or("?").to_uppercase(),
                    links.join(" "),
                    s["commerce"]["undelivered"],
                    delivered
                );
            }
            Err(e) => println!("waiting for the edge: {e}"),
        }
    }
    Ok(())
}

/// The lab's till: posts a sale to the commerce API from the LAN namespace every
/// [`SALE_EVERY`], each with its own idempotency key, until `stop`.
fn till(ns: &str, stop: &AtomicBool) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(SALE_EVERY);
        n += 1;
        let key = format!("lab-sale-{n:05}");
        let body = format!(r#"{{"group":"sales","body":{{"sale":"{key}","amount_cents":450}}}}"#);
        let _ = stallnet_tests::topo::post_outbox(ns, API, TILL_KEY, &key, &body);
    }
}

/// Sets `flag` on SIGINT/SIGTERM so the topology is torn down by Drop.
fn ctrlc_flag(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    });
    Ok(())
}

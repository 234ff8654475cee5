//! `stallnet-bench`: the benchmark runner. Builds the netns topology, measures, and prints
//! a Markdown table (and JSON with `--json`). Median of `--runs` runs (default 3).
//!
//! Benchmarks: `aggregation`, `blackhole`, `carrier`, `unshaped` (stallnet vs plain
//! routing vs wireguard-go), `rss`, `mptcp` (kernel MPTCP over the same emulated links,
//! beside stallnet, for aggregation and the black-hole stall of a TCP transfer), `failover`
//! (black hole and carrier loss of the faster uplink under 4 cubic flows with a UDP flow
//! and POS beside them, then the uplink restored; MPTCP in the same run; emulator and
//! kernel `tbf` links; `failover-down` the same with the 4 flows downloading). Run all,
//! or name
//! some: `stallnet-bench --runs 3 aggregation blackhole`. `dashboard`: the TUI's CPU over
//! 5 minutes (`STALLNET_TUI_SECS`), control API latency with 50 clients, the daemon's CPU
//! cost of a metrics scrape every second. Needs root. Build in release
//! first (`cargo build --release --workspace --bins`); the runner uses the binaries next to
//! itself.
use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_tests::topo::{
    bin, deep_links, Options, Topology, UplinkSpec, LAN_CLIENT, POS_CLIENT, SERVER,
};

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__commerce_rss") {
        // A fresh process for the RSS figure (see commerce_bench::rss_fresh).
        return commerce_bench::rss_child(args.get(1).context("DIR")?, args.get(2).is_some());
    }
    let json = take_flag(&mut args, "--json");
    let runs: usize = match args.iter().position(|a| a == "--runs") {
        Some(i) => {
            let v = args.get(i + 1).context("--runs N")?.parse()?;
            args.drain(i..=i + 1);
            v
        }
        None => 3,
    };
    if std::env::var("STALLNET_BIN_DIR").is_err() {
        if let Some(dir) = std::env::current_exe()?.parent() {
            std::env::set_var("STALLNET_BIN_DIR", dir);
        }
    }
    let all = [
        "aggregation",
        "blackhole",
        "carrier",
        "unshaped",
        "rss",
        "mptcp",
        "classes",
        "variable",
        "commerce",
        "dashboard",
        "idle-backup",
        "flood",
        "idle",
        "failover",
        "failover-down",
        "scale",
    ];
    if let Some(unknown) = args.iter().find(|a| !all.contains(&a.as_str())) {
        anyhow::bail!("unknown benchmark {unknown}; known: {}", all.join(" "));
    }
    let chosen: Vec<&str> = if args.is_empty() {
        all.to_vec()
    } else {
        all.iter()
            .copied()
            .filter(|b| args.iter().any(|a| a == b))
            .collect()
    };
    peers_installed(&chosen)?;
    let mut rows: Vec<(String, f64, String, Vec<f64>)> = Vec::new();
    for b in chosen {
        for (name, unit, samples) in bench(b, runs)? {
            let m = median(&samples);
            eprintln!("{name}: median {m:.1} {unit} of {samples:?}");
            rows.push((name, m, unit.to_string(), samples));
        }
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(
                |(n, m, u, s)| serde_json::json!({"name": n, "median": m, "unit": u, "samples": s}),
            )
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("| benchmark | median | unit | runs |\n|---|---|---|---|");
        for (n, m, u, s) in rows {
            let s: Vec<String> = s.iter().map(|x| format!("{x:.1}")).collect();
            println!("| {n} | {m:.1} | {u} | {} |", s.join(", "));
        }
    }
    Ok(())
}

/// The peers measured beside stallnet, checked before the first run rather than
/// found missing minutes into one.
fn peers_installed(chosen: &[&str]) -> Result<()> {
    let needs = [
        (
            "mptcpize",
            &["aggregation", "mptcp", "failover", "failover-down"][..],
        ),
        ("wireguard-go", &["unshaped"][..]),
        ("wg", &["unshaped"][..]),
    ];
    let missing: Vec<&str> = needs
        .iter()
        .filter(|(_, used)| chosen.iter().any(|c| used.contains(c)))
        .filter(|(cmd, _)| {
            !std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        })
        .map(|(cmd, _)| {
            if *cmd == "wg" {
                "wireguard-tools"
            } else {
                *cmd
            }
        })
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "the benchmarks measure peers that are not installed: apt-get install --no-install-recommends {}",
            missing.join(" ")
        );
    }
    Ok(())
}

fn take_flag(args: &mut Vec<String>, f: &str) -> bool {
    let had = args.iter().any(|a| a == f);
    args.retain(|a| a != f);
    had
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

type Figures = Vec<(String, &'static str, Vec<f64>)>;

fn bench(name: &str, runs: usize) -> Result<Figures> {
    let mut acc: Vec<(String, &'static str, Vec<f64>)> = Vec::new();
    for _ in 0..runs {
        let figs = match name {
            "aggregation" => aggregation()?,
            "blackhole" => fault_gap(true)?,
            "carrier" => fault_gap(false)?,
            "unshaped" => unshaped()?,
            "rss" => rss()?,
            "mptcp" => mptcp()?,
            "classes" => classes()?,
            "variable" => variable()?,
            "commerce" => commerce_bench::run()?,
            "dashboard" => dashboard_bench::run()?,
            "idle-backup" => idle_backup()?,
            "flood" => flood()?,
            "idle" => idle()?,
            "failover" => failover(false)?,
            "failover-down" => failover(true)?,
            "scale" => scale()?,
            other => anyhow::bail!("unknown benchmark {other}"),
        };
        for (n, u, v) in figs {
            match acc.iter_mut().find(|a| a.0 == n) {
                Some(a) => a.2.push(v),
                None => acc.push((n, u, vec![v])),
            }
        }
    }
    Ok(acc)
}

/// One LAN device (a phone gone wrong) floods 64-byte UDP datagrams at 90 000 per second
/// on 10 000 flows, then on 40 000, while the till pays (10 POS packets/s) and a ping runs
/// from another device: POS RTT and loss, through stallnet (wifi + cellular) and through
/// plain routing over wifi alone, on the same machine in the same run.
fn flood() -> Result<Figures1> {
    let mut figs = Vec::new();
    for label in ["stallnet", "plain wifi"] {
        let mut t = if label == "stallnet" {
            let mut t = Topology::build(deep_links(), Options::default())?;
            t.start()?;
            t
        } else {
            let p = Topology::build(deep_links()[..1].to_vec(), Options::default())?;
            p.nft("edge", "table ip plain { chain post { type nat hook postrouting priority srcnat; oifname \"wan1\" masquerade; }\n}")?;
            p
        };
        t.start_echo(7001)?;
        // The flooding phone has an address of its own on the LAN.
        t.exec("lan", &["ip", "addr", "add", "10.1.0.30/24", "dev", "eth0"])?;
        std::thread::sleep(Duration::from_millis(300));
        let idle = t.udp_flow_sized(POS_CLIENT, 7001, 10, 8.0, 200)?;
        let g = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        figs.push((
            format!("{label}: POS RTT idle p99"),
            "ms",
            g(&idle, "rtt_p99_ms"),
        ));
        for flows in [10_000u32, 40_000] {
            let flooder = bin("stallnet-traffic");
            let f = flooder.to_str().context("path")?.to_string();
            let fl = flows.to_string();
            t.spawn(
                "flood",
                "lan",
                &[
                    &f,
                    "udp-flood",
                    SERVER,
                    "10.1.0.30:0",
                    "90000",
                    "24",
                    &fl,
                    "64",
                ],
            )?;
            std::thread::sleep(Duration::from_secs(3));
            let cpu0 = cpu_seconds(&[t.pid("edge")]);
            let pos = t.udp_flow_sized(POS_CLIENT, 7001, 10, 15.0, 200)?;
            let cpu = cpu_seconds(&[t.pid("edge")]) - cpu0;
            if let Ok(o) = t.exec("edge", &["ip", "-s", "-s", "link"]) {
                eprintln!(
                    "  edge CPU {:.0}% over the POS run\n{}",
                    cpu / 15.0 * 100.0,
                    String::from_utf8_lossy(&o.stdout)
                );
            }
            if let Ok(st) = t.status("edge") {
                eprintln!("  classes: {}", st["bonds"]["hub"]["classes"]);
            }
            let _ = t.wait_exit("flood", false, Duration::from_secs(15));
            let sent = t
                .log("flood")
                .lines()
                .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .map_or(f64::NAN, |v| g(&v, "pps"));
            t.stop("flood");
            eprintln!("  {label}, {flows} flows: the flooder sent {sent:.0}/s; POS {pos}");
            let k = flows / 1000;
            figs.push((
                format!("{label}: flood {k}k flows: flooder sent"),
                "pkt/s",
                sent,
            ));
            figs.push((
                format!("{label}: flood {k}k flows: POS RTT p50"),
                "ms",
                g(&pos, "rtt_p50_ms"),
            ));
            figs.push((
                format!("{label}: flood {k}k flows: POS RTT p99"),
                "ms",
                g(&pos, "rtt_p99_ms"),
            ));
            figs.push((
                format!("{label}: flood {k}k flows: POS lost"),
                "%",
                100.0 * g(&pos, "lost") / g(&pos, "sent"),
            ));
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    Ok(figs)
}

/// Idle POS, then POS, the stream and saturating bulk both ways together; returns the
/// figures with `label` in their names. `t` must have its echo servers (7001, 9000) and
/// iperf3 servers (5201, 5202) running.
/// `downloads`: 4 cubic flows each way; otherwise uploads only (issue 18's POS figure).
fn class_load(t: &mut Topology, label: &str, secs: u32, downloads: bool) -> Result<Figures1> {
    let idle = t.udp_flow_sized(POS_CLIENT, 7001, 10, 10.0, 600)?;
    t.start_iperf_load("up", LAN_CLIENT, 5201, false, secs + 6, 4)?;
    if downloads {
        t.start_iperf_load("down", LAN_CLIENT, 5202, true, secs + 6, 4)?;
    }
    std::thread::sleep(Duration::from_secs(4));
    // The emulator's queues from here (the kernel links' tbf has no such figure).
    let emulated = t.emu(1, "queue").is_ok();
    let _ = t.emu(2, "queue");
    let (pos, stream) = std::thread::scope(|s| {
        let tr = &*t;
        let stream =
            s.spawn(move || tr.udp_flow_sized(LAN_CLIENT, 9000, 500, f64::from(secs), 1000));
        let mid = s.spawn(move || {
            std::thread::sleep(Duration::from_secs(u64::from(secs) / 2));
            print_links(tr);
        });
        let pos = tr.udp_flow_sized(POS_CLIENT, 7001, 10, f64::from(secs), 600);
        let _ = mid.join();
        let stream = stream
            .join()
            .map_err(|_| anyhow::anyhow!("stream flow panicked"))?;
        anyhow::Ok((pos?, stream?))
    })?;
    let mut queues = Vec::new();
    if emulated {
        for (i, name) in [(1, "wifi"), (2, "cell")] {
            let Ok(q) = t.emu(i, "queue") else { continue };
            eprintln!("  {label}: emulator {name} queue: {q}");
            for (key, dir) in [("up_p99_ms", "up"), ("down_p99_ms", "down")] {
                let v = q
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(f64::NAN);
                queues.push((format!("{label}: {name} queue {dir} p99"), "ms", v));
            }
        }
    }
    // iperf3 prints its report when it ends.
    std::thread::sleep(Duration::from_secs(3));
    let goodput = |l: &str| -> f64 {
        let text = t.log(l);
        let start = text.find('{').unwrap_or(0);
        serde_json::from_str::<serde_json::Value>(&text[start..])
            .ok()
            .and_then(|j| j["end"]["sum_received"]["bits_per_second"].as_f64())
            .unwrap_or(f64::NAN)
            / 1e6
    };
    let up = goodput("up");
    let down = downloads.then(|| goodput("down"));
    t.stop("up");
    t.stop("down");
    let g = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let sent = g(&stream, "sent");
    Ok(vec![
        (
            format!("{label}: POS RTT idle p50"),
            "ms",
            g(&idle, "rtt_p50_ms"),
        ),
        (
            format!("{label}: POS RTT idle p99"),
            "ms",
            g(&idle, "rtt_p99_ms"),
        ),
        (
            format!("{label}: POS RTT loaded p50"),
            "ms",
            g(&pos, "rtt_p50_ms"),
        ),
        (
            format!("{label}: POS RTT loaded p99"),
            "ms",
            g(&pos, "rtt_p99_ms"),
        ),
        (format!("{label}: POS lost"), "packets", g(&pos, "lost")),
        (
            format!("{label}: stream delivered"),
            "%",
            100.0 * g(&stream, "received") / sent,
        ),
        (
            format!("{label}: stream jitter p99"),
            "ms",
            g(&stream, "jitter_p99_ms"),
        ),
        (format!("{label}: bulk goodput up"), "Mbit/s", up),
    ]
    .into_iter()
    .chain(down.map(|d| (format!("{label}: bulk goodput down"), "Mbit/s", d)))
    .chain(queues)
    .collect())
}

type Figures1 = Vec<(String, &'static str, f64)>;

/// Prints each uplink's figures from both ends' status (diagnostics on stderr).
fn print_links(t: &Topology) {
    for (role, bond) in [("edge", "hub"), ("hub", "stall")] {
        if let Ok(st) = t.status(role) {
            for l in st["bonds"][bond]["links"].as_array().into_iter().flatten() {
                eprintln!(
                    "  {role} {}: rtt {:.1} ms, capacity {:.1}, rate {:.1} Mbit/s, queue {:.1} ms, decreases {}, datagrams per send {:.2}, suspect {} (silent {})",
                    l["name"], l["rtt_ms"].as_f64().unwrap_or(0.0),
                    l["capacity_mbps"].as_f64().unwrap_or(0.0), l["rate_mbps"].as_f64().unwrap_or(0.0),
                    l["queue_delay_ms"].as_f64().unwrap_or(0.0), l["rate_decreases"],
                    l["tx_datagrams_per_send"].as_f64().unwrap_or(0.0), l["suspects"], l["silences"]
                );
            }
        }
    }
}

fn class_servers(t: &mut Topology) -> Result<()> {
    t.start_echo(7001)?;
    t.start_echo(9000)?;
    t.start_iperf_server(5201)?;
    t.start_iperf_server(5202)?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// POS, stream and bulk through stallnet over wifi + cellular (500 ms queues), and the
/// same load through plain routing over wifi alone (the bufferbloat baseline); then
/// issue 18's POS figure, 4 cubic uploads only; then both through stallnet on kernel
/// `tbf` links (no added delay).
fn classes() -> Result<Figures1> {
    let mut t = Topology::build(deep_links(), Options::default())?;
    t.start()?;
    class_servers(&mut t)?;
    let mut figs = class_load(&mut t, "stallnet", 20, true)?;
    // Capacity left for bulk: 30 Mbit/s of links less the 4 Mbit/s stream, per direction.
    let up = figs
        .iter()
        .find(|f| f.0.ends_with("goodput up"))
        .map_or(0.0, |f| f.2);
    let down = figs
        .iter()
        .find(|f| f.0.ends_with("goodput down"))
        .map_or(0.0, |f| f.2);
    figs.push((
        "stallnet: bulk goodput up of leftover".into(),
        "%",
        up / 26.0 * 100.0,
    ));
    figs.push((
        "stallnet: bulk goodput down of leftover".into(),
        "%",
        down / 26.0 * 100.0,
    ));
    figs.extend(class_load(&mut t, "stallnet, uploads only", 20, false)?);
    drop(t);
    let mut p = Topology::build(deep_links()[..1].to_vec(), Options::default())?;
    p.nft("edge", "table ip plain { chain post { type nat hook postrouting priority srcnat; oifname \"wan1\" masquerade; }\n}")?;
    class_servers(&mut p)?;
    figs.extend(class_load(&mut p, "plain wifi", 20, true)?);
    drop(p);
    let kernel = Options {
        kernel_links: true,
        ..Options::default()
    };
    let mut k = Topology::build(deep_links(), kernel)?;
    k.start()?;
    class_servers(&mut k)?;
    figs.extend(class_load(&mut k, "kernel tbf", 20, true)?);
    figs.extend(class_load(&mut k, "kernel tbf, uploads only", 20, false)?);
    Ok(figs)
}

/// The class load while the cellular capacity steps 10 → 3 → 10 Mbit/s every 20 s, on
/// the emulator's links and on kernel `tbf` links.
fn variable() -> Result<Figures1> {
    let mut figs = Vec::new();
    for (label, kernel_links) in [("variable", false), ("variable, kernel tbf", true)] {
        let opts = Options {
            kernel_links,
            ..Options::default()
        };
        let mut t = Topology::build(deep_links(), opts)?;
        t.start()?;
        class_servers(&mut t)?;
        figs.extend(std::thread::scope(|s| {
            let tr = &t;
            // Idle POS takes 10 s, the load starts then and POS is measured from 12 s to
            // 64 s: 10 Mbit/s until 24 s, 3 Mbit/s until 44 s, 10 Mbit/s again.
            let stepper = s.spawn(move || -> Result<()> {
                std::thread::sleep(Duration::from_secs(24));
                tr.set_uplink_rate(2, 3000)?;
                std::thread::sleep(Duration::from_secs(20));
                tr.set_uplink_rate(2, 10_000)?;
                Ok(())
            });
            let figs = variable_load(tr, label);
            stepper
                .join()
                .map_err(|_| anyhow::anyhow!("stepper panicked"))??;
            figs
        })?);
    }
    Ok(figs)
}

fn variable_load(t: &Topology, label: &str) -> Result<Figures1> {
    let idle = t.udp_flow_sized(POS_CLIENT, 7001, 10, 8.0, 600)?;
    let iperf = |reverse: bool| -> Result<()> {
        let mut args = vec![
            "iperf3",
            "-c",
            SERVER,
            "-p",
            if reverse { "5202" } else { "5201" },
            "-B",
            LAN_CLIENT,
            "-t",
            "58",
            "-P",
            "4",
            "-C",
            "cubic",
            "-J",
        ];
        if reverse {
            args.push("-R");
        }
        t.exec("lan", &args)?;
        Ok(())
    };
    std::thread::scope(|s| {
        let up = s.spawn(move || iperf(false));
        let down = s.spawn(move || iperf(true));
        std::thread::sleep(Duration::from_secs(2));
        let stream = s.spawn(move || t.udp_flow_sized(LAN_CLIENT, 9000, 500, 52.0, 1000));
        let pos = t.udp_flow_sized(POS_CLIENT, 7001, 10, 52.0, 600)?;
        let stream = stream.join().map_err(|_| anyhow::anyhow!("stream"))??;
        up.join().map_err(|_| anyhow::anyhow!("iperf"))??;
        down.join().map_err(|_| anyhow::anyhow!("iperf"))??;
        let g = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        Ok(vec![
            (
                format!("{label}: POS RTT idle p99"),
                "ms",
                g(&idle, "rtt_p99_ms"),
            ),
            (
                format!("{label}: POS RTT loaded p50"),
                "ms",
                g(&pos, "rtt_p50_ms"),
            ),
            (
                format!("{label}: POS RTT loaded p99"),
                "ms",
                g(&pos, "rtt_p99_ms"),
            ),
            (format!("{label}: POS lost"), "packets", g(&pos, "lost")),
            (
                format!("{label}: stream delivered"),
                "%",
                100.0 * g(&stream, "received") / g(&stream, "sent"),
            ),
            (
                format!("{label}: stream jitter p99"),
                "ms",
                g(&stream, "jitter_p99_ms"),
            ),
        ])
    })
}

mod commerce_bench {
    //! The commerce service in-process on loopback: durable checkouts through the HTTP API
    //! with 1 and 8 clients, the outbox drain after 10 000 offline sales, and RSS with
    //! 100 000 tokens and 10 000 carts stored.

    use std::collections::{HashMap, HashSet};
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::Result;
    use ring::signature::{Ed25519KeyPair, KeyPair};
    use stallnet::commerce::api::{self, Service};
    use stallnet::commerce::model::{Cart, StoredToken};
    use stallnet::commerce::store::{CommerceStore, Limits, SledStore};
    use stallnet::commerce::{seal, worker};

    const KEY: &str = "bench-client-key-0123456789";

    type Figs = Vec<(String, &'static str, f64)>;

    fn service(dir: &std::path::Path, online: Arc<AtomicBool>) -> Result<Arc<Service<SledStore>>> {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("keygen"))?;
        let key = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| anyhow::anyhow!("key"))?;
        let public_key = hex::encode(key.public_key().as_ref());
        Ok(Arc::new(Service {
            store: SledStore::open(&dir.join("commerce"), key)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            sealer: seal::Sealer::load_or_create(dir)?,
            access: std::sync::RwLock::new(stallnet::commerce::api::Access {
                clients: HashMap::from([(
                    hex::encode(ring::digest::digest(&ring::digest::SHA256, KEY.as_bytes())),
                    "till".to_string(),
                )]),
                deny_from: vec![],
                limits: Limits {
                    max_entries: u64::MAX,
                    max_bytes: u64::MAX,
                },
                alert_hours: vec![],
            }),
            max_body: 65536,
            public_key,
            online: Arc::new(move || online.load(Ordering::SeqCst)),
        }))
    }

    /// A fresh store in its own directory holding 10 000 offline sales (flushed), offline.
    async fn offline_sales(
        label: &str,
    ) -> Result<(std::path::PathBuf, Arc<AtomicBool>, Arc<Service<SledStore>>)> {
        let dir = std::env::temp_dir().join(format!("sn-bench-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let online = Arc::new(AtomicBool::new(false));
        let svc = service(&dir, online.clone())?;
        for i in 0..10_000 {
            svc.store
                .put_cart("till", cart(format!("d{i}")), None, svc.access().limits)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            svc.store
                .checkout("till", &format!("d{i}"), None, "cash", &format!("k{i}"), 0)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        svc.store
            .flush()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((dir, online, svc))
    }

    fn cart(id: String) -> Cart {
        Cart {
            id,
            version: 0,
            currency: "EUR".into(),
            items: vec![stallnet::commerce::model::LineItem {
                sku: "coffee".into(),
                name: String::new(),
                quantity: 1,
                unit_price: 100,
            }],
            total: 100,
            updated_at: 0,
        }
    }

    fn pct(v: &mut [f64], p: f64) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(((v.len().saturating_sub(1)) as f64 * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    }

    fn rss_mb() -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<f64>().ok())
                })
            })
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }

    /// Runs [`rss_child`] in new processes of this binary: one that stores the data, one
    /// that opens the stored data as a restarted daemon would; returns both figures.
    fn rss_fresh() -> Result<(f64, f64)> {
        let dir = std::env::temp_dir().join(format!("sn-bench-rss-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut figs = Vec::new();
        for reopen in [false, true] {
            let mut cmd = std::process::Command::new(std::env::current_exe()?);
            cmd.arg("__commerce_rss").arg(&dir);
            if reopen {
                cmd.arg("reopen");
            }
            let out = cmd.output()?;
            anyhow::ensure!(
                out.status.success(),
                "rss child: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            figs.push(String::from_utf8_lossy(&out.stdout).trim().parse::<f64>()?);
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok((figs[0], figs[1]))
    }

    /// Stores 100 000 sealed tokens and 10 000 carts, flushes, prints VmRSS (MB); with
    /// `reopen`, opens what is stored, reads a sample of it and prints VmRSS.
    pub fn rss_child(dir: &str, reopen: bool) -> Result<()> {
        let dir = std::path::Path::new(dir);
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        let svc = service(dir, Arc::new(AtomicBool::new(false)))?;
        if reopen {
            for i in (0..100_000).step_by(97) {
                svc.store
                    .get_token("till", &format!("t{i}"))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            for i in (0..10_000).step_by(13) {
                svc.store
                    .get_cart("till", &format!("r{i}"))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            println!("{:.1}", rss_mb());
            return Ok(());
        }
        for i in 0..100_000 {
            let sealed = svc
                .sealer
                .seal(format!("till/t{i}").as_bytes(), b"voucher-value-0123456789")?;
            let t = StoredToken {
                sealed,
                kind: "voucher".into(),
                scope: "stall".into(),
                expires_at: 4_000_000_000,
                redeemed_at: None,
            };
            svc.store
                .put_token("till", &format!("t{i}"), &t, svc.access().limits)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        for i in 0..10_000 {
            svc.store
                .put_cart("till", cart(format!("r{i}")), None, svc.access().limits)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        rt.block_on(svc.store.flush())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        println!("{:.1}", rss_mb());
        Ok(())
    }

    pub fn run() -> Result<Figs> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(async {
            let mut figs = Figs::new();
            for clients in [1usize, 8] {
                let dir = std::env::temp_dir()
                    .join(format!("sn-bench-co-{clients}-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir)?;
                let svc = service(&dir, Arc::new(AtomicBool::new(false)))?;
                let per = 2000 / clients;
                for c in 0..clients {
                    for i in 0..per {
                        svc.store
                            .put_cart("till", cart(format!("c{c}-{i}")), None, svc.access().limits)
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                    }
                }
                svc.store
                    .flush()
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = l.local_addr()?;
                let router = api::router(svc.clone());
                let server = tokio::spawn(async move {
                    axum::serve(
                        l,
                        router.into_make_service_with_connect_info::<SocketAddr>(),
                    )
                    .await
                });
                let http = reqwest::Client::new();
                let started = Instant::now();
                let mut joins = Vec::new();
                for c in 0..clients {
                    let http = http.clone();
                    joins.push(tokio::spawn(async move {
                        let mut lat = Vec::with_capacity(per);
                        for i in 0..per {
                            let t = Instant::now();
                            let r = http
                                .post(format!("http://{addr}/v1/carts/c{c}-{i}/checkout"))
                                .bearer_auth(KEY)
                                .body(r#"{"payment":"cash"}"#)
                                .send()
                                .await?;
                            anyhow::ensure!(r.status().as_u16() == 201, "checkout: {}", r.status());
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                        anyhow::Ok(lat)
                    }));
                }
                let mut lat = Vec::new();
                for j in joins {
                    lat.extend(j.await??);
                }
                let secs = started.elapsed().as_secs_f64();
                server.abort();
                figs.push((
                    format!("commerce: durable checkouts, {clients} client(s)"),
                    "per s",
                    lat.len() as f64 / secs,
                ));
                figs.push((
                    format!("commerce: checkout latency p50, {clients} client(s)"),
                    "ms",
                    pct(&mut lat, 0.5),
                ));
                figs.push((
                    format!("commerce: checkout latency p99, {clients} client(s)"),
                    "ms",
                    pct(&mut lat, 0.99),
                ));
                drop(svc);
                let _ = std::fs::remove_dir_all(&dir);
            }
            // Drain after 10 000 offline sales.
            let (dir, online, svc) = offline_sales("drain").await?;
            let seen: Arc<Mutex<Vec<String>>> = Arc::default();
            let s = seen.clone();
            let app = axum::Router::new().route(
                "/sales",
                axum::routing::post(move |h: axum::http::HeaderMap| {
                    let s = s.clone();
                    async move {
                        if let (Ok(mut v), Some(k)) = (
                            s.lock(),
                            h.get("idempotency-key").and_then(|v| v.to_str().ok()),
                        ) {
                            v.push(k.to_string());
                        }
                        axum::http::StatusCode::CREATED
                    }
                }),
            );
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            let up_server = tokio::spawn(async move { axum::serve(l, app).await });
            let cancel = tokio_util::sync::CancellationToken::new();
            let up = stallnet_netconf::Upstream {
                timeout_ms: 5000,
                ..stallnet_netconf::Upstream::new(format!("http://{addr}/sales"))
            };
            let w = tokio::spawn(worker::run(svc.clone(), up, cancel.clone()));
            let started = Instant::now();
            online.store(true, Ordering::SeqCst);
            while svc.store.outbox_len() > 0 && started.elapsed() < Duration::from_secs(120) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let secs = started.elapsed().as_secs_f64();
            cancel.cancel();
            let _ = w.await;
            up_server.abort();
            let keys = seen.lock().map(|v| v.clone()).unwrap_or_default();
            let unique: HashSet<&String> = keys.iter().collect();
            figs.push((
                "commerce: outbox drain, 10 000 sales".into(),
                "per s",
                unique.len() as f64 / secs,
            ));
            figs.push((
                "commerce: outbox drain, duplicate deliveries".into(),
                "records",
                (keys.len() - unique.len()) as f64,
            ));
            drop(svc);
            let _ = std::fs::remove_dir_all(&dir);

            // The same drain into NATS JetStream (a real nats-server on loopback).
            let (dir, online, svc) = offline_sales("nats").await?;
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let mut nats = std::process::Command::new("nats-server")
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
                .arg(dir.join("js"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| anyhow::anyhow!("nats-server (apt-get install nats-server): {e}"))?;
            let url = format!("nats://127.0.0.1:{port}");
            let mut client = None;
            for _ in 0..100 {
                if let Ok(c) = async_nats::connect(url.as_str()).await {
                    client = Some(c);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let js = async_nats::jetstream::new(
                client.ok_or_else(|| anyhow::anyhow!("nats-server did not start"))?,
            );
            let mut stream = js
                .get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: "SALES".into(),
                    subjects: vec!["sales.>".into()],
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("stream: {e}"))?;
            let cancel = tokio_util::sync::CancellationToken::new();
            let up = stallnet_netconf::Upstream {
                subject: Some("sales.bench.stall-1".into()),
                timeout_ms: 5000,
                ..stallnet_netconf::Upstream::new(url)
            };
            let w = tokio::spawn(worker::run(svc.clone(), up, cancel.clone()));
            let started = Instant::now();
            online.store(true, Ordering::SeqCst);
            while svc.store.outbox_len() > 0 && started.elapsed() < Duration::from_secs(120) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let secs = started.elapsed().as_secs_f64();
            cancel.cancel();
            let _ = w.await;
            let stored = stream
                .info()
                .await
                .map_err(|e| anyhow::anyhow!("stream info: {e}"))?
                .state
                .messages;
            let left = svc.store.outbox_len();
            let _ = nats.kill();
            let _ = nats.wait();
            figs.push((
                "commerce: outbox drain into NATS JetStream, 10 000 sales".into(),
                "per s",
                (10_000 - left) as f64 / secs,
            ));
            figs.push((
                "commerce: JetStream messages beyond one per sale".into(),
                "records",
                stored as f64 - (10_000 - left) as f64,
            ));
            drop(svc);
            let _ = std::fs::remove_dir_all(&dir);

            let (storing, stored) = rss_fresh()?;
            figs.push((
                "commerce: RSS, fresh process writing 100k tokens + 10k carts".into(),
                "MB",
                storing,
            ));
            figs.push((
                "commerce: RSS, fresh process opening them (a restarted daemon)".into(),
                "MB",
                stored,
            ));
            Ok(figs)
        })
    }
}

fn iperf(t: &mut Topology, reverse: bool, secs: u32, streams: u32) -> Result<f64> {
    // One iperf3 server per direction: a server still closing the previous test refuses
    // the next one (iperf3 serves one test at a time).
    let port: u16 = if reverse { 5302 } else { 5301 };
    let label = format!("iperf{port}");
    if t.pid(&label).is_none() {
        t.spawn(
            &label,
            "inet",
            &["iperf3", "-s", "-B", SERVER, "-p", &port.to_string()],
        )?;
        std::thread::sleep(Duration::from_millis(300));
    }
    let (secs, streams, port) = (secs.to_string(), streams.to_string(), port.to_string());
    let mut args = vec![
        "iperf3", "-c", SERVER, "-p", &port, "-t", &secs, "-P", &streams, "-C", "cubic", "-J",
        "-O", "1",
    ];
    if reverse {
        args.push("-R");
    }
    let out = t.exec("lan", &args)?;
    received_mbps(&out, &args)
}

/// What an `iperf3 -J` client's report says was received, Mbit/s.
fn received_mbps(out: &std::process::Output, args: &[&str]) -> Result<f64> {
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    match j["end"]["sum_received"]["bits_per_second"].as_f64() {
        Some(bps) => Ok(bps / 1e6),
        None => anyhow::bail!(
            "iperf3 {args:?} gave no result: {} {}",
            j["error"],
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// TCP goodput over 20 + 10 Mbit/s, 4 cubic flows each way, as % of 30, through stallnet
/// and through kernel MPTCP in the same run: on the emulator's links with 10 / 22.5 ms
/// one-way delay (the `aggregation upload / download goodput` series) and without, and on
/// kernel `tbf` links (50 ms queues, no added delay).
fn aggregation() -> Result<Vec<(String, &'static str, f64)>> {
    let mut out = Vec::new();
    for (links, kernel_links, delayed) in [
        ("emulator", false, true),
        ("emulator, no delay", false, false),
        ("kernel tbf", true, false),
    ] {
        let specs: Vec<UplinkSpec> = [UplinkSpec::wifi(), UplinkSpec::cell()]
            .into_iter()
            .map(|mut s| {
                if !delayed {
                    s.delay_ms = 0.0;
                }
                if kernel_links {
                    s.queue_ms = 50;
                }
                s
            })
            .collect();
        let opts = Options {
            kernel_links,
            ..Options::default()
        };
        let mut t = Topology::build(specs.clone(), opts.clone())?;
        t.start()?;
        let up = iperf(&mut t, false, 10, 4)?;
        let down = iperf(&mut t, true, 10, 4)?;
        drop(t);
        let m = mptcp_topology(specs, opts)?;
        let mp_up = mptcp_iperf(&m, false)?;
        let mp_down = mptcp_iperf(&m, true)?;
        drop(m);
        let pct = |mbps: f64| mbps / 30.0 * 100.0;
        let unit = "% of 30 Mbit/s";
        if links == "emulator" {
            // The series' names since issue 2.
            out.push(("aggregation upload goodput".into(), unit, pct(up)));
            out.push(("aggregation download goodput".into(), unit, pct(down)));
        } else {
            out.push((format!("aggregation, {links}: stallnet up"), unit, pct(up)));
            out.push((
                format!("aggregation, {links}: stallnet down"),
                unit,
                pct(down),
            ));
        }
        out.push((format!("aggregation, {links}: MPTCP up"), unit, pct(mp_up)));
        out.push((
            format!("aggregation, {links}: MPTCP down"),
            unit,
            pct(mp_down),
        ));
    }
    Ok(out)
}

/// 4 cubic flows for 10 s between the edge box and the server through kernel MPTCP
/// (`mptcp_topology`'s servers: 5201 uploads, 5202 downloads), Mbit/s received.
fn mptcp_iperf(m: &Topology, reverse: bool) -> Result<f64> {
    let mut args = vec![
        "mptcpize", "run", "iperf3", "-c", SERVER, "-p", "5201", "-t", "10", "-P", "4", "-C",
        "cubic", "-J", "-O", "1",
    ];
    if reverse {
        args[6] = "5202";
        args.push("-R");
    }
    let out = m.exec("edge", &args)?;
    received_mbps(&out, &args)
}

/// Longest gap in a 200 packet/s UDP flow and POS packets lost when the busiest uplink
/// (wifi) is black-holed (silently) or loses carrier mid-flow.
fn fault_gap(silent: bool) -> Result<Vec<(String, &'static str, f64)>> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options::default(),
    )?;
    t.start()?;
    t.start_echo(7001)?;
    t.start_echo(7002)?;
    let (pos, bulk) = std::thread::scope(|s| -> Result<_> {
        let tr = &t;
        let pos = s.spawn(move || tr.udp_flow(POS_CLIENT, 7001, 100, 6.0));
        let bulk = s.spawn(move || tr.udp_flow(LAN_CLIENT, 7002, 200, 6.0));
        std::thread::sleep(Duration::from_millis(2000));
        if silent {
            tr.isp_blackhole(1, true)?;
        } else {
            tr.carrier(1, false)?;
        }
        let pos = pos.join().map_err(|_| anyhow::anyhow!("pos flow"))??;
        let bulk = bulk.join().map_err(|_| anyhow::anyhow!("flow"))??;
        Ok((pos, bulk))
    })?;
    let kind = if silent {
        "silent black hole"
    } else {
        "carrier loss"
    };
    Ok(vec![
        (
            format!("{kind}: longest gap, 200 pkt/s flow"),
            "ms",
            bulk["max_gap_ms"].as_f64().unwrap_or(f64::NAN),
        ),
        (
            format!("{kind}: POS packets lost"),
            "packets",
            pos["lost"].as_f64().unwrap_or(f64::NAN),
        ),
        (
            format!("{kind}: 200 pkt/s flow, packets lost"),
            "packets",
            bulk["lost"].as_f64().unwrap_or(f64::NAN),
        ),
    ])
}

/// iperf3 (10 s, one flow and four) through a fresh stallnet with the default config over
/// two unshaped uplinks, beside plain routing and wireguard-go over the first one, on the
/// userspace emulator's links and on kernel (bridged) links; with the CPU both ends of
/// each tunnel used.
fn unshaped() -> Result<Vec<(String, &'static str, f64)>> {
    let fast = |name| UplinkSpec {
        name,
        kind: "ethernet",
        rate_kbit: 0,
        delay_ms: 0.0,
        queue_ms: 50,
    };
    let mut out = Vec::new();
    for (kind, kernel_links) in [("emulator", false), ("kernel", true)] {
        let opts = Options {
            kernel_links,
            ..Options::default()
        };
        for streams in [1, 4] {
            let mut t = Topology::build(vec![fast("wifi"), fast("eth")], opts.clone())?;
            t.start()?;
            let pids = [t.pid("edge"), t.pid("hub")];
            let cpu0 = cpu_seconds(&pids);
            let started = std::time::Instant::now();
            let mbps = iperf(&mut t, false, 10, streams)?;
            let cores = (cpu_seconds(&pids) - cpu0) / started.elapsed().as_secs_f64();
            eprintln!("  stallnet {kind} -P {streams}: {mbps:.0} Mbit/s at {cores:.2} cores");
            print_links(&t);
            out.push((
                format!("unshaped ({kind} links), -P {streams}: stallnet"),
                "Mbit/s",
                mbps,
            ));
            out.push((
                format!("unshaped ({kind} links), -P {streams}: stallnet per core (edge + hub)"),
                "Mbit/s per core",
                mbps / cores.max(1e-3),
            ));
        }
        for streams in [1, 4] {
            let mut p = Topology::build(vec![fast("wifi")], opts.clone())?;
            // Plain routing: the edge namespace forwards LAN traffic out of wan1 with NAT.
            p.nft("edge", "table ip plain { chain post { type nat hook postrouting priority srcnat; oifname \"wan1\" masquerade; }\n}")?;
            let mbps = iperf(&mut p, false, 10, streams)?;
            out.push((
                format!("unshaped ({kind} links), -P {streams}: plain routing"),
                "Mbit/s",
                mbps,
            ));
        }
        for streams in [1, 4] {
            let mut w = Topology::build(vec![fast("wifi")], opts.clone())?;
            wireguard(&mut w)?;
            let pids = [w.pid("wg-edge"), w.pid("wg-hub")];
            let cpu0 = cpu_seconds(&pids);
            let started = std::time::Instant::now();
            let mbps = iperf(&mut w, false, 10, streams)?;
            let cores = (cpu_seconds(&pids) - cpu0) / started.elapsed().as_secs_f64();
            eprintln!("  wireguard-go {kind} -P {streams}: {mbps:.0} Mbit/s at {cores:.2} cores");
            out.push((
                format!("unshaped ({kind} links), -P {streams}: wireguard-go"),
                "Mbit/s",
                mbps,
            ));
            out.push((
                format!("unshaped ({kind} links), -P {streams}: wireguard-go per core (both ends)"),
                "Mbit/s per core",
                mbps / cores.max(1e-3),
            ));
        }
    }
    Ok(out)
}

/// CPU of an idle edge with two uplinks up (default config, no traffic) and of its hub,
/// each as % of one core over 20 s after the links settled.
fn idle() -> Result<Vec<(String, &'static str, f64)>> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options::default(),
    )?;
    t.start()?;
    std::thread::sleep(Duration::from_secs(5));
    let (edge, hub) = ([t.pid("edge")], [t.pid("hub")]);
    let (e0, h0) = (cpu_seconds(&edge), cpu_seconds(&hub));
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let secs = started.elapsed().as_secs_f64();
    Ok(vec![
        (
            "idle, two uplinks up: edge CPU".into(),
            "% of a core",
            (cpu_seconds(&edge) - e0) / secs * 100.0,
        ),
        (
            "idle, two uplinks up: hub CPU (one stall)".into(),
            "% of a core",
            (cpu_seconds(&hub) - h0) / secs * 100.0,
        ),
    ])
}

/// The hub's cost per stall (`stallnet-load`: real identities, QUIC and sessions): CPU
/// and RSS with N idle stalls of two uplinks each (N from `STALLNET_SCALE_STALLS`,
/// default "1 100 300 500"), and with 1 and 20 stalls each sending 10 Mbit/s. The
/// topology's own edge is one more idle stall on the hub.
fn scale() -> Result<Vec<(String, &'static str, f64)>> {
    let counts: Vec<usize> = std::env::var("STALLNET_SCALE_STALLS")
        .unwrap_or_else(|_| "1 100 300 500".into())
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let mut out = Vec::new();
    let mut cases: Vec<(usize, usize)> = counts.iter().map(|&n| (n, 0)).collect();
    cases.extend([(1, 1), (20, 20)]);
    for (n, active) in cases {
        let (cpu, rss, mbps) = scale_once(n, active)?;
        if active == 0 {
            out.push((
                format!("scale: {n} idle stalls, hub CPU"),
                "% of a core",
                cpu,
            ));
            out.push((format!("scale: {n} idle stalls, hub RSS"), "MB", rss));
        } else {
            out.push((
                format!("scale: {active} stalls at 10 Mbit/s, hub CPU"),
                "% of a core",
                cpu,
            ));
            out.push((
                format!("scale: {active} stalls at 10 Mbit/s, delivered"),
                "Mbit/s",
                mbps,
            ));
            out.push((
                format!("scale: {active} stalls at 10 Mbit/s, hub CPU per Mbit/s"),
                "% of a core",
                cpu / mbps.max(0.001),
            ));
            out.push((
                format!("scale: {active} stalls at 10 Mbit/s, hub RSS"),
                "MB",
                rss,
            ));
        }
    }
    Ok(out)
}

/// One load run: (hub CPU % of a core, hub RSS MB, Mbit/s the hub delivered to its TUN).
fn scale_once(n: usize, active: usize) -> Result<(f64, f64, f64)> {
    let dir = std::env::temp_dir().join(format!("stallnet-scale-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let load = stallnet_tests::topo::bin("stallnet-load");
    let load = load.to_str().context("path")?.to_string();
    let d = dir.to_str().context("path")?.to_string();
    let st = std::process::Command::new(&load)
        .args(["prepare", &n.to_string(), &d])
        .status()?;
    anyhow::ensure!(st.success(), "stallnet-load prepare failed");
    let mut t = Topology::build(
        vec![UplinkSpec::wifi()],
        Options {
            hub_pool: Some("10.99.0.0/22"),
            hub_extra: Some(std::fs::read_to_string(dir.join("devices.toml"))?),
            ..Options::default()
        },
    )?;
    t.start()?;
    // Whatever reaches the internet's discard port is dropped there, counted.
    t.nft(
        "inet",
        "table inet scale { chain input { type filter hook input priority 0; udp dport 9 counter drop; }\n}",
    )?;
    let hub = [t.pid("hub")];
    let secs = 45.0;
    let hub_id = t.hub_id.clone();
    let (active_s, mbps) = (active.to_string(), if active > 0 { "10" } else { "0" });
    t.spawn(
        "load",
        "inet",
        &[
            &load,
            "run",
            &format!("{}:4433", stallnet_tests::topo::HUB_ADDR),
            &hub_id,
            &d,
            &n.to_string(),
            &secs.to_string(),
            &active_s,
            mbps,
        ],
    )?;
    // Every stall up (the topology's own edge too), then a settled window.
    t.wait_status("hub", Duration::from_secs(120), |s| {
        s["bonds"]
            .as_object()
            .map_or(0, |b| b.values().filter(|v| v["online"] == true).count())
            > n
    })
    .with_context(|| t.log("load"))?;
    std::thread::sleep(Duration::from_secs(5));
    let rx0 = hub_rx_bytes(&t)?;
    let c0 = cpu_seconds(&hub);
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(15));
    let secs = started.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(&hub) - c0) / secs * 100.0;
    let mbps = (hub_rx_bytes(&t)?.saturating_sub(rx0)) as f64 * 8.0 / secs / 1e6;
    let rss = match hub[0] {
        Some(p) => rss_mb(p)?,
        None => 0.0,
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok((cpu, rss, mbps))
}

/// Bytes the hub has received from every stall's uplinks.
fn hub_rx_bytes(t: &Topology) -> Result<u64> {
    let s = t.status("hub")?;
    Ok(s["bonds"]
        .as_object()
        .into_iter()
        .flat_map(|b| b.values())
        .flat_map(|b| b["links"].as_array().cloned().unwrap_or_default())
        .map(|l| l["rx_bytes"].as_u64().unwrap_or(0))
        .sum())
}

/// User + system CPU seconds consumed so far by these processes (and their threads).
fn cpu_seconds(pids: &[Option<u32>]) -> f64 {
    pids.iter()
        .flatten()
        .filter_map(|pid| stallnet_tests::topo::cpu_seconds(*pid))
        .sum()
}

/// A wireguard-go tunnel from the edge (over wan1) to the hub, carrying the LAN.
fn wireguard(t: &mut Topology) -> Result<()> {
    std::env::set_var("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
    let key = |name: &str| -> Result<String> {
        let out = std::process::Command::new("wg").arg("genkey").output()?;
        let k = String::from_utf8(out.stdout)?.trim().to_string();
        std::fs::write(t.dir.join(name), &k)?;
        let out = stallnet_tests::topo::run_with_input(
            std::process::Command::new("wg").arg("pubkey"),
            k.as_bytes(),
        )?;
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };
    let (edge_pub, hub_pub) = (key("wg-edge.key")?, key("wg-hub.key")?);
    let dir = t.dir.clone();
    // wireguard-go's control sockets live in /var/run/wireguard, shared by every
    // namespace: the names must differ.
    let (wh, we) = (format!("{}h", t.prefix), format!("{}e", t.prefix));
    t.spawn("wg-hub", "hub", &["wireguard-go", "-f", &wh])?;
    t.spawn("wg-edge", "edge", &["wireguard-go", "-f", &we])?;
    for (role, dev) in [("hub", &wh), ("edge", &we)] {
        stallnet_tests::topo::wait_for(Duration::from_secs(10), || {
            Ok(t.exec(role, &["ip", "link", "show", dev]).is_ok())
        })
        .with_context(|| {
            format!(
                "wireguard-go did not start in {role}: {}",
                t.log(&format!("wg-{role}"))
            )
        })?;
    }
    let hk = dir.join("wg-hub.key");
    let ek = dir.join("wg-edge.key");
    t.exec(
        "hub",
        &[
            "wg",
            "set",
            &wh,
            "private-key",
            hk.to_str().context("path")?,
            "listen-port",
            "51820",
            "peer",
            &edge_pub,
            "allowed-ips",
            "10.1.0.0/24,10.98.0.1/32",
        ],
    )?;
    t.exec("hub", &["ip", "addr", "add", "10.98.0.2/24", "dev", &wh])?;
    t.exec(
        "hub",
        &["ip", "link", "set", "dev", &wh, "mtu", "1420", "up"],
    )?;
    t.exec("hub", &["ip", "route", "add", "10.1.0.0/24", "dev", &wh])?;
    t.exec(
        "edge",
        &[
            "wg",
            "set",
            &we,
            "private-key",
            ek.to_str().context("path")?,
            "peer",
            &hub_pub,
            "endpoint",
            "172.31.0.2:51820",
            "allowed-ips",
            "0.0.0.0/0",
        ],
    )?;
    t.exec("edge", &["ip", "addr", "add", "10.98.0.1/24", "dev", &we])?;
    t.exec(
        "edge",
        &["ip", "link", "set", "dev", &we, "mtu", "1420", "up"],
    )?;
    t.exec(
        "edge",
        &["ip", "route", "add", "default", "dev", &we, "table", "300"],
    )?;
    t.exec(
        "edge",
        &["ip", "rule", "add", "from", "10.1.0.0/24", "lookup", "300"],
    )?;
    Ok(())
}

/// Bytes per 100 ms interval of an iperf3 JSON report, and the longest run of intervals
/// that carried nothing (the stall), in ms.
fn longest_stall_ms(report: &serde_json::Value) -> f64 {
    let mut longest = 0.0f64;
    let mut run = 0.0f64;
    for i in report["intervals"].as_array().into_iter().flatten() {
        let bytes = i["sum"]["bytes"].as_f64().unwrap_or(0.0);
        let secs = i["sum"]["seconds"].as_f64().unwrap_or(0.0);
        if bytes < 1500.0 {
            run += secs * 1000.0;
            longest = longest.max(run);
        } else {
            run = 0.0;
        }
    }
    longest
}

/// A 4-flow TCP upload with 100 ms intervals; wifi is black-holed after 3 s. The two
/// runs use the iperf3 servers on ports 5201 and 5202.
fn tcp_through_blackhole(t: &mut Topology, prefix: &[&str], role: &str) -> Result<(f64, f64)> {
    let agg = {
        let mut a: Vec<&str> = prefix.to_vec();
        a.extend([
            "iperf3", "-c", SERVER, "-p", "5201", "-t", "8", "-P", "4", "-C", "cubic", "-J", "-O",
            "1",
        ]);
        let out = t.exec(role, &a)?;
        let j: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        j["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6
    };
    let stall = std::thread::scope(|s| -> Result<f64> {
        let tr = &*t;
        let mut a: Vec<&str> = prefix.to_vec();
        a.extend([
            "iperf3", "-c", SERVER, "-p", "5202", "-t", "8", "-P", "4", "-C", "cubic", "-J", "-i",
            "0.1",
        ]);
        let h = s.spawn(move || tr.exec(role, &a));
        std::thread::sleep(Duration::from_secs(3));
        tr.isp_blackhole(1, true)?;
        let out = h.join().map_err(|_| anyhow::anyhow!("iperf"))??;
        let j: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(longest_stall_ms(&j))
    })?;
    Ok((agg, stall))
}

/// Kernel MPTCP (mptcpize + iperf3, run on the edge box itself with both uplinks as
/// subflows) beside stallnet, over the same emulated links.
fn mptcp() -> Result<Vec<(String, &'static str, f64)>> {
    let specs = vec![UplinkSpec::wifi(), UplinkSpec::cell()];
    let mut m = mptcp_topology(specs.clone(), Options::default())?;
    let (mp_agg, mp_stall) = tcp_through_blackhole(&mut m, &["mptcpize", "run"], "edge")?;
    drop(m);
    let mut s = Topology::build(specs, Options::default())?;
    s.start()?;
    s.start_iperf_server(5201)?;
    s.start_iperf_server(5202)?;
    std::thread::sleep(Duration::from_millis(300));
    let (sn_agg, sn_stall) = tcp_through_blackhole(&mut s, &[], "lan")?;
    Ok(vec![
        (
            "MPTCP: TCP upload goodput".into(),
            "% of 30 Mbit/s",
            mp_agg / 30.0 * 100.0,
        ),
        (
            "MPTCP: longest stall, wifi black-holed".into(),
            "ms",
            mp_stall,
        ),
        (
            "stallnet: TCP upload goodput (same run)".into(),
            "% of 30 Mbit/s",
            sn_agg / 30.0 * 100.0,
        ),
        (
            "stallnet: longest stall, wifi black-holed".into(),
            "ms",
            sn_stall,
        ),
    ])
}

/// The same links without stallnet: kernel MPTCP on the edge box with both uplinks as
/// subflows (source routing per uplink), iperf3 servers under `mptcpize` on ports 5201
/// and 5202.
fn mptcp_topology(specs: Vec<UplinkSpec>, opts: Options) -> Result<Topology> {
    let mut m = Topology::build(specs, opts)?;
    for role in ["edge", "inet"] {
        m.exec(role, &["sysctl", "-qw", "net.mptcp.enabled=1"])?;
        m.exec(
            role,
            &[
                "ip",
                "mptcp",
                "limits",
                "set",
                "subflow",
                "4",
                "add_addr_accepted",
                "4",
            ],
        )?;
    }
    m.exec(
        "edge",
        &[
            "ip",
            "mptcp",
            "endpoint",
            "add",
            "100.64.2.2",
            "dev",
            "wan2",
            "subflow",
        ],
    )?;
    for i in 1..=2 {
        let table = format!("{}", 300 + i);
        m.exec(
            "edge",
            &[
                "ip",
                "rule",
                "add",
                "from",
                &format!("100.64.{i}.2"),
                "lookup",
                &table,
            ],
        )?;
        m.exec(
            "edge",
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &format!("100.64.{i}.1"),
                "dev",
                &format!("wan{i}"),
                "table",
                &table,
            ],
        )?;
    }
    // One server per run: iperf3 reopens its listener between tests.
    for port in ["5201", "5202"] {
        m.spawn(
            &format!("iperf{port}"),
            "inet",
            &["mptcpize", "run", "iperf3", "-s", "-B", SERVER, "-p", port],
        )?;
    }
    std::thread::sleep(Duration::from_millis(500));
    Ok(m)
}

/// When the fault begins and ends, in seconds from the start of the TCP load.
const FAULT_AT: f64 = 4.0;
const RESTORE_AT: f64 = 6.5;
const LOAD_SECS: u32 = 10;

/// What a TCP load's 100 ms intervals say about a fault at [`FAULT_AT`] lifted at
/// [`RESTORE_AT`]: the longest stall (ms, from the raw 100 ms intervals); the time from
/// the fault until the end of the last 300 ms window before the restore that carried
/// under 80 % of what the flows carry on the surviving uplink alone (ms; 0 when none
/// did); and the time from the restore until the end of the first 300 ms window that
/// carried 85 % of what both uplinks carried before the fault (ms; NaN when none did
/// before the load ended).
fn fault_phases(report: &serde_json::Value) -> (f64, f64, f64) {
    let iv: Vec<(f64, f64)> = report["intervals"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["sum"]["start"].as_f64().unwrap_or(0.0),
                i["sum"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
            )
        })
        .collect();
    // The sender's 100 ms counts swing between 0 and twice the rate as socket buffers
    // fill and drain: means over 300 ms, each at the start of its first interval.
    let iv: Vec<(f64, f64)> = iv
        .windows(3)
        .map(|w| (w[0].0, w.iter().map(|x| x.1).sum::<f64>() / 3.0))
        .collect();
    let window = |from: f64, to: f64| -> Vec<f64> {
        iv.iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|x| x.1)
            .collect()
    };
    let before = median(&window(1.5, FAULT_AT - 0.1));
    let survivor = median(&window(FAULT_AT + 1.0, RESTORE_AT - 0.3));
    let back = iv
        .iter()
        .filter(|(t, r)| *t >= FAULT_AT - 0.25 && *t < RESTORE_AT - 0.3 && *r < survivor * 0.8)
        .map(|(t, _)| (t + 0.3 - FAULT_AT) * 1000.0)
        .fold(0.0, f64::max);
    let series: Vec<String> = iv.iter().map(|(_, r)| format!("{r:.0}")).collect();
    eprintln!(
        "Mbit/s, 300 ms means every 100 ms (fault at {FAULT_AT} s, restore at {RESTORE_AT} s): {}",
        series.join(" ")
    );
    let restored = iv
        .iter()
        .find(|(t, r)| *t >= RESTORE_AT && *r >= before * 0.85)
        .map_or(f64::NAN, |(t, _)| (t + 0.3 - RESTORE_AT) * 1000.0);
    (longest_stall_ms(report), back, restored)
}

/// Starts `iperf3 -P 4 -C cubic` (upload) from `role` through `prefix` to a one-off
/// server in the internet namespace (under the same `prefix`) that reports every 100 ms,
/// faults uplink 1 (wifi, the faster) at [`FAULT_AT`], lifts the fault at
/// [`RESTORE_AT`], and meanwhile runs `during` (started 2 s into the load). Returns the
/// receiver's report (what arrived when: the sender's counts only say when the socket
/// took the bytes) and what `during` gave.
fn under_fault<T: Send>(
    t: &Topology,
    prefix: &[&str],
    role: &str,
    silent: bool,
    download: bool,
    during: impl FnOnce() -> Result<T> + Send,
) -> Result<(serde_json::Value, T)> {
    let secs = LOAD_SECS.to_string();
    std::thread::scope(|s| {
        let mut srv: Vec<&str> = prefix.to_vec();
        srv.extend([
            "iperf3", "-s", "-1", "-B", SERVER, "-p", "5210", "-i", "0.1", "-J",
        ]);
        let server = s.spawn(move || t.exec("inet", &srv));
        std::thread::sleep(Duration::from_millis(500));
        let mut a: Vec<&str> = prefix.to_vec();
        a.extend([
            "iperf3", "-c", SERVER, "-p", "5210", "-t", &secs, "-P", "4", "-C", "cubic",
        ]);
        // Downloads: the server sends, and the receiver's 100 ms reports are the client's.
        if download {
            a.extend(["-R", "-i", "0.1", "-J"]);
        }
        let load = s.spawn(move || t.exec(role, &a));
        let start = std::time::Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let side = s.spawn(during);
        let at = |secs: f64| {
            let wait = Duration::from_secs_f64(secs).saturating_sub(start.elapsed());
            std::thread::sleep(wait);
        };
        let fault = |on: bool| {
            if silent {
                t.isp_blackhole(1, on)
            } else {
                t.carrier(1, !on)
            }
        };
        at(FAULT_AT);
        fault(true)?;
        at(RESTORE_AT);
        fault(false)?;
        let client = load.join().map_err(|_| anyhow::anyhow!("iperf3"))??;
        let server = server
            .join()
            .map_err(|_| anyhow::anyhow!("iperf3 server"))??;
        let out = if download { client } else { server };
        let side = side.join().map_err(|_| anyhow::anyhow!("side flows"))??;
        let j: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3: {}", String::from_utf8_lossy(&out.stderr)))?;
        Ok((j, side))
    })
}

/// Issue 18's failover figures: the faster uplink (wifi, 20 Mbit/s) black-holed or
/// losing carrier for 2.5 s while 4 cubic TCP uploads, a 200 packet/s UDP flow in the
/// default class and a POS flow run through stallnet; the same TCP load and fault through
/// kernel MPTCP in the same run. On the emulator's links and on kernel `tbf` links.
/// `download`: the 4 TCP flows run from the server to the LAN (the hub's side of the
/// bond schedules them; bench case `failover-down`).
fn failover(download: bool) -> Result<Vec<(String, &'static str, f64)>> {
    let mut out = Vec::new();
    let dir = if download { "down" } else { "up" };
    for (links, kernel_links) in [("emulator", false), ("kernel", true)] {
        let opts = Options {
            kernel_links,
            ..Options::default()
        };
        for silent in [true, false] {
            let kind = if silent { "black hole" } else { "carrier loss" };
            // `STALLNET_FAILOVER_ONLY="emulator black"`: one case, while investigating.
            if let Ok(only) = std::env::var("STALLNET_FAILOVER_ONLY") {
                if !format!("{links} {kind}").starts_with(&only) {
                    continue;
                }
            }
            let specs = vec![UplinkSpec::wifi(), UplinkSpec::cell()];
            let mut t = Topology::build(specs.clone(), opts.clone())?;
            t.start()?;
            t.start_echo(7001)?;
            t.start_echo(7002)?;
            t.start_iperf_server(5201)?;
            std::thread::sleep(Duration::from_millis(300));
            let tr = &t;
            let (report, (pos, udp)) = under_fault(tr, &[], "lan", silent, download, move || {
                std::thread::scope(|s| {
                    let pos = s.spawn(move || tr.udp_flow(POS_CLIENT, 7001, 100, 6.0));
                    let udp = tr.udp_flow(LAN_CLIENT, 7002, 200, 6.0)?;
                    let pos = pos.join().map_err(|_| anyhow::anyhow!("pos flow"))??;
                    Ok((pos, udp))
                })
            })?;
            // Where packets went: the queues' drops, resends, the receivers' reordering.
            for role in ["edge", "hub"] {
                if let Ok(st) = t.status(role) {
                    let Some(b) = st["bonds"].as_object().and_then(|m| m.values().next()) else {
                        continue;
                    };
                    eprintln!(
                        "{links} {kind} {role}: scheduler {} reorder {} classes {}",
                        b["scheduler"], b["reorder"], b["classes"]
                    );
                    for l in b["links"].as_array().into_iter().flatten() {
                        eprintln!(
                            "{links} {kind} {role}: link {} state {} degraded {} flaps {} \
                             capacity {} Mbit/s rate {} Mbit/s in flight {} B, tx {} packets, \
                             largest packet {}",
                            l["name"],
                            l["state"],
                            l["degraded"],
                            l["flaps"],
                            l["capacity_mbps"],
                            l["rate_mbps"],
                            l["in_flight_bytes"],
                            l["tx_packets"],
                            l["max_packet"]
                        );
                    }
                }
            }
            if !kernel_links {
                for i in 1..=2 {
                    eprintln!(
                        "{links} {kind}: emulator {i}: {}",
                        t.emu(i, "stats").unwrap_or_default()
                    );
                }
            }
            drop(t);
            eprintln!(
                "{links} {kind}: UDP lost, sent at (ms, fault at 2000): {}",
                udp["lost_ms"]
            );
            let (stall, back, restored) = fault_phases(&report);
            let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            let name = |what: &str| {
                if download {
                    format!("failover {dir}, {links}, {kind}: {what}")
                } else {
                    format!("failover, {links}, {kind}: {what}")
                }
            };
            out.extend([
                (name("UDP 200 pkt/s lost"), "packets", f(&udp, "lost")),
                (name("UDP longest gap"), "ms", f(&udp, "max_gap_ms")),
                (name("POS lost"), "packets", f(&pos, "lost")),
                (name("TCP longest stall"), "ms", stall),
                (name("TCP back to the surviving rate"), "ms", back),
                (
                    name("TCP back to the full rate after restore"),
                    "ms",
                    restored,
                ),
            ]);
            let m = mptcp_topology(specs, opts.clone())?;
            let (report, ()) = under_fault(
                &m,
                &["mptcpize", "run"],
                "edge",
                silent,
                download,
                || Ok(()),
            )?;
            drop(m);
            let (stall, back, restored) = fault_phases(&report);
            out.extend([
                (name("MPTCP TCP longest stall"), "ms", stall),
                (name("MPTCP TCP back to the surviving rate"), "ms", back),
                (
                    name("MPTCP TCP back to the full rate after restore"),
                    "ms",
                    restored,
                ),
            ]);
        }
    }
    Ok(out)
}

fn rss_mb(pid: u32) -> Result<f64> {
    let kb = stallnet_tests::topo::rss_kb(pid).context("VmRSS")?;
    Ok(kb as f64 / 1024.0)
}

/// rx + tx bytes of the edge's interface `dev`, as the kernel counts them.
fn iface_bytes(t: &Topology, dev: &str) -> Result<u64> {
    let mut total = 0;
    for f in ["rx_bytes", "tx_bytes"] {
        let p = format!("/sys/class/net/{dev}/statistics/{f}");
        let out = t.exec("edge", &["cat", &p])?;
        total += String::from_utf8(out.stdout)?.trim().parse::<u64>()?;
    }
    Ok(total)
}

/// What an idle backup uplink costs in bytes per hour (both directions, on the wire:
/// tunnel probes and keep-alives, reachability checks through it), with the reachability
/// checks on (against a check server on the test internet) and off; the idle primary
/// beside it for comparison. Measured over STALLNET_IDLE_SECS (default 120) after the
/// links settled.
fn idle_backup() -> Result<Vec<(String, &'static str, f64)>> {
    let secs: u64 = std::env::var("STALLNET_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let mut out = Vec::new();
    for checks in [true, false] {
        let ca_dir = std::env::temp_dir().join(format!("stallnet-idle-{}", std::process::id()));
        std::fs::create_dir_all(&ca_dir)?;
        let ca = ca_dir.join("ca.pem");
        let _ = std::fs::remove_file(&ca);
        let reach = if checks {
            format!(
                "{{ portal_url = \"http://check.stallnet.test/generate_204\", https_url = \
                 \"https://check.stallnet.test/\", dns = [\"{SERVER}\"], ca_file = \"{}\" }}",
                ca.display()
            )
        } else {
            "{ enabled = false }".into()
        };
        let mut t = Topology::build(
            vec![UplinkSpec::wifi(), UplinkSpec::cell()],
            Options {
                edge_extra: Some("priority = \"backup\"\n".into()),
                reachability: Some(reach),
                ..Options::default()
            },
        )?;
        t.start_dns(&[("check.stallnet.test", SERVER)])?;
        let traffic = bin("stallnet-traffic");
        let (traffic, dir) = (
            traffic.to_str().context("path")?,
            ca_dir.to_str().context("path")?,
        );
        t.spawn(
            "check",
            "inet",
            &[traffic, "check-server", SERVER, dir, "check.stallnet.test"],
        )?;
        stallnet_tests::topo::wait_for(Duration::from_secs(5), || Ok(ca.exists()))?;
        t.start()?;
        // Settle: the first checks, the backup's probes slowing down.
        std::thread::sleep(Duration::from_secs(15));
        let (b0, p0) = (iface_bytes(&t, "wan2")?, iface_bytes(&t, "wan1")?);
        std::thread::sleep(Duration::from_secs(secs));
        let (b1, p1) = (iface_bytes(&t, "wan2")?, iface_bytes(&t, "wan1")?);
        let per_hour = |d: u64| d as f64 * 3600.0 / secs as f64 / 1e6;
        let label = if checks { "checks on" } else { "checks off" };
        out.push((
            format!("idle backup uplink, {label}"),
            "MB/hour",
            per_hour(b1 - b0),
        ));
        out.push((
            format!("idle primary uplink, {label}"),
            "MB/hour",
            per_hour(p1 - p0),
        ));
        let _ = std::fs::remove_dir_all(&ca_dir);
    }
    Ok(out)
}

/// Edge resident memory idle and under 4-flow TCP load in both directions.
fn rss() -> Result<Vec<(String, &'static str, f64)>> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options::default(),
    )?;
    t.start()?;
    std::thread::sleep(Duration::from_secs(3));
    let pid = t.pid("edge").context("edge pid")?;
    let idle = rss_mb(pid)?;
    iperf(&mut t, false, 5, 4)?;
    let up = rss_mb(pid)?;
    iperf(&mut t, true, 5, 4)?;
    let load = up.max(rss_mb(pid)?);
    Ok(vec![
        ("edge RSS idle".into(), "MB", idle),
        ("edge RSS after load".into(), "MB", load),
    ])
}

/// The dashboard, the control API and the metrics endpoint, against a real edge.
mod dashboard_bench {
    use std::process::Command;
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result};
    use stallnet_tests::topo::{bin, Options, Topology, UplinkSpec};

    /// CPU seconds (user + system) a process has used so far.
    fn cpu_secs(pid: u32) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command (which may hold spaces) start after the last ')'.
        let rest = stat.rsplit_once(')').context("stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).context("utime")?.parse::<f64>()?
            + f.get(12).context("stime")?.parse::<f64>()?;
        let hz: f64 = String::from_utf8(Command::new("getconf").arg("CLK_TCK").output()?.stdout)?
            .trim()
            .parse()
            .unwrap_or(100.0);
        Ok(ticks / hz)
    }

    pub fn run() -> Result<Vec<(String, &'static str, f64)>> {
        let secs: u64 = std::env::var("STALLNET_TUI_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        let mut t = Topology::build(
            vec![UplinkSpec::wifi(), UplinkSpec::cell()],
            Options {
                edge_extra: Some("\n[metrics]\nlisten = \"10.1.0.1:9108\"\n".into()),
                ..Options::default()
            },
        )?;
        t.start()?;
        let edge = t.pid("edge").context("edge pid")?;
        let mut figs = Vec::new();

        // The TUI in a real terminal (tmux), refreshing twice a second.
        let sock = format!("{}-bench", t.prefix);
        let cmd = format!(
            "{} --runtime-dir {}",
            bin("stallnet-tui").display(),
            t.dir.join("edge-run").display()
        );
        let tmux = |args: &[&str]| Command::new("tmux").args(["-L", &sock]).args(args).output();
        tmux(&[
            "new-session",
            "-d",
            "-s",
            "b",
            "-x",
            "100",
            "-y",
            "30",
            &cmd,
        ])?;
        std::thread::sleep(Duration::from_secs(3));
        let pane =
            String::from_utf8(tmux(&["list-panes", "-t", "b", "-F", "#{pane_pid}"])?.stdout)?;
        let tui: u32 = pane.trim().parse().context("tui pid")?;
        let (t0, e0, w0) = (cpu_secs(tui)?, cpu_secs(edge)?, Instant::now());
        std::thread::sleep(Duration::from_secs(secs));
        let (t1, e1, wall) = (cpu_secs(tui)?, cpu_secs(edge)?, w0.elapsed().as_secs_f64());
        let _ = tmux(&["kill-server"]);
        figs.push((
            format!("dashboard: TUI CPU, 2 refreshes/s for {secs} s"),
            "% of a core",
            (t1 - t0) / wall * 100.0,
        ));
        figs.push((
            "dashboard: daemon CPU while the TUI polls".into(),
            "% of a core",
            (e1 - e0) / wall * 100.0,
        ));

        // Control API: 50 clients at once, 100 status requests each.
        let rt = tokio::runtime::Runtime::new()?;
        let client = stallnet::control_client::Client::new(&t.dir.join("edge-run"));
        let mut lat: Vec<f64> = rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..50 {
                let c = client.clone();
                tasks.spawn(async move {
                    let mut v = Vec::with_capacity(100);
                    for _ in 0..100 {
                        let s = Instant::now();
                        if c.get("/v1/status").await.is_ok() {
                            v.push(s.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                    v
                });
            }
            let mut all = Vec::new();
            while let Some(Ok(v)) = tasks.join_next().await {
                all.extend(v);
            }
            all
        });
        anyhow::ensure!(lat.len() == 5000, "{} of 5000 requests answered", lat.len());
        lat.sort_by(|a, b| a.total_cmp(b));
        figs.push((
            "control API: status p50, 50 clients".into(),
            "ms",
            lat[lat.len() / 2],
        ));
        figs.push((
            "control API: status p99, 50 clients".into(),
            "ms",
            lat[lat.len() * 99 / 100],
        ));

        // Metrics: 1000 scrapes back to back (one curl, one connection), the daemon's CPU
        // for them less its idle rate; a scrape every second costs 1/1000 of that per s.
        let quiet = 30.0;
        let (e0, w0) = (cpu_secs(edge)?, Instant::now());
        std::thread::sleep(Duration::from_secs_f64(quiet));
        let base = (cpu_secs(edge)? - e0) / w0.elapsed().as_secs_f64();
        let (e0, w0) = (cpu_secs(edge)?, Instant::now());
        let out = t.exec(
            "lan",
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "--max-time",
                "120",
                "http://10.1.0.1:9108/metrics?n=[1-1000]",
            ],
        )?;
        anyhow::ensure!(out.status.success(), "scrapes failed");
        let (spent, wall) = (cpu_secs(edge)? - e0, w0.elapsed().as_secs_f64());
        let per_scrape_ms = ((spent - base * wall) / 1000.0 * 1e3).max(0.0);
        figs.push(("metrics: daemon CPU per scrape".into(), "ms", per_scrape_ms));
        figs.push(("daemon CPU, idle edge".into(), "% of a core", base * 100.0));
        Ok(figs)
    }
}

//! `stallnet-lab`: the lab. Builds the two-uplink topology (wifi 20 Mbit/s, cell
//! 10 Mbit/s), starts hub and edge, a POS-like and a stream-like traffic source, and prints
//! the edge's status every second until interrupted. Faults are injected from another
//! shell with `tests/lab.sh fault …` (see README).
use std::time::Duration;

use anyhow::Result;
use stallnet_tests::topo::{link_state, Options, Topology, UplinkSpec};

fn main() -> Result<()> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options::default(),
    )?;
    std::fs::write(
        "/tmp/stallnet-lab.env",
        format!("PREFIX={}\nDIR={}\n", t.prefix, t.dir.display()),
    )?;
    println!(
        "lab namespaces: {}-*; logs and control sockets in {}",
        t.prefix,
        t.dir.display()
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let _ = ctrlc_flag(s);
    t.start_hub()?;
    t.start_edge()?;
    t.start_echo(7001)?;
    t.start_echo(7002)?;
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
            "198.18.0.1:7002",
            "10.1.0.2:0",
            "500",
            "86400",
        ],
    )?;
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
                println!(
                    "{} {}",
                    s["state"].as_str().unwrap_or("?").to_uppercase(),
                    links.join(" ")
                );
            }
            Err(e) => println!("waiting for the edge: {e}"),
        }
    }
    Ok(())
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

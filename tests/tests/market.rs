//! A market on one hub: three stalls flashed alike (the same LAN, 10.1.0.0/24, the same
//! client addresses) on one real hub, each with its own identity and bond. Real
//! processes in namespaces, real QUIC, real TUN devices, the hub's real nft table.
//! Needs root; fails loudly without it.

use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_tests::topo::{bin, Options, Topology, UplinkSpec, HUB_ADDR, LAN_CLIENT, SERVER};

/// Stall 1 (the topology's own edge, one emulated wifi uplink) and stalls 2 and 3.
fn market() -> Result<Topology> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi()],
        Options {
            extra_stalls: 2,
            ..Default::default()
        },
    )?;
    t.start()?;
    Ok(t)
}

/// The role names of stall `k`'s LAN (1 is the topology's own).
fn lan(k: usize) -> String {
    if k == 1 {
        "lan".into()
    } else {
        format!("lan{k}")
    }
}

fn tool() -> String {
    bin("stallnet-traffic")
        .to_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn stalls_with_the_same_lan_each_get_their_own_answers() -> Result<()> {
    let mut t = market()?;
    t.start_echo(7000)?;
    let tool = tool();
    t.spawn(
        "sink",
        "inet",
        &[&tool, "tcp-sink", &format!("{SERVER}:7100")],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    // The same client address and source port behind every stall, at a different rate
    // each: an answer that reached the wrong stall would show as lost or extra there.
    let rates = [100u32, 150, 200];
    let (flows, sends) = std::thread::scope(|s| -> Result<_> {
        let tr = &t;
        let tool = &tool;
        let flows: Vec<_> = (1..=3)
            .map(|k| {
                s.spawn(move || {
                    tr.udp_flow_in(
                        &lan(k),
                        &format!("{SERVER}:7000"),
                        &format!("{LAN_CLIENT}:40000"),
                        rates[k - 1],
                        3.0,
                    )
                })
            })
            .collect();
        // And a TCP upload of 2 MiB from each (checksums after the rewrite, both ways).
        let sends: Vec<_> = (1..=3)
            .map(|k| {
                s.spawn(move || {
                    tr.json(
                        &lan(k),
                        &[tool, "tcp-send", &format!("{SERVER}:7100"), "2097152"],
                    )
                })
            })
            .collect();
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<serde_json::Value>>| {
            h.join().map_err(|_| anyhow::anyhow!("a flow panicked"))?
        };
        let flows = flows.into_iter().map(join).collect::<Result<Vec<_>>>()?;
        let sends = sends.into_iter().map(join).collect::<Result<Vec<_>>>()?;
        Ok((flows, sends))
    })?;
    for (k, f) in flows.iter().enumerate() {
        let want = u64::from(rates[k]) * 3;
        assert_eq!(f["sent"].as_u64(), Some(want), "stall {}: {f}", k + 1);
        assert_eq!(f["received"].as_u64(), Some(want), "stall {}: {f}", k + 1);
        assert_eq!(f["duplicates"], 0, "stall {}: {f}", k + 1);
    }
    for (k, r) in sends.iter().enumerate() {
        assert_eq!(
            r["acknowledged"].as_u64(),
            Some(2_097_152),
            "stall {}: {r}",
            k + 1
        );
    }
    // Each stall's traffic went through its own bond on the hub.
    let hub = t.status("hub")?;
    for name in ["stall", "stall2", "stall3"] {
        let rx: u64 = hub["bonds"][name]["links"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| l["rx_packets"].as_u64().unwrap_or(0))
            .sum();
        assert!(rx >= 300, "{name}: rx {rx}: {hub}");
        assert_eq!(hub["bonds"][name]["spoofed"], 0, "{name}: {hub}");
    }
    Ok(())
}

#[test]
fn a_stall_reaches_neither_another_stall_nor_the_hub() -> Result<()> {
    let mut t = market()?;
    let tool = tool();
    // Stall 2's client runs a service; stall 1's client tries it at stall 2's block on
    // the hub (10.100.1.0/24: the second device's) and at stall 2's tunnel address.
    t.spawn(
        "echo2",
        "lan2",
        &[&tool, "udp-echo", &format!("{LAN_CLIENT}:7200")],
    )?;
    t.spawn(
        "hubsvc",
        "hub",
        &[&tool, "tcp-sink", &format!("{HUB_ADDR}:7300")],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let bind = format!("{LAN_CLIENT}:0");
    for to in ["10.100.1.2:7200", "10.99.0.3:7200"] {
        let f = t.udp_flow_in("lan", to, &bind, 50, 1.0)?;
        assert_eq!(f["sent"], 50, "{to}: {f}");
        assert_eq!(f["received"], 0, "{to} answered through the hub: {f}");
    }
    // The hub's own service: closed to the stall, open from the internet.
    let from_stall = t.json("lan", &[&tool, "tcp-connect", &format!("{HUB_ADDR}:7300")])?;
    assert_eq!(from_stall["outcome"], "timeout", "{from_stall}");
    let from_inet = t.json("inet", &[&tool, "tcp-connect", &format!("{HUB_ADDR}:7300")])?;
    assert_eq!(from_inet["outcome"], "connected", "{from_inet}");
    // The hub still answers a stall's ping on its tunnel address.
    let ping = t.exec(
        "lan",
        &["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.99.0.1"],
    )?;
    assert!(String::from_utf8_lossy(&ping.stdout).contains(" 0% packet loss"));
    // The drops are counted.
    let hub = t.wait_status("hub", Duration::from_secs(5), |s| {
        s["isolation"]["between_stalls"].as_u64().unwrap_or(0) >= 100
            && s["isolation"]["to_hub"].as_u64().unwrap_or(0) >= 1
    })?;
    assert!(hub["isolation"].is_object(), "{hub}");

    // The control: without the hub's table, the same flow does reach stall 2 (so the
    // test above could fail).
    t.exec("hub", &["nft", "delete", "table", "inet", "stallnet_hub"])?;
    let f = t.udp_flow_in("lan", "10.100.1.2:7200", &bind, 50, 1.0)?;
    assert!(f["received"].as_u64().unwrap_or(0) > 0, "{f}");
    Ok(())
}

#[test]
fn a_spoofed_source_from_a_stall_is_dropped_and_counted() -> Result<()> {
    let mut t = market()?;
    t.start_echo(7000)?;
    // A client in stall 1's LAN using an address that is not the stall's, pushed into
    // the tunnel by a rule in the edge's namespace (a stand-in for a box that forwards
    // it: the daemon's own rule only takes the LAN's prefix).
    t.exec("lan", &["ip", "addr", "add", "10.7.0.9/32", "dev", "eth0"])?;
    t.exec(
        "edge",
        &[
            "ip", "rule", "add", "from", "10.7.0.9", "lookup", "200", "priority", "1001",
        ],
    )?;
    let f = t
        .udp_flow_in("lan", &format!("{SERVER}:7000"), "10.7.0.9:0", 50, 1.0)
        .context("spoofed flow")?;
    assert_eq!(f["received"], 0, "{f}");
    let hub = t.wait_status("hub", Duration::from_secs(5), |s| {
        s["bonds"]["stall"]["spoofed"].as_u64().unwrap_or(0) >= 50
    })?;
    // Nobody else's bond saw anything of it.
    assert_eq!(hub["bonds"]["stall2"]["spoofed"], 0, "{hub}");
    // The stall's own traffic is unaffected.
    let ok = t.udp_flow_in(
        "lan",
        &format!("{SERVER}:7000"),
        &format!("{LAN_CLIENT}:0"),
        50,
        1.0,
    )?;
    assert_eq!(ok["received"], 50, "{ok}");
    Ok(())
}

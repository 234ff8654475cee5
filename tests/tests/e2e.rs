//! End-to-end: the real `stallnet` binary as edge and hub in network namespaces, uplinks
//! through the userspace link emulator, real QUIC, real TUN devices. Needs root; fails
//! loudly without it.

use std::time::Duration;

use anyhow::Result;
use stallnet_tests::topo::{
    any_link, link_state, up_links, Options, Topology, UplinkSpec, LAN_CLIENT, POS_CLIENT, SERVER,
};

fn two_links() -> Vec<UplinkSpec> {
    vec![UplinkSpec::wifi(), UplinkSpec::cell()]
}

#[test]
fn traffic_flows_both_ways_over_the_bond() -> Result<()> {
    let mut t = Topology::build(two_links(), Options::default())?;
    t.start()?;
    t.start_echo(7001)?;
    let out = t.exec("lan", &["ping", "-c", "5", "-i", "0.2", "-W", "2", SERVER])?;
    assert!(String::from_utf8_lossy(&out.stdout).contains(" 0% packet loss"));
    let flow = t.udp_flow(LAN_CLIENT, 7001, 200, 3.0)?;
    assert_eq!(flow["lost"], 0, "{flow}");
    assert_eq!(flow["duplicates"], 0, "{flow}");
    // Both directions crossed the tunnel, and the hub saw the edge's traffic.
    let hub = t.status("hub")?;
    let rx: u64 = hub["bonds"]["stall"]["links"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["rx_packets"].as_u64().unwrap_or(0))
        .sum();
    let tx: u64 = hub["bonds"]["stall"]["links"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["tx_packets"].as_u64().unwrap_or(0))
        .sum();
    assert!(rx >= 600 && tx >= 600, "hub rx {rx} tx {tx}");
    Ok(())
}

/// Runs a POS flow and a normal flow while `fault` is applied 1.5 s in; returns both
/// summaries.
fn flows_through_fault(
    t: &mut Topology,
    fault: impl FnOnce(&Topology) -> Result<()> + Send,
) -> Result<(serde_json::Value, serde_json::Value)> {
    t.start_echo(7001)?;
    t.start_echo(7002)?;
    std::thread::scope(|s| {
        let tr = &*t;
        let pos = s.spawn(move || tr.udp_flow(POS_CLIENT, 7001, 100, 6.0));
        let bulk = s.spawn(move || tr.udp_flow(LAN_CLIENT, 7002, 200, 6.0));
        std::thread::sleep(Duration::from_millis(1500));
        fault(tr)?;
        let pos = pos
            .join()
            .map_err(|_| anyhow::anyhow!("pos flow panicked"))??;
        let bulk = bulk
            .join()
            .map_err(|_| anyhow::anyhow!("bulk flow panicked"))??;
        Ok((pos, bulk))
    })
}

#[test]
fn silent_black_hole_costs_pos_nothing_and_bulk_a_blink() -> Result<()> {
    let mut t = Topology::build(two_links(), Options::default())?;
    t.start()?;
    let (pos, bulk) = flows_through_fault(&mut t, |t| t.isp_blackhole(1, true))?;
    assert_eq!(pos["lost"], 0, "POS lost packets: {pos}");
    assert_eq!(pos["duplicates"], 0, "{pos}");
    // Functional bound, not a benchmark: the flow goes on (figures in docs/BENCHMARKS.md).
    assert!(
        bulk["max_gap_ms"].as_f64().unwrap_or(f64::MAX) < 1000.0,
        "{bulk}"
    );
    assert!(bulk["received"].as_u64().unwrap_or(0) >= 1100, "{bulk}");
    let s = t.wait_status("edge", Duration::from_secs(5), |s| {
        link_state(s, "wifi") != "up"
    })?;
    assert_eq!(link_state(&s, "cell"), "up", "{s}");
    Ok(())
}

#[test]
fn carrier_loss_costs_pos_nothing() -> Result<()> {
    let mut t = Topology::build(two_links(), Options::default())?;
    t.start()?;
    let (pos, bulk) = flows_through_fault(&mut t, |t| t.carrier(1, false))?;
    assert_eq!(pos["lost"], 0, "POS lost packets: {pos}");
    assert!(
        bulk["max_gap_ms"].as_f64().unwrap_or(f64::MAX) < 1000.0,
        "{bulk}"
    );
    let s = t.status("edge")?;
    assert_eq!(link_state(&s, "wifi"), "down", "{s}");
    Ok(())
}

/// What uplink `name` of the edge sends of a 2 s, 200 packet/s UDP flow to port 7001
/// (which needs an echo server there): the packets the status counts before and after.
fn carried_of_a_flow(t: &Topology, name: &str) -> Result<u64> {
    let before = tx_packets(&t.status("edge")?, name);
    let flow = t.udp_flow(LAN_CLIENT, 7001, 200, 2.0)?;
    assert_eq!(flow["lost"], 0, "{flow}");
    // The status is written every half second: wait for one written after the flow.
    std::thread::sleep(Duration::from_millis(600));
    Ok(tx_packets(&t.status("edge")?, name).saturating_sub(before))
}

#[test]
fn a_restored_uplink_is_used_again_after_its_hold() -> Result<()> {
    let mut t = Topology::build(two_links(), Options::default())?;
    t.start()?;
    t.start_echo(7001)?;
    // How much of a light flow wifi takes while both uplinks are fine: the two senders
    // race for each packet, so this is the share to expect back after the restore.
    let usual = carried_of_a_flow(&t, "wifi")?;
    t.isp_blackhole(1, true)?;
    t.wait_status("edge", Duration::from_secs(5), |s| {
        link_state(s, "wifi") == "down"
    })?;
    t.isp_blackhole(1, false)?;
    let lifted = std::time::Instant::now();
    let up = t.wait_status("edge", Duration::from_secs(15), |s| {
        link_state(s, "wifi") == "up"
    })?;
    // Back within a second: a probe every 100 ms finds it, and a single outage's hold is
    // 0.1 s (the status is written every half second; the rest is a busy machine's
    // margin). The hold itself, and the longer ones of a new or flapping link, are the
    // health core's tests.
    let took = lifted.elapsed();
    assert!(
        took <= Duration::from_secs(2),
        "up {took:?} after the fault lifted"
    );
    // Back from a single clean outage, it is trusted with POS and the stream again: the
    // probes lost in the outage do not count as the link's loss (a second outage within
    // a minute would).
    let wifi = any_link(&up, "wifi");
    assert_eq!(wifi["degraded"], false, "{wifi}");
    assert_eq!(wifi["flaps"], 1, "{wifi}");
    // And it is used again. (Measured: about half its usual share in the first seconds
    // after a black hole, 63-80 packets against 103-156; the floor here is a quarter.)
    let again = carried_of_a_flow(&t, "wifi")?;
    eprintln!("measured: wifi carried {again} packets of the flow, {usual} before the fault");
    assert!(
        again > 0 && again * 4 >= usual,
        "wifi carried {again} packets, {usual} before the fault"
    );
    Ok(())
}

fn tx_packets(s: &serde_json::Value, name: &str) -> u64 {
    s["bonds"]["hub"]["links"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == name))
        .and_then(|l| l["tx_packets"].as_u64())
        .unwrap_or(0)
}

#[test]
fn an_uplink_plugged_in_at_runtime_joins_the_bond() -> Result<()> {
    let mut t = Topology::build(
        two_links(),
        Options {
            missing_uplink: Some(2),
            ..Default::default()
        },
    )?;
    t.start_hub()?;
    t.start_edge()?;
    let s = t.wait_status("edge", Duration::from_secs(20), |s| {
        link_state(s, "wifi") == "up"
    })?;
    assert_eq!(link_state(&s, "cell"), "absent", "{s}");
    t.plug_uplink(2)?;
    t.wait_status("edge", Duration::from_secs(15), |s| {
        link_state(s, "cell") == "up"
    })?;
    Ok(())
}

#[test]
fn an_unknown_device_is_refused_in_the_handshake() -> Result<()> {
    let mut t = Topology::build(vec![UplinkSpec::wifi()], Options::default())?;
    // A new key the hub has never heard of.
    let state = t.dir.join("edge-state");
    let out = std::process::Command::new(stallnet_tests::topo::bin("stallnet"))
        .args(["keygen", "--force", "--state-dir"])
        .arg(&state)
        .output()?;
    assert!(out.status.success());
    t.start_hub()?;
    t.start_edge()?;
    let hub = t.wait_status("hub", Duration::from_secs(15), |s| {
        s["refused_handshakes"].as_u64().unwrap_or(0) >= 1
    })?;
    assert_eq!(up_links(&hub, "stall"), 0, "{hub}");
    let edge = t.status("edge")?;
    assert_eq!(edge["state"], "offline", "{edge}");
    Ok(())
}

#[test]
fn garbage_to_the_hub_port_is_dropped_and_the_bond_keeps_working() -> Result<()> {
    let mut t = Topology::build(vec![UplinkSpec::wifi()], Options::default())?;
    t.start()?;
    t.start_echo(7001)?;
    // 2000 random and truncated datagrams from the internet side, then a QUIC-looking
    // long header with nonsense inside.
    let script = "import os,socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
for i in range(2000):\n    s.sendto(os.urandom(i % 1400 + 1),('172.31.0.2',4433))\n\
s.sendto(bytes([0xc0,0,0,0,1,8])+os.urandom(1200),('172.31.0.2',4433))\n";
    t.exec("inet", &["python3", "-c", script])?;
    let flow = t.udp_flow(LAN_CLIENT, 7001, 200, 2.0)?;
    assert_eq!(flow["lost"], 0, "{flow}");
    let hub = t.status("hub")?;
    assert_eq!(up_links(&hub, "stall"), 1, "{hub}");
    assert!(!t.log("hub").contains("panicked"), "{}", t.log("hub"));
    Ok(())
}

#[test]
fn hub_down_is_reported_and_the_direct_fallback_carries_traffic() -> Result<()> {
    let mut t = Topology::build(
        two_links(),
        Options {
            fallback_direct: true,
            ..Default::default()
        },
    )?;
    t.start()?;
    t.stop("hub");
    let s = t.wait_status("edge", Duration::from_secs(10), |s| {
        s["state"] == "offline" && s["fallback_active"] == true
    })?;
    assert_eq!(s["state"], "offline");
    let out = t.exec("lan", &["ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER])?;
    assert!(String::from_utf8_lossy(&out.stdout).contains(" 0% packet loss"));
    // The hub comes back: the edge leaves the fallback.
    t.start_hub()?;
    t.wait_status("edge", Duration::from_secs(20), |s| {
        s["state"] != "offline" && s["fallback_active"] == false
    })?;
    Ok(())
}

#[test]
fn without_fallback_the_edge_reports_offline_and_nothing_leaks() -> Result<()> {
    let mut t = Topology::build(vec![UplinkSpec::wifi()], Options::default())?;
    t.start()?;
    t.stop("hub");
    t.wait_status("edge", Duration::from_secs(10), |s| s["state"] == "offline")?;
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ns("lan"),
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            SERVER,
        ])
        .output()?;
    assert!(
        !out.status.success(),
        "LAN traffic must not leave untunnelled"
    );
    Ok(())
}

#[test]
fn a_nat_rebinding_does_not_break_the_bond() -> Result<()> {
    let mut t = Topology::build(vec![UplinkSpec::wifi()], Options::default())?;
    t.start()?;
    t.start_echo(7001)?;
    t.rebind_nat(1)?;
    let flow = t.udp_flow(LAN_CLIENT, 7001, 200, 3.0)?;
    assert!(flow["received"].as_u64().unwrap_or(0) >= 550, "{flow}");
    let s = t.status("edge")?;
    assert_eq!(link_state(&s, "wifi"), "up", "{s}");
    Ok(())
}

/// iperf3's received goodput in Mbit/s, and its whole JSON report.
fn iperf_goodput(out: &std::process::Output) -> Result<(f64, serde_json::Value)> {
    let j: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mbps = j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6;
    Ok((mbps, j))
}

#[test]
fn tcp_is_aggregated_over_both_uplinks() -> Result<()> {
    let mut t = Topology::build(two_links(), Options::default())?;
    t.start()?;
    t.spawn("iperf", "inet", &["iperf3", "-s", "-B", SERVER])?;
    std::thread::sleep(Duration::from_millis(300));
    let out = t.exec(
        "lan",
        &[
            "iperf3", "-c", SERVER, "-t", "5", "-P", "4", "-C", "cubic", "-J",
        ],
    )?;
    let (mbps, _) = iperf_goodput(&out)?;
    let s = t.status("edge")?;
    // 1500-byte uplinks: the tunnel carries the TUN's whole 1 424 bytes, found by each
    // connection's path-MTU discovery (it starts at 1 302).
    assert_eq!(s["bonds"]["hub"]["path_mtu"].as_u64(), Some(1424), "{s}");
    let (w, c) = (tx_packets(&s, "wifi"), tx_packets(&s, "cell"));
    // Both uplinks carry a real share, and together more than the faster one alone.
    assert!(c * 5 >= w, "cell carried {c} packets vs wifi {w}");
    assert!(mbps > 20.0, "aggregate goodput {mbps:.1} Mbit/s");
    // Downloads too: the hub's TUN reads super-packets, the edge's writes coalesce.
    // A server of its own: iperf3's resets a test begun while it closes the last one.
    t.spawn(
        "iperf-down",
        "inet",
        &["iperf3", "-s", "-B", SERVER, "-p", "5202"],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let out = t.exec(
        "lan",
        &[
            "iperf3", "-c", SERVER, "-p", "5202", "-t", "3", "-P", "4", "-C", "cubic", "-R", "-J",
        ],
    )?;
    let (down, j) = iperf_goodput(&out)?;
    assert!(
        down > 15.0,
        "download goodput {down:.1} Mbit/s: {}",
        j["error"]
    );
    // Every super-packet the kernels handed over was split, every coalesced write
    // taken: nothing refused as malformed at either end.
    std::thread::sleep(Duration::from_millis(600));
    for role in ["edge", "hub"] {
        let bad = t.status(role)?["tun_malformed"].as_u64();
        assert_eq!(bad, Some(0), "{role}: TUN offload refusals");
    }
    Ok(())
}

#[test]
fn the_tunnel_follows_a_smaller_uplink_mtu_with_icmp_and_fragments() -> Result<()> {
    // The uplink's path carries 1 400-byte packets: its QUIC connection's path-MTU
    // discovery settles at most 1 372 bytes of UDP, 1 324 of tunnelled packet, under the
    // TUN's default 1 424.
    let mut t = Topology::build(vec![UplinkSpec::wifi()], Options::default())?;
    t.exec("edge", &["ip", "link", "set", "dev", "wan1", "mtu", "1400"])?;
    t.start()?;
    // Until the uplink's connection has had its time to search, the tunnel carries what
    // the TUN does (nothing is up) or the connection's starting size.
    let s = t.wait_status("edge", Duration::from_secs(10), |s| {
        s["bonds"]["hub"]["links"][0]["mtu_settled"] == true
    })?;
    let mtu = s["bonds"]["hub"]["path_mtu"].as_u64().unwrap_or(0);
    assert!(
        (1310..=1324).contains(&mtu),
        "path MTU {mtu}: discovery did not settle just under the uplink's\n{s}"
    );
    let ping =
        |flags: &[&str]| -> Result<String> {
            let ns = t.ns("lan");
            let mut args = vec![
                "netns", "exec", &ns, "ping", "-c", "3", "-i", "0.3", "-W", "2",
            ];
            args.extend_from_slice(flags);
            args.push(SERVER);
            let out = std::process::Command::new("ip").args(&args).output()?;
            Ok(String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr))
        };
    // 1 372 bytes of ICMP payload: a 1 400-byte packet. Without DF it is fragmented and
    // arrives; so does the answer (the server sends it without DF), fragmented by the
    // hub's bond. First, while the LAN host knows of no smaller path MTU.
    let text = ping(&["-M", "dont", "-s", "1372"])?;
    assert!(text.contains(" 0% packet loss"), "{text}");
    // (The status file is written once a second.)
    let counted = |s: &serde_json::Value, what: &str| s["bonds"]["hub"][what].as_u64().unwrap_or(0);
    t.wait_status("edge", Duration::from_secs(3), |s| {
        counted(s, "fragmented") >= 3
    })?;
    // With DF set (what TCP and QUIC send), its sender is told the size that fits.
    let text = ping(&["-M", "do", "-s", "1372"])?;
    assert!(
        text.contains(&format!("mtu = {mtu}")) || text.contains(&format!("mtu={mtu}")),
        "{text}"
    );
    t.wait_status("edge", Duration::from_secs(3), |s| {
        counted(s, "too_big") >= 1
    })?;
    // Packets that fit pass as they are.
    let out = t.exec("lan", &["ping", "-c", "2", "-W", "2", "-s", "1200", SERVER])?;
    assert!(String::from_utf8_lossy(&out.stdout).contains(" 0% packet loss"));
    Ok(())
}

#[test]
fn a_new_address_on_an_uplink_keeps_the_bond() -> Result<()> {
    let mut t = Topology::build(vec![UplinkSpec::wifi()], Options::default())?;
    t.start()?;
    t.start_echo(7001)?;
    // Wifi re-associates and DHCP hands out another address (same gateway).
    t.exec(
        "edge",
        &["ip", "addr", "del", "100.64.1.2/24", "dev", "wan1"],
    )?;
    t.exec(
        "edge",
        &["ip", "addr", "add", "100.64.1.3/24", "dev", "wan1"],
    )?;
    t.exec(
        "edge",
        &[
            "ip",
            "route",
            "replace",
            "default",
            "via",
            "100.64.1.1",
            "dev",
            "wan1",
            "metric",
            "100",
        ],
    )?;
    let s = t.wait_status("edge", Duration::from_secs(15), |s| {
        link_state(s, "wifi") == "up"
    })?;
    assert_eq!(s["state"], "online", "{s}");
    let flow = t.udp_flow(LAN_CLIENT, 7001, 200, 2.0)?;
    assert!(flow["received"].as_u64().unwrap_or(0) >= 380, "{flow}");
    assert!(
        t.log("edge").contains("rebinding") || t.log("edge").contains("connected to hub"),
        "{}",
        t.log("edge")
    );
    Ok(())
}

#[test]
fn a_tcp_transfer_completes_through_a_silent_black_hole() -> Result<()> {
    let mut t = Topology::build(two_links(), Options::default())?;
    t.start()?;
    let tool = stallnet_tests::topo::bin("stallnet-traffic");
    let tool = tool.to_str().unwrap_or_default().to_string();
    t.spawn(
        "sink",
        "inet",
        &[&tool, "tcp-sink", &format!("{SERVER}:7100")],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let bytes: u64 = 12 * 1024 * 1024;
    let report = std::thread::scope(|s| -> Result<serde_json::Value> {
        let tr = &t;
        let tool = &tool;
        // 12 MiB upload: about 4 s at the bonded rate, 10 s on the cell alone.
        let h = s.spawn(move || {
            tr.exec(
                "lan",
                &[
                    tool,
                    "tcp-send",
                    &format!("{SERVER}:7100"),
                    &bytes.to_string(),
                ],
            )
        });
        std::thread::sleep(Duration::from_secs(2));
        tr.isp_blackhole(1, true)?;
        let out = h
            .join()
            .map_err(|_| anyhow::anyhow!("tcp-send panicked"))??;
        Ok(serde_json::from_slice(&out.stdout)?)
    })?;
    // The sink read every byte before it answered.
    assert_eq!(report["acknowledged"].as_u64(), Some(bytes), "{report}");
    let s = t.status("edge")?;
    assert_ne!(link_state(&s, "wifi"), "up", "{s}");
    assert!(
        s["bonds"]["hub"]["scheduler"]["resent"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{s}"
    );
    Ok(())
}

/// An uplink whose carrier comes back is used again at once: no packet waits out an
/// address resolution of the gateway begun while the carrier was down (the kernel retries
/// those a second apart), and the bond's only uplink carries traffic as soon as it
/// answers probes. A UDP flow through a 2.5 s carrier loss of the only uplink: its longest
/// gap is the outage and a moment, not the outage and a second.
#[test]
fn traffic_resumes_a_moment_after_the_carrier_returns() -> Result<()> {
    let mut t = Topology::build(vec![UplinkSpec::wifi()], Options::default())?;
    t.start()?;
    t.start_echo(7002)?;
    let outage = Duration::from_millis(2500);
    let flow = std::thread::scope(|s| -> Result<serde_json::Value> {
        let tr = &t;
        let flow = s.spawn(move || tr.udp_flow(LAN_CLIENT, 7002, 200, 6.0));
        std::thread::sleep(Duration::from_millis(1500));
        tr.carrier(1, false)?;
        std::thread::sleep(outage);
        tr.carrier(1, true)?;
        flow.join().map_err(|_| anyhow::anyhow!("flow panicked"))?
    })?;
    let gap = flow["max_gap_ms"].as_f64().unwrap_or(f64::MAX);
    eprintln!("measured: longest gap {gap:.0} ms through a 2.5 s carrier loss");
    assert!(gap < outage.as_secs_f64() * 1000.0 + 500.0, "{flow}");
    Ok(())
}

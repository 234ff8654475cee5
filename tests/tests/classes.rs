//! End-to-end traffic classes: the real `stallnet` edge and hub in namespaces, deep modem
//! queues in the link emulator, cubic TCP load from iperf3, real dnsmasq for host names.
//! Needs root; fails loudly without it.

use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_tests::topo::{
    bin, deep_links, wait_for, Options, Topology, UplinkSpec, GUEST_CLIENT, LAN_CLIENT, POS_CLIENT,
    SERVER,
};

/// The flood test saturates the whole machine (90 000 packets a second): it runs alone,
/// the other tests of this file (several measure latency) alongside each other.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

fn f(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// The edge's busiest-flows entry for the stream flow to port 9000, if listed.
fn stream_flow(t: &Topology) -> Result<Option<serde_json::Value>> {
    let st = t.status("edge")?;
    Ok(st["bonds"]["hub"]["top_flows"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["flow"].as_str().is_some_and(|s| s.contains(":9000")))
        .cloned())
}

fn class<'a>(status: &'a serde_json::Value, bond: &str, name: &str) -> &'a serde_json::Value {
    status["bonds"][bond]["classes"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["class"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

#[test]
fn pos_and_the_stream_keep_their_service_under_saturating_bulk_both_ways() -> Result<()> {
    let _machine = shared();
    let mut t = Topology::build(deep_links(), Options::default())?;
    t.start()?;
    t.start_echo(7001)?;
    t.start_echo(9000)?;
    let idle = t.udp_flow(POS_CLIENT, 7001, 10, 4.0)?;
    t.start_iperf_server(5201)?;
    t.start_iperf_server(5202)?;
    t.start_iperf_load("up", LAN_CLIENT, 5201, false, 22, 4)?;
    t.start_iperf_load("down", LAN_CLIENT, 5202, true, 22, 4)?;
    // Let the load fill whatever it can.
    std::thread::sleep(Duration::from_secs(5));
    let (pos, stream) = std::thread::scope(|s| {
        let tr = &t;
        // SRT's default port: the stream class by the built-in rules; 4 Mbit/s each way.
        let stream = s.spawn(move || tr.udp_flow_sized(LAN_CLIENT, 9000, 500, 10.0, 1000));
        let pos = tr.udp_flow(POS_CLIENT, 7001, 10, 10.0);
        let stream = stream
            .join()
            .map_err(|_| anyhow::anyhow!("stream flow panicked"))?;
        anyhow::Ok((pos?, stream?))
    })?;
    let edge = t.status("edge")?;
    let hub = t.status("hub")?;
    // The figures, for a distribution over runs (`-- --nocapture`).
    eprintln!(
        "measured: pos idle p50 {:.1} p99 {:.1} ms; loaded p50 {:.1} p99 {:.1} ms lost {}; stream jitter p99 {:.1} ms, {} of {}",
        f(&idle, "rtt_p50_ms"),
        f(&idle, "rtt_p99_ms"),
        f(&pos, "rtt_p50_ms"),
        f(&pos, "rtt_p99_ms"),
        pos["lost"],
        f(&stream, "jitter_p99_ms"),
        stream["received"],
        stream["sent"]
    );
    // The load really saturated both directions: bulk was queued and dropped by us.
    let bulk_up = class(&edge, "hub", "bulk");
    let bulk_down = class(&hub, "stall", "bulk");
    assert!(
        bulk_up["bytes"].as_u64().unwrap_or(0) > 10_000_000
            && bulk_down["bytes"].as_u64().unwrap_or(0) > 10_000_000,
        "bulk did not load the links: {bulk_up} {bulk_down}"
    );
    // POS: nothing lost, and its round trip barely notices the load (the benchmark gives
    // the exact figures; this bound is functional, not a timing claim).
    assert_eq!(pos["lost"], 0, "{pos}");
    assert!(
        f(&pos, "rtt_p99_ms") <= f(&idle, "rtt_p99_ms") + 40.0,
        "POS under load {pos} vs idle {idle}"
    );
    // The stream keeps its rate: (almost) everything delivered both ways.
    let sent = stream["sent"].as_u64().unwrap_or(0) as f64;
    let got = stream["received"].as_u64().unwrap_or(0) as f64;
    assert!(got >= 0.97 * sent, "stream {stream}");
    assert!(f(&stream, "jitter_p99_ms") < 50.0, "stream {stream}");
    let st = class(&edge, "hub", "stream");
    assert!(st["packets"].as_u64().unwrap_or(0) >= 4900, "{st}");
    Ok(())
}

#[test]
fn guest_traffic_is_capped_in_both_directions() -> Result<()> {
    let _machine = shared();
    let opts = Options {
        edge_extra: Some(format!(
            "[edge.classes.guest]\nmax_rate = \"2mbit\"\n\n[[edge.rules]]\nclass = \"guest\"\nsrc = [\"{GUEST_CLIENT}/32\"]\n"
        )),
        ..Default::default()
    };
    let mut t = Topology::build(vec![UplinkSpec::wifi(), UplinkSpec::cell()], opts)?;
    t.start()?;
    // One server per direction: iperf3 3.12 closes and reopens its listening socket
    // between tests, so a second client that connects at once can be reset.
    t.start_iperf_server(5201)?;
    t.start_iperf_server(5202)?;
    for reverse in [false, true] {
        let mut args = vec![
            "iperf3",
            "-c",
            SERVER,
            "-p",
            if reverse { "5202" } else { "5201" },
            "-B",
            GUEST_CLIENT,
            "-t",
            "6",
            "-O",
            "2",
            "-P",
            "2",
            "-C",
            "cubic",
            "-J",
        ];
        if reverse {
            args.push("-R");
        }
        let r = t.json("lan", &args)?;
        let bps = r["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| {
                format!(
                    "iperf3 report: {}; server: {}",
                    r["error"],
                    t.log(if reverse {
                        "iperf-server5202"
                    } else {
                        "iperf-server5201"
                    })
                )
            })?;
        let mbps = bps / 1e6;
        assert!(
            (0.8..=2.3).contains(&mbps),
            "guest {} got {mbps:.2} Mbit/s with a 2 Mbit/s cap",
            if reverse { "download" } else { "upload" }
        );
    }
    let edge = t.status("edge")?;
    let guest = class(&edge, "hub", "guest");
    assert!(guest["packets"].as_u64().unwrap_or(0) > 500, "{guest}");
    Ok(())
}

#[test]
fn a_lowest_latency_flow_stays_on_its_uplink() -> Result<()> {
    let _machine = shared();
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options::default(),
    )?;
    t.start()?;
    t.start_echo(9000)?;
    let mut seen = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        let tr = &t;
        let flow = s.spawn(move || tr.udp_flow_sized(LAN_CLIENT, 9000, 200, 6.0, 600));
        std::thread::sleep(Duration::from_millis(800));
        for _ in 0..10 {
            if let Some(fl) = stream_flow(tr)? {
                seen.push((fl["class"].clone(), fl["uplink"].clone()));
            }
            std::thread::sleep(Duration::from_millis(400));
        }
        let out = flow
            .join()
            .map_err(|_| anyhow::anyhow!("flow panicked"))??;
        assert_eq!(out["lost"], 0, "{out}");
        Ok(())
    })?;
    assert!(seen.len() >= 8, "flow not listed: {seen:?}");
    // Stream class, on the lowest-RTT uplink (wifi), the whole time.
    assert!(
        seen.iter().all(|(c, u)| c == "stream" && u == "wifi"),
        "{seen:?}"
    );
    Ok(())
}

#[test]
fn offline_a_syn_to_a_pos_host_learned_from_dns_is_refused_at_once() -> Result<()> {
    let _machine = shared();
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options::default(),
    )?;
    t.start()?;
    t.start_dns(&[("api.sumup.com", SERVER)])?;
    let traffic = bin("stallnet-traffic");
    let traffic = traffic.to_str().context("path")?;
    // A LAN device (not a configured POS source) looks up a payment provider's host; the
    // answer crosses the tunnel and the edge learns the address.
    let a = t.json("lan", &[traffic, "dns-query", SERVER, "api.sumup.com"])?;
    assert_eq!(a["addresses"][0], SERVER, "{a}");
    t.wait_status("edge", Duration::from_secs(3), |s| {
        s["bonds"]["hub"]["classify"]["dns_answers"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    })?;
    // Every uplink goes silent (carrier stays up).
    t.isp_blackhole(1, true)?;
    t.isp_blackhole(2, true)?;
    wait_for(Duration::from_secs(15), || {
        let s = t.status("edge")?;
        let links = s["bonds"]["hub"]["links"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(links
            .iter()
            .all(|l| l["state"] == "down" || l["state"] == "probing"))
    })?;
    let pos = t.json("lan", &[traffic, "tcp-connect", &format!("{SERVER}:443")])?;
    assert_eq!(pos["outcome"], "refused", "{pos}");
    assert!(f(&pos, "ms") < 1000.0, "{pos}");
    t.wait_status("edge", Duration::from_secs(2), |s| {
        s["bonds"]["hub"]["refused_offline"].as_u64().unwrap_or(0) >= 1
    })?;
    // Not a POS host: no answer is made up for it; the connection attempt just waits.
    let other = t.json("lan", &[traffic, "tcp-connect", "198.18.0.99:443"])?;
    assert_eq!(other["outcome"], "timeout", "{other}");
    Ok(())
}

#[test]
fn a_degraded_uplink_loses_the_stream_before_it_dies() -> Result<()> {
    let _machine = shared();
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options::default(),
    )?;
    t.start()?;
    t.start_echo(9000)?;
    let link_of_stream = |t: &Topology| -> Result<Option<String>> {
        Ok(stream_flow(t)?.and_then(|f| f["uplink"].as_str().map(str::to_string)))
    };
    std::thread::scope(|s| -> Result<()> {
        let tr = &t;
        let flow = s.spawn(move || tr.udp_flow_sized(LAN_CLIENT, 9000, 100, 14.0, 600));
        wait_for(Duration::from_secs(3), || {
            Ok(link_of_stream(tr)?.as_deref() == Some("wifi"))
        })?;
        // wifi turns lossy (10 %) but stays up.
        tr.emu(1, "set loss=0.1")?;
        wait_for(Duration::from_secs(10), || {
            let st = tr.status("edge")?;
            let wifi = st["bonds"]["hub"]["links"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["name"] == "wifi")
                .cloned()
                .unwrap_or_default();
            Ok(wifi["degraded"] == true && wifi["state"] == "up")
        })?;
        wait_for(Duration::from_secs(3), || {
            Ok(link_of_stream(tr)?.as_deref() == Some("cell"))
        })?;
        let out = flow
            .join()
            .map_err(|_| anyhow::anyhow!("flow panicked"))??;
        // Only what wifi lost before the move is missing.
        assert!(
            out["received"].as_u64().unwrap_or(0) as f64 >= 0.9 * 1400.0,
            "{out}"
        );
        Ok(())
    })?;
    let st = t.status("edge")?;
    assert!(
        st["bonds"]["hub"]["scheduler"]["flow_moves"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{}",
        st["bonds"]["hub"]["scheduler"]
    );
    Ok(())
}

/// A flow that is `pos` by an edge rule only (not in `pos_sources`, which the hub also
/// knows): its uploads travel as `pos`, and the hub, which has no rules of the edge,
/// mirrors the class the edge gave the flow, so the replies come down as `pos` too.
#[test]
fn a_pos_rule_on_the_edge_makes_the_replies_pos_too() -> Result<()> {
    let _machine = shared();
    let opts = Options {
        edge_extra: Some(format!(
            "[[edge.rules]]\nclass = \"pos\"\nsrc = [\"{LAN_CLIENT}/32\"]\ndst_port = [7002]\n"
        )),
        ..Default::default()
    };
    let mut t = Topology::build(vec![UplinkSpec::wifi(), UplinkSpec::cell()], opts)?;
    t.start()?;
    t.start_echo(7002)?;
    let before_up = class(&t.status("edge")?, "hub", "pos")["packets"]
        .as_u64()
        .unwrap_or(0);
    let before_down = class(&t.status("hub")?, "stall", "pos")["packets"]
        .as_u64()
        .unwrap_or(0);
    let flow = t.udp_flow(LAN_CLIENT, 7002, 20, 3.0)?;
    assert_eq!(flow["lost"], 0, "{flow}");
    let sent = flow["sent"].as_u64().unwrap_or(0);
    let mut up = 0;
    let mut down = 0;
    wait_for(Duration::from_secs(5), || {
        up = class(&t.status("edge")?, "hub", "pos")["packets"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(before_up);
        down = class(&t.status("hub")?, "stall", "pos")["packets"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(before_down);
        Ok(up >= sent && down >= sent)
    })
    .with_context(|| format!("{sent} exchanged; pos packets up {up}, down {down}"))?;
    eprintln!("measured: {sent} exchanges, pos packets up {up}, down {down}");
    Ok(())
}

/// Packets the kernel dropped at the edge's TUN device (the reader fell behind).
fn tun_dropped(t: &Topology) -> Result<u64> {
    let out = t.exec(
        "edge",
        &["cat", "/sys/class/net/stall0/statistics/tx_dropped"],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// One LAN device floods 64-byte datagrams at 90 000/s on 10 000 flows (a phone gone
/// wrong): POS and the stream keep their service. The flood is capped per source in the
/// kernel ahead of the TUN device, so the reader keeps up and the kernel does not drop
/// from every source alike (before the cap: 26 % of POS lost, p99 445 ms).
#[test]
fn one_flooding_lan_device_does_not_take_pos_or_the_stream_down() -> Result<()> {
    let _machine = MACHINE.write().unwrap_or_else(|e| e.into_inner());
    let mut t = Topology::build(deep_links(), Options::default())?;
    t.start()?;
    t.start_echo(7001)?;
    t.start_echo(9000)?;
    let idle = t.udp_flow(POS_CLIENT, 7001, 10, 4.0)?;
    // The flooding phone has an address of its own on the LAN.
    t.exec("lan", &["ip", "addr", "add", "10.1.0.30/24", "dev", "eth0"])?;
    let flooder = bin("stallnet-traffic");
    let f_path = flooder.to_str().context("path")?.to_string();
    t.spawn(
        "flood",
        "lan",
        &[
            &f_path,
            "udp-flood",
            SERVER,
            "10.1.0.30:0",
            "90000",
            "20",
            "10000",
            "64",
        ],
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let dropped_before = tun_dropped(&t)?;
    let (pos, stream) = std::thread::scope(|s| {
        let tr = &t;
        let stream = s.spawn(move || tr.udp_flow_sized(LAN_CLIENT, 9000, 250, 12.0, 1000));
        let pos = tr.udp_flow(POS_CLIENT, 7001, 10, 12.0);
        let stream = stream
            .join()
            .map_err(|_| anyhow::anyhow!("stream flow panicked"))?;
        anyhow::Ok((pos?, stream?))
    })?;
    let dropped = tun_dropped(&t)? - dropped_before;
    // The status says what the cap is and that it dropped the flood's excess.
    let st = t.status("edge")?;
    let cap = &st["lan_source_cap"];
    assert!(cap["pps"].as_u64().unwrap_or(0) >= 10_000, "{cap}");
    assert!(cap["dropped"].as_u64().unwrap_or(0) > 100_000, "{cap}");
    let _ = t.wait_exit("flood", false, Duration::from_secs(10));
    let sent = t
        .log("flood")
        .lines()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map_or(0.0, |v| f(&v, "pps"));
    eprintln!(
        "measured: flooder {sent:.0}/s; pos idle p99 {:.1} ms; flooded p50 {:.1} p99 {:.1} ms lost {}; \
         stream {} of {}, jitter p99 {:.1} ms; TUN drops {dropped}",
        f(&idle, "rtt_p99_ms"),
        f(&pos, "rtt_p50_ms"),
        f(&pos, "rtt_p99_ms"),
        pos["lost"],
        stream["received"],
        stream["sent"],
        f(&stream, "jitter_p99_ms"),
    );
    assert!(sent > 60_000.0, "the flood was a flood: {sent:.0}/s");
    // The kernel no longer drops at the TUN device from every source alike (before the
    // cap: 362 000 drops in such a run).
    assert!(
        dropped < 2_000,
        "{dropped} packets dropped at the TUN device"
    );
    // POS: at most 3 packets of 120 lost (26 % before; the release build loses none, see
    // `stallnet-bench flood`; this test build, at opt-level 1, shares the 2 cores with
    // the flood and the hub),
    // and its round trip stays usable.
    assert!(pos["lost"].as_u64().unwrap_or(u64::MAX) <= 3, "{pos}");
    assert!(
        f(&pos, "rtt_p50_ms") <= f(&idle, "rtt_p50_ms") + 25.0,
        "POS flooded {pos} vs idle {idle}"
    );
    // The stream: (almost) everything delivered.
    let s_sent = stream["sent"].as_u64().unwrap_or(0) as f64;
    let got = stream["received"].as_u64().unwrap_or(0) as f64;
    assert!(got >= 0.95 * s_sent, "stream {stream}");
    Ok(())
}

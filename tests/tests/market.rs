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

    // The fleet view: a stall whose box goes away is listed first, offline.
    t.stop("edge3");
    let hub_cfg = t.dir.join("hub.toml");
    let hub_cfg = hub_cfg.to_str().context("path")?.to_string();
    t.wait_status("hub", Duration::from_secs(20), |s| {
        s["stalls"][0]["name"] == "stall3" && s["stalls"][0]["state"] == "offline"
    })?;
    let (rc, doc, err) = cli(&t, "hub", &["stalls", "--json", "--config", &hub_cfg])?;
    assert_eq!(rc, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&doc)?;
    let rows = doc["stalls"].as_array().context("stalls")?;
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["stall3", "stall", "stall2"], "{doc}");
    assert_eq!(rows[1]["state"], "online", "{doc}");
    assert_eq!(rows[1]["lan"][0], "10.1.0.0/24", "{doc}");
    assert_eq!(rows[2]["lan_on_hub"][0], "10.100.1.0/24", "{doc}");
    let (rc, table, err) = cli(&t, "hub", &["stalls", "--config", &hub_cfg])?;
    assert_eq!(rc, 0, "{err}");
    let first = table.lines().nth(1).unwrap_or_default();
    assert!(
        first.starts_with("stall3") && first.contains("offline") && first.contains("s ago"),
        "{table}"
    );
    assert!(table.lines().all(|l| l.len() <= 80), "{table}");
    Ok(())
}

#[test]
fn a_stall_reaches_neither_another_stall_nor_the_hub() -> Result<()> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi()],
        Options {
            extra_stalls: 2,
            hub_fields: Some("stall_services = [7301]".into()),
            ..Default::default()
        },
    )?;
    t.start()?;
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
    // The sales broker on the hub's VM, listed in hub.stall_services.
    t.spawn(
        "broker",
        "hub",
        &[&tool, "tcp-sink", &format!("{HUB_ADDR}:7301")],
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
    let broker = t.json("lan", &[&tool, "tcp-connect", &format!("{HUB_ADDR}:7301")])?;
    assert_eq!(broker["outcome"], "connected", "{broker}");
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

/// `stallnet ARGS` (the CLI), its exit code, standard output and error.
fn cli(t: &Topology, role: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let b = bin("stallnet");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &t.ns(role)])
        .arg(&b)
        .args(args)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

/// `stallnet hub invite NAME` on the hub: the code it printed.
fn invite(t: &Topology, name: &str) -> Result<String> {
    let hub_cfg = t.dir.join("hub.toml");
    let (rc, code, err) = cli(
        t,
        "hub",
        &[
            "hub",
            "invite",
            name,
            "--address",
            &format!("{HUB_ADDR}:4433"),
            "--config",
            hub_cfg.to_str().context("path")?,
        ],
    )?;
    anyhow::ensure!(rc == 0, "invite {name}: {err}");
    Ok(code)
}

/// Stalls 1 and 2 on the hub, stall 3 fresh from the image (no hub yet), an echo server.
fn fresh_box_market() -> Result<Topology> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi()],
        Options {
            extra_stalls: 2,
            unlisted_stall: true,
            ..Default::default()
        },
    )?;
    t.start()?;
    t.start_echo(7000)?;
    Ok(t)
}

#[test]
fn a_fresh_box_enrolls_with_a_code_and_is_revoked_at_once() -> Result<()> {
    let t = fresh_box_market()?;
    let hub_cfg = t.dir.join("hub.toml");
    let hub_cfg = hub_cfg.to_str().context("path")?.to_string();
    let box_cfg = t.dir.join("edge3.toml");
    let box_cfg = box_cfg.to_str().context("path")?.to_string();
    let echo = format!("{SERVER}:7000");
    let client = format!("{LAN_CLIENT}:0");

    std::thread::scope(|s| -> Result<()> {
        let tr = &t;
        // Stall 2 keeps a flow running through everything below.
        let (e, c) = (&echo, &client);
        let other = s.spawn(move || tr.udp_flow_in("lan2", e, c, 200, 12.0));

        // A code the box cannot read: refused on the box, nothing sent.
        let (rc, _, err) = cli(
            tr,
            "edge3",
            &["enroll", "SN-AAAA-BBBB", "--config", &box_cfg],
        )?;
        assert_eq!(rc, 2, "{err}");
        assert!(
            err.contains("cut short") || err.contains("not an invite code"),
            "{err}"
        );

        // The organiser invites the stall.
        let code = invite(tr, "stall3")?;
        assert!(code.starts_with("SN-"), "{code}");

        // A forged code for the same hub (another secret, a valid check): the hub
        // refuses it and records nothing.
        let forged = {
            let c = stallnet::enroll::code::Code::decode(&code)?;
            let addrs: Vec<std::net::SocketAddr> = c
                .hub_addresses
                .iter()
                .map(|a| std::net::SocketAddr::V4(*a))
                .collect();
            stallnet::enroll::code::Code::encode([9; 16], &c.hub_identity, &addrs)?
        };
        let (rc, _, err) = cli(tr, "edge3", &["enroll", &forged, "--config", &box_cfg])?;
        assert_eq!(rc, 1, "{err}");
        assert!(err.contains("knows no such invite"), "{err}");
        let book = std::fs::read_to_string(tr.dir.join("hub-state/fleet.json"))?;
        assert!(!book.contains(&tr.stall_ids[1]), "{book}");

        // The real code: the box is admitted and pins the hub; its edge reloads and
        // brings the tunnel up, and its client reaches the internet.
        let (rc, out, err) = cli(tr, "edge3", &["enroll", &code, "--config", &box_cfg])?;
        assert_eq!(rc, 0, "{out}\n{err}");
        tr.wait_status("edge3", Duration::from_secs(20), |s| {
            stallnet_tests::topo::up_links(s, "hub") == 1
        })
        .with_context(|| tr.log("edge3"))?;
        let f = tr.udp_flow_in("lan3", e, c, 100, 2.0)?;
        assert_eq!(f["received"], 200, "{f}");
        // The same box with the same code again (its answer lost, say): the same answer,
        // and nothing new on the hub. (Another box with a used code: `enroll::book`.)
        let (rc, out, err) = cli(tr, "edge3", &["enroll", &code, "--config", &box_cfg])?;
        assert_eq!(rc, 0, "{out}\n{err}");
        assert!(out.contains("enrolled as stall3"), "{out}");
        let book = std::fs::read_to_string(tr.dir.join("hub-state/fleet.json"))?;
        assert_eq!(
            book.matches("\"stall3\"").count(),
            2,
            "one invite, one device: {book}"
        );

        // Revoked mid-flow: the stall's traffic stops at once and its box is refused.
        let flow = s.spawn(move || tr.udp_flow_in("lan3", e, c, 100, 4.0));
        std::thread::sleep(Duration::from_millis(1500));
        let (rc, _, err) = cli(
            tr,
            "hub",
            &["hub", "revoke", "stall3", "--config", &hub_cfg],
        )?;
        assert_eq!(rc, 0, "{err}");
        let f = flow
            .join()
            .map_err(|_| anyhow::anyhow!("flow panicked"))??;
        let got = f["received"].as_u64().unwrap_or(0);
        assert!(
            (100..=220).contains(&got),
            "about 1.5 s of 4 s got through: {f}"
        );
        let hub = tr
            .wait_status("hub", Duration::from_secs(15), |s| {
                s["bonds"].get("stall3").is_none()
                    && s["refused_handshakes"].as_u64().unwrap_or(0) > 0
            })
            .with_context(|| tr.log("edge3"))?;
        assert!(hub["bonds"].get("stall2").is_some(), "{hub}");

        // Stall 2 lost nothing while another stall joined and left.
        let o = other
            .join()
            .map_err(|_| anyhow::anyhow!("flow panicked"))??;
        assert_eq!(o["received"], o["sent"], "{o}");
        Ok(())
    })
}

/// A box flashed from the image with the organiser's code written into its SD card's
/// `stallnet.toml`: at start it keeps the code, redeems it once its uplink reaches the
/// hub, pins the hub in its config (a revision) and its LAN gets out through the tunnel.
#[test]
fn a_code_on_the_sd_card_enrolls_the_box_by_itself() -> Result<()> {
    let mut t = fresh_box_market()?;
    let code = invite(&t, "stall3")?;
    // The card is written on a laptop, and the box started from it.
    t.stop("edge3");
    let card = t.boot_dir("edge3").join("stallnet.toml");
    std::fs::write(
        &card,
        format!("# from the organiser\nenroll = \"{code}\"\n"),
    )?;
    t.run_daemon("edge3")?;
    t.wait_status("edge3", Duration::from_secs(30), |s| {
        stallnet_tests::topo::up_links(s, "hub") == 1
    })
    .with_context(|| t.log("edge3"))?;
    let f = t.udp_flow_in(
        "lan3",
        &format!("{SERVER}:7000"),
        &format!("{LAN_CLIENT}:0"),
        100,
        2.0,
    )?;
    assert_eq!(f["received"], 200, "{f}");
    // The card's file is used once; the hub is pinned in the box's config.
    assert!(!card.exists());
    let live = std::fs::read_to_string(t.dir.join("edge3.toml"))?;
    let hub_id = stallnet::enroll::code::Code::decode(&code)?.hub_identity;
    assert!(live.contains(&hub_id) && !live.contains("enroll"), "{live}");
    assert!(!t.dir.join("edge3-state/enroll-pending").exists());
    let hub = t.status("hub")?;
    let row = hub["stalls"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "stall3"))
        .with_context(|| format!("stall3 in {hub}"))?;
    assert_eq!(row["source"], "enrolled", "{row}");
    Ok(())
}

/// Resident memory of process `pid`, kB (0 when it is gone).
fn rss_kb(pid: u32) -> u64 {
    stallnet_tests::topo::rss_kb(pid).unwrap_or(0)
}

#[test]
fn a_handshake_flood_neither_starves_the_stalls_nor_swells_the_hub() -> Result<()> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi()],
        Options {
            extra_stalls: 1,
            ..Default::default()
        },
    )?;
    t.start()?;
    t.start_echo(7000)?;
    // A stranger on the internet whose handshakes never go on: the hub's answers to it
    // are dropped where it sits (its own input only; forwarded traffic passes).
    t.nft(
        "inet",
        "table inet flood { chain input { type filter hook input priority 0; udp sport 4433 drop; }\n}",
    )?;
    let pid = t.pid("hub").context("hub pid")?;
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_kb(pid);
    let tool = tool();
    let (flow, flood, peak) = std::thread::scope(|s| -> Result<_> {
        let tr = &t;
        let (echo, client) = (format!("{SERVER}:7000"), format!("{LAN_CLIENT}:0"));
        let flow = s.spawn(move || tr.udp_flow_in("lan2", &echo, &client, 200, 8.0));
        std::thread::sleep(Duration::from_secs(1));
        let tool = &tool;
        let flood = s.spawn(move || {
            tr.json(
                "inet",
                &[
                    tool,
                    "quic-flood",
                    &format!("{HUB_ADDR}:4433"),
                    "20000",
                    "4",
                ],
            )
        });
        let mut peak = before;
        while !flood.is_finished() {
            peak = peak.max(rss_kb(pid));
            std::thread::sleep(Duration::from_millis(100));
        }
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<serde_json::Value>>| {
            h.join().map_err(|_| anyhow::anyhow!("panicked"))?
        };
        let flood = join(flood)?;
        for _ in 0..20 {
            peak = peak.max(rss_kb(pid));
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok((join(flow)?, flood, peak))
    })?;
    let hub = t.status("hub")?;
    eprintln!(
        "hub RSS {before} kB before, {peak} kB at most during 20 000 half-open handshakes; handshakes {}; flood {flood}; stall flow {flow}",
        hub["handshakes"]
    );
    assert_eq!(flow["sent"], 1600, "{flow}");
    // Without the guard the stall lost 633-680 of them; with it none, on a machine
    // shared with other tests. A starved machine may lose a few, never 1 %.
    let lost = flow["lost"].as_u64().unwrap_or(u64::MAX);
    assert!(lost < 16, "the stall lost packets to the flood: {flow}");
    assert!(
        peak.saturating_sub(before) < 20_000,
        "the hub grew from {before} to {peak} kB"
    );
    assert!(
        hub["handshakes"]["retried"].as_u64().unwrap_or(0) >= 10_000,
        "{}",
        hub["handshakes"]
    );
    Ok(())
}

/// User + system CPU seconds of process `pid` so far (0 when it is gone).
fn cpu_s(pid: u32) -> f64 {
    stallnet_tests::topo::cpu_seconds(pid).unwrap_or(0.0)
}

#[test]
fn a_hundred_idle_stalls_cost_the_hub_little() -> Result<()> {
    const N: usize = 100;
    let dir = std::env::temp_dir().join(format!("stallnet-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let load = bin("stallnet-load")
        .to_str()
        .unwrap_or_default()
        .to_string();
    let d = dir.to_str().context("path")?.to_string();
    let st = std::process::Command::new(&load)
        .args(["prepare", &N.to_string(), &d])
        .status()?;
    anyhow::ensure!(st.success(), "stallnet-load prepare");
    let mut t = Topology::build(
        vec![UplinkSpec::wifi()],
        Options {
            hub_extra: Some(std::fs::read_to_string(dir.join("devices.toml"))?),
            ..Default::default()
        },
    )?;
    t.start()?;
    let pid = t.pid("hub").context("hub pid")?;
    let before = rss_kb(pid);
    let hub_id = t.hub_id.clone();
    t.spawn(
        "load",
        "inet",
        &[
            &load,
            "run",
            &format!("{HUB_ADDR}:4433"),
            &hub_id,
            &d,
            &N.to_string(),
            "40",
        ],
    )?;
    let online = |s: &serde_json::Value| {
        s["bonds"]
            .as_object()
            .map_or(0, |b| b.values().filter(|v| v["online"] == true).count())
    };
    t.wait_status("hub", Duration::from_secs(60), |s| online(s) > N)
        .with_context(|| t.log("load"))?;
    // Probes slow down once a bond has been quiet for 3 s.
    std::thread::sleep(Duration::from_secs(5));
    let c0 = cpu_s(pid);
    std::thread::sleep(Duration::from_secs(10));
    let cpu = (cpu_s(pid) - c0) / 10.0 * 100.0;
    let after = rss_kb(pid);
    let hub = t.status("hub")?;
    let per_stall_kb = after.saturating_sub(before) / N as u64;
    eprintln!("{N} idle stalls: hub CPU {cpu:.1} % of a core, RSS {before} -> {after} kB ({per_stall_kb} kB per stall)");
    let _ = std::fs::remove_dir_all(&dir);
    // Every stall's two uplinks are up, and stay so.
    assert_eq!(online(&hub), N + 1, "{}", t.log("load"));
    assert!(per_stall_kb <= 1024, "{per_stall_kb} kB per stall");
    assert!(cpu <= 25.0, "{cpu:.1} % of a core for {N} idle stalls");
    Ok(())
}

#[test]
fn a_device_added_to_the_hubs_config_joins_on_reload_without_touching_the_others() -> Result<()> {
    let t = fresh_box_market()?;
    let hub_cfg = t.dir.join("hub.toml");
    let box_cfg = t.dir.join("edge3.toml");
    let (hub_path, box_path) = (
        hub_cfg.to_str().context("path")?.to_string(),
        box_cfg.to_str().context("path")?.to_string(),
    );
    // Stall 3 pins the hub, which does not list it yet: refused in the handshake.
    let pin = format!(
        "edge.hubs=[{{ address = \"{HUB_ADDR}:4433\", identity = \"{}\" }}]",
        t.hub_id
    );
    let (rc, _, err) = cli(
        &t,
        "edge3",
        &[
            "config",
            "set",
            &pin,
            "--confirm",
            "0",
            "--config",
            &box_path,
        ],
    )?;
    assert_eq!(rc, 0, "{err}");
    t.wait_status("hub", Duration::from_secs(10), |s| {
        s["refused_handshakes"].as_u64().unwrap_or(0) > 0
    })?;
    let (echo, client) = (format!("{SERVER}:7000"), format!("{LAN_CLIENT}:0"));
    std::thread::scope(|s| -> Result<()> {
        let tr = &t;
        let (e, c) = (&echo, &client);
        let other = s.spawn(move || tr.udp_flow_in("lan2", e, c, 200, 8.0));
        std::thread::sleep(Duration::from_millis(500));
        // The organiser lists it and reloads: it joins, nobody else notices.
        let mut text = std::fs::read_to_string(&hub_cfg)?;
        text.push_str(&format!(
            "\n[[hub.devices]]\nname = \"stall3\"\nidentity = \"{}\"\nlan = [\"10.1.0.0/24\"]\n",
            tr.stall_ids[1]
        ));
        std::fs::write(&hub_cfg, text)?;
        let (rc, out, err) = cli(tr, "hub", &["reload", "--config", &hub_path])?;
        assert_eq!(rc, 0, "{out}{err}");
        assert!(out.contains("added: stall3"), "{out}");
        tr.wait_status("edge3", Duration::from_secs(10), |s| {
            stallnet_tests::topo::up_links(s, "hub") == 1
        })
        .with_context(|| tr.log("edge3"))?;
        let f = tr.udp_flow_in("lan3", e, c, 100, 1.0)?;
        assert_eq!(f["received"], 100, "{f}");
        // Taken out of the config again: its tunnel closes at once.
        let text = std::fs::read_to_string(&hub_cfg)?;
        let cut = text
            .find("\n[[hub.devices]]\nname = \"stall3\"")
            .context("stall3 entry")?;
        std::fs::write(&hub_cfg, &text[..cut])?;
        let (rc, out, err) = cli(tr, "hub", &["reload", "--config", &hub_path])?;
        assert_eq!(rc, 0, "{out}{err}");
        assert!(out.contains("removed: stall3"), "{out}");
        tr.wait_status("hub", Duration::from_secs(5), |s| {
            s["bonds"].get("stall3").is_none()
        })?;
        let o = other
            .join()
            .map_err(|_| anyhow::anyhow!("flow panicked"))??;
        assert_eq!(o["received"], o["sent"], "stall 2 lost packets: {o}");
        Ok(())
    })
}

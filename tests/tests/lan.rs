//! End-to-end: the config's `[lan]` applied by a real edge in the netns topology: a
//! bridge over the LAN port with exactly the configured address (read back from the
//! kernel; the port's own address removed), the rendered dnsmasq handing out a real DHCP
//! lease (busybox udhcpc as the client), and a reload with the same config changes nothing.
//!
//! A guest segment on a port of its own: guests reach the internet (through the tunnel)
//! and nothing else — not the POS terminal, not the LAN API, not the metrics — while the
//! LAN reaches all of them (the rendered nftables firewall).
//!
//! VLANs are not exercised here: this machine's kernel has no 802.1Q support (creating a
//! VLAN link fails with "Unknown device type"); their checks and rendering are unit-tested.

use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_tests::topo::{bin, wait_for, Options, Topology, UplinkSpec};

/// The IPv4 addresses (with prefix) on `dev` in namespace `role`.
fn addrs(t: &Topology, role: &str, dev: &str) -> Result<Vec<String>> {
    let out = t.exec(role, &["ip", "-j", "-4", "addr", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut list: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
        .collect();
    list.sort();
    Ok(list)
}

/// `ip -j ARGS` in the edge namespace, as compact JSON text.
fn kernel(t: &Topology, args: &[&str]) -> Result<String> {
    let mut a = vec!["ip", "-j", "-4"];
    a.extend_from_slice(args);
    let out = t.exec("edge", &a)?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.to_string())
}

/// One DHCP exchange from `dev` in the LAN namespace; the leased address.
fn dhcp(t: &Topology, dev: &str) -> Result<String> {
    let out = t.exec(
        "lan",
        &[
            "busybox",
            "udhcpc",
            "-i",
            dev,
            "-n",
            "-q",
            "-f",
            "-t",
            "5",
            "-T",
            "1",
            "-s",
            "/bin/true",
        ],
    )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| {
            l.split("lease of ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_string)
        })
        .with_context(|| format!("no lease on {dev}: {text}"))
}

#[test]
fn the_lan_is_applied_exactly_and_dnsmasq_hands_out_leases() -> Result<()> {
    let dir_hint = std::env::temp_dir().join(format!("sn-lan-leases-{}", std::process::id()));
    let leases = dir_hint.join("dnsmasq.leases");
    let lan = "\n[lan]\ninterface = \"br0\"\nports = [\"lan0\"]\naddress = \"10.1.0.1/24\"\n\
        dhcp = { start = \"10.1.0.100\", end = \"10.1.0.150\", lease = \"1h\" }\n\
        dns_servers = [\"198.18.0.1\"]\n\
        reservations = [{ mac = \"02:00:00:00:00:10\", address = \"10.1.0.10\", name = \"reader\" }]\n";
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options {
            edge_fields: Some(format!("dhcp_leases = \"{}\"", leases.display())),
            edge_extra: Some(lan.into()),
            ..Options::default()
        },
    )?;
    // A stale address the config does not name: the daemon removes it.
    t.exec(
        "edge",
        &["ip", "addr", "add", "10.1.0.99/24", "dev", "lan0"],
    )?;
    t.start()?;

    assert_eq!(addrs(&t, "edge", "br0")?, ["10.1.0.1/24"]);
    assert!(
        addrs(&t, "edge", "lan0")?.is_empty(),
        "the port keeps no address"
    );
    let conf = std::fs::read_to_string(t.dir.join("edge-run/dnsmasq.conf"))?;
    assert!(
        conf.contains("rebind-domain-ok=/stripe-terminal-local-reader.net/"),
        "{conf}"
    );
    // The LAN still works through the bridge.
    let ping = t.exec("lan", &["ping", "-c", "1", "-W", "2", "10.1.0.1"])?;
    assert!(ping.status.success());

    // A real DHCP exchange on the LAN.
    let got = dhcp(&t, "eth0")?;
    let n: u8 = got.rsplit('.').next().unwrap_or("").parse()?;
    assert!(
        got.starts_with("10.1.0.") && (100..=150).contains(&n),
        "{got}"
    );
    wait_for(Duration::from_secs(3), || {
        Ok(std::fs::read_to_string(&leases)
            .unwrap_or_default()
            .contains(&got))
    })?;

    // The policy rules and routes the edge installs, read back from the kernel.
    let rules = kernel(&t, &["rule", "show"])?;
    // Exactly these: the kernel's three, a mark rule per uplink, LAN-bound traffic local,
    // LAN traffic into the tunnel table.
    assert_eq!(
        rules,
        concat!(
            r#"[{"priority":0,"src":"all","table":"local"},"#,
            r#"{"fwmark":"0xc9","priority":100,"src":"all","table":"201"},"#,
            r#"{"fwmark":"0xca","priority":101,"src":"all","table":"202"},"#,
            r#"{"dst":"10.1.0.0","dstlen":24,"priority":999,"src":"all","table":"main"},"#,
            r#"{"priority":1000,"src":"10.1.0.0","srclen":24,"table":"200"},"#,
            r#"{"priority":32766,"src":"all","table":"main"},"#,
            r#"{"priority":32767,"src":"all","table":"default"}]"#
        )
    );
    let tunnel = kernel(&t, &["route", "show", "table", "200"])?;
    assert_eq!(
        tunnel,
        r#"[{"dev":"stall0","dst":"default","flags":[],"protocol":"static"}]"#
    );
    let uplinks = (
        kernel(&t, &["route", "show", "table", "201"])?,
        kernel(&t, &["route", "show", "table", "202"])?,
    );
    assert!(
        uplinks.0.contains(r#""dev":"wan1""#) && uplinks.1.contains(r#""dev":"wan2""#),
        "{uplinks:?}"
    );

    // Reloading the same config changes nothing: same addresses, rules, routes, firewall
    // and dnsmasq process.
    let nft_before = String::from_utf8(
        t.exec("edge", &["nft", "list", "table", "inet", "stallnet_fw"])?
            .stdout,
    )?;
    let pid = std::fs::read_to_string(t.dir.join("edge-run/dnsmasq.pid"))?;
    let out = std::process::Command::new(bin("stallnet"))
        .args(["reload", "--runtime-dir"])
        .arg(t.dir.join("edge-run"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(addrs(&t, "edge", "br0")?, ["10.1.0.1/24"]);
    assert_eq!(
        std::fs::read_to_string(t.dir.join("edge-run/dnsmasq.pid"))?,
        pid
    );
    assert_eq!(kernel(&t, &["rule", "show"])?, rules);
    assert_eq!(kernel(&t, &["route", "show", "table", "200"])?, tunnel);
    let nft_after = String::from_utf8(
        t.exec("edge", &["nft", "list", "table", "inet", "stallnet_fw"])?
            .stdout,
    )?;
    assert_eq!(nft_after, nft_before);

    // An apply that fails half-way (a port that does not exist: valid on paper, refused by
    // the kernel) changes nothing: the daemon puts the LAN back, the file stays as it was.
    let live = t.dir.join("edge.toml");
    let running = std::fs::read_to_string(&live)?;
    let bad = t.dir.join("bad-port.toml");
    std::fs::write(
        &bad,
        running.replace("ports = [\"lan0\"]", "ports = [\"lan0\", \"nope0\"]"),
    )?;
    let out = std::process::Command::new(bin("stallnet"))
        .args(["config", "apply"])
        .arg(&bad)
        .arg("--config")
        .arg(&live)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nope0") && err.contains("unchanged"), "{err}");
    assert_eq!(std::fs::read_to_string(&live)?, running);
    assert_eq!(addrs(&t, "edge", "br0")?, ["10.1.0.1/24"]);
    assert!(ping_ok(&t, "lan", "10.1.0.1"));
    assert_eq!(
        std::fs::read_to_string(t.dir.join("edge-run/dnsmasq.pid"))?,
        pid
    );
    let _ = std::fs::remove_dir_all(&dir_hint);
    Ok(())
}

/// `curl` from `role`: true when an HTTP answer came back within 2 s.
fn http_ok(t: &Topology, role: &str, url: &str) -> bool {
    t.exec(
        role,
        &["curl", "-sS", "-o", "/dev/null", "--max-time", "2", url],
    )
    .is_ok()
}

fn ping_ok(t: &Topology, role: &str, to: &str) -> bool {
    t.exec(role, &["ping", "-c", "1", "-W", "1", to]).is_ok()
}

#[test]
fn guests_reach_the_internet_and_nothing_else() -> Result<()> {
    let key = "till-guest-test-key-0123456789";
    let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()));
    let extra = format!(
        "\n[lan]\ninterface = \"lan0\"\naddress = \"10.1.0.1/24\"\n\
         [[lan.segments]]\nname = \"guests\"\npurpose = \"guest\"\ninterface = \"guest0\"\n\
         address = \"10.30.0.1/24\"\n\
         \n[commerce]\nlisten = \"10.1.0.1:8080\"\ndeny_from = [\"10.30.0.0/24\"]\n\
         clients = [{{ name = \"till\", key_sha256 = \"{hash}\" }}]\n\
         \n[metrics]\nlisten = \"10.1.0.1:9108\"\n"
    );
    let leases = std::env::temp_dir().join(format!("sn-guest-leases-{}", std::process::id()));
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options {
            edge_fields: Some(format!("dhcp_leases = \"{}/leases\"", leases.display())),
            edge_extra: Some(extra),
            extra_lan: Some("10.30.0.0/24"),
            ..Options::default()
        },
    )?;
    t.add_host("guest", "guest0", "eth0", "10.30.0.2/24", "10.30.0.1")?;
    t.start()?;

    // The LAN reaches the box's API and metrics, and the internet.
    assert!(
        http_ok(&t, "lan", "http://10.1.0.1:9108/metrics"),
        "metrics from the LAN"
    );
    assert!(
        http_ok(&t, "lan", "http://10.1.0.1:8080/v1/openapi.json"),
        "API from the LAN"
    );
    assert!(ping_ok(&t, "lan", stallnet_tests::topo::SERVER));
    // Guests reach the internet through the tunnel...
    assert!(
        ping_ok(&t, "guest", stallnet_tests::topo::SERVER),
        "internet from guests"
    );
    // ... and nothing else.
    assert!(
        !http_ok(&t, "guest", "http://10.1.0.1:9108/metrics"),
        "metrics from guests"
    );
    assert!(
        !http_ok(&t, "guest", "http://10.1.0.1:8080/v1/openapi.json"),
        "API from guests"
    );
    assert!(
        !ping_ok(&t, "guest", stallnet_tests::topo::POS_CLIENT),
        "POS from guests"
    );
    assert!(
        !ping_ok(&t, "guest", stallnet_tests::topo::LAN_CLIENT),
        "LAN from guests"
    );
    // The table is stallnet's own and complete.
    let nft = t.exec("edge", &["nft", "list", "table", "inet", "stallnet_fw"])?;
    let text = String::from_utf8_lossy(&nft.stdout);
    assert!(text.contains("policy drop"), "{text}");
    let _ = std::fs::remove_dir_all(&leases);
    Ok(())
}

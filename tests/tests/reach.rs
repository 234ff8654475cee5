//! End-to-end: the reachability checks of a real edge in the netns topology, against a
//! check server on the test internet (plain HTTP 204 and HTTPS with a test CA) and the
//! venue tricks played in the wifi ISP's namespace:
//! - a captive portal (every HTTP request redirected; a faithful stand-in for a venue's)
//!   turns wifi `captive` within 10 s and traffic leaves it; `stallnet uplink login`
//!   lets one LAN device reach the portal directly; clearing the portal brings wifi back
//!   and closes the login window;
//! - forged DNS (the ISP answers every name) likewise;
//! - HTTPS blocked: wifi stays in the bond but stops carrying payments.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_tests::topo::{
    any_link, bin, hub_tx, link_state, uplink_events, Options, Topology, UplinkSpec, LAN_CLIENT,
    POS_CLIENT, SERVER,
};

const CHECK_HOST: &str = "check.stallnet.test";

fn link<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["bonds"]["hub"]["links"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

fn ctl(t: &Topology, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(bin("stallnet"))
        .args(args)
        .arg("--runtime-dir")
        .arg(t.dir.join("edge-run"))
        .output()?)
}

/// What a plain-HTTP GET of the check URL from the LAN client gets: `204` through the
/// tunnel, the portal's `302` when it goes straight out of wifi.
fn lan_http(t: &Topology) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &t.ns("lan")])
        .args(["curl", "-s", "-o", "/dev/null", "-m", "3"])
        .args(["--interface", LAN_CLIENT, "-w", "%{http_code}"])
        .arg(format!("http://{SERVER}/generate_204"))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn clean(s: &serde_json::Value, name: &str) -> bool {
    let r = &link(s, name)["reachability"];
    link_state(s, name) == "up" && r["portal"] == "clear" && r["https"] == "verified"
}

#[test]
fn portals_forged_dns_and_broken_https_are_caught_through_each_uplink() -> Result<()> {
    let ca_dir = std::env::temp_dir().join(format!("stallnet-reach-{}", std::process::id()));
    std::fs::create_dir_all(&ca_dir)?;
    let ca = ca_dir.join("ca.pem");
    let _ = std::fs::remove_file(&ca);
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options {
            reachability: Some(format!(
                "{{ portal_url = \"http://{CHECK_HOST}/generate_204\", https_url = \
                 \"https://{CHECK_HOST}/\", dns = [\"{SERVER}\"], ca_file = \"{}\", \
                 interval_s = 2, https_interval_s = 5 }}",
                ca.display()
            )),
            ..Options::default()
        },
    )?;
    t.start_dns(&[(CHECK_HOST, SERVER)])?;
    let traffic = bin("stallnet-traffic");
    let traffic = traffic.to_str().context("path")?;
    let dir = ca_dir.to_str().context("path")?;
    t.spawn(
        "check",
        "inet",
        &[traffic, "check-server", SERVER, dir, CHECK_HOST],
    )?;
    stallnet_tests::topo::wait_for(Duration::from_secs(5), || Ok(ca.exists()))?;
    t.start()?;
    t.start_echo(7001)?;
    let s = t
        .wait_status("edge", Duration::from_secs(15), |s| {
            clean(s, "wifi") && clean(s, "cell")
        })
        .context("both uplinks pass the checks")?;
    assert_eq!(link(&s, "wifi")["carries_pos"], true);
    assert_eq!(lan_http(&t)?, "204", "through the tunnel");

    // A captive portal at the venue: wifi is held out within 10 s.
    t.spawn("portal", "isp1", &[traffic, "portal", "100.64.1.1:8080"])?;
    t.nft(
        "isp1",
        "table ip portal { chain pre { type nat hook prerouting priority dstnat; \
         iifname \"cust\" tcp dport 80 dnat to 100.64.1.1:8080\n }\n}",
    )?;
    let s = t
        .wait_status("edge", Duration::from_secs(10), |s| {
            link_state(s, "wifi") == "captive"
        })
        .context("portal noticed within 10 s")?;
    assert_eq!(
        link(&s, "wifi")["reachability"]["portal_location"],
        "http://portal.venue.test/login?continue=1"
    );
    assert_eq!(s["state"], "degraded");
    let out = ctl(&t, &["uplinks"])?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("captive") && table.contains("stallnet uplink login wifi"),
        "{table}"
    );
    // Traffic leaves it: a flow is carried whole by cell, wifi carries nothing.
    let wifi_tx = link(&t.status("edge")?, "wifi")["tx_packets"]
        .as_u64()
        .context("tx")?;
    let flow = t.udp_flow(LAN_CLIENT, 7001, 50, 3.0)?;
    assert!(flow["received"].as_u64().unwrap_or(0) >= 145, "{flow}");
    let wifi_tx_after = link(&t.status("edge")?, "wifi")["tx_packets"]
        .as_u64()
        .context("tx")?;
    assert_eq!(wifi_tx_after, wifi_tx, "a captive uplink carries nothing");

    // The operator's phone signs in: it goes straight out of wifi (and meets the portal).
    let out = ctl(
        &t,
        &[
            "uplink",
            "login",
            "wifi",
            "--device",
            LAN_CLIENT,
            "--minutes",
            "2",
        ],
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lan_http(&t)?,
        "302",
        "the phone reaches the portal directly"
    );
    let out = ctl(&t, &["uplink", "login", "wifi", "--device", "192.0.2.7"])?;
    assert!(!out.status.success(), "a device off the LAN is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not on the LAN"));

    // Signed in (the portal goes away): wifi is back, the window closes on its own.
    t.nft("isp1", "delete table ip portal")?;
    t.wait_status("edge", Duration::from_secs(15), |s| clean(s, "wifi"))
        .context("wifi back after the portal cleared")?;
    stallnet_tests::topo::wait_for(Duration::from_secs(5), || {
        Ok(uplink_events(&t, "wifi")?
            .iter()
            .any(|e| e == "uplink_login_closed"))
    })?;
    assert_eq!(lan_http(&t)?, "204", "the phone is back in the tunnel");
    let rules = t.exec("edge", &["ip", "rule", "show"])?;
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains(LAN_CLIENT),
        "login rule removed"
    );

    // Forged DNS: the ISP answers every name with its own address.
    let pid = t.dir.join("isp1-dns.pid");
    let pid = format!("--pid-file={}", pid.display());
    t.spawn(
        "isp-dns",
        "isp1",
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=100.64.1.1",
            "--address=/#/100.64.1.1",
            &pid,
        ],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    t.nft(
        "isp1",
        "table ip hijack { chain pre { type nat hook prerouting priority dstnat; \
         iifname \"cust\" udp dport 53 dnat to 100.64.1.1\n }\n}",
    )?;
    let s = t
        .wait_status("edge", Duration::from_secs(10), |s| {
            link_state(s, "wifi") == "hijacked"
        })
        .context("forged DNS noticed within 10 s")?;
    assert_eq!(
        link(&s, "wifi")["reachability"]["forged_answer"],
        "100.64.1.1"
    );
    t.nft("isp1", "delete table ip hijack")?;
    t.wait_status("edge", Duration::from_secs(15), |s| clean(s, "wifi"))
        .context("wifi back after DNS is honest again")?;

    // HTTPS blocked at the venue: wifi stays in the bond, payments leave it.
    t.nft(
        "isp1",
        "table ip nohttps { chain block { type filter hook forward priority filter; \
         tcp dport 443 reject with tcp reset\n }\n}",
    )?;
    let s = t
        .wait_status("edge", Duration::from_secs(20), |s| {
            link(s, "wifi")["reachability"]["https"] == "failing"
        })
        .context("HTTPS failure noticed")?;
    assert_eq!(link_state(&s, "wifi"), "up");
    assert_eq!(link(&s, "wifi")["carries_pos"], false);
    assert_eq!(link(&s, "cell")["carries_pos"], true);
    // The hub hears it on the running connection: the replies to the till avoid wifi too.
    t.wait_status("hub", Duration::from_secs(3), |s| {
        any_link(s, "wifi")["carries_pos"] == false && any_link(s, "cell")["carries_pos"] == true
    })
    .context("the hub heard that wifi carries no POS")?;
    let wifi_tx = link(&t.status("edge")?, "wifi")["tx_packets"]
        .as_u64()
        .context("tx")?;
    let wifi_down = hub_tx(&t, "wifi")?;
    let flow = t.udp_flow(POS_CLIENT, 7001, 50, 2.0)?;
    assert!(flow["received"].as_u64().unwrap_or(0) >= 95, "{flow}");
    let wifi_tx_after = link(&t.status("edge")?, "wifi")["tx_packets"]
        .as_u64()
        .context("tx")?;
    assert!(
        wifi_tx_after - wifi_tx < 10,
        "payments avoid the unverified uplink ({} packets on wifi)",
        wifi_tx_after - wifi_tx
    );
    let wifi_down_after = hub_tx(&t, "wifi")?;
    eprintln!(
        "figure: POS with wifi unverified: {} packets up wifi, {} down wifi, {} of 100 echoed",
        wifi_tx_after - wifi_tx,
        wifi_down_after - wifi_down,
        flow["received"]
    );
    assert!(
        wifi_down_after - wifi_down < 10,
        "the replies avoid the unverified uplink ({} packets down wifi)",
        wifi_down_after - wifi_down
    );
    t.nft("isp1", "delete table ip nohttps")?;
    t.wait_status("edge", Duration::from_secs(15), |s| {
        link(s, "wifi")["carries_pos"] == true
    })?;
    t.wait_status("hub", Duration::from_secs(3), |s| {
        any_link(s, "wifi")["carries_pos"] == true
    })
    .context("the hub heard that wifi carries POS again")?;

    // No ModemManager here: the cellular uplink's modem facts say unknown, not zero.
    let s = t.status("edge")?;
    assert_eq!(link(&s, "cell")["modem"]["source"], "unknown", "{s}");
    assert!(link(&s, "cell")["modem"]["rsrp_dbm"].is_null());
    assert!(link(&s, "wifi")["modem"].is_null(), "wifi has no modem");
    let ev = uplink_events(&t, "wifi")?;
    for kind in [
        "uplink_captive",
        "uplink_login",
        "uplink_portal_cleared",
        "uplink_login_closed",
        "uplink_dns_hijacked",
        "uplink_unverified",
        "uplink_verified",
    ] {
        assert!(ev.iter().any(|e| e == kind), "no {kind} event in {ev:?}");
    }
    let _ = std::fs::remove_dir_all(&ca_dir);
    Ok(())
}

//! End-to-end: a data cap on the cellular uplink of a real edge in the netns topology:
//! the count matches the bytes the interface saw (within 2 %), 75/95/100 % raise events,
//! at 100 % the configured action switches the uplink off, and the count survives a
//! daemon restart (the uplink stays off); with `backup-only` the uplink becomes a backup
//! for the hub's downloads as well as the edge's uploads.

use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_tests::topo::{
    any_link, hub_tx, link_state, uplink_events, Options, Topology, UplinkSpec, LAN_CLIENT,
};

/// rx + tx bytes of `dev` in the edge namespace, as the kernel counts them.
fn iface_bytes(t: &Topology, dev: &str) -> Result<u64> {
    let mut total = 0;
    for f in ["rx_bytes", "tx_bytes"] {
        let out = t.exec(
            "edge",
            &["cat", &format!("/sys/class/net/{dev}/statistics/{f}")],
        )?;
        total += String::from_utf8(out.stdout)?.trim().parse::<u64>()?;
    }
    Ok(total)
}

fn cap_used(s: &serde_json::Value) -> Option<u64> {
    s["bonds"]["hub"]["links"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == "cell")?["cap"]["used_bytes"]
        .as_u64()
}

/// Wifi and a SIM with `cap` (its fields), an echo server, and everything on the SIM:
/// wifi silently dead.
fn sim_only(cap: &str) -> Result<Topology> {
    // Appended right after the last [[edge.uplinks]] table: the cellular one.
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options {
            edge_extra: Some(format!("cap = {{ {cap} }}\n")),
            ..Options::default()
        },
    )?;
    t.start()?;
    t.start_echo(7001)?;
    t.isp_blackhole(1, true)?;
    t.wait_status("edge", Duration::from_secs(10), |s| {
        link_state(s, "wifi") != "up"
    })?;
    Ok(t)
}

#[test]
fn a_capped_sim_is_counted_warned_about_and_switched_off() -> Result<()> {
    let mut t = sim_only("bytes = \"2MB\", period = \"daily\", action = \"off\"")?;
    let s = t.wait_status("edge", Duration::from_secs(5), |s| cap_used(s).is_some())?;
    let (u0, k0) = (cap_used(&s).context("cap")?, iface_bytes(&t, "wan2")?);

    // ~0.6 MB both ways: counted like the kernel counts it.
    let flow = t.udp_flow_sized(LAN_CLIENT, 7001, 100, 3.0, 1000)?;
    assert!(flow["received"].as_u64().unwrap_or(0) > 250, "{flow}");
    std::thread::sleep(Duration::from_secs(2));
    let s = t.status("edge")?;
    let (u1, k1) = (cap_used(&s).context("cap")?, iface_bytes(&t, "wan2")?);
    let (counted, kernel) = ((u1 - u0) as f64, (k1 - k0) as f64);
    assert!(kernel > 500_000.0, "too little traffic to judge: {kernel}");
    assert!(
        (counted - kernel).abs() / kernel <= 0.02,
        "counted {counted} bytes, the interface saw {kernel}"
    );

    // Past the allowance: warnings, then the SIM is switched off.
    let _ = t.udp_flow_sized(LAN_CLIENT, 7001, 300, 4.0, 1000);
    let s = t.wait_status("edge", Duration::from_secs(5), |s| {
        link_state(s, "cell") == "disabled"
    })?;
    let used = cap_used(&s).context("cap")?;
    assert!(used >= 2_000_000, "{used}");
    let kinds = uplink_events(&t, "cell")?;
    assert_eq!(
        kinds
            .iter()
            .filter(|k| k.starts_with("cap_"))
            .collect::<Vec<_>>(),
        ["cap_warning", "cap_warning", "cap_reached"],
        "{kinds:?}"
    );

    // A restart keeps the count, and the uplink stays off.
    t.stop("edge");
    t.start_edge()?;
    let s = t.wait_status("edge", Duration::from_secs(10), |s| {
        cap_used(s).is_some_and(|u| u >= used) && link_state(s, "cell") == "disabled"
    })?;
    assert!(cap_used(&s).unwrap_or(0) >= used);
    Ok(())
}

/// A SIM past its allowance with `action = "backup-only"` carries traffic only when
/// nothing else can — both ways: the hub hears it on the running connection and sends
/// the downloads down wifi once wifi works again.
#[test]
fn a_capped_sim_becomes_a_backup_for_the_hub_too() -> Result<()> {
    // Everything on the SIM until its allowance is gone; it keeps carrying (nothing else
    // can), now as a backup.
    let t = sim_only("bytes = \"300KB\", period = \"daily\", action = \"backup-only\"")?;
    let pid = t.pid("edge");
    let flow = t.udp_flow_sized(LAN_CLIENT, 7001, 200, 2.0, 1000)?;
    assert!(flow["received"].as_u64().unwrap_or(0) > 300, "{flow}");
    t.wait_status("edge", Duration::from_secs(5), |s| {
        any_link(s, "cell")["backup"] == true && cap_used(s).is_some_and(|u| u >= 300_000)
    })
    .context("the SIM is a backup past its allowance")?;
    t.wait_status("hub", Duration::from_secs(3), |s| {
        any_link(s, "cell")["backup"] == true
    })
    .context("the hub heard it")?;
    let kinds = uplink_events(&t, "cell")?;
    assert!(kinds.iter().any(|k| k == "cap_reached"), "{kinds:?}");

    // Wifi back: both directions leave the SIM alone.
    t.isp_blackhole(1, false)?;
    t.wait_status("edge", Duration::from_secs(15), |s| {
        link_state(s, "wifi") == "up"
    })?;
    let (up0, down0) = (
        any_link(&t.status("edge")?, "cell")["tx_packets"]
            .as_u64()
            .unwrap_or(0),
        hub_tx(&t, "cell")?,
    );
    let flow = t.udp_flow(LAN_CLIENT, 7001, 100, 2.0)?;
    assert!(flow["received"].as_u64().unwrap_or(0) >= 195, "{flow}");
    let (up1, down1) = (
        any_link(&t.status("edge")?, "cell")["tx_packets"]
            .as_u64()
            .unwrap_or(0),
        hub_tx(&t, "cell")?,
    );
    eprintln!(
        "figure: capped SIM with wifi back: {} packets up, {} down, {} of 200 echoed",
        up1 - up0,
        down1 - down0,
        flow["received"]
    );
    assert!(
        up1 - up0 < 10 && down1 - down0 < 10,
        "the SIM carried {} packets up and {} down with wifi working",
        up1 - up0,
        down1 - down0
    );
    assert_eq!(t.pid("edge"), pid, "no restart");
    Ok(())
}

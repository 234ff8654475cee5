//! Two hubs, one bond: the real `stallnet` binary as edge and two hubs in network
//! namespaces. Every uplink uses the same hub; an uplink that cannot reach it is down,
//! not split off to the other hub; the whole bond moves when its hub is silent on every
//! uplink, payments go on through the other hub, and the bond stays there when the first
//! hub returns. Needs root; fails loudly without it.

use std::time::{Duration, Instant};

use anyhow::Result;
use stallnet_tests::topo::{
    link_state, up_links, Options, Topology, UplinkSpec, HUB2_ADDR, HUB_ADDR, POS_CLIENT,
};

/// Uplinks with a live connection in any bond of a hub's status document.
fn connected(s: &serde_json::Value) -> usize {
    s["bonds"]
        .as_object()
        .into_iter()
        .flat_map(|b| b.values())
        .flat_map(|b| b["links"].as_array().cloned().unwrap_or_default())
        .filter(|l| l["connected"] == true)
        .count()
}

/// Drops everything ISP `isp` forwards to hub A (a silent black hole of that hub on that
/// uplink only; the uplink itself keeps working).
fn hole_to_hub_a(t: &Topology, isp: usize, on: bool) -> Result<()> {
    let ns = format!("isp{isp}");
    if on {
        t.nft(
            &ns,
            &format!(
                "table inet hub_a_hole {{ chain f {{ type filter hook forward priority 0; ip daddr {HUB_ADDR} drop; }}\n}}"
            ),
        )
    } else {
        t.nft(&ns, "delete table inet hub_a_hole")
    }
}

#[test]
fn the_bond_uses_one_hub_and_moves_whole_when_that_hub_is_gone() -> Result<()> {
    let mut t = Topology::build(
        vec![UplinkSpec::wifi(), UplinkSpec::cell()],
        Options {
            second_hub: true,
            ..Options::default()
        },
    )?;
    t.start()?;
    t.start_echo(7001)?;
    let (hub_a, hub_b) = (format!("{HUB_ADDR}:4433"), format!("{HUB2_ADDR}:4433"));
    assert_eq!(t.status("edge")?["peer"], hub_a.as_str());
    t.wait_status("hub", Duration::from_secs(5), |s| connected(s) == 2)?;
    assert_eq!(connected(&t.status("hub2")?), 0, "nothing on hub B");

    // Hub A unreachable through wifi only: wifi is down, nothing goes to hub B, not
    // even after wifi's connection has timed out and its attempts have failed.
    hole_to_hub_a(&t, 1, true)?;
    t.wait_status("edge", Duration::from_secs(5), |s| {
        link_state(s, "wifi") == "down"
    })?;
    std::thread::sleep(Duration::from_secs(14));
    let s = t.status("edge")?;
    assert_eq!(s["peer"], hub_a.as_str(), "{s}");
    assert_eq!(link_state(&s, "cell"), "up", "{s}");
    assert_eq!(connected(&t.status("hub2")?), 0, "the bond split: {s}");
    hole_to_hub_a(&t, 1, false)?;
    t.wait_status("edge", Duration::from_secs(20), |s| up_links(s, "hub") == 2)?;

    // Hub A silent on every uplink while payments run: the whole bond moves to hub B.
    let moved = std::thread::scope(|scope| -> Result<(Duration, serde_json::Value)> {
        let pos = scope.spawn(|| t.udp_flow(POS_CLIENT, 7001, 50, 30.0));
        std::thread::sleep(Duration::from_secs(2));
        hole_to_hub_a(&t, 1, true)?;
        hole_to_hub_a(&t, 2, true)?;
        let start = Instant::now();
        t.wait_status("edge", Duration::from_secs(20), |s| {
            s["peer"] == hub_b.as_str() && up_links(s, "hub") == 2
        })?;
        let took = start.elapsed();
        let flow = pos
            .join()
            .map_err(|_| anyhow::anyhow!("the POS flow panicked"))??;
        Ok((took, flow))
    })?;
    let (took, flow) = moved;
    eprintln!("moved to hub B in {took:?}; POS during the move: {flow}");
    assert!(took <= Duration::from_secs(15), "the move took {took:?}");
    assert_eq!(connected(&t.status("hub2")?), 2);
    // Payments stopped only while no hub was reachable (the move) and came back after.
    let lost = flow["lost"].as_u64().unwrap_or(u64::MAX);
    let sent = flow["sent"].as_u64().unwrap_or(0);
    assert!(
        sent > 1000 && lost <= 50 * 16,
        "POS during the move: {flow}"
    );
    let after = t.udp_flow(POS_CLIENT, 7001, 50, 3.0)?;
    assert_eq!(after["lost"], 0, "POS through hub B: {after}");

    // Hub A back: the bond stays on hub B (moving back would cut every flow again).
    hole_to_hub_a(&t, 1, false)?;
    hole_to_hub_a(&t, 2, false)?;
    std::thread::sleep(Duration::from_secs(8));
    let s = t.status("edge")?;
    assert_eq!(s["peer"], hub_b.as_str(), "{s}");
    assert_eq!(up_links(&s, "hub"), 2, "{s}");
    assert_eq!(connected(&t.status("hub")?), 0, "the bond split back: {s}");
    Ok(())
}

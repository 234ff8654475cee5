//! End-to-end: the real `stallnet` binary as edge and hub in network namespaces, uplinks
//! through the userspace link emulator, real QUIC, real TUN devices. Needs root; fails
//! loudly without it.

use std::time::Duration;

use anyhow::Result;
use stallnet_tests::topo::{
    link_state, up_links, Options, Topology, UplinkSpec, LAN_CLIENT, POS_CLIENT, SERVER,
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

//! The edge's firewall, rendered from the config as one nftables script that replaces the
//! `inet stallnet_fw` table in a single transaction (nft applies a file atomically):
//!
//! - guests (segments with `purpose = "guest"`) reach the internet and nothing else: not
//!   the LAN or POS segments, not the box (except DHCP and DNS), so not the LAN API or the
//!   metrics;
//! - the LAN API and the metrics answer only from the LAN and the non-guest segments;
//! - on uplinks nothing is accepted inbound except replies to the box's own connections
//!   (the tunnel is an outgoing QUIC connection) and the ICMP errors path MTU needs;
//! - the LAN side's traffic is forwarded (into the tunnel, or out of an uplink in the
//!   direct fallback); nothing is forwarded into the LAN side unless it answers it.

use std::net::SocketAddr;

use crate::grammar::{is_iface_name, require, Unwritable, IFACE_EXPECTED};
use crate::lan::{LanConfig, Purpose};

/// The nftables table stallnet owns.
pub const TABLE: &str = "stallnet_fw";

/// What the firewall needs to know besides `[lan]`.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// The LAN API's address (`commerce.listen`).
    pub api: Option<SocketAddr>,
    /// The metrics address (`metrics.listen`).
    pub metrics: Option<SocketAddr>,
    /// Source prefixes to treat as guests wherever they come from (`commerce.deny_from`).
    pub guest_prefixes: Vec<ipnet::IpNet>,
}

fn set(items: &[String]) -> String {
    format!("{{ {} }}", items.join(", "))
}

fn quoted(names: &[String]) -> Vec<String> {
    names.iter().map(|n| format!("\"{n}\"")).collect()
}

/// The script: (re)creates the table with its chains. Interface names are written
/// quoted, and only names that cannot close the quote or end the line are written.
pub fn render(lan: &LanConfig, inputs: &Inputs) -> Result<String, Unwritable> {
    require(
        "the nft ruleset",
        "LAN interface",
        &lan.interface,
        is_iface_name,
        IFACE_EXPECTED,
    )?;
    for s in &lan.segments {
        require(
            "the nft ruleset",
            "segment interface",
            &s.interface(lan),
            is_iface_name,
            IFACE_EXPECTED,
        )?;
    }
    let mut trusted = vec![lan.interface.clone()];
    let mut guests = Vec::new();
    let mut guest_nets: Vec<String> = inputs
        .guest_prefixes
        .iter()
        .filter(|p| p.addr().is_ipv4())
        .map(ToString::to_string)
        .collect();
    let mut lan_nets = vec![lan.address.trunc().to_string()];
    for s in &lan.segments {
        match s.purpose {
            Purpose::Guest => {
                guests.push(s.interface(lan));
                guest_nets.push(s.address.trunc().to_string());
            }
            _ => {
                trusted.push(s.interface(lan));
                lan_nets.push(s.address.trunc().to_string());
            }
        }
    }
    let mut all = trusted.clone();
    all.extend(guests.iter().cloned());
    let mut ports: Vec<String> = Vec::new();
    for a in [inputs.api, inputs.metrics].into_iter().flatten() {
        ports.push(a.port().to_string());
    }
    ports.push("22".into());
    let mut out =
        format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    // Input: the box itself.
    out.push_str("  chain input {\n    type filter hook input priority filter; policy drop;\n");
    out.push_str("    ct state established,related accept\n    ct state invalid drop\n");
    out.push_str("    iif \"lo\" accept\n");
    out.push_str(
        "    icmp type { destination-unreachable, time-exceeded, parameter-problem } accept\n",
    );
    out.push_str("    icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem, nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept\n");
    out.push_str(&format!(
        "    iifname {} udp dport {{ 53, 67, 123 }} accept\n    iifname {} tcp dport 53 accept\n",
        set(&quoted(&all)),
        set(&quoted(&all))
    ));
    if !guest_nets.is_empty() {
        out.push_str(&format!(
            "    ip saddr {} drop comment \"guests: nothing else on the box\"\n",
            set(&guest_nets)
        ));
    }
    if !guests.is_empty() {
        out.push_str(&format!("    iifname {} drop\n", set(&quoted(&guests))));
    }
    out.push_str(&format!(
        "    iifname {} tcp dport {} accept comment \"LAN API, metrics, SSH\"\n",
        set(&quoted(&trusted)),
        set(&ports)
    ));
    out.push_str(&format!(
        "    iifname {} icmp type echo-request accept\n",
        set(&quoted(&trusted))
    ));
    out.push_str("  }\n");
    // Forward: through the box.
    out.push_str("  chain forward {\n    type filter hook forward priority filter; policy drop;\n");
    out.push_str("    ct state established,related accept\n    ct state invalid drop\n");
    if !guest_nets.is_empty() {
        out.push_str(&format!(
            "    ip saddr {} ip daddr {} drop comment \"guests never reach the LAN or POS\"\n",
            set(&guest_nets),
            set(&lan_nets)
        ));
    }
    if !guests.is_empty() {
        out.push_str(&format!(
            "    iifname {} oifname {} drop\n",
            set(&quoted(&guests)),
            set(&quoted(&trusted))
        ));
    }
    out.push_str(&format!(
        "    iifname {} accept comment \"the LAN side goes out (tunnel or fallback)\"\n",
        set(&quoted(&all))
    ));
    out.push_str("  }\n}\n");
    Ok(out)
}

/// The script that removes the table (when `[lan]` goes away or the daemon stops).
pub fn remove() -> String {
    format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lan::Segment;

    fn lan() -> LanConfig {
        LanConfig {
            interface: "br0".into(),
            ports: vec![],
            address: "10.1.0.1/24".parse().expect("net"),
            dhcp: None,
            dns_servers: vec![],
            reservations: vec![],
            segments: vec![
                Segment {
                    name: "guest".into(),
                    purpose: Purpose::Guest,
                    vlan: Some(20),
                    interface: None,
                    address: "10.2.0.1/24".parse().expect("net"),
                    dhcp: None,
                },
                Segment {
                    name: "pos".into(),
                    purpose: Purpose::Pos,
                    vlan: None,
                    interface: Some("eth1".into()),
                    address: "10.3.0.1/24".parse().expect("net"),
                    dhcp: None,
                },
            ],
        }
    }

    #[test]
    fn guests_are_fenced_off_and_the_api_is_for_the_lan() {
        let s = render(
            &lan(),
            &Inputs {
                api: Some("10.1.0.1:8080".parse().expect("addr")),
                metrics: Some("10.1.0.1:9108".parse().expect("addr")),
                guest_prefixes: vec!["10.9.0.0/24".parse().expect("net")],
            },
        )
        .expect("renders");
        for line in [
            "    type filter hook input priority filter; policy drop;",
            "    type filter hook forward priority filter; policy drop;",
            "    ip saddr { 10.9.0.0/24, 10.2.0.0/24 } drop comment \"guests: nothing else on the box\"",
            "    iifname { \"br0.20\" } drop",
            "    iifname { \"br0\", \"eth1\" } tcp dport { 8080, 9108, 22 } accept comment \"LAN API, metrics, SSH\"",
            "    ip saddr { 10.9.0.0/24, 10.2.0.0/24 } ip daddr { 10.1.0.0/24, 10.3.0.0/24 } drop comment \"guests never reach the LAN or POS\"",
            "    iifname { \"br0.20\" } oifname { \"br0\", \"eth1\" } drop",
        ] {
            assert!(s.lines().any(|l| l == line), "missing {line:?} in\n{s}");
        }
        // The guest rules come before the LAN-side accepts (first match wins).
        let drop_at = s.find("guests: nothing else").expect("guest drop");
        let api_at = s.find("LAN API, metrics").expect("api accept");
        assert!(drop_at < api_at);
        // Replacing the table is one transaction: create-if-missing, delete, define.
        assert!(s.starts_with("table inet stallnet_fw {}\ndelete table inet stallnet_fw\n"));
    }

    #[test]
    fn hostile_interface_names_cannot_add_a_rule() {
        for spoil in [
            |l: &mut LanConfig| l.interface = "br0\" accept\n#".into(),
            |l: &mut LanConfig| l.segments[1].interface = Some("eth1\" }\n".into()),
            |l: &mut LanConfig| l.interface = "a/b".into(),
        ] {
            let mut l = lan();
            spoil(&mut l);
            let err = render(&l, &Inputs::default()).expect_err("hostile name");
            assert_eq!(err.file, "the nft ruleset", "{err}");
        }
    }
}

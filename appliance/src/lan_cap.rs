//! The kernel side of [`crate::core::source_cap`]: an nft table `inet stallnet_lan_cap`
//! that drops what one LAN source sends into the tunnel beyond the cap, per IPv4 address
//! or IPv6 /64, ahead of the TUN device's queue (where the kernel would otherwise drop
//! from every source alike). POS sources are never capped. The table is replaced whole
//! (one nft transaction) when the cap changes, and the daemon's [`Kernel`] removes it on
//! every exit.
//!
//! [`Kernel`]: crate::driver::kernel::Kernel

use ipnet::IpNet;
use stallnet_netconf::grammar::{require, Unwritable, IFACE_EXPECTED};

/// The table's family and name.
pub const FAMILY: &str = "inet";
pub const TABLE: &str = "stallnet_lan_cap";

/// The script that (re)creates the table: `tun` is the TUN device, `pps` the cap,
/// `exempt` the POS sources.
pub fn render(tun: &str, pps: u32, exempt: &[IpNet]) -> Result<String, Unwritable> {
    require(
        "the nft ruleset",
        "TUN device",
        tun,
        stallnet_netconf::grammar::is_iface_name,
        IFACE_EXPECTED,
    )?;
    let burst = (pps / 5).max(1000);
    let except = |v4: bool| -> String {
        let nets: Vec<String> = exempt
            .iter()
            .filter(|n| n.addr().is_ipv4() == v4)
            .map(|n| n.trunc().to_string())
            .collect();
        match (nets.is_empty(), v4) {
            (true, _) => String::new(),
            (false, true) => format!("ip saddr != {{ {} }} ", nets.join(", ")),
            (false, false) => format!("ip6 saddr != {{ {} }} ", nets.join(", ")),
        }
    };
    let limit = format!("limit rate over {pps}/second burst {burst} packets");
    Ok(format!(
        "table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n\
         table {FAMILY} {TABLE} {{\n\
         \tset src4 {{ type ipv4_addr; size 65535; flags dynamic,timeout; timeout 10s; }}\n\
         \tset src6 {{ type ipv6_addr; size 65535; flags dynamic,timeout; timeout 10s; }}\n\
         \tchain lan_in {{\n\
         \t\ttype filter hook forward priority filter - 10; policy accept;\n\
         \t\toifname \"{tun}\" {v4}update @src4 {{ ip saddr {limit} }} counter drop\n\
         \t\toifname \"{tun}\" {v6}update @src6 {{ ip6 saddr & ffff:ffff:ffff:ffff:: {limit} }} counter drop\n\
         \t}}\n}}\n",
        v4 = except(true),
        v6 = except(false),
    ))
}

/// Packets the table has dropped since it was (re)created.
pub async fn dropped() -> anyhow::Result<u64> {
    crate::driver::kernel::nft_chain_packets(FAMILY, TABLE, "lan_in").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pos_sources_are_exempt_and_names_are_checked() {
        let pos: Vec<IpNet> = vec![
            "10.1.0.10/32".parse().unwrap_or_else(|_| IpNet::default()),
            "fd00::10/128".parse().unwrap_or_else(|_| IpNet::default()),
        ];
        let s = render("stall0", 11_718, &pos).unwrap_or_default();
        assert!(s.contains("oifname \"stall0\" ip saddr != { 10.1.0.10/32 } update @src4"));
        assert!(s.contains("ip6 saddr != { fd00::10/128 } update @src6"));
        assert!(s.contains("limit rate over 11718/second burst 2343 packets"));
        let s = render("stall0", 10_000, &[]).unwrap_or_default();
        assert!(s.contains("oifname \"stall0\" update @src4"));
        assert!(render("bad\"name", 10_000, &[]).is_err());
    }
}

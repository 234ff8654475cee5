//! The hub's isolation of stalls from one another and from the hub itself: an nft table
//! `inet stallnet_hub` on the hub's TUN device.
//!
//! - Nothing a stall sends is forwarded back into the TUN: no stall reaches another
//!   stall's LAN block or tunnel address through the hub (chain `between`).
//! - Nothing a stall sends is forwarded to link-local addresses (the cloud's metadata
//!   service at 169.254.169.254 holds the VM's credentials).
//! - The hub itself answers a stall's ping, the replies of its own connections and the TCP
//!   ports of `hub.stall_services` (a sales broker on the hub's VM); every other packet
//!   from the TUN to the hub (its SSH, its control and metrics ports, on any of its
//!   addresses) is dropped (chain `to_hub`).
//!
//! Every drop is counted; the hub's status shows the counts. The hub's [`Kernel`] owns
//! the table, so it is removed on every exit.
//!
//! A source a stall may not use (outside its LAN and tunnel address) never gets this far:
//! the device's bond drops and counts it (`spoofed`).
//!
//! [`Kernel`]: crate::driver::kernel::Kernel

use stallnet_netconf::grammar::{require, Unwritable, IFACE_EXPECTED};

/// The table's family and name.
pub const FAMILY: &str = "inet";
pub const TABLE: &str = "stallnet_hub";

/// The script that (re)creates the table for the TUN device `tun`; stalls may reach the
/// hub's TCP `services`.
pub fn render(tun: &str, services: &[u16]) -> Result<String, Unwritable> {
    require(
        "the nft ruleset",
        "TUN device",
        tun,
        stallnet_netconf::grammar::is_iface_name,
        IFACE_EXPECTED,
    )?;
    let services = if services.is_empty() {
        String::new()
    } else {
        let ports: Vec<String> = services.iter().map(u16::to_string).collect();
        format!("\t\ttcp dport {{ {} }} accept\n", ports.join(", "))
    };
    Ok(format!(
        "table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n\
         table {FAMILY} {TABLE} {{\n\
         \tchain between {{\n\
         \t\ttype filter hook forward priority filter - 5; policy accept;\n\
         \t\tiifname \"{tun}\" oifname \"{tun}\" counter drop\n\
         \t\tiifname \"{tun}\" ip daddr 169.254.0.0/16 counter drop\n\
         \t\tiifname \"{tun}\" ip6 daddr fe80::/10 counter drop\n\
         \t}}\n\
         \tchain to_hub {{\n\
         \t\ttype filter hook input priority filter - 5; policy accept;\n\
         \t\tiifname != \"{tun}\" accept\n\
         \t\tct state established,related accept\n\
         \t\ticmp type echo-request accept\n\
         \t\ticmpv6 type echo-request accept\n\
         {services}\
         \t\tcounter drop\n\
         \t}}\n}}\n"
    ))
}

/// Packets dropped since the table was created: (between stalls or to link-local
/// addresses, to the hub itself).
pub async fn dropped() -> anyhow::Result<(u64, u64)> {
    use crate::driver::kernel::nft_chain_packets;
    Ok((
        nft_chain_packets(FAMILY, TABLE, "between").await?,
        nft_chain_packets(FAMILY, TABLE, "to_hub").await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tun_is_named_and_checked() {
        let s = render("stallhub0", &[]).unwrap_or_default();
        assert!(s.contains("iifname \"stallhub0\" oifname \"stallhub0\" counter drop"));
        assert!(s.contains("iifname != \"stallhub0\" accept"));
        assert!(!s.contains("dport"));
        let s = render("stallhub0", &[4222, 8443]).unwrap_or_default();
        assert!(
            s.contains("tcp dport { 4222, 8443 } accept\n\t\tcounter drop"),
            "{s}"
        );
        assert!(render("bad\" accept", &[]).is_err());
    }
}

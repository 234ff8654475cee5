//! LAN devices as the box knows them: dnsmasq's leases file (MAC, address, host name) and
//! the kernel's IPv4 neighbour table (`/proc/net/arp`), for classification rules by MAC or
//! DHCP host name. Parsing is lenient: malformed lines are skipped.

use std::net::IpAddr;

use stallnet_netconf::classes::parse_mac;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Option<[u8; 6]>,
    /// Lower case; None when the lease has no name (`*`).
    pub hostname: Option<String>,
}

/// Devices from a dnsmasq leases file (`expiry mac ip hostname client-id`) and the text of
/// `/proc/net/arp`.
pub fn neighbours(leases: &str, arp: &str) -> Vec<Neighbour> {
    let mut out = Vec::new();
    for line in leases.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(mac), Some(ip), Some(name)) = (f.get(1), f.get(2), f.get(3)) else {
            continue;
        };
        let Ok(ip) = ip.parse::<IpAddr>() else {
            continue;
        };
        out.push(Neighbour {
            ip,
            mac: parse_mac(mac),
            hostname: (*name != "*").then(|| name.to_ascii_lowercase()),
        });
    }
    // IP address, HW type, Flags, HW address, Mask, Device (first line is a header).
    for line in arp.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(ip), Some(flags), Some(mac)) = (f.first(), f.get(2), f.get(3)) else {
            continue;
        };
        // 0x0 is an incomplete entry.
        if *flags == "0x0" {
            continue;
        }
        let (Ok(ip), Some(mac)) = (ip.parse::<IpAddr>(), parse_mac(mac)) else {
            continue;
        };
        if !out.iter().any(|n| n.ip == ip && n.mac == Some(mac)) {
            out.push(Neighbour {
                ip,
                mac: Some(mac),
                hostname: None,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_and_arp_are_read_and_junk_is_skipped() {
        let leases = "1700000000 aa:bb:cc:00:00:01 10.1.0.20 Card-Reader 01:aa:bb:cc:00:00:01\n\
                      1700000000 aa:bb:cc:00:00:02 10.1.0.21 * *\n\
                      garbage\n1 2 notanip x\n";
        let arp = "IP address       HW type     Flags       HW address            Mask     Device\n\
                   10.1.0.30        0x1         0x2         aa:bb:cc:00:00:03     *        br-lan\n\
                   10.1.0.31        0x1         0x0         00:00:00:00:00:00     *        br-lan\n";
        let n = neighbours(leases, arp);
        assert_eq!(n.len(), 3, "{n:?}");
        assert_eq!(n[0].hostname.as_deref(), Some("card-reader"));
        assert_eq!(n[1].hostname, None);
        assert_eq!(n[2].mac, Some([0xaa, 0xbb, 0xcc, 0, 0, 3]));
    }
}

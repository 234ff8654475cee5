//! Where each device's LAN appears on the hub: every stall flashed from the same image has
//! the same LAN (10.1.0.0/24), so the hub cannot route downloads by the devices' own
//! prefixes. Each IPv4 LAN prefix of each device gets a block of the same size in the
//! hub's map space (`hub.lan_map`), in config order, each block aligned to its size; the
//! hub rewrites addresses between the two at the tunnel (`stallnet_proto::lan_map`).
//! Validation and the daemon's plan both call [`blocks`], so a config that validates has
//! room for every device.

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};

/// A device's IPv4 LAN prefix and its block in the map space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub lan: Ipv4Net,
    pub mapped: Ipv4Net,
}

/// The map space cannot hold every device's LAN prefixes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lan_map {space} has no room for {lan} of device {device} (the devices before it take {used} addresses)")]
pub struct NoRoom {
    pub space: Ipv4Net,
    /// Index of the first device that did not fit.
    pub device: usize,
    pub lan: Ipv4Net,
    /// Addresses of the space taken before it (alignment included).
    pub used: u64,
}

/// The blocks of every device (in the order given), IPv4 prefixes only (IPv6 LAN
/// prefixes are routed as they are). Each block has its LAN prefix's length and starts
/// at the next address of the space aligned to its size.
pub fn blocks(space: Ipv4Net, devices: &[&[IpNet]]) -> Result<Vec<Vec<Block>>, NoRoom> {
    let start = u64::from(u32::from(space.network()));
    let end = start + (1u64 << (32 - u32::from(space.prefix_len())));
    let mut cursor = start;
    let mut out = Vec::with_capacity(devices.len());
    for (device, lans) in devices.iter().enumerate() {
        let mut mine = Vec::new();
        for lan in lans.iter().filter_map(|p| match p {
            IpNet::V4(n) => Some(n.trunc()),
            IpNet::V6(_) => None,
        }) {
            let size = 1u64 << (32 - u32::from(lan.prefix_len()));
            // Aligned up to the block's size: the block is a prefix of its own.
            let at = cursor.div_ceil(size) * size;
            let no_room = NoRoom {
                space,
                device,
                lan,
                used: cursor - start,
            };
            if at + size > end {
                return Err(no_room);
            }
            let addr = u32::try_from(at).map_err(|_| no_room.clone())?;
            let mapped =
                Ipv4Net::new(Ipv4Addr::from(addr), lan.prefix_len()).map_err(|_| no_room)?;
            mine.push(Block { lan, mapped });
            cursor = at + size;
        }
        out.push(mine);
    }
    Ok(out)
}

/// The first block of prefix length `len` in `space`, aligned to its size, that overlaps
/// none of `taken` (a device added while the hub runs).
pub fn first_free(space: Ipv4Net, taken: &[Ipv4Net], len: u8) -> Option<Ipv4Net> {
    if len < space.prefix_len() || len > 32 {
        return None;
    }
    let size = 1u64 << (32 - u32::from(len));
    let start = u64::from(u32::from(space.network()));
    let end = start + (1u64 << (32 - u32::from(space.prefix_len())));
    let mut at = start;
    while at + size <= end {
        let first = u32::try_from(at).ok()?;
        let last = u32::try_from(at + size - 1).ok()?;
        let clash = taken.iter().find(|t| {
            let (a, b) = (u32::from(t.network()), u32::from(t.broadcast()));
            a <= last && first <= b
        });
        match clash {
            None => return Ipv4Net::new(Ipv4Addr::from(first), len).ok(),
            // Past the block in the way, aligned up again.
            Some(t) => at = (u64::from(u32::from(t.broadcast())) + 1).div_ceil(size) * size,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test value")
    }

    #[test]
    fn identical_lans_get_their_own_blocks_in_order() {
        let lan = [net("10.1.0.0/24")];
        let space: Ipv4Net = "10.100.0.0/14".parse().expect("test value");
        let b = blocks(space, &[&lan, &lan, &lan]).expect("test value");
        let mapped: Vec<String> = b.iter().map(|d| d[0].mapped.to_string()).collect();
        assert_eq!(mapped, ["10.100.0.0/24", "10.100.1.0/24", "10.100.2.0/24"]);
        assert!(b.iter().all(|d| d[0].lan.to_string() == "10.1.0.0/24"));
    }

    #[test]
    fn blocks_are_aligned_and_ipv6_is_left_out() {
        let a = [net("192.168.7.0/28"), net("fd00::/64")];
        let b = [net("10.0.0.0/23")];
        let space: Ipv4Net = "10.100.0.0/16".parse().expect("test value");
        let got = blocks(space, &[&a, &b]).expect("test value");
        assert_eq!(got[0].len(), 1);
        assert_eq!(got[0][0].mapped.to_string(), "10.100.0.0/28");
        // A /23 after a /28 starts at the next /23 boundary.
        assert_eq!(got[1][0].mapped.to_string(), "10.100.2.0/23");
    }

    #[test]
    fn a_free_block_is_found_around_the_taken_ones() {
        let space: Ipv4Net = "10.100.0.0/22".parse().expect("space");
        let t = |s: &str| -> Ipv4Net { s.parse().expect("net") };
        let taken = [t("10.100.0.0/24"), t("10.100.2.0/24")];
        assert_eq!(first_free(space, &taken, 24), Some(t("10.100.1.0/24")));
        assert_eq!(
            first_free(space, &taken, 23),
            None,
            "each /23 holds a taken /24"
        );
        let taken = [t("10.100.0.0/24"), t("10.100.1.0/24"), t("10.100.2.0/24")];
        assert_eq!(first_free(space, &taken, 24), Some(t("10.100.3.0/24")));
        let full = [t("10.100.0.0/22")];
        assert_eq!(first_free(space, &full, 28), None);
        assert_eq!(first_free(space, &[], 20), None, "wider than the space");
    }

    #[test]
    fn a_full_space_names_the_first_device_that_does_not_fit() {
        let lan = [net("10.1.0.0/24")];
        let space: Ipv4Net = "10.100.0.0/23".parse().expect("test value");
        let e = blocks(space, &[&lan, &lan, &lan]).expect_err("test value");
        assert_eq!(e.device, 2);
        assert_eq!(e.used, 512);
        // A LAN wider than the whole space.
        let wide = [net("10.0.0.0/8")];
        assert!(blocks(space, &[&wide]).is_err());
    }
}

//! Small kernel facts set through /proc and sockets: forwarding, reverse-path filtering,
//! the TUN device, and UDP sockets pinned to one uplink.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use super::tun_io::TunDevice;

/// Writes a sysctl under /proc/sys (`net/ipv4/ip_forward`).
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    // Already so (the package's sysctl.d file at boot): nothing to write, which a
    // service with a read-only /proc/sys could not do anyway.
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).with_context(|| format!("setting {path} = {value}"))
}

/// Creates and brings up a TUN device with offloads (see [`super::tun_io`]), addressed
/// when `addr` is given, with loose reverse-path filtering.
pub fn tun(name: &str, mtu: u16, addr: Option<(Ipv4Addr, u8)>) -> Result<Arc<TunDevice>> {
    let dev = super::tun_io::open(name, mtu, addr)?;
    // Loose reverse-path filtering: packets from anywhere arrive through the tunnel.
    let _ = sysctl(&format!("net/ipv4/conf/{name}/rp_filter"), "2");
    Ok(Arc::new(dev))
}

/// A UDP socket that leaves through `iface` only (SO_BINDTODEVICE) and carries `mark`, so
/// the uplink's own routing table applies and tunnel packets never loop into the TUN.
pub fn uplink_socket(iface: &str, mark: u32, local: Ipv4Addr) -> Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("UDP socket")?;
    s.bind_device(Some(iface.as_bytes()))
        .with_context(|| format!("SO_BINDTODEVICE {iface} (needs CAP_NET_RAW)"))?;
    s.set_mark(mark).context("SO_MARK (needs CAP_NET_ADMIN)")?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((local, 0)).into())
        .with_context(|| format!("binding {local}"))?;
    Ok(s.into())
}

/// The hub's UDP socket on `listen`, with a receive buffer deep enough (4 MiB) that a
/// burst of strangers' handshakes does not push the stalls' packets out of it while the
/// hub is busy for a few milliseconds.
pub fn hub_socket(listen: SocketAddr) -> Result<std::net::UdpSocket> {
    let domain = if listen.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).context("UDP socket")?;
    const DEPTH: usize = 4 << 20;
    // Past net.core.rmem_max with CAP_NET_ADMIN; within it otherwise.
    if nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &DEPTH).is_err() {
        let _ = s.set_recv_buffer_size(DEPTH);
    }
    s.set_nonblocking(true)?;
    s.bind(&listen.into())
        .with_context(|| format!("listening on {listen}"))?;
    Ok(s.into())
}

//! The reachability checks' IO (decisions are in [`crate::core::reach`]): DNS queries,
//! a plain-HTTP request and an HTTPS request, each on a socket bound to one uplink's
//! interface and marked for its routing table, so the answer is that uplink's network's
//! and nobody else's.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};

use crate::core::reach::PortalOutcome;

/// Each check (DNS, connect, answer) gives up after this long.
const TIMEOUT: Duration = Duration::from_secs(3);
/// A portal's page is read up to this much (enough to tell it is not empty).
const MAX_BODY: usize = 16 * 1024;

/// Where and how one uplink's checks are made.
#[derive(Debug, Clone)]
pub struct Via {
    pub interface: String,
    pub mark: u32,
    /// DNS servers asked through the uplink; empty: the system's resolver (no forged-DNS
    /// check then).
    pub dns: Vec<IpAddr>,
}

/// The TLS settings for HTTPS checks: the public roots plus `ca_file`'s certificates.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca_file {
        let mut n = 0;
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading the reachability CA {}", ca.display()))?
        {
            let cert = cert.with_context(|| format!("{}: bad PEM", ca.display()))?;
            roots.add(cert).context("adding the reachability CA")?;
            n += 1;
        }
        anyhow::ensure!(n > 0, "{} holds no PEM certificate", ca.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// `(host, port, path)` of an `http://` or `https://` URL.
fn split_url(url: &str) -> Option<(String, u16, String)> {
    let (rest, default_port) = if let Some(r) = url.strip_prefix("https://") {
        (r, 443)
    } else {
        (url.strip_prefix("http://")?, 80)
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (authority, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_string(), port, path))
}

fn bound_socket(via: &Via, ty: Type, proto: Protocol) -> Result<Socket> {
    let s = Socket::new(Domain::IPV4, ty, Some(proto)).context("socket")?;
    s.bind_device(Some(via.interface.as_bytes()))
        .with_context(|| format!("SO_BINDTODEVICE {}", via.interface))?;
    s.set_mark(via.mark).context("SO_MARK")?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// What a DNS server said about a name's A records.
#[derive(Debug)]
struct DnsAnswer {
    addrs: Vec<Ipv4Addr>,
}

async fn dns_query(via: &Via, server: IpAddr, name: &str) -> Result<DnsAnswer> {
    use simple_dns::{rdata::RData, Name, Packet, Question, CLASS, QCLASS, QTYPE, TYPE};
    let id: u16 = rand::random();
    let mut q = Packet::new_query(id);
    q.set_flags(simple_dns::PacketFlag::RECURSION_DESIRED);
    q.questions.push(Question::new(
        Name::new(name).with_context(|| format!("bad DNS name {name:?}"))?,
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    let query = q.build_bytes_vec().context("building a DNS query")?;
    let sock = bound_socket(via, Type::DGRAM, Protocol::UDP)?;
    let sock = tokio::net::UdpSocket::from_std(sock.into())?;
    sock.connect(SocketAddr::new(server, 53)).await?;
    sock.send(&query).await?;
    let mut buf = vec![0u8; 1500];
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("DNS server {server} did not answer"))??;
        let Ok(p) = Packet::parse(&buf[..n]) else {
            continue;
        };
        if p.id() != id {
            continue;
        }
        let addrs = p
            .answers
            .iter()
            .filter_map(|rr| match &rr.rdata {
                RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect();
        return Ok(DnsAnswer { addrs });
    }
}

/// A name that exists nowhere (a random label under `.invalid`, RFC 6761).
fn made_up_name() -> String {
    let label: String = (0..14)
        .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
        .collect();
    format!("{label}.invalid")
}

/// The address of `host` as the uplink's DNS sees it.
async fn resolve(via: &Via, host: &str, port: u16) -> Result<SocketAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if via.dns.is_empty() {
        return tokio::time::timeout(TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| anyhow::anyhow!("resolving {host} timed out"))??
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{host} has no IPv4 address"));
    }
    let mut last = None;
    for server in &via.dns {
        match dns_query(via, *server, host).await {
            Ok(a) => match a.addrs.first() {
                Some(ip) => return Ok(SocketAddr::new(IpAddr::V4(*ip), port)),
                None => last = Some(anyhow::anyhow!("{host} does not resolve (via {server})")),
            },
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no DNS server")))
}

async fn connect(via: &Via, addr: SocketAddr) -> Result<tokio::net::TcpStream> {
    let sock = bound_socket(via, Type::STREAM, Protocol::TCP)?;
    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
    tokio::time::timeout(TIMEOUT, sock.connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))
}

/// One GET over `io`; the status, the `Location` header and the body's length.
async fn get<I>(io: I, host: &str, path: &str) -> Result<(u16, Option<String>, usize)>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(path)
        .header("host", host)
        .header("user-agent", "stallnet-reachability")
        .header("connection", "close")
        .body(Empty::<Bytes>::new())
        .context("request")?;
    let work = async {
        let resp = sender.send_request(req).await.context("no answer")?;
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            // A page larger than the limit is a page all the same.
            .unwrap_or(MAX_BODY);
        anyhow::Ok((status, location, body))
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {TIMEOUT:?}"))?
}

/// The portal check: a made-up name must not resolve, and `url` must answer `204` (or an
/// empty `200`).
pub async fn portal(via: &Via, url: &str) -> PortalOutcome {
    let Some((host, port, path)) = split_url(url) else {
        return PortalOutcome::Failed(format!("bad URL {url}"));
    };
    for server in &via.dns {
        match dns_query(via, *server, &made_up_name()).await {
            Ok(a) if !a.addrs.is_empty() => {
                return PortalOutcome::DnsForged {
                    answer: a.addrs[0].to_string(),
                }
            }
            // NXDOMAIN, an empty answer or a refusal: nothing forged.
            Ok(_) => break,
            Err(_) => continue,
        }
    }
    let work = async {
        let addr = resolve(via, &host, port).await?;
        let tcp = connect(via, addr).await?;
        get(tcp, &host, &path).await
    };
    match work.await {
        Ok((204, _, _)) | Ok((200, _, 0)) => PortalOutcome::Clear,
        Ok((s @ 300..=399, location, _)) => PortalOutcome::Captive {
            location: location.or_else(|| Some(format!("(HTTP {s} without Location)"))),
        },
        // A login page instead of the empty answer, or 511 Network Authentication Required.
        Ok((200..=299 | 511, _, _)) => PortalOutcome::Captive { location: None },
        Ok((s, _, _)) => PortalOutcome::Failed(format!("{url} answered HTTP {s}")),
        Err(e) => PortalOutcome::Failed(format!("{url}: {e:#}")),
    }
}

/// The HTTPS check: `url` answers over a TLS session whose certificate is valid for its
/// host.
pub async fn https(via: &Via, url: &str, tls: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let work = async {
        let (host, port, path) = split_url(url).context("bad URL")?;
        let addr = resolve(via, &host, port).await?;
        let tcp = connect(via, addr).await?;
        let name =
            rustls::pki_types::ServerName::try_from(host.clone()).context("bad host name")?;
        let stream = tokio::time::timeout(
            TIMEOUT,
            tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
        )
        .await
        .map_err(|_| anyhow::anyhow!("TLS handshake timed out"))?
        .context("TLS")?;
        get(stream, &host, &path).await
    };
    work.await
        .map(|_| ())
        .map_err(|e: anyhow::Error| format!("{url}: {e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_path() {
        assert_eq!(
            split_url("http://connectivitycheck.gstatic.com/generate_204"),
            Some((
                "connectivitycheck.gstatic.com".into(),
                80,
                "/generate_204".into()
            ))
        );
        assert_eq!(
            split_url("https://check.test:8443"),
            Some(("check.test".into(), 8443, "/".into()))
        );
        assert_eq!(
            split_url("http://10.0.0.1?x=1"),
            Some(("10.0.0.1".into(), 80, "/?x=1".into()))
        );
        assert_eq!(split_url("ftp://x/"), None);
        assert_eq!(split_url("http:///x"), None);
    }

    #[test]
    fn made_up_names_are_random_and_reserved() {
        let (a, b) = (made_up_name(), made_up_name());
        assert_ne!(a, b);
        assert!(a.ends_with(".invalid"));
    }
}

//! `stallnet-traffic`: measured test traffic.
//!
//! - `udp-echo BIND`: echoes every datagram back to its sender (runs until killed).
//! - `udp-flow TO BIND PPS SECS [SIZE]`: sends PPS datagrams (SIZE bytes, default 200) per
//!   second for SECS seconds (each carries a sequence number), listens for the echoes, and
//!   prints a JSON summary: sent, received, lost, duplicates, the longest gap between
//!   echoes, the RTT percentiles and the jitter (p99 of the change in RTT between
//!   consecutive echoes).
//! - `udp-flood TO_IP BIND PPS SECS FLOWS [SIZE]`: one misbehaving LAN device: SIZE-byte
//!   datagrams (default 64) to TO_IP on FLOWS distinct ports in turn, at up to PPS per
//!   second for SECS seconds; prints `{"sent": N, "pps": X}`. Nothing listens for them.
//! - `tcp-connect TO`: one TCP connection attempt (3 s limit); prints the outcome
//!   (`connected`, `refused`, `timeout`, `error`) and how long it took.
//! - `dns-query SERVER NAME`: an A query over UDP (up to 3 tries); prints the addresses in
//!   the answer.
//! - `tcp-sink BIND`: for each connection, reads to the end, answers with the byte count
//!   (8 bytes), closes (runs until killed).
//! - `tcp-send TO BYTES`: sends BYTES over one TCP connection (cubic), half-closes, waits
//!   for the sink's count and prints a JSON summary: sent, acknowledged (by the sink,
//!   after it read everything), seconds. Gives up after 60 s.
//! - `http-sink BIND LOG`: an HTTP upstream for the outbox: answers every POST with 201
//!   and appends `{"key": <Idempotency-Key>, "peer": <source address>, "body": …}` as one
//!   JSON line to LOG (runs until killed).
//! - `check-server BIND DIR HOST`: what reachability checks ask on the internet: plain
//!   HTTP on BIND:80 answers `GET /generate_204` with 204, and HTTPS on BIND:443 answers
//!   200 with a certificate for HOST from a CA made now (written to DIR/ca.pem).
//! - `quic-flood HUB COUNT SECS`: a stranger's flood of QUIC handshakes: COUNT connection
//!   attempts to HUB spread over SECS seconds from one UDP socket, none of which goes on
//!   (run it where the hub's answers are dropped, so each stays half-open at the hub);
//!   prints `{"attempts": N, "seconds": S}`.
//! - `portal BIND`: a venue's captive portal as the box meets it: every HTTP request on
//!   BIND is answered with a 302 to the login page.
use std::collections::HashSet;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("udp-echo") => {
            let s = UdpSocket::bind(args.get(1).context("BIND")?)?;
            let mut buf = [0u8; 2048];
            loop {
                let (n, from) = s.recv_from(&mut buf)?;
                let _ = s.send_to(&buf[..n], from);
            }
        }
        Some("udp-flow") => {
            let (to, bind, pps, secs, size) = match &args[1..] {
                [to, bind, pps, secs] => (to, bind, pps, secs, "200"),
                [to, bind, pps, secs, size] => (to, bind, pps, secs, size.as_str()),
                _ => bail!("usage: udp-flow TO BIND PPS SECS [SIZE]"),
            };
            let size: usize = size.parse()?;
            anyhow::ensure!((16..=1400).contains(&size), "SIZE must be 16..=1400");
            flow(to, bind, pps.parse()?, secs.parse()?, size)
        }
        Some("udp-flood") => {
            let (to, bind, pps, secs, flows, size) = match &args[1..] {
                [to, bind, pps, secs, flows] => (to, bind, pps, secs, flows, "64"),
                [to, bind, pps, secs, flows, size] => {
                    (to, bind, pps, secs, flows, size.as_str())
                }
                _ => bail!("usage: udp-flood TO_IP BIND PPS SECS FLOWS [SIZE]"),
            };
            let size: usize = size.parse()?;
            anyhow::ensure!((1..=1400).contains(&size), "SIZE must be 1..=1400");
            let flows: u16 = flows.parse()?;
            anyhow::ensure!(flows >= 1, "FLOWS must be at least 1");
            flood(to, bind, pps.parse()?, secs.parse()?, flows, size)
        }
        Some("tcp-connect") => tcp_connect(args.get(1).context("TO")?),
        Some("dns-query") => {
            let [server, name] = &args[1..] else {
                bail!("usage: dns-query SERVER NAME");
            };
            dns_query(server, name)
        }
        Some("tcp-sink") => {
            let l = std::net::TcpListener::bind(args.get(1).context("BIND")?)?;
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
                    let mut buf = vec![0u8; 65536];
                    let mut total = 0u64;
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    let _ = c.write_all(&total.to_be_bytes());
                });
            }
            Ok(())
        }
        Some("tcp-send") => {
            let [to, bytes] = &args[1..] else {
                bail!("usage: tcp-send TO BYTES");
            };
            tcp_send(to, bytes.parse()?)
        }
        Some("check-server") => {
            let [bind, dir, host] = &args[1..] else {
                bail!("usage: check-server BIND DIR HOST");
            };
            check_server(bind, dir, host)
        }
        Some("portal") => {
            let bind = args.get(1).context("BIND")?;
            serve_http(std::net::TcpListener::bind(bind)?, |_| {
                "HTTP/1.1 302 Found\r\nLocation: http://portal.venue.test/login?continue=1\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            });
            Ok(())
        }
        Some("quic-flood") => {
            let [hub, count, secs] = &args[1..] else {
                bail!("usage: quic-flood HUB COUNT SECS");
            };
            quic_flood(hub.parse()?, count.parse()?, secs.parse()?)
        }
        Some("http-sink") => {
            let [bind, log] = &args[1..] else {
                bail!("usage: http-sink BIND LOG");
            };
            http_sink(bind, log)
        }
        _ => bail!(
            "usage: stallnet-traffic http-sink BIND LOG | udp-echo BIND | udp-flow TO BIND PPS SECS [SIZE] | tcp-sink BIND | tcp-send TO BYTES | tcp-connect TO | dns-query SERVER NAME"
        ),
    }
}

fn tcp_send(to: &str, bytes: u64) -> Result<()> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = to.parse()?;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_tcp_congestion(b"cubic")?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let mut s: std::net::TcpStream = sock.into();
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let start = Instant::now();
    let chunk = vec![0x5au8; 65536];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)?;
    println!(
        "{}",
        serde_json::json!({
            "sent": bytes,
            "acknowledged": u64::from_be_bytes(ack),
            "seconds": start.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

fn tcp_connect(to: &str) -> Result<()> {
    let addr: std::net::SocketAddr = to.parse()?;
    let start = Instant::now();
    let outcome = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(_) => "connected".to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused".into(),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "timeout".into(),
        Err(e) => format!("error: {e}"),
    };
    println!(
        "{}",
        serde_json::json!({ "outcome": outcome, "ms": start.elapsed().as_secs_f64() * 1e3 })
    );
    Ok(())
}

fn dns_query(server: &str, name: &str) -> Result<()> {
    use simple_dns::{Name, Packet, Question, CLASS, QCLASS, QTYPE, TYPE};
    let mut q = Packet::new_query(0x5a5a);
    q.set_flags(simple_dns::PacketFlag::RECURSION_DESIRED);
    q.questions.push(Question::new(
        Name::new(name)?,
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    let s = UdpSocket::bind("0.0.0.0:0")?;
    // Like a stub resolver: up to 3 tries, 1.5 s apart (a server that was just started
    // may not be listening for the first one).
    s.set_read_timeout(Some(Duration::from_millis(1500)))?;
    let query = q.build_bytes_vec()?;
    let mut buf = [0u8; 1500];
    let mut tries = 0;
    let n = loop {
        tries += 1;
        s.send_to(&query, (server, 53))?;
        match s.recv_from(&mut buf) {
            Ok((n, _)) => break n,
            Err(e)
                if tries < 3
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let a = Packet::parse(&buf[..n])?;
    let addrs: Vec<String> = a
        .answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            simple_dns::rdata::RData::A(a) => Some(std::net::Ipv4Addr::from(a.address).to_string()),
            _ => None,
        })
        .collect();
    println!("{}", serde_json::json!({ "addresses": addrs }));
    Ok(())
}

fn flood(to: &str, bind: &str, pps: u64, secs: f64, flows: u16, size: usize) -> Result<()> {
    let ip: std::net::IpAddr = to.parse().context("TO_IP")?;
    let s = UdpSocket::bind(bind)?;
    let payload = vec![0x5au8; size];
    let start = Instant::now();
    let stop = Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    let mut port = 0u16;
    // Paced in batches of 64 every 64/PPS seconds: bounded in count and time.
    let batch = 64u64;
    let every = Duration::from_secs_f64(batch as f64 / pps.max(1) as f64);
    let mut next = start;
    while start.elapsed() < stop {
        for _ in 0..batch {
            let dst = std::net::SocketAddr::new(ip, 20_000 + port);
            port = (port + 1) % flows;
            if s.send_to(&payload, dst).is_ok() {
                sent += 1;
            }
        }
        next += every;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
    println!(
        "{}",
        serde_json::json!({ "sent": sent, "pps": sent as f64 / start.elapsed().as_secs_f64() })
    );
    Ok(())
}

fn flow(to: &str, bind: &str, pps: u64, secs: f64, size: usize) -> Result<()> {
    let s = UdpSocket::bind(bind)?;
    s.connect(to)?;
    s.set_read_timeout(Some(Duration::from_millis(1)))?;
    let start = Instant::now();
    let total = (pps as f64 * secs) as u64;
    let interval = Duration::from_nanos(1_000_000_000 / pps.max(1));
    let mut seen = HashSet::new();
    let mut dups = 0u64;
    let mut last_rx: Option<Instant> = None;
    let mut max_gap = Duration::ZERO;
    let mut rtts = Vec::new();
    let mut jitters = Vec::new();
    let mut sent = 0u64;
    let mut buf = [0u8; 2048];
    let end = start + Duration::from_secs_f64(secs) + Duration::from_secs(2);
    while Instant::now() < end {
        let now = Instant::now();
        if sent < total && now >= start + interval * sent as u32 {
            let mut p = [0u8; 1400];
            p[..8].copy_from_slice(&sent.to_be_bytes());
            p[8..16].copy_from_slice(&(now - start).as_nanos().to_be_bytes()[8..]);
            let _ = s.send(&p[..size]);
            sent += 1;
        }
        if let Ok(n) = s.recv(&mut buf) {
            if n < 16 {
                continue;
            }
            let now = Instant::now();
            let seq = u64::from_be_bytes(buf[..8].try_into()?);
            let t = u64::from_be_bytes(buf[8..16].try_into()?);
            if !seen.insert(seq) {
                dups += 1;
                continue;
            }
            let rtt = ((now - start).as_nanos() as u64).saturating_sub(t);
            if let Some(prev) = rtts.last() {
                jitters.push(rtt.abs_diff(*prev));
            }
            rtts.push(rtt);
            if let Some(l) = last_rx {
                max_gap = max_gap.max(now - l);
            }
            last_rx = Some(now);
        }
    }
    // When the lost packets were sent (ms from the start; the first 200).
    let lost_ms: Vec<u64> = (0..sent)
        .filter(|q| !seen.contains(q))
        .take(200)
        .map(|q| (interval * q as u32).as_millis() as u64)
        .collect();
    rtts.sort_unstable();
    jitters.sort_unstable();
    let pct = |v: &[u64], p: f64| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * p) as usize] as f64 / 1e6
    };
    println!(
        "{}",
        serde_json::json!({
            "sent": sent, "received": seen.len(), "lost": sent - seen.len() as u64,
            "duplicates": dups, "max_gap_ms": max_gap.as_secs_f64() * 1e3,
            "rtt_p50_ms": pct(&rtts, 0.5), "rtt_p99_ms": pct(&rtts, 0.99),
            "jitter_p99_ms": pct(&jitters, 0.99), "lost_ms": lost_ms,
        })
    );
    Ok(())
}

fn http_sink(bind: &str, log: &str) -> Result<()> {
    use axum::extract::ConnectInfo;
    use axum::http::{HeaderMap, StatusCode};
    use std::io::Write;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {log}"))?;
    let file = Arc::new(Mutex::new(file));
    let app = axum::Router::new().fallback(axum::routing::post(
        move |ConnectInfo(peer): ConnectInfo<SocketAddr>, h: HeaderMap, body: String| {
            let file = file.clone();
            async move {
                let key = h
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let line = serde_json::json!({ "key": key, "peer": peer.ip(), "body": body });
                if let Ok(mut f) = file.lock() {
                    let _ = writeln!(f, "{line}");
                }
                StatusCode::CREATED
            }
        },
    ));
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind(bind).await?;
        axum::serve(l, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
        anyhow::Ok(())
    })
}

/// Reads one request head from `c` and returns its path.
fn request_path(c: &mut impl std::io::Read) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = c.read(&mut b).ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&b[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace().nth(1).map(str::to_string)
}

/// Answers each connection on `l` with `answer(path)` (a thread per connection).
fn serve_http(l: std::net::TcpListener, answer: fn(&str) -> String) {
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            if let Some(path) = request_path(&mut c) {
                let _ = c.write_all(answer(&path).as_bytes());
            }
        });
    }
}

fn check_server(bind: &str, dir: &str, host: &str) -> Result<()> {
    use std::sync::Arc;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "stallnet test internet CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::write(format!("{dir}/ca.pem"), ca_cert.pem())?;
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![host.to_string()])?.signed_by(&key, &issuer)?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?,
    );
    let http = std::net::TcpListener::bind((bind, 80))?;
    let https = std::net::TcpListener::bind((bind, 443))?;
    std::thread::spawn(move || {
        serve_http(http, |path| {
            if path == "/generate_204" {
                "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".into()
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            }
        })
    });
    for conn in https.incoming() {
        let Ok(tcp) = conn else { continue };
        let tls = tls.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
            let Ok(sc) = rustls::ServerConnection::new(tls) else {
                return;
            };
            let mut s = rustls::StreamOwned::new(sc, tcp);
            if request_path(&mut s).is_some() {
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
                s.conn.send_close_notify();
                let _ = s.flush();
            }
        });
    }
    Ok(())
}

fn quic_flood(hub: std::net::SocketAddr, count: u64, secs: f64) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // Any pin: the hub's answers never arrive, so nothing is ever verified.
        let pin = format!("sn1:{}", "0".repeat(64));
        let cfg = stallnet::identity::enroll_client_config(&pin)?;
        let mut ep = quinn::Endpoint::client(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))?;
        ep.set_default_client_config(cfg);
        let start = Instant::now();
        let gap = Duration::from_secs_f64(secs / count.max(1) as f64);
        // Kept until the end: a dropped attempt would tell the hub it is over.
        let mut pending = Vec::with_capacity(usize::try_from(count)?);
        for i in 0..count {
            pending.push(ep.connect(hub, stallnet::identity::HUB_NAME)?);
            let due = start + gap * u32::try_from(i + 1)?;
            tokio::time::sleep_until(due.into()).await;
        }
        println!(
            "{}",
            serde_json::json!({ "attempts": count, "seconds": start.elapsed().as_secs_f64() })
        );
        // Let the last Initials leave before the socket goes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        anyhow::Ok(())
    })
}

//! `stallnet-traffic`: measured test traffic.
//!
//! - `udp-echo BIND`: echoes every datagram back to its sender (runs until killed).
//! - `udp-flow TO BIND PPS SECS`: sends PPS datagrams per second for SECS seconds (each
//!   carries a sequence number), listens for the echoes, and prints a JSON summary: sent,
//!   received, lost, duplicates, the longest gap between echoes and the RTT percentiles.
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
            let [to, bind, pps, secs] = &args[1..] else {
                bail!("usage: udp-flow TO BIND PPS SECS");
            };
            let pps: u64 = pps.parse()?;
            let secs: f64 = secs.parse()?;
            flow(to, bind, pps, secs)
        }
        _ => bail!("usage: stallnet-traffic udp-echo BIND | udp-flow TO BIND PPS SECS"),
    }
}

fn flow(to: &str, bind: &str, pps: u64, secs: f64) -> Result<()> {
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
    let mut sent = 0u64;
    let mut buf = [0u8; 2048];
    let end = start + Duration::from_secs_f64(secs) + Duration::from_secs(2);
    while Instant::now() < end {
        let now = Instant::now();
        if sent < total && now >= start + interval * sent as u32 {
            let mut p = [0u8; 200];
            p[..8].copy_from_slice(&sent.to_be_bytes());
            p[8..16].copy_from_slice(&(now - start).as_nanos().to_be_bytes()[8..]);
            let _ = s.send(&p);
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
            rtts.push((now - start).as_nanos() as u64 - t);
            if let Some(l) = last_rx {
                max_gap = max_gap.max(now - l);
            }
            last_rx = Some(now);
        }
    }
    rtts.sort_unstable();
    let pct = |p: f64| -> f64 {
        if rtts.is_empty() {
            return f64::NAN;
        }
        rtts[((rtts.len() - 1) as f64 * p) as usize] as f64 / 1e6
    };
    println!(
        "{}",
        serde_json::json!({
            "sent": sent, "received": seen.len(), "lost": sent - seen.len() as u64,
            "duplicates": dups, "max_gap_ms": max_gap.as_secs_f64() * 1e3,
            "rtt_p50_ms": pct(0.5), "rtt_p99_ms": pct(0.99),
        })
    );
    Ok(())
}

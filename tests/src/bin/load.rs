//! `stallnet-load`: many stalls against one real hub, for the hub's cost per stall. Each
//! stall is what an edge runs — its own identity, the daemon's edge-side bond (probes,
//! reports, reordering, the class queues), two uplinks as two real QUIC connections with
//! the real session hello — without a LAN or kernel routes: packets a stall "sends" are
//! made here and handed to its bond, and what the hub sends back lands on one TUN device
//! shared by all stalls (nothing reads it back).
//!
//! - `prepare N DIR`: N identities (`DIR/stall-I`) and `DIR/devices.toml`, the hub's
//!   `[[hub.devices]]` for them (every stall with the image's LAN, 10.1.0.0/24).
//! - `run HUB HUB_ID DIR N SECS [ACTIVE MBPS]`: brings N stalls up (two uplinks each),
//!   then for SECS seconds lets ACTIVE of them (default 0) each send MBPS Mbit/s of
//!   1200-byte UDP packets to 198.18.0.1:9; prints `{"stalls", "links_up", "seconds",
//!   "sent_packets"}`. Needs CAP_NET_ADMIN (the TUN device `snload0`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use stallnet::core::classify::{Classifier, ClassifyConfig};
use stallnet::core::qos::ALL_CLASSES;
use stallnet::driver::bond::{Bond, BondConfig, Side};
use stallnet::driver::session::{self, Hello};
use stallnet::identity;
use tokio_util::sync::CancellationToken;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("prepare") => {
            let [n, dir] = &args[1..] else {
                bail!("usage: prepare N DIR");
            };
            prepare(n.parse()?, Path::new(dir))
        }
        Some("run") => {
            let (hub, id, dir, n, secs, active, mbps) = match &args[1..] {
                [h, i, d, n, s] => (h, i, d, n, s, "0", "0"),
                [h, i, d, n, s, a, m] => (h, i, d, n, s, a.as_str(), m.as_str()),
                _ => bail!("usage: run HUB HUB_ID DIR N SECS [ACTIVE MBPS]"),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(run(
                hub.parse()?,
                id,
                Path::new(dir),
                n.parse()?,
                secs.parse()?,
                active.parse()?,
                mbps.parse()?,
            ))
        }
        _ => bail!("usage: stallnet-load prepare N DIR | run HUB HUB_ID DIR N SECS [ACTIVE MBPS]"),
    }
}

fn prepare(n: usize, dir: &Path) -> Result<()> {
    let mut devices = String::new();
    for i in 0..n {
        let me = identity::keygen(&dir.join(format!("stall-{i}")), true)?;
        devices.push_str(&format!(
            "[[hub.devices]]\nname = \"load-{i}\"\nidentity = \"{}\"\nlan = [\"10.1.0.0/24\"]\n\n",
            me.id
        ));
    }
    std::fs::write(dir.join("devices.toml"), devices)?;
    Ok(())
}

/// One UDP packet of 1200 bytes from the stall's LAN to the internet's discard port.
fn packet(seq: u32) -> Bytes {
    let b = made::udp([10, 1, 0, 2], [198, 18, 0, 1], 40000, 9, 1172, seq);
    Bytes::from(b)
}

/// A minimal IPv4/UDP packet (checksums the hub does not verify are left zero: UDP's,
/// which IPv4 allows; the IPv4 header's is computed).
mod made {
    pub fn udp(
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        payload: usize,
        seq: u32,
    ) -> Vec<u8> {
        let total = 28 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let mut acc: u32 = 0;
        for c in p[..20].chunks_exact(2) {
            acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        p[10..12].copy_from_slice(&(!(acc as u16)).to_be_bytes());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        p
    }
}

struct Stall {
    bond: Arc<Bond>,
    _endpoints: Vec<quinn::Endpoint>,
}

async fn stall(
    hub: SocketAddr,
    hub_id: &str,
    dir: &Path,
    i: usize,
    tun: stallnet::driver::bond::Tun,
    cancel: &CancellationToken,
) -> Result<Stall> {
    let me = identity::load(&dir.join(format!("stall-{i}")))?;
    let specs = stallnet_netconf::classes::effective_classes(&Default::default());
    let sched = stallnet::classes::sched_config(&specs, stallnet_netconf::SchedMode::Aggregate);
    let rules = stallnet::classes::core_rules(&stallnet_netconf::classes::default_rules());
    let bond = Bond::new(
        tun,
        BondConfig {
            side: Side::Edge,
            sched,
            classifier: Classifier::new(&rules, ClassifyConfig::default()),
            lan_map: None,
            mtu: 1280,
        },
        None,
        cancel.child_token(),
    );
    let client = identity::client_config(&me, &[hub_id.to_string()])?;
    let epoch: u64 = rand::random();
    let mut endpoints = Vec::new();
    for link in ["wifi", "cell"] {
        let mut ep = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))?;
        ep.set_default_client_config(client.clone());
        let id = bond.add_link(link, false, ALL_CLASSES, None);
        let conn = ep
            .connect(hub, identity::HUB_NAME)?
            .await
            .with_context(|| format!("stall {i} {link}: handshake"))?;
        let w = session::hello(
            &conn,
            &Hello {
                version: 1,
                epoch,
                link: link.into(),
                backup: false,
                link_classes: None,
                classes: Some(specs.clone()),
            },
        )
        .await?;
        bond.peer_epoch(w.epoch);
        bond.attach(id, conn);
        endpoints.push(ep);
    }
    Ok(Stall {
        bond,
        _endpoints: endpoints,
    })
}

async fn run(
    hub: SocketAddr,
    hub_id: &str,
    dir: &Path,
    n: usize,
    secs: f64,
    active: usize,
    mbps: f64,
) -> Result<()> {
    let tun = stallnet::driver::sys::tun("snload0", 1280, None)?;
    let cancel = CancellationToken::new();
    let mut stalls = Vec::with_capacity(n);
    // A few at a time, as a market's boxes come up.
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let joins: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let (tun, cancel, dir, hub_id) = (
                    tun.clone(),
                    cancel.clone(),
                    dir.to_path_buf(),
                    hub_id.to_string(),
                );
                tokio::spawn(async move { stall(hub, &hub_id, &dir, i, tun, &cancel).await })
            })
            .collect();
        for j in joins {
            stalls.push(j.await??);
        }
    }
    let start = Instant::now();
    let mut sent = 0u64;
    if active > 0 && mbps > 0.0 {
        // Packets per stall per millisecond tick.
        let pps = mbps * 1e6 / (1200.0 * 8.0);
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut due = 0.0f64;
        while start.elapsed().as_secs_f64() < secs {
            tick.tick().await;
            due += pps / 1000.0;
            while due >= 1.0 {
                due -= 1.0;
                for s in stalls.iter().take(active) {
                    let _ = s.bond.send(packet(sent as u32), false);
                    sent += 1;
                }
            }
        }
    } else {
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    }
    let links_up: usize = stalls
        .iter()
        .map(|s| s.bond.status().links.iter().filter(|l| l.connected).count())
        .sum();
    println!(
        "{}",
        serde_json::json!({
            "stalls": stalls.len(),
            "links_up": links_up,
            "seconds": start.elapsed().as_secs_f64(),
            "sent_packets": sent,
        })
    );
    cancel.cancel();
    Ok(())
}

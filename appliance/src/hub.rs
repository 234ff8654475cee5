//! The hub role: one QUIC server endpoint, admitting only listed devices; each device's
//! connections form its bond; download traffic from the hub's TUN device is routed to the
//! device whose LAN (or tunnel address) it is for, through that bond's scheduler.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use ipnet::IpNet;
use stallnet_netconf::Config;
use tokio_util::sync::CancellationToken;

use crate::classes;
use crate::control::{self, ActionError, Daemon};
use crate::core::classify::{Classifier, ClassifyConfig};
use crate::core::lan_map::{LanMap, Routes};
use crate::core::packet;
use crate::core::qos::{bit, ClassMask, ALL_CLASSES};
use crate::driver::bond::{Bond, BondConfig, Side};
use crate::driver::kernel::Kernel;
use crate::driver::session::{self, Welcome};
use crate::driver::sys;
use crate::events::{EventLog, Level};
use crate::identity;
use crate::status::{self, Status};

struct Device {
    name: String,
    identity: String,
    /// Its tunnel address.
    address: IpAddr,
    /// Its IPv4 LAN and where that appears on the hub.
    map: LanMap,
    bond: Arc<Bond>,
    mode: stallnet_netconf::SchedMode,
}

/// Runs the hub until `cancel`; whatever way it ends (an error half-way through the
/// start included), the kernel is left as it was found.
pub async fn run(
    cfg: Config,
    config_path: Option<std::path::PathBuf>,
    notes: Vec<(Level, &'static str, String)>,
    cancel: CancellationToken,
) -> Result<()> {
    let c = cancel.clone();
    Kernel::scoped(&cancel, |kernel| {
        run_with(kernel, cfg, config_path, notes, c)
    })
    .await
}

async fn run_with(
    kernel: Arc<Kernel>,
    cfg: Config,
    config_path: Option<std::path::PathBuf>,
    notes: Vec<(Level, &'static str, String)>,
    cancel: CancellationToken,
) -> Result<()> {
    // Everything the config asks for, built before the kernel is touched.
    let plan = crate::plan::hub(&cfg)
        .context("the config validated but cannot run (please report this)")?;
    let h = cfg.hub().context("config has no [hub] section")?.clone();
    let me = identity::load(&cfg.state_dir)?;
    std::fs::create_dir_all(&cfg.runtime_dir)
        .with_context(|| format!("creating {}", cfg.runtime_dir.display()))?;
    let hub_addr = plan.hub_address;
    kernel.sysctl("net/ipv4/ip_forward", "1")?;
    let tun = sys::tun(&h.tun_name, h.mtu, Some((hub_addr, plan.prefix_len)))?;
    kernel.owns_nft_table(crate::hub_isolation::FAMILY, crate::hub_isolation::TABLE);
    crate::driver::kernel::nft(&plan.isolation)
        .await
        .context("isolating the stalls (nft table inet stallnet_hub)")?;
    let nl = &kernel.nl;
    let tun_index = nl.link(&h.tun_name).await?.context("TUN vanished")?.index;

    let mut devices = Vec::new();
    // The plan holds an address, the download rules and the LAN's blocks for each device,
    // in config order.
    let per_device = plan
        .device_addresses
        .iter()
        .zip(&plan.device_rules)
        .zip(&plan.device_maps);
    for (d, ((address, rules), map)) in h.devices.iter().zip(per_device) {
        let d = d.get_ref();
        let address = IpAddr::V4(*address);
        // The kernel routes each device's blocks (and IPv6 LAN prefixes, as they are)
        // into the TUN; the reader finds the device by `plan.routes`.
        for b in map.blocks() {
            nl.route_prefix(IpNet::V4(b), tun_index, 254).await?;
        }
        for p in d.lan.iter().filter(|p| p.network().is_ipv6()) {
            nl.route_prefix(*p, tun_index, 254).await?;
        }
        for (lan, block) in d.lan.iter().filter_map(|p| match p {
            IpNet::V4(n) => map.mapped(n.network()).map(|m| (n, m)),
            IpNet::V6(_) => None,
        }) {
            tracing::info!(device = %d.name, "LAN {lan} appears on the hub at {block}/{}", lan.prefix_len());
        }
        let mut accept = d.lan.clone();
        accept.push(IpNet::from(address));
        let bond = Bond::new(
            tun.clone(),
            BondConfig {
                side: Side::Hub,
                sched: plan.sched.clone(),
                classifier: Classifier::new(rules, ClassifyConfig::default()),
                lan_map: Some(map.clone()),
            },
            Some(accept),
            cancel.child_token(),
        );
        bond.set_icmp_source(IpAddr::V4(hub_addr));
        devices.push(Arc::new(Device {
            name: d.name.clone(),
            identity: d.identity.clone(),
            address,
            map: map.clone(),
            bond,
            mode: h.mode,
        }));
    }
    let devices = Arc::new(devices);
    let allow: identity::AllowList = Arc::new(RwLock::new(
        devices.iter().map(|d| d.identity.clone()).collect(),
    ));
    let refused = Arc::new(AtomicU64::new(0));
    let server = identity::server_config(&me, allow, refused.clone())?;
    let endpoint = quinn::Endpoint::server(server, h.listen)
        .with_context(|| format!("listening on {}", h.listen))?;
    tracing::info!(identity = %me.id, listen = %h.listen, "hub running");

    let epoch: u64 = rand::random();
    let (d, ep) = (devices.clone(), endpoint.clone());
    let acceptor = tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let d = d.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(incoming, d, epoch).await {
                    tracing::debug!("connection: {e:#}");
                }
            });
        }
    });
    let (d, t, r) = (devices.clone(), tun.clone(), plan.routes.clone());
    let mss = h.mtu.saturating_sub(40);
    let reader = tokio::spawn(async move { tun_reader(d, r, t, mss).await });

    let latest: Arc<std::sync::Mutex<Option<Status>>> = Arc::default();
    let events = Arc::new(EventLog::new());
    events.push(Level::Info, "started", None, "stallnet hub started".into());
    for (level, kind, msg) in notes {
        events.push(level, kind, None, msg);
    }
    control::spawn(
        Arc::new(HubDaemon(latest.clone())),
        events.clone(),
        &cfg,
        cancel.clone(),
    );
    // An unconfirmed apply that times out: the hub restarts to take the restored file.
    let restart = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(path) = config_path {
        let (r, c) = (restart.clone(), cancel.clone());
        let after = move || {
            r.store(true, Ordering::SeqCst);
            c.cancel();
        };
        let (ev, dir, c) = (events.clone(), cfg.state_dir.clone(), cancel.clone());
        tokio::spawn(crate::confirm::guard(path, dir, ev, after, c));
    }
    let mut online: Vec<bool> = vec![false; devices.len()];
    let started = std::time::Instant::now();
    let mut notifier = crate::service::Notifier::new();
    notifier.ready("listening");
    let mut clock_saved: Option<std::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let (mut ticks, mut isolation) = (0u64, None::<serde_json::Value>);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => {
                notifier.stopping();
                break;
            }
        }
        notifier.tick(&format!(
            "{} of {} devices online",
            devices.iter().filter(|d| d.bond.online()).count(),
            devices.len()
        ));
        let clock = status::clock_state();
        if clock != "wrong" && clock_saved.is_none_or(|t| t.elapsed() >= crate::clock::SAVE_EVERY) {
            if let Err(e) = crate::clock::save(&cfg.state_dir) {
                tracing::warn!("saving the time: {e:#}");
            }
            clock_saved = Some(std::time::Instant::now());
        }
        let bonds: serde_json::Map<String, serde_json::Value> = devices
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    serde_json::to_value(d.bond.status()).unwrap_or_default(),
                )
            })
            .collect();
        // The isolation table's drops, every 2 s (each read runs nft twice).
        if ticks % 4 == 0 {
            match crate::hub_isolation::dropped().await {
                Ok((between, to_hub)) => {
                    isolation = Some(serde_json::json!({
                        "between_stalls": between,
                        "to_hub": to_hub,
                    }))
                }
                Err(e) => tracing::debug!("isolation counters: {e:#}"),
            }
        }
        ticks += 1;
        let any_online = devices.iter().any(|d| d.bond.online());
        let doc = Status {
            version: 1,
            role: "hub".into(),
            state: if any_online { "online" } else { "offline" }.into(),
            fallback_active: false,
            tunnel_address: Some(hub_addr.to_string()),
            refused_handshakes: refused.load(Ordering::Relaxed),
            bonds: serde_json::Value::Object(bonds),
            commerce: None,
            uptime_s: started.elapsed().as_secs(),
            peer: None,
            clock,
            stream_advice: None,
            lan_source_cap: None,
            isolation: isolation.clone(),
        };
        if let Err(e) = status::write(&cfg.runtime_dir, &doc) {
            tracing::warn!("status: {e:#}");
        }
        if let Ok(mut l) = latest.lock() {
            *l = Some(doc);
        }
        for (d, was) in devices.iter().zip(online.iter_mut()) {
            let now = d.bond.online();
            if now != *was {
                let (level, kind, what) = if now {
                    (Level::Info, "online", "connected")
                } else {
                    (
                        Level::Warning,
                        "offline",
                        "lost (no uplink reaches the hub)",
                    )
                };
                events.push(level, kind, None, format!("device {}: {what}", d.name));
                *was = now;
            }
        }
    }
    endpoint.close(0u32.into(), b"shutdown");
    acceptor.abort();
    reader.abort();
    if restart.load(Ordering::SeqCst) {
        bail!("exiting so that the service manager restarts stallnet with the restored config");
    }
    Ok(())
}

/// Admits one connection into its device's bond for as long as it lives.
async fn serve(
    incoming: quinn::Incoming,
    devices: Arc<Vec<Arc<Device>>>,
    epoch: u64,
) -> Result<()> {
    let conn = incoming.await.context("handshake")?;
    let peer = conn
        .peer_identity()
        .and_then(|p| {
            p.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().map(|c| identity::identity_of(c)))
        .context("no client certificate")?;
    let Some(dev) = devices.iter().find(|d| d.identity == peer).cloned() else {
        conn.close(1u32.into(), b"");
        bail!("unknown identity {peer}");
    };
    let address = dev.address;
    let hello = session::welcome(&conn, |_| {
        Ok(Welcome {
            version: 1,
            epoch,
            address,
        })
    })
    .await?;
    tracing::info!(device = %dev.name, link = %hello.link, remote = %conn.remote_address(), "uplink joined");
    dev.bond.peer_epoch(hello.epoch);
    if let Some(specs) = &hello.classes {
        dev.bond.configure(classes::sched_config(specs, dev.mode));
    }
    let mask = hello.link_classes.as_deref().map_or(ALL_CLASSES, mask_of);
    let id = dev.bond.add_link(&hello.link, hello.backup, mask, None);
    dev.bond.attach(id, conn.clone());
    // What the edge says of the uplink while it runs, in order, until the connection ends.
    loop {
        match session::next_update(&conn).await {
            Ok(Some(u)) => {
                tracing::info!(device = %dev.name, link = %hello.link, backup = u.backup, classes = ?u.link_classes, "uplink updated");
                if let Some(specs) = &u.classes {
                    dev.bond.configure(classes::sched_config(specs, dev.mode));
                }
                dev.bond.set_backup(id, u.backup);
                dev.bond.set_link_config(id, mask_of(&u.link_classes), None);
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(device = %dev.name, link = %hello.link, "bad link update: {e:#}")
            }
        }
    }
    let reason = conn.closed().await;
    tracing::info!(device = %dev.name, link = %hello.link, "uplink left: {reason}");
    dev.bond.remove_link(id);
    Ok(())
}

/// The class mask of the classes named.
fn mask_of(names: &[stallnet_netconf::ClassName]) -> ClassMask {
    names.iter().fold(0, |m, n| m | bit(classes::class_of(*n)))
}

async fn tun_reader(
    devices: Arc<Vec<Arc<Device>>>,
    routes: Routes,
    tun: Arc<tun::AsyncDevice>,
    mss: u16,
) -> Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = tun.recv(&mut buf).await.context("TUN read")?;
        let pkt = &mut buf[..n];
        let Some((_, dst)) = packet::addrs(pkt) else {
            continue;
        };
        let Some(dev) = routes.lookup(dst).and_then(|i| devices.get(i)) else {
            continue;
        };
        // Back to the device's own LAN address (its tunnel address stays).
        dev.map.to_device(pkt);
        packet::clamp_mss(pkt, mss);
        // Malformed packets are counted by the bond and dropped.
        let _ = dev.bond.send(Bytes::copy_from_slice(pkt), false);
    }
}

/// The hub as the control API sees it: status and events; uplink actions belong to edges.
struct HubDaemon(Arc<std::sync::Mutex<Option<Status>>>);

impl Daemon for HubDaemon {
    fn snapshot(&self) -> Option<Status> {
        self.0.lock().ok().and_then(|l| l.clone())
    }

    fn act(&self, _action: control::Action) -> Result<String, ActionError> {
        Err(ActionError::new(
            axum::http::StatusCode::CONFLICT,
            "not_on_hub",
            "uplink actions and reloads are done on the edge (the stall's box)",
        ))
    }
}

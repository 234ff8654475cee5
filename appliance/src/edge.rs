//! The edge role: LAN traffic from the TUN device into the bond, one QUIC connection per
//! uplink, uplinks followed through netlink, and the direct fallback when the hub is gone.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use ipnet::IpNet;
use stallnet_netconf::{Config, EdgeConfig, Fallback, Uplink, UplinkPriority, UpstreamPath};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::classes;
use crate::control::{self, ActionError, Daemon};
use crate::core::classify::{Classifier, ClassifyConfig, DeviceRef};
use crate::core::fallback::{Action, Candidate, DirectFallback};
use crate::core::packet;
use crate::core::scheduler::LinkId;
use crate::driver::bond::{Bond, BondConfig, Sent, Side};
use crate::driver::netlink::Netlink;
use crate::driver::session::{self, Hello};
use crate::driver::sys;
use crate::events::{self, EventLog, Level, LinkSeen};
use crate::identity;
use crate::status::{self, Status};

mod reach;

/// Offline this long before the direct fallback takes over.
const FALLBACK_AFTER: Duration = Duration::from_secs(2);
const NFT_TABLE: &str = "stallnet_fallback";

/// What the uplink tasks last saw of their interface (for the fallback).
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    index: u32,
    carrier: bool,
    gateway: Option<Ipv4Addr>,
}

struct Ctx {
    cfg: EdgeConfig,
    nl: Netlink,
    bond: Arc<Bond>,
    client: quinn::ClientConfig,
    epoch: u64,
    seen: Mutex<Vec<Seen>>,
    tunnel_address: Mutex<Option<IpAddr>>,
    cancel: CancellationToken,
    /// The operator's overrides (runtime only; the config is the lasting truth).
    admin: Mutex<Admin>,
    /// Per uplink: wakes its task when the operator changes something.
    wake: Vec<Arc<tokio::sync::Notify>>,
    link_ids: Mutex<Vec<LinkId>>,
    events: Arc<EventLog>,
    latest: Mutex<Option<Status>>,
    config_path: Option<PathBuf>,
    /// Set when the daemon must restart to take a restored config.
    restart: std::sync::atomic::AtomicBool,
    /// The LAN the daemon manages (`[lan]`), if any.
    lan: Option<crate::lan_setup::Lan>,
    /// Per uplink with a cap: (used, limit, period start) for the status.
    caps: Mutex<Vec<Option<(u64, u64, i64)>>>,
    /// Per uplink: its reachability checks' verdicts and login window.
    reach: Vec<reach::Slot>,
    /// Per cellular uplink: what ModemManager says of its modem.
    modems: Mutex<Vec<Option<crate::modem::ModemFacts>>>,
    /// `[commerce]` as started, and its service (for reloads).
    commerce_cfg: Option<stallnet_netconf::CommerceConfig>,
    commerce: std::sync::OnceLock<Arc<CommerceService>>,
}

type CommerceService = crate::commerce::api::Service<crate::commerce::store::SledStore>;

#[derive(Debug, Default)]
struct Admin {
    disabled: Vec<bool>,
    preferred: Option<usize>,
}

pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    notes: Vec<(Level, &'static str, String)>,
    cancel: CancellationToken,
) -> Result<()> {
    let e = cfg.edge().context("config has no [edge] section")?.clone();
    let me = identity::load(&cfg.state_dir)?;
    let pins: Vec<String> = e
        .hubs
        .iter()
        .map(|h| h.identity.get_ref().clone())
        .collect();
    let client = identity::client_config(&me, &pins)?;
    std::fs::create_dir_all(&cfg.runtime_dir)
        .with_context(|| format!("creating {}", cfg.runtime_dir.display()))?;
    sys::sysctl("net/ipv4/ip_forward", "1")?;

    let tun = sys::tun(&e.tun_name, e.mtu, None)?;
    let nl = Netlink::new()?;
    let tun_index = nl
        .link(&e.tun_name)
        .await?
        .context("TUN device vanished")?
        .index;
    let tunnel_table = e.table_base;
    nl.set_default_route(tunnel_table, tun_index, None).await?;
    for p in &e.lan {
        if let IpNet::V4(p) = p {
            // Traffic to the LAN (the box's own answers from its LAN address included)
            // stays local; traffic from it enters the tunnel.
            nl.rule_to(*p, 254, 999).await?;
            nl.rule_from(*p, tunnel_table, 1000).await?;
        }
    }
    let lan = match &cfg.lan {
        Some(l) => Some(
            crate::lan_setup::Lan::start(
                l.get_ref(),
                e.dhcp_leases.clone(),
                cfg.runtime_dir.clone(),
                stallnet_netconf::firewall::Inputs {
                    api: cfg.commerce().map(|c| c.listen),
                    metrics: cfg.metrics.as_ref().map(|m| m.listen),
                    guest_prefixes: cfg
                        .commerce()
                        .map(|c| c.deny_from.clone())
                        .unwrap_or_default(),
                },
                cancel.child_token(),
            )
            .await
            .context("setting up the LAN")?,
        ),
        None => None,
    };
    let specs = classes::specs(&e);
    let classifier = Classifier::new(&classes::rules(&e), ClassifyConfig::default());
    let device_rules: Vec<(usize, DeviceRef)> = classifier
        .rules()
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.devices.clone().map(|d| (i, d)))
        .collect();
    let bond = Bond::new(
        tun.clone(),
        BondConfig {
            side: Side::Edge,
            sched: classes::sched_config(&specs, e.mode),
            classifier,
        },
        None,
        cancel.child_token(),
    );
    let ctx = Arc::new(Ctx {
        seen: Mutex::new(vec![Seen::default(); e.uplinks.len()]),
        cfg: e.clone(),
        nl,
        bond,
        client,
        epoch: rand::random(),
        tunnel_address: Mutex::new(None),
        cancel: cancel.clone(),
        admin: Mutex::new(Admin {
            disabled: vec![false; e.uplinks.len()],
            preferred: None,
        }),
        wake: (0..e.uplinks.len()).map(|_| Arc::default()).collect(),
        link_ids: Mutex::new(Vec::new()),
        events: Arc::new(EventLog::new()),
        latest: Mutex::new(None),
        config_path,
        restart: std::sync::atomic::AtomicBool::new(false),
        lan,
        caps: Mutex::new(vec![None; e.uplinks.len()]),
        reach: (0..e.uplinks.len())
            .map(|_| reach::Slot::default())
            .collect(),
        modems: Mutex::new(vec![None; e.uplinks.len()]),
        commerce_cfg: cfg.commerce().cloned(),
        commerce: std::sync::OnceLock::new(),
    });

    ctx.events
        .push(Level::Info, "started", None, "stallnet edge started".into());
    if e.hubs.is_empty() {
        ctx.events.push(
            Level::Warning,
            "no_hub",
            None,
            "no hub configured: LAN traffic goes straight out of the uplinks (no bonding) \
             and sales wait on the box until a hub is set"
                .into(),
        );
    }
    for (level, kind, msg) in notes {
        ctx.events.push(level, kind, None, msg);
    }
    for u in e.uplinks.iter().map(|u| u.get_ref()) {
        match crate::wifi_link::write_conf(u, &cfg.runtime_dir) {
            Ok(Some(conf)) => {
                let (u, c) = (u.clone(), cancel.child_token());
                tokio::spawn(crate::wifi_link::run(u, conf, c));
            }
            Ok(None) => {}
            Err(e) => tracing::error!(uplink = %u.name, "wifi settings: {e:#}"),
        }
    }
    for (i, u) in e.uplinks.iter().enumerate() {
        let u = u.get_ref().clone();
        if u.kind == stallnet_netconf::UplinkKind::Cellular {
            let c = ctx.clone();
            tokio::spawn(async move { modem_task(c, i, u).await });
        }
    }
    for (i, u) in e.uplinks.iter().enumerate() {
        let u = u.get_ref().clone();
        if u.cap.is_some() {
            let (c, dir) = (ctx.clone(), cfg.state_dir.clone());
            tokio::spawn(async move { cap_task(c, i, u, dir).await });
        }
    }
    let (change_tx, change_rx) = watch::channel(0u64);
    let mut feed = Netlink::watch()?;
    tokio::spawn(async move {
        let mut n = 0u64;
        while feed.recv().await.is_some() {
            n += 1;
            if change_tx.send(n).is_err() {
                break;
            }
        }
    });
    for (i, u) in e.uplinks.iter().enumerate() {
        let u = u.get_ref().clone();
        let id = ctx.bond.add_link(
            &u.name,
            u.priority == UplinkPriority::Backup,
            classes::link_mask(&specs, &u),
            Some(classes::rate_config(&u)),
        );
        if let Ok(mut ids) = ctx.link_ids.lock() {
            ids.push(id);
        }
        let (c, rx) = (ctx.clone(), change_rx.clone());
        tokio::spawn(async move { uplink_task(c, i, id, u, rx).await });
    }
    if e.reachability.enabled {
        let tls = crate::reach_probe::tls_config(e.reachability.ca_file.as_deref())?;
        for (i, u) in e.uplinks.iter().enumerate() {
            let (c, u, tls) = (ctx.clone(), u.get_ref().clone(), tls.clone());
            tokio::spawn(async move { reach::run(c, i, u, tls).await });
        }
    }
    control::spawn(
        Arc::new(EdgeDaemon(ctx.clone())),
        ctx.events.clone(),
        &cfg,
        cancel.clone(),
    );
    let c = ctx.clone();
    let reader = tokio::spawn(async move { tun_reader(c, tun).await });
    let commerce = match cfg.commerce().cloned() {
        Some(com) => {
            let bond = ctx.bond.clone();
            let online: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || bond.online());
            let svc = Arc::new(crate::commerce::service(
                &com,
                &cfg.state_dir,
                me.signing_key()?,
                online,
            )?);
            let via_tunnel = com
                .upstream
                .as_ref()
                .map(|u| u.get_ref())
                .filter(|u| u.via == UpstreamPath::Tunnel)
                .map(|u| u.url.clone());
            if let Some(url) = via_tunnel {
                let c = ctx.clone();
                tokio::spawn(async move { route_upstream(c, tun_index, url).await });
            }
            let _ = ctx.commerce.set(svc.clone());
            let (s, c) = (svc.clone(), cancel.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::commerce::run(s, com, c).await {
                    tracing::error!("commerce service: {e:#}");
                }
            });
            Some(svc)
        }
        None => None,
    };
    if !device_rules.is_empty() {
        let c = ctx.clone();
        tokio::spawn(async move { resolve_devices(c, device_rules).await });
    }
    tracing::info!(identity = %me.id, "edge running");

    if let Some(path) = ctx.config_path.clone() {
        let c = ctx.clone();
        let after = move || {
            let d = EdgeDaemon(c.clone());
            match d.reload_inner() {
                Ok((_, restart)) if restart.is_empty() => {}
                Ok((_, restart)) => {
                    tracing::warn!(
                        "the restored config changes {}: restarting",
                        restart.join(", ")
                    );
                    c.restart.store(true, std::sync::atomic::Ordering::SeqCst);
                    c.cancel.cancel();
                }
                Err(e) => tracing::error!("reloading the restored config: {}", e.message),
            }
        };
        let (events, dir, c) = (ctx.events.clone(), cfg.state_dir.clone(), cancel.clone());
        tokio::spawn(crate::confirm::guard(path, dir, events, after, c));
    }

    let result = supervise(&ctx, &cfg, tun_index, commerce).await;
    reader.abort();
    cancel.cancel();
    ctx.nl.revert().await;
    let _ = nft_delete().await;
    if ctx.restart.load(std::sync::atomic::Ordering::SeqCst) {
        anyhow::bail!(
            "exiting so that the service manager restarts stallnet with the restored config"
        );
    }
    result
}

/// Publishes status and drives the direct fallback until cancelled.
async fn supervise(
    ctx: &Arc<Ctx>,
    cfg: &Config,
    tun_index: u32,
    commerce: Option<Arc<crate::commerce::api::Service<crate::commerce::store::SledStore>>>,
) -> Result<()> {
    let mut commerce_doc = None;
    let mut ticks = 0u64;
    let started = Instant::now();
    let mut clock = status::clock_state();
    let mut fallback = DirectFallback::new(ctx.cfg.fallback == Fallback::Direct, FALLBACK_AFTER);
    let mut was_online = false;
    let mut links_seen = vec![LinkSeen::default(); ctx.cfg.uplinks.len()];

    let mut notifier = crate::service::Notifier::new();
    notifier.ready("starting: connecting uplinks");
    let mut clock_saved: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ctx.cancel.cancelled() => {
                notifier.stopping();
                return Ok(());
            }
        }
        let b = ctx.bond.status();
        if b.online != was_online {
            if b.online {
                ctx.events
                    .push(Level::Info, "online", None, "the hub is reachable".into());
            } else {
                ctx.events.push(
                    Level::Critical,
                    "offline",
                    None,
                    "offline: no uplink reaches the hub; sales are kept on the box".into(),
                );
            }
            was_online = b.online;
        }
        for (i, l) in b.links.iter().enumerate() {
            let now = LinkSeen {
                state: l.state.clone(),
                degraded: l.degraded,
            };
            if let Some(before) = links_seen.get_mut(i) {
                events::link_change(&ctx.events, &l.name, before, &now);
                *before = now;
            }
        }
        let seen = ctx.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let candidates: Vec<Candidate> = seen
            .iter()
            .enumerate()
            .map(|(i, s)| Candidate {
                uplink: i,
                carrier: s.carrier && s.index != 0,
                backup: ctx.cfg.uplinks[i].get_ref().priority == UplinkPriority::Backup,
            })
            .collect();
        match fallback.update(b.online, &candidates, Instant::now()) {
            Some(Action::Use(i)) => {
                let u = ctx.cfg.uplinks[i].get_ref();
                ctx.events.push(
                    Level::Warning,
                    "fallback_on",
                    Some(&u.name),
                    format!(
                        "hub unreachable on every uplink: LAN traffic goes directly out of {}",
                        u.name
                    ),
                );
                ctx.nl
                    .set_default_route(ctx.cfg.table_base, seen[i].index, seen[i].gateway)
                    .await?;
                nft_masquerade(&u.interface, &ctx.cfg.lan).await?;
            }
            Some(Action::Leave) => {
                ctx.events.push(
                    Level::Info,
                    "fallback_off",
                    None,
                    "the hub is back: LAN traffic uses the tunnel again".into(),
                );
                ctx.nl
                    .set_default_route(ctx.cfg.table_base, tun_index, None)
                    .await?;
                nft_delete().await?;
            }
            None => {}
        }
        let up = b.links.iter().filter(|l| l.state == "up").count();
        let state = if !b.online {
            "offline"
        } else if up < b.links.iter().filter(|l| l.state != "disabled").count() {
            // An uplink the operator switched off does not make the box degraded.
            "degraded"
        } else {
            "online"
        };
        // The commerce figures read the store: once a second is plenty.
        if ticks % 4 == 0 {
            clock = status::clock_state();
            commerce_doc = commerce
                .as_ref()
                .and_then(|s| crate::commerce::api::status(s).ok());
        }
        ticks += 1;
        let (kinds, admin) = (
            ctx.cfg.uplinks.iter().map(|u| u.get_ref().kind),
            ctx.admin.lock().map(|a| a.preferred).ok().flatten(),
        );
        let stream_advice = stream_advice(&ctx.cfg, &b);
        let caps = ctx.caps.lock().map(|c| c.clone()).unwrap_or_default();
        let modems = ctx.modems.lock().map(|m| m.clone()).unwrap_or_default();
        let mut b = serde_json::to_value(&b).unwrap_or_default();
        if let Some(links) = b["links"].as_array_mut() {
            for (i, (l, kind)) in links.iter_mut().zip(kinds).enumerate() {
                l["kind"] = serde_json::to_value(kind).unwrap_or_default();
                l["preferred"] = (admin == Some(i)).into();
                if let Some(Some(m)) = modems.get(i) {
                    l["modem"] = serde_json::to_value(m).unwrap_or_default();
                }
                if let Some(v) = ctx.reach.get(i).and_then(|r| r.view.lock().ok()?.clone()) {
                    l["reachability"] = v;
                }
                if let Some(Some((used, limit, start))) = caps.get(i) {
                    l["cap"] = serde_json::json!({
                        "used_bytes": used, "limit_bytes": limit, "period_start": start,
                    });
                }
            }
        }
        let doc = Status {
            version: 1,
            role: "edge".into(),
            state: state.into(),
            fallback_active: fallback.active().is_some(),
            tunnel_address: ctx
                .tunnel_address
                .lock()
                .ok()
                .and_then(|a| a.map(|a| a.to_string())),
            refused_handshakes: 0,
            bonds: serde_json::json!({ "hub": b }),
            commerce: commerce_doc.clone(),
            uptime_s: started.elapsed().as_secs(),
            peer: ctx.cfg.hubs.first().map(|h| h.address.to_string()),
            clock: clock.clone(),
            stream_advice: Some(stream_advice),
        };
        if let Err(e) = status::write(&cfg.runtime_dir, &doc) {
            tracing::warn!("status: {e:#}");
        }
        notifier.tick(&format!(
            "{state}: {up} of {} uplinks up",
            ctx.cfg.uplinks.len()
        ));
        if clock != "wrong" && clock_saved.is_none_or(|t| t.elapsed() >= crate::clock::SAVE_EVERY) {
            if let Err(e) = crate::clock::save(&cfg.state_dir) {
                tracing::warn!("saving the time: {e:#}");
            }
            clock_saved = Some(Instant::now());
        }
        if let Ok(mut l) = ctx.latest.lock() {
            *l = Some(doc);
        }
    }
}

async fn nft(script: &str) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed?)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await?;
    }
    let st = child.wait().await?;
    anyhow::ensure!(st.success(), "nft failed: {script}");
    Ok(())
}

async fn nft_masquerade(iface: &str, lan: &[IpNet]) -> Result<()> {
    let srcs: Vec<String> = lan
        .iter()
        .filter(|p| matches!(p, IpNet::V4(_)))
        .map(|p| p.to_string())
        .collect();
    nft(&format!(
        "table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n\
         table ip {NFT_TABLE} {{ chain post {{ type nat hook postrouting priority srcnat; \
         oifname \"{iface}\" ip saddr {{ {} }} masquerade; }}\n}}\n",
        srcs.join(", ")
    ))
    .await
}

async fn nft_delete() -> Result<()> {
    nft(&format!(
        "table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n"
    ))
    .await
}

/// The bitrate a live-stream encoder can use now: a stream flow rides one uplink (the
/// class is lowest-latency), so 80 % of the best usable uplink's send rate among those
/// the stream class may use (rate control lowers it as soon as the uplink's queue grows),
/// never above the class's `max_rate`. 80 % leaves room for payments, the stream's own
/// audio and retransmissions.
fn stream_advice(cfg: &EdgeConfig, b: &crate::driver::bond::BondStatus) -> serde_json::Value {
    use crate::core::{qos::bit, Class};
    let specs = classes::specs(cfg);
    let class_max = specs
        .iter()
        .find(|s| s.name == stallnet_netconf::ClassName::Stream)
        .and_then(|s| s.max_rate);
    let best = cfg
        .uplinks
        .iter()
        .zip(&b.links)
        .filter(|(u, l)| {
            classes::link_mask(&specs, u.get_ref()) & bit(Class::Stream) != 0
                && l.state == "up"
                && !l.degraded
        })
        .map(|(u, l)| (u.get_ref().name.clone(), l.rate_mbps * 1e6))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    match best {
        None => serde_json::json!({
            "bitrate_bps": 0, "uplink": null,
            "basis": "no usable uplink may carry the stream",
        }),
        Some((name, rate)) => {
            let mut bps = rate * 0.8;
            let mut basis = format!("80 % of {name}'s current send rate");
            if let Some(m) = class_max {
                if (m as f64) < bps {
                    bps = m as f64;
                    basis = "the stream class's max_rate".into();
                }
            }
            serde_json::json!({ "bitrate_bps": bps as u64, "uplink": name, "basis": basis })
        }
    }
}

/// Counts a capped uplink's bytes and applies its cap (see [`crate::cap_meter`]).
async fn cap_task(ctx: Arc<Ctx>, idx: usize, u: Uplink, state_dir: PathBuf) {
    use crate::cap_meter::{self, Verdict};
    use crate::core::cap::CapEvent;
    let Some(spec) = cap_meter::spec(&u) else {
        return;
    };
    let path = cap_meter::state_path(&state_dir, &u.name);
    let mut st = cap_meter::load(&path);
    let mut imposed = Verdict::Normal;
    let mut saved = Instant::now();
    let mut tick = tokio::time::interval(cap_meter::INTERVAL);
    loop {
        let stop = tokio::select! {
            _ = tick.tick() => false,
            _ = ctx.cancel.cancelled() => true,
        };
        if stop {
            cap_meter::save(&path, &st);
            return;
        }
        let Some(counter) = cap_meter::counter(&u.interface) else {
            continue;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let events = st.observe(&spec, counter, now);
        for ev in &events {
            let (level, kind) = match ev {
                CapEvent::Reset => (Level::Info, "cap_reset"),
                CapEvent::Crossed(100) => (Level::Critical, "cap_reached"),
                CapEvent::Crossed(_) => (Level::Warning, "cap_warning"),
            };
            ctx.events.push(
                level,
                kind,
                Some(&u.name),
                cap_meter::describe(&u, &spec, *ev),
            );
        }
        let v = cap_meter::verdict(&u, &spec, &st);
        let id = ctx.link_ids.lock().ok().and_then(|l| l.get(idx).copied());
        if let (true, Some(id)) = (v != imposed, id) {
            let configured_backup = u.priority == UplinkPriority::Backup;
            let set_admin_off = |off: bool| {
                if let Ok(mut a) = ctx.admin.lock() {
                    if let Some(d) = a.disabled.get_mut(idx) {
                        *d = off;
                    }
                }
            };
            match v {
                Verdict::Off => {
                    set_admin_off(true);
                    ctx.bond.set_disabled(id, true);
                }
                Verdict::BackupOnly => ctx.bond.set_backup(id, true),
                Verdict::Normal => {
                    if imposed == Verdict::Off {
                        set_admin_off(false);
                        ctx.bond.set_disabled(id, false);
                    }
                    ctx.bond.set_backup(id, configured_backup);
                }
            }
            if let Some(w) = ctx.wake.get(idx) {
                w.notify_one();
            }
            imposed = v;
        }
        if let Ok(mut c) = ctx.caps.lock() {
            if let Some(slot) = c.get_mut(idx) {
                *slot = Some((st.used, spec.limit, st.period_start));
            }
        }
        if !events.is_empty() || saved.elapsed() >= Duration::from_secs(30) {
            cap_meter::save(&path, &st);
            saved = Instant::now();
        }
    }
}

/// Reads a cellular uplink's modem facts from ModemManager every 30 s, and connects a
/// registered modem with the configured APN.
async fn modem_task(ctx: Arc<Ctx>, idx: usize, u: Uplink) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    let mut tried: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ctx.cancel.cancelled() => return,
        }
        let facts = crate::modem::read(&u.interface).await;
        let retry = tried.is_none_or(|t| t.elapsed() >= Duration::from_secs(120));
        if let (Some(apn), true, true) = (&u.apn, crate::modem::wants_connect(&facts), retry) {
            tried = Some(Instant::now());
            let mmcli = std::path::Path::new("mmcli");
            match crate::modem::connect_with(mmcli, &u.interface, apn).await {
                Ok(()) => ctx.events.push(
                    Level::Info,
                    "modem_connected",
                    Some(&u.name),
                    format!("{}: the modem connected with APN {apn}", u.name),
                ),
                Err(e) => ctx.events.push(
                    Level::Warning,
                    "modem_connect_failed",
                    Some(&u.name),
                    format!("{}: connecting with APN {apn} failed: {e}", u.name),
                ),
            }
        }
        if let Ok(mut m) = ctx.modems.lock() {
            if let Some(slot) = m.get_mut(idx) {
                *slot = Some(facts);
            }
        }
    }
}

/// Sends the box's own deliveries to the commerce upstream through the tunnel, like the
/// LAN's traffic: the tunnel address the hub assigned goes on the TUN device, and host
/// routes in the main table send the upstream's addresses (re-resolved every minute)
/// into it with that address as source. The tunnel's QUIC sockets are unaffected: their
/// marks select the per-uplink tables before the main table is consulted.
async fn route_upstream(ctx: Arc<Ctx>, tun_index: u32, url: String) {
    const MAIN: u32 = 254;
    let Some((host, port)) = crate::commerce::upstream::endpoint(&url) else {
        tracing::warn!("commerce upstream URL has no host: deliveries go direct");
        return;
    };
    let mut assigned: Option<Ipv4Addr> = None;
    let mut routed: Vec<Ipv4Addr> = Vec::new();
    let mut resolved_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ctx.cancel.cancelled() => return,
        }
        let addr = ctx.tunnel_address.lock().ok().and_then(|a| *a);
        let Some(IpAddr::V4(addr)) = addr else {
            continue;
        };
        if assigned != Some(addr) {
            // The tunnel address alone on the TUN device.
            let host = ipnet::Ipv4Net::from(addr);
            match ctx.nl.set_only_prefix(tun_index, Some(host)).await {
                Ok(()) => {
                    assigned = Some(addr);
                    routed.clear();
                    resolved_at = None;
                }
                Err(e) => {
                    tracing::warn!("tunnel address on the TUN device: {e:#}");
                    continue;
                }
            }
        }
        if resolved_at.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            continue;
        }
        let found = match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(a) => a.map(|s| s.ip()).collect::<Vec<_>>(),
            Err(e) => {
                tracing::debug!(%host, "resolving the commerce upstream: {e}");
                continue;
            }
        };
        resolved_at = Some(Instant::now());
        let want = crate::commerce::upstream::tunnel_targets(found, &ctx.cfg.lan);
        if want.is_empty() {
            tracing::info!(%host, "the commerce upstream has no IPv4 address to reach through the tunnel");
        }
        for old in routed.iter().filter(|a| !want.contains(a)) {
            ctx.nl.unroute_host(*old, tun_index, MAIN).await;
        }
        routed.retain(|a| want.contains(a));
        for a in want {
            if routed.contains(&a) {
                continue;
            }
            match ctx.nl.route_host(a, tun_index, addr, MAIN).await {
                Ok(()) => {
                    tracing::info!(upstream = %a, source = %addr, "commerce deliveries go through the tunnel");
                    routed.push(a);
                }
                Err(e) => tracing::warn!("route to the commerce upstream: {e:#}"),
            }
        }
    }
}

async fn tun_reader(ctx: Arc<Ctx>, tun: Arc<tun::AsyncDevice>) -> Result<()> {
    let mss = ctx.cfg.mtu.saturating_sub(40);
    // Without a direct fallback, POS apps are told at once when nothing gets out.
    let fail_fast = ctx.cfg.fallback == Fallback::None;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = tun.recv(&mut buf).await.context("TUN read")?;
        let pkt = &mut buf[..n];
        let Some((_, dst)) = packet::addrs(pkt) else {
            continue;
        };
        packet::clamp_mss(pkt, mss);
        if let Ok(Sent::Offline(_)) = ctx.bond.send(Bytes::copy_from_slice(pkt), fail_fast) {
            let from = ctx
                .tunnel_address
                .lock()
                .ok()
                .and_then(|a| *a)
                .filter(|a| a.is_ipv4() == dst.is_ipv4())
                .unwrap_or(dst);
            if let Some(reply) = packet::offline_reply(pkt, from) {
                if let Err(e) = tun.send(&reply).await {
                    tracing::debug!("offline answer: {e}");
                }
            }
        }
    }
}

/// Keeps the addresses of the LAN devices named by rules (MAC, DHCP host name, interface)
/// current: the interface's prefixes from netlink, MACs from the neighbour table and the
/// DHCP leases, host names from the DHCP leases.
async fn resolve_devices(ctx: Arc<Ctx>, rules: Vec<(usize, DeviceRef)>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ctx.cancel.cancelled() => return,
        }
        let leases = std::fs::read_to_string(&ctx.cfg.dhcp_leases).unwrap_or_default();
        let arp = std::fs::read_to_string("/proc/net/arp").unwrap_or_default();
        let neighbours = crate::driver::lan::neighbours(&leases, &arp);
        for (i, d) in &rules {
            let mut prefixes = Vec::new();
            for name in &d.interfaces {
                match ctx.nl.link(name).await {
                    Ok(Some(l)) => prefixes.extend(l.prefixes),
                    Ok(None) => {}
                    Err(e) => tracing::debug!(interface = %name, "netlink: {e:#}"),
                }
            }
            for n in &neighbours {
                let by_mac = n.mac.is_some_and(|m| d.macs.contains(&m));
                let by_name = n
                    .hostname
                    .as_ref()
                    .is_some_and(|h| d.hostnames.iter().any(|x| x == h));
                if by_mac || by_name {
                    prefixes.push(IpNet::from(n.ip));
                }
            }
            ctx.bond.set_resolved(*i, prefixes);
        }
    }
}

/// Follows one uplink: interface presence, carrier and address from netlink; its routing
/// table and rule; its QUIC endpoint and connection, rebound or reconnected as needed.
async fn uplink_task(
    ctx: Arc<Ctx>,
    idx: usize,
    id: LinkId,
    u: Uplink,
    mut changes: watch::Receiver<u64>,
) {
    let table = ctx.cfg.table_base + 1 + idx as u32;
    let mut routed: Option<(u32, Option<Ipv4Addr>)> = None;
    let mut ruled = false;
    let mut endpoint: Option<(quinn::Endpoint, u32, Ipv4Addr)> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        let disabled = ctx
            .admin
            .lock()
            .map(|a| a.disabled.get(idx).copied().unwrap_or(false))
            .unwrap_or(false);
        if disabled {
            if let Some(c) = ctx.bond.connection(id) {
                c.close(0u32.into(), b"disabled by the operator");
            }
            tokio::select! {
                _ = ctx.wake[idx].notified() => continue,
                _ = ctx.cancel.cancelled() => {
                    if let Some((ep, _, _)) = endpoint { ep.close(0u32.into(), b"shutdown"); }
                    return;
                }
            }
        }
        let info = match ctx.nl.link(&u.interface).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(uplink = %u.name, "netlink: {e:#}");
                None
            }
        };
        let mut usable_addr = None;
        match &info {
            None => {
                ctx.bond.set_carrier(id, false, false);
                if let Some((ep, _, _)) = endpoint.take() {
                    ep.close(0u32.into(), b"interface gone");
                }
                routed = None;
            }
            Some(li) => {
                ctx.bond.set_carrier(id, true, li.carrier);
                if li.carrier {
                    usable_addr = li.ipv4.first().copied();
                }
            }
        }
        if let (Some(li), Some(addr)) = (&info, usable_addr) {
            let gw = match u.gateway {
                Some(IpAddr::V4(g)) => Some(g),
                _ => ctx.nl.default_gateway(li.index).await.ok().flatten(),
            };
            if let Ok(mut s) = ctx.seen.lock() {
                s[idx] = Seen {
                    index: li.index,
                    carrier: true,
                    gateway: gw,
                };
            }
            if routed != Some((li.index, gw)) {
                match ctx.nl.set_default_route(table, li.index, gw).await {
                    Ok(()) => routed = Some((li.index, gw)),
                    Err(e) => tracing::warn!(uplink = %u.name, "{e:#}"),
                }
            }
            if !ruled {
                ruled = ctx
                    .nl
                    .rule_fwmark(table, table, 100 + idx as u32)
                    .await
                    .map_err(|e| tracing::warn!(uplink = %u.name, "{e:#}"))
                    .is_ok();
            }
            if let Err(e) = ensure_endpoint(&ctx, &u, table, li.index, addr, &mut endpoint) {
                tracing::warn!(uplink = %u.name, "{e:#}");
            }
            let connected = ctx
                .bond
                .connection(id)
                .is_some_and(|c| c.close_reason().is_none());
            // Held out by the reachability checks: routes stay (the checks use them),
            // the tunnel waits until the uplink is released.
            if !connected && ctx.bond.held(id).is_none() {
                if let Some((ep, _, _)) = &endpoint {
                    match connect(&ctx, ep, &u).await {
                        Ok(conn) => {
                            tracing::info!(uplink = %u.name, "connected to hub");
                            ctx.bond.attach(id, conn);
                            backoff = Duration::from_millis(200);
                        }
                        Err(e) => {
                            tracing::info!(uplink = %u.name, "connect: {e:#}");
                            backoff = (backoff * 2).min(Duration::from_secs(3));
                        }
                    }
                }
            }
        } else if let Ok(mut s) = ctx.seen.lock() {
            s[idx].carrier = false;
        }
        let conn = ctx.bond.connection(id);
        // Connected, or held out by the reachability checks (they wake us on release):
        // nothing to retry soon.
        let wait = if conn.is_some() || ctx.bond.held(id).is_some() {
            Duration::from_secs(2)
        } else {
            backoff
        };
        tokio::select! {
            _ = changes.changed() => {}
            _ = ctx.wake[idx].notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = async { match conn { Some(c) => { c.closed().await; } None => std::future::pending().await } } => {}
            _ = ctx.cancel.cancelled() => {
                if let Some((ep, _, _)) = endpoint { ep.close(0u32.into(), b"shutdown"); }
                return;
            }
        }
    }
}

/// Creates the uplink's endpoint, or rebinds it when the interface or address changed
/// (the QUIC connection migrates instead of starting over).
fn ensure_endpoint(
    ctx: &Ctx,
    u: &Uplink,
    mark: u32,
    index: u32,
    addr: Ipv4Addr,
    endpoint: &mut Option<(quinn::Endpoint, u32, Ipv4Addr)>,
) -> Result<()> {
    match endpoint {
        Some((_, i, a)) if *i == index && *a == addr => Ok(()),
        Some((ep, i, a)) => {
            tracing::info!(uplink = %u.name, %addr, "address changed: rebinding");
            ep.rebind(sys::uplink_socket(&u.interface, mark, addr)?)
                .context("rebind")?;
            *i = index;
            *a = addr;
            Ok(())
        }
        None => {
            let sock = sys::uplink_socket(&u.interface, mark, addr)?;
            let mut ep = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                sock,
                Arc::new(quinn::TokioRuntime),
            )
            .context("QUIC endpoint")?;
            ep.set_default_client_config(ctx.client.clone());
            *endpoint = Some((ep, index, addr));
            Ok(())
        }
    }
}

async fn connect(ctx: &Ctx, ep: &quinn::Endpoint, u: &Uplink) -> Result<quinn::Connection> {
    let specs = classes::specs(&ctx.cfg);
    let mut last = None;
    for hub in &ctx.cfg.hubs {
        let addr: SocketAddr = hub.address;
        let attempt = async {
            let conn = ep
                .connect(addr, identity::HUB_NAME)
                .context("connect")?
                .await
                .context("handshake")?;
            let w = session::hello(
                &conn,
                &Hello {
                    version: 1,
                    epoch: ctx.epoch,
                    link: u.name.clone(),
                    backup: u.priority == UplinkPriority::Backup,
                    link_classes: Some(
                        specs
                            .iter()
                            .filter(|s| classes::link_mask(std::slice::from_ref(s), u) != 0)
                            .map(|s| s.name)
                            .collect(),
                    ),
                    classes: Some(specs.clone()),
                },
            )
            .await?;
            ctx.bond.peer_epoch(w.epoch);
            ctx.bond.set_icmp_source(w.address);
            if let Ok(mut a) = ctx.tunnel_address.lock() {
                *a = Some(w.address);
            }
            anyhow::Ok(conn)
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(anyhow::anyhow!("hub {addr} did not answer within 3 s")),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no hub configured")))
}

/// The edge as the control API sees it.
struct EdgeDaemon(Arc<Ctx>);

impl EdgeDaemon {
    fn uplink(&self, name: &str) -> Result<usize, ActionError> {
        self.0
            .cfg
            .uplinks
            .iter()
            .position(|u| u.get_ref().name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self
                    .0
                    .cfg
                    .uplinks
                    .iter()
                    .map(|u| u.get_ref().name.as_str())
                    .collect();
                ActionError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "unknown_uplink",
                    format!(
                        "no uplink named {name:?}; the uplinks are {}",
                        names.join(", ")
                    ),
                )
            })
    }

    fn link_id(&self, idx: usize) -> Option<LinkId> {
        self.0
            .link_ids
            .lock()
            .ok()
            .and_then(|l| l.get(idx).copied())
    }

    /// Backup flags: configured backups, and with a preference every other uplink.
    fn apply_backups(&self, preferred: Option<usize>) {
        for (i, u) in self.0.cfg.uplinks.iter().enumerate() {
            let configured = u.get_ref().priority == UplinkPriority::Backup;
            let backup = match preferred {
                Some(p) => p != i,
                None => configured,
            };
            if let Some(id) = self.link_id(i) {
                self.0.bond.set_backup(id, backup);
            }
        }
    }

    fn set_disabled(&self, name: &str, disabled: bool) -> Result<String, ActionError> {
        let idx = self.uplink(name)?;
        let changed = self
            .0
            .admin
            .lock()
            .map(|mut a| {
                let was = a.disabled.get(idx).copied().unwrap_or(false);
                if let Some(d) = a.disabled.get_mut(idx) {
                    *d = disabled;
                }
                was != disabled
            })
            .unwrap_or(false);
        if disabled {
            let others_usable = self
                .snapshot()
                .map(|s| {
                    s.bonds["hub"]["links"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|l| l["name"] != name && l["state"] == "up")
                })
                .unwrap_or(false);
            if let Some(id) = self.link_id(idx) {
                self.0.bond.set_disabled(id, true);
            }
            self.0.wake[idx].notify_one();
            let msg = format!(
                "{name} is disabled until `stallnet uplink enable {name}` or a restart{}",
                if others_usable {
                    ""
                } else {
                    "; no other uplink is up: the box is offline"
                }
            );
            if changed {
                self.0
                    .events
                    .push(Level::Warning, "uplink_disabled", Some(name), msg.clone());
            }
            Ok(msg)
        } else {
            if let Some(id) = self.link_id(idx) {
                self.0.bond.set_disabled(id, false);
            }
            self.0.wake[idx].notify_one();
            let msg = format!("{name} is enabled: it rejoins the bond once it reaches the hub");
            if changed {
                self.0
                    .events
                    .push(Level::Info, "uplink_enabled", Some(name), msg.clone());
            }
            Ok(msg)
        }
    }

    fn reload(&self) -> Result<String, ActionError> {
        self.reload_inner().map(|(msg, _)| msg)
    }

    /// Reloads; also says which changed sections need a restart.
    fn reload_inner(&self) -> Result<(String, Vec<&'static str>), ActionError> {
        let mut lan_restart = false;
        let path = self.0.config_path.as_ref().ok_or_else(|| {
            ActionError::new(
                axum::http::StatusCode::CONFLICT,
                "no_config_file",
                "the daemon was not started from a config file",
            )
        })?;
        let new = stallnet_netconf::load_file(path).map_err(|e| {
            ActionError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_config",
                format!("{e}; the running config is unchanged"),
            )
        })?;
        let new_edge = new.edge().cloned().ok_or_else(|| {
            ActionError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_config",
                "the file is not an edge config; the running config is unchanged",
            )
        })?;
        match (&self.0.lan, &new.lan) {
            (Some(running), Some(l)) => {
                tokio::runtime::Handle::current()
                    .block_on(running.reload(l.get_ref()))
                    .map_err(|e| {
                        ActionError::new(
                            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                            "lan_failed",
                            format!("applying the LAN failed: {e:#}"),
                        )
                    })?;
            }
            (None, None) => {}
            _ => lan_restart = true,
        }
        let old = &self.0.cfg;
        let same = |a: &dyn erased::Ser, b: &dyn erased::Ser| a.json() == b.json();
        // Applied in place: the class settings (modes, weights, rates) and the mode.
        let specs = classes::specs(&new_edge);
        self.0
            .bond
            .configure(classes::sched_config(&specs, new_edge.mode));
        let mut restart = Vec::new();
        if lan_restart {
            restart.push("lan (added or removed)");
        }
        // Rules apply in place (new flows meet them) unless rules by device (MAC, DHCP
        // host name) come or go: their address resolution is set up at start.
        let (old_rules, new_rules) = (classes::rules(old), classes::rules(&new_edge));
        let by_device = |r: &[stallnet_netconf::Rule]| {
            r.iter()
                .any(|r| !r.mac.is_empty() || !r.hostname.is_empty() || !r.interface.is_empty())
        };
        let rules_in_place = !by_device(&old_rules) && !by_device(&new_rules);
        if rules_in_place {
            self.0.bond.set_rules(&new_rules);
        }
        // Commerce: who may use the API and how much apply in place; where it listens,
        // where it delivers and the body limit need a restart.
        match (&self.0.commerce_cfg, new.commerce(), self.0.commerce.get()) {
            (Some(was), Some(now), Some(svc)) => {
                svc.set_access(crate::commerce::api::Access::from_config(now));
                if was.listen != now.listen
                    || was.limits.max_body_bytes != now.limits.max_body_bytes
                    || !same(&was.upstream, &now.upstream)
                {
                    restart.push("commerce (listen, upstream or max_body_bytes)");
                }
            }
            (None, None, _) | (Some(_), Some(_), None) => {}
            _ => restart.push("commerce (added or removed)"),
        }
        for (name, differs) in [
            ("edge.hubs", !same(&old.hubs, &new_edge.hubs)),
            ("edge.lan", !same(&old.lan, &new_edge.lan)),
            ("edge.uplinks", !same(&old.uplinks, &new_edge.uplinks)),
            (
                "edge.rules (by device)",
                !rules_in_place && !same(&old.rules, &new_edge.rules),
            ),
            (
                "edge.tun_name/mtu",
                old.tun_name != new_edge.tun_name || old.mtu != new_edge.mtu,
            ),
            ("edge.fallback", old.fallback != new_edge.fallback),
        ] {
            if differs {
                restart.push(name);
            }
        }
        let msg = if restart.is_empty() {
            format!(
                "{} is valid; class settings, rules and commerce access applied",
                path.display()
            )
        } else {
            format!(
                "{} is valid; class settings, rules and commerce access applied; these \
                 changes need a restart (systemctl restart stallnet): {}",
                path.display(),
                restart.join(", ")
            )
        };
        self.0
            .events
            .push(Level::Info, "config_reloaded", None, msg.clone());
        Ok((msg, restart))
    }
}

/// Comparing config sections by their JSON form (they are `Serialize`, not `PartialEq`).
mod erased {
    pub trait Ser {
        fn json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or_default()
        }
    }
}

impl Daemon for EdgeDaemon {
    fn snapshot(&self) -> Option<Status> {
        self.0.latest.lock().ok().and_then(|l| l.clone())
    }

    fn act(&self, action: control::Action) -> Result<String, ActionError> {
        use control::Action as A;
        match action {
            A::Disable(name) => self.set_disabled(&name, true),
            A::Enable(name) => self.set_disabled(&name, false),
            A::Prefer(p) => {
                let idx = p.as_deref().map(|n| self.uplink(n)).transpose()?;
                if let Ok(mut a) = self.0.admin.lock() {
                    a.preferred = idx;
                }
                self.apply_backups(idx);
                let msg = match &p {
                    Some(n) => format!(
                        "{n} is preferred: the other uplinks carry traffic only when it cannot \
                         (until a restart or `stallnet uplink prefer --clear`)"
                    ),
                    None => "no uplink preferred: the configured priorities apply".into(),
                };
                let kind = if p.is_some() {
                    "uplink_preferred"
                } else {
                    "preference_cleared"
                };
                self.0
                    .events
                    .push(Level::Info, kind, p.as_deref(), msg.clone());
                Ok(msg)
            }
            A::Login {
                uplink,
                device,
                minutes,
            } => {
                let idx = self.uplink(&uplink)?;
                if !self
                    .0
                    .cfg
                    .lan
                    .iter()
                    .any(|p| p.contains(&IpAddr::V4(device)))
                {
                    return Err(ActionError::new(
                        axum::http::StatusCode::BAD_REQUEST,
                        "not_on_lan",
                        format!(
                            "{device} is not on the LAN (edge.lan): give the phone's LAN address"
                        ),
                    ));
                }
                if !self.0.cfg.reachability.enabled {
                    return Err(ActionError::new(
                        axum::http::StatusCode::CONFLICT,
                        "checks_off",
                        "reachability checks are off (edge.reachability.enabled): no portal to log in to",
                    ));
                }
                reach::login(&self.0, idx, device, minutes).map_err(|m| {
                    ActionError::new(axum::http::StatusCode::CONFLICT, "login_failed", m)
                })
            }
            A::Reload => self.reload(),
        }
    }
}

//! The edge role: LAN traffic from the TUN device into the bond, one QUIC connection per
//! uplink ([`uplinks`]), uplinks followed through netlink, the direct fallback when the
//! hub is gone, and config reloads applied in place ([`reload`]).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::IpNet;
use stallnet_netconf::{Config, EdgeConfig, Fallback, UplinkPriority, UpstreamPath};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::classes;
use crate::control::{self, ActionError, Daemon};
use crate::core::classify::{Classifier, ClassifyConfig, DeviceRef};
use crate::core::fallback::{Action, Candidate, DirectFallback};
use crate::core::packet;
use crate::driver::bond::{Bond, BondConfig, LinkCondition, Side, Tun};
use crate::driver::kernel::{nft, Kernel};
use crate::driver::netlink::Netlink;
use crate::driver::sys;
use crate::driver::tun_io::{ReadBuf, MAX_SEGMENTS};
use crate::events::{self, EventLog, Level, LinkSeen};
use crate::identity;
use crate::status::{self, Status};
use uplinks::{lock, Rt};

mod reach;
mod reload;
mod uplinks;

/// Offline this long before the direct fallback takes over.
const FALLBACK_AFTER: Duration = Duration::from_secs(2);
const NFT_TABLE: &str = "stallnet_fallback";
/// Rule priorities of the LAN's own rules: to the LAN stays local, from it enters the tunnel.
const LAN_LOCAL_PRIORITY: u32 = 999;
const LAN_TUNNEL_PRIORITY: u32 = 1000;

struct Ctx {
    /// The TUN device the LAN's packets come from (its counters).
    tun: Tun,
    /// The config the daemon started with: the TUN device, its MTU and the table numbers
    /// come from it (changing them needs a restart).
    started: EdgeConfig,
    /// The config applied now (the last good reload).
    cfg: RwLock<Arc<EdgeConfig>>,
    nl: Arc<Netlink>,
    bond: Arc<Bond>,
    /// The box's identity, and TLS for the tunnel pinned to the configured hubs.
    me: identity::Identity,
    client: Mutex<quinn::ClientConfig>,
    epoch: u64,
    tunnel_address: Mutex<Option<IpAddr>>,
    cancel: CancellationToken,
    /// The running uplinks, in config order.
    uplinks: Mutex<Vec<Arc<Rt>>>,
    /// The operator's preferred uplink (runtime only; the config is the lasting truth).
    preferred: Mutex<Option<String>>,
    /// The hub the whole bond uses (every uplink connects to it).
    hub_choice: Mutex<crate::core::hub_choice::HubChoice>,
    /// Bumped by every netlink change (uplink tasks look again).
    changes: watch::Receiver<u64>,
    /// The class settings the hub must have (each uplink's connection tells it).
    class_specs: watch::Sender<Vec<stallnet_netconf::ClassSpec>>,
    /// What the box tells the hub of itself (its outbox), from the commerce figures.
    box_report: watch::Sender<Option<crate::driver::session::BoxReport>>,
    /// TLS for the reachability checks, when they are on.
    tls: Mutex<Option<Arc<rustls::ClientConfig>>>,
    /// POS packets are refused at once when nothing gets out (no direct fallback).
    fail_fast: AtomicBool,
    /// Rules naming LAN devices (by rule index), resolved into addresses.
    device_rules: Mutex<Vec<(usize, DeviceRef)>>,
    devices_changed: tokio::sync::Notify,
    /// Bumped when the uplink set or the fallback setting changes (the fallback starts over).
    generation: AtomicU64,
    /// One reload at a time.
    reloading: Mutex<()>,
    events: Arc<EventLog>,
    latest: Mutex<Option<Status>>,
    /// The per-source cap on LAN traffic into the tunnel in force, and the packets
    /// dropped over it (see `cap_lan_sources`).
    lan_cap: Mutex<Option<(u32, u64)>>,
    config_path: Option<PathBuf>,
    state_dir: PathBuf,
    runtime_dir: PathBuf,
    /// Set when the daemon must restart to take a restored config.
    restart: AtomicBool,
    /// The LAN the daemon manages (`[lan]`), if any.
    lan: Option<crate::lan_setup::Lan>,
    /// `[commerce]` as started, and its service (for reloads).
    commerce_cfg: Option<stallnet_netconf::CommerceConfig>,
    commerce: std::sync::OnceLock<Arc<CommerceService>>,
}

impl Ctx {
    fn cfg(&self) -> Arc<EdgeConfig> {
        self.cfg
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn uplinks(&self) -> Vec<Arc<Rt>> {
        lock(&self.uplinks).clone()
    }

    fn uplink(&self, name: &str) -> Option<Arc<Rt>> {
        lock(&self.uplinks).iter().find(|r| r.name == name).cloned()
    }
}

type CommerceService = crate::commerce::api::Service<crate::commerce::store::SledStore>;

/// The rules naming LAN devices, by rule index (resolved by [`resolve_devices`]).
fn device_rules(e: &EdgeConfig) -> Vec<(usize, DeviceRef)> {
    Classifier::new(&classes::rules(e), ClassifyConfig::default())
        .rules()
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.devices.clone().map(|d| (i, d)))
        .collect()
}

/// The LAN's rules: traffic to the LAN (the box's own answers from its LAN address
/// included) stays local; traffic from it enters the tunnel.
async fn lan_rules(nl: &Netlink, lan: &[IpNet], tunnel_table: u32) -> Result<()> {
    for p in lan {
        if let IpNet::V4(p) = p {
            nl.rule_to(*p, 254, LAN_LOCAL_PRIORITY).await?;
            nl.rule_from(*p, tunnel_table, LAN_TUNNEL_PRIORITY).await?;
        }
    }
    Ok(())
}

/// Runs the edge until `cancel`; whatever way it ends (an error half-way through the
/// start included), the kernel is left as it was found.
pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
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
    config_path: Option<PathBuf>,
    notes: Vec<(Level, &'static str, String)>,
    cancel: CancellationToken,
) -> Result<()> {
    // Everything the config asks for, built before the kernel is touched.
    let plan = crate::plan::edge(&cfg)
        .context("the config validated but cannot run (please report this)")?;
    let e = cfg.edge().context("config has no [edge] section")?.clone();
    let me = identity::load(&cfg.state_dir)?;
    let client = identity::client_config(&me, &reload::pins(&e))?;
    std::fs::create_dir_all(&cfg.runtime_dir)
        .with_context(|| format!("creating {}", cfg.runtime_dir.display()))?;
    kernel.sysctl("net/ipv4/ip_forward", "1")?;
    kernel.owns_nft_table("ip", NFT_TABLE);

    let tun = sys::tun(&e.tun_name, e.mtu, None)?;
    let nl = kernel.nl.clone();
    let tun_index = nl
        .link(&e.tun_name)
        .await?
        .context("TUN device vanished")?
        .index;
    nl.set_default_route(e.table_base, tun_index, None).await?;
    lan_rules(&nl, &e.lan, e.table_base).await?;
    let lan = match &cfg.lan {
        Some(l) => Some({
            kernel.owns_nft_table("inet", stallnet_netconf::firewall::TABLE);
            crate::lan_setup::Lan::start(
                nl.clone(),
                l.get_ref(),
                e.dhcp_leases.clone(),
                cfg.runtime_dir.clone(),
                crate::plan::firewall_inputs(&cfg),
                cancel.child_token(),
            )
            .await
            .context("setting up the LAN")?
        }),
        None => None,
    };
    // The cores run with what the plan built.
    let classifier = Classifier::new(&plan.rules, ClassifyConfig::default());
    let bond = Bond::new(
        tun.clone(),
        BondConfig {
            side: Side::Edge,
            sched: plan.sched.clone(),
            classifier,
            lan_map: None,
            mtu: e.mtu,
        },
        None,
        cancel.child_token(),
    );
    let tls = if e.reachability.enabled {
        Some(crate::reach_probe::tls_config(
            e.reachability.ca_file.as_deref(),
        )?)
    } else {
        None
    };
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
    let ctx = Arc::new(Ctx {
        tun: tun.clone(),
        started: e.clone(),
        cfg: RwLock::new(Arc::new(e.clone())),
        nl,
        bond,
        client: Mutex::new(client),
        me,
        epoch: rand::random(),
        tunnel_address: Mutex::new(None),
        cancel: cancel.clone(),
        uplinks: Mutex::new(Vec::new()),
        preferred: Mutex::new(None),
        hub_choice: Mutex::new(crate::core::hub_choice::HubChoice::new(e.hubs.len())),
        changes: change_rx,
        class_specs: watch::Sender::new(plan.specs.clone()),
        box_report: watch::Sender::new(None),
        tls: Mutex::new(tls),
        fail_fast: AtomicBool::new(e.fallback == Fallback::None),
        device_rules: Mutex::new(device_rules(&e)),
        devices_changed: tokio::sync::Notify::new(),
        generation: AtomicU64::new(0),
        reloading: Mutex::new(()),
        events: Arc::new(EventLog::new()),
        latest: Mutex::new(None),
        lan_cap: Mutex::new(None),
        config_path,
        state_dir: cfg.state_dir.clone(),
        runtime_dir: cfg.runtime_dir.clone(),
        restart: AtomicBool::new(false),
        lan,
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
    for u in &e.uplinks {
        uplinks::start(&ctx, u.get_ref().clone());
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
                ctx.me.signing_key()?,
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
            Some(crate::commerce::spawn(svc, com, cancel.clone())?)
        }
        None => None,
    };
    let (commerce_thread, commerce) = commerce.unzip();
    let c = ctx.clone();
    tokio::spawn(async move { resolve_devices(c).await });
    kernel.owns_nft_table(crate::lan_cap::FAMILY, crate::lan_cap::TABLE);
    let (c, tun_name) = (ctx.clone(), e.tun_name.clone());
    tokio::spawn(async move { cap_lan_sources(c, tun_name).await });
    tracing::info!(identity = %ctx.me.id, "edge running");

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
                    c.restart.store(true, Ordering::SeqCst);
                    c.cancel.cancel();
                }
                Err(e) => tracing::error!("reloading the restored config: {}", e.message),
            }
        };
        let (events, dir, c) = (ctx.events.clone(), cfg.state_dir.clone(), cancel.clone());
        tokio::spawn(crate::confirm::guard(path.clone(), dir, events, after, c));
        // An invite code from the SD card, redeemed once an uplink reaches the hub.
        if let Some(code) = crate::enroll::pending::load(&cfg.state_dir) {
            tokio::spawn(crate::enroll::pending::run(
                code,
                ctx.me.id.clone(),
                cfg.state_dir.clone(),
                path,
                ctx.events.clone(),
                cancel.clone(),
            ));
        }
    }

    let result = supervise(&ctx, &cfg, tun_index, commerce).await;
    reader.abort();
    cancel.cancel();
    if let Some(t) = commerce_thread {
        // Its store flushes as it closes; a store stuck on a failing disk does not keep
        // the daemon (and the kernel changes it undoes) from exiting.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !t.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !t.is_finished() {
            tracing::warn!("the commerce service did not stop within 5 s");
        }
    }
    if ctx.restart.load(Ordering::SeqCst) {
        anyhow::bail!(
            "exiting so that the service manager restarts stallnet with the restored config"
        );
    }
    result
}

/// What the hub's fleet view shows of the box, from the commerce status document
/// ([`crate::commerce::api::status`]).
fn box_report(commerce: &serde_json::Value) -> crate::driver::session::BoxReport {
    crate::driver::session::BoxReport {
        sales_waiting: commerce["undelivered"].as_u64().unwrap_or(0),
        dead_letters: commerce["dead_letters"].as_u64().unwrap_or(0),
        oldest_waiting_unix: commerce["oldest_undelivered_at"].as_i64(),
    }
}

/// Publishes status and drives the direct fallback until cancelled.
async fn supervise(
    ctx: &Arc<Ctx>,
    cfg: &Config,
    tun_index: u32,
    commerce: Option<crate::commerce::StatusCell>,
) -> Result<()> {
    let mut commerce_doc = None;
    let mut ticks = 0u64;
    let started = Instant::now();
    let mut clock = status::clock_state();
    let mut fallback = DirectFallback::new(false, FALLBACK_AFTER);
    // The fallback's view of the uplinks (by position) holds for one generation.
    let mut generation = u64::MAX;
    let mut was_online = false;
    let mut links_seen: std::collections::HashMap<String, LinkSeen> = Default::default();
    // What the last published document said of the box.
    let mut published: Option<(&str, bool, Vec<LinkCondition>)> = None;

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
        let e = ctx.cfg();
        let rts = ctx.uplinks();
        let b = ctx.bond.status();
        let close_all = {
            let mut hubs = lock(&ctx.hub_choice);
            hubs.handle_online(b.online, Instant::now());
            hubs.poll_close(Instant::now())
        };
        if close_all {
            tracing::info!("offline with another hub to go to: closing the silent connections");
            for r in &rts {
                if let Some(c) = ctx.bond.connection(r.id) {
                    c.close(0u32.into(), b"the hub does not answer");
                }
            }
        }
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
        links_seen.retain(|name, _| b.links.iter().any(|l| l.name == *name));
        for l in &b.links {
            let now = LinkSeen {
                state: Some(l.state),
                degraded: l.degraded,
            };
            let before = links_seen.entry(l.name.clone()).or_default();
            events::link_change(&ctx.events, &l.name, before, &now);
            *before = now;
        }
        let now_generation = ctx.generation.load(Ordering::SeqCst);
        if now_generation != generation {
            // Uplinks came or went, or the fallback setting changed: start over.
            if fallback.active().is_some() {
                ctx.nl
                    .set_default_route(ctx.started.table_base, tun_index, None)
                    .await?;
                nft_delete().await?;
            }
            fallback = DirectFallback::new(e.fallback == Fallback::Direct, FALLBACK_AFTER);
            generation = now_generation;
        }
        let seen: Vec<uplinks::Seen> = rts.iter().map(|r| r.seen()).collect();
        let candidates: Vec<Candidate> = rts
            .iter()
            .zip(&seen)
            .enumerate()
            .map(|(i, (r, s))| Candidate {
                uplink: i,
                carrier: s.carrier && s.index != 0,
                backup: r.settings().priority == UplinkPriority::Backup,
            })
            .collect();
        match fallback.update(b.online, &candidates, Instant::now()) {
            Some(Action::Use(i)) => {
                if let (Some(r), Some(s)) = (rts.get(i), seen.get(i)) {
                    ctx.events.push(
                        Level::Warning,
                        "fallback_on",
                        Some(&r.name),
                        format!(
                            "hub unreachable on every uplink: LAN traffic goes directly out of {}",
                            r.name
                        ),
                    );
                    ctx.nl
                        .set_default_route(ctx.started.table_base, s.index, s.gateway)
                        .await?;
                    nft_masquerade(&r.settings().interface, &e.lan).await?;
                }
            }
            Some(Action::Leave) => {
                ctx.events.push(
                    Level::Info,
                    "fallback_off",
                    None,
                    "the hub is back: LAN traffic uses the tunnel again".into(),
                );
                ctx.nl
                    .set_default_route(ctx.started.table_base, tun_index, None)
                    .await?;
                nft_delete().await?;
            }
            None => {}
        }
        let conditions: Vec<LinkCondition> = b.links.iter().map(|l| l.state).collect();
        let state = crate::core::box_state::BoxState::of(b.online, &conditions).name();
        let up = conditions
            .iter()
            .filter(|c| **c == LinkCondition::Up)
            .count();
        // The document is rebuilt once a second, and at once when what it says of the box
        // changes (its state, an uplink's condition, the fallback): building and writing
        // it four times a second was most of an idle edge's CPU.
        let shape = (state, fallback.active().is_some(), conditions);
        let changed = published.as_ref() != Some(&shape);
        let due = ticks % 4 == 0;
        ticks += 1;
        if !due && !changed {
            continue;
        }
        published = Some(shape);
        // The commerce figures come from the service's own thread (never the store
        // itself: a full disk must not stall this loop).
        if due {
            clock = status::clock_state();
            commerce_doc = commerce.as_ref().and_then(|c| lock(c).clone());
            let report = commerce_doc.as_ref().map(box_report);
            ctx.box_report.send_if_modified(|r| {
                let changed = *r != report;
                *r = report;
                changed
            });
        }
        let preferred = lock(&ctx.preferred).clone();
        let stream_advice = stream_advice(&e, &rts, &b);
        let mut b = serde_json::to_value(&b).unwrap_or_default();
        if let Some(links) = b["links"].as_array_mut() {
            for l in links.iter_mut() {
                let Some(r) = rts.iter().find(|r| l["name"] == r.name.as_str()) else {
                    continue;
                };
                l["kind"] = serde_json::to_value(r.settings().kind).unwrap_or_default();
                l["preferred"] = (preferred.as_deref() == Some(r.name.as_str())).into();
                if let Some(m) = lock(&r.modem).as_ref() {
                    l["modem"] = serde_json::to_value(m).unwrap_or_default();
                }
                if let Some(v) = lock(&r.reach.view).clone() {
                    l["reachability"] = v;
                }
                if let Some((used, limit, start)) = *lock(&r.cap) {
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
            tunnel_address: lock(&ctx.tunnel_address).map(|a| a.to_string()),
            refused_handshakes: 0,
            tun_malformed: ctx.tun.malformed(),
            bonds: serde_json::json!({ "hub": b }),
            commerce: commerce_doc.clone(),
            uptime_s: started.elapsed().as_secs(),
            // The hub the whole bond uses now (see `core::hub_choice`).
            peer: lock(&ctx.hub_choice)
                .current()
                .and_then(|i| e.hubs.get(i))
                .map(|h| h.address.to_string()),
            clock: clock.clone(),
            stream_advice: Some(stream_advice),
            lan_source_cap: lock(&ctx.lan_cap)
                .map(|(pps, dropped)| serde_json::json!({ "pps": pps, "dropped": dropped })),
            isolation: None,
            enrollment: None,
            handshakes: None,
            stalls: None,
        };
        if let Err(e) = status::write(&cfg.runtime_dir, &doc) {
            tracing::warn!("status: {e:#}");
        }
        notifier.tick(&format!("{state}: {up} of {} uplinks up", rts.len()));
        if clock != "wrong" && clock_saved.is_none_or(|t| t.elapsed() >= crate::clock::SAVE_EVERY) {
            if let Err(e) = crate::clock::save(&cfg.state_dir) {
                tracing::warn!("saving the time: {e:#}");
            }
            clock_saved = Some(Instant::now());
        }
        *lock(&ctx.latest) = Some(doc);
    }
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

/// The stream advice (decided in [`crate::core::box_state::stream_advice`]) as the status
/// document shows it.
fn stream_advice(
    cfg: &EdgeConfig,
    rts: &[Arc<Rt>],
    b: &crate::driver::bond::BondStatus,
) -> serde_json::Value {
    use crate::core::box_state::{self, AdviceBasis, StreamPath};
    use crate::core::{qos::bit, Class};
    let specs = classes::specs(cfg);
    let class_max = specs
        .iter()
        .find(|s| s.name == stallnet_netconf::ClassName::Stream)
        .and_then(|s| s.max_rate);
    let paths: Vec<(String, StreamPath)> = b
        .links
        .iter()
        .filter_map(|l| {
            let u = rts.iter().find(|r| r.name == l.name)?.settings();
            Some((
                u.name.clone(),
                StreamPath {
                    name: "",
                    allowed: classes::link_mask(&specs, &u) & bit(Class::Stream) != 0,
                    up: l.state == LinkCondition::Up,
                    degraded: l.degraded,
                    rate_bps: l.rate_mbps * 1e6,
                },
            ))
        })
        .collect();
    let (bps, uplink, basis) = box_state::stream_advice(
        paths.iter().map(|(n, p)| StreamPath { name: n, ..*p }),
        class_max,
    );
    let basis = match basis {
        AdviceBasis::NoUplink => "no usable uplink may carry the stream".to_string(),
        AdviceBasis::ShareOf(name) => format!("80 % of {name}'s current send rate"),
        AdviceBasis::ClassMax => "the stream class's max_rate".to_string(),
    };
    serde_json::json!({ "bitrate_bps": bps, "uplink": uplink, "basis": basis })
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
        let want = crate::commerce::upstream::tunnel_targets(found, &ctx.cfg().lan);
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

async fn tun_reader(ctx: Arc<Ctx>, tun: Tun) -> Result<()> {
    let mut raw = ReadBuf::default();
    let (mut read, mut batch) = (Vec::new(), Vec::with_capacity(MAX_SEGMENTS));
    loop {
        tun.read(&mut raw, &mut read).await.context("TUN read")?;
        batch.clear();
        // Each SYN's MSS is clamped to what every usable uplink carries now.
        let mtu = ctx.bond.path_mtu();
        for mut p in read.drain(..) {
            let Some((src, dst)) = packet::addrs(&p) else {
                continue;
            };
            // The TUN device's own link-local chatter (IPv6 router solicitations, MLD)
            // stays.
            if packet::link_scoped(src, dst) {
                continue;
            }
            packet::clamp_mss(&mut p, mtu);
            batch.push(p.freeze());
        }
        if batch.is_empty() {
            continue;
        }
        // Without a direct fallback, POS apps are told at once when nothing gets out.
        let fail_fast = ctx.fail_fast.load(Ordering::Relaxed);
        for i in ctx.bond.send_batch(&batch, fail_fast) {
            let pkt = &batch[i];
            let Some((_, dst)) = packet::addrs(pkt) else {
                continue;
            };
            let from = ctx
                .tunnel_address
                .lock()
                .ok()
                .and_then(|a| *a)
                .filter(|a| a.is_ipv4() == dst.is_ipv4())
                .unwrap_or(dst);
            if let Some(reply) = packet::offline_reply(pkt, from) {
                if let Err(e) = tun.write_one(&reply).await {
                    tracing::debug!("offline answer: {e}");
                }
            }
        }
    }
}

/// Keeps the kernel's per-source cap on LAN traffic into the tunnel
/// ([`crate::lan_cap`]) at what [`SourceCap`] decides from the uplinks' capacity, POS
/// sources exempt (as the config has them now).
async fn cap_lan_sources(ctx: Arc<Ctx>, tun: String) {
    use crate::core::source_cap::{SourceCap, SourceCapConfig};
    let mut cap = SourceCap::new(SourceCapConfig::default());
    let mut installed: Option<(u32, Vec<IpNet>)> = None;
    let mut warned = false;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // Dropped by tables replaced before, and in all (as last read).
    let (mut dropped, mut reported) = (0u64, 0u64);
    let (mut ticks, mut told) = (0u64, (0u64, None::<Instant>));
    let (mut tun_seen, mut trailing, mut read_at) = (0u64, false, Instant::now());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ctx.cancel.cancelled() => return,
        }
        ticks += 1;
        cap.update(ctx.bond.capacity(), Instant::now());
        let Some(pps) = cap.current() else {
            continue;
        };
        let want = (pps, ctx.cfg().pos_sources.clone());
        if installed.as_ref() != Some(&want) {
            // The new table starts its counters at zero: keep the old one's.
            let old = match installed {
                Some(_) => crate::lan_cap::dropped().await.unwrap_or(0),
                None => 0,
            };
            let applied = match crate::lan_cap::render(&tun, want.0, &want.1) {
                Ok(script) => nft(&script).await,
                Err(e) => Err(e.into()),
            };
            match applied {
                Ok(()) => {
                    tracing::debug!(pps, "LAN sources capped into the tunnel");
                    dropped += old;
                    installed = Some(want);
                    warned = false;
                }
                Err(e) if !warned => {
                    tracing::warn!("capping LAN sources: {e:#}");
                    warned = true;
                }
                Err(_) => {}
            }
        }
        // The table's counters are read (a `nft` process) only when a source may have
        // been over the cap: a source held at the cap still gets `pps` packets a second
        // into the tunnel, so fewer than that in 2 s means nothing was dropped. One more
        // read after such a period takes the last drops; one every 30 s regardless.
        if ticks % 8 == 0 {
            let seen = ctx.bond.tun_packets();
            let busy = seen.wrapping_sub(tun_seen) >= u64::from(pps);
            tun_seen = seen;
            if busy || trailing || read_at.elapsed() >= Duration::from_secs(30) {
                if let Ok(n) = crate::lan_cap::dropped().await {
                    reported = dropped.saturating_add(n);
                }
                read_at = Instant::now();
            }
            trailing = busy;
        }
        *lock(&ctx.lan_cap) = installed.as_ref().map(|(p, _)| (*p, reported));
        let now_dropped = reported;
        // Said at most once a minute while it goes on.
        if now_dropped > told.0
            && told
                .1
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            ctx.events.push(
                Level::Warning,
                "lan_flood",
                None,
                format!(
                    "a LAN device sends more than {pps} packets/s into the tunnel: {} over it dropped",
                    now_dropped - told.0
                ),
            );
            told = (now_dropped, Some(Instant::now()));
        }
    }
}

/// Keeps the addresses of the LAN devices named by rules (MAC, DHCP host name, interface)
/// current: the interface's prefixes from netlink, MACs from the neighbour table and the
/// DHCP leases, host names from the DHCP leases. At once after a reload changed the rules.
async fn resolve_devices(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ctx.devices_changed.notified() => {}
            _ = ctx.cancel.cancelled() => return,
        }
        let rules = lock(&ctx.device_rules).clone();
        if rules.is_empty() {
            continue;
        }
        let leases = std::fs::read_to_string(&ctx.cfg().dhcp_leases).unwrap_or_default();
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
            ctx.bond.set_resolved(*i, d, prefixes);
        }
    }
}

/// The edge as the control API sees it.
struct EdgeDaemon(Arc<Ctx>);

impl EdgeDaemon {
    fn uplink(&self, name: &str) -> Result<Arc<Rt>, ActionError> {
        self.0.uplink(name).ok_or_else(|| {
            let names: Vec<String> = self.0.uplinks().iter().map(|r| r.name.clone()).collect();
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

    fn set_disabled(&self, name: &str, disabled: bool) -> Result<String, ActionError> {
        let rt = self.uplink(name)?;
        let changed = rt.disabled.swap(disabled, Ordering::SeqCst) != disabled;
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
            self.0.bond.set_disabled(rt.id, true);
            rt.wake.notify_one();
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
            self.0.bond.set_disabled(rt.id, false);
            rt.wake.notify_one();
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

    /// Reloads; also says which changed settings need a restart.
    fn reload_inner(&self) -> Result<(String, Vec<&'static str>), ActionError> {
        reload::reload(&self.0)
    }
}

impl Daemon for EdgeDaemon {
    fn snapshot(&self) -> Option<Status> {
        lock(&self.0.latest).clone()
    }

    fn act(&self, action: control::Action) -> Result<String, ActionError> {
        use control::Action as A;
        match action {
            A::Disable(name) => self.set_disabled(&name, true),
            A::Enable(name) => self.set_disabled(&name, false),
            A::Prefer(p) => {
                if let Some(n) = p.as_deref() {
                    self.uplink(n)?;
                }
                *lock(&self.0.preferred) = p.clone();
                for r in self.0.uplinks() {
                    uplinks::refresh_backup(&self.0, &r);
                }
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
                let rt = self.uplink(&uplink)?;
                let cfg = self.0.cfg();
                if !cfg.lan.iter().any(|p| p.contains(&IpAddr::V4(device))) {
                    return Err(ActionError::new(
                        axum::http::StatusCode::BAD_REQUEST,
                        "not_on_lan",
                        format!(
                            "{device} is not on the LAN (edge.lan): give the phone's LAN address"
                        ),
                    ));
                }
                if !cfg.reachability.enabled {
                    return Err(ActionError::new(
                        axum::http::StatusCode::CONFLICT,
                        "checks_off",
                        "reachability checks are off (edge.reachability.enabled): no portal to log in to",
                    ));
                }
                reach::login(&self.0, &rt, device, minutes).map_err(|m| {
                    ActionError::new(axum::http::StatusCode::CONFLICT, "login_failed", m)
                })
            }
            A::Reload => self.reload(),
            A::Invite { .. } | A::Revoke(_) => Err(ActionError::new(
                axum::http::StatusCode::CONFLICT,
                "not_on_edge",
                "invites and revocations are done on the hub",
            )),
        }
    }
}

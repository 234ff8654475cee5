//! The hub role: one QUIC server endpoint, admitting only its devices (those in the
//! config and those enrolled with an invite code); each device's connections form its
//! bond; download traffic from the hub's TUN device is routed to the device whose LAN
//! block (or tunnel address) it is for, through that bond's scheduler. Devices are
//! enrolled and revoked while the hub runs (`hub/fleet.rs`); a connection without a
//! certificate gets the enrollment exchange only (`crate::enroll`).

mod fleet;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::http::StatusCode;
use ipnet::{IpNet, Ipv4Net};
use stallnet_netconf::Config;
use tokio_util::sync::CancellationToken;

use crate::classes;
use crate::control::{self, Action, ActionError, Daemon};
use crate::core::handshake_guard::{Admit, HandshakeGuard};
use crate::core::packet;
use crate::core::qos::{bit, ClassMask, ALL_CLASSES};
use crate::driver::bond::Tun;
use crate::driver::kernel::Kernel;
use crate::driver::session::{self, EdgeDoc, Welcome};
use crate::driver::sys;
use crate::driver::tun_io::{ReadBuf, MAX_SEGMENTS};
use crate::enroll::book::{Book, Refusal};
use crate::enroll::{self, code::Code, Registrar};
use crate::events::{EventLog, Level};
use crate::identity;
use crate::status::{self, Status};

use fleet::{Device, Fleet, Maker};

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

/// What the hub's control actions and the enrollment exchange work on.
struct Hub {
    fleet: Fleet,
    maker: Maker,
    book: Mutex<Book>,
    state_dir: PathBuf,
    /// The hub's identity, for invite codes.
    identity: String,
    /// Where boxes reach the hub when an invite names no address (`hub.listen`, when it
    /// is a specific address).
    listen: SocketAddr,
    /// Scheduling mode for downloads that are not POS.
    mode: stallnet_netconf::SchedMode,
    /// The config file (for `reload`), and the `[hub]` section the hub runs with.
    config_path: Option<PathBuf>,
    running: Mutex<stallnet_netconf::HubConfig>,
    events: Arc<EventLog>,
    latest: Mutex<Option<Status>>,
    /// Connection attempts: in progress, and those answered with a Retry, refused or
    /// timed out (see [`HandshakeGuard`]).
    handshakes: Handshakes,
    /// Requests without a certificate, and those refused.
    enroll_attempts: AtomicU64,
    enroll_refused: AtomicU64,
}

#[derive(Default)]
struct Handshakes {
    in_progress: std::sync::atomic::AtomicUsize,
    retried: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
}

/// How long a handshake may take (QUIC's own idle timeout is 10 s).
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(5);

/// The book could not be written: nothing changed.
fn not_saved(e: anyhow::Error) -> ActionError {
    ActionError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "not_saved",
        format!("{e:#}"),
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Hub {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A device enrolled earlier (or just now) into the running fleet.
    fn admit(&self, name: &str, identity: &str, lan: &[IpNet]) -> Result<Arc<Device>> {
        let lan4: Vec<Ipv4Net> = lan
            .iter()
            .filter_map(|p| match p {
                IpNet::V4(n) => Some(*n),
                IpNet::V6(_) => None,
            })
            .collect();
        let rules = classes::core_rules(&stallnet_netconf::classes::default_rules());
        let dev = self.fleet.add(&self.maker, &lan4, |place| {
            self.maker
                .make(name, identity, place, Vec::new(), &rules, false)
        })?;
        for (l, b) in dev.map.lans().zip(dev.map.blocks()) {
            tracing::info!(device = %name, "LAN {l} appears on the hub at {b}");
        }
        Ok(dev)
    }

    fn invite(
        &self,
        name: &str,
        lan: Vec<IpNet>,
        valid_s: u64,
        addresses: Vec<SocketAddr>,
    ) -> Result<String, ActionError> {
        let bad =
            |code: &'static str, m: String| ActionError::new(StatusCode::BAD_REQUEST, code, m);
        let addresses = if addresses.is_empty() {
            if self.listen.ip().is_unspecified() {
                return Err(bad(
                    "no_address",
                    format!("the hub listens on {} (any address): give the address boxes reach it at (--address HOST:PORT)", self.listen),
                ));
            }
            vec![self.listen]
        } else {
            addresses
        };
        let secret: [u8; 16] = rand::random();
        let code = Code::encode(secret, &self.identity, &addresses)
            .map_err(|e| bad("bad_address", e.to_string()))?;
        let mut book = self.book();
        let mut next = book.clone();
        next.invite(name, lan, &secret, valid_s, unix_now(), |n| {
            self.fleet.by_name(n).is_some()
        })
        .map_err(|e| ActionError::new(StatusCode::CONFLICT, "bad_invite", e.to_string()))?;
        next.save(&self.state_dir).map_err(not_saved)?;
        *book = next;
        self.events.push(
            Level::Info,
            "invite",
            None,
            format!("invite for device {name} (valid {valid_s} s)"),
        );
        Ok(code)
    }

    fn revoke(&self, name: &str) -> Result<String, ActionError> {
        if self.fleet.by_name(name).is_some_and(|d| d.from_config) {
            return Err(ActionError::new(
                StatusCode::CONFLICT,
                "in_config",
                format!("device {name} is listed in the hub's config: remove it there and run `stallnet reload`"),
            ));
        }
        let mut book = self.book();
        let mut next = book.clone();
        let in_book = next.revoke(name);
        if in_book {
            next.save(&self.state_dir).map_err(not_saved)?;
            *book = next;
        }
        drop(book);
        let live = self.fleet.remove(name).is_some();
        if !in_book && !live {
            return Err(ActionError::new(
                StatusCode::NOT_FOUND,
                "unknown_device",
                format!("no enrolled device or pending invite is named {name}"),
            ));
        }
        self.events.push(
            Level::Warning,
            "revoked",
            None,
            format!(
                "device {name} revoked: its connections are closed and it is refused from now on"
            ),
        );
        Ok(format!("device {name} revoked"))
    }
}

impl Hub {
    /// Re-reads the config: devices listed there are added, removed or changed without
    /// touching the others (a changed identity or LAN replaces the device; changed POS
    /// sources apply in place); the rest of `[hub]` needs a restart, and says so.
    fn reload(&self) -> Result<String, ActionError> {
        let Some(path) = &self.config_path else {
            return Err(ActionError::new(
                StatusCode::CONFLICT,
                "no_config_file",
                "the hub runs without a config file to re-read",
            ));
        };
        let cfg = stallnet_netconf::load_file(path)
            .map_err(|e| ActionError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()))?;
        let plan = crate::plan::hub(&cfg).map_err(|e| {
            ActionError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot_run",
                e.to_string(),
            )
        })?;
        let Some(new) = cfg.hub().cloned() else {
            return Err(ActionError::new(
                StatusCode::BAD_REQUEST,
                "not_hub",
                "the config is no longer a hub's",
            ));
        };
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut restart = Vec::new();
        for (field, same) in [
            ("listen", new.listen == running.listen),
            ("tun_name", new.tun_name == running.tun_name),
            ("mtu", new.mtu == running.mtu),
            ("pool", new.pool == running.pool),
            ("lan_map", new.lan_map == running.lan_map),
            ("mode", new.mode == running.mode),
            (
                "stall_services",
                new.stall_services == running.stall_services,
            ),
        ] {
            if !same {
                restart.push(field);
            }
        }
        let want: Vec<&stallnet_netconf::Device> =
            new.devices.iter().map(|d| d.get_ref()).collect();
        let ipv6 = |d: &stallnet_netconf::Device| d.lan.iter().any(|p| p.network().is_ipv6());
        let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
        // Gone or replaced first, so that a replacement can take their place.
        for d in self.fleet.list().into_iter().filter(|d| d.from_config) {
            let same = want.iter().find(|w| w.name == d.name);
            let keep = same.is_some_and(|w| {
                w.identity == d.identity
                    && w.lan
                        .iter()
                        .filter(|p| p.network().is_ipv4())
                        .copied()
                        .collect::<Vec<_>>()
                        == d.map.lans().map(IpNet::V4).collect::<Vec<_>>()
            });
            if !keep {
                if same.is_some_and(|w| ipv6(w)) {
                    restart.push("an IPv6 LAN");
                    continue;
                }
                self.fleet.remove(&d.name);
                if same.is_some() {
                    changed.push(d.name.clone());
                } else {
                    removed.push(d.name.clone());
                }
            }
        }
        for (i, w) in want.iter().enumerate() {
            let rules = plan.device_rules.get(i).cloned().unwrap_or_default();
            if let Some(d) = self.fleet.by_name(&w.name) {
                if d.from_config {
                    // Same identity and LAN: its POS sources may have changed.
                    d.bond.set_rules(&rules);
                    continue;
                }
                return Err(ActionError::new(
                    StatusCode::CONFLICT,
                    "name_taken",
                    format!(
                        "{} is an enrolled device: revoke it before listing it in the config",
                        w.name
                    ),
                ));
            }
            if ipv6(w) {
                restart.push("an IPv6 LAN");
                continue;
            }
            let lan4: Vec<Ipv4Net> = w
                .lan
                .iter()
                .filter_map(|p| match p {
                    IpNet::V4(n) => Some(*n),
                    IpNet::V6(_) => None,
                })
                .collect();
            self.fleet
                .add(&self.maker, &lan4, |place| {
                    self.maker
                        .make(&w.name, &w.identity, place, Vec::new(), &rules, true)
                })
                .map_err(|e| ActionError::new(StatusCode::CONFLICT, "no_room", e.to_string()))?;
            if !changed.contains(&w.name) {
                added.push(w.name.clone());
            }
        }
        running.devices = new.devices.clone();
        restart.sort_unstable();
        restart.dedup();
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        let mut msg = format!(
            "devices added: {}; removed: {}; replaced: {}",
            list(&added),
            list(&removed),
            list(&changed)
        );
        if !restart.is_empty() {
            msg.push_str(&format!(
                "; needs a restart to apply: {}",
                restart.join(", ")
            ));
        }
        self.events
            .push(Level::Info, "config_reloaded", None, msg.clone());
        Ok(msg)
    }
}

impl Registrar for Hub {
    fn redeem(&self, secret: &[u8], identity: &str) -> Result<String, Refusal> {
        self.enroll_attempts.fetch_add(1, Ordering::Relaxed);
        let r = (|| {
            if self.fleet.by_identity(identity).is_some() {
                // The same box with the same code again: its first answer was lost, or
                // it restarted before pinning the hub. Nothing changes.
                if let Some(dev) = self.book().redeemed_by(secret, identity) {
                    return Ok(dev.name.clone());
                }
                return Err(Refusal::AlreadyEnrolled);
            }
            let mut book = self.book();
            let mut next = book.clone();
            let dev = next.redeem(secret, identity, unix_now())?;
            next.save(&self.state_dir).map_err(|e| {
                tracing::warn!("recording an enrolled device: {e:#}");
                Refusal::HubError
            })?;
            *book = next;
            drop(book);
            self.admit(&dev.name, &dev.identity, &dev.lan)
                .map_err(|e| {
                    tracing::warn!(device = %dev.name, "admitting an enrolled device: {e:#}");
                    Refusal::HubError
                })?;
            self.events.push(
                Level::Info,
                "enrolled",
                None,
                format!("device {} enrolled ({identity})", dev.name),
            );
            Ok(dev.name)
        })();
        if r.is_err() {
            self.enroll_refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
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
    let book = Book::load(&cfg.state_dir)?;
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
    // The whole map space goes into the TUN (devices come and go inside it); the pool is
    // the TUN's own prefix; IPv6 LAN prefixes of config devices are routed as they are.
    nl.route_prefix(IpNet::V4(plan.lan_map), tun_index, 254)
        .await?;

    let maker = Maker {
        tun: tun.clone(),
        mtu: h.mtu,
        sched: plan.sched.clone(),
        hub_address: hub_addr,
        pool: plan.pool,
        space: plan.lan_map,
        cancel: cancel.clone(),
    };
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
        let lan6: Vec<IpNet> = d
            .lan
            .iter()
            .filter(|p| p.network().is_ipv6())
            .copied()
            .collect();
        for p in &lan6 {
            nl.route_prefix(*p, tun_index, 254).await?;
        }
        for (l, b) in map.lans().zip(map.blocks()) {
            tracing::info!(device = %d.name, "LAN {l} appears on the hub at {b}");
        }
        let place = fleet::Place {
            address: *address,
            map: map.clone(),
        };
        devices.push(maker.make(&d.name, &d.identity, place, lan6, rules, true));
    }
    let allow: identity::AllowList = Arc::new(RwLock::new(Default::default()));
    let fleet = Fleet::new(devices, allow.clone())?;
    let events = Arc::new(EventLog::new());
    let hub = Arc::new(Hub {
        fleet,
        maker,
        book: Mutex::new(book.clone()),
        state_dir: cfg.state_dir.clone(),
        identity: me.id.clone(),
        listen: h.listen,
        mode: h.mode,
        config_path: config_path.clone(),
        running: Mutex::new(h.clone()),
        events: events.clone(),
        latest: Mutex::new(None),
        handshakes: Handshakes::default(),
        enroll_attempts: AtomicU64::new(0),
        enroll_refused: AtomicU64::new(0),
    });
    // Devices enrolled before this start; the config wins a name or identity clash.
    for d in &book.devices {
        if hub.fleet.by_name(&d.name).is_some() || hub.fleet.by_identity(&d.identity).is_some() {
            tracing::warn!(device = %d.name, "enrolled device left out: the config lists its name or identity");
            continue;
        }
        if let Err(e) = hub.admit(&d.name, &d.identity, &d.lan) {
            tracing::warn!(device = %d.name, "enrolled device left out: {e:#}");
        }
    }
    let refused = Arc::new(AtomicU64::new(0));
    let server = identity::server_config(&me, allow, refused.clone())?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        sys::hub_socket(h.listen)?,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("listening on {}", h.listen))?;
    tracing::info!(identity = %me.id, listen = %h.listen, "hub running");

    let epoch: u64 = rand::random();
    let (hb, ep) = (hub.clone(), endpoint.clone());
    let acceptor = tokio::spawn(async move {
        let guard = HandshakeGuard::default();
        while let Some(incoming) = ep.accept().await {
            let busy = hb.handshakes.in_progress.load(Ordering::Relaxed);
            match guard.decide(busy, incoming.remote_address_validated()) {
                Admit::Accept => {}
                Admit::Retry => {
                    hb.handshakes.retried.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().ignore();
                    }
                    continue;
                }
                Admit::Refuse => {
                    hb.handshakes.refused.fetch_add(1, Ordering::Relaxed);
                    incoming.refuse();
                    continue;
                }
            }
            hb.handshakes.in_progress.fetch_add(1, Ordering::Relaxed);
            let hb = hb.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(incoming, hb, epoch).await {
                    tracing::debug!("connection: {e:#}");
                }
            });
        }
    });
    let (hb, t) = (hub.clone(), tun.clone());
    let reader = tokio::spawn(async move { tun_reader(hb, t).await });

    events.push(Level::Info, "started", None, "stallnet hub started".into());
    for (level, kind, msg) in notes {
        events.push(level, kind, None, msg);
    }
    control::spawn(
        Arc::new(HubDaemon(hub.clone())),
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
    let mut online: HashMap<String, bool> = HashMap::new();
    // When each device was last seen online (since this start).
    let mut last_heard: HashMap<String, std::time::Instant> = HashMap::new();
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
        let devices = hub.fleet.list();
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
        let statuses: Vec<_> = devices.iter().map(|d| d.bond.status()).collect();
        let bonds: serde_json::Map<String, serde_json::Value> = devices
            .iter()
            .zip(&statuses)
            .map(|(d, st)| (d.name.clone(), serde_json::to_value(st).unwrap_or_default()))
            .collect();
        let now = std::time::Instant::now();
        for (d, st) in devices.iter().zip(&statuses) {
            if st.online {
                last_heard.insert(d.name.clone(), now);
            }
        }
        last_heard.retain(|n, _| devices.iter().any(|d| &d.name == n));
        let mut stalls: Vec<serde_json::Value> = devices
            .iter()
            .zip(&statuses)
            .map(|(d, st)| stall_row(d, st, last_heard.get(&d.name).map(|t| now - *t)))
            .collect();
        // Offline, then degraded, then those with the most sales waiting.
        stalls.sort_by_key(|r| {
            (
                r["state"] != "offline",
                r["state"] != "degraded",
                std::cmp::Reverse(r["sales_waiting"].as_u64().unwrap_or(0)),
                r["name"].as_str().unwrap_or("").to_string(),
            )
        });
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
            tun_malformed: tun.malformed(),
            bonds: serde_json::Value::Object(bonds),
            commerce: None,
            uptime_s: started.elapsed().as_secs(),
            peer: None,
            clock,
            stream_advice: None,
            lan_source_cap: None,
            isolation: isolation.clone(),
            stalls: Some(serde_json::Value::Array(stalls)),
            handshakes: Some(serde_json::json!({
                "in_progress": hub.handshakes.in_progress.load(Ordering::Relaxed),
                "retried": hub.handshakes.retried.load(Ordering::Relaxed),
                "refused": hub.handshakes.refused.load(Ordering::Relaxed),
                "timed_out": hub.handshakes.timed_out.load(Ordering::Relaxed),
            })),
            enrollment: Some(serde_json::json!({
                "attempts": hub.enroll_attempts.load(Ordering::Relaxed),
                "refused": hub.enroll_refused.load(Ordering::Relaxed),
                "pending_invites": hub.book().invites.iter().filter(|i| i.used_by.is_none() && i.expires_unix > unix_now()).count(),
            })),
        };
        if let Err(e) = status::write(&cfg.runtime_dir, &doc) {
            tracing::warn!("status: {e:#}");
        }
        if let Ok(mut l) = hub.latest.lock() {
            *l = Some(doc);
        }
        online.retain(|name, _| devices.iter().any(|d| &d.name == name));
        for d in &devices {
            let now = d.bond.online();
            let was = online.insert(d.name.clone(), now).unwrap_or(false);
            if now != was {
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

/// One line of the fleet view: the stall's state (offline: no uplink reaches the hub;
/// degraded: online, but an uplink is down or degraded), its uplinks, when it was last
/// heard (`None`: not since the hub started), where it comes from and its addresses, and
/// the sales waiting on the box as it last reported them.
fn stall_row(
    d: &Device,
    st: &crate::driver::bond::BondStatus,
    heard: Option<Duration>,
) -> serde_json::Value {
    let report = *crate::lock(&d.report);
    let up = crate::driver::bond::LinkCondition::Up;
    let degraded = st.links.iter().any(|l| l.degraded || l.state != up);
    let state = match (st.online, degraded) {
        (false, _) => "offline",
        (true, true) => "degraded",
        (true, false) => "online",
    };
    let uplinks: Vec<serde_json::Value> = st
        .links
        .iter()
        .map(|l| {
            serde_json::json!({
                "name": l.name,
                "state": if l.state == up && l.degraded { "degraded" } else { l.state.name() },
                "rtt_ms": l.rtt_ms,
                "backup": l.backup,
            })
        })
        .collect();
    serde_json::json!({
        "name": d.name,
        "state": state,
        "uplinks": uplinks,
        "last_heard_s": heard.map(|h| h.as_secs()),
        "source": if d.from_config { "config" } else { "enrolled" },
        "tunnel_address": d.address.to_string(),
        "lan": d.map.lans().map(|l| l.to_string()).collect::<Vec<_>>(),
        "lan_on_hub": d.map.blocks().map(|b| b.to_string()).collect::<Vec<_>>(),
        // As the box last said (a box without the commerce service, or from before
        // session version 2, says nothing).
        "sales_waiting": report.map(|(r, _)| r.sales_waiting),
        "dead_letters": report.map(|(r, _)| r.dead_letters),
        "oldest_waiting_s": report
            .and_then(|(r, _)| r.oldest_waiting_unix)
            .map(|at| i64::try_from(unix_now()).unwrap_or(i64::MAX).saturating_sub(at).max(0)),
        "report_age_s": report.map(|(_, at)| at.elapsed().as_secs()),
    })
}

/// Admits one connection into its device's bond for as long as it lives; a connection
/// without a certificate gets the enrollment exchange only.
async fn serve(incoming: quinn::Incoming, hub: Arc<Hub>, epoch: u64) -> Result<()> {
    // A handshake that has not finished in 5 s is given up (its state with it).
    let handshake = tokio::time::timeout(HANDSHAKE_LIMIT, incoming).await;
    hub.handshakes.in_progress.fetch_sub(1, Ordering::Relaxed);
    let conn = match handshake {
        Ok(c) => c.context("handshake")?,
        Err(_) => {
            hub.handshakes.timed_out.fetch_add(1, Ordering::Relaxed);
            bail!("handshake not finished within {HANDSHAKE_LIMIT:?}");
        }
    };
    let peer = conn
        .peer_identity()
        .and_then(|p| {
            p.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().map(|c| identity::identity_of(c)));
    let Some(peer) = peer else {
        return enroll::serve(conn, hub.as_ref()).await;
    };
    let Some(dev) = hub.fleet.by_identity(&peer) else {
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
    let mode = hub.mode;
    dev.bond.peer_epoch(hello.epoch);
    if let Some(specs) = &hello.classes {
        dev.bond.configure(classes::sched_config(specs, mode));
    }
    let mask = hello.link_classes.as_deref().map_or(ALL_CLASSES, mask_of);
    let id = dev.bond.add_link(&hello.link, hello.backup, mask, None);
    dev.bond.attach(id, conn.clone());
    // What the edge says of the uplink while it runs, in order, until the connection ends.
    loop {
        match session::next_update(&conn).await {
            Ok(Some(EdgeDoc::Link(u))) => {
                tracing::info!(device = %dev.name, link = %hello.link, backup = u.backup, classes = ?u.link_classes, "uplink updated");
                if let Some(specs) = &u.classes {
                    dev.bond.configure(classes::sched_config(specs, mode));
                }
                dev.bond.set_backup(id, u.backup);
                dev.bond.set_link_config(id, mask_of(&u.link_classes), None);
            }
            Ok(Some(EdgeDoc::Box(r))) => {
                tracing::debug!(device = %dev.name, sales_waiting = r.sales_waiting, "box report");
                *crate::lock(&dev.report) = Some((r, std::time::Instant::now()));
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

async fn tun_reader(hub: Arc<Hub>, tun: Tun) -> Result<()> {
    let mut raw = ReadBuf::default();
    let (mut read, mut batch) = (Vec::new(), Vec::with_capacity(MAX_SEGMENTS));
    // The packets of one read mostly go to one device (one flow's super-packet): each
    // run of packets for the same device goes to its bond in one call.
    let mut to: Option<Arc<Device>> = None;
    loop {
        tun.read(&mut raw, &mut read).await.context("TUN read")?;
        let mut last_dst = None;
        for mut p in read.drain(..) {
            let Some((_, dst)) = packet::addrs(&p) else {
                continue;
            };
            // A run of packets to one address looks its device up once.
            let dev = match (&to, last_dst == Some(dst)) {
                (Some(d), true) => d.clone(),
                _ => match hub.fleet.for_destination(dst) {
                    Some(d) => d,
                    None => continue,
                },
            };
            last_dst = Some(dst);
            if to.as_ref().is_some_and(|d| !Arc::ptr_eq(d, &dev)) {
                if let Some(d) = to.take() {
                    // Malformed packets are counted by the bond and dropped.
                    d.bond.send_batch(&batch, false);
                }
                batch.clear();
            }
            // Back to the device's own LAN address (its tunnel address stays).
            dev.map.to_device(&mut p);
            packet::clamp_mss(&mut p, dev.bond.path_mtu());
            batch.push(p.freeze());
            to = Some(dev);
        }
        if let Some(d) = to.take() {
            d.bond.send_batch(&batch, false);
        }
        batch.clear();
    }
}

/// The hub as the control API sees it: status and events, invites and revocations;
/// uplink actions belong to edges.
struct HubDaemon(Arc<Hub>);

impl Daemon for HubDaemon {
    fn snapshot(&self) -> Option<Status> {
        self.0.latest.lock().ok().and_then(|l| l.clone())
    }

    fn act(&self, action: Action) -> Result<String, ActionError> {
        match action {
            Action::Invite {
                name,
                lan,
                valid_s,
                addresses,
            } => self.0.invite(&name, lan, valid_s, addresses),
            Action::Revoke(name) => self.0.revoke(&name),
            Action::Reload => self.0.reload(),
            _ => Err(ActionError::new(
                StatusCode::CONFLICT,
                "not_on_hub",
                "uplink actions are done on the edge (the stall's box)",
            )),
        }
    }
}

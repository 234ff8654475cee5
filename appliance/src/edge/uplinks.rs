//! The edge's uplinks while they run: one [`Rt`] per configured uplink with its bond slot,
//! routing table, tasks (tunnel, reachability, modem, data cap, wpa_supplicant) and what
//! they found. Uplinks are started and stopped one by one, so a config reload adds,
//! removes or replaces one uplink without touching the others' tunnels.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use stallnet_netconf::{ClassName, ClassSpec, EdgeConfig, Uplink, UplinkKind, UplinkPriority};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{reach, Ctx};
use crate::classes;
use crate::core::qos::{bit, ClassMask};
use crate::core::scheduler::LinkId;
use crate::core::uplink::{self, Action, CloseReason, Interface, Phase, UplinkState};
use crate::driver::bond::PeerView;
use crate::driver::session::{self, Hello};
use crate::driver::sys;
use crate::events::Level;
use crate::identity;

/// What the uplink task last saw of its interface (for the fallback and the checks).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Seen {
    pub index: u32,
    pub carrier: bool,
    pub gateway: Option<Ipv4Addr>,
}

/// One running uplink. Its interface-level settings (interface, kind, gateway, wifi,
/// APN, cap) are fixed for its life: changing them replaces the uplink. Priority,
/// metered and rates change in place ([`retune`]).
pub(super) struct Rt {
    pub name: String,
    /// Numbers its routing table, fwmark, rule priority and login table; the smallest
    /// free number when started, so tables stay stable across reloads.
    pub slot: u32,
    pub id: LinkId,
    settings: Mutex<Uplink>,
    pub cancel: CancellationToken,
    /// Wakes its tunnel task when something about it changed.
    pub wake: tokio::sync::Notify,
    /// Switched off by the operator or by its data cap.
    pub disabled: AtomicBool,
    /// Its data cap allows it only as a backup (see [`refresh_backup`]).
    capped: AtomicBool,
    pub seen: Mutex<Seen>,
    /// With a cap: (used, limit, period start) for the status.
    pub cap: Mutex<Option<(u64, u64, i64)>>,
    /// Its reachability checks' verdicts and login window.
    pub reach: reach::Slot,
    /// The checks' own task (restarted alone when `[edge.reachability]` changes).
    pub reach_task: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
    /// Cellular: what ModemManager says of its modem.
    pub modem: Mutex<Option<crate::modem::ModemFacts>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Rt {
    pub fn settings(&self) -> Uplink {
        lock(&self.settings).clone()
    }

    pub fn table(&self, base: u32) -> u32 {
        base + 1 + self.slot
    }

    pub fn seen(&self) -> Seen {
        *lock(&self.seen)
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::SeqCst)
    }
}

pub(super) use crate::lock;

/// Which fields of an uplink can change without replacing it.
pub(super) fn same_but_tunable(a: &Uplink, b: &Uplink) -> bool {
    let mut b = b.clone();
    b.priority = a.priority;
    b.metered = a.metered;
    b.min_rate = a.min_rate;
    b.max_rate = a.max_rate;
    super::reload::same(a, &b)
}

/// Starts uplink `u`: a bond slot, its tunnel task and the tasks its kind needs.
pub(super) fn start(ctx: &Arc<Ctx>, u: Uplink) -> Arc<Rt> {
    let cfg = ctx.cfg();
    let specs = classes::specs(&cfg);
    let slot = {
        let list = lock(&ctx.uplinks);
        (0u32..)
            .find(|n| !list.iter().any(|r| r.slot == *n))
            .unwrap_or(0)
    };
    let id = ctx.bond.add_link(
        &u.name,
        u.priority == UplinkPriority::Backup,
        classes::link_mask(&specs, &u),
        Some(classes::rate_config(&u)),
    );
    let rt = Arc::new(Rt {
        name: u.name.clone(),
        slot,
        id,
        settings: Mutex::new(u.clone()),
        cancel: ctx.cancel.child_token(),
        wake: tokio::sync::Notify::new(),
        disabled: AtomicBool::new(false),
        capped: AtomicBool::new(false),
        seen: Mutex::new(Seen::default()),
        cap: Mutex::new(None),
        reach: reach::Slot::default(),
        reach_task: Mutex::new(None),
        modem: Mutex::new(None),
        tasks: Mutex::new(Vec::new()),
    });
    lock(&ctx.uplinks).push(rt.clone());
    refresh_backup(ctx, &rt);
    let mut tasks = Vec::new();
    match crate::wifi_link::write_conf(&u, &ctx.runtime_dir) {
        Ok(Some(conf)) => tasks.push(tokio::spawn(crate::wifi_link::run(
            u.clone(),
            conf,
            rt.cancel.clone(),
        ))),
        Ok(None) => {}
        Err(e) => tracing::error!(uplink = %u.name, "wifi settings: {e:#}"),
    }
    if u.kind == UplinkKind::Cellular {
        tasks.push(tokio::spawn(modem_task(ctx.clone(), rt.clone())));
    }
    if u.cap.is_some() {
        let dir = ctx.state_dir.clone();
        tasks.push(tokio::spawn(cap_task(ctx.clone(), rt.clone(), dir)));
    }
    tasks.push(tokio::spawn(uplink_task(
        ctx.clone(),
        rt.clone(),
        ctx.changes.clone(),
    )));
    *lock(&rt.tasks) = tasks;
    start_reach(ctx, &rt);
    rt
}

/// Starts (or restarts) uplink `rt`'s reachability checks as the config says.
pub(super) fn start_reach(ctx: &Arc<Ctx>, rt: &Arc<Rt>) {
    let old = lock(&rt.reach_task).take();
    if let Some((cancel, task)) = old {
        cancel.cancel();
        task.abort();
    }
    if let Ok(mut v) = rt.reach.view.lock() {
        *v = None;
    }
    let tls = lock(&ctx.tls).clone();
    match tls {
        Some(tls) if ctx.cfg().reachability.enabled => {
            let cancel = rt.cancel.child_token();
            let task = tokio::spawn(reach::run(ctx.clone(), rt.clone(), tls, cancel.clone()));
            *lock(&rt.reach_task) = Some((cancel, task));
        }
        _ => {
            // No checks: nothing holds the uplink and it carries payments.
            ctx.bond.set_held(rt.id, None);
            ctx.bond.set_verified(rt.id, true);
        }
    }
}

/// Stops uplink `rt`: its tasks end (a cap saves its count, a login window closes), its
/// tunnel closes, its routing table and rule go.
pub(super) async fn stop(ctx: &Ctx, rt: &Arc<Rt>) {
    lock(&ctx.uplinks).retain(|r| !Arc::ptr_eq(r, rt));
    reach::end_login(ctx, rt, "a config change stopped the uplink").await;
    rt.cancel.cancel();
    let mut tasks: Vec<JoinHandle<()>> = lock(&rt.tasks).drain(..).collect();
    if let Some((_, t)) = lock(&rt.reach_task).take() {
        tasks.push(t);
    }
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(3), t)
            .await
            .is_err()
        {
            tracing::warn!(uplink = %rt.name, "a task did not stop within 3 s");
        }
    }
    ctx.bond.remove_link(rt.id);
    ctx.nl.release_table(rt.table(ctx.started.table_base)).await;
}

/// New priority, metered flag, rates or class settings for a running uplink: the bond
/// takes them at once; the hub hears them from [`tell_hub`].
pub(super) fn retune(ctx: &Ctx, rt: &Rt, u: &Uplink, cfg: &EdgeConfig) {
    *lock(&rt.settings) = u.clone();
    let mask = classes::link_mask(&classes::specs(cfg), u);
    ctx.bond
        .set_link_config(rt.id, mask, Some(classes::rate_config(u)));
    refresh_backup(ctx, rt);
}

/// Sets uplink `rt`'s backup flag from everything that decides it (see
/// [`uplink::is_backup`]).
pub(super) fn refresh_backup(ctx: &Ctx, rt: &Rt) {
    let backup = uplink::is_backup(
        rt.capped.load(Ordering::SeqCst),
        lock(&ctx.preferred).as_deref(),
        &rt.name,
        rt.settings().priority == UplinkPriority::Backup,
    );
    ctx.bond.set_backup(rt.id, backup);
}

/// Counts a capped uplink's bytes and applies its cap (see [`crate::cap_meter`]).
async fn cap_task(ctx: Arc<Ctx>, rt: Arc<Rt>, state_dir: PathBuf) {
    use crate::cap_meter::{self, Verdict};
    use crate::core::cap::CapEvent;
    let u = rt.settings();
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
            _ = rt.cancel.cancelled() => true,
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
        if v != imposed {
            rt.capped.store(v == Verdict::BackupOnly, Ordering::SeqCst);
            match v {
                Verdict::Off => {
                    rt.disabled.store(true, Ordering::SeqCst);
                    ctx.bond.set_disabled(rt.id, true);
                }
                Verdict::BackupOnly => {}
                Verdict::Normal => {
                    if imposed == Verdict::Off {
                        rt.disabled.store(false, Ordering::SeqCst);
                        ctx.bond.set_disabled(rt.id, false);
                    }
                }
            }
            refresh_backup(&ctx, &rt);
            rt.wake.notify_one();
            imposed = v;
        }
        *lock(&rt.cap) = Some((st.used, spec.limit, st.period_start));
        if !events.is_empty() || saved.elapsed() >= Duration::from_secs(30) {
            cap_meter::save(&path, &st);
            saved = Instant::now();
        }
    }
}

/// Reads a cellular uplink's modem facts from ModemManager every 30 s, and connects a
/// registered modem with the configured APN.
async fn modem_task(ctx: Arc<Ctx>, rt: Arc<Rt>) {
    let u = rt.settings();
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    let mut tried: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = rt.cancel.cancelled() => return,
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
        *lock(&rt.modem) = Some(facts);
    }
}

/// Follows one uplink: interface presence, carrier and address from netlink; its routing
/// table and rule; its QUIC endpoint and connection. When to connect, back off or close
/// is [`UplinkState`]'s decision, which hub [`crate::core::hub_choice`]'s; this task does
/// the IO they ask for.
async fn uplink_task(ctx: Arc<Ctx>, rt: Arc<Rt>, mut changes: tokio::sync::watch::Receiver<u64>) {
    let u = rt.settings();
    let id = rt.id;
    let table = rt.table(ctx.started.table_base);
    let mut routed: Option<(u32, Option<Ipv4Addr>)> = None;
    let mut ruled = false;
    let mut endpoint: Option<(quinn::Endpoint, u32, Ipv4Addr)> = None;
    let mut st = UplinkState::new();
    let shutdown = |ctx: &Ctx, endpoint: Option<(quinn::Endpoint, u32, Ipv4Addr)>| {
        lock(&ctx.hub_choice).remove(id);
        if let Some((ep, _, _)) = endpoint {
            ep.close(0u32.into(), b"shutdown");
        }
    };
    loop {
        st.set_disabled(rt.is_disabled());
        st.set_held(ctx.bond.held(id).is_some());
        let info = match ctx.nl.link(&u.interface).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(uplink = %u.name, "netlink: {e:#}");
                None
            }
        };
        let addr = info
            .as_ref()
            .filter(|li| li.carrier)
            .and_then(|li| li.ipv4.first().copied());
        st.handle_interface(match (&info, addr) {
            (None, _) => Interface::Absent,
            (Some(li), None) if !li.carrier => Interface::NoCarrier,
            (Some(_), None) => Interface::NoAddress,
            (Some(_), Some(_)) => Interface::Ready,
        });
        match &info {
            None => {
                ctx.bond.set_carrier(id, false, false);
                routed = None;
            }
            Some(li) => ctx.bond.set_carrier(id, true, li.carrier),
        }
        if let (Some(li), Some(addr)) = (&info, addr) {
            if !lock(&rt.seen).carrier {
                // Carrier back (or first seen): no packet to the gateway should wait
                // out a resolution begun while it was down.
                ctx.nl.forget_unresolved_neighbours(li.index).await;
            }
            let gw = match u.gateway {
                Some(IpAddr::V4(g)) => Some(g),
                _ => ctx.nl.default_gateway(li.index).await.ok().flatten(),
            };
            *lock(&rt.seen) = Seen {
                index: li.index,
                carrier: true,
                gateway: gw,
            };
            if routed != Some((li.index, gw)) {
                match ctx.nl.set_default_route(table, li.index, gw).await {
                    Ok(()) => routed = Some((li.index, gw)),
                    Err(e) => tracing::warn!(uplink = %u.name, "{e:#}"),
                }
            }
            if !ruled {
                ruled = ctx
                    .nl
                    .rule_fwmark(table, table, 100 + rt.slot)
                    .await
                    .map_err(|e| tracing::warn!(uplink = %u.name, "{e:#}"))
                    .is_ok();
            }
            if let Err(e) = ensure_endpoint(&u, table, li.index, addr, &mut endpoint) {
                tracing::warn!(uplink = %u.name, "{e:#}");
            }
        } else {
            lock(&rt.seen).carrier = false;
        }
        if ctx
            .bond
            .connection(id)
            .is_none_or(|c| c.close_reason().is_some())
        {
            st.handle_closed();
            lock(&ctx.hub_choice).handle_closed(id);
        }
        while let Some(action) = st.poll_action(Instant::now()) {
            match action {
                Action::Close(reason) => {
                    if let Some(c) = ctx.bond.connection(id) {
                        c.close(0u32.into(), reason.as_bytes());
                    }
                    if reason == CloseReason::InterfaceGone {
                        if let Some((ep, _, _)) = endpoint.take() {
                            ep.close(0u32.into(), reason.as_bytes());
                        }
                    }
                }
                Action::Connect => attempt(&ctx, &rt, endpoint.as_ref(), &mut st).await,
            }
        }
        if matches!(
            st.phase(Instant::now()),
            Phase::Disabled | Phase::Waiting | Phase::Held
        ) {
            lock(&ctx.hub_choice).remove(id);
        }
        // Wake for a retry the state names, a netlink change, the checks or the operator
        // (`wake`), the connection closing; and now and then to read the interface again.
        let wait = st
            .poll_timeout()
            .map_or(uplink::RECHECK, |t| {
                t.saturating_duration_since(Instant::now())
            })
            .min(uplink::RECHECK);
        let conn = ctx.bond.connection(id);
        tokio::select! {
            _ = changes.changed() => {}
            _ = rt.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = async { match conn { Some(c) => { c.closed().await; } None => std::future::pending().await } } => {}
            _ = rt.cancel.cancelled() => return shutdown(&ctx, endpoint),
        }
    }
}

/// One attempt to reach the bond's hub through uplink `rt`; its result goes to the
/// uplink's state and the bond's hub choice (which may move the whole bond).
async fn attempt(
    ctx: &Ctx,
    rt: &Rt,
    endpoint: Option<&(quinn::Endpoint, u32, Ipv4Addr)>,
    st: &mut UplinkState,
) {
    let hub = lock(&ctx.hub_choice).current();
    let (Some((ep, _, _)), Some(hub)) = (endpoint, hub) else {
        st.handle_failed(Instant::now());
        return;
    };
    match connect(ctx, ep, rt, hub).await {
        // The bond moved while this attempt ran: no uplink stays on the old hub.
        Ok((conn, _)) if lock(&ctx.hub_choice).current() != Some(hub) => {
            conn.close(0u32.into(), b"the bond moved to another hub");
            st.handle_failed(Instant::now());
        }
        Ok((conn, told)) => {
            tracing::info!(uplink = %rt.name, hub, "connected to hub");
            st.handle_connected();
            lock(&ctx.hub_choice).handle_connected(rt.id, hub);
            ctx.bond.attach(rt.id, conn.clone());
            tokio::spawn(tell_hub(conn, told, rt.name.clone(), rt.cancel.clone()));
        }
        Err(e) => {
            tracing::info!(uplink = %rt.name, "connect: {e:#}");
            st.handle_failed(Instant::now());
            let moved = lock(&ctx.hub_choice).handle_failed(rt.id, hub);
            if let Some(m) = moved {
                let cfg = ctx.cfg();
                let addr = |i: usize| cfg.hubs.get(i).map(|h| h.address.to_string());
                ctx.events.push(
                    Level::Warning,
                    "hub_moved",
                    None,
                    format!(
                        "no uplink reaches hub {} any more: the bond moves to hub {}",
                        addr(m.from).unwrap_or_default(),
                        addr(m.to).unwrap_or_default()
                    ),
                );
                for r in ctx.uplinks() {
                    r.wake.notify_one();
                }
            }
        }
    }
}

/// Creates the uplink's endpoint, or rebinds it when the interface or address changed
/// (the QUIC connection migrates instead of starting over).
fn ensure_endpoint(
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
            let ep = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                sock,
                Arc::new(quinn::TokioRuntime),
            )
            .context("QUIC endpoint")?;
            *endpoint = Some((ep, index, addr));
            Ok(())
        }
    }
}

/// What the hub has heard of an uplink on one connection, and where changes come from.
struct Told {
    view: tokio::sync::watch::Receiver<PeerView>,
    specs: tokio::sync::watch::Receiver<Vec<ClassSpec>>,
    /// The class settings the hub has.
    sent_specs: Vec<ClassSpec>,
    /// The box's own report (sales waiting), sent after the hello and on change.
    report: tokio::sync::watch::Receiver<Option<session::BoxReport>>,
}

/// Box reports go at most this often on one connection (the latest wins).
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The classes of `mask`, by name.
fn class_names(specs: &[ClassSpec], mask: ClassMask) -> Vec<ClassName> {
    specs
        .iter()
        .filter(|s| mask & bit(classes::class_of(s.name)) != 0)
        .map(|s| s.name)
        .collect()
}

/// Connects to configured hub number `hub` and says hello with the uplink's settings (as
/// the bond has them now: an operator's preference or a data cap may make it a backup).
async fn connect(
    ctx: &Ctx,
    ep: &quinn::Endpoint,
    rt: &Rt,
    hub: usize,
) -> Result<(quinn::Connection, Told)> {
    let cfg = ctx.cfg();
    let mut view = ctx
        .bond
        .peer_view(rt.id)
        .context("the uplink has left the bond")?;
    let mut specs_rx = ctx.class_specs.subscribe();
    let now = *view.borrow_and_update();
    let specs = specs_rx.borrow_and_update().clone();
    let client = lock(&ctx.client).clone();
    let addr: SocketAddr = cfg
        .hubs
        .get(hub)
        .map(|h| h.address)
        .context("no such hub configured")?;
    let attempt = async {
        let conn = ep
            .connect_with(client, addr, identity::HUB_NAME)
            .context("connect")?
            .await
            .context("handshake")?;
        let w = session::hello(
            &conn,
            &Hello {
                version: 1,
                epoch: ctx.epoch,
                link: rt.name.clone(),
                backup: now.backup,
                link_classes: Some(class_names(&specs, now.classes)),
                classes: Some(specs.clone()),
            },
        )
        .await?;
        ctx.bond.peer_epoch(w.epoch);
        ctx.bond.set_icmp_source(w.address);
        *lock(&ctx.tunnel_address) = Some(w.address);
        anyhow::Ok(conn)
    };
    let conn = tokio::time::timeout(uplink::ATTEMPT_TIMEOUT, attempt)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "hub {addr} did not answer within {} s",
                uplink::ATTEMPT_TIMEOUT.as_secs()
            )
        })??;
    let mut report = ctx.box_report.subscribe();
    // The hub hears the report of now right after the hello.
    report.mark_changed();
    let told = Told {
        view,
        specs: specs_rx,
        sent_specs: specs,
        report,
    };
    Ok((conn, told))
}

/// Tells the hub what changes about the uplink while connection `conn` runs (see
/// [`session::LinkUpdate`]): the hub then sends downloads the way the edge sends uploads —
/// not on a backup while a primary works, no POS where the edge sends none. Ends with the
/// connection (the next one's hello carries the state of then). Also tells it the box's
/// report (sales waiting) when that changes, at most once per [`REPORT_EVERY`].
async fn tell_hub(
    conn: quinn::Connection,
    mut told: Told,
    name: String,
    cancel: CancellationToken,
) {
    // When the next box report may go, and whether one waits for that.
    let mut report_at = tokio::time::Instant::now();
    let mut report_due = false;
    loop {
        let link_changed = tokio::select! {
            r = told.view.changed() => if r.is_err() { return } else { true },
            r = told.specs.changed() => if r.is_err() { return } else { true },
            r = told.report.changed(), if !report_due => {
                if r.is_err() {
                    return;
                }
                report_due = true;
                false
            }
            _ = tokio::time::sleep_until(report_at), if report_due => false,
            _ = conn.closed() => return,
            _ = cancel.cancelled() => return,
        };
        let doc = if link_changed {
            let view = *told.view.borrow_and_update();
            let specs = told.specs.borrow_and_update().clone();
            session::EdgeDoc::Link(session::LinkUpdate {
                backup: view.backup,
                link_classes: class_names(&specs, view.classes),
                classes: (specs != told.sent_specs).then(|| specs.clone()),
            })
        } else if report_due && tokio::time::Instant::now() >= report_at {
            report_due = false;
            report_at = tokio::time::Instant::now() + REPORT_EVERY;
            match *told.report.borrow_and_update() {
                Some(r) => session::EdgeDoc::Box(r),
                None => continue,
            }
        } else {
            continue;
        };
        match session::send_update(&conn, &doc).await {
            Ok(sent) => match &doc {
                session::EdgeDoc::Link(u) => {
                    tracing::info!(uplink = %name, backup = u.backup, classes = ?u.link_classes, "told the hub");
                    if let Some(specs) = &u.classes {
                        told.sent_specs = specs.clone();
                    }
                }
                session::EdgeDoc::Box(r) => {
                    tracing::debug!(uplink = %name, sales_waiting = r.sales_waiting, sent, "box report")
                }
            },
            Err(e) => {
                // The next connection's hello says it all: a hub that cannot hear the
                // update must not keep sending the old way.
                if conn.close_reason().is_none() {
                    tracing::warn!(uplink = %name, "link update: {e:#}; reconnecting");
                    conn.close(0u32.into(), b"link update failed");
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_but_tunable;
    use stallnet_netconf::Uplink;

    fn uplink(extra: &str) -> Uplink {
        let text = format!(
            "role = \"edge\"\n[edge]\nlan = [\"10.1.0.0/24\"]\nhubs = []\nfallback = \"direct\"\n\
             [[edge.uplinks]]\nname = \"cell\"\ninterface = \"wwan0\"\nkind = \"cellular\"\n{extra}"
        );
        let cfg = stallnet_netconf::parse_str(std::path::Path::new("t.toml"), &text)
            .expect("valid config");
        cfg.edge().expect("edge").uplinks[0].get_ref().clone()
    }

    #[test]
    fn priority_metered_and_rates_change_in_place_the_rest_replaces() {
        let base = uplink("");
        for tunable in [
            "priority = \"backup\"\n",
            "metered = true\n",
            "max_rate = \"5mbit\"\n",
            "min_rate = \"1mbit\"\n",
        ] {
            assert!(same_but_tunable(&base, &uplink(tunable)), "{tunable}");
        }
        for fixed in [
            "gateway = \"100.64.2.1\"\n",
            "apn = \"internet\"\n",
            "cap = { bytes = \"10GB\", period = \"monthly\", reset_day = 1 }\n",
        ] {
            assert!(!same_but_tunable(&base, &uplink(fixed)), "{fixed}");
        }
        let mut other = base.clone();
        other.interface = "wwan1".into();
        assert!(!same_but_tunable(&base, &other));
    }
}

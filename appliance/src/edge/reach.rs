//! The edge's reachability checks per uplink (decisions in [`crate::core::reach`], IO in
//! [`crate::reach_probe`]): holds a captive or DNS-hijacked uplink out of the bond, keeps
//! POS off an uplink whose HTTPS check fails, raises events, and runs the operator's
//! captive-portal login window (`stallnet uplink login`).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::driver::bond::Held;
use anyhow::Result;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::uplinks::{lock, Rt};
use super::{nft, Ctx};
use crate::core::reach::{Change, Https, Portal, Reach};
use crate::events::Level;
use crate::reach_probe::{self, Via};

/// Rule priority of a login window's `from DEVICE lookup UPLINK` (before the tunnel's).
const LOGIN_RULE_PRIORITY: u32 = 900;

/// One uplink's reachability, shared with the status and the login action.
#[derive(Default)]
pub(super) struct Slot {
    /// For the status document (`reachability` of the uplink).
    pub view: Mutex<Option<serde_json::Value>>,
    pub recheck: Notify,
    pub login: Mutex<Option<LoginWindow>>,
}

pub(super) struct LoginWindow {
    pub device: Ipv4Addr,
    pub until: SystemTime,
    pub cancel: CancellationToken,
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Checks uplink `rt` until `cancel` (the uplink stops, or the checks' settings change).
pub(super) async fn run(
    ctx: Arc<Ctx>,
    rt: Arc<Rt>,
    tls: Arc<rustls::ClientConfig>,
    cancel: CancellationToken,
) {
    let r = ctx.cfg().reachability.clone();
    let u = rt.settings();
    let mut reach = Reach::new(crate::plan::reach_config(&r), Instant::now());
    let mark = rt.table(ctx.started.table_base);
    let slot = &rt.reach;
    let (tx, mut rx) = mpsc::channel::<Checked>(4);
    let mut checked_at: Option<SystemTime> = None;
    // Nothing is verified before the first check: POS waits for a verified uplink (or
    // uses any when none is).
    ctx.bond.set_verified(rt.id, false);
    loop {
        let now = Instant::now();
        let seen = rt.seen();
        let present = seen.carrier && seen.index != 0;
        let mut changes = reach.on_link(present, now);
        let idle = ctx.bond.idle_backup(rt.id);
        reach.set_idle_backup(idle, now);
        let due = reach.poll(now);
        if due.portal || due.https {
            let dns = if !r.dns.is_empty() {
                r.dns.clone()
            } else {
                seen.gateway
                    .map(|g| vec![IpAddr::V4(g)])
                    .unwrap_or_default()
            };
            let via = Via {
                interface: u.interface.clone(),
                mark,
                dns,
            };
            if due.portal {
                let (via, url, tx) = (via.clone(), r.portal_url.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tx
                        .send(Checked::Portal(reach_probe::portal(&via, &url).await))
                        .await;
                });
            }
            if due.https {
                let (url, tx, tls) = (r.https_url.clone(), tx.clone(), tls.clone());
                tokio::spawn(async move {
                    let _ = tx
                        .send(Checked::Https(reach_probe::https(&via, &url, tls).await))
                        .await;
                });
            }
        }
        let wait = reach
            .poll_timeout()
            .map_or(secs(1), |t| t.saturating_duration_since(now))
            .min(secs(1));
        tokio::select! {
            res = rx.recv() => {
                let now = Instant::now();
                checked_at = Some(SystemTime::now());
                match res {
                    Some(Checked::Portal(o)) => changes.extend(reach.on_portal(o, now)),
                    Some(Checked::Https(o)) => changes.extend(reach.on_https(o, now)),
                    None => {}
                }
            }
            _ = slot.recheck.notified() => reach.recheck(Instant::now()),
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => {
                end_login(&ctx, &rt, "the daemon stopped").await;
                return;
            }
        }
        for ch in &changes {
            apply(&ctx, &rt, ch).await;
        }
        if let Ok(mut v) = slot.view.lock() {
            *v = Some(view(&reach, checked_at, slot));
        }
    }
}

/// A finished check, back from its task.
enum Checked {
    Portal(crate::core::reach::PortalOutcome),
    Https(Result<(), String>),
}

fn view(reach: &Reach, checked_at: Option<SystemTime>, slot: &Slot) -> serde_json::Value {
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let login = slot.login.lock().ok().and_then(|l| {
        l.as_ref()
            .map(|w| serde_json::json!({ "device": w.device.to_string(), "until": unix(w.until) }))
    });
    let (location, answer) = match reach.portal() {
        Portal::Captive { location } => (location.clone(), None),
        Portal::DnsForged { answer } => (None, Some(answer.clone())),
        _ => (None, None),
    };
    serde_json::json!({
        "portal": reach.portal().name(),
        "portal_location": location,
        "forged_answer": answer,
        "https": reach.https().name(),
        "last_error": reach.last_error(),
        "checked_at": checked_at.map(unix),
        "login": login,
    })
}

/// Carries a verdict change into the bond and the event log.
async fn apply(ctx: &Ctx, rt: &Rt, ch: &Change) {
    let id = rt.id;
    let name = &rt.name;
    match ch {
        Change::Portal { from, to } => {
            let reason = match to {
                Portal::Captive { .. } => Some(Held::Captive),
                Portal::DnsForged { .. } => Some(Held::Hijacked),
                _ => None,
            };
            ctx.bond.set_held(id, reason);
            rt.wake.notify_one();
            match to {
                Portal::Captive { location } => ctx.events.push(
                    Level::Warning,
                    "uplink_captive",
                    Some(name),
                    format!(
                        "{name} is behind a login page{}: kept out of the bond; \
                         `stallnet uplink login {name} --device PHONE-IP` lets a phone \
                         through to sign in",
                        location
                            .as_deref()
                            .map(|l| format!(" ({l})"))
                            .unwrap_or_default()
                    ),
                ),
                Portal::DnsForged { answer } => ctx.events.push(
                    Level::Warning,
                    "uplink_dns_hijacked",
                    Some(name),
                    format!(
                        "{name}'s DNS answers names that do not exist (with {answer}): \
                         kept out of the bond"
                    ),
                ),
                Portal::Clear if from.holds() => {
                    ctx.events.push(
                        Level::Info,
                        "uplink_portal_cleared",
                        Some(name),
                        format!("{name} reaches the internet again: back in the bond"),
                    );
                    end_login(ctx, rt, "the portal let the box through").await;
                }
                _ => {}
            }
        }
        Change::Https { to, .. } => {
            ctx.bond.set_verified(id, *to == Https::Verified);
            match to {
                Https::Verified => ctx.events.push(
                    Level::Info,
                    "uplink_verified",
                    Some(name),
                    format!("{name} passed the HTTPS check: it carries payments"),
                ),
                Https::Failing => ctx.events.push(
                    Level::Warning,
                    "uplink_unverified",
                    Some(name),
                    format!(
                        "{name} fails the HTTPS check ({}): payments avoid it while \
                         another uplink passes",
                        rt.reach
                            .view
                            .lock()
                            .ok()
                            .and_then(|v| v.as_ref()?["last_error"].as_str().map(str::to_string))
                            .unwrap_or_else(|| "see `stallnet uplinks --json`".into())
                    ),
                ),
                Https::Unknown => {}
            }
        }
    }
}

fn login_table(rt: &Rt) -> String {
    format!("stallnet_login_{}", rt.slot)
}

/// Opens a login window: `device` (a LAN address) goes straight out of uplink `rt`, its
/// DNS answered by the uplink's network, for `minutes`; then the uplink is checked again.
pub(super) fn login(
    ctx: &Arc<Ctx>,
    rt: &Arc<Rt>,
    device: Ipv4Addr,
    minutes: u64,
) -> Result<String, String> {
    let u = rt.settings();
    let seen = rt.seen();
    if !seen.carrier || seen.index == 0 {
        return Err(format!("{} has no link: nothing to log in to", u.name));
    }
    let dns = seen.gateway.or_else(|| {
        ctx.cfg().reachability.dns.iter().find_map(|d| match d {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
    });
    let table = rt.table(ctx.started.table_base);
    let handle = tokio::runtime::Handle::current();
    let (c, rt) = (ctx.clone(), rt.clone());
    let name = u.name.clone();
    handle.block_on(async move {
        end_login(&c, &rt, "a new login window replaces it").await;
        let t = login_table(&rt);
        let mut script = format!(
            "table ip {t} {{}}\ndelete table ip {t}\ntable ip {t} {{\n  chain post {{\n    \
             type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr {device} oifname \"{}\" masquerade\n  }}\n",
            u.interface
        );
        if let Some(d) = dns {
            script.push_str(&format!(
                "  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
                 ip saddr {device} udp dport 53 dnat to {d}\n    \
                 ip saddr {device} tcp dport 53 dnat to {d}\n  }}\n"
            ));
        }
        script.push_str("}\n");
        nft(&script).await.map_err(|e| format!("{e:#}"))?;
        let host = ipnet::Ipv4Net::from(device);
        if let Err(e) = c.nl.rule_from(host, table, LOGIN_RULE_PRIORITY).await {
            let _ = nft(&format!("delete table ip {t}\n")).await;
            return Err(format!("{e:#}"));
        }
        let cancel = rt.cancel.child_token();
        let until = SystemTime::now() + secs(minutes * 60);
        if let Ok(mut l) = rt.reach.login.lock() {
            *l = Some(LoginWindow {
                device,
                until,
                cancel: cancel.clone(),
            });
        }
        let (c2, rt2) = (c.clone(), rt.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(secs(minutes * 60)) => {
                    end_login(&c2, &rt2, "its time is up").await;
                }
                _ = cancel.cancelled() => {}
            }
        });
        c.events.push(
            Level::Info,
            "uplink_login",
            Some(&name),
            format!(
                "{device} may reach {name}'s login page directly for {minutes} min; \
                 the uplink is checked again meanwhile and when the window closes"
            ),
        );
        Ok(())
    })?;
    Ok(format!(
        "{device} goes straight out of {} for {minutes} min: open any http:// page on it \
         to get the login page. The box rechecks {} every few seconds and takes it back \
         once the portal lets it through.",
        u.name, u.name
    ))
}

/// Closes uplink `rt`'s login window, if open, and rechecks the uplink.
pub(super) async fn end_login(ctx: &Ctx, rt: &Rt, why: &str) {
    let Some(w) = lock(&rt.reach.login).take() else {
        return;
    };
    w.cancel.cancel();
    let table = rt.table(ctx.started.table_base);
    ctx.nl
        .unrule_from(ipnet::Ipv4Net::from(w.device), table, LOGIN_RULE_PRIORITY)
        .await;
    let t = login_table(rt);
    if let Err(e) = nft(&format!("table ip {t} {{}}\ndelete table ip {t}\n")).await {
        tracing::warn!("closing the login window: {e:#}");
    }
    let name = &rt.name;
    ctx.events.push(
        Level::Info,
        "uplink_login_closed",
        Some(name),
        format!("login window for {} on {name} closed: {why}", w.device),
    );
    rt.reach.recheck.notify_one();
}

//! Config reloads on the edge (`stallnet reload`, `stallnet config apply`, a rollback):
//! the new file is read and everything that can fail is prepared first; then what can
//! change in place does — the LAN, classes, rules, commerce access, hubs, the LAN
//! prefixes, the fallback, the reachability checks and the uplinks one by one (added,
//! removed, replaced or retuned; the others' tunnels untouched) — and what cannot (the
//! TUN device and its MTU, the table numbers, the commerce listener and upstream) is
//! named as needing a restart.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::http::StatusCode;
use stallnet_netconf::{EdgeConfig, Fallback};

use super::uplinks::{self, lock};
use super::{lan_rules, Ctx, LAN_LOCAL_PRIORITY, LAN_TUNNEL_PRIORITY};
use crate::control::ActionError;
use crate::events::Level;

/// The hub identities the tunnel's TLS pins.
pub(super) fn pins(e: &EdgeConfig) -> Vec<String> {
    e.hubs
        .iter()
        .map(|h| h.identity.get_ref().clone())
        .collect()
}

/// Compares config sections by their JSON form (they are `Serialize`, not all `PartialEq`).
pub(super) fn same<A: serde::Serialize, B: serde::Serialize>(a: &A, b: &B) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn invalid(msg: String) -> ActionError {
    ActionError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_config", msg)
}

/// Reloads the config file; says what was applied and which changes need a restart.
pub(super) fn reload(ctx: &Arc<Ctx>) -> Result<(String, Vec<&'static str>), ActionError> {
    let _one = lock(&ctx.reloading);
    let rt = tokio::runtime::Handle::current();
    let path = ctx.config_path.as_ref().ok_or_else(|| {
        ActionError::new(
            StatusCode::CONFLICT,
            "no_config_file",
            "the daemon was not started from a config file",
        )
    })?;
    let new = stallnet_netconf::load_file(path)
        .map_err(|e| invalid(format!("{e}; the running config is unchanged")))?;
    let e = new.edge().cloned().ok_or_else(|| {
        invalid("the file is not an edge config; the running config is unchanged".into())
    })?;
    let plan = crate::plan::edge(&new).map_err(|err| {
        invalid(format!(
            "the config validated but cannot run ({err}); the running config is unchanged"
        ))
    })?;
    let old = ctx.cfg();
    let started = &ctx.started;

    // What can fail comes first, so that a failure leaves everything as it was.
    let hubs_changed = !same(&old.hubs, &e.hubs);
    let client = if hubs_changed {
        Some(
            crate::identity::client_config(&ctx.me, &pins(&e)).map_err(|err| {
                invalid(format!("hubs: {err:#}; the running config is unchanged"))
            })?,
        )
    } else {
        None
    };
    let reach_changed = !same(&old.reachability, &e.reachability);
    let tls = if reach_changed && e.reachability.enabled {
        Some(
            crate::reach_probe::tls_config(e.reachability.ca_file.as_deref()).map_err(|err| {
                invalid(format!(
                    "edge.reachability: {err:#}; the running config is unchanged"
                ))
            })?,
        )
    } else {
        None
    };
    let mut restart = Vec::new();
    match (&ctx.lan, &new.lan) {
        (Some(running), Some(l)) => rt.block_on(running.reload(l.get_ref())).map_err(|err| {
            ActionError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "lan_failed",
                format!("applying the LAN failed: {err:#}"),
            )
        })?,
        (None, None) => {}
        _ => restart.push("lan (added or removed)"),
    }

    // From here on, everything applies.
    let mut applied: Vec<String> = Vec::new();
    if let Ok(mut c) = ctx.cfg.write() {
        *c = Arc::new(e.clone());
    }
    ctx.bond.configure(plan.sched.clone());
    ctx.bond.set_rules(&plan.rules);
    *lock(&ctx.device_rules) = super::device_rules(&e);
    ctx.devices_changed.notify_one();
    let classes_changed = !same(&old.classes, &e.classes);
    if classes_changed || old.mode != e.mode {
        applied.push("classes".into());
    }
    if !same(&old.rules, &e.rules) || old.pos_sources != e.pos_sources {
        applied.push("rules".into());
    }

    // Commerce: who may use the API and how much apply in place; where it listens,
    // where it delivers and the body limit need a restart.
    match (&ctx.commerce_cfg, new.commerce(), ctx.commerce.get()) {
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

    // Hubs: new pins for new connections; a connection to a hub that is no longer
    // configured (address and identity) closes, and its uplink connects again.
    if let Some(client) = client {
        *lock(&ctx.client) = client;
        lock(&ctx.hub_choice).set_hubs(e.hubs.len());
        for r in ctx.uplinks() {
            let Some(conn) = ctx.bond.connection(r.id) else {
                continue;
            };
            let remote = conn.remote_address();
            let was = old.hubs.iter().find(|h| h.address == remote);
            let kept = was.is_some_and(|w| {
                e.hubs
                    .iter()
                    .any(|h| h.address == remote && h.identity.get_ref() == w.identity.get_ref())
            });
            if !kept {
                conn.close(0u32.into(), b"hub no longer configured");
                r.wake.notify_one();
            }
        }
        applied.push("hubs".into());
        if e.hubs.is_empty() {
            ctx.events.push(
                Level::Warning,
                "no_hub",
                None,
                "no hub configured: LAN traffic goes straight out of the uplinks (no bonding)"
                    .into(),
            );
        }
    }

    // The LAN prefixes' rules are rebuilt.
    if !same(&old.lan, &e.lan) {
        rt.block_on(async {
            ctx.nl.release_rules_at(LAN_LOCAL_PRIORITY).await;
            ctx.nl.release_rules_at(LAN_TUNNEL_PRIORITY).await;
            lan_rules(&ctx.nl, &e.lan, started.table_base).await
        })
        .map_err(|err| {
            ActionError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "lan_rules_failed",
                format!("edge.lan: {err:#}"),
            )
        })?;
        applied.push("edge.lan".into());
    }

    if old.fallback != e.fallback {
        ctx.fail_fast
            .store(e.fallback == Fallback::None, Ordering::SeqCst);
        ctx.generation.fetch_add(1, Ordering::SeqCst);
        applied.push("fallback".into());
    }

    if reach_changed {
        *lock(&ctx.tls) = tls;
    }

    // Uplinks, one by one.
    let (mut added, mut removed, mut replaced, mut retuned) = (vec![], vec![], vec![], vec![]);
    for r in ctx.uplinks() {
        let Some(u) = e
            .uplinks
            .iter()
            .map(|u| u.get_ref())
            .find(|u| u.name == r.name)
        else {
            rt.block_on(uplinks::stop(ctx, &r));
            removed.push(r.name.clone());
            continue;
        };
        let before = r.settings();
        if !uplinks::same_but_tunable(&before, u) {
            rt.block_on(uplinks::stop(ctx, &r));
            let n = uplinks::start(ctx, u.clone());
            if r.is_disabled() {
                // The operator's `uplink disable` holds for the new settings too.
                n.disabled.store(true, Ordering::SeqCst);
                ctx.bond.set_disabled(n.id, true);
            }
            replaced.push(r.name.clone());
            continue;
        }
        if !same(&before, u) {
            retuned.push(r.name.clone());
        }
        uplinks::retune(ctx, &r, u, &e);
        if reach_changed {
            // A login window belongs to the checks that opened it.
            rt.block_on(super::reach::end_login(
                ctx,
                &r,
                "the reachability settings changed",
            ));
            uplinks::start_reach(ctx, &r);
        }
    }
    for u in e.uplinks.iter().map(|u| u.get_ref()) {
        if ctx.uplink(&u.name).is_none() {
            uplinks::start(ctx, u.clone());
            added.push(u.name.clone());
        }
    }
    if classes_changed {
        // The hub schedules the way down with the edge's class settings: each uplink's
        // connection tells it.
        ctx.class_specs.send_replace(plan.specs.clone());
    }
    // Config order (the dashboard's, the fallback's).
    lock(&ctx.uplinks).sort_by_key(|r| {
        e.uplinks
            .iter()
            .position(|u| u.get_ref().name == r.name)
            .unwrap_or(usize::MAX)
    });
    if !(added.is_empty() && removed.is_empty() && replaced.is_empty()) {
        ctx.generation.fetch_add(1, Ordering::SeqCst);
    }
    // A preferred uplink that is no longer configured: the configured priorities apply.
    let gone = {
        let mut p = lock(&ctx.preferred);
        if p.as_ref().is_some_and(|n| ctx.uplink(n).is_none()) {
            p.take()
        } else {
            None
        }
    };
    if let Some(p) = gone {
        for r in ctx.uplinks() {
            uplinks::refresh_backup(ctx, &r);
        }
        ctx.events.push(
            Level::Info,
            "preference_cleared",
            Some(&p),
            format!("{p} was preferred and is no longer configured"),
        );
    }
    for (what, names, level, kind) in [
        ("added", &added, Level::Info, "uplink_added"),
        ("removed", &removed, Level::Warning, "uplink_removed"),
        (
            "replaced (tunnel reconnected)",
            &replaced,
            Level::Info,
            "uplink_replaced",
        ),
        ("retuned", &retuned, Level::Info, "uplink_retuned"),
    ] {
        for n in names {
            ctx.events.push(
                level,
                kind,
                Some(n),
                format!("uplink {n} {what} by a config reload"),
            );
        }
        if !names.is_empty() {
            applied.push(format!("uplinks {what}: {}", names.join(", ")));
        }
    }
    if reach_changed {
        applied.push("reachability checks".into());
    }

    for (name, differs) in [
        (
            "edge.tun_name/mtu",
            started.tun_name != e.tun_name || started.mtu != e.mtu,
        ),
        ("edge.table_base", started.table_base != e.table_base),
        (
            "edge.dhcp_leases",
            started.dhcp_leases != e.dhcp_leases && ctx.lan.is_some(),
        ),
    ] {
        if differs {
            restart.push(name);
        }
    }
    let done = if applied.is_empty() {
        "nothing changed".to_string()
    } else {
        format!("applied in place: {}", applied.join("; "))
    };
    let msg = if restart.is_empty() {
        format!("{} is valid; {done}", path.display())
    } else {
        format!(
            "{} is valid; {done}; these changes need a restart (systemctl restart stallnet): {}",
            path.display(),
            restart.join(", ")
        )
    };
    ctx.events
        .push(Level::Info, "config_reloaded", None, msg.clone());
    Ok((msg, restart))
}

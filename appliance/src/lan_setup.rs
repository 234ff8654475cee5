//! Puts the config's `[lan]` into the kernel and into dnsmasq: the bridge and its ports,
//! the segments (VLAN links or ports of their own), exactly the configured address on each (others removed), and a
//! dnsmasq rendered from the config, run and restarted by the daemon, and the firewall
//! (one nft transaction). Applying the same config again changes nothing; a changed
//! config restarts dnsmasq with the new file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_netconf::firewall;
use stallnet_netconf::lan::{dnsmasq_conf, LanConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::driver::netlink::Netlink;

/// Interfaces and addresses, in order: the bridge (or port), its ports, the VLANs.
pub async fn apply_links(nl: &Netlink, lan: &LanConfig) -> Result<()> {
    let index = if lan.ports.is_empty() {
        nl.link(&lan.interface)
            .await?
            .map(|l| l.index)
            .with_context(|| format!("LAN interface {} does not exist", lan.interface))?
    } else {
        let bridge = nl.ensure_bridge(&lan.interface).await?;
        for p in &lan.ports {
            let port = nl
                .link(p)
                .await?
                .map(|l| l.index)
                .with_context(|| format!("LAN port {p} does not exist"))?;
            // A bridge port carries no address of its own.
            nl.set_only_prefix(port, None).await?;
            nl.set_up(port, Some(bridge)).await?;
        }
        bridge
    };
    nl.set_up(index, None).await?;
    nl.set_only_prefix(index, Some(lan.address)).await?;
    for v in &lan.segments {
        let name = v.interface(lan);
        let vi =
            match v.vlan {
                Some(id) => nl.ensure_vlan(&name, index, id).await?,
                None => nl.link(&name).await?.map(|l| l.index).with_context(|| {
                    format!("segment {}: interface {name} does not exist", v.name)
                })?,
            };
        nl.set_up(vi, None).await?;
        nl.set_only_prefix(vi, Some(v.address)).await?;
    }
    Ok(())
}

/// Replaces the firewall table in one nft transaction.
pub async fn apply_firewall(lan: &LanConfig, inputs: &firewall::Inputs) -> Result<()> {
    let script = firewall::render(lan, inputs)?;
    crate::driver::kernel::nft(&script)
        .await
        .context("the firewall was refused")
}

/// The rendered file's path in the runtime directory.
pub fn conf_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("dnsmasq.conf")
}

/// Writes the dnsmasq file; true when its content changed.
pub fn write_conf(lan: &LanConfig, leases: &Path, runtime_dir: &Path) -> Result<bool> {
    let text = dnsmasq_conf(lan, &leases.display().to_string(), "the running config")?;
    let path = conf_path(runtime_dir);
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    if let Some(dir) = leases.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    stallnet_netconf::revisions::write_atomic(&path, text.as_bytes())?;
    Ok(true)
}

/// Runs dnsmasq on the rendered file until cancelled; restarts it when it exits (after a
/// second) and whenever `changed` ticks (a new file).
pub async fn run_dnsmasq(
    runtime_dir: PathBuf,
    mut changed: watch::Receiver<u64>,
    cancel: CancellationToken,
) {
    let conf = conf_path(&runtime_dir);
    let pid = runtime_dir.join("dnsmasq.pid");
    loop {
        let child = tokio::process::Command::new("dnsmasq")
            .arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", conf.display()))
            .arg(format!("--pid-file={}", pid.display()))
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("cannot start dnsmasq (DHCP and DNS for the LAN): {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    _ = cancel.cancelled() => return,
                }
            }
        };
        tracing::info!(conf = %conf.display(), "dnsmasq running for the LAN");
        tokio::select! {
            st = child.wait() => {
                tracing::warn!("dnsmasq exited ({st:?}); restarting in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            r = changed.changed() => {
                let _ = child.kill().await;
                if r.is_err() {
                    return;
                }
                tracing::info!("LAN config changed: restarting dnsmasq");
            }
            _ = cancel.cancelled() => {
                let _ = child.kill().await;
                return;
            }
        }
    }
}

/// The LAN as the daemon keeps it: applied at start, re-applied on reload.
pub struct Lan {
    nl: Arc<Netlink>,
    firewall: firewall::Inputs,
    /// The LAN in force (restored when a new one fails half-way).
    current: tokio::sync::Mutex<LanConfig>,
    runtime_dir: PathBuf,
    leases: PathBuf,
    tick: watch::Sender<u64>,
}

impl Lan {
    /// Applies `lan` and starts dnsmasq (when a DHCP range or DNS is configured, dnsmasq
    /// always runs: it is the LAN's resolver).
    /// Its changes go through `nl` (the daemon's, which undoes them at exit); the
    /// firewall table is the caller's to remove.
    pub async fn start(
        nl: Arc<Netlink>,
        lan: &LanConfig,
        leases: PathBuf,
        runtime_dir: PathBuf,
        firewall: firewall::Inputs,
        cancel: CancellationToken,
    ) -> Result<Self> {
        apply_links(&nl, lan).await?;
        apply_firewall(lan, &firewall).await?;
        write_conf(lan, &leases, &runtime_dir)?;
        let (tick, rx) = watch::channel(0u64);
        tokio::spawn(run_dnsmasq(runtime_dir.clone(), rx, cancel));
        Ok(Self {
            nl,
            firewall,
            current: tokio::sync::Mutex::new(lan.clone()),
            runtime_dir,
            leases,
            tick,
        })
    }

    /// Re-applies a (possibly) changed LAN, all or nothing: when a step fails, the LAN in
    /// force before is applied again and the error says what failed.
    pub async fn reload(&self, lan: &LanConfig) -> Result<()> {
        let mut current = self.current.lock().await;
        match self.apply(lan).await {
            Ok(()) => {
                *current = lan.clone();
                Ok(())
            }
            Err(e) => {
                let restored = self.apply(&current).await;
                let how = match restored {
                    Ok(()) => "the previous LAN is back in force".to_string(),
                    Err(r) => format!("restoring the previous LAN failed too: {r:#}"),
                };
                Err(e.context(how))
            }
        }
    }

    async fn apply(&self, lan: &LanConfig) -> Result<()> {
        apply_links(&self.nl, lan).await?;
        apply_firewall(lan, &self.firewall).await?;
        if write_conf(lan, &self.leases, &self.runtime_dir)? {
            self.tick.send_modify(|n| *n += 1);
        }
        Ok(())
    }
}

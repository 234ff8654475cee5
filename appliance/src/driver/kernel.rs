//! Everything the daemon changes in the kernel, and the one undo of all of it: the
//! netlink ledger (routes, rules, links, addresses), the sysctls it wrote and the nft
//! tables it owns. `run` of each role holds one [`Kernel`] and calls [`Kernel::undo`] on
//! every way out — a start that fails half-way, an error, a signal — so the machine is
//! left as it was found. After `undo` the netlink side refuses further changes, so a task
//! still winding down cannot put a route back.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::driver::netlink::Netlink;

pub struct Kernel {
    pub nl: Arc<Netlink>,
    /// Sysctls written, with the value each had before (`net/ipv4/ip_forward`, "0").
    sysctls: Mutex<Vec<(String, String)>>,
    /// nft tables to delete (`"ip stallnet_fallback"`), created or about to be.
    nft_tables: Mutex<Vec<String>>,
}

impl Kernel {
    pub fn new() -> Result<Self> {
        Ok(Self {
            nl: Arc::new(Netlink::new()?),
            sysctls: Mutex::new(Vec::new()),
            nft_tables: Mutex::new(Vec::new()),
        })
    }

    /// Writes a sysctl under /proc/sys, remembering the value it had (nothing is written,
    /// or remembered, when it already has `value`: the package's sysctl.d file at boot).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{key}");
        let before = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let before = before.trim();
        if before == value {
            return Ok(());
        }
        std::fs::write(&path, value).with_context(|| format!("setting {path} = {value}"))?;
        if let Ok(mut v) = self.sysctls.lock() {
            v.push((path, before.to_string()));
        }
        Ok(())
    }

    /// Marks the nft table `family name` as the daemon's: deleted by [`Self::undo`].
    /// Call before creating it, so that a half-made one goes too.
    pub fn owns_nft_table(&self, family: &str, name: &str) {
        if let Ok(mut v) = self.nft_tables.lock() {
            let t = format!("{family} {name}");
            if !v.contains(&t) {
                v.push(t);
            }
        }
    }

    /// Runs a role's `body` with a new `Kernel`, then cancels its tasks and undoes every
    /// change it made, whatever `body` returned: the one way `edge::run` and `hub::run`
    /// end.
    pub async fn scoped<F, Fut>(cancel: &CancellationToken, body: F) -> Result<()>
    where
        F: FnOnce(Arc<Kernel>) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let kernel = Arc::new(Kernel::new()?);
        let result = body(kernel.clone()).await;
        cancel.cancel();
        kernel.undo().await;
        result
    }

    /// Undoes every change, newest first: nft tables, netlink, sysctls. Errors are
    /// logged; each step runs whatever the others did.
    pub async fn undo(&self) {
        let tables: Vec<String> = self
            .nft_tables
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        for t in tables.iter().rev() {
            // Creating it first makes the delete succeed whether or not it exists.
            if let Err(e) = nft(&format!("table {t} {{}}\ndelete table {t}\n")).await {
                tracing::warn!("removing nft table {t}: {e:#}");
            }
        }
        self.nl.revert().await;
        let sysctls: Vec<(String, String)> = self
            .sysctls
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        for (path, before) in sysctls.iter().rev() {
            if let Err(e) = std::fs::write(path, before) {
                tracing::warn!("restoring {path} = {before}: {e}");
            }
        }
    }
}

/// Runs an nft script (`nft -f -`).
pub async fn nft(script: &str) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed?)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    anyhow::ensure!(
        out.status.success(),
        "nft refused the script: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The packets counted by the rules of chain `family table chain` (`nft -j list chain`).
pub async fn nft_chain_packets(family: &str, table: &str, chain: &str) -> Result<u64> {
    let out = tokio::process::Command::new("nft")
        .args(["-j", "list", "chain", family, table, chain])
        .output()
        .await
        .context("running nft (is nftables installed?)")?;
    anyhow::ensure!(
        out.status.success(),
        "nft list: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(counted(&doc))
}

/// The sum of the counters in `nft -j` output.
fn counted(doc: &serde_json::Value) -> u64 {
    doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["rule"]["expr"].as_array())
        .flatten()
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .fold(0u64, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_from_nft_json() {
        let doc = serde_json::json!({ "nftables": [
            { "metainfo": { "json_schema_version": 1 } },
            { "chain": { "name": "lan_in" } },
            { "rule": { "expr": [ { "match": {} }, { "counter": { "packets": 7, "bytes": 448 } }, { "drop": null } ] } },
            { "rule": { "expr": [ { "counter": { "packets": 5, "bytes": 320 } } ] } }
        ]});
        assert_eq!(counted(&doc), 12);
        assert_eq!(counted(&serde_json::json!({})), 0);
    }
}

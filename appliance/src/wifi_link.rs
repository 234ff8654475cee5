//! Joins a wifi uplink's network: renders its wpa_supplicant file (0600, no plaintext
//! passphrase) into the runtime directory and runs wpa_supplicant on the interface,
//! restarting it when it exits. The uplink's own task then sees the carrier and address
//! like on any interface.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use stallnet_netconf::{wifi, Uplink};
use tokio_util::sync::CancellationToken;

/// Writes the file; returns its path.
pub fn write_conf(u: &Uplink, runtime_dir: &std::path::Path) -> Result<Option<PathBuf>> {
    let Some(w) = &u.wifi else {
        return Ok(None);
    };
    let ctrl = runtime_dir.join("wpa");
    std::fs::create_dir_all(&ctrl).with_context(|| format!("creating {}", ctrl.display()))?;
    let path = runtime_dir.join(format!("wpa-{}.conf", u.name));
    let text = wifi::wpa_supplicant_conf(w, &ctrl.display().to_string());
    crate::identity::write_private(&path, text.as_bytes())?;
    Ok(Some(path))
}

/// Runs wpa_supplicant for `u` until cancelled.
pub async fn run(u: Uplink, conf: PathBuf, cancel: CancellationToken) {
    loop {
        let child = tokio::process::Command::new("wpa_supplicant")
            .args(["-i", &u.interface, "-D", "nl80211,wext", "-c"])
            .arg(&conf)
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(uplink = %u.name, "cannot start wpa_supplicant: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => continue,
                    _ = cancel.cancelled() => return,
                }
            }
        };
        tokio::select! {
            st = child.wait() => {
                tracing::warn!(uplink = %u.name, "wpa_supplicant exited ({st:?}); restarting in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            _ = cancel.cancelled() => {
                let _ = child.kill().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The file holds the network's derived key: the owner alone may read it, and a
    /// rewrite replaces it whole.
    #[test]
    fn the_wpa_file_is_private_and_replaced_whole() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("sn-wpa-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text =
            "role = \"edge\"\n[edge]\nlan = [\"10.1.0.0/24\"]\nhubs = []\nfallback = \"direct\"\n\
             [[edge.uplinks]]\nname = \"wifi\"\ninterface = \"wlan0\"\nkind = \"wifi\"\n\
             wifi = { ssid = \"Market Hall\", passphrase = \"stall-owners-only\" }\n";
        let cfg = stallnet_netconf::parse_str(std::path::Path::new("t.toml"), text)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let u = cfg.edge().context("edge")?.uplinks[0].get_ref().clone();
        for _ in 0..2 {
            let path = write_conf(&u, &dir)?.context("a wifi uplink has a file")?;
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let conf = std::fs::read_to_string(&path)?;
            assert!(
                conf.contains("psk=") && !conf.contains("stall-owners-only"),
                "{conf}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

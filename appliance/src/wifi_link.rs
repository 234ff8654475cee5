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
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let Some(w) = &u.wifi else {
        return Ok(None);
    };
    let ctrl = runtime_dir.join("wpa");
    std::fs::create_dir_all(&ctrl).with_context(|| format!("creating {}", ctrl.display()))?;
    let path = runtime_dir.join(format!("wpa-{}.conf", u.name));
    let text = wifi::wpa_supplicant_conf(w, &ctrl.display().to_string());
    let tmp = runtime_dir.join(format!(".wpa-{}.conf.tmp", u.name));
    {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
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

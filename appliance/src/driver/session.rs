//! The session handshake on each new QUIC connection: one small JSON document each way on
//! a bidirectional stream. The edge says which uplink this is and its epoch (a random
//! number per process start, so the hub knows when the edge's sequence space restarts);
//! it also says whether the uplink is a backup, which classes it may carry and the edge's
//! class settings, so the hub queues downloads by the same rules. The hub answers with the
//! device's tunnel address and its own epoch.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use stallnet_netconf::{ClassName, ClassSpec};

const MAX_DOC: usize = 16 * 1024;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub version: u32,
    pub epoch: u64,
    pub link: String,
    /// A backup uplink: the hub sends on it only when no other uplink is usable.
    #[serde(default)]
    pub backup: bool,
    /// The classes this uplink may carry (the edge's class settings decide).
    #[serde(default)]
    pub link_classes: Option<Vec<ClassName>>,
    /// The edge's classes, so downloads are queued and shaped as the edge's config says.
    #[serde(default)]
    pub classes: Option<Vec<ClassSpec>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    pub version: u32,
    pub epoch: u64,
    pub address: IpAddr,
}

async fn read_doc<T: for<'a> Deserialize<'a>>(rx: &mut quinn::RecvStream) -> Result<T> {
    let buf = rx
        .read_to_end(MAX_DOC)
        .await
        .context("reading session document")?;
    serde_json::from_slice(&buf).context("malformed session document")
}

async fn write_doc<T: Serialize>(tx: &mut quinn::SendStream, doc: &T) -> Result<()> {
    let v = serde_json::to_vec(doc)?;
    tx.write_all(&v).await?;
    tx.finish()?;
    Ok(())
}

/// Edge side.
pub async fn hello(conn: &quinn::Connection, hello: &Hello) -> Result<Welcome> {
    tokio::time::timeout(TIMEOUT, async {
        let (mut tx, mut rx) = conn.open_bi().await?;
        write_doc(&mut tx, hello).await?;
        let w: Welcome = read_doc(&mut rx).await?;
        if w.version != 1 {
            bail!("hub speaks session version {}", w.version);
        }
        Ok(w)
    })
    .await
    .context("session handshake timed out")?
}

/// Hub side: reads the Hello, lets `answer` decide, writes the Welcome.
pub async fn welcome(
    conn: &quinn::Connection,
    answer: impl FnOnce(&Hello) -> Result<Welcome>,
) -> Result<Hello> {
    tokio::time::timeout(TIMEOUT, async {
        let (mut tx, mut rx) = conn.accept_bi().await?;
        let h: Hello = read_doc(&mut rx).await?;
        if h.version != 1 {
            bail!("edge speaks session version {}", h.version);
        }
        let w = answer(&h)?;
        write_doc(&mut tx, &w).await?;
        Ok(h)
    })
    .await
    .context("session handshake timed out")?
}

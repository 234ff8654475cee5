//! The session handshake on each new QUIC connection: one small JSON document each way on
//! a bidirectional stream. The edge says which uplink this is and its epoch (a random
//! number per process start, so the hub knows when the edge's sequence space restarts);
//! it also says whether the uplink is a backup, which classes it may carry and the edge's
//! class settings, so the hub queues downloads by the same rules. The hub answers with the
//! device's tunnel address and its own epoch.
//!
//! While the connection runs, the edge tells the hub what changes about the uplink in a
//! [`LinkUpdate`], one per unidirectional stream, read in order: the operator prefers
//! another uplink, a data cap makes it a backup, the reachability checks take POS off it,
//! a reload changes its priority or the class settings.

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

/// What the hub must know anew about a running uplink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkUpdate {
    pub backup: bool,
    /// The classes this uplink may carry now.
    pub link_classes: Vec<ClassName>,
    /// The edge's class settings, when they changed.
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

/// Edge side: sends one update on its own stream.
pub async fn send_update(conn: &quinn::Connection, update: &LinkUpdate) -> Result<()> {
    tokio::time::timeout(TIMEOUT, async {
        let mut tx = conn.open_uni().await?;
        write_doc(&mut tx, update).await
    })
    .await
    .context("sending a link update timed out")?
}

/// Hub side: the next update, `Ok(None)` once the connection has closed. A malformed
/// document is an error for that update only; the caller goes on with the next.
pub async fn next_update(conn: &quinn::Connection) -> Result<Option<LinkUpdate>> {
    let mut rx = match conn.accept_uni().await {
        Ok(rx) => rx,
        Err(_) => return Ok(None),
    };
    tokio::time::timeout(TIMEOUT, read_doc(&mut rx))
        .await
        .context("reading a link update timed out")?
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity;
    use std::sync::{Arc, RwLock};

    fn update(backup: bool, n: usize) -> LinkUpdate {
        LinkUpdate {
            backup,
            link_classes: [ClassName::Pos, ClassName::Stream, ClassName::Bulk][..n].to_vec(),
            classes: None,
        }
    }

    /// Over real QUIC on loopback: updates arrive in the order sent, however fast; a
    /// malformed one is an error for itself alone; the end of the connection ends them.
    #[tokio::test]
    async fn link_updates_arrive_in_order_and_a_bad_one_spoils_nothing() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("stallnet-session-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let hub = identity::keygen(&dir.join("hub"), false)?;
        let edge = identity::keygen(&dir.join("edge"), false)?;
        let allow = Arc::new(RwLock::new([edge.id.clone()].into_iter().collect()));
        let server = identity::server_config(&hub, allow, Default::default())?;
        let hub_ep = quinn::Endpoint::server(server, "127.0.0.1:0".parse()?)?;
        let addr = hub_ep.local_addr()?;
        let mut edge_ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        edge_ep.set_default_client_config(identity::client_config(
            &edge,
            std::slice::from_ref(&hub.id),
        )?);

        let (five_tx, five_rx) = tokio::sync::oneshot::channel();
        let hub_side = tokio::spawn(async move {
            let conn = hub_ep.accept().await.context("incoming")?.await?;
            let hello = welcome(&conn, |_| {
                Ok(Welcome {
                    version: 1,
                    epoch: 7,
                    address: "10.99.0.2".parse()?,
                })
            })
            .await?;
            let mut got = Vec::new();
            while got.len() < 5 {
                match next_update(&conn).await {
                    Ok(Some(u)) => got.push(Ok(u)),
                    Ok(None) => bail!("closed after {got:?}"),
                    Err(e) => got.push(Err(format!("{e:#}"))),
                }
            }
            let _ = five_tx.send((hello, got));
            // The edge closes the connection: no more updates.
            anyhow::Ok(next_update(&conn).await?)
        });

        let conn = edge_ep.connect(addr, identity::HUB_NAME)?.await?;
        let w = hello(
            &conn,
            &Hello {
                version: 1,
                epoch: 1,
                link: "wifi".into(),
                backup: false,
                link_classes: None,
                classes: None,
            },
        )
        .await?;
        assert_eq!(w.epoch, 7);
        for n in 1..=3 {
            send_update(&conn, &update(n % 2 == 0, n)).await?;
        }
        let mut bad = conn.open_uni().await?;
        bad.write_all(b"{\"backup\": \"maybe\"}").await?;
        bad.finish()?;
        send_update(&conn, &update(true, 0)).await?;
        let (hello_seen, got) = tokio::time::timeout(Duration::from_secs(10), five_rx)
            .await
            .context("the hub read five updates")??;
        conn.close(0u32.into(), b"done");
        assert_eq!(
            hub_side.await??,
            None,
            "the end of the connection ends them"
        );
        assert_eq!(hello_seen.link, "wifi");
        assert_eq!(got.len(), 5, "{got:?}");
        for n in 1..=3 {
            assert_eq!(got[n - 1], Ok(update(n % 2 == 0, n)));
        }
        let err = got[3].as_ref().expect_err("malformed");
        assert!(err.contains("malformed session document"), "{err}");
        assert_eq!(got[4], Ok(update(true, 0)));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

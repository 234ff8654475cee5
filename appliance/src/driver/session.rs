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
//!
//! The session's version is chosen in the TLS handshake (ALPN, [`PROTOCOLS`]), so either
//! end may be newer than the other. Version 2 adds the [`BoxReport`]: what the box holds
//! for the organiser's fleet view (sales waiting). Under version 1 each unidirectional
//! stream carries a bare [`LinkUpdate`]; under version 2 an [`EdgeDoc`], which names its
//! kind. Version 3 speaks as version 2 here and adds to the bond's reports the highest
//! sequence number delivered on the link (see [`stallnet_proto::frame`]).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use stallnet_netconf::{ClassName, ClassSpec};

const MAX_DOC: usize = 16 * 1024;

/// The session versions this build speaks, newest first, as ALPN protocol names: a hub
/// picks the first it shares with the edge; a peer from before version 2 offers or
/// accepts `stallnet/1` only, one from before version 3 no more than `stallnet/2`.
pub const PROTOCOLS: [&[u8]; 3] = [b"stallnet/3", b"stallnet/2", b"stallnet/1"];

/// The session version agreed on connection `conn` in its handshake.
pub fn version(conn: &quinn::Connection) -> u32 {
    let protocol = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    match protocol.as_deref() {
        Some(b"stallnet/3") => 3,
        Some(b"stallnet/2") => 2,
        _ => 1,
    }
}
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

/// What the box holds that the organiser watches (session version 2): its commerce
/// outbox. Sent when it changes, at most once a second, and after each hello.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoxReport {
    /// Sales and other records taken on the box and not yet delivered upstream.
    pub sales_waiting: u64,
    /// Records the upstream refused for good (they need a person).
    pub dead_letters: u64,
    /// When the oldest waiting record was taken (Unix seconds, the box's clock).
    #[serde(default)]
    pub oldest_waiting_unix: Option<i64>,
}

/// One document on a unidirectional stream, edge to hub (session version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum EdgeDoc {
    Link(LinkUpdate),
    Box(BoxReport),
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

/// Edge side: sends one document on its own stream, in the form the connection's
/// version reads. Returns `false`, sending nothing, for a document the hub's version
/// does not know (a box report to a version 1 hub).
pub async fn send_update(conn: &quinn::Connection, doc: &EdgeDoc) -> Result<bool> {
    let body = match (version(conn), doc) {
        (1, EdgeDoc::Link(u)) => serde_json::to_vec(u)?,
        (1, EdgeDoc::Box(_)) => return Ok(false),
        _ => serde_json::to_vec(doc)?,
    };
    tokio::time::timeout(TIMEOUT, async {
        let mut tx = conn.open_uni().await?;
        tx.write_all(&body).await?;
        tx.finish()?;
        anyhow::Ok(())
    })
    .await
    .context("sending a session document timed out")??;
    Ok(true)
}

/// Hub side: the next document, `Ok(None)` once the connection has closed. A malformed
/// document is an error for itself only; the caller goes on with the next.
pub async fn next_update(conn: &quinn::Connection) -> Result<Option<EdgeDoc>> {
    let mut rx = match conn.accept_uni().await {
        Ok(rx) => rx,
        Err(_) => return Ok(None),
    };
    let doc = if version(conn) == 1 {
        tokio::time::timeout(TIMEOUT, read_doc::<LinkUpdate>(&mut rx))
            .await
            .map(|r| r.map(EdgeDoc::Link))
    } else {
        tokio::time::timeout(TIMEOUT, read_doc::<EdgeDoc>(&mut rx)).await
    };
    doc.context("reading a session document timed out")?
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity;
    use std::sync::{Arc, RwLock};

    fn update(backup: bool, n: usize) -> EdgeDoc {
        EdgeDoc::Link(LinkUpdate {
            backup,
            link_classes: [ClassName::Pos, ClassName::Stream, ClassName::Bulk][..n].to_vec(),
            classes: None,
        })
    }

    /// A hub accepting session versions `hub` and an edge offering `edge`, connected over
    /// real QUIC on loopback, hello and welcome done: (hub's side, edge's side).
    async fn pair(
        tag: &str,
        hub: &[&[u8]],
        edge: &[&[u8]],
    ) -> Result<(quinn::Endpoint, quinn::Connection, quinn::Connection)> {
        let dir =
            std::env::temp_dir().join(format!("stallnet-session-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let hub_id = identity::keygen(&dir.join("hub"), false)?;
        let edge_id = identity::keygen(&dir.join("edge"), false)?;
        let _ = std::fs::remove_dir_all(&dir);
        let allow = Arc::new(RwLock::new([edge_id.id.clone()].into_iter().collect()));
        let server = identity::server_config_speaking(&hub_id, allow, Default::default(), hub)?;
        let hub_ep = quinn::Endpoint::server(server, "127.0.0.1:0".parse()?)?;
        let addr = hub_ep.local_addr()?;
        let mut edge_ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        edge_ep.set_default_client_config(identity::client_config_speaking(
            &edge_id,
            std::slice::from_ref(&hub_id.id),
            edge,
        )?);
        let accept = hub_ep.accept();
        let (hub_conn, edge_conn) = tokio::join!(
            async { anyhow::Ok(accept.await.context("incoming")?.await?) },
            async { anyhow::Ok(edge_ep.connect(addr, identity::HUB_NAME)?.await?) }
        );
        let (hub_conn, edge_conn) = (hub_conn?, edge_conn?);
        let hello_doc = Hello {
            version: 1,
            epoch: 1,
            link: "wifi".into(),
            backup: false,
            link_classes: None,
            classes: None,
        };
        let (seen, w) = tokio::join!(
            welcome(&hub_conn, |_| Ok(Welcome {
                version: 1,
                epoch: 7,
                address: "10.99.0.2".parse()?,
            })),
            hello(&edge_conn, &hello_doc)
        );
        assert_eq!(seen?.link, "wifi");
        assert_eq!(w?.epoch, 7);
        Ok((edge_ep, hub_conn, edge_conn))
    }

    /// Over real QUIC on loopback: updates arrive in the order sent, however fast; a
    /// malformed one is an error for itself alone; the end of the connection ends them.
    #[tokio::test]
    async fn link_updates_arrive_in_order_and_a_bad_one_spoils_nothing() -> Result<()> {
        let (_ep, hub, edge) = pair("order", &PROTOCOLS, &PROTOCOLS).await?;
        let report = EdgeDoc::Box(BoxReport {
            sales_waiting: 3,
            dead_letters: 0,
            oldest_waiting_unix: Some(1_700_000_000),
        });
        let (five_tx, five_rx) = tokio::sync::oneshot::channel();
        let hub_side = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 6 {
                match next_update(&hub).await {
                    Ok(Some(u)) => got.push(Ok(u)),
                    Ok(None) => bail!("closed after {got:?}"),
                    Err(e) => got.push(Err(format!("{e:#}"))),
                }
            }
            let _ = five_tx.send(got);
            // The edge closes the connection: no more updates.
            anyhow::Ok(next_update(&hub).await?)
        });
        assert_eq!(version(&edge), 3);
        for n in 1..=3 {
            assert!(send_update(&edge, &update(n % 2 == 0, n)).await?);
        }
        let mut bad = edge.open_uni().await?;
        bad.write_all(b"{\"link\": {\"backup\": \"maybe\"}}")
            .await?;
        bad.finish()?;
        assert!(send_update(&edge, &report).await?);
        assert!(send_update(&edge, &update(true, 0)).await?);
        let got = tokio::time::timeout(Duration::from_secs(10), five_rx)
            .await
            .context("the hub read six documents")??;
        edge.close(0u32.into(), b"done");
        assert_eq!(
            hub_side.await??,
            None,
            "the end of the connection ends them"
        );
        assert_eq!(got.len(), 6, "{got:?}");
        for n in 1..=3 {
            assert_eq!(got[n - 1], Ok(update(n % 2 == 0, n)));
        }
        let err = got[3].as_ref().expect_err("malformed");
        assert!(err.contains("malformed session document"), "{err}");
        assert_eq!(got[4], Ok(report));
        assert_eq!(got[5], Ok(update(true, 0)));
        Ok(())
    }

    /// Either end may be older: a version 1 peer gets bare link updates it reads as
    /// before, and no box reports (which it would take for malformed updates).
    #[tokio::test]
    async fn an_older_peer_gets_version_one_and_no_box_reports() -> Result<()> {
        let v1: [&[u8]; 1] = [b"stallnet/1"];
        for (tag, hub_speaks, edge_speaks) in [
            ("oldhub", &v1[..], &PROTOCOLS[..]),
            ("oldedge", &PROTOCOLS[..], &v1[..]),
        ] {
            let (_ep, hub, edge) = pair(tag, hub_speaks, edge_speaks).await?;
            assert_eq!((version(&hub), version(&edge)), (1, 1), "{tag}");
            let report = EdgeDoc::Box(BoxReport::default());
            assert!(!send_update(&edge, &report).await?, "{tag}: not sent");
            assert!(send_update(&edge, &update(true, 2)).await?);
            // What an older hub reads: the bare update.
            let mut rx = hub.accept_uni().await?;
            let raw = rx.read_to_end(MAX_DOC).await?;
            let bare: LinkUpdate = serde_json::from_slice(&raw)?;
            assert_eq!(EdgeDoc::Link(bare), update(true, 2), "{tag}");
            assert!(send_update(&edge, &update(false, 1)).await?);
            assert_eq!(next_update(&hub).await?, Some(update(false, 1)), "{tag}");
            edge.close(0u32.into(), b"done");
        }
        Ok(())
    }

    /// A peer from before version 3 agrees on version 2 with a newer one: box reports
    /// still go, and the version says the bond's longer reports (which that peer would
    /// refuse) must not.
    #[tokio::test]
    async fn a_version_two_peer_gets_version_two() -> Result<()> {
        let v2: [&[u8]; 2] = [b"stallnet/2", b"stallnet/1"];
        for (tag, hub_speaks, edge_speaks) in [
            ("v2hub", &v2[..], &PROTOCOLS[..]),
            ("v2edge", &PROTOCOLS[..], &v2[..]),
        ] {
            let (_ep, hub, edge) = pair(tag, hub_speaks, edge_speaks).await?;
            assert_eq!((version(&hub), version(&edge)), (2, 2), "{tag}");
            let report = EdgeDoc::Box(BoxReport {
                sales_waiting: 1,
                dead_letters: 0,
                oldest_waiting_unix: None,
            });
            assert!(send_update(&edge, &report).await?, "{tag}: sent");
            assert_eq!(next_update(&hub).await?, Some(report), "{tag}");
            edge.close(0u32.into(), b"done");
        }
        Ok(())
    }
}

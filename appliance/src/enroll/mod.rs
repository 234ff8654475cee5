//! Enrollment: a box joins a hub with a one-time invite code instead of identities
//! pasted both ways.
//!
//! The organiser runs `stallnet hub invite NAME` on the hub: the hub records the invite
//! ([`book`]) and prints the code ([`code`]). On the box, `stallnet enroll CODE` connects
//! to the hub named in the code over QUIC with the hub's identity pinned and no
//! certificate of its own, and sends the secret and its identity on one stream
//! ([`Request`]); the hub redeems the invite (good once, until it expires), records the
//! device and admits it from then on, without a restart and without touching any other
//! stall. The box then pins the hub in its config. A code may also come on the SD card
//! ([`pending`]): the edge redeems it once an uplink reaches the hub. A connection without a certificate
//! gets this exchange and nothing else: 5 s, one request of at most 4 KB, one answer.

pub mod book;
pub mod code;
pub mod pending;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use book::Refusal;

/// The most a request may hold.
const MAX_REQUEST: usize = 4096;
/// How long a connection without a certificate may last.
const DEADLINE: Duration = Duration::from_secs(5);

/// What the box sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    /// The invite's secret, hex.
    pub secret: String,
    /// The box's identity (`stallnet id`).
    pub identity: String,
}

/// What the hub answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub version: u32,
    /// The device name the box has on the hub, when admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
}

/// The hub's side: what redeeming a request means (the book, the fleet).
pub trait Registrar: Send + Sync {
    /// Redeems `secret` for `identity`; the device's name when admitted.
    fn redeem(&self, secret: &[u8], identity: &str) -> Result<String, Refusal>;
}

/// Serves one connection that came without a certificate: one request, one answer,
/// within [`DEADLINE`]. A bad request gets `bad_request`; nothing is recorded for it.
pub async fn serve(conn: quinn::Connection, registrar: &dyn Registrar) -> Result<()> {
    let r = tokio::time::timeout(DEADLINE, exchange(&conn, registrar)).await;
    conn.close(0u32.into(), b"enrollment done");
    match r {
        Ok(r) => r,
        Err(_) => bail!("enrollment request not finished within {DEADLINE:?}"),
    }
}

async fn exchange(conn: &quinn::Connection, registrar: &dyn Registrar) -> Result<()> {
    let (mut send, mut recv) = conn.accept_bi().await.context("enrollment stream")?;
    let body = recv
        .read_to_end(MAX_REQUEST)
        .await
        .context("enrollment request")?;
    let answer = match parse(&body) {
        Some((secret, identity)) => match registrar.redeem(&secret, &identity) {
            Ok(name) => Answer {
                version: 1,
                name: Some(name),
                refused: None,
            },
            Err(r) => Answer {
                version: 1,
                name: None,
                refused: Some(r),
            },
        },
        None => Answer {
            version: 1,
            name: None,
            refused: Some(Refusal::BadRequest),
        },
    };
    send.write_all(&serde_json::to_vec(&answer)?).await?;
    send.finish()?;
    // Let the answer reach the box before the connection closes.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    Ok(())
}

/// The secret and identity of a well-formed request.
fn parse(body: &[u8]) -> Option<(Vec<u8>, String)> {
    let r: Request = serde_json::from_slice(body).ok()?;
    let secret = hex::decode(&r.secret).ok().filter(|s| s.len() == 16)?;
    (r.version == 1 && stallnet_netconf::is_identity(&r.identity)).then_some((secret, r.identity))
}

/// The box's side: proves the code's secret to the hub at one of its addresses; the
/// device name the hub gave, or why it refused.
pub async fn enroll(code: &code::Code, identity: &str) -> Result<Result<String, Refusal>> {
    let cfg = crate::identity::enroll_client_config(&code.hub_identity)?;
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
        .context("UDP socket for enrolling")?;
    endpoint.set_default_client_config(cfg);
    let request = serde_json::to_vec(&Request {
        version: 1,
        secret: hex::encode(code.secret),
        identity: identity.to_string(),
    })?;
    let mut errors = Vec::new();
    for addr in &code.hub_addresses {
        let attempt = async {
            let conn = endpoint
                .connect(SocketAddr::V4(*addr), crate::identity::HUB_NAME)?
                .await
                .context("handshake (is this the hub the code names?)")?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&request).await?;
            send.finish()?;
            let body = recv.read_to_end(MAX_REQUEST).await?;
            conn.close(0u32.into(), b"thanks");
            let a: Answer = serde_json::from_slice(&body).context("the hub's answer")?;
            anyhow::Ok(match (a.name, a.refused) {
                (Some(name), _) => Ok(name),
                (None, Some(r)) => Err(r),
                (None, None) => Err(Refusal::BadRequest),
            })
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(outcome)) => {
                endpoint.wait_idle().await;
                return Ok(outcome);
            }
            Ok(Err(e)) => errors.push(format!("{addr}: {e:#}")),
            Err(_) => errors.push(format!("{addr}: no answer within 10 s")),
        }
    }
    bail!("could not reach the hub: {}", errors.join("; "))
}

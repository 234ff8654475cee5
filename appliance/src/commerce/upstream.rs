//! Where outbox records go, and what the answer means.
//!
//! - HTTP(S): each record is POSTed as JSON with its `Idempotency-Key`; the status decides
//!   (see [`super::sync::outcome_of_status`]).
//! - NATS JetStream: each record is published on the stall's subject with its key as
//!   `Nats-Msg-Id`, so the stream's own de-duplication drops a second copy; a record
//!   counts as delivered only once the stream acknowledged it (a duplicate's ack too).

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, context::PublishErrorKind};
use stallnet_netconf::Upstream;

use super::model::OutboxRecord;
use super::sync::{self, Outcome};

/// A connected upstream, cheap to clone (one per delivery task).
#[derive(Clone)]
pub enum Sink {
    Http {
        client: reqwest::Client,
        url: String,
        authorization: Option<String>,
    },
    Nats {
        js: jetstream::Context,
        subject: String,
    },
}

impl Sink {
    /// Prepares the upstream. A NATS connection is made in the background and kept up by
    /// the client (the box is often offline when it starts); publishing waits for it.
    pub async fn connect(up: &Upstream) -> Result<Self> {
        let timeout = Duration::from_millis(up.timeout_ms);
        if up.is_nats() {
            let subject = up
                .subject
                .clone()
                .context("a NATS upstream needs a subject")?;
            let mut opts = async_nats::ConnectOptions::new()
                .name("stallnet-outbox")
                .retry_on_initial_connect()
                .connection_timeout(timeout)
                .request_timeout(Some(timeout))
                // Reconnect quickly when the tunnel returns: at most 2 s between tries.
                .reconnect_delay_callback(|attempts| {
                    Duration::from_millis((100u64 << attempts.min(5)).min(2000))
                });
            if let Some(token) = &up.authorization {
                opts = opts.token(token.clone());
            }
            if let Some(ca) = &up.ca_file {
                opts = opts.add_root_certificates(ca.clone());
            }
            let client = opts
                .connect(up.url.as_str())
                .await
                .with_context(|| format!("NATS upstream {}", redact(&up.url)))?;
            let mut js = jetstream::new(client);
            js.set_timeout(timeout);
            Ok(Self::Nats { js, subject })
        } else {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut builder = reqwest::Client::builder().timeout(timeout);
            if let Some(ca) = &up.ca_file {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("reading the upstream CA {}", ca.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .with_context(|| format!("{} holds no PEM certificate", ca.display()))?;
                anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", ca.display());
                for c in certs {
                    builder = builder.add_root_certificate(c);
                }
            }
            let client = builder.build()?;
            Ok(Self::Http {
                client,
                url: up.url.clone(),
                authorization: up.authorization.clone(),
            })
        }
    }

    /// One delivery attempt of `rec`.
    pub async fn deliver(&self, rec: &OutboxRecord) -> Outcome {
        let body = match serde_json::to_vec(&rec.body) {
            Ok(b) => b,
            Err(e) => return Outcome::Dead(format!("record does not serialize: {e}")),
        };
        match self {
            Self::Http {
                client,
                url,
                authorization,
            } => {
                let mut req = client
                    .post(url)
                    .header("idempotency-key", &rec.key)
                    .header("content-type", "application/json")
                    .body(body);
                if let Some(a) = authorization {
                    req = req.header("authorization", a);
                }
                match req.send().await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let text = resp.text().await.unwrap_or_default();
                        sync::outcome_of_status(status, &text)
                    }
                    Err(e) => Outcome::Retry(format!("{e}")),
                }
            }
            Self::Nats { js, subject } => {
                let msg = jetstream::message::PublishMessage::build()
                    .payload(body.into())
                    .message_id(rec.key.as_str());
                let ack = match js.send_publish(subject.clone(), msg).await {
                    Ok(fut) => fut.await,
                    Err(e) => Err(e),
                };
                match ack {
                    Ok(_) => Outcome::Delivered,
                    Err(e) => outcome_of_publish_error(e.kind(), &e.to_string(), subject),
                }
            }
        }
    }
}

/// What a failed JetStream publish means for the record. Only a record the server can
/// never take (larger than its `max_payload`) is a dead letter; everything else (no
/// stream yet, the server restarting, a lost acknowledgement) is tried again, and the
/// `Nats-Msg-Id` keeps a retry of a publish that did land from counting twice.
pub fn outcome_of_publish_error(kind: PublishErrorKind, text: &str, subject: &str) -> Outcome {
    match kind {
        PublishErrorKind::MaxPayloadExceeded => Outcome::Dead(format!("NATS: {text}")),
        PublishErrorKind::StreamNotFound => Outcome::Retry(format!(
            "NATS: no JetStream stream captures subject {subject:?} (create one)"
        )),
        _ => Outcome::Retry(format!("NATS: {text}")),
    }
}

/// The host and port an upstream URL connects to (NATS defaults to 4222).
pub fn endpoint(url: &str) -> Option<(String, u16)> {
    let u = reqwest::Url::parse(url).ok()?;
    let host = u
        .host_str()?
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let port = u.port_or_known_default().unwrap_or(4222);
    Some((host, port))
}

/// Of the upstream's resolved addresses, those to send through the tunnel: IPv4 (the
/// tunnel's family), not loopback or unspecified, not on the LAN (those stay local).
pub fn tunnel_targets(
    resolved: impl IntoIterator<Item = std::net::IpAddr>,
    lan: &[ipnet::IpNet],
) -> Vec<std::net::Ipv4Addr> {
    let mut out: Vec<std::net::Ipv4Addr> = resolved
        .into_iter()
        .filter(|a| !lan.iter().any(|n| n.contains(a)))
        .filter_map(|a| match a {
            std::net::IpAddr::V4(v) if !v.is_loopback() && !v.is_unspecified() => Some(v),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_oversized_record_is_a_dead_letter() {
        assert!(matches!(
            outcome_of_publish_error(PublishErrorKind::MaxPayloadExceeded, "too big", "s"),
            Outcome::Dead(_)
        ));
        for k in [
            PublishErrorKind::StreamNotFound,
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::MaxAckPending,
            PublishErrorKind::Other,
        ] {
            assert!(
                matches!(outcome_of_publish_error(k, "x", "s"), Outcome::Retry(_)),
                "{k:?}"
            );
        }
        let Outcome::Retry(why) =
            outcome_of_publish_error(PublishErrorKind::StreamNotFound, "", "sales.stall-1")
        else {
            panic!("retry expected");
        };
        assert!(why.contains("sales.stall-1"), "{why}");
    }

    #[test]
    fn endpoints_and_what_goes_through_the_tunnel() {
        assert_eq!(
            endpoint("nats://u:p@sales.example:4333"),
            Some(("sales.example".into(), 4333))
        );
        assert_eq!(
            endpoint("tls://sales.example"),
            Some(("sales.example".into(), 4222))
        );
        assert_eq!(
            endpoint("https://api.example/s"),
            Some(("api.example".into(), 443))
        );
        assert_eq!(
            endpoint("http://[2001:db8::1]/s"),
            Some(("2001:db8::1".into(), 80))
        );
        assert_eq!(endpoint("not a url"), None);
        let lan: Vec<ipnet::IpNet> = vec!["10.1.0.0/24".parse().expect("net")];
        let got = tunnel_targets(
            [
                "198.18.0.1",
                "127.0.0.1",
                "10.1.0.5",
                "2001:db8::1",
                "198.18.0.1",
                "0.0.0.0",
            ]
            .iter()
            .map(|a| a.parse().expect("addr")),
            &lan,
        );
        assert_eq!(got, vec![std::net::Ipv4Addr::new(198, 18, 0, 1)]);
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact("nats://till:s3cret@hub.example:4222"),
            "nats://till:***@hub.example:4222"
        );
        assert_eq!(
            redact("https://api.example/sales"),
            "https://api.example/sales"
        );
    }
}

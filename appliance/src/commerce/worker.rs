//! The outbox's delivery worker: while the box is online, hands due records (see
//! [`super::sync`]) to the upstream ([`super::upstream`]: HTTP or NATS JetStream) with their
//! idempotency key, at most a few at once and never two of one key, and records each
//! outcome durably before moving on.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stallnet_netconf::Upstream;
use tokio_util::sync::CancellationToken;

use super::api::Service;
use super::store::CommerceStore;
use super::sync::{self, Outcome};
use super::upstream::{self, Sink};

/// Deliveries in flight at once.
const PARALLEL: usize = 32;
/// Outbox records looked at per round (the oldest).
const SCAN: usize = 1024;
const POLL: Duration = Duration::from_millis(200);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub async fn run<S: CommerceStore + 'static>(
    svc: Arc<Service<S>>,
    upstream: Upstream,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let sink = Sink::connect(&upstream).await?;
    tracing::info!(upstream = %upstream::redact(&upstream.url), "outbox worker running");
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut busy = false;
    loop {
        // Right away while there is work; otherwise when a delivery ends or every POLL.
        if !busy {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = cancel.cancelled() => break,
            }
        } else {
            tokio::select! {
                Some(_) = tasks.join_next(), if tasks.len() >= PARALLEL => {}
                _ = tokio::task::yield_now() => {}
                _ = cancel.cancelled() => break,
            }
        }
        busy = false;
        if !(svc.online)() {
            continue;
        }
        let flying = in_flight.lock().map(|f| f.clone()).unwrap_or_default();
        if flying.len() >= PARALLEL {
            continue;
        }
        let records = match svc.store.outbox(SCAN) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("outbox: {e}");
                continue;
            }
        };
        let due: Vec<_> = sync::due(&records, now_ms(), &flying, PARALLEL - flying.len())
            .into_iter()
            .cloned()
            .collect();
        busy = !due.is_empty();
        for rec in due {
            if let Ok(mut f) = in_flight.lock() {
                f.insert(rec.key.clone());
            }
            let (svc, sink, flying) = (svc.clone(), sink.clone(), in_flight.clone());
            tasks.spawn(async move {
                let outcome = sink.deliver(&rec).await;
                let now = now_ms();
                let res = match &outcome {
                    Outcome::Delivered => svc.store.delivered(rec.id, now / 1000),
                    Outcome::Retry(why) => {
                        let jitter = 0.5 + rand::random::<f64>();
                        let wait = sync::backoff(rec.attempts, jitter);
                        svc.store
                            .retry_later(rec.id, now + wait.as_millis() as i64, why)
                    }
                    Outcome::Dead(why) => {
                        tracing::warn!(key = %rec.key, "upstream refused a record for good: {why}");
                        svc.store.dead(rec.id, why, now / 1000)
                    }
                };
                if let Err(e) = res.and(svc.store.flush().await) {
                    tracing::error!("outbox: {e}");
                }
                if let Ok(mut f) = flying.lock() {
                    f.remove(&rec.key);
                }
            });
        }
    }
    tasks.shutdown().await;
    Ok(())
}

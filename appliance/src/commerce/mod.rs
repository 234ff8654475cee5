//! Offline commerce on the box: tokens, carts, checkout with signed receipts, and an
//! outbox delivered exactly once (idempotency keys) when the box is online.
//!
//! - [`model`]: the records; money in integer minor units.
//! - [`receipt`]: the signed, hash-linked receipt chain and its offline verification.
//! - [`seal`]: token values encrypted at rest.
//! - [`sync`]: the delivery policy (sans-IO): order per group, backoff, what answers mean.
//! - [`store`]: the durable store (sled) behind our own trait.
//! - [`api`]: the LAN HTTP API (axum).
//! - [`upstream`]: where records go (HTTP(S) or NATS JetStream).
//! - [`worker`]: the delivery worker.

pub mod api;
pub mod model;
pub mod receipt;
pub mod seal;
pub mod store;
pub mod sync;
pub mod upstream;
pub mod worker;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use ring::signature::KeyPair;
use stallnet_netconf::CommerceConfig;
use tokio_util::sync::CancellationToken;

use api::Service;
use store::SledStore;

/// Builds the service from the config: the store in `state_dir/commerce`, the sealing
/// key, the receipt key (the device's own Ed25519 identity key).
pub fn service(
    cfg: &CommerceConfig,
    state_dir: &Path,
    signing: ring::signature::Ed25519KeyPair,
    online: Arc<dyn Fn() -> bool + Send + Sync>,
) -> Result<Service<SledStore>> {
    let public_key = hex::encode(signing.public_key().as_ref());
    let store = SledStore::open(&state_dir.join("commerce"), signing)
        .map_err(|e| anyhow::anyhow!("opening the commerce store: {e}"))?;
    let sealer = seal::Sealer::load_or_create(state_dir)?;
    Ok(Service {
        store,
        sealer,
        access: std::sync::RwLock::new(api::Access::from_config(cfg)),
        max_body: cfg.limits.max_body_bytes,
        public_key,
        online,
    })
}

/// Serves the API and runs the delivery worker and the token sweep until cancelled.
/// The API's address may not exist yet at boot (the LAN comes up later): binding is
/// retried every 2 s, with a warning, until it works.
pub async fn run(
    svc: Arc<Service<SledStore>>,
    cfg: CommerceConfig,
    cancel: CancellationToken,
) -> Result<()> {
    let listener = loop {
        match tokio::net::TcpListener::bind(cfg.listen).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::warn!(listen = %cfg.listen, "commerce API cannot listen yet ({e}); retrying");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
            }
        }
    };
    tracing::info!(listen = %cfg.listen, "commerce API running");
    if let Some(up) = cfg.upstream.as_ref().map(|u| u.get_ref().clone()) {
        let (s, c) = (svc.clone(), cancel.clone());
        tokio::spawn(async move {
            if let Err(e) = worker::run(s, up, c).await {
                tracing::error!("outbox worker: {e:#}");
            }
        });
    }
    let (s, c) = (svc.clone(), cancel.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        let mut alerted = 0usize;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = c.cancelled() => return,
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            if let Err(e) = store::CommerceStore::sweep_tokens(&s.store, now) {
                tracing::warn!("token sweep: {e}");
            }
            if let Ok(st) = api::status(&s) {
                let passed = st["alerts_hours_passed"].as_array().map_or(0, Vec::len);
                if passed > alerted {
                    tracing::warn!(
                        age_s = %st["oldest_undelivered_age_s"],
                        "the oldest undelivered sale is older than {} h: get the box online",
                        st["alerts_hours_passed"]
                    );
                }
                alerted = passed;
            }
        }
    });
    axum::serve(
        listener,
        api::router(svc).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { cancel.cancelled().await })
    .await?;
    Ok(())
}

//! Offline commerce on the box: tokens, carts, checkout with signed receipts, and an
//! outbox delivered exactly once (idempotency keys) when the box is online.
//!
//! - [`model`]: the records; money in integer minor units.
//! - [`receipt`]: the signed, hash-linked receipt chain and its offline verification.
//! - [`seal`]: token values encrypted at rest.
//! - [`sync`]: the delivery policy (sans-IO): order per group, backoff, what answers mean.
//! - [`store`]: the durable store (sled) behind our own trait.
//! - [`api`]: the LAN HTTP API (axum).
//! - [`listen`]: its connections: guests refused first, per-device and total caps, timeouts.
//! - [`upstream`]: where records go (HTTP(S) or NATS JetStream).
//! - [`worker`]: the delivery worker.

pub mod api;
pub mod listen;
pub mod model;
pub mod receipt;
pub mod seal;
pub mod store;
pub mod sync;
pub mod upstream;
pub mod worker;

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

/// The commerce status document ([`api::status`]) as last computed by the service.
pub type StatusCell = Arc<std::sync::Mutex<Option<serde_json::Value>>>;

/// Starts the service on a thread of its own, with its own runtime: the store's calls
/// are blocking disk I/O, and on a failing or full disk they may stall; the tunnel, the
/// control socket and the dashboard never wait for them. The status document is
/// refreshed every second into the returned cell for the edge to read.
pub fn spawn(
    svc: Arc<Service<SledStore>>,
    cfg: CommerceConfig,
    cancel: CancellationToken,
) -> std::io::Result<(std::thread::JoinHandle<()>, StatusCell)> {
    let cell = StatusCell::default();
    let out = cell.clone();
    let thread = std::thread::Builder::new()
        .name("commerce".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("commerce service: no runtime: {e}");
                    return;
                }
            };
            if let Err(e) = rt.block_on(run(svc, cfg, cell, cancel)) {
                tracing::error!("commerce service: {e:#}");
            }
        })?;
    Ok((thread, out))
}

/// Serves the API and runs the delivery worker, the token sweep and the status refresh
/// until cancelled. The API's address may not exist yet at boot (the LAN comes up
/// later): binding is retried every 2 s, with a warning, until it works.
pub async fn run(
    svc: Arc<Service<SledStore>>,
    cfg: CommerceConfig,
    status: StatusCell,
    cancel: CancellationToken,
) -> Result<()> {
    let (s, c) = (svc.clone(), cancel.clone());
    tokio::spawn(async move { housekeeping(s, status, c).await });
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
    serve(listener, svc, cancel).await;
    Ok(())
}

/// Serves the API on `listener` under [`listen`]'s caps until `cancel`.
pub async fn serve<S: store::CommerceStore + 'static>(
    listener: tokio::net::TcpListener,
    svc: Arc<Service<S>>,
    cancel: CancellationToken,
) {
    let s = svc.clone();
    let denied =
        Arc::new(move |ip: std::net::IpAddr| s.access().deny_from.iter().any(|n| n.contains(&ip)));
    listen::serve(
        listener,
        api::router(svc),
        listen::Caps::for_this_process(),
        denied,
        cancel,
    )
    .await;
}

/// Every second: the status document (which also lets a store that failed on a full disk
/// reopen as soon as there is room) and a warning when the disk fills or frees; every
/// minute: expired tokens swept, and a warning when the oldest undelivered sale passes
/// an alert age.
async fn housekeeping(svc: Arc<Service<SledStore>>, cell: StatusCell, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let (mut alerted, mut ticks, mut storage_ok) = (0usize, 0u64, true);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        let st = api::status(&svc);
        let ok = st["storage"]["ok"].as_bool().unwrap_or(false);
        if ok != storage_ok {
            if ok {
                tracing::info!("commerce storage has room again: sales are saved");
            } else {
                tracing::error!(
                    free_bytes = %st["storage"]["free_bytes"],
                    "commerce storage is full: sales are refused until space is freed"
                );
            }
            storage_ok = ok;
        }
        if ticks % 60 == 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            if let Err(e) = store::CommerceStore::sweep_tokens(&svc.store, now) {
                tracing::warn!("token sweep: {e}");
            }
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
        ticks += 1;
        match cell.lock() {
            Ok(mut c) => *c = Some(st),
            Err(p) => *p.into_inner() = Some(st),
        }
    }
}

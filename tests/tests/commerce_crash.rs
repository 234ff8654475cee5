//! Crash test: a process hammering checkouts on the real sled store is killed with SIGKILL
//! at random moments, 100 times. After every restart each acknowledged checkout is there,
//! the receipt chain verifies, and the outbox then delivers each sale exactly once to a
//! real HTTP upstream on loopback.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use ring::signature::{Ed25519KeyPair, KeyPair};
use stallnet::commerce::api::Service;
use stallnet::commerce::receipt;
use stallnet::commerce::store::{CommerceStore, Limits, SledStore};
use stallnet::commerce::{seal, worker};
use stallnet_tests::topo::bin;

const KILLS: usize = 100;

#[test]
fn acknowledged_checkouts_survive_sigkill_and_are_delivered_once() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("sn-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut acked: Vec<String> = Vec::new();
    for round in 0..KILLS {
        let mut child = Command::new(bin("stallnet-commerce-crash"))
            .arg(&dir)
            // Pace the hammer a little so 100 rounds stay a few thousand sales.
            .arg("1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning the checkout hammer")?;
        std::thread::sleep(Duration::from_millis(rng.random_range(20..160)));
        child.kill()?; // SIGKILL
        child.wait()?;
        let mut out = String::new();
        if let Some(mut s) = child.stdout.take() {
            s.read_to_string(&mut out)?;
        }
        let mut err = String::new();
        if let Some(mut s) = child.stderr.take() {
            s.read_to_string(&mut err)?;
        }
        assert!(err.trim().is_empty(), "seed {seed} round {round}: {err}");
        // A torn last line was not an acknowledgement.
        let lines: Vec<&str> = out.lines().filter(|l| l.len() > 3).collect();
        let complete = if out.ends_with('\n') {
            lines.len()
        } else {
            lines.len().saturating_sub(1)
        };
        acked.extend(lines[..complete].iter().map(|s| s.to_string()));
    }
    assert!(
        acked.len() >= KILLS,
        "seed {seed}: only {} checkouts acknowledged",
        acked.len()
    );

    let key = Ed25519KeyPair::from_pkcs8(&std::fs::read(dir.join("device.pk8"))?)
        .map_err(|_| anyhow::anyhow!("key"))?;
    let public = key.public_key().as_ref().to_vec();
    let store = SledStore::open(&dir.join("commerce"), key).map_err(|e| anyhow::anyhow!("{e}"))?;
    let receipts = store
        .receipts(1, usize::MAX, usize::MAX)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .items;
    assert_eq!(
        receipt::verify(&public, &receipts),
        vec![],
        "seed {seed}: receipt chain"
    );
    let outbox = store
        .outbox(usize::MAX)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(
        outbox.len(),
        receipts.len(),
        "seed {seed}: one outbox record per receipt"
    );
    // The till's key is the last part of the upstream key (DEVICE:CLIENT:KIND:KEY).
    let keys: HashSet<&str> = outbox
        .iter()
        .map(|r| r.key.rsplit(':').next().unwrap_or(""))
        .collect();
    assert_eq!(
        keys.len(),
        outbox.len(),
        "seed {seed}: duplicate outbox keys"
    );
    let missing: Vec<&String> = acked
        .iter()
        .filter(|k| !keys.contains(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "seed {seed}: acknowledged but lost: {missing:?}"
    );

    // Deliver everything to a real upstream on loopback: each key exactly once.
    let rt = tokio::runtime::Runtime::new()?;
    let total = outbox.len();
    let got = rt.block_on(async move {
        let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let s = seen.clone();
        let app = axum::Router::new().route(
            "/sales",
            axum::routing::post(move |h: axum::http::HeaderMap| {
                let s = s.clone();
                async move {
                    let k = h
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    if let Ok(mut m) = s.lock() {
                        *m.entry(k).or_insert(0) += 1;
                    }
                    axum::http::StatusCode::CREATED
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = l.local_addr()?;
        tokio::spawn(async move { axum::serve(l, app).await });
        let online = Arc::new(AtomicBool::new(true));
        let o = online.clone();
        let svc = Arc::new(Service {
            store,
            sealer: seal::Sealer::load_or_create(&dir)?,
            access: std::sync::RwLock::new(stallnet::commerce::api::Access {
                clients: HashMap::new(),
                deny_from: vec![],
                limits: Limits {
                    max_entries: 1,
                    max_bytes: 1,
                },
                alert_hours: vec![],
            }),
            max_body: 1024,
            public_key: hex::encode(&public),
            online: Arc::new(move || o.load(Ordering::SeqCst)),
        });
        let cancel = tokio_util::sync::CancellationToken::new();
        let up = stallnet_netconf::Upstream {
            timeout_ms: 2000,
            ..stallnet_netconf::Upstream::new(format!("http://{addr}/sales"))
        };
        let w = tokio::spawn(worker::run(svc.clone(), up, cancel.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while svc.store.outbox_len() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cancel.cancel();
        let _ = w.await;
        let _ = std::fs::remove_dir_all(&dir);
        let m = seen.lock().map(|m| m.clone()).unwrap_or_default();
        anyhow::Ok(m)
    })?;
    assert_eq!(
        got.len(),
        total,
        "seed {seed}: delivered {} of {total}",
        got.len()
    );
    assert!(
        got.values().all(|n| *n == 1),
        "seed {seed}: a sale delivered twice"
    );
    eprintln!(
        "seed {seed}: {KILLS} kills, {} acknowledged, {total} delivered once each",
        acked.len()
    );
    Ok(())
}

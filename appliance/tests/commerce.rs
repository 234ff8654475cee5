//! The commerce API against a real server on loopback with a real sled store on disk, and
//! the outbox against a real upstream HTTP server on loopback that fails on purpose.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{json, Value};
use stallnet::commerce::api::{self, Service};
use stallnet::commerce::model::Receipt;
use stallnet::commerce::store::{CommerceStore, Limits, SledStore};
use stallnet::commerce::{receipt, seal, worker};
use stallnet_netconf::Upstream;
use tokio_util::sync::CancellationToken;

/// The test of memory under hostile reads measures this process's peak: it runs alone,
/// every other test alongside each other.
static PROCESS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

const KEY: &str = "till-1-secret-key-0123456789";
/// A second till on the same box.
const KEY2: &str = "till-2-secret-key-9876543210";

/// A state directory removed when the test ends (kept if it panicked, for a look).
struct TmpDir(std::path::PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn tmpdir(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("sn-commerce-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp");
    TmpDir(d)
}

fn device_key(dir: &std::path::Path) -> Ed25519KeyPair {
    // The same key across restarts of one test, like the device key in the state dir.
    let p = dir.join("device.pk8");
    let bytes = std::fs::read(&p).unwrap_or_else(|_| {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).expect("keygen");
        std::fs::write(&p, doc.as_ref()).expect("write key");
        doc.as_ref().to_vec()
    });
    Ed25519KeyPair::from_pkcs8(&bytes).expect("key")
}

struct TestBox {
    base: String,
    online: Arc<AtomicBool>,
    cancel: CancellationToken,
    svc: Arc<Service<SledStore>>,
}

impl Drop for TestBox {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start(
    dir: &std::path::Path,
    limits: Limits,
    deny: Vec<ipnet::IpNet>,
    upstream: Option<Upstream>,
) -> TestBox {
    start_on("127.0.0.1:0", dir, limits, deny, upstream).await
}

/// [`start`] with the API listening on `bind`.
async fn start_on(
    bind: &str,
    dir: &std::path::Path,
    limits: Limits,
    deny: Vec<ipnet::IpNet>,
    upstream: Option<Upstream>,
) -> TestBox {
    let key = device_key(dir);
    let public_key = hex::encode(key.public_key().as_ref());
    let online = Arc::new(AtomicBool::new(false));
    let o = online.clone();
    let svc = Arc::new(Service {
        store: SledStore::open(&dir.join("commerce"), key).expect("store"),
        sealer: seal::Sealer::load_or_create(dir).expect("sealer"),
        access: std::sync::RwLock::new(stallnet::commerce::api::Access {
            clients: HashMap::from([
                (
                    hex::encode(ring::digest::digest(&ring::digest::SHA256, KEY.as_bytes())),
                    "till-1".to_string(),
                ),
                (
                    hex::encode(ring::digest::digest(&ring::digest::SHA256, KEY2.as_bytes())),
                    "till-2".to_string(),
                ),
            ]),
            deny_from: deny,
            limits,
            alert_hours: vec![12, 20],
        }),
        max_body: 16 * 1024,
        public_key,
        online: Arc::new(move || o.load(Ordering::SeqCst)),
    });
    let listener = tokio::net::TcpListener::bind(bind).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    tokio::spawn(stallnet::commerce::serve(
        listener,
        svc.clone(),
        cancel.clone(),
    ));
    if let Some(up) = upstream {
        let (s, c) = (svc.clone(), cancel.clone());
        tokio::spawn(worker::run(s, up, c));
    }
    TestBox {
        base: format!("http://{addr}"),
        online,
        cancel,
        svc,
    }
}

/// The key a record of this test's till carries upstream (`kind`: checkout or event).
fn up_key(dir: &std::path::Path, kind: &str, key: &str) -> String {
    let device = stallnet::commerce::store::device_tag(device_key(dir).public_key().as_ref());
    stallnet::commerce::store::upstream_key(&device, "till-1", kind, key)
}

/// The till's own key inside an upstream key.
fn till_key(upstream: &str) -> &str {
    upstream.rsplit(':').next().unwrap_or("")
}

fn limits() -> Limits {
    Limits {
        max_entries: 1000,
        max_bytes: 1 << 20,
    }
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn cart(n: i64) -> Value {
    json!({ "currency": "EUR", "items": [
        { "sku": "coffee", "name": "Coffee", "quantity": 2, "unit_price": 250 },
        { "sku": "cake", "quantity": n, "unit_price": 199 } ] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_limits_and_bad_input_get_clear_4xx() {
    let _process = PROCESS.read().await;
    let dir = tmpdir("auth");
    let b = start(
        &dir,
        Limits {
            max_entries: 2,
            max_bytes: 1 << 20,
        },
        vec![],
        None,
    )
    .await;
    let c = http();
    let url = format!("{}/v1/carts/a", b.base);
    assert_eq!(
        c.get(&url).send().await.expect("req").status(),
        StatusCode::UNAUTHORIZED
    );
    let r = c.get(&url).bearer_auth("wrong").send().await.expect("req");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "unauthorized"
    );
    // Malformed JSON, wrong types, unknown fields, a huge body, a bad id.
    for (body, want) in [
        ("{not json", StatusCode::BAD_REQUEST),
        (r#"{"currency": 5, "items": []}"#, StatusCode::BAD_REQUEST),
        (
            r#"{"currency": "EUR", "items": [], "x": 1}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            r#"{"currency": "EUR", "items": [{"sku": "a", "quantity": -1, "unit_price": 1}]}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let r = c
            .put(&url)
            .bearer_auth(KEY)
            .body(body)
            .send()
            .await
            .expect("req");
        assert_eq!(r.status(), want, "{body}");
        let j: Value = r.json().await.expect("json error");
        assert!(j["code"].is_string() && j["message"].is_string(), "{j}");
    }
    let huge = "x".repeat(64 * 1024);
    let r = c
        .put(&url)
        .bearer_auth(KEY)
        .body(huge)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = c
        .get(format!("{}/v1/carts/bad%20id", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Limits: two entries fit, the third is refused whole with 507.
    for id in ["a", "b"] {
        let r = c
            .put(format!("{}/v1/carts/{id}", b.base))
            .bearer_auth(KEY)
            .json(&cart(1))
            .send()
            .await
            .expect("req");
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = c
        .put(format!("{}/v1/carts/c", b.base))
        .bearer_auth(KEY)
        .json(&cart(1))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
    let r = c
        .get(format!("{}/v1/carts/c", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "nothing half-written");
    // The OpenAPI document is served.
    let doc: Value = c
        .get(format!("{}/v1/openapi.json", b.base))
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    drop(b);
    // The guest network is refused whatever key it shows.
    let b = start(
        &tmpdir("guest"),
        limits(),
        vec!["127.0.0.0/8".parse().expect("net")],
        None,
    )
    .await;
    let r = c
        .get(format!("{}/v1/status", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_sealed_expire_and_redeem_exactly_once() {
    let _process = PROCESS.read().await;
    let dir = tmpdir("tokens");
    let b = start(&dir, limits(), vec![], None).await;
    let c = http();
    let far = 4_000_000_000i64;
    let r = c.put(format!("{}/v1/tokens/t1", b.base)).bearer_auth(KEY)
        .json(&json!({ "value": "PLAINTEXT-VOUCHER-42", "kind": "voucher", "scope": "stall", "expires_at": far }))
        .send().await.expect("req");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let t: Value = c
        .get(format!("{}/v1/tokens/t1", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert_eq!(t["value"], "PLAINTEXT-VOUCHER-42");
    // Two concurrent redeems: exactly one succeeds, the other gets 409.
    let (a, z) = tokio::join!(
        c.post(format!("{}/v1/tokens/t1/redeem", b.base))
            .bearer_auth(KEY)
            .send(),
        c.post(format!("{}/v1/tokens/t1/redeem", b.base))
            .bearer_auth(KEY)
            .send(),
    );
    let mut codes = vec![a.expect("a").status(), z.expect("z").status()];
    codes.sort();
    assert_eq!(codes, [StatusCode::OK, StatusCode::CONFLICT]);
    // Expired: 404 on get, and the sweep removes it.
    c.put(format!("{}/v1/tokens/old", b.base))
        .bearer_auth(KEY)
        .json(&json!({ "value": "v", "kind": "session", "expires_at": 1000 }))
        .send()
        .await
        .expect("req");
    let r = c
        .get(format!("{}/v1/tokens/old", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let swept =
        stallnet::commerce::store::CommerceStore::sweep_tokens(&b.svc.store, 2000).expect("sweep");
    assert_eq!(swept, 1);
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The value never reaches the disk in clear.
    let mut found = false;
    for e in walk(&dir.join("commerce")) {
        let bytes = std::fs::read(&e).unwrap_or_default();
        found |= bytes.windows(20).any(|w| w == b"PLAINTEXT-VOUCHER-42");
    }
    assert!(!found, "token value stored in clear");
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carts_version_and_checkouts_chain_signed_receipts_that_survive_a_restart() {
    let _process = PROCESS.read().await;
    let dir = tmpdir("carts");
    let b = start(&dir, limits(), vec![], None).await;
    let c = http();
    let url = format!("{}/v1/carts/c1", b.base);
    let r = c
        .put(&url)
        .bearer_auth(KEY)
        .json(&cart(3))
        .send()
        .await
        .expect("req");
    assert_eq!(r.headers()["etag"], "\"1\"");
    let j: Value = r.json().await.expect("json");
    assert_eq!(j["total"], 2 * 250 + 3 * 199);
    let r = c
        .put(&url)
        .bearer_auth(KEY)
        .header("if-match", "\"1\"")
        .json(&cart(4))
        .send()
        .await
        .expect("req");
    assert_eq!(r.headers()["etag"], "\"2\"");
    // A stale write: 409 with the current version.
    let r = c
        .put(&url)
        .bearer_auth(KEY)
        .header("if-match", "\"1\"")
        .json(&cart(9))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(
        r.json::<Value>().await.expect("json")["current"]["version"],
        2
    );
    // Checkout, and the same checkout again (a retry after a lost answer): one receipt.
    let co = format!("{url}/checkout");
    let r1: Receipt = c
        .post(&co)
        .bearer_auth(KEY)
        .header("idempotency-key", "sale-1")
        .json(&json!({ "payment": "card-offline-auth-77" }))
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("receipt");
    let r2: Receipt = c
        .post(&co)
        .bearer_auth(KEY)
        .header("idempotency-key", "sale-1")
        .json(&json!({ "payment": "card-offline-auth-77" }))
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("receipt");
    assert_eq!(r1, r2);
    assert_eq!(r1.order.total, 2 * 250 + 4 * 199);
    assert_eq!(
        c.get(&url)
            .bearer_auth(KEY)
            .send()
            .await
            .expect("req")
            .status(),
        StatusCode::NOT_FOUND
    );
    for i in 2..=5 {
        let u = format!("{}/v1/carts/c{i}", b.base);
        c.put(&u)
            .bearer_auth(KEY)
            .json(&cart(i))
            .send()
            .await
            .expect("req");
        let r = c
            .post(format!("{u}/checkout"))
            .bearer_auth(KEY)
            .json(&json!({ "payment": "cash" }))
            .send()
            .await
            .expect("req");
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let pk: Value = c
        .get(format!("{}/v1/receipts/public-key", b.base))
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // After a restart everything acknowledged is there and the chain verifies.
    let b = start(&dir, limits(), vec![], None).await;
    let list: Vec<Receipt> = c
        .get(format!("{}/v1/receipts", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert_eq!(list.len(), 5);
    let key = hex::decode(pk["public_key"].as_str().expect("pk")).expect("hex");
    assert_eq!(receipt::verify(&key, &list), vec![]);
    let out: Vec<Value> = c
        .get(format!("{}/v1/outbox", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert_eq!(out.len(), 5, "one outbox record per sale");
    assert_eq!(out[0]["key"], up_key(&dir, "checkout", "sale-1"));
}

/// An upstream that fails on purpose: per key, the first `fail` answers are 500 (or a
/// dropped connection), one 409, then 200; bodies saying "refuse" get 422.
#[derive(Default)]
struct FlakyUpstream {
    seen: Mutex<Vec<(String, String)>>,
    delivered: Mutex<HashMap<String, usize>>,
    attempts: Mutex<HashMap<String, usize>>,
    /// Keys being answered right now; `overlap` if one arrives twice at once.
    in_flight: Mutex<std::collections::HashSet<String>>,
    overlap: AtomicBool,
    /// Keys whose answer came after the box's timeout.
    late: Mutex<Vec<String>>,
}

struct InFlight(Arc<FlakyUpstream>, String);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut f) = self.0.in_flight.lock() {
            f.remove(&self.1);
        }
    }
}

async fn upstream() -> (String, Arc<FlakyUpstream>) {
    use axum::http::HeaderMap;
    let st = Arc::new(FlakyUpstream::default());
    let s = st.clone();
    let app = axum::Router::new().route(
        "/sales",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let s = s.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let body = String::from_utf8_lossy(&body).to_string();
                if !s.in_flight.lock().expect("lock").insert(key.clone()) {
                    s.overlap.store(true, Ordering::SeqCst);
                }
                // The server drops this future when the box hangs up: leave in any case.
                let _leave = InFlight(s.clone(), key.clone());
                let n = {
                    let mut a = s.attempts.lock().expect("lock");
                    let n = a.entry(key.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
                if body.contains("drop") && n == 1 {
                    // The connection dies without an answer (the task serving it ends).
                    panic!("upstream drops the connection on purpose");
                }
                if body.contains("stall") && n == 1 {
                    // Answers after the box gave up (its timeout is 2 s): the backend
                    // keeps the sale, the box must try again with the same key.
                    // (Its work is not cancelled when the box hangs up.)
                    let (s2, k2) = (s.clone(), key.clone());
                    let _ = tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(2300)).await;
                        s2.late.lock().expect("lock").push(k2);
                    })
                    .await;
                    return (axum::http::StatusCode::CREATED, "late".into());
                }
                if body.contains("stall") || body.contains("drop") {
                    let mut d = s.delivered.lock().expect("lock");
                    let first = !d.contains_key(&key);
                    *d.entry(key.clone()).or_insert(0) += 1;
                    if first {
                        s.seen.lock().expect("lock").push((key, body));
                    }
                    return (axum::http::StatusCode::CREATED, "ok".into());
                }
                if body.contains("refuse") {
                    return (
                        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                        "unknown sku".to_string(),
                    );
                }
                match n {
                    1 => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "oops".into()),
                    2 => (axum::http::StatusCode::CONFLICT, "in progress".into()),
                    _ => {
                        let mut d = s.delivered.lock().expect("lock");
                        let first = !d.contains_key(&key);
                        *d.entry(key.clone()).or_insert(0) += 1;
                        if first {
                            s.seen.lock().expect("lock").push((key, body));
                        }
                        (axum::http::StatusCode::CREATED, "ok".into())
                    }
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (format!("http://{a}/sales"), st)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_waits_offline_then_delivers_each_record_once_in_order_per_cart() {
    let _process = PROCESS.read().await;
    let dir = tmpdir("outbox");
    let (url, up) = upstream().await;
    let up_cfg = Upstream {
        timeout_ms: 2000,
        ..Upstream::new(url)
    };
    let b = start(&dir, limits(), vec![], Some(up_cfg)).await;
    let c = http();
    // Offline sales: two carts, and app events in two groups.
    for i in 0..3 {
        c.post(format!("{}/v1/outbox", b.base))
            .bearer_auth(KEY)
            .header("idempotency-key", format!("ev-a-{i}"))
            .json(&json!({ "group": "loyalty", "body": { "n": i } }))
            .send()
            .await
            .expect("req");
    }
    for i in 1..=3 {
        let u = format!("{}/v1/carts/k{i}", b.base);
        c.put(&u)
            .bearer_auth(KEY)
            .json(&cart(i))
            .send()
            .await
            .expect("req");
        c.post(format!("{u}/checkout"))
            .bearer_auth(KEY)
            .header("idempotency-key", format!("sale-{i}"))
            .json(&json!({ "payment": "cash" }))
            .send()
            .await
            .expect("req");
    }
    for (k, what) in [("stall-1", "stall"), ("drop-1", "drop")] {
        c.post(format!("{}/v1/outbox", b.base))
            .bearer_auth(KEY)
            .header("idempotency-key", k)
            .json(&json!({ "group": k, "body": { what: true } }))
            .send()
            .await
            .expect("req");
    }
    c.post(format!("{}/v1/outbox", b.base))
        .bearer_auth(KEY)
        .header("idempotency-key", "bad-1")
        .json(&json!({ "group": "misc", "body": { "refuse": true } }))
        .send()
        .await
        .expect("req");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        up.attempts.lock().expect("lock").is_empty(),
        "nothing leaves while offline"
    );
    let st: Value = c
        .get(format!("{}/v1/status", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert_eq!(st["online"], false);
    assert_eq!(st["undelivered"], 9);
    assert!(st["oldest_undelivered_age_s"].as_i64().is_some());
    // Online: every record arrives exactly once despite 500s and 409s (backoff 1 s, 2 s).
    b.online.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = up.delivered.lock().expect("lock").len();
        if n == 8 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered = up.delivered.lock().expect("lock").clone();
    assert_eq!(delivered.len(), 8, "{delivered:?}");
    assert!(
        delivered.values().all(|n| *n == 1),
        "a key delivered twice: {delivered:?}"
    );
    assert!(
        !up.overlap.load(Ordering::SeqCst),
        "two deliveries of one key were in flight at once"
    );
    // The stalled and the dropped record were tried again with the same key.
    let attempts = up.attempts.lock().expect("lock").clone();
    let (stall, drop) = (
        up_key(&dir, "event", "stall-1"),
        up_key(&dir, "event", "drop-1"),
    );
    assert_eq!(attempts.get(&stall), Some(&2), "{attempts:?}");
    assert_eq!(attempts.get(&drop), Some(&2), "{attempts:?}");
    assert_eq!(*up.late.lock().expect("lock"), [stall]);
    // Order within the loyalty group.
    let seen = up.seen.lock().expect("lock").clone();
    let loyalty: Vec<&str> = seen
        .iter()
        .map(|s| till_key(&s.0))
        .filter(|k| k.starts_with("ev-a-"))
        .collect();
    assert_eq!(loyalty, ["ev-a-0", "ev-a-1", "ev-a-2"]);
    // The refused record is a dead letter with its reason; retry puts it back, drop removes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dead: Vec<Value> = c
        .get(format!("{}/v1/outbox/dead", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("unknown sku"));
    let id = dead[0]["record"]["id"].as_u64().expect("id");
    let r = c
        .delete(format!("{}/v1/outbox/dead/{id}", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let st: Value = c
        .get(format!("{}/v1/status", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert_eq!(st["undelivered"], 0, "{st}");
    assert!(st["last_sync"]["till-1"]["at"].as_i64().is_some(), "{st}");
}

/// A real `nats-server -js` on a loopback port with its store on disk; killed on drop.
struct NatsServer {
    port: u16,
    store: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl NatsServer {
    fn start(store: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut s = Self {
            port,
            store: store.to_path_buf(),
            child: None,
        };
        s.restart();
        s
    }

    /// Starts the server (again, on the same port and store) and waits until it listens.
    fn restart(&mut self) {
        self.stop();
        let child = std::process::Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server (Debian package nats-server; tests/run.sh installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A clean shutdown (SIGTERM), as a server restart or an upgrade does.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_gets_every_record_once_in_order_across_a_server_restart() {
    let _process = PROCESS.read().await;
    use async_nats::jetstream;
    const GROUPS: usize = 3;
    const PER_GROUP: usize = 400;
    let dir = tmpdir("nats");
    let mut nats = NatsServer::start(&dir.join("jetstream"));
    let url = format!("nats://127.0.0.1:{}", nats.port);
    // The organiser's stream: every stall's sales under `sales.>`.
    let js = jetstream::new(async_nats::connect(url.as_str()).await.expect("connect"));
    js.get_or_create_stream(jetstream::stream::Config {
        name: "SALES".into(),
        subjects: vec!["sales.>".into()],
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .expect("stream");
    // A publish of the first record that landed before the box heard the ack (the box
    // then lost power): the box will publish it again, and the stream must keep one.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", up_key(&dir, "event", "ev-0-0000").as_str());
    js.publish_with_headers("sales.market.stall-1", h, "landed-before".into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    let big = Limits {
        max_entries: 100_000,
        max_bytes: 64 << 20,
    };
    let up = Upstream {
        subject: Some("sales.market.stall-1".into()),
        timeout_ms: 2000,
        ..Upstream::new(url.clone())
    };
    let b = start(&dir, big, vec![], Some(up)).await;
    let c = http();
    // Offline: app events in three groups, interleaved, and two checkouts.
    for i in 0..PER_GROUP {
        for g in 0..GROUPS {
            let r = c
                .post(format!("{}/v1/outbox", b.base))
                .bearer_auth(KEY)
                .header("idempotency-key", format!("ev-{g}-{i:04}"))
                .json(&json!({ "group": format!("g{g}"), "body": { "g": g, "i": i } }))
                .send()
                .await
                .expect("req");
            assert!(r.status().is_success(), "{}", r.status());
        }
    }
    for i in 1..=2 {
        let u = format!("{}/v1/carts/n{i}", b.base);
        c.put(&u)
            .bearer_auth(KEY)
            .json(&cart(i))
            .send()
            .await
            .expect("req");
        let r = c
            .post(format!("{u}/checkout"))
            .bearer_auth(KEY)
            .header("idempotency-key", format!("sale-{i}"))
            .json(&json!({ "payment": "cash" }))
            .send()
            .await
            .expect("req");
        assert!(r.status().is_success(), "{}", r.status());
    }
    let total = GROUPS * PER_GROUP + 2;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut stream = js.get_stream("SALES").await.expect("stream");
    assert_eq!(
        stream.info().await.expect("info").state.messages,
        1,
        "nothing is published while offline"
    );

    // Online; restart the server in the middle of the drain.
    b.online.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stream.info().await.expect("info").state.messages < 60 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the drain did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nats.stop();
    let left = b.svc.store.outbox_len();
    assert!(left > 0, "the restart must fall in the middle of the drain");
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while b.svc.store.outbox_len() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} records still undelivered",
            b.svc.store.outbox_len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // What the stream holds: each key once, each group in order.
    let js = jetstream::new(async_nats::connect(url.as_str()).await.expect("reconnect"));
    let mut stream = js.get_stream("SALES").await.expect("stream");
    let state = stream.info().await.expect("info").state.clone();
    let mut ids: Vec<String> = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream.get_raw_message(seq).await.expect("message");
        let id = m
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_string())
            .expect("every message carries its key");
        ids.push(id);
    }
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a key stored twice");
    assert_eq!(ids.len(), total, "left at the restart: {left}");
    for g in 0..GROUPS {
        let order: Vec<&str> = ids
            .iter()
            .map(|k| till_key(k))
            .filter(|k| k.starts_with(&format!("ev-{g}-")))
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "group g{g} out of order");
        assert_eq!(order.len(), PER_GROUP);
    }
    assert!(
        ids.contains(&up_key(&dir, "checkout", "sale-1"))
            && ids.contains(&up_key(&dir, "checkout", "sale-2"))
    );
}

/// A real TLS server on loopback (tokio-rustls) with a certificate from a private CA,
/// answering each HTTP request with 201 and recording its Idempotency-Key.
async fn tls_upstream(
    dir: &std::path::Path,
) -> (String, std::path::PathBuf, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Stall backend test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(std::net::IpAddr::from([
            127, 0, 0, 1,
        ])));
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let ca_path = dir.join("backend-ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).expect("write ca");

    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, s) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                // A client that does not trust the CA fails here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                if let Some(k) = head
                    .lines()
                    .find_map(|l| l.strip_prefix("idempotency-key:"))
                {
                    s.lock().expect("lock").push(k.trim().to_string());
                }
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (format!("https://{addr}/sales"), ca_path, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_on_a_private_ca_is_trusted_only_with_its_ca_file() {
    let _process = PROCESS.read().await;
    let ca_dir = tmpdir("https-ca");
    let (url, ca, seen) = tls_upstream(&ca_dir).await;
    let c = http();
    let post = |base: String, key: &'static str| {
        let c = c.clone();
        async move {
            let r = c
                .post(format!("{base}/v1/outbox"))
                .bearer_auth(KEY)
                .header("idempotency-key", key)
                .json(&json!({ "group": "g", "body": { "k": key } }))
                .send()
                .await
                .expect("req");
            assert!(r.status().is_success(), "{}", r.status());
        }
    };
    // Without the CA: the handshake fails, the record waits (retried, not dead).
    let d1 = tmpdir("https-untrusted");
    let b = start(
        &d1,
        limits(),
        vec![],
        Some(Upstream {
            timeout_ms: 2000,
            ..Upstream::new(url.clone())
        }),
    )
    .await;
    post(b.base.clone(), "untrusted-1").await;
    b.online.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        seen.lock().expect("lock").is_empty(),
        "no request without trust"
    );
    assert_eq!(b.svc.store.outbox_len(), 1, "the record still waits");
    assert_eq!(b.svc.store.dead_len(), 0);
    drop(b);

    // With the CA file: delivered over TLS.
    let d2 = tmpdir("https-trusted");
    let b = start(
        &d2,
        limits(),
        vec![],
        Some(Upstream {
            timeout_ms: 2000,
            ca_file: Some(ca.clone()),
            ..Upstream::new(url)
        }),
    )
    .await;
    post(b.base.clone(), "trusted-1").await;
    post(b.base.clone(), "trusted-2").await;
    b.online.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.svc.store.outbox_len() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered over TLS"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keys: Vec<String> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|k| till_key(k).to_string())
        .collect();
    assert_eq!(keys, ["trusted-1", "trusted-2"]);
}

/// Two tills and an app event that pick the same `Idempotency-Key` are three sales: the
/// upstream gets three records under three keys (device, client, kind and the till's
/// key), each delivered once, never two of one key in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tills_with_one_key_are_three_records_upstream_each_once() {
    let _process = PROCESS.read().await;
    let dir = tmpdir("shared-key");
    let (url, up) = upstream().await;
    let up_cfg = Upstream {
        timeout_ms: 2000,
        ..Upstream::new(url)
    };
    let b = start(&dir, limits(), vec![], Some(up_cfg)).await;
    let c = http();
    for (till, n) in [(KEY, 1), (KEY2, 2)] {
        let r = c
            .post(format!("{}/v1/outbox", b.base))
            .bearer_auth(till)
            .header("idempotency-key", "k1")
            .json(&json!({ "group": "sales", "body": { "till": n } }))
            .send()
            .await
            .expect("req");
        assert!(r.status().is_success(), "{}", r.status());
    }
    let u = format!("{}/v1/carts/ra", b.base);
    c.put(&u)
        .bearer_auth(KEY)
        .json(&cart(1))
        .send()
        .await
        .expect("req");
    let r = c
        .post(format!("{u}/checkout"))
        .bearer_auth(KEY)
        .header("idempotency-key", "k1")
        .json(&json!({ "payment": "cash" }))
        .send()
        .await
        .expect("req");
    assert!(r.status().is_success(), "{}", r.status());
    b.online.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while up.delivered.lock().expect("lock").len() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered = up.delivered.lock().expect("lock").clone();
    let mut keys: Vec<&String> = delivered.keys().collect();
    keys.sort();
    let want = {
        let mut w = vec![
            up_key(&dir, "checkout", "k1"),
            up_key(&dir, "event", "k1"),
            stallnet::commerce::store::upstream_key(
                &stallnet::commerce::store::device_tag(device_key(&dir).public_key().as_ref()),
                "till-2",
                "event",
                "k1",
            ),
        ];
        w.sort();
        w
    };
    assert_eq!(keys, want.iter().collect::<Vec<_>>(), "{delivered:?}");
    assert!(delivered.values().all(|n| *n == 1), "{delivered:?}");
    assert!(
        !up.overlap.load(Ordering::SeqCst),
        "two of one key in flight"
    );
    // The fake upstream answers 500, 409, then 201 per key: three attempts each.
    let attempts = up.attempts.lock().expect("lock").clone();
    assert_eq!(attempts.values().sum::<usize>(), 9, "{attempts:?}");
}

/// A key already used for one cart, sent with another cart, is refused (409): the second
/// cart stays unsold instead of being answered with the first cart's receipt. The same
/// key on the same cart is still the same receipt; an event likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_on_another_cart_is_refused_not_answered_with_another_sale() {
    let _process = PROCESS.read().await;
    let dir = tmpdir("reused-key");
    let b = start(&dir, limits(), vec![], None).await;
    let c = http();
    for id in ["ra", "rb"] {
        let r = c
            .put(format!("{}/v1/carts/{id}", b.base))
            .bearer_auth(KEY)
            .json(&cart(1))
            .send()
            .await
            .expect("req");
        assert!(r.status().is_success());
    }
    let checkout = |id: &'static str| {
        c.post(format!("{}/v1/carts/{id}/checkout", b.base))
            .bearer_auth(KEY)
            .header("idempotency-key", "k1")
            .json(&json!({ "payment": "cash" }))
            .send()
    };
    let first: Receipt = checkout("ra")
        .await
        .expect("req")
        .json()
        .await
        .expect("receipt");
    assert_eq!(first.order.cart_id, "ra");
    let r = checkout("rb").await.expect("req");
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["code"], "idempotency_key_reused", "{e}");
    assert!(
        e["message"].as_str().unwrap_or("").contains("\"ra\""),
        "{e}"
    );
    // Cart rb is still there, unsold; the retry of ra is still ra's receipt.
    let rb = c
        .get(format!("{}/v1/carts/rb", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req");
    assert_eq!(rb.status(), StatusCode::OK);
    let again: Receipt = checkout("ra")
        .await
        .expect("req")
        .json()
        .await
        .expect("receipt");
    assert_eq!(again, first);
    // Events: the same key and body is the same record; another body is refused.
    let event = |n: i64| {
        c.post(format!("{}/v1/outbox", b.base))
            .bearer_auth(KEY)
            .header("idempotency-key", "ev-1")
            .json(&json!({ "group": "loyalty", "body": { "points": n } }))
            .send()
    };
    assert!(event(5).await.expect("req").status().is_success());
    assert!(event(5).await.expect("req").status().is_success());
    let r = event(7).await.expect("req");
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "idempotency_key_reused"
    );
    assert_eq!(
        b.svc.store.outbox_len(),
        2,
        "one checkout and one event queued"
    );
}

/// An API listening on `[::]` (it validates) sees an IPv4 guest as `::ffff:a.b.c.d`: the
/// guest's prefix in `deny_from` still refuses it, key or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv4_guest_is_refused_on_a_dual_stack_listener() {
    let _process = PROCESS.read().await;
    let dir = tmpdir("dual-stack");
    let deny = vec!["127.0.0.0/8".parse().expect("net")];
    let b = start_on("[::]:0", &dir, limits(), deny, None).await;
    let port = b.base.rsplit(':').next().unwrap_or("0").to_string();
    let r = http()
        .get(format!("http://127.0.0.1:{port}/v1/status"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "forbidden_network"
    );
}

/// Money-shaped small holes: a redeemed voucher stays redeemed when PUT again, an empty
/// cart does not check out, and a till sees, retries and drops only its own outbox
/// records and dead letters (they hold full receipts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vouchers_stay_spent_empty_carts_do_not_sell_and_tills_see_only_their_records() {
    let _process = PROCESS.read().await;
    let dir = tmpdir("small-holes");
    let (url, _up) = upstream().await;
    let up_cfg = Upstream {
        timeout_ms: 2000,
        ..Upstream::new(url)
    };
    let b = start(&dir, limits(), vec![], Some(up_cfg)).await;
    let c = http();
    // A voucher, spent, then PUT again: still spent.
    let t = format!("{}/v1/tokens/v1", b.base);
    let voucher = json!({ "value": "VOUCHER-5-EUR", "kind": "voucher", "scope": "stall", "expires_at": 4_000_000_000i64 });
    let r = c
        .put(&t)
        .bearer_auth(KEY)
        .json(&voucher)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = c
        .post(format!("{t}/redeem"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .put(&t)
        .bearer_auth(KEY)
        .json(&voucher)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "already_redeemed"
    );
    let r = c
        .post(format!("{t}/redeem"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req");
    assert_eq!(
        r.status(),
        StatusCode::CONFLICT,
        "a spent voucher was spent twice"
    );
    // An empty cart: 422, and it stays.
    let u = format!("{}/v1/carts/empty", b.base);
    let r = c
        .put(&u)
        .bearer_auth(KEY)
        .json(&json!({ "currency": "EUR", "items": [] }))
        .send()
        .await
        .expect("req");
    assert!(r.status().is_success(), "{}", r.status());
    let r = c
        .post(format!("{u}/checkout"))
        .bearer_auth(KEY)
        .json(&json!({ "payment": "cash" }))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.json::<Value>().await.expect("json")["code"], "empty_cart");
    assert_eq!(b.svc.store.outbox_len(), 0);
    // Till 1's event is refused upstream for good (422): a dead letter of till 1's.
    let r = c
        .post(format!("{}/v1/outbox", b.base))
        .bearer_auth(KEY)
        .header("idempotency-key", "refuse-1")
        .json(&json!({ "group": "g", "body": { "refuse": true } }))
        .send()
        .await
        .expect("req");
    assert!(r.status().is_success());
    let list = |key: &'static str, path: &'static str| {
        let c = c.clone();
        let base = b.base.clone();
        async move {
            c.get(format!("{base}{path}"))
                .bearer_auth(key)
                .send()
                .await
                .expect("req")
                .json::<Vec<Value>>()
                .await
                .expect("json")
        }
    };
    assert_eq!(list(KEY, "/v1/outbox").await.len(), 1);
    assert!(
        list(KEY2, "/v1/outbox").await.is_empty(),
        "till 2 saw till 1's record"
    );
    b.online.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while list(KEY, "/v1/outbox/dead").await.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead = list(KEY, "/v1/outbox/dead").await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(list(KEY2, "/v1/outbox/dead").await.is_empty());
    let id = dead[0]["record"]["id"].as_u64().expect("id");
    let retry = c
        .post(format!("{}/v1/outbox/dead/{id}/retry", b.base))
        .bearer_auth(KEY2)
        .send()
        .await
        .expect("req");
    assert_eq!(
        retry.status(),
        StatusCode::NOT_FOUND,
        "till 2 may retry till 1's"
    );
    let drop = c
        .delete(format!("{}/v1/outbox/dead/{id}", b.base))
        .bearer_auth(KEY2)
        .send()
        .await
        .expect("req");
    assert_eq!(
        drop.status(),
        StatusCode::NOT_FOUND,
        "till 2 may drop till 1's"
    );
    assert_eq!(list(KEY, "/v1/outbox/dead").await.len(), 1, "still there");
}

/// Every page of a list, following `x-next-from`.
async fn all_pages<T: serde::de::DeserializeOwned>(
    c: &reqwest::Client,
    url: &str,
    key: &str,
) -> Vec<T> {
    let mut out = Vec::new();
    let mut from = 1u64;
    for _ in 0..10_000 {
        let r = c
            .get(format!("{url}?from={from}"))
            .bearer_auth(key)
            .send()
            .await
            .expect("page");
        assert_eq!(r.status(), StatusCode::OK);
        let next = r
            .headers()
            .get("x-next-from")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        out.extend(r.json::<Vec<T>>().await.expect("json"));
        match next {
            Some(n) => from = n,
            None => return out,
        }
    }
    panic!("no end to the pages of {url}");
}

/// A tmpfs mounted for one test, unmounted when it ends (also on a panic).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Needs root: fails loudly under `CI=true`, says so and returns `None` otherwise.
    fn mount(name: &str, size: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").is_err(),
                "mounting a tmpfs needs root (CI runs the suite as root)"
            );
            eprintln!("skipped outside CI: mounting a tmpfs needs root");
            return None;
        }
        let d = std::env::temp_dir().join(format!("sn-tmpfs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mountpoint");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&d)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount tmpfs on {}", d.display());
        Some(Self(d))
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("remount");
        assert!(ok.success(), "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A big cart (about 3 KB stored), to fill a small disk quickly.
fn big_cart(i: usize) -> Value {
    let items: Vec<Value> = (0..30)
        .map(|n| json!({ "sku": format!("sku-{i}-{n}"), "name": "Hand-thrown stoneware mug, glazed", "quantity": 1, "unit_price": 1200 }))
        .collect();
    json!({ "currency": "EUR", "items": items })
}

/// One sale (cart, then checkout with key `k{i}`); the checkout's answer.
async fn sell(c: &reqwest::Client, base: &str, i: usize) -> (StatusCode, Value) {
    let url = format!("{base}/v1/carts/full-{i}");
    let r = c
        .put(&url)
        .bearer_auth(KEY)
        .json(&big_cart(i))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("the API answers while the disk is full");
    if !r.status().is_success() {
        let s = r.status();
        return (s, r.json().await.unwrap_or_default());
    }
    let r = c
        .post(format!("{url}/checkout"))
        .bearer_auth(KEY)
        .header("idempotency-key", format!("k{i}"))
        .json(&json!({ "payment": "card-77" }))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("the API answers while the disk is full");
    let s = r.status();
    (s, r.json().await.unwrap_or_default())
}

/// The state directory on a real, small tmpfs filled by sales: the API refuses new
/// sales with 507 storage_full (never a hang, never a 500), the status says the storage
/// is full, and once the filesystem has room again sales are taken with no restart;
/// every acknowledged sale is still there, its receipt chain intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_sales_with_507_and_recovers_by_itself() {
    let _process = PROCESS.read().await;
    let Some(fs) = Tmpfs::mount("full", "12m") else {
        return;
    };
    let big = Limits {
        max_entries: 1_000_000,
        max_bytes: 1 << 40,
    };
    let b = start(&fs.0, big, vec![], None).await;
    let c = http();
    let mut sold = Vec::new();
    let mut refusal = None;
    let t0 = std::time::Instant::now();
    for i in 0..20_000 {
        let (s, body) = sell(&c, &b.base, i).await;
        if s == StatusCode::CREATED {
            sold.push(body["seq"].as_u64().expect("seq"));
            continue;
        }
        refusal = Some((i, s, body));
        break;
    }
    let (i, s, body) = refusal.expect("the disk filled up");
    eprintln!(
        "{} sales acknowledged in {:?}, then {s} {body}",
        sold.len(),
        t0.elapsed()
    );
    assert_eq!(s, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert_eq!(body["code"], "storage_full", "{body}");
    assert!(
        sold.len() > 100,
        "a 12 MB disk holds more than {} sales",
        sold.len()
    );
    // While full: refused again at once, and the status says so in plain words.
    for j in 0..5 {
        let t = std::time::Instant::now();
        let (s, body) = sell(&c, &b.base, i + 1 + j).await;
        assert!(
            s == StatusCode::INSUFFICIENT_STORAGE || s == StatusCode::SERVICE_UNAVAILABLE,
            "{s} {body}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "refused in {:?}",
            t.elapsed()
        );
    }
    let st: Value = c
        .get(format!("{}/v1/status", b.base))
        .bearer_auth(KEY)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(st["storage"]["ok"], false, "{st}");
    // Room again: sales are taken within seconds, without a restart.
    fs.resize("64m");
    let t = std::time::Instant::now();
    let mut n = i + 10;
    loop {
        let (s, body) = sell(&c, &b.base, n).await;
        if s == StatusCode::CREATED {
            sold.push(body["seq"].as_u64().expect("seq"));
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still refused {:?} after space returned: {s} {body}",
            t.elapsed()
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("sales taken again {:?} after space returned", t.elapsed());
    // Nothing acknowledged was lost, and the chain verifies.
    let all: Vec<Receipt> = all_pages(&c, &format!("{}/v1/receipts", b.base), KEY).await;
    let have: std::collections::HashSet<u64> = all.iter().map(|r| r.seq).collect();
    let lost: Vec<_> = sold.iter().filter(|s| !have.contains(s)).collect();
    assert!(lost.is_empty(), "acknowledged sales missing: {lost:?}");
    let key = hex::decode(&b.svc.public_key).expect("hex");
    assert!(receipt::verify(&key, &all).is_empty(), "the chain verifies");
    let st = api::status(&b.svc);
    assert_eq!(st["storage"]["ok"], true, "{st}");
    drop(b);
}

/// The disk fills under the store itself (no reserve left, as when another process
/// fills the card): sled's write fails, and its error is sticky. The store stops
/// answering from memory, says the storage is not ok, and reopens itself from disk
/// once the filesystem has room: nothing acknowledged (flushed) is lost, the receipt
/// chain goes on unbroken, and no restart is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_hit_a_full_disk_reopens_itself_when_space_returns() {
    let _process = PROCESS.read().await;
    let Some(fs) = Tmpfs::mount("enospc", "8m") else {
        return;
    };
    let key = device_key(&fs.0);
    let public = key.public_key().as_ref().to_vec();
    let store = SledStore::open(&fs.0.join("commerce"), key)
        .expect("store")
        .with_reserve(0);
    let big = Limits {
        max_entries: 1_000_000,
        max_bytes: 1 << 40,
    };
    let cart = |i: usize| stallnet::commerce::model::Cart {
        id: format!("c{i}"),
        version: 0,
        currency: "EUR".into(),
        items: serde_json::from_value(big_cart(i)["items"].clone()).expect("items"),
        total: 36_000,
        updated_at: 0,
    };
    let mut acked = Vec::new();
    let mut failure = None;
    for i in 0..50_000 {
        let r = async {
            store.put_cart("till-1", cart(i), None, big)?;
            let r = store.checkout(
                "till-1",
                &format!("c{i}"),
                None,
                "card",
                &format!("k{i}"),
                1,
            )?;
            store.flush().await?;
            Ok::<_, stallnet::commerce::store::StoreError>(r.seq)
        }
        .await;
        match r {
            Ok(seq) => acked.push(seq),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let e = failure.expect("the disk filled up");
    eprintln!("{} sales flushed, then: {e:?}", acked.len());
    assert!(
        matches!(e, stallnet::commerce::store::StoreError::Full(_)),
        "{e:?}"
    );
    assert!(!store.storage().ok);
    // Nothing is answered from memory (it may hold what never reached the disk).
    assert_eq!(
        store.receipts(1, 10, usize::MAX).err(),
        Some(stallnet::commerce::store::StoreError::Unavailable)
    );
    fs.resize("64m");
    let seq = store
        .checkout("till-1", "none", None, "card", "after", 2)
        .err();
    assert_eq!(
        seq,
        Some(stallnet::commerce::store::StoreError::NotFound),
        "reopened"
    );
    assert!(store.storage().ok);
    store
        .put_cart("till-1", cart(999_999), None, big)
        .expect("cart");
    let r = store
        .checkout("till-1", "c999999", None, "card", "k-after", 3)
        .expect("a sale after space returned");
    store.flush().await.expect("flush");
    let all = store
        .receipts(1, usize::MAX, usize::MAX)
        .expect("receipts")
        .items;
    let have: std::collections::HashSet<u64> = all.iter().map(|r| r.seq).collect();
    let lost: Vec<_> = acked.iter().filter(|s| !have.contains(s)).collect();
    assert!(lost.is_empty(), "acknowledged sales missing: {lost:?}");
    assert_eq!(all.last().map(|l| l.seq), Some(r.seq));
    assert!(
        receipt::verify(&public, &all).is_empty(),
        "the chain verifies"
    );
}

/// Sends `req` on a fresh connection and reads the whole answer (the server closes it or
/// it ends in a complete JSON body); `None` if nothing came within `wait`.
async fn raw(addr: &str, req: &[u8], wait: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(req).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(wait, async {
        while let Ok(n) = s.read(&mut buf).await {
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out);
            if n == 0 || (text.contains("\r\n\r\n") && text.trim_end().ends_with('}')) {
                break;
            }
        }
    })
    .await;
    (!out.is_empty()).then(|| String::from_utf8_lossy(&out).to_string())
}

/// The JSON body of a raw answer.
fn raw_json(answer: &str) -> Value {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"))
}

/// One LAN device cannot take the API from the others: it holds at most 32 connections
/// (the next ones get a JSON 503 at once), a till elsewhere on the LAN is still served,
/// idle connections are closed after 10 s, a body announced over the limit is refused
/// before it is read, and a body that never arrives ends in a 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_cannot_exhaust_or_hold_the_api() {
    let _process = PROCESS.read().await;
    use stallnet::commerce::listen::{HEADER_TIMEOUT, PER_SOURCE, REQUEST_TIMEOUT};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tmpdir("conns");
    let b = start(&dir, limits(), vec![], None).await;
    let addr = b.base.trim_start_matches("http://").to_string();
    let port = addr.rsplit(':').next().unwrap_or("0").to_string();
    // A phone on 127.0.0.1 opens idle connections.
    let get = format!("GET /v1/status HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\r\n");
    let mut idle = Vec::new();
    for i in 0..PER_SOURCE {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        if i == 0 {
            // One that made a request first and then stays open (keep-alive).
            s.write_all(get.as_bytes()).await.expect("write");
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).await.expect("read");
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        }
        idle.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let over = raw(&addr, get.as_bytes(), Duration::from_secs(3))
        .await
        .expect("an answer");
    assert!(over.starts_with("HTTP/1.1 503"), "{over}");
    assert_eq!(raw_json(&over)["code"], "too_many_connections");
    // A till on another address is served meanwhile.
    let _ = http(); // installs the TLS provider reqwest's builder wants
    let till = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .expect("client");
    let r = till
        .get(format!("http://127.0.0.1:{port}/v1/status"))
        .bearer_auth(KEY)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .expect("the till is served");
    assert_eq!(r.status(), StatusCode::OK);
    // A declared body over the limit: 413 before a byte of it is sent.
    let huge = format!(
        "PUT /v1/carts/a HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\ncontent-length: 99999999999\r\n\r\n"
    );
    let till_addr = format!("127.0.0.1:{port}");
    drop(idle.pop()); // room for one more from this device (not the keep-alive one)
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a = raw(&till_addr, huge.as_bytes(), Duration::from_secs(3))
        .await
        .expect("an answer");
    assert!(a.starts_with("HTTP/1.1 413"), "{a}");
    assert_eq!(raw_json(&a)["code"], "body_too_large");
    // A body that stops arriving, and the idle connections: both end by themselves.
    let slow = tokio::spawn({
        let addr = addr.clone();
        async move {
            let t = std::time::Instant::now();
            let req = format!(
                "PUT /v1/carts/slow HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\
                 content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"curr"
            );
            let a = raw(
                &addr,
                req.as_bytes(),
                REQUEST_TIMEOUT + Duration::from_secs(5),
            )
            .await;
            (a, t.elapsed())
        }
    });
    let t = std::time::Instant::now();
    let mut closed = 0;
    for mut s in idle {
        let mut buf = [0u8; 64];
        let left = (HEADER_TIMEOUT + Duration::from_secs(3)).saturating_sub(t.elapsed());
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(left, s.read(&mut buf)).await {
            closed += 1;
        }
        let _ = s.shutdown().await;
    }
    assert_eq!(closed, PER_SOURCE - 1, "idle connections closed by the API");
    let (a, took) = slow.await.expect("slow");
    let a = a.expect("an answer to the stalled body");
    assert!(a.starts_with("HTTP/1.1 408"), "{a}");
    assert_eq!(raw_json(&a)["code"], "request_timeout");
    assert!(took < REQUEST_TIMEOUT + Duration::from_secs(3), "{took:?}");
}

/// Errors the HTTP framework answers itself come in the documented JSON shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framework_errors_are_json_with_a_code() {
    let _process = PROCESS.read().await;
    let dir = tmpdir("framework");
    let b = start(&dir, limits(), vec![], None).await;
    let c = http();
    let check = |r: reqwest::Response, status: StatusCode, code: &'static str| async move {
        assert_eq!(r.status(), status);
        let ct = r.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .to_string();
        assert!(ct.starts_with("application/json"), "{ct}");
        let j: Value = r.json().await.expect("json");
        assert_eq!(j["code"], code, "{j}");
        assert!(!j["message"].as_str().unwrap_or("").is_empty(), "{j}");
    };
    let send =
        |rb: reqwest::RequestBuilder| async move { rb.bearer_auth(KEY).send().await.expect("req") };
    check(
        send(c.post(format!("{}/v1/outbox/dead/abc/retry", b.base))).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    check(
        send(c.get(format!("{}/v1/receipts?from=minus-one", b.base))).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    check(
        send(c.patch(format!("{}/v1/carts/a", b.base))).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    check(
        send(c.get(format!("{}/v1/carts/{}", b.base, "a".repeat(3000)))).await,
        StatusCode::URI_TOO_LONG,
        "uri_too_long",
    )
    .await;
    // A body over the limit with no declared length (chunked).
    let mut req = format!(
        "PUT /v1/carts/a HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..40 {
        req.extend_from_slice(b"400\r\n");
        req.extend_from_slice(&[b' '; 1024]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let a = raw(
        b.base.trim_start_matches("http://"),
        &req,
        Duration::from_secs(3),
    )
    .await
    .expect("an answer");
    assert!(a.starts_with("HTTP/1.1 413"), "{a}");
    assert_eq!(raw_json(&a)["code"], "body_too_large");
}

/// Posts an event of about `size` bytes with key `key`; the HTTP status and the code.
async fn post_event(
    c: &reqwest::Client,
    base: &str,
    bearer: &str,
    key: &str,
    size: usize,
) -> (StatusCode, Value) {
    let r = c
        .post(format!("{base}/v1/outbox"))
        .bearer_auth(bearer)
        .header("idempotency-key", key)
        .json(&json!({ "group": format!("g-{key}"), "body": { "pad": "x".repeat(size) } }))
        .send()
        .await
        .expect("req");
    let s = r.status();
    (s, r.json().await.unwrap_or_default())
}

/// Peak resident memory of this process since the last reset, in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Events count against their client's limits until delivered (another till is not
/// affected), and a delivered event gives its room back; the outbox lists come in
/// bounded pages, each record once; and sixteen hostile parallel reads of a 24 MB outbox
/// do not grow the daemon's memory by more than a few pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_writes_count_against_limits_and_lists_are_bounded_pages() {
    let _process = PROCESS.write().await;
    let dir = tmpdir("outbox-limits");
    let (url, up) = upstream().await;
    let b = start(&dir, limits(), vec![], Some(Upstream::new(url))).await;
    let c = http();
    // 1 MB per client: 15 KB events fill it after about 68.
    let mut accepted = 0;
    let refused = loop {
        let (s, body) = post_event(&c, &b.base, KEY, &format!("e{accepted}"), 15_000).await;
        if s != StatusCode::ACCEPTED {
            break (s, body);
        }
        accepted += 1;
        assert!(
            accepted < 200,
            "events never counted against the 1 MB limit"
        );
    };
    assert_eq!(refused.0, StatusCode::INSUFFICIENT_STORAGE, "{refused:?}");
    assert_eq!(refused.1["code"], "over_limit");
    assert!(
        (60..=70).contains(&accepted),
        "{accepted} events of 15 KB under 1 MB"
    );
    // Another till still has its own room.
    let (s, _) = post_event(&c, &b.base, KEY2, "other", 15_000).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    // Pages: 100 by default, then the rest; each record once, in order.
    let first = c
        .get(format!("{}/v1/outbox?limit=10", b.base))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("req");
    assert!(first.headers().contains_key("x-next-from"));
    assert_eq!(first.json::<Vec<Value>>().await.expect("json").len(), 10);
    let all: Vec<Value> = all_pages(&c, &format!("{}/v1/outbox", b.base), KEY).await;
    assert_eq!(all.len(), accepted);
    let ids: Vec<u64> = all.iter().filter_map(|r| r["id"].as_u64()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    // Delivered: the room comes back.
    b.online.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while b.svc.store.outbox_len() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.svc.store.outbox_len(), 0, "delivered");
    let (s, body) = post_event(&c, &b.base, KEY, "after-delivery", 15_000).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    drop(up);
    drop(b);

    // Hostile reads: a 24 MB outbox, 16 parallel full reads.
    let dir = tmpdir("outbox-reads");
    let big = Limits {
        max_entries: 1_000_000,
        max_bytes: 1 << 40,
    };
    let b = start(&dir, big, vec![], None).await;
    for i in 0..1600 {
        let (s, _) = post_event(&c, &b.base, KEY, &format!("r{i}"), 15_000).await;
        assert_eq!(s, StatusCode::ACCEPTED);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // resets the peak
    let before = peak_rss_kib();
    let reads: Vec<_> = (0..16)
        .map(|_| {
            let (c, base) = (c.clone(), b.base.clone());
            tokio::spawn(async move {
                let r = c
                    .get(format!("{base}/v1/outbox?limit=1000"))
                    .bearer_auth(KEY)
                    .send()
                    .await
                    .expect("req");
                let s = r.status();
                (s, r.bytes().await.map_or(0, |b| b.len()))
            })
        })
        .collect();
    let mut ok = 0;
    for r in reads {
        let (s, len) = r.await.expect("read");
        if s == StatusCode::OK {
            ok += 1;
            assert!(len <= 2 * 1024 * 1024, "a page of {len} bytes");
        } else {
            assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        }
    }
    let grew_mib = peak_rss_kib().saturating_sub(before) / 1024;
    eprintln!("16 parallel reads of a 24 MB outbox: {ok} answered, peak memory +{grew_mib} MiB");
    assert!(ok >= 4, "{ok}");
    assert!(grew_mib < 48, "memory grew by {grew_mib} MiB");
}

//! The LAN API (axum): tokens, carts and checkout, receipts, the outbox and a status, for
//! the shop's apps. Every request names its client by a bearer key (only the keys'
//! SHA-256 are configured); sources in `deny_from` (the guest network) are refused
//! whatever they show. Errors are JSON `{code, message}` with a stable `code`. A write is
//! acknowledged only after the store has flushed it to disk.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use ipnet::IpNet;
use serde::Deserialize;

use super::model::{self, Cart, CartIn, StoredToken, TokenIn};
use super::seal::Sealer;
use super::store::{CommerceStore, Limits, StoreError};

/// Everything a request handler needs.
pub struct Service<S: CommerceStore> {
    pub store: S,
    pub sealer: Sealer,
    /// Who may use the API and how much: replaced in place by a config reload.
    pub access: std::sync::RwLock<Access>,
    pub max_body: usize,
    pub public_key: String,
    pub online: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// The settings of `[commerce]` a reload applies without a restart.
#[derive(Debug, Clone)]
pub struct Access {
    /// Hex SHA-256 of a key → client name.
    pub clients: HashMap<String, String>,
    pub deny_from: Vec<IpNet>,
    pub limits: Limits,
    pub alert_hours: Vec<u32>,
}

impl Access {
    pub fn from_config(cfg: &stallnet_netconf::CommerceConfig) -> Self {
        Self {
            clients: cfg
                .clients
                .iter()
                .map(|c| {
                    let c = c.get_ref();
                    (c.key_sha256.to_ascii_lowercase(), c.name.clone())
                })
                .collect(),
            deny_from: cfg.deny_from.clone(),
            limits: Limits {
                max_entries: cfg.limits.max_entries_per_client,
                max_bytes: cfg.limits.max_bytes_per_client,
            },
            alert_hours: cfg.alert_hours.clone(),
        }
    }
}

impl<S: CommerceStore> Service<S> {
    /// The current access settings (a copy: a reload may replace them meanwhile).
    pub fn access(&self) -> Access {
        match self.access.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the access settings (clients, guest networks, limits, alert hours).
    pub fn set_access(&self, access: Access) {
        match self.access.write() {
            Ok(mut a) => *a = access,
            Err(poisoned) => *poisoned.into_inner() = access,
        }
    }
}

/// A JSON error with a stable code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<serde_json::Value>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some(x) = self.extra {
            body["current"] = x;
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such entry")
            }
            StoreError::Conflict(current) => {
                let mut err = ApiError::new(
                    StatusCode::CONFLICT,
                    "version_conflict",
                    "the stored version differs from If-Match; the current one is included",
                );
                err.extra = current.map(|c| serde_json::to_value(*c).unwrap_or_default());
                err
            }
            StoreError::EmptyCart => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "empty_cart",
                "the cart has no items: nothing to sell",
            ),
            StoreError::KeyReused(m) => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_key_reused", m)
            }
            StoreError::Redeemed => ApiError::new(
                StatusCode::CONFLICT,
                "already_redeemed",
                "the token was already redeemed",
            ),
            StoreError::Expired => {
                ApiError::new(StatusCode::NOT_FOUND, "expired", "the token has expired")
            }
            StoreError::OverLimit(m) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "over_limit", m)
            }
            StoreError::Full(m) => {
                tracing::warn!("commerce store: the disk is full; a write was refused");
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "storage_full", m)
            }
            StoreError::Unavailable => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                "the box's storage filled up; the store reopens by itself once there is \
                 free space: retry in a few seconds",
            ),
            StoreError::Io(m) => {
                tracing::error!("commerce store: {m}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storage",
                    "the store failed; this request was not saved (a retry with the same \
                     Idempotency-Key is safe)",
                )
            }
        }
    }
}

type ApiResult = Result<Response, ApiError>;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn hash_key(key: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()))
}

fn auth<S: CommerceStore>(
    svc: &Service<S>,
    headers: &HeaderMap,
    from: SocketAddr,
) -> Result<String, ApiError> {
    let access = svc.access();
    // An IPv4 guest reaching an API on `[::]` arrives as `::ffff:a.b.c.d`: compare the
    // IPv4 address it is.
    let ip = from.ip().to_canonical();
    if access.deny_from.iter().any(|n| n.contains(&ip)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_network",
            "this network may not use the commerce API",
        ));
    }
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer key",
            )
        })?;
    access
        .clients
        .get(&hash_key(key.trim()))
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown key"))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("malformed request body: {e}"),
        )
    })
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if model::valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_id",
            "ids are 1 to 128 letters, digits, '-', '_', '.', ':'",
        ))
    }
}

fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get("if-match") else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .map(|s| s.trim().trim_matches('"'))
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_if_match",
                "If-Match must be a version number",
            )
        })
}

fn with_etag(cart: &Cart, status: StatusCode) -> Response {
    let mut r = (status, Json(cart)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", cart.version)) {
        r.headers_mut().insert("etag", v);
    }
    r
}

async fn durable<S: CommerceStore>(svc: &Service<S>) -> Result<(), ApiError> {
    svc.store.flush().await.map_err(ApiError::from)
}

type Svc<S> = State<Arc<Service<S>>>;
type Peer = ConnectInfo<SocketAddr>;

async fn put_token<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    check_id(&id)?;
    let t: TokenIn = parse(&body)?;
    if t.value.is_empty() || t.value.len() > 4096 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_token",
            "value must be 1 to 4096 bytes",
        ));
    }
    let aad = format!("{client}/{id}");
    let sealed = svc
        .sealer
        .seal(aad.as_bytes(), t.value.as_bytes())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "seal", e.to_string()))?;
    let stored = StoredToken {
        sealed,
        kind: t.kind,
        scope: t.scope,
        expires_at: t.expires_at,
        redeemed_at: None,
    };
    svc.store
        .put_token(&client, &id, &stored, svc.access().limits)?;
    durable(&svc).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn token_view<S: CommerceStore>(
    svc: &Service<S>,
    client: &str,
    id: &str,
    t: &StoredToken,
) -> Result<serde_json::Value, ApiError> {
    let value = svc
        .sealer
        .open(format!("{client}/{id}").as_bytes(), &t.sealed)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "unseal",
                "the token cannot be opened with this box's key",
            )
        })?;
    Ok(serde_json::json!({
        "id": id, "value": String::from_utf8_lossy(&value), "kind": t.kind, "scope": t.scope,
        "expires_at": t.expires_at, "redeemed_at": t.redeemed_at,
    }))
}

async fn get_token<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    check_id(&id)?;
    let t = svc.store.get_token(&client, &id)?;
    if t.expires_at <= now() {
        return Err(StoreError::Expired.into());
    }
    Ok(Json(token_view(&svc, &client, &id, &t)?).into_response())
}

async fn delete_token<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    check_id(&id)?;
    svc.store.delete_token(&client, &id)?;
    durable(&svc).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn redeem_token<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    check_id(&id)?;
    let t = svc.store.redeem_token(&client, &id, now())?;
    durable(&svc).await?;
    Ok(Json(token_view(&svc, &client, &id, &t)?).into_response())
}

async fn get_cart<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    check_id(&id)?;
    Ok(with_etag(
        &svc.store.get_cart(&client, &id)?,
        StatusCode::OK,
    ))
}

async fn put_cart<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    check_id(&id)?;
    let want = if_match(&headers)?;
    let c: CartIn = parse(&body)?;
    let total = model::total(&c)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_cart", e.to_string()))?;
    let cart = Cart {
        id,
        version: 0,
        currency: c.currency,
        items: c.items,
        total,
        updated_at: now(),
    };
    let saved = svc
        .store
        .put_cart(&client, cart, want, svc.access().limits)?;
    durable(&svc).await?;
    Ok(with_etag(&saved, StatusCode::OK))
}

async fn delete_cart<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    check_id(&id)?;
    svc.store.delete_cart(&client, &id, if_match(&headers)?)?;
    durable(&svc).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckoutIn {
    payment: String,
}

async fn checkout<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    check_id(&id)?;
    let c: CheckoutIn = parse(&body)?;
    let idem = idempotency_key(&headers)?;
    let r = svc
        .store
        .checkout(&client, &id, if_match(&headers)?, &c.payment, &idem, now())?;
    durable(&svc).await?;
    let mut resp = (StatusCode::CREATED, Json(&r)).into_response();
    if let Ok(v) = HeaderValue::from_str(&idem) {
        resp.headers_mut().insert("idempotency-key", v);
    }
    Ok(resp)
}

/// The client's `Idempotency-Key`, or a fresh one when it sent none.
fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => Ok(new_key()),
        Some(Ok(k)) if model::valid_id(k) => Ok(k.to_string()),
        Some(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_idempotency_key",
            "Idempotency-Key must be 1 to 128 letters, digits, '-', '_', '.', ':'",
        )),
    }
}

/// A fresh idempotency key (128 random bits).
pub fn new_key() -> String {
    let mut b = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex::encode(b)
}

/// A page request: `from` (a sequence number or record id) and `limit`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageIn {
    from: Option<u64>,
    limit: Option<usize>,
}

/// Records one list answer holds at most (fewer when they pass [`PAGE_BYTES`]).
pub const MAX_PAGE: usize = 1000;
/// About how many bytes of records one list answer holds.
pub const PAGE_BYTES: usize = 1024 * 1024;
/// List answers built at once; more wait (up to [`LIST_WAIT`]) so that hostile reads
/// cannot grow the daemon's memory.
const LISTS_AT_ONCE: usize = 4;
const LIST_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
static LISTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(LISTS_AT_ONCE);

impl PageIn {
    fn from(&self) -> u64 {
        self.from.unwrap_or(1)
    }

    fn limit(&self, default: usize) -> usize {
        match self.limit.unwrap_or(default) {
            0 => 1,
            n => n.min(MAX_PAGE),
        }
    }
}

/// A place among the list answers being built, or 503 when all are taken for too long.
async fn list_slot() -> Result<tokio::sync::SemaphorePermit<'static>, ApiError> {
    match tokio::time::timeout(LIST_WAIT, LISTS.acquire()).await {
        Ok(Ok(p)) => Ok(p),
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many list requests at once; retry shortly",
        )),
    }
}

/// The page as a JSON array; `x-next-from` says where the next page starts, when there
/// is one.
fn page_response<T: serde::Serialize>(p: super::store::Page<T>) -> Response {
    let mut r = Json(p.items).into_response();
    if let Some(next) = p.next {
        if let Ok(v) = HeaderValue::from_str(&next.to_string()) {
            r.headers_mut().insert("x-next-from", v);
        }
    }
    r
}

async fn receipts<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    headers: HeaderMap,
    Query(p): Query<PageIn>,
) -> ApiResult {
    auth(&svc, &headers, from)?;
    let _slot = list_slot().await?;
    let page = svc
        .store
        .receipts(p.from(), p.limit(MAX_PAGE), PAGE_BYTES)?;
    Ok(page_response(page))
}

async fn public_key<S: CommerceStore>(State(svc): Svc<S>) -> Response {
    Json(serde_json::json!({ "algorithm": "ed25519", "public_key": svc.public_key }))
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventIn {
    group: String,
    body: serde_json::Value,
}

async fn post_event<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    let e: EventIn = parse(&body)?;
    check_id(&e.group)?;
    let key = idempotency_key(&headers)?;
    let rec =
        svc.store
            .enqueue_event(&client, &e.group, &key, e.body, now(), svc.access().limits)?;
    durable(&svc).await?;
    Ok((StatusCode::ACCEPTED, Json(rec)).into_response())
}

async fn list_outbox<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    headers: HeaderMap,
    Query(p): Query<PageIn>,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    let _slot = list_slot().await?;
    // A client sees its own records only (they hold full receipts).
    let page = svc
        .store
        .outbox_of(&client, p.from(), p.limit(100), PAGE_BYTES)?;
    Ok(page_response(page))
}

async fn list_dead<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    headers: HeaderMap,
    Query(p): Query<PageIn>,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    let _slot = list_slot().await?;
    let page = svc
        .store
        .dead_of(&client, p.from(), p.limit(100), PAGE_BYTES)?;
    Ok(page_response(page))
}

/// `Ok` when dead letter `id` is `client`'s; another client's is "not found" to it.
fn own_dead<S: CommerceStore>(svc: &Service<S>, client: &str, id: u64) -> Result<(), ApiError> {
    if svc.store.dead_letter(id)?.record.client == client {
        Ok(())
    } else {
        Err(StoreError::NotFound.into())
    }
}

async fn retry_dead<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    own_dead(&svc, &client, id)?;
    svc.store.retry_dead(id)?;
    durable(&svc).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn drop_dead<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> ApiResult {
    let client = auth(&svc, &headers, from)?;
    own_dead(&svc, &client, id)?;
    svc.store.drop_dead(id)?;
    durable(&svc).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The status document: online/offline, what waits upstream and since when, and whether
/// the store can take sales ("storage": {"ok": false} on a full disk). Parts the store
/// cannot read right now are null; the document itself is always there.
pub fn status<S: CommerceStore>(svc: &Service<S>) -> serde_json::Value {
    let t = now();
    let storage = svc.store.storage();
    let oldest = svc
        .store
        .outbox(1)
        .ok()
        .and_then(|o| o.first().map(|r| r.created_at));
    let age = oldest.map(|o| (t - o).max(0));
    let alerts: Vec<u32> = svc
        .access()
        .alert_hours
        .iter()
        .copied()
        .filter(|h| age.is_some_and(|a| a >= i64::from(*h) * 3600))
        .collect();
    let last_sync = svc.store.last_sync().ok().map(|l| {
        l.into_iter()
            .map(|(c, at)| (c, serde_json::json!({ "at": at, "age_s": t - at })))
            .collect::<serde_json::Map<_, _>>()
    });
    serde_json::json!({
        "online": (svc.online)(),
        "storage": storage,
        "undelivered": svc.store.outbox_len(),
        "oldest_undelivered_age_s": age,
        "oldest_undelivered_at": oldest,
        "dead_letters": svc.store.dead_len(),
        "alerts_hours_passed": alerts,
        "last_sync": last_sync,
    })
}

async fn get_status<S: CommerceStore>(
    State(svc): Svc<S>,
    ConnectInfo(from): Peer,
    headers: HeaderMap,
) -> ApiResult {
    auth(&svc, &headers, from)?;
    Ok(Json(status(&svc)).into_response())
}

async fn openapi() -> Response {
    (
        [("content-type", "application/json")],
        include_str!("../../../docs/commerce-openapi.json"),
    )
        .into_response()
}

async fn fallback() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        "no such endpoint; see /v1/openapi.json",
    )
}

/// Longest request target accepted (ids are at most 128 characters).
pub const MAX_URI: usize = 2048;

/// Around every request: an over-long target or a declared body over the limit is refused
/// before anything is read; the whole request must finish within
/// [`super::listen::REQUEST_TIMEOUT`]; and an error the HTTP framework itself answers
/// (a path or query that does not parse, a method the route does not take, a body over
/// the limit) gets the documented `{code, message}` JSON like every other error.
async fn guard(
    State(max_body): State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is {target} bytes; the limit is {MAX_URI}"),
        )
        .into_response();
    }
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > max_body as u64) {
        // Closing with the client's body unread resets the connection, which can take the
        // answer with it: read and drop what arrives within a second (a few limits' worth
        // at most), then answer and close.
        let drain = async {
            use futures::StreamExt;
            let mut body = req.into_body().into_data_stream();
            let mut seen = 0usize;
            while let Some(Ok(chunk)) = body.next().await {
                seen = seen.saturating_add(chunk.len());
                if seen > max_body.saturating_mul(4) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
        let mut r = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is {n} bytes; the limit is {max_body}"),
        )
        .into_response();
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("close"));
        return r;
    }
    let resp = match tokio::time::timeout(super::listen::REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request did not complete within {} s",
                    super::listen::REQUEST_TIMEOUT.as_secs()
                ),
            )
            .into_response()
        }
    };
    let is_json = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let status = resp.status();
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let text = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    ApiError::new(status, code, message).into_response()
}

/// The router; serve it with [`super::listen::serve`].
pub fn router<S: CommerceStore + 'static>(svc: Arc<Service<S>>) -> Router {
    let max = svc.max_body;
    Router::new()
        .route(
            "/v1/tokens/{id}",
            put(put_token::<S>)
                .get(get_token::<S>)
                .delete(delete_token::<S>),
        )
        .route("/v1/tokens/{id}/redeem", post(redeem_token::<S>))
        .route(
            "/v1/carts/{id}",
            put(put_cart::<S>)
                .get(get_cart::<S>)
                .delete(delete_cart::<S>),
        )
        .route("/v1/carts/{id}/checkout", post(checkout::<S>))
        .route("/v1/receipts", get(receipts::<S>))
        .route("/v1/receipts/public-key", get(public_key::<S>))
        .route("/v1/outbox", get(list_outbox::<S>).post(post_event::<S>))
        .route("/v1/outbox/dead", get(list_dead::<S>))
        .route("/v1/outbox/dead/{id}/retry", post(retry_dead::<S>))
        .route(
            "/v1/outbox/dead/{id}",
            axum::routing::delete(drop_dead::<S>),
        )
        .route("/v1/status", get(get_status::<S>))
        .route("/v1/openapi.json", get(openapi))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(max))
        .layer(axum::middleware::from_fn_with_state(max, guard))
        .with_state(svc)
}

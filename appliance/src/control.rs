//! The control API: versioned JSON over HTTP on a Unix socket in the runtime directory
//! (`control.sock`, mode 0660, group `stallnet` when that group exists), for the CLI, the
//! dashboard and scripts. Reads come from the daemon's latest status snapshot; actions
//! (disable, enable or prefer an uplink; reload the config) go to the role through
//! [`Daemon`].
//!
//! Documents: `GET /v1/status`, `/v1/uplinks`, `/v1/classes`, `/v1/flows`, `/v1/commerce`,
//! `/v1/stream` (the bitrate advice for a live-stream encoder), `/v1/stalls` (the hub's
//! fleet view),
//! `/v1/events?since=N&limit=N`, `/v1/events/stream?since=N` (NDJSON, one event per
//! line, kept open); `POST /v1/uplinks/{name}/disable|enable|prefer`,
//! `DELETE /v1/uplinks/preference`, `POST /v1/reload`; on the hub
//! `POST /v1/devices/{name}/invite?lan=…&valid_s=…&address=…` (the answer's `message` is
//! the invite code) and `POST /v1/devices/{name}/revoke`. Every document carries
//! `"version": 1`; errors are `{"version": 1, "error": {"code", "message"}}` with a 4xx/5xx.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::events::EventLog;
use crate::status::Status;

pub const SOCKET: &str = "control.sock";
pub const VERSION: u32 = 1;
/// Events returned by one `events` query at most.
const MAX_EVENTS: usize = 1000;

/// An operator's action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Disable(String),
    Enable(String),
    /// Prefer this uplink (the others act as backups), or clear the preference.
    Prefer(Option<String>),
    /// Let one LAN device reach the uplink's captive portal directly for a while.
    Login {
        uplink: String,
        device: std::net::Ipv4Addr,
        minutes: u64,
    },
    Reload,
    /// The hub: an invite for a new device; the answer is the code.
    Invite {
        name: String,
        lan: Vec<ipnet::IpNet>,
        valid_s: u64,
        addresses: Vec<std::net::SocketAddr>,
    },
    /// The hub: an enrolled device (or a pending invite) taken out at once.
    Revoke(String),
}

/// Why an action was refused.
#[derive(Debug, Clone)]
pub struct ActionError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ActionError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

/// What the running role offers the control API.
pub trait Daemon: Send + Sync + 'static {
    /// The latest status document (`None` until the first one is built).
    fn snapshot(&self) -> Option<Status>;
    /// Carries out an action; the message says what happened, for people.
    fn act(&self, action: Action) -> Result<String, ActionError>;
}

pub struct Control {
    pub daemon: Arc<dyn Daemon>,
    pub events: Arc<EventLog>,
}

type Ctl = State<Arc<Control>>;

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "version": VERSION, "error": { "code": code, "message": message.into() } })),
    )
        .into_response()
}

fn snapshot(c: &Control) -> Option<Status> {
    c.daemon.snapshot()
}

fn starting() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "starting",
        "the daemon is starting; no status yet",
    )
}

/// The edge's bond (the hub has one per device: all of them, by device name).
fn bond_part(s: &Status, key: &str) -> Value {
    match s.role.as_str() {
        "edge" => s.bonds["hub"][key].clone(),
        _ => Value::Object(
            s.bonds
                .as_object()
                .into_iter()
                .flatten()
                .map(|(d, b)| (d.clone(), b[key].clone()))
                .collect(),
        ),
    }
}

async fn get_status(State(c): Ctl) -> Response {
    match snapshot(&c) {
        Some(s) => Json(s).into_response(),
        None => starting(),
    }
}

async fn get_part(c: Arc<Control>, name: &str, key: &str) -> Response {
    match snapshot(&c) {
        Some(s) => Json(json!({ "version": VERSION, "role": s.role, name: bond_part(&s, key) }))
            .into_response(),
        None => starting(),
    }
}

async fn get_uplinks(State(c): Ctl) -> Response {
    get_part(c, "uplinks", "links").await
}

async fn get_classes(State(c): Ctl) -> Response {
    get_part(c, "classes", "classes").await
}

async fn get_flows(State(c): Ctl) -> Response {
    get_part(c, "flows", "top_flows").await
}

async fn get_stream(State(c): Ctl) -> Response {
    match snapshot(&c) {
        Some(s) => Json(json!({ "version": VERSION, "advice": s.stream_advice })).into_response(),
        None => starting(),
    }
}

async fn get_stalls(State(c): Ctl) -> Response {
    match snapshot(&c) {
        Some(s) if s.role == "hub" => {
            Json(json!({ "version": VERSION, "stalls": s.stalls.unwrap_or_default() }))
                .into_response()
        }
        Some(_) => error(
            StatusCode::CONFLICT,
            "not_on_edge",
            "the fleet view is the hub's (the edge is one stall)",
        ),
        None => starting(),
    }
}

async fn get_commerce(State(c): Ctl) -> Response {
    match snapshot(&c) {
        Some(s) => Json(json!({ "version": VERSION, "commerce": s.commerce })).into_response(),
        None => starting(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

type EventQ = Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>;

async fn get_events(State(c): Ctl, q: EventQ) -> Response {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "expected ?since=N&limit=N (non-negative integers)",
        );
    };
    let limit = q.limit.unwrap_or(MAX_EVENTS).min(MAX_EVENTS);
    Json(json!({ "version": VERSION, "events": c.events.since(q.since, limit) })).into_response()
}

/// The backlog after `since`, then every new event as it happens, one JSON per line.
async fn stream_events(State(c): Ctl, q: EventQ) -> Response {
    use tokio::sync::broadcast::error::RecvError;
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "expected ?since=N (a non-negative integer)",
        );
    };
    let since = q.since;
    // Subscribe first: nothing falls between the backlog and the live feed.
    let rx = c.events.subscribe();
    let backlog: std::collections::VecDeque<_> = c.events.since(since, MAX_EVENTS).into();
    let last = backlog.back().map_or(since, |e| e.seq);
    let line = |e: &crate::events::Event| {
        Ok::<_, std::convert::Infallible>(format!(
            "{}\n",
            serde_json::to_string(e).unwrap_or_default()
        ))
    };
    let stream = futures::stream::unfold(
        (backlog, rx, last),
        move |(mut backlog, mut rx, mut last)| async move {
            if let Some(e) = backlog.pop_front() {
                return Some((line(&e), (backlog, rx, last)));
            }
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.seq > last => {
                        last = ev.seq;
                        return Some((line(&ev), (backlog, rx, last)));
                    }
                    // Already sent, or a slow reader lost some: go on with what comes next.
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    );
    (
        [("content-type", "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

async fn act(c: &Control, action: Action) -> Response {
    let daemon = c.daemon.clone();
    match tokio::task::spawn_blocking(move || daemon.act(action)).await {
        Ok(Ok(message)) => {
            Json(json!({ "version": VERSION, "ok": true, "message": message })).into_response()
        }
        Ok(Err(e)) => error(e.status, e.code, e.message),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginQuery {
    device: Option<String>,
    minutes: Option<u64>,
}

async fn uplink_action(
    State(c): Ctl,
    UrlPath((name, verb)): UrlPath<(String, String)>,
    q: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let action = match verb.as_str() {
        "disable" => Action::Disable(name),
        "enable" => Action::Enable(name),
        "prefer" => Action::Prefer(Some(name)),
        "login" => {
            let q = match q {
                Ok(Query(q)) => q,
                Err(e) => return error(StatusCode::BAD_REQUEST, "bad_query", e.body_text()),
            };
            let Some(device) = q.device.as_deref().and_then(|d| d.parse().ok()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_device",
                    "login needs device=IPv4 (the LAN address of the phone that signs in)",
                );
            };
            let minutes = q.minutes.unwrap_or(5);
            if !(1..=30).contains(&minutes) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_minutes",
                    "minutes must be 1 to 30",
                );
            }
            Action::Login {
                uplink: name,
                device,
                minutes,
            }
        }
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_action",
                format!(
                    "unknown uplink action {verb:?}: expected disable, enable, prefer or login"
                ),
            )
        }
    };
    act(&c, action).await
}

async fn clear_preference(State(c): Ctl) -> Response {
    act(&c, Action::Prefer(None)).await
}

async fn reload(State(c): Ctl) -> Response {
    act(&c, Action::Reload).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteQuery {
    /// Comma-separated IPv4 prefixes (default: the image's 10.1.0.0/24).
    lan: Option<String>,
    /// Seconds the code is good for (default: a day).
    valid_s: Option<u64>,
    /// Comma-separated `IPv4:port` the box reaches the hub at.
    address: Option<String>,
}

/// Splits a comma-separated list, refusing the whole of it on one bad item.
fn list<T: std::str::FromStr>(s: Option<&str>) -> Result<Vec<T>, String> {
    s.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .map(|i| i.parse().map_err(|_| i.to_string()))
        .collect()
}

async fn invite(
    State(c): Ctl,
    UrlPath(name): UrlPath<String>,
    q: Result<Query<InviteQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_query", e.body_text()),
    };
    let lan = match list::<ipnet::IpNet>(q.lan.as_deref().or(Some("10.1.0.0/24"))) {
        Ok(l) => l,
        Err(i) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_lan",
                format!("expected IPv4 prefixes like 10.1.0.0/24, got {i:?}"),
            )
        }
    };
    let addresses = match list(q.address.as_deref()) {
        Ok(a) => a,
        Err(i) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_address",
                format!("expected IPv4:port like 203.0.113.5:4433, got {i:?}"),
            )
        }
    };
    let action = Action::Invite {
        name,
        lan,
        valid_s: q.valid_s.unwrap_or(86_400),
        addresses,
    };
    act(&c, action).await
}

async fn revoke(State(c): Ctl, UrlPath(name): UrlPath<String>) -> Response {
    act(&c, Action::Revoke(name)).await
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint (see the module documentation of the control API)",
    )
}

pub fn router(c: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/status", get(get_status))
        .route("/v1/uplinks", get(get_uplinks))
        .route("/v1/uplinks/preference", delete(clear_preference))
        .route("/v1/uplinks/{name}/{action}", post(uplink_action))
        .route("/v1/classes", get(get_classes))
        .route("/v1/flows", get(get_flows))
        .route("/v1/commerce", get(get_commerce))
        .route("/v1/stalls", get(get_stalls))
        .route("/v1/stream", get(get_stream))
        .route("/v1/events", get(get_events))
        .route("/v1/events/stream", get(stream_events))
        .route("/v1/reload", post(reload))
        .route("/v1/devices/{name}/invite", post(invite))
        .route("/v1/devices/{name}/revoke", post(revoke))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(4096))
        .with_state(c)
}

/// Starts what a role serves to operators: the control API on its socket, and the
/// metrics when the config asks for them. Errors are logged; the data plane goes on.
pub fn spawn(
    daemon: Arc<dyn Daemon>,
    events: Arc<EventLog>,
    cfg: &stallnet_netconf::Config,
    cancel: CancellationToken,
) {
    if let Some(m) = &cfg.metrics {
        let (d, listen, c) = (daemon.clone(), m.listen, cancel.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listen, d, c).await {
                tracing::error!("{e:#}");
            }
        });
    }
    let control = Arc::new(Control { daemon, events });
    let dir = cfg.runtime_dir.clone();
    tokio::spawn(async move {
        if let Err(e) = serve(&dir, control, cancel).await {
            tracing::error!("{e:#}");
        }
    });
}

/// The socket's path in `runtime_dir`.
pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(SOCKET)
}

/// Serves the control API on `runtime_dir/control.sock` until cancelled.
pub async fn serve(runtime_dir: &Path, c: Arc<Control>, cancel: CancellationToken) -> Result<()> {
    let path = socket_path(runtime_dir);
    // A socket left by a daemon that died: nobody answers on it any more.
    if path.exists() {
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            anyhow::bail!("{} is in use: is another stallnet running?", path.display());
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("control socket {}", path.display()))?;
    set_access(&path)?;
    tracing::info!(socket = %path.display(), "control API running");
    let result = axum::serve(listener, router(c))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    let _ = std::fs::remove_file(&path);
    result.context("control API")
}

/// Mode 0660; group `stallnet` when it exists (its members may use the CLI and dashboard).
fn set_access(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    if let Ok(Some(g)) = nix::unistd::Group::from_name("stallnet") {
        nix::unistd::chown(path, None, Some(g.gid))
            .with_context(|| format!("chgrp stallnet {}", path.display()))?;
    }
    Ok(())
}

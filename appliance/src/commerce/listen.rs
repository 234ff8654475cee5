//! Accepts the LAN's connections to the commerce API and keeps any one device from
//! exhausting the daemon: a source in `deny_from` is refused before a byte is read, each
//! source may hold [`PER_SOURCE`] connections and all together [`Caps::total`], headers
//! must arrive within [`HEADER_TIMEOUT`] (an idle keep-alive connection is closed after
//! it), and a whole request, body included, within [`REQUEST_TIMEOUT`]. Over a cap the
//! connection gets a JSON 503 and is closed; nothing queues.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Connections one source address may hold at once (a till needs a handful).
pub const PER_SOURCE: usize = 32;
/// Connections all sources together may hold, at most.
pub const MAX_TOTAL: usize = 256;
/// Time for a request's headers to arrive, and for the next request on an idle
/// keep-alive connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a whole request, body and answer included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The connection caps in force.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub per_source: usize,
    pub total: usize,
}

impl Caps {
    /// [`PER_SOURCE`] and [`MAX_TOTAL`], with the total held to a quarter of the process's
    /// open-file limit: the other three quarters stay for the daemon's own work (the
    /// tunnel, the control socket, the status file, config revisions).
    pub fn for_this_process() -> Self {
        let files = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        let quarter = usize::try_from(files / 4).unwrap_or(MAX_TOTAL);
        Caps {
            per_source: PER_SOURCE,
            total: MAX_TOTAL.min(quarter).max(1),
        }
    }
}

/// Who holds how many connections.
#[derive(Default)]
struct Held {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// One accepted connection's place under the caps, given back when it closes.
struct Slot {
    held: Arc<Mutex<Held>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut h = match self.held.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        h.total = h.total.saturating_sub(1);
        if let Some(n) = h.per_source.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                h.per_source.remove(&self.ip);
            }
        }
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Denied,
    SourceFull,
    AllFull,
}

fn admit(held: &Arc<Mutex<Held>>, caps: Caps, ip: IpAddr) -> Result<Slot, Refusal> {
    let mut h = match held.lock() {
        Ok(h) => h,
        Err(p) => p.into_inner(),
    };
    if h.total >= caps.total {
        return Err(Refusal::AllFull);
    }
    let n = h.per_source.entry(ip).or_insert(0);
    if *n >= caps.per_source {
        return Err(Refusal::SourceFull);
    }
    *n += 1;
    h.total += 1;
    Ok(Slot {
        held: held.clone(),
        ip,
    })
}

/// The whole answer to a refused connection, written without reading its request.
fn refusal_bytes(r: Refusal) -> Vec<u8> {
    let (status, code, message) = match r {
        Refusal::Denied => (
            "403 Forbidden",
            "forbidden_network",
            "this network may not use the commerce API",
        ),
        Refusal::SourceFull => (
            "503 Service Unavailable",
            "too_many_connections",
            "this device holds too many connections to the commerce API; close idle ones",
        ),
        Refusal::AllFull => (
            "503 Service Unavailable",
            "too_many_connections",
            "the commerce API holds its maximum of connections; retry shortly",
        ),
    };
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `router` on `listener` until `cancel`; `denied` says whether a source address
/// (already canonical: an IPv4 guest on `[::]` is its IPv4 address) is refused.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    caps: Caps,
    denied: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
    cancel: CancellationToken,
) {
    let held = Arc::new(Mutex::new(Held::default()));
    let refusing = Arc::new(AtomicUsize::new(0));
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors (or a transient error): wait instead of
                    // spinning; the connections we hold will close.
                    tracing::warn!("commerce API: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => break,
        };
        let ip = peer.ip().to_canonical();
        let slot = if denied(ip) {
            Err(Refusal::Denied)
        } else {
            admit(&held, caps, ip)
        };
        match slot {
            Ok(slot) => {
                let (router, c) = (router.clone(), cancel.clone());
                conns.spawn(async move {
                    connection(stream, peer, router, c).await;
                    drop(slot);
                });
            }
            Err(r) => {
                if r != Refusal::Denied {
                    tracing::debug!(%ip, ?r, "commerce API: connection refused");
                }
                // HTTP clients take no answer before their request: read its head
                // (briefly, a bounded number of refused connections at a time; beyond
                // that the connection is just closed), answer, close.
                if refusing.load(Ordering::Relaxed) < MAX_REFUSING {
                    refusing.fetch_add(1, Ordering::Relaxed);
                    let n = refusing.clone();
                    tokio::spawn(async move {
                        refuse(stream, r).await;
                        n.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }
        }
    }
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), conns.wait()).await;
}

/// Refused connections drained at once; beyond it they are simply closed.
const MAX_REFUSING: usize = 64;

/// Reads a refused connection's request head (up to 8 KiB, within a second), answers
/// with the refusal and closes it.
async fn refuse(mut stream: TcpStream, r: Refusal) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n) = stream.read(&mut buf).await {
            head.extend_from_slice(&buf[..n]);
            if n == 0 || head.len() > 8192 || head.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&refusal_bytes(r)).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    cancel: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let mut r = router.clone();
            async move { tower_service::Service::call(&mut r, req).await }
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, "commerce API connection: {e}");
            }
        }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_source_and_in_total_and_give_back_on_close() {
        let held = Arc::new(Mutex::new(Held::default()));
        let caps = Caps {
            per_source: 2,
            total: 3,
        };
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let a1 = admit(&held, caps, a);
        let a2 = admit(&held, caps, a);
        assert!(a1.is_ok() && a2.is_ok());
        assert_eq!(admit(&held, caps, a).err(), Some(Refusal::SourceFull));
        let b1 = admit(&held, caps, b);
        assert!(b1.is_ok());
        assert_eq!(admit(&held, caps, b).err(), Some(Refusal::AllFull));
        drop(a1);
        assert!(
            admit(&held, caps, b).is_ok(),
            "a closed connection frees its place"
        );
        drop((a2, b1));
    }
}

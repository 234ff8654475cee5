//! A client of the control API over its Unix socket; the CLI and the dashboard use it.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// HTTP methods, for callers that do not depend on hyper themselves.
pub use hyper::Method;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("stallnet is not running (no answer on {}: {source})", path.display())]
    NotRunning {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The daemon answered with an error document.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("control API: {0}")]
    Protocol(String),
    /// The command line itself was wrong (nothing was sent).
    #[error("{0}")]
    Usage(String),
}

impl ClientError {
    /// The stable code for `--json` error documents.
    pub fn code(&self) -> &str {
        match self {
            Self::NotRunning { .. } => "not_running",
            Self::Api { code, .. } => code,
            Self::Protocol(_) => "protocol",
            Self::Usage(_) => "usage",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

impl Client {
    pub fn new(runtime_dir: &Path) -> Self {
        Self {
            path: crate::control::socket_path(runtime_dir),
        }
    }

    async fn connect(&self) -> Result<Sender, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| ClientError::NotRunning {
                path: self.path.clone(),
                source,
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn send(
        &self,
        method: hyper::Method,
        path: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let mut sender = self.connect().await?;
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "stallnet")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// One request; the JSON document, or the API's error.
    pub async fn request(&self, method: hyper::Method, path: &str) -> Result<Value, ClientError> {
        let resp = self.send(method, path).await?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        let doc: Value = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Protocol(format!("not JSON ({e})")))?;
        if status >= 400 {
            return Err(ClientError::Api {
                status,
                code: doc["error"]["code"].as_str().unwrap_or("error").to_string(),
                message: doc["error"]["message"]
                    .as_str()
                    .unwrap_or("the daemon refused")
                    .to_string(),
            });
        }
        Ok(doc)
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request(hyper::Method::GET, path).await
    }

    /// Follows an NDJSON stream, calling `each` per document until it returns false or the
    /// daemon closes the stream.
    pub async fn follow(
        &self,
        path: &str,
        mut each: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let resp = self.send(hyper::Method::GET, path).await?;
        if resp.status().as_u16() >= 400 {
            return Err(ClientError::Protocol(format!("HTTP {}", resp.status())));
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol(e.to_string()))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.extend_from_slice(data);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                    if !each(v) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}

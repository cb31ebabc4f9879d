//! The HTTP server: `GET /metrics` on the loopback address of
//! `[metrics] listen`, 404 for anything else.
//!
//! Any local user can connect, so the server is bounded: at most
//! `metrics.max_connections` connections are served (and never more than
//! an eighth of the process's RLIMIT_NOFILE, so the agent keeps its file
//! descriptors for its own work); past it, a new connection replaces the
//! oldest one that has not sent its request yet, or is closed when every
//! one is answering. Each connection serves one request (no keep-alive),
//! must send its headers within [`HEADER_TIMEOUT`] and is closed after
//! [`CONNECTION_TIMEOUT`] in all, so idle and slow connections cannot hold
//! a place. Excess connections are accepted and closed at once, so the
//! kernel's backlog never fills and a new scrape is always accepted.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codegen::http;

use super::Metrics;

/// How long a connection may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may last in all.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The metrics HTTP listener failed to bind.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {address} (metrics.listen): {source}")]
pub struct BindError {
    /// The configured address.
    pub address: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics listener (before READY, so a busy port stops the start).
pub async fn bind(address: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| BindError { address, source })
}

/// One served connection, as the table sees it.
#[derive(Debug)]
struct Slot {
    id: u64,
    /// Its request arrived: it is being answered and is not replaced.
    busy: AtomicBool,
    /// Cancelled to replace it.
    evict: CancellationToken,
}

/// The served connections, oldest first.
#[derive(Debug)]
struct Slots {
    max: usize,
    open: Mutex<(u64, VecDeque<Arc<Slot>>)>,
}

impl Slots {
    /// A place for a new connection: free, or taken from the oldest idle
    /// one (which is told to close); `None` when every one is busy.
    fn take(&self) -> Option<Arc<Slot>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.1.len() >= self.max {
            let idle = open
                .1
                .iter()
                .position(|s| !s.busy.load(Ordering::Relaxed))?;
            if let Some(old) = open.1.remove(idle) {
                old.evict.cancel();
            }
        }
        open.0 += 1;
        let slot = Arc::new(Slot {
            id: open.0,
            busy: AtomicBool::new(false),
            evict: CancellationToken::new(),
        });
        open.1.push_back(slot.clone());
        Some(slot)
    }

    fn release(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.1.retain(|s| s.id != id);
    }
}

/// `metrics.max_connections`, capped at an eighth of RLIMIT_NOFILE.
fn connection_cap(configured: u32) -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    let cap = usize::try_from(soft / 8).unwrap_or(usize::MAX).max(1);
    let configured = configured as usize;
    if configured > cap {
        tracing::warn!(
            max_connections = configured,
            nofile = soft,
            "metrics.max_connections is over an eighth of the open-file limit: serving at most {cap}"
        );
    }
    configured.min(cap)
}

/// Serves `GET /metrics` (404 for anything else) until cancelled, at most
/// `max_connections` connections at once (see the module doc).
pub async fn serve(
    metrics: Metrics,
    listener: TcpListener,
    max_connections: u32,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Slots {
        max: connection_cap(max_connections),
        open: Mutex::new((0, VecDeque::new())),
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false);
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Every place is answering a request: this one is closed now.
        let Some(slot) = slots.take() else {
            continue;
        };
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        let slots = slots.clone();
        let http = http.clone();
        tasks.spawn(async move {
            let busy = slot.clone();
            let service = hyper::service::service_fn(move |request| {
                busy.busy.store(true, Ordering::Relaxed);
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&metrics, &request)) }
            });
            let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = slot.evict.cancelled() => {}
                result = tokio::time::timeout(CONNECTION_TIMEOUT, connection) => match result {
                    Ok(Err(error)) => tracing::debug!(%error, "metrics connection ended with an error"),
                    Err(_) => tracing::debug!("metrics connection closed after {CONNECTION_TIMEOUT:?}"),
                    Ok(Ok(())) => {}
                },
            }
            slots.release(slot.id);
        });
    }
}

fn answer<B>(metrics: &Metrics, request: &http::Request<B>) -> http::Response<String> {
    let (status, content_type, body) =
        if request.method() == http::Method::GET && request.uri().path() == "/metrics" {
            (
                http::StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.render(),
            )
        } else {
            let mut body = String::new();
            let _ = writeln!(body, "not found; try GET /metrics");
            (http::StatusCode::NOT_FOUND, "text/plain", body)
        };
    let mut response = http::Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_connection_replaces_the_oldest_idle_one() {
        let slots = Slots {
            max: 2,
            open: Mutex::new((0, VecDeque::new())),
        };
        let a = slots.take().unwrap();
        let b = slots.take().unwrap();
        a.busy.store(true, Ordering::Relaxed);
        let c = slots.take().expect("b is idle");
        assert!(b.evict.is_cancelled(), "the oldest idle one goes");
        assert!(!a.evict.is_cancelled(), "a busy one stays");
        c.busy.store(true, Ordering::Relaxed);
        assert!(slots.take().is_none(), "every place is busy");
        slots.release(a.id);
        assert!(slots.take().is_some());
    }
}

//! The HTTP server: `GET /metrics` on the loopback address of
//! `[metrics] listen`, 404 for anything else.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codegen::http;

use super::Metrics;

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

/// Serves `GET /metrics` (404 for anything else) until cancelled.
pub async fn serve(
    metrics: Metrics,
    listener: TcpListener,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
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
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&metrics, &request)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                result = connection => if let Err(error) = result {
                    tracing::debug!(%error, "metrics connection ended with an error");
                },
            }
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

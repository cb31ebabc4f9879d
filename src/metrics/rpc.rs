//! The gRPC layer: a tower layer on the gRPC servers counting calls by
//! method and status code, with their latency.

use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;

use super::Metrics;
use super::series::{MethodLabel, RpcLabels};

impl Metrics {
    /// Records one finished RPC. An Unimplemented reply is filed under method
    /// "unknown": any client could otherwise grow the label set at will (the
    /// layer does the same for paths that no route serves).
    pub fn observe_rpc(&self, method: &str, code: &str, latency: std::time::Duration) {
        let method = if code == "12" { "unknown" } else { method };
        self.inner
            .rpcs
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        self.inner
            .rpc_latency
            .get_or_create(&MethodLabel {
                method: method.to_owned(),
            })
            .observe(latency.as_secs_f64());
    }
}

/// A tower layer counting gRPC calls by method and status code, with their
/// latency to the response head. Records nothing when metrics are off. It
/// goes outside the security guard, so that refused calls (permission,
/// limits) are counted too.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Option<Metrics>,
    served: fn(&str) -> bool,
}

impl RpcMetricsLayer {
    /// A layer recording into `metrics`, or passing calls through when
    /// `None`. Paths for which `served` is false are filed under method
    /// "unknown".
    pub fn new(metrics: Option<Metrics>, served: fn(&str) -> bool) -> Self {
        Self { metrics, served }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
            served: self.served,
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around the gRPC routes.
#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Option<Metrics>,
    served: fn(&str) -> bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(metrics) = self.metrics.clone() else {
            return Box::pin(self.inner.call(request));
        };
        let path = request.uri().path();
        let method = if (self.served)(path) {
            path.to_owned()
        } else {
            "unknown".to_owned()
        };
        let started = tokio::time::Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                // Errors in the body come in trailers; a status in the head
                // is a trailers-only reply (most errors).
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_owned(),
                Err(_) => "transport_error".to_owned(),
            };
            metrics.observe_rpc(&method, &code, started.elapsed());
            result
        })
    }
}

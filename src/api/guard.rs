//! The guard in front of every service: a tower layer that, for each
//! request, reads the caller ([`Peer`], put in the request's extensions by
//! the listener), applies the per-peer limits, authorizes the call by its
//! full method name and the caller's role ([`super::auth`]) before a byte
//! of its body is read, counts the body against the caller's bytes in
//! flight ([`super::metered`]), and writes the audit line of every
//! mutating RPC (a refused one names the RPC and the caller, not the
//! request's fields, which are never read).
//!
//! Why a layer rather than checks in each service: one place covers every
//! RPC of the five services, including those of modules written later,
//! which need not know about roles at all. `ReclaimSpace` is allowed to
//! operators only as a dry run, so for that call the layer decodes the
//! request message itself (every RPC of the contract is unary on the
//! request side, so the body is one gRPC frame, bounded by
//! `limits.max_message_bytes`) instead of asking the disk service to check
//! a role.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::{Code, Status};

use super::audit::{AuditRecord, grpc_message};
use super::auth::{self, Decision};
use super::config::ApiConfig;
use super::limits::{InFlight, PeerLimiter, StreamSlot};
use super::metered::MeteredBody;
use super::peer::Peer;
use super::proto;

/// How long a client may take to send its request message.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The layer; cheap to clone.
#[derive(Clone)]
pub struct GuardLayer {
    state: Arc<GuardState>,
}

struct GuardState {
    config: watch::Receiver<Arc<ApiConfig>>,
    max_message_bytes: usize,
    limiter: Arc<PeerLimiter>,
    inflight: Arc<InFlight>,
}

impl GuardLayer {
    /// A guard reading the live limits and grants from `config`;
    /// `max_message_bytes` is fixed at start (tonic's decoders use it too).
    pub fn new(config: watch::Receiver<Arc<ApiConfig>>) -> Self {
        let max_message_bytes = config.borrow().limits.max_message_bytes as usize;
        Self {
            state: Arc::new(GuardState {
                config,
                max_message_bytes,
                limiter: PeerLimiter::new(),
                inflight: InFlight::new(),
            }),
        }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            state: self.state.clone(),
        }
    }
}

/// The guarded service.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    state: Arc<GuardState>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Guard<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Send,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone is not ready; the one polled ready is used for this call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Box::pin(async move { state.handle(request, inner).await })
    }
}

/// Why a request was stopped in the guard, and the status to answer.
fn refuse(status: Status, audit: Option<AuditRecord>) -> http::Response<Body> {
    if let Some(audit) = audit {
        audit.finish(status.code());
    }
    status.into_http()
}

impl GuardState {
    async fn handle<S>(
        &self,
        request: http::Request<Body>,
        mut inner: S,
    ) -> Result<http::Response<Body>, S::Error>
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    {
        let path = request.uri().path().to_owned();
        let Some(peer) = request.extensions().get::<Peer>().cloned() else {
            return Ok(refuse(
                Status::unauthenticated(format!(
                    "{path}: the connection carries no credentials (no peer identity)"
                )),
                None,
            ));
        };
        let method = auth::lookup(&path);
        let config = self.config.borrow().clone();
        let mut audit = method
            .filter(|m| m.access.is_mutating())
            .map(|_| AuditRecord::new(&peer, &path));
        let key = peer.who.limit_key();

        if let Err(status) = self.limiter.take_request(&key, &config.limits) {
            return Ok(refuse(status, audit));
        }
        // Decided from the method and the caller alone: a refused call's
        // body is never read, so it costs no memory.
        let decision = auth::authorize(peer.role, &path, config.operator.allow_cancel_job);
        let dry_run_only = match decision {
            Decision::Allow => false,
            Decision::AllowIfDryRun => true,
            Decision::Deny(status) => return Ok(refuse(status, audit)),
        };
        let slot = if auth::is_stream(&path) {
            match self.limiter.open_stream(&key, &config.limits) {
                Ok(slot) => Some(slot),
                Err(status) => return Ok(refuse(status, audit)),
            }
        } else {
            None
        };

        let (parts, body) = request.into_parts();
        let charge = self.inflight.charge(&key);
        // Read here only what an audit line or the dry-run rule needs (one
        // message, bounded by limits.max_message_bytes); tonic reads the rest.
        let body = if audit.is_some() || dry_run_only {
            let mut metered = MeteredBody::buffered(body, charge, &config.limits);
            let bytes = match read_message(&mut metered, self.max_message_bytes).await {
                Ok(bytes) => bytes,
                Err(status) => return Ok(refuse(status, audit)),
            };
            let message = grpc_message(&bytes).map(|m| bytes.slice_ref(m));
            if let (Some(audit), Some(message)) = (audit.as_mut(), message.as_deref()) {
                audit.set_request(message);
            }
            if dry_run_only {
                let dry_run = message
                    .as_deref()
                    .and_then(|m| proto::ReclaimSpaceRequest::decode(m).ok())
                    .is_some_and(|r| r.dry_run);
                if !dry_run {
                    return Ok(refuse(auth::dry_run_required(peer.role, &path), audit));
                }
            }
            metered.into_held(bytes)
        } else {
            Body::new(MeteredBody::streaming(body, charge, &config.limits))
        };
        let request = http::Request::from_parts(parts, body);

        let response = match inner.call(request).await {
            Ok(response) => response,
            Err(error) => {
                if let Some(audit) = audit {
                    audit.finish(Code::Internal);
                }
                return Err(error);
            }
        };
        // A trailers-only reply (every error) carries its status in the headers.
        if let Some(status) = Status::from_header_map(response.headers())
            && let Some(audit) = audit.take()
        {
            audit.finish(status.code());
        }
        if audit.is_none() && slot.is_none() {
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        let body = GuardedBody {
            inner: body,
            audit,
            _slot: slot,
        };
        Ok(http::Response::from_parts(parts, Body::new(body)))
    }
}

/// Reads a request body of at most one message of `limit` bytes (plus the
/// 5-byte gRPC frame header), refusing a bigger one as soon as its declared
/// length or its bytes exceed the limit.
async fn read_message(body: &mut MeteredBody, limit: usize) -> Result<Bytes, Status> {
    let too_big = |size: usize| {
        Status::resource_exhausted(format!(
            "request message of {size} bytes is over limits.max_message_bytes = {limit}"
        ))
    };
    let read = async {
        let mut buf = BytesMut::new();
        let mut reserved = false;
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            if buf.len() >= 5 && !reserved {
                let declared = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if declared > limit {
                    return Err(too_big(declared));
                }
                // The whole message is charged (and allocated) once, as
                // soon as its size is known: a message the budget cannot
                // hold is refused before its bytes are taken in.
                let rest = (declared + 5).saturating_sub(buf.len());
                body.reserve(rest)?;
                buf.reserve(rest);
                reserved = true;
            }
            if buf.len() > limit + 5 {
                return Err(too_big(buf.len() - 5));
            }
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "the request message did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            )))
        })
}

/// A reply body that finishes the audit record when the status arrives in
/// the trailers, and holds the peer's stream slot until it is dropped.
struct GuardedBody {
    inner: Body,
    audit: Option<AuditRecord>,
    _slot: Option<StreamSlot>,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(audit) = this.audit.as_mut() {
                        audit.observe_reply(data);
                    }
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(audit) = this.audit.take()
                {
                    let code = Status::from_header_map(trailers)
                        .map(|s| s.code())
                        .unwrap_or(Code::Unknown);
                    audit.finish(code);
                }
            }
            Some(Err(status)) => {
                if let Some(audit) = this.audit.take() {
                    audit.finish(status.code());
                }
            }
            None => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;

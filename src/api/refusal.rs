//! Refusing a connection in words the client can read: instead of closing
//! a connection whose peer has no role, or that is over a connection limit,
//! the agent completes the HTTP/2 handshake and answers its calls with one
//! gRPC status (PERMISSION_DENIED naming who may connect, or
//! RESOURCE_EXHAUSTED naming the limit), then sends GOAWAY. A client (the
//! CLI first) can then tell a refusal from an agent that crashed or is
//! restarting, which closes connections without a word.
//!
//! Each refusal is bounded: one stream at a time, small HTTP/2 windows and
//! header lists, [`REFUSAL_TIMEOUT`] in all, and at most
//! [`MAX_REFUSALS`] at once (further ones are closed without an answer),
//! so refused peers cannot use it to hold the agent's memory.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, Semaphore};
use tonic::Status;

/// Longest a refused connection is served.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Refusals answered at once.
pub const MAX_REFUSALS: usize = 16;

/// Answers refused connections; cheap to clone.
#[derive(Clone)]
pub struct Refusals {
    slots: Arc<Semaphore>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            slots: Arc::new(Semaphore::new(MAX_REFUSALS)),
        }
    }
}

impl Refusals {
    /// Answers every call on `stream` with `status` for a moment, then
    /// closes it (in a task of its own). Closes it at once when
    /// [`MAX_REFUSALS`] are already being answered.
    pub fn answer<S>(&self, stream: S, status: Status)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(REFUSAL_TIMEOUT, serve(stream, status)).await;
        });
    }
}

/// Serves the HTTP/2 connection until the first answer is sent and the
/// client has had a moment to read it, then says GOAWAY.
async fn serve<S>(stream: S, status: Status)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let answered = Arc::new(Notify::new());
    let notify = answered.clone();
    let service = hyper::service::service_fn(move |_request| {
        let response = status.clone().into_http::<tonic::body::Body>();
        notify.notify_one();
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(1)
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(16 * 1024)
        .max_header_list_size(16 * 1024)
        .max_send_buf_size(16 * 1024);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = answered.notified() => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::proto::GetStatusRequest;
    use crate::api::proto::agent_service_client::AgentServiceClient;

    #[tokio::test]
    async fn a_client_reads_the_status_of_a_refusal() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        Refusals::default().answer(
            server,
            Status::permission_denied("uid 1001 may not use this agent"),
        );
        let mut client = Some(client);
        let channel = tonic::transport::Endpoint::from_static("http://refused")
            .connect_with_connector(tower::service_fn(move |_| {
                let io = client.take();
                async move {
                    io.map(TokioIo::new)
                        .ok_or_else(|| std::io::Error::other("one connection only"))
                }
            }))
            .await
            .expect("the HTTP/2 handshake completes");
        let status = AgentServiceClient::new(channel)
            .get_status(GetStatusRequest {})
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), "uid 1001 may not use this agent");
    }
}

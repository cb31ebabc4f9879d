//! The accept loops of the Unix socket and the control-plane TCP listener.
//! Each turns raw connections into [`Authenticated`] streams for
//! `serve_with_incoming`, identifying the peer first: SO_PEERCRED and group
//! membership on the Unix socket, the TLS handshake and certificate names on
//! TCP. A local peer without a role, or a peer over
//! `limits.max_connections_per_peer` / `limits.max_connections`, gets its
//! calls answered with PERMISSION_DENIED or RESOURCE_EXHAUSTED by
//! [`Refusals`] and never reaches the services; a failed TLS handshake is
//! closed after its alert. Every refusal is logged (target `audit`).
//!
//! Identification runs in its own task per connection (with a timeout and a
//! cap on how many are pending), so a slow client cannot hold up others. On
//! TCP, [`Handshakes`] counts pending handshakes per source (/64 for IPv6),
//! closes connections silent for [`FIRST_BYTE_TIMEOUT`] and keeps a share
//! of handshake slots for sources that completed one before.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::auth::Role;
use super::authority::AuthorityFix;
use super::config::ApiConfig;
use super::handshakes::{FIRST_BYTE_TIMEOUT, Handshakes, MAX_PENDING, Source};
use super::limits::ConnectionLimiter;
use super::peer::{Authenticated, Peer, UserDirectory, Who, local_peer};
use super::refusal::Refusals;
use super::tls::{allowed_name, certificate_names};

/// Longest a TLS handshake or a user lookup may take.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long, and how many bytes, a refused TLS client is read after the
/// alert before the socket is closed (see [`close_after_alert`]).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_MAX_BYTES: usize = 64 * 1024;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The stream of identified connections handed to tonic.
pub type Incoming<S> = ReceiverStream<std::io::Result<Authenticated<S>>>;

/// What every listener shares: the live limits and grants, the count of
/// open connections, and the refusals being answered. Cheap to clone.
#[derive(Clone)]
pub struct Admission {
    config: watch::Receiver<Arc<ApiConfig>>,
    connections: Arc<ConnectionLimiter>,
    refusals: Refusals,
    /// Half of RLIMIT_NOFILE: `limits.max_connections` never takes more,
    /// so the agent keeps descriptors for its own work.
    descriptor_cap: u32,
}

impl Admission {
    /// Admission reading the live `[limits]` and roles from `config`.
    pub fn new(config: watch::Receiver<Arc<ApiConfig>>) -> Self {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        let descriptor_cap = u32::try_from(soft / 2).unwrap_or(u32::MAX).max(1);
        let configured = config.borrow().limits.max_connections;
        if configured > descriptor_cap {
            tracing::warn!(
                max_connections = configured,
                nofile = soft,
                "limits.max_connections is over half the open-file limit: serving at most {descriptor_cap} connections"
            );
        }
        Self {
            config,
            connections: ConnectionLimiter::new(),
            refusals: Refusals::default(),
            descriptor_cap,
        }
    }

    /// `stream` with its peer, holding a connection slot; or, when the peer
    /// is over a connection limit, the refusal answered and `None`.
    fn admit<S>(&self, stream: S, peer: Peer) -> Option<Authenticated<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut limits = self.config.borrow().limits.clone();
        limits.max_connections = limits.max_connections.min(self.descriptor_cap);
        match self.connections.admit(&peer.who.limit_key(), &limits) {
            Ok(slot) => Some(Authenticated::new(stream, peer).with_slot(slot)),
            Err(status) => {
                tracing::warn!(target: "audit", who = %peer.who, "connection refused: {}", status.message());
                self.refusals.answer(stream, status);
                None
            }
        }
    }
}

/// A listener that yields raw connections and a description for logs.
trait Acceptor: Send + 'static {
    type Stream: Send + 'static;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Acceptor for UnixListener {
    type Stream = UnixStream;
    async fn accept_one(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Acceptor for TcpListener {
    type Stream = TcpStream;
    async fn accept_one(&self) -> std::io::Result<TcpStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts until `cancel`, identifying each connection in its own task.
fn accept_loop<L, S, F, Fut>(listener: L, identify: F, cancel: CancellationToken) -> Incoming<S>
where
    L: Acceptor,
    S: Send + 'static,
    F: Fn(L::Stream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<Authenticated<S>>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(MAX_PENDING);
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => return,
                permit = pending.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept_one() => match accepted {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let identified = identify(stream);
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(stream) = identified.await {
                    // The server is gone when this fails; the stream closes.
                    let _ = tx.send(Ok(stream)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The Unix socket: every connection's uid is read with SO_PEERCRED and
/// given a role from the live config; a uid without one is answered
/// PERMISSION_DENIED. Each stream is read through [`AuthorityFix`], so
/// stock gRPC clients' `:authority` (the socket path) reaches h2 as
/// `localhost`.
pub fn unix(
    listener: UnixListener,
    admission: Admission,
    users: Arc<dyn UserDirectory>,
    cancel: CancellationToken,
) -> Incoming<AuthorityFix<UnixStream>> {
    accept_loop(
        listener,
        move |stream: UnixStream| {
            let config = admission.config.borrow().clone();
            let admission = admission.clone();
            let users = users.clone();
            async move {
                let cred = match stream.peer_cred() {
                    Ok(cred) => cred,
                    Err(error) => {
                        tracing::warn!(target: "audit", %error, "connection closed: cannot read its peer credentials");
                        return None;
                    }
                };
                let (uid, pid) = (cred.uid(), cred.pid());
                let group = config.operator.group.clone();
                let lookup = tokio::task::spawn_blocking(move || {
                    local_peer(uid, pid, &config, users.as_ref())
                });
                let stream = AuthorityFix::new(stream);
                match tokio::time::timeout(IDENTIFY_TIMEOUT, lookup).await {
                    Ok(Ok(Some(peer))) => admission.admit(stream, peer),
                    Ok(Ok(None)) => {
                        tracing::warn!(
                            target: "audit",
                            uid,
                            pid,
                            "connection refused: uid {uid} is not root, not in control_plane.uids and not a member of group {group}"
                        );
                        admission.refusals.answer(stream, not_allowed(uid, &group));
                        None
                    }
                    Ok(Err(error)) => {
                        tracing::error!(target: "audit", uid, %error, "connection closed: the user lookup failed");
                        None
                    }
                    Err(_) => {
                        tracing::error!(target: "audit", uid, "connection closed: the user lookup took over {} s", IDENTIFY_TIMEOUT.as_secs());
                        None
                    }
                }
            }
        },
        cancel,
    )
}

/// The answer to a local uid without a role. The CLI recognises it by its
/// code and shows the message as is.
pub fn not_allowed(uid: u32, group: &str) -> tonic::Status {
    tonic::Status::permission_denied(format!(
        "uid {uid} may not use instance-agent: only root, the uids in control_plane.uids and \
         members of the group {group} (operator.group) may"
    ))
}

/// The control-plane listener over mutual TLS: a client must complete the
/// handshake with a certificate that chains to `client_ca` and, when
/// `allowed_names` is not empty, carries one of them. It is then admin.
/// Before the handshake, [`Handshakes`] admits the connection by source and
/// it must speak within [`FIRST_BYTE_TIMEOUT`].
pub fn tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    allowed_names: Vec<String>,
    admission: Admission,
    cancel: CancellationToken,
) -> Incoming<TlsStream<TcpStream>> {
    let acceptor = TlsAcceptor::from(config);
    let allowed_names = Arc::new(allowed_names);
    let handshakes = Handshakes::new();
    accept_loop(
        listener,
        move |stream: TcpStream| {
            let acceptor = acceptor.clone();
            let allowed_names = allowed_names.clone();
            let handshakes = handshakes.clone();
            let admission = admission.clone();
            async move {
                let addr = stream.peer_addr().ok()?;
                let source = Source::of(addr.ip());
                let _pending = match handshakes.admit(source) {
                    Ok(pending) => pending,
                    Err(refused) => {
                        tracing::warn!(target: "audit", %addr, %source, "control-plane connection refused: {refused}");
                        return None;
                    }
                };
                if !first_byte(&stream).await {
                    tracing::info!(target: "audit", %addr, "control-plane connection closed: it sent nothing within {} s", FIRST_BYTE_TIMEOUT.as_secs());
                    return None;
                }
                // gRPC sends many small frames: no Nagle delay.
                let _ = stream.set_nodelay(true);
                let handshake = acceptor
                    .accept(stream)
                    .into_fallible()
                    .instrument(tracing::info_span!("control_plane", %addr));
                let tls = match tokio::time::timeout(IDENTIFY_TIMEOUT, handshake).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err((error, stream))) => {
                        tracing::warn!(target: "audit", %addr, %error, "control-plane connection refused: TLS handshake failed");
                        close_after_alert(stream).await;
                        return None;
                    }
                    Err(_) => {
                        tracing::warn!(target: "audit", %addr, "control-plane connection refused: TLS handshake took over {} s", IDENTIFY_TIMEOUT.as_secs());
                        return None;
                    }
                };
                let names = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(certificate_names)
                    .unwrap_or_default();
                match allowed_name(&names, &allowed_names) {
                    Some(name) => {
                        handshakes.completed(source);
                        let peer = Peer {
                            role: Role::Admin,
                            who: Who::Certificate { name, addr },
                        };
                        admission.admit(tls, peer)
                    }
                    None => {
                        tracing::warn!(
                            target: "audit",
                            %addr,
                            ?names,
                            "control-plane connection refused: no certificate name is in control_plane.allowed_client_names"
                        );
                        None
                    }
                }
            }
        },
        cancel,
    )
}

/// Whether the client sends something (or closes) within
/// [`FIRST_BYTE_TIMEOUT`]; a TLS or HTTP/2 client always speaks first.
/// Peeked, not awaited as readiness: `readable()` may report a new socket
/// ready before a byte arrives (tokio documents such false positives).
async fn first_byte(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut byte))
        .await
        .is_ok_and(|peeked| peeked.is_ok())
}

/// Closes a connection whose handshake failed so that the client reads the
/// TLS alert that says why (certificate required, unknown CA, expired,
/// access denied): a FIN after the alert, then what the client still sends
/// is read and dropped for a moment. Closing at once with unread bytes (a
/// TLS 1.3 client sends its HTTP/2 preface right after its half of the
/// handshake) would send a TCP reset, which makes the client drop the alert
/// and report only "connection closed".
async fn close_after_alert(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left = LINGER_MAX_BYTES;
    let drain = async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// The plaintext loopback listener (`insecure_plaintext`): every client is
/// admin. For local testing only; the daemon warns at every start.
pub fn plaintext(
    listener: TcpListener,
    admission: Admission,
    cancel: CancellationToken,
) -> Incoming<TcpStream> {
    accept_loop(
        listener,
        move |stream: TcpStream| {
            let admission = admission.clone();
            async move {
                let addr: SocketAddr = stream.peer_addr().ok()?;
                if !first_byte(&stream).await {
                    return None;
                }
                let _ = stream.set_nodelay(true);
                let peer = Peer {
                    role: Role::Admin,
                    who: Who::Plaintext { addr },
                };
                admission.admit(stream, peer)
            }
        },
        cancel,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    #[tokio::test]
    async fn a_connection_that_speaks_passes_the_first_byte_check() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = pair().await;
        client.write_all(b"\x16").await.expect("write");
        assert!(first_byte(&server).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_the_first_byte_check_at_its_timeout() {
        // Before: a new socket's readiness passed the check at once.
        let (_client, server) = pair().await;
        let started = tokio::time::Instant::now();
        assert!(!first_byte(&server).await);
        assert_eq!(started.elapsed(), FIRST_BYTE_TIMEOUT);
    }
}

//! An agent with its mutual-TLS control-plane listener, a client with a
//! certificate it accepts, and silent connections to flood the listener's
//! pending handshakes with (`tests/floods.rs`, `tests/ipv6_flood.rs`).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use instance_agent::api::proto::{self, agent_service_client::AgentServiceClient};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::Agent;
use super::certs::{Ca, write_file};

/// The agent and what its control-plane clients need.
pub struct TlsControlPlane {
    pub agent: Agent,
    pub port: u16,
    ca: Ca,
    client: (String, String),
    _dir: tempfile::TempDir,
}

impl TlsControlPlane {
    /// Starts an agent whose control plane listens on `listen` (an address
    /// and port, e.g. `[::]:7443`), with a server certificate for
    /// `localhost`.
    pub fn start(listen: &str, port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new("flood-ca");
        let (server_cert, server_key) = ca.leaf("agent", &["localhost"], false, false);
        let client = ca.leaf("control-plane", &[], true, false);
        let agent = Agent::builder()
            .config(&format!(
                "[control_plane]\nlisten = {listen:?}\ntls_cert = {:?}\ntls_key = {:?}\nclient_ca = {:?}\n",
                write_file(dir.path(), "agent.pem", &server_cert, 0o644),
                write_file(dir.path(), "agent.key", &server_key, 0o600),
                write_file(dir.path(), "ca.pem", &ca.pem(), 0o644),
            ))
            .start();
        Self {
            agent,
            port,
            ca,
            client,
            _dir: dir,
        }
    }

    /// GetStatus from the control plane's client over a new connection to
    /// `target` (from whatever source the kernel picks for it); its answer
    /// time, or why it failed (within 20 s).
    pub async fn call(&self, target: SocketAddr) -> Result<Duration, String> {
        let started = Instant::now();
        tls_get_status(
            target,
            &self.ca.pem(),
            Some(&self.client),
            Duration::from_secs(20),
        )
        .await?;
        Ok(started.elapsed())
    }
}

/// GetStatus over TLS to `target` (the server named `localhost`, signed by
/// `server_ca`), with `identity` as the client certificate; `Err` carries
/// the failure, `timeout` bounds the connection and the call.
pub async fn tls_get_status(
    target: SocketAddr,
    server_ca: &str,
    identity: Option<&(String, String)>,
    timeout: Duration,
) -> Result<proto::GetStatusResponse, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{target}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls config")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    AgentServiceClient::new(channel)
        .get_status(proto::GetStatusRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|e| format!("call: {e:?}"))
}

/// Keeps `per_source` silent connections from `source` to `target` open
/// (opening a new one when the agent closes one) until `stop`.
pub fn silent_connections(
    source: IpAddr,
    target: SocketAddr,
    per_source: usize,
    stop: tokio_util::sync::CancellationToken,
) {
    for _ in 0..per_source {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let socket = match source {
                    IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                    IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
                }
                .expect("socket");
                socket
                    .bind(SocketAddr::new(source, 0))
                    .expect("bind the source");
                let Ok(mut stream) = socket.connect(target).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                use tokio::io::AsyncReadExt;
                let mut byte = [0u8; 1];
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = stream.read(&mut byte) => {}
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
}

/// Waits until something listens on `addr`.
pub async fn listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

//! Health probes: the narrow trait ([`Prober`]) and its real implementation
//! on loopback sockets. An HTTP probe sends one `GET` with
//! `Connection: close` and reads only the status line; a TCP probe connects.
//! Each is bounded by the probe's timeout (tokio time, so tests pause it).

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeTarget {
    /// `GET path` at `addr`; `min..=max` is healthy.
    Http {
        /// Host address and port.
        addr: SocketAddr,
        /// Request path.
        path: String,
        /// Lowest healthy status.
        min: u32,
        /// Highest healthy status.
        max: u32,
    },
    /// A TCP connect to `addr`.
    Tcp {
        /// Host address and port.
        addr: SocketAddr,
    },
}

/// One probe's outcome (latency is measured by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// Healthy or not.
    pub healthy: bool,
    /// The HTTP status, when one came back.
    pub status_code: Option<u32>,
    /// What went wrong; empty when healthy.
    pub error: String,
}

impl ProbeOutcome {
    fn failed(error: impl Into<String>) -> Self {
        Self {
            healthy: false,
            status_code: None,
            error: error.into(),
        }
    }
}

/// Runs probes.
#[async_trait]
pub trait Prober: Send + Sync + 'static {
    /// Probes `target` within `timeout`.
    async fn probe(&self, target: &ProbeTarget, timeout: Duration) -> ProbeOutcome;
}

/// Probes over real sockets.
pub struct SocketProber;

#[async_trait]
impl Prober for SocketProber {
    async fn probe(&self, target: &ProbeTarget, timeout: Duration) -> ProbeOutcome {
        match tokio::time::timeout(timeout, probe_once(target)).await {
            Ok(outcome) => outcome,
            Err(_) => ProbeOutcome::failed(format!("timed out after {}s", timeout.as_secs_f32())),
        }
    }
}

/// The longest status line read; anything longer is not HTTP.
const MAX_STATUS_LINE: usize = 256;

async fn probe_once(target: &ProbeTarget) -> ProbeOutcome {
    let addr = match target {
        ProbeTarget::Http { addr, .. } | ProbeTarget::Tcp { addr } => *addr,
    };
    let mut stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return ProbeOutcome::failed(format!("connection refused on {addr}"));
        }
        Err(e) => return ProbeOutcome::failed(format!("cannot connect to {addr}: {e}")),
    };
    let ProbeTarget::Http { path, min, max, .. } = target else {
        return ProbeOutcome {
            healthy: true,
            status_code: None,
            error: String::new(),
        };
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: instance-agent-probe\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return ProbeOutcome::failed(format!("cannot send the request: {e}"));
    }
    let mut line = Vec::with_capacity(64);
    let mut buf = [0u8; 128];
    while !line.contains(&b'\n') && line.len() < MAX_STATUS_LINE {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e) => return ProbeOutcome::failed(format!("cannot read the answer: {e}")),
        }
    }
    classify(&line, *min, *max)
}

/// The outcome of an HTTP answer starting with `head`.
fn classify(head: &[u8], min: u32, max: u32) -> ProbeOutcome {
    let text = String::from_utf8_lossy(head);
    let first = text.lines().next().unwrap_or_default();
    let mut words = first.split_whitespace();
    let status = match (
        words.next(),
        words.next().and_then(|s| s.parse::<u32>().ok()),
    ) {
        (Some(version), Some(status)) if version.starts_with("HTTP/") => status,
        _ if head.is_empty() => {
            return ProbeOutcome::failed("connection closed without an answer");
        }
        _ => return ProbeOutcome::failed(format!("not an HTTP answer: {first:?}")),
    };
    let healthy = (min..=max).contains(&status);
    ProbeOutcome {
        healthy,
        status_code: Some(status),
        error: if healthy {
            String::new()
        } else {
            format!("status {status} outside {min}-{max}")
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert!(classify(b"HTTP/1.1 200 OK\r\n", 200, 399).healthy);
        let not_found = classify(b"HTTP/1.0 404 Not Found\r\n", 200, 399);
        assert!(!not_found.healthy, "a 404 is not healthy");
        assert_eq!(not_found.status_code, Some(404));
        assert_eq!(not_found.error, "status 404 outside 200-399");
        assert!(!classify(b"HTTP/1.1 500 Oops\r\n", 200, 399).healthy);
        assert_eq!(
            classify(b"", 200, 399).error,
            "connection closed without an answer"
        );
        assert!(
            classify(b"SSH-2.0-x\r\n", 200, 399)
                .error
                .starts_with("not an HTTP")
        );
    }

    #[tokio::test]
    async fn real_sockets_answer_and_refuse() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for status in ["204 No Content", "404 Not Found"] {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = socket.read(&mut buf).await.unwrap();
                socket
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let target = ProbeTarget::Http {
            addr,
            path: "/health".into(),
            min: 200,
            max: 399,
        };
        let timeout = Duration::from_secs(2);
        assert!(SocketProber.probe(&target, timeout).await.healthy);
        let outcome = SocketProber.probe(&target, timeout).await;
        assert_eq!(outcome.status_code, Some(404));
        server.await.unwrap();
        // Nothing listens any more.
        let refused = SocketProber
            .probe(&ProbeTarget::Tcp { addr }, timeout)
            .await;
        assert!(
            refused.error.starts_with("connection refused"),
            "{refused:?}"
        );
    }
}

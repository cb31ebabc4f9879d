//! The narrow interface the agent needs from a container engine, and its
//! implementation on the Docker Engine API through bollard.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use tokio::sync::Mutex;

/// A call to the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine did not answer (socket missing, refused, or timed out).
    #[error("docker engine at {socket} is unreachable: {message}")]
    Unreachable {
        /// The engine's socket.
        socket: PathBuf,
        /// What the client saw.
        message: String,
    },
    /// The engine answered with an error.
    #[error("docker engine refused {operation}: {message}")]
    Api {
        /// What was asked.
        operation: &'static str,
        /// The engine's message.
        message: String,
    },
}

/// What the engine says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineVersion {
    /// Engine version, e.g. "20.10.24".
    pub version: String,
    /// API version in use after negotiation, e.g. "1.41".
    pub api_version: String,
}

/// The container engine as the agent uses it.
#[async_trait]
pub trait ContainerEngine: Send + Sync + 'static {
    /// The engine's version; doubles as a health check.
    async fn version(&self) -> Result<EngineVersion, EngineError>;
}

/// The Docker engine on a local Unix socket. Negotiates the API version on
/// (re)connect, since engines both older and newer than bollard's default
/// must work, and reconnects after the engine restarts.
pub struct DockerEngine {
    socket: PathBuf,
    timeout: Duration,
    client: Mutex<Option<Docker>>,
}

impl DockerEngine {
    /// An engine at `socket`; nothing is connected until the first call.
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        Self {
            socket: socket.to_owned(),
            timeout,
            client: Mutex::new(None),
        }
    }

    /// The connected client, connecting and negotiating first if needed.
    pub async fn client(&self) -> Result<Docker, EngineError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let socket = self.socket.to_string_lossy();
        let client = Docker::connect_with_unix(
            &socket,
            self.timeout.as_secs().max(1),
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| self.unreachable(e))?;
        let client = tokio::time::timeout(self.timeout, client.negotiate_version())
            .await
            .map_err(|_| self.unreachable("timed out negotiating the API version"))?
            .map_err(|e| self.unreachable(e))?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Maps a bollard error; a transport failure drops the client so the next
    /// call reconnects and renegotiates (the engine may have been upgraded).
    pub async fn map_error(
        &self,
        operation: &'static str,
        error: bollard::errors::Error,
    ) -> EngineError {
        use bollard::errors::Error as E;
        match error {
            E::DockerResponseServerError { message, .. } => EngineError::Api { operation, message },
            other => {
                *self.client.lock().await = None;
                self.unreachable(other)
            }
        }
    }

    fn unreachable(&self, message: impl ToString) -> EngineError {
        EngineError::Unreachable {
            socket: self.socket.clone(),
            message: message.to_string(),
        }
    }
}

#[async_trait]
impl ContainerEngine for DockerEngine {
    async fn version(&self) -> Result<EngineVersion, EngineError> {
        let client = self.client().await?;
        match tokio::time::timeout(self.timeout, client.version()).await {
            Ok(Ok(v)) => Ok(EngineVersion {
                version: v.version.unwrap_or_default(),
                api_version: client.client_version().to_string(),
            }),
            Ok(Err(e)) => Err(self.map_error("version", e).await),
            Err(_) => {
                *self.client.lock().await = None;
                Err(self.unreachable(format!("no answer within {:?}", self.timeout)))
            }
        }
    }
}

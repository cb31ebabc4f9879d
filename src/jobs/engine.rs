//! The narrow interface the agent needs from a container engine, and its
//! implementation on the Docker Engine API through bollard.
//!
//! Every call is bounded by the configured request timeout except the two
//! that wait by design (`wait` and `logs`), so that a hung engine can never
//! hold an RPC: callers that wait do so in their own task.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bytes::Bytes;
use tokio::sync::Mutex;
use tokio_stream::{Stream, StreamExt};

/// A call to the engine failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The engine did not answer (socket missing, refused, or timed out).
    #[error("docker engine at {socket} is unreachable: {message}")]
    Unreachable {
        /// The engine's socket.
        socket: PathBuf,
        /// What the client saw.
        message: String,
    },
    /// The container or image does not exist.
    #[error("docker: no such {what}: {name}")]
    NotFound {
        /// "container" or "image".
        what: &'static str,
        /// Its name or id.
        name: String,
    },
    /// A container with that name already exists.
    #[error("docker: container name {0} is already in use")]
    NameInUse(String),
    /// The engine answered with an error.
    #[error("docker engine refused {operation}: {message}")]
    Api {
        /// What was asked.
        operation: &'static str,
        /// The engine's message.
        message: String,
    },
}

impl EngineError {
    /// True when retrying later may succeed (the engine is down or restarting).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, EngineError::Unreachable { .. })
    }
}

/// What the engine says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineVersion {
    /// Engine version, e.g. "20.10.24".
    pub version: String,
    /// API version in use after negotiation, e.g. "1.41".
    pub api_version: String,
}

/// A host directory bound into a container.
#[derive(Debug, Clone, PartialEq)]
pub struct Bind {
    /// Host path (already confined and resolved).
    pub source: PathBuf,
    /// Path in the container.
    pub target: String,
    /// Read-only.
    pub read_only: bool,
}

/// Everything needed to create a job's container.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContainerSpec {
    /// Unique container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// argv.
    pub command: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Working directory; image default when empty.
    pub working_dir: String,
    /// Labels (instance and job ids among them).
    pub labels: HashMap<String, String>,
    /// Memory limit in bytes (0 = none).
    pub memory_bytes: u64,
    /// CPU limit in billionths of a core (0 = none).
    pub nano_cpus: u64,
    /// Process limit (0 = none).
    pub pids_limit: u32,
    /// Network mode.
    pub network: String,
    /// Bind mounts.
    pub binds: Vec<Bind>,
    /// GPU indices for an NVIDIA device request; none when empty.
    pub gpus: Vec<u32>,
    /// Cap of the engine's own copy of the output (json-file max-size).
    pub log_max_bytes: u64,
}

/// A container as the engine reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerStatus {
    /// Container id.
    pub id: String,
    /// "created", "running", "exited", ...
    pub status: String,
    /// Running (or paused or restarting: anything not yet exited).
    pub running: bool,
    /// Exit status once exited.
    pub exit_code: Option<i64>,
    /// Killed by the OOM killer.
    pub oom_killed: bool,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// The engine's error, e.g. why start failed.
    pub error: String,
}

/// A container found by label.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerListing {
    /// Container id.
    pub id: String,
    /// "created", "running", "exited", ...
    pub state: String,
    /// Labels.
    pub labels: HashMap<String, String>,
}

/// Which stream a log frame came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A piece of a container's output.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputFrame {
    /// Which stream.
    pub stream: OutputStream,
    /// When the engine captured it, nanoseconds since the epoch.
    pub time_nanos: i64,
    /// The bytes.
    pub data: Bytes,
}

/// A stream of output frames, ending when the container has exited.
pub type OutputStreamBox = Pin<Box<dyn Stream<Item = Result<OutputFrame, EngineError>> + Send>>;

/// The container engine as the job runner uses it.
#[async_trait]
pub trait ContainerEngine: Send + Sync + 'static {
    /// The engine's version; doubles as a health check.
    async fn version(&self) -> Result<EngineVersion, EngineError>;
    /// Creates a container; `NameInUse` when the name exists.
    async fn create(&self, spec: &ContainerSpec) -> Result<String, EngineError>;
    /// Starts a created container.
    async fn start(&self, id: &str) -> Result<(), EngineError>;
    /// Waits until the container has exited and returns its exit status.
    async fn wait(&self, id: &str) -> Result<i64, EngineError>;
    /// The container's status; `None` when it does not exist.
    async fn inspect(&self, id_or_name: &str) -> Result<Option<ContainerStatus>, EngineError>;
    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), EngineError>;
    /// Removes the container, running or not; absent is fine.
    async fn remove(&self, id: &str) -> Result<(), EngineError>;
    /// Every container (in any state) carrying `label=value`.
    async fn list(&self, label: &str, value: &str) -> Result<Vec<ContainerListing>, EngineError>;
    /// The container's output after `since_nanos`; with `follow`, until it
    /// exits, else what the engine holds now.
    async fn output(
        &self,
        id: &str,
        since_nanos: i64,
        follow: bool,
    ) -> Result<OutputStreamBox, EngineError>;
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

    /// The engine's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The connected client, connecting and negotiating first if needed.
    pub async fn client(&self) -> Result<Docker, EngineError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let socket = self.socket.to_string_lossy();
        // The client's own timeout bounds waits too, so it is set far above
        // the request timeout; each bounded call gets `self.timeout` below.
        let client = Docker::connect_with_unix(&socket, 24 * 3600, bollard::API_DEFAULT_VERSION)
            .map_err(|e| self.unreachable(e))?;
        let client = tokio::time::timeout(self.timeout, client.negotiate_version())
            .await
            .map_err(|_| self.unreachable("timed out negotiating the API version"))?
            .map_err(|e| self.unreachable(e))?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Runs one bounded call, mapping its errors.
    async fn call<T>(
        &self,
        operation: &'static str,
        name: &str,
        call: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(self.map_error(operation, name, error).await),
            Err(_) => {
                *self.client.lock().await = None;
                Err(self.unreachable(format!(
                    "{operation} got no answer within {:?}",
                    self.timeout
                )))
            }
        }
    }

    /// Maps a bollard error; a transport failure drops the client so the next
    /// call reconnects and renegotiates (the engine may have been upgraded).
    pub async fn map_error(
        &self,
        operation: &'static str,
        name: &str,
        error: bollard::errors::Error,
    ) -> EngineError {
        use bollard::errors::Error as E;
        match error {
            E::DockerResponseServerError {
                status_code: 404, ..
            } => EngineError::NotFound {
                what: if operation == "create" {
                    "image"
                } else {
                    "container"
                },
                name: name.to_owned(),
            },
            E::DockerResponseServerError {
                status_code: 409,
                message,
            } if operation == "create" => {
                if message.contains("already in use") {
                    EngineError::NameInUse(name.to_owned())
                } else {
                    EngineError::Api { operation, message }
                }
            }
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

/// Binds in the engine's `source:target:ro|rw` form (jobs and apps).
pub(crate) fn bind_strings(binds: &[Bind]) -> Vec<String> {
    binds
        .iter()
        .map(|b| {
            format!(
                "{}:{}:{}",
                b.source.display(),
                b.target,
                if b.read_only { "ro" } else { "rw" }
            )
        })
        .collect()
}

/// The NVIDIA device request for `gpus`; none when empty (jobs and apps).
pub(crate) fn gpu_requests(gpus: &[u32]) -> Option<Vec<bollard::models::DeviceRequest>> {
    (!gpus.is_empty()).then(|| {
        vec![bollard::models::DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(gpus.iter().map(u32::to_string).collect()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    })
}

fn create_body(spec: &ContainerSpec) -> bollard::models::ContainerCreateBody {
    use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
    let positive = |n: u64| (n > 0).then(|| i64::try_from(n).unwrap_or(i64::MAX));
    let binds = bind_strings(&spec.binds);
    let device_requests = gpu_requests(&spec.gpus);
    // The engine's copy only bridges agent restarts (the agent copies output
    // as it comes); two files let `logs --follow` cross a rotation.
    let log_size = spec.log_max_bytes.max(8 << 20);
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: Some(spec.command.clone()),
        env: Some(spec.env.clone()),
        working_dir: (!spec.working_dir.is_empty()).then(|| spec.working_dir.clone()),
        labels: Some(spec.labels.clone()),
        attach_stdin: Some(false),
        open_stdin: Some(false),
        tty: Some(false),
        host_config: Some(HostConfig {
            memory: positive(spec.memory_bytes),
            // No swap beyond the memory limit: an OOM kill is a clear
            // failure, thrashing is not.
            memory_swap: positive(spec.memory_bytes),
            nano_cpus: positive(spec.nano_cpus),
            pids_limit: positive(spec.pids_limit.into()),
            network_mode: Some(spec.network.clone()),
            privileged: Some(false),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            binds: (!binds.is_empty()).then_some(binds),
            device_requests,
            auto_remove: Some(false),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), log_size.to_string()),
                    ("max-file".to_owned(), "2".to_owned()),
                ])),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Parses the RFC 3339 timestamp Docker prefixes to each log line.
fn split_timestamp(message: &Bytes) -> (i64, Bytes) {
    if let Some(space) = message.iter().position(|&b| b == b' ')
        && let Ok(text) = std::str::from_utf8(&message[..space])
        && let Ok(time) = chrono::DateTime::parse_from_rfc3339(text)
    {
        return (
            time.timestamp_nanos_opt().unwrap_or(0),
            message.slice(space + 1..),
        );
    }
    (0, message.clone())
}

#[async_trait]
impl ContainerEngine for DockerEngine {
    async fn version(&self) -> Result<EngineVersion, EngineError> {
        let client = self.client().await?;
        let v = self.call("version", "", client.version()).await?;
        Ok(EngineVersion {
            version: v.version.unwrap_or_default(),
            api_version: client.client_version().to_string(),
        })
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, EngineError> {
        let client = self.client().await?;
        let options = bollard::query_parameters::CreateContainerOptions {
            name: Some(spec.name.clone()),
            platform: String::new(),
        };
        let created = self
            .call(
                "create",
                &spec.name,
                client.create_container(Some(options), create_body(spec)),
            )
            .await
            .map_err(|e| match e {
                EngineError::NotFound { .. } => EngineError::NotFound {
                    what: "image",
                    name: spec.image.clone(),
                },
                other => other,
            })?;
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> Result<(), EngineError> {
        let client = self.client().await?;
        self.call("start", id, client.start_container(id, None))
            .await
    }

    async fn wait(&self, id: &str) -> Result<i64, EngineError> {
        let client = self.client().await?;
        let mut stream = client.wait_container(id, None);
        match stream.next().await {
            Some(Ok(response)) => Ok(response.status_code),
            // Docker reports a non-zero exit as an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(error)) => Err(self.map_error("wait", id, error).await),
            None => Err(self.unreachable("wait stream ended without a status")),
        }
    }

    async fn inspect(&self, id_or_name: &str) -> Result<Option<ContainerStatus>, EngineError> {
        let client = self.client().await?;
        match self
            .call(
                "inspect",
                id_or_name,
                client.inspect_container(id_or_name, None),
            )
            .await
        {
            Ok(info) => {
                let state = info.state.unwrap_or_default();
                let status = state.status.map(|s| s.to_string()).unwrap_or_default();
                let running = matches!(status.as_str(), "running" | "paused" | "restarting");
                Ok(Some(ContainerStatus {
                    id: info.id.unwrap_or_default(),
                    running,
                    exit_code: (!running && status != "created")
                        .then_some(state.exit_code.unwrap_or(0)),
                    status,
                    oom_killed: state.oom_killed.unwrap_or(false),
                    labels: info.config.and_then(|c| c.labels).unwrap_or_default(),
                    error: state.error.unwrap_or_default(),
                }))
            }
            Err(EngineError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), EngineError> {
        let client = self.client().await?;
        let options = bollard::query_parameters::StopContainerOptions {
            signal: None,
            t: Some(i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)),
        };
        // The engine waits `grace` before SIGKILL, so this call may take that long.
        let bounded = grace + self.timeout;
        match tokio::time::timeout(bounded, client.stop_container(id, Some(options))).await {
            Ok(Ok(())) => Ok(()),
            // 304: already stopped.
            Ok(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            })) => Ok(()),
            Ok(Err(e)) => Err(self.map_error("stop", id, e).await),
            Err(_) => Err(self.unreachable(format!("stop got no answer within {bounded:?}"))),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), EngineError> {
        let client = self.client().await?;
        let options = bollard::query_parameters::RemoveContainerOptions {
            v: true,
            force: true,
            link: false,
        };
        match self
            .call("remove", id, client.remove_container(id, Some(options)))
            .await
        {
            Ok(()) | Err(EngineError::NotFound { .. }) => Ok(()),
            // Already being removed by someone else.
            Err(EngineError::Api { message, .. }) if message.contains("already in progress") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn list(&self, label: &str, value: &str) -> Result<Vec<ContainerListing>, EngineError> {
        let client = self.client().await?;
        let options = bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_owned(),
                vec![format!("{label}={value}")],
            )])),
            ..Default::default()
        };
        let listed = self
            .call("list", label, client.list_containers(Some(options)))
            .await?;
        Ok(listed
            .into_iter()
            .map(|c| ContainerListing {
                id: c.id.unwrap_or_default(),
                state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                labels: c.labels.unwrap_or_default(),
            })
            .collect())
    }

    async fn output(
        &self,
        id: &str,
        since_nanos: i64,
        follow: bool,
    ) -> Result<OutputStreamBox, EngineError> {
        let id = id.to_owned();
        let socket = self.socket.clone();
        let client = self.client().await?;
        let stream = async_stream::stream! {
            let options = bollard::query_parameters::LogsOptions {
                follow,
                stdout: true,
                stderr: true,
                timestamps: true,
                // Whole seconds only: frames at or before since_nanos are skipped below.
                since: i32::try_from(since_nanos / 1_000_000_000).unwrap_or(0),
                ..Default::default()
            };
            let mut logs = client.logs(&id, Some(options));
            while let Some(item) = logs.next().await {
                match item {
                    Ok(output) => {
                        let (stream, message) = match output {
                            bollard::container::LogOutput::StdOut { message } => (OutputStream::Stdout, message),
                            bollard::container::LogOutput::StdErr { message } => (OutputStream::Stderr, message),
                            bollard::container::LogOutput::Console { message } => (OutputStream::Stdout, message),
                            bollard::container::LogOutput::StdIn { .. } => continue,
                        };
                        let (time_nanos, data) = split_timestamp(&message);
                        if time_nanos != 0 && time_nanos <= since_nanos {
                            continue;
                        }
                        yield Ok(OutputFrame { stream, time_nanos, data });
                    }
                    Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                        yield Err(EngineError::NotFound { what: "container", name: id.clone() });
                        return;
                    }
                    Err(error) => {
                        yield Err(EngineError::Unreachable { socket: socket.clone(), message: error.to_string() });
                        return;
                    }
                }
            }
        };
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_is_locked_down() {
        let spec = ContainerSpec {
            name: "n".into(),
            image: "busybox".into(),
            command: vec!["true".into()],
            memory_bytes: 64 << 20,
            nano_cpus: 500_000_000,
            network: "none".into(),
            gpus: vec![0, 2],
            binds: vec![Bind {
                source: "/mnt/data".into(),
                target: "/data".into(),
                read_only: true,
            }],
            ..Default::default()
        };
        let body = create_body(&spec);
        let host = body.host_config.unwrap();
        assert_eq!(host.privileged, Some(false));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges:true".to_owned()])
        );
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, Some(64 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.binds, Some(vec!["/mnt/data:/data:ro".to_owned()]));
        let gpus = &host.device_requests.unwrap()[0];
        assert_eq!(gpus.device_ids, Some(vec!["0".to_owned(), "2".to_owned()]));
        assert_eq!(gpus.capabilities, Some(vec![vec!["gpu".to_owned()]]));
    }

    #[test]
    fn docker_timestamps_are_split_off() {
        let (nanos, data) = split_timestamp(&Bytes::from_static(
            b"2026-11-27T10:00:00.000000001Z hello\n",
        ));
        assert_eq!(data, Bytes::from_static(b"hello\n"));
        assert_eq!(nanos % 1_000_000_000, 1);
        let (nanos, data) = split_timestamp(&Bytes::from_static(b"no timestamp"));
        assert_eq!((nanos, data), (0, Bytes::from_static(b"no timestamp")));
    }
}

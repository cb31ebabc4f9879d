//! The narrow interface apps need from the container engine, and its
//! implementation on the Docker Engine API (bollard, through the jobs'
//! [`DockerEngine`] client).
//!
//! What differs from jobs: an app's container publishes ports (on a
//! user-defined bridge network, since `dockerd --bridge=none` has no
//! default `bridge` and `none` cannot publish). Images are not this trait's
//! business: they come through the images domain ([`super::images`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::jobs::engine::{
    Bind, ContainerEngine, ContainerListing, ContainerStatus, DockerEngine, EngineError,
    OutputStreamBox, bind_strings, gpu_requests,
};

/// A port published on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Port in the container.
    pub container_port: u32,
    /// Host address.
    pub host_ip: String,
    /// Host port (never 0 here: the agent picks it, so that it is known
    /// before the container starts and kept across restarts).
    pub host_port: u32,
}

/// Everything needed to create an app's container.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AppContainer {
    /// Unique container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// argv (image default when empty).
    pub command: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Labels (instance, app name, generation).
    pub labels: HashMap<String, String>,
    /// Memory limit (0 = none).
    pub memory_bytes: u64,
    /// CPU limit in billionths of a core (0 = none).
    pub nano_cpus: u64,
    /// The network joined.
    pub network: String,
    /// Bind mounts.
    pub binds: Vec<Bind>,
    /// GPU indices.
    pub gpus: Vec<u32>,
    /// Ports published.
    pub ports: Vec<Published>,
}

/// The engine as the app supervisor uses it.
#[async_trait]
pub trait AppEngine: Send + Sync + 'static {
    /// Creates the apps' network when it does not exist.
    async fn ensure_network(&self, name: &str) -> Result<(), EngineError>;
    /// Creates a container; `NameInUse` when the name exists.
    async fn create(&self, spec: &AppContainer) -> Result<String, EngineError>;
    /// Starts a created container (a published port in use fails here).
    async fn start(&self, id: &str) -> Result<(), EngineError>;
    /// Waits until the container has exited; its exit status.
    async fn wait(&self, id: &str) -> Result<i64, EngineError>;
    /// The container's status; `None` when it does not exist.
    async fn inspect(&self, id: &str) -> Result<Option<ContainerStatus>, EngineError>;
    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), EngineError>;
    /// Removes the container; absent is fine.
    async fn remove(&self, id: &str) -> Result<(), EngineError>;
    /// Every container carrying `label=value`.
    async fn list(&self, label: &str, value: &str) -> Result<Vec<ContainerListing>, EngineError>;
    /// The container's output (see [`ContainerEngine::output`]).
    async fn output(
        &self,
        id: &str,
        since_nanos: i64,
        follow: bool,
    ) -> Result<OutputStreamBox, EngineError>;
}

/// Apps on the Docker engine.
pub struct DockerApps {
    engine: Arc<DockerEngine>,
}

impl DockerApps {
    /// Apps through the jobs' engine client (one connection, one negotiation).
    pub fn new(engine: Arc<DockerEngine>) -> Self {
        Self { engine }
    }
}

/// The create body: locked down as jobs are (no privileges, no new
/// privileges), plus published ports.
fn create_body(spec: &AppContainer) -> bollard::models::ContainerCreateBody {
    use bollard::models::{
        ContainerCreateBody, HostConfig, HostConfigLogConfig, PortBinding, RestartPolicy,
        RestartPolicyNameEnum,
    };
    let positive = |n: u64| (n > 0).then(|| i64::try_from(n).unwrap_or(i64::MAX));
    let binds = bind_strings(&spec.binds);
    let mut port_bindings = HashMap::new();
    let mut exposed = Vec::new();
    for port in &spec.ports {
        let key = format!("{}/tcp", port.container_port);
        exposed.push(key.clone());
        port_bindings
            .entry(key)
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: Some(port.host_ip.clone()),
                host_port: Some(port.host_port.to_string()),
            });
    }
    let device_requests = gpu_requests(&spec.gpus);
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: Some(spec.env.clone()),
        labels: Some(spec.labels.clone()),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        tty: Some(false),
        host_config: Some(HostConfig {
            memory: positive(spec.memory_bytes),
            memory_swap: positive(spec.memory_bytes),
            nano_cpus: positive(spec.nano_cpus),
            network_mode: Some(spec.network.clone()),
            port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
            privileged: Some(false),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            binds: (!binds.is_empty()).then_some(binds),
            device_requests,
            // The agent restarts apps itself (with backoff and health);
            // the engine must not race it.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            auto_remove: Some(false),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), "8m".to_owned()),
                    ("max-file".to_owned(), "2".to_owned()),
                ])),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[async_trait]
impl AppEngine for DockerApps {
    async fn ensure_network(&self, name: &str) -> Result<(), EngineError> {
        let client = self.engine.client().await?;
        match client
            .inspect_network(
                name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(error) => return Err(self.engine.map_error("inspect network", name, error).await),
        }
        let request = bollard::models::NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".into()),
            labels: Some(HashMap::from([(
                super::LABEL_APP_NETWORK.to_owned(),
                "true".to_owned(),
            )])),
            options: Some(HashMap::from([
                // Apps do not talk to each other through the bridge.
                (
                    "com.docker.network.bridge.enable_icc".to_owned(),
                    "false".to_owned(),
                ),
                // Published ports bind loopback unless a port says otherwise.
                (
                    "com.docker.network.bridge.host_binding_ipv4".to_owned(),
                    "127.0.0.1".to_owned(),
                ),
            ])),
            ..Default::default()
        };
        match client.create_network(request).await {
            Ok(_) => Ok(()),
            // Created meanwhile by another start.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(error) => Err(self.engine.map_error("create network", name, error).await),
        }
    }

    async fn create(&self, spec: &AppContainer) -> Result<String, EngineError> {
        let client = self.engine.client().await?;
        let options = bollard::query_parameters::CreateContainerOptions {
            name: Some(spec.name.clone()),
            platform: String::new(),
        };
        match client
            .create_container(Some(options), create_body(spec))
            .await
        {
            Ok(created) => Ok(created.id),
            Err(error) => Err(
                match self.engine.map_error("create", &spec.name, error).await {
                    EngineError::NotFound { .. } => EngineError::NotFound {
                        what: "image",
                        name: spec.image.clone(),
                    },
                    other => other,
                },
            ),
        }
    }

    async fn start(&self, id: &str) -> Result<(), EngineError> {
        ContainerEngine::start(&*self.engine, id).await
    }

    async fn wait(&self, id: &str) -> Result<i64, EngineError> {
        self.engine.wait(id).await
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerStatus>, EngineError> {
        self.engine.inspect(id).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), EngineError> {
        self.engine.stop(id, grace).await
    }

    async fn remove(&self, id: &str) -> Result<(), EngineError> {
        self.engine.remove(id).await
    }

    async fn list(&self, label: &str, value: &str) -> Result<Vec<ContainerListing>, EngineError> {
        self.engine.list(label, value).await
    }

    async fn output(
        &self,
        id: &str,
        since_nanos: i64,
        follow: bool,
    ) -> Result<OutputStreamBox, EngineError> {
        self.engine.output(id, since_nanos, follow).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_publishes_on_the_given_address_and_is_locked_down() {
        let body = create_body(&AppContainer {
            name: "n".into(),
            image: "busybox".into(),
            network: "instance-agent-apps".into(),
            ports: vec![Published {
                container_port: 8080,
                host_ip: "127.0.0.1".into(),
                host_port: 41_000,
            }],
            ..Default::default()
        });
        assert_eq!(body.cmd, None, "the image's default command");
        let host = body.host_config.unwrap();
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.network_mode.as_deref(), Some("instance-agent-apps"));
        let bindings = host.port_bindings.unwrap();
        let binding = &bindings["8080/tcp"].as_ref().unwrap()[0];
        assert_eq!(binding.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(binding.host_port.as_deref(), Some("41000"));
        assert_eq!(
            host.restart_policy.unwrap().name,
            Some(bollard::models::RestartPolicyNameEnum::NO)
        );
    }
}

//! `AppService`: protobuf ⇄ app domain types, and app errors → status codes.

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::jobs::{mounts_from_proto, mounts_to_proto, sees_env_values};
use super::proto::{self, app_service_server::AppService};
use super::{LogChunkStream, timestamp};
use crate::apps::record::ProbeResult;
use crate::apps::spec::{HealthSpec, InferenceSpec, PortSpec, Probe, RestartPolicy};
use crate::apps::{AppError, AppManager, AppRecord, AppSpec, AppState, Rollout};
use crate::jobs::engine::{EngineError, OutputStream};

/// The app service.
pub struct AppApi {
    apps: AppManager,
}

impl AppApi {
    /// Serves `apps`.
    pub fn new(apps: AppManager) -> Self {
        Self { apps }
    }
}

/// The one place app errors become status codes.
pub fn status_of(error: AppError) -> Status {
    use crate::store::StoreError;
    let message = error.to_string();
    match error {
        AppError::InvalidSpec(_) => Status::invalid_argument(message),
        AppError::PortInUse(_) => Status::failed_precondition(message),
        AppError::NotFound(_) => Status::not_found(message),
        AppError::Removing(_) => Status::failed_precondition(message),
        AppError::TooMany { .. } => Status::resource_exhausted(message),
        AppError::NoContainer(_) => Status::failed_precondition(message),
        AppError::Engine(EngineError::NotFound { .. }) => Status::not_found(message),
        AppError::Engine(
            EngineError::Unreachable { .. } | EngineError::NameInUse(_) | EngineError::Api { .. },
        ) => Status::unavailable(message),
        AppError::Store(StoreError::NoSpace { .. }) => Status::resource_exhausted(message),
        AppError::Store(StoreError::Storage { .. }) => Status::internal(message),
    }
}

/// `app` as a caller sees it: env values redacted unless admin (as jobs).
pub fn app_for_caller(mut app: proto::App, sees_env_values: bool) -> proto::App {
    if !sees_env_values && let Some(spec) = app.spec.as_mut() {
        for value in spec.env.values_mut() {
            *value = crate::secret::REDACTED.to_owned();
        }
    }
    app
}

#[tonic::async_trait]
impl AppService for AppApi {
    async fn deploy_app(
        &self,
        request: Request<proto::DeployAppRequest>,
    ) -> Result<Response<proto::App>, Status> {
        let sees_env = sees_env_values(&request);
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: must be set"))?;
        let outcome = self
            .apps
            .deploy(spec_from_proto(spec)?)
            .await
            .map_err(status_of)?;
        let mut app = app_to_proto(&outcome.record);
        app.rollout = rollout_text(outcome.rollout);
        Ok(Response::new(app_for_caller(app, sees_env)))
    }

    async fn get_app(
        &self,
        request: Request<proto::GetAppRequest>,
    ) -> Result<Response<proto::App>, Status> {
        let sees_env = sees_env_values(&request);
        let record = self
            .apps
            .get(&request.into_inner().name)
            .map_err(status_of)?;
        Ok(Response::new(app_for_caller(
            app_to_proto(&record),
            sees_env,
        )))
    }

    async fn list_apps(
        &self,
        request: Request<proto::ListAppsRequest>,
    ) -> Result<Response<proto::ListAppsResponse>, Status> {
        let sees_env = sees_env_values(&request);
        let apps = self
            .apps
            .list()
            .iter()
            .map(|r| app_for_caller(app_to_proto(r), sees_env))
            .collect();
        Ok(Response::new(proto::ListAppsResponse { apps }))
    }

    async fn remove_app(
        &self,
        request: Request<proto::RemoveAppRequest>,
    ) -> Result<Response<proto::App>, Status> {
        let sees_env = sees_env_values(&request);
        let record = self
            .apps
            .remove(&request.into_inner().name)
            .await
            .map_err(status_of)?;
        Ok(Response::new(app_for_caller(
            app_to_proto(&record),
            sees_env,
        )))
    }

    async fn restart_app(
        &self,
        request: Request<proto::RestartAppRequest>,
    ) -> Result<Response<proto::App>, Status> {
        let sees_env = sees_env_values(&request);
        let record = self
            .apps
            .restart(&request.into_inner().name)
            .map_err(status_of)?;
        Ok(Response::new(app_for_caller(
            app_to_proto(&record),
            sees_env,
        )))
    }

    type StreamAppLogsStream = LogChunkStream;

    async fn stream_app_logs(
        &self,
        request: Request<proto::StreamAppLogsRequest>,
    ) -> Result<Response<Self::StreamAppLogsStream>, Status> {
        let request = request.into_inner();
        let frames = self
            .apps
            .logs(&request.name, request.follow)
            .await
            .map_err(status_of)?;
        let chunks = frames.map(|frame| match frame {
            Ok(frame) => Ok(proto::LogChunk {
                stream: match frame.stream {
                    OutputStream::Stdout => proto::LogStream::Stdout,
                    OutputStream::Stderr => proto::LogStream::Stderr,
                } as i32,
                data: frame.data.to_vec(),
                time: (frame.time_nanos > 0).then(|| pbjson_types::Timestamp {
                    seconds: frame.time_nanos.div_euclid(1_000_000_000),
                    nanos: i32::try_from(frame.time_nanos.rem_euclid(1_000_000_000)).unwrap_or(0),
                }),
            }),
            Err(error) => Err(Status::unavailable(format!(
                "cannot read the app's output: {error}"
            ))),
        });
        Ok(Response::new(Box::pin(chunks)))
    }
}

fn rollout_text(rollout: Rollout) -> String {
    rollout.describe().to_owned()
}

fn spec_from_proto(spec: proto::AppSpec) -> Result<AppSpec, Status> {
    let restart = match proto::RestartPolicy::try_from(spec.restart) {
        Ok(proto::RestartPolicy::Unspecified | proto::RestartPolicy::Always) => {
            RestartPolicy::Always
        }
        Ok(proto::RestartPolicy::OnFailure) => RestartPolicy::OnFailure,
        Ok(proto::RestartPolicy::Never) => RestartPolicy::Never,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "restart: {} is not a restart policy",
                spec.restart
            )));
        }
    };
    let health = spec.health.unwrap_or_default();
    let probe = match health.probe {
        None => Probe::None,
        Some(proto::health_check::Probe::Tcp(tcp)) => Probe::Tcp { port: tcp.port },
        Some(proto::health_check::Probe::Http(http)) => Probe::Http {
            port: http.port,
            path: http.path,
            status_min: http.min_status,
            status_max: http.max_status,
        },
    };
    Ok(AppSpec {
        name: spec.name,
        image: spec.image,
        command: spec.command,
        env: spec.env.into_iter().collect(),
        ports: spec
            .ports
            .into_iter()
            .map(|p| PortSpec {
                name: p.name,
                container_port: p.container_port,
                host_port: p.host_port,
                host_ip: p.host_ip,
            })
            .collect(),
        mounts: mounts_from_proto(spec.mounts)?,
        gpus: spec.gpus,
        memory_bytes: spec.memory_bytes,
        cpu_millis: spec.cpu_millis,
        slots: spec.slots,
        restart,
        health: HealthSpec {
            probe,
            interval_seconds: health.interval_seconds,
            timeout_seconds: health.timeout_seconds,
            failure_threshold: health.failure_threshold,
            success_threshold: health.success_threshold,
            startup_timeout_seconds: health.startup_timeout_seconds,
        },
        inference: spec.inference.map(|i| InferenceSpec {
            model_path: i.model_path.into(),
            entry_script: i.entry_script,
        }),
    })
}

fn spec_to_proto(spec: &AppSpec) -> proto::AppSpec {
    let h = &spec.health;
    proto::AppSpec {
        name: spec.name.clone(),
        image: spec.image.clone(),
        command: spec.command.clone(),
        env: spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        ports: spec
            .ports
            .iter()
            .map(|p| proto::AppPort {
                name: p.name.clone(),
                container_port: p.container_port,
                host_port: p.host_port,
                host_ip: p.host_ip.clone(),
            })
            .collect(),
        mounts: mounts_to_proto(&spec.mounts),
        gpus: spec.gpus,
        memory_bytes: spec.memory_bytes,
        cpu_millis: spec.cpu_millis,
        slots: spec.slots,
        restart: match spec.restart {
            RestartPolicy::Always => proto::RestartPolicy::Always,
            RestartPolicy::OnFailure => proto::RestartPolicy::OnFailure,
            RestartPolicy::Never => proto::RestartPolicy::Never,
        } as i32,
        health: Some(proto::HealthCheck {
            probe: match &h.probe {
                Probe::None => None,
                Probe::Tcp { port } => Some(proto::health_check::Probe::Tcp(proto::TcpCheck {
                    port: port.clone(),
                })),
                Probe::Http {
                    port,
                    path,
                    status_min,
                    status_max,
                } => Some(proto::health_check::Probe::Http(proto::HttpCheck {
                    port: port.clone(),
                    path: path.clone(),
                    min_status: *status_min,
                    max_status: *status_max,
                })),
            },
            interval_seconds: Some(h.interval()),
            timeout_seconds: Some(h.timeout()),
            failure_threshold: Some(h.failures()),
            success_threshold: Some(h.successes()),
            startup_timeout_seconds: Some(h.startup()),
        }),
        inference: spec.inference.as_ref().map(|i| proto::InferenceSpec {
            model_path: i.model_path.display().to_string(),
            entry_script: i.entry_script.clone(),
        }),
    }
}

fn state_to_proto(state: AppState) -> proto::AppState {
    match state {
        AppState::Pending => proto::AppState::Pending,
        AppState::Pulling => proto::AppState::Pulling,
        AppState::Starting => proto::AppState::Starting,
        AppState::Ready => proto::AppState::Ready,
        AppState::Unhealthy => proto::AppState::Unhealthy,
        AppState::Backoff => proto::AppState::Backoff,
        AppState::Stopped => proto::AppState::Stopped,
        AppState::Failed => proto::AppState::Failed,
    }
}

fn probe_to_proto(probe: &ProbeResult) -> proto::ProbeResult {
    proto::ProbeResult {
        time: Some(timestamp(probe.time)),
        healthy: probe.healthy,
        latency_micros: probe.latency_micros,
        status_code: probe.status_code.unwrap_or(0),
        error: probe.error.clone(),
    }
}

/// An app record as a protobuf `App` (without `rollout`).
pub fn app_to_proto(record: &AppRecord) -> proto::App {
    proto::App {
        spec: Some(spec_to_proto(&record.spec)),
        state: state_to_proto(record.state) as i32,
        reason: record.reason.clone(),
        endpoints: record
            .endpoints()
            .into_iter()
            .map(|(name, url)| proto::AppEndpoint { name, url })
            .collect(),
        restarts: record.restarts,
        last_probe: record.last_probe.as_ref().map(probe_to_proto),
        created: Some(timestamp(record.created)),
        updated: Some(timestamp(record.updated)),
        started: record.started.map(timestamp),
        image_digest: record.image_digest.clone(),
        last_exit_status: record.last_exit,
        rollout: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_with_explicit_defaults() {
        let proto_spec = proto::AppSpec {
            name: "web".into(),
            image: "busybox".into(),
            ports: vec![proto::AppPort {
                name: "http".into(),
                container_port: 8080,
                ..Default::default()
            }],
            health: Some(proto::HealthCheck {
                probe: Some(proto::health_check::Probe::Http(proto::HttpCheck {
                    port: "http".into(),
                    path: "/health".into(),
                    ..Default::default()
                })),
                failure_threshold: Some(0),
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = spec_from_proto(proto_spec).unwrap();
        // An explicit 0 reaches validation (which refuses it); unset is None.
        assert_eq!(spec.health.failure_threshold, Some(0));
        assert_eq!(spec.health.interval_seconds, None);
        let back = spec_to_proto(&spec);
        assert_eq!(back.ports[0].container_port, 8080);
        assert_eq!(back.restart, proto::RestartPolicy::Always as i32);
    }
}

//! `JobService`: protobuf ⇄ job domain types, and job errors → status codes.

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::auth::Role;
use super::peer::Peer;
use super::proto::{self, job_service_server::JobService};
use super::{LogChunkStream, timestamp};
use crate::jobs::logs::{LogRecord, LogSource};
use crate::jobs::{
    JobError, JobFilter, JobManager, JobMount, JobRecord, JobSpec, JobState, JobView, MountSource,
    RegistryAuth,
};
use crate::secret::Secret;

/// Most jobs one `ListJobs` answers (a larger `limit` is taken as this).
pub const MAX_LIST_JOBS: usize = 1000;

/// The job service.
pub struct JobApi {
    jobs: JobManager,
}

impl JobApi {
    /// Serves `jobs`.
    pub fn new(jobs: JobManager) -> Self {
        Self { jobs }
    }
}

/// The one place job errors become status codes.
pub fn status_of(error: JobError) -> Status {
    use crate::store::StoreError;
    let message = error.to_string();
    match error {
        JobError::InvalidSpec(_) => Status::invalid_argument(message),
        JobError::NoGpus { .. } => Status::failed_precondition(message),
        JobError::QueueFull { .. } => Status::resource_exhausted(message),
        JobError::NotFound(_) => Status::not_found(message),
        JobError::IdConflict(_) => Status::already_exists(message),
        JobError::Store(StoreError::NoSpace { .. }) => Status::resource_exhausted(message),
        JobError::Store(StoreError::Storage { .. }) => Status::internal(message),
        JobError::HostPathUnanswered { .. } => Status::unavailable(message),
    }
}

/// Whether the caller of `request` may read job env values: admin only.
/// Env values often carry credentials (tokens, keys) that an operator, who
/// otherwise reads everything, is not trusted with. A request without a peer
/// (none passes the guard) sees none.
pub fn sees_env_values<T>(request: &Request<T>) -> bool {
    request
        .extensions()
        .get::<Peer>()
        .is_some_and(|peer| peer.role == Role::Admin)
}

/// `job` as a caller sees it: env values replaced by `<redacted>` unless it
/// [`sees_env_values`] (the names stay: they say what the job was given).
/// The job's `registry_auth` is never shown to anyone (it is not kept, so
/// it is never there; cleared all the same).
pub fn job_for_caller(mut job: proto::Job, sees_env_values: bool) -> proto::Job {
    if let Some(spec) = job.spec.as_mut() {
        spec.registry_auth = None;
        if !sees_env_values {
            for value in spec.env.values_mut() {
                *value = crate::secret::REDACTED.to_owned();
            }
        }
    }
    job
}

/// A job's own registry credential; unset or empty means none.
fn auth_from_proto(auth: Option<proto::RegistryAuth>) -> Result<Option<RegistryAuth>, Status> {
    let Some(auth) = auth else { return Ok(None) };
    if auth.username.is_empty() && auth.password.is_empty() {
        return Ok(None);
    }
    if auth.username.is_empty() || auth.password.is_empty() {
        return Err(Status::invalid_argument(
            "spec.registry_auth: set both username and password (or neither)",
        ));
    }
    if auth.username.len() > 256 || auth.password.len() > 16 << 10 {
        return Err(Status::invalid_argument(
            "spec.registry_auth: username at most 256 characters, password at most 16 KiB",
        ));
    }
    Ok(Some(RegistryAuth {
        username: auth.username,
        password: Secret::new(auth.password),
    }))
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<proto::SubmitJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let mut spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: must be set"))?;
        // A secret: taken out before anything else sees the spec.
        let auth = auth_from_proto(spec.registry_auth.take())?;
        let spec = spec_from_proto(spec)?;
        let view = self
            .jobs
            .submit_with_auth(spec, auth)
            .await
            .map_err(status_of)?;
        Ok(Response::new(job_to_proto(&view)))
    }

    async fn get_job(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let sees_env = sees_env_values(&request);
        let view = self.jobs.get(&request.into_inner().id).map_err(status_of)?;
        Ok(Response::new(job_for_caller(job_to_proto(&view), sees_env)))
    }

    async fn list_jobs(
        &self,
        request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        let sees_env = sees_env_values(&request);
        let request = request.into_inner();
        let states = request
            .states
            .iter()
            .map(|s| state_from_proto(*s))
            .collect::<Result<Vec<_>, _>>()?;
        let filter = JobFilter {
            states,
            labels: request.labels.into_iter().collect(),
            // 0 is the domain's default (1000); more is never sent at once.
            limit: (request.limit as usize).min(MAX_LIST_JOBS),
        };
        let jobs = self
            .jobs
            .list(&filter)
            .iter()
            .map(|view| job_for_caller(job_to_proto(view), sees_env))
            .collect();
        Ok(Response::new(proto::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        request: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        // An operator may cancel when operator.allow_cancel_job is set.
        let sees_env = sees_env_values(&request);
        let record = self
            .jobs
            .cancel(&request.into_inner().id)
            .await
            .map_err(status_of)?;
        let job = job_to_proto(&JobView {
            record,
            queue_position: None,
            pull: None,
        });
        Ok(Response::new(job_for_caller(job, sees_env)))
    }

    type StreamJobLogsStream = LogChunkStream;

    async fn stream_job_logs(
        &self,
        request: Request<proto::StreamJobLogsRequest>,
    ) -> Result<Response<Self::StreamJobLogsStream>, Status> {
        let request = request.into_inner();
        let records = self
            .jobs
            .logs(&request.id, request.follow)
            .map_err(status_of)?;
        let chunks = records.map(|r| match r {
            Ok(record) => Ok(log_chunk(record)),
            Err(error) => Err(Status::internal(format!(
                "cannot read the job's log: {error}"
            ))),
        });
        Ok(Response::new(Box::pin(chunks)))
    }
}

/// A captured log record as a protobuf chunk.
pub fn log_chunk(record: LogRecord) -> proto::LogChunk {
    let stream = match record.source {
        LogSource::Stdout => proto::LogStream::Stdout,
        LogSource::Stderr => proto::LogStream::Stderr,
        LogSource::Agent => proto::LogStream::Agent,
    };
    let time = (record.time_nanos > 0).then(|| pbjson_types::Timestamp {
        seconds: record.time_nanos.div_euclid(1_000_000_000),
        nanos: i32::try_from(record.time_nanos.rem_euclid(1_000_000_000)).unwrap_or(0),
    });
    proto::LogChunk {
        stream: stream as i32,
        data: record.data.to_vec(),
        time,
    }
}

/// Mounts from protobuf (jobs and apps share the shape).
pub(super) fn mounts_from_proto(mounts: Vec<proto::JobMount>) -> Result<Vec<JobMount>, Status> {
    mounts
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let source = match m.source {
                Some(proto::job_mount::Source::Managed(name)) => MountSource::Managed(name),
                Some(proto::job_mount::Source::HostPath(path)) => {
                    MountSource::HostPath(path.into())
                }
                None => {
                    return Err(Status::invalid_argument(format!(
                        "mounts[{i}]: set either managed or host_path"
                    )));
                }
            };
            Ok(JobMount {
                source,
                container_path: m.container_path,
                read_only: m.read_only,
            })
        })
        .collect()
}

fn spec_from_proto(spec: proto::JobSpec) -> Result<JobSpec, Status> {
    let mounts = mounts_from_proto(spec.mounts)?;
    Ok(JobSpec {
        id: spec.id,
        image: spec.image,
        command: spec.command,
        env: spec.env.into_iter().collect(),
        working_dir: spec.working_dir,
        labels: spec.labels.into_iter().collect(),
        slots: spec.slots,
        memory_bytes: spec.memory_bytes,
        cpu_millis: spec.cpu_millis,
        gpus: spec.gpus,
        mounts,
        timeout_seconds: spec.timeout_seconds,
        priority: spec.priority,
        network: spec.network,
        kill_grace_seconds: spec.kill_grace_seconds,
    })
}

fn spec_to_proto(spec: &JobSpec) -> proto::JobSpec {
    proto::JobSpec {
        id: spec.id.clone(),
        image: spec.image.clone(),
        command: spec.command.clone(),
        env: spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        working_dir: spec.working_dir.clone(),
        labels: spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        slots: spec.slots,
        memory_bytes: spec.memory_bytes,
        cpu_millis: spec.cpu_millis,
        gpus: spec.gpus,
        mounts: mounts_to_proto(&spec.mounts),
        timeout_seconds: spec.timeout_seconds,
        priority: spec.priority,
        network: spec.network.clone(),
        kill_grace_seconds: spec.kill_grace_seconds,
        registry_auth: None,
    }
}

/// Mounts as protobuf.
pub(super) fn mounts_to_proto(mounts: &[JobMount]) -> Vec<proto::JobMount> {
    mounts
        .iter()
        .map(|m| proto::JobMount {
            source: Some(match &m.source {
                MountSource::Managed(name) => proto::job_mount::Source::Managed(name.clone()),
                MountSource::HostPath(path) => {
                    proto::job_mount::Source::HostPath(path.display().to_string())
                }
            }),
            container_path: m.container_path.clone(),
            read_only: m.read_only,
        })
        .collect()
}

fn state_from_proto(value: i32) -> Result<JobState, Status> {
    match proto::JobState::try_from(value) {
        Ok(proto::JobState::Queued) => Ok(JobState::Queued),
        Ok(proto::JobState::Starting) => Ok(JobState::Starting),
        Ok(proto::JobState::Running) => Ok(JobState::Running),
        Ok(proto::JobState::Succeeded) => Ok(JobState::Succeeded),
        Ok(proto::JobState::Failed) => Ok(JobState::Failed),
        Ok(proto::JobState::Cancelled) => Ok(JobState::Cancelled),
        Ok(proto::JobState::TimedOut) => Ok(JobState::TimedOut),
        Ok(proto::JobState::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "states: {value} is not a job state"
        ))),
    }
}

fn state_to_proto(state: JobState) -> proto::JobState {
    match state {
        JobState::Queued => proto::JobState::Queued,
        JobState::Starting => proto::JobState::Starting,
        JobState::Running => proto::JobState::Running,
        JobState::Succeeded => proto::JobState::Succeeded,
        JobState::Failed => proto::JobState::Failed,
        JobState::Cancelled => proto::JobState::Cancelled,
        JobState::TimedOut => proto::JobState::TimedOut,
    }
}

/// A job record (and its queue position) as a protobuf `Job`.
pub fn job_to_proto(view: &JobView) -> proto::Job {
    let r: &JobRecord = &view.record;
    proto::Job {
        id: r.spec.id.clone(),
        spec: Some(spec_to_proto(&r.spec)),
        state: state_to_proto(r.state) as i32,
        exit_code: r.exit_code,
        reason: r.reason.clone(),
        oom_killed: r.oom_killed,
        queued_at: Some(timestamp(r.queued_at)),
        starting_at: r.starting_at.map(timestamp),
        running_at: r.running_at.map(timestamp),
        finished_at: r.finished_at.map(timestamp),
        container_id: r.container_id.clone(),
        gpu_indices: r.gpu_indices.clone(),
        queue_position: view.queue_position.unwrap_or(0),
        image_digest: r.image_digest.clone(),
        pull: view
            .pull
            .as_ref()
            .map(|pull| super::images::view_to_proto(pull, &r.spec.image)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::peer::Who;

    fn job_with_env() -> proto::Job {
        proto::Job {
            spec: Some(proto::JobSpec {
                env: [("HF_TOKEN".to_owned(), "hf_secret".to_owned())].into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn request_from(role: Option<Role>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(role) = role {
            request.extensions_mut().insert(Peer {
                role,
                who: Who::Local {
                    uid: 1000,
                    user: None,
                    pid: None,
                },
            });
        }
        request
    }

    #[test]
    fn only_admin_reads_env_values() {
        for (role, sees) in [
            (Some(Role::Admin), true),
            (Some(Role::Operator), false),
            (None, false),
        ] {
            let request = request_from(role);
            assert_eq!(sees_env_values(&request), sees, "{role:?}");
            let job = job_for_caller(job_with_env(), sees_env_values(&request));
            let env = job.spec.expect("spec").env;
            let expected = if sees { "hf_secret" } else { "<redacted>" };
            assert_eq!(env["HF_TOKEN"], expected, "{role:?}");
        }
    }
}

//! `SetupService`: protobuf ⇄ setup domain, and the domain's errors as status
//! codes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::proto::{self, setup_service_server::SetupService};
use super::{LogChunkStream, timestamp};
use crate::setup::{
    LogPiece, LogStream, RunRequest, RunState, ScriptSource, SetupError, SetupKind, SetupRun,
    SetupScripts,
};
use crate::store::StoreError;

/// Runs listed when the request gives no limit.
const DEFAULT_LIST_LIMIT: usize = 100;
/// Most runs listed at once.
const MAX_LIST_LIMIT: usize = 1000;

/// The setup script service.
pub struct SetupApi {
    setup: SetupScripts,
    shutdown: CancellationToken,
}

impl SetupApi {
    /// Log streams end when `shutdown` fires, so that a stop is never held up
    /// by a following client.
    pub fn new(setup: SetupScripts, shutdown: CancellationToken) -> Self {
        Self { setup, shutdown }
    }
}

#[tonic::async_trait]
impl SetupService for SetupApi {
    async fn run_setup_script(
        &self,
        request: Request<proto::RunSetupScriptRequest>,
    ) -> Result<Response<proto::SetupRun>, Status> {
        let request = request_from_proto(request.into_inner()).map_err(to_status)?;
        let run = self.setup.submit(request).await.map_err(to_status)?;
        Ok(Response::new(run_to_proto(&run)))
    }

    async fn get_setup_run(
        &self,
        request: Request<proto::GetSetupRunRequest>,
    ) -> Result<Response<proto::SetupRun>, Status> {
        let run = self
            .setup
            .get(&request.into_inner().id)
            .map_err(to_status)?;
        Ok(Response::new(run_to_proto(&run)))
    }

    async fn list_setup_runs(
        &self,
        request: Request<proto::ListSetupRunsRequest>,
    ) -> Result<Response<proto::ListSetupRunsResponse>, Status> {
        let request = request.into_inner();
        let mut kinds = Vec::new();
        for kind in request.kinds {
            match proto::SetupKind::try_from(kind) {
                Ok(proto::SetupKind::Unspecified) | Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "`kinds`: {kind} is not a setup kind (1 creation, 2 startup, 3 adhoc)"
                    )));
                }
                Ok(kind) => kinds.push(kind_from_proto(kind)),
            }
        }
        let limit = match request.limit as usize {
            0 => DEFAULT_LIST_LIMIT,
            n => n.min(MAX_LIST_LIMIT),
        };
        let runs = self.setup.list(&kinds, limit);
        Ok(Response::new(proto::ListSetupRunsResponse {
            runs: runs.iter().map(run_to_proto).collect(),
        }))
    }

    type StreamSetupLogsStream = LogChunkStream;

    async fn stream_setup_logs(
        &self,
        request: Request<proto::StreamSetupLogsRequest>,
    ) -> Result<Response<Self::StreamSetupLogsStream>, Status> {
        let request = request.into_inner();
        let pieces = self
            .setup
            .logs(&request.id, request.follow, self.shutdown.child_token())
            .map_err(to_status)?;
        let chunks = pieces.map(|piece| piece.map(chunk_to_proto).map_err(to_status));
        Ok(Response::new(Box::pin(chunks)))
    }
}

fn request_from_proto(request: proto::RunSetupScriptRequest) -> Result<RunRequest, SetupError> {
    let kind = match proto::SetupKind::try_from(request.kind) {
        Ok(proto::SetupKind::Unspecified) => SetupKind::Adhoc,
        Ok(kind) => kind_from_proto(kind),
        Err(_) => {
            return Err(SetupError::Invalid {
                field: "kind",
                problem: format!(
                    "{} is not a setup kind (1 creation, 2 startup, 3 adhoc)",
                    request.kind
                ),
            });
        }
    };
    let source = match request.source {
        Some(proto::run_setup_script_request::Source::Script(text)) => ScriptSource::Inline(text),
        Some(proto::run_setup_script_request::Source::Path(path)) => {
            ScriptSource::Path(PathBuf::from(path))
        }
        None => return Err(SetupError::NoScript),
    };
    Ok(RunRequest {
        kind,
        source,
        args: request.args,
        env: request.env.into_iter().collect::<BTreeMap<_, _>>(),
        timeout: (request.timeout_seconds > 0)
            .then(|| Duration::from_secs(request.timeout_seconds.into())),
        run_as: request.run_as,
        working_dir: (!request.working_dir.is_empty()).then(|| PathBuf::from(request.working_dir)),
        idempotency_key: request.idempotency_key,
    })
}

fn kind_from_proto(kind: proto::SetupKind) -> SetupKind {
    match kind {
        proto::SetupKind::Creation => SetupKind::Creation,
        proto::SetupKind::Startup => SetupKind::Startup,
        proto::SetupKind::Adhoc | proto::SetupKind::Unspecified => SetupKind::Adhoc,
    }
}

fn kind_to_proto(kind: SetupKind) -> proto::SetupKind {
    match kind {
        SetupKind::Creation => proto::SetupKind::Creation,
        SetupKind::Startup => proto::SetupKind::Startup,
        SetupKind::Adhoc => proto::SetupKind::Adhoc,
    }
}

fn state_to_proto(state: RunState) -> proto::SetupRunState {
    match state {
        RunState::Pending => proto::SetupRunState::Pending,
        RunState::Running => proto::SetupRunState::Running,
        RunState::Succeeded => proto::SetupRunState::Succeeded,
        RunState::Failed => proto::SetupRunState::Failed,
        RunState::TimedOut => proto::SetupRunState::TimedOut,
        RunState::Interrupted => proto::SetupRunState::Interrupted,
    }
}

/// A run as the API shows it.
pub fn run_to_proto(run: &SetupRun) -> proto::SetupRun {
    proto::SetupRun {
        id: run.id.clone(),
        kind: kind_to_proto(run.kind) as i32,
        state: state_to_proto(run.state) as i32,
        exit_code: run.exit_code,
        log_tail: run.log_tail.clone(),
        started_at: run.started_at.map(timestamp),
        finished_at: run.finished_at.map(timestamp),
        source: run.source.clone(),
        run_as: run.run_as.clone(),
        log_path: run.log_path.display().to_string(),
        message: run.message.clone(),
        idempotency_key: run.idempotency_key.clone(),
        attempt: run.attempt,
        signal: run.signal,
        created_at: Some(timestamp(run.created_at)),
    }
}

fn chunk_to_proto(piece: LogPiece) -> proto::LogChunk {
    let stream = match piece.stream {
        LogStream::Stdout => proto::LogStream::Stdout,
        LogStream::Stderr => proto::LogStream::Stderr,
        LogStream::Agent => proto::LogStream::Agent,
    };
    proto::LogChunk {
        stream: stream as i32,
        data: piece.data,
        time: Some(timestamp(piece.time)),
    }
}

/// Every setup error as a status code; no wildcard, so a new variant forces
/// a decision here.
fn to_status(error: SetupError) -> Status {
    let message = error.to_string();
    match error {
        SetupError::NoScript
        | SetupError::EmptyScript { .. }
        | SetupError::ScriptTooLarge { .. }
        | SetupError::Invalid { .. } => Status::invalid_argument(message),
        SetupError::ScriptUnreadable { .. }
        | SetupError::NotAFile { .. }
        | SetupError::InterpreterMissing { .. }
        | SetupError::UnknownUser { .. }
        | SetupError::WorkingDirMissing { .. }
        | SetupError::CreationAlreadySucceeded { .. }
        | SetupError::CreationInProgress { .. } => Status::failed_precondition(message),
        SetupError::IdempotencyConflict { .. } => Status::already_exists(message),
        SetupError::QueueFull { .. } => Status::resource_exhausted(message),
        SetupError::NotFound { .. } => Status::not_found(message),
        SetupError::CheckTimedOut { .. } | SetupError::ShuttingDown => Status::unavailable(message),
        SetupError::UserLookup { .. } | SetupError::Log { .. } | SetupError::ScriptFile { .. } => {
            Status::internal(message)
        }
        SetupError::Store(store) => match store {
            StoreError::NoSpace { .. } => Status::resource_exhausted(message),
            StoreError::Storage { .. } => Status::internal(message),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_defaults() {
        let request = request_from_proto(proto::RunSetupScriptRequest {
            source: Some(proto::run_setup_script_request::Source::Script(
                "true".into(),
            )),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(request.kind, SetupKind::Adhoc);
        assert_eq!(request.timeout(), Duration::from_secs(900));
        assert_eq!(request.working_dir, None);
        let none = request_from_proto(proto::RunSetupScriptRequest::default()).unwrap_err();
        assert_eq!(to_status(none).code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn errors_map_to_the_documented_codes() {
        let unknown = SetupError::UnknownUser {
            user: "ghost".into(),
        };
        assert_eq!(to_status(unknown).code(), tonic::Code::FailedPrecondition);
        let missing = SetupError::ScriptUnreadable {
            path: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(to_status(missing).code(), tonic::Code::FailedPrecondition);
        let empty = SetupError::EmptyScript {
            source_name: "inline".into(),
        };
        assert_eq!(to_status(empty).code(), tonic::Code::InvalidArgument);
    }
}

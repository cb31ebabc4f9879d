//! `SetupService`: not implemented yet; every RPC names the missing capability.

use tonic::{Request, Response, Status};

use super::not_yet;
use super::proto::{self, setup_service_server::SetupService};

/// The setup script service.
pub struct SetupApi;

const CAPABILITY: &str = "setup scripts";

#[tonic::async_trait]
impl SetupService for SetupApi {
    async fn run_setup_script(
        &self,
        _: Request<proto::RunSetupScriptRequest>,
    ) -> Result<Response<proto::SetupRun>, Status> {
        Err(not_yet("SetupService.RunSetupScript", CAPABILITY))
    }
    async fn get_setup_run(
        &self,
        _: Request<proto::GetSetupRunRequest>,
    ) -> Result<Response<proto::SetupRun>, Status> {
        Err(not_yet("SetupService.GetSetupRun", CAPABILITY))
    }
    async fn list_setup_runs(
        &self,
        _: Request<proto::ListSetupRunsRequest>,
    ) -> Result<Response<proto::ListSetupRunsResponse>, Status> {
        Err(not_yet("SetupService.ListSetupRuns", CAPABILITY))
    }
    type StreamSetupLogsStream = tokio_stream::Empty<Result<proto::LogChunk, Status>>;
    async fn stream_setup_logs(
        &self,
        _: Request<proto::StreamSetupLogsRequest>,
    ) -> Result<Response<Self::StreamSetupLogsStream>, Status> {
        Err(not_yet("SetupService.StreamSetupLogs", CAPABILITY))
    }
}

//! `JobService`: not implemented yet; every RPC names the missing capability.

use tonic::{Request, Response, Status};

use super::not_yet;
use super::proto::{self, job_service_server::JobService};

/// The job service.
pub struct JobApi;

const CAPABILITY: &str = "jobs";

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(
        &self,
        _: Request<proto::SubmitJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        Err(not_yet("JobService.SubmitJob", CAPABILITY))
    }
    async fn get_job(
        &self,
        _: Request<proto::GetJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        Err(not_yet("JobService.GetJob", CAPABILITY))
    }
    async fn list_jobs(
        &self,
        _: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        Err(not_yet("JobService.ListJobs", CAPABILITY))
    }
    async fn cancel_job(
        &self,
        _: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        Err(not_yet("JobService.CancelJob", CAPABILITY))
    }
    type StreamJobLogsStream = tokio_stream::Empty<Result<proto::LogChunk, Status>>;
    async fn stream_job_logs(
        &self,
        _: Request<proto::StreamJobLogsRequest>,
    ) -> Result<Response<Self::StreamJobLogsStream>, Status> {
        Err(not_yet("JobService.StreamJobLogs", CAPABILITY))
    }
}

//! `DiskService`: not implemented yet; every RPC names the missing capability.

use tonic::{Request, Response, Status};

use super::not_yet;
use super::proto::{self, disk_service_server::DiskService};

/// The disk service.
pub struct DiskApi;

const CAPABILITY: &str = "disk guard";

#[tonic::async_trait]
impl DiskService for DiskApi {
    async fn get_disk_usage(
        &self,
        _: Request<proto::GetDiskUsageRequest>,
    ) -> Result<Response<proto::GetDiskUsageResponse>, Status> {
        Err(not_yet("DiskService.GetDiskUsage", CAPABILITY))
    }
    type WatchDiskAlertsStream = tokio_stream::Empty<Result<proto::DiskAlert, Status>>;
    async fn watch_disk_alerts(
        &self,
        _: Request<proto::WatchDiskAlertsRequest>,
    ) -> Result<Response<Self::WatchDiskAlertsStream>, Status> {
        Err(not_yet("DiskService.WatchDiskAlerts", CAPABILITY))
    }
    async fn reclaim_space(
        &self,
        _: Request<proto::ReclaimSpaceRequest>,
    ) -> Result<Response<proto::ReclaimSpaceResponse>, Status> {
        Err(not_yet("DiskService.ReclaimSpace", CAPABILITY))
    }
}

//! `MountService`: not implemented yet; every RPC names the missing capability.

use tonic::{Request, Response, Status};

use super::not_yet;
use super::proto::{self, mount_service_server::MountService};

/// The mount service.
pub struct MountApi;

const CAPABILITY: &str = "file share mounts";

#[tonic::async_trait]
impl MountService for MountApi {
    async fn mount(
        &self,
        _: Request<proto::MountRequest>,
    ) -> Result<Response<proto::MountInfo>, Status> {
        Err(not_yet("MountService.Mount", CAPABILITY))
    }
    async fn unmount(
        &self,
        _: Request<proto::UnmountRequest>,
    ) -> Result<Response<proto::MountInfo>, Status> {
        Err(not_yet("MountService.Unmount", CAPABILITY))
    }
    async fn list_mounts(
        &self,
        _: Request<proto::ListMountsRequest>,
    ) -> Result<Response<proto::ListMountsResponse>, Status> {
        Err(not_yet("MountService.ListMounts", CAPABILITY))
    }
}

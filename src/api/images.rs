//! `ImageService`: protobuf ⇄ images domain types, and image errors →
//! status codes (one match for the domain's errors, one for the kinds of a
//! failed pull). Also the conversion of a pull's progress that `JobService`
//! (a job's `pull`) and `AgentService` (`GetStatus.pulls`) use.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::proto::{self, image_service_server::ImageService as ImageServiceRpc};
use super::{ReplyStream, timestamp};
use crate::images::{
    CredentialInfo, FailureKind, ImageError, ImageService, ImageView, PullProgress,
};
use crate::jobs::{PullPhase, PullView};
use crate::secret::Secret;

/// Least time between two progress messages of one `PullImage` stream
/// (the engine reports many times a second; the last state always goes).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// The image service.
pub struct ImageApi {
    images: ImageService,
    shutdown: CancellationToken,
}

impl ImageApi {
    /// Serves `images`; streams end at `shutdown`.
    pub fn new(images: ImageService, shutdown: CancellationToken) -> Self {
        Self { images, shutdown }
    }
}

/// The one place image errors become status codes.
pub fn status_of(error: ImageError) -> Status {
    let message = error.to_string();
    match error {
        ImageError::InvalidRequest { .. } => Status::invalid_argument(message),
        ImageError::NotFound(_) => Status::not_found(message),
        ImageError::InUse { .. } => Status::failed_precondition(message),
        ImageError::Pull(failure) => failure_status(failure.kind, message),
        ImageError::Engine(_) => Status::unavailable(message),
        ImageError::Store(_) | ImageError::Credentials(_) => Status::internal(message),
    }
}

/// The status of a failed pull, by its kind.
fn failure_status(kind: FailureKind, message: String) -> Status {
    match kind {
        FailureKind::Unauthorized => Status::unauthenticated(message),
        FailureKind::NotFound => Status::not_found(message),
        FailureKind::Untrusted => Status::failed_precondition(message),
        FailureKind::Unreachable => Status::unavailable(message),
        FailureKind::TimedOut => Status::deadline_exceeded(message),
        FailureKind::NoSpace | FailureKind::DiskFull => Status::resource_exhausted(message),
        FailureKind::Cancelled => Status::cancelled(message),
        FailureKind::Engine => Status::internal(message),
    }
}

fn phase_to_proto(phase: PullPhase) -> proto::PullPhase {
    match phase {
        PullPhase::Queued => proto::PullPhase::Queued,
        PullPhase::Held => proto::PullPhase::Held,
        PullPhase::WaitingForDisk => proto::PullPhase::WaitingForDisk,
        PullPhase::Resolving => proto::PullPhase::Resolving,
        PullPhase::Pulling => proto::PullPhase::Pulling,
        PullPhase::Retrying => proto::PullPhase::Retrying,
        PullPhase::Done => proto::PullPhase::Done,
        PullPhase::Failed => proto::PullPhase::Failed,
    }
}

/// A pull as a job shows it (`Job.pull`).
pub fn view_to_proto(view: &PullView, image: &str) -> proto::PullProgress {
    proto::PullProgress {
        image: image.to_owned(),
        phase: phase_to_proto(view.phase) as i32,
        reason: view.reason.clone(),
        bytes_done: view.bytes_done,
        bytes_total: view.bytes_total,
        layers_done: view.layers_done,
        layers_total: view.layers_total,
        needed_bytes: view.needed_bytes,
        ..Default::default()
    }
}

/// A pull with its layers and needers (`PullImage`, `GetStatus.pulls`).
pub fn progress_to_proto(progress: &PullProgress) -> proto::PullProgress {
    proto::PullProgress {
        layers: progress
            .layers
            .iter()
            .map(|l| proto::LayerProgress {
                id: l.id.clone(),
                status: l.status.clone(),
                current_bytes: l.current,
                total_bytes: l.total,
                done: l.done,
            })
            .collect(),
        digest: progress.digest.clone(),
        needed_by: progress.needed_by.clone(),
        started_at: Some(timestamp(progress.started_at)),
        ..view_to_proto(&progress.view, &progress.image)
    }
}

fn image_to_proto(view: ImageView) -> proto::ImageInfo {
    proto::ImageInfo {
        id: view.id,
        references: view.references,
        digest: view.digest,
        size_bytes: view.size_bytes,
        last_used: view.last_used.map(timestamp),
        pulled_at: view.pulled_at.map(timestamp),
        pulled_by_agent: view.pulled_by_agent,
        used_by_jobs: view.used_by_jobs,
        kept: view.kept,
    }
}

fn credential_to_proto(info: CredentialInfo) -> proto::RegistryCredential {
    proto::RegistryCredential {
        registry: info.registry,
        username: info.username,
        updated_at: Some(timestamp(info.updated_at)),
    }
}

#[tonic::async_trait]
impl ImageServiceRpc for ImageApi {
    type PullImageStream = ReplyStream<proto::PullProgress>;

    async fn pull_image(
        &self,
        request: Request<proto::PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        let image = request.into_inner().image;
        let mut watch = self.images.pull(&image).map_err(status_of)?;
        let shutdown = self.shutdown.clone();
        let stream = async_stream::stream! {
            loop {
                let progress = watch.progress.borrow_and_update().clone();
                match progress.view.phase {
                    PullPhase::Done => {
                        yield Ok(progress_to_proto(&progress));
                        break;
                    }
                    PullPhase::Failed => {
                        let kind = progress.failure.unwrap_or(FailureKind::Engine);
                        yield Err(failure_status(kind, format!(
                            "cannot pull image {}: {}", progress.image, progress.view.reason
                        )));
                        break;
                    }
                    _ => yield Ok(progress_to_proto(&progress)),
                }
                let ended = tokio::select! {
                    _ = shutdown.cancelled() => {
                        yield Err(Status::unavailable("the agent is stopping"));
                        break;
                    }
                    changed = watch.progress.changed() => changed.is_err(),
                };
                if ended {
                    // The flight set its outcome before it ended.
                    let last = watch.progress.borrow().clone();
                    if !matches!(last.view.phase, PullPhase::Done | PullPhase::Failed) {
                        yield Err(Status::aborted("the pull ended without an outcome"));
                        break;
                    }
                    continue;
                }
                // Coalesce the engine's many lines into a few messages.
                tokio::time::sleep(PROGRESS_EVERY).await;
            }
            drop(watch);
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_images(
        &self,
        _: Request<proto::ListImagesRequest>,
    ) -> Result<Response<proto::ListImagesResponse>, Status> {
        let images = self.images.list().await.map_err(status_of)?;
        Ok(Response::new(proto::ListImagesResponse {
            images: images.into_iter().map(image_to_proto).collect(),
            pulls: self.images.pulls().iter().map(progress_to_proto).collect(),
        }))
    }

    async fn remove_image(
        &self,
        request: Request<proto::RemoveImageRequest>,
    ) -> Result<Response<proto::RemoveImageResponse>, Status> {
        let report = self
            .images
            .remove(&request.into_inner().image)
            .await
            .map_err(status_of)?;
        Ok(Response::new(proto::RemoveImageResponse {
            removed: report.removed,
            freed_bytes: report.freed_bytes,
        }))
    }

    async fn set_registry_credential(
        &self,
        request: Request<proto::SetRegistryCredentialRequest>,
    ) -> Result<Response<proto::RegistryCredential>, Status> {
        let request = request.into_inner();
        let info = self
            .images
            .set_credential(
                &request.registry,
                &request.username,
                Secret::new(request.secret),
            )
            .await
            .map_err(status_of)?;
        Ok(Response::new(credential_to_proto(info)))
    }

    async fn delete_registry_credential(
        &self,
        request: Request<proto::DeleteRegistryCredentialRequest>,
    ) -> Result<Response<proto::DeleteRegistryCredentialResponse>, Status> {
        let deleted = self
            .images
            .delete_credential(&request.into_inner().registry)
            .await
            .map_err(status_of)?;
        Ok(Response::new(proto::DeleteRegistryCredentialResponse {
            deleted,
        }))
    }

    async fn list_registry_credentials(
        &self,
        _: Request<proto::ListRegistryCredentialsRequest>,
    ) -> Result<Response<proto::ListRegistryCredentialsResponse>, Status> {
        Ok(Response::new(proto::ListRegistryCredentialsResponse {
            credentials: self
                .images
                .credentials()
                .into_iter()
                .map(credential_to_proto)
                .collect(),
        }))
    }
}

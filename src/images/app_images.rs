//! The images domain as apps use it ([`AppImages`] on [`ImageService`]):
//! a local image is used as it is (unless `images.pull_policy = "always"`),
//! a missing one is pulled through the same single flight as the jobs' and
//! `PullImage`'s pulls (stored credentials, pull slots, the disk floor), and
//! the app is told the digest its container runs.

use async_trait::async_trait;

use super::FailureKind;
use super::config::PullPolicy;
use super::reference::ImageRef;
use super::service::ImageService;
use crate::apps::images::{AppImage, AppImageError, AppImages};
use crate::jobs::job_images::PullPhase;

impl ImageService {
    /// The local image of `parsed`, if any, as an app runs it.
    async fn local_for_app(&self, parsed: &ImageRef) -> Result<Option<AppImage>, AppImageError> {
        let local = self
            .run_local(parsed)
            .await
            .map_err(|e| AppImageError::Retry(format!("cannot look for image {parsed}: {e}")))?;
        Ok(local.map(|resolved| AppImage {
            run: resolved.run,
            digest: resolved.digest,
        }))
    }
}

#[async_trait]
impl AppImages for ImageService {
    async fn ensure(
        &self,
        image: &str,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<AppImage, AppImageError> {
        let parsed = ImageRef::parse(image).map_err(|e| AppImageError::Failed(e.to_string()))?;
        if self.config().pull_policy == PullPolicy::IfNotPresent
            && let Some(local) = self.local_for_app(&parsed).await?
        {
            return Ok(local);
        }
        // Dropped on every way out: the flight stops when nobody else
        // needs it.
        let mut watch = self
            .pull(image)
            .map_err(|e| AppImageError::Failed(e.to_string()))?;
        let last = loop {
            let now = watch.progress.borrow_and_update().clone();
            if matches!(now.view.phase, PullPhase::Done | PullPhase::Failed) {
                break now;
            }
            progress(now.view.job_reason(image));
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => {
                    return Err(AppImageError::Retry("the agent is stopping".into()));
                }
                changed = watch.progress.changed() => {
                    if changed.is_err() {
                        // The flight set its outcome before it ended.
                        break watch.progress.borrow().clone();
                    }
                }
            }
        };
        drop(watch);
        match last.view.phase {
            PullPhase::Done => self.local_for_app(&parsed).await?.ok_or_else(|| {
                AppImageError::Retry(format!("image {image} was pulled but is not local"))
            }),
            PullPhase::Failed => {
                let reason = format!("cannot pull image {image}: {}", last.view.reason);
                Err(match last.failure.unwrap_or(FailureKind::Engine) {
                    FailureKind::Unauthorized
                    | FailureKind::NotFound
                    | FailureKind::Untrusted
                    | FailureKind::NoSpace => AppImageError::Failed(reason),
                    FailureKind::Unreachable
                    | FailureKind::TimedOut
                    | FailureKind::DiskFull
                    | FailureKind::Cancelled
                    | FailureKind::Engine => AppImageError::Retry(reason),
                })
            }
            other => Err(AppImageError::Retry(format!(
                "the pull of image {image} ended {} without an outcome",
                other.name()
            ))),
        }
    }
}

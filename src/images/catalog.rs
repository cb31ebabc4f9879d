//! The images on the instance, as `ListImages` shows them and
//! `RemoveImage` removes them, and the registry credentials as the API
//! manages them: the images domain's catalogue, beside its pulls.

use super::ImageError;
use super::credentials::CredentialInfo;
use super::service::ImageService;
use super::state::Presence;
use crate::secret::Secret;

/// An image as `ListImages` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageView {
    /// The engine's id.
    pub id: String,
    /// Its tags.
    pub references: Vec<String>,
    /// Its registry digest, if any.
    pub digest: String,
    /// Bytes.
    pub size_bytes: u64,
    /// When a job last started on it.
    pub last_used: Option<std::time::SystemTime>,
    /// When the agent pulled it.
    pub pulled_at: Option<std::time::SystemTime>,
    /// The agent pulled it.
    pub pulled_by_agent: bool,
    /// Jobs that need it.
    pub used_by_jobs: Vec<String>,
    /// Protected by `jobs.keep_images`.
    pub kept: bool,
}

/// What `RemoveImage` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveReport {
    /// References untagged and ids deleted.
    pub removed: Vec<String>,
    /// Bytes freed.
    pub freed_bytes: u64,
}

impl ImageService {
    /// The images on the instance, as the agent sees them.
    pub async fn list(&self) -> Result<Vec<ImageView>, ImageError> {
        let images = self.inner.engine.list().await.map_err(ImageError::Engine)?;
        let keep = self.inner.keep.borrow().clone();
        let state = self.lock();
        let mut views: Vec<ImageView> = images
            .into_iter()
            .map(|image| {
                let record = self.inner.records.get(&image.id);
                ImageView {
                    used_by_jobs: state.jobs_on_image(&image.id),
                    kept: super::reclaim::kept(&keep, &image.repo_tags),
                    digest: image.repo_digests.first().cloned().unwrap_or_default(),
                    last_used: record.as_ref().and_then(|r| r.last_used),
                    pulled_at: record.as_ref().and_then(|r| r.pulled_at),
                    pulled_by_agent: record.as_ref().is_some_and(|r| r.pulled_by_agent),
                    references: image.repo_tags,
                    size_bytes: image.size_bytes,
                    id: image.id,
                }
            })
            .collect();
        views.sort_by(|a, b| a.references.first().cmp(&b.references.first()));
        Ok(views)
    }

    /// Removes a reference (or an image id); refused while a job needs it.
    pub async fn remove(&self, image: &str) -> Result<RemoveReport, ImageError> {
        if image.is_empty() {
            return Err(ImageError::InvalidRequest {
                field: "image",
                problem: "must not be empty".into(),
            });
        }
        let found = self
            .inner
            .engine
            .inspect(image)
            .await
            .map_err(ImageError::Engine)?
            .ok_or_else(|| ImageError::NotFound(image.to_owned()))?;
        let users = {
            let mut state = self.lock();
            let mut users = state.jobs_on_image(&found.id);
            if let Ok(parsed) = state.parsed(image) {
                users.extend(state.jobs_wanting(&parsed.canonical()));
            }
            users.sort();
            users.dedup();
            users
        };
        if !users.is_empty() {
            return Err(ImageError::InUse {
                image: image.to_owned(),
                by: users,
            });
        }
        let removed = self.inner.engine.remove(image).await.map_err(|e| match e {
            crate::jobs::engine::EngineError::NotFound { .. } => {
                ImageError::NotFound(image.to_owned())
            }
            crate::jobs::engine::EngineError::Api { message, .. }
                if message.contains("conflict") || message.contains("being used") =>
            {
                ImageError::InUse {
                    image: image.to_owned(),
                    by: vec![message],
                }
            }
            other => ImageError::Engine(other),
        })?;
        self.gone(&found.id, image, removed.deleted).await;
        Ok(RemoveReport {
            removed: removed.items,
            freed_bytes: if removed.deleted { found.size_bytes } else { 0 },
        })
    }

    /// Notes that `reference` of image `id` was removed (and the image with
    /// it when `deleted`).
    pub(super) async fn gone(&self, id: &str, reference: &str, deleted: bool) {
        {
            let mut state = self.lock();
            state
                .local
                .retain(|_, p| *p != Presence::Local(id.to_owned()));
        }
        if deleted {
            self.inner.records.forget(id).await;
        } else {
            self.inner.records.forget_reference(id, reference).await;
        }
        self.announce();
    }

    /// Sets a registry credential.
    pub async fn set_credential(
        &self,
        registry: &str,
        username: &str,
        secret: Secret,
    ) -> Result<CredentialInfo, ImageError> {
        let info = self
            .inner
            .credentials
            .set(registry, username, secret)
            .await?;
        tracing::info!(registry = %info.registry, username = %info.username, "registry credential set");
        Ok(info)
    }

    /// Deletes a registry credential; false when there was none.
    pub async fn delete_credential(&self, registry: &str) -> Result<bool, ImageError> {
        let deleted = self.inner.credentials.delete(registry).await?;
        if deleted {
            tracing::info!(%registry, "registry credential deleted");
        }
        Ok(deleted)
    }

    /// The registries with credentials, and their user names.
    pub fn credentials(&self) -> Vec<CredentialInfo> {
        self.inner.credentials.list()
    }
}

//! How an app gets its image: the narrow trait to the images domain
//! ([`AppImages`], implemented by `images::ImageService`), so that an app's
//! pull is the same single flight as the jobs' and `PullImage`'s (stored
//! registry credentials, the pull slots, the disk guard's floor) and the
//! container is created from exactly the digest the app records.
//!
//! Knows nothing of the images domain's internals.

use async_trait::async_trait;

/// The image a container is created from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppImage {
    /// What the engine is given (`repo@sha256:...`, or the image id).
    pub run: String,
    /// What the app records as its `image_digest`.
    pub digest: String,
}

/// Why an image cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppImageError {
    /// Trying again will not help (no such image, not authorized, a bad
    /// reference, it can never fit above the disk floor): the app fails.
    #[error("{0}")]
    Failed(String),
    /// The engine or the registry did not answer, or the pull was cut
    /// short: the app backs off and tries again.
    #[error("{0}")]
    Retry(String),
}

/// What apps need from the images domain.
#[async_trait]
pub trait AppImages: Send + Sync + 'static {
    /// Makes sure `image` is local, pulling it (or joining the pull in
    /// flight) when it is not or when the pull policy says so, and returns
    /// what the container runs. `progress` is told one line for people at
    /// each step of a pull (the app's reason while PULLING).
    async fn ensure(
        &self,
        image: &str,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<AppImage, AppImageError>;
}

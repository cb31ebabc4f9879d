//! The images domain's narrow interface to the container engine
//! ([`ImageEngine`]): pull with progress, inspect, list, remove, and which
//! images containers use. The bollard implementation is in `docker.rs`,
//! a fake for tests in `fake.rs`.

use std::collections::HashSet;
use std::pin::Pin;

use async_trait::async_trait;
use tokio_stream::Stream;

use crate::jobs::RegistryAuth;
use crate::jobs::engine::EngineError;

/// An image the engine holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalImage {
    /// The engine's id (`sha256:...`).
    pub id: String,
    /// Its tags (`repo:tag`).
    pub repo_tags: Vec<String>,
    /// Its registry digests (`repo@sha256:...`).
    pub repo_digests: Vec<String>,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// One line of the engine's pull progress.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PullEvent {
    /// The layer's short id (empty for lines about the whole image).
    pub layer: String,
    /// "Pulling fs layer", "Downloading", "Extracting", "Pull complete", ...
    pub status: String,
    /// Bytes so far (of the download or the extraction).
    pub current: u64,
    /// Bytes in all, when the engine knows.
    pub total: u64,
}

/// The progress of one pull, ending when the image is local (or with the
/// engine's error).
pub type PullEvents = Pin<Box<dyn Stream<Item = Result<PullEvent, EngineError>> + Send>>;

/// What removing a reference did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Removed {
    /// References untagged and image ids deleted.
    pub items: Vec<String>,
    /// True when the image itself was deleted (its last reference went).
    pub deleted: bool,
}

/// The container engine as the images domain uses it.
#[async_trait]
pub trait ImageEngine: Send + Sync + 'static {
    /// Starts pulling `reference` (as the engine spells it) with `auth`.
    /// Dropping the stream stops the pull.
    async fn pull(
        &self,
        reference: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<PullEvents, EngineError>;
    /// The image `reference` (a reference or an id) names; `None` when the
    /// engine has none.
    async fn inspect(&self, reference: &str) -> Result<Option<LocalImage>, EngineError>;
    /// Every image (tagged or not).
    async fn list(&self) -> Result<Vec<LocalImage>, EngineError>;
    /// Removes a reference (or an image by id), never forced: the engine
    /// refuses an image a container uses. `NotFound` when there is none.
    async fn remove(&self, reference: &str) -> Result<Removed, EngineError>;
    /// Ids of the images that containers (in any state) use.
    async fn in_use(&self) -> Result<HashSet<String>, EngineError>;
}

//! How a job gets its image: the narrow trait to the images domain
//! ([`ImageProvider`]) and the types the two share. The dispatcher tells the
//! provider, at every pass, which images the jobs need in queue order
//! ([`ImageWant`]); a queued job is a candidate to start only once its image
//! is [`ImageState::Ready`], so it never holds a slot while it is pulled.
//! Just before its container is created, the job's task asks for the image
//! as it will run ([`ImageProvider::resolve`]): the digest is recorded first,
//! and the container is created from exactly that digest.
//!
//! Knows nothing of the manager's state; must not touch the images domain's
//! internals (only the trait it implements).

use tokio::sync::watch;

use crate::secret::Secret;

/// Credentials a control plane passed for one job's pull. Kept in memory
/// only, while the job is queued; never stored, never shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    /// The user name (for a token, the name the registry expects with it).
    pub username: String,
    /// The password or token.
    pub password: Secret,
}

/// Why the jobs want an image now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WantStage {
    /// A queued job that would start now if its image were local: its pull
    /// comes first.
    Due,
    /// A queued job further back: its image is pulled ahead (prefetch, when
    /// `images.prefetch_queued` is on).
    Queued,
    /// A starting or running job: its image is in use (never pulled for it,
    /// never reclaimed).
    Active,
}

/// One job's need of an image, as the dispatcher states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageWant {
    /// The job.
    pub job: String,
    /// Its image reference, as submitted.
    pub image: String,
    /// The job's own credential, if the control plane passed one.
    pub auth: Option<RegistryAuth>,
    /// Why it is wanted.
    pub stage: WantStage,
}

/// Where a pull is (the contract's `PullPhase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPhase {
    /// Waiting for a pull slot (`images.max_concurrent_pulls`).
    Queued,
    /// Held by the disk guard.
    Held,
    /// Waiting for disk space above the floor.
    WaitingForDisk,
    /// Asking the registry (credentials, manifest, sizes).
    Resolving,
    /// The engine downloads and unpacks the layers.
    Pulling,
    /// Waiting before another try (registry or engine unreachable).
    Retrying,
    /// Local.
    Done,
    /// Failed.
    Failed,
}

impl PullPhase {
    /// Lowercase name for logs.
    pub fn name(self) -> &'static str {
        match self {
            PullPhase::Queued => "queued",
            PullPhase::Held => "held",
            PullPhase::WaitingForDisk => "waiting_for_disk",
            PullPhase::Resolving => "resolving",
            PullPhase::Pulling => "pulling",
            PullPhase::Retrying => "retrying",
            PullPhase::Done => "done",
            PullPhase::Failed => "failed",
        }
    }
}

/// A pull as a job shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullView {
    /// Where it is.
    pub phase: PullPhase,
    /// One line for people (why it waits).
    pub reason: String,
    /// Compressed bytes downloaded.
    pub bytes_done: u64,
    /// Compressed bytes in all (0 while unknown).
    pub bytes_total: u64,
    /// Layers local.
    pub layers_done: u32,
    /// Layers in all (0 while unknown).
    pub layers_total: u32,
    /// Space the pull is expected to take (0 while unknown).
    pub needed_bytes: u64,
}

impl PullView {
    /// A queued job's reason while its image is not local.
    pub fn job_reason(&self, image: &str) -> String {
        use crate::units::bytes;
        match self.phase {
            PullPhase::Pulling if self.bytes_total > 0 => format!(
                "pulling image {image}: {} of {}, {}/{} layers",
                bytes(self.bytes_done),
                bytes(self.bytes_total),
                self.layers_done,
                self.layers_total
            ),
            PullPhase::Pulling | PullPhase::Resolving => format!("pulling image {image}"),
            _ if self.reason.is_empty() => format!("waiting for image {image}"),
            _ => format!("waiting for image {image}: {}", self.reason),
        }
    }
}

/// A job's image, as the provider answers from memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageState {
    /// Local: the job may start.
    Ready,
    /// Not local yet: being looked for, pulled, or waiting to be pulled.
    Pulling(PullView),
    /// The pull for this job failed; the job fails with this reason.
    Failed(String),
}

/// The image a container is created from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// What the engine is given (`repo@sha256:...`, or the image id).
    pub run: String,
    /// What the job records as the digest it ran.
    pub digest: String,
}

/// Why an image could not be resolved just before create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// The image is not local (any more): the job waits for a pull.
    Missing,
    /// The engine did not answer or refused; the job waits and tries again.
    Engine(String),
}

/// What the job queue needs from the images domain.
#[async_trait::async_trait]
pub trait ImageProvider: Send + Sync + 'static {
    /// States what the jobs need now, queued jobs in queue order (due ones
    /// marked), then the started ones. Replaces the previous statement: a
    /// pull that no job (and no other caller) needs any more stops. Must not
    /// block (it is called from the dispatcher's pass).
    fn want(&self, wants: Vec<ImageWant>);

    /// The image of `job` as last seen. Must answer from memory.
    fn state(&self, job: &str, image: &str) -> ImageState;

    /// The image as the container will run it (and the job records).
    async fn resolve(&self, job: &str, image: &str) -> Result<ResolvedImage, ResolveError>;

    /// Says that `image` was found missing after all (the engine refused to
    /// create a container from it), so that it is pulled again.
    fn forget(&self, image: &str);

    /// Changes whenever an image becomes ready or a pull ends, so that the
    /// dispatcher looks at the queue again.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// A provider for a build or test without pulls: every image counts as
/// local and runs as given (the engine then says whether it exists).
pub struct LocalImagesOnly {
    changes: watch::Sender<u64>,
}

impl Default for LocalImagesOnly {
    fn default() -> Self {
        Self {
            changes: watch::channel(0).0,
        }
    }
}

#[async_trait::async_trait]
impl ImageProvider for LocalImagesOnly {
    fn want(&self, _: Vec<ImageWant>) {}

    fn state(&self, _: &str, _: &str) -> ImageState {
        ImageState::Ready
    }

    async fn resolve(&self, _: &str, image: &str) -> Result<ResolvedImage, ResolveError> {
        Ok(ResolvedImage {
            run: image.to_owned(),
            digest: String::new(),
        })
    }

    fn forget(&self, _: &str) {}

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

//! Images: what jobs run. A job whose image is not local is pulled before
//! it takes a slot, with the stored credential of its registry (or the
//! job's own), one pull shared by everyone who needs the image, the images
//! of queued jobs pulled ahead in queue order, and no pull taking the disk
//! below the guard's floor. Knows nothing of gRPC.
//!
//! Owns the `[images]` section ([`config`]), image references
//! ([`reference`]), the credential store ([`credentials`]), the agent's
//! records of the images it pulled and used ([`records`], in the store),
//! the pulls in flight (`state.rs`, `pulls.rs`) and their progress
//! ([`progress`]), the handle ([`ImageService`], which implements the job
//! queue's [`crate::jobs::ImageProvider`] and the apps'
//! [`crate::apps::images::AppImages`] in `app_images.rs`; the images on the instance and
//! the credentials as the API sees them in `catalog.rs`) and the disk
//! guard's image reclaim steps ([`reclaim`]).
//!
//! Reaches the outside world through [`engine::ImageEngine`] (the engine:
//! pull, inspect, remove; bollard in `docker.rs`), [`registry::Registry`]
//! (the agent's own questions to a registry; HTTPS in `http.rs`) and
//! [`space::PullSpace`] (free space against the disk guard's floor; on the
//! guard's public handle). Fakes of the three are in `fake.rs` (behind
//! `test-util`).

mod app_images;
mod catalog;
pub mod config;
pub mod credentials;
pub mod docker;
pub mod engine;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod http;
pub mod progress;
mod pulls;
pub mod reclaim;
pub mod records;
pub mod reference;
pub mod registry;
mod service;
pub mod space;
mod state;
pub mod syntax;
#[cfg(test)]
mod tests;

pub use catalog::{ImageView, RemoveReport};
pub use credentials::{CredentialInfo, CredentialStore};
pub use progress::{LayerProgress, PullProgress};
pub use pulls::needed_bytes;
pub use service::{ImageParts, ImageService, PullWatch};

use crate::jobs::engine::EngineError;
use crate::store::StoreError;

/// What kind of failure ended a pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The registry wants other (or any) credentials.
    Unauthorized,
    /// No such image.
    NotFound,
    /// The registry's TLS certificate is not trusted.
    Untrusted,
    /// The registry (or engine) did not answer, retried until the timeout.
    Unreachable,
    /// `images.pull_timeout_seconds` passed.
    TimedOut,
    /// The image can never fit above the disk floor.
    NoSpace,
    /// The disk filled up during the pull.
    DiskFull,
    /// Nobody needed it any more, or the agent stopped.
    Cancelled,
    /// The engine refused for another reason.
    Engine,
}

/// Why a pull failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullFailure {
    /// What kind.
    pub kind: FailureKind,
    /// One line, with the registry's or engine's own message.
    pub reason: String,
}

/// An images request failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A field of the request breaks a rule.
    #[error("{field}: {problem}")]
    InvalidRequest {
        /// The field.
        field: &'static str,
        /// What is wrong, with the limit.
        problem: String,
    },
    /// No such image.
    #[error("no image {0:?} on this instance")]
    NotFound(String),
    /// A job (or a container) needs the image.
    #[error("image {image:?} is in use: {}", by.join(", "))]
    InUse {
        /// The image.
        image: String,
        /// The jobs (or the engine's message) that keep it.
        by: Vec<String>,
    },
    /// A pull failed.
    #[error("cannot pull the image: {}", .0.reason)]
    Pull(PullFailure),
    /// The engine failed.
    #[error(transparent)]
    Engine(EngineError),
    /// The store failed.
    #[error("cannot read the image records: {0}")]
    Store(#[source] StoreError),
    /// The credential store cannot be read or written.
    #[error("registry credentials: {0}")]
    Credentials(String),
}

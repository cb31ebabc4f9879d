//! File share mounts: Azure Blob containers mounted with blobfuse2 and
//! supervised by the agent.
//!
//! # Layout
//! - [`MountService`] (`service`): the handle: Mount, Unmount, list, restore
//!   at agent start, and what jobs and the disk guard may ask of mounts.
//! - `registry`: the table of managed mounts, the `mounts.*` store records,
//!   the secret files of API mounts, and what the table shows (mount events,
//!   the mounts condition, the cache dirs for the disk guard).
//! - `request`: a request from the API or config turned into a checked spec.
//! - `supervisor`: the per-mount state machine (mount, health checks, stale
//!   detection, repair with backoff, adoption of mounts that survived an
//!   agent restart).
//! - [`config`] (the `[mounts]` section) and [`settings`] ([`MountSettings`],
//!   derived from it and the agent's dirs).
//! - [`spec`]: the mount rules (names, allowed paths, cache placement).
//! - [`cache`]: which cache dirs the agent may empty, and emptying them.
//! - [`render`]: the blobfuse2 config; [`secrets`]: where secrets are kept.
//! - [`reclaim`]: the disk guard's `mount_caches` step.
//!
//! The outside world (processes, `/proc`, FUSE, `fusermount3`) is reached
//! only through [`system::FuseMounter`]; a fake sits in [`fake`].
//! Knows nothing of gRPC.
//!
//! What other modules may use: [`MountService::resolve`] (jobs bind-mount a
//! managed mount by name), [`MountService::cache_dirs`] /
//! [`MountService::watch_cache_dirs`] and [`MountService::empty_cache`] (the
//! disk guard watches and reclaims the caches).

pub mod cache;
pub mod config;
mod handoff;
pub mod reclaim;
mod registry;
pub mod render;
mod request;
pub mod secrets;
mod service;
pub mod settings;
pub mod spec;
mod supervisor;
pub mod system;
#[cfg(test)]
mod testing;

#[cfg(any(test, feature = "test-util"))]
pub mod fake;

use std::path::PathBuf;
use std::time::SystemTime;

pub use registry::CacheDir;
pub use service::{MountService, MountedPath, ResolveError};
pub use settings::MountSettings;
pub use spec::{Auth, MountSpec, Origin};

/// The health of a mount, as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MountState {
    /// blobfuse2 started; waiting for the mount to appear.
    Mounting,
    /// In mountinfo and answering.
    Mounted,
    /// Stopped answering (ENOTCONN, dead process or timeout).
    Stale,
    /// Being repaired: lazy unmount, cache emptied, mounted again.
    Remounting,
    /// blobfuse2 failed; retried with backoff.
    Failed,
    /// Unmounted on request.
    Unmounted,
}

impl MountState {
    /// Lowercase name for messages and the condition.
    pub fn name(self) -> &'static str {
        match self {
            MountState::Mounting => "mounting",
            MountState::Mounted => "mounted",
            MountState::Stale => "stale",
            MountState::Remounting => "remounting",
            MountState::Failed => "failed",
            MountState::Unmounted => "unmounted",
        }
    }
}

/// A managed mount as the API and events show it. Never carries a secret.
#[derive(Debug, Clone, PartialEq)]
pub struct MountStatus {
    /// Unique name.
    pub name: String,
    /// Where it is mounted.
    pub mount_path: PathBuf,
    /// Storage account.
    pub account: String,
    /// Blob container.
    pub container: String,
    /// "key", "sas" or "msi".
    pub auth_mode: &'static str,
    /// Current health.
    pub state: MountState,
    /// Detail: blobfuse2's error (scrubbed), why it went stale, "lazily unmounted: busy".
    pub message: String,
    /// Repairs since the mount was first requested.
    pub remount_count: u32,
    /// When health was last checked.
    pub last_checked: Option<SystemTime>,
    /// Mounted read-only.
    pub read_only: bool,
    /// The file cache directory.
    pub cache_dir: PathBuf,
    /// The cache size cap in bytes.
    pub cache_max_bytes: u64,
    /// The supervised blobfuse2 process, if any.
    pub pid: Option<u32>,
    /// Where it was declared.
    pub origin: Origin,
    /// Who it belongs to (blobfuse2 runs as them).
    pub owner: spec::Owner,
}

impl MountStatus {
    /// The status of a spec before anything happened to it.
    pub fn new(spec: &MountSpec, state: MountState) -> Self {
        Self {
            name: spec.name.clone(),
            mount_path: spec.mount_path.clone(),
            account: spec.account.clone(),
            container: spec.container.clone(),
            auth_mode: spec.auth.mode(),
            state,
            message: String::new(),
            remount_count: 0,
            last_checked: None,
            read_only: spec.read_only,
            cache_dir: spec.cache_dir.clone(),
            cache_max_bytes: spec.cache_max_bytes,
            pid: None,
            origin: spec.origin,
            owner: spec.owner(),
        }
    }
}

/// A mount operation failed. Messages never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A field of the request is invalid.
    #[error("mount {name:?}: {field}: {problem}")]
    Invalid {
        /// The mount's name (may itself be the invalid field).
        name: String,
        /// The field, e.g. `mount_path`.
        field: &'static str,
        /// What is wrong and what is allowed.
        problem: String,
    },
    /// The name or the path is already used by a managed mount or a mount of the system.
    #[error("mount {name:?}: {what}")]
    InUse {
        /// The requested name.
        name: String,
        /// What is in use, e.g. "path /mnt/data is already mounted (fuse from blobfuse2)".
        what: String,
    },
    /// No managed mount has this name.
    #[error("no mount named {0:?}")]
    NotFound(String),
    /// blobfuse2 exited before the mount appeared; `message` is its `Error:` line, scrubbed.
    #[error("mount {name:?}: blobfuse2 failed ({status}): {message}")]
    Blobfuse2 {
        /// The mount.
        name: String,
        /// Its exit status, e.g. "exit status 1".
        status: String,
        /// blobfuse2's own message, verbatim with secrets replaced by `***`.
        message: String,
    },
    /// The mount did not appear in mountinfo in time.
    #[error(
        "mount {name:?}: not in /proc/self/mountinfo at {path} after {seconds} s (mounts.mount_timeout_seconds)"
    )]
    Timeout {
        /// The mount.
        name: String,
        /// Its path.
        path: PathBuf,
        /// The timeout.
        seconds: u64,
    },
    /// A file or directory the agent manages could not be prepared or removed.
    #[error("mount {name:?}: cannot {action} {path}: {source}")]
    Io {
        /// The mount.
        name: String,
        /// What was being done, e.g. "write the blobfuse2 config".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// blobfuse2 (or the systemd-run wrapper) could not be started.
    #[error("mount {name:?}: cannot start {program}: {source}")]
    Spawn {
        /// The mount.
        name: String,
        /// The program, from `mounts.blobfuse2_path`.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `fusermount3 -u` failed.
    #[error("mount {name:?}: cannot unmount {path}: {detail}")]
    Unmount {
        /// The mount.
        name: String,
        /// Its path.
        path: PathBuf,
        /// fusermount3's message.
        detail: String,
    },
    /// The cache dir is not the agent's to empty (it holds files and no
    /// agent marker), or cannot be taken.
    #[error("mount {name:?}: cache_dir: {problem}")]
    CacheDir {
        /// The mount.
        name: String,
        /// The directory.
        path: PathBuf,
        /// Why it is refused.
        problem: String,
    },
    /// The store could not record the mount.
    #[error("mount {name:?}: {source}")]
    Store {
        /// The mount.
        name: String,
        /// Why.
        #[source]
        source: crate::store::StoreError,
    },
    /// A requested path lies on a filesystem that does not answer.
    #[error("mount {name:?}: {field}: {source}")]
    Unanswered {
        /// The mount.
        name: String,
        /// `mount_path` or `cache_dir`.
        field: &'static str,
        /// Why there is no answer.
        source: crate::paths::offload::OffloadError,
    },
    /// The mount was unmounted or the agent is stopping while the request waited.
    #[error("mount {0:?} was stopped before it finished mounting")]
    Cancelled(String),
}

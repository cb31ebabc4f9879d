//! What a reclaim step is: the [`ReclaimStep`] trait that each owner of
//! reclaimable data implements (exited job containers and dangling images in
//! `disk::docker`; expired job logs in `jobs`; mount caches in `mounts`), what
//! a step frees ([`Freed`], [`Removals`]) and how it fails ([`ReclaimError`]).
//!
//! Never user files: each step deletes only what its owner created.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::jobs::engine::EngineError;

/// What a step freed, or would free.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Freed {
    /// Bytes.
    pub bytes: u64,
    /// Items removed (containers, images, files, caches).
    pub items: u32,
}

impl Freed {
    /// One item of `bytes`.
    pub fn item(bytes: u64) -> Self {
        Self { bytes, items: 1 }
    }

    /// Adds another amount.
    pub fn add(&mut self, other: Freed) {
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.items = self.items.saturating_add(other.items);
    }
}

impl std::iter::Sum for Freed {
    fn sum<I: Iterator<Item = Freed>>(iter: I) -> Self {
        let mut total = Freed::default();
        for freed in iter {
            total.add(freed);
        }
        total
    }
}

/// The outcome of a step that removes items one by one and goes on past a
/// failure: what was freed, and how many failed with the first error.
#[derive(Debug, Default)]
pub struct Removals {
    freed: Freed,
    failed: u32,
    first: Option<ReclaimError>,
}

impl Removals {
    /// One item of `bytes` was removed.
    pub fn removed(&mut self, bytes: u64) {
        self.freed.add(Freed::item(bytes));
    }

    /// One item could not be removed.
    pub fn failed(&mut self, error: impl Into<ReclaimError>) {
        self.failed = self.failed.saturating_add(1);
        self.first.get_or_insert(error.into());
    }

    /// What was freed, or [`ReclaimError::Partial`] when anything failed.
    pub fn finish(self) -> Result<Freed, ReclaimError> {
        match self.first {
            None => Ok(self.freed),
            Some(first) => Err(ReclaimError::Partial {
                freed: self.freed,
                failed: self.failed,
                first: Box::new(first),
            }),
        }
    }
}

/// A reclaim step failed.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    /// The container engine refused or did not answer.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A file or directory could not be removed.
    #[error("cannot remove {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Some items were removed, then others failed.
    #[error("{failed} item(s) could not be removed; first error: {first}")]
    Partial {
        /// What was freed before and after the failures.
        freed: Freed,
        /// How many items failed.
        failed: u32,
        /// The first failure.
        #[source]
        first: Box<ReclaimError>,
    },
    /// A step's own error (for steps owned by other modules).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// One kind of reclaimable data.
#[async_trait]
pub trait ReclaimStep: Send + Sync + 'static {
    /// Its name in reports: "exited_containers", "dangling_images",
    /// "expired_job_logs", "mount_caches", "unknown_containers".
    fn name(&self) -> &'static str;
    /// True for a step that only runs when a reclaim asks for it
    /// ([`super::ReclaimMode::asked_steps`]): never in an automatic reclaim,
    /// whatever the need, and left out of the report when not asked for.
    fn only_when_asked(&self) -> bool {
        false
    }
    /// What [`ReclaimStep::run`] would free now, deleting nothing.
    async fn estimate(&self) -> Result<Freed, ReclaimError>;
    /// Frees what it can.
    async fn run(&self) -> Result<Freed, ReclaimError>;
    /// A path on the filesystem whose space this step frees, so that it is
    /// skipped when that filesystem is not short of space (pruning images
    /// cannot help a full /mnt). `None`: it may free space anywhere.
    async fn location(&self) -> Option<PathBuf> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_count_every_failure_and_keep_the_first() {
        let mut ok = Removals::default();
        ok.removed(10);
        ok.removed(5);
        assert_eq!(
            ok.finish().unwrap(),
            Freed {
                bytes: 15,
                items: 2
            }
        );
        let mut partial = Removals::default();
        partial.removed(10);
        partial.failed(ReclaimError::Other("first".into()));
        partial.failed(ReclaimError::Other("second".into()));
        match partial.finish() {
            Err(ReclaimError::Partial {
                freed,
                failed,
                first,
            }) => {
                assert_eq!(freed, Freed::item(10));
                assert_eq!(failed, 2);
                assert_eq!(first.to_string(), "first");
            }
            other => panic!("{other:?}"),
        }
        let sum: Freed = [Freed::item(1), Freed::item(2)].into_iter().sum();
        assert_eq!(sum, Freed { bytes: 3, items: 2 });
    }
}

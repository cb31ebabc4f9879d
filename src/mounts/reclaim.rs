//! The disk guard's "mount_caches" step: empties the file caches of managed
//! mounts (blobfuse2 fetches again what it needs). Files a process holds open
//! through a live mount are kept.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::MountService;
use crate::disk::reclaim::{Freed, ReclaimError, ReclaimStep, Removals};

/// Empties mount caches.
pub struct MountCaches {
    mounts: MountService,
    cache_root: PathBuf,
}

impl MountCaches {
    /// The step for `mounts`, whose caches live below `cache_root` by default.
    pub fn new(mounts: MountService, cache_root: PathBuf) -> Self {
        Self { mounts, cache_root }
    }
}

/// Bytes of regular files below `dir` (blocking).
fn size_of(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => size_of(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

#[async_trait]
impl ReclaimStep for MountCaches {
    fn name(&self) -> &'static str {
        "mount_caches"
    }

    async fn estimate(&self) -> Result<Freed, ReclaimError> {
        let dirs = self.mounts.cache_dirs();
        let items = u32::try_from(dirs.len()).unwrap_or(u32::MAX);
        let paths: Vec<PathBuf> = dirs.into_iter().map(|d| d.path).collect();
        let bytes = tokio::task::spawn_blocking(move || paths.iter().map(|p| size_of(p)).sum())
            .await
            .unwrap_or(0);
        Ok(Freed { bytes, items })
    }

    async fn run(&self) -> Result<Freed, ReclaimError> {
        let mut removals = Removals::default();
        for dir in self.mounts.cache_dirs() {
            match self.mounts.empty_cache(&dir.name).await {
                Ok(bytes) => removals.removed(bytes),
                Err(error) => removals.failed(ReclaimError::Other(Box::new(error))),
            }
        }
        removals.finish()
    }

    async fn location(&self) -> Option<PathBuf> {
        // Caches usually share the cache root's filesystem (the temp disk).
        Some(
            self.mounts
                .cache_dirs()
                .into_iter()
                .next()
                .map_or_else(|| self.cache_root.clone(), |d| d.path),
        )
    }
}

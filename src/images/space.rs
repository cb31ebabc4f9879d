//! Disk space for pulls: the narrow trait the pulls and the reclaim steps
//! use ([`PullSpace`]: where images land, how much is free there against
//! the disk guard's floor, and whether the guard holds admission), and its
//! implementation on the disk guard's public handle and probe
//! ([`GuardSpace`]). Nothing here changes the guard; it only reads what the
//! guard offers.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::admission::AdmissionGate;
use crate::disk::config::DiskConfig;
use crate::disk::docker::DockerSpace;
use crate::disk::probe::FsProbe;
use crate::disk::{DiskGuard, Thresholds};

/// The disk guard's name on the admission gate.
const DISK_HOLDER: &str = "disk";
/// How long one look at the filesystem may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The filesystem where images land, as measured now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes available.
    pub free_bytes: u64,
    /// Size of the filesystem.
    pub total_bytes: u64,
    /// The disk guard's floor (critical level) for it.
    pub floor_bytes: u64,
    /// The guard's clear margin above the floor.
    pub margin_bytes: u64,
}

/// Whether a pull of some size fits above the floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// It fits now.
    Fits,
    /// It would cross the floor: this many bytes are missing.
    Short(u64),
    /// It cannot fit even on an empty filesystem: this much is all there is
    /// above the floor.
    Never(u64),
}

impl Space {
    /// Whether `need` bytes fit above the floor.
    pub fn fit(&self, need: u64) -> Fit {
        let room = self.free_bytes.saturating_sub(self.floor_bytes);
        let capacity = self.total_bytes.saturating_sub(self.floor_bytes);
        if need <= room {
            Fit::Fits
        } else if need > capacity {
            Fit::Never(capacity)
        } else {
            Fit::Short(need - room)
        }
    }

    /// What reclaim must free for the floor plus the margin plus `need`.
    pub fn shortfall(&self, need: u64) -> u64 {
        self.floor_bytes
            .saturating_add(self.margin_bytes)
            .saturating_add(need)
            .saturating_sub(self.free_bytes)
    }
}

/// Disk space as pulls see it.
#[async_trait]
pub trait PullSpace: Send + Sync + 'static {
    /// Where pulled images land (the engine's data root), when known.
    async fn location(&self) -> Option<PathBuf>;
    /// That filesystem now; `None` while it cannot be measured.
    async fn measure(&self) -> Option<Space>;
    /// Why the disk guard holds admission (pulls wait too), if it does.
    fn held(&self) -> Option<String>;
}

/// [`PullSpace`] on the disk guard: its levels (with the per-path
/// overrides), its probe for a fresh sample, its admission hold, and the
/// engine's data root.
pub struct GuardSpace {
    probe: Arc<dyn FsProbe>,
    docker: Arc<dyn DockerSpace>,
    admission: AdmissionGate,
    config: watch::Receiver<DiskConfig>,
    guard: OnceLock<DiskGuard>,
    /// `images.space_check_path` (tests only).
    override_path: Option<PathBuf>,
    data_root: tokio::sync::Mutex<Option<PathBuf>>,
}

impl GuardSpace {
    /// Space on the engine's data root (or on `override_path`).
    pub fn new(
        probe: Arc<dyn FsProbe>,
        docker: Arc<dyn DockerSpace>,
        admission: AdmissionGate,
        config: watch::Receiver<DiskConfig>,
        override_path: Option<PathBuf>,
    ) -> Self {
        Self {
            probe,
            docker,
            admission,
            config,
            guard: OnceLock::new(),
            override_path,
            data_root: tokio::sync::Mutex::new(None),
        }
    }

    /// Hands over the guard once it is built (it is built after the images
    /// domain, whose reclaim steps it runs); until then the levels come from
    /// `[disk]` alone.
    pub fn set_guard(&self, guard: DiskGuard) {
        if let Some(path) = &self.override_path {
            guard.register(path.clone(), "image pulls (images.space_check_path)");
        }
        let _ = self.guard.set(guard);
    }

    fn thresholds(&self, path: &std::path::Path) -> Thresholds {
        let tidy = crate::paths::tidy(path);
        if let Some(guard) = self.guard.get()
            && let Some(fs) = guard
                .usage()
                .filesystems
                .into_iter()
                .find(|fs| fs.paths.iter().any(|p| p.path == tidy))
        {
            return fs.thresholds;
        }
        Thresholds::for_paths(&self.config.borrow(), [path])
    }
}

#[async_trait]
impl PullSpace for GuardSpace {
    async fn location(&self) -> Option<PathBuf> {
        if let Some(path) = &self.override_path {
            return Some(path.clone());
        }
        let mut cached = self.data_root.lock().await;
        if cached.is_none() {
            *cached = self.docker.data_root().await.ok();
        }
        cached.clone()
    }

    async fn measure(&self) -> Option<Space> {
        let path = self.location().await?;
        let probe = self.probe.clone();
        let sampled = path.clone();
        let sample = tokio::time::timeout(
            PROBE_TIMEOUT,
            tokio::task::spawn_blocking(move || probe.sample(&sampled)),
        )
        .await
        .ok()?
        .ok()?
        .ok()?;
        let thresholds = self.thresholds(&path);
        Some(Space {
            free_bytes: sample.stats.free_bytes,
            total_bytes: sample.stats.total_bytes,
            floor_bytes: thresholds.critical_free_bytes,
            margin_bytes: thresholds.clear_margin_bytes,
        })
    }

    fn held(&self) -> Option<String> {
        self.admission
            .subscribe()
            .borrow()
            .get(DISK_HOLDER)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_fits_waits_or_never_fits() {
        let space = Space {
            free_bytes: 700,
            total_bytes: 1000,
            floor_bytes: 500,
            margin_bytes: 50,
        };
        assert_eq!(space.fit(200), Fit::Fits);
        assert_eq!(space.fit(300), Fit::Short(100));
        assert_eq!(space.fit(501), Fit::Never(500));
        assert_eq!(space.shortfall(0), 0);
        assert_eq!(space.shortfall(300), 150);
    }
}

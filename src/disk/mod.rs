//! Disk guard: free space and inodes on every filesystem that matters, a
//! recovery floor with hysteresis, alerts, admission holds, safe reclaim and
//! operator diagnostics.
//!
//! Owns the `[disk]` section ([`config`]) and the levels it yields per
//! filesystem ([`Thresholds`]), the guard ([`guard`]: what is watched and
//! why, sampling, alerts), the pressure state machine ([`hysteresis`]), the
//! reserve file in the state dir ([`reserve`]), reclaim ([`reclaim`]: the
//! steps, running them, when and for what) with the Docker steps
//! ([`docker`]), and the walk behind `disk --top` ([`top`]). Reaches the
//! outside world only through [`probe::FsProbe`] (statvfs, stat, mountinfo)
//! and [`docker::DockerSpace`] (the engine; implemented in
//! `jobs::docker_space`); fakes of both in [`fake`]. Knows nothing of gRPC;
//! must not touch user files: the only files it deletes are its own reserve
//! file and what reclaim steps own.

pub mod config;
pub mod docker;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod guard;
pub mod hysteresis;
pub mod probe;
pub mod reclaim;
pub mod reserve;
pub mod top;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::store::StoreError;

pub use guard::{DiskGuard, DiskParts};

/// The state of one watched filesystem, ordered from least to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DiskState {
    /// Not sampled yet, or no longer watched.
    Unknown,
    /// Above the warning level.
    Ok,
    /// Below the warning level.
    Warning,
    /// Below the critical level (the recovery floor).
    Critical,
    /// The last sample did not answer within its timeout, or failed.
    Unresponsive,
}

impl DiskState {
    /// Lowercase name for logs and messages.
    pub fn name(self) -> &'static str {
        match self {
            DiskState::Unknown => "unknown",
            DiskState::Ok => "ok",
            DiskState::Warning => "warning",
            DiskState::Critical => "critical",
            DiskState::Unresponsive => "unresponsive",
        }
    }
}

/// The levels applied to one filesystem (built from the `[disk]` section
/// in [`config`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Free bytes below which the state is warning.
    pub warning_free_bytes: u64,
    /// Free bytes below which the state is critical.
    pub critical_free_bytes: u64,
    /// Free inodes (percent) below which the state is warning.
    pub warning_free_inodes_percent: f64,
    /// Free inodes (percent) below which the state is critical.
    pub critical_free_inodes_percent: f64,
    /// Free bytes needed above a level before the state may improve.
    pub clear_margin_bytes: u64,
    /// Free inodes (percent) needed above a level before the state may improve.
    pub clear_margin_inodes_percent: f64,
    /// How long an improvement must hold.
    pub transition: Duration,
}

impl Thresholds {
    /// Free bytes the filesystem needs before reclaim may stop: the floor
    /// plus the margin.
    pub fn reclaim_target_bytes(&self) -> u64 {
        self.critical_free_bytes
            .saturating_add(self.clear_margin_bytes)
    }

    /// Free inodes (percent) the filesystem needs before reclaim may stop:
    /// the inode floor plus its margin.
    pub fn reclaim_target_inodes_percent(&self) -> f64 {
        self.critical_free_inodes_percent + self.clear_margin_inodes_percent
    }

    /// What reclaim still has to free on a filesystem with `stats`: the
    /// bytes missing below the floor plus the margin, or 1 when only inodes
    /// are short. Inodes have no byte measure, so every removal counts until
    /// the inodes recover; 0 means nothing is needed.
    pub fn reclaim_shortfall(&self, stats: &FsStats) -> u64 {
        let bytes = self.reclaim_target_bytes().saturating_sub(stats.free_bytes);
        let inodes_short = stats
            .free_inodes_percent()
            .is_some_and(|free| free < self.reclaim_target_inodes_percent());
        if bytes == 0 && inodes_short { 1 } else { bytes }
    }
}

/// Space and inodes of a filesystem, as statvfs reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsStats {
    /// Total size in bytes.
    pub total_bytes: u64,
    /// Bytes available to unprivileged users (`df`'s Avail).
    pub free_bytes: u64,
    /// Total inodes (0 when the filesystem does not count them).
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
}

impl FsStats {
    /// Free inodes in percent, `None` when the filesystem has no inode count.
    pub fn free_inodes_percent(&self) -> Option<f64> {
        (self.total_inodes > 0).then(|| self.free_inodes as f64 * 100.0 / self.total_inodes as f64)
    }
}

/// Where a filesystem is mounted and what it is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountInfo {
    /// Its mount point.
    pub mount_point: PathBuf,
    /// The device or source (e.g. /dev/sda1, tmpfs).
    pub device: String,
    /// The filesystem type.
    pub fs_type: String,
}

impl MountInfo {
    /// What is known of a path whose mount could not be found: the path.
    pub fn unknown(path: &std::path::Path) -> Self {
        Self {
            mount_point: path.to_owned(),
            device: "unknown".into(),
            fs_type: "unknown".into(),
        }
    }
}

/// A watched path and why it is watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedPath {
    /// The path.
    pub path: PathBuf,
    /// Why ("root filesystem", "docker data root", "cache of mount data", ...).
    pub reasons: Vec<String>,
}

/// One watched filesystem as last sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct FilesystemUsage {
    /// Where it is mounted.
    pub mount: MountInfo,
    /// The watched paths that live on it.
    pub paths: Vec<WatchedPath>,
    /// The latest numbers, once sampled.
    pub stats: Option<FsStats>,
    /// Its state.
    pub state: DiskState,
    /// The levels applied.
    pub thresholds: Thresholds,
    /// When the latest sample was taken.
    pub sampled_at: Option<SystemTime>,
    /// Why the latest sample failed or timed out.
    pub error: Option<String>,
    /// Alerts raised for it since the agent started.
    pub alerts: u64,
    /// True when it holds the Docker data root or the state dir, so that its
    /// being critical holds the job queue.
    pub guards_admission: bool,
}

/// A watched path that could not be placed on a filesystem (it does not
/// exist, or is not a directory): reported, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedPath {
    /// The path.
    pub path: PathBuf,
    /// Why it is watched.
    pub reasons: Vec<String>,
    /// What is wrong with it.
    pub problem: String,
}

/// Everything `GetDiskUsage` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskUsage {
    /// One entry per watched filesystem.
    pub filesystems: Vec<FilesystemUsage>,
    /// Watched paths that are absent.
    pub skipped: Vec<SkippedPath>,
    /// Alerts raised since the agent started.
    pub alerts_total: u64,
}

/// A change of a filesystem's state.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskAlert {
    /// The state before ([`DiskState::Unknown`] when the filesystem was just
    /// added to the watch; equal to `new_state` in the current-state alerts a
    /// new subscriber first receives).
    pub old_state: DiskState,
    /// The state now ([`DiskState::Unknown`] when it is no longer watched).
    pub new_state: DiskState,
    /// The level that was crossed, in free bytes (0 when the cause is inodes
    /// or unresponsiveness). In a current-state alert: the level that defines
    /// the state (the floor when critical, the warning level otherwise).
    pub threshold_bytes: u64,
    /// The level that was crossed, in percent of free inodes (0 when the
    /// cause is bytes or unresponsiveness). In a current-state alert: the
    /// inode level that defines the state.
    pub threshold_inodes_percent: f64,
    /// When the transition was decided.
    pub time: SystemTime,
    /// One line for people, e.g. "/ has 4.2 GiB free, below the 5.0 GiB floor".
    pub message: String,
    /// The filesystem at the time of the alert.
    pub usage: FilesystemUsage,
}

/// A disk guard operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A request field is out of range or malformed.
    #[error("{field}: {problem}")]
    InvalidRequest {
        /// The field.
        field: &'static str,
        /// What is wrong and what is allowed.
        problem: String,
    },
    /// A path could not be examined.
    #[error("cannot examine {path}: {source}")]
    Path {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A path's filesystem did not answer in time.
    #[error("{path} did not answer within {timeout:?} (a hung network or FUSE filesystem?)")]
    Timeout {
        /// The path.
        path: PathBuf,
        /// The limit.
        timeout: Duration,
    },
    /// A probe of the filesystem was stuck when this one was asked for: the
    /// filesystem is unresponsive, answered without probing it again.
    #[error(
        "{path}: the filesystem at {filesystem} is not answering: a probe of it has been stuck for {} s (a hung network or FUSE filesystem?); it is not probed again until that probe returns",
        stuck_for.as_secs()
    )]
    Unresponsive {
        /// The path asked for.
        path: PathBuf,
        /// The filesystem it names (its mount point).
        filesystem: PathBuf,
        /// How long the stuck probe has been running.
        stuck_for: Duration,
    },
    /// Too much of the same work is running (a walk of the filesystem, or
    /// the limit of probes at once); says which.
    #[error("{0}")]
    Busy(String),
    /// The store refused a write or read.
    #[error("cannot save the disk guard's settings: {0}")]
    Store(#[source] StoreError),
    /// The guard has stopped (the agent is shutting down).
    #[error("the disk guard has stopped: the agent is shutting down")]
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_percent_ignores_filesystems_without_inodes() {
        let stats = FsStats {
            total_inodes: 0,
            ..FsStats::default()
        };
        assert_eq!(stats.free_inodes_percent(), None);
        let stats = FsStats {
            total_inodes: 200,
            free_inodes: 50,
            ..FsStats::default()
        };
        assert_eq!(stats.free_inodes_percent(), Some(25.0));
    }

    #[test]
    fn reclaim_shortfall_counts_bytes_and_inodes() {
        // The `[disk]` defaults.
        let t = Thresholds {
            warning_free_bytes: 10 << 30,
            critical_free_bytes: 5 << 30,
            warning_free_inodes_percent: 10.0,
            critical_free_inodes_percent: 5.0,
            clear_margin_bytes: 1 << 30,
            clear_margin_inodes_percent: 1.0,
            transition: Duration::from_secs(30),
        };
        let target = t.reclaim_target_bytes();
        let plenty = FsStats {
            total_bytes: 4 * target,
            free_bytes: 2 * target,
            total_inodes: 1000,
            free_inodes: 500,
        };
        assert_eq!(t.reclaim_shortfall(&plenty), 0);
        let short_of_bytes = FsStats {
            free_bytes: target - 10,
            ..plenty
        };
        assert_eq!(t.reclaim_shortfall(&short_of_bytes), 10);
        // Inodes below the inode floor plus margin, bytes plenty: still short.
        let short_of_inodes = FsStats {
            free_inodes: 1,
            ..plenty
        };
        assert_eq!(t.reclaim_shortfall(&short_of_inodes), 1);
        // A filesystem without an inode count is never short of inodes.
        let no_inodes = FsStats {
            total_inodes: 0,
            free_inodes: 0,
            ..plenty
        };
        assert_eq!(t.reclaim_shortfall(&no_inodes), 0);
    }
}

//! The disk guard's narrow interface to filesystems: which filesystem a path
//! is on, its free space and inodes, and where it is mounted.
//!
//! Two ways to ask, by who controls the path:
//! - [`FsProbe`], in the agent's own threads, for the agent's own well-known
//!   filesystems only (`/`, `/tmp`, `/mnt`, the state dir, the Docker data
//!   root: their mount points belong to root, so no user can put a FUSE
//!   server under them). Every call may still block, so callers run it in
//!   `spawn_blocking` with a timeout: [`sample_within`] does both.
//! - [`IsolatedProbe`], in a short-lived helper process, for every path that
//!   users or remote storage control (callers' paths, paths added over the
//!   API or in config, mount caches, managed mount roots, `disk --top`
//!   walks). A call into a FUSE server that never answers can leave a thread
//!   in the kernel beyond the reach of SIGKILL; in a helper that is the
//!   helper's problem, not the agent's: the agent stops waiting, kills it and
//!   goes on. [`helper::HelperProbe`] is the real one, [`child`] the program
//!   it runs, [`wire`] what they say to each other, and [`flights`] what
//!   keeps probes asked for by callers bounded (one per filesystem, a hung
//!   filesystem answered at once).
//!
//! Fakes of both sit in `disk::fake`.

pub mod child;
pub mod flights;
pub mod helper;
pub mod wire;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::top::{TopProgress, TopReport, TopRequest};
use super::{DiskError, FsStats, MountInfo};
use crate::mountinfo::MountEntry;

/// What one probe of a path found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathSample {
    /// The filesystem's device number (`st_dev`): paths with the same one
    /// share a filesystem.
    pub dev: u64,
    /// Space and inodes.
    pub stats: FsStats,
}

/// Filesystems as the disk guard sees them. Blocking.
pub trait FsProbe: Send + Sync + 'static {
    /// `stat` and `statvfs` of `path`.
    fn sample(&self, path: &Path) -> io::Result<PathSample>;
    /// Where the filesystem with device `dev` that holds `path` is mounted.
    fn mount_of(&self, path: &Path, dev: u64) -> io::Result<MountInfo>;
}

/// What a sample of one path found: its numbers, and where its filesystem
/// is mounted when that was asked for.
pub type Sampled = (PathSample, Option<MountInfo>);

/// One answer of a batch sample: the index of the path asked for, and what
/// its probe found.
pub type SampleAnswer = (usize, io::Result<Sampled>);

/// One answer of a walk in a helper.
#[derive(Debug)]
pub enum WalkAnswer {
    /// How far it has got.
    Progress(TopProgress),
    /// Its end.
    Done(io::Result<TopReport>),
}

/// A probe running where a hang cannot hold the agent. Its answers arrive
/// as they are known; the channel closes only once the probe is really gone
/// (the helper reaped), which for a helper stuck in a hung filesystem may be
/// never: holding on to a run until then is how callers keep one probe per
/// filesystem.
pub struct ProbeRun<T> {
    /// Answers as they come.
    pub answers: mpsc::UnboundedReceiver<T>,
    /// Cancel to kill the probe now (it is killed at its deadline anyway).
    pub kill: CancellationToken,
}

/// Probes of paths that users or remote storage control, each run in a
/// helper process that is killed at its deadline. Must be called within the
/// tokio runtime.
pub trait IsolatedProbe: Send + Sync + 'static {
    /// Samples every `(path, want_mount)` in one helper: `stat` and
    /// `statvfs`, and where its filesystem is mounted when `want_mount`.
    /// Answers are `(index, outcome)`; the helper is killed after `timeout`.
    fn sample(&self, paths: Vec<(PathBuf, bool)>, timeout: Duration) -> ProbeRun<SampleAnswer>;
    /// Walks `request` (`disk --top`) in a helper, killed after `limit`.
    fn walk(&self, request: TopRequest, limit: Duration) -> ProbeRun<WalkAnswer>;
    /// Which filesystem `path` names, by its text alone (the mount point of
    /// the deepest mount that is a prefix of it), without touching any
    /// filesystem: the key of one probe at a time.
    fn filesystem_of(&self, path: &Path) -> PathBuf;
}

/// The real thing: `stat(2)`, `statvfs(3)` and `/proc/self/mountinfo`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemProbe;

impl FsProbe for SystemProbe {
    fn sample(&self, path: &Path) -> io::Result<PathSample> {
        let dev = std::fs::metadata(path)?.dev();
        let vfs = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
        // On 64-bit Linux every statvfs field is a u64 already.
        let fragment = vfs.fragment_size().max(1);
        Ok(PathSample {
            dev,
            stats: FsStats {
                total_bytes: vfs.blocks().saturating_mul(fragment),
                free_bytes: vfs.blocks_available().saturating_mul(fragment),
                total_inodes: vfs.files(),
                free_inodes: vfs.files_available(),
            },
        })
    }

    fn mount_of(&self, path: &Path, dev: u64) -> io::Result<MountInfo> {
        let table = crate::mountinfo::read()?;
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        Ok(mount_for(table, &path, dev).unwrap_or_else(|| MountInfo::unknown(&path)))
    }
}

/// `stat` and `statvfs` of `path` through `probe`, and where its filesystem
/// is mounted when `want_mount` (a mount table that cannot be read leaves it
/// unknown). Blocking.
pub fn sample_with_mount<P: FsProbe + ?Sized>(
    probe: &P,
    path: &Path,
    want_mount: bool,
) -> io::Result<Sampled> {
    let sample = probe.sample(path)?;
    let mount = want_mount
        .then(|| probe.mount_of(path, sample.dev).ok())
        .flatten();
    Ok((sample, mount))
}

/// Samples one path off the runtime, giving up after `timeout` (the blocked
/// thread is left to the hung filesystem; its answer is dropped).
pub async fn sample_within(
    probe: &Arc<dyn FsProbe>,
    path: &Path,
    timeout: Duration,
) -> Result<PathSample, DiskError> {
    let probe = probe.clone();
    let owned = path.to_owned();
    let handle = tokio::task::spawn_blocking(move || probe.sample(&owned));
    match tokio::time::timeout(timeout, handle).await {
        Ok(Ok(Ok(sample))) => Ok(sample),
        Ok(Ok(Err(source))) => Err(DiskError::Path {
            path: path.to_owned(),
            source,
        }),
        Ok(Err(join)) => Err(DiskError::Path {
            path: path.to_owned(),
            source: std::io::Error::other(join.to_string()),
        }),
        Err(_) => Err(DiskError::Timeout {
            path: path.to_owned(),
            timeout,
        }),
    }
}

/// The mount in the mount table that holds `path`: the longest mount point
/// that is a prefix of it, preferring entries with the same device number
/// (bind mounts of one filesystem share it).
pub fn mount_for(table: Vec<MountEntry>, path: &Path, dev: u64) -> Option<MountInfo> {
    let wanted = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    table
        .into_iter()
        .filter(|entry| path.starts_with(&entry.mount_point))
        // Among the mounts holding the path: the same device first, then the
        // deepest mount point; the last such line on a tie (mounted on top).
        .max_by_key(|entry| (entry.dev == wanted, entry.mount_point.components().count()))
        .map(|entry| MountInfo {
            mount_point: entry.mount_point,
            device: entry.source,
            fs_type: entry.fs_type,
        })
}

pub use crate::mountinfo::lexical_mount;

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
42 27 254:0 /var/lib/docker /var/lib/docker rw,relatime shared:1 - ext4 /dev/vda rw
50 27 0:40 / /tmp/with\\040space rw - tmpfs tmpfs rw,size=65536k
51 27 0:41 / /mnt rw - ext4 /dev/sdb1 rw
";

    fn dev(major: u64, minor: u64) -> u64 {
        nix::sys::stat::makedev(major, minor)
    }

    #[test]
    fn longest_prefix_with_the_same_device_wins() {
        let m = mount_for(
            crate::mountinfo::parse(TABLE),
            Path::new("/var/lib/docker/overlay2"),
            dev(254, 0),
        )
        .unwrap();
        assert_eq!(m.mount_point, Path::new("/var/lib/docker"));
        let m = mount_for(
            crate::mountinfo::parse(TABLE),
            Path::new("/var/lib/instance-agent"),
            dev(254, 0),
        )
        .unwrap();
        assert_eq!(m.mount_point, Path::new("/"));
        assert_eq!(m.device, "/dev/vda");
        assert_eq!(m.fs_type, "ext4");
        let m = mount_for(
            crate::mountinfo::parse(TABLE),
            Path::new("/mnt/cache"),
            dev(0, 41),
        )
        .unwrap();
        assert_eq!(m.device, "/dev/sdb1");
    }

    #[test]
    fn a_path_names_the_deepest_mount_it_is_below() {
        let table = crate::mountinfo::parse(TABLE);
        assert_eq!(
            lexical_mount(&table, Path::new("/mnt/cache/x")),
            Path::new("/mnt")
        );
        assert_eq!(lexical_mount(&table, Path::new("/mntx")), Path::new("/"));
        assert_eq!(
            lexical_mount(&table, Path::new("/var/lib/docker")),
            Path::new("/var/lib/docker")
        );
        assert_eq!(lexical_mount(&[], Path::new("/a")), Path::new("/"));
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        let m = mount_for(
            crate::mountinfo::parse(TABLE),
            Path::new("/tmp/with space/x"),
            dev(0, 40),
        )
        .unwrap();
        assert_eq!(m.mount_point, Path::new("/tmp/with space"));
        assert_eq!(m.fs_type, "tmpfs");
    }

    #[test]
    fn real_probe_samples_the_root_filesystem() {
        let probe = SystemProbe;
        let sample = FsProbe::sample(&probe, Path::new("/")).expect("stat /");
        assert!(sample.stats.total_bytes > 0);
        assert!(sample.stats.free_bytes <= sample.stats.total_bytes);
        let mount = probe
            .mount_of(Path::new("/"), sample.dev)
            .expect("mountinfo");
        assert_eq!(mount.mount_point, Path::new("/"));
        let missing = FsProbe::sample(&probe, Path::new("/nonexistent/instance-agent"));
        assert_eq!(missing.unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}

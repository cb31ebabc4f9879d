//! The disk guard's narrow interface to filesystems: which filesystem a path
//! is on, its free space and inodes, and where it is mounted.
//!
//! Every call may block for as long as the filesystem wants (a hung network
//! or FUSE mount blocks `stat` and `statvfs` indefinitely), so callers run it
//! in `spawn_blocking` with a timeout and never on the async runtime:
//! [`sample_within`] does both for one path. A fake sits in `disk::fake`.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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
        let sample = probe.sample(Path::new("/")).expect("stat /");
        assert!(sample.stats.total_bytes > 0);
        assert!(sample.stats.free_bytes <= sample.stats.total_bytes);
        let mount = probe
            .mount_of(Path::new("/"), sample.dev)
            .expect("mountinfo");
        assert_eq!(mount.mount_point, Path::new("/"));
        let missing = probe.sample(Path::new("/nonexistent/instance-agent"));
        assert_eq!(missing.unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}

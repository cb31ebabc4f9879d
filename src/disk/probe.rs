//! The disk guard's narrow interface to filesystems: which filesystem a path
//! is on, its free space and inodes, and where it is mounted.
//!
//! Every call may block for as long as the filesystem wants (a hung network
//! or FUSE mount blocks `stat` and `statvfs` indefinitely), so callers run it
//! in `spawn_blocking` with a timeout and never on the async runtime.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{FsStats, MountInfo};
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

/// A fake filesystem world for tests: paths map to filesystems whose numbers
/// the test sets, and a filesystem can be made to hang until released.
#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    use std::collections::BTreeMap;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Condvar, Mutex};

    use super::{FsProbe, PathSample};
    use crate::disk::{FsStats, MountInfo};

    #[derive(Default)]
    struct World {
        /// path → device number.
        paths: BTreeMap<PathBuf, u64>,
        /// device number → (mount, stats).
        filesystems: BTreeMap<u64, (MountInfo, FsStats)>,
        /// Devices whose calls block until released.
        hung: BTreeMap<u64, bool>,
        /// Calls of `sample`, by path.
        calls: BTreeMap<PathBuf, u32>,
        /// Calls currently blocked.
        blocked: u32,
    }

    /// The fake probe. Cheap to clone; clones share the world.
    #[derive(Clone, Default)]
    pub struct FakeProbe {
        world: Arc<(Mutex<World>, Condvar)>,
    }

    impl FakeProbe {
        /// An empty world: every path is absent.
        pub fn new() -> Self {
            Self::default()
        }

        fn world(&self) -> std::sync::MutexGuard<'_, World> {
            self.world.0.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Adds a filesystem mounted at `mount_point` with device `dev`.
        pub fn add_fs(&self, dev: u64, mount_point: &str, stats: FsStats) {
            let mut world = self.world();
            world.filesystems.insert(
                dev,
                (
                    MountInfo {
                        mount_point: mount_point.into(),
                        device: format!("fake{dev}"),
                        fs_type: "fakefs".into(),
                    },
                    stats,
                ),
            );
            world.paths.insert(mount_point.into(), dev);
        }

        /// Puts `path` on filesystem `dev`.
        pub fn add_path(&self, path: &str, dev: u64) {
            self.world().paths.insert(path.into(), dev);
        }

        /// Removes `path`: it becomes absent.
        pub fn remove_path(&self, path: &str) {
            self.world().paths.remove(Path::new(path));
        }

        /// Sets the free bytes of filesystem `dev`.
        pub fn set_free(&self, dev: u64, free_bytes: u64) {
            if let Some((_, stats)) = self.world().filesystems.get_mut(&dev) {
                stats.free_bytes = free_bytes;
            }
        }

        /// Sets the free inodes of filesystem `dev`.
        pub fn set_free_inodes(&self, dev: u64, free_inodes: u64) {
            if let Some((_, stats)) = self.world().filesystems.get_mut(&dev) {
                stats.free_inodes = free_inodes;
            }
        }

        /// Makes every call on filesystem `dev` block until [`Self::release`].
        pub fn hang(&self, dev: u64) {
            self.world().hung.insert(dev, true);
        }

        /// Unblocks filesystem `dev`.
        pub fn release(&self, dev: u64) {
            self.world().hung.remove(&dev);
            self.world.1.notify_all();
        }

        /// How many times `path` was sampled.
        pub fn calls(&self, path: &str) -> u32 {
            self.world()
                .calls
                .get(Path::new(path))
                .copied()
                .unwrap_or(0)
        }

        /// How many calls are blocked right now.
        pub fn blocked(&self) -> u32 {
            self.world().blocked
        }

        fn dev_of(&self, path: &Path) -> io::Result<u64> {
            let mut world = self.world();
            *world.calls.entry(path.to_owned()).or_default() += 1;
            let dev = world
                .paths
                .get(path)
                .copied()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            if world.hung.contains_key(&dev) {
                world.blocked += 1;
                let (lock, cvar) = &*self.world;
                drop(world);
                let mut world = lock.lock().unwrap_or_else(|p| p.into_inner());
                while world.hung.contains_key(&dev) {
                    world = cvar.wait(world).unwrap_or_else(|p| p.into_inner());
                }
                world.blocked -= 1;
            }
            Ok(dev)
        }
    }

    impl FsProbe for FakeProbe {
        fn sample(&self, path: &Path) -> io::Result<PathSample> {
            let dev = self.dev_of(path)?;
            let world = self.world();
            let (_, stats) = world
                .filesystems
                .get(&dev)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            Ok(PathSample { dev, stats: *stats })
        }

        fn mount_of(&self, _path: &Path, dev: u64) -> io::Result<MountInfo> {
            let world = self.world();
            world
                .filesystems
                .get(&dev)
                .map(|(mount, _)| mount.clone())
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }
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

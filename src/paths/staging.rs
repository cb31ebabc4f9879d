//! Root-only staging binds: how a path that a user can change is handed to
//! another program (Docker, blobfuse2) anyway.
//!
//! The object is opened and checked once ([`Held`]), then bind-mounted from
//! its descriptor (`/proc/self/fd/N` as the source of `mount(2)`) onto an
//! entry of a staging directory that only root can reach and change (0700,
//! root-owned, every ancestor root-only). That entry is the path the other
//! program gets: whatever the user renames or swaps afterwards, it leads to
//! the checked object. [`Staging::mirror`] goes the other way for mount
//! points: the staged entry is made a shared mount and bound back onto the
//! held directory, so a filesystem mounted on the staged path shows at the
//! user's path too (mount propagation works on the held dentry, not by
//! name), and nothing is ever mounted by the user's path name.
//!
//! Entries are flat names chosen by the caller (a job id and an index, a
//! mount name); [`Staging::release`] takes every mount off an entry and
//! removes it, [`Staging::names`] lists what is left (for clean-up at
//! start). Blocking, and needs root (`CAP_SYS_ADMIN`).

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::mount::{MountPropagationFlags, UnmountFlags};

use super::held::Held;
use crate::mountinfo;

/// How many mounts stacked on one entry a release takes off at most.
const MAX_STACKED: usize = 16;

/// A root-only directory of staging binds.
#[derive(Debug, Clone)]
pub struct Staging {
    dir: PathBuf,
}

/// Why a staging dir cannot be used or an entry not made.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// The dir is not root-only.
    #[error("staging dir {}: {problem}", .dir.display())]
    NotPrivate {
        /// The dir.
        dir: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A system call failed.
    #[error("staging {}: cannot {action}: {source}", .path.display())]
    Io {
        /// The entry or dir.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl Staging {
    /// Creates `dir` (0700) when absent and checks that only root can
    /// change it or any ancestor.
    pub fn prepare(dir: &Path) -> Result<Self, StagingError> {
        let io = |action| {
            let path = dir.to_owned();
            move |source| StagingError::Io {
                path,
                action,
                source,
            }
        };
        let held =
            Held::open_dir_creating(dir, 0o700, &|_| Ok(())).map_err(io("create the dir"))?;
        let not_private = |problem: String| StagingError::NotPrivate {
            dir: held.path().to_owned(),
            problem,
        };
        let stat = held.stat();
        // 0711 is allowed (see `allow_traversal`): others may reach a known
        // entry, never list or change the dir.
        if stat.st_uid != 0 || stat.st_mode & 0o066 != 0 {
            return Err(not_private(format!(
                "must be owned by root with mode 0700 or 0711 (it is uid {}, mode {:o})",
                stat.st_uid,
                stat.st_mode & 0o7777
            )));
        }
        if let Some(who) = held.changeable().map_err(io("check the dir"))? {
            return Err(not_private(format!(
                "a user other than root can change it: {who}"
            )));
        }
        Ok(Self {
            dir: held.path().to_owned(),
        })
    }

    /// The staging dir (its real path; only root can change it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of entry `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn open_dir(&self) -> std::io::Result<Held> {
        Held::open_no_symlinks(&self.dir)
    }

    /// Binds `source` (recursively, as Docker binds do) at entry `name`,
    /// replacing whatever was there, and returns the entry's path. The
    /// entry is a private mount: later mounts below the source do not
    /// reach it.
    pub fn bind(&self, name: &str, source: &Held) -> Result<PathBuf, StagingError> {
        let target = self.path(name);
        let io = |action| {
            let path = target.clone();
            move |source: std::io::Error| StagingError::Io {
                path,
                action,
                source,
            }
        };
        self.release(name)?;
        let dir = self.open_dir().map_err(io("open the staging dir"))?;
        if source.is_dir() {
            rustix::fs::mkdirat(dir.fd(), name, Mode::from_raw_mode(0o700))
                .map_err(|e| io("create the entry")(e.into()))?;
        } else {
            rustix::fs::openat(
                dir.fd(),
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| io("create the entry")(e.into()))?;
        }
        rustix::mount::mount_bind_recursive(source.proc_path(), &target)
            .map_err(|e| io("bind the source")(e.into()))?;
        rustix::mount::mount_change(
            &target,
            MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
        )
        .map_err(|e| io("make the bind private")(e.into()))?;
        let bound = rustix::fs::statat(dir.fd(), name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io("look at the bind")(e.into()))?;
        if (bound.st_dev, bound.st_ino) != source.id() {
            let _ = self.release(name);
            return Err(io("check the bind")(std::io::Error::other(
                "the staged entry is not the checked object",
            )));
        }
        Ok(target)
    }

    /// Lets other users search (not list) the staging dir and its parent
    /// (mode 0711): a mount's blobfuse2 that runs as its owner reaches its
    /// own entry (a mount point it owns, see [`Self::make_dir`]) by name.
    /// Every entry keeps its own mode, so nothing else opens to them.
    pub fn allow_traversal(&self) -> Result<(), StagingError> {
        for dir in [Some(self.dir.as_path()), self.dir.parent()]
            .into_iter()
            .flatten()
        {
            let io = |source: std::io::Error| StagingError::Io {
                path: dir.to_owned(),
                action: "let the mount's owner traverse the dir",
                source,
            };
            let held = Held::open_no_symlinks(dir).map_err(io)?;
            if held.stat().st_uid != 0 {
                return Err(StagingError::NotPrivate {
                    dir: dir.to_owned(),
                    problem: format!("owned by uid {}, not root", held.stat().st_uid),
                });
            }
            let fd = rustix::fs::openat(
                held.fd(),
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io(e.into()))?;
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o711)).map_err(|e| io(e.into()))?;
        }
        Ok(())
    }

    /// Makes entry `name` a plain empty directory (0700, owned by `owner`,
    /// uid and gid, when given), replacing whatever was there: a mount point
    /// for another program (`fusermount3` wants its mounter to own it).
    /// Returns its path.
    pub fn make_dir(&self, name: &str, owner: Option<(u32, u32)>) -> Result<PathBuf, StagingError> {
        let target = self.path(name);
        self.release(name)?;
        let dir = self.open_dir().map_err(|source| StagingError::Io {
            path: target.clone(),
            action: "open the staging dir",
            source,
        })?;
        rustix::fs::mkdirat(dir.fd(), name, Mode::from_raw_mode(0o700)).map_err(|e| {
            StagingError::Io {
                path: target.clone(),
                action: "create the entry",
                source: e.into(),
            }
        })?;
        if let Some((uid, gid)) = owner {
            // Just made in a dir only root can change: still the same entry.
            rustix::fs::chownat(
                dir.fd(),
                name,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| StagingError::Io {
                path: target.clone(),
                action: "hand the entry to the mount's owner",
                source: e.into(),
            })?;
        }
        Ok(target)
    }

    /// Makes the mount on entry `name` (from [`Self::make_dir`], mounted on
    /// by another program) shared and binds it onto `onto` (a held
    /// directory), so the same filesystem shows at `onto`'s path.
    pub fn mirror(&self, name: &str, onto: &Held) -> Result<(), StagingError> {
        let target = self.path(name);
        let io = |action| {
            let path = target.clone();
            move |source: rustix::io::Errno| StagingError::Io {
                path,
                action,
                source: source.into(),
            }
        };
        rustix::mount::mount_change(&target, MountPropagationFlags::SHARED)
            .map_err(io("make the entry shared"))?;
        rustix::mount::mount_bind(&target, onto.proc_path())
            .map_err(io("bind the entry onto the held path"))?;
        Ok(())
    }

    /// Whether the mount on entry `name` has a mirror (another member of its
    /// peer group on the same device).
    pub fn mirrored(&self, name: &str) -> Result<bool, StagingError> {
        let entries = mountinfo::read().map_err(|source| StagingError::Io {
            path: self.path(name),
            action: "read mountinfo",
            source,
        })?;
        Ok(!mirrors(&entries, &self.path(name)).is_empty())
    }

    /// Takes off the binds that [`Self::mirror`] put on the user's side for
    /// entry `name`: the other members of the peer group of the mount on
    /// the entry, on the same device, each unmounted (lazily) through a
    /// descriptor of its mount point that was checked to be that very mount
    /// (its mount id in `/proc/self/fdinfo`, which asks no filesystem), so a
    /// path renamed meanwhile never leads the unmount elsewhere. Call it
    /// before the mount on the entry goes: the group is found through it.
    pub fn unmirror(&self, name: &str) -> Result<(), StagingError> {
        let target = self.path(name);
        let io = |action| {
            let path = target.clone();
            move |source: std::io::Error| StagingError::Io {
                path,
                action,
                source,
            }
        };
        let entries = mountinfo::read().map_err(io("read mountinfo"))?;
        for peer in mirrors(&entries, &target) {
            if !unmount_exact(peer).map_err(io("unmount the mirror bind"))? {
                tracing::warn!(entry = %target.display(), mount_point = %peer.mount_point.display(), "mirror bind moved or covered; left in place");
            }
        }
        Ok(())
    }

    /// Takes every mount off entry `name` (lazily) and removes it; an absent
    /// entry is fine. A mount point entry is [`Self::unmirror`]ed first.
    pub fn release(&self, name: &str) -> Result<(), StagingError> {
        let target = self.path(name);
        let io = |action| {
            let path = target.clone();
            move |source: std::io::Error| StagingError::Io {
                path,
                action,
                source,
            }
        };
        self.unmirror(name)?;
        for _ in 0..MAX_STACKED {
            let entries = mountinfo::read().map_err(io("read mountinfo"))?;
            if mountinfo::find(&entries, &target).is_none() {
                break;
            }
            match rustix::mount::unmount(&target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
                Ok(()) | Err(rustix::io::Errno::INVAL) => {}
                Err(e) => return Err(io("unmount the entry")(e.into())),
            }
        }
        let dir = match self.open_dir() {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("open the staging dir")(e)),
        };
        let removed = rustix::fs::unlinkat(dir.fd(), name, AtFlags::REMOVEDIR).or_else(|e| {
            if e == rustix::io::Errno::NOTDIR {
                rustix::fs::unlinkat(dir.fd(), name, AtFlags::empty())
            } else {
                Err(e)
            }
        });
        match removed {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(io("remove the entry")(e.into())),
        }
    }

    /// The entries present (for clean-up at start).
    pub fn names(&self) -> Result<Vec<String>, StagingError> {
        let dir = match super::held::open_path(
            &self.dir,
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .and_then(|path| {
            Ok(rustix::fs::openat(
                &path,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?)
        })
        .map_err(|e| rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))
        {
            Ok(dir) => dir,
            Err(rustix::io::Errno::NOENT) => return Ok(Vec::new()),
            Err(e) => {
                return Err(StagingError::Io {
                    path: self.dir.clone(),
                    action: "list the staging dir",
                    source: e.into(),
                });
            }
        };
        let mut names = Vec::new();
        let entries = rustix::fs::Dir::read_from(dir.as_fd()).map_err(|e| StagingError::Io {
            path: self.dir.clone(),
            action: "list the staging dir",
            source: e.into(),
        })?;
        for entry in entries.flatten() {
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name != "." && name != ".." {
                names.push(name.to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }
}

/// The other members of the peer group of the topmost mount at `target`,
/// on its device.
fn mirrors<'a>(
    entries: &'a [mountinfo::MountEntry],
    target: &Path,
) -> Vec<&'a mountinfo::MountEntry> {
    let Some(staged) = mountinfo::find(entries, target) else {
        return Vec::new();
    };
    let Some(group) = staged.peer_group else {
        return Vec::new();
    };
    entries
        .iter()
        .filter(|e| e.peer_group == Some(group) && e.id != staged.id && e.dev == staged.dev)
        .collect()
}

/// Lazily unmounts exactly the mount `entry` of mountinfo: its mount point
/// is opened without following any symlink, the descriptor's mount id must
/// be the entry's (else nothing happens: false), and the unmount goes by
/// the descriptor's magic link, so a path renamed or swapped since the
/// mountinfo was read never leads the unmount to another mount.
pub fn unmount_exact(entry: &mountinfo::MountEntry) -> std::io::Result<bool> {
    let Ok(fd) = super::held::open_path(
        &entry.mount_point,
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    ) else {
        return Ok(false);
    };
    if mount_id(&fd)? != entry.id {
        return Ok(false);
    }
    // By the magic link, with no `fstat`: a dead FUSE mount would not answer.
    let by_fd = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    rustix::mount::unmount(by_fd, UnmountFlags::DETACH)?;
    Ok(true)
}

/// The mount id of an open descriptor, from `/proc/self/fdinfo` (no
/// filesystem is asked, so a dead FUSE mount answers too).
fn mount_id(fd: &impl AsFd) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!(
        "/proc/thread-self/fdinfo/{}",
        fd.as_fd().as_raw_fd()
    ))?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:")?.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no mnt_id in fdinfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root, in a mount namespace of this test thread's own (so nothing it
    /// mounts can outlive it or reach the host).
    fn root() -> bool {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: staging binds need root");
            return false;
        }
        crate::testing::private_mount_namespace();
        true
    }

    #[test]
    fn a_user_writable_staging_dir_is_refused() {
        if !root() {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = Staging::prepare(&open.join("staging")).unwrap_err();
        assert!(error.to_string().contains("writable by others"), "{error}");
        let error = Staging::prepare(&open).unwrap_err();
        assert!(error.to_string().contains("mode 0700"), "{error}");
    }

    #[test]
    fn a_staged_bind_keeps_the_checked_object_and_mirrors_back() {
        if !root() {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let base = base.path().canonicalize().unwrap();
        let staging = Staging::prepare(&base.join("staging")).unwrap();
        let data = base.join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("marker"), b"m").unwrap();
        let held = Held::open(&data).unwrap();
        let staged = staging.bind("job.0", &held).unwrap();
        // The user's path is swapped for a link to /: the stage still holds data.
        std::fs::rename(&data, base.join("moved")).unwrap();
        std::os::unix::fs::symlink("/", &data).unwrap();
        assert!(staged.join("marker").exists());
        assert!(!staged.join("etc").exists());
        assert_eq!(staging.names().unwrap(), ["job.0"]);

        // Mirror: a tmpfs mounted on the entry shows at the held dir.
        staging.mirror("job.0", &held).unwrap();
        rustix::mount::mount(
            "tmpfs",
            &staged,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .unwrap();
        std::fs::write(staged.join("in-tmpfs"), b"t").unwrap();
        assert!(base.join("moved/in-tmpfs").exists());
        rustix::mount::unmount(&staged, UnmountFlags::empty()).unwrap();
        assert!(base.join("moved/marker").exists());
        staging.unmirror("job.0").unwrap();
        staging.release("job.0").unwrap();
        let entries = mountinfo::read().unwrap();
        assert!(mountinfo::find(&entries, &base.join("moved")).is_none());
        assert!(mountinfo::find(&entries, &staged).is_none());
        assert!(staging.names().unwrap().is_empty());
        assert!(
            base.join("moved/marker").exists(),
            "the source is untouched"
        );
    }
}

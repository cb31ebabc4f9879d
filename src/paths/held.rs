//! Paths opened once and held: the descriptor-based half of [`crate::paths`].
//!
//! A root daemon that checks a path and later uses it again by name lets a
//! user swap a symlink in between. Here a path is opened once ([`Held`]),
//! every check looks at the open object (`fstat`, the kernel's own name for
//! it in `/proc/self/fd`, its ancestors reached with `..` from the
//! descriptor), and every later use goes through the descriptor. A path that
//! must be handed to another program (Docker, blobfuse2) is handed over only
//! when no non-root user can change it ([`Held::changeable`]); otherwise it
//! goes through a root-only staging bind ([`super::staging`]).
//!
//! Client paths may contain symlinks (an absolute link inside an allowed
//! root is common, and `RESOLVE_BENEATH` refuses every absolute link), so
//! they are opened following them (`RESOLVE_NO_MAGICLINKS` only) and the
//! object that was reached is what gets checked against the roots. Paths the
//! agent owns (its staging dirs) are opened with `RESOLVE_NO_SYMLINKS`.
//!
//! Everything here blocks: call it from `spawn_blocking`.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};

/// Longest chain of symlinks a walk follows (the kernel's own limit).
const MAX_LINKS: u32 = 40;

/// An open file or directory (`O_PATH`), with what it was when opened.
#[derive(Debug)]
pub struct Held {
    fd: OwnedFd,
    path: PathBuf,
    stat: Stat,
}

/// Who else than root could change what a path leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changeable {
    /// The directory (the path itself or an ancestor) they can change.
    pub dir: PathBuf,
    /// How: "owned by uid 1000", "writable by group 100", "writable by others".
    pub why: String,
}

impl std::fmt::Display for Changeable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is {}", self.dir.display(), self.why)
    }
}

impl Held {
    /// Opens `path` (absolute), following symlinks but no magic links
    /// (`/proc/*/fd/*`). The object reached is held; [`Self::path`] says
    /// where it is.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::open_with(path, ResolveFlags::NO_MAGICLINKS)
    }

    /// Opens `path` (absolute) refusing any symlink on the way (`ELOOP`):
    /// for the agent's own directories.
    pub fn open_no_symlinks(path: &Path) -> std::io::Result<Self> {
        Self::open_with(
            path,
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
    }

    fn open_with(path: &Path, resolve: ResolveFlags) -> std::io::Result<Self> {
        Self::from_fd(open_path(path, resolve)?)
    }

    /// Holds an open descriptor (any kind, `O_PATH` included).
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Self> {
        let stat = rustix::fs::fstat(&fd)?;
        let path = fd_path(fd.as_fd())?;
        Ok(Self { fd, path, stat })
    }

    /// Opens the directory `path`, creating the missing components (each
    /// `mode`, owned by the caller) one at a time below the longest existing
    /// ancestor, never through a symlink: a component that turns out not to
    /// be a directory fails the call. Nothing is created unless `allowed`
    /// accepts where the directory would be (the existing ancestor's real
    /// path and the missing names): a symlink in the existing part cannot
    /// make the agent create directories elsewhere.
    pub fn open_dir_creating(
        path: &Path,
        mode: u32,
        allowed: &dyn Fn(&Path) -> Result<(), String>,
    ) -> std::io::Result<Self> {
        let mut existing = path.to_owned();
        let mut missing: Vec<OsString> = Vec::new();
        let mut held = loop {
            match Self::open(&existing) {
                Ok(held) => break held,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let Some(name) = existing.file_name() else {
                        return Err(e);
                    };
                    missing.push(name.to_owned());
                    existing.pop();
                }
                Err(e) => return Err(e),
            }
        };
        if !missing.is_empty() {
            let mut would_be = held.path().to_owned();
            would_be.extend(missing.iter().rev());
            allowed(&would_be).map_err(|problem| {
                std::io::Error::new(std::io::ErrorKind::PermissionDenied, problem)
            })?;
        }
        for name in missing.into_iter().rev() {
            held = held.create_dir(&name, mode)?;
        }
        if !held.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("{} is not a directory", held.path.display()),
            ));
        }
        Ok(held)
    }

    /// Creates (if absent) and opens the directory `name` in this one,
    /// refusing a symlink there.
    pub fn create_dir(&self, name: &OsStr, mode: u32) -> std::io::Result<Self> {
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        self.open_child(name, OFlags::PATH | OFlags::DIRECTORY)
    }

    /// Opens `name` in this directory without following a symlink there.
    pub fn open_child(&self, name: &OsStr, flags: OFlags) -> std::io::Result<Self> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Self::from_fd(fd)
    }

    /// The descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Where the object was when opened (the kernel's name for it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its metadata when opened.
    pub fn stat(&self) -> &Stat {
        &self.stat
    }

    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        FileType::from_raw_mode(self.stat.st_mode) == FileType::Directory
    }

    /// `/proc/self/fd/N`: names exactly this object for a system call such
    /// as `mount(2)`, whatever happens to its path meanwhile.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Its device and inode, to recognise it again.
    pub fn id(&self) -> (u64, u64) {
        (self.stat.st_dev, self.stat.st_ino)
    }

    /// Whether a user other than root could change what this path leads to:
    /// the object itself (owned by them, or group- or world-writable), or
    /// any ancestor up to `/` (reached with `..` from the descriptor, so the
    /// chain is the object's real one). An ancestor writable by others
    /// with the sticky bit set (`/tmp`) counts only when they own the entry
    /// in it. `None` when only root can.
    pub fn changeable(&self) -> std::io::Result<Option<Changeable>> {
        if let Some(why) = foreign(&self.stat) {
            return Ok(Some(Changeable {
                dir: self.path.clone(),
                why,
            }));
        }
        let mut child = self.stat;
        let mut dir = if self.is_dir() {
            rustix::fs::openat(
                &self.fd,
                "..",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?
        } else {
            // A file has no `..`: its directory is opened by name and must
            // still hold this very file, or the check fails closed.
            let (Some(parent), Some(name)) = (self.path.parent(), self.path.file_name()) else {
                return Ok(Some(Changeable {
                    dir: self.path.clone(),
                    why: "not in a directory".into(),
                }));
            };
            let parent = open_path(
                parent,
                ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
            )?;
            let there = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
            if (there.st_dev, there.st_ino) != self.id() {
                return Ok(Some(Changeable {
                    dir: self.path.clone(),
                    why: "moved while it was checked".into(),
                }));
            }
            parent
        };
        loop {
            let stat = rustix::fs::fstat(&dir)?;
            let sticky = stat.st_mode & 0o1000 != 0;
            let why = match foreign(&stat) {
                Some(_) if sticky && stat.st_uid == 0 && child.st_uid == 0 => None,
                other => other,
            };
            if let Some(why) = why {
                return Ok(Some(Changeable {
                    dir: fd_path(dir.as_fd())?,
                    why,
                }));
            }
            let parent = rustix::fs::openat(
                &dir,
                "..",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let parent_stat = rustix::fs::fstat(&parent)?;
            if (parent_stat.st_dev, parent_stat.st_ino) == (stat.st_dev, stat.st_ino) {
                return Ok(None);
            }
            child = stat;
            dir = parent;
        }
    }
}

/// Why a user other than root could change entries of (or, for a file, the
/// contents of) an object with this metadata; `None` when only root can.
fn foreign(stat: &Stat) -> Option<String> {
    if stat.st_uid != 0 {
        Some(format!("owned by uid {}", stat.st_uid))
    } else if stat.st_mode & 0o002 != 0 {
        Some("writable by others".to_owned())
    } else if stat.st_mode & 0o020 != 0 {
        Some(format!("writable by group {}", stat.st_gid))
    } else {
        None
    }
}

/// The kernel's current name for an open descriptor.
pub fn fd_path(fd: BorrowedFd<'_>) -> std::io::Result<PathBuf> {
    let link = rustix::fs::readlink(format!("/proc/self/fd/{}", fd.as_raw_fd()), Vec::new())?;
    Ok(PathBuf::from(OsStr::from_bytes(link.to_bytes())))
}

/// Why [`open_searching`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// The caller may not search a directory on the way.
    #[error("{} cannot be searched by the caller", .0.display())]
    Denied(PathBuf),
    /// The walk itself failed (missing component, too many links, ...).
    #[error("{}: {source}", .path.display())]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An `O_PATH` descriptor of the absolute `path`, resolved with `resolve`
/// (openat2), or without openat2 by other means.
pub fn open_path(path: &Path, resolve: ResolveFlags) -> std::io::Result<OwnedFd> {
    let fd = match rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        resolve,
    ) {
        // No openat2 (a kernel before 5.6, or a seccomp filter that does
        // not know it, as systemd-nspawn 252's): the same by other means.
        Err(rustix::io::Errno::NOSYS) if resolve.contains(ResolveFlags::NO_SYMLINKS) => {
            open_without_symlinks(path)?
        }
        // Symlinks followed by the kernel; the caller checks where the
        // object really is (`path()`, from the descriptor), which a
        // magic link cannot fake.
        Err(rustix::io::Errno::NOSYS) => {
            rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())?
        }
        other => other?,
    };
    Ok(fd)
}

/// Opens the absolute `path` one component at a time from `/` with
/// `O_NOFOLLOW`, refusing a symlink anywhere (`ELOOP`): `RESOLVE_NO_SYMLINKS`
/// without openat2.
fn open_without_symlinks(path: &Path) -> std::io::Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut fd = rustix::fs::open("/", flags | OFlags::DIRECTORY, Mode::empty())?;
    for component in path.components() {
        match component {
            std::path::Component::RootDir => {}
            std::path::Component::Normal(name) => {
                fd = rustix::fs::openat(&fd, name, flags, Mode::empty())?;
                if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) == FileType::Symlink {
                    return Err(rustix::io::Errno::LOOP.into());
                }
            }
            _ => return Err(rustix::io::Errno::INVAL.into()),
        }
    }
    Ok(fd)
}

/// Opens the absolute `path` one component at a time from `/`, the way the
/// kernel resolves it (symlinks followed, at most 40), asking `may_search`
/// about every directory a name is looked up in before looking: a walk
/// with another user's permissions. No component is opened twice by name.
pub fn open_searching(
    path: &Path,
    mut may_search: impl FnMut(&Stat) -> bool,
) -> Result<Held, WalkError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source: std::io::Error| WalkError::Io { path, source }
    };
    let root = || {
        rustix::fs::open(
            "/",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(std::io::Error::from)
    };
    let mut pending: VecDeque<OsString> = names(path);
    let mut current = root().map_err(io(Path::new("/")))?;
    let mut current_path = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        let stat = rustix::fs::fstat(&current).map_err(|e| io(&current_path)(e.into()))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
            return Err(io(&current_path)(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        if !may_search(&stat) {
            return Err(WalkError::Denied(current_path));
        }
        let next = rustix::fs::openat(
            &current,
            &name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io(&current_path.join(&name))(e.into()))?;
        let next_stat = rustix::fs::fstat(&next).map_err(|e| io(&current_path)(e.into()))?;
        if FileType::from_raw_mode(next_stat.st_mode) == FileType::Symlink {
            links += 1;
            if links > MAX_LINKS {
                return Err(io(&current_path.join(&name))(
                    std::io::Error::from_raw_os_error(rustix::io::Errno::LOOP.raw_os_error()),
                ));
            }
            let target = rustix::fs::readlinkat(&next, "", Vec::new())
                .map_err(|e| io(&current_path.join(&name))(e.into()))?;
            let target = PathBuf::from(OsStr::from_bytes(target.to_bytes()));
            if target.is_absolute() {
                current = root().map_err(io(Path::new("/")))?;
                current_path = PathBuf::from("/");
            }
            for part in names(&target).into_iter().rev() {
                pending.push_front(part);
            }
            continue;
        }
        if name == ".." {
            current_path.pop();
        } else {
            current_path.push(&name);
        }
        current = next;
    }
    Held::from_fd(current).map_err(io(path))
}

/// The components of a path to look up, `..` kept (the kernel resolves it
/// physically), `.` and the root dropped.
fn names(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// Removes every entry below the directory `dir` (a descriptor opened for
/// reading), never following a symlink and never reopening anything by a
/// path: each subdirectory is opened from its parent's descriptor with
/// `O_NOFOLLOW | O_DIRECTORY` and emptied through that descriptor, and each
/// entry is removed with `unlinkat` on the descriptor of the directory that
/// holds it. `keep(dir_path, name, stat)` spares an entry (and its
/// ancestors). Returns the bytes freed and whether `dir` is now empty.
pub fn remove_below(
    dir: &OwnedFd,
    dir_path: &Path,
    keep: &mut dyn FnMut(&Path, &OsStr, &Stat) -> bool,
) -> std::io::Result<(u64, bool)> {
    let mut freed = 0;
    let mut empty = true;
    let mut entries = rustix::fs::Dir::read_from(dir)?;
    while let Some(entry) = entries.read() {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_owned();
        if name == "." || name == ".." {
            continue;
        }
        let stat = match rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        if keep(dir_path, &name, &stat) {
            empty = false;
            continue;
        }
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            let child = match rustix::fs::openat(
                dir,
                &name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(child) => child,
                // Swapped for something else since the look: not a directory
                // any more, so it is removed below as the entry it now is.
                Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
                    if !remove_entry(dir, &name, AtFlags::empty())? {
                        empty = false;
                    }
                    continue;
                }
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            let child_stat = rustix::fs::fstat(&child)?;
            if child_stat.st_dev != stat.st_dev {
                // A mount point: never walk into another filesystem.
                empty = false;
                continue;
            }
            let (bytes, child_empty) = remove_below(&child, &dir_path.join(&name), keep)?;
            freed += bytes;
            if !child_empty || !remove_entry(dir, &name, AtFlags::REMOVEDIR)? {
                empty = false;
            }
        } else if remove_entry(dir, &name, AtFlags::empty())? {
            freed += stat.st_size as u64;
        } else {
            empty = false;
        }
    }
    Ok((freed, empty))
}

/// `unlinkat` of one entry of `dir`: true when it is gone.
fn remove_entry(dir: &OwnedFd, name: &OsStr, flags: AtFlags) -> std::io::Result<bool> {
    match rustix::fs::unlinkat(dir, name, flags) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(true),
        // A directory swapped in for a file (or the reverse), or one filled
        // again, since the look: left for the next emptying, never guessed at.
        Err(rustix::io::Errno::ISDIR | rustix::io::Errno::NOTDIR | rustix::io::Errno::NOTEMPTY) => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn without_openat2_a_symlink_anywhere_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("a/b")).unwrap();
        std::os::unix::fs::symlink(base.join("a"), base.join("link")).unwrap();
        let fd = open_without_symlinks(&base.join("a/b")).unwrap();
        assert_eq!(fd_path(fd.as_fd()).unwrap(), base.join("a/b"));
        for through in [base.join("link/b"), base.join("link")] {
            let refused = open_without_symlinks(&through).unwrap_err();
            assert_eq!(
                refused.raw_os_error(),
                Some(nix::libc::ELOOP),
                "{through:?}"
            );
        }
    }

    #[test]
    fn holds_the_object_reached_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("data")).unwrap();
        std::os::unix::fs::symlink(real.join("data"), real.join("link")).unwrap();
        let held = Held::open(&real.join("link")).unwrap();
        assert_eq!(held.path(), real.join("data"));
        assert!(held.is_dir());
        let refused = Held::open_no_symlinks(&real.join("link")).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(nix::libc::ELOOP));
        // Renaming the path afterwards does not change what is held.
        std::fs::rename(real.join("data"), real.join("moved")).unwrap();
        assert_eq!(fd_path(held.fd()).unwrap(), real.join("moved"));
    }

    #[test]
    fn creates_missing_dirs_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        let inside = |p: &Path| {
            if p.starts_with(&real) {
                Ok(())
            } else {
                Err(format!("{} is outside", p.display()))
            }
        };
        let held = Held::open_dir_creating(&real.join("a/b/c"), 0o755, &inside).unwrap();
        assert_eq!(held.path(), real.join("a/b/c"));
        let canary = format!("ia-test-{}", std::process::id());
        std::os::unix::fs::symlink("/", real.join("a/b/c/d")).unwrap();
        let refused = Held::open_dir_creating(&real.join("a/b/c/d").join(&canary), 0o755, &inside)
            .unwrap_err();
        assert!(refused.to_string().contains("is outside"), "{refused}");
        assert!(!Path::new("/").join(&canary).exists());
    }

    #[test]
    fn changeable_looks_at_the_object_and_every_ancestor() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to own the test dirs");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(real.join("a/b")).unwrap();
        // A root-owned tree under sticky /tmp: only root can change it.
        let held = Held::open(&real.join("a/b")).unwrap();
        assert_eq!(held.changeable().unwrap(), None);
        std::fs::set_permissions(real.join("a"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let found = held.changeable().unwrap().unwrap();
        assert_eq!(found.dir, real.join("a"));
        assert_eq!(found.why, "writable by others");
        std::fs::set_permissions(real.join("a"), std::fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(
            &real.join("a/b"),
            Some(nix::unistd::Uid::from_raw(4_000_123)),
            None,
        )
        .unwrap();
        let found = Held::open(&real.join("a/b"))
            .unwrap()
            .changeable()
            .unwrap()
            .unwrap();
        assert_eq!(found.why, "owned by uid 4000123");
    }

    #[test]
    fn a_searching_walk_asks_about_every_directory() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(real.join("x/y")).unwrap();
        std::os::unix::fs::symlink(real.join("x"), real.join("lx")).unwrap();
        let mut asked = Vec::new();
        let held = open_searching(&real.join("lx/y"), |s| {
            asked.push((s.st_dev, s.st_ino));
            true
        })
        .unwrap();
        assert_eq!(held.path(), real.join("x/y"));
        // "/" and each ancestor down to the temp dir (where `lx` is looked
        // up), the same again from "/" for the absolute link, then x.
        assert_eq!(asked.len(), 2 * real.components().count() + 1);
        let x = std::fs::metadata(real.join("x")).unwrap();
        use std::os::unix::fs::MetadataExt;
        let denied = open_searching(&real.join("lx/y"), |s| s.st_ino != x.ino()).unwrap_err();
        assert!(matches!(denied, WalkError::Denied(p) if p == real.join("x")));
    }

    #[test]
    fn removal_stays_below_the_held_dir() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("canary"), b"x").unwrap();
        std::fs::create_dir_all(real.join("c/sub")).unwrap();
        std::fs::write(real.join("c/sub/f"), [0u8; 100]).unwrap();
        std::fs::write(real.join("c/keep"), b"k").unwrap();
        std::os::unix::fs::symlink(outside.path(), real.join("c/link")).unwrap();
        let fd = rustix::fs::open(
            real.join("c"),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let (freed, empty) =
            remove_below(&fd, &real.join("c"), &mut |_, name, _| name == "keep").unwrap();
        // The file's 100 bytes and the link's own size (its target's length).
        let link_len = outside.path().as_os_str().len() as u64;
        assert_eq!(freed, 100 + link_len);
        assert!(!empty);
        assert!(outside.path().join("canary").exists());
        let left: Vec<_> = std::fs::read_dir(real.join("c"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(left.len(), 1);
    }
}

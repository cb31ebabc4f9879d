//! The files the agent writes for sshd, reached through directory
//! descriptors: each directory is opened once, walking from `/` one
//! component at a time with `O_NOFOLLOW` (a symlink anywhere is refused),
//! and checked on the descriptor (owned by root or the agent, not writable
//! by others unless sticky); every read, write and removal then acts
//! through it. A file is written whole under a temporary name starting with
//! a dot (sshd's `*.conf` never reads it), given its mode, fsynced and
//! renamed over the old one, and the directory fsynced: sshd reads the old
//! file or the new one, never half of one. Files are created by the agent,
//! so they belong to root.
//!
//! Everything here blocks: call it from the blocking pool.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, fchmod, fstat, mkdirat};
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};

/// The largest file the agent reads back (its own, or a drop-in it checks).
pub const MAX_READ_BYTES: u64 = 1 << 20;

/// An opened directory.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn io_error(path: &Path, what: &str, errno: Errno) -> std::io::Error {
    let kind = std::io::Error::from(errno).kind();
    std::io::Error::new(kind, format!("{}: {what}: {errno}", path.display()))
}

/// Refuses a directory another user could change: not owned by root (or
/// the agent's own uid), or writable by group or others without the
/// sticky bit.
fn check_owner(fd: &OwnedFd, path: &Path) -> std::io::Result<()> {
    let stat = fstat(fd).map_err(|e| io_error(path, "fstat", e))?;
    let uid = stat.st_uid;
    let mode = stat.st_mode & 0o7777;
    let me = nix::unistd::geteuid().as_raw();
    if uid != 0 && uid != me {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {uid}, not root: another user could swap what sshd reads",
                path.display()
            ),
        ));
    }
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is writable by group or others (mode {mode:o}): chmod go-w it",
                path.display()
            ),
        ));
    }
    Ok(())
}

impl Dir {
    /// Opens `path` (absolute, no `..`), creating missing directories with
    /// `mode` when `create` is given.
    pub fn open(path: &Path, create: Option<u32>) -> std::io::Result<Dir> {
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
        let root = Path::new("/");
        let mut fd =
            nix::fcntl::open(root, flags, Mode::empty()).map_err(|e| io_error(root, "open", e))?;
        let mut walked = PathBuf::from("/");
        for component in path.components() {
            let name = match component {
                Component::RootDir => continue,
                Component::Normal(name) => name,
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!(
                            "{}: only absolute paths without . or .. are used",
                            path.display()
                        ),
                    ));
                }
            };
            walked.push(name);
            let next = match openat(&fd, name, flags, Mode::empty()) {
                Err(Errno::ENOENT) if create.is_some() => {
                    let mode = create.unwrap_or(0o755);
                    match mkdirat(&fd, name, Mode::from_bits_truncate(mode)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(io_error(&walked, "mkdir", e)),
                    }
                    let made = openat(&fd, name, flags, Mode::empty())
                        .map_err(|e| io_error(&walked, "open", e))?;
                    // The umask may have taken bits away.
                    fchmod(&made, Mode::from_bits_truncate(mode))
                        .map_err(|e| io_error(&walked, "chmod", e))?;
                    made
                }
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!(
                            "{} is a symlink or not a directory: the agent only writes through real directories",
                            walked.display()
                        ),
                    ));
                }
                Err(e) => return Err(io_error(&walked, "open", e)),
                Ok(next) => next,
            };
            check_owner(&next, &walked)?;
            fd = next;
        }
        Ok(Dir {
            fd,
            path: path.to_owned(),
        })
    }

    /// The path of an entry (for messages and for sshd).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The contents of a regular file, `None` when there is none. A symlink
    /// in its place is an error (`InvalidData`), never followed.
    pub fn read(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let fd = match openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is a symlink", self.join(name).display()),
                ));
            }
            Err(e) => return Err(io_error(&self.join(name), "open", e)),
        };
        let stat = fstat(&fd).map_err(|e| io_error(&self.join(name), "fstat", e))?;
        if stat.st_mode & nix::libc::S_IFMT != nix::libc::S_IFREG {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a regular file", self.join(name).display()),
            ));
        }
        let mut contents = Vec::new();
        std::fs::File::from(fd)
            .take(MAX_READ_BYTES + 1)
            .read_to_end(&mut contents)?;
        if contents.len() as u64 > MAX_READ_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} is larger than {MAX_READ_BYTES} bytes",
                    self.join(name).display()
                ),
            ));
        }
        Ok(Some(contents))
    }

    /// Replaces `name` with `contents` (mode `mode`) atomically.
    pub fn write(&self, name: &str, contents: &[u8], mode: u32) -> std::io::Result<()> {
        let temp = format!(".{name}.tmp");
        // A temporary file a crash left behind.
        match unlinkat(&self.fd, temp.as_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(io_error(&self.join(&temp), "unlink", e)),
        }
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(
            &self.fd,
            temp.as_str(),
            flags,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|e| io_error(&self.join(&temp), "create", e))?;
        let written = (|| {
            fchmod(&fd, Mode::from_bits_truncate(mode))
                .map_err(|e| io_error(&self.join(&temp), "chmod", e))?;
            let mut file = std::fs::File::from(fd);
            file.write_all(contents)?;
            file.sync_all()
        })();
        if let Err(e) = written {
            let _ = unlinkat(&self.fd, temp.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        renameat(&self.fd, temp.as_str(), &self.fd, name).map_err(|e| {
            let _ = unlinkat(&self.fd, temp.as_str(), UnlinkatFlags::NoRemoveDir);
            io_error(&self.join(name), "rename", e)
        })?;
        fsync(&self.fd).map_err(|e| io_error(&self.path, "fsync", e))
    }

    /// Removes `name` (absent is fine).
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(io_error(&self.join(name), "unlink", e)),
        }
    }

    /// The names of its entries, sorted bytewise (as glob(3) sorts them in
    /// the C locale), `.` and `..` left out.
    pub fn names(&self) -> std::io::Result<Vec<String>> {
        let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        let mut dir = nix::dir::Dir::openat(&self.fd, ".", flags, Mode::empty())
            .map_err(|e| io_error(&self.path, "opendir", e))?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| io_error(&self.path, "readdir", e))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name != "." && name != ".." {
                names.push(name.to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Whether `name` is a regular file (not following a symlink).
    pub fn is_file(&self, name: &str) -> bool {
        nix::sys::stat::fstatat(self.fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|s| s.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn writes_are_whole_with_their_mode_and_leave_no_temporary_file() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("a/b");
        let dir = Dir::open(&path, Some(0o755)).expect("created");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o755
        );
        dir.write("x.conf", b"one\n", 0o644).unwrap();
        dir.write("x.conf", b"two\n", 0o644).unwrap();
        assert_eq!(dir.read("x.conf").unwrap().as_deref(), Some(&b"two\n"[..]));
        let meta = std::fs::metadata(path.join("x.conf")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
        assert_eq!(dir.names().unwrap(), ["x.conf"]);
        assert!(dir.is_file("x.conf"));
        dir.remove("x.conf").unwrap();
        dir.remove("x.conf").unwrap();
        assert_eq!(dir.read("x.conf").unwrap(), None);
    }

    #[test]
    fn symlinks_are_never_followed() {
        let temp = tempfile::tempdir().unwrap();
        let real = temp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, temp.path().join("link")).unwrap();
        let error = Dir::open(&temp.path().join("link/sub"), Some(0o755)).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("is a symlink or not a directory"),
            "{error}"
        );
        assert!(!real.join("sub").exists());

        let dir = Dir::open(&real, None).unwrap();
        std::fs::write(temp.path().join("target"), "secret").unwrap();
        std::os::unix::fs::symlink(temp.path().join("target"), real.join("keys")).unwrap();
        assert!(dir.read("keys").is_err());
        assert!(!dir.is_file("keys"));
        // Writing replaces the link itself, not what it points to.
        dir.write("keys", b"mine", 0o644).unwrap();
        assert_eq!(
            std::fs::read_to_string(temp.path().join("target")).unwrap(),
            "secret"
        );
        assert_eq!(dir.read("keys").unwrap().as_deref(), Some(&b"mine"[..]));
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        let temp = tempfile::tempdir().unwrap();
        let open = temp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = Dir::open(&open.join("keys"), Some(0o755)).unwrap_err();
        assert!(
            error.to_string().contains("writable by group or others"),
            "{error}"
        );
        // Sticky (like /tmp) is fine: others cannot replace the agent's entries.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(Dir::open(&open.join("keys"), Some(0o755)).is_ok());
        assert!(Dir::open(Path::new("relative/x"), None).is_err());
    }
}

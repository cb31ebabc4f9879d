//! Which cache dirs the agent may empty: only those it owns. The agent
//! empties a mount's cache dir before every mount and repair, on Unmount and
//! in disk reclaim, so a cache dir pointed at someone's data must never be
//! taken. A cache dir is the agent's once it holds the marker file
//! [`MARKER`], which the agent creates (root-owned, mode 0600, one link)
//! when it creates the dir or finds it empty and root's own; a marker of
//! any other owner, mode or kind does not count. A dir that exists and is
//! not empty, or is owned by another user (even empty), is refused.
//!
//! Everything goes through descriptors: the dir is opened once (the stored
//! path is already resolved, so no symlink is followed on the way), the
//! marker is looked at and created with `*at` calls on that descriptor, and
//! emptying walks subdirectories with `O_NOFOLLOW | O_DIRECTORY` opens and
//! `unlinkat` on the held parent ([`crate::paths::held::remove_below`]): a
//! user racing the walk with symlinks or renames cannot redirect a delete
//! outside the cache.
//!
//! blobfuse2's own cache (`file_cache.path`) is the subdirectory
//! [`BLOBFUSE2_SUBDIR`]: blobfuse2 cleans and checks only that, so the
//! marker is never in its way (it refuses a non-empty cache dir, and may
//! empty one at start), and no cache file can shadow a blob named like it.
//! All functions here block.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};

use crate::paths::held::{self, Held};

/// The marker file the agent keeps in every cache dir it owns.
pub const MARKER: &str = ".instance-agent-cache";

/// blobfuse2's `file_cache.path`, inside the cache dir.
pub const BLOBFUSE2_SUBDIR: &str = "blobfuse2";

/// blobfuse2's cache directory for a mount's cache dir.
pub fn blobfuse2_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join(BLOBFUSE2_SUBDIR)
}

/// The agent's own uid (root in production): the owner of its dirs and markers.
fn agent_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// A cache dir opened for `*at` calls.
fn open_dir(dir: &Path) -> std::io::Result<(Held, OwnedFd)> {
    let held = Held::open_no_symlinks(dir)?;
    let fd = reopen(&held)?;
    Ok((held, fd))
}

/// A readable directory descriptor of a held directory (no path involved).
fn reopen(held: &Held) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        held.fd(),
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Whether `stat` is a marker the agent made: a regular file with one link,
/// owned by the agent, mode 0600.
fn is_marker(stat: &Stat) -> bool {
    FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile
        && stat.st_uid == agent_uid()
        && stat.st_mode & 0o7777 == 0o600
        && stat.st_nlink == 1
}

/// Whether the held dir holds the agent's marker.
fn marked(dir: &OwnedFd) -> bool {
    rustix::fs::statat(dir, MARKER, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|s| is_marker(&s))
}

/// Whether the agent owns `dir` (it holds the agent's marker).
pub fn owned(dir: &Path) -> bool {
    open_dir(dir).is_ok_and(|(_, fd)| marked(&fd))
}

/// Whether the agent may take the open dir: its own already, or root's
/// and empty. Else why not.
fn claimable(held: &Held, fd: &OwnedFd) -> Result<(), String> {
    if marked(fd) {
        return Ok(());
    }
    let dir = held.path().display();
    let stat = held.stat();
    if stat.st_uid != agent_uid() {
        return Err(format!(
            "{dir} is owned by uid {}: the agent takes only a new directory, an empty one of \
             root's, or one of its own cache dirs",
            stat.st_uid
        ));
    }
    let mut entries = rustix::fs::Dir::read_from(fd).map_err(|e| format!("{dir}: {e}"))?;
    let not_empty =
        entries.any(|e| e.is_ok_and(|e| !matches!(e.file_name().to_bytes(), b"." | b"..")));
    if not_empty {
        return Err(format!(
            "{dir} exists, is not empty and is not an agent cache dir (no {MARKER} of the \
             agent's in it): the agent empties its cache dirs, so it takes only a new or empty \
             directory"
        ));
    }
    Ok(())
}

/// Whether the agent may take `dir` as a cache dir: absent, empty and
/// root's, or already its own. Else why not, for the `cache_dir` field's
/// message.
pub fn check_claimable(dir: &Path) -> Result<(), String> {
    match open_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", dir.display())),
        Ok((held, fd)) => claimable(&held, &fd),
    }
}

/// Takes `dir` as a cache dir: creates it (0700) when absent, below where
/// `allowed` accepts, and creates the marker; refuses a dir it may not take
/// (error kind `AlreadyExists`, message from [`check_claimable`]). Returns
/// the held dir, for the emptying and the hand-off that follow.
pub fn claim(
    dir: &Path,
    mount: &str,
    allowed: &dyn Fn(&Path) -> Result<(), String>,
) -> std::io::Result<Held> {
    // 0711, parents included: a mount's blobfuse2 that runs as its owner
    // reaches its own subdir by name (see `hand_to`), and lists nothing.
    let held = Held::open_dir_creating(dir, 0o711, allowed)?;
    if held.path() != dir {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} now leads to {}: not taken",
                dir.display(),
                held.path().display()
            ),
        ));
    }
    let fd = reopen(&held)?;
    if marked(&fd) {
        return Ok(held);
    }
    claimable(&held, &fd).map_err(|m| std::io::Error::new(std::io::ErrorKind::AlreadyExists, m))?;
    let marker = rustix::fs::openat(
        &fd,
        MARKER,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let mut marker = std::fs::File::from(marker);
    writeln!(
        marker,
        "File cache of the instance-agent mount {mount:?}. The agent empties this directory."
    )?;
    Ok(held)
}

/// For a mount whose blobfuse2 runs as `owner`: its subdir
/// ([`BLOBFUSE2_SUBDIR`], made by the agent) becomes theirs, and the held
/// cache dir (root's, with the marker) traversable by them (0711).
pub fn hand_to(held: &Held, owner: super::spec::Owner) -> std::io::Result<()> {
    let fd = reopen(held)?;
    rustix::fs::chownat(
        &fd,
        BLOBFUSE2_SUBDIR,
        Some(rustix::fs::Uid::from_raw(owner.uid)),
        Some(rustix::fs::Gid::from_raw(owner.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o711))?;
    Ok(())
}

/// Empties an owned cache dir, keeping the marker; with `keep_open`, files
/// some process holds open stay. Returns the bytes freed. A dir without the
/// agent's marker is left untouched (error kind `PermissionDenied`); an
/// absent one frees nothing.
pub fn empty(dir: &Path, keep_open: bool) -> std::io::Result<u64> {
    let (held, fd) = match open_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        other => other?,
    };
    empty_fd(&held, &fd, keep_open)
}

/// [`empty`] of a dir already held (from [`claim`]).
pub fn empty_held(held: &Held, keep_open: bool) -> std::io::Result<u64> {
    empty_fd(held, &reopen(held)?, keep_open)
}

fn empty_fd(held: &Held, fd: &OwnedFd, keep_open: bool) -> std::io::Result<u64> {
    if !marked(fd) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not an agent cache dir (no {MARKER} of the agent's in it); left as it is",
                held.path().display()
            ),
        ));
    }
    let open = if keep_open {
        open_files_below(held.path())
    } else {
        HashSet::new()
    };
    let top = held.path().to_owned();
    let mut keep = |dir: &Path, name: &OsStr, _: &Stat| {
        (dir == top && name == MARKER) || open.contains(&dir.join(name))
    };
    let (freed, _) = held::remove_below(fd, held.path(), &mut keep)?;
    Ok(freed)
}

/// Gives up an owned cache dir: empties it, and once only the marker is
/// left removes the marker (and the dir itself when `remove_dir`, for the
/// default per-mount dir below the cache root). Files kept open stay, with
/// the marker, for a later call.
pub fn release(dir: &Path, keep_open: bool, remove_dir: bool) -> std::io::Result<()> {
    let (held, fd) = match open_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    empty_fd(&held, &fd, keep_open)?;
    let only_marker = rustix::fs::Dir::read_from(&fd)?.flatten().all(|e| {
        matches!(e.file_name().to_bytes(), b"." | b"..")
            || e.file_name().to_bytes() == MARKER.as_bytes()
    });
    if !only_marker {
        return Ok(());
    }
    rustix::fs::unlinkat(&fd, MARKER, AtFlags::empty())?;
    if remove_dir && let Some(name) = held.path().file_name() {
        // The parent reached from the held dir itself, and the entry checked
        // to still be this dir before it goes.
        let parent = rustix::fs::openat(
            held.fd(),
            "..",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let there = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
        if (there.st_dev, there.st_ino) == held.id() {
            rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR)?;
        }
    }
    Ok(())
}

/// Files below `dir` that some process has open (from `/proc/*/fd`).
fn open_files_below(dir: &Path) -> HashSet<PathBuf> {
    let mut open = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return open;
    };
    for proc_entry in procs.flatten() {
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && target.starts_with(dir)
            {
                open.insert(target);
            }
        }
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_new_empty_or_marked_dirs_are_claimed_and_emptied() {
        let base = tempfile::tempdir().unwrap();
        let base_path = base.path().canonicalize().unwrap();
        let anywhere = |_: &Path| Ok(());
        let new = base_path.join("new");
        claim(&new, "data", &anywhere).unwrap();
        assert!(owned(&new));
        std::fs::create_dir_all(blobfuse2_dir(&new).join("d")).unwrap();
        std::fs::write(blobfuse2_dir(&new).join("d/blob"), [0u8; 10]).unwrap();
        assert_eq!(empty(&new, false).unwrap(), 10);
        let left: Vec<_> = std::fs::read_dir(&new).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "only the marker stays");
        release(&new, false, true).unwrap();
        assert!(!new.exists());

        let users = base_path.join("notebooks");
        std::fs::create_dir(&users).unwrap();
        std::fs::write(users.join("thesis.ipynb"), "years of work").unwrap();
        let refused = check_claimable(&users).unwrap_err();
        assert!(refused.contains("is not empty"), "{refused}");
        assert!(claim(&users, "data", &anywhere).is_err());
        assert!(empty(&users, false).is_err());
        assert!(release(&users, false, true).is_err());
        assert_eq!(
            std::fs::read_to_string(users.join("thesis.ipynb")).unwrap(),
            "years of work"
        );
        assert!(!owned(&users));

        let empty_dir = base_path.join("empty");
        std::fs::create_dir(&empty_dir).unwrap();
        claim(&empty_dir, "data", &anywhere).unwrap();
        release(&empty_dir, false, false).unwrap();
        assert!(
            empty_dir.exists() && !owned(&empty_dir),
            "a dir the agent did not create stays"
        );
    }

    #[test]
    fn only_the_agents_own_marker_counts_and_user_dirs_are_not_taken() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to own the test dirs");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let base = base.path().canonicalize().unwrap();
        let anywhere = |_: &Path| Ok(());
        let user = Some(nix::unistd::Uid::from_raw(4_000_124));

        // A marker written by someone else, or with another mode, is no marker.
        let forged = base.join("forged");
        std::fs::create_dir(&forged).unwrap();
        std::fs::write(forged.join("precious"), b"p").unwrap();
        std::fs::write(forged.join(MARKER), b"").unwrap();
        std::fs::set_permissions(forged.join(MARKER), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        assert!(!owned(&forged));
        std::fs::set_permissions(forged.join(MARKER), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        nix::unistd::chown(&forged.join(MARKER), user, None).unwrap();
        assert!(!owned(&forged));
        assert!(empty(&forged, false).is_err());
        assert!(forged.join("precious").exists());

        // An empty directory of another user's is not taken either.
        let theirs = base.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        nix::unistd::chown(&theirs, user, None).unwrap();
        let refused = check_claimable(&theirs).unwrap_err();
        assert!(refused.contains("owned by uid 4000124"), "{refused}");
        assert!(claim(&theirs, "data", &anywhere).is_err());
        assert!(!theirs.join(MARKER).exists());

        // A link inside the cache is removed as a link, never followed.
        let outside = base.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("canary"), b"c").unwrap();
        let cache = base.join("cache");
        claim(&cache, "data", &anywhere).unwrap();
        std::os::unix::fs::symlink(&outside, cache.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("canary"), cache.join("file-link")).unwrap();
        empty(&cache, false).unwrap();
        assert!(outside.join("canary").exists());
        assert!(!cache.join("link").exists() && !cache.join("file-link").exists());
        let marker = std::fs::metadata(cache.join(MARKER)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((marker.uid(), marker.mode() & 0o7777), (0, 0o600));
    }
}

//! Which cache dirs the agent may empty: only those it owns. The agent
//! empties a mount's cache dir before every mount and repair, on Unmount and
//! in disk reclaim, so a cache dir pointed at someone's data must never be
//! taken. A cache dir is the agent's once it holds the marker file
//! [`MARKER`], which the agent writes when it creates the dir or finds it
//! empty; a dir that exists, is not empty and has no marker is refused.
//!
//! blobfuse2's own cache (`file_cache.path`) is the subdirectory
//! [`BLOBFUSE2_SUBDIR`]: blobfuse2 cleans and checks only that, so the
//! marker is never in its way (it refuses a non-empty cache dir, and may
//! empty one at start), and no cache file can shadow a blob named like it.
//! All functions here block.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The marker file the agent keeps in every cache dir it owns.
pub const MARKER: &str = ".instance-agent-cache";

/// blobfuse2's `file_cache.path`, inside the cache dir.
pub const BLOBFUSE2_SUBDIR: &str = "blobfuse2";

/// blobfuse2's cache directory for a mount's cache dir.
pub fn blobfuse2_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join(BLOBFUSE2_SUBDIR)
}

/// Whether the agent owns `dir` (it holds the marker).
pub fn owned(dir: &Path) -> bool {
    dir.join(MARKER)
        .symlink_metadata()
        .is_ok_and(|m| m.is_file())
}

/// Whether the agent may take `dir` as a cache dir: absent, empty, or
/// already its own. Else why not, for the `cache_dir` field's message.
pub fn check_claimable(dir: &Path) -> Result<(), String> {
    match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", dir.display())),
        Ok(mut entries) => {
            if entries.next().is_none() || owned(dir) {
                Ok(())
            } else {
                Err(format!(
                    "{} exists, is not empty and is not an agent cache dir (no {MARKER} in it): \
                     the agent empties its cache dirs, so it takes only a new or empty directory",
                    dir.display()
                ))
            }
        }
    }
}

/// Takes `dir` as a cache dir: creates it (0700) when absent and writes the
/// marker; refuses a non-empty dir without one (error kind `AlreadyExists`,
/// message from [`check_claimable`]).
pub fn claim(dir: &Path, mount: &str) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if owned(dir) {
        return Ok(());
    }
    check_claimable(dir).map_err(|m| std::io::Error::new(std::io::ErrorKind::AlreadyExists, m))?;
    let mut marker = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(MARKER))?;
    writeln!(
        marker,
        "File cache of the instance-agent mount {mount:?}. The agent empties this directory."
    )
}

/// Empties an owned cache dir, keeping the marker; with `keep_open`, files
/// some process holds open stay. Returns the bytes freed. A dir without the
/// marker is left untouched (error kind `PermissionDenied`); an absent one
/// frees nothing.
pub fn empty(dir: &Path, keep_open: bool) -> std::io::Result<u64> {
    if !dir.exists() {
        return Ok(0);
    }
    if !owned(dir) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not an agent cache dir (no {MARKER} in it); left as it is",
                dir.display()
            ),
        ));
    }
    empty_dir(dir, keep_open)
}

/// Gives up an owned cache dir: empties it, and once only the marker is
/// left removes the marker (and the dir itself when `remove_dir`, for the
/// default per-mount dir below the cache root). Files kept open stay, with
/// the marker, for a later call.
pub fn release(dir: &Path, keep_open: bool, remove_dir: bool) -> std::io::Result<()> {
    empty(dir, keep_open)?;
    let only_marker = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .all(|e| e.file_name() == MARKER);
    if only_marker {
        std::fs::remove_file(dir.join(MARKER))?;
        if remove_dir {
            std::fs::remove_dir(dir)?;
        }
    }
    Ok(())
}

/// Removes everything inside `dir` (not `dir` itself, nor the agent's cache
/// marker in it), never following symlinks; with `keep_open`, files some
/// process holds open stay. Returns the bytes freed. Callers go through
/// [`empty`], which checks that the agent owns the dir.
fn empty_dir(dir: &Path, keep_open: bool) -> std::io::Result<u64> {
    let open = if keep_open {
        open_files_below(dir)
    } else {
        HashSet::new()
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
        Ok(meta) if !meta.is_dir() => {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        Ok(_) => {}
    }
    let mut freed = 0;
    remove_children(dir, &open, &dir.join(MARKER), &mut freed)?;
    Ok(freed)
}

/// Returns whether `dir` is now empty.
fn remove_children(
    dir: &Path,
    open: &HashSet<PathBuf>,
    keep: &Path,
    freed: &mut u64,
) -> std::io::Result<bool> {
    let mut empty = true;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path == keep {
            empty = false;
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_dir() {
            if remove_children(&path, open, keep, freed)? {
                std::fs::remove_dir(&path)?;
            } else {
                empty = false;
            }
        } else if open.contains(&path) {
            empty = false;
        } else {
            std::fs::remove_file(&path)?;
            *freed += meta.len();
        }
    }
    Ok(empty)
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
        let new = base.path().join("new");
        claim(&new, "data").unwrap();
        assert!(owned(&new));
        std::fs::create_dir_all(blobfuse2_dir(&new).join("d")).unwrap();
        std::fs::write(blobfuse2_dir(&new).join("d/blob"), [0u8; 10]).unwrap();
        assert_eq!(empty(&new, false).unwrap(), 10);
        let left: Vec<_> = std::fs::read_dir(&new).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "only the marker stays");
        release(&new, false, true).unwrap();
        assert!(!new.exists());

        let users = base.path().join("notebooks");
        std::fs::create_dir(&users).unwrap();
        std::fs::write(users.join("thesis.ipynb"), "years of work").unwrap();
        let refused = check_claimable(&users).unwrap_err();
        assert!(refused.contains("is not empty"), "{refused}");
        assert!(claim(&users, "data").is_err());
        assert!(empty(&users, false).is_err());
        assert!(release(&users, false, true).is_err());
        assert_eq!(
            std::fs::read_to_string(users.join("thesis.ipynb")).unwrap(),
            "years of work"
        );
        assert!(!owned(&users));

        let empty_dir = base.path().join("empty");
        std::fs::create_dir(&empty_dir).unwrap();
        claim(&empty_dir, "data").unwrap();
        release(&empty_dir, false, false).unwrap();
        assert!(
            empty_dir.exists() && !owned(&empty_dir),
            "a dir the agent did not create stays"
        );
    }
}

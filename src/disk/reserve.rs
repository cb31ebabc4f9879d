//! The reserve file: space preallocated in the state dir while there is
//! plenty, deleted when the state filesystem turns critical so that the
//! agent's own writes (the store, a clean stop) still find room, and
//! preallocated again once space has returned.
//!
//! [`ReserveKeeper`] decides when (pure: the guard calls it under its lock);
//! [`ReserveFile`] does the blocking file I/O: call it from `spawn_blocking`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use super::{DiskState, FsStats, Thresholds};

/// The file's name in the state dir.
pub const RESERVE_FILE_NAME: &str = "disk-reserve";

/// A failed reserve allocation is retried this much later.
const RESERVE_RETRY: Duration = Duration::from_secs(10);

/// What to do with the reserve file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveAction {
    /// Delete it: its filesystem is critical, or the reserve is turned off.
    Release,
    /// Allocate it with this many bytes.
    Create(u64),
}

/// How a [`ReserveAction`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReserveOutcome {
    /// Whether the file is there now.
    pub present: bool,
    /// Whether the action failed (a failed allocation is retried later).
    pub failed: bool,
}

/// When to release and when to allocate the reserve file, between the
/// blocking operations that do it: at most one runs at a time, and a failed
/// allocation waits before it is tried again.
#[derive(Debug, Default)]
pub struct ReserveKeeper {
    present: bool,
    busy: bool,
    retry_at: Option<Instant>,
}

impl ReserveKeeper {
    /// A keeper that knows whether the file is there already.
    pub fn new(present: bool) -> Self {
        Self {
            present,
            ..Self::default()
        }
    }

    /// What to do now, given the wanted size (`disk.reserve_bytes`) and the
    /// state filesystem's state, numbers and levels: release it while that
    /// filesystem is critical or the reserve is off; allocate it once there
    /// is room for it on top of the floor plus the margin. An action
    /// returned is in progress until [`ReserveKeeper::done`].
    pub fn decide(
        &mut self,
        wanted: u64,
        state: DiskState,
        stats: Option<FsStats>,
        thresholds: &Thresholds,
        now: Instant,
    ) -> Option<ReserveAction> {
        if self.busy {
            return None;
        }
        if self.present && (wanted == 0 || state == DiskState::Critical) {
            self.busy = true;
            return Some(ReserveAction::Release);
        }
        let room = stats.is_some_and(|s| {
            s.free_bytes >= thresholds.reclaim_target_bytes().saturating_add(wanted)
        });
        let may_retry = self.retry_at.is_none_or(|at| now >= at);
        if !self.present
            && wanted > 0
            && matches!(state, DiskState::Ok | DiskState::Warning)
            && room
            && may_retry
        {
            self.busy = true;
            return Some(ReserveAction::Create(wanted));
        }
        None
    }

    /// The action in progress ended with `outcome`.
    pub fn done(&mut self, outcome: ReserveOutcome, now: Instant) {
        self.present = outcome.present;
        self.busy = false;
        self.retry_at = outcome.failed.then(|| now + RESERVE_RETRY);
    }
}

/// The reserve file of one state dir.
#[derive(Debug, Clone)]
pub struct ReserveFile {
    path: PathBuf,
}

impl ReserveFile {
    /// The reserve in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(RESERVE_FILE_NAME),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bytes it holds now (0 when absent).
    pub fn size(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Makes the file hold `bytes`, allocated (not sparse). Written under a
    /// temporary name and renamed, so a half-allocated file never counts.
    /// Fails with the filesystem's error (e.g. no space), leaving nothing.
    pub fn ensure(&self, bytes: u64) -> io::Result<()> {
        if self.size() == bytes {
            return Ok(());
        }
        let tmp = self.path.with_extension("tmp");
        let result = allocate(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &self.path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Deletes the file, giving its space back. Absent is fine. Returns the
    /// bytes released.
    pub fn release(&self) -> io::Result<u64> {
        let size = self.size();
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(size),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Carries out `action` and logs how it went. Blocking.
    pub fn apply(&self, action: ReserveAction) -> ReserveOutcome {
        let path = self.path.display();
        match action {
            ReserveAction::Release => {
                let present = match self.release() {
                    Ok(bytes) => {
                        tracing::warn!(path = %path, bytes, "state filesystem critical: reserve file released");
                        false
                    }
                    Err(error) => {
                        tracing::error!(path = %path, %error, "cannot release the reserve file");
                        true
                    }
                };
                ReserveOutcome {
                    present,
                    failed: present,
                }
            }
            ReserveAction::Create(bytes) => match self.ensure(bytes) {
                Ok(()) => {
                    tracing::info!(path = %path, bytes, "reserve file in place");
                    ReserveOutcome {
                        present: true,
                        failed: false,
                    }
                }
                Err(error) => {
                    tracing::warn!(path = %path, %error, "cannot allocate the reserve file; retrying later");
                    ReserveOutcome {
                        present: false,
                        failed: true,
                    }
                }
            },
        }
    }
}

/// Creates `path` with `bytes` allocated: `fallocate` where the filesystem
/// has it, zeros written otherwise.
fn allocate(path: &Path, bytes: u64) -> io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let len = i64::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if len == 0 {
        return Ok(());
    }
    match fallocate(&file, FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => write_zeros(&file, bytes),
        Err(e) => Err(e.into()),
    }
}

fn write_zeros(mut file: &std::fs::File, bytes: u64) -> io::Result<()> {
    use std::io::Write;
    let chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_release_and_resize() {
        let dir = tempfile::tempdir().unwrap();
        let reserve = ReserveFile::new(dir.path());
        assert_eq!(reserve.size(), 0);
        reserve.ensure(1 << 20).unwrap();
        assert_eq!(reserve.size(), 1 << 20);
        // Allocated, not sparse.
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(reserve.path()).unwrap().blocks();
        assert!(blocks * 512 >= 1 << 20, "{blocks} blocks");
        reserve.ensure(2 << 20).unwrap();
        assert_eq!(reserve.size(), 2 << 20);
        assert_eq!(reserve.release().unwrap(), 2 << 20);
        assert_eq!(reserve.release().unwrap(), 0);
        assert!(!reserve.path().exists());
        assert!(!reserve.path().with_extension("tmp").exists());
    }
}

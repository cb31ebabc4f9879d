//! The reserve file: space preallocated in the state dir while there is
//! plenty, deleted when the state filesystem turns critical so that the
//! agent's own writes (the store, a clean stop) still find room, and
//! preallocated again once space has returned.
//!
//! Blocking file I/O: call from `spawn_blocking`.

use std::io;
use std::path::{Path, PathBuf};

/// The file's name in the state dir.
pub const RESERVE_FILE_NAME: &str = "disk-reserve";

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

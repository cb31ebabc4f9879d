//! Real filesystems for tests: a tmpfs, a loop-mounted ext4, and a filler
//! that sets a filesystem's free space; each is unmounted (and its loop
//! device detached) on drop, also when a test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, MsFlags};

pub const MIB: u64 = 1 << 20;

/// A tmpfs of `mib` MiB, unmounted on drop.
pub struct Tmpfs {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn new(mib: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tmpfs");
        std::fs::create_dir(&path).expect("mount point");
        nix::mount::mount(
            Some("tmpfs"),
            &path,
            Some("tmpfs"),
            MsFlags::empty(),
            Some(format!("size={mib}m,mode=0755").as_str()),
        )
        .expect("mount tmpfs");
        Self { _dir: dir, path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH);
    }
}

/// An ext4 image of `mib` MiB on a loop device, mounted; unmounted and
/// detached on drop.
pub struct LoopExt4 {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub device: String,
}

impl LoopExt4 {
    pub fn new(mib: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(mib * MIB))
            .expect("image");
        run(
            "mkfs.ext4",
            &["-q", "-F", "-m", "0", image.to_str().expect("utf-8 path")],
        );
        let device = run(
            "losetup",
            &["-f", "--show", image.to_str().expect("utf-8 path")],
        )
        .trim()
        .to_owned();
        let path = dir.path().join("ext4");
        std::fs::create_dir(&path).expect("mount point");
        let fs = Self {
            _dir: dir,
            path,
            device,
        };
        nix::mount::mount(
            Some(fs.device.as_str()),
            &fs.path,
            Some("ext4"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount ext4");
        fs
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH);
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn free_bytes(path: &Path) -> u64 {
    let vfs = nix::sys::statvfs::statvfs(path).expect("statvfs");
    vfs.blocks_available() * vfs.fragment_size()
}

/// One file whose allocation sets a filesystem's free space.
pub struct Filler {
    file: PathBuf,
    fs: PathBuf,
}

impl Filler {
    pub fn new(fs: &Path) -> Self {
        Self {
            file: fs.join("filler"),
            fs: fs.to_owned(),
        }
    }

    /// Grows or shrinks the filler so that about `target` bytes are free.
    pub fn set_free(&self, target: u64) {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.file)
            .expect("filler");
        let size = file.metadata().expect("stat").len();
        let free = free_bytes(&self.fs);
        let wanted = (size + free).saturating_sub(target);
        if wanted > size {
            nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, wanted as i64)
                .expect("fallocate");
        } else {
            file.set_len(wanted).expect("truncate");
        }
    }

    /// Takes every last block: free space reaches 0.
    pub fn fill_completely(&self) {
        use std::io::Write;
        // fallocate needs room for its own metadata: take the last blocks
        // one by one.
        self.set_free(256 << 10);
        let mut rest = std::fs::File::create(self.fs.join("filler-rest")).expect("rest");
        for size in [4096, 1024, 512, 1] {
            let block = vec![0u8; size];
            while rest
                .write_all(&block)
                .and_then(|()| rest.sync_data())
                .is_ok()
            {}
        }
        assert_eq!(free_bytes(&self.fs), 0, "filesystem is full");
    }

    pub fn empty(&self) {
        let _ = std::fs::remove_file(self.fs.join("filler-rest"));
        let _ = std::fs::remove_file(&self.file);
    }
}

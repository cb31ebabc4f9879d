//! A Debian 12 root filesystem for the tests that need a whole system: the
//! package installed in an image build's chroot (tests/deb_package.rs) and
//! the agent under a booted systemd (tests/systemd_boot.rs, through
//! [`super::nspawn`]).
//!
//! Made once with `mmdebstrap --variant=minbase --include=<PACKAGES>
//! bookworm` (about 20 s, from the Debian mirror) and cached under cargo's
//! `target/tmp/systemd-harness/`: the tarball mmdebstrap writes, and the tree
//! unpacked from it, which booted containers use read-only as the lower
//! layer of an overlay. Both are named after a hash of the mmdebstrap
//! command, so a changed package list makes a new one (and the old ones are
//! removed). A lock file serialises test binaries that want it at the same
//! time; each piece is made under a temporary name and renamed, so a
//! half-made rootfs is never used.
//!
//! Needs root, mmdebstrap and the Debian mirror (scripts/prepare-host.sh
//! installs mmdebstrap and systemd-container).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::run_ok;

/// The Debian release of the rootfs (the compute instances' and this host's).
pub const SUITE: &str = "bookworm";

/// Installed on top of minbase (Essential packages and apt).
/// - `systemd`, `systemd-sysv`, `dbus`: a booted systemd with its bus (the
///   agent's unit, `systemd-run`, `systemctl`, the package's sysusers and
///   tmpfiles entries); with `systemd-tmpfiles` present an image build's
///   chroot is the case that used to fail (issue 14).
/// - `fuse3`: a dependency of the package (dpkg refuses it otherwise), and
///   `fusermount3` for mounts.
/// - `ca-certificates`, `openssh-server`: what a compute instance image has,
///   for the SSH and TLS duties to come.
/// - `busybox`: small tools (httpd, nc) for tests inside.
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "fuse3",
    "ca-certificates",
    "openssh-server",
    "busybox",
];

/// A made rootfs: the tarball and the tree unpacked from it.
pub struct Rootfs {
    tarball: PathBuf,
    tree: PathBuf,
}

/// Whether this host can make and use the rootfs; panics when it must
/// (`required`, e.g. scripts/test.sh sets the variable), else prints why
/// the test is skipped and returns false.
pub fn host_supports(required: bool, tools: &[&str]) -> bool {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|tool| (*tool).to_owned())
        .collect();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".into());
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        !required,
        "missing {missing:?}: run scripts/prepare-host.sh (it installs mmdebstrap and systemd-container) as root"
    );
    eprintln!("SKIPPED: missing {missing:?} (scripts/prepare-host.sh installs them)");
    false
}

/// Where the harness keeps its cache and its per-boot directories.
pub fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("systemd-harness")
}

/// The mmdebstrap arguments before the output path; the cache key.
fn mmdebstrap_args() -> Vec<String> {
    vec![
        "--variant=minbase".into(),
        format!("--include={}", PACKAGES.join(",")),
        SUITE.into(),
    ]
}

/// FNV-1a: a stable hash (std's hasher may change between Rust releases,
/// which would rebuild the cache for nothing).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Rootfs {
    /// The cached rootfs, made first when it is missing.
    pub fn cached() -> Rootfs {
        let dir = harness_dir();
        std::fs::create_dir_all(&dir).expect("harness dir");
        let lock = std::fs::File::create(dir.join("rootfs.lock")).expect("lock file");
        lock.lock().expect("lock the rootfs cache");

        let args = mmdebstrap_args();
        let name = format!("rootfs-{SUITE}-{:016x}", fnv1a(&args.join(" ")));
        let tarball = dir.join(format!("{name}.tar"));
        let tree = dir.join(&name);
        remove_other_rootfs(&dir, &name);

        if !tarball.exists() {
            let partial = dir.join(format!("{name}.tar.partial"));
            let started = std::time::Instant::now();
            eprintln!(
                "[rootfs] mmdebstrap {} {}",
                args.join(" "),
                tarball.display()
            );
            run_ok(
                Command::new("mmdebstrap")
                    // Told, since the name does not end in .tar.
                    .args(["--quiet", "--format=tar"])
                    .args(&args)
                    .arg(&partial),
            );
            std::fs::rename(&partial, &tarball).expect("rename the tarball");
            eprintln!("[rootfs] made in {:.1?}", started.elapsed());
        }
        if !tree.exists() {
            let partial = dir.join(format!("{name}.partial"));
            let _ = std::fs::remove_dir_all(&partial);
            unpack(&tarball, &partial);
            std::fs::rename(&partial, &tree).expect("rename the tree");
        }
        Rootfs { tarball, tree }
    }

    /// The unpacked tree. Never written to: containers boot on an overlay
    /// of it.
    pub fn tree(&self) -> &Path {
        &self.tree
    }

    /// Unpacks a private, writable copy into `dir` (created).
    pub fn unpack_into(&self, dir: &Path) {
        unpack(&self.tarball, dir);
    }
}

fn unpack(tarball: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(dir)
            .args(["--numeric-owner", "-xpf"])
            .arg(tarball),
    );
}

/// Removes the tarballs and trees of other package lists (and pieces left
/// by an interrupted build). Called under the lock.
fn remove_other_rootfs(dir: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        let ours = file_name == keep || file_name == format!("{keep}.tar");
        if file_name.starts_with("rootfs-") && !ours {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

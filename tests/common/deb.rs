//! The Debian package of the binary under test, made with
//! `scripts/build-deb.sh --binary <the debug binary cargo built> --fast`:
//! stripped, fast compression: about 3 s, where the release profile (fat
//! LTO in one codegen unit) takes minutes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Whether cargo-deb is installed; panics when the test must run
/// (`required`), else says why it is skipped.
pub fn cargo_deb_available(required: bool) -> bool {
    let have = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            !required,
            "cargo-deb is missing: run `scripts/build-deb.sh --install-tool`"
        );
        eprintln!("SKIPPED: cargo-deb not installed (scripts/build-deb.sh --install-tool)");
    }
    have
}

/// Packages the binary under test into `out`; returns the .deb.
pub fn build_deb(out: &Path) -> PathBuf {
    super::run_ok(
        Command::new(Path::new(REPO).join("scripts/build-deb.sh"))
            .arg("--binary")
            .arg(env!("CARGO_BIN_EXE_instance-agent"))
            .arg("--output")
            .arg(out)
            .arg("--fast"),
    );
    std::fs::read_dir(out)
        .expect("output dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb in the output dir")
}

/// One package per test process, for tests that install it many times:
/// made at the first call under `<harness dir>/deb/<pid>/`. Directories of
/// processes that are gone are removed then (a static is never dropped, so
/// each run's package stays until the next run).
pub fn shared_deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let parent = super::rootfs::harness_dir().join("deb");
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for entry in entries.flatten() {
                let pid = entry.file_name().to_string_lossy().into_owned();
                if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(&pid).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let out = parent.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&out);
        build_deb(&out)
    })
}

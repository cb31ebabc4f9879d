//! The scripts under scripts/ exit 0 when they succeed and non-zero when
//! they fail, also through their EXIT traps (issue 14: `build-deb.sh` exited
//! 1 after every successful build, because its trap's last command was a
//! false `[[ -n $stage ]] && ...`). Each is run in its cheapest real mode.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::deb::cargo_deb_available;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn script(name: &str) -> Command {
    Command::new(Path::new(REPO).join("scripts").join(name))
}

fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn required() -> bool {
    std::env::var("INSTANCE_AGENT_REQUIRE_DEB_TEST").as_deref() == Ok("1")
}

/// `build-deb.sh --no-build` packages the release binary already built (the
/// mode of `scripts/build-deb.sh && apt install ./target/debian/*.deb`, and
/// the one without a staging dir): exit 0, and the last line printed is the
/// .deb, which exists. A release build takes minutes, so the target dir is a
/// private one whose `release/instance-agent` is the binary under test.
#[test]
fn build_deb_no_build_exits_0_and_prints_the_package() {
    if !cargo_deb_available(required()) {
        return;
    }
    let target = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(target.path().join("release")).expect("mkdir");
    // Stripped like a release binary, or packaging the debug info costs
    // seconds (binutils' strip; a plain copy where it is missing).
    let binary = target.path().join("release/instance-agent");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&binary)
        .arg(env!("CARGO_BIN_EXE_instance-agent"))
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(env!("CARGO_BIN_EXE_instance-agent"), &binary).expect("copy the binary");
    }

    let out = script("build-deb.sh")
        .args(["--no-build", "--fast"])
        .env("CARGO_TARGET_DIR", target.path())
        .output()
        .expect("run build-deb.sh");
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let deb = Path::new(last);
    assert!(
        deb.starts_with(target.path().join("debian"))
            && deb.extension().is_some_and(|e| e == "deb")
            && deb.is_file(),
        "the last line is not the .deb: {last:?}\n{}",
        printed(&out)
    );
}

/// Failures keep their own status: a missing release binary (no staging
/// dir) is 1 with the reason, an unknown argument 64, and a failure with a
/// staging dir is non-zero and still removes the staging dir.
#[test]
fn build_deb_failures_exit_non_zero_and_clean_up() {
    if !cargo_deb_available(required()) {
        return;
    }
    let empty = tempfile::tempdir().expect("tempdir");
    let out = script("build-deb.sh")
        .arg("--no-build")
        .env("CARGO_TARGET_DIR", empty.path())
        .output()
        .expect("run build-deb.sh");
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(
        printed(&out).contains("instance-agent is missing"),
        "{}",
        printed(&out)
    );

    let out = script("build-deb.sh")
        .arg("--bogus")
        .output()
        .expect("run build-deb.sh");
    assert_eq!(out.status.code(), Some(64), "{}", printed(&out));

    let tmp = tempfile::tempdir().expect("tempdir");
    let out = script("build-deb.sh")
        .args(["--binary", "/nonexistent/instance-agent", "--output"])
        .arg(tmp.path().join("out"))
        .env("TMPDIR", tmp.path())
        .output()
        .expect("run build-deb.sh");
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "{}: {}",
        out.status,
        printed(&out)
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("read tmp")
        .flatten()
        .map(|e| e.file_name())
        .filter(|name| name.to_string_lossy().starts_with("instance-agent-deb."))
        .collect();
    assert!(left.is_empty(), "staging dirs left: {left:?}");
}

/// `check-test-logs.sh` (EXIT trap removing its temp files): 0 when no
/// registered secret appears, 1 when one does.
#[test]
fn check_test_logs_exits_0_when_clean_and_1_on_a_leak() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = "s3cr3t-value-for-the-sweep";
    std::fs::write(
        dir.path().join("secrets.list"),
        format!("tests/scripts.rs:1:1\t{secret}\n"),
    )
    .expect("secrets.list");
    std::fs::create_dir(dir.path().join("agent-1")).expect("mkdir");
    std::fs::write(dir.path().join("agent-1/agent.log"), "nothing to see\n").expect("log");
    let run = || {
        script("check-test-logs.sh")
            .arg(dir.path())
            .output()
            .expect("run check-test-logs.sh")
    };
    let clean = run();
    assert_eq!(clean.status.code(), Some(0), "{}", printed(&clean));

    std::fs::write(
        dir.path().join("agent-1/agent.log"),
        format!("oops {secret}\n"),
    )
    .expect("log");
    let leak = run();
    assert_eq!(leak.status.code(), Some(1), "{}", printed(&leak));
    assert!(
        !printed(&leak).contains(secret),
        "the sweep printed the secret"
    );
}

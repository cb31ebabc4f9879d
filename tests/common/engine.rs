//! The host's real Docker engine, taken away and given back by the tests
//! that need it gone (stopped) or hung (frozen with SIGSTOP). A guard puts
//! it back when a test ends, also when it fails. Only tests that run alone
//! (their own test binary, or the chaos suite) may use these.

use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Makes sure an engine runs, and runs unfrozen, when the guard drops.
pub struct EngineGuard;

impl Drop for EngineGuard {
    fn drop(&mut self) {
        thaw_engine();
        start_engine();
    }
}

/// True when the engine answers `docker info`.
pub fn engine_answers() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ID}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The pid of the running dockerd.
pub fn dockerd_pid() -> Option<i32> {
    let out = Command::new("pidof").arg("dockerd").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Stops dockerd with SIGTERM and waits until it is gone.
pub fn stop_engine() {
    let pid = dockerd_pid().expect("a dockerd runs (scripts/prepare-host.sh starts one)");
    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM dockerd");
    let deadline = Instant::now() + Duration::from_secs(60);
    while dockerd_pid() == Some(pid) {
        assert!(Instant::now() < deadline, "dockerd did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts dockerd the way scripts/prepare-host.sh does, unless one answers,
/// and waits until it answers.
pub fn start_engine() {
    if engine_answers() {
        return;
    }
    let _ = Command::new("sh")
        .args([
            "-c",
            "setsid nohup dockerd --bridge=none --iptables=false >>/var/log/instance-agent-test-dockerd.log 2>&1 </dev/null &",
        ])
        .status();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !engine_answers() {
        assert!(Instant::now() < deadline, "dockerd did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Freezes dockerd (SIGSTOP): hung, not dead; its socket still accepts
/// connections, nothing answers.
pub fn freeze_engine() {
    let pid = dockerd_pid().expect("a dockerd runs (scripts/prepare-host.sh starts one)");
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP dockerd");
}

/// Lets a frozen dockerd go on (SIGCONT); harmless when it runs.
pub fn thaw_engine() {
    if let Some(pid) = dockerd_pid() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
    }
}

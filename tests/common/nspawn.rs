//! A Debian 12 system booted under a real systemd, for the tests of the
//! agent's unit and package (tests/systemd_boot.rs).
//!
//! [`Booted::boot`] starts `systemd-nspawn -b` on a throw-away overlay of the
//! cached [`Rootfs`] tree (`--volatile=overlay`: the tree is the read-only
//! lower layer, writes go to a tmpfs that goes with the container, so boots
//! neither pollute each other nor cost a copy), with its own network
//! namespace (only loopback: the agent's metrics port and anything else it
//! binds cannot meet the host's or another container's), and the host's
//! Docker socket, `/dev/fuse` and a shared scratch directory bound in. It
//! waits for the container's systemd to report the boot finished, and
//! [`Booted::exec`] runs commands inside with `nsenter` into its PID 1's
//! namespaces.
//!
//! Clean-up is the guard's drop, also when a test fails: the journal is
//! printed first (on failure), then PID 1 is asked to halt (`SIGRTMIN+3`),
//! and killed if it does not within [`HALT_TIMEOUT`] (killing a PID
//! namespace's init kills everything in it). Every mount the container made
//! lives in its own mount namespace and goes with it. What would stay on the
//! host is removed: the cgroups below (see [`CgroupDirs`]) and the scratch
//! directory. If the test process itself dies, nspawn gets SIGTERM from the
//! kernel (`setpriv --pdeathsig`), which halts the container the same way;
//! the next boot removes the cgroups and directory such a process left.
//!
//! Facts of this host the harness depends on (contracts.md "A real systemd
//! in tests"): cgroup v1 with a named systemd hierarchy plus a v2 mount at
//! `/sys/fs/cgroup/unified` (hybrid), no systemd as PID 1 and no system bus,
//! hence `--register=no --keep-unit`.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::rootfs::{Rootfs, harness_dir};

/// How long the container may take to boot (READY=1 from its systemd).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long PID 1 may take to halt before it is killed.
pub const HALT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit of one command run inside.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// The cgroup hierarchies nspawn writes to on this host: it takes its own
/// cgroup from the v2 one (`0::`) and also attaches to the named v1 one.
const HIERARCHIES: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"];
/// Where the shared directories live: on the host's own disk, outside
/// `/tmp`, `/var/tmp` and `/home`, which the agent's unit hides or makes
/// private (`PrivateTmp=`, `ProtectHome=`): a checkout under `/tmp` would
/// otherwise give the agent a job bind source it cannot see.
const SHARED_ROOT: &str = "/var/lib/instance-agent-test";

/// The parent, in each hierarchy, of every container's cgroup.
const CGROUP_PARENT: &str = "instance-agent-test";

/// A booted container; halted and cleaned up on drop.
pub struct Booted {
    name: String,
    nspawn: Option<Child>,
    leader: i32,
    work: Option<tempfile::TempDir>,
    shared: PathBuf,
    /// Removes `shared` once the container is halted (fields drop after
    /// `Drop::drop`).
    _shared_dir: tempfile::TempDir,
    console: PathBuf,
    cgroups: CgroupDirs,
    boot_time: Duration,
}

/// The per-container cgroups, `<hierarchy>/instance-agent-test/<name>`.
/// nspawn with `--keep-unit` puts the container below its own cgroup
/// (`payload/`, `supervisor/`): left in the host's root cgroup, every
/// container would share one `payload` (two containers' systemds in one
/// cgroup tree) and leave it behind. The container's systemd removes what it
/// made below when it halts; what stays (empty) is removed here.
struct CgroupDirs {
    dirs: Vec<PathBuf>,
}

impl CgroupDirs {
    fn create(name: &str) -> CgroupDirs {
        let dirs = HIERARCHIES
            .iter()
            .map(|hierarchy| Path::new(hierarchy).join(CGROUP_PARENT).join(name))
            .collect::<Vec<_>>();
        for dir in &dirs {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cgroup {}: {e}", dir.display()));
        }
        CgroupDirs { dirs }
    }

    /// Removes the (empty) cgroup trees, deepest first; a cgroup still
    /// holding a process refuses, and is reported.
    fn remove(&self) -> Vec<String> {
        let mut left = Vec::new();
        for dir in &self.dirs {
            // A cgroup is empty shortly after its last process is reaped.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match remove_cgroup_tree(dir) {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => {
                        left.push(format!("{}: {e}", dir.display()));
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        for hierarchy in HIERARCHIES {
            // Only when empty: another container may still use it.
            let _ = std::fs::remove_dir(Path::new(hierarchy).join(CGROUP_PARENT));
        }
        left
    }
}

impl Drop for CgroupDirs {
    /// Also when the boot failed before there was a container to halt.
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// The pid in a name made by [`next_name`] (`ia-<pid>-<n>...`), when that
/// process is gone: what it left (a test binary killed before its guards
/// ran; its containers were halted by `--pdeathsig`) may be removed.
pub fn dead_owner(name: &str) -> bool {
    name.strip_prefix("ia-")
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
}

/// Removes the cgroups and boot directories of test processes that are
/// gone.
fn sweep_leftovers(boots: &Path) {
    for parent in HIERARCHIES.iter().map(|h| Path::new(h).join(CGROUP_PARENT)) {
        for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            if dead_owner(&entry.file_name().to_string_lossy()) {
                let _ = remove_cgroup_tree(&entry.path());
            }
        }
    }
    for dir in [boots, Path::new(SHARED_ROOT)] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if dead_owner(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A unique container name: `ia-<pid>-<n>` (also its machine name).
fn next_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "ia-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

impl Booted {
    /// Boots a fresh container on `rootfs` and waits until its systemd has
    /// finished starting up; panics (with the console output) when it does
    /// not within [`BOOT_TIMEOUT`] or the system is neither `running` nor
    /// `degraded`.
    pub fn boot(rootfs: &Rootfs) -> Booted {
        let started = Instant::now();
        let boots = harness_dir().join("boots");
        std::fs::create_dir_all(&boots).expect("boots dir");
        sweep_leftovers(&boots);
        let name = next_name();
        let work = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(&boots)
            .expect("boot dir");
        // Seen at the same path inside and outside, so that a path the
        // agent inside checks is the path the host's Docker engine mounts.
        std::fs::create_dir_all(SHARED_ROOT).expect("shared root");
        let shared_dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(SHARED_ROOT)
            .expect("shared dir");
        let shared = shared_dir.path().to_path_buf();
        let console = work.path().join("console.log");
        let notify_path = work.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("socket timeout");

        let cgroups = CgroupDirs::create(&name);
        let join_cgroups = cgroups
            .dirs
            .iter()
            .map(|dir| format!("echo $$ > {}/cgroup.procs", dir.display()))
            .collect::<Vec<_>>()
            .join(" && ");
        let log = std::fs::File::create(&console).expect("console log");
        let mut command = Command::new("setpriv");
        command
            // The kernel sends nspawn SIGTERM (which it turns into a halt of
            // the container) when the thread that started it ends.
            .args(["--pdeathsig", "TERM", "--", "sh", "-c"])
            .arg(format!("{join_cgroups} && exec \"$0\" \"$@\""))
            .arg("systemd-nspawn")
            .arg("--quiet")
            .arg(format!("--directory={}", rootfs.tree().display()))
            .args([
                "--volatile=overlay",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--notify-ready=yes",
                "--console=read-only",
            ])
            .arg(format!("--machine={name}"))
            .arg("--bind=/var/run/docker.sock")
            .arg("--bind=/dev/fuse")
            .arg(format!("--bind={}", shared.display()))
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let nspawn = command.spawn().expect("spawn systemd-nspawn");
        let mut booted = Booted {
            name,
            nspawn: Some(nspawn),
            leader: 0,
            work: Some(work),
            shared,
            _shared_dir: shared_dir,
            console,
            cgroups,
            boot_time: Duration::ZERO,
        };
        booted.wait_ready(&notify);
        booted.boot_time = started.elapsed();

        let state = booted.exec(&["systemctl", "is-system-running", "--wait"]);
        let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
        if state != "running" {
            let failed = booted.exec(&["systemctl", "--failed", "--no-legend"]);
            let failed = String::from_utf8_lossy(&failed.stdout);
            assert_eq!(state, "degraded", "system state; failed units:\n{failed}");
            eprintln!(
                "[nspawn] {} booted degraded; failed units:\n{failed}",
                booted.name
            );
        }
        booted
    }

    /// Reads nspawn's notifications: `X_NSPAWN_LEADER_PID=` (the container's
    /// PID 1 as the host sees it), then `READY=1` once the container's
    /// systemd finished starting up.
    fn wait_ready(&mut self, notify: &UnixDatagram) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut buffer = [0u8; 4096];
        loop {
            match notify.recv(&mut buffer) {
                Ok(n) => {
                    let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
                    for line in message.lines() {
                        if let Some(pid) = line.strip_prefix("X_NSPAWN_LEADER_PID=") {
                            self.leader = pid.parse().expect("leader pid");
                        }
                    }
                    if message.lines().any(|l| l == "READY=1") && self.leader > 0 {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("nspawn notify socket: {e}"),
            }
            let exited = self
                .nspawn
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "systemd-nspawn exited with {status} before the boot finished:\n{}",
                    self.console()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the container did not boot within {BOOT_TIMEOUT:?}:\n{}",
                self.console()
            );
        }
    }

    /// The container's name (and hostname).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's pid of the container's PID 1.
    pub fn leader(&self) -> i32 {
        self.leader
    }

    /// From the start of nspawn to the container's READY=1.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// A directory seen at this same path by the host and inside.
    pub fn shared(&self) -> &Path {
        &self.shared
    }

    /// A path inside the container as the host reaches it
    /// (`/proc/<PID 1>/root/...`).
    pub fn host_path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/{}",
            self.leader,
            inside.trim_start_matches('/')
        ))
    }

    /// Writes a file inside (parent directories created).
    pub fn write(&self, inside: &str, contents: &str) {
        let path = self.host_path(inside);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir inside");
        }
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {inside}: {e}"));
    }

    /// Runs a command inside (all of PID 1's namespaces, its root and a clean
    /// environment), with [`EXEC_TIMEOUT`].
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_timeout(args, EXEC_TIMEOUT)
    }

    /// [`Booted::exec`] with its own time limit; a command still running
    /// then is killed (status 124 from `timeout`).
    pub fn exec_timeout(&self, args: &[&str], limit: Duration) -> Output {
        Command::new("timeout")
            .args(["--kill-after=5", &format!("{}", limit.as_secs().max(1))])
            .args(["nsenter", "-t", &self.leader.to_string(), "-a", "--"])
            .args(["env", "-i"])
            .args([
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                "SYSTEMD_COLORS=0",
                "SYSTEMD_PAGER=",
                "NO_COLOR=1",
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run nsenter")
    }

    /// Runs a command inside that must succeed; returns its stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        super::assert_success(&args, &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The container's console (its systemd's boot and shutdown messages).
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// The journal of this boot, or of one unit (`-u`).
    pub fn journal(&self, unit: Option<&str>) -> String {
        let mut args = vec!["journalctl", "--no-pager", "-b", "-o", "short-monotonic"];
        if let Some(unit) = unit {
            args.extend(["-u", unit]);
        }
        let out = self.exec_timeout(&args, Duration::from_secs(30));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Installs a package file with `dpkg -i`, as apt does (maintainer
    /// scripts included). With `start == false` a `policy-rc.d` that refuses
    /// every action is in place meanwhile, as when an image is prepared:
    /// the unit is enabled, not started.
    #[track_caller]
    pub fn install_deb(&self, deb: &Path, start: bool) -> Output {
        let inside = "/tmp/instance-agent.deb";
        std::fs::copy(deb, self.host_path(inside)).expect("copy the .deb inside");
        let policy = "/usr/sbin/policy-rc.d";
        if !start {
            self.write(policy, "#!/bin/sh\nexit 101\n");
            self.ok(&["chmod", "0755", policy]);
        }
        let out = self.exec(&["dpkg", "-i", inside]);
        if !start {
            std::fs::remove_file(self.host_path(policy)).expect("remove policy-rc.d");
        }
        super::assert_success(&"dpkg -i", &out);
        out
    }

    /// Halts the container (`SIGRTMIN+3` to PID 1; killed after
    /// [`HALT_TIMEOUT`]) and removes what it left on the host. Returns how
    /// long the halt took. Called by drop; idempotent.
    pub fn halt(&mut self) -> Duration {
        let started = Instant::now();
        let Some(mut nspawn) = self.nspawn.take() else {
            return Duration::ZERO;
        };
        if self.leader > 0 {
            // systemd's "halt" signal; nix has no real-time signals.
            let _ = Command::new("kill")
                .args(["-s", "RTMIN+3", &self.leader.to_string()])
                .status();
        } else {
            let _ = kill(Pid::from_raw(nspawn.id() as i32), Signal::SIGTERM);
        }
        if wait_exit(&mut nspawn, HALT_TIMEOUT).is_none() {
            eprintln!(
                "[nspawn] {} did not halt within {HALT_TIMEOUT:?}: killing it",
                self.name
            );
            if self.leader > 0 {
                let _ = kill(Pid::from_raw(self.leader), Signal::SIGKILL);
            }
            if wait_exit(&mut nspawn, Duration::from_secs(10)).is_none() {
                let _ = nspawn.kill();
                let _ = nspawn.wait();
            }
        }
        let took = started.elapsed();
        let left = self.cgroups.remove();
        if !left.is_empty() {
            eprintln!("[nspawn] {}: cgroups left behind: {left:?}", self.name);
        }
        if let Some(work) = self.work.take() {
            let path = work.path().to_owned();
            if let Err(e) = work.close() {
                eprintln!("[nspawn] cannot remove {}: {e}", path.display());
            }
        }
        took
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Booted {
    /// Prints the whole journal of this boot and the console, for a test
    /// that failed.
    pub fn print_diagnostics(&self) {
        if self.nspawn.is_none() {
            return;
        }
        eprintln!(
            "===== journal of {} (the test failed) =====\n{}\n===== console =====\n{}",
            self.name,
            self.journal(None),
            self.console()
        );
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_diagnostics();
        }
        self.halt();
    }
}

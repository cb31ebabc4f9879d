//! The outside world of mounts: starting blobfuse2 in its own session,
//! watching its process, reading `/proc/self/mountinfo`, probing a mount
//! root in a probe helper process (`disk::probe`: a blobfuse2 that stops
//! answering must never hold an agent thread in the kernel), and
//! `fusermount3 -u`. [`FuseMounter`] is the
//! narrow interface the supervisor uses; [`SystemMounter`] is the real one.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::watch;

use super::spec::Owner;
use crate::disk::probe::IsolatedProbe;
use crate::mountinfo::{self, MountEntry};

/// How to start blobfuse2 for one mount.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The mount's name (names the systemd scope).
    pub name: String,
    /// `mounts.blobfuse2_path`.
    pub program: PathBuf,
    /// Where to mount.
    pub mount_path: PathBuf,
    /// The rendered 0600 YAML config.
    pub config_file: PathBuf,
    /// Where the process's stdout and stderr go (never a pipe to the agent,
    /// which would break when the agent restarts).
    pub output_file: PathBuf,
    /// Who blobfuse2 runs as: the mount's owner (root for a jobs-only mount).
    pub owner: Owner,
}

impl Launch {
    /// blobfuse2's arguments after the program name.
    pub fn args(&self) -> Vec<OsString> {
        let mut config = OsString::from("--config-file=");
        config.push(&self.config_file);
        vec![
            "mount".into(),
            self.mount_path.clone().into_os_string(),
            config,
            "--foreground".into(),
            "--disable-version-check=true".into(),
        ]
    }

    /// Whether a command line is this launch's blobfuse2: `mount` then
    /// exactly this path (not a substring: `/mnt/a` must not match
    /// `/mnt/ab`), and this config file.
    pub fn matches(&self, argv: &[OsString]) -> bool {
        let args = self.args();
        argv.len() >= 3 && argv[1] == args[0] && argv[2] == args[1] && argv.contains(&args[2])
    }
}

/// What became of a supervised process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessState {
    /// Still running.
    Running,
    /// Gone; how it ended, e.g. "exit status 1" or "killed by SIGKILL".
    Exited(String),
}

/// What a health probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The mount root answered.
    Healthy,
    /// It did not; why (e.g. "Transport endpoint is not connected (os error 107)").
    Stale(String),
}

/// Why an unmount failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnmountFailure {
    /// Files are open or a process has its working directory there.
    Busy(String),
    /// Anything else.
    Other(String),
}

/// The operations the mount supervisor needs from the system.
#[async_trait]
pub trait FuseMounter: Send + Sync + 'static {
    /// Starts blobfuse2 in its own session (and systemd scope, under
    /// systemd), detached from the agent so that an agent restart leaves it
    /// running. Returns its pid.
    async fn spawn(&self, launch: &Launch) -> std::io::Result<u32>;
    /// Whether `pid` still runs as `launch`'s blobfuse2; reaps it when it is
    /// the agent's own child. Reads `/proc` off the async runtime.
    async fn process_state(&self, pid: u32, launch: &Launch) -> ProcessState;
    /// A running blobfuse2 serving `launch`: its command line, run as the
    /// launch's owner, from the agent's program ([`Self::is_launched`]).
    async fn find_process(&self, launch: &Launch) -> Option<u32>;
    /// Whether `pid` is `launch`'s blobfuse2 as the agent starts it, before
    /// it is adopted after a restart: its command line, its real and
    /// effective uid (the launch's owner), and its program (`/proc/PID/exe`
    /// is the agent's blobfuse2; under systemd, where the sandboxed agent
    /// may not read another user's `exe`, the main process of the mount's
    /// own unit, which only PID 1 starts). A user's own FUSE process named
    /// like blobfuse2 is none of these.
    async fn is_launched(&self, pid: u32, launch: &Launch) -> bool;
    /// The mountinfo entry at `path`, if anything is mounted there.
    async fn mount_entry(&self, path: &Path) -> std::io::Result<Option<MountEntry>>;
    /// Checks that the mount root answers within `timeout`, off the runtime.
    async fn probe(&self, path: &Path, timeout: Duration) -> Probe;
    /// `fusermount3 -u` (`-z` when `lazy`).
    async fn unmount(&self, path: &Path, lazy: bool) -> Result<(), UnmountFailure>;
    /// SIGTERM, then SIGKILL after `grace`; returns once it is gone.
    async fn stop(&self, pid: u32, launch: &Launch, grace: Duration);
    /// How blobfuse2 is started here, for `GetStatus` and `doctor`.
    fn describe(&self) -> String {
        "agent children".into()
    }
}

/// The real system: processes, `/proc`, FUSE and `fusermount3`.
///
/// Under systemd (chosen once, at construction) blobfuse2 runs as a
/// transient service of its own, `instance-agent-mount-<name>.service`,
/// forked by PID 1 in the host's mount namespace: the mount is the host's
/// and every container's even while the agent has a namespace of its own
/// (its sandbox), and an agent restart leaves it alone. Unmounting then runs
/// `fusermount3` the same way (`systemd-run --wait`), since an unmount in the
/// agent's own namespace would not reach the host's. Elsewhere blobfuse2 is
/// the agent's child in its own session.
pub struct SystemMounter {
    /// Transient services (under systemd), else direct children.
    units: Option<crate::transient::Tools>,
    /// Where health probes run: helper processes.
    isolated: Arc<dyn IsolatedProbe>,
    /// Probes in flight, by mount root: a caller that finds one waits for
    /// its answer instead of starting another (the supervisor and every job
    /// start probe the same root), so probes blocked on a hung FUSE daemon
    /// cannot pile up in the blocking pool.
    probing: Arc<Mutex<HashMap<PathBuf, watch::Receiver<Option<Probe>>>>>,
}

impl SystemMounter {
    /// The real mounter, as this host allows: transient services under
    /// systemd, else the agent's children; health probes through
    /// `isolated`.
    pub fn new(isolated: Arc<dyn IsolatedProbe>) -> Self {
        Self {
            units: crate::systemd::booted().then(crate::transient::Tools::default),
            isolated,
            probing: Arc::default(),
        }
    }
}

/// The transient service of a mount under systemd.
pub fn mount_unit(name: &str) -> String {
    format!(
        "instance-agent-mount-{}.service",
        crate::transient::escape(name)
    )
}

/// Deadline for `fusermount3` itself.
const FUSERMOUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadline for looking at a process in `/proc`.
const PROC_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a mountinfo entry is blobfuse2's (source `blobfuse2`, type
/// `fuse`): the only kind of mount the agent ever unmounts or adopts.
/// Anything else at a mount path belongs to someone else.
pub fn is_blobfuse2(entry: &MountEntry) -> bool {
    entry.source == "blobfuse2" && entry.fs_type == "fuse"
}

/// [`FuseMounter::process_state`] of the real system. Blocking.
fn process_state(pid: u32, launch: &Launch) -> ProcessState {
    let Ok(raw) = i32::try_from(pid) else {
        return ProcessState::Exited("invalid pid".into());
    };
    match waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => ProcessState::Running,
        Ok(WaitStatus::Exited(_, code)) => ProcessState::Exited(format!("exit status {code}")),
        Ok(WaitStatus::Signaled(_, signal, _)) => {
            ProcessState::Exited(format!("killed by {}", signal.as_str()))
        }
        Ok(_) => ProcessState::Running,
        // Not our child (adopted after an agent restart): look at /proc,
        // and check the command line in case the pid was reused.
        Err(_) => {
            if is_zombie_or_gone(pid) {
                ProcessState::Exited("exited".into())
            } else if read_cmdline(pid).is_some_and(|argv| launch.matches(&argv))
                && runs_as(pid, launch.owner.uid)
            {
                ProcessState::Running
            } else {
                ProcessState::Exited("exited (its pid now belongs to another process)".into())
            }
        }
    }
}

#[async_trait]
impl FuseMounter for SystemMounter {
    async fn spawn(&self, launch: &Launch) -> std::io::Result<u32> {
        let launch = launch.clone();
        let units = self.units.clone();
        blocking(move || match units {
            Some(tools) => spawn_unit(&tools, &launch),
            None => spawn_detached(&launch),
        })
        .await?
    }

    fn describe(&self) -> String {
        match self.units {
            Some(_) => "systemd transient services (instance-agent-mount-<name>.service)".into(),
            None => "agent children".into(),
        }
    }

    async fn process_state(&self, pid: u32, launch: &Launch) -> ProcessState {
        let owned = launch.clone();
        match tokio::time::timeout(PROC_TIMEOUT, blocking(move || process_state(pid, &owned))).await
        {
            Ok(Ok(state)) => state,
            // Unknown is not dead: the next look decides.
            Ok(Err(_)) | Err(_) => ProcessState::Running,
        }
    }

    async fn find_process(&self, launch: &Launch) -> Option<u32> {
        let launch = launch.clone();
        let units = self.units.clone();
        blocking(move || find_process(&launch, units.as_ref()))
            .await
            .ok()
            .flatten()
    }

    async fn is_launched(&self, pid: u32, launch: &Launch) -> bool {
        let launch = launch.clone();
        let units = self.units.clone();
        blocking(move || is_launched(pid, &launch, units.as_ref()))
            .await
            .unwrap_or(false)
    }

    async fn mount_entry(&self, path: &Path) -> std::io::Result<Option<MountEntry>> {
        let path = path.to_owned();
        blocking(move || Ok(mountinfo::find(&mountinfo::read()?, &path).cloned())).await?
    }

    async fn probe(&self, path: &Path, timeout: Duration) -> Probe {
        let mut answer = {
            let mut probing = lock(&self.probing);
            match probing.get(path) {
                Some(in_flight) => in_flight.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    probing.insert(path.to_owned(), rx.clone());
                    let probing = self.probing.clone();
                    let owned = path.to_owned();
                    // The sample's statfs always reaches the FUSE daemon
                    // (stat alone may be answered from the kernel's
                    // attribute cache while the daemon is dead). The probe
                    // stays in flight until its helper is gone: a helper
                    // stuck in the kernel is never joined by another.
                    let mut run = self.isolated.sample(vec![(owned.clone(), false)], timeout);
                    let overdue = overdue(timeout);
                    tokio::spawn(async move {
                        let _ = tx.send(Some(match run.answers.recv().await {
                            Some((_, Ok(_))) => Probe::Healthy,
                            Some((_, Err(error))) => Probe::Stale(error.to_string()),
                            // The helper was killed at the deadline without
                            // answering: the same words as the wait below,
                            // whichever of the two ends first.
                            None => Probe::Stale(overdue),
                        }));
                        while run.answers.recv().await.is_some() {}
                        lock(&probing).remove(&owned);
                    });
                    rx
                }
            }
        };
        match tokio::time::timeout(timeout, answer.wait_for(Option::is_some)).await {
            // `wait_for` returned: the answer is there.
            Ok(Ok(probe)) => probe.clone().unwrap_or(Probe::Healthy),
            Ok(Err(_)) => Probe::Stale("the health check ended without an answer".into()),
            Err(_) => Probe::Stale(overdue(timeout)),
        }
    }

    async fn unmount(&self, path: &Path, lazy: bool) -> Result<(), UnmountFailure> {
        let owned = path.to_owned();
        if let Some(tools) = self.units.clone() {
            let argv: Vec<OsString> = ["fusermount3", "-u"]
                .into_iter()
                .chain(lazy.then_some("-z"))
                .chain(["--"])
                .map(OsString::from)
                .chain([owned.into_os_string()])
                .collect();
            let run = blocking(move || tools.run_waiting("instance-agent unmount", &argv));
            return match tokio::time::timeout(FUSERMOUNT_TIMEOUT, run).await {
                Ok(Ok(Ok((true, _)))) => Ok(()),
                Ok(Ok(Ok((false, message)))) if message.contains("busy") => {
                    Err(UnmountFailure::Busy(message))
                }
                Ok(Ok(Ok((false, message)))) => Err(UnmountFailure::Other(message)),
                Ok(Ok(Err(e))) => Err(UnmountFailure::Other(format!(
                    "systemd-run fusermount3: {e}"
                ))),
                Ok(Err(e)) => Err(UnmountFailure::Other(e.to_string())),
                Err(_) => Err(UnmountFailure::Other(format!(
                    "fusermount3 did not finish within {} s",
                    FUSERMOUNT_TIMEOUT.as_secs()
                ))),
            };
        }
        let run = blocking(move || {
            let mut command = std::process::Command::new("fusermount3");
            command.arg("-u");
            if lazy {
                command.arg("-z");
            }
            command.arg("--").arg(&owned);
            command.stdin(std::process::Stdio::null()).output()
        });
        let output = match tokio::time::timeout(FUSERMOUNT_TIMEOUT, run).await {
            Ok(Ok(Ok(output))) => output,
            Ok(Ok(Err(e))) if e.kind() == std::io::ErrorKind::NotFound => {
                // No fusermount3: the agent is root and can detach directly.
                let flags = if lazy {
                    nix::mount::MntFlags::MNT_DETACH
                } else {
                    nix::mount::MntFlags::empty()
                };
                return nix::mount::umount2(path, flags).map_err(|errno| match errno {
                    nix::errno::Errno::EBUSY => UnmountFailure::Busy(errno.desc().into()),
                    other => UnmountFailure::Other(other.desc().into()),
                });
            }
            Ok(Ok(Err(e))) => return Err(UnmountFailure::Other(format!("fusermount3: {e}"))),
            Ok(Err(e)) => return Err(UnmountFailure::Other(e.to_string())),
            Err(_) => {
                return Err(UnmountFailure::Other(format!(
                    "fusermount3 did not finish within {} s",
                    FUSERMOUNT_TIMEOUT.as_secs()
                )));
            }
        };
        if output.status.success() {
            return Ok(());
        }
        let message = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if message.contains("busy") {
            Err(UnmountFailure::Busy(message))
        } else {
            Err(UnmountFailure::Other(message))
        }
    }

    async fn stop(&self, pid: u32, launch: &Launch, grace: Duration) {
        let Ok(raw) = i32::try_from(pid) else { return };
        for (signal, wait) in [
            (Signal::SIGTERM, grace),
            (Signal::SIGKILL, Duration::from_secs(5)),
        ] {
            if self.process_state(pid, launch).await != ProcessState::Running {
                return;
            }
            let _ = kill(Pid::from_raw(raw), signal);
            let deadline = tokio::time::Instant::now() + wait;
            while tokio::time::Instant::now() < deadline {
                if self.process_state(pid, launch).await != ProcessState::Running {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tracing::warn!(pid, "blobfuse2 did not stop after SIGKILL");
    }
}

/// Runs a blocking closure on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only inserts and removes happen under this lock; a poisoned map is consistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// blobfuse2's output file: 0600, since its own messages may quote a
/// request URL with its SAS. Blocking.
fn open_output(launch: &Launch) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&launch.output_file)
}

/// Starts blobfuse2 as the mount's transient service; returns its pid.
/// Blocking.
fn spawn_unit(tools: &crate::transient::Tools, launch: &Launch) -> std::io::Result<u32> {
    let output = open_output(launch)?;
    if !launch.owner.is_root() {
        // Whichever side of the user change PID 1 opens it on.
        rustix::fs::fchown(
            &output,
            Some(rustix::fs::Uid::from_raw(launch.owner.uid)),
            Some(rustix::fs::Gid::from_raw(launch.owner.gid)),
        )?;
    }
    drop(output);
    let unit = mount_unit(&launch.name);
    // A failed unit of an earlier attempt would hold the name.
    tools.act("reset-failed", &[], &unit);
    let mut argv = vec![launch.program.clone().into_os_string()];
    argv.extend(launch.args());
    let output = launch.output_file.display();
    let spec = crate::transient::ServiceSpec {
        unit: unit.clone(),
        description: format!("instance-agent mount {} (blobfuse2)", launch.name),
        properties: vec![
            "Type=exec".into(),
            "KillMode=control-group".into(),
            "StandardInput=null".into(),
            format!("StandardOutput=append:{output}"),
            format!("StandardError=append:{output}"),
            // As before, when it was the agent's child: a dead mount daemon
            // breaks every job using it, so it goes after jobs under OOM.
            "OOMScoreAdjust=-500".into(),
        ]
        .into_iter()
        .chain(
            (!launch.owner.is_root())
                .then(|| {
                    [
                        format!("User={}", launch.owner.uid),
                        format!("Group={}", launch.owner.gid),
                    ]
                })
                .into_iter()
                .flatten(),
        )
        .collect(),
        argv,
        collect: true,
    };
    tools
        .start(&spec)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let state = tools.state(&unit)?;
    if state.main_pid == 0 {
        return Err(std::io::Error::other(format!(
            "{unit} started but has no main process ({}, {})",
            state.active, state.result
        )));
    }
    Ok(state.main_pid)
}

fn spawn_detached(launch: &Launch) -> std::io::Result<u32> {
    use std::process::{Command, Stdio};
    let output = open_output(launch)?;
    let mut command = Command::new(&launch.program);
    command
        .args(launch.args())
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output)
        // The agent's own systemd protocol variables are not blobfuse2's.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    if !launch.owner.is_root() {
        use std::os::unix::process::CommandExt;
        // std drops the supplementary groups too (setgroups before setuid).
        command.uid(launch.owner.uid).gid(launch.owner.gid);
    }
    new_session(&mut command);
    let child = command.spawn()?;
    Ok(child.id())
}

/// Makes the child a session leader, so that signals to the agent's process
/// group or a closed terminal never reach blobfuse2.
#[allow(unsafe_code)]
fn new_session(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and calls only
    // setsid(2), which is async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

fn read_cmdline(pid: u32) -> Option<Vec<OsString>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|b| *b == 0)
            .filter(|part| !part.is_empty())
            .map(|part| std::ffi::OsStr::from_bytes(part).to_owned())
            .collect(),
    )
}

fn is_zombie_or_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself
        // contain spaces or parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

fn find_process(launch: &Launch, units: Option<&crate::transient::Tools>) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .find(|pid| is_launched(*pid, launch, units))
}

/// [`FuseMounter::is_launched`] of the real system. Blocking.
fn is_launched(pid: u32, launch: &Launch, units: Option<&crate::transient::Tools>) -> bool {
    if is_zombie_or_gone(pid)
        || !read_cmdline(pid).is_some_and(|argv| launch.matches(&argv))
        || !runs_as(pid, launch.owner.uid)
    {
        return false;
    }
    match units {
        Some(tools) => tools
            .state(&mount_unit(&launch.name))
            .is_ok_and(|state| state.main_pid == pid),
        None => runs_program(pid, &launch.program),
    }
}

/// Whether the real and effective uid of `pid` are `uid` (from
/// `/proc/PID/status`, which anyone may read).
fn runs_as(pid: u32, uid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .is_some_and(|ids| {
            let ids: Vec<&str> = ids.split_whitespace().take(2).collect();
            ids.len() == 2 && ids.iter().all(|id| id.parse() == Ok(uid))
        })
}

/// Whether `pid` runs `program` (`/proc/PID/exe`; a program looked up in
/// `PATH` when not a path, as it was started).
fn runs_program(pid: u32, program: &Path) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    // An upgraded program shows as "<path> (deleted)"; the path still counts.
    let exe = exe
        .to_str()
        .and_then(|e| e.strip_suffix(" (deleted)"))
        .map(PathBuf::from)
        .unwrap_or(exe);
    resolve_program(program).is_some_and(|wanted| wanted == exe)
}

/// The real path of a program as `execvp` finds it.
fn resolve_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 || program.is_absolute() {
        return std::fs::canonicalize(program).ok();
    }
    crate::paths::find_in_path(program.to_str()?)
        .and_then(|found| std::fs::canonicalize(found).ok())
}

/// Why a health check that got no answer within `timeout` says the mount is
/// stale.
fn overdue(timeout: Duration) -> String {
    format!(
        "the mount root did not answer within {} s",
        timeout.as_secs_f32()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(path: &str) -> Launch {
        Launch {
            name: "data".into(),
            program: "blobfuse2".into(),
            mount_path: path.into(),
            config_file: "/run/instance-agent/mounts/data.yaml".into(),
            output_file: "/tmp/x".into(),
            owner: Owner::ROOT,
        }
    }

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn launch_argv_is_blobfuse2s_foreground_mount() {
        assert_eq!(
            launch("/mnt/data").args(),
            argv(&[
                "mount",
                "/mnt/data",
                "--config-file=/run/instance-agent/mounts/data.yaml",
                "--foreground",
                "--disable-version-check=true",
            ])
        );
    }

    #[test]
    fn command_line_matches_exact_path_only() {
        let l = launch("/mnt/a");
        let cfg = "--config-file=/run/instance-agent/mounts/data.yaml";
        assert!(l.matches(&argv(&[
            "blobfuse2",
            "mount",
            "/mnt/a",
            cfg,
            "--foreground"
        ])));
        assert!(!l.matches(&argv(&["blobfuse2", "mount", "/mnt/ab", cfg])));
        assert!(!l.matches(&argv(&[
            "blobfuse2",
            "mount",
            "/mnt/a",
            "--config-file=/other"
        ])));
        assert!(!l.matches(&argv(&["vi", "/mnt/a", cfg])));
    }

    #[tokio::test]
    async fn detached_process_is_found_stopped_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        // A stand-in with blobfuse2's command line: `sh -c 'sleep' mount PATH ...`
        // puts "mount" and the path in argv[1] and argv[2].
        let script = dir.path().join("fake-blobfuse2");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut l = launch(&dir.path().join("m").display().to_string());
        l.program = script;
        l.output_file = dir.path().join("out");
        let m = SystemMounter::new(Arc::new(crate::disk::probe::SystemProbe));
        let pid = m.spawn(&l).await.unwrap();
        // `exec sleep` replaces the command line; the process is still ours.
        assert_eq!(m.process_state(pid, &l).await, ProcessState::Running);
        let sid = nix::unistd::getsid(Some(Pid::from_raw(pid as i32))).unwrap();
        assert_eq!(sid.as_raw(), pid as i32, "blobfuse2 leads its own session");
        m.stop(pid, &l, Duration::from_secs(2)).await;
        assert!(matches!(
            m.process_state(pid, &l).await,
            ProcessState::Exited(_)
        ));
    }

    #[tokio::test]
    async fn probe_of_a_plain_directory_is_healthy_and_of_nothing_is_stale() {
        let m = SystemMounter::new(Arc::new(crate::disk::probe::SystemProbe));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            m.probe(dir.path(), Duration::from_secs(5)).await,
            Probe::Healthy
        );
        assert!(matches!(
            m.probe(&dir.path().join("missing"), Duration::from_secs(5))
                .await,
            Probe::Stale(_)
        ));
    }
}

//! [`SupervisedRunner`], the real [`ProcessRunner`]: each script under a
//! supervisor process, contained on this host as well as it can be.
//!
//! # Containment
//! Each script runs under a **supervisor**: the agent's own binary started
//! with [`SUPERVISOR_ARG`] (see [`super::supervisor`]). The supervisor is a
//! child subreaper (`PR_SET_CHILD_SUBREAPER`), so every process the script
//! starts stays in the supervisor's process tree even when its parent exits
//! (`nohup cmd &`, `setsid cmd`, double forks): orphans are re-parented to
//! the supervisor, not to PID 1. The script itself gets a new session and
//! process group. To stop a run, the supervisor signals its whole tree
//! (SIGTERM, then SIGKILL after the grace period, until nothing is left) and
//! reaps everything.
//!
//! Why a separate process rather than making the agent the subreaper: a
//! subreaper must reap the orphans it adopts, and the only way to reap a pid
//! one did not fork is `waitpid(-1)` (or a scan for zombie children), which
//! would steal the exit statuses of the agent's other children (tokio's
//! `Child::wait` reaps by pid: Docker helpers, `nvidia-smi`, `blobfuse2`).
//! The supervisor has no other children, so it may call `waitpid(-1)` freely.
//!
//! Two more nets catch what could escape the tree:
//! - a cgroup v2 directory per run (`<unified mount>/instance-agent-setup/<run
//!   id>`, joined by the script before exec; killed with `cgroup.kill`) when
//!   a v2 hierarchy is mounted and the host is not run by systemd;
//! - the environment marker `INSTANCE_AGENT_SETUP_RUN=<run id>`, found by
//!   scanning `/proc/*/environ`, used when the supervisor itself is gone
//!   (killed, or from an earlier agent life).
//!
//! Under systemd (`/run/systemd/system` exists) the supervisor is started
//! with `systemd-run --scope --unit=instance-agent-setup-<run id>`, so the
//! script's tree lives in its own transient scope, outside the agent's unit
//! (a restart of the agent does not take it down, and systemd accounts and
//! can kill it separately). `systemd-run --scope` execs the supervisor in
//! place, so the pid the agent holds is the supervisor's; the scope's cgroup
//! is read from `/proc/<supervisor>/cgroup` (only when it is named after the
//! run's unit) and used to kill the run; an orphaned scope of an earlier
//! agent life is killed with `systemctl kill`. When `systemd-run` fails (no
//! D-Bus, the scope refused, nothing reported within 30 s), the run falls
//! back to the plain containment (session, tree, cgroup v2 directory,
//! marker) and the run's log says why. The tests drive this path with a
//! fake `systemd-run` ([`SupervisedRunner::with_systemd_run`]); the test host
//! has no systemd.
//!
//! The supervisor also watches its stdin, a pipe whose only writer is the
//! agent: when the agent dies, the pipe closes and the supervisor stops the
//! script's tree, so a crashed agent never leaves a creation script running
//! while the next agent re-runs it.
//!
//! The protocol between the agent and the supervisor is in [`super::runner`].

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::RUN_MARKER_ENV;
use super::process_tree::{self, RunCgroup};
use super::runner::{
    Launch, OutputStream, ProcessRunner, Report, RunnerError, SUPERVISOR_ARG, ScriptProcess,
    SupervisorSpec,
};

/// The cgroup directory, under the v2 mount, that holds one cgroup per run.
pub const CGROUP_PARENT: &str = "instance-agent-setup";

/// How scripts are contained on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Containment {
    /// Under systemd: a transient scope per run.
    SystemdScope,
    /// A cgroup v2 directory per run under this parent.
    Cgroup(PathBuf),
    /// Only the supervisor's tree and the environment marker.
    TreeOnly,
}

/// Runs each script under a supervisor process (see the module docs).
#[derive(Debug, Clone)]
pub struct SupervisedRunner {
    /// What the agent execs: `/proc/self/exe` in production, so that the
    /// running binary is used even after an upgrade replaced the file.
    exe: PathBuf,
    /// The binary's path by name, for `systemd-run`, which would otherwise
    /// resolve `/proc/self/exe` to itself.
    exe_path: PathBuf,
    containment: Containment,
    /// `systemd-run` (by name, found on `PATH`), or a fake in tests.
    systemd_run: PathBuf,
    /// See [`SupervisedRunner::with_first_report_within`].
    first_report_within: Duration,
    /// Where the fallback puts per-run cgroups when `systemd-run` fails.
    fallback_cgroup: Option<PathBuf>,
}

/// How one supervisor is started.
enum Mode {
    /// Through `systemd-run --scope`.
    Scope,
    /// Directly, with this cgroup for the script (if any).
    Plain(Option<RunCgroup>),
}

/// The containment without systemd: a cgroup v2 directory per run when the
/// unified hierarchy is mounted, else the tree and the marker alone.
pub fn plain_containment() -> Containment {
    match process_tree::cgroup_v2_mount() {
        Some(mount) => Containment::Cgroup(mount.join(CGROUP_PARENT)),
        None => Containment::TreeOnly,
    }
}

/// The transient unit of a run under systemd.
pub fn scope_unit(run_id: &str) -> String {
    format!("instance-agent-setup-{run_id}.scope")
}

impl SupervisedRunner {
    /// Detects the containment available here; `exe` is the agent's binary.
    pub fn detect(exe: PathBuf) -> Self {
        let containment = if crate::systemd::booted() {
            Containment::SystemdScope
        } else {
            plain_containment()
        };
        tracing::info!(?containment, "setup scripts containment");
        Self::new(exe, containment)
    }

    /// A runner with explicit containment.
    pub fn new(exe: PathBuf, containment: Containment) -> Self {
        let exe_path = std::fs::read_link(&exe)
            .map(|target| {
                let text = target.to_string_lossy();
                PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text))
            })
            .unwrap_or_else(|_| exe.clone());
        let fallback_cgroup = match &containment {
            Containment::SystemdScope => {
                process_tree::cgroup_v2_mount().map(|mount| mount.join(CGROUP_PARENT))
            }
            Containment::Cgroup(_) | Containment::TreeOnly => None,
        };
        Self {
            exe,
            exe_path,
            containment,
            systemd_run: PathBuf::from("systemd-run"),
            first_report_within: Duration::from_secs(30),
            fallback_cgroup,
        }
    }

    /// Uses `program` in place of `systemd-run` (tests put a fake there).
    pub fn with_systemd_run(mut self, program: PathBuf) -> Self {
        self.systemd_run = program;
        self
    }

    /// How long `systemd-run` may take to start the supervisor (measured to
    /// its first report) before the run falls back to plain containment.
    pub fn with_first_report_within(mut self, limit: Duration) -> Self {
        self.first_report_within = limit;
        self
    }

    /// Starts a supervisor and hands it the spec. The fork and exec run off
    /// the async runtime.
    async fn spawn(&self, launch: Launch, mode: Mode) -> Result<SupervisedProcess, RunnerError> {
        let program = match mode {
            Mode::Scope => self.systemd_run.clone(),
            Mode::Plain(_) => self.exe.clone(),
        };
        let spawn_err = |source| RunnerError::Spawn {
            program: program.clone(),
            source,
        };
        let run_id = launch.run_id.clone();
        let cgroup = match &mode {
            Mode::Plain(cgroup) => cgroup.clone(),
            Mode::Scope => None,
        };
        let spec = SupervisorSpec {
            launch,
            cgroup: cgroup.as_ref().map(|c| c.dir().to_owned()),
        };
        let mut line = serde_json::to_vec(&spec).map_err(|e| spawn_err(e.into()))?;
        line.push(b'\n');

        let (report_read, report_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| spawn_err(e.into()))?;
        let mut command = self.command(&run_id, matches!(mode, Mode::Scope));
        let child = tokio::task::spawn_blocking(move || {
            give_fd_3(&mut command, report_write.as_raw_fd());
            let child = command.spawn();
            // The parent's copy goes now, so that the pipe reads EOF once
            // the supervisor (and whatever exec'd it) has gone.
            drop(report_write);
            child
        })
        .await
        .map_err(|e| spawn_err(std::io::Error::other(e)))?;
        let mut child = child.map_err(spawn_err)?;

        let pid = child.id().unwrap_or(0);
        let mut lifeline = child.stdin.take();
        if let Some(stdin) = lifeline.as_mut() {
            // A supervisor that died at once shows up as a missing report.
            let _ = stdin.write_all(&line).await;
        }
        let output = match (child.stdout.take(), child.stderr.take()) {
            (Some(out), Some(err)) => {
                Some((Box::new(out) as OutputStream, Box::new(err) as OutputStream))
            }
            _ => None,
        };
        let exited = Arc::new(AtomicBool::new(false));
        let (tx, reports) = mpsc::channel(16);
        tokio::spawn(read_reports(report_read, child, tx, exited.clone()));
        Ok(SupervisedProcess {
            run_id,
            pid,
            lifeline,
            output,
            reports,
            pending: VecDeque::new(),
            exited,
            cgroup,
            scoped: matches!(mode, Mode::Scope),
        })
    }

    /// The plain-containment cgroup of a run (under systemd: the one its
    /// fallback would have used).
    fn cgroup_of(&self, run_id: &str) -> Option<RunCgroup> {
        match &self.containment {
            Containment::Cgroup(parent) => Some(RunCgroup::at(parent.join(run_id))),
            Containment::SystemdScope => self
                .fallback_cgroup
                .as_ref()
                .map(|parent| RunCgroup::at(parent.join(run_id))),
            Containment::TreeOnly => None,
        }
    }

    fn command(&self, run_id: &str, scoped: bool) -> tokio::process::Command {
        let mut command = match scoped {
            true => {
                let mut c = tokio::process::Command::new(&self.systemd_run);
                c.args([
                    "--scope",
                    "--quiet",
                    "--collect",
                    &format!("--unit={}", scope_unit(run_id)),
                    "--description=instance-agent setup script",
                    "--property=KillMode=control-group",
                    "--",
                ])
                .arg(&self.exe_path);
                c
            }
            false => tokio::process::Command::new(&self.exe),
        };
        command
            .arg(SUPERVISOR_ARG)
            // The supervisor needs nothing from the agent's environment; the
            // script's environment travels in the spec.
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        command
    }
}

#[async_trait::async_trait]
impl ProcessRunner for SupervisedRunner {
    async fn start(&self, launch: Launch) -> Result<Box<dyn ScriptProcess>, RunnerError> {
        if self.containment != Containment::SystemdScope {
            let cgroup = self.cgroup_of(&launch.run_id);
            return Ok(Box::new(self.spawn(launch, Mode::Plain(cgroup)).await?));
        }
        let why = match self.spawn(launch.clone(), Mode::Scope).await {
            Ok(mut process) => match process.await_first_report(self.first_report_within).await {
                Ok(()) => return Ok(Box::new(process)),
                Err(why) => why,
            },
            Err(error) => error.to_string(),
        };
        // Without D-Bus, or with the scope refused, the script still runs,
        // contained the way it is on a host without systemd.
        let cgroup = self
            .fallback_cgroup
            .as_ref()
            .map(|parent| RunCgroup::at(parent.join(&launch.run_id)));
        tracing::warn!(run = %launch.run_id, reason = %why, "systemd-run failed: running the setup script without a transient scope");
        let message = format!(
            "systemd-run did not start the script in a transient scope ({why}); running it in its own session{} instead",
            if cgroup.is_some() { " and cgroup" } else { "" }
        );
        let mut process = self.spawn(launch, Mode::Plain(cgroup)).await?;
        process.pending.push_front(Report::Warning { message });
        Ok(Box::new(process))
    }

    async fn kill_orphans(&self, run_ids: Vec<String>) -> usize {
        if run_ids.is_empty() {
            return 0;
        }
        if self.containment == Containment::SystemdScope {
            kill_scopes(&run_ids).await;
        }
        let cgroups = run_ids.iter().filter_map(|id| self.cgroup_of(id)).collect();
        kill_runs(cgroups, run_ids, true).await
    }

    fn describe(&self) -> String {
        match &self.containment {
            Containment::SystemdScope => "agent children in transient scopes".into(),
            Containment::Cgroup(_) => "agent children, a cgroup v2 directory per run".into(),
            Containment::TreeOnly => "agent children, contained by their process tree".into(),
        }
    }

    async fn tidy(&self, run_ids: Vec<String>) {
        let cgroups: Vec<RunCgroup> = run_ids.iter().filter_map(|id| self.cgroup_of(id)).collect();
        if cgroups.is_empty() {
            return;
        }
        // rmdir fails (EBUSY) while processes remain; then a later start
        // tries again.
        let _ = tokio::task::spawn_blocking(move || {
            for cgroup in cgroups {
                let _ = cgroup.remove();
            }
        })
        .await;
    }
}

/// SIGKILLs whatever is left in the transient scopes of `run_ids` through
/// the service manager (`systemctl kill`), best effort and within 30 s: the
/// scope of an earlier agent life is found by its unit name.
async fn kill_scopes(run_ids: &[String]) {
    let mut command = tokio::process::Command::new("systemctl");
    command
        .args(["kill", "--signal=SIGKILL"])
        .args(run_ids.iter().map(|id| scope_unit(id)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let task = tokio::task::spawn_blocking(move || command.spawn());
    let Ok(Ok(mut child)) = task.await else {
        tracing::warn!("cannot run systemctl kill on the scopes of interrupted setup runs");
        return;
    };
    // Units already gone make systemctl fail; that is the usual case.
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
}

/// SIGKILLs every member of `cgroups` and every process marked with one of
/// `run_ids`, then removes the cgroups; off the runtime, within 30 s.
/// Returns how many processes it hit.
async fn kill_runs(cgroups: Vec<RunCgroup>, run_ids: Vec<String>, remove: bool) -> usize {
    let task = tokio::task::spawn_blocking(move || {
        let mut hit: usize = cgroups.iter().map(RunCgroup::kill_all).sum();
        for pid in process_tree::processes_with_marker(RUN_MARKER_ENV, &run_ids) {
            if process_tree::send(pid, Signal::SIGKILL) {
                hit += 1;
            }
        }
        if remove && !cgroups.is_empty() {
            // SIGKILLed members leave their cgroup within moments; nobody
            // else would remove it.
            std::thread::sleep(Duration::from_millis(100));
            for cgroup in &cgroups {
                let _ = cgroup.remove();
            }
        }
        hit
    });
    match tokio::time::timeout(Duration::from_secs(30), task).await {
        Ok(Ok(hit)) => hit,
        Ok(Err(error)) => {
            tracing::warn!(%error, "setup process sweep failed");
            0
        }
        Err(_) => {
            tracing::warn!("setup process sweep did not finish within 30 s");
            0
        }
    }
}

/// Makes the report pipe's write end the child's fd 3.
#[allow(unsafe_code)]
fn give_fd_3(command: &mut tokio::process::Command, fd: i32) {
    // SAFETY: the closure runs in the forked child before exec and only calls
    // dup2 and fcntl, which are async-signal-safe; it allocates nothing and
    // touches no lock. `fd` is open in the parent (and therefore in the
    // child) until after spawn returns.
    unsafe {
        command.pre_exec(move || {
            use nix::libc;
            if fd == 3 {
                // dup2 onto itself would keep FD_CLOEXEC; clear it instead.
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Forwards the supervisor's reports, then reaps it.
async fn read_reports(
    read: OwnedFd,
    mut child: tokio::process::Child,
    tx: mpsc::Sender<Report>,
    exited: Arc<AtomicBool>,
) {
    if let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(read) {
        let mut lines = tokio::io::BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Report>(&line) {
                Ok(report) => {
                    if tx.send(report).await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, line, "unreadable report from a setup supervisor")
                }
            }
        }
    }
    let status = child.wait().await;
    exited.store(true, Ordering::SeqCst);
    if let Ok(status) = status
        && !status.success()
    {
        tracing::warn!(%status, "setup supervisor exited abnormally");
    }
}

struct SupervisedProcess {
    run_id: String,
    pid: u32,
    /// Held open, never written after the spec: its closing tells the
    /// supervisor that the agent is gone.
    lifeline: Option<tokio::process::ChildStdin>,
    output: Option<(OutputStream, OutputStream)>,
    reports: mpsc::Receiver<Report>,
    /// Reports already taken from `reports` (the first one, waited for at
    /// start under systemd) or made up by the runner (the fallback warning).
    pending: VecDeque<Report>,
    exited: Arc<AtomicBool>,
    /// The run's cgroup: its own directory, or under systemd its scope's.
    cgroup: Option<RunCgroup>,
    /// Started through `systemd-run --scope`.
    scoped: bool,
}

impl SupervisedProcess {
    /// Waits for the supervisor's first report, which proves that
    /// `systemd-run` started it; then finds the scope's cgroup. On failure
    /// (nothing reported, or nothing within `limit`) kills what was started
    /// and says why.
    async fn await_first_report(&mut self, limit: Duration) -> Result<(), String> {
        match tokio::time::timeout(limit, self.reports.recv()).await {
            Ok(Some(report)) => {
                self.pending.push_back(report);
                let pid = self.pid;
                let unit = scope_unit(&self.run_id);
                self.cgroup =
                    tokio::task::spawn_blocking(move || process_tree::cgroup_v2_of(pid, &unit))
                        .await
                        .ok()
                        .flatten();
                Ok(())
            }
            Ok(None) => {
                let said = self.stderr_text().await;
                let mut why = "systemd-run exited before the supervisor reported".to_owned();
                if !said.is_empty() {
                    why.push_str(&format!(": {said}"));
                }
                Err(why)
            }
            Err(_) => {
                self.kill().await;
                Err(format!(
                    "no report from the supervisor within {} s",
                    limit.as_secs()
                ))
            }
        }
    }

    /// What a failed `systemd-run` printed on stderr (at most 1 KiB; the
    /// pipe has no other writer once it is gone).
    async fn stderr_text(&mut self) -> String {
        use tokio::io::AsyncReadExt;
        let Some((_, stderr)) = self.output.take() else {
            return String::new();
        };
        let mut text = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            stderr.take(1024).read_to_end(&mut text),
        )
        .await;
        String::from_utf8_lossy(&text).trim().replace('\n', " | ")
    }

    fn signal_supervisor(&self, signal: Signal) {
        // Once reaped, the pid may belong to someone else.
        if self.pid != 0 && !self.exited.load(Ordering::SeqCst) {
            process_tree::send(self.pid as i32, signal);
        }
    }
}

#[async_trait::async_trait]
impl ScriptProcess for SupervisedProcess {
    fn take_output(&mut self) -> Option<(OutputStream, OutputStream)> {
        self.output.take()
    }

    async fn next_report(&mut self) -> Option<Report> {
        match self.pending.pop_front() {
            Some(report) => Some(report),
            None => self.reports.recv().await,
        }
    }

    fn terminate(&mut self) {
        self.signal_supervisor(Signal::SIGTERM);
    }

    async fn kill(&mut self) -> usize {
        self.signal_supervisor(Signal::SIGKILL);
        self.lifeline.take();
        if self.scoped && self.cgroup.is_none() {
            // The scope's cgroup was not found: ask the service manager.
            kill_scopes(std::slice::from_ref(&self.run_id)).await;
        }
        // A scope's cgroup is systemd's to remove (`--collect`).
        kill_runs(
            self.cgroup.clone().into_iter().collect(),
            vec![self.run_id.clone()],
            !self.scoped,
        )
        .await
    }
}

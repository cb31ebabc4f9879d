//! [`UnitRunner`], the [`ProcessRunner`] under systemd: each script is a
//! transient **service** of its own, `instance-agent-setup-<run>.service`,
//! forked by PID 1 (see [`crate::transient`]), not a child of the agent.
//!
//! So a script starts with a clean execution environment (none of the
//! agent's sandbox, capability limits or seccomp filter), lives in its own
//! cgroup (a stop or the timeout kills its whole tree, `KillMode=control-group`),
//! is logged by the journal under its unit, and survives an agent restart or
//! upgrade: the next agent adopts it by its unit name.
//!
//! The unit's properties carry the limits: `RuntimeMaxSec=` (the timeout,
//! enforced by systemd even while the agent is down), `TimeoutStopSec=` (the
//! grace between SIGTERM and SIGKILL), `User=`/`Group=`/`SupplementaryGroups=`
//! (`run_as`), `WorkingDirectory=`, and the environment from a 0600 file in
//! the runtime dir (`EnvironmentFile=`, never on a command line).
//! `Type=exec` makes `systemd-run` fail when the command cannot be executed;
//! `RemainAfterExit=yes` keeps the unit, and with it the exit status, until
//! the agent has read it (then it stops the unit, which also stops what the
//! script left running, and resets it).
//!
//! Output goes to two files that systemd opens (`StandardOutput=append:`),
//! one per stream, which the agent follows into the run's log (head and tail
//! capping as for every run). An agent that adopts a run reads them again
//! from their start, so its log is complete whatever the restart cut. The
//! unit's start, end and status are in the journal
//! (`journalctl -u instance-agent-setup-<run>`).
//!
//! When `systemd-run` itself cannot start the unit (no D-Bus), the run falls
//! back to the [`SupervisedRunner`] and its log says why.

use std::ffi::OsString;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

use super::runner::{Launch, OutputStream, ProcessRunner, Report, RunnerError, ScriptProcess};
use super::supervised_runner::SupervisedRunner;
use crate::transient::{MainExit, ServiceSpec, ServiceState, StartError, Tools};

/// How often a running unit's state is read.
const POLL: Duration = Duration::from_millis(250);
/// How often a followed output file is read again at its end.
const FOLLOW: Duration = Duration::from_millis(100);

/// The unit of a run.
pub fn unit_name(run_id: &str) -> String {
    format!(
        "instance-agent-setup-{}.service",
        crate::transient::escape(run_id)
    )
}

/// Runs each script as a transient service (see the module docs).
#[derive(Debug, Clone)]
pub struct UnitRunner {
    tools: Tools,
    /// 0700, in the runtime dir: the environment files.
    env_dir: PathBuf,
    /// 0700, in the logs dir: the raw output files.
    output_dir: PathBuf,
    fallback: SupervisedRunner,
}

impl UnitRunner {
    /// A runner keeping environment files under `runtime_dir` and raw output
    /// under `logs_dir`; `fallback` runs scripts when systemd-run cannot.
    pub fn new(runtime_dir: &Path, logs_dir: &Path, fallback: SupervisedRunner) -> Self {
        Self {
            tools: Tools::default(),
            env_dir: runtime_dir.join("setup-units"),
            output_dir: logs_dir.join("setup-units"),
            fallback,
        }
    }

    /// The runner for this host, chosen once at start: transient services
    /// under systemd (`/run/systemd/system` exists), else the
    /// [`SupervisedRunner`] (fork and contain). `exe` is the agent's binary.
    pub fn for_host(exe: PathBuf, runtime_dir: &Path, logs_dir: &Path) -> Arc<dyn ProcessRunner> {
        let plain = super::supervised_runner::plain_containment();
        if crate::systemd::booted() {
            tracing::info!("setup scripts run as transient services");
            Arc::new(Self::new(
                runtime_dir,
                logs_dir,
                SupervisedRunner::new(exe, plain),
            ))
        } else {
            tracing::info!(containment = ?plain, "setup scripts run as the agent's children");
            Arc::new(SupervisedRunner::new(exe, plain))
        }
    }

    /// Uses other `systemd-run` and `systemctl` programs (tests).
    pub fn with_tools(mut self, tools: Tools) -> Self {
        self.tools = tools;
        self
    }

    fn files(&self, run_id: &str) -> RunFiles {
        RunFiles {
            env: self.env_dir.join(format!("{run_id}.env")),
            stdout: self.output_dir.join(format!("{run_id}.stdout")),
            stderr: self.output_dir.join(format!("{run_id}.stderr")),
        }
    }

    /// The unit's spec for `launch`.
    fn spec(&self, launch: &Launch, files: &RunFiles) -> ServiceSpec {
        let mut properties = vec![
            "Type=exec".to_owned(),
            "RemainAfterExit=yes".to_owned(),
            "KillMode=control-group".to_owned(),
            format!("RuntimeMaxSec={}", launch.timeout.as_secs().max(1)),
            format!("TimeoutStopSec={}", launch.kill_grace.as_secs().max(1)),
            format!("WorkingDirectory={}", launch.working_dir.display()),
            format!("EnvironmentFile={}", files.env.display()),
            "StandardInput=null".to_owned(),
            format!("StandardOutput=append:{}", files.stdout.display()),
            format!("StandardError=append:{}", files.stderr.display()),
        ];
        if let Some(user) = &launch.user {
            properties.push(format!("User={}", user.uid));
            properties.push(format!("Group={}", user.gid));
            let groups: Vec<String> = user
                .groups
                .iter()
                .filter(|g| **g != user.gid)
                .map(u32::to_string)
                .collect();
            if !groups.is_empty() {
                properties.push(format!("SupplementaryGroups={}", groups.join(" ")));
            }
        }
        let mut argv: Vec<OsString> = vec![launch.program.clone().into_os_string()];
        argv.extend(launch.args.iter().map(OsString::from));
        ServiceSpec {
            unit: unit_name(&launch.run_id),
            description: format!("instance-agent setup script (run {})", launch.run_id),
            properties,
            argv,
            collect: false,
        }
    }

    fn process(&self, run_id: &str, kill_leftovers: bool) -> UnitProcess {
        UnitProcess::follow(
            self.tools.clone(),
            run_id,
            self.files(run_id),
            kill_leftovers,
        )
    }
}

/// The files of one run.
#[derive(Debug, Clone)]
struct RunFiles {
    env: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl RunFiles {
    /// Writes the environment file and creates empty output files. Blocking.
    fn prepare(&self, env: &[(String, String)]) -> std::io::Result<()> {
        for file in [&self.env, &self.stdout] {
            if let Some(dir) = file.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
        }
        let mut file = new_private(&self.env)?;
        file.write_all(&environment_file(env))?;
        new_private(&self.stdout)?;
        new_private(&self.stderr)?;
        Ok(())
    }

    /// Removes them (absent is fine). Blocking.
    fn remove(&self) {
        for file in [&self.env, &self.stdout, &self.stderr] {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// A new file, 0600, replacing any older one of that name. Blocking.
fn new_private(path: &Path) -> std::io::Result<std::fs::File> {
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// `EnvironmentFile=` text: one `KEY="value"` line each, with `\\`, `"`,
/// `` ` `` and `$` escaped by a backslash, which systemd's parser undoes
/// inside double quotes (it honours quotes only around a whole value); names
/// that are not valid shell names, which systemd would drop with a warning,
/// are left out here too.
fn environment_file(env: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in env {
        let valid = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            continue;
        }
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"=\"");
        for c in value.chars() {
            if matches!(c, '\\' | '"' | '`' | '$') {
                out.push(b'\\');
            }
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
        out.extend_from_slice(b"\"\n");
    }
    out
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

#[async_trait::async_trait]
impl ProcessRunner for UnitRunner {
    async fn start(&self, launch: Launch) -> Result<Box<dyn ScriptProcess>, RunnerError> {
        let files = self.files(&launch.run_id);
        let spec = self.spec(&launch, &files);
        let tools = self.tools.clone();
        let env = launch.env.clone();
        let unit = spec.unit.clone();
        let started = blocking(move || {
            // A unit of that name left from a crash would block the name.
            tools.act("reset-failed", &[], &spec.unit);
            files.prepare(&env).map_err(|source| RunnerError::Spawn {
                program: files.env.clone(),
                source,
            })?;
            match tools.start(&spec) {
                Ok(()) => Ok(None),
                // With Type=exec, a command that could not be executed
                // (user, directory, interpreter) fails the start but leaves
                // the unit, and with it the reason.
                Err(error) => match tools.state(&spec.unit) {
                    Ok(state) if state.loaded() => {
                        let why = spawn_failure(&state, &error);
                        tools.act("stop", &[], &spec.unit);
                        tools.act("reset-failed", &[], &spec.unit);
                        files.remove();
                        Ok(Some(Err(why)))
                    }
                    _ => {
                        files.remove();
                        Ok(Some(Ok(error.to_string())))
                    }
                },
            }
        })
        .await
        .unwrap_or_else(|| Ok(Some(Ok("the start task failed".into()))))?;
        match started {
            None => Ok(Box::new(
                self.process(&launch.run_id, launch.kill_leftovers),
            )),
            Some(Err(why)) => Ok(Box::new(Failed(Some(Report::SpawnFailed { message: why })))),
            Some(Ok(why)) => {
                tracing::warn!(run = %launch.run_id, %unit, reason = %why, "systemd-run failed: running the setup script as the agent's child");
                let process = self.fallback.start(launch).await?;
                let message = format!(
                    "systemd-run did not start the script as a transient service ({why}); running it as the agent's child instead"
                );
                Ok(Box::new(Prefixed {
                    first: Some(Report::Warning { message }),
                    owned: process,
                }))
            }
        }
    }

    async fn kill_orphans(&self, run_ids: Vec<String>) -> usize {
        let tools = self.tools.clone();
        let files: Vec<(String, RunFiles)> = run_ids
            .iter()
            .map(|id| (unit_name(id), self.files(id)))
            .collect();
        let hit = blocking(move || {
            let mut hit = 0;
            for (unit, files) in files {
                let members = tools.state(&unit).map(|s| s.members().len()).unwrap_or(0);
                if tools.act("kill", &["--signal=SIGKILL"], &unit) {
                    hit += members;
                }
                tools.act("stop", &[], &unit);
                tools.act("reset-failed", &[], &unit);
                files.remove();
            }
            hit
        })
        .await
        .unwrap_or(0);
        hit + self.fallback.kill_orphans(run_ids).await
    }

    async fn tidy(&self, run_ids: Vec<String>) {
        let tools = self.tools.clone();
        let files: Vec<(String, RunFiles)> = run_ids
            .iter()
            .map(|id| (unit_name(id), self.files(id)))
            .collect();
        let _ = blocking(move || {
            for (unit, files) in files {
                // Leftovers allowed to outlive their run keep its unit
                // until they end.
                if let Ok(state) = tools.state(&unit)
                    && state.loaded()
                {
                    if !state.members().is_empty() {
                        continue;
                    }
                    tools.act("stop", &[], &unit);
                    tools.act("reset-failed", &[], &unit);
                }
                files.remove();
            }
        })
        .await;
        self.fallback.tidy(run_ids).await;
    }

    fn outlives_agent(&self) -> bool {
        true
    }

    async fn adopt(&self, run_id: &str) -> Option<Box<dyn ScriptProcess>> {
        let tools = self.tools.clone();
        let unit = unit_name(run_id);
        let state = blocking(move || tools.state(&unit)).await?.ok()?;
        if !state.loaded() {
            return None;
        }
        // kill_leftovers is the config's; what the unit was started with is
        // not kept, and a run adopted after a restart ends like the others.
        Some(Box::new(self.process(run_id, true)))
    }

    fn describe(&self) -> String {
        "systemd transient services (instance-agent-setup-<run>.service)".into()
    }
}

/// Why a unit's command could not be executed, from its state.
fn spawn_failure(state: &ServiceState, error: &StartError) -> String {
    // systemd's own exit statuses for a failed exec step (systemd.exec(5)).
    let step = match state.main_exit {
        Some(MainExit::Code(200)) => "the working directory is not usable (CHDIR)",
        Some(MainExit::Code(203)) => "the interpreter could not be executed (EXEC)",
        Some(MainExit::Code(216)) => "the group could not be set (GROUP)",
        Some(MainExit::Code(217)) => "the user could not be set (USER)",
        Some(MainExit::Code(209)) => "the output files could not be opened (STDOUT)",
        _ => "",
    };
    if step.is_empty() {
        format!("the transient service did not start: {error}")
    } else {
        format!("the transient service did not start: {step}")
    }
}

/// A start that failed before anything ran: one report, then the end.
struct Failed(Option<Report>);

#[async_trait::async_trait]
impl ScriptProcess for Failed {
    fn take_output(&mut self) -> Option<(OutputStream, OutputStream)> {
        None
    }
    async fn next_report(&mut self) -> Option<Report> {
        self.0.take()
    }
    fn terminate(&mut self) {}
    async fn kill(&mut self) -> usize {
        0
    }
}

/// The fallback's process with one report put in front.
struct Prefixed {
    first: Option<Report>,
    owned: Box<dyn ScriptProcess>,
}

#[async_trait::async_trait]
impl ScriptProcess for Prefixed {
    fn take_output(&mut self) -> Option<(OutputStream, OutputStream)> {
        self.owned.take_output()
    }
    async fn next_report(&mut self) -> Option<Report> {
        match self.first.take() {
            Some(report) => Some(report),
            None => self.owned.next_report().await,
        }
    }
    fn terminate(&mut self) {
        self.owned.terminate();
    }
    async fn kill(&mut self) -> usize {
        self.owned.kill().await
    }
}

/// A run's unit, followed: its state polled into reports, its output files
/// read as they grow.
struct UnitProcess {
    tools: Tools,
    unit: String,
    output: Option<(OutputStream, OutputStream)>,
    reports: mpsc::Receiver<Report>,
}

impl UnitProcess {
    fn follow(tools: Tools, run_id: &str, files: RunFiles, kill_leftovers: bool) -> Self {
        let unit = unit_name(run_id);
        let ended = Arc::new(AtomicBool::new(false));
        let output = (
            Box::new(FollowedFile::new(files.stdout.clone(), ended.clone())) as OutputStream,
            Box::new(FollowedFile::new(files.stderr.clone(), ended.clone())) as OutputStream,
        );
        let (tx, reports) = mpsc::channel(16);
        tokio::spawn(watch_unit(
            tools.clone(),
            unit.clone(),
            files,
            kill_leftovers,
            ended,
            tx,
        ));
        Self {
            tools,
            unit,
            output: Some(output),
            reports,
        }
    }
}

#[async_trait::async_trait]
impl ScriptProcess for UnitProcess {
    fn take_output(&mut self) -> Option<(OutputStream, OutputStream)> {
        self.output.take()
    }

    async fn next_report(&mut self) -> Option<Report> {
        self.reports.recv().await
    }

    fn terminate(&mut self) {
        // systemd sends SIGTERM to the whole cgroup, SIGKILL after
        // TimeoutStopSec=; the watcher reports the end.
        let tools = self.tools.clone();
        let unit = self.unit.clone();
        tokio::task::spawn_blocking(move || tools.act("stop", &["--no-block"], &unit));
    }

    async fn kill(&mut self) -> usize {
        let tools = self.tools.clone();
        let unit = self.unit.clone();
        blocking(move || {
            let members = tools.state(&unit).map(|s| s.members().len()).unwrap_or(0);
            tools.act("kill", &["--signal=SIGKILL"], &unit);
            tools.act("stop", &[], &unit);
            members
        })
        .await
        .unwrap_or(0)
    }
}

/// Polls the unit until it has ended and sends what happened: `Started`,
/// `Exited`, `TimedOut`, `Stopped`; then stops and resets the unit (unless
/// leftovers may outlive the script), lets the output readers finish and
/// removes the run's files.
async fn watch_unit(
    tools: Tools,
    unit: String,
    files: RunFiles,
    kill_leftovers: bool,
    ended: Arc<AtomicBool>,
    tx: mpsc::Sender<Report>,
) {
    let mut started = false;
    let mut stopping_seen = false;
    let read = |tools: &Tools, unit: &str| {
        let (tools, unit) = (tools.clone(), unit.to_owned());
        blocking(move || tools.state(&unit))
    };
    let mut failures = 0;
    let last = loop {
        let state = match read(&tools, &unit).await {
            Some(Ok(state)) => state,
            _ => {
                failures += 1;
                if failures >= 20 {
                    break None;
                }
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        failures = 0;
        if !started && state.main_pid > 0 {
            started = true;
            let _ = tx
                .send(Report::Started {
                    pid: state.main_pid,
                })
                .await;
        }
        if state.active == "deactivating" {
            stopping_seen = true;
        }
        let main_done = state.main_exit.is_some() || state.ended();
        if main_done {
            break Some(state);
        }
        tokio::time::sleep(POLL).await;
    };
    let Some(state) = last else {
        ended.store(true, Ordering::SeqCst);
        let _ = tx
            .send(Report::Warning {
                message: format!("cannot read the state of {unit} any more"),
            })
            .await;
        return;
    };
    if state.result == "timeout" {
        let _ = tx.send(Report::TimedOut).await;
    }
    let (code, signal) = match state.main_exit {
        Some(MainExit::Code(code)) => (Some(code), None),
        Some(MainExit::Signal(signal)) => (None, Some(signal)),
        None => (None, None),
    };
    let _ = tx.send(Report::Exited { code, signal }).await;
    // What is still in the cgroup after the main process: leftovers.
    let left = {
        let state = state.clone();
        blocking(move || state.members().len()).await.unwrap_or(0)
    };
    let stopped_by_systemd = stopping_seen || state.result == "timeout" || state.ended();
    if kill_leftovers || stopped_by_systemd {
        let (t, u) = (tools.clone(), unit.clone());
        let _ = blocking(move || {
            t.act("stop", &[], &u);
            t.act("reset-failed", &[], &u);
        })
        .await;
        let _ = tx
            .send(Report::Stopped {
                sigterm: left as u32,
                sigkill: 0,
                survivors: 0,
            })
            .await;
    }
    ended.store(true, Ordering::SeqCst);
    if kill_leftovers || left == 0 {
        // The readers stop at their files' ends now; give them time to get
        // there before the files go.
        tokio::time::sleep(FOLLOW * 5).await;
        let _ = blocking(move || files.remove()).await;
    }
}

/// A file read as it grows, until `ended` is set and its end is reached.
struct FollowedFile {
    path: PathBuf,
    ended: Arc<AtomicBool>,
    file: Option<tokio::fs::File>,
    opening:
        Option<Pin<Box<dyn std::future::Future<Output = std::io::Result<tokio::fs::File>> + Send>>>,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl FollowedFile {
    fn new(path: PathBuf, ended: Arc<AtomicBool>) -> Self {
        Self {
            path,
            ended,
            file: None,
            opening: None,
            waiting: None,
        }
    }
}

impl AsyncRead for FollowedFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Some(sleep) = this.waiting.as_mut() {
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => this.waiting = None,
                }
            }
            if this.file.is_none() {
                let path = this.path.clone();
                let opening = this
                    .opening
                    .get_or_insert_with(|| Box::pin(tokio::fs::File::open(path)));
                match opening.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(file)) => {
                        this.opening = None;
                        this.file = Some(file);
                    }
                    // No file: nothing was or will be written.
                    Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                }
            }
            let Some(file) = this.file.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            // Read before looking at `ended`: bytes written before the end
            // was seen are never lost.
            let ended = this.ended.load(Ordering::SeqCst);
            let before = buf.filled().len();
            match Pin::new(file).poll_read(cx, buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) => {
                    if buf.filled().len() > before || ended {
                        return Poll::Ready(Ok(()));
                    }
                    this.waiting = Some(Box::pin(tokio::time::sleep(FOLLOW)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn environment_file_quotes_every_value() {
        let env = vec![
            ("A".to_owned(), "it's $HOME \"x\" \\n".to_owned()),
            ("1BAD".to_owned(), "x".to_owned()),
            ("B_2".to_owned(), String::new()),
        ];
        assert_eq!(
            String::from_utf8(environment_file(&env)).unwrap(),
            "A=\"it's \\$HOME \\\"x\\\" \\\\n\"\nB_2=\"\"\n"
        );
    }

    #[test]
    fn unit_spec_carries_the_limits_and_no_environment() {
        let dir = tempfile::tempdir().unwrap();
        let runner = UnitRunner::new(
            dir.path(),
            dir.path(),
            SupervisedRunner::new(
                "/bin/false".into(),
                super::super::supervised_runner::Containment::TreeOnly,
            ),
        );
        let launch = Launch {
            run_id: "abc".into(),
            program: "/bin/bash".into(),
            args: vec!["-c".into(), "echo $SECRET".into()],
            env: vec![("SECRET".into(), "s3cr3t".into())],
            working_dir: "/home/u".into(),
            working_dir_id: None,
            user: Some(super::super::runner::UserIds {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 27],
            }),
            kill_grace: Duration::from_secs(4),
            kill_leftovers: true,
            timeout: Duration::from_secs(90),
        };
        let spec = runner.spec(&launch, &runner.files("abc"));
        assert_eq!(spec.unit, "instance-agent-setup-abc.service");
        for wanted in [
            "RuntimeMaxSec=90",
            "TimeoutStopSec=4",
            "User=1000",
            "Group=1000",
            "SupplementaryGroups=27",
            "KillMode=control-group",
            "WorkingDirectory=/home/u",
        ] {
            assert!(
                spec.properties.iter().any(|p| p == wanted),
                "{wanted}: {spec:?}"
            );
        }
        let text = format!("{spec:?}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    #[tokio::test]
    async fn a_followed_file_is_read_as_it_grows_until_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"one\n").unwrap();
        let ended = Arc::new(AtomicBool::new(false));
        let mut file = FollowedFile::new(path.clone(), ended.clone());
        let mut buf = [0u8; 64];
        let n = file.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"one\n");
        // At the end of the file, a read waits for more instead of ending.
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            out.write_all(b"two\n").unwrap();
            out
        });
        let n = file.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"two\n");
        let mut out = writer.join().unwrap();
        out.write_all(b"three\n").unwrap();
        ended.store(true, Ordering::SeqCst);
        let mut rest = Vec::new();
        file.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"three\n");
    }
}

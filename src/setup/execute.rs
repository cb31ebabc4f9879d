//! Executing one run: resolve it on the host again, open its log, record it
//! as RUNNING, start the script, capture its output, enforce its timeout and
//! the agent's stop, drain the output, and record how it ended.
//!
//! [`Executor`] holds no state of its own: what it learns about the run goes
//! to a [`Journal`] (the service's table of runs and the store behind it), so
//! this file knows nothing of the queue, the condition or the job gate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::accounts::Accounts;
use super::capture;
use super::resolve::{self, Resolved};
use super::run_log::{LiveLog, LogWriter};
use super::runner::{ProcessRunner, Report, ScriptProcess};
use super::settings::Settings;
use super::{RunRequest, RunState, SetupError, SetupRun};

/// Deadline of the filesystem and user checks of one request.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long output is still read after the script's tree has ended (or, with
/// `kill_leftovers = false`, after the script exited).
const DRAIN: Duration = Duration::from_secs(5);
/// How long the supervisor may take beyond the grace period to report the end
/// of a stopped tree before everything is SIGKILLed from the agent's side.
const SUPERVISOR_SLACK: Duration = Duration::from_secs(15);

/// Where an execution records what happens to its run.
#[async_trait::async_trait]
pub(super) trait Journal: Send + Sync {
    /// Shows the run's live log to readers while it runs (`None` once it ends).
    fn show_live(&self, id: &str, live: Option<Arc<LiveLog>>);

    /// The run as recorded now.
    fn run(&self, id: &str) -> Option<SetupRun>;

    /// Records the run as RUNNING, started now, with its log and user. On an
    /// error the script must not start: a start that is not on record would
    /// go unnoticed by a crash.
    async fn started(
        &self,
        id: &str,
        log_path: PathBuf,
        run_as: String,
        message: String,
    ) -> Result<(), SetupError>;

    /// Records that the agent's stop interrupted the run, before its tree is
    /// gone: the agent's shutdown grace may end first (the supervisor
    /// finishes the job).
    async fn interrupted(&self, id: &str, message: String);

    /// Records the end of the run; returns the run as recorded.
    async fn ended(&self, id: &str, end: RunEnd) -> Option<SetupRun>;
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum RunEnd {
    /// It never started (the host checks or its log failed): FAILED.
    NotStarted {
        /// "could not start: ...".
        message: String,
    },
    /// The script ran.
    Ran {
        /// Its final state.
        state: RunState,
        /// Its exit status.
        exit_code: Option<i32>,
        /// The signal that ended it.
        signal: Option<i32>,
        /// The last lines of its output.
        log_tail: Vec<String>,
        /// What happened, for `SetupRun::message`.
        message: String,
    },
}

impl RunEnd {
    /// Applies the end to the run's record.
    pub fn apply(self, run: &mut SetupRun) {
        match self {
            RunEnd::NotStarted { message } => {
                run.state = RunState::Failed;
                run.message = message;
            }
            RunEnd::Ran {
                state,
                exit_code,
                signal,
                log_tail,
                message,
            } => {
                run.state = state;
                run.exit_code = exit_code;
                run.signal = signal;
                run.log_tail = log_tail;
                run.message = message;
            }
        }
    }
}

/// Executes runs with the service's settings and outside world.
pub(super) struct Executor<'a> {
    /// Logs, limits, launch context.
    pub settings: &'a Settings,
    /// Starts scripts.
    pub runner: &'a dyn ProcessRunner,
    /// Looks up `run_as` users.
    pub accounts: &'a Arc<dyn Accounts>,
}

impl Executor<'_> {
    /// The filesystem and user checks of a request, off the runtime with a
    /// deadline. With `run_id`, an inline script is written for the run.
    pub async fn resolve(
        &self,
        request: RunRequest,
        run_id: Option<String>,
    ) -> Result<Resolved, SetupError> {
        let accounts = self.accounts.clone();
        let context = self.settings.launch.clone();
        let task = tokio::task::spawn_blocking(move || {
            resolve::resolve(&request, accounts.as_ref(), &context, run_id.as_deref())
        });
        match tokio::time::timeout(CHECK_TIMEOUT, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => Err(SetupError::CheckTimedOut {
                what: "checking the script, the user and the working directory",
                seconds: CHECK_TIMEOUT.as_secs(),
            }),
        }
    }

    /// Executes one queued run to its end; returns the run as recorded at
    /// its end.
    pub async fn execute(
        &self,
        journal: &dyn Journal,
        id: &str,
        request: RunRequest,
        cancel: &CancellationToken,
    ) -> Option<SetupRun> {
        let log_path = self.settings.log_path(id);
        let resolved = match self.resolve(request.clone(), Some(id.to_owned())).await {
            Ok(resolved) => resolved,
            Err(error) => {
                let message = format!("could not start: {error}");
                self.write_failure_log(&log_path, &message).await;
                return journal.ended(id, RunEnd::NotStarted { message }).await;
            }
        };
        let writer = match self.create_log(&log_path).await {
            Ok(writer) => writer,
            Err(error) => {
                remove_script_file(resolved.script_file.clone()).await;
                let message = format!("could not start: {error}");
                return journal.ended(id, RunEnd::NotStarted { message }).await;
            }
        };
        journal.show_live(id, Some(writer.live()));
        // "re-run after run X was interrupted" stays in the final message.
        let rerun_note = journal.run(id).filter(|r| r.attempt > 1).map(|r| r.message);
        let timeout = request.timeout();
        let running = journal
            .started(
                id,
                log_path.clone(),
                resolved.user_name.clone(),
                format!("running (timeout {} s)", timeout.as_secs()),
            )
            .await;
        if let Err(error) = running {
            let message = format!("could not start: cannot record the run as running: {error}");
            let mut writer = writer;
            writer.note(&message).await;
            writer.finish().await;
            remove_script_file(resolved.script_file.clone()).await;
            journal.show_live(id, None);
            return journal.ended(id, RunEnd::NotStarted { message }).await;
        }

        let started = self.start_note(&request, &resolved);
        let process = self.runner.start(resolved.launch.clone()).await;
        let (outcome, writer, capture_cut) = self
            .run_process(journal, id, started, process, writer, timeout, cancel)
            .await;
        self.conclude(
            journal,
            id,
            timeout,
            (outcome, writer, capture_cut),
            resolved.script_file.clone(),
            rerun_note,
        )
        .await
    }

    /// Takes over a run that an earlier agent life started and that still
    /// exists (see [`ProcessRunner::adopt`]): its log is written again from
    /// the script's output kept by the runner, its timeout counts from its
    /// start, and it ends like any run.
    pub async fn resume(
        &self,
        journal: &dyn Journal,
        id: &str,
        request: RunRequest,
        process: Box<dyn ScriptProcess>,
        cancel: &CancellationToken,
    ) -> Option<SetupRun> {
        let log_path = self.settings.log_path(id);
        let writer = match self.create_log(&log_path).await {
            Ok(writer) => writer,
            Err(error) => {
                tracing::warn!(run = id, %error, "cannot write the log of an adopted setup run");
                return None;
            }
        };
        journal.show_live(id, Some(writer.live()));
        let run = journal.run(id);
        let rerun_note = run.as_ref().filter(|r| r.attempt > 1).map(|r| {
            r.message
                .split(": running")
                .next()
                .unwrap_or_default()
                .to_owned()
        });
        let timeout = request.timeout();
        let elapsed = run
            .and_then(|r| r.started_at)
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        let note = format!(
            "the agent restarted; it took over the run's transient service after {} s (timeout {} s); output from the start:",
            elapsed.as_secs(),
            timeout.as_secs()
        );
        let (outcome, writer, capture_cut) = self
            .run_process(
                journal,
                id,
                note,
                Ok(process),
                writer,
                timeout.saturating_sub(elapsed),
                cancel,
            )
            .await;
        let script_file = matches!(request.source, super::ScriptSource::Inline(_))
            .then(|| resolve::inline_script_path(&self.settings.launch.scripts_dir, id));
        self.conclude(
            journal,
            id,
            timeout,
            (outcome, writer, capture_cut),
            script_file,
            rerun_note.filter(|n| !n.is_empty()),
        )
        .await
    }

    /// Records how a run ended: the log's last notes, the result. A run left
    /// to its transient service by a stopping agent is not ended: the next
    /// agent adopts it.
    async fn conclude(
        &self,
        journal: &dyn Journal,
        id: &str,
        timeout: Duration,
        ran: (Outcome, Option<LogWriter>, bool),
        script_file: Option<PathBuf>,
        rerun_note: Option<String>,
    ) -> Option<SetupRun> {
        let (outcome, writer, capture_cut) = ran;
        if outcome.detached {
            if let Some(mut writer) = writer {
                writer
                    .note("the agent is stopping: the script runs on in its transient service, and the next agent takes it over")
                    .await;
                writer.finish().await;
            }
            journal.show_live(id, None);
            return journal.run(id);
        }
        let (state, exit_code, signal, mut message) = outcome.conclusion(timeout);
        let mut finished = None;
        if let Some(mut writer) = writer {
            if capture_cut {
                writer
                    .note("output capture stopped 5 s after the script ended: a process it started still holds its stdout or stderr")
                    .await;
            }
            writer.note(&message).await;
            finished = Some(writer.finish().await);
        }
        remove_script_file(script_file).await;
        if let Some(finished) = &finished {
            if finished.dropped_bytes > 0 {
                message.push_str(&format!(
                    "; log truncated: {} bytes of output dropped from the middle",
                    finished.dropped_bytes
                ));
            }
            if let Some(error) = &finished.write_error {
                message.push_str(&format!("; the log file is incomplete: {error}"));
            }
        }
        let log_tail = finished.map(|f| f.log_tail).unwrap_or_default();
        if let Some(why) = &rerun_note {
            message = format!("{why}: {message}");
        }
        journal.show_live(id, None);
        let end = RunEnd::Ran {
            state,
            exit_code,
            signal,
            log_tail,
            message,
        };
        journal.ended(id, end).await
    }

    /// The agent's first line in a run's log.
    fn start_note(&self, request: &RunRequest, resolved: &Resolved) -> String {
        format!(
            "starting {} script {} ({} argument{}) as {} in {}, timeout {} s",
            request.kind.name(),
            request.source.describe(),
            request.args.len(),
            if request.args.len() == 1 { "" } else { "s" },
            resolved.user_name,
            resolved.launch.working_dir.display(),
            request.timeout().as_secs()
        )
    }

    /// Captures the started script's output, waits for its end (timeout
    /// and agent stop included), and drains the output. Returns what
    /// happened, the log writer (unless capture panicked) and whether the
    /// drain had to be cut.
    #[allow(clippy::too_many_arguments)]
    async fn run_process(
        &self,
        journal: &dyn Journal,
        id: &str,
        first_note: String,
        process: Result<Box<dyn ScriptProcess>, super::runner::RunnerError>,
        writer: LogWriter,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> (Outcome, Option<LogWriter>, bool) {
        let (notes, notes_rx) = mpsc::channel(32);
        let stop_capture = CancellationToken::new();
        let _ = notes.send(first_note).await;
        let (outcome, capture_task) = match process {
            Ok(mut process) => {
                let (stdout, stderr) = process.take_output().unwrap_or_else(|| {
                    (Box::new(tokio::io::empty()), Box::new(tokio::io::empty()))
                });
                let capture_task = tokio::spawn(capture::capture(
                    stdout,
                    stderr,
                    writer,
                    notes_rx,
                    stop_capture.clone(),
                ));
                let outcome = self
                    .supervise(journal, id, process.as_mut(), &notes, timeout, cancel)
                    .await;
                (outcome, capture_task)
            }
            Err(error) => {
                let outcome = Outcome {
                    spawn_failed: Some(error.to_string()),
                    ..Outcome::default()
                };
                let capture_task = tokio::spawn(capture::capture(
                    tokio::io::empty(),
                    tokio::io::empty(),
                    writer,
                    notes_rx,
                    stop_capture.clone(),
                ));
                (outcome, capture_task)
            }
        };
        if outcome.detached {
            // The script goes on writing; the next agent reads it all again.
            stop_capture.cancel();
        }
        drop(notes);

        let mut capture_task = capture_task;
        let writer = match tokio::time::timeout(DRAIN, &mut capture_task).await {
            Ok(joined) => joined.ok(),
            Err(_) => {
                stop_capture.cancel();
                capture_task.await.ok()
            }
        };
        (outcome, writer, stop_capture.is_cancelled())
    }

    /// Writes the log of a run that failed before it started: the one line
    /// saying why, so that its `log_path` leads to an explanation.
    /// A log that cannot be written is only logged.
    pub async fn write_failure_log(&self, path: &Path, message: &str) {
        match self.create_log(path).await {
            Ok(mut writer) => {
                writer.note(message).await;
                writer.finish().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot write the log of a setup run that could not start");
            }
        }
    }

    async fn create_log(&self, path: &Path) -> Result<LogWriter, SetupError> {
        let dir = self.settings.logs_dir.clone();
        let err = |source| SetupError::Log {
            path: path.to_owned(),
            source,
        };
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(&dir)
        })
        .await
        .map_err(|e| err(std::io::Error::other(e)))?
        .map_err(err)?;
        LogWriter::create(path, self.settings.limits)
            .await
            .map_err(err)
    }

    /// Waits for the script's end, enforcing the timeout and the agent's stop.
    async fn supervise(
        &self,
        journal: &dyn Journal,
        id: &str,
        process: &mut dyn ScriptProcess,
        notes: &mpsc::Sender<String>,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Outcome {
        let grace = self.settings.launch.kill_grace;
        let mut outcome = Outcome::default();
        // A runner that enforces the timeout itself (RuntimeMaxSec=) acts
        // first; the agent's deadline is the backstop.
        let slack = if self.runner.outlives_agent() {
            Duration::from_secs(3)
        } else {
            Duration::ZERO
        };
        let deadline = tokio::time::sleep(timeout + slack);
        tokio::pin!(deadline);
        let backstop = tokio::time::sleep(Duration::MAX);
        tokio::pin!(backstop);
        let mut stopping = false;
        let note = |text: String| {
            let notes = notes.clone();
            async move {
                let _ = notes.send(text).await;
            }
        };
        loop {
            tokio::select! {
                report = process.next_report() => match report {
                    Some(Report::Started { pid }) => note(format!("started, pid {pid}")).await,
                    Some(Report::SpawnFailed { message }) => {
                        note(format!("could not start: {message}")).await;
                        outcome.spawn_failed = Some(message);
                    }
                    Some(Report::Exited { code, signal }) => outcome.exit = Some((code, signal)),
                    Some(Report::Stopped { sigterm, sigkill, survivors }) => {
                        note(stop_summary(sigterm, sigkill, survivors, grace)).await;
                        outcome.stopped = Some((sigterm, sigkill, survivors));
                    }
                    Some(Report::TimedOut) => {
                        if !outcome.timed_out {
                            note(format!(
                                "timeout of {} s reached: the service manager stopped the script's unit (SIGTERM, SIGKILL after {} s)",
                                timeout.as_secs(), grace.as_secs()
                            )).await;
                        }
                        outcome.timed_out = true;
                    }
                    Some(Report::Warning { message }) => note(format!("warning: {message}")).await,
                    None => break,
                },
                _ = &mut deadline, if !stopping => {
                    stopping = true;
                    outcome.timed_out = true;
                    note(format!(
                        "timeout of {} s reached: stopping the script's process tree (SIGTERM, SIGKILL after {} s)",
                        timeout.as_secs(), grace.as_secs()
                    )).await;
                    process.terminate();
                    backstop.as_mut().reset(tokio::time::Instant::now() + grace + SUPERVISOR_SLACK);
                }
                _ = cancel.cancelled(), if !stopping && self.runner.outlives_agent() => {
                    outcome.detached = true;
                    break;
                }
                _ = cancel.cancelled(), if !stopping && !self.runner.outlives_agent() => {
                    stopping = true;
                    outcome.interrupted = true;
                    process.terminate();
                    note("the agent is stopping: stopping the script's process tree".into()).await;
                    journal.interrupted(
                        id,
                        "interrupted: the agent stopped while the script was running".into(),
                    ).await;
                    backstop.as_mut().reset(tokio::time::Instant::now() + grace + SUPERVISOR_SLACK);
                }
                _ = &mut backstop => {
                    let hit = process.kill().await;
                    note(format!("the supervisor did not report within {} s; SIGKILLed it and {hit} marked process(es)", (grace + SUPERVISOR_SLACK).as_secs())).await;
                    outcome.lost = true;
                    break;
                }
            }
        }
        if outcome.exit.is_none()
            && outcome.spawn_failed.is_none()
            && !outcome.lost
            && !outcome.detached
        {
            let hit = process.kill().await;
            note(format!(
                "the script's supervisor ended without reporting the script's exit; SIGKILLed {hit} marked process(es)"
            ))
            .await;
            outcome.lost = true;
        }
        outcome
    }
}

/// What happened to a started script.
#[derive(Debug, Default, Clone, PartialEq)]
struct Outcome {
    exit: Option<(Option<i32>, Option<i32>)>,
    spawn_failed: Option<String>,
    stopped: Option<(u32, u32, u32)>,
    timed_out: bool,
    interrupted: bool,
    lost: bool,
    /// The agent stopped and left the script to a runner that outlives it.
    detached: bool,
}

impl Outcome {
    /// The final state, exit code, signal and message.
    fn conclusion(&self, timeout: Duration) -> (RunState, Option<i32>, Option<i32>, String) {
        let (code, signal) = self.exit.unwrap_or((None, None));
        let leftovers = match self.stopped {
            Some((term, _, _)) if term > 0 && !self.timed_out && !self.interrupted => {
                format!("; {term} process(es) it left running were stopped (setup.kill_leftovers)")
            }
            _ => String::new(),
        };
        if self.interrupted {
            return (
                RunState::Interrupted,
                code,
                signal,
                "interrupted: the agent stopped while the script was running; its process tree was stopped".into(),
            );
        }
        if self.timed_out {
            let how = match self.stopped {
                Some((term, kill, _)) if kill > 0 => {
                    format!("SIGTERM to {term} process(es), SIGKILL to {kill}")
                }
                Some((term, _, _)) => format!("SIGTERM to {term} process(es)"),
                None => "its supervisor was killed".into(),
            };
            return (
                RunState::TimedOut,
                code,
                signal,
                format!("killed after its {} s timeout ({how})", timeout.as_secs()),
            );
        }
        if let Some(message) = &self.spawn_failed {
            return (
                RunState::Failed,
                None,
                None,
                format!("could not start: {message}"),
            );
        }
        match (code, signal) {
            (Some(0), _) => (
                RunState::Succeeded,
                Some(0),
                None,
                format!("exited with status 0{leftovers}"),
            ),
            (Some(code), _) => (
                RunState::Failed,
                Some(code),
                None,
                format!("exited with status {code}{leftovers}"),
            ),
            (None, Some(signal)) => (
                RunState::Failed,
                None,
                Some(signal),
                format!("killed by signal {signal} ({}){leftovers}", signal_name(signal)),
            ),
            (None, None) => (
                RunState::Failed,
                None,
                None,
                "the script's supervisor died without reporting how the script ended; its processes were killed".into(),
            ),
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str())
        .unwrap_or("unknown signal")
}

fn stop_summary(sigterm: u32, sigkill: u32, survivors: u32, grace: Duration) -> String {
    let mut text = format!("process tree stopped: SIGTERM to {sigterm} process(es)");
    if sigkill > 0 {
        text.push_str(&format!(
            ", SIGKILL to {sigkill} still alive after {} s",
            grace.as_secs()
        ));
    }
    if survivors > 0 {
        text.push_str(&format!(
            "; {survivors} process(es) could not be killed (stuck in the kernel)"
        ));
    }
    text
}

async fn remove_script_file(path: Option<PathBuf>) {
    if let Some(path) = path {
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
    }
}

#[cfg(test)]
mod tests;

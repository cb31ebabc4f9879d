//! [`SetupScripts`]: accepts runs, executes them one at a time, keeps their
//! results, and reports through events, the setup condition and the job
//! queue's admission gate.
//!
//! # Lifecycle
//! - [`SetupScripts::open`] (at agent start, before serving): loads past runs
//!   from the store; a run still PENDING or RUNNING was cut short by the last
//!   agent's crash or stop and becomes INTERRUPTED. Decides what the creation
//!   script needs (nothing once it has succeeded; one re-run when its last run
//!   was interrupted, the re-run itself being attempt 2; a first run when
//!   config declares one and it never ran) and holds the job queue until it
//!   has succeeded.
//! - [`SetupScripts::run`] (a background task): SIGKILLs what is left of the
//!   interrupted runs, queues the creation script, then the startup scripts
//!   once the creation script has succeeded (or when there is none), and
//!   executes the queue in order until the agent stops.
//!
//! Runs execute one at a time: setup scripts install packages and change the
//! system, and two of them at once would fight over dpkg's lock at best.
//!
//! A failed, timed-out or twice-interrupted creation script is not re-run by
//! itself: the condition stays failed with the exit code and the last lines
//! of output, the job queue stays held, and an operator may run it again
//! (`instance-agent setup run --kind creation ...`).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::accounts::Accounts;
use super::capture::{self, LiveLog, LogLimits, LogWriter};
use super::config::{SetupConfig, SetupScriptConfig, SetupScriptKind};
use super::logfile::{LogFileReader, LogPiece};
use super::request::{self, LaunchContext, RequestLimits, Resolved};
use super::runner::{ProcessRunner, Report, ScriptProcess};
use super::{RunRequest, RunState, SetupError, SetupKind, SetupRun};
use crate::admission::AdmissionGate;
use crate::events::{EventBus, EventPayload};
use crate::health::{ConditionState, Health, Subsystem};
use crate::store::{Store, Table, Write};

/// Every run, by id.
const RUNS: Table = Table("setup.runs");
/// The request of each creation run, so that an interrupted one can run again.
const REQUESTS: Table = Table("setup.requests");
/// The holder name on the admission gate.
const GATE_HOLDER: &str = "setup";
/// Deadline of the filesystem and user checks of one request.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long output is still read after the script's tree has ended (or, with
/// `kill_leftovers = false`, after the script exited).
const DRAIN: Duration = Duration::from_secs(5);
/// How long the supervisor may take beyond the grace period to report the end
/// of a stopped tree before everything is SIGKILLed from the agent's side.
const SUPERVISOR_SLACK: Duration = Duration::from_secs(15);
/// Creation runs stop being re-run after an interruption at this attempt.
const MAX_CREATION_ATTEMPTS: u32 = 2;
/// Lines of `log_tail` quoted in the condition message.
const CONDITION_TAIL_LINES: usize = 5;

/// The setup domain's settings, from `[setup]` and the agent's dirs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `<agent.logs_dir>/setup`.
    pub logs_dir: PathBuf,
    /// Log size limits.
    pub limits: LogLimits,
    /// `setup.max_script_bytes`, `max_args`, `max_arg_bytes`,
    /// `max_env_entries`, `max_env_bytes`.
    pub request_limits: RequestLimits,
    /// `setup.max_pending_runs`.
    pub max_pending: usize,
    /// `setup.keep_runs`.
    pub keep_runs: usize,
    /// `setup.gate_jobs`.
    pub gate_jobs: bool,
    /// Environment, grace, leftovers, where inline scripts go.
    pub launch: LaunchContext,
    /// `[[setup.scripts]]`.
    pub declared: Vec<SetupScriptConfig>,
}

impl Settings {
    /// Derives the settings from the section; `logs_dir` and `runtime_dir`
    /// are the agent's (`agent.logs_dir`, `agent.runtime_dir`), `hostname`
    /// is the default `CI_NAME`.
    pub fn new(setup: &SetupConfig, logs_dir: &Path, runtime_dir: &Path, hostname: &str) -> Self {
        let ci_name = if setup.ci_name.is_empty() {
            hostname.to_owned()
        } else {
            setup.ci_name.clone()
        };
        let mut base_env = LaunchContext::passed_env();
        base_env.extend([
            ("CI_NAME".to_owned(), ci_name),
            ("CI_WORKSPACE".to_owned(), setup.ci_workspace.clone()),
            (
                "CI_RESOURCE_GROUP".to_owned(),
                setup.ci_resource_group.clone(),
            ),
            (
                "CI_LOCAL_UBUNTU_USER".to_owned(),
                setup.ci_local_ubuntu_user.clone(),
            ),
        ]);
        Self {
            logs_dir: logs_dir.join("setup"),
            limits: LogLimits {
                head_bytes: setup.log_head_bytes,
                tail_bytes: setup.log_tail_bytes,
                tail_lines: setup.log_tail_lines as usize,
            },
            request_limits: setup.request_limits(),
            max_pending: setup.max_pending_runs as usize,
            keep_runs: setup.keep_runs as usize,
            gate_jobs: setup.gate_jobs,
            launch: LaunchContext {
                base_env,
                kill_grace: Duration::from_secs(setup.kill_grace_seconds.into()),
                kill_leftovers: setup.kill_leftovers,
                scripts_dir: runtime_dir.join("setup"),
            },
            declared: setup.scripts.clone(),
        }
    }

    fn declared_creation(&self) -> Option<&SetupScriptConfig> {
        self.declared
            .iter()
            .find(|s| s.kind == SetupScriptKind::Creation)
    }
}

/// A creation run decided at start.
#[derive(Debug, Clone, PartialEq)]
struct PlannedCreation {
    request: RunRequest,
    attempt: u32,
    message: String,
}

#[derive(Default)]
struct State {
    runs: HashMap<String, SetupRun>,
    queue: VecDeque<String>,
    requests: HashMap<String, RunRequest>,
    keys: HashMap<String, String>,
    live: HashMap<String, Arc<LiveLog>>,
    /// Runs found PENDING or RUNNING at open, now INTERRUPTED, to persist and
    /// clean up.
    stale: Vec<String>,
    planned_creation: Option<PlannedCreation>,
    /// Why the creation script will not run by itself, when it will not.
    creation_blocked: Option<String>,
    /// Startup runs of this agent life.
    startup_runs: Vec<String>,
    startup_queued: bool,
    stopping: bool,
}

impl State {
    fn latest_creation(&self) -> Option<&SetupRun> {
        self.runs
            .values()
            .filter(|r| r.kind == SetupKind::Creation)
            .max_by_key(|r| (r.created_at, r.attempt))
    }

    fn succeeded_creation(&self) -> Option<&SetupRun> {
        self.runs
            .values()
            .find(|r| r.kind == SetupKind::Creation && r.state == RunState::Succeeded)
    }
}

/// What the setup service works with: the agent's shared parts and the
/// outside world.
#[derive(Clone)]
pub struct Wiring {
    /// Durable results.
    pub store: Store,
    /// `WatchEvents`.
    pub events: EventBus,
    /// The setup condition.
    pub health: Health,
    /// The job queue's gate.
    pub admission: AdmissionGate,
    /// Starts scripts.
    pub runner: Arc<dyn ProcessRunner>,
    /// Looks up `run_as` users.
    pub accounts: Arc<dyn Accounts>,
}

struct Inner {
    settings: Settings,
    wiring: Wiring,
    state: Mutex<State>,
    work: Notify,
    /// Bumped on every change of any run, for readers waiting on a pending run.
    changes: watch::Sender<u64>,
    /// True once the interrupted runs are handled and the declared scripts queued.
    recovered: watch::Sender<bool>,
}

/// The setup scripts service. Cheap to clone.
#[derive(Clone)]
pub struct SetupScripts {
    inner: Arc<Inner>,
}

/// A stream of log pieces.
pub type LogStreamOf = Pin<Box<dyn Stream<Item = Result<LogPiece, SetupError>> + Send>>;

fn now() -> SystemTime {
    SystemTime::now()
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

impl SetupScripts {
    /// Loads past runs, marks the ones cut short by the last agent as
    /// interrupted, plans the creation script and sets the condition and the
    /// job queue hold. Reads the store inline (call before serving).
    pub fn open(settings: Settings, wiring: Wiring) -> Result<Self, SetupError> {
        let mut state = State::default();
        for (id, mut run) in wiring.store.scan::<SetupRun>(RUNS)? {
            if !run.state.is_terminal() {
                run.message = match run.state {
                    RunState::Running => {
                        "interrupted: the agent stopped or crashed while the script was running"
                            .into()
                    }
                    _ => "interrupted: the agent stopped before the script started".into(),
                };
                run.state = RunState::Interrupted;
                run.finished_at = Some(now());
                state.stale.push(id.clone());
            }
            if !run.idempotency_key.is_empty() {
                state.keys.insert(run.idempotency_key.clone(), id.clone());
            }
            state.runs.insert(id, run);
        }
        let (planned, blocked) = plan_creation(&state, &settings, &wiring.store);
        state.planned_creation = planned;
        state.creation_blocked = blocked;
        let service = Self {
            inner: Arc::new(Inner {
                settings,
                wiring,
                state: Mutex::new(state),
                work: Notify::new(),
                changes: watch::channel(0).0,
                recovered: watch::channel(false).0,
            }),
        };
        service.refresh_condition();
        Ok(service)
    }

    /// Waits until the start-up work (recovery, queuing the declared
    /// scripts) is done.
    pub async fn recovered(&self) {
        let mut recovered = self.inner.recovered.subscribe();
        let _ = recovered.wait_for(|done| *done).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every mutation under this lock is a few map operations that leave
        // the state consistent; a poisoned lock is still usable.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Recovers, then executes queued runs one at a time until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        self.recover().await;
        self.inner.recovered.send_replace(true);
        loop {
            let next = self.lock().queue.pop_front();
            match next {
                Some(id) => self.execute(&id, &cancel).await,
                None => {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = self.inner.work.notified() => {}
                    }
                }
            }
            if cancel.is_cancelled() {
                break;
            }
        }
        // Runs still queued stay PENDING in the store: the next start records
        // them as interrupted (and re-runs a creation run once).
        self.lock().stopping = true;
    }

    /// Persists the interrupted runs, kills their leftovers and queues the
    /// creation and startup scripts.
    async fn recover(&self) {
        let stale: Vec<SetupRun> = {
            let mut state = self.lock();
            let ids = std::mem::take(&mut state.stale);
            ids.iter()
                .filter_map(|id| state.runs.get(id).cloned())
                .collect()
        };
        if !stale.is_empty() {
            let writes = stale.iter().map(|r| Write::put(RUNS, &r.id, r)).collect();
            if let Err(error) = self.inner.wiring.store.apply(writes).await {
                tracing::error!(%error, "cannot record interrupted setup runs");
            }
            for run in &stale {
                tracing::warn!(run = %run.id, kind = run.kind.name(), "setup run was interrupted by the last agent stop or crash");
                self.publish(run);
            }
            let ids: Vec<String> = stale.iter().map(|r| r.id.clone()).collect();
            // The inline scripts of runs cut short were never removed.
            let scripts_dir = self.inner.settings.launch.scripts_dir.clone();
            let scripts: Vec<PathBuf> = ids
                .iter()
                .map(|id| request::inline_script_path(&scripts_dir, id))
                .collect();
            let _ = tokio::task::spawn_blocking(move || {
                for path in scripts {
                    let _ = std::fs::remove_file(path);
                }
            })
            .await;
            let killed = self.inner.wiring.runner.kill_orphans(ids).await;
            if killed > 0 {
                tracing::warn!(
                    processes = killed,
                    "killed processes left by interrupted setup runs"
                );
            }
        }
        // Runs whose leftovers were allowed to outlive them (kill_leftovers =
        // false) leave their cgroup behind; remove the ones now empty.
        let finished = {
            let state = self.lock();
            state
                .runs
                .values()
                .filter(|r| r.state.is_terminal())
                .map(|r| r.id.clone())
                .collect()
        };
        self.inner.wiring.runner.tidy(finished).await;
        let planned = self.lock().planned_creation.take();
        match planned {
            Some(plan) => {
                let request = plan.request.clone();
                if let Err(error) = self
                    .enqueue_checked(request, plan.attempt, plan.message)
                    .await
                {
                    tracing::error!(%error, "cannot queue the creation script");
                }
            }
            None => self.queue_startup_if_ready().await,
        }
        self.refresh_condition();
    }

    /// Queues the declared startup scripts once per agent life, when the
    /// creation script (if there is one) has succeeded.
    async fn queue_startup_if_ready(&self) {
        let ready = {
            let mut state = self.lock();
            let creation_expected = self.inner.settings.declared_creation().is_some()
                || state.latest_creation().is_some();
            let ready = !state.startup_queued
                && (!creation_expected || state.succeeded_creation().is_some());
            if ready {
                state.startup_queued = true;
            }
            ready
        };
        if !ready {
            return;
        }
        let scripts: Vec<RunRequest> = self
            .inner
            .settings
            .declared
            .iter()
            .filter(|s| s.kind == SetupScriptKind::Startup)
            .map(SetupScriptConfig::request)
            .collect();
        for request in scripts {
            match self.enqueue_checked(request, 1, String::new()).await {
                Ok(run) => self.lock().startup_runs.push(run.id),
                Err(error) => tracing::error!(%error, "cannot queue a startup script"),
            }
        }
    }

    /// Checks a request from config or recovery and queues it; a request that
    /// fails its checks is recorded as a FAILED run, so that the failure is
    /// visible where runs are.
    async fn enqueue_checked(
        &self,
        request: RunRequest,
        attempt: u32,
        message: String,
    ) -> Result<SetupRun, SetupError> {
        let checked = match request::check_shape(&request, &self.inner.settings.request_limits) {
            Ok(()) => self.check_on_host(&request).await.map(|_| ()),
            Err(error) => Err(error),
        };
        match checked {
            Ok(()) => self.enqueue(request, attempt, message).await,
            Err(error) => {
                let mut run = self.new_run(&request, attempt);
                run.state = RunState::Failed;
                run.finished_at = Some(now());
                run.message = format!("could not start: {error}");
                self.write_failure_log(&run.log_path, &run.message).await;
                self.lock().runs.insert(run.id.clone(), run.clone());
                let mut writes = vec![Write::put(RUNS, &run.id, &run)];
                if run.kind == SetupKind::Creation {
                    writes.push(Write::put(REQUESTS, &run.id, &request));
                }
                self.inner.wiring.store.apply(writes).await?;
                self.publish(&run);
                self.refresh_condition();
                Ok(run)
            }
        }
    }

    /// Accepts a request from the API: checks it, then queues it.
    pub async fn submit(&self, request: RunRequest) -> Result<SetupRun, SetupError> {
        if let Some(existing) = self.existing_for_key(&request)? {
            return Ok(existing);
        }
        request::check_shape(&request, &self.inner.settings.request_limits)?;
        self.check_on_host(&request).await?;
        self.enqueue(request, 1, String::new()).await
    }

    /// The run made for the request's idempotency key, if any; a conflict when
    /// the key was used for a different request.
    fn existing_for_key(&self, request: &RunRequest) -> Result<Option<SetupRun>, SetupError> {
        if request.idempotency_key.is_empty() {
            return Ok(None);
        }
        let state = self.lock();
        let Some(run) = state
            .keys
            .get(&request.idempotency_key)
            .and_then(|id| state.runs.get(id))
        else {
            return Ok(None);
        };
        if run.fingerprint == request.fingerprint() {
            Ok(Some(self.with_live_tail(&state, run.clone())))
        } else {
            Err(SetupError::IdempotencyConflict {
                key: request.idempotency_key.clone(),
                run_id: run.id.clone(),
            })
        }
    }

    /// The filesystem and user checks, off the runtime with a deadline.
    async fn check_on_host(&self, request: &RunRequest) -> Result<Resolved, SetupError> {
        self.resolve_blocking(request.clone(), None).await
    }

    async fn resolve_blocking(
        &self,
        request: RunRequest,
        run_id: Option<String>,
    ) -> Result<Resolved, SetupError> {
        let accounts = self.inner.wiring.accounts.clone();
        let context = self.inner.settings.launch.clone();
        let task = tokio::task::spawn_blocking(move || {
            request::resolve(&request, accounts.as_ref(), &context, run_id.as_deref())
        });
        match tokio::time::timeout(CHECK_TIMEOUT, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => Err(SetupError::CheckTimedOut {
                what: "checking the script, the user and the working directory",
                seconds: CHECK_TIMEOUT.as_secs(),
            }),
        }
    }

    fn new_run(&self, request: &RunRequest, attempt: u32) -> SetupRun {
        let id = new_id();
        SetupRun {
            log_path: self.inner.settings.logs_dir.join(format!("{id}.log")),
            id,
            kind: request.kind,
            state: RunState::Pending,
            exit_code: None,
            signal: None,
            log_tail: Vec::new(),
            created_at: now(),
            started_at: None,
            finished_at: None,
            source: request.source.describe(),
            run_as: if request.run_as.is_empty() {
                "root".into()
            } else {
                request.run_as.clone()
            },
            message: String::new(),
            idempotency_key: request.idempotency_key.clone(),
            attempt,
            fingerprint: request.fingerprint(),
        }
    }

    /// Records a PENDING run durably, then queues it.
    async fn enqueue(
        &self,
        request: RunRequest,
        attempt: u32,
        message: String,
    ) -> Result<SetupRun, SetupError> {
        let mut run = self.new_run(&request, attempt);
        run.message = if message.is_empty() {
            "waiting for its turn".into()
        } else {
            message
        };
        {
            let mut state = self.lock();
            if state.stopping {
                return Err(SetupError::ShuttingDown);
            }
            if !request.idempotency_key.is_empty()
                && let Some(existing) = state
                    .keys
                    .get(&request.idempotency_key)
                    .and_then(|id| state.runs.get(id))
            {
                return if existing.fingerprint == run.fingerprint {
                    Ok(existing.clone())
                } else {
                    Err(SetupError::IdempotencyConflict {
                        key: request.idempotency_key.clone(),
                        run_id: existing.id.clone(),
                    })
                };
            }
            if request.kind == SetupKind::Creation {
                if let Some(done) = state.succeeded_creation() {
                    return Err(SetupError::CreationAlreadySucceeded {
                        run_id: done.id.clone(),
                    });
                }
                if let Some(busy) = state
                    .runs
                    .values()
                    .find(|r| r.kind == SetupKind::Creation && !r.state.is_terminal())
                {
                    return Err(SetupError::CreationInProgress {
                        run_id: busy.id.clone(),
                        state: busy.state.name(),
                    });
                }
            }
            if state.queue.len() >= self.inner.settings.max_pending {
                return Err(SetupError::QueueFull {
                    limit: self.inner.settings.max_pending as u32,
                });
            }
            // Reserved before the write so that a concurrent request with the
            // same key or a second creation request sees it.
            state.runs.insert(run.id.clone(), run.clone());
            if !run.idempotency_key.is_empty() {
                state
                    .keys
                    .insert(run.idempotency_key.clone(), run.id.clone());
            }
        }
        let mut writes = vec![Write::put(RUNS, &run.id, &run)];
        if run.kind == SetupKind::Creation {
            writes.push(Write::put(REQUESTS, &run.id, &request));
        }
        if let Err(error) = self.inner.wiring.store.apply(writes).await {
            let mut state = self.lock();
            state.runs.remove(&run.id);
            state.keys.remove(&run.idempotency_key);
            return Err(error.into());
        }
        {
            let mut state = self.lock();
            state.requests.insert(run.id.clone(), request);
            state.queue.push_back(run.id.clone());
        }
        self.inner.work.notify_one();
        self.publish(&run);
        self.refresh_condition();
        Ok(run)
    }

    /// One run, with the live tail when it is running.
    pub fn get(&self, id: &str) -> Result<SetupRun, SetupError> {
        let state = self.lock();
        let run = state
            .runs
            .get(id)
            .cloned()
            .ok_or_else(|| SetupError::NotFound { id: id.to_owned() })?;
        Ok(self.with_live_tail(&state, run))
    }

    fn with_live_tail(&self, state: &State, mut run: SetupRun) -> SetupRun {
        if let Some(live) = state.live.get(&run.id) {
            run.log_tail = live.tail_lines();
        }
        run
    }

    /// The latest creation run (with the live tail when it is running).
    pub fn latest_creation(&self) -> Option<SetupRun> {
        let state = self.lock();
        let run = state.latest_creation()?.clone();
        Some(self.with_live_tail(&state, run))
    }

    /// Runs of the given kinds (all when empty), newest first, at most `limit`.
    pub fn list(&self, kinds: &[SetupKind], limit: usize) -> Vec<SetupRun> {
        let state = self.lock();
        let mut runs: Vec<SetupRun> = state
            .runs
            .values()
            .filter(|r| kinds.is_empty() || kinds.contains(&r.kind))
            .cloned()
            .collect();
        runs.sort_by(|a, b| {
            (b.created_at, b.attempt, &b.id).cmp(&(a.created_at, a.attempt, &a.id))
        });
        runs.truncate(limit);
        runs.into_iter()
            .map(|r| self.with_live_tail(&state, r))
            .collect()
    }

    /// A run's output from the start of its log. With `follow`, waits for a
    /// pending run to start and streams until the run has ended or `cancel`.
    pub fn logs(
        &self,
        id: &str,
        follow: bool,
        cancel: CancellationToken,
    ) -> Result<LogStreamOf, SetupError> {
        self.get(id)?;
        let service = self.clone();
        let id = id.to_owned();
        let stream = async_stream::try_stream! {
            let mut changes = service.inner.changes.subscribe();
            loop {
                changes.borrow_and_update();
                let (run, live) = {
                    let state = service.lock();
                    (state.runs.get(&id).cloned(), state.live.get(&id).cloned())
                };
                let Some(run) = run else { break };
                if let Some(live) = live {
                    let pieces = live.reader(follow, cancel.clone());
                    tokio::pin!(pieces);
                    while let Some(piece) = pieces.next().await {
                        yield piece.map_err(|source| SetupError::Log { path: run.log_path.clone(), source })?;
                    }
                    // The log ends just before the run's final state is
                    // recorded; a follower waits for it, so that a client
                    // reading the run next sees how it ended.
                    if follow {
                        loop {
                            let ended = service
                                .lock()
                                .runs
                                .get(&id)
                                .is_none_or(|r| r.state.is_terminal());
                            if ended {
                                break;
                            }
                            tokio::select! {
                                _ = cancel.cancelled() => break,
                                changed = changes.changed() => if changed.is_err() { break },
                            }
                        }
                    }
                    break;
                }
                if run.state.is_terminal() || (run.state == RunState::Running) {
                    // Ended (or between its log's end and its record's): the file is complete.
                    match LogFileReader::open(&run.log_path, None).await {
                        Ok(mut file) => {
                            while let Some(piece) = file.next().await
                                .map_err(|source| SetupError::Log { path: run.log_path.clone(), source })?
                            {
                                yield piece;
                            }
                        }
                        // A run whose failure log could not be written has none.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(source) => Err(SetupError::Log { path: run.log_path.clone(), source })?,
                    }
                    break;
                }
                if !follow {
                    break;
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    changed = changes.changed() => if changed.is_err() { break },
                }
            }
        };
        Ok(Box::pin(stream))
    }

    /// Executes one queued run to its end.
    async fn execute(&self, id: &str, cancel: &CancellationToken) {
        let request = self.lock().requests.remove(id);
        let Some(request) = request else { return };
        let resolved = match self
            .resolve_blocking(request.clone(), Some(id.to_owned()))
            .await
        {
            Ok(resolved) => resolved,
            Err(error) => {
                let message = format!("could not start: {error}");
                let log_path = self.inner.settings.logs_dir.join(format!("{id}.log"));
                self.write_failure_log(&log_path, &message).await;
                self.conclude(id, |run| {
                    run.state = RunState::Failed;
                    run.message = message;
                })
                .await;
                return;
            }
        };
        let log_path = self.inner.settings.logs_dir.join(format!("{id}.log"));
        let writer = match self.create_log(&log_path).await {
            Ok(writer) => writer,
            Err(error) => {
                remove_script_file(resolved.script_file.clone()).await;
                self.conclude(id, |run| {
                    run.state = RunState::Failed;
                    run.message = format!("could not start: {error}");
                })
                .await;
                return;
            }
        };
        let rerun_note = {
            let mut state = self.lock();
            state.live.insert(id.to_owned(), writer.live());
            // "re-run after run X was interrupted" stays in the final message.
            state
                .runs
                .get(id)
                .filter(|r| r.attempt > 1)
                .map(|r| r.message.clone())
        };
        let timeout = request.timeout();
        let running = self
            .update_stored(id, |run| {
                run.state = RunState::Running;
                run.started_at = Some(now());
                run.log_path = log_path.clone();
                run.run_as = resolved.user_name.clone();
                run.message = format!("running (timeout {} s)", timeout.as_secs());
            })
            .await;
        if let Err(error) = running {
            // A script whose start is not on record would go unnoticed by a
            // crash: it does not start.
            let message = format!("could not start: cannot record the run as running: {error}");
            let mut writer = writer;
            writer.note(&message).await;
            writer.finish().await;
            remove_script_file(resolved.script_file.clone()).await;
            self.lock().live.remove(id);
            self.conclude(id, |run| {
                run.state = RunState::Failed;
                run.message = message;
            })
            .await;
            return;
        }

        let (outcome, writer, capture_cut) = self
            .run_process(id, &request, &resolved, writer, cancel)
            .await;
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
        remove_script_file(resolved.script_file.clone()).await;
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
        self.lock().live.remove(id);
        let run = self
            .conclude(id, |run| {
                run.state = state;
                run.exit_code = exit_code;
                run.signal = signal;
                run.log_tail = log_tail;
                run.message = message;
            })
            .await;
        if run.is_some_and(|r| r.kind == SetupKind::Creation && r.state == RunState::Succeeded) {
            self.queue_startup_if_ready().await;
        }
    }

    /// Starts the script, captures its output, waits for its end (timeout
    /// and agent stop included), and drains the output. Returns what
    /// happened, the log writer (unless capture panicked) and whether the
    /// drain had to be cut.
    async fn run_process(
        &self,
        id: &str,
        request: &RunRequest,
        resolved: &Resolved,
        writer: LogWriter,
        cancel: &CancellationToken,
    ) -> (Outcome, Option<LogWriter>, bool) {
        let timeout = request.timeout();
        let (notes, notes_rx) = mpsc::channel(32);
        let stop_capture = CancellationToken::new();
        let _ = notes
            .send(format!(
                "starting {} script {} ({} argument{}) as {} in {}, timeout {} s",
                request.kind.name(),
                request.source.describe(),
                request.args.len(),
                if request.args.len() == 1 { "" } else { "s" },
                resolved.user_name,
                resolved.launch.working_dir.display(),
                timeout.as_secs()
            ))
            .await;
        let (outcome, capture_task) = match self
            .inner
            .wiring
            .runner
            .start(resolved.launch.clone())
            .await
        {
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
                    .supervise(id, process.as_mut(), &notes, timeout, cancel)
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
    async fn write_failure_log(&self, path: &std::path::Path, message: &str) {
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

    async fn create_log(&self, path: &std::path::Path) -> Result<LogWriter, SetupError> {
        let dir = self.inner.settings.logs_dir.clone();
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
        LogWriter::create(path, self.inner.settings.limits)
            .await
            .map_err(err)
    }

    /// Waits for the script's end, enforcing the timeout and the agent's stop.
    async fn supervise(
        &self,
        id: &str,
        process: &mut dyn ScriptProcess,
        notes: &mpsc::Sender<String>,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Outcome {
        let grace = self.inner.settings.launch.kill_grace;
        let mut outcome = Outcome::default();
        let deadline = tokio::time::sleep(timeout);
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
                _ = cancel.cancelled(), if !stopping => {
                    stopping = true;
                    outcome.interrupted = true;
                    process.terminate();
                    note("the agent is stopping: stopping the script's process tree".into()).await;
                    // Recorded now: the agent's shutdown grace may end before
                    // the tree is gone (the supervisor finishes the job).
                    self.update(id, |run| {
                        run.state = RunState::Interrupted;
                        run.finished_at = Some(now());
                        run.message = "interrupted: the agent stopped while the script was running".into();
                    }).await;
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
        if outcome.exit.is_none() && outcome.spawn_failed.is_none() && !outcome.lost {
            let hit = process.kill().await;
            note(format!(
                "the script's supervisor ended without reporting the script's exit; SIGKILLed {hit} marked process(es)"
            ))
            .await;
            outcome.lost = true;
        }
        outcome
    }

    /// Stores the run with `change` applied and only then applies it in
    /// memory and publishes it: for changes that must be on record before
    /// they are acted on (RUNNING). On a store error nothing changes.
    async fn update_stored(
        &self,
        id: &str,
        change: impl FnOnce(&mut SetupRun),
    ) -> Result<(), SetupError> {
        self.change_run(id, change, true).await.map(|_| ())
    }

    /// Applies `change` to a run: stores it, then shows it (memory, event,
    /// condition), so that nothing is shown before it is on record. Returns
    /// the run after the change. A store error is logged and the change is
    /// shown all the same: the run goes on, and the next start sees the last
    /// state stored. [`Self::update_stored`] is for changes that must not.
    async fn update(&self, id: &str, change: impl FnOnce(&mut SetupRun)) -> Option<SetupRun> {
        self.change_run(id, change, false).await.ok().flatten()
    }

    async fn change_run(
        &self,
        id: &str,
        change: impl FnOnce(&mut SetupRun),
        strict: bool,
    ) -> Result<Option<SetupRun>, SetupError> {
        let Some(mut run) = self.lock().runs.get(id).cloned() else {
            return Ok(None);
        };
        change(&mut run);
        if let Err(error) = self
            .inner
            .wiring
            .store
            .apply(vec![Write::put(RUNS, &run.id, &run)])
            .await
        {
            if strict {
                return Err(error.into());
            }
            tracing::error!(run = %run.id, %error, "cannot record a setup run's state");
        }
        {
            // The run and the condition change together: no reader sees one
            // without the other.
            let mut state = self.lock();
            match state.runs.get_mut(id) {
                Some(slot) => *slot = run.clone(),
                None => return Ok(None),
            }
            self.show_condition(&state);
        }
        self.publish(&run);
        Ok(Some(run))
    }

    /// Ends a run: sets `finished_at`, applies `change`, persists, prunes.
    async fn conclude(&self, id: &str, change: impl FnOnce(&mut SetupRun)) -> Option<SetupRun> {
        let run = self
            .update(id, |run| {
                run.finished_at = Some(now());
                change(run);
            })
            .await;
        if let Some(run) = &run {
            match run.state {
                RunState::Succeeded => {
                    tracing::info!(run = %run.id, kind = run.kind.name(), source = %run.source, "setup script succeeded")
                }
                _ => {
                    tracing::warn!(run = %run.id, kind = run.kind.name(), source = %run.source, state = run.state.name(), message = %run.message, log = %run.log_path.display(), "setup script did not succeed")
                }
            }
        }
        self.prune().await;
        run
    }

    /// Deletes the oldest finished runs beyond `keep_runs`, with their logs;
    /// the latest creation run is always kept.
    async fn prune(&self) {
        let victims: Vec<SetupRun> = {
            let mut state = self.lock();
            let keep_creation = state.latest_creation().map(|r| r.id.clone());
            let mut finished: Vec<&SetupRun> = state
                .runs
                .values()
                .filter(|r| r.state.is_terminal() && Some(&r.id) != keep_creation.as_ref())
                .collect();
            if finished.len() <= self.inner.settings.keep_runs {
                return;
            }
            finished.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.attempt)));
            let ids: Vec<String> = finished[self.inner.settings.keep_runs..]
                .iter()
                .map(|r| r.id.clone())
                .collect();
            ids.iter()
                .filter_map(|id| {
                    let run = state.runs.remove(id)?;
                    if state.keys.get(&run.idempotency_key) == Some(&run.id) {
                        state.keys.remove(&run.idempotency_key);
                    }
                    Some(run)
                })
                .collect()
        };
        let writes = victims
            .iter()
            .flat_map(|r| {
                [
                    Write::Delete(RUNS, r.id.clone()),
                    Write::Delete(REQUESTS, r.id.clone()),
                ]
            })
            .collect();
        if let Err(error) = self.inner.wiring.store.apply(writes).await {
            tracing::warn!(%error, "cannot delete old setup runs");
        }
        let logs: Vec<PathBuf> = victims.into_iter().map(|r| r.log_path).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for path in logs {
                let _ = std::fs::remove_file(path);
            }
        })
        .await;
    }

    fn publish(&self, run: &SetupRun) {
        self.inner
            .wiring
            .events
            .publish(EventPayload::Setup(Box::new(run.clone())));
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Sets the setup condition and the job queue hold from the runs.
    fn refresh_condition(&self) {
        let state = self.lock();
        self.show_condition(&state);
    }

    /// [`Self::refresh_condition`] with the state already locked.
    fn show_condition(&self, state: &State) {
        let (condition, message) = condition(state, &self.inner.settings);
        self.inner
            .wiring
            .health
            .set(Subsystem::Setup, condition, message);
        match gate_reason(state, &self.inner.settings) {
            Some(reason) => self.inner.wiring.admission.hold(GATE_HOLDER, reason),
            None => self.inner.wiring.admission.release(GATE_HOLDER),
        }
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

/// Decides at open what the creation script needs: a planned run, or why it
/// will not run by itself.
fn plan_creation(
    state: &State,
    settings: &Settings,
    store: &Store,
) -> (Option<PlannedCreation>, Option<String>) {
    if state.succeeded_creation().is_some() {
        return (None, None);
    }
    let declared = settings.declared_creation();
    match state.latest_creation() {
        None => (
            declared.map(|script| PlannedCreation {
                request: script.request(),
                attempt: 1,
                message: String::new(),
            }),
            None,
        ),
        Some(last)
            if last.state == RunState::Interrupted && last.attempt < MAX_CREATION_ATTEMPTS =>
        {
            let stored = store.get::<RunRequest>(REQUESTS, &last.id).ok().flatten();
            match stored.or_else(|| declared.map(SetupScriptConfig::request)) {
                Some(request) => (
                    Some(PlannedCreation {
                        request,
                        attempt: last.attempt + 1,
                        message: format!("re-run after run {} was interrupted", last.id),
                    }),
                    None,
                ),
                None => (
                    None,
                    Some(format!(
                        "run {} was interrupted and its request is lost",
                        last.id
                    )),
                ),
            }
        }
        Some(last) if last.state == RunState::Interrupted => (
            None,
            Some(format!(
                "interrupted {} times (last run {}); not re-run again by itself",
                last.attempt, last.id
            )),
        ),
        Some(_) => (None, None),
    }
}

/// Why the job queue is held, when it is.
fn gate_reason(state: &State, settings: &Settings) -> Option<String> {
    if !settings.gate_jobs || state.succeeded_creation().is_some() {
        return None;
    }
    match state.latest_creation() {
        Some(run) => Some(format!(
            "the creation script has not succeeded (run {} {})",
            run.id,
            run.state.name()
        )),
        None if state.planned_creation.is_some() || settings.declared_creation().is_some() => {
            Some("the creation script has not run yet".into())
        }
        None => None,
    }
}

/// The setup condition from the runs.
fn condition(state: &State, settings: &Settings) -> (ConditionState, String) {
    let mut parts = Vec::new();
    if let Some(done) = state.succeeded_creation() {
        parts.push(format!("creation script succeeded (run {})", done.id));
    } else if let Some(plan) = &state.planned_creation {
        return (
            ConditionState::Unknown,
            if plan.attempt > 1 {
                format!("creation script will run again: {}", plan.message)
            } else {
                "creation script not run yet".into()
            },
        );
    } else if let Some(last) = state.latest_creation() {
        match last.state {
            RunState::Pending => {
                return (
                    ConditionState::Unknown,
                    format!("creation script pending (run {})", last.id),
                );
            }
            RunState::Running => {
                return (
                    ConditionState::Unknown,
                    format!("creation script running (run {})", last.id),
                );
            }
            _ => {
                let mut message = format!(
                    "creation script {}: {} (run {}, log {})",
                    last.state.name(),
                    last.message,
                    last.id,
                    last.log_path.display()
                );
                if let Some(why) = &state.creation_blocked {
                    message.push_str(&format!("; {why}"));
                }
                let tail = last
                    .log_tail
                    .iter()
                    .rev()
                    .take(CONDITION_TAIL_LINES)
                    .rev()
                    .cloned()
                    .collect::<Vec<_>>();
                if !tail.is_empty() {
                    message.push_str(&format!("; last output: {}", tail.join(" | ")));
                }
                return (ConditionState::Failed, message);
            }
        }
    } else if settings.declared_creation().is_some() {
        return (
            ConditionState::Unknown,
            "creation script not run yet".into(),
        );
    }

    let startup: Vec<&SetupRun> = state
        .startup_runs
        .iter()
        .filter_map(|id| state.runs.get(id))
        .collect();
    if let Some(bad) = startup
        .iter()
        .find(|r| r.state.is_terminal() && r.state != RunState::Succeeded)
    {
        return (
            ConditionState::Degraded,
            format!(
                "startup script {} {}: {} (run {}, log {})",
                bad.source,
                bad.state.name(),
                bad.message,
                bad.id,
                bad.log_path.display()
            ),
        );
    }
    let waiting = startup.iter().filter(|r| !r.state.is_terminal()).count();
    if waiting > 0 {
        return (
            ConditionState::Unknown,
            format!(
                "startup scripts running: {} of {} done",
                startup.len() - waiting,
                startup.len()
            ),
        );
    }
    if !startup.is_empty() {
        parts.push(format!("{} startup script(s) succeeded", startup.len()));
    }
    if parts.is_empty() {
        parts.push("no setup scripts declared".into());
    }
    (ConditionState::Ok, parts.join("; "))
}

#[cfg(test)]
mod tests;

//! [`SetupScripts`]: the handle and the queue. Accepts runs, queues them,
//! hands them one at a time to `execute`, keeps their records (in
//! memory and in the store), and reports through events, the setup condition
//! and the job queue's admission gate. What those say is decided by
//! `creation`.
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

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Notify, watch};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::accounts::Accounts;
use super::creation;
use super::execute::Executor;
use super::logfile::{LogFileReader, LogPiece};
use super::records::{self, Records, State, now};
use super::request;
use super::resolve;
use super::runner::ProcessRunner;
use super::settings::Settings;
use super::{RunRequest, RunState, SetupError, SetupKind, SetupRun};
use crate::admission::AdmissionGate;
use crate::events::EventBus;
use crate::health::Health;
use crate::store::Store;

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
    /// The runs and the queue.
    records: Records,
    work: Notify,
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

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

impl SetupScripts {
    /// Loads past runs, marks the ones cut short by the last agent as
    /// interrupted, plans the creation script and sets the condition and the
    /// job queue hold. Reads the store inline (call before serving).
    pub fn open(settings: Settings, wiring: Wiring) -> Result<Self, SetupError> {
        let mut state = State::default();
        let adopts = wiring.runner.outlives_agent();
        for (id, mut run) in records::load(&wiring.store)? {
            if adopts && !run.state.is_terminal() {
                // Its transient service may still run: decided at recovery.
                state.adoptable.push(id.clone());
            } else if creation::interrupt_if_unfinished(&mut run, now()) {
                state.stale.push(id.clone());
            }
            if !run.idempotency_key.is_empty() {
                state.keys.insert(run.idempotency_key.clone(), id.clone());
            }
            state.ledger.runs.insert(id, run);
        }
        let (planned, blocked) = state.ledger.plan_creation(&settings.declared, |id| {
            records::stored_request(&wiring.store, id)
        });
        state.ledger.planned_creation = planned;
        state.ledger.creation_blocked = blocked;
        if let Some(why) = wiring.store.history_lost(records::RUNS) {
            state.ledger.hold_creation(&why);
        }
        let records = Records::new(
            state,
            &settings,
            wiring.store.clone(),
            wiring.events.clone(),
            wiring.health.clone(),
            wiring.admission.clone(),
        );
        let service = Self {
            inner: Arc::new(Inner {
                settings,
                wiring,
                records,
                work: Notify::new(),
                recovered: watch::channel(false).0,
            }),
        };
        service.inner.records.refresh_condition();
        Ok(service)
    }

    /// Waits until the start-up work (recovery, queuing the declared
    /// scripts) is done.
    pub async fn recovered(&self) {
        let mut recovered = self.inner.recovered.subscribe();
        let _ = recovered.wait_for(|done| *done).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.records.lock()
    }

    /// Recovers, then executes queued runs one at a time until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let adopted = self.adopt().await;
        self.recover().await;
        self.inner.recovered.send_replace(true);
        for (id, request, process) in adopted {
            if cancel.is_cancelled() {
                // Left to its unit again; the next agent takes it over.
                break;
            }
            let run = self
                .executor()
                .resume(&self.inner.records, &id, request, process, &cancel)
                .await;
            if run.is_some_and(|r| r.kind == SetupKind::Creation && r.state == RunState::Succeeded)
            {
                self.queue_startup_if_ready().await;
            }
        }
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

    /// With a runner whose scripts outlive the agent: takes over the runs an
    /// earlier agent left RUNNING whose transient service still exists, and
    /// queues again the runs it left PENDING (a restart of the agent is not
    /// a new start of the instance: the batch of startup scripts it began
    /// goes on, and is not queued a second time). A run that cannot be taken
    /// over is INTERRUPTED like on any host, and the creation script is
    /// planned again for it.
    async fn adopt(&self) -> Vec<(String, RunRequest, Box<dyn super::runner::ScriptProcess>)> {
        let mut ids = std::mem::take(&mut self.lock().adoptable);
        if ids.is_empty() {
            return Vec::new();
        }
        {
            let state = self.lock();
            ids.sort_by_key(|id| state.ledger.runs.get(id).map(|r| (r.created_at, r.attempt)));
        }
        let mut adopted = Vec::new();
        let mut creation_interrupted = false;
        for id in ids {
            let Some(run) = self.lock().ledger.runs.get(&id).cloned() else {
                continue;
            };
            let request = records::stored_request(&self.inner.wiring.store, &id);
            let taken = match (&request, run.state) {
                (Some(_), RunState::Running) => self.inner.wiring.runner.adopt(&id).await.map(Some),
                (Some(_), _) => Some(None),
                (None, _) => None,
            };
            let mut state = self.lock();
            match (taken, request) {
                (Some(process), Some(request)) => {
                    if run.kind == SetupKind::Startup {
                        state.ledger.startup_queued = true;
                        state.ledger.startup_runs.push(id.clone());
                    }
                    match process {
                        Some(process) => {
                            tracing::info!(run = %id, kind = run.kind.name(), "took over a setup run whose transient service outlived the last agent");
                            adopted.push((id, request, process));
                        }
                        None => {
                            state.requests.insert(id.clone(), request);
                            state.queue.push_back(id);
                        }
                    }
                }
                _ => {
                    if let Some(run) = state.ledger.runs.get_mut(&id)
                        && creation::interrupt_if_unfinished(run, now())
                    {
                        creation_interrupted |= run.kind == SetupKind::Creation;
                        state.stale.push(id);
                    }
                }
            }
        }
        if creation_interrupted {
            let store = self.inner.wiring.store.clone();
            let mut state = self.lock();
            let (planned, blocked) = state
                .ledger
                .plan_creation(&self.inner.settings.declared, |id| {
                    records::stored_request(&store, id)
                });
            state.ledger.planned_creation = planned;
            state.ledger.creation_blocked = blocked;
        }
        if !self.lock().queue.is_empty() {
            self.inner.work.notify_one();
        }
        adopted
    }

    /// Persists the interrupted runs, kills their leftovers and queues the
    /// creation and startup scripts.
    async fn recover(&self) {
        let stale: Vec<SetupRun> = {
            let mut state = self.lock();
            let ids = std::mem::take(&mut state.stale);
            ids.iter()
                .filter_map(|id| state.ledger.runs.get(id).cloned())
                .collect()
        };
        if !stale.is_empty() {
            if let Err(error) = self.inner.records.store_all(&stale).await {
                tracing::error!(%error, "cannot record interrupted setup runs");
            }
            for run in &stale {
                tracing::warn!(run = %run.id, kind = run.kind.name(), "setup run was interrupted by the last agent stop or crash");
                self.inner.records.publish(run);
            }
            let ids: Vec<String> = stale.iter().map(|r| r.id.clone()).collect();
            // The inline scripts of runs cut short were never removed.
            let scripts_dir = self.inner.settings.launch.scripts_dir.clone();
            let scripts: Vec<PathBuf> = ids
                .iter()
                .map(|id| resolve::inline_script_path(&scripts_dir, id))
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
                .ledger
                .runs
                .values()
                .filter(|r| r.state.is_terminal())
                .map(|r| r.id.clone())
                .collect()
        };
        self.inner.wiring.runner.tidy(finished).await;
        let planned = self.lock().ledger.planned_creation.take();
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
        self.inner.records.refresh_condition();
    }

    /// Queues the declared startup scripts once per agent life, when the
    /// creation script (if there is one) has succeeded.
    async fn queue_startup_if_ready(&self) {
        let declared = &self.inner.settings.declared;
        if !self.lock().ledger.take_startup_turn(declared) {
            return;
        }
        for request in creation::startup_requests(declared) {
            match self.enqueue_checked(request, 1, String::new()).await {
                Ok(run) => self.lock().ledger.startup_runs.push(run.id),
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
            Ok(()) => self
                .executor()
                .resolve(request.clone(), None)
                .await
                .map(|_| ()),
            Err(error) => Err(error),
        };
        match checked {
            Ok(()) => self.enqueue(request, attempt, message).await,
            Err(error) => {
                let mut run = self.new_run(&request, attempt);
                run.state = RunState::Failed;
                run.finished_at = Some(now());
                run.message = format!("could not start: {error}");
                self.executor()
                    .write_failure_log(&run.log_path, &run.message)
                    .await;
                self.lock().ledger.runs.insert(run.id.clone(), run.clone());
                self.inner.records.store_new(&run, &request).await?;
                self.inner.records.publish(&run);
                self.inner.records.refresh_condition();
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
        self.executor().resolve(request.clone(), None).await?;
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
            .and_then(|id| state.ledger.runs.get(id))
        else {
            return Ok(None);
        };
        if run.fingerprint == request.fingerprint() {
            Ok(Some(state.with_live_tail(run.clone())))
        } else {
            Err(SetupError::IdempotencyConflict {
                key: request.idempotency_key.clone(),
                run_id: run.id.clone(),
            })
        }
    }

    /// A PENDING run for `request`, not recorded yet.
    fn new_run(&self, request: &RunRequest, attempt: u32) -> SetupRun {
        let id = new_id();
        SetupRun {
            log_path: self.inner.settings.log_path(&id),
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
                    .and_then(|id| state.ledger.runs.get(id))
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
                state.ledger.admit_creation()?;
            }
            if state.queue.len() >= self.inner.settings.max_pending {
                return Err(SetupError::QueueFull {
                    limit: self.inner.settings.max_pending as u32,
                });
            }
            // Reserved before the write so that a concurrent request with the
            // same key or a second creation request sees it.
            state.ledger.runs.insert(run.id.clone(), run.clone());
            if !run.idempotency_key.is_empty() {
                state
                    .keys
                    .insert(run.idempotency_key.clone(), run.id.clone());
            }
        }
        if let Err(error) = self.inner.records.store_new(&run, &request).await {
            let mut state = self.lock();
            state.ledger.runs.remove(&run.id);
            state.keys.remove(&run.idempotency_key);
            return Err(error.into());
        }
        {
            let mut state = self.lock();
            state.requests.insert(run.id.clone(), request);
            state.queue.push_back(run.id.clone());
        }
        self.inner.work.notify_one();
        self.inner.records.publish(&run);
        self.inner.records.refresh_condition();
        Ok(run)
    }

    /// One run, with the live tail when it is running.
    pub fn get(&self, id: &str) -> Result<SetupRun, SetupError> {
        let state = self.lock();
        let run = state
            .ledger
            .runs
            .get(id)
            .cloned()
            .ok_or_else(|| SetupError::NotFound { id: id.to_owned() })?;
        Ok(state.with_live_tail(run))
    }

    /// The latest creation run (with the live tail when it is running).
    pub fn latest_creation(&self) -> Option<SetupRun> {
        let state = self.lock();
        let run = state.ledger.latest_creation()?.clone();
        Some(state.with_live_tail(run))
    }

    /// Runs of the given kinds (all when empty), newest first, at most `limit`.
    pub fn list(&self, kinds: &[SetupKind], limit: usize) -> Vec<SetupRun> {
        let state = self.lock();
        let mut runs: Vec<SetupRun> = state
            .ledger
            .runs
            .values()
            .filter(|r| kinds.is_empty() || kinds.contains(&r.kind))
            .cloned()
            .collect();
        runs.sort_by(|a, b| {
            (b.created_at, b.attempt, &b.id).cmp(&(a.created_at, a.attempt, &a.id))
        });
        runs.truncate(limit);
        runs.into_iter().map(|r| state.with_live_tail(r)).collect()
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
            let mut changes = service.inner.records.changes();
            loop {
                changes.borrow_and_update();
                let (run, live) = {
                    let state = service.lock();
                    (state.ledger.runs.get(&id).cloned(), state.live.get(&id).cloned())
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
                                .ledger
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

    /// The executor of runs, with this service's settings and outside world.
    fn executor(&self) -> Executor<'_> {
        Executor {
            settings: &self.inner.settings,
            runner: self.inner.wiring.runner.as_ref(),
            accounts: &self.inner.wiring.accounts,
        }
    }

    /// Executes one queued run to its end; a creation run that succeeded
    /// lets the startup scripts follow.
    async fn execute(&self, id: &str, cancel: &CancellationToken) {
        let request = self.lock().requests.remove(id);
        let Some(request) = request else { return };
        let run = self
            .executor()
            .execute(&self.inner.records, id, request, cancel)
            .await;
        if run.is_some_and(|r| r.kind == SetupKind::Creation && r.state == RunState::Succeeded) {
            self.queue_startup_if_ready().await;
        }
    }
}

#[cfg(test)]
mod tests;

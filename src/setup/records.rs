//! The table of runs: in memory under one lock (with the queue that
//! [`super::service`] keeps), durable in the store (tables `setup.runs` and
//! `setup.requests`), and shown through events, the setup condition and the
//! job queue's hold. A change of a run is stored first, then shown, and the
//! condition and the hold follow it under the same lock, so that no reader
//! sees one without the other.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

use super::config::SetupScriptConfig;
use super::creation::Ledger;
use super::execute::{Journal, RunEnd};
use super::run_log::LiveLog;
use super::settings::Settings;
use super::{RunRequest, RunState, SetupError, SetupRun};
use crate::admission::AdmissionGate;
use crate::events::{EventBus, EventPayload};
use crate::health::{Health, Subsystem};
use crate::store::{Store, StoreError, Table, Write};

/// Every run, by id.
pub(super) const RUNS: Table = Table("setup.runs");
/// The request of each creation run, so that an interrupted one can run again.
const REQUESTS: Table = Table("setup.requests");
/// The holder name on the admission gate.
const GATE_HOLDER: &str = "setup";

/// Everything under the service's one lock.
#[derive(Default)]
pub(super) struct State {
    /// The runs and what the policy decided about them.
    pub ledger: Ledger,
    /// Ids of PENDING runs, in their order (the service's queue).
    pub queue: VecDeque<String>,
    /// The request of each queued run.
    pub requests: HashMap<String, RunRequest>,
    /// Idempotency key to run id.
    pub keys: HashMap<String, String>,
    /// The live log of the run executing now.
    pub live: HashMap<String, Arc<LiveLog>>,
    /// Runs found PENDING or RUNNING at open, now INTERRUPTED, to persist and
    /// clean up.
    pub stale: Vec<String>,
    /// Runs found PENDING or RUNNING at open when the runner's scripts
    /// outlive the agent: taken over (or queued again) at recovery.
    pub adoptable: Vec<String>,
    /// The executor has stopped: no new run is accepted.
    pub stopping: bool,
}

impl State {
    /// `run` with the live tail when it is running.
    pub fn with_live_tail(&self, mut run: SetupRun) -> SetupRun {
        if let Some(live) = self.live.get(&run.id) {
            run.log_tail = live.tail_lines();
        }
        run
    }
}

/// The runs, where they are kept and where they are shown.
pub(super) struct Records {
    store: Store,
    events: EventBus,
    health: Health,
    admission: AdmissionGate,
    /// `setup.keep_runs`.
    keep_runs: usize,
    /// `setup.gate_jobs`.
    gate_jobs: bool,
    /// `[[setup.scripts]]`, which the condition and the hold look at.
    declared: Vec<SetupScriptConfig>,
    state: Mutex<State>,
    /// Bumped on every change of any run, for readers waiting on a pending run.
    changes: watch::Sender<u64>,
}

/// Every stored run, by id.
pub(super) fn load(store: &Store) -> Result<Vec<(String, SetupRun)>, StoreError> {
    store.scan::<SetupRun>(RUNS)
}

/// The stored request of a creation run, if it can be read.
pub(super) fn stored_request(store: &Store, id: &str) -> Option<RunRequest> {
    store.get::<RunRequest>(REQUESTS, id).ok().flatten()
}

/// The time a run's state changed.
pub(super) fn now() -> SystemTime {
    SystemTime::now()
}

impl Records {
    /// The records of `state`, kept in `store` and shown through `events`,
    /// `health` and `admission`.
    pub fn new(
        state: State,
        settings: &Settings,
        store: Store,
        events: EventBus,
        health: Health,
        admission: AdmissionGate,
    ) -> Self {
        Self {
            store,
            events,
            health,
            admission,
            keep_runs: settings.keep_runs,
            gate_jobs: settings.gate_jobs,
            declared: settings.declared.clone(),
            state: Mutex::new(state),
            changes: watch::channel(0).0,
        }
    }

    /// The state, locked.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every mutation under this lock is a few map operations that leave
        // the state consistent; a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a new run, with its request when it is a creation run (so that
    /// an interrupted one can run again).
    pub async fn store_new(&self, run: &SetupRun, request: &RunRequest) -> Result<(), StoreError> {
        // Every request is kept until its run is pruned: a creation run
        // interrupted runs again from it, and under systemd any run an agent
        // restart cut short is taken over (or queued again) with it.
        let writes = vec![
            Write::put(RUNS, &run.id, run),
            Write::put(REQUESTS, &run.id, request),
        ];
        self.store.apply(writes).await
    }

    /// Stores runs as they are.
    pub async fn store_all(&self, runs: &[SetupRun]) -> Result<(), StoreError> {
        let writes = runs.iter().map(|r| Write::put(RUNS, &r.id, r)).collect();
        self.store.apply(writes).await
    }

    /// Changes whenever any run changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Stores the run with `change` applied and only then applies it in
    /// memory and publishes it: for changes that must be on record before
    /// they are acted on (RUNNING). On a store error nothing changes.
    pub async fn update_stored(
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
    pub async fn update(&self, id: &str, change: impl FnOnce(&mut SetupRun)) -> Option<SetupRun> {
        self.change_run(id, change, false).await.ok().flatten()
    }

    pub async fn change_run(
        &self,
        id: &str,
        change: impl FnOnce(&mut SetupRun),
        strict: bool,
    ) -> Result<Option<SetupRun>, SetupError> {
        let Some(mut run) = self.lock().ledger.runs.get(id).cloned() else {
            return Ok(None);
        };
        change(&mut run);
        if let Err(error) = self
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
            match state.ledger.runs.get_mut(id) {
                Some(slot) => *slot = run.clone(),
                None => return Ok(None),
            }
            self.show_condition(&state);
        }
        self.publish(&run);
        Ok(Some(run))
    }

    /// Ends a run: sets `finished_at`, applies `change`, persists, prunes.
    pub async fn conclude(&self, id: &str, change: impl FnOnce(&mut SetupRun)) -> Option<SetupRun> {
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
    pub async fn prune(&self) {
        let victims: Vec<SetupRun> = {
            let mut state = self.lock();
            let ids = state.ledger.prune_victims(self.keep_runs);
            ids.iter()
                .filter_map(|id| {
                    let run = state.ledger.runs.remove(id)?;
                    if state.keys.get(&run.idempotency_key) == Some(&run.id) {
                        state.keys.remove(&run.idempotency_key);
                    }
                    Some(run)
                })
                .collect()
        };
        if victims.is_empty() {
            return;
        }
        let writes = victims
            .iter()
            .flat_map(|r| {
                [
                    Write::Delete(RUNS, r.id.clone()),
                    Write::Delete(REQUESTS, r.id.clone()),
                ]
            })
            .collect();
        if let Err(error) = self.store.apply(writes).await {
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

    pub fn publish(&self, run: &SetupRun) {
        self.events
            .publish(EventPayload::Setup(Box::new(run.clone())));
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Sets the setup condition and the job queue hold from the runs.
    pub fn refresh_condition(&self) {
        let state = self.lock();
        self.show_condition(&state);
    }

    /// [`Self::refresh_condition`] with the state already locked.
    pub fn show_condition(&self, state: &State) {
        let (condition, message) = state.ledger.condition(&self.declared);
        self.health.set(Subsystem::Setup, condition, message);
        match state.ledger.gate_reason(self.gate_jobs, &self.declared) {
            Some(reason) => self.admission.hold(GATE_HOLDER, reason),
            None => self.admission.release(GATE_HOLDER),
        }
    }
}

/// What an execution reports is recorded like every other change.
#[async_trait::async_trait]
impl Journal for Records {
    fn show_live(&self, id: &str, live: Option<Arc<LiveLog>>) {
        let mut state = self.lock();
        match live {
            Some(live) => state.live.insert(id.to_owned(), live),
            None => state.live.remove(id),
        };
    }

    fn run(&self, id: &str) -> Option<SetupRun> {
        self.lock().ledger.runs.get(id).cloned()
    }

    async fn started(
        &self,
        id: &str,
        log_path: PathBuf,
        run_as: String,
        message: String,
    ) -> Result<(), SetupError> {
        self.update_stored(id, |run| {
            run.state = RunState::Running;
            run.started_at = Some(now());
            run.log_path = log_path;
            run.run_as = run_as;
            run.message = message;
        })
        .await
    }

    async fn interrupted(&self, id: &str, message: String) {
        self.update(id, |run| {
            run.state = RunState::Interrupted;
            run.finished_at = Some(now());
            run.message = message;
        })
        .await;
    }

    async fn ended(&self, id: &str, end: RunEnd) -> Option<SetupRun> {
        self.conclude(id, |run| end.apply(run)).await
    }
}

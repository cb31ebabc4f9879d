//! The job manager's handle (submit, get, list, cancel, logs, slot usage)
//! and what all its parts share. The other parts are `impl JobManager`
//! blocks, one file per duty: `dispatch.rs`, `job_task.rs` (with
//! `capture.rs`), `recovery.rs`, `retention.rs`.
//!
//! Invariants:
//! - A job holds its slots (and GPUs) from the moment it is chosen to start
//!   until its container is gone; the sum never exceeds the capacity.
//! - The store is written before the engine is asked to act (the intent to
//!   start is recorded before the container is created), and the container
//!   name is derived from the job id, so a crash between any two steps is
//!   recovered by looking the container up: no job is lost or run twice.
//! - Only the job's own task moves a started job on; the API only asks it to
//!   (through a cancellation token), so every transition has one writer.
//! - Only a record that is still queued is in the queue.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::SlotUsage;
use super::config::JobsConfig;
use super::engine::ContainerEngine;
use super::job_images::{ImageProvider, ImageState, PullView, RegistryAuth};
use super::job_mounts::{self, MountResolver};
use super::logs::{JobLogs, LogRecord};
use super::record::{JobRecord, JobState};
use super::scheduler;
use super::spec::{self, HostLimits, JobSpec, SpecError};
use super::state::State;
use crate::admission::AdmissionGate;
use crate::events::{EventBus, EventPayload};
use crate::host::Gpu;
use crate::paths::offload::{Offload, OffloadError};
use crate::store::{Store, StoreError, Table, Write};

/// Job records (JSON [`JobRecord`]s), keyed by job id. Public so that the
/// benchmarks can fill a store the way the agent does.
pub const RECORDS: Table = Table("jobs.records");
/// How long CancelJob waits for a running job to end before answering (the
/// README promises an answer within 2 s, even from a hung engine).
const CANCEL_REPLY_WAIT: Duration = Duration::from_secs(1);
/// Longest wait between retries while the engine or the store fails.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Stripes of the per-job save order (jobs sharing a stripe only wait for
/// each other's fsync, they are never reordered).
const SAVE_TURNS: usize = 64;

/// A job request or lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A field of the spec breaks a rule.
    #[error("invalid job spec: {0}")]
    InvalidSpec(#[from] SpecError),
    /// The job asks for GPUs on a host that has none.
    #[error("job {id} asks for {gpus} GPUs but this host has none")]
    NoGpus {
        /// Job id.
        id: String,
        /// GPUs asked for.
        gpus: u32,
    },
    /// The queue is full.
    #[error("the queue is full: {limit} jobs are waiting (jobs.max_queue)")]
    QueueFull {
        /// The limit.
        limit: u32,
    },
    /// No job with that id.
    #[error("no job with id {0:?}")]
    NotFound(String),
    /// A different job already has that id.
    #[error("job {0:?} already exists with a different spec")]
    IdConflict(String),
    /// The store failed (for example, the state filesystem is full).
    #[error("cannot record the job: {0}")]
    Store(#[from] StoreError),
    /// A host path of the spec lies on a filesystem that does not answer.
    #[error("{field}: {source}")]
    HostPathUnanswered {
        /// The field naming the path (`mounts[i].host_path`).
        field: String,
        /// Why there is no answer.
        source: OffloadError,
    },
}

impl From<job_mounts::Refusal> for JobError {
    fn from(refusal: job_mounts::Refusal) -> Self {
        match refusal {
            job_mounts::Refusal::Spec(error) => Self::InvalidSpec(error),
            job_mounts::Refusal::Unanswered { field, source } => {
                Self::HostPathUnanswered { field, source }
            }
        }
    }
}

/// What the manager needs from the rest of the agent.
pub struct JobsDeps {
    /// The container engine.
    pub engine: Arc<dyn ContainerEngine>,
    /// The shared store.
    pub store: Store,
    /// Where transitions are published.
    pub events: EventBus,
    /// Holds placed by disk guard and setup.
    pub admission: AdmissionGate,
    /// Managed mounts.
    pub mounts: Arc<dyn MountResolver>,
    /// Images: whether a job's image is local, pulls, digests.
    pub images: Arc<dyn ImageProvider>,
    /// Directory of job logs.
    pub logs_dir: PathBuf,
    /// Root-only dir of staged binds (`<agent.runtime_dir>/staging/jobs`);
    /// `None`: a host path a user can change is refused instead.
    pub staging_dir: Option<PathBuf>,
    /// Where host paths of specs are opened (shared with the other domains
    /// that open caller-chosen paths).
    pub host_paths: Offload,
    /// Labels the containers.
    pub instance_id: String,
    /// Usable CPU cores.
    pub usable_cores: f64,
    /// Host memory.
    pub memory_bytes: u64,
    /// GPU inventory (filled once discovered).
    pub gpus: watch::Receiver<Vec<Gpu>>,
    /// True once GPU discovery has ended (`gpus` is then the inventory;
    /// before, an empty list means "not known yet", not "none").
    pub gpus_discovered: watch::Receiver<bool>,
    /// Whether the engine answers (from the engine monitor).
    pub engine_up: watch::Receiver<bool>,
    /// The live `[jobs]` section.
    pub config: watch::Receiver<JobsConfig>,
}

/// Filters for listing jobs.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only these states (all when empty).
    pub states: Vec<JobState>,
    /// Only jobs with all these labels.
    pub labels: Vec<(String, String)>,
    /// At most this many.
    pub limit: usize,
}

/// A job with its place in the queue.
#[derive(Debug, Clone)]
pub struct JobView {
    /// The record.
    pub record: JobRecord,
    /// Position in the queue (0 = next), while queued.
    pub queue_position: Option<u32>,
    /// While queued for its image: the pull.
    pub pull: Option<PullView>,
}

/// The job manager. Cheap to clone.
#[derive(Clone)]
pub struct JobManager {
    pub(super) inner: Arc<Inner>,
}

/// What every part of the manager shares (see [`JobsDeps`] for the inputs).
pub(super) struct Inner {
    pub(super) engine: Arc<dyn ContainerEngine>,
    pub(super) store: Store,
    pub(super) events: EventBus,
    pub(super) admission: AdmissionGate,
    pub(super) mounts: Arc<dyn MountResolver>,
    pub(super) images: Arc<dyn ImageProvider>,
    pub(super) logs: JobLogs,
    pub(super) staging_dir: Option<PathBuf>,
    /// Where host paths of specs are opened (they may hang).
    pub(super) host_paths: Offload,
    pub(super) instance_id: String,
    pub(super) usable_cores: f64,
    pub(super) memory_bytes: u64,
    pub(super) gpus: watch::Receiver<Vec<Gpu>>,
    pub(super) engine_up: watch::Receiver<bool>,
    pub(super) config: watch::Receiver<JobsConfig>,
    pub(super) gpus_discovered: watch::Receiver<bool>,
    state: Mutex<State>,
    /// Turns for saving records, striped by job id: the saves of one job
    /// run one at a time (see `persist`).
    save_turns: Vec<tokio::sync::Mutex<()>>,
    /// Wakes the dispatch loop (a job was queued or slots were freed).
    pub(super) wake: Notify,
    /// Containers of this instance that no record owns (`unknown.rs`).
    pub(super) unknown: watch::Sender<Vec<super::state::UnknownContainer>>,
    pub(super) shutdown: CancellationToken,
    pub(super) tasks: TaskTracker,
}

/// Jobs that may still use their staged binds at start: starting or running.
fn manager_live_jobs(inner: &Inner) -> std::collections::HashSet<String> {
    let state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    state
        .jobs
        .values()
        .filter(|r| matches!(r.state, JobState::Starting | JobState::Running))
        .map(|r| r.id().to_owned())
        .collect()
}

impl Inner {
    fn save_turn(&self, id: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut hasher);
        &self.save_turns[(hasher.finish() % SAVE_TURNS as u64) as usize]
    }
}

impl JobManager {
    /// Loads the records from the store and starts the scheduler and the
    /// retention sweeper on `tasks`. Recovery with the engine happens as soon
    /// as the engine answers; until then nothing starts.
    pub fn start(
        deps: JobsDeps,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Self, JobError> {
        let mut state = State::default();
        for (id, record) in deps.store.scan::<JobRecord>(RECORDS)? {
            state.next_seq = state.next_seq.max(record.seq + 1);
            if record.state == JobState::Queued {
                state.enqueue(&record);
            }
            state.jobs.insert(id, record);
        }
        let inner = Arc::new(Inner {
            engine: deps.engine,
            store: deps.store,
            events: deps.events,
            admission: deps.admission,
            mounts: deps.mounts,
            images: deps.images,
            logs: JobLogs::new(deps.logs_dir),
            staging_dir: deps.staging_dir,
            host_paths: deps.host_paths,
            instance_id: deps.instance_id,
            usable_cores: deps.usable_cores,
            memory_bytes: deps.memory_bytes,
            gpus: deps.gpus,
            engine_up: deps.engine_up,
            config: deps.config,
            gpus_discovered: deps.gpus_discovered,
            state: Mutex::new(state),
            save_turns: (0..SAVE_TURNS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            wake: Notify::new(),
            unknown: watch::channel(Vec::new()).0,
            shutdown,
            tasks,
        });
        let live: std::collections::HashSet<String> = manager_live_jobs(&inner);
        let staging_dir = inner.staging_dir.clone();
        inner.tasks.spawn(async move {
            job_mounts::tidy_staged(staging_dir.as_deref(), live).await;
        });
        let manager = Self { inner };
        manager.inner.tasks.spawn(manager.clone().schedule_loop());
        manager.inner.tasks.spawn(manager.clone().retention_loop());
        Ok(manager)
    }

    /// The shared state. Never held across an await.
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves State consistent before any call that
        // could panic, so a poisoned lock is still safe to use.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live `[jobs]` section, as of now.
    pub(super) fn jobs_config(&self) -> JobsConfig {
        self.inner.config.borrow().clone()
    }

    /// Slots in total under the live config.
    pub fn capacity(&self) -> u32 {
        let jobs = self.inner.config.borrow();
        scheduler::capacity(jobs.slots, jobs.slots_per_core, self.inner.usable_cores)
    }

    /// How many jobs are in each state (only states with at least one job),
    /// for metrics: one pass under the lock, no records copied.
    pub fn counts_by_state(&self) -> HashMap<JobState, u64> {
        let state = self.lock();
        let mut counts = HashMap::new();
        for record in state.jobs.values() {
            *counts.entry(record.state).or_insert(0) += 1;
        }
        counts
    }

    /// Slot usage for GetStatus.
    pub fn slot_usage(&self) -> SlotUsage {
        let state = self.lock();
        SlotUsage {
            capacity: self.capacity(),
            in_use: state.slots_in_use,
            queued: u32::try_from(state.queue.len()).unwrap_or(u32::MAX),
            running: u32::try_from(
                state
                    .active
                    .keys()
                    .filter(|id| {
                        state
                            .jobs
                            .get(*id)
                            .is_some_and(|r| r.state == JobState::Running)
                    })
                    .count(),
            )
            .unwrap_or(u32::MAX),
            held_reason: self.inner.admission.held_reason().unwrap_or_default(),
        }
    }

    /// Queues a job and returns it as [`JobManager::get`] would. Idempotent
    /// on the spec's id: the same spec again returns the existing job.
    pub async fn submit(&self, spec: JobSpec) -> Result<JobView, JobError> {
        self.submit_with_auth(spec, None).await
    }

    /// [`JobManager::submit`] with a credential for this job's pull only,
    /// kept in memory while the job is queued and never stored (a repeated
    /// submit of the same job replaces it).
    pub async fn submit_with_auth(
        &self,
        spec: JobSpec,
        auth: Option<RegistryAuth>,
    ) -> Result<JobView, JobError> {
        let config = self.jobs_config();
        // Until discovery has ended the inventory is unknown: a GPU job is
        // queued and judged once it is known (see `schedule`).
        let gpu_count = if *self.inner.gpus_discovered.borrow() {
            u32::try_from(self.inner.gpus.borrow().len()).unwrap_or(u32::MAX)
        } else {
            u32::MAX
        };
        if spec.gpus > 0 && gpu_count == 0 {
            return Err(JobError::NoGpus {
                id: spec.id.clone(),
                gpus: spec.gpus,
            });
        }
        let host = HostLimits {
            capacity: self.capacity(),
            usable_cores: self.inner.usable_cores,
            memory_bytes: self.inner.memory_bytes,
            gpus: gpu_count,
        };
        let spec = spec::validate(spec, &config, host)?;
        job_mounts::check(
            self.inner.mounts.as_ref(),
            &self.inner.host_paths,
            &spec,
            &config.allowed_host_roots,
        )
        .await?;

        let record = {
            let mut state = self.lock();
            if let Some(existing) = state.jobs.get(&spec.id) {
                return if existing.spec == spec {
                    if let Some(auth) = auth
                        && existing.state == JobState::Queued
                    {
                        state.registry_auth.insert(spec.id.clone(), auth);
                    }
                    self.view_of(&state, &spec.id)
                } else {
                    Err(JobError::IdConflict(spec.id))
                };
            }
            if state.queue.len() >= config.max_queue as usize {
                return Err(JobError::QueueFull {
                    limit: config.max_queue,
                });
            }
            let record = JobRecord::queued(spec, state.next_seq);
            state.next_seq += 1;
            if let Some(auth) = auth {
                state.registry_auth.insert(record.id().to_owned(), auth);
            }
            // Visible at once so that a concurrent duplicate submit is
            // answered from it; queued only once it is durable.
            state.jobs.insert(record.id().to_owned(), record.clone());
            record
        };
        let id = record.id();
        if let Err(error) = self.persist(id).await {
            let mut state = self.lock();
            state.jobs.remove(id);
            state.registry_auth.remove(id);
            return Err(error.into());
        }
        self.claim_unknown(id);
        let view = {
            let mut state = self.lock();
            // A cancel that came while the record was being saved has ended
            // it already: a cancelled job must not enter the queue.
            let still_queued = state
                .jobs
                .get(id)
                .is_some_and(|r| r.state == JobState::Queued);
            if still_queued {
                state.enqueue(&record);
            }
            self.view_of(&state, id)?
        };
        if view.record.state == JobState::Queued {
            self.publish(&record);
            self.inner.wake.notify_one();
        }
        Ok(view)
    }

    /// One job.
    pub fn get(&self, id: &str) -> Result<JobView, JobError> {
        self.view_of(&self.lock(), id)
    }

    /// One job with its place in the queue, under the caller's lock.
    fn view_of(&self, state: &State, id: &str) -> Result<JobView, JobError> {
        let record = state
            .jobs
            .get(id)
            .ok_or_else(|| JobError::NotFound(id.to_owned()))?;
        let queue_position = (record.state == JobState::Queued)
            .then(|| state.queue.iter().position(|k| k.id == id))
            .flatten()
            .map(|p| u32::try_from(p).unwrap_or(u32::MAX));
        Ok(self.view(record.clone(), queue_position))
    }

    /// A record as clients see it: a queued job waiting for its image says
    /// so (with the pull), and one held by the admission gate says why,
    /// instead of "waiting for slots".
    fn view(&self, mut record: JobRecord, queue_position: Option<u32>) -> JobView {
        let mut pull = None;
        if record.state == JobState::Queued {
            if let ImageState::Pulling(view) =
                self.inner.images.state(record.id(), &record.spec.image)
            {
                record.reason = view.job_reason(&record.spec.image);
                pull = Some(view);
            }
            if let Some(held) = self.inner.admission.held_reason() {
                record.reason = format!("held: {held}");
            }
        }
        JobView {
            record,
            queue_position,
            pull,
        }
    }

    /// Jobs matching `filter`, newest first.
    pub fn list(&self, filter: &JobFilter) -> Vec<JobView> {
        let state = self.lock();
        let positions: HashMap<&str, u32> = state
            .queue
            .iter()
            .enumerate()
            .map(|(i, k)| (k.id.as_str(), u32::try_from(i).unwrap_or(u32::MAX)))
            .collect();
        let mut matching: Vec<&JobRecord> = state
            .jobs
            .values()
            .filter(|r| filter.states.is_empty() || filter.states.contains(&r.state))
            .filter(|r| {
                filter
                    .labels
                    .iter()
                    .all(|(k, v)| r.spec.labels.get(k) == Some(v))
            })
            .collect();
        matching.sort_by_key(|r| std::cmp::Reverse(r.seq));
        let limit = if filter.limit == 0 {
            1000
        } else {
            filter.limit
        };
        matching
            .into_iter()
            .take(limit)
            .map(|r| self.view(r.clone(), positions.get(r.id()).copied()))
            .collect()
    }

    /// True when the job has reached a final state. An unknown id is not
    /// finished: its record may have been lost with a damaged store, and
    /// its container is then one of unknown origin (`unknown.rs`), never
    /// removed by an automatic step (retention removes the containers that
    /// `keep_containers` kept before it forgets their records).
    pub fn is_finished(&self, id: &str) -> bool {
        self.lock().jobs.get(id).is_some_and(|r| r.state.is_final())
    }

    /// Cancels a job; idempotent. A queued job leaves the queue at once. A
    /// started job (or one an agent restart has not picked up again yet) is
    /// marked, durably, as asked to cancel: its own task (or the
    /// reconciliation that adopts it) stops it; the reply waits briefly for
    /// that, never for the engine.
    pub async fn cancel(&self, id: &str) -> Result<JobRecord, JobError> {
        enum Next {
            Done(Box<JobRecord>),
            Dequeued(Box<JobRecord>),
            Asked(Option<CancellationToken>),
        }
        let next = {
            let mut state = self.lock();
            let record = state
                .jobs
                .get(id)
                .cloned()
                .ok_or_else(|| JobError::NotFound(id.to_owned()))?;
            match record.state {
                s if s.is_final() => Next::Done(Box::new(record)),
                JobState::Queued => {
                    let mut cancelled = record.clone();
                    cancelled.transition(JobState::Cancelled, "cancelled while queued");
                    state.dequeue(&record);
                    state.jobs.insert(id.to_owned(), cancelled);
                    Next::Dequeued(Box::new(record))
                }
                _ => {
                    // Starting or running: only the job's task moves it on.
                    // Without a task yet (after a restart, before the engine
                    // answered) the mark alone is what reconciliation honours.
                    let token = state.active.get(id).map(|a| a.cancel.clone());
                    if let Some(r) = state.jobs.get_mut(id) {
                        r.cancel_requested = true;
                    }
                    Next::Asked(token)
                }
            }
        };
        match next {
            Next::Done(record) => Ok(*record),
            Next::Dequeued(before) => {
                if let Err(error) = self.persist(id).await {
                    // Undo: a cancel that is not durable would be undone by a
                    // crash and the job would run after all.
                    let mut state = self.lock();
                    state.jobs.insert(id.to_owned(), (*before).clone());
                    state.enqueue(&before);
                    return Err(error.into());
                }
                let cancelled = self.get(id)?.record;
                self.publish(&cancelled);
                self.inner.wake.notify_one();
                Ok(cancelled)
            }
            Next::Asked(token) => {
                let signalled = token.is_some();
                if let Some(token) = token {
                    token.cancel();
                }
                // Durable so that a job adopted after a crash is still cancelled.
                let saved = self.persist(id).await;
                if let Err(error) = &saved {
                    tracing::error!(
                        job = id, %error,
                        "cannot record the cancel request; it holds only until the agent restarts"
                    );
                }
                if !signalled {
                    // No task to wait for: reconciliation acts on the mark
                    // once the engine answers.
                    let current = self.get(id)?.record;
                    return saved.map(|()| current).map_err(JobError::from);
                }
                let deadline = tokio::time::Instant::now() + CANCEL_REPLY_WAIT;
                loop {
                    let current = self.get(id)?.record;
                    if current.state.is_final() {
                        // The final state is recorded by the job's task
                        // whatever became of the request's own save.
                        return Ok(current);
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return saved.map(|()| current).map_err(JobError::from);
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }
    }

    /// A job's captured output; with `follow`, until the job has ended.
    pub fn logs(
        &self,
        id: &str,
        follow: bool,
    ) -> Result<impl Stream<Item = std::io::Result<LogRecord>> + Send + 'static, JobError> {
        if !self.lock().jobs.contains_key(id) {
            return Err(JobError::NotFound(id.to_owned()));
        }
        let manager = self.clone();
        let job = id.to_owned();
        let shutdown = self.inner.shutdown.clone();
        Ok(self.inner.logs.read(id, follow, move || {
            shutdown.is_cancelled()
                || manager
                    .lock()
                    .jobs
                    .get(&job)
                    .is_none_or(|r| r.state.is_final())
        }))
    }

    /// Saves the job's record as it is in memory when this save's turn
    /// comes. The saves of one job take turns, so a save that started later
    /// never lands before an earlier one: the store cannot end on an older
    /// state than memory (each `Store::apply` runs in its own blocking task,
    /// in no particular order). A job no longer in memory (swept) is not
    /// written back.
    pub(super) async fn persist(&self, id: &str) -> Result<(), StoreError> {
        let _turn = self.inner.save_turn(id).lock().await;
        let Some(record) = self.lock().jobs.get(id).cloned() else {
            return Ok(());
        };
        self.inner
            .store
            .apply(vec![Write::put(RECORDS, id, &record)])
            .await
    }

    /// Persists, retrying with backoff until it works or the agent stops.
    /// Used for transitions that must not be lost (the engine already acted).
    pub(super) async fn persist_until_done(&self, id: &str) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.persist(id).await {
                Ok(()) => return true,
                Err(error) => {
                    tracing::error!(job = id, %error, "cannot record job state; retrying");
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Tells watchers (and the log) of a job's new state.
    pub(super) fn publish(&self, record: &JobRecord) {
        tracing::info!(job = record.id(), state = record.state.name(), reason = %record.reason, "job state");
        self.inner
            .events
            .publish(EventPayload::Job(Box::new(record.clone())));
    }

    /// Applies a transition to the in-memory record and returns the result,
    /// or `None` when the state machine forbids it.
    pub(super) fn transition(
        &self,
        id: &str,
        next: JobState,
        reason: impl Into<String>,
        edit: impl FnOnce(&mut JobRecord),
    ) -> Option<JobRecord> {
        let mut state = self.lock();
        let record = state.jobs.get_mut(id)?;
        if !record.transition(next, reason) {
            return None;
        }
        edit(record);
        Some(record.clone())
    }
}

#[cfg(test)]
mod tests;

/// Apps hold job slots through the manager's state, as started jobs do
/// (under the holder name `app:NAME`, which no job id can take), so that
/// `slot_usage` and the scheduler count them.
impl crate::apps::SlotPool for JobManager {
    fn try_hold(&self, holder: &str, slots: u32) -> bool {
        let capacity = self.capacity();
        let mut state = self.lock();
        if state.holds(holder) {
            return true;
        }
        if capacity.saturating_sub(state.slots_in_use) < slots {
            return false;
        }
        state.reserve(holder, slots, Vec::new());
        true
    }

    fn hold_anyway(&self, holder: &str, slots: u32) {
        let mut state = self.lock();
        if !state.holds(holder) {
            state.reserve(holder, slots, Vec::new());
        }
    }

    fn release(&self, holder: &str) {
        let held = {
            let mut state = self.lock();
            let held = state.holds(holder);
            state.release(holder);
            held
        };
        if held {
            self.inner.wake.notify_one();
        }
    }
}

//! The job manager: accepts jobs, keeps the queue and the slots, runs each
//! job's container from creation to removal, and recovers after a crash.
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

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::JobsConfig;
use super::engine::{Bind, ContainerEngine, ContainerSpec, EngineError};
use super::logs::{JobLogs, LogRecord};
use super::record::{JobRecord, JobState};
use super::scheduler::{self, Candidate, Free};
use super::spec::{self, HostLimits, JobSpec, MountSource, SpecError};
use super::{LABEL_INSTANCE, LABEL_JOB, SlotUsage};
use crate::admission::AdmissionGate;
use crate::events::{EventBus, EventPayload};
use crate::host::Gpu;
use crate::store::{Store, StoreError, Table, Write};

/// Job records (JSON [`JobRecord`]s), keyed by job id. Public so that the
/// benchmarks can fill a store the way the agent does.
pub const RECORDS: Table = Table("jobs.records");
/// How long CancelJob waits for a running job to end before answering (the
/// README promises an answer within 2 s, even from a hung engine).
const CANCEL_REPLY_WAIT: Duration = Duration::from_secs(1);
/// Looks at a SIGKILLed, memory-limited container for the engine's OOM flag,
/// and how far apart (see `oom_killed`): 3 s in all, as 1 s was once too
/// short on a loaded machine (cgroup v1, Docker 20.10).
const OOM_LOOKS: u32 = 15;
const OOM_LOOK_INTERVAL: Duration = Duration::from_millis(200);
/// How long the final state waits for the output capture to drain.
const CAPTURE_DRAIN: Duration = Duration::from_secs(60);
/// Longest wait between retries while the engine or the store fails.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
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
}

/// How a job refers to a managed mount, as the mounts module answers.
#[derive(Debug, Clone, PartialEq)]
pub enum MountResolution {
    /// No mount with that name.
    Unknown,
    /// Known but not usable now (the job waits).
    Unavailable(String),
    /// Mounted at this host path.
    Ready(PathBuf),
}

/// Looks managed mounts up by name.
#[async_trait::async_trait]
pub trait MountResolver: Send + Sync + 'static {
    /// The mount's state as last seen. Must answer from memory (it is
    /// called while the scheduler holds its lock).
    fn resolve(&self, name: &str) -> MountResolution;

    /// Checks, just before a job's container is created, that the mount
    /// still answers: it may have gone stale since its last health check,
    /// and a job started on a dead mount fails at once (and the next one
    /// too) instead of waiting for the repair.
    async fn verify(&self, name: &str) -> MountResolution {
        self.resolve(name)
    }

    /// How many times the mount was repaired (remounted) so far; a change
    /// while a job ran means the job saw it die.
    fn repairs(&self, _name: &str) -> u32 {
        0
    }
}

/// A resolver for a build without managed mounts: every name is unknown.
pub struct NoManagedMounts;

impl MountResolver for NoManagedMounts {
    fn resolve(&self, _: &str) -> MountResolution {
        MountResolution::Unknown
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
    /// Directory of job logs.
    pub logs_dir: PathBuf,
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
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct QueueKey {
    /// Negated so that higher priorities sort first.
    neg_priority: i64,
    seq: u64,
    id: String,
}

impl QueueKey {
    fn of(record: &JobRecord) -> Self {
        Self {
            neg_priority: -i64::from(record.spec.priority),
            seq: record.seq,
            id: record.spec.id.clone(),
        }
    }
}

struct Active {
    slots: u32,
    gpus: Vec<u32>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, JobRecord>,
    queue: BTreeSet<QueueKey>,
    queued_since: HashMap<String, tokio::time::Instant>,
    active: HashMap<String, Active>,
    slots_in_use: u32,
    next_seq: u64,
    reconciled: bool,
    /// The capacity and GPU inventory the queue was last checked against
    /// for jobs that can never start.
    limits_checked: Option<(u32, Option<usize>)>,
}

impl State {
    fn gpus_in_use(&self) -> BTreeSet<u32> {
        self.active
            .values()
            .flat_map(|a| a.gpus.iter().copied())
            .collect()
    }

    fn enqueue(&mut self, record: &JobRecord) {
        self.queue.insert(QueueKey::of(record));
        self.queued_since
            .entry(record.spec.id.clone())
            .or_insert_with(tokio::time::Instant::now);
    }

    fn dequeue(&mut self, record: &JobRecord) {
        self.queue.remove(&QueueKey::of(record));
        self.queued_since.remove(record.id());
    }

    fn release(&mut self, id: &str) {
        if let Some(active) = self.active.remove(id) {
            self.slots_in_use = self.slots_in_use.saturating_sub(active.slots);
        }
    }

    fn reserve(&mut self, id: &str, slots: u32, gpus: Vec<u32>) -> CancellationToken {
        let cancel = CancellationToken::new();
        self.slots_in_use += slots;
        self.active.insert(
            id.to_owned(),
            Active {
                slots,
                gpus,
                cancel: cancel.clone(),
            },
        );
        cancel
    }
}

/// How a job's task begins.
enum Launch {
    /// Create and start a new container.
    Fresh,
    /// Start a container that was created but never started.
    StartExisting(String),
    /// Supervise a container that already ran or runs.
    Adopt(String),
}

/// How supervision ended.
enum Outcome {
    Exited(i64),
    Lost,
    ShuttingDown,
}

/// The job manager. Cheap to clone.
#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<dyn ContainerEngine>,
    store: Store,
    events: EventBus,
    admission: AdmissionGate,
    mounts: Arc<dyn MountResolver>,
    logs: JobLogs,
    instance_id: String,
    usable_cores: f64,
    memory_bytes: u64,
    gpus: watch::Receiver<Vec<Gpu>>,
    engine_up: watch::Receiver<bool>,
    config: watch::Receiver<JobsConfig>,
    gpus_discovered: watch::Receiver<bool>,
    state: Mutex<State>,
    /// Turns for saving records, striped by job id: the saves of one job
    /// run one at a time (see `persist`).
    save_turns: Vec<tokio::sync::Mutex<()>>,
    wake: Notify,
    shutdown: CancellationToken,
    tasks: TaskTracker,
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
            logs: JobLogs::new(deps.logs_dir),
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
            shutdown,
            tasks,
        });
        let manager = Self { inner };
        manager.inner.tasks.spawn(manager.clone().schedule_loop());
        manager.inner.tasks.spawn(manager.clone().retention_loop());
        Ok(manager)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves State consistent before any call that
        // could panic, so a poisoned lock is still safe to use.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn jobs_config(&self) -> JobsConfig {
        self.inner.config.borrow().clone()
    }

    /// Under disk pressure, logs of jobs finished longer ago than this go.
    pub fn log_retention_seconds(&self) -> u64 {
        self.inner.config.borrow().log_retention_seconds
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

    /// Queues a job. Idempotent on the spec's id.
    pub async fn submit(&self, spec: JobSpec) -> Result<JobRecord, JobError> {
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
        self.check_mounts(&spec, &config).await?;

        let record = {
            let mut state = self.lock();
            if let Some(existing) = state.jobs.get(&spec.id) {
                return if existing.spec == spec {
                    Ok(existing.clone())
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
            // Visible at once so that a concurrent duplicate submit is
            // answered from it; queued only once it is durable.
            state.jobs.insert(record.id().to_owned(), record.clone());
            record
        };
        if let Err(error) = self.persist(record.id()).await {
            self.lock().jobs.remove(record.id());
            return Err(error.into());
        }
        self.lock().enqueue(&record);
        self.publish(&record);
        self.inner.wake.notify_one();
        Ok(record)
    }

    /// Host paths must resolve under an allowed root; managed mounts must exist.
    async fn check_mounts(&self, spec: &JobSpec, config: &JobsConfig) -> Result<(), JobError> {
        for (i, mount) in spec.mounts.iter().enumerate() {
            match &mount.source {
                MountSource::Managed(name) => {
                    if self.inner.mounts.resolve(name) == MountResolution::Unknown {
                        return Err(SpecError {
                            field: format!("mounts[{i}].managed"),
                            problem: format!("no managed mount named {name:?}"),
                        }
                        .into());
                    }
                }
                MountSource::HostPath(path) => {
                    let field = format!("mounts[{i}].host_path");
                    let path = path.clone();
                    let roots = config.allowed_host_roots.clone();
                    tokio::task::spawn_blocking(move || {
                        spec::confine_host_path(&field, &path, &roots)
                    })
                    .await
                    .map_err(|e| SpecError {
                        field: format!("mounts[{i}].host_path"),
                        problem: format!("cannot be checked: {e}"),
                    })??;
                }
            }
        }
        Ok(())
    }

    /// One job.
    pub fn get(&self, id: &str) -> Result<JobView, JobError> {
        let state = self.lock();
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

    /// A record as clients see it: a queued job held by the admission gate
    /// says why instead of "waiting for slots".
    fn view(&self, mut record: JobRecord, queue_position: Option<u32>) -> JobView {
        if record.state == JobState::Queued
            && let Some(held) = self.inner.admission.held_reason()
        {
            record.reason = format!("held: {held}");
        }
        JobView {
            record,
            queue_position,
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

    /// True when the job has reached a final state, or is no longer known:
    /// every job that has not ended is kept in memory from submit (or load)
    /// to its end, so an unknown id is one that retention has removed — its
    /// container, kept by `keep_containers`, is finished too.
    pub fn is_finished(&self, id: &str) -> bool {
        self.lock().jobs.get(id).is_none_or(|r| r.state.is_final())
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

    /// Bytes of logs of jobs that finished before `cutoff`, and removes them
    /// unless `dry_run` (for the disk guard's reclaim step).
    pub async fn reclaim_logs(&self, older_than: Duration, dry_run: bool) -> (u64, u32) {
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let ids: Vec<String> = self
            .lock()
            .jobs
            .values()
            .filter(|r| r.state.is_final() && r.finished_at.is_some_and(|t| t < cutoff))
            .map(|r| r.id().to_owned())
            .collect();
        let (mut bytes, mut items) = (0, 0);
        for id in ids {
            let size = self.inner.logs.size(&id).await;
            if size == 0 {
                continue;
            }
            bytes += size;
            items += 1;
            if !dry_run {
                self.inner.logs.remove(&id).await;
            }
        }
        (bytes, items)
    }

    /// Saves the job's record as it is in memory when this save's turn
    /// comes. The saves of one job take turns, so a save that started later
    /// never lands before an earlier one: the store cannot end on an older
    /// state than memory (each `Store::apply` runs in its own blocking task,
    /// in no particular order). A job no longer in memory (swept) is not
    /// written back.
    async fn persist(&self, id: &str) -> Result<(), StoreError> {
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
    async fn persist_until_done(&self, id: &str) -> bool {
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

    fn publish(&self, record: &JobRecord) {
        tracing::info!(job = record.id(), state = record.state.name(), reason = %record.reason, "job state");
        self.inner
            .events
            .publish(EventPayload::Job(Box::new(record.clone())));
    }

    /// Applies a transition to the in-memory record and returns the result,
    /// or `None` when the state machine forbids it.
    fn transition(
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

    fn container_name(&self, id: &str) -> String {
        let short: String = self.inner.instance_id.chars().take(12).collect();
        format!("ia-{short}-{id}")
    }

    async fn schedule_loop(self) {
        let mut admission = self.inner.admission.subscribe();
        let mut engine_up = self.inner.engine_up.clone();
        let mut config = self.inner.config.clone();
        let mut gpus_discovered = self.inner.gpus_discovered.clone();
        let mut backoff = Duration::from_secs(1);
        loop {
            if !self.lock().reconciled && *engine_up.borrow() {
                match self.reconcile().await {
                    Ok(()) => backoff = Duration::from_secs(1),
                    Err(error) => {
                        tracing::warn!(%error, "cannot reconcile jobs with the engine yet");
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            if self.lock().reconciled {
                self.schedule();
            }
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = self.inner.wake.notified() => {}
                Ok(()) = admission.changed() => {}
                Ok(()) = engine_up.changed() => {}
                Ok(()) = config.changed() => {}
                Ok(()) = gpus_discovered.changed() => {}
                // Starvation bounds and retries are time-based.
                _ = tokio::time::sleep(backoff) => {}
            }
        }
    }

    /// Starts every queued job that may start now, and ends the queued jobs
    /// that never can (a shrunk capacity, fewer GPUs than asked for) or were
    /// asked to cancel, so that none blocks the queue behind it.
    fn schedule(&self) {
        let config = self.jobs_config();
        let capacity = self.capacity();
        let reserve_after = Duration::from_secs(config.reserve_after_seconds.into());
        let inventory: Option<Vec<u32>> = (*self.inner.gpus_discovered.borrow())
            .then(|| self.inner.gpus.borrow().iter().map(|g| g.index).collect());
        let inventory_len = inventory.as_ref().map(Vec::len);
        let may_start =
            self.inner.admission.held_reason().is_none() && *self.inner.engine_up.borrow();
        let (launches, ended) = {
            let mut state = self.lock();
            let limits_changed = state.limits_checked != Some((capacity, inventory_len));
            state.limits_checked = Some((capacity, inventory_len));
            let free_slots = capacity.saturating_sub(state.slots_in_use);
            let may_start = may_start && free_slots > 0;
            if state.queue.is_empty() || (!may_start && !limits_changed) {
                return;
            }
            let now = tokio::time::Instant::now();
            let mut candidates = Vec::new();
            let mut ending = Vec::new();
            for record in state.queue.iter().filter_map(|key| state.jobs.get(&key.id)) {
                if record.cancel_requested {
                    ending.push((
                        record.clone(),
                        JobState::Cancelled,
                        "cancelled before its container started".to_owned(),
                    ));
                    continue;
                }
                let (slots, gpus) = (record.spec.slots, record.spec.gpus);
                if let Some(why) = scheduler::never_fits(slots, gpus, capacity, inventory_len) {
                    ending.push((record.clone(), JobState::Failed, why));
                    continue;
                }
                // A GPU job waits for the inventory to be known.
                if !may_start || (gpus > 0 && inventory.is_none()) {
                    continue;
                }
                candidates.push(Candidate {
                    id: record.id().to_owned(),
                    slots,
                    gpus,
                    waited: state
                        .queued_since
                        .get(record.id())
                        .map_or(Duration::ZERO, |t| now - *t),
                    mounts_ready: record.spec.mounts.iter().all(|m| match &m.source {
                        MountSource::Managed(name) => {
                            matches!(self.inner.mounts.resolve(name), MountResolution::Ready(_))
                        }
                        MountSource::HostPath(_) => true,
                    }),
                });
            }
            let mut ended = Vec::new();
            for (record, next, why) in ending {
                state.dequeue(&record);
                if let Some(r) = state.jobs.get_mut(record.id())
                    && r.transition(next, why)
                {
                    ended.push(r.clone());
                }
            }
            let busy = state.gpus_in_use();
            let free = Free {
                slots: free_slots,
                gpus: inventory
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|g| !busy.contains(g))
                    .collect(),
            };
            let starts = if may_start {
                scheduler::select(&candidates, free, reserve_after)
            } else {
                Vec::new()
            };
            let mut launches = Vec::new();
            for start in starts {
                let Some(record) = state.jobs.get(&start.id).cloned() else {
                    continue;
                };
                state.dequeue(&record);
                let cancel = state.reserve(&start.id, record.spec.slots, start.gpus.clone());
                if let Some(r) = state.jobs.get_mut(&start.id) {
                    r.transition(JobState::Starting, "creating the container");
                    r.gpu_indices = start.gpus;
                }
                launches.push((start.id, cancel));
            }
            (launches, ended)
        };
        for record in ended {
            let manager = self.clone();
            self.inner.tasks.spawn(async move {
                if manager.persist_until_done(record.id()).await {
                    manager.publish(&record);
                }
            });
        }
        for (id, cancel) in launches {
            self.inner
                .tasks
                .spawn(self.clone().run(id, Launch::Fresh, cancel));
        }
    }

    /// Drives one job from its launch to its final state and the removal of
    /// its container.
    async fn run(self, id: String, launch: Launch, cancel: CancellationToken) {
        let container = match launch {
            Launch::Fresh => match self.create_and_start(&id, &cancel).await {
                Some(container) => container,
                None => return,
            },
            Launch::StartExisting(container) => {
                if cancel.is_cancelled() || self.cancel_requested(&id) {
                    self.cancelled_before_start(&id, &container).await;
                    return;
                }
                if let Err(error) = self.inner.engine.start(&container).await {
                    self.fail_before_running(
                        &id,
                        &container,
                        format!("cannot start the container: {error}"),
                    )
                    .await;
                    return;
                }
                container
            }
            Launch::Adopt(container) => container,
        };
        let running = self.transition(&id, JobState::Running, "running", |r| {
            r.container_id = container.clone()
        });
        if let Some(record) = running {
            if !self.persist_until_done(&id).await {
                return;
            }
            self.publish(&record);
        }
        self.supervise(&id, &container, &cancel).await;
    }

    /// Records the intent, then creates and starts the container. `None`
    /// when the job ended or went back to the queue instead.
    async fn create_and_start(&self, id: &str, cancel: &CancellationToken) -> Option<String> {
        let record = self.get(id).ok().map(|v| v.record)?;
        if let Err(error) = self.persist(id).await {
            tracing::warn!(job = id, %error, "cannot record the start; job goes back to the queue");
            self.requeue(id, format!("waiting: cannot record the start: {error}"))
                .await;
            return None;
        }
        self.publish(&record);
        let spec = match self.container_spec(&record).await {
            Ok(spec) => spec,
            Err(reason) => {
                self.requeue(id, reason).await;
                return None;
            }
        };
        if cancel.is_cancelled() {
            self.cancelled_before_start(id, "").await;
            return None;
        }
        let container = match self.inner.engine.create(&spec).await {
            Ok(container) => container,
            Err(EngineError::NameInUse(name)) => {
                // Left by an earlier run of this agent that crashed after
                // recording the intent: look at it instead of running twice.
                match self.inner.engine.inspect(&name).await {
                    Ok(Some(status)) if status.status == "created" => status.id,
                    // It already started: supervise it, never start it again.
                    Ok(Some(status)) => return Some(status.id),
                    Ok(None) | Err(_) => {
                        self.requeue(id, "waiting: container name in use, retrying".into())
                            .await;
                        return None;
                    }
                }
            }
            Err(error) if error.is_unreachable() => {
                self.requeue(id, format!("waiting for the engine: {error}"))
                    .await;
                return None;
            }
            Err(error) => {
                self.finish(
                    id,
                    "",
                    Some(JobState::Failed),
                    format!("cannot create the container: {error}"),
                    None,
                    false,
                )
                .await;
                return None;
            }
        };
        if cancel.is_cancelled() {
            // `finish` removes the never-started container, holding the
            // slots until it is gone.
            self.cancelled_before_start(id, &container).await;
            return None;
        }
        if let Err(error) = self.inner.engine.start(&container).await {
            if error.is_unreachable() {
                // Whether it started is unknown; a created container must be
                // started before it is waited for (the engine reports a
                // never-started container as exited with status 0).
                return self
                    .ensure_started(id, &container)
                    .await
                    .then_some(container);
            }
            self.fail_before_running(
                id,
                &container,
                format!("cannot start the container: {error}"),
            )
            .await;
            return None;
        }
        Some(container)
    }

    /// Starts `container` if the engine says it is only created, retrying
    /// while the engine is unreachable. False when the job ended instead.
    async fn ensure_started(&self, id: &str, container: &str) -> bool {
        let mut backoff = Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match self.inner.engine.inspect(container).await {
                Ok(Some(status)) if status.status == "created" => {
                    match self.inner.engine.start(container).await {
                        Ok(()) => return true,
                        Err(error) if error.is_unreachable() => continue,
                        Err(error) => {
                            self.fail_before_running(
                                id,
                                container,
                                format!("cannot start the container: {error}"),
                            )
                            .await;
                            return false;
                        }
                    }
                }
                Ok(Some(_)) => return true,
                Ok(None) => {
                    // Never started (it would carry our record otherwise), so
                    // it may be created again.
                    self.requeue(
                        id,
                        "waiting: the container vanished before it started".into(),
                    )
                    .await;
                    return false;
                }
                Err(_) => continue,
            }
        }
    }

    /// Whether a cancel was asked for the job (false for an unknown job).
    fn cancel_requested(&self, id: &str) -> bool {
        self.lock().jobs.get(id).is_some_and(|r| r.cancel_requested)
    }

    /// Ends a job that was asked to cancel before its container started;
    /// `container` (when not empty) was created and is removed.
    async fn cancelled_before_start(&self, id: &str, container: &str) {
        self.finish(
            id,
            container,
            Some(JobState::Cancelled),
            "cancelled before its container started".into(),
            None,
            false,
        )
        .await;
    }

    async fn fail_before_running(&self, id: &str, container: &str, reason: String) {
        self.finish(id, container, Some(JobState::Failed), reason, None, false)
            .await;
    }

    /// Puts a job that never got a container back in the queue, or ends it
    /// as cancelled when a cancel was asked for meanwhile (the request fired
    /// the launch's token, which the next launch would not carry).
    async fn requeue(&self, id: &str, reason: String) {
        let record = {
            let mut state = self.lock();
            let Some(r) = state.jobs.get_mut(id) else {
                state.release(id);
                return;
            };
            if r.cancel_requested {
                None
            } else {
                if !r.transition(JobState::Queued, reason) {
                    state.release(id);
                    return;
                }
                let r = r.clone();
                state.release(id);
                state.enqueue(&r);
                Some(r)
            }
        };
        let Some(record) = record else {
            self.cancelled_before_start(id, "").await;
            return;
        };
        if let Err(error) = self.persist(id).await {
            // Harmless for durability: the store still says "starting" with
            // no container, which a restart re-queues too.
            tracing::warn!(job = id, %error, "cannot record the return to the queue");
        }
        self.publish(&record);
        // Let the cause (engine, store) settle before the next attempt.
        tokio::select! {
            _ = self.inner.shutdown.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => self.inner.wake.notify_one(),
        }
    }

    async fn container_spec(&self, record: &JobRecord) -> Result<ContainerSpec, String> {
        let s = &record.spec;
        let config = self.jobs_config();
        let mut binds = Vec::new();
        for (i, mount) in s.mounts.iter().enumerate() {
            let source = match &mount.source {
                MountSource::Managed(name) => match self.inner.mounts.verify(name).await {
                    MountResolution::Ready(path) => path,
                    MountResolution::Unavailable(why) => {
                        return Err(format!("waiting for mount {name}: {why}"));
                    }
                    MountResolution::Unknown => {
                        return Err(format!("waiting: mount {name} is not known"));
                    }
                },
                MountSource::HostPath(path) => {
                    let (field, path, roots) = (
                        format!("mounts[{i}].host_path"),
                        path.clone(),
                        config.allowed_host_roots.clone(),
                    );
                    match tokio::task::spawn_blocking(move || {
                        spec::confine_host_path(&field, &path, &roots)
                    })
                    .await
                    {
                        Ok(Ok(real)) => real,
                        Ok(Err(e)) => return Err(format!("waiting: {e}")),
                        Err(e) => return Err(format!("waiting: {e}")),
                    }
                }
            };
            binds.push(Bind {
                source,
                target: mount.container_path.clone(),
                read_only: mount.read_only,
            });
        }
        let mut labels: HashMap<String, String> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_INSTANCE.into(), self.inner.instance_id.clone());
        labels.insert(LABEL_JOB.into(), s.id.clone());
        Ok(ContainerSpec {
            name: self.container_name(&s.id),
            image: s.image.clone(),
            command: s.command.clone(),
            env: s.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            working_dir: s.working_dir.clone(),
            labels,
            memory_bytes: s.memory_bytes,
            nano_cpus: u64::from(s.cpu_millis) * 1_000_000,
            pids_limit: config.pids_limit,
            network: s.network.clone(),
            binds,
            gpus: record.gpu_indices.clone(),
            log_max_bytes: config.log_max_bytes,
        })
    }

    /// Captures output, enforces the timeout, honours cancel, and records the
    /// end. Returns without recording anything when the agent shuts down:
    /// the container keeps running and the next start adopts it.
    async fn supervise(&self, id: &str, container: &str, cancel: &CancellationToken) {
        let capture = self
            .inner
            .tasks
            .spawn(self.clone().capture(id.to_owned(), container.to_owned()));
        let Some(record) = self.get(id).ok().map(|v| v.record) else {
            return;
        };
        let grace = Duration::from_secs(record.spec.kill_grace_seconds.into());
        let mut deadline = (record.spec.timeout_seconds > 0).then(|| {
            let limit = Duration::from_secs(record.spec.timeout_seconds.into());
            let ran = record
                .running_at
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .unwrap_or_default();
            tokio::time::Instant::now() + limit.saturating_sub(ran)
        });
        let repairs_at_start = self.mount_repairs(&record);
        let mut ending: Option<(JobState, String)> = None;
        if record.cancel_requested {
            cancel.cancel();
        }
        let mut backoff = Duration::from_millis(200);
        let mut engine_went_away = false;
        let outcome = loop {
            let timed_out = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break Outcome::ShuttingDown,
                result = self.inner.engine.wait(container) => match result {
                    Ok(code) => break Outcome::Exited(code),
                    Err(EngineError::NotFound { .. }) => break Outcome::Lost,
                    Err(error) => {
                        engine_went_away |= error.is_unreachable();
                        tracing::debug!(job = id, %error, "waiting for the container failed; checking it");
                        tokio::select! {
                            _ = self.inner.shutdown.cancelled() => break Outcome::ShuttingDown,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        match self.inner.engine.inspect(container).await {
                            Ok(None) => break Outcome::Lost,
                            Ok(Some(s)) if !s.running && s.status != "created" => break Outcome::Exited(s.exit_code.unwrap_or(-1)),
                            _ => continue,
                        }
                    }
                },
                _ = timed_out, if ending.is_none() => {
                    deadline = None;
                    ending = Some((JobState::TimedOut, format!("killed after its {} s timeout", record.spec.timeout_seconds)));
                    self.stop(id, container, grace).await;
                }
                _ = cancel.cancelled(), if ending.is_none() => {
                    ending = Some((JobState::Cancelled, "cancelled".into()));
                    self.stop(id, container, grace).await;
                }
            }
        };
        let exit = match outcome {
            Outcome::ShuttingDown => return,
            Outcome::Lost => None,
            Outcome::Exited(code) => Some(code),
        };
        // The output stream ends with the container; let it drain so that
        // the log is complete when the final state is visible (bounded, in
        // case the engine keeps the stream open).
        if tokio::time::timeout(CAPTURE_DRAIN, capture).await.is_err() {
            tracing::warn!(
                job = id,
                "log capture did not finish within {CAPTURE_DRAIN:?} of exit"
            );
        }
        let oom = match exit {
            Some(code) => {
                self.oom_killed(container, code, record.spec.memory_bytes)
                    .await
            }
            None => false,
        };
        let (state, reason) = match (ending, exit) {
            (Some((state, reason)), _) => (Some(state), reason),
            (None, None) => (
                Some(JobState::Failed),
                "container lost: it disappeared while the job ran".into(),
            ),
            (None, Some(_)) if oom => (
                Some(JobState::Failed),
                format!(
                    "killed by the OOM killer (memory limit {} bytes)",
                    record.spec.memory_bytes
                ),
            ),
            (None, Some(0)) => (Some(JobState::Succeeded), "exited with status 0".into()),
            (None, Some(code)) => {
                let mut reason = exit_reason(code);
                if engine_went_away {
                    reason.push_str("; the Docker engine went away while the job ran");
                }
                for note in self.dead_mounts(&repairs_at_start).await {
                    reason = format!("{reason}; {note}");
                }
                (Some(JobState::Failed), reason)
            }
        };
        self.finish(id, container, state, reason, exit, oom).await;
    }

    /// Whether the kernel's OOM killer ended the container. The engine may
    /// learn of the OOM kill after the exit (seen with cgroup v1: a SIGKILL
    /// exit reported with `OOMKilled` false, true a moment later), so a
    /// SIGKILL exit of a memory-limited job is looked at a few more times.
    async fn oom_killed(&self, container: &str, code: i64, memory_limit: u64) -> bool {
        let may_be_late = code == 137 && memory_limit > 0;
        let looks = if may_be_late { OOM_LOOKS } else { 1 };
        for look in 0..looks {
            if look > 0 {
                tokio::time::sleep(OOM_LOOK_INTERVAL).await;
            }
            if matches!(self.inner.engine.inspect(container).await, Ok(Some(s)) if s.oom_killed) {
                return true;
            }
        }
        false
    }

    /// The repair counts of a job's managed mounts.
    fn mount_repairs(&self, record: &JobRecord) -> Vec<(String, u32)> {
        record
            .spec
            .mounts
            .iter()
            .filter_map(|m| match &m.source {
                MountSource::Managed(name) => Some((name.clone(), self.inner.mounts.repairs(name))),
                MountSource::HostPath(_) => None,
            })
            .collect()
    }

    /// For a job that failed: which of its managed mounts died under it
    /// (dead now, or repaired since it started), so that its reason says
    /// why rather than only an exit status. Checking a dead mount also
    /// wakes its repair.
    async fn dead_mounts(&self, repairs_at_start: &[(String, u32)]) -> Vec<String> {
        let mut notes = Vec::new();
        for (name, before) in repairs_at_start {
            match self.inner.mounts.verify(name).await {
                MountResolution::Ready(_) if self.inner.mounts.repairs(name) == *before => {}
                MountResolution::Ready(_) => notes.push(format!(
                    "mount {name} died and was repaired while the job ran"
                )),
                MountResolution::Unavailable(why) => {
                    notes.push(format!("mount {name} died while the job ran: {why}"))
                }
                MountResolution::Unknown => {
                    notes.push(format!("mount {name} was removed while the job ran"))
                }
            }
        }
        notes
    }

    /// SIGTERM, then SIGKILL after the grace period, retried while the
    /// engine does not answer.
    async fn stop(&self, id: &str, container: &str, grace: Duration) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.inner.engine.stop(container, grace).await {
                Ok(()) | Err(EngineError::NotFound { .. }) => return,
                Err(error) => {
                    tracing::warn!(job = id, %error, "cannot stop the container; retrying");
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Copies the container's output into the job's log until the container
    /// exits, resuming where the log ends after an agent restart or an
    /// engine outage.
    async fn capture(self, id: String, container: String) {
        let cap = self.jobs_config().log_max_bytes;
        let (mut writer, mut last) = match self.inner.logs.writer(&id, cap).await {
            Ok(w) => w,
            Err(error) => {
                tracing::error!(job = %id, %error, "cannot open the job's log; output is not captured");
                return;
            }
        };
        let mut backoff = Duration::from_millis(200);
        // Followed while the container runs; once it has exited, one last
        // unfollowed read picks up what a follow stream may have missed (the
        // engine can end a follow early when a container exits quickly).
        let mut follow = true;
        loop {
            let mut stream = match self.inner.engine.output(&container, last, follow).await {
                Ok(stream) => stream,
                Err(EngineError::NotFound { .. }) => break,
                Err(_) => {
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let mut failed = false;
            loop {
                let item = tokio::select! {
                    _ = self.inner.shutdown.cancelled() => None,
                    item = stream.next() => item,
                };
                match item {
                    Some(Ok(frame)) => {
                        if let Err(error) = writer
                            .write(frame.stream, frame.time_nanos, &frame.data)
                            .await
                        {
                            tracing::warn!(job = %id, %error, "cannot write the job's log");
                        }
                        last = last.max(frame.time_nanos);
                    }
                    Some(Err(EngineError::NotFound { .. })) | None => break,
                    Some(Err(_)) => {
                        failed = true;
                        break;
                    }
                }
            }
            if let Err(error) = writer.flush().await {
                tracing::warn!(job = %id, %error, "cannot write the job's log");
            }
            if self.inner.shutdown.is_cancelled() {
                break;
            }
            if !failed {
                if !follow {
                    break;
                }
                // A follow stream also ends when the engine rotates its log
                // file; only a container that no longer runs has no more output.
                match self.inner.engine.inspect(&container).await {
                    Ok(Some(status)) if status.running => continue,
                    Ok(Some(_)) => {
                        follow = false;
                        continue;
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        if let Err(error) = writer.flush().await {
            tracing::warn!(job = %id, %error, "cannot write the job's log");
        }
    }

    /// Records the final state, removes the container, frees the slots.
    async fn finish(
        &self,
        id: &str,
        container: &str,
        state: Option<JobState>,
        reason: String,
        exit: Option<i64>,
        oom: bool,
    ) {
        let Some(state) = state else { return };
        let record = self.transition(id, state, reason, |r| {
            r.exit_code = exit;
            r.oom_killed = oom;
            if !container.is_empty() {
                r.container_id = container.to_owned();
            }
        });
        if let Some(record) = &record {
            if !self.persist_until_done(id).await {
                return;
            }
            self.publish(record);
        }
        let keep = self.jobs_config().keep_containers;
        if !container.is_empty() && !keep {
            // The slots stay held until the container is gone, so a container
            // that still exists never counts outside the capacity.
            let mut backoff = Duration::from_millis(200);
            while let Err(error) = self.inner.engine.remove(container).await {
                tracing::warn!(job = id, %error, "cannot remove the container; retrying");
                tokio::select! {
                    _ = self.inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        self.lock().release(id);
        self.inner.wake.notify_one();
    }

    /// Matches the records with the engine's containers after a start (or a
    /// failed removal): adopts what runs, records what ended, re-queues what
    /// never started, fails what vanished, removes what nobody owns.
    async fn reconcile(&self) -> Result<(), EngineError> {
        let containers = self
            .inner
            .engine
            .list(LABEL_INSTANCE, &self.inner.instance_id)
            .await?;
        let mut by_job: HashMap<String, (String, String)> = HashMap::new();
        let mut orphans = Vec::new();
        for c in containers {
            match c.labels.get(LABEL_JOB) {
                Some(job) => {
                    by_job.insert(job.clone(), (c.id, c.state));
                }
                None => orphans.push(c.id),
            }
        }
        let mut launches = Vec::new();
        let mut changed = Vec::new();
        {
            let mut state = self.lock();
            let unfinished: Vec<JobRecord> = state
                .jobs
                .values()
                .filter(|r| {
                    matches!(r.state, JobState::Starting | JobState::Running)
                        && !state.active.contains_key(r.id())
                })
                .cloned()
                .collect();
            for record in unfinished {
                let id = record.id().to_owned();
                match by_job.remove(&id) {
                    Some((container, status)) => {
                        let cancel =
                            state.reserve(&id, record.spec.slots, record.gpu_indices.clone());
                        let launch = if status == "created" {
                            Launch::StartExisting(container)
                        } else {
                            Launch::Adopt(container)
                        };
                        launches.push((id, launch, cancel));
                    }
                    None if record.state == JobState::Starting && record.cancel_requested => {
                        // Never ran, and a cancel was asked for before the
                        // crash (or before this reconciliation).
                        if let Some(r) = state.jobs.get_mut(&id) {
                            r.transition(
                                JobState::Cancelled,
                                "cancelled before its container was created",
                            );
                            changed.push(r.clone());
                        }
                    }
                    None if record.state == JobState::Starting => {
                        // The intent was recorded but no container exists: it
                        // never ran, so it may run now.
                        if let Some(r) = state.jobs.get_mut(&id) {
                            r.transition(
                                JobState::Queued,
                                "re-queued after an agent restart: its container was never created",
                            );
                            changed.push(r.clone());
                        }
                        if let Some(r) = state.jobs.get(&id).cloned() {
                            state.enqueue(&r);
                        }
                    }
                    None => {
                        if let Some(r) = state.jobs.get_mut(&id) {
                            r.transition(JobState::Failed, "container lost: it no longer exists");
                            changed.push(r.clone());
                        }
                    }
                }
            }
            // Containers of finished or unknown jobs: their exit is recorded
            // (or they belong to nothing), so they only take space.
            for (job, (container, _)) in by_job {
                if !state.active.contains_key(&job) {
                    orphans.push(container);
                }
            }
            state.reconciled = true;
        }
        for record in &changed {
            if self.persist_until_done(record.id()).await {
                self.publish(record);
            }
        }
        if !self.jobs_config().keep_containers {
            for container in orphans {
                if let Err(error) = self.inner.engine.remove(&container).await {
                    tracing::warn!(%container, %error, "cannot remove a leftover container");
                }
            }
        }
        let adopted = launches.len();
        for (id, launch, cancel) in launches {
            self.inner.tasks.spawn(self.clone().run(id, launch, cancel));
        }
        if adopted > 0 || !changed.is_empty() {
            tracing::info!(
                adopted,
                recovered = changed.len(),
                "reconciled jobs with the engine"
            );
        }
        Ok(())
    }

    async fn retention_loop(self) {
        loop {
            self.sweep().await;
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        }
    }

    /// Removes finished jobs past the retention age or count, with their logs.
    pub async fn sweep(&self) {
        let config = self.jobs_config();
        let cutoff = SystemTime::now()
            .checked_sub(Duration::from_secs(config.retention_seconds))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let expired: Vec<String> = {
            let mut state = self.lock();
            let mut finished: Vec<(SystemTime, String)> = state
                .jobs
                .values()
                .filter(|r| r.state.is_final())
                .map(|r| (r.finished_at.unwrap_or(r.queued_at), r.id().to_owned()))
                .collect();
            finished.sort();
            let excess = finished
                .len()
                .saturating_sub(config.retention_count as usize);
            let expired: Vec<String> = finished
                .into_iter()
                .enumerate()
                .filter(|(i, (t, _))| *i < excess || *t < cutoff)
                .map(|(_, (_, id))| id)
                .collect();
            for id in &expired {
                state.jobs.remove(id);
            }
            expired
        };
        if expired.is_empty() {
            return;
        }
        let writes = expired
            .iter()
            .map(|id| Write::Delete(RECORDS, id.clone()))
            .collect();
        if let Err(error) = self.inner.store.apply(writes).await {
            tracing::warn!(%error, "cannot remove expired job records");
        }
        for id in &expired {
            self.inner.logs.remove(id).await;
        }
        tracing::info!(
            removed = expired.len(),
            "removed finished jobs past retention"
        );
    }
}

/// "exited with status N", naming the signal when the status is 128 + a
/// signal number (how a container killed by a signal reports its exit).
fn exit_reason(code: i64) -> String {
    let signal = (129..=128 + 64)
        .contains(&code)
        .then(|| nix::sys::signal::Signal::try_from((code - 128) as i32).ok())
        .flatten();
    match signal {
        Some(signal) => format!("exited with status {code} (killed by {signal})"),
        None => format!("exited with status {code}"),
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;

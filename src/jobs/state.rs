//! The job manager's in-memory state: every job's record, the queue in start
//! order, what each started job holds (slots, GPUs, its cancel token), and
//! the shape of a container that no record owns (`unknown.rs` keeps the list).
//!
//! Plain data under the manager's one lock: no I/O, no awaits, so that every
//! critical section leaves it consistent. The rules of who may change what
//! live with the callers (`manager.rs`, `dispatch.rs`, `job_task.rs`,
//! `recovery.rs`, `retention.rs`).

use std::collections::{BTreeSet, HashMap};

use tokio_util::sync::CancellationToken;

use super::job_images::RegistryAuth;
use super::record::JobRecord;

/// A queued job's place: priority first, then submission order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct QueueKey {
    /// Negated so that higher priorities sort first.
    neg_priority: i64,
    seq: u64,
    pub(super) id: String,
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

/// What a started job holds until its container is gone.
pub(super) struct Active {
    slots: u32,
    gpus: Vec<u32>,
    /// Fired by CancelJob; the job's task stops the container.
    pub(super) cancel: CancellationToken,
}

/// Everything the manager knows in memory, behind one lock.
#[derive(Default)]
pub(super) struct State {
    /// Every job not yet removed by retention, by id.
    pub(super) jobs: HashMap<String, JobRecord>,
    /// The queued jobs in start order.
    pub(super) queue: BTreeSet<QueueKey>,
    /// Since when each queued job waits (for the starvation bound).
    pub(super) queued_since: HashMap<String, tokio::time::Instant>,
    /// Started jobs, until their container is gone.
    pub(super) active: HashMap<String, Active>,
    /// The sum of `active`'s slots.
    pub(super) slots_in_use: u32,
    /// The next submission's `seq`.
    pub(super) next_seq: u64,
    /// True once the records were matched with the engine's containers
    /// (see `recovery.rs`); nothing starts before.
    pub(super) reconciled: bool,
    /// The capacity and GPU inventory the queue was last checked against
    /// for jobs that can never start.
    pub(super) limits_checked: Option<(u32, Option<usize>)>,
    /// Credentials passed with a job for its pull only (`registry_auth`):
    /// in memory while the job has not ended, never stored.
    pub(super) registry_auth: HashMap<String, RegistryAuth>,
}

impl State {
    /// GPUs held by started jobs.
    pub(super) fn gpus_in_use(&self) -> BTreeSet<u32> {
        self.active
            .values()
            .flat_map(|a| a.gpus.iter().copied())
            .collect()
    }

    /// Puts a queued record in the queue (its wait counts from the first time).
    pub(super) fn enqueue(&mut self, record: &JobRecord) {
        self.queue.insert(QueueKey::of(record));
        self.queued_since
            .entry(record.spec.id.clone())
            .or_insert_with(tokio::time::Instant::now);
    }

    /// Takes a record out of the queue.
    pub(super) fn dequeue(&mut self, record: &JobRecord) {
        self.queue.remove(&QueueKey::of(record));
        self.queued_since.remove(record.id());
    }

    /// Whether `id` holds slots now.
    pub(super) fn holds(&self, id: &str) -> bool {
        self.active.contains_key(id)
    }

    /// Frees what a started job held.
    pub(super) fn release(&mut self, id: &str) {
        if let Some(active) = self.active.remove(id) {
            self.slots_in_use = self.slots_in_use.saturating_sub(active.slots);
        }
    }

    /// Holds slots and GPUs for a job about to start; returns its cancel token.
    pub(super) fn reserve(&mut self, id: &str, slots: u32, gpus: Vec<u32>) -> CancellationToken {
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

/// A container of this instance that no job record owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownContainer {
    /// Container id.
    pub container_id: String,
    /// Its job label, when it has one.
    pub job_id: Option<String>,
    /// "running", "exited", "created", ...
    pub state: String,
}

impl UnknownContainer {
    /// `0123456789ab (job j1, running)`, for conditions and logs.
    pub fn describe(&self) -> String {
        let short: String = self.container_id.chars().take(12).collect();
        match &self.job_id {
            Some(job) => format!("{short} (job {job}, {})", self.state),
            None => format!("{short} (no job label, {})", self.state),
        }
    }
}

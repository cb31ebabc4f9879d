//! A job's durable record and its state machine: which transitions are
//! allowed, and the time of each.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::spec::JobSpec;

/// The life-cycle state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for slots, GPUs, mounts or admission.
    Queued,
    /// Slots reserved; the container is being created and started.
    Starting,
    /// The container runs.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero, OOM-killed, could not be created, or lost.
    Failed,
    /// Cancelled.
    Cancelled,
    /// Killed at its timeout.
    TimedOut,
}

impl JobState {
    /// True for the four final states.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::TimedOut
        )
    }

    /// Lowercase name for logs and tables.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Starting => "starting",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
        }
    }

    /// Whether the state machine allows `self → next`.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        match (self, next) {
            (Queued, Starting | Cancelled | Failed) => true,
            // Starting → Queued: the engine went away before the container
            // was created, so the job goes back to wait.
            (Starting, Queued | Running | Failed | Cancelled | TimedOut | Succeeded) => true,
            (Running, Succeeded | Failed | Cancelled | TimedOut) => true,
            _ => false,
        }
    }
}

/// Everything recorded about a job. Stored as JSON in the `jobs.records` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The accepted spec (its `id` is the record's key).
    pub spec: JobSpec,
    /// Current state.
    pub state: JobState,
    /// Submission order, for FIFO among equal priorities.
    pub seq: u64,
    /// Exit status once exited.
    #[serde(default)]
    pub exit_code: Option<i64>,
    /// Why it is in its state.
    #[serde(default)]
    pub reason: String,
    /// Killed for exceeding its memory limit.
    #[serde(default)]
    pub oom_killed: bool,
    /// Accepted.
    pub queued_at: SystemTime,
    /// Slots reserved.
    #[serde(default)]
    pub starting_at: Option<SystemTime>,
    /// Container started.
    #[serde(default)]
    pub running_at: Option<SystemTime>,
    /// Final state reached.
    #[serde(default)]
    pub finished_at: Option<SystemTime>,
    /// Docker container id once created.
    #[serde(default)]
    pub container_id: String,
    /// GPU indices held.
    #[serde(default)]
    pub gpu_indices: Vec<u32>,
    /// A cancel was asked for; honoured by the run task.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The digest the job runs (`repo@sha256:...`, or the image id),
    /// recorded before its container is created.
    #[serde(default)]
    pub image_digest: String,
}

impl JobRecord {
    /// A freshly queued job.
    pub fn queued(spec: JobSpec, seq: u64) -> Self {
        Self {
            spec,
            state: JobState::Queued,
            seq,
            exit_code: None,
            reason: "waiting for slots".into(),
            oom_killed: false,
            queued_at: SystemTime::now(),
            starting_at: None,
            running_at: None,
            finished_at: None,
            container_id: String::new(),
            gpu_indices: Vec::new(),
            cancel_requested: false,
            image_digest: String::new(),
        }
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Moves to `next`, stamping its time. Returns false (and changes
    /// nothing) when the state machine forbids it, e.g. a second final state.
    pub fn transition(&mut self, next: JobState, reason: impl Into<String>) -> bool {
        if !self.state.can_become(next) {
            return false;
        }
        let now = SystemTime::now();
        match next {
            JobState::Queued => {
                self.starting_at = None;
                self.container_id.clear();
                self.gpu_indices.clear();
            }
            JobState::Starting => self.starting_at = Some(now),
            JobState::Running => self.running_at = Some(now),
            _ => self.finished_at = Some(now),
        }
        self.state = next;
        self.reason = reason.into();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_states_are_final() {
        let mut r = JobRecord::queued(JobSpec::default(), 1);
        assert!(r.transition(JobState::Starting, "slots reserved"));
        assert!(r.transition(JobState::Running, "running"));
        assert!(r.transition(JobState::Succeeded, "exited 0"));
        assert!(!r.transition(JobState::Failed, "again"));
        assert_eq!(r.state, JobState::Succeeded);
        assert!(r.finished_at.is_some());
        assert!(r.running_at.is_some());
    }

    #[test]
    fn queued_cannot_jump_to_running() {
        let mut r = JobRecord::queued(JobSpec::default(), 1);
        assert!(!r.transition(JobState::Running, "no"));
        assert!(r.transition(JobState::Cancelled, "cancelled while queued"));
    }
}

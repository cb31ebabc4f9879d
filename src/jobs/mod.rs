//! Jobs: containerised work queued on the instance and run through the local
//! Docker engine, `slots_per_core` slots per usable core, nothing lost or run
//! twice across agent crashes.
//!
//! Owns the `[jobs]` and `[docker]` sections ([`config`]), the job spec rules
//! ([`spec`]), the record and its state machine ([`record`]), the scheduling
//! rules ([`scheduler`]), the per-job logs ([`logs`]), the engine trait and
//! its bollard implementation ([`engine`]), the disk guard's view of the
//! engine on it ([`docker_space`]), the docker condition ([`engine_monitor`])
//! and the manager that ties them together ([`manager`]). Knows nothing of
//! gRPC.

pub mod config;
pub mod docker_space;
pub mod engine;
pub mod engine_monitor;
#[cfg(any(test, feature = "test-util"))]
pub mod fake_engine;
pub mod logs;
pub mod manager;
pub mod reclaim;
pub mod record;
pub mod scheduler;
pub mod spec;

pub use manager::{
    JobError, JobFilter, JobManager, JobView, JobsDeps, MountResolution, MountResolver,
    NoManagedMounts,
};
pub use record::{JobRecord, JobState};
pub use spec::{JobMount, JobSpec, MountSource};

/// Job slot usage, as GetStatus reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotUsage {
    /// Slots in total.
    pub capacity: u32,
    /// Slots held by existing containers.
    pub in_use: u32,
    /// Jobs waiting.
    pub queued: u32,
    /// Jobs running.
    pub running: u32,
    /// Why queued jobs are held, if they are.
    pub held_reason: String,
}

/// Label on every container the agent creates: the owning instance's id.
pub const LABEL_INSTANCE: &str = "io.instance-agent.instance";
/// Label on every container the agent creates: the job id.
pub const LABEL_JOB: &str = "io.instance-agent.job";

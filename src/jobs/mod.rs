//! Jobs: containerised work queued on the instance and run through the local
//! Docker engine, `slots_per_core` slots per usable core, nothing lost or run
//! twice across agent crashes.
//!
//! Owns the `[jobs]` and `[docker]` sections ([`config`]), the job spec rules
//! ([`spec`]), the record and its state machine ([`record`]), the scheduling
//! rules ([`scheduler`]), the per-job logs ([`logs`]), the engine trait and
//! its bollard implementation ([`engine`]), the disk guard's view of the
//! engine on it ([`docker_space`]), the docker condition ([`engine_monitor`])
//! and the manager that ties them together. Knows nothing of gRPC.
//!
//! The manager is one type, [`JobManager`], split by duty: the handle and
//! the shared state ([`manager`], `state.rs`), starting queued jobs
//! (`dispatch.rs`), one job's life (`job_task.rs`, `capture.rs`), crash
//! recovery (`recovery.rs`) and the containers no record owns ([`unknown`]),
//! retention (`retention.rs`), the jobs' view of managed mounts
//! ([`job_mounts`]) and of their images ([`job_images`], implemented by the
//! images domain). The fakes for tests are in `fake.rs`
//! (behind `test-util`), the unit tests' harness in `harness.rs`.

mod capture;
pub mod config;
mod dispatch;
pub mod docker_space;
pub mod engine;
pub mod engine_monitor;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
#[cfg(test)]
mod harness;
pub mod job_images;
pub mod job_mounts;
mod job_task;
pub mod logs;
pub mod manager;
pub mod reclaim;
pub mod record;
mod recovery;
mod retention;
pub mod scheduler;
pub mod spec;
mod state;
pub mod unknown;

pub use job_images::{
    ImageProvider, ImageState, ImageWant, LocalImagesOnly, PullPhase, PullView, RegistryAuth,
    ResolveError, ResolvedImage, WantStage,
};
pub use job_mounts::{MountResolution, MountResolver, NoManagedMounts};
pub use manager::{JobError, JobFilter, JobManager, JobView, JobsDeps};
pub use record::{JobRecord, JobState};
pub use spec::{JobMount, JobSpec, MountSource};
pub use state::UnknownContainer;
pub use unknown::UnknownContainers;

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

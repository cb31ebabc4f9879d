//! Apps: long-running containers reached through loopback ports (a model
//! server, an RStudio), with real readiness (health probes), restarts with
//! backoff, and the Azure ML local-endpoint preset for inference. Jobs run
//! to completion; apps run until removed.
//!
//! Owns the `[apps]` section ([`config`]), the spec rules and the inference
//! preset ([`spec`]), the record and its state machine ([`record`]), the
//! engine trait and its bollard implementation ([`engine`]), the trait to
//! the images domain ([`images`], pulls shared with jobs), health probes
//! ([`probe`]), host ports ([`ports`]) and the manager ([`AppManager`]),
//! split by duty: the handle (`manager.rs`), one app's life
//! (`supervisor.rs`, probes and exits in `monitor.rs`), and adoption after
//! an agent start (`recovery.rs`). Knows nothing of gRPC.
//!
//! Apps share the instance with jobs through the job slots ([`SlotPool`],
//! implemented by the job manager), wait on the same admission gate (a disk
//! hold stops new starts, never a running app) and reach storage through the
//! jobs' [`MountResolver`](crate::jobs::MountResolver).

pub mod config;
pub mod engine;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod images;
mod manager;
mod monitor;
pub mod ports;
pub mod probe;
pub mod record;
mod recovery;
pub mod spec;
mod supervisor;
#[cfg(test)]
mod tests;

pub use manager::{AppError, AppManager, AppsDeps, DeployOutcome, Rollout};
pub use record::{AppRecord, AppState, ProbeResult};
pub use spec::AppSpec;

/// Label on every app container: the owning instance's id. Not the jobs'
/// label: the job manager removes containers of its instance it does not
/// know.
pub const LABEL_APP_INSTANCE: &str = "io.instance-agent.app-instance";
/// Label on every app container: the app's name.
pub const LABEL_APP: &str = "io.instance-agent.app";
/// Label on every app container: the spec generation it runs.
pub const LABEL_APP_GENERATION: &str = "io.instance-agent.app-generation";
/// Label on the apps' network, created by the agent.
pub const LABEL_APP_NETWORK: &str = "io.instance-agent.apps-network";

/// The job slots, as apps hold them: an app holds its slots from the
/// moment it starts until it is removed or ends for good, so that jobs and
/// apps share the instance.
pub trait SlotPool: Send + Sync + 'static {
    /// Holds `slots` for `holder` when that many are free now; true when held
    /// (or already held by `holder`).
    fn try_hold(&self, holder: &str, slots: u32) -> bool;
    /// Holds `slots` for `holder` even past the capacity (an adopted app
    /// already runs: its slots are in use whatever the count says).
    fn hold_anyway(&self, holder: &str, slots: u32);
    /// Releases what `holder` holds, if anything.
    fn release(&self, holder: &str);
}

/// A pool with unlimited slots, for a build or a test without jobs.
pub struct UnlimitedSlots;

impl SlotPool for UnlimitedSlots {
    fn try_hold(&self, _: &str, _: u32) -> bool {
        true
    }
    fn hold_anyway(&self, _: &str, _: u32) {}
    fn release(&self, _: &str) {}
}

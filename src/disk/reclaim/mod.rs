//! Reclaiming space in safe steps.
//!
//! - [`steps`]: the [`ReclaimStep`] trait that each owner of reclaimable data
//!   implements (exited job containers and dangling images in `disk::docker`;
//!   expired job logs by jobs; mount caches by mounts), what a step frees and
//!   how it fails.
//! - [`run`]: the [`Reclaimer`] that runs the registered steps in order, one
//!   reclaim at a time, and stops as soon as the target filesystems are back
//!   above the floor plus the margin; dry runs; the per-step report.
//! - [`driver`]: when and for what the guard reclaims: the targets, the queue
//!   of automatic reclaims, the run in a task of its own and its event.
//!
//! A step that fails is reported and the next one still runs. Never user
//! files: each step deletes only what its owner created.

pub mod driver;
pub mod run;
pub mod steps;
pub mod turns;

pub use driver::{ReclaimDriver, ReclaimQueue, ReclaimTarget};
pub use run::{
    ReclaimFinished, ReclaimMode, ReclaimReport, ReclaimRequest, ReclaimTrigger, Reclaimer,
    Relevance, StepReport,
};
pub use steps::{Freed, ReclaimError, ReclaimStep, Removals};

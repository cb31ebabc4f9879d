//! Lifecycle: whether the instance is really idle and why it is not, and the
//! idle shutdown that follows (warnings, postponement, one stop request).
//!
//! # Layout
//! - [`config`]: the `[lifecycle]` section and the [`IdleShutdownPolicy`].
//! - [`activity`]: what each source read ([`Reading`]: a count with a detail,
//!   quiet, or unreadable) and the instance's [`Activity`].
//! - [`source`]: the [`ActivitySource`] trait, and the sources read here:
//!   terminals (`/dev/pts`) and background work.
//! - [`background`]: processes of people busy on the CPU, from `/proc`
//!   through [`background::ProcessTable`].
//! - [`idle`]: the idle timer ([`IdleClock`]), a pure state machine on
//!   `tokio::time`.
//! - [`service`]: the sampling loop, the events, the store record
//!   ([`LifecycleService`]).
//! - [`stop`]: what carries out the stop ([`StopAction`]: the configured
//!   command, a recording fake in tests).
//! - [`event`]: what is published on the event log.
//!
//! Knows nothing of gRPC. The sources that live in other domains (jobs,
//! setup scripts, SSH sessions, apps) implement [`ActivitySource`] in the
//! daemon's adapters, so this module never imports those domains.

pub mod activity;
pub mod background;
pub mod config;
pub mod event;
pub mod idle;
pub mod service;
pub mod source;
pub mod stop;

pub use activity::{Activity, LastActivity, Postponement, Reading, SourceKind, SourceState};
pub use config::{IdleShutdownPolicy, LifecycleConfig};
pub use event::LifecycleEvent;
pub use idle::{IdleClock, IdleEvent};
pub use service::{LifecycleError, LifecycleParts, LifecycleService};
pub use source::ActivitySource;
pub use stop::{CommandStop, StopAction, StopError};

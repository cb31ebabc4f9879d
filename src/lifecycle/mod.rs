//! Lifecycle: whether the instance is really idle and why it is not, and the
//! idle shutdown that follows (warnings, postponement, one stop request).
//!
//! # Layout
//! - [`config`]: the `[lifecycle]` section and the [`IdleShutdownPolicy`].
//! - [`activity`]: what each source read ([`Reading`]: a count with a detail,
//!   quiet, or unreadable) and the instance's [`Activity`].
//! - [`background`]: processes of people busy on the CPU, from `/proc`
//!   through [`background::ProcessTable`].
//! - [`idle`]: the idle timer ([`IdleClock`]), a pure state machine on
//!   `tokio::time`.
//!
//! Knows nothing of gRPC. The sources that live in other domains (jobs,
//! setup scripts, SSH sessions, and apps when they land) reach it through
//! the daemon, never by importing those domains' internals.

pub mod activity;
pub mod background;
pub mod config;
pub mod idle;

pub use activity::{Activity, LastActivity, Reading, SourceKind, SourceState};
pub use config::{IdleShutdownPolicy, LifecycleConfig};
pub use idle::{IdleClock, IdleEvent};

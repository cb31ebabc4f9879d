//! What the lifecycle domain publishes on the event log: idle transitions,
//! the warnings before an idle stop, the one stop request, and
//! postponements.

use std::time::SystemTime;

use super::activity::{LastActivity, Postponement, SourceKind};

/// A lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// Every enabled source went quiet (idle) or one became active.
    IdleChanged {
        /// Whether the instance is idle now.
        idle: bool,
        /// Since when it is idle (when idle).
        idle_since: Option<SystemTime>,
        /// The source that last reset the idle timer.
        last_activity: Option<(SourceKind, LastActivity)>,
    },
    /// The idle stop is near: at `warn_before` and again 5 minutes before.
    IdleShutdownPending {
        /// When the stop will be requested.
        deadline: SystemTime,
        /// Since when the instance is idle.
        idle_since: SystemTime,
    },
    /// The deadline passed: the control plane is asked to stop the
    /// instance (once per idle stretch).
    IdleShutdownRequested {
        /// Since when the instance is idle.
        idle_since: SystemTime,
    },
    /// The idle stop was postponed.
    IdleShutdownPostponed(Postponement),
}

//! One condition per subsystem (docker, disk, mounts, setup, ssh) and the one-line
//! summary built from them.
//!
//! Subsystems report here; `GetStatus`, systemd's `STATUS=` line and the CLI
//! read from here. It holds no policy of its own beyond ordering states by
//! severity.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A subsystem that has a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subsystem {
    /// The Docker engine.
    Docker,
    /// The disk guard.
    Disk,
    /// File share mounts.
    Mounts,
    /// Setup scripts.
    Setup,
    /// The SSH access policy.
    Ssh,
}

impl Subsystem {
    /// Every subsystem, in display order.
    pub const ALL: [Subsystem; 5] = [
        Subsystem::Docker,
        Subsystem::Disk,
        Subsystem::Mounts,
        Subsystem::Setup,
        Subsystem::Ssh,
    ];

    /// The name used on the wire and in the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Subsystem::Docker => "docker",
            Subsystem::Disk => "disk",
            Subsystem::Mounts => "mounts",
            Subsystem::Setup => "setup",
            Subsystem::Ssh => "ssh",
        }
    }
}

/// How a subsystem is doing, from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConditionState {
    /// Turned off or not available in this build.
    Disabled,
    /// Healthy.
    Ok,
    /// Not checked yet.
    Unknown,
    /// Working but needs attention.
    Degraded,
    /// Not working.
    Failed,
}

impl ConditionState {
    /// Short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            ConditionState::Disabled => "disabled",
            ConditionState::Ok => "ok",
            ConditionState::Unknown => "unknown",
            ConditionState::Degraded => "degraded",
            ConditionState::Failed => "failed",
        }
    }
}

/// The health of one subsystem.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// Its state.
    pub state: ConditionState,
    /// Human-readable explanation.
    pub message: String,
    /// When the state last changed.
    pub since: SystemTime,
}

/// The conditions of all subsystems. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    conditions: Arc<Mutex<BTreeMap<Subsystem, Condition>>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Every subsystem starts as unknown, "not checked yet".
    pub fn new() -> Self {
        let now = SystemTime::now();
        let conditions = Subsystem::ALL
            .into_iter()
            .map(|s| {
                (
                    s,
                    Condition {
                        state: ConditionState::Unknown,
                        message: "not checked yet".into(),
                        since: now,
                    },
                )
            })
            .collect();
        Self {
            conditions: Arc::new(Mutex::new(conditions)),
        }
    }

    /// Sets a condition; `since` moves only when the state changes. Returns
    /// true when the state changed.
    pub fn set(
        &self,
        subsystem: Subsystem,
        state: ConditionState,
        message: impl Into<String>,
    ) -> bool {
        let message = message.into();
        let mut conditions = self.lock();
        let entry = conditions.entry(subsystem).or_insert_with(|| Condition {
            state,
            message: message.clone(),
            since: SystemTime::now(),
        });
        let changed = entry.state != state;
        if changed {
            entry.since = SystemTime::now();
        }
        entry.state = state;
        entry.message = message;
        changed
    }

    /// One subsystem's condition.
    pub fn get(&self, subsystem: Subsystem) -> Condition {
        self.lock()
            .get(&subsystem)
            .cloned()
            .unwrap_or_else(|| Condition {
                state: ConditionState::Unknown,
                message: "not checked yet".into(),
                since: SystemTime::now(),
            })
    }

    /// All conditions in display order.
    pub fn all(&self) -> Vec<(Subsystem, Condition)> {
        self.lock().iter().map(|(s, c)| (*s, c.clone())).collect()
    }

    /// One line for systemd's STATUS= and the CLI: the worst state first, then
    /// every subsystem that is not ok with its message.
    pub fn summary(&self) -> String {
        summarize(&self.all())
    }

    /// All conditions and the summary made from them, read under one lock so
    /// that the two agree (GetStatus returns both).
    pub fn snapshot(&self) -> (Vec<(Subsystem, Condition)>, String) {
        let all = self.all();
        let summary = summarize(&all);
        (all, summary)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Subsystem, Condition>> {
        // Every mutation is a single field write; a poisoned map is still consistent.
        self.conditions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The summary line of a set of conditions.
fn summarize(all: &[(Subsystem, Condition)]) -> String {
    let worst = all
        .iter()
        .map(|(_, c)| c.state)
        .max()
        .unwrap_or(ConditionState::Ok);
    let problems: Vec<String> = all
        .iter()
        .filter(|(_, c)| c.state > ConditionState::Ok)
        .map(|(s, c)| format!("{} {}: {}", s.name(), c.state.name(), c.message))
        .collect();
    if problems.is_empty() {
        "healthy".to_owned()
    } else {
        let overall = if worst >= ConditionState::Degraded {
            worst.name()
        } else {
            "starting"
        };
        format!("{overall}: {}", problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_moves_only_on_state_change() {
        let health = Health::new();
        assert!(health.set(Subsystem::Docker, ConditionState::Ok, "up"));
        let since = health.get(Subsystem::Docker).since;
        assert!(!health.set(Subsystem::Docker, ConditionState::Ok, "still up"));
        let now = health.get(Subsystem::Docker);
        assert_eq!(now.since, since);
        assert_eq!(now.message, "still up");
    }

    #[test]
    fn summary_names_the_worst_problem() {
        let health = Health::new();
        for s in Subsystem::ALL {
            health.set(s, ConditionState::Ok, "fine");
        }
        assert_eq!(health.summary(), "healthy");
        health.set(
            Subsystem::Docker,
            ConditionState::Failed,
            "engine unreachable",
        );
        health.set(Subsystem::Disk, ConditionState::Degraded, "/ at 8 GiB");
        assert_eq!(
            health.summary(),
            "failed: docker failed: engine unreachable; disk degraded: / at 8 GiB"
        );
    }

    #[test]
    fn disabled_subsystems_do_not_make_the_agent_unhealthy() {
        let health = Health::new();
        for s in Subsystem::ALL {
            health.set(s, ConditionState::Disabled, "off");
        }
        assert_eq!(health.summary(), "healthy");
    }
}

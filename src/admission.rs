//! Admission of queued jobs: any subsystem may hold the queue (the disk guard
//! while a critical filesystem holds the engine's data or the state dir; the
//! setup module until the creation script has succeeded). Running jobs are
//! never touched; queued jobs start again by themselves once every hold is
//! released.
//!
//! Owns only the set of holds and their reasons; the policy of when to hold
//! belongs to each subsystem.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

/// The holds currently in force, by the subsystem that placed them.
pub type Holds = BTreeMap<&'static str, String>;

/// The shared admission gate. Cheap to clone.
#[derive(Clone)]
pub struct AdmissionGate {
    holds: Arc<watch::Sender<Holds>>,
}

impl Default for AdmissionGate {
    fn default() -> Self {
        Self::new()
    }
}

impl AdmissionGate {
    /// An open gate.
    pub fn new() -> Self {
        Self {
            holds: Arc::new(watch::channel(Holds::new()).0),
        }
    }

    /// Holds the queue on behalf of `holder` (e.g. "disk"), replacing its
    /// previous reason.
    pub fn hold(&self, holder: &'static str, reason: impl Into<String>) {
        let reason = reason.into();
        self.holds.send_if_modified(|holds| {
            if holds.get(holder) == Some(&reason) {
                return false;
            }
            holds.insert(holder, reason);
            true
        });
    }

    /// Releases `holder`'s hold, if any.
    pub fn release(&self, holder: &'static str) {
        self.holds
            .send_if_modified(|holds| holds.remove(holder).is_some());
    }

    /// Why jobs may not start now; `None` when they may.
    pub fn held_reason(&self) -> Option<String> {
        let holds = self.holds.borrow();
        (!holds.is_empty()).then(|| {
            holds
                .iter()
                .map(|(holder, reason)| format!("{holder}: {reason}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// A receiver that changes whenever a hold is placed or released.
    pub fn subscribe(&self) -> watch::Receiver<Holds> {
        self.holds.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_and_releases() {
        let gate = AdmissionGate::new();
        let mut rx = gate.subscribe();
        assert_eq!(gate.held_reason(), None);
        gate.hold("disk", "/var/lib/docker is critical");
        gate.hold("setup", "creation script has not succeeded");
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            gate.held_reason().unwrap(),
            "disk: /var/lib/docker is critical; setup: creation script has not succeeded"
        );
        rx.borrow_and_update();
        gate.hold("disk", "/var/lib/docker is critical");
        assert!(!rx.has_changed().unwrap(), "same reason is not a change");
        gate.release("disk");
        gate.release("setup");
        assert_eq!(gate.held_reason(), None);
    }
}

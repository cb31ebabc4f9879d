//! The shared plumbing of the domains' unit tests: a temp dir with a store
//! in it, the event bus, health, the admission gate, one cancellation token
//! and one task tracker, as `daemon/mod.rs` builds them for the real agent.
//!
//! Test-only (`cfg(test)`); fakes of the outside world stay in each domain's
//! `fake.rs`. A domain's test harness embeds a [`Rig`] and adds its own parts.

use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::AdmissionGate;
use crate::events::EventBus;
use crate::health::Health;
use crate::store::Store;

/// What every domain's unit test needs from the daemon.
pub(crate) struct Rig {
    /// Removed when the rig is dropped (held only for that).
    _dir: tempfile::TempDir,
    /// The canonical path of `dir` (tests compare paths the agent resolved).
    pub root: PathBuf,
    /// A store in `root/state`.
    pub store: Store,
    /// Event log with a backlog large enough for any one test.
    pub events: EventBus,
    /// Conditions.
    pub health: Health,
    /// Holds on the job queue.
    pub admission: AdmissionGate,
    /// Cancelled on drop, so background tasks of a failed test stop.
    pub cancel: CancellationToken,
    /// The tasks the domain under test spawns.
    pub tasks: TaskTracker,
}

impl Rig {
    /// A fresh rig in a new temp dir.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().canonicalize().expect("canonical temp dir");
        let state = root.join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        let store = Store::open(&state).expect("store");
        Self {
            _dir: dir,
            root,
            store,
            events: EventBus::new(4096),
            health: Health::new(),
            admission: AdmissionGate::new(),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// The state dir (where the store lives).
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// `root/name`, created.
    pub fn subdir(&self, name: impl AsRef<Path>) -> PathBuf {
        let path = self.root.join(name);
        std::fs::create_dir_all(&path).expect("rig subdir");
        path
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Moves the calling test thread into a mount namespace of its own, with
/// every mount private: what the test mounts stays in it and goes with the
/// thread. Needs root. Descriptors to bind from must be opened after this
/// call (a bind source must be in the caller's namespace).
pub fn private_mount_namespace() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare a mount namespace");
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make the test's mounts private");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rig_has_a_store_in_its_own_dir_and_cancels_on_drop() {
        let rig = Rig::new();
        assert!(rig.state_dir().starts_with(&rig.root));
        assert!(rig.state_dir().is_dir());
        let cancel = rig.cancel.clone();
        let root = rig.root.clone();
        drop(rig);
        assert!(cancel.is_cancelled());
        assert!(!root.exists());
    }
}

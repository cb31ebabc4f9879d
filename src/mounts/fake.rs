//! A fake [`FuseMounter`] for unit tests: processes and mounts are entries in
//! memory that a test can kill, make stale or make busy, and every call is
//! recorded.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::system::{FuseMounter, Launch, Probe, ProcessState, UnmountFailure};
use crate::mountinfo::MountEntry;

#[derive(Debug, Default)]
struct State {
    next_pid: u32,
    /// pid → (launch, how it ended when it did).
    processes: BTreeMap<u32, (Launch, Option<String>)>,
    /// Mounted paths → the pid serving them.
    mounts: BTreeMap<PathBuf, u32>,
    /// Outcomes of the next spawns: the output a failing blobfuse2 writes.
    failures: VecDeque<String>,
    /// Paths whose probe hangs (reported as a timeout).
    hung: BTreeSet<PathBuf>,
    /// Paths with open files.
    busy: BTreeSet<PathBuf>,
    /// How many of the next spawns start a process that never mounts.
    hanging_spawns: usize,
    /// Why the next clean unmounts fail (not busy: e.g. fusermount3 timed out).
    unmount_failures: VecDeque<String>,
    /// Mounts of other programs: path → (type, source).
    foreign: BTreeMap<PathBuf, (String, String)>,
    calls: Vec<String>,
}

/// The fake mounter.
#[derive(Debug, Default)]
pub struct FakeMounter {
    state: Mutex<State>,
}

impl FakeMounter {
    /// No processes, no mounts.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                next_pid: 1000,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next spawn exits 1 after writing `output` (e.g. "Error: invalid auth mode").
    pub fn fail_next_spawn(&self, output: &str) {
        self.lock().failures.push_back(output.to_owned());
    }

    /// The next spawn starts a process that runs but never mounts (a hung
    /// blobfuse2).
    pub fn hang_next_spawn(&self) {
        self.lock().hanging_spawns += 1;
    }

    /// The next clean (non-lazy) unmount fails with `detail`.
    pub fn fail_next_unmount(&self, detail: &str) {
        self.lock().unmount_failures.push_back(detail.to_owned());
    }

    /// Another program mounts `fs_type` from `source` at `path` (over
    /// whatever is there); `None` takes it away.
    pub fn set_foreign(&self, path: &Path, mount: Option<(&str, &str)>) {
        let mut s = self.lock();
        match mount {
            Some((fs_type, source)) => {
                s.foreign
                    .insert(path.to_owned(), (fs_type.into(), source.into()));
            }
            None => {
                s.foreign.remove(path);
            }
        }
    }

    /// Whether a process still runs.
    pub fn running(&self, pid: u32) -> bool {
        self.lock()
            .processes
            .get(&pid)
            .is_some_and(|(_, end)| end.is_none())
    }

    /// Kills the process like SIGKILL: its mount stays, stale.
    pub fn kill(&self, pid: u32) {
        if let Some(p) = self.lock().processes.get_mut(&pid) {
            p.1 = Some("killed by SIGKILL".into());
        }
    }

    /// Makes the probe of `path` hang (or not).
    pub fn set_hung(&self, path: &Path, hung: bool) {
        let mut s = self.lock();
        if hung {
            s.hung.insert(path.to_owned());
        } else {
            s.hung.remove(path);
        }
    }

    /// Makes `path` busy (a file held open) or not.
    pub fn set_busy(&self, path: &Path, busy: bool) {
        let mut s = self.lock();
        if busy {
            s.busy.insert(path.to_owned());
        } else {
            s.busy.remove(path);
        }
    }

    /// Starts a process that serves `launch` outside the agent (as if it
    /// survived an agent restart). Returns its pid.
    pub fn preexisting(&self, launch: &Launch) -> u32 {
        let mut s = self.lock();
        s.next_pid += 1;
        let pid = s.next_pid;
        s.processes.insert(pid, (launch.clone(), None));
        s.mounts.insert(launch.mount_path.clone(), pid);
        pid
    }

    /// Every call so far, e.g. "spawn /mnt/data", "unmount -z /mnt/data".
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// How many processes were spawned.
    pub fn spawns(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.starts_with("spawn "))
            .count()
    }

    /// The pid serving a path, if mounted.
    pub fn pid_at(&self, path: &Path) -> Option<u32> {
        self.lock().mounts.get(path).copied()
    }
}

#[async_trait]
impl FuseMounter for FakeMounter {
    async fn spawn(&self, launch: &Launch) -> std::io::Result<u32> {
        let mut s = self.lock();
        s.calls
            .push(format!("spawn {}", launch.mount_path.display()));
        s.next_pid += 1;
        let pid = s.next_pid;
        if s.hanging_spawns > 0 {
            s.hanging_spawns -= 1;
            s.processes.insert(pid, (launch.clone(), None));
        } else if let Some(output) = s.failures.pop_front() {
            std::fs::write(&launch.output_file, format!("{output}\n"))?;
            s.processes
                .insert(pid, (launch.clone(), Some("exit status 1".into())));
        } else {
            s.processes.insert(pid, (launch.clone(), None));
            s.mounts.insert(launch.mount_path.clone(), pid);
        }
        Ok(pid)
    }

    async fn process_state(&self, pid: u32, _launch: &Launch) -> ProcessState {
        match self.lock().processes.get(&pid) {
            Some((_, None)) => ProcessState::Running,
            Some((_, Some(how))) => ProcessState::Exited(how.clone()),
            None => ProcessState::Exited("exited".into()),
        }
    }

    async fn find_process(&self, launch: &Launch) -> Option<u32> {
        self.lock()
            .processes
            .iter()
            .find(|(_, (l, end))| end.is_none() && l == launch)
            .map(|(pid, _)| *pid)
    }

    async fn is_launched(&self, pid: u32, launch: &Launch) -> bool {
        self.lock()
            .processes
            .get(&pid)
            .is_some_and(|(l, end)| end.is_none() && l == launch)
    }

    async fn mount_entry(&self, path: &Path) -> std::io::Result<Option<MountEntry>> {
        let s = self.lock();
        if let Some((fs_type, source)) = s.foreign.get(path) {
            return Ok(Some(MountEntry {
                id: 0,
                peer_group: None,
                dev: (0, 0),
                mount_point: path.to_owned(),
                fs_type: fs_type.clone(),
                source: source.clone(),
            }));
        }
        Ok(s.mounts.contains_key(path).then(|| MountEntry {
            id: 0,
            peer_group: None,
            dev: (0, 0),
            mount_point: path.to_owned(),
            fs_type: "fuse".into(),
            source: "blobfuse2".into(),
        }))
    }

    async fn probe(&self, path: &Path, timeout: Duration) -> Probe {
        let hung = {
            let s = self.lock();
            if let Some(pid) = s.mounts.get(path)
                && s.processes.get(pid).is_some_and(|(_, end)| end.is_some())
            {
                return Probe::Stale("Transport endpoint is not connected (os error 107)".into());
            }
            s.hung.contains(path)
        };
        if hung {
            tokio::time::sleep(timeout).await;
            return Probe::Stale(format!(
                "the mount root did not answer within {} s",
                timeout.as_secs_f32()
            ));
        }
        Probe::Healthy
    }

    async fn unmount(&self, path: &Path, lazy: bool) -> Result<(), UnmountFailure> {
        let mut s = self.lock();
        s.calls.push(format!(
            "unmount{} {}",
            if lazy { " -z" } else { "" },
            path.display()
        ));
        if s.foreign.contains_key(path) {
            // The agent must never get here: it unmounts only blobfuse2's mounts.
            s.foreign.remove(path);
            return Ok(());
        }
        if !lazy && let Some(detail) = s.unmount_failures.pop_front() {
            return Err(UnmountFailure::Other(detail));
        }
        if !lazy && s.busy.contains(path) {
            return Err(UnmountFailure::Busy(format!(
                "fusermount3: failed to unmount {}: Device or resource busy",
                path.display()
            )));
        }
        match s.mounts.remove(path) {
            Some(_) => Ok(()),
            None => Err(UnmountFailure::Other(format!(
                "fusermount3: entry for {} not found in /etc/mtab",
                path.display()
            ))),
        }
    }

    async fn stop(&self, pid: u32, _launch: &Launch, _grace: Duration) {
        let mut s = self.lock();
        s.calls.push(format!("stop {pid}"));
        if let Some(p) = s.processes.get_mut(&pid)
            && p.1.is_none()
        {
            p.1 = Some("killed by SIGTERM".into());
        }
    }
}

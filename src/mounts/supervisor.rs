//! One mount's state machine, run as a task per mount:
//!
//! ```text
//! start ──(restore)──> adopt? ──healthy──────────────────────> MOUNTED
//!   │                    └─stale/dead──> STALE ─> repair ─┐      │
//!   └─(fresh)──> MOUNTING ──in mountinfo──> MOUNTED       │      │ every health interval:
//!                   │                         ▲           │      │ process alive? in mountinfo?
//!                   └─blobfuse2 failed─> FAILED ─backoff─> REMOUNTING <─ STALE ─┘ statfs within timeout?
//! ```
//!
//! Repair: stop the process, `fusermount3 -u -z`, empty the cache dir, mount
//! again; failures back off exponentially from `mounts.backoff_initial_seconds`
//! to `mounts.backoff_max_seconds`. Stopping the task (agent shutdown) leaves
//! the mount and its process running, to be adopted by the next agent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::registry::{ProcessRecord, Registry};
use super::render;
use super::secrets;
use super::settings::MountSettings;
use super::spec::{MountSpec, SecretSource};
use super::system::{FuseMounter, Launch, Probe, ProcessState, is_blobfuse2};
use super::{MountError, MountState, MountStatus};
use crate::secret::Secret;

/// What every supervisor works with, shared with the service.
pub(super) struct Shared {
    /// Timeouts, backoff, where a mount's files go.
    pub settings: MountSettings,
    /// The outside world.
    pub mounter: Arc<dyn FuseMounter>,
    /// `mounts.health_interval_seconds`, as it is now.
    pub interval: watch::Receiver<Duration>,
    /// The table, the records and what they show.
    pub registry: Registry,
}

/// How a supervisor begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start {
    /// A new request: nothing can be running yet.
    Fresh,
    /// Agent start: adopt a healthy running mount, else repair or mount.
    Restore,
}

/// How often the mount is looked for in mountinfo while blobfuse2 starts:
/// first after 10 ms, doubling up to 100 ms (most mounts appear quickly).
const MOUNT_POLL_FIRST: Duration = Duration::from_millis(10);
const MOUNT_POLL_MAX: Duration = Duration::from_millis(100);

struct Supervisor {
    shared: Arc<Shared>,
    spec: Arc<MountSpec>,
    launch: Launch,
    status: watch::Sender<MountStatus>,
    stop: CancellationToken,
    check_now: Arc<Notify>,
    first: Option<oneshot::Sender<Result<(), MountError>>>,
}

enum Next {
    /// Mount (again); `repair` when it was up before.
    Mount { repair: bool },
    /// Up, served by this pid: check its health every interval.
    Watch(u32),
}

/// How the service talks to a running supervisor.
pub(super) struct Control {
    /// Where it publishes the mount's status.
    pub status: watch::Sender<MountStatus>,
    /// Stops it.
    pub stop: CancellationToken,
    /// Wakes it for a health check before the next interval.
    pub check_now: Arc<Notify>,
}

/// Runs one mount until `control.stop` fires.
pub(super) async fn run(
    shared: Arc<Shared>,
    spec: Arc<MountSpec>,
    control: Control,
    start: Start,
    first: Option<oneshot::Sender<Result<(), MountError>>>,
) {
    let launch = shared.settings.launch(&spec);
    let mut s = Supervisor {
        shared,
        spec,
        launch,
        status: control.status,
        stop: control.stop,
        check_now: control.check_now,
        first,
    };
    if start == Start::Restore {
        s.restore_counts();
    }
    let mut next = match start {
        Start::Fresh => Next::Mount { repair: false },
        Start::Restore => s.adopt().await,
    };
    let mut backoff = s.shared.settings.backoff_initial;
    loop {
        if s.stop.is_cancelled() {
            return;
        }
        next = match next {
            Next::Mount { repair } => {
                let state = if repair {
                    MountState::Remounting
                } else {
                    MountState::Mounting
                };
                s.set(state, String::new(), None);
                match s.attempt().await {
                    Ok(pid) => {
                        backoff = s.shared.settings.backoff_initial;
                        s.set(MountState::Mounted, String::new(), Some(pid));
                        s.record_process().await;
                        s.report_first(Ok(()));
                        Next::Watch(pid)
                    }
                    Err(MountError::Cancelled(_)) => return,
                    Err(error) => {
                        let message = format!(
                            "{}; retrying in {} s",
                            failure_message(&error),
                            backoff.as_secs()
                        );
                        tracing::warn!(mount = %s.spec.name, detail = %message, "mount failed");
                        s.set(MountState::Failed, message, None);
                        s.report_first(Err(error));
                        if !s.sleep(backoff).await {
                            return;
                        }
                        backoff = (backoff * 2).min(s.shared.settings.backoff_max);
                        Next::Mount { repair }
                    }
                }
            }
            Next::Watch(pid) => {
                let interval = *s.shared.interval.borrow();
                if !s.until_next_check(interval).await {
                    return;
                }
                match s.check(pid).await {
                    None => Next::Watch(pid),
                    Some(reason) => {
                        s.repair(pid, reason).await;
                        Next::Mount { repair: true }
                    }
                }
            }
        };
    }
}

/// The error as the status message shows it: blobfuse2's own line verbatim.
fn failure_message(error: &MountError) -> String {
    match error {
        MountError::Blobfuse2 {
            status, message, ..
        } => format!("blobfuse2 failed ({status}): {message}"),
        other => other.to_string(),
    }
}

impl Supervisor {
    /// Sets state and message; an event and the condition follow a change.
    fn set(&self, state: MountState, message: String, pid: Option<u32>) {
        let mut changed = false;
        self.status.send_modify(|s| {
            changed = s.state != state || s.message != message || s.pid != pid;
            s.state = state;
            s.message = message;
            s.pid = pid;
        });
        if changed {
            let status = self.status.borrow().clone();
            tracing::info!(mount = %status.name, state = status.state.name(), detail = %status.message, "mount state changed");
            self.shared.registry.publish(&status);
        }
    }

    fn report_first(&mut self, outcome: Result<(), MountError>) {
        if let Some(first) = self.first.take() {
            let _ = first.send(outcome);
        }
    }

    /// Sleeps unless stopped first; false when stopped.
    async fn sleep(&self, duration: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(duration) => true,
        }
    }

    /// Waits for the next health check: the interval, or a request for one
    /// now; false when stopped.
    async fn until_next_check(&self, interval: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(interval) => true,
            _ = self.check_now.notified() => true,
        }
    }

    fn restore_counts(&self) {
        if let Some(record) = self.shared.registry.process(&self.spec.name) {
            self.status
                .send_modify(|s| s.remount_count = record.remount_count);
        }
    }

    async fn record_process(&self) {
        let status = self.status.borrow().clone();
        let record = ProcessRecord {
            pid: status.pid,
            remount_count: status.remount_count,
        };
        if let Err(error) = self
            .shared
            .registry
            .record_process(&self.spec.name, &record)
            .await
        {
            tracing::warn!(mount = %self.spec.name, %error, "cannot record the blobfuse2 pid; a restarted agent will find it by its command line");
        }
    }

    /// At agent start: takes over a healthy running mount, or says what to do.
    async fn adopt(&mut self) -> Next {
        let mounter = self.shared.mounter.clone();
        let mut recorded = self
            .shared
            .registry
            .process(&self.spec.name)
            .and_then(|r| r.pid);
        if let Some(pid) = recorded
            && mounter.process_state(pid, &self.launch).await != ProcessState::Running
        {
            recorded = None;
        }
        let pid = match recorded {
            Some(pid) => Some(pid),
            None => mounter.find_process(&self.launch).await,
        };
        let entry = mounter
            .mount_entry(&self.spec.mount_path)
            .await
            .ok()
            .flatten();
        // Only blobfuse2's own mount is taken over; anything else at the
        // path is left alone and the mount attempt reports it (FAILED, in use).
        let mounted = entry.as_ref().is_some_and(is_blobfuse2);
        match (mounted, pid) {
            (true, Some(pid)) => {
                if !self.config_unchanged().await {
                    self.repair(pid, "its config changed since it was mounted".into())
                        .await;
                    return Next::Mount { repair: true };
                }
                match mounter
                    .probe(&self.spec.mount_path, self.shared.settings.health_timeout)
                    .await
                {
                    Probe::Healthy => {
                        self.status
                            .send_modify(|s| s.last_checked = Some(SystemTime::now()));
                        self.set(
                            MountState::Mounted,
                            format!("adopted the running blobfuse2 (pid {pid})"),
                            Some(pid),
                        );
                        self.record_process().await;
                        Next::Watch(pid)
                    }
                    Probe::Stale(reason) => {
                        self.repair(pid, reason).await;
                        Next::Mount { repair: true }
                    }
                }
            }
            (true, None) => {
                self.repair_without_process("blobfuse2 is not running".into())
                    .await;
                Next::Mount { repair: true }
            }
            (false, Some(pid)) => {
                // A blobfuse2 without its mount is of no use; start clean.
                mounter
                    .stop(pid, &self.launch, self.shared.settings.stop_grace)
                    .await;
                Next::Mount { repair: false }
            }
            (false, None) => Next::Mount { repair: false },
        }
    }

    /// Whether the running mount's config is the one the agent would write now.
    async fn config_unchanged(&self) -> bool {
        let Ok(wanted) = self.render().await else {
            return false;
        };
        let path = self.launch.config_file.clone();
        tokio::task::spawn_blocking(move || std::fs::read_to_string(path))
            .await
            .ok()
            .and_then(Result::ok)
            .is_some_and(|current| current == wanted)
    }

    /// One health check. `None` when healthy, else why it is stale.
    async fn check(&self, pid: u32) -> Option<String> {
        let mounter = &self.shared.mounter;
        let reason =
            if let ProcessState::Exited(how) = mounter.process_state(pid, &self.launch).await {
                Some(format!("blobfuse2 (pid {pid}) {how}"))
            } else {
                match mounter.mount_entry(&self.spec.mount_path).await {
                    Ok(Some(e)) if is_blobfuse2(&e) => match mounter
                        .probe(&self.spec.mount_path, self.shared.settings.health_timeout)
                        .await
                    {
                        Probe::Healthy => None,
                        Probe::Stale(reason) => Some(reason),
                    },
                    Ok(Some(e)) => Some(format!(
                        "something else is mounted over it ({} from {})",
                        e.fs_type, e.source
                    )),
                    Ok(None) => Some("the mount disappeared from /proc/self/mountinfo".into()),
                    // Cannot read mountinfo: nothing is known to be wrong with the mount.
                    Err(_) => None,
                }
            };
        self.status
            .send_modify(|s| s.last_checked = Some(SystemTime::now()));
        reason
    }

    /// Marks the mount stale, stops its process and unmounts it lazily.
    async fn repair(&self, pid: u32, reason: String) {
        self.set(MountState::Stale, reason.clone(), Some(pid));
        self.shared
            .mounter
            .stop(pid, &self.launch, self.shared.settings.stop_grace)
            .await;
        self.lazy_unmount().await;
        self.count_repair();
    }

    async fn repair_without_process(&self, reason: String) {
        self.set(MountState::Stale, reason, None);
        self.lazy_unmount().await;
        self.count_repair();
    }

    fn count_repair(&self) {
        self.status.send_modify(|s| s.remount_count += 1);
    }

    /// `fusermount3 -u -z` of blobfuse2's mount at the path; anything else
    /// mounted there is never touched.
    async fn lazy_unmount(&self) {
        let mounter = &self.shared.mounter;
        if let Ok(Some(entry)) = mounter.mount_entry(&self.spec.mount_path).await
            && is_blobfuse2(&entry)
            && let Err(failure) = mounter.unmount(&self.spec.mount_path, true).await
        {
            tracing::warn!(mount = %self.spec.name, ?failure, "lazy unmount failed");
        }
    }

    /// The secret for this attempt: read from its file each time, so a
    /// rotated key is used by the next repair.
    async fn secret(&self) -> Result<Option<Secret>, MountError> {
        let Some(source) = self.spec.auth.secret_source() else {
            return Ok(None);
        };
        match source {
            SecretSource::Given(secret) => Ok(Some(secret.clone())),
            SecretSource::File(path) => {
                let owned = path.clone();
                tokio::task::spawn_blocking(move || secrets::load_file(&owned))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
                    .map(Some)
                    .map_err(|problem| MountError::Invalid {
                        name: self.spec.name.clone(),
                        field: "secret_file",
                        problem,
                    })
            }
        }
    }

    async fn render(&self) -> Result<String, MountError> {
        let secret = self.secret().await?;
        Ok(render::render(
            &self.spec,
            secret.as_ref(),
            &self.shared.settings.log_file(&self.spec.name),
        ))
    }

    /// One mount attempt: prepare dirs, empty the cache, write the config,
    /// start blobfuse2, and wait for the mount in mountinfo.
    async fn attempt(&self) -> Result<u32, MountError> {
        let name = &self.spec.name;
        let mounter = self.shared.mounter.clone();
        // A leftover blobfuse2 mount at the path is ours (the path was
        // checked free when the mount was requested); anything else is not.
        match mounter.mount_entry(&self.spec.mount_path).await {
            Ok(Some(e)) if is_blobfuse2(&e) => self.lazy_unmount().await,
            Ok(Some(e)) => {
                return Err(MountError::InUse {
                    name: name.clone(),
                    what: format!(
                        "path {} is mounted by something else ({} from {})",
                        self.spec.mount_path.display(),
                        e.fs_type,
                        e.source
                    ),
                });
            }
            _ => {}
        }
        let yaml = self.render().await?;
        let secret = self.secret().await?;
        self.prepare_files(yaml).await?;
        let pid = mounter
            .spawn(&self.launch)
            .await
            .map_err(|source| MountError::Spawn {
                name: name.clone(),
                program: self.launch.program.clone(),
                source,
            })?;
        self.status.send_modify(|s| s.pid = Some(pid));
        let timeout = self.shared.settings.mount_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut poll = MOUNT_POLL_FIRST;
        loop {
            if let ProcessState::Exited(how) = mounter.process_state(pid, &self.launch).await {
                let output = self.read_output().await;
                let message = match &secret {
                    Some(secret) => secrets::scrub(&output, secret),
                    None => output,
                };
                return Err(MountError::Blobfuse2 {
                    name: name.clone(),
                    status: how,
                    message,
                });
            }
            if let Ok(Some(entry)) = mounter.mount_entry(&self.spec.mount_path).await
                && is_blobfuse2(&entry)
            {
                return Ok(pid);
            }
            if tokio::time::Instant::now() >= deadline {
                mounter
                    .stop(pid, &self.launch, self.shared.settings.stop_grace)
                    .await;
                self.lazy_unmount().await;
                return Err(MountError::Timeout {
                    name: name.clone(),
                    path: self.spec.mount_path.clone(),
                    seconds: timeout.as_secs(),
                });
            }
            let slept = self.sleep(poll).await;
            poll = (poll * 2).min(MOUNT_POLL_MAX);
            if !slept {
                // Stopped while starting: leave nothing half-started behind.
                mounter
                    .stop(pid, &self.launch, self.shared.settings.stop_grace)
                    .await;
                self.lazy_unmount().await;
                return Err(MountError::Cancelled(name.clone()));
            }
        }
    }

    /// Creates the mount dir, the (emptied) cache dir and the logs dir,
    /// writes the 0600 config and rotates blobfuse2's previous output.
    async fn prepare_files(&self, yaml: String) -> Result<(), MountError> {
        let name = self.spec.name.clone();
        let name_for_cache = name.clone();
        let mount_path = self.spec.mount_path.clone();
        let cache_dir = self.spec.cache_dir.clone();
        let launch = self.launch.clone();
        let logs_dir = self.shared.settings.logs_dir.clone();
        let io = move |action: &'static str, path: PathBuf| {
            let name = name.clone();
            move |source| MountError::Io {
                name,
                action,
                path,
                source,
            }
        };
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::DirBuilderExt;
            let mut dirs = std::fs::DirBuilder::new();
            dirs.recursive(true).mode(0o755);
            dirs.create(&mount_path)
                .map_err(io("create the mount dir", mount_path.clone()))?;
            dirs.create(&logs_dir)
                .map_err(io("create the logs dir", logs_dir.clone()))?;
            // Only a cache dir the agent owns is emptied (see `cache`).
            super::cache::claim(&cache_dir, &name_for_cache).map_err(|e| MountError::CacheDir {
                name: name_for_cache.clone(),
                path: cache_dir.clone(),
                problem: e.to_string(),
            })?;
            // blobfuse2 refuses a non-empty cache dir; a crashed one leaves files.
            super::cache::empty(&cache_dir, false)
                .map_err(io("empty the cache dir", cache_dir.clone()))?;
            let blobfuse2_cache = super::cache::blobfuse2_dir(&cache_dir);
            dirs.mode(0o700)
                .create(&blobfuse2_cache)
                .map_err(io("create the cache dir", blobfuse2_cache.clone()))?;
            secrets::write_private(&launch.config_file, yaml.as_bytes())
                .map_err(io("write the blobfuse2 config", launch.config_file.clone()))?;
            let previous = launch.output_file.with_extension("out.1");
            let _ = std::fs::rename(&launch.output_file, previous);
            Ok(())
        })
        .await
        .map_err(|e| MountError::Io {
            name: self.spec.name.clone(),
            action: "prepare",
            path: self.spec.mount_path.clone(),
            source: std::io::Error::other(e),
        })?
    }

    /// blobfuse2's `Error: ...` line from its output, else its last line.
    async fn read_output(&self) -> String {
        let path = self.launch.output_file.clone();
        let text = tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&text[text.len().saturating_sub(8192)..]).into_owned();
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        lines
            .iter()
            .rev()
            .find(|l| l.starts_with("Error:"))
            .or(lines.last())
            .map(|l| (*l).to_owned())
            .unwrap_or_else(|| "no output".into())
    }
}

#[cfg(test)]
mod tests;

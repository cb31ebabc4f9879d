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
//!
//! Every attempt opens and checks the mount and cache dirs again
//! ([`super::handoff`]), a restored mount's too, and everything the
//! supervisor does by name afterwards (mountinfo, probes, unmounts, the
//! blobfuse2 command line) uses the paths blobfuse2 was handed, which only
//! root can change.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::handoff::{self, Handed, HandedPaths};
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
    /// What each mount's blobfuse2 was handed (its own paths or staging
    /// entries).
    pub handed: HandedPaths,
    /// Where requested paths are resolved (they may hang).
    pub host_paths: crate::paths::offload::Offload,
}

impl Shared {
    /// The paths blobfuse2 is (or was last) handed for a mount.
    pub fn handed(&self, spec: &MountSpec) -> Handed {
        self.handed.of(spec)
    }

    /// How blobfuse2 is started for a mount, at the path it is handed.
    pub fn launch(&self, spec: &MountSpec) -> Launch {
        self.handed.launch(&self.settings, spec)
    }
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
    if start == Start::Restore {
        let (settings_spec, found) = (spec.clone(), shared.clone());
        let handed =
            tokio::task::spawn_blocking(move || handoff::adopted(&found.settings, &settings_spec))
                .await
                .unwrap_or_else(|_| Handed::of(&spec));
        shared.handed.set(&spec.name, handed);
    }
    let launch = shared.launch(&spec);
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
        // The recorded pid only if it is still the agent's blobfuse2 (its
        // command line, owner and program): never a look-alike.
        if let Some(pid) = recorded
            && (mounter.process_state(pid, &self.launch).await != ProcessState::Running
                || !mounter.is_launched(pid, &self.launch).await)
        {
            recorded = None;
        }
        let pid = match recorded {
            Some(pid) => Some(pid),
            None => mounter.find_process(&self.launch).await,
        };
        let entry = mounter
            .mount_entry(&self.launch.mount_path)
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
                    .probe(&self.launch.mount_path, self.shared.settings.health_timeout)
                    .await
                {
                    Probe::Healthy => {
                        if let Err(error) = self.ensure_mirrored().await {
                            self.repair(pid, error.to_string()).await;
                            return Next::Mount { repair: true };
                        }
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
                self.stop_process(pid).await;
                Next::Mount { repair: false }
            }
            (false, None) => Next::Mount { repair: false },
        }
    }

    /// For an adopted mount on a staging entry: its bind on the user's dir.
    async fn ensure_mirrored(&self) -> Result<(), MountError> {
        if !handoff::is_staged(&self.shared.settings, &self.launch.mount_path) {
            return Ok(());
        }
        let (shared, spec) = (self.shared.clone(), self.spec.clone());
        tokio::task::spawn_blocking(move || handoff::ensure_mirrored(&shared.settings, &spec))
            .await
            .unwrap_or(Ok(()))
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
                match mounter.mount_entry(&self.launch.mount_path).await {
                    Ok(Some(e)) if is_blobfuse2(&e) => match mounter
                        .probe(&self.launch.mount_path, self.shared.settings.health_timeout)
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
        self.stop_process(pid).await;
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

    /// `fusermount3 -u -z` of blobfuse2's mount at the path (its bind on
    /// the user's side first, for a staged mount); anything else mounted
    /// there is never touched.
    async fn lazy_unmount(&self) {
        self.unmirror().await;
        let mounter = &self.shared.mounter;
        if let Ok(Some(entry)) = mounter.mount_entry(&self.launch.mount_path).await
            && is_blobfuse2(&entry)
            && let Err(failure) = mounter.unmount(&self.launch.mount_path, true).await
        {
            tracing::warn!(mount = %self.spec.name, ?failure, "lazy unmount failed");
        }
    }

    /// Stops blobfuse2: its bind on the user's path first, for a staged
    /// mount (blobfuse2 takes its own mount off as it exits, and the bind is
    /// found through that mount).
    async fn stop_process(&self, pid: u32) {
        self.unmirror().await;
        self.shared
            .mounter
            .stop(pid, &self.launch, self.shared.settings.stop_grace)
            .await;
    }

    /// Takes a staged mount's bind off the user's path (see [`handoff`]).
    async fn unmirror(&self) {
        if handoff::is_staged(&self.shared.settings, &self.launch.mount_path) {
            let (shared, name) = (self.shared.clone(), self.spec.name.clone());
            let _ = tokio::task::spawn_blocking(move || handoff::unmirror(&shared.settings, &name))
                .await;
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

    /// The blobfuse2 config for the paths it is handed.
    async fn render(&self) -> Result<String, MountError> {
        let secret = self.secret().await?;
        let handed = self.shared.handed(&self.spec);
        let mut seen = (*self.spec).clone();
        seen.mount_path = handed.mount_path;
        seen.cache_dir = handed.cache_dir;
        Ok(render::render(
            &seen,
            secret.as_ref(),
            &self.shared.settings.log_file(&self.spec),
            self.shared.settings.default_permission,
        ))
    }

    /// One mount attempt: open and check the dirs, empty the cache, stage
    /// what a user can change, write the config, start blobfuse2, and wait
    /// for the mount in mountinfo.
    async fn attempt(&mut self) -> Result<u32, MountError> {
        let name = self.spec.name.clone();
        let name = &name;
        let mounter = self.shared.mounter.clone();
        // A leftover blobfuse2 mount at the path is ours (the path was
        // checked free when the mount was requested); anything else is not.
        match mounter.mount_entry(&self.launch.mount_path).await {
            Ok(Some(e)) if is_blobfuse2(&e) => self.lazy_unmount().await,
            Ok(Some(e)) => {
                return Err(MountError::InUse {
                    name: name.clone(),
                    what: format!(
                        "path {} is mounted by something else ({} from {})",
                        self.launch.mount_path.display(),
                        e.fs_type,
                        e.source
                    ),
                });
            }
            _ => {}
        }
        let prepared = self.prepare_dirs().await?;
        self.shared.handed.set(name, prepared.handed);
        self.launch = self.shared.launch(&self.spec);
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
            if let Ok(Some(entry)) = mounter.mount_entry(&self.launch.mount_path).await
                && is_blobfuse2(&entry)
            {
                if let Some(dir) = prepared.mirror_onto {
                    // Up on the staging entry: now onto the user's dir.
                    let (shared, mount) = (self.shared.clone(), name.clone());
                    let mirrored = tokio::task::spawn_blocking(move || {
                        handoff::mirror(&shared.settings, &mount, &dir)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        Err(MountError::Io {
                            name: name.clone(),
                            action: "bind the mount onto its path",
                            path: self.spec.mount_path.clone(),
                            source: std::io::Error::other(e),
                        })
                    });
                    if let Err(error) = mirrored {
                        self.stop_process(pid).await;
                        self.lazy_unmount().await;
                        return Err(error);
                    }
                }
                return Ok(pid);
            }
            if tokio::time::Instant::now() >= deadline {
                self.stop_process(pid).await;
                self.lazy_unmount().await;
                return Err(MountError::Timeout {
                    name: name.clone(),
                    path: self.launch.mount_path.clone(),
                    seconds: timeout.as_secs(),
                });
            }
            let slept = self.sleep(poll).await;
            poll = (poll * 2).min(MOUNT_POLL_MAX);
            if !slept {
                // Stopped while starting: leave nothing half-started behind.
                self.stop_process(pid).await;
                self.lazy_unmount().await;
                return Err(MountError::Cancelled(name.clone()));
            }
        }
    }

    /// The mount and cache dirs, opened, checked, claimed, emptied and
    /// staged as needed ([`handoff::prepare`]), off the runtime.
    async fn prepare_dirs(&self) -> Result<handoff::Prepared, MountError> {
        let (shared, spec) = (self.shared.clone(), self.spec.clone());
        tokio::task::spawn_blocking(move || handoff::prepare(&shared.settings, &spec))
            .await
            .map_err(|e| MountError::Io {
                name: self.spec.name.clone(),
                action: "prepare",
                path: self.spec.mount_path.clone(),
                source: std::io::Error::other(e),
            })?
    }

    /// Creates the logs dir, writes the 0600 config and rotates blobfuse2's
    /// previous output (all in the agent's own dirs).
    async fn prepare_files(&self, yaml: String) -> Result<(), MountError> {
        let name = self.spec.name.clone();
        let launch = self.launch.clone();
        let logs_dir = self.shared.settings.logs_dir.clone();
        let log_file = self.shared.settings.log_file(&self.spec);
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
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&logs_dir)
                .map_err(io("create the logs dir", logs_dir.clone()))?;
            secrets::write_private(&launch.config_file, yaml.as_bytes())
                .map_err(io("write the blobfuse2 config", launch.config_file.clone()))?;
            if !launch.owner.is_root() {
                hand_files_to_owner(&launch, &log_file).map_err(io(
                    "hand blobfuse2's files to the mount's owner",
                    log_file.clone(),
                ))?;
            }
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

/// blobfuse2 that runs as the mount's owner reads its config and writes its
/// log as them: both become theirs (0600) in the config dir, which only
/// root can change and which becomes traversable, not listable (0711). The
/// owner may read the mount's key or SAS there, as they could in the
/// memory of their own blobfuse2. Blocking.
fn hand_files_to_owner(launch: &Launch, log_file: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let (uid, gid) = (Some(launch.owner.uid), Some(launch.owner.gid));
    // The config dir and the runtime dir above it (0711 under systemd too).
    let config_dir = launch.config_file.parent();
    for dir in [config_dir, config_dir.and_then(std::path::Path::parent)]
        .into_iter()
        .flatten()
    {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(log_file)?;
    std::os::unix::fs::fchown(&log, uid, gid)?;
    let config = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&launch.config_file)?;
    std::os::unix::fs::fchown(&config, uid, gid)
}

#[cfg(test)]
mod tests;

//! The disk guard: which paths are watched and why, sampling them every
//! `disk.interval_ms` off the async runtime, one state machine per
//! filesystem, and what follows from a transition: alerts (to subscribers,
//! the event log and the log), the disk condition, the admission hold, the
//! reserve file and automatic reclaim.
//!
//! One task owns the sampling loop. Each probe (`stat` + `statvfs`) runs in
//! `spawn_blocking` and reports back on a channel; a filesystem has at most
//! one probe outstanding, so a hung mount costs one blocked thread, is
//! reported unresponsive once its probe is older than
//! `disk.sample_timeout_ms`, and never delays the others.
//!
//! Paths are deduplicated by filesystem (`st_dev`). An absent path is
//! skipped and reported, and probed again at every tick so that it joins as
//! soon as it appears (a mount, a cache dir created later).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::DiskConfig;
use super::docker::DockerSpace;
use super::hysteresis::{Cause, PressureMachine, Transition};
use super::probe::{FsProbe, PathSample};
use super::reclaim::{
    ReclaimFinished, ReclaimMode, ReclaimReport, ReclaimStep, ReclaimTrigger, Reclaimer, Relevance,
};
use super::reserve::ReserveFile;
use super::top::{TopProgress, TopReport, TopRequest};
use super::{
    DiskAlert, DiskError, DiskState, DiskUsage, FilesystemUsage, FsStats, MountInfo, SkippedPath,
    Thresholds, WatchedPath,
};
use crate::admission::AdmissionGate;
use crate::events::{EventBus, EventPayload};
use crate::health::{ConditionState, Health, Subsystem};
use crate::paths::tidy;
use crate::store::{Store, Table, Write};
use crate::units::bytes;

/// The table of paths added with `AddWatchedPath`: key path, value [`SavedPath`].
pub const WATCHED_PATHS: Table = Table("disk.watched_paths");

/// Why the built-in paths are watched.
const REASON_ROOT: &str = "root filesystem";
const REASON_TMP: &str = "temp dir";
const REASON_MNT: &str = "temp disk";
const REASON_STATE: &str = "state dir";
const REASON_DOCKER: &str = "docker data root";
const REASON_CONFIG: &str = "disk.paths";
const REASON_OVERRIDE: &str = "disk.overrides";
/// Prefix of the reason of paths added over the API.
const REASON_OPERATOR: &str = "added by operator";

/// Paths that are not a filesystem's representative are probed every this
/// many intervals (10 s at the default interval), to notice that something
/// was mounted on them (or unmounted).
const RESOLVE_EVERY_TICKS: u32 = 10;
/// A failed reserve allocation is retried this much later.
const RESERVE_RETRY: Duration = Duration::from_secs(10);
/// Alerts kept for a subscriber that reads slowly; one that falls further
/// behind gets the current state of every filesystem again.
const ALERT_BUFFER: usize = 256;

/// A path added over the API, as kept in the store.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedPath {
    /// Why the operator watches it.
    pub reason: String,
}

/// What the guard needs, built by the daemon.
pub struct DiskParts {
    /// The live `[disk]` config.
    pub config: watch::Receiver<DiskConfig>,
    /// The agent's state dir (watched; holds the reserve file).
    pub state_dir: PathBuf,
    /// Filesystems.
    pub probe: Arc<dyn FsProbe>,
    /// The container engine, for its data root.
    pub docker: Arc<dyn DockerSpace>,
    /// Reclaim steps in the order they run.
    pub steps: Vec<Arc<dyn ReclaimStep>>,
    /// The store, for paths added over the API.
    pub store: Store,
    /// Where the disk condition goes.
    pub health: Health,
    /// Where alerts are published.
    pub events: EventBus,
    /// The job queue's gate.
    pub admission: AdmissionGate,
}

/// Which filesystem an entry is: a device number, or a path whose device is
/// not known because it never answered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum FsKey {
    Dev(u64),
    Unresolved(PathBuf),
}

#[derive(Debug, Default)]
struct PathEntry {
    reasons: BTreeSet<String>,
    /// The filesystem it is on, once probed.
    dev: Option<u64>,
    mount: Option<MountInfo>,
    /// When its outstanding probe started.
    in_flight: Option<Instant>,
    last_probe: Option<Instant>,
    /// Why it is skipped (absent, not a directory).
    problem: Option<String>,
}

#[derive(Debug)]
struct FsEntry {
    machine: PressureMachine,
    stats: Option<FsStats>,
    sampled_at: Option<SystemTime>,
    error: Option<String>,
    alerts: u64,
    /// The path whose probe is outstanding, and since when.
    in_flight: Option<(PathBuf, Instant)>,
    thresholds: Thresholds,
    mount: MountInfo,
}

impl FsEntry {
    fn new(mount: MountInfo, thresholds: Thresholds) -> Self {
        Self {
            machine: PressureMachine::new(),
            stats: None,
            sampled_at: None,
            error: None,
            alerts: 0,
            in_flight: None,
            thresholds,
            mount,
        }
    }
}

/// What the loop asks to be done outside the lock.
#[derive(Debug)]
enum Action {
    Probe { path: PathBuf, want_mount: bool },
    Reclaim { path: PathBuf },
    ReleaseReserve,
    CreateReserve(u64),
}

/// Messages to the loop.
#[derive(Debug)]
enum Command {
    Register(PathBuf, String),
    Unregister(PathBuf, String),
    DockerRoot(PathBuf),
    ReserveDone { present: bool, failed: bool },
    ReclaimDone,
}

struct ProbeResult {
    path: PathBuf,
    outcome: std::io::Result<(PathSample, Option<MountInfo>)>,
}

#[derive(Debug, Default)]
struct ReserveState {
    present: bool,
    busy: bool,
    retry_at: Option<Instant>,
}

struct GuardState {
    config: DiskConfig,
    paths: BTreeMap<PathBuf, PathEntry>,
    filesystems: BTreeMap<FsKey, FsEntry>,
    state_dir: PathBuf,
    docker_root: Option<PathBuf>,
    alerts_total: u64,
    reserve: ReserveState,
    reclaim_running: bool,
    /// Filesystems that turned critical while a reclaim was running: each
    /// gets its own once the running one is done.
    reclaim_waiting: Vec<FsKey>,
    actions: Vec<Action>,
}

struct Inner {
    state: Mutex<GuardState>,
    commands: mpsc::UnboundedSender<Command>,
    alerts: broadcast::Sender<DiskAlert>,
    probe: Arc<dyn FsProbe>,
    reclaimer: Reclaimer,
    store: Store,
    health: Health,
    events: EventBus,
    admission: AdmissionGate,
    reserve: ReserveFile,
    config: watch::Receiver<DiskConfig>,
    top_busy: Arc<AtomicBool>,
}

/// A handle on the running disk guard. Cheap to clone.
#[derive(Clone)]
pub struct DiskGuard {
    inner: Arc<Inner>,
}

/// The guard's work, not started yet (see [`DiskGuard::new`]).
pub struct DiskRunner {
    guard: DiskGuard,
    config: watch::Receiver<DiskConfig>,
    docker: Arc<dyn DockerSpace>,
    results_tx: mpsc::UnboundedSender<ProbeResult>,
    results_rx: mpsc::UnboundedReceiver<ProbeResult>,
    commands_rx: mpsc::UnboundedReceiver<Command>,
}

impl DiskRunner {
    /// Starts sampling and the discovery of the Docker data root on `tasks`,
    /// until `cancel` fires.
    pub fn start(self, tasks: &TaskTracker, cancel: &CancellationToken) {
        let commands = self.guard.inner.commands.clone();
        tasks.spawn(self.guard.run(
            self.config,
            self.results_tx,
            self.results_rx,
            self.commands_rx,
            cancel.clone(),
        ));
        tasks.spawn(discover_docker_root(self.docker, commands, cancel.clone()));
    }
}

/// A subscription to alerts: the current state of every watched filesystem
/// (as alerts with `old_state == new_state`), then every transition.
pub struct AlertSubscription {
    pending: std::collections::VecDeque<DiskAlert>,
    receiver: broadcast::Receiver<DiskAlert>,
    guard: DiskGuard,
}

impl AlertSubscription {
    /// The next alert; `None` once the guard has stopped.
    pub async fn next(&mut self) -> Option<DiskAlert> {
        loop {
            if let Some(alert) = self.pending.pop_front() {
                return Some(alert);
            }
            match self.receiver.recv().await {
                Ok(alert) => return Some(alert),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // Too slow to follow every transition: catch up on the
                    // present instead of replaying the past.
                    tracing::debug!(
                        missed,
                        "disk alert subscriber lagged; resending current states"
                    );
                    let (current, receiver) = self.guard.current_and_receiver();
                    self.pending = current.into();
                    self.receiver = receiver;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// A step helps when its location is on one of the target filesystems (or
/// cannot be examined: then it runs, rather than be skipped on a guess).
struct OnTargets {
    probe: Arc<dyn FsProbe>,
    timeout: Duration,
    devs: BTreeSet<u64>,
}

impl Relevance for OnTargets {
    async fn helps(&mut self, location: PathBuf) -> bool {
        // A location that does not exist yet (an empty cache root, say) will
        // live on the filesystem of its nearest existing ancestor.
        let mut path = location.as_path();
        loop {
            match probe_with_timeout(&self.probe, path, self.timeout).await {
                Ok(sample) => return self.devs.contains(&sample.dev),
                Err(_) => {
                    // Bounded like the probe: a hung filesystem must not
                    // hold the reclaim (and every later one) forever.
                    let exists =
                        tokio::time::timeout(self.timeout, tokio::fs::try_exists(path)).await;
                    let missing = matches!(exists, Ok(Ok(false)));
                    match path.parent() {
                        Some(parent) if missing => path = parent,
                        _ => return true,
                    }
                }
            }
        }
    }
}

/// Sets its flag when dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What a reclaim is asked to do (by `ReclaimSpace` or the guard itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReclaimRequest {
    /// A path on the filesystem to reclaim for; every watched filesystem
    /// below its floor plus margin when `None`.
    pub path: Option<PathBuf>,
    /// Dry run and all steps.
    pub mode: ReclaimMode,
    /// Who asked, for the event and the metrics.
    pub trigger: ReclaimTrigger,
}

impl DiskGuard {
    /// Starts the guard: its sampling loop and the discovery of the Docker
    /// data root run on `tasks` until `cancel` fires.
    pub fn start(parts: DiskParts, tasks: &TaskTracker, cancel: &CancellationToken) -> Self {
        let (guard, runner) = Self::new(parts);
        runner.start(tasks, cancel);
        guard
    }

    /// Builds the guard without sampling yet: the handle serves the API at
    /// once (empty usage), the runner starts the work when the agent is
    /// ready for it.
    pub fn new(parts: DiskParts) -> (Self, DiskRunner) {
        let DiskParts {
            config,
            state_dir,
            probe,
            docker,
            steps,
            store,
            health,
            events,
            admission,
        } = parts;
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let current = config.borrow().clone();
        let reserve = ReserveFile::new(&state_dir);
        let mut state = GuardState {
            config: current.clone(),
            paths: BTreeMap::new(),
            filesystems: BTreeMap::new(),
            state_dir: tidy(&state_dir),
            docker_root: None,
            alerts_total: 0,
            reserve: ReserveState {
                present: reserve.size() > 0,
                ..ReserveState::default()
            },
            reclaim_running: false,
            reclaim_waiting: Vec::new(),
            actions: Vec::new(),
        };
        for (path, reason) in [
            ("/", REASON_ROOT),
            ("/tmp", REASON_TMP),
            ("/mnt", REASON_MNT),
        ] {
            state.add_reason(PathBuf::from(path), reason.to_owned());
        }
        state.add_reason(state_dir, REASON_STATE.to_owned());
        state.apply_config_paths();
        match store.scan::<SavedPath>(WATCHED_PATHS) {
            Ok(saved) => {
                for (path, saved) in saved {
                    state.add_reason(PathBuf::from(path), operator_reason(&saved.reason));
                }
            }
            Err(error) => tracing::error!(%error, "cannot read the paths added over the API"),
        }
        health.set(
            Subsystem::Disk,
            ConditionState::Unknown,
            "first sample pending",
        );

        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            commands,
            alerts: broadcast::channel(ALERT_BUFFER).0,
            probe,
            reclaimer: Reclaimer::new(steps),
            store,
            health,
            events,
            admission,
            reserve,
            config: config.clone(),
            top_busy: Arc::new(AtomicBool::new(false)),
        });
        let guard = DiskGuard { inner };
        let runner = DiskRunner {
            guard: guard.clone(),
            config,
            docker,
            results_tx,
            results_rx,
            commands_rx,
        };
        (guard, runner)
    }

    fn lock(&self) -> MutexGuard<'_, GuardState> {
        // Every mutation leaves the state consistent between statements that
        // could panic; a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Watches `path` for `reason` (e.g. a mount's file cache) until
    /// [`DiskGuard::unregister`] with the same reason. The path may not
    /// exist yet: it is reported as skipped until it does.
    pub fn register(&self, path: impl Into<PathBuf>, reason: impl Into<String>) {
        let _ = self
            .inner
            .commands
            .send(Command::Register(path.into(), reason.into()));
    }

    /// Stops watching `path` for `reason`; the path stays watched for its
    /// other reasons.
    pub fn unregister(&self, path: impl Into<PathBuf>, reason: impl Into<String>) {
        let _ = self
            .inner
            .commands
            .send(Command::Unregister(path.into(), reason.into()));
    }

    /// The latest sample of every watched filesystem.
    pub fn usage(&self) -> DiskUsage {
        let state = self.lock();
        DiskUsage {
            filesystems: state
                .filesystems
                .keys()
                .map(|key| state.usage_of(key))
                .collect(),
            skipped: state.skipped(),
            alerts_total: state.alerts_total,
        }
    }

    /// Subscribes to alerts.
    pub fn subscribe(&self) -> AlertSubscription {
        let (current, receiver) = self.current_and_receiver();
        AlertSubscription {
            pending: current.into(),
            receiver,
            guard: self.clone(),
        }
    }

    /// The current state of every filesystem as alerts, and a receiver for
    /// what happens next, taken together so nothing falls between them.
    fn current_and_receiver(&self) -> (Vec<DiskAlert>, broadcast::Receiver<DiskAlert>) {
        let state = self.lock();
        let receiver = self.inner.alerts.subscribe();
        let now = SystemTime::now();
        let current = state
            .filesystems
            .iter()
            .map(|(key, fs)| {
                let usage = state.usage_of(key);
                let s = fs.machine.state();
                let t = &fs.thresholds;
                let (threshold_bytes, threshold_inodes_percent) = match s {
                    DiskState::Critical => (t.critical_free_bytes, t.critical_free_inodes_percent),
                    DiskState::Warning | DiskState::Ok => {
                        (t.warning_free_bytes, t.warning_free_inodes_percent)
                    }
                    DiskState::Unresponsive | DiskState::Unknown => (0, 0.0),
                };
                DiskAlert {
                    old_state: s,
                    new_state: s,
                    threshold_bytes,
                    threshold_inodes_percent,
                    time: now,
                    message: current_message(&usage),
                    usage,
                }
            })
            .collect();
        (current, receiver)
    }

    /// Adds a path to watch and keeps it in the store across restarts.
    /// Fails with [`DiskError::Store`] (no space) when the state filesystem
    /// is full; nothing is watched then.
    pub async fn add_watched_path(&self, path: PathBuf, reason: String) -> Result<(), DiskError> {
        check_absolute("path", &path)?;
        let reason = if reason.trim().is_empty() {
            "no reason given".to_owned()
        } else {
            reason.trim().to_owned()
        };
        if reason.len() > 200 {
            return Err(DiskError::InvalidRequest {
                field: "reason",
                problem: format!("is {} bytes long: at most 200", reason.len()),
            });
        }
        let key = path_key(&path)?;
        let old: Option<SavedPath> = self
            .inner
            .store
            .get(WATCHED_PATHS, &key)
            .map_err(DiskError::Store)?;
        self.inner
            .store
            .apply(vec![Write::put(
                WATCHED_PATHS,
                key,
                &SavedPath {
                    reason: reason.clone(),
                },
            )])
            .await
            .map_err(DiskError::Store)?;
        if let Some(old) = old {
            self.unregister(path.clone(), operator_reason(&old.reason));
        }
        self.register(path, operator_reason(&reason));
        Ok(())
    }

    /// Removes a path added with [`DiskGuard::add_watched_path`]; false when
    /// it was not added that way.
    pub async fn remove_watched_path(&self, path: PathBuf) -> Result<bool, DiskError> {
        check_absolute("path", &path)?;
        let key = path_key(&path)?;
        let Some(old) = self
            .inner
            .store
            .get::<SavedPath>(WATCHED_PATHS, &key)
            .map_err(DiskError::Store)?
        else {
            return Ok(false);
        };
        self.inner
            .store
            .apply(vec![Write::Delete(WATCHED_PATHS, key)])
            .await
            .map_err(DiskError::Store)?;
        self.unregister(path, operator_reason(&old.reason));
        Ok(true)
    }

    /// The names of the reclaim steps, in the order they run.
    pub fn reclaim_step_names(&self) -> Vec<&'static str> {
        self.inner.reclaimer.step_names()
    }

    /// Reclaims space (or, in a dry run, says what would be reclaimed). A
    /// reclaim that is not a dry run is published on the event log
    /// ([`EventPayload::Reclaim`]), so that the control plane and the metrics
    /// see automatic reclaims as well as requested ones. Once started it runs
    /// to its end in a task of its own, even if the caller goes away, so that
    /// what it deleted is always reported.
    pub async fn reclaim(&self, request: ReclaimRequest) -> Result<ReclaimReport, DiskError> {
        let targets = match &request.path {
            Some(path) => {
                check_absolute("path", path)?;
                let timeout = self.sample_timeout();
                let sample = probe_with_timeout(&self.inner.probe, path, timeout).await?;
                let thresholds = self.lock().thresholds_for_dev(sample.dev, path);
                vec![(path.clone(), thresholds)]
            }
            None => self.lock().reclaim_targets(),
        };
        let guard = self.clone();
        match tokio::spawn(async move { guard.reclaim_and_report(targets, request).await }).await {
            Ok(report) => Ok(report),
            // A bug in a step surfaces where it would have without the task.
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Otherwise only a runtime shutting down cancels the task.
            Err(_) => Err(DiskError::Stopped),
        }
    }

    async fn reclaim_and_report(
        &self,
        targets: Vec<(PathBuf, Thresholds)>,
        request: ReclaimRequest,
    ) -> ReclaimReport {
        let paths: Vec<PathBuf> = targets.iter().map(|(path, _)| path.clone()).collect();
        let report = self.run_reclaim(targets, request.mode).await;
        tracing::info!(
            trigger = request.trigger.name(),
            dry_run = report.dry_run,
            total = %bytes(report.total_bytes),
            steps = ?report.steps.iter().map(|s| (s.name, s.ran, s.freed.bytes)).collect::<Vec<_>>(),
            "reclaim finished"
        );
        if !report.dry_run {
            self.inner
                .events
                .publish(EventPayload::Reclaim(Box::new(ReclaimFinished {
                    trigger: request.trigger,
                    targets: paths,
                    report: report.clone(),
                })));
        }
        report
    }

    async fn run_reclaim(
        &self,
        targets: Vec<(PathBuf, Thresholds)>,
        mode: ReclaimMode,
    ) -> ReclaimReport {
        let probe = self.inner.probe.clone();
        let timeout = self.sample_timeout();
        let mut devs = BTreeSet::new();
        for (path, _) in &targets {
            if let Ok(sample) = probe_with_timeout(&probe, path, timeout).await {
                devs.insert(sample.dev);
            }
        }
        let relevance = OnTargets {
            probe: probe.clone(),
            timeout,
            devs,
        };
        let targets = Arc::new(targets);
        self.inner
            .reclaimer
            .run(
                mode,
                move || {
                    let probe = probe.clone();
                    let targets = targets.clone();
                    async move {
                        let mut need = 0;
                        for (path, thresholds) in targets.iter() {
                            // A target that does not answer cannot be helped
                            // by deleting elsewhere: it needs nothing.
                            if let Ok(sample) = probe_with_timeout(&probe, path, timeout).await {
                                need = need.max(thresholds.reclaim_shortfall(&sample.stats));
                            }
                        }
                        need
                    }
                },
                relevance,
            )
            .await
    }

    /// Lists the largest directories below `request.path`. Progress goes to
    /// `progress` (dropped when it is full). At most one walk runs at a time,
    /// so a walk stuck on a hung filesystem cannot pile up threads.
    pub async fn top_directories(
        &self,
        request: TopRequest,
        progress: mpsc::Sender<TopProgress>,
    ) -> Result<TopReport, DiskError> {
        check_absolute("path", &request.path)?;
        if self.inner.top_busy.swap(true, Ordering::AcqRel) {
            return Err(DiskError::Busy);
        }
        let busy = self.inner.top_busy.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        // A client that goes away drops this future: the walk stops too.
        let _stop_walk = CancelOnDrop(cancel.clone());
        let walk_cancel = cancel.clone();
        let walk_request = request.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let result = super::top::walk(&walk_request, &walk_cancel, |p| {
                let _ = progress.try_send(p);
            });
            busy.store(false, Ordering::Release);
            result
        });
        // The walk checks its own deadline between entries; this one covers
        // a walk blocked inside one call on a hung filesystem.
        let limit = request.timeout + Duration::from_secs(5);
        match tokio::time::timeout(limit, handle).await {
            Ok(Ok(Ok(report))) => Ok(report),
            Ok(Ok(Err(source))) => Err(DiskError::Path {
                path: request.path,
                source,
            }),
            Ok(Err(join)) => Err(DiskError::Path {
                path: request.path,
                source: std::io::Error::other(join.to_string()),
            }),
            Err(_) => {
                cancel.store(true, Ordering::Relaxed);
                Err(DiskError::Timeout {
                    path: request.path,
                    timeout: limit,
                })
            }
        }
    }

    fn sample_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.config.borrow().sample_timeout_ms.into())
    }

    /// The sampling loop.
    async fn run(
        self,
        mut config: watch::Receiver<DiskConfig>,
        results_tx: mpsc::UnboundedSender<ProbeResult>,
        mut results: mpsc::UnboundedReceiver<ProbeResult>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        cancel: CancellationToken,
    ) {
        let mut interval = interval_of(&config.borrow_and_update());
        let mut ticker = new_ticker(interval);
        loop {
            let deadline = self.lock().next_deadline();
            tokio::select! {
                _ = cancel.cancelled() => break,
                scheduled = ticker.tick() => {
                    let mut state = self.lock();
                    let now = Instant::now();
                    state.check_timeouts(&self.inner, now);
                    // Samples are dated by their tick, so that holds measured
                    // between them are whole intervals, free of jitter.
                    state.tick(scheduled);
                    state.react(&self.inner, now);
                }
                Some(result) = results.recv() => {
                    let mut state = self.lock();
                    let now = Instant::now();
                    state.on_result(&self.inner, result, now);
                    // Drain whatever else arrived, then react once.
                    while let Ok(result) = results.try_recv() {
                        state.on_result(&self.inner, result, now);
                    }
                    state.react(&self.inner, now);
                }
                Some(command) = commands.recv() => {
                    let mut state = self.lock();
                    let now = Instant::now();
                    state.on_command(&self.inner, command, now);
                    state.react(&self.inner, now);
                }
                Ok(()) = config.changed() => {
                    let new = config.borrow_and_update().clone();
                    if interval_of(&new) != interval {
                        interval = interval_of(&new);
                        ticker = new_ticker(interval);
                    }
                    let mut state = self.lock();
                    state.config = new;
                    state.apply_config_paths();
                    state.refresh_thresholds();
                    state.react(&self.inner, Instant::now());
                }
                _ = sleep_until_some(deadline) => {
                    let mut state = self.lock();
                    let now = Instant::now();
                    state.check_timeouts(&self.inner, now);
                    state.react(&self.inner, now);
                }
            }
            let actions = std::mem::take(&mut self.lock().actions);
            for action in actions {
                self.perform(action, &results_tx);
            }
        }
        tracing::debug!("disk guard stopped");
    }

    /// Carries out what the loop decided, without holding the lock.
    fn perform(&self, action: Action, results: &mpsc::UnboundedSender<ProbeResult>) {
        match action {
            Action::Probe { path, want_mount } => {
                let probe = self.inner.probe.clone();
                let results = results.clone();
                // Not on the task tracker: a probe stuck on a hung mount must
                // not hold up the agent's stop.
                tokio::task::spawn_blocking(move || {
                    let outcome = probe.sample(&path).map(|sample| {
                        let mount = want_mount
                            .then(|| probe.mount_of(&path, sample.dev).ok())
                            .flatten();
                        (sample, mount)
                    });
                    let _ = results.send(ProbeResult { path, outcome });
                });
            }
            Action::Reclaim { path } => {
                let guard = self.clone();
                tokio::spawn(async move {
                    tracing::warn!(path = %path.display(), "filesystem critical: reclaiming space");
                    let request = ReclaimRequest {
                        path: Some(path.clone()),
                        mode: ReclaimMode::default(),
                        trigger: ReclaimTrigger::Automatic,
                    };
                    if let Err(error) = guard.reclaim(request).await {
                        tracing::warn!(path = %path.display(), %error, "automatic reclaim failed");
                    }
                    let _ = guard.inner.commands.send(Command::ReclaimDone);
                });
            }
            Action::ReleaseReserve => {
                let reserve = self.inner.reserve.clone();
                let commands = self.inner.commands.clone();
                tokio::task::spawn_blocking(move || {
                    let present = match reserve.release() {
                        Ok(bytes) => {
                            tracing::warn!(path = %reserve.path().display(), bytes, "state filesystem critical: reserve file released");
                            false
                        }
                        Err(error) => {
                            tracing::error!(path = %reserve.path().display(), %error, "cannot release the reserve file");
                            true
                        }
                    };
                    let _ = commands.send(Command::ReserveDone {
                        present,
                        failed: present,
                    });
                });
            }
            Action::CreateReserve(bytes) => {
                let reserve = self.inner.reserve.clone();
                let commands = self.inner.commands.clone();
                tokio::task::spawn_blocking(move || {
                    let done = match reserve.ensure(bytes) {
                        Ok(()) => {
                            tracing::info!(path = %reserve.path().display(), bytes, "reserve file in place");
                            Command::ReserveDone {
                                present: true,
                                failed: false,
                            }
                        }
                        Err(error) => {
                            tracing::warn!(path = %reserve.path().display(), %error, "cannot allocate the reserve file; retrying later");
                            Command::ReserveDone {
                                present: false,
                                failed: true,
                            }
                        }
                    };
                    let _ = commands.send(done);
                });
            }
        }
    }
}

impl GuardState {
    fn add_reason(&mut self, path: PathBuf, reason: String) {
        let path = tidy(&path);
        let entry = self.paths.entry(path.clone()).or_default();
        if entry.reasons.insert(reason) && entry.reasons.len() == 1 && entry.in_flight.is_none() {
            // A new path: probe it now rather than at the next tick.
            entry.in_flight = Some(Instant::now());
            self.actions.push(Action::Probe {
                path,
                want_mount: true,
            });
        }
    }

    fn remove_reason(&mut self, path: &Path, reason: &str) {
        let path = tidy(path);
        let Some(entry) = self.paths.get_mut(&path) else {
            return;
        };
        entry.reasons.remove(reason);
        if entry.reasons.is_empty() {
            self.paths.remove(&path);
        }
    }

    /// Replaces the reasons that come from config with the config's.
    fn apply_config_paths(&mut self) {
        let configured: Vec<(PathBuf, &'static str)> = self
            .config
            .paths
            .iter()
            .map(|p| (p.clone(), REASON_CONFIG))
            .chain(
                self.config
                    .overrides
                    .keys()
                    .map(|p| (PathBuf::from(p), REASON_OVERRIDE)),
            )
            .collect();
        let stale: Vec<(PathBuf, &'static str)> = self
            .paths
            .iter()
            .flat_map(|(path, entry)| {
                [REASON_CONFIG, REASON_OVERRIDE]
                    .into_iter()
                    .filter(|r| entry.reasons.contains(*r))
                    .map(|r| (path.clone(), r))
                    .collect::<Vec<_>>()
            })
            .filter(|(path, r)| !configured.iter().any(|(p, c)| tidy(p) == *path && c == r))
            .collect();
        for (path, reason) in stale {
            self.remove_reason(&path, reason);
        }
        for (path, reason) in configured {
            self.add_reason(path, reason.to_owned());
        }
    }

    fn key_of(&self, path: &Path) -> Option<FsKey> {
        let entry = self.paths.get(path)?;
        match entry.dev {
            Some(dev) => Some(FsKey::Dev(dev)),
            None => {
                let key = FsKey::Unresolved(path.to_owned());
                self.filesystems.contains_key(&key).then_some(key)
            }
        }
    }

    fn members(&self, key: &FsKey) -> Vec<&Path> {
        match key {
            FsKey::Dev(dev) => self
                .paths
                .iter()
                .filter(|(_, e)| e.dev == Some(*dev))
                .map(|(p, _)| p.as_path())
                .collect(),
            FsKey::Unresolved(path) => self
                .paths
                .get_key_value(path)
                .filter(|(_, e)| e.dev.is_none())
                .map(|(p, _)| vec![p.as_path()])
                .unwrap_or_default(),
        }
    }

    fn guards_admission(&self, key: &FsKey) -> bool {
        self.members(key)
            .iter()
            .any(|p| *p == self.state_dir.as_path() || self.docker_root.as_deref() == Some(*p))
    }

    fn thresholds_for_dev(&self, dev: u64, path: &Path) -> Thresholds {
        match self.filesystems.get(&FsKey::Dev(dev)) {
            Some(fs) => fs.thresholds.clone(),
            None => Thresholds::for_paths(&self.config, [path]),
        }
    }

    fn refresh_thresholds(&mut self) {
        let keys: Vec<FsKey> = self.filesystems.keys().cloned().collect();
        for key in keys {
            let thresholds = Thresholds::for_paths(&self.config, self.members(&key));
            if let Some(fs) = self.filesystems.get_mut(&key) {
                fs.thresholds = thresholds;
            }
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.sample_timeout_ms.into())
    }

    /// When the oldest outstanding probe times out.
    fn next_deadline(&self) -> Option<Instant> {
        let timeout = self.timeout();
        let fs_deadlines = self
            .filesystems
            .values()
            .filter(|fs| fs.machine.state() != DiskState::Unresponsive)
            .filter_map(|fs| fs.in_flight.as_ref().map(|(_, since)| *since + timeout));
        let path_deadlines = self
            .paths
            .iter()
            .filter(|(p, e)| {
                e.dev.is_none()
                    && !self
                        .filesystems
                        .contains_key(&FsKey::Unresolved((*p).clone()))
            })
            .filter_map(|(_, e)| e.in_flight.map(|since| since + timeout));
        fs_deadlines.chain(path_deadlines).min()
    }

    /// Probes every filesystem through its first path, new and skipped
    /// paths, and other paths now and then to notice mounts.
    fn tick(&mut self, now: Instant) {
        let keys: Vec<FsKey> = self.filesystems.keys().cloned().collect();
        for key in keys {
            let FsKey::Dev(_) = key else { continue };
            // The first member without a probe of its own outstanding: a
            // path stuck elsewhere must not stop its filesystem's samples.
            let Some(representative) = self
                .members(&key)
                .into_iter()
                .find(|p| self.paths.get(*p).is_some_and(|e| e.in_flight.is_none()))
                .map(Path::to_path_buf)
            else {
                continue;
            };
            let Some(fs) = self.filesystems.get_mut(&key) else {
                continue;
            };
            if fs.in_flight.is_some() {
                continue;
            }
            fs.in_flight = Some((representative.clone(), now));
            if let Some(entry) = self.paths.get_mut(&representative) {
                entry.in_flight = Some(now);
                self.actions.push(Action::Probe {
                    want_mount: entry.mount.is_none(),
                    path: representative,
                });
            }
        }
        let resolve_every = interval_of(&self.config) * RESOLVE_EVERY_TICKS;
        let responsive: BTreeSet<u64> = self
            .filesystems
            .iter()
            .filter_map(|(key, fs)| match key {
                FsKey::Dev(dev) if fs.machine.state() != DiskState::Unresponsive => Some(*dev),
                _ => None,
            })
            .collect();
        for (path, entry) in &mut self.paths {
            if entry.in_flight.is_some() {
                continue;
            }
            let due = match entry.dev {
                None => true,
                Some(dev) => {
                    responsive.contains(&dev)
                        && entry
                            .last_probe
                            .is_none_or(|last| now.duration_since(last) >= resolve_every)
                }
            };
            if due {
                entry.in_flight = Some(now);
                self.actions.push(Action::Probe {
                    path: path.clone(),
                    want_mount: true,
                });
            }
        }
    }

    /// Marks filesystems whose probe is older than the timeout unresponsive.
    fn check_timeouts(&mut self, inner: &Inner, now: Instant) {
        let timeout = self.timeout();
        let message = format!("no answer within {} ms", timeout.as_millis());
        let mut overdue = Vec::new();
        for (key, fs) in &self.filesystems {
            if let Some((path, since)) = &fs.in_flight
                && now.duration_since(*since) >= timeout
                && fs.machine.state() != DiskState::Unresponsive
            {
                overdue.push((key.clone(), path.clone()));
            }
        }
        for (key, path) in overdue {
            if let Some(fs) = self.filesystems.get_mut(&key) {
                fs.error = Some(format!("{} ({})", message, path.display()));
                if let Some(transition) = fs.machine.unresponsive() {
                    self.emit(inner, &key, transition);
                }
            }
        }
        // Paths that never answered, or stopped answering on their own (a
        // hung mount appeared on them): each becomes its own entry.
        let probing: BTreeSet<PathBuf> = self
            .filesystems
            .values()
            .filter_map(|fs| fs.in_flight.as_ref().map(|(p, _)| p.clone()))
            .collect();
        let stuck: Vec<PathBuf> = self
            .paths
            .iter()
            .filter(|(p, e)| {
                e.in_flight
                    .is_some_and(|since| now.duration_since(since) >= timeout)
                    && !probing.contains(*p)
                    && !self
                        .filesystems
                        .contains_key(&FsKey::Unresolved((*p).clone()))
            })
            .map(|(p, _)| p.clone())
            .collect();
        for path in stuck {
            if let Some(entry) = self.paths.get_mut(&path) {
                entry.dev = None;
                entry.mount = None;
            }
            self.mark_unresolved(inner, &path, message.clone());
            self.remove_empty(inner);
            self.refresh_thresholds();
        }
    }

    fn mark_unresolved(&mut self, inner: &Inner, path: &Path, error: String) {
        let key = FsKey::Unresolved(path.to_owned());
        let thresholds = Thresholds::for_paths(&self.config, [path]);
        let fs = self
            .filesystems
            .entry(key.clone())
            .or_insert_with(|| FsEntry::new(MountInfo::unknown(path), thresholds));
        fs.error = Some(error);
        fs.sampled_at = Some(SystemTime::now());
        if let Some(transition) = fs.machine.unresponsive() {
            self.emit(inner, &key, transition);
        }
    }

    fn on_result(&mut self, inner: &Inner, result: ProbeResult, now: Instant) {
        let ProbeResult { path, outcome } = result;
        for fs in self.filesystems.values_mut() {
            if fs.in_flight.as_ref().is_some_and(|(p, _)| *p == path) {
                fs.in_flight = None;
            }
        }
        let Some(entry) = self.paths.get_mut(&path) else {
            // Unregistered while its probe ran.
            self.remove_empty(inner);
            return;
        };
        let taken_at = entry.in_flight.take().unwrap_or(now);
        entry.last_probe = Some(now);
        match outcome {
            Ok((sample, mount)) => {
                entry.problem = None;
                if entry.dev != Some(sample.dev) {
                    entry.dev = Some(sample.dev);
                    entry.mount = None;
                }
                if mount.is_some() {
                    entry.mount = mount;
                }
                let key = FsKey::Dev(sample.dev);
                if !self.filesystems.contains_key(&key) {
                    let mount = entry
                        .mount
                        .clone()
                        .unwrap_or_else(|| MountInfo::unknown(&path));
                    let thresholds = Thresholds::for_paths(&self.config, [path.as_path()]);
                    self.filesystems
                        .insert(key.clone(), FsEntry::new(mount, thresholds));
                }
                self.remove_empty(inner);
                self.refresh_mount(&key);
                self.refresh_thresholds();
                let Some(fs) = self.filesystems.get_mut(&key) else {
                    return;
                };
                fs.stats = Some(sample.stats);
                fs.sampled_at = Some(SystemTime::now());
                fs.error = None;
                if let Some(transition) =
                    fs.machine.observe(&sample.stats, &fs.thresholds, taken_at)
                {
                    self.emit(inner, &key, transition);
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                if entry.problem.is_none() {
                    tracing::info!(path = %path.display(), reasons = ?entry.reasons, "watched path is absent; skipped until it appears");
                }
                entry.problem = Some(error.to_string());
                entry.dev = None;
                entry.mount = None;
                self.remove_empty(inner);
                self.refresh_thresholds();
            }
            Err(error) => {
                let message = error.to_string();
                match entry.dev {
                    Some(dev) => {
                        let key = FsKey::Dev(dev);
                        if let Some(fs) = self.filesystems.get_mut(&key) {
                            fs.error = Some(format!("{message} ({})", path.display()));
                            fs.sampled_at = Some(SystemTime::now());
                            if let Some(transition) = fs.machine.unresponsive() {
                                self.emit(inner, &key, transition);
                            }
                        }
                    }
                    None => self.mark_unresolved(inner, &path, message),
                }
            }
        }
    }

    /// A filesystem shows the mount point of the member closest to the root
    /// (the filesystem's own mount point rather than a bind mount below it).
    fn refresh_mount(&mut self, key: &FsKey) {
        let best = self
            .members(key)
            .iter()
            .filter_map(|p| self.paths.get(*p).and_then(|e| e.mount.clone()))
            .min_by_key(|m| m.mount_point.components().count());
        if let (Some(best), Some(fs)) = (best, self.filesystems.get_mut(key)) {
            fs.mount = best;
        }
    }

    /// Drops filesystems no watched path lives on any more.
    fn remove_empty(&mut self, inner: &Inner) {
        let empty: Vec<FsKey> = self
            .filesystems
            .keys()
            .filter(|key| self.members(key).is_empty())
            .cloned()
            .collect();
        for key in empty {
            let old = self
                .filesystems
                .get(&key)
                .map_or(DiskState::Unknown, |fs| fs.machine.state());
            self.emit(
                inner,
                &key,
                Transition {
                    old,
                    new: DiskState::Unknown,
                    cause: Cause::Unresponsive,
                },
            );
            self.filesystems.remove(&key);
        }
    }

    fn on_command(&mut self, inner: &Inner, command: Command, now: Instant) {
        match command {
            Command::Register(path, reason) => self.add_reason(path, reason),
            Command::Unregister(path, reason) => {
                self.remove_reason(&path, &reason);
                self.remove_empty(inner);
                self.refresh_thresholds();
            }
            Command::DockerRoot(path) => {
                tracing::info!(path = %path.display(), "docker data root found; watching it");
                self.docker_root = Some(tidy(&path));
                self.add_reason(path, REASON_DOCKER.to_owned());
            }
            Command::ReserveDone { present, failed } => {
                self.reserve.present = present;
                self.reserve.busy = false;
                self.reserve.retry_at = failed.then(|| now + RESERVE_RETRY);
            }
            Command::ReclaimDone => {
                self.reclaim_running = false;
                // Still critical after the reclaim of another filesystem:
                // its own turn now (one at a time, as the steps are shared).
                while let Some(key) = self.reclaim_waiting.pop() {
                    let critical = self
                        .filesystems
                        .get(&key)
                        .is_some_and(|fs| fs.machine.state() == DiskState::Critical);
                    if critical {
                        self.want_reclaim(&key);
                        break;
                    }
                }
            }
        }
    }

    /// Publishes one transition: to subscribers, the event log and the log.
    fn emit(&mut self, inner: &Inner, key: &FsKey, transition: Transition) {
        let Some(fs) = self.filesystems.get_mut(key) else {
            return;
        };
        fs.alerts += 1;
        self.alerts_total += 1;
        let usage = self.usage_of(key);
        let message = transition_message(&usage, &transition);
        let (threshold_bytes, threshold_inodes_percent) = match transition.cause {
            Cause::Bytes(bytes) => (bytes, 0.0),
            Cause::Inodes(percent) => (0, percent),
            Cause::Unresponsive => (0, 0.0),
        };
        let alert = DiskAlert {
            old_state: transition.old,
            new_state: transition.new,
            threshold_bytes,
            threshold_inodes_percent,
            time: SystemTime::now(),
            message,
            usage,
        };
        let mount_point = alert.usage.mount.mount_point.display().to_string();
        match alert.new_state {
            DiskState::Critical | DiskState::Unresponsive => tracing::warn!(
                mount_point,
                old = alert.old_state.name(),
                new = alert.new_state.name(),
                "disk alert: {}",
                alert.message
            ),
            DiskState::Warning => tracing::warn!(
                mount_point,
                old = alert.old_state.name(),
                new = alert.new_state.name(),
                "disk alert: {}",
                alert.message
            ),
            DiskState::Ok | DiskState::Unknown => tracing::info!(
                mount_point,
                old = alert.old_state.name(),
                new = alert.new_state.name(),
                "disk alert: {}",
                alert.message
            ),
        }
        if transition.new == DiskState::Critical && transition.old != DiskState::Critical {
            self.want_reclaim(key);
        }
        // The condition first, so that a client reacting to the alert sees
        // it in GetStatus too.
        let (condition, message) = self.condition();
        inner.health.set(Subsystem::Disk, condition, message);
        let _ = inner.alerts.send(alert.clone());
        // The event log carries news: a filesystem that starts or stops being
        // watched while ok is not (GetDiskUsage and WatchDiskAlerts show it).
        let routine = matches!(
            (alert.old_state, alert.new_state),
            (DiskState::Unknown, DiskState::Ok) | (DiskState::Ok, DiskState::Unknown)
        );
        if !routine {
            inner
                .events
                .publish(EventPayload::DiskAlert(Box::new(alert)));
        }
    }

    fn want_reclaim(&mut self, key: &FsKey) {
        if !self.config.auto_reclaim {
            return;
        }
        if self.reclaim_running {
            if !self.reclaim_waiting.contains(key) {
                self.reclaim_waiting.insert(0, key.clone());
            }
            return;
        }
        if let Some(path) = self.members(key).first().map(|p| p.to_path_buf()) {
            self.reclaim_running = true;
            self.actions.push(Action::Reclaim { path });
        }
    }

    /// Brings the disk condition, the admission hold and the reserve file in
    /// line with the current states.
    fn react(&mut self, inner: &Inner, now: Instant) {
        let (condition, message) = self.condition();
        inner.health.set(Subsystem::Disk, condition, message);

        let holding: Vec<String> = self
            .filesystems
            .iter()
            .filter(|(key, fs)| {
                fs.machine.state() == DiskState::Critical && self.guards_admission(key)
            })
            .map(|(key, _)| {
                let usage = self.usage_of(key);
                format!(
                    "{} ({}) has {} free, below the {} floor",
                    usage.mount.mount_point.display(),
                    usage
                        .paths
                        .iter()
                        .flat_map(|p| p.reasons.iter().cloned())
                        .filter(|r| r == REASON_STATE || r == REASON_DOCKER)
                        .collect::<Vec<_>>()
                        .join(", "),
                    bytes(usage.stats.map_or(0, |s| s.free_bytes)),
                    bytes(usage.thresholds.critical_free_bytes)
                )
            })
            .collect();
        if holding.is_empty() {
            inner.admission.release("disk");
        } else {
            inner.admission.hold("disk", holding.join("; "));
        }
        self.react_reserve(now);
    }

    fn react_reserve(&mut self, now: Instant) {
        if self.reserve.busy {
            return;
        }
        let wanted = self.config.reserve_bytes;
        let Some(key) = self.key_of(&self.state_dir.clone()) else {
            return;
        };
        let Some(fs) = self.filesystems.get(&key) else {
            return;
        };
        let state = fs.machine.state();
        if self.reserve.present && (wanted == 0 || state == DiskState::Critical) {
            self.reserve.busy = true;
            self.actions.push(Action::ReleaseReserve);
            return;
        }
        let room = fs.stats.is_some_and(|s| {
            s.free_bytes >= fs.thresholds.reclaim_target_bytes().saturating_add(wanted)
        });
        let may_retry = self.reserve.retry_at.is_none_or(|at| now >= at);
        if !self.reserve.present
            && wanted > 0
            && matches!(state, DiskState::Ok | DiskState::Warning)
            && room
            && may_retry
        {
            self.reserve.busy = true;
            self.actions.push(Action::CreateReserve(wanted));
        }
    }

    /// The disk condition: failed while any filesystem is critical, degraded
    /// while any is in warning or unresponsive.
    fn condition(&self) -> (ConditionState, String) {
        if self.filesystems.is_empty() {
            return (ConditionState::Unknown, "no filesystem sampled yet".into());
        }
        let mut worst = ConditionState::Ok;
        let mut problems = Vec::new();
        for key in self.filesystems.keys() {
            let usage = self.usage_of(key);
            let condition = match usage.state {
                DiskState::Critical => ConditionState::Failed,
                DiskState::Warning | DiskState::Unresponsive => ConditionState::Degraded,
                DiskState::Ok | DiskState::Unknown => continue,
            };
            worst = worst.max(condition);
            let mut line = current_message(&usage);
            if usage.state == DiskState::Critical && usage.guards_admission {
                line.push_str("; jobs held");
            }
            problems.push((condition, line));
        }
        if problems.is_empty() {
            let least = self
                .filesystems
                .keys()
                .map(|k| self.usage_of(k))
                .filter_map(|u| u.stats.map(|s| (s.free_bytes, u.mount.mount_point)))
                .min();
            let message = match least {
                Some((free, mount_point)) => format!(
                    "{} filesystem(s) ok; least free: {} ({})",
                    self.filesystems.len(),
                    mount_point.display(),
                    bytes(free)
                ),
                None => format!("{} filesystem(s) ok", self.filesystems.len()),
            };
            return (ConditionState::Ok, message);
        }
        problems.sort_by_key(|p| std::cmp::Reverse(p.0));
        (
            worst,
            problems
                .into_iter()
                .map(|(_, line)| line)
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    fn usage_of(&self, key: &FsKey) -> FilesystemUsage {
        let paths = self
            .members(key)
            .into_iter()
            .map(|p| WatchedPath {
                path: p.to_owned(),
                reasons: self
                    .paths
                    .get(p)
                    .map(|e| e.reasons.iter().cloned().collect())
                    .unwrap_or_default(),
            })
            .collect();
        let guards_admission = self.guards_admission(key);
        match self.filesystems.get(key) {
            Some(fs) => FilesystemUsage {
                mount: fs.mount.clone(),
                paths,
                stats: fs.stats,
                state: fs.machine.state(),
                thresholds: fs.thresholds.clone(),
                sampled_at: fs.sampled_at,
                error: fs.error.clone(),
                alerts: fs.alerts,
                guards_admission,
            },
            None => FilesystemUsage {
                mount: MountInfo::default(),
                paths,
                stats: None,
                state: DiskState::Unknown,
                thresholds: Thresholds::from_config(&self.config),
                sampled_at: None,
                error: None,
                alerts: 0,
                guards_admission,
            },
        }
    }

    fn skipped(&self) -> Vec<SkippedPath> {
        self.paths
            .iter()
            .filter_map(|(path, e)| {
                e.problem.as_ref().map(|problem| SkippedPath {
                    path: path.clone(),
                    reasons: e.reasons.iter().cloned().collect(),
                    problem: problem.clone(),
                })
            })
            .collect()
    }

    /// Every responsive filesystem below its floor plus margin, through its
    /// first path.
    fn reclaim_targets(&self) -> Vec<(PathBuf, Thresholds)> {
        self.filesystems
            .iter()
            .filter(|(key, fs)| {
                matches!(key, FsKey::Dev(_))
                    && fs.machine.state() != DiskState::Unresponsive
                    && fs
                        .stats
                        .is_some_and(|s| fs.thresholds.reclaim_shortfall(&s) > 0)
            })
            .filter_map(|(key, fs)| {
                self.members(key)
                    .first()
                    .map(|p| (p.to_path_buf(), fs.thresholds.clone()))
            })
            .collect()
    }
}

/// One line for a filesystem's current state.
fn current_message(usage: &FilesystemUsage) -> String {
    let mount_point = usage.mount.mount_point.display();
    let t = &usage.thresholds;
    let free = usage.stats.map_or(0, |s| s.free_bytes);
    match usage.state {
        DiskState::Unresponsive => format!(
            "{mount_point} does not answer: {}",
            usage.error.as_deref().unwrap_or("sample timed out")
        ),
        DiskState::Unknown => format!("{mount_point} is not watched"),
        state => {
            let (level_bytes, level_inodes, name) = match state {
                DiskState::Critical => (
                    t.critical_free_bytes,
                    t.critical_free_inodes_percent,
                    "floor",
                ),
                _ => (
                    t.warning_free_bytes,
                    t.warning_free_inodes_percent,
                    "warning level",
                ),
            };
            let inodes = usage.stats.and_then(|s| s.free_inodes_percent());
            let mut line = format!("{mount_point} has {} free", bytes(free));
            if state == DiskState::Ok {
                return line;
            }
            let mut below = Vec::new();
            if free < level_bytes {
                below.push(format!("below the {} {name}", bytes(level_bytes)));
            }
            if let Some(percent) = inodes.filter(|p| *p < level_inodes) {
                below.push(format!(
                    "{percent:.1}% inodes free, below the {level_inodes}% {name}"
                ));
            }
            if below.is_empty() {
                // Back above the level, inside the margin or the hold.
                line.push_str(&format!(
                    "; {} until it holds {} above the {} {name} for {}s",
                    state.name(),
                    bytes(t.clear_margin_bytes),
                    bytes(level_bytes),
                    t.transition.as_secs()
                ));
            } else {
                line.push_str(", ");
                line.push_str(&below.join("; "));
            }
            line
        }
    }
}

/// One line for a transition.
fn transition_message(usage: &FilesystemUsage, transition: &Transition) -> String {
    let mount_point = usage.mount.mount_point.display();
    let t = &usage.thresholds;
    let free = bytes(usage.stats.map_or(0, |s| s.free_bytes));
    let inodes = usage
        .stats
        .and_then(|s| s.free_inodes_percent())
        .unwrap_or(100.0);
    let worse = transition.new > transition.old;
    match (transition.old, transition.new, transition.cause) {
        (_, DiskState::Unknown, _) => format!("{mount_point} is no longer watched"),
        (_, DiskState::Unresponsive, _) => format!(
            "{mount_point} does not answer: {}",
            usage.error.as_deref().unwrap_or("sample timed out")
        ),
        (DiskState::Unknown, _, _) => format!("now watching {}", current_message(usage)),
        (DiskState::Unresponsive, _, _) => {
            format!("{mount_point} answers again: {}", current_message(usage))
        }
        (_, DiskState::Critical, Cause::Inodes(level)) if worse => {
            format!("{mount_point} has {inodes:.1}% inodes free, below the {level}% floor")
        }
        (_, DiskState::Warning, Cause::Inodes(level)) if worse => {
            format!("{mount_point} has {inodes:.1}% inodes free, below the {level}% warning level")
        }
        (_, DiskState::Critical, _) => format!(
            "{mount_point} has {free} free, below the {} floor",
            bytes(t.critical_free_bytes)
        ),
        (_, DiskState::Warning, _) if worse => format!(
            "{mount_point} has {free} free, below the {} warning level",
            bytes(t.warning_free_bytes)
        ),
        (_, DiskState::Warning, _) => format!(
            "{mount_point} is back above the {} floor with {free} free; still below the {} warning level",
            bytes(t.critical_free_bytes),
            bytes(t.warning_free_bytes)
        ),
        (_, DiskState::Ok, _) => format!(
            "{mount_point} is back above the {} warning level with {free} free",
            bytes(t.warning_free_bytes)
        ),
    }
}

fn operator_reason(reason: &str) -> String {
    format!("{REASON_OPERATOR}: {reason}")
}

/// A path from a request must be absolute and without `..`, so that the
/// answer names exactly what was asked.
fn check_absolute(field: &'static str, path: &Path) -> Result<(), DiskError> {
    crate::paths::normalise(path)
        .map(drop)
        .map_err(|e| DiskError::InvalidRequest {
            field,
            problem: e.to_string(),
        })
}

/// The store key of a watched path: `/a/b/` and `/a//b` are `/a/b`.
fn path_key(path: &Path) -> Result<String, DiskError> {
    tidy(path)
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| DiskError::InvalidRequest {
            field: "path",
            problem: format!("{} is not valid UTF-8", path.display()),
        })
}

fn interval_of(config: &DiskConfig) -> Duration {
    Duration::from_millis(config.interval_ms.into())
}

fn new_ticker(every: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Probes one path off the runtime, giving up after `timeout`.
async fn probe_with_timeout(
    probe: &Arc<dyn FsProbe>,
    path: &Path,
    timeout: Duration,
) -> Result<PathSample, DiskError> {
    let probe = probe.clone();
    let owned = path.to_owned();
    let handle = tokio::task::spawn_blocking(move || probe.sample(&owned));
    match tokio::time::timeout(timeout, handle).await {
        Ok(Ok(Ok(sample))) => Ok(sample),
        Ok(Ok(Err(source))) => Err(DiskError::Path {
            path: path.to_owned(),
            source,
        }),
        Ok(Err(join)) => Err(DiskError::Path {
            path: path.to_owned(),
            source: std::io::Error::other(join.to_string()),
        }),
        Err(_) => Err(DiskError::Timeout {
            path: path.to_owned(),
            timeout,
        }),
    }
}

/// Asks the engine where it keeps its data until it answers, then watches it.
async fn discover_docker_root(
    docker: Arc<dyn DockerSpace>,
    commands: mpsc::UnboundedSender<Command>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_secs(1);
    let mut told = false;
    loop {
        match docker.data_root().await {
            Ok(path) => {
                let _ = commands.send(Command::DockerRoot(path));
                return;
            }
            Err(error) => {
                if !told {
                    tracing::info!(%error, "docker data root not known yet; asking again with backoff");
                    told = true;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::docker::fake::FakeDocker;
    use crate::disk::probe::fake::FakeProbe;
    use crate::disk::reclaim::fake::FakeStep;

    const MIB: u64 = 1 << 20;
    const ROOT: u64 = 1;
    const MNT: u64 = 2;
    const STATE: u64 = 3;

    fn config() -> DiskConfig {
        DiskConfig {
            interval_ms: 1000,
            sample_timeout_ms: 3000,
            critical_free_bytes: 8 * MIB,
            warning_free_bytes: 16 * MIB,
            clear_margin_bytes: 2 * MIB,
            transition_seconds: 30,
            reserve_bytes: MIB,
            ..DiskConfig::default()
        }
    }

    fn stats(free: u64) -> FsStats {
        FsStats {
            total_bytes: 64 * MIB,
            free_bytes: free,
            total_inodes: 10_000,
            free_inodes: 9_000,
        }
    }

    struct Rig {
        guard: DiskGuard,
        probe: FakeProbe,
        docker: Arc<FakeDocker>,
        health: Health,
        admission: AdmissionGate,
        events: EventBus,
        step: Arc<FakeStep>,
        config: watch::Sender<DiskConfig>,
        cancel: CancellationToken,
        state_dir: tempfile::TempDir,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            self.cancel.cancel();
        }
    }

    fn rig(config: DiskConfig) -> Rig {
        let state_dir = tempfile::tempdir().expect("tempdir");
        let probe = FakeProbe::new();
        probe.add_fs(ROOT, "/", stats(40 * MIB));
        probe.add_path("/tmp", ROOT);
        probe.add_path("/var/lib/docker", ROOT);
        probe.add_fs(MNT, "/mnt", stats(40 * MIB));
        probe.add_fs(
            STATE,
            state_dir.path().to_str().expect("utf-8"),
            stats(40 * MIB),
        );
        let docker = Arc::new(FakeDocker::default());
        docker.state.lock().unwrap().data_root = Some("/var/lib/docker".into());
        let step = Arc::new(FakeStep::freeing("fake_step", 0));
        let (config_tx, config_rx) = watch::channel(config);
        let health = Health::new();
        let admission = AdmissionGate::new();
        let events = EventBus::new(1024);
        let cancel = CancellationToken::new();
        let guard = DiskGuard::start(
            DiskParts {
                config: config_rx,
                state_dir: state_dir.path().to_owned(),
                probe: Arc::new(probe.clone()),
                docker: docker.clone(),
                steps: vec![step.clone() as Arc<dyn ReclaimStep>],
                store: Store::open(state_dir.path()).expect("store"),
                health: health.clone(),
                events: events.clone(),
                admission: admission.clone(),
            },
            &TaskTracker::new(),
            &cancel,
        );
        Rig {
            guard,
            probe,
            docker,
            health,
            admission,
            events,
            step,
            config: config_tx,
            cancel,
            state_dir,
        }
    }

    impl Rig {
        /// The fake mount point of the state dir's filesystem.
        fn state_mount(&self) -> String {
            self.state_dir.path().to_str().unwrap().to_owned()
        }

        /// The latest usage of the filesystem mounted at `mount`.
        fn fs_usage(&self, mount: &str) -> FilesystemUsage {
            self.guard
                .usage()
                .filesystems
                .into_iter()
                .find(|f| f.mount.mount_point == Path::new(mount))
                .unwrap()
        }
    }

    /// A rig whose three filesystems have been sampled once, with a
    /// subscription that has seen their first alerts.
    async fn started(config: DiskConfig) -> (Rig, AlertSubscription, Vec<Seen>) {
        let rig = rig(config);
        let mut sub = rig.guard.subscribe();
        let first = discovered(&mut sub, &["/", "/mnt", &rig.state_mount()]).await;
        (rig, sub, first)
    }

    type Seen = (String, DiskState, DiskState);

    async fn next(sub: &mut AlertSubscription) -> Seen {
        let alert = tokio::time::timeout(Duration::from_secs(600), sub.next())
            .await
            .expect("an alert within 10 minutes")
            .expect("guard running");
        (
            alert.usage.mount.mount_point.display().to_string(),
            alert.old_state,
            alert.new_state,
        )
    }

    /// Alerts until every one of `mount_points` has been seen once.
    async fn discovered(sub: &mut AlertSubscription, mount_points: &[&str]) -> Vec<Seen> {
        let mut seen = Vec::new();
        while !mount_points
            .iter()
            .all(|m| seen.iter().any(|(s, _, _): &Seen| s == m))
        {
            seen.push(next(sub).await);
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn exact_alert_sequence_across_the_levels() {
        let (rig, mut sub, first) = started(config()).await;
        assert!(
            first
                .iter()
                .all(|(_, old, new)| *old == DiskState::Unknown && *new == DiskState::Ok),
            "{first:?}"
        );
        let mnt = |old, new| ("/mnt".to_owned(), old, new);

        rig.probe.set_free(MNT, 15 * MIB);
        assert_eq!(next(&mut sub).await, mnt(DiskState::Ok, DiskState::Warning));
        rig.probe.set_free(MNT, 7 * MIB);
        let crossed = Instant::now();
        assert_eq!(
            next(&mut sub).await,
            mnt(DiskState::Warning, DiskState::Critical)
        );
        assert!(
            crossed.elapsed() <= Duration::from_secs(1),
            "one interval at most"
        );
        // Inside the margin: nothing for two minutes.
        rig.probe.set_free(MNT, 9 * MIB);
        assert!(
            tokio::time::timeout(Duration::from_secs(120), sub.next())
                .await
                .is_err(),
            "no alert inside the margin"
        );
        rig.probe.set_free(MNT, 11 * MIB);
        let above = Instant::now();
        assert_eq!(
            next(&mut sub).await,
            mnt(DiskState::Critical, DiskState::Warning)
        );
        assert!(above.elapsed() >= Duration::from_secs(30));
        rig.probe.set_free(MNT, 30 * MIB);
        assert_eq!(next(&mut sub).await, mnt(DiskState::Warning, DiskState::Ok));
        let usage = rig.guard.usage();
        let mnt_usage = rig.fs_usage("/mnt");
        assert_eq!(mnt_usage.alerts, 5, "discovered + four transitions");
        assert_eq!(usage.alerts_total, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_subscriber_gets_current_states_first() {
        let (rig, mut first, _) = started(config()).await;
        rig.probe.set_free(MNT, 7 * MIB);
        assert_eq!(next(&mut first).await.2, DiskState::Critical);
        let mut late = rig.guard.subscribe();
        let mut current = Vec::new();
        for _ in 0..3 {
            current.push(next(&mut late).await);
        }
        current.sort();
        assert!(current.contains(&("/mnt".into(), DiskState::Critical, DiskState::Critical)));
        assert!(current.contains(&("/".into(), DiskState::Ok, DiskState::Ok)));
        rig.probe.set_free(MNT, 4 * MIB);
        rig.probe.set_free(ROOT, 15 * MIB);
        assert_eq!(
            next(&mut late).await,
            ("/".into(), DiskState::Ok, DiskState::Warning)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn paths_are_deduplicated_and_absent_ones_reported() {
        let mut cfg = config();
        cfg.paths = vec!["/data".into()];
        let (rig, _sub, _) = started(cfg).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let usage = rig.guard.usage();
        assert_eq!(usage.filesystems.len(), 3, "{usage:#?}");
        let root = &usage.filesystems[0];
        let paths: Vec<&Path> = root.paths.iter().map(|p| p.path.as_path()).collect();
        assert_eq!(
            paths,
            [
                Path::new("/"),
                Path::new("/tmp"),
                Path::new("/var/lib/docker")
            ]
        );
        assert!(root.guards_admission, "docker data root lives on /");
        assert_eq!(usage.skipped.len(), 1);
        assert_eq!(usage.skipped[0].path, Path::new("/data"));
        assert_eq!(usage.skipped[0].reasons, ["disk.paths"]);
        // It appears: it joins its filesystem at the next tick.
        rig.probe.add_path("/data", MNT);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let usage = rig.guard.usage();
        assert!(usage.skipped.is_empty());
        let mnt = rig.fs_usage("/mnt");
        assert!(mnt.paths.iter().any(|p| p.path == Path::new("/data")));
    }

    #[tokio::test(start_paused = true)]
    async fn admission_is_held_while_the_state_filesystem_is_critical() {
        let (rig, mut sub, _) = started(config()).await;
        // /mnt holds neither the engine's data nor the state dir.
        rig.probe.set_free(MNT, 4 * MIB);
        next(&mut sub).await;
        assert_eq!(rig.admission.held_reason(), None);
        rig.probe.set_free(STATE, 4 * MIB);
        assert_eq!(next(&mut sub).await.2, DiskState::Critical);
        let reason = rig.admission.held_reason().expect("held");
        assert!(reason.contains("state dir"), "{reason}");
        assert!(reason.contains("below the 8.0 MiB floor"), "{reason}");
        let condition = rig.health.get(Subsystem::Disk);
        assert_eq!(condition.state, ConditionState::Failed);
        assert!(
            condition.message.contains("jobs held"),
            "{}",
            condition.message
        );
        rig.probe.set_free(STATE, 30 * MIB);
        let (_, old, new) = next(&mut sub).await;
        assert_eq!((old, new), (DiskState::Critical, DiskState::Ok));
        assert_eq!(rig.admission.held_reason(), None);
        // /mnt is still critical: the condition still says so.
        assert_eq!(
            rig.health.get(Subsystem::Disk).state,
            ConditionState::Failed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn docker_root_is_asked_until_the_engine_answers() {
        let rig = rig(config());
        rig.docker.state.lock().unwrap().data_root = None;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = rig.guard.usage();
        rig.docker.state.lock().unwrap().data_root = Some("/var/lib/docker".into());
        tokio::time::sleep(Duration::from_secs(60)).await;
        let usage = rig.guard.usage();
        let root = &usage.filesystems[0];
        assert!(
            root.paths
                .iter()
                .any(|p| p.reasons.contains(&"docker data root".to_owned())),
            "{root:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn register_and_unregister_a_cache_dir() {
        let (rig, mut sub, _) = started(config()).await;
        rig.probe.add_fs(9, "/cache", stats(40 * MIB));
        rig.guard.register("/cache/data", "cache of mount data");
        rig.probe.add_path("/cache/data", 9);
        assert_eq!(
            next(&mut sub).await,
            ("/cache".into(), DiskState::Unknown, DiskState::Ok)
        );
        rig.guard.unregister("/cache/data", "cache of mount data");
        assert_eq!(
            next(&mut sub).await,
            ("/cache".into(), DiskState::Ok, DiskState::Unknown)
        );
        assert_eq!(rig.guard.usage().filesystems.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_is_released_when_critical_and_recreated_after() {
        let (rig, mut sub, _) = started(config()).await;
        let reserve = rig
            .state_dir
            .path()
            .join(crate::disk::reserve::RESERVE_FILE_NAME);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(std::fs::metadata(&reserve).map(|m| m.len()).ok(), Some(MIB));
        rig.probe.set_free(STATE, 4 * MIB);
        next(&mut sub).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!reserve.exists(), "released under pressure");
        // Back above the floor but without room for the reserve on top of
        // floor + margin: it stays released.
        rig.probe.set_free(STATE, 10 * MIB + MIB / 2);
        next(&mut sub).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!reserve.exists());
        rig.probe.set_free(STATE, 30 * MIB);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(reserve.exists(), "recreated once space returned");
    }

    #[tokio::test(start_paused = true)]
    async fn turning_critical_reclaims_automatically() {
        let (rig, mut sub, _) = started(config()).await;
        assert_eq!(rig.step.calls(), (0, 0));
        rig.probe.set_free(MNT, 4 * MIB);
        next(&mut sub).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rig.step.calls(), (0, 1));
        // A dry run of everything estimates and deletes nothing.
        let report = rig
            .guard
            .reclaim(ReclaimRequest {
                path: None,
                mode: ReclaimMode {
                    dry_run: true,
                    all_steps: true,
                },
                trigger: ReclaimTrigger::Api,
            })
            .await
            .unwrap();
        assert!(report.dry_run);
        assert_eq!(report.steps[0].name, "fake_step");
        assert_eq!(rig.step.calls(), (1, 1));
        // The automatic reclaim reached the event log; the dry run did not.
        let mut events = rig.events.subscribe(Some(0));
        let mut reclaims = Vec::new();
        while let Some(crate::events::Delivery::Event(event)) = events.try_next() {
            if let EventPayload::Reclaim(finished) = &event.payload {
                reclaims.push(finished.clone());
            }
        }
        assert_eq!(reclaims.len(), 1, "{reclaims:?}");
        assert_eq!(reclaims[0].trigger, ReclaimTrigger::Automatic);
        assert_eq!(reclaims[0].targets, [PathBuf::from("/mnt")]);
        assert!(!reclaims[0].report.dry_run);
        assert!(reclaims[0].report.steps[0].ran);
        // Turned off: no reclaim on the next crossing.
        let mut cfg = config();
        cfg.auto_reclaim = false;
        rig.config.send_replace(cfg);
        tokio::time::sleep(Duration::from_millis(10)).await;
        rig.probe.set_free(ROOT, 4 * MIB);
        next(&mut sub).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rig.step.calls(), (1, 1));
    }

    /// The automatic reclaims published on the event log so far, by target.
    fn automatic_reclaims(events: &EventBus) -> Vec<Vec<PathBuf>> {
        let mut subscription = events.subscribe(Some(0));
        let mut targets = Vec::new();
        while let Some(crate::events::Delivery::Event(event)) = subscription.try_next() {
            if let EventPayload::Reclaim(finished) = &event.payload
                && finished.trigger == ReclaimTrigger::Automatic
            {
                targets.push(finished.targets.clone());
            }
        }
        targets
    }

    #[tokio::test(start_paused = true)]
    async fn two_filesystems_turning_critical_together_each_get_a_reclaim() {
        let (rig, mut sub, _) = started(config()).await;
        rig.probe.set_free(MNT, 4 * MIB);
        rig.probe.set_free(ROOT, 4 * MIB);
        next(&mut sub).await;
        next(&mut sub).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut reclaimed = automatic_reclaims(&rig.events);
        reclaimed.sort();
        assert_eq!(
            reclaimed,
            [vec![PathBuf::from("/")], vec![PathBuf::from("/mnt")]]
        );
        assert_eq!(rig.step.calls(), (0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_filesystem_critical_on_inodes_is_reclaimed_until_inodes_recover() {
        let (rig, mut sub, _) = started(config()).await;
        // Plenty of bytes, 1 % of the inodes free: critical on inodes.
        rig.probe.set_free_inodes(MNT, 100);
        let (_, _, new) = next(&mut sub).await;
        assert_eq!(new, DiskState::Critical);
        let alert_levels = rig
            .guard
            .subscribe()
            .pending
            .into_iter()
            .find(|a| a.usage.mount.mount_point == Path::new("/mnt"));
        let alert = alert_levels.expect("a current-state alert for /mnt");
        assert_eq!(
            alert.threshold_inodes_percent,
            config().critical_free_inodes_percent
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            automatic_reclaims(&rig.events),
            [vec![PathBuf::from("/mnt")]]
        );
        // The step ran: bytes were never short, the inodes were.
        assert_eq!(rig.step.calls(), (0, 1));
        let reclaim_mnt = || {
            rig.guard.reclaim(ReclaimRequest {
                path: Some("/mnt".into()),
                mode: ReclaimMode::default(),
                trigger: ReclaimTrigger::Api,
            })
        };
        let report = reclaim_mnt().await.unwrap();
        assert!(report.steps[0].ran, "{report:?}");
        // Inodes back: nothing left to do.
        rig.probe.set_free_inodes(MNT, 9_000);
        let report = reclaim_mnt().await.unwrap();
        assert_eq!(
            report.steps[0].skipped.as_deref(),
            Some("enough space is free"),
            "{report:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn alerts_reach_the_event_log_and_lowered_levels_apply_live() {
        let (rig, mut sub, _) = started(config()).await;
        let mut events = rig.events.subscribe(Some(0));
        // 40 MiB free everywhere: raising the warning level to 50 MiB puts
        // every filesystem in warning at the next sample.
        let mut cfg = config();
        cfg.warning_free_bytes = 50 * MIB;
        rig.config.send_replace(cfg);
        let warned = discovered(&mut sub, &["/", "/mnt", &rig.state_mount()]).await;
        assert!(warned.iter().all(|(_, _, new)| *new == DiskState::Warning));
        let mut disk_events = 0;
        while let Some(crate::events::Delivery::Event(event)) = events.try_next() {
            if let EventPayload::DiskAlert(_) = event.payload {
                disk_events += 1;
            }
        }
        assert_eq!(
            disk_events, 3,
            "the three warnings; ok discoveries are not news"
        );
        assert_eq!(
            rig.health.get(Subsystem::Disk).state,
            ConditionState::Degraded
        );
    }

    #[tokio::test]
    async fn a_hung_filesystem_is_unresponsive_without_stalling_the_others() {
        let mut cfg = config();
        cfg.interval_ms = 100;
        cfg.sample_timeout_ms = 300;
        let (rig, mut sub, _) = started(cfg).await;
        rig.probe.hang(MNT);
        assert_eq!(
            next(&mut sub).await,
            ("/mnt".into(), DiskState::Ok, DiskState::Unresponsive)
        );
        let before = rig.probe.calls("/");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(rig.probe.calls("/") >= before + 5, "/ is still sampled");
        assert_eq!(
            rig.probe.blocked(),
            1,
            "one probe outstanding, not one per tick"
        );
        rig.probe.set_free(ROOT, 15 * MIB);
        assert_eq!(
            next(&mut sub).await,
            ("/".into(), DiskState::Ok, DiskState::Warning)
        );
        let mnt = rig.fs_usage("/mnt");
        assert!(
            mnt.error
                .as_deref()
                .unwrap_or("")
                .contains("no answer within 300 ms")
        );
        rig.probe.release(MNT);
        assert_eq!(
            next(&mut sub).await,
            ("/mnt".into(), DiskState::Unresponsive, DiskState::Ok)
        );
    }

    #[tokio::test]
    async fn a_path_that_hangs_on_its_own_does_not_stop_its_old_filesystem() {
        let mut cfg = config();
        cfg.interval_ms = 50;
        cfg.sample_timeout_ms = 300;
        let (rig, mut sub, _) = started(cfg).await;
        // Something that hangs gets mounted on /tmp, which was on /.
        rig.probe.add_fs(9, "/tmp", stats(40 * MIB));
        rig.probe.hang(9);
        assert_eq!(
            next(&mut sub).await,
            ("/tmp".into(), DiskState::Unknown, DiskState::Unresponsive)
        );
        rig.probe.set_free(ROOT, 15 * MIB);
        assert_eq!(
            next(&mut sub).await,
            ("/".into(), DiskState::Ok, DiskState::Warning)
        );
        let root = rig.fs_usage("/");
        assert!(root.paths.iter().all(|p| p.path != Path::new("/tmp")));
        rig.probe.release(9);
        let mut seen = vec![next(&mut sub).await, next(&mut sub).await];
        seen.sort();
        assert_eq!(
            seen,
            [
                ("/tmp".into(), DiskState::Unknown, DiskState::Ok),
                ("/tmp".into(), DiskState::Unresponsive, DiskState::Unknown),
            ]
        );
    }

    #[tokio::test]
    async fn watched_paths_added_over_the_api_are_kept_in_the_store() {
        let rig = rig(config());
        rig.guard
            .add_watched_path("/datasets".into(), "training data".into())
            .await
            .unwrap();
        let err = rig
            .guard
            .add_watched_path("datasets".into(), String::new())
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            DiskError::InvalidRequest { field: "path", .. }
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let skipped = rig.guard.usage().skipped;
        assert_eq!(skipped[0].reasons, ["added by operator: training data"]);
        let store = rig.guard.inner.store.clone();
        let saved: Vec<(String, SavedPath)> = store.scan(WATCHED_PATHS).unwrap();
        assert_eq!(saved[0].0, "/datasets");
        assert!(
            rig.guard
                .remove_watched_path("/datasets".into())
                .await
                .unwrap()
        );
        assert!(
            !rig.guard
                .remove_watched_path("/datasets".into())
                .await
                .unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rig.guard.usage().skipped.is_empty());
    }
}

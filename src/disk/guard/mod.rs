//! The disk guard: the handle the API and the other domains hold, and the
//! loop that owns the guard's state: sampling every `disk.interval_ms` off
//! the async runtime, one state machine per filesystem, and what follows
//! from a transition: alerts (to subscribers, the event log and the log), the
//! disk condition, the admission hold, the reserve file and automatic
//! reclaim.
//!
//! - `watchlist`: what is watched and why, one entry per filesystem
//!   (`st_dev`), the levels of each.
//! - `sampling`: probing, one probe outstanding per filesystem, answers and
//!   timeouts (unresponsive).
//! - `alerts`: alerts, the condition and the hold, and their delivery.
//!
//! One task owns the loop. Each turn locks the state, applies one thing (a
//! tick, probe answers, a command, a config change, a timeout), and collects
//! what is to be done (probes, a reclaim, the reserve file) and told (alerts,
//! condition, hold); both happen after the lock is released, so that nothing
//! slow or reentrant runs under it. A hung mount costs one blocked thread,
//! is reported unresponsive once its probe is older than
//! `disk.sample_timeout_ms`, and never delays the others. Paths that users
//! or remote storage control are probed in a helper process (one per tick,
//! for all of them), the agent's own well-known filesystems in the agent
//! (see `disk::probe`); callers' paths (`ReclaimSpace`, `disk --top`) go
//! through bounded flights of their own, apart from the guard's. An absent path is
//! skipped and reported, and probed again at every tick so that it joins as
//! soon as it appears (a mount, a cache dir created later).

mod alerts;
mod sampling;
#[cfg(test)]
mod tests;
mod watchlist;

pub use alerts::AlertSubscription;
pub use watchlist::{SavedPath, WATCHED_PATHS};

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::AdmissionGate;
use crate::disk::config::DiskConfig;
use crate::disk::docker::DockerSpace;
use crate::disk::probe::flights::Flights;
use crate::disk::probe::{FsProbe, IsolatedProbe};
use crate::disk::reclaim::{
    ReclaimDriver, ReclaimMode, ReclaimQueue, ReclaimReport, ReclaimRequest, ReclaimStep,
    ReclaimTarget, ReclaimTrigger,
};
use crate::disk::reserve::{ReserveAction, ReserveFile, ReserveKeeper, ReserveOutcome};
use crate::disk::top::{TopProgress, TopReport, TopRequest};
use crate::disk::{DiskError, DiskState, DiskUsage, Thresholds};
use crate::events::EventBus;
use crate::health::{ConditionState, Health, Subsystem};
use crate::store::Store;
use alerts::{AlertLog, AlertSnapshot, AlertSource, Outbox, Outlets};
use sampling::{ProbeRequest, ProbeResult};
use watchlist::{FsKey, Watchlist, check_absolute};

/// What the guard needs, built by the daemon.
pub struct DiskParts {
    /// The live `[disk]` config.
    pub config: watch::Receiver<DiskConfig>,
    /// The agent's state dir (watched; holds the reserve file).
    pub state_dir: PathBuf,
    /// The agent's own well-known filesystems, probed in the agent.
    pub probe: Arc<dyn FsProbe>,
    /// Everything else, probed in helper processes.
    pub isolated: Arc<dyn IsolatedProbe>,
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

/// What the loop asks to be done outside the lock.
#[derive(Debug)]
enum Action {
    Probe(ProbeRequest),
    Reclaim { path: PathBuf },
    Reserve(ReserveAction),
}

/// Messages to the loop.
#[derive(Debug)]
enum Command {
    Register(PathBuf, String),
    Unregister(PathBuf, String),
    DockerRoot(PathBuf),
    ReserveDone(ReserveOutcome),
    ReclaimDone,
}

/// Everything the loop owns, behind one lock.
struct GuardState {
    watch: Watchlist,
    alerts: AlertLog,
    reserve: ReserveKeeper,
    /// Automatic reclaims: one at a time, the others waiting.
    reclaims: ReclaimQueue<FsKey>,
    actions: Vec<Action>,
}

impl GuardState {
    /// Probes `paths` (new ones, with their mounts) once the lock is released.
    fn probe_now(&mut self, paths: impl IntoIterator<Item = PathBuf>) {
        for path in paths {
            let isolated = self.watch.paths.get(&path).is_none_or(|e| e.isolated());
            self.actions.push(Action::Probe(ProbeRequest {
                path,
                want_mount: true,
                isolated,
            }));
        }
    }

    fn on_command(&mut self, command: Command, now: Instant) {
        match command {
            Command::Register(path, reason) => {
                let probe = self.watch.add_reason(path, reason);
                self.probe_now(probe);
            }
            Command::Unregister(path, reason) => {
                self.watch.remove_reason(&path, &reason);
                self.alerts.drop_unwatched(&mut self.watch);
                self.watch.refresh_thresholds();
            }
            Command::DockerRoot(path) => {
                tracing::info!(path = %path.display(), "docker data root found; watching it");
                let probe = self.watch.set_docker_root(path);
                self.probe_now(probe);
            }
            Command::ReserveDone(outcome) => self.reserve.done(outcome, now),
            Command::ReclaimDone => {
                // Still critical after the reclaim of another filesystem:
                // its own turn now (one at a time, as the steps are shared).
                let filesystems = &self.watch.filesystems;
                let next = self.reclaims.finished(|key| {
                    filesystems
                        .get(key)
                        .is_some_and(|fs| fs.machine.state() == DiskState::Critical)
                });
                if let Some(key) = next {
                    let path = self.watch.members(&key).first().map(|p| p.to_path_buf());
                    self.want_reclaim(key, path);
                }
            }
        }
    }

    /// Reclaims for filesystem `key` through `path` (its first path), now or
    /// once the running reclaim is done.
    fn want_reclaim(&mut self, key: FsKey, path: Option<PathBuf>) {
        if !self.watch.config.auto_reclaim {
            return;
        }
        if let Some(path) = self.reclaims.request(key, path) {
            self.actions.push(Action::Reclaim { path });
        }
    }

    /// Ends a turn: a reclaim for each filesystem that turned critical, the
    /// reserve file in line with the state filesystem, and what to tell.
    fn react(&mut self, now: Instant) -> Outbox {
        let recorded = self.alerts.take();
        for r in &recorded {
            if r.alert.new_state == DiskState::Critical && r.alert.old_state != DiskState::Critical
            {
                // The first path when it turned critical.
                let path = r.alert.usage.paths.first().map(|p| p.path.clone());
                self.want_reclaim(r.key.clone(), path);
            }
        }
        self.react_reserve(now);
        Outbox::new(&self.watch, recorded)
    }

    fn react_reserve(&mut self, now: Instant) {
        let Some(key) = self.watch.key_of(&self.watch.state_dir) else {
            return;
        };
        let Some(fs) = self.watch.filesystems.get(&key) else {
            return;
        };
        let wanted = self.watch.config.reserve_bytes;
        if let Some(action) =
            self.reserve
                .decide(wanted, fs.machine.state(), fs.stats, &fs.thresholds, now)
        {
            self.actions.push(Action::Reserve(action));
        }
    }
}

/// What a turn of the loop leaves to do after the lock is released.
struct Turn {
    outbox: Outbox,
    actions: Vec<Action>,
}

struct Inner {
    state: Mutex<GuardState>,
    commands: mpsc::UnboundedSender<Command>,
    outlets: Outlets,
    probe: Arc<dyn FsProbe>,
    isolated: Arc<dyn IsolatedProbe>,
    /// Probes callers ask for (`ReclaimSpace`, `disk --top`).
    callers: Flights,
    /// The guard's own probes of isolated paths outside sampling (the
    /// automatic reclaim's targets): never behind callers'.
    own: Flights,
    reclaimer: ReclaimDriver,
    store: Store,
    reserve: ReserveFile,
    config: watch::Receiver<DiskConfig>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, GuardState> {
        // Every mutation leaves the state consistent between statements that
        // could panic; a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl AlertSource for Inner {
    fn snapshot(&self) -> AlertSnapshot {
        // Under the lock, so that no alert falls between the current states
        // and the receiver.
        let state = self.lock();
        let receiver = self.outlets.receiver();
        AlertSnapshot {
            current: alerts::current(&state.watch),
            seq: state.alerts.last_seq(),
            receiver,
        }
    }
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
        let found = move |path| {
            let _ = commands.send(Command::DockerRoot(path));
        };
        tasks.spawn(watchlist::discover_docker_root(
            self.docker,
            found,
            cancel.clone(),
        ));
    }
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
            isolated,
            docker,
            steps,
            store,
            health,
            events,
            admission,
        } = parts;
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let reserve = ReserveFile::new(&state_dir);
        let current = config.borrow().clone();
        let (watch, probes) = Watchlist::new(current, &state_dir, watchlist::saved_paths(&store));
        let mut state = GuardState {
            watch,
            alerts: AlertLog::default(),
            reserve: ReserveKeeper::new(reserve.size() > 0),
            reclaims: ReclaimQueue::default(),
            actions: Vec::new(),
        };
        state.probe_now(probes);
        health.set(
            Subsystem::Disk,
            ConditionState::Unknown,
            "first sample pending",
        );

        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            commands,
            outlets: Outlets::new(health, admission, events.clone()),
            probe: probe.clone(),
            callers: Flights::new(isolated.clone()),
            own: Flights::new(isolated.clone()),
            isolated,
            reclaimer: ReclaimDriver::new(steps, probe, events),
            store,
            reserve,
            config: config.clone(),
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
        self.inner.lock()
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
            filesystems: state.watch.usage(),
            skipped: state.watch.skipped(),
            alerts_total: state.alerts.total(),
        }
    }

    /// Subscribes to alerts.
    pub fn subscribe(&self) -> AlertSubscription {
        AlertSubscription::new(self.inner.clone())
    }

    /// Adds a path to watch and keeps it in the store across restarts.
    /// Fails with [`DiskError::Store`] (no space) when the state filesystem
    /// is full; nothing is watched then.
    pub async fn add_watched_path(&self, path: PathBuf, reason: String) -> Result<(), DiskError> {
        let saved = watchlist::save_path(&self.inner.store, &path, reason).await?;
        if let Some(old) = saved.old {
            self.unregister(path.clone(), old);
        }
        self.register(path, saved.new);
        Ok(())
    }

    /// Removes a path added with [`DiskGuard::add_watched_path`]; false when
    /// it was not added that way.
    pub async fn remove_watched_path(&self, path: PathBuf) -> Result<bool, DiskError> {
        match watchlist::forget_path(&self.inner.store, &path).await? {
            Some(old) => {
                self.unregister(path, old);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The names of the reclaim steps, in the order they run.
    pub fn reclaim_step_names(&self) -> Vec<&'static str> {
        self.inner.reclaimer.step_names()
    }

    /// Reclaims space for the filesystem of `request.path`, or for every
    /// watched one below its floor plus margin (see [`ReclaimDriver::reclaim`]:
    /// published unless a dry run, run to its end even if the caller goes
    /// away).
    ///
    /// A caller's path is probed in a helper, through the callers' flights
    /// (a hung filesystem is answered [`DiskError::Unresponsive`] at once);
    /// the automatic reclaim uses flights of its own.
    pub async fn reclaim(&self, request: ReclaimRequest) -> Result<ReclaimReport, DiskError> {
        let timeout = self.sample_timeout();
        let flights = match request.trigger {
            ReclaimTrigger::Api => self.inner.callers.clone(),
            ReclaimTrigger::Automatic => self.inner.own.clone(),
        };
        let targets = match &request.path {
            Some(path) => {
                check_absolute("path", path)?;
                let isolated = match request.trigger {
                    ReclaimTrigger::Api => true,
                    ReclaimTrigger::Automatic => self.lock().watch.isolated(path),
                };
                let mut target = ReclaimTarget {
                    path: path.clone(),
                    thresholds: Thresholds::from_config(&self.inner.config.borrow()),
                    isolated,
                };
                let sample = target.sample(&self.inner.probe, &flights, timeout).await?;
                target.thresholds = self.lock().watch.thresholds_for_dev(sample.dev, path);
                vec![target]
            }
            None => self.lock().watch.reclaim_targets(),
        };
        self.inner
            .reclaimer
            .reclaim(targets, request, timeout, flights)
            .await
    }

    /// Lists the largest directories below `request.path`. Progress goes to
    /// `progress` (dropped when it is full). The walk runs in a helper
    /// process, at most one per filesystem (see [`Flights::walk`]).
    pub async fn top_directories(
        &self,
        request: TopRequest,
        progress: mpsc::Sender<TopProgress>,
    ) -> Result<TopReport, DiskError> {
        check_absolute("path", &request.path)?;
        self.inner.callers.walk(request, progress).await
    }

    fn sample_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.config.borrow().sample_timeout_ms.into())
    }

    /// One turn of the loop: `apply` under the lock, then what follows.
    fn turn(&self, apply: impl FnOnce(&mut GuardState, Instant)) -> Turn {
        let mut state = self.lock();
        let now = Instant::now();
        apply(&mut state, now);
        let outbox = state.react(now);
        Turn {
            outbox,
            actions: std::mem::take(&mut state.actions),
        }
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
        let mut interval = sampling::interval_of(&config.borrow_and_update());
        let mut ticker = sampling::new_ticker(interval);
        loop {
            let deadline = sampling::next_deadline(&self.lock().watch);
            let turn = tokio::select! {
                _ = cancel.cancelled() => break,
                scheduled = ticker.tick() => self.turn(|state, now| {
                    sampling::check_timeouts(&mut state.watch, &mut state.alerts, now);
                    // Samples are dated by their tick, so that holds measured
                    // between them are whole intervals, free of jitter.
                    let probes = sampling::tick(&mut state.watch, scheduled);
                    state.actions.extend(probes.into_iter().map(Action::Probe));
                }),
                Some(result) = results.recv() => self.turn(|state, now| {
                    sampling::on_result(&mut state.watch, &mut state.alerts, result, now);
                    // Drain whatever else arrived, then react once.
                    while let Ok(result) = results.try_recv() {
                        sampling::on_result(&mut state.watch, &mut state.alerts, result, now);
                    }
                }),
                Some(command) = commands.recv() => {
                    self.turn(|state, now| state.on_command(command, now))
                }
                Ok(()) = config.changed() => {
                    let new = config.borrow_and_update().clone();
                    if sampling::interval_of(&new) != interval {
                        interval = sampling::interval_of(&new);
                        ticker = sampling::new_ticker(interval);
                    }
                    self.turn(|state, _| {
                        let probes = state.watch.set_config(new);
                        state.probe_now(probes);
                    })
                }
                _ = sampling::sleep_until_some(deadline) => self.turn(|state, now| {
                    sampling::check_timeouts(&mut state.watch, &mut state.alerts, now);
                }),
            };
            self.inner.outlets.deliver(turn.outbox);
            // Isolated paths of one turn share one helper.
            let mut batch = Vec::new();
            for action in turn.actions {
                match action {
                    Action::Probe(request) if request.isolated => batch.push(request),
                    other => self.perform(other, &results_tx),
                }
            }
            if !batch.is_empty() {
                let timeout = self.sample_timeout();
                sampling::spawn_batch(&self.inner.isolated, batch, timeout, &results_tx);
            }
        }
        tracing::debug!("disk guard stopped");
    }

    /// Carries out what the loop decided, without holding the lock.
    fn perform(&self, action: Action, results: &mpsc::UnboundedSender<ProbeResult>) {
        match action {
            Action::Probe(request) => sampling::spawn_probe(&self.inner.probe, request, results),
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
            Action::Reserve(action) => {
                let reserve = self.inner.reserve.clone();
                let commands = self.inner.commands.clone();
                tokio::task::spawn_blocking(move || {
                    let outcome = reserve.apply(action);
                    let _ = commands.send(Command::ReserveDone(outcome));
                });
            }
        }
    }
}

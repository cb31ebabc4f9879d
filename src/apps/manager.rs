//! The app manager's handle (deploy, get, list, remove, restart, logs) and
//! what its parts share. Each app has one supervisor task
//! (`supervisor.rs`) that alone moves its record on; the handle only reads
//! records and sends the task commands, so every transition has one writer.
//!
//! Invariants:
//! - The store is written before the engine is asked to act, and container
//!   names are derived from the app's name and spec generation, so a crash
//!   between two steps is recovered by looking containers up by label.
//! - A removal is recorded (`removing`) before the container is removed: an
//!   agent that dies halfway finishes it at the next start, never undoes it.
//! - Nothing is started before the records were matched with the engine's
//!   containers (`recovery.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::SlotPool;
use super::config::AppsConfig;
use super::engine::AppEngine;
use super::images::AppImages;
use super::ports::PortError;
use super::probe::Prober;
use super::record::{AppRecord, AppState};
use super::spec::{self, AppSpec, HostLimits};
use crate::admission::AdmissionGate;
use crate::events::{EventBus, EventPayload};
use crate::jobs::engine::{EngineError, OutputStreamBox};
use crate::jobs::spec::{MountSource, SpecError};
use crate::jobs::{MountResolution, MountResolver};
use crate::store::{Store, StoreError, Table, Write};

/// App records (JSON [`AppRecord`]s), keyed by app name.
pub const RECORDS: Table = Table("apps.records");
/// How long RemoveApp waits for the container to be gone before answering
/// (beyond the stop grace).
const REMOVE_REPLY_SLACK: Duration = Duration::from_secs(5);

/// An app request or lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A field of the spec breaks a rule.
    #[error("invalid app spec: {0}")]
    InvalidSpec(#[from] SpecError),
    /// A fixed host port is taken.
    #[error("ports: {0}")]
    PortInUse(#[from] PortError),
    /// No app with that name.
    #[error("no app named {0:?}")]
    NotFound(String),
    /// The app is being removed.
    #[error("app {0:?} is being removed")]
    Removing(String),
    /// Too many apps.
    #[error("the agent keeps at most {limit} apps (apps.max_apps)")]
    TooMany {
        /// The limit.
        limit: u32,
    },
    /// The app has no container now (for logs).
    #[error("app {0:?} has no container yet")]
    NoContainer(String),
    /// The engine failed (for logs).
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// The store failed.
    #[error("cannot record the app: {0}")]
    Store(#[from] StoreError),
}

/// What the manager needs from the rest of the agent.
pub struct AppsDeps {
    /// The container engine, as apps use it.
    pub engine: Arc<dyn AppEngine>,
    /// Images, through the images domain (pulls shared with jobs).
    pub images: Arc<dyn AppImages>,
    /// Health probes.
    pub prober: Arc<dyn Prober>,
    /// The shared store.
    pub store: Store,
    /// Where transitions are published.
    pub events: EventBus,
    /// Holds placed by disk guard and setup (new starts wait on them).
    pub admission: AdmissionGate,
    /// Managed mounts.
    pub mounts: Arc<dyn MountResolver>,
    /// The job slots.
    pub slots: Arc<dyn SlotPool>,
    /// Labels the containers.
    pub instance_id: String,
    /// What the host offers.
    pub host: HostLimits,
    /// Whether the engine answers.
    pub engine_up: watch::Receiver<bool>,
    /// The live `[apps]` section.
    pub config: watch::Receiver<AppsConfig>,
    /// The live `jobs.allowed_host_roots` (host-path mounts, as jobs).
    pub host_roots: watch::Receiver<Vec<PathBuf>>,
    /// Observes each probe's latency (metrics); `None` when nobody listens.
    pub probe_observer: Option<ProbeObserver>,
}

/// Called with an app's name and a probe's latency in seconds.
pub type ProbeObserver = Arc<dyn Fn(&str, f64) + Send + Sync>;

/// How a deploy is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollout {
    /// A new app.
    Created,
    /// The same spec again: nothing to do.
    Unchanged,
    /// The new container becomes READY before the old one stops.
    Rolling,
    /// The old container stops first (a fixed host port cannot be held twice).
    StopThenStart,
}

impl Rollout {
    /// How the reply says it.
    pub fn describe(self) -> &'static str {
        match self {
            Rollout::Created => "created",
            Rollout::Unchanged => "unchanged: the same spec is deployed",
            Rollout::Rolling => {
                "rolling replace: the new container becomes READY before the old one is stopped"
            }
            Rollout::StopThenStart => {
                "stop-then-start: a fixed host port cannot be held by two containers, so the old one stops first"
            }
        }
    }
}

/// The answer to a deploy.
#[derive(Debug, Clone)]
pub struct DeployOutcome {
    /// The app as of now.
    pub record: AppRecord,
    /// How the deploy proceeds.
    pub rollout: Rollout,
}

/// What the handle asks an app's supervisor to do.
pub(super) enum Command {
    /// Stop and start the container again (not counted as a restart).
    Restart,
    /// Run a changed spec.
    Replace(Box<AppSpec>, Rollout),
    /// Stop, remove, forget; the sender is told when done.
    Remove(oneshot::Sender<()>),
}

/// One app: its record (written only by its supervisor) and its mailbox.
pub(super) struct AppHandle {
    pub(super) record: watch::Sender<AppRecord>,
    pub(super) commands: mpsc::UnboundedSender<Command>,
    /// The mailbox's receiving end until the supervisor is spawned.
    pub(super) mailbox: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
}

/// The app manager. Cheap to clone.
#[derive(Clone)]
pub struct AppManager {
    pub(super) inner: Arc<Inner>,
}

/// What every part of the manager shares.
pub(super) struct Inner {
    pub(super) deps: AppsDeps,
    pub(super) apps: Mutex<BTreeMap<String, Arc<AppHandle>>>,
    /// True once the records were matched with the engine's containers.
    pub(super) reconciled: watch::Sender<bool>,
    pub(super) shutdown: CancellationToken,
    pub(super) tasks: TaskTracker,
}

impl AppManager {
    /// Loads the records and starts the reconciliation (as soon as the
    /// engine answers), after which each app's supervisor runs on `tasks`.
    /// The slots of apps that were running are held at once, so that jobs
    /// do not take them meanwhile.
    pub fn start(
        deps: AppsDeps,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Self, AppError> {
        let mut apps = BTreeMap::new();
        for (name, record) in deps.store.scan::<AppRecord>(RECORDS)? {
            if holds_slots(record.state) && !record.removing {
                deps.slots
                    .hold_anyway(&slot_holder(&name), record.spec.slots);
            }
            apps.insert(name, Arc::new(AppHandle::new(record)));
        }
        let manager = Self {
            inner: Arc::new(Inner {
                deps,
                apps: Mutex::new(apps),
                reconciled: watch::channel(false).0,
                shutdown,
                tasks,
            }),
        };
        manager
            .inner
            .tasks
            .spawn(manager.clone().reconcile_when_engine_answers());
        Ok(manager)
    }

    pub(super) fn apps(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<AppHandle>>> {
        self.inner.apps.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn config(&self) -> AppsConfig {
        self.inner.deps.config.borrow().clone()
    }

    /// Deploys `spec`: a new app, the same spec again (nothing happens), or
    /// a changed spec (a rolling replace when every port is picked by the
    /// agent and the app is READY, otherwise stop-then-start).
    pub async fn deploy(&self, spec: AppSpec) -> Result<DeployOutcome, AppError> {
        let roots = self.inner.deps.host_roots.borrow().clone();
        let spec = spec::validate(spec, &self.config(), &roots, self.inner.deps.host)?;
        for (i, mount) in spec.mounts.iter().enumerate() {
            if let MountSource::Managed(name) = &mount.source
                && self.inner.deps.mounts.resolve(name) == MountResolution::Unknown
            {
                return Err(SpecError {
                    field: format!("mounts[{i}].managed"),
                    problem: format!("no managed mount named {name:?}"),
                }
                .into());
            }
        }
        self.check_fixed_ports(&spec)?;
        let existing = self.apps().get(&spec.name).cloned();
        if let Some(handle) = existing {
            let record = handle.record.borrow().clone();
            if record.removing {
                return Err(AppError::Removing(spec.name));
            }
            if record.spec == spec {
                return Ok(DeployOutcome {
                    record,
                    rollout: Rollout::Unchanged,
                });
            }
            let all_picked = spec.ports.iter().all(|p| p.host_port == 0);
            let rollout = if all_picked && record.state == AppState::Ready {
                Rollout::Rolling
            } else {
                Rollout::StopThenStart
            };
            let _ = handle
                .commands
                .send(Command::Replace(Box::new(spec), rollout));
            return Ok(DeployOutcome { record, rollout });
        }
        let limit = self.config().max_apps;
        if self.apps().len() >= limit as usize {
            return Err(AppError::TooMany { limit });
        }
        let record = AppRecord::new(spec);
        self.inner
            .deps
            .store
            .apply(vec![Write::put(RECORDS, record.name(), &record)])
            .await?;
        let handle = Arc::new(AppHandle::new(record.clone()));
        let raced = {
            let mut apps = self.apps();
            if apps.contains_key(record.name()) {
                true
            } else {
                apps.insert(record.name().to_owned(), handle.clone());
                false
            }
        };
        if raced {
            // A concurrent deploy of the same name won; answer as it would.
            return Box::pin(self.deploy(record.spec)).await;
        }
        self.publish(&record);
        if *self.inner.reconciled.borrow() {
            self.spawn_supervisor(&handle, None);
        }
        Ok(DeployOutcome {
            record,
            rollout: Rollout::Created,
        })
    }

    /// Refuses a fixed host port another app holds, or something else
    /// listens on (unless this app itself holds it now).
    fn check_fixed_ports(&self, spec: &AppSpec) -> Result<(), AppError> {
        let apps = self.apps();
        for port in spec.ports.iter().filter(|p| p.host_port != 0) {
            let mut ours = false;
            for (name, handle) in apps.iter() {
                let record = handle.record.borrow();
                let holds = record.host_ports.values().any(|p| *p == port.host_port)
                    && holds_slots(record.state);
                if holds && *name != spec.name {
                    return Err(PortError::InUse {
                        ip: port.host_ip.clone(),
                        port: port.host_port,
                        user: Some(format!("app {name:?}")),
                    }
                    .into());
                }
                ours |= holds && *name == spec.name;
            }
            if !ours {
                super::ports::check_free(&port.host_ip, port.host_port)?;
            }
        }
        Ok(())
    }

    /// The app named `name`.
    pub fn get(&self, name: &str) -> Result<AppRecord, AppError> {
        self.apps()
            .get(name)
            .map(|h| h.record.borrow().clone())
            .ok_or_else(|| AppError::NotFound(name.to_owned()))
    }

    /// Every app, by name.
    pub fn list(&self) -> Vec<AppRecord> {
        self.apps()
            .values()
            .map(|h| h.record.borrow().clone())
            .collect()
    }

    /// A receiver of the app's record, for `deploy --wait` style watchers
    /// and tests.
    pub fn watch(&self, name: &str) -> Result<watch::Receiver<AppRecord>, AppError> {
        self.apps()
            .get(name)
            .map(|h| h.record.subscribe())
            .ok_or_else(|| AppError::NotFound(name.to_owned()))
    }

    /// Stops and removes the app's container and forgets the app; answers
    /// once done or after the stop grace (the removal then goes on).
    pub async fn remove(&self, name: &str) -> Result<AppRecord, AppError> {
        let handle = self
            .apps()
            .get(name)
            .cloned()
            .ok_or_else(|| AppError::NotFound(name.to_owned()))?;
        let (done, wait) = oneshot::channel();
        let _ = handle.commands.send(Command::Remove(done));
        let grace = Duration::from_secs(self.config().stop_grace_seconds.into());
        let _ = tokio::time::timeout(grace + REMOVE_REPLY_SLACK, wait).await;
        Ok(handle.record.borrow().clone())
    }

    /// Restarts the app's container (not counted in `restarts`).
    pub fn restart(&self, name: &str) -> Result<AppRecord, AppError> {
        let handle = self
            .apps()
            .get(name)
            .cloned()
            .ok_or_else(|| AppError::NotFound(name.to_owned()))?;
        if handle.record.borrow().removing {
            return Err(AppError::Removing(name.to_owned()));
        }
        let _ = handle.commands.send(Command::Restart);
        Ok(handle.record.borrow().clone())
    }

    /// The output of the app's current container; with `follow`, until it
    /// exits.
    pub async fn logs(&self, name: &str, follow: bool) -> Result<OutputStreamBox, AppError> {
        let container = self.get(name)?.container_id;
        if container.is_empty() {
            return Err(AppError::NoContainer(name.to_owned()));
        }
        Ok(self.inner.deps.engine.output(&container, 0, follow).await?)
    }

    /// How many apps are in each state, for metrics and status.
    pub fn counts_by_state(&self) -> BTreeMap<AppState, u64> {
        let mut counts = BTreeMap::new();
        for handle in self.apps().values() {
            *counts.entry(handle.record.borrow().state).or_insert(0) += 1;
        }
        counts
    }

    /// Publishes the app's record on the event stream.
    pub(super) fn publish(&self, record: &AppRecord) {
        self.inner
            .deps
            .events
            .publish(EventPayload::App(Box::new(record.clone())));
    }
}

impl AppHandle {
    pub(super) fn new(record: AppRecord) -> Self {
        let (commands, mailbox) = mpsc::unbounded_channel();
        Self {
            record: watch::channel(record).0,
            commands,
            mailbox: Mutex::new(Some(mailbox)),
        }
    }
}

/// Whether an app in `state` holds its slots (and its ports).
pub(super) fn holds_slots(state: AppState) -> bool {
    !matches!(
        state,
        AppState::Stopped | AppState::Failed | AppState::Pending
    )
}

/// The slot pool's name for an app (job ids cannot contain `:`).
pub(super) fn slot_holder(name: &str) -> String {
    format!("app:{name}")
}

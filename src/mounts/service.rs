//! The mount service: the registry of managed mounts, the `Mount` /
//! `Unmount` / list operations, restoring mounts at agent start, the
//! `mounts.*` store tables, the mounts condition, and what jobs and the disk
//! guard may ask of mounts.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cache;
use super::config::{DeclaredMount, MountsConfig};
use super::secrets;
use super::spec::{self, Auth, ManagedIdentity, MountSpec, Origin, PathRules, SecretSource};
use super::supervisor::{self, Start};
use super::system::{FuseMounter, Launch, Probe, ProcessState, UnmountFailure, is_blobfuse2};
use super::{MountError, MountState, MountStatus};
use crate::events::{EventBus, EventPayload};
use crate::health::{ConditionState, Health, Subsystem};
use crate::paths;
use crate::store::{Store, Table, Write};

/// API mounts: the request without its secret.
pub(super) const REQUESTED: Table = Table("mounts.requested");
/// Every mount's last blobfuse2 pid and repair count, for adoption.
pub(super) const PROCESSES: Table = Table("mounts.processes");

/// Settings of the mount service, from `[mounts]` and the agent's dirs.
#[derive(Debug, Clone)]
pub struct MountSettings {
    /// `mounts.blobfuse2_path`.
    pub blobfuse2_path: PathBuf,
    /// Where rendered configs and blobfuse2's raw output go
    /// (`<agent.runtime_dir>/mounts`, 0700, root only).
    pub config_dir: PathBuf,
    /// Where blobfuse2's own log goes (`<agent.logs_dir>/mounts`).
    pub logs_dir: PathBuf,
    /// `agent.state_dir` (API secrets live below it).
    pub state_dir: PathBuf,
    /// Allowed roots and the cache root.
    pub rules: PathRules,
    /// `mounts.default_cache_max_bytes`.
    pub default_cache_max_bytes: u64,
    /// `mounts.mount_timeout_seconds`.
    pub mount_timeout: Duration,
    /// `mounts.health_timeout_seconds`.
    pub health_timeout: Duration,
    /// `mounts.backoff_initial_seconds`.
    pub backoff_initial: Duration,
    /// `mounts.backoff_max_seconds`.
    pub backoff_max: Duration,
    /// How long blobfuse2 gets to exit after SIGTERM.
    pub stop_grace: Duration,
}

impl MountSettings {
    /// Settings from the section and the agent's dirs (`agent.state_dir`,
    /// `agent.runtime_dir`, `agent.logs_dir`), where no mount may go.
    pub fn new(m: &MountsConfig, state_dir: &Path, runtime_dir: &Path, logs_dir: &Path) -> Self {
        Self {
            blobfuse2_path: m.blobfuse2_path.clone(),
            config_dir: runtime_dir.join("mounts"),
            logs_dir: logs_dir.join("mounts"),
            state_dir: state_dir.to_owned(),
            rules: PathRules::new(
                &m.allowed_roots,
                &m.cache_root,
                &[
                    state_dir.to_owned(),
                    runtime_dir.to_owned(),
                    logs_dir.to_owned(),
                ],
            ),
            default_cache_max_bytes: m.default_cache_max_bytes,
            mount_timeout: Duration::from_secs(m.mount_timeout_seconds.into()),
            health_timeout: Duration::from_secs(m.health_timeout_seconds.into()),
            backoff_initial: Duration::from_secs(m.backoff_initial_seconds.into()),
            backoff_max: Duration::from_secs(m.backoff_max_seconds.into()),
            stop_grace: Duration::from_secs(5),
        }
    }

    /// How blobfuse2 is started for a spec.
    pub fn launch(&self, spec: &MountSpec) -> Launch {
        Launch {
            name: spec.name.clone(),
            program: self.blobfuse2_path.clone(),
            mount_path: spec.mount_path.clone(),
            config_file: self.config_dir.join(format!("{}.yaml", spec.name)),
            // Raw output may quote a request URL with its SAS (the Azure
            // SDK's errors do): it stays beside the 0600 config, never
            // under the logs dir, and goes at cleanup.
            output_file: self.config_dir.join(format!("{}.out", spec.name)),
        }
    }

    /// blobfuse2's own log file of a mount.
    pub fn log_file(&self, name: &str) -> PathBuf {
        self.logs_dir.join(format!("{name}.log"))
    }
}

/// How [`MountService::unmount`] took a mount off its path.
enum Detached {
    /// Nothing of blobfuse2's was mounted there (any more).
    NotMounted,
    /// `fusermount3 -u` succeeded.
    Cleanly,
    /// Busy (the detail says why); detached with `fusermount3 -u -z`.
    Lazily(String),
}

/// A managed mount that a job may bind-mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedPath {
    /// The mount's name.
    pub name: String,
    /// Where it is mounted on the host.
    pub host_path: PathBuf,
    /// Whether it is mounted read-only.
    pub read_only: bool,
}

/// Why a job cannot use a mount (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No managed mount has this name: refuse the job.
    #[error("no mount named {0:?}")]
    Unknown(String),
    /// The mount exists but is not healthy now: the job waits.
    #[error(
        "mount {name:?} is {state}{detail}",
        state = state.name(),
        detail = if message.is_empty() { String::new() } else { format!(" ({message})") }
    )]
    Unhealthy {
        /// The mount.
        name: String,
        /// Its state.
        state: MountState,
        /// Why.
        message: String,
    },
}

/// A managed mount's cache directory, for the disk guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheDir {
    /// The mount's name.
    pub name: String,
    /// The directory.
    pub path: PathBuf,
    /// Its cap (`file_cache.max-size-mb`) in bytes.
    pub max_bytes: u64,
}

/// The API mount record (`mounts.requested`): everything but the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RequestedRecord {
    pub account: String,
    pub container: String,
    pub mount_path: PathBuf,
    pub auth_mode: String,
    #[serde(default)]
    pub identity: ManagedIdentity,
    pub read_only: bool,
    pub cache_dir: PathBuf,
    pub cache_max_bytes: u64,
    pub endpoint: String,
    pub subdirectory: String,
}

/// The process record (`mounts.processes`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct ProcessRecord {
    pub pid: Option<u32>,
    pub remount_count: u32,
}

/// One managed mount.
struct Entry {
    spec: Arc<MountSpec>,
    status: watch::Sender<MountStatus>,
    /// Stops its supervisor.
    stop: CancellationToken,
    /// Ends when its supervisor has returned.
    done: Option<watch::Receiver<bool>>,
    /// Asks its supervisor for a health check now (a job start found the
    /// mount dead before the next scheduled check).
    check_now: Arc<Notify>,
}

/// What supervisors share with the service.
pub(super) struct Inner {
    pub settings: MountSettings,
    pub mounter: Arc<dyn FuseMounter>,
    pub store: Store,
    pub events: EventBus,
    pub health: Health,
    pub interval: watch::Receiver<Duration>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Serialises the admission of new mounts (checks, record, registry).
    admitting: tokio::sync::Mutex<()>,
    mounts: Mutex<BTreeMap<String, Entry>>,
    cache_dirs: watch::Sender<Vec<CacheDir>>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        // Every mutation is a single insert or remove; a poisoned map is consistent.
        self.mounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a changed status (an event) and refreshes the condition.
    pub fn publish(&self, status: &MountStatus) {
        self.events.publish(EventPayload::Mount(status.clone()));
        self.refresh_condition();
    }

    /// Recomputes the mounts condition from every mount's state.
    pub fn refresh_condition(&self) {
        let statuses: Vec<MountStatus> = self
            .lock()
            .values()
            .map(|e| e.status.borrow().clone())
            .collect();
        let (state, message) = condition(&statuses);
        self.health.set(Subsystem::Mounts, state, message);
    }

    fn refresh_cache_dirs(&self) {
        let dirs: Vec<CacheDir> = self
            .lock()
            .values()
            .map(|e| CacheDir {
                name: e.spec.name.clone(),
                path: e.spec.cache_dir.clone(),
                max_bytes: e.spec.cache_max_bytes,
            })
            .collect();
        self.cache_dirs.send_if_modified(|current| {
            let changed = *current != dirs;
            *current = dirs;
            changed
        });
    }
}

/// The mounts condition: ok when every mount is up, degraded while any is
/// being (re)mounted or is stale, failed when any failed; the message names
/// each mount that is not up, with its message verbatim.
fn condition(statuses: &[MountStatus]) -> (ConditionState, String) {
    if statuses.is_empty() {
        return (ConditionState::Ok, "no mounts".into());
    }
    let not_up: Vec<String> = statuses
        .iter()
        .filter(|s| s.state != MountState::Mounted)
        .map(|s| {
            if s.message.is_empty() {
                format!("{} {}", s.name, s.state.name())
            } else {
                format!("{} {}: {}", s.name, s.state.name(), s.message)
            }
        })
        .collect();
    if not_up.is_empty() {
        let names: Vec<&str> = statuses.iter().map(|s| s.name.as_str()).collect();
        return (
            ConditionState::Ok,
            format!("{} mounted: {}", statuses.len(), names.join(", ")),
        );
    }
    let state = if statuses.iter().any(|s| s.state == MountState::Failed) {
        ConditionState::Failed
    } else {
        ConditionState::Degraded
    };
    (state, not_up.join("; "))
}

/// The mount service. Cheap to clone.
#[derive(Clone)]
pub struct MountService {
    inner: Arc<Inner>,
}

impl MountService {
    /// A service with no mounts yet. Its supervisors run on `tasks` and stop
    /// (leaving their mounts running) when `shutdown` fires.
    #[allow(clippy::too_many_arguments)] // each is a distinct shared handle of the daemon
    pub fn new(
        settings: MountSettings,
        mounter: Arc<dyn FuseMounter>,
        store: Store,
        events: EventBus,
        health: Health,
        interval: watch::Receiver<Duration>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        health.set(Subsystem::Mounts, ConditionState::Ok, "no mounts");
        Self {
            inner: Arc::new(Inner {
                settings,
                mounter,
                store,
                events,
                health,
                interval,
                shutdown,
                tasks,
                admitting: tokio::sync::Mutex::new(()),
                mounts: Mutex::new(BTreeMap::new()),
                cache_dirs: watch::channel(Vec::new()).0,
            }),
        }
    }

    /// Restores the mounts declared in config and those requested over the
    /// API before, adopting the ones still running. Returns at once; each
    /// mount comes up in its own supervisor.
    pub async fn restore(&self, declared: &[DeclaredMount]) {
        let mut specs: Vec<Result<MountSpec, (MountSpec, String)>> = Vec::new();
        for d in declared {
            specs.push(self.declared_spec(d).await);
        }
        match self.inner.store.scan::<RequestedRecord>(REQUESTED) {
            Ok(records) => {
                for (name, record) in records {
                    if declared.iter().any(|d| d.name == name) {
                        tracing::warn!(mount = %name, "a mount requested over the API has the name of one declared in config; the config wins");
                        continue;
                    }
                    specs.push(Ok(self.requested_spec(&name, record)));
                }
            }
            Err(error) => tracing::error!(%error, "cannot read the requested mounts"),
        }
        for spec in specs {
            match spec {
                Ok(spec) => {
                    if let Err(error) = self.check_conflicts(&spec) {
                        self.add_failed(spec, error.to_string());
                    } else {
                        self.add(spec, Start::Restore, None);
                    }
                }
                Err((spec, problem)) => self.add_failed(spec, problem),
            }
        }
        self.inner.refresh_condition();
    }

    /// Mounts over the API: validates the request (paths not yet checked;
    /// an empty cache dir and a zero cache size mean the defaults), records
    /// it (the secret in its 0600 file), starts the supervisor and waits
    /// until the mount is in mountinfo or the first attempt failed (then
    /// forgets it).
    pub async fn mount(&self, spec: MountSpec) -> Result<MountStatus, MountError> {
        let spec = self.validate(spec).await?;
        let name = spec.name.clone();
        let (first_tx, first_rx) = oneshot::channel();
        {
            // One request at a time from the checks to the registry, so two
            // requests for the same name or path cannot both pass.
            let _admitting = self.inner.admitting.lock().await;
            self.check_conflicts(&spec)?;
            self.check_not_mounted(&spec).await?;
            self.record(&spec).await?;
            self.add(spec.clone(), Start::Fresh, Some(first_tx));
        }
        let outcome = first_rx
            .await
            .unwrap_or_else(|_| Err(MountError::Cancelled(name.clone())));
        match outcome {
            Ok(()) => Ok(self.status(&name).ok_or(MountError::Cancelled(name))?),
            Err(error) => {
                self.stop_supervisor(&name).await;
                self.cleanup(&spec, false).await;
                self.remove_entry(&name);
                Err(error)
            }
        }
    }

    /// Unmounts: stops the supervisor, unmounts, stops blobfuse2, empties
    /// the cache, and forgets the mount. The mount dir is left empty.
    ///
    /// When files are open there, the mount is detached lazily
    /// (`fusermount3 -u -z`) and blobfuse2 is left running: it keeps serving
    /// the open files and exits by itself once the kernel drops the last
    /// reference. The agent never kills it (that would break those files);
    /// a background task reaps it and then empties its cache (see
    /// [`Self::linger`]). The reply says so.
    ///
    /// When the unmount fails, the mount stays registered and supervised
    /// (its supervisor is started again, adopting the running mount).
    pub async fn unmount(&self, name: &str) -> Result<MountStatus, MountError> {
        let spec = self
            .inner
            .lock()
            .get(name)
            .map(|e| e.spec.clone())
            .ok_or_else(|| MountError::NotFound(name.to_owned()))?;
        let pid = self.status(name).and_then(|s| s.pid);
        self.stop_supervisor(name).await;
        let detached = match self.detach(&spec).await {
            Ok(detached) => detached,
            Err(error) => {
                self.resume_supervision(&spec);
                return Err(error);
            }
        };
        let launch = self.inner.settings.launch(&spec);
        let mounter = &self.inner.mounter;
        let pid = match pid {
            Some(pid) => Some(pid),
            None => mounter.find_process(&launch).await,
        };
        let mut message = String::from("cleanly unmounted");
        let mut lingering = None;
        match (detached, pid) {
            (Detached::Lazily(detail), Some(pid))
                if mounter.process_state(pid, &launch).await == ProcessState::Running =>
            {
                message = format!(
                    "lazily unmounted: busy ({detail}); blobfuse2 (pid {pid}) keeps serving the open files and exits when the last one is closed"
                );
                lingering = Some(pid);
            }
            (detached, pid) => {
                if let Detached::Lazily(detail) = detached {
                    message = format!("lazily unmounted: busy ({detail})");
                }
                if let Some(pid) = pid {
                    mounter
                        .stop(pid, &launch, self.inner.settings.stop_grace)
                        .await;
                }
            }
        }
        // A lingering blobfuse2 still reads its cache: only closed files go now.
        self.cleanup(&spec, lingering.is_some()).await;
        if spec.origin == Origin::Config {
            message.push_str("; declared in config, so mounted again at the next agent start");
        }
        let status = {
            let mut status = self
                .status(name)
                .unwrap_or_else(|| MountStatus::new(&spec, MountState::Unmounted));
            status.state = MountState::Unmounted;
            status.message = message;
            status.pid = None;
            status
        };
        self.remove_entry(name);
        self.inner.publish(&status);
        if let Some(pid) = lingering {
            self.linger(pid, launch, spec);
        }
        Ok(status)
    }

    /// Takes blobfuse2's mount off its path: cleanly, or lazily when busy.
    /// Anything else mounted there is left alone.
    async fn detach(&self, spec: &MountSpec) -> Result<Detached, MountError> {
        let mounter = &self.inner.mounter;
        let ours = mounter
            .mount_entry(&spec.mount_path)
            .await
            .ok()
            .flatten()
            .is_some_and(|e| is_blobfuse2(&e));
        if !ours {
            return Ok(Detached::NotMounted);
        }
        let failed = |detail: String| MountError::Unmount {
            name: spec.name.clone(),
            path: spec.mount_path.clone(),
            detail,
        };
        match mounter.unmount(&spec.mount_path, false).await {
            Ok(()) => Ok(Detached::Cleanly),
            Err(UnmountFailure::Busy(detail)) => {
                match mounter.unmount(&spec.mount_path, true).await {
                    Ok(()) => Ok(Detached::Lazily(detail)),
                    Err(UnmountFailure::Busy(d) | UnmountFailure::Other(d)) => Err(failed(d)),
                }
            }
            Err(UnmountFailure::Other(detail)) => Err(failed(detail)),
        }
    }

    /// Supervises a mount again after a failed unmount: a new supervisor
    /// adopts the running mount (or repairs it), so it is never left
    /// registered without health checks.
    fn resume_supervision(&self, spec: &MountSpec) {
        let mut mounts = self.inner.lock();
        mounts.remove(&spec.name);
        let initial = self.insert(&mut mounts, spec.clone(), Start::Restore, None);
        drop(mounts);
        self.inner.publish(&initial);
    }

    /// Watches a blobfuse2 left serving open files after a lazy unmount,
    /// once per health interval, until it exits by itself (the kernel drops
    /// the detached mount with its last reference); reaps it, then empties
    /// the cache it used unless another mount uses that dir by then. It is
    /// never killed: at agent shutdown the watch simply ends and the process
    /// (in its own session) goes on until its files are closed.
    fn linger(&self, pid: u32, launch: Launch, spec: Arc<MountSpec>) {
        let service = self.clone();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            loop {
                let interval = *service.inner.interval.borrow();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                if let ProcessState::Exited(how) =
                    service.inner.mounter.process_state(pid, &launch).await
                {
                    tracing::info!(mount = %spec.name, pid, %how, "the lazily unmounted blobfuse2 has exited");
                    break;
                }
            }
            let reused = service
                .inner
                .lock()
                .values()
                .any(|e| paths::overlaps(&e.spec.cache_dir, &spec.cache_dir));
            if !reused {
                service.clear_cache(&spec, false).await;
            }
        });
    }
    /// Every managed mount, by name.
    pub fn list(&self) -> Vec<MountStatus> {
        self.inner
            .lock()
            .values()
            .map(|e| e.status.borrow().clone())
            .collect()
    }

    /// One mount's status.
    pub fn status(&self, name: &str) -> Option<MountStatus> {
        self.inner
            .lock()
            .get(name)
            .map(|e| e.status.borrow().clone())
    }

    /// For jobs: where a mount is on the host, if it is known and healthy.
    pub fn resolve(&self, name: &str) -> Result<MountedPath, ResolveError> {
        let status = self
            .status(name)
            .ok_or_else(|| ResolveError::Unknown(name.to_owned()))?;
        if status.state != MountState::Mounted {
            return Err(ResolveError::Unhealthy {
                name: status.name,
                state: status.state,
                message: status.message,
            });
        }
        Ok(MountedPath {
            name: status.name,
            host_path: status.mount_path,
            read_only: status.read_only,
        })
    }

    /// Like [`resolve`](Self::resolve), and the mount root answers now
    /// (statfs reaches the FUSE daemon, within the health timeout). A dead
    /// mount wakes its supervisor, which repairs it at once.
    pub async fn verify(&self, name: &str) -> Result<MountedPath, ResolveError> {
        let mounted = self.resolve(name)?;
        let probe = self
            .inner
            .mounter
            .probe(&mounted.host_path, self.inner.settings.health_timeout)
            .await;
        match probe {
            Probe::Healthy => Ok(mounted),
            Probe::Stale(reason) => {
                if let Some(entry) = self.inner.lock().get(name) {
                    entry.check_now.notify_one();
                }
                Err(ResolveError::Unhealthy {
                    name: mounted.name,
                    state: MountState::Stale,
                    message: reason,
                })
            }
        }
    }

    /// For the disk guard: each managed mount's cache dir.
    pub fn cache_dirs(&self) -> Vec<CacheDir> {
        self.inner.cache_dirs.borrow().clone()
    }

    /// For the disk guard: the cache dirs, changing as mounts come and go.
    pub fn watch_cache_dirs(&self) -> watch::Receiver<Vec<CacheDir>> {
        self.inner.cache_dirs.subscribe()
    }

    /// For the disk guard's reclaim step: empties a mount's cache dir and
    /// returns the bytes freed. While the mount is up, files some process
    /// holds open are kept (blobfuse2 serves them from there; closed files
    /// were already uploaded and are fetched again on the next open).
    pub async fn empty_cache(&self, name: &str) -> Result<u64, MountError> {
        let (spec, state) = {
            let mounts = self.inner.lock();
            let entry = mounts
                .get(name)
                .ok_or_else(|| MountError::NotFound(name.to_owned()))?;
            (entry.spec.clone(), entry.status.borrow().state)
        };
        let keep_open = state == MountState::Mounted;
        let dir = spec.cache_dir.clone();
        let owned_name = name.to_owned();
        tokio::task::spawn_blocking(move || cache::empty(&dir, keep_open))
            .await
            .map_err(|e| MountError::Io {
                name: owned_name.clone(),
                action: "empty the cache dir",
                path: spec.cache_dir.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| MountError::Io {
                name: owned_name,
                action: "empty the cache dir",
                path: spec.cache_dir.clone(),
                source,
            })
    }

    /// Turns an API request into a checked spec: field rules, resolved
    /// paths, cache defaults.
    async fn validate(&self, mut spec: MountSpec) -> Result<MountSpec, MountError> {
        let invalid = |field: &'static str, problem: String| MountError::Invalid {
            name: spec.name.clone(),
            field,
            problem,
        };
        spec::check_name(&spec.name).map_err(|p| invalid("name", p))?;
        spec::check_account(&spec.account).map_err(|p| invalid("account", p))?;
        spec::check_container(&spec.container).map_err(|p| invalid("container", p))?;
        spec::check_endpoint(&spec.endpoint).map_err(|p| invalid("endpoint", p))?;
        spec::check_subdirectory(&spec.subdirectory).map_err(|p| invalid("subdirectory", p))?;
        if let Some(SecretSource::Given(secret)) = spec.auth.secret_source()
            && secret.is_empty()
        {
            let field = if spec.auth.mode() == "key" {
                "account_key"
            } else {
                "sas_token"
            };
            return Err(invalid(field, "must not be empty".into()));
        }
        if spec.cache_max_bytes == 0 {
            spec.cache_max_bytes = self.inner.settings.default_cache_max_bytes;
        } else if spec.cache_max_bytes < 1 << 20 {
            return Err(invalid(
                "cache_max_bytes",
                format!("{} is below the minimum of 1 MiB", spec.cache_max_bytes),
            ));
        }
        let rules = self.inner.settings.rules.clone();
        let (name, path, cache) = (
            spec.name.clone(),
            spec.mount_path.clone(),
            spec.cache_dir.clone(),
        );
        let resolved = tokio::task::spawn_blocking(move || {
            let mount_path = rules.mount_path(&path).map_err(|p| ("mount_path", p))?;
            let cache = if cache.as_os_str().is_empty() {
                rules.default_cache_dir(&name)
            } else {
                cache
            };
            let cache_dir = rules.cache_dir(&cache).map_err(|p| ("cache_dir", p))?;
            if paths::overlaps(&mount_path, &cache_dir) {
                return Err((
                    "cache_dir",
                    format!(
                        "{} and the mount path {} must not contain each other (blobfuse2: tmp-path is same as mount path)",
                        cache_dir.display(),
                        mount_path.display()
                    ),
                ));
            }
            Ok((mount_path, cache_dir))
        })
        .await
        .map_err(|e| invalid("mount_path", e.to_string()))?;
        let (mount_path, cache_dir) = resolved.map_err(|(field, p)| invalid(field, p))?;
        let dir = cache_dir.clone();
        let claimable = tokio::task::spawn_blocking(move || cache::check_claimable(&dir))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(problem) = claimable {
            return Err(MountError::CacheDir {
                name: spec.name.clone(),
                path: cache_dir,
                problem,
            });
        }
        spec.mount_path = mount_path;
        spec.cache_dir = cache_dir;
        Ok(spec)
    }

    /// A mount path or cache dir that a managed mount already uses, or a
    /// name already taken.
    fn check_conflicts(&self, spec: &MountSpec) -> Result<(), MountError> {
        conflicts(&self.inner.lock(), spec)
    }

    /// Something (anything) already mounted at the path.
    async fn check_not_mounted(&self, spec: &MountSpec) -> Result<(), MountError> {
        if let Ok(Some(entry)) = self.inner.mounter.mount_entry(&spec.mount_path).await {
            return Err(MountError::InUse {
                name: spec.name.clone(),
                what: format!(
                    "path {} is already mounted ({} from {}); unmount it first",
                    spec.mount_path.display(),
                    entry.fs_type,
                    entry.source
                ),
            });
        }
        Ok(())
    }

    /// Records an API request: the secret in its 0600 file, the rest in the store.
    async fn record(&self, spec: &MountSpec) -> Result<(), MountError> {
        let settings = &self.inner.settings;
        if let Some(SecretSource::Given(secret)) = spec.auth.secret_source() {
            let (dir, name, secret) = (
                settings.state_dir.clone(),
                spec.name.clone(),
                secret.clone(),
            );
            tokio::task::spawn_blocking(move || secrets::store(&dir, &name, &secret))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
                .map_err(|source| MountError::Io {
                    name: spec.name.clone(),
                    action: "keep the secret in",
                    path: secrets::secrets_dir(&settings.state_dir).join(&spec.name),
                    source,
                })?;
        }
        let (identity, auth_mode) = match &spec.auth {
            Auth::ManagedIdentity(id) => (id.clone(), "msi"),
            other => (ManagedIdentity::default(), other.mode()),
        };
        let record = RequestedRecord {
            account: spec.account.clone(),
            container: spec.container.clone(),
            mount_path: spec.mount_path.clone(),
            auth_mode: auth_mode.into(),
            identity,
            read_only: spec.read_only,
            cache_dir: spec.cache_dir.clone(),
            cache_max_bytes: spec.cache_max_bytes,
            endpoint: spec.endpoint.clone(),
            subdirectory: spec.subdirectory.clone(),
        };
        let result = self
            .inner
            .store
            .apply(vec![
                Write::put(REQUESTED, spec.name.clone(), &record),
                Write::put(PROCESSES, spec.name.clone(), &ProcessRecord::default()),
            ])
            .await;
        if let Err(source) = result {
            self.forget_record(&spec.name).await;
            return Err(MountError::Store {
                name: spec.name.clone(),
                source,
            });
        }
        Ok(())
    }

    /// Forgets an API request's record and secret.
    async fn forget_record(&self, name: &str) {
        let dir = self.inner.settings.state_dir.clone();
        let owned = name.to_owned();
        let _ = tokio::task::spawn_blocking(move || secrets::forget(&dir, &owned)).await;
        if let Err(error) = self
            .inner
            .store
            .apply(vec![
                Write::Delete(REQUESTED, name.to_owned()),
                Write::Delete(PROCESSES, name.to_owned()),
            ])
            .await
        {
            tracing::error!(mount = %name, %error, "cannot forget the mount record");
        }
    }

    /// Removes what the agent made for a mount: record, secret, rendered
    /// config, blobfuse2's raw output, cache contents (the default per-mount
    /// cache dir itself too). With `keep_open`, cache files some process
    /// holds open stay (a lingering blobfuse2 still serves them).
    async fn cleanup(&self, spec: &MountSpec, keep_open: bool) {
        self.forget_record(&spec.name).await;
        let launch = self.inner.settings.launch(spec);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(&launch.config_file);
            let _ = std::fs::remove_file(&launch.output_file);
            let _ = std::fs::remove_file(launch.output_file.with_extension("out.1"));
        })
        .await;
        self.clear_cache(spec, keep_open).await;
    }

    /// Gives up a mount's cache dir: empties it and removes the agent's
    /// marker (and the default per-mount dir itself). A dir the agent does
    /// not own is left as it is.
    async fn clear_cache(&self, spec: &MountSpec, keep_open: bool) {
        let cache = spec.cache_dir.clone();
        let default_cache = self.inner.settings.rules.default_cache_dir(&spec.name) == cache;
        let released =
            tokio::task::spawn_blocking(move || cache::release(&cache, keep_open, default_cache))
                .await;
        if let Ok(Err(error)) = released {
            tracing::warn!(mount = %spec.name, %error, "cache dir not fully released");
        }
    }

    fn add(
        &self,
        spec: MountSpec,
        start: Start,
        first: Option<oneshot::Sender<Result<(), MountError>>>,
    ) {
        let mut mounts = self.inner.lock();
        let initial = self.insert(&mut mounts, spec, start, first);
        drop(mounts);
        self.inner.refresh_cache_dirs();
        self.inner.publish(&initial);
    }

    fn insert(
        &self,
        mounts: &mut BTreeMap<String, Entry>,
        spec: MountSpec,
        start: Start,
        first: Option<oneshot::Sender<Result<(), MountError>>>,
    ) -> MountStatus {
        let spec = Arc::new(spec);
        let initial = MountStatus::new(&spec, MountState::Mounting);
        let (status, _) = watch::channel(initial.clone());
        let stop = self.inner.shutdown.child_token();
        let (done_tx, done_rx) = watch::channel(false);
        let check_now = Arc::new(Notify::new());
        mounts.insert(
            spec.name.clone(),
            Entry {
                spec: spec.clone(),
                status: status.clone(),
                stop: stop.clone(),
                done: Some(done_rx),
                check_now: check_now.clone(),
            },
        );
        let inner = self.inner.clone();
        self.inner.tasks.spawn(async move {
            let control = supervisor::Control {
                status,
                stop,
                check_now,
            };
            supervisor::run(inner, spec, control, start, first).await;
            let _ = done_tx.send(true);
        });
        initial
    }

    /// A mount that cannot even be supervised (bad path, unreadable
    /// record): shown as failed, never retried.
    fn add_failed(&self, spec: MountSpec, message: String) {
        tracing::error!(mount = %spec.name, detail = %message, "mount cannot be restored");
        let mut status = MountStatus::new(&spec, MountState::Failed);
        status.message = message;
        let (status_tx, _) = watch::channel(status.clone());
        self.inner.lock().insert(
            spec.name.clone(),
            Entry {
                spec: Arc::new(spec),
                status: status_tx,
                stop: CancellationToken::new(),
                done: None,
                check_now: Arc::new(Notify::new()),
            },
        );
        self.inner.refresh_cache_dirs();
        self.inner.publish(&status);
    }

    /// Stops a mount's supervisor and waits until it has returned.
    async fn stop_supervisor(&self, name: &str) {
        let (stop, done) = {
            let mounts = self.inner.lock();
            let Some(entry) = mounts.get(name) else {
                return;
            };
            (entry.stop.clone(), entry.done.clone())
        };
        stop.cancel();
        if let Some(mut done) = done {
            let _ = done.wait_for(|d| *d).await;
        }
    }

    fn remove_entry(&self, name: &str) {
        self.inner.lock().remove(name);
        self.inner.refresh_cache_dirs();
        self.inner.refresh_condition();
    }

    /// The spec of a mount declared in config; on a problem, the spec as far
    /// as it goes and the problem.
    async fn declared_spec(&self, d: &DeclaredMount) -> Result<MountSpec, (MountSpec, String)> {
        let auth = match d.auth.as_str() {
            "key" => Auth::AccountKey(SecretSource::File(d.secret_file.clone())),
            "sas" => Auth::SasToken(SecretSource::File(d.secret_file.clone())),
            _ => Auth::ManagedIdentity(ManagedIdentity {
                client_id: d.client_id.clone(),
                resource_id: d.resource_id.clone(),
                object_id: d.object_id.clone(),
            }),
        };
        let spec = MountSpec {
            name: d.name.clone(),
            account: d.account.clone(),
            container: d.container.clone(),
            mount_path: d.mount_path.clone(),
            auth,
            read_only: d.read_only,
            cache_dir: d.cache_dir.clone(),
            cache_max_bytes: d.cache_max_bytes,
            endpoint: d.endpoint.clone(),
            subdirectory: d.subdirectory.clone(),
            origin: Origin::Config,
        };
        let mut fallback = spec.clone();
        if fallback.cache_dir.as_os_str().is_empty() {
            fallback.cache_dir = self.inner.settings.rules.default_cache_dir(&d.name);
        }
        if fallback.cache_max_bytes == 0 {
            fallback.cache_max_bytes = self.inner.settings.default_cache_max_bytes;
        }
        self.validate(spec)
            .await
            .map_err(|e| (fallback, format!("[[mounts.mount]] {e}")))
    }

    /// The spec of a mount requested over the API before this start.
    fn requested_spec(&self, name: &str, r: RequestedRecord) -> MountSpec {
        let secret_file = secrets::secrets_dir(&self.inner.settings.state_dir).join(name);
        let auth = match r.auth_mode.as_str() {
            "key" => Auth::AccountKey(SecretSource::File(secret_file)),
            "sas" => Auth::SasToken(SecretSource::File(secret_file)),
            _ => Auth::ManagedIdentity(r.identity),
        };
        MountSpec {
            name: name.to_owned(),
            account: r.account,
            container: r.container,
            mount_path: r.mount_path,
            auth,
            read_only: r.read_only,
            cache_dir: r.cache_dir,
            cache_max_bytes: r.cache_max_bytes,
            endpoint: r.endpoint,
            subdirectory: r.subdirectory,
            origin: Origin::Api,
        }
    }
}

fn conflicts(mounts: &BTreeMap<String, Entry>, spec: &MountSpec) -> Result<(), MountError> {
    let in_use = |what: String| MountError::InUse {
        name: spec.name.clone(),
        what,
    };
    if mounts.contains_key(&spec.name) {
        return Err(in_use(format!(
            "the name {:?} is already in use",
            spec.name
        )));
    }
    for other in mounts.values().map(|e| &e.spec) {
        for (mine, what) in [
            (&spec.mount_path, "mount path"),
            (&spec.cache_dir, "cache dir"),
        ] {
            for (theirs, their_what) in [
                (&other.mount_path, "mount path"),
                (&other.cache_dir, "cache dir"),
            ] {
                if paths::overlaps(mine, theirs) {
                    return Err(in_use(format!(
                        "{what} {} overlaps the {their_what} {} of mount {:?}",
                        mine.display(),
                        theirs.display(),
                        other.name
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Removes everything inside `dir` (not `dir` itself, nor the agent's cache
/// marker in it), never following symlinks; with `keep_open`, files some
/// process holds open stay. Returns the bytes freed. Blocking; callers go
/// through [`super::cache`], which checks that the agent owns the dir.
pub(super) fn empty_dir(dir: &Path, keep_open: bool) -> std::io::Result<u64> {
    let open = if keep_open {
        open_files_below(dir)
    } else {
        HashSet::new()
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
        Ok(meta) if !meta.is_dir() => {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        Ok(_) => {}
    }
    let mut freed = 0;
    remove_children(dir, &open, &dir.join(super::cache::MARKER), &mut freed)?;
    Ok(freed)
}

/// Returns whether `dir` is now empty.
fn remove_children(
    dir: &Path,
    open: &HashSet<PathBuf>,
    keep: &Path,
    freed: &mut u64,
) -> std::io::Result<bool> {
    let mut empty = true;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path == keep {
            empty = false;
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_dir() {
            if remove_children(&path, open, keep, freed)? {
                std::fs::remove_dir(&path)?;
            } else {
                empty = false;
            }
        } else if open.contains(&path) {
            empty = false;
        } else {
            std::fs::remove_file(&path)?;
            *freed += meta.len();
        }
    }
    Ok(empty)
}

/// Files below `dir` that some process has open (from `/proc/*/fd`).
fn open_files_below(dir: &Path) -> HashSet<PathBuf> {
    let mut open = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return open;
    };
    for proc_entry in procs.flatten() {
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && target.starts_with(dir)
            {
                open.insert(target);
            }
        }
    }
    open
}

/// Jobs bind-mount managed mounts by name: an unknown name is refused, an
/// unhealthy mount makes the job wait.
#[async_trait::async_trait]
impl crate::jobs::MountResolver for MountService {
    fn resolve(&self, name: &str) -> crate::jobs::MountResolution {
        resolution(MountService::resolve(self, name))
    }

    async fn verify(&self, name: &str) -> crate::jobs::MountResolution {
        resolution(MountService::verify(self, name).await)
    }

    fn repairs(&self, name: &str) -> u32 {
        self.status(name).map_or(0, |s| s.remount_count)
    }
}

fn resolution(resolved: Result<MountedPath, ResolveError>) -> crate::jobs::MountResolution {
    match resolved {
        Ok(mounted) => crate::jobs::MountResolution::Ready(mounted.host_path),
        Err(ResolveError::Unknown(_)) => crate::jobs::MountResolution::Unknown,
        Err(error @ ResolveError::Unhealthy { .. }) => {
            crate::jobs::MountResolution::Unavailable(error.to_string())
        }
    }
}

//! The mount service, the handle: the `Mount` / `Unmount` / list
//! operations, restoring mounts at agent start, starting and stopping each
//! mount's supervisor, and what jobs and the disk guard may ask of mounts.
//! The table of mounts and their records are the [`Registry`]'s; checking a
//! request is [`super::request`]'s; the per-mount state machine is
//! [`super::supervisor`]'s.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cache;
use super::config::DeclaredMount;
use super::handoff;
use super::registry::{CacheDir, Entry, Registry};
use super::request;
use super::settings::MountSettings;
use super::spec::{MountSpec, Origin};
use super::supervisor::{self, Shared, Start};
use super::system::{FuseMounter, Launch, Probe, ProcessState, UnmountFailure, is_blobfuse2};
use super::{MountError, MountState, MountStatus};
use crate::events::EventBus;
use crate::health::Health;
use crate::paths;
use crate::paths::offload::Offload;
use crate::store::Store;

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

/// The mount service. Cheap to clone.
#[derive(Clone)]
pub struct MountService {
    /// What its supervisors share with it.
    shared: Arc<Shared>,
    /// Stops the supervisors (their mounts stay).
    shutdown: CancellationToken,
    /// Where the supervisors and the watches of lingering blobfuse2 run.
    tasks: TaskTracker,
    /// Serialises the admission of new mounts (checks, record, registry).
    admitting: Arc<tokio::sync::Mutex<()>>,
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
        host_paths: Offload,
        interval: watch::Receiver<Duration>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        let registry = Registry::new(store, events, health, settings.state_dir.clone());
        Self {
            shared: Arc::new(Shared {
                settings,
                mounter,
                interval,
                registry,
                handed: Default::default(),
                host_paths,
            }),
            shutdown,
            tasks,
            admitting: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The table of mounts and their records.
    fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// Restores the mounts declared in config and those requested over the
    /// API before, adopting the ones still running. Returns at once; each
    /// mount comes up in its own supervisor.
    pub async fn restore(&self, declared: &[DeclaredMount]) {
        let mut specs: Vec<Result<MountSpec, (MountSpec, String)>> = Vec::new();
        for d in declared {
            specs.push(
                request::declared_spec(&self.shared.settings, &self.shared.host_paths, d).await,
            );
        }
        match self.registry().requested() {
            Ok(records) => {
                for (name, record) in records {
                    if declared.iter().any(|d| d.name == name) {
                        tracing::warn!(mount = %name, "a mount requested over the API has the name of one declared in config; the config wins");
                        continue;
                    }
                    let secret_file = self.registry().secret_file(&name);
                    let stored = record.into_spec(&name, secret_file);
                    specs.push(self.recheck(stored).await);
                }
            }
            Err(error) => tracing::error!(%error, "cannot read the requested mounts"),
        }
        for spec in specs {
            match spec {
                Ok(spec) => {
                    if let Err(error) = self.registry().conflicts(&spec) {
                        self.add_failed(spec, error.to_string());
                    } else {
                        self.add(spec, Start::Restore, None);
                    }
                }
                Err((spec, problem)) => self.add_failed(spec, problem),
            }
        }
        self.registry().refresh_condition();
        let managed: std::collections::HashSet<String> =
            self.registry().lock().keys().cloned().collect();
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            handoff::release_stale(&shared.settings, &managed);
        })
        .await;
    }

    /// A mount requested over the API before, checked again as a new
    /// request would be (the tree, the allowed roots or the config may have
    /// changed since): it must still lead to the very paths recorded.
    async fn recheck(&self, stored: MountSpec) -> Result<MountSpec, (MountSpec, String)> {
        match request::check(
            &self.shared.settings,
            &self.shared.host_paths,
            stored.clone(),
        )
        .await
        {
            Ok(checked)
                if checked.mount_path == stored.mount_path
                    && checked.cache_dir == stored.cache_dir =>
            {
                Ok(stored)
            }
            Ok(checked) => {
                let problem = format!(
                    "mount {:?}: its paths now lead to {} and {} instead of the recorded {} and {}; not restored",
                    stored.name,
                    checked.mount_path.display(),
                    checked.cache_dir.display(),
                    stored.mount_path.display(),
                    stored.cache_dir.display()
                );
                Err((stored, problem))
            }
            Err(error) => Err((stored, error.to_string())),
        }
    }

    /// Mounts over the API: validates the request (paths not yet checked;
    /// an empty cache dir and a zero cache size mean the defaults), records
    /// it (the secret in its 0600 file), starts the supervisor and waits
    /// until the mount is in mountinfo or the first attempt failed (then
    /// forgets it).
    pub async fn mount(&self, spec: MountSpec) -> Result<MountStatus, MountError> {
        let spec = request::check(&self.shared.settings, &self.shared.host_paths, spec).await?;
        let name = spec.name.clone();
        let (first_tx, first_rx) = oneshot::channel();
        {
            // One request at a time from the checks to the registry, so two
            // requests for the same name or path cannot both pass.
            let _admitting = self.admitting.lock().await;
            self.registry().conflicts(&spec)?;
            request::check_not_mounted(self.shared.mounter.as_ref(), &spec).await?;
            self.registry().record(&spec).await?;
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
            .registry()
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
        let launch = self.shared.launch(&spec);
        let mounter = &self.shared.mounter;
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
                        .stop(pid, &launch, self.shared.settings.stop_grace)
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
        self.registry().publish(&status);
        if let Some(pid) = lingering {
            self.linger(pid, launch, spec);
        }
        Ok(status)
    }

    /// Takes blobfuse2's mount off its path: cleanly, or lazily when busy.
    /// Anything else mounted there is left alone.
    async fn detach(&self, spec: &MountSpec) -> Result<Detached, MountError> {
        let mounter = &self.shared.mounter;
        // The path blobfuse2 was handed (a staging entry for a dir a user
        // can change; unmounting it there takes it off the user's path too).
        let path = self.shared.handed(spec).mount_path;
        if handoff::is_staged(&self.shared.settings, &path) {
            // Its bind on the user's side goes first (found through it).
            let (shared, name) = (self.shared.clone(), spec.name.clone());
            let _ = tokio::task::spawn_blocking(move || handoff::unmirror(&shared.settings, &name))
                .await;
        }
        let ours = mounter
            .mount_entry(&path)
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
        match mounter.unmount(&path, false).await {
            Ok(()) => Ok(Detached::Cleanly),
            Err(UnmountFailure::Busy(detail)) => match mounter.unmount(&path, true).await {
                Ok(()) => Ok(Detached::Lazily(detail)),
                Err(UnmountFailure::Busy(d) | UnmountFailure::Other(d)) => Err(failed(d)),
            },
            Err(UnmountFailure::Other(detail)) => Err(failed(detail)),
        }
    }

    /// Supervises a mount again after a failed unmount: a new supervisor
    /// adopts the running mount (or repairs it), so it is never left
    /// registered without health checks.
    fn resume_supervision(&self, spec: &MountSpec) {
        let mut mounts = self.registry().lock();
        mounts.remove(&spec.name);
        let initial = self.insert(&mut mounts, spec.clone(), Start::Restore, None);
        drop(mounts);
        self.registry().publish(&initial);
    }

    /// Watches a blobfuse2 left serving open files after a lazy unmount,
    /// once per health interval, until it exits by itself (the kernel drops
    /// the detached mount with its last reference); reaps it, then empties
    /// the cache it used unless another mount uses that dir by then. It is
    /// never killed: at agent shutdown the watch simply ends and the process
    /// (in its own session) goes on until its files are closed.
    fn linger(&self, pid: u32, launch: Launch, spec: Arc<MountSpec>) {
        let service = self.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            loop {
                let interval = *service.shared.interval.borrow();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                if let ProcessState::Exited(how) =
                    service.shared.mounter.process_state(pid, &launch).await
                {
                    tracing::info!(mount = %spec.name, pid, %how, "the lazily unmounted blobfuse2 has exited");
                    break;
                }
            }
            let reused = service
                .registry()
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
        self.registry()
            .lock()
            .values()
            .map(|e| e.status.borrow().clone())
            .collect()
    }

    /// One mount's status.
    pub fn status(&self, name: &str) -> Option<MountStatus> {
        self.registry()
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
        // Jobs bind what blobfuse2 was handed: a path only root can change.
        let host_path = self
            .registry()
            .lock()
            .get(name)
            .map(|e| self.shared.handed(&e.spec).mount_path)
            .unwrap_or(status.mount_path);
        Ok(MountedPath {
            name: status.name,
            host_path,
            read_only: status.read_only,
        })
    }

    /// Like [`resolve`](Self::resolve), and the mount root answers now
    /// (statfs reaches the FUSE daemon, within the health timeout). A dead
    /// mount wakes its supervisor, which repairs it at once.
    pub async fn verify(&self, name: &str) -> Result<MountedPath, ResolveError> {
        let mounted = self.resolve(name)?;
        let probe = self
            .shared
            .mounter
            .probe(&mounted.host_path, self.shared.settings.health_timeout)
            .await;
        match probe {
            Probe::Healthy => Ok(mounted),
            Probe::Stale(reason) => {
                if let Some(entry) = self.registry().lock().get(name) {
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
        self.registry().cache_dirs()
    }

    /// For the disk guard: the cache dirs, changing as mounts come and go.
    pub fn watch_cache_dirs(&self) -> watch::Receiver<Vec<CacheDir>> {
        self.registry().watch_cache_dirs()
    }

    /// For the disk guard's reclaim step: empties a mount's cache dir and
    /// returns the bytes freed. While the mount is up, files some process
    /// holds open are kept (blobfuse2 serves them from there; closed files
    /// were already uploaded and are fetched again on the next open).
    pub async fn empty_cache(&self, name: &str) -> Result<u64, MountError> {
        let (spec, state) = {
            let mounts = self.registry().lock();
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

    /// Removes what the agent made for a mount: record, secret, rendered
    /// config, blobfuse2's raw output, cache contents (the default per-mount
    /// cache dir itself too). With `keep_open`, cache files some process
    /// holds open stay (a lingering blobfuse2 still serves them).
    async fn cleanup(&self, spec: &MountSpec, keep_open: bool) {
        self.registry().forget(&spec.name).await;
        let launch = self.shared.launch(spec);
        let shared = self.shared.clone();
        let owned = spec.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(&launch.config_file);
            let _ = std::fs::remove_file(&launch.output_file);
            let _ = std::fs::remove_file(launch.output_file.with_extension("out.1"));
            // blobfuse2's mount is off by now (a lingering one is detached).
            handoff::release(&shared.settings, &owned);
        })
        .await;
        self.shared.handed.forget(&spec.name);
        self.clear_cache(spec, keep_open).await;
    }

    /// Gives up a mount's cache dir: empties it and removes the agent's
    /// marker (and the default per-mount dir itself). A dir the agent does
    /// not own is left as it is.
    async fn clear_cache(&self, spec: &MountSpec, keep_open: bool) {
        let cache = spec.cache_dir.clone();
        let default_cache = self.shared.settings.rules.default_cache_dir(&spec.name) == cache;
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
        let mut mounts = self.registry().lock();
        let initial = self.insert(&mut mounts, spec, start, first);
        drop(mounts);
        self.registry().refresh_cache_dirs();
        self.registry().publish(&initial);
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
        let stop = self.shutdown.child_token();
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
        let shared = self.shared.clone();
        self.tasks.spawn(async move {
            let control = supervisor::Control {
                status,
                stop,
                check_now,
            };
            supervisor::run(shared, spec, control, start, first).await;
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
        self.registry().lock().insert(
            spec.name.clone(),
            Entry {
                spec: Arc::new(spec),
                status: status_tx,
                stop: CancellationToken::new(),
                done: None,
                check_now: Arc::new(Notify::new()),
            },
        );
        self.registry().refresh_cache_dirs();
        self.registry().publish(&status);
    }

    /// Stops a mount's supervisor and waits until it has returned.
    async fn stop_supervisor(&self, name: &str) {
        let (stop, done) = {
            let mounts = self.registry().lock();
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
        self.registry().lock().remove(name);
        self.registry().refresh_cache_dirs();
        self.registry().refresh_condition();
    }
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

#[cfg(test)]
mod tests;

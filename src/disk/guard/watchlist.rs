//! What the guard watches: the paths and why (built in, `disk.paths`,
//! `disk.overrides`, registered by other domains, added over the API and kept
//! in the store, the Docker data root once the engine names it), and the
//! filesystems they live on: one entry per `st_dev`, a path whose device is
//! not known (it never answered) being an entry of its own, each with the
//! levels of its paths' overrides.
//!
//! Bookkeeping under the guard's lock, and the store and engine calls that
//! feed it. Probing the entries is `sampling`'s; what a change of state means
//! is `alerts`'.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::disk::config::DiskConfig;
use crate::disk::docker::DockerSpace;
use crate::disk::hysteresis::PressureMachine;
use crate::disk::reclaim::{ReclaimTarget, driver::wants_space};
use crate::disk::{
    DiskError, DiskState, FilesystemUsage, FsStats, MountInfo, SkippedPath, Thresholds, WatchedPath,
};
use crate::paths::tidy;
use crate::store::{Store, Table, Write};

/// The table of paths added with `AddWatchedPath`: key path, value [`SavedPath`].
pub const WATCHED_PATHS: Table = Table("disk.watched_paths");

/// Why the built-in paths are watched.
const REASON_ROOT: &str = "root filesystem";
const REASON_TMP: &str = "temp dir";
const REASON_MNT: &str = "temp disk";
/// The state dir and the Docker data root also decide the admission hold.
pub(super) const REASON_STATE: &str = "state dir";
pub(super) const REASON_DOCKER: &str = "docker data root";
/// The agent's own well-known paths: their mount points belong to root, so
/// no user can put a FUSE server under them, and they are probed in the
/// agent; every other path is probed in a helper process.
const OWN_REASONS: [&str; 5] = [
    REASON_ROOT,
    REASON_TMP,
    REASON_MNT,
    REASON_STATE,
    REASON_DOCKER,
];
const REASON_CONFIG: &str = "disk.paths";
const REASON_OVERRIDE: &str = "disk.overrides";
/// Prefix of the reason of paths added over the API.
const REASON_OPERATOR: &str = "added by operator";

/// A path added over the API, as kept in the store.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedPath {
    /// Why the operator watches it.
    pub reason: String,
}

/// Which filesystem an entry is: a device number, or a path whose device is
/// not known because it never answered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum FsKey {
    Dev(u64),
    Unresolved(PathBuf),
}

/// One watched path.
#[derive(Debug, Default)]
pub(super) struct PathEntry {
    pub(super) reasons: BTreeSet<String>,
    /// The filesystem it is on, once probed.
    pub(super) dev: Option<u64>,
    pub(super) mount: Option<MountInfo>,
    /// When its outstanding probe started.
    pub(super) in_flight: Option<Instant>,
    pub(super) last_probe: Option<Instant>,
    /// Why it is skipped (absent, not a directory).
    pub(super) problem: Option<String>,
}

impl PathEntry {
    /// Whether the path is probed in a helper process: it is watched for
    /// none of the agent's own reasons (callers, config, mounts control it).
    pub(super) fn isolated(&self) -> bool {
        !self
            .reasons
            .iter()
            .any(|r| OWN_REASONS.contains(&r.as_str()))
    }
}

/// One watched filesystem.
#[derive(Debug)]
pub(super) struct FsEntry {
    pub(super) machine: PressureMachine,
    pub(super) stats: Option<FsStats>,
    pub(super) sampled_at: Option<SystemTime>,
    pub(super) error: Option<String>,
    pub(super) alerts: u64,
    /// The path whose probe is outstanding, and since when.
    pub(super) in_flight: Option<(PathBuf, Instant)>,
    pub(super) thresholds: Thresholds,
    pub(super) mount: MountInfo,
}

impl FsEntry {
    pub(super) fn new(mount: MountInfo, thresholds: Thresholds) -> Self {
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

/// The watched paths and their filesystems.
pub(super) struct Watchlist {
    /// The live `[disk]` section: its paths, overrides and timings.
    pub(super) config: DiskConfig,
    pub(super) paths: BTreeMap<PathBuf, PathEntry>,
    pub(super) filesystems: BTreeMap<FsKey, FsEntry>,
    pub(super) state_dir: PathBuf,
    pub(super) docker_root: Option<PathBuf>,
}

impl Watchlist {
    /// The built-in paths, the state dir, the config's paths and the paths
    /// saved in the store. Returns with them the paths to probe at once.
    pub(super) fn new(
        config: DiskConfig,
        state_dir: &Path,
        saved: Vec<(PathBuf, String)>,
    ) -> (Self, Vec<PathBuf>) {
        let mut watch = Self {
            config,
            paths: BTreeMap::new(),
            filesystems: BTreeMap::new(),
            state_dir: tidy(state_dir),
            docker_root: None,
        };
        let mut probes = Vec::new();
        for (path, reason) in [
            ("/", REASON_ROOT),
            ("/tmp", REASON_TMP),
            ("/mnt", REASON_MNT),
        ] {
            probes.extend(watch.add_reason(PathBuf::from(path), reason.to_owned()));
        }
        probes.extend(watch.add_reason(state_dir.to_owned(), REASON_STATE.to_owned()));
        probes.extend(watch.apply_config_paths());
        for (path, reason) in saved {
            probes.extend(watch.add_reason(path, reason));
        }
        (watch, probes)
    }

    /// Watches `path` for `reason` too. Returns the path when it is new: it
    /// is marked in flight and is to be probed now rather than at the next
    /// tick.
    pub(super) fn add_reason(&mut self, path: PathBuf, reason: String) -> Option<PathBuf> {
        let path = tidy(&path);
        let entry = self.paths.entry(path.clone()).or_default();
        if entry.reasons.insert(reason) && entry.reasons.len() == 1 && entry.in_flight.is_none() {
            entry.in_flight = Some(Instant::now());
            return Some(path);
        }
        None
    }

    /// Stops watching `path` for `reason`; it goes once it has no reason left.
    pub(super) fn remove_reason(&mut self, path: &Path, reason: &str) {
        let path = tidy(path);
        let Some(entry) = self.paths.get_mut(&path) else {
            return;
        };
        entry.reasons.remove(reason);
        if entry.reasons.is_empty() {
            self.paths.remove(&path);
        }
    }

    /// Watches the engine's data root. Returns it when it is to be probed now.
    pub(super) fn set_docker_root(&mut self, path: PathBuf) -> Option<PathBuf> {
        self.docker_root = Some(tidy(&path));
        self.add_reason(path, REASON_DOCKER.to_owned())
    }

    /// Takes a new `[disk]` section: its paths and overrides replace the old
    /// ones, and every filesystem gets its levels again. Returns the paths
    /// to probe now.
    pub(super) fn set_config(&mut self, config: DiskConfig) -> Vec<PathBuf> {
        self.config = config;
        let probes = self.apply_config_paths();
        self.refresh_thresholds();
        probes
    }

    /// Replaces the reasons that come from config with the config's.
    fn apply_config_paths(&mut self) -> Vec<PathBuf> {
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
        configured
            .into_iter()
            .filter_map(|(path, reason)| self.add_reason(path, reason.to_owned()))
            .collect()
    }

    /// How long a probe may take before its filesystem is unresponsive.
    pub(super) fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.sample_timeout_ms.into())
    }

    /// Whether `path` is probed in a helper process (also when it is not
    /// watched at all).
    pub(super) fn isolated(&self, path: &Path) -> bool {
        self.paths.get(&tidy(path)).is_none_or(PathEntry::isolated)
    }

    /// The filesystem `path` is on, if it is watched and known.
    pub(super) fn key_of(&self, path: &Path) -> Option<FsKey> {
        let entry = self.paths.get(path)?;
        match entry.dev {
            Some(dev) => Some(FsKey::Dev(dev)),
            None => {
                let key = FsKey::Unresolved(path.to_owned());
                self.filesystems.contains_key(&key).then_some(key)
            }
        }
    }

    /// The watched paths on filesystem `key`, in path order.
    pub(super) fn members(&self, key: &FsKey) -> Vec<&Path> {
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

    /// Whether filesystem `key` holds the state dir or the Docker data root,
    /// so that its being critical holds the job queue.
    pub(super) fn guards_admission(&self, key: &FsKey) -> bool {
        self.members(key)
            .iter()
            .any(|p| *p == self.state_dir.as_path() || self.docker_root.as_deref() == Some(*p))
    }

    /// The levels of the filesystem with device `dev`, or of `path` alone
    /// when that filesystem is not watched.
    pub(super) fn thresholds_for_dev(&self, dev: u64, path: &Path) -> Thresholds {
        match self.filesystems.get(&FsKey::Dev(dev)) {
            Some(fs) => fs.thresholds.clone(),
            None => Thresholds::for_paths(&self.config, [path]),
        }
    }

    /// Gives every filesystem the levels of the paths now on it, of its type
    /// and size (see [`Thresholds::for_filesystem`]).
    pub(super) fn refresh_thresholds(&mut self) {
        let keys: Vec<FsKey> = self.filesystems.keys().cloned().collect();
        for key in keys {
            let Some(fs) = self.filesystems.get(&key) else {
                continue;
            };
            let thresholds = Thresholds::for_filesystem(
                &self.config,
                self.members(&key),
                &fs.mount.fs_type,
                fs.stats.map(|s| s.total_bytes),
            );
            if let Some(fs) = self.filesystems.get_mut(&key) {
                fs.thresholds = thresholds;
            }
        }
    }

    /// A filesystem shows the mount point of the member closest to the root
    /// (the filesystem's own mount point rather than a bind mount below it).
    pub(super) fn refresh_mount(&mut self, key: &FsKey) {
        let best = self
            .members(key)
            .iter()
            .filter_map(|p| self.paths.get(*p).and_then(|e| e.mount.clone()))
            .min_by_key(|m| m.mount_point.components().count());
        if let (Some(best), Some(fs)) = (best, self.filesystems.get_mut(key)) {
            fs.mount = best;
        }
    }

    /// Filesystems no watched path lives on any more.
    pub(super) fn unwatched(&self) -> Vec<FsKey> {
        self.filesystems
            .keys()
            .filter(|key| self.members(key).is_empty())
            .cloned()
            .collect()
    }

    /// Filesystem `key` as the API shows it.
    pub(super) fn usage_of(&self, key: &FsKey) -> FilesystemUsage {
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

    /// Every filesystem as the API shows it.
    pub(super) fn usage(&self) -> Vec<FilesystemUsage> {
        self.filesystems
            .keys()
            .map(|key| self.usage_of(key))
            .collect()
    }

    /// The watched paths that are absent, and why.
    pub(super) fn skipped(&self) -> Vec<SkippedPath> {
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

    /// What a reclaim for every filesystem targets: each one that answers and
    /// is below its floor plus margin, through its first path.
    pub(super) fn reclaim_targets(&self) -> Vec<ReclaimTarget> {
        self.filesystems
            .iter()
            .filter(|(key, fs)| {
                matches!(key, FsKey::Dev(_))
                    && wants_space(fs.machine.state(), fs.stats, &fs.thresholds)
            })
            .filter_map(|(key, fs)| {
                self.members(key).first().map(|p| ReclaimTarget {
                    path: p.to_path_buf(),
                    thresholds: fs.thresholds.clone(),
                    isolated: self.isolated(p),
                })
            })
            .collect()
    }
}

/// The paths added over the API, with their reasons as the watch list keeps
/// them.
pub(super) fn saved_paths(store: &Store) -> Vec<(PathBuf, String)> {
    match store.scan::<SavedPath>(WATCHED_PATHS) {
        Ok(saved) => saved
            .into_iter()
            .map(|(path, saved)| (PathBuf::from(path), operator_reason(&saved.reason)))
            .collect(),
        Err(error) => {
            tracing::error!(%error, "cannot read the paths added over the API");
            Vec::new()
        }
    }
}

/// What [`save_path`] changed, as reasons of the watch list.
pub(super) struct SavedReason {
    /// The path's reason now.
    pub(super) new: String,
    /// The reason it replaced, when the path was added before.
    pub(super) old: Option<String>,
}

/// Keeps `path` in the store with `reason` (trimmed; a default when empty;
/// at most 200 bytes). Fails with [`DiskError::Store`] (no space) when the
/// state filesystem is full.
pub(super) async fn save_path(
    store: &Store,
    path: &Path,
    reason: String,
) -> Result<SavedReason, DiskError> {
    check_absolute("path", path)?;
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
    let key = path_key(path)?;
    let old: Option<SavedPath> = store.get(WATCHED_PATHS, &key).map_err(DiskError::Store)?;
    store
        .apply(vec![Write::put(
            WATCHED_PATHS,
            key,
            &SavedPath {
                reason: reason.clone(),
            },
        )])
        .await
        .map_err(DiskError::Store)?;
    Ok(SavedReason {
        new: operator_reason(&reason),
        old: old.map(|old| operator_reason(&old.reason)),
    })
}

/// Removes `path` from the store. Returns its reason as the watch list keeps
/// it, `None` when it was not added over the API.
pub(super) async fn forget_path(store: &Store, path: &Path) -> Result<Option<String>, DiskError> {
    check_absolute("path", path)?;
    let key = path_key(path)?;
    let Some(old) = store
        .get::<SavedPath>(WATCHED_PATHS, &key)
        .map_err(DiskError::Store)?
    else {
        return Ok(None);
    };
    store
        .apply(vec![Write::Delete(WATCHED_PATHS, key)])
        .await
        .map_err(DiskError::Store)?;
    Ok(Some(operator_reason(&old.reason)))
}

fn operator_reason(reason: &str) -> String {
    format!("{REASON_OPERATOR}: {reason}")
}

/// A path from a request must be absolute and without `..`, so that the
/// answer names exactly what was asked.
pub(super) fn check_absolute(field: &'static str, path: &Path) -> Result<(), DiskError> {
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

/// Asks the engine where it keeps its data until it answers, then hands the
/// path to `found` (to be watched).
pub(super) async fn discover_docker_root(
    docker: Arc<dyn DockerSpace>,
    found: impl FnOnce(PathBuf),
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_secs(1);
    let mut told = false;
    loop {
        match docker.data_root().await {
            Ok(path) => {
                found(path);
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

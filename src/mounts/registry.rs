//! The registry of managed mounts: the in-memory table (one [`Entry`] per
//! mount, each with its supervisor's controls), the store records
//! (`mounts.requested`: an API request without its secret;
//! `mounts.processes`: each mount's last blobfuse2 pid and repair count, for
//! adoption), the secret files of API mounts, and what the table shows: mount
//! events, the mounts condition and the list of cache dirs for the disk
//! guard.
//!
//! The service and every supervisor share one [`Registry`]; it knows
//! nothing of how mounts are made or checked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::secrets;
use super::spec::{Auth, ManagedIdentity, MountSpec, Origin, Owner, SecretSource};
use super::{MountError, MountState, MountStatus};
use crate::events::{EventBus, EventPayload};
use crate::health::{ConditionState, Health, Subsystem};
use crate::paths;
use crate::store::{Store, StoreError, Table, Write};

/// API mounts: the request without its secret.
pub(super) const REQUESTED: Table = Table("mounts.requested");
/// Every mount's last blobfuse2 pid and repair count, for adoption.
const PROCESSES: Table = Table("mounts.processes");

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
    /// Absent in records from before owners: `mounts.default_owner`.
    #[serde(default)]
    pub owner: Option<Owner>,
}

impl RequestedRecord {
    /// The record of an API request.
    fn of(spec: &MountSpec) -> Self {
        let (identity, auth_mode) = match &spec.auth {
            Auth::ManagedIdentity(id) => (id.clone(), "msi"),
            other => (ManagedIdentity::default(), other.mode()),
        };
        Self {
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
            owner: spec.owner,
        }
    }

    /// The spec of the mount `name` requested over the API before this
    /// start; its secret, if any, is in `secret_file`.
    pub fn into_spec(self, name: &str, secret_file: PathBuf) -> MountSpec {
        let auth = match self.auth_mode.as_str() {
            "key" => Auth::AccountKey(SecretSource::File(secret_file)),
            "sas" => Auth::SasToken(SecretSource::File(secret_file)),
            _ => Auth::ManagedIdentity(self.identity),
        };
        MountSpec {
            name: name.to_owned(),
            account: self.account,
            container: self.container,
            mount_path: self.mount_path,
            auth,
            read_only: self.read_only,
            cache_dir: self.cache_dir,
            cache_max_bytes: self.cache_max_bytes,
            endpoint: self.endpoint,
            subdirectory: self.subdirectory,
            origin: Origin::Api,
            owner: self.owner,
        }
    }
}

/// The process record (`mounts.processes`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct ProcessRecord {
    pub pid: Option<u32>,
    pub remount_count: u32,
}

/// One managed mount.
pub(super) struct Entry {
    pub spec: Arc<MountSpec>,
    pub status: watch::Sender<MountStatus>,
    /// Stops its supervisor.
    pub stop: CancellationToken,
    /// Ends when its supervisor has returned.
    pub done: Option<watch::Receiver<bool>>,
    /// Asks its supervisor for a health check now (a job start found the
    /// mount dead before the next scheduled check).
    pub check_now: Arc<Notify>,
}

/// The managed mounts, their records and what they show.
pub(super) struct Registry {
    store: Store,
    events: EventBus,
    health: Health,
    /// `agent.state_dir` (API secrets live below it).
    state_dir: PathBuf,
    mounts: Mutex<BTreeMap<String, Entry>>,
    cache_dirs: watch::Sender<Vec<CacheDir>>,
}

impl Registry {
    /// An empty registry; the condition says "no mounts".
    pub fn new(store: Store, events: EventBus, health: Health, state_dir: PathBuf) -> Self {
        health.set(Subsystem::Mounts, ConditionState::Ok, "no mounts");
        Self {
            store,
            events,
            health,
            state_dir,
            mounts: Mutex::new(BTreeMap::new()),
            cache_dirs: watch::channel(Vec::new()).0,
        }
    }

    /// The table, locked.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
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

    /// Recomputes the list of cache dirs; watchers see a change only.
    pub fn refresh_cache_dirs(&self) {
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

    /// Each managed mount's cache dir.
    pub fn cache_dirs(&self) -> Vec<CacheDir> {
        self.cache_dirs.borrow().clone()
    }

    /// The cache dirs, changing as mounts come and go.
    pub fn watch_cache_dirs(&self) -> watch::Receiver<Vec<CacheDir>> {
        self.cache_dirs.subscribe()
    }

    /// A mount path or cache dir that a managed mount already uses, or a
    /// name already taken.
    pub fn conflicts(&self, spec: &MountSpec) -> Result<(), MountError> {
        conflicts(&self.lock(), spec)
    }

    /// Where the secret of the API mount `name` is kept.
    pub fn secret_file(&self, name: &str) -> PathBuf {
        secrets::secrets_dir(&self.state_dir).join(name)
    }

    /// The mounts requested over the API before this start.
    pub fn requested(&self) -> Result<Vec<(String, RequestedRecord)>, StoreError> {
        self.store.scan::<RequestedRecord>(REQUESTED)
    }

    /// Records an API request: the secret in its 0600 file, the rest in the store.
    pub async fn record(&self, spec: &MountSpec) -> Result<(), MountError> {
        if let Some(SecretSource::Given(secret)) = spec.auth.secret_source() {
            let (dir, name, secret) = (self.state_dir.clone(), spec.name.clone(), secret.clone());
            tokio::task::spawn_blocking(move || secrets::store(&dir, &name, &secret))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
                .map_err(|source| MountError::Io {
                    name: spec.name.clone(),
                    action: "keep the secret in",
                    path: self.secret_file(&spec.name),
                    source,
                })?;
        }
        let result = self
            .store
            .apply(vec![
                Write::put(REQUESTED, spec.name.clone(), &RequestedRecord::of(spec)),
                Write::put(PROCESSES, spec.name.clone(), &ProcessRecord::default()),
            ])
            .await;
        if let Err(source) = result {
            self.forget(&spec.name).await;
            return Err(MountError::Store {
                name: spec.name.clone(),
                source,
            });
        }
        Ok(())
    }

    /// Forgets an API request's record and secret.
    pub async fn forget(&self, name: &str) {
        let dir = self.state_dir.clone();
        let owned = name.to_owned();
        let _ = tokio::task::spawn_blocking(move || secrets::forget(&dir, &owned)).await;
        if let Err(error) = self
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

    /// A mount's process record, if one can be read.
    pub fn process(&self, name: &str) -> Option<ProcessRecord> {
        self.store
            .get::<ProcessRecord>(PROCESSES, name)
            .ok()
            .flatten()
    }

    /// Stores a mount's process record.
    pub async fn record_process(
        &self,
        name: &str,
        record: &ProcessRecord,
    ) -> Result<(), StoreError> {
        self.store
            .apply(vec![Write::put(PROCESSES, name.to_owned(), record)])
            .await
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

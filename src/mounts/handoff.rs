//! What blobfuse2 is handed for one mount attempt: the mount dir and the
//! cache dir, each opened once (created when missing, never through a
//! symlink) and checked where it really is, the cache claimed and emptied
//! through its descriptor, and, for either dir that a user other than root
//! can change (the dir itself or any ancestor), a root-only staging entry
//! bound from the held descriptor ([`crate::paths::staging`]) in its place.
//!
//! A staged mount dir works the other way round: blobfuse2 mounts on a
//! plain root-only entry, and once the mount is up the agent binds it onto
//! the held dir ([`mirror`]: `/proc/self/fd/N` as the target), so it shows at
//! the user's path. Nothing is ever mounted, probed or unmounted by the
//! user's path name, so swapping it for a symlink (to `/usr/local/bin`,
//! say) changes nothing the agent does as root; the bind on the user's side
//! is taken off by its mount id ([`unmirror`]) before blobfuse2's mount goes.
//!
//! Entries are `<mount>.mnt` and `<mount>.cache` in
//! `<agent.runtime_dir>/staging/mounts`; [`release`] takes them off when the
//! mount goes, and [`adopted`] finds them again after an agent restart.
//! Blocking.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::MountError;
use super::cache;
use super::settings::MountSettings;
use super::spec::MountSpec;
use super::system::{Launch, is_blobfuse2};
use crate::mountinfo;
use crate::paths::held::Held;
use crate::paths::privileged::Privileged;
use crate::paths::staging::{Staging, StagingError};

/// The paths blobfuse2 gets for a mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    /// Where it mounts: the spec's mount path, or its staging entry.
    pub mount_path: PathBuf,
    /// Its cache dir: the spec's, or its staging entry.
    pub cache_dir: PathBuf,
}

impl Handed {
    /// The spec's own paths (nothing staged).
    pub fn of(spec: &MountSpec) -> Self {
        Self {
            mount_path: spec.mount_path.clone(),
            cache_dir: spec.cache_dir.clone(),
        }
    }
}

/// What each mount's blobfuse2 was handed, by mount name; absent means the
/// spec's own paths. Shared by the supervisors and the service.
#[derive(Debug, Default)]
pub struct HandedPaths(Mutex<HashMap<String, Handed>>);

impl HandedPaths {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Handed>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The paths blobfuse2 is (or was last) handed for a mount.
    pub fn of(&self, spec: &MountSpec) -> Handed {
        self.lock()
            .get(&spec.name)
            .cloned()
            .unwrap_or_else(|| Handed::of(spec))
    }

    /// Records what a mount's blobfuse2 is handed.
    pub fn set(&self, name: &str, handed: Handed) {
        self.lock().insert(name.to_owned(), handed);
    }

    /// Forgets a mount (it is gone).
    pub fn forget(&self, name: &str) {
        self.lock().remove(name);
    }

    /// How blobfuse2 is started for a mount, at the path it is handed.
    pub fn launch(&self, settings: &MountSettings, spec: &MountSpec) -> Launch {
        settings.launch_at(spec, &self.of(spec).mount_path)
    }
}

fn mount_entry(name: &str) -> String {
    format!("{name}.mnt")
}

fn cache_entry(name: &str) -> String {
    format!("{name}.cache")
}

/// What [`prepare`] made ready for one attempt.
pub struct Prepared {
    /// The paths blobfuse2 gets.
    pub handed: Handed,
    /// The held mount dir, when blobfuse2 mounts on a staging entry: the
    /// mount goes onto it once it is up ([`mirror`]).
    pub mirror_onto: Option<Held>,
}

/// Opens, checks, claims and empties the mount's dirs, stages what a user
/// can change, and says what blobfuse2 is handed.
pub fn prepare(settings: &MountSettings, spec: &MountSpec) -> Result<Prepared, MountError> {
    let name = &spec.name;
    let rules = &settings.rules;
    let invalid = |field: &'static str, problem: String| MountError::Invalid {
        name: name.clone(),
        field,
        problem,
    };
    let io = |action: &'static str, path: &Path| {
        let (name, path) = (name.clone(), path.to_owned());
        move |source: std::io::Error| MountError::Io {
            name,
            action,
            path,
            source,
        }
    };
    clear_mount_path(settings, spec)?;
    let mount = Held::open_dir_creating(&spec.mount_path, 0o755, &|p| rules.allows_mount_path(p))
        .map_err(io("open the mount dir", &spec.mount_path))?;
    if mount.path() != spec.mount_path {
        return Err(invalid(
            "mount_path",
            format!(
                "{} now leads to {}; not mounted",
                spec.mount_path.display(),
                mount.path().display()
            ),
        ));
    }
    rules
        .allows_mount_path(mount.path())
        .map_err(|p| invalid("mount_path", p))?;
    let cache_error = |problem: String| MountError::CacheDir {
        name: name.clone(),
        path: spec.cache_dir.clone(),
        problem,
    };
    // Only a cache dir the agent owns is emptied (see `cache`).
    let cache = cache::claim(&spec.cache_dir, name, &|p| rules.allows_cache_dir(p))
        .map_err(|e| cache_error(e.to_string()))?;
    // blobfuse2 refuses a non-empty cache dir; a crashed one leaves files.
    cache::empty_held(&cache, false).map_err(io("empty the cache dir", &spec.cache_dir))?;
    cache
        .create_dir(cache::BLOBFUSE2_SUBDIR.as_ref(), 0o700)
        .map_err(io(
            "create the cache dir",
            &cache::blobfuse2_dir(&spec.cache_dir),
        ))?;
    let owner = spec.owner();
    if !owner.is_root() {
        check_user_allow_other(spec)?;
        // blobfuse2 runs as the owner: its cache subdir is theirs, the cache
        // dir (root's, with the marker) only traversable.
        cache::hand_to(&cache, owner).map_err(io(
            "hand the cache dir to the mount's owner",
            &cache::blobfuse2_dir(&spec.cache_dir),
        ))?;
    }

    let staging = || Staging::prepare(&settings.staging_dir).map_err(|e| staging_error(name, e));
    let privileged = Privileged::detect();
    let changeable = mount
        .changeable()
        .map_err(io("check the mount dir", &spec.mount_path))?;
    let (mount_path, mirror_onto) = match (changeable, owner.is_root()) {
        (None, true) => (spec.mount_path.clone(), None),
        (who, _) => {
            match who {
                Some(who) => {
                    tracing::info!(mount = %name, %who, "the mount dir can be changed by a user other than root; blobfuse2 mounts on a staging entry, bound onto it once up")
                }
                // fusermount3 mounts only where the mounter may write: the
                // owner's blobfuse2 gets a staging entry of theirs.
                None => {
                    tracing::debug!(mount = %name, uid = owner.uid, "blobfuse2 runs as the mount's owner: it mounts on a staging entry of theirs, bound onto the mount dir once up")
                }
            }
            // blobfuse2 checks that its mount dir is empty; here that dir is
            // the entry, so the user's dir is checked through its descriptor.
            if !is_empty(&mount).map_err(io("read the mount dir", &spec.mount_path))? {
                return Err(invalid(
                    "mount_path",
                    format!(
                        "{} is not empty (blobfuse2: mount directory is not empty)",
                        spec.mount_path.display()
                    ),
                ));
            }
            let staging = staging()?;
            let entry_owner = (!owner.is_root()).then_some((owner.uid, owner.gid));
            if entry_owner.is_some() {
                staging
                    .allow_traversal()
                    .map_err(|e| staging_error(name, e))?;
            }
            let staged = privileged
                .make_dir(&staging, &mount_entry(name), entry_owner)
                .map_err(|e| staging_error(name, e))?;
            (staged, Some(mount))
        }
    };
    let cache_dir = match cache
        .changeable()
        .map_err(io("check the cache dir", &spec.cache_dir))?
    {
        None => spec.cache_dir.clone(),
        Some(who) => {
            tracing::info!(mount = %name, %who, "the cache dir can be changed by a user other than root; blobfuse2 gets a staged bind of it");
            privileged
                .bind(&staging()?, &cache_entry(name), &cache)
                .map_err(|e| staging_error(name, e))?
        }
    };
    Ok(Prepared {
        handed: Handed {
            mount_path,
            cache_dir,
        },
        mirror_onto,
    })
}

/// Where the kernel's FUSE rules for users are (fusermount3 reads it).
const FUSE_CONF: &str = "/etc/fuse.conf";

/// A mount of a user's runs with `allow-root`, which fusermount3 grants a
/// non-root mounter only with `user_allow_other` in `/etc/fuse.conf` (root
/// and the jobs could not reach the mount without it). The package adds
/// the line; the agent (read-only `/etc` under systemd) only checks it, so
/// the mount fails naming the fix rather than with fusermount3's message.
fn check_user_allow_other(spec: &MountSpec) -> Result<(), MountError> {
    let text = std::fs::read_to_string(FUSE_CONF).unwrap_or_default();
    if text.lines().any(|line| line.trim() == "user_allow_other") {
        return Ok(());
    }
    Err(MountError::Invalid {
        name: spec.name.clone(),
        field: "owner_uid",
        problem: format!(
            "a mount owned by uid {} runs blobfuse2 as that user with allow_root, which needs a line \
             user_allow_other in {FUSE_CONF} (the kernel lets root and jobs into a user's FUSE mount \
             only then); add it, or mount with owner_uid 0 for jobs only",
            spec.owner().uid
        ),
    })
}

/// Before the mount dir is opened: blobfuse2's mounts left at its path (a
/// bind of an earlier staged mount whose blobfuse2 went away, dead since)
/// are taken off, each exactly (by mount id, never through a symlink);
/// anything else mounted there is someone else's and fails the attempt.
fn clear_mount_path(settings: &MountSettings, spec: &MountSpec) -> Result<(), MountError> {
    let entries = mountinfo::read().unwrap_or_default();
    let here: Vec<_> = entries
        .iter()
        .filter(|e| e.mount_point == spec.mount_path)
        .collect();
    for entry in &here {
        if !is_blobfuse2(entry) {
            return Err(MountError::InUse {
                name: spec.name.clone(),
                what: format!(
                    "path {} is mounted by something else ({} from {})",
                    spec.mount_path.display(),
                    entry.fs_type,
                    entry.source
                ),
            });
        }
    }
    if !here.is_empty() {
        let cleared = Staging::prepare(&settings.staging_dir).and_then(|staging| {
            Privileged::detect().clear_path(&staging, &spec.mount_path, "blobfuse2", "fuse")
        });
        if let Err(error) = cleared {
            tracing::warn!(mount = %spec.name, %error, "cannot take a leftover blobfuse2 mount off the mount path");
        }
    }
    Ok(())
}

/// Whether a held directory has no entries.
fn is_empty(dir: &Held) -> std::io::Result<bool> {
    let fd = rustix::fs::openat(
        dir.fd(),
        ".",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let mut entries = rustix::fs::Dir::read_from(&fd)?;
    Ok(!entries.any(|e| e.is_ok_and(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))))
}

/// Whether a path blobfuse2 is handed is a staging entry.
pub fn is_staged(settings: &MountSettings, path: &Path) -> bool {
    path.parent() == Some(settings.staging_dir.as_path())
}

/// Binds blobfuse2's mount on the staging entry onto the held user dir.
pub fn mirror(settings: &MountSettings, name: &str, onto: &Held) -> Result<(), MountError> {
    Staging::prepare(&settings.staging_dir)
        .and_then(|staging| Privileged::detect().mirror(&staging, &mount_entry(name), onto))
        .map_err(|e| staging_error(name, e))
}

/// Takes the bind on the user's side off, before blobfuse2's mount on the
/// staging entry goes (the bind is found through it). Never fails: what
/// cannot go is logged.
pub fn unmirror(settings: &MountSettings, name: &str) {
    if std::fs::symlink_metadata(&settings.staging_dir).is_err() {
        return;
    }
    let outcome = Staging::prepare(&settings.staging_dir)
        .and_then(|staging| Privileged::detect().unmirror(&staging, &mount_entry(name)));
    if let Err(error) = outcome {
        tracing::warn!(mount = %name, %error, "cannot take the mount off the user's path");
    }
}

/// After an agent restart, for an adopted mount on a staging entry: binds
/// it onto the user's dir again if that bind is missing (an agent stopped
/// between the mount and the bind), after checking the dir once more.
pub fn ensure_mirrored(settings: &MountSettings, spec: &MountSpec) -> Result<(), MountError> {
    let name = &spec.name;
    let staging = Staging::prepare(&settings.staging_dir).map_err(|e| staging_error(name, e))?;
    let privileged = Privileged::detect();
    if privileged
        .mirrored(&staging, &mount_entry(name))
        .map_err(|e| staging_error(name, e))?
    {
        return Ok(());
    }
    let dir = Held::open(&spec.mount_path).map_err(|source| MountError::Io {
        name: name.clone(),
        action: "open the mount dir",
        path: spec.mount_path.clone(),
        source,
    })?;
    if dir.path() != spec.mount_path || !dir.is_dir() {
        return Err(MountError::Invalid {
            name: name.clone(),
            field: "mount_path",
            problem: format!(
                "{} now leads to {}; not bound there",
                spec.mount_path.display(),
                dir.path().display()
            ),
        });
    }
    settings
        .rules
        .allows_mount_path(dir.path())
        .map_err(|problem| MountError::Invalid {
            name: name.clone(),
            field: "mount_path",
            problem,
        })?;
    privileged
        .mirror(&staging, &mount_entry(name), &dir)
        .map_err(|e| staging_error(name, e))
}

fn staging_error(name: &str, error: StagingError) -> MountError {
    MountError::Io {
        name: name.to_owned(),
        action: "stage",
        path: PathBuf::new(),
        source: std::io::Error::other(error.to_string()),
    }
}

/// After an agent restart: the staging entries of a mount that are still
/// mounted are what its running blobfuse2 was handed.
pub fn adopted(settings: &MountSettings, spec: &MountSpec) -> Handed {
    let mut handed = Handed::of(spec);
    let Ok(entries) = mountinfo::read() else {
        return handed;
    };
    let staged = |entry: String| {
        let path = settings.staging_dir.join(entry);
        mountinfo::find(&entries, &path).map(|_| path)
    };
    if let Some(path) = staged(mount_entry(&spec.name)) {
        handed.mount_path = path;
    }
    if let Some(path) = staged(cache_entry(&spec.name)) {
        handed.cache_dir = path;
    }
    handed
}

/// Takes off a mount's staging entries and the bind at the user's path,
/// once blobfuse2's mount is gone (a dead bind left there too, exactly).
/// Never fails: what cannot go is logged.
pub fn release(settings: &MountSettings, spec: &MountSpec) {
    let name = &spec.name;
    if let Err(error) = clear_mount_path(settings, spec) {
        tracing::warn!(mount = %name, %error, "the mount path was left as it is");
    }
    if std::fs::symlink_metadata(&settings.staging_dir).is_err() {
        return;
    }
    let outcome = Staging::prepare(&settings.staging_dir).and_then(|staging| {
        let privileged = Privileged::detect();
        privileged.release(&staging, &mount_entry(name))?;
        privileged.release(&staging, &cache_entry(name))
    });
    if let Err(error) = outcome {
        tracing::warn!(mount = %name, %error, "cannot release the staged binds");
    }
}

/// At agent start: takes off the staging entries of mounts that are not
/// managed any more (removed from config, say), with their binds.
pub fn release_stale(settings: &MountSettings, managed: &std::collections::HashSet<String>) {
    if std::fs::symlink_metadata(&settings.staging_dir).is_err() {
        return;
    }
    let outcome = Staging::prepare(&settings.staging_dir).and_then(|staging| {
        let privileged = Privileged::detect();
        for entry in staging.names()? {
            let name = entry
                .strip_suffix(".mnt")
                .or_else(|| entry.strip_suffix(".cache"))
                .unwrap_or(&entry);
            if !managed.contains(name) {
                tracing::info!(
                    entry,
                    "releasing the staging entry of a mount no longer managed"
                );
                privileged.release(&staging, &entry)?;
            }
        }
        Ok(())
    });
    if let Err(error) = outcome {
        tracing::warn!(%error, "cannot tidy the staged binds of mounts");
    }
}

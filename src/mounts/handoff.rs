//! What blobfuse2 is handed for one mount attempt: the mount dir and the
//! cache dir, each opened once (created when missing, never through a
//! symlink) and checked where it really is, the cache claimed and emptied
//! through its descriptor, and, for either dir that a user other than root
//! can change (the dir itself or any ancestor), a root-only staging entry
//! bound from the held descriptor ([`crate::paths::staging`]) in its place.
//!
//! A staged mount dir is also mirrored: the entry is a shared mount bound
//! back onto the held dir, so blobfuse2 mounts on the entry and the mount
//! shows at the user's path by propagation. Nothing is ever mounted, probed
//! or unmounted by the user's path name, so swapping it for a symlink (to
//! `/usr/local/bin`, say) changes nothing the agent does as root.
//!
//! Entries are `<mount>.mnt` and `<mount>.cache` in
//! `<agent.runtime_dir>/staging/mounts`; [`release`] takes them off when the
//! mount goes, and [`adopted`] finds them again after an agent restart.
//! Blocking.

use std::path::{Path, PathBuf};

use super::MountError;
use super::cache;
use super::settings::MountSettings;
use super::spec::MountSpec;
use crate::mountinfo;
use crate::paths::held::Held;
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

fn mount_entry(name: &str) -> String {
    format!("{name}.mnt")
}

fn cache_entry(name: &str) -> String {
    format!("{name}.cache")
}

/// Opens, checks, claims and empties the mount's dirs, stages what a user
/// can change, and says what blobfuse2 is handed.
pub fn prepare(settings: &MountSettings, spec: &MountSpec) -> Result<Handed, MountError> {
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

    let staging = || Staging::prepare(&settings.staging_dir).map_err(|e| staging_error(name, e));
    let mount_path = match mount
        .changeable()
        .map_err(io("check the mount dir", &spec.mount_path))?
    {
        None => spec.mount_path.clone(),
        Some(who) => {
            tracing::info!(mount = %name, %who, "the mount dir can be changed by a user other than root; blobfuse2 mounts on a staged bind of it");
            let staging = staging()?;
            let entry = mount_entry(name);
            staging
                .unmirror(&entry)
                .map_err(|e| staging_error(name, e))?;
            let staged = staging
                .bind(&entry, &mount)
                .map_err(|e| staging_error(name, e))?;
            staging
                .mirror(&entry, &mount)
                .map_err(|e| staging_error(name, e))?;
            staged
        }
    };
    let cache_dir = match cache
        .changeable()
        .map_err(io("check the cache dir", &spec.cache_dir))?
    {
        None => spec.cache_dir.clone(),
        Some(who) => {
            tracing::info!(mount = %name, %who, "the cache dir can be changed by a user other than root; blobfuse2 gets a staged bind of it");
            staging()?
                .bind(&cache_entry(name), &cache)
                .map_err(|e| staging_error(name, e))?
        }
    };
    Ok(Handed {
        mount_path,
        cache_dir,
    })
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

/// Takes off a mount's staging entries and the mirror at the user's path,
/// once blobfuse2's mount is gone. Never fails: what cannot go is logged.
pub fn release(settings: &MountSettings, name: &str) {
    if std::fs::symlink_metadata(&settings.staging_dir).is_err() {
        return;
    }
    let outcome = Staging::prepare(&settings.staging_dir).and_then(|staging| {
        let entry = mount_entry(name);
        staging.unmirror(&entry)?;
        staging.release(&entry)?;
        staging.release(&cache_entry(name))
    });
    if let Err(error) = outcome {
        tracing::warn!(mount = %name, %error, "cannot release the staged binds");
    }
}

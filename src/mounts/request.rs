//! A mount request, from the API or from config, turned into a checked
//! spec: the field rules ([`super::spec`]), the mount path and cache dir
//! resolved against the allowed roots, the cache defaults, a cache dir the
//! agent may take ([`super::cache`]), and nothing mounted at the path yet.
//! Conflicts with other managed mounts are the registry's to check.

use std::time::Duration;

use super::MountError;
use super::cache;
use super::config::DeclaredMount;
use super::settings::MountSettings;
use super::spec::{self, Auth, ManagedIdentity, MountSpec, NO_GID, Origin, Owner, SecretSource};
use super::system::FuseMounter;
use crate::paths;
use crate::paths::offload::{Offload, OffloadError};

/// How long resolving a requested mount path or cache dir may take.
const PATH_TIMEOUT: Duration = Duration::from_secs(5);

/// Turns an API request into a checked spec: field rules, resolved
/// paths, cache defaults.
pub(super) async fn check(
    settings: &MountSettings,
    host_paths: &Offload,
    mut spec: MountSpec,
) -> Result<MountSpec, MountError> {
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
        spec.cache_max_bytes = settings.default_cache_max_bytes;
    } else if spec.cache_max_bytes < 1 << 20 {
        return Err(invalid(
            "cache_max_bytes",
            format!("{} is below the minimum of 1 MiB", spec.cache_max_bytes),
        ));
    }
    let requested = spec.owner;
    let field = if requested.is_some() {
        "owner_uid"
    } else {
        "owner"
    };
    let owner = resolve_owner(settings, requested)
        .await
        .map_err(|p| invalid(field, p))?;
    spec.owner = Some(owner);
    // Each path resolved where a hung filesystem under it cannot hold the
    // agent (one call at a time per filesystem, answered at once once hung).
    let unanswered = |field: &'static str, source: OffloadError| MountError::Unanswered {
        name: spec.name.clone(),
        field,
        source,
    };
    let rules = settings.rules.clone();
    let path = spec.mount_path.clone();
    let mount_path = host_paths
        .run(&spec.mount_path, PATH_TIMEOUT, move || {
            rules.mount_path(&path)
        })
        .await
        .map_err(|e| unanswered("mount_path", e))?
        .map_err(|p| invalid("mount_path", p))?;
    let cache = if spec.cache_dir.as_os_str().is_empty() {
        settings.rules.default_cache_dir(&spec.name)
    } else {
        spec.cache_dir.clone()
    };
    let rules = settings.rules.clone();
    let asked = cache.clone();
    let cache_dir = host_paths
        .run(&cache, PATH_TIMEOUT, move || {
            let dir = rules.cache_dir(&asked).map_err(|p| (None, p))?;
            match cache::check_claimable(&dir) {
                Ok(()) => Ok(dir),
                Err(problem) => Err((Some(dir), problem)),
            }
        })
        .await
        .map_err(|e| unanswered("cache_dir", e))?;
    let cache_dir = match cache_dir {
        Ok(dir) => dir,
        Err((None, problem)) => return Err(invalid("cache_dir", problem)),
        Err((Some(path), problem)) => {
            return Err(MountError::CacheDir {
                name: spec.name.clone(),
                path,
                problem,
            });
        }
    };
    if paths::overlaps(&mount_path, &cache_dir) {
        return Err(invalid(
            "cache_dir",
            format!(
                "{} and the mount path {} must not contain each other (blobfuse2: tmp-path is same as mount path)",
                cache_dir.display(),
                mount_path.display()
            ),
        ));
    }
    spec.mount_path = mount_path;
    spec.cache_dir = cache_dir;
    Ok(spec)
}

/// The owner of a mount: as requested (a uid whose gid, when not given, is
/// the user's primary group), or `mounts.default_owner` looked up by name.
async fn resolve_owner(
    settings: &MountSettings,
    requested: Option<Owner>,
) -> Result<Owner, String> {
    let default = settings.default_owner.clone();
    tokio::task::spawn_blocking(move || match requested {
        Some(owner) if owner.gid != NO_GID => Ok(owner),
        Some(owner) => match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(owner.uid)) {
            Ok(Some(user)) => Ok(Owner {
                uid: owner.uid,
                gid: user.gid.as_raw(),
            }),
            _ => Err(format!(
                "uid {} is no user on this host: give owner_gid as well",
                owner.uid
            )),
        },
        None => owner_named(&default).map_err(|p| format!("mounts.default_owner {p}")),
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// The owner called `name` (a user of this host). Blocking.
pub(super) fn owner_named(name: &str) -> Result<Owner, String> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(user)) => Ok(Owner {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }),
        Ok(None) => Err(format!("{name:?} is no user on this host")),
        Err(e) => Err(format!("{name:?}: cannot look the user up: {e}")),
    }
}

/// The spec of a mount declared in config; on a problem, the spec as far
/// as it goes and the problem.
pub(super) async fn declared_spec(
    settings: &MountSettings,
    host_paths: &Offload,
    d: &DeclaredMount,
) -> Result<MountSpec, (MountSpec, String)> {
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
        owner: None,
    };
    let spec = if d.owner.is_empty() {
        spec
    } else {
        let name = d.owner.clone();
        match tokio::task::spawn_blocking(move || owner_named(&name)).await {
            Ok(Ok(owner)) => MountSpec {
                owner: Some(owner),
                ..spec
            },
            Ok(Err(problem)) => return Err((spec, format!("[[mounts.mount]] owner {problem}"))),
            Err(e) => return Err((spec, e.to_string())),
        }
    };
    let mut fallback = spec.clone();
    if fallback.cache_dir.as_os_str().is_empty() {
        fallback.cache_dir = settings.rules.default_cache_dir(&d.name);
    }
    if fallback.cache_max_bytes == 0 {
        fallback.cache_max_bytes = settings.default_cache_max_bytes;
    }
    check(settings, host_paths, spec)
        .await
        .map_err(|e| (fallback, format!("[[mounts.mount]] {e}")))
}

/// Something (anything) already mounted at the path.
pub(super) async fn check_not_mounted(
    mounter: &dyn FuseMounter,
    spec: &MountSpec,
) -> Result<(), MountError> {
    if let Ok(Some(entry)) = mounter.mount_entry(&spec.mount_path).await {
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

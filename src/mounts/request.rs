//! A mount request, from the API or from config, turned into a checked
//! spec: the field rules ([`super::spec`]), the mount path and cache dir
//! resolved against the allowed roots, the cache defaults, a cache dir the
//! agent may take ([`super::cache`]), and nothing mounted at the path yet.
//! Conflicts with other managed mounts are the registry's to check.

use super::MountError;
use super::cache;
use super::config::DeclaredMount;
use super::settings::MountSettings;
use super::spec::{self, Auth, ManagedIdentity, MountSpec, NO_GID, Origin, Owner, SecretSource};
use super::system::FuseMounter;
use crate::paths;

/// Turns an API request into a checked spec: field rules, resolved
/// paths, cache defaults.
pub(super) async fn check(
    settings: &MountSettings,
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
    let rules = settings.rules.clone();
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
    check(settings, spec)
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

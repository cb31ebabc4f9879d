//! Renders the blobfuse2 YAML config of a mount from typed structs through
//! serde (never by string templating, so a value cannot break the YAML).
//!
//! The shape follows blobfuse2's documented config: top-level `allow-other`,
//! `allow-root` and `read-only`, `logging` to a file under the logs dir, and the
//! components `libfuse`, `file_cache`, `attr_cache`, `azstorage` in that
//! order. `file_cache.max-size-mb` is always set: blobfuse2's own default
//! (80% of the free space at mount time) could push the disk under its floor.
//!
//! Ownership (issue 13): `allow-other` is never set (with it blobfuse2
//! shows everything 0777 and, passing no `default_permissions`, lets every
//! local user in). blobfuse2 runs as the mount's owner, with `allow-root`
//! so that root, the Docker engine and jobs reach the mount, and
//! `libfuse.uid`/`gid` and `default-permission` say what `ls -l` shows. A
//! jobs-only mount (owner root) needs no `allow-root`: root is its mounter.

use std::path::Path;

use serde::Serialize;

use super::spec::{Auth, MountSpec};
use crate::secret::Secret;

/// Seconds blobfuse2 keeps attributes and closed files cached.
const CACHE_TIMEOUT_SECONDS: u32 = 120;

/// Renders the config. `secret` is the account key or SAS token for those
/// modes (ignored for managed identity); `log_file` is blobfuse2's own log;
/// `permission` is `mounts.default_permission`.
pub fn render(
    spec: &MountSpec,
    secret: Option<&Secret>,
    log_file: &Path,
    permission: u32,
) -> String {
    let owner = spec.owner();
    let secret = secret.map(|s| s.expose().as_str()).unwrap_or_default();
    let (mode, account_key, sas, identity) = match &spec.auth {
        Auth::AccountKey(_) => ("key", Some(secret), None, None),
        Auth::SasToken(_) => ("sas", None, Some(secret), None),
        Auth::ManagedIdentity(id) => ("msi", None, None, Some(id)),
    };
    let config = Blobfuse2Config {
        allow_other: false,
        allow_root: !owner.is_root(),
        read_only: spec.read_only,
        logging: Logging {
            kind: "base",
            level: "log_warning",
            file_path: log_file,
        },
        components: ["libfuse", "file_cache", "attr_cache", "azstorage"],
        libfuse: Libfuse {
            uid: owner.uid,
            gid: owner.gid,
            default_permission: permission,
            attribute_expiration_sec: CACHE_TIMEOUT_SECONDS,
            entry_expiration_sec: CACHE_TIMEOUT_SECONDS,
            negative_entry_expiration_sec: CACHE_TIMEOUT_SECONDS,
        },
        file_cache: FileCache {
            path: super::cache::blobfuse2_dir(&spec.cache_dir),
            timeout_sec: CACHE_TIMEOUT_SECONDS,
            max_size_mb: cache_megabytes(spec.cache_max_bytes),
            cleanup_on_start: true,
            allow_non_empty_temp: true,
        },
        attr_cache: AttrCache {
            timeout_sec: CACHE_TIMEOUT_SECONDS,
        },
        azstorage: AzStorage {
            kind: "block",
            account_name: &spec.account,
            container: &spec.container,
            endpoint: non_empty(&spec.endpoint),
            subdirectory: non_empty(&spec.subdirectory),
            mode,
            account_key,
            sas,
            appid: identity.and_then(|i| non_empty(&i.client_id)),
            resid: identity.and_then(|i| non_empty(&i.resource_id)),
            objid: identity.and_then(|i| non_empty(&i.object_id)),
        },
    };
    // Plain structs of strings, numbers and booleans always serialise.
    serde_norway::to_string(&config).unwrap_or_default()
}

/// blobfuse2's `max-size-mb` is in MiB; rounded down, at least 1.
pub fn cache_megabytes(bytes: u64) -> u64 {
    (bytes / (1024 * 1024)).max(1)
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize)]
struct Blobfuse2Config<'a> {
    #[serde(rename = "allow-other")]
    allow_other: bool,
    #[serde(rename = "allow-root", skip_serializing_if = "is_false")]
    allow_root: bool,
    #[serde(rename = "read-only", skip_serializing_if = "is_false")]
    read_only: bool,
    logging: Logging<'a>,
    components: [&'static str; 4],
    libfuse: Libfuse,
    file_cache: FileCache,
    attr_cache: AttrCache,
    azstorage: AzStorage<'a>,
}

#[derive(Serialize)]
struct Logging<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    level: &'static str,
    #[serde(rename = "file-path")]
    file_path: &'a Path,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Libfuse {
    uid: u32,
    gid: u32,
    /// A plain integer (0o750 is 488): blobfuse2 reads it into a uint32,
    /// and YAML's octal spellings differ between 1.1 and 1.2.
    default_permission: u32,
    attribute_expiration_sec: u32,
    entry_expiration_sec: u32,
    negative_entry_expiration_sec: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct FileCache {
    path: std::path::PathBuf,
    timeout_sec: u32,
    max_size_mb: u64,
    cleanup_on_start: bool,
    allow_non_empty_temp: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct AttrCache {
    timeout_sec: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct AzStorage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    account_name: &'a str,
    container: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subdirectory: Option<&'a str>,
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sas: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    appid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    objid: Option<&'a str>,
}

#[cfg(test)]
mod tests;

//! What to mount: the domain form of a mount request or a `[[mounts.mount]]`
//! entry, its field rules, and the secret type that never prints itself.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A secret (account key or SAS token). `Debug` and `Display` print `***`, so
/// a secret cannot reach a log line or an error message by accident; only
/// [`Secret::expose`] gives the value, for the 0600 files blobfuse2 reads.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a value, trimming the whitespace a file or a shell may add.
    pub fn new(value: &str) -> Self {
        Self(value.trim().into())
    }

    /// The value itself. Only for writing the files blobfuse2 reads and for scrubbing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Given over the API; the agent keeps it in a 0600 file in the state dir.
    Given(Secret),
    /// Read from this file (named in config) at every mount attempt, so a
    /// rotated key is picked up by the next repair.
    File(PathBuf),
}

/// A user-assigned managed identity; all empty means the system-assigned one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedIdentity {
    /// Client (application) id.
    pub client_id: String,
    /// Resource id.
    pub resource_id: String,
    /// Object id.
    pub object_id: String,
}

/// How blobfuse2 authenticates to storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Storage account key (`mode: key`).
    AccountKey(SecretSource),
    /// SAS token (`mode: sas`).
    SasToken(SecretSource),
    /// Managed identity (`mode: msi`).
    ManagedIdentity(ManagedIdentity),
}

impl Auth {
    /// blobfuse2's `mode`: "key", "sas" or "msi". The only thing the API shows.
    pub fn mode(&self) -> &'static str {
        match self {
            Auth::AccountKey(_) => "key",
            Auth::SasToken(_) => "sas",
            Auth::ManagedIdentity(_) => "msi",
        }
    }

    /// Where the secret comes from, for key and SAS.
    pub fn secret_source(&self) -> Option<&SecretSource> {
        match self {
            Auth::AccountKey(s) | Auth::SasToken(s) => Some(s),
            Auth::ManagedIdentity(_) => None,
        }
    }
}

/// Where a mount was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// `[[mounts.mount]]` in the config file.
    Config,
    /// The `Mount` RPC.
    Api,
}

impl Origin {
    /// "config" or "api".
    pub fn name(self) -> &'static str {
        match self {
            Origin::Config => "config",
            Origin::Api => "api",
        }
    }
}

/// A mount as requested: what the API or the config asked for, with the
/// defaults for the cache already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Unique name ([A-Za-z0-9_.-], 1 to 64 characters, not starting with a dot).
    pub name: String,
    /// Storage account.
    pub account: String,
    /// Blob container.
    pub container: String,
    /// Where to mount (absolute, normalised; checked by [`super::paths`]).
    pub mount_path: PathBuf,
    /// How to authenticate.
    pub auth: Auth,
    /// Mount read-only.
    pub read_only: bool,
    /// File cache directory.
    pub cache_dir: PathBuf,
    /// Cache cap in bytes.
    pub cache_max_bytes: u64,
    /// Blob endpoint; blobfuse2's default when empty.
    pub endpoint: String,
    /// Only this virtual directory of the container, when not empty.
    pub subdirectory: String,
    /// Where it was declared.
    pub origin: Origin,
}

/// Longest mount name.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a mount name: it names files in the runtime, state and logs dirs.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{name:?} must be 1 to {MAX_NAME_LEN} characters long"
        ));
    }
    if name.starts_with('.') {
        return Err(format!("{name:?} must not start with a dot"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "{name:?} may contain only letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

/// Checks a storage account name (Azure: 3 to 24 lowercase letters and digits).
pub fn check_account(account: &str) -> Result<(), String> {
    let ok = (3..=24).contains(&account.len())
        && account
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{account:?} must be 3 to 24 lowercase letters and digits"
        ))
    }
}

/// Checks a container name (Azure: 3 to 63 of lowercase letters, digits and
/// single hyphens, starting and ending with a letter or digit).
pub fn check_container(container: &str) -> Result<(), String> {
    let chars_ok = container
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let ok = (3..=63).contains(&container.len())
        && chars_ok
        && !container.starts_with('-')
        && !container.ends_with('-')
        && !container.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{container:?} must be 3 to 63 lowercase letters, digits and single hyphens, \
             starting and ending with a letter or digit"
        ))
    }
}

/// Checks a subdirectory: relative, no `..`, no empty components.
pub fn check_subdirectory(subdirectory: &str) -> Result<(), String> {
    if subdirectory.is_empty() {
        return Ok(());
    }
    let bad = subdirectory.starts_with('/')
        || subdirectory
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        Err(format!(
            "{subdirectory:?} must be a relative path without '.', '..' or empty components"
        ))
    } else {
        Ok(())
    }
}

/// Checks an endpoint: empty (blobfuse2's default) or an https URL.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.is_empty()
        || (endpoint.starts_with("https://")
            && endpoint.len() > "https://".len()
            && !endpoint.chars().any(char::is_whitespace))
    {
        Ok(())
    } else {
        Err(format!(
            "{endpoint:?} must be empty or an https:// URL such as https://myacct.blob.core.windows.net"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints_itself() {
        let s = Secret::new("  c2VjcmV0\n");
        assert_eq!(s.expose(), "c2VjcmV0");
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
        let auth = Auth::AccountKey(SecretSource::Given(s));
        assert!(!format!("{auth:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn names() {
        assert!(check_name("data-1.v2_x").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn accounts_containers_subdirectories_endpoints() {
        assert!(check_account("myacct01").is_ok());
        assert!(check_account("My-Acct").is_err());
        assert!(check_container("data-set").is_ok());
        for bad in ["ab", "-data", "data-", "da--ta", "Data"] {
            assert!(check_container(bad).is_err(), "{bad:?}");
        }
        assert!(check_subdirectory("a/b").is_ok());
        for bad in ["/a", "a/../b", "a//b", "./a"] {
            assert!(check_subdirectory(bad).is_err(), "{bad:?}");
        }
        assert!(check_endpoint("").is_ok());
        assert!(check_endpoint("https://a.blob.core.windows.net").is_ok());
        assert!(check_endpoint("http://a").is_err());
    }
}

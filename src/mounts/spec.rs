//! What to mount: the domain form of a mount request or a `[[mounts.mount]]`
//! entry, and its field rules. Secrets travel in the crate's redacting
//! [`Secret`] wrapper.
//!
//! Where mounts and caches may go ([`PathRules`]): a mount path must lie
//! strictly below one of `mounts.allowed_roots`; a cache dir strictly below
//! `mounts.cache_root` or an allowed root (the agent empties cache dirs, so an
//! API caller must not be able to point one at `/etc`). Paths are normalised
//! lexically (`..` is refused), then resolved through the symlinks of their
//! existing ancestors ([`crate::paths`]), so a link cannot lead out of the
//! allowed roots. Neither may overlap the agent's own directories.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::paths;
use crate::secret::Secret;

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

/// Who a mount belongs to: blobfuse2 runs as this user and shows every file
/// as theirs. Root (uid 0) means a mount for jobs only (and root).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The owner's uid.
    pub uid: u32,
    /// The owner's gid.
    pub gid: u32,
}

impl Owner {
    /// Root: a mount for jobs only.
    pub const ROOT: Owner = Owner { uid: 0, gid: 0 };

    /// Whether this is root (a jobs-only mount, blobfuse2 runs as root).
    pub fn is_root(self) -> bool {
        self.uid == 0
    }
}

/// "No gid given" in a requested [`Owner`] (a gid no group has: `(gid_t)
/// -1` means "unchanged" to the kernel): the owner's primary group is looked
/// up when the spec is checked.
pub const NO_GID: u32 = u32::MAX;

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
    /// Where to mount (absolute, normalised; checked by [`PathRules`]).
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
    /// Who it belongs to; `None` until checked means `mounts.default_owner`
    /// (a checked spec always has one).
    pub owner: Option<Owner>,
}

impl MountSpec {
    /// The owner of a checked spec (root if none was resolved).
    pub fn owner(&self) -> Owner {
        self.owner.unwrap_or(Owner::ROOT)
    }
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

/// The rules, with every root already normalised and resolved.
#[derive(Debug, Clone)]
pub struct PathRules {
    allowed_roots: Vec<PathBuf>,
    cache_root: PathBuf,
    agent_dirs: Vec<PathBuf>,
}

impl PathRules {
    /// Builds the rules. Roots that cannot be resolved are kept as written
    /// (they may be created later; a path below them is then checked as is).
    pub fn new(allowed_roots: &[PathBuf], cache_root: &Path, agent_dirs: &[PathBuf]) -> Self {
        let fix = |p: &Path| {
            paths::normalise(p)
                .and_then(|n| paths::resolve_existing_prefix(&n))
                .unwrap_or_else(|_| p.to_owned())
        };
        Self {
            allowed_roots: allowed_roots.iter().map(|r| fix(r)).collect(),
            cache_root: fix(cache_root),
            agent_dirs: agent_dirs.iter().map(|d| fix(d)).collect(),
        }
    }

    /// The default cache dir of a mount.
    pub fn default_cache_dir(&self, name: &str) -> PathBuf {
        self.cache_root.join(name)
    }

    /// The same rules without touching the filesystem, for `config check`:
    /// roots and paths are only normalised (symlinks are followed at mount
    /// time, by [`Self::mount_path`] and [`Self::cache_dir`]).
    pub fn lexical(allowed_roots: &[PathBuf], cache_root: &Path, agent_dirs: &[PathBuf]) -> Self {
        let fix = |p: &Path| paths::normalise(p).unwrap_or_else(|_| p.to_owned());
        Self {
            allowed_roots: allowed_roots.iter().map(|r| fix(r)).collect(),
            cache_root: fix(cache_root),
            agent_dirs: agent_dirs.iter().map(|d| fix(d)).collect(),
        }
    }

    /// Checks a declared mount's paths lexically (see [`Self::lexical`]);
    /// an empty `cache_dir` means the default. On a problem, the field and why.
    pub fn check_lexically(
        &self,
        mount_path: &Path,
        cache_dir: &Path,
    ) -> Result<(), (&'static str, String)> {
        let mount = paths::normalise(mount_path).map_err(|e| ("mount_path", e.to_string()))?;
        self.mount_path_allowed(mount_path, &mount)
            .and_then(|()| self.off_agent_dirs(mount_path, &mount))
            .map_err(|p| ("mount_path", p))?;
        if cache_dir.as_os_str().is_empty() {
            return Ok(());
        }
        let cache = paths::normalise(cache_dir).map_err(|e| ("cache_dir", e.to_string()))?;
        self.cache_dir_allowed(cache_dir, &cache)
            .and_then(|()| self.off_agent_dirs(cache_dir, &cache))
            .map_err(|p| ("cache_dir", p))?;
        if paths::overlaps(&mount, &cache) {
            return Err((
                "cache_dir",
                format!(
                    "{} and the mount path {} must not contain each other",
                    cache.display(),
                    mount.display()
                ),
            ));
        }
        Ok(())
    }

    /// Checks and resolves a mount path. Blocking.
    pub fn mount_path(&self, path: &Path) -> Result<PathBuf, String> {
        let resolved = resolve(path)?;
        self.mount_path_allowed(path, &resolved)?;
        self.directory_of_its_own(path, resolved)
    }

    /// Checks and resolves a cache dir. Blocking.
    pub fn cache_dir(&self, path: &Path) -> Result<PathBuf, String> {
        let resolved = resolve(path)?;
        self.cache_dir_allowed(path, &resolved)?;
        self.directory_of_its_own(path, resolved)
    }

    /// The rules of [`Self::mount_path`] for where a held mount dir really
    /// is (its kernel name, nothing to resolve). Pure.
    pub fn allows_mount_path(&self, real: &Path) -> Result<(), String> {
        self.mount_path_allowed(real, real)?;
        self.off_agent_dirs(real, real)
    }

    /// The rules of [`Self::cache_dir`] for where a held cache dir really
    /// is. Pure.
    pub fn allows_cache_dir(&self, real: &Path) -> Result<(), String> {
        self.cache_dir_allowed(real, real)?;
        self.off_agent_dirs(real, real)
    }

    fn mount_path_allowed(&self, path: &Path, resolved: &Path) -> Result<(), String> {
        if self
            .allowed_roots
            .iter()
            .any(|root| paths::strictly_below(resolved, root))
        {
            return Ok(());
        }
        Err(format!(
            "{} is outside the allowed roots ({}); set mounts.allowed_roots to allow it",
            describe(path, resolved),
            list(&self.allowed_roots)
        ))
    }

    fn cache_dir_allowed(&self, path: &Path, resolved: &Path) -> Result<(), String> {
        let allowed = paths::strictly_below(resolved, &self.cache_root)
            || self
                .allowed_roots
                .iter()
                .any(|root| paths::strictly_below(resolved, root));
        if allowed {
            return Ok(());
        }
        Err(format!(
            "{} must be below mounts.cache_root ({}) or an allowed root ({}): the agent empties cache dirs",
            describe(path, resolved),
            self.cache_root.display(),
            list(&self.allowed_roots)
        ))
    }

    fn off_agent_dirs(&self, path: &Path, resolved: &Path) -> Result<(), String> {
        // A cache dir inside the cache root is the agent's own area even when
        // the cache root itself lies in an agent dir (`serve --state-dir DIR`
        // puts it at DIR/cache): only the rest of that dir is off limits.
        let in_cache_root = paths::strictly_below(resolved, &self.cache_root);
        match self.agent_dirs.iter().find(|d| {
            paths::overlaps(resolved, d)
                && !(in_cache_root && paths::strictly_below(&self.cache_root, d))
        }) {
            Some(dir) => Err(format!(
                "{} overlaps the agent's own directory {}",
                describe(path, resolved),
                dir.display()
            )),
            None => Ok(()),
        }
    }

    /// A resolved path must be a directory (or not exist yet) and must not
    /// overlap the agent's own directories.
    fn directory_of_its_own(&self, path: &Path, resolved: PathBuf) -> Result<PathBuf, String> {
        if let Ok(meta) = resolved.symlink_metadata()
            && !meta.is_dir()
        {
            return Err(format!(
                "{} exists and is not a directory",
                resolved.display()
            ));
        }
        self.off_agent_dirs(path, &resolved)?;
        Ok(resolved)
    }
}

/// Normalises and resolves a requested path, for a field's message. Blocking.
fn resolve(path: &Path) -> Result<PathBuf, String> {
    paths::normalise(path)
        .and_then(|n| paths::resolve_existing_prefix(&n))
        .map_err(|e| e.to_string())
}

fn describe(asked: &Path, resolved: &Path) -> String {
    if asked == resolved {
        asked.display().to_string()
    } else {
        format!("{} (resolves to {})", asked.display(), resolved.display())
    }
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print_themselves() {
        let s = Secret::from_text("  c2VjcmV0\n");
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

    #[test]
    fn mount_paths_must_be_strictly_below_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mnt");
        std::fs::create_dir(&root).unwrap();
        let rules = PathRules::new(
            std::slice::from_ref(&root),
            &dir.path().join("cache"),
            &[dir.path().join("state")],
        );
        let root = root.canonicalize().unwrap();
        assert_eq!(
            rules.mount_path(&root.join("data")).unwrap(),
            root.join("data")
        );
        assert!(
            rules
                .mount_path(&root)
                .unwrap_err()
                .contains("outside the allowed roots")
        );
        assert!(
            rules
                .mount_path(Path::new("/etc/x"))
                .unwrap_err()
                .contains("outside")
        );
        // A root that is a prefix as a string but not as a path.
        let sibling = PathBuf::from(format!("{}x/data", root.display()));
        assert!(rules.mount_path(&sibling).is_err());
    }

    #[test]
    fn symlinks_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mnt");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let rules = PathRules::new(&[root], &dir.path().join("cache"), &[]);
        let err = rules
            .mount_path(&dir.path().join("mnt/link/data"))
            .unwrap_err();
        assert!(err.contains("resolves to"), "{err}");
    }

    #[test]
    fn cache_dirs_must_stay_in_cache_root_or_roots_and_off_agent_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let rules = PathRules::new(
            &[base.join("mnt")],
            &base.join("cache"),
            &[base.join("cache/state")],
        );
        assert!(rules.cache_dir(&base.join("cache/data")).is_ok());
        assert!(rules.cache_dir(&base.join("mnt/c")).is_ok());
        assert!(
            rules
                .cache_dir(Path::new("/etc"))
                .unwrap_err()
                .contains("empties")
        );
        assert!(rules.cache_dir(&base.join("cache")).is_err());
        assert!(
            rules
                .cache_dir(&base.join("cache/state/x"))
                .unwrap_err()
                .contains("overlaps")
        );
    }

    #[test]
    fn a_cache_root_inside_the_state_dir_is_usable() {
        // `serve --state-dir DIR` derives mounts.cache_root = DIR/cache.
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let rules = PathRules::new(
            &[base.join("mnt")],
            &base.join("state/cache"),
            &[base.join("state")],
        );
        assert!(rules.cache_dir(&base.join("state/cache/data")).is_ok());
        // The rest of the state dir stays off limits.
        let rules = PathRules::new(
            std::slice::from_ref(&base),
            &base.join("state/cache"),
            &[base.join("state")],
        );
        assert!(
            rules
                .cache_dir(&base.join("state/store"))
                .unwrap_err()
                .contains("overlaps")
        );
    }
}

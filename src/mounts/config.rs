//! The `[mounts]` section and its `[[mounts.mount]]` entries: structs,
//! defaults, ranges and validation. A declared mount is checked with the same
//! rules as one requested over the API ([`spec`]), lexically, so that a bad
//! mount path fails `config check` rather than the first mount.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::spec::{self, PathRules};
use crate::validate::{FieldError, check_ranges};

/// `[mounts]`: file share mounts with blobfuse2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MountsConfig {
    /// The blobfuse2 program (looked up in PATH when not absolute).
    pub blobfuse2_path: PathBuf,
    /// Mount paths must lie strictly below one of these.
    pub allowed_roots: Vec<PathBuf>,
    /// Per-mount cache dirs go below this by default (the temp disk).
    pub cache_root: PathBuf,
    /// `file_cache.max-size-mb` of a mount that does not set its own, in bytes.
    pub default_cache_max_bytes: u64,
    /// How often each mount's health is checked.
    pub health_interval_seconds: u32,
    /// How long a health check may take before the mount counts as stale.
    pub health_timeout_seconds: u32,
    /// How long a new mount may take to appear in mountinfo.
    pub mount_timeout_seconds: u32,
    /// First delay before mounting again after a failure (doubles each time).
    pub backoff_initial_seconds: u32,
    /// Longest delay between mount attempts.
    pub backoff_max_seconds: u32,
    /// The user a mount belongs to when its request names no owner (the
    /// instance's user): blobfuse2 runs as them and only they and root
    /// (jobs included) reach the mount. "root" makes such mounts jobs-only.
    pub default_owner: String,
    /// Mode of every file and directory of a mount (blobfuse2's
    /// `libfuse.default-permission`), at most 0o777.
    pub default_permission: u32,
    /// Mounts declared here (`[[mounts.mount]]`), mounted at every start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mount: Vec<DeclaredMount>,
}

impl Default for MountsConfig {
    fn default() -> Self {
        Self {
            blobfuse2_path: PathBuf::from("blobfuse2"),
            allowed_roots: vec![PathBuf::from("/mnt"), PathBuf::from("/home")],
            cache_root: PathBuf::from("/mnt/instance-agent/cache"),
            default_cache_max_bytes: 4 << 30,
            health_interval_seconds: 10,
            health_timeout_seconds: 5,
            mount_timeout_seconds: 30,
            backoff_initial_seconds: 1,
            backoff_max_seconds: 300,
            default_owner: "azureuser".into(),
            default_permission: 0o750,
            mount: Vec::new(),
        }
    }
}

/// `[[mounts.mount]]`: a mount declared in config. Secrets are never inline:
/// `secret_file` names a file (mode 0600) holding the key or SAS token.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeclaredMount {
    /// Unique name ([A-Za-z0-9_.-], at most 64 characters).
    pub name: String,
    /// Storage account.
    pub account: String,
    /// Blob container.
    pub container: String,
    /// Absolute path below one of `mounts.allowed_roots`.
    pub mount_path: PathBuf,
    /// "key", "sas" or "msi".
    pub auth: String,
    /// For "key" and "sas": the file holding the secret.
    pub secret_file: PathBuf,
    /// For "msi": a user-assigned identity's client id (all empty: system-assigned).
    pub client_id: String,
    /// For "msi": a user-assigned identity's resource id.
    pub resource_id: String,
    /// For "msi": a user-assigned identity's object id.
    pub object_id: String,
    /// Mount read-only.
    pub read_only: bool,
    /// Cache dir; `<cache_root>/<name>` when empty.
    pub cache_dir: PathBuf,
    /// Cache cap in bytes; `default_cache_max_bytes` when 0.
    pub cache_max_bytes: u64,
    /// Blob endpoint; `https://<account>.blob.core.windows.net` when empty.
    pub endpoint: String,
    /// Mount only this virtual directory of the container.
    pub subdirectory: String,
    /// The user the mount belongs to; `mounts.default_owner` when empty.
    pub owner: String,
}

/// The key of a problem with the roots. It names both keys because the
/// same rule applies to each (`mounts.` is added with the table).
const ROOTS_KEY: &str = "allowed_roots / mounts.cache_root";

impl MountsConfig {
    /// Checks the section and every declared mount; keys are relative to
    /// `[mounts]`. `agent_dirs` (the agent's state, runtime and logs dirs)
    /// are where no mount or cache may go.
    pub fn validate(&self, agent_dirs: &[PathBuf]) -> Result<(), FieldError> {
        check_ranges(&[
            (
                "health_interval_seconds",
                self.health_interval_seconds.into(),
                1,
                3600,
            ),
            (
                "health_timeout_seconds",
                self.health_timeout_seconds.into(),
                1,
                600,
            ),
            (
                "mount_timeout_seconds",
                self.mount_timeout_seconds.into(),
                1,
                600,
            ),
            (
                "backoff_initial_seconds",
                self.backoff_initial_seconds.into(),
                1,
                3600,
            ),
            (
                "backoff_max_seconds",
                self.backoff_max_seconds.into(),
                self.backoff_initial_seconds.into(),
                86_400,
            ),
            (
                "default_cache_max_bytes",
                self.default_cache_max_bytes,
                1 << 20,
                1 << 50,
            ),
        ])?;
        if self.default_permission > 0o777 {
            return Err(FieldError::new(
                "default_permission",
                format!(
                    "{:#o} is not a file mode: at most 0o777 (no setuid, setgid or sticky bits)",
                    self.default_permission
                ),
            ));
        }
        if self.default_owner.is_empty() {
            return Err(FieldError::new(
                "default_owner",
                "must name a user (\"root\" for mounts only jobs use)",
            ));
        }
        if self.blobfuse2_path.as_os_str().is_empty() {
            return Err(FieldError::new("blobfuse2_path", "must not be empty"));
        }
        if self.allowed_roots.is_empty() {
            return Err(FieldError::new(
                "allowed_roots",
                "must name at least one directory",
            ));
        }
        for root in self.allowed_roots.iter().chain([&self.cache_root]) {
            if let Err(problem) = crate::paths::normalise(root) {
                return Err(FieldError::new(ROOTS_KEY, problem.to_string()));
            }
            if root.as_path() == Path::new("/") {
                return Err(FieldError::new(
                    ROOTS_KEY,
                    "\"/\" is too wide: name the directories mounts may go under",
                ));
            }
        }
        // The mount path rules, lexically: a declared mount at /etc/data or
        // a cache dir of /etc fails `config check`, not the first mount.
        let rules = PathRules::lexical(&self.allowed_roots, &self.cache_root, agent_dirs);
        let mut names = BTreeSet::new();
        for (i, declared) in self.mount.iter().enumerate() {
            let within = |error: FieldError| error.within(&format!("mount[{i}]"));
            spec::check_name(&declared.name)
                .map_err(|problem| within(FieldError::new("name", problem)))?;
            if !names.insert(declared.name.as_str()) {
                return Err(within(FieldError::new(
                    "name",
                    format!("{:?} is declared twice", declared.name),
                )));
            }
            declared.validate(&rules).map_err(within)?;
        }
        Ok(())
    }
}

impl DeclaredMount {
    /// Checks one entry (its name apart, which must also be unique); keys
    /// are relative to the entry.
    fn validate(&self, rules: &PathRules) -> Result<(), FieldError> {
        for (field, result) in [
            ("account", spec::check_account(&self.account)),
            ("container", spec::check_container(&self.container)),
            ("endpoint", spec::check_endpoint(&self.endpoint)),
            ("subdirectory", spec::check_subdirectory(&self.subdirectory)),
        ] {
            result.map_err(|problem| FieldError::new(field, problem))?;
        }
        rules
            .check_lexically(&self.mount_path, &self.cache_dir)
            .map_err(|(field, problem)| FieldError::new(field, problem))?;
        match self.auth.as_str() {
            "key" | "sas" => {
                if !self.secret_file.is_absolute() {
                    return Err(FieldError::new(
                        "secret_file",
                        format!(
                            "auth = {:?} needs secret_file, an absolute path to a 0600 file holding the secret (secrets are never inline)",
                            self.auth
                        ),
                    ));
                }
            }
            "msi" => {
                if !self.secret_file.as_os_str().is_empty() {
                    return Err(FieldError::new(
                        "secret_file",
                        "is not used with auth = \"msi\"",
                    ));
                }
            }
            other => {
                return Err(FieldError::new(
                    "auth",
                    format!("{other:?} must be \"key\", \"sas\" or \"msi\""),
                ));
            }
        }
        if self.cache_max_bytes != 0 && self.cache_max_bytes < 1 << 20 {
            return Err(FieldError::new(
                "cache_max_bytes",
                format!(
                    "{} is below the minimum of 1 MiB (0 means the default)",
                    self.cache_max_bytes
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default agent dirs, where no mount may go.
    fn agent_dirs() -> Vec<PathBuf> {
        [
            "/var/lib/instance-agent",
            "/run/instance-agent",
            "/var/log/instance-agent",
        ]
        .map(PathBuf::from)
        .to_vec()
    }

    fn check(text: &str) -> Result<(), FieldError> {
        let mounts: MountsConfig = toml::from_str(text).expect("parses");
        mounts.validate(&agent_dirs())
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(MountsConfig::default().validate(&agent_dirs()), Ok(()));
    }

    #[test]
    fn declared_mount_paths_follow_the_mount_rules() {
        let declared = |fields: &str| {
            format!(
                "[[mount]]\nname = \"data\"\naccount = \"myacct\"\ncontainer = \"data\"\n\
                 auth = \"msi\"\n{fields}\n"
            )
        };
        let ok = check(&declared(
            "mount_path = \"/mnt/data\"\ncache_dir = \"/home/azureuser/cache\"",
        ));
        assert!(ok.is_ok(), "{ok:?}");
        for (fields, key, problem) in [
            (
                "mount_path = \"/etc/data\"",
                "mount[0].mount_path",
                "/etc/data is outside the allowed roots (/mnt, /home)",
            ),
            (
                "mount_path = \"/mnt\"",
                "mount[0].mount_path",
                "outside the allowed roots",
            ),
            (
                "mount_path = \"/mnt/data\"\ncache_dir = \"/etc\"",
                "mount[0].cache_dir",
                "/etc must be below mounts.cache_root",
            ),
            (
                "mount_path = \"/mnt/data\"\ncache_dir = \"/mnt/data/cache\"",
                "mount[0].cache_dir",
                "must not contain each other",
            ),
            (
                "mount_path = \"/mnt/data\"\ncache_dir = \"/mnt/x/../../etc\"",
                "mount[0].cache_dir",
                "..",
            ),
        ] {
            let error = check(&declared(fields)).unwrap_err();
            assert!(
                error.key == key && error.problem.contains(problem),
                "{fields}: {error:?}"
            );
        }
    }

    #[test]
    fn declared_mounts_are_checked_field_by_field() {
        let base = "[[mount]]\nname = \"data\"\naccount = \"myacct\"\ncontainer = \"data\"\n\
                    mount_path = \"/mnt/data\"\n";
        for (extra, key) in [
            ("auth = \"key\"", "mount[0].secret_file"),
            (
                "auth = \"msi\"\nsecret_file = \"/k\"",
                "mount[0].secret_file",
            ),
            ("auth = \"token\"", "mount[0].auth"),
            (
                "auth = \"msi\"\ncache_max_bytes = 10",
                "mount[0].cache_max_bytes",
            ),
        ] {
            assert_eq!(
                check(&format!("{base}{extra}\n")).unwrap_err().key,
                key,
                "{extra}"
            );
        }
        let twice = format!(
            "{base}auth = \"msi\"\n{}",
            base.replace("/mnt/data", "/mnt/other")
        );
        let error = check(&format!("{twice}auth = \"msi\"\n")).unwrap_err();
        assert_eq!(error.key, "mount[1].name");
        assert!(error.problem.contains("declared twice"), "{error:?}");
        assert_eq!(
            check("allowed_roots = [\"/\"]\n").unwrap_err().key,
            ROOTS_KEY
        );
        assert_eq!(
            check("backoff_initial_seconds = 10\nbackoff_max_seconds = 5\n")
                .unwrap_err()
                .problem,
            "5 is out of range: allowed 10 to 86400"
        );
    }
}

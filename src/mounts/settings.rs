//! [`MountSettings`]: what the mounts domain runs with, derived once from the
//! `[mounts]` section and the agent's dirs, and where it puts each mount's
//! files. `daemon.rs` builds it; the domain never reads the whole config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::MountsConfig;
use super::spec::{MountSpec, PathRules};
use super::system::Launch;

/// Settings of the mount service, from `[mounts]` and the agent's dirs.
#[derive(Debug, Clone)]
pub struct MountSettings {
    /// `mounts.blobfuse2_path`.
    pub blobfuse2_path: PathBuf,
    /// Where rendered configs and blobfuse2's raw output go
    /// (`<agent.runtime_dir>/mounts`, 0700, root only).
    pub config_dir: PathBuf,
    /// Root-only staging binds of mount and cache dirs a user can change
    /// (`<agent.runtime_dir>/staging/mounts`, see [`super::handoff`]).
    pub staging_dir: PathBuf,
    /// Where blobfuse2's own log goes (`<agent.logs_dir>/mounts`).
    pub logs_dir: PathBuf,
    /// `agent.state_dir` (API secrets live below it).
    pub state_dir: PathBuf,
    /// Allowed roots and the cache root.
    pub rules: PathRules,
    /// `mounts.default_cache_max_bytes`.
    pub default_cache_max_bytes: u64,
    /// `mounts.mount_timeout_seconds`.
    pub mount_timeout: Duration,
    /// `mounts.health_timeout_seconds`.
    pub health_timeout: Duration,
    /// `mounts.backoff_initial_seconds`.
    pub backoff_initial: Duration,
    /// `mounts.backoff_max_seconds`.
    pub backoff_max: Duration,
    /// How long blobfuse2 gets to exit after SIGTERM.
    pub stop_grace: Duration,
    /// `mounts.default_owner`: a user name, resolved at each request.
    pub default_owner: String,
    /// `mounts.default_permission`.
    pub default_permission: u32,
}

impl MountSettings {
    /// Settings from the section and the agent's dirs (`agent.state_dir`,
    /// `agent.runtime_dir`, `agent.logs_dir`), where no mount may go.
    pub fn new(m: &MountsConfig, state_dir: &Path, runtime_dir: &Path, logs_dir: &Path) -> Self {
        Self {
            blobfuse2_path: m.blobfuse2_path.clone(),
            config_dir: runtime_dir.join("mounts"),
            staging_dir: runtime_dir.join("staging").join("mounts"),
            logs_dir: logs_dir.join("mounts"),
            state_dir: state_dir.to_owned(),
            rules: PathRules::new(
                &m.allowed_roots,
                &m.cache_root,
                &[
                    state_dir.to_owned(),
                    runtime_dir.to_owned(),
                    logs_dir.to_owned(),
                ],
            ),
            default_cache_max_bytes: m.default_cache_max_bytes,
            mount_timeout: Duration::from_secs(m.mount_timeout_seconds.into()),
            health_timeout: Duration::from_secs(m.health_timeout_seconds.into()),
            backoff_initial: Duration::from_secs(m.backoff_initial_seconds.into()),
            backoff_max: Duration::from_secs(m.backoff_max_seconds.into()),
            stop_grace: Duration::from_secs(5),
            default_owner: m.default_owner.clone(),
            default_permission: m.default_permission,
        }
    }

    /// How blobfuse2 is started for a spec, mounting at the spec's path.
    pub fn launch(&self, spec: &MountSpec) -> Launch {
        self.launch_at(spec, &spec.mount_path)
    }

    /// How blobfuse2 is started for a spec, mounting at `mount_path` (the
    /// path it is handed: the spec's own or a staging entry).
    pub fn launch_at(&self, spec: &MountSpec, mount_path: &Path) -> Launch {
        Launch {
            name: spec.name.clone(),
            program: self.blobfuse2_path.clone(),
            mount_path: mount_path.to_owned(),
            config_file: self.config_dir.join(format!("{}.yaml", spec.name)),
            // Raw output may quote a request URL with its SAS (the Azure
            // SDK's errors do): it stays beside the 0600 config, never
            // under the logs dir, and goes at cleanup.
            output_file: self.config_dir.join(format!("{}.out", spec.name)),
            owner: spec.owner(),
        }
    }

    /// blobfuse2's own log file of a mount. A mount's blobfuse2 that runs
    /// as its owner writes it, and the owner cannot reach the logs dir
    /// (0750 root), so theirs is beside the config (`<name>.log`, 0600, the
    /// owner's, in the traversable but unlistable config dir).
    pub fn log_file(&self, spec: &MountSpec) -> PathBuf {
        if spec.owner().is_root() {
            self.logs_dir.join(format!("{}.log", spec.name))
        } else {
            self.config_dir.join(format!("{}.log", spec.name))
        }
    }
}

//! The `[jobs]` section (the queue, its slots and its limits on a job spec)
//! and the `[docker]` section (how the engine is reached): their structs,
//! defaults, ranges and validation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::validate::{self, FieldError, check_ranges};

/// `[docker]`: how to reach the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// The engine's Unix socket.
    pub socket: PathBuf,
    /// How often the engine is pinged while it answers (backoff while it does not).
    pub check_interval_seconds: u32,
    /// Deadline for each call to the engine.
    pub request_timeout_seconds: u32,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/var/run/docker.sock"),
            check_interval_seconds: 10,
            request_timeout_seconds: 30,
        }
    }
}

impl DockerConfig {
    /// Checks the section; keys are relative to `[docker]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        validate::absolute("socket", &self.socket)?;
        check_ranges(&[
            (
                "check_interval_seconds",
                self.check_interval_seconds.into(),
                1,
                3600,
            ),
            (
                "request_timeout_seconds",
                self.request_timeout_seconds.into(),
                1,
                600,
            ),
        ])
    }
}

/// `[jobs]`: the Docker-backed job queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Slots per usable CPU core (cgroup quota and cpuset applied).
    pub slots_per_core: u32,
    /// Absolute slot capacity; overrides `slots_per_core` when above 0.
    pub slots: u32,
    /// Jobs waiting at most; SubmitJob answers RESOURCE_EXHAUSTED past it.
    pub max_queue: u32,
    /// Seconds a job that does not fit may be overtaken by smaller ones
    /// before it reserves the slots it needs.
    pub reserve_after_seconds: u32,
    /// Seconds between SIGTERM and SIGKILL on cancel or timeout.
    pub kill_grace_seconds: u32,
    /// Timeout of a job that sets none (0 = no timeout).
    pub default_timeout_seconds: u32,
    /// Memory limit of a job that sets none (0 = no limit).
    pub default_memory_bytes: u64,
    /// Process limit inside each job container (0 = no limit).
    pub pids_limit: u32,
    /// Networks a job may ask for; `none` is always allowed.
    pub allowed_networks: Vec<String>,
    /// Roots under which a job may bind-mount host paths.
    pub allowed_host_roots: Vec<PathBuf>,
    /// Keep containers after their exit is recorded (for debugging).
    pub keep_containers: bool,
    /// Captured output kept per job; the oldest part is dropped past it.
    pub log_max_bytes: u64,
    /// Finished jobs and their logs are removed after this many seconds.
    pub retention_seconds: u64,
    /// At most this many finished jobs are kept; the oldest go first.
    pub retention_count: u32,
    /// Under disk pressure, the logs of jobs finished longer ago than this
    /// are deleted first (their records stay).
    pub log_retention_seconds: u64,
    /// Environment entries per job.
    pub max_env_entries: u32,
    /// Total bytes of environment names and values per job.
    pub max_env_bytes: u32,
    /// Labels per job.
    pub max_labels: u32,
    /// Arguments in a job's command.
    pub max_command_args: u32,
    /// Total bytes of a job's command.
    pub max_command_bytes: u32,
    /// Images the `unused_images` reclaim step never removes: a tag or
    /// digest (`repo:tag`, `repo@sha256:...`), or a repository (all its tags).
    pub keep_images: Vec<String>,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            slots_per_core: 2,
            slots: 0,
            max_queue: 10_000,
            reserve_after_seconds: 60,
            kill_grace_seconds: 10,
            default_timeout_seconds: 0,
            default_memory_bytes: 0,
            pids_limit: 4096,
            allowed_networks: vec!["none".into()],
            allowed_host_roots: vec![PathBuf::from("/home"), PathBuf::from("/mnt")],
            keep_containers: false,
            log_max_bytes: 16 << 20,
            retention_seconds: 7 * 86_400,
            retention_count: 10_000,
            log_retention_seconds: 86_400,
            max_env_entries: 256,
            max_env_bytes: 64 << 10,
            max_labels: 64,
            max_command_args: 4096,
            max_command_bytes: 128 << 10,
            keep_images: Vec::new(),
        }
    }
}

impl JobsConfig {
    /// Checks the section; keys are relative to `[jobs]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_ranges(&[
            ("slots_per_core", self.slots_per_core.into(), 1, 64),
            ("slots", self.slots.into(), 0, 4096),
            ("max_queue", self.max_queue.into(), 1, 1_000_000),
            (
                "reserve_after_seconds",
                self.reserve_after_seconds.into(),
                0,
                86_400,
            ),
            (
                "kill_grace_seconds",
                self.kill_grace_seconds.into(),
                0,
                3600,
            ),
            (
                "default_timeout_seconds",
                self.default_timeout_seconds.into(),
                0,
                30 * 86_400,
            ),
            ("pids_limit", self.pids_limit.into(), 0, 1 << 22),
            ("log_max_bytes", self.log_max_bytes, 4096, 1 << 40),
            (
                "retention_count",
                self.retention_count.into(),
                1,
                10_000_000,
            ),
            ("max_env_entries", self.max_env_entries.into(), 0, 65_536),
            ("max_env_bytes", self.max_env_bytes.into(), 0, 16 << 20),
            ("max_labels", self.max_labels.into(), 0, 4096),
            ("max_command_args", self.max_command_args.into(), 1, 1 << 20),
            (
                "max_command_bytes",
                self.max_command_bytes.into(),
                1,
                16 << 20,
            ),
        ])?;
        if self.default_memory_bytes != 0 && self.default_memory_bytes < 6 << 20 {
            return Err(FieldError::new(
                "default_memory_bytes",
                format!(
                    "{} is below Docker's minimum of 6 MiB (0 means no limit)",
                    self.default_memory_bytes
                ),
            ));
        }
        for (i, root) in self.allowed_host_roots.iter().enumerate() {
            if !root.is_absolute()
                || root
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(FieldError::new(
                    format!("allowed_host_roots[{i}]"),
                    format!("{} must be an absolute path without `..`", root.display()),
                ));
            }
        }
        for (i, image) in self.keep_images.iter().enumerate() {
            if image.is_empty()
                || image.len() > 1024
                || crate::images::syntax::parse(image).is_err()
            {
                return Err(FieldError::new(
                    format!("keep_images[{i}]"),
                    format!("{image:?} is not an image reference or repository"),
                ));
            }
        }
        for (i, net) in self.allowed_networks.iter().enumerate() {
            if net.is_empty()
                || net.len() > 128
                || !net
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            {
                return Err(FieldError::new(
                    format!("allowed_networks[{i}]"),
                    format!("{net:?} is not a Docker network name ([A-Za-z0-9_.-], at most 128)"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(JobsConfig::default().validate(), Ok(()));
        assert_eq!(DockerConfig::default().validate(), Ok(()));
    }

    #[test]
    fn ranges_and_names_are_checked() {
        let error = JobsConfig {
            slots_per_core: 0,
            ..JobsConfig::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(error.key, "slots_per_core");
        assert_eq!(error.problem, "0 is out of range: allowed 1 to 64");
        for (config, key) in [
            (
                JobsConfig {
                    default_memory_bytes: 1 << 20,
                    ..JobsConfig::default()
                },
                "default_memory_bytes",
            ),
            (
                JobsConfig {
                    allowed_host_roots: vec!["/home/../etc".into()],
                    ..JobsConfig::default()
                },
                "allowed_host_roots[0]",
            ),
            (
                JobsConfig {
                    allowed_networks: vec!["none".into(), "a b".into()],
                    ..JobsConfig::default()
                },
                "allowed_networks[1]",
            ),
        ] {
            assert_eq!(config.validate().unwrap_err().key, key);
        }
        let docker = DockerConfig {
            socket: "docker.sock".into(),
            ..DockerConfig::default()
        };
        assert_eq!(docker.validate().unwrap_err().key, "socket");
    }
}

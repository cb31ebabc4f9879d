//! The agent's configuration file: the sections assembled into one
//! [`Config`], loading and parsing it, command-line overrides, and errors
//! that name the file, the key's line and what is allowed.
//!
//! Each section's struct, defaults, ranges and validation live with the
//! domain that owns it (`jobs::config`, `images::config`, `disk::config`,
//! `mounts::config`, `setup::config`, `api::config`, `metrics::config`,
//! `access::config`, `lifecycle::config`, `events`; `[agent]`, which no
//! domain owns, in [`agent`]). A section validates its own keys and
//! returns a [`FieldError`] with the key relative to the section; this module
//! prefixes the table, adds the file and the line, and applies the rules
//! between sections (the mount rules need the agent's dirs; `--state-dir`
//! moves directories of two sections). It also owns the commented default
//! file printed by `instance-agent config default` and which keys can change
//! while the agent runs (`LIVE_KEYS`, in `live`). It reads the file and
//! nothing else: applying a change is the daemon's business.

pub mod agent;
pub(crate) mod live;
mod messages;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use agent::AgentConfig;
pub use live::ConfigChanges;

use crate::access::config::AccessConfig;
use crate::api::config::{ControlPlaneConfig, LimitsConfig, OperatorConfig};
use crate::apps::config::AppsConfig;
use crate::disk::config::DiskConfig;
use crate::events::EventsConfig;
use crate::images::config::ImagesConfig;
use crate::jobs::config::{DockerConfig, JobsConfig};
use crate::lifecycle::config::LifecycleConfig;
use crate::metrics::config::MetricsConfig;
use crate::mounts::config::MountsConfig;
use crate::setup::config::SetupConfig;
use crate::validate::FieldError;

/// Where the agent looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/instance-agent/config.toml";

/// The complete, commented default configuration. A unit test keeps it equal
/// to [`Config::default`], so the docs cannot drift from the code.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default.toml");

/// A config that failed to load. Each variant names the file; `Invalid` also
/// names the key and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type).
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and its position.
        message: String,
    },
    /// A value of the file is out of range or inconsistent, at a known line
    /// (what [`Config::parse`] turns an `Invalid` into when the key is in the
    /// text).
    #[error("config {path}: line {line}: key `{key}`: {problem}")]
    InvalidAt {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key in the file.
        line: usize,
        /// Dotted key, e.g. `agent.shutdown_grace_seconds`.
        key: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config {path}: key `{key}`: {problem}")]
    Invalid {
        /// The file, or `<flags>` for command-line overrides.
        path: PathBuf,
        /// Dotted key, e.g. `agent.shutdown_grace_seconds`.
        key: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The agent process itself.
    pub agent: AgentConfig,
    /// The TCP listener for the control plane.
    pub control_plane: ControlPlaneConfig,
    /// The Docker engine.
    pub docker: DockerConfig,
    /// The event stream.
    pub events: EventsConfig,
    /// The job queue.
    pub jobs: JobsConfig,
    /// Image pulls.
    pub images: ImagesConfig,
    /// Apps: long-running containers on loopback ports.
    pub apps: AppsConfig,
    /// File share mounts (blobfuse2).
    pub mounts: MountsConfig,
    /// Setup scripts.
    pub setup: SetupConfig,
    /// The disk guard.
    pub disk: DiskConfig,
    /// Local operators on the Unix socket.
    pub operator: OperatorConfig,
    /// Limits on every client, whatever the RPC.
    pub limits: LimitsConfig,
    /// The Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
    /// The SSH access policy.
    pub access: AccessConfig,
    /// Activity sampling and idle shutdown.
    pub lifecycle: LifecycleConfig,
}

/// Command-line flags that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
}

impl Config {
    /// Loads `path`; a missing file means all defaults only when `path` is the
    /// default location (a file named on the command line must exist).
    pub fn load(path: &Path, must_exist: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                let config = Config::default();
                config.validate(path)?;
                return Ok(config);
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` is only used in messages, which
    /// name the line (when known), the dotted key and what is allowed.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse_error = |message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let document = toml::de::Deserializer::parse(text)
            .map_err(|e| parse_error(messages::syntax_message(&e, text)))?;
        let config: Config = serde_path_to_error::deserialize(document)
            .map_err(|e| parse_error(messages::schema_message(&e, text)))?;
        config.validate(path).map_err(|error| match error {
            ConfigError::Invalid { path, key, problem } => match messages::key_line(text, &key) {
                Some(line) => ConfigError::InvalidAt {
                    path,
                    line,
                    key,
                    problem,
                },
                None => ConfigError::Invalid { path, key, problem },
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Applies command-line overrides. With `--state-dir DIR`, the other
    /// directories still at their built-in defaults (root paths under /var/log,
    /// /run and /mnt) move under DIR too, so the agent runs anywhere without
    /// root paths: `agent.logs_dir` = DIR/logs, `agent.runtime_dir` = DIR/run,
    /// `mounts.cache_root` = DIR/cache. Returns the keys so derived.
    pub fn apply(&mut self, overrides: &Overrides) -> Vec<&'static str> {
        if let Some(socket) = &overrides.socket {
            self.agent.socket = socket.clone();
        }
        let mut derived = Vec::new();
        if let Some(state_dir) = &overrides.state_dir {
            self.agent.state_dir = state_dir.clone();
            let agent = AgentConfig::default();
            let mounts = MountsConfig::default();
            for (key, value, default, below) in [
                (
                    "agent.logs_dir",
                    &mut self.agent.logs_dir,
                    agent.logs_dir,
                    "logs",
                ),
                (
                    "agent.runtime_dir",
                    &mut self.agent.runtime_dir,
                    agent.runtime_dir,
                    "run",
                ),
                (
                    "mounts.cache_root",
                    &mut self.mounts.cache_root,
                    mounts.cache_root,
                    "cache",
                ),
            ] {
                if *value == default {
                    *value = state_dir.join(below);
                    derived.push(key);
                }
            }
        }
        derived
    }

    /// Checks every section, in a fixed order, and the rules between
    /// sections; the first problem found is the error, with its key in full
    /// (`jobs.slots_per_core`). The sections' rules also serve values
    /// arriving over the API.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        // Each section is cheap to check: all are, and the first error wins.
        let sections = [
            ("agent", self.agent.validate()),
            ("docker", self.docker.validate()),
            ("events", self.events.validate()),
            ("jobs", self.jobs.validate()),
            ("images", self.images.validate()),
            ("apps", self.apps.validate()),
            // No mount or cache may go in the agent's own directories.
            ("mounts", self.mounts.validate(&self.agent.dirs())),
            ("setup", self.setup.validate()),
            ("disk", self.disk.validate()),
            ("metrics", self.metrics.validate()),
            ("control_plane", self.control_plane.validate()),
            ("operator", self.operator.validate()),
            ("limits", self.limits.validate()),
            ("access", self.access.validate()),
            ("lifecycle", self.lifecycle.validate()),
        ];
        for (table, result) in sections {
            result.map_err(|error| {
                let FieldError { key, problem } = error.within(table);
                ConfigError::Invalid {
                    path: path.to_owned(),
                    key,
                    problem,
                }
            })?;
        }
        Ok(())
    }
}

//! The `[agent]` section: the daemon's identity, directories and timings.
//!
//! It lives with the top level because no domain owns it: the daemon reads it
//! while assembling the agent and hands each domain the directories it needs
//! (mounts and setup get their dirs as arguments, not this struct).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::validate::{self, FieldError, check_ranges};

/// `[agent]`: identity, paths and timings of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This instance's id; generated once and kept in the state dir when empty.
    pub instance_id: String,
    /// The Unix socket for operators and local tools.
    pub socket: PathBuf,
    /// Durable state (the store).
    pub state_dir: PathBuf,
    /// Logs of jobs, setup scripts and mounts.
    pub logs_dir: PathBuf,
    /// Runtime files (mount configs).
    pub runtime_dir: PathBuf,
    /// How long in-flight RPCs and tasks may run after SIGTERM.
    pub shutdown_grace_seconds: u32,
    /// How often the systemd STATUS= line is refreshed.
    pub status_interval_seconds: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            instance_id: String::new(),
            socket: PathBuf::from("/run/instance-agent/agent.sock"),
            state_dir: PathBuf::from("/var/lib/instance-agent"),
            logs_dir: PathBuf::from("/var/log/instance-agent"),
            runtime_dir: PathBuf::from("/run/instance-agent"),
            shutdown_grace_seconds: 10,
            status_interval_seconds: 5,
        }
    }
}

impl AgentConfig {
    /// The agent's own directories (state, runtime, logs): where no mount
    /// or cache may go.
    pub fn dirs(&self) -> [PathBuf; 3] {
        [
            self.state_dir.clone(),
            self.runtime_dir.clone(),
            self.logs_dir.clone(),
        ]
    }

    /// Checks the section; keys are relative to `[agent]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (key, dir) in [
            ("socket", &self.socket),
            ("state_dir", &self.state_dir),
            ("logs_dir", &self.logs_dir),
            ("runtime_dir", &self.runtime_dir),
        ] {
            validate::absolute(key, dir)?;
        }
        let id = &self.instance_id;
        if id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(FieldError::new(
                "instance_id",
                format!("{id:?} must be at most 64 characters of [A-Za-z0-9_-]"),
            ));
        }
        check_ranges(&[
            (
                "shutdown_grace_seconds",
                self.shutdown_grace_seconds.into(),
                1,
                300,
            ),
            (
                "status_interval_seconds",
                self.status_interval_seconds.into(),
                1,
                3600,
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(AgentConfig::default().validate(), Ok(()));
    }

    #[test]
    fn relative_paths_are_refused() {
        let agent = AgentConfig {
            state_dir: "state".into(),
            ..AgentConfig::default()
        };
        let error = agent.validate().unwrap_err();
        assert_eq!(error.key, "state_dir");
        assert_eq!(error.problem, "state must be an absolute path");
    }

    #[test]
    fn the_instance_id_is_short_and_plain() {
        for bad in ["a b".to_owned(), "x".repeat(65)] {
            let agent = AgentConfig {
                instance_id: bad.clone(),
                ..AgentConfig::default()
            };
            assert_eq!(agent.validate().unwrap_err().key, "instance_id", "{bad}");
        }
    }
}

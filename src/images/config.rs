//! The `[images]` section: how images are pulled (policy, concurrency,
//! timeout, prefetch) and where the registry credentials are kept; its
//! struct, defaults, ranges and validation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::validate::{self, FieldError, check_ranges};

/// When a job's image is pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullPolicy {
    /// Only when the image is not local.
    #[default]
    IfNotPresent,
    /// For every job, before it starts (a moved tag is followed).
    Always,
}

/// `[images]`: image pulls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// When a job's image is pulled.
    pub pull_policy: PullPolicy,
    /// Pulls at once (jobs, prefetch and `PullImage` together).
    pub max_concurrent_pulls: u32,
    /// Seconds a pull may take, from its first request to the registry to
    /// the image being local, retries of an unreachable registry included.
    pub pull_timeout_seconds: u32,
    /// Pull the images of queued jobs ahead of their turn, in queue order.
    pub prefetch_queued: bool,
    /// The credential store (a root-only JSON file); empty: `images/credentials.json`
    /// in the state dir.
    pub credentials_file: PathBuf,
    /// For tests only: the path whose filesystem the space check before a
    /// pull looks at, instead of the engine's data root (a small filesystem
    /// stands for a full disk without a second engine). Empty: off.
    pub space_check_path: PathBuf,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            pull_policy: PullPolicy::IfNotPresent,
            max_concurrent_pulls: 2,
            pull_timeout_seconds: 1800,
            prefetch_queued: true,
            credentials_file: PathBuf::new(),
            space_check_path: PathBuf::new(),
        }
    }
}

impl ImagesConfig {
    /// Checks the section; keys are relative to `[images]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_ranges(&[
            (
                "max_concurrent_pulls",
                self.max_concurrent_pulls.into(),
                1,
                16,
            ),
            (
                "pull_timeout_seconds",
                self.pull_timeout_seconds.into(),
                5,
                86_400,
            ),
        ])?;
        for (key, path) in [
            ("credentials_file", &self.credentials_file),
            ("space_check_path", &self.space_check_path),
        ] {
            if !path.as_os_str().is_empty() {
                validate::absolute(key, path)?;
            }
        }
        Ok(())
    }

    /// The credential store's file, for an agent whose state dir is `state_dir`.
    pub fn credentials_path(&self, state_dir: &Path) -> PathBuf {
        if self.credentials_file.as_os_str().is_empty() {
            state_dir.join("images").join("credentials.json")
        } else {
            self.credentials_file.clone()
        }
    }

    /// The path the space check looks at instead of the engine's data root.
    pub fn space_check_override(&self) -> Option<PathBuf> {
        (!self.space_check_path.as_os_str().is_empty()).then(|| self.space_check_path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(ImagesConfig::default().validate(), Ok(()));
    }

    #[test]
    fn ranges_and_paths_are_checked() {
        let error = ImagesConfig {
            max_concurrent_pulls: 0,
            ..ImagesConfig::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(error.key, "max_concurrent_pulls");
        assert_eq!(error.problem, "0 is out of range: allowed 1 to 16");
        let error = ImagesConfig {
            credentials_file: "creds.json".into(),
            ..ImagesConfig::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(error.key, "credentials_file");
    }

    #[test]
    fn the_credential_store_defaults_to_the_state_dir() {
        let config = ImagesConfig::default();
        assert_eq!(
            config.credentials_path(Path::new("/var/lib/instance-agent")),
            Path::new("/var/lib/instance-agent/images/credentials.json")
        );
        assert_eq!(config.space_check_override(), None);
    }
}

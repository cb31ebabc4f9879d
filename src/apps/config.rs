//! The `[apps]` section: which host addresses an app may publish a port on,
//! the network its containers join, how long an app is given to stop, and
//! how many apps the agent keeps. Struct, defaults, ranges and validation.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::validate::{FieldError, check_ranges};

/// `[apps]`: long-running containers reached through loopback ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppsConfig {
    /// Host addresses an app's port may bind besides 127.0.0.1 (for
    /// example `"0.0.0.0"` to expose apps on every interface). Empty: only
    /// loopback.
    pub allowed_host_ips: Vec<String>,
    /// The Docker network app containers join: a user-defined bridge the
    /// agent creates when missing (works with `dockerd --bridge=none`, whose
    /// default `bridge` network does not exist), so that ports can be
    /// published on 127.0.0.1 while jobs stay on `none`.
    pub network: String,
    /// Seconds between SIGTERM and SIGKILL when an app is stopped.
    pub stop_grace_seconds: u32,
    /// Apps the agent keeps at most; DeployApp of a new name past it is refused.
    pub max_apps: u32,
    /// Bytes of an exited container's output kept in its reason (the log tail).
    pub log_tail_bytes: u32,
}

impl Default for AppsConfig {
    fn default() -> Self {
        Self {
            allowed_host_ips: Vec::new(),
            network: "instance-agent-apps".into(),
            stop_grace_seconds: 10,
            max_apps: 64,
            log_tail_bytes: 512,
        }
    }
}

impl AppsConfig {
    /// Checks the section; keys are relative to `[apps]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (i, ip) in self.allowed_host_ips.iter().enumerate() {
            if ip.parse::<IpAddr>().is_err() {
                return Err(FieldError::new(
                    format!("allowed_host_ips[{i}]"),
                    format!("{ip:?} is not an IP address"),
                ));
            }
        }
        if self.network.is_empty()
            || matches!(self.network.as_str(), "none" | "host" | "bridge")
            || !self
                .network
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(FieldError::new(
                "network",
                format!(
                    "{:?} must be the name of a user-defined network ([A-Za-z0-9_.-], not none, host or bridge)",
                    self.network
                ),
            ));
        }
        check_ranges(&[
            (
                "stop_grace_seconds",
                self.stop_grace_seconds.into(),
                0,
                3600,
            ),
            ("max_apps", self.max_apps.into(), 1, 1024),
            ("log_tail_bytes", self.log_tail_bytes.into(), 0, 65_536),
        ])
    }

    /// Whether an app may bind `ip` (127.0.0.1 always may).
    pub fn host_ip_allowed(&self, ip: &str) -> bool {
        ip == "127.0.0.1" || self.allowed_host_ips.iter().any(|a| a == ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_loopback_only() {
        let config = AppsConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert!(config.host_ip_allowed("127.0.0.1"));
        assert!(!config.host_ip_allowed("0.0.0.0"));
    }

    #[test]
    fn bad_values_name_the_key() {
        let config = AppsConfig {
            allowed_host_ips: vec!["0.0.0.0".into(), "nope".into()],
            ..Default::default()
        };
        assert_eq!(config.validate().unwrap_err().key, "allowed_host_ips[1]");
        let config = AppsConfig {
            network: "host".into(),
            ..Default::default()
        };
        assert_eq!(config.validate().unwrap_err().key, "network");
        let config = AppsConfig {
            max_apps: 0,
            ..Default::default()
        };
        assert_eq!(config.validate().unwrap_err().key, "max_apps");
    }
}

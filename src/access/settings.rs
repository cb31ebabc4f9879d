//! [`AccessSettings`]: where the access domain works (the `[access]`
//! section, systemd's unit directory) and the names and paths derived from
//! it, shared by the handle (`service`) and the change (`apply`).

use std::path::PathBuf;

use super::config::AccessConfig;
use super::host::Unit;
use super::policy::PolicyRules;

/// Where the agent works, from `[access]`.
#[derive(Debug, Clone)]
pub struct AccessSettings {
    /// The `[access]` section.
    pub config: AccessConfig,
    /// Where unit drop-ins go (`/etc/systemd/system`; a temp dir in tests).
    pub systemd_dir: PathBuf,
}

impl AccessSettings {
    /// The settings of a section, with systemd's real unit directory.
    pub fn new(config: &AccessConfig) -> Self {
        Self {
            config: config.clone(),
            systemd_dir: "/etc/systemd/system".into(),
        }
    }

    /// Where `sshd -t`'s staged copy goes: beside the keys directory.
    pub fn staging_dir(&self) -> PathBuf {
        self.config
            .keys_dir
            .parent()
            .unwrap_or(std::path::Path::new("/"))
            .join("staging")
    }

    /// The socket unit's drop-in directory.
    pub fn socket_drop_in_dir(&self) -> PathBuf {
        self.systemd_dir
            .join(format!("{}.d", self.config.socket_unit))
    }

    /// A unit's name.
    pub fn unit_name(&self, unit: Unit) -> &str {
        match unit {
            Unit::Service => &self.config.service_unit,
            Unit::Socket => &self.config.socket_unit,
        }
    }

    pub(super) fn rules(&self) -> PolicyRules {
        PolicyRules {
            allow_password_authentication: self.config.allow_password_authentication,
            max_authorized_keys: self.config.max_authorized_keys,
        }
    }
}

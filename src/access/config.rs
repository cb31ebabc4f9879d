//! The `[access]` section: where the agent writes sshd's drop-in and the
//! authorized keys, which sshd and which units it drives, its time limits,
//! and what a policy may ask for (password authentication, how many keys).
//! One range table through [`crate::validate::check_ranges`]; the paths and
//! unit names are checked here too, since a wrong one would make the agent
//! write where sshd never reads.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::validate::{self, FieldError, check_ranges};

/// `[access]`: the SSH access policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Whether a policy may turn password authentication on (off: any
    /// `password_authentication = true` is refused).
    pub allow_password_authentication: bool,
    /// sshd's main config; it must `Include` the drop-in's directory before
    /// any `Match` block.
    pub sshd_config: PathBuf,
    /// The drop-in the agent owns; its name sorts first in its directory, so
    /// its values win (in sshd the first value of a keyword wins).
    pub drop_in: PathBuf,
    /// Directory of the authorized keys files the agent owns, one per user
    /// (`AuthorizedKeysFile <keys_dir>/%u`); its parent also holds the
    /// staging copy that `sshd -t` checks before anything is applied.
    pub keys_dir: PathBuf,
    /// The sshd program (`sshd -t`, `sshd -T`, `sshd -V`).
    pub sshd_path: PathBuf,
    /// The listener as a service (`ssh.service` on Debian and Ubuntu,
    /// `sshd.service` elsewhere).
    pub service_unit: String,
    /// The listener as a socket (`ssh.socket`), used when it is enabled or
    /// listening: socket activation.
    pub socket_unit: String,
    /// Seconds a reload or start may take until the port answers with an
    /// SSH banner; past it the change is rolled back.
    pub reload_timeout_seconds: u32,
    /// Seconds between checks that the files and units still match the
    /// policy (drift is reported, and repaired at the next start).
    pub drift_check_interval_seconds: u32,
    /// Authorized keys one policy may hold, at most.
    pub max_authorized_keys: u32,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            allow_password_authentication: false,
            sshd_config: "/etc/ssh/sshd_config".into(),
            drop_in: "/etc/ssh/sshd_config.d/00-instance-agent.conf".into(),
            keys_dir: "/etc/ssh/instance-agent/authorized_keys".into(),
            sshd_path: "/usr/sbin/sshd".into(),
            service_unit: "ssh.service".into(),
            socket_unit: "ssh.socket".into(),
            reload_timeout_seconds: 10,
            drift_check_interval_seconds: 300,
            max_authorized_keys: 64,
        }
    }
}

/// The longest path of a key file or drop-in: sshd cuts lines at 8 KiB,
/// the agent stays far below.
const MAX_PATH_BYTES: usize = 512;

impl AccessConfig {
    /// Checks the section; keys are relative to `[access]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_ranges(&[
            (
                "reload_timeout_seconds",
                self.reload_timeout_seconds.into(),
                1,
                300,
            ),
            (
                "drift_check_interval_seconds",
                self.drift_check_interval_seconds.into(),
                10,
                86400,
            ),
            (
                "max_authorized_keys",
                self.max_authorized_keys.into(),
                1,
                4096,
            ),
        ])?;
        for (key, path) in [
            ("sshd_config", &self.sshd_config),
            ("drop_in", &self.drop_in),
            ("keys_dir", &self.keys_dir),
            ("sshd_path", &self.sshd_path),
        ] {
            validate::absolute(key, path)?;
            plain_path(key, path)?;
        }
        let name = self
            .drop_in
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.ends_with(".conf") || name.starts_with('.') {
            return Err(FieldError::new(
                "drop_in",
                format!(
                    "{}: the file name must end in .conf and not start with a dot, or sshd's \
                     `Include sshd_config.d/*.conf` never reads it",
                    self.drop_in.display()
                ),
            ));
        }
        if self.keys_dir.parent().is_none_or(|p| p == Path::new("/")) {
            return Err(FieldError::new(
                "keys_dir",
                format!(
                    "{} must lie below a directory of its own (its parent holds the staging copy)",
                    self.keys_dir.display()
                ),
            ));
        }
        for (key, unit, suffix) in [
            ("service_unit", &self.service_unit, ".service"),
            ("socket_unit", &self.socket_unit, ".socket"),
        ] {
            let stem = unit.strip_suffix(suffix).unwrap_or_default();
            let plain = !stem.is_empty()
                && stem
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
            if !plain {
                return Err(FieldError::new(
                    key,
                    format!("{unit:?} is not a unit name ending in {suffix} (e.g. ssh{suffix})"),
                ));
            }
        }
        Ok(())
    }
}

/// Refuses what sshd would read otherwise than the agent means: whitespace
/// and `%` (sshd's tokens, `%u`), quotes, and very long paths.
fn plain_path(key: &str, path: &Path) -> Result<(), FieldError> {
    let text = path.to_string_lossy();
    if text.len() > MAX_PATH_BYTES {
        return Err(FieldError::new(
            key,
            format!(
                "the path is {} bytes long: at most {MAX_PATH_BYTES}",
                text.len()
            ),
        ));
    }
    if let Some(bad) = text
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '%' | '"' | '\'' | '#'))
    {
        return Err(FieldError::new(
            key,
            format!(
                "{text:?} holds {bad:?}: sshd would split or expand it (no whitespace, %, quotes or #)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_section_is_valid() {
        assert_eq!(AccessConfig::default().validate(), Ok(()));
    }

    #[test]
    fn each_bad_value_names_its_key() {
        type Break = Box<dyn Fn(&mut AccessConfig)>;
        let cases: Vec<(&str, Break)> = vec![
            (
                "reload_timeout_seconds",
                Box::new(|c| c.reload_timeout_seconds = 0),
            ),
            (
                "drift_check_interval_seconds",
                Box::new(|c| c.drift_check_interval_seconds = 5),
            ),
            (
                "max_authorized_keys",
                Box::new(|c| c.max_authorized_keys = 0),
            ),
            ("drop_in", Box::new(|c| c.drop_in = "relative.conf".into())),
            (
                "drop_in",
                Box::new(|c| c.drop_in = "/etc/ssh/sshd_config.d/00-x".into()),
            ),
            (
                "drop_in",
                Box::new(|c| c.drop_in = "/etc/ssh/sshd_config.d/.x.conf".into()),
            ),
            (
                "keys_dir",
                Box::new(|c| c.keys_dir = "/etc/ssh/keys %u".into()),
            ),
            ("keys_dir", Box::new(|c| c.keys_dir = "/keys".into())),
            ("sshd_path", Box::new(|c| c.sshd_path = "sshd".into())),
            ("service_unit", Box::new(|c| c.service_unit = "ssh".into())),
            (
                "socket_unit",
                Box::new(|c| c.socket_unit = "ssh.service".into()),
            ),
            (
                "socket_unit",
                Box::new(|c| c.socket_unit = "a b.socket".into()),
            ),
        ];
        for (key, change) in cases {
            let mut config = AccessConfig::default();
            change(&mut config);
            let error = config.validate().unwrap_err();
            assert_eq!(error.key, key, "{error:?}");
            assert!(!error.problem.is_empty());
        }
    }
}

//! The `[lifecycle]` section: how often the activity sources are sampled,
//! each source on or off with its threshold, and the idle shutdown policy
//! the agent starts with (the control plane may replace it over the API,
//! through the same [`IdleShutdownPolicy::validate`]).

use serde::{Deserialize, Serialize};

use crate::validate::{FieldError, check_ranges};

/// The shortest idle timeout: short enough for tests, long enough that a
/// sample interval or two fits in it.
pub const MIN_IDLE_TIMEOUT_SECONDS: u32 = 10;
/// The longest idle timeout: three days, Azure ML's upper bound.
pub const MAX_IDLE_TIMEOUT_SECONDS: u32 = 3 * 86_400;

/// `[lifecycle]`: activity and idle shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// Seconds between two samples of every enabled source (1 to 3600).
    pub sample_interval_seconds: u32,
    /// The idle shutdown policy until the control plane sets one.
    pub idle_shutdown: IdleShutdownPolicy,
    /// Jobs queued, starting or running, and setup scripts running.
    pub jobs: ToggleSource,
    /// SSH sessions open now.
    pub ssh: ToggleSource,
    /// Terminals (`/dev/pts/N`) with recent input or output.
    pub terminals: TerminalsSource,
    /// Processes of people (not system users) busy on the CPU.
    pub background: BackgroundSource,
    /// Apps running (starting, ready or unhealthy: a container that serves).
    pub apps: ToggleSource,
    /// The command run when the idle deadline passes, after the
    /// `IdleShutdownRequested` event (argv; empty: only the event, and the
    /// control plane stops the VM). Runs as root, at most 60 s.
    pub stop_command: Vec<String>,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            sample_interval_seconds: 60,
            idle_shutdown: IdleShutdownPolicy::default(),
            jobs: ToggleSource { enabled: true },
            ssh: ToggleSource { enabled: true },
            terminals: TerminalsSource::default(),
            background: BackgroundSource::default(),
            apps: ToggleSource { enabled: true },
            stop_command: Vec::new(),
        }
    }
}

/// A source with no setting but on or off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToggleSource {
    /// Whether the source is sampled and counts.
    pub enabled: bool,
}

/// `[lifecycle.terminals]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TerminalsSource {
    /// Whether the source is sampled and counts.
    pub enabled: bool,
    /// A terminal whose input (atime) or output (mtime) is younger than
    /// this many seconds is active (10 to 86400).
    pub recent_seconds: u32,
}

impl Default for TerminalsSource {
    fn default() -> Self {
        Self {
            enabled: true,
            recent_seconds: 300,
        }
    }
}

/// `[lifecycle.background]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackgroundSource {
    /// Whether the source is sampled and counts.
    pub enabled: bool,
    /// Processes of uids from this one up count (people, not system users).
    pub min_uid: u32,
    /// Users below `min_uid` that count too (by name).
    pub users: Vec<String>,
    /// A process is busy when its CPU time grew by more than this share of
    /// one core over the last interval, in percent (1 to 100).
    pub cpu_percent_threshold: u32,
}

impl Default for BackgroundSource {
    fn default() -> Self {
        Self {
            enabled: true,
            min_uid: 1000,
            users: Vec::new(),
            cpu_percent_threshold: 10,
        }
    }
}

/// When an idle instance is asked to stop, and how long before it the
/// users are warned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdleShutdownPolicy {
    /// Whether the agent asks for a stop after `idle_timeout_seconds` idle.
    pub enabled: bool,
    /// Seconds every enabled source must stay quiet before the stop is
    /// requested (10 to 259200).
    pub idle_timeout_seconds: u32,
    /// Seconds before the stop at which the first warning goes out (0 to
    /// `idle_timeout_seconds`); a second one follows 5 minutes before.
    pub warn_before_seconds: u32,
}

impl Default for IdleShutdownPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            idle_timeout_seconds: 3600,
            warn_before_seconds: 1800,
        }
    }
}

impl IdleShutdownPolicy {
    /// Checks the policy (from the file or the API); keys are relative to it.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_ranges(&[
            (
                "idle_timeout_seconds",
                self.idle_timeout_seconds.into(),
                MIN_IDLE_TIMEOUT_SECONDS.into(),
                MAX_IDLE_TIMEOUT_SECONDS.into(),
            ),
            (
                "warn_before_seconds",
                self.warn_before_seconds.into(),
                0,
                self.idle_timeout_seconds.into(),
            ),
        ])
    }
}

impl LifecycleConfig {
    /// Checks the section; keys are relative to `[lifecycle]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_ranges(&[
            (
                "sample_interval_seconds",
                self.sample_interval_seconds.into(),
                1,
                3600,
            ),
            (
                "terminals.recent_seconds",
                self.terminals.recent_seconds.into(),
                10,
                86_400,
            ),
            (
                "background.cpu_percent_threshold",
                self.background.cpu_percent_threshold.into(),
                1,
                100,
            ),
        ])?;
        self.idle_shutdown
            .validate()
            .map_err(|e| e.within("idle_shutdown"))?;
        if let Some((index, _)) = self.background.users.iter().enumerate().find(|(_, u)| {
            u.is_empty()
                || !u
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        }) {
            return Err(FieldError::new(
                format!("background.users[{index}]"),
                "not a user name (letters, digits, '-', '_', '.')",
            ));
        }
        if self
            .stop_command
            .first()
            .is_some_and(|p| !std::path::Path::new(p).is_absolute())
        {
            return Err(FieldError::new(
                "stop_command[0]",
                "not an absolute path (the command runs as root, never looked up in PATH)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_section_is_valid() {
        assert_eq!(LifecycleConfig::default().validate(), Ok(()));
    }

    #[test]
    fn each_bad_value_names_its_key_and_limit() {
        type Break = Box<dyn Fn(&mut LifecycleConfig)>;
        let cases: Vec<(&str, &str, Break)> = vec![
            (
                "sample_interval_seconds",
                "allowed 1 to 3600",
                Box::new(|c| c.sample_interval_seconds = 0),
            ),
            (
                "terminals.recent_seconds",
                "allowed 10 to 86400",
                Box::new(|c| c.terminals.recent_seconds = 5),
            ),
            (
                "background.cpu_percent_threshold",
                "allowed 1 to 100",
                Box::new(|c| c.background.cpu_percent_threshold = 101),
            ),
            (
                "idle_shutdown.idle_timeout_seconds",
                "allowed 10 to 259200",
                Box::new(|c| c.idle_shutdown.idle_timeout_seconds = 9),
            ),
            (
                "idle_shutdown.warn_before_seconds",
                "allowed 0 to 3600",
                Box::new(|c| c.idle_shutdown.warn_before_seconds = 3601),
            ),
            (
                "background.users[1]",
                "not a user name",
                Box::new(|c| c.background.users = vec!["alice".into(), "a b".into()]),
            ),
        ];
        for (key, limit, change) in cases {
            let mut config = LifecycleConfig::default();
            change(&mut config);
            let error = config.validate().unwrap_err();
            assert_eq!(error.key, key, "{error:?}");
            assert!(error.problem.contains(limit), "{error:?}");
        }
    }

    #[test]
    fn ten_seconds_is_the_shortest_idle_timeout() {
        let policy = IdleShutdownPolicy {
            enabled: true,
            idle_timeout_seconds: 10,
            warn_before_seconds: 5,
        };
        assert_eq!(policy.validate(), Ok(()));
    }
}

//! The activity model: what each source read at one sample (a count with a
//! human detail, or that it could not be read), and the instance's activity
//! built from all of them. A source that cannot be read is neither idle nor
//! active: it says so, and it does not keep the instance up (the issue's
//! rule: no information is never activity), but it is shown.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::config::{IdleShutdownPolicy, LifecycleConfig};

/// Where activity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceKind {
    /// Jobs queued, starting or running.
    Jobs,
    /// Setup scripts running.
    SetupScripts,
    /// SSH sessions open.
    Ssh,
    /// Terminals with recent input or output.
    Terminals,
    /// Processes of people busy on the CPU.
    Background,
    /// Apps running (the apps domain plugs in here when it lands).
    Apps,
}

impl SourceKind {
    /// Every source, in the order replies list them.
    pub const ALL: [SourceKind; 6] = [
        Self::Jobs,
        Self::SetupScripts,
        Self::Ssh,
        Self::Terminals,
        Self::Background,
        Self::Apps,
    ];

    /// The source of a name given by [`SourceKind::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether the source is sampled and counts under `config` (`jobs`
    /// covers the setup scripts too).
    pub fn is_enabled(self, config: &LifecycleConfig) -> bool {
        match self {
            Self::Jobs | Self::SetupScripts => config.jobs.enabled,
            Self::Ssh => config.ssh.enabled,
            Self::Terminals => config.terminals.enabled,
            Self::Background => config.background.enabled,
            Self::Apps => config.apps.enabled,
        }
    }

    /// The name used in config, replies and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Self::Jobs => "jobs",
            Self::SetupScripts => "setup_scripts",
            Self::Ssh => "ssh",
            Self::Terminals => "terminals",
            Self::Background => "background",
            Self::Apps => "apps",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one source read at one sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// `count` things are active now; `detail` names the first of them for
    /// people ("job train-42 running").
    Active {
        /// How many (jobs, sessions, terminals, processes).
        count: u32,
        /// The first of them, in words.
        detail: String,
    },
    /// Nothing active.
    Quiet,
    /// The source could not be read; `reason` says why.
    Unreadable {
        /// Why, in words.
        reason: String,
    },
}

impl Reading {
    /// An active reading of `count` things, or quiet when there are none.
    pub fn count(count: usize, first: Option<String>) -> Self {
        match (count, first) {
            (0, _) | (_, None) => Self::Quiet,
            (n, Some(detail)) => Self::Active {
                count: u32::try_from(n).unwrap_or(u32::MAX),
                detail,
            },
        }
    }

    /// The detail when the reading is active.
    pub fn active_detail(&self) -> Option<&str> {
        match self {
            Self::Active { detail, .. } => Some(detail),
            Self::Quiet | Self::Unreadable { .. } => None,
        }
    }
}

/// When a source was last active, and what it saw then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastActivity {
    /// The wall-clock time of the sample.
    pub at: SystemTime,
    /// What was active, in words.
    pub detail: String,
}

/// One source in an [`Activity`]: its reading now and when it was last active.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceState {
    /// The source.
    pub kind: SourceKind,
    /// Its reading at the last sample.
    pub reading: Reading,
    /// When it was last active (since the agent started).
    pub last_activity: Option<LastActivity>,
}

/// The instance's activity after a sample.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Activity {
    /// Whether every enabled source is quiet or unreadable.
    pub idle: bool,
    /// When the instance became idle (if it is).
    pub idle_since: Option<SystemTime>,
    /// The source that last reset the idle timer, with its detail.
    pub last_activity_source: Option<(SourceKind, LastActivity)>,
    /// Every enabled source.
    pub sources: Vec<SourceState>,
    /// When the stop will be requested, if idle shutdown is enabled and
    /// the instance is idle.
    pub idle_shutdown_at: Option<SystemTime>,
    /// The postponement, while it lies ahead.
    pub postponement: Option<Postponement>,
    /// The idle shutdown policy in force.
    pub policy: IdleShutdownPolicy,
}

/// A postponement of the idle stop: until when, who asked and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Postponement {
    /// The stop is not requested before this time.
    #[serde(with = "millis")]
    pub until: SystemTime,
    /// Why, as given.
    pub reason: String,
    /// Who asked (the caller's identity and role).
    pub requested_by: String,
}

/// Wall-clock times as milliseconds since the epoch in the store.
pub(crate) mod millis {
    use std::time::{Duration, SystemTime};

    use serde::{Deserialize, Deserializer, Serializer};

    /// Milliseconds since the epoch.
    pub fn to_ms(time: SystemTime) -> u64 {
        time.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// The time `ms` milliseconds after the epoch.
    pub fn from_ms(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    pub(crate) fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(to_ms(*time))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        u64::deserialize(d).map(from_ms)
    }
}

/// Folds a new set of readings into the sources' states, keeping each
/// source's last activity; returns the first active source of this sample.
pub fn fold_readings(
    sources: &mut Vec<SourceState>,
    readings: Vec<(SourceKind, Reading)>,
    at: SystemTime,
) -> Option<(SourceKind, LastActivity)> {
    let mut first = None;
    let mut next = Vec::with_capacity(readings.len());
    for (kind, reading) in readings {
        let previous = sources
            .iter()
            .find(|s| s.kind == kind)
            .and_then(|s| s.last_activity.clone());
        let last_activity = match reading.active_detail() {
            Some(detail) => {
                let last = LastActivity {
                    at,
                    detail: detail.to_owned(),
                };
                first.get_or_insert((kind, last.clone()));
                Some(last)
            }
            None => previous,
        };
        next.push(SourceState {
            kind,
            reading,
            last_activity,
        });
    }
    *sources = next;
    first
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_source_keeps_its_last_activity_after_going_quiet() {
        let mut sources = Vec::new();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let first = fold_readings(
            &mut sources,
            vec![
                (SourceKind::Jobs, Reading::Quiet),
                (
                    SourceKind::Ssh,
                    Reading::count(2, Some("SSH session of alice".into())),
                ),
            ],
            t0,
        );
        assert_eq!(first.map(|(k, _)| k), Some(SourceKind::Ssh));
        let later = t0 + Duration::from_secs(60);
        let first = fold_readings(
            &mut sources,
            vec![
                (SourceKind::Jobs, Reading::Quiet),
                (
                    SourceKind::Ssh,
                    Reading::Unreadable {
                        reason: "permission denied".into(),
                    },
                ),
            ],
            later,
        );
        assert_eq!(first, None, "unreadable never counts as activity");
        let ssh = &sources[1];
        assert_eq!(ssh.last_activity.as_ref().map(|l| l.at), Some(t0));
        assert!(matches!(ssh.reading, Reading::Unreadable { .. }));
    }

    #[test]
    fn a_count_of_zero_is_quiet() {
        assert_eq!(Reading::count(0, Some("x".into())), Reading::Quiet);
        assert_eq!(
            Reading::count(3, Some("x".into())),
            Reading::Active {
                count: 3,
                detail: "x".into()
            }
        );
    }
}

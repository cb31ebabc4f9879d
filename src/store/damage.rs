//! What is known to be wrong with the store, and the `store` condition made
//! from it: a file moved aside because it could not be opened (at this start
//! or an earlier one, while the moved file is still there), a store file
//! found missing, records that cannot be decoded (skipped, never deleted),
//! and the containers of unknown origin that lost records leave behind
//! (handed in by the daemon: the store knows nothing of jobs).
//!
//! Plain data and text only; [`super::open`] finds the damage and
//! [`super::Store`] records skipped records as the domains read them.

use std::path::PathBuf;
use std::time::SystemTime;

use crate::health::ConditionState;

/// Names of a list quoted in the condition; the rest are counted.
const QUOTED: usize = 5;

/// A store file that could not be opened and was renamed out of the way.
#[derive(Debug, Clone, PartialEq)]
pub struct MovedAside {
    /// Where the damaged file is now (`agent.redb.damaged-<time>`).
    pub path: PathBuf,
    /// Moved at this start (else by an earlier one, and the file is still there).
    pub this_start: bool,
    /// What was recorded when it was moved; `None` when nothing was (the
    /// agent stopped before it could write the note).
    pub note: Option<MovedNote>,
}

/// What the agent recorded about a file it moved aside (kept in the new
/// store, table `store.moved_aside`, until the file is deleted).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MovedNote {
    /// Seconds since 1970 (UTC) when it was moved.
    pub moved_at: u64,
    /// Why it could not be opened.
    pub reason: String,
    /// How copying its records back went.
    pub salvage: Salvage,
}

/// Copying the readable records of a moved-aside file into the new store.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Salvage {
    /// Started and never finished: the agent stopped (or crashed) reading
    /// the damaged file. Never tried again.
    Started,
    /// Finished: records copied per table, and what could not be read.
    Done {
        /// Table name and records copied from it.
        copied: Vec<(String, u64)>,
        /// Tables, or parts of them, that could not be read.
        problems: Vec<String>,
    },
    /// The damaged file could not be read at all.
    Failed {
        /// Why.
        reason: String,
    },
}

impl Salvage {
    /// Whether every record of the damaged file is known to be back.
    pub fn complete(&self) -> bool {
        matches!(self, Salvage::Done { problems, .. } if problems.is_empty())
    }

    fn describe(&self) -> String {
        match self {
            Salvage::Started => "copying its records back stopped the agent (the file is damaged \
                 in its structure), so nothing was copied back and it is not tried again"
                .to_owned(),
            Salvage::Failed { reason } => {
                format!("none of its records could be read back ({reason})")
            }
            Salvage::Done { copied, problems } => {
                let total: u64 = copied.iter().map(|(_, n)| n).sum();
                let tables = copied
                    .iter()
                    .map(|(t, n)| format!("{t} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut text = if total == 0 {
                    "no record could be copied back from it".to_owned()
                } else {
                    format!("{total} records were copied back from it ({tables})")
                };
                if !problems.is_empty() {
                    text.push_str(&format!("; unreadable: {}", problems.join(", ")));
                }
                text
            }
        }
    }
}

/// A record that could not be decoded: skipped by its domain, left in the
/// store (a later version may read it; the next write of the key replaces it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRecord {
    /// Its table.
    pub table: &'static str,
    /// Its key.
    pub key: String,
    /// Why it cannot be decoded.
    pub detail: String,
}

/// Everything known to be wrong with the store in this agent run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreDamage {
    /// The store file.
    pub path: PathBuf,
    /// Files moved aside (this start or earlier ones) that are still there.
    pub moved: Vec<MovedAside>,
    /// The store file was missing at this start although an earlier start
    /// had created one (the creation time it recorded).
    pub missing_since: Option<SystemTime>,
    /// Records skipped because they cannot be decoded, in the order found.
    pub skipped: Vec<SkippedRecord>,
}

impl StoreDamage {
    /// Why the records of `table` may be incomplete at this start (their
    /// history lost with a damaged or deleted store, or a record of the
    /// table skipped), so that a domain does not take "no record" to mean
    /// "never happened". `None` when they are complete.
    pub fn history_lost(&self, table: &str) -> Option<String> {
        if self.missing_since.is_some() {
            return Some(format!(
                "the store {} was missing at this start",
                self.path.display()
            ));
        }
        if let Some(moved) = self
            .moved
            .iter()
            .find(|m| m.this_start && !m.note.as_ref().is_some_and(|n| n.salvage.complete()))
        {
            return Some(format!(
                "the store was damaged and moved to {} at this start",
                moved.path.display()
            ));
        }
        self.skipped
            .iter()
            .find(|s| s.table == table)
            .map(|s| format!("record {}/{} cannot be decoded", s.table, s.key))
    }
}

/// The `store` condition: failed while a moved-aside file is still there or
/// when the store was found missing at this start; degraded while records
/// are skipped or containers of unknown origin are kept (described in
/// `unknown_containers`); ok otherwise. The message says what happened,
/// where the files are and what to do.
pub fn condition(damage: &StoreDamage, unknown_containers: &[String]) -> (ConditionState, String) {
    let mut state = ConditionState::Ok;
    let mut parts = Vec::new();
    for moved in &damage.moved {
        state = ConditionState::Failed;
        parts.push(describe_moved(damage, moved));
    }
    if let Some(created) = damage.missing_since {
        state = ConditionState::Failed;
        parts.push(format!(
            "the store {} was missing at this start (an earlier start had created it at {}): \
             it was deleted or lost; the agent started with an empty store, so jobs, setup runs, \
             mounts requested over the API and watched paths recorded before are forgotten, the \
             creation script is not run again by itself, and containers still running are kept \
             as unknown origin; resubmit what is still needed (this clears at the next start)",
            damage.path.display(),
            time_text(created),
        ));
    }
    if !damage.skipped.is_empty() {
        state = state.max(ConditionState::Degraded);
        let names = quoted(
            damage
                .skipped
                .iter()
                .map(|s| format!("{}/{} ({})", s.table, s.key, s.detail)),
        );
        parts.push(format!(
            "{} record(s) cannot be decoded and were skipped (left in the store; the next write \
             of the same key replaces one): {names}",
            damage.skipped.len()
        ));
    }
    if !unknown_containers.is_empty() {
        state = state.max(ConditionState::Degraded);
        parts.push(format!(
            "{} container(s) of unknown origin (labelled with this instance, no job record) are \
             kept, never removed by the agent: {}; remove them with `instance-agent disk --reclaim \
             --unknown-containers` or `docker rm -f`",
            unknown_containers.len(),
            quoted(unknown_containers.iter().cloned()),
        ));
    }
    if parts.is_empty() {
        return (ConditionState::Ok, format!("{} ok", damage.path.display()));
    }
    (state, parts.join("; "))
}

fn describe_moved(damage: &StoreDamage, moved: &MovedAside) -> String {
    let store = damage.path.display();
    let to = moved.path.display();
    let what_to_do = "keep it for a bug report if needed, then delete it (this clears at the \
                      next start)";
    match &moved.note {
        Some(note) => {
            let when =
                time_text(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(note.moved_at));
            let start = if moved.this_start {
                "at this start"
            } else {
                "by an earlier start"
            };
            format!(
                "the store {store} could not be opened ({}) and was moved to {to} {start} \
                 ({when}); the agent started with an empty store and {}; jobs, setup runs, mounts \
                 and watched paths not copied back are forgotten and containers still running \
                 are kept as unknown origin; {what_to_do}",
                note.reason,
                note.salvage.describe(),
            )
        }
        None => format!(
            "a damaged store was moved to {to} by an earlier start that recorded nothing more; \
             {what_to_do}"
        ),
    }
}

/// The first [`QUOTED`] items, then how many more.
fn quoted(items: impl ExactSizeIterator<Item = String>) -> String {
    let total = items.len();
    let mut text = items.take(QUOTED).collect::<Vec<_>>().join(", ");
    if total > QUOTED {
        text.push_str(&format!(" and {} more", total - QUOTED));
    }
    text
}

/// `2026-12-04 10:15:00 UTC`.
pub(super) fn time_text(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time)
        .format("%Y-%m-%d %H:%M:%S UTC")
        .to_string()
}

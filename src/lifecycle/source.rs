//! The activity sources as the sampling service sees them: one narrow
//! trait, [`ActivitySource`], and the sources this domain reads itself:
//! terminals (`/dev/pts/N` times) and background work (the `/proc` table in
//! [`super::background`]). Sources that belong to other domains (jobs,
//! setup scripts, SSH sessions, apps) implement the trait in small adapters
//! where the daemon assembles the agent, so this module imports none of them.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;

use super::activity::{Reading, SourceKind};
use super::background::{BackgroundWork, ProcessTable};

/// One source of activity, read once per sample.
#[async_trait]
pub trait ActivitySource: Send + Sync + 'static {
    /// Which source this is.
    fn kind(&self) -> SourceKind;
    /// Reads it now. Never fails: a source that cannot be read says so in
    /// [`Reading::Unreadable`]. Blocking work runs off the runtime.
    async fn read(&self) -> Reading;
}

/// Terminals with recent input (atime) or output (mtime): the entries of
/// `/dev/pts` (or a test's directory).
pub struct Terminals {
    dir: PathBuf,
    recent: Duration,
}

impl Terminals {
    /// The terminals under `dir`, active when touched within `recent`.
    pub fn new(dir: impl Into<PathBuf>, recent: Duration) -> Self {
        Self {
            dir: dir.into(),
            recent,
        }
    }

    /// One blocking read of the directory.
    fn read_blocking(dir: &std::path::Path, recent: Duration) -> Reading {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) => {
                return Reading::Unreadable {
                    reason: format!("cannot list {}: {error}", dir.display()),
                };
            }
        };
        let now = SystemTime::now();
        // (age, name, uid, input?) of each recent terminal.
        let mut recent_ones: Vec<(Duration, String, u32, bool)> = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // ptmx is the multiplexer, not a terminal.
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            // A terminal closed between the listing and the stat: skip it.
            let Ok(meta) = entry.metadata() else { continue };
            let age_of = |t: std::io::Result<SystemTime>| {
                t.ok()
                    .map(|t| now.duration_since(t).unwrap_or_default())
                    .unwrap_or(Duration::MAX)
            };
            let input = age_of(meta.accessed());
            let output = age_of(meta.modified());
            let (age, was_input) = if input <= output {
                (input, true)
            } else {
                (output, false)
            };
            if age <= recent {
                recent_ones.push((age, name, meta.uid(), was_input));
            }
        }
        recent_ones.sort();
        let first = recent_ones.first().map(|(age, name, uid, input)| {
            format!(
                "terminal pts/{name} of {}: {} {} s ago",
                user_name(*uid),
                if *input { "input" } else { "output" },
                age.as_secs()
            )
        });
        Reading::count(recent_ones.len(), first)
    }
}

#[async_trait]
impl ActivitySource for Terminals {
    fn kind(&self) -> SourceKind {
        SourceKind::Terminals
    }

    async fn read(&self) -> Reading {
        let dir = self.dir.clone();
        let recent = self.recent;
        tokio::task::spawn_blocking(move || Self::read_blocking(&dir, recent))
            .await
            .unwrap_or_else(|e| Reading::Unreadable {
                reason: format!("the terminals' read failed: {e}"),
            })
    }
}

/// The name of `uid` (the number itself when unknown).
fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

/// Background work (people's processes busy on the CPU) as a source: the
/// growth is measured between two reads, so it keeps the previous one.
pub struct Background<T: ProcessTable> {
    work: Arc<Mutex<BackgroundWork<T>>>,
}

impl<T: ProcessTable> Background<T> {
    /// The source over `work`.
    pub fn new(work: BackgroundWork<T>) -> Self {
        Self {
            work: Arc::new(Mutex::new(work)),
        }
    }
}

#[async_trait]
impl<T: ProcessTable> ActivitySource for Background<T> {
    fn kind(&self) -> SourceKind {
        SourceKind::Background
    }

    async fn read(&self) -> Reading {
        let work = self.work.clone();
        let now = Instant::now();
        tokio::task::spawn_blocking(move || {
            let mut work = work.lock().unwrap_or_else(|p| p.into_inner());
            work.sample(now)
        })
        .await
        .unwrap_or_else(|e| Reading::Unreadable {
            reason: format!("the process table's read failed: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{File, FileTimes};

    use super::*;

    #[tokio::test]
    async fn a_terminal_touched_recently_is_active_an_old_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        for (name, time) in [("0", old), ("3", SystemTime::now()), ("ptmx", old)] {
            let file = File::create(dir.path().join(name)).unwrap();
            file.set_times(FileTimes::new().set_accessed(time).set_modified(time))
                .unwrap();
        }
        let terminals = Terminals::new(dir.path(), Duration::from_secs(300));
        match terminals.read().await {
            Reading::Active { count, detail } => {
                assert_eq!(count, 1);
                assert!(detail.starts_with("terminal pts/3 of "), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        let quiet = Terminals::new(dir.path(), Duration::ZERO);
        assert_eq!(quiet.read().await, Reading::Quiet);
    }

    #[tokio::test]
    async fn a_missing_directory_is_unreadable_not_quiet() {
        let terminals = Terminals::new("/nonexistent/pts", Duration::from_secs(300));
        assert!(matches!(terminals.read().await, Reading::Unreadable { .. }));
    }
}

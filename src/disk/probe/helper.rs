//! The agent's side of the probe helper ([`super::child`]): starts the
//! agent's own binary with [`PROBE_ARG`], reads its answers line by line,
//! kills it at its deadline (or when the caller stops listening), and reaps
//! it. [`HelperProbe`] is the real [`IsolatedProbe`].
//!
//! Why a process: a FUSE server that reads a request and never answers
//! leaves the caller's thread in an uninterruptible wait that not even
//! SIGKILL ends. In an agent thread that wedges the agent (the thread is
//! lost to the pool, and the process cannot exit: systemd cannot restart it
//! and its socket stays dead). In a helper only the helper is stuck; the
//! agent has stopped waiting for it at its deadline, and its reaper task
//! (the one thing left of it, besides the process in the kernel) ends when
//! the filesystem lets go. Callers bound how many helpers may be stuck at
//! once by keeping at most one per filesystem ([`super::flights`], the
//! guard's own single flight per path).
//!
//! The helper is started with `posix_spawn` (what std uses for a plain
//! command), on the runtime thread: it returns as soon as the child has
//! exec'd, so it needs no thread from the blocking pool, which must stay
//! free for the agent's own work. Its environment is empty; stdin is
//! `/dev/null`, stderr the agent's.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::child::{sample_args, walk_args};
use super::wire::Line;
use super::{IsolatedProbe, ProbeRun, SampleAnswer, WalkAnswer, lexical_mount};
use crate::disk::top::TopRequest;

pub use super::child::PROBE_ARG;

/// Probes in helper processes: the agent's binary at `program` (normally
/// `/proc/self/exe`, which stays the running binary even after a package
/// upgrade replaced the file).
#[derive(Debug, Clone)]
pub struct HelperProbe {
    program: PathBuf,
}

impl HelperProbe {
    /// Helpers run `program`.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
        }
    }

    /// Starts the helper with `args` and forwards each line that `translate`
    /// turns into an answer, until the helper ends, `deadline` passes,
    /// `kill` is cancelled or nobody listens any more; then kills and reaps
    /// it, and only then closes the answers.
    fn launch<T: Send + 'static>(
        &self,
        args: Vec<OsString>,
        deadline: Duration,
        translate: impl Fn(Line) -> Option<T> + Send + 'static,
    ) -> ProbeRun<T> {
        let (tx, answers) = mpsc::unbounded_channel();
        let kill = CancellationToken::new();
        let mut command = tokio::process::Command::new(&self.program);
        command
            .args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let spawned = command.spawn();
        let stop = kill.clone();
        tokio::spawn(async move {
            let mut child = match spawned {
                Ok(child) => child,
                Err(error) => {
                    tracing::warn!(%error, "cannot start the probe helper");
                    return;
                }
            };
            if let Some(stdout) = child.stdout.take() {
                let mut lines = BufReader::new(stdout).lines();
                let expired = tokio::time::sleep(deadline);
                tokio::pin!(expired);
                loop {
                    tokio::select! {
                        line = lines.next_line() => match line {
                            Ok(Some(text)) => match Line::decode(&text) {
                                Some(line) => {
                                    if let Some(answer) = translate(line)
                                        && tx.send(answer).is_err()
                                    {
                                        break;
                                    }
                                }
                                None => tracing::warn!(line = %text, "the probe helper wrote something unexpected"),
                            },
                            // Its end (or a broken pipe): it is exiting.
                            Ok(None) | Err(_) => break,
                        },
                        () = &mut expired => {
                            tracing::debug!(deadline_ms = deadline.as_millis(), "probe helper overran its deadline; killing it");
                            break;
                        }
                        () = stop.cancelled() => break,
                        () = tx.closed() => break,
                    }
                }
            }
            // Harmless when it has exited already. A helper stuck in the
            // kernel dies (and is reaped) only when its filesystem lets go.
            let _ = child.start_kill();
            let _ = child.wait().await;
            drop(tx);
        });
        ProbeRun { answers, kill }
    }
}

impl IsolatedProbe for HelperProbe {
    fn sample(&self, paths: Vec<(PathBuf, bool)>, timeout: Duration) -> ProbeRun<SampleAnswer> {
        let count = paths.len();
        self.launch(sample_args(&paths), timeout, move |line| match line {
            Line::Sample { index, result } if index < count => {
                Some((index, result.map(Into::into).map_err(Into::into)))
            }
            _ => None,
        })
    }

    fn walk(&self, request: TopRequest, limit: Duration) -> ProbeRun<WalkAnswer> {
        self.launch(walk_args(&request), limit, |line| match line {
            Line::Progress {
                entries,
                bytes,
                current,
            } => Some(WalkAnswer::Progress(crate::disk::top::TopProgress {
                entries,
                bytes,
                current: current.into(),
            })),
            Line::Done { result } => {
                Some(WalkAnswer::Done(result.map(Into::into).map_err(Into::into)))
            }
            Line::Sample { .. } => None,
        })
    }

    fn filesystem_of(&self, path: &Path) -> PathBuf {
        // procfs, answered from the kernel's mount table: it never waits on
        // a filesystem, so it may run here on the runtime thread.
        let table = crate::mountinfo::read().unwrap_or_default();
        lexical_mount(&table, path)
    }
}

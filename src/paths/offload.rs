//! Blocking work on a path a caller chose, run where a hang cannot hold the
//! agent.
//!
//! Opening a client's path can block forever in the kernel: a FUSE server
//! that never answers (any user can mount one with `fusermount3`), a dead
//! network share. Each such call takes a thread of tokio's blocking pool for
//! as long as it hangs, and enough of them stop the store, peer
//! identification and disk sampling. [`Offload`] runs these calls one at a
//! time per filesystem (named by the path's text,
//! [`crate::mountinfo::lexical_mount`], so choosing it touches nothing): a
//! call into a filesystem whose previous call overran its time is answered
//! [`OffloadError::Unresponsive`] at once, without a thread, and at most
//! [`Offload::max_stuck`] calls may be stuck at once, whatever the number of
//! filesystems, so the rest of the pool stays for the agent's own work. A
//! stuck thread is released when its filesystem answers (or its server
//! dies); it cannot be killed, which is why the filesystem's place stays
//! taken until then.
//!
//! The disk guard's probes use helper processes for the same reason
//! (`disk::probe`): they can be killed, and a walk holds no descriptor the
//! agent needs. Here the work returns what it opened (a held directory, a
//! staging bind), so it runs in the agent's own process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Why offloaded work has no answer.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// An earlier call into the same filesystem overran its time and has not
    /// returned: the filesystem does not answer.
    #[error(
        "the filesystem at {} has not answered for {} s (a hung mount?); try again once it answers",
        .filesystem.display(),
        .stuck_for.as_secs()
    )]
    Unresponsive {
        /// Its mount point.
        filesystem: PathBuf,
        /// Since when the stuck call has waited.
        stuck_for: Duration,
    },
    /// The call did not return within its time (its thread is left to end).
    #[error(
        "the filesystem at {} did not answer within {} s (a hung mount?)",
        .filesystem.display(),
        .timeout.as_secs_f32()
    )]
    Timeout {
        /// Its mount point.
        filesystem: PathBuf,
        /// The time it had.
        timeout: Duration,
    },
    /// Too many calls are stuck on hung filesystems.
    #[error("{0} calls are stuck on hung filesystems (the limit); try again when they end")]
    Busy(usize),
    /// The call ended without an answer (it panicked).
    #[error("the call ended without an answer")]
    Failed,
}

/// The call running on a filesystem.
struct Running {
    started: Instant,
    deadline: Instant,
    /// Changes (closes) when its thread has returned.
    ended: watch::Receiver<()>,
}

/// Runs blocking calls on caller-chosen paths, one call at a time per
/// filesystem, at most `max_stuck` of them stuck. One is shared by every
/// domain that opens such paths, so that together they can never take more
/// than `max_stuck` of the blocking pool's threads. Cheap to clone.
#[derive(Clone)]
pub struct Offload {
    running: Arc<Mutex<HashMap<PathBuf, Running>>>,
    max_stuck: usize,
    filesystem_of: Arc<dyn Fn(&Path) -> PathBuf + Send + Sync>,
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload")
            .field("max_stuck", &self.max_stuck)
            .finish_non_exhaustive()
    }
}

impl Offload {
    /// At most `max_stuck` calls may be stuck at once; filesystems named
    /// from this process's mount table.
    pub fn new(max_stuck: usize) -> Self {
        Self::with_filesystems(max_stuck, |path| {
            crate::mountinfo::lexical_mount(&crate::mountinfo::read().unwrap_or_default(), path)
        })
    }

    /// As [`Offload::new`], with `filesystem_of` naming a path's filesystem.
    pub fn with_filesystems(
        max_stuck: usize,
        filesystem_of: impl Fn(&Path) -> PathBuf + Send + Sync + 'static,
    ) -> Self {
        Self {
            running: Arc::default(),
            max_stuck,
            filesystem_of: Arc::new(filesystem_of),
        }
    }

    /// How many calls may be stuck at once.
    pub fn max_stuck(&self) -> usize {
        self.max_stuck
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PathBuf, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `work` (which touches `path`) on a thread of its own within
    /// `timeout`, after any call running on the same filesystem has returned
    /// (waiting for it no longer than its own deadline).
    pub async fn run<T: Send + 'static>(
        &self,
        path: &Path,
        timeout: Duration,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, OffloadError> {
        let filesystem = (self.filesystem_of)(path);
        let deadline = loop {
            let (mut ended, until) = {
                let mut running = self.lock();
                let now = Instant::now();
                match running.get(&filesystem) {
                    Some(call) if now >= call.deadline => {
                        return Err(OffloadError::Unresponsive {
                            filesystem,
                            stuck_for: now - call.started,
                        });
                    }
                    Some(call) => (call.ended.clone(), call.deadline),
                    None => {
                        let stuck = running.values().filter(|c| now >= c.deadline).count();
                        if stuck >= self.max_stuck {
                            return Err(OffloadError::Busy(stuck));
                        }
                        break self.start(&mut running, &filesystem, now + timeout, work);
                    }
                }
            };
            // The call before ends, or overruns (then this one is refused).
            let _ = tokio::time::timeout_at(until, ended.changed()).await;
        };
        match tokio::time::timeout_at(deadline.0, deadline.1).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(OffloadError::Failed),
            Err(_) => Err(OffloadError::Timeout {
                filesystem,
                timeout,
            }),
        }
    }

    /// Takes `filesystem`'s place until `deadline` and starts `work`, which
    /// gives the place back when it returns.
    fn start<T: Send + 'static>(
        &self,
        running: &mut HashMap<PathBuf, Running>,
        filesystem: &Path,
        deadline: Instant,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> (Instant, oneshot::Receiver<T>) {
        let (ended_tx, ended) = watch::channel(());
        let (answer_tx, answer) = oneshot::channel();
        let table = self.running.clone();
        let key = filesystem.to_owned();
        let leave = key.clone();
        // On the blocking pool (so that paused test clocks wait for it),
        // which is safe because at most `max_stuck` calls can be stuck in it.
        tokio::task::spawn_blocking(move || {
            let _ = answer_tx.send(work());
            table
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&leave);
            drop(ended_tx);
        });
        running.insert(
            key,
            Running {
                started: Instant::now(),
                deadline,
                ended,
            },
        );
        (deadline, answer)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// `/hung…` paths are one filesystem, everything else another (`/`).
    fn offload(max_stuck: usize) -> Offload {
        Offload::with_filesystems(max_stuck, |path| {
            let first = path.components().nth(1);
            PathBuf::from("/").join(first.map_or("".as_ref(), |c| c.as_os_str()))
        })
    }

    /// A call that blocks until the returned sender is dropped or sent to.
    fn hang() -> (mpsc::Sender<()>, impl FnOnce() + Send + 'static) {
        let (release, wait) = mpsc::channel::<()>();
        (release, move || {
            let _ = wait.recv();
        })
    }

    const SHORT: Duration = Duration::from_millis(100);

    #[tokio::test]
    async fn a_hung_filesystem_costs_one_thread_and_is_answered_at_once_after() {
        let offload = offload(4);
        let (release, stuck) = hang();
        let first = offload.run(Path::new("/hung/a"), SHORT, stuck).await;
        assert!(
            matches!(first, Err(OffloadError::Timeout { .. })),
            "{first:?}"
        );
        let at_once = std::time::Instant::now();
        for _ in 0..100 {
            let again = offload.run(Path::new("/hung/b"), SHORT, || ()).await;
            assert!(
                matches!(&again, Err(OffloadError::Unresponsive { filesystem, .. }) if filesystem == Path::new("/hung")),
                "{again:?}"
            );
        }
        assert!(at_once.elapsed() < SHORT, "answered without waiting");
        // Other filesystems are not held up.
        assert_eq!(
            offload.run(Path::new("/ok/x"), SHORT, || 7).await.unwrap(),
            7
        );
        // Once the stuck call returns, the filesystem is served again.
        drop(release);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match offload.run(Path::new("/hung/a"), SHORT, || 1).await {
                Ok(answer) => break assert_eq!(answer, 1),
                Err(error) => {
                    assert!(std::time::Instant::now() < deadline, "{error}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    #[tokio::test]
    async fn calls_on_one_filesystem_take_turns() {
        let offload = offload(4);
        let order = Arc::new(Mutex::new(Vec::new()));
        let (release, wait) = mpsc::channel::<()>();
        let first = {
            let (offload, order) = (offload.clone(), order.clone());
            tokio::spawn(async move {
                let work = move || {
                    let _ = wait.recv();
                    order.lock().unwrap().push("first");
                };
                offload
                    .run(Path::new("/d/a"), Duration::from_secs(10), work)
                    .await
            })
        };
        let second = {
            let (offload, order) = (offload.clone(), order.clone());
            tokio::spawn(async move {
                let work = move || order.lock().unwrap().push("second");
                offload
                    .run(Path::new("/d/b"), Duration::from_secs(10), work)
                    .await
            })
        };
        // Time for the second to run beside the first, if it could.
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(*order.lock().unwrap(), ["first", "second"]);
    }

    #[tokio::test]
    async fn stuck_calls_are_capped_whatever_the_number_of_filesystems() {
        let offload = offload(3);
        let mut releases = Vec::new();
        for fs in 0..3 {
            let (release, stuck) = hang();
            releases.push(release);
            let path = PathBuf::from(format!("/h{fs}/x"));
            let answer = offload.run(&path, SHORT, stuck).await;
            assert!(
                matches!(answer, Err(OffloadError::Timeout { .. })),
                "{answer:?}"
            );
        }
        let over = offload.run(Path::new("/h9/x"), SHORT, || ()).await;
        assert!(matches!(over, Err(OffloadError::Busy(3))), "{over:?}");
        drop(releases);
    }
}

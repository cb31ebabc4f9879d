//! Probes asked for by callers (a path in `ReclaimSpace`, a `disk --top`
//! walk, a job's bind source), bounded so that no flood of requests into a
//! hung filesystem can cost the agent more than a few helper processes:
//!
//! - one probe per filesystem and kind (sample or walk) at a time, the
//!   filesystem named by the path's text ([`IsolatedProbe::filesystem_of`]);
//!   a second sample waits for the first (within its own timeout), a second
//!   walk is refused as busy;
//! - a filesystem whose probe overran its deadline is answered
//!   [`DiskError::Unresponsive`] at once, without a new probe, until that
//!   probe's helper is gone (its filesystem let go of it);
//! - at most [`MAX_RUNNING`] helpers run at once and at most [`MAX_STUCK`]
//!   are stuck, whatever the number of filesystems.
//!
//! A probe's place is held by a task that outlives the caller: a caller that
//! goes away cannot free its filesystem's place while its helper is still
//! stuck. The disk guard's own probes use a [`Flights`] of their own, so
//! that callers never take their capacity.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{IsolatedProbe, PathSample, ProbeRun, WalkAnswer};
use crate::disk::DiskError;
use crate::disk::top::{TopProgress, TopReport, TopRequest};

/// Helpers that may run at once.
pub const MAX_RUNNING: usize = 4;
/// How long a walk waits for the previous walk of its filesystem to finish
/// ending (its helper reaped) before it is refused as busy.
const WALK_ENDING: Duration = Duration::from_secs(2);

/// Helpers that may be stuck (overran their deadline, not gone yet) at once.
pub const MAX_STUCK: usize = 16;
/// How much longer than its own time limit a walk may take (blocked inside
/// one call) before it is given up.
const WALK_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Sample,
    Walk,
}

/// The probe of one filesystem in flight.
struct Flight {
    started: Instant,
    deadline: Instant,
    /// Changes (closes) when the helper is gone.
    gone: watch::Receiver<()>,
}

#[derive(Default)]
struct Table {
    flights: HashMap<(Kind, PathBuf), Flight>,
}

impl Table {
    fn stuck(&self, now: Instant) -> usize {
        self.flights.values().filter(|f| now >= f.deadline).count()
    }
}

/// Bounded probes through an [`IsolatedProbe`]. Cheap to clone; clones share
/// their bounds.
#[derive(Clone)]
pub struct Flights {
    isolated: Arc<dyn IsolatedProbe>,
    table: Arc<Mutex<Table>>,
    running: Arc<Semaphore>,
}

/// A filesystem's place, held from the claim until the helper is gone;
/// dropping it frees the place and wakes those waiting for it.
struct Place {
    key: (Kind, PathBuf),
    gone: watch::Sender<()>,
    table: Arc<Mutex<Table>>,
}

impl Drop for Place {
    fn drop(&mut self) {
        lock(&self.table).flights.remove(&self.key);
        self.gone.send_replace(());
    }
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // Only whole inserts and removes happen under it.
    table.lock().unwrap_or_else(|p| p.into_inner())
}

impl Flights {
    /// Bounded probes through `isolated`.
    pub fn new(isolated: Arc<dyn IsolatedProbe>) -> Self {
        Self {
            isolated,
            table: Arc::default(),
            running: Arc::new(Semaphore::new(MAX_RUNNING)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// `stat` and `statvfs` of `path` in a helper, answered within about
    /// `timeout` (twice that when another probe of its filesystem runs):
    /// [`DiskError::Timeout`] when the probe overran, then
    /// [`DiskError::Unresponsive`] at once while it is stuck.
    pub async fn sample(&self, path: &Path, timeout: Duration) -> Result<PathSample, DiskError> {
        let filesystem = self.isolated.filesystem_of(path);
        let place = loop {
            let waiting = {
                let mut table = self.lock();
                let now = Instant::now();
                match table.flights.get(&(Kind::Sample, filesystem.clone())) {
                    None => {
                        break self.take_place(&mut table, Kind::Sample, &filesystem, timeout)?;
                    }
                    Some(flight) if now >= flight.deadline => {
                        return Err(unresponsive(path, &filesystem, now - flight.started));
                    }
                    Some(flight) => (flight.gone.clone(), flight.deadline),
                }
            };
            let (mut gone, deadline) = waiting;
            // Until it ends or overruns; then look again.
            let _ = tokio::time::timeout_at(deadline, gone.changed()).await;
        };
        let Some(permit) = self.permit(timeout).await else {
            return Err(busy_running());
        };
        let run = self
            .isolated
            .sample(vec![(path.to_owned(), false)], timeout);
        let (first_tx, first) = oneshot::channel();
        let deadline = Instant::now() + timeout;
        self.hold(
            place,
            permit,
            deadline,
            run,
            |answer, first_tx| {
                if let Some(tx) = first_tx.take() {
                    let _ = tx.send(answer.1);
                }
            },
            first_tx,
        );
        match tokio::time::timeout_at(deadline, first).await {
            Ok(Ok(Ok((sample, _)))) => Ok(sample),
            Ok(Ok(Err(source))) => Err(DiskError::Path {
                path: path.to_owned(),
                source,
            }),
            Ok(Err(_)) => Err(DiskError::Path {
                path: path.to_owned(),
                source: std::io::Error::other("the probe helper ended without an answer"),
            }),
            Err(_) => Err(DiskError::Timeout {
                path: path.to_owned(),
                timeout,
            }),
        }
    }

    /// The `disk --top` walk of `request` in a helper, progress to
    /// `progress` (dropped when it is full). Refused as busy while another
    /// walk of the same filesystem runs (one that is ending is waited for, up
    /// to [`WALK_ENDING`]); [`DiskError::Unresponsive`] at once
    /// while one is stuck. Dropping the future kills the walk.
    pub async fn walk(
        &self,
        request: TopRequest,
        progress: mpsc::Sender<TopProgress>,
    ) -> Result<TopReport, DiskError> {
        let path = request.path.clone();
        let filesystem = self.isolated.filesystem_of(&path);
        let limit = request.timeout + WALK_GRACE;
        let mut waited = false;
        let place = loop {
            let mut gone = {
                let mut table = self.lock();
                let now = Instant::now();
                match table.flights.get(&(Kind::Walk, filesystem.clone())) {
                    None => break self.take_place(&mut table, Kind::Walk, &filesystem, limit)?,
                    Some(flight) if now >= flight.deadline => {
                        return Err(unresponsive(&path, &filesystem, now - flight.started));
                    }
                    // A walk that has just answered holds the place until
                    // its helper is reaped: a walk asked right after it
                    // waits for that rather than being refused.
                    Some(flight) if !waited => flight.gone.clone(),
                    Some(_) => {
                        return Err(DiskError::Busy(format!(
                            "another `disk --top` walk of the filesystem at {} is still running; try again when it ends",
                            filesystem.display()
                        )));
                    }
                }
            };
            waited = true;
            let _ = tokio::time::timeout(WALK_ENDING, gone.changed()).await;
        };
        let Some(permit) = self.permit(Duration::ZERO).await else {
            return Err(busy_running());
        };
        let run = self.isolated.walk(request, limit);
        let kill = run.kill.clone();
        // Stops the walk when this future is dropped (the client went away).
        let _kill_on_drop = kill.drop_guard();
        let (done_tx, done) = oneshot::channel();
        let deadline = Instant::now() + limit;
        self.hold(
            place,
            permit,
            deadline,
            run,
            move |answer, done_tx| match answer {
                WalkAnswer::Progress(p) => {
                    let _ = progress.try_send(p);
                }
                WalkAnswer::Done(result) => {
                    if let Some(tx) = done_tx.take() {
                        let _ = tx.send(result);
                    }
                }
            },
            done_tx,
        );
        match tokio::time::timeout_at(deadline, done).await {
            Ok(Ok(Ok(report))) => Ok(report),
            Ok(Ok(Err(source))) => Err(DiskError::Path { path, source }),
            Ok(Err(_)) => Err(DiskError::Path {
                path,
                source: std::io::Error::other("the walk's helper ended without an answer"),
            }),
            Err(_) => Err(DiskError::Timeout {
                path,
                timeout: limit,
            }),
        }
    }

    /// Claims the place of `filesystem` for a probe of `kind` lasting at
    /// most `timeout`, unless too many helpers are stuck.
    fn take_place(
        &self,
        table: &mut Table,
        kind: Kind,
        filesystem: &Path,
        timeout: Duration,
    ) -> Result<Place, DiskError> {
        let now = Instant::now();
        let stuck = table.stuck(now);
        if stuck >= MAX_STUCK {
            return Err(DiskError::Busy(format!(
                "{stuck} probes are stuck on hung filesystems (the limit); try again when they end"
            )));
        }
        let (gone, gone_rx) = watch::channel(());
        let key = (kind, filesystem.to_owned());
        table.flights.insert(
            key.clone(),
            Flight {
                started: now,
                deadline: now + timeout,
                gone: gone_rx,
            },
        );
        Ok(Place {
            key,
            gone,
            table: self.table.clone(),
        })
    }

    /// One of the [`MAX_RUNNING`] places to run, waiting up to `wait`.
    async fn permit(&self, wait: Duration) -> Option<OwnedSemaphorePermit> {
        match self.running.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => tokio::time::timeout(wait, self.running.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok),
        }
    }

    /// Holds `place` and `permit` in a task of their own until the helper of
    /// `run` is gone (the permit only until `deadline`), handing each answer
    /// to `on_answer` with `state`.
    fn hold<T: Send + 'static, S: Send + 'static>(
        &self,
        place: Place,
        permit: OwnedSemaphorePermit,
        deadline: Instant,
        run: ProbeRun<T>,
        mut on_answer: impl FnMut(T, &mut Option<S>) + Send + 'static,
        state: S,
    ) {
        let ProbeRun { mut answers, kill } = run;
        tokio::spawn(async move {
            let mut state = Some(state);
            let mut permit = Some(permit);
            loop {
                tokio::select! {
                    answer = answers.recv() => match answer {
                        Some(answer) => on_answer(answer, &mut state),
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline), if permit.is_some() => {
                        // Stuck: it no longer counts as running.
                        permit = None;
                        kill.cancel();
                    }
                }
            }
            drop(permit);
            drop(place);
        });
    }
}

fn unresponsive(path: &Path, filesystem: &Path, stuck_for: Duration) -> DiskError {
    DiskError::Unresponsive {
        path: path.to_owned(),
        filesystem: filesystem.to_owned(),
        stuck_for,
    }
}

fn busy_running() -> DiskError {
    DiskError::Busy(format!(
        "{MAX_RUNNING} probes of callers' paths are running (the limit); try again"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::FsStats;
    use crate::disk::fake::FakeProbe;
    use crate::disk::probe::SampleAnswer;

    const TIMEOUT: Duration = Duration::from_millis(200);

    fn stats() -> FsStats {
        FsStats {
            total_bytes: 100,
            free_bytes: 50,
            total_inodes: 10,
            free_inodes: 5,
        }
    }

    /// `/` answers; `/hung` (holding `/hung/x`) never does until released.
    fn world() -> FakeProbe {
        let probe = FakeProbe::new();
        probe.add_fs(1, "/", stats());
        probe.add_fs(2, "/hung", stats());
        probe.add_path("/hung/x", 2);
        probe.hang(2);
        probe
    }

    /// Waits until `path` can be sampled again (its stuck probe is gone).
    async fn answers_again(flights: &Flights, path: &str) -> PathSample {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match flights.sample(Path::new(path), TIMEOUT).await {
                Ok(sample) => return sample,
                Err(error) if Instant::now() < deadline => {
                    tracing::debug!(%error, "not yet");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => panic!("{path} never answered again: {error}"),
            }
        }
    }

    #[tokio::test]
    async fn a_flood_into_a_hung_filesystem_costs_one_probe_and_is_answered_at_once() {
        let probe = world();
        let flights = Flights::new(Arc::new(probe.clone()));
        let started = Instant::now();
        let flood: Vec<_> = (0..100)
            .map(|_| {
                let flights = flights.clone();
                tokio::spawn(async move { flights.sample(Path::new("/hung/x"), TIMEOUT).await })
            })
            .collect();
        let (mut timed_out, mut unresponsive) = (0, 0);
        for answer in flood {
            match answer.await.unwrap() {
                Err(DiskError::Timeout { .. }) => timed_out += 1,
                Err(DiskError::Unresponsive { filesystem, .. }) => {
                    assert_eq!(filesystem, Path::new("/hung"));
                    unresponsive += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((timed_out, unresponsive), (1, 99));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(probe.calls("/hung/x"), 1, "one probe for the flood");
        assert_eq!(probe.blocked(), 1);
        // Later ones: at once, without a probe.
        let at_once = Instant::now();
        let later = flights.sample(Path::new("/hung/x"), TIMEOUT).await;
        assert!(matches!(later, Err(DiskError::Unresponsive { .. })));
        assert!(at_once.elapsed() < TIMEOUT);
        // Other filesystems are not held up.
        assert_eq!(
            flights.sample(Path::new("/"), TIMEOUT).await.unwrap().dev,
            1
        );
        // Once the stuck probe is gone, the filesystem is probed again.
        probe.release(2);
        assert_eq!(answers_again(&flights, "/hung/x").await.dev, 2);
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_does_not_free_its_filesystems_place() {
        let probe = world();
        let flights = Flights::new(Arc::new(probe.clone()));
        let gave_up = tokio::time::timeout(
            Duration::from_millis(20),
            flights.sample(Path::new("/hung/x"), TIMEOUT),
        )
        .await;
        assert!(gave_up.is_err());
        let next = flights.sample(Path::new("/hung/x"), TIMEOUT).await;
        assert!(
            matches!(next, Err(DiskError::Unresponsive { .. })),
            "{next:?}"
        );
        assert_eq!(probe.calls("/hung/x"), 1);
        probe.release(2);
        answers_again(&flights, "/hung/x").await;
    }

    #[tokio::test]
    async fn stuck_probes_are_capped_whatever_the_number_of_filesystems() {
        let probe = FakeProbe::new();
        probe.add_fs(1, "/", stats());
        for dev in 0..=MAX_STUCK as u64 {
            probe.add_fs(10 + dev, &format!("/h{dev}"), stats());
            probe.hang(10 + dev);
        }
        let flights = Flights::new(Arc::new(probe.clone()));
        let short = Duration::from_millis(20);
        for dev in 0..MAX_STUCK {
            let answer = flights.sample(Path::new(&format!("/h{dev}")), short).await;
            assert!(
                matches!(answer, Err(DiskError::Timeout { .. })),
                "{answer:?}"
            );
        }
        let over = flights
            .sample(Path::new(&format!("/h{MAX_STUCK}")), short)
            .await;
        assert!(
            matches!(&over, Err(DiskError::Busy(m)) if m.contains("stuck")),
            "{over:?}"
        );
        assert_eq!(probe.blocked(), MAX_STUCK as u32);
        for dev in 0..=MAX_STUCK as u64 {
            probe.release(10 + dev);
        }
        answers_again(&flights, "/").await;
    }

    /// A walk whose helper answers at once but is reaped `linger` later.
    struct Lingering {
        linger: Duration,
    }

    impl IsolatedProbe for Lingering {
        fn sample(&self, _: Vec<(PathBuf, bool)>, _: Duration) -> ProbeRun<SampleAnswer> {
            unreachable!("walks only")
        }

        fn walk(&self, request: TopRequest, _: Duration) -> ProbeRun<WalkAnswer> {
            let (tx, answers) = tokio::sync::mpsc::unbounded_channel();
            let linger = self.linger;
            tokio::spawn(async move {
                let report = TopReport {
                    path: request.path,
                    total_bytes: 0,
                    entries: 0,
                    unreadable: 0,
                    directories: Vec::new(),
                    stopped: None,
                    elapsed: Duration::ZERO,
                };
                let _ = tx.send(WalkAnswer::Done(Ok(report)));
                tokio::time::sleep(linger).await;
            });
            ProbeRun {
                answers,
                kill: tokio_util::sync::CancellationToken::new(),
            }
        }

        fn filesystem_of(&self, _: &Path) -> PathBuf {
            PathBuf::from("/")
        }
    }

    fn walk_of(path: &str) -> TopRequest {
        TopRequest {
            path: PathBuf::from(path),
            limit: 3,
            timeout: Duration::from_secs(5),
            max_entries: 10,
            as_uid: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_walk_asked_as_the_previous_one_ends_waits_for_it_instead_of_being_refused() {
        let flights = Flights::new(Arc::new(Lingering {
            linger: WALK_ENDING / 2,
        }));
        let (tx, _rx) = mpsc::channel(8);
        flights.walk(walk_of("/a"), tx.clone()).await.unwrap();
        // The first helper still holds the place; the second walk waits.
        let second = flights.walk(walk_of("/b"), tx.clone()).await;
        assert_eq!(second.unwrap().path, Path::new("/b"));

        // One that does not end in time is refused as busy, not waited for.
        let flights = Flights::new(Arc::new(Lingering {
            linger: WALK_ENDING * 2,
        }));
        flights.walk(walk_of("/a"), tx.clone()).await.unwrap();
        let third = flights.walk(walk_of("/b"), tx).await;
        assert!(
            matches!(&third, Err(DiskError::Busy(m)) if m.contains("still running")),
            "{third:?}"
        );
    }
}

//! When and for what the disk guard reclaims, and a reclaim from start to
//! event: the filesystems a reclaim is for ([`ReclaimTarget`],
//! [`wants_space`]), one automatic reclaim at a time with the others queued
//! ([`ReclaimQueue`]), and [`ReclaimDriver`], which runs a reclaim to its end
//! in a task of its own, measures its targets' shortfall before each step
//! (in the agent for its own well-known filesystems, in a probe helper for
//! the others: [`ReclaimTarget::isolated`]), logs it and publishes it on the
//! event log.
//!
//! Knows nothing of the guard's state: the guard hands it targets and asks
//! the queue whether to start.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::run::{
    ReclaimFinished, ReclaimMode, ReclaimReport, ReclaimRequest, ReclaimTrigger, Reclaimer,
    Relevance,
};
use super::steps::ReclaimStep;
use crate::disk::probe::flights::Flights;
use crate::disk::probe::{FsProbe, PathSample, sample_within};
use crate::disk::{DiskError, DiskState, FsStats, Thresholds};
use crate::events::{EventBus, EventPayload};
use crate::units::bytes;

/// A filesystem a reclaim is for: a path on it and the levels that apply.
#[derive(Debug, Clone, PartialEq)]
pub struct ReclaimTarget {
    /// A path on the filesystem.
    pub path: PathBuf,
    /// Its levels (what the reclaim must get it back above).
    pub thresholds: Thresholds,
    /// Whether the path is one that users or remote storage control, so
    /// that it is measured in a probe helper rather than in the agent.
    pub isolated: bool,
}

impl ReclaimTarget {
    /// Measures the target: through `flights` when it is isolated, else in
    /// the agent through `probe`; bounded by `timeout` either way.
    pub async fn sample(
        &self,
        probe: &Arc<dyn FsProbe>,
        flights: &Flights,
        timeout: Duration,
    ) -> Result<PathSample, DiskError> {
        if self.isolated {
            flights.sample(&self.path, timeout).await
        } else {
            sample_within(probe, &self.path, timeout).await
        }
    }
}

/// Whether a reclaim for every filesystem should target one in `state` with
/// `stats`: it answers, and is below its floor plus the margin (in bytes or
/// inodes).
pub fn wants_space(state: DiskState, stats: Option<FsStats>, thresholds: &Thresholds) -> bool {
    state != DiskState::Unresponsive && stats.is_some_and(|s| thresholds.reclaim_shortfall(&s) > 0)
}

/// Automatic reclaims, one at a time (the steps are shared): filesystems that
/// turn critical while one runs wait their turn, the longest waiting first.
/// `K` names a filesystem.
#[derive(Debug)]
pub struct ReclaimQueue<K> {
    running: bool,
    /// Newest first.
    waiting: Vec<K>,
}

impl<K> Default for ReclaimQueue<K> {
    fn default() -> Self {
        Self {
            running: false,
            waiting: Vec::new(),
        }
    }
}

impl<K: PartialEq> ReclaimQueue<K> {
    /// Asks for a reclaim of filesystem `key` through `path` (a path on it;
    /// `None` when it has none). Returns the path when the reclaim may start
    /// now: the caller starts it and calls [`ReclaimQueue::finished`] when
    /// it ends. Otherwise `key` waits for the running one.
    pub fn request(&mut self, key: K, path: Option<PathBuf>) -> Option<PathBuf> {
        if self.running {
            if !self.waiting.contains(&key) {
                self.waiting.insert(0, key);
            }
            return None;
        }
        let path = path?;
        self.running = true;
        Some(path)
    }

    /// The running reclaim ended. Returns the longest-waiting filesystem
    /// that `still_critical` says still needs its own, for the caller to
    /// request; those that recovered meanwhile leave the queue.
    pub fn finished(&mut self, still_critical: impl Fn(&K) -> bool) -> Option<K> {
        self.running = false;
        while let Some(key) = self.waiting.pop() {
            if still_critical(&key) {
                return Some(key);
            }
        }
        None
    }
}

/// Runs reclaims for the guard. Cheap to clone.
#[derive(Clone)]
pub struct ReclaimDriver {
    reclaimer: Arc<Reclaimer>,
    probe: Arc<dyn FsProbe>,
    events: EventBus,
}

impl ReclaimDriver {
    /// A driver for `steps` (run in this order), measuring through `probe`
    /// and publishing on `events`.
    pub fn new(
        steps: Vec<Arc<dyn ReclaimStep>>,
        probe: Arc<dyn FsProbe>,
        events: EventBus,
    ) -> Self {
        Self {
            reclaimer: Arc::new(Reclaimer::new(steps)),
            probe,
            events,
        }
    }

    /// The names of the steps, in the order they run.
    pub fn step_names(&self) -> Vec<&'static str> {
        self.reclaimer.step_names()
    }

    /// Reclaims space for `targets` (or, in a dry run, says what would be
    /// reclaimed); `timeout` bounds each probe of a target, and isolated
    /// targets are probed through `flights`. A reclaim that
    /// is not a dry run is published on the event log
    /// ([`EventPayload::Reclaim`]), so that the control plane and the metrics
    /// see automatic reclaims as well as requested ones. Once started it runs
    /// to its end in a task of its own, even if the caller goes away, so that
    /// what it deleted is always reported.
    pub async fn reclaim(
        &self,
        targets: Vec<ReclaimTarget>,
        request: ReclaimRequest,
        timeout: Duration,
        flights: Flights,
    ) -> Result<ReclaimReport, DiskError> {
        let driver = self.clone();
        let task = tokio::spawn(async move {
            driver
                .run_and_report(targets, request, timeout, flights)
                .await
        });
        match task.await {
            Ok(report) => Ok(report),
            // A bug in a step surfaces where it would have without the task.
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Otherwise only a runtime shutting down cancels the task.
            Err(_) => Err(DiskError::Stopped),
        }
    }

    async fn run_and_report(
        &self,
        targets: Vec<ReclaimTarget>,
        request: ReclaimRequest,
        timeout: Duration,
        flights: Flights,
    ) -> ReclaimReport {
        let paths: Vec<PathBuf> = targets.iter().map(|t| t.path.clone()).collect();
        let report = self
            .run(targets, request.mode, request.trigger, timeout, flights)
            .await;
        tracing::info!(
            trigger = request.trigger.name(),
            dry_run = report.dry_run,
            total = %bytes(report.total_bytes),
            steps = ?report.steps.iter().map(|s| (s.name, s.ran, s.freed.bytes)).collect::<Vec<_>>(),
            "reclaim finished"
        );
        if !report.dry_run {
            self.events
                .publish(EventPayload::Reclaim(Box::new(ReclaimFinished {
                    trigger: request.trigger,
                    targets: paths,
                    report: report.clone(),
                })));
        }
        report
    }

    async fn run(
        &self,
        targets: Vec<ReclaimTarget>,
        mode: ReclaimMode,
        trigger: ReclaimTrigger,
        timeout: Duration,
        flights: Flights,
    ) -> ReclaimReport {
        let probe = self.probe.clone();
        let mut devs = BTreeSet::new();
        for target in &targets {
            if let Ok(sample) = target.sample(&probe, &flights, timeout).await {
                devs.insert(sample.dev);
            }
        }
        let relevance = OnTargets {
            probe: probe.clone(),
            timeout,
            devs,
        };
        let targets = Arc::new(targets);
        self.reclaimer
            .run(
                mode,
                trigger,
                move || {
                    let probe = probe.clone();
                    let targets = targets.clone();
                    let flights = flights.clone();
                    async move {
                        let mut need = 0;
                        for target in targets.iter() {
                            // A target that does not answer cannot be helped
                            // by deleting elsewhere: it needs nothing.
                            if let Ok(sample) = target.sample(&probe, &flights, timeout).await {
                                need = need.max(target.thresholds.reclaim_shortfall(&sample.stats));
                            }
                        }
                        need
                    }
                },
                relevance,
            )
            .await
    }
}

/// A step helps when its location is on one of the target filesystems (or
/// cannot be examined: then it runs, rather than be skipped on a guess).
struct OnTargets {
    probe: Arc<dyn FsProbe>,
    timeout: Duration,
    devs: BTreeSet<u64>,
}

impl Relevance for OnTargets {
    async fn helps(&mut self, location: PathBuf) -> bool {
        // A location that does not exist yet (an empty cache root, say) will
        // live on the filesystem of its nearest existing ancestor.
        let mut path = location.as_path();
        loop {
            match sample_within(&self.probe, path, self.timeout).await {
                Ok(sample) => return self.devs.contains(&sample.dev),
                Err(_) => {
                    // Bounded like the probe: a hung filesystem must not
                    // hold the reclaim (and every later one) forever.
                    let exists =
                        tokio::time::timeout(self.timeout, tokio::fs::try_exists(path)).await;
                    let missing = matches!(exists, Ok(Ok(false)));
                    match path.parent() {
                        Some(parent) if missing => path = parent,
                        _ => return true,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_automatic_reclaim_at_a_time_the_longest_waiting_next() {
        let mut queue = ReclaimQueue::default();
        assert_eq!(queue.request(1, Some("/a".into())), Some("/a".into()));
        // Running: the others wait, each once.
        assert_eq!(queue.request(2, Some("/b".into())), None);
        assert_eq!(queue.request(3, Some("/c".into())), None);
        assert_eq!(queue.request(2, Some("/b".into())), None);
        // 2 recovered meanwhile: 3 is next.
        assert_eq!(queue.finished(|k| *k != 2), Some(3));
        assert_eq!(queue.request(3, Some("/c".into())), Some("/c".into()));
        assert_eq!(queue.finished(|_| true), None);
        // A filesystem without a path cannot start one.
        assert_eq!(queue.request(4, None), None);
        assert_eq!(queue.request(5, Some("/e".into())), Some("/e".into()));
    }
}

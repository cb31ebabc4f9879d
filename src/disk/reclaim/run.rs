//! Running the registered steps in order ([`Reclaimer`]): one reclaim that
//! deletes at a time, the automatic one first (see [`super::turns`]), a
//! few dry runs beside them (they delete nothing and never hold up a
//! reclaim that does), measuring before each step what the target filesystems still lack
//! and stopping as soon as they are back above the floor plus the margin; a
//! dry run estimates instead and subtracts. A step that fails is reported
//! and the next one still runs; the result is a per-step [`ReclaimReport`].

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use super::steps::{Freed, ReclaimError, ReclaimStep};
use super::turns::Turns;

/// Dry runs at once; more wait for one of them to end.
const DRY_RUNS_AT_ONCE: usize = 2;

/// Whether a step's location is on a filesystem that needs space.
pub trait Relevance {
    /// True when freeing space at `location` helps.
    fn helps(&mut self, location: PathBuf) -> impl Future<Output = bool> + Send;
}

/// What one step did in a reclaim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// The step's name.
    pub name: &'static str,
    /// Freed (or, in a dry run, would free).
    pub freed: Freed,
    /// False when skipped (see `skipped`).
    pub ran: bool,
    /// Why it was skipped: enough space free, or it frees space on a
    /// filesystem that is not short of it.
    pub skipped: Option<String>,
    /// Set when it failed.
    pub error: Option<String>,
}

/// The result of one reclaim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Whether nothing was deleted.
    pub dry_run: bool,
    /// The steps in order.
    pub steps: Vec<StepReport>,
    /// Sum of the steps' bytes.
    pub total_bytes: u64,
}

/// How a reclaim should run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReclaimMode {
    /// Estimate only.
    pub dry_run: bool,
    /// Run every step even when enough space is free.
    pub all_steps: bool,
}

/// Runs the registered steps in order.
pub struct Reclaimer {
    steps: Vec<Arc<dyn ReclaimStep>>,
    turns: Turns,
    dry_runs: tokio::sync::Semaphore,
}

impl Reclaimer {
    /// A reclaimer with these steps, run in this order.
    pub fn new(steps: Vec<Arc<dyn ReclaimStep>>) -> Self {
        Self {
            steps,
            turns: Turns::default(),
            dry_runs: tokio::sync::Semaphore::new(DRY_RUNS_AT_ONCE),
        }
    }

    /// The step names in order.
    pub fn step_names(&self) -> Vec<&'static str> {
        self.steps.iter().map(|s| s.name()).collect()
    }

    /// Runs the steps. `still_needed` measures, before each step, how many
    /// bytes the target filesystems still lack to be above the floor plus
    /// the margin (0: enough). A dry run measures once and subtracts the
    /// estimates instead. Unless `all_steps`, a step whose location does not
    /// help (`relevance`) is skipped. A reclaim that deletes waits for its
    /// turn, `trigger` [`ReclaimTrigger::Automatic`] first, and a requested
    /// one gives its turn up between steps while an automatic one waits.
    pub async fn run<F, Fut>(
        &self,
        mode: ReclaimMode,
        trigger: ReclaimTrigger,
        mut still_needed: F,
        mut relevance: impl Relevance,
    ) -> ReclaimReport
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = u64>,
    {
        let automatic = trigger == ReclaimTrigger::Automatic;
        // A dry run deletes nothing: it takes no turn. The semaphore is never
        // closed, so acquiring fails only if it were.
        let _dry_run = match mode.dry_run {
            true => self.dry_runs.acquire().await.ok(),
            false => None,
        };
        // One reclaim that deletes at a time: the next one measures what the
        // one before left to do.
        let mut turn = match mode.dry_run {
            true => None,
            false => Some(self.turns.take(automatic).await),
        };
        let mut steps = Vec::with_capacity(self.steps.len());
        let mut simulated_need = if mode.dry_run {
            Some(still_needed().await)
        } else {
            None
        };
        for step in &self.steps {
            if !automatic && turn.is_some() && self.turns.automatic_waiting() {
                // Its turn first; this one goes on with what is left after.
                drop(turn.take());
                turn = Some(self.turns.take(false).await);
            }
            let need = match simulated_need {
                Some(need) => need,
                None => still_needed().await,
            };
            let skipped = if mode.all_steps {
                None
            } else if need == 0 {
                Some("enough space is free".to_owned())
            } else {
                match step.location().await {
                    Some(location) if !relevance.helps(location.clone()).await => Some(format!(
                        "it frees space on the filesystem of {}, which is not short of space",
                        location.display()
                    )),
                    _ => None,
                }
            };
            if skipped.is_some() {
                steps.push(StepReport {
                    name: step.name(),
                    freed: Freed::default(),
                    ran: false,
                    skipped,
                    error: None,
                });
                continue;
            }
            let result = if mode.dry_run {
                step.estimate().await
            } else {
                step.run().await
            };
            let (freed, error) = match result {
                Ok(freed) => (freed, None),
                Err(ReclaimError::Partial {
                    freed,
                    failed,
                    first,
                }) => {
                    let error = format!("{failed} item(s) could not be removed: {first}");
                    (freed, Some(error))
                }
                Err(e) => (Freed::default(), Some(e.to_string())),
            };
            if let Some(error) = &error {
                tracing::warn!(step = step.name(), %error, "reclaim step failed; going on with the next");
            }
            if let Some(need) = simulated_need.as_mut() {
                *need = need.saturating_sub(freed.bytes);
            }
            steps.push(StepReport {
                name: step.name(),
                freed,
                ran: true,
                skipped: None,
                error,
            });
        }
        ReclaimReport {
            dry_run: mode.dry_run,
            total_bytes: steps.iter().map(|s| s.freed.bytes).sum(),
            steps,
        }
    }
}

/// What started a reclaim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReclaimTrigger {
    /// A `ReclaimSpace` call.
    Api,
    /// The disk guard, when a watched filesystem turned critical
    /// (`disk.auto_reclaim`).
    Automatic,
}

impl ReclaimTrigger {
    /// Lowercase name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            ReclaimTrigger::Api => "api",
            ReclaimTrigger::Automatic => "automatic",
        }
    }
}

/// A reclaim that was not a dry run, as published on the event log: what
/// deleted what, whichever way it was started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReclaimFinished {
    /// What started it.
    pub trigger: ReclaimTrigger,
    /// The paths whose filesystems it reclaimed for (empty when it was asked
    /// for every filesystem and none was short of space).
    pub targets: Vec<PathBuf>,
    /// What each step did.
    pub report: ReclaimReport,
}

/// What a reclaim is asked to do (by `ReclaimSpace` or the guard itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReclaimRequest {
    /// A path on the filesystem to reclaim for; every watched filesystem
    /// below its floor plus margin when `None`.
    pub path: Option<PathBuf>,
    /// Dry run and all steps.
    pub mode: ReclaimMode,
    /// Who asked, for the event and the metrics.
    pub trigger: ReclaimTrigger,
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::disk::fake::FakeStep;

    /// Locations under /full help; others do not.
    struct OnlyFull;

    impl Relevance for OnlyFull {
        async fn helps(&mut self, location: PathBuf) -> bool {
            location.starts_with("/full")
        }
    }

    fn reclaimer(steps: &[Arc<FakeStep>]) -> Reclaimer {
        Reclaimer::new(
            steps
                .iter()
                .map(|s| s.clone() as Arc<dyn ReclaimStep>)
                .collect(),
        )
    }

    #[tokio::test]
    async fn stops_once_enough_is_free() {
        let need = Arc::new(AtomicU64::new(150));
        let mut a = FakeStep::freeing("a", 100);
        let mut b = FakeStep::freeing("b", 100);
        for step in [&mut a, &mut b] {
            let need = need.clone();
            let bytes = 100;
            step.on_run = Box::new(move || {
                let _ = need.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    Some(n.saturating_sub(bytes))
                });
            });
        }
        let steps = [
            Arc::new(a),
            Arc::new(b),
            Arc::new(FakeStep::freeing("c", 100)),
        ];
        let r = reclaimer(&steps);
        let report = r
            .run(
                ReclaimMode::default(),
                ReclaimTrigger::Api,
                || {
                    let need = need.clone();
                    async move { need.load(Ordering::SeqCst) }
                },
                OnlyFull,
            )
            .await;
        let ran: Vec<bool> = report.steps.iter().map(|s| s.ran).collect();
        assert_eq!(ran, [true, true, false]);
        assert_eq!(report.total_bytes, 200);
        assert_eq!(steps[2].calls(), (0, 0), "third step never touched");
    }

    #[tokio::test]
    async fn a_failing_step_does_not_stop_the_others() {
        let steps = [
            Arc::new(FakeStep::failing("broken")),
            Arc::new(FakeStep::freeing("ok", 10)),
        ];
        let report = reclaimer(&steps)
            .run(
                ReclaimMode::default(),
                ReclaimTrigger::Api,
                || async { 1_000 },
                OnlyFull,
            )
            .await;
        assert_eq!(report.steps[0].error.as_deref(), Some("broken broke"));
        assert!(report.steps[0].ran);
        assert_eq!(report.steps[1].freed.bytes, 10);
        assert_eq!(report.steps[1].error, None);
    }

    #[tokio::test]
    async fn dry_run_estimates_without_running() {
        let steps = [
            Arc::new(FakeStep::freeing("a", 100)),
            Arc::new(FakeStep::freeing("b", 100)),
            Arc::new(FakeStep::freeing("c", 100)),
        ];
        let measured = Arc::new(Mutex::new(0));
        let count = measured.clone();
        let report = reclaimer(&steps)
            .run(
                ReclaimMode {
                    dry_run: true,
                    all_steps: false,
                },
                ReclaimTrigger::Api,
                move || {
                    *count.lock().unwrap() += 1;
                    async { 150 }
                },
                OnlyFull,
            )
            .await;
        assert!(report.dry_run);
        let ran: Vec<bool> = report.steps.iter().map(|s| s.ran).collect();
        assert_eq!(ran, [true, true, false], "two estimates cover the need");
        assert!(steps.iter().all(|s| s.calls().1 == 0), "nothing ran");
        assert_eq!(*measured.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn all_steps_runs_even_when_nothing_is_needed() {
        let steps = [
            Arc::new(FakeStep::freeing("a", 1)),
            Arc::new(FakeStep::freeing("b", 1)),
        ];
        let report = reclaimer(&steps)
            .run(
                ReclaimMode {
                    dry_run: false,
                    all_steps: true,
                },
                ReclaimTrigger::Api,
                || async { 0 },
                OnlyFull,
            )
            .await;
        assert!(report.steps.iter().all(|s| s.ran));
        let skipped = reclaimer(&steps)
            .run(
                ReclaimMode::default(),
                ReclaimTrigger::Api,
                || async { 0 },
                OnlyFull,
            )
            .await;
        assert!(skipped.steps.iter().all(|s| !s.ran));
        assert_eq!(
            skipped.steps[0].skipped.as_deref(),
            Some("enough space is free")
        );
    }

    #[tokio::test]
    async fn steps_for_another_filesystem_are_skipped() {
        let mut elsewhere = FakeStep::freeing("elsewhere", 100);
        elsewhere.location = Some("/var/lib/docker".into());
        let mut here = FakeStep::freeing("here", 100);
        here.location = Some("/full/cache".into());
        let steps = [Arc::new(elsewhere), Arc::new(here)];
        let report = reclaimer(&steps)
            .run(
                ReclaimMode::default(),
                ReclaimTrigger::Api,
                || async { 1_000 },
                OnlyFull,
            )
            .await;
        assert!(!report.steps[0].ran);
        assert!(
            report.steps[0]
                .skipped
                .as_deref()
                .unwrap()
                .contains("/var/lib/docker")
        );
        assert_eq!(steps[0].calls(), (0, 0));
        assert!(report.steps[1].ran);
    }

    fn slow_steps(names: &[&'static str]) -> Vec<Arc<FakeStep>> {
        names
            .iter()
            .map(|name| {
                let mut step = FakeStep::freeing(name, 10);
                step.delay = Duration::from_secs(10);
                Arc::new(step)
            })
            .collect()
    }

    const ALL: ReclaimMode = ReclaimMode {
        dry_run: false,
        all_steps: true,
    };

    #[tokio::test(start_paused = true)]
    async fn the_automatic_reclaim_never_waits_behind_dry_runs() {
        let steps = slow_steps(&["slow"]);
        let r = Arc::new(reclaimer(&steps));
        let start = Instant::now();
        let dry_runs: Vec<_> = (0..10)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move {
                    let mode = ReclaimMode {
                        dry_run: true,
                        ..ALL
                    };
                    r.run(mode, ReclaimTrigger::Api, || async { 1_000 }, OnlyFull)
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let report = r
            .run(ALL, ReclaimTrigger::Automatic, || async { 1_000 }, OnlyFull)
            .await;
        assert!(report.steps[0].ran && !report.dry_run);
        // Its own step and nothing else, although ten dry runs were queued.
        assert!(
            start.elapsed() < Duration::from_secs(11),
            "{:?}",
            start.elapsed()
        );
        for dry_run in dry_runs {
            assert!(dry_run.await.unwrap().dry_run);
        }
        // Two at a time.
        assert!(start.elapsed() >= Duration::from_secs(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_requested_reclaim_gives_its_turn_to_the_automatic_one_between_steps() {
        let steps = slow_steps(&["a", "b", "c"]);
        let r = Arc::new(reclaimer(&steps));
        let start = Instant::now();
        let requested = {
            let r = r.clone();
            tokio::spawn(async move {
                r.run(ALL, ReclaimTrigger::Api, || async { 1_000 }, OnlyFull)
                    .await;
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        r.run(ALL, ReclaimTrigger::Automatic, || async { 1_000 }, OnlyFull)
            .await;
        // The requested reclaim's first step (10 s), then its own three.
        let automatic_done = start.elapsed();
        assert!(
            automatic_done < Duration::from_secs(41),
            "{automatic_done:?}"
        );
        let requested_done = requested.await.unwrap();
        assert!(
            requested_done >= Duration::from_secs(60),
            "{requested_done:?}"
        );
        assert!(steps.iter().all(|s| s.calls().1 == 2), "each ran twice");
    }
}

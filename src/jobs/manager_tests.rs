//! Unit tests of the job manager against the fake engine.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::host::Gpu;
use crate::jobs::engine::ContainerSpec;
use crate::jobs::fake_engine::FakeEngine;
use crate::jobs::spec::JobMount;

struct Harness {
    manager: JobManager,
    engine: Arc<FakeEngine>,
    store: Store,
    admission: AdmissionGate,
    engine_up: watch::Sender<bool>,
    config: watch::Sender<JobsConfig>,
    gpus: watch::Sender<Vec<Gpu>>,
    gpus_discovered: watch::Sender<bool>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    _dir: tempfile::TempDir,
    dir_path: PathBuf,
}

fn config(slots: u32) -> JobsConfig {
    JobsConfig {
        slots,
        kill_grace_seconds: 1,
        ..JobsConfig::default()
    }
}

impl Harness {
    fn new(slots: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        Self::with(dir, store, Arc::new(FakeEngine::new()), config(slots))
    }

    fn with(
        dir: tempfile::TempDir,
        store: Store,
        engine: Arc<FakeEngine>,
        config: JobsConfig,
    ) -> Self {
        Self::with_mounts(dir, store, engine, config, Arc::new(NoManagedMounts))
    }

    fn with_mounts(
        dir: tempfile::TempDir,
        store: Store,
        engine: Arc<FakeEngine>,
        config: JobsConfig,
        mounts: Arc<dyn MountResolver>,
    ) -> Self {
        let (engine_up, engine_up_rx) = watch::channel(!engine.is_down());
        let (config_tx, config_rx) = watch::channel(config);
        let (gpus_tx, gpus_rx) = watch::channel(Vec::new());
        let (gpus_discovered_tx, gpus_discovered_rx) = watch::channel(true);
        let admission = AdmissionGate::new();
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let dir_path = dir.path().to_owned();
        let manager = JobManager::start(
            JobsDeps {
                engine: engine.clone(),
                store: store.clone(),
                events: EventBus::new(1024),
                admission: admission.clone(),
                mounts,
                logs_dir: dir.path().join("logs"),
                instance_id: "inst".into(),
                usable_cores: 2.0,
                memory_bytes: 8 << 30,
                gpus: gpus_rx,
                gpus_discovered: gpus_discovered_rx,
                engine_up: engine_up_rx,
                config: config_rx,
            },
            shutdown.clone(),
            tasks.clone(),
        )
        .unwrap();
        Self {
            manager,
            engine,
            store,
            admission,
            engine_up,
            config: config_tx,
            gpus: gpus_tx,
            gpus_discovered: gpus_discovered_tx,
            shutdown,
            tasks,
            _dir: dir,
            dir_path,
        }
    }

    /// Simulates an agent crash: stops every task without recording anything
    /// and reopens the same store with a new manager.
    async fn restart(self) -> Self {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let Harness {
            engine,
            store,
            _dir,
            config,
            manager,
            ..
        } = self;
        let config = config.borrow().clone();
        drop(manager);
        drop(store);
        let store = Store::open(_dir.path()).unwrap();
        Self::with(_dir, store, engine, config)
    }

    async fn submit(&self, id: &str) -> JobRecord {
        self.manager.submit(spec(id)).await.unwrap()
    }

    fn state(&self, id: &str) -> JobState {
        self.manager.get(id).unwrap().record.state
    }

    async fn wait_for(&self, what: &str, check: impl Fn(&Self) -> bool) {
        // Generous: the machine may be busy; a pass is usually a few ms.
        for _ in 0..3000 {
            if check(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "timed out waiting for {what}; calls: {:?}",
            self.engine.calls()
        );
    }

    fn container_of(&self, id: &str) -> String {
        self.manager.get(id).unwrap().record.container_id
    }
}

fn spec(id: &str) -> JobSpec {
    JobSpec {
        id: id.into(),
        image: "busybox".into(),
        command: vec!["true".into()],
        ..JobSpec::default()
    }
}

#[tokio::test]
async fn never_more_running_than_capacity() {
    let h = Harness::new(2);
    for i in 0..6 {
        h.submit(&format!("j{i}")).await;
    }
    h.wait_for("two running", |h| h.engine.running().len() == 2)
        .await;
    assert_eq!(h.manager.slot_usage().queued, 4);
    for _ in 0..3 {
        for c in h.engine.running() {
            assert!(h.engine.running().len() <= 2);
            h.engine.exit(&c, 0, false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(h.engine.running().len() <= 2);
    }
    h.wait_for("all succeeded", |h| {
        (0..6).all(|i| h.state(&format!("j{i}")) == JobState::Succeeded)
    })
    .await;
    h.wait_for("containers removed", |h| h.engine.existing().is_empty())
        .await;
    assert_eq!(h.manager.slot_usage().in_use, 0);
}

#[tokio::test]
async fn priority_then_fifo() {
    let h = Harness::new(1);
    h.admission.hold("test", "hold");
    h.submit("low1").await;
    let mut high = spec("high");
    high.priority = 5;
    h.manager.submit(high).await.unwrap();
    h.submit("low2").await;
    let queued: Vec<(String, Option<u32>)> = ["low1", "high", "low2"]
        .iter()
        .map(|id| (id.to_string(), h.manager.get(id).unwrap().queue_position))
        .collect();
    assert_eq!(queued[1].1, Some(0));
    assert_eq!(queued[0].1, Some(1));
    assert_eq!(queued[2].1, Some(2));
    h.admission.release("test");
    h.wait_for("high runs first", |h| h.state("high") == JobState::Running)
        .await;
    assert_eq!(h.state("low1"), JobState::Queued);
}

#[tokio::test]
async fn submit_is_idempotent_on_id() {
    let h = Harness::new(1);
    let a = h.submit("same").await;
    let b = h.submit("same").await;
    assert_eq!(a.seq, b.seq);
    let mut other = spec("same");
    other.command = vec!["false".into()];
    assert!(matches!(
        h.manager.submit(other).await,
        Err(JobError::IdConflict(_))
    ));
}

#[tokio::test]
async fn queue_full_is_refused() {
    let h = Harness::new(1);
    h.admission.hold("test", "hold");
    let mut c = config(1);
    c.max_queue = 2;
    h.config.send_replace(c);
    h.submit("a").await;
    h.submit("b").await;
    assert!(matches!(
        h.manager.submit(spec("c")).await,
        Err(JobError::QueueFull { limit: 2 })
    ));
}

#[tokio::test]
async fn held_queue_starts_nothing_until_released() {
    let h = Harness::new(2);
    h.admission.hold("disk", "/ is critical");
    h.submit("a").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.state("a"), JobState::Queued);
    assert!(h.manager.slot_usage().held_reason.contains("/ is critical"));
    h.admission.release("disk");
    h.wait_for("a running", |h| h.state("a") == JobState::Running)
        .await;
}

#[tokio::test]
async fn engine_down_keeps_jobs_queued() {
    let h = Harness::new(2);
    h.engine_up.send_replace(false);
    h.engine.set_down(true);
    h.submit("a").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.state("a"), JobState::Queued);
    h.engine.set_down(false);
    h.engine_up.send_replace(true);
    h.wait_for("a running", |h| h.state("a") == JobState::Running)
        .await;
}

/// A managed mount "data" that its last health check calls mounted, while
/// the check at a job's start says what the test sets.
struct DyingMount {
    alive: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl MountResolver for DyingMount {
    fn resolve(&self, name: &str) -> MountResolution {
        match name {
            "data" => MountResolution::Ready("/mnt/data".into()),
            _ => MountResolution::Unknown,
        }
    }

    async fn verify(&self, name: &str) -> MountResolution {
        if self.alive.load(std::sync::atomic::Ordering::SeqCst) {
            self.resolve(name)
        } else {
            MountResolution::Unavailable("stale: Transport endpoint is not connected".into())
        }
    }
}

#[tokio::test]
async fn a_dead_mount_holds_a_job_at_its_start_and_explains_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mount = Arc::new(DyingMount {
        alive: false.into(),
    });
    let h = Harness::with_mounts(
        dir,
        store,
        Arc::new(FakeEngine::new()),
        config(2),
        mount.clone(),
    );
    let mut s = spec("a");
    s.mounts.push(JobMount {
        source: MountSource::Managed("data".into()),
        container_path: "/data".into(),
        read_only: false,
    });
    h.manager.submit(s).await.unwrap();
    h.wait_for("a back in the queue", |h| {
        let r = h.manager.get("a").unwrap().record;
        r.state == JobState::Queued && r.reason.contains("waiting for mount data")
    })
    .await;
    assert!(
        !h.engine.calls().iter().any(|c| c.starts_with("create")),
        "no container on a dead mount: {:?}",
        h.engine.calls()
    );
    mount.alive.store(true, std::sync::atomic::Ordering::SeqCst);
    h.wait_for("a running", |h| h.state("a") == JobState::Running)
        .await;
    let container = h.container_of("a");
    let binds = h.engine.spec_of(&container).unwrap().binds;
    assert_eq!(binds[0].source, PathBuf::from("/mnt/data"));

    // The mount dies under the running job, which fails: its reason says
    // why, not only how it exited.
    mount
        .alive
        .store(false, std::sync::atomic::Ordering::SeqCst);
    h.engine.exit(&container, 1, false);
    h.wait_for("a failed", |h| h.state("a") == JobState::Failed)
        .await;
    let reason = h.manager.get("a").unwrap().record.reason;
    assert_eq!(
        reason,
        "exited with status 1; mount data died while the job ran: \
         stale: Transport endpoint is not connected"
    );
}

#[tokio::test]
async fn cancel_queued_and_running() {
    let h = Harness::new(1);
    h.submit("run").await;
    h.submit("wait").await;
    h.wait_for("running", |h| h.state("run") == JobState::Running)
        .await;
    let cancelled = h.manager.cancel("wait").await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    let again = h.manager.cancel("wait").await.unwrap();
    assert_eq!(again.state, JobState::Cancelled, "idempotent");
    let running = h.manager.cancel("run").await.unwrap();
    assert_eq!(running.state, JobState::Cancelled);
    assert!(h.engine.calls().iter().any(|c| c.starts_with("stop")));
    assert!(matches!(
        h.manager.cancel("nope").await,
        Err(JobError::NotFound(_))
    ));
}

#[tokio::test]
async fn exit_codes_and_oom() {
    let h = Harness::new(2);
    h.submit("bad").await;
    h.submit("oom").await;
    h.wait_for("both running", |h| h.engine.running().len() == 2)
        .await;
    let bad = h.container_of("bad");
    let oom = h.container_of("oom");
    h.engine.exit(&bad, 3, false);
    h.engine.exit(&oom, 137, true);
    h.wait_for("both finished", |h| {
        h.state("bad").is_final() && h.state("oom").is_final()
    })
    .await;
    let bad = h.manager.get("bad").unwrap().record;
    assert_eq!((bad.state, bad.exit_code), (JobState::Failed, Some(3)));
    let oom = h.manager.get("oom").unwrap().record;
    assert!(oom.oom_killed);
    assert!(oom.reason.contains("OOM"), "{}", oom.reason);
}

#[tokio::test]
async fn timeout_stops_the_container() {
    let h = Harness::new(1);
    let mut s = spec("slow");
    s.timeout_seconds = 1;
    h.manager.submit(s).await.unwrap();
    h.wait_for("timed out", |h| h.state("slow") == JobState::TimedOut)
        .await;
    assert!(h.engine.calls().iter().any(|c| c.starts_with("stop")));
}

#[tokio::test]
async fn records_survive_a_restart_and_running_jobs_are_adopted() {
    let h = Harness::new(2);
    h.submit("a").await;
    h.submit("b").await;
    h.submit("c").await;
    h.wait_for("two running", |h| h.engine.running().len() == 2)
        .await;
    let a = h.container_of("a");
    let waits_on_a = |h: &Harness| {
        h.engine
            .calls()
            .iter()
            .filter(|c| **c == format!("wait {a}"))
            .count()
    };
    // "running" is recorded just before the wait on the container starts;
    // restart only once that first wait is under way.
    h.wait_for("waiting on a", |h| waits_on_a(h) == 1).await;
    let h = h.restart().await;
    h.wait_for("adopted: waiting on a again", |h| waits_on_a(h) == 2)
        .await;
    assert_eq!(h.state("a"), JobState::Running);
    let creates = h
        .engine
        .calls()
        .iter()
        .filter(|c| c.starts_with("create"))
        .count();
    assert_eq!(
        creates,
        2,
        "no container created twice: {:?}",
        h.engine.calls()
    );
    h.engine.exit(&a, 0, false);
    h.wait_for("a done", |h| h.state("a") == JobState::Succeeded)
        .await;
    h.wait_for("c runs", |h| h.state("c") == JobState::Running)
        .await;
}

#[tokio::test]
async fn reconcile_handles_every_crash_window() {
    let (dir, store, engine) = crashed_with(&[
        ("exited", JobState::Running),
        ("created", JobState::Starting),
        ("intent", JobState::Starting),
        ("vanished", JobState::Running),
        ("done", JobState::Succeeded),
    ])
    .await;
    engine.insert("cx", labelled("exited"), "exited", Some(7));
    engine.insert("cc", labelled("created"), "created", None);
    engine.insert("cd", labelled("done"), "exited", Some(0));
    engine.insert("orphan", labelled("unknown-job"), "exited", Some(0));

    let h = Harness::with(dir, store, engine, config(4));
    h.wait_for("exited recorded", |h| h.state("exited") == JobState::Failed)
        .await;
    assert_eq!(h.manager.get("exited").unwrap().record.exit_code, Some(7));
    h.wait_for("created started", |h| {
        h.state("created") == JobState::Running
    })
    .await;
    h.wait_for("vanished failed", |h| {
        h.state("vanished") == JobState::Failed
    })
    .await;
    assert!(
        h.manager
            .get("vanished")
            .unwrap()
            .record
            .reason
            .contains("container lost")
    );
    h.wait_for("intent re-run", |h| h.state("intent") == JobState::Running)
        .await;
    h.wait_for("leftovers removed", |h| {
        let existing = h.engine.existing();
        !existing.contains(&"cd".to_string()) && !existing.contains(&"orphan".to_string())
    })
    .await;
    let calls = h.engine.calls();
    assert!(
        !calls.iter().any(|c| c == "start cx"),
        "an exited container is never restarted"
    );
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("create")).count(),
        1,
        "{calls:?}"
    );
}

#[tokio::test]
async fn cancel_is_persisted_before_the_reply() {
    let h = Harness::new(1);
    h.admission.hold("test", "hold");
    h.submit("q").await;
    h.manager.cancel("q").await.unwrap();
    let stored: JobRecord = h.store.get(RECORDS, "q").unwrap().unwrap();
    assert_eq!(stored.state, JobState::Cancelled);
}

#[tokio::test]
async fn retention_removes_old_finished_jobs_and_their_logs() {
    let h = Harness::new(4);
    let mut c = config(4);
    c.retention_count = 1;
    h.config.send_replace(c);
    for id in ["old", "new"] {
        h.submit(id).await;
        h.wait_for("running", |h| h.state(id) == JobState::Running)
            .await;
        assert!(!h.manager.is_finished(id));
        let container = h.container_of(id);
        h.engine.exit(&container, 0, false);
        h.wait_for("done", |h| h.state(id) == JobState::Succeeded)
            .await;
    }
    std::fs::create_dir_all(h.dir_path.join("logs")).unwrap();
    std::fs::write(h.dir_path.join("logs/old.0.log"), b"x").unwrap();
    h.manager.sweep().await;
    assert!(matches!(h.manager.get("old"), Err(JobError::NotFound(_))));
    assert!(h.manager.get("new").is_ok());
    // A pruned job's kept container counts as finished for disk reclaim.
    assert!(h.manager.is_finished("old"));
    assert!(h.manager.is_finished("new"));
    assert!(!h.dir_path.join("logs/old.0.log").exists());
    assert!(h.store.get::<JobRecord>(RECORDS, "old").unwrap().is_none());
}

#[test]
fn exit_reasons_name_the_killing_signal() {
    assert_eq!(exit_reason(0), "exited with status 0");
    assert_eq!(exit_reason(1), "exited with status 1");
    assert_eq!(exit_reason(128), "exited with status 128");
    assert_eq!(
        exit_reason(137),
        "exited with status 137 (killed by SIGKILL)"
    );
    assert_eq!(
        exit_reason(143),
        "exited with status 143 (killed by SIGTERM)"
    );
    assert_eq!(exit_reason(255), "exited with status 255");
    assert_eq!(exit_reason(-1), "exited with status -1");
}

#[tokio::test]
async fn a_job_killed_while_the_engine_was_away_says_so() {
    let h = Harness::new(2);
    h.submit("a").await;
    h.wait_for("a running", |h| h.state("a") == JobState::Running)
        .await;
    let container = h.container_of("a");
    h.engine.set_down(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.engine.exit(&container, 137, false);
    h.engine.set_down(false);
    h.wait_for("a failed", |h| h.state("a") == JobState::Failed)
        .await;
    assert_eq!(
        h.manager.get("a").unwrap().record.reason,
        "exited with status 137 (killed by SIGKILL); the Docker engine went away while the job ran"
    );
}

/// What a crash leaves behind: a store holding jobs in the given states
/// (no containers yet: the test inserts those it wants with [`labelled`]).
async fn crashed_with(jobs: &[(&str, JobState)]) -> (tempfile::TempDir, Store, Arc<FakeEngine>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut writes = Vec::new();
    for (i, (id, state)) in jobs.iter().enumerate() {
        let mut r = JobRecord::queued(spec(id), i as u64);
        r.state = *state;
        writes.push(Write::put(RECORDS, *id, &r));
    }
    store.apply(writes).await.unwrap();
    (dir, store, Arc::new(FakeEngine::new()))
}

/// A container of job `job` as the agent of instance "inst" labels it.
fn labelled(job: &str) -> ContainerSpec {
    ContainerSpec {
        name: format!("ia-inst-{job}"),
        labels: HashMap::from([
            (LABEL_INSTANCE.to_owned(), "inst".to_owned()),
            (LABEL_JOB.to_owned(), job.to_owned()),
        ]),
        ..ContainerSpec::default()
    }
}

fn stored(h: &Harness, id: &str) -> JobRecord {
    h.store.get(RECORDS, id).unwrap().unwrap()
}

fn calls_starting(h: &Harness, prefix: &str) -> Vec<String> {
    h.engine
        .calls()
        .into_iter()
        .filter(|c| c.starts_with(prefix))
        .collect()
}

#[tokio::test]
async fn a_job_cancelled_while_its_create_hangs_never_starts() {
    let h = Harness::new(1);
    h.engine.set_create_hung(true);
    h.engine.set_create_fails(true);
    h.submit("a").await;
    h.wait_for("create sent", |h| !calls_starting(h, "create").is_empty())
        .await;
    let reply = h.manager.cancel("a").await.unwrap();
    assert_eq!(
        reply.state,
        JobState::Starting,
        "the engine hangs: no answer yet"
    );
    assert!(reply.cancel_requested);
    // The stuck create now fails (as a timed-out create does); the job must
    // not go back to the queue and start on the next attempt.
    h.engine.set_create_hung(false);
    h.wait_for("a cancelled", |h| h.state("a") == JobState::Cancelled)
        .await;
    h.engine.set_create_fails(false);
    // Longer than the pause before a re-queued job is tried again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.state("a"), JobState::Cancelled);
    assert!(
        calls_starting(&h, "start").is_empty(),
        "{:?}",
        h.engine.calls()
    );
    assert_eq!(calls_starting(&h, "create").len(), 1);
    assert_eq!(stored(&h, "a").state, JobState::Cancelled);
    assert_eq!(h.manager.slot_usage().in_use, 0);
}

#[tokio::test]
async fn a_job_cancelled_while_its_create_fails_ends_cancelled() {
    let h = Harness::new(1);
    h.engine.set_create_fails(true);
    h.submit("a").await;
    h.wait_for("create tried", |h| !calls_starting(h, "create").is_empty())
        .await;
    // Whether it is back in the queue or starting again, it ends cancelled.
    h.manager.cancel("a").await.unwrap();
    h.wait_for("a cancelled", |h| h.state("a") == JobState::Cancelled)
        .await;
    h.engine.set_create_fails(false);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        calls_starting(&h, "start").is_empty(),
        "{:?}",
        h.engine.calls()
    );
    assert_eq!(stored(&h, "a").state, JobState::Cancelled);
}

#[tokio::test]
async fn a_cancelled_running_job_is_stored_final_and_stays_so_after_a_restart() {
    let h = Harness::new(1);
    h.submit("a").await;
    h.wait_for("a running", |h| h.state("a") == JobState::Running)
        .await;
    let reply = h.manager.cancel("a").await.unwrap();
    assert_eq!(reply.state, JobState::Cancelled);
    h.wait_for("stored final", |h| {
        stored(h, "a").state == JobState::Cancelled
    })
    .await;
    // Every save is in: nothing older may land after the final state.
    h.wait_for("container removed", |h| h.engine.existing().is_empty())
        .await;
    assert_eq!(stored(&h, "a"), h.manager.get("a").unwrap().record);
    let h = h.restart().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let record = h.manager.get("a").unwrap().record;
    assert_eq!(record.state, JobState::Cancelled, "{}", record.reason);
}

#[tokio::test]
async fn a_cancel_before_reconciliation_is_durable_and_honoured() {
    let (dir, store, engine) = crashed_with(&[
        ("running", JobState::Running),
        ("created", JobState::Starting),
        ("intent", JobState::Starting),
    ])
    .await;
    engine.insert("cr", labelled("running"), "running", None);
    engine.insert("cc", labelled("created"), "created", None);
    // The engine does not answer yet: nothing is reconciled.
    engine.set_down(true);
    let h = Harness::with(dir, store, engine, config(4));
    for id in ["running", "created", "intent"] {
        let reply = h.manager.cancel(id).await.unwrap();
        assert!(reply.cancel_requested, "{id}");
        assert!(!reply.state.is_final(), "{id}");
        assert!(stored(&h, id).cancel_requested, "{id}: durable");
    }
    // The request survives a crash before the engine came back.
    let h = h.restart().await;
    h.engine.set_down(false);
    h.engine_up.send_replace(true);
    for id in ["running", "created", "intent"] {
        h.wait_for("cancelled", |h| h.state(id) == JobState::Cancelled)
            .await;
    }
    let calls = h.engine.calls();
    assert!(calls.iter().any(|c| c.starts_with("stop cr")), "{calls:?}");
    assert!(!calls.iter().any(|c| c == "start cc"), "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("create")), "{calls:?}");
    h.wait_for("containers removed", |h| h.engine.existing().is_empty())
        .await;
    for id in ["running", "created", "intent"] {
        h.wait_for("stored", |h| stored(h, id).state == JobState::Cancelled)
            .await;
    }
}

#[tokio::test]
async fn a_job_that_no_longer_fits_after_capacity_shrinks_fails_and_unblocks_the_queue() {
    let h = Harness::new(4);
    let mut c = config(4);
    c.reserve_after_seconds = 0;
    h.config.send_replace(c.clone());
    h.admission.hold("test", "hold");
    let mut big = spec("big");
    big.slots = 3;
    h.manager.submit(big).await.unwrap();
    h.submit("small").await;
    c.slots = 2;
    h.config.send_replace(c);
    h.wait_for("big failed", |h| h.state("big") == JobState::Failed)
        .await;
    let reason = h.manager.get("big").unwrap().record.reason;
    assert!(
        reason.contains("needs 3 slots") && reason.contains("capacity is now 2"),
        "{reason}"
    );
    assert_eq!(h.state("small"), JobState::Queued, "still held");
    h.admission.release("test");
    h.wait_for("small runs", |h| h.state("small") == JobState::Running)
        .await;
    h.wait_for("stored", |h| stored(h, "big").state == JobState::Failed)
        .await;
}

#[tokio::test]
async fn a_gpu_job_waiting_for_gpus_does_not_keep_cpu_jobs_from_free_slots() {
    let h = Harness::new(4);
    let mut c = config(4);
    c.reserve_after_seconds = 0;
    h.config.send_replace(c);
    h.gpus.send_replace(vec![Gpu {
        index: 0,
        name: "fake".into(),
        uuid: "GPU-0".into(),
        memory_bytes: 0,
    }]);
    let mut first = spec("gpu-a");
    first.gpus = 1;
    h.manager.submit(first).await.unwrap();
    h.wait_for("gpu-a running", |h| h.state("gpu-a") == JobState::Running)
        .await;
    let mut second = spec("gpu-b");
    second.gpus = 1;
    h.manager.submit(second).await.unwrap();
    h.submit("cpu").await;
    h.wait_for("cpu runs beside", |h| h.state("cpu") == JobState::Running)
        .await;
    assert_eq!(h.state("gpu-b"), JobState::Queued);
    let a = h.container_of("gpu-a");
    h.engine.exit(&a, 0, false);
    h.wait_for("gpu-b runs", |h| h.state("gpu-b") == JobState::Running)
        .await;
    assert_eq!(h.manager.get("gpu-b").unwrap().record.gpu_indices, vec![0]);
}

#[tokio::test]
async fn gpu_jobs_wait_for_discovery_then_fail_when_there_are_none() {
    let h = Harness::new(4);
    h.gpus_discovered.send_replace(false);
    let mut s = spec("gpu");
    s.gpus = 1;
    let queued = h.manager.submit(s).await.unwrap();
    assert_eq!(
        queued.state,
        JobState::Queued,
        "not refused before discovery"
    );
    h.submit("cpu").await;
    h.wait_for("cpu runs", |h| h.state("cpu") == JobState::Running)
        .await;
    assert_eq!(h.state("gpu"), JobState::Queued, "waits for discovery");
    h.gpus_discovered.send_replace(true);
    h.wait_for("gpu failed", |h| h.state("gpu") == JobState::Failed)
        .await;
    assert_eq!(
        h.manager.get("gpu").unwrap().record.reason,
        "asks for 1 GPUs but this host has none"
    );
    let mut later = spec("later");
    later.gpus = 1;
    assert!(matches!(
        h.manager.submit(later).await,
        Err(JobError::NoGpus { gpus: 1, .. })
    ));
}

#[tokio::test]
async fn gpu_jobs_queued_before_discovery_run_on_the_gpus_found() {
    let h = Harness::new(4);
    h.gpus_discovered.send_replace(false);
    let mut s = spec("gpu");
    s.gpus = 1;
    h.manager.submit(s).await.unwrap();
    h.gpus.send_replace(vec![Gpu {
        index: 3,
        name: "fake".into(),
        uuid: "GPU-3".into(),
        memory_bytes: 0,
    }]);
    h.gpus_discovered.send_replace(true);
    h.wait_for("gpu runs", |h| h.state("gpu") == JobState::Running)
        .await;
    let container = h.container_of("gpu");
    assert_eq!(h.engine.spec_of(&container).unwrap().gpus, vec![3]);
}

#[tokio::test]
async fn a_job_kill_grace_reaches_the_engine() {
    let h = Harness::new(2);
    let mut s = spec("graced");
    s.kill_grace_seconds = 7;
    h.manager.submit(s).await.unwrap();
    h.submit("default").await;
    h.wait_for("both running", |h| h.engine.running().len() == 2)
        .await;
    let graced = h.container_of("graced");
    let default = h.container_of("default");
    h.manager.cancel("graced").await.unwrap();
    h.manager.cancel("default").await.unwrap();
    let calls = h.engine.calls();
    assert!(
        calls.contains(&format!("stop {graced} grace=7s")),
        "{calls:?}"
    );
    assert!(
        calls.contains(&format!("stop {default} grace=1s")),
        "the configured default: {calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retention_removes_jobs_past_their_age() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let now = SystemTime::now();
    let mut writes = Vec::new();
    for (i, (id, age)) in [("old", 7200), ("recent", 60)].into_iter().enumerate() {
        let mut r = JobRecord::queued(spec(id), i as u64);
        r.state = JobState::Succeeded;
        r.finished_at = Some(now - Duration::from_secs(age));
        writes.push(Write::put(RECORDS, id, &r));
    }
    store.apply(writes).await.unwrap();
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    std::fs::write(dir.path().join("logs/old.0.log"), b"x").unwrap();
    std::fs::write(dir.path().join("logs/recent.0.log"), b"x").unwrap();
    let mut c = config(2);
    c.retention_seconds = 3600;
    let h = Harness::with(dir, store, Arc::new(FakeEngine::new()), c);
    // The sweeper runs by itself (at start, then every minute).
    h.wait_for("old removed", |h| h.manager.get("old").is_err())
        .await;
    assert!(h.manager.get("recent").is_ok());
    assert!(h.store.get::<JobRecord>(RECORDS, "old").unwrap().is_none());
    assert!(!h.dir_path.join("logs/old.0.log").exists());
    assert!(h.dir_path.join("logs/recent.0.log").exists());
    // An hour of sweeps later the recent one is still young enough by its
    // recorded time (ages are wall-clock times, which paused time does not move).
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(h.manager.get("recent").is_ok());
}

#[tokio::test]
async fn slots_stay_held_until_the_container_is_removed() {
    let h = Harness::new(1);
    h.submit("a").await;
    h.submit("b").await;
    h.wait_for("a running", |h| h.state("a") == JobState::Running)
        .await;
    let a = h.container_of("a");
    h.engine.set_remove_fails(true);
    h.engine.exit(&a, 0, false);
    h.wait_for("a succeeded", |h| h.state("a") == JobState::Succeeded)
        .await;
    h.wait_for("a removal tried twice", |h| {
        calls_starting(h, &format!("remove {a}")).len() >= 2
    })
    .await;
    assert_eq!(h.state("b"), JobState::Queued, "a's container still exists");
    assert_eq!(h.manager.slot_usage().in_use, 1);
    assert!(calls_starting(&h, "create").len() == 1);
    h.engine.set_remove_fails(false);
    h.wait_for("b runs once a is gone", |h| {
        h.state("b") == JobState::Running
    })
    .await;
    assert!(!h.engine.existing().contains(&a));
}

#[tokio::test]
async fn a_queued_job_above_the_capacity_after_a_restart_fails_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut big = spec("big");
    big.slots = 3;
    let writes = vec![
        Write::put(RECORDS, "big", &JobRecord::queued(big, 0)),
        Write::put(RECORDS, "small", &JobRecord::queued(spec("small"), 1)),
    ];
    store.apply(writes).await.unwrap();
    // Fewer cores than when it was accepted: capacity 2.
    let h = Harness::with(dir, store, Arc::new(FakeEngine::new()), config(2));
    h.wait_for("big failed", |h| h.state("big") == JobState::Failed)
        .await;
    assert!(
        h.manager
            .get("big")
            .unwrap()
            .record
            .reason
            .contains("capacity is now 2")
    );
    h.wait_for("small runs", |h| h.state("small") == JobState::Running)
        .await;
}

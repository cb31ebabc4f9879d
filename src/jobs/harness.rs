//! The job manager's unit-test harness (`cfg(test)`): a [`Rig`] (temp dir,
//! store, events, admission gate, cancel token, tasks), the fake engine,
//! and the senders of the manager's other inputs, with waits that follow
//! the manager's events and the engine's calls instead of sleeping.
//!
//! Shared by the tests beside each part of the manager (`manager/tests.rs`,
//! `dispatch/tests.rs`, `job_task/tests.rs`, `recovery/tests.rs`,
//! `retention/tests.rs`). Tests run with paused time: a wait that can never
//! end fails at once, when the runtime has nothing left to do.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::JobsConfig;
use super::engine::ContainerSpec;
use super::fake::FakeEngine;
use super::manager::{JobManager, JobsDeps, RECORDS};
use super::record::{JobRecord, JobState};
use super::spec::JobSpec;
use super::{
    ImageProvider, LABEL_INSTANCE, LABEL_JOB, LocalImagesOnly, MountResolver, NoManagedMounts,
};
use crate::events::{Delivery, EventPayload};
use crate::host::Gpu;
use crate::store::Write;
use crate::testing::Rig;

/// Longest a wait may take in (paused) test time: far beyond any retry
/// pause of the manager, so only a wait that can never end reaches it.
const WAIT_LIMIT: Duration = Duration::from_secs(600);

/// A job manager on the fake engine.
pub(super) struct Harness {
    /// Store, events, admission gate, temp dir (`logs/` under its root).
    pub rig: Rig,
    /// The manager under test.
    pub manager: JobManager,
    /// The engine it drives; every call is recorded.
    pub engine: Arc<FakeEngine>,
    /// What the engine monitor would say.
    pub engine_up: watch::Sender<bool>,
    /// The live `[jobs]` section.
    pub config: watch::Sender<JobsConfig>,
    /// The GPU inventory.
    pub gpus: watch::Sender<Vec<Gpu>>,
    /// Whether GPU discovery has ended (true from the start).
    pub gpus_discovered: watch::Sender<bool>,
    /// Kept for a restart.
    mounts: Arc<dyn MountResolver>,
    /// Kept for a restart.
    images: Arc<dyn ImageProvider>,
}

/// `slots` slots and a 1 s kill grace, the rest as the defaults.
pub(super) fn config(slots: u32) -> JobsConfig {
    JobsConfig {
        slots,
        kill_grace_seconds: 1,
        ..JobsConfig::default()
    }
}

/// A job that runs busybox `true` (it runs until the test ends it).
pub(super) fn spec(id: &str) -> JobSpec {
    JobSpec {
        id: id.into(),
        image: "busybox".into(),
        command: vec!["true".into()],
        ..JobSpec::default()
    }
}

impl Harness {
    /// A manager with `slots` slots on an empty store and engine.
    pub fn new(slots: u32) -> Self {
        Self::on(Rig::new(), Arc::new(FakeEngine::new()), config(slots))
    }

    /// A manager on what `rig` and `engine` already hold.
    pub fn on(rig: Rig, engine: Arc<FakeEngine>, config: JobsConfig) -> Self {
        Self::with_mounts(rig, engine, config, Arc::new(NoManagedMounts))
    }

    /// The same, with managed mounts.
    pub fn with_mounts(
        rig: Rig,
        engine: Arc<FakeEngine>,
        config: JobsConfig,
        mounts: Arc<dyn MountResolver>,
    ) -> Self {
        Self::with_parts(
            rig,
            engine,
            config,
            mounts,
            Arc::new(LocalImagesOnly::default()),
        )
    }

    /// The same, with managed mounts and an images domain.
    pub fn with_parts(
        rig: Rig,
        engine: Arc<FakeEngine>,
        config: JobsConfig,
        mounts: Arc<dyn MountResolver>,
        images: Arc<dyn ImageProvider>,
    ) -> Self {
        let (engine_up, engine_up_rx) = watch::channel(!engine.is_down());
        let (config_tx, config_rx) = watch::channel(config);
        let (gpus_tx, gpus_rx) = watch::channel(Vec::new());
        let (gpus_discovered_tx, gpus_discovered_rx) = watch::channel(true);
        let manager = JobManager::start(
            JobsDeps {
                engine: engine.clone(),
                store: rig.store.clone(),
                events: rig.events.clone(),
                admission: rig.admission.clone(),
                mounts: mounts.clone(),
                images: images.clone(),
                logs_dir: rig.root.join("logs"),
                staging_dir: None,
                host_paths: crate::paths::offload::Offload::new(4),
                instance_id: "inst".into(),
                usable_cores: 2.0,
                memory_bytes: 8 << 30,
                gpus: gpus_rx,
                gpus_discovered: gpus_discovered_rx,
                engine_up: engine_up_rx,
                config: config_rx,
            },
            rig.cancel.clone(),
            rig.tasks.clone(),
        )
        .unwrap();
        Self {
            rig,
            manager,
            engine,
            engine_up,
            config: config_tx,
            gpus: gpus_tx,
            gpus_discovered: gpus_discovered_tx,
            mounts,
            images,
        }
    }

    /// Simulates an agent crash: stops every task without recording
    /// anything, then starts a new manager on the same store (which it reads
    /// again, as a restart does), engine and config.
    pub async fn restart(self) -> Self {
        let Harness {
            mut rig,
            manager,
            engine,
            config,
            mounts,
            images,
            ..
        } = self;
        rig.cancel.cancel();
        rig.tasks.close();
        rig.tasks.wait().await;
        drop(manager);
        rig.cancel = CancellationToken::new();
        rig.tasks = TaskTracker::new();
        let config = config.borrow().clone();
        Self::with_parts(rig, engine, config, mounts, images)
    }

    /// Submits [`spec`]`(id)`.
    pub async fn submit(&self, id: &str) -> JobRecord {
        self.manager.submit(spec(id)).await.unwrap().record
    }

    /// The job's state in memory.
    pub fn state(&self, id: &str) -> JobState {
        self.manager.get(id).unwrap().record.state
    }

    /// The job's container, once created.
    pub fn container_of(&self, id: &str) -> String {
        self.manager.get(id).unwrap().record.container_id
    }

    /// The record as stored (it must be).
    pub fn stored(&self, id: &str) -> JobRecord {
        self.stored_if_any(id).expect("a stored record")
    }

    /// The record as stored, if it is.
    pub fn stored_if_any(&self, id: &str) -> Option<JobRecord> {
        self.rig.store.get(RECORDS, id).unwrap()
    }

    /// Engine calls that start with `prefix` ("create", "stop c1", …).
    pub fn calls_starting(&self, prefix: &str) -> Vec<String> {
        self.engine
            .calls()
            .into_iter()
            .filter(|c| c.starts_with(prefix))
            .collect()
    }

    /// The states job `id` was published in, in order, since the harness
    /// started (the events of every restart included).
    pub fn history(&self, id: &str) -> Vec<JobState> {
        let mut events = self.rig.events.subscribe(Some(0));
        let mut states = Vec::new();
        while let Some(delivery) = events.try_next() {
            if let Delivery::Event(event) = delivery
                && let EventPayload::Job(record) = &event.payload
                && record.id() == id
            {
                states.push(record.state);
            }
        }
        states
    }

    /// Waits until `check` holds, looking again after every job event and
    /// every engine call (everything the manager does announces itself
    /// through one or the other). Panics when it cannot happen.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let mut events = self.rig.events.subscribe(None);
        let mut engine = self.engine.changes();
        let limit = tokio::time::sleep(WAIT_LIMIT);
        tokio::pin!(limit);
        loop {
            if check(self) {
                return;
            }
            tokio::select! {
                _ = events.next() => {}
                _ = engine.changed() => {}
                _ = &mut limit => panic!(
                    "waited in vain for {what}; calls: {:?}",
                    self.engine.calls()
                ),
            }
        }
    }

    /// Waits until `check` holds for a change that publishes nothing and
    /// calls no engine (retention's removals): looks again each time the
    /// runtime has nothing left to do (paused time only moves then), so it
    /// never races the code under test.
    pub async fn wait_quietly_for(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let started = tokio::time::Instant::now();
        while !check(self) {
            assert!(started.elapsed() < WAIT_LIMIT, "waited in vain for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// What a crash leaves behind: a store holding jobs in the given states
/// (no containers yet: the test inserts those it wants with [`labelled`]).
pub(super) async fn crashed_with(jobs: &[(&str, JobState)]) -> (Rig, Arc<FakeEngine>) {
    let rig = Rig::new();
    let mut writes = Vec::new();
    for (i, (id, state)) in jobs.iter().enumerate() {
        let mut r = JobRecord::queued(spec(id), i as u64);
        r.state = *state;
        writes.push(Write::put(RECORDS, *id, &r));
    }
    rig.store.apply(writes).await.unwrap();
    (rig, Arc::new(FakeEngine::new()))
}

/// A container of job `job` as the agent of instance "inst" labels it.
pub(super) fn labelled(job: &str) -> ContainerSpec {
    ContainerSpec {
        name: format!("ia-inst-{job}"),
        labels: HashMap::from([
            (LABEL_INSTANCE.to_owned(), "inst".to_owned()),
            (LABEL_JOB.to_owned(), job.to_owned()),
        ]),
        ..ContainerSpec::default()
    }
}

/// A GPU as discovery reports it.
pub(super) fn gpu(index: u32) -> Gpu {
    Gpu {
        index,
        name: "fake".into(),
        uuid: format!("GPU-{index}"),
        memory_bytes: 0,
    }
}

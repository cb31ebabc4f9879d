//! Unit tests of the app manager on the fakes, on paused time: readiness,
//! health failures, restarts with backoff, adoption after an agent restart,
//! removal, the admission gate, slots and ports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fake::{FakeAppEngine, FakeProber};
use super::spec::{AppSpec, HealthSpec, HostLimits, PortSpec, Probe, RestartPolicy};
use super::*;
use crate::jobs::{MountResolution, MountResolver, NoManagedMounts};
use crate::testing::Rig;

const IMAGE: &str = "instance-agent/busybox:test";

/// A slot pool of a fixed capacity.
struct Slots {
    capacity: u32,
    held: Mutex<HashMap<String, u32>>,
}

impl Slots {
    fn in_use(&self) -> u32 {
        self.held.lock().unwrap().values().sum()
    }
}

impl SlotPool for Slots {
    fn try_hold(&self, holder: &str, slots: u32) -> bool {
        let mut held = self.held.lock().unwrap();
        if held.contains_key(holder) {
            return true;
        }
        if self.capacity - held.values().sum::<u32>() < slots {
            return false;
        }
        held.insert(holder.to_owned(), slots);
        true
    }
    fn hold_anyway(&self, holder: &str, slots: u32) {
        self.held.lock().unwrap().insert(holder.to_owned(), slots);
    }
    fn release(&self, holder: &str) {
        self.held.lock().unwrap().remove(holder);
    }
}

/// A mount resolver whose one mount, `data`, the test makes usable or not.
struct OneMount(Mutex<MountResolution>);

impl MountResolver for OneMount {
    fn resolve(&self, name: &str) -> MountResolution {
        if name == "data" {
            self.0.lock().unwrap().clone()
        } else {
            MountResolution::Unknown
        }
    }
}

struct Harness {
    rig: Rig,
    engine: Arc<FakeAppEngine>,
    prober: Arc<FakeProber>,
    slots: Arc<Slots>,
    apps: AppManager,
    /// This manager's own shutdown (an "agent restart" cancels it).
    shutdown: CancellationToken,
    _engine_up: watch::Sender<bool>,
}

impl Harness {
    fn new() -> Self {
        Self::with(
            Rig::new(),
            Arc::new(FakeAppEngine::with_images(&[IMAGE])),
            4,
            Arc::new(NoManagedMounts),
        )
    }

    fn with(
        rig: Rig,
        engine: Arc<FakeAppEngine>,
        capacity: u32,
        mounts: Arc<dyn MountResolver>,
    ) -> Self {
        let prober = Arc::new(FakeProber::default());
        let slots = Arc::new(Slots {
            capacity,
            held: Mutex::new(HashMap::new()),
        });
        Self::start(rig, engine, prober, slots, mounts)
    }

    fn start(
        rig: Rig,
        engine: Arc<FakeAppEngine>,
        prober: Arc<FakeProber>,
        slots: Arc<Slots>,
        mounts: Arc<dyn MountResolver>,
    ) -> Self {
        let (engine_up, engine_up_rx) = watch::channel(true);
        let shutdown = rig.cancel.child_token();
        let apps = AppManager::start(
            AppsDeps {
                engine: engine.clone(),
                images: engine.clone(),
                prober: prober.clone(),
                store: rig.store.clone(),
                events: rig.events.clone(),
                admission: rig.admission.clone(),
                mounts,
                slots: slots.clone(),
                instance_id: "inst0001".into(),
                host: HostLimits {
                    capacity: 4,
                    usable_cores: 2.0,
                    gpus: 0,
                },
                engine_up: engine_up_rx,
                config: watch::channel(config::AppsConfig::default()).1,
                host_roots: watch::channel(vec![rig.root.clone()]).1,
                probe_observer: None,
            },
            shutdown.clone(),
            TaskTracker::new(),
        )
        .expect("start");
        Self {
            rig,
            engine,
            prober,
            slots,
            apps,
            shutdown,
            _engine_up: engine_up,
        }
    }

    /// The agent stops and starts again on the same store and engine.
    async fn restart_agent(self) -> Self {
        self.shutdown.cancel();
        self.apps.inner.tasks.close();
        self.apps.inner.tasks.wait().await;
        let slots = Arc::new(Slots {
            capacity: self.slots.capacity,
            held: Mutex::new(HashMap::new()),
        });
        Self::start(
            self.rig,
            self.engine,
            self.prober,
            slots,
            Arc::new(NoManagedMounts),
        )
    }

    /// Waits (on paused time: instantly unless the agent sleeps) until the
    /// app's record satisfies `done`.
    async fn until(&self, name: &str, what: &str, done: impl Fn(&AppRecord) -> bool) -> AppRecord {
        let mut rx = self.apps.watch(name).expect("app exists");
        let wait = async {
            loop {
                let record = rx.borrow_and_update().clone();
                if done(&record) {
                    return record;
                }
                rx.changed().await.expect("record sender alive");
            }
        };
        match tokio::time::timeout(Duration::from_secs(3600), wait).await {
            Ok(record) => record,
            Err(_) => panic!("{name} never got {what}: {:?}", self.apps.get(name)),
        }
    }

    async fn state(&self, name: &str, state: AppState) -> AppRecord {
        self.until(name, state.as_str(), |r| r.state == state).await
    }

    fn addr(record: &AppRecord) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], record.host_ports["http"] as u16))
    }
}

fn web(name: &str) -> AppSpec {
    AppSpec {
        name: name.into(),
        image: IMAGE.into(),
        ports: vec![PortSpec {
            name: "http".into(),
            container_port: 8080,
            host_port: 0,
            host_ip: String::new(),
        }],
        health: HealthSpec {
            probe: Probe::Http {
                port: "http".into(),
                path: "/health".into(),
                status_min: 0,
                status_max: 0,
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn ready_only_after_the_health_path_answers_and_a_404_is_not_ready() {
    let h = Harness::new();
    h.apps.deploy(web("web")).await.unwrap();
    let starting = h.state("web", AppState::Starting).await;
    let addr = Harness::addr(&starting);
    // Refused, then 404: probes go on, the app stays STARTING.
    let mut probes = h.prober.probes();
    probes.changed().await.unwrap();
    h.prober.answer(addr, 404);
    let seen = h
        .until("web", "a 404 probe", |r| {
            r.last_probe
                .as_ref()
                .is_some_and(|p| p.status_code == Some(404))
        })
        .await;
    assert_eq!(seen.state, AppState::Starting);
    assert!(seen.reason.starts_with("starting: "), "{}", seen.reason);
    assert!(
        seen.reason.contains("status 404 outside 200-399"),
        "{}",
        seen.reason
    );
    h.prober.answer(addr, 200);
    let ready = h.state("web", AppState::Ready).await;
    assert_eq!(ready.last_probe.as_ref().unwrap().status_code, Some(200));
    assert_eq!(
        ready.endpoints(),
        vec![("http".to_owned(), format!("http://{addr}"))]
    );
    assert_eq!(h.slots.in_use(), 1, "the app holds its slot");
    let container = h.engine.spec_of(&ready.container_id).unwrap();
    assert_eq!(container.ports[0].host_ip, "127.0.0.1");
    assert_eq!(container.network, "instance-agent-apps");
}

#[tokio::test(start_paused = true)]
async fn failing_health_after_ready_makes_it_unhealthy_then_restarted() {
    let h = Harness::new();
    h.apps.deploy(web("web")).await.unwrap();
    let starting = h.state("web", AppState::Starting).await;
    let addr = Harness::addr(&starting);
    h.prober.answer(addr, 200);
    let ready = h.state("web", AppState::Ready).await;
    h.prober.answer(addr, 500);
    let unhealthy = h.state("web", AppState::Unhealthy).await;
    assert!(
        unhealthy.reason.contains("3 probe(s) failed"),
        "{}",
        unhealthy.reason
    );
    let backoff = h.state("web", AppState::Backoff).await;
    assert_eq!(backoff.restarts, 1);
    h.prober.answer(addr, 200);
    let again = h
        .until("web", "a new ready container", |r| {
            r.state == AppState::Ready && r.container_id != ready.container_id
        })
        .await;
    assert_eq!(
        again.host_ports, ready.host_ports,
        "the picked port is kept"
    );
    assert!(!h.engine.existing().contains(&ready.container_id));
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_backs_off_doubling_and_shows_the_exit_and_the_log_tail() {
    let h = Harness::new();
    let mut spec = web("crash");
    spec.health.probe = Probe::None;
    h.apps.deploy(spec).await.unwrap();
    let mut delays = Vec::new();
    for restart in 1..=4u32 {
        let ready = h.state("crash", AppState::Ready).await;
        let began = tokio::time::Instant::now();
        h.engine
            .exit(&ready.container_id, 3, "loading model\nboom: no weights\n");
        let backoff = h
            .until("crash", "backoff", |r| {
                r.state == AppState::Backoff && r.restarts == restart
            })
            .await;
        assert!(
            backoff
                .reason
                .starts_with("exited with status 3; last output: loading model | boom: no weights"),
            "{}",
            backoff.reason
        );
        assert_eq!(backoff.last_exit, Some(3));
        h.until("crash", "a new container", |r| {
            r.state == AppState::Ready && r.container_id != ready.container_id
        })
        .await;
        delays.push(began.elapsed().as_secs());
    }
    assert_eq!(delays, vec![1, 2, 4, 8]);
}

#[tokio::test(start_paused = true)]
async fn never_and_on_failure_end_the_app_and_free_its_slots() {
    let h = Harness::new();
    for (name, policy, code, state) in [
        ("never0", RestartPolicy::Never, 0, AppState::Stopped),
        ("never1", RestartPolicy::Never, 1, AppState::Failed),
        ("onfail0", RestartPolicy::OnFailure, 0, AppState::Stopped),
    ] {
        let mut spec = web(name);
        spec.health.probe = Probe::None;
        spec.restart = policy;
        h.apps.deploy(spec).await.unwrap();
        let ready = h.state(name, AppState::Ready).await;
        h.engine.exit(&ready.container_id, code, "");
        let ended = h.state(name, state).await;
        assert_eq!(ended.restarts, 0, "{name}");
        assert_eq!(ended.reason, format!("exited with status {code}"));
    }
    assert_eq!(h.slots.in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn startup_failures_do_not_count_until_the_startup_timeout() {
    let h = Harness::new();
    let mut spec = web("slow");
    spec.health.startup_timeout_seconds = Some(60);
    h.apps.deploy(spec).await.unwrap();
    let began = tokio::time::Instant::now();
    let backoff = h.state("slow", AppState::Backoff).await;
    assert!(began.elapsed() >= Duration::from_secs(60));
    assert!(
        backoff.reason.starts_with(
            "not ready within startup_timeout_seconds=60 (last probe: connection refused"
        ),
        "{}",
        backoff.reason
    );
}

#[tokio::test(start_paused = true)]
async fn an_agent_restart_adopts_the_running_container() {
    let h = Harness::new();
    h.apps.deploy(web("web")).await.unwrap();
    let starting = h.state("web", AppState::Starting).await;
    h.prober.answer(Harness::addr(&starting), 200);
    let ready = h.state("web", AppState::Ready).await;
    let creates = h
        .engine
        .calls()
        .iter()
        .filter(|c| c.starts_with("create"))
        .count();
    let h = h.restart_agent().await;
    let adopted = h
        .until("web", "adoption", |r| r.reason.contains("adopted"))
        .await;
    assert_eq!(adopted.state, AppState::Ready);
    assert_eq!(adopted.container_id, ready.container_id);
    assert_eq!(adopted.host_ports, ready.host_ports);
    assert_eq!(h.slots.in_use(), 1, "adopted apps hold their slots at once");
    let after = h
        .engine
        .calls()
        .iter()
        .filter(|c| c.starts_with("create"))
        .count();
    assert_eq!(after, creates, "nothing was created again");
    // Still watched: an exit is restarted.
    h.engine.exit(&ready.container_id, 1, "");
    h.state("web", AppState::Backoff).await;
}

#[tokio::test(start_paused = true)]
async fn a_container_removed_while_the_agent_was_down_is_not_resurrected() {
    let h = Harness::new();
    let mut spec = web("gone");
    spec.health.probe = Probe::None;
    h.apps.deploy(spec).await.unwrap();
    let ready = h.state("gone", AppState::Ready).await;
    h.shutdown.cancel();
    h.engine.vanish(&ready.container_id);
    let h = h.restart_agent().await;
    let stopped = h.state("gone", AppState::Stopped).await;
    assert!(
        stopped.reason.contains("removed while the agent was down"),
        "{}",
        stopped.reason
    );
    assert!(h.engine.existing().is_empty());
    assert_eq!(h.slots.in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn remove_stops_removes_and_forgets_and_a_removal_cut_short_is_finished() {
    let h = Harness::new();
    let mut spec = web("web");
    spec.health.probe = Probe::None;
    h.apps.deploy(spec.clone()).await.unwrap();
    h.state("web", AppState::Ready).await;
    let removed = h.apps.remove("web").await.unwrap();
    assert_eq!(removed.reason, "removed");
    assert!(h.engine.existing().is_empty());
    assert!(matches!(h.apps.get("web"), Err(AppError::NotFound(_))));
    assert_eq!(h.slots.in_use(), 0);

    // A removal recorded but not carried out (the agent died): finished.
    spec.name = "half".into();
    h.apps.deploy(spec).await.unwrap();
    let ready = h.state("half", AppState::Ready).await;
    let mut record = ready.clone();
    record.removing = true;
    h.shutdown.cancel();
    h.rig
        .store
        .apply(vec![crate::store::Write::put(
            manager::RECORDS,
            "half",
            &record,
        )])
        .await
        .unwrap();
    let mut events = h.rig.events.subscribe(Some(0));
    let h = h.restart_agent().await;
    // The last event of a removal says "removed".
    loop {
        let Some(crate::events::Delivery::Event(event)) = events.next().await else {
            continue;
        };
        if let crate::events::EventPayload::App(app) = &event.payload
            && app.name() == "half"
            && app.reason == "removed"
        {
            break;
        }
    }
    assert!(h.apps.get("half").is_err());
    assert!(h.engine.existing().is_empty());
    let stored: Vec<(String, AppRecord)> = h.rig.store.scan(manager::RECORDS).unwrap();
    assert!(stored.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_admission_hold_stops_new_starts_but_never_a_running_app() {
    let h = Harness::new();
    let mut spec = web("running");
    spec.health.probe = Probe::None;
    h.apps.deploy(spec.clone()).await.unwrap();
    let running = h.state("running", AppState::Ready).await;
    h.rig.admission.hold("disk", "/var/lib/docker is critical");
    spec.name = "new".into();
    h.apps.deploy(spec).await.unwrap();
    h.until("new", "the hold", |r| {
        r.state == AppState::Pending
            && r.reason == "new starts are held (disk: /var/lib/docker is critical)"
    })
    .await;
    assert_eq!(h.apps.get("running").unwrap().state, AppState::Ready);
    assert!(h.engine.running().contains(&running.container_id));
    h.rig.admission.release("disk");
    h.state("new", AppState::Ready).await;
    assert!(!h.engine.calls().iter().any(|c| c.starts_with("stop")));
}

#[tokio::test(start_paused = true)]
async fn apps_wait_for_slots_and_for_an_unhealthy_mount() {
    let mounts = Arc::new(OneMount(Mutex::new(MountResolution::Unavailable(
        "stale".into(),
    ))));
    let h = Harness::with(
        Rig::new(),
        Arc::new(FakeAppEngine::with_images(&[IMAGE])),
        1,
        mounts.clone(),
    );
    let mut spec = web("first");
    spec.health.probe = Probe::None;
    h.apps.deploy(spec.clone()).await.unwrap();
    h.state("first", AppState::Ready).await;
    spec.name = "second".into();
    h.apps.deploy(spec.clone()).await.unwrap();
    h.until("second", "the slot wait", |r| {
        r.state == AppState::Pending && r.reason == "waiting for 1 free job slots"
    })
    .await;
    h.apps.remove("first").await.unwrap();
    h.state("second", AppState::Ready).await;

    spec.name = "mounted".into();
    spec.mounts.push(crate::jobs::JobMount {
        source: crate::jobs::MountSource::Managed("data".into()),
        container_path: "/data".into(),
        read_only: true,
    });
    h.apps.remove("second").await.unwrap();
    h.apps.deploy(spec).await.unwrap();
    h.until("mounted", "the mount wait", |r| {
        r.reason == "waiting for mount \"data\": stale"
    })
    .await;
    *mounts.0.lock().unwrap() = MountResolution::Ready(h.rig.subdir("data"));
    let ready = h.state("mounted", AppState::Ready).await;
    let binds = h.engine.spec_of(&ready.container_id).unwrap().binds;
    assert_eq!(binds[0].target, "/data");
}

#[tokio::test(start_paused = true)]
async fn a_fixed_host_port_in_use_fails_the_deploy_naming_the_port_and_its_user() {
    let h = Harness::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = u32::from(listener.local_addr().unwrap().port());
    let mut spec = web("web");
    spec.ports[0].host_port = port;
    let error = h.apps.deploy(spec.clone()).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("ports: host port 127.0.0.1:{port} is already in use")
    );
    drop(listener);
    spec.health.probe = Probe::None;
    h.apps.deploy(spec.clone()).await.unwrap();
    h.state("web", AppState::Ready).await;
    spec.name = "other".into();
    let error = h.apps.deploy(spec).await.unwrap_err();
    assert!(
        error
            .to_string()
            .ends_with("is already in use by app \"web\""),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn deploy_is_idempotent_and_a_changed_spec_rolls_when_ports_allow() {
    let h = Harness::new();
    let spec = web("web");
    assert_eq!(
        h.apps.deploy(spec.clone()).await.unwrap().rollout,
        Rollout::Created
    );
    let starting = h.state("web", AppState::Starting).await;
    let old_addr = Harness::addr(&starting);
    h.prober.answer(old_addr, 200);
    let ready = h.state("web", AppState::Ready).await;
    assert_eq!(
        h.apps.deploy(spec.clone()).await.unwrap().rollout,
        Rollout::Unchanged
    );

    let mut changed = spec.clone();
    changed.env.insert("MODEL".into(), "v2".into());
    assert_eq!(
        h.apps.deploy(changed.clone()).await.unwrap().rollout,
        Rollout::Rolling
    );
    // The new container starts beside the old one, on a new port.
    let mut changes = h.engine.changes();
    while h.engine.running().len() < 2 {
        changes.changed().await.unwrap();
    }
    let new_id = h
        .engine
        .running()
        .into_iter()
        .find(|id| *id != ready.container_id)
        .unwrap();
    let new_port = h.engine.spec_of(&new_id).unwrap().ports[0].host_port;
    assert_ne!(u32::from(old_addr.port()), new_port);
    assert_eq!(
        h.apps.get("web").unwrap().state,
        AppState::Ready,
        "the old one serves on"
    );
    h.prober
        .answer(SocketAddr::from(([127, 0, 0, 1], new_port as u16)), 200);
    let rolled = h
        .until("web", "the new generation", |r| r.generation == 2)
        .await;
    assert_eq!(rolled.state, AppState::Ready);
    assert_eq!(rolled.container_id, new_id);
    assert_eq!(rolled.spec.env["MODEL"], "v2");
    while h.engine.existing() != vec![new_id.clone()] {
        changes.changed().await.unwrap();
    }

    // A fixed host port: stop-then-start.
    let mut fixed = changed;
    fixed.ports[0].host_port = u32::from(old_addr.port());
    assert_eq!(
        h.apps.deploy(fixed).await.unwrap().rollout,
        Rollout::StopThenStart
    );
    let third = h
        .until("web", "generation 3", |r| {
            r.generation == 3 && r.state == AppState::Starting
        })
        .await;
    assert_eq!(third.host_ports["http"], u32::from(old_addr.port()));
}

#[tokio::test(start_paused = true)]
async fn restart_app_restarts_without_counting_and_keeps_the_port() {
    let h = Harness::new();
    let mut spec = web("web");
    spec.health.probe = Probe::None;
    h.apps.deploy(spec).await.unwrap();
    let ready = h.state("web", AppState::Ready).await;
    h.apps.restart("web").unwrap();
    let again = h
        .until("web", "a new container", |r| {
            r.state == AppState::Ready && r.container_id != ready.container_id
        })
        .await;
    assert_eq!(again.restarts, 0);
    assert_eq!(again.host_ports, ready.host_ports);
}

#[tokio::test(start_paused = true)]
async fn a_missing_image_fails_with_the_reason() {
    let h = Harness::new();
    let mut spec = web("web");
    spec.image = "nowhere/model:1".into();
    h.apps.deploy(spec).await.unwrap();
    let failed = h.state("web", AppState::Failed).await;
    assert!(
        failed.reason.contains("nowhere/model:1"),
        "{}",
        failed.reason
    );
    assert_eq!(h.slots.in_use(), 0);
}

//! The sampling service on paused time, with fake sources, a real store in
//! a temp dir and a recording stop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::events::Delivery;
use crate::lifecycle::stop::RecordingStop;

/// A source whose reading the test sets.
struct FakeSource {
    kind: SourceKind,
    reading: Mutex<Reading>,
}

#[async_trait]
impl ActivitySource for FakeSource {
    fn kind(&self) -> SourceKind {
        self.kind
    }
    async fn read(&self) -> Reading {
        self.reading.lock().unwrap().clone()
    }
}

struct Rig {
    service: LifecycleService,
    jobs: Arc<FakeSource>,
    stop: Arc<RecordingStop>,
    events: EventBus,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Rig {
    fn new(store: &Store, policy: IdleShutdownPolicy) -> Self {
        let jobs = Arc::new(FakeSource {
            kind: SourceKind::Jobs,
            reading: Mutex::new(Reading::Quiet),
        });
        let stop = Arc::new(RecordingStop::default());
        let events = EventBus::new(256);
        let config = LifecycleConfig {
            sample_interval_seconds: 5,
            idle_shutdown: policy,
            ..LifecycleConfig::default()
        };
        let service = LifecycleService::new(LifecycleParts {
            config: watch::channel(config).1,
            sources: vec![jobs.clone()],
            store: store.clone(),
            events: events.clone(),
            stop: Arc::new(stop.clone()),
        });
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        service.start(&tasks, &cancel);
        Self {
            service,
            jobs,
            stop,
            events,
            cancel,
            tasks,
        }
    }

    fn set(&self, reading: Reading) {
        *self.jobs.reading.lock().unwrap() = reading;
    }

    /// The lifecycle events published so far.
    fn lifecycle_events(&self) -> Vec<LifecycleEvent> {
        let mut subscription = self.events.subscribe(Some(0));
        let mut seen = Vec::new();
        while let Some(delivery) = subscription.try_next() {
            if let Delivery::Event(event) = delivery
                && let EventPayload::Lifecycle(e) = &event.payload
            {
                seen.push((**e).clone());
            }
        }
        seen
    }

    async fn stop_loop(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

fn policy(timeout: u32, warn: u32) -> IdleShutdownPolicy {
    IdleShutdownPolicy {
        enabled: true,
        idle_timeout_seconds: timeout,
        warn_before_seconds: warn,
    }
}

fn requests(events: &[LifecycleEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, LifecycleEvent::IdleShutdownRequested { .. }))
        .count()
}

#[tokio::test(start_paused = true)]
async fn idle_past_the_timeout_stops_once_with_one_warning() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rig = Rig::new(&store, policy(60, 30));
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(rig.stop.calls.lock().unwrap().len(), 1);
    let events = rig.lifecycle_events();
    assert_eq!(requests(&events), 1, "{events:?}");
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, LifecycleEvent::IdleShutdownPending { .. }))
            .count(),
        1,
        "60 s is under 5 minutes: one warning; {events:?}"
    );
    assert!(rig.service.activity().idle);
    rig.stop_loop().await;
}

#[tokio::test(start_paused = true)]
async fn an_active_source_keeps_the_instance_up_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rig = Rig::new(&store, policy(60, 30));
    rig.set(Reading::count(1, Some("job train-42 running".into())));
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(rig.stop.calls.lock().unwrap().is_empty());
    let activity = rig.service.activity();
    assert!(!activity.idle);
    let (kind, last) = activity.last_activity_source.unwrap();
    assert_eq!(kind, SourceKind::Jobs);
    assert_eq!(last.detail, "job train-42 running");
    // Quiet again: the clock starts from the first quiet sample.
    rig.set(Reading::Quiet);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(rig.service.activity().idle);
    assert!(rig.stop.calls.lock().unwrap().is_empty());
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(rig.stop.calls.lock().unwrap().len(), 1);
    rig.stop_loop().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_keeps_the_idle_clock_and_does_not_ask_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rig = Rig::new(&store, policy(100, 10));
    tokio::time::sleep(Duration::from_secs(60)).await;
    let since = rig.service.activity().idle_since.unwrap();
    rig.stop_loop().await;
    let mut record: Persisted = store.get(TABLE, KEY).unwrap().unwrap();
    assert_eq!(record.idle_since_ms, Some(to_ms(since)));
    // Paused time does not move the wall clock: make the record 90 s old,
    // as after an agent that was idle 60 s and down 30 s.
    let since = from_ms(to_ms(SystemTime::now() - Duration::from_secs(90)));
    record.idle_since_ms = Some(to_ms(since));
    store
        .apply(vec![Write::put(TABLE, KEY, &record)])
        .await
        .unwrap();
    let rig = Rig::new(&store, policy(100, 10));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let activity = rig.service.activity();
    assert_eq!(activity.idle_since, Some(since), "the idle clock went on");
    assert!(rig.stop.calls.lock().unwrap().is_empty());
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(
        rig.stop.calls.lock().unwrap().len(),
        1,
        "at 100 s, not 190 s"
    );
    rig.stop_loop().await;
    let rig = Rig::new(&store, policy(100, 10));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        rig.stop.calls.lock().unwrap().is_empty(),
        "requested already in this idle stretch"
    );
    assert_eq!(rig.service.activity().idle_since, Some(since));
    rig.stop_loop().await;
}

#[tokio::test(start_paused = true)]
async fn postpone_moves_the_stop_and_is_kept_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rig = Rig::new(&store, policy(60, 30));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let activity = rig
        .service
        .postpone(Duration::from_secs(300), "demo".into(), "alice".into())
        .await
        .unwrap();
    let postponement = activity.postponement.unwrap();
    assert_eq!(postponement.reason, "demo");
    assert_eq!(activity.idle_shutdown_at, Some(postponement.until));
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert!(rig.stop.calls.lock().unwrap().is_empty());
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert_eq!(rig.stop.calls.lock().unwrap().len(), 1);
    let error = rig
        .service
        .postpone(Duration::ZERO, String::new(), String::new())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("duration_seconds"), "{error}");
    rig.stop_loop().await;
}

#[tokio::test(start_paused = true)]
async fn a_policy_set_over_the_api_is_validated_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rig = Rig::new(&store, IdleShutdownPolicy::default());
    let bad = rig.service.set_policy(policy(5, 0)).await.unwrap_err();
    assert!(bad.to_string().contains("idle_timeout_seconds"), "{bad}");
    rig.service.set_policy(policy(600, 60)).await.unwrap();
    rig.stop_loop().await;
    let rig = Rig::new(&store, IdleShutdownPolicy::default());
    assert_eq!(rig.service.activity().policy, policy(600, 60));
    rig.stop_loop().await;
}

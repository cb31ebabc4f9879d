//! Starting queued jobs: capacity, order, holds, the engine, GPUs and a
//! shrinking capacity, against the fake engine with paused time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::health::{ConditionState, Subsystem};
use crate::jobs::WantStage;
use crate::jobs::engine_monitor;
use crate::jobs::fake::FakeEngine;
use crate::jobs::harness::{Harness, config, gpu, spec};
use crate::jobs::manager::RECORDS;
use crate::jobs::record::{JobRecord, JobState};
use crate::store::Write;
use crate::testing::Rig;

use JobState::{Queued, Running, Starting};

#[tokio::test(start_paused = true)]
async fn never_more_running_than_capacity() {
    let h = Harness::new(2);
    for i in 0..6 {
        h.submit(&format!("j{i}")).await;
    }
    h.wait_for("two running", |h| h.engine.running().len() == 2)
        .await;
    assert_eq!(h.manager.slot_usage().queued, 4);
    let mut ended = 0;
    while ended < 6 {
        h.wait_for("a job running", |h| !h.engine.running().is_empty())
            .await;
        for c in h.engine.running() {
            h.engine.exit(&c, 0, false);
            ended += 1;
        }
    }
    h.wait_for("all succeeded", |h| {
        (0..6).all(|i| h.state(&format!("j{i}")) == JobState::Succeeded)
    })
    .await;
    h.wait_for("containers removed", |h| h.engine.existing().is_empty())
        .await;
    assert_eq!(h.manager.slot_usage().in_use, 0);
    // Counted by the engine at every start, not sampled: never more than
    // the capacity at once, and the capacity was used.
    assert_eq!(h.engine.peak_running(), 2);
}

#[tokio::test(start_paused = true)]
async fn priority_then_fifo() {
    let h = Harness::new(1);
    h.rig.admission.hold("test", "hold");
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
    h.rig.admission.release("test");
    h.wait_for("high runs first", |h| h.state("high") == Running)
        .await;
    assert_eq!(h.state("low1"), Queued);
    assert_eq!(h.history("low1"), [Queued], "never started before high");
}

#[tokio::test(start_paused = true)]
async fn held_queue_starts_nothing_until_released() {
    let h = Harness::new(2);
    h.rig.admission.hold("disk", "/ is critical");
    let submitted = h.manager.submit(spec("a")).await.unwrap();
    // The hold is what the job and the slot usage state as the reason.
    assert_eq!(submitted.record.reason, "held: disk: / is critical");
    assert_eq!(
        h.manager.get("a").unwrap().record.reason,
        "held: disk: / is critical"
    );
    assert_eq!(h.manager.slot_usage().held_reason, "disk: / is critical");
    assert_eq!(h.history("a"), [Queued]);
    assert!(h.calls_starting("create").is_empty());
    h.rig.admission.release("disk");
    h.wait_for("a published running", |h| {
        h.history("a") == [Queued, Starting, Running]
    })
    .await;
    assert!(h.manager.slot_usage().held_reason.is_empty());
}

#[tokio::test(start_paused = true)]
async fn engine_down_keeps_jobs_queued() {
    let engine = Arc::new(FakeEngine::new());
    engine.set_down(true);
    let mut h = Harness::on(Rig::new(), engine, config(2));
    // The real engine monitor says whether the engine answers.
    let (unused, _) = watch::channel(false);
    let engine_up = std::mem::replace(&mut h.engine_up, unused);
    let (_interval_tx, interval) = watch::channel(Duration::from_secs(10));
    h.rig.tasks.spawn(engine_monitor::run(
        h.engine.clone(),
        h.rig.health.clone(),
        engine_up,
        interval,
        h.rig.cancel.clone(),
    ));
    h.submit("a").await;
    h.wait_for("the docker condition failed", |h| {
        h.rig.health.get(Subsystem::Docker).state == ConditionState::Failed
    })
    .await;
    // The condition states why; the manager has not even reconciled with
    // an engine the monitor calls down, let alone created a container.
    assert_eq!(h.state("a"), Queued);
    assert_eq!(h.history("a"), [Queued]);
    let calls = h.engine.calls();
    assert!(calls.iter().all(|c| c == "version"), "{calls:?}");
    h.engine.set_down(false);
    h.wait_for("a published running", |h| {
        h.history("a") == [Queued, Starting, Running]
    })
    .await;
    assert_eq!(
        h.rig.health.get(Subsystem::Docker).state,
        ConditionState::Ok
    );
}

#[tokio::test(start_paused = true)]
async fn a_job_that_no_longer_fits_after_capacity_shrinks_fails_and_unblocks_the_queue() {
    let h = Harness::new(4);
    let mut c = config(4);
    c.reserve_after_seconds = 0;
    h.config.send_replace(c.clone());
    h.rig.admission.hold("test", "hold");
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
    let small = h.manager.get("small").unwrap().record;
    assert_eq!(small.state, Queued);
    assert_eq!(small.reason, "held: test: hold", "still held");
    h.rig.admission.release("test");
    h.wait_for("small runs", |h| h.state("small") == Running)
        .await;
    h.wait_for("stored", |h| h.stored("big").state == JobState::Failed)
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_gpu_job_waiting_for_gpus_does_not_keep_cpu_jobs_from_free_slots() {
    let h = Harness::new(4);
    let mut c = config(4);
    c.reserve_after_seconds = 0;
    h.config.send_replace(c);
    h.gpus.send_replace(vec![gpu(0)]);
    let mut first = spec("gpu-a");
    first.gpus = 1;
    h.manager.submit(first).await.unwrap();
    h.wait_for("gpu-a running", |h| h.state("gpu-a") == Running)
        .await;
    let mut second = spec("gpu-b");
    second.gpus = 1;
    h.manager.submit(second).await.unwrap();
    h.submit("cpu").await;
    h.wait_for("cpu runs beside", |h| h.state("cpu") == Running)
        .await;
    // The pass that started "cpu" passed over "gpu-b", queued before it.
    assert_eq!(h.state("gpu-b"), Queued);
    let a = h.container_of("gpu-a");
    h.engine.exit(&a, 0, false);
    h.wait_for("gpu-b runs", |h| h.state("gpu-b") == Running)
        .await;
    assert_eq!(h.manager.get("gpu-b").unwrap().record.gpu_indices, vec![0]);
}

#[tokio::test(start_paused = true)]
async fn gpu_jobs_wait_for_discovery_then_fail_when_there_are_none() {
    let h = Harness::new(4);
    h.gpus_discovered.send_replace(false);
    let mut s = spec("gpu");
    s.gpus = 1;
    let queued = h.manager.submit(s).await.unwrap().record;
    assert_eq!(queued.state, Queued, "not refused before discovery");
    h.submit("cpu").await;
    h.wait_for("cpu runs", |h| h.state("cpu") == Running).await;
    // The pass that started "cpu" passed over "gpu", queued before it.
    assert_eq!(h.state("gpu"), Queued, "waits for discovery");
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
        Err(crate::jobs::JobError::NoGpus { gpus: 1, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn gpu_jobs_queued_before_discovery_run_on_the_gpus_found() {
    let h = Harness::new(4);
    h.gpus_discovered.send_replace(false);
    let mut s = spec("gpu");
    s.gpus = 1;
    h.manager.submit(s).await.unwrap();
    h.gpus.send_replace(vec![gpu(3)]);
    h.gpus_discovered.send_replace(true);
    h.wait_for("gpu runs", |h| h.state("gpu") == Running).await;
    let container = h.container_of("gpu");
    assert_eq!(h.engine.spec_of(&container).unwrap().gpus, vec![3]);
}

#[tokio::test(start_paused = true)]
async fn a_queued_job_above_the_capacity_after_a_restart_fails_at_start() {
    let rig = Rig::new();
    let mut big = spec("big");
    big.slots = 3;
    let writes = vec![
        Write::put(RECORDS, "big", &JobRecord::queued(big, 0)),
        Write::put(RECORDS, "small", &JobRecord::queued(spec("small"), 1)),
    ];
    rig.store.apply(writes).await.unwrap();
    // Fewer cores than when it was accepted: capacity 2.
    let h = Harness::on(rig, Arc::new(FakeEngine::new()), config(2));
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
    h.wait_for("small runs", |h| h.state("small") == Running)
        .await;
}

/// A manager with `slots` slots on the fake images domain.
fn with_images(slots: u32) -> (Harness, Arc<crate::jobs::fake::FakeImages>) {
    let images = Arc::new(crate::jobs::fake::FakeImages::new());
    let h = Harness::with_parts(
        Rig::new(),
        Arc::new(FakeEngine::new()),
        config(slots),
        Arc::new(crate::jobs::NoManagedMounts),
        images.clone(),
    );
    (h, images)
}

fn on_image(id: &str, image: &str) -> crate::jobs::JobSpec {
    let mut s = spec(id);
    s.image = image.into();
    s
}

#[tokio::test(start_paused = true)]
async fn a_job_holds_no_slot_while_its_image_is_pulled() {
    let (h, images) = with_images(1);
    images.make_local("busybox", "busybox@sha256:1");
    h.manager
        .submit(on_image("pulling", "team/env:1"))
        .await
        .unwrap();
    h.submit("local").await;
    h.wait_for("the local job runs", |h| h.state("local") == Running)
        .await;
    let view = h.manager.get("pulling").unwrap();
    assert_eq!(view.record.state, Queued);
    assert!(
        view.record.reason.starts_with("pulling image team/env:1"),
        "{}",
        view.record.reason
    );
    assert_eq!(view.pull.expect("the pull").layers_total, 4);
    // Pulled meanwhile: it starts the moment the slot frees.
    images.make_local("team/env:1", "team/env@sha256:2");
    let local = h.container_of("local");
    h.engine.exit(&local, 0, false);
    h.wait_for("the pulled job runs", |h| h.state("pulling") == Running)
        .await;
}

#[tokio::test(start_paused = true)]
async fn wants_follow_the_queue_with_the_due_job_first_and_running_jobs_last() {
    let (h, images) = with_images(1);
    images.make_local("busybox", "busybox@sha256:1");
    h.submit("running").await;
    h.wait_for("running", |h| h.state("running") == Running)
        .await;
    h.manager
        .submit(on_image("second", "team/b:1"))
        .await
        .unwrap();
    let mut high = on_image("first", "team/a:1");
    high.priority = 5;
    h.manager.submit(high).await.unwrap();
    h.wait_quietly_for("both wanted", |_| images.wants().len() == 3)
        .await;
    let wants: Vec<(String, WantStage)> = images
        .wants()
        .into_iter()
        .map(|w| (w.job, w.stage))
        .collect();
    assert_eq!(
        wants,
        [
            ("first".to_owned(), WantStage::Queued),
            ("second".to_owned(), WantStage::Queued),
            ("running".to_owned(), WantStage::Active),
        ],
        "nothing is due while the only slot is busy"
    );
    let running = h.container_of("running");
    h.engine.exit(&running, 0, false);
    h.wait_quietly_for("the first is due", |_| {
        images
            .wants()
            .first()
            .is_some_and(|w| w.job == "first" && w.stage == WantStage::Due)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_pull_fails_the_job_with_its_reason() {
    let (h, images) = with_images(1);
    h.manager.submit(on_image("j", "team/env:1")).await.unwrap();
    images.fail(
        "team/env:1",
        "registry 127.0.0.1:5443 requires credentials and none are set",
    );
    h.wait_for("failed", |h| h.state("j") == JobState::Failed)
        .await;
    assert_eq!(
        h.manager.get("j").unwrap().record.reason,
        "cannot pull image team/env:1: registry 127.0.0.1:5443 requires credentials and none are set"
    );
    assert!(h.engine.calls().iter().all(|c| !c.starts_with("create")));
}

#[tokio::test(start_paused = true)]
async fn the_digest_is_recorded_before_the_container_is_created_from_it() {
    let (h, images) = with_images(1);
    images.make_local("team/env:1", "team/env@sha256:abc");
    h.manager.submit(on_image("j", "team/env:1")).await.unwrap();
    h.wait_for("running", |h| h.state("j") == Running).await;
    let container = h.container_of("j");
    assert_eq!(
        h.engine.spec_of(&container).unwrap().image,
        "team/env@sha256:abc"
    );
    assert_eq!(h.stored("j").image_digest, "team/env@sha256:abc");
}

#[tokio::test(start_paused = true)]
async fn an_image_gone_before_create_is_pulled_again() {
    let (h, images) = with_images(1);
    images.make_local("team/env:1", "team/env@sha256:abc");
    images.vanish_before_create("team/env:1");
    h.manager.submit(on_image("j", "team/env:1")).await.unwrap();
    h.wait_quietly_for("forgotten", |_| !images.forgotten().is_empty())
        .await;
    assert_eq!(images.forgotten(), ["team/env:1"]);
    h.wait_for("back in the queue", |h| h.state("j") == Queued)
        .await;
    assert!(h.engine.calls().iter().all(|c| !c.starts_with("create")));
    images.make_local("team/env:1", "team/env@sha256:abc");
    h.wait_for("running", |h| h.state("j") == Running).await;
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_job_is_no_longer_wanted() {
    let (h, images) = with_images(1);
    h.manager.submit(on_image("j", "team/env:1")).await.unwrap();
    h.wait_quietly_for("wanted", |_| images.wants().len() == 1)
        .await;
    h.manager.cancel("j").await.unwrap();
    h.wait_quietly_for("released", |_| images.wants().is_empty())
        .await;
}

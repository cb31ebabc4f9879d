//! Crash recovery against the fake engine, with paused time: every window a
//! crash can leave, adoption of running jobs, and cancels that must survive
//! a restart.

use crate::jobs::harness::{Harness, config, crashed_with, labelled};
use crate::jobs::record::JobState;

use JobState::{Cancelled, Running};

#[tokio::test(start_paused = true)]
async fn records_survive_a_restart_and_running_jobs_are_adopted() {
    let h = Harness::new(2);
    h.submit("a").await;
    h.submit("b").await;
    h.submit("c").await;
    h.wait_for("two running", |h| h.engine.running().len() == 2)
        .await;
    let a = h.container_of("a");
    let wait_on_a = format!("wait {a}");
    let waits_on_a = |h: &Harness| h.calls_starting(&wait_on_a).len();
    // "running" is recorded just before the wait on the container starts;
    // restart only once that first wait is under way.
    h.wait_for("waiting on a", |h| waits_on_a(h) == 1).await;
    let h = h.restart().await;
    h.wait_for("adopted: waiting on a again", |h| waits_on_a(h) == 2)
        .await;
    assert_eq!(h.state("a"), Running);
    assert_eq!(
        h.calls_starting("create").len(),
        2,
        "no container created twice: {:?}",
        h.engine.calls()
    );
    h.engine.exit(&a, 0, false);
    h.wait_for("a done", |h| h.state("a") == JobState::Succeeded)
        .await;
    h.wait_for("c runs", |h| h.state("c") == Running).await;
}

#[tokio::test(start_paused = true)]
async fn reconcile_handles_every_crash_window() {
    let (rig, engine) = crashed_with(&[
        ("exited", Running),
        ("created", JobState::Starting),
        ("intent", JobState::Starting),
        ("vanished", Running),
        ("done", JobState::Succeeded),
    ])
    .await;
    engine.insert("cx", labelled("exited"), "exited", Some(7));
    engine.insert("cc", labelled("created"), "created", None);
    engine.insert("cd", labelled("done"), "exited", Some(0));
    engine.insert("orphan", labelled("unknown-job"), "exited", Some(0));
    engine.insert("lost", labelled("lost-job"), "running", None);

    let h = Harness::on(rig, engine, config(4));
    h.wait_for("exited recorded", |h| h.state("exited") == JobState::Failed)
        .await;
    assert_eq!(h.manager.get("exited").unwrap().record.exit_code, Some(7));
    h.wait_for("created started", |h| h.state("created") == Running)
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
    h.wait_for("intent re-run", |h| h.state("intent") == Running)
        .await;
    h.wait_for("a finished job's container removed", |h| {
        !h.engine.existing().contains(&"cd".to_string())
    })
    .await;
    // Containers that no record owns are kept, running or not, and
    // reported: their records may be what was lost.
    let existing = h.engine.existing();
    assert!(existing.contains(&"orphan".to_string()), "{existing:?}");
    assert!(existing.contains(&"lost".to_string()), "{existing:?}");
    let mut unknown: Vec<String> = h
        .manager
        .unknown_containers()
        .iter()
        .map(|c| c.describe())
        .collect();
    unknown.sort();
    assert_eq!(
        unknown,
        [
            "lost (job lost-job, running)",
            "orphan (job unknown-job, exited)"
        ]
    );
    assert!(!h.manager.is_finished("unknown-job"));
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

#[tokio::test(start_paused = true)]
async fn a_cancelled_running_job_is_stored_final_and_stays_so_after_a_restart() {
    let h = Harness::new(1);
    h.submit("a").await;
    h.wait_for("a running", |h| h.state("a") == Running).await;
    let reply = h.manager.cancel("a").await.unwrap();
    assert_eq!(reply.state, Cancelled);
    h.wait_for("stored final", |h| h.stored("a").state == Cancelled)
        .await;
    // Every save is in: nothing older may land after the final state.
    h.wait_for("container removed", |h| h.engine.existing().is_empty())
        .await;
    assert_eq!(h.stored("a"), h.manager.get("a").unwrap().record);
    let lists_before = h.calls_starting("list").len();
    let h = h.restart().await;
    // Reconciliation is what would act on a stale stored state (a "running"
    // job without a container fails as lost): wait until it has run.
    h.wait_for("reconciled", |h| {
        h.calls_starting("list").len() > lists_before && h.manager.lock().reconciled
    })
    .await;
    let record = h.manager.get("a").unwrap().record;
    assert_eq!(record.state, Cancelled, "{}", record.reason);
    assert_eq!(h.stored("a").state, Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_cancel_before_reconciliation_is_durable_and_honoured() {
    let (rig, engine) = crashed_with(&[
        ("running", Running),
        ("created", JobState::Starting),
        ("intent", JobState::Starting),
    ])
    .await;
    engine.insert("cr", labelled("running"), "running", None);
    engine.insert("cc", labelled("created"), "created", None);
    // The engine does not answer yet: nothing is reconciled.
    engine.set_down(true);
    let h = Harness::on(rig, engine, config(4));
    for id in ["running", "created", "intent"] {
        let reply = h.manager.cancel(id).await.unwrap();
        assert!(reply.cancel_requested, "{id}");
        assert!(!reply.state.is_final(), "{id}");
        assert!(h.stored(id).cancel_requested, "{id}: durable");
    }
    // The request survives a crash before the engine came back.
    let h = h.restart().await;
    h.engine.set_down(false);
    h.engine_up.send_replace(true);
    for id in ["running", "created", "intent"] {
        h.wait_for("cancelled", |h| h.state(id) == Cancelled).await;
    }
    let calls = h.engine.calls();
    assert!(calls.iter().any(|c| c.starts_with("stop cr")), "{calls:?}");
    assert!(!calls.iter().any(|c| c == "start cc"), "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("create")), "{calls:?}");
    h.wait_for("containers removed", |h| h.engine.existing().is_empty())
        .await;
    for id in ["running", "created", "intent"] {
        h.wait_for("stored", |h| h.stored(id).state == Cancelled)
            .await;
    }
}

#[tokio::test(start_paused = true)]
async fn containers_of_unknown_origin_go_only_through_the_step_that_is_asked_for() {
    use crate::disk::reclaim::ReclaimStep;
    use crate::jobs::UnknownContainers;

    let (rig, engine) = crashed_with(&[("known", Running)]).await;
    engine.insert("ck", labelled("known"), "running", None);
    engine.insert("lost", labelled("lost-job"), "running", None);
    let mut no_job = labelled("x");
    no_job.labels.remove(crate::jobs::LABEL_JOB);
    engine.insert("nolabel", no_job, "exited", Some(0));
    let h = Harness::on(rig, engine, config(4));
    h.wait_for("reported", |h| h.manager.unknown_containers().len() == 2)
        .await;
    h.wait_for("known adopted", |h| h.state("known") == Running)
        .await;
    let step = UnknownContainers::new(h.manager.clone());
    assert!(step.only_when_asked());
    let estimate = step.estimate().await.unwrap();
    assert_eq!(estimate.items, 2);
    assert_eq!(h.engine.existing().len(), 3, "an estimate removes nothing");
    let freed = step.run().await.unwrap();
    assert_eq!(freed.items, 2);
    assert_eq!(h.engine.existing(), ["ck".to_string()]);
    assert!(h.manager.unknown_containers().is_empty());
    assert_eq!(h.state("known"), Running, "a known job is never touched");
}

#[tokio::test(start_paused = true)]
async fn submitting_the_lost_job_again_takes_its_container_over() {
    let (rig, engine) = crashed_with(&[]).await;
    engine.insert("lost", labelled("j1"), "running", None);
    let h = Harness::on(rig, engine, config(4));
    h.wait_for("reported", |h| h.manager.unknown_containers().len() == 1)
        .await;
    h.submit("j1").await;
    assert!(h.manager.unknown_containers().is_empty());
    h.wait_for("adopted", |h| h.state("j1") == Running).await;
    assert_eq!(h.manager.get("j1").unwrap().record.container_id, "lost");
    let calls = h.engine.calls();
    assert!(!calls.iter().any(|c| c == "start lost"), "{calls:?}");
    h.engine.exit("lost", 3, false);
    h.wait_for("its exit recorded", |h| h.state("j1") == JobState::Failed)
        .await;
    assert_eq!(h.manager.get("j1").unwrap().record.exit_code, Some(3));
}

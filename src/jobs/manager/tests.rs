//! The manager's handle against the fake engine, with paused time: submit
//! (idempotence, the queue limit, the view it returns), cancel (queued,
//! running, unknown, durable before the reply, racing a submit's save).

use super::JobError;
use crate::jobs::harness::{Harness, config, spec};
use crate::jobs::record::JobState;

use JobState::{Cancelled, Queued, Running};

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
async fn submit_returns_the_job_as_get_shows_it() {
    let h = Harness::new(1);
    h.rig.admission.hold("test", "hold");
    let first = h.manager.submit(spec("first")).await.unwrap();
    let second = h.manager.submit(spec("second")).await.unwrap();
    assert_eq!(first.queue_position, Some(0));
    assert_eq!(second.queue_position, Some(1));
    assert_eq!(second.record.state, Queued);
    assert_eq!(second.record.reason, "held: test: hold");
    let got = h.manager.get("second").unwrap();
    assert_eq!(
        (got.record, got.queue_position),
        (second.record, second.queue_position)
    );
    let again = h.manager.submit(spec("second")).await.unwrap();
    assert_eq!(again.queue_position, Some(1), "the existing job, in place");
}

#[tokio::test(start_paused = true)]
async fn queue_full_is_refused() {
    let h = Harness::new(1);
    h.rig.admission.hold("test", "hold");
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

#[tokio::test(start_paused = true)]
async fn cancel_queued_and_running() {
    let h = Harness::new(1);
    h.submit("run").await;
    h.submit("wait").await;
    h.wait_for("running", |h| h.state("run") == Running).await;
    let cancelled = h.manager.cancel("wait").await.unwrap();
    assert_eq!(cancelled.state, Cancelled);
    let again = h.manager.cancel("wait").await.unwrap();
    assert_eq!(again.state, Cancelled, "idempotent");
    let running = h.manager.cancel("run").await.unwrap();
    assert_eq!(running.state, Cancelled);
    assert!(!h.calls_starting("stop").is_empty());
    assert!(matches!(
        h.manager.cancel("nope").await,
        Err(JobError::NotFound(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn cancel_is_persisted_before_the_reply() {
    let h = Harness::new(1);
    h.rig.admission.hold("test", "hold");
    h.submit("q").await;
    h.manager.cancel("q").await.unwrap();
    assert_eq!(h.stored("q").state, Cancelled);
}

/// A cancel can reach a job while its submit is still saving it (the job is
/// visible at once, to answer a duplicate submit): the cancelled job must
/// not enter the queue when the save completes, or it would run.
#[tokio::test(start_paused = true)]
async fn a_job_cancelled_while_its_submit_saves_it_never_enters_the_queue() {
    let h = Harness::new(1);
    let manager = h.manager.clone();
    let submit = tokio::spawn(async move { manager.submit(spec("a")).await });
    // Runs the submit up to its save, which waits for the store.
    for _ in 0..100 {
        if h.manager.get("a").is_ok() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(!submit.is_finished(), "the save is still under way");
    let cancelled = h.manager.cancel("a").await.unwrap();
    assert_eq!(cancelled.state, Cancelled);
    let submitted = submit.await.unwrap().unwrap();
    assert_eq!(
        submitted.record.state, Cancelled,
        "the reply tells the truth"
    );
    assert_eq!(submitted.queue_position, None);
    assert_eq!(h.manager.slot_usage().queued, 0);
    assert_eq!(h.history("a"), [Cancelled], "no stale 'queued' after it");
    assert_eq!(h.stored("a").state, Cancelled);
    // "b" goes through the dispatcher, which would have started "a" first.
    h.submit("b").await;
    h.wait_for("b runs", |h| h.state("b") == Running).await;
    assert!(h.calls_starting("create ia-inst-a").is_empty());
}

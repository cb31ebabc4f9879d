//! The manager's handle against the fake engine, with paused time: submit
//! (idempotence, the queue limit, the view it returns), cancel (queued,
//! running, unknown, durable before the reply).

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

//! One job's life against the fake engine, with paused time: mounts at its
//! start, exit codes and OOM, timeout, kill grace, cancel while the engine
//! hangs or fails, an engine outage while it runs, and slots held until its
//! container is gone.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::exit_reason;
use crate::jobs::fake::FakeEngine;
use crate::jobs::harness::{Harness, config, spec};
use crate::jobs::record::JobState;
use crate::jobs::spec::{JobMount, MountSource};
use crate::jobs::{MountResolution, MountResolver};
use crate::testing::Rig;

use JobState::{Cancelled, Queued, Running, Starting};

/// A managed mount "data" that its last health check calls mounted, while
/// the check at a job's start says what the test sets.
struct DyingMount {
    alive: AtomicBool,
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
        if self.alive.load(Ordering::SeqCst) {
            self.resolve(name)
        } else {
            MountResolution::Unavailable("stale: Transport endpoint is not connected".into())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_mount_holds_a_job_at_its_start_and_explains_a_failure() {
    let mount = Arc::new(DyingMount {
        alive: false.into(),
    });
    let h = Harness::with_mounts(
        Rig::new(),
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
        r.state == Queued && r.reason.contains("waiting for mount data")
    })
    .await;
    assert!(
        h.calls_starting("create").is_empty(),
        "no container on a dead mount: {:?}",
        h.engine.calls()
    );
    mount.alive.store(true, Ordering::SeqCst);
    h.wait_for("a running", |h| h.state("a") == Running).await;
    let container = h.container_of("a");
    let binds = h.engine.spec_of(&container).unwrap().binds;
    assert_eq!(binds[0].source, PathBuf::from("/mnt/data"));

    // The mount dies under the running job, which fails: its reason says
    // why, not only how it exited.
    mount.alive.store(false, Ordering::SeqCst);
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

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
async fn timeout_stops_the_container() {
    let h = Harness::new(1);
    let mut s = spec("slow");
    s.timeout_seconds = 1;
    h.manager.submit(s).await.unwrap();
    h.wait_for("timed out", |h| h.state("slow") == JobState::TimedOut)
        .await;
    assert!(!h.calls_starting("stop").is_empty());
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

#[tokio::test(start_paused = true)]
async fn a_job_killed_while_the_engine_was_away_says_so() {
    let h = Harness::new(2);
    h.submit("a").await;
    h.wait_for("a running", |h| h.state("a") == Running).await;
    let container = h.container_of("a");
    let inspect = format!("inspect {container}");
    h.engine.set_down(true);
    // The wait on the container broke and the task looked at it instead.
    h.wait_for("the container inspected", |h| {
        h.engine.calls().contains(&inspect)
    })
    .await;
    h.engine.exit(&container, 137, false);
    h.engine.set_down(false);
    h.wait_for("a failed", |h| h.state("a") == JobState::Failed)
        .await;
    assert_eq!(
        h.manager.get("a").unwrap().record.reason,
        "exited with status 137 (killed by SIGKILL); the Docker engine went away while the job ran"
    );
}

/// After job "a" ended cancelled on a one-slot manager: "b" runs through
/// the same dispatcher, which would have started "a" first had it been
/// queued again, and only once "a" gave its slot back.
async fn a_next_job_runs_and_a_never_started(h: &Harness) {
    h.submit("b").await;
    h.wait_for("b runs", |h| h.state("b") == Running).await;
    let b = h.container_of("b");
    assert_eq!(
        h.calls_starting("start"),
        [format!("start {b}")],
        "only b's container was started"
    );
    assert_eq!(h.state("a"), Cancelled);
    assert_eq!(h.stored("a").state, Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_job_cancelled_while_its_create_hangs_never_starts() {
    let h = Harness::new(1);
    h.engine.set_create_hung(true);
    h.engine.set_create_fails(true);
    h.submit("a").await;
    h.wait_for("create sent", |h| !h.calls_starting("create").is_empty())
        .await;
    let reply = h.manager.cancel("a").await.unwrap();
    assert_eq!(reply.state, Starting, "the engine hangs: no answer yet");
    assert!(reply.cancel_requested);
    // The stuck create now fails (as a timed-out create does); the job must
    // not go back to the queue and start on the next attempt.
    h.engine.set_create_hung(false);
    h.wait_for("a cancelled", |h| h.state("a") == Cancelled)
        .await;
    assert_eq!(
        h.history("a"),
        [Queued, Starting, Cancelled],
        "never re-queued"
    );
    assert_eq!(h.manager.slot_usage().in_use, 0);
    h.engine.set_create_fails(false);
    a_next_job_runs_and_a_never_started(&h).await;
    assert_eq!(h.calls_starting("create ia-inst-a").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_job_cancelled_while_its_create_fails_ends_cancelled() {
    let h = Harness::new(1);
    h.engine.set_create_fails(true);
    h.submit("a").await;
    h.wait_for("create tried", |h| !h.calls_starting("create").is_empty())
        .await;
    // Whether it is back in the queue or starting again, it ends cancelled.
    h.manager.cancel("a").await.unwrap();
    h.wait_for("a cancelled", |h| h.state("a") == Cancelled)
        .await;
    let history = h.history("a");
    assert_eq!(history.last(), Some(&Cancelled), "{history:?}");
    assert!(!history.contains(&Running), "{history:?}");
    h.engine.set_create_fails(false);
    a_next_job_runs_and_a_never_started(&h).await;
}

#[tokio::test(start_paused = true)]
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
async fn slots_stay_held_until_the_container_is_removed() {
    let h = Harness::new(1);
    h.submit("a").await;
    h.submit("b").await;
    h.wait_for("a running", |h| h.state("a") == Running).await;
    let a = h.container_of("a");
    h.engine.set_remove_fails(true);
    h.engine.exit(&a, 0, false);
    h.wait_for("a succeeded", |h| h.state("a") == JobState::Succeeded)
        .await;
    h.wait_for("a removal tried twice", |h| {
        h.calls_starting(&format!("remove {a}")).len() >= 2
    })
    .await;
    assert_eq!(h.state("b"), Queued, "a's container still exists");
    assert_eq!(h.manager.slot_usage().in_use, 1);
    assert!(h.calls_starting("create").len() == 1);
    h.engine.set_remove_fails(false);
    h.wait_for("b runs once a is gone", |h| h.state("b") == Running)
        .await;
    assert!(!h.engine.existing().contains(&a));
}

//! The queue and the records on virtual time, with a fake runner and a real
//! store in a temp dir: creation once, startup after it, recovery after a
//! crash, the job gate, idempotency, refusals, bounds, pruning, logs.

use std::time::Duration;

use super::*;
use crate::health::{ConditionState, Subsystem};
use crate::setup::ScriptSource;
use crate::setup::config::SetupScriptKind;
use crate::setup::fake::FakeScript;
use crate::setup::testing::{SetupRig, finished, inline, settle, wait_started, wait_until};

#[tokio::test(start_paused = true)]
async fn creation_holds_jobs_then_startup_scripts_follow() {
    let mut rig = SetupRig::new();
    rig.declare(SetupScriptKind::Creation, "create.sh");
    rig.declare(SetupScriptKind::Startup, "start.sh");
    rig.runner
        .push(FakeScript::exits(0, Duration::from_secs(5), "created\n"));
    let service = rig.open();
    assert!(
        rig.agent
            .admission
            .held_reason()
            .unwrap()
            .contains("creation script"),
        "held from open, before anything runs"
    );
    assert_eq!(
        rig.agent.health.get(Subsystem::Setup).state,
        ConditionState::Unknown
    );
    let (cancel, _task) = rig.spawn(&service);
    settle(&service).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle(&service).await;
    assert_eq!(rig.agent.admission.held_reason(), None);
    let runs = service.list(&[], 10);
    let kinds: Vec<(SetupKind, RunState)> = runs.iter().map(|r| (r.kind, r.state)).collect();
    assert_eq!(
        kinds,
        vec![
            (SetupKind::Startup, RunState::Succeeded),
            (SetupKind::Creation, RunState::Succeeded)
        ]
    );
    let condition = rig.agent.health.get(Subsystem::Setup);
    assert_eq!(condition.state, ConditionState::Ok);
    assert!(
        condition.message.contains("1 startup script(s) succeeded"),
        "{}",
        condition.message
    );

    // Once succeeded, never again: a restart runs only the startup script.
    cancel.cancel();
    let (again, _c, _t) = rig.start();
    settle(&again).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle(&again).await;
    let creation_runs = again.list(&[SetupKind::Creation], 10);
    assert_eq!(creation_runs.len(), 1);
    assert_eq!(again.list(&[SetupKind::Startup], 10).len(), 2);
    assert_eq!(rig.agent.admission.held_reason(), None);
    let error = again
        .submit(RunRequest {
            kind: SetupKind::Creation,
            ..inline("true")
        })
        .await
        .unwrap_err();
    assert!(
        matches!(error, SetupError::CreationAlreadySucceeded { .. }),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_creation_keeps_jobs_held_with_exit_code_and_tail_and_skips_startup() {
    let mut rig = SetupRig::new();
    rig.declare(SetupScriptKind::Creation, "create.sh");
    rig.declare(SetupScriptKind::Startup, "start.sh");
    rig.runner.push(FakeScript::exits(
        2,
        Duration::from_secs(1),
        "step 1\nE: Unable to locate package nvidia-driver-999\n",
    ));
    let (service, _cancel, _task) = rig.start();
    settle(&service).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let condition = rig.agent.health.get(Subsystem::Setup);
    assert_eq!(condition.state, ConditionState::Failed);
    assert!(
        condition.message.contains("exited with status 2"),
        "{}",
        condition.message
    );
    assert!(
        condition.message.contains("Unable to locate package"),
        "{}",
        condition.message
    );
    assert!(rig.agent.admission.held_reason().is_some());
    assert!(service.list(&[SetupKind::Startup], 10).is_empty());
    assert_eq!(rig.runner.launches().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crash_mid_creation_is_recorded_and_re_run_once() {
    let mut rig = SetupRig::new();
    rig.declare(SetupScriptKind::Creation, "create.sh");
    // First life: the creation script hangs; the agent "crashes" (the
    // executor is dropped with the record still RUNNING).
    rig.runner.push(FakeScript::hangs(false));
    let (service, _cancel, task) = rig.start();
    service.recovered().await;
    let first = service.list(&[SetupKind::Creation], 1)[0].clone();
    wait_started(&rig.runner, 1).await;
    task.abort();
    let _ = task.await;
    drop(service);

    // Second life: interrupted, then re-run as attempt 2, which succeeds.
    let (service, _cancel, _task) = rig.start();
    let old = service.get(&first.id).unwrap();
    assert_eq!(old.state, RunState::Interrupted);
    assert!(old.message.contains("crashed"), "{}", old.message);
    settle(&service).await;
    let runs = service.list(&[SetupKind::Creation], 10);
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].attempt, 2);
    assert_eq!(runs[0].state, RunState::Succeeded);
    assert!(runs[0].message.contains("exited with status 0"));
    assert_eq!(rig.runner.orphan_sweeps(), vec![vec![first.id.clone()]]);
    let stored = rig.stored(&first.id).unwrap();
    assert_eq!(stored.state, RunState::Interrupted, "recorded durably");
    assert_eq!(rig.agent.admission.held_reason(), None);
}

#[tokio::test(start_paused = true)]
async fn the_inline_script_of_a_run_cut_short_is_removed_at_the_next_start() {
    let rig = SetupRig::new();
    rig.runner.push(FakeScript::hangs(false));
    let (service, _cancel, task) = rig.start();
    let run = service.submit(inline("sleep 1000")).await.unwrap();
    wait_started(&rig.runner, 1).await;
    let script = resolve::inline_script_path(&rig.scripts_dir(), &run.id);
    assert!(script.is_file(), "written for the run");
    task.abort();
    let _ = task.await;
    drop(service);

    let (service, _cancel, _task) = rig.start();
    settle(&service).await;
    assert_eq!(service.get(&run.id).unwrap().state, RunState::Interrupted);
    assert!(!script.exists(), "removed at recovery");
}

#[tokio::test(start_paused = true)]
async fn without_gate_jobs_a_pending_or_failed_creation_holds_nothing() {
    let mut rig = SetupRig::new();
    rig.gate_jobs = false;
    rig.declare(SetupScriptKind::Creation, "create.sh");
    rig.runner
        .push(FakeScript::exits(3, Duration::from_secs(5), "boom\n"));
    let service = rig.open();
    assert_eq!(
        rig.agent.admission.held_reason(),
        None,
        "not held before it runs"
    );
    let (_cancel, _task) = rig.spawn(&service);
    wait_started(&rig.runner, 1).await;
    assert_eq!(
        rig.agent.admission.held_reason(),
        None,
        "not held while it runs"
    );
    settle(&service).await;
    let run = service.list(&[SetupKind::Creation], 1)[0].clone();
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(
        rig.agent.health.get(Subsystem::Setup).state,
        ConditionState::Failed
    );
    assert_eq!(
        rig.agent.admission.held_reason(),
        None,
        "not held after it failed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_creation_interrupted_twice_is_not_re_run_again() {
    let mut rig = SetupRig::new();
    rig.declare(SetupScriptKind::Creation, "create.sh");
    rig.runner.push(FakeScript::hangs(false));
    rig.runner.push(FakeScript::hangs(false));
    for life in 1..=2 {
        let (service, _cancel, task) = rig.start();
        service.recovered().await;
        let latest = service.list(&[SetupKind::Creation], 1)[0].clone();
        assert_eq!(latest.attempt, life);
        wait_started(&rig.runner, life as usize).await;
        task.abort();
        let _ = task.await;
    }
    let (service, _cancel, _task) = rig.start();
    settle(&service).await;
    let runs = service.list(&[SetupKind::Creation], 10);
    assert_eq!(runs.len(), 2, "no third attempt");
    assert!(runs.iter().all(|r| r.state == RunState::Interrupted));
    let condition = rig.agent.health.get(Subsystem::Setup);
    assert_eq!(condition.state, ConditionState::Failed);
    assert!(
        condition.message.contains("interrupted 2 times"),
        "{}",
        condition.message
    );
    assert!(rig.agent.admission.held_reason().is_some());
}

#[tokio::test(start_paused = true)]
async fn idempotency_key_returns_the_same_run_or_a_conflict() {
    let rig = SetupRig::new();
    let (service, _cancel, _task) = rig.start();
    let mut request = inline("echo once");
    request.idempotency_key = "k1".into();
    let a = service.submit(request.clone()).await.unwrap();
    let b = service.submit(request.clone()).await.unwrap();
    assert_eq!(a.id, b.id);
    finished(&service, &a.id).await;
    let c = service.submit(request.clone()).await.unwrap();
    assert_eq!(c.id, a.id);
    assert_eq!(c.state, RunState::Succeeded);
    request.args.push("different".into());
    assert!(matches!(
        service.submit(request).await,
        Err(SetupError::IdempotencyConflict { .. })
    ));
    assert_eq!(rig.runner.launches().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn bad_requests_are_refused_before_anything_runs() {
    let rig = SetupRig::new();
    let (service, _cancel, _task) = rig.start();
    let empty = service.submit(inline("   ")).await.unwrap_err();
    assert!(matches!(empty, SetupError::EmptyScript { .. }), "{empty}");
    let mut ghost = inline("id");
    ghost.run_as = "ghost".into();
    let unknown = service.submit(ghost).await.unwrap_err();
    assert!(
        matches!(unknown, SetupError::UnknownUser { .. }),
        "{unknown}"
    );
    let missing = RunRequest {
        source: ScriptSource::Path(rig.agent.root.join("missing.sh")),
        ..inline("")
    };
    let missing = service.submit(missing).await.unwrap_err();
    assert!(
        matches!(missing, SetupError::ScriptUnreadable { .. }),
        "{missing}"
    );
    assert!(rig.runner.launches().is_empty());
    assert!(service.list(&[], 10).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_missing_declared_script_is_a_failed_run_not_a_silent_skip() {
    let mut rig = SetupRig::new();
    rig.declare(SetupScriptKind::Startup, "start.sh");
    std::fs::remove_file(&rig.declared[0].path).unwrap();
    let (service, _cancel, _task) = rig.start();
    settle(&service).await;
    let runs = service.list(&[], 10);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, RunState::Failed);
    assert!(
        runs[0].message.contains("could not start"),
        "{}",
        runs[0].message
    );
    let condition = rig.agent.health.get(Subsystem::Setup);
    assert_eq!(condition.state, ConditionState::Degraded);
    assert!(
        condition.message.contains("start.sh"),
        "{}",
        condition.message
    );
    // Its log exists and says why.
    let log = std::fs::read_to_string(&runs[0].log_path).expect("the log of the failed run");
    assert!(
        log.contains("could not start") && log.contains("start.sh"),
        "{log}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_queue_is_bounded() {
    let mut rig = SetupRig::new();
    rig.max_pending = 2;
    rig.runner.push(FakeScript::hangs(false));
    let (service, _cancel, _task) = rig.start();
    let first = service.submit(inline("sleep 1000")).await.unwrap();
    wait_until(&service, &first.id, |r| r.state == RunState::Running).await;
    service.submit(inline("true")).await.unwrap();
    service.submit(inline("true")).await.unwrap();
    assert!(matches!(
        service.submit(inline("true")).await,
        Err(SetupError::QueueFull { limit: 2 })
    ));
}

#[tokio::test(start_paused = true)]
async fn old_runs_and_their_logs_are_pruned() {
    let mut rig = SetupRig::new();
    rig.keep_runs = 2;
    let (service, _cancel, _task) = rig.start();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let run = service.submit(inline("true")).await.unwrap();
        finished(&service, &run.id).await;
        ids.push(run.id);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left: Vec<String> = service.list(&[], 10).into_iter().map(|r| r.id).collect();
    assert_eq!(left.len(), 2);
    assert!(left.contains(&ids[3]) && left.contains(&ids[2]));
    assert!(rig.stored(&ids[0]).is_none());
    assert!(!rig.logs_dir().join(format!("{}.log", ids[0])).exists());
}

#[tokio::test(start_paused = true)]
async fn logs_of_a_pending_run_follow_it_to_the_end() {
    let rig = SetupRig::new();
    rig.runner.push(FakeScript::hangs(false));
    rig.runner
        .push(FakeScript::exits(0, Duration::from_secs(1), "second\n"));
    let (service, _cancel, _task) = rig.start();
    let mut first = inline("sleep 1000");
    first.timeout = Some(Duration::from_secs(5));
    service.submit(first).await.unwrap();
    let second = service.submit(inline("echo second")).await.unwrap();
    let stream = service
        .logs(&second.id, true, CancellationToken::new())
        .unwrap();
    let pieces: Vec<LogPiece> = stream.map(|p| p.unwrap()).collect().await;
    let text: String = pieces
        .iter()
        .map(|p| String::from_utf8_lossy(&p.data).into_owned())
        .collect();
    assert!(text.contains("second\n"), "{text}");
    assert!(text.contains("exited with status 0"), "{text}");
}

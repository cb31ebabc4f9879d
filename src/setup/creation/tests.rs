//! The policy on plain data: no runner, no store, no clock.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::*;

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + seconds)
}

fn run(id: &str, kind: SetupKind, state: RunState, created: u64) -> SetupRun {
    SetupRun {
        id: id.into(),
        kind,
        state,
        exit_code: None,
        signal: None,
        log_tail: Vec::new(),
        created_at: at(created),
        started_at: None,
        finished_at: None,
        source: format!("/opt/{id}.sh"),
        run_as: "root".into(),
        log_path: PathBuf::from(format!("/var/log/instance-agent/setup/{id}.log")),
        message: String::new(),
        idempotency_key: String::new(),
        attempt: 1,
        fingerprint: String::new(),
    }
}

fn script(kind: SetupScriptKind, path: &str) -> SetupScriptConfig {
    SetupScriptConfig {
        kind,
        path: path.into(),
        args: Vec::new(),
        env: BTreeMap::new(),
        timeout: "15m".into(),
        run_as: String::new(),
        working_dir: PathBuf::new(),
    }
}

fn ledger(runs: Vec<SetupRun>) -> Ledger {
    Ledger {
        runs: runs.into_iter().map(|r| (r.id.clone(), r)).collect(),
        ..Ledger::default()
    }
}

fn nothing_stored(_: &str) -> Option<RunRequest> {
    None
}

#[test]
fn runs_left_unfinished_by_the_last_agent_become_interrupted_and_say_how() {
    let mut running = run("a", SetupKind::Creation, RunState::Running, 0);
    assert!(interrupt_if_unfinished(&mut running, at(5)));
    assert_eq!(running.state, RunState::Interrupted);
    assert_eq!(running.finished_at, Some(at(5)));
    assert!(running.message.contains("crashed"), "{}", running.message);

    let mut pending = run("b", SetupKind::Adhoc, RunState::Pending, 0);
    assert!(interrupt_if_unfinished(&mut pending, at(5)));
    assert!(
        pending.message.contains("before the script started"),
        "{}",
        pending.message
    );

    let mut failed = run("c", SetupKind::Adhoc, RunState::Failed, 0);
    failed.message = "exited with status 1".into();
    assert!(!interrupt_if_unfinished(&mut failed, at(5)));
    assert_eq!(failed.state, RunState::Failed);
    assert_eq!(failed.message, "exited with status 1");
}

#[test]
fn a_declared_creation_script_that_never_ran_is_planned_as_attempt_one() {
    let declared = [
        script(SetupScriptKind::Startup, "/opt/start.sh"),
        script(SetupScriptKind::Creation, "/opt/create.sh"),
    ];
    let (plan, blocked) = ledger(Vec::new()).plan_creation(&declared, nothing_stored);
    let plan = plan.expect("planned");
    assert_eq!(plan.attempt, 1);
    assert_eq!(plan.request, declared[1].request());
    assert_eq!(blocked, None);

    let (plan, blocked) = ledger(Vec::new()).plan_creation(&declared[..1], nothing_stored);
    assert_eq!(
        (plan, blocked),
        (None, None),
        "nothing declared, nothing ran"
    );
}

#[test]
fn a_succeeded_or_failed_creation_is_never_planned_again() {
    let declared = [script(SetupScriptKind::Creation, "/opt/create.sh")];
    let done = ledger(vec![
        run("old", SetupKind::Creation, RunState::Interrupted, 0),
        run("ok", SetupKind::Creation, RunState::Succeeded, 10),
    ]);
    assert_eq!(done.plan_creation(&declared, nothing_stored), (None, None));
    let failed = ledger(vec![run("bad", SetupKind::Creation, RunState::Failed, 0)]);
    assert_eq!(
        failed.plan_creation(&declared, nothing_stored),
        (None, None),
        "an operator runs it again"
    );
}

#[test]
fn an_interrupted_creation_runs_again_once_from_its_stored_request() {
    let declared = [script(SetupScriptKind::Creation, "/opt/declared.sh")];
    let stored = script(SetupScriptKind::Creation, "/opt/stored.sh").request();
    let once = ledger(vec![run(
        "r1",
        SetupKind::Creation,
        RunState::Interrupted,
        0,
    )]);
    let (plan, blocked) = once.plan_creation(&declared, |id| {
        assert_eq!(id, "r1");
        Some(stored.clone())
    });
    let plan = plan.expect("re-run");
    assert_eq!(plan.attempt, 2);
    assert_eq!(plan.request, stored, "the stored request wins");
    assert_eq!(plan.message, "re-run after run r1 was interrupted");
    assert_eq!(blocked, None);

    let (plan, _) = once.plan_creation(&declared, nothing_stored);
    assert_eq!(plan.expect("re-run").request, declared[0].request());

    let (plan, blocked) = once.plan_creation(&[], nothing_stored);
    assert_eq!(plan, None);
    assert_eq!(
        blocked.as_deref(),
        Some("run r1 was interrupted and its request is lost")
    );

    let mut second = run("r2", SetupKind::Creation, RunState::Interrupted, 10);
    second.attempt = MAX_CREATION_ATTEMPTS;
    let twice = ledger(vec![
        run("r1", SetupKind::Creation, RunState::Interrupted, 0),
        second,
    ]);
    let (plan, blocked) = twice.plan_creation(&declared, |_| Some(stored.clone()));
    assert_eq!(plan, None);
    assert_eq!(
        blocked.as_deref(),
        Some("interrupted 2 times (last run r2); not re-run again by itself")
    );
}

#[test]
fn a_new_creation_run_is_refused_once_one_succeeded_or_while_one_is_under_way() {
    assert!(ledger(Vec::new()).admit_creation().is_ok());
    assert!(
        ledger(vec![run("f", SetupKind::Creation, RunState::Failed, 0)])
            .admit_creation()
            .is_ok()
    );
    let done = ledger(vec![run("ok", SetupKind::Creation, RunState::Succeeded, 0)]);
    assert!(matches!(
        done.admit_creation(),
        Err(SetupError::CreationAlreadySucceeded { run_id }) if run_id == "ok"
    ));
    let busy = ledger(vec![
        run("f", SetupKind::Creation, RunState::Failed, 0),
        run("p", SetupKind::Creation, RunState::Running, 5),
    ]);
    assert!(matches!(
        busy.admit_creation(),
        Err(SetupError::CreationInProgress { run_id, state: "running" }) if run_id == "p"
    ));
}

#[test]
fn startup_scripts_get_one_turn_per_life_after_the_creation_script() {
    let startup_only = [script(SetupScriptKind::Startup, "/opt/start.sh")];
    let mut fresh = ledger(Vec::new());
    assert!(fresh.take_startup_turn(&startup_only));
    assert!(!fresh.take_startup_turn(&startup_only), "once per life");

    let with_creation = [
        script(SetupScriptKind::Creation, "/opt/create.sh"),
        script(SetupScriptKind::Startup, "/opt/start.sh"),
    ];
    let mut waiting = ledger(vec![run("c", SetupKind::Creation, RunState::Running, 0)]);
    assert!(!waiting.take_startup_turn(&with_creation));
    assert!(!waiting.startup_queued);
    let mut not_run = ledger(Vec::new());
    assert!(!not_run.take_startup_turn(&with_creation));
    // A creation run of an earlier life counts even when config no longer
    // declares one.
    let mut failed_before = ledger(vec![run("c", SetupKind::Creation, RunState::Failed, 0)]);
    assert!(!failed_before.take_startup_turn(&startup_only));
    let mut done = ledger(vec![run("c", SetupKind::Creation, RunState::Succeeded, 0)]);
    assert!(done.take_startup_turn(&with_creation));

    assert_eq!(
        startup_requests(&with_creation),
        vec![with_creation[1].request()]
    );
}

#[test]
fn the_job_gate_holds_until_the_creation_script_succeeded() {
    let declared = [script(SetupScriptKind::Creation, "/opt/create.sh")];
    assert_eq!(
        ledger(Vec::new()).gate_reason(true, &declared).as_deref(),
        Some("the creation script has not run yet")
    );
    assert_eq!(ledger(Vec::new()).gate_reason(true, &[]), None);
    let failed = ledger(vec![run("c1", SetupKind::Creation, RunState::Failed, 0)]);
    assert_eq!(
        failed.gate_reason(true, &declared).as_deref(),
        Some("the creation script has not succeeded (run c1 failed)")
    );
    assert_eq!(failed.gate_reason(false, &declared), None, "gate_jobs off");
    let done = ledger(vec![
        run("c1", SetupKind::Creation, RunState::Failed, 0),
        run("c2", SetupKind::Creation, RunState::Succeeded, 10),
    ]);
    assert_eq!(done.gate_reason(true, &declared), None);
}

#[test]
fn a_failed_creation_condition_quotes_the_last_lines_and_why_it_will_not_rerun() {
    let mut last = run("c2", SetupKind::Creation, RunState::Interrupted, 10);
    last.attempt = 2;
    last.message = "interrupted: the agent stopped".into();
    last.log_tail = (1..=7).map(|i| format!("line {i}")).collect();
    let mut book = ledger(vec![last]);
    book.creation_blocked = Some("interrupted 2 times".into());
    let (state, message) = book.condition(&[]);
    assert_eq!(state, ConditionState::Failed);
    assert!(
        message.starts_with("creation script interrupted: interrupted: the agent stopped (run c2, log /var/log/instance-agent/setup/c2.log); interrupted 2 times"),
        "{message}"
    );
    assert!(
        message.ends_with("; last output: line 3 | line 4 | line 5 | line 6 | line 7"),
        "{message}"
    );
}

#[test]
fn the_condition_follows_the_creation_script_then_the_startup_scripts() {
    let declared = [script(SetupScriptKind::Creation, "/opt/create.sh")];
    assert_eq!(
        ledger(Vec::new()).condition(&[]),
        (ConditionState::Ok, "no setup scripts declared".into())
    );
    assert_eq!(
        ledger(Vec::new()).condition(&declared),
        (
            ConditionState::Unknown,
            "creation script not run yet".into()
        )
    );
    let mut planned = ledger(vec![run(
        "c1",
        SetupKind::Creation,
        RunState::Interrupted,
        0,
    )]);
    planned.planned_creation = Some(PlannedCreation {
        request: declared[0].request(),
        attempt: 2,
        message: "re-run after run c1 was interrupted".into(),
    });
    assert_eq!(
        planned.condition(&declared),
        (
            ConditionState::Unknown,
            "creation script will run again: re-run after run c1 was interrupted".into()
        )
    );
    let pending = ledger(vec![run("c1", SetupKind::Creation, RunState::Pending, 0)]);
    assert_eq!(
        pending.condition(&declared),
        (
            ConditionState::Unknown,
            "creation script pending (run c1)".into()
        )
    );

    let mut book = ledger(vec![
        run("c1", SetupKind::Creation, RunState::Succeeded, 0),
        run("s1", SetupKind::Startup, RunState::Succeeded, 10),
        run("s2", SetupKind::Startup, RunState::Running, 11),
    ]);
    book.startup_runs = vec!["s1".into(), "s2".into()];
    assert_eq!(
        book.condition(&declared),
        (
            ConditionState::Unknown,
            "startup scripts running: 1 of 2 done".into()
        )
    );
    book.runs.get_mut("s2").unwrap().state = RunState::Succeeded;
    assert_eq!(
        book.condition(&declared),
        (
            ConditionState::Ok,
            "creation script succeeded (run c1); 2 startup script(s) succeeded".into()
        )
    );
    let s2 = book.runs.get_mut("s2").unwrap();
    s2.state = RunState::TimedOut;
    s2.message = "killed after its 60 s timeout".into();
    let (state, message) = book.condition(&declared);
    assert_eq!(state, ConditionState::Degraded);
    assert_eq!(
        message,
        "startup script /opt/s2.sh timed out: killed after its 60 s timeout (run s2, log /var/log/instance-agent/setup/s2.log)"
    );
}

#[test]
fn pruning_keeps_the_newest_finished_runs_and_always_the_latest_creation() {
    let book = ledger(vec![
        run("create", SetupKind::Creation, RunState::Succeeded, 0),
        run("a1", SetupKind::Adhoc, RunState::Succeeded, 10),
        run("a2", SetupKind::Adhoc, RunState::Failed, 20),
        run("a3", SetupKind::Adhoc, RunState::Succeeded, 30),
        run("busy", SetupKind::Adhoc, RunState::Running, 40),
    ]);
    assert!(book.prune_victims(3).is_empty());
    assert_eq!(book.prune_victims(1), vec!["a2", "a1"]);
    assert_eq!(book.prune_victims(0), vec!["a3", "a2", "a1"]);
}

#[test]
fn a_first_creation_run_is_held_when_the_record_of_runs_may_be_incomplete() {
    let declared = [script(SetupScriptKind::Creation, "/opt/create.sh")];
    let mut book = ledger(Vec::new());
    (book.planned_creation, book.creation_blocked) = book.plan_creation(&declared, nothing_stored);
    assert!(book.planned_creation.is_some());
    book.hold_creation("the store was missing at this start");
    assert_eq!(book.planned_creation, None);
    let (state, message) = book.condition(&declared);
    assert_eq!(state, ConditionState::Failed);
    assert!(
        message.contains("not run by itself: the store was missing"),
        "{message}"
    );
    assert!(message.contains("--kind creation -c true"), "{message}");
    assert!(
        book.gate_reason(true, &declared)
            .is_some_and(|r| r.contains("not run by itself")),
    );

    // A re-run after an interruption is on record: it goes ahead.
    let mut interrupted = run("a", SetupKind::Creation, RunState::Interrupted, 0);
    interrupted.attempt = 1;
    let mut book = ledger(vec![interrupted]);
    (book.planned_creation, book.creation_blocked) = book.plan_creation(&declared, nothing_stored);
    book.hold_creation("the store was missing at this start");
    assert_eq!(book.planned_creation.map(|p| p.attempt), Some(2));
}

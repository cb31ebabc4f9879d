//! The run state machine on virtual time, with a fake runner and a real
//! store in a temp dir.

use std::collections::BTreeMap;

use super::*;
use crate::events::Delivery;
use crate::setup::ScriptSource;
use crate::setup::config::{SetupConfig, SetupScriptKind};
use crate::setup::fake::{FakeAccounts, FakeEnd, FakeRunner, FakeScript};

struct Rig {
    dir: tempfile::TempDir,
    store: Store,
    events: EventBus,
    health: Health,
    admission: AdmissionGate,
    runner: FakeRunner,
    declared: Vec<SetupScriptConfig>,
    keep_runs: usize,
    max_pending: usize,
    gate_jobs: bool,
}

impl Rig {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        Self {
            dir,
            store,
            events: EventBus::new(1024),
            health: Health::new(),
            admission: AdmissionGate::new(),
            runner: FakeRunner::default(),
            declared: Vec::new(),
            keep_runs: 100,
            max_pending: 32,
            gate_jobs: true,
        }
    }

    fn script_file(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, "echo hi\n").unwrap();
        path
    }

    fn declare(&mut self, kind: SetupScriptKind, name: &str) {
        let path = self.script_file(name);
        self.declared.push(SetupScriptConfig {
            kind,
            path,
            args: vec!["x".into()],
            env: BTreeMap::new(),
            timeout: "1m".into(),
            run_as: String::new(),
            working_dir: PathBuf::new(),
        });
    }

    fn settings(&self) -> Settings {
        Settings {
            logs_dir: self.dir.path().join("logs"),
            limits: LogLimits {
                head_bytes: 1 << 20,
                tail_bytes: 1 << 20,
                tail_lines: 5,
            },
            request_limits: SetupConfig::default().request_limits(),
            max_pending: self.max_pending,
            keep_runs: self.keep_runs,
            gate_jobs: self.gate_jobs,
            launch: LaunchContext {
                base_env: vec![("CI_NAME".into(), "test".into())],
                kill_grace: Duration::from_secs(10),
                kill_leftovers: true,
                scripts_dir: self.dir.path().join("scripts"),
            },
            declared: self.declared.clone(),
        }
    }

    fn open(&self) -> SetupScripts {
        SetupScripts::open(
            self.settings(),
            Wiring {
                store: self.store.clone(),
                events: self.events.clone(),
                health: self.health.clone(),
                admission: self.admission.clone(),
                runner: Arc::new(self.runner.clone()),
                accounts: Arc::new(FakeAccounts::default()),
            },
        )
        .expect("opens")
    }

    /// Opens and starts the executor; returns the service and its stop token.
    fn start(&self) -> (SetupScripts, CancellationToken, tokio::task::JoinHandle<()>) {
        let service = self.open();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(service.clone().run(cancel.clone()));
        (service, cancel, task)
    }
}

fn inline(text: &str) -> RunRequest {
    RunRequest {
        kind: SetupKind::Adhoc,
        source: ScriptSource::Inline(text.into()),
        args: Vec::new(),
        env: BTreeMap::new(),
        timeout: None,
        run_as: String::new(),
        working_dir: None,
        idempotency_key: String::new(),
    }
}

async fn wait_until(
    service: &SetupScripts,
    id: &str,
    done: impl Fn(&SetupRun) -> bool,
) -> SetupRun {
    for _ in 0..100_000 {
        if let Ok(run) = service.get(id)
            && done(&run)
        {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "run {id} never reached the expected state: {:?}",
        service.get(id)
    );
}

/// Waits until `n` scripts were started (their RUNNING state is stored
/// before they start).
async fn wait_started(runner: &FakeRunner, n: usize) {
    while runner.launches().len() < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn finished(service: &SetupScripts, id: &str) -> SetupRun {
    wait_until(service, id, |r| r.state.is_terminal()).await
}

async fn settle(service: &SetupScripts) {
    service.recovered().await;
    for _ in 0..1000 {
        let busy = {
            let state = service.lock();
            !state.queue.is_empty() || state.runs.values().any(|r| !r.state.is_terminal())
        };
        if !busy {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("runs never settled");
}

fn setup_events(events: &EventBus) -> Vec<(String, RunState)> {
    let mut sub = events.subscribe(Some(0));
    let mut out = Vec::new();
    while let Some(delivery) = sub.try_next() {
        if let Delivery::Event(event) = delivery
            && let EventPayload::Setup(run) = &event.payload
        {
            out.push((run.id.clone(), run.state));
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_script_succeeds_with_its_output_kept_and_every_state_published() {
    let rig = Rig::new();
    rig.runner.push(FakeScript::exits(
        0,
        Duration::from_secs(2),
        "hello\nworld\n",
    ));
    let (service, _cancel, _task) = rig.start();
    let mut request = inline("echo hello");
    request.args = vec!["a".into()];
    request.env.insert("FOO".into(), "bar".into());
    let run = service.submit(request).await.unwrap();
    assert_eq!(run.state, RunState::Pending);
    let run = finished(&service, &run.id).await;
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(run.exit_code, Some(0));
    assert_eq!(run.log_tail, vec!["hello", "world"]);
    assert!(run.started_at.is_some() && run.finished_at.is_some());
    let states: Vec<RunState> = setup_events(&rig.events)
        .into_iter()
        .filter(|(id, _)| *id == run.id)
        .map(|(_, s)| s)
        .collect();
    assert_eq!(
        states,
        vec![RunState::Pending, RunState::Running, RunState::Succeeded]
    );
    let launch = &rig.runner.launches()[0];
    assert_eq!(launch.args.last().map(String::as_str), Some("a"));
    assert!(launch.env.contains(&("FOO".into(), "bar".into())));
    let log = std::fs::read_to_string(&run.log_path).unwrap();
    assert!(log.contains(" O hello\n"), "{log}");
    assert!(log.contains("exited with status 0"), "{log}");
    let stored: SetupRun = rig.store.get(RUNS, &run.id).unwrap().unwrap();
    assert_eq!(stored.state, RunState::Succeeded);
    assert_eq!(rig.health.get(Subsystem::Setup).state, ConditionState::Ok);
    // The inline script file is gone with the run.
    assert!(
        !rig.dir
            .path()
            .join("scripts")
            .join(format!("{}.script", run.id))
            .exists()
    );
}

#[tokio::test(start_paused = true)]
async fn non_zero_exit_and_signals_fail_with_the_detail() {
    let rig = Rig::new();
    rig.runner
        .push(FakeScript::exits(3, Duration::from_secs(1), "oops\n"));
    rig.runner.push(FakeScript {
        end: FakeEnd::Signal(9, Duration::from_secs(1)),
        ..FakeScript::exits(0, Duration::ZERO, "")
    });
    let (service, _cancel, _task) = rig.start();
    let a = service.submit(inline("exit 3")).await.unwrap();
    let b = service.submit(inline("kill -9 $$")).await.unwrap();
    let a = finished(&service, &a.id).await;
    assert_eq!((a.state, a.exit_code), (RunState::Failed, Some(3)));
    assert_eq!(a.message, "exited with status 3");
    let b = finished(&service, &b.id).await;
    assert_eq!(
        (b.state, b.exit_code, b.signal),
        (RunState::Failed, None, Some(9))
    );
    assert!(b.message.contains("SIGKILL"), "{}", b.message);
}

#[tokio::test(start_paused = true)]
async fn timeout_stops_the_tree_and_escalates_to_sigkill() {
    let rig = Rig::new();
    rig.runner.push(FakeScript::hangs(false));
    rig.runner.push(FakeScript::hangs(true));
    let (service, _cancel, _task) = rig.start();
    let mut polite = inline("sleep 1000");
    polite.timeout = Some(Duration::from_secs(30));
    let mut stubborn = polite.clone();
    stubborn.source = ScriptSource::Inline("trap '' TERM; sleep 1000".into());
    let a = service.submit(polite).await.unwrap();
    let b = service.submit(stubborn).await.unwrap();

    let a = finished(&service, &a.id).await;
    assert_eq!(a.state, RunState::TimedOut);
    assert_eq!(a.signal, Some(15));
    assert!(a.message.contains("30 s timeout"), "{}", a.message);
    let took = a
        .finished_at
        .unwrap()
        .duration_since(a.started_at.unwrap())
        .unwrap();
    assert!(
        took < Duration::from_secs(5),
        "wall clock, not virtual: {took:?}"
    );

    let b = finished(&service, &b.id).await;
    assert_eq!(b.state, RunState::TimedOut);
    assert_eq!(b.signal, Some(9));
    assert!(b.message.contains("SIGKILL to 1"), "{}", b.message);
    let log = std::fs::read_to_string(&b.log_path).unwrap();
    assert!(log.contains("timeout of 30 s reached"), "{log}");
}

#[tokio::test(start_paused = true)]
async fn creation_holds_jobs_then_startup_scripts_follow() {
    let mut rig = Rig::new();
    rig.declare(SetupScriptKind::Creation, "create.sh");
    rig.declare(SetupScriptKind::Startup, "start.sh");
    rig.runner
        .push(FakeScript::exits(0, Duration::from_secs(5), "created\n"));
    let service = rig.open();
    assert!(
        rig.admission
            .held_reason()
            .unwrap()
            .contains("creation script"),
        "held from open, before anything runs"
    );
    assert_eq!(
        rig.health.get(Subsystem::Setup).state,
        ConditionState::Unknown
    );
    let cancel = CancellationToken::new();
    tokio::spawn(service.clone().run(cancel.clone()));
    settle(&service).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle(&service).await;
    assert_eq!(rig.admission.held_reason(), None);
    let runs = service.list(&[], 10);
    let kinds: Vec<(SetupKind, RunState)> = runs.iter().map(|r| (r.kind, r.state)).collect();
    assert_eq!(
        kinds,
        vec![
            (SetupKind::Startup, RunState::Succeeded),
            (SetupKind::Creation, RunState::Succeeded)
        ]
    );
    let condition = rig.health.get(Subsystem::Setup);
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
    assert_eq!(rig.admission.held_reason(), None);
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
    let mut rig = Rig::new();
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
    let condition = rig.health.get(Subsystem::Setup);
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
    assert!(rig.admission.held_reason().is_some());
    assert!(service.list(&[SetupKind::Startup], 10).is_empty());
    assert_eq!(rig.runner.launches().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crash_mid_creation_is_recorded_and_re_run_once() {
    let mut rig = Rig::new();
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
    let stored: SetupRun = rig.store.get(RUNS, &first.id).unwrap().unwrap();
    assert_eq!(stored.state, RunState::Interrupted, "recorded durably");
    assert_eq!(rig.admission.held_reason(), None);
}

#[tokio::test(start_paused = true)]
async fn the_inline_script_of_a_run_cut_short_is_removed_at_the_next_start() {
    let rig = Rig::new();
    rig.runner.push(FakeScript::hangs(false));
    let (service, _cancel, task) = rig.start();
    let run = service.submit(inline("sleep 1000")).await.unwrap();
    wait_started(&rig.runner, 1).await;
    let script = request::inline_script_path(&rig.dir.path().join("scripts"), &run.id);
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
    let mut rig = Rig::new();
    rig.gate_jobs = false;
    rig.declare(SetupScriptKind::Creation, "create.sh");
    rig.runner
        .push(FakeScript::exits(3, Duration::from_secs(5), "boom\n"));
    let service = rig.open();
    assert_eq!(rig.admission.held_reason(), None, "not held before it runs");
    let cancel = CancellationToken::new();
    let _task = tokio::spawn(service.clone().run(cancel.clone()));
    wait_started(&rig.runner, 1).await;
    assert_eq!(rig.admission.held_reason(), None, "not held while it runs");
    settle(&service).await;
    let run = service.list(&[SetupKind::Creation], 1)[0].clone();
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(
        rig.health.get(Subsystem::Setup).state,
        ConditionState::Failed
    );
    assert_eq!(
        rig.admission.held_reason(),
        None,
        "not held after it failed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_creation_interrupted_twice_is_not_re_run_again() {
    let mut rig = Rig::new();
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
    let condition = rig.health.get(Subsystem::Setup);
    assert_eq!(condition.state, ConditionState::Failed);
    assert!(
        condition.message.contains("interrupted 2 times"),
        "{}",
        condition.message
    );
    assert!(rig.admission.held_reason().is_some());
}

#[tokio::test(start_paused = true)]
async fn agent_stop_interrupts_the_running_script() {
    let rig = Rig::new();
    rig.runner.push(FakeScript::hangs(false));
    let (service, cancel, task) = rig.start();
    let run = service.submit(inline("sleep 1000")).await.unwrap();
    wait_until(&service, &run.id, |r| r.state == RunState::Running).await;
    cancel.cancel();
    task.await.unwrap();
    let run = service.get(&run.id).unwrap();
    assert_eq!(run.state, RunState::Interrupted);
    assert!(run.message.contains("agent stopped"), "{}", run.message);
    assert!(matches!(
        service.submit(inline("true")).await,
        Err(SetupError::ShuttingDown)
    ));
}

#[tokio::test(start_paused = true)]
async fn idempotency_key_returns_the_same_run_or_a_conflict() {
    let rig = Rig::new();
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
    let rig = Rig::new();
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
        source: ScriptSource::Path(rig.dir.path().join("missing.sh")),
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
    let mut rig = Rig::new();
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
    let condition = rig.health.get(Subsystem::Setup);
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
async fn a_script_gone_by_its_turn_fails_with_a_log_saying_why() {
    let rig = Rig::new();
    let service = rig.open();
    let path = rig.script_file("gone.sh");
    let run = service
        .submit(RunRequest {
            source: ScriptSource::Path(path.clone()),
            ..inline("")
        })
        .await
        .expect("accepted while the file exists");
    std::fs::remove_file(&path).unwrap();
    let cancel = CancellationToken::new();
    let _task = tokio::spawn(service.clone().run(cancel.clone()));
    settle(&service).await;
    let done = service.get(&run.id).unwrap();
    assert_eq!(done.state, RunState::Failed);
    assert!(done.message.contains("could not start"), "{}", done.message);
    let log = std::fs::read_to_string(&done.log_path).expect("the log of the failed run");
    assert!(
        log.contains("could not start") && log.contains("gone.sh"),
        "{log}"
    );
    assert!(rig.runner.launches().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_queue_is_bounded() {
    let mut rig = Rig::new();
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
async fn a_vanished_supervisor_fails_the_run_and_kills_by_marker() {
    let rig = Rig::new();
    rig.runner.push(FakeScript {
        end: FakeEnd::SupervisorDies(Duration::from_secs(1)),
        ..FakeScript::exits(0, Duration::ZERO, "")
    });
    let (service, _cancel, _task) = rig.start();
    let run = service.submit(inline("true")).await.unwrap();
    let run = finished(&service, &run.id).await;
    assert_eq!(run.state, RunState::Failed);
    assert!(run.message.contains("supervisor died"), "{}", run.message);
    assert_eq!(rig.runner.kills(), 1);
}

#[tokio::test(start_paused = true)]
async fn old_runs_and_their_logs_are_pruned() {
    let mut rig = Rig::new();
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
    assert!(rig.store.get::<SetupRun>(RUNS, &ids[0]).unwrap().is_none());
    assert!(
        !rig.dir
            .path()
            .join("logs")
            .join(format!("{}.log", ids[0]))
            .exists()
    );
}

#[tokio::test(start_paused = true)]
async fn logs_of_a_pending_run_follow_it_to_the_end() {
    let rig = Rig::new();
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

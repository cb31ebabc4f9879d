//! One run from start to end on virtual time, through the service, with a
//! fake runner: output kept, exit codes and signals, the timeout, the agent's
//! stop, a supervisor that vanishes, a script gone by its turn; and the
//! executor on its own, with a journal that records what it is told.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Executor, Journal, RunEnd};
use crate::health::{ConditionState, Subsystem};
use crate::setup::SetupRun;
use crate::setup::fake::{FakeEnd, FakeScript};
use crate::setup::resolve;
use crate::setup::run_log::LiveLog;
use crate::setup::testing::{SetupRig, finished, inline, settle, setup_events, wait_until};
use crate::setup::{RunRequest, RunState, ScriptSource, SetupError};

#[tokio::test(start_paused = true)]
async fn a_script_succeeds_with_its_output_kept_and_every_state_published() {
    let rig = SetupRig::new();
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
    let states: Vec<RunState> = setup_events(&rig.agent.events)
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
    let stored = rig.stored(&run.id).unwrap();
    assert_eq!(stored.state, RunState::Succeeded);
    assert_eq!(
        rig.agent.health.get(Subsystem::Setup).state,
        ConditionState::Ok
    );
    // The inline script file is gone with the run.
    assert!(
        !rig.scripts_dir()
            .join(format!("{}.script", run.id))
            .exists()
    );
}

#[tokio::test(start_paused = true)]
async fn non_zero_exit_and_signals_fail_with_the_detail() {
    let rig = SetupRig::new();
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
    let rig = SetupRig::new();
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
async fn agent_stop_interrupts_the_running_script() {
    let rig = SetupRig::new();
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
async fn a_script_gone_by_its_turn_fails_with_a_log_saying_why() {
    let rig = SetupRig::new();
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
    let (_cancel, _task) = rig.spawn(&service);
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
async fn a_vanished_supervisor_fails_the_run_and_kills_by_marker() {
    let rig = SetupRig::new();
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

/// A journal that records what the executor tells it, and can refuse to
/// record the start (a store that fails at that moment).
#[derive(Default)]
struct Notes {
    refuse_start: bool,
    said: std::sync::Mutex<Vec<String>>,
    end: std::sync::Mutex<Option<RunEnd>>,
}

impl Notes {
    fn said(&self) -> Vec<String> {
        self.said.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Journal for Notes {
    fn show_live(&self, _id: &str, live: Option<std::sync::Arc<LiveLog>>) {
        let what = if live.is_some() { "live" } else { "not live" };
        self.said.lock().unwrap().push(what.into());
    }

    fn run(&self, _id: &str) -> Option<SetupRun> {
        None
    }

    async fn started(
        &self,
        _id: &str,
        _log_path: std::path::PathBuf,
        run_as: String,
        message: String,
    ) -> Result<(), SetupError> {
        self.said
            .lock()
            .unwrap()
            .push(format!("started as {run_as}: {message}"));
        if self.refuse_start {
            return Err(SetupError::ShuttingDown);
        }
        Ok(())
    }

    async fn interrupted(&self, _id: &str, message: String) {
        self.said.lock().unwrap().push(message);
    }

    async fn ended(&self, _id: &str, end: RunEnd) -> Option<SetupRun> {
        self.said.lock().unwrap().push("ended".into());
        *self.end.lock().unwrap() = Some(end);
        None
    }
}

#[tokio::test(start_paused = true)]
async fn the_executor_reports_each_step_to_its_journal_and_no_start_goes_unrecorded() {
    let rig = SetupRig::new();
    let settings = rig.settings();
    let accounts: std::sync::Arc<dyn crate::setup::Accounts> =
        std::sync::Arc::new(crate::setup::fake::FakeAccounts::default());
    let executor = Executor {
        settings: &settings,
        runner: &rig.runner,
        accounts: &accounts,
    };
    rig.runner
        .push(FakeScript::exits(4, Duration::from_secs(1), "out\n"));
    let cancel = CancellationToken::new();

    let notes = Notes::default();
    executor
        .execute(&notes, "r1", inline("exit 4"), &cancel)
        .await;
    assert_eq!(
        notes.said(),
        vec![
            "live",
            "started as root: running (timeout 900 s)",
            "not live",
            "ended"
        ]
    );
    assert_eq!(
        notes.end.lock().unwrap().clone(),
        Some(RunEnd::Ran {
            state: RunState::Failed,
            exit_code: Some(4),
            signal: None,
            log_tail: vec!["out".into()],
            message: "exited with status 4".into(),
        })
    );

    let refused = Notes {
        refuse_start: true,
        ..Notes::default()
    };
    executor
        .execute(&refused, "r2", inline("true"), &cancel)
        .await;
    assert_eq!(rig.runner.launches().len(), 1, "the second never started");
    let end = refused.end.lock().unwrap().clone();
    let Some(RunEnd::NotStarted { message }) = end else {
        panic!("expected a run that did not start, got {end:?}");
    };
    assert!(
        message.starts_with("could not start: cannot record the run as running"),
        "{message}"
    );
    let log = std::fs::read_to_string(settings.log_path("r2")).unwrap();
    assert!(log.contains("cannot record the run as running"), "{log}");
    assert!(
        !resolve::inline_script_path(&rig.scripts_dir(), "r2").exists(),
        "its inline script is removed"
    );
}

//! The setup domain's unit-test rig: the agent's shared parts
//! ([`crate::testing::Rig`]) plus a fake runner, declared scripts and the
//! settings the tests vary, and the waits the tests share. Test-only.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::config::{SetupConfig, SetupScriptConfig, SetupScriptKind};
use super::fake::{FakeAccounts, FakeRunner};
use super::records::RUNS;
use super::resolve::LaunchContext;
use super::run_log::LogLimits;
use super::service::{SetupScripts, Wiring};
use super::settings::Settings;
use super::{RunRequest, RunState, ScriptSource, SetupKind, SetupRun};
use crate::events::{Delivery, EventBus, EventPayload};
use crate::testing::Rig;

/// One agent's setup domain on a fake runner; survives restarts of the
/// service (the store and the fake stay).
pub(super) struct SetupRig {
    /// Temp dir, store, events, health, admission, cancel, tasks.
    pub agent: Rig,
    /// Plays the scripts' behaviours.
    pub runner: FakeRunner,
    /// `[[setup.scripts]]`.
    pub declared: Vec<SetupScriptConfig>,
    /// `setup.keep_runs`.
    pub keep_runs: usize,
    /// `setup.max_pending_runs`.
    pub max_pending: usize,
    /// `setup.gate_jobs`.
    pub gate_jobs: bool,
}

impl SetupRig {
    pub fn new() -> Self {
        Self {
            agent: Rig::new(),
            runner: FakeRunner::default(),
            declared: Vec::new(),
            keep_runs: 100,
            max_pending: 32,
            gate_jobs: true,
        }
    }

    /// A script file in the rig's dir.
    pub fn script_file(&self, name: &str) -> PathBuf {
        let path = self.agent.root.join(name);
        std::fs::write(&path, "echo hi\n").unwrap();
        path
    }

    /// Declares a script of `kind` in config.
    pub fn declare(&mut self, kind: SetupScriptKind, name: &str) {
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

    /// Where inline scripts are written.
    pub fn scripts_dir(&self) -> PathBuf {
        self.agent.root.join("scripts")
    }

    /// Where run logs go.
    pub fn logs_dir(&self) -> PathBuf {
        self.agent.root.join("logs")
    }

    pub fn settings(&self) -> Settings {
        Settings {
            logs_dir: self.logs_dir(),
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
                scripts_dir: self.scripts_dir(),
            },
            declared: self.declared.clone(),
        }
    }

    /// Opens the service (an agent start), without its executor.
    pub fn open(&self) -> SetupScripts {
        SetupScripts::open(
            self.settings(),
            Wiring {
                store: self.agent.store.clone(),
                events: self.agent.events.clone(),
                health: self.agent.health.clone(),
                admission: self.agent.admission.clone(),
                runner: Arc::new(self.runner.clone()),
                accounts: Arc::new(FakeAccounts::default()),
            },
        )
        .expect("opens")
    }

    /// Starts the executor of `service` on the rig's tasks; returns its stop
    /// token (also stopped when the rig is dropped) and its handle.
    pub fn spawn(
        &self,
        service: &SetupScripts,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let cancel = self.agent.cancel.child_token();
        let task = self.agent.tasks.spawn(service.clone().run(cancel.clone()));
        (cancel, task)
    }

    /// Opens and starts the executor; returns the service and its stop token.
    pub fn start(&self) -> (SetupScripts, CancellationToken, tokio::task::JoinHandle<()>) {
        let service = self.open();
        let (cancel, task) = self.spawn(&service);
        (service, cancel, task)
    }

    /// The run as stored.
    pub fn stored(&self, id: &str) -> Option<SetupRun> {
        self.agent.store.get(RUNS, id).unwrap()
    }
}

/// An ad-hoc inline script.
pub(super) fn inline(text: &str) -> RunRequest {
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

pub(super) async fn wait_until(
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
pub(super) async fn wait_started(runner: &FakeRunner, n: usize) {
    while runner.launches().len() < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn finished(service: &SetupScripts, id: &str) -> SetupRun {
    wait_until(service, id, |r| r.state.is_terminal()).await
}

/// Waits until recovery is done and every run has ended (a queued run is
/// PENDING, so nothing is queued either).
pub(super) async fn settle(service: &SetupScripts) {
    service.recovered().await;
    for _ in 0..1000 {
        let busy = service
            .list(&[], usize::MAX)
            .iter()
            .any(|r| !r.state.is_terminal());
        if !busy {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("runs never settled");
}

/// The setup events published so far: run id and state.
pub(super) fn setup_events(events: &EventBus) -> Vec<(String, RunState)> {
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

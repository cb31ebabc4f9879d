//! Starting scripts, as the setup domain sees it: the [`ProcessRunner`]
//! trait (its outside world), what a runner is given ([`Launch`]) and what it
//! reports ([`Report`]). The real runner is
//! [`SupervisedRunner`](super::supervised_runner::SupervisedRunner), which
//! starts each script under a supervisor process ([`super::supervisor`]);
//! tests use `fake::FakeRunner`.
//!
//! # Protocol between the agent and a supervisor
//! - stdin: one JSON line, the [`SupervisorSpec`]; then kept open as the
//!   lifeline.
//! - stdout, stderr: handed to the script; the agent reads them.
//! - fd 3: [`Report`]s, one JSON line each, from the supervisor.
//! - SIGTERM to the supervisor: stop the script's tree.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

/// The hidden first argument that turns the agent's binary into a supervisor.
pub const SUPERVISOR_ARG: &str = "__setup-supervisor";

/// The ids a script runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserIds {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Everything needed to start one script, resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// The run (also the value of the environment marker).
    pub run_id: String,
    /// The program to exec: the interpreter.
    pub program: PathBuf,
    /// Its arguments: interpreter option, script path, then the script's own.
    pub args: Vec<String>,
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub working_dir: PathBuf,
    /// Device and inode of the working directory when it was checked: the
    /// supervisor opens the directory once, refuses another one in its
    /// place, and enters it by that descriptor (`fchdir`).
    #[serde(default)]
    pub working_dir_id: Option<(u64, u64)>,
    /// Drop to this user; stay root when `None`.
    pub user: Option<UserIds>,
    /// Between SIGTERM and SIGKILL when the tree is stopped.
    pub kill_grace: Duration,
    /// Stop what the script leaves running when it exits.
    pub kill_leftovers: bool,
    /// The run's timeout: a runner that outlives the agent (transient
    /// services) enforces it itself (`RuntimeMaxSec=`).
    #[serde(default)]
    pub timeout: Duration,
}

/// What the supervisor tells the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case")]
pub enum Report {
    /// The script is running.
    Started {
        /// Its pid.
        pid: u32,
    },
    /// The script could not be started (exec failed, bad user...).
    SpawnFailed {
        /// Why.
        message: String,
    },
    /// The script's main process ended.
    Exited {
        /// Exit status when it exited.
        code: Option<i32>,
        /// Signal when one killed it.
        signal: Option<i32>,
    },
    /// The tree was stopped (at the agent's request, or leftovers after the
    /// script exited).
    Stopped {
        /// Processes sent SIGTERM.
        sigterm: u32,
        /// Processes sent SIGKILL after the grace period.
        sigkill: u32,
        /// Processes still alive after everything (stuck in the kernel).
        survivors: u32,
    },
    /// The runner itself stopped the script at its timeout (a transient
    /// service's `RuntimeMaxSec=`, which holds while the agent is down).
    TimedOut,
    /// Something degraded but not fatal (e.g. no cgroup).
    Warning {
        /// What.
        message: String,
    },
}

/// The supervisor's instructions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorSpec {
    /// The script.
    pub launch: Launch,
    /// A cgroup v2 directory to create and put the script in, if any.
    pub cgroup: Option<PathBuf>,
}

/// A script's output stream.
pub type OutputStream = Box<dyn AsyncRead + Send + Unpin>;

/// The runner could not start the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// Spawning failed.
    #[error("cannot start the script supervisor {program}: {source}")]
    Spawn {
        /// What was started.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Starts scripts. The real one is
/// [`SupervisedRunner`](super::supervised_runner::SupervisedRunner); tests
/// use `fake::FakeRunner`.
#[async_trait::async_trait]
pub trait ProcessRunner: Send + Sync {
    /// Starts a script.
    async fn start(&self, launch: Launch) -> Result<Box<dyn ScriptProcess>, RunnerError>;

    /// SIGKILLs whatever is left of runs of an earlier agent life (their
    /// cgroups and marked processes). Returns how many processes were found.
    async fn kill_orphans(&self, run_ids: Vec<String>) -> usize;

    /// Removes what finished runs left behind once it is empty (the cgroup
    /// of a run whose leftovers were allowed to outlive it). Best effort.
    async fn tidy(&self, _run_ids: Vec<String>) {}

    /// Whether scripts outlive the agent (transient services under
    /// systemd): then a stopping agent leaves its running script alone, and
    /// the next agent takes it over with [`ProcessRunner::adopt`] instead of
    /// recording it interrupted.
    fn outlives_agent(&self) -> bool {
        false
    }

    /// Takes over a run that an earlier agent life started and that still
    /// exists (running, or ended with its result kept): its output from the
    /// start, then its reports as if it had just started. `None` when there
    /// is nothing to take over.
    async fn adopt(&self, _run_id: &str) -> Option<Box<dyn ScriptProcess>> {
        None
    }

    /// How scripts are started and contained here, for `GetStatus` and
    /// `doctor` (e.g. "systemd transient services").
    fn describe(&self) -> String {
        "agent children".into()
    }
}

/// A started script.
#[async_trait::async_trait]
pub trait ScriptProcess: Send {
    /// Its stdout and stderr; `None` after the first call.
    fn take_output(&mut self) -> Option<(OutputStream, OutputStream)>;

    /// The next report; `None` once the supervisor has exited. Cancel-safe.
    async fn next_report(&mut self) -> Option<Report>;

    /// Asks for the whole tree to be stopped: SIGTERM, then SIGKILL after the
    /// grace period. Reports follow.
    fn terminate(&mut self);

    /// SIGKILLs the supervisor and everything of the run it can find, for
    /// when the supervisor does not answer. Returns how many processes it hit.
    async fn kill(&mut self) -> usize;
}

//! Setup scripts: a creation script once in the instance's life, startup
//! scripts at every agent start, ad-hoc scripts on request.
//!
//! Owns the run state machine (PENDING → RUNNING → SUCCEEDED | FAILED |
//! TIMED_OUT | INTERRUPTED), the one-at-a-time queue, durable results in the
//! store (tables `setup.*`), per-run log files under `<logs_dir>/setup/`, the
//! setup health condition and the `"setup"` hold on the job queue.
//!
//! # Layout
//! - [`service`]: [`SetupScripts`], the handle and the queue: accepts runs,
//!   keeps their records, recovery after a restart.
//! - `creation`: the policy, as pure functions over the runs: which scripts
//!   run at this start, the creation-once rules, the job gate, the condition.
//! - `execute`: one run from start to end: resolve, log, start, capture,
//!   timeout, agent stop, result.
//! - [`settings`]: [`Settings`], derived from [`config`] (the `[setup]`
//!   section and its declared scripts) and the agent's dirs.
//! - [`request`]: checking the shape of a request (no I/O).
//! - [`resolve`]: resolving a request on the host into a [`runner::Launch`]
//!   (interpreter, user, environment, working directory).
//! - [`capture`], [`run_log`] and [`logfile`]: reading a script's output, the
//!   run's log with bounded memory, the log file format (one timestamped
//!   record per line, bytes kept exactly), and reading it back live or after
//!   the fact.
//! - [`runner`]: the [`ProcessRunner`] trait (the outside world) and the
//!   protocol with a supervisor; [`supervised_runner`]: its real
//!   implementation, which starts each script under a supervisor process.
//! - [`unit_runner`]: the [`ProcessRunner`] under systemd: each script a
//!   transient service forked by PID 1, adopted after an agent restart.
//! - [`supervisor`]: that supervisor, a small synchronous program (the agent's
//!   own binary re-executed) that contains and reaps the script's process tree.
//! - [`process_tree`]: `/proc` and cgroup v2 plumbing shared by both sides.
//! - [`accounts`]: user lookup for `run_as`.
//!
//! It knows nothing of gRPC: `api::setup` converts to and from protobuf.

pub mod accounts;
pub mod capture;
pub mod config;
mod creation;
mod execute;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod logfile;
pub mod process_tree;
mod records;
pub mod request;
pub mod resolve;
pub mod run_log;
pub mod runner;
pub mod service;
pub mod settings;
pub mod supervised_runner;
pub mod supervisor;
#[cfg(test)]
mod testing;
pub mod unit_runner;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use accounts::{Account, Accounts, SystemAccounts};
pub use logfile::{LogPiece, LogStream};
pub use runner::ProcessRunner;
pub use service::{SetupScripts, Wiring};
pub use settings::Settings;
pub use supervised_runner::SupervisedRunner;
pub use unit_runner::UnitRunner;

/// The environment variable that marks every process of a run with its id,
/// so that stragglers can be found in `/proc` even outside the process tree.
pub const RUN_MARKER_ENV: &str = "INSTANCE_AGENT_SETUP_RUN";

/// The default timeout of a script (15 minutes).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(900);

/// Longest timeout a setup script may have (7 days).
pub const MAX_SETUP_TIMEOUT_SECONDS: u64 = 7 * 86_400;

/// When a script runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetupKind {
    /// Once in the instance's life; its success is stored and it is not run again.
    Creation,
    /// At every agent start, after the creation script has succeeded.
    Startup,
    /// Only when requested.
    Adhoc,
}

impl SetupKind {
    /// Lowercase name, as in config and messages.
    pub fn name(self) -> &'static str {
        match self {
            SetupKind::Creation => "creation",
            SetupKind::Startup => "startup",
            SetupKind::Adhoc => "adhoc",
        }
    }
}

/// The state of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Accepted, not started yet.
    Pending,
    /// The script is running.
    Running,
    /// Exited with status 0.
    Succeeded,
    /// Exited non-zero, was killed by a signal, or could not start.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// Cut short by an agent crash or stop.
    Interrupted,
}

impl RunState {
    /// Whether the run has ended.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunState::Pending | RunState::Running)
    }

    /// Lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::TimedOut => "timed out",
            RunState::Interrupted => "interrupted",
        }
    }
}

/// Where a script comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScriptSource {
    /// Inline content.
    Inline(String),
    /// An absolute path on the instance.
    Path(PathBuf),
}

impl ScriptSource {
    /// "inline" or the path, for `SetupRun::source`.
    pub fn describe(&self) -> String {
        match self {
            ScriptSource::Inline(_) => "inline".into(),
            ScriptSource::Path(path) => path.display().to_string(),
        }
    }
}

/// A request to run a script (from the API or from config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRequest {
    /// When it runs.
    pub kind: SetupKind,
    /// The script.
    pub source: ScriptSource,
    /// `$1`, `$2`, ...
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Timeout; [`DEFAULT_TIMEOUT`] when `None`.
    pub timeout: Option<Duration>,
    /// User name; root when empty.
    pub run_as: String,
    /// Working directory; the user's home when `None`.
    pub working_dir: Option<PathBuf>,
    /// A repeated key returns the run already made for it.
    pub idempotency_key: String,
}

impl RunRequest {
    /// The effective timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }

    /// A stable digest of everything but the key, to tell a retry of the
    /// same request from a different request reusing a key (FNV-1a over the
    /// JSON form, which is stable for these plain types).
    pub fn fingerprint(&self) -> String {
        let mut copy = self.clone();
        copy.idempotency_key.clear();
        let bytes = serde_json::to_vec(&copy).unwrap_or_default();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in bytes {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

#[cfg(test)]
impl RunRequest {
    /// For tests: an ad-hoc request from `source` with two arguments (one
    /// with a space) and one variable.
    pub(crate) fn adhoc(source: ScriptSource) -> Self {
        Self {
            kind: SetupKind::Adhoc,
            source,
            args: vec!["a b".into(), "c".into()],
            env: BTreeMap::from([("FOO".to_owned(), "bar".to_owned())]),
            timeout: None,
            run_as: String::new(),
            working_dir: None,
            idempotency_key: String::new(),
        }
    }
}

/// One execution of a script: what the API shows and the store keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetupRun {
    /// Unique id (12 hex digits).
    pub id: String,
    /// When it runs.
    pub kind: SetupKind,
    /// Current state.
    pub state: RunState,
    /// Exit status, once exited normally.
    pub exit_code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// The last lines of output (lossy UTF-8).
    pub log_tail: Vec<String>,
    /// When it was accepted.
    pub created_at: SystemTime,
    /// When it started running.
    pub started_at: Option<SystemTime>,
    /// When it ended.
    pub finished_at: Option<SystemTime>,
    /// The path, or "inline".
    pub source: String,
    /// The user it runs as ("root" when not given).
    pub run_as: String,
    /// The full log file.
    pub log_path: PathBuf,
    /// Human-readable explanation of the state.
    pub message: String,
    /// The idempotency key it was started with.
    pub idempotency_key: String,
    /// 1, or 2 for a creation script re-run after an interruption.
    pub attempt: u32,
    /// [`RunRequest::fingerprint`] of its request.
    pub fingerprint: String,
}

/// A setup operation failed. Each variant names what was wrong and the limit.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Neither inline content nor a path was given.
    #[error("one of `script` (inline content) or `path` is required")]
    NoScript,
    /// The script has no content.
    #[error("the script {source_name} is empty")]
    EmptyScript {
        /// "inline" or the path.
        source_name: String,
    },
    /// The inline script is too large.
    #[error(
        "the inline script is {size} bytes: at most {limit} bytes are allowed (setup.max_script_bytes)"
    )]
    ScriptTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: u64,
    },
    /// A field is malformed.
    #[error("`{field}`: {problem}")]
    Invalid {
        /// The request field, e.g. `env` or `working_dir`.
        field: &'static str,
        /// What is wrong and what is allowed.
        problem: String,
    },
    /// The script file does not exist or cannot be read.
    #[error("script {path} cannot be used: {source}")]
    ScriptUnreadable {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The script path is not a regular file.
    #[error("script {path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The interpreter named on the script's `#!` line does not exist.
    #[error("the interpreter {interpreter} named on the first line of {script} does not exist")]
    InterpreterMissing {
        /// "inline" or the path.
        script: String,
        /// The interpreter.
        interpreter: PathBuf,
    },
    /// `run_as` names no user.
    #[error("`run_as`: no user named {user:?} exists on this instance")]
    UnknownUser {
        /// The name.
        user: String,
    },
    /// The user database could not be read.
    #[error("cannot look up user {user:?}: {source}")]
    UserLookup {
        /// The name.
        user: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The working directory does not exist.
    #[error("`working_dir`: {path} is not an existing directory")]
    WorkingDirMissing {
        /// The path.
        path: PathBuf,
    },
    /// The creation script already succeeded; it runs once.
    #[error(
        "the creation script already succeeded (run {run_id}); it runs once in the instance's life"
    )]
    CreationAlreadySucceeded {
        /// The successful run.
        run_id: String,
    },
    /// A creation run is pending or running.
    #[error("a creation run is already {state} (run {run_id})")]
    CreationInProgress {
        /// The run.
        run_id: String,
        /// Its state.
        state: &'static str,
    },
    /// The idempotency key was used for a different request.
    #[error("idempotency key {key:?} was already used for a different request (run {run_id})")]
    IdempotencyConflict {
        /// The key.
        key: String,
        /// The run made for it.
        run_id: String,
    },
    /// Too many runs are waiting.
    #[error("{limit} runs are already waiting to start (setup.max_pending_runs); try again later")]
    QueueFull {
        /// The limit.
        limit: u32,
    },
    /// No run has this id.
    #[error("no setup run with id {id:?}")]
    NotFound {
        /// The id.
        id: String,
    },
    /// A check on the filesystem or user database did not finish in time.
    #[error("{what} did not finish within {seconds} s")]
    CheckTimedOut {
        /// What was being checked.
        what: &'static str,
        /// The limit.
        seconds: u64,
    },
    /// A log file could not be read or written.
    #[error("log {path}: {source}")]
    Log {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The inline script could not be written for the run.
    #[error("cannot prepare the script file {path}: {source}")]
    ScriptFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The agent is stopping.
    #[error("the agent is shutting down")]
    ShuttingDown,
}

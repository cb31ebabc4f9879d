//! What happens when the idle deadline passes, besides the
//! `IdleShutdownRequested` event: the [`StopAction`] trait. The real one
//! runs `lifecycle.stop_command` (empty by default: the control plane,
//! told by the event, stops the VM); tests put a script there that writes a
//! marker, so no test ever powers a machine off.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

/// How long the stop command may run before it is killed.
pub const STOP_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The stop could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopError {
    /// The command could not be started.
    #[error("cannot start the stop command {program}: {detail}")]
    Spawn {
        /// `lifecycle.stop_command[0]`.
        program: String,
        /// Why.
        detail: String,
    },
    /// The command exited non-zero or was killed.
    #[error("the stop command {program} failed: {detail}")]
    Failed {
        /// `lifecycle.stop_command[0]`.
        program: String,
        /// Its exit status, or the timeout.
        detail: String,
    },
}

/// Asks for the instance to stop.
#[async_trait]
pub trait StopAction: Send + Sync + 'static {
    /// Carries out the stop; `reason` says why (for the command's
    /// environment and the log). Returns what was done, in words.
    async fn stop(&self, reason: &str) -> Result<String, StopError>;
}

/// Runs the configured command (live: the config's current value).
pub struct CommandStop {
    command: watch::Receiver<Vec<String>>,
}

impl CommandStop {
    /// Runs `command` (argv; empty: nothing).
    pub fn new(command: watch::Receiver<Vec<String>>) -> Self {
        Self { command }
    }
}

#[async_trait]
impl StopAction for CommandStop {
    async fn stop(&self, reason: &str) -> Result<String, StopError> {
        let argv = self.command.borrow().clone();
        let Some((program, args)) = argv.split_first() else {
            return Ok("no stop command configured: the control plane stops the VM".into());
        };
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env("INSTANCE_AGENT_STOP_REASON", reason)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| StopError::Spawn {
                program: program.clone(),
                detail: e.to_string(),
            })?;
        let status = tokio::time::timeout(STOP_COMMAND_TIMEOUT, child.wait())
            .await
            .map_err(|_| StopError::Failed {
                program: program.clone(),
                detail: format!("still running after {} s", STOP_COMMAND_TIMEOUT.as_secs()),
            })?
            .map_err(|e| StopError::Failed {
                program: program.clone(),
                detail: e.to_string(),
            })?;
        if status.success() {
            Ok(format!("ran {program}"))
        } else {
            Err(StopError::Failed {
                program: program.clone(),
                detail: status.to_string(),
            })
        }
    }
}

/// A stop that records its calls, for unit tests.
#[cfg(test)]
#[derive(Default)]
pub struct RecordingStop {
    /// The reasons of the calls so far.
    pub calls: std::sync::Mutex<Vec<String>>,
}

#[cfg(test)]
#[async_trait]
impl StopAction for std::sync::Arc<RecordingStop> {
    async fn stop(&self, reason: &str) -> Result<String, StopError> {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reason.to_owned());
        Ok("recorded".into())
    }
}

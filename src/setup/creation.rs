//! The policy of the setup scripts, as pure functions over the runs: how a
//! run cut short by the last agent is recorded, which scripts run at this
//! start, the creation-once rules, whether the job queue is held, and the
//! setup condition.
//!
//! No I/O, no runner, no lock: [`super::service`] keeps a [`Ledger`] under
//! its lock, asks it, and acts on the answers (queues, writes, holds).
//!
//! The rules:
//! - the creation script runs once in the instance's life: once a creation
//!   run has succeeded, no other is accepted or planned;
//! - a creation run interrupted by an agent crash or stop runs again once, as
//!   attempt 2, from its stored request (else the declared script);
//!   a failed, timed-out or twice-interrupted creation script is not re-run
//!   by itself: the condition stays failed with its exit code and last lines
//!   of output, and an operator may run it again;
//! - the declared startup scripts are queued once per agent life, after the
//!   creation script (if there is one) has succeeded;
//! - with `setup.gate_jobs`, the job queue is held until the creation script
//!   has succeeded;
//! - pruning never removes the latest creation run;
//! - when the store's record of the runs may be incomplete (a damaged or
//!   deleted store), a creation script with no run on record is not run by
//!   itself: whether it ran before is unknown, and running it twice may do
//!   harm. The condition fails and says how to run it or record it as done.

use std::collections::HashMap;
use std::time::SystemTime;

use super::config::{SetupScriptConfig, SetupScriptKind};
use super::{RunRequest, RunState, SetupError, SetupKind, SetupRun};
use crate::health::ConditionState;

/// Creation runs stop being re-run after an interruption at this attempt.
pub(super) const MAX_CREATION_ATTEMPTS: u32 = 2;
/// Lines of `log_tail` quoted in the condition message.
const CONDITION_TAIL_LINES: usize = 5;

/// A creation run decided at start.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PlannedCreation {
    /// What runs.
    pub request: RunRequest,
    /// 1, or 2 for a re-run after an interruption.
    pub attempt: u32,
    /// The run's first message ("re-run after run X was interrupted").
    pub message: String,
}

/// The runs the agent knows, and what was decided about them at this start.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// Every run, by id.
    pub runs: HashMap<String, SetupRun>,
    /// The creation run to queue at this start, if any.
    pub planned_creation: Option<PlannedCreation>,
    /// Why the creation script will not run by itself, when it will not.
    pub creation_blocked: Option<String>,
    /// Startup runs of this agent life.
    pub startup_runs: Vec<String>,
    /// Whether the declared startup scripts were queued in this agent life.
    pub startup_queued: bool,
}

/// The creation script declared in config, if any.
pub(super) fn declared_creation(declared: &[SetupScriptConfig]) -> Option<&SetupScriptConfig> {
    declared
        .iter()
        .find(|s| s.kind == SetupScriptKind::Creation)
}

/// The requests of the declared startup scripts, in their order.
pub(super) fn startup_requests(declared: &[SetupScriptConfig]) -> Vec<RunRequest> {
    declared
        .iter()
        .filter(|s| s.kind == SetupScriptKind::Startup)
        .map(SetupScriptConfig::request)
        .collect()
}

/// Records a run found PENDING or RUNNING when the agent starts: the last
/// agent crashed or stopped before it ended, so it is INTERRUPTED now.
/// Returns whether it was changed (it must then be stored again and its
/// leftovers killed).
pub(super) fn interrupt_if_unfinished(run: &mut SetupRun, now: SystemTime) -> bool {
    if run.state.is_terminal() {
        return false;
    }
    run.message = match run.state {
        RunState::Running => {
            "interrupted: the agent stopped or crashed while the script was running".into()
        }
        _ => "interrupted: the agent stopped before the script started".into(),
    };
    run.state = RunState::Interrupted;
    run.finished_at = Some(now);
    true
}

impl Ledger {
    /// The newest creation run.
    pub fn latest_creation(&self) -> Option<&SetupRun> {
        self.runs
            .values()
            .filter(|r| r.kind == SetupKind::Creation)
            .max_by_key(|r| (r.created_at, r.attempt))
    }

    /// The creation run that succeeded, if one did.
    pub fn succeeded_creation(&self) -> Option<&SetupRun> {
        self.runs
            .values()
            .find(|r| r.kind == SetupKind::Creation && r.state == RunState::Succeeded)
    }

    /// Decides at open what the creation script needs: a planned run, or why
    /// it will not run by itself. `stored_request` finds the stored request
    /// of a run (an interrupted one runs again from it).
    pub fn plan_creation(
        &self,
        declared: &[SetupScriptConfig],
        stored_request: impl FnOnce(&str) -> Option<RunRequest>,
    ) -> (Option<PlannedCreation>, Option<String>) {
        if self.succeeded_creation().is_some() {
            return (None, None);
        }
        let declared = declared_creation(declared);
        match self.latest_creation() {
            None => (
                declared.map(|script| PlannedCreation {
                    request: script.request(),
                    attempt: 1,
                    message: String::new(),
                }),
                None,
            ),
            Some(last)
                if last.state == RunState::Interrupted && last.attempt < MAX_CREATION_ATTEMPTS =>
            {
                match stored_request(&last.id).or_else(|| declared.map(SetupScriptConfig::request))
                {
                    Some(request) => (
                        Some(PlannedCreation {
                            request,
                            attempt: last.attempt + 1,
                            message: format!("re-run after run {} was interrupted", last.id),
                        }),
                        None,
                    ),
                    None => (
                        None,
                        Some(format!(
                            "run {} was interrupted and its request is lost",
                            last.id
                        )),
                    ),
                }
            }
            Some(last) if last.state == RunState::Interrupted => (
                None,
                Some(format!(
                    "interrupted {} times (last run {}); not re-run again by itself",
                    last.attempt, last.id
                )),
            ),
            Some(_) => (None, None),
        }
    }

    /// Holds back a first creation run planned at this start because the
    /// record of the runs may be incomplete (`why`, from the store).
    pub fn hold_creation(&mut self, why: &str) {
        let first = self
            .planned_creation
            .as_ref()
            .is_some_and(|plan| plan.attempt == 1);
        if first && self.latest_creation().is_none() {
            self.planned_creation = None;
            self.creation_blocked = Some(format!(
                "is not run by itself: {why}, so whether it ran before is unknown; run it with \
                 `instance-agent setup run --kind creation PATH` if it must run, or record it as \
                 done with `instance-agent setup run --kind creation -c true`"
            ));
        }
    }

    /// Whether a new creation run may be accepted: not once one succeeded,
    /// not while one is pending or running.
    pub fn admit_creation(&self) -> Result<(), SetupError> {
        if let Some(done) = self.succeeded_creation() {
            return Err(SetupError::CreationAlreadySucceeded {
                run_id: done.id.clone(),
            });
        }
        if let Some(busy) = self
            .runs
            .values()
            .find(|r| r.kind == SetupKind::Creation && !r.state.is_terminal())
        {
            return Err(SetupError::CreationInProgress {
                run_id: busy.id.clone(),
                state: busy.state.name(),
            });
        }
        Ok(())
    }

    /// Whether the declared startup scripts are due now: not yet queued in
    /// this agent life, and the creation script (when there is one, declared
    /// or run before) has succeeded. Marks them queued when they are.
    pub fn take_startup_turn(&mut self, declared: &[SetupScriptConfig]) -> bool {
        let creation_expected =
            declared_creation(declared).is_some() || self.latest_creation().is_some();
        let due =
            !self.startup_queued && (!creation_expected || self.succeeded_creation().is_some());
        if due {
            self.startup_queued = true;
        }
        due
    }

    /// The oldest finished runs beyond the newest `keep`, to delete; the
    /// latest creation run is always kept.
    pub fn prune_victims(&self, keep: usize) -> Vec<String> {
        let keep_creation = self.latest_creation().map(|r| r.id.clone());
        let mut finished: Vec<&SetupRun> = self
            .runs
            .values()
            .filter(|r| r.state.is_terminal() && Some(&r.id) != keep_creation.as_ref())
            .collect();
        if finished.len() <= keep {
            return Vec::new();
        }
        finished.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.attempt)));
        finished[keep..].iter().map(|r| r.id.clone()).collect()
    }

    /// Why the job queue is held, when it is.
    pub fn gate_reason(&self, gate_jobs: bool, declared: &[SetupScriptConfig]) -> Option<String> {
        if !gate_jobs || self.succeeded_creation().is_some() {
            return None;
        }
        match self.latest_creation() {
            Some(run) => Some(format!(
                "the creation script has not succeeded (run {} {})",
                run.id,
                run.state.name()
            )),
            None if self.creation_blocked.is_some() => {
                Some("the creation script is not run by itself (see the setup condition)".into())
            }
            None if self.planned_creation.is_some() || declared_creation(declared).is_some() => {
                Some("the creation script has not run yet".into())
            }
            None => None,
        }
    }

    /// The setup condition from the runs.
    pub fn condition(&self, declared: &[SetupScriptConfig]) -> (ConditionState, String) {
        let mut parts = Vec::new();
        if let Some(done) = self.succeeded_creation() {
            parts.push(format!("creation script succeeded (run {})", done.id));
        } else if let Some(plan) = &self.planned_creation {
            return (
                ConditionState::Unknown,
                if plan.attempt > 1 {
                    format!("creation script will run again: {}", plan.message)
                } else {
                    "creation script not run yet".into()
                },
            );
        } else if let Some(last) = self.latest_creation() {
            return self.creation_condition(last);
        } else if let Some(why) = &self.creation_blocked {
            return (ConditionState::Failed, format!("creation script {why}"));
        } else if declared_creation(declared).is_some() {
            return (
                ConditionState::Unknown,
                "creation script not run yet".into(),
            );
        }

        let startup: Vec<&SetupRun> = self
            .startup_runs
            .iter()
            .filter_map(|id| self.runs.get(id))
            .collect();
        if let Some(bad) = startup
            .iter()
            .find(|r| r.state.is_terminal() && r.state != RunState::Succeeded)
        {
            return (
                ConditionState::Degraded,
                format!(
                    "startup script {} {}: {} (run {}, log {})",
                    bad.source,
                    bad.state.name(),
                    bad.message,
                    bad.id,
                    bad.log_path.display()
                ),
            );
        }
        let waiting = startup.iter().filter(|r| !r.state.is_terminal()).count();
        if waiting > 0 {
            return (
                ConditionState::Unknown,
                format!(
                    "startup scripts running: {} of {} done",
                    startup.len() - waiting,
                    startup.len()
                ),
            );
        }
        if !startup.is_empty() {
            parts.push(format!("{} startup script(s) succeeded", startup.len()));
        }
        if parts.is_empty() {
            parts.push("no setup scripts declared".into());
        }
        (ConditionState::Ok, parts.join("; "))
    }

    /// The condition while the latest creation run has not succeeded.
    fn creation_condition(&self, last: &SetupRun) -> (ConditionState, String) {
        match last.state {
            RunState::Pending => (
                ConditionState::Unknown,
                format!("creation script pending (run {})", last.id),
            ),
            RunState::Running => (
                ConditionState::Unknown,
                format!("creation script running (run {})", last.id),
            ),
            _ => {
                let mut message = format!(
                    "creation script {}: {} (run {}, log {})",
                    last.state.name(),
                    last.message,
                    last.id,
                    last.log_path.display()
                );
                if let Some(why) = &self.creation_blocked {
                    message.push_str(&format!("; {why}"));
                }
                let tail = last
                    .log_tail
                    .iter()
                    .rev()
                    .take(CONDITION_TAIL_LINES)
                    .rev()
                    .cloned()
                    .collect::<Vec<_>>();
                if !tail.is_empty() {
                    message.push_str(&format!("; last output: {}", tail.join(" | ")));
                }
                (ConditionState::Failed, message)
            }
        }
    }
}

#[cfg(test)]
mod tests;

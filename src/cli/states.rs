//! The one place the CLI names the values of the contract's state enums:
//! one function per enum, used by every command and by `doctor`.
//!
//! Each name is lowercase; a state that needs the operator's attention (a
//! failed run, a critical disk, a stale mount) is shown in capitals in
//! tables and status lines, and in lowercase inside `doctor`'s sentences.

use std::fmt;

use anyhow::Context;

use crate::api::proto;

/// A state's name, and whether it needs attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateName {
    name: &'static str,
    alarm: bool,
}

impl StateName {
    const fn calm(name: &'static str) -> Self {
        Self { name, alarm: false }
    }

    const fn alarm(name: &'static str) -> Self {
        Self { name, alarm: true }
    }

    /// The lowercase name, for sentences (`doctor`).
    pub fn plain(self) -> &'static str {
        self.name
    }
}

/// As tables show it: in capitals when it needs attention. Honours width
/// and alignment (`{:<10}`).
impl fmt::Display for StateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.alarm {
            f.pad(&self.name.to_uppercase())
        } else {
            f.pad(self.name)
        }
    }
}

/// A job's state; the names are also what `jobs list --state` takes, so
/// none is in capitals.
pub fn job(state: proto::JobState) -> StateName {
    use proto::JobState as S;
    StateName::calm(match state {
        S::Unspecified => "?",
        S::Queued => "queued",
        S::Starting => "starting",
        S::Running => "running",
        S::Succeeded => "succeeded",
        S::Failed => "failed",
        S::Cancelled => "cancelled",
        S::TimedOut => "timed_out",
    })
}

/// Parses a `jobs list --state` value (any case) into a job state.
pub fn parse_job(text: &str) -> anyhow::Result<proto::JobState> {
    let name = format!("JOB_STATE_{}", text.to_ascii_uppercase());
    proto::JobState::from_str_name(&name).with_context(|| {
        format!("--state {text:?}: expected queued, starting, running, succeeded, failed, cancelled or timed_out")
    })
}

/// A health condition's state.
pub fn condition(state: proto::ConditionState) -> StateName {
    use proto::ConditionState as S;
    match state {
        S::Unknown => StateName::calm("unknown"),
        S::Ok => StateName::calm("ok"),
        S::Degraded => StateName::alarm("degraded"),
        S::Failed => StateName::alarm("failed"),
        S::Disabled => StateName::calm("disabled"),
    }
}

/// A watched filesystem's state.
pub fn disk(state: proto::DiskState) -> StateName {
    use proto::DiskState as S;
    match state {
        S::Unspecified => StateName::calm("-"),
        S::Ok => StateName::calm("ok"),
        S::Warning => StateName::alarm("warning"),
        S::Critical => StateName::alarm("critical"),
        S::Unresponsive => StateName::alarm("unresponsive"),
    }
}

/// A managed mount's state.
pub fn mount(state: proto::MountState) -> StateName {
    use proto::MountState as S;
    match state {
        S::Unspecified => StateName::calm("unknown"),
        S::Mounting => StateName::calm("mounting"),
        S::Mounted => StateName::calm("mounted"),
        S::Stale => StateName::alarm("stale"),
        S::Remounting => StateName::calm("remounting"),
        S::Failed => StateName::alarm("failed"),
        S::Unmounted => StateName::calm("unmounted"),
    }
}

/// A setup script run's state.
pub fn setup_run(state: proto::SetupRunState) -> StateName {
    use proto::SetupRunState as S;
    match state {
        S::Unspecified => StateName::calm("unknown"),
        S::Pending => StateName::calm("pending"),
        S::Running => StateName::calm("running"),
        S::Succeeded => StateName::calm("succeeded"),
        S::Failed => StateName::alarm("failed"),
        S::TimedOut => StateName::alarm("timed out"),
        S::Interrupted => StateName::alarm("interrupted"),
    }
}

/// Where an image pull is.
pub fn pull_phase(phase: proto::PullPhase) -> StateName {
    use proto::PullPhase as P;
    match phase {
        P::Unspecified => StateName::calm("-"),
        P::Queued => StateName::calm("queued"),
        P::Held => StateName::alarm("held"),
        P::WaitingForDisk => StateName::alarm("waiting for disk"),
        P::Resolving => StateName::calm("resolving"),
        P::Pulling => StateName::calm("pulling"),
        P::Retrying => StateName::alarm("retrying"),
        P::Done => StateName::calm("done"),
        P::Failed => StateName::alarm("failed"),
    }
}

/// How sshd is started.
pub fn ssh_listener(listener: proto::SshListener) -> StateName {
    use proto::SshListener as L;
    StateName::calm(match listener {
        L::Unspecified => "unknown",
        L::Service => "service",
        L::Socket => "socket",
    })
}

/// When a setup script runs.
pub fn setup_kind(kind: proto::SetupKind) -> StateName {
    use proto::SetupKind as K;
    StateName::calm(match kind {
        K::Unspecified => "-",
        K::Creation => "creation",
        K::Startup => "startup",
        K::Adhoc => "adhoc",
    })
}

/// An app's state; unhealthy, backoff and failed need attention.
pub fn app(state: proto::AppState) -> StateName {
    use proto::AppState as S;
    match state {
        S::Unspecified => StateName::calm("?"),
        S::Pending => StateName::calm("pending"),
        S::Pulling => StateName::calm("pulling"),
        S::Starting => StateName::calm("starting"),
        S::Ready => StateName::calm("ready"),
        S::Unhealthy => StateName::alarm("unhealthy"),
        S::Backoff => StateName::alarm("backoff"),
        S::Stopped => StateName::calm("stopped"),
        S::Failed => StateName::alarm("failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_shout_what_needs_attention_and_sentences_do_not() {
        let stale = mount(proto::MountState::Stale);
        assert_eq!(format!("{stale:<8}|"), "STALE   |");
        assert_eq!(stale.plain(), "stale");
        let mounted = mount(proto::MountState::Mounted);
        assert_eq!(format!("{mounted:<8}|"), "mounted |");
        let timed_out = setup_run(proto::SetupRunState::TimedOut);
        assert_eq!(timed_out.to_string(), "TIMED OUT");
        assert_eq!(timed_out.plain(), "timed out");
        assert_eq!(disk(proto::DiskState::Critical).to_string(), "CRITICAL");
        assert_eq!(condition(proto::ConditionState::Ok).to_string(), "ok");
        assert_eq!(job(proto::JobState::Failed).to_string(), "failed");
        assert_eq!(
            pull_phase(proto::PullPhase::WaitingForDisk).to_string(),
            "WAITING FOR DISK"
        );
    }

    #[test]
    fn every_job_state_name_parses_back() {
        use proto::JobState as S;
        for state in [
            S::Queued,
            S::Starting,
            S::Running,
            S::Succeeded,
            S::Failed,
            S::Cancelled,
            S::TimedOut,
        ] {
            let name = job(state).plain();
            assert_eq!(parse_job(name).expect(name), state);
        }
        let error = parse_job("done").expect_err("not a state").to_string();
        assert!(error.contains("expected queued"), "{error}");
    }
}

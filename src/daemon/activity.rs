//! The activity sources that live in other domains, as small adapters from
//! their public handles to [`lifecycle::ActivitySource`]: jobs (queued,
//! starting, running), setup scripts running, SSH sessions, apps running.
//! Here, where the agent is assembled, so that the lifecycle domain imports
//! none of them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::access::AccessService;
use crate::apps::{AppManager, AppState};
use crate::jobs::{JobFilter, JobManager, JobState};
use crate::lifecycle::source::{Background, Terminals};
use crate::lifecycle::{self, ActivitySource, Reading, SourceKind};
use crate::setup::{RunState, SetupScripts};

/// Every source, in the order replies list them.
pub(super) fn sources(
    config: &lifecycle::LifecycleConfig,
    jobs: &JobManager,
    setup: &SetupScripts,
    access: &AccessService,
    apps: &AppManager,
) -> Vec<Arc<dyn ActivitySource>> {
    vec![
        Arc::new(Jobs(jobs.clone())),
        Arc::new(Setup(setup.clone())),
        Arc::new(Ssh(access.clone())),
        Arc::new(Terminals::new(
            "/dev/pts",
            Duration::from_secs(config.terminals.recent_seconds.into()),
        )),
        Arc::new(Background::new(lifecycle::background::BackgroundWork::new(
            lifecycle::background::ProcFs::default(),
            config.background.clone(),
        ))),
        Arc::new(Apps(apps.clone())),
    ]
}

/// Jobs queued, starting or running.
struct Jobs(JobManager);

#[async_trait]
impl ActivitySource for Jobs {
    fn kind(&self) -> SourceKind {
        SourceKind::Jobs
    }

    async fn read(&self) -> Reading {
        let live = self.0.list(&JobFilter {
            states: vec![JobState::Running, JobState::Starting, JobState::Queued],
            labels: Vec::new(),
            limit: usize::MAX,
        });
        // A running job names the reading before a queued one.
        let first = live
            .iter()
            .min_by_key(|v| match v.record.state {
                JobState::Running => 0,
                JobState::Starting => 1,
                _ => 2,
            })
            .map(|v| format!("job {} {}", v.record.id(), v.record.state.name()));
        Reading::count(live.len(), first)
    }
}

/// Setup scripts accepted or running.
struct Setup(SetupScripts);

#[async_trait]
impl ActivitySource for Setup {
    fn kind(&self) -> SourceKind {
        SourceKind::SetupScripts
    }

    async fn read(&self) -> Reading {
        let runs: Vec<_> = self
            .0
            .list(&[], usize::MAX)
            .into_iter()
            .filter(|r| matches!(r.state, RunState::Pending | RunState::Running))
            .collect();
        let first = runs.first().map(|r| {
            format!(
                "setup script {} ({}) {}",
                r.id,
                r.source,
                if r.state == RunState::Running {
                    "running"
                } else {
                    "pending"
                }
            )
        });
        Reading::count(runs.len(), first)
    }
}

/// SSH sessions open now.
struct Ssh(AccessService);

#[async_trait]
impl ActivitySource for Ssh {
    fn kind(&self) -> SourceKind {
        SourceKind::Ssh
    }

    async fn read(&self) -> Reading {
        let sessions = self.0.sessions().await;
        let first = sessions.first().map(|s| {
            if s.from.is_empty() {
                format!("SSH session of {} (pid {})", s.user, s.pid)
            } else {
                format!("SSH session of {} from {}", s.user, s.from)
            }
        });
        Reading::count(sessions.len(), first)
    }
}

/// Apps that run a container (starting, ready, unhealthy).
struct Apps(AppManager);

#[async_trait]
impl ActivitySource for Apps {
    fn kind(&self) -> SourceKind {
        SourceKind::Apps
    }

    async fn read(&self) -> Reading {
        let running: Vec<_> = self
            .0
            .list()
            .into_iter()
            .filter(|a| {
                matches!(
                    a.state,
                    AppState::Starting | AppState::Ready | AppState::Unhealthy
                )
            })
            .collect();
        let first = running
            .first()
            .map(|a| format!("app {} {}", a.spec.name, a.state.as_str()));
        Reading::count(running.len(), first)
    }
}

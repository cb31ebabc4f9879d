//! Containers of unknown origin: labelled with this instance's id, but with
//! no job record (lost with a damaged or deleted store, skipped as
//! undecodable, or without a job label at all). They may be jobs that still
//! run, so the agent never removes them by itself: it keeps them, reports
//! them (GetStatus and the `store` condition) and removes them only in the
//! reclaim step "unknown_containers", which runs only when a `ReclaimSpace`
//! asks for it (`disk reclaim --unknown-containers`), or leaves that to the
//! operator (`docker rm`). They hold no slots: what they use is not known.
//!
//! Found by the reconciliation after a start (`recovery.rs`); listed again
//! by the step and, while there are any, by the retention sweep, so that
//! the report follows containers that exit or that the operator removed.
//! Submitting a job again with the id on a container's label claims it:
//! the container has the name that job's container gets, so the job's task
//! takes it over (supervised, never started twice; `job_task.rs`) and its
//! exit is recorded as that job's.

use async_trait::async_trait;

use super::engine::EngineError;
use super::manager::JobManager;
use super::state::UnknownContainer;
use super::{LABEL_INSTANCE, LABEL_JOB};
use crate::disk::reclaim::{Freed, ReclaimError, ReclaimStep, Removals};

impl JobManager {
    /// The containers of unknown origin found so far (empty until the
    /// reconciliation with the engine).
    pub fn unknown_containers(&self) -> Vec<UnknownContainer> {
        self.inner.unknown.borrow().clone()
    }

    /// [`JobManager::unknown_containers`], as it changes.
    pub fn watch_unknown_containers(&self) -> tokio::sync::watch::Receiver<Vec<UnknownContainer>> {
        self.inner.unknown.subscribe()
    }

    /// Replaces the list, logging the containers that are new in it.
    pub(super) fn set_unknown(&self, found: Vec<UnknownContainer>) {
        self.inner.unknown.send_if_modified(|current| {
            if *current == found {
                return false;
            }
            for c in found
                .iter()
                .filter(|c| !current.iter().any(|old| old.container_id == c.container_id))
            {
                tracing::warn!(container = %c.container_id, job = ?c.job_id, state = %c.state,
                    "a container of unknown origin is kept (no job record owns it)");
            }
            *current = found.clone();
            true
        });
    }

    /// A job with id `job` was just recorded: a container of unknown origin
    /// labelled with it is its container now (the job's task finds it by
    /// name), no longer unknown.
    pub(super) fn claim_unknown(&self, job: &str) {
        self.inner.unknown.send_if_modified(|current| {
            let before = current.len();
            current.retain(|c| c.job_id.as_deref() != Some(job));
            current.len() != before
        });
    }

    /// Lists this instance's containers again and keeps those no record owns.
    pub(super) async fn refresh_unknown(&self) -> Result<Vec<UnknownContainer>, EngineError> {
        let containers = self
            .inner
            .engine
            .list(LABEL_INSTANCE, &self.inner.instance_id)
            .await?;
        let unknown: Vec<UnknownContainer> = {
            let state = self.lock();
            containers
                .into_iter()
                .filter_map(|c| {
                    let job_id = c.labels.get(LABEL_JOB).cloned();
                    let owned = job_id
                        .as_ref()
                        .is_some_and(|job| state.jobs.contains_key(job));
                    (!owned).then_some(UnknownContainer {
                        container_id: c.id,
                        job_id,
                        state: c.state,
                    })
                })
                .collect()
        };
        self.set_unknown(unknown.clone());
        Ok(unknown)
    }
}

/// Reclaim step "unknown_containers": removes (stopping them first) the
/// containers of unknown origin. Runs only when a reclaim asks for it;
/// reports items, not bytes (a container's size is not measured here).
pub struct UnknownContainers {
    jobs: JobManager,
}

impl UnknownContainers {
    /// The step for `jobs`' containers.
    pub fn new(jobs: JobManager) -> Self {
        Self { jobs }
    }
}

#[async_trait]
impl ReclaimStep for UnknownContainers {
    fn name(&self) -> &'static str {
        "unknown_containers"
    }

    fn only_when_asked(&self) -> bool {
        true
    }

    async fn estimate(&self) -> Result<Freed, ReclaimError> {
        let unknown = self.jobs.refresh_unknown().await?;
        Ok(Freed {
            bytes: 0,
            items: u32::try_from(unknown.len()).unwrap_or(u32::MAX),
        })
    }

    async fn run(&self) -> Result<Freed, ReclaimError> {
        let mut removals = Removals::default();
        for c in self.jobs.refresh_unknown().await? {
            match self.jobs.inner.engine.remove(&c.container_id).await {
                Ok(()) => {
                    tracing::info!(container = %c.container_id, job = ?c.job_id, state = %c.state,
                        "reclaim: removed a container of unknown origin, as asked");
                    removals.removed(0);
                }
                Err(error) => removals.failed(error),
            }
        }
        // What is left (a failed removal) stays reported.
        if let Err(error) = self.jobs.refresh_unknown().await {
            tracing::warn!(%error, "cannot list the containers of unknown origin again");
        }
        removals.finish()
    }
}

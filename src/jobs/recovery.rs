//! Crash recovery: once the engine answers after an agent start, the
//! records are matched with the containers that carry this instance's
//! label. What runs is adopted (never started twice), what was created but
//! never started is started (or, if asked to cancel, removed), what ended
//! is recorded, a recorded intent without a container is re-queued, a
//! running job whose container vanished fails, the containers of finished
//! jobs are removed, and containers that no record owns are kept and
//! reported as of unknown origin (`unknown.rs`): their records may have been
//! lost with a damaged or deleted store, and they may be jobs still running.
//!
//! Relies on the manager's ordering (the intent is stored before the
//! container is created, and the container name is derived from the job
//! id): a crash between any two steps leaves a state listed above.

use std::collections::HashMap;

use super::engine::EngineError;
use super::job_task::Launch;
use super::manager::JobManager;
use super::record::{JobRecord, JobState};
use super::state::UnknownContainer;
use super::{LABEL_INSTANCE, LABEL_JOB};

impl JobManager {
    /// Matches the records with the engine's containers after a start (or a
    /// failed removal): adopts what runs, records what ended, re-queues what
    /// never started, fails what vanished, removes the containers of
    /// finished jobs and keeps those that no record owns.
    pub(super) async fn reconcile(&self) -> Result<(), EngineError> {
        let containers = self
            .inner
            .engine
            .list(LABEL_INSTANCE, &self.inner.instance_id)
            .await?;
        let mut by_job: HashMap<String, (String, String)> = HashMap::new();
        let mut orphans = Vec::new();
        let mut unknown = Vec::new();
        for c in containers {
            match c.labels.get(LABEL_JOB) {
                Some(job) => {
                    by_job.insert(job.clone(), (c.id, c.state));
                }
                None => unknown.push(UnknownContainer {
                    container_id: c.id,
                    job_id: None,
                    state: c.state,
                }),
            }
        }
        let mut launches = Vec::new();
        let mut changed = Vec::new();
        {
            let mut state = self.lock();
            let unfinished: Vec<JobRecord> = state
                .jobs
                .values()
                .filter(|r| {
                    matches!(r.state, JobState::Starting | JobState::Running)
                        && !state.active.contains_key(r.id())
                })
                .cloned()
                .collect();
            for record in unfinished {
                let id = record.id().to_owned();
                match by_job.remove(&id) {
                    Some((container, status)) => {
                        let cancel =
                            state.reserve(&id, record.spec.slots, record.gpu_indices.clone());
                        let launch = if status == "created" {
                            Launch::StartExisting(container)
                        } else {
                            Launch::Adopt(container)
                        };
                        launches.push((id, launch, cancel));
                    }
                    None if record.state == JobState::Starting && record.cancel_requested => {
                        // Never ran, and a cancel was asked for before the
                        // crash (or before this reconciliation).
                        if let Some(r) = state.jobs.get_mut(&id) {
                            r.transition(
                                JobState::Cancelled,
                                "cancelled before its container was created",
                            );
                            changed.push(r.clone());
                        }
                    }
                    None if record.state == JobState::Starting => {
                        // The intent was recorded but no container exists: it
                        // never ran, so it may run now.
                        if let Some(r) = state.jobs.get_mut(&id) {
                            r.transition(
                                JobState::Queued,
                                "re-queued after an agent restart: its container was never created",
                            );
                            changed.push(r.clone());
                        }
                        if let Some(r) = state.jobs.get(&id).cloned() {
                            state.enqueue(&r);
                        }
                    }
                    None => {
                        if let Some(r) = state.jobs.get_mut(&id) {
                            r.transition(JobState::Failed, "container lost: it no longer exists");
                            changed.push(r.clone());
                        }
                    }
                }
            }
            // Containers of finished jobs: their exit is recorded, so they
            // only take space. Those of jobs without a record are not ours
            // to judge: the record may be what was lost.
            for (job, (container, status)) in by_job {
                if state.active.contains_key(&job) {
                    continue;
                }
                if state.jobs.contains_key(&job) {
                    orphans.push(container);
                } else {
                    unknown.push(UnknownContainer {
                        container_id: container,
                        job_id: Some(job),
                        state: status,
                    });
                }
            }
            state.reconciled = true;
        }
        self.set_unknown(unknown);
        for record in &changed {
            if self.persist_until_done(record.id()).await {
                self.publish(record);
            }
        }
        if !self.jobs_config().keep_containers {
            for container in orphans {
                if let Err(error) = self.inner.engine.remove(&container).await {
                    tracing::warn!(%container, %error, "cannot remove a leftover container");
                }
            }
        }
        let adopted = launches.len();
        for (id, launch, cancel) in launches {
            self.inner.tasks.spawn(self.clone().run(id, launch, cancel));
        }
        if adopted > 0 || !changed.is_empty() {
            tracing::info!(
                adopted,
                recovered = changed.len(),
                "reconciled jobs with the engine"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

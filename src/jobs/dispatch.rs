//! Starting queued jobs: the loop that wakes whenever a start may have
//! become possible, and the pass that applies the scheduling rules
//! ([`super::scheduler`]) to the queue: it reserves slots and GPUs for the
//! jobs chosen and hands each to its task ([`super::job_task`]), and ends
//! the queued jobs that never can start or were asked to cancel.
//!
//! The pass runs under the state lock and never awaits: the engine is only
//! asked by the jobs' tasks. Until the records are reconciled with the
//! engine ([`super::recovery`]) nothing starts.

use std::time::Duration;

use super::job_mounts::MountResolution;
use super::job_task::Launch;
use super::manager::{JobManager, MAX_BACKOFF};
use super::record::JobState;
use super::scheduler::{self, Candidate, Free};
use super::spec::MountSource;

impl JobManager {
    /// Runs until shutdown: reconciles with the engine once it answers, then
    /// looks at the queue whenever something that decides a start changes
    /// (a submit, freed slots, a hold, the engine, the config, the GPUs).
    pub(super) async fn schedule_loop(self) {
        let mut admission = self.inner.admission.subscribe();
        let mut engine_up = self.inner.engine_up.clone();
        let mut config = self.inner.config.clone();
        let mut gpus_discovered = self.inner.gpus_discovered.clone();
        let mut backoff = Duration::from_secs(1);
        loop {
            if !self.lock().reconciled && *engine_up.borrow() {
                match self.reconcile().await {
                    Ok(()) => backoff = Duration::from_secs(1),
                    Err(error) => {
                        tracing::warn!(%error, "cannot reconcile jobs with the engine yet");
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            if self.lock().reconciled {
                self.schedule();
            }
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = self.inner.wake.notified() => {}
                Ok(()) = admission.changed() => {}
                Ok(()) = engine_up.changed() => {}
                Ok(()) = config.changed() => {}
                Ok(()) = gpus_discovered.changed() => {}
                // Starvation bounds and retries are time-based.
                _ = tokio::time::sleep(backoff) => {}
            }
        }
    }

    /// Starts every queued job that may start now, and ends the queued jobs
    /// that never can (a shrunk capacity, fewer GPUs than asked for) or were
    /// asked to cancel, so that none blocks the queue behind it.
    fn schedule(&self) {
        let config = self.jobs_config();
        let capacity = self.capacity();
        let reserve_after = Duration::from_secs(config.reserve_after_seconds.into());
        let inventory: Option<Vec<u32>> = (*self.inner.gpus_discovered.borrow())
            .then(|| self.inner.gpus.borrow().iter().map(|g| g.index).collect());
        let inventory_len = inventory.as_ref().map(Vec::len);
        let may_start =
            self.inner.admission.held_reason().is_none() && *self.inner.engine_up.borrow();
        let (launches, ended) = {
            let mut state = self.lock();
            let limits_changed = state.limits_checked != Some((capacity, inventory_len));
            state.limits_checked = Some((capacity, inventory_len));
            let free_slots = capacity.saturating_sub(state.slots_in_use);
            let may_start = may_start && free_slots > 0;
            if state.queue.is_empty() || (!may_start && !limits_changed) {
                return;
            }
            let now = tokio::time::Instant::now();
            let mut candidates = Vec::new();
            let mut ending = Vec::new();
            for record in state.queue.iter().filter_map(|key| state.jobs.get(&key.id)) {
                if record.cancel_requested {
                    ending.push((
                        record.clone(),
                        JobState::Cancelled,
                        "cancelled before its container started".to_owned(),
                    ));
                    continue;
                }
                let (slots, gpus) = (record.spec.slots, record.spec.gpus);
                if let Some(why) = scheduler::never_fits(slots, gpus, capacity, inventory_len) {
                    ending.push((record.clone(), JobState::Failed, why));
                    continue;
                }
                // A GPU job waits for the inventory to be known.
                if !may_start || (gpus > 0 && inventory.is_none()) {
                    continue;
                }
                candidates.push(Candidate {
                    id: record.id().to_owned(),
                    slots,
                    gpus,
                    waited: state
                        .queued_since
                        .get(record.id())
                        .map_or(Duration::ZERO, |t| now - *t),
                    mounts_ready: record.spec.mounts.iter().all(|m| match &m.source {
                        MountSource::Managed(name) => {
                            matches!(self.inner.mounts.resolve(name), MountResolution::Ready(_))
                        }
                        MountSource::HostPath(_) => true,
                    }),
                });
            }
            let mut ended = Vec::new();
            for (record, next, why) in ending {
                state.dequeue(&record);
                if let Some(r) = state.jobs.get_mut(record.id())
                    && r.transition(next, why)
                {
                    ended.push(r.clone());
                }
            }
            let busy = state.gpus_in_use();
            let free = Free {
                slots: free_slots,
                gpus: inventory
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|g| !busy.contains(g))
                    .collect(),
            };
            let starts = if may_start {
                scheduler::select(&candidates, free, reserve_after)
            } else {
                Vec::new()
            };
            let mut launches = Vec::new();
            for start in starts {
                let Some(record) = state.jobs.get(&start.id).cloned() else {
                    continue;
                };
                state.dequeue(&record);
                let cancel = state.reserve(&start.id, record.spec.slots, start.gpus.clone());
                if let Some(r) = state.jobs.get_mut(&start.id) {
                    r.transition(JobState::Starting, "creating the container");
                    r.gpu_indices = start.gpus;
                }
                launches.push((start.id, cancel));
            }
            (launches, ended)
        };
        for record in ended {
            let manager = self.clone();
            self.inner.tasks.spawn(async move {
                if manager.persist_until_done(record.id()).await {
                    manager.publish(&record);
                }
            });
        }
        for (id, cancel) in launches {
            self.inner
                .tasks
                .spawn(self.clone().run(id, Launch::Fresh, cancel));
        }
    }
}

#[cfg(test)]
mod tests;

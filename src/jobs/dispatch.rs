//! Starting queued jobs: the loop that wakes whenever a start may have
//! become possible, and the pass that applies the scheduling rules
//! ([`super::scheduler`]) to the queue: it reserves slots and GPUs for the
//! jobs chosen and hands each to its task ([`super::job_task`]), and ends
//! the queued jobs that never can start or were asked to cancel. It also
//! tells the images domain which images the queue needs, in order
//! ([`super::job_images`]): a job starts only once its image is local.
//!
//! The pass runs under the state lock and never awaits: the engine is only
//! asked by the jobs' tasks. Until the records are reconciled with the
//! engine ([`super::recovery`]) nothing starts.

use std::time::Duration;

use super::job_images::{ImageState, ImageWant, WantStage};
use super::job_mounts::MountResolution;
use super::job_task::Launch;
use super::manager::{JobManager, MAX_BACKOFF};
use super::record::JobState;
use super::scheduler::{self, Candidate, Free};
use super::spec::MountSource;
use super::state::State;

impl JobManager {
    /// Runs until shutdown: reconciles with the engine once it answers, then
    /// looks at the queue whenever something that decides a start changes
    /// (a submit, freed slots, a hold, the engine, the config, the GPUs).
    pub(super) async fn schedule_loop(self) {
        let mut admission = self.inner.admission.subscribe();
        let mut engine_up = self.inner.engine_up.clone();
        let mut config = self.inner.config.clone();
        let mut gpus_discovered = self.inner.gpus_discovered.clone();
        let mut images = self.inner.images.changes();
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
                Ok(()) = images.changed() => {}
                // Starvation bounds and retries are time-based.
                _ = tokio::time::sleep(backoff) => {}
            }
        }
    }

    /// Starts every queued job that may start now, and ends the queued jobs
    /// that never can (a shrunk capacity, fewer GPUs than asked for, an image
    /// that could not be pulled) or were asked to cancel, so that none blocks
    /// the queue behind it. Tells the images domain what the jobs need, in
    /// queue order, whether or not anything can start: the images of queued
    /// jobs are pulled while the slots are busy.
    fn schedule(&self) {
        let config = self.jobs_config();
        let capacity = self.capacity();
        let reserve_after = Duration::from_secs(config.reserve_after_seconds.into());
        let inventory: Option<Vec<u32>> = (*self.inner.gpus_discovered.borrow())
            .then(|| self.inner.gpus.borrow().iter().map(|g| g.index).collect());
        let inventory_len = inventory.as_ref().map(Vec::len);
        let may_start =
            self.inner.admission.held_reason().is_none() && *self.inner.engine_up.borrow();
        let images = self.inner.images.clone();
        let (launches, ended, wants) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let limits_changed = state.limits_checked != Some((capacity, inventory_len));
            state.limits_checked = Some((capacity, inventory_len));
            let free_slots = capacity.saturating_sub(state.slots_in_use);
            let may_start = may_start && free_slots > 0;
            let now = tokio::time::Instant::now();
            let mut candidates = Vec::new();
            let mut ending = Vec::new();
            let mut queued = Vec::new();
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
                let image_ready = match images.state(record.id(), &record.spec.image) {
                    ImageState::Ready => true,
                    ImageState::Pulling(_) => false,
                    ImageState::Failed(why) => {
                        let why = format!("cannot pull image {}: {why}", record.spec.image);
                        ending.push((record.clone(), JobState::Failed, why));
                        continue;
                    }
                };
                queued.push((
                    record.id().to_owned(),
                    record.spec.image.clone(),
                    image_ready,
                ));
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
                    image_ready,
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
            let (starts, due) = if may_start && (limits_changed || !candidates.is_empty()) {
                (
                    scheduler::select(&candidates, free.clone(), reserve_after),
                    due_for_images(&candidates, free, reserve_after),
                )
            } else {
                (Vec::new(), Vec::new())
            };
            let wants = image_wants(state, &queued, &due);
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
            // A job's own credential lives as long as the job may still pull.
            let jobs = &state.jobs;
            state
                .registry_auth
                .retain(|id, _| jobs.get(id).is_some_and(|r| !r.state.is_final()));
            (launches, ended, wants)
        };
        images.want(wants);
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

/// The queued jobs that would start now if their images were local: their
/// pulls come first.
fn due_for_images(candidates: &[Candidate], free: Free, reserve_after: Duration) -> Vec<String> {
    let mut all_local = candidates.to_vec();
    for candidate in &mut all_local {
        candidate.image_ready = true;
    }
    scheduler::select(&all_local, free, reserve_after)
        .into_iter()
        .map(|start| start.id)
        .filter(|id| candidates.iter().any(|c| &c.id == id && !c.image_ready))
        .collect()
}

/// What the jobs need of the images domain: the queued jobs in queue order
/// (`queued`: id, image, whether it is local), the due ones marked, then the
/// started jobs.
fn image_wants(state: &State, queued: &[(String, String, bool)], due: &[String]) -> Vec<ImageWant> {
    let auth = |id: &str| state.registry_auth.get(id).cloned();
    let mut wants: Vec<ImageWant> = queued
        .iter()
        .map(|(id, image, _)| ImageWant {
            job: id.clone(),
            image: image.clone(),
            auth: auth(id),
            stage: if due.contains(id) {
                WantStage::Due
            } else {
                WantStage::Queued
            },
        })
        .collect();
    wants.extend(state.active.keys().filter_map(|id| {
        let record = state.jobs.get(id)?;
        Some(ImageWant {
            job: id.clone(),
            image: record.spec.image.clone(),
            auth: None,
            stage: WantStage::Active,
        })
    }));
    wants
}

#[cfg(test)]
mod tests;

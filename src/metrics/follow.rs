//! The event follower: counters and histograms fed by the [`EventBus`]
//! (finished jobs, disk alerts, reclaims, remounts, setup runs).
//!
//! [`EventBus`]: crate::events::EventBus

use tokio_util::sync::CancellationToken;

use super::Metrics;
use super::series::{MountLabel, SetupLabels, StateLabel, StepLabel, TriggerLabel};
use crate::disk::reclaim::ReclaimFinished;
use crate::events::{Delivery, EventPayload, Subscription};
use crate::jobs::JobRecord;
use crate::mounts::{MountState, MountStatus};
use crate::setup::SetupRun;

impl Metrics {
    /// Updates the event-fed series from one event.
    pub fn observe(&self, payload: &EventPayload) {
        match payload {
            EventPayload::Agent { .. } => {}
            EventPayload::Job(record) => self.observe_job(record),
            EventPayload::Mount(status) => self.observe_mount(status),
            EventPayload::Setup(run) => self.observe_setup(run),
            EventPayload::DiskAlert(alert) => {
                // Equal states are the current-state replay, not a change.
                if alert.old_state != alert.new_state {
                    self.inner
                        .disk_alerts
                        .get_or_create(&StateLabel {
                            state: alert.new_state.name().to_owned(),
                        })
                        .inc();
                }
            }
            EventPayload::Reclaim(finished) => self.observe_reclaim(finished),
            // Apps' series are read at scrape time and fed by their probes.
            EventPayload::App(_) | EventPayload::Lifecycle(_) => {}
        }
    }

    fn observe_reclaim(&self, finished: &ReclaimFinished) {
        // Dry runs are not published; a report of one deleted nothing.
        if finished.report.dry_run {
            return;
        }
        self.inner
            .reclaims
            .get_or_create(&TriggerLabel {
                trigger: finished.trigger.name().to_owned(),
            })
            .inc();
        // A failed step may still have freed something before it failed.
        for step in finished.report.steps.iter().filter(|s| s.ran) {
            self.inner
                .reclaimed_bytes
                .get_or_create(&StepLabel {
                    step: step.name.to_owned(),
                })
                .inc_by(step.freed.bytes);
        }
    }

    fn observe_job(&self, record: &JobRecord) {
        if !record.state.is_final() {
            return;
        }
        self.inner
            .jobs_finished
            .get_or_create(&StateLabel {
                state: record.state.name().to_owned(),
            })
            .inc();
        if let (Some(running), Some(finished)) = (record.running_at, record.finished_at)
            && let Ok(ran) = finished.duration_since(running)
        {
            self.inner.job_duration.observe(ran.as_secs_f64());
        }
    }

    /// Counts a repair once, when a mount enters remounting. Its state gauge
    /// is read at scrape time instead: a mount restored before this task
    /// started, or removed since, shows as it is.
    fn observe_mount(&self, status: &MountStatus) {
        let previous = self
            .inner
            .mount_last
            .lock()
            // Only inserts happen under this lock, so a poisoned map is whole.
            .unwrap_or_else(|p| p.into_inner())
            .insert(status.name.clone(), status.state);
        // Created at 0 with the mount's first event, so rate() sees the first repair.
        let remounts = self.inner.mount_remounts.get_or_create(&MountLabel {
            mount: status.name.clone(),
        });
        if status.state == MountState::Remounting && previous != Some(MountState::Remounting) {
            remounts.inc();
        }
    }

    fn observe_setup(&self, run: &SetupRun) {
        if !run.state.is_terminal() {
            return;
        }
        self.inner
            .setup_runs
            .get_or_create(&SetupLabels {
                kind: run.kind.name().to_owned(),
                result: run.state.name().replace(' ', "_"),
            })
            .inc();
    }

    /// Feeds the event-fed series from `subscription` (taken before the
    /// task starts, so nothing published meanwhile is missed) until cancelled.
    pub async fn follow_events(self, mut subscription: Subscription, cancel: CancellationToken) {
        loop {
            let delivery = tokio::select! {
                _ = cancel.cancelled() => return,
                delivery = subscription.next() => delivery,
            };
            match delivery {
                Some(Delivery::Event(event)) => self.observe(&event.payload),
                Some(Delivery::Truncated {
                    requested_since,
                    oldest_available,
                }) => {
                    tracing::warn!(
                        missed = oldest_available.saturating_sub(requested_since + 1),
                        "metrics fell behind the event backlog; some events were not counted"
                    );
                }
                None => return,
            }
        }
    }
}

//! The instance's status as `GetStatus` and the CLI show it: version, uptime,
//! host facts, conditions and job slots, assembled from memory only so that a
//! status call never waits on Docker or a disk.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use crate::admission::AdmissionGate;
use crate::events::EventBus;
use crate::health::{Condition, Health, Subsystem};
use crate::host::{Gpu, HostFacts};
use crate::jobs::SlotUsage;

/// Everything `GetStatus` returns.
#[derive(Debug, Clone)]
pub struct StatusReport {
    /// Agent version.
    pub version: &'static str,
    /// When the agent started.
    pub started_at: SystemTime,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// This instance's id.
    pub instance_id: String,
    /// Static host facts.
    pub host: HostFacts,
    /// Available memory now.
    pub memory_available_bytes: u64,
    /// One condition per subsystem.
    pub conditions: Vec<(Subsystem, Condition)>,
    /// Job slots.
    pub slots: SlotUsage,
    /// The one-line summary.
    pub summary: String,
    /// Latest event sequence number.
    pub last_event_sequence: u64,
    /// Containers of this instance that no job record owns.
    pub unknown_containers: Vec<crate::jobs::UnknownContainer>,
}

/// Assembles status reports. Cheap to clone.
#[derive(Clone)]
pub struct StatusProvider {
    started_at: SystemTime,
    started: tokio::time::Instant,
    instance_id: Arc<str>,
    host: Arc<HostFacts>,
    gpus: watch::Receiver<Vec<Gpu>>,
    health: Health,
    events: EventBus,
    admission: AdmissionGate,
    jobs: Option<crate::jobs::JobManager>,
    /// Available memory, read at most once a second: GetStatus is meant to
    /// be cheap enough to poll hard.
    memory: Arc<std::sync::Mutex<(Option<tokio::time::Instant>, u64)>>,
}

impl StatusProvider {
    /// A provider for an agent that starts now.
    pub fn new(
        instance_id: &str,
        host: HostFacts,
        gpus: watch::Receiver<Vec<Gpu>>,
        health: Health,
        events: EventBus,
        admission: AdmissionGate,
    ) -> Self {
        Self {
            started_at: SystemTime::now(),
            started: tokio::time::Instant::now(),
            instance_id: instance_id.into(),
            host: Arc::new(host),
            gpus,
            health,
            events,
            admission,
            jobs: None,
            memory: Arc::new(std::sync::Mutex::new((None, 0))),
        }
    }

    /// Reports slot usage from the job manager.
    pub fn with_jobs(mut self, jobs: crate::jobs::JobManager) -> Self {
        self.jobs = Some(jobs);
        self
    }

    /// The one-line summary with slot usage, for systemd's STATUS=.
    pub fn status_line(&self) -> String {
        match &self.jobs {
            Some(jobs) => {
                let slots = jobs.slot_usage();
                format!(
                    "{}; slots {}/{}, {} queued",
                    self.health.summary(),
                    slots.in_use,
                    slots.capacity,
                    slots.queued
                )
            }
            None => self.health.summary(),
        }
    }

    /// The one-line summary for systemd's STATUS= and the CLI.
    pub fn summary(&self) -> String {
        self.health.summary()
    }

    fn memory_available(&self) -> u64 {
        let now = tokio::time::Instant::now();
        let mut cached = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        if cached
            .0
            .is_none_or(|at| now.duration_since(at) >= std::time::Duration::from_secs(1))
        {
            *cached = (Some(now), crate::host::memory_available_bytes());
        }
        cached.1
    }

    /// A full report, from memory.
    pub fn report(&self) -> StatusReport {
        let mut host = (*self.host).clone();
        host.gpus = self.gpus.borrow().clone();
        let (conditions, summary) = self.health.snapshot();
        StatusReport {
            version: env!("CARGO_PKG_VERSION"),
            started_at: self.started_at,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            instance_id: self.instance_id.to_string(),
            host,
            memory_available_bytes: self.memory_available(),
            conditions,
            slots: match &self.jobs {
                Some(jobs) => jobs.slot_usage(),
                None => SlotUsage {
                    held_reason: self.admission.held_reason().unwrap_or_default(),
                    ..SlotUsage::default()
                },
            },
            summary,
            last_event_sequence: self.events.last_sequence(),
            unknown_containers: self
                .jobs
                .as_ref()
                .map(crate::jobs::JobManager::unknown_containers)
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{ConditionState, Subsystem};

    fn provider() -> (StatusProvider, Health, AdmissionGate, EventBus) {
        let health = Health::new();
        let admission = AdmissionGate::new();
        let events = EventBus::new(16);
        let (_gpus_tx, gpus) = watch::channel(Vec::new());
        let host = HostFacts {
            hostname: "vm-1".into(),
            kernel: "6.1.0".into(),
            host_cpus: 4,
            usable_cores: 2.5,
            memory_total_bytes: 8 << 30,
            gpus: Vec::new(),
            supervision: String::new(),
        };
        let provider = StatusProvider::new(
            "inst-1",
            host,
            gpus,
            health.clone(),
            events.clone(),
            admission.clone(),
        );
        (provider, health, admission, events)
    }

    #[tokio::test]
    async fn the_report_reads_live_state_and_agrees_with_the_summary() {
        let (provider, health, admission, events) = provider();
        health.set(Subsystem::Docker, ConditionState::Failed, "engine down");
        admission.hold("disk", "disk / is full");
        events.publish(crate::events::EventPayload::Agent { phase: "started" });
        let report = provider.report();
        assert_eq!(report.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(report.instance_id, "inst-1");
        assert_eq!(report.host.hostname, "vm-1");
        assert_eq!(report.host.usable_cores, 2.5);
        assert_eq!(report.conditions.len(), Subsystem::ALL.len());
        assert!(report.summary.contains("engine down"), "{}", report.summary);
        assert_eq!(report.summary, provider.summary());
        // Without a job manager the line is the health summary alone, and
        // the held queue still shows.
        assert_eq!(provider.status_line(), provider.summary());
        assert!(
            report.slots.held_reason.contains("disk / is full"),
            "{}",
            report.slots.held_reason
        );
        assert_eq!(report.last_event_sequence, events.last_sequence());
        assert!(report.last_event_sequence >= 1);
        assert!(report.memory_available_bytes > 0);
    }
}

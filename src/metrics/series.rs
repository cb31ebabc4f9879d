//! The registry and its series: every metric's name, help, type and labels,
//! registered once. What feeds them lives beside: `follow` (events), `rpc`
//! (the gRPC layer) and `scrape` (scrape-time reads).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::Sources;
use crate::disk::reclaim::ReclaimTrigger;
use crate::mounts::MountState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StateLabel {
    pub(super) state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct MountLabel {
    pub(super) mount: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct AppLabel {
    pub(super) app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct AppStateLabels {
    pub(super) app: String,
    pub(super) state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct MountStateLabels {
    pub(super) mount: String,
    pub(super) state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct FilesystemLabel {
    pub(super) mount_point: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct FilesystemStateLabels {
    pub(super) mount_point: String,
    pub(super) state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StepLabel {
    pub(super) step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TriggerLabel {
    pub(super) trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct SetupLabels {
    pub(super) kind: String,
    pub(super) result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RpcLabels {
    pub(super) method: String,
    pub(super) code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct MethodLabel {
    pub(super) method: String,
}

/// The registry and every series in it.
pub(super) struct Inner {
    pub(super) registry: Registry,
    pub(super) sources: Option<Sources>,
    // Fed by events.
    pub(super) jobs_finished: Family<StateLabel, Counter>,
    pub(super) job_duration: Histogram,
    pub(super) disk_alerts: Family<StateLabel, Counter>,
    pub(super) reclaimed_bytes: Family<StepLabel, Counter>,
    pub(super) reclaims: Family<TriggerLabel, Counter>,
    pub(super) mount_remounts: Family<MountLabel, Counter>,
    pub(super) setup_runs: Family<SetupLabels, Counter>,
    /// The last state seen per mount, to count a remount once when it starts.
    pub(super) mount_last: Mutex<HashMap<String, MountState>>,
    // Fed by the RPC layer.
    pub(super) rpcs: Family<RpcLabels, Counter>,
    pub(super) rpc_latency: Family<MethodLabel, Histogram>,
    // Fed by the apps' probes.
    pub(super) app_probe_latency: Family<AppLabel, Histogram>,
    // Refreshed at scrape time.
    pub(super) jobs_by_state: Family<StateLabel, Gauge>,
    pub(super) queue_depth: Gauge,
    pub(super) slots_in_use: Gauge,
    pub(super) slots_capacity: Gauge,
    pub(super) fs_free_bytes: Family<FilesystemLabel, Gauge>,
    pub(super) fs_state: Family<FilesystemStateLabels, Gauge>,
    pub(super) mount_state: Family<MountStateLabels, Gauge>,
    pub(super) app_state: Family<AppStateLabels, Gauge>,
    pub(super) app_restarts: Family<AppLabel, Gauge>,
    pub(super) resident_bytes: Gauge,
    pub(super) cpu_seconds: Counter<f64, AtomicU64>,
}

fn rpc_histogram() -> Histogram {
    // 100 µs to about 3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Inner {
    /// Every series, registered; `sources` names the reclaim steps whose
    /// series start at 0.
    pub(super) fn new(sources: Option<Sources>) -> Self {
        let mut registry = Registry::with_prefix("instance_agent");
        let inner = Inner {
            registry: Registry::default(),
            sources,
            jobs_finished: Family::default(),
            // 1 s to about 2 days.
            job_duration: Histogram::new(exponential_buckets(1.0, 3.0, 12)),
            disk_alerts: Family::default(),
            reclaimed_bytes: Family::default(),
            reclaims: Family::default(),
            mount_remounts: Family::default(),
            mount_state: Family::default(),
            setup_runs: Family::default(),
            mount_last: Mutex::new(HashMap::new()),
            rpcs: Family::default(),
            rpc_latency: Family::new_with_constructor(rpc_histogram),
            app_probe_latency: Family::new_with_constructor(rpc_histogram),
            app_state: Family::default(),
            app_restarts: Family::default(),
            jobs_by_state: Family::default(),
            queue_depth: Gauge::default(),
            slots_in_use: Gauge::default(),
            slots_capacity: Gauge::default(),
            fs_free_bytes: Family::default(),
            fs_state: Family::default(),
            resident_bytes: Gauge::default(),
            cpu_seconds: Counter::default(),
        };
        registry.register(
            "jobs_finished",
            "Jobs that reached a final state, by that state",
            inner.jobs_finished.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Run time of finished jobs (container started to final state)",
            inner.job_duration.clone(),
        );
        registry.register(
            "jobs",
            "Jobs known to the agent, by state",
            inner.jobs_by_state.clone(),
        );
        registry.register(
            "job_queue_depth",
            "Jobs waiting in the queue",
            inner.queue_depth.clone(),
        );
        registry.register(
            "job_slots_in_use",
            "Job slots reserved",
            inner.slots_in_use.clone(),
        );
        registry.register(
            "job_slots_capacity",
            "Job slots in total under the live config",
            inner.slots_capacity.clone(),
        );
        registry.register(
            "disk_free_bytes",
            "Free bytes per watched filesystem, as last sampled",
            inner.fs_free_bytes.clone(),
        );
        registry.register(
            "disk_state",
            "State per watched filesystem: 1 for its current state",
            inner.fs_state.clone(),
        );
        registry.register(
            "disk_alerts",
            "Disk alerts since the agent started, by the new state",
            inner.disk_alerts.clone(),
        );
        registry.register(
            "disk_reclaimed_bytes",
            "Bytes freed by reclaims (requested or automatic, not dry runs), by step",
            inner.reclaimed_bytes.clone(),
        );
        registry.register(
            "disk_reclaims",
            "Reclaims that ran (not dry runs), by what started them",
            inner.reclaims.clone(),
        );
        registry.register(
            "mount_state",
            "State per managed mount: 1 for its current state",
            inner.mount_state.clone(),
        );
        registry.register(
            "app_state",
            "State per app: 1 for its current state",
            inner.app_state.clone(),
        );
        registry.register(
            "app_restarts",
            "Restarts per app by its restart policy (kept across agent restarts)",
            inner.app_restarts.clone(),
        );
        registry.register(
            "app_probe_duration_seconds",
            "Health probe latency per app",
            inner.app_probe_latency.clone(),
        );
        registry.register(
            "mount_remounts",
            "Remounts (repairs) started since the agent started",
            inner.mount_remounts.clone(),
        );
        registry.register(
            "setup_runs",
            "Setup script runs that ended, by kind and result",
            inner.setup_runs.clone(),
        );
        registry.register(
            "rpcs",
            "gRPC calls by method and status code",
            inner.rpcs.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "gRPC latency to the response head, by method",
            inner.rpc_latency.clone(),
        );
        registry.register(
            "resident_memory_bytes",
            "The agent's resident set size (VmRSS)",
            inner.resident_bytes.clone(),
        );
        registry.register(
            "cpu_seconds",
            "CPU time the agent used (user + system)",
            inner.cpu_seconds.clone(),
        );
        // Known label values start at 0, so that rate() sees the first one:
        // creating the series is all these calls do.
        for trigger in [ReclaimTrigger::Api, ReclaimTrigger::Automatic] {
            let _ = inner.reclaims.get_or_create(&TriggerLabel {
                trigger: trigger.name().to_owned(),
            });
        }
        if let Some(sources) = &inner.sources {
            for step in sources.disk.reclaim_step_names() {
                let _ = inner.reclaimed_bytes.get_or_create(&StepLabel {
                    step: step.to_owned(),
                });
            }
        }
        Inner { registry, ..inner }
    }
}

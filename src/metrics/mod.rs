//! Prometheus metrics on a loopback HTTP address (`[metrics] listen`).
//!
//! Owns the registry and the `GET /metrics` server. It reads the domains and
//! never changes them: counters and histograms are fed by a task subscribed to
//! the [`EventBus`], gauges are refreshed from the job manager, the disk guard,
//! the mounts and `/proc/self` just before each scrape, and RPCs are counted
//! by a tower layer on the gRPC servers ([`RpcMetricsLayer`]). The
//! `[metrics]` section is in [`config`].

pub mod config;

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codegen::http;

use crate::disk::DiskGuard;
use crate::disk::reclaim::{ReclaimFinished, ReclaimTrigger};
use crate::events::{Delivery, EventPayload, Subscription};
use crate::jobs::{JobManager, JobRecord, JobState};
use crate::mounts::{MountService, MountState, MountStatus};
use crate::setup::SetupRun;

/// Every job state, for the by-state gauge (states with no job show 0).
const JOB_STATES: [JobState; 7] = [
    JobState::Queued,
    JobState::Starting,
    JobState::Running,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
    JobState::TimedOut,
];

/// Every mount state, so that a mount's state gauge is 1 for exactly one.
const MOUNT_STATES: [MountState; 6] = [
    MountState::Mounting,
    MountState::Mounted,
    MountState::Stale,
    MountState::Remounting,
    MountState::Failed,
    MountState::Unmounted,
];

/// Every disk state, for the per-filesystem state gauge.
const DISK_STATES: [crate::disk::DiskState; 5] = [
    crate::disk::DiskState::Unknown,
    crate::disk::DiskState::Ok,
    crate::disk::DiskState::Warning,
    crate::disk::DiskState::Critical,
    crate::disk::DiskState::Unresponsive,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MountLabel {
    mount: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MountStateLabels {
    mount: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FilesystemLabel {
    mount_point: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FilesystemStateLabels {
    mount_point: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabel {
    trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SetupLabels {
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

/// Where scrape-time gauges are read from. Absent in unit tests.
#[derive(Clone)]
pub struct Sources {
    /// Jobs by state, queue and slots.
    pub jobs: JobManager,
    /// Watched filesystems.
    pub disk: DiskGuard,
    /// Managed mounts.
    pub mounts: MountService,
}

/// The agent's metrics. Cheap to clone; shared by the event task, the RPC
/// layer and the HTTP server.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    sources: Option<Sources>,
    // Fed by events.
    jobs_finished: Family<StateLabel, Counter>,
    job_duration: Histogram,
    disk_alerts: Family<StateLabel, Counter>,
    reclaimed_bytes: Family<StepLabel, Counter>,
    reclaims: Family<TriggerLabel, Counter>,
    mount_remounts: Family<MountLabel, Counter>,
    setup_runs: Family<SetupLabels, Counter>,
    /// The last state seen per mount, to count a remount once when it starts.
    mount_last: Mutex<HashMap<String, MountState>>,
    // Fed by the RPC layer.
    rpcs: Family<RpcLabels, Counter>,
    rpc_latency: Family<MethodLabel, Histogram>,
    // Refreshed at scrape time.
    jobs_by_state: Family<StateLabel, Gauge>,
    queue_depth: Gauge,
    slots_in_use: Gauge,
    slots_capacity: Gauge,
    fs_free_bytes: Family<FilesystemLabel, Gauge>,
    fs_state: Family<FilesystemStateLabels, Gauge>,
    mount_state: Family<MountStateLabels, Gauge>,
    resident_bytes: Gauge,
    cpu_seconds: Counter<f64, AtomicU64>,
}

fn rpc_histogram() -> Histogram {
    // 100 µs to about 3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Metrics {
    /// A registry with every series; `sources` feeds the scrape-time gauges.
    pub fn new(sources: Option<Sources>) -> Self {
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
        let inner = Inner { registry, ..inner };
        Self {
            inner: Arc::new(inner),
        }
    }

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

    /// Sets the one-hot state gauge of exactly these mounts.
    fn set_mount_states(&self, mounts: &[MountStatus]) {
        // Mounts come and go (Mount, Unmount): rebuild rather than update.
        self.inner.mount_state.clear();
        for status in mounts {
            for state in MOUNT_STATES {
                self.inner
                    .mount_state
                    .get_or_create(&MountStateLabels {
                        mount: status.name.clone(),
                        state: state.name().to_owned(),
                    })
                    .set(i64::from(state == status.state));
            }
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

    /// Records one finished RPC. An Unimplemented reply is filed under method
    /// "unknown": any client could otherwise grow the label set at will (the
    /// layer does the same for paths that no route serves).
    pub fn observe_rpc(&self, method: &str, code: &str, latency: std::time::Duration) {
        let method = if code == "12" { "unknown" } else { method };
        self.inner
            .rpcs
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        self.inner
            .rpc_latency
            .get_or_create(&MethodLabel {
                method: method.to_owned(),
            })
            .observe(latency.as_secs_f64());
    }

    /// Refreshes the scrape-time gauges and renders the text format.
    pub fn render(&self) -> String {
        self.refresh();
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in
        // a label, and an empty reply is the honest answer to it.
        if prometheus_client::encoding::text::encode(&mut out, &self.inner.registry).is_err() {
            out.clear();
        }
        out
    }

    fn refresh(&self) {
        let inner = &self.inner;
        if let Some(own) = read_own_usage() {
            inner
                .resident_bytes
                .set(i64::try_from(own.resident_bytes).unwrap_or(i64::MAX));
            // A counter only goes up: add what was used since the last scrape.
            let before = inner.cpu_seconds.get();
            if own.cpu_seconds > before {
                inner.cpu_seconds.inc_by(own.cpu_seconds - before);
            }
        }
        let Some(sources) = &inner.sources else {
            return;
        };
        let counts = sources.jobs.counts_by_state();
        for state in JOB_STATES {
            inner
                .jobs_by_state
                .get_or_create(&StateLabel {
                    state: state.name().to_owned(),
                })
                .set(
                    counts
                        .get(&state)
                        .map_or(0, |n| i64::try_from(*n).unwrap_or(i64::MAX)),
                );
        }
        let slots = sources.jobs.slot_usage();
        inner.queue_depth.set(i64::from(slots.queued));
        inner.slots_in_use.set(i64::from(slots.in_use));
        inner.slots_capacity.set(i64::from(slots.capacity));

        self.set_mount_states(&sources.mounts.list());

        // Filesystems come and go (mount caches): rebuild rather than update.
        inner.fs_free_bytes.clear();
        inner.fs_state.clear();
        for fs in sources.disk.usage().filesystems {
            let mount_point = fs.mount.mount_point.display().to_string();
            if let Some(stats) = &fs.stats {
                inner
                    .fs_free_bytes
                    .get_or_create(&FilesystemLabel {
                        mount_point: mount_point.clone(),
                    })
                    .set(i64::try_from(stats.free_bytes).unwrap_or(i64::MAX));
            }
            for state in DISK_STATES {
                inner
                    .fs_state
                    .get_or_create(&FilesystemStateLabels {
                        mount_point: mount_point.clone(),
                        state: state.name().to_owned(),
                    })
                    .set(i64::from(state == fs.state));
            }
        }
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

/// The agent's own memory and CPU, from `/proc/self`.
struct OwnUsage {
    resident_bytes: u64,
    cpu_seconds: f64,
}

fn read_own_usage() -> Option<OwnUsage> {
    // Small procfs reads answer from kernel memory and never block on I/O.
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .unwrap_or(100);
    Some(OwnUsage {
        resident_bytes: parse_vm_rss(&status)?,
        cpu_seconds: parse_cpu_ticks(&stat)? as f64 / ticks as f64,
    })
}

/// VmRSS in bytes from `/proc/<pid>/status`.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// utime + stime in clock ticks from `/proc/<pid>/stat`. The command name
/// (field 2) may hold spaces, so fields are counted after its closing `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The metrics HTTP listener failed to bind.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {address} (metrics.listen): {source}")]
pub struct BindError {
    /// The configured address.
    pub address: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics listener (before READY, so a busy port stops the start).
pub async fn bind(address: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| BindError { address, source })
}

/// Serves `GET /metrics` (404 for anything else) until cancelled.
pub async fn serve(
    metrics: Metrics,
    listener: TcpListener,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&metrics, &request)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                result = connection => if let Err(error) = result {
                    tracing::debug!(%error, "metrics connection ended with an error");
                },
            }
        });
    }
}

fn answer<B>(metrics: &Metrics, request: &http::Request<B>) -> http::Response<String> {
    let (status, content_type, body) =
        if request.method() == http::Method::GET && request.uri().path() == "/metrics" {
            (
                http::StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.render(),
            )
        } else {
            let mut body = String::new();
            let _ = writeln!(body, "not found; try GET /metrics");
            (http::StatusCode::NOT_FOUND, "text/plain", body)
        };
    let mut response = http::Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// A tower layer counting gRPC calls by method and status code, with their
/// latency to the response head. Records nothing when metrics are off. It
/// goes outside the security guard, so that refused calls (permission,
/// limits) are counted too.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Option<Metrics>,
    served: fn(&str) -> bool,
}

impl RpcMetricsLayer {
    /// A layer recording into `metrics`, or passing calls through when
    /// `None`. Paths for which `served` is false are filed under method
    /// "unknown".
    pub fn new(metrics: Option<Metrics>, served: fn(&str) -> bool) -> Self {
        Self { metrics, served }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
            served: self.served,
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around the gRPC routes.
#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Option<Metrics>,
    served: fn(&str) -> bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(metrics) = self.metrics.clone() else {
            return Box::pin(self.inner.call(request));
        };
        let path = request.uri().path();
        let method = if (self.served)(path) {
            path.to_owned()
        } else {
            "unknown".to_owned()
        };
        let started = tokio::time::Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                // Errors in the body come in trailers; a status in the head
                // is a trailers-only reply (most errors).
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_owned(),
                Err(_) => "transport_error".to_owned(),
            };
            metrics.observe_rpc(&method, &code, started.elapsed());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn job(state: JobState, ran_seconds: u64) -> JobRecord {
        let spec: crate::jobs::JobSpec = serde_json::from_value(serde_json::json!({
            "id": "j1", "image": "busybox", "command": ["true"]
        }))
        .expect("spec");
        let mut record = JobRecord::queued(spec, 1);
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        record.state = state;
        record.running_at = Some(start);
        record.finished_at = Some(start + Duration::from_secs(ran_seconds));
        record
    }

    #[test]
    fn encodes_event_fed_and_rpc_series() {
        let metrics = Metrics::new(None);
        metrics.observe(&EventPayload::Job(Box::new(job(JobState::Succeeded, 2))));
        metrics.observe(&EventPayload::Job(Box::new(job(JobState::Failed, 500))));
        metrics.observe(&EventPayload::Job(Box::new(job(JobState::Running, 0))));
        metrics.observe_rpc(
            "/instance_agent.v1.AgentService/GetStatus",
            "0",
            Duration::from_millis(1),
        );
        metrics.observe_rpc("/x.Y/Z", "12", Duration::from_millis(1));
        let text = metrics.render();
        assert!(
            text.contains("instance_agent_jobs_finished_total{state=\"succeeded\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("instance_agent_jobs_finished_total{state=\"failed\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("instance_agent_job_duration_seconds_count 2\n"),
            "{text}"
        );
        assert!(
            text.contains("instance_agent_job_duration_seconds_sum 502.0\n"),
            "{text}"
        );
        assert!(text.contains(
            "instance_agent_rpcs_total{method=\"/instance_agent.v1.AgentService/GetStatus\",code=\"0\"} 1\n"
        ), "{text}");
        assert!(
            text.contains("instance_agent_rpcs_total{method=\"unknown\",code=\"12\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE instance_agent_rpc_duration_seconds histogram"));
        assert!(text.contains("# TYPE instance_agent_resident_memory_bytes gauge"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn mount_state_is_one_hot_and_remounts_count_once_per_repair() {
        let metrics = Metrics::new(None);
        let status = |name: &str, state| crate::mounts::MountStatus {
            name: name.into(),
            mount_path: "/mnt/data".into(),
            account: "acct".into(),
            container: "c".into(),
            auth_mode: "key",
            state,
            message: String::new(),
            remount_count: 0,
            last_checked: None,
            read_only: false,
            cache_dir: "/tmp/c".into(),
            cache_max_bytes: 0,
            pid: None,
            origin: crate::mounts::Origin::Api,
        };
        for state in [
            MountState::Mounted,
            MountState::Remounting,
            MountState::Remounting,
            MountState::Mounted,
        ] {
            metrics.observe(&EventPayload::Mount(status("data", state)));
        }
        metrics.set_mount_states(&[
            status("data", MountState::Mounted),
            status("gone", MountState::Stale),
        ]);
        let text = metrics.render();
        assert!(
            text.contains("instance_agent_mount_remounts_total{mount=\"data\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("instance_agent_mount_state{mount=\"data\",state=\"mounted\"} 1\n"));
        assert!(text.contains("instance_agent_mount_state{mount=\"data\",state=\"stale\"} 0\n"));
        assert!(text.contains("instance_agent_mount_state{mount=\"gone\",state=\"stale\"} 1\n"));
        // A mount no longer managed (unmounted) leaves no series behind.
        metrics.set_mount_states(&[status("data", MountState::Mounted)]);
        let text = metrics.render();
        assert!(!text.contains("mount=\"gone\""), "{text}");
    }

    #[test]
    fn reclaimed_bytes_count_by_step_and_runs_by_trigger() {
        use crate::disk::reclaim::{Freed, ReclaimReport, StepReport};
        let step = |name, bytes, ran, error: Option<&str>| StepReport {
            name,
            freed: Freed { bytes, items: 1 },
            ran,
            skipped: (!ran).then(|| "enough space is free".to_owned()),
            error: error.map(str::to_owned),
        };
        let finished = |trigger, dry_run, steps: Vec<StepReport>| {
            EventPayload::Reclaim(Box::new(ReclaimFinished {
                trigger,
                targets: vec!["/mnt".into()],
                report: ReclaimReport {
                    dry_run,
                    total_bytes: steps.iter().map(|s| s.freed.bytes).sum(),
                    steps,
                },
            }))
        };
        let metrics = Metrics::new(None);
        let before = metrics.render();
        assert!(
            before.contains("instance_agent_disk_reclaims_total{trigger=\"automatic\"} 0\n"),
            "{before}"
        );
        metrics.observe(&finished(
            ReclaimTrigger::Automatic,
            false,
            vec![
                step("exited_containers", 700, true, None),
                // Freed part before failing: still freed.
                step(
                    "dangling_images",
                    50,
                    true,
                    Some("1 item(s) could not be removed"),
                ),
                step("expired_job_logs", 0, false, None),
            ],
        ));
        metrics.observe(&finished(
            ReclaimTrigger::Api,
            false,
            vec![step("exited_containers", 300, true, None)],
        ));
        // A dry run deleted nothing.
        metrics.observe(&finished(
            ReclaimTrigger::Api,
            true,
            vec![step("exited_containers", 1_000_000, true, None)],
        ));
        let text = metrics.render();
        for line in [
            "instance_agent_disk_reclaimed_bytes_total{step=\"exited_containers\"} 1000\n",
            "instance_agent_disk_reclaimed_bytes_total{step=\"dangling_images\"} 50\n",
            "instance_agent_disk_reclaims_total{trigger=\"automatic\"} 1\n",
            "instance_agent_disk_reclaims_total{trigger=\"api\"} 1\n",
            "# TYPE instance_agent_disk_reclaimed_bytes counter\n",
        ] {
            assert!(text.contains(line), "{line}{text}");
        }
        assert!(
            !text.contains("step=\"expired_job_logs\""),
            "a skipped step adds no series without sources: {text}"
        );
    }

    #[test]
    fn parses_proc_self() {
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t  1234 kB\n"),
            Some(1234 * 1024)
        );
        let stat = "42 (a b) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15";
        // utime = 11, stime = 12 (fields 14 and 15).
        assert_eq!(parse_cpu_ticks(stat), Some(23));
        assert!(read_own_usage().is_some_and(|u| u.resident_bytes > 0));
    }
}

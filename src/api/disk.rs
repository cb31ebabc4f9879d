//! `DiskService`: converts requests to the disk guard's calls and its
//! results and errors back to protobuf. No policy lives here.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::auth::Role;
use super::peer::{Peer, Who};
use super::proto::{self, disk_service_server::DiskService};
use super::{ReplyStream, timestamp};
use crate::disk::reclaim::{
    ReclaimFinished, ReclaimMode, ReclaimReport, ReclaimRequest, ReclaimTrigger, StepReport,
};
use crate::disk::top::{TopReport, TopRequest};
use crate::disk::{
    DiskAlert, DiskError, DiskGuard, DiskState, FilesystemUsage, SkippedPath, Thresholds,
};
use crate::store::StoreError;

/// The disk service.
pub struct DiskApi {
    guard: DiskGuard,
    shutdown: CancellationToken,
}

impl DiskApi {
    /// Streams end when `shutdown` fires.
    pub fn new(guard: DiskGuard, shutdown: CancellationToken) -> Self {
        Self { guard, shutdown }
    }
}

/// Defaults and limits of `TopDirectories`.
const TOP_LIMIT: (u32, u32) = (20, 1000);
const TOP_TIMEOUT_SECONDS: (u32, u32) = (30, 600);
const TOP_MAX_ENTRIES: (u64, u64) = (5_000_000, 100_000_000);

#[tonic::async_trait]
impl DiskService for DiskApi {
    async fn get_disk_usage(
        &self,
        _: Request<proto::GetDiskUsageRequest>,
    ) -> Result<Response<proto::GetDiskUsageResponse>, Status> {
        let usage = self.guard.usage();
        Ok(Response::new(proto::GetDiskUsageResponse {
            filesystems: usage.filesystems.iter().map(usage_to_proto).collect(),
            skipped: usage.skipped.iter().map(skipped_to_proto).collect(),
            alerts_total: usage.alerts_total,
        }))
    }

    type WatchDiskAlertsStream = ReplyStream<proto::DiskAlert>;

    async fn watch_disk_alerts(
        &self,
        _: Request<proto::WatchDiskAlertsRequest>,
    ) -> Result<Response<Self::WatchDiskAlertsStream>, Status> {
        let mut subscription = self.guard.subscribe();
        let shutdown = self.shutdown.clone();
        let stream = async_stream::stream! {
            loop {
                let alert = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    alert = subscription.next() => alert,
                };
                let Some(alert) = alert else { break };
                yield Ok(alert_to_proto(&alert));
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn reclaim_space(
        &self,
        request: Request<proto::ReclaimSpaceRequest>,
    ) -> Result<Response<proto::ReclaimSpaceResponse>, Status> {
        let request = request.into_inner();
        let report = self
            .guard
            .reclaim(ReclaimRequest {
                path: (!request.path.is_empty()).then(|| PathBuf::from(&request.path)),
                mode: ReclaimMode {
                    dry_run: request.dry_run,
                    all_steps: request.all_steps,
                },
                trigger: ReclaimTrigger::Api,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(reclaim_to_proto(report)))
    }

    type TopDirectoriesStream = ReplyStream<proto::TopDirectoriesUpdate>;

    async fn top_directories(
        &self,
        request: Request<proto::TopDirectoriesRequest>,
    ) -> Result<Response<Self::TopDirectoriesStream>, Status> {
        // An operator's walk sees only what that operator could list.
        let as_uid = match request.extensions().get::<Peer>() {
            Some(Peer {
                role: Role::Operator,
                who: Who::Local { uid, .. },
            }) => Some(*uid),
            _ => None,
        };
        let mut request = top_request(request.into_inner()).map_err(status)?;
        request.as_uid = as_uid;
        let (progress_tx, mut progress) = mpsc::channel(4);
        let guard = self.guard.clone();
        let mut walk = Box::pin(async move { guard.top_directories(request, progress_tx).await });
        let stream = async_stream::stream! {
            loop {
                tokio::select! {
                    biased;
                    result = &mut walk => {
                        yield result.map(top_result_to_proto).map_err(status);
                        break;
                    }
                    Some(p) = progress.recv() => {
                        yield Ok(proto::TopDirectoriesUpdate {
                            update: Some(proto::top_directories_update::Update::Progress(
                                proto::TopDirectoriesProgress {
                                    entries: p.entries,
                                    bytes: p.bytes,
                                    current: p.current.display().to_string(),
                                },
                            )),
                        });
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn add_watched_path(
        &self,
        request: Request<proto::AddWatchedPathRequest>,
    ) -> Result<Response<proto::AddWatchedPathResponse>, Status> {
        let request = request.into_inner();
        self.guard
            .add_watched_path(PathBuf::from(request.path), request.reason)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::AddWatchedPathResponse {}))
    }

    async fn remove_watched_path(
        &self,
        request: Request<proto::RemoveWatchedPathRequest>,
    ) -> Result<Response<proto::RemoveWatchedPathResponse>, Status> {
        let removed = self
            .guard
            .remove_watched_path(PathBuf::from(request.into_inner().path))
            .await
            .map_err(status)?;
        Ok(Response::new(proto::RemoveWatchedPathResponse { removed }))
    }
}

/// Applies the defaults and limits of `TopDirectories`.
fn top_request(r: proto::TopDirectoriesRequest) -> Result<TopRequest, DiskError> {
    fn pick<T: Copy + PartialOrd + std::fmt::Display + Default>(
        field: &'static str,
        value: T,
        (default, max): (T, T),
    ) -> Result<T, DiskError> {
        if value == T::default() {
            Ok(default)
        } else if value > max {
            Err(DiskError::InvalidRequest {
                field,
                problem: format!("{value} is out of range: allowed 1 to {max}"),
            })
        } else {
            Ok(value)
        }
    }
    Ok(TopRequest {
        path: PathBuf::from(r.path),
        limit: pick("limit", r.limit, TOP_LIMIT)? as usize,
        timeout: Duration::from_secs(
            pick("timeout_seconds", r.timeout_seconds, TOP_TIMEOUT_SECONDS)?.into(),
        ),
        max_entries: pick("max_entries", r.max_entries, TOP_MAX_ENTRIES)?,
        as_uid: None,
    })
}

/// Maps every disk guard error to a status, naming what to do.
fn status(error: DiskError) -> Status {
    let message = error.to_string();
    match error {
        DiskError::InvalidRequest { .. } => Status::invalid_argument(message),
        DiskError::Path { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => Status::not_found(message),
            std::io::ErrorKind::PermissionDenied => Status::permission_denied(message),
            _ => Status::failed_precondition(message),
        },
        DiskError::Timeout { .. } => Status::deadline_exceeded(message),
        DiskError::Unresponsive { .. } => Status::unavailable(message),
        DiskError::Busy(_) => Status::resource_exhausted(message),
        DiskError::Store(store) => match store {
            StoreError::NoSpace { .. } => Status::resource_exhausted(format!(
                "{message}; free space on the state filesystem (`instance-agent disk --top` shows where it went)"
            )),
            StoreError::Storage { .. } | StoreError::Corrupt { .. } => Status::internal(message),
        },
        DiskError::Stopped => Status::unavailable(message),
    }
}

/// The protobuf state.
pub fn state_to_proto(state: DiskState) -> proto::DiskState {
    match state {
        DiskState::Unknown => proto::DiskState::Unspecified,
        DiskState::Ok => proto::DiskState::Ok,
        DiskState::Warning => proto::DiskState::Warning,
        DiskState::Critical => proto::DiskState::Critical,
        DiskState::Unresponsive => proto::DiskState::Unresponsive,
    }
}

fn thresholds_to_proto(t: &Thresholds) -> proto::DiskThresholds {
    proto::DiskThresholds {
        warning_free_bytes: t.warning_free_bytes,
        critical_free_bytes: t.critical_free_bytes,
        warning_free_inodes_percent: t.warning_free_inodes_percent,
        critical_free_inodes_percent: t.critical_free_inodes_percent,
        clear_margin_bytes: t.clear_margin_bytes,
        transition_seconds: u32::try_from(t.transition.as_secs()).unwrap_or(u32::MAX),
        clear_margin_inodes_percent: t.clear_margin_inodes_percent,
    }
}

fn usage_to_proto(u: &FilesystemUsage) -> proto::FilesystemUsage {
    let stats = u.stats.unwrap_or_default();
    proto::FilesystemUsage {
        mount_point: u.mount.mount_point.display().to_string(),
        device: u.mount.device.clone(),
        fs_type: u.mount.fs_type.clone(),
        watched_paths: u
            .paths
            .iter()
            .map(|p| p.path.display().to_string())
            .collect(),
        total_bytes: stats.total_bytes,
        free_bytes: stats.free_bytes,
        total_inodes: stats.total_inodes,
        free_inodes: stats.free_inodes,
        state: state_to_proto(u.state) as i32,
        thresholds: Some(thresholds_to_proto(&u.thresholds)),
        sampled_at: u.sampled_at.map(timestamp),
        error: u.error.clone().unwrap_or_default(),
        alerts: u.alerts,
        guards_admission: u.guards_admission,
        paths: u
            .paths
            .iter()
            .map(|p| proto::WatchedPath {
                path: p.path.display().to_string(),
                reasons: p.reasons.clone(),
            })
            .collect(),
    }
}

fn skipped_to_proto(s: &SkippedPath) -> proto::SkippedPath {
    proto::SkippedPath {
        path: s.path.display().to_string(),
        reasons: s.reasons.clone(),
        problem: s.problem.clone(),
    }
}

/// The protobuf alert, for `WatchDiskAlerts` and `WatchEvents`.
pub fn alert_to_proto(a: &DiskAlert) -> proto::DiskAlert {
    let stats = a.usage.stats.unwrap_or_default();
    proto::DiskAlert {
        mount_point: a.usage.mount.mount_point.display().to_string(),
        device: a.usage.mount.device.clone(),
        free_bytes: stats.free_bytes,
        free_inodes: stats.free_inodes,
        threshold_bytes: a.threshold_bytes,
        threshold_inodes_percent: a.threshold_inodes_percent,
        old_state: state_to_proto(a.old_state) as i32,
        new_state: state_to_proto(a.new_state) as i32,
        time: Some(timestamp(a.time)),
        message: a.message.clone(),
        usage: Some(usage_to_proto(&a.usage)),
    }
}

fn reclaim_to_proto(r: ReclaimReport) -> proto::ReclaimSpaceResponse {
    proto::ReclaimSpaceResponse {
        dry_run: r.dry_run,
        total_bytes: r.total_bytes,
        steps: r.steps.iter().map(step_to_proto).collect(),
    }
}

fn step_to_proto(s: &StepReport) -> proto::ReclaimStep {
    proto::ReclaimStep {
        name: s.name.to_owned(),
        bytes: s.freed.bytes,
        items: s.freed.items,
        ran: s.ran,
        error: s.error.clone().unwrap_or_default(),
        skipped_reason: s.skipped.clone().unwrap_or_default(),
    }
}

/// A finished reclaim as `WatchEvents` sends it.
pub fn reclaim_event_to_proto(r: &ReclaimFinished) -> proto::ReclaimEvent {
    let trigger = match r.trigger {
        ReclaimTrigger::Api => proto::ReclaimTrigger::Api,
        ReclaimTrigger::Automatic => proto::ReclaimTrigger::Automatic,
    };
    proto::ReclaimEvent {
        trigger: trigger.into(),
        targets: r.targets.iter().map(|p| p.display().to_string()).collect(),
        steps: r.report.steps.iter().map(step_to_proto).collect(),
        total_bytes: r.report.total_bytes,
    }
}

fn top_result_to_proto(r: TopReport) -> proto::TopDirectoriesUpdate {
    proto::TopDirectoriesUpdate {
        update: Some(proto::top_directories_update::Update::Result(
            proto::TopDirectoriesResult {
                path: r.path.display().to_string(),
                total_bytes: r.total_bytes,
                entries: r.entries,
                unreadable: r.unreadable,
                directories: r
                    .directories
                    .into_iter()
                    .map(|d| proto::DirectorySize {
                        path: d.path.display().to_string(),
                        bytes: d.bytes,
                    })
                    .collect(),
                stopped: r.stopped.unwrap_or_default(),
                elapsed_seconds: r.elapsed.as_secs_f64(),
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_space_is_resource_exhausted_with_a_hint() {
        let error = DiskError::Store(StoreError::NoSpace {
            path: "/var/lib/instance-agent/agent.redb".into(),
            detail: "No space left on device".into(),
        });
        let status = status(error);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("state filesystem is full"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("disk --top"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn top_request_defaults_and_limits() {
        let r = top_request(proto::TopDirectoriesRequest {
            path: "/var".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.limit, 20);
        assert_eq!(r.timeout, Duration::from_secs(30));
        let err = top_request(proto::TopDirectoriesRequest {
            path: "/var".into(),
            limit: 5000,
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
    }
}

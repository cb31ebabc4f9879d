//! `LifecycleService`: converts the activity, the idle shutdown policy and
//! the lifecycle events between proto and [`crate::lifecycle`], passes who
//! asked for a postponement, and maps the domain's errors in one exhaustive
//! match.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::proto::{self, lifecycle_service_server::LifecycleService as LifecycleRpc};
use super::{ReplyStream, timestamp};
use crate::lifecycle::{
    Activity, IdleShutdownPolicy, LastActivity, LifecycleError, LifecycleEvent, LifecycleService,
    Postponement, Reading, SourceKind,
};

/// The lifecycle service.
pub struct LifecycleApi {
    lifecycle: LifecycleService,
    cancel: CancellationToken,
}

impl LifecycleApi {
    /// Serves `lifecycle`; streams end at `cancel`.
    pub fn new(lifecycle: LifecycleService, cancel: CancellationToken) -> Self {
        Self { lifecycle, cancel }
    }
}

#[tonic::async_trait]
impl LifecycleRpc for LifecycleApi {
    async fn get_activity(
        &self,
        _: Request<proto::GetActivityRequest>,
    ) -> Result<Response<proto::Activity>, Status> {
        Ok(Response::new(activity_to_proto(&self.lifecycle.activity())))
    }

    type WatchActivityStream = ReplyStream<proto::Activity>;

    async fn watch_activity(
        &self,
        _: Request<proto::WatchActivityRequest>,
    ) -> Result<Response<Self::WatchActivityStream>, Status> {
        let cancel = self.cancel.clone();
        let mut changes = self.lifecycle.watch();
        let stream = async_stream::stream! {
            loop {
                let activity = activity_to_proto(&changes.borrow_and_update());
                yield Ok(activity);
                tokio::select! {
                    () = cancel.cancelled() => break,
                    changed = changes.changed() => if changed.is_err() { break },
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn set_idle_shutdown(
        &self,
        request: Request<proto::SetIdleShutdownRequest>,
    ) -> Result<Response<proto::Activity>, Status> {
        let policy = policy_from_proto(request.into_inner().policy.unwrap_or_default());
        let activity = self
            .lifecycle
            .set_policy(policy)
            .await
            .map_err(error_to_status)?;
        Ok(Response::new(activity_to_proto(&activity)))
    }

    async fn postpone_idle_shutdown(
        &self,
        request: Request<proto::PostponeIdleShutdownRequest>,
    ) -> Result<Response<proto::Activity>, Status> {
        let requested_by = super::peer::caller(&request);
        let request = request.into_inner();
        let activity = self
            .lifecycle
            .postpone(
                Duration::from_secs(request.duration_seconds),
                request.reason,
                requested_by,
            )
            .await
            .map_err(error_to_status)?;
        Ok(Response::new(activity_to_proto(&activity)))
    }
}

fn policy_from_proto(p: proto::IdleShutdownPolicy) -> IdleShutdownPolicy {
    IdleShutdownPolicy {
        enabled: p.enabled,
        idle_timeout_seconds: p.idle_timeout_seconds,
        warn_before_seconds: p.warn_before_seconds,
    }
}

fn policy_to_proto(p: &IdleShutdownPolicy) -> proto::IdleShutdownPolicy {
    proto::IdleShutdownPolicy {
        enabled: p.enabled,
        idle_timeout_seconds: p.idle_timeout_seconds,
        warn_before_seconds: p.warn_before_seconds,
    }
}

fn last_to_proto(kind: SourceKind, last: &LastActivity) -> proto::LastActivity {
    proto::LastActivity {
        source: kind.name().to_owned(),
        time: Some(timestamp(last.at)),
        detail: last.detail.clone(),
    }
}

fn postponement_to_proto(p: &Postponement) -> proto::IdleShutdownPostponement {
    proto::IdleShutdownPostponement {
        until: Some(timestamp(p.until)),
        reason: p.reason.clone(),
        requested_by: p.requested_by.clone(),
    }
}

/// The activity on the wire.
pub fn activity_to_proto(a: &Activity) -> proto::Activity {
    proto::Activity {
        idle: a.idle,
        idle_since: a.idle_since.map(timestamp),
        last_activity_time: a
            .last_activity_source
            .as_ref()
            .map(|(_, l)| timestamp(l.at)),
        last_activity_source: a
            .last_activity_source
            .as_ref()
            .map(|(k, l)| last_to_proto(*k, l)),
        sources: a
            .sources
            .iter()
            .map(|s| {
                let (state, count, detail) = match &s.reading {
                    Reading::Active { count, detail } => {
                        (proto::ReadingState::Active, *count, detail.clone())
                    }
                    Reading::Quiet => (proto::ReadingState::Quiet, 0, String::new()),
                    Reading::Unreadable { reason } => {
                        (proto::ReadingState::Unreadable, 0, reason.clone())
                    }
                };
                proto::ActivitySource {
                    name: s.kind.name().to_owned(),
                    state: state as i32,
                    count,
                    detail,
                    last_activity: s.last_activity.as_ref().map(|l| last_to_proto(s.kind, l)),
                }
            })
            .collect(),
        idle_shutdown_at: a.idle_shutdown_at.map(timestamp),
        postponed_until: a.postponement.as_ref().map(|p| timestamp(p.until)),
        postponement: a.postponement.as_ref().map(postponement_to_proto),
        policy: Some(policy_to_proto(&a.policy)),
    }
}

/// A lifecycle event on the wire (for `WatchEvents`).
pub fn event_to_proto(event: &LifecycleEvent) -> proto::LifecycleEvent {
    use proto::lifecycle_event::Kind;
    let kind = match event {
        LifecycleEvent::IdleChanged {
            idle,
            idle_since,
            last_activity,
        } => Kind::IdleChanged(proto::IdleChanged {
            idle: *idle,
            idle_since: idle_since.map(timestamp),
            last_activity: last_activity.as_ref().map(|(k, l)| last_to_proto(*k, l)),
        }),
        LifecycleEvent::IdleShutdownPending {
            deadline,
            idle_since,
        } => Kind::IdleShutdownPending(proto::IdleShutdownPending {
            deadline: Some(timestamp(*deadline)),
            idle_since: Some(timestamp(*idle_since)),
        }),
        LifecycleEvent::IdleShutdownRequested { idle_since } => {
            Kind::IdleShutdownRequested(proto::IdleShutdownRequested {
                idle_since: Some(timestamp(*idle_since)),
            })
        }
        LifecycleEvent::IdleShutdownPostponed(p) => {
            Kind::IdleShutdownPostponed(postponement_to_proto(p))
        }
    };
    proto::LifecycleEvent { kind: Some(kind) }
}

fn error_to_status(error: LifecycleError) -> Status {
    let message = error.to_string();
    match error {
        LifecycleError::Invalid(_) => Status::invalid_argument(message),
        LifecycleError::Store(source) => match source {
            crate::store::StoreError::NoSpace { .. } => Status::resource_exhausted(message),
            crate::store::StoreError::Storage { .. } => Status::internal(message),
        },
    }
}

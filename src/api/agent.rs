//! `AgentService`: `GetStatus` and `WatchEvents`.

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::proto::{self, agent_service_server::AgentService};
use super::{ReplyStream, timestamp};
use crate::events::{Delivery, Event, EventBus, EventPayload};
use crate::health::{ConditionState, Subsystem};
use crate::status::{StatusProvider, StatusReport};

/// The agent service.
pub struct AgentApi {
    status: StatusProvider,
    events: EventBus,
    shutdown: CancellationToken,
    setup: Option<crate::setup::SetupScripts>,
    images: Option<crate::images::ImageService>,
}

impl AgentApi {
    /// Streams end when `shutdown` fires, so that a stop is never held up by
    /// a watching client.
    pub fn new(status: StatusProvider, events: EventBus, shutdown: CancellationToken) -> Self {
        Self {
            status,
            events,
            shutdown,
            setup: None,
            images: None,
        }
    }

    /// Reports the image pulls in progress in `GetStatus`.
    pub fn with_images(mut self, images: crate::images::ImageService) -> Self {
        self.images = Some(images);
        self
    }

    /// Reports the latest creation script run in `GetStatus`.
    pub fn with_setup(mut self, setup: crate::setup::SetupScripts) -> Self {
        self.setup = Some(setup);
        self
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn get_status(
        &self,
        _: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::GetStatusResponse>, Status> {
        let mut status = status_to_proto(self.status.report());
        status.creation_run = self
            .setup
            .as_ref()
            .and_then(|setup| setup.latest_creation())
            .map(|run| super::setup::run_to_proto(&run));
        if let Some(images) = &self.images {
            status.pulls = images
                .pulls()
                .iter()
                .map(super::images::progress_to_proto)
                .collect();
        }
        Ok(Response::new(status))
    }

    type WatchEventsStream = ReplyStream<proto::Event>;

    async fn watch_events(
        &self,
        request: Request<proto::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let sees_env = super::jobs::sees_env_values(&request);
        let since = request.into_inner().since;
        let mut subscription = self.events.subscribe(since);
        let shutdown = self.shutdown.clone();
        let run_id = self.events.run_id().to_owned();
        let stream = async_stream::stream! {
            loop {
                let delivery = tokio::select! {
                    _ = shutdown.cancelled() => {
                        // Deliver what was published up to the stop (such as
                        // the "stopping" event), then end the stream.
                        while let Some(delivery) = subscription.try_next() {
                            yield Ok(for_caller(delivery_to_proto(delivery, &run_id), sees_env));
                        }
                        break;
                    }
                    delivery = subscription.next() => delivery,
                };
                let Some(delivery) = delivery else { break };
                yield Ok(for_caller(delivery_to_proto(delivery, &run_id), sees_env));
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

fn status_to_proto(report: StatusReport) -> proto::GetStatusResponse {
    let host = report.host;
    proto::GetStatusResponse {
        version: report.version.to_owned(),
        uptime_seconds: report.uptime_seconds,
        started_at: Some(timestamp(report.started_at)),
        instance_id: report.instance_id,
        host: Some(proto::HostInfo {
            hostname: host.hostname,
            usable_cores: host.usable_cores,
            host_cpus: host.host_cpus,
            memory_total_bytes: host.memory_total_bytes,
            memory_available_bytes: report.memory_available_bytes,
            gpus: host
                .gpus
                .into_iter()
                .map(|g| proto::Gpu {
                    index: g.index,
                    name: g.name,
                    uuid: g.uuid,
                    memory_bytes: g.memory_bytes,
                })
                .collect(),
            kernel: host.kernel,
            supervision: host.supervision,
        }),
        conditions: report
            .conditions
            .into_iter()
            .map(|(subsystem, c)| proto::Condition {
                r#type: subsystem_name(subsystem).to_owned(),
                state: condition_state(c.state) as i32,
                message: c.message,
                since: Some(timestamp(c.since)),
            })
            .collect(),
        slots: Some(proto::SlotUsage {
            capacity: report.slots.capacity,
            in_use: report.slots.in_use,
            queued: report.slots.queued,
            running: report.slots.running,
            held_reason: report.slots.held_reason,
        }),
        summary: report.summary,
        last_event_sequence: report.last_event_sequence,
        creation_run: None,
        pulls: Vec::new(),
        unknown_containers: report
            .unknown_containers
            .into_iter()
            .map(|c| proto::UnknownContainer {
                container_id: c.container_id,
                job_id: c.job_id.unwrap_or_default(),
                state: c.state,
            })
            .collect(),
    }
}

fn subsystem_name(subsystem: Subsystem) -> &'static str {
    subsystem.name()
}

fn condition_state(state: ConditionState) -> proto::ConditionState {
    match state {
        ConditionState::Unknown => proto::ConditionState::Unknown,
        ConditionState::Ok => proto::ConditionState::Ok,
        ConditionState::Degraded => proto::ConditionState::Degraded,
        ConditionState::Failed => proto::ConditionState::Failed,
        ConditionState::Disabled => proto::ConditionState::Disabled,
    }
}

fn delivery_to_proto(delivery: Delivery, run_id: &str) -> proto::Event {
    match delivery {
        Delivery::Event(event) => event_to_proto(&event, run_id),
        Delivery::Truncated {
            requested_since,
            oldest_available,
        } => proto::Event {
            sequence: 0,
            time: Some(timestamp(std::time::SystemTime::now())),
            kind: Some(proto::event::Kind::BacklogTruncated(
                proto::BacklogTruncated {
                    oldest_available,
                    requested_since,
                },
            )),
            agent_run_id: run_id.to_owned(),
        },
    }
}

/// A job or app event's env values redacted for a caller that may not read them
/// (see [`super::jobs::sees_env_values`]).
fn for_caller(mut event: proto::Event, sees_env_values: bool) -> proto::Event {
    if let Some(proto::event::Kind::Job(job_event)) = event.kind.as_mut() {
        job_event.job = job_event
            .job
            .take()
            .map(|job| super::jobs::job_for_caller(job, sees_env_values));
    }
    if let Some(proto::event::Kind::App(app_event)) = event.kind.as_mut() {
        app_event.app = app_event
            .app
            .take()
            .map(|app| super::apps::app_for_caller(app, sees_env_values));
    }
    event
}

fn event_to_proto(event: &Event, run_id: &str) -> proto::Event {
    let kind = match &event.payload {
        EventPayload::Agent { phase } => proto::event::Kind::Agent(proto::AgentLifecycleEvent {
            phase: (*phase).to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }),
        EventPayload::Job(record) => proto::event::Kind::Job(proto::JobEvent {
            job: Some(super::jobs::job_to_proto(&crate::jobs::JobView {
                record: (**record).clone(),
                queue_position: None,
                pull: None,
            })),
        }),
        EventPayload::Mount(status) => proto::event::Kind::Mount(proto::MountEvent {
            mount: Some(super::mounts::info_to_proto(status)),
        }),
        EventPayload::Setup(run) => proto::event::Kind::Setup(proto::SetupEvent {
            run: Some(super::setup::run_to_proto(run)),
        }),
        EventPayload::DiskAlert(alert) => {
            proto::event::Kind::DiskAlert(super::disk::alert_to_proto(alert))
        }
        EventPayload::Reclaim(finished) => {
            proto::event::Kind::Reclaim(super::disk::reclaim_event_to_proto(finished))
        }
        EventPayload::App(record) => proto::event::Kind::App(proto::AppEvent {
            app: Some(super::apps::app_to_proto(record)),
        }),
        EventPayload::Lifecycle(event) => {
            proto::event::Kind::Lifecycle(super::lifecycle::event_to_proto(event))
        }
    };
    proto::Event {
        sequence: event.sequence,
        time: Some(timestamp(event.time)),
        kind: Some(kind),
        agent_run_id: run_id.to_owned(),
    }
}

//! `WatchEvents` as a test reads it: opened from a known sequence, so that
//! nothing published after that point can be missed; every event is checked
//! to follow the one before by exactly one and is kept, so that a test can
//! show that something did not happen by the order of what did (no job
//! started before the event that let it) instead of sleeping and looking.

use std::time::{Duration, Instant, SystemTime};

use instance_agent::api::proto::{self, agent_service_client::AgentServiceClient};
use tokio_stream::StreamExt;

use super::Agent;

/// The events of one agent run after a given sequence, in order.
pub struct EventLog {
    stream: tonic::Streaming<proto::Event>,
    seen: Vec<proto::Event>,
    last: u64,
}

impl EventLog {
    /// Every event after `since` (0: everything since the agent started,
    /// while the backlog still holds it).
    pub async fn since(agent: &Agent, since: u64) -> Self {
        let stream = AgentServiceClient::new(agent.channel().await)
            .watch_events(proto::WatchEventsRequest { since: Some(since) })
            .await
            .expect("WatchEvents")
            .into_inner();
        Self {
            stream,
            seen: Vec::new(),
            last: since,
        }
    }

    /// Every event after the latest one `GetStatus` reports now: nothing
    /// that a later call causes is missed.
    pub async fn from_now(agent: &Agent) -> Self {
        let latest = AgentServiceClient::new(agent.channel().await)
            .get_status(proto::GetStatusRequest {})
            .await
            .expect("GetStatus")
            .into_inner()
            .last_event_sequence;
        Self::since(agent, latest).await
    }

    /// Reads until an event satisfies `wanted` and returns it; panics after
    /// `within`, on a gap in the sequence and on a truncated backlog.
    pub async fn until(
        &mut self,
        what: &str,
        within: Duration,
        wanted: impl Fn(&proto::Event) -> bool,
    ) -> proto::Event {
        let read = self.seen.len();
        self.until_seen(what, within, |seen| {
            seen.len() > read && seen.last().is_some_and(&wanted)
        })
        .await;
        self.seen.last().cloned().expect("a matching event")
    }

    /// Reads until `done` holds for everything read so far (checked after
    /// each event, and at once); panics as [`Self::until`] does.
    pub async fn until_seen(
        &mut self,
        what: &str,
        within: Duration,
        done: impl Fn(&[proto::Event]) -> bool,
    ) {
        let deadline = Instant::now() + within;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match tokio::time::timeout(left, self.stream.next()).await {
                Ok(Some(Ok(event))) => event,
                Ok(Some(Err(status))) => panic!("WatchEvents failed waiting for {what}: {status}"),
                Ok(None) => panic!("WatchEvents ended before {what}; seen:\n{}", self.summary()),
                Err(_) => panic!("no {what} within {within:?}; seen:\n{}", self.summary()),
            };
            assert_eq!(
                event.sequence,
                self.last + 1,
                "events follow each other by one (0 is a truncated backlog): {event:?}"
            );
            self.last = event.sequence;
            self.seen.push(event);
        }
    }

    /// Every event read so far, in order.
    pub fn seen(&self) -> &[proto::Event] {
        &self.seen
    }

    /// The states, in order, that the events read so far gave the jobs
    /// whose id `which` accepts.
    pub fn job_states(&self, which: impl Fn(&str) -> bool) -> Vec<(String, proto::JobState)> {
        self.seen
            .iter()
            .filter_map(job)
            .filter(|j| which(&j.id))
            .map(|j| (j.id.clone(), j.state()))
            .collect()
    }

    /// One line per event read so far, for failure messages.
    pub fn summary(&self) -> String {
        self.seen
            .iter()
            .map(|e| format!("  {} {}", e.sequence, describe(e)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The job of a job event.
pub fn job(event: &proto::Event) -> Option<&proto::Job> {
    match &event.kind {
        Some(proto::event::Kind::Job(j)) => j.job.as_ref(),
        _ => None,
    }
}

/// The job `id` in `state`, when `event` says so.
pub fn job_in(event: &proto::Event, id: &str, state: proto::JobState) -> bool {
    job(event).is_some_and(|j| j.id == id && j.state() == state)
}

/// The run of a setup event.
pub fn setup_run(event: &proto::Event) -> Option<&proto::SetupRun> {
    match &event.kind {
        Some(proto::event::Kind::Setup(s)) => s.run.as_ref(),
        _ => None,
    }
}

/// A run of `kind` in `state`, when `event` says so.
pub fn setup_run_in(
    event: &proto::Event,
    kind: proto::SetupKind,
    state: proto::SetupRunState,
) -> bool {
    setup_run(event).is_some_and(|r| r.kind() == kind && r.state() == state)
}

/// The alert of a disk alert event.
pub fn disk_alert(event: &proto::Event) -> Option<&proto::DiskAlert> {
    match &event.kind {
        Some(proto::event::Kind::DiskAlert(a)) => Some(a),
        _ => None,
    }
}

/// The mount of a mount event.
pub fn mount(event: &proto::Event) -> Option<&proto::MountInfo> {
    match &event.kind {
        Some(proto::event::Kind::Mount(m)) => m.mount.as_ref(),
        _ => None,
    }
}

/// A protobuf timestamp as a `SystemTime` (the epoch when unset).
pub fn time_of(timestamp: Option<&pbjson_types::Timestamp>) -> SystemTime {
    timestamp.map_or(SystemTime::UNIX_EPOCH, |t| {
        SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(t.seconds).unwrap_or(0))
            + Duration::from_nanos(u64::try_from(t.nanos).unwrap_or(0))
    })
}

fn describe(event: &proto::Event) -> String {
    if let Some(j) = job(event) {
        format!("job {} {:?} ({})", j.id, j.state(), j.reason)
    } else if let Some(r) = setup_run(event) {
        format!("setup run {} {:?} {:?}", r.id, r.kind(), r.state())
    } else if let Some(a) = disk_alert(event) {
        format!(
            "disk {} {:?} -> {:?}",
            a.mount_point,
            a.old_state(),
            a.new_state()
        )
    } else if let Some(m) = mount(event) {
        format!("mount {} {:?} ({})", m.name, m.state(), m.message)
    } else {
        format!("{:?}", event.kind)
    }
}

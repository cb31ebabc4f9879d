//! The instance-wide event log behind `WatchEvents`.
//!
//! Owns sequence numbering (one more per event, from 1 at each start) and a
//! bounded backlog that lets a reconnecting client catch up from `since`.
//! Subscribers read the backlog themselves and wait on a watch channel for new
//! sequence numbers, so a slow subscriber never blocks a publisher and never
//! silently misses an event: when it falls behind the backlog it is told.
//! Its config section, `[events]`, is the backlog's size ([`EventsConfig`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::validate::{FieldError, check_ranges};

/// `[events]`: the `WatchEvents` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Events kept for clients that reconnect with `since`.
    pub backlog: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self { backlog: 4096 }
    }
}

impl EventsConfig {
    /// Checks the section; keys are relative to `[events]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_ranges(&[("backlog", self.backlog.into(), 16, 1_000_000)])
    }
}

/// What happened: the agent itself, or one of its domains (jobs, mounts, setup, disk).
#[derive(Debug, Clone, PartialEq)]
pub enum EventPayload {
    /// The agent started or is stopping.
    Agent {
        /// "started" or "stopping".
        phase: &'static str,
    },
    /// A job changed state (the record after the change).
    Job(Box<crate::jobs::JobRecord>),
    /// A mount's state or message changed (never carries a secret).
    Mount(crate::mounts::MountStatus),
    /// A setup run changed state.
    Setup(Box<crate::setup::SetupRun>),
    /// A watched filesystem changed state.
    DiskAlert(Box<crate::disk::DiskAlert>),
    /// A reclaim that was not a dry run finished (requested or automatic).
    Reclaim(Box<crate::disk::reclaim::ReclaimFinished>),
    /// An app changed state (the record after the change).
    App(Box<crate::apps::AppRecord>),
    /// Idle transitions, idle stop warnings and requests, postponements.
    Lifecycle(Box<crate::lifecycle::LifecycleEvent>),
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Increases by one per event.
    pub sequence: u64,
    /// When it was published.
    pub time: SystemTime,
    /// What happened.
    pub payload: EventPayload,
}

/// What a subscriber receives next.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// An event, in order.
    Event(Arc<Event>),
    /// Events after `requested_since` up to `oldest_available - 1` were dropped
    /// from the backlog before this subscriber read them.
    Truncated {
        /// The `since` the subscriber was at.
        requested_since: u64,
        /// The oldest sequence still held.
        oldest_available: u64,
    },
}

struct Log {
    backlog: VecDeque<Arc<Event>>,
    capacity: usize,
    next_sequence: u64,
}

/// Publishes events and hands out subscriptions. Cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    log: Arc<Mutex<Log>>,
    latest: watch::Sender<u64>,
    run_id: Arc<str>,
}

impl EventBus {
    /// A bus keeping at most `capacity` events.
    pub fn new(capacity: usize) -> Self {
        let (latest, _) = watch::channel(0);
        Self {
            log: Arc::new(Mutex::new(Log {
                backlog: VecDeque::with_capacity(capacity.min(1024)),
                capacity: capacity.max(1),
                next_sequence: 1,
            })),
            latest,
            run_id: uuid::Uuid::new_v4().to_string().into(),
        }
    }

    /// Identifies this agent run; sequence numbers restart when it changes.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Records an event and wakes subscribers. Returns its sequence number.
    pub fn publish(&self, payload: EventPayload) -> u64 {
        let sequence = {
            let mut log = self.lock();
            let sequence = log.next_sequence;
            log.next_sequence += 1;
            if log.backlog.len() == log.capacity {
                log.backlog.pop_front();
            }
            log.backlog.push_back(Arc::new(Event {
                sequence,
                time: SystemTime::now(),
                payload,
            }));
            sequence
        };
        self.latest.send_replace(sequence);
        sequence
    }

    /// The sequence number of the latest event (0 before the first).
    pub fn last_sequence(&self) -> u64 {
        self.lock().next_sequence - 1
    }

    /// Changes how many events are kept; the oldest go first.
    pub fn set_capacity(&self, capacity: usize) {
        let mut log = self.lock();
        log.capacity = capacity.max(1);
        while log.backlog.len() > log.capacity {
            log.backlog.pop_front();
        }
    }

    /// Subscribes after `since`; `None` means only events from now on.
    pub fn subscribe(&self, since: Option<u64>) -> Subscription {
        let since = since.unwrap_or_else(|| self.last_sequence());
        Subscription {
            log: self.log.clone(),
            latest: self.latest.subscribe(),
            after: since,
            pending: VecDeque::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        lock(&self.log)
    }
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    // A panic while holding this lock leaves the log consistent (every
    // mutation is a single push or pop), so a poisoned lock is still usable.
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One subscriber's position in the log.
pub struct Subscription {
    log: Arc<Mutex<Log>>,
    latest: watch::Receiver<u64>,
    after: u64,
    pending: VecDeque<Delivery>,
}

impl Subscription {
    /// The next delivery, waiting for one if needed. `None` once the bus is gone.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(delivery) = self.pending.pop_front() {
                return Some(delivery);
            }
            self.fill();
            if !self.pending.is_empty() {
                continue;
            }
            self.latest.changed().await.ok()?;
        }
    }

    /// The next delivery if one is already available, without waiting.
    pub fn try_next(&mut self) -> Option<Delivery> {
        if self.pending.is_empty() {
            self.fill();
        }
        self.pending.pop_front()
    }

    /// Moves everything after `self.after` from the backlog into `pending`.
    fn fill(&mut self) {
        let log = lock(&self.log);
        let Some(oldest) = log.backlog.front().map(|e| e.sequence) else {
            return;
        };
        if self.after + 1 < oldest {
            self.pending.push_back(Delivery::Truncated {
                requested_since: self.after,
                oldest_available: oldest,
            });
            self.after = oldest - 1;
        }
        // Sequence numbers in the backlog are contiguous, so the position of
        // `after + 1` is a subtraction, not a search.
        let start = usize::try_from(self.after + 1 - oldest).unwrap_or(usize::MAX);
        for event in log.backlog.iter().skip(start) {
            self.pending.push_back(Delivery::Event(event.clone()));
            self.after = event.sequence;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started() -> EventPayload {
        EventPayload::Agent { phase: "started" }
    }

    fn seq(d: Option<Delivery>) -> u64 {
        match d {
            Some(Delivery::Event(e)) => e.sequence,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn sequence_increases_by_one() {
        let bus = EventBus::new(8);
        let mut sub = bus.subscribe(None);
        for _ in 0..3 {
            bus.publish(started());
        }
        assert_eq!(seq(sub.next().await), 1);
        assert_eq!(seq(sub.next().await), 2);
        assert_eq!(seq(sub.next().await), 3);
    }

    #[tokio::test]
    async fn reconnect_with_since_gets_what_was_missed() {
        let bus = EventBus::new(8);
        for _ in 0..5 {
            bus.publish(started());
        }
        let mut sub = bus.subscribe(Some(3));
        assert_eq!(seq(sub.next().await), 4);
        assert_eq!(seq(sub.next().await), 5);
    }

    #[tokio::test]
    async fn truncated_backlog_is_announced() {
        let bus = EventBus::new(4);
        for _ in 0..10 {
            bus.publish(started());
        }
        let mut sub = bus.subscribe(Some(2));
        assert_eq!(
            sub.next().await,
            Some(Delivery::Truncated {
                requested_since: 2,
                oldest_available: 7
            })
        );
        assert_eq!(seq(sub.next().await), 7);
    }

    #[tokio::test]
    async fn slow_subscriber_is_told_what_it_lost() {
        let bus = EventBus::new(4);
        let mut sub = bus.subscribe(None);
        bus.publish(started());
        assert_eq!(seq(sub.next().await), 1);
        for _ in 0..10 {
            bus.publish(started());
        }
        assert!(matches!(sub.next().await, Some(Delivery::Truncated { .. })));
        assert_eq!(seq(sub.next().await), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_new_events() {
        let bus = EventBus::new(4);
        let mut sub = bus.subscribe(None);
        let publisher = bus.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            publisher.publish(started());
        });
        assert_eq!(seq(sub.next().await), 1);
    }

    #[test]
    fn the_backlog_size_is_checked() {
        assert_eq!(EventsConfig::default().validate(), Ok(()));
        let error = EventsConfig { backlog: 15 }.validate().unwrap_err();
        assert_eq!(error.key, "backlog");
        assert_eq!(error.problem, "15 is out of range: allowed 16 to 1000000");
    }
}

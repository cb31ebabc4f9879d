//! What follows from a change of state: the alert (built and logged when the
//! transition is decided, with the filesystem as it is then), the disk
//! condition and the admission hold (computed once per batch), and their
//! delivery to subscribers, the event log, health and the job queue's gate.
//!
//! Alerts are recorded under the guard's lock and delivered after it is
//! released ([`Outbox`]), the way the loop defers probes and reclaims: a
//! subscriber that reacts to an alert by calling back into the guard finds
//! the lock free and the state already showing what the alert says. Each
//! alert carries a sequence number, so that a subscription taken between
//! the record and the delivery skips what its current states already show.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;

use super::watchlist::{FsKey, REASON_DOCKER, REASON_STATE, Watchlist};
use crate::admission::AdmissionGate;
use crate::disk::hysteresis::{Cause, Transition};
use crate::disk::{DiskAlert, DiskState, FilesystemUsage};
use crate::events::{EventBus, EventPayload};
use crate::health::{ConditionState, Health, Subsystem};
use crate::units::bytes;

/// Alerts kept for a subscriber that reads slowly; one that falls further
/// behind gets the current state of every filesystem again.
pub(super) const ALERT_BUFFER: usize = 256;

/// An alert and its place in the order of alerts.
#[derive(Debug, Clone)]
pub(super) struct Sequenced {
    pub(super) seq: u64,
    pub(super) alert: DiskAlert,
}

/// An alert recorded under the lock, not delivered yet.
pub(super) struct Recorded {
    /// The filesystem it is about.
    pub(super) key: FsKey,
    seq: u64,
    /// The alert.
    pub(super) alert: DiskAlert,
}

/// The alerts raised so far and those not delivered yet.
#[derive(Default)]
pub(super) struct AlertLog {
    total: u64,
    last_seq: u64,
    unsent: Vec<Recorded>,
}

impl AlertLog {
    /// Alerts raised since the agent started.
    pub(super) fn total(&self) -> u64 {
        self.total
    }

    /// The sequence number of the latest alert recorded.
    pub(super) fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Records one transition of filesystem `key`: counts it, builds its
    /// alert from the filesystem as it is now, and logs it.
    pub(super) fn record(&mut self, watch: &mut Watchlist, key: &FsKey, transition: Transition) {
        let Some(fs) = watch.filesystems.get_mut(key) else {
            return;
        };
        fs.alerts += 1;
        self.total += 1;
        let usage = watch.usage_of(key);
        let message = transition_message(&usage, &transition);
        let (threshold_bytes, threshold_inodes_percent) = match transition.cause {
            Cause::Bytes(bytes) => (bytes, 0.0),
            Cause::Inodes(percent) => (0, percent),
            Cause::Unresponsive => (0, 0.0),
        };
        let alert = DiskAlert {
            old_state: transition.old,
            new_state: transition.new,
            threshold_bytes,
            threshold_inodes_percent,
            time: SystemTime::now(),
            message,
            usage,
        };
        log(&alert);
        self.last_seq += 1;
        self.unsent.push(Recorded {
            key: key.clone(),
            seq: self.last_seq,
            alert,
        });
    }

    /// Drops the filesystems no watched path lives on any more, each with
    /// its alert (to [`DiskState::Unknown`]).
    pub(super) fn drop_unwatched(&mut self, watch: &mut Watchlist) {
        for key in watch.unwatched() {
            let old = watch
                .filesystems
                .get(&key)
                .map_or(DiskState::Unknown, |fs| fs.machine.state());
            self.record(
                watch,
                &key,
                Transition {
                    old,
                    new: DiskState::Unknown,
                    cause: Cause::Unresponsive,
                },
            );
            watch.filesystems.remove(&key);
        }
    }

    /// The alerts recorded since the last call, in order.
    pub(super) fn take(&mut self) -> Vec<Recorded> {
        std::mem::take(&mut self.unsent)
    }
}

fn log(alert: &DiskAlert) {
    let mount_point = alert.usage.mount.mount_point.display().to_string();
    let (old, new) = (alert.old_state.name(), alert.new_state.name());
    match alert.new_state {
        DiskState::Critical | DiskState::Unresponsive | DiskState::Warning => {
            tracing::warn!(mount_point, old, new, "disk alert: {}", alert.message)
        }
        DiskState::Ok | DiskState::Unknown => {
            tracing::info!(mount_point, old, new, "disk alert: {}", alert.message)
        }
    }
}

/// What one turn of the loop has to tell the world, collected under the lock.
pub(super) struct Outbox {
    /// The disk condition, once for the whole batch.
    pub(super) condition: (ConditionState, String),
    /// Why the job queue is held; `None` releases the hold.
    pub(super) hold: Option<String>,
    /// The alerts, in order.
    pub(super) alerts: Vec<Recorded>,
}

impl Outbox {
    /// The condition, the hold and `alerts` as `watch` stands now.
    pub(super) fn new(watch: &Watchlist, alerts: Vec<Recorded>) -> Self {
        Self {
            condition: condition(watch),
            hold: admission_hold(watch),
            alerts,
        }
    }
}

/// Where alerts and their consequences go.
pub(super) struct Outlets {
    subscribers: broadcast::Sender<Sequenced>,
    health: Health,
    admission: AdmissionGate,
    events: EventBus,
}

impl Outlets {
    /// Health, the gate and the event log, and a channel for subscribers.
    pub(super) fn new(health: Health, admission: AdmissionGate, events: EventBus) -> Self {
        Self {
            subscribers: broadcast::channel(ALERT_BUFFER).0,
            health,
            admission,
            events,
        }
    }

    /// A receiver of every alert delivered from now on.
    pub(super) fn receiver(&self) -> broadcast::Receiver<Sequenced> {
        self.subscribers.subscribe()
    }

    /// Delivers what a turn of the loop collected; never under the guard's
    /// lock. The condition and the hold first, so that a client reacting to
    /// an alert sees them in `GetStatus` and on the queue too.
    pub(super) fn deliver(&self, outbox: Outbox) {
        let (condition, message) = outbox.condition;
        self.health.set(Subsystem::Disk, condition, message);
        match outbox.hold {
            None => self.admission.release("disk"),
            Some(reason) => self.admission.hold("disk", reason),
        }
        for Recorded { seq, alert, .. } in outbox.alerts {
            // The event log carries news: a filesystem that starts or stops
            // being watched while ok is not (GetDiskUsage and
            // WatchDiskAlerts show it).
            let routine = matches!(
                (alert.old_state, alert.new_state),
                (DiskState::Unknown, DiskState::Ok) | (DiskState::Ok, DiskState::Unknown)
            );
            let event = (!routine).then(|| alert.clone());
            let _ = self.subscribers.send(Sequenced { seq, alert });
            if let Some(alert) = event {
                self.events
                    .publish(EventPayload::DiskAlert(Box::new(alert)));
            }
        }
    }
}

/// The disk condition: failed while any filesystem is critical, degraded
/// while any is in warning or unresponsive.
pub(super) fn condition(watch: &Watchlist) -> (ConditionState, String) {
    if watch.filesystems.is_empty() {
        return (ConditionState::Unknown, "no filesystem sampled yet".into());
    }
    let usages = watch.usage();
    let mut worst = ConditionState::Ok;
    let mut problems = Vec::new();
    for usage in &usages {
        let condition = match usage.state {
            DiskState::Critical => ConditionState::Failed,
            DiskState::Warning | DiskState::Unresponsive => ConditionState::Degraded,
            DiskState::Ok | DiskState::Unknown => continue,
        };
        worst = worst.max(condition);
        let mut line = current_message(usage);
        if usage.state == DiskState::Critical && usage.guards_admission {
            line.push_str("; jobs held");
        }
        problems.push((condition, line));
    }
    if problems.is_empty() {
        let least = usages
            .into_iter()
            .filter_map(|u| u.stats.map(|s| (s.free_bytes, u.mount.mount_point)))
            .min();
        let count = watch.filesystems.len();
        let message = match least {
            Some((free, mount_point)) => format!(
                "{count} filesystem(s) ok; least free: {} ({})",
                mount_point.display(),
                bytes(free)
            ),
            None => format!("{count} filesystem(s) ok"),
        };
        return (ConditionState::Ok, message);
    }
    problems.sort_by_key(|p| std::cmp::Reverse(p.0));
    (
        worst,
        problems
            .into_iter()
            .map(|(_, line)| line)
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// Why the job queue is held: each critical filesystem that holds the state
/// dir or the Docker data root. `None` when there is none.
fn admission_hold(watch: &Watchlist) -> Option<String> {
    let holding: Vec<String> = watch
        .filesystems
        .iter()
        .filter(|(key, fs)| {
            fs.machine.state() == DiskState::Critical && watch.guards_admission(key)
        })
        .map(|(key, _)| {
            let usage = watch.usage_of(key);
            format!(
                "{} ({}) has {} free, below the {} floor",
                usage.mount.mount_point.display(),
                usage
                    .paths
                    .iter()
                    .flat_map(|p| p.reasons.iter().cloned())
                    .filter(|r| r == REASON_STATE || r == REASON_DOCKER)
                    .collect::<Vec<_>>()
                    .join(", "),
                bytes(usage.stats.map_or(0, |s| s.free_bytes)),
                bytes(usage.thresholds.critical_free_bytes)
            )
        })
        .collect();
    (!holding.is_empty()).then(|| holding.join("; "))
}

/// The current state of every filesystem, as alerts with
/// `old_state == new_state`.
pub(super) fn current(watch: &Watchlist) -> Vec<DiskAlert> {
    let now = SystemTime::now();
    watch
        .filesystems
        .iter()
        .map(|(key, fs)| {
            let usage = watch.usage_of(key);
            let s = fs.machine.state();
            let t = &fs.thresholds;
            let (threshold_bytes, threshold_inodes_percent) = match s {
                DiskState::Critical => (t.critical_free_bytes, t.critical_free_inodes_percent),
                DiskState::Warning | DiskState::Ok => {
                    (t.warning_free_bytes, t.warning_free_inodes_percent)
                }
                DiskState::Unresponsive | DiskState::Unknown => (0, 0.0),
            };
            DiskAlert {
                old_state: s,
                new_state: s,
                threshold_bytes,
                threshold_inodes_percent,
                time: now,
                message: current_message(&usage),
                usage,
            }
        })
        .collect()
}

/// Where a subscription starts: the current states, the sequence number they
/// include, and a receiver for what comes after, taken together under the
/// guard's lock.
pub(super) struct AlertSnapshot {
    pub(super) current: Vec<DiskAlert>,
    pub(super) seq: u64,
    pub(super) receiver: broadcast::Receiver<Sequenced>,
}

/// What a subscription asks for again when it falls behind.
pub(super) trait AlertSource: Send + Sync + 'static {
    /// The current states and a new receiver.
    fn snapshot(&self) -> AlertSnapshot;
}

/// A subscription to alerts: the current state of every watched filesystem
/// (as alerts with `old_state == new_state`), then every transition.
pub struct AlertSubscription {
    pub(super) pending: VecDeque<DiskAlert>,
    /// Alerts up to this one are in the current states already.
    seen: u64,
    receiver: broadcast::Receiver<Sequenced>,
    source: Arc<dyn AlertSource>,
}

impl AlertSubscription {
    /// A subscription to `source`'s alerts.
    pub(super) fn new(source: Arc<dyn AlertSource>) -> Self {
        let AlertSnapshot {
            current,
            seq,
            receiver,
        } = source.snapshot();
        Self {
            pending: current.into(),
            seen: seq,
            receiver,
            source,
        }
    }

    /// The next alert; `None` once the guard has stopped.
    pub async fn next(&mut self) -> Option<DiskAlert> {
        loop {
            if let Some(alert) = self.pending.pop_front() {
                return Some(alert);
            }
            match self.receiver.recv().await {
                Ok(Sequenced { seq, .. }) if seq <= self.seen => {}
                Ok(Sequenced { alert, .. }) => return Some(alert),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // Too slow to follow every transition: catch up on the
                    // present instead of replaying the past.
                    tracing::debug!(
                        missed,
                        "disk alert subscriber lagged; resending current states"
                    );
                    let AlertSnapshot {
                        current,
                        seq,
                        receiver,
                    } = self.source.snapshot();
                    self.pending = current.into();
                    self.seen = seq;
                    self.receiver = receiver;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// One line for a filesystem's current state.
fn current_message(usage: &FilesystemUsage) -> String {
    let mount_point = usage.mount.mount_point.display();
    let t = &usage.thresholds;
    let free = usage.stats.map_or(0, |s| s.free_bytes);
    match usage.state {
        DiskState::Unresponsive => format!(
            "{mount_point} does not answer: {}",
            usage.error.as_deref().unwrap_or("sample timed out")
        ),
        DiskState::Unknown => format!("{mount_point} is not watched"),
        state => {
            let (level_bytes, level_inodes, name) = match state {
                DiskState::Critical => (
                    t.critical_free_bytes,
                    t.critical_free_inodes_percent,
                    "floor",
                ),
                _ => (
                    t.warning_free_bytes,
                    t.warning_free_inodes_percent,
                    "warning level",
                ),
            };
            let inodes = usage.stats.and_then(|s| s.free_inodes_percent());
            let mut line = format!("{mount_point} has {} free", bytes(free));
            if state == DiskState::Ok {
                return line;
            }
            let mut below = Vec::new();
            if free < level_bytes {
                below.push(format!("below the {} {name}", bytes(level_bytes)));
            }
            if let Some(percent) = inodes.filter(|p| *p < level_inodes) {
                below.push(format!(
                    "{percent:.1}% inodes free, below the {level_inodes}% {name}"
                ));
            }
            if below.is_empty() {
                // Back above the level, inside the margin or the hold.
                line.push_str(&format!(
                    "; {} until it holds {} above the {} {name} for {}s",
                    state.name(),
                    bytes(t.clear_margin_bytes),
                    bytes(level_bytes),
                    t.transition.as_secs()
                ));
            } else {
                line.push_str(", ");
                line.push_str(&below.join("; "));
            }
            line
        }
    }
}

/// One line for a transition.
fn transition_message(usage: &FilesystemUsage, transition: &Transition) -> String {
    let mount_point = usage.mount.mount_point.display();
    let t = &usage.thresholds;
    let free = bytes(usage.stats.map_or(0, |s| s.free_bytes));
    let inodes = usage
        .stats
        .and_then(|s| s.free_inodes_percent())
        .unwrap_or(100.0);
    let worse = transition.new > transition.old;
    match (transition.old, transition.new, transition.cause) {
        (_, DiskState::Unknown, _) => format!("{mount_point} is no longer watched"),
        (_, DiskState::Unresponsive, _) => format!(
            "{mount_point} does not answer: {}",
            usage.error.as_deref().unwrap_or("sample timed out")
        ),
        (DiskState::Unknown, _, _) => format!("now watching {}", current_message(usage)),
        (DiskState::Unresponsive, _, _) => {
            format!("{mount_point} answers again: {}", current_message(usage))
        }
        (_, DiskState::Critical, Cause::Inodes(level)) if worse => {
            format!("{mount_point} has {inodes:.1}% inodes free, below the {level}% floor")
        }
        (_, DiskState::Warning, Cause::Inodes(level)) if worse => {
            format!("{mount_point} has {inodes:.1}% inodes free, below the {level}% warning level")
        }
        (_, DiskState::Critical, _) => format!(
            "{mount_point} has {free} free, below the {} floor",
            bytes(t.critical_free_bytes)
        ),
        (_, DiskState::Warning, _) if worse => format!(
            "{mount_point} has {free} free, below the {} warning level",
            bytes(t.warning_free_bytes)
        ),
        (_, DiskState::Warning, _) => format!(
            "{mount_point} is back above the {} floor with {free} free; still below the {} warning level",
            bytes(t.critical_free_bytes),
            bytes(t.warning_free_bytes)
        ),
        (_, DiskState::Ok, _) => format!(
            "{mount_point} is back above the {} warning level with {free} free",
            bytes(t.warning_free_bytes)
        ),
    }
}

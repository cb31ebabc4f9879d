//! The sampling service: reads every enabled source on a `tokio::time`
//! interval, keeps each source's last activity and the idle timer
//! ([`IdleClock`]), publishes idle transitions, warnings and the one stop
//! request, carries out the stop through [`StopAction`], and keeps what must
//! survive an agent restart in the store (the API's policy, the start of the
//! idle stretch and whether its stop was requested, the postponement), so a
//! restart never resets the idle clock.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::activity::millis::{from_ms, to_ms};
use super::activity::{
    Activity, LastActivity, Postponement, Reading, SourceKind, SourceState, fold_readings,
};
use super::config::{IdleShutdownPolicy, LifecycleConfig};
use super::event::LifecycleEvent;
use super::idle::{IdleClock, IdleEvent};
use super::source::ActivitySource;
use super::stop::StopAction;
use crate::events::{EventBus, EventPayload};
use crate::store::{Store, StoreError, Table, Write};
use crate::validate::FieldError;

/// The store table of this domain.
const TABLE: Table = Table("lifecycle");
/// Its one record.
const KEY: &str = "idle";
/// A source that has not answered within this is read as unreadable.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest postponement: a week.
pub const MAX_POSTPONE_SECONDS: u64 = 7 * 86_400;

/// A lifecycle request was refused or could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// A value is out of range; names the field and the limit.
    #[error("{}: {}", .0.key, .0.problem)]
    Invalid(FieldError),
    /// The store could not record the change (it applies until the agent
    /// restarts).
    #[error("cannot record the lifecycle state: {0}")]
    Store(#[source] StoreError),
}

/// What the service needs, built by the daemon.
pub struct LifecycleParts {
    /// The live `[lifecycle]` section.
    pub config: watch::Receiver<LifecycleConfig>,
    /// Every source; the config says which are enabled.
    pub sources: Vec<Arc<dyn ActivitySource>>,
    /// The store (this domain's table).
    pub store: Store,
    /// The event log.
    pub events: EventBus,
    /// What carries out the stop.
    pub stop: Arc<dyn StopAction>,
}

/// What survives a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct Persisted {
    /// The policy set over the API (the config's until one is).
    policy: Option<IdleShutdownPolicy>,
    /// The start of the idle stretch, ms since the epoch.
    idle_since_ms: Option<u64>,
    /// Whether the stop of that stretch was requested.
    requested: bool,
    /// The postponement.
    postponement: Option<Postponement>,
    /// The source that last reset the idle timer: name, ms, detail.
    last_activity: Option<(String, u64, String)>,
}

struct State {
    clock: IdleClock,
    sources: Vec<SourceState>,
    last: Option<(SourceKind, LastActivity)>,
    postponement: Option<Postponement>,
    api_policy: Option<IdleShutdownPolicy>,
    /// Read from the store at start; applied by the first sample.
    restored: Option<Persisted>,
    /// What was last written, to write only changes.
    written: Persisted,
}

struct Inner {
    parts: LifecycleParts,
    state: Mutex<State>,
    activity: watch::Sender<Activity>,
    /// Wakes the loop after a policy change or a postponement.
    changed: Notify,
    /// One store write at a time, each of the state as it is then, so an
    /// older record never overwrites a newer one.
    writing: tokio::sync::Mutex<()>,
    /// The same instant on both clocks, to turn one into the other.
    origin: (Instant, SystemTime),
}

/// The lifecycle service. Cheap to clone.
#[derive(Clone)]
pub struct LifecycleService {
    inner: Arc<Inner>,
}

impl LifecycleService {
    /// The service, its state read back from the store (a record that
    /// cannot be read is logged and the service starts afresh).
    pub fn new(parts: LifecycleParts) -> Self {
        let restored = match parts.store.get::<Persisted>(TABLE, KEY) {
            Ok(record) => record,
            Err(error) => {
                tracing::warn!(%error, "cannot read the lifecycle state; the idle clock starts afresh");
                None
            }
        };
        let api_policy = restored.as_ref().and_then(|r| r.policy);
        let policy = api_policy.unwrap_or(parts.config.borrow().idle_shutdown);
        let origin = (Instant::now(), SystemTime::now());
        let last = restored
            .as_ref()
            .and_then(|r| r.last_activity.clone())
            .and_then(|(name, ms, detail)| {
                SourceKind::from_name(&name).map(|k| {
                    (
                        k,
                        LastActivity {
                            at: from_ms(ms),
                            detail,
                        },
                    )
                })
            });
        let postponement = restored.as_ref().and_then(|r| r.postponement.clone());
        let mut clock = IdleClock::new(policy);
        if let Some(p) = &postponement {
            clock.postpone(to_instant(origin, p.until));
        }
        let state = State {
            clock,
            sources: Vec::new(),
            last,
            postponement,
            api_policy,
            written: restored.clone().unwrap_or_default(),
            restored,
        };
        let service = Self {
            inner: Arc::new(Inner {
                parts,
                state: Mutex::new(state),
                activity: watch::channel(Activity::default()).0,
                changed: Notify::new(),
                writing: tokio::sync::Mutex::new(()),
                origin,
            }),
        };
        let activity = service.build_activity(&service.lock(), Instant::now());
        service.inner.activity.send_replace(activity);
        service
    }

    /// Starts the sampling loop.
    pub fn start(&self, tasks: &TaskTracker, cancel: &CancellationToken) {
        tasks.spawn(self.clone().run(cancel.clone()));
    }

    /// The activity after the last sample.
    pub fn activity(&self) -> Activity {
        self.inner.activity.borrow().clone()
    }

    /// The activity, as it changes (one value per sample at most, plus
    /// policy changes and postponements).
    pub fn watch(&self) -> watch::Receiver<Activity> {
        self.inner.activity.subscribe()
    }

    /// Replaces the idle shutdown policy (kept across restarts). A timeout
    /// shorter than the time already idle restarts the clock.
    pub async fn set_policy(&self, policy: IdleShutdownPolicy) -> Result<Activity, LifecycleError> {
        policy.validate().map_err(LifecycleError::Invalid)?;
        {
            let mut state = self.lock();
            state.api_policy = Some(policy);
            state.clock.set_policy(Instant::now(), policy);
        }
        self.inner.changed.notify_one();
        let written = self.persist().await;
        let activity = self.refresh();
        written.map(|()| activity)
    }

    /// Moves the idle stop to at least `duration` from now (kept across
    /// restarts), recording who asked and why.
    pub async fn postpone(
        &self,
        duration: Duration,
        reason: String,
        requested_by: String,
    ) -> Result<Activity, LifecycleError> {
        if duration.is_zero() || duration.as_secs() > MAX_POSTPONE_SECONDS {
            return Err(LifecycleError::Invalid(FieldError::new(
                "duration_seconds",
                format!(
                    "{} s is out of range: allowed 1 to {MAX_POSTPONE_SECONDS}",
                    duration.as_secs()
                ),
            )));
        }
        let now = Instant::now();
        let postponement = Postponement {
            until: self.wall(now + duration),
            reason,
            requested_by,
        };
        {
            let mut state = self.lock();
            state.clock.postpone(now + duration);
            state.postponement = Some(postponement.clone());
        }
        self.inner.changed.notify_one();
        self.publish(LifecycleEvent::IdleShutdownPostponed(postponement));
        let written = self.persist().await;
        let activity = self.refresh();
        written.map(|()| activity)
    }

    /// The loop: a sample every interval, and the idle events at their
    /// instants in between.
    async fn run(self, cancel: CancellationToken) {
        let mut config = self.inner.parts.config.clone();
        loop {
            self.sample().await;
            self.fire_due().await;
            let interval = Duration::from_secs(config.borrow().sample_interval_seconds.into());
            let next_sample = Instant::now() + interval;
            while Instant::now() < next_sample {
                let due = self.lock().clock.next_due();
                let wake = due.map_or(next_sample, |d| d.min(next_sample));
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep_until(wake) => {}
                    () = self.inner.changed.notified() => {}
                    Ok(()) = config.changed() => {
                        self.apply_config(&config.borrow_and_update());
                    }
                }
                self.fire_due().await;
            }
        }
    }

    /// A config change: the config's policy applies while the API has set none.
    fn apply_config(&self, config: &LifecycleConfig) {
        {
            let mut state = self.lock();
            if state.api_policy.is_none() && state.clock.policy() != config.idle_shutdown {
                state.clock.set_policy(Instant::now(), config.idle_shutdown);
            }
        }
        self.refresh();
    }

    /// Reads every enabled source once and feeds the idle clock.
    pub(crate) async fn sample(&self) {
        let config = self.inner.parts.config.borrow().clone();
        let mut readings = Vec::new();
        for source in &self.inner.parts.sources {
            let kind = source.kind();
            if !kind.is_enabled(&config) {
                continue;
            }
            let reading = tokio::time::timeout(SOURCE_TIMEOUT, source.read())
                .await
                .unwrap_or_else(|_| Reading::Unreadable {
                    reason: format!("did not answer within {} s", SOURCE_TIMEOUT.as_secs()),
                });
            readings.push((kind, reading));
        }
        let now = Instant::now();
        let at = self.wall(now);
        let transition = {
            let mut state = self.lock();
            let first = fold_readings(&mut state.sources, readings, at);
            let active = first.is_some();
            if let Some(first) = first {
                state.last = Some(first);
            }
            let was_idle = state.clock.idle_since().is_some();
            if let Some(restored) = state.restored.take()
                && !active
                && let Some(ms) = restored.idle_since_ms
            {
                // The idle stretch went on while the agent was down.
                let since = to_instant(self.inner.origin, from_ms(ms));
                state.clock.resume(since, restored.requested);
            }
            state.clock.observe(now, active);
            let idle = state.clock.idle_since().is_some();
            (idle != was_idle).then(|| LifecycleEvent::IdleChanged {
                idle,
                idle_since: state.clock.idle_since().map(|i| self.wall(i)),
                last_activity: state.last.clone(),
            })
        };
        if let Some(event) = transition {
            self.publish(event);
        }
        self.persist_logged().await;
        self.refresh();
    }

    /// Publishes the idle events due now; at the deadline, the stop.
    async fn fire_due(&self) {
        let now = Instant::now();
        let (due, idle_since) = {
            let mut state = self.lock();
            let due = state.clock.due(now);
            (due, state.clock.idle_since().map(|i| self.wall(i)))
        };
        let Some(idle_since) = idle_since else { return };
        for event in due {
            match event {
                IdleEvent::Pending { deadline } => {
                    self.publish(LifecycleEvent::IdleShutdownPending {
                        deadline: self.wall(deadline),
                        idle_since,
                    });
                }
                IdleEvent::Requested => {
                    self.publish(LifecycleEvent::IdleShutdownRequested { idle_since });
                    self.persist_logged().await;
                    let reason = format!(
                        "idle since {} s",
                        SystemTime::now()
                            .duration_since(idle_since)
                            .unwrap_or_default()
                            .as_secs()
                    );
                    match self.inner.parts.stop.stop(&reason).await {
                        Ok(done) => tracing::warn!(%done, "idle shutdown requested"),
                        Err(error) => {
                            tracing::error!(%error, "idle shutdown requested; the stop failed")
                        }
                    }
                }
            }
        }
        self.refresh();
    }

    /// The record of the current state.
    fn record(&self, state: &State) -> Persisted {
        Persisted {
            policy: state.api_policy,
            idle_since_ms: state.clock.idle_since().map(|i| to_ms(self.wall(i))),
            requested: state.clock.requested(),
            postponement: state.postponement.clone(),
            last_activity: state
                .last
                .as_ref()
                .map(|(k, l)| (k.name().to_owned(), to_ms(l.at), l.detail.clone())),
        }
    }

    /// Writes the state as it is now when it differs from the last write.
    async fn persist(&self) -> Result<(), LifecycleError> {
        let _turn = self.inner.writing.lock().await;
        let record = self.record(&self.lock());
        if self.lock().written == record {
            return Ok(());
        }
        self.inner
            .parts
            .store
            .apply(vec![Write::put(TABLE, KEY, &record)])
            .await
            .map_err(LifecycleError::Store)?;
        self.lock().written = record;
        Ok(())
    }

    /// [`Self::persist`] from the loop: a failure is logged, the loop goes
    /// on, and the next change tries again.
    async fn persist_logged(&self) {
        if let Err(error) = self.persist().await {
            tracing::warn!(%error, "cannot record the idle clock");
        }
    }

    /// Rebuilds the activity and hands it to watchers; returns it.
    fn refresh(&self) -> Activity {
        let activity = self.build_activity(&self.lock(), Instant::now());
        self.inner.activity.send_if_modified(|current| {
            let changed = *current != activity;
            *current = activity.clone();
            changed
        });
        activity
    }

    fn build_activity(&self, state: &State, now: Instant) -> Activity {
        let idle_since = state.clock.idle_since();
        Activity {
            idle: idle_since.is_some(),
            idle_since: idle_since.map(|i| self.wall(i)),
            last_activity_source: state.last.clone(),
            sources: state.sources.clone(),
            idle_shutdown_at: state.clock.deadline().map(|d| self.wall(d)),
            postponement: state
                .postponement
                .clone()
                .filter(|_| state.clock.postponed_until(now).is_some()),
            policy: state.clock.policy(),
        }
    }

    fn publish(&self, event: LifecycleEvent) {
        self.inner
            .parts
            .events
            .publish(EventPayload::Lifecycle(Box::new(event)));
    }

    fn wall(&self, instant: Instant) -> SystemTime {
        let (origin, wall) = self.inner.origin;
        if instant >= origin {
            wall + (instant - origin)
        } else {
            wall - (origin - instant)
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The instant of wall-clock time `time`, given one instant on both clocks
/// (an instant before the monotonic clock's start is clamped to it).
fn to_instant((origin, wall): (Instant, SystemTime), time: SystemTime) -> Instant {
    match time.duration_since(wall) {
        Ok(ahead) => origin + ahead,
        Err(behind) => origin.checked_sub(behind.duration()).unwrap_or(origin),
    }
}

#[cfg(test)]
mod tests;

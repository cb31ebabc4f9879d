//! The idle timer: a state machine fed with one "active or not" per sample
//! and asked for its events at any instant. It starts when every enabled
//! source is quiet, any activity resets it, and it warns and asks for a stop
//! once per idle stretch. Times are `tokio::time::Instant`, so the tests run
//! on paused time; the service turns them into wall-clock times.

use std::time::Duration;

use tokio::time::Instant;

use super::config::IdleShutdownPolicy;

/// The second warning goes out this long before the stop.
pub const LAST_WARNING: Duration = Duration::from_secs(300);

/// What the timer asks the service to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleEvent {
    /// The stop is near (at `warn_before` and at 5 minutes).
    Pending {
        /// When the stop will be requested.
        deadline: Instant,
    },
    /// The deadline passed: ask the control plane to stop the instance.
    Requested,
}

/// Which warnings and requests of the current deadline went out already.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sent {
    first_warning: bool,
    last_warning: bool,
    requested: bool,
}

/// The idle timer.
#[derive(Debug, Clone)]
pub struct IdleClock {
    policy: IdleShutdownPolicy,
    idle_since: Option<Instant>,
    postponed_until: Option<Instant>,
    sent: Sent,
}

impl IdleClock {
    /// A timer under `policy`, not idle yet (the first quiet sample starts it).
    pub fn new(policy: IdleShutdownPolicy) -> Self {
        Self {
            policy,
            idle_since: None,
            postponed_until: None,
            sent: Sent::default(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> IdleShutdownPolicy {
        self.policy
    }

    /// Since when every source has been quiet.
    pub fn idle_since(&self) -> Option<Instant> {
        self.idle_since
    }

    /// Whether the stop of the current idle stretch was requested already.
    pub fn requested(&self) -> bool {
        self.sent.requested
    }

    /// Resumes an idle stretch that began at `since` before an agent
    /// restart (`requested`: its stop was asked for already, so it is not
    /// asked again).
    pub fn resume(&mut self, since: Instant, requested: bool) {
        self.idle_since = Some(since);
        self.sent = if requested {
            Sent {
                first_warning: true,
                last_warning: true,
                requested: true,
            }
        } else {
            Sent::default()
        };
    }

    /// The postponement, while it lies ahead of `now`.
    pub fn postponed_until(&self, now: Instant) -> Option<Instant> {
        self.postponed_until.filter(|&until| until > now)
    }

    /// One sample: `active` when any enabled source was active.
    pub fn observe(&mut self, now: Instant, active: bool) {
        if active {
            self.idle_since = None;
            self.sent = Sent::default();
        } else if self.idle_since.is_none() {
            self.idle_since = Some(now);
        }
    }

    /// When the stop will be requested: idle, enabled, and the later of the
    /// timeout and a postponement.
    pub fn deadline(&self) -> Option<Instant> {
        if !self.policy.enabled {
            return None;
        }
        let since = self.idle_since?;
        let timeout = since + Duration::from_secs(self.policy.idle_timeout_seconds.into());
        Some(self.postponed_until.map_or(timeout, |p| p.max(timeout)))
    }

    /// The events due at `now`, each at most once per deadline.
    pub fn due(&mut self, now: Instant) -> Vec<IdleEvent> {
        let Some(deadline) = self.deadline() else {
            return Vec::new();
        };
        let mut events = Vec::new();
        if now >= deadline {
            if !self.sent.requested {
                self.sent = Sent {
                    first_warning: true,
                    last_warning: true,
                    requested: true,
                };
                events.push(IdleEvent::Requested);
            }
            return events;
        }
        let left = deadline - now;
        let warn_before = Duration::from_secs(self.policy.warn_before_seconds.into());
        if left <= LAST_WARNING && !self.sent.last_warning {
            // One warning when both are due at once (a short policy).
            self.sent.first_warning = true;
            self.sent.last_warning = true;
            events.push(IdleEvent::Pending { deadline });
        } else if left <= warn_before && !self.sent.first_warning {
            self.sent.first_warning = true;
            events.push(IdleEvent::Pending { deadline });
        }
        events
    }

    /// The next instant at which [`IdleClock::due`] may return something.
    pub fn next_due(&self) -> Option<Instant> {
        let deadline = self.deadline()?;
        if self.sent.requested {
            return None;
        }
        let warn_before = Duration::from_secs(self.policy.warn_before_seconds.into());
        let mut next = deadline;
        if !self.sent.first_warning {
            next = next.min(deadline.checked_sub(warn_before).unwrap_or(deadline));
        }
        if !self.sent.last_warning {
            next = next.min(deadline.checked_sub(LAST_WARNING).unwrap_or(deadline));
        }
        Some(next)
    }

    /// A new policy. A timeout shorter than the time already idle restarts
    /// the clock, so a new policy never stops the instance by surprise.
    pub fn set_policy(&mut self, now: Instant, policy: IdleShutdownPolicy) {
        let timeout = Duration::from_secs(policy.idle_timeout_seconds.into());
        if let Some(since) = self.idle_since
            && now.duration_since(since) >= timeout
        {
            self.idle_since = Some(now);
        }
        self.policy = policy;
        self.sent = Sent::default();
    }

    /// Moves the deadline to at least `until`; warnings go out again for the
    /// new deadline.
    pub fn postpone(&mut self, until: Instant) {
        self.postponed_until = Some(self.postponed_until.map_or(until, |p| p.max(until)));
        self.sent = Sent::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(timeout: u32, warn: u32) -> IdleShutdownPolicy {
        IdleShutdownPolicy {
            enabled: true,
            idle_timeout_seconds: timeout,
            warn_before_seconds: warn,
        }
    }

    /// Steps paused time second by second up to `seconds` and gathers the
    /// events with the second they came at.
    async fn run(clock: &mut IdleClock, start: Instant, seconds: u64) -> Vec<(u64, IdleEvent)> {
        let mut seen = Vec::new();
        for s in 0..=seconds {
            tokio::time::sleep_until(start + Duration::from_secs(s)).await;
            for e in clock.due(Instant::now()) {
                seen.push((s, e));
            }
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn warns_twice_then_requests_once_and_stays_silent() {
        let start = Instant::now();
        let mut clock = IdleClock::new(policy(3600, 1800));
        clock.observe(start, false);
        let deadline = start + Duration::from_secs(3600);
        let events = run(&mut clock, start, 4000).await;
        assert_eq!(
            events,
            vec![
                (1800, IdleEvent::Pending { deadline }),
                (3300, IdleEvent::Pending { deadline }),
                (3600, IdleEvent::Requested),
            ]
        );
        assert_eq!(clock.next_due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn activity_resets_the_timer_and_the_events() {
        let start = Instant::now();
        let mut clock = IdleClock::new(policy(10, 5));
        clock.observe(start, false);
        let events = run(&mut clock, start, 12).await;
        assert_eq!(events.last(), Some(&(10, IdleEvent::Requested)));
        let now = Instant::now();
        clock.observe(now, true);
        assert_eq!(clock.deadline(), None);
        clock.observe(now, false);
        assert_eq!(clock.deadline(), Some(now + Duration::from_secs(10)));
        let events = run(&mut clock, now, 10).await;
        assert_eq!(
            events
                .iter()
                .filter(|(_, e)| *e == IdleEvent::Requested)
                .count(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_policy_warns_once() {
        let start = Instant::now();
        let mut clock = IdleClock::new(policy(10, 5));
        clock.observe(start, false);
        let deadline = start + Duration::from_secs(10);
        let events = run(&mut clock, start, 20).await;
        assert_eq!(
            events,
            vec![
                (0, IdleEvent::Pending { deadline }),
                (10, IdleEvent::Requested)
            ],
            "10 s is under 5 minutes: the two warnings are one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_policy_shorter_than_the_idle_time_restarts_the_clock() {
        let start = Instant::now();
        let mut clock = IdleClock::new(IdleShutdownPolicy::default());
        clock.observe(start, false);
        tokio::time::advance(Duration::from_secs(600)).await;
        let now = Instant::now();
        clock.set_policy(now, policy(60, 30));
        assert_eq!(clock.idle_since(), Some(now));
        assert_eq!(clock.deadline(), Some(now + Duration::from_secs(60)));
        assert_eq!(
            clock.due(now),
            vec![IdleEvent::Pending {
                deadline: now + Duration::from_secs(60)
            }],
            "a warning, no surprise stop"
        );
        // A longer one keeps the idle time already counted.
        tokio::time::advance(Duration::from_secs(20)).await;
        clock.set_policy(Instant::now(), policy(3600, 30));
        assert_eq!(clock.idle_since(), Some(now));
        assert_eq!(clock.deadline(), Some(now + Duration::from_secs(3600)));
    }

    #[tokio::test(start_paused = true)]
    async fn postpone_moves_the_deadline_and_warns_again() {
        let start = Instant::now();
        let mut clock = IdleClock::new(policy(60, 30));
        clock.observe(start, false);
        let events = run(&mut clock, start, 60).await;
        assert_eq!(events.last(), Some(&(60, IdleEvent::Requested)));
        let until = Instant::now() + Duration::from_secs(7200);
        clock.postpone(until);
        assert_eq!(clock.deadline(), Some(until));
        assert_eq!(clock.next_due(), Some(until - Duration::from_secs(300)));
        // An earlier postponement never brings the deadline forward.
        clock.postpone(Instant::now() + Duration::from_secs(10));
        assert_eq!(clock.deadline(), Some(until));
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_never_asks() {
        let start = Instant::now();
        let mut clock = IdleClock::new(IdleShutdownPolicy::default());
        clock.observe(start, false);
        assert_eq!(clock.deadline(), None);
        assert_eq!(clock.next_due(), None);
        tokio::time::advance(Duration::from_secs(86_400)).await;
        assert!(clock.due(Instant::now()).is_empty());
    }
}

//! The pressure state machine of one filesystem: ok, warning, critical, and
//! unresponsive when sampling does not answer.
//!
//! Getting worse is immediate: the first sample below a level changes the
//! state. Getting better needs free space (and inodes) above the level plus
//! the clear margin, held without a break for the transition time, so that
//! the state never flaps while free space oscillates around a level. Pure
//! logic: time is passed in, so tests drive it with paused tokio time.

use tokio::time::Instant;

use super::{DiskState, FsStats, Thresholds};

/// Pressure levels, from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Above the warning level.
    Ok,
    /// Below the warning level.
    Warning,
    /// Below the floor.
    Critical,
}

impl From<Level> for DiskState {
    fn from(level: Level) -> Self {
        match level {
            Level::Ok => DiskState::Ok,
            Level::Warning => DiskState::Warning,
            Level::Critical => DiskState::Critical,
        }
    }
}

/// A decided change of state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    /// Before.
    pub old: DiskState,
    /// After.
    pub new: DiskState,
    /// Why, for the alert's threshold and message.
    pub cause: Cause,
}

/// What a transition was about.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cause {
    /// Free bytes relative to this level (in bytes).
    Bytes(u64),
    /// Free inodes relative to this level (in percent of all inodes).
    Inodes(f64),
    /// The filesystem did not answer.
    Unresponsive,
}

/// An improvement being held before it takes effect.
#[derive(Debug, Clone, Copy)]
struct Improvement {
    /// The least improved level seen while it held.
    to: Level,
    /// When it started.
    since: Instant,
}

/// The state machine of one filesystem.
#[derive(Debug, Clone)]
pub struct PressureMachine {
    state: DiskState,
    /// The pressure level, kept while unresponsive so that a filesystem
    /// that answers again resumes where it was.
    level: Option<Level>,
    improving: Option<Improvement>,
}

impl Default for PressureMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl PressureMachine {
    /// A machine that has seen nothing yet.
    pub fn new() -> Self {
        Self {
            state: DiskState::Unknown,
            level: None,
            improving: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> DiskState {
        self.state
    }

    /// The pressure level, also while unresponsive (`None` before the first sample).
    pub fn level(&self) -> Option<Level> {
        self.level
    }

    /// Feeds one sample taken at `now`; returns the transition it causes.
    pub fn observe(
        &mut self,
        stats: &FsStats,
        thresholds: &Thresholds,
        now: Instant,
    ) -> Option<Transition> {
        let raw = raw_level(stats, thresholds);
        let old = self.state;
        let Some(current) = self.level else {
            // First sample: the state is what the numbers say.
            return Some(self.enter(old, raw, stats, thresholds));
        };
        if old == DiskState::Unresponsive {
            // Answering again: resume at the level it had, or worse if the
            // numbers say so; improving still has to be earned.
            return Some(self.enter(old, raw.max(current), stats, thresholds));
        }
        if raw > current {
            return Some(self.enter(old, raw, stats, thresholds));
        }
        let cleared = cleared_level(stats, thresholds);
        if cleared >= current {
            self.improving = None;
            return None;
        }
        let improvement = self.improving.get_or_insert(Improvement {
            to: cleared,
            since: now,
        });
        improvement.to = improvement.to.max(cleared);
        if now.duration_since(improvement.since) < thresholds.transition {
            return None;
        }
        let to = improvement.to;
        let transition = Transition {
            old,
            new: to.into(),
            // The level left behind is the one an improvement is about.
            cause: Cause::Bytes(level_bytes(current, thresholds)),
        };
        self.state = to.into();
        self.level = Some(to);
        self.improving = None;
        Some(transition)
    }

    /// The sample did not answer in time (or failed); returns the transition
    /// unless the filesystem was already unresponsive.
    pub fn unresponsive(&mut self) -> Option<Transition> {
        if self.state == DiskState::Unresponsive {
            return None;
        }
        let old = self.state;
        self.state = DiskState::Unresponsive;
        self.improving = None;
        Some(Transition {
            old,
            new: DiskState::Unresponsive,
            cause: Cause::Unresponsive,
        })
    }

    fn enter(
        &mut self,
        old: DiskState,
        level: Level,
        stats: &FsStats,
        thresholds: &Thresholds,
    ) -> Transition {
        self.state = level.into();
        self.level = Some(level);
        self.improving = None;
        let bytes = level_bytes(level, thresholds);
        let cause = if level != Level::Ok && stats.free_bytes >= bytes {
            Cause::Inodes(level_inodes_percent(level, thresholds))
        } else {
            Cause::Bytes(bytes)
        };
        Transition {
            old,
            new: level.into(),
            cause,
        }
    }
}

/// The level that defines a state: the floor for critical, the warning
/// level for warning and ok.
fn level_bytes(level: Level, thresholds: &Thresholds) -> u64 {
    match level {
        Level::Critical => thresholds.critical_free_bytes,
        Level::Warning | Level::Ok => thresholds.warning_free_bytes,
    }
}

/// The inode level that defines a state, like [`level_bytes`].
fn level_inodes_percent(level: Level, thresholds: &Thresholds) -> f64 {
    match level {
        Level::Critical => thresholds.critical_free_inodes_percent,
        Level::Warning | Level::Ok => thresholds.warning_free_inodes_percent,
    }
}

fn below(stats: &FsStats, bytes: u64, inodes_percent: f64) -> bool {
    stats.free_bytes < bytes
        || stats
            .free_inodes_percent()
            .is_some_and(|free| free < inodes_percent)
}

/// The level the numbers put the filesystem in, without any margin.
pub fn raw_level(stats: &FsStats, t: &Thresholds) -> Level {
    if below(stats, t.critical_free_bytes, t.critical_free_inodes_percent) {
        Level::Critical
    } else if below(stats, t.warning_free_bytes, t.warning_free_inodes_percent) {
        Level::Warning
    } else {
        Level::Ok
    }
}

/// The best level the numbers allow leaving to: each level plus the margin.
fn cleared_level(stats: &FsStats, t: &Thresholds) -> Level {
    let margin = |bytes: u64| bytes.saturating_add(t.clear_margin_bytes);
    let margin_inodes = |percent: f64| percent + t.clear_margin_inodes_percent;
    if !below(
        stats,
        margin(t.warning_free_bytes),
        margin_inodes(t.warning_free_inodes_percent),
    ) {
        Level::Ok
    } else if !below(
        stats,
        margin(t.critical_free_bytes),
        margin_inodes(t.critical_free_inodes_percent),
    ) {
        Level::Warning
    } else {
        Level::Critical
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn thresholds() -> Thresholds {
        Thresholds {
            warning_free_bytes: 16 * MIB,
            critical_free_bytes: 8 * MIB,
            warning_free_inodes_percent: 10.0,
            critical_free_inodes_percent: 5.0,
            clear_margin_bytes: 2 * MIB,
            clear_margin_inodes_percent: 1.0,
            transition: Duration::from_secs(30),
        }
    }

    fn free(bytes: u64) -> FsStats {
        FsStats {
            total_bytes: 64 * MIB,
            free_bytes: bytes,
            total_inodes: 1000,
            free_inodes: 900,
        }
    }

    fn step(m: &mut PressureMachine, stats: FsStats) -> Option<(DiskState, DiskState)> {
        m.observe(&stats, &thresholds(), Instant::now())
            .map(|t| (t.old, t.new))
    }

    async fn tick() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn first_sample_sets_the_state() {
        let mut m = PressureMachine::new();
        assert_eq!(
            step(&mut m, free(40 * MIB)),
            Some((DiskState::Unknown, DiskState::Ok))
        );
        let mut m = PressureMachine::new();
        assert_eq!(
            step(&mut m, free(4 * MIB)),
            Some((DiskState::Unknown, DiskState::Critical))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn getting_worse_is_immediate_and_skips_levels() {
        let mut m = PressureMachine::new();
        step(&mut m, free(40 * MIB));
        assert_eq!(
            step(&mut m, free(15 * MIB)),
            Some((DiskState::Ok, DiskState::Warning))
        );
        assert_eq!(
            step(&mut m, free(7 * MIB)),
            Some((DiskState::Warning, DiskState::Critical))
        );
        let mut m = PressureMachine::new();
        step(&mut m, free(40 * MIB));
        let t = m
            .observe(&free(MIB), &thresholds(), Instant::now())
            .expect("transition");
        assert_eq!((t.old, t.new), (DiskState::Ok, DiskState::Critical));
        assert_eq!(t.cause, Cause::Bytes(8 * MIB));
    }

    #[tokio::test(start_paused = true)]
    async fn improving_needs_the_margin_held_for_the_transition_time() {
        let mut m = PressureMachine::new();
        step(&mut m, free(4 * MIB));
        // Above the floor but inside the margin: stays critical forever.
        for _ in 0..100 {
            tick().await;
            assert_eq!(step(&mut m, free(9 * MIB)), None);
        }
        // Above floor + margin: warning after 30 s, not before.
        assert_eq!(step(&mut m, free(11 * MIB)), None);
        for _ in 0..29 {
            tick().await;
            assert_eq!(step(&mut m, free(11 * MIB)), None);
        }
        tick().await;
        let t = m
            .observe(&free(11 * MIB), &thresholds(), Instant::now())
            .expect("improves after 30 s");
        assert_eq!((t.old, t.new), (DiskState::Critical, DiskState::Warning));
        assert_eq!(t.cause, Cause::Bytes(8 * MIB));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dip_restarts_the_hold() {
        let mut m = PressureMachine::new();
        step(&mut m, free(4 * MIB));
        for _ in 0..20 {
            tick().await;
            assert_eq!(step(&mut m, free(20 * MIB)), None);
        }
        // One sample back inside the margin resets the clock.
        tick().await;
        assert_eq!(step(&mut m, free(9 * MIB)), None);
        // The hold starts again at the next sample and needs 30 s from there.
        for _ in 0..30 {
            tick().await;
            assert_eq!(step(&mut m, free(20 * MIB)), None, "no early improvement");
        }
        tick().await;
        assert_eq!(
            step(&mut m, free(20 * MIB)),
            Some((DiskState::Critical, DiskState::Ok))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn oscillation_inside_the_margin_never_flaps() {
        let mut m = PressureMachine::new();
        step(&mut m, free(40 * MIB));
        assert_eq!(
            step(&mut m, free(7 * MIB)),
            Some((DiskState::Ok, DiskState::Critical))
        );
        // 7..10 MiB: around the 8 MiB floor, never above floor + margin.
        for i in 0..600u64 {
            tick().await;
            let bytes = 7 * MIB + (i % 7) * (MIB / 2);
            assert_eq!(step(&mut m, free(bytes)), None, "flapped at {bytes}");
        }
        assert_eq!(m.state(), DiskState::Critical);
    }

    #[tokio::test(start_paused = true)]
    async fn improvement_lands_on_the_least_improved_level_seen() {
        let mut m = PressureMachine::new();
        step(&mut m, free(4 * MIB));
        assert_eq!(step(&mut m, free(30 * MIB)), None);
        for _ in 0..15 {
            tick().await;
            assert_eq!(step(&mut m, free(12 * MIB)), None);
        }
        for _ in 0..15 {
            tick().await;
            let _ = step(&mut m, free(30 * MIB));
        }
        assert_eq!(m.state(), DiskState::Warning);
        // Ok needs its own full hold, from the next sample on.
        for _ in 0..30 {
            tick().await;
            assert_eq!(step(&mut m, free(30 * MIB)), None);
        }
        tick().await;
        assert_eq!(
            step(&mut m, free(30 * MIB)),
            Some((DiskState::Warning, DiskState::Ok))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_transition_time_improves_at_once() {
        let mut t = thresholds();
        t.transition = Duration::ZERO;
        let mut m = PressureMachine::new();
        m.observe(&free(4 * MIB), &t, Instant::now());
        let tr = m
            .observe(&free(30 * MIB), &t, Instant::now())
            .expect("at once");
        assert_eq!(tr.new, DiskState::Ok);
    }

    #[tokio::test(start_paused = true)]
    async fn inodes_count_like_bytes() {
        let mut m = PressureMachine::new();
        step(&mut m, free(40 * MIB));
        let few_inodes = FsStats {
            free_inodes: 30,
            ..free(40 * MIB)
        };
        let t = m
            .observe(&few_inodes, &thresholds(), Instant::now())
            .expect("critical on inodes");
        assert_eq!(t.new, DiskState::Critical);
        assert_eq!(
            t.cause,
            Cause::Inodes(thresholds().critical_free_inodes_percent)
        );
        // 5.5 % free: above the floor, inside the 1 % margin.
        let some_inodes = FsStats {
            free_inodes: 55,
            ..free(40 * MIB)
        };
        for _ in 0..60 {
            tick().await;
            assert_eq!(step(&mut m, some_inodes), None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unresponsive_and_back_resumes_the_level() {
        let mut m = PressureMachine::new();
        step(&mut m, free(4 * MIB));
        let t = m.unresponsive().expect("transition");
        assert_eq!(
            (t.old, t.new),
            (DiskState::Critical, DiskState::Unresponsive)
        );
        assert_eq!(m.unresponsive(), None, "reported once");
        // Answers again with plenty free: back to critical first, improving
        // has to be held as usual.
        assert_eq!(
            step(&mut m, free(40 * MIB)),
            Some((DiskState::Unresponsive, DiskState::Critical))
        );
        // Never sampled before the hang: the numbers decide.
        let mut m = PressureMachine::new();
        m.unresponsive();
        assert_eq!(
            step(&mut m, free(40 * MIB)),
            Some((DiskState::Unresponsive, DiskState::Ok))
        );
    }
}

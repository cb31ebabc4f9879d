//! The background-work source: processes of people (uid ≥ `min_uid`, or a
//! configured user) whose CPU time grew by more than the threshold over the
//! last interval: the training run in tmux or under `nohup` that notebooks
//! and terminals never show. `/proc` is read through [`ProcessTable`], so
//! the arithmetic is tested with a fake and the real table in `tests/`.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use super::activity::Reading;
use super::config::BackgroundSource;

/// One process at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSample {
    /// Its pid.
    pub pid: u32,
    /// Its real uid.
    pub uid: u32,
    /// Its command name (`comm`).
    pub name: String,
    /// When it started, in clock ticks since boot (tells a reused pid apart).
    pub start_ticks: u64,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
}

/// The processes of the system (`/proc`, or a fake).
pub trait ProcessTable: Send + Sync + 'static {
    /// Every process now. Blocking: the caller runs it off the runtime.
    fn processes(&self) -> io::Result<Vec<ProcessSample>>;
    /// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
    fn ticks_per_second(&self) -> u64;
    /// The name of `uid`, for the detail (the uid itself when unknown).
    fn user_name(&self, uid: u32) -> String;
    /// The uid of user `name`, if it exists.
    fn user_id(&self, name: &str) -> Option<u32>;
}

/// The real table under `/proc`.
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self {
            root: "/proc".into(),
        }
    }
}

impl ProcessTable for ProcFs {
    fn processes(&self) -> io::Result<Vec<ProcessSample>> {
        let mut samples = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            // A process may end between the listing and the read: skip it.
            if let Ok(sample) = read_process(&entry.path(), pid) {
                samples.push(sample);
            }
        }
        Ok(samples)
    }

    fn ticks_per_second(&self) -> u64 {
        nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|t| u64::try_from(t).ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    }

    fn user_name(&self, uid: u32) -> String {
        nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map_or_else(|| uid.to_string(), |u| u.name)
    }

    fn user_id(&self, name: &str) -> Option<u32> {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    }
}

/// Reads one process's `stat` (name, times) and `status` (uid).
fn read_process(dir: &std::path::Path, pid: u32) -> io::Result<ProcessSample> {
    let stat = std::fs::read_to_string(dir.join("stat"))?;
    let status = std::fs::read_to_string(dir.join("status"))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/stat"));
    // The name sits in parentheses and may hold spaces and ')': the last ')' ends it.
    let open = stat.find('(').ok_or_else(bad)?;
    let close = stat.rfind(')').ok_or_else(bad)?;
    let name = stat.get(open + 1..close).ok_or_else(bad)?.to_owned();
    // Fields after the name, from field 3 (state): utime is 14, stime 15,
    // starttime 22 (proc(5)), so indexes 11, 12 and 19 here.
    let rest: Vec<&str> = stat
        .get(close + 1..)
        .ok_or_else(bad)?
        .split_whitespace()
        .collect();
    let field =
        |i: usize| -> io::Result<u64> { rest.get(i).and_then(|v| v.parse().ok()).ok_or_else(bad) };
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .ok_or_else(bad)?;
    Ok(ProcessSample {
        pid,
        uid,
        name,
        start_ticks: field(19)?,
        cpu_ticks: field(11)? + field(12)?,
    })
}

/// The source: remembers the previous sample to measure growth.
pub struct BackgroundWork<T: ProcessTable> {
    table: T,
    settings: BackgroundSource,
    extra_uids: Vec<u32>,
    previous: HashMap<(u32, u64), u64>,
    previous_at: Option<Instant>,
}

impl<T: ProcessTable> BackgroundWork<T> {
    /// A source over `table` with `settings`; configured user names are
    /// resolved once (an unknown name counts nobody).
    pub fn new(table: T, settings: BackgroundSource) -> Self {
        let extra_uids = settings
            .users
            .iter()
            .filter_map(|u| table.user_id(u))
            .collect();
        Self {
            table,
            settings,
            extra_uids,
            previous: HashMap::new(),
            previous_at: None,
        }
    }

    /// One sample at `now`. The first one has nothing to compare with and
    /// reads quiet. Blocking (reads `/proc`).
    pub fn sample(&mut self, now: Instant) -> Reading {
        let processes = match self.table.processes() {
            Ok(p) => p,
            Err(error) => {
                return Reading::Unreadable {
                    reason: format!("cannot list processes: {error}"),
                };
            }
        };
        let counted: Vec<&ProcessSample> = processes
            .iter()
            .filter(|p| p.uid >= self.settings.min_uid || self.extra_uids.contains(&p.uid))
            .collect();
        let elapsed = self.previous_at.map(|at| now.duration_since(at));
        let mut busy: Vec<(&ProcessSample, Duration)> = Vec::new();
        if let Some(elapsed) = elapsed.filter(|e| !e.is_zero()) {
            let tick = self.table.ticks_per_second();
            let threshold =
                elapsed.as_secs_f64() * f64::from(self.settings.cpu_percent_threshold) / 100.0;
            for p in &counted {
                let Some(&before) = self.previous.get(&(p.pid, p.start_ticks)) else {
                    continue;
                };
                let used = Duration::from_secs_f64(
                    p.cpu_ticks.saturating_sub(before) as f64 / tick as f64,
                );
                if used.as_secs_f64() > threshold {
                    busy.push((p, used));
                }
            }
        }
        busy.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.pid.cmp(&b.0.pid)));
        let first = busy.first().map(|(p, used)| {
            format!(
                "process {} (pid {}, user {}) used {} s of CPU in the last {} s",
                p.name,
                p.pid,
                self.table.user_name(p.uid),
                used.as_secs(),
                elapsed.unwrap_or_default().as_secs()
            )
        });
        self.previous = counted
            .iter()
            .map(|p| ((p.pid, p.start_ticks), p.cpu_ticks))
            .collect();
        self.previous_at = Some(now);
        Reading::count(busy.len(), first)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct FakeTable {
        now: Mutex<Vec<ProcessSample>>,
        fail: Mutex<bool>,
    }

    impl ProcessTable for &'static FakeTable {
        fn processes(&self) -> io::Result<Vec<ProcessSample>> {
            if *self.fail.lock().unwrap() {
                return Err(io::Error::from(io::ErrorKind::PermissionDenied));
            }
            Ok(self.now.lock().unwrap().clone())
        }
        fn ticks_per_second(&self) -> u64 {
            100
        }
        fn user_name(&self, uid: u32) -> String {
            if uid == 1000 {
                "alice".into()
            } else {
                uid.to_string()
            }
        }
        fn user_id(&self, name: &str) -> Option<u32> {
            (name == "jupyter").then_some(500)
        }
    }

    fn process(pid: u32, uid: u32, cpu_ticks: u64) -> ProcessSample {
        ProcessSample {
            pid,
            uid,
            name: "python3".into(),
            start_ticks: 7,
            cpu_ticks,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_user_process_is_named_and_system_ones_are_not() {
        let table: &'static FakeTable = Box::leak(Box::default());
        let mut source = BackgroundWork::new(table, BackgroundSource::default());
        *table.now.lock().unwrap() = vec![process(4242, 1000, 0), process(1, 0, 0)];
        assert_eq!(
            source.sample(Instant::now()),
            Reading::Quiet,
            "first sample"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        // 38 s for alice; root's 60 s does not count.
        *table.now.lock().unwrap() = vec![process(4242, 1000, 3800), process(1, 0, 6000)];
        assert_eq!(
            source.sample(Instant::now()),
            Reading::Active {
                count: 1,
                detail: "process python3 (pid 4242, user alice) used 38 s of CPU in the last 60 s"
                    .into()
            }
        );
        // Under 10 % of a core in the next minute: quiet.
        tokio::time::advance(Duration::from_secs(60)).await;
        *table.now.lock().unwrap() = vec![process(4242, 1000, 4300), process(1, 0, 12000)];
        assert_eq!(source.sample(Instant::now()), Reading::Quiet);
    }

    #[tokio::test(start_paused = true)]
    async fn a_configured_system_user_counts_and_a_reused_pid_does_not() {
        let table: &'static FakeTable = Box::leak(Box::default());
        let settings = BackgroundSource {
            users: vec!["jupyter".into()],
            ..BackgroundSource::default()
        };
        let mut source = BackgroundWork::new(table, settings);
        *table.now.lock().unwrap() = vec![process(10, 500, 0), process(11, 1000, 0)];
        source.sample(Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
        let mut reused = process(11, 1000, 5000);
        reused.start_ticks = 99;
        *table.now.lock().unwrap() = vec![process(10, 500, 500), reused];
        assert_eq!(
            source.sample(Instant::now()).active_detail(),
            Some("process python3 (pid 10, user 500) used 5 s of CPU in the last 10 s")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_table_says_so() {
        let table: &'static FakeTable = Box::leak(Box::default());
        *table.fail.lock().unwrap() = true;
        let mut source = BackgroundWork::new(table, BackgroundSource::default());
        assert!(matches!(
            source.sample(Instant::now()),
            Reading::Unreadable { .. }
        ));
    }

    #[test]
    fn the_real_table_holds_this_process() {
        let me = std::process::id();
        let table = ProcFs::default();
        let all = table.processes().unwrap();
        let this = all.iter().find(|p| p.pid == me).expect("own pid in /proc");
        assert_eq!(this.uid, nix::unistd::getuid().as_raw());
        assert!(table.ticks_per_second() > 0);
    }
}

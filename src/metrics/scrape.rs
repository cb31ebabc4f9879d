//! Scrape-time reads: the gauges refreshed just before each scrape from the
//! job manager, the disk guard, the mounts and `/proc/self`.

use super::Metrics;
use super::series::{
    AppLabel, AppStateLabels, FilesystemLabel, FilesystemStateLabels, MountStateLabels, StateLabel,
};
use crate::jobs::JobState;
use crate::mounts::{MountState, MountStatus};

/// Every job state, for the by-state gauge (states with no job show 0).
const JOB_STATES: [JobState; 7] = [
    JobState::Queued,
    JobState::Starting,
    JobState::Running,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
    JobState::TimedOut,
];

/// Every mount state, so that a mount's state gauge is 1 for exactly one.
const MOUNT_STATES: [MountState; 6] = [
    MountState::Mounting,
    MountState::Mounted,
    MountState::Stale,
    MountState::Remounting,
    MountState::Failed,
    MountState::Unmounted,
];

/// Every disk state, for the per-filesystem state gauge.
const DISK_STATES: [crate::disk::DiskState; 5] = [
    crate::disk::DiskState::Unknown,
    crate::disk::DiskState::Ok,
    crate::disk::DiskState::Warning,
    crate::disk::DiskState::Critical,
    crate::disk::DiskState::Unresponsive,
];

impl Metrics {
    /// Sets the gauges from the sources and `/proc/self`.
    pub(super) fn refresh(&self) {
        let inner = &self.inner;
        if let Some(own) = read_own_usage() {
            inner
                .resident_bytes
                .set(i64::try_from(own.resident_bytes).unwrap_or(i64::MAX));
            // A counter only goes up: add what was used since the last scrape.
            let before = inner.cpu_seconds.get();
            if own.cpu_seconds > before {
                inner.cpu_seconds.inc_by(own.cpu_seconds - before);
            }
        }
        let Some(sources) = &inner.sources else {
            return;
        };
        let counts = sources.jobs.counts_by_state();
        for state in JOB_STATES {
            inner
                .jobs_by_state
                .get_or_create(&StateLabel {
                    state: state.name().to_owned(),
                })
                .set(
                    counts
                        .get(&state)
                        .map_or(0, |n| i64::try_from(*n).unwrap_or(i64::MAX)),
                );
        }
        let slots = sources.jobs.slot_usage();
        inner.queue_depth.set(i64::from(slots.queued));
        inner.slots_in_use.set(i64::from(slots.in_use));
        inner.slots_capacity.set(i64::from(slots.capacity));

        self.set_mount_states(&sources.mounts.list());
        self.set_app_series(&sources.apps.list());

        // Filesystems come and go (mount caches): rebuild rather than update.
        inner.fs_free_bytes.clear();
        inner.fs_state.clear();
        for fs in sources.disk.usage().filesystems {
            let mount_point = fs.mount.mount_point.display().to_string();
            if let Some(stats) = &fs.stats {
                inner
                    .fs_free_bytes
                    .get_or_create(&FilesystemLabel {
                        mount_point: mount_point.clone(),
                    })
                    .set(i64::try_from(stats.free_bytes).unwrap_or(i64::MAX));
            }
            for state in DISK_STATES {
                inner
                    .fs_state
                    .get_or_create(&FilesystemStateLabels {
                        mount_point: mount_point.clone(),
                        state: state.name().to_owned(),
                    })
                    .set(i64::from(state == fs.state));
            }
        }
    }

    /// Sets the one-hot state gauge of exactly these mounts.
    pub(super) fn set_mount_states(&self, mounts: &[MountStatus]) {
        // Mounts come and go (Mount, Unmount): rebuild rather than update.
        self.inner.mount_state.clear();
        for status in mounts {
            for state in MOUNT_STATES {
                self.inner
                    .mount_state
                    .get_or_create(&MountStateLabels {
                        mount: status.name.clone(),
                        state: state.name().to_owned(),
                    })
                    .set(i64::from(state == status.state));
            }
        }
    }
}

impl Metrics {
    /// Sets the one-hot state gauge and the restarts of exactly these apps.
    pub(super) fn set_app_series(&self, apps: &[crate::apps::AppRecord]) {
        // Apps come and go (DeployApp, RemoveApp): rebuild rather than update.
        self.inner.app_state.clear();
        self.inner.app_restarts.clear();
        for app in apps {
            for state in crate::apps::AppState::ALL {
                self.inner
                    .app_state
                    .get_or_create(&AppStateLabels {
                        app: app.name().to_owned(),
                        state: state.as_str().to_owned(),
                    })
                    .set(i64::from(state == app.state));
            }
            self.inner
                .app_restarts
                .get_or_create(&AppLabel {
                    app: app.name().to_owned(),
                })
                .set(i64::from(app.restarts));
        }
    }
}

/// The agent's own memory and CPU, from `/proc/self`.
struct OwnUsage {
    resident_bytes: u64,
    cpu_seconds: f64,
}

fn read_own_usage() -> Option<OwnUsage> {
    // Small procfs reads answer from kernel memory and never block on I/O.
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .unwrap_or(100);
    Some(OwnUsage {
        resident_bytes: parse_vm_rss(&status)?,
        cpu_seconds: parse_cpu_ticks(&stat)? as f64 / ticks as f64,
    })
}

/// VmRSS in bytes from `/proc/<pid>/status`.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// utime + stime in clock ticks from `/proc/<pid>/stat`. The command name
/// (field 2) may hold spaces, so fields are counted after its closing `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_self() {
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t  1234 kB\n"),
            Some(1234 * 1024)
        );
        let stat = "42 (a b) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15";
        // utime = 11, stime = 12 (fields 14 and 15).
        assert_eq!(parse_cpu_ticks(stat), Some(23));
        assert!(read_own_usage().is_some_and(|u| u.resident_bytes > 0));
    }
}

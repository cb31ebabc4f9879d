//! Probing the watched paths: which to probe at each tick (every filesystem
//! through one path, new and skipped paths, the others now and then to notice
//! a mount), one probe outstanding per filesystem and per path (single
//! flight: a hung mount costs one blocked thread), what an answer means
//! (a filesystem joined or left, new numbers for the state machine, an absent
//! path skipped) and when a probe has taken too long (UNRESPONSIVE).
//!
//! A probe (`stat` + `statvfs`) of the agent's own well-known filesystems
//! runs in `spawn_blocking`; the isolated paths of one turn (those users or
//! remote storage control) share one helper process ([`spawn_batch`]), which
//! is killed at the timeout. Both run off the task tracker and report back
//! on a channel: a probe stuck on a hung mount never delays the others nor
//! the agent's stop, and an isolated path stays in flight until its helper
//! is really gone, so a hung one never costs more than one helper.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::alerts::AlertLog;
use super::watchlist::{FsEntry, FsKey, Watchlist};
use crate::disk::config::DiskConfig;
use crate::disk::probe::{FsProbe, IsolatedProbe, PathSample, ProbeRun};
use crate::disk::{DiskState, MountInfo, Thresholds};

/// Paths that are not a filesystem's representative are probed every this
/// many intervals (10 s at the default interval), to notice that something
/// was mounted on them (or unmounted).
const RESOLVE_EVERY_TICKS: u32 = 10;

/// A probe to start.
#[derive(Debug)]
pub(super) struct ProbeRequest {
    pub(super) path: PathBuf,
    /// Look up where its filesystem is mounted too.
    pub(super) want_mount: bool,
    /// Probe it in a helper process (users or remote storage control it).
    pub(super) isolated: bool,
}

/// What a probe found.
pub(super) struct ProbeResult {
    path: PathBuf,
    outcome: std::io::Result<(PathSample, Option<MountInfo>)>,
}

/// Starts `request` off the runtime; the answer arrives on `results`.
pub(super) fn spawn_probe(
    probe: &Arc<dyn FsProbe>,
    request: ProbeRequest,
    results: &mpsc::UnboundedSender<ProbeResult>,
) {
    let ProbeRequest {
        path, want_mount, ..
    } = request;
    let probe = probe.clone();
    let results = results.clone();
    // Not on the task tracker: a probe stuck on a hung mount must not hold
    // up the agent's stop.
    tokio::task::spawn_blocking(move || {
        let outcome = crate::disk::probe::sample_with_mount(probe.as_ref(), &path, want_mount);
        let _ = results.send(ProbeResult { path, outcome });
    });
}

/// Starts the isolated `requests` of one turn in one helper process, killed
/// after `timeout`; each answer arrives on `results` as soon as it is
/// known. Once the helper is gone, every path it did not answer gets an
/// error (so that it may be probed again); a helper stuck in a hung
/// filesystem may be gone only when the filesystem lets go.
pub(super) fn spawn_batch(
    isolated: &Arc<dyn IsolatedProbe>,
    requests: Vec<ProbeRequest>,
    timeout: Duration,
    results: &mpsc::UnboundedSender<ProbeResult>,
) {
    let paths: Vec<(PathBuf, bool)> = requests
        .into_iter()
        .map(|r| (r.path, r.want_mount))
        .collect();
    let ProbeRun { mut answers, .. } = isolated.sample(paths.clone(), timeout);
    let results = results.clone();
    tokio::spawn(async move {
        let mut answered = vec![false; paths.len()];
        while let Some((index, outcome)) = answers.recv().await {
            let Some(seen) = answered.get_mut(index) else {
                continue;
            };
            if !*seen {
                *seen = true;
                let path = paths[index].0.clone();
                let _ = results.send(ProbeResult { path, outcome });
            }
        }
        for ((path, _), seen) in paths.into_iter().zip(answered) {
            if !seen {
                let outcome = Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer within {} ms; its probe helper was killed",
                        timeout.as_millis()
                    ),
                ));
                let _ = results.send(ProbeResult { path, outcome });
            }
        }
    });
}

/// The time between ticks.
pub(super) fn interval_of(config: &DiskConfig) -> Duration {
    Duration::from_millis(config.interval_ms.into())
}

/// A ticker that does not catch up on missed ticks.
pub(super) fn new_ticker(every: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// Sleeps until `deadline`, or forever without one.
pub(super) async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// When the oldest outstanding probe times out.
pub(super) fn next_deadline(watch: &Watchlist) -> Option<Instant> {
    let timeout = watch.timeout();
    let fs_deadlines = watch
        .filesystems
        .values()
        .filter(|fs| fs.machine.state() != DiskState::Unresponsive)
        .filter_map(|fs| fs.in_flight.as_ref().map(|(_, since)| *since + timeout));
    let path_deadlines = watch
        .paths
        .iter()
        .filter(|(p, e)| {
            e.dev.is_none()
                && !watch
                    .filesystems
                    .contains_key(&FsKey::Unresolved((*p).clone()))
        })
        .filter_map(|(_, e)| e.in_flight.map(|since| since + timeout));
    fs_deadlines.chain(path_deadlines).min()
}

/// Probes every filesystem through its first path, new and skipped paths,
/// and other paths now and then to notice mounts.
pub(super) fn tick(watch: &mut Watchlist, now: Instant) -> Vec<ProbeRequest> {
    let mut probes = Vec::new();
    let keys: Vec<FsKey> = watch.filesystems.keys().cloned().collect();
    for key in keys {
        let FsKey::Dev(_) = key else { continue };
        // The first member without a probe of its own outstanding: a path
        // stuck elsewhere must not stop its filesystem's samples.
        let Some(representative) = watch
            .members(&key)
            .into_iter()
            .find(|p| watch.paths.get(*p).is_some_and(|e| e.in_flight.is_none()))
            .map(Path::to_path_buf)
        else {
            continue;
        };
        let Some(fs) = watch.filesystems.get_mut(&key) else {
            continue;
        };
        if fs.in_flight.is_some() {
            continue;
        }
        fs.in_flight = Some((representative.clone(), now));
        if let Some(entry) = watch.paths.get_mut(&representative) {
            entry.in_flight = Some(now);
            probes.push(ProbeRequest {
                want_mount: entry.mount.is_none(),
                path: representative,
                isolated: entry.isolated(),
            });
        }
    }
    let resolve_every = interval_of(&watch.config) * RESOLVE_EVERY_TICKS;
    let responsive: BTreeSet<u64> = watch
        .filesystems
        .iter()
        .filter_map(|(key, fs)| match key {
            FsKey::Dev(dev) if fs.machine.state() != DiskState::Unresponsive => Some(*dev),
            _ => None,
        })
        .collect();
    for (path, entry) in &mut watch.paths {
        if entry.in_flight.is_some() {
            continue;
        }
        let due = match entry.dev {
            None => true,
            Some(dev) => {
                responsive.contains(&dev)
                    && entry
                        .last_probe
                        .is_none_or(|last| now.duration_since(last) >= resolve_every)
            }
        };
        if due {
            entry.in_flight = Some(now);
            probes.push(ProbeRequest {
                path: path.clone(),
                want_mount: true,
                isolated: entry.isolated(),
            });
        }
    }
    probes
}

/// Marks filesystems whose probe is older than the timeout unresponsive.
pub(super) fn check_timeouts(watch: &mut Watchlist, alerts: &mut AlertLog, now: Instant) {
    let timeout = watch.timeout();
    let message = format!("no answer within {} ms", timeout.as_millis());
    let mut overdue = Vec::new();
    for (key, fs) in &watch.filesystems {
        if let Some((path, since)) = &fs.in_flight
            && now.duration_since(*since) >= timeout
            && fs.machine.state() != DiskState::Unresponsive
        {
            overdue.push((key.clone(), path.clone()));
        }
    }
    for (key, path) in overdue {
        if let Some(fs) = watch.filesystems.get_mut(&key) {
            fs.error = Some(format!("{} ({})", message, path.display()));
            if let Some(transition) = fs.machine.unresponsive() {
                alerts.record(watch, &key, transition);
            }
        }
    }
    // Paths that never answered, or stopped answering on their own (a hung
    // mount appeared on them): each becomes its own entry.
    let probing: BTreeSet<PathBuf> = watch
        .filesystems
        .values()
        .filter_map(|fs| fs.in_flight.as_ref().map(|(p, _)| p.clone()))
        .collect();
    let stuck: Vec<PathBuf> = watch
        .paths
        .iter()
        .filter(|(p, e)| {
            e.in_flight
                .is_some_and(|since| now.duration_since(since) >= timeout)
                && !probing.contains(*p)
                && !watch
                    .filesystems
                    .contains_key(&FsKey::Unresolved((*p).clone()))
        })
        .map(|(p, _)| p.clone())
        .collect();
    for path in stuck {
        if let Some(entry) = watch.paths.get_mut(&path) {
            entry.dev = None;
            entry.mount = None;
        }
        mark_unresolved(watch, alerts, &path, message.clone());
        alerts.drop_unwatched(watch);
        watch.refresh_thresholds();
    }
}

/// Makes `path` a filesystem entry of its own, unresponsive.
fn mark_unresolved(watch: &mut Watchlist, alerts: &mut AlertLog, path: &Path, error: String) {
    let key = FsKey::Unresolved(path.to_owned());
    let thresholds = Thresholds::for_paths(&watch.config, [path]);
    let fs = watch
        .filesystems
        .entry(key.clone())
        .or_insert_with(|| FsEntry::new(MountInfo::unknown(path), thresholds));
    fs.error = Some(error);
    fs.sampled_at = Some(SystemTime::now());
    if let Some(transition) = fs.machine.unresponsive() {
        alerts.record(watch, &key, transition);
    }
}

/// Takes one probe's answer.
pub(super) fn on_result(
    watch: &mut Watchlist,
    alerts: &mut AlertLog,
    result: ProbeResult,
    now: Instant,
) {
    let ProbeResult { path, outcome } = result;
    for fs in watch.filesystems.values_mut() {
        if fs.in_flight.as_ref().is_some_and(|(p, _)| *p == path) {
            fs.in_flight = None;
        }
    }
    let Some(entry) = watch.paths.get_mut(&path) else {
        // Unregistered while its probe ran.
        alerts.drop_unwatched(watch);
        return;
    };
    let taken_at = entry.in_flight.take().unwrap_or(now);
    entry.last_probe = Some(now);
    match outcome {
        Ok((sample, mount)) => {
            entry.problem = None;
            if entry.dev != Some(sample.dev) {
                entry.dev = Some(sample.dev);
                entry.mount = None;
            }
            if mount.is_some() {
                entry.mount = mount;
            }
            let key = FsKey::Dev(sample.dev);
            if !watch.filesystems.contains_key(&key) {
                let mount = entry
                    .mount
                    .clone()
                    .unwrap_or_else(|| MountInfo::unknown(&path));
                let thresholds = Thresholds::for_paths(&watch.config, [path.as_path()]);
                watch
                    .filesystems
                    .insert(key.clone(), FsEntry::new(mount, thresholds));
            }
            alerts.drop_unwatched(watch);
            watch.refresh_mount(&key);
            // The levels of a memory-backed filesystem follow its size.
            if let Some(fs) = watch.filesystems.get_mut(&key) {
                fs.stats = Some(sample.stats);
            }
            watch.refresh_thresholds();
            let Some(fs) = watch.filesystems.get_mut(&key) else {
                return;
            };
            fs.sampled_at = Some(SystemTime::now());
            fs.error = None;
            if let Some(transition) = fs.machine.observe(&sample.stats, &fs.thresholds, taken_at) {
                alerts.record(watch, &key, transition);
            }
        }
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            if entry.problem.is_none() {
                tracing::info!(path = %path.display(), reasons = ?entry.reasons, "watched path is absent; skipped until it appears");
            }
            entry.problem = Some(error.to_string());
            entry.dev = None;
            entry.mount = None;
            alerts.drop_unwatched(watch);
            watch.refresh_thresholds();
        }
        Err(error) => {
            let message = error.to_string();
            match entry.dev {
                Some(dev) => {
                    let key = FsKey::Dev(dev);
                    if let Some(fs) = watch.filesystems.get_mut(&key) {
                        fs.error = Some(format!("{message} ({})", path.display()));
                        fs.sampled_at = Some(SystemTime::now());
                        if let Some(transition) = fs.machine.unresponsive() {
                            alerts.record(watch, &key, transition);
                        }
                    }
                }
                None => mark_unresolved(watch, alerts, &path, message),
            }
        }
    }
}

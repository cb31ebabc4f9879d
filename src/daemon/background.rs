//! The daemon's own background loops: GPU discovery, the Docker engine
//! monitor, systemd's `STATUS=` line and watchdog (its proof of progress in
//! `watchdog`), the event backlog's live capacity, and the disk guard
//! following the mounts' cache dirs.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Adapters, derive};
use crate::config::Config;
use crate::events::EventBus;
use crate::health::Health;
use crate::mounts::MountService;
use crate::status::StatusProvider;
use crate::systemd::Notifier;

/// Keeps the disk guard watching the file cache of every managed mount.
pub(super) async fn watch_cache_dirs(
    mounts: MountService,
    disk: crate::disk::DiskGuard,
    cancel: CancellationToken,
) {
    let mut dirs = mounts.watch_cache_dirs();
    // Registered as (path, reason); the guard unregisters by the same reason.
    let mut watched: Vec<(std::path::PathBuf, String)> = Vec::new();
    loop {
        let now: Vec<(std::path::PathBuf, String)> = dirs
            .borrow_and_update()
            .iter()
            .map(|d| (d.path.clone(), format!("cache of mount {}", d.name)))
            .collect();
        for (path, reason) in &watched {
            if !now.contains(&(path.clone(), reason.clone())) {
                disk.unregister(path.clone(), reason);
            }
        }
        for (path, reason) in &now {
            if !watched.contains(&(path.clone(), reason.clone())) {
                disk.register(path.clone(), reason.clone());
            }
        }
        watched = now;
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = dirs.changed() => if changed.is_err() { return },
        }
    }
}

/// Spawns the loops that run from READY until cancelled.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_background(
    tasks: &TaskTracker,
    cancel: &CancellationToken,
    adapters: &Adapters,
    health: &Health,
    status: &StatusProvider,
    events: &EventBus,
    (gpus, gpus_discovered): (watch::Sender<Vec<crate::host::Gpu>>, watch::Sender<bool>),
    engine_up: watch::Sender<bool>,
    config: watch::Receiver<Arc<Config>>,
    store: &crate::store::Store,
) {
    tasks.spawn_blocking(move || {
        let found = crate::host::discover_gpus();
        if !found.is_empty() {
            tracing::info!(count = found.len(), "GPUs found");
        }
        gpus.send_replace(found);
        // After the list: a reader that sees "discovered" sees the list.
        gpus_discovered.send_replace(true);
    });

    let docker_interval = derive(&config, |c| {
        Duration::from_secs(c.docker.check_interval_seconds.into())
    });
    tasks.spawn(crate::jobs::engine_monitor::run(
        adapters.engine.clone(),
        health.clone(),
        engine_up,
        docker_interval,
        cancel.clone(),
    ));

    let status_interval = derive(&config, |c| {
        Duration::from_secs(c.agent.status_interval_seconds.into())
    });
    tasks.spawn(report_status(
        status.clone(),
        status_interval,
        cancel.clone(),
    ));

    if let Some(interval) = Notifier.watchdog_interval() {
        let store = store.clone();
        tasks.spawn(super::watchdog::run(
            interval,
            move || super::watchdog::progress(store.clone()),
            || Notifier.watchdog(),
            cancel.clone(),
        ));
    }

    let events = events.clone();
    let mut backlog_config = config;
    let cancel = cancel.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = backlog_config.changed() => {
                    if changed.is_err() { return; }
                    let capacity = backlog_config.borrow_and_update().events.backlog;
                    events.set_capacity(capacity as usize);
                }
            }
        }
    });
}

/// Keeps systemd's `STATUS=` line equal to the status summary.
async fn report_status(
    status: StatusProvider,
    mut interval: watch::Receiver<Duration>,
    cancel: CancellationToken,
) {
    let mut last = String::new();
    loop {
        let summary = status.status_line();
        if summary != last {
            Notifier.status(&summary);
            last = summary;
        }
        let every = *interval.borrow_and_update();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            Ok(()) = interval.changed() => {}
        }
    }
}

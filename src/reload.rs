//! Live config reload: on SIGHUP and whenever the config file changes (seen
//! through inotify on its directory, since editors replace files rather than
//! write them in place), the file is read and validated again. A valid config
//! is published to the running tasks; keys that cannot change live are
//! logged as needing a restart and keep their old values. An invalid file is
//! logged and ignored: a typo must not take a running agent down.

use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigChanges};
use crate::daemon::{ConfigSource, describe_changes};

/// Bursts of file events (an editor's write, rename and chmod) within this
/// window cause one reload.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Starts listening for SIGHUP. Called before the socket is bound: from then
/// on a SIGHUP is queued for [`run`] instead of killing the process (the
/// default action), and none sent once the agent answers is lost.
pub fn listen_hangup() -> Option<Signal> {
    signal(SignalKind::hangup())
        .map_err(
            |error| tracing::warn!(%error, "cannot listen for SIGHUP; reload only on file change"),
        )
        .ok()
}

/// Runs until `cancel` fires.
pub async fn run(
    source: ConfigSource,
    config: watch::Sender<Arc<Config>>,
    mut hangup: Option<Signal>,
    cancel: CancellationToken,
) {
    let (file_tx, mut file_rx) = mpsc::channel::<()>(1);
    let _watcher = watch_file(&source, file_tx);

    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading config");
            }
            Some(()) = file_rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while file_rx.try_recv().is_ok() {}
                tracing::info!(path = %source.path.display(), "config file changed: reloading");
            }
        }
        let current = config.borrow().clone();
        match source.load() {
            Ok(new) => {
                let changes = ConfigChanges::between(&current, &new);
                describe_changes(&changes);
                if changes.live.is_empty() {
                    continue;
                }
                // Only live keys move; the rest keep their running values.
                let mut applied = (*current).clone();
                apply_live(&mut applied, &new);
                config.send_replace(Arc::new(applied));
            }
            Err(error) => {
                tracing::error!(%error, "config reload refused; keeping the running config")
            }
        }
    }
}

/// Copies the live keys of `new` into `running`.
fn apply_live(running: &mut Config, new: &Config) {
    running.agent.status_interval_seconds = new.agent.status_interval_seconds;
    running.docker.check_interval_seconds = new.docker.check_interval_seconds;
    running.events.backlog = new.events.backlog;
    running.jobs = new.jobs.clone();
    running.control_plane.uids = new.control_plane.uids.clone();
    running.operator.allow_cancel_job = new.operator.allow_cancel_job;
    running.limits.max_streams_per_peer = new.limits.max_streams_per_peer;
    running.limits.requests_per_second_per_peer = new.limits.requests_per_second_per_peer;
    running.limits.request_burst_per_peer = new.limits.request_burst_per_peer;
    running.mounts.health_interval_seconds = new.mounts.health_interval_seconds;
    running.disk = new.disk.clone();
}

/// Watches the config file's directory; `None` when it cannot (then SIGHUP
/// still works).
fn watch_file(source: &ConfigSource, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let dir = source.path.parent()?.to_owned();
    let name = source.path.file_name()?.to_owned();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(name.as_os_str()))
        {
            // A full channel already holds a pending reload.
            let _ = tx.try_send(());
        }
    })
    .map_err(|error| tracing::warn!(%error, "cannot watch the config file"))
    .ok()?;
    if let Err(error) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::debug!(%error, dir = %dir.display(), "config directory not watched");
        return None;
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_keys_are_exactly_the_ones_applied() {
        // Every key ConfigChanges calls live must be copied by apply_live, or
        // a reload would announce a change it never makes.
        let old = Config::default();
        let mut new = old.clone();
        new.agent.status_interval_seconds = 7;
        new.docker.check_interval_seconds = 3;
        new.events.backlog = 100;
        new.agent.socket = "/tmp/x.sock".into();
        let changes = ConfigChanges::between(&old, &new);
        let mut running = old.clone();
        apply_live(&mut running, &new);
        assert_eq!(
            ConfigChanges::between(&running, &new).live,
            Vec::<String>::new()
        );
        assert_eq!(changes.need_restart, vec!["agent.socket"]);
        assert_eq!(running.agent.socket, old.agent.socket);
    }
}

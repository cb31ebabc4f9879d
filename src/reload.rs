//! Live config reload: on SIGHUP and whenever the config file changes (seen
//! through inotify on its directory, since editors replace files rather than
//! write them in place), the file is read and validated again. A valid config
//! is published to the running tasks; keys that cannot change live are
//! logged as needing a restart and keep their old values. An invalid file is
//! logged and ignored: a typo must not take a running agent down.
//!
//! Owns where the config came from ([`ConfigSource`]), so that `main` and the
//! reload loop read it the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigChanges, ConfigError, Overrides};

/// Bursts of file events (an editor's write, rename and chmod) within this
/// window cause one reload.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Where the config came from, so it can be reloaded.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The file.
    pub path: PathBuf,
    /// Whether the file must exist (it was named on the command line).
    pub must_exist: bool,
    /// Flags that override it.
    pub overrides: Overrides,
}

impl ConfigSource {
    /// Reads and validates the file with the overrides applied.
    pub fn load(&self) -> Result<Config, ConfigError> {
        self.load_noting_derived().map(|(config, _)| config)
    }

    /// [`ConfigSource::load`], also returning the keys that `--state-dir`
    /// moved under the state dir (see [`Config::apply`]), for the start log.
    pub fn load_noting_derived(&self) -> Result<(Config, Vec<&'static str>), ConfigError> {
        let mut config = Config::load(&self.path, self.must_exist)?;
        let derived = config.apply(&self.overrides);
        config.validate(Path::new("<command-line flags>"))?;
        Ok((config, derived))
    }
}

/// Logs what a reload changed. Separate from the reload task so it can be tested.
pub fn describe_changes(changes: &ConfigChanges) {
    if !changes.live.is_empty() {
        tracing::info!(keys = ?changes.live, "config reloaded; applied live");
    }
    if !changes.need_restart.is_empty() {
        tracing::warn!(keys = ?changes.need_restart, "config changed keys that take effect only after a restart");
    }
    if changes.live.is_empty() && changes.need_restart.is_empty() {
        tracing::info!("config reloaded; nothing changed");
    }
}

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
    let mut file_watch = FileWatch::start(&source, file_tx.clone());

    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading config");
            }
            Some(()) = file_rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while file_rx.try_recv().is_ok() {}
                if file_watch.as_ref().is_some_and(|w| !w.on_config_dir) {
                    // Something on the way to the config directory changed:
                    // watch it once it exists.
                    file_watch = FileWatch::start(&source, file_tx.clone());
                }
                tracing::info!(path = %source.path.display(), "config file changed: reloading");
            }
        }
        let current = config.borrow().clone();
        match source.load() {
            Ok(new) => {
                let changes = ConfigChanges::between(&current, &new);
                if !changes.live.is_empty() {
                    // Only live keys move; the rest keep their running values.
                    let mut applied = (*current).clone();
                    apply_live(&mut applied, &new);
                    config.send_replace(Arc::new(applied));
                }
                // Logged once published: "applied live" means it is.
                describe_changes(&changes);
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
    running.images.pull_policy = new.images.pull_policy;
    running.images.max_concurrent_pulls = new.images.max_concurrent_pulls;
    running.images.pull_timeout_seconds = new.images.pull_timeout_seconds;
    running.images.prefetch_queued = new.images.prefetch_queued;
    running.control_plane.uids = new.control_plane.uids.clone();
    running.operator.allow_cancel_job = new.operator.allow_cancel_job;
    running.limits.max_streams_per_peer = new.limits.max_streams_per_peer;
    running.limits.requests_per_second_per_peer = new.limits.requests_per_second_per_peer;
    running.limits.request_burst_per_peer = new.limits.request_burst_per_peer;
    running.mounts.health_interval_seconds = new.mounts.health_interval_seconds;
    // Read at each use; `apps.network` is not: running containers stay on
    // the network they joined.
    running.apps.allowed_host_ips = new.apps.allowed_host_ips.clone();
    running.apps.stop_grace_seconds = new.apps.stop_grace_seconds;
    running.apps.max_apps = new.apps.max_apps;
    running.apps.log_tail_bytes = new.apps.log_tail_bytes;
    running.disk = new.disk.clone();
}

/// The inotify watch behind file-change reloads.
struct FileWatch {
    /// Dropping it ends the watch.
    _watcher: notify::RecommendedWatcher,
    /// False while the config directory does not exist and its nearest
    /// existing ancestor is watched instead.
    on_config_dir: bool,
}

impl FileWatch {
    /// Watches the config file's directory (editors replace files rather than
    /// write them in place, so the file itself cannot be watched) or, while
    /// that directory does not exist, its nearest existing ancestor, to catch
    /// the directory's creation. `None` when nothing can be watched; SIGHUP
    /// still works then.
    fn start(source: &ConfigSource, tx: mpsc::Sender<()>) -> Option<Self> {
        let config_dir = source.path.parent()?.to_owned();
        let dir = config_dir.ancestors().find(|dir| dir.is_dir())?.to_owned();
        let on_config_dir = dir == config_dir;
        let config_path = source.path.clone();
        let mut watcher = notify::recommended_watcher(
            move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if event.kind.is_access() {
                    return;
                }
                // The file itself, or (watching an ancestor) a directory on
                // the way to it.
                if event.paths.iter().any(|p| config_path.starts_with(p)) {
                    // A full channel already holds a pending reload.
                    let _ = tx.try_send(());
                }
            },
        )
        .map_err(
            |error| tracing::warn!(%error, "cannot watch the config file; reload on SIGHUP only"),
        )
        .ok()?;
        if let Err(error) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(%error, dir = %dir.display(), "cannot watch the config directory; reload on SIGHUP only");
            return None;
        }
        if !on_config_dir {
            tracing::info!(
                config_dir = %config_dir.display(),
                watching = %dir.display(),
                "the config directory does not exist yet; watching for it to appear"
            );
        }
        Some(Self {
            _watcher: watcher,
            on_config_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::live::{LIVE_KEYS, flatten, is_live};

    /// `value` changed, keeping its TOML type (`None` when no change fits).
    fn changed(value: &toml::Value) -> Vec<toml::Value> {
        use toml::Value;
        match value {
            Value::Integer(i) => vec![Value::Integer(i + 1), Value::Integer(i.saturating_sub(1))],
            Value::Float(f) => vec![Value::Float(f + 0.5)],
            Value::Boolean(b) => vec![Value::Boolean(!b)],
            // The other value of a two-valued enum key (images.pull_policy).
            Value::String(text) => vec![
                Value::String(format!("{text}x")),
                Value::String("always".into()),
            ],
            Value::Array(items) => {
                let mut longer = items.clone();
                longer.push(items.first().cloned().unwrap_or(Value::Integer(1000)));
                let mut as_strings = items.clone();
                as_strings.push(Value::String("x".into()));
                vec![
                    Value::Array(longer),
                    Value::Array(as_strings),
                    Value::Array(Vec::new()),
                ]
            }
            _ => Vec::new(),
        }
    }

    /// Sets the dotted `key` of a serialised config.
    fn set(root: &mut toml::Value, key: &str, value: toml::Value) {
        let mut table = root;
        let mut parts = key.split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                table[part] = value;
                return;
            }
            table = &mut table[part];
        }
    }

    #[test]
    fn every_live_key_is_applied_and_no_other() {
        // LIVE_KEYS (what a reload announces as live) and apply_live (what
        // it does) must agree key by key: change each key of the config on
        // its own and look at what apply_live copies.
        let old = Config::default();
        let old_flat = flatten(&old);
        let mut exercised = std::collections::BTreeSet::<&str>::new();
        for (key, value) in &old_flat {
            let new = changed(value).into_iter().find_map(|candidate| {
                let mut root = toml::Value::try_from(&old).expect("serialises");
                set(&mut root, key, candidate);
                root.try_into::<Config>().ok()
            });
            let Some(new) = new else { continue };
            if flatten(&new).get(key) == Some(value) {
                continue;
            }
            let mut running = old.clone();
            apply_live(&mut running, &new);
            let applied = flatten(&running).get(key) != Some(value);
            assert_eq!(
                applied,
                is_live(key),
                "{key}: applied {applied}, listed live {}",
                is_live(key)
            );
            if applied {
                exercised.extend(LIVE_KEYS.iter().copied().filter(|live| {
                    key == *live
                        || live
                            .strip_suffix('.')
                            .is_some_and(|t| key.starts_with(&format!("{t}.")))
                }));
            }
        }
        let missed: Vec<_> = LIVE_KEYS
            .iter()
            .filter(|k| !exercised.contains(**k))
            .collect();
        assert!(missed.is_empty(), "live keys never exercised: {missed:?}");
    }

    fn source_at(path: std::path::PathBuf) -> ConfigSource {
        ConfigSource {
            path,
            must_exist: false,
            overrides: Overrides::default(),
        }
    }

    /// Runs the reload loop on `source` and waits until the file changes
    /// `docker.check_interval_seconds` live, writing it with `write`.
    async fn reloads_on_file_change(source: ConfigSource, write: impl FnOnce()) {
        let (tx, mut rx) = watch::channel(Arc::new(Config::default()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(source, tx, None, cancel.clone()));
        // Let the loop start its watch.
        tokio::time::sleep(Duration::from_millis(200)).await;
        write();
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                rx.changed().await.expect("sender alive");
                if rx.borrow().docker.check_interval_seconds == 3 {
                    break;
                }
            }
        })
        .await
        .expect("the change was applied without SIGHUP");
        cancel.cancel();
        task.await.expect("loop ends");
    }

    #[tokio::test]
    async fn a_saved_file_is_reloaded_without_sighup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "").expect("write");
        let file = path.clone();
        reloads_on_file_change(source_at(path), move || {
            std::fs::write(&file, "[docker]\ncheck_interval_seconds = 3\n").expect("write");
        })
        .await;
    }

    #[tokio::test]
    async fn a_config_dir_created_after_the_start_is_watched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_dir = dir.path().join("etc/instance-agent");
        let path = config_dir.join("config.toml");
        let file = path.clone();
        reloads_on_file_change(source_at(path), move || {
            std::fs::create_dir_all(&config_dir).expect("mkdir");
            std::fs::write(&file, "[docker]\ncheck_interval_seconds = 3\n").expect("write");
        })
        .await;
    }
}

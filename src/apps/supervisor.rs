//! One app's life: wait until it may start (engine, admission gate, mounts,
//! slots), get the image, pick ports, create and start the container, then
//! hand it to the monitor (`monitor.rs`); after an exit or failed health,
//! restart by policy with backoff (1 s doubling to 5 min, reset after 10
//! min READY); carry out RestartApp, a changed spec (rolling or
//! stop-then-start) and RemoveApp.
//!
//! The only writer of its app's record. A stopping agent leaves the
//! container running (it is adopted at the next start).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::engine::{AppContainer, Published};
use super::images::AppImageError;
use super::manager::{AppHandle, AppManager, Command, RECORDS, Rollout, holds_slots, slot_holder};
use super::ports::{self, PortError};
use super::record::{AppRecord, AppState};
use super::recovery::Found;
use super::spec::{AppSpec, RestartPolicy};
use super::{LABEL_APP, LABEL_APP_GENERATION, LABEL_APP_INSTANCE};
use crate::jobs::MountResolution;
use crate::jobs::engine::{Bind, EngineError};
use crate::jobs::spec::{MountSource, confine_host_path};
use crate::store::Write;

/// First restart delay.
const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// READY this long resets the delay.
const BACKOFF_RESET: Duration = Duration::from_secs(600);
/// How often a PENDING app looks again at what it waits for (mounts and
/// slots have no change signal of their own).
const PENDING_RECHECK: Duration = Duration::from_secs(1);

/// Where a watched container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Not yet READY; failures do not count until this deadline.
    Startup(Instant),
    /// Has been READY: failures count.
    Serving,
}

/// Why watching ended.
pub(super) enum End {
    /// The container exited with this status.
    Exited(i64),
    /// Health failed and the policy restarts (or the startup timed out).
    Unhealthy(String),
    /// READY (only when watching a rolling replace's new container).
    Ready,
    /// A command arrived.
    Command(Command),
    /// The agent stops.
    Shutdown,
}

/// What the supervisor does next.
pub(super) enum Next {
    /// Wait until it may start, then start a container.
    Start,
    /// Watch a running container.
    Monitor(String, Phase),
    /// The container exited.
    Exited(String, i64),
    /// Health failed and the policy restarts.
    Unhealthy(String, String),
    /// Not running; wait for a command.
    Idle,
    /// Carry out a command.
    Command(Command),
    /// The agent stops.
    Stop,
}

/// Why a start did not happen.
pub(super) enum LaunchError {
    /// It will not work until the spec or the host changes: FAILED.
    Fail(String),
    /// It may work later: restart by policy.
    Retry(String),
}

/// An app's supervisor.
pub(super) struct Supervisor {
    pub(super) manager: AppManager,
    pub(super) handle: Arc<AppHandle>,
    pub(super) mailbox: mpsc::UnboundedReceiver<Command>,
    backoff: Duration,
    pub(super) ready_since: Option<Instant>,
}

impl AppManager {
    /// Starts the app's supervisor (once; later calls do nothing).
    pub(super) fn spawn_supervisor(&self, handle: &Arc<AppHandle>, adopt: Option<Found>) {
        let mailbox = handle
            .mailbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mailbox) = mailbox {
            let supervisor =
                super::supervisor::Supervisor::new(self.clone(), handle.clone(), mailbox);
            self.inner.tasks.spawn(supervisor.run(adopt));
        }
    }
}

impl Supervisor {
    pub(super) fn new(
        manager: AppManager,
        handle: Arc<AppHandle>,
        mailbox: mpsc::UnboundedReceiver<Command>,
    ) -> Self {
        Self {
            manager,
            handle,
            mailbox,
            backoff: BACKOFF_START,
            ready_since: None,
        }
    }

    pub(super) fn record(&self) -> AppRecord {
        self.handle.record.borrow().clone()
    }

    fn name(&self) -> String {
        self.handle.record.borrow().name().to_owned()
    }

    /// Changes the record; when `f` says something changed, saves and
    /// publishes it.
    pub(super) async fn update(&self, f: impl FnOnce(&mut AppRecord) -> bool) {
        let mut changed = false;
        self.handle.record.send_modify(|r| changed = f(r));
        if changed {
            self.save().await;
            self.manager.publish(&self.record());
        }
    }

    /// Saves the record (a failed write is logged; the next change tries again).
    pub(super) async fn save(&self) {
        let record = self.record();
        if let Err(error) = self
            .manager
            .inner
            .deps
            .store
            .apply(vec![Write::put(RECORDS, record.name(), &record)])
            .await
        {
            tracing::warn!(app = %record.name(), %error, "cannot save the app's record");
        }
    }

    /// Runs the app until it is removed or the agent stops.
    pub(super) async fn run(mut self, adopt: Option<Found>) {
        let mut next = self.first(adopt).await;
        loop {
            next = match next {
                Next::Start => self.start().await,
                Next::Monitor(id, phase) => match self.monitor(&id, phase, true).await {
                    End::Exited(code) => Next::Exited(id, code),
                    End::Unhealthy(reason) => Next::Unhealthy(id, reason),
                    End::Ready => Next::Monitor(id, Phase::Serving),
                    End::Command(command) => Next::Command(command),
                    End::Shutdown => Next::Stop,
                },
                Next::Exited(id, code) => self.after_exit(&id, code).await,
                Next::Unhealthy(id, reason) => {
                    let grace = self.grace();
                    let _ = self.manager.inner.deps.engine.stop(&id, grace).await;
                    self.restart_later(reason).await
                }
                Next::Idle => tokio::select! {
                    _ = self.manager.inner.shutdown.cancelled() => Next::Stop,
                    command = self.mailbox.recv() => command.map_or(Next::Stop, Next::Command),
                },
                Next::Command(Command::Remove(done)) => {
                    self.remove().await;
                    let _ = done.send(());
                    return;
                }
                Next::Command(command) => self.command(command).await,
                Next::Stop => return,
            };
        }
    }

    /// Where to begin: finish a removal, adopt, handle an exit seen at
    /// adoption, keep a stopped app stopped, or start.
    async fn first(&mut self, adopt: Option<Found>) -> Next {
        let record = self.record();
        if record.removing {
            self.remove().await;
            return Next::Stop;
        }
        match (record.state, adopt) {
            (AppState::Stopped | AppState::Failed, _) => Next::Idle,
            (_, Some(found)) if found.state == "running" => {
                let phase = if record.state == AppState::Ready {
                    self.ready_since = Some(Instant::now());
                    Phase::Serving
                } else {
                    Phase::Startup(self.startup_deadline(&record))
                };
                self.update(|r| {
                    r.container_id = found.id.clone();
                    r.reason.push_str(" (adopted after an agent restart)");
                    true
                })
                .await;
                Next::Monitor(found.id, phase)
            }
            (_, Some(found)) if found.state == "created" => {
                // Created but never started (a crash in between).
                let _ = self.manager.inner.deps.engine.remove(&found.id).await;
                Next::Start
            }
            (_, Some(found)) => {
                let code = match self.manager.inner.deps.engine.inspect(&found.id).await {
                    Ok(Some(status)) => status.exit_code.unwrap_or(-1),
                    _ => -1,
                };
                Next::Exited(found.id, code)
            }
            (_, None) if !record.container_id.is_empty() => {
                self.end(
                    AppState::Stopped,
                    "its container was removed while the agent was down; not restarted (RestartApp or DeployApp starts it again)".into(),
                )
                .await
            }
            (_, None) => Next::Start,
        }
    }

    /// The startup deadline of a container started at `record.started`.
    fn startup_deadline(&self, record: &AppRecord) -> Instant {
        let window = Duration::from_secs(record.spec.health.startup().into());
        let elapsed = record
            .started
            .and_then(|s| SystemTime::now().duration_since(s).ok())
            .unwrap_or_default();
        Instant::now() + window.saturating_sub(elapsed)
    }

    fn grace(&self) -> Duration {
        Duration::from_secs(self.manager.config().stop_grace_seconds.into())
    }

    /// Ends the app for good (until a command): FAILED or STOPPED, slots freed.
    async fn end(&mut self, state: AppState, reason: String) -> Next {
        self.manager
            .inner
            .deps
            .slots
            .release(&slot_holder(&self.name()));
        self.ready_since = None;
        self.update(|r| r.transition(state, reason)).await;
        Next::Idle
    }

    /// What keeps the app from starting now, if anything (slots last, so
    /// that they are held only once nothing else blocks).
    fn blocker(&self) -> Option<String> {
        let deps = &self.manager.inner.deps;
        if !*deps.engine_up.borrow() {
            return Some("waiting for the docker engine".into());
        }
        if let Some(held) = deps.admission.held_reason() {
            return Some(format!("new starts are held ({held})"));
        }
        let record = self.record();
        for mount in &record.spec.mounts {
            if let MountSource::Managed(name) = &mount.source {
                match deps.mounts.resolve(name) {
                    MountResolution::Ready(_) => {}
                    MountResolution::Unavailable(why) => {
                        return Some(format!("waiting for mount {name:?}: {why}"));
                    }
                    MountResolution::Unknown => {
                        return Some(format!("waiting for mount {name:?}: it is not known"));
                    }
                }
            }
        }
        if !deps
            .slots
            .try_hold(&slot_holder(record.name()), record.spec.slots)
        {
            return Some(format!("waiting for {} free job slots", record.spec.slots));
        }
        None
    }

    /// PENDING until nothing blocks, then PULLING and STARTING.
    async fn start(&mut self) -> Next {
        let mut admission = self.manager.inner.deps.admission.subscribe();
        let mut engine_up = self.manager.inner.deps.engine_up.clone();
        while let Some(reason) = self.blocker() {
            self.update(|r| r.transition(AppState::Pending, reason))
                .await;
            tokio::select! {
                _ = self.manager.inner.shutdown.cancelled() => return Next::Stop,
                command = self.mailbox.recv() => return command.map_or(Next::Stop, Next::Command),
                Ok(()) = admission.changed() => {}
                Ok(()) = engine_up.changed() => {}
                _ = tokio::time::sleep(PENDING_RECHECK) => {}
            }
        }
        let record = self.record();
        let taken = self.ports_of_other_apps(record.name());
        let host_ports = match assign_ports(&record.spec, &record.host_ports, &taken) {
            Ok(ports) => ports,
            Err(error) => return self.end(AppState::Failed, error.to_string()).await,
        };
        let generation = record.generation;
        match self.launch(&record.spec, generation, host_ports).await {
            Ok((id, _)) => {
                let phase = Phase::Startup(Instant::now() + startup_window(&record.spec));
                Next::Monitor(id, phase)
            }
            Err(LaunchError::Fail(reason)) => self.end(AppState::Failed, reason).await,
            Err(LaunchError::Retry(reason)) => self.restart_later(reason).await,
        }
    }

    /// Host ports held by other apps (so that a picked port never collides).
    pub(super) fn ports_of_other_apps(&self, name: &str) -> Vec<u32> {
        self.manager
            .apps()
            .iter()
            .filter(|(other, _)| other.as_str() != name)
            .flat_map(|(_, h)| {
                let record = h.record.borrow();
                if holds_slots(record.state) {
                    record.host_ports.values().copied().collect()
                } else {
                    Vec::new()
                }
            })
            .collect()
    }

    /// Gets the image, records the intent, creates and starts the container
    /// of `generation`; on success the record runs it (STARTING). The
    /// container's id and the image digest it runs.
    pub(super) async fn launch(
        &mut self,
        spec: &AppSpec,
        generation: u64,
        host_ports: BTreeMap<String, u32>,
    ) -> Result<(String, String), LaunchError> {
        let engine = self.manager.inner.deps.engine.clone();
        let rolling = generation != self.record().generation;
        if !rolling {
            self.update(|r| {
                r.transition(AppState::Pulling, format!("getting image {}", spec.image))
            })
            .await;
        }
        // Pull progress goes to the reason (in memory: not a state change);
        // a rolling replace keeps the serving record's.
        let handle = self.handle.clone();
        let progress = move |line: String| {
            if !rolling {
                handle.record.send_modify(|r| r.reason = line);
            }
        };
        let images = self.manager.inner.deps.images.clone();
        let image = images
            .ensure(&spec.image, &progress)
            .await
            .map_err(|e| match e {
                AppImageError::Failed(reason) => LaunchError::Fail(reason),
                AppImageError::Retry(reason) => LaunchError::Retry(reason),
            })?;
        let digest = image.digest.clone();
        let binds = self.binds(spec).await?;
        let network = self.manager.config().network;
        engine
            .ensure_network(&network)
            .await
            .map_err(|e| LaunchError::Retry(format!("cannot prepare network {network}: {e}")))?;
        let mut container = self.container_spec(spec, generation, &host_ports, binds, network);
        // Exactly the image whose digest is recorded.
        container.image = image.run;
        if !rolling {
            // The intent first: a crash from here on is found by label.
            self.update(|r| {
                r.host_ports = host_ports.clone();
                r.container_id.clear();
                r.transition(AppState::Starting, "creating the container")
            })
            .await;
        }
        let id = match engine.create(&container).await {
            Err(EngineError::NameInUse(_)) => {
                // Left by a crash before the id was recorded.
                let _ = engine.remove(&container.name).await;
                engine.create(&container).await
            }
            other => other,
        }
        .map_err(|e| match e {
            EngineError::NotFound { .. } => LaunchError::Fail(e.to_string()),
            other => LaunchError::Retry(format!("cannot create the container: {other}")),
        })?;
        if let Err(error) = engine.start(&id).await {
            let _ = engine.remove(&id).await;
            let message = error.to_string();
            return Err(
                if message.contains("address already in use")
                    || message.contains("port is already allocated")
                {
                    LaunchError::Fail(format!(
                        "a host port of {} is already in use: {message}",
                        describe_ports(&host_ports)
                    ))
                } else {
                    LaunchError::Retry(format!("cannot start the container: {message}"))
                },
            );
        }
        if !rolling {
            let probed = spec.health.probe != super::spec::Probe::None;
            self.update(|r| {
                r.container_id = id.clone();
                r.image_digest = digest.clone();
                r.started = Some(SystemTime::now());
                r.last_probe = None;
                r.transition(
                    AppState::Starting,
                    if probed {
                        "container started; waiting for its health check"
                    } else {
                        "container started"
                    },
                )
            })
            .await;
        }
        Ok((id, digest))
    }

    /// The container's binds: managed mounts must be mounted, host paths
    /// resolve under the allowed roots (off the runtime: it walks paths).
    async fn binds(&self, spec: &AppSpec) -> Result<Vec<Bind>, LaunchError> {
        let mut binds = Vec::new();
        let roots = self.manager.inner.deps.host_roots.borrow().clone();
        for (i, mount) in spec.mounts.iter().enumerate() {
            let source = match &mount.source {
                MountSource::Managed(name) => {
                    match self.manager.inner.deps.mounts.verify(name).await {
                        MountResolution::Ready(path) => path,
                        MountResolution::Unavailable(why) => {
                            return Err(LaunchError::Retry(format!(
                                "mount {name:?} is not usable: {why}"
                            )));
                        }
                        MountResolution::Unknown => {
                            return Err(LaunchError::Fail(format!(
                                "no managed mount named {name:?}"
                            )));
                        }
                    }
                }
                MountSource::HostPath(path) => {
                    let field = format!("mounts[{i}].host_path");
                    let (path, roots) = (path.clone(), roots.clone());
                    // Docker gets only a path no user but root can change
                    // (checked on the held object); apps do not stage user
                    // paths as jobs do, so such a path is refused.
                    tokio::task::spawn_blocking(move || {
                        let held =
                            confine_host_path(&field, &path, &roots).map_err(|e| e.to_string())?;
                        match held.changeable() {
                            Ok(None) => Ok(held.path().to_owned()),
                            Ok(Some(who)) => Err(format!(
                                "{field}: {} can be changed by a user other than root ({who}); \
                                 apps bind only paths root alone can change",
                                held.path().display()
                            )),
                            Err(e) => Err(format!(
                                "{field}: {} cannot be checked: {e}",
                                held.path().display()
                            )),
                        }
                    })
                    .await
                    .map_err(|e| LaunchError::Retry(e.to_string()))?
                    .map_err(LaunchError::Fail)?
                }
            };
            binds.push(Bind {
                source,
                target: mount.container_path.clone(),
                read_only: mount.read_only,
            });
        }
        Ok(binds)
    }

    fn container_spec(
        &self,
        spec: &AppSpec,
        generation: u64,
        host_ports: &BTreeMap<String, u32>,
        binds: Vec<Bind>,
        network: String,
    ) -> AppContainer {
        let instance = &self.manager.inner.deps.instance_id;
        AppContainer {
            name: container_name(instance, &spec.name, generation),
            image: spec.image.clone(),
            command: spec.command.clone(),
            env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            labels: [
                (LABEL_APP_INSTANCE, instance.clone()),
                (LABEL_APP, spec.name.clone()),
                (LABEL_APP_GENERATION, generation.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            memory_bytes: spec.memory_bytes,
            nano_cpus: u64::from(spec.cpu_millis) * 1_000_000,
            network,
            binds,
            gpus: Vec::new(),
            ports: spec
                .ports
                .iter()
                .filter_map(|p| {
                    host_ports.get(&p.name).map(|host_port| Published {
                        container_port: p.container_port,
                        host_ip: p.host_ip.clone(),
                        host_port: *host_port,
                    })
                })
                .collect(),
        }
    }

    /// After an exit: restart by policy, or end STOPPED (status 0) or FAILED.
    async fn after_exit(&mut self, id: &str, code: i64) -> Next {
        let tail = self.log_tail(id).await;
        let mut reason = format!("exited with status {code}");
        if !tail.is_empty() {
            reason.push_str(&format!("; last output: {tail}"));
        }
        self.handle.record.send_modify(|r| r.last_exit = Some(code));
        let restart = match self.record().spec.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != 0,
            RestartPolicy::Never => false,
        };
        if restart {
            return self.restart_later(reason).await;
        }
        let state = if code == 0 {
            AppState::Stopped
        } else {
            AppState::Failed
        };
        self.end(state, reason).await
    }

    /// BACKOFF for the current delay (doubling, reset after 10 min READY),
    /// then the old container is removed and a new one started.
    async fn restart_later(&mut self, reason: String) -> Next {
        if self
            .ready_since
            .is_some_and(|t| t.elapsed() >= BACKOFF_RESET)
        {
            self.backoff = BACKOFF_START;
        }
        self.ready_since = None;
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.update(|r| {
            r.restarts += 1;
            let n = r.restarts;
            r.transition(
                AppState::Backoff,
                format!("{reason}; restart {n} in {}s", delay.as_secs()),
            )
        })
        .await;
        tokio::select! {
            _ = self.manager.inner.shutdown.cancelled() => return Next::Stop,
            command = self.mailbox.recv() => return command.map_or(Next::Stop, Next::Command),
            _ = tokio::time::sleep(delay) => {}
        }
        self.discard_container().await;
        Next::Start
    }

    /// Stops and removes the current container, if any.
    async fn discard_container(&mut self) {
        let id = self.record().container_id;
        if id.is_empty() {
            return;
        }
        let engine = self.manager.inner.deps.engine.clone();
        let _ = engine.stop(&id, self.grace()).await;
        if let Err(error) = engine.remove(&id).await {
            tracing::warn!(app = %self.name(), %error, "cannot remove the app's old container");
        }
        self.handle.record.send_modify(|r| r.container_id.clear());
        self.save().await;
    }

    /// RestartApp and a changed spec.
    async fn command(&mut self, command: Command) -> Next {
        match command {
            Command::Restart => {
                self.discard_container().await;
                self.backoff = BACKOFF_START;
                self.ready_since = None;
                Next::Start
            }
            Command::Replace(spec, Rollout::Rolling) if !self.record().container_id.is_empty() => {
                self.rolling_replace(*spec).await
            }
            Command::Replace(spec, _) => {
                self.discard_container().await;
                self.manager
                    .inner
                    .deps
                    .slots
                    .release(&slot_holder(&self.name()));
                self.backoff = BACKOFF_START;
                self.ready_since = None;
                self.update(|r| {
                    apply_spec(r, *spec);
                    r.transition(
                        AppState::Pending,
                        "spec changed: stopped the old container; starting the new spec",
                    )
                })
                .await;
                Next::Start
            }
            Command::Remove(done) => {
                self.remove().await;
                let _ = done.send(());
                Next::Stop
            }
        }
    }

    /// RemoveApp: recorded first, then the containers go, then the record.
    async fn remove(&mut self) {
        self.update(|r| {
            r.removing = true;
            r.transition(AppState::Stopped, "removing")
        })
        .await;
        let name = self.name();
        let deps = &self.manager.inner.deps;
        let mut retry = BACKOFF_START;
        loop {
            match deps.engine.list(LABEL_APP, &name).await {
                Ok(containers) => {
                    let mut all_gone = true;
                    for c in containers
                        .iter()
                        .filter(|c| c.labels.get(LABEL_APP_INSTANCE) == Some(&deps.instance_id))
                    {
                        let _ = deps.engine.stop(&c.id, self.grace()).await;
                        all_gone &= deps.engine.remove(&c.id).await.is_ok();
                    }
                    if all_gone {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(app = %name, %error, "cannot remove the app's containers yet")
                }
            }
            tokio::select! {
                // Recorded as removing: the next start finishes it.
                _ = self.manager.inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(Duration::from_secs(10));
        }
        deps.slots.release(&slot_holder(&name));
        if let Err(error) = deps
            .store
            .apply(vec![Write::Delete(RECORDS, name.clone())])
            .await
        {
            tracing::warn!(app = %name, %error, "cannot delete the app's record");
        }
        self.manager.apps().remove(&name);
        // Published, not saved: the record is gone.
        self.handle.record.send_modify(|r| {
            r.container_id.clear();
            r.transition(AppState::Stopped, "removed");
        });
        self.manager.publish(&self.record());
    }

    /// The last bytes of the container's output, on one line.
    async fn log_tail(&self, id: &str) -> String {
        use tokio_stream::StreamExt;
        let limit = self.manager.config().log_tail_bytes as usize;
        if limit == 0 {
            return String::new();
        }
        let engine = self.manager.inner.deps.engine.clone();
        let collect = async {
            let mut tail: Vec<u8> = Vec::new();
            if let Ok(mut stream) = engine.output(id, 0, false).await {
                while let Some(Ok(frame)) = stream.next().await {
                    tail.extend_from_slice(&frame.data);
                    if tail.len() > 4 * limit {
                        tail.drain(..tail.len() - limit);
                    }
                }
            }
            tail
        };
        let tail = tokio::time::timeout(Duration::from_secs(2), collect)
            .await
            .unwrap_or_default();
        let start = tail.len().saturating_sub(limit);
        String::from_utf8_lossy(&tail[start..])
            .split(['\n', '\r'])
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

/// Replaces the spec: the generation moves on; picked ports of names that
/// stay picked are kept.
pub(super) fn apply_spec(record: &mut AppRecord, spec: AppSpec) {
    record
        .host_ports
        .retain(|name, _| spec.port(name).is_some_and(|p| p.host_port == 0));
    record.spec = spec;
    record.generation += 1;
}

/// The startup window of `spec`.
pub(super) fn startup_window(spec: &AppSpec) -> Duration {
    Duration::from_secs(spec.health.startup().into())
}

/// Host ports for `spec`: fixed ones as given (checked free), picked ones
/// kept from `kept` when still free, else new (never one in `taken`).
pub(super) fn assign_ports(
    spec: &AppSpec,
    kept: &BTreeMap<String, u32>,
    taken: &[u32],
) -> Result<BTreeMap<String, u32>, PortError> {
    let mut assigned = BTreeMap::new();
    for port in &spec.ports {
        let host_port = if port.host_port != 0 {
            ports::check_free(&port.host_ip, port.host_port)?;
            port.host_port
        } else {
            match kept.get(&port.name) {
                Some(&p) if !taken.contains(&p) && ports::check_free(&port.host_ip, p).is_ok() => p,
                _ => {
                    let mut avoid = taken.to_vec();
                    avoid.extend(assigned.values().copied());
                    ports::pick_free(&port.host_ip, &avoid)?
                }
            }
        };
        assigned.insert(port.name.clone(), host_port);
    }
    Ok(assigned)
}

fn describe_ports(ports: &BTreeMap<String, u32>) -> String {
    let named: Vec<String> = ports.iter().map(|(n, p)| format!("{n}={p}")).collect();
    named.join(", ")
}

/// The container name of an app's generation (unique per instance).
pub(super) fn container_name(instance: &str, app: &str, generation: u64) -> String {
    let short: String = instance.chars().take(8).collect();
    format!("ia-app-{short}-{app}-{generation}")
}

//! One change of the SSH settings, as a state machine:
//!
//! 1. **Validate.** Open the directories (`fileset`), check that sshd's main
//!    config lets the drop-in win, stage the new drop-in and a copy of the
//!    main config that reads it in place of the real one, and run `sshd -t`
//!    on the copy. A refusal here changes nothing.
//! 2. **Apply.** Keep what the files held, write the new ones atomically,
//!    then bring the listener to the policy: reload (never restart) so that
//!    open sessions live; start, or stop and mask, to turn SSH on or off.
//! 3. **Verify.** Enabled: the port answers with an SSH banner within
//!    `access.reload_timeout_seconds` and `sshd -T` shows the policy's
//!    values. Disabled: the units are stopped and masked and the port no
//!    longer answers.
//! 4. **Roll back** when 2 or 3 fails: the previous files, the previous
//!    unit states (masked or not, running or not), a reload; the answer is
//!    the error, with the rollback's own failure if it had one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::AccessError;
use super::fileset::{Dirs, Rendered, Snapshot, render};
use super::host::{Connection, ListenerKind, ListenerState, SshHost, Unit, UnitAction};
use super::policy::CheckedPolicy;
use super::settings::AccessSettings;
use super::sshd_config::{self, check_earlier, check_main, file_name, glob_match, staged_main};

/// The staged main config, in the staging directory.
const STAGED_MAIN: &str = "sshd_config";
/// Between two probes of the port.
const PROBE_PAUSE: Duration = Duration::from_millis(200);
/// The longest single probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A validated change, ready to apply: its directories, the files as they
/// were, and the staged main config `sshd -t` checked.
pub(super) struct Prepared {
    dirs: Arc<Dirs>,
    snapshot: Snapshot,
    staged_main: PathBuf,
}

/// Step 1 up to `sshd -t`: the checks of sshd's configuration, the staged
/// copy and the snapshot. Blocking.
fn prepare(
    settings: &AccessSettings,
    rendered: &Rendered,
    kind: ListenerKind,
) -> Result<Prepared, AccessError> {
    let config = &settings.config;
    let host = |what: &'static str| {
        move |e: std::io::Error| AccessError::Host {
            what,
            message: e.to_string(),
        }
    };
    let dirs = Dirs::open(settings, kind).map_err(host("cannot open the SSH directories"))?;
    let main = std::fs::read_to_string(&config.sshd_config).map_err(|e| AccessError::Host {
        what: "cannot read sshd's main config",
        message: format!("{}: {e}", config.sshd_config.display()),
    })?;
    let site =
        check_main(&main, &config.sshd_config, &config.drop_in).map_err(AccessError::SshdConfig)?;
    let ours = file_name(&config.drop_in);
    let mut reads = Vec::new();
    let mut names = dirs
        .drop_in
        .names()
        .map_err(host("cannot list the drop-in directory"))?;
    if !names.contains(&ours) {
        names.push(ours.clone());
        names.sort();
    }
    for name in names
        .into_iter()
        .filter(|n| glob_match(&site.name_pattern, n))
    {
        if name == ours {
            reads.push(dirs.staging.join(&ours));
            continue;
        }
        let path = dirs.drop_in.join(&name);
        if name < ours {
            // Read by path: a drop-in may be a symlink, and sshd follows it.
            let text = std::fs::read_to_string(&path).map_err(|e| AccessError::Host {
                what: "cannot read a drop-in sshd reads first",
                message: format!("{}: {e}", path.display()),
            })?;
            check_earlier(&path, &text).map_err(AccessError::SshdConfig)?;
        }
        reads.push(path);
    }
    dirs.staging
        .write(&ours, rendered.drop_in.as_bytes(), 0o600)
        .map_err(host("cannot stage the drop-in"))?;
    dirs.staging
        .write(
            STAGED_MAIN,
            staged_main(&main, &site, &reads).as_bytes(),
            0o600,
        )
        .map_err(host("cannot stage sshd's main config"))?;
    let snapshot = dirs
        .snapshot(settings)
        .map_err(host("cannot read the current SSH files"))?;
    Ok(Prepared {
        staged_main: dirs.staging.join(STAGED_MAIN),
        dirs: Arc::new(dirs),
        snapshot,
    })
}

/// Runs blocking file work off the runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AccessError> + Send + 'static,
) -> Result<T, AccessError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AccessError::Host {
            what: "file task failed",
            message: e.to_string(),
        })?
}

/// What a change needs besides the policy.
pub(super) struct Change<'a> {
    /// The settings.
    pub settings: &'a AccessSettings,
    /// The system.
    pub host: &'a dyn SshHost,
    /// How sshd is started here.
    pub kind: ListenerKind,
    /// End open sessions when disabling.
    pub terminate_sessions: bool,
}

/// A change that was applied and verified; [`Change::undo`] still can.
pub(super) struct Applied {
    prepared: Prepared,
    before: ListenerState,
    socket_changed: bool,
}

impl Change<'_> {
    /// Validates, applies and verifies `policy`; rolls back on failure.
    pub(super) async fn run(&self, policy: &CheckedPolicy) -> Result<Applied, AccessError> {
        let rendered = render(self.settings, policy, self.kind);
        let prepared = {
            let (settings, rendered, kind) = (self.settings.clone(), rendered.clone(), self.kind);
            blocking(move || prepare(&settings, &rendered, kind)).await?
        };
        let checked = self.host.check_config(&prepared.staged_main).await;
        let staging = prepared.dirs.clone();
        let ours = file_name(&self.settings.config.drop_in);
        let _ = blocking(move || {
            let _ = staging.staging.remove(&ours);
            let _ = staging.staging.remove(STAGED_MAIN);
            Ok(())
        })
        .await;
        checked.map_err(AccessError::ConfigCheck)?;
        let before = self
            .host
            .listener()
            .await
            .map_err(|message| AccessError::Host {
                what: "cannot read the SSH listener's units",
                message,
            })?;
        let socket_changed =
            prepared.snapshot.socket.as_deref() != rendered.socket.as_deref().map(str::as_bytes);
        let applied = Applied {
            prepared,
            before,
            socket_changed,
        };
        match self.commit(policy, &rendered, &applied).await {
            Ok(()) => Ok(applied),
            Err(cause) => Err(self.undo(&applied, cause).await),
        }
    }

    /// Steps 2 and 3: files, units, verification.
    async fn commit(
        &self,
        policy: &CheckedPolicy,
        rendered: &Rendered,
        applied: &Applied,
    ) -> Result<(), String> {
        let dirs = applied.prepared.dirs.clone();
        let (settings, files) = (self.settings.clone(), rendered.clone());
        blocking(move || {
            dirs.write(&settings, &files)
                .map_err(|e| AccessError::Host {
                    what: "cannot write the SSH files",
                    message: e.to_string(),
                })
        })
        .await
        .map_err(|e| e.to_string())?;
        if applied.socket_changed {
            self.host.daemon_reload().await?;
        }
        let before = &applied.before;
        let units = units_of(self.kind, before);
        if units.is_empty() {
            return Err(format!(
                "neither {} nor {} exists: is openssh-server installed?",
                self.settings.config.service_unit, self.settings.config.socket_unit
            ));
        }
        if policy.policy.enabled {
            let masked: Vec<Unit> = units
                .iter()
                .copied()
                .filter(|&u| before.unit(u).masked)
                .collect();
            if !masked.is_empty() {
                self.host.act(UnitAction::Unmask, &masked).await?;
            }
            self.bring_up(before, applied.socket_changed).await?;
            self.verify_enabled(policy).await
        } else {
            // Stopped before masked: a masked unit loses its file, and with
            // it `KillMode=process` (Debian's ssh.service), so stopping it
            // then would kill every session in its cgroup.
            self.host.act(UnitAction::Stop, &units).await?;
            let unmasked: Vec<Unit> = units
                .iter()
                .copied()
                .filter(|&u| !before.unit(u).masked)
                .collect();
            if !unmasked.is_empty() {
                self.host.act(UnitAction::Mask, &unmasked).await?;
            }
            if self.terminate_sessions {
                for session in self.host.sessions().await {
                    self.host.terminate(session.pid).await?;
                }
            }
            self.verify_disabled(policy.port).await
        }
    }

    /// Starts the listener, or reloads it when it runs.
    async fn bring_up(&self, before: &ListenerState, socket_changed: bool) -> Result<(), String> {
        let running = |unit: Unit| before.unit(unit).active && !before.unit(unit).masked;
        match self.kind {
            ListenerKind::Service if running(Unit::Service) => {
                self.host.act(UnitAction::Reload, &[Unit::Service]).await
            }
            ListenerKind::Service => self.host.act(UnitAction::Start, &[Unit::Service]).await,
            ListenerKind::Socket if socket_changed => {
                // The running sshd keeps the old socket: both go, the
                // socket comes back on the new port (KillMode=process of
                // ssh.service keeps the sessions).
                if running(Unit::Socket) || running(Unit::Service) {
                    self.host
                        .act(UnitAction::Stop, &[Unit::Socket, Unit::Service])
                        .await?;
                }
                self.host.act(UnitAction::Start, &[Unit::Socket]).await
            }
            ListenerKind::Socket => {
                if !running(Unit::Socket) {
                    self.host.act(UnitAction::Start, &[Unit::Socket]).await?;
                }
                if running(Unit::Service) {
                    self.host.act(UnitAction::Reload, &[Unit::Service]).await?;
                }
                Ok(())
            }
        }
    }

    /// The port answers with an SSH banner and `sshd -T` shows the policy.
    async fn verify_enabled(&self, policy: &CheckedPolicy) -> Result<(), String> {
        let timeout = Duration::from_secs(self.settings.config.reload_timeout_seconds.into());
        let deadline = tokio::time::Instant::now() + timeout;
        let port = policy.port;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.host.banner(port, left.min(PROBE_TIMEOUT)).await {
                Ok(_) => break,
                Err(seen) if tokio::time::Instant::now() + PROBE_PAUSE >= deadline => {
                    return Err(format!(
                        "sshd did not answer on port {port} within {} s (access.reload_timeout_seconds): {seen}",
                        timeout.as_secs()
                    ));
                }
                Err(_) => tokio::time::sleep(PROBE_PAUSE).await,
            }
        }
        let connection = Connection {
            user: policy.policy.user.clone(),
            port,
        };
        let effective = self
            .host
            .effective(&self.settings.config.sshd_config, &connection)
            .await?;
        let differences =
            sshd_config::differences(&effective, policy, &self.settings.config.keys_dir, false);
        if differences.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "sshd -T disagrees with the policy: {}",
                differences.join("; ")
            ))
        }
    }

    /// The units are stopped and masked and the port does not answer.
    async fn verify_disabled(&self, port: u16) -> Result<(), String> {
        let state = self.host.listener().await?;
        if let Some(problem) = disabled_problem(self.settings, self.kind, &state) {
            return Err(problem);
        }
        match self.host.banner(port, PROBE_TIMEOUT).await {
            Ok(banner) => Err(format!(
                "port {port} still answers ({banner}) with the SSH units stopped: another sshd listens"
            )),
            Err(_) => Ok(()),
        }
    }

    /// Step 4: the files and unit states as they were; the error to answer.
    pub(super) async fn undo(&self, applied: &Applied, cause: String) -> AccessError {
        tracing::warn!(error = %cause, "SSH change failed; rolling back");
        match self.restore(applied).await {
            Ok(()) => AccessError::RolledBack { cause },
            Err(rollback) => {
                tracing::error!(error = %rollback, "SSH rollback failed");
                AccessError::RollbackFailed { cause, rollback }
            }
        }
    }

    async fn restore(&self, applied: &Applied) -> Result<(), String> {
        let dirs = applied.prepared.dirs.clone();
        let (settings, snapshot) = (self.settings.clone(), applied.prepared.snapshot.clone());
        blocking(move || {
            dirs.restore(&settings, &snapshot)
                .map_err(|e| AccessError::Host {
                    what: "cannot put the SSH files back",
                    message: e.to_string(),
                })
        })
        .await
        .map_err(|e| e.to_string())?;
        let before = &applied.before;
        let mut errors = Vec::new();
        if applied.socket_changed {
            if let Err(e) = self.host.daemon_reload().await {
                errors.push(e);
            }
            if let Err(e) = self
                .host
                .act(UnitAction::Stop, &[Unit::Socket, Unit::Service])
                .await
            {
                errors.push(e);
            }
        }
        let now = self.host.listener().await?;
        for unit in [Unit::Socket, Unit::Service] {
            let (was, is) = (before.unit(unit), now.unit(unit));
            if !was.exists {
                continue;
            }
            let step = match (was.masked, is.masked) {
                (true, false) => Some(UnitAction::Mask),
                (false, true) => Some(UnitAction::Unmask),
                _ => None,
            };
            let run = match (was.active, is.active) {
                (true, false) => Some(UnitAction::Start),
                (true, true) if unit == Unit::Service => Some(UnitAction::Reload),
                // A socket-activated service may run or not.
                (false, true) if !(unit == Unit::Service && self.kind == ListenerKind::Socket) => {
                    Some(UnitAction::Stop)
                }
                _ => None,
            };
            // A unit to stop is stopped before it is masked (see `commit`).
            let order = match (step, run) {
                (Some(UnitAction::Mask), Some(UnitAction::Stop)) => [run, step],
                _ => [step, run],
            };
            for action in order.into_iter().flatten() {
                if let Err(e) = self.host.act(action, &[unit]).await {
                    errors.push(e);
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// The units a kind of listener needs, of those that exist: the service,
/// or the socket and the service it starts.
pub(super) fn units_of(kind: ListenerKind, state: &ListenerState) -> Vec<Unit> {
    let wanted: &[Unit] = match kind {
        ListenerKind::Service => &[Unit::Service],
        ListenerKind::Socket => &[Unit::Socket, Unit::Service],
    };
    wanted
        .iter()
        .copied()
        .filter(|&u| state.unit(u).exists)
        .collect()
}

/// Why the units are not as a disabled policy wants (stopped, and masked
/// where the listener needs them), or None.
pub(super) fn disabled_problem(
    settings: &AccessSettings,
    kind: ListenerKind,
    state: &ListenerState,
) -> Option<String> {
    let needed = units_of(kind, state);
    for unit in [Unit::Socket, Unit::Service] {
        let unit_state = state.unit(unit);
        let name = settings.unit_name(unit);
        if unit_state.active {
            return Some(format!("{name} runs although SSH is disabled"));
        }
        if needed.contains(&unit) && !unit_state.masked {
            return Some(format!("{name} is not masked although SSH is disabled"));
        }
    }
    None
}

/// Why the units are not as an enabled policy wants (not masked, and the
/// listener running), or None.
pub(super) fn enabled_problem(
    settings: &AccessSettings,
    kind: ListenerKind,
    state: &ListenerState,
) -> Option<String> {
    let needed = units_of(kind, state);
    if let Some(&unit) = needed.iter().find(|&&u| state.unit(u).masked) {
        return Some(format!(
            "{} is masked although SSH is enabled",
            settings.unit_name(unit)
        ));
    }
    let listener = match kind {
        ListenerKind::Service => Unit::Service,
        ListenerKind::Socket => Unit::Socket,
    };
    if !state.unit(listener).active {
        return Some(format!(
            "{} is not running although SSH is enabled",
            settings.unit_name(listener)
        ));
    }
    None
}

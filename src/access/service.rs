//! [`AccessService`]: the handle of the access domain. It sets the policy
//! (one change at a time, through `apply`), keeps it in the store with how
//! sshd was started and who set it, answers what the policy is and what
//! sshd really does, lists sessions, and watches for drift: at start a
//! policy whose files or units were changed by hand is applied again; a
//! periodic check reports drift in the `ssh` condition (without undoing a
//! change someone may be making at the terminal).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::AccessError;
use super::apply::{Change, disabled_problem, enabled_problem};
use super::fileset::{file_drift, render};
use super::host::{Connection, ListenerKind, ListenerState, SshHost, Unit, UnitState};
use super::keys::AuthorizedKey;
use super::policy::{CheckedPolicy, DEFAULT_PORT, PolicyProblem, SshPolicy};
use super::sessions::SshSession;
use super::settings::AccessSettings;
use super::sshd_config::{self, Effective};
use crate::health::{ConditionState, Health, Subsystem};
use crate::store::{Store, Table, Write};

/// The store table of the policy (one record).
const TABLE: Table = Table("access.ssh");
const KEY: &str = "policy";

/// The policy as the agent keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    policy: SshPolicy,
    /// How sshd was started when the agent took it over; kept, so that
    /// enabling again restarts the same units.
    listener: ListenerKind,
    applied_at_ms: u64,
    applied_by: String,
}

/// What a change is asked with.
#[derive(Debug, Clone, Default)]
pub struct SetOptions {
    /// End the open sessions when disabling (else they live on).
    pub terminate_sessions: bool,
    /// Who asked, for the audit line.
    pub requested_by: String,
}

/// The policy, what sshd really does, and whether they agree.
#[derive(Debug, Clone)]
pub struct PolicyView {
    /// The policy as set; None before any was set.
    pub policy: Option<SshPolicy>,
    /// Its keys, parsed.
    pub keys: Vec<AuthorizedKey>,
    /// How sshd is started (as recorded, or as found).
    pub listener: Option<ListenerKind>,
    /// The units, by name.
    pub units: Vec<(String, UnitState)>,
    /// What `sshd -T` shows, or why it could not be read.
    pub effective: Result<Effective, String>,
    /// Where sshd's settings differ from the policy.
    pub differences: Vec<String>,
    /// Where the files or units differ from the policy.
    pub drift: Vec<String>,
    /// When the policy was applied.
    pub applied_at: Option<SystemTime>,
    /// Who applied it.
    pub applied_by: String,
    /// Why the last change failed (empty when it did not).
    pub last_error: String,
    /// sshd's version.
    pub sshd_version: String,
}

impl PolicyView {
    /// A policy is set and sshd, the files and the units all match it.
    pub fn agrees(&self) -> bool {
        self.policy.is_some() && self.differences.is_empty() && self.drift.is_empty()
    }
}

#[derive(Debug, Default)]
struct Memory {
    record: Option<Record>,
    drift: Vec<String>,
    last_error: String,
    rollback_failed: bool,
}

struct Inner {
    settings: AccessSettings,
    host: Arc<dyn SshHost>,
    store: Store,
    health: Health,
    /// One change or check at a time (held across awaits).
    busy: tokio::sync::Mutex<()>,
    memory: Mutex<Memory>,
}

/// The access domain's handle. Cheap to clone.
#[derive(Clone)]
pub struct AccessService {
    inner: Arc<Inner>,
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn invalid(problem: PolicyProblem) -> AccessError {
    if problem.by_config {
        AccessError::NotAllowed {
            field: problem.field,
            problem: problem.problem,
        }
    } else {
        AccessError::Invalid {
            field: problem.field,
            problem: problem.problem,
        }
    }
}

impl AccessService {
    /// Loads the policy from the store. Touches nothing on the system.
    pub fn new(
        settings: AccessSettings,
        host: Arc<dyn SshHost>,
        store: Store,
        health: Health,
    ) -> Result<Self, AccessError> {
        let record: Option<Record> = store.get(TABLE, KEY).map_err(AccessError::Store)?;
        let service = Self {
            inner: Arc::new(Inner {
                settings,
                host,
                store,
                health,
                busy: tokio::sync::Mutex::new(()),
                memory: Mutex::new(Memory {
                    record,
                    ..Memory::default()
                }),
            }),
        };
        service.publish_condition();
        Ok(service)
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.inner.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self) -> Option<Record> {
        self.memory().record.clone()
    }

    /// Checks the policy at start (applying it again when it drifted), then
    /// every `access.drift_check_interval_seconds` until `cancel`.
    pub fn start(&self, tasks: &TaskTracker, cancel: &CancellationToken) {
        let service = self.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            service.check_at_start().await;
            let every = Duration::from_secs(
                service
                    .inner
                    .settings
                    .config
                    .drift_check_interval_seconds
                    .into(),
            );
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(every) => service.check_drift().await,
                }
            }
        });
    }

    /// At start: a policy whose files or units drifted is applied again.
    pub async fn check_at_start(&self) {
        let Some((record, drift)) = self.recorded_drift().await else {
            return;
        };
        if drift.is_empty() {
            self.memory().drift.clear();
            self.publish_condition();
            return;
        }
        tracing::warn!(drift = %drift.join("; "), "SSH settings drifted from the policy; applying it again");
        let options = SetOptions {
            terminate_sessions: false,
            requested_by: "instance-agent (drift found at start)".into(),
        };
        if let Err(error) = self.set(record.policy, options).await {
            tracing::error!(%error, "cannot apply the SSH policy again at start");
            self.memory().drift = drift;
            self.publish_condition();
        }
    }

    /// Compares files, units and sshd with the policy; reports, never repairs.
    pub async fn check_drift(&self) {
        let Some((_, drift)) = self.recorded_drift().await else {
            return;
        };
        let changed = {
            let mut memory = self.memory();
            let changed = memory.drift != drift;
            memory.drift = drift.clone();
            changed
        };
        if changed && !drift.is_empty() {
            tracing::warn!(drift = %drift.join("; "), "SSH settings drifted from the policy (applied again at the next start)");
        }
        self.publish_condition();
    }

    /// The recorded policy and where the system differs from it (between
    /// changes), or None before any policy was set.
    async fn recorded_drift(&self) -> Option<(Record, Vec<String>)> {
        let record = self.record()?;
        let _busy = self.inner.busy.lock().await;
        let drift = self.drift_of(&record).await;
        Some((record, drift))
    }

    /// Where the system differs from a recorded policy.
    async fn drift_of(&self, record: &Record) -> Vec<String> {
        let settings = &self.inner.settings;
        let Ok(checked) = record.policy.check(settings.rules()) else {
            return vec![
                "the recorded policy no longer passes the rules ([access] changed?)".into(),
            ];
        };
        let rendered = render(settings, &checked, record.listener);
        let mut drift = {
            let (settings, kind) = (settings.clone(), record.listener);
            tokio::task::spawn_blocking(move || file_drift(&settings, &rendered, kind))
                .await
                .unwrap_or_else(|e| vec![format!("file check failed: {e}")])
        };
        match self.inner.host.listener().await {
            Ok(state) => {
                let problem = if checked.policy.enabled {
                    enabled_problem(settings, record.listener, &state)
                } else {
                    disabled_problem(settings, record.listener, &state)
                };
                drift.extend(problem);
            }
            Err(e) => drift.push(format!("cannot read the SSH units: {e}")),
        }
        if checked.policy.enabled {
            match self.effective_for(&checked).await {
                Ok(effective) => drift.extend(sshd_config::differences(
                    &effective,
                    &checked,
                    &settings.config.keys_dir,
                    false,
                )),
                Err(e) => drift.push(e),
            }
        }
        drift
    }

    async fn effective_for(&self, checked: &CheckedPolicy) -> Result<Effective, String> {
        let connection = Connection {
            user: if checked.policy.user.is_empty() {
                "root".into()
            } else {
                checked.policy.user.clone()
            },
            port: checked.port,
        };
        self.inner
            .host
            .effective(&self.inner.settings.config.sshd_config, &connection)
            .await
    }

    /// Validates, applies and verifies `policy` (rolled back on failure),
    /// and records it. One change at a time.
    pub async fn set(
        &self,
        policy: SshPolicy,
        options: SetOptions,
    ) -> Result<PolicyView, AccessError> {
        let result = self.set_locked(policy, &options).await;
        if let Err(error) = &result {
            tracing::warn!(
                target: "audit",
                who = %options.requested_by,
                %error,
                "audit: SSH policy change by {} failed: {error}",
                options.requested_by
            );
            let mut memory = self.memory();
            memory.last_error = error.to_string();
            memory.rollback_failed = matches!(error, AccessError::RollbackFailed { .. });
        }
        self.publish_condition();
        result?;
        Ok(self.get().await)
    }

    async fn set_locked(&self, policy: SshPolicy, options: &SetOptions) -> Result<(), AccessError> {
        let settings = &self.inner.settings;
        let checked = policy.check(settings.rules()).map_err(invalid)?;
        let host = self.inner.host.as_ref();
        if checked.policy.enabled {
            let exists = host
                .user_exists(&checked.policy.user)
                .await
                .map_err(|message| AccessError::Host {
                    what: "cannot look up the policy's user",
                    message,
                })?;
            if !exists {
                return Err(AccessError::UnknownUser {
                    user: checked.policy.user.clone(),
                });
            }
        }
        let _busy = self.inner.busy.lock().await;
        let previous = self.record();
        let kind = match &previous {
            Some(record) => record.listener,
            None => host
                .listener()
                .await
                .map_err(|message| AccessError::Host {
                    what: "cannot read the SSH listener's units",
                    message,
                })?
                .kind(),
        };
        let change = Change {
            settings,
            host,
            kind,
            terminate_sessions: options.terminate_sessions,
        };
        let applied = change.run(&checked).await?;
        let record = Record {
            policy: checked.policy.clone(),
            listener: kind,
            applied_at_ms: millis(SystemTime::now()),
            applied_by: options.requested_by.clone(),
        };
        if let Err(error) = self
            .inner
            .store
            .apply(vec![Write::put(TABLE, KEY, &record)])
            .await
        {
            let undone = change
                .undo(&applied, format!("cannot record the policy: {error}"))
                .await;
            return Err(match undone {
                AccessError::RolledBack { .. } => AccessError::Store(error),
                other => other,
            });
        }
        let changes = describe_changes(previous.as_ref().map(|r| &r.policy), &checked);
        tracing::info!(
            target: "audit",
            who = %options.requested_by,
            changes = %changes,
            "audit: SSH policy changed by {}: {changes}",
            options.requested_by
        );
        let mut memory = self.memory();
        memory.record = Some(record);
        memory.drift.clear();
        memory.last_error.clear();
        memory.rollback_failed = false;
        Ok(())
    }

    /// The policy, sshd's effective settings and whether they agree.
    pub async fn get(&self) -> PolicyView {
        let record = self.record();
        let settings = &self.inner.settings;
        let host = self.inner.host.as_ref();
        let state = host.listener().await;
        let checked = record
            .as_ref()
            .and_then(|r| r.policy.check(settings.rules()).ok());
        let drift = match &record {
            Some(record) => {
                let _busy = self.inner.busy.lock().await;
                self.drift_of(record).await
            }
            None => Vec::new(),
        };
        let effective = match &checked {
            Some(checked) => self.effective_for(checked).await,
            None => {
                let connection = Connection {
                    user: "root".into(),
                    port: DEFAULT_PORT as u16,
                };
                host.effective(&settings.config.sshd_config, &connection)
                    .await
            }
        };
        let differences = match (&effective, &checked) {
            (Ok(effective), Some(checked)) if checked.policy.enabled => {
                sshd_config::differences(effective, checked, &settings.config.keys_dir, true)
            }
            _ => Vec::new(),
        };
        let units = match &state {
            Ok(state) => [Unit::Service, Unit::Socket]
                .into_iter()
                .map(|u| (settings.unit_name(u).to_owned(), state.unit(u)))
                .collect(),
            Err(_) => Vec::new(),
        };
        let listener = record
            .as_ref()
            .map(|r| r.listener)
            .or_else(|| state.as_ref().ok().map(ListenerState::kind));
        {
            let mut memory = self.memory();
            if record.is_some() {
                memory.drift = drift.clone();
            }
        }
        self.publish_condition();
        let last_error = self.memory().last_error.clone();
        PolicyView {
            keys: checked.map(|c| c.keys).unwrap_or_default(),
            policy: record.as_ref().map(|r| r.policy.clone()),
            listener,
            units,
            effective,
            differences,
            drift,
            applied_at: record
                .as_ref()
                .map(|r| SystemTime::UNIX_EPOCH + Duration::from_millis(r.applied_at_ms)),
            applied_by: record.map(|r| r.applied_by).unwrap_or_default(),
            last_error,
            sshd_version: host.version().await,
        }
    }

    /// The SSH sessions open now (also an activity source for idle
    /// detection: an open session is activity).
    pub async fn sessions(&self) -> Vec<SshSession> {
        self.inner.host.sessions().await
    }

    /// Sets the `ssh` condition from what is known.
    fn publish_condition(&self) {
        let memory = self.memory();
        let settings = &self.inner.settings;
        let (state, message) = match &memory.record {
            None => (
                ConditionState::Disabled,
                "no SSH policy set: the agent leaves sshd as it is".to_owned(),
            ),
            Some(_) if memory.rollback_failed => (
                ConditionState::Failed,
                format!(
                    "the last SSH change failed and so did its rollback: {}",
                    memory.last_error
                ),
            ),
            Some(_) if !memory.drift.is_empty() => (
                ConditionState::Degraded,
                format!(
                    "SSH drifted from the policy (applied again at the next start): {}",
                    memory.drift.join("; ")
                ),
            ),
            Some(record) => {
                let unit = match record.listener {
                    ListenerKind::Service => &settings.config.service_unit,
                    ListenerKind::Socket => &settings.config.socket_unit,
                };
                let policy = &record.policy;
                let message = if policy.enabled {
                    format!(
                        "SSH enabled on port {} ({unit}) for {} with {} key(s)",
                        policy.effective_port(),
                        policy.user,
                        policy.authorized_keys.len()
                    )
                } else {
                    format!("SSH disabled ({unit} stopped and masked)")
                };
                (ConditionState::Ok, message)
            }
        };
        drop(memory);
        self.inner.health.set(Subsystem::Ssh, state, message);
    }
}

/// What a change changed, for the audit line: keys by fingerprint only.
pub(super) fn describe_changes(previous: Option<&SshPolicy>, next: &CheckedPolicy) -> String {
    let default = SshPolicy::default();
    let before = previous.unwrap_or(&default);
    let after = &next.policy;
    let mut out = Vec::new();
    if previous.is_none() {
        out.push("first policy".to_owned());
    }
    let mut field = |name: &str, old: String, new: String| {
        if old != new {
            out.push(format!("{name} {old} -> {new}"));
        }
    };
    field(
        "enabled",
        before.enabled.to_string(),
        after.enabled.to_string(),
    );
    field(
        "port",
        before.effective_port().to_string(),
        after.effective_port().to_string(),
    );
    field(
        "user",
        format!("{:?}", before.user),
        format!("{:?}", after.user),
    );
    field(
        "password_authentication",
        before.password_authentication.to_string(),
        after.password_authentication.to_string(),
    );
    field(
        "allow_tcp_forwarding",
        before.allow_tcp_forwarding.to_string(),
        after.allow_tcp_forwarding.to_string(),
    );
    let old: Vec<String> = before
        .authorized_keys
        .iter()
        .map(|l| super::keys::fingerprint_or_invalid(l))
        .collect();
    let new: Vec<String> = next.keys.iter().map(|k| k.fingerprint.clone()).collect();
    for added in new.iter().filter(|f| !old.contains(f)) {
        out.push(format!("key added {added}"));
    }
    for removed in old.iter().filter(|f| !new.contains(f)) {
        out.push(format!("key removed {removed}"));
    }
    if out.is_empty() {
        "nothing (applied again)".into()
    } else {
        out.join(", ")
    }
}

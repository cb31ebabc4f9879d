//! The access domain's state machine with the fake host: every path of a
//! change (refused before anything, applied and verified, rolled back, the
//! rollback failing), disable and enable with sessions, socket activation,
//! drift at start and periodically, and nothing touched without a policy.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::fake::FakeSsh;
use super::host::{ListenerKind, Unit, UnitAction, UnitState};
use super::keys::tests::ed25519;
use super::{AccessError, AccessService, AccessSettings, SetOptions, SshPolicy, SshSession};
use crate::access::config::AccessConfig;
use crate::health::{ConditionState, Subsystem};
use crate::testing::Rig;

/// Debian 12's main config, shortened, with the rig's drop-in directory.
fn main_config(dir: &std::path::Path) -> String {
    format!(
        "# sshd_config\nInclude {}/*.conf\nKbdInteractiveAuthentication no\nUsePAM yes\n\
         Subsystem sftp /usr/lib/openssh/sftp-server\n",
        dir.display()
    )
}

struct Harness {
    rig: Rig,
    settings: AccessSettings,
    fake: Arc<FakeSsh>,
    service: AccessService,
}

impl Harness {
    fn new(kind: ListenerKind) -> Self {
        let rig = Rig::new();
        let etc = rig.subdir("etc/ssh");
        let drop_in_dir = rig.subdir("etc/ssh/sshd_config.d");
        std::fs::write(etc.join("sshd_config"), main_config(&drop_in_dir)).unwrap();
        let config = AccessConfig {
            sshd_config: etc.join("sshd_config"),
            drop_in: drop_in_dir.join("00-instance-agent.conf"),
            keys_dir: etc.join("instance-agent/authorized_keys"),
            reload_timeout_seconds: 2,
            drift_check_interval_seconds: 60,
            ..AccessConfig::default()
        };
        let settings = AccessSettings {
            config,
            systemd_dir: rig.subdir("systemd"),
        };
        let fake = Arc::new(FakeSsh::new(
            kind,
            &settings.config.drop_in,
            &settings.socket_drop_in_dir().join("instance-agent.conf"),
        ));
        let service = Self::service(&rig, &settings, &fake);
        Self {
            rig,
            settings,
            fake,
            service,
        }
    }

    /// A service over the same store and host: the agent after a restart.
    fn service(rig: &Rig, settings: &AccessSettings, fake: &Arc<FakeSsh>) -> AccessService {
        AccessService::new(
            settings.clone(),
            fake.clone(),
            rig.store.clone(),
            rig.health.clone(),
        )
        .expect("service")
    }

    fn restarted(&self) -> AccessService {
        Self::service(&self.rig, &self.settings, &self.fake)
    }

    fn drop_in(&self) -> Option<String> {
        std::fs::read_to_string(&self.settings.config.drop_in).ok()
    }

    fn keys_file(&self, user: &str) -> PathBuf {
        self.settings.config.keys_dir.join(user)
    }

    fn condition(&self) -> (ConditionState, String) {
        let c = self.rig.health.get(Subsystem::Ssh);
        (c.state, c.message)
    }

    async fn set(&self, policy: SshPolicy) -> Result<super::PolicyView, AccessError> {
        self.service
            .set(
                policy,
                SetOptions {
                    terminate_sessions: false,
                    requested_by: "uid 0 (root)".into(),
                },
            )
            .await
    }
}

fn policy(port: u32, keys: &[String]) -> SshPolicy {
    SshPolicy {
        enabled: true,
        port,
        user: "azureuser".into(),
        authorized_keys: keys.to_vec(),
        ..SshPolicy::default()
    }
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(start_paused = true)]
async fn enabling_writes_the_files_reloads_verifies_and_records_the_policy() {
    let h = Harness::new(ListenerKind::Service);
    let keys = [ed25519(1, "alice"), ed25519(2, "bob")];
    let view = h.set(policy(2222, &keys)).await.expect("applied");
    assert!(view.agrees(), "{view:?}");
    assert_eq!(view.keys.len(), 2);
    assert_eq!(view.listener, Some(ListenerKind::Service));

    let drop_in = h.drop_in().expect("drop-in written");
    assert!(drop_in.contains("Port 2222\n"), "{drop_in}");
    assert!(drop_in.contains("PasswordAuthentication no\n"));
    assert_eq!(mode(&h.settings.config.drop_in), 0o644);
    let keys_file = h.keys_file("azureuser");
    let text = std::fs::read_to_string(&keys_file).unwrap();
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("ssh-ed25519"))
            .count(),
        2
    );
    assert_eq!(mode(&keys_file), 0o644);
    assert_eq!(mode(&h.settings.config.keys_dir), 0o755);
    // The staged copy sshd -t checked is gone.
    let staging = h.settings.staging_dir();
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
    assert_eq!(mode(&staging), 0o700);

    let calls = h.fake.calls();
    let check = format!("sshd -t {}", staging.join("sshd_config").display());
    let at = |call: &str| {
        calls
            .iter()
            .position(|c| c == call)
            .unwrap_or_else(|| panic!("{call} in {calls:?}"))
    };
    assert!(
        at(&check) < at("reload ssh.service"),
        "validated before applying: {calls:?}"
    );
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("start") || c.starts_with("stop")),
        "{calls:?}"
    );
    assert_eq!(h.fake.listening(), Some(2222));
    let (state, message) = h.condition();
    assert_eq!(state, ConditionState::Ok, "{message}");
    assert!(message.contains("port 2222"), "{message}");

    // Kept across a restart.
    let again = h.restarted().get().await;
    assert_eq!(again.policy.expect("kept").port, 2222);
    assert_eq!(again.applied_by, "uid 0 (root)");
    assert!(again.applied_at.is_some_and(|t| t <= SystemTime::now()));
}

#[tokio::test(start_paused = true)]
async fn a_bad_policy_is_refused_before_anything_is_touched() {
    let h = Harness::new(ListenerKind::Service);
    let error = h
        .set(policy(
            22,
            &[ed25519(1, ""), "ssh-ed25519 AAAA-not-base64".into()],
        ))
        .await
        .unwrap_err();
    match &error {
        AccessError::Invalid { field, problem } => {
            assert_eq!(field, "authorized_keys[1]");
            assert!(problem.contains("line 2"), "{problem}");
        }
        other => panic!("{other:?}"),
    }
    let error = h.set(policy(22, &[])).await.unwrap_err();
    assert!(error.to_string().contains("no way in"), "{error}");
    let error = h
        .set(SshPolicy {
            password_authentication: true,
            ..policy(22, &[ed25519(1, "")])
        })
        .await
        .unwrap_err();
    assert!(matches!(error, AccessError::NotAllowed { .. }), "{error:?}");
    let error = h
        .set(SshPolicy {
            user: "nobody-here".into(),
            ..policy(22, &[ed25519(1, "")])
        })
        .await
        .unwrap_err();
    assert!(
        matches!(error, AccessError::UnknownUser { .. }),
        "{error:?}"
    );
    assert!(h.fake.calls().is_empty(), "{:?}", h.fake.calls());
    assert_eq!(h.drop_in(), None);
    assert_eq!(h.condition().0, ConditionState::Disabled);
    assert!(h.service.get().await.policy.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_main_config_or_an_earlier_drop_in_that_would_win_is_refused() {
    let h = Harness::new(ListenerKind::Service);
    let main = &h.settings.config.sshd_config;
    std::fs::write(main, "PasswordAuthentication yes\nUsePAM yes\n").unwrap();
    let error = h.set(policy(22, &[ed25519(1, "")])).await.unwrap_err();
    assert!(
        matches!(&error, AccessError::SshdConfig(m) if m.contains("has no `Include`")),
        "{error:?}"
    );

    let dir = h.settings.config.drop_in.parent().unwrap().to_owned();
    std::fs::write(main, main_config(&dir)).unwrap();
    // "0-" sorts before "00-" (as sshd's glob sorts): read first, it would win.
    std::fs::write(dir.join("0-early.conf"), "PasswordAuthentication yes\n").unwrap();
    let error = h.set(policy(22, &[ed25519(1, "")])).await.unwrap_err();
    assert!(
        matches!(&error, AccessError::SshdConfig(m) if m.contains("0-early.conf line 1 sets passwordauthentication")),
        "{error:?}"
    );
    // A cloud-init drop-in sorts after the agent's: it loses, and is no reason to refuse.
    std::fs::remove_file(dir.join("0-early.conf")).unwrap();
    std::fs::write(
        dir.join("50-cloud-init.conf"),
        "PasswordAuthentication yes\n",
    )
    .unwrap();
    h.set(policy(22, &[ed25519(1, "")])).await.expect("applied");
}

#[tokio::test(start_paused = true)]
async fn a_config_sshd_t_refuses_changes_nothing() {
    let h = Harness::new(ListenerKind::Service);
    h.set(policy(2222, &[ed25519(1, "")]))
        .await
        .expect("applied");
    let before = h.drop_in();
    h.fake.clear_calls();
    h.fake.fail_next_check(
        "/etc/ssh/sshd_config.d/60-broken.conf: line 1: Bad configuration option: Nope",
    );
    let error = h.set(policy(2223, &[ed25519(2, "")])).await.unwrap_err();
    assert!(
        matches!(&error, AccessError::ConfigCheck(m) if m.contains("Bad configuration option")),
        "{error:?}"
    );
    assert!(error.to_string().contains("nothing was changed"));
    assert_eq!(h.drop_in(), before);
    let calls = h.fake.calls();
    assert_eq!(calls.len(), 1, "only sshd -t: {calls:?}");
    assert_eq!(h.fake.listening(), Some(2222));
    assert!(!h.service.get().await.last_error.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_port_without_a_banner_is_rolled_back_to_the_previous_files() {
    let h = Harness::new(ListenerKind::Service);
    let old_key = ed25519(1, "old");
    h.set(policy(2222, std::slice::from_ref(&old_key)))
        .await
        .expect("applied");
    let before_drop_in = h.drop_in();
    let before_keys = std::fs::read_to_string(h.keys_file("azureuser")).unwrap();
    h.fake.occupy(2223);
    h.fake.clear_calls();
    let error = h.set(policy(2223, &[ed25519(2, "new")])).await.unwrap_err();
    match &error {
        AccessError::RolledBack { cause } => {
            assert!(cause.contains("did not answer on port 2223"), "{cause}");
            assert!(cause.contains("answered without an SSH banner"), "{cause}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.drop_in(), before_drop_in);
    assert_eq!(
        std::fs::read_to_string(h.keys_file("azureuser")).unwrap(),
        before_keys
    );
    let reloads = h
        .fake
        .calls()
        .iter()
        .filter(|c| *c == "reload ssh.service")
        .count();
    assert_eq!(
        reloads,
        2,
        "applied, then rolled back: {:?}",
        h.fake.calls()
    );
    assert_eq!(h.fake.listening(), Some(2222));
    // Still the old policy, everywhere.
    let view = h.restarted().get().await;
    assert_eq!(
        view.policy.expect("old policy").authorized_keys,
        vec![old_key]
    );
    let view = h.service.get().await;
    assert!(view.agrees(), "{view:?}");
    assert!(
        view.last_error.contains("rolled back"),
        "{}",
        view.last_error
    );
    assert_eq!(h.condition().0, ConditionState::Ok);
}

#[tokio::test(start_paused = true)]
async fn sshd_t_disagreeing_or_a_failed_reload_is_rolled_back() {
    let h = Harness::new(ListenerKind::Service);
    h.fake.force_effective("passwordauthentication", "yes");
    let error = h.set(policy(22, &[ed25519(1, "")])).await.unwrap_err();
    assert!(
        matches!(&error, AccessError::RolledBack { cause } if cause.contains("passwordauthentication: sshd uses \"yes\"")),
        "{error:?}"
    );
    // There was no drop-in before: there is none after.
    assert_eq!(h.drop_in(), None);
    assert!(!h.keys_file("azureuser").exists());
    assert!(h.service.get().await.policy.is_none());
    assert_eq!(h.condition().0, ConditionState::Disabled);

    let h = Harness::new(ListenerKind::Service);
    h.fake
        .fail_next(UnitAction::Reload, "Job for ssh.service failed.");
    let error = h.set(policy(22, &[ed25519(1, "")])).await.unwrap_err();
    assert!(
        matches!(&error, AccessError::RolledBack { cause } if cause.contains("Job for ssh.service failed"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_rollback_says_so_and_fails_the_condition() {
    let h = Harness::new(ListenerKind::Service);
    h.set(policy(2222, &[ed25519(1, "")]))
        .await
        .expect("applied");
    h.fake.fail_next(UnitAction::Reload, "first reload failed");
    h.fake.fail_next(UnitAction::Reload, "second reload failed");
    let error = h.set(policy(2222, &[ed25519(2, "")])).await.unwrap_err();
    match &error {
        AccessError::RollbackFailed { cause, rollback } => {
            assert!(cause.contains("first reload failed"), "{cause}");
            assert!(rollback.contains("second reload failed"), "{rollback}");
        }
        other => panic!("{other:?}"),
    }
    let (state, message) = h.condition();
    assert_eq!(state, ConditionState::Failed, "{message}");
}

fn session(pid: u32) -> SshSession {
    SshSession {
        user: "azureuser".into(),
        from: "10.0.0.1".into(),
        since: SystemTime::UNIX_EPOCH,
        pid,
        tty: "pts/0".into(),
        source: "utmp",
    }
}

#[tokio::test(start_paused = true)]
async fn disabling_masks_and_stops_the_listener_and_keeps_sessions_unless_asked() {
    let h = Harness::new(ListenerKind::Service);
    let keys = [ed25519(1, "")];
    h.set(policy(2222, &keys)).await.expect("enabled");
    h.fake.set_sessions(vec![session(41), session(42)]);
    h.fake.clear_calls();
    let off = SshPolicy {
        enabled: false,
        ..policy(2222, &keys)
    };
    h.set(off.clone()).await.expect("disabled");
    let units = h.fake.units();
    assert!(units.service.masked && !units.service.active, "{units:?}");
    assert_eq!(h.fake.listening(), None);
    assert_eq!(h.service.sessions().await.len(), 2, "sessions live on");
    let calls = h.fake.calls();
    let at = |call: &str| calls.iter().position(|c| c == call);
    assert!(
        at("stop ssh.service") < at("mask ssh.service") && at("stop ssh.service").is_some(),
        "stopped before masked: {calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("terminate")),
        "{calls:?}"
    );
    assert!(
        h.condition().1.contains("SSH disabled"),
        "{:?}",
        h.condition()
    );

    // Enabling again unmasks and starts it.
    h.fake.clear_calls();
    h.set(policy(2222, &keys)).await.expect("enabled again");
    assert_eq!(
        h.fake
            .calls()
            .iter()
            .filter(|c| c.starts_with("unmask") || c.starts_with("start"))
            .count(),
        2
    );
    assert_eq!(h.fake.listening(), Some(2222));

    // Disabling with terminate_sessions ends them.
    h.service
        .set(
            off,
            SetOptions {
                terminate_sessions: true,
                requested_by: "test".into(),
            },
        )
        .await
        .expect("disabled");
    let calls = h.fake.calls();
    assert!(
        calls.contains(&"terminate 41".to_owned()) && calls.contains(&"terminate 42".to_owned()),
        "{calls:?}"
    );
    assert!(h.service.sessions().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn under_socket_activation_the_socket_gets_the_port_and_both_units_are_managed() {
    let h = Harness::new(ListenerKind::Socket);
    let keys = [ed25519(1, "")];
    h.set(policy(2222, &keys)).await.expect("enabled");
    let socket_drop_in = h.settings.socket_drop_in_dir().join("instance-agent.conf");
    let text = std::fs::read_to_string(&socket_drop_in).unwrap();
    assert!(
        text.ends_with("ListenStream=\nListenStream=2222\n"),
        "{text}"
    );
    let calls = h.fake.calls();
    let at = |call: &str| {
        calls
            .iter()
            .position(|c| c == call)
            .unwrap_or_else(|| panic!("{call} in {calls:?}"))
    };
    assert!(at("daemon-reload") < at("stop ssh.socket ssh.service"));
    assert!(at("stop ssh.socket ssh.service") < at("start ssh.socket"));
    assert_eq!(h.fake.listening(), Some(2222));
    assert_eq!(h.service.get().await.listener, Some(ListenerKind::Socket));

    h.fake.clear_calls();
    h.set(SshPolicy {
        enabled: false,
        ..policy(2222, &keys)
    })
    .await
    .expect("disabled");
    let units = h.fake.units();
    assert!(units.socket.masked && units.service.masked, "{units:?}");
    assert!(!units.socket.active && !units.service.active, "{units:?}");
    assert!(
        h.fake
            .calls()
            .contains(&"mask ssh.socket ssh.service".to_owned())
    );

    // The same port again: no daemon-reload, the socket is started.
    h.fake.clear_calls();
    h.set(policy(2222, &keys)).await.expect("enabled again");
    let calls = h.fake.calls();
    assert!(!calls.contains(&"daemon-reload".to_owned()), "{calls:?}");
    assert!(
        calls.contains(&"unmask ssh.socket ssh.service".to_owned()),
        "{calls:?}"
    );
    assert!(calls.contains(&"start ssh.socket".to_owned()), "{calls:?}");
    assert_eq!(h.fake.listening(), Some(2222));
}

#[tokio::test(start_paused = true)]
async fn drift_is_reported_periodically_and_repaired_at_start() {
    let h = Harness::new(ListenerKind::Service);
    h.set(policy(2222, &[ed25519(1, "")]))
        .await
        .expect("applied");
    let good = h.drop_in().expect("written");
    h.service.start(&h.rig.tasks, &h.rig.cancel);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.condition().0, ConditionState::Ok, "no drift at start");
    // Someone edits the drop-in by hand.
    std::fs::write(
        &h.settings.config.drop_in,
        good.replace("PasswordAuthentication no", "PasswordAuthentication yes"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (state, message) = h.condition();
    assert_eq!(state, ConditionState::Degraded, "{message}");
    assert!(message.contains("was changed"), "{message}");
    assert!(message.contains("passwordauthentication"), "{message}");
    let view = h.service.get().await;
    assert!(!view.agrees());
    assert!(!view.drift.is_empty());
    assert_ne!(h.drop_in().as_deref(), Some(good.as_str()), "only reported");

    // The agent restarts: the policy is applied again.
    h.rig.cancel.cancel();
    let restarted = h.restarted();
    restarted.check_at_start().await;
    assert_eq!(h.drop_in().as_deref(), Some(good.as_str()));
    assert_eq!(h.condition().0, ConditionState::Ok);
    assert!(restarted.get().await.agrees());
}

#[tokio::test(start_paused = true)]
async fn a_listener_started_by_hand_while_disabled_is_stopped_again_at_start() {
    let h = Harness::new(ListenerKind::Service);
    let keys = [ed25519(1, "")];
    h.set(SshPolicy {
        enabled: false,
        ..policy(22, &keys)
    })
    .await
    .expect("disabled");
    h.fake.set_unit(
        Unit::Service,
        UnitState {
            exists: true,
            active: true,
            masked: false,
            enabled: true,
        },
    );
    let restarted = h.restarted();
    restarted.check_at_start().await;
    let units = h.fake.units();
    assert!(units.service.masked && !units.service.active, "{units:?}");
}

#[tokio::test(start_paused = true)]
async fn without_a_policy_nothing_is_touched() {
    let h = Harness::new(ListenerKind::Service);
    h.service.check_at_start().await;
    h.service.check_drift().await;
    assert!(h.fake.calls().is_empty(), "{:?}", h.fake.calls());
    assert_eq!(h.condition().0, ConditionState::Disabled);
    let view = h.service.get().await;
    assert!(view.policy.is_none() && !view.agrees());
    assert_eq!(view.listener, Some(ListenerKind::Service));
    assert_eq!(view.effective.expect("sshd -T").ports(), [22]);
    assert!(
        h.fake
            .calls()
            .iter()
            .all(|c| c == "listener" || c.starts_with("sshd -T")),
        "reads only: {:?}",
        h.fake.calls()
    );
    assert_eq!(h.drop_in(), None);
}

#[tokio::test(start_paused = true)]
async fn a_new_user_gets_the_keys_and_the_old_users_file_goes() {
    let h = Harness::new(ListenerKind::Service);
    h.set(policy(22, &[ed25519(1, "")])).await.expect("applied");
    h.fake.add_user("bob");
    h.set(SshPolicy {
        user: "bob".into(),
        ..policy(22, &[ed25519(1, "")])
    })
    .await
    .expect("applied");
    assert!(!h.keys_file("azureuser").exists());
    assert!(h.keys_file("bob").exists());
}

#[test]
fn the_audit_line_names_fingerprints_never_keys() {
    let old = policy(22, &[ed25519(1, "")]);
    let new = policy(2222, &[ed25519(2, "")]);
    let rules = super::policy::PolicyRules {
        allow_password_authentication: false,
        max_authorized_keys: 8,
    };
    let checked = new.check(rules).expect("valid");
    let text = super::service::describe_changes(Some(&old), &checked);
    assert!(text.contains("port 22 -> 2222"), "{text}");
    assert!(
        text.contains(&format!("key added {}", checked.keys[0].fingerprint)),
        "{text}"
    );
    assert!(text.contains("key removed SHA256:"), "{text}");
    for line in old.authorized_keys.iter().chain(&new.authorized_keys) {
        let base64 = line.split(' ').nth(1).expect("base64");
        assert!(!text.contains(base64), "{text}");
    }
    let first = super::service::describe_changes(None, &checked);
    assert!(first.starts_with("first policy"), "{first}");
}

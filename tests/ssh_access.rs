//! The SSH access policy (issue 19) against the real sshd of Debian 12
//! (OpenSSH 9.2), driven by the packaged agent under a booted systemd: the
//! agent's unit is the sandboxed one (`ProtectSystem=strict`, its
//! `ReadWritePaths=` for `/etc/ssh`), so every test also proves that the
//! agent writes sshd's files and drives its units from inside it.
//!
//! Each test boots a fresh container (tests/common/nspawn.rs, its own
//! network namespace: everything is on its loopback), makes the user
//! `azureuser` with a password, generates a key inside, and logs in with
//! the real `ssh` client in batch mode. Both ways sshd is started are
//! covered: `ssh.service` (Debian's default) and `ssh.socket` (socket
//! activation, as Ubuntu ≥ 22.10 does it; Debian's socket spawns one
//! `sshd -i` per connection).
//!
//! Needs what tests/systemd_boot.rs needs; skipped (passing) without it
//! unless INSTANCE_AGENT_REQUIRE_SYSTEMD_TEST=1.

mod common;

use std::process::Output;
use std::time::Duration;

use common::booted_agent::{System, wait_for, when};

/// The policy's port (sshd's packaged one is 22).
const PORT: &str = "2222";
/// The user of the policy.
const USER: &str = "azureuser";
/// The private key the tests log in with (its `.pub` is the policy's).
const KEY: &str = "/root/id_test";
/// A long-lived session's heartbeat, in the user's home.
const BEAT: &str = "/home/azureuser/beat";

/// A booted system with the agent running and a user to log in as.
struct Rig {
    system: System,
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Rig {
    /// Boots; `prepare` runs before the agent starts (e.g. to switch sshd to
    /// socket activation).
    fn new(prepare: impl FnOnce(&System)) -> Option<Rig> {
        let system = System::new("\n[access]\nreload_timeout_seconds = 5\n")?;
        let b = &system.booted;
        b.ok(&["useradd", "--create-home", "--shell", "/bin/sh", USER]);
        // A password that would let anyone in, if password logins were on.
        b.ok(&["sh", "-c", "echo azureuser:azureuser | chpasswd"]);
        b.ok(&["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", KEY]);
        prepare(&system);
        system.start();
        Some(Rig { system })
    }

    fn exec(&self, args: &[&str]) -> Output {
        self.system.booted.exec(args)
    }

    /// `ssh -p PORT azureuser@127.0.0.1 COMMAND…` with the test key in
    /// batch mode (no prompt), a fresh known-hosts file.
    fn ssh(&self, port: &str, extra: &[&str], command: &str) -> Output {
        let mut args = vec![
            "ssh",
            "-n",
            "-i",
            KEY,
            "-p",
            port,
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=5",
        ];
        args.extend_from_slice(extra);
        let target = format!("{USER}@127.0.0.1");
        args.push(&target);
        args.push(command);
        self.system
            .booted
            .exec_timeout(&args, Duration::from_secs(30))
    }

    #[track_caller]
    fn assert_login(&self, port: &str) {
        let out = self.ssh(port, &[], "id -un");
        assert!(
            out.status.success(),
            "ssh to port {port} failed:\n{}",
            text(&out)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), USER);
    }

    #[track_caller]
    fn assert_refused(&self, port: &str) {
        let out = self.ssh(port, &[], "true");
        assert!(
            !out.status.success(),
            "ssh to port {port} got in although SSH is disabled"
        );
        let printed = text(&out);
        assert!(printed.contains("Connection refused"), "{printed}");
    }

    /// The authentication methods sshd offers after `none` (what a client
    /// learns before it tries one).
    fn offered_methods(&self, port: &str) -> String {
        let out = self.ssh(port, &["-v", "-o", "PreferredAuthentications=none"], "true");
        let printed = text(&out);
        printed
            .lines()
            .find_map(|l| l.split("Authentications that can continue: ").nth(1))
            .unwrap_or_else(|| panic!("no methods offered:\n{printed}"))
            .trim()
            .to_owned()
    }

    /// The agent's CLI, `--json`; exit status and output.
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let mut all = vec!["instance-agent", "--json"];
        all.extend_from_slice(args);
        let out = self.exec(&all);
        (out.status.success(), text(&out))
    }

    #[track_caller]
    fn cli_ok(&self, args: &[&str]) -> serde_json::Value {
        let (ok, printed) = self.cli(args);
        assert!(ok, "{args:?} failed:\n{printed}");
        serde_json::from_str(&printed).unwrap_or_else(|e| panic!("{args:?}: {e}: {printed}"))
    }

    /// `access ssh show`: (agrees, the status).
    fn show(&self) -> (bool, serde_json::Value) {
        let out = self.exec(&["instance-agent", "--json", "access", "ssh", "show"]);
        let status = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("show: {e}: {}", text(&out)));
        (out.status.success(), status)
    }

    fn enable(&self) -> serde_json::Value {
        let key = format!("{KEY}.pub");
        self.cli_ok(&[
            "access",
            "ssh",
            "enable",
            "--port",
            PORT,
            "--user",
            USER,
            "--key-file",
            &key,
        ])
    }

    fn unit(&self, unit: &str) -> (String, String) {
        let out = self.system.booted.ok(&[
            "systemctl",
            "show",
            "--property=ActiveState,LoadState",
            unit,
        ]);
        let get = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_default()
                .to_owned()
        };
        (get("ActiveState"), get("LoadState"))
    }

    /// Opens a session that outlives the command (a transient unit runs the
    /// client) with a terminal (so sshd records it in utmp), and beats into
    /// [`BEAT`] five times a second.
    fn open_session(&self) {
        self.system.booted.write(
            "/usr/local/bin/beat",
            &format!("#!/bin/sh\nwhile :; do date +%s%N > {BEAT}; sleep 0.2; done\n"),
        );
        self.system
            .booted
            .ok(&["chmod", "0755", "/usr/local/bin/beat"]);
        let target = format!("{USER}@127.0.0.1");
        self.system.booted.ok(&[
            "systemd-run",
            "--quiet",
            "--unit=held-ssh",
            "--",
            "ssh",
            "-n",
            "-tt",
            "-i",
            KEY,
            "-p",
            PORT,
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            &target,
            "/usr/local/bin/beat",
        ]);
        self.beat_moves("the held session beats");
    }

    fn beat(&self) -> String {
        std::fs::read_to_string(self.system.booted.host_path(BEAT)).unwrap_or_default()
    }

    /// Waits until the heartbeat changes: the session is alive now.
    #[track_caller]
    fn beat_moves(&self, what: &str) {
        let before = self.beat();
        wait_for(what, Duration::from_secs(20), || {
            let now = self.beat();
            when(!now.is_empty() && now != before, (), (&before, &now))
        });
    }

    /// The sessions the agent lists for the user.
    fn sessions(&self) -> Vec<serde_json::Value> {
        let list = self.cli_ok(&["access", "sessions"]);
        list["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s["user"] == USER)
            .collect()
    }

    fn journal_audit(&self) -> String {
        self.system
            .booted
            .journal(Some(common::booted_agent::UNIT))
            .lines()
            .filter(|l| l.contains("audit"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The public key's base64, which must never reach the agent's log.
fn key_material(rig: &Rig) -> String {
    let public = rig.system.booted.ok(&["cat", &format!("{KEY}.pub")]);
    public
        .split_whitespace()
        .nth(1)
        .expect("key base64")
        .to_owned()
}

#[test]
fn ssh_service_enable_refuse_passwords_disable_with_a_live_session_and_enable_again() {
    let Some(rig) = Rig::new(|system| {
        // cloud-init's drop-in turns passwords on; the agent's must win.
        system.booted.write(
            "/etc/ssh/sshd_config.d/50-cloud-init.conf",
            "PasswordAuthentication yes\n",
        );
    }) else {
        return;
    };
    // Before any policy the agent leaves sshd alone.
    let (_, status) = rig.show();
    assert!(status["managed"].is_null(), "{status}");
    assert!(rig.offered_methods("22").contains("password"));

    let status = rig.enable();
    assert_eq!(status["agrees"], true, "{status}");
    assert_eq!(status["listener"], "SSH_LISTENER_SERVICE", "{status}");
    eprintln!("sshd: {}", status["sshdVersion"]);
    rig.assert_login(PORT);
    // Password logins are refused despite 50-cloud-init.conf: sshd offers
    // only public keys.
    assert_eq!(rig.offered_methods(PORT), "publickey");
    let effective = &status["effective"];
    assert!(
        effective["passwordAuthentication"].is_null(),
        "sshd -T: {effective}"
    );
    // The files: the drop-in first, keys root-owned 0644 below root-owned dirs.
    let stat = rig.system.booted.ok(&[
        "stat",
        "-c",
        "%n %U %a",
        "/etc/ssh/sshd_config.d/00-instance-agent.conf",
        "/etc/ssh/instance-agent",
        "/etc/ssh/instance-agent/authorized_keys",
        "/etc/ssh/instance-agent/authorized_keys/azureuser",
    ]);
    assert_eq!(
        stat,
        "/etc/ssh/sshd_config.d/00-instance-agent.conf root 644\n\
         /etc/ssh/instance-agent root 755\n\
         /etc/ssh/instance-agent/authorized_keys root 755\n\
         /etc/ssh/instance-agent/authorized_keys/azureuser root 644\n"
    );

    // A session open while SSH is turned off lives on; new ones are refused.
    rig.open_session();
    let sessions = rig.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert!(sessions[0]["pid"].as_u64().is_some(), "{sessions:?}");
    // Its address from utmp (the session has a terminal).
    assert_eq!(sessions[0]["fromAddress"], "127.0.0.1", "{sessions:?}");
    assert_eq!(sessions[0]["source"], "utmp", "{sessions:?}");
    assert!(
        sessions[0]["tty"]
            .as_str()
            .is_some_and(|t| t.starts_with("pts/")),
        "{sessions:?}"
    );
    let status = rig.cli_ok(&["access", "ssh", "disable"]);
    assert_eq!(status["agrees"], true, "{status}");
    assert_eq!(
        rig.unit("ssh.service"),
        ("inactive".into(), "masked".into())
    );
    rig.assert_refused(PORT);
    rig.beat_moves("the session opened before disable still beats");
    assert_eq!(rig.unit("held-ssh.service").0, "active");

    // Enabled again: the unit unmasked, started, the key works.
    let status = rig.cli_ok(&["access", "ssh", "enable"]);
    assert_eq!(status["agrees"], true, "{status}");
    rig.assert_login(PORT);
    rig.beat_moves("the held session still beats");

    // A bad key line is refused naming its file and line; nothing changes.
    rig.system.booted.write(
        "/root/more.pub",
        "# two keys\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA!!notbase64 bad@key\n",
    );
    let (ok, printed) = rig.cli(&["access", "ssh", "keys", "--add", "/root/more.pub"]);
    assert!(!ok, "a bad key was accepted:\n{printed}");
    assert!(
        printed.contains("/root/more.pub line 2") && printed.contains("authorized_keys[1]"),
        "{printed}"
    );
    rig.assert_login(PORT);

    // The audit lines name fingerprints, never key material.
    let audit = rig.journal_audit();
    assert!(audit.contains("SSH policy changed"), "{audit}");
    assert!(audit.contains("SHA256:"), "{audit}");
    assert!(!audit.contains(&key_material(&rig)), "{audit}");
}

#[test]
fn a_refused_or_failing_change_leaves_the_old_key_working_and_drift_is_repaired_at_start() {
    let Some(rig) = Rig::new(|_| {}) else {
        return;
    };
    rig.enable();
    rig.assert_login(PORT);

    // A broken sshd config: `sshd -t` refuses it before anything changes.
    rig.system.booted.write(
        "/etc/ssh/sshd_config.d/60-broken.conf",
        "NoSuchKeyword yes\n",
    );
    let (ok, printed) = rig.cli(&["access", "ssh", "enable", "--allow-tcp-forwarding", "true"]);
    assert!(!ok, "{printed}");
    assert!(printed.contains("sshd -t refuses"), "{printed}");
    assert!(printed.contains("NoSuchKeyword"), "{printed}");
    rig.assert_login(PORT);
    rig.exec(&["rm", "/etc/ssh/sshd_config.d/60-broken.conf"]);

    // A main config that would not let the drop-in win is refused with the
    // reason, and never edited: no `Include` of the directory, or a drop-in
    // that sorts first and sets one of the agent's keywords.
    let main = rig.system.booted.ok(&["cat", "/etc/ssh/sshd_config"]);
    let without_include: String = main
        .lines()
        .filter(|l| !l.starts_with("Include "))
        .map(|l| format!("{l}\n"))
        .collect();
    rig.system
        .booted
        .write("/etc/ssh/sshd_config", &without_include);
    let (ok, printed) = rig.cli(&["access", "ssh", "enable", "--port", "2223"]);
    assert!(!ok, "{printed}");
    assert!(printed.contains("has no `Include`"), "{printed}");
    assert_eq!(
        rig.system.booted.ok(&["cat", "/etc/ssh/sshd_config"]),
        without_include
    );
    rig.system.booted.write("/etc/ssh/sshd_config", &main);
    rig.system.booted.write(
        "/etc/ssh/sshd_config.d/00-aaa.conf",
        "PasswordAuthentication yes\n",
    );
    let (ok, printed) = rig.cli(&["access", "ssh", "enable", "--port", "2223"]);
    assert!(!ok, "{printed}");
    assert!(
        printed.contains("00-aaa.conf line 1 sets passwordauthentication"),
        "{printed}"
    );
    rig.exec(&["rm", "/etc/ssh/sshd_config.d/00-aaa.conf"]);
    rig.assert_login(PORT);

    // A change that passes `sshd -t` but fails once applied (its port is
    // taken: the reloaded sshd cannot bind it and exits) is rolled back.
    rig.system.booted.ok(&[
        "systemd-run",
        "--quiet",
        "--unit=squatter",
        "--",
        "busybox",
        "httpd",
        "-f",
        "-p",
        "2299",
        "-h",
        "/tmp",
    ]);
    wait_for("the squatter listens", Duration::from_secs(10), || {
        let out = rig.exec(&["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/2299"]);
        when(out.status.success(), (), text(&out))
    });
    let (ok, printed) = rig.cli(&["access", "ssh", "enable", "--port", "2299"]);
    assert!(!ok, "{printed}");
    assert!(printed.contains("rolled back"), "{printed}");
    assert!(printed.contains("2299"), "{printed}");
    rig.assert_login(PORT);
    let (agrees, status) = rig.show();
    assert!(agrees, "{status}");
    assert_eq!(status["policy"]["port"], 2222, "{status}");
    assert!(
        status["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("rolled back")),
        "{status}"
    );

    // A drop-in changed by hand is drift, reported at once and repaired at
    // the agent's next start.
    let drop_in = "/etc/ssh/sshd_config.d/00-instance-agent.conf";
    let written = rig.system.booted.ok(&["cat", drop_in]);
    rig.system
        .booted
        .write(drop_in, &format!("PasswordAuthentication yes\n{written}"));
    let (agrees, status) = rig.show();
    assert!(!agrees, "{status}");
    assert!(status["drift"].to_string().contains(drop_in), "{status}");
    let condition = rig.cli_ok(&["status"])["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "ssh").cloned())
        .expect("an ssh condition");
    assert_eq!(
        condition["state"], "CONDITION_STATE_DEGRADED",
        "{condition}"
    );
    rig.system.systemctl_ok(&["restart"]);
    wait_for("the drop-in repaired", Duration::from_secs(30), || {
        let (agrees, status) = rig.show();
        when(agrees, (), status)
    });
    assert_eq!(rig.system.booted.ok(&["cat", drop_in]), written);
    assert_eq!(rig.offered_methods(PORT), "publickey");
    rig.assert_login(PORT);
}

#[test]
fn under_socket_activation_the_socket_gets_the_port_and_is_masked_when_disabled() {
    let Some(rig) = Rig::new(|system| {
        system
            .booted
            .ok(&["systemctl", "disable", "--now", "ssh.service"]);
        system
            .booted
            .ok(&["systemctl", "enable", "--now", "ssh.socket"]);
    }) else {
        return;
    };
    assert_eq!(rig.unit("ssh.socket").0, "active");
    let status = rig.enable();
    assert_eq!(status["listener"], "SSH_LISTENER_SOCKET", "{status}");
    assert_eq!(status["agrees"], true, "{status}");
    rig.assert_login(PORT);
    // The socket listens on the policy's port only.
    rig.assert_refused("22");

    rig.open_session();
    assert_eq!(rig.sessions().len(), 1);
    let status = rig.cli_ok(&["access", "ssh", "disable"]);
    assert_eq!(status["agrees"], true, "{status}");
    assert_eq!(rig.unit("ssh.socket"), ("inactive".into(), "masked".into()));
    rig.assert_refused(PORT);
    rig.beat_moves("the session opened before disable still beats");

    rig.cli_ok(&["access", "ssh", "enable"]);
    rig.assert_login(PORT);
    // Asked to, disabling ends the open sessions too.
    rig.cli_ok(&["access", "ssh", "disable", "--terminate-sessions"]);
    wait_for("the held session ended", Duration::from_secs(20), || {
        let state = rig.unit("held-ssh.service").0;
        when(state != "active", (), state)
    });
    assert!(rig.sessions().is_empty());
    rig.assert_refused(PORT);
}

//! The agent's unit and package under a real systemd: each test boots a
//! fresh Debian 12 container (tests/common/nspawn.rs, about half a second),
//! installs the package of the binary under test with `dpkg -i`, and drives
//! the unit with `systemctl` and the agent with its own CLI, both run inside.
//! Jobs run on the host's Docker engine, whose socket is bound in; the
//! directory they mount is seen at the same path inside and outside.
//!
//! Needs root, mmdebstrap, systemd-nspawn, cargo-deb and the Docker engine
//! with the local test image. Without them each test says so and passes,
//! unless INSTANCE_AGENT_REQUIRE_SYSTEMD_TEST=1 (scripts/test.sh prepares
//! the host and sets it).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::booted_agent::{System, TIMEOUT_STOP, UNIT, wait_for, when};

#[test]
fn start_reports_ready_and_status_and_reload_applies_a_live_key() {
    let Some(system) = System::new("") else {
        return;
    };
    // Installed as for an image: enabled, not started.
    let (_, enabled) = system.systemctl(&["is-enabled"]);
    assert_eq!(enabled.trim(), "enabled");
    assert_eq!(system.property("ActiveState"), "inactive");

    // Type=notify: `systemctl start` returns once the agent sent READY=1.
    system.start();
    let state = system.show(&["SubState", "StatusText", "NRestarts"]);
    assert_eq!(state["SubState"], "running", "{state:?}");
    assert_eq!(state["NRestarts"], "0", "{state:?}");
    let status = system.cli(&["status"]);
    let capacity = status["slots"]["capacity"].as_u64().expect("capacity");
    // STATUS= carries the agent's summary ("healthy", or what is wrong) and
    // its slots, refreshed every status_interval_seconds.
    let text = wait_for(
        "StatusText with the summary",
        Duration::from_secs(20),
        || {
            let text = system.property("StatusText");
            let summary = system.cli(&["status"])["summary"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let seen = (text.clone(), summary.clone());
            when(
                !summary.is_empty()
                    && text.starts_with(&summary)
                    && text.contains(&format!("slots 0/{capacity}")),
                text,
                seen,
            )
        },
    );
    eprintln!("StatusText={text}");

    // A live key (jobs.slots), applied by `systemctl reload` (SIGHUP).
    let wanted = capacity + 3;
    system.write_config(&format!("slots = {wanted}\n"));
    system.systemctl_ok(&["reload"]);
    wait_for("the new capacity", Duration::from_secs(20), || {
        let capacity = system.cli(&["status"])["slots"]["capacity"].as_u64();
        when(capacity == Some(wanted), (), capacity)
    });
    wait_for(
        "StatusText with the new capacity",
        Duration::from_secs(20),
        || {
            let text = system.property("StatusText");
            when(text.contains(&format!("slots 0/{wanted}")), (), text)
        },
    );
    let journal = system.booted.journal(Some(UNIT));
    assert!(
        journal.contains("SIGHUP: reloading config"),
        "the reload reached the agent as SIGHUP:\n{journal}"
    );
    let state = system.show(&["ActiveState", "NRestarts", "MainPID"]);
    assert_eq!(state["ActiveState"], "active", "{state:?}");
    assert_eq!(
        state["NRestarts"], "0",
        "a reload is not a restart: {state:?}"
    );
}

#[test]
fn a_frozen_agent_is_killed_by_the_watchdog_and_restarted_and_its_job_survives() {
    let Some(system) = System::new("") else {
        return;
    };
    // A short watchdog for the test; everything else is the unit's.
    system.booted.write(
        "/etc/systemd/system/instance-agent.service.d/50-test-watchdog.conf",
        "[Service]\nWatchdogSec=3\n",
    );
    system.booted.ok(&["systemctl", "daemon-reload"]);
    system.start();
    assert_eq!(system.property("WatchdogUSec"), "3s");
    system.submit_waiting_job("survivor");
    let running = system.wait_job("survivor", "JOB_STATE_RUNNING");
    let container = running["containerId"]
        .as_str()
        .expect("container id")
        .to_owned();

    let frozen = system.property("MainPID");
    let stopped_at = Instant::now();
    system.booted.ok(&["kill", "-STOP", &frozen]);
    // systemd sends the watchdog signal (SIGABRT) followed by SIGCONT, so
    // even a stopped agent dies at once; at worst it is SIGKILLed after
    // TimeoutAbortSec= (= TimeoutStopSec=). Restarted after RestartSec=.
    let limit = Duration::from_secs(3) + TIMEOUT_STOP + Duration::from_secs(30);
    wait_for("a restarted agent", limit, || {
        let state = system.show(&["ActiveState", "SubState", "MainPID", "NRestarts"]);
        let restarted = state["NRestarts"] == "1"
            && state["SubState"] == "running"
            && state["MainPID"] != frozen;
        when(restarted, (), state)
    });
    eprintln!(
        "frozen agent replaced after {:.1?} (WatchdogSec=3, TimeoutStopSec=15, RestartSec=2)",
        stopped_at.elapsed()
    );
    let journal = system.booted.journal(Some(UNIT));
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    for line in journal
        .lines()
        .filter(|l| l.contains("Watchdog") || l.contains("Main process exited"))
    {
        eprintln!("{line}");
    }

    // The job's container ran on; the new agent adopted it.
    assert!(system.container_running(&container));
    let job = system.job("survivor");
    assert_eq!(job["state"], "JOB_STATE_RUNNING", "{job}");
    assert_eq!(job["containerId"], container.as_str(), "{job}");
    system.release("survivor");
    let done = system.wait_job("survivor", "JOB_STATE_SUCCEEDED");
    assert_eq!(done["exitCode"], "0", "{done}");
    assert_eq!(system.runs("survivor"), 1, "the job ran once");
}

#[test]
fn a_bad_config_fails_the_unit_with_78_and_it_does_not_restart() {
    let Some(system) = System::new("slots_per_core = 0\n") else {
        return;
    };
    let (ok, printed) = system.systemctl(&["start"]);
    assert!(!ok, "started on a bad config: {printed}");
    // A unit that would be restarted waits in "auto-restart"; one that
    // RestartPreventExitStatus= keeps from it is "failed" at once.
    let state = system.show(&[
        "ActiveState",
        "SubState",
        "Result",
        "ExecMainStatus",
        "NRestarts",
    ]);
    assert_eq!(state["ActiveState"], "failed", "{state:?}");
    assert_eq!(state["SubState"], "failed", "{state:?}");
    assert_eq!(state["Result"], "exit-code", "{state:?}");
    assert_eq!(state["ExecMainStatus"], "78", "{state:?}");
    assert_eq!(state["NRestarts"], "0", "{state:?}");
    let journal = system.booted.journal(Some(UNIT));
    assert!(journal.contains("jobs.slots_per_core"), "{journal}");

    // Fixed, the unit starts again.
    system.write_config("");
    system.systemctl_ok(&["restart"]);
    assert_eq!(system.property("ActiveState"), "active");
}

/// The script of a declared setup script: waits until `<shared>/<name>.go`
/// exists.
fn waiting_script(system: &System, path: &str, name: &str) {
    let go = system.booted.shared().join(format!("{name}.go"));
    system.booted.write(
        path,
        &format!(
            "#!/bin/sh\necho waiting for {0}\nwhile [ ! -e {0} ]; do sleep 0.2; done\necho done\n",
            go.display()
        ),
    );
    system.booted.ok(&["chmod", "0755", path]);
}

/// The setup runs of `kind` (`SETUP_KIND_CREATION`, ...), oldest first, as
/// (state, attempt).
fn runs_of(system: &System, kind: &str) -> Vec<(String, u64)> {
    let list = system.cli(&["setup", "list"]);
    let mut runs: Vec<(String, String, u64)> = list["runs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|run| run["kind"] == kind)
        .map(|run| {
            (
                run["createdAt"].as_str().unwrap_or_default().to_owned(),
                run["state"].as_str().unwrap_or_default().to_owned(),
                run["attempt"].as_u64().unwrap_or(1),
            )
        })
        .collect();
    runs.sort();
    runs.into_iter()
        .map(|(_, state, attempt)| (state, attempt))
        .collect()
}

/// Waits until the runs of `kind` satisfy `done`.
#[track_caller]
fn wait_runs(system: &System, kind: &str, what: &str, done: impl Fn(&[(String, u64)]) -> bool) {
    wait_for(what, Duration::from_secs(30), || {
        let runs = runs_of(system, kind);
        when(done(&runs), (), runs)
    });
}

/// The id of the only run of `kind`.
fn run_id_of(system: &System, kind: &str) -> String {
    let list = system.cli(&["setup", "list"]);
    let ids: Vec<String> = list["runs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|run| run["kind"] == kind)
        .filter_map(|run| run["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 1, "{list}");
    ids[0].clone()
}

/// `systemctl show` of another unit.
fn unit_show(
    system: &System,
    unit: &str,
    properties: &[&str],
) -> std::collections::HashMap<String, String> {
    system
        .booted
        .ok(&[
            "systemctl",
            "show",
            "--property",
            &properties.join(","),
            unit,
        ])
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn restart_and_upgrade_during_a_job_setup_scripts_and_a_mount_lose_nothing() {
    let Some(system) = System::new(
        "\n[setup]\ngate_jobs = false\n\
         [[setup.scripts]]\nkind = \"creation\"\npath = \"/usr/local/bin/ia-create.sh\"\n\
         [[setup.scripts]]\nkind = \"startup\"\npath = \"/usr/local/bin/ia-startup.sh\"\n\
         [mounts]\nblobfuse2_path = \"/usr/local/bin/blobfuse2\"\nhealth_interval_seconds = 1\ndefault_owner = \"root\"\n",
    ) else {
        return;
    };
    let with_mount = system.install_blobfuse2_standin();
    waiting_script(&system, "/usr/local/bin/ia-create.sh", "create");
    waiting_script(&system, "/usr/local/bin/ia-startup.sh", "startup");
    let creation = "SETUP_KIND_CREATION";
    let startup = "SETUP_KIND_STARTUP";
    let running = "SETUP_RUN_STATE_RUNNING";
    system.start();
    let supervision = system.cli(&["status"])["host"]["supervision"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        supervision.contains("setup scripts: systemd transient services")
            && supervision.contains("mounts: systemd transient services"),
        "{supervision}"
    );
    system.submit_waiting_job("long");
    let container = system.wait_job("long", "JOB_STATE_RUNNING")["containerId"]
        .as_str()
        .expect("container id")
        .to_owned();
    let mounted = "MOUNT_STATE_MOUNTED";
    let mount_unit = "instance-agent-mount-data.service";
    let mount_pid = if with_mount {
        system.booted.ok(&[
            "instance-agent",
            "mounts",
            "mount",
            "data",
            "--account",
            "acct",
            "--container",
            "data",
            "--path",
            "/mnt/data",
            "--account-key-file",
            "/etc/instance-agent/data.key",
        ]);
        let mount = system.mount("data");
        assert_eq!(mount["state"], mounted, "{mount}");
        // blobfuse2 is its own unit's main process, forked by PID 1, and
        // its mount is in the host's mount namespace (PID 1's), not only in
        // the sandboxed agent's own.
        let unit = unit_show(&system, mount_unit, &["ActiveState", "MainPID"]);
        assert_eq!(unit["ActiveState"], "active", "{unit:?}");
        assert_eq!(
            Some(unit["MainPID"].parse::<u64>().unwrap_or(0)),
            mount["pid"].as_u64()
        );
        let host_ns = system.booted.ok(&["cat", "/proc/1/mountinfo"]);
        assert!(
            host_ns
                .lines()
                .any(|l| l.contains(" /mnt/data ") && l.contains(" - fuse blobfuse2")),
            "{host_ns}"
        );
        let agent = system.property("MainPID");
        let agent_ns = system
            .booted
            .ok(&["readlink", &format!("/proc/{agent}/ns/mnt")]);
        let host_mnt_ns = system.booted.ok(&["readlink", "/proc/1/ns/mnt"]);
        assert_ne!(
            agent_ns, host_mnt_ns,
            "the agent has a mount namespace of its own"
        );
        mount["pid"].as_u64()
    } else {
        None
    };
    // The mount is up, made by the same blobfuse2, never repaired.
    let mount_adopted = |after: &str| {
        if !with_mount {
            return;
        }
        let mount = wait_for(
            &format!("the mount adopted after the {after}"),
            Duration::from_secs(30),
            || {
                let mount = system.mount("data");
                when(mount["state"] == mounted, mount.clone(), &mount)
            },
        );
        assert_eq!(mount["pid"].as_u64(), mount_pid, "{after}: {mount}");
        assert_eq!(
            mount["remountCount"].as_u64().unwrap_or(0),
            0,
            "{after}: {mount}"
        );
        let read = system.booted.ok(&["cat", "/mnt/data/hello.txt"]);
        assert_eq!(read, "hello from storage\n", "{after}");
    };
    wait_runs(&system, creation, "the creation script running", |runs| {
        runs == [(running.to_owned(), 1)]
    });
    let creation_id = run_id_of(&system, creation);
    let creation_unit = format!("instance-agent-setup-{creation_id}.service");
    let script_pid = unit_show(&system, &creation_unit, &["MainPID"])["MainPID"].clone();
    assert_ne!(script_pid, "0");

    // 1. systemctl restart: the script runs on in its own unit and the new
    // agent takes it over: the same run, the same process, not re-run.
    let first = system.property("MainPID");
    system.systemctl_ok(&["restart"]);
    assert_ne!(system.property("MainPID"), first);
    assert_eq!(
        unit_show(&system, &creation_unit, &["MainPID"])["MainPID"],
        script_pid
    );
    wait_runs(&system, creation, "the creation script adopted", |runs| {
        runs == [(running.to_owned(), 1)]
    });
    assert_eq!(system.job("long")["state"], "JOB_STATE_RUNNING");
    assert!(system.container_running(&container));
    mount_adopted("restart");
    system.release("create");
    wait_runs(&system, startup, "the startup script running", |runs| {
        runs == [(running.to_owned(), 1)]
    });
    assert_eq!(
        runs_of(&system, creation),
        [("SETUP_RUN_STATE_SUCCEEDED".to_owned(), 1)]
    );
    // Its whole output is in its log, from before and after the restart.
    let log = system
        .booted
        .ok(&["instance-agent", "setup", "logs", &creation_id]);
    assert!(log.contains("waiting for") && log.contains("done"), "{log}");
    // Its unit is gone once the result is recorded.
    wait_for("the creation unit removed", Duration::from_secs(10), || {
        let state = unit_show(&system, &creation_unit, &["LoadState"]);
        when(state["LoadState"] == "not-found", (), state)
    });

    // 2. An upgrade as apt does it: the package installed again over the
    // running agent; its postinst restarts the unit.
    let startup_id = run_id_of(&system, startup);
    let before = system.property("MainPID");
    system.booted.install_deb(system.deb, true);
    let after = system.property("MainPID");
    assert_ne!(after, before, "the upgrade restarted the agent");
    assert_eq!(system.property("ActiveState"), "active");
    wait_runs(&system, startup, "the startup script adopted", |runs| {
        runs == [(running.to_owned(), 1)]
    });
    assert_eq!(run_id_of(&system, startup), startup_id);
    assert_eq!(system.job("long")["state"], "JOB_STATE_RUNNING");
    assert!(system.container_running(&container));
    mount_adopted("upgrade");

    // Everything finishes, each once.
    system.release("startup");
    system.release("long");
    wait_runs(&system, startup, "the startup script done", |runs| {
        runs == [("SETUP_RUN_STATE_SUCCEEDED".to_owned(), 1)]
    });
    let done = system.wait_job("long", "JOB_STATE_SUCCEEDED");
    assert_eq!(done["containerId"], container.as_str(), "{done}");
    assert_eq!(system.runs("long"), 1, "the job ran once");
    let jobs = system.cli(&["jobs", "list"]);
    let listed = jobs["jobs"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(listed, 1, "{jobs}");
    assert_eq!(runs_of(&system, creation).len(), 1);
    assert_eq!(system.property("NRestarts"), "0", "no crash on the way");

    // Unmounting acts in the host's namespace too (fusermount3 in a unit).
    if with_mount {
        system
            .booted
            .ok(&["instance-agent", "mounts", "unmount", "data"]);
        let host_ns = system.booted.ok(&["cat", "/proc/1/mountinfo"]);
        assert!(!host_ns.contains(" /mnt/data "), "{host_ns}");
    }
}

#[test]
fn a_script_unit_runs_as_its_user_with_its_environment_and_its_timeout_kills_the_whole_unit() {
    let Some(system) = System::new(
        "\n[setup]\ngate_jobs = false\n\
         [[setup.scripts]]\nkind = \"startup\"\npath = \"/usr/local/bin/ia-timeout.sh\"\n\
         timeout = \"4s\"\nrun_as = \"nobody\"\nworking_dir = \"/tmp\"\n\
         env = { ODD = \"it's $HOME \\\"q\\\" \\\\n end\" }\n",
    ) else {
        return;
    };
    system.booted.write(
        "/usr/local/bin/ia-timeout.sh",
        "#!/bin/sh\nprintf 'odd=[%s]\\n' \"$ODD\"\necho \"uid=$(id -u)\"\nsleep 1001 &\necho started child\nexec sleep 1002\n",
    );
    system
        .booted
        .ok(&["chmod", "0755", "/usr/local/bin/ia-timeout.sh"]);
    system.start();
    wait_runs(
        &system,
        "SETUP_KIND_STARTUP",
        "the script timed out",
        |runs| runs == [("SETUP_RUN_STATE_TIMED_OUT".to_owned(), 1)],
    );
    let id = run_id_of(&system, "SETUP_KIND_STARTUP");
    let log = system.booted.ok(&["instance-agent", "setup", "logs", &id]);
    assert!(log.contains("odd=[it's $HOME \"q\" \\n end]"), "{log}");
    assert!(log.contains("uid=65534"), "{log}");
    let run = system.cli(&["setup", "show", &id]);
    assert!(
        run["message"]
            .as_str()
            .unwrap_or_default()
            .contains("timeout"),
        "{run}"
    );
    // The whole unit went: the script and the child it left.
    let unit = format!("instance-agent-setup-{id}.service");
    wait_for("the unit removed", Duration::from_secs(10), || {
        let state = unit_show(&system, &unit, &["LoadState"]);
        when(state["LoadState"] == "not-found", (), state)
    });
    let left = system.booted.exec(&["pgrep", "-f", "sleep 100[12]"]);
    assert!(
        !left.status.success(),
        "left running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    let journal = system.booted.journal(Some(&unit));
    assert!(
        journal.contains("timeout") || journal.contains("Timeout"),
        "{journal}"
    );
}

#[test]
fn stop_is_clean_within_timeout_stop_sec_and_leaves_the_job_running() {
    let Some(system) = System::new("") else {
        return;
    };
    system.start();
    system.submit_waiting_job("outlives");
    let container = system.wait_job("outlives", "JOB_STATE_RUNNING")["containerId"]
        .as_str()
        .expect("container id")
        .to_owned();
    let started = Instant::now();
    system.systemctl_ok(&["stop"]);
    let took = started.elapsed();
    eprintln!("systemctl stop took {took:.2?}");
    assert!(took < TIMEOUT_STOP, "stop took {took:?}");
    let state = system.show(&["ActiveState", "Result", "ExecMainCode", "ExecMainStatus"]);
    assert_eq!(state["ActiveState"], "inactive", "{state:?}");
    assert_eq!(state["Result"], "success", "{state:?}");
    // CLD_EXITED (1) with status 0: the agent exited by itself on SIGTERM.
    assert_eq!(state["ExecMainCode"], "1", "{state:?}");
    assert_eq!(state["ExecMainStatus"], "0", "{state:?}");
    let journal = system.booted.journal(Some(UNIT));
    assert!(
        !journal.contains("Killing process") && !journal.contains("timed out"),
        "{journal}"
    );
    // KillMode=process: the job's container is the engine's, not the unit's.
    assert!(system.container_running(&container));
}

#[test]
fn the_package_creates_the_group_and_directories_and_the_socket_is_0660() {
    let Some(system) = System::new("") else {
        return;
    };
    // Made by the postinst (sysusers, tmpfiles) before any start.
    let group = system.booted.ok(&["getent", "group", "instance-operators"]);
    assert!(group.starts_with("instance-operators:x:"), "{group}");
    let modes = |paths: &[&str]| {
        let mut args = vec!["stat", "-c", "%a %U:%G %n"];
        args.extend_from_slice(paths);
        system.booted.ok(&args)
    };
    let dirs = [
        "/var/lib/instance-agent",
        "/var/log/instance-agent",
        "/run/instance-agent",
        "/etc/instance-agent",
    ];
    let expected = "700 root:root /var/lib/instance-agent\n\
                    750 root:root /var/log/instance-agent\n\
                    711 root:root /run/instance-agent\n\
                    750 root:root /etc/instance-agent\n";
    assert_eq!(modes(&dirs), expected, "before the first start");

    system.start();
    assert_eq!(
        modes(&dirs),
        expected,
        "after the start (the unit's *Directory=)"
    );
    assert_eq!(
        modes(&["/run/instance-agent/agent.sock"]),
        "660 root:instance-operators /run/instance-agent/agent.sock\n"
    );
    // The socket from the host, through the container's root.
    let socket = system.booted.host_path("/run/instance-agent/agent.sock");
    let status = common::run_ok(
        Command::new(common::binary())
            .arg("--socket")
            .arg(&socket)
            .args(["--json", "status"]),
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(status["instanceId"], system.instance_id.as_str());
}

#[test]
fn systemd_analyze_security_rates_the_unit_at_most_5() {
    let Some(system) = System::new("") else {
        return;
    };
    let report = system.booted.ok(&[
        "systemd-analyze",
        "security",
        "--no-pager",
        "instance-agent.service",
    ]);
    let exposure = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for instance-agent.service: "))
        .and_then(|(_, level)| level.split_whitespace().next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no exposure line in:\n{report}"));
    println!("systemd exposure (systemd-analyze security, booted) | {exposure}");
    eprintln!("{report}");
    let level: f64 = exposure.parse().expect("a number");
    assert!(level <= 5.0, "exposure {level} > 5.0:\n{report}");
}

/// A mount of a user's under systemd (issue 13): blobfuse2 is its unit's
/// main process with `User=` the owner, its mount point a staging entry
/// made through PID 1 (the sandboxed agent may not mount: `paths::privileged`)
/// and bound onto the mount path in the host's namespace; only the owner
/// (and root) get in; after an agent restart the same process is adopted
/// by its unit's `MainPID` (the agent may not read the owner's
/// `/proc/PID/exe`).
#[test]
fn a_users_mount_runs_as_them_through_pid_1_and_only_they_get_in() {
    let Some(system) = System::new(
        "\n[mounts]\nblobfuse2_path = \"/usr/local/bin/blobfuse2\"\nhealth_interval_seconds = 1\n\
         default_owner = \"ia-owner\"\n",
    ) else {
        return;
    };
    if !system.install_blobfuse2_standin() {
        return;
    }
    for user in ["ia-owner", "ia-other"] {
        system
            .booted
            .ok(&["useradd", "-M", "-U", "-s", "/bin/sh", user]);
    }
    system
        .booted
        .ok(&["chown", "-R", "ia-owner:ia-owner", "/srv/storage"]);
    // The package's postinst: allow_root for a user's FUSE mount.
    let fuse_conf = system.booted.ok(&["cat", "/etc/fuse.conf"]);
    assert!(
        fuse_conf.lines().any(|l| l.trim() == "user_allow_other"),
        "{fuse_conf}"
    );
    system.start();
    system.booted.ok(&[
        "instance-agent",
        "mounts",
        "mount",
        "data",
        "--account",
        "acct",
        "--container",
        "data",
        "--path",
        "/mnt/data",
        "--account-key-file",
        "/etc/instance-agent/data.key",
    ]);
    let mount = system.mount("data");
    assert_eq!(mount["state"], "MOUNT_STATE_MOUNTED", "{mount}");
    let owner_uid = system.booted.ok(&["id", "-u", "ia-owner"]);
    let unit = unit_show(
        &system,
        "instance-agent-mount-data.service",
        &["ActiveState", "MainPID", "User"],
    );
    assert_eq!(unit["ActiveState"], "active", "{unit:?}");
    assert_eq!(unit["User"], owner_uid.trim(), "{unit:?}");
    let pid = mount["pid"].as_u64().expect("pid");
    assert_eq!(unit["MainPID"], pid.to_string());
    let status = system.booted.ok(&["cat", &format!("/proc/{pid}/status")]);
    assert!(
        status.lines().any(|l| l.starts_with("Uid:")
            && l.split_whitespace().nth(1) == Some(owner_uid.trim())),
        "{status}"
    );
    // In the host's namespace (PID 1's): the staging entry and its bind on
    // the mount path, both blobfuse2's.
    let host_ns = system.booted.ok(&["cat", "/proc/1/mountinfo"]);
    for at in [
        " /mnt/data ",
        " /run/instance-agent/staging/mounts/data.mnt ",
    ] {
        assert!(
            host_ns
                .lines()
                .any(|l| l.contains(at) && l.contains(" - fuse blobfuse2")),
            "{at}: {host_ns}"
        );
    }
    let listing = system.booted.ok(&["ls", "-ld", "/mnt/data"]);
    assert!(
        listing.starts_with("drwxr-x---") && listing.contains("ia-owner ia-owner"),
        "{listing}"
    );
    let owner = system.booted.ok(&[
        "runuser",
        "-u",
        "ia-owner",
        "--",
        "sh",
        "-c",
        "cat /mnt/data/hello.txt && echo mine > /mnt/data/mine.txt",
    ]);
    assert_eq!(owner, "hello from storage\n");
    let other = system.booted.exec(&[
        "runuser",
        "-u",
        "ia-other",
        "--",
        "cat",
        "/mnt/data/hello.txt",
    ]);
    assert!(!other.status.success(), "{other:?}");
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("Permission denied"),
        "{other:?}"
    );
    assert_eq!(
        system.booted.ok(&["cat", "/mnt/data/mine.txt"]),
        "mine\n",
        "root reads"
    );

    system.systemctl_ok(&["restart"]);
    let adopted = wait_for("the mount adopted", Duration::from_secs(30), || {
        let mount = system.mount("data");
        when(
            mount["state"] == "MOUNT_STATE_MOUNTED"
                && mount["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("adopted"),
            mount.clone(),
            &mount,
        )
    });
    assert_eq!(adopted["pid"].as_u64(), Some(pid), "{adopted}");
}

//! `instance-agent doctor` against the real binary: with the daemon up (real
//! Docker engine, real /dev/fuse), with it down, and the support bundle's
//! contents, including that no secret reaches it.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{Agent, cli, is_final};
use instance_agent::api::proto::{self, job_service_client::JobServiceClient};

/// The check names, in the order doctor runs them.
const ORDER: [&str; 10] = [
    "daemon",
    "config",
    "docker",
    "fuse",
    "blobfuse2",
    "disk",
    "mounts",
    "setup",
    "socket",
    "systemd",
];

/// (result, name, message) of every check line, and the fix lines.
fn parse_lines(stdout: &str) -> Vec<(String, String, String)> {
    stdout
        .lines()
        .filter(|l| l.starts_with("PASS") || l.starts_with("WARN") || l.starts_with("FAIL"))
        .map(|l| {
            let mut parts = l.splitn(2, "  ");
            let result = parts.next().unwrap_or_default().to_owned();
            let rest = parts.next().unwrap_or_default().trim_start();
            let (name, message) = rest.split_once("  ").unwrap_or((rest, ""));
            (result, name.to_owned(), message.trim().to_owned())
        })
        .collect()
}

fn check<'a>(lines: &'a [(String, String, String)], name: &str) -> &'a (String, String, String) {
    lines
        .iter()
        .find(|(_, n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} check in {lines:?}"))
}

/// The names in order of first appearance (disk, mounts and setup may have
/// one line per filesystem, mount or script).
fn order(names: impl Iterator<Item = String>) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for name in names {
        if seen.last() != Some(&name) {
            seen.push(name);
        }
    }
    seen
}

fn exit_code_of(result: &str) -> i32 {
    match result {
        "PASS" => 0,
        "WARN" => 1,
        "FAIL" => 2,
        other => panic!("unknown result {other}"),
    }
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the agent reaches the engine (doctor reports a condition not
/// checked yet as WARN). Other tests on the machine restart the engine, so
/// this waits out a restart, and gives up (the caller then accepts FAIL)
/// after a minute.
fn wait_for_docker_condition(agent: &Agent) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = cli(&agent.socket, &["--json", "status"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let up = status["conditions"].as_array().is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c["type"] == "docker" && c["state"] == "CONDITION_STATE_OK")
        });
        if up || std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn with_the_daemon_up_checks_run_in_order_and_the_exit_status_is_the_worst() {
    let agent = Agent::builder().start();
    wait_for_docker_condition(&agent);
    let config = agent.config_path.to_str().expect("utf-8");
    let out = cli(&agent.socket, &["doctor", "--config", config]);
    let text = stdout(&out);
    let lines = parse_lines(&text);
    assert_eq!(
        order(lines.iter().map(|(_, n, _)| n.clone())),
        ORDER,
        "{text}"
    );

    let daemon = check(&lines, "daemon");
    assert_eq!(daemon.0, "PASS", "{text}");
    assert!(daemon.2.contains(env!("CARGO_PKG_VERSION")), "{text}");
    assert_eq!(check(&lines, "config").0, "PASS", "{text}");
    // The engine started by scripts/test.sh answers, and its version is
    // shown; unless another test is restarting it right now, which must be
    // a failure naming the engine's socket.
    let docker = check(&lines, "docker");
    match docker.0.as_str() {
        "PASS" => assert!(docker.2.contains("reachable (API"), "{text}"),
        _ => {
            assert_eq!(docker.0, "FAIL", "{text}");
            assert!(docker.2.contains("/var/run/docker.sock"), "{text}");
        }
    }
    assert_eq!(check(&lines, "fuse").0, "PASS", "{text}");
    // Not under systemd on the test host.
    assert_eq!(check(&lines, "systemd").0, "PASS", "{text}");
    // The socket is 0660; WARN only about its group.
    let socket = check(&lines, "socket");
    assert!(socket.2.contains("mode 0660"), "{text}");
    assert_ne!(socket.0, "FAIL", "{text}");
    // Every problem comes with one fix line.
    let problems = lines.iter().filter(|(r, _, _)| r != "PASS").count();
    let fixes = text
        .lines()
        .filter(|l| l.trim_start().starts_with("fix: "))
        .count();
    assert_eq!(problems, fixes, "{text}");

    let worst = lines
        .iter()
        .map(|(r, _, _)| exit_code_of(r))
        .max()
        .expect("checks");
    assert_eq!(out.status.code(), Some(worst), "{text}");
    assert!(text.contains("doctor: "), "{text}");

    // --json: the same checks, the worst result, and a fix wherever not PASS.
    let out = cli(&agent.socket, &["--json", "doctor", "--config", config]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let checks = report["checks"].as_array().expect("checks array");
    assert_eq!(
        order(
            checks
                .iter()
                .map(|c| c["name"].as_str().expect("name").to_owned())
        ),
        ORDER
    );
    for c in checks {
        if c["result"] != "PASS" {
            assert!(c["fix"].as_str().is_some_and(|f| !f.is_empty()), "{c}");
        }
    }
    let result = report["result"].as_str().expect("result");
    assert_eq!(out.status.code(), Some(exit_code_of(result)));

    // A socket anyone may use is a failure.
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let out = cli(&agent.socket, &["doctor", "--config", config]);
    let text = stdout(&out);
    let socket = check(&parse_lines(&text), "socket").clone();
    assert_eq!(socket.0, "FAIL", "{text}");
    assert!(socket.2.contains("any local user"), "{text}");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn with_the_daemon_down_it_fails_naming_the_socket_and_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let absent_config = dir.path().join("config.toml");
    let config = absent_config.to_str().expect("utf-8");

    let out = cli(&socket, &["doctor", "--config", config]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let lines = parse_lines(&text);
    assert_eq!(order(lines.iter().map(|(_, n, _)| n.clone())), ORDER);
    let daemon = check(&lines, "daemon");
    assert_eq!(daemon.0, "FAIL");
    assert!(daemon.2.contains(&socket.display().to_string()), "{text}");
    assert!(
        text.contains("fix: start it: `systemctl start instance-agent`"),
        "{text}"
    );
    // An absent config means defaults, which is fine.
    assert_eq!(check(&lines, "config").0, "PASS", "{text}");
    for name in ["disk", "mounts", "setup"] {
        let line = check(&lines, name);
        assert_eq!(line.0, "WARN", "{text}");
        assert!(line.2.contains("not checked"), "{text}");
    }

    // A stale socket (its agent died) is told apart.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    let out = cli(&socket, &["doctor", "--config", config]);
    assert!(stdout(&out).contains("stale socket"), "{}", stdout(&out));

    // The bundle is still written, with notes for what could not be collected.
    let bundle = dir.path().join("support.tgz");
    let out = cli(
        &socket,
        &[
            "doctor",
            "--config",
            config,
            "--bundle",
            bundle.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let entries = read_bundle(&bundle);
    assert_eq!(
        entries.keys().collect::<Vec<_>>(),
        [
            "README.txt",
            "agent-log.txt",
            "config.txt",
            "doctor.json",
            "events.txt",
            "status.txt"
        ]
    );
    assert!(
        entries["status.txt"].contains("stale socket"),
        "{entries:?}"
    );
    assert!(
        entries["config.txt"].contains("does not exist"),
        "{entries:?}"
    );
    assert!(
        entries["agent-log.txt"].contains("--log-file"),
        "{entries:?}"
    );
}

#[test]
fn an_invalid_config_file_fails_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[jobs]\nslots_per_core = 0\n").expect("write");
    let out = cli(
        &dir.path().join("agent.sock"),
        &["doctor", "--config", config.to_str().expect("utf-8")],
    );
    let text = stdout(&out);
    let line = check(&parse_lines(&text), "config").clone();
    assert_eq!(line.0, "FAIL", "{text}");
    assert!(line.2.contains("jobs.slots_per_core"), "{text}");
    assert!(text.contains("instance-agent config check"), "{text}");
}

/// The bundle's entries by name (without the top directory); asserts the
/// layout and the archive's mode.
fn read_bundle(path: &Path) -> BTreeMap<String, String> {
    let mode = std::fs::metadata(path)
        .expect("bundle")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the bundle is private");
    let file = std::fs::File::open(path).expect("open bundle");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut entries = BTreeMap::new();
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("entry");
        let name = entry.path().expect("path").to_string_lossy().into_owned();
        let name = name
            .strip_prefix("instance-agent-bundle/")
            .unwrap_or_else(|| panic!("{name} outside the top directory"))
            .to_owned();
        let mut text = String::new();
        entry.read_to_string(&mut text).expect("utf-8 entry");
        entries.insert(name, text);
    }
    entries
}

#[tokio::test]
async fn the_bundle_holds_status_events_config_and_logs_without_secrets() {
    // For the suite-wide sweep of captured logs (scripts/check-test-logs.sh).
    common::register_secrets(&[
        "hunter2-env",
        "hunter2-key",
        "sv=2022&sig=hunter2-sas",
        "hunter2-pw",
        "hunter2-table",
    ]);
    let agent = Agent::builder().start();
    // A queued job whose environment carries a credential: its events are in
    // the backlog the bundle copies.
    let mut jobs = JobServiceClient::new(agent.channel().await);
    let job = jobs
        .submit_job(proto::SubmitJobRequest {
            spec: Some(proto::JobSpec {
                id: "bundle-job".into(),
                image: "instance-agent/busybox:test".into(),
                command: vec!["true".into()],
                env: [("HF_TOKEN".to_owned(), "hunter2-env".to_owned())].into(),
                ..Default::default()
            }),
        })
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(job.spec.expect("spec").env["HF_TOKEN"], "hunter2-env");

    // The agent's own config plus secret-looking keys (which the agent would
    // refuse, but the bundle must redact whatever the file holds).
    let config = agent.path().join("doctor-config.toml");
    let mut text = std::fs::read_to_string(&agent.config_path).expect("config");
    text.push_str(
        "[extra]\naccount_key = \"hunter2-key\"\nsas_token = \"sv=2022&sig=hunter2-sas\"\n\
         [extra.auth]\npassword = \"hunter2-pw\"\nnote = \"kept\"\n\
         [extra.secrets]\nanything = \"hunter2-table\"\n",
    );
    std::fs::write(&config, text).expect("write config");
    let bundle = agent.path().join("support.tgz");
    let out = cli(
        &agent.socket,
        &[
            "doctor",
            "--config",
            config.to_str().expect("utf-8"),
            "--bundle",
            bundle.to_str().expect("utf-8"),
            "--log-file",
            agent.log_path.to_str().expect("utf-8"),
        ],
    );
    // The extra keys make the config check fail.
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("support bundle written to"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let entries = read_bundle(&bundle);
    assert_eq!(
        entries.keys().collect::<Vec<_>>(),
        [
            "README.txt",
            "agent.log",
            "config.toml",
            "doctor.json",
            "events.json",
            "status.json"
        ]
    );
    for (name, text) in &entries {
        assert!(!text.contains("hunter2"), "a secret in {name}:\n{text}");
    }

    let status: serde_json::Value = serde_json::from_str(&entries["status.json"]).expect("status");
    assert_eq!(status["instanceId"], agent.instance_id.as_str());

    let events: Vec<serde_json::Value> =
        serde_json::from_str(&entries["events.json"]).expect("events");
    assert_eq!(events[0]["agent"]["phase"], "started", "{events:?}");
    let job_event = events
        .iter()
        .find(|e| e["job"]["job"]["spec"]["id"] == "bundle-job")
        .unwrap_or_else(|| panic!("no event of bundle-job in {events:?}"));
    assert_eq!(
        job_event["job"]["job"]["spec"]["env"]["HF_TOKEN"],
        "<redacted>"
    );
    // Read up to the status's last sequence, not beyond or short of it.
    let last = status["lastEventSequence"]
        .as_str()
        .expect("uint64 as string")
        .parse::<u64>()
        .expect("number");
    let sequences: Vec<u64> = events
        .iter()
        .map(|e| {
            e["sequence"]
                .as_str()
                .expect("seq")
                .parse()
                .expect("number")
        })
        .collect();
    assert_eq!(sequences, (1..=last).collect::<Vec<_>>());

    let config = &entries["config.toml"];
    let parsed: toml::Table = config.parse().expect("the redacted config is TOML");
    assert_eq!(parsed["extra"]["account_key"].as_str(), Some("<redacted>"));
    assert_eq!(parsed["extra"]["auth"]["note"].as_str(), Some("kept"));
    assert_eq!(
        parsed["agent"]["socket"].as_str(),
        Some(agent.socket.to_str().expect("utf-8"))
    );

    assert!(
        entries["agent.log"].contains("instance-agent ready"),
        "{}",
        entries["agent.log"]
    );
    let report: serde_json::Value = serde_json::from_str(&entries["doctor.json"]).expect("doctor");
    assert_eq!(report["result"], "FAIL");
    assert!(entries["README.txt"].contains("support bundle"));

    // Let the job end, so that no container is being created as the agent
    // is killed (it would outlive the test).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !is_final(
        jobs.get_job(proto::GetJobRequest {
            id: "bundle-job".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .state(),
    ) && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Runs doctor until `name`'s check has `result` (runs and mounts settle
/// asynchronously), returning the JSON of that check.
fn wait_for_check(agent: &Agent, name: &str, result: &str) -> serde_json::Value {
    let config = agent.config_path.to_str().expect("utf-8");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = cli(&agent.socket, &["--json", "doctor", "--config", config]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let found = report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == name && c["result"] == result)
            .cloned();
        if let Some(check) = found {
            return check;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never became {result}: {report:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn a_failed_creation_script_and_a_failing_mount_fail_with_their_fixes() {
    let scripts = tempfile::tempdir().expect("tempdir");
    let script = scripts.path().join("create.sh");
    std::fs::write(&script, "#!/bin/sh\necho preparing\nexit 3\n").expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret = scripts.path().join("data.key");
    std::fs::write(&secret, "a2V5").expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mnt = scripts.path().join("mnt");
    std::fs::create_dir_all(mnt.join("data")).expect("mount dir");
    // blobfuse2 is /bin/false: the configured mount fails and is retried.
    let agent = Agent::builder()
        .config(&format!(
            "[mounts]\nblobfuse2_path = \"/bin/false\"\nallowed_roots = [{mnt:?}]\ncache_root = {:?}\ndefault_owner = \"root\"\n\
             [[mounts.mount]]\nname = \"data\"\naccount = \"acct\"\ncontainer = \"data\"\n\
             mount_path = {:?}\nauth = \"key\"\nsecret_file = {secret:?}\n\
             [[setup.scripts]]\nkind = \"creation\"\npath = {script:?}\n",
            scripts.path().join("cache"),
            mnt.join("data"),
        ))
        .start();

    let setup = wait_for_check(&agent, "setup", "FAIL");
    let message = setup["message"].as_str().expect("message");
    assert!(message.contains("creation script"), "{setup}");
    assert!(message.contains(script.to_str().expect("utf-8")), "{setup}");
    assert!(message.contains('3'), "exit status: {setup}");
    assert!(
        setup["fix"]
            .as_str()
            .expect("fix")
            .contains("instance-agent setup logs "),
        "{setup}"
    );

    let mount = wait_for_check(&agent, "mounts", "FAIL");
    assert!(
        mount["message"]
            .as_str()
            .expect("message")
            .contains("data at "),
        "{mount}"
    );
    assert!(
        mount["fix"].as_str().expect("fix").contains("mounts list"),
        "{mount}"
    );
    // blobfuse2_path is a path here, and it exists.
    let out = cli(
        &agent.socket,
        &[
            "doctor",
            "--config",
            agent.config_path.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stdout(&out).contains("PASS  blobfuse2  found at /bin/false"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_filesystem_below_the_floor_fails_with_the_reclaim_fix() {
    // Levels no real disk meets: every watched filesystem is critical.
    let agent = Agent::builder()
        .config("[disk]\ncritical_free_bytes = 1125899906842624\nwarning_free_bytes = 2251799813685248\n")
        .start();
    let disk = wait_for_check(&agent, "disk", "FAIL");
    let message = disk["message"].as_str().expect("message");
    assert!(message.contains("below the floor"), "{disk}");
    assert!(message.contains("floor 1.0 PiB"), "{disk}");
    assert!(
        disk["fix"]
            .as_str()
            .expect("fix")
            .contains("instance-agent disk --reclaim"),
        "{disk}"
    );
}

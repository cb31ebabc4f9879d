//! Black-box tests of the daemon's foundation: health, reflection, status,
//! events, config errors, shutdown, the systemd notify protocol and the CLI.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::{Agent, cli};
use instance_agent::api::proto;
use nix::sys::signal::Signal;
use tokio_stream::StreamExt;

#[tokio::test]
async fn health_reports_serving_overall_and_per_service() {
    let agent = Agent::builder().start();
    let mut health = tonic_health::pb::health_client::HealthClient::new(agent.channel().await);
    for service in [
        "",
        "instance_agent.v1.AgentService",
        "instance_agent.v1.MountService",
    ] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(
            reply.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "service {service:?}"
        );
    }
    let unknown = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_the_five_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let agent = Agent::builder().start();
    let mut client = ServerReflectionClient::new(agent.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies.next().await.expect("one reply").expect("ok reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply: {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in instance_agent::api::SERVICE_NAMES {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );
}

#[tokio::test]
async fn get_status_reports_version_host_and_conditions() {
    let agent = Agent::builder().instance_id("test-instance").start();
    let mut client = proto::agent_service_client::AgentServiceClient::new(agent.channel().await);
    let status = client
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(status.instance_id, "test-instance");
    let host = status.host.expect("host facts");
    assert!(host.usable_cores > 0.0);
    assert!(host.host_cpus >= 1);
    assert!(host.memory_total_bytes > 0);
    let types: Vec<&str> = status
        .conditions
        .iter()
        .map(|c| c.r#type.as_str())
        .collect();
    assert_eq!(types, ["docker", "disk", "mounts", "setup", "ssh"]);
    assert!(status.conditions.iter().all(|c| !c.message.is_empty()));
}

#[tokio::test]
async fn instance_id_is_generated_once_and_kept() {
    let first = {
        let agent = Agent::builder().instance_id("").start();
        let id = std::fs::read_to_string(agent.state_dir.join("instance-id")).expect("id file");
        let mut client =
            proto::agent_service_client::AgentServiceClient::new(agent.channel().await);
        let status = client
            .get_status(proto::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(status.instance_id, id.trim());
        id
    };
    assert_eq!(first.trim().len(), 32);
}

#[tokio::test]
async fn unknown_rpc_is_unimplemented() {
    // Every RPC of the contract is implemented now; a method the agent does
    // not know (an older agent, a newer client) answers UNIMPLEMENTED.
    let agent = Agent::builder().start();
    let mut grpc = tonic::client::Grpc::new(agent.channel().await);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/instance_agent.v1.AgentService/NoSuchMethod",
    );
    let error = grpc
        .unary::<_, proto::GetStatusResponse, _>(
            tonic::Request::new(proto::GetStatusRequest {}),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("unknown method");
    assert_eq!(error.code(), tonic::Code::Unimplemented);
}

#[tokio::test]
async fn watch_events_streams_and_resumes_with_since() {
    let agent = Agent::builder().start();
    let channel = agent.channel().await;
    let mut client = proto::agent_service_client::AgentServiceClient::new(channel.clone());
    // since = 0 replays the backlog: the "started" event is sequence 1.
    let mut replay = client
        .watch_events(proto::WatchEventsRequest { since: Some(0) })
        .await
        .expect("watch")
        .into_inner();
    let first = replay.next().await.expect("an event").expect("ok");
    assert_eq!(first.sequence, 1);
    assert!(matches!(first.kind, Some(proto::event::Kind::Agent(ref a)) if a.phase == "started"));
    assert!(!first.agent_run_id.is_empty());
    // Without since, only events after the subscription arrive.
    let before = client
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .last_event_sequence;
    let mut live = client
        .watch_events(proto::WatchEventsRequest { since: None })
        .await
        .expect("watch")
        .into_inner();
    // SIGTERM publishes "stopping" to live subscribers before streams end;
    // both streams see consecutive sequence numbers up to it.
    agent.signal(Signal::SIGTERM);
    for (name, stream, mut last) in [("live", &mut live, None), ("replay", &mut replay, Some(1))] {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("an event before the stream ends")
                .expect("stream item")
                .expect("event");
            if name == "live" {
                assert!(event.sequence > before, "{name}: old event {event:?}");
            }
            if let Some(previous) = last {
                assert_eq!(event.sequence, previous + 1, "{name}: {event:?}");
            }
            last = Some(event.sequence);
            if matches!(event.kind, Some(proto::event::Kind::Agent(ref a)) if a.phase == "stopping")
            {
                break;
            }
        }
    }
}

#[test]
fn bad_config_exits_78_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[agent]\nshutdown_grace_seconds = 0\n").expect("write");
    let out = std::process::Command::new(common::binary())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("agent.shutdown_grace_seconds"), "{stderr}");
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");

    std::fs::write(&config, "[agent]\nsocketz = \"/tmp/x\"\n").expect("write");
    let out = std::process::Command::new(common::binary())
        .args(["config", "check"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("socketz"), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");

    // A value of the wrong type: the dotted key and the type in words.
    let (code, stderr) = common::serve_refused("[jobs]\nslots_per_core = \"two\"\n");
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("line 2: key `jobs.slots_per_core`"),
        "{stderr}"
    );
    assert!(stderr.contains("expected a whole number"), "{stderr}");
}

#[test]
fn missing_config_named_on_the_command_line_is_an_error() {
    let out = std::process::Command::new(common::binary())
        .args(["serve", "--config", "/nonexistent/config.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn default_config_is_complete_and_valid() {
    let out = std::process::Command::new(common::binary())
        .args(["config", "default"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("default.toml");
    std::fs::write(&file, &out.stdout).expect("write");
    let check = std::process::Command::new(common::binary())
        .args(["config", "check"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// SIGTERM and SIGINT stop the agent the same way: health watchers of the
/// overall and of every service name see NOT_SERVING, a watching client
/// does not hold up the stop, the socket is removed.
async fn stops_cleanly_within_the_grace_period(signal: Signal) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut agent = Agent::builder()
        .config("[agent]\nshutdown_grace_seconds = 3")
        .start();
    let channel = agent.channel().await;
    let mut client = proto::agent_service_client::AgentServiceClient::new(channel.clone());
    let mut events = client
        .watch_events(proto::WatchEventsRequest { since: None })
        .await
        .expect("watch")
        .into_inner();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watches = Vec::new();
    for name in instance_agent::api::SERVICE_NAMES.into_iter().chain([""]) {
        let mut stream = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: name.into(),
            })
            .await
            .expect("health watch")
            .into_inner();
        let first = stream.next().await.expect("a status").expect("ok");
        assert_eq!(first.status(), ServingStatus::Serving, "{name:?}");
        watches.push((name, stream));
    }
    agent.signal(signal);
    for (name, stream) in &mut watches {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a status change before the grace period ends")
            .expect("a status")
            .expect("ok");
        assert_eq!(next.status(), ServingStatus::NotServing, "{name:?}");
    }
    // The event stream ends cleanly after "stopping".
    let mut stopping = false;
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_secs(5), events.next()).await {
        let event = item.expect("events end without an error");
        stopping |=
            matches!(event.kind, Some(proto::event::Kind::Agent(ref a)) if a.phase == "stopping");
    }
    assert!(stopping, "no stopping event");
    drop(watches);
    let status = agent
        .exited(Duration::from_secs(6))
        .await
        .expect("exits within the grace period");
    assert!(status.success(), "{status:?}; log:\n{}", agent.log());
    assert!(!agent.socket.exists(), "socket file removed on stop");
    // Stopped because everything ended, not because the 3 s ran out.
    let log = agent.log();
    assert!(
        log.contains("INFO instance_agent::daemon: stopped"),
        "{log}"
    );
    assert!(!log.contains("grace period over"), "{log}");
}

#[tokio::test]
async fn sigterm_stops_cleanly_within_the_grace_period() {
    stops_cleanly_within_the_grace_period(Signal::SIGTERM).await;
}

#[tokio::test]
async fn sigint_stops_like_sigterm() {
    stops_cleanly_within_the_grace_period(Signal::SIGINT).await;
}

#[test]
fn second_agent_on_the_same_socket_refuses_to_start() {
    let agent = Agent::builder().start();
    let out = std::process::Command::new(common::binary())
        .args(["serve", "--config"])
        .arg(&agent.config_path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already listening"));
}

#[test]
fn systemd_notify_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut agent = Agent::builder()
        .env("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8 path"))
        // 400 ms watchdog: the agent must ping every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .spawn();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(seen.contains("READY=1")
        && seen.contains("STATUS=")
        && seen.matches("WATCHDOG=1").count() >= 2)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "notifications so far: {seen}"
        );
        let n = notify.recv(&mut buf).expect("notification");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    // READY=1 only once the socket accepts connections.
    assert!(std::os::unix::net::UnixStream::connect(&agent.socket).is_ok());
    agent.signal(Signal::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains("STOPPING=1") {
        assert!(
            std::time::Instant::now() < deadline,
            "no STOPPING=1 in: {seen}"
        );
        if let Ok(n) = notify.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(agent.wait_exit(Duration::from_secs(10)).is_some());
}

#[test]
fn cli_status_prints_a_summary_and_json() {
    let agent = Agent::builder().start();
    let out = cli(&agent.socket, &["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("instance-agent"), "{stdout}");
    assert!(stdout.contains("conditions"), "{stdout}");
    assert!(stdout.contains("docker"), "{stdout}");
    let out = cli(&agent.socket, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["conditions"].as_array().map(Vec::len), Some(5));
}

#[test]
fn cli_without_daemon_says_so_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("none.sock");
    let out = cli(&socket, &["status"]);
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&socket.display().to_string()), "{stderr}");
    assert!(stderr.contains("not running"), "{stderr}");
}

/// Kills a spawned agent when a test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sighup_alone_reloads_and_logs_live_and_restart_keys() {
    // The config path is a symlink to a file in another directory: the
    // agent's inotify watch is on the link's directory and does not see the
    // target being written, so only the SIGHUP can cause this reload.
    let dir = tempfile::tempdir().expect("tempdir");
    let real_dir = dir.path().join("real");
    std::fs::create_dir(&real_dir).expect("mkdir");
    let real = real_dir.join("config.toml");
    let link = dir.path().join("config.toml");
    let socket = dir.path().join("agent.sock");
    let log_path = dir.path().join("agent.log");
    let base = format!(
        "[agent]\nsocket = {:?}\nstate_dir = {:?}\nlogs_dir = {:?}\nruntime_dir = {:?}\n",
        socket,
        dir.path().join("state"),
        dir.path().join("logs"),
        dir.path().join("run")
    );
    let metrics_off = "[metrics]\nlisten = \"\"\n";
    std::fs::write(&real, format!("{base}{metrics_off}")).expect("write");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let child = std::process::Command::new(common::binary())
        .args(["serve", "--config"])
        .arg(&link)
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("spawn");
    let agent = KillOnDrop(child);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The kernel's own list of what the agent's inotify watches: the link's
    // directory and nothing else, so writing the target cannot be seen.
    let inode = |path: &std::path::Path| {
        let meta = std::fs::metadata(path).expect("stat");
        use std::os::unix::fs::MetadataExt;
        let dev = meta.dev();
        (
            nix::sys::stat::major(dev),
            nix::sys::stat::minor(dev),
            meta.ino(),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let watched = loop {
        let watched = inotify_watches(agent.0.id());
        if !watched.is_empty() {
            break watched;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no inotify watch:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(watched, [inode(dir.path())], "{}", log());
    let edited = format!(
        "{}shutdown_grace_seconds = 4\n[docker]\ncheck_interval_seconds = 2\n[events]\nbacklog = 128\n{metrics_off}",
        base
    );
    std::fs::write(&real, edited).expect("write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = log();
        if log.contains("applied live") && log.contains("only after a restart") {
            // The one reload there was is the signal's.
            let signalled = log.find("SIGHUP: reloading").expect("the SIGHUP is logged");
            assert!(signalled < log.find("applied live").unwrap_or(0), "{log}");
            assert!(!log.contains("config file changed"), "{log}");
            assert!(log.contains("docker.check_interval_seconds"), "{log}");
            assert!(log.contains("agent.shutdown_grace_seconds"), "{log}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reload logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The reload task had set up its watch before it took the signal: this
    // list is the whole of it.
    assert_eq!(inotify_watches(agent.0.id()), [inode(dir.path())]);
}

/// What the inotify instances of process `pid` watch, as (device major,
/// device minor, inode), from `/proc/PID/fdinfo` (the kernel prints the
/// device as its internal `MKDEV(major, minor)`: 12 bits and 20 bits).
fn inotify_watches(pid: u32) -> Vec<(u64, u64, u64)> {
    let mut watches = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return watches;
    };
    for fd in fds.flatten() {
        let text = std::fs::read_to_string(fd.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.starts_with("inotify wd:")) {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            };
            if let (Some(ino), Some(sdev)) = (field("ino:"), field("sdev:")) {
                watches.push((sdev >> 20, sdev & 0xf_ffff, ino));
            }
        }
    }
    watches
}

#[test]
fn completions_are_generated() {
    let out = std::process::Command::new(common::binary())
        .args(["completions", "bash"])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("instance-agent"));
}

#[test]
fn completions_into_a_closed_pipe_exit_quietly() {
    // `completions bash | head -0`: the reader is gone before the write.
    let mut child = std::process::Command::new(common::binary())
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn json_on_local_commands() {
    let run = |args: &[&str]| {
        std::process::Command::new(common::binary())
            .args(args)
            .output()
            .expect("run")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[jobs]\nslots_per_core = 3\n").expect("write");
    let out = run(&["config", "check", "--json", good.to_str().expect("utf-8")]);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["ok"], true);
    assert_eq!(report["file"], good.to_str().expect("utf-8"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[jobs]\nslots_per_core = 0\n").expect("write");
    let out = run(&["--json", "config", "check", bad.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(78));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["ok"], false);
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("line 2: key `jobs.slots_per_core`")),
        "{report}"
    );

    let out = run(&["config", "default", "--json"]);
    assert!(out.status.success());
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(config["agent"]["shutdown_grace_seconds"], 10);
    assert_eq!(config["jobs"]["slots_per_core"], 2);

    let out = run(&["completions", "bash", "--json"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--json does not apply"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cli_says_a_file_at_the_socket_path_is_not_a_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("agent.sock");
    std::fs::write(&file, "").expect("write");
    let out = cli(&file, &["status"]);
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert!(!stderr.contains("stale"), "{stderr}");
}

#[test]
fn cli_gives_up_on_a_frozen_agent_after_the_rpc_timeout() {
    // A listener that accepts connections but never answers: a frozen agent.
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("frozen.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let started = std::time::Instant::now();
    let out = std::process::Command::new(common::binary())
        .arg("--socket")
        .arg(&socket)
        .args(["--rpc-timeout", "1", "status"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    // Generous: the point is that it ends at all.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&socket.display().to_string()), "{stderr}");
}

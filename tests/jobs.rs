//! Jobs against the real Docker engine (started by scripts/test.sh) with the
//! local image instance-agent/busybox:test.

mod common;

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use common::events::{self, EventLog};
use common::{Agent, cli, is_final, marked_job as marked, runs};
use instance_agent::api::proto::{self, job_service_client::JobServiceClient};
use tokio_stream::StreamExt;
use tonic::Code;

const IMAGE: &str = "instance-agent/busybox:test";

fn jobs_config(slots: u32, markers: &Path) -> String {
    format!(
        "[jobs]\nslots = {slots}\nkill_grace_seconds = 1\nallowed_host_roots = [{:?}]\n",
        markers.display().to_string()
    )
}

fn spec(id: &str, command: &[&str]) -> proto::JobSpec {
    proto::JobSpec {
        id: id.into(),
        image: IMAGE.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn client(agent: &Agent) -> JobServiceClient<tonic::transport::Channel> {
    JobServiceClient::new(agent.channel().await)
}

async fn submit(
    c: &mut JobServiceClient<tonic::transport::Channel>,
    spec: proto::JobSpec,
) -> proto::Job {
    c.submit_job(proto::SubmitJobRequest { spec: Some(spec) })
        .await
        .expect("submit")
        .into_inner()
}

async fn get(c: &mut JobServiceClient<tonic::transport::Channel>, id: &str) -> proto::Job {
    c.get_job(proto::GetJobRequest { id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

async fn wait_final(
    c: &mut JobServiceClient<tonic::transport::Channel>,
    id: &str,
    timeout: Duration,
) -> proto::Job {
    let deadline = Instant::now() + timeout;
    loop {
        let job = get(c, id).await;
        if is_final(job.state()) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} not final in {timeout:?}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_state(
    c: &mut JobServiceClient<tonic::transport::Channel>,
    id: &str,
    state: proto::JobState,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = get(c, id).await;
        if job.state() == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} never reached {state:?}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Containers of this agent in any state.
fn all_containers(instance_id: &str) -> usize {
    common::containers(instance_id, true).len()
}

/// Containers are removed once the exit is recorded (just after the final
/// state is visible).
async fn wait_removed(instance_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while all_containers(instance_id) > 0 {
        assert!(Instant::now() < deadline, "containers left behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The engine's own account of one agent's containers: `docker events` for
/// their `start` and `die`, from a moment before the test acted (replayed
/// with `--since`, then live), so that no start is missed however short the
/// container's life. Killed on drop.
struct ContainerEvents {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ContainerEvents {
    fn start(instance_id: &str) -> Self {
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
            .saturating_sub(5);
        let mut child = Command::new("docker")
            .args(["events", "--since", &since.to_string()])
            .args(["--filter", "type=container"])
            .args(["--filter", "event=start", "--filter", "event=die"])
            .args([
                "--filter",
                &format!("label=io.instance-agent.instance={instance_id}"),
            ])
            .args(["--format", "{{.Status}} {{.ID}}"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("docker events");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads until `starts` containers have started and died, within 60 s.
    fn until_all_died(&mut self, starts: usize) -> &[String] {
        let deadline = Instant::now() + Duration::from_secs(60);
        let count =
            |seen: &[String], what: &str| seen.iter().filter(|l| l.starts_with(what)).count();
        while count(&self.seen, "start ") < starts || count(&self.seen, "die ") < starts {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "the engine did not report {starts} starts and exits: {:?}",
                    self.seen
                ),
            }
        }
        &self.seen
    }
}

impl Drop for ContainerEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The most containers running at once, from the engine's starts and exits
/// in the order it reported them.
fn most_at_once(events: &[String]) -> usize {
    let (mut running, mut most) = (0usize, 0usize);
    for line in events {
        if line.starts_with("start ") {
            running += 1;
            most = most.max(running);
        } else if line.starts_with("die ") {
            running = running.saturating_sub(1);
        }
    }
    most
}

#[tokio::test]
async fn concurrency_never_exceeds_capacity_as_seen_by_the_engine() {
    let markers = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .config(&jobs_config(2, markers.path()))
        .start();
    let mut engine = ContainerEvents::start(&agent.instance_id);
    let mut c = client(&agent).await;
    let ids: Vec<String> = (0..8).map(|i| format!("cap-{i}")).collect();
    for id in &ids {
        submit(&mut c, marked(id, "0.5", markers.path())).await;
    }
    for id in &ids {
        let job = wait_final(&mut c, id, Duration::from_secs(60)).await;
        assert_eq!(job.state(), proto::JobState::Succeeded, "{job:?}");
    }
    // Every start and every exit, as the engine saw them.
    let seen = engine.until_all_died(ids.len());
    let max = most_at_once(seen);
    assert!(
        max <= 2,
        "the engine saw {max} running containers with capacity 2: {seen:?}"
    );
    assert!(max >= 1);
    assert_eq!(
        seen.iter().filter(|l| l.starts_with("start ")).count(),
        ids.len(),
        "one container start per job: {seen:?}"
    );
    for id in &ids {
        assert_eq!(runs(markers.path(), id), 1, "{id} ran once");
    }
}

#[tokio::test]
async fn idempotent_submit_and_id_conflict() {
    let markers = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .config(&jobs_config(2, markers.path()))
        .start();
    let mut c = client(&agent).await;
    let first = submit(&mut c, marked("idem", "0", markers.path())).await;
    let second = submit(&mut c, marked("idem", "0", markers.path())).await;
    assert_eq!(first.queued_at, second.queued_at);
    wait_final(&mut c, "idem", Duration::from_secs(30)).await;
    let third = submit(&mut c, marked("idem", "0", markers.path())).await;
    assert_eq!(
        third.state(),
        proto::JobState::Succeeded,
        "a finished job is returned, not re-run"
    );
    assert_eq!(runs(markers.path(), "idem"), 1);
    let conflict = c
        .submit_job(proto::SubmitJobRequest {
            spec: Some(spec("idem", &["false"])),
        })
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn cancel_queued_and_running_and_timeout() {
    let markers = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .config(&jobs_config(1, markers.path()))
        .start();
    let mut c = client(&agent).await;
    submit(&mut c, spec("long", &["sleep", "60"])).await;
    submit(&mut c, spec("waiting", &["true"])).await;
    wait_state(&mut c, "long", proto::JobState::Running).await;

    let queued = c
        .cancel_job(proto::CancelJobRequest {
            id: "waiting".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(queued.state(), proto::JobState::Cancelled);

    let started = Instant::now();
    c.cancel_job(proto::CancelJobRequest { id: "long".into() })
        .await
        .unwrap();
    let long = wait_final(&mut c, "long", Duration::from_secs(30)).await;
    assert_eq!(long.state(), proto::JobState::Cancelled, "{long:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let again = c
        .cancel_job(proto::CancelJobRequest { id: "long".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.state(),
        proto::JobState::Cancelled,
        "cancel is idempotent"
    );

    let mut slow = spec("slow", &["sleep", "60"]);
    slow.timeout_seconds = 1;
    submit(&mut c, slow).await;
    let slow = wait_final(&mut c, "slow", Duration::from_secs(30)).await;
    assert_eq!(slow.state(), proto::JobState::TimedOut, "{slow:?}");
    wait_removed(&agent.instance_id).await;
}

/// A job that ignores SIGTERM is killed once its own grace (not the
/// configured 1 s) has passed, and ends cancelled. Submitted through the CLI
/// so that `--kill-grace-seconds` is covered too.
#[tokio::test]
async fn a_job_ignoring_sigterm_is_killed_after_its_own_grace() {
    let markers = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .config(&jobs_config(2, markers.path()))
        .start();
    let mut c = client(&agent).await;
    let out = cli(
        &agent.socket,
        &[
            "jobs",
            "submit",
            "--id",
            "stubborn",
            "--image",
            IMAGE,
            "--kill-grace-seconds",
            "5",
            "--",
            "sh",
            "-c",
            "trap '' TERM; echo ready; while true; do sleep 1; done",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        get(&mut c, "stubborn")
            .await
            .spec
            .unwrap()
            .kill_grace_seconds,
        5
    );
    // Running is recorded once the container started; let the shell set its
    // trap (it prints "ready" after) so that SIGTERM is surely ignored.
    let mut output = c
        .stream_job_logs(proto::StreamJobLogsRequest {
            id: "stubborn".into(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut printed = String::new();
    while !printed.contains("ready") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), output.next())
            .await
            .expect("the job prints ready")
            .expect("the output goes on while the job runs")
            .unwrap();
        printed.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    assert_eq!(
        get(&mut c, "stubborn").await.state(),
        proto::JobState::Running
    );
    let asked = Instant::now();
    c.cancel_job(proto::CancelJobRequest {
        id: "stubborn".into(),
    })
    .await
    .unwrap();
    let job = wait_final(&mut c, "stubborn", Duration::from_secs(60)).await;
    let took = asked.elapsed();
    assert_eq!(job.state(), proto::JobState::Cancelled, "{job:?}");
    assert_eq!(job.exit_code, Some(137), "SIGKILLed: {job:?}");
    // Lower bound only loosely below the 5 s grace (the configured default
    // is 1 s, so a kill at ~1 s would mean the per-job value was ignored).
    assert!(took >= Duration::from_secs(4), "killed after {took:?}");
    assert!(took < Duration::from_secs(45), "killed after {took:?}");
    wait_removed(&agent.instance_id).await;
}

#[tokio::test]
async fn exit_status_oom_and_logs_after_removal() {
    let markers = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .config(&jobs_config(2, markers.path()))
        .start();
    let mut c = client(&agent).await;
    submit(
        &mut c,
        spec(
            "three",
            &["sh", "-c", "echo to-out; echo to-err >&2; exit 3"],
        ),
    )
    .await;
    let mut oom = spec(
        "oom",
        // tail buffers a "line" of /dev/zero without end: it grows until
        // the kernel kills it, and it is the container's main process.
        &["tail", "/dev/zero"],
    );
    oom.memory_bytes = 16 << 20;
    submit(&mut c, oom).await;

    let three = wait_final(&mut c, "three", Duration::from_secs(30)).await;
    assert_eq!(three.state(), proto::JobState::Failed);
    assert_eq!(three.exit_code, Some(3));
    let oom = wait_final(&mut c, "oom", Duration::from_secs(60)).await;
    assert_eq!(oom.state(), proto::JobState::Failed, "{oom:?}");
    assert!(oom.oom_killed, "{oom:?}");

    // The container is gone, the log is not.
    wait_removed(&agent.instance_id).await;
    let inspect = Command::new("docker")
        .args(["inspect", &three.container_id])
        .output()
        .unwrap();
    assert!(
        !inspect.status.success(),
        "container removed after the exit was recorded"
    );
    let chunks: Vec<proto::LogChunk> = c
        .stream_job_logs(proto::StreamJobLogsRequest {
            id: "three".into(),
            follow: false,
        })
        .await
        .unwrap()
        .into_inner()
        .map(|c| c.unwrap())
        .collect()
        .await;
    let out: Vec<u8> = chunks
        .iter()
        .filter(|c| c.stream() == proto::LogStream::Stdout)
        .flat_map(|c| c.data.clone())
        .collect();
    let err: Vec<u8> = chunks
        .iter()
        .filter(|c| c.stream() == proto::LogStream::Stderr)
        .flat_map(|c| c.data.clone())
        .collect();
    assert_eq!(out, b"to-out\n");
    assert_eq!(err, b"to-err\n");
    let cli_out = cli(&agent.socket, &["jobs", "logs", "three"]);
    assert_eq!(cli_out.stdout, b"to-out\n");
}

#[tokio::test]
async fn logs_over_the_cap_keep_the_newest_part_with_a_marker() {
    let markers = tempfile::tempdir().unwrap();
    let config = format!("{}log_max_bytes = 65536\n", jobs_config(1, markers.path()));
    let agent = Agent::builder().config(&config).start();
    let mut c = client(&agent).await;
    submit(
        &mut c,
        spec("chatty", &["sh", "-c", "seq 1 30000; echo THE-END"]),
    )
    .await;
    let job = wait_final(&mut c, "chatty", Duration::from_secs(60)).await;
    assert_eq!(job.state(), proto::JobState::Succeeded);
    let chunks: Vec<proto::LogChunk> = c
        .stream_job_logs(proto::StreamJobLogsRequest {
            id: "chatty".into(),
            follow: false,
        })
        .await
        .unwrap()
        .into_inner()
        .map(|c| c.unwrap())
        .collect()
        .await;
    assert_eq!(chunks[0].stream(), proto::LogStream::Agent);
    assert!(String::from_utf8_lossy(&chunks[0].data).contains("dropped"));
    let text: String = chunks[1..]
        .iter()
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect();
    assert!(
        text.ends_with("THE-END\n"),
        "tail: {:?}",
        &text[text.len().saturating_sub(200)..]
    );
    assert!(!text.starts_with("1\n"), "the oldest output was dropped");
    assert!(text.len() <= 65536, "{} bytes kept", text.len());
}

#[tokio::test]
async fn follow_streams_output_until_the_job_ends() {
    let markers = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .config(&jobs_config(1, markers.path()))
        .start();
    let mut c = client(&agent).await;
    submit(
        &mut c,
        spec(
            "ticker",
            &[
                "sh",
                "-c",
                "for i in 1 2 3 4 5; do echo tick $i; sleep 0.2; done",
            ],
        ),
    )
    .await;
    let mut stream = c
        .stream_job_logs(proto::StreamJobLogsRequest {
            id: "ticker".into(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("stream ends")
    {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap().data));
    }
    assert_eq!(text, "tick 1\ntick 2\ntick 3\ntick 4\ntick 5\n");
    assert!(is_final(get(&mut c, "ticker").await.state()));
}

#[tokio::test]
async fn watch_events_shows_each_transition_in_order() {
    let markers = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .config(&jobs_config(1, markers.path()))
        .start();
    let mut events = proto::agent_service_client::AgentServiceClient::new(agent.channel().await)
        .watch_events(proto::WatchEventsRequest { since: None })
        .await
        .unwrap()
        .into_inner();
    let mut c = client(&agent).await;
    submit(&mut c, spec("evented", &["true"])).await;
    let mut states = Vec::new();
    let mut last_seq = 0;
    while states.last() != Some(&proto::JobState::Succeeded) {
        let event = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            last_seq == 0 || event.sequence == last_seq + 1,
            "sequence increases by one"
        );
        last_seq = event.sequence;
        if let Some(proto::event::Kind::Job(j)) = event.kind {
            let job = j.job.unwrap();
            if job.id == "evented" {
                states.push(job.state());
            }
        }
    }
    assert_eq!(
        states,
        [
            proto::JobState::Queued,
            proto::JobState::Starting,
            proto::JobState::Running,
            proto::JobState::Succeeded
        ]
    );
}

#[tokio::test]
async fn bad_specs_name_the_field() {
    let markers = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .config(&jobs_config(2, markers.path()))
        .start();
    let mut c = client(&agent).await;
    let mounted = |source: proto::job_mount::Source| {
        let mut s = spec("", &["true"]);
        s.mounts.push(proto::JobMount {
            source: Some(source),
            container_path: "/data".into(),
            read_only: true,
        });
        s
    };
    let edited = |edit: fn(&mut proto::JobSpec)| {
        let mut s = spec("", &["true"]);
        edit(&mut s);
        s
    };
    let many_env = edited(|s| {
        s.env = (0..1000)
            .map(|i| (format!("V{i}"), "x".to_string()))
            .collect::<HashMap<_, _>>()
    });
    let cases: Vec<(&str, proto::JobSpec, &str)> = vec![
        ("empty image", edited(|s| s.image.clear()), "image"),
        (
            "malformed image",
            edited(|s| s.image = "bad image!".into()),
            "image",
        ),
        ("empty command", spec("", &[]), "command"),
        (
            "unknown mount",
            mounted(proto::job_mount::Source::Managed("nope".into())),
            "mounts[0].managed",
        ),
        (
            "outside roots",
            mounted(proto::job_mount::Source::HostPath("/etc".into())),
            "mounts[0].host_path",
        ),
        (
            "dot-dot",
            mounted(proto::job_mount::Source::HostPath(format!(
                "{}/../etc",
                markers.path().display()
            ))),
            "mounts[0].host_path",
        ),
        ("slots", edited(|s| s.slots = 99), "slots"),
        (
            "memory",
            edited(|s| s.memory_bytes = u64::MAX),
            "memory_bytes",
        ),
        (
            "tiny memory",
            edited(|s| s.memory_bytes = 1),
            "memory_bytes",
        ),
        (
            "timeout",
            edited(|s| s.timeout_seconds = u32::MAX),
            "timeout_seconds",
        ),
        ("env", many_env, "env"),
    ];
    for (name, spec, field) in cases {
        let error = c
            .submit_job(proto::SubmitJobRequest { spec: Some(spec) })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{name}: {error:?}");
        assert!(
            error.message().contains(field),
            "{name}: {:?} should name {field}",
            error.message()
        );
    }
    // No GPUs here: refused once discovery has ended (it runs after READY
    // and is quick without a driver); a job that came before is queued and
    // fails when discovery ends. Never a container either way.
    let mut gpu = spec("gpu", &["true"]);
    gpu.gpus = 1;
    match c
        .submit_job(proto::SubmitJobRequest { spec: Some(gpu) })
        .await
    {
        Err(error) => assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}"),
        Ok(_) => {
            let job = wait_final(&mut c, "gpu", Duration::from_secs(30)).await;
            assert_eq!(job.state(), proto::JobState::Failed, "{job:?}");
            assert_eq!(job.reason, "asks for 1 GPUs but this host has none");
        }
    }
    assert_eq!(all_containers(&agent.instance_id), 0);
}

#[tokio::test]
async fn kill_9_during_many_jobs_loses_none_and_runs_none_twice() {
    let markers = tempfile::tempdir().unwrap();
    let mut agent = Agent::builder()
        .config(&jobs_config(4, markers.path()))
        .start();
    let mut c = client(&agent).await;
    let ids: Vec<String> = (0..24).map(|i| format!("crash-{i}")).collect();
    for id in &ids {
        submit(&mut c, marked(id, "0.3", markers.path())).await;
    }
    // Each crash lands just after the n-th container started (its marker
    // line is the container's own first act): jobs are running, others are
    // queued, and some have finished.
    for started in [1, 8, 15] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while ids.iter().map(|id| runs(markers.path(), id)).sum::<usize>() < started {
            assert!(
                Instant::now() < deadline,
                "{started} jobs never started\n{}",
                agent.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        agent.crash_and_restart();
        c = client(&agent).await;
    }
    for id in &ids {
        let job = wait_final(&mut c, id, Duration::from_secs(120)).await;
        assert_eq!(
            job.state(),
            proto::JobState::Succeeded,
            "{job:?}\n{}",
            agent.log()
        );
        assert_eq!(runs(markers.path(), id), 1, "{id} ran exactly once");
    }
    wait_removed(&agent.instance_id).await;
}

#[tokio::test]
async fn jobs_wait_for_the_creation_script() {
    let markers = tempfile::tempdir().unwrap();
    let go = markers.path().join("go");
    let script = markers.path().join("create.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nwhile [ ! -e {} ]; do sleep 0.05; done\n",
            go.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = format!(
        "{}[[setup.scripts]]\nkind = \"creation\"\npath = {:?}\n",
        jobs_config(2, markers.path()),
        script.display().to_string()
    );
    let agent = Agent::builder().config(&config).start();
    let mut events = EventLog::since(&agent, 0).await;
    let running = events
        .until(
            "the creation script running",
            Duration::from_secs(30),
            |e| events::setup_run_in(e, proto::SetupKind::Creation, proto::SetupRunState::Running),
        )
        .await;
    let run_id = events::setup_run(&running).expect("a run").id.clone();

    // Submitted while the script runs: queued, and the agent says why.
    let mut c = client(&agent).await;
    assert_eq!(
        submit(&mut c, spec("gated", &["true"])).await.state(),
        proto::JobState::Queued
    );
    let job = get(&mut c, "gated").await;
    assert_eq!(job.state(), proto::JobState::Queued, "{job:?}");
    assert_eq!(
        job.reason,
        format!("held: setup: the creation script has not succeeded (run {run_id} running)")
    );

    // The script ends: the job's first step after its queueing comes after
    // the script's success, in the one sequence of events.
    std::fs::write(&go, "").unwrap();
    let succeeded = events
        .until(
            "the creation script's success",
            Duration::from_secs(60),
            |e| {
                events::setup_run(e)
                    .is_some_and(|r| r.id == run_id && r.state() != proto::SetupRunState::Running)
            },
        )
        .await;
    let run = events::setup_run(&succeeded).expect("a run");
    assert_eq!(run.state(), proto::SetupRunState::Succeeded, "{run:?}");
    assert_eq!(
        events.job_states(|id| id == "gated"),
        [("gated".to_owned(), proto::JobState::Queued)],
        "only queued before the script succeeded:\n{}",
        events.summary()
    );
    let starting = events
        .until("the job starting", Duration::from_secs(60), |e| {
            events::job_in(e, "gated", proto::JobState::Starting)
        })
        .await;
    let chosen = events::time_of(events::job(&starting).and_then(|j| j.starting_at.as_ref()));
    assert!(
        chosen >= events::time_of(run.finished_at.as_ref()),
        "chosen at {chosen:?}, before the script finished: {run:?}"
    );
    let job = wait_final(&mut c, "gated", Duration::from_secs(60)).await;
    assert_eq!(job.state(), proto::JobState::Succeeded, "{job:?}");
}

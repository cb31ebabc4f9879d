//! The metrics endpoint of the real binary: a job against the real Docker
//! engine and a GetStatus, then a scrape over plain HTTP; and reclaims that
//! free real job logs on a real tmpfs holding the state dir, requested and
//! automatic, counted by step.

mod common;

use std::time::{Duration, Instant};

use common::fs::{Filler, MIB, Tmpfs};
use common::{Agent, free_port, http_get, sample, scrape_until};
use instance_agent::api::proto;
use tokio_stream::StreamExt;

/// Submits a job and waits until it succeeds.
async fn run_job(agent: &Agent, command: &str) {
    let mut jobs = proto::job_service_client::JobServiceClient::new(agent.channel().await);
    let id = format!("metrics-{}", common::uuid_like());
    jobs.submit_job(proto::SubmitJobRequest {
        spec: Some(proto::JobSpec {
            id: id.clone(),
            image: "instance-agent/busybox:test".into(),
            command: vec!["sh".into(), "-c".into(), command.into()],
            ..Default::default()
        }),
    })
    .await
    .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = jobs
            .get_job(proto::GetJobRequest { id: id.clone() })
            .await
            .expect("get")
            .into_inner();
        if job.state() == proto::JobState::Succeeded {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job did not succeed: {job:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bytes of the files below `dir`.
fn tree_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => tree_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// An agent whose state dir is on a 64 MiB tmpfs (floor 8 MiB, margin
/// 2 MiB), with metrics on, whose one finished job left 5 MiB of logs (4 MiB
/// of output) that expire at once; and a WatchEvents stream opened after that.
struct LogsOnTmpfs {
    filler: Filler,
    agent: Agent,
    port: u16,
    events: tonic::Streaming<proto::Event>,
    logs_dir: std::path::PathBuf,
    // Last: unmounted after the agent is gone.
    tmpfs: Tmpfs,
}

async fn logs_on_tmpfs(auto_reclaim: bool) -> LogsOnTmpfs {
    let tmpfs = Tmpfs::new(64);
    let state_dir = tmpfs.path.join("state");
    let port = free_port();
    let agent = Agent::builder()
        .state_dir(&state_dir)
        .config(&format!(
            "[jobs]\nlog_retention_seconds = 0\n\
             [disk]\ninterval_ms = 200\ncritical_free_bytes = {}\nwarning_free_bytes = {}\n\
             clear_margin_bytes = {}\ntransition_seconds = 2\nreserve_bytes = 0\n\
             auto_reclaim = {auto_reclaim}\npaths = [{:?}]\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            8 * MIB,
            16 * MIB,
            2 * MIB,
            // Named, the tmpfs keeps these byte levels (unnamed, a
            // memory-backed filesystem gets levels relative to its size).
            tmpfs.path,
        ))
        .start();
    run_job(
        &agent,
        &format!("yes {} | head -c {}", "x".repeat(63), 4 * MIB),
    )
    .await;
    let logs_dir = state_dir.join("job-logs");
    // Output arrives in the log before the final state is visible: 64 Ki
    // lines of 64 bytes, each stored with a 16-byte frame header.
    assert_eq!(tree_bytes(&logs_dir), 5 * MIB, "{}", agent.log());
    let events = proto::agent_service_client::AgentServiceClient::new(agent.channel().await)
        .watch_events(proto::WatchEventsRequest { since: None })
        .await
        .expect("WatchEvents")
        .into_inner();
    LogsOnTmpfs {
        filler: Filler::new(&tmpfs.path),
        agent,
        port,
        events,
        logs_dir,
        tmpfs,
    }
}

impl LogsOnTmpfs {
    /// Takes the state filesystem below its floor, and waits until the
    /// agent sees it critical.
    async fn make_critical(&self) {
        self.filler.set_free(5 * MIB);
        let mut disk =
            proto::disk_service_client::DiskServiceClient::new(self.agent.channel().await);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let usage = disk
                .get_disk_usage(proto::GetDiskUsageRequest {})
                .await
                .expect("GetDiskUsage")
                .into_inner();
            let critical = usage.filesystems.iter().any(|f| {
                std::path::Path::new(&f.mount_point) == self.tmpfs.path
                    && f.state() == proto::DiskState::Critical
            });
            if critical {
                return;
            }
            assert!(Instant::now() < deadline, "not critical: {usage:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The next reclaim event on WatchEvents.
    async fn next_reclaim(&mut self) -> proto::ReclaimEvent {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(60), self.events.next())
                .await
                .unwrap_or_else(|_| panic!("no reclaim event in 60 s\n{}", self.agent.log()))
                .expect("stream open")
                .expect("event");
            if let Some(proto::event::Kind::Reclaim(reclaim)) = event.kind {
                return reclaim;
            }
        }
    }
}

impl Drop for LogsOnTmpfs {
    fn drop(&mut self) {
        self.filler.empty();
    }
}

fn step<'a>(steps: &'a [proto::ReclaimStep], name: &str) -> &'a proto::ReclaimStep {
    steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name}: {steps:?}"))
}

const LOGS_FREED: &str = "instance_agent_disk_reclaimed_bytes_total{step=\"expired_job_logs\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_reclaim_counts_the_bytes_it_freed_by_step() {
    let mut rig = logs_on_tmpfs(false).await;
    let (_, before) = http_get(rig.port, "/metrics");
    assert_eq!(sample(&before, LOGS_FREED), Some(0.0), "{before}");
    rig.make_critical().await;

    let mut disk = proto::disk_service_client::DiskServiceClient::new(rig.agent.channel().await);
    let report = disk
        .reclaim_space(proto::ReclaimSpaceRequest {
            dry_run: false,
            path: rig.logs_dir.display().to_string(),
            all_steps: false,
        })
        .await
        .expect("ReclaimSpace")
        .into_inner();
    let logs = step(&report.steps, "expired_job_logs");
    assert!(logs.ran && logs.bytes == 5 * MIB, "{report:?}");
    assert_eq!(tree_bytes(&rig.logs_dir), 0, "the logs are gone");

    let event = rig.next_reclaim().await;
    assert_eq!(event.trigger(), proto::ReclaimTrigger::Api);
    assert_eq!(event.steps, report.steps);
    assert_eq!(event.total_bytes, report.total_bytes);

    let text = scrape_until(rig.port, LOGS_FREED, logs.bytes as f64).await;
    assert_eq!(sample(&text, LOGS_FREED), Some(logs.bytes as f64), "{text}");
    for s in &report.steps {
        let series = format!(
            "instance_agent_disk_reclaimed_bytes_total{{step=\"{}\"}}",
            s.name
        );
        assert_eq!(
            sample(&text, &series),
            Some(s.bytes as f64),
            "{series}\n{text}"
        );
    }
    assert_eq!(
        sample(&text, "instance_agent_disk_reclaims_total{trigger=\"api\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "instance_agent_disk_reclaims_total{trigger=\"automatic\"}"
        ),
        Some(0.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automatic_reclaim_counts_the_bytes_it_freed_by_step() {
    let mut rig = logs_on_tmpfs(true).await;
    rig.make_critical().await;

    let event = rig.next_reclaim().await;
    assert_eq!(event.trigger(), proto::ReclaimTrigger::Automatic);
    assert!(!event.targets.is_empty(), "{event:?}");
    let logs = step(&event.steps, "expired_job_logs");
    assert!(logs.ran && logs.bytes == 5 * MIB, "{event:?}");
    // Docker's data root is on another filesystem: its steps were skipped.
    assert!(!step(&event.steps, "exited_containers").ran, "{event:?}");
    assert_eq!(tree_bytes(&rig.logs_dir), 0, "the logs are gone");

    let text = scrape_until(rig.port, LOGS_FREED, logs.bytes as f64).await;
    assert_eq!(sample(&text, LOGS_FREED), Some(logs.bytes as f64), "{text}");
    assert_eq!(
        sample(
            &text,
            "instance_agent_disk_reclaims_total{trigger=\"automatic\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "instance_agent_disk_reclaims_total{trigger=\"api\"}"),
        Some(0.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_shows_jobs_rpcs_disk_and_own_usage() {
    let port = free_port();
    let agent = Agent::builder()
        .config(&format!(
            "[jobs]\nslots = 2\n[limits]\nmax_message_bytes = 16384\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n"
        ))
        .start();

    let mut agent_client =
        proto::agent_service_client::AgentServiceClient::new(agent.channel().await);
    agent_client
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("GetStatus");

    run_job(&agent, "true").await;
    let mut jobs = proto::job_service_client::JobServiceClient::new(agent.channel().await);
    // A NotFound, to see a non-zero code (a trailers-only reply).
    let missing = jobs
        .get_job(proto::GetJobRequest {
            id: "no-such-job".into(),
        })
        .await;
    assert_eq!(
        missing.expect_err("missing job").code(),
        tonic::Code::NotFound
    );
    // Refused by the guard in front of the services (over
    // limits.max_message_bytes): counted all the same.
    let too_big = jobs
        .submit_job(proto::SubmitJobRequest {
            spec: Some(proto::JobSpec {
                id: "too-big".into(),
                image: "instance-agent/busybox:test".into(),
                command: vec!["x".repeat(20_000)],
                ..Default::default()
            }),
        })
        .await;
    assert_eq!(
        too_big.expect_err("over the message limit").code(),
        tonic::Code::ResourceExhausted
    );

    // The event task counts the finished job shortly after it is published.
    let text = scrape_until(
        port,
        "instance_agent_jobs_finished_total{state=\"succeeded\"}",
        1.0,
    )
    .await;

    assert_eq!(
        sample(
            &text,
            "instance_agent_jobs_finished_total{state=\"succeeded\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "instance_agent_job_duration_seconds_count"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "instance_agent_jobs{state=\"succeeded\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "instance_agent_job_queue_depth"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "instance_agent_job_slots_capacity"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "instance_agent_rpcs_total{method=\"/instance_agent.v1.AgentService/GetStatus\",code=\"0\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "instance_agent_rpcs_total{method=\"/instance_agent.v1.JobService/GetJob\",code=\"5\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "instance_agent_rpcs_total{method=\"/instance_agent.v1.JobService/SubmitJob\",code=\"8\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "instance_agent_rpc_duration_seconds_count{method=\"/instance_agent.v1.AgentService/GetStatus\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // The root filesystem is always watched; its free bytes are positive
    // once sampled, and exactly one state is current.
    let root_free = sample(&text, "instance_agent_disk_free_bytes{mount_point=\"/\"}");
    assert!(root_free.is_some_and(|b| b > 0.0), "{text}");
    let root_states = common::sum_of(&text, "instance_agent_disk_state{mount_point=\"/\",");
    assert_eq!(root_states, 1.0, "{text}");
    let rss = sample(&text, "instance_agent_resident_memory_bytes").expect("rss");
    assert!(rss > 1_000_000.0 && rss < 4_000_000_000.0, "rss {rss}");
    let cpu = sample(&text, "instance_agent_cpu_seconds_total").expect("cpu");
    assert!(cpu > 0.0, "cpu {cpu}");

    let (status, _) = http_get(port, "/other");
    assert!(status.contains("404"), "{status}");
}

#[test]
fn non_loopback_listen_is_refused_naming_the_key() {
    let (code, stderr) = common::serve_refused("[metrics]\nlisten = \"0.0.0.0:9464\"\n");
    assert_eq!(code, Some(78));
    assert!(stderr.contains("metrics.listen"), "{stderr}");
    assert!(stderr.contains("loopback"), "{stderr}");
}

#[test]
fn busy_metrics_port_is_a_startup_error_naming_the_address() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let mut agent = Agent::builder()
        .config(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"))
        .spawn();
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .expect("exits on the bind error");
    assert!(!status.success());
    let log = agent.log();
    assert!(log.contains(&format!("127.0.0.1:{port}")), "{log}");
    assert!(log.contains("metrics.listen"), "{log}");
}

//! Job throughput through the agent versus the docker CLI on the same image,
//! the agent's own overhead per job, and its RSS with 10,000 jobs queued.
//! Run by scripts/bench.sh (needs the engine and instance-agent/busybox:test);
//! prints `name | value` rows.
//!
//! Overhead per job is measured two ways, both defined so that they yield a
//! number on a noisy machine:
//! - CPU: the agent process's user+system time (/proc/PID/stat) over the N
//!   jobs of the throughput run, divided by N, beside the CPU time of the
//!   docker CLI processes (this process's reaped children, cutime+cstime)
//!   per job in the same run; and the wall-clock per job of both (ratio).
//! - Start latency: submit→running as the agent stamps it (one fsynced write
//!   of the queued record, one of the starting record, create, start) minus
//!   create+start through bollard directly, in interleaved pairs so that
//!   both sides see the same load; the median of the pairs' differences.
//!
//! Settings (environment): `BENCH_JOBS` (100 jobs for throughput and CPU),
//! `BENCH_PAIRS` (30 start-latency pairs), `BENCH_SECTIONS` (a comma list of
//! throughput, latency, queued; all by default).

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BenchAgent, cpu_ticks, percentile, rss_kib, setting, ticks_per_second};
use instance_agent::api::proto::{
    self, agent_service_client::AgentServiceClient, job_service_client::JobServiceClient,
};
use tonic::transport::Channel;

const IMAGE: &str = "instance-agent/busybox:test";

fn spec(id: String) -> proto::JobSpec {
    proto::JobSpec {
        id,
        image: IMAGE.into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

/// Waits until no job is queued or holds a slot (every submitted job has
/// ended and its container is gone), polling the cheap GetStatus so that the
/// wait itself costs the agent next to no CPU; then checks that `count` jobs
/// succeeded and none failed.
async fn wait_all_final(channel: &Channel, count: usize) {
    let mut agent = AgentServiceClient::new(channel.clone());
    loop {
        let status = agent
            .get_status(proto::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        let slots = status.slots.unwrap_or_default();
        if slots.queued == 0 && slots.in_use == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let list = JobServiceClient::new(channel.clone())
        .list_jobs(proto::ListJobsRequest {
            limit: 100_000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let failed: Vec<_> = list
        .jobs
        .iter()
        .filter(|j| j.state() != proto::JobState::Succeeded)
        .collect();
    assert!(failed.is_empty(), "jobs did not succeed: {failed:?}");
    assert_eq!(list.jobs.len(), count, "jobs recorded");
}

/// Creates and starts a container through bollard directly, as the agent
/// does, and returns how long create plus start took.
async fn engine_create_start(docker: &bollard::Docker, name: &str) -> Duration {
    use bollard::models::{ContainerCreateBody, HostConfig};
    let body = ContainerCreateBody {
        image: Some(IMAGE.into()),
        cmd: Some(vec!["true".into()]),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let options = bollard::query_parameters::CreateContainerOptions {
        name: Some(name.into()),
        platform: String::new(),
    };
    let started = Instant::now();
    let created = docker
        .create_container(Some(options), body)
        .await
        .expect("create");
    docker
        .start_container(&created.id, None)
        .await
        .expect("start");
    let took = started.elapsed();
    let _ = docker
        .remove_container(
            &created.id,
            Some(bollard::query_parameters::RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    took
}

/// CPU time (user+system, clock ticks) of this process's reaped children.
fn children_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // cutime and cstime follow utime and stime (see common::cpu_ticks).
    let field = |i: usize| -> u64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    field(13) + field(14)
}

fn ticks_ms(ticks: u64) -> f64 {
    ticks as f64 * 1000.0 / ticks_per_second() as f64
}

/// Sections to run: all, or those named in `BENCH_SECTIONS`
/// (throughput,latency,queued).
fn want(section: &str) -> bool {
    std::env::var("BENCH_SECTIONS").map_or(true, |s| s.split(',').any(|x| x == section))
}

#[tokio::main]
async fn main() {
    if want("throughput") {
        throughput().await;
    }
    if want("latency") {
        start_latency().await;
    }
    if want("queued") {
        queued().await;
    }
}

/// N `true` jobs through the agent, then the same through the docker CLI,
/// `capacity` at a time; the CPU each side spends.
async fn throughput() {
    let n = setting("BENCH_JOBS", 100);
    let capacity = 4;

    let agent = BenchAgent::start(&format!("[jobs]\nslots = {capacity}\n"));
    let channel = agent.channel().await;
    let mut jobs = JobServiceClient::new(channel.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ticks_before = cpu_ticks(agent.pid());
    let started = Instant::now();
    for i in 0..n {
        jobs.submit_job(proto::SubmitJobRequest {
            spec: Some(spec(format!("tp-{i}"))),
        })
        .await
        .expect("submit");
    }
    wait_all_final(&channel, n).await;
    let agent_secs = started.elapsed().as_secs_f64();
    let agent_ticks = cpu_ticks(agent.pid()) - ticks_before;
    drop(agent);

    let children_before = children_cpu_ticks();
    let started = Instant::now();
    let status = Command::new("sh")
        .args([
            "-c",
            &format!(
                "seq {n} | xargs -P{capacity} -I{{}} docker run --rm --network none {IMAGE} true"
            ),
        ])
        .status()
        .expect("xargs docker run");
    assert!(status.success());
    let cli_secs = started.elapsed().as_secs_f64();
    let cli_ticks = children_cpu_ticks() - children_before;

    let per_job_ms = |secs: f64| secs * 1000.0 / n as f64;
    println!(
        "job throughput, agent vs `xargs -P{capacity} docker run --rm --network none` ({n} × `true`, {capacity} slots, same run) | {:.1} vs {:.1} jobs/s (ratio {:.2})",
        n as f64 / agent_secs,
        n as f64 / cli_secs,
        cli_secs / agent_secs
    );
    println!(
        "wall-clock per job, agent vs docker CLI (same run) | {:.0} vs {:.0} ms (ratio {:.2})",
        per_job_ms(agent_secs),
        per_job_ms(cli_secs),
        agent_secs / cli_secs
    );
    println!(
        "agent overhead per job: agent CPU time per job vs docker CLI processes' per job ({n} jobs, /proc ticks) | {:.2} vs {:.1} ms",
        ticks_ms(agent_ticks) / n as f64,
        ticks_ms(cli_ticks) / n as f64
    );
}

/// Start latency: one job through the agent, then one container through
/// bollard, `samples` times, with the engine idle before each.
async fn start_latency() {
    let samples = setting("BENCH_PAIRS", 30);
    let agent = BenchAgent::start("[jobs]\nslots = 4\n");
    let channel = agent.channel().await;
    let mut jobs = JobServiceClient::new(channel.clone());
    let docker = bollard::Docker::connect_with_unix_defaults()
        .expect("docker")
        .negotiate_version()
        .await
        .expect("negotiate");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut through_agent, mut direct, mut differences) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let id = format!("lat-{i}");
        jobs.submit_job(proto::SubmitJobRequest {
            spec: Some(spec(id.clone())),
        })
        .await
        .expect("submit");
        let deadline = Instant::now() + Duration::from_secs(60);
        let job = loop {
            let job = jobs
                .get_job(proto::GetJobRequest { id: id.clone() })
                .await
                .expect("get")
                .into_inner();
            let state = job.state();
            if matches!(
                state,
                proto::JobState::Succeeded
                    | proto::JobState::Failed
                    | proto::JobState::Cancelled
                    | proto::JobState::TimedOut
            ) {
                assert_eq!(state, proto::JobState::Succeeded, "{job:?}");
                break job;
            }
            assert!(Instant::now() < deadline, "job {id} did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        wait_all_final(&channel, i + 1).await;
        // running_at is stamped by the agent right after start returns.
        let (queued, running) = (
            job.queued_at.expect("queued_at"),
            job.running_at.expect("running_at"),
        );
        let nanos = (running.seconds - queued.seconds) * 1_000_000_000
            + i64::from(running.nanos - queued.nanos);
        let agent_side = Duration::from_nanos(nanos.max(0) as u64);
        let direct_side =
            engine_create_start(&docker, &format!("bench-direct-{}-{i}", std::process::id())).await;
        through_agent.push(agent_side);
        direct.push(direct_side);
        differences.push(agent_side.as_secs_f64() - direct_side.as_secs_f64());
    }
    drop(agent);
    through_agent.sort();
    direct.sort();
    differences.sort_by(f64::total_cmp);
    let median_difference = differences[differences.len() / 2];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "job start latency: submit→running through the agent vs create+start through bollard (medians of {samples} interleaved pairs) | {:.1} vs {:.1} ms",
        ms(percentile(&through_agent, 50.0)),
        ms(percentile(&direct, 50.0))
    );
    println!(
        "agent overhead per job: start latency added (median of the {samples} pairs' differences) | {:.1} ms",
        median_difference * 1000.0
    );
}

async fn queued() {
    // RSS with 10,000 jobs queued (engine unreachable, so none starts).
    let queued = 10_000;
    let agent = BenchAgent::start(
        "[docker]\nsocket = \"/nonexistent/docker.sock\"\n[jobs]\nmax_queue = 20000\n",
    );
    let mut jobs = JobServiceClient::new(agent.channel().await);
    let rss_before = rss_kib(agent.pid());
    let started = Instant::now();
    let mut spec_with_env = spec(String::new());
    spec_with_env.env = HashMap::from([("EPOCHS".to_owned(), "10".to_owned())]);
    spec_with_env.command = vec![
        "python".into(),
        "train.py".into(),
        "--lr".into(),
        "0.001".into(),
    ];
    for i in 0..queued {
        let mut s = spec_with_env.clone();
        s.id = format!("q-{i}");
        jobs.submit_job(proto::SubmitJobRequest { spec: Some(s) })
            .await
            .expect("submit");
    }
    let submit_rate = queued as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_queued = rss_kib(agent.pid());

    println!("SubmitJob rate, sequential, fsync per job | {submit_rate:.0} jobs/s");
    println!(
        "RSS idle → with {queued} jobs queued | {:.1} MiB → {:.1} MiB",
        rss_before as f64 / 1024.0,
        rss_queued as f64 / 1024.0
    );
}

//! Job throughput through the agent versus the docker CLI on the same image,
//! the agent's own overhead per job, and its RSS with 10,000 jobs queued.
//! Run by scripts/bench.sh (needs the engine and instance-agent/busybox:test);
//! prints `name | value` rows.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BenchAgent, rss_kib};
use instance_agent::api::proto::{self, job_service_client::JobServiceClient};

const IMAGE: &str = "instance-agent/busybox:test";

fn spec(id: String) -> proto::JobSpec {
    proto::JobSpec {
        id,
        image: IMAGE.into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

async fn wait_all_final(jobs: &mut JobServiceClient<tonic::transport::Channel>, count: usize) {
    loop {
        let list = jobs
            .list_jobs(proto::ListJobsRequest {
                states: vec![
                    proto::JobState::Succeeded as i32,
                    proto::JobState::Failed as i32,
                ],
                limit: 100_000,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        if list.jobs.len() >= count {
            let failed = list
                .jobs
                .iter()
                .filter(|j| j.state() == proto::JobState::Failed)
                .count();
            assert_eq!(
                failed,
                0,
                "jobs failed: {:?}",
                list.jobs
                    .iter()
                    .find(|j| j.state() == proto::JobState::Failed)
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// Sections to run: all, or those named in `BENCH_SECTIONS`
/// (throughput,overhead,queued).
fn want(section: &str) -> bool {
    std::env::var("BENCH_SECTIONS").map_or(true, |s| s.split(',').any(|x| x == section))
}

#[tokio::main]
async fn main() {
    if want("throughput") {
        throughput().await;
    }
    if want("overhead") {
        overhead().await;
    }
    if want("queued") {
        queued().await;
    }
}

async fn throughput() {
    let n: usize = std::env::var("BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let capacity = 4;

    // 1. Throughput: N `true` jobs through the agent.
    let agent = BenchAgent::start(&format!("[jobs]\nslots = {capacity}\n"));
    let mut jobs = JobServiceClient::new(agent.channel().await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    for i in 0..n {
        jobs.submit_job(proto::SubmitJobRequest {
            spec: Some(spec(format!("tp-{i}"))),
        })
        .await
        .expect("submit");
    }
    wait_all_final(&mut jobs, n).await;
    let agent_secs = started.elapsed().as_secs_f64();

    // Per-job agent timings (queued→running includes queueing; measure
    // overhead separately below).
    drop(agent);

    // 2. The same through the docker CLI, `capacity` at a time.
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
    println!(
        "jobs through the agent ({n} x `true`, {capacity} slots) | {:.1} jobs/s",
        n as f64 / agent_secs
    );
    println!(
        "jobs through `xargs -P{capacity} docker run --rm` | {:.1} jobs/s",
        n as f64 / cli_secs
    );
    println!(
        "agent / docker CLI throughput ratio | {:.2}",
        cli_secs / agent_secs
    );
}

async fn overhead() {
    let capacity = 4;

    // 3. Overhead per job: submit→running through the agent, one job at a
    // time (no queueing), minus create+start through bollard directly.
    let agent = BenchAgent::start(&format!("[jobs]\nslots = {capacity}\n"));
    let mut jobs = JobServiceClient::new(agent.channel().await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = 30;
    let mut through_agent = Vec::new();
    for i in 0..samples {
        let id = format!("oh-{i}");
        let t0 = Instant::now();
        jobs.submit_job(proto::SubmitJobRequest {
            spec: Some(spec(id.clone())),
        })
        .await
        .expect("submit");
        loop {
            let job = jobs
                .get_job(proto::GetJobRequest { id: id.clone() })
                .await
                .expect("get")
                .into_inner();
            if let Some(running) = job.running_at {
                // running_at is stamped by the agent right after start returns.
                let queued = job.queued_at.expect("queued_at");
                let nanos = (running.seconds - queued.seconds) * 1_000_000_000
                    + i64::from(running.nanos - queued.nanos);
                through_agent.push(Duration::from_nanos(nanos.max(0) as u64));
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                panic!("job {id} never ran");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        wait_all_final(&mut jobs, i + 1).await;
    }
    drop(agent);
    let docker = bollard::Docker::connect_with_unix_defaults()
        .expect("docker")
        .negotiate_version()
        .await
        .expect("negotiate");
    let mut direct = Vec::new();
    for i in 0..samples {
        direct.push(
            engine_create_start(&docker, &format!("bench-direct-{}-{i}", std::process::id())).await,
        );
    }
    let mean = |v: &[Duration]| v.iter().sum::<Duration>().as_secs_f64() / v.len() as f64 * 1000.0;
    let agent_ms = mean(&through_agent);
    let direct_ms = mean(&direct);
    println!("submit→running through the agent (mean of {samples}) | {agent_ms:.1} ms");
    println!("create+start through bollard directly (mean of {samples}) | {direct_ms:.1} ms");
    println!("agent overhead per job | {:.1} ms", agent_ms - direct_ms);
}

async fn queued() {
    // 4. RSS with 10,000 jobs queued (engine unreachable, so none starts).
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

//! Image pulls: a queue of jobs with different images that are not local,
//! through the agent (pulls overlap with running work) versus `docker pull
//! && docker run --rm` one after the other; four jobs sharing one image
//! (one pull, one set of blob fetches at the registry); and the time from
//! `SubmitJob` to RUNNING for a cached image. Run by scripts/bench.sh
//! (needs the engine, `docker-registry` and instance-agent/busybox:test);
//! prints `name | value` rows.
//!
//! The images are built on the busybox test image with three layers of
//! random (incompressible) data and pushed to a local registry; each job
//! sleeps as long as one pull of such an image takes here (measured first),
//! so pull ≈ run and the best possible ratio is about 1.8.
//!
//! Settings (environment): `BENCH_IMAGES` (8 images), `BENCH_IMAGE_MIB`
//! (300 MiB each), `BENCH_STARTS` (20 cached starts).

mod common;
#[path = "../tests/common/registry.rs"]
#[allow(dead_code)]
mod registry;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BenchAgent, percentile, setting};
use instance_agent::api::proto::{
    self, agent_service_client::AgentServiceClient, job_service_client::JobServiceClient,
};
use registry::{Kind, Pushed, TestRegistry};
use tonic::transport::Channel;

/// The registry helper is shared with the tests, which register its
/// secrets for their log sweep; a bench has none to sweep.
fn secret(value: &str) -> String {
    value.to_owned()
}

/// Where the registry helper keeps its log after a test: a path that cannot
/// be created, so the bench keeps none.
fn captured_dir() -> PathBuf {
    PathBuf::from("/dev/null/bench")
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn job(id: String, image: &str, command: &[&str]) -> proto::JobSpec {
    proto::JobSpec {
        id,
        image: image.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Polls until every one of `ids` is in a final state; panics when one did
/// not succeed.
async fn wait_succeeded(channel: &Channel, ids: &[String]) {
    let mut jobs = JobServiceClient::new(channel.clone());
    for id in ids {
        loop {
            let job = jobs
                .get_job(proto::GetJobRequest { id: id.clone() })
                .await
                .expect("get")
                .into_inner();
            match job.state() {
                proto::JobState::Succeeded => break,
                proto::JobState::Queued | proto::JobState::Starting | proto::JobState::Running => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => panic!("job {id} ended {other:?}: {}", job.reason),
            }
        }
    }
}

fn docker(args: &[&str]) {
    let status = Command::new("docker")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("docker");
    assert!(status.success(), "docker {args:?}");
}

#[tokio::main]
async fn main() {
    let count = setting("BENCH_IMAGES", 8);
    let mib = setting("BENCH_IMAGE_MIB", 300) as u64;
    let registry = TestRegistry::start(Kind::Plain);
    let built = Instant::now();
    let images: Vec<Pushed> = (0..count)
        .map(|i| registry.push(&format!("bench{i}"), "1", 3, mib / 3))
        .collect();
    eprintln!(
        "images: {count} × {mib} MiB built and pushed in {:.0} s",
        built.elapsed().as_secs_f64()
    );

    // One pull, to size the jobs: each runs about as long as a pull takes.
    let started = Instant::now();
    docker(&["pull", &images[0].reference]);
    let pull = started.elapsed();
    registry.remove_local(&images[0].reference);
    let run = format!("{:.1}", pull.as_secs_f64());
    println!(
        "one `docker pull` of a {mib} MiB image (3 random layers) from the loopback registry | {:.1} s (each job below sleeps {run} s)",
        pull.as_secs_f64()
    );

    queue_of_images(&registry, &images, &run).await;
    shared_image(&registry, mib).await;
    cached_start().await;
}

/// The queue of jobs with different images on one slot: the agent with
/// prefetch against `docker pull && docker run --rm` in turn.
async fn queue_of_images(registry: &TestRegistry, images: &[Pushed], run: &str) {
    let agent = BenchAgent::start("[jobs]\nslots = 1\n");
    let channel = agent.channel().await;
    let mut jobs = JobServiceClient::new(channel.clone());
    let ids: Vec<String> = (0..images.len()).map(|i| format!("queue-{i}")).collect();
    let started = Instant::now();
    for (id, image) in ids.iter().zip(images) {
        jobs.submit_job(proto::SubmitJobRequest {
            spec: Some(job(id.clone(), &image.reference, &["sleep", run])),
        })
        .await
        .expect("submit");
    }
    wait_succeeded(&channel, &ids).await;
    let agent_secs = started.elapsed().as_secs_f64();
    drop(agent);
    for image in images {
        registry.remove_local(&image.reference);
    }

    let started = Instant::now();
    for image in images {
        docker(&["pull", &image.reference]);
        docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            &image.reference,
            "sleep",
            run,
        ]);
    }
    let cli_secs = started.elapsed().as_secs_f64();
    for image in images {
        registry.remove_local(&image.reference);
    }
    println!(
        "{n} jobs × different images not local, 1 slot, each sleeping {run} s: agent (prefetch, 2 pulls at once) vs `docker pull && docker run --rm` in turn | {agent_secs:.1} vs {cli_secs:.1} s (ratio {:.2}; best possible about 1.8)",
        cli_secs / agent_secs,
        n = images.len()
    );
}

/// Four jobs of one image that is not local: one pull for all.
async fn shared_image(registry: &TestRegistry, mib: u64) {
    let image = registry.push("shared", "1", 3, mib / 3);
    let agent = BenchAgent::start("[jobs]\nslots = 4\n");
    let channel = agent.channel().await;
    let mut jobs = JobServiceClient::new(channel.clone());
    let ids: Vec<String> = (0..4).map(|i| format!("shared-{i}")).collect();
    let started = Instant::now();
    for id in &ids {
        jobs.submit_job(proto::SubmitJobRequest {
            spec: Some(job(id.clone(), &image.reference, &["true"])),
        })
        .await
        .expect("submit");
    }
    wait_succeeded(&channel, &ids).await;
    let secs = started.elapsed().as_secs_f64();
    drop(agent);
    registry.remove_local(&image.reference);
    println!(
        "4 jobs sharing one {mib} MiB image not local: registry blob fetches (own layers + config) | {} for {} blobs, all four done in {secs:.1} s",
        registry.blob_fetches(&image.repository),
        image.layers + 1
    );
}

/// `SubmitJob` to RUNNING for a cached image, as the agent stamps it.
async fn cached_start() {
    let n = setting("BENCH_STARTS", 20);
    let agent = BenchAgent::start("[jobs]\nslots = 4\n");
    let channel = agent.channel().await;
    let mut jobs = JobServiceClient::new(channel.clone());
    let mut samples = Vec::new();
    for i in 0..n {
        let id = format!("cached-{i}");
        jobs.submit_job(proto::SubmitJobRequest {
            spec: Some(job(id.clone(), "instance-agent/busybox:test", &["true"])),
        })
        .await
        .expect("submit");
        wait_succeeded(&channel, std::slice::from_ref(&id)).await;
        let job = jobs
            .get_job(proto::GetJobRequest { id })
            .await
            .expect("get")
            .into_inner();
        let stamp = |t: Option<&pbjson_types::Timestamp>| {
            t.map_or(0.0, |t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
        };
        let took = stamp(job.running_at.as_ref()) - stamp(job.queued_at.as_ref());
        samples.push(Duration::from_secs_f64(took.max(0.0)));
    }
    // The agent is idle between samples: nothing else in flight.
    let _ = AgentServiceClient::new(channel)
        .get_status(proto::GetStatusRequest {})
        .await;
    samples.sort();
    println!(
        "SubmitJob → RUNNING for a cached image (agent's stamps, {n} jobs one at a time) | p50 {:.0} ms, p90 {:.0} ms",
        percentile(&samples, 50.0).as_secs_f64() * 1000.0,
        percentile(&samples, 90.0).as_secs_f64() * 1000.0
    );
}

//! Apps: what the agent adds to running a server. Run by `scripts/bench.sh
//! apps` (needs the engine and instance-agent/busybox:test); prints
//! `name | value` rows.
//!
//! - Start: DeployApp to READY (busybox httpd, health `GET /` every second),
//!   cold (the first app: the apps network is created) and warm (median of
//!   the next ones), beside `docker run -d -p 127.0.0.1::8080` of the same
//!   image and command to the first HTTP answer.
//! - Readiness: from the health path first answering 200 (the test flips a
//!   file in the container) to READY as the agent stamps it (`updated`);
//!   the goal is at most one probe interval + 50 ms.
//! - Crash: from SIGKILL of the server to HTTP answered again on the same
//!   port (goal: the 1 s backoff + container start + one probe).
//! - Probes: the agent's CPU time per probe with 10 apps probed every
//!   second, and its RSS with those 10 apps deployed.
//!
//! Settings (environment): `BENCH_APP_ROUNDS` (5 starts and readiness
//! rounds), `BENCH_PROBE_SECONDS` (20 s of probing for the CPU figure).

mod common;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{BenchAgent, cpu_ticks, percentile, rss_kib, setting, ticks_per_second};
use instance_agent::api::proto::{self, app_service_client::AppServiceClient};
use tonic::transport::Channel;

const IMAGE: &str = "instance-agent/busybox:test";

/// The server: `/index.html` (liveness `GET /`) only once `/tmp/ready`
/// exists, at once when `ready`.
fn server(ready: bool) -> String {
    format!(
        "mkdir -p /www; {}; exec httpd -f -p 8080 -h /www",
        if ready {
            "echo ok > /www/index.html"
        } else {
            "true"
        }
    )
}

fn spec(name: &str, ready: bool) -> proto::AppSpec {
    proto::AppSpec {
        name: name.into(),
        image: IMAGE.into(),
        command: vec!["sh".into(), "-c".into(), server(ready)],
        ports: vec![proto::AppPort {
            name: "http".into(),
            container_port: 8080,
            ..Default::default()
        }],
        health: Some(proto::HealthCheck {
            probe: Some(proto::health_check::Probe::Http(proto::HttpCheck {
                port: "http".into(),
                path: "/".into(),
                ..Default::default()
            })),
            interval_seconds: Some(1),
            timeout_seconds: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Removes the bench's app containers and network, even after a panic.
struct Cleanup {
    instance: String,
    network: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = containers(&self.instance, None);
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

fn containers(instance: &str, app: Option<&str>) -> Vec<String> {
    let mut command = Command::new("docker");
    command.args(["ps", "-aq", "--filter"]);
    command.arg(format!("label=io.instance-agent.app-instance={instance}"));
    if let Some(app) = app {
        command.args(["--filter", &format!("label=io.instance-agent.app={app}")]);
    }
    let out = command.output().expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// True once `GET /` on 127.0.0.1:`port` answers 200.
fn answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200")
}

async fn get(c: &mut AppServiceClient<Channel>, name: &str) -> proto::App {
    c.get_app(proto::GetAppRequest { name: name.into() })
        .await
        .expect("get")
        .into_inner()
}

async fn until_ready(c: &mut AppServiceClient<Channel>, name: &str) -> proto::App {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let app = get(c, name).await;
        match app.state() {
            proto::AppState::Ready => return app,
            proto::AppState::Failed | proto::AppState::Stopped => panic!("{name}: {app:?}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "{name} not READY: {app:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn port_of(app: &proto::App) -> u16 {
    let url = &app.endpoints.first().expect("an endpoint").url;
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

async fn remove(c: &mut AppServiceClient<Channel>, name: &str, instance: &str) {
    c.remove_app(proto::RemoveAppRequest { name: name.into() })
        .await
        .expect("remove");
    while !containers(instance, Some(name)).is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    percentile(&values, 50.0)
}

/// `docker run -d` of the same server to its first HTTP answer.
fn docker_run_to_answer(network: &str) -> Duration {
    let began = Instant::now();
    let out = Command::new("docker")
        .args([
            "run",
            "-d",
            "--rm",
            "--network",
            network,
            "-p",
            "127.0.0.1::8080",
        ])
        .args([
            "--label",
            "io.instance-agent.bench-docker-run=1",
            IMAGE,
            "sh",
            "-c",
        ])
        .arg(server(true))
        .output()
        .expect("docker run");
    assert!(
        out.status.success(),
        "docker run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let port = Command::new("docker")
        .args(["port", &id, "8080/tcp"])
        .output()
        .expect("docker port");
    let port: u16 = String::from_utf8_lossy(&port.stdout)
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok())
        .expect("a published port");
    while !answers(port) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = began.elapsed();
    let _ = Command::new("docker").args(["rm", "-f", &id]).output();
    took
}

#[tokio::main]
async fn main() {
    let rounds = setting("BENCH_APP_ROUNDS", 5);
    let probe_seconds = setting("BENCH_PROBE_SECONDS", 20) as u64;
    let network = format!("ia-bench-apps-{}", std::process::id());
    let instance = format!("bench-{}", std::process::id());
    let _cleanup = Cleanup {
        instance: instance.clone(),
        network: network.clone(),
    };
    let agent = BenchAgent::start(&format!(
        "[apps]\nnetwork = {network:?}\nstop_grace_seconds = 1\n[jobs]\nslots = 16\n"
    ));
    let mut c = AppServiceClient::new(agent.channel().await);

    // Start: cold, then warm, beside docker run.
    let mut starts = Vec::new();
    for round in 0..=rounds {
        let name = format!("start{round}");
        let began = Instant::now();
        c.deploy_app(proto::DeployAppRequest {
            spec: Some(spec(&name, true)),
        })
        .await
        .expect("deploy");
        until_ready(&mut c, &name).await;
        starts.push(began.elapsed());
        remove(&mut c, &name, &instance).await;
    }
    let cold = starts.remove(0);
    let docker: Vec<Duration> = (0..rounds)
        .map(|_| docker_run_to_answer(&network))
        .collect();
    println!(
        "app start, cold (DeployApp to READY, network created) | {}",
        ms(cold)
    );
    println!(
        "app start, warm (DeployApp to READY, median of {rounds}) | {}",
        ms(median(starts))
    );
    println!(
        "docker run -d -p to first HTTP answer (median of {rounds}) | {}",
        ms(median(docker))
    );

    // Readiness: the health path answers → READY.
    let mut delays = Vec::new();
    for round in 0..rounds {
        let name = format!("ready{round}");
        c.deploy_app(proto::DeployAppRequest {
            spec: Some(spec(&name, false)),
        })
        .await
        .expect("deploy");
        // A failed probe first, so that the flip lands between probes.
        loop {
            let app = get(&mut c, &name).await;
            if app.last_probe.as_ref().is_some_and(|p| !p.healthy) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let id = containers(&instance, Some(&name))
            .pop()
            .expect("a container");
        let flipped = SystemTime::now();
        let out = Command::new("docker")
            .args(["exec", &id, "sh", "-c", "echo ok > /www/index.html"])
            .output()
            .expect("docker exec");
        assert!(out.status.success());
        let app = until_ready(&mut c, &name).await;
        let updated = app.updated.expect("updated");
        let ready =
            SystemTime::UNIX_EPOCH + Duration::new(updated.seconds as u64, updated.nanos as u32);
        delays.push(ready.duration_since(flipped).unwrap_or_default());
        remove(&mut c, &name, &instance).await;
    }
    delays.sort();
    println!(
        "health path answering to READY, 1 s interval (median, max of {rounds}) | {}, {}",
        ms(percentile(&delays, 50.0)),
        ms(*delays.last().expect("rounds"))
    );

    // Crash to serving again.
    c.deploy_app(proto::DeployAppRequest {
        spec: Some(spec("crash", true)),
    })
    .await
    .expect("deploy");
    let app = until_ready(&mut c, "crash").await;
    let port = port_of(&app);
    let id = containers(&instance, Some("crash"))
        .pop()
        .expect("a container");
    let pid = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Pid}}", &id])
        .output()
        .expect("inspect");
    let pid: i32 = String::from_utf8_lossy(&pid.stdout)
        .trim()
        .parse()
        .expect("pid");
    let began = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    while answers(port) {
        std::thread::sleep(Duration::from_millis(1));
    }
    while !answers(port) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let serving = began.elapsed();
    until_ready(&mut c, "crash").await;
    let ready = began.elapsed();
    println!(
        "crash (SIGKILL) to HTTP answered again, 1 s backoff | {}",
        ms(serving)
    );
    println!("crash (SIGKILL) to READY again | {}", ms(ready));
    remove(&mut c, "crash", &instance).await;

    // Probes: 10 apps, CPU per probe and RSS.
    for i in 0..10 {
        let name = format!("idle{i}");
        c.deploy_app(proto::DeployAppRequest {
            spec: Some(spec(&name, true)),
        })
        .await
        .expect("deploy");
        until_ready(&mut c, &name).await;
    }
    let pid = agent.pid();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(probe_seconds)).await;
    let ticks = cpu_ticks(pid) - before;
    let probes = 10 * probe_seconds;
    let cpu = Duration::from_secs_f64(ticks as f64 / ticks_per_second() as f64);
    println!(
        "agent CPU per probe (10 apps, 1 s interval, {probe_seconds} s) | {:.2} ms",
        cpu.as_secs_f64() * 1000.0 / probes as f64
    );
    println!(
        "agent RSS with 10 apps deployed | {} MiB",
        rss_kib(pid) / 1024
    );
}

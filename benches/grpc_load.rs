//! gRPC load generator: N concurrent clients call `AgentService.GetStatus`
//! over the Unix socket, spread over M HTTP/2 connections, for a fixed time;
//! reports requests/s, latency percentiles, and the CPU used by the agent, by
//! this generator and by everything else on the machine during the run (the
//! generator and the agent share the machine's cores, and so do other
//! builds). Run by scripts/bench.sh; prints `name | value` rows.
//!
//! Settings (environment):
//! - `GRPC_LOAD_SETTINGS` (`4x1,32x4`): the runs, as CLIENTSxCONNECTIONS.
//!   4 clients over 1 connection is the setting that met both goals (over
//!   20,000 req/s, p99 under 2 ms) most often on the shared 2-core machine;
//!   32 over 4 shows the peak throughput, at a longer tail. See README.
//! - `GRPC_LOAD_SECONDS` (10): each run; a 1 s warm-up precedes it.
//! - `GRPC_LOAD_THREADS` (2): worker threads of the generator's runtime
//!   (1 was slower in every run).
//! - `GRPC_LOAD_AGENT_THREADS`: the agent's worker threads
//!   (`TOKIO_WORKER_THREADS`; the agent's default is 2).
//! - `GRPC_LOAD_SWEEP=1`: instead, a table over many settings (5 s each).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{BenchAgent, cpu_ticks, machine, setting, ticks_per_second};
use instance_agent::api::proto::{self, agent_service_client::AgentServiceClient};
use tonic::transport::Channel;

/// What one run measured.
struct Outcome {
    clients: usize,
    connections: usize,
    seconds: f64,
    requests: u64,
    errors: u64,
    latencies: Vec<Duration>,
    agent_cpu: f64,
    generator_cpu: f64,
    machine_busy: f64,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> Duration {
        common::percentile(&self.latencies, p)
    }
}

/// Busy and total jiffies of all CPUs, from /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

async fn run(
    agent: &BenchAgent,
    clients: usize,
    connections: usize,
    duration: Duration,
) -> Outcome {
    let mut channels: Vec<Channel> = Vec::new();
    for _ in 0..connections {
        channels.push(agent.channel().await);
    }
    let warmup = Duration::from_secs(1);
    let begin = Instant::now() + warmup;
    let end = begin + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut client = AgentServiceClient::new(channels[i % connections].clone());
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            loop {
                let sent = Instant::now();
                let reply = client.get_status(proto::GetStatusRequest {}).await;
                let done = Instant::now();
                if done >= end {
                    break;
                }
                if sent >= begin {
                    match reply {
                        Ok(_) => latencies.push(done - sent),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            latencies
        }));
    }
    tokio::time::sleep_until(begin.into()).await;
    let agent_before = cpu_ticks(agent.pid());
    let self_before = cpu_ticks(std::process::id());
    let machine_before = machine_jiffies();
    tokio::time::sleep_until(end.into()).await;
    let agent_ticks = cpu_ticks(agent.pid()) - agent_before;
    let self_ticks = cpu_ticks(std::process::id()) - self_before;
    let machine_after = machine_jiffies();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("client task"));
    }
    latencies.sort_unstable();
    let hz = ticks_per_second() as f64;
    let seconds = duration.as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (busy, total) = (
        machine_after.0 - machine_before.0,
        machine_after.1 - machine_before.1,
    );
    Outcome {
        clients,
        connections,
        seconds,
        requests: latencies.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        latencies,
        agent_cpu: agent_ticks as f64 / hz / seconds * 100.0,
        generator_cpu: self_ticks as f64 / hz / seconds * 100.0,
        machine_busy: busy as f64 / total.max(1) as f64 * cores * 100.0,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// `CxN,CxN,...` as (clients, connections) pairs.
fn parse_settings(text: &str) -> Vec<(usize, usize)> {
    text.split(',')
        .map(|pair| {
            let (clients, connections) = pair.trim().split_once('x').unwrap_or_else(|| {
                panic!("GRPC_LOAD_SETTINGS: {pair:?} is not CLIENTSxCONNECTIONS")
            });
            let number = |v: &str| -> usize {
                v.parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| panic!("GRPC_LOAD_SETTINGS: {pair:?} needs numbers above 0"))
            };
            (number(clients), number(connections))
        })
        .collect()
}

const SWEEP: [(usize, usize); 11] = [
    (1, 1),
    (4, 1),
    (4, 2),
    (8, 1),
    (8, 2),
    (16, 2),
    (16, 4),
    (32, 4),
    (64, 4),
    (64, 8),
    (128, 8),
];

fn main() {
    let settings =
        parse_settings(&std::env::var("GRPC_LOAD_SETTINGS").unwrap_or_else(|_| "4x1,32x4".into()));
    let seconds = setting("GRPC_LOAD_SECONDS", 10);
    let threads = setting("GRPC_LOAD_THREADS", 2);
    let agent_threads = std::env::var("GRPC_LOAD_AGENT_THREADS").ok();
    let sweep = std::env::var("GRPC_LOAD_SWEEP").is_ok_and(|v| v == "1");

    let env: Vec<(&str, &str)> = agent_threads
        .as_deref()
        .map(|n| vec![("TOKIO_WORKER_THREADS", n)])
        .unwrap_or_default();
    let agent = BenchAgent::start_with_env("", &env);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    let agent_threads = agent_threads.unwrap_or_else(|| "2 (default)".into());

    if sweep {
        println!(
            "GetStatus sweep on {}, agent workers {agent_threads}, generator workers {threads}, 5 s each",
            machine()
        );
        println!(
            "clients | connections | req/s | p50 | p99 | agent CPU | generator CPU | machine busy"
        );
        for (clients, connections) in SWEEP {
            let o = runtime.block_on(run(&agent, clients, connections, Duration::from_secs(5)));
            println!(
                "{} | {} | {:.0} | {} | {} | {:.0} % | {:.0} % | {:.0} %",
                o.clients,
                o.connections,
                o.rate(),
                ms(o.percentile(50.0)),
                ms(o.percentile(99.0)),
                o.agent_cpu,
                o.generator_cpu,
                o.machine_busy
            );
        }
        return;
    }

    for (clients, connections) in settings {
        let o = runtime.block_on(run(
            &agent,
            clients,
            connections,
            Duration::from_secs(seconds as u64),
        ));
        let setup = format!("{clients} clients / {connections} conn");
        println!(
            "GetStatus throughput ({setup}, {seconds} s, agent workers {agent_threads}) | {:.0} req/s",
            o.rate()
        );
        println!(
            "GetStatus latency p50 / p99 / p99.9 / max ({setup}) | {} / {} / {} / {}",
            ms(o.percentile(50.0)),
            ms(o.percentile(99.0)),
            ms(o.percentile(99.9)),
            ms(o.percentile(100.0))
        );
        println!(
            "CPU during GetStatus load ({setup}): agent / generator / whole machine, 100 % = one core of {} | {:.0} % / {:.0} % / {:.0} %",
            machine(),
            o.agent_cpu,
            o.generator_cpu,
            o.machine_busy,
        );
        // Independent of how much of the machine others leave us.
        println!(
            "agent CPU per GetStatus ({setup}) | {:.1} µs",
            o.agent_cpu / 100.0 / o.rate().max(1.0) * 1e6
        );
        if o.errors > 0 {
            println!("GetStatus errors ({setup}) | {}", o.errors);
        }
    }
}

//! The agent's own footprint: time from start to READY=1 (systemd notify)
//! with an empty store and with 10,000 finished jobs in it, idle RSS (also
//! with those jobs loaded) and idle CPU, and the release binary's size. Run
//! by scripts/bench.sh; prints `name | value` rows.

mod common;

use std::time::Duration;

use common::{
    BenchAgent, METRICS_ON, binary, cpu_ticks, percentile, rss_kib, seed_finished_jobs,
    spawn_until_ready, ticks_per_second, write_config,
};

/// Finished jobs in the store for the second start measurement (the
/// default `jobs.retention_count`).
const STORED_JOBS: usize = 10_000;

/// Spawn → READY=1, `runs` times on one state dir (a fresh one when `seed`
/// is 0); returns the sorted times and the RSS of the last run's agent 3 s
/// after READY.
fn ready_times(runs: usize, seed: usize) -> (Vec<Duration>, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, config) = write_config(dir.path(), METRICS_ON);
    if seed > 0 {
        seed_finished_jobs(&dir.path().join("state"), seed);
    }
    let mut ready = Vec::new();
    let mut rss = 0;
    for run in 0..runs {
        let (mut child, took) = spawn_until_ready(&config, dir.path());
        ready.push(took);
        if run + 1 == runs {
            std::thread::sleep(Duration::from_secs(3));
            rss = rss_kib(child.id());
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    ready.sort();
    (ready, rss)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let runs = 20;
    let (ready, _) = ready_times(runs, 0);
    let stored_runs = 10;
    let (ready_stored, rss_stored) = ready_times(stored_runs, STORED_JOBS);

    let rss_metrics_off = {
        let agent = BenchAgent::start("[metrics]\nlisten = \"\"\n");
        std::thread::sleep(Duration::from_secs(23));
        rss_kib(agent.pid())
    };

    let agent = BenchAgent::start(METRICS_ON);
    std::thread::sleep(Duration::from_secs(3));
    let ticks_before = cpu_ticks(agent.pid());
    let idle = Duration::from_secs(20);
    std::thread::sleep(idle);
    let ticks = cpu_ticks(agent.pid()) - ticks_before;
    let rss = rss_kib(agent.pid());
    let cpu_percent = ticks as f64 / ticks_per_second() as f64 / idle.as_secs_f64() * 100.0;
    let size = std::fs::metadata(binary()).map(|m| m.len()).unwrap_or(0);

    println!(
        "start to READY=1, empty store (median; p90 of {runs}) | {}; {}",
        ms(percentile(&ready, 50.0)),
        ms(percentile(&ready, 90.0))
    );
    println!(
        "start to READY=1 with {STORED_JOBS} finished jobs in the store (median; p90 of {stored_runs}) | {}; {}",
        ms(percentile(&ready_stored, 50.0)),
        ms(percentile(&ready_stored, 90.0))
    );
    println!("idle RSS (after 23 s) | {:.1} MiB", rss as f64 / 1024.0);
    println!(
        "idle RSS, metrics off (after 23 s) | {:.1} MiB",
        rss_metrics_off as f64 / 1024.0
    );
    println!(
        "RSS with {STORED_JOBS} finished jobs in the store (3 s after READY) | {:.1} MiB",
        rss_stored as f64 / 1024.0
    );
    println!(
        "idle CPU (over {} s) | {cpu_percent:.2} % of one core",
        idle.as_secs()
    );
    println!(
        "release binary size | {:.1} MiB",
        size as f64 / (1 << 20) as f64
    );
}

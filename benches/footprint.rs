//! The agent's own footprint: time from start to READY=1 (systemd notify),
//! idle RSS and idle CPU, and the release binary's size. Run by
//! scripts/bench.sh; prints `name | value` rows.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{
    BenchAgent, binary, cpu_ticks, percentile, rss_kib, spawn, ticks_per_second, write_config,
};

/// Metrics on, on a port of the kernel's choosing, so that the bench never
/// collides with an agent already on the default port.
const METRICS_ON: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

fn main() {
    let runs = 20;
    let mut ready = Vec::new();
    for _ in 0..runs {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, config) = write_config(dir.path(), METRICS_ON);
        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
        notify
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let started = Instant::now();
        let mut child = spawn(
            &config,
            &[("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8"))],
        );
        let mut buf = [0u8; 4096];
        loop {
            let n = notify.recv(&mut buf).expect("READY=1 within 10 s");
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break;
            }
        }
        ready.push(started.elapsed());
        let _ = child.kill();
        let _ = child.wait();
    }
    ready.sort();

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
        "start to READY=1 (median of {runs}) | {:.1} ms",
        percentile(&ready, 50.0).as_secs_f64() * 1000.0
    );
    println!(
        "start to READY=1 (p90 of {runs}) | {:.1} ms",
        percentile(&ready, 90.0).as_secs_f64() * 1000.0
    );
    println!("idle RSS (after 23 s) | {:.1} MiB", rss as f64 / 1024.0);
    println!(
        "idle RSS, metrics off (after 23 s) | {:.1} MiB",
        rss_metrics_off as f64 / 1024.0
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

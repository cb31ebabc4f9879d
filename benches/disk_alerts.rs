//! Disk guard: (1) alert latency, from the moment a filesystem crosses the
//! critical level (fallocate returns) to the moment a `WatchDiskAlerts`
//! subscriber receives the alert, over repeated crossings at random phases of
//! the sampling interval (the default `interval_ms`); (2) the agent's CPU,
//! RSS and threads while it samples ten extra tmpfs filesystems. Run by
//! scripts/bench.sh and scripts/bench-disk.sh; prints `name | value` rows.
//! Needs root (tmpfs mounts); every mount is undone on drop, also on panic.
//!
//! Settings (environment): `DISK_CROSSINGS` (20), `DISK_CPU_SECONDS` (20),
//! `DISK_INTERVAL_MS` (the default of `disk.interval_ms`, 1000).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use common::{BenchAgent, cpu_ticks, percentile, rss_kib, setting, ticks_per_second};
use instance_agent::api::proto::{self, DiskState, disk_service_client::DiskServiceClient};
use instance_agent::disk::config::DiskConfig;
use nix::mount::{MntFlags, MsFlags};
use tokio::sync::mpsc;

/// Size of each tmpfs, and what is allocated to cross the critical level.
const TMPFS_MIB: u64 = 64;
const FILL_MIB: u64 = 58;
/// Levels: 6 MiB stay free after the fill, below the 8 MiB floor.
const CRITICAL_BYTES: u64 = 8 << 20;
const WARNING_BYTES: u64 = 16 << 20;
const CLEAR_MARGIN_BYTES: u64 = 2 << 20;
/// Extra filesystems sampled beside the one that crosses levels.
const EXTRA_FILESYSTEMS: usize = 10;

/// A tmpfs mounted for the bench; lazily unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: PathBuf, name: &str) -> Self {
        std::fs::create_dir_all(&path).expect("mount point");
        nix::mount::mount(
            Some(name),
            &path,
            Some("tmpfs"),
            MsFlags::empty(),
            Some(format!("size={TMPFS_MIB}m").as_str()),
        )
        .expect("mount tmpfs (needs root)");
        Self(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

/// A random delay below `max` (xorshift seeded from the clock: the phase
/// only has to be independent of the agent's sampling).
struct Phase(u64);

impl Phase {
    fn new() -> Self {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self(seed | 1)
    }

    fn next(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        max.mul_f64((self.0 % 1_000_000) as f64 / 1_000_000.0)
    }
}

/// Allocates `FILL_MIB` in `dir` (real blocks: a sparse file would not use
/// tmpfs space).
fn fill(dir: &Path) {
    let file = std::fs::File::create(dir.join("fill")).expect("create fill file");
    nix::fcntl::fallocate(
        &file,
        nix::fcntl::FallocateFlags::empty(),
        0,
        (FILL_MIB << 20) as i64,
    )
    .expect("fallocate");
}

/// Waits for the next alert on `mount_point` that enters `state`; returns
/// when it was received.
async fn alert_entering(
    alerts: &mut mpsc::UnboundedReceiver<(Instant, proto::DiskAlert)>,
    mount_point: &str,
    state: DiskState,
) -> Instant {
    alert_in(alerts, mount_point, state, false).await
}

/// Waits for the next alert on `mount_point` whose new state is `state`;
/// with `current`, the current-state alert a subscriber gets first counts
/// too (old state equal to the new one).
async fn alert_in(
    alerts: &mut mpsc::UnboundedReceiver<(Instant, proto::DiskAlert)>,
    mount_point: &str,
    state: DiskState,
    current: bool,
) -> Instant {
    let deadline = Duration::from_secs(30);
    loop {
        let (received, alert) = tokio::time::timeout(deadline, alerts.recv())
            .await
            .unwrap_or_else(|_| panic!("no {state:?} alert on {mount_point} within 30 s"))
            .expect("alert stream ended");
        if alert.mount_point == mount_point
            && alert.new_state() == state
            && (current || alert.old_state() != state)
        {
            return received;
        }
    }
}

#[tokio::main]
async fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        println!("disk alert latency | not measured (needs root for tmpfs mounts)");
        return;
    }
    let crossings = setting("DISK_CROSSINGS", 20);
    let cpu_seconds = setting("DISK_CPU_SECONDS", 20) as u64;
    let interval_ms = setting(
        "DISK_INTERVAL_MS",
        DiskConfig::default().interval_ms as usize,
    ) as u64;

    let mounts_dir = tempfile::tempdir().expect("tempdir");
    let filesystems: Vec<Tmpfs> = (0..=EXTRA_FILESYSTEMS)
        .map(|i| Tmpfs::mount(mounts_dir.path().join(format!("fs{i}")), "bench-disk"))
        .collect();
    let target = filesystems[0].0.clone();
    let target_name = target.to_str().expect("utf-8 path").to_owned();
    let paths: Vec<String> = filesystems.iter().map(|fs| format!("{:?}", fs.0)).collect();
    // transition_seconds = 0 only speeds up the recovery between crossings
    // (getting worse is immediate at any setting).
    let agent = BenchAgent::start(&format!(
        "[disk]\ninterval_ms = {interval_ms}\ntransition_seconds = 0\nauto_reclaim = false\n\
         critical_free_bytes = {CRITICAL_BYTES}\nwarning_free_bytes = {WARNING_BYTES}\n\
         clear_margin_bytes = {CLEAR_MARGIN_BYTES}\npaths = [{}]\n",
        paths.join(", ")
    ));
    let mut disk = DiskServiceClient::new(agent.channel().await);
    let mut stream = disk
        .watch_disk_alerts(proto::WatchDiskAlertsRequest {})
        .await
        .expect("WatchDiskAlerts")
        .into_inner();
    let (alerts_tx, mut alerts) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(alert)) = stream.message().await {
            if alerts_tx.send((Instant::now(), alert)).is_err() {
                return;
            }
        }
    });
    // The first alert per filesystem carries its current state: ok, either
    // as the current-state alert (sampled before the subscription) or as
    // the transition from unknown (sampled after it).
    alert_in(&mut alerts, &target_name, DiskState::Ok, true).await;

    let interval = Duration::from_millis(interval_ms);
    let mut phase = Phase::new();
    let mut latencies = Vec::with_capacity(crossings);
    for _ in 0..crossings {
        tokio::time::sleep(phase.next(interval)).await;
        fill(&target);
        let crossed = Instant::now();
        let received = alert_entering(&mut alerts, &target_name, DiskState::Critical).await;
        latencies.push(received - crossed);
        std::fs::remove_file(target.join("fill")).expect("remove fill file");
        alert_entering(&mut alerts, &target_name, DiskState::Ok).await;
    }
    latencies.sort();

    let watched = disk
        .get_disk_usage(proto::GetDiskUsageRequest::default())
        .await
        .expect("GetDiskUsage")
        .into_inner()
        .filesystems
        .len();
    let before = cpu_ticks(agent.pid());
    tokio::time::sleep(Duration::from_secs(cpu_seconds)).await;
    let ticks = cpu_ticks(agent.pid()) - before;
    let cpu_percent = ticks as f64 / ticks_per_second() as f64 / cpu_seconds as f64 * 100.0;
    let rss = rss_kib(agent.pid());
    let threads = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    drop(agent);
    drop(filesystems);

    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    println!(
        "disk alert latency, crossing → WatchDiskAlerts subscriber (interval_ms = {interval_ms}, {crossings} crossings at random phases): p50; p95 (min–max) | {}; {} ({}–{})",
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 95.0)),
        ms(percentile(&latencies, 0.0)),
        ms(percentile(&latencies, 100.0)),
    );
    println!(
        "agent CPU / RSS / threads while sampling {watched} filesystems every {interval_ms} ms ({cpu_seconds} s) | {cpu_percent:.2} % of one core / {:.1} MiB / {threads}",
        rss as f64 / 1024.0
    );
}

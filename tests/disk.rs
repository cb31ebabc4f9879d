//! Black-box tests of the disk guard on real filesystems the tests make
//! (tmpfs, loop-mounted ext4, a FUSE mount that never answers), filled and
//! emptied with fallocate, against the real binary; and of the Docker-side
//! reclaim steps against the real engine. Every mount, loop device and
//! container is removed on drop, also when a test fails.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::events::{self, EventLog, time_of};
use common::fs::{Filler, LoopExt4, MIB, Tmpfs, run};
use common::{Agent, cli, wait_for_fs};
use instance_agent::api::proto::{
    self, agent_service_client::AgentServiceClient, disk_service_client::DiskServiceClient,
};
use nix::mount::{MntFlags, MsFlags};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// A FUSE mount whose server never answers: `stat` and `statvfs` on it
/// block until it is unmounted and its device closed (on drop).
struct HangingFuse {
    _dir: tempfile::TempDir,
    path: PathBuf,
    device: Option<std::fs::File>,
}

impl HangingFuse {
    fn new() -> Self {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hung");
        std::fs::create_dir(&path).expect("mount point");
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open("/dev/fuse")
            .expect("open /dev/fuse");
        let options = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            device.as_raw_fd()
        );
        nix::mount::mount(
            Some("instance-agent-test-hang"),
            &path,
            Some("fuse.instance-agent-test-hang"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .expect("mount fuse");
        Self {
            _dir: dir,
            path,
            device: Some(device),
        }
    }
}

impl Drop for HangingFuse {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH);
        // Closing the device aborts the connection: blocked calls return.
        drop(self.device.take());
    }
}

/// Small levels for 64 MiB filesystems: floor 8 MiB, warning 16 MiB,
/// margin 2 MiB, 2 s to improve.
fn disk_config(interval_ms: u32, paths: &[&Path], extra: &str) -> String {
    let paths: Vec<String> = paths.iter().map(|p| format!("{:?}", p)).collect();
    format!(
        "[disk]\ninterval_ms = {interval_ms}\ncritical_free_bytes = {}\nwarning_free_bytes = {}\n\
         clear_margin_bytes = {}\ntransition_seconds = 2\nauto_reclaim = false\npaths = [{}]\n{extra}\n",
        8 * MIB,
        16 * MIB,
        2 * MIB,
        paths.join(", ")
    )
}

/// A 64 MiB tmpfs, its filler, and an agent watching it with the small levels.
async fn agent_on_tmpfs(interval_ms: u32) -> (Tmpfs, Filler, Agent, DiskServiceClient<Channel>) {
    let tmpfs = Tmpfs::new(64);
    let filler = Filler::new(&tmpfs.path);
    let agent = Agent::builder()
        .config(&disk_config(interval_ms, &[&tmpfs.path], ""))
        .start();
    let disk = disk_client(&agent).await;
    (tmpfs, filler, agent, disk)
}

async fn disk_client(agent: &Agent) -> DiskServiceClient<Channel> {
    DiskServiceClient::new(agent.channel().await)
}

/// The next alert about `mount`, skipping the others.
async fn next_alert(
    alerts: &mut tonic::Streaming<proto::DiskAlert>,
    mount: &Path,
) -> proto::DiskAlert {
    loop {
        let alert = tokio::time::timeout(Duration::from_secs(60), alerts.next())
            .await
            .expect("an alert within 60 s")
            .expect("stream open")
            .expect("alert");
        if Path::new(&alert.mount_point) == mount {
            return alert;
        }
    }
}

fn states(alert: &proto::DiskAlert) -> (proto::DiskState, proto::DiskState) {
    (alert.old_state(), alert.new_state())
}

#[tokio::test]
async fn exact_alert_sequence_latency_and_no_flapping_on_a_real_tmpfs() {
    use proto::DiskState::{Critical, Ok as Fine, Warning};
    let (tmpfs, filler, agent, mut disk) = agent_on_tmpfs(1000).await;
    wait_for_fs(&mut disk, &tmpfs.path, "tmpfs watched and ok", |f| {
        f.state() == Fine
    })
    .await;
    let mut alerts = disk
        .watch_disk_alerts(proto::WatchDiskAlertsRequest {})
        .await
        .expect("watch")
        .into_inner();
    let current = next_alert(&mut alerts, &tmpfs.path).await;
    assert_eq!(states(&current), (Fine, Fine), "current state first");
    let mut events = AgentServiceClient::new(agent.channel().await)
        .watch_events(proto::WatchEventsRequest { since: None })
        .await
        .expect("events")
        .into_inner();

    let mut latencies = Vec::new();
    filler.set_free(12 * MIB);
    let crossed = Instant::now();
    let warning = next_alert(&mut alerts, &tmpfs.path).await;
    latencies.push(crossed.elapsed());
    assert_eq!(states(&warning), (Fine, Warning));
    assert_eq!(warning.threshold_bytes, 16 * MIB);

    filler.set_free(5 * MIB);
    let crossed = Instant::now();
    let critical = next_alert(&mut alerts, &tmpfs.path).await;
    latencies.push(crossed.elapsed());
    assert_eq!(states(&critical), (Warning, Critical));
    assert_eq!(critical.threshold_bytes, 8 * MIB);
    assert!(
        critical.message.contains("below the 8.0 MiB floor"),
        "{}",
        critical.message
    );
    let usage = critical.usage.clone().expect("usage");
    assert_eq!(usage.fs_type, "tmpfs");
    assert!(usage.free_bytes < 8 * MIB);

    let (status, condition) = disk_condition(&agent).await;
    assert_eq!(condition.state(), proto::ConditionState::Failed);
    assert!(
        condition
            .message
            .contains(&tmpfs.path.display().to_string()),
        "{}",
        condition.message
    );
    assert!(
        status.summary.contains("disk failed"),
        "STATUS= line: {}",
        status.summary
    );

    // Oscillate around the floor, inside the margin, for longer than the
    // transition time (2 s) plus an interval: the guard samples every value,
    // below the floor and above it inside the margin, and stays critical
    // without an alert.
    let before = wait_for_fs(&mut disk, &tmpfs.path, "critical", |f| {
        f.state() == Critical
    })
    .await;
    let mut sample = before.clone();
    let mut swings = 0;
    while time_of(sample.sampled_at.as_ref())
        < time_of(before.sampled_at.as_ref()) + Duration::from_secs(3)
    {
        let below = swings % 2 == 0;
        filler.set_free(if below { 7 * MIB } else { 9 * MIB + MIB / 2 });
        sample = wait_for_fs(&mut disk, &tmpfs.path, "a sample of the new level", |f| {
            if below {
                f.free_bytes < 8 * MIB
            } else {
                f.free_bytes > 9 * MIB
            }
        })
        .await;
        assert_eq!(sample.state(), Critical, "still critical: {sample:?}");
        swings += 1;
    }
    assert!(swings >= 3, "{swings} swings sampled");
    // Then above the floor but inside the margin without a break, for longer
    // than the transition time: the margin alone keeps it critical.
    filler.set_free(9 * MIB + MIB / 2);
    let held = wait_for_fs(&mut disk, &tmpfs.path, "a sample inside the margin", |f| {
        f.free_bytes > 9 * MIB
    })
    .await;
    let held_since = time_of(held.sampled_at.as_ref());
    sample = held;
    while time_of(sample.sampled_at.as_ref()) < held_since + Duration::from_secs(3) {
        let previous = time_of(sample.sampled_at.as_ref());
        sample = wait_for_fs(&mut disk, &tmpfs.path, "the next sample", |f| {
            time_of(f.sampled_at.as_ref()) > previous
        })
        .await;
        assert_eq!(sample.state(), Critical, "still critical: {sample:?}");
        assert!(sample.free_bytes > 9 * MIB, "{sample:?}");
    }
    assert_eq!(
        before.alerts, sample.alerts,
        "no alert while oscillating and staying inside the margin"
    );

    filler.set_free(12 * MIB);
    let above = Instant::now();
    let back = next_alert(&mut alerts, &tmpfs.path).await;
    assert_eq!(states(&back), (Critical, Warning));
    assert!(
        above.elapsed() >= Duration::from_secs(2),
        "improving waits for the transition time"
    );
    filler.set_free(40 * MIB);
    let ok = next_alert(&mut alerts, &tmpfs.path).await;
    assert_eq!(states(&ok), (Warning, Fine));

    // The same four transitions on WatchEvents, in order.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("event")
            .expect("open")
            .expect("event");
        if let Some(proto::event::Kind::DiskAlert(alert)) = event.kind
            && Path::new(&alert.mount_point) == tmpfs.path
        {
            seen.push(states(&alert));
        }
    }
    assert_eq!(
        seen,
        [
            (Fine, Warning),
            (Warning, Critical),
            (Critical, Warning),
            (Warning, Fine)
        ]
    );
    let log = agent.log();
    assert!(log.contains("disk alert"), "alerts are logged");
    println!("crossing-to-alert latency at interval_ms = 1000: {latencies:?}");
    for latency in latencies {
        assert!(latency < Duration::from_secs(10), "{latency:?}");
    }
    filler.empty();
}

#[tokio::test]
async fn a_hung_fuse_mount_is_unresponsive_and_does_not_stall_the_others() {
    use proto::DiskState::{Ok as Fine, Unresponsive, Warning};
    let tmpfs = Tmpfs::new(64);
    let hung = HangingFuse::new();
    let filler = Filler::new(&tmpfs.path);
    let mut agent = Agent::builder()
        .config(&disk_config(
            500,
            &[&tmpfs.path, &hung.path],
            "sample_timeout_ms = 1000",
        ))
        .start();
    let mut disk = disk_client(&agent).await;
    let fs = wait_for_fs(&mut disk, &hung.path, "hung mount unresponsive", |f| {
        f.state() == Unresponsive
    })
    .await;
    assert!(
        fs.error.contains("no answer within 1000 ms"),
        "{}",
        fs.error
    );
    wait_for_fs(&mut disk, &tmpfs.path, "tmpfs ok", |f| f.state() == Fine).await;

    let mut alerts = disk
        .watch_disk_alerts(proto::WatchDiskAlertsRequest {})
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(
        states(&next_alert(&mut alerts, &hung.path).await),
        (Unresponsive, Unresponsive)
    );
    filler.set_free(12 * MIB);
    let crossed = Instant::now();
    let alert = next_alert(&mut alerts, &tmpfs.path).await;
    assert_eq!(states(&alert), (Fine, Warning));
    println!(
        "latency with a hung mount beside it: {:?}",
        crossed.elapsed()
    );
    let (_, condition) = disk_condition(&agent).await;
    assert_eq!(condition.state(), proto::ConditionState::Degraded);
    assert!(
        condition.message.contains("does not answer"),
        "{}",
        condition.message
    );
    // A blocked statvfs must not keep the agent from stopping: every task
    // ends before the grace period does.
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let exit = agent
        .exited(Duration::from_secs(15))
        .await
        .expect("stops although a probe is blocked");
    assert!(exit.success(), "{exit:?}; log:\n{}", agent.log());
    assert_stopped_within_the_grace(&agent);
    filler.empty();
}

#[tokio::test]
async fn the_agent_survives_a_full_state_filesystem() {
    use proto::DiskState::{Critical, Ok as Fine};
    let ext4 = LoopExt4::new(64);
    let state_dir = ext4.path.join("state");
    let filler = Filler::new(&ext4.path);
    let reserve = state_dir.join("disk-reserve");
    let config = disk_config(500, &[], &format!("reserve_bytes = {}", 4 * MIB));
    let agent = Agent::builder()
        .config(&config)
        .state_dir(&state_dir)
        .start();
    let mut disk = disk_client(&agent).await;
    let mut status_client = AgentServiceClient::new(agent.channel().await);
    wait_for_fs(&mut disk, &ext4.path, "state fs ok", |f| {
        f.state() == Fine && f.guards_admission
    })
    .await;
    eventually("reserve file allocated", || {
        std::fs::metadata(&reserve).is_ok_and(|m| m.len() == 4 * MIB && m.blocks() * 512 >= 4 * MIB)
    })
    .await;
    add_path(&mut disk, "/before-full")
        .await
        .expect("write with space");

    // Critical: jobs are held, the reserve is given back.
    filler.set_free(6 * MIB);
    wait_for_fs(&mut disk, &ext4.path, "state fs critical", |f| {
        f.state() == Critical
    })
    .await;
    eventually("reserve released", || !reserve.exists()).await;
    let held = disk_condition(&agent)
        .await
        .0
        .slots
        .expect("slots")
        .held_reason;
    assert!(held.contains("state dir"), "{held}");

    // 100 % full: reads and streams answer, writes fail clearly.
    filler.fill_completely();
    let status = status_client
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("GetStatus answers on a full disk")
        .into_inner();
    assert!(status.last_event_sequence > 0);
    let mut events = status_client
        .watch_events(proto::WatchEventsRequest { since: Some(0) })
        .await
        .expect("WatchEvents answers on a full disk")
        .into_inner();
    assert!(events.next().await.expect("an event").is_ok());
    let usage = wait_for_fs(&mut disk, &ext4.path, "full", |f| f.free_bytes == 0).await;
    assert_eq!(usage.state(), Critical);
    let error = add_path(&mut disk, "/during-full")
        .await
        .expect_err("no space to write");
    assert_eq!(error.code(), tonic::Code::ResourceExhausted, "{error:?}");
    assert!(
        error.message().contains("state filesystem is full"),
        "{}",
        error.message()
    );

    // Space returns: writes work again in the same process, the hold is
    // released and the reserve comes back.
    filler.empty();
    add_path(&mut disk, "/after-full")
        .await
        .expect("writes work again once space returns");
    wait_for_fs(&mut disk, &ext4.path, "state fs ok again", |f| {
        f.state() == Fine
    })
    .await;
    let held = disk_condition(&agent)
        .await
        .0
        .slots
        .expect("slots")
        .held_reason;
    assert_eq!(held, "", "jobs may start again");
    eventually("reserve recreated", || reserve.exists()).await;

    // Full again: a clean stop still succeeds.
    filler.fill_completely();
    let mut agent = agent;
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let exit = agent
        .exited(Duration::from_secs(15))
        .await
        .expect("stops on a full disk");
    assert!(exit.success(), "{exit:?}; log:\n{}", agent.log());
    assert_stopped_within_the_grace(&agent);
    filler.empty();

    // The store is intact: a new agent opens it and has exactly what was
    // written successfully.
    let agent = Agent::builder()
        .config(&config)
        .state_dir(&state_dir)
        .start();
    let mut disk = disk_client(&agent).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let usage = disk
            .get_disk_usage(proto::GetDiskUsageRequest {})
            .await
            .expect("usage")
            .into_inner();
        let skipped: Vec<&str> = usage.skipped.iter().map(|s| s.path.as_str()).collect();
        if skipped.contains(&"/before-full") && skipped.contains(&"/after-full") {
            assert!(!skipped.contains(&"/during-full"), "{skipped:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{skipped:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agent's last stop ended with every task done, not cut short when
/// its grace period ran out.
fn assert_stopped_within_the_grace(agent: &Agent) {
    let log = agent.log();
    assert!(
        log.contains("INFO instance_agent::daemon: stopped"),
        "{log}"
    );
    assert!(!log.contains("grace period over"), "{log}");
}

/// GetStatus and its disk condition.
async fn disk_condition(agent: &Agent) -> (proto::GetStatusResponse, proto::Condition) {
    let status = AgentServiceClient::new(agent.channel().await)
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("GetStatus answers")
        .into_inner();
    let condition = status
        .conditions
        .iter()
        .find(|c| c.r#type == "disk")
        .cloned()
        .expect("disk condition");
    (status, condition)
}

async fn add_path(disk: &mut DiskServiceClient<Channel>, path: &str) -> Result<(), tonic::Status> {
    disk.add_watched_path(proto::AddWatchedPathRequest {
        path: path.into(),
        reason: "test".into(),
    })
    .await
    .map(|_| ())
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "not within 30 s: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn reclaim_space_reports_steps_and_skips_docker_for_another_filesystem() {
    let (tmpfs, filler, _agent, mut disk) = agent_on_tmpfs(200).await;
    filler.set_free(5 * MIB);
    wait_for_fs(&mut disk, &tmpfs.path, "critical", |f| {
        f.state() == proto::DiskState::Critical
    })
    .await;
    let report = disk
        .reclaim_space(proto::ReclaimSpaceRequest {
            dry_run: false,
            path: tmpfs.path.display().to_string(),
            all_steps: false,
        })
        .await
        .expect("reclaim")
        .into_inner();
    let names: Vec<&str> = report.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "exited_containers",
            "dangling_images",
            "expired_job_logs",
            "mount_caches"
        ]
    );
    for step in &report.steps {
        assert!(!step.ran, "{step:?}");
        assert!(
            step.skipped_reason.contains("not short of space"),
            "{step:?}"
        );
    }
    let dry = reclaim_everything(&mut disk, true).await;
    assert!(dry.dry_run);
    assert!(
        dry.steps.iter().all(|s| s.ran && s.error.is_empty()),
        "{dry:?}"
    );
    let bad = disk
        .reclaim_space(proto::ReclaimSpaceRequest {
            dry_run: true,
            path: "relative/path".into(),
            all_steps: false,
        })
        .await
        .expect_err("relative path");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    filler.empty();
}

#[test]
fn cli_disk_table_json_top_and_watched_paths() {
    let tmpfs = Tmpfs::new(64);
    for (dir, mib) in [("datasets/big", 6), ("datasets/small", 1), ("logs", 2)] {
        let dir = tmpfs.path.join(dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("data"), vec![7u8; (mib * MIB) as usize]).expect("write");
    }
    let absent = tmpfs.path.join("not-there-yet");
    // Its own levels for the tmpfs, through a path on it.
    let overrides = format!(
        "[disk.overrides.{:?}]\ncritical_free_bytes = {}\nwarning_free_bytes = {}\n",
        tmpfs.path.join("datasets"),
        4 * MIB,
        5 * MIB
    );
    let agent = Agent::builder()
        .config(&disk_config(200, &[&tmpfs.path, &absent], &overrides))
        .start();
    let mount = tmpfs.path.display().to_string();
    let skipped = format!("skipped {}", absent.display());
    let deadline = Instant::now() + Duration::from_secs(20);
    // Paths are probed concurrently: wait until the tmpfs and the absent
    // path have both had their first probe.
    let table = loop {
        let out = cli(&agent.socket, &["disk"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.contains(&mount) && stdout.contains(&skipped) {
            assert!(out.status.success(), "{stdout}");
            break stdout;
        }
        assert!(Instant::now() < deadline, "{stdout}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(table.starts_with("MOUNTED ON"), "{table}");
    assert!(table.contains("tmpfs"), "{table}");
    let tmpfs_row = table
        .lines()
        .find(|l| l.starts_with(&mount))
        .expect("tmpfs row");
    assert!(
        tmpfs_row.contains("4.0 MiB  5.0 MiB"),
        "override: {tmpfs_row}"
    );
    assert!(tmpfs_row.contains("disk.overrides"), "{tmpfs_row}");
    let root_row = table.lines().find(|l| l.starts_with("/*")).expect("/ row");
    assert!(root_row.contains("8.0 MiB  16.0 MiB"), "{root_row}");
    assert!(table.contains("(root filesystem"), "{table}");
    assert!(table.contains("state dir"), "{table}");

    let out = cli(&agent.socket, &["disk", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let filesystems = json["filesystems"].as_array().expect("filesystems");
    assert!(
        filesystems.iter().any(|f| f["mountPoint"] == mount),
        "{json}"
    );

    let out = cli(&agent.socket, &["disk", "--top", &mount, "--limit", "3"]);
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{top}");
    let lines: Vec<&str> = top.lines().collect();
    assert!(lines[0].starts_with("SIZE"), "{top}");
    assert!(
        lines[1].ends_with(&mount),
        "the start is the largest: {top}"
    );
    assert!(lines[2].ends_with("datasets"), "{top}");
    assert!(lines[3].ends_with("datasets/big"), "{top}");
    assert!(top.contains("entries below"), "{top}");

    let out = cli(&agent.socket, &["disk", "--top", &mount, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["path"], mount.as_str());
    let missing = cli(
        &agent.socket,
        &["disk", "--top", "/nonexistent-instance-agent"],
    );
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("No such file"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    let extra = tmpfs.path.join("logs").display().to_string();
    let out = cli(
        &agent.socket,
        &["disk", "--add", &extra, "--reason", "job logs"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = cli(&agent.socket, &["disk"]);
        if String::from_utf8_lossy(&out.stdout).contains("added by operator: job logs") {
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        cli(&agent.socket, &["disk", "--remove", &extra])
            .status
            .success()
    );
    assert!(
        !cli(&agent.socket, &["disk", "--remove", &extra])
            .status
            .success()
    );

    let out = cli(
        &agent.socket,
        &["disk", "--reclaim", "--dry-run", "--all-steps"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("exited_containers"), "{stdout}");
    assert!(stdout.contains("total would free"), "{stdout}");
}

/// Containers the test creates, removed on drop.
struct TestContainers {
    instance: String,
}

impl TestContainers {
    fn new() -> Self {
        Self {
            instance: format!("disk-test-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// Runs a container of `instance` for `job` to completion.
    fn exited(&self, instance: &str, job: Option<&str>) -> String {
        let mut args = vec![
            "--label".to_owned(),
            format!("io.instance-agent.instance={instance}"),
            "--label".into(),
            format!("io.instance-agent.test-owner={}", self.instance),
        ];
        if let Some(job) = job {
            args.extend(["--label".into(), format!("io.instance-agent.job={job}")]);
        }
        args.extend([
            "instance-agent/busybox:test".into(),
            "sh".into(),
            "-c".into(),
            "echo data > /written".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = Command::new("docker")
            .args(["container", "create"])
            .args(&args)
            .output()
            .expect("docker create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        run("docker", &["start", "-a", &id]);
        id
    }

    fn exists(&self, id: &str) -> bool {
        Command::new("docker")
            .args(["inspect", id])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for TestContainers {
    fn drop(&mut self) {
        let ids = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=io.instance-agent.test-owner={}", self.instance),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
}

#[tokio::test]
async fn reclaim_removes_real_exited_containers_of_finished_jobs_only() {
    use instance_agent::disk::docker::{DockerSpace, ExitedContainers};
    use instance_agent::disk::reclaim::ReclaimStep;
    use instance_agent::jobs::engine::DockerEngine;

    let containers = TestContainers::new();
    let me = containers.instance.clone();
    let other = format!("{me}-other");
    let done = containers.exited(&me, Some("job-done"));
    let still_running_job = containers.exited(&me, Some("job-running"));
    let unlabelled = containers.exited(&me, None);
    let not_mine = containers.exited(&other, Some("job-done"));

    let engine = Arc::new(DockerEngine::new(
        Path::new("/var/run/docker.sock"),
        Duration::from_secs(30),
    ));
    let root = engine.data_root().await.expect("data root");
    assert!(root.is_absolute(), "{}", root.display());
    let listed = engine.exited_containers(&me).await.expect("list");
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(
        listed.iter().any(|c| c.id == done && c.size_bytes > 0),
        "{listed:?}"
    );

    let step = ExitedContainers::new(engine.clone(), &me, Arc::new(|job: &str| job == "job-done"));
    let estimate = step.estimate().await.expect("estimate");
    assert_eq!(estimate.items, 1);
    assert!(containers.exists(&done), "an estimate deletes nothing");
    let freed = step.run().await.expect("run");
    assert_eq!(freed.items, 1);
    assert!(freed.bytes > 0);
    assert!(
        !containers.exists(&done),
        "finished job's container removed"
    );
    for kept in [&still_running_job, &unlabelled, &not_mine] {
        assert!(containers.exists(kept), "{kept} must stay");
    }
}

#[tokio::test]
async fn dangling_images_are_estimated_and_pruned() {
    use instance_agent::disk::docker::{DanglingImages, DockerSpace};
    use instance_agent::disk::reclaim::ReclaimStep;
    use instance_agent::jobs::engine::DockerEngine;

    // Importing twice under one tag leaves the first image untagged.
    let tag = format!(
        "instance-agent/disk-test-dangling:{}",
        uuid::Uuid::new_v4().simple()
    );
    let import = |content: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("file"), content).expect("write");
        let tar = dir.path().join("layer.tar");
        run(
            "tar",
            &[
                "-cf",
                tar.to_str().unwrap(),
                "-C",
                dir.path().to_str().unwrap(),
                "file",
            ],
        );
        run("docker", &["import", tar.to_str().unwrap(), &tag])
            .trim()
            .to_owned()
    };
    let first = import("one");
    let _second = import("two");
    struct RemoveTag(String);
    impl Drop for RemoveTag {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
        }
    }
    let _cleanup = RemoveTag(tag.clone());

    let engine = Arc::new(DockerEngine::new(
        Path::new("/var/run/docker.sock"),
        Duration::from_secs(30),
    ));
    let dangling = engine.dangling_images().await.expect("list");
    assert!(dangling.iter().any(|i| i.id == first), "{dangling:?}");
    let step = DanglingImages::new(engine.clone());
    assert!(step.estimate().await.expect("estimate").items >= 1);
    let freed = step.run().await.expect("prune");
    assert!(freed.items >= 1, "{freed:?}");
    let left = engine.dangling_images().await.expect("list");
    assert!(!left.iter().any(|i| i.id == first), "{left:?}");
}

#[test]
fn a_critical_filesystem_shows_in_systemds_status_line() {
    let tmpfs = Tmpfs::new(64);
    let filler = Filler::new(&tmpfs.path);
    let dir = tempfile::tempdir().expect("tempdir");
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let _agent = Agent::builder()
        .config(&format!(
            "[agent]\nstatus_interval_seconds = 1\n{}",
            disk_config(200, &[&tmpfs.path], "")
        ))
        .env("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8 path"))
        .start();
    filler.set_free(5 * MIB);
    let wanted = format!(
        "{} has 5.0 MiB free, below the 8.0 MiB floor",
        tmpfs.path.display()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    loop {
        assert!(Instant::now() < deadline, "no STATUS= naming {wanted}");
        let Ok(n) = notify.recv(&mut buf) else {
            continue;
        };
        let message = String::from_utf8_lossy(&buf[..n]);
        if let Some(status) = message.lines().find_map(|l| l.strip_prefix("STATUS="))
            && status.contains("disk failed")
            && status.contains(&wanted)
        {
            break;
        }
    }
    filler.empty();
}

#[tokio::test]
async fn a_critical_state_filesystem_holds_real_queued_jobs_and_releases_them() {
    use instance_agent::api::proto::job_service_client::JobServiceClient;
    let tmpfs = Tmpfs::new(64);
    let state_dir = tmpfs.path.join("state");
    let filler = Filler::new(&tmpfs.path);
    let config = format!(
        "{}[jobs]\nslots = 2\n",
        // Named in `disk.paths`, the tmpfs keeps the small byte levels
        // (unnamed, a memory-backed filesystem gets levels relative to its size).
        disk_config(250, &[&tmpfs.path], &format!("reserve_bytes = {}", MIB))
    );
    let agent = Agent::builder()
        .config(&config)
        .state_dir(&state_dir)
        .start();
    let mut disk = disk_client(&agent).await;
    let mut jobs = JobServiceClient::new(agent.channel().await);
    let mut status_client = AgentServiceClient::new(agent.channel().await);

    // A running job goes on; queued jobs are held while the state fs is critical.
    let job = |id: &str, command: &[&str]| proto::SubmitJobRequest {
        spec: Some(proto::JobSpec {
            id: id.into(),
            image: "instance-agent/busybox:test".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
    };
    jobs.submit_job(job("running", &["sleep", "3"]))
        .await
        .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(30);
    while jobs
        .get_job(proto::GetJobRequest {
            id: "running".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .state()
        != proto::JobState::Running
    {
        assert!(Instant::now() < deadline, "the first job never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    filler.set_free(5 * MIB);
    wait_for_fs(&mut disk, &tmpfs.path, "state fs critical", |f| {
        f.state() == proto::DiskState::Critical
    })
    .await;
    // The hold is in force, and says why, before anything is submitted.
    let hold = format!("disk: {} (state dir) has ", tmpfs.path.display());
    let deadline = Instant::now() + Duration::from_secs(30);
    let held_reason = loop {
        let slots = status_client
            .get_status(proto::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .slots
            .expect("slots");
        if slots.held_reason.starts_with(&hold) {
            break slots.held_reason;
        }
        assert!(Instant::now() < deadline, "no disk hold: {slots:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        held_reason.ends_with("free, below the 8.0 MiB floor"),
        "{held_reason}"
    );
    let mut events = EventLog::from_now(&agent).await;
    for id in ["held-1", "held-2"] {
        jobs.submit_job(job(id, &["true"]))
            .await
            .expect("submit while critical");
    }
    for id in ["held-1", "held-2"] {
        let held = jobs
            .get_job(proto::GetJobRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(held.state(), proto::JobState::Queued, "{held:?}");
        assert!(
            held.reason.starts_with(&format!("held: {hold}")),
            "{held:?}"
        );
    }
    let running = jobs
        .get_job(proto::GetJobRequest {
            id: "running".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(
            running.state(),
            proto::JobState::Running | proto::JobState::Succeeded
        ),
        "a running job goes on: {running:?}"
    );

    // Space returns: after the transition time (2 s, during which the
    // hold stays) the filesystem leaves critical, and only then do the held
    // jobs start, by themselves.
    filler.set_free(40 * MIB);
    let released = events
        .until(
            "the state fs leaving critical",
            Duration::from_secs(60),
            |e| {
                events::disk_alert(e).is_some_and(|a| {
                    Path::new(&a.mount_point) == tmpfs.path
                        && a.old_state() == proto::DiskState::Critical
                })
            },
        )
        .await;
    assert_eq!(
        events.job_states(|id| id.starts_with("held-")),
        [
            ("held-1".to_owned(), proto::JobState::Queued),
            ("held-2".to_owned(), proto::JobState::Queued)
        ],
        "only queued while critical:\n{}",
        events.summary()
    );
    let succeeded = |seen: &[proto::Event]| {
        ["held-1", "held-2"].iter().all(|id| {
            seen.iter()
                .any(|e| events::job_in(e, id, proto::JobState::Succeeded))
        })
    };
    events
        .until_seen(
            "both held jobs succeeding",
            Duration::from_secs(60),
            succeeded,
        )
        .await;
    let released_at = time_of(events::disk_alert(&released).and_then(|a| a.time.as_ref()));
    for starting in events
        .seen()
        .iter()
        .filter_map(events::job)
        .filter(|j| j.id.starts_with("held-") && j.state() == proto::JobState::Starting)
    {
        assert!(
            time_of(starting.starting_at.as_ref()) >= released_at,
            "{starting:?} chosen before the alert of {released:?}"
        );
    }
}

#[tokio::test]
async fn reclaim_space_through_the_agent_removes_a_finished_jobs_container() {
    use instance_agent::api::proto::job_service_client::JobServiceClient;
    let instance = format!("disk-reclaim-{}", common::uuid_like());
    // Kept containers stay after their job ends: the reclaim step's work.
    let agent = Agent::builder()
        .instance_id(&instance)
        .config("[jobs]\nkeep_containers = true\n")
        .start();
    let mut jobs = JobServiceClient::new(agent.channel().await);
    let mut disk = disk_client(&agent).await;
    jobs.submit_job(proto::SubmitJobRequest {
        spec: Some(proto::JobSpec {
            id: "finished".into(),
            image: "instance-agent/busybox:test".into(),
            // Writes into its container layer: the bytes the reclaim frees.
            command: ["sh", "-c", "head -c 1000000 /dev/zero > /blob"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        }),
    })
    .await
    .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = jobs
            .get_job(proto::GetJobRequest {
                id: "finished".into(),
            })
            .await
            .expect("get")
            .into_inner();
        if job.state() == proto::JobState::Succeeded {
            break;
        }
        assert!(Instant::now() < deadline, "job never succeeded: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(common::containers(&instance, true).len(), 1, "kept");

    let dry = reclaim_everything(&mut disk, true).await;
    let step = |r: &proto::ReclaimSpaceResponse| {
        r.steps
            .iter()
            .find(|s| s.name == "exited_containers")
            .cloned()
            .expect("exited_containers step")
    };
    assert_eq!(step(&dry).items, 1, "{dry:?}");
    assert_eq!(
        common::containers(&instance, true).len(),
        1,
        "a dry run deletes nothing"
    );

    let report = reclaim_everything(&mut disk, false).await;
    let removed = step(&report);
    assert!(removed.ran && removed.error.is_empty(), "{report:?}");
    assert_eq!(removed.items, 1, "{report:?}");
    assert!(removed.bytes > 0, "{report:?}");
    assert!(
        common::containers(&instance, true).is_empty(),
        "the finished job's container is gone"
    );
}

/// `ReclaimSpace` of every step for every watched filesystem.
async fn reclaim_everything(
    disk: &mut DiskServiceClient<Channel>,
    dry_run: bool,
) -> proto::ReclaimSpaceResponse {
    disk.reclaim_space(proto::ReclaimSpaceRequest {
        dry_run,
        path: String::new(),
        all_steps: true,
    })
    .await
    .expect("ReclaimSpace")
    .into_inner()
}

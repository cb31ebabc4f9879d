//! Black-box tests that nothing a caller sends can wedge the agent (issue
//! 13, "Blocking pool" and "Reclaim queue"; issue 14.3): a FUSE filesystem
//! whose server reads every request and answers none (`hung-fuse`, so that
//! a thread waiting on it is beyond SIGKILL), flooded with dry-run reclaims,
//! `disk --top` walks and a watched path, against the real binary; and a
//! small tmpfs state dir, which gets levels relative to its size instead of
//! the OS disk's 5 GiB floor (issue 14.4); and the watchdog, which keeps
//! pinging through a flood of job binds into the hung filesystem and stops
//! while the store's filesystem is frozen. Every mount is removed on drop,
//! also when a test fails.
#![cfg(feature = "test-util")]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::events::EventLog;
use common::fs::{Filler, MIB, Tmpfs};
use common::{Agent, wait_for_fs};
use instance_agent::api::proto::{
    self, agent_service_client::AgentServiceClient, disk_service_client::DiskServiceClient,
    job_service_client::JobServiceClient, mount_service_client::MountServiceClient,
};
use nix::mount::MntFlags;
use tonic::Code;
use tonic::transport::Channel;

/// What the agent must still answer within, whatever the flood.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// A mount of `hung-fuse`. On drop its server is killed first (every call
/// waiting on it then returns ENOTCONN), then the mount is lazily detached.
struct HungFuse {
    _dir: tempfile::TempDir,
    path: PathBuf,
    server: Child,
}

impl HungFuse {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hung");
        std::fs::create_dir(&path).expect("mount point");
        let server = Command::new(env!("CARGO_BIN_EXE_hung-fuse"))
            .arg(&path)
            .stdin(Stdio::null())
            .spawn()
            .expect("start hung-fuse");
        let mut hung = Self {
            _dir: dir,
            path,
            server,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // From the mount table: a stat would wait for the server forever.
        while !common::fuse_site::mounts_below(&hung.path).contains(&hung.path) {
            if let Ok(Some(status)) = hung.server.try_wait() {
                panic!("hung-fuse exited with {status}");
            }
            assert!(Instant::now() < deadline, "hung-fuse never mounted");
            std::thread::sleep(Duration::from_millis(20));
        }
        hung
    }
}

impl Drop for HungFuse {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH);
    }
}

/// The resident set of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS");
    kib << 10
}

/// Processes whose parent is `pid` (the probe helpers, stuck or not).
fn children(pid: u32) -> usize {
    let parent = pid.to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        // The fields after the command (which may hold spaces): state, ppid.
        .filter_map(|stat| stat.rsplit_once(") ").map(|(_, rest)| rest.to_owned()))
        .filter(|rest| rest.split(' ').nth(1) == Some(parent.as_str()))
        .count()
}

/// Runs `call`, which must answer (Ok) within [`ANSWER_WITHIN`]; prints how
/// long it took.
async fn answers<T, F>(what: &str, call: F) -> T
where
    F: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let started = Instant::now();
    let outcome = tokio::time::timeout(ANSWER_WITHIN, call).await;
    println!("{what}: answered in {:?}", started.elapsed());
    match outcome {
        Ok(Ok(answer)) => answer,
        Ok(Err(status)) => panic!("{what}: {status:?}"),
        Err(_) => panic!("{what}: no answer within {ANSWER_WITHIN:?}"),
    }
}

/// One dry-run reclaim of `path`: its code and how long it took.
async fn dry_run(channel: Channel, path: PathBuf) -> (Code, Duration) {
    let started = Instant::now();
    let outcome = DiskServiceClient::new(channel)
        .reclaim_space(proto::ReclaimSpaceRequest {
            dry_run: true,
            path: path.display().to_string(),
            all_steps: true,
            unknown_containers: false,
        })
        .await;
    let code = outcome.map_or_else(|s| s.code(), |_| Code::Ok);
    (code, started.elapsed())
}

/// One `disk --top` walk of `path` to its end: its code and how long it took.
async fn top(channel: Channel, path: PathBuf) -> (Code, Duration) {
    let started = Instant::now();
    let outcome = async {
        let mut stream = DiskServiceClient::new(channel)
            .top_directories(proto::TopDirectoriesRequest {
                path: path.display().to_string(),
                timeout_seconds: 1,
                ..Default::default()
            })
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok::<(), tonic::Status>(())
    }
    .await;
    let code = outcome.map_or_else(|s| s.code(), |()| Code::Ok);
    (code, started.elapsed())
}

fn tally(answers: &[(Code, Duration)]) -> (Vec<(Code, usize)>, Duration) {
    let mut counts: Vec<(Code, usize)> = Vec::new();
    for (code, _) in answers {
        match counts.iter_mut().find(|(c, _)| c == code) {
            Some((_, n)) => *n += 1,
            None => counts.push((*code, 1)),
        }
    }
    let slowest = answers.iter().map(|(_, d)| *d).max().unwrap_or_default();
    (counts, slowest)
}

/// `GetStatus` answers within 2 s on `channel` and on a new connection (peer
/// identification).
async fn still_answers(agent: &Agent, channel: &Channel) {
    answers(
        "GetStatus",
        AgentServiceClient::new(channel.clone()).get_status(proto::GetStatusRequest {}),
    )
    .await;
    let fresh = tokio::time::timeout(ANSWER_WITHIN, agent.channel())
        .await
        .expect("a new connection within 2 s");
    answers(
        "GetStatus on a new connection",
        AgentServiceClient::new(fresh).get_status(proto::GetStatusRequest {}),
    )
    .await;
}

#[tokio::test]
async fn a_flood_into_a_hung_filesystem_leaves_the_agent_answering_and_stoppable() {
    let mut agent = Agent::builder()
        .config("[disk]\ninterval_ms = 500\nsample_timeout_ms = 1000\n")
        .start();
    // Declared after the agent, so dropped before it, also when the test
    // fails: an agent thread stuck in it would hold the agent's reaping.
    let hung = HungFuse::new();
    let pid = agent.child.id();
    let rss_before = rss(pid);
    let channel = agent.channel().await;
    let target = hung.path.join("x");

    // A watched path into it, probed by the guard at every tick.
    DiskServiceClient::new(channel.clone())
        .add_watched_path(proto::AddWatchedPathRequest {
            path: hung.path.display().to_string(),
            reason: "a hung filesystem".into(),
        })
        .await
        .expect("AddWatchedPath");

    // 100 dry-run reclaims in waves of 20 (each wave within the streams a
    // peer may have open), and 5 walks.
    let flood_started = Instant::now();
    let mut reclaims = Vec::new();
    for _ in 0..5 {
        let wave: Vec<_> = (0..20)
            .map(|_| tokio::spawn(dry_run(channel.clone(), target.clone())))
            .collect();
        for answer in wave {
            reclaims.push(answer.await.expect("reclaim task"));
        }
    }
    let walks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(top(channel.clone(), hung.path.clone())))
        .collect();
    let mut tops = Vec::new();
    for walk in walks {
        tops.push(walk.await.expect("walk task"));
    }
    let (reclaim_codes, slowest_reclaim) = tally(&reclaims);
    let (top_codes, slowest_top) = tally(&tops);
    println!(
        "100 dry-run reclaims into the hung filesystem: {reclaim_codes:?}, slowest {slowest_reclaim:?}; \
         5 walks: {top_codes:?}, slowest {slowest_top:?}; flood took {:?}; helpers alive: {}",
        flood_started.elapsed(),
        children(pid)
    );
    // The agent still answers: on the connection it has, on a new one
    // (peer identification), and with a store write (SubmitJob).
    still_answers(&agent, &channel).await;
    let job = answers(
        "SubmitJob",
        JobServiceClient::new(channel.clone()).submit_job(proto::SubmitJobRequest {
            spec: Some(proto::JobSpec {
                id: "after-the-flood".into(),
                image: "instance-agent/busybox:test".into(),
                command: vec!["true".into()],
                ..Default::default()
            }),
        }),
    )
    .await
    .into_inner();
    assert_eq!(job.id, "after-the-flood");
    assert_eq!(reclaims.len(), 100);
    for (code, _) in reclaims.iter().chain(&tops) {
        assert!(
            matches!(
                code,
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
            ),
            "a probe of a hung filesystem answered {code:?}"
        );
    }
    // After the first probe overran, the filesystem is answered at once.
    let unresponsive = reclaim_codes
        .iter()
        .find(|(c, _)| *c == Code::Unavailable)
        .map_or(0, |(_, n)| *n);
    assert!(unresponsive >= 90, "{reclaim_codes:?}");

    let rss_after = rss(pid);
    println!(
        "agent RSS: {} MiB before, {} MiB after",
        rss_before / MIB,
        rss_after / MIB
    );
    assert!(rss_after < 64 * MIB, "RSS {rss_after} bytes");

    // No thread of the agent is stuck in the hung filesystem: it stops
    // within its grace, and a restarted agent serves.
    drop(channel);
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let stopped = Instant::now();
    let exit = agent
        .exited(Duration::from_secs(15))
        .await
        .expect("the agent exits although its helpers are stuck");
    println!("stopped in {:?} after SIGTERM", stopped.elapsed());
    assert!(exit.success(), "{exit:?}; log:\n{}", agent.log());
    agent.respawn();
    answers(
        "GetStatus after a restart",
        AgentServiceClient::new(agent.channel().await).get_status(proto::GetStatusRequest {}),
    )
    .await;
}

#[tokio::test]
async fn the_automatic_reclaim_never_waits_behind_a_flood_of_dry_runs() {
    let tmpfs = Tmpfs::new(64);
    let filler = Filler::new(&tmpfs.path);
    let agent = Agent::builder()
        .config(&format!(
            "[disk]\ninterval_ms = 250\nsample_timeout_ms = 1000\ncritical_free_bytes = {}\n\
             warning_free_bytes = {}\nclear_margin_bytes = {}\ntransition_seconds = 1\n\
             auto_reclaim = true\npaths = [{:?}]\n",
            8 * MIB,
            16 * MIB,
            2 * MIB,
            tmpfs.path
        ))
        .start();
    let hung = HungFuse::new();
    let channel = agent.channel().await;
    let mut events = EventLog::from_now(&agent).await;
    // 100 callers' dry runs at once, into the hung filesystem; once the
    // first has answered the others have all been taken in.
    let flood: Vec<_> = (0..100)
        .map(|_| tokio::spawn(dry_run(channel.clone(), hung.path.join("x"))))
        .collect();
    let mut flood = flood.into_iter();
    let first = flood
        .next()
        .expect("a dry run")
        .await
        .expect("dry run task");
    println!("first dry run: {first:?}");
    filler.set_free(5 * MIB);
    let crossed = Instant::now();
    let event = events
        .until("an automatic reclaim", Duration::from_secs(10), |e| {
            matches!(&e.kind, Some(proto::event::Kind::Reclaim(r)) if r.trigger() == proto::ReclaimTrigger::Automatic)
        })
        .await;
    println!(
        "automatic reclaim published {:?} after the tmpfs turned critical, 100 dry runs beside it",
        crossed.elapsed()
    );
    let Some(proto::event::Kind::Reclaim(reclaim)) = event.kind else {
        unreachable!("matched above");
    };
    assert!(
        reclaim.targets.iter().any(|t| Path::new(t) == tmpfs.path),
        "{reclaim:?}"
    );
    let mut answered = 1;
    for dry_run in flood {
        let (code, _) = dry_run.await.expect("dry run task");
        assert_ne!(code, Code::Ok, "a dry run into a hung filesystem");
        answered += 1;
    }
    assert_eq!(answered, 100);
    filler.empty();
}

/// Reads notifications from `notify` until `until` holds for what was read,
/// for at most `within`; returns what was read.
fn notifications(notify: &UnixDatagram, within: Duration, until: impl Fn(&str) -> bool) -> String {
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    while !until(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        notify.set_read_timeout(Some(left)).expect("timeout");
        if let Ok(n) = notify.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    seen
}

/// A 2 s watchdog (a ping every second, each after its proof of progress)
/// for an agent started by `builder`, and the socket its pings arrive on.
fn watched(builder: common::AgentBuilder, dir: &Path) -> (Agent, UnixDatagram) {
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    let agent = builder
        .env("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8 path"))
        .env("WATCHDOG_USEC", "2000000")
        .start();
    let seen = notifications(&notify, Duration::from_secs(10), |s| {
        s.matches("WATCHDOG=1").count() >= 2
    });
    assert!(seen.matches("WATCHDOG=1").count() >= 2, "{seen}");
    (agent, notify)
}

#[tokio::test]
async fn paths_into_a_hung_filesystem_leave_the_agent_answering_and_the_watchdog_pinging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let roots = std::env::temp_dir().canonicalize().expect("temp dir");
    let cache = dir.path().canonicalize().expect("dir").join("cache");
    let (agent, notify) = watched(
        Agent::builder().config(&format!(
            "[jobs]\nallowed_host_roots = [{roots:?}]\n\
             [mounts]\nblobfuse2_path = \"/bin/false\"\nallowed_roots = [{roots:?}]\n\
             cache_root = {cache:?}\ndefault_owner = \"root\"\n"
        )),
        dir.path(),
    );
    let hung = HungFuse::new();
    let pid = agent.child.id();
    let rss_before = rss(pid);
    // 20 jobs binding a path in the hung filesystem: once, each took a
    // thread of the agent's blocking pool for good (it has 16).
    let channel = agent.channel().await;
    let flood_started = Instant::now();
    let submits: Vec<_> = (0..20)
        .map(|i| {
            let channel = channel.clone();
            let source = hung.path.join("data").display().to_string();
            tokio::spawn(async move {
                let mut jobs = JobServiceClient::new(channel);
                let request = proto::SubmitJobRequest {
                    spec: Some(proto::JobSpec {
                        id: format!("bind-{i}"),
                        image: "instance-agent/busybox:test".into(),
                        command: vec!["true".into()],
                        mounts: vec![proto::JobMount {
                            source: Some(proto::job_mount::Source::HostPath(source)),
                            container_path: "/data".into(),
                            read_only: true,
                        }],
                        ..Default::default()
                    }),
                };
                let asked = Instant::now();
                let answer =
                    tokio::time::timeout(Duration::from_secs(30), jobs.submit_job(request)).await;
                (answer, asked.elapsed())
            })
        })
        .collect();
    // Meanwhile the agent answers, on a new connection too, and proves its
    // progress to systemd.
    still_answers(&agent, &channel).await;
    // And 10 mounts onto a path in it.
    const KEY: &str = "d2VkZ2Uta2V5LW5ldmVyLWxvZ2dlZA==";
    common::register_secrets(&[KEY]);
    let mounts: Vec<_> = (0..10)
        .map(|i| {
            let mut client = MountServiceClient::new(channel.clone());
            let request = proto::MountRequest {
                name: format!("hung-{i}"),
                account: "myacct".into(),
                container: "data".into(),
                mount_path: hung.path.join(format!("m{i}")).display().to_string(),
                auth: Some(proto::mount_request::Auth::AccountKey(KEY.into())),
                ..Default::default()
            };
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(30), client.mount(request)).await
            })
        })
        .collect();
    for mount in mounts {
        let status = mount
            .await
            .expect("mount task")
            .expect("a Mount into a hung filesystem is answered within 30 s")
            .expect_err("a mount path in a hung filesystem is refused");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("mount_path"), "{status:?}");
    }
    let mut slowest = Duration::ZERO;
    for submit in submits {
        let (answer, took) = submit.await.expect("submit task");
        slowest = slowest.max(took);
        let status = answer
            .expect("a SubmitJob into a hung filesystem is answered within 30 s")
            .expect_err("a bind into a hung filesystem is refused");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("mounts[0].host_path")
                && status.message().contains("a hung mount?"),
            "{status:?}"
        );
    }
    let pings = notifications(&notify, Duration::from_secs(3), |s| {
        s.matches("WATCHDOG=1").count() >= 2
    });
    println!(
        "20 SubmitJob binding a hung filesystem and 10 Mount onto it: all UNAVAILABLE, slowest {slowest:?}; \
         flood took {:?}; agent RSS {} MiB before, {} MiB after",
        flood_started.elapsed(),
        rss_before / MIB,
        rss(pid) / MIB
    );
    assert!(pings.matches("WATCHDOG=1").count() >= 2, "{pings}");
    assert!(
        !agent.log().contains("not pinging systemd's watchdog"),
        "{}",
        agent.log()
    );
}

/// A filesystem frozen (`fsfreeze`): every write to it waits until it is
/// thawed, on drop at the latest.
struct Frozen(PathBuf);

impl Frozen {
    fn new(path: &Path) -> Self {
        common::fs::run(
            "fsfreeze",
            &["--freeze", path.to_str().expect("utf-8 path")],
        );
        Self(path.to_owned())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .args(["--unfreeze"])
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn the_watchdog_stops_pinging_while_the_store_is_stuck() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = common::fs::LoopExt4::new(64);
    let (agent, notify) = watched(
        Agent::builder().state_dir(&state.path.join("state")),
        dir.path(),
    );
    // Every store write now waits in the kernel, as on a hung disk.
    let frozen = Frozen::new(&state.path);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.log().contains("not pinging systemd's watchdog") {
        assert!(
            Instant::now() < deadline,
            "still pinging; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = notifications(&notify, Duration::from_millis(100), |_| false);
    let quiet = notifications(&notify, Duration::from_secs(2), |s| {
        s.contains("WATCHDOG=1")
    });
    assert!(!quiet.contains("WATCHDOG=1"), "pinged while stuck: {quiet}");
    println!("no WATCHDOG=1 for 2 s (WatchdogSec) while the store was stuck");
    drop(frozen);
    let again = notifications(&notify, Duration::from_secs(10), |s| {
        s.contains("WATCHDOG=1")
    });
    assert!(
        again.contains("WATCHDOG=1"),
        "pings again once unstuck: {again}"
    );
}

#[tokio::test]
async fn a_small_tmpfs_state_dir_gets_levels_relative_to_its_size() {
    let tmpfs = Tmpfs::new(64);
    let filler = Filler::new(&tmpfs.path);
    // The default levels (a 5 GiB floor), which a 64 MiB tmpfs is far below.
    let agent = Agent::builder()
        .config("[disk]\ninterval_ms = 250\ntransition_seconds = 1\n")
        .state_dir(&tmpfs.path.join("state"))
        .start();
    let mut disk = DiskServiceClient::new(agent.channel().await);
    let fs = wait_for_fs(&mut disk, &tmpfs.path, "sampled and ok", |f| {
        f.total_bytes > 0 && f.state() == proto::DiskState::Ok
    })
    .await;
    let levels = fs.thresholds.expect("thresholds");
    println!(
        "64 MiB tmpfs state dir: {} bytes, critical below {} and warning below {} bytes free",
        fs.total_bytes, levels.critical_free_bytes, levels.warning_free_bytes
    );
    assert_eq!(levels.critical_free_bytes, fs.total_bytes / 20, "5 %");
    assert_eq!(levels.warning_free_bytes, fs.total_bytes / 10, "10 %");
    let status = AgentServiceClient::new(agent.channel().await)
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner();
    let condition = status
        .conditions
        .iter()
        .find(|c| c.r#type == "disk")
        .expect("a disk condition");
    // The disk condition may complain of the host's own disks, never of
    // this tmpfs (an ok summary may name it as the least free), and jobs are
    // not held for it.
    let tmpfs_name = tmpfs.path.display().to_string();
    let blames_tmpfs =
        condition.state() != proto::ConditionState::Ok && condition.message.contains(&tmpfs_name);
    assert!(
        !blames_tmpfs && condition.state() != proto::ConditionState::Failed,
        "{condition:?}"
    );
    let held = status.slots.expect("slots").held_reason;
    assert!(!held.contains(&tmpfs_name), "{held}");
    // Below 5 % of its size it is critical all the same.
    filler.set_free(2 * MIB);
    wait_for_fs(&mut disk, &tmpfs.path, "critical below 5 %", |f| {
        f.state() == proto::DiskState::Critical
    })
    .await;
    filler.empty();
}

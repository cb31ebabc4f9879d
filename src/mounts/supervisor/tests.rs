//! The mount state machine against the fake mounter, with paused time:
//! mounting, health checks, stale detection, repair with backoff, adoption
//! after an agent restart, the mount timeout.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::events::{Delivery, EventPayload};
use crate::health::{ConditionState, Subsystem};
use crate::mounts::testing::{KEY, World, states, wait_for};
use crate::mounts::{MountError, MountState, ResolveError};

#[tokio::test(start_paused = true)]
async fn mount_writes_a_private_config_and_reports_mounted() {
    let w = World::new();
    let mut sub = w.agent.events.subscribe(None);
    let status = w.service.mount(w.spec("data")).await.unwrap();
    assert_eq!(status.state, MountState::Mounted);
    assert_eq!(status.auth_mode, "key");
    assert_eq!(status.cache_dir, w.base().join("cache/data"));
    assert_eq!(status.cache_max_bytes, 4 << 30);
    assert_eq!(
        states(&mut sub),
        [MountState::Mounting, MountState::Mounted]
    );
    let config = w.base().join("run/mounts/data.yaml");
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(std::fs::read_to_string(&config).unwrap().contains(KEY));
    assert!(!format!("{status:?}").contains(KEY));
    assert_eq!(
        w.agent.health.get(Subsystem::Mounts).state,
        ConditionState::Ok
    );
    assert_eq!(
        w.service.resolve("data").unwrap().host_path,
        w.base().join("mnt/data")
    );
    assert_eq!(w.service.cache_dirs()[0].path, w.base().join("cache/data"));
}

#[tokio::test(start_paused = true)]
async fn a_killed_blobfuse2_is_detected_and_repaired() {
    let w = World::new();
    let status = w.service.mount(w.spec("data")).await.unwrap();
    let mut sub = w.agent.events.subscribe(None);
    let mut waiter = w.agent.events.subscribe(None);
    let pid = status.pid.unwrap();
    // Something left in the cache must not block the remount.
    std::fs::write(w.base().join("cache/data/leftover"), "x").unwrap();
    w.fake.kill(pid);
    let killed_at = tokio::time::Instant::now();
    let stale = wait_for(&mut waiter, "data", MountState::Stale).await;
    assert!(
        stale.message.contains("killed by SIGKILL"),
        "{}",
        stale.message
    );
    wait_for(&mut waiter, "data", MountState::Mounted).await;
    assert!(killed_at.elapsed() <= Duration::from_secs(11));
    assert_eq!(
        states(&mut sub),
        [
            MountState::Stale,
            MountState::Remounting,
            MountState::Mounted
        ]
    );
    let after = w.service.status("data").unwrap();
    assert_eq!(after.remount_count, 1);
    assert_ne!(after.pid, Some(pid));
    let path = w.base().join("mnt/data");
    assert!(
        w.fake
            .calls()
            .contains(&format!("unmount -z {}", path.display()))
    );
    assert!(!w.base().join("cache/data/leftover").exists());
}

#[tokio::test(start_paused = true)]
async fn a_job_start_on_a_dead_mount_waits_and_triggers_the_repair_at_once() {
    let w = World::new();
    let status = w.service.mount(w.spec("data")).await.unwrap();
    let mut waiter = w.agent.events.subscribe(None);
    let healthy = w.service.verify("data").await.expect("healthy");
    assert_eq!(healthy.host_path, w.base().join("mnt/data"));

    w.fake.kill(status.pid.unwrap());
    // Its last health check said mounted; the check at a job's start knows
    // better, and the job waits.
    assert!(w.service.resolve("data").is_ok());
    let checked_at = tokio::time::Instant::now();
    match w.service.verify("data").await {
        Err(ResolveError::Unhealthy { state, message, .. }) => {
            assert_eq!(state, MountState::Stale);
            assert!(message.contains("not connected"), "{message}");
        }
        other => panic!("a dead mount verified: {other:?}"),
    }
    // The supervisor repairs it now, not at its next interval (10 s).
    wait_for(&mut waiter, "data", MountState::Mounted).await;
    assert!(checked_at.elapsed() < Duration::from_secs(2));
    assert_eq!(w.service.status("data").unwrap().remount_count, 1);
    assert!(w.service.verify("data").await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn failed_remounts_back_off_exponentially() {
    let w = World::new();
    let pid = w.service.mount(w.spec("data")).await.unwrap().pid.unwrap();
    for _ in 0..3 {
        w.fake
            .fail_next_spawn("Error: failed to authenticate azstorage credentials");
    }
    let mut sub = w.agent.events.subscribe(None);
    w.fake.kill(pid);
    let mut failed_at = Vec::new();
    let mut retried_at = Vec::new();
    loop {
        let Some(Delivery::Event(e)) = sub.next().await else {
            panic!("event stream ended");
        };
        let EventPayload::Mount(s) = &e.payload else {
            continue;
        };
        match s.state {
            MountState::Failed => {
                assert!(
                    s.message.contains("Error: failed to authenticate"),
                    "{}",
                    s.message
                );
                failed_at.push(tokio::time::Instant::now());
            }
            MountState::Remounting if !failed_at.is_empty() => {
                retried_at.push(tokio::time::Instant::now())
            }
            MountState::Mounted => break,
            _ => {}
        }
    }
    let gaps: Vec<u64> = failed_at
        .iter()
        .zip(&retried_at)
        .map(|(f, r)| (*r - *f).as_secs())
        .collect();
    assert_eq!(gaps, [1, 2, 4]);
    assert_eq!(w.fake.spawns(), 5);
    assert_eq!(
        w.agent.health.get(Subsystem::Mounts).state,
        ConditionState::Ok
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_mount_root_counts_as_stale() {
    let w = World::new();
    w.service.mount(w.spec("data")).await.unwrap();
    let mut sub = w.agent.events.subscribe(None);
    w.fake.set_hung(&w.base().join("mnt/data"), true);
    let stale = wait_for(&mut sub, "data", MountState::Stale).await;
    assert!(
        stale.message.contains("did not answer"),
        "{}",
        stale.message
    );
    w.fake.set_hung(&w.base().join("mnt/data"), false);
    wait_for(&mut sub, "data", MountState::Mounted).await;
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_adopts_a_healthy_mount() {
    let w = World::new();
    let pid = w.service.mount(w.spec("data")).await.unwrap().pid.unwrap();
    let w = w.restart().await;
    let mut sub = w.agent.events.subscribe(None);
    w.service.restore(&[]).await;
    let status = wait_for(&mut sub, "data", MountState::Mounted).await;
    assert_eq!(status.pid, Some(pid));
    assert!(status.message.contains("adopted"), "{}", status.message);
    assert_eq!(w.fake.spawns(), 1, "no second blobfuse2");
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_repairs_a_mount_that_died_meanwhile() {
    let w = World::new();
    let pid = w.service.mount(w.spec("data")).await.unwrap().pid.unwrap();
    let w = w.restart().await;
    w.fake.kill(pid);
    let mut sub = w.agent.events.subscribe(None);
    w.service.restore(&[]).await;
    let status = wait_for(&mut sub, "data", MountState::Mounted).await;
    assert_ne!(status.pid, Some(pid));
    assert_eq!(status.remount_count, 1);
    assert_eq!(w.fake.spawns(), 2);
}

#[tokio::test(start_paused = true)]
async fn another_programs_mount_at_the_path_is_never_unmounted_or_adopted() {
    let w = World::new();
    let pid = w.service.mount(w.spec("data")).await.unwrap().pid.unwrap();
    let path = w.base().join("mnt/data");
    let w = w.restart().await;
    // While the agent was down, blobfuse2 died and someone mounted a
    // FUSE filesystem of their own there.
    w.fake.kill(pid);
    w.fake
        .set_foreign(&path, Some(("fuse.sshfs", "user@host:/data")));
    let mut sub = w.agent.events.subscribe(None);
    w.service.restore(&[]).await;
    let failed = wait_for(&mut sub, "data", MountState::Failed).await;
    assert!(
        failed.message.contains(&format!(
            "path {} is mounted by something else (fuse.sshfs from user@host:/data)",
            path.display()
        )),
        "{}",
        failed.message
    );
    assert!(
        !w.fake
            .calls()
            .iter()
            .any(|c| c.starts_with("unmount") && c.ends_with(&path.display().to_string())),
        "{:?}",
        w.fake.calls()
    );
    // A retry after it is gone mounts.
    w.fake.set_foreign(&path, None);
    wait_for(&mut sub, "data", MountState::Mounted).await;
}

#[tokio::test(start_paused = true)]
async fn a_mount_that_never_appears_times_out_stops_blobfuse2_and_is_forgotten() {
    let w = World::new();
    w.fake.hang_next_spawn();
    let started = tokio::time::Instant::now();
    let err = w.service.mount(w.spec("data")).await.unwrap_err();
    let seconds = w.config.mount_timeout_seconds;
    let MountError::Timeout {
        seconds: reported, ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(*reported, u64::from(seconds));
    assert!(
        err.to_string().contains(&format!(
            "not in /proc/self/mountinfo at {} after {seconds} s (mounts.mount_timeout_seconds)",
            w.base().join("mnt/data").display()
        )),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_secs(seconds.into()));
    let pid = 1001;
    assert!(w.fake.calls().contains(&format!("stop {pid}")));
    assert!(!w.fake.running(pid));
    assert!(w.service.list().is_empty());
    assert!(w.no_request_recorded());
    assert!(!w.base().join("state/mounts/secrets/data").exists());
    assert!(!w.base().join("run/mounts/data.yaml").exists());
}

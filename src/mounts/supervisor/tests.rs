//! The mount state machine against the fake mounter, with paused time, on
//! the shared test rig ([`crate::testing::Rig`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events::{Delivery, EventBus, EventPayload, Subscription};
use crate::health::{ConditionState, Health, Subsystem};
use crate::mounts::config::{DeclaredMount, MountsConfig};
use crate::mounts::fake::FakeMounter;
use crate::mounts::spec::{Auth, ManagedIdentity, MountSpec, Origin, SecretSource};
use crate::mounts::{
    MountError, MountService, MountSettings, MountState, MountStatus, ResolveError,
};
use crate::secret::Secret;
use crate::testing::Rig;

const KEY: &str = "S3cr3tAccountKeyValue0123456789==";

/// One agent's mounts domain on the fake mounter; survives restarts of the
/// service (the dir, the store and the fake stay).
struct World {
    /// Temp dir, store, events, health, cancel, tasks.
    agent: Rig,
    fake: Arc<FakeMounter>,
    service: MountService,
    config: MountsConfig,
}

impl World {
    fn new() -> Self {
        Self::with(Rig::new(), Arc::new(FakeMounter::new()))
    }

    fn with(agent: Rig, fake: Arc<FakeMounter>) -> Self {
        let base = agent.root.clone();
        std::fs::create_dir_all(base.join("mnt")).unwrap();
        let config = MountsConfig {
            allowed_roots: vec![base.join("mnt")],
            cache_root: base.join("cache"),
            health_interval_seconds: 10,
            ..MountsConfig::default()
        };
        let (_, interval) = watch::channel(Duration::from_secs(10));
        let service = MountService::new(
            MountSettings::new(
                &config,
                &agent.state_dir(),
                &base.join("run"),
                &base.join("logs"),
            ),
            fake.clone(),
            agent.store.clone(),
            agent.events.clone(),
            agent.health.clone(),
            interval,
            agent.cancel.clone(),
            agent.tasks.clone(),
        );
        Self {
            agent,
            fake,
            service,
            config,
        }
    }

    fn base(&self) -> PathBuf {
        self.agent.root.clone()
    }

    fn spec(&self, name: &str) -> MountSpec {
        MountSpec {
            name: name.into(),
            account: "myacct".into(),
            container: "data".into(),
            mount_path: self.base().join("mnt").join(name),
            auth: Auth::AccountKey(SecretSource::Given(Secret::from_text(KEY))),
            read_only: false,
            cache_dir: PathBuf::new(),
            cache_max_bytes: 0,
            endpoint: String::new(),
            subdirectory: String::new(),
            origin: Origin::Api,
        }
    }

    /// Stops the service's supervisors and waits for them.
    async fn stop(&self) {
        self.agent.cancel.cancel();
        self.agent.tasks.close();
        self.agent.tasks.wait().await;
    }

    /// Restarts the service on the same dir, store and fake (an agent
    /// restart): its events, health, stop token and tasks are new.
    async fn restart(self) -> Self {
        self.stop().await;
        let World {
            mut agent, fake, ..
        } = self;
        agent.events = EventBus::new(4096);
        agent.health = Health::new();
        agent.cancel = CancellationToken::new();
        agent.tasks = TaskTracker::new();
        Self::with(agent, fake)
    }
}

/// The states of mount events published so far, after `sub`'s position.
fn states(sub: &mut Subscription) -> Vec<MountState> {
    let mut out = Vec::new();
    while let Some(Delivery::Event(e)) = sub.try_next() {
        if let EventPayload::Mount(s) = &e.payload {
            out.push(s.state);
        }
    }
    out
}

/// Waits for the next event on `sub` saying `name` became `state`, and
/// returns that status.
async fn wait_for(sub: &mut Subscription, name: &str, state: MountState) -> MountStatus {
    let wait = async {
        loop {
            match sub.next().await {
                Some(Delivery::Event(e)) => {
                    if let EventPayload::Mount(s) = &e.payload
                        && s.name == name
                        && s.state == state
                    {
                        return s.clone();
                    }
                }
                Some(Delivery::Truncated { .. }) => {}
                None => panic!("event bus closed"),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(3600), wait).await {
        Ok(status) => status,
        Err(_) => panic!("{name} never became {state:?}"),
    }
}

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
async fn first_failure_is_returned_scrubbed_and_forgotten() {
    let w = World::new();
    w.fake.fail_next_spawn(&format!(
        "some log line\nError: failed to authenticate azstorage credentials with error [key {KEY} refused]"
    ));
    let err = w.service.mount(w.spec("data")).await.unwrap_err();
    let MountError::Blobfuse2 {
        message, status, ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(status, "exit status 1");
    assert_eq!(
        message,
        "Error: failed to authenticate azstorage credentials with error [key *** refused]"
    );
    assert!(!err.to_string().contains(KEY));
    assert!(w.service.list().is_empty());
    assert!(!w.base().join("state/mounts/secrets/data").exists());
    assert!(!w.base().join("run/mounts/data.yaml").exists());
    // A later request with the same name is accepted.
    w.service.mount(w.spec("data")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn names_and_paths_in_use_are_refused() {
    let w = World::new();
    w.service.mount(w.spec("data")).await.unwrap();
    let same_name = w.service.mount(w.spec("data")).await.unwrap_err();
    assert!(matches!(same_name, MountError::InUse { .. }), "{same_name}");
    let mut nested = w.spec("other");
    nested.mount_path = w.base().join("mnt/data/inner");
    let err = w.service.mount(nested).await.unwrap_err();
    assert!(err.to_string().contains("overlaps"), "{err}");
    let mut outside = w.spec("outside");
    outside.mount_path = "/etc/outside".into();
    let err = w.service.mount(outside).await.unwrap_err();
    assert!(
        matches!(
            err,
            MountError::Invalid {
                field: "mount_path",
                ..
            }
        ),
        "{err}"
    );
    let mut bad_cache = w.spec("badcache");
    bad_cache.cache_dir = "/var".into();
    let err = w.service.mount(bad_cache).await.unwrap_err();
    assert!(
        matches!(
            err,
            MountError::Invalid {
                field: "cache_dir",
                ..
            }
        ),
        "{err}"
    );
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
async fn declared_mounts_read_their_secret_file_and_fail_clearly_without_it() {
    let w = World::new();
    let key_file = w.base().join("data.key");
    std::fs::write(&key_file, KEY).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let declared = |name: &str, secret_file: &Path| DeclaredMount {
        name: name.into(),
        account: "myacct".into(),
        container: "data".into(),
        mount_path: w.base().join("mnt").join(name),
        auth: "key".into(),
        secret_file: secret_file.to_owned(),
        ..DeclaredMount::default()
    };
    let mut good = w.agent.events.subscribe(None);
    let mut bad = w.agent.events.subscribe(None);
    w.service
        .restore(&[
            declared("good", &key_file),
            declared("nokey", &w.base().join("missing.key")),
        ])
        .await;
    wait_for(&mut good, "good", MountState::Mounted).await;
    let failed = wait_for(&mut bad, "nokey", MountState::Failed).await;
    assert!(failed.message.contains("missing.key"), "{}", failed.message);
    let condition = w.agent.health.get(Subsystem::Mounts);
    assert_eq!(condition.state, ConditionState::Failed);
    assert!(
        condition.message.contains("nokey failed"),
        "{}",
        condition.message
    );
    assert!(matches!(
        w.service.resolve("nokey"),
        Err(ResolveError::Unhealthy { .. })
    ));
    assert!(matches!(
        w.service.resolve("nope"),
        Err(ResolveError::Unknown(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn busy_unmount_is_lazy_says_so_and_leaves_blobfuse2_serving_the_open_files() {
    let w = World::new();
    let pid = w.service.mount(w.spec("data")).await.unwrap().pid.unwrap();
    let path = w.base().join("mnt/data");
    w.fake.set_busy(&path, true);
    let status = w.service.unmount("data").await.unwrap();
    assert_eq!(status.state, MountState::Unmounted);
    assert!(
        status.message.starts_with("lazily unmounted: busy")
            && status.message.contains(&format!(
                "blobfuse2 (pid {pid}) keeps serving the open files"
            )),
        "{}",
        status.message
    );
    assert!(w.fake.pid_at(&path).is_none(), "detached");
    // Killing blobfuse2 would break the open files: it is left running.
    assert!(!w.fake.calls().contains(&format!("stop {pid}")));
    assert!(w.fake.running(pid));
    assert!(w.service.list().is_empty());
    assert!(
        w.agent
            .store
            .scan::<serde_json::Value>(crate::mounts::registry::REQUESTED)
            .unwrap()
            .is_empty()
    );
    assert!(!w.base().join("state/mounts/secrets/data").exists());
    assert!(matches!(
        w.service.unmount("data").await,
        Err(MountError::NotFound(_))
    ));
    // Once the last file is closed it exits by itself; the watch ends then
    // and is never the one to stop it.
    w.fake.kill(pid);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!w.fake.calls().contains(&format!("stop {pid}")));
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_unmount_keeps_the_mount_registered_and_supervised() {
    let w = World::new();
    let pid = w.service.mount(w.spec("data")).await.unwrap().pid.unwrap();
    w.fake
        .fail_next_unmount("fusermount3 did not finish within 10 s");
    let mut sub = w.agent.events.subscribe(None);
    let err = w.service.unmount("data").await.unwrap_err();
    assert!(
        matches!(&err, MountError::Unmount { detail, .. } if detail.contains("did not finish")),
        "{err}"
    );
    // Supervised again: adopted as it runs, and still health-checked.
    let adopted = wait_for(&mut sub, "data", MountState::Mounted).await;
    assert_eq!(adopted.pid, Some(pid));
    assert!(w.fake.running(pid), "blobfuse2 was not stopped");
    w.fake.kill(pid);
    let stale = wait_for(&mut sub, "data", MountState::Stale).await;
    assert!(stale.message.contains("killed"), "{}", stale.message);
    let repaired = wait_for(&mut sub, "data", MountState::Mounted).await;
    assert_ne!(repaired.pid, Some(pid));
    // And it can still be unmounted.
    w.service.unmount("data").await.unwrap();
    assert!(w.service.list().is_empty());
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
    assert!(
        w.agent
            .store
            .scan::<serde_json::Value>(crate::mounts::registry::REQUESTED)
            .unwrap()
            .is_empty()
    );
    assert!(!w.base().join("state/mounts/secrets/data").exists());
    assert!(!w.base().join("run/mounts/data.yaml").exists());
}

#[tokio::test(start_paused = true)]
async fn empty_cache_frees_bytes_and_managed_identity_needs_no_secret() {
    let w = World::new();
    let mut spec = w.spec("msi");
    spec.auth = Auth::ManagedIdentity(ManagedIdentity::default());
    let status = w.service.mount(spec).await.unwrap();
    assert_eq!(status.auth_mode, "msi");
    std::fs::create_dir_all(status.cache_dir.join("a/b")).unwrap();
    std::fs::write(status.cache_dir.join("a/b/blob"), vec![0u8; 1000]).unwrap();
    assert_eq!(w.service.empty_cache("msi").await.unwrap(), 1000);
    let left: Vec<_> = std::fs::read_dir(&status.cache_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        [".instance-agent-cache"],
        "only the agent's marker stays"
    );
    // Unmount gives the default per-mount dir back entirely.
    w.service.unmount("msi").await.unwrap();
    assert!(!status.cache_dir.exists());
}

#[tokio::test(start_paused = true)]
async fn a_cache_dir_holding_someone_elses_files_is_refused_and_left_alone() {
    let w = World::new();
    let users = w.base().join("mnt/notebooks");
    std::fs::create_dir_all(&users).unwrap();
    std::fs::write(users.join("thesis.ipynb"), "years of work").unwrap();
    let mut spec = w.spec("data");
    spec.cache_dir = users.clone();
    let err = w.service.mount(spec).await.unwrap_err();
    assert!(
        matches!(&err, MountError::CacheDir { path, .. } if *path == users),
        "{err}"
    );
    assert!(
        err.to_string().contains("cache_dir: ")
            && err
                .to_string()
                .contains("is not empty and is not an agent cache dir"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(users.join("thesis.ipynb")).unwrap(),
        "years of work"
    );
    assert_eq!(w.fake.spawns(), 0);
    // An empty dir of the user's is taken, and given back empty.
    let empty = w.base().join("mnt/scratch");
    std::fs::create_dir_all(&empty).unwrap();
    let mut spec = w.spec("data");
    spec.cache_dir = empty.clone();
    w.service.mount(spec).await.unwrap();
    assert!(empty.join(".instance-agent-cache").is_file());
    assert!(empty.join("blobfuse2").is_dir());
    w.service.unmount("data").await.unwrap();
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
}

#[test]
fn an_unhealthy_mount_reads_well_with_and_without_a_message() {
    let unhealthy = |message: &str| ResolveError::Unhealthy {
        name: "data".into(),
        state: MountState::Remounting,
        message: message.into(),
    };
    assert_eq!(unhealthy("").to_string(), "mount \"data\" is remounting");
    assert_eq!(
        unhealthy("attempt 2").to_string(),
        "mount \"data\" is remounting (attempt 2)"
    );
}

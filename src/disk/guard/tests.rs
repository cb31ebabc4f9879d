//! Unit tests of the guard: a fake filesystem world and engine, paused time
//! (except where a probe must really hang), and the shared [`Rig`] for the
//! store, events, health, admission and cancellation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::*;
use crate::disk::fake::{FakeDocker, FakeProbe, FakeStep};
use crate::disk::{DiskAlert, FilesystemUsage, FsStats, MountInfo, Thresholds};
use crate::events::EventPayload;
use crate::testing::Rig;

const MIB: u64 = 1 << 20;
const ROOT: u64 = 1;
const MNT: u64 = 2;
const STATE: u64 = 3;

fn config() -> DiskConfig {
    DiskConfig {
        interval_ms: 1000,
        sample_timeout_ms: 3000,
        critical_free_bytes: 8 * MIB,
        warning_free_bytes: 16 * MIB,
        clear_margin_bytes: 2 * MIB,
        transition_seconds: 30,
        reserve_bytes: MIB,
        ..DiskConfig::default()
    }
}

fn stats(free: u64) -> FsStats {
    FsStats {
        total_bytes: 64 * MIB,
        free_bytes: free,
        total_inodes: 10_000,
        free_inodes: 9_000,
    }
}

/// A running guard on three fake filesystems (/, /mnt and the state dir;
/// /tmp and the Docker data root on /), with one fake reclaim step.
struct GuardRig {
    /// The store, events, health, gate, cancel token and tasks.
    base: Rig,
    guard: DiskGuard,
    probe: FakeProbe,
    docker: Arc<FakeDocker>,
    step: Arc<FakeStep>,
    config: watch::Sender<DiskConfig>,
}

fn rig(config: DiskConfig) -> GuardRig {
    let base = Rig::new();
    let state_dir = base.state_dir();
    let probe = FakeProbe::new();
    probe.add_fs(ROOT, "/", stats(40 * MIB));
    probe.add_path("/tmp", ROOT);
    probe.add_path("/var/lib/docker", ROOT);
    probe.add_fs(MNT, "/mnt", stats(40 * MIB));
    probe.add_fs(STATE, state_dir.to_str().expect("utf-8"), stats(40 * MIB));
    let docker = Arc::new(FakeDocker::default());
    docker.state.lock().unwrap().data_root = Some("/var/lib/docker".into());
    let step = Arc::new(FakeStep::freeing("fake_step", 0));
    let (config_tx, config_rx) = watch::channel(config);
    let guard = DiskGuard::start(
        DiskParts {
            config: config_rx,
            state_dir,
            probe: Arc::new(probe.clone()),
            isolated: Arc::new(probe.clone()),
            docker: docker.clone(),
            steps: vec![step.clone() as Arc<dyn ReclaimStep>],
            store: base.store.clone(),
            health: base.health.clone(),
            events: base.events.clone(),
            admission: base.admission.clone(),
        },
        &base.tasks,
        &base.cancel,
    );
    GuardRig {
        base,
        guard,
        probe,
        docker,
        step,
        config: config_tx,
    }
}

impl GuardRig {
    /// The fake mount point of the state dir's filesystem.
    fn state_mount(&self) -> String {
        self.base.state_dir().to_str().unwrap().to_owned()
    }

    /// The latest usage of the filesystem mounted at `mount`.
    fn fs_usage(&self, mount: &str) -> FilesystemUsage {
        self.guard
            .usage()
            .filesystems
            .into_iter()
            .find(|f| f.mount.mount_point == Path::new(mount))
            .unwrap()
    }
}

/// A rig whose three filesystems have been sampled once, with a
/// subscription that has seen their first alerts.
async fn started(config: DiskConfig) -> (GuardRig, AlertSubscription, Vec<Seen>) {
    let rig = rig(config);
    let mut sub = rig.guard.subscribe();
    let first = discovered(&mut sub, &["/", "/mnt", &rig.state_mount()]).await;
    (rig, sub, first)
}

type Seen = (String, DiskState, DiskState);

async fn next(sub: &mut AlertSubscription) -> Seen {
    let alert = tokio::time::timeout(Duration::from_secs(600), sub.next())
        .await
        .expect("an alert within 10 minutes")
        .expect("guard running");
    (
        alert.usage.mount.mount_point.display().to_string(),
        alert.old_state,
        alert.new_state,
    )
}

/// Alerts until every one of `mount_points` has been seen once.
async fn discovered(sub: &mut AlertSubscription, mount_points: &[&str]) -> Vec<Seen> {
    let mut seen = Vec::new();
    while !mount_points
        .iter()
        .all(|m| seen.iter().any(|(s, _, _): &Seen| s == m))
    {
        seen.push(next(sub).await);
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn exact_alert_sequence_across_the_levels() {
    let (rig, mut sub, first) = started(config()).await;
    assert!(
        first
            .iter()
            .all(|(_, old, new)| *old == DiskState::Unknown && *new == DiskState::Ok),
        "{first:?}"
    );
    let mnt = |old, new| ("/mnt".to_owned(), old, new);

    rig.probe.set_free(MNT, 15 * MIB);
    assert_eq!(next(&mut sub).await, mnt(DiskState::Ok, DiskState::Warning));
    rig.probe.set_free(MNT, 7 * MIB);
    let crossed = Instant::now();
    assert_eq!(
        next(&mut sub).await,
        mnt(DiskState::Warning, DiskState::Critical)
    );
    assert!(
        crossed.elapsed() <= Duration::from_secs(1),
        "one interval at most"
    );
    // Inside the margin: nothing for two minutes.
    rig.probe.set_free(MNT, 9 * MIB);
    assert!(
        tokio::time::timeout(Duration::from_secs(120), sub.next())
            .await
            .is_err(),
        "no alert inside the margin"
    );
    rig.probe.set_free(MNT, 11 * MIB);
    let above = Instant::now();
    assert_eq!(
        next(&mut sub).await,
        mnt(DiskState::Critical, DiskState::Warning)
    );
    assert!(above.elapsed() >= Duration::from_secs(30));
    rig.probe.set_free(MNT, 30 * MIB);
    assert_eq!(next(&mut sub).await, mnt(DiskState::Warning, DiskState::Ok));
    let usage = rig.guard.usage();
    let mnt_usage = rig.fs_usage("/mnt");
    assert_eq!(mnt_usage.alerts, 5, "discovered + four transitions");
    assert_eq!(usage.alerts_total, 7);
}

#[tokio::test(start_paused = true)]
async fn a_new_subscriber_gets_current_states_first() {
    let (rig, mut first, _) = started(config()).await;
    rig.probe.set_free(MNT, 7 * MIB);
    assert_eq!(next(&mut first).await.2, DiskState::Critical);
    let mut late = rig.guard.subscribe();
    let mut current = Vec::new();
    for _ in 0..3 {
        current.push(next(&mut late).await);
    }
    current.sort();
    assert!(current.contains(&("/mnt".into(), DiskState::Critical, DiskState::Critical)));
    assert!(current.contains(&("/".into(), DiskState::Ok, DiskState::Ok)));
    rig.probe.set_free(MNT, 4 * MIB);
    rig.probe.set_free(ROOT, 15 * MIB);
    assert_eq!(
        next(&mut late).await,
        ("/".into(), DiskState::Ok, DiskState::Warning)
    );
}

#[tokio::test(start_paused = true)]
async fn paths_are_deduplicated_and_absent_ones_reported() {
    let mut cfg = config();
    cfg.paths = vec!["/data".into()];
    let (rig, _sub, _) = started(cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let usage = rig.guard.usage();
    assert_eq!(usage.filesystems.len(), 3, "{usage:#?}");
    let root = &usage.filesystems[0];
    let paths: Vec<&Path> = root.paths.iter().map(|p| p.path.as_path()).collect();
    assert_eq!(
        paths,
        [
            Path::new("/"),
            Path::new("/tmp"),
            Path::new("/var/lib/docker")
        ]
    );
    assert!(root.guards_admission, "docker data root lives on /");
    assert_eq!(usage.skipped.len(), 1);
    assert_eq!(usage.skipped[0].path, Path::new("/data"));
    assert_eq!(usage.skipped[0].reasons, ["disk.paths"]);
    // It appears: it joins its filesystem at the next tick.
    rig.probe.add_path("/data", MNT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let usage = rig.guard.usage();
    assert!(usage.skipped.is_empty());
    let mnt = rig.fs_usage("/mnt");
    assert!(mnt.paths.iter().any(|p| p.path == Path::new("/data")));
}

#[tokio::test(start_paused = true)]
async fn a_state_dir_on_a_tmpfs_gets_levels_relative_to_its_size() {
    let rig = rig(config());
    // 64 MiB: warning below 6.4 MiB free, critical below 3.2 MiB (not the
    // absolute 16 and 8 MiB).
    rig.probe.set_fs_type(STATE, "tmpfs");
    let mut sub = rig.guard.subscribe();
    discovered(&mut sub, &["/", "/mnt", &rig.state_mount()]).await;
    rig.probe.set_free(STATE, 6 * MIB);
    assert_eq!(next(&mut sub).await.2, DiskState::Warning);
    let state = rig.fs_usage(&rig.state_mount());
    assert_eq!(state.thresholds.critical_free_bytes, 64 * MIB / 20);
    rig.probe.set_free(STATE, 3 * MIB);
    assert_eq!(next(&mut sub).await.2, DiskState::Critical);
    let reason = rig.base.admission.held_reason().expect("held");
    assert!(reason.contains("below the 3.2 MiB floor"), "{reason}");
}

#[tokio::test(start_paused = true)]
async fn admission_is_held_while_the_state_filesystem_is_critical() {
    let (rig, mut sub, _) = started(config()).await;
    // /mnt holds neither the engine's data nor the state dir.
    rig.probe.set_free(MNT, 4 * MIB);
    next(&mut sub).await;
    assert_eq!(rig.base.admission.held_reason(), None);
    rig.probe.set_free(STATE, 4 * MIB);
    assert_eq!(next(&mut sub).await.2, DiskState::Critical);
    let reason = rig.base.admission.held_reason().expect("held");
    assert!(reason.contains("state dir"), "{reason}");
    assert!(reason.contains("below the 8.0 MiB floor"), "{reason}");
    let condition = rig.base.health.get(Subsystem::Disk);
    assert_eq!(condition.state, ConditionState::Failed);
    assert!(
        condition.message.contains("jobs held"),
        "{}",
        condition.message
    );
    rig.probe.set_free(STATE, 30 * MIB);
    let (_, old, new) = next(&mut sub).await;
    assert_eq!((old, new), (DiskState::Critical, DiskState::Ok));
    assert_eq!(rig.base.admission.held_reason(), None);
    // /mnt is still critical: the condition still says so.
    assert_eq!(
        rig.base.health.get(Subsystem::Disk).state,
        ConditionState::Failed
    );
}

#[tokio::test(start_paused = true)]
async fn docker_root_is_asked_until_the_engine_answers() {
    let rig = rig(config());
    rig.docker.state.lock().unwrap().data_root = None;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = rig.guard.usage();
    rig.docker.state.lock().unwrap().data_root = Some("/var/lib/docker".into());
    tokio::time::sleep(Duration::from_secs(60)).await;
    let usage = rig.guard.usage();
    let root = &usage.filesystems[0];
    assert!(
        root.paths
            .iter()
            .any(|p| p.reasons.contains(&"docker data root".to_owned())),
        "{root:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn register_and_unregister_a_cache_dir() {
    let (rig, mut sub, _) = started(config()).await;
    rig.probe.add_fs(9, "/cache", stats(40 * MIB));
    rig.guard.register("/cache/data", "cache of mount data");
    rig.probe.add_path("/cache/data", 9);
    assert_eq!(
        next(&mut sub).await,
        ("/cache".into(), DiskState::Unknown, DiskState::Ok)
    );
    rig.guard.unregister("/cache/data", "cache of mount data");
    assert_eq!(
        next(&mut sub).await,
        ("/cache".into(), DiskState::Ok, DiskState::Unknown)
    );
    assert_eq!(rig.guard.usage().filesystems.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn reserve_is_released_when_critical_and_recreated_after() {
    let (rig, mut sub, _) = started(config()).await;
    let reserve = rig
        .base
        .state_dir()
        .join(crate::disk::reserve::RESERVE_FILE_NAME);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(std::fs::metadata(&reserve).map(|m| m.len()).ok(), Some(MIB));
    rig.probe.set_free(STATE, 4 * MIB);
    next(&mut sub).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!reserve.exists(), "released under pressure");
    // Back above the floor but without room for the reserve on top of
    // floor + margin: it stays released.
    rig.probe.set_free(STATE, 10 * MIB + MIB / 2);
    next(&mut sub).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!reserve.exists());
    rig.probe.set_free(STATE, 30 * MIB);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(reserve.exists(), "recreated once space returned");
}

#[tokio::test(start_paused = true)]
async fn turning_critical_reclaims_automatically() {
    let (rig, mut sub, _) = started(config()).await;
    assert_eq!(rig.step.calls(), (0, 0));
    rig.probe.set_free(MNT, 4 * MIB);
    next(&mut sub).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rig.step.calls(), (0, 1));
    // A dry run of everything estimates and deletes nothing.
    let report = rig
        .guard
        .reclaim(ReclaimRequest {
            path: None,
            mode: ReclaimMode {
                dry_run: true,
                all_steps: true,
            },
            trigger: ReclaimTrigger::Api,
        })
        .await
        .unwrap();
    assert!(report.dry_run);
    assert_eq!(report.steps[0].name, "fake_step");
    assert_eq!(rig.step.calls(), (1, 1));
    // The automatic reclaim reached the event log; the dry run did not.
    let mut events = rig.base.events.subscribe(Some(0));
    let mut reclaims = Vec::new();
    while let Some(crate::events::Delivery::Event(event)) = events.try_next() {
        if let EventPayload::Reclaim(finished) = &event.payload {
            reclaims.push(finished.clone());
        }
    }
    assert_eq!(reclaims.len(), 1, "{reclaims:?}");
    assert_eq!(reclaims[0].trigger, ReclaimTrigger::Automatic);
    assert_eq!(reclaims[0].targets, [PathBuf::from("/mnt")]);
    assert!(!reclaims[0].report.dry_run);
    assert!(reclaims[0].report.steps[0].ran);
    // Turned off: no reclaim on the next crossing.
    let mut cfg = config();
    cfg.auto_reclaim = false;
    rig.config.send_replace(cfg);
    tokio::time::sleep(Duration::from_millis(10)).await;
    rig.probe.set_free(ROOT, 4 * MIB);
    next(&mut sub).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rig.step.calls(), (1, 1));
}

/// The automatic reclaims published on the event log so far, by target.
fn automatic_reclaims(events: &EventBus) -> Vec<Vec<PathBuf>> {
    let mut subscription = events.subscribe(Some(0));
    let mut targets = Vec::new();
    while let Some(crate::events::Delivery::Event(event)) = subscription.try_next() {
        if let EventPayload::Reclaim(finished) = &event.payload
            && finished.trigger == ReclaimTrigger::Automatic
        {
            targets.push(finished.targets.clone());
        }
    }
    targets
}

#[tokio::test(start_paused = true)]
async fn two_filesystems_turning_critical_together_each_get_a_reclaim() {
    let (rig, mut sub, _) = started(config()).await;
    rig.probe.set_free(MNT, 4 * MIB);
    rig.probe.set_free(ROOT, 4 * MIB);
    next(&mut sub).await;
    next(&mut sub).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut reclaimed = automatic_reclaims(&rig.base.events);
    reclaimed.sort();
    assert_eq!(
        reclaimed,
        [vec![PathBuf::from("/")], vec![PathBuf::from("/mnt")]]
    );
    assert_eq!(rig.step.calls(), (0, 2));
}

#[tokio::test(start_paused = true)]
async fn a_filesystem_critical_on_inodes_is_reclaimed_until_inodes_recover() {
    let (rig, mut sub, _) = started(config()).await;
    // Plenty of bytes, 1 % of the inodes free: critical on inodes.
    rig.probe.set_free_inodes(MNT, 100);
    let (_, _, new) = next(&mut sub).await;
    assert_eq!(new, DiskState::Critical);
    let alert_levels = rig
        .guard
        .subscribe()
        .pending
        .into_iter()
        .find(|a| a.usage.mount.mount_point == Path::new("/mnt"));
    let alert = alert_levels.expect("a current-state alert for /mnt");
    assert_eq!(
        alert.threshold_inodes_percent,
        config().critical_free_inodes_percent
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        automatic_reclaims(&rig.base.events),
        [vec![PathBuf::from("/mnt")]]
    );
    // The step ran: bytes were never short, the inodes were.
    assert_eq!(rig.step.calls(), (0, 1));
    let reclaim_mnt = || {
        rig.guard.reclaim(ReclaimRequest {
            path: Some("/mnt".into()),
            mode: ReclaimMode::default(),
            trigger: ReclaimTrigger::Api,
        })
    };
    let report = reclaim_mnt().await.unwrap();
    assert!(report.steps[0].ran, "{report:?}");
    // Inodes back: nothing left to do.
    rig.probe.set_free_inodes(MNT, 9_000);
    let report = reclaim_mnt().await.unwrap();
    assert_eq!(
        report.steps[0].skipped.as_deref(),
        Some("enough space is free"),
        "{report:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn alerts_reach_the_event_log_and_lowered_levels_apply_live() {
    let (rig, mut sub, _) = started(config()).await;
    let mut events = rig.base.events.subscribe(Some(0));
    // 40 MiB free everywhere: raising the warning level to 50 MiB puts
    // every filesystem in warning at the next sample.
    let mut cfg = config();
    cfg.warning_free_bytes = 50 * MIB;
    rig.config.send_replace(cfg);
    let warned = discovered(&mut sub, &["/", "/mnt", &rig.state_mount()]).await;
    assert!(warned.iter().all(|(_, _, new)| *new == DiskState::Warning));
    let mut disk_events = 0;
    while let Some(crate::events::Delivery::Event(event)) = events.try_next() {
        if let EventPayload::DiskAlert(_) = event.payload {
            disk_events += 1;
        }
    }
    assert_eq!(
        disk_events, 3,
        "the three warnings; ok discoveries are not news"
    );
    assert_eq!(
        rig.base.health.get(Subsystem::Disk).state,
        ConditionState::Degraded
    );
}

#[tokio::test]
async fn a_hung_filesystem_is_unresponsive_without_stalling_the_others() {
    let mut cfg = config();
    cfg.interval_ms = 100;
    cfg.sample_timeout_ms = 300;
    let (rig, mut sub, _) = started(cfg).await;
    rig.probe.hang(MNT);
    assert_eq!(
        next(&mut sub).await,
        ("/mnt".into(), DiskState::Ok, DiskState::Unresponsive)
    );
    let before = rig.probe.calls("/");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(rig.probe.calls("/") >= before + 5, "/ is still sampled");
    assert_eq!(
        rig.probe.blocked(),
        1,
        "one probe outstanding, not one per tick"
    );
    rig.probe.set_free(ROOT, 15 * MIB);
    assert_eq!(
        next(&mut sub).await,
        ("/".into(), DiskState::Ok, DiskState::Warning)
    );
    let mnt = rig.fs_usage("/mnt");
    assert!(
        mnt.error
            .as_deref()
            .unwrap_or("")
            .contains("no answer within 300 ms")
    );
    rig.probe.release(MNT);
    assert_eq!(
        next(&mut sub).await,
        ("/mnt".into(), DiskState::Unresponsive, DiskState::Ok)
    );
}

#[tokio::test]
async fn a_path_that_hangs_on_its_own_does_not_stop_its_old_filesystem() {
    let mut cfg = config();
    cfg.interval_ms = 50;
    cfg.sample_timeout_ms = 300;
    let (rig, mut sub, _) = started(cfg).await;
    // Something that hangs gets mounted on /tmp, which was on /.
    rig.probe.add_fs(9, "/tmp", stats(40 * MIB));
    rig.probe.hang(9);
    assert_eq!(
        next(&mut sub).await,
        ("/tmp".into(), DiskState::Unknown, DiskState::Unresponsive)
    );
    rig.probe.set_free(ROOT, 15 * MIB);
    assert_eq!(
        next(&mut sub).await,
        ("/".into(), DiskState::Ok, DiskState::Warning)
    );
    let root = rig.fs_usage("/");
    assert!(root.paths.iter().all(|p| p.path != Path::new("/tmp")));
    rig.probe.release(9);
    let mut seen = vec![next(&mut sub).await, next(&mut sub).await];
    seen.sort();
    assert_eq!(
        seen,
        [
            ("/tmp".into(), DiskState::Unknown, DiskState::Ok),
            ("/tmp".into(), DiskState::Unresponsive, DiskState::Unknown),
        ]
    );
}

#[tokio::test]
async fn watched_paths_added_over_the_api_are_kept_in_the_store() {
    let rig = rig(config());
    rig.guard
        .add_watched_path("/datasets".into(), "training data".into())
        .await
        .unwrap();
    let err = rig
        .guard
        .add_watched_path("datasets".into(), String::new())
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        DiskError::InvalidRequest { field: "path", .. }
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let skipped = rig.guard.usage().skipped;
    assert_eq!(skipped[0].reasons, ["added by operator: training data"]);
    let store = rig.base.store.clone();
    let saved: Vec<(String, SavedPath)> = store.scan(WATCHED_PATHS).unwrap();
    assert_eq!(saved[0].0, "/datasets");
    assert!(
        rig.guard
            .remove_watched_path("/datasets".into())
            .await
            .unwrap()
    );
    assert!(
        !rig.guard
            .remove_watched_path("/datasets".into())
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rig.guard.usage().skipped.is_empty());
}

/// What the reacting subscriber saw: the alert's mount point and new state,
/// the state the guard showed it then, and the disk condition then.
type Reaction = (String, DiskState, Option<DiskState>, ConditionState);

async fn reacted(seen: &mut tokio::sync::mpsc::UnboundedReceiver<Reaction>) -> Reaction {
    tokio::time::timeout(Duration::from_secs(600), seen.recv())
        .await
        .expect("the subscriber reacted within 10 minutes")
        .expect("the subscriber is running")
}

#[tokio::test(start_paused = true)]
async fn a_subscriber_that_calls_back_into_the_guard_does_not_deadlock() {
    let (rig, mut sub, _) = started(config()).await;
    // For every alert: the guard's usage, a new subscription (both take the
    // guard's lock) and the condition, while the loop is delivering.
    let guard = rig.guard.clone();
    let health = rig.base.health.clone();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let reactor = tokio::spawn(async move {
        while let Some(alert) = sub.next().await {
            let usage = guard.usage();
            let mut again = guard.subscribe();
            let current = again.next().await.expect("current states");
            let state_now = usage
                .filesystems
                .iter()
                .find(|f| f.mount.mount_point == alert.usage.mount.mount_point)
                .map(|f| f.state);
            let condition = health.get(Subsystem::Disk).state;
            let mount_point = alert.usage.mount.mount_point.display().to_string();
            let _ = seen_tx.send((mount_point, alert.new_state, state_now, condition));
            drop(current);
        }
    });
    rig.probe.set_free(MNT, 4 * MIB);
    // What the alert says is already what the guard and health say.
    assert_eq!(
        reacted(&mut seen_rx).await,
        (
            "/mnt".to_owned(),
            DiskState::Critical,
            Some(DiskState::Critical),
            ConditionState::Failed
        )
    );
    // And the loop goes on: the recovery is alerted and seen the same way.
    rig.probe.set_free(MNT, 30 * MIB);
    assert_eq!(
        reacted(&mut seen_rx).await,
        (
            "/mnt".to_owned(),
            DiskState::Ok,
            Some(DiskState::Ok),
            ConditionState::Ok
        )
    );
    reactor.abort();
}

/// An alert for the filesystem mounted at `mount`.
fn alert_for(mount: &str, old: DiskState, new: DiskState) -> DiskAlert {
    DiskAlert {
        old_state: old,
        new_state: new,
        threshold_bytes: 0,
        threshold_inodes_percent: 0.0,
        time: std::time::SystemTime::UNIX_EPOCH,
        message: format!("{mount} is {}", new.name()),
        usage: FilesystemUsage {
            mount: MountInfo {
                mount_point: mount.into(),
                ..Default::default()
            },
            paths: Vec::new(),
            stats: None,
            state: new,
            thresholds: Thresholds::from_config(&config()),
            sampled_at: None,
            error: None,
            alerts: 0,
            guards_admission: false,
        },
    }
}

/// Alerts delivered by hand, with current states that include those up to
/// `seq`.
struct ScriptedSource {
    sender: tokio::sync::broadcast::Sender<alerts::Sequenced>,
    current: std::sync::Mutex<(Vec<DiskAlert>, u64)>,
}

impl alerts::AlertSource for ScriptedSource {
    fn snapshot(&self) -> alerts::AlertSnapshot {
        let (current, seq) = self.current.lock().unwrap().clone();
        alerts::AlertSnapshot {
            current,
            seq,
            receiver: self.sender.subscribe(),
        }
    }
}

fn scripted(current: Vec<DiskAlert>, seq: u64) -> Arc<ScriptedSource> {
    Arc::new(ScriptedSource {
        sender: tokio::sync::broadcast::channel(alerts::ALERT_BUFFER).0,
        current: std::sync::Mutex::new((current, seq)),
    })
}

fn deliver(source: &ScriptedSource, seq: u64, alert: DiskAlert) {
    source
        .sender
        .send(alerts::Sequenced { seq, alert })
        .expect("a subscriber");
}

#[tokio::test(start_paused = true)]
async fn a_subscription_skips_alerts_its_current_states_already_show() {
    // Alerts 1 and 2 were recorded (the state changed) but not delivered
    // yet when the subscription took its current states.
    let critical = alert_for("/mnt", DiskState::Critical, DiskState::Critical);
    let source = scripted(vec![critical.clone()], 2);
    let mut sub = AlertSubscription::new(source.clone());
    deliver(
        &source,
        1,
        alert_for("/mnt", DiskState::Ok, DiskState::Warning),
    );
    deliver(
        &source,
        2,
        alert_for("/mnt", DiskState::Warning, DiskState::Critical),
    );
    let recovered = alert_for("/mnt", DiskState::Critical, DiskState::Warning);
    deliver(&source, 3, recovered.clone());
    assert_eq!(sub.next().await, Some(critical));
    assert_eq!(
        sub.next().await,
        Some(recovered),
        "1 and 2 skipped, 3 delivered"
    );
}

#[tokio::test(start_paused = true)]
async fn a_subscriber_that_falls_behind_gets_the_current_states_again() {
    let source = scripted(Vec::new(), 0);
    let mut sub = AlertSubscription::new(source.clone());
    let count = alerts::ALERT_BUFFER as u64 + 10;
    for seq in 1..=count {
        deliver(
            &source,
            seq,
            alert_for("/mnt", DiskState::Ok, DiskState::Warning),
        );
    }
    let now = alert_for("/mnt", DiskState::Warning, DiskState::Warning);
    *source.current.lock().unwrap() = (vec![now.clone()], count);
    assert_eq!(sub.next().await, Some(now), "the present, not the past");
    let next = alert_for("/mnt", DiskState::Warning, DiskState::Ok);
    deliver(&source, count + 1, next.clone());
    assert_eq!(sub.next().await, Some(next));
}

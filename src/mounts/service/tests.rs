//! The mount service against the fake mounter, with paused time: what a
//! request is refused for, the first failure, declared mounts, unmount
//! (clean, lazy, failed), the cache dirs, what a job is told.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::health::{ConditionState, Subsystem};
use crate::mounts::config::DeclaredMount;
use crate::mounts::spec::{Auth, ManagedIdentity};
use crate::mounts::testing::{KEY, World, wait_for};
use crate::mounts::{MountError, MountState, ResolveError};

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
    assert!(w.no_request_recorded());
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

#[tokio::test]
async fn the_owner_is_resolved_and_an_unknown_one_is_refused_naming_the_field() {
    use crate::mounts::spec::{NO_GID, Owner};
    let w = World::new();
    // The default owner (root in the rig): a jobs-only mount, shown as root's.
    let status = w.service.mount(w.spec("jobs")).await.unwrap();
    assert_eq!(status.owner, Owner::ROOT);
    // A uid given alone gets its primary group from the user database.
    let mut by_uid = w.spec("byuid");
    by_uid.owner = Some(Owner {
        uid: 0,
        gid: NO_GID,
    });
    assert_eq!(w.service.mount(by_uid).await.unwrap().owner, Owner::ROOT);
    // A uid of no user and no gid: refused, naming owner_uid.
    let mut nobody = w.spec("nobody");
    nobody.owner = Some(Owner {
        uid: 4_000_000_000,
        gid: NO_GID,
    });
    let err = w.service.mount(nobody).await.unwrap_err();
    assert!(
        matches!(
            err,
            MountError::Invalid {
                field: "owner_uid",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("give owner_gid"), "{err}");
}

//! Black-box tests of file share mounts: the real agent drives the
//! blobfuse2 stand-in (same command line and config, a real FUSE mount of a
//! local directory) through the real kernel FUSE, `/proc/self/mountinfo` and
//! `fusermount3`. Every test cleans up its mounts and stand-ins in `Drop`.
#![cfg(feature = "test-util")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::events::{self, EventLog};
use common::fuse_site::{Site, mounts_below, standin};
use common::{Agent, cli};
use instance_agent::api::proto::{
    self, agent_service_client::AgentServiceClient, disk_service_client::DiskServiceClient,
    mount_request::Auth, mount_service_client::MountServiceClient,
};
use nix::sys::signal::Signal;
use tokio_stream::StreamExt;

const KEY: &str = "QUNDT1VOVEtFWS1uZXZlci1pbi1hbnktbG9nLTAxMjM0NTY3ODk=";
const SAS: &str =
    "?sv=2022-11-02&ss=b&srt=co&sp=rwdl&se=2031-01-01&sig=U0lHTkFUVVJFbmV2ZXJsb2dnZWQ%3D";
const WRONG_SAS: &str = "?sv=2022-11-02&ss=b&sp=r&sig=V1JPTkdzaWduYXR1cmVuZXZlcmxvZ2dlZA%3D%3D";

/// The mountinfo line at `path`: (type, source).
fn mountinfo_at(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        (before.split(' ').nth(4)? == path.to_str()?).then(|| {
            let mut f = after.split(' ');
            (
                f.next().unwrap_or_default().to_owned(),
                f.next().unwrap_or_default().to_owned(),
            )
        })
    })
}

fn request(site: &Site, name: &str, auth: Auth) -> proto::MountRequest {
    // For the suite-wide sweep of captured logs (scripts/check-test-logs.sh).
    common::register_secrets(&[
        KEY,
        SAS,
        WRONG_SAS,
        "U0lHTkFUVVJFbmV2ZXJsb2dnZWQ",
        "V1JPTkdzaWduYXR1cmVuZXZlcmxvZ2dlZA",
    ]);
    proto::MountRequest {
        name: name.into(),
        account: "myacct".into(),
        container: "data".into(),
        mount_path: site.mnt(name).display().to_string(),
        auth: Some(auth),
        ..Default::default()
    }
}

async fn mounts_client(agent: &Agent) -> MountServiceClient<tonic::transport::Channel> {
    MountServiceClient::new(agent.channel().await)
}

async fn mount_with_key(agent: &Agent, site: &Site, name: &str) -> proto::MountInfo {
    mounts_client(agent)
        .await
        .mount(request(site, name, Auth::AccountKey(KEY.into())))
        .await
        .expect("mount")
        .into_inner()
}

async fn list(agent: &Agent) -> Vec<proto::MountInfo> {
    mounts_client(agent)
        .await
        .list_mounts(proto::ListMountsRequest {})
        .await
        .expect("list mounts")
        .into_inner()
        .mounts
}

/// Polls until `check` holds, up to a generous timeout.
async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn mount_state(agent: &Agent, name: &str) -> Option<proto::MountInfo> {
    list(agent).await.into_iter().find(|m| m.name == name)
}

/// The mount `name` once it satisfies `wanted`, within `timeout`.
async fn mount_reaching(
    agent: &Agent,
    name: &str,
    what: &str,
    timeout: Duration,
    wanted: impl Fn(&proto::MountInfo) -> bool,
) -> proto::MountInfo {
    eventually(what, timeout, async || {
        mount_state(agent, name).await.filter(|m| wanted(m))
    })
    .await
}

/// Asserts that no file under the agent's logs dir or state dir holds a
/// secret, except the 0600 files in which the agent keeps API secrets by
/// design (`<state>/mounts/secrets/`).
fn assert_no_secret_in_files(agent: &Agent) {
    let kept = agent.state_dir.join("mounts/secrets");
    let mut dirs = vec![agent.path().join("logs"), agent.state_dir.clone()];
    let mut scanned = 0;
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.starts_with(&kept) {
                continue;
            }
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_default();
                assert_no_secret(
                    &path.display().to_string(),
                    &String::from_utf8_lossy(&bytes),
                );
                scanned += 1;
            }
        }
    }
    assert!(scanned > 0, "no files under the logs and state dirs");
}

/// Asserts that no form of the secrets is in `text`.
fn assert_no_secret(what: &str, text: &str) {
    for secret in [
        KEY,
        SAS,
        WRONG_SAS,
        "U0lHTkFUVVJFbmV2ZXJsb2dnZWQ",
        "V1JPTkdzaWduYXR1cmVuZXZlcmxvZ2dlZA",
    ] {
        assert!(
            !text.contains(secret),
            "a secret appears in {what}:\n{text}"
        );
    }
}

#[tokio::test]
async fn a_mount_appears_in_mountinfo_and_files_round_trip() {
    let site = Site::new();
    let agent = site.agent();
    std::fs::write(
        site.storage("data").join("from-storage.txt"),
        "hello from storage",
    )
    .unwrap();
    let info = mount_with_key(&agent, &site, "data").await;
    assert_eq!(info.state(), proto::MountState::Mounted);
    assert_eq!(info.auth_mode, "key");
    assert_eq!(info.origin, "api");
    assert!(info.pid > 0);
    let path = site.mnt("data");
    assert_eq!(
        mountinfo_at(&path),
        Some(("fuse".into(), "blobfuse2".into()))
    );

    // Files go both ways through the FUSE mount.
    assert_eq!(
        std::fs::read_to_string(path.join("from-storage.txt")).unwrap(),
        "hello from storage"
    );
    std::fs::create_dir(path.join("dir")).unwrap();
    std::fs::write(path.join("dir/from-mount.txt"), "hello from the mount").unwrap();
    assert_eq!(
        std::fs::read_to_string(site.storage("data").join("dir/from-mount.txt")).unwrap(),
        "hello from the mount"
    );

    // The rendered config is private and in the runtime dir; blobfuse2's
    // log goes under the logs dir.
    let config = agent.path().join("run/mounts/data.yaml");
    assert_eq!(
        std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(agent.path().join("logs/mounts/data.log").exists());

    // The CLI lists it, as a table and as JSON.
    let table = cli(&agent.socket, &["mounts", "list"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("data") && table.contains("mounted"),
        "{table}"
    );
    let json = cli(&agent.socket, &["--json", "mounts", "list"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json list");
    assert_eq!(json["mounts"][0]["state"], "MOUNT_STATE_MOUNTED");
    assert_no_secret("the agent log", &agent.log());
}

#[tokio::test]
async fn a_killed_blobfuse2_leaves_a_stale_mount_that_the_agent_repairs() {
    // Long enough to look at the stale mount before the agent repairs it.
    let mut site = Site::new();
    site.health_interval_seconds = 8;
    let agent = site.agent();
    std::fs::write(site.storage("data").join("f.txt"), "still here").unwrap();
    let mut events = AgentServiceClient::new(agent.channel().await)
        .watch_events(proto::WatchEventsRequest { since: None })
        .await
        .expect("watch")
        .into_inner();
    let info = mounts_client(&agent)
        .await
        .mount(request(&site, "data", Auth::SasToken(SAS.into())))
        .await
        .expect("mount")
        .into_inner();
    let path = site.mnt("data");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(info.pid as i32), Signal::SIGKILL).unwrap();
    // Once the process is gone (requests in flight at its death end with
    // ECONNABORTED), it is a real stale mount: still in mountinfo, and every
    // access fails with ENOTCONN.
    while !dead(info.pid) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The kernel may still be tearing the connection down (an access then
    // gets ECONNABORTED); once it has, every access gets ENOTCONN.
    let mut error = std::fs::read_dir(&path).expect_err("stale mount");
    let deadline = Instant::now() + Duration::from_secs(2);
    while error.raw_os_error() == Some(nix::libc::ECONNABORTED) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        error = std::fs::read_dir(&path).expect_err("stale mount");
    }
    assert_eq!(error.raw_os_error(), Some(nix::libc::ENOTCONN), "{error}");
    assert!(mountinfo_at(&path).is_some());

    // Health interval 8 s plus backoff 1 s: repaired well within 30 s.
    let repaired = mount_reaching(&agent, "data", "the repair", Duration::from_secs(30), |m| {
        m.state() == proto::MountState::Mounted && m.remount_count == 1
    })
    .await;
    assert_ne!(repaired.pid, info.pid);
    assert_eq!(
        std::fs::read_to_string(path.join("f.txt")).unwrap(),
        "still here"
    );

    // Every state change was an event.
    let mut seen = Vec::new();
    while seen.last() != Some(&proto::MountState::Mounted) || seen.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("event");
        if let Some(proto::event::Kind::Mount(m)) = event.kind {
            seen.push(m.mount.expect("mount info").state());
        }
    }
    assert_eq!(
        seen,
        [
            proto::MountState::Mounting,
            proto::MountState::Mounted,
            proto::MountState::Stale,
            proto::MountState::Remounting,
            proto::MountState::Mounted,
        ][..seen.len()]
    );
    assert_no_secret("the agent log", &agent.log());
}

#[tokio::test]
async fn a_hung_blobfuse2_times_out_the_health_check_without_blocking_the_agent() {
    let site = Site::new();
    let agent = site.agent();
    let info = mount_with_key(&agent, &site, "data").await;
    // A stopped daemon leaves every request to the mount hanging.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(info.pid as i32), Signal::SIGSTOP).unwrap();
    // The API keeps answering while a health check hangs in the kernel.
    let stale = mount_reaching(
        &agent,
        "data",
        "the stale state",
        Duration::from_secs(30),
        |m| m.state() == proto::MountState::Stale,
    )
    .await;
    assert!(
        stale.message.contains("did not answer within 2 s"),
        "{}",
        stale.message
    );
    let repaired = mount_reaching(&agent, "data", "the repair", Duration::from_secs(60), |m| {
        m.state() == proto::MountState::Mounted && m.remount_count == 1
    })
    .await;
    assert_ne!(repaired.pid, info.pid);
    assert!(dead(info.pid), "the hung blobfuse2 was killed");
    std::fs::write(site.mnt("data").join("after.txt"), "ok").unwrap();
}

#[tokio::test]
async fn a_restarted_agent_adopts_the_healthy_mount_without_remounting() {
    let site = Site::new();
    let mut agent = site.agent();
    let info = mount_with_key(&agent, &site, "data").await;
    let path = site.mnt("data");
    // Open a file through the mount: a remount would break it.
    std::fs::write(path.join("held.txt"), "held").unwrap();
    let held = std::fs::File::open(path.join("held.txt")).unwrap();

    agent.signal(Signal::SIGKILL);
    agent.child.wait().unwrap();
    assert!(
        site.standins().iter().any(|(pid, _)| *pid == info.pid),
        "blobfuse2 survives the agent"
    );
    site.restart(&mut agent);

    let adopted = mount_reaching(&agent, "data", "adoption", Duration::from_secs(20), |m| {
        m.state() == proto::MountState::Mounted
    })
    .await;
    assert_eq!(adopted.pid, info.pid, "the same blobfuse2 process");
    assert_eq!(adopted.remount_count, 0);
    assert!(adopted.message.contains("adopted"), "{}", adopted.message);
    let mut text = String::new();
    std::io::Read::read_to_string(&mut &held, &mut text).unwrap();
    assert_eq!(text, "held");
    // The new agent still watches it: a kill is repaired.
    kill_and_await_the_repair(&agent, info.pid).await;
    drop(held);
}

/// Kills the blobfuse2 of mount "data" and waits until the agent has
/// mounted it again (its first repair).
async fn kill_and_await_the_repair(agent: &Agent, pid: u32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL)
        .expect("kill blobfuse2");
    mount_reaching(agent, "data", "the repair", Duration::from_secs(30), |m| {
        m.state() == proto::MountState::Mounted && m.remount_count == 1
    })
    .await;
}

/// Whether a process is gone (or a zombie).
fn dead(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(") ")
                .is_none_or(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

#[tokio::test]
async fn unmount_with_a_file_held_open_is_lazy_and_the_open_file_keeps_working() {
    let site = Site::new();
    let agent = site.agent();
    let info = mount_with_key(&agent, &site, "data").await;
    let path = site.mnt("data");
    std::fs::write(path.join("open.txt"), "still readable").unwrap();
    let held = std::fs::File::open(path.join("open.txt")).unwrap();

    let reply = mounts_client(&agent)
        .await
        .unmount(proto::UnmountRequest {
            name: "data".into(),
        })
        .await
        .expect("unmount")
        .into_inner();
    assert_eq!(reply.state(), proto::MountState::Unmounted);
    assert!(
        reply.message.contains("lazily unmounted: busy")
            && reply
                .message
                .contains("keeps serving the open files and exits when the last one is closed"),
        "{}",
        reply.message
    );
    // Detached: gone from mountinfo, the mount dir is empty and the agent
    // has forgotten the mount.
    assert_eq!(mountinfo_at(&path), None);
    assert_eq!(
        std::fs::read_dir(&path).unwrap().count(),
        0,
        "mount dir left empty"
    );
    assert!(list(&agent).await.is_empty());
    assert!(!agent.path().join("run/mounts/data.yaml").exists());
    // What the reply says is true: the open file still reads.
    let mut text = String::new();
    std::io::Read::read_to_string(&mut &held, &mut text).expect("read the open file");
    assert_eq!(text, "still readable");
    assert!(!dead(info.pid), "blobfuse2 keeps serving");

    // Closing the last file ends it; the agent reaps it.
    drop(held);
    eventually("blobfuse2 to exit", Duration::from_secs(20), async || {
        (!Path::new(&format!("/proc/{}", info.pid)).exists()).then_some(())
    })
    .await;
    assert!(
        agent
            .log()
            .contains("the lazily unmounted blobfuse2 has exited"),
        "{}",
        agent.log()
    );

    // Without open files it is a clean unmount.
    mounts_client(&agent)
        .await
        .mount(request(&site, "data", Auth::AccountKey(KEY.into())))
        .await
        .expect("mount again");
    let out = cli(&agent.socket, &["mounts", "unmount", "data"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("unmounted at")
            && text.contains(": cleanly unmounted"),
        "{text}"
    );
}

/// A tmpfs mounted by the test; detached on drop, also when the test fails.
struct TmpfsGuard(std::path::PathBuf);

impl TmpfsGuard {
    fn mount(path: &Path) -> Self {
        nix::mount::mount(
            Some("instance-agent-test"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .expect("mount a tmpfs");
        Self(path.to_owned())
    }
}

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test]
async fn a_restarted_agent_leaves_another_programs_mount_at_the_path_alone() {
    let site = Site::new();
    let mut agent = site.agent();
    let info = mount_with_key(&agent, &site, "data").await;
    let path = site.mnt("data");
    // While the agent is down its blobfuse2 goes, and someone mounts
    // something else at the path.
    agent.signal(Signal::SIGKILL);
    agent.child.wait().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(info.pid as i32), Signal::SIGTERM).unwrap();
    eventually(
        "the stand-in to unmount",
        Duration::from_secs(10),
        async || mountinfo_at(&path).is_none().then_some(()),
    )
    .await;
    let _tmpfs = TmpfsGuard::mount(&path);
    std::fs::write(path.join("theirs.txt"), "not the agent's").unwrap();
    site.restart(&mut agent);

    // The first attempt and two retries after it (backing off 1 s, then
    // 2 s) each fail on the other mount, and nothing else happens to "data".
    let mut events = EventLog::since(&agent, 0).await;
    let failures = |seen: &[proto::Event]| {
        seen.iter()
            .filter_map(events::mount)
            .filter(|m| m.name == "data" && m.state() == proto::MountState::Failed)
            .count()
    };
    events
        .until_seen("three failed attempts", Duration::from_secs(30), |seen| {
            failures(seen) == 3
        })
        .await;
    let in_use = format!(
        "path {} is mounted by something else (tmpfs from instance-agent-test)",
        path.display()
    );
    let steps: Vec<(proto::MountState, String)> = events
        .seen()
        .iter()
        .filter_map(events::mount)
        .filter(|m| m.name == "data")
        .map(|m| (m.state(), m.message.clone()))
        .collect();
    let failed = |retry: u64| {
        (
            proto::MountState::Failed,
            format!("mount \"data\": {in_use}; retrying in {retry} s"),
        )
    };
    let mounting = (proto::MountState::Mounting, String::new());
    assert_eq!(
        steps,
        [
            mounting.clone(),
            failed(1),
            mounting.clone(),
            failed(2),
            mounting,
            failed(2)
        ],
        "{}",
        events.summary()
    );
    assert_eq!(
        mountinfo_at(&path),
        Some(("tmpfs".into(), "instance-agent-test".into()))
    );
    assert_eq!(
        std::fs::read_to_string(path.join("theirs.txt")).unwrap(),
        "not the agent's"
    );
}

#[tokio::test]
async fn paths_outside_the_roots_or_in_use_are_refused_clearly() {
    let site = Site::new();
    let agent = site.agent();
    let mut client = mounts_client(&agent).await;
    let key = || Auth::AccountKey(KEY.into());

    let mut outside = request(&site, "outside", key());
    outside.mount_path = "/var/tmp/instance-agent-test-outside".into();
    let err = client.mount(outside).await.expect_err("outside the roots");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("outside the allowed roots"),
        "{}",
        err.message()
    );

    let mut dotdot = request(&site, "dotdot", key());
    dotdot.mount_path = format!("{}/../../etc", site.mnt("x").display());
    let err = client.mount(dotdot).await.expect_err("dotdot");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains(".."), "{}", err.message());

    std::os::unix::fs::symlink("/var/tmp", site.mnt("link")).unwrap();
    let mut escape = request(&site, "escape", key());
    escape.mount_path = site.mnt("link/escape").display().to_string();
    let err = client.mount(escape).await.expect_err("symlink escape");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("resolves to /var/tmp/escape"),
        "{}",
        err.message()
    );

    // A path something else already mounted (a stand-in started by hand).
    let foreign = site.mnt("foreign");
    std::fs::create_dir(&foreign).unwrap();
    let config = site.path().join("foreign.yaml");
    std::fs::write(
        &config,
        "azstorage: {account-name: myacct, container: other, mode: msi}\n",
    )
    .unwrap();
    let mut child = Command::new(standin())
        .arg("mount")
        .arg(&foreign)
        .arg(format!("--config-file={}", config.display()))
        .env("STANDIN_STORAGE_ROOT", site.path().join("storage"))
        .spawn()
        .unwrap();
    let started = Instant::now();
    while mountinfo_at(&foreign).is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "foreign mount never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = client
        .mount(request(&site, "foreign", key()))
        .await
        .expect_err("in use");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(
        err.message()
            .contains("already mounted (fuse from blobfuse2)"),
        "{}",
        err.message()
    );
    let _ = child.kill();
    let _ = child.wait();

    // A managed mount's name and path.
    client
        .mount(request(&site, "data", key()))
        .await
        .expect("mount");
    let err = client
        .mount(request(&site, "data", key()))
        .await
        .expect_err("same name");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let mut same_path = request(&site, "data2", key());
    same_path.mount_path = site.mnt("data").display().to_string();
    let err = client.mount(same_path).await.expect_err("same path");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(err.message().contains("overlaps"), "{}", err.message());
}

#[tokio::test]
async fn blobfuse2_errors_reach_the_reply_and_the_condition_verbatim_and_scrubbed() {
    let site = Site::new();
    // The "container" accepts only the right SAS.
    std::fs::write(site.path().join("storage/data.credential"), SAS).unwrap();
    let key_file = site.path().join("data.key");
    std::fs::write(&key_file, KEY).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let declared = format!(
        "[[mounts.mount]]\nname = \"declared\"\naccount = \"myacct\"\ncontainer = \"data\"\n\
         mount_path = {:?}\nauth = \"key\"\nsecret_file = {:?}\n",
        site.mnt("declared"),
        key_file
    );
    let agent = site.agent_with(&declared);
    let mut client = mounts_client(&agent).await;

    let err = client
        .mount(request(&site, "wrong", Auth::SasToken(WRONG_SAS.into())))
        .await
        .expect_err("wrong SAS");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains(
            "blobfuse2 failed (exit status 1): Error: failed to authenticate azstorage credentials with error [GET https://myacct.blob.core.windows.net/data?restype=container&sv=2022-11-02&ss=b&sp=r&sig=***: 403 AuthenticationFailed"
        ),
        "{}",
        err.message()
    );
    assert!(
        list(&agent).await.iter().all(|m| m.name != "wrong"),
        "a failed request is forgotten"
    );

    // The declared mount (wrong credential for this container) fails and is retried;
    // the condition carries blobfuse2's message.
    let condition = eventually(
        "the failed condition",
        Duration::from_secs(20),
        async || {
            let status = AgentServiceClient::new(agent.channel().await)
                .get_status(proto::GetStatusRequest {})
                .await
                .ok()?
                .into_inner();
            status
                .conditions
                .into_iter()
                .find(|c| c.r#type == "mounts" && c.state() == proto::ConditionState::Failed)
        },
    )
    .await;
    assert!(
        condition
            .message
            .contains("declared failed: blobfuse2 failed (exit status 1): Error: failed to authenticate azstorage credentials"),
        "{}",
        condition.message
    );
    let status = cli(&agent.socket, &["status"]);
    assert_eq!(status.status.code(), Some(1));

    // Bad config: blobfuse2's own message for an empty container name cannot
    // happen (the agent checks it first) but an invalid one is refused by the agent.
    let mut bad = request(&site, "bad", Auth::SasToken(SAS.into()));
    bad.container = "Bad_Container".into();
    let err = client.mount(bad).await.expect_err("bad container");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("container"), "{}", err.message());

    // With the right SAS the same container mounts.
    client
        .mount(request(&site, "right", Auth::SasToken(SAS.into())))
        .await
        .expect("right SAS");
    assert_no_secret("the agent log", &agent.log());
    assert_no_secret("the condition", &condition.message);
    // The declared mount's failures quote the URL with its SAS-free key
    // mode, the wrong SAS's the URL with `sig=`: no file keeps either.
    assert_no_secret_in_files(&agent);
}

#[tokio::test]
async fn no_secret_appears_in_any_log_reply_event_or_the_store() {
    let site = Site::new();
    let agent = site.agent();
    let mut captured = String::new();
    let mut events = AgentServiceClient::new(agent.channel().await)
        .watch_events(proto::WatchEventsRequest { since: Some(0) })
        .await
        .expect("watch")
        .into_inner();
    let mut client = mounts_client(&agent).await;
    std::fs::write(site.path().join("storage/other.credential"), SAS).unwrap();
    let mut other = request(&site, "sas", Auth::SasToken(SAS.into()));
    other.container = "other".into();
    captured += &format!(
        "{:?}",
        client
            .mount(request(&site, "key", Auth::AccountKey(KEY.into())))
            .await
    );
    captured += &format!("{:?}", client.mount(other).await);
    let mut wrong = request(&site, "wrong", Auth::SasToken(WRONG_SAS.into()));
    wrong.container = "other".into();
    captured += &format!("{:?}", client.mount(wrong).await);
    let mut empty = request(&site, "empty", Auth::AccountKey(String::new()));
    empty.container = "data".into();
    captured += &format!("{:?}", client.mount(empty).await);
    captured += &format!(
        "{:?}",
        client.list_mounts(proto::ListMountsRequest {}).await
    );
    for args in [
        &["mounts", "list"][..],
        &["--json", "mounts", "list"],
        &["status"],
        &["--json", "status"],
    ] {
        let out = cli(&agent.socket, args);
        captured += &String::from_utf8_lossy(&out.stdout);
        captured += &String::from_utf8_lossy(&out.stderr);
    }
    // Mount and unmount through the CLI too, the key read from a file.
    let key_file = site.path().join("cli.key");
    std::fs::write(&key_file, KEY).unwrap();
    // The CLI refuses a key file that group or others can read.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mount_path = site.mnt("cli").display().to_string();
    for args in [
        &[
            "mounts",
            "mount",
            "cli",
            "--account",
            "myacct",
            "--container",
            "data",
            "--path",
            &mount_path,
            "--account-key-file",
            &key_file.display().to_string(),
        ][..],
        &["--json", "mounts", "unmount", "cli"],
        &["mounts", "unmount", "key"],
    ] {
        let out = cli(&agent.socket, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        captured += &String::from_utf8_lossy(&out.stdout);
        captured += &String::from_utf8_lossy(&out.stderr);
    }
    // Every event so far.
    while let Ok(Some(Ok(event))) =
        tokio::time::timeout(Duration::from_millis(500), events.next()).await
    {
        captured += &format!("{event:?}");
    }
    assert!(
        captured.contains("MOUNT_STATE_MOUNTED") || captured.contains("Mounted"),
        "{captured}"
    );
    assert!(
        captured.contains("sig=***"),
        "the wrong SAS's error is scrubbed, not lost: {captured}"
    );
    assert_no_secret("the replies and events", &captured);
    assert_no_secret("the agent log", &agent.log());
    assert_no_secret_in_files(&agent);
    assert!(
        !agent.path().join("logs/mounts/wrong.out").exists()
            && !agent.path().join("run/mounts/wrong.out").exists(),
        "a failed mount's raw output is removed with it"
    );
    // The one durable copy of an API secret is the 0600 file in the state dir.
    let secret = agent.state_dir.join("mounts/secrets/sas");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), SAS);
}

#[tokio::test]
async fn mounts_are_restored_after_a_reboot_from_config_and_from_the_store() {
    let site = Site::new();
    let key_file = site.path().join("declared.key");
    std::fs::write(&key_file, KEY).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let declared = format!(
        "[[mounts.mount]]\nname = \"declared\"\naccount = \"myacct\"\ncontainer = \"other\"\n\
         mount_path = {:?}\nauth = \"key\"\nsecret_file = {:?}\nread_only = true\n",
        site.mnt("declared"),
        key_file
    );
    let mut agent = site.agent_with(&declared);
    let declared_info = mount_reaching(
        &agent,
        "declared",
        "the declared mount",
        Duration::from_secs(20),
        |m| m.state() == proto::MountState::Mounted,
    )
    .await;
    assert_eq!(declared_info.origin, "config");
    assert!(declared_info.read_only);
    let err = std::fs::write(site.mnt("declared").join("x"), "x").expect_err("read-only");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS));
    mounts_client(&agent)
        .await
        .mount(request(&site, "api", Auth::SasToken(SAS.into())))
        .await
        .expect("mount");

    // "Reboot": the agent and every blobfuse2 die, the mounts go, the
    // runtime dir (a tmpfs) is emptied.
    agent.signal(Signal::SIGKILL);
    agent.child.wait().unwrap();
    let standins = Site::standins(&site);
    for (pid, _) in &standins {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    eventually(
        "the stand-ins to die",
        Duration::from_secs(10),
        async || standins.iter().all(|(pid, _)| dead(*pid)).then_some(()),
    )
    .await;
    for mount in mounts_below(&site.path()) {
        Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&mount)
            .status()
            .unwrap();
    }
    std::fs::remove_dir_all(agent.path().join("run")).unwrap();
    site.restart(&mut agent);

    for name in ["declared", "api"] {
        mount_reaching(&agent, name, name, Duration::from_secs(20), |m| {
            m.state() == proto::MountState::Mounted
        })
        .await;
        assert!(
            mountinfo_at(&site.mnt(name)).is_some(),
            "{name} mounted again"
        );
    }
    assert_no_secret("the agent log", &agent.log());
}

#[tokio::test]
async fn metrics_show_each_mounts_state_and_repairs_and_forget_an_unmounted_one() {
    use common::{sample, scrape_until};
    let site = Site::new();
    let port = common::free_port();
    let agent = site.agent_with(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    let info = mount_with_key(&agent, &site, "data").await;
    let mounted = "instance_agent_mount_state{mount=\"data\",state=\"mounted\"}";
    let remounts = "instance_agent_mount_remounts_total{mount=\"data\"}";
    let text = scrape_until(port, mounted, 1.0).await;
    assert_eq!(sample(&text, mounted), Some(1.0), "{text}");
    let states = common::sum_of(&text, "instance_agent_mount_state{mount=\"data\",");
    assert_eq!(states, 1.0, "exactly one current state: {text}");
    assert_eq!(sample(&text, remounts), Some(0.0), "{text}");

    // A repair: counted once.
    kill_and_await_the_repair(&agent, info.pid).await;
    let text = scrape_until(port, remounts, 1.0).await;
    assert_eq!(sample(&text, remounts), Some(1.0), "{text}");
    assert_eq!(sample(&text, mounted), Some(1.0), "{text}");

    // Unmounted: the mount is gone, and so is its state.
    mounts_client(&agent)
        .await
        .unmount(proto::UnmountRequest {
            name: "data".into(),
        })
        .await
        .expect("unmount");
    let (_, text) = common::http_get(port, "/metrics");
    assert!(
        !text.contains("instance_agent_mount_state{mount=\"data\""),
        "{text}"
    );
    assert_eq!(sample(&text, remounts), Some(1.0), "{text}");
}

/// The reasons the disk guard watches `path` for, from GetDiskUsage.
async fn disk_reasons(agent: &Agent, path: &Path) -> Vec<String> {
    let usage = DiskServiceClient::new(agent.channel().await)
        .get_disk_usage(proto::GetDiskUsageRequest {})
        .await
        .expect("disk usage")
        .into_inner();
    let wanted = path.display().to_string();
    usage
        .filesystems
        .iter()
        .flat_map(|fs| fs.paths.iter().map(|p| (&p.path, &p.reasons)))
        .chain(usage.skipped.iter().map(|s| (&s.path, &s.reasons)))
        .filter(|(p, _)| **p == wanted)
        .flat_map(|(_, reasons)| reasons.clone())
        .collect()
}

#[tokio::test]
async fn the_disk_guard_watches_a_mounts_cache_dir_until_it_is_unmounted() {
    let site = Site::new();
    let agent = site.agent();
    let info = mount_with_key(&agent, &site, "data").await;
    let cache = Path::new(&info.cache_dir).to_owned();
    assert_eq!(cache, site.path().join("cache/data"));
    eventually(
        "the cache dir watched",
        Duration::from_secs(20),
        async || {
            disk_reasons(&agent, &cache)
                .await
                .contains(&"cache of mount data".to_owned())
                .then_some(())
        },
    )
    .await;
    mounts_client(&agent)
        .await
        .unmount(proto::UnmountRequest {
            name: "data".into(),
        })
        .await
        .expect("unmount");
    eventually(
        "the cache dir unwatched",
        Duration::from_secs(20),
        async || disk_reasons(&agent, &cache).await.is_empty().then_some(()),
    )
    .await;
}

#[tokio::test]
async fn a_cache_dir_holding_user_files_is_refused_and_kept() {
    let site = Site::new();
    let agent = site.agent();
    let notebooks = site.mnt("notebooks");
    std::fs::create_dir(&notebooks).unwrap();
    std::fs::write(notebooks.join("thesis.ipynb"), "years of work").unwrap();
    let mut req = request(&site, "data", Auth::AccountKey(KEY.into()));
    req.cache_dir = notebooks.display().to_string();
    let err = mounts_client(&agent)
        .await
        .mount(req)
        .await
        .expect_err("a user's dir as cache_dir");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains(&format!(
            "cache_dir: {} exists, is not empty and is not an agent cache dir",
            notebooks.display()
        )),
        "{}",
        err.message()
    );
    assert_eq!(
        std::fs::read_to_string(notebooks.join("thesis.ipynb")).unwrap(),
        "years of work"
    );
    assert_eq!(std::fs::read_dir(&notebooks).unwrap().count(), 1);
    assert!(list(&agent).await.is_empty());
    assert_eq!(mountinfo_at(&site.mnt("data")), None);
}

#[tokio::test]
async fn a_non_empty_mount_dir_fails_with_blobfuse2s_own_error() {
    // The agent does not check this itself: blobfuse2 (here the stand-in)
    // refuses, and its message reaches the reply verbatim.
    let site = Site::new();
    let agent = site.agent();
    let path = site.mnt("data");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("already-here.txt"), "x").unwrap();
    let err = mounts_client(&agent)
        .await
        .mount(request(&site, "data", Auth::AccountKey(KEY.into())))
        .await
        .expect_err("non-empty mount dir");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .ends_with("blobfuse2 failed (exit status 1): Error: mount directory is not empty"),
        "{}",
        err.message()
    );
    assert!(path.join("already-here.txt").exists());
    assert!(list(&agent).await.is_empty());
}

/// Runs the stand-in on `config` (YAML) and a mount dir; returns its exit
/// code and stderr.
fn run_standin(site: &Site, config: &str, mount_dir: &Path) -> (Option<i32>, String) {
    let file = site.path().join("standin.yaml");
    std::fs::write(&file, config).expect("write the config");
    let out = Command::new(standin())
        .arg("mount")
        .arg(mount_dir)
        .arg(format!("--config-file={}", file.display()))
        .args(["--foreground", "--disable-version-check=true"])
        .env("STANDIN_STORAGE_ROOT", site.path().join("storage"))
        .stdin(Stdio::null())
        .output()
        .expect("run the stand-in");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

#[test]
fn the_standin_fails_like_blobfuse2_on_bad_config() {
    let site = Site::new();
    let dir = site.mnt("bad");
    std::fs::create_dir(&dir).unwrap();
    let cases = [
        ("azstorage: [unclosed", "Error: invalid config file ["),
        (
            "azstorage: {container: data, mode: key, account-key: k}",
            "Error: account name not provided",
        ),
        (
            "azstorage: {account-name: myacct, mode: key, account-key: k}",
            "Error: container name not provided",
        ),
        (
            "azstorage: {account-name: myacct, container: data, mode: key}",
            "Error: storage key not provided",
        ),
        (
            "azstorage: {account-name: myacct, container: data, mode: sas}",
            "Error: SAS key not provided",
        ),
        (
            "azstorage: {account-name: myacct, container: data, mode: spn}",
            "Error: invalid auth mode",
        ),
    ];
    for (config, error) in cases {
        let (code, stderr) = run_standin(&site, config, &dir);
        assert_eq!(code, Some(1), "{config}: {stderr}");
        assert!(stderr.starts_with(error), "{config}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert_eq!(mountinfo_at(&dir), None);
    }
    std::fs::write(dir.join("file"), "x").unwrap();
    let (code, stderr) = run_standin(
        &site,
        "azstorage: {account-name: myacct, container: data, mode: msi}",
        &dir,
    );
    assert_eq!(code, Some(1));
    assert_eq!(stderr, "Error: mount directory is not empty");
    let (code, stderr) = run_standin(
        &site,
        "azstorage: {account-name: myacct, container: data, mode: msi}",
        &site.mnt("missing"),
    );
    assert_eq!(code, Some(1));
    assert_eq!(stderr, "Error: mount directory does not exist");
    assert_eq!(mountinfo_at(&dir), None);
}

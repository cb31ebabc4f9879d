//! A mount belongs to its owner (issue 13), against the real binary, the
//! blobfuse2 stand-in (a real FUSE mount) and real Docker jobs: blobfuse2
//! runs as the mount's owner with `allow-root` and without `allow-other`,
//! so the owner reads and writes, root and jobs do too, `ls -l` shows the
//! owner, and any other local user gets EACCES; after a restart, a FUSE
//! process of the owner's that has blobfuse2's command line and mount but
//! another program is never adopted.
//!
//! Test users are made with `useradd` and removed on drop (also when a test
//! fails), after the agent and the site that run processes as them.
#![cfg(feature = "test-util")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::Agent;
use common::fuse_site::Site;
use common::users::TestUser;
use instance_agent::api::proto::{
    self, job_service_client::JobServiceClient, mount_request::Auth,
    mount_service_client::MountServiceClient,
};
use nix::sys::signal::Signal;

const KEY: &str = "T1dORVJLRVktbmV2ZXItaW4tYW55LWxvZy0wMTIzNDU2Nzg5";

/// Runs `script` with `sh -c` as `user` (its uid and gid, no other groups).
fn as_user(user: &TestUser, script: &str) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .args(["--clear-groups", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("setpriv")
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}, stdout {:?}, stderr {:?}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The site and an agent whose dirs the owner's blobfuse2 can traverse
/// (temp dirs are 0700), the storage the owner's.
fn site_and_agent(owner: &TestUser) -> (Site, Agent) {
    let site = Site::new();
    std::fs::set_permissions(site.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for dir in [site.storage("data"), site.path().join("storage")] {
        owner.own(&dir);
    }
    std::fs::write(site.storage("data").join("from-storage.txt"), "stored").expect("storage");
    owner.own(&site.storage("data").join("from-storage.txt"));
    let agent = site.agent();
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod");
    (site, agent)
}

async fn mount_owned_by(agent: &Agent, site: &Site, owner: &TestUser) -> proto::MountInfo {
    common::register_secrets(&[KEY]);
    MountServiceClient::new(agent.channel().await)
        .mount(proto::MountRequest {
            name: "data".into(),
            account: "myacct".into(),
            container: "data".into(),
            mount_path: site.mnt("data").display().to_string(),
            auth: Some(Auth::AccountKey(KEY.into())),
            owner_uid: Some(owner.uid),
            ..Default::default()
        })
        .await
        .expect("mount")
        .into_inner()
}

async fn mount_info(agent: &Agent) -> Option<proto::MountInfo> {
    MountServiceClient::new(agent.channel().await)
        .list_mounts(proto::ListMountsRequest {})
        .await
        .ok()?
        .into_inner()
        .mounts
        .into_iter()
        .find(|m| m.name == "data")
}

/// The real uid of a process.
fn uid_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn standin_args(mount_path: &Path, config: &Path) -> Vec<String> {
    vec![
        "mount".into(),
        mount_path.display().to_string(),
        format!("--config-file={}", config.display()),
        "--foreground".into(),
        "--disable-version-check=true".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_mount_is_theirs_roots_and_jobs_and_no_one_elses() {
    let owner = TestUser::create("iamo");
    let stranger = TestUser::create("iamx");
    let (site, agent) = site_and_agent(&owner);
    let info = mount_owned_by(&agent, &site, &owner).await;
    assert_eq!(info.state(), proto::MountState::Mounted, "{}", info.message);
    assert_eq!((info.owner_uid, info.owner_gid), (owner.uid, owner.gid));
    assert_eq!(
        uid_of(info.pid),
        Some(owner.uid),
        "blobfuse2 runs as the owner"
    );
    let path = site.mnt("data");

    // `ls -l` shows the owner, with mounts.default_permission (0750).
    let listing = common::run_ok(Command::new("ls").arg("-ld").arg(&path));
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(listing.starts_with("drwxr-x---"), "{listing}");
    assert!(
        listing.contains(&format!(" {} {} ", owner.name, owner.name)),
        "{listing}"
    );
    let listing = common::run_ok(Command::new("ls").arg("-l").arg(&path));
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let file = listing
        .lines()
        .find(|l| l.ends_with("from-storage.txt"))
        .unwrap_or_default();
    assert!(file.starts_with("-rwxr-x---"), "{listing}");
    assert!(
        file.contains(&format!(" {} {} ", owner.name, owner.name)),
        "{listing}"
    );

    // The owner reads and writes.
    let p = path.display();
    let by_owner = as_user(
        &owner,
        &format!(
            "cat {p}/from-storage.txt && echo mine > {p}/from-owner.txt && cat {p}/from-owner.txt"
        ),
    );
    assert!(by_owner.status.success(), "owner: {}", text(&by_owner));
    assert_eq!(String::from_utf8_lossy(&by_owner.stdout), "storedmine\n");

    // Any other local user gets EACCES: listing, reading, writing.
    for (what, script) in [
        ("list", format!("ls {p}")),
        ("read", format!("cat {p}/from-storage.txt")),
        ("write", format!("echo theirs > {p}/from-stranger.txt")),
        ("stat", format!("stat {p}/from-owner.txt")),
    ] {
        let out = as_user(&stranger, &script);
        assert!(
            !out.status.success(),
            "a stranger could {what}: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "a stranger's {what} must fail with EACCES: {}",
            text(&out)
        );
    }
    assert!(!site.storage("data").join("from-stranger.txt").exists());

    // Root reads (allow-root).
    assert_eq!(
        std::fs::read_to_string(path.join("from-owner.txt")).expect("root reads"),
        "mine\n"
    );

    // A job (real Docker, root in the container) reads and writes.
    let mut jobs = JobServiceClient::new(agent.channel().await);
    jobs.submit_job(proto::SubmitJobRequest {
        spec: Some(proto::JobSpec {
            id: "owned-mount".into(),
            image: "instance-agent/busybox:test".into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "cat /data/from-owner.txt && echo from-job > /data/from-job.txt".into(),
            ],
            mounts: vec![proto::JobMount {
                source: Some(proto::job_mount::Source::Managed("data".into())),
                container_path: "/data".into(),
                read_only: false,
            }],
            ..Default::default()
        }),
    })
    .await
    .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let job = jobs
            .get_job(proto::GetJobRequest {
                id: "owned-mount".into(),
            })
            .await
            .expect("get")
            .into_inner();
        if common::is_final(job.state()) {
            break job;
        }
        assert!(Instant::now() < deadline, "the job did not finish: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job.state(), proto::JobState::Succeeded, "{job:?}");
    let by_owner = as_user(&owner, &format!("cat {p}/from-job.txt"));
    assert_eq!(
        String::from_utf8_lossy(&by_owner.stdout),
        "from-job\n",
        "{}",
        text(&by_owner)
    );
    // What the job wrote is the owner's in the storage too (blobfuse2 ran as them).
    let written = std::fs::metadata(site.storage("data").join("from-job.txt")).expect("stored");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&written), owner.uid);
}

/// A process of the owner's, stopped (and its mount taken off) on drop.
struct Impostor(Child);

impl Drop for Impostor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_look_alike_fuse_process_of_the_owners_is_never_adopted() {
    let owner = TestUser::create("iami");
    let (site, mut agent) = site_and_agent(&owner);
    let info = mount_owned_by(&agent, &site, &owner).await;
    assert_eq!(info.state(), proto::MountState::Mounted, "{}", info.message);
    let run = agent.dir.path().join("run");
    let staged = run.join("staging/mounts/data.mnt");
    let config = run.join("mounts/data.yaml");
    assert!(staged.is_dir() && config.is_file());

    // The agent dies, then its blobfuse2; the owner takes the stale entry
    // (hers) with her own FUSE program: blobfuse2's command line exactly,
    // her uid, the agent's config, serving storage of her choosing.
    agent.signal(Signal::SIGKILL);
    agent.child.wait().expect("agent gone");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(info.pid as i32), Signal::SIGKILL)
        .expect("kill blobfuse2");
    common::run_ok(Command::new("fusermount3").arg("-u").arg("-z").arg(&staged));
    let own = site.path().join("impostor");
    let evil = own.join("storage/data");
    std::fs::create_dir_all(&evil).expect("dirs");
    std::fs::write(evil.join("evil.txt"), "not the share").expect("evil");
    let program = own.join("blobfuse2-standin");
    std::fs::copy(common::fuse_site::standin(), &program).expect("copy");
    for p in [
        &own,
        &own.join("storage"),
        &evil,
        &evil.join("evil.txt"),
        &program,
    ] {
        owner.own(p);
    }
    let impostor = Impostor(
        Command::new("setpriv")
            .arg(format!("--reuid={}", owner.uid))
            .arg(format!("--regid={}", owner.gid))
            .arg("--clear-groups")
            .arg(&program)
            .args(standin_args(&staged, &config))
            .env("STANDIN_STORAGE_ROOT", own.join("storage"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("impostor"),
    );
    let impostor_pid = impostor.0.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !staged.join("evil.txt").exists() {
        assert!(Instant::now() < deadline, "the impostor did not mount");
        std::thread::sleep(Duration::from_millis(50));
    }

    site.restart(&mut agent);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mounted = loop {
        if let Some(m) = mount_info(&agent).await
            && m.state() == proto::MountState::Mounted
        {
            break m;
        }
        assert!(Instant::now() < deadline, "not mounted again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(
        mounted.pid, impostor_pid,
        "the impostor was adopted: {mounted:?}"
    );
    assert!(!mounted.message.contains("adopted"), "{}", mounted.message);
    assert_eq!(uid_of(mounted.pid), Some(owner.uid));
    let path = site.mnt("data");
    assert!(
        path.join("from-storage.txt").exists(),
        "the share is served"
    );
    assert!(
        !path.join("evil.txt").exists(),
        "the impostor's storage is served"
    );
}

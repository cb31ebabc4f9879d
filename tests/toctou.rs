//! Attacks on the root agent's use of paths a user can change (issue 13):
//! a racing swapper (a thread exchanging a real directory and a symlink with
//! `renameat2(RENAME_EXCHANGE)` in a loop) against the real binary's job
//! binds (real Docker jobs that check what they see), mount paths (the
//! blobfuse2 stand-in; never mounted over the link's target) and cache
//! emptying (never a delete outside the cache), plus a mount restored after
//! a restart onto a path swapped meanwhile, and an empty directory of a
//! user's offered as a cache dir.
//!
//! The swapper runs as root in the test: it stands for the user who owns
//! the directory (the agent only sees that a user other than root can
//! change the path). Symlink targets are dirs of the test's own (or `/` for
//! a read-only job bind), never a system directory: a failure of the agent
//! would otherwise mount over, or delete from, the shared test machine.
//! Each racing test runs for `IA_TOCTOU_SECONDS` (default 60) and prints its
//! attempts.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Agent;
use common::users::TestUser;
use instance_agent::api::proto::{self, job_service_client::JobServiceClient};

const IMAGE: &str = "instance-agent/busybox:test";

/// How long each racing test races.
fn budget() -> Duration {
    let seconds = std::env::var("IA_TOCTOU_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(seconds)
}

/// A thread exchanging pairs of names in one directory as fast as it can;
/// stopped (and joined) on drop.
struct Swapper {
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Swapper {
    fn start(dir: &Path, pairs: Vec<(OsString, OsString)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let dir = rustix::fs::open(
            dir,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .expect("open the swapped dir");
        let (stop_flag, count) = (stop.clone(), swaps.clone());
        let thread = std::thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                for (a, b) in &pairs {
                    if rustix::fs::renameat_with(
                        &dir,
                        a,
                        &dir,
                        b,
                        rustix::fs::RenameFlags::EXCHANGE,
                    )
                    .is_ok()
                    {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Self {
            stop,
            swaps,
            thread: Some(thread),
        }
    }

    /// Stops it; returns how many exchanges it made.
    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.swaps.load(Ordering::Relaxed)
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Puts the real directory back at `name` (the symlink at `other`).
fn settle(dir: &Path, name: &str, other: &str) {
    if dir
        .join(name)
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            dir.join(name),
            rustix::fs::CWD,
            dir.join(other),
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .expect("swap back");
    }
}

fn canonical_tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().canonicalize().expect("canonical");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    (dir, path)
}

fn os(name: &str) -> OsString {
    OsString::from(name)
}

// --- job binds -------------------------------------------------------------

/// What the job's command finds in /data: the marker of the real dir, and
/// never the host's root.
const CHECK: &str = "if [ -e /data/etc/passwd ] || [ -e /data/proc/self ]; then echo HOST-ROOT; exit 3; fi; \
                     [ -f /data/marker ] || { echo NO-MARKER; ls /data; exit 4; }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_job_bind_never_reaches_the_host_root() {
    let user = TestUser::create("iatj");
    let (_root, root) = canonical_tempdir();
    let home = root.join("home");
    let data = home.join("data");
    std::fs::create_dir_all(&data).expect("dirs");
    std::fs::write(data.join("marker"), b"the real dir").expect("marker");
    std::os::unix::fs::symlink("/", home.join("decoy")).expect("decoy");
    for path in [&home, &data, &home.join("decoy")] {
        user.own(path);
    }
    let agent = Agent::builder()
        .config(&format!(
            "[jobs]\nslots = 4\nkill_grace_seconds = 1\nallowed_host_roots = [{:?}]\n",
            root.display().to_string()
        ))
        .start();
    let mut jobs = JobServiceClient::new(agent.channel().await);
    let spec = |id: &str| proto::JobSpec {
        id: id.into(),
        image: IMAGE.into(),
        command: vec!["sh".into(), "-c".into(), CHECK.into()],
        mounts: vec![proto::JobMount {
            source: Some(proto::job_mount::Source::HostPath(
                data.display().to_string(),
            )),
            container_path: "/data".into(),
            read_only: true,
        }],
        ..Default::default()
    };

    let mut swapper = Swapper::start(&home, vec![(os("data"), os("decoy"))]);
    let started = Instant::now();
    let (mut submitted, mut refused_at_submit, mut next) = (0u32, 0u32, 0u32);
    let mut in_flight: Vec<String> = Vec::new();
    let mut finished: Vec<proto::Job> = Vec::new();
    while started.elapsed() < budget() || !in_flight.is_empty() {
        if started.elapsed() >= budget() && swapper.thread.is_some() {
            swapper.stop();
            // Jobs waiting for the path to lead under the root again can go.
            settle(&home, "data", "decoy");
        }
        while started.elapsed() < budget() && in_flight.len() < 8 {
            next += 1;
            let id = format!("race-{next}");
            match jobs
                .submit_job(proto::SubmitJobRequest {
                    spec: Some(spec(&id)),
                })
                .await
            {
                Ok(_) => {
                    submitted += 1;
                    in_flight.push(id);
                }
                // The path led to the decoy at submit: refused, as it must be.
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    refused_at_submit += 1
                }
                Err(status) => panic!("submit: {status:?}"),
            }
        }
        let mut still = Vec::new();
        for id in in_flight.drain(..) {
            let job = jobs
                .get_job(proto::GetJobRequest { id: id.clone() })
                .await
                .expect("get")
                .into_inner();
            if common::is_final(job.state()) {
                finished.push(job);
            } else {
                still.push(id);
            }
        }
        in_flight = still;
        assert!(
            started.elapsed() < budget() + Duration::from_secs(120),
            "jobs did not finish: {in_flight:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let swaps = swapper.stop();
    let wrong: Vec<&proto::Job> = finished
        .iter()
        .filter(|j| j.state() != proto::JobState::Succeeded)
        .collect();
    println!(
        "job binds: {} jobs ran in {:.0?} ({submitted} submitted, {refused_at_submit} refused at submit), {swaps} swaps, {} saw the wrong tree",
        finished.len(),
        started.elapsed(),
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "jobs saw something other than the real dir: {:?}",
        wrong
            .iter()
            .map(|j| (&j.id, j.exit_code, &j.reason))
            .collect::<Vec<_>>()
    );
    assert!(!finished.is_empty(), "no job ran");
}

// --- mounts ----------------------------------------------------------------

#[cfg(feature = "test-util")]
mod mounts {
    use super::*;
    use common::fuse_site::Site;
    use instance_agent::api::proto::{
        mount_request::Auth, mount_service_client::MountServiceClient,
    };

    const KEY: &str = "QUNDT1VOVEtFWS1uZXZlci1pbi1hbnktbG9nLTAxMjM0NTY3ODk=";

    /// Whether anything is mounted exactly at `path` (this process's view,
    /// which is the agent's: same namespace).
    fn mounted_at(path: &Path) -> bool {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let wanted = path.display().to_string().replace(' ', "\\040");
        text.lines()
            .any(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
    }

    /// A thread looking at mountinfo every few milliseconds for a mount at
    /// `path`, for as long as it lives: a mount the agent makes and takes
    /// off again between two looks of the test is seen too.
    struct MountWatch {
        stop: Arc<AtomicBool>,
        seen: Arc<AtomicU64>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl MountWatch {
        fn start(path: &Path) -> Self {
            let (stop, seen) = (
                Arc::new(AtomicBool::new(false)),
                Arc::new(AtomicU64::new(0)),
            );
            let (stop_flag, count, path) = (stop.clone(), seen.clone(), path.to_owned());
            let thread = std::thread::spawn(move || {
                while !stop_flag.load(Ordering::Relaxed) {
                    if mounted_at(&path) {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            Self {
                stop,
                seen,
                thread: Some(thread),
            }
        }

        /// How many looks found something mounted there so far.
        fn seen(&self) -> u64 {
            self.seen.load(Ordering::Relaxed)
        }
    }

    impl Drop for MountWatch {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    fn request(name: &str, mount_path: &Path, cache_dir: Option<&Path>) -> proto::MountRequest {
        common::register_secrets(&[KEY]);
        proto::MountRequest {
            name: name.into(),
            account: "myacct".into(),
            container: "data".into(),
            mount_path: mount_path.display().to_string(),
            cache_dir: cache_dir
                .map(|c| c.display().to_string())
                .unwrap_or_default(),
            auth: Some(Auth::AccountKey(KEY.into())),
            ..Default::default()
        }
    }

    /// A user's dir below the site's allowed root: `<mnt>/alice` with the
    /// real `data` dir and `decoy`, a symlink to `victim` (outside the
    /// allowed roots, root's, empty).
    struct Layout {
        home: PathBuf,
        data: PathBuf,
        victim: PathBuf,
    }

    fn layout(site: &Site, user: &TestUser) -> Layout {
        let home = site.mnt("alice");
        let data = home.join("data");
        let victim = site.path().join("victim");
        std::fs::create_dir_all(&data).expect("dirs");
        std::fs::create_dir_all(&victim).expect("victim");
        std::os::unix::fs::symlink(&victim, home.join("decoy")).expect("decoy");
        for path in [&home, &data, &home.join("decoy")] {
            user.own(path);
        }
        Layout { home, data, victim }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_swapped_mount_dir_is_never_mounted_over_the_link_target() {
        let user = TestUser::create("iatm");
        let site = Site::new();
        let l = layout(&site, &user);
        let agent = site.agent();
        let mut mounts = MountServiceClient::new(agent.channel().await);
        let watch = MountWatch::start(&l.victim);
        let mut swapper = Swapper::start(&l.home, vec![(os("data"), os("decoy"))]);
        let started = Instant::now();
        let (mut cycles, mut mounted, mut refused) = (0u32, 0u32, 0u32);
        while started.elapsed() < budget() {
            cycles += 1;
            match mounts.mount(request("race", &l.data, None)).await {
                Ok(_) => {
                    mounted += 1;
                    assert!(
                        !mounted_at(&l.victim),
                        "cycle {cycles}: mounted over the symlink's target"
                    );
                    mounts
                        .unmount(proto::UnmountRequest {
                            name: "race".into(),
                        })
                        .await
                        .expect("unmount");
                }
                // The path led to the victim when it was looked at: refused.
                Err(status) => {
                    refused += 1;
                    assert_ne!(status.code(), tonic::Code::Internal, "{status:?}");
                }
            }
            assert_eq!(
                watch.seen(),
                0,
                "cycle {cycles}: something was mounted over the symlink's target"
            );
        }
        let swaps = swapper.stop();
        println!(
            "mount paths: {cycles} mount attempts in {:.0?} ({mounted} mounted, {refused} refused), {swaps} swaps",
            started.elapsed()
        );
        assert!(mounted > 0, "no attempt mounted");
        assert!(!mounted_at(&l.victim));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_racing_swapper_never_redirects_a_cache_emptying() {
        let site = Site::new();
        let victim = site.path().join("victim");
        std::fs::create_dir_all(&victim).expect("victim");
        const PAIRS: usize = 32;
        let canaries: Vec<PathBuf> = (0..PAIRS)
            .map(|i| victim.join(format!("canary-{i}")))
            .collect();
        for canary in &canaries {
            std::fs::write(canary, b"must survive").expect("canary");
        }
        let agent = site.agent();
        let mut mounts = MountServiceClient::new(agent.channel().await);
        let cache = site.path().join("cache").join("race");
        let started = Instant::now();
        let (mut cycles, mut swaps) = (0u32, 0u64);
        while started.elapsed() < budget() {
            cycles += 1;
            mounts
                .mount(request("race", &site.mnt("race"), None))
                .await
                .expect("mount");
            // What a writer of the cache (blobfuse2 as the mount's owner, say)
            // can do: directories with files, each swapped with a symlink to
            // the victim while the agent empties the cache.
            let dir = cache.join("blobfuse2");
            let mut pairs = Vec::new();
            for i in 0..PAIRS {
                let real = dir.join(format!("d{i}"));
                std::fs::create_dir_all(real.join("sub")).expect("cache dirs");
                std::fs::write(real.join(format!("canary-{i}")), b"cache file").expect("file");
                std::fs::write(real.join("sub/f"), b"cache file").expect("file");
                std::os::unix::fs::symlink(&victim, dir.join(format!("l{i}"))).expect("link");
                pairs.push((os(&format!("d{i}")), os(&format!("l{i}"))));
            }
            let mut swapper = Swapper::start(&dir, pairs);
            mounts
                .unmount(proto::UnmountRequest {
                    name: "race".into(),
                })
                .await
                .expect("unmount");
            swaps += swapper.stop();
            let lost: Vec<&PathBuf> = canaries.iter().filter(|c| !c.exists()).collect();
            assert!(
                lost.is_empty(),
                "cycle {cycles}: the emptying deleted outside the cache: {lost:?}"
            );
            let _ = std::fs::remove_dir_all(&cache);
        }
        println!(
            "cache emptying: {cycles} emptyings of {PAIRS} racing pairs each ({} racing removals) in {:.0?}, {swaps} swaps",
            cycles as usize * PAIRS,
            started.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restored_mount_is_checked_again_before_it_is_mounted() {
        let user = TestUser::create("iatr");
        let site = Site::new();
        let l = layout(&site, &user);
        let mut agent = site.agent();
        MountServiceClient::new(agent.channel().await)
            .mount(request("kept", &l.data, None))
            .await
            .expect("mount");
        // The agent dies, so does blobfuse2 and its mount; the user swaps her
        // dir for the link before the agent comes back.
        agent.signal(nix::sys::signal::Signal::SIGKILL);
        agent.wait_exit(Duration::from_secs(10));
        for (pid, _) in site.standins() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for mount in common::fuse_site::mounts_below(&site.path()) {
            let _ = std::process::Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&mount)
                .status();
        }
        for mount in common::fuse_site::mounts_below(&agent.path().join("run")) {
            let _ = std::process::Command::new("umount")
                .args(["-l"])
                .arg(&mount)
                .status();
        }
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &l.data,
            rustix::fs::CWD,
            l.home.join("decoy"),
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .expect("swap");
        let watch = MountWatch::start(&l.victim);
        agent.respawn();
        let mut mounts = MountServiceClient::new(agent.channel().await);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            let kept = listed(&mut mounts, "kept").await;
            if let Some(m) = &kept
                && matches!(
                    m.state(),
                    proto::MountState::Failed | proto::MountState::Mounted
                )
            {
                break kept.expect("kept");
            }
            assert_eq!(
                watch.seen(),
                0,
                "the restored mount went over the symlink's target: {kept:?}"
            );
            assert!(
                Instant::now() < deadline,
                "the restored mount never settled: {kept:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            watch.seen(),
            0,
            "the restored mount went over the symlink's target: {status:?}"
        );
        // Refused, naming where the recorded path leads now.
        assert_eq!(status.state(), proto::MountState::Failed, "{status:?}");
        assert!(
            status.message.contains(&l.victim.display().to_string()),
            "{status:?}"
        );
    }

    /// The managed mount `name` as `ListMounts` shows it.
    async fn listed(
        mounts: &mut MountServiceClient<tonic::transport::Channel>,
        name: &str,
    ) -> Option<proto::MountInfo> {
        mounts
            .list_mounts(proto::ListMountsRequest {})
            .await
            .expect("list")
            .into_inner()
            .mounts
            .into_iter()
            .find(|m| m.name == name)
    }

    /// Mount entries exactly at `path`.
    fn mounts_at(path: &Path) -> usize {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let wanted = path.display().to_string().replace(' ', "\\040");
        text.lines()
            .filter(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
            .count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_staged_mount_serves_the_users_path_and_is_repaired_without_a_dead_bind() {
        let user = TestUser::create("iats");
        let site = Site::new();
        let l = layout(&site, &user);
        std::fs::write(site.storage("data").join("hello"), b"from storage").expect("blob");
        let agent = site.agent();
        let mut mounts = MountServiceClient::new(agent.channel().await);
        let info = mounts
            .mount(request("staged", &l.data, None))
            .await
            .expect("mount")
            .into_inner();
        assert_eq!(info.mount_path, l.data.display().to_string());
        let staged = agent.path().join("run/staging/mounts/staged.mnt");
        assert_eq!(
            std::fs::read(l.data.join("hello")).expect("read at the user's path"),
            b"from storage"
        );
        assert!(mounted_at(&staged), "blobfuse2 mounts on the staging entry");
        assert_eq!(mounts_at(&l.data), 1, "one bind at the user's path");
        // blobfuse2 dies (SIGKILL: its mount stays, dead), then exits on
        // SIGTERM (it takes its own mount off, the bind stays behind): each
        // time the repair leaves one live bind at the user's path.
        for (round, signal) in [
            nix::sys::signal::Signal::SIGKILL,
            nix::sys::signal::Signal::SIGTERM,
        ]
        .into_iter()
        .enumerate()
        {
            let pid = listed(&mut mounts, "staged").await.expect("listed").pid;
            assert_ne!(pid, 0, "a supervised stand-in");
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("kill");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let m = listed(&mut mounts, "staged").await.expect("listed");
                if m.state() == proto::MountState::Mounted && m.remount_count as usize > round {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "not repaired after {signal}: {m:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(
                std::fs::read(l.data.join("hello")).expect("read after the repair"),
                b"from storage",
                "after {signal}"
            );
            assert_eq!(
                mounts_at(&l.data),
                1,
                "after {signal}: one bind at the user's path"
            );
        }
        mounts
            .unmount(proto::UnmountRequest {
                name: "staged".into(),
            })
            .await
            .expect("unmount");
        assert_eq!(mounts_at(&l.data), 0, "nothing left at the user's path");
        assert!(!staged.exists(), "the staging entry is gone");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_directory_of_a_users_is_not_taken_as_a_cache_dir() {
        let user = TestUser::create("iatc");
        let site = Site::new();
        let theirs = site.mnt("theirs-cache");
        std::fs::create_dir_all(&theirs).expect("dir");
        user.own(&theirs);
        let agent = site.agent();
        let refused = MountServiceClient::new(agent.channel().await)
            .mount(request("c", &site.mnt("c"), Some(&theirs)))
            .await
            .expect_err("a user's empty dir is refused as a cache dir");
        assert!(
            refused
                .message()
                .contains(&format!("owned by uid {}", user.uid)),
            "{refused:?}"
        );
        assert!(!theirs.join(".instance-agent-cache").exists());
    }
}

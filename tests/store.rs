//! A damaged store against the real binary and the real Docker engine: a
//! truncated file, a flipped byte in a record, a deleted file, and records
//! that cannot be decoded in every table (written through redb with the
//! table definition while the agent is stopped). Each time the agent
//! starts, says what happened in the `store` condition, and loses nothing
//! that was running: job containers keep running with their output, and
//! those no record owns any more are removed only by the explicit reclaim
//! step.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Agent;
use instance_agent::api::proto::{
    self, agent_service_client::AgentServiceClient, disk_service_client::DiskServiceClient,
    job_service_client::JobServiceClient, setup_service_client::SetupServiceClient,
};
use nix::sys::signal::Signal;
use tonic::transport::Channel;

const IMAGE: &str = "instance-agent/busybox:test";

/// A job that prints a numbered line every 200 ms until it is stopped.
fn talker(id: &str) -> proto::JobSpec {
    proto::JobSpec {
        id: id.into(),
        image: IMAGE.into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.2; done".into(),
        ],
        ..Default::default()
    }
}

/// Low disk levels: the shared test host's free space must not hold the
/// jobs these tests need running.
fn agent() -> Agent {
    Agent::builder()
        .config(
            "[jobs]\nslots = 4\nkill_grace_seconds = 1\n\
             [disk]\ncritical_free_bytes = 1048576\nwarning_free_bytes = 2097152\n",
        )
        .start()
}

async fn jobs(agent: &Agent) -> JobServiceClient<Channel> {
    JobServiceClient::new(agent.channel().await)
}

async fn get_status(agent: &Agent) -> proto::GetStatusResponse {
    AgentServiceClient::new(agent.channel().await)
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner()
}

/// Polls GetStatus until `ready` holds (60 s at most).
async fn status_when(
    agent: &Agent,
    what: &str,
    ready: impl Fn(&proto::GetStatusResponse) -> bool,
) -> proto::GetStatusResponse {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = get_status(agent).await;
        if ready(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "not within 60 s: {what}; status: {status:#?}\nlog:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn store_condition(status: &proto::GetStatusResponse) -> proto::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.r#type == "store")
        .cloned()
        .unwrap_or_else(|| panic!("no store condition: {status:#?}"))
}

fn unknown_job(status: &proto::GetStatusResponse, job: &str) -> Option<proto::UnknownContainer> {
    status
        .unknown_containers
        .iter()
        .find(|c| c.job_id == job)
        .cloned()
}

/// Submits `spec` and waits until it runs and has printed a few lines;
/// returns its container id.
async fn running(agent: &Agent, spec: proto::JobSpec) -> String {
    let id = spec.id.clone();
    let mut c = jobs(agent).await;
    c.submit_job(proto::SubmitJobRequest { spec: Some(spec) })
        .await
        .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = c
            .get_job(proto::GetJobRequest { id: id.clone() })
            .await
            .expect("get")
            .into_inner();
        if job.state() == proto::JobState::Running
            && !job.container_id.is_empty()
            && docker_logs(&job.container_id).contains("line 3")
        {
            return job.container_id;
        }
        assert!(Instant::now() < deadline, "{id} never ran: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn docker_logs(container: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", container])
        .output()
        .expect("docker logs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The engine's state of a container; `None` once it is gone.
fn docker_state(container: &str) -> Option<String> {
    let out = Command::new("docker")
        .args(["inspect", "--format", "{{.State.Status}}", container])
        .output()
        .expect("docker inspect");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Lines the container printed so far.
fn printed(container: &str) -> usize {
    docker_logs(container)
        .lines()
        .filter(|l| l.starts_with("line "))
        .count()
}

/// Asserts the container still runs, printed everything from its first
/// line on, and goes on printing.
async fn still_running_with_its_output(container: &str) {
    assert_eq!(docker_state(container).as_deref(), Some("running"));
    let logs = docker_logs(container);
    assert!(logs.starts_with("line 0\n"), "{logs}");
    let before = printed(container);
    let deadline = Instant::now() + Duration::from_secs(30);
    while printed(container) <= before {
        assert!(Instant::now() < deadline, "{container} stopped printing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops the agent the way systemd does (SIGTERM): job containers keep
/// running.
async fn stop(agent: &mut Agent) {
    agent.signal(Signal::SIGTERM);
    assert!(
        agent.exited(Duration::from_secs(30)).await.is_some(),
        "the agent did not stop; log:\n{}",
        agent.log()
    );
}

fn store_file(agent: &Agent) -> PathBuf {
    agent.state_dir.join("agent.redb")
}

fn damaged_files(agent: &Agent) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(&agent.state_dir)
        .expect("state dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("agent.redb.damaged-"))
        .collect();
    found.sort();
    found
}

/// Replaces every occurrence of `from` in the file by `to` (same length):
/// the live record and any older copy of its page. Returns how many.
fn patch(path: &Path, from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path).expect("read the store");
    let mut found = 0;
    let mut at = 0;
    while let Some(i) = bytes[at..].windows(from.len()).position(|w| w == from) {
        bytes[at + i..at + i + to.len()].copy_from_slice(to);
        found += 1;
        at += i + to.len();
    }
    std::fs::write(path, bytes).expect("write the store");
    found
}

/// Writes raw records through redb, with the tables' definition (string
/// keys, byte values), into the store of a stopped agent.
fn put_raw(store: &Path, records: &[(&str, &str, &[u8])]) {
    let db = redb::Database::create(store).expect("open the store with redb");
    let write = db.begin_write().expect("write transaction");
    for (table, key, value) in records {
        let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new(table);
        write
            .open_table(table)
            .expect("table")
            .insert(*key, *value)
            .expect("insert");
    }
    write.commit().expect("commit");
}

async fn reclaim(
    agent: &Agent,
    dry_run: bool,
    unknown_containers: bool,
) -> proto::ReclaimSpaceResponse {
    DiskServiceClient::new(agent.channel().await)
        .reclaim_space(proto::ReclaimSpaceRequest {
            dry_run,
            path: String::new(),
            all_steps: true,
            unknown_containers,
        })
        .await
        .expect("ReclaimSpace")
        .into_inner()
}

fn step<'a>(report: &'a proto::ReclaimSpaceResponse, name: &str) -> Option<&'a proto::ReclaimStep> {
    report.steps.iter().find(|s| s.name == name)
}

#[tokio::test]
async fn a_truncated_store_is_moved_aside_and_its_running_job_is_kept_until_asked() {
    let mut agent = agent();
    let container = running(&agent, talker("t1")).await;
    stop(&mut agent).await;
    let store = store_file(&agent);
    let length = std::fs::metadata(&store).expect("store").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&store)
        .expect("open the store")
        .set_len(length / 2)
        .expect("truncate");

    agent.respawn();
    let status = status_when(&agent, "the container reported as unknown", |s| {
        unknown_job(s, "t1").is_some()
    })
    .await;
    let moved = damaged_files(&agent);
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(
        std::fs::metadata(&moved[0]).expect("moved").len(),
        length / 2
    );
    let condition = store_condition(&status);
    assert_eq!(condition.state(), proto::ConditionState::Failed);
    for expected in [
        &format!("the store {} could not be opened", store.display()),
        &format!("moved to {}", moved[0].display()),
        "started with an empty store",
        "kept as unknown origin",
        "then delete it",
        "t1",
        "--unknown-containers",
    ] {
        assert!(
            condition.message.contains(expected),
            "{expected:?} in {}",
            condition.message
        );
    }
    assert!(status.summary.starts_with("failed"), "{}", status.summary);
    let doctor = common::cli(&agent.socket, &["doctor", "--config", "/nonexistent.toml"]);
    let text = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL  store") && l.contains("could not be opened")),
        "{text}"
    );
    assert!(text.contains("--unknown-containers"), "{text}");
    let unknown = unknown_job(&status, "t1").expect("t1");
    assert_eq!(unknown.container_id, container);
    assert_eq!(unknown.state, "running");
    still_running_with_its_output(&container).await;
    let kept_log = agent.state_dir.join("job-logs/t1.0.log");
    let log = std::fs::read(&kept_log).expect("the job's log file is kept");
    assert!(
        String::from_utf8_lossy(&log).contains("line 0"),
        "{kept_log:?}"
    );

    // No reclaim removes it unless asked to, and a dry run only counts it.
    let report = reclaim(&agent, false, false).await;
    assert!(step(&report, "unknown_containers").is_none(), "{report:?}");
    assert!(step(&report, "exited_containers").is_some_and(|s| s.ran));
    let report = reclaim(&agent, true, true).await;
    assert_eq!(
        step(&report, "unknown_containers").map(|s| s.items),
        Some(1),
        "{report:?}"
    );
    still_running_with_its_output(&container).await;

    let report = reclaim(&agent, false, true).await;
    let removed = step(&report, "unknown_containers").expect("asked for");
    assert!(removed.ran && removed.error.is_empty(), "{removed:?}");
    assert_eq!(removed.items, 1);
    assert_eq!(docker_state(&container), None, "removed as asked");
    let status = get_status(&agent).await;
    assert!(status.unknown_containers.is_empty(), "{status:?}");
    let condition = store_condition(&status);
    assert!(
        !condition.message.contains("unknown origin (labelled"),
        "{}",
        condition.message
    );
    // The moved file stays reported until the operator deletes it.
    assert_eq!(condition.state(), proto::ConditionState::Failed);
    std::fs::remove_file(&moved[0]).expect("delete the damaged file");
    agent.respawn();
    let status = get_status(&agent).await;
    assert_eq!(
        store_condition(&status).state(),
        proto::ConditionState::Ok,
        "{status:?}"
    );
}

#[tokio::test]
async fn a_flipped_byte_in_a_job_record_loses_that_job_only() {
    let mut agent = agent();
    let keep = running(&agent, talker("keep")).await;
    let victim = running(&agent, talker("victim")).await;
    stop(&mut agent).await;
    // `"id":"victim"` is only in the victim's record (keys are stored
    // without quotes): an `;` for the `:` breaks its JSON, and its page's
    // checksum. Every copy in the file is patched, the live one and older
    // ones, so the page is often one both of redb's commit slots share and
    // redb's repair gives up on the file: the salvage must read it as it is.
    let flipped = patch(
        &store_file(&agent),
        br#""id":"victim""#,
        br#""id";"victim""#,
    );
    assert!(flipped > 0, "the victim's record is not in the file");

    agent.respawn();
    let status = status_when(&agent, "the victim reported as unknown", |s| {
        unknown_job(s, "victim").is_some()
    })
    .await;
    let condition = store_condition(&status);
    assert_eq!(condition.state(), proto::ConditionState::Failed);
    for expected in ["could not be opened", "copied back", "jobs.records/victim"] {
        assert!(
            condition.message.contains(expected),
            "{expected:?} in {}",
            condition.message
        );
    }
    // Its neighbour came back from the damaged file and was adopted.
    let mut c = jobs(&agent).await;
    let job = c
        .get_job(proto::GetJobRequest { id: "keep".into() })
        .await
        .expect("keep is still known")
        .into_inner();
    assert_eq!(job.state(), proto::JobState::Running);
    assert_eq!(job.container_id, keep);
    let lost = c
        .get_job(proto::GetJobRequest {
            id: "victim".into(),
        })
        .await
        .expect_err("the victim's record is gone");
    assert_eq!(lost.code(), tonic::Code::NotFound);
    still_running_with_its_output(&keep).await;
    still_running_with_its_output(&victim).await;
    // The adopted job is supervised again: a cancel stops it.
    c.cancel_job(proto::CancelJobRequest { id: "keep".into() })
        .await
        .expect("cancel");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = c
            .get_job(proto::GetJobRequest { id: "keep".into() })
            .await
            .expect("get")
            .into_inner();
        if job.state() == proto::JobState::Cancelled {
            break;
        }
        assert!(Instant::now() < deadline, "keep not cancelled: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(docker_state(&keep).as_deref(), Some("running"));
    still_running_with_its_output(&victim).await;
}

#[tokio::test]
async fn a_deleted_store_keeps_the_running_job_and_a_resubmit_takes_it_back() {
    let mut agent = agent();
    let container = running(&agent, talker("d1")).await;
    stop(&mut agent).await;
    std::fs::remove_file(store_file(&agent)).expect("delete the store");

    agent.respawn();
    let status = status_when(&agent, "the container reported as unknown", |s| {
        unknown_job(s, "d1").is_some()
    })
    .await;
    let condition = store_condition(&status);
    assert_eq!(condition.state(), proto::ConditionState::Failed);
    assert!(
        condition.message.contains(&format!(
            "the store {} was missing at this start",
            store_file(&agent).display()
        )),
        "{}",
        condition.message
    );
    still_running_with_its_output(&container).await;

    // Submitted again with its id, the job takes its container back: never
    // a second container, never a second start.
    let mut c = jobs(&agent).await;
    c.submit_job(proto::SubmitJobRequest {
        spec: Some(talker("d1")),
    })
    .await
    .expect("submit again");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = c
            .get_job(proto::GetJobRequest { id: "d1".into() })
            .await
            .expect("get")
            .into_inner();
        if job.state() == proto::JobState::Running {
            assert_eq!(job.container_id, container);
            break;
        }
        assert!(Instant::now() < deadline, "not taken back: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(get_status(&agent).await.unknown_containers.is_empty());
    assert_eq!(
        common::containers(&agent.instance_id, true),
        [container[..12].to_owned()]
    );
    let logs = docker_logs(&container);
    assert_eq!(logs.matches("line 0\n").count(), 1, "started once: {logs}");

    // The next start has its store again: the condition clears.
    drop(c);
    agent.respawn();
    let status = get_status(&agent).await;
    assert_eq!(
        store_condition(&status).state(),
        proto::ConditionState::Ok,
        "{status:?}"
    );
}

#[tokio::test]
async fn bad_job_and_setup_records_are_skipped_and_named_and_their_neighbours_kept() {
    let mut agent = agent();
    let mut c = jobs(&agent).await;
    c.submit_job(proto::SubmitJobRequest {
        spec: Some(proto::JobSpec {
            id: "done".into(),
            image: IMAGE.into(),
            command: vec!["true".into()],
            ..Default::default()
        }),
    })
    .await
    .expect("submit");
    let mut setup = SetupServiceClient::new(agent.channel().await);
    let run = setup
        .run_setup_script(proto::RunSetupScriptRequest {
            source: Some(proto::run_setup_script_request::Source::Script(
                "true".into(),
            )),
            ..Default::default()
        })
        .await
        .expect("run a script")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = c
            .get_job(proto::GetJobRequest { id: "done".into() })
            .await
            .expect("get")
            .into_inner();
        let state = setup
            .get_setup_run(proto::GetSetupRunRequest { id: run.id.clone() })
            .await
            .expect("get run")
            .into_inner()
            .state();
        if common::is_final(job.state()) && state == proto::SetupRunState::Succeeded {
            break;
        }
        assert!(Instant::now() < deadline, "job or run not done");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((c, setup));
    stop(&mut agent).await;
    let secret = common::secret("s3cr3t-in-a-bad-record");
    let quoted = format!(r#"{{"spec": "{secret}"}}"#);
    put_raw(
        &store_file(&agent),
        &[
            ("jobs.records", "bad-job", quoted.as_bytes()),
            ("setup.runs", "bad-run", b"{\"id\": \"run-"),
        ],
    );

    agent.respawn();
    let status = get_status(&agent).await;
    let condition = store_condition(&status);
    assert_eq!(condition.state(), proto::ConditionState::Degraded);
    for expected in [
        "jobs.records/bad-job (not of the expected shape",
        "setup.runs/bad-run (cut short",
    ] {
        assert!(
            condition.message.contains(expected),
            "{expected:?} in {}",
            condition.message
        );
    }
    assert!(
        !condition.message.contains(&secret),
        "a record is quoted: {}",
        condition.message
    );
    assert!(
        !agent.log().contains(&secret),
        "a record is quoted in the log"
    );
    let mut c = jobs(&agent).await;
    let job = c
        .get_job(proto::GetJobRequest { id: "done".into() })
        .await
        .expect("the job next to the bad record")
        .into_inner();
    assert_eq!(job.state(), proto::JobState::Succeeded);
    let runs = SetupServiceClient::new(agent.channel().await)
        .list_setup_runs(proto::ListSetupRunsRequest::default())
        .await
        .expect("list runs")
        .into_inner()
        .runs;
    assert!(runs.iter().any(|r| r.id == run.id), "{runs:?}");
}

#[tokio::test]
async fn a_bad_watched_path_record_is_skipped_and_the_other_paths_kept() {
    let mut agent = agent();
    let good = format!("/nonexistent-{}/good", common::uuid_like());
    DiskServiceClient::new(agent.channel().await)
        .add_watched_path(proto::AddWatchedPathRequest {
            path: good.clone(),
            reason: "datasets".into(),
        })
        .await
        .expect("add a path");
    stop(&mut agent).await;
    put_raw(
        &store_file(&agent),
        &[("disk.watched_paths", "/nonexistent/bad", b"[1, 2")],
    );

    agent.respawn();
    let status = get_status(&agent).await;
    let condition = store_condition(&status);
    assert_eq!(condition.state(), proto::ConditionState::Degraded);
    assert!(
        condition
            .message
            .contains("disk.watched_paths//nonexistent/bad"),
        "{}",
        condition.message
    );
    let mut disk = DiskServiceClient::new(agent.channel().await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let usage = disk
            .get_disk_usage(proto::GetDiskUsageRequest {})
            .await
            .expect("disk usage")
            .into_inner();
        if usage.skipped.iter().any(|s| s.path == good) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{good} is no longer watched: {usage:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(feature = "test-util")]
#[tokio::test]
async fn a_bad_mount_record_is_skipped_and_the_other_mounts_kept() {
    use common::fuse_site::Site;
    use instance_agent::api::proto::{
        mount_request::Auth, mount_service_client::MountServiceClient,
    };

    let site = Site::new();
    let key = common::secret("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=");
    let mut agent = site.agent();
    let request = proto::MountRequest {
        name: "good".into(),
        account: "myacct".into(),
        container: "data".into(),
        mount_path: site.mnt("good").display().to_string(),
        auth: Some(Auth::AccountKey(key)),
        ..Default::default()
    };
    MountServiceClient::new(agent.channel().await)
        .mount(request)
        .await
        .expect("mount");
    stop(&mut agent).await;
    put_raw(
        &store_file(&agent),
        &[("mounts.requested", "bad", b"{\"account\": 1}")],
    );

    agent.respawn();
    let status = get_status(&agent).await;
    let condition = store_condition(&status);
    assert_eq!(condition.state(), proto::ConditionState::Degraded);
    assert!(
        condition.message.contains("mounts.requested/bad"),
        "{}",
        condition.message
    );
    let mounts = MountServiceClient::new(agent.channel().await)
        .list_mounts(proto::ListMountsRequest {})
        .await
        .expect("list mounts")
        .into_inner()
        .mounts;
    let names: Vec<&str> = mounts.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["good"], "{mounts:?}");
}

#[tokio::test]
async fn a_full_state_filesystem_after_a_crash_is_not_taken_for_damage() {
    use common::fs::{Filler, Tmpfs};

    let tmpfs = Tmpfs::new(64);
    let mut agent = Agent::builder()
        .state_dir(&tmpfs.path.join("state"))
        .config(
            "[disk]\ncritical_free_bytes = 1048576\nwarning_free_bytes = 2097152\n\
             reserve_bytes = 0\n",
        )
        .start();
    let good = format!("/nonexistent-{}/kept", common::uuid_like());
    DiskServiceClient::new(agent.channel().await)
        .add_watched_path(proto::AddWatchedPathRequest {
            path: good.clone(),
            reason: "datasets".into(),
        })
        .await
        .expect("add a path");
    // A crash: the next open has to repair the file, which needs space.
    agent.signal(Signal::SIGKILL);
    assert!(agent.exited(Duration::from_secs(30)).await.is_some());
    let filler = Filler::new(&tmpfs.path);
    filler.fill_completely();

    // A store that cannot be checked or repaired for lack of space is opened
    // as it is, never moved aside: nothing says it is damaged.
    agent.respawn();
    let status = get_status(&agent).await;
    let condition = store_condition(&status);
    assert_eq!(
        condition.state(),
        proto::ConditionState::Ok,
        "{}",
        condition.message
    );
    assert!(
        damaged_files(&agent).is_empty(),
        "{:?}",
        damaged_files(&agent)
    );
    let mut disk = DiskServiceClient::new(agent.channel().await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let usage = disk
            .get_disk_usage(proto::GetDiskUsageRequest {})
            .await
            .expect("disk usage")
            .into_inner();
        if usage.skipped.iter().any(|s| s.path == good) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{good} is no longer watched: {usage:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    filler.empty();
}

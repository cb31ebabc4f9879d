//! Images against a real registry (Debian's `docker-registry`, started per
//! test on a free loopback port by `common::registry`) and the real engine:
//! pulls with stored and per-job credentials (never in the log, the store,
//! the support bundle or the metrics), the reason of each failure,
//! single flight counted at the registry, prefetch, a pinned digest, the
//! disk-aware wait on a real small filesystem, the image reclaim steps, a
//! cancelled pull, and a pull cut by an agent crash. Every registry, image
//! and certs.d directory a test makes is removed when it ends.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::fs::{Filler, MIB, Tmpfs};
use common::registry::{Kind, Pushed, TestRegistry};
use common::{Agent, cli, is_final};
use instance_agent::api::proto::{
    self, agent_service_client::AgentServiceClient, image_service_client::ImageServiceClient,
    job_service_client::JobServiceClient,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const BUSYBOX: &str = "instance-agent/busybox:test";

fn job(id: &str, image: &str, command: &[&str]) -> proto::JobSpec {
    proto::JobSpec {
        id: id.into(),
        image: image.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn jobs(agent: &Agent) -> JobServiceClient<Channel> {
    JobServiceClient::new(agent.channel().await)
}

async fn images(agent: &Agent) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(agent.channel().await)
}

async fn submit(c: &mut JobServiceClient<Channel>, spec: proto::JobSpec) -> proto::Job {
    c.submit_job(proto::SubmitJobRequest { spec: Some(spec) })
        .await
        .expect("submit")
        .into_inner()
}

async fn get(c: &mut JobServiceClient<Channel>, id: &str) -> proto::Job {
    c.get_job(proto::GetJobRequest { id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

/// Polls the job until `check` holds; panics after `within`.
async fn wait_job(
    c: &mut JobServiceClient<Channel>,
    id: &str,
    what: &str,
    within: Duration,
    check: impl Fn(&proto::Job) -> bool,
) -> proto::Job {
    let deadline = Instant::now() + within;
    loop {
        let job = get(c, id).await;
        if check(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id}: {what} not within {within:?}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn final_state(c: &mut JobServiceClient<Channel>, id: &str) -> proto::Job {
    wait_job(c, id, "a final state", Duration::from_secs(120), |j| {
        is_final(j.state())
    })
    .await
}

/// Logs the agent in to `registry` through the CLI (password on stdin).
fn login(agent: &Agent, registry: &TestRegistry, password: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(common::binary())
        .arg("--socket")
        .arg(&agent.socket)
        .args([
            "images",
            "login",
            &registry.host,
            "-u",
            &registry.user,
            "--password-stdin",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cli");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(password.as_bytes())
        .expect("password");
    let out = child.wait_with_output().expect("cli");
    common::assert_success(&"images login", &out);
}

/// An agent whose jobs may bind `markers`.
fn agent(extra: &str) -> Agent {
    Agent::builder()
        .config(&format!(
            "[jobs]\nslots = 4\nkill_grace_seconds = 1\n{extra}"
        ))
        .start()
}

/// An agent with one slot whose jobs may bind `markers`.
fn one_slot_agent(markers: &Path) -> Agent {
    Agent::builder()
        .config(&format!(
            "[jobs]\nslots = 1\nkill_grace_seconds = 1\nallowed_host_roots = [{:?}]\n",
            markers.display().to_string()
        ))
        .start()
}

/// `spec` with `markers` bound at `/markers`.
fn with_markers(mut spec: proto::JobSpec, markers: &Path) -> proto::JobSpec {
    spec.mounts = vec![proto::JobMount {
        source: Some(proto::job_mount::Source::HostPath(
            markers.display().to_string(),
        )),
        container_path: "/markers".into(),
        read_only: false,
    }];
    spec
}

/// The reason a job of `image` fails with.
async fn failure_of(agent: &Agent, id: &str, image: &str) -> String {
    let mut c = jobs(agent).await;
    submit(&mut c, job(id, image, &["true"])).await;
    let job = final_state(&mut c, id).await;
    assert_eq!(job.state(), proto::JobState::Failed, "{job:?}");
    job.reason
}

/// Asserts that none of `secrets` is in the agent's support bundle
/// (`doctor --bundle`: status, the event backlog, the config, the log) or in
/// its metrics (`metrics_port`).
fn assert_no_secret_in_bundle_or_metrics(agent: &Agent, metrics_port: u16, secrets: &[&str]) {
    use std::io::Read;
    let bundle = agent.path().join("support.tgz");
    let out = cli(
        &agent.socket,
        &[
            "doctor",
            "--config",
            agent.config_path.to_str().expect("utf-8"),
            "--bundle",
            bundle.to_str().expect("utf-8"),
            "--log-file",
            agent.log_path.to_str().expect("utf-8"),
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("support bundle written to"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut archive = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&bundle).expect("bundle"))
        .read_to_end(&mut archive)
        .expect("gunzip");
    let archive = String::from_utf8_lossy(&archive);
    assert!(archive.contains("events.json"), "a bundle with its events");
    let (_, metrics) = common::http_get(metrics_port, "/metrics");
    assert!(metrics.contains("instance_agent_"), "{metrics}");
    for secret in secrets {
        assert!(!archive.contains(secret), "a registry secret in the bundle");
        assert!(
            !metrics.contains(secret),
            "a registry secret in the metrics"
        );
    }
}

/// Config that serves metrics on a free loopback port; the port.
fn with_metrics() -> (String, u16) {
    let port = common::free_port();
    (format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"), port)
}

#[tokio::test]
async fn a_private_image_is_pulled_with_the_stored_credential_and_its_digest_runs() {
    let registry = TestRegistry::start(Kind::TlsAuth);
    let image = registry.push("env", "1", 3, 8);
    let (metrics, metrics_port) = with_metrics();
    let agent = agent(&metrics);
    login(&agent, &registry, &registry.password);
    let mut c = jobs(&agent).await;
    let submitted = submit(
        &mut c,
        job("private", &image.reference, &["cat", "/data/marker"]),
    )
    .await;
    assert_eq!(submitted.state(), proto::JobState::Queued);
    let done = final_state(&mut c, "private").await;
    assert_eq!(done.state(), proto::JobState::Succeeded, "{done:?}");
    assert_eq!(done.image_digest, image.digest, "the digest it ran");
    // The stored credential is listed without its secret.
    let logins = cli(&agent.socket, &["--json", "images", "logins"]);
    common::assert_success(&"images logins", &logins);
    let text = String::from_utf8_lossy(&logins.stdout);
    assert!(text.contains(&registry.user), "{text}");
    assert!(!text.contains(&registry.password), "{text}");
    // The agent's view of the image.
    let list = images(&agent)
        .await
        .list_images(proto::ListImagesRequest {})
        .await
        .expect("list")
        .into_inner();
    let listed = list
        .images
        .iter()
        .find(|i| i.references.contains(&image.reference))
        .expect("listed");
    assert!(listed.pulled_by_agent, "{listed:?}");
    assert!(listed.last_used.is_some(), "{listed:?}");
    let log = agent.log();
    assert!(
        !log.contains(&registry.password),
        "the password reached the log"
    );
    assert!(
        log.contains("registry credential set"),
        "audit of the login"
    );
    assert_no_secret_in_bundle_or_metrics(&agent, metrics_port, &[&registry.password]);
}

/// A registry of `kind` with one small image, and an agent with `extra`
/// config, for a job that must fail.
struct Failing {
    registry: TestRegistry,
    image: Pushed,
    agent: Agent,
}

impl Failing {
    fn new(kind: Kind, extra: &str) -> Self {
        let registry = TestRegistry::start(kind);
        let image = registry.push("env", "1", 1, 4);
        Self {
            registry,
            image,
            agent: agent(extra),
        }
    }

    /// The reason a job of the image fails with; it must name each of `parts`.
    async fn reason(&self, id: &str, parts: &[&str]) -> String {
        let reason = failure_of(&self.agent, id, &self.image.reference).await;
        for part in parts {
            assert!(reason.contains(part), "{part:?} not in: {reason}");
        }
        reason
    }
}

#[tokio::test]
async fn without_a_credential_the_reason_names_the_registry_not_a_reset_connection() {
    let t = Failing::new(Kind::TlsAuth, "");
    let expected = format!(
        "registry {} requires credentials and none are set",
        t.registry.host
    );
    t.reason("anonymous", &[&expected]).await;
}

#[tokio::test]
async fn a_wrong_credential_is_refused_by_the_registry_with_the_user_named() {
    let t = Failing::new(Kind::TlsAuth, "");
    login(&t.agent, &t.registry, "not-the-password");
    let expected = format!(
        "registry {} refused the credentials of user \"{}\"",
        t.registry.host, t.registry.user
    );
    t.reason("wrong", &[&expected]).await;
}

#[tokio::test]
async fn a_missing_image_fails_with_the_registrys_manifest_unknown() {
    let registry = TestRegistry::start(Kind::Plain);
    let agent = agent("");
    let missing = format!("{}/{}:9", registry.host, registry.repository("nothing"));
    let reason = failure_of(&agent, "missing", &missing).await;
    assert!(reason.contains("manifest unknown"), "{reason}");
    assert!(
        reason.contains(&format!("registry {} has no image", registry.host)),
        "{reason}"
    );
}

#[tokio::test]
async fn an_untrusted_certificate_gets_no_credential_and_no_pull() {
    let t = Failing::new(Kind::TlsUntrusted, "");
    login(&t.agent, &t.registry, &t.registry.password);
    let expected = format!(
        "the TLS certificate of registry {} is not trusted",
        t.registry.host
    );
    t.reason("untrusted", &[&expected, "/etc/docker/certs.d/"])
        .await;
    assert_eq!(t.registry.blob_fetches(&t.image.repository), 0);
}

#[tokio::test]
async fn an_unreachable_registry_is_retried_until_the_timeout() {
    let port = common::free_port();
    let agent = agent("[images]\npull_timeout_seconds = 5\n");
    let started = Instant::now();
    let reason = failure_of(&agent, "unreachable", &format!("127.0.0.1:{port}/x/y:1")).await;
    assert!(
        reason.contains(&format!("registry 127.0.0.1:{port} is unreachable")),
        "{reason}"
    );
    assert!(reason.contains("retried for 5 s"), "{reason}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_registry_that_does_not_answer_times_out() {
    let t = Failing::new(Kind::TlsAuth, "[images]\npull_timeout_seconds = 5\n");
    login(&t.agent, &t.registry, &t.registry.password);
    t.registry.freeze();
    let expected = format!("registry {} did not answer within 5 s", t.registry.host);
    t.reason("frozen", &[&expected]).await;
    t.registry.thaw();
}

#[tokio::test]
async fn four_jobs_of_one_image_share_one_pull_counted_at_the_registry() {
    let registry = TestRegistry::start(Kind::Plain);
    let image = registry.push("shared", "1", 3, 10);
    // Slow enough to watch the one pull while it runs.
    registry.throttle(8 * MIB);
    let agent = agent("");
    let mut c = jobs(&agent).await;
    for i in 0..4 {
        submit(
            &mut c,
            job(&format!("shared-{i}"), &image.reference, &["true"]),
        )
        .await;
    }
    // While it is pulled: one pull in GetStatus, for all four.
    let status = wait_status(&agent, "one pull for four jobs", |s| {
        assert!(s.pulls.len() <= 1, "{:?}", s.pulls);
        s.pulls.first().is_some_and(|p| p.needed_by.len() == 4)
    })
    .await;
    assert_eq!(
        status.slots.expect("slots").in_use,
        0,
        "no slot while pulling"
    );
    registry.throttle(0);
    for i in 0..4 {
        let done = final_state(&mut c, &format!("shared-{i}")).await;
        assert_eq!(done.state(), proto::JobState::Succeeded, "{done:?}");
    }
    // One set of blobs: each own layer and the config, once.
    assert_eq!(
        registry.blob_fetches(&image.repository),
        image.layers + 1,
        "{}",
        registry.log_text()
    );
    assert_eq!(registry.engine_manifest_fetches(&image.repository), 1);
}

#[tokio::test]
async fn the_next_jobs_image_is_pulled_while_the_slot_is_busy() {
    let registry = TestRegistry::start(Kind::Plain);
    let image = registry.push("next", "1", 2, 10);
    let markers = tempfile::tempdir().expect("markers");
    let agent = one_slot_agent(markers.path());
    let mut c = jobs(&agent).await;
    let first = job(
        "first",
        BUSYBOX,
        &["sh", "-c", "while [ ! -e /markers/go ]; do sleep 0.1; done"],
    );
    submit(&mut c, with_markers(first, markers.path())).await;
    wait_job(&mut c, "first", "running", Duration::from_secs(30), |j| {
        j.state() == proto::JobState::Running
    })
    .await;
    submit(&mut c, job("second", &image.reference, &["true"])).await;
    // Pulled ahead: local while the first still holds the only slot.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !registry.is_local(&image.reference) {
        assert!(Instant::now() < deadline, "never prefetched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&mut c, "first").await.state(), proto::JobState::Running);
    let second = get(&mut c, "second").await;
    assert_eq!(second.state(), proto::JobState::Queued, "{second:?}");
    std::fs::write(markers.path().join("go"), "").expect("go");
    let done = final_state(&mut c, "second").await;
    assert_eq!(done.state(), proto::JobState::Succeeded, "{done:?}");
}

#[tokio::test]
async fn a_digest_reference_runs_that_digest_after_the_tag_moved() {
    let registry = TestRegistry::start(Kind::Plain);
    let v1 = registry.push_marked("pinned", "latest", 1, 2, "version-one");
    let _v2 = registry.push_marked("pinned", "latest", 1, 2, "version-two");
    let agent = agent("");
    let mut c = jobs(&agent).await;
    submit(&mut c, job("pinned", &v1.digest, &["cat", "/data/marker"])).await;
    let done = final_state(&mut c, "pinned").await;
    assert_eq!(done.state(), proto::JobState::Succeeded, "{done:?}");
    assert_eq!(done.image_digest, v1.digest);
    let logs = cli(&agent.socket, &["jobs", "logs", "pinned"]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "version-one");
}

#[tokio::test]
async fn a_jobs_own_token_is_used_for_its_pull_and_never_kept_or_shown() {
    let registry = TestRegistry::start(Kind::TlsAuth);
    let image = registry.push("token", "1", 1, 4);
    let (metrics, metrics_port) = with_metrics();
    let agent = agent(&metrics);
    let mut c = jobs(&agent).await;
    let mut spec = job("with-token", &image.reference, &["true"]);
    spec.registry_auth = Some(proto::RegistryAuth {
        username: registry.token_user.clone(),
        password: registry.token.clone(),
    });
    let submitted = submit(&mut c, spec).await;
    assert!(submitted.spec.expect("spec").registry_auth.is_none());
    let done = final_state(&mut c, "with-token").await;
    assert_eq!(done.state(), proto::JobState::Succeeded, "{done:?}");
    assert!(done.spec.expect("spec").registry_auth.is_none());
    let logins = images(&agent)
        .await
        .list_registry_credentials(proto::ListRegistryCredentialsRequest {})
        .await
        .expect("logins")
        .into_inner();
    assert!(logins.credentials.is_empty(), "never stored: {logins:?}");
    let log = agent.log();
    assert!(!log.contains(&registry.token), "the token reached the log");
    assert!(
        log.contains("registry_auth=set"),
        "audited as set, never shown"
    );
    let store = std::fs::read(agent.state_dir.join("agent.redb")).expect("store");
    assert!(
        !String::from_utf8_lossy(&store).contains(&registry.token),
        "the token reached the store"
    );
    assert_no_secret_in_bundle_or_metrics(&agent, metrics_port, &[&registry.token]);
}

#[tokio::test]
async fn pull_image_streams_progress_and_shares_the_jobs_pull() {
    let registry = TestRegistry::start(Kind::Plain);
    let image = registry.push("warm", "1", 2, 10);
    let agent = agent("");
    let mut stream = images(&agent)
        .await
        .pull_image(proto::PullImageRequest {
            image: image.reference.clone(),
        })
        .await
        .expect("pull")
        .into_inner();
    let mut last = None;
    let mut saw_bytes = false;
    while let Some(message) = stream.next().await {
        let progress = message.expect("progress");
        saw_bytes |= progress.bytes_total > 0;
        last = Some(progress);
    }
    let last = last.expect("a message");
    assert_eq!(last.phase(), proto::PullPhase::Done, "{last:?}");
    assert_eq!(last.digest, image.digest);
    assert_eq!(last.layers_done, last.layers_total);
    assert!(saw_bytes, "sizes from the manifest");
    assert!(registry.is_local(&image.reference));
    // The CLI shows plain lines when stderr is not a terminal.
    let again = cli(&agent.socket, &["images", "pull", &image.reference]);
    common::assert_success(&"images pull", &again);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains(&format!("pulled {}", image.reference)),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_cli_lists_and_removes_images_refuses_a_needed_one_and_logs_out() {
    let registry = TestRegistry::start(Kind::Plain);
    let image = registry.push("cli", "1", 1, 2);
    let markers = tempfile::tempdir().expect("markers");
    let agent = one_slot_agent(markers.path());
    let pulled = cli(&agent.socket, &["images", "pull", &image.reference]);
    common::assert_success(&"images pull", &pulled);
    let list = cli(&agent.socket, &["images", "list"]);
    common::assert_success(&"images list", &list);
    let text = String::from_utf8_lossy(&list.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with(&image.reference))
        .unwrap_or_else(|| panic!("{} not listed:\n{text}", image.reference));
    assert!(row.contains(" agent "), "pulled by the agent: {row}");

    // A running job needs it: refused, and the image stays.
    let mut c = jobs(&agent).await;
    let holder = job(
        "holder",
        &image.reference,
        &["sh", "-c", "while [ ! -e /markers/go ]; do sleep 0.1; done"],
    );
    submit(&mut c, with_markers(holder, markers.path())).await;
    wait_job(&mut c, "holder", "running", Duration::from_secs(60), |j| {
        j.state() == proto::JobState::Running
    })
    .await;
    let refused = cli(&agent.socket, &["images", "rm", &image.reference]);
    assert!(!refused.status.success(), "removed while a job runs it");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("is in use") && stderr.contains("holder"),
        "{stderr}"
    );
    assert!(registry.is_local(&image.reference));
    std::fs::write(markers.path().join("go"), "").expect("go");
    let done = final_state(&mut c, "holder").await;
    assert_eq!(done.state(), proto::JobState::Succeeded, "{done:?}");
    // A finished job holds its image until its container is gone, which
    // follows the job's final state: ListImages shows when it lets go.
    let mut images_client = images(&agent).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listed = images_client
            .list_images(proto::ListImagesRequest {})
            .await
            .expect("list images")
            .into_inner();
        let row = listed
            .images
            .iter()
            .find(|i| i.references.contains(&image.reference))
            .unwrap_or_else(|| panic!("{} not listed: {listed:?}", image.reference));
        if row.used_by_jobs.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still held 30 s after the job ended: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let removed = cli(&agent.socket, &["images", "rm", &image.reference]);
    common::assert_success(&"images rm", &removed);
    assert!(
        String::from_utf8_lossy(&removed.stdout).contains("removed"),
        "{}",
        String::from_utf8_lossy(&removed.stdout)
    );
    assert!(!registry.is_local(&image.reference));

    login(&agent, &registry, &registry.password);
    let logout = cli(&agent.socket, &["images", "logout", &registry.host]);
    common::assert_success(&"images logout", &logout);
    assert_eq!(
        String::from_utf8_lossy(&logout.stdout),
        format!("logged out of {}\n", registry.host)
    );
    let logins = images(&agent)
        .await
        .list_registry_credentials(proto::ListRegistryCredentialsRequest {})
        .await
        .expect("logins")
        .into_inner();
    assert!(logins.credentials.is_empty(), "{logins:?}");
}

#[tokio::test]
async fn cancelling_the_only_job_stops_its_pull() {
    let registry = TestRegistry::start(Kind::Plain);
    let image = registry.push("slow", "1", 3, 10);
    registry.throttle(2 * MIB);
    let agent = agent("");
    let mut c = jobs(&agent).await;
    submit(&mut c, job("slow", &image.reference, &["true"])).await;
    wait_job(
        &mut c,
        "slow",
        "bytes coming",
        Duration::from_secs(60),
        |j| j.pull.as_ref().is_some_and(|p| p.bytes_done > 0),
    )
    .await;
    let cancelled = c
        .cancel_job(proto::CancelJobRequest { id: "slow".into() })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.state(), proto::JobState::Cancelled);
    wait_status(&agent, "the pull stopped", |s| s.pulls.is_empty()).await;
    assert!(
        !registry.is_local(&image.reference),
        "the pull stopped before the end"
    );
    assert!(
        agent
            .log()
            .contains("pull stopped: nobody needs it any more")
    );
}

#[tokio::test]
async fn a_pull_cut_by_an_agent_crash_is_restarted_and_the_job_runs_once() {
    let registry = TestRegistry::start(Kind::Plain);
    let image = registry.push("crash", "1", 3, 10);
    registry.throttle(4 * MIB);
    let markers = tempfile::tempdir().expect("markers");
    let mut agent = one_slot_agent(markers.path());
    let mut c = jobs(&agent).await;
    let spec = job(
        "survivor",
        &image.reference,
        &["sh", "-c", "echo run >> /markers/survivor"],
    );
    submit(&mut c, with_markers(spec, markers.path())).await;
    wait_job(
        &mut c,
        "survivor",
        "bytes coming",
        Duration::from_secs(60),
        |j| j.pull.as_ref().is_some_and(|p| p.bytes_done > 0),
    )
    .await;
    agent.crash_and_restart();
    registry.throttle(0);
    let mut c = jobs(&agent).await;
    let done = final_state(&mut c, "survivor").await;
    assert_eq!(done.state(), proto::JobState::Succeeded, "{done:?}");
    assert_eq!(
        common::runs(markers.path(), "survivor"),
        1,
        "ran exactly once"
    );
}

/// `[disk]` levels for a small filesystem at `path`.
fn small_fs_levels(path: &Path, floor_mib: u64) -> String {
    format!(
        "[disk]\ninterval_ms = 200\ntransition_seconds = 0\n\
         [disk.overrides.{:?}]\ncritical_free_bytes = {}\nwarning_free_bytes = {}\nclear_margin_bytes = {}\n",
        path.display().to_string(),
        floor_mib * MIB,
        2 * floor_mib * MIB,
        4 * MIB
    )
}

#[tokio::test]
async fn a_pull_that_would_cross_the_floor_waits_on_a_small_filesystem() {
    let registry = TestRegistry::start(Kind::Plain);
    let image: Pushed = registry.push("big", "1", 2, 10);
    let tmpfs = Tmpfs::new(256);
    let filler = Filler::new(&tmpfs.path);
    // ~21 MiB compressed: needs ~63 MiB; 40 MiB above the 64 MiB floor.
    filler.set_free(104 * MIB);
    let agent = Agent::builder()
        .config(&format!(
            "[images]\nspace_check_path = {:?}\n{}",
            tmpfs.path.display().to_string(),
            small_fs_levels(&tmpfs.path, 64)
        ))
        .start();
    let mut c = jobs(&agent).await;
    submit(&mut c, job("waits", &image.reference, &["true"])).await;
    let waiting = wait_job(
        &mut c,
        "waits",
        "waiting for space",
        Duration::from_secs(60),
        |j| {
            j.pull
                .as_ref()
                .is_some_and(|p| p.phase() == proto::PullPhase::WaitingForDisk)
        },
    )
    .await;
    assert!(
        waiting
            .reason
            .contains("waiting for disk space: image needs ~"),
        "{}",
        waiting.reason
    );
    assert_eq!(
        registry.blob_fetches(&image.repository),
        0,
        "nothing pulled yet"
    );
    filler.set_free(200 * MIB);
    let done = final_state(&mut c, "waits").await;
    assert_eq!(done.state(), proto::JobState::Succeeded, "{done:?}");
}

#[tokio::test]
async fn a_pull_that_can_never_fit_fails_with_the_reason() {
    let registry = TestRegistry::start(Kind::Plain);
    let image = registry.push("huge", "1", 2, 10);
    let tmpfs = Tmpfs::new(64);
    let agent = Agent::builder()
        .config(&format!(
            "[images]\nspace_check_path = {:?}\n{}",
            tmpfs.path.display().to_string(),
            small_fs_levels(&tmpfs.path, 32)
        ))
        .start();
    let reason = failure_of(&agent, "never", &image.reference).await;
    assert!(reason.contains("image needs ~"), "{reason}");
    assert!(
        reason.contains(&format!(
            "the filesystem of {} holds only",
            tmpfs.path.display()
        )),
        "{reason}"
    );
}

#[tokio::test]
async fn the_disk_guards_hold_covers_pulls() {
    let registry = TestRegistry::start(Kind::Plain);
    let image = registry.push("held", "1", 1, 4);
    let tmpfs = Tmpfs::new(64);
    let filler = Filler::new(&tmpfs.path);
    // The state dir below its floor holds the queue, and pulls with it.
    let agent = Agent::builder()
        .state_dir(&tmpfs.path.join("state"))
        .config(&small_fs_levels(&tmpfs.path, 32).replace(
            "transition_seconds = 0\n",
            "transition_seconds = 0\nreserve_bytes = 0\n",
        ))
        .start();
    filler.set_free(8 * MIB);
    let status = wait_status(&agent, "the disk hold", |s| {
        s.slots
            .as_ref()
            .is_some_and(|slots| slots.held_reason.contains("disk:"))
    })
    .await;
    assert!(status.pulls.is_empty());
    let mut pull = images(&agent)
        .await
        .pull_image(proto::PullImageRequest {
            image: image.reference.clone(),
        })
        .await
        .expect("pull")
        .into_inner();
    let held = loop {
        let progress = pull.next().await.expect("a message").expect("progress");
        assert_ne!(
            progress.phase(),
            proto::PullPhase::Done,
            "pulled although the state dir is below its floor"
        );
        if progress.phase() == proto::PullPhase::Held {
            break progress;
        }
    };
    assert!(held.reason.starts_with("held: disk:"), "{held:?}");
    filler.empty();
    let mut last = held;
    while let Some(message) = pull.next().await {
        last = message.expect("progress");
    }
    assert_eq!(last.phase(), proto::PullPhase::Done, "{last:?}");
}

/// Polls `GetStatus` until `check` holds.
async fn wait_status(
    agent: &Agent,
    what: &str,
    check: impl Fn(&proto::GetStatusResponse) -> bool,
) -> proto::GetStatusResponse {
    let mut client = AgentServiceClient::new(agent.channel().await);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = client
            .get_status(proto::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if check(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} never showed: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Imports a one-file image as `tag` (the user's own: the agent never pulled
/// it); returns its id. The caller removes it.
fn user_image(tag: &str, content: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("file"), content).expect("write");
    let tar = dir.path().join("layer.tar");
    common::fs::run(
        "tar",
        &[
            "-cf",
            tar.to_str().expect("utf-8 path"),
            "-C",
            dir.path().to_str().expect("utf-8 path"),
            "file",
        ],
    );
    common::fs::run(
        "docker",
        &["import", tar.to_str().expect("utf-8 path"), tag],
    )
    .trim()
    .to_owned()
}

/// Removes the images a test made itself, by id.
struct OwnImages(Vec<String>);

impl Drop for OwnImages {
    fn drop(&mut self) {
        for id in &self.0 {
            let _ = std::process::Command::new("docker")
                .args(["rmi", "-f", id])
                .output();
        }
    }
}

/// Pulls `reference` through `PullImage` to its end.
async fn pull(client: &mut ImageServiceClient<Channel>, reference: &str) -> proto::PullProgress {
    let mut stream = client
        .pull_image(proto::PullImageRequest {
            image: reference.to_owned(),
        })
        .await
        .expect("pull")
        .into_inner();
    let mut last = None;
    while let Some(message) = stream.next().await {
        last = Some(message.expect("progress"));
    }
    last.expect("a message")
}

fn exists(image: &str) -> bool {
    std::process::Command::new("docker")
        .args(["image", "inspect", image])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn image_id(reference: &str) -> String {
    common::fs::run(
        "docker",
        &["image", "inspect", "--format", "{{.Id}}", reference],
    )
    .trim()
    .to_owned()
}

#[tokio::test]
async fn reclaim_removes_only_the_images_the_agent_pulled_and_nothing_needs() {
    let registry = TestRegistry::start(Kind::Plain);
    let unused = registry.push("unused", "1", 1, 4);
    let kept = registry.push("kept", "1", 1, 4);
    let moved = registry.push_marked("moved", "latest", 1, 2, "one");
    let pid = std::process::id();
    let user_tag = format!("instance-agent/images-test-user:{pid}");
    let dangling_tag = format!("instance-agent/images-test-dangling:{pid}");
    let mut own = OwnImages(Vec::new());
    own.0.push(user_image(&user_tag, "mine"));
    // A dangling image of the user's: a tag imported twice.
    let users_dangling = user_image(&dangling_tag, "first");
    own.0.push(users_dangling.clone());
    own.0.push(user_image(&dangling_tag, "second"));
    let tmpfs = Tmpfs::new(64);
    let filler = Filler::new(&tmpfs.path);
    let agent = Agent::builder()
        .config(&format!(
            "[jobs]\nkeep_images = [{:?}]\n[images]\nspace_check_path = {:?}\n{}",
            kept.reference,
            tmpfs.path.display().to_string(),
            // The guard's own reclaim would race the one asked for below.
            small_fs_levels(&tmpfs.path, 32).replacen(
                "[disk]\n",
                "[disk]\nauto_reclaim = false\n",
                1
            )
        ))
        .start();
    let mut client = images(&agent).await;
    for reference in [&unused.reference, &kept.reference, &moved.reference] {
        assert_eq!(
            pull(&mut client, reference).await.phase(),
            proto::PullPhase::Done
        );
    }
    // The tag moves on and the agent pulls it again: its first image is
    // left dangling.
    let first_id = image_id(&moved.reference);
    registry.push_marked("moved", "latest", 1, 2, "two");
    assert_eq!(
        pull(&mut client, &moved.reference).await.phase(),
        proto::PullPhase::Done
    );
    assert_ne!(image_id(&moved.reference), first_id);
    // Below the floor where images land: reclaim runs the image steps.
    filler.set_free(16 * MIB);
    let report = proto::disk_service_client::DiskServiceClient::new(agent.channel().await)
        .reclaim_space(proto::ReclaimSpaceRequest {
            dry_run: false,
            path: tmpfs.path.display().to_string(),
            all_steps: false,
            unknown_containers: false,
        })
        .await
        .expect("reclaim")
        .into_inner();
    let step = |name: &str| {
        report
            .steps
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no step {name}: {report:?}"))
            .clone()
    };
    let dangling = step("dangling_images");
    assert!(dangling.ran && dangling.error.is_empty(), "{report:?}");
    assert_eq!(dangling.items, 1, "{report:?}");
    let unused_step = step("unused_images");
    assert!(
        unused_step.ran && unused_step.error.is_empty(),
        "{report:?}"
    );
    assert!(!exists(&first_id), "the agent's own dangling image goes");
    assert!(!exists(&unused.reference), "the agent's unused images go");
    assert!(!exists(&moved.reference), "the agent's unused images go");
    assert!(exists(&kept.reference), "jobs.keep_images protects it");
    assert!(exists(&user_tag), "never the user's image");
    assert!(exists(&users_dangling), "never the user's dangling image");
    filler.empty();
}

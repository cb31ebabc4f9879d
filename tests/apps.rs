//! Apps against the real Docker engine (started by scripts/test.sh) with the
//! local image instance-agent/busybox:test: busybox `httpd` serves a CGI
//! echo (`/cgi-bin/score`) and a health path (`/cgi-bin/health`) whose
//! answer the test turns through files in the container (`/tmp/ready`
//! absent: 503, slow model load; `/tmp/sick` present: 500), so that every
//! readiness step is caused by the test, not by a timer.
//!
//! Each test runs its own agent with its own `apps.network`; an
//! [`AppsAgent`] kills the agent first and then removes the app containers
//! and the network, even when the test fails.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Agent, cli};
use instance_agent::api::proto::{self, app_service_client::AppServiceClient};
use tonic::transport::Channel;

const IMAGE: &str = "instance-agent/busybox:test";

/// Removes the app containers of an instance and the test's apps network
/// on drop (after the agent is gone: it would restart them otherwise).
struct Cleanup {
    instance_id: String,
    network: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = app_containers(&self.instance_id, None, true);
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

/// An agent for app tests; fields drop in order: the agent (killed) first,
/// then its containers and network.
struct AppsAgent {
    agent: Agent,
    _cleanup: Cleanup,
    /// A root-owned directory under `jobs.allowed_host_roots`.
    roots: tempfile::TempDir,
}

impl AppsAgent {
    fn start() -> Self {
        let id = format!("apps-{}", common::uuid_like());
        let network = format!("ia-test-{id}");
        let cleanup = Cleanup {
            instance_id: id.clone(),
            network: network.clone(),
        };
        let roots = tempfile::tempdir().expect("tempdir");
        let agent = Agent::builder()
            .instance_id(&id)
            .config(&format!(
                "[apps]\nnetwork = {network:?}\nstop_grace_seconds = 1\n\
                 [jobs]\nslots = 4\nkill_grace_seconds = 1\nallowed_host_roots = [{:?}]\n",
                roots.path().display().to_string()
            ))
            .start();
        Self {
            agent,
            _cleanup: cleanup,
            roots,
        }
    }

    async fn client(&self) -> AppServiceClient<Channel> {
        AppServiceClient::new(self.agent.channel().await)
    }
}

/// Ids of the app containers of `instance` (of app `app` when given).
fn app_containers(instance: &str, app: Option<&str>, all: bool) -> Vec<String> {
    let mut command = Command::new("docker");
    command.args(["ps", "-q", "--no-trunc", "--filter"]);
    command.arg(format!("label=io.instance-agent.app-instance={instance}"));
    if let Some(app) = app {
        command.args(["--filter", &format!("label=io.instance-agent.app={app}")]);
    }
    if all {
        command.arg("-a");
    }
    command
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The shell that prepares the web root and runs httpd in the foreground as
/// the container's PID 1. `/cgi-bin/score` echoes `tag=TAG` and the body;
/// `/cgi-bin/health` answers 503 until `/tmp/ready` exists (created at
/// once when `ready` is true), 500 once `/tmp/sick` exists, else 200, and
/// counts its calls in `/tmp/probed`.
fn server_script(tag: &str, ready: bool) -> String {
    format!(
        r#"set -e
mkdir -p /www/cgi-bin
cat > /www/cgi-bin/score <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "tag={tag} method=$REQUEST_METHOD"
cat
EOF
cat > /www/cgi-bin/health <<'EOF'
#!/bin/sh
echo probed >> /tmp/probed
if [ -e /tmp/sick ]; then printf 'HTTP/1.0 500 Internal Server Error\r\n\r\nsick\n'
elif [ -e /tmp/ready ]; then printf 'HTTP/1.0 200 OK\r\n\r\nok\n'
else printf 'HTTP/1.0 503 Service Unavailable\r\n\r\nloading\n'; fi
EOF
chmod +x /www/cgi-bin/score /www/cgi-bin/health
{touch}
exec httpd -f -p 8080 -h /www
"#,
        touch = if ready { "touch /tmp/ready" } else { "" }
    )
}

/// An app of the test image serving [`server_script`] on container port 8080
/// (host port picked), probed every second on `/cgi-bin/health`.
fn web_spec(name: &str, tag: &str, ready: bool) -> proto::AppSpec {
    proto::AppSpec {
        name: name.into(),
        image: IMAGE.into(),
        command: vec!["sh".into(), "-c".into(), server_script(tag, ready)],
        ports: vec![proto::AppPort {
            name: "http".into(),
            container_port: 8080,
            ..Default::default()
        }],
        health: Some(proto::HealthCheck {
            probe: Some(proto::health_check::Probe::Http(proto::HttpCheck {
                port: "http".into(),
                path: "/cgi-bin/health".into(),
                ..Default::default()
            })),
            interval_seconds: Some(1),
            timeout_seconds: Some(1),
            failure_threshold: Some(2),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn deploy(c: &mut AppServiceClient<Channel>, spec: proto::AppSpec) -> proto::App {
    c.deploy_app(proto::DeployAppRequest { spec: Some(spec) })
        .await
        .expect("deploy")
        .into_inner()
}

async fn get(c: &mut AppServiceClient<Channel>, name: &str) -> proto::App {
    c.get_app(proto::GetAppRequest { name: name.into() })
        .await
        .expect("get")
        .into_inner()
}

/// Polls GetApp until `done` holds (the state is awaited, not slept on).
async fn wait_app(
    c: &mut AppServiceClient<Channel>,
    name: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&proto::App) -> bool,
) -> proto::App {
    let deadline = Instant::now() + within;
    loop {
        let app = get(c, name).await;
        if done(&app) {
            return app;
        }
        assert!(
            Instant::now() < deadline,
            "app {name}: no {what} within {within:?}: {app:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn endpoint(app: &proto::App, name: &str) -> String {
    app.endpoints
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no endpoint {name}: {app:?}"))
        .url
        .clone()
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

/// One POST on loopback; the status and the body, or why there is none.
fn post(port: u16, path: &str, body: &str) -> Result<(u32, String), String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head in {reply:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The echo of `/cgi-bin/score` on `port`, which must answer 200.
fn score(port: u16, body: &str) -> String {
    match post(port, "/cgi-bin/score", body) {
        Ok((200, answer)) => answer,
        other => panic!("POST /cgi-bin/score on {port}: {other:?}"),
    }
}

/// True when something listens on 127.0.0.1:`port` (as `ss -ltn` shows it).
fn listening_on_loopback(port: u16) -> bool {
    let out = Command::new("ss").args(["-ltnH"]).output().expect("run ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .any(|local| local == format!("127.0.0.1:{port}"))
}

fn docker_exec(container: &str, args: &[&str]) {
    let out = Command::new("docker")
        .args(["exec", container])
        .args(args)
        .output()
        .expect("docker exec");
    assert!(
        out.status.success(),
        "docker exec {container} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How many times the health path of `container` was called.
fn probes_of(container: &str) -> usize {
    Command::new("docker")
        .args(["exec", container, "cat", "/tmp/probed"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).lines().count())
        .unwrap_or(0)
}

/// The host pid of the container's PID 1.
fn container_pid(container: &str) -> i32 {
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Pid}}", container])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a pid")
}

/// Requests to `port` in a loop on a thread until stopped; counts answers
/// and keeps the first failure.
struct Poller {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<Option<String>>>,
}

impl Poller {
    fn start(port: u16, expect: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU32::new(0));
        let thread = {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match post(port, "/cgi-bin/score", "ping") {
                        Ok((200, body)) if body.contains(expect) => {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        other => return Some(format!("{other:?}")),
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                None
            })
        };
        Self {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    fn answered(&self) -> u32 {
        self.answered.load(Ordering::SeqCst)
    }

    /// True while no request has failed.
    fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops; the first failure seen, if any.
    fn finish(mut self) -> (u32, Option<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let failure = self.thread.take().and_then(|t| t.join().ok()).flatten();
        (self.answered(), failure)
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Deploy → STARTING while the health path answers 503 (a probe was seen
/// and named) → READY only once the server says so → answers on the
/// loopback port it reports (`ss -ltn`) → `apps invoke` gets the echo →
/// remove stops and removes the container and frees the port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_becomes_ready_through_its_health_check_and_remove_frees_the_port() {
    let agent = AppsAgent::start();
    let mut c = agent.client().await;
    let app = deploy(&mut c, web_spec("web", "v1", false)).await;
    assert_eq!(app.spec.as_ref().map(|s| s.name.as_str()), Some("web"));

    let starting = wait_app(
        &mut c,
        "web",
        "failed probe while loading",
        Duration::from_secs(60),
        |a| a.last_probe.as_ref().is_some_and(|p| p.status_code == 503),
    )
    .await;
    assert_eq!(
        starting.state(),
        proto::AppState::Starting,
        "a 503 during startup is not ready: {starting:?}"
    );
    assert!(
        starting.reason.contains("starting"),
        "progress is reported: {}",
        starting.reason
    );
    let containers = app_containers(&agent.agent.instance_id, Some("web"), false);
    assert_eq!(containers.len(), 1, "one container: {containers:?}");

    // The model has loaded.
    docker_exec(&containers[0], &["touch", "/tmp/ready"]);
    let ready = wait_app(&mut c, "web", "READY", Duration::from_secs(30), |a| {
        a.state() == proto::AppState::Ready
    })
    .await;
    let probe = ready.last_probe.clone().expect("a last probe");
    assert!(probe.healthy && probe.status_code == 200, "{probe:?}");
    let url = endpoint(&ready, "http");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let port = port_of(&url);
    assert!(
        listening_on_loopback(port),
        "ss -ltn shows 127.0.0.1:{port}"
    );
    assert!(
        score(port, "hello").contains("tag=v1 method=POST\nhello"),
        "the echo"
    );

    // apps invoke through the CLI.
    let out = cli(
        &agent.agent.socket,
        &[
            "apps",
            "invoke",
            "web",
            "--path",
            "/cgi-bin/score",
            "--data",
            "from-cli",
        ],
    );
    assert!(
        out.status.success(),
        "apps invoke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("from-cli"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("status 200"));

    // A 404 on the health path is not healthy (a second app, no such path).
    let mut missing = web_spec("nopath", "v1", true);
    if let Some(proto::health_check::Probe::Http(http)) =
        missing.health.as_mut().and_then(|h| h.probe.as_mut())
    {
        http.path = "/no-such-path".into();
    }
    deploy(&mut c, missing).await;
    let seen = wait_app(
        &mut c,
        "nopath",
        "a 404 probe",
        Duration::from_secs(60),
        |a| a.last_probe.as_ref().is_some_and(|p| p.status_code == 404),
    )
    .await;
    assert!(
        !seen.last_probe.as_ref().unwrap().healthy && seen.state() == proto::AppState::Starting,
        "a 404 is not healthy: {seen:?}"
    );

    // Remove: the container goes, the port is free.
    c.remove_app(proto::RemoveAppRequest { name: "web".into() })
        .await
        .expect("remove");
    wait_until("the app is forgotten", Duration::from_secs(30), || {
        app_containers(&agent.agent.instance_id, Some("web"), true).is_empty()
    })
    .await;
    let gone = c
        .get_app(proto::GetAppRequest { name: "web".into() })
        .await
        .expect_err("removed");
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone}");
    assert!(!listening_on_loopback(port), "port {port} freed");
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port can be bound again");
}

async fn wait_until(what: &str, within: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "not {what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A crash (SIGKILL of the server, the container's PID 1) is restarted by
/// policy after the backoff and serves again; a 500 on the health path
/// turns it UNHEALTHY and it is restarted too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_unhealthy_are_restarted_by_policy() {
    let agent = AppsAgent::start();
    let mut c = agent.client().await;
    deploy(&mut c, web_spec("crashy", "v1", true)).await;
    let ready = wait_app(&mut c, "crashy", "READY", Duration::from_secs(60), |a| {
        a.state() == proto::AppState::Ready
    })
    .await;
    let port = port_of(&endpoint(&ready, "http"));
    let first = app_containers(&agent.agent.instance_id, Some("crashy"), false);
    assert_eq!(first.len(), 1);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(container_pid(&first[0])),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the server");
    let back = wait_app(
        &mut c,
        "crashy",
        "READY after the crash",
        Duration::from_secs(60),
        |a| a.state() == proto::AppState::Ready && a.restarts == 1,
    )
    .await;
    assert_eq!(back.last_exit_status, Some(137), "{back:?}");
    assert_eq!(
        port_of(&endpoint(&back, "http")),
        port,
        "the picked port is kept"
    );
    assert!(score(port, "again").contains("again"));
    let second = app_containers(&agent.agent.instance_id, Some("crashy"), true);
    assert_eq!(
        second.len(),
        1,
        "one container after the restart: {second:?}"
    );

    // Sick: 500 → UNHEALTHY (named) → restarted (a fresh container is well).
    docker_exec(&second[0], &["touch", "/tmp/sick"]);
    let sick = wait_app(
        &mut c,
        "crashy",
        "UNHEALTHY",
        Duration::from_secs(30),
        |a| a.state() == proto::AppState::Unhealthy,
    )
    .await;
    let probe = sick.last_probe.clone().expect("a probe");
    assert_eq!(probe.status_code, 500, "{probe:?}");
    wait_app(
        &mut c,
        "crashy",
        "READY after unhealthy",
        Duration::from_secs(60),
        |a| a.state() == proto::AppState::Ready && a.restarts == 2,
    )
    .await;
    assert!(score(port, "healed").contains("healed"));
}

/// A changed spec is a rolling replace: the new container starts beside the
/// old one, the old one keeps answering while the new one loads, and the
/// switch comes only when the new one is READY; then the old one is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_replace_keeps_the_old_container_serving_until_the_new_one_is_ready() {
    let agent = AppsAgent::start();
    let mut c = agent.client().await;
    deploy(&mut c, web_spec("roll", "v1", true)).await;
    let v1 = wait_app(&mut c, "roll", "READY", Duration::from_secs(60), |a| {
        a.state() == proto::AppState::Ready
    })
    .await;
    let old_url = endpoint(&v1, "http");
    let old_port = port_of(&old_url);
    let old = app_containers(&agent.agent.instance_id, Some("roll"), false);
    assert_eq!(old.len(), 1);
    let poller = Poller::start(old_port, "tag=v1");

    // v2 loads until the test says it is ready.
    let reply = deploy(&mut c, web_spec("roll", "v2", false)).await;
    assert!(reply.rollout.contains("rolling"), "{}", reply.rollout);
    let id = agent.agent.instance_id.clone();
    wait_until("the new container runs", Duration::from_secs(60), || {
        app_containers(&id, Some("roll"), false).len() == 2
    })
    .await;
    let new = app_containers(&id, Some("roll"), false)
        .into_iter()
        .find(|c| !old.contains(c))
        .expect("the new container");
    // While v2 loads (its health path refused 3 probes, as counted in the
    // container), v1 is what the app reports and what answers.
    let before = poller.answered();
    wait_until("3 probes of v2", Duration::from_secs(60), || {
        probes_of(&new) >= 3
    })
    .await;
    let during = get(&mut c, "roll").await;
    assert_eq!(endpoint(&during, "http"), old_url, "{during:?}");
    assert_eq!(during.state(), proto::AppState::Ready, "{during:?}");
    assert!(poller.alive(), "v1 answered every request while v2 loaded");
    assert!(poller.answered() > before, "v1 answered while v2 loaded");

    docker_exec(&new, &["touch", "/tmp/ready"]);
    let v2 = wait_app(&mut c, "roll", "the switch", Duration::from_secs(30), |a| {
        endpoint(a, "http") != old_url
    })
    .await;
    assert_eq!(v2.state(), proto::AppState::Ready, "{v2:?}");
    // v1 answered every request until the switch; afterwards it is stopped.
    let (answered, failure) = poller.finish();
    assert!(answered > 0);
    if let Some(failure) = &failure {
        // Allowed only once the record has switched (the old one stops then).
        assert!(
            failure.contains("connect") || failure.contains("read"),
            "v1 failed in an unexpected way: {failure}"
        );
    }
    let new_port = port_of(&endpoint(&v2, "http"));
    assert!(score(new_port, "x").contains("tag=v2"));
    wait_until(
        "the old container is removed",
        Duration::from_secs(30),
        || app_containers(&id, Some("roll"), true) == vec![new.clone()],
    )
    .await;
}

/// `kill -9` of the agent while an app serves: requests keep being answered
/// during the outage, the app is adopted (same container, no second one);
/// a container removed while the agent is down is not resurrected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_an_agent_kill_without_a_second_container() {
    let mut agent = AppsAgent::start();
    let mut c = agent.client().await;
    deploy(&mut c, web_spec("steady", "v1", true)).await;
    let ready = wait_app(&mut c, "steady", "READY", Duration::from_secs(60), |a| {
        a.state() == proto::AppState::Ready
    })
    .await;
    let port = port_of(&endpoint(&ready, "http"));
    let id = agent.agent.instance_id.clone();
    let before = app_containers(&id, Some("steady"), true);
    assert_eq!(before.len(), 1);

    let poller = Poller::start(port, "tag=v1");
    drop(c);
    agent.agent.crash_and_restart();
    let mut c = agent.client().await;
    let adopted = wait_app(
        &mut c,
        "steady",
        "READY after adoption",
        Duration::from_secs(60),
        |a| a.state() == proto::AppState::Ready,
    )
    .await;
    let (answered, failure) = poller.finish();
    assert_eq!(failure, None, "answered throughout the outage");
    assert!(answered > 0);
    assert_eq!(adopted.restarts, 0, "{adopted:?}");
    assert_eq!(port_of(&endpoint(&adopted, "http")), port);
    assert_eq!(
        app_containers(&id, Some("steady"), true),
        before,
        "the same container, no second one"
    );

    // Removed while the agent is down: not resurrected.
    drop(c);
    let _ = agent.agent.child.kill();
    let _ = agent.agent.child.wait();
    let out = Command::new("docker")
        .args(["rm", "-f", &before[0]])
        .output()
        .expect("docker rm");
    assert!(out.status.success());
    agent.agent.respawn();
    let mut c = agent.client().await;
    let stopped = wait_app(&mut c, "steady", "STOPPED", Duration::from_secs(60), |a| {
        a.state() == proto::AppState::Stopped
    })
    .await;
    assert!(!stopped.reason.is_empty(), "says why: {stopped:?}");
    assert!(app_containers(&id, Some("steady"), true).is_empty());
}

/// The inference preset end to end, through the CLI: a model directory
/// bind-mounted read-only at the Azure ML path, the conventions in the
/// environment, liveness `GET /`, and `apps invoke` scoring on `/score`
/// (busybox httpd answers `POST /score` with a redirect to `/score/`, which
/// invoke follows with the same POST).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_preset_answers_a_scoring_request() {
    let agent = AppsAgent::start();
    let model = agent.roots.path().join("model");
    std::fs::create_dir(&model).expect("model dir");
    std::fs::write(model.join("weights.txt"), "w=42\n").expect("weights");
    let server = r#"set -e
mkdir -p /www/cgi-bin /www/score
echo alive > /www/index.html
cat > /www/cgi-bin/index.cgi <<'EOF'
#!/bin/sh
printf 'Content-Type: application/json\r\n\r\n'
if touch "$AZUREML_MODEL_DIR/x" 2>/dev/null; then ro=no; else ro=yes; fi
printf '{"entry":"%s","model":"%s","read_only":"%s","input":%s}\n' \
  "$AZUREML_ENTRY_SCRIPT" "$(cat "$AZUREML_MODEL_DIR/weights.txt")" "$ro" "$(cat)"
EOF
chmod +x /www/cgi-bin/index.cgi
exec httpd -f -p 5001 -h /www
"#;
    let model_arg = model.display().to_string();
    let out = cli(
        &agent.agent.socket,
        &[
            "apps",
            "deploy",
            "model",
            "--image",
            IMAGE,
            "--inference-model",
            &model_arg,
            "--entry-script",
            "score.py",
            "--interval",
            "1",
            "--wait",
            "--",
            "sh",
            "-c",
            server,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "apps deploy --wait: {stderr}");
    assert!(
        stderr.contains("starting") && stderr.contains("ready"),
        "the states are shown: {stderr}"
    );

    let mut c = agent.client().await;
    let app = get(&mut c, "model").await;
    assert_eq!(app.state(), proto::AppState::Ready);
    let score_url = endpoint(&app, "score");
    assert!(
        score_url.starts_with("http://127.0.0.1:") && score_url.ends_with("/score"),
        "{score_url}"
    );

    let request = agent.roots.path().join("request.json");
    std::fs::write(&request, r#"{"data":[1,2,3]}"#).expect("request");
    let data = format!("@{}", request.display());
    let out = cli(
        &agent.agent.socket,
        &["apps", "invoke", "model", "--data", &data],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "apps invoke: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON answer");
    assert_eq!(answer["entry"], "score.py");
    assert_eq!(answer["model"], "w=42");
    assert_eq!(answer["read_only"], "yes", "the model is mounted read-only");
    assert_eq!(answer["input"]["data"][1], 2);
    assert!(
        !Path::new(&model).join("x").exists(),
        "nothing was written to the model"
    );
}

//! Helpers for black-box tests: start the real `instance-agent` binary on a
//! temporary socket and state dir, connect the generated tonic client, and
//! clean up (SIGKILL and temp dirs) even when a test fails.
#![allow(dead_code)]

pub mod booted_agent;
pub mod certs;
pub mod control_plane;
pub mod deb;
pub mod engine;
pub mod events;
pub mod fs;
#[cfg(feature = "test-util")]
pub mod fuse_site;
pub mod nspawn;
pub mod raw_h2;
pub mod rootfs;
pub mod users;

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Path of the binary under test: this build's, or
/// `$INSTANCE_AGENT_TEST_BIN` (to run a test against another build, e.g.
/// to see it fail on the code before a fix).
pub fn binary() -> PathBuf {
    std::env::var_os("INSTANCE_AGENT_TEST_BIN")
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_instance-agent")))
}

/// The resident set size of process `pid`, in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A running agent. Killed (SIGKILL) on drop if still running, and every
/// container labelled with its instance id is removed.
pub struct Agent {
    pub child: Child,
    pub instance_id: String,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    env: Vec<(String, String)>,
    /// Where the log and the logs dir are kept after the test (see
    /// [`captured_dir`]).
    pub captured: PathBuf,
}

fn spawn_agent(config_path: &Path, log_path: &Path, env: &[(String, String)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("log file");
    let mut command = Command::new(binary());
    command
        .args(["serve", "--config"])
        .arg(config_path)
        .env("RUST_LOG", "info,instance_agent=debug")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in env {
        command.env(k, v);
    }
    command.spawn().expect("spawn instance-agent")
}

/// How to start an agent.
pub struct AgentBuilder {
    config: String,
    env: Vec<(String, String)>,
    instance_id: String,
    state_dir: Option<PathBuf>,
}

impl Default for AgentBuilder {
    fn default() -> Self {
        Self {
            config: String::new(),
            env: Vec::new(),
            instance_id: format!("test-{}", uuid_like()),
            state_dir: None,
        }
    }
}

/// A unique-enough id for test resources (pid + time + counter).
pub fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{:x}{:x}{:x}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

impl AgentBuilder {
    /// Extra TOML appended to the generated config (paths are always set).
    pub fn config(mut self, toml: &str) -> Self {
        self.config.push_str(toml);
        self.config.push('\n');
        self
    }

    /// Sets `agent.instance_id` (a unique one is generated otherwise).
    pub fn instance_id(mut self, id: &str) -> Self {
        self.instance_id = id.into();
        self
    }

    /// Puts the state dir somewhere else (e.g. on a filesystem the test made).
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Spawns the agent and waits until its socket answers.
    pub fn start(self) -> Agent {
        let agent = self.spawn();
        agent.wait_ready(Duration::from_secs(20));
        agent
    }

    /// Spawns the agent without waiting.
    pub fn spawn(self) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let state_dir = self
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let config_path = dir.path().join("config.toml");
        let log_path = dir.path().join("agent.log");
        let config = format!(
            "[agent]\ninstance_id = {:?}\nsocket = {:?}\nstate_dir = {:?}\nlogs_dir = {:?}\nruntime_dir = {:?}\n{}",
            self.instance_id,
            socket,
            state_dir,
            dir.path().join("logs"),
            dir.path().join("run"),
            self.config
        );
        // Agents run in parallel: metrics stay off unless a test asks for them.
        let config = if config.contains("[metrics]") {
            config
        } else {
            format!("{config}\n[metrics]\nlisten = \"\"\n")
        };
        std::fs::write(&config_path, fix_tables(&config)).expect("write config");
        let child = spawn_agent(&config_path, &log_path, &self.env);
        Agent {
            child,
            instance_id: self.instance_id,
            env: self.env,
            dir,
            socket,
            state_dir,
            config_path,
            log_path,
            captured: captured_dir(),
        }
    }
}

/// `[agent]` keys given by a test are merged into the generated `[agent]`
/// table, since TOML forbids defining a table twice.
fn fix_tables(config: &str) -> String {
    let mut head = Vec::new();
    let mut rest = Vec::new();
    let mut in_agent = true;
    let mut seen_agent = false;
    for line in config.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if trimmed == "[agent]" {
                in_agent = true;
                if seen_agent {
                    continue;
                }
                seen_agent = true;
            } else {
                in_agent = false;
            }
        }
        if in_agent {
            head.push(line)
        } else {
            rest.push(line)
        }
    }
    let mut out = head.join("\n");
    out.push('\n');
    out.push_str(&rest.join("\n"));
    out.push('\n');
    out
}

impl Agent {
    pub fn builder() -> AgentBuilder {
        AgentBuilder::default()
    }

    /// Waits until the socket accepts connections.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Ok(Some(status)) = peek_exit(&self.child) {
                panic!("agent exited early with {status}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent not ready within {timeout:?}; log:\n{}", self.log());
    }

    /// The agent's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A gRPC channel to the agent.
    pub async fn channel(&self) -> Channel {
        connect(&self.socket).await
    }

    /// Sends a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .expect("send signal");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// [`Self::wait_exit`] without blocking the test's runtime: the
    /// connections of the clients the test dropped close meanwhile (an open
    /// one holds the agent's graceful stop until its grace ends).
    pub async fn exited(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn peek_exit(child: &Child) -> std::io::Result<Option<std::process::ExitStatus>> {
    // Child::try_wait needs &mut; peek through waitid with WNOWAIT instead.
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    match waitid(
        Id::Pid(pid),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
    ) {
        Ok(WaitStatus::StillAlive) => Ok(None),
        Ok(WaitStatus::Exited(_, code)) => Ok(Some(
            std::os::unix::process::ExitStatusExt::from_raw(code << 8),
        )),
        Ok(WaitStatus::Signaled(_, sig, _)) => Ok(Some(
            std::os::unix::process::ExitStatusExt::from_raw(sig as i32),
        )),
        Ok(_) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Agent {
    /// SIGKILLs the agent (a crash) and starts it again on the same config,
    /// state dir and socket, appending to the same log; waits until it
    /// answers.
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_agent(&self.config_path, &self.log_path, &self.env);
        self.wait_ready(Duration::from_secs(20));
    }

    /// Starts the agent again after a stop or a crash (killing it first if
    /// it still runs).
    pub fn respawn(&mut self) {
        self.crash_and_restart();
    }
}

/// Ids of the containers labelled with `instance_id`: running ones, or all.
pub fn containers(instance_id: &str, all: bool) -> Vec<String> {
    let filter = format!("label=io.instance-agent.instance={instance_id}");
    let list = if all { "-aq" } else { "-q" };
    Command::new("docker")
        .args(["ps", list, "--filter", &filter])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Removes every container labelled with `instance_id`.
pub fn remove_containers(instance_id: &str) {
    let ids = containers(instance_id, true);
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .args(["rm", "-f"])
            .args(&ids)
            .output();
    }
}

/// Runs `instance-agent serve` on a config file holding `text`, expecting it
/// to refuse to start; returns the exit code and stderr.
pub fn serve_refused(text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).expect("write config");
    let out = Command::new(binary())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .expect("run instance-agent");
    let kept = captured_dir();
    if std::fs::create_dir_all(&kept).is_ok() {
        let _ = std::fs::write(kept.join("agent.log"), &out.stderr);
    }
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_containers(&self.instance_id);
        // A create the agent sent just before it died can still land in the
        // engine after the first look (seen as leftover "Created"
        // containers): look again.
        std::thread::sleep(Duration::from_millis(300));
        remove_containers(&self.instance_id);
        // Before the temp dir goes: keep what the agent wrote, for the
        // suite-wide secret sweep (scripts/check-test-logs.sh).
        keep_logs(
            &self.log_path,
            &self.dir.path().join("logs"),
            &self.captured,
        );
        // blobfuse2 stand-ins mounted on its staging entries (a test that
        // failed leaves them), then the staged binds in its runtime dir,
        // which lead into other dirs: detached (deepest first) so that
        // removing the temp dir stays inside it.
        kill_standins_below(self.dir.path());
        detach_mounts_below(self.dir.path());
    }
}

/// SIGKILLs every blobfuse2 stand-in whose mount path is below `root`.
pub fn kill_standins_below(root: &Path) {
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let standin = args
            .first()
            .is_some_and(|a| a.ends_with(b"blobfuse2-standin"));
        let below = args
            .get(2)
            .is_some_and(|a| Path::new(std::ffi::OsStr::from_bytes(a)).starts_with(root));
        if standin && below {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Lazily unmounts every mount below `root` (this process's mountinfo),
/// deepest first.
pub fn detach_mounts_below(root: &Path) {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root) && p != root)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Where captured agent logs and the registered test secrets are kept:
/// `$INSTANCE_AGENT_TEST_LOGS` (scripts/test.sh sets it and empties it at
/// its start), else `target/test-logs` of this crate.
pub fn test_logs_root() -> PathBuf {
    std::env::var_os("INSTANCE_AGENT_TEST_LOGS")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-logs"))
}

/// The test binary's name without cargo's hash (`security`, `mounts`, ...).
fn test_binary_name() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let stem = exe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "test".into());
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
        _ => stem,
    }
}

/// A fresh directory name for one agent's captured files:
/// `<root>/<test-binary>-<pid>-<n>`.
pub fn captured_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    test_logs_root().join(format!(
        "{}-{}-{}",
        test_binary_name(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ))
}

/// Keeps the agent's log and the regular files below its logs dir (setup
/// logs, mount logs and output) in `into`. A hard link when the two are on
/// one filesystem (free), a copy otherwise. Best effort: a test must not
/// fail for this.
fn keep_logs(log: &Path, logs_dir: &Path, into: &Path) {
    fn keep(from: &Path, to: &Path) {
        if let Some(parent) = to.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if std::fs::hard_link(from, to).is_err() {
            let _ = std::fs::copy(from, to);
        }
    }
    fn walk(from: &Path, to: &Path) {
        let Ok(entries) = std::fs::read_dir(from) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let target = to.join(entry.file_name());
            if kind.is_dir() {
                walk(&entry.path(), &target);
            } else if kind.is_file() {
                keep(&entry.path(), &target);
            }
        }
    }
    if log.exists() {
        keep(log, &into.join("agent.log"));
    }
    walk(logs_dir, &into.join("logs"));
}

/// Registers `value` as a secret used by a test and returns it: after the
/// suite, scripts/check-test-logs.sh fails if it appears in any captured
/// agent log or logs dir. The list line names the registering source line
/// (never printed with the value).
#[track_caller]
pub fn secret(value: &str) -> String {
    register(value, std::panic::Location::caller());
    value.to_owned()
}

/// [`secret`] for several values (e.g. a test's constants); registering one
/// twice is harmless.
#[track_caller]
pub fn register_secrets(values: &[&str]) {
    let at = std::panic::Location::caller();
    for value in values {
        register(value, at);
    }
}

fn register(value: &str, at: &std::panic::Location<'_>) {
    use std::collections::BTreeSet;
    use std::io::Write;
    use std::sync::Mutex;
    static REGISTERED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    // A short or multi-line "secret" would make the sweep useless or wrong.
    assert!(
        value.len() >= 8 && !value.contains(['\n', '\r', '\t']),
        "{at}: a registered test secret needs 8 or more characters on one line"
    );
    if !REGISTERED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(value.to_owned())
    {
        return;
    }
    let root = test_logs_root();
    let _ = std::fs::create_dir_all(&root);
    let id = format!(
        "{}:{}:{} ({} pid {})",
        at.file(),
        at.line(),
        at.column(),
        test_binary_name(),
        std::process::id()
    );
    // One write per line on an O_APPEND file: lines from parallel test
    // binaries do not interleave.
    let line = format!("{id}\t{value}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("secrets.list"))
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(error) = written {
        panic!(
            "{at}: cannot register a test secret in {}: {error}",
            root.display()
        );
    }
}

/// A tonic channel over a Unix socket.
pub async fn connect(socket: &Path) -> Channel {
    try_connect(socket).await.expect("connect to agent")
}

/// A tonic channel over a Unix socket, or why there is none (the agent is
/// down or restarting).
pub async fn try_connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_owned();
    Endpoint::try_from("http://instance-agent.test")
        .expect("a static, valid URI")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

/// A job of the local busybox image that appends one line to
/// `<markers>/<id>` as its container starts (so the test counts runs
/// independently of the agent), then sleeps `sleep` seconds.
pub fn marked_job(id: &str, sleep: &str, markers: &Path) -> instance_agent::api::proto::JobSpec {
    use instance_agent::api::proto::{JobMount, JobSpec, job_mount::Source};
    JobSpec {
        id: id.into(),
        image: "instance-agent/busybox:test".into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("echo run >> /markers/{id}; sleep {sleep}"),
        ],
        mounts: vec![JobMount {
            source: Some(Source::HostPath(markers.display().to_string())),
            container_path: "/markers".into(),
            read_only: false,
        }],
        ..Default::default()
    }
}

/// How many times the job `id` of [`marked_job`] started.
pub fn runs(markers: &Path, id: &str) -> usize {
    std::fs::read_to_string(markers.join(id))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// True for the states a job never leaves.
pub fn is_final(state: instance_agent::api::proto::JobState) -> bool {
    use instance_agent::api::proto::JobState;
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::TimedOut
    )
}

/// Panics, showing what it printed, unless `output` is a success; `what`
/// names the command.
#[track_caller]
pub fn assert_success(what: &dyn std::fmt::Debug, output: &std::process::Output) {
    assert!(
        output.status.success(),
        "{what:?} failed with {}:\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `command`, which must succeed; returns what it printed.
#[track_caller]
pub fn run_ok(command: &mut Command) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert_success(command, &output);
    output
}

/// Runs the CLI with the given args against an agent's socket.
pub fn cli(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run cli")
}
/// A port that was free a moment ago (bound to port 0, read, released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// `GET path` with a hand-written HTTP/1.1 request; returns (status line, body).
pub fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// The value of the first sample line starting with `series` (name and labels).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Scrapes until `series` has `value`, or returns the last scrape after 30 s.
pub async fn scrape_until(port: u16, series: &str, value: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text) = http_get(port, "/metrics");
        assert!(status.contains("200"), "{status}");
        if sample(&text, series) == Some(value) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of the samples whose line starts with `prefix` (e.g. every state
/// of a one-hot gauge: 1 when exactly one is current).
pub fn sum_of(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls GetDiskUsage until `check` holds for the filesystem mounted at `mount`.
pub async fn wait_for_fs(
    client: &mut instance_agent::api::proto::disk_service_client::DiskServiceClient<Channel>,
    mount: &Path,
    what: &str,
    check: impl Fn(&instance_agent::api::proto::FilesystemUsage) -> bool,
) -> instance_agent::api::proto::FilesystemUsage {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let usage = client
            .get_disk_usage(instance_agent::api::proto::GetDiskUsageRequest {})
            .await
            .expect("GetDiskUsage")
            .into_inner();
        if let Some(fs) = usage
            .filesystems
            .iter()
            .find(|f| Path::new(&f.mount_point) == mount)
            && check(fs)
        {
            return fs.clone();
        }
        assert!(Instant::now() < deadline, "{what}: {usage:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

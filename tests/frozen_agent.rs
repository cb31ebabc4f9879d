//! The CLI against an agent that does not answer or goes away, with the
//! real binary: a frozen agent (SIGSTOP) is reported within seconds as not
//! answering (maybe hung or overloaded), by `status` and by `doctor`'s
//! daemon check; an agent killed while a call waits is reported as having
//! closed the connection (restarting or crashed), never as a permission
//! problem, and so is a socket that accepts and closes (an agent on its
//! way down), whether the close comes before or during the handshake. (A refused user is in `tests/security.rs`: it needs real
//! users.)

mod common;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Agent, binary};
use nix::sys::signal::Signal;

/// Runs the CLI with `args` against `agent`, killing it after `limit`.
fn cli_within(agent: &Agent, args: &[&str], limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let child = spawn_cli(&agent.socket, args);
    (wait_output(child, limit), started.elapsed())
}

fn spawn_cli(socket: &Path, args: &[&str]) -> Child {
    Command::new(binary())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the CLI")
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "the CLI was still waiting after {limit:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Connections waiting in the socket's accept queue (`ss -xl`'s Recv-Q).
fn queued_connections(agent: &Agent) -> usize {
    let out = Command::new("ss")
        .args(["-xlH", "src"])
        .arg(&agent.socket)
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Resumes the agent even when the test fails, so that Drop can reap it.
struct Stopped(nix::unistd::Pid);

impl Stopped {
    /// Stops `agent` and waits until it is stopped (the signal lands later).
    fn new(agent: &Agent) -> Self {
        agent.signal(Signal::SIGSTOP);
        let stopped = Self(nix::unistd::Pid::from_raw(agent.child.id() as i32));
        let stat = format!("/proc/{}/stat", agent.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        // The state follows the command name's closing parenthesis.
        while !std::fs::read_to_string(&stat).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        }) {
            assert!(Instant::now() < deadline, "the agent never stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
        stopped
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, Signal::SIGCONT);
    }
}

#[test]
fn a_frozen_agent_is_reported_within_seconds() {
    let agent = Agent::builder().start();
    let frozen = Stopped::new(&agent);

    let (out, took) = cli_within(&agent, &["status"], Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("status against a frozen agent: {took:?}: {stderr}");
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(stderr.contains("did not answer within 5 s"), "{stderr}");
    assert!(stderr.contains("hung or overloaded"), "{stderr}");
    assert!(
        stderr.contains("systemctl status instance-agent"),
        "{stderr}"
    );

    // Still overridable.
    let (out, took) = cli_within(
        &agent,
        &["--rpc-timeout", "1", "status"],
        Duration::from_secs(30),
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did not answer within 1 s"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (out, took) = cli_within(
        &agent,
        &["doctor", "--config", "/nonexistent/config.toml"],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("doctor against a frozen agent: {took:?}");
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    let daemon = stdout
        .lines()
        .skip_while(|l| !l.contains("daemon"))
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(daemon.contains("FAIL"), "{stdout}");
    assert!(daemon.contains("does not answer"), "{stdout}");
    assert!(stdout.contains("hung or overloaded"), "{stdout}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    drop(frozen);
}

#[test]
fn an_agent_killed_during_a_call_is_reported_as_closing_the_connection() {
    let mut agent = Agent::builder().start();
    let frozen = Stopped::new(&agent);
    // The harness's own readiness probe may still sit in the queue.
    let before = queued_connections(&agent);
    let waiting = spawn_cli(&agent.socket, &["--rpc-timeout", "60", "status"]);
    // The call waits in the frozen agent's accept queue; then the agent dies.
    let deadline = Instant::now() + Duration::from_secs(20);
    while queued_connections(&agent) <= before {
        assert!(Instant::now() < deadline, "the CLI never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.child.kill().expect("kill");
    drop(frozen);
    let _ = agent.child.wait();
    let out = wait_output(waiting, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("status when the agent dies: {stderr}");
    assert!(!out.status.success());
    assert!(
        stderr.contains("closed the connection (restarting or crashed?)"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("operator"),
        "not a permission problem: {stderr}"
    );
}

/// A stand-in for an agent on its way down: it accepts connections and
/// closes each, at once or after reading what the client sent first, until
/// dropped.
struct ClosingSocket {
    path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl ClosingSocket {
    fn new() -> Self {
        use std::io::Read;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                if n % 2 == 1 {
                    let _ = stream.read(&mut [0u8; 64]);
                }
            }
        });
        Self {
            path,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }
}

impl Drop for ClosingSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn a_socket_closed_without_a_word_is_always_reported_as_a_restarting_or_crashed_agent() {
    let closing = ClosingSocket::new();
    let mut lines = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..20 {
        let out = wait_output(
            spawn_cli(&closing.path, &["status"]),
            Duration::from_secs(30),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        *lines.entry(stderr.clone()).or_default() += 1;
        assert_eq!(out.status.code(), Some(69), "{stderr}");
        assert!(
            stderr.contains("closed the connection (restarting or crashed?)"),
            "{stderr}"
        );
        assert!(!stderr.contains("operator"), "{stderr}");
    }
    println!("status, 20 times against a socket that closes: {lines:?}");
    for _ in 0..4 {
        let out = wait_output(
            spawn_cli(
                &closing.path,
                &["doctor", "--config", "/nonexistent/config.toml"],
            ),
            Duration::from_secs(30),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("closed the connection (restarting or crashed?)"),
            "{stdout}"
        );
    }
}

//! Shared pieces of the benchmark binaries: start the release agent on a temp
//! socket, talk to it, read its RSS and CPU time from /proc.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// The release binary (scripts/bench.sh builds it first).
pub fn binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let release = root.join("target/release/instance-agent");
    assert!(release.exists(), "build it first: cargo build --release");
    release
}

/// A running agent in a temp dir; killed on drop.
pub struct BenchAgent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
}

impl BenchAgent {
    /// Starts the agent with `extra` TOML and waits for its socket.
    pub fn start(extra: &str) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// Starts the agent with `extra` TOML and extra environment.
    pub fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, config) = write_config(dir.path(), extra);
        let child = spawn(&config, env);
        let agent = Self {
            child,
            dir,
            socket,
            config,
        };
        agent.wait_ready();
        agent
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "agent did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn channel(&self) -> Channel {
        connect(&self.socket).await
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a config with paths in `dir`; returns (socket, config path).
pub fn write_config(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let socket = dir.join("agent.sock");
    let config = dir.join("config.toml");
    let text = format!(
        // Benches measure the agent's own capacity: the per-peer request
        // rate limit is lifted ([limits] must then not appear in `extra`).
        "[agent]\ninstance_id = \"bench-{}\"\nsocket = {:?}\nstate_dir = {:?}\nlogs_dir = {:?}\nruntime_dir = {:?}\n\
         [limits]\nrequests_per_second_per_peer = 1000000\nrequest_burst_per_peer = 1000000\n{extra}",
        std::process::id(),
        socket,
        dir.join("state"),
        dir.join("logs"),
        dir.join("run"),
    );
    std::fs::write(&config, text).expect("write config");
    (socket, config)
}

/// Spawns `instance-agent serve --config` with extra environment.
pub fn spawn(config: &Path, env: &[(&str, &str)]) -> Child {
    let mut command = Command::new(binary());
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    command.spawn().expect("spawn agent")
}

pub async fn connect(socket: &Path) -> Channel {
    let path = socket.to_owned();
    Endpoint::try_from("http://bench.local")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect")
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    utime + stime
}

/// Clock ticks per second (USER_HZ).
pub fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |v| v as u64)
}

/// The p-th percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One line describing the machine, for the README's tables.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cores} cores ({cpu})")
}

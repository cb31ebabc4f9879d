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

/// Metrics on, on a port of the kernel's choosing, so that a bench agent
/// never collides with another agent on the default port (9464).
pub const METRICS_ON: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

/// Writes a config with paths in `dir`; returns (socket, config path).
/// Metrics are on ([`METRICS_ON`], as in production) unless `extra` has its
/// own `[metrics]` table.
pub fn write_config(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let socket = dir.join("agent.sock");
    let config = dir.join("config.toml");
    let metrics = if extra.contains("[metrics]") {
        ""
    } else {
        METRICS_ON
    };
    let text = format!(
        // Benches measure the agent's own capacity: the per-peer request
        // rate limit is lifted ([limits] must then not appear in `extra`).
        "[agent]\ninstance_id = \"bench-{}\"\nsocket = {:?}\nstate_dir = {:?}\nlogs_dir = {:?}\nruntime_dir = {:?}\n\
         [limits]\nrequests_per_second_per_peer = 1000000\nrequest_burst_per_peer = 1000000\n{metrics}{extra}",
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

/// A positive number from the environment variable `name`, else `default`.
pub fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
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

/// Fills the store of `state_dir` with `count` finished jobs (exited 0), the
/// way the agent leaves them: the spec normalised by the agent's own
/// validation, the record moved through the agent's state machine
/// (queued → starting → running → succeeded), written as JSON into the
/// agent's `jobs.records` table through the agent's store. The only
/// difference from a real history is that the records are written 500 to a
/// transaction instead of four transactions per job, which takes seconds
/// rather than the hours that 10,000 real jobs take.
pub fn seed_finished_jobs(state_dir: &Path, count: usize) {
    use std::collections::BTreeMap;

    use instance_agent::jobs::config::JobsConfig;
    use instance_agent::jobs::manager::RECORDS;
    use instance_agent::jobs::spec::{self, HostLimits};
    use instance_agent::jobs::{JobRecord, JobSpec, JobState};
    use instance_agent::store::{Store, Write};

    std::fs::create_dir_all(state_dir).expect("state dir");
    let store = Store::open(state_dir).expect("open the store");
    let config = JobsConfig::default();
    let host = HostLimits {
        capacity: 4,
        usable_cores: 2.0,
        memory_bytes: 8 << 30,
        gpus: 0,
    };
    let mut batch = Vec::new();
    for seq in 0..count {
        let raw = JobSpec {
            id: format!("finished-{seq:05}"),
            image: "registry.example/ml/train:1.4".into(),
            command: ["python", "train.py", "--lr", "0.001", "--epochs", "10"]
                .map(String::from)
                .to_vec(),
            env: BTreeMap::from([
                ("EPOCHS".to_owned(), "10".to_owned()),
                ("DATA".to_owned(), "/mnt/data/set-a".to_owned()),
            ]),
            labels: BTreeMap::from([
                ("team".to_owned(), "vision".to_owned()),
                ("sweep".to_owned(), format!("s{}", seq / 100)),
            ]),
            ..Default::default()
        };
        let spec = spec::validate(raw, &config, host).expect("a valid spec");
        let mut record = JobRecord::queued(spec, seq as u64 + 1);
        assert!(record.transition(JobState::Starting, "creating the container"));
        record.container_id = format!("{:064x}", seq + 1);
        assert!(record.transition(JobState::Running, "running"));
        record.exit_code = Some(0);
        assert!(record.transition(JobState::Succeeded, "exited with status 0"));
        batch.push(Write::put(RECORDS, record.id(), &record));
        if batch.len() == 500 {
            store
                .apply_blocking(std::mem::take(&mut batch))
                .expect("write");
        }
    }
    store.apply_blocking(batch).expect("write");
}

/// Starts the agent with `config` and a notify socket; returns the child and
/// the time from spawn to READY=1.
pub fn spawn_until_ready(config: &Path, notify_dir: &Path) -> (Child, Duration) {
    let notify_path = notify_dir.join("notify.sock");
    let _ = std::fs::remove_file(&notify_path);
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let started = Instant::now();
    let mut child = spawn(
        config,
        &[("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8"))],
    );
    let mut buf = [0u8; 4096];
    loop {
        match notify.recv(&mut buf) {
            Ok(n) if String::from_utf8_lossy(&buf[..n]).contains("READY=1") => {
                return (child, started.elapsed());
            }
            Ok(_) => {}
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no READY=1 within 30 s: {error}");
            }
        }
    }
}

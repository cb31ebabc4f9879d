//! The agent's configuration: types, defaults, loading and validation.
//!
//! Owns the TOML schema (`/etc/instance-agent/config.toml`), the commented
//! default file printed by `instance-agent config default`, and which keys can
//! change while the agent runs. It reads the file and nothing else: applying a
//! change is the daemon's business.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the agent looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/instance-agent/config.toml";

/// The complete, commented default configuration. A unit test keeps it equal
/// to [`Config::default`], so the docs cannot drift from the code.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("config/default.toml");

/// Keys that take effect without a restart; every other key needs one.
/// A prefix ending in `.` covers a whole table.
pub(crate) const LIVE_KEYS: &[&str] = &[
    "agent.status_interval_seconds",
    "docker.check_interval_seconds",
    "events.backlog",
    "jobs.",
    "mounts.health_interval_seconds",
    "disk.",
    "control_plane.uids",
    "operator.allow_cancel_job",
    "limits.max_streams_per_peer",
    "limits.requests_per_second_per_peer",
    "limits.request_burst_per_peer",
];

/// A config that failed to load. Each variant names the file; `Invalid` also
/// names the key and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type).
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and its position.
        message: String,
    },
    /// A value of the file is out of range or inconsistent, at a known line
    /// (what [`Config::parse`] turns an `Invalid` into when the key is in the
    /// text).
    #[error("config {path}: line {line}: key `{key}`: {problem}")]
    InvalidAt {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key in the file.
        line: usize,
        /// Dotted key, e.g. `agent.shutdown_grace_seconds`.
        key: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config {path}: key `{key}`: {problem}")]
    Invalid {
        /// The file, or `<flags>` for command-line overrides.
        path: PathBuf,
        /// Dotted key, e.g. `agent.shutdown_grace_seconds`.
        key: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The agent process itself.
    pub agent: AgentConfig,
    /// The TCP listener for the control plane.
    pub control_plane: ControlPlaneConfig,
    /// The Docker engine.
    pub docker: DockerConfig,
    /// The event stream.
    pub events: EventsConfig,
    /// The job queue.
    pub jobs: JobsConfig,
    /// File share mounts (blobfuse2).
    pub mounts: MountsConfig,
    /// Setup scripts.
    pub setup: SetupConfig,
    /// The disk guard.
    pub disk: DiskConfig,
    /// Local operators on the Unix socket.
    pub operator: OperatorConfig,
    /// Limits on every client, whatever the RPC.
    pub limits: LimitsConfig,
    /// The Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
}

/// `[agent]`: identity, paths and timings of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This instance's id; generated once and kept in the state dir when empty.
    pub instance_id: String,
    /// The Unix socket for operators and local tools.
    pub socket: PathBuf,
    /// Durable state (the store).
    pub state_dir: PathBuf,
    /// Logs of jobs, setup scripts and mounts.
    pub logs_dir: PathBuf,
    /// Runtime files (mount configs).
    pub runtime_dir: PathBuf,
    /// How long in-flight RPCs and tasks may run after SIGTERM.
    pub shutdown_grace_seconds: u32,
    /// How often the systemd STATUS= line is refreshed.
    pub status_interval_seconds: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            instance_id: String::new(),
            socket: PathBuf::from("/run/instance-agent/agent.sock"),
            state_dir: PathBuf::from("/var/lib/instance-agent"),
            logs_dir: PathBuf::from("/var/log/instance-agent"),
            runtime_dir: PathBuf::from("/run/instance-agent"),
            shutdown_grace_seconds: 10,
            status_interval_seconds: 5,
        }
    }
}

/// `[control_plane]`: the TCP listener the control plane calls (mutual TLS),
/// and which local uids count as the control plane on the Unix socket.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// `ip:port` to listen on (host names are not resolved); off when empty.
    pub listen: String,
    /// The listener's certificate chain (PEM).
    pub tls_cert: PathBuf,
    /// The listener's private key (PEM); refused if group or others can read it.
    pub tls_key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to.
    pub client_ca: PathBuf,
    /// Client certificate names (subject CN or DNS SAN, ASCII case
    /// ignored) allowed; any name signed by `client_ca` when empty.
    pub allowed_client_names: Vec<String>,
    /// Local uids that are admin on the Unix socket (root always is).
    pub uids: Vec<u32>,
    /// Serve plain HTTP/2 without TLS. Allowed only on a loopback address.
    pub insecure_plaintext: bool,
}

/// `[docker]`: how to reach the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// The engine's Unix socket.
    pub socket: PathBuf,
    /// How often the engine is pinged while it answers (backoff while it does not).
    pub check_interval_seconds: u32,
    /// Deadline for each call to the engine.
    pub request_timeout_seconds: u32,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/var/run/docker.sock"),
            check_interval_seconds: 10,
            request_timeout_seconds: 30,
        }
    }
}

/// `[events]`: the `WatchEvents` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Events kept for clients that reconnect with `since`.
    pub backlog: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self { backlog: 4096 }
    }
}

/// `[jobs]`: the Docker-backed job queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Slots per usable CPU core (cgroup quota and cpuset applied).
    pub slots_per_core: u32,
    /// Absolute slot capacity; overrides `slots_per_core` when above 0.
    pub slots: u32,
    /// Jobs waiting at most; SubmitJob answers RESOURCE_EXHAUSTED past it.
    pub max_queue: u32,
    /// Seconds a job that does not fit may be overtaken by smaller ones
    /// before it reserves the slots it needs.
    pub reserve_after_seconds: u32,
    /// Seconds between SIGTERM and SIGKILL on cancel or timeout.
    pub kill_grace_seconds: u32,
    /// Timeout of a job that sets none (0 = no timeout).
    pub default_timeout_seconds: u32,
    /// Memory limit of a job that sets none (0 = no limit).
    pub default_memory_bytes: u64,
    /// Process limit inside each job container (0 = no limit).
    pub pids_limit: u32,
    /// Networks a job may ask for; `none` is always allowed.
    pub allowed_networks: Vec<String>,
    /// Roots under which a job may bind-mount host paths.
    pub allowed_host_roots: Vec<PathBuf>,
    /// Keep containers after their exit is recorded (for debugging).
    pub keep_containers: bool,
    /// Captured output kept per job; the oldest part is dropped past it.
    pub log_max_bytes: u64,
    /// Finished jobs and their logs are removed after this many seconds.
    pub retention_seconds: u64,
    /// At most this many finished jobs are kept; the oldest go first.
    pub retention_count: u32,
    /// Under disk pressure, the logs of jobs finished longer ago than this
    /// are deleted first (their records stay).
    pub log_retention_seconds: u64,
    /// Environment entries per job.
    pub max_env_entries: u32,
    /// Total bytes of environment names and values per job.
    pub max_env_bytes: u32,
    /// Labels per job.
    pub max_labels: u32,
    /// Arguments in a job's command.
    pub max_command_args: u32,
    /// Total bytes of a job's command.
    pub max_command_bytes: u32,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            slots_per_core: 2,
            slots: 0,
            max_queue: 10_000,
            reserve_after_seconds: 60,
            kill_grace_seconds: 10,
            default_timeout_seconds: 0,
            default_memory_bytes: 0,
            pids_limit: 4096,
            allowed_networks: vec!["none".into()],
            allowed_host_roots: vec![PathBuf::from("/home"), PathBuf::from("/mnt")],
            keep_containers: false,
            log_max_bytes: 16 << 20,
            retention_seconds: 7 * 86_400,
            retention_count: 10_000,
            log_retention_seconds: 86_400,
            max_env_entries: 256,
            max_env_bytes: 64 << 10,
            max_labels: 64,
            max_command_args: 4096,
            max_command_bytes: 128 << 10,
        }
    }
}

/// `[mounts]`: file share mounts with blobfuse2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MountsConfig {
    /// The blobfuse2 program (looked up in PATH when not absolute).
    pub blobfuse2_path: PathBuf,
    /// Mount paths must lie strictly below one of these.
    pub allowed_roots: Vec<PathBuf>,
    /// Per-mount cache dirs go below this by default (the temp disk).
    pub cache_root: PathBuf,
    /// `file_cache.max-size-mb` of a mount that does not set its own, in bytes.
    pub default_cache_max_bytes: u64,
    /// How often each mount's health is checked.
    pub health_interval_seconds: u32,
    /// How long a health check may take before the mount counts as stale.
    pub health_timeout_seconds: u32,
    /// How long a new mount may take to appear in mountinfo.
    pub mount_timeout_seconds: u32,
    /// First delay before mounting again after a failure (doubles each time).
    pub backoff_initial_seconds: u32,
    /// Longest delay between mount attempts.
    pub backoff_max_seconds: u32,
    /// Mounts declared here (`[[mounts.mount]]`), mounted at every start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mount: Vec<DeclaredMount>,
}

impl Default for MountsConfig {
    fn default() -> Self {
        Self {
            blobfuse2_path: PathBuf::from("blobfuse2"),
            allowed_roots: vec![PathBuf::from("/mnt"), PathBuf::from("/home")],
            cache_root: PathBuf::from("/mnt/instance-agent/cache"),
            default_cache_max_bytes: 4 << 30,
            health_interval_seconds: 10,
            health_timeout_seconds: 5,
            mount_timeout_seconds: 30,
            backoff_initial_seconds: 1,
            backoff_max_seconds: 300,
            mount: Vec::new(),
        }
    }
}

/// `[[mounts.mount]]`: a mount declared in config. Secrets are never inline:
/// `secret_file` names a file (mode 0600) holding the key or SAS token.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeclaredMount {
    /// Unique name ([A-Za-z0-9_.-], at most 64 characters).
    pub name: String,
    /// Storage account.
    pub account: String,
    /// Blob container.
    pub container: String,
    /// Absolute path below one of `mounts.allowed_roots`.
    pub mount_path: PathBuf,
    /// "key", "sas" or "msi".
    pub auth: String,
    /// For "key" and "sas": the file holding the secret.
    pub secret_file: PathBuf,
    /// For "msi": a user-assigned identity's client id (all empty: system-assigned).
    pub client_id: String,
    /// For "msi": a user-assigned identity's resource id.
    pub resource_id: String,
    /// For "msi": a user-assigned identity's object id.
    pub object_id: String,
    /// Mount read-only.
    pub read_only: bool,
    /// Cache dir; `<cache_root>/<name>` when empty.
    pub cache_dir: PathBuf,
    /// Cache cap in bytes; `default_cache_max_bytes` when 0.
    pub cache_max_bytes: u64,
    /// Blob endpoint; `https://<account>.blob.core.windows.net` when empty.
    pub endpoint: String,
    /// Mount only this virtual directory of the container.
    pub subdirectory: String,
}

/// Checks that a key's value lies in `min..=max`.
type RangeCheck<'a> = &'a dyn Fn(&str, u64, u64, u64) -> Result<(), ConfigError>;

/// `[setup]`: creation and startup scripts and how scripts are run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SetupConfig {
    /// Hold the job queue until the creation script has succeeded.
    pub gate_jobs: bool,
    /// Seconds between SIGTERM and SIGKILL when a script's tree is stopped.
    pub kill_grace_seconds: u32,
    /// Stop what a script left running when it exits.
    pub kill_leftovers: bool,
    /// Bytes of a run's log file kept from its start.
    pub log_head_bytes: u64,
    /// Bytes of a run's log kept from its end (also the memory held per running script).
    pub log_tail_bytes: u64,
    /// Lines kept in a run's `log_tail`.
    pub log_tail_lines: u32,
    /// Largest inline script accepted over the API.
    pub max_script_bytes: u64,
    /// Arguments of one script, at most.
    pub max_args: u32,
    /// Bytes of one argument or one environment value, at most.
    pub max_arg_bytes: u32,
    /// Environment variables of one request, at most.
    pub max_env_entries: u32,
    /// Bytes of one request's environment (`NAME=value` each), at most.
    pub max_env_bytes: u32,
    /// Runs accepted but not started yet, at most.
    pub max_pending_runs: u32,
    /// Finished runs kept (records and logs); the latest creation run is always kept.
    pub keep_runs: u32,
    /// `CI_NAME` for scripts; the host name when empty.
    pub ci_name: String,
    /// `CI_WORKSPACE` for scripts.
    pub ci_workspace: String,
    /// `CI_RESOURCE_GROUP` for scripts.
    pub ci_resource_group: String,
    /// `CI_LOCAL_UBUNTU_USER` for scripts.
    pub ci_local_ubuntu_user: String,
    /// Scripts declared here: at most one creation script, any number of startup scripts.
    pub scripts: Vec<SetupScriptConfig>,
}

impl Default for SetupConfig {
    fn default() -> Self {
        Self {
            gate_jobs: true,
            kill_grace_seconds: 10,
            kill_leftovers: true,
            log_head_bytes: 4 << 20,
            log_tail_bytes: 1 << 20,
            log_tail_lines: 20,
            max_script_bytes: 1 << 20,
            max_args: 1024,
            max_arg_bytes: 128 << 10,
            max_env_entries: 1024,
            max_env_bytes: 1 << 20,
            max_pending_runs: 32,
            keep_runs: 100,
            ci_name: String::new(),
            ci_workspace: String::new(),
            ci_resource_group: String::new(),
            ci_local_ubuntu_user: "azureuser".into(),
            scripts: Vec::new(),
        }
    }
}

/// When a configured script runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetupScriptKind {
    /// Once in the instance's life.
    Creation,
    /// At every agent start.
    Startup,
}

/// One `[[setup.scripts]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupScriptConfig {
    /// `creation` or `startup`.
    pub kind: SetupScriptKind,
    /// Absolute path of the script.
    pub path: PathBuf,
    /// Arguments, seen as $1, $2, ...
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A duration with suffix s, m, h or d (e.g. "15m").
    #[serde(default = "default_setup_timeout")]
    pub timeout: String,
    /// User to run as; root when empty.
    #[serde(default)]
    pub run_as: String,
    /// Working directory (absolute); the user's home when empty.
    #[serde(default)]
    pub working_dir: PathBuf,
}

fn default_setup_timeout() -> String {
    "15m".into()
}

impl SetupScriptConfig {
    /// The timeout; validated at load, so the fallback (15 minutes) is never used.
    pub fn timeout(&self) -> std::time::Duration {
        parse_duration(&self.timeout).unwrap_or(std::time::Duration::from_secs(900))
    }
}

/// Longest timeout a setup script may have (7 days).
pub const MAX_SETUP_TIMEOUT_SECONDS: u64 = 7 * 86_400;

/// Parses a duration such as `90s`, `15m`, `2h` or `1d` (a whole number and
/// one suffix); `None` when it is not one.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let text = text.trim();
    let split = text.len().checked_sub(1)?;
    let (number, suffix) = text.split_at(split);
    let unit = match suffix {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return None,
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds = number.parse::<u64>().ok()?.checked_mul(unit)?;
    Some(std::time::Duration::from_secs(seconds))
}

/// Whether `name` is a POSIX environment variable name.
pub fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `[disk]`: the disk guard's levels, timings and extra paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskConfig {
    /// Milliseconds between samples of every watched filesystem.
    pub interval_ms: u32,
    /// Milliseconds a sample may take before its filesystem is reported unresponsive.
    pub sample_timeout_ms: u32,
    /// Free bytes below which a filesystem is critical (the recovery floor).
    pub critical_free_bytes: u64,
    /// Free bytes below which a filesystem is in warning.
    pub warning_free_bytes: u64,
    /// Free inodes, in percent of all inodes, below which a filesystem is critical.
    pub critical_free_inodes_percent: f64,
    /// Free inodes, in percent of all inodes, below which a filesystem is in warning.
    pub warning_free_inodes_percent: f64,
    /// Free bytes needed above a level before the state may improve.
    pub clear_margin_bytes: u64,
    /// Free inodes (percent) needed above a level before the state may improve.
    pub clear_margin_inodes_percent: f64,
    /// Seconds the improvement must hold before the state improves.
    pub transition_seconds: u32,
    /// Extra paths to watch, besides /, /tmp, /mnt, the Docker data root,
    /// the state dir and the mount caches.
    pub paths: Vec<PathBuf>,
    /// Levels for the filesystem holding a path, by path (each path is also watched).
    pub overrides: BTreeMap<String, DiskOverride>,
    /// Reclaim space by itself when a watched filesystem turns critical.
    pub auto_reclaim: bool,
    /// Bytes preallocated in the state dir and released when its filesystem
    /// turns critical, so that the agent's own writes still succeed; 0 turns it off.
    pub reserve_bytes: u64,
}

const GIB: u64 = 1 << 30;

impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            sample_timeout_ms: 3000,
            critical_free_bytes: 5 * GIB,
            warning_free_bytes: 10 * GIB,
            critical_free_inodes_percent: 5.0,
            warning_free_inodes_percent: 10.0,
            clear_margin_bytes: GIB,
            clear_margin_inodes_percent: 1.0,
            transition_seconds: 30,
            paths: Vec::new(),
            overrides: BTreeMap::new(),
            auto_reclaim: true,
            reserve_bytes: 64 << 20,
        }
    }
}

/// `[disk.overrides."PATH"]`: levels for the filesystem holding PATH; an
/// absent key keeps the `[disk]` value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskOverride {
    /// Replaces `disk.critical_free_bytes`.
    pub critical_free_bytes: Option<u64>,
    /// Replaces `disk.warning_free_bytes`.
    pub warning_free_bytes: Option<u64>,
    /// Replaces `disk.critical_free_inodes_percent`.
    pub critical_free_inodes_percent: Option<f64>,
    /// Replaces `disk.warning_free_inodes_percent`.
    pub warning_free_inodes_percent: Option<f64>,
    /// Replaces `disk.clear_margin_bytes`.
    pub clear_margin_bytes: Option<u64>,
}

/// `[operator]`: the local operators' group and what it may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OperatorConfig {
    /// Members of this group get the operator role on the Unix socket, which
    /// is owned by it (mode 0660).
    pub group: String,
    /// Let operators cancel jobs.
    pub allow_cancel_job: bool,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            group: "instance-operators".into(),
            allow_cancel_job: false,
        }
    }
}

/// `[limits]`: bounds applied to every client before any service runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request message, in bytes.
    pub max_message_bytes: u32,
    /// Streaming RPCs (WatchEvents, Stream*, Watch*) one peer may hold open.
    pub max_streams_per_peer: u32,
    /// Requests per second one peer may sustain (token bucket refill).
    pub requests_per_second_per_peer: u32,
    /// Requests one peer may send in a burst (token bucket size).
    pub request_burst_per_peer: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            max_streams_per_peer: 32,
            requests_per_second_per_peer: 200,
            request_burst_per_peer: 400,
        }
    }
}

/// `[metrics]`: the Prometheus text endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Loopback host:port serving `GET /metrics`; off when empty.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// Command-line flags that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
}

impl Config {
    /// Loads `path`; a missing file means all defaults only when `path` is the
    /// default location (a file named on the command line must exist).
    pub fn load(path: &Path, must_exist: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                let config = Config::default();
                config.validate(path)?;
                return Ok(config);
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` is only used in messages, which
    /// name the line (when known), the dotted key and what is allowed.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse_error = |message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let document = toml::de::Deserializer::parse(text)
            .map_err(|e| parse_error(syntax_message(&e, text)))?;
        let config: Config = serde_path_to_error::deserialize(document)
            .map_err(|e| parse_error(schema_message(&e, text)))?;
        config.validate(path).map_err(|error| match error {
            ConfigError::Invalid { path, key, problem } => match key_line(text, &key) {
                Some(line) => ConfigError::InvalidAt {
                    path,
                    line,
                    key,
                    problem,
                },
                None => ConfigError::Invalid { path, key, problem },
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Applies command-line overrides. With `--state-dir DIR`, the other
    /// directories still at their built-in defaults (root paths under /var/log,
    /// /run and /mnt) move under DIR too, so the agent runs anywhere without
    /// root paths: `agent.logs_dir` = DIR/logs, `agent.runtime_dir` = DIR/run,
    /// `mounts.cache_root` = DIR/cache. Returns the keys so derived.
    pub fn apply(&mut self, overrides: &Overrides) -> Vec<&'static str> {
        if let Some(socket) = &overrides.socket {
            self.agent.socket = socket.clone();
        }
        let mut derived = Vec::new();
        if let Some(state_dir) = &overrides.state_dir {
            self.agent.state_dir = state_dir.clone();
            let agent = AgentConfig::default();
            let mounts = MountsConfig::default();
            for (key, value, default, below) in [
                (
                    "agent.logs_dir",
                    &mut self.agent.logs_dir,
                    agent.logs_dir,
                    "logs",
                ),
                (
                    "agent.runtime_dir",
                    &mut self.agent.runtime_dir,
                    agent.runtime_dir,
                    "run",
                ),
                (
                    "mounts.cache_root",
                    &mut self.mounts.cache_root,
                    mounts.cache_root,
                    "cache",
                ),
            ] {
                if *value == default {
                    *value = state_dir.join(below);
                    derived.push(key);
                }
            }
        }
        derived
    }

    /// Checks ranges and consistency; the same rules serve values arriving over the API.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let check = Checker { path, table: "" };
        let invalid = |key: &str, problem: String| check.invalid(key, problem);
        let in_range =
            |key: &str, value: u64, min: u64, max: u64| check.in_range(key, value, min, max);
        for (key, dir) in [
            ("agent.socket", &self.agent.socket),
            ("agent.state_dir", &self.agent.state_dir),
            ("agent.logs_dir", &self.agent.logs_dir),
            ("agent.runtime_dir", &self.agent.runtime_dir),
            ("docker.socket", &self.docker.socket),
        ] {
            if !dir.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} must be an absolute path", dir.display()),
                ));
            }
        }
        let id = &self.agent.instance_id;
        if id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "agent.instance_id",
                format!("{id:?} must be at most 64 characters of [A-Za-z0-9_-]"),
            ));
        }
        in_range(
            "agent.shutdown_grace_seconds",
            self.agent.shutdown_grace_seconds.into(),
            1,
            300,
        )?;
        in_range(
            "agent.status_interval_seconds",
            self.agent.status_interval_seconds.into(),
            1,
            3600,
        )?;
        in_range(
            "docker.check_interval_seconds",
            self.docker.check_interval_seconds.into(),
            1,
            3600,
        )?;
        in_range(
            "docker.request_timeout_seconds",
            self.docker.request_timeout_seconds.into(),
            1,
            600,
        )?;
        in_range("events.backlog", self.events.backlog.into(), 16, 1_000_000)?;
        self.validate_jobs(path)?;
        self.validate_mounts(&invalid, &in_range)?;
        self.validate_setup(&invalid, &in_range)?;
        self.validate_disk(path)?;
        self.validate_metrics(&invalid)?;
        self.validate_control_plane(path)?;
        self.validate_operator(path)?;
        self.validate_limits(path)?;
        Ok(())
    }

    fn validate_control_plane(&self, path: &Path) -> Result<(), ConfigError> {
        let cp = &self.control_plane;
        let check = Checker {
            path,
            table: "control_plane.",
        };
        let invalid = |key: &str, problem: String| check.invalid(key, problem);
        for (i, name) in cp.allowed_client_names.iter().enumerate() {
            if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
                return Err(invalid(
                    &format!("allowed_client_names[{i}]"),
                    format!("{name:?} must be 1 to 255 printable characters"),
                ));
            }
        }
        if cp.listen.is_empty() {
            return Ok(());
        }
        let addr: SocketAddr = cp.listen.parse().map_err(|_| {
            invalid(
                "listen",
                format!(
                    "{:?} is not an IP address and port, e.g. 127.0.0.1:7443 or 0.0.0.0:7443 \
                     (host names are not resolved)",
                    cp.listen
                ),
            )
        })?;
        let tls_files = [
            ("tls_cert", &cp.tls_cert),
            ("tls_key", &cp.tls_key),
            ("client_ca", &cp.client_ca),
        ];
        if cp.insecure_plaintext {
            if !addr.ip().is_loopback() {
                return Err(invalid(
                    "insecure_plaintext",
                    format!("plaintext is allowed only on a loopback address, not {addr}"),
                ));
            }
            if let Some((key, _)) = tls_files.iter().find(|(_, p)| !p.as_os_str().is_empty()) {
                return Err(invalid(
                    key,
                    "must be empty when insecure_plaintext = true (TLS and plaintext exclude each other)"
                        .into(),
                ));
            }
            return Ok(());
        }
        for (key, file) in tls_files {
            if file.as_os_str().is_empty() {
                return Err(invalid(
                    key,
                    "must be set when listen is set: the control plane is served only over \
                     mutual TLS (or set insecure_plaintext = true on a loopback address for testing)"
                        .into(),
                ));
            }
            if !file.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} must be an absolute path", file.display()),
                ));
            }
        }
        Ok(())
    }

    fn validate_operator(&self, path: &Path) -> Result<(), ConfigError> {
        let group = &self.operator.group;
        let valid = !group.is_empty()
            && group.len() <= 32
            && !group.starts_with('-')
            && group
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if valid {
            Ok(())
        } else {
            Err(Checker {
                path,
                table: "operator.",
            }
            .invalid(
                "group",
                format!("{group:?} is not a group name ([A-Za-z0-9_.-], at most 32)"),
            ))
        }
    }

    fn validate_limits(&self, path: &Path) -> Result<(), ConfigError> {
        let l = &self.limits;
        let check = Checker {
            path,
            table: "limits.",
        };
        check.in_range(
            "max_message_bytes",
            l.max_message_bytes.into(),
            16 << 10,
            256 << 20,
        )?;
        check.in_range(
            "max_streams_per_peer",
            l.max_streams_per_peer.into(),
            1,
            10_000,
        )?;
        check.in_range(
            "requests_per_second_per_peer",
            l.requests_per_second_per_peer.into(),
            1,
            1_000_000,
        )?;
        check.in_range(
            "request_burst_per_peer",
            l.request_burst_per_peer.into(),
            1,
            1_000_000,
        )?;
        Ok(())
    }

    fn validate_jobs(&self, path: &Path) -> Result<(), ConfigError> {
        let j = &self.jobs;
        let check = Checker {
            path,
            table: "jobs.",
        };
        let invalid = |key: &str, problem: String| check.invalid(key, problem);
        let in_range =
            |key: &str, value: u64, min: u64, max: u64| check.in_range(key, value, min, max);
        in_range("slots_per_core", j.slots_per_core.into(), 1, 64)?;
        in_range("slots", j.slots.into(), 0, 4096)?;
        in_range("max_queue", j.max_queue.into(), 1, 1_000_000)?;
        in_range(
            "reserve_after_seconds",
            j.reserve_after_seconds.into(),
            0,
            86_400,
        )?;
        in_range("kill_grace_seconds", j.kill_grace_seconds.into(), 0, 3600)?;
        in_range(
            "default_timeout_seconds",
            j.default_timeout_seconds.into(),
            0,
            30 * 86_400,
        )?;
        in_range("pids_limit", j.pids_limit.into(), 0, 1 << 22)?;
        in_range("log_max_bytes", j.log_max_bytes, 4096, 1 << 40)?;
        in_range("retention_count", j.retention_count.into(), 1, 10_000_000)?;
        in_range("max_env_entries", j.max_env_entries.into(), 0, 65_536)?;
        in_range("max_env_bytes", j.max_env_bytes.into(), 0, 16 << 20)?;
        in_range("max_labels", j.max_labels.into(), 0, 4096)?;
        in_range("max_command_args", j.max_command_args.into(), 1, 1 << 20)?;
        in_range("max_command_bytes", j.max_command_bytes.into(), 1, 16 << 20)?;
        if j.default_memory_bytes != 0 && j.default_memory_bytes < 6 << 20 {
            return Err(invalid(
                "default_memory_bytes",
                format!(
                    "{} is below Docker's minimum of 6 MiB (0 means no limit)",
                    j.default_memory_bytes
                ),
            ));
        }
        for (i, root) in j.allowed_host_roots.iter().enumerate() {
            if !root.is_absolute()
                || root
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(invalid(
                    &format!("allowed_host_roots[{i}]"),
                    format!("{} must be an absolute path without `..`", root.display()),
                ));
            }
        }
        for (i, net) in j.allowed_networks.iter().enumerate() {
            if net.is_empty()
                || net.len() > 128
                || !net
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            {
                return Err(invalid(
                    &format!("allowed_networks[{i}]"),
                    format!("{net:?} is not a Docker network name ([A-Za-z0-9_.-], at most 128)"),
                ));
            }
        }
        Ok(())
    }

    fn validate_mounts(
        &self,
        invalid: &dyn Fn(&str, String) -> ConfigError,
        in_range: RangeCheck<'_>,
    ) -> Result<(), ConfigError> {
        use crate::mounts::spec;
        let m = &self.mounts;
        in_range(
            "mounts.health_interval_seconds",
            m.health_interval_seconds.into(),
            1,
            3600,
        )?;
        in_range(
            "mounts.health_timeout_seconds",
            m.health_timeout_seconds.into(),
            1,
            600,
        )?;
        in_range(
            "mounts.mount_timeout_seconds",
            m.mount_timeout_seconds.into(),
            1,
            600,
        )?;
        in_range(
            "mounts.backoff_initial_seconds",
            m.backoff_initial_seconds.into(),
            1,
            3600,
        )?;
        in_range(
            "mounts.backoff_max_seconds",
            m.backoff_max_seconds.into(),
            m.backoff_initial_seconds.into(),
            86_400,
        )?;
        in_range(
            "mounts.default_cache_max_bytes",
            m.default_cache_max_bytes,
            1 << 20,
            1 << 50,
        )?;
        if m.blobfuse2_path.as_os_str().is_empty() {
            return Err(invalid("mounts.blobfuse2_path", "must not be empty".into()));
        }
        if m.allowed_roots.is_empty() {
            return Err(invalid(
                "mounts.allowed_roots",
                "must name at least one directory".into(),
            ));
        }
        for root in m.allowed_roots.iter().chain([&m.cache_root]) {
            if let Err(problem) = crate::paths::normalise(root) {
                return Err(invalid(
                    "mounts.allowed_roots / mounts.cache_root",
                    problem.to_string(),
                ));
            }
            if root.as_path() == Path::new("/") {
                return Err(invalid(
                    "mounts.allowed_roots / mounts.cache_root",
                    "\"/\" is too wide: name the directories mounts may go under".into(),
                ));
            }
        }
        // The mount path rules, lexically: a declared mount at /etc/data or
        // a cache dir of /etc fails `config check`, not the first mount.
        let rules = spec::PathRules::lexical(
            &m.allowed_roots,
            &m.cache_root,
            &[
                self.agent.state_dir.clone(),
                self.agent.runtime_dir.clone(),
                self.agent.logs_dir.clone(),
            ],
        );
        let mut names = std::collections::BTreeSet::new();
        for (i, d) in m.mount.iter().enumerate() {
            let key = |field: &str| format!("mounts.mount[{i}].{field}");
            let check = |field: &str, result: Result<(), String>| {
                result.map_err(|problem| invalid(&key(field), problem))
            };
            check("name", spec::check_name(&d.name))?;
            if !names.insert(d.name.as_str()) {
                return Err(invalid(
                    &key("name"),
                    format!("{:?} is declared twice", d.name),
                ));
            }
            check("account", spec::check_account(&d.account))?;
            check("container", spec::check_container(&d.container))?;
            check("endpoint", spec::check_endpoint(&d.endpoint))?;
            check("subdirectory", spec::check_subdirectory(&d.subdirectory))?;
            if let Err((field, problem)) = rules.check_lexically(&d.mount_path, &d.cache_dir) {
                return Err(invalid(&key(field), problem));
            }
            match d.auth.as_str() {
                "key" | "sas" => {
                    if !d.secret_file.is_absolute() {
                        return Err(invalid(
                            &key("secret_file"),
                            format!(
                                "auth = {:?} needs secret_file, an absolute path to a 0600 file holding the secret (secrets are never inline)",
                                d.auth
                            ),
                        ));
                    }
                }
                "msi" => {
                    if !d.secret_file.as_os_str().is_empty() {
                        return Err(invalid(
                            &key("secret_file"),
                            "is not used with auth = \"msi\"".into(),
                        ));
                    }
                }
                other => {
                    return Err(invalid(
                        &key("auth"),
                        format!("{other:?} must be \"key\", \"sas\" or \"msi\""),
                    ));
                }
            }
            if d.cache_max_bytes != 0 && d.cache_max_bytes < 1 << 20 {
                return Err(invalid(
                    &key("cache_max_bytes"),
                    format!(
                        "{} is below the minimum of 1 MiB (0 means the default)",
                        d.cache_max_bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks `[setup]` and every `[[setup.scripts]]` entry.
    fn validate_setup(
        &self,
        invalid: &dyn Fn(&str, String) -> ConfigError,
        in_range: RangeCheck<'_>,
    ) -> Result<(), ConfigError> {
        let setup = &self.setup;
        in_range(
            "setup.kill_grace_seconds",
            setup.kill_grace_seconds.into(),
            1,
            300,
        )?;
        in_range("setup.log_head_bytes", setup.log_head_bytes, 4096, 1 << 30)?;
        in_range("setup.log_tail_bytes", setup.log_tail_bytes, 4096, 64 << 20)?;
        in_range("setup.log_tail_lines", setup.log_tail_lines.into(), 1, 1000)?;
        in_range(
            "setup.max_script_bytes",
            setup.max_script_bytes,
            1,
            16 << 20,
        )?;
        in_range("setup.max_args", setup.max_args.into(), 0, 65_536)?;
        // 128 KiB is the kernel's limit on one argument or variable
        // (MAX_ARG_STRLEN); beyond it exec fails.
        in_range(
            "setup.max_arg_bytes",
            setup.max_arg_bytes.into(),
            1,
            128 << 10,
        )?;
        in_range(
            "setup.max_env_entries",
            setup.max_env_entries.into(),
            0,
            65_536,
        )?;
        in_range(
            "setup.max_env_bytes",
            setup.max_env_bytes.into(),
            0,
            16 << 20,
        )?;
        in_range(
            "setup.max_pending_runs",
            setup.max_pending_runs.into(),
            1,
            1000,
        )?;
        in_range("setup.keep_runs", setup.keep_runs.into(), 1, 10_000)?;
        let creations = setup
            .scripts
            .iter()
            .filter(|s| s.kind == SetupScriptKind::Creation)
            .count();
        if creations > 1 {
            return Err(invalid(
                "setup.scripts",
                format!("{creations} creation scripts are declared: at most one is allowed"),
            ));
        }
        for (index, script) in setup.scripts.iter().enumerate() {
            let key = |field: &str| format!("setup.scripts[{index}].{field}");
            if !script.path.is_absolute() {
                return Err(invalid(
                    &key("path"),
                    format!("{} must be an absolute path", script.path.display()),
                ));
            }
            match parse_duration(&script.timeout) {
                Some(d) if (1..=MAX_SETUP_TIMEOUT_SECONDS).contains(&d.as_secs()) => {}
                _ => {
                    return Err(invalid(
                        &key("timeout"),
                        format!(
                            "{:?} must be a duration with suffix s, m, h or d (e.g. \"15m\"), \
                             from 1s to 7d",
                            script.timeout
                        ),
                    ));
                }
            }
            if let Some(name) = script.env.keys().find(|name| !is_env_name(name)) {
                return Err(invalid(
                    &key("env"),
                    format!("{name:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"),
                ));
            }
            if !script.working_dir.as_os_str().is_empty() && !script.working_dir.is_absolute() {
                return Err(invalid(
                    &key("working_dir"),
                    format!("{} must be an absolute path", script.working_dir.display()),
                ));
            }
            // What the API would refuse (reserved variables, `..` in a path,
            // a malformed user name, the size limits) is refused here too.
            let request = crate::setup::service::declared_request(script);
            let limits = crate::setup::request::RequestLimits::from_config(setup);
            if let Err(error) = crate::setup::request::check_shape(&request, &limits) {
                let field = match &error {
                    crate::setup::SetupError::Invalid { field, .. } => match *field {
                        "timeout_seconds" => "timeout",
                        other => other,
                    },
                    _ => "path",
                };
                let problem = match error {
                    crate::setup::SetupError::Invalid { problem, .. } => problem,
                    other => other.to_string(),
                };
                return Err(invalid(&key(field), problem));
            }
        }
        Ok(())
    }

    fn validate_disk(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            problem,
        };
        let disk = &self.disk;
        for (key, value, min, max) in [
            ("disk.interval_ms", u64::from(disk.interval_ms), 100, 60_000),
            (
                "disk.sample_timeout_ms",
                u64::from(disk.sample_timeout_ms),
                100,
                600_000,
            ),
            (
                "disk.transition_seconds",
                u64::from(disk.transition_seconds),
                0,
                3600,
            ),
            ("disk.reserve_bytes", disk.reserve_bytes, 0, GIB),
        ] {
            if !(min..=max).contains(&value) {
                return Err(invalid(
                    key,
                    format!("{value} is out of range: allowed {min} to {max}"),
                ));
            }
        }
        let mut levels = vec![(
            "disk".to_owned(),
            disk.critical_free_bytes,
            disk.warning_free_bytes,
            disk.critical_free_inodes_percent,
            disk.warning_free_inodes_percent,
        )];
        for (key, p) in disk
            .paths
            .iter()
            .map(|p| ("disk.paths", p.as_path()))
            .chain(
                disk.overrides
                    .keys()
                    .map(|p| ("disk.overrides", Path::new(p))),
            )
        {
            if !p.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} must be an absolute path", p.display()),
                ));
            }
            // Overrides are looked up by the tidy form of a watched path: a
            // key written otherwise would silently never apply.
            match crate::paths::normalise(p) {
                Err(error) => return Err(invalid(key, error.to_string())),
                Ok(tidy) if key == "disk.overrides" && tidy.as_os_str() != p.as_os_str() => {
                    return Err(invalid(
                        key,
                        format!(
                            "{} must be written as {} (no trailing slash, `.` or `//`)",
                            p.display(),
                            tidy.display()
                        ),
                    ));
                }
                Ok(_) => {}
            }
        }
        for (p, o) in &disk.overrides {
            levels.push((
                format!("disk.overrides.\"{p}\""),
                o.critical_free_bytes.unwrap_or(disk.critical_free_bytes),
                o.warning_free_bytes.unwrap_or(disk.warning_free_bytes),
                o.critical_free_inodes_percent
                    .unwrap_or(disk.critical_free_inodes_percent),
                o.warning_free_inodes_percent
                    .unwrap_or(disk.warning_free_inodes_percent),
            ));
        }
        for (table, critical, warning, critical_inodes, warning_inodes) in levels {
            if warning < critical {
                return Err(invalid(
                    &format!("{table}.warning_free_bytes"),
                    format!(
                        "{warning} is below critical_free_bytes ({critical}): the warning level must be at or above the floor"
                    ),
                ));
            }
            for (key, value) in [
                ("critical_free_inodes_percent", critical_inodes),
                ("warning_free_inodes_percent", warning_inodes),
            ] {
                if !(0.0..=100.0).contains(&value) {
                    return Err(invalid(
                        &format!("{table}.{key}"),
                        format!("{value} is out of range: allowed 0 to 100"),
                    ));
                }
            }
            if warning_inodes < critical_inodes {
                return Err(invalid(
                    &format!("{table}.warning_free_inodes_percent"),
                    format!(
                        "{warning_inodes} is below critical_free_inodes_percent ({critical_inodes})"
                    ),
                ));
            }
        }
        if !(0.0..=100.0).contains(&disk.clear_margin_inodes_percent) {
            return Err(invalid(
                "disk.clear_margin_inodes_percent",
                format!(
                    "{} is out of range: allowed 0 to 100",
                    disk.clear_margin_inodes_percent
                ),
            ));
        }
        Ok(())
    }

    fn validate_metrics(
        &self,
        invalid: &impl Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let listen = &self.metrics.listen;
        if listen.is_empty() {
            return Ok(());
        }
        let addr: SocketAddr = listen.parse().map_err(|_| {
            invalid(
                "metrics.listen",
                format!("{listen:?} is not an address of the form host:port (e.g. 127.0.0.1:9464)"),
            )
        })?;
        if !addr.ip().is_loopback() {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "{addr} is not a loopback address: metrics are served without TLS or auth, \
                     so only 127.0.0.1 or [::1] is allowed (empty turns them off)"
                ),
            ));
        }
        Ok(())
    }

    /// The metrics listener's address, when metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.listen.parse().ok()
    }

    /// The control plane's TCP address, when configured.
    pub fn control_plane_addr(&self) -> Option<SocketAddr> {
        self.control_plane.listen.parse().ok()
    }
}

/// Builds `ConfigError::Invalid` for the keys of one table.
struct Checker<'a> {
    path: &'a Path,
    /// Prefix of the keys checked, e.g. `jobs.`.
    table: &'static str,
}

impl Checker<'_> {
    fn invalid(&self, key: &str, problem: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: format!("{}{key}", self.table),
            problem,
        }
    }

    fn in_range(&self, key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
        if (min..=max).contains(&value) {
            Ok(())
        } else {
            Err(self.invalid(
                key,
                format!("{value} is out of range: allowed {min} to {max}"),
            ))
        }
    }
}

/// What a reload changed, split by whether it applies live.
#[derive(Debug, Default, PartialEq)]
pub struct ConfigChanges {
    /// Keys applied at once.
    pub live: Vec<String>,
    /// Keys that keep their old value until the agent restarts.
    pub need_restart: Vec<String>,
}

impl ConfigChanges {
    /// Compares two configs key by key.
    pub fn between(old: &Config, new: &Config) -> Self {
        let old = flatten(old);
        let new = flatten(new);
        let mut changes = ConfigChanges::default();
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        for key in keys {
            if old.get(key) == new.get(key) {
                continue;
            }
            if is_live(key) {
                changes.live.push(key.clone());
            } else {
                changes.need_restart.push(key.clone());
            }
        }
        changes
    }
}

/// Whether a dotted key (as [`flatten`] names it) takes effect without a restart.
pub(crate) fn is_live(key: &str) -> bool {
    LIVE_KEYS.iter().any(|live| {
        if let Some(table) = live.strip_suffix('.') {
            key.strip_prefix(table)
                .is_some_and(|rest| rest.starts_with('.'))
        } else {
            key == *live
        }
    })
}

/// Flattens a config into dotted keys with their TOML values, for diffing.
pub(crate) fn flatten(config: &Config) -> BTreeMap<String, toml::Value> {
    fn walk(prefix: &str, value: toml::Value, out: &mut BTreeMap<String, toml::Value>) {
        match value {
            toml::Value::Table(table) => {
                for (k, v) in table {
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other);
            }
        }
    }
    let mut out = BTreeMap::new();
    // A config always serialises: every field is a plain TOML type.
    if let Ok(value) = toml::Value::try_from(config) {
        walk("", value, &mut out);
    }
    out
}

/// A TOML syntax error in one line: the position, the text there and the
/// parser's message.
fn syntax_message(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = line_of(text, span.start);
            let snippet = text[span.clone()].lines().next().unwrap_or("").trim();
            if snippet.is_empty() {
                format!("line {line}: {message}")
            } else {
                format!("line {line}, at `{snippet}`: {message}")
            }
        }
        None => message,
    }
}

/// A value that does not fit the schema (unknown key, wrong type) in one
/// line: the line, the dotted key and, in words for people, what is allowed.
fn schema_message(error: &serde_path_to_error::Error<toml::de::Error>, text: &str) -> String {
    let inner = error.inner();
    let message = inner.message().trim().replace('\n', " ");
    let mut key = error.path().to_string();
    let problem = if let Some(rest) = message.strip_prefix("unknown field `") {
        // serde: "unknown field `x`, expected one of `a`, `b`" (or
        // "expected `a`", or "there are no fields"). The path names the
        // unknown key itself; should it stop at the table, the key is added.
        let (field, allowed) = rest.split_once('`').unwrap_or((rest, ""));
        if key == "." {
            key = field.to_owned();
        } else if key.rsplit('.').next() != Some(field) {
            key = format!("{key}.{field}");
        }
        let allowed = allowed
            .trim_start_matches(',')
            .trim()
            .replace("expected one of ", "")
            .replace("expected ", "");
        if allowed.is_empty() || allowed.contains("no fields") {
            "unknown key: this table has no keys".to_owned()
        } else {
            format!("unknown key; allowed: {}", allowed.replace('`', ""))
        }
    } else if let Some(rest) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
    {
        // serde: "invalid type: string \"two\", expected u32".
        match rest.rsplit_once(", expected ") {
            Some((found, expected)) => {
                format!("expected {}, found {found}", expected_in_words(expected))
            }
            None => rest.to_owned(),
        }
    } else {
        message
    };
    let line = inner
        .span()
        .map(|span| line_of(text, span.start))
        .or_else(|| key_line(text, &key));
    match line {
        Some(line) => format!("line {line}: key `{key}`: {problem}"),
        None => format!("key `{key}`: {problem}"),
    }
}

/// serde's name for an expected type (a Rust type) in words.
fn expected_in_words(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number (0 or more)".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a boolean" | "bool" => "true or false".to_owned(),
        "path string" | "a string" => "a string".to_owned(),
        "a sequence" => "a list ([...])".to_owned(),
        "a map" => "a table".to_owned(),
        other if other.starts_with("struct ") => "a table".to_owned(),
        other if other.starts_with("a sequence") => "a list ([...])".to_owned(),
        other => other.to_owned(),
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line where a dotted key (`jobs.slots_per_core`,
/// `mounts.mount[0].name`) is written, when it is in the text.
fn key_line(text: &str, key: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let document = DeTable::parse(text).ok()?;
    let mut table = document.get_ref();
    let mut segments = key.split('.').peekable();
    while let Some(segment) = segments.next() {
        let (name, index) = match segment.split_once('[') {
            Some((name, index)) => (name, index.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let (found_key, value) = table.iter().find(|(k, _)| k.get_ref() == name)?;
        let value = match (index, value.get_ref()) {
            (Some(i), DeValue::Array(items)) => items.get(i)?,
            (Some(_), _) => return None,
            (None, _) => value,
        };
        match value.get_ref() {
            DeValue::Table(inner) if segments.peek().is_some() => table = inner,
            _ if segments.peek().is_some() => return None,
            // The key's own position; a table header has no span of its own
            // key when the table was opened implicitly, so fall back to it.
            _ => return Some(line_of(text, found_key.span().start)),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/etc/instance-agent/config.toml")
    }

    #[test]
    fn declared_mount_paths_follow_the_mount_rules() {
        let declared = |fields: &str| {
            format!(
                "[[mounts.mount]]\nname = \"data\"\naccount = \"myacct\"\ncontainer = \"data\"\n\
                 auth = \"msi\"\n{fields}\n"
            )
        };
        let ok = Config::parse(
            &declared("mount_path = \"/mnt/data\"\ncache_dir = \"/home/azureuser/cache\""),
            p(),
        );
        assert!(ok.is_ok(), "{ok:?}");
        for (fields, key, problem) in [
            (
                "mount_path = \"/etc/data\"",
                "mounts.mount[0].mount_path",
                "/etc/data is outside the allowed roots (/mnt, /home)",
            ),
            (
                "mount_path = \"/mnt\"",
                "mounts.mount[0].mount_path",
                "outside the allowed roots",
            ),
            (
                "mount_path = \"/mnt/data\"\ncache_dir = \"/etc\"",
                "mounts.mount[0].cache_dir",
                "/etc must be below mounts.cache_root",
            ),
            (
                "mount_path = \"/mnt/data\"\ncache_dir = \"/mnt/data/cache\"",
                "mounts.mount[0].cache_dir",
                "must not contain each other",
            ),
            (
                "mount_path = \"/mnt/data\"\ncache_dir = \"/mnt/x/../../etc\"",
                "mounts.mount[0].cache_dir",
                "..",
            ),
        ] {
            let msg = Config::parse(&declared(fields), p())
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(key) && msg.contains(problem),
                "{fields}: {msg}"
            );
        }
    }

    #[test]
    fn default_file_matches_default_struct() {
        let parsed = Config::parse(DEFAULT_CONFIG_TOML, p()).expect("default config parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn default_file_mentions_every_key() {
        for key in flatten(&Config::default()).keys() {
            let leaf = key.rsplit('.').next().expect("key has a leaf");
            assert!(
                DEFAULT_CONFIG_TOML.contains(&format!("{leaf} =")),
                "default.toml does not document {key}"
            );
        }
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::parse("", p()).expect("parses"), Config::default());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::parse("[agent]\nshutdown_grace_second = 3\n", p()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("shutdown_grace_second"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("config.toml"), "{msg}");
    }

    #[test]
    fn out_of_range_value_names_key_and_limit() {
        let err = Config::parse("[agent]\nshutdown_grace_seconds = 0\n", p()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("agent.shutdown_grace_seconds"), "{msg}");
        assert!(msg.contains("1 to 300"), "{msg}");
    }

    #[test]
    fn plaintext_tcp_only_on_loopback() {
        let ok = "[control_plane]\nlisten = \"127.0.0.1:7443\"\ninsecure_plaintext = true\n";
        assert!(Config::parse(ok, p()).is_ok());
        let remote = "[control_plane]\nlisten = \"0.0.0.0:7443\"\ninsecure_plaintext = true\n";
        let msg = Config::parse(remote, p()).unwrap_err().to_string();
        assert!(msg.contains("loopback"), "{msg}");
        let no_tls = "[control_plane]\nlisten = \"127.0.0.1:7443\"\n";
        let msg = Config::parse(no_tls, p()).unwrap_err().to_string();
        assert!(msg.contains("control_plane.tls_cert"), "{msg}");
        let mixed = "[control_plane]\nlisten = \"127.0.0.1:7443\"\ninsecure_plaintext = true\ntls_key = \"/k\"\n";
        let msg = Config::parse(mixed, p()).unwrap_err().to_string();
        assert!(msg.contains("control_plane.tls_key"), "{msg}");
    }

    #[test]
    fn control_plane_listen_is_an_ip_address_not_a_host_name() {
        let text = "[control_plane]\nlisten = \"localhost:7443\"\ninsecure_plaintext = true\n";
        let msg = Config::parse(text, p()).unwrap_err().to_string();
        assert!(msg.contains("control_plane.listen"), "{msg}");
        assert!(msg.contains("an IP address and port"), "{msg}");
        assert!(msg.contains("127.0.0.1:7443"), "{msg}");
        assert!(msg.contains("host names are not resolved"), "{msg}");
    }

    #[test]
    fn tls_listener_needs_absolute_files() {
        let tls = "[control_plane]\nlisten = \"0.0.0.0:7443\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\nclient_ca = \"/ca.pem\"\n";
        assert!(Config::parse(tls, p()).is_ok());
        let relative = tls.replace("/ca.pem", "ca.pem");
        let msg = Config::parse(&relative, p()).unwrap_err().to_string();
        assert!(msg.contains("control_plane.client_ca"), "{msg}");
    }

    #[test]
    fn limits_and_operator_group_are_checked() {
        let msg = Config::parse("[limits]\nmax_message_bytes = 10\n", p())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("limits.max_message_bytes"), "{msg}");
        let msg = Config::parse("[operator]\ngroup = \"a b\"\n", p())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("operator.group"), "{msg}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_line_the_key_and_the_type_in_words() {
        let text = "[agent]\nstatus_interval_seconds = 5\n\n[jobs]\nslots_per_core = \"two\"\n";
        let msg = Config::parse(text, p()).unwrap_err().to_string();
        assert!(msg.contains(&p().display().to_string()), "{msg}");
        assert!(msg.contains("line 5"), "{msg}");
        assert!(msg.contains("`jobs.slots_per_core`"), "{msg}");
        assert!(msg.contains("expected a whole number"), "{msg}");
        assert!(msg.contains("\"two\""), "{msg}");
        assert!(!msg.contains("u32"), "{msg}");
    }

    #[test]
    fn a_table_given_as_a_value_says_a_table_is_expected() {
        let msg = Config::parse("agent = 3\n", p()).unwrap_err().to_string();
        assert!(msg.contains(&p().display().to_string()), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");
        assert!(msg.contains("`agent`"), "{msg}");
        assert!(msg.contains("expected a table"), "{msg}");
        assert!(!msg.contains("AgentConfig"), "{msg}");
    }

    #[test]
    fn an_unknown_nested_key_is_named_in_full_with_the_allowed_keys() {
        let text = "[jobs]\nslots_per_core = 2\n\n[agent]\nsocketz = \"/tmp/x\"\n";
        let msg = Config::parse(text, p()).unwrap_err().to_string();
        assert!(msg.contains(&p().display().to_string()), "{msg}");
        assert!(msg.contains("line 5"), "{msg}");
        assert!(msg.contains("`agent.socketz`"), "{msg}");
        assert!(msg.contains("allowed: instance_id, socket"), "{msg}");
    }

    #[test]
    fn an_out_of_range_value_names_its_line() {
        let text = "# comment\n[jobs]\nslots_per_core = 0\n";
        let msg = Config::parse(text, p()).unwrap_err().to_string();
        assert!(msg.contains("line 3: key `jobs.slots_per_core`"), "{msg}");
        assert!(msg.contains("allowed"), "{msg}");
        // A key of an array of tables is found too.
        assert_eq!(
            key_line("a = 1\n[[m]]\nx = 1\n[[m]]\nx = 2\n", "m[1].x"),
            Some(5)
        );
        assert_eq!(key_line("[jobs]\n", "jobs.slots_per_core"), None);
    }

    #[test]
    fn relative_paths_are_refused() {
        let msg = Config::parse("[agent]\nstate_dir = \"state\"\n", p())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("agent.state_dir"), "{msg}");
    }

    #[test]
    fn disk_override_keys_must_be_tidy_paths() {
        let ok = "[disk.overrides.\"/mnt\"]\ncritical_free_bytes = 1\n";
        assert!(Config::parse(ok, p()).is_ok());
        for bad in ["/mnt/", "/mnt//x", "/mnt/./x"] {
            let text = format!("[disk.overrides.\"{bad}\"]\ncritical_free_bytes = 1\n");
            let msg = Config::parse(&text, p()).unwrap_err().to_string();
            assert!(msg.contains("disk.overrides"), "{msg}");
            assert!(msg.contains("must be written as"), "{msg}");
        }
        let text = "[disk.overrides.\"/mnt/../etc\"]\ncritical_free_bytes = 1\n";
        let msg = Config::parse(text, p()).unwrap_err().to_string();
        assert!(
            msg.contains("disk.overrides") && msg.contains(".."),
            "{msg}"
        );
    }

    #[test]
    fn changes_split_into_live_and_restart() {
        let old = Config::default();
        let mut new = old.clone();
        new.docker.check_interval_seconds = 3;
        new.agent.socket = PathBuf::from("/tmp/other.sock");
        let changes = ConfigChanges::between(&old, &new);
        assert_eq!(changes.live, vec!["docker.check_interval_seconds"]);
        assert_eq!(changes.need_restart, vec!["agent.socket"]);
    }

    #[test]
    fn overrides_win_over_file() {
        let mut config = Config::default();
        config.apply(&Overrides {
            socket: Some("/tmp/a.sock".into()),
            state_dir: Some("/tmp/state".into()),
        });
        assert_eq!(config.agent.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(config.agent.state_dir, PathBuf::from("/tmp/state"));
    }

    #[test]
    fn state_dir_flag_moves_the_default_root_paths_under_it() {
        let state_dir = Overrides {
            socket: None,
            state_dir: Some("/tmp/s".into()),
        };
        let mut config = Config::default();
        let derived = config.apply(&state_dir);
        assert_eq!(
            derived,
            ["agent.logs_dir", "agent.runtime_dir", "mounts.cache_root"]
        );
        assert_eq!(config.agent.logs_dir, PathBuf::from("/tmp/s/logs"));
        assert_eq!(config.agent.runtime_dir, PathBuf::from("/tmp/s/run"));
        assert_eq!(config.mounts.cache_root, PathBuf::from("/tmp/s/cache"));
        config.validate(p()).expect("still valid");

        // Keys the file set keep the file's value.
        let mut config = Config::parse("[agent]\nlogs_dir = \"/srv/logs\"\n", p()).expect("parses");
        let derived = config.apply(&state_dir);
        assert_eq!(derived, ["agent.runtime_dir", "mounts.cache_root"]);
        assert_eq!(config.agent.logs_dir, PathBuf::from("/srv/logs"));

        // Without --state-dir nothing moves.
        let mut config = Config::default();
        assert!(config.apply(&Overrides::default()).is_empty());
        assert_eq!(config, Config::default());
    }

    #[test]
    fn setup_scripts_are_parsed_and_checked() {
        let ok = "[[setup.scripts]]\nkind = \"creation\"\npath = \"/opt/a.sh\"\ntimeout = \"2h\"\n\
                  [[setup.scripts]]\nkind = \"startup\"\npath = \"/opt/b.sh\"\nargs = [\"x\"]\n";
        let config = Config::parse(ok, p()).expect("parses");
        assert_eq!(config.setup.scripts.len(), 2);
        assert_eq!(config.setup.scripts[0].timeout().as_secs(), 7200);
        assert_eq!(config.setup.scripts[1].timeout().as_secs(), 900);

        let two = "[[setup.scripts]]\nkind = \"creation\"\npath = \"/a\"\n\
                   [[setup.scripts]]\nkind = \"creation\"\npath = \"/b\"\n";
        let msg = Config::parse(two, p()).unwrap_err().to_string();
        assert!(msg.contains("at most one"), "{msg}");

        let relative = "[[setup.scripts]]\nkind = \"startup\"\npath = \"a.sh\"\n";
        let msg = Config::parse(relative, p()).unwrap_err().to_string();
        assert!(msg.contains("setup.scripts[0].path"), "{msg}");

        let bad_timeout =
            "[[setup.scripts]]\nkind = \"startup\"\npath = \"/a\"\ntimeout = \"15x\"\n";
        let msg = Config::parse(bad_timeout, p()).unwrap_err().to_string();
        assert!(msg.contains("setup.scripts[0].timeout"), "{msg}");

        let bad_env =
            "[[setup.scripts]]\nkind = \"startup\"\npath = \"/a\"\nenv = { \"1X\" = \"v\" }\n";
        let msg = Config::parse(bad_env, p()).unwrap_err().to_string();
        assert!(msg.contains("setup.scripts[0].env"), "{msg}");
    }

    #[test]
    fn declared_scripts_are_refused_where_the_api_would_refuse_them() {
        let script = |extra: &str| {
            format!("[[setup.scripts]]\nkind = \"startup\"\npath = \"/opt/a.sh\"\n{extra}\n")
        };
        for (extra, key, needle) in [
            (
                "run_as = \"no/such:user\"",
                "setup.scripts[0].run_as",
                "not a user name",
            ),
            (
                "env = { INSTANCE_AGENT_SETUP_RUN = \"x\" }",
                "setup.scripts[0].env",
                "set by the agent",
            ),
            (
                "working_dir = \"/opt/../etc\"",
                "setup.scripts[0].working_dir",
                "..",
            ),
        ] {
            let msg = Config::parse(&script(extra), p()).unwrap_err().to_string();
            assert!(msg.contains(key) && msg.contains(needle), "{extra}: {msg}");
        }
        let dots = "[[setup.scripts]]\nkind = \"startup\"\npath = \"/opt/../etc/x\"\n";
        let msg = Config::parse(dots, p()).unwrap_err().to_string();
        assert!(
            msg.contains("setup.scripts[0].path") && msg.contains(".."),
            "{msg}"
        );

        let many_args = format!("[setup]\nmax_args = 1\n{}", script("args = [\"a\", \"b\"]"));
        let msg = Config::parse(&many_args, p()).unwrap_err().to_string();
        assert!(
            msg.contains("setup.scripts[0].args") && msg.contains("setup.max_args"),
            "{msg}"
        );
    }

    #[test]
    fn durations_take_one_suffix() {
        assert_eq!(
            parse_duration("90s"),
            Some(std::time::Duration::from_secs(90))
        );
        assert_eq!(
            parse_duration("15m"),
            Some(std::time::Duration::from_secs(900))
        );
        assert_eq!(
            parse_duration("1d"),
            Some(std::time::Duration::from_secs(86_400))
        );
        assert_eq!(parse_duration("15"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn metrics_only_on_loopback_or_off() {
        assert_eq!(
            Config::default().metrics_addr(),
            Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        let off = Config::parse("[metrics]\nlisten = \"\"\n", p()).expect("off");
        assert_eq!(off.metrics_addr(), None);
        assert!(Config::parse("[metrics]\nlisten = \"[::1]:9464\"\n", p()).is_ok());
        for bad in ["0.0.0.0:9464", "10.0.0.1:9464", "localhost"] {
            let text = format!("[metrics]\nlisten = {bad:?}\n");
            let msg = Config::parse(&text, p()).unwrap_err().to_string();
            assert!(msg.contains("metrics.listen"), "{msg}");
        }
    }
}

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
const LIVE_KEYS: &[&str] = &[
    "agent.status_interval_seconds",
    "docker.check_interval_seconds",
    "events.backlog",
    "disk.",
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
    /// The disk guard.
    pub disk: DiskConfig,
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

/// `[control_plane]`: the TCP listener the control plane calls.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// `host:port` to listen on; off when empty.
    pub listen: String,
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

    /// Parses and validates TOML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_message(&e, text),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Applies command-line overrides. Paths derived from the state dir follow it.
    pub fn apply(&mut self, overrides: &Overrides) {
        if let Some(socket) = &overrides.socket {
            self.agent.socket = socket.clone();
        }
        if let Some(state_dir) = &overrides.state_dir {
            self.agent.state_dir = state_dir.clone();
        }
    }

    /// Checks ranges and consistency; the same rules serve values arriving over the API.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            problem,
        };
        let in_range = |key: &str, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    format!("{value} is out of range: allowed {min} to {max}"),
                ))
            }
        };
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
        self.validate_disk(path)?;
        if !self.control_plane.listen.is_empty() {
            let addr: SocketAddr = self.control_plane.listen.parse().map_err(|_| {
                invalid(
                    "control_plane.listen",
                    format!(
                        "{:?} is not an address of the form host:port (e.g. 127.0.0.1:7443)",
                        self.control_plane.listen
                    ),
                )
            })?;
            if !self.control_plane.insecure_plaintext {
                return Err(invalid(
                    "control_plane.listen",
                    "TLS is not available in this build: set control_plane.insecure_plaintext = true \
                     on a loopback address, or leave listen empty"
                        .into(),
                ));
            }
            if !addr.ip().is_loopback() {
                return Err(invalid(
                    "control_plane.insecure_plaintext",
                    format!("plaintext is allowed only on a loopback address, not {addr}"),
                ));
            }
        }
        Ok(())
    }

    /// Checks the `[disk]` table: ranges, levels in order, absolute paths.
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

    /// The control plane's TCP address, when configured.
    pub fn control_plane_addr(&self) -> Option<SocketAddr> {
        self.control_plane.listen.parse().ok()
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

fn is_live(key: &str) -> bool {
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
fn flatten(config: &Config) -> BTreeMap<String, toml::Value> {
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

/// Turns a TOML error into one line naming the position and the key.
fn parse_message(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = text[..span.start].matches('\n').count() + 1;
            let snippet = text[span.clone()].lines().next().unwrap_or("").trim();
            format!("line {line}, at `{snippet}`: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/etc/instance-agent/config.toml")
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
        assert!(Config::parse(no_tls, p()).is_err());
    }

    #[test]
    fn relative_paths_are_refused() {
        let msg = Config::parse("[agent]\nstate_dir = \"state\"\n", p())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("agent.state_dir"), "{msg}");
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
    fn disk_levels_must_be_in_order() {
        let msg = Config::parse(
            "[disk]\ncritical_free_bytes = 100\nwarning_free_bytes = 50\n",
            p(),
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("disk.warning_free_bytes"), "{msg}");
        let msg = Config::parse(
            "[disk.overrides.\"/mnt\"]\ncritical_free_bytes = 20000000000\n",
            p(),
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("disk.overrides.\"/mnt\""), "{msg}");
        let ok = "[disk]\npaths = [\"/data\"]\n[disk.overrides.\"/mnt\"]\ncritical_free_bytes = 1073741824\nwarning_free_bytes = 2147483648\n";
        let config = Config::parse(ok, p()).expect("valid overrides");
        assert_eq!(
            config.disk.overrides["/mnt"].critical_free_bytes,
            Some(1 << 30)
        );
        let msg = Config::parse("[disk]\npaths = [\"data\"]\n", p())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("disk.paths"), "{msg}");
    }

    #[test]
    fn disk_keys_are_live() {
        let old = Config::default();
        let mut new = old.clone();
        new.disk.critical_free_bytes = 1;
        new.disk.interval_ms = 500;
        let changes = ConfigChanges::between(&old, &new);
        assert_eq!(
            changes.live,
            vec!["disk.critical_free_bytes", "disk.interval_ms"]
        );
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
}

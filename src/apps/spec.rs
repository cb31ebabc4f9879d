//! What an app asks for, the inference preset that fills the Azure ML
//! local-endpoint conventions, and the rules a spec must meet before it is
//! deployed. Every refusal names the field and the limit (the API answers
//! INVALID_ARGUMENT with it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::config::AppsConfig;
use crate::jobs::spec::{JobMount, MountSource, SpecError, check_image, check_mounts, check_name};
use crate::validate::is_env_name;

/// A port of the app's container, published on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Unique within the app; health checks and endpoints refer to it.
    pub name: String,
    /// The port the server listens on in the container.
    pub container_port: u32,
    /// The host port; 0 picks a free one, kept across restarts.
    pub host_port: u32,
    /// The host address bound (default 127.0.0.1).
    pub host_ip: String,
}

/// What to do when the container exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Restart after any exit (and after failing health checks).
    #[default]
    Always,
    /// Restart after a non-zero exit or failing health checks.
    OnFailure,
    /// Never restart: the app ends STOPPED or FAILED.
    Never,
}

/// How readiness is checked.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Probe {
    /// No probe: READY once the container runs.
    #[default]
    None,
    /// `GET path` on a port; a status within `min..=max` is healthy.
    Http {
        /// The port's name.
        port: String,
        /// The request path.
        path: String,
        /// Lowest healthy status.
        status_min: u32,
        /// Highest healthy status.
        status_max: u32,
    },
    /// A TCP connection to a port.
    Tcp {
        /// The port's name.
        port: String,
    },
}

/// The health check and its timings (`None` = the default).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HealthSpec {
    /// What is probed.
    pub probe: Probe,
    /// Seconds between probes (default 5).
    pub interval_seconds: Option<u32>,
    /// Seconds a probe may take (default 2).
    pub timeout_seconds: Option<u32>,
    /// Bad probes in a row that make a READY app UNHEALTHY (default 3).
    pub failure_threshold: Option<u32>,
    /// Good probes in a row that make it READY (default 1).
    pub success_threshold: Option<u32>,
    /// Seconds a starting app may take to become READY; failures during
    /// startup do not count (default 1800).
    pub startup_timeout_seconds: Option<u32>,
}

impl HealthSpec {
    /// Seconds between probes.
    pub fn interval(&self) -> u32 {
        self.interval_seconds.unwrap_or(5)
    }
    /// Seconds a probe may take.
    pub fn timeout(&self) -> u32 {
        self.timeout_seconds.unwrap_or(2)
    }
    /// Bad probes in a row before UNHEALTHY.
    pub fn failures(&self) -> u32 {
        self.failure_threshold.unwrap_or(3)
    }
    /// Good probes in a row before READY.
    pub fn successes(&self) -> u32 {
        self.success_threshold.unwrap_or(1)
    }
    /// Seconds of startup.
    pub fn startup(&self) -> u32 {
        self.startup_timeout_seconds.unwrap_or(1800)
    }
}

/// The Azure ML local-endpoint preset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferenceSpec {
    /// Host directory holding the model (under `jobs.allowed_host_roots`),
    /// mounted read-only.
    pub model_path: PathBuf,
    /// The scoring script, as `AZUREML_ENTRY_SCRIPT` (relative to the model
    /// directory or absolute in the container).
    pub entry_script: String,
}

/// The inference server's port in the container (Azure ML convention).
pub const INFERENCE_PORT: u32 = 5001;
/// Where the model directory appears in the container.
pub const INFERENCE_MODEL_DIR: &str = "/var/azureml-app/azureml-models/model";
/// The scoring route of an inference app.
pub const INFERENCE_SCORE_PATH: &str = "/score";

/// An app's spec as accepted (defaults filled, preset applied).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AppSpec {
    /// Unique name.
    pub name: String,
    /// Image reference (a local image until registry pulls land).
    pub image: String,
    /// argv; the image's default when empty.
    pub command: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Published ports.
    pub ports: Vec<PortSpec>,
    /// Directories made visible (managed mounts or host paths, as jobs).
    pub mounts: Vec<JobMount>,
    /// GPUs held.
    pub gpus: u32,
    /// Memory limit (0 = none).
    pub memory_bytes: u64,
    /// CPU limit in thousandths of a core (0 = none).
    pub cpu_millis: u32,
    /// Job slots held while the app exists (default 1).
    pub slots: u32,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Health check.
    pub health: HealthSpec,
    /// The inference preset, when used.
    pub inference: Option<InferenceSpec>,
}

impl AppSpec {
    /// The port named `name`.
    pub fn port(&self, name: &str) -> Option<&PortSpec> {
        self.ports.iter().find(|p| p.name == name)
    }
}

/// What the host offers, for the checks that depend on it.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    /// Job slot capacity.
    pub capacity: u32,
    /// Usable CPU cores.
    pub usable_cores: f64,
    /// GPUs on the host.
    pub gpus: u32,
}

fn bad(field: impl Into<String>, problem: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Fills in the inference preset's conventions where the spec leaves them
/// open: port 5001 named `http`, liveness `GET /`, the model read-only at
/// [`INFERENCE_MODEL_DIR`], `AZUREML_MODEL_DIR` and `AZUREML_ENTRY_SCRIPT`.
fn apply_inference(spec: &mut AppSpec, inference: &InferenceSpec) {
    if spec.ports.is_empty() {
        spec.ports.push(PortSpec {
            name: "http".into(),
            container_port: INFERENCE_PORT,
            host_port: 0,
            host_ip: String::new(),
        });
    }
    if spec.health.probe == Probe::None {
        spec.health.probe = Probe::Http {
            port: spec.ports[0].name.clone(),
            path: "/".into(),
            status_min: 0,
            status_max: 0,
        };
    }
    spec.mounts.push(JobMount {
        source: MountSource::HostPath(inference.model_path.clone()),
        container_path: INFERENCE_MODEL_DIR.into(),
        read_only: true,
    });
    spec.env
        .entry("AZUREML_MODEL_DIR".into())
        .or_insert_with(|| INFERENCE_MODEL_DIR.into());
    spec.env
        .entry("AZUREML_ENTRY_SCRIPT".into())
        .or_insert_with(|| inference.entry_script.clone());
}

/// Fills defaults, applies the preset and checks every field that does not
/// need the filesystem or the mounts (see `manager.rs` for those).
pub fn validate(
    mut spec: AppSpec,
    config: &AppsConfig,
    host_roots: &[PathBuf],
    host: HostLimits,
) -> Result<AppSpec, SpecError> {
    check_name("name", &spec.name, 63)?;
    if !spec.name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(bad("name", "must start with a letter or digit"));
    }
    check_image(&spec.image)?;
    if spec.command.iter().any(|a| a.contains('\0')) {
        return Err(bad("command", "arguments must not contain NUL bytes"));
    }
    for (name, value) in &spec.env {
        if !is_env_name(name) || value.contains('\0') {
            return Err(bad(
                format!("env[{name:?}]"),
                "must be a valid variable name ([A-Za-z_][A-Za-z0-9_]*) with a value without NUL bytes",
            ));
        }
    }
    if let Some(inference) = spec.inference.clone() {
        if inference.entry_script.is_empty() || inference.entry_script.contains('\0') {
            return Err(bad("inference.entry_script", "must not be empty"));
        }
        crate::paths::check_clean_absolute(&inference.model_path)
            .map_err(|e| bad("inference.model_path", e.to_string()))?;
        apply_inference(&mut spec, &inference);
    }
    check_ports(&mut spec.ports, config)?;
    check_health(&mut spec)?;
    check_mounts(&spec.mounts, host_roots)?;

    if spec.slots == 0 {
        spec.slots = 1;
    }
    if spec.slots > host.capacity {
        return Err(bad(
            "slots",
            format!(
                "{} exceeds the capacity of {} slots",
                spec.slots, host.capacity
            ),
        ));
    }
    if spec.memory_bytes != 0 && spec.memory_bytes < 6 << 20 {
        return Err(bad(
            "memory_bytes",
            format!("{} is below the minimum of 6 MiB", spec.memory_bytes),
        ));
    }
    let max_millis = (host.usable_cores * 1000.0).ceil() as u64;
    if u64::from(spec.cpu_millis) > max_millis {
        return Err(bad(
            "cpu_millis",
            format!(
                "{} exceeds the {max_millis} millicores the agent may use",
                spec.cpu_millis
            ),
        ));
    }
    if spec.gpus > host.gpus {
        return Err(bad(
            "gpus",
            format!("{} exceeds the host's {} GPUs", spec.gpus, host.gpus),
        ));
    }
    Ok(spec)
}

fn check_ports(ports: &mut [PortSpec], config: &AppsConfig) -> Result<(), SpecError> {
    let mut names = BTreeSet::new();
    let mut host_ports = BTreeSet::new();
    for (i, port) in ports.iter_mut().enumerate() {
        let field = format!("ports[{i}]");
        check_name(&format!("{field}.name"), &port.name, 32)?;
        if !names.insert(port.name.clone()) {
            return Err(bad(
                format!("{field}.name"),
                format!("{:?} is used by another port of the app", port.name),
            ));
        }
        if !(1..=65_535).contains(&port.container_port) {
            return Err(bad(
                format!("{field}.container_port"),
                format!(
                    "{} is out of range: allowed 1 to 65535",
                    port.container_port
                ),
            ));
        }
        if port.host_port > 65_535 {
            return Err(bad(
                format!("{field}.host_port"),
                format!(
                    "{} is out of range: allowed 0 (pick a free one) to 65535",
                    port.host_port
                ),
            ));
        }
        if port.host_port != 0 && !host_ports.insert(port.host_port) {
            return Err(bad(
                format!("{field}.host_port"),
                format!("{} is used by another port of the app", port.host_port),
            ));
        }
        if port.host_ip.is_empty() {
            port.host_ip = "127.0.0.1".into();
        }
        if port.host_ip.parse::<IpAddr>().is_err() {
            return Err(bad(
                format!("{field}.host_ip"),
                format!("{:?} is not an IP address", port.host_ip),
            ));
        }
        if !config.host_ip_allowed(&port.host_ip) {
            return Err(bad(
                format!("{field}.host_ip"),
                format!(
                    "{} is not allowed: only 127.0.0.1 and apps.allowed_host_ips {:?}",
                    port.host_ip, config.allowed_host_ips
                ),
            ));
        }
    }
    Ok(())
}

fn check_health(spec: &mut AppSpec) -> Result<(), SpecError> {
    let ports: BTreeSet<String> = spec.ports.iter().map(|p| p.name.clone()).collect();
    let known = |port: &str| {
        if ports.contains(port) {
            Ok(())
        } else {
            Err(bad(
                "health.port",
                format!("{port:?} names no port of the app (ports: {ports:?})"),
            ))
        }
    };
    match &mut spec.health.probe {
        Probe::None => {}
        Probe::Tcp { port } => known(port)?,
        Probe::Http {
            port,
            path,
            status_min,
            status_max,
        } => {
            known(port)?;
            if path.is_empty() {
                *path = "/".into();
            }
            if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' ') {
                return Err(bad(
                    "health.path",
                    format!("{path:?} must start with / and hold no spaces or control characters"),
                ));
            }
            if *status_min == 0 && *status_max == 0 {
                (*status_min, *status_max) = (200, 399);
            }
            if !(100..=599).contains(status_min)
                || !(100..=599).contains(status_max)
                || status_min > status_max
            {
                return Err(bad(
                    "health.expected_status",
                    format!("{status_min}-{status_max} is not a range within 100 to 599"),
                ));
            }
        }
    }
    let h = &spec.health;
    for (field, value, min, max) in [
        ("health.interval_seconds", h.interval_seconds, 1, 3600),
        ("health.timeout_seconds", h.timeout_seconds, 1, 600),
        ("health.failure_threshold", h.failure_threshold, 1, 100),
        ("health.success_threshold", h.success_threshold, 1, 100),
        (
            "health.startup_timeout_seconds",
            h.startup_timeout_seconds,
            1,
            7 * 86_400,
        ),
    ] {
        if let Some(value) = value
            && !(min..=max).contains(&value)
        {
            return Err(bad(field, crate::validate::out_of_range(value, min, max)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostLimits {
        HostLimits {
            capacity: 4,
            usable_cores: 2.0,
            gpus: 0,
        }
    }

    fn port(name: &str, container_port: u32) -> PortSpec {
        PortSpec {
            name: name.into(),
            container_port,
            host_port: 0,
            host_ip: String::new(),
        }
    }

    /// An app with one port and an HTTP health check on it.
    pub(crate) fn web() -> AppSpec {
        AppSpec {
            name: "web".into(),
            image: "instance-agent/busybox:test".into(),
            command: vec!["httpd".into(), "-f".into()],
            ports: vec![port("http", 8080)],
            health: HealthSpec {
                probe: Probe::Http {
                    port: "http".into(),
                    path: "/health".into(),
                    status_min: 0,
                    status_max: 0,
                },
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn check(spec: AppSpec) -> Result<AppSpec, SpecError> {
        validate(
            spec,
            &AppsConfig::default(),
            &[PathBuf::from("/mnt")],
            host(),
        )
    }

    fn field_of(spec: AppSpec) -> String {
        check(spec).unwrap_err().field
    }

    #[test]
    fn defaults_are_filled() {
        let spec = check(web()).unwrap();
        assert_eq!(spec.slots, 1);
        assert_eq!(spec.ports[0].host_ip, "127.0.0.1");
        assert_eq!(spec.restart, RestartPolicy::Always);
        let Probe::Http {
            status_min,
            status_max,
            ..
        } = spec.health.probe
        else {
            panic!("http probe")
        };
        assert_eq!((status_min, status_max), (200, 399));
        assert_eq!(
            (
                spec.health.interval(),
                spec.health.timeout(),
                spec.health.failures(),
                spec.health.successes(),
                spec.health.startup()
            ),
            (5, 2, 3, 1, 1800)
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        let mut spec = web();
        spec.ports.push(port("http", 9090));
        assert_eq!(field_of(spec), "ports[1].name");

        let mut spec = web();
        spec.ports[0].container_port = 70_000;
        assert_eq!(field_of(spec), "ports[0].container_port");

        let mut spec = web();
        spec.ports[0].host_port = 65_536;
        assert_eq!(field_of(spec), "ports[0].host_port");

        let mut spec = web();
        spec.ports[0].host_ip = "0.0.0.0".into();
        let error = check(spec).unwrap_err();
        assert_eq!(error.field, "ports[0].host_ip");
        assert!(error.problem.contains("apps.allowed_host_ips"), "{error}");

        let mut spec = web();
        spec.health.probe = Probe::Tcp {
            port: "grpc".into(),
        };
        assert_eq!(field_of(spec), "health.port");

        let mut spec = web();
        spec.mounts.push(JobMount {
            source: MountSource::HostPath("/etc".into()),
            container_path: "/data".into(),
            read_only: true,
        });
        assert_eq!(field_of(spec), "mounts[0].host_path");

        for threshold in ["failure", "success"] {
            let mut spec = web();
            match threshold {
                "failure" => spec.health.failure_threshold = Some(0),
                _ => spec.health.success_threshold = Some(0),
            }
            assert_eq!(field_of(spec), format!("health.{threshold}_threshold"));
        }
        let mut spec = web();
        spec.health.interval_seconds = Some(0);
        assert_eq!(field_of(spec), "health.interval_seconds");

        let mut spec = web();
        spec.name = "-x".into();
        assert_eq!(field_of(spec), "name");
    }

    #[test]
    fn allowed_host_ip_is_accepted() {
        let mut spec = web();
        spec.ports[0].host_ip = "0.0.0.0".into();
        let config = AppsConfig {
            allowed_host_ips: vec!["0.0.0.0".into()],
            ..Default::default()
        };
        assert!(validate(spec, &config, &[], host()).is_ok());
    }

    #[test]
    fn inference_preset_fills_the_conventions() {
        let spec = AppSpec {
            name: "model".into(),
            image: "instance-agent/busybox:test".into(),
            inference: Some(InferenceSpec {
                model_path: "/mnt/models/m1".into(),
                entry_script: "score.py".into(),
            }),
            ..Default::default()
        };
        let spec = check(spec).unwrap();
        assert_eq!(spec.ports[0].container_port, INFERENCE_PORT);
        assert!(matches!(&spec.health.probe, Probe::Http { path, .. } if path == "/"));
        assert_eq!(spec.env["AZUREML_MODEL_DIR"], INFERENCE_MODEL_DIR);
        assert_eq!(spec.env["AZUREML_ENTRY_SCRIPT"], "score.py");
        assert_eq!(spec.mounts[0].container_path, INFERENCE_MODEL_DIR);
        assert!(spec.mounts[0].read_only);
    }
}

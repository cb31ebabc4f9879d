//! What a job asks for, and the rules a spec must meet before it is queued.
//!
//! Validation is pure except for host-path confinement, which resolves
//! symlinks (see [`confine_host_path`]) and so must run off the runtime.
//! Every refusal names the field and the limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::JobsConfig;
use crate::validate::is_env_name;

/// Where a job's directory comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountSource {
    /// A mount managed by the mounts module, by name.
    Managed(String),
    /// A host path under an allowed root (stored as given; resolved at start).
    HostPath(PathBuf),
}

/// A directory made visible in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMount {
    /// Where it comes from.
    pub source: MountSource,
    /// Absolute path in the container.
    pub container_path: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// A job's spec as accepted (defaults filled in).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobSpec {
    /// Unique id.
    pub id: String,
    /// OCI image reference.
    pub image: String,
    /// argv.
    pub command: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Working directory in the container; image default when empty.
    pub working_dir: String,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Slots held (at least 1).
    pub slots: u32,
    /// Memory limit (0 = none).
    pub memory_bytes: u64,
    /// CPU limit in thousandths of a core (0 = none).
    pub cpu_millis: u32,
    /// GPUs wanted.
    pub gpus: u32,
    /// Directories made visible.
    pub mounts: Vec<JobMount>,
    /// Seconds from running to kill (0 = none).
    pub timeout_seconds: u32,
    /// Higher first.
    pub priority: i32,
    /// Docker network.
    pub network: String,
    /// Seconds between SIGTERM and SIGKILL.
    pub kill_grace_seconds: u32,
}

/// A spec broke a rule. `field` is the spec's field path, e.g. `env["1X"]`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    /// The offending field.
    pub field: String,
    /// What is wrong, with the limit.
    pub problem: String,
}

fn bad(field: impl Into<String>, problem: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// What the host offers, for checks that depend on it.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    /// Slot capacity.
    pub capacity: u32,
    /// Usable CPU cores.
    pub usable_cores: f64,
    /// Total memory.
    pub memory_bytes: u64,
    /// GPUs on the host.
    pub gpus: u32,
}

/// Largest accepted job timeout: 30 days.
const MAX_TIMEOUT_SECONDS: u32 = 30 * 86_400;
/// Docker refuses memory limits below 6 MiB.
const MIN_MEMORY_BYTES: u64 = 6 << 20;
/// Longest job id (it becomes part of a container name).
const MAX_ID_LEN: usize = 128;

/// Fills defaults and checks every field that does not need the filesystem.
pub fn validate(
    mut spec: JobSpec,
    config: &JobsConfig,
    host: HostLimits,
) -> Result<JobSpec, SpecError> {
    if spec.id.is_empty() {
        spec.id = uuid::Uuid::new_v4().simple().to_string();
    }
    check_name("id", &spec.id, MAX_ID_LEN)?;
    if spec.id.starts_with(['.', '-', '_']) {
        return Err(bad("id", "must start with a letter or digit"));
    }

    check_image(&spec.image)?;

    if spec.command.is_empty() {
        return Err(bad("command", "must not be empty (give the argv to run)"));
    }
    if spec.command.len() > config.max_command_args as usize {
        return Err(bad(
            "command",
            format!(
                "{} arguments exceed the limit of {} (jobs.max_command_args)",
                spec.command.len(),
                config.max_command_args
            ),
        ));
    }
    let command_bytes: usize = spec.command.iter().map(String::len).sum();
    if command_bytes > config.max_command_bytes as usize {
        return Err(bad(
            "command",
            format!(
                "{command_bytes} bytes exceed the limit of {} (jobs.max_command_bytes)",
                config.max_command_bytes
            ),
        ));
    }
    if spec.command.iter().any(|a| a.contains('\0')) {
        return Err(bad("command", "arguments must not contain NUL bytes"));
    }

    if spec.env.len() > config.max_env_entries as usize {
        return Err(bad(
            "env",
            format!(
                "{} entries exceed the limit of {} (jobs.max_env_entries)",
                spec.env.len(),
                config.max_env_entries
            ),
        ));
    }
    let env_bytes: usize = spec.env.iter().map(|(k, v)| k.len() + v.len() + 1).sum();
    if env_bytes > config.max_env_bytes as usize {
        return Err(bad(
            "env",
            format!(
                "{env_bytes} bytes exceed the limit of {} (jobs.max_env_bytes)",
                config.max_env_bytes
            ),
        ));
    }
    for (name, value) in &spec.env {
        if !is_env_name(name) {
            return Err(bad(
                format!("env[{name:?}]"),
                "is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)",
            ));
        }
        if value.contains('\0') {
            return Err(bad(
                format!("env[{name:?}]"),
                "value must not contain NUL bytes",
            ));
        }
    }

    if spec.labels.len() > config.max_labels as usize {
        return Err(bad(
            "labels",
            format!(
                "{} entries exceed the limit of {} (jobs.max_labels)",
                spec.labels.len(),
                config.max_labels
            ),
        ));
    }
    for (key, value) in &spec.labels {
        if key.is_empty() || key.len() > 128 || key.chars().any(|c| c.is_control()) {
            return Err(bad(
                format!("labels[{key:?}]"),
                "key must be 1 to 128 printable characters",
            ));
        }
        if value.len() > 1024 || value.chars().any(|c| c.is_control()) {
            return Err(bad(
                format!("labels[{key:?}]"),
                "value must be at most 1024 printable characters",
            ));
        }
    }

    if !spec.working_dir.is_empty() {
        check_container_path("working_dir", &spec.working_dir)?;
    }

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

    if spec.memory_bytes == 0 {
        spec.memory_bytes = config.default_memory_bytes;
    }
    if spec.memory_bytes != 0 && spec.memory_bytes < MIN_MEMORY_BYTES {
        return Err(bad(
            "memory_bytes",
            format!("{} is below the minimum of 6 MiB", spec.memory_bytes),
        ));
    }
    if host.memory_bytes > 0 && spec.memory_bytes > host.memory_bytes {
        return Err(bad(
            "memory_bytes",
            format!(
                "{} exceeds the host's memory of {} bytes",
                spec.memory_bytes, host.memory_bytes
            ),
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
    if spec.gpus > 0 && host.gpus == 0 {
        // Not a malformed spec: the same spec is fine on a GPU host.
        return Err(bad("gpus", "this host has no GPUs"));
    }
    if spec.gpus > host.gpus {
        return Err(bad(
            "gpus",
            format!("{} exceeds the host's {} GPUs", spec.gpus, host.gpus),
        ));
    }

    if spec.timeout_seconds == 0 {
        spec.timeout_seconds = config.default_timeout_seconds;
    }
    if spec.timeout_seconds > MAX_TIMEOUT_SECONDS {
        return Err(bad(
            "timeout_seconds",
            format!(
                "{} exceeds the limit of {MAX_TIMEOUT_SECONDS} (30 days)",
                spec.timeout_seconds
            ),
        ));
    }
    if spec.kill_grace_seconds == 0 {
        spec.kill_grace_seconds = config.kill_grace_seconds;
    }
    if spec.kill_grace_seconds > 3600 {
        return Err(bad(
            "kill_grace_seconds",
            format!("{} exceeds the limit of 3600", spec.kill_grace_seconds),
        ));
    }

    if spec.network.is_empty() {
        spec.network = "none".into();
    }
    if spec.network != "none" && !config.allowed_networks.contains(&spec.network) {
        return Err(bad(
            "network",
            format!(
                "{:?} is not allowed (jobs.allowed_networks: {:?})",
                spec.network, config.allowed_networks
            ),
        ));
    }

    check_mounts(&spec.mounts, &config.allowed_host_roots)?;
    Ok(spec)
}

/// Checks a list of mounts (a job's or an app's): clean absolute container
/// paths, each mounted once, managed names well formed, host paths under
/// `roots` (`jobs.allowed_host_roots`). Lexical only; resolution is later.
pub(crate) fn check_mounts(mounts: &[JobMount], roots: &[PathBuf]) -> Result<(), SpecError> {
    let mut targets = std::collections::BTreeSet::new();
    for (i, mount) in mounts.iter().enumerate() {
        let field = format!("mounts[{i}]");
        check_container_path(&format!("{field}.container_path"), &mount.container_path)?;
        if !targets.insert(mount.container_path.clone()) {
            return Err(bad(format!("{field}.container_path"), "is mounted twice"));
        }
        match &mount.source {
            MountSource::Managed(name) => check_name(&format!("{field}.managed"), name, 64)?,
            MountSource::HostPath(path) => {
                check_clean_absolute(&format!("{field}.host_path"), path)?;
                if !roots.iter().any(|root| crate::paths::is_under(path, root)) {
                    return Err(bad(
                        format!("{field}.host_path"),
                        format!(
                            "{} is outside the allowed roots {:?} (jobs.allowed_host_roots)",
                            path.display(),
                            roots
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Opens a host path once and checks that the object it leads to lies under
/// an allowed root (the shared rule of [`crate::paths::confine`]); the
/// object stays held for the bind. Blocking (it opens the path).
pub fn confine_host_path(
    field: &str,
    path: &Path,
    roots: &[PathBuf],
) -> Result<crate::paths::held::Held, SpecError> {
    crate::paths::confine(path, roots).map_err(|e| bad(field, e.to_string()))
}

fn check_clean_absolute(field: &str, path: &Path) -> Result<(), SpecError> {
    crate::paths::check_clean_absolute(path).map_err(|e| bad(field, e.to_string()))
}

fn check_container_path(field: &str, path: &str) -> Result<(), SpecError> {
    if path.contains('\0') || path.contains(':') {
        return Err(bad(field, "must not contain NUL or `:`"));
    }
    check_clean_absolute(field, Path::new(path))?;
    if path == "/" {
        return Err(bad(field, "must not be `/`"));
    }
    Ok(())
}

/// Checks an image reference (jobs and apps): not empty, a valid OCI reference.
pub(crate) fn check_image(image: &str) -> Result<(), SpecError> {
    if image.is_empty() {
        return Err(bad("image", "must not be empty"));
    }
    crate::images::syntax::parse(image).map_err(|e| {
        bad(
            "image",
            format!("{image:?} is not a valid image reference: {e}"),
        )
    })?;
    Ok(())
}

pub(crate) fn check_name(field: &str, name: &str, max: usize) -> Result<(), SpecError> {
    if name.is_empty()
        || name.len() > max
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(bad(
            field,
            format!("{name:?} must be 1 to {max} characters of [A-Za-z0-9_.-]"),
        ));
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
            memory_bytes: 8 << 30,
            gpus: 0,
        }
    }

    fn spec() -> JobSpec {
        JobSpec {
            image: "instance-agent/busybox:test".into(),
            command: vec!["true".into()],
            ..JobSpec::default()
        }
    }

    fn field_of(spec: JobSpec) -> String {
        validate(spec, &JobsConfig::default(), host())
            .unwrap_err()
            .field
    }

    #[test]
    fn defaults_are_filled() {
        let s = validate(spec(), &JobsConfig::default(), host()).unwrap();
        assert_eq!(s.id.len(), 32);
        assert_eq!(s.slots, 1);
        assert_eq!(s.network, "none");
        assert_eq!(s.kill_grace_seconds, 10);
    }

    #[test]
    fn image_references_follow_the_oci_grammar() {
        for good in [
            "busybox",
            "busybox:1.36",
            "ghcr.io/org/img:tag",
            "localhost:5000/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            let mut s = spec();
            s.image = good.into();
            assert!(
                validate(s, &JobsConfig::default(), host()).is_ok(),
                "{good}"
            );
        }
        for bad_ref in ["", "a b", "img:", "-lead", "repo//x", "x@sha256:zz"] {
            let mut s = spec();
            s.image = bad_ref.into();
            assert_eq!(field_of(s), "image", "{bad_ref:?}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let mut s = spec();
        s.command.clear();
        assert_eq!(field_of(s), "command");

        let mut s = spec();
        s.env.insert("1X".into(), "v".into());
        assert_eq!(field_of(s), "env[\"1X\"]");

        let mut s = spec();
        s.slots = 5;
        let e = validate(s, &JobsConfig::default(), host()).unwrap_err();
        assert_eq!(e.field, "slots");
        assert!(e.problem.contains("capacity of 4"), "{e}");

        let mut s = spec();
        s.memory_bytes = 1;
        assert_eq!(field_of(s), "memory_bytes");

        let mut s = spec();
        s.memory_bytes = u64::MAX;
        assert_eq!(field_of(s), "memory_bytes");

        let mut s = spec();
        s.cpu_millis = 100_000;
        assert_eq!(field_of(s), "cpu_millis");

        let mut s = spec();
        s.timeout_seconds = u32::MAX;
        assert_eq!(field_of(s), "timeout_seconds");

        let mut s = spec();
        s.network = "host".into();
        assert_eq!(field_of(s), "network");

        let mut s = spec();
        s.id = "../x".into();
        assert_eq!(field_of(s), "id");
    }

    #[test]
    fn too_many_env_entries_names_the_limit() {
        let mut s = spec();
        for i in 0..300 {
            s.env.insert(format!("V{i}"), "x".into());
        }
        let e = validate(s, &JobsConfig::default(), host()).unwrap_err();
        assert_eq!(e.field, "env");
        assert!(e.problem.contains("256"), "{e}");
    }

    #[test]
    fn host_paths_are_confined() {
        let mut s = spec();
        s.mounts.push(JobMount {
            source: MountSource::HostPath("/etc".into()),
            container_path: "/data".into(),
            read_only: true,
        });
        assert_eq!(field_of(s), "mounts[0].host_path");

        let mut s = spec();
        s.mounts.push(JobMount {
            source: MountSource::HostPath("/mnt/../etc".into()),
            container_path: "/data".into(),
            read_only: true,
        });
        let e = validate(s, &JobsConfig::default(), host()).unwrap_err();
        assert!(e.problem.contains(".."), "{e}");
    }

    #[test]
    fn symlink_escape_is_caught_on_resolution() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let link = root.path().join("escape");
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        let roots = vec![root.path().to_owned()];
        let e = confine_host_path("mounts[0].host_path", &link, &roots).unwrap_err();
        assert!(e.problem.contains("outside the allowed roots"), "{e}");
        let inside = root.path().join("data");
        std::fs::create_dir(&inside).unwrap();
        assert!(confine_host_path("f", &inside, &roots).is_ok());
    }

    #[test]
    fn gpu_job_without_gpus_is_refused() {
        let mut s = spec();
        s.gpus = 1;
        assert_eq!(field_of(s), "gpus");
    }
}

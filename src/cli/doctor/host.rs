//! The checks of the host, made locally: the config file, /dev/fuse and
//! fusermount3, blobfuse2, the socket file's mode and group, and the
//! systemd unit.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use super::report::Check;
use crate::config::{Config, ConfigError};

/// Deadline of `systemctl is-active`.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(5);

/// The config on disk is what the agent loads at its next start or reload.
pub(super) fn config_check(path: &Path, loaded: &Result<Config, ConfigError>) -> Check {
    match loaded {
        Ok(_) if !path.exists() => Check::pass(
            "config",
            format!("{} does not exist: defaults apply", path.display()),
        ),
        Ok(_) => Check::pass("config", format!("{} is valid", path.display())),
        Err(error) => Check {
            quotes_config: true,
            ..Check::fail(
                "config",
                error.to_string(),
                format!(
                    "correct it (`instance-agent config check {}`); the agent refuses it at its next start or reload",
                    path.display()
                ),
            )
        },
    }
}

use crate::paths::find_in_path;

/// The FUSE device and fusermount3, which every mount needs.
pub(super) fn fuse_check() -> Check {
    let device = match std::fs::metadata("/dev/fuse") {
        Ok(m) if m.file_type().is_char_device() => Ok(()),
        Ok(_) => Err("/dev/fuse is not a character device"),
        Err(_) => Err("/dev/fuse does not exist"),
    };
    let fusermount = find_in_path("fusermount3");
    match (device, fusermount) {
        (Ok(()), Some(path)) => Check::pass(
            "fuse",
            format!("/dev/fuse present, fusermount3 at {}", path.display()),
        ),
        (Err(problem), _) => Check::fail(
            "fuse",
            problem,
            "load the module (`modprobe fuse`); in a container, pass --device /dev/fuse",
        ),
        (Ok(()), None) => Check::fail(
            "fuse",
            "fusermount3 not found in PATH",
            "install it: `apt-get install fuse3`",
        ),
    }
}

/// The program `mounts.blobfuse2_path` names: a path, or a name looked up
/// in PATH like the agent does.
pub(super) fn blobfuse2_check(config: &Result<Config, ConfigError>) -> Check {
    let program = config
        .as_ref()
        .map(|c| c.mounts.blobfuse2_path.clone())
        .unwrap_or_else(|_| Config::default().mounts.blobfuse2_path);
    let found = if program.components().count() > 1 {
        std::fs::metadata(&program)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .then(|| program.clone())
    } else {
        find_in_path(&program.to_string_lossy())
    };
    match found {
        Some(path) => Check::pass("blobfuse2", format!("found at {}", path.display())),
        None => Check::warn(
            "blobfuse2",
            format!(
                "{} (mounts.blobfuse2_path) not found: file share mounts cannot work",
                program.display()
            ),
            "install the blobfuse2 package from packages.microsoft.com (needed only for mounts)",
        ),
    }
}

/// The socket must be 0660: root and the operator group, nobody else.
pub(super) fn socket_check(socket: &Path, operator_group: &str) -> Check {
    let path = socket.display();
    let meta = match std::fs::metadata(socket) {
        Ok(meta) => meta,
        Err(error) => {
            return Check::fail(
                "socket",
                format!("cannot stat {path}: {error}"),
                "start the agent: it creates the socket (`systemctl start instance-agent`)",
            );
        }
    };
    if !meta.file_type().is_socket() {
        return Check::fail(
            "socket",
            format!("{path} is not a socket"),
            "remove it and restart the agent",
        );
    }
    let mode = meta.mode() & 0o7777;
    let group = nix::unistd::Group::from_name(operator_group).ok().flatten();
    let socket_group = nix::unistd::Group::from_gid(meta.gid().into())
        .ok()
        .flatten()
        .map_or_else(|| meta.gid().to_string(), |g| g.name);
    let what = format!("{path}: mode {mode:04o}, group {socket_group}");
    let restart =
        format!("restart the agent: it sets mode 0660 and the group {operator_group} at start");
    if mode & 0o007 != 0 {
        return Check::fail(
            "socket",
            format!("{what}: any local user can drive the agent"),
            restart,
        );
    }
    if mode != 0o660 {
        return Check::warn("socket", format!("{what}: expected 0660"), restart);
    }
    match group {
        None => Check::warn(
            "socket",
            format!(
                "{what}; the group {operator_group} does not exist, so only root can use the CLI"
            ),
            "create it (`systemd-sysusers`, the package ships /usr/lib/sysusers.d/instance-agent.conf), then restart the agent",
        ),
        Some(g) if g.gid.as_raw() != meta.gid() => Check::warn(
            "socket",
            format!("{what}: members of {operator_group} cannot use the CLI"),
            restart,
        ),
        Some(_) => Check::pass("socket", what),
    }
}

/// The agent's unit, under systemd: active, or why not.
pub(super) async fn systemd_check(under_systemd: bool, agent_answers: bool) -> Check {
    if !under_systemd {
        return Check::pass(
            "systemd",
            "not under systemd (/run/systemd/system is absent): unit not checked",
        );
    }
    let output = tokio::time::timeout(
        SYSTEMCTL_TIMEOUT,
        tokio::process::Command::new("systemctl")
            .args(["is-active", "instance-agent.service"])
            .output(),
    )
    .await;
    let state = match output {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(Err(error)) => {
            return Check::warn(
                "systemd",
                format!("cannot run systemctl: {error}"),
                "check the unit by hand: `systemctl status instance-agent`",
            );
        }
        Err(_) => {
            return Check::warn(
                "systemd",
                format!("systemctl did not answer within {SYSTEMCTL_TIMEOUT:?}"),
                "check the unit by hand: `systemctl status instance-agent`",
            );
        }
    };
    let logs = "see `journalctl -u instance-agent -n 50`, then `systemctl restart instance-agent`";
    match state.as_str() {
        "active" => Check::pass("systemd", "instance-agent.service is active"),
        "activating" | "reloading" | "deactivating" => Check::warn(
            "systemd",
            format!("instance-agent.service is {state}"),
            "run doctor again in a few seconds",
        ),
        _ if agent_answers => Check::warn(
            "systemd",
            format!(
                "instance-agent.service is {state}, but an agent answers: it was started by hand"
            ),
            "stop the hand-started agent and `systemctl enable --now instance-agent`",
        ),
        _ => Check::fail(
            "systemd",
            format!("instance-agent.service is {state}"),
            logs,
        ),
    }
}

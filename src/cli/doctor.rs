//! `instance-agent doctor`: runs the checks an operator would run by hand,
//! in order, and prints each as PASS, WARN or FAIL with the fix in one line;
//! `--bundle FILE` also writes a support bundle (see [`bundle`]).
//!
//! Everything about the agent comes through its gRPC API (GetStatus,
//! GetDiskUsage, ListMounts, ListSetupRuns); only facts about the host are
//! checked locally (/dev/fuse, fusermount3, blobfuse2, the socket file's
//! mode, the systemd unit). An RPC whose capability is not in the running
//! agent answers UNIMPLEMENTED, which is a WARN "not available", so the same
//! doctor works against older and newer agents.
//!
//! Exit status: 0 when every check passed, 1 when the worst is a WARN, 2 when
//! any check failed (including "daemon unreachable").

mod bundle;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tonic::transport::Channel;

use super::client;
use super::format;
use crate::api::proto::{
    self, agent_service_client::AgentServiceClient, disk_service_client::DiskServiceClient,
    mount_service_client::MountServiceClient, setup_service_client::SetupServiceClient,
};
use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};

/// The group whose members may use the socket (what the package creates),
/// when the config cannot be read for `operator.group`.
const OPERATOR_GROUP: &str = "instance-operators";
/// How long the socket may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of each RPC: the agent serves all of them from memory.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of `systemctl is-active`.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(5);

/// `doctor` options.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The agent's config file: validated, and copied into the bundle with
    /// secrets removed. Absent means defaults.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Also write a support bundle (tar.gz, mode 0600) to FILE: the checks,
    /// status, recent events, the config without secrets and recent logs.
    #[arg(long, value_name = "FILE")]
    pub bundle: Option<PathBuf>,
    /// The agent's log file, for the bundle when the agent does not run under
    /// systemd (under systemd the journal is read instead).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

/// The outcome of one check, from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    /// Fine.
    Pass,
    /// Works, but needs attention or could not be checked.
    Warn,
    /// Broken.
    Fail,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }

    fn exit_code(self) -> u8 {
        match self {
            Verdict::Pass => 0,
            Verdict::Warn => 1,
            Verdict::Fail => 2,
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked: daemon, config, docker, fuse, blobfuse2, disk,
    /// mounts, setup, socket, systemd.
    pub name: &'static str,
    /// The outcome.
    pub result: Verdict,
    /// What was found.
    pub message: String,
    /// One line saying what to do; empty on PASS.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
    /// The message may quote the config file (a parse error shows the
    /// offending text), so the bundle leaves it out.
    #[serde(skip)]
    quotes_config: bool,
}

impl Check {
    fn pass(name: &'static str, message: impl Into<String>) -> Self {
        Self::new(name, Verdict::Pass, message, "")
    }

    fn warn(name: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(name, Verdict::Warn, message, fix)
    }

    fn fail(name: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(name, Verdict::Fail, message, fix)
    }

    fn new(
        name: &'static str,
        result: Verdict,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name,
            result,
            message: message.into(),
            fix: fix.into(),
            quotes_config: false,
        }
    }
}

/// The JSON document `--json` prints (and the bundle's `doctor.json`).
#[derive(Debug, Serialize)]
pub struct Report {
    /// The worst result; it decides the exit status.
    pub result: Verdict,
    /// Checks in the order they ran.
    pub checks: Vec<Check>,
}

/// What the agent answered, or why it could not be asked.
struct AgentAnswer {
    channel: Option<Channel>,
    status: Result<proto::GetStatusResponse, Unreachable>,
}

/// Why the daemon check failed, and what to do.
struct Unreachable {
    problem: String,
    fix: String,
}

/// Runs every check, prints them, writes the bundle when asked, and returns
/// the exit status (0 pass, 1 warn, 2 fail).
pub async fn run(args: DoctorArgs, socket: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let agent = ask_agent(&socket).await;
    let local_config = Config::load(&args.config, false);
    let under_systemd = Path::new("/run/systemd/system").is_dir();

    let mut checks = vec![
        daemon_check(&agent, &socket),
        config_check(&args.config, &local_config),
    ];
    checks.push(docker_check(&agent, &local_config));
    checks.push(fuse_check());
    checks.push(blobfuse2_check(&local_config));
    match &agent.channel {
        Some(channel) => {
            checks.extend(disk_checks(channel.clone(), agent.status.as_ref().ok()).await);
            checks.extend(mount_checks(channel.clone()).await);
            checks.extend(setup_checks(channel.clone()).await);
        }
        None => {
            for name in ["disk", "mounts", "setup"] {
                checks.push(not_checked(name));
            }
        }
    }
    let operator_group = local_config
        .as_ref()
        .map_or(OPERATOR_GROUP, |c| c.operator.group.as_str());
    checks.push(socket_check(&socket, operator_group));
    checks.push(systemd_check(under_systemd, agent.status.is_ok()).await);

    let report = Report {
        result: checks
            .iter()
            .map(|c| c.result)
            .max()
            .unwrap_or(Verdict::Pass),
        checks,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    if let Some(path) = &args.bundle {
        let written = bundle::write(
            path,
            bundle::Inputs {
                report: &report,
                agent_channel: agent.channel.clone(),
                status: agent.status.as_ref().map_err(|u| u.problem.as_str()),
                config_path: &args.config,
                log_file: args.log_file.as_deref(),
                under_systemd,
            },
        )
        .await?;
        eprintln!(
            "doctor: support bundle written to {} ({})",
            path.display(),
            written.join(", ")
        );
    }
    Ok(ExitCode::from(report.result.exit_code()))
}

/// Connects and asks for the status, each within its deadline.
async fn ask_agent(socket: &Path) -> AgentAnswer {
    let unreachable = |problem: String, fix: &str| AgentAnswer {
        channel: None,
        status: Err(Unreachable {
            problem,
            fix: fix.to_owned(),
        }),
    };
    let path = socket.display();
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(socket)).await {
        Err(_) => {
            return unreachable(
                format!("{path} did not accept a connection within {CONNECT_TIMEOUT:?}"),
                "the agent is hung: `systemctl restart instance-agent`, then report it with `doctor --bundle`",
            );
        }
        Ok(Err(error)) => {
            use std::io::ErrorKind;
            let (problem, fix) = match error.kind() {
                ErrorKind::NotFound => (
                    format!("the agent is not running: no socket at {path}"),
                    "start it: `systemctl start instance-agent` (or pass --socket)",
                ),
                ErrorKind::ConnectionRefused => (
                    format!("the agent is not running: {path} refuses connections (stale socket)"),
                    "start it: `systemctl start instance-agent`",
                ),
                ErrorKind::PermissionDenied => (
                    format!("permission denied on {path}"),
                    "run as root or as a member of the group instance-operators",
                ),
                _ => (
                    format!("cannot connect to {path}: {error}"),
                    "check --socket and that the agent runs: `systemctl status instance-agent`",
                ),
            };
            return unreachable(problem, fix);
        }
        Ok(Ok(_)) => {}
    }
    let channel = match tokio::time::timeout(CALL_TIMEOUT, client::connect(socket)).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(error)) => {
            return unreachable(
                format!("{error:#}"),
                "check that --socket names the agent's socket",
            );
        }
        Err(_) => {
            return unreachable(
                format!("no HTTP/2 handshake on {path} within {CALL_TIMEOUT:?}"),
                "the agent is hung: `systemctl restart instance-agent`, then report it with `doctor --bundle`",
            );
        }
    };
    let status = AgentServiceClient::new(channel.clone())
        .get_status(deadline(proto::GetStatusRequest {}))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| Unreachable {
            problem: format!(
                "GetStatus failed: {:?}: {}",
                status.code(),
                status.message()
            ),
            fix: "the agent answers but not correctly: restart it and report it with `doctor --bundle`"
                .to_owned(),
        });
    AgentAnswer {
        channel: Some(channel),
        status,
    }
}

/// A request with the per-call deadline (sent as grpc-timeout too).
fn deadline<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

fn not_checked(name: &'static str) -> Check {
    Check::warn(
        name,
        "not checked: the agent is not reachable",
        "fix the daemon check first",
    )
}

fn daemon_check(agent: &AgentAnswer, socket: &Path) -> Check {
    match &agent.status {
        Ok(status) => Check::pass(
            "daemon",
            format!(
                "instance-agent {} answers on {} (up {}): {}",
                status.version,
                socket.display(),
                format::duration(Duration::from_secs_f64(status.uptime_seconds.max(0.0))),
                status.summary
            ),
        ),
        Err(unreachable) => Check::fail("daemon", &unreachable.problem, &unreachable.fix),
    }
}

/// The config on disk is what the agent loads at its next start or reload.
fn config_check(path: &Path, loaded: &Result<Config, ConfigError>) -> Check {
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

fn condition<'a>(status: &'a proto::GetStatusResponse, kind: &str) -> Option<&'a proto::Condition> {
    status.conditions.iter().find(|c| c.r#type == kind)
}

fn docker_check(agent: &AgentAnswer, config: &Result<Config, ConfigError>) -> Check {
    let socket = config
        .as_ref()
        .map(|c| c.docker.socket.clone())
        .unwrap_or_else(|_| Config::default().docker.socket);
    let local = if socket.exists() {
        format!("{} exists", socket.display())
    } else {
        format!("{} does not exist", socket.display())
    };
    let Ok(status) = &agent.status else {
        return Check::warn(
            "docker",
            format!("not checked through the agent (it is not reachable); {local}"),
            "fix the daemon check first",
        );
    };
    let start_engine = "start the engine (`systemctl start docker`) and check `docker version`; queued jobs wait until it answers";
    match condition(status, "docker") {
        None => Check::warn(
            "docker",
            "the agent reports no docker condition",
            "upgrade the agent",
        ),
        Some(c) => match c.state() {
            proto::ConditionState::Ok => Check::pass("docker", &c.message),
            proto::ConditionState::Failed => {
                Check::fail("docker", format!("{} ({local})", c.message), start_engine)
            }
            proto::ConditionState::Degraded => {
                Check::warn("docker", format!("{} ({local})", c.message), start_engine)
            }
            proto::ConditionState::Unknown => Check::warn(
                "docker",
                format!("not checked by the agent yet ({local})"),
                "run doctor again in a few seconds",
            ),
            proto::ConditionState::Disabled => Check::warn(
                "docker",
                format!("disabled: {}", c.message),
                "jobs need the Docker engine; see the agent's [docker] config",
            ),
        },
    }
}

/// Looks a program up in PATH, as a shell would.
fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn fuse_check() -> Check {
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
fn blobfuse2_check(config: &Result<Config, ConfigError>) -> Check {
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

/// A capability the running agent may not have (it answers UNIMPLEMENTED).
struct Capability {
    /// The check's name.
    check: &'static str,
    /// The RPC asked.
    rpc: &'static str,
    /// What it is, e.g. "the disk guard".
    what: &'static str,
}

/// The RPC's reply, or the check that says why there is none: WARN when the
/// capability is not in this agent (`note` adds context), FAIL on any other
/// error.
fn capability_reply<T>(
    capability: Capability,
    reply: Result<tonic::Response<T>, tonic::Status>,
    note: &str,
) -> Result<T, Check> {
    match reply {
        Ok(reply) => Ok(reply.into_inner()),
        Err(status) if status.code() == tonic::Code::Unimplemented => Err(Check::warn(
            capability.check,
            format!("not available in this agent: {}{note}", capability.what),
            format!(
                "upgrade instance-agent to a build with {} (needed only if you use it)",
                capability.what
            ),
        )),
        Err(status) => Err(Check::fail(
            capability.check,
            format!(
                "{} failed: {:?}: {}",
                capability.rpc,
                status.code(),
                status.message()
            ),
            "restart the agent; if it persists, report it with `doctor --bundle`",
        )),
    }
}

async fn disk_checks(channel: Channel, status: Option<&proto::GetStatusResponse>) -> Vec<Check> {
    let reply = DiskServiceClient::new(channel)
        .get_disk_usage(deadline(proto::GetDiskUsageRequest {}))
        .await;
    let condition = status
        .and_then(|s| condition(s, "disk"))
        .map(|c| format!(" (its condition: {})", c.message))
        .unwrap_or_default();
    let capability = Capability {
        check: "disk",
        rpc: "DiskService.GetDiskUsage",
        what: "the disk guard",
    };
    let note = format!("; free space is not watched, check `df -h` by hand{condition}");
    let filesystems = match capability_reply(capability, reply, &note) {
        Ok(reply) => reply.filesystems,
        Err(check) => return vec![check],
    };
    if filesystems.is_empty() {
        return vec![Check::warn(
            "disk",
            "no filesystem is watched",
            "check the agent's [disk] config",
        )];
    }
    filesystems.iter().map(filesystem_check).collect()
}

fn filesystem_check(fs: &proto::FilesystemUsage) -> Check {
    let floor = fs.thresholds.as_ref().map_or(0, |t| t.critical_free_bytes);
    let what = format!(
        "{} ({}): {} free of {}, floor {}",
        fs.mount_point,
        fs.watched_paths.join(", "),
        format::bytes(fs.free_bytes),
        format::bytes(fs.total_bytes),
        format::bytes(floor)
    );
    let reclaim = format!(
        "free space on {}: `instance-agent disk --reclaim` (exited containers, dangling images, old job logs); `instance-agent disk --top {}` shows what is big",
        fs.mount_point, fs.mount_point
    );
    match fs.state() {
        proto::DiskState::Ok => Check::pass("disk", what),
        proto::DiskState::Warning => {
            Check::warn("disk", format!("{what}: below the warning level"), reclaim)
        }
        proto::DiskState::Critical => {
            Check::fail("disk", format!("{what}: below the floor"), reclaim)
        }
        proto::DiskState::Unresponsive => Check::fail(
            "disk",
            format!("{} does not answer: {}", fs.mount_point, fs.error),
            format!(
                "a hung filesystem: check its server or network, or detach it (`umount -l {}`)",
                fs.mount_point
            ),
        ),
        proto::DiskState::Unspecified => Check::warn(
            "disk",
            format!("{what}: not sampled yet"),
            "run doctor again in a few seconds",
        ),
    }
}

async fn mount_checks(channel: Channel) -> Vec<Check> {
    let reply = MountServiceClient::new(channel)
        .list_mounts(deadline(proto::ListMountsRequest {}))
        .await;
    let capability = Capability {
        check: "mounts",
        rpc: "MountService.ListMounts",
        what: "file share mounts",
    };
    let mounts = match capability_reply(capability, reply, "") {
        Ok(reply) => reply.mounts,
        Err(check) => return vec![check],
    };
    let managed: Vec<_> = mounts
        .iter()
        .filter(|m| m.state() != proto::MountState::Unmounted)
        .collect();
    if managed.is_empty() {
        return vec![Check::pass("mounts", "no managed mounts")];
    }
    managed
        .into_iter()
        .map(|m| {
            let what = format!(
                "{} at {} ({}/{}, {} remounts)",
                m.name, m.mount_path, m.account, m.container, m.remount_count
            );
            let details = "see `instance-agent mounts list`; check the storage account, the credentials and the network; the agent retries with backoff";
            match m.state() {
                proto::MountState::Mounted => Check::pass("mounts", format!("{what}: mounted")),
                proto::MountState::Mounting | proto::MountState::Remounting => Check::warn(
                    "mounts",
                    format!("{what}: {} {}", mount_state_name(m.state()), m.message),
                    "wait for it, then run doctor again",
                ),
                proto::MountState::Stale
                | proto::MountState::Failed
                | proto::MountState::Unspecified
                | proto::MountState::Unmounted => Check::fail(
                    "mounts",
                    format!("{what}: {}: {}", mount_state_name(m.state()), m.message),
                    details,
                ),
            }
        })
        .collect()
}

fn mount_state_name(state: proto::MountState) -> &'static str {
    match state {
        proto::MountState::Unspecified => "unknown",
        proto::MountState::Mounting => "mounting",
        proto::MountState::Mounted => "mounted",
        proto::MountState::Stale => "stale",
        proto::MountState::Remounting => "remounting",
        proto::MountState::Failed => "failed",
        proto::MountState::Unmounted => "unmounted",
    }
}

async fn setup_checks(channel: Channel) -> Vec<Check> {
    let reply = SetupServiceClient::new(channel)
        .list_setup_runs(deadline(proto::ListSetupRunsRequest {
            kinds: vec![
                proto::SetupKind::Creation as i32,
                proto::SetupKind::Startup as i32,
            ],
            limit: 1000,
        }))
        .await;
    let capability = Capability {
        check: "setup",
        rpc: "SetupService.ListSetupRuns",
        what: "setup scripts",
    };
    let runs = match capability_reply(capability, reply, "") {
        Ok(reply) => reply.runs,
        Err(check) => return vec![check],
    };
    // Runs come newest first: the first run of each (kind, source) is the
    // one that counts; earlier failures were retried or superseded.
    let mut latest: BTreeMap<(i32, &str), &proto::SetupRun> = BTreeMap::new();
    for run in &runs {
        latest.entry((run.kind, run.source.as_str())).or_insert(run);
    }
    if latest.is_empty() {
        return vec![Check::pass(
            "setup",
            "no creation or startup scripts have run",
        )];
    }
    latest.into_values().map(setup_run_check).collect()
}

fn setup_run_check(run: &proto::SetupRun) -> Check {
    let kind = match run.kind() {
        proto::SetupKind::Creation => "creation",
        proto::SetupKind::Startup => "startup",
        proto::SetupKind::Adhoc | proto::SetupKind::Unspecified => "ad-hoc",
    };
    let what = format!(
        "{kind} script {} (run {}, attempt {})",
        run.source, run.id, run.attempt
    );
    // The agent's message usually names the exit status already.
    let detail = match (&run.message, run.exit_code) {
        (message, _) if !message.is_empty() => message.clone(),
        (_, Some(code)) => format!("exit status {code}"),
        (_, None) => "no detail".to_owned(),
    };
    let see = format!(
        "see `instance-agent setup logs {}`, fix the script, then {}",
        run.id,
        if kind == "creation" {
            "run it again with `instance-agent setup run` (a creation script is not re-run automatically)"
        } else {
            "restart the agent to run it again"
        }
    );
    match run.state() {
        proto::SetupRunState::Succeeded => Check::pass("setup", format!("{what}: succeeded")),
        proto::SetupRunState::Pending | proto::SetupRunState::Running => Check::warn(
            "setup",
            format!("{what}: still running"),
            "wait for it (`instance-agent setup logs -f ID`), then run doctor again",
        ),
        proto::SetupRunState::Interrupted => Check::warn(
            "setup",
            format!("{what}: interrupted by an agent stop: {}", run.message),
            "nothing: it runs again at the agent's next start",
        ),
        proto::SetupRunState::Failed
        | proto::SetupRunState::TimedOut
        | proto::SetupRunState::Unspecified => Check::fail(
            "setup",
            format!("{what}: {}: {detail}", setup_state_name(run.state())),
            see,
        ),
    }
}

fn setup_state_name(state: proto::SetupRunState) -> &'static str {
    match state {
        proto::SetupRunState::Unspecified => "unknown",
        proto::SetupRunState::Pending => "pending",
        proto::SetupRunState::Running => "running",
        proto::SetupRunState::Succeeded => "succeeded",
        proto::SetupRunState::Failed => "failed",
        proto::SetupRunState::TimedOut => "timed out",
        proto::SetupRunState::Interrupted => "interrupted",
    }
}

/// The socket must be 0660: root and the operator group, nobody else.
fn socket_check(socket: &Path, operator_group: &str) -> Check {
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

async fn systemd_check(under_systemd: bool, agent_answers: bool) -> Check {
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

fn render(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let width = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0);
    for check in &report.checks {
        let _ = writeln!(
            out,
            "{}  {:<width$}  {}",
            check.result.label(),
            check.name,
            check.message
        );
        if !check.fix.is_empty() {
            let _ = writeln!(out, "      {:<width$}  fix: {}", "", check.fix);
        }
    }
    let count = |v| report.checks.iter().filter(|c| c.result == v).count();
    let _ = writeln!(
        out,
        "doctor: {} passed, {} warnings, {} failed",
        count(Verdict::Pass),
        count(Verdict::Warn),
        count(Verdict::Fail)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_result_decides_the_exit_status() {
        assert!(Verdict::Fail > Verdict::Warn && Verdict::Warn > Verdict::Pass);
        assert_eq!(Verdict::Pass.exit_code(), 0);
        assert_eq!(Verdict::Warn.exit_code(), 1);
        assert_eq!(Verdict::Fail.exit_code(), 2);
    }

    #[test]
    fn render_prints_the_fix_under_a_problem_only() {
        let report = Report {
            result: Verdict::Warn,
            checks: vec![
                Check::pass("daemon", "answers"),
                Check::warn("blobfuse2", "not found", "install it"),
            ],
        };
        let text = render(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "PASS  daemon     answers");
        assert_eq!(lines[1], "WARN  blobfuse2  not found");
        assert_eq!(lines[2], "                 fix: install it");
        assert_eq!(lines[3], "doctor: 1 passed, 1 warnings, 0 failed");
    }

    #[test]
    fn setup_checks_name_the_failed_run_and_how_to_rerun_it() {
        let run = proto::SetupRun {
            id: "r1".into(),
            kind: proto::SetupKind::Creation as i32,
            state: proto::SetupRunState::Failed as i32,
            exit_code: Some(3),
            source: "/etc/setup.sh".into(),
            attempt: 1,
            message: "exited with status 3".into(),
            ..Default::default()
        };
        let check = setup_run_check(&run);
        assert_eq!(check.result, Verdict::Fail);
        assert!(check.message.contains("/etc/setup.sh"), "{}", check.message);
        assert!(check.fix.contains("setup logs r1"), "{}", check.fix);
    }

    #[test]
    fn a_critical_filesystem_fails_with_the_reclaim_fix() {
        let fs = proto::FilesystemUsage {
            mount_point: "/".into(),
            free_bytes: 1 << 30,
            total_bytes: 100 << 30,
            state: proto::DiskState::Critical as i32,
            thresholds: Some(proto::DiskThresholds {
                critical_free_bytes: 5 << 30,
                ..Default::default()
            }),
            ..Default::default()
        };
        let check = filesystem_check(&fs);
        assert_eq!(check.result, Verdict::Fail);
        assert!(check.message.contains("floor 5.0 GiB"), "{}", check.message);
        assert!(check.fix.contains("--reclaim"), "{}", check.fix);
    }
}

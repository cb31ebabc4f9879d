//! The checks made through the agent's API: the daemon itself (GetStatus),
//! the Docker engine as the agent sees it, the disk guard, the mounts and
//! the setup scripts. An RPC whose capability is not in the running agent
//! (UNIMPLEMENTED) is a WARN "not available".

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tonic::transport::Channel;

use super::report::Check;
use crate::api::proto::{
    self, agent_service_client::AgentServiceClient, disk_service_client::DiskServiceClient,
    mount_service_client::MountServiceClient, setup_service_client::SetupServiceClient,
};
use crate::cli::{client, format, states};
use crate::config::{Config, ConfigError};

/// How long the socket may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of each RPC: the agent serves all of them from memory.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The fix when the agent accepts connections but does not answer.
const HUNG_FIX: &str = "it may be hung or overloaded: see `systemctl status instance-agent` and \
     `journalctl -u instance-agent`; `systemctl restart instance-agent` if it stays so, then \
     report it with `doctor --bundle`";

/// The daemon check's deadline for the HTTP/2 handshake and GetStatus:
/// `--rpc-timeout` (default 5 s for `doctor`).
fn daemon_timeout() -> Duration {
    client::rpc_timeout().unwrap_or(Duration::from_secs(24 * 3600))
}

/// What the agent answered, or why it could not be asked.
pub(super) struct AgentAnswer {
    /// The channel, when the agent answered on it.
    pub(super) channel: Option<Channel>,
    /// Its status, or why there is none.
    pub(super) status: Result<proto::GetStatusResponse, Unreachable>,
}

/// Why the daemon check failed, and what to do.
pub(super) struct Unreachable {
    /// What is wrong.
    pub(super) problem: String,
    /// What to do.
    pub(super) fix: String,
}

/// Connects and asks for the status, each within its deadline.
pub(super) async fn ask_agent(socket: &Path) -> AgentAnswer {
    let unreachable = |problem: String, fix: String| AgentAnswer {
        channel: None,
        status: Err(Unreachable { problem, fix }),
    };
    let path = socket.display();
    match tokio::time::timeout(CONNECT_TIMEOUT, client::reach(socket)).await {
        Err(_) => {
            return unreachable(
                format!("{path} did not accept a connection within {CONNECT_TIMEOUT:?}"),
                HUNG_FIX.to_owned(),
            );
        }
        Ok(Err(failure)) => {
            let (problem, fix) = failure.problem_and_fix(socket);
            return unreachable(problem, fix);
        }
        Ok(Ok(())) => {}
    }
    let timeout = daemon_timeout();
    let channel = match tokio::time::timeout(timeout, client::connect(socket)).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(error)) => {
            let Unreachable { problem, fix } = match client::CallFailure::of(&error) {
                Some(failure) => failure_words(&failure, socket, timeout),
                None => Unreachable {
                    problem: format!("{error:#}"),
                    fix: "check that --socket names the agent's socket".to_owned(),
                },
            };
            return unreachable(problem, fix);
        }
        Err(_) => {
            return unreachable(
                format!(
                    "the agent does not answer: no HTTP/2 handshake on {path} within {timeout:?}"
                ),
                HUNG_FIX.to_owned(),
            );
        }
    };
    let mut request = tonic::Request::new(proto::GetStatusRequest {});
    request.set_timeout(timeout);
    let status = AgentServiceClient::new(channel.clone())
        .get_status(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| {
            let failure = client::CallFailure::of_status(&status);
            (failure.is_some(), status_failure(&status, socket, timeout))
        });
    match status {
        Ok(status) => AgentAnswer {
            channel: Some(channel),
            status: Ok(status),
        },
        // A frozen, dying or refusing agent answers no other check either:
        // they are skipped rather than each waiting for its deadline.
        Err((true, unreachable)) => AgentAnswer {
            channel: None,
            status: Err(unreachable),
        },
        Err((false, unreachable)) => AgentAnswer {
            channel: Some(channel),
            status: Err(unreachable),
        },
    }
}

/// Why GetStatus failed, in the words of [`client::CallFailure`].
fn status_failure(status: &tonic::Status, socket: &Path, timeout: Duration) -> Unreachable {
    match client::CallFailure::of_status(status) {
        Some(failure) => failure_words(&failure, socket, timeout),
        None => Unreachable {
            problem: format!(
                "GetStatus failed: {:?}: {}",
                status.code(),
                status.message()
            ),
            fix: "the agent answers but not correctly: restart it and report it with `doctor --bundle`"
                .to_owned(),
        },
    }
}

/// The daemon check's problem and fix for `failure`.
fn failure_words(failure: &client::CallFailure, socket: &Path, timeout: Duration) -> Unreachable {
    let path = socket.display();
    let (problem, fix) = match failure {
        client::CallFailure::TimedOut => (
            format!(
                "the agent does not answer: it accepts connections on {path} but GetStatus got no reply within {timeout:?}"
            ),
            HUNG_FIX.to_owned(),
        ),
        client::CallFailure::Refused(message) => (
            format!("the agent refused this user: {message}"),
            "run as root or as a member of the operator group (operator.group)".to_owned(),
        ),
        client::CallFailure::Closed => (
            format!("the agent at {path} closed the connection (restarting or crashed?)"),
            client::SEE_SYSTEMCTL.to_owned(),
        ),
    };
    Unreachable { problem, fix }
}

/// A request with the per-call deadline (sent as grpc-timeout too).
fn deadline<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// The WARN of a check that needs the agent, when it cannot be reached.
pub(super) fn not_checked(name: &'static str) -> Check {
    Check::warn(
        name,
        "not checked: the agent is not reachable",
        "fix the daemon check first",
    )
}

/// Whether the agent answers, its version, uptime and summary.
pub(super) fn daemon_check(agent: &AgentAnswer, socket: &Path) -> Check {
    match &agent.status {
        Ok(status) => Check::pass(
            "daemon",
            format!(
                "instance-agent {} answers on {} (up {}): {}{}",
                status.version,
                socket.display(),
                format::duration(Duration::from_secs_f64(status.uptime_seconds.max(0.0))),
                status.summary,
                status
                    .host
                    .as_ref()
                    .filter(|h| !h.supervision.is_empty())
                    .map(|h| format!("; {}", h.supervision))
                    .unwrap_or_default()
            ),
        ),
        Err(unreachable) => Check::fail("daemon", &unreachable.problem, &unreachable.fix),
    }
}

fn condition<'a>(status: &'a proto::GetStatusResponse, kind: &str) -> Option<&'a proto::Condition> {
    status.conditions.iter().find(|c| c.r#type == kind)
}

/// The Docker engine, as the agent's `docker` condition reports it.
pub(super) fn docker_check(agent: &AgentAnswer, config: &Result<Config, ConfigError>) -> Check {
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

/// One check per watched filesystem.
pub(super) async fn disk_checks(
    channel: Channel,
    status: Option<&proto::GetStatusResponse>,
) -> Vec<Check> {
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

/// A filesystem's state, with the reclaim fix when it is short of space.
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

/// One check per managed mount.
pub(super) async fn mount_checks(channel: Channel) -> Vec<Check> {
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
                    format!("{what}: {} {}", states::mount(m.state()).plain(), m.message),
                    "wait for it, then run doctor again",
                ),
                proto::MountState::Stale
                | proto::MountState::Failed
                | proto::MountState::Unspecified
                | proto::MountState::Unmounted => Check::fail(
                    "mounts",
                    format!("{what}: {}: {}", states::mount(m.state()).plain(), m.message),
                    details,
                ),
            }
        })
        .collect()
}

/// One check per creation or startup script, for its latest run.
pub(super) async fn setup_checks(channel: Channel) -> Vec<Check> {
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

/// A script's latest run, with how to see and rerun it when it failed.
fn setup_run_check(run: &proto::SetupRun) -> Check {
    let kind = states::setup_kind(run.kind()).plain();
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
            format!(
                "{what}: {}: {detail}",
                states::setup_run(run.state()).plain()
            ),
            see,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::report::Verdict;

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

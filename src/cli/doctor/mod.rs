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

//! Layout: `agent` (the checks through the API), `host` (the local
//! checks), `report` (verdicts, rendering, exit status), `bundle`.

mod agent;
mod bundle;
mod host;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::output;
use crate::config::{Config, DEFAULT_CONFIG_PATH};
use agent::{
    ask_agent, daemon_check, disk_checks, docker_check, mount_checks, not_checked, setup_checks,
    store_check,
};
use host::{blobfuse2_check, config_check, fuse_check, socket_check, systemd_check};
use report::Report;

/// The group whose members may use the socket (what the package creates),
/// when the config cannot be read for `operator.group`.
const OPERATOR_GROUP: &str = "instance-operators";

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
    /// With --bundle: replace FILE if it exists (a link at FILE is removed,
    /// never followed). Without it an existing FILE is refused.
    #[arg(long, requires = "bundle")]
    pub force: bool,
    /// The agent's log file, for the bundle when the agent does not run under
    /// systemd (under systemd the journal is read instead).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

/// Runs every check, prints them, writes the bundle when asked, and returns
/// the exit status (0 pass, 1 warn, 2 fail).
pub async fn run(args: DoctorArgs, socket: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    // Before the checks: a refused path is told at once.
    let bundle_file = match &args.bundle {
        Some(path) => Some((bundle::create(path, args.force)?, path)),
        None => None,
    };
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
    checks.push(store_check(&agent));
    let operator_group = local_config
        .as_ref()
        .map_or(OPERATOR_GROUP, |c| c.operator.group.as_str());
    checks.push(socket_check(&socket, operator_group));
    checks.push(systemd_check(under_systemd, agent.status.is_ok()).await);

    let report = Report::new(checks);
    output::reply(json, &report, report::render)?;
    if let Some((file, path)) = bundle_file {
        let written = bundle::write(
            file,
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

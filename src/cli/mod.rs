//! The operator CLI. Every command but `serve`, `config` and `completions`
//! talks to the daemon only through its gRPC API over the Unix socket; it
//! never imports domain modules. One file per subcommand; shared by all of
//! them: `client` (connect or explain, deadlines), `output` (print JSON or
//! render), `states` (the names of the contract's state enums), `format`
//! (sizes, durations, times) and `progress` (a pull's progress bar or lines).

mod access;
mod apps;
mod client;
mod completions;
mod config_cmd;
mod disk;
mod doctor;
mod format;
mod images;
mod jobs;
mod lifecycle;
mod mounts;
mod output;
mod progress;
mod setup;
mod states;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use client::DEFAULT_SOCKET;

/// The agent of a cloud ML compute instance: jobs, images, disk guard, setup
/// scripts and file share mounts.
#[derive(Debug, Parser)]
#[command(name = "instance-agent", version, propagate_version = true)]
pub struct Cli {
    /// The daemon's Unix socket [env: INSTANCE_AGENT_SOCKET; default /run/instance-agent/agent.sock].
    /// For `serve`, overrides `agent.socket` in the config.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print JSON (the protobuf JSON mapping) instead of human output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Deadline in seconds of each call to the daemon (0: none) [default:
    /// 5 for `status` and `doctor`, 120 otherwise]. Streams (`-f`,
    /// `--watch`) are not cut once they started.
    #[arg(long, global = true, value_name = "SECONDS")]
    pub rpc_timeout: Option<u64>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Show the instance's health: version, uptime, conditions, slots.
    Status,
    /// Submit, list, inspect, cancel jobs and read their logs.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Images and registry credentials: list, pull, remove, login, logout.
    #[command(subcommand)]
    Images(images::ImagesCommand),
    /// Apps (long-running containers on loopback ports, local inference
    /// endpoints): deploy, list, get, rm, restart, logs, invoke.
    #[command(subcommand)]
    Apps(apps::AppsCommand),
    /// Show every watched filesystem like `df -h` with its state and levels;
    /// find what fills a disk (--top), follow alerts (--watch), reclaim space.
    Disk(disk::DiskArgs),
    /// Check the agent and the host, print PASS/WARN/FAIL with fixes (exit 0/1/2); `--bundle FILE` writes a support bundle.
    Doctor(doctor::DoctorArgs),
    /// Print or check configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// File share mounts (blobfuse2): list, mount, unmount.
    #[command(subcommand)]
    Mounts(mounts::MountsCommand),
    /// Setup scripts: list runs, run a script, show its logs.
    #[command(subcommand)]
    Setup(setup::SetupCommand),
    /// SSH access: the policy (show, enable, disable, keys) and the open sessions.
    #[command(subcommand)]
    Access(access::AccessCommand),
    /// Whether the instance is idle and exactly why not (each source's reading).
    Activity(lifecycle::ActivityArgs),
    /// Idle shutdown: status, postpone the stop, set the policy.
    #[command(subcommand)]
    Idle(lifecycle::IdleCommand),
    /// Print a shell completion script (`--json` does not apply).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Config file; it must exist [default: $INSTANCE_AGENT_CONFIG, else
    /// /etc/instance-agent/config.toml; an absent default file means all defaults].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Overrides `agent.state_dir`.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How the daemon logs.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (no timestamps under journald, which adds them).
    Text,
    /// One JSON object per line.
    Json,
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print a complete, commented config with every key at its default
    /// (`--json`: the same values as one JSON object, without the comments).
    Default,
    /// Validate a config file; exit 78 with the key and the problem if it is
    /// bad (`--json`: `{"file", "ok", "error"}` on stdout).
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

/// Runs a client command and returns the process exit code.
pub fn run(
    command: Command,
    socket: Option<PathBuf>,
    json: bool,
    rpc_timeout: Option<u64>,
) -> ExitCode {
    let timeout = match (rpc_timeout, &command) {
        (Some(0), _) => None,
        (Some(seconds), _) => Some(std::time::Duration::from_secs(seconds)),
        // The diagnostics: an operator must hear within seconds that the
        // agent does not answer.
        (None, Command::Status | Command::Doctor(_)) => Some(client::DIAGNOSTIC_TIMEOUT),
        (None, _) => Some(client::DEFAULT_RPC_TIMEOUT),
    };
    client::set_rpc_timeout(timeout);
    let socket = client::socket_path(socket);
    let result = match command {
        Command::Serve(_) => unreachable_serve(),
        Command::Config(cmd) => return config_cmd::run(cmd, json),
        Command::Completions { shell } => return completions::run(shell, json),
        Command::Status => with_runtime(client::with_channel(&socket, |channel| {
            status::run(channel, json)
        })),
        Command::Jobs(cmd) => with_runtime(client::with_channel(&socket, |channel| {
            jobs::run(cmd, channel, json)
        })),
        Command::Images(cmd) => with_runtime(client::with_channel(&socket, |channel| {
            images::run(cmd, channel, json)
        })),
        Command::Apps(cmd) => with_runtime(client::with_channel(&socket, |channel| {
            apps::run(cmd, channel, json)
        })),
        Command::Mounts(cmd) => with_runtime(client::with_channel(&socket, |channel| {
            mounts::run(cmd, channel, json)
        })),
        Command::Setup(cmd) => with_runtime(client::with_channel(&socket, |channel| {
            setup::run(cmd, channel, json)
        })),
        Command::Access(cmd) => with_runtime(client::with_channel(&socket, |channel| {
            access::run(cmd, channel, json)
        })),
        Command::Activity(args) => with_runtime(client::with_channel(&socket, |channel| {
            lifecycle::run_activity(args, channel, json)
        })),
        Command::Idle(cmd) => with_runtime(client::with_channel(&socket, |channel| {
            lifecycle::run_idle(cmd, channel, json)
        })),
        Command::Disk(args) => with_runtime(client::with_channel(&socket, |channel| {
            disk::run(channel, json, args)
        })),
        // Doctor connects itself: an unreachable agent is one of its checks.
        Command::Doctor(args) => with_runtime(doctor::run(args, socket.clone(), json)),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("instance-agent: {}", client::explain(&error, &socket));
            client::exit_code(&error)
        }
    }
}

fn unreachable_serve() -> anyhow::Result<ExitCode> {
    anyhow::bail!("`serve` is handled by the entry point")
}

/// Runs a command's future on a small single-threaded runtime: the CLI makes
/// a handful of calls and exits.
fn with_runtime(
    future: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

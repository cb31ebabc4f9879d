//! Entry point: parses arguments, sets up logging, loads config, builds the
//! real adapters, runs the daemon or a CLI command, and maps errors to exit
//! codes. Nothing else lives here.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use instance_agent::access::system::SystemSsh;
use instance_agent::cli::{self, Cli, Command, LogFormat, ServeArgs};
use instance_agent::config::{DEFAULT_CONFIG_PATH, Overrides};
use instance_agent::disk::probe::SystemProbe;
use instance_agent::disk::probe::helper::{HelperProbe, PROBE_ARG};
use instance_agent::jobs::engine::DockerEngine;
use instance_agent::mounts::system::SystemMounter;
use instance_agent::paths::privileged::{self, HELPER_ARG};
use instance_agent::setup::UnitRunner;
use instance_agent::setup::supervisor::{self, SUPERVISOR_ARG};
use instance_agent::{Adapters, ConfigSource, Daemon};

/// sysexits.h: configuration error.
const EX_CONFIG: u8 = 78;
/// sysexits.h: internal software error.
const EX_SOFTWARE: u8 = 70;

fn main() -> ExitCode {
    // The setup script supervisor is this binary re-executed by the agent
    // (see `setup::runner`); it is not a user command.
    if std::env::args_os().nth(1).as_deref() == Some(SUPERVISOR_ARG.as_ref()) {
        return supervisor::main();
    }
    // So is the staging helper, started by PID 1 for an agent that may not
    // mount itself (see `paths::privileged`).
    if std::env::args_os().nth(1).as_deref() == Some(HELPER_ARG.as_ref()) {
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
        return privileged::helper_main(&args);
    }
    // So is the probe helper (see `disk::probe`): paths that users or remote
    // storage control are looked at there, never in the agent's threads.
    if std::env::args_os().nth(1).as_deref() == Some(PROBE_ARG.as_ref()) {
        return instance_agent::disk::probe::child::main();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args, cli.socket),
        other => cli::run(other, cli.socket, cli.json, cli.rpc_timeout),
    }
}

fn serve(args: ServeArgs, socket: Option<std::path::PathBuf>) -> ExitCode {
    init_tracing(args.log_format);
    // No core dumps and no ptrace by other processes of the same user: the
    // agent's memory holds storage keys, SAS tokens and the TLS key (the
    // unit also sets LimitCORE=0). Children get their own value at exec.
    if let Err(error) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(%error, "cannot turn core dumps off (PR_SET_DUMPABLE)");
    }
    let source = ConfigSource {
        must_exist: args.config.is_some(),
        path: args.config.unwrap_or_else(default_config_path),
        overrides: Overrides {
            // Like the client commands: --socket, else $INSTANCE_AGENT_SOCKET,
            // else the config file's agent.socket.
            socket: socket.or_else(|| {
                std::env::var_os("INSTANCE_AGENT_SOCKET")
                    .filter(|path| !path.is_empty())
                    .map(std::path::PathBuf::from)
            }),
            state_dir: args.state_dir,
        },
    };
    // Errors are logged once, through tracing: on the terminal, in the
    // journal (with its priority) or as JSON, as the operator chose.
    let config = match source.load_noting_derived() {
        Ok((config, derived)) => {
            if !derived.is_empty() {
                tracing::info!(
                    state_dir = %config.agent.state_dir.display(),
                    "--state-dir: {} left at their defaults, so they move under the state dir",
                    derived.join(", ")
                );
            }
            config
        }
        Err(error) => {
            tracing::error!("invalid configuration: {error}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    // Two workers are plenty for an agent whose work is waiting on sockets;
    // fewer threads keep its memory small on large hosts. TOKIO_WORKER_THREADS
    // (tokio's own variable) overrides it, for measurements.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(2);
    }
    let runtime = match builder
        .max_blocking_threads(instance_agent::BLOCKING_THREADS)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("cannot start the async runtime: {error}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let result = runtime.block_on(async {
        let engine = Arc::new(DockerEngine::new(
            &config.docker.socket,
            Duration::from_secs(config.docker.request_timeout_seconds.into()),
        ));
        let isolated_probe = Arc::new(HelperProbe::new(agent_binary()));
        let adapters = Adapters {
            engine: engine.clone(),
            image_engine: engine.clone(),
            registry: Arc::new(instance_agent::images::http::HttpRegistry::new()),
            apps: Arc::new(instance_agent::apps::engine::DockerApps::new(
                engine.clone(),
            )),
            prober: Arc::new(instance_agent::apps::probe::SocketProber),
            disk_docker: engine,
            disk_probe: Arc::new(SystemProbe),
            isolated_probe: isolated_probe.clone(),
            mounter: Arc::new(SystemMounter::new(isolated_probe)),
            setup_runner: UnitRunner::for_host(
                agent_binary(),
                &config.agent.runtime_dir,
                &config.agent.logs_dir,
            ),
            ssh: Arc::new(SystemSsh::new(&config.access)),
        };
        Daemon::new(config, source, adapters)
            .run(stop_signal())
            .await
    });
    // A blocking call stuck on a hung filesystem (statvfs on a dead FUSE
    // mount) must not keep the process from exiting.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Unusable TLS files are a configuration error, like a bad key.
        Err(error @ instance_agent::DaemonError::Tls(_)) => {
            tracing::error!("invalid configuration: {error}");
            ExitCode::from(EX_CONFIG)
        }
        Err(error) => {
            tracing::error!("instance-agent failed: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Where `serve` looks for its config without `--config`:
/// `$INSTANCE_AGENT_CONFIG` (for tests and unusual layouts), else
/// `/etc/instance-agent/config.toml`. Either way an absent file means all
/// defaults, which is what the systemd unit relies on.
fn default_config_path() -> std::path::PathBuf {
    std::env::var_os("INSTANCE_AGENT_CONFIG")
        .filter(|path| !path.is_empty())
        .map_or_else(|| DEFAULT_CONFIG_PATH.into(), std::path::PathBuf::from)
}

/// This binary, for re-executing it as the setup supervisor and the probe
/// helper. `/proc/self/exe`
/// opens the running binary even after a package upgrade replaced the file.
fn agent_binary() -> std::path::PathBuf {
    std::path::PathBuf::from("/proc/self/exe")
}

/// Resolves at the first SIGTERM or SIGINT. The handlers are installed when
/// this is called, not when the future is first polled: the daemon binds its
/// socket before it awaits the future, and a SIGTERM in between would
/// otherwise kill the process with the default action.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; the agent can only be killed");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

/// Logs to stderr: plain text without timestamps under journald (which adds
/// its own), with timestamps elsewhere, or JSON; filtered by `RUST_LOG`.
/// Colours only on a terminal (and not with `NO_COLOR`): a file, a pipe or
/// the journal would get raw escape codes.
fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text if under_journald => builder.without_time().with_ansi(false).init(),
        LogFormat::Text => builder.with_ansi(colour).init(),
    }
}

//! `instance-agent apps list|deploy|get|rm|restart|logs|invoke`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::jobs::{parse_mount, split_pair, write_chunk};
use super::{format, output, states};
use crate::api::proto::{
    self, agent_service_client::AgentServiceClient, app_service_client::AppServiceClient,
};

/// `apps` subcommands.
#[derive(Debug, Subcommand)]
pub enum AppsCommand {
    /// List apps.
    List,
    /// Deploy an app (idempotent by name; a changed spec replaces it):
    /// `apps deploy NAME --image IMG -p http=8080 --health-http http:/health [-- CMD ARGS...]`.
    Deploy(Box<DeployArgs>),
    /// Show one app.
    Get {
        /// The app's name.
        name: String,
    },
    /// Stop and remove an app (its port and slots are freed).
    Rm {
        /// The app's name.
        name: String,
    },
    /// Restart an app's container.
    Restart {
        /// The app's name.
        name: String,
    },
    /// Print an app's output.
    Logs {
        /// The app's name.
        name: String,
        /// Keep printing until the container exits.
        #[arg(short, long)]
        follow: bool,
    },
    /// POST to an app's endpoint and print the answer and the latency.
    Invoke {
        /// The app's name.
        name: String,
        /// Request path.
        #[arg(long, default_value = "/score")]
        path: String,
        /// Request body: text, or `@FILE` to read a file.
        #[arg(long, default_value = "")]
        data: String,
        /// The port to call, by name (the first port when absent).
        #[arg(long)]
        port: Option<String>,
    },
}

/// `apps deploy` options.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The app's name.
    pub name: String,
    /// Image reference (a local image).
    #[arg(long)]
    pub image: String,
    /// A port: `NAME=CONTAINER_PORT[:HOST_PORT][@HOST_IP]` (host port 0 or
    /// absent picks a free one); repeatable.
    #[arg(long = "port", short = 'p', value_name = "SPEC")]
    pub ports: Vec<String>,
    /// HTTP health check `PORT_NAME:/path`.
    #[arg(long, value_name = "PORT:PATH", conflicts_with = "health_tcp")]
    pub health_http: Option<String>,
    /// TCP health check on a port, by name.
    #[arg(long, value_name = "PORT")]
    pub health_tcp: Option<String>,
    /// Seconds between probes.
    #[arg(long, value_name = "SECONDS")]
    pub interval: Option<u32>,
    /// Seconds a probe may take.
    #[arg(long, value_name = "SECONDS")]
    pub probe_timeout: Option<u32>,
    /// Bad probes in a row before UNHEALTHY.
    #[arg(long)]
    pub failure_threshold: Option<u32>,
    /// Good probes in a row before READY.
    #[arg(long)]
    pub success_threshold: Option<u32>,
    /// Seconds the app may take to become READY.
    #[arg(long, value_name = "SECONDS")]
    pub startup_timeout: Option<u32>,
    /// always, on_failure or never.
    #[arg(long, default_value = "always")]
    pub restart: String,
    /// Environment variable KEY=VALUE; repeatable.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Host path (`/host/path:/in/container[:ro]`) or managed mount
    /// (`mount:NAME:/in/container[:ro]`); repeatable.
    #[arg(long = "mount", short = 'v', value_name = "SPEC")]
    pub mounts: Vec<String>,
    /// Job slots the app holds.
    #[arg(long, default_value_t = 1)]
    pub slots: u32,
    /// Memory limit, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// CPU limit in thousandths of a core.
    #[arg(long, value_name = "MILLICORES")]
    pub cpu_millis: Option<u32>,
    /// Inference preset: the model directory (mounted read-only).
    #[arg(long, value_name = "DIR")]
    pub inference_model: Option<String>,
    /// Inference preset: the scoring script (AZUREML_ENTRY_SCRIPT).
    #[arg(long, value_name = "SCRIPT", requires = "inference_model")]
    pub entry_script: Option<String>,
    /// Show the states until READY (exit 0) or a failure (exit 1).
    #[arg(long)]
    pub wait: bool,
    /// The command (after `--`); the image's default when absent.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Runs an `apps` subcommand.
pub async fn run(command: AppsCommand, channel: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let mut apps = AppServiceClient::new(channel.clone());
    match command {
        AppsCommand::List => {
            let list = apps
                .list_apps(proto::ListAppsRequest {})
                .await?
                .into_inner();
            output::reply(json, &list, |list| table(&list.apps))?;
        }
        AppsCommand::Deploy(args) => {
            let wait = args.wait;
            let spec = spec_from_args(*args)?;
            let name = spec.name.clone();
            // Opened before the deploy, so that no change is missed.
            let events = if wait {
                Some(app_events(channel).await?)
            } else {
                None
            };
            let app = apps
                .deploy_app(proto::DeployAppRequest { spec: Some(spec) })
                .await?
                .into_inner();
            let Some(events) = events else {
                output::reply(json, &app, render)?;
                return Ok(ExitCode::SUCCESS);
            };
            eprintln!("{}", app.rollout);
            return wait_ready(events, app, &name, json).await;
        }
        AppsCommand::Get { name } => {
            let app = apps
                .get_app(proto::GetAppRequest { name })
                .await?
                .into_inner();
            output::reply(json, &app, render)?;
        }
        AppsCommand::Rm { name } => {
            let app = apps
                .remove_app(proto::RemoveAppRequest { name })
                .await?
                .into_inner();
            output::reply(json, &app, render)?;
        }
        AppsCommand::Restart { name } => {
            let app = apps
                .restart_app(proto::RestartAppRequest { name })
                .await?
                .into_inner();
            output::reply(json, &app, render)?;
        }
        AppsCommand::Logs { name, follow } => {
            let mut logs = apps
                .stream_app_logs(proto::StreamAppLogsRequest { name, follow })
                .await?
                .into_inner();
            while let Some(chunk) = logs.next().await {
                let chunk = chunk?;
                if json {
                    output::json_line(&mut std::io::stdout(), &chunk)?;
                } else {
                    write_chunk(&chunk)?;
                }
            }
        }
        AppsCommand::Invoke {
            name,
            path,
            data,
            port,
        } => {
            let app = apps
                .get_app(proto::GetAppRequest { name: name.clone() })
                .await?
                .into_inner();
            let endpoint = app
                .endpoints
                .iter()
                .find(|e| port.as_ref().is_none_or(|p| *p == e.name) && e.name != "score")
                .with_context(|| {
                    format!(
                        "app {name:?} has no endpoint yet (state {})",
                        states::app(app.state())
                    )
                })?;
            let body = match data.strip_prefix('@') {
                Some(file) => std::fs::read(file).with_context(|| format!("--data @{file}"))?,
                None => data.into_bytes(),
            };
            let began = Instant::now();
            let (status, answer) = post(&endpoint.url, &path, &body).await?;
            let latency = began.elapsed();
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(&answer)?;
            if !answer.ends_with(b"\n") {
                writeln!(out)?;
            }
            eprintln!(
                "POST {}{path}: status {status}, {:.1} ms",
                endpoint.url,
                latency.as_secs_f64() * 1000.0
            );
            if !(200..300).contains(&status) {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The agent's events from now on (`WatchEvents` from the latest sequence).
async fn app_events(channel: Channel) -> anyhow::Result<tonic::Streaming<proto::Event>> {
    let mut agent = AgentServiceClient::new(channel);
    let since = agent
        .get_status(proto::GetStatusRequest {})
        .await?
        .into_inner()
        .last_event_sequence;
    Ok(agent
        .watch_events(proto::WatchEventsRequest { since: Some(since) })
        .await?
        .into_inner())
}

/// How a watched app stands.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Still on its way.
    Pending,
    /// READY (after a rolling replace: the new container).
    Ready,
    /// Failed, stopped, backing off, or a rolling replace given up.
    Failed,
}

/// Where `app` stands, for a deploy whose reply was `deployed`; `went_down`:
/// a state other than READY was seen since. After a rolling replace the
/// app is READY all along (the old container serves), so only new
/// endpoints (the new container's picked ports) are READY; after a
/// stop-then-start, only a READY that follows the stop.
fn outcome(app: &proto::App, deployed: &proto::App, went_down: bool) -> Outcome {
    let rolling = deployed.rollout.starts_with("rolling");
    let stop_first = deployed.rollout.starts_with("stop-then-start");
    match app.state() {
        proto::AppState::Ready if rolling && app.endpoints != deployed.endpoints => Outcome::Ready,
        proto::AppState::Ready if !rolling && (!stop_first || went_down) => Outcome::Ready,
        proto::AppState::Ready if app.reason.starts_with("rolling replace failed") => {
            Outcome::Failed
        }
        proto::AppState::Failed | proto::AppState::Stopped | proto::AppState::Backoff => {
            Outcome::Failed
        }
        _ => Outcome::Pending,
    }
}

/// Shows each state change of app `name` as the agent's events tell them
/// (no polling) until READY (0) or a failure (1).
async fn wait_ready(
    mut events: tonic::Streaming<proto::Event>,
    deployed: proto::App,
    name: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut last = String::new();
    let mut app = deployed.clone();
    let mut went_down = false;
    loop {
        went_down |= app.state() != proto::AppState::Ready;
        let line = format!("{:<10} {}", states::app(app.state()), app.reason);
        if line != last && !json {
            eprintln!("{line}");
            last = line;
        }
        match outcome(&app, &deployed, went_down) {
            Outcome::Ready => {
                output::reply(json, &app, render)?;
                return Ok(ExitCode::SUCCESS);
            }
            Outcome::Failed => {
                output::reply(json, &app, render)?;
                return Ok(ExitCode::FAILURE);
            }
            Outcome::Pending => {}
        }
        app = loop {
            let event = events
                .next()
                .await
                .context("the agent's event stream ended (see `apps get`)")??;
            match event.kind {
                Some(proto::event::Kind::App(proto::AppEvent { app: Some(changed) }))
                    if changed.spec.as_ref().is_some_and(|s| s.name == name) =>
                {
                    break changed;
                }
                Some(proto::event::Kind::BacklogTruncated(_)) => {
                    bail!("events were missed (backlog truncated); see `apps get {name}`")
                }
                _ => {}
            }
        };
    }
}

/// Redirects `apps invoke` follows (on the same server, with the same POST).
const MAX_REDIRECTS: usize = 3;

/// POSTs `body` to `path` on the endpoint `base`, following redirects to
/// paths on the same server with the same method and body (many servers
/// answer `POST /score` with a redirect to `/score/`; a client that turned
/// it into a GET would lose the request); the status and the body.
async fn post(base: &str, path: &str, body: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
    let authority = base
        .strip_prefix("http://")
        .with_context(|| format!("endpoint {base:?} is not http://"))?;
    let mut path = path.to_owned();
    for _ in 0..=MAX_REDIRECTS {
        let (status, location, answer) = post_once(authority, &path, body).await?;
        let next = location.and_then(|l| same_server_path(&l, authority));
        match (status, next) {
            (301 | 302 | 307 | 308, Some(next)) => {
                eprintln!("POST {path}: status {status}, following to {next}");
                path = next;
            }
            _ => return Ok((status, answer)),
        }
    }
    bail!("more than {MAX_REDIRECTS} redirects from {base}{path}")
}

/// The path a `Location` points to when it stays on `authority`.
fn same_server_path(location: &str, authority: &str) -> Option<String> {
    if location.starts_with('/') {
        return Some(location.to_owned());
    }
    let rest = location.strip_prefix("http://")?.strip_prefix(authority)?;
    Some(if rest.is_empty() {
        "/".into()
    } else {
        rest.to_owned()
    })
    .filter(|p| p.starts_with('/'))
}

/// One HTTP/1.0 POST on loopback (no chunked answers, the server closes):
/// the status, the `Location` header and the body.
async fn post_once(
    authority: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u32, Option<String>, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the answer has no HTTP header")?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {:?}", head.lines().next()))?;
    let location = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("location")
            .then(|| value.trim().to_owned())
    });
    Ok((status, location, answer[split + 4..].to_vec()))
}

fn spec_from_args(args: DeployArgs) -> anyhow::Result<proto::AppSpec> {
    let env = args
        .env
        .iter()
        .map(|e| split_pair("--env", e))
        .collect::<anyhow::Result<_>>()?;
    let mounts = args
        .mounts
        .iter()
        .map(|m| parse_mount(m))
        .collect::<anyhow::Result<_>>()?;
    let ports = args
        .ports
        .iter()
        .map(|p| parse_port(p))
        .collect::<anyhow::Result<_>>()?;
    let probe = match (&args.health_http, &args.health_tcp) {
        (Some(http), _) => {
            let (port, path) = http
                .split_once(':')
                .with_context(|| format!("--health-http {http:?}: expected PORT:/path"))?;
            Some(proto::health_check::Probe::Http(proto::HttpCheck {
                port: port.to_owned(),
                path: path.to_owned(),
                ..Default::default()
            }))
        }
        (None, Some(port)) => Some(proto::health_check::Probe::Tcp(proto::TcpCheck {
            port: port.clone(),
        })),
        (None, None) => None,
    };
    let restart = match args.restart.as_str() {
        "always" => proto::RestartPolicy::Always,
        "on_failure" | "on-failure" => proto::RestartPolicy::OnFailure,
        "never" => proto::RestartPolicy::Never,
        other => bail!("--restart {other:?}: expected always, on_failure or never"),
    };
    let memory_bytes = match &args.memory {
        Some(size) => format::parse_size(size).with_context(|| format!("--memory {size:?}"))?,
        None => 0,
    };
    Ok(proto::AppSpec {
        name: args.name,
        image: args.image,
        command: args.command,
        env,
        ports,
        mounts,
        gpus: 0,
        memory_bytes,
        cpu_millis: args.cpu_millis.unwrap_or(0),
        slots: args.slots,
        restart: restart as i32,
        health: Some(proto::HealthCheck {
            probe,
            interval_seconds: args.interval,
            timeout_seconds: args.probe_timeout,
            failure_threshold: args.failure_threshold,
            success_threshold: args.success_threshold,
            startup_timeout_seconds: args.startup_timeout,
        }),
        inference: args.inference_model.map(|model_path| proto::InferenceSpec {
            model_path,
            entry_script: args.entry_script.unwrap_or_else(|| "score.py".into()),
        }),
    })
}

/// `NAME=CONTAINER[:HOST][@IP]`.
fn parse_port(text: &str) -> anyhow::Result<proto::AppPort> {
    let bad = || format!("--port {text:?}: expected NAME=CONTAINER_PORT[:HOST_PORT][@HOST_IP]");
    let (name, rest) = text.split_once('=').with_context(bad)?;
    let (ports, host_ip) = rest.split_once('@').unwrap_or((rest, ""));
    let (container, host) = ports.split_once(':').unwrap_or((ports, "0"));
    Ok(proto::AppPort {
        name: name.to_owned(),
        container_port: container.parse().with_context(bad)?,
        host_port: host.parse().with_context(bad)?,
        host_ip: host_ip.to_owned(),
    })
}

fn table(apps: &[proto::App]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<10} {:>8} {:<32} REASON",
        "NAME", "STATE", "RESTARTS", "ENDPOINT"
    );
    for app in apps {
        let name = app
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let endpoint = app
            .endpoints
            .first()
            .map(|e| e.url.clone())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>8} {:<32} {}",
            name,
            states::app(app.state()),
            app.restarts,
            endpoint,
            app.reason
        );
    }
    out
}

/// One app, a field a line.
fn render(app: &proto::App) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let spec = app.spec.clone().unwrap_or_default();
    let _ = writeln!(out, "app        {}", spec.name);
    let _ = writeln!(
        out,
        "state      {}  ({})",
        states::app(app.state()),
        app.reason
    );
    if !app.rollout.is_empty() {
        let _ = writeln!(out, "rollout    {}", app.rollout);
    }
    let _ = writeln!(out, "image      {}", spec.image);
    for endpoint in &app.endpoints {
        let _ = writeln!(out, "endpoint   {:<8} {}", endpoint.name, endpoint.url);
    }
    let _ = writeln!(out, "restarts   {}", app.restarts);
    if let Some(code) = app.last_exit_status {
        let _ = writeln!(out, "last exit  {code}");
    }
    if let Some(probe) = &app.last_probe {
        let result = if probe.healthy { "ok" } else { "bad" };
        let detail = if probe.error.is_empty() {
            format!("status {}", probe.status_code)
        } else {
            probe.error.clone()
        };
        let _ = writeln!(
            out,
            "probe      {result} {detail}, {:.1} ms, {}",
            probe.latency_micros as f64 / 1000.0,
            format::age(probe.time.as_ref())
        );
    }
    let _ = writeln!(out, "deployed   {}", format::age(app.created.as_ref()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse() {
        let port = parse_port("http=8080:9000@0.0.0.0").unwrap();
        assert_eq!((port.container_port, port.host_port), (8080, 9000));
        assert_eq!(port.host_ip, "0.0.0.0");
        let port = parse_port("http=5001").unwrap();
        assert_eq!((port.host_port, port.host_ip.as_str()), (0, ""));
        assert!(parse_port("5001").is_err());
    }

    fn app(state: proto::AppState, port: u32, reason: &str, rollout: &str) -> proto::App {
        proto::App {
            state: state.into(),
            reason: reason.into(),
            rollout: rollout.into(),
            endpoints: vec![proto::AppEndpoint {
                name: "http".into(),
                url: format!("http://127.0.0.1:{port}"),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_rolling_replace_is_ready_only_on_the_new_container() {
        use proto::AppState::{Backoff, Ready, Starting};
        let created = app(Starting, 1, "", "created");
        assert_eq!(outcome(&created, &created, true), Outcome::Pending);
        assert_eq!(
            outcome(&app(Ready, 1, "", ""), &created, true),
            Outcome::Ready
        );
        assert_eq!(
            outcome(&app(Backoff, 1, "", ""), &created, true),
            Outcome::Failed
        );
        let rolling = app(Ready, 1, "", "rolling replace: ...");
        assert_eq!(outcome(&rolling, &rolling, false), Outcome::Pending);
        assert_eq!(
            outcome(&app(Ready, 2, "", ""), &rolling, false),
            Outcome::Ready
        );
        let given_up = app(
            Ready,
            1,
            "rolling replace failed (x); the old spec serves on",
            "",
        );
        assert_eq!(outcome(&given_up, &rolling, false), Outcome::Failed);
        let stop_first = app(Ready, 1, "", "stop-then-start: ...");
        assert_eq!(outcome(&stop_first, &stop_first, false), Outcome::Pending);
        assert_eq!(
            outcome(&app(Ready, 1, "", ""), &stop_first, true),
            Outcome::Ready
        );
    }

    #[test]
    fn redirects_are_followed_only_on_the_same_server() {
        let here = "127.0.0.1:4000";
        assert_eq!(
            same_server_path("/score/", here).as_deref(),
            Some("/score/")
        );
        assert_eq!(
            same_server_path("http://127.0.0.1:4000/score/", here).as_deref(),
            Some("/score/")
        );
        assert_eq!(
            same_server_path("http://127.0.0.1:4000", here).as_deref(),
            Some("/")
        );
        assert_eq!(same_server_path("http://example.com/score/", here), None);
        assert_eq!(same_server_path("http://127.0.0.1:40001/x", here), None);
    }
}

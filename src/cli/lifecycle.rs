//! `instance-agent activity` (idle or not, and exactly why) and
//! `instance-agent idle status|postpone|set` (the idle shutdown policy, the
//! pending stop, postponing it) through the `LifecycleService` API.

use std::fmt::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use tonic::transport::Channel;

use super::{format, output};
use crate::api::proto::{self, lifecycle_service_client::LifecycleServiceClient};

/// `activity` options.
#[derive(Debug, Args)]
pub struct ActivityArgs {
    /// Print the activity now and at each change until interrupted.
    #[arg(long)]
    pub watch: bool,
}

/// `idle` subcommands.
#[derive(Debug, Subcommand)]
pub enum IdleCommand {
    /// The idle shutdown policy, whether the instance is idle, and when it will be stopped.
    Status,
    /// Postpone the idle stop by DURATION from now (90s, 15m, 2h, 1d).
    Postpone {
        /// How long from now.
        duration: String,
        /// Why (recorded with who asked).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Set the idle shutdown policy (kept across restarts).
    Set(SetArgs),
}

/// `idle set` options.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// Turn idle shutdown on or off.
    #[arg(long, value_name = "BOOL")]
    pub enabled: bool,
    /// How long every source must be quiet (10s to 3d).
    #[arg(long, default_value = "1h")]
    pub timeout: String,
    /// When the first warning goes out before the stop.
    #[arg(long, default_value = "30m")]
    pub warn_before: String,
}

/// Runs `activity`.
pub async fn run_activity(
    args: ActivityArgs,
    channel: Channel,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = LifecycleServiceClient::new(channel);
    if !args.watch {
        let reply = client
            .get_activity(proto::GetActivityRequest {})
            .await?
            .into_inner();
        output::reply(json, &reply, render_activity)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut stream = client
        .watch_activity(proto::WatchActivityRequest {})
        .await?
        .into_inner();
    let mut stdout = std::io::stdout();
    while let Some(activity) = stream.message().await? {
        if json {
            output::json_line(&mut stdout, &activity)?;
        } else {
            println!("{}", render_activity(&activity));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs an `idle` subcommand.
pub async fn run_idle(
    command: IdleCommand,
    channel: Channel,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = LifecycleServiceClient::new(channel);
    let reply = match command {
        IdleCommand::Status => client.get_activity(proto::GetActivityRequest {}).await?,
        IdleCommand::Postpone { duration, reason } => {
            let seconds = seconds(&duration, "DURATION")?;
            client
                .postpone_idle_shutdown(proto::PostponeIdleShutdownRequest {
                    duration_seconds: seconds,
                    reason,
                })
                .await?
        }
        IdleCommand::Set(args) => {
            let policy = proto::IdleShutdownPolicy {
                enabled: args.enabled,
                idle_timeout_seconds: u32::try_from(seconds(&args.timeout, "--timeout")?)
                    .unwrap_or(u32::MAX),
                warn_before_seconds: u32::try_from(seconds(&args.warn_before, "--warn-before")?)
                    .unwrap_or(u32::MAX),
            };
            client
                .set_idle_shutdown(proto::SetIdleShutdownRequest {
                    policy: Some(policy),
                })
                .await?
        }
    }
    .into_inner();
    output::reply(json, &reply, render_idle)?;
    Ok(ExitCode::SUCCESS)
}

fn seconds(text: &str, what: &str) -> anyhow::Result<u64> {
    crate::units::parse_duration(text)
        .map(|d| d.as_secs())
        .with_context(|| {
            format!("{what} {text:?}: use a number with suffix s, m, h or d (e.g. 2h)")
        })
}

/// How long until a timestamp, e.g. `in 5m 2s`.
fn until(ts: Option<&pbjson_types::Timestamp>) -> String {
    let Some(ts) = ts else { return "-".into() };
    let then = std::time::SystemTime::UNIX_EPOCH
        + std::time::Duration::from_secs(u64::try_from(ts.seconds).unwrap_or(0));
    match then.duration_since(std::time::SystemTime::now()) {
        Ok(d) => format!("in {}", format::duration(d)),
        Err(_) => "now".into(),
    }
}

fn state_name(state: i32) -> &'static str {
    match proto::ReadingState::try_from(state).unwrap_or_default() {
        proto::ReadingState::Unspecified => "not sampled",
        proto::ReadingState::Active => "active",
        proto::ReadingState::Quiet => "quiet",
        proto::ReadingState::Unreadable => "cannot read",
    }
}

/// The pending stop and how to postpone it, or nothing.
fn pending_stop(out: &mut String, a: &proto::Activity) {
    if let Some(at) = &a.idle_shutdown_at {
        let _ = writeln!(
            out,
            "idle stop:  {} ({}); postpone with `instance-agent idle postpone 2h --reason TEXT`",
            format::utc(Some(at)),
            until(Some(at)),
        );
    }
    if let Some(p) = &a.postponement {
        let _ = writeln!(
            out,
            "postponed:  until {} by {}{}",
            format::utc(p.until.as_ref()),
            p.requested_by,
            if p.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", p.reason)
            }
        );
    }
}

fn render_activity(a: &proto::Activity) -> String {
    let mut out = String::new();
    if a.idle {
        let _ = writeln!(out, "idle since {}", format::age(a.idle_since.as_ref()));
    } else {
        let _ = writeln!(out, "active");
    }
    if let Some(last) = &a.last_activity_source {
        let _ = writeln!(
            out,
            "last activity: {}: {} ({})",
            last.source,
            last.detail,
            format::age(last.time.as_ref())
        );
    }
    pending_stop(&mut out, a);
    let _ = writeln!(
        out,
        "{:<14} {:<12} {:>5}  DETAIL",
        "SOURCE", "STATE", "COUNT"
    );
    for s in &a.sources {
        let _ = writeln!(
            out,
            "{:<14} {:<12} {:>5}  {}",
            s.name,
            state_name(s.state),
            s.count,
            if s.detail.is_empty() { "-" } else { &s.detail }
        );
    }
    out
}

fn render_idle(a: &proto::Activity) -> String {
    let mut out = String::new();
    let policy = a.policy.unwrap_or_default();
    if policy.enabled {
        let _ = writeln!(
            out,
            "idle shutdown: on, after {} idle, first warning {} before",
            format::duration(std::time::Duration::from_secs(
                policy.idle_timeout_seconds.into()
            )),
            format::duration(std::time::Duration::from_secs(
                policy.warn_before_seconds.into()
            )),
        );
    } else {
        let _ = writeln!(out, "idle shutdown: off");
    }
    if a.idle {
        let _ = writeln!(out, "idle since {}", format::age(a.idle_since.as_ref()));
    } else {
        let _ = writeln!(out, "active");
    }
    pending_stop(&mut out, a);
    out
}

//! `instance-agent status`: version, uptime, host, conditions and slots.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::client;
use super::format;
use crate::api::proto::{self, agent_service_client::AgentServiceClient};

/// Prints the status; exits 0 when healthy, 1 when any condition failed, 69
/// when the daemon cannot be reached.
pub async fn run(socket: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let channel = match client::connect_or_explain(&socket).await {
        Ok(channel) => channel,
        Err(code) => return Ok(code),
    };
    let status = AgentServiceClient::new(channel)
        .get_status(proto::GetStatusRequest {})
        .await?
        .into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    let failed = status
        .conditions
        .iter()
        .any(|c| c.state() == proto::ConditionState::Failed);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn state_name(state: proto::ConditionState) -> &'static str {
    match state {
        proto::ConditionState::Unknown => "unknown",
        proto::ConditionState::Ok => "ok",
        proto::ConditionState::Degraded => "DEGRADED",
        proto::ConditionState::Failed => "FAILED",
        proto::ConditionState::Disabled => "disabled",
    }
}

fn render(s: &proto::GetStatusResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let host = s.host.clone().unwrap_or_default();
    let slots = s.slots.clone().unwrap_or_default();
    let _ = writeln!(out, "instance-agent {} — {}", s.version, s.summary);
    let _ = writeln!(
        out,
        "  instance  {}   up {}",
        s.instance_id,
        format::duration(Duration::from_secs_f64(s.uptime_seconds.max(0.0)))
    );
    let _ = writeln!(out, "  host      {} (Linux {})", host.hostname, host.kernel);
    let gpus = if host.gpus.is_empty() {
        "none".to_owned()
    } else {
        host.gpus
            .iter()
            .map(|g| format!("{}:{}", g.index, g.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "  cpu       {:.1} usable cores of {}   memory {} free of {}   gpus {}",
        host.usable_cores,
        host.host_cpus,
        format::bytes(host.memory_available_bytes),
        format::bytes(host.memory_total_bytes),
        gpus
    );
    let _ = write!(
        out,
        "  slots     {}/{} in use, {} running, {} queued",
        slots.in_use, slots.capacity, slots.running, slots.queued
    );
    if !slots.held_reason.is_empty() {
        let _ = write!(out, " (held: {})", slots.held_reason);
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "conditions");
    for c in &s.conditions {
        let _ = writeln!(
            out,
            "  {:<8} {:<9} {}  (since {})",
            c.r#type,
            state_name(c.state()),
            c.message,
            format::age(c.since.as_ref())
        );
    }
    if let Some(run) = s.creation_run.as_ref().filter(|r| {
        !matches!(
            r.state(),
            proto::SetupRunState::Succeeded
                | proto::SetupRunState::Pending
                | proto::SetupRunState::Running
        )
    }) {
        render_failed_creation(&mut out, run);
    }
    out
}

/// A creation run that did not succeed: how it ended, its log, its last lines.
fn render_failed_creation(out: &mut String, run: &proto::SetupRun) {
    use std::fmt::Write;
    let ended = match (run.exit_code, run.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "no exit code".to_owned(),
    };
    let _ = writeln!(
        out,
        "creation script {} (run {}, {ended})",
        super::setup::state_name(run.state()),
        run.id
    );
    if !run.log_path.is_empty() {
        let _ = writeln!(out, "  log       {}", run.log_path);
    }
    for line in &run.log_tail {
        let _ = writeln!(out, "  | {line}");
    }
}

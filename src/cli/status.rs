//! `instance-agent status`: version, uptime, host, conditions and slots.

use std::process::ExitCode;
use std::time::Duration;

use tonic::transport::Channel;

use super::{format, output, states};
use crate::api::proto::{self, agent_service_client::AgentServiceClient};

/// Prints the status; exits 0 when healthy, 1 when any condition failed.
pub async fn run(channel: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let status = AgentServiceClient::new(channel)
        .get_status(proto::GetStatusRequest {})
        .await?
        .into_inner();
    output::reply(json, &status, render)?;
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
    for pull in &s.pulls {
        let _ = writeln!(out, "  pull      {}", super::images::pull_line(pull));
    }
    let _ = writeln!(out, "conditions");
    for c in &s.conditions {
        let _ = writeln!(
            out,
            "  {:<8} {:<9} {}  (since {})",
            c.r#type,
            states::condition(c.state()),
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
    if !s.unknown_containers.is_empty() {
        let _ = writeln!(
            out,
            "containers of unknown origin (kept; `disk --reclaim --unknown-containers` removes them)"
        );
        for c in &s.unknown_containers {
            let job = if c.job_id.is_empty() {
                "no job label"
            } else {
                c.job_id.as_str()
            };
            let id: String = c.container_id.chars().take(12).collect();
            let _ = writeln!(out, "  {id}  {:<9} {job}", c.state);
        }
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
        states::setup_run(run.state()),
        run.id
    );
    if !run.log_path.is_empty() {
        let _ = writeln!(out, "  log       {}", run.log_path);
    }
    for line in &run.log_tail {
        let _ = writeln!(out, "  | {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> proto::GetStatusResponse {
        proto::GetStatusResponse {
            version: "1.2.3".into(),
            uptime_seconds: 3700.0,
            instance_id: "inst-1".into(),
            host: Some(proto::HostInfo {
                hostname: "vm-1".into(),
                usable_cores: 2.0,
                host_cpus: 4,
                memory_total_bytes: 8 << 30,
                memory_available_bytes: 6 << 30,
                gpus: vec![proto::Gpu {
                    index: 0,
                    name: "A100".into(),
                    ..Default::default()
                }],
                kernel: "6.1.0".into(),
                supervision: String::new(),
            }),
            conditions: vec![
                proto::Condition {
                    r#type: "docker".into(),
                    state: proto::ConditionState::Ok as i32,
                    message: "engine 20.10 answers".into(),
                    since: None,
                },
                proto::Condition {
                    r#type: "disk".into(),
                    state: proto::ConditionState::Failed as i32,
                    message: "/ is 99% full".into(),
                    since: None,
                },
            ],
            slots: Some(proto::SlotUsage {
                capacity: 8,
                in_use: 2,
                queued: 1,
                running: 2,
                held_reason: "disk / is full".into(),
            }),
            summary: "disk FAILED: / is 99% full".into(),
            ..Default::default()
        }
    }

    #[test]
    fn summary_layout() {
        let text = render(&sample());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "instance-agent 1.2.3 — disk FAILED: / is 99% full"
        );
        assert!(lines[1].starts_with("  instance  inst-1   up "), "{text}");
        assert_eq!(lines[2], "  host      vm-1 (Linux 6.1.0)");
        assert!(
            lines[3].starts_with("  cpu       2.0 usable cores of 4   memory "),
            "{text}"
        );
        assert!(lines[3].ends_with("gpus 0:A100"), "{text}");
        assert_eq!(
            lines[4],
            "  slots     2/8 in use, 2 running, 1 queued (held: disk / is full)"
        );
        assert_eq!(lines[5], "conditions");
        assert_eq!(
            lines[6],
            "  docker   ok        engine 20.10 answers  (since -)"
        );
        assert_eq!(lines[7], "  disk     FAILED    / is 99% full  (since -)");
        assert_eq!(lines.len(), 8, "{text}");
    }

    #[test]
    fn containers_of_unknown_origin_are_listed() {
        let mut status = sample();
        status.unknown_containers = vec![
            proto::UnknownContainer {
                container_id: "0123456789abcdef".into(),
                job_id: "train-7".into(),
                state: "running".into(),
            },
            proto::UnknownContainer {
                container_id: "fedcba9876543210".into(),
                job_id: String::new(),
                state: "exited".into(),
            },
        ];
        let text = render(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[8].starts_with("containers of unknown origin"),
            "{text}"
        );
        assert_eq!(lines[9], "  0123456789ab  running   train-7");
        assert_eq!(lines[10], "  fedcba987654  exited    no job label");
    }

    #[test]
    fn an_empty_reply_still_renders() {
        let text = render(&proto::GetStatusResponse::default());
        assert!(text.contains("gpus none"), "{text}");
        assert!(text.contains("slots     0/0 in use"), "{text}");
    }
}

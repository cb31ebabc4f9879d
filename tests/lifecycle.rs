//! Black-box tests of activity and idle shutdown: the real binary samples
//! its real sources (jobs in the real Docker engine with the local busybox
//! image, a real pseudo-terminal made by `script`), asks for the stop at
//! the idle deadline through a stop command that only writes a marker, and
//! keeps the idle clock across a restart.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::events::EventLog;
use common::{Agent, cli};
use instance_agent::api::proto::{
    self, job_service_client::JobServiceClient, lifecycle_service_client::LifecycleServiceClient,
};
use tonic::transport::Channel;

type Client = LifecycleServiceClient<Channel>;

/// Sampling every second, every source off but those `on` names.
fn config(on: &[&str], idle: &str, stop_marker: Option<&Path>) -> String {
    let mut toml = String::from("[lifecycle]\nsample_interval_seconds = 1\n");
    if let Some(marker) = stop_marker {
        toml.push_str(&format!(
            "stop_command = [\"/bin/sh\", \"-c\", \"echo \\\"$INSTANCE_AGENT_STOP_REASON\\\" >> {}\"]\n",
            marker.display()
        ));
    }
    toml.push_str(&format!("[lifecycle.idle_shutdown]\n{idle}\n"));
    for source in ["jobs", "ssh", "terminals", "background", "apps"] {
        toml.push_str(&format!(
            "[lifecycle.{source}]\nenabled = {}\n",
            on.contains(&source)
        ));
    }
    toml
}

async fn client(agent: &Agent) -> Client {
    LifecycleServiceClient::new(agent.channel().await)
}

async fn activity(client: &mut Client) -> proto::Activity {
    client
        .get_activity(proto::GetActivityRequest {})
        .await
        .expect("GetActivity")
        .into_inner()
}

/// Polls the activity until `wanted` holds (a sample a second).
async fn activity_until(
    client: &mut Client,
    what: &str,
    within: Duration,
    wanted: impl Fn(&proto::Activity) -> bool,
) -> proto::Activity {
    let deadline = Instant::now() + within;
    loop {
        let a = activity(client).await;
        if wanted(&a) {
            return a;
        }
        assert!(Instant::now() < deadline, "never {what}: {a:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn lifecycle_kind(event: &proto::Event) -> Option<&proto::lifecycle_event::Kind> {
    match &event.kind {
        Some(proto::event::Kind::Lifecycle(e)) => e.kind.as_ref(),
        _ => None,
    }
}

fn source<'a>(a: &'a proto::Activity, name: &str) -> &'a proto::ActivitySource {
    a.sources
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no source {name}: {a:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_past_the_timeout_warns_then_runs_the_stop_command_once() {
    let markers = tempfile::tempdir().unwrap();
    let marker = markers.path().join("stopped");
    let agent = Agent::builder()
        .config(&config(
            &["jobs"],
            "enabled = true\nidle_timeout_seconds = 10\nwarn_before_seconds = 5",
            Some(&marker),
        ))
        .start();
    let mut events = EventLog::since(&agent, 0).await;
    events
        .until("IdleShutdownRequested", Duration::from_secs(60), |e| {
            matches!(
                lifecycle_kind(e),
                Some(proto::lifecycle_event::Kind::IdleShutdownRequested(_))
            )
        })
        .await;
    let pending: Vec<_> = events
        .seen()
        .iter()
        .filter(|e| {
            matches!(
                lifecycle_kind(e),
                Some(proto::lifecycle_event::Kind::IdleShutdownPending(_))
            )
        })
        .collect();
    assert_eq!(
        pending.len(),
        1,
        "one warning before a 10 s timeout: {}",
        events.summary()
    );
    // The stop command runs after the event.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the stop command never ran:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reason = std::fs::read_to_string(&marker).unwrap();
    assert!(reason.starts_with("idle since "), "{reason:?}");
    // The terminal user sees it too.
    let out = cli(&agent.socket, &["activity"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("idle since"), "{text}");
    assert!(text.contains("jobs"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_job_keeps_the_instance_active_and_is_named() {
    let agent = Agent::builder()
        .config(&config(
            &["jobs"],
            "enabled = true\nidle_timeout_seconds = 10\nwarn_before_seconds = 0",
            None,
        ))
        .start();
    let mut lifecycle = client(&agent).await;
    let mut jobs = JobServiceClient::new(agent.channel().await);
    let id = format!("busy-{}", common::uuid_like());
    jobs.submit_job(proto::SubmitJobRequest {
        spec: Some(proto::JobSpec {
            id: id.clone(),
            image: "instance-agent/busybox:test".into(),
            command: vec!["sleep".into(), "600".into()],
            ..Default::default()
        }),
    })
    .await
    .expect("SubmitJob");
    let busy = activity_until(
        &mut lifecycle,
        "active with the job",
        Duration::from_secs(60),
        |a| !a.idle && source(a, "jobs").detail == format!("job {id} running"),
    )
    .await;
    let last = busy.last_activity_source.expect("a last activity");
    assert_eq!(last.source, "jobs");
    assert_eq!(busy.idle_shutdown_at, None);
    let out = cli(&agent.socket, &["activity"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("active"), "{text}");
    assert!(text.contains(&format!("job {id} running")), "{text}");
    // Longer than the timeout (samples 15 s after the first busy one):
    // still active, no stop asked for.
    let mut events = EventLog::from_now(&agent).await;
    let first_busy = last.time.map_or(0, |t| t.seconds);
    let held = activity_until(
        &mut lifecycle,
        "15 s of samples",
        Duration::from_secs(60),
        |a| {
            a.idle
                || a.last_activity_source
                    .as_ref()
                    .and_then(|l| l.time)
                    .is_some_and(|t| t.seconds >= first_busy + 15)
        },
    )
    .await;
    assert!(!held.idle, "{held:#?}");
    jobs.cancel_job(proto::CancelJobRequest { id: id.clone() })
        .await
        .expect("CancelJob");
    let idle = activity_until(
        &mut lifecycle,
        "idle after the job",
        Duration::from_secs(60),
        |a| a.idle,
    )
    .await;
    assert_eq!(
        idle.last_activity_source.map(|l| l.detail),
        Some(format!("job {id} running"))
    );
    events
        .until("IdleChanged to idle", Duration::from_secs(30), |e| {
            matches!(
                lifecycle_kind(e),
                Some(proto::lifecycle_event::Kind::IdleChanged(c)) if c.idle
            )
        })
        .await;
    assert!(
        !events.seen().iter().any(|e| matches!(
            lifecycle_kind(e),
            Some(proto::lifecycle_event::Kind::IdleShutdownRequested(_))
        )),
        "no stop while the job ran: {}",
        events.summary()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pseudo_terminal_with_output_is_active() {
    let agent = Agent::builder()
        .config(&config(&["terminals"], "enabled = false", None))
        .start();
    let mut lifecycle = client(&agent).await;
    // A real pty: `script` runs the loop on a new /dev/pts/N and prints its name.
    let mut script = Command::new("script")
        .args(["-qfc", "while :; do tty; sleep 0.5; done", "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("script(1) from util-linux");
    let mut stdout = std::io::BufReader::new(script.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let pts = line.trim().trim_start_matches("/dev/").to_owned();
    assert!(pts.starts_with("pts/"), "{line:?}");
    let result = activity_until(
        &mut lifecycle,
        "the terminal active",
        Duration::from_secs(30),
        // The first sample may not have been taken yet: no source at all.
        |a| {
            a.sources.iter().any(|s| {
                s.name == "terminals" && s.detail.starts_with(&format!("terminal {pts} of "))
            })
        },
    )
    .await;
    let _ = script.kill();
    let _ = script.wait();
    assert!(!result.idle, "{result:#?}");
    assert_eq!(
        source(&result, "terminals").state(),
        proto::ReadingState::Active
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_the_idle_clock_and_a_postponement() {
    let mut agent = Agent::builder()
        .config(&config(
            &["jobs"],
            "enabled = true\nidle_timeout_seconds = 3600\nwarn_before_seconds = 0",
            None,
        ))
        .start();
    let mut lifecycle = client(&agent).await;
    let before = activity_until(&mut lifecycle, "idle", Duration::from_secs(30), |a| a.idle).await;
    let since = before.idle_since.unwrap();
    let postponed = lifecycle
        .postpone_idle_shutdown(proto::PostponeIdleShutdownRequest {
            duration_seconds: 7200,
            reason: "demo at 3".into(),
        })
        .await
        .expect("PostponeIdleShutdown")
        .into_inner();
    let postponement = postponed.postponement.clone().expect("a postponement");
    assert_eq!(postponement.reason, "demo at 3");
    assert_eq!(postponed.idle_shutdown_at, postponement.until);
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.exited(Duration::from_secs(30)).await.is_some());
    agent.respawn();
    agent.wait_ready(Duration::from_secs(20));
    let mut lifecycle = client(&agent).await;
    let after = activity_until(&mut lifecycle, "idle again", Duration::from_secs(30), |a| {
        a.idle && !a.sources.is_empty()
    })
    .await;
    let after_since = after.idle_since.unwrap();
    assert_eq!(after_since.seconds, since.seconds, "the idle clock went on");
    assert_eq!(after_since.nanos / 1_000_000, since.nanos / 1_000_000);
    let kept = after.postponement.expect("the postponement is kept");
    assert_eq!(kept.reason, "demo at 3");
    assert_eq!(
        kept.until.map(|t| t.seconds),
        postponement.until.map(|t| t.seconds)
    );
    // Out of range: the field and the limit are named.
    let refused = lifecycle
        .set_idle_shutdown(proto::SetIdleShutdownRequest {
            policy: Some(proto::IdleShutdownPolicy {
                enabled: true,
                idle_timeout_seconds: 5,
                warn_before_seconds: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("idle_timeout_seconds"),
        "{refused:?}"
    );
    let status = cli(&agent.socket, &["idle", "status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("idle shutdown: on, after 1h"), "{text}");
    assert!(text.contains("demo at 3"), "{text}");
}

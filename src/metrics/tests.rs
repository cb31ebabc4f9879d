//! Unit tests of the event-fed, RPC and scrape-time series, read back
//! through the text format.

use std::time::{Duration, SystemTime};

use super::Metrics;
use crate::disk::reclaim::{ReclaimFinished, ReclaimTrigger};
use crate::events::EventPayload;
use crate::jobs::{JobRecord, JobState};
use crate::mounts::MountState;

fn job(state: JobState, ran_seconds: u64) -> JobRecord {
    let spec: crate::jobs::JobSpec = serde_json::from_value(serde_json::json!({
        "id": "j1", "image": "busybox", "command": ["true"]
    }))
    .expect("spec");
    let mut record = JobRecord::queued(spec, 1);
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    record.state = state;
    record.running_at = Some(start);
    record.finished_at = Some(start + Duration::from_secs(ran_seconds));
    record
}

#[test]
fn encodes_event_fed_and_rpc_series() {
    let metrics = Metrics::new(None);
    metrics.observe(&EventPayload::Job(Box::new(job(JobState::Succeeded, 2))));
    metrics.observe(&EventPayload::Job(Box::new(job(JobState::Failed, 500))));
    metrics.observe(&EventPayload::Job(Box::new(job(JobState::Running, 0))));
    metrics.observe_rpc(
        "/instance_agent.v1.AgentService/GetStatus",
        "0",
        Duration::from_millis(1),
    );
    metrics.observe_rpc("/x.Y/Z", "12", Duration::from_millis(1));
    let text = metrics.render();
    assert!(
        text.contains("instance_agent_jobs_finished_total{state=\"succeeded\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("instance_agent_jobs_finished_total{state=\"failed\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("instance_agent_job_duration_seconds_count 2\n"),
        "{text}"
    );
    assert!(
        text.contains("instance_agent_job_duration_seconds_sum 502.0\n"),
        "{text}"
    );
    assert!(text.contains(
        "instance_agent_rpcs_total{method=\"/instance_agent.v1.AgentService/GetStatus\",code=\"0\"} 1\n"
    ), "{text}");
    assert!(
        text.contains("instance_agent_rpcs_total{method=\"unknown\",code=\"12\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("# TYPE instance_agent_rpc_duration_seconds histogram"));
    assert!(text.contains("# TYPE instance_agent_resident_memory_bytes gauge"));
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn mount_state_is_one_hot_and_remounts_count_once_per_repair() {
    let metrics = Metrics::new(None);
    let status = |name: &str, state| crate::mounts::MountStatus {
        name: name.into(),
        mount_path: "/mnt/data".into(),
        account: "acct".into(),
        container: "c".into(),
        auth_mode: "key",
        state,
        message: String::new(),
        remount_count: 0,
        last_checked: None,
        read_only: false,
        cache_dir: "/tmp/c".into(),
        cache_max_bytes: 0,
        pid: None,
        origin: crate::mounts::Origin::Api,
        owner: crate::mounts::spec::Owner::ROOT,
    };
    for state in [
        MountState::Mounted,
        MountState::Remounting,
        MountState::Remounting,
        MountState::Mounted,
    ] {
        metrics.observe(&EventPayload::Mount(status("data", state)));
    }
    metrics.set_mount_states(&[
        status("data", MountState::Mounted),
        status("gone", MountState::Stale),
    ]);
    let text = metrics.render();
    assert!(
        text.contains("instance_agent_mount_remounts_total{mount=\"data\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("instance_agent_mount_state{mount=\"data\",state=\"mounted\"} 1\n"));
    assert!(text.contains("instance_agent_mount_state{mount=\"data\",state=\"stale\"} 0\n"));
    assert!(text.contains("instance_agent_mount_state{mount=\"gone\",state=\"stale\"} 1\n"));
    // A mount no longer managed (unmounted) leaves no series behind.
    metrics.set_mount_states(&[status("data", MountState::Mounted)]);
    let text = metrics.render();
    assert!(!text.contains("mount=\"gone\""), "{text}");
}

#[test]
fn reclaimed_bytes_count_by_step_and_runs_by_trigger() {
    use crate::disk::reclaim::{Freed, ReclaimReport, StepReport};
    let step = |name, bytes, ran, error: Option<&str>| StepReport {
        name,
        freed: Freed { bytes, items: 1 },
        ran,
        skipped: (!ran).then(|| "enough space is free".to_owned()),
        error: error.map(str::to_owned),
    };
    let finished = |trigger, dry_run, steps: Vec<StepReport>| {
        EventPayload::Reclaim(Box::new(ReclaimFinished {
            trigger,
            targets: vec!["/mnt".into()],
            report: ReclaimReport {
                dry_run,
                total_bytes: steps.iter().map(|s| s.freed.bytes).sum(),
                steps,
            },
        }))
    };
    let metrics = Metrics::new(None);
    let before = metrics.render();
    assert!(
        before.contains("instance_agent_disk_reclaims_total{trigger=\"automatic\"} 0\n"),
        "{before}"
    );
    metrics.observe(&finished(
        ReclaimTrigger::Automatic,
        false,
        vec![
            step("exited_containers", 700, true, None),
            // Freed part before failing: still freed.
            step(
                "dangling_images",
                50,
                true,
                Some("1 item(s) could not be removed"),
            ),
            step("expired_job_logs", 0, false, None),
        ],
    ));
    metrics.observe(&finished(
        ReclaimTrigger::Api,
        false,
        vec![step("exited_containers", 300, true, None)],
    ));
    // A dry run deleted nothing.
    metrics.observe(&finished(
        ReclaimTrigger::Api,
        true,
        vec![step("exited_containers", 1_000_000, true, None)],
    ));
    let text = metrics.render();
    for line in [
        "instance_agent_disk_reclaimed_bytes_total{step=\"exited_containers\"} 1000\n",
        "instance_agent_disk_reclaimed_bytes_total{step=\"dangling_images\"} 50\n",
        "instance_agent_disk_reclaims_total{trigger=\"automatic\"} 1\n",
        "instance_agent_disk_reclaims_total{trigger=\"api\"} 1\n",
        "# TYPE instance_agent_disk_reclaimed_bytes counter\n",
    ] {
        assert!(text.contains(line), "{line}{text}");
    }
    assert!(
        !text.contains("step=\"expired_job_logs\""),
        "a skipped step adds no series without sources: {text}"
    );
}

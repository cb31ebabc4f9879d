//! The Docker engine stopped and started again while jobs are queued and
//! running. In its own test binary (cargo runs test binaries one at a time)
//! because it takes the engine away from every other test.

mod common;

use std::time::{Duration, Instant};

use common::engine::{EngineGuard, start_engine, stop_engine};
use common::{Agent, marked_job as marked};
use instance_agent::api::proto::{
    self, agent_service_client::AgentServiceClient, job_service_client::JobServiceClient,
};

#[tokio::test]
async fn engine_restart_while_jobs_are_queued_and_running() {
    let _guard = EngineGuard;
    let markers = tempfile::tempdir().unwrap();
    let config = format!(
        "[docker]\ncheck_interval_seconds = 1\n[jobs]\nslots = 2\nkill_grace_seconds = 1\nallowed_host_roots = [{:?}]\n",
        markers.path().display().to_string()
    );
    let agent = Agent::builder().config(&config).start();
    let mut jobs = JobServiceClient::new(agent.channel().await);
    let ids: Vec<String> = (0..6).map(|i| format!("eng-{i}")).collect();
    for id in &ids {
        jobs.submit_job(proto::SubmitJobRequest {
            spec: Some(marked(id, "5", markers.path())),
        })
        .await
        .unwrap();
    }
    // Two running, four queued.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running = jobs
            .list_jobs(proto::ListJobsRequest {
                states: vec![proto::JobState::Running as i32],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .jobs
            .len();
        if running == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "two jobs never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    tokio::task::spawn_blocking(stop_engine).await.unwrap();
    // The agent keeps answering, and says the engine is gone.
    let mut agent_api = AgentServiceClient::new(agent.channel().await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = tokio::time::timeout(
            Duration::from_secs(2),
            agent_api.get_status(proto::GetStatusRequest {}),
        )
        .await
        .expect("GetStatus answers while the engine is down")
        .unwrap()
        .into_inner();
        let docker = status
            .conditions
            .iter()
            .find(|c| c.r#type == "docker")
            .unwrap();
        if docker.state() == proto::ConditionState::Failed {
            assert!(docker.message.contains("unreachable"), "{docker:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "docker condition never turned failed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::task::spawn_blocking(start_engine).await.unwrap();

    // Every job reaches exactly one final state and ran at most once; the
    // ones that were only queued run after the engine is back.
    let mut succeeded = 0;
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(180);
        let job = loop {
            let job = jobs
                .get_job(proto::GetJobRequest { id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            if matches!(
                job.state(),
                proto::JobState::Succeeded | proto::JobState::Failed
            ) {
                break job;
            }
            assert!(
                Instant::now() < deadline,
                "{id} never finished: {job:?}\n{}",
                agent.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let runs = std::fs::read_to_string(markers.path().join(id))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        assert_eq!(runs, 1, "{id} ran once: {job:?}");
        if job.state() == proto::JobState::Succeeded {
            succeeded += 1;
        }
    }
    assert!(
        succeeded >= 4,
        "the queued jobs ran after the engine came back ({succeeded} succeeded)"
    );
}

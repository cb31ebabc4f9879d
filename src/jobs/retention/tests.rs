//! Retention against the fake engine, with paused time: by count and by
//! age, records and logs alike.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::jobs::JobError;
use crate::jobs::fake::FakeEngine;
use crate::jobs::harness::{Harness, config, spec};
use crate::jobs::manager::RECORDS;
use crate::jobs::record::{JobRecord, JobState};
use crate::store::Write;
use crate::testing::Rig;

#[tokio::test(start_paused = true)]
async fn retention_removes_old_finished_jobs_and_their_logs() {
    let h = Harness::new(4);
    let mut c = config(4);
    c.retention_count = 1;
    c.keep_containers = true;
    h.config.send_replace(c);
    let mut containers = Vec::new();
    for id in ["old", "new"] {
        h.submit(id).await;
        h.wait_for("running", |h| h.state(id) == JobState::Running)
            .await;
        assert!(!h.manager.is_finished(id));
        let container = h.container_of(id);
        h.engine.exit(&container, 0, false);
        h.wait_for("done", |h| h.state(id) == JobState::Succeeded)
            .await;
        containers.push(container);
    }
    let logs = h.rig.subdir("logs");
    std::fs::write(logs.join("old.0.log"), b"x").unwrap();
    h.manager.sweep().await;
    assert!(matches!(h.manager.get("old"), Err(JobError::NotFound(_))));
    assert!(h.manager.get("new").is_ok());
    // A pruned job's kept container goes with its record: a container
    // without a record would be one of unknown origin, which no automatic
    // step removes (an unknown id is not finished).
    assert_eq!(h.engine.existing(), [containers[1].clone()]);
    assert!(!h.manager.is_finished("old"));
    assert!(h.manager.is_finished("new"));
    assert!(!logs.join("old.0.log").exists());
    assert!(h.stored_if_any("old").is_none());
}

#[tokio::test(start_paused = true)]
async fn retention_removes_jobs_past_their_age() {
    let rig = Rig::new();
    let now = SystemTime::now();
    let mut writes = Vec::new();
    for (i, (id, age)) in [("old", 7200), ("recent", 60)].into_iter().enumerate() {
        let mut r = JobRecord::queued(spec(id), i as u64);
        r.state = JobState::Succeeded;
        r.finished_at = Some(now - Duration::from_secs(age));
        writes.push(Write::put(RECORDS, id, &r));
    }
    rig.store.apply(writes).await.unwrap();
    let logs = rig.subdir("logs");
    std::fs::write(logs.join("old.0.log"), b"x").unwrap();
    std::fs::write(logs.join("recent.0.log"), b"x").unwrap();
    let mut c = config(2);
    c.retention_seconds = 3600;
    let h = Harness::on(rig, Arc::new(FakeEngine::new()), c);
    // The sweeper runs by itself, at start; it removes the log last.
    h.wait_quietly_for("old removed", |_| !logs.join("old.0.log").exists())
        .await;
    assert!(h.manager.get("old").is_err());
    assert!(h.manager.get("recent").is_ok());
    assert!(h.stored_if_any("old").is_none());
    assert!(logs.join("recent.0.log").exists());
    // An hour of test time later the recent one is still young enough by
    // its recorded time: ages are wall-clock times, not the runtime's clock.
    tokio::time::advance(Duration::from_secs(3600)).await;
    h.manager.sweep().await;
    assert!(h.manager.get("recent").is_ok());
    assert!(logs.join("recent.0.log").exists());
}

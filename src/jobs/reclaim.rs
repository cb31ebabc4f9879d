//! The disk guard's "expired_job_logs" step: under disk pressure, the logs of
//! jobs that finished more than `jobs.log_retention_seconds` ago are deleted
//! (their records stay until `jobs.retention_seconds`). Never the logs of a
//! job that has not finished.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

use super::JobManager;
use crate::disk::reclaim::{Freed, ReclaimError, ReclaimStep};

/// Deletes expired job logs.
pub struct ExpiredJobLogs {
    jobs: JobManager,
    logs_dir: PathBuf,
}

impl ExpiredJobLogs {
    /// The step for `jobs`, whose logs live in `logs_dir`.
    pub fn new(jobs: JobManager, logs_dir: PathBuf) -> Self {
        Self { jobs, logs_dir }
    }

    fn age(&self) -> Duration {
        Duration::from_secs(self.jobs.log_retention_seconds())
    }
}

#[async_trait]
impl ReclaimStep for ExpiredJobLogs {
    fn name(&self) -> &'static str {
        "expired_job_logs"
    }

    async fn estimate(&self) -> Result<Freed, ReclaimError> {
        let (bytes, items) = self.jobs.reclaim_logs(self.age(), true).await;
        Ok(Freed { bytes, items })
    }

    async fn run(&self) -> Result<Freed, ReclaimError> {
        let (bytes, items) = self.jobs.reclaim_logs(self.age(), false).await;
        Ok(Freed { bytes, items })
    }

    async fn location(&self) -> Option<PathBuf> {
        Some(self.logs_dir.clone())
    }
}

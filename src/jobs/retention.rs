//! Retention: finished jobs are forgotten (record and log) once they are
//! older than `jobs.retention_seconds` or beyond the newest
//! `jobs.retention_count`; under disk pressure the disk guard's reclaim step
//! also removes the logs of jobs finished longer ago than
//! `jobs.log_retention_seconds` (see `reclaim.rs`).
//!
//! Ages are wall-clock times (a record's `finished_at`), so they hold across
//! agent restarts. Only final jobs are touched: a job that has not ended is
//! always kept. A container kept by `jobs.keep_containers` goes with its
//! record: a container without a record is one of unknown origin, which
//! only an explicit step removes (`unknown.rs`).

use std::time::{Duration, SystemTime};

use super::manager::{JobManager, RECORDS};
use crate::store::Write;

/// How often the sweeper looks for expired jobs.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

impl JobManager {
    /// Under disk pressure, logs of jobs finished longer ago than this go.
    pub fn log_retention_seconds(&self) -> u64 {
        self.inner.config.borrow().log_retention_seconds
    }

    /// Sweeps at start, then every [`SWEEP_EVERY`], until shutdown; while
    /// there are containers of unknown origin, lists them again too.
    pub(super) async fn retention_loop(self) {
        loop {
            self.sweep().await;
            if !self.inner.unknown.borrow().is_empty()
                && let Err(error) = self.refresh_unknown().await
            {
                tracing::debug!(%error, "cannot list the containers of unknown origin");
            }
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
            }
        }
    }

    /// Removes finished jobs past the retention age or count, with their logs.
    pub async fn sweep(&self) {
        let config = self.jobs_config();
        let cutoff = SystemTime::now()
            .checked_sub(Duration::from_secs(config.retention_seconds))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let expired: Vec<(String, String)> = {
            let mut state = self.lock();
            let mut finished: Vec<(SystemTime, String)> = state
                .jobs
                .values()
                .filter(|r| r.state.is_final())
                .map(|r| (r.finished_at.unwrap_or(r.queued_at), r.id().to_owned()))
                .collect();
            finished.sort();
            let excess = finished
                .len()
                .saturating_sub(config.retention_count as usize);
            let ids: Vec<String> = finished
                .into_iter()
                .enumerate()
                .filter(|(i, (t, _))| *i < excess || *t < cutoff)
                .map(|(_, (_, id))| id)
                .collect();
            ids.into_iter()
                .filter_map(|id| state.jobs.remove(&id).map(|r| (id, r.container_id)))
                .collect()
        };
        if expired.is_empty() {
            return;
        }
        if config.keep_containers {
            for (id, container) in expired.iter().filter(|(_, c)| !c.is_empty()) {
                if let Err(error) = self.inner.engine.remove(container).await {
                    tracing::warn!(job = %id, %container, %error, "cannot remove the kept container of an expired job");
                }
            }
        }
        let writes = expired
            .iter()
            .map(|(id, _)| Write::Delete(RECORDS, id.clone()))
            .collect();
        if let Err(error) = self.inner.store.apply(writes).await {
            tracing::warn!(%error, "cannot remove expired job records");
        }
        for (id, _) in &expired {
            self.inner.logs.remove(id).await;
        }
        tracing::info!(
            removed = expired.len(),
            "removed finished jobs past retention"
        );
    }

    /// Bytes of logs of jobs that finished before `cutoff`, and removes them
    /// unless `dry_run` (for the disk guard's reclaim step).
    pub async fn reclaim_logs(&self, older_than: Duration, dry_run: bool) -> (u64, u32) {
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let ids: Vec<String> = self
            .lock()
            .jobs
            .values()
            .filter(|r| r.state.is_final() && r.finished_at.is_some_and(|t| t < cutoff))
            .map(|r| r.id().to_owned())
            .collect();
        let (mut bytes, mut items) = (0, 0);
        for id in ids {
            let size = self.inner.logs.size(&id).await;
            if size == 0 {
                continue;
            }
            bytes += size;
            items += 1;
            if !dry_run {
                self.inner.logs.remove(&id).await;
            }
        }
        (bytes, items)
    }
}

#[cfg(test)]
mod tests;

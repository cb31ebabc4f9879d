//! Output capture: copies a job container's output into the job's log
//! ([`super::logs`]) while it runs, resuming after the last frame already
//! in the log after an agent restart or an engine outage, so that nothing
//! is lost or written twice.
//!
//! Runs as its own task beside the job's supervision; the job's final
//! state waits (bounded) for it to drain, so that a finished job's log is
//! complete.

use std::time::Duration;

use tokio_stream::StreamExt;

use super::engine::EngineError;
use super::manager::{JobManager, MAX_BACKOFF};

impl JobManager {
    /// Copies the container's output into the job's log until the container
    /// exits, resuming where the log ends after an agent restart or an
    /// engine outage.
    pub(super) async fn capture(self, id: String, container: String) {
        let cap = self.jobs_config().log_max_bytes;
        let (mut writer, mut last) = match self.inner.logs.writer(&id, cap).await {
            Ok(w) => w,
            Err(error) => {
                tracing::error!(job = %id, %error, "cannot open the job's log; output is not captured");
                return;
            }
        };
        let mut backoff = Duration::from_millis(200);
        // Followed while the container runs; once it has exited, one last
        // unfollowed read picks up what a follow stream may have missed (the
        // engine can end a follow early when a container exits quickly).
        let mut follow = true;
        loop {
            let mut stream = match self.inner.engine.output(&container, last, follow).await {
                Ok(stream) => stream,
                Err(EngineError::NotFound { .. }) => break,
                Err(_) => {
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let mut failed = false;
            loop {
                let item = tokio::select! {
                    _ = self.inner.shutdown.cancelled() => None,
                    item = stream.next() => item,
                };
                match item {
                    Some(Ok(frame)) => {
                        if let Err(error) = writer
                            .write(frame.stream, frame.time_nanos, &frame.data)
                            .await
                        {
                            tracing::warn!(job = %id, %error, "cannot write the job's log");
                        }
                        last = last.max(frame.time_nanos);
                    }
                    Some(Err(EngineError::NotFound { .. })) | None => break,
                    Some(Err(_)) => {
                        failed = true;
                        break;
                    }
                }
            }
            if let Err(error) = writer.flush().await {
                tracing::warn!(job = %id, %error, "cannot write the job's log");
            }
            if self.inner.shutdown.is_cancelled() {
                break;
            }
            if !failed {
                if !follow {
                    break;
                }
                // A follow stream also ends when the engine rotates its log
                // file; only a container that no longer runs has no more output.
                match self.inner.engine.inspect(&container).await {
                    Ok(Some(status)) if status.running => continue,
                    Ok(Some(_)) => {
                        follow = false;
                        continue;
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        if let Err(error) = writer.flush().await {
            tracing::warn!(job = %id, %error, "cannot write the job's log");
        }
    }
}

//! Keeps the docker condition true to the engine: checks it every
//! `docker.check_interval_seconds` while it answers, and with exponential
//! backoff (1 s doubling up to the interval) while it does not, so that a
//! restarted engine is noticed within seconds.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::engine::ContainerEngine;
use crate::health::{ConditionState, Health, Subsystem};

/// Runs until `cancel` fires. `interval` follows live config changes; `up`
/// tells the job manager whether the engine answers.
pub async fn run(
    engine: Arc<dyn ContainerEngine>,
    health: Health,
    up: watch::Sender<bool>,
    mut interval: watch::Receiver<Duration>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let every = *interval.borrow_and_update();
        let wait = match engine.version().await {
            Ok(v) => {
                if health.set(
                    Subsystem::Docker,
                    ConditionState::Ok,
                    format!("engine {} reachable (API {})", v.version, v.api_version),
                ) {
                    tracing::info!(version = %v.version, api = %v.api_version, "docker engine reachable");
                }
                backoff = Duration::from_secs(1);
                up.send_if_modified(|u| !std::mem::replace(u, true));
                every
            }
            Err(error) => {
                if health.set(Subsystem::Docker, ConditionState::Failed, error.to_string()) {
                    tracing::warn!(%error, "docker engine unreachable; retrying with backoff");
                }
                up.send_if_modified(|u| std::mem::replace(u, false));
                let wait = backoff.min(every);
                backoff = (backoff * 2).min(every);
                wait
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            Ok(()) = interval.changed() => {}
        }
    }
}

//! Keeps the docker condition true to the engine: checks it every
//! `docker.check_interval_seconds` while it answers, and with exponential
//! backoff (1 s doubling up to the interval) while it does not, so that a
//! restarted engine is noticed within seconds. A check that gets no answer
//! within [`CHECK_TIMEOUT`] (a frozen or wedged engine: its socket accepts,
//! nothing answers) counts as a failure too, rather than waiting out the
//! much longer request timeout of ordinary calls.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::engine::ContainerEngine;
use crate::health::{ConditionState, Health, Subsystem};

/// An engine answers a version request in milliseconds; one that has not
/// answered after this long is not able to run jobs now.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

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
        let answer = match tokio::time::timeout(CHECK_TIMEOUT, engine.version()).await {
            Ok(answer) => answer.map_err(|error| error.to_string()),
            Err(_) => Err(format!(
                "docker engine did not answer within {} s: hung or overloaded",
                CHECK_TIMEOUT.as_secs()
            )),
        };
        let wait = match answer {
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
                if health.set(Subsystem::Docker, ConditionState::Failed, error.clone()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::fake::FakeEngine;

    fn docker_condition(health: &Health) -> (ConditionState, String) {
        let c = health.get(Subsystem::Docker);
        (c.state, c.message)
    }

    #[tokio::test(start_paused = true)]
    async fn a_frozen_engine_fails_the_condition_after_the_check_timeout() {
        let engine = Arc::new(FakeEngine::new());
        let health = Health::new();
        let (up_tx, up) = watch::channel(false);
        let (_interval_tx, interval) = watch::channel(Duration::from_secs(1));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            engine.clone(),
            health.clone(),
            up_tx,
            interval,
            cancel.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(docker_condition(&health).0, ConditionState::Ok);
        assert!(*up.borrow());

        engine.set_hung(true);
        // The next check starts within the interval and gives up after the
        // check timeout, long before the request timeout of other calls.
        tokio::time::sleep(Duration::from_secs(1) + CHECK_TIMEOUT + Duration::from_millis(100))
            .await;
        let (state, message) = docker_condition(&health);
        assert_eq!(state, ConditionState::Failed);
        assert!(message.contains("did not answer within 5 s"), "{message}");
        assert!(!*up.borrow());

        engine.set_hung(false);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(docker_condition(&health).0, ConditionState::Ok);
        assert!(*up.borrow());
        cancel.cancel();
        task.await.expect("monitor ends");
    }
}

//! systemd's watchdog, pinged only while the agent proves it still makes
//! progress: before each ping, a no-op must get through the blocking pool
//! and a store write must come back (and be read back), within the ping
//! interval. An agent whose blocking threads are all stuck, or whose store
//! no longer answers, stops pinging, and systemd restarts it (`WatchdogSec=`
//! in the unit). A store that answers with an error (a full disk) is
//! progress: a restart would not help it.

use std::future::Future;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::store::{Store, Table, Write};

/// The one record the watchdog rewrites at each round trip.
const WATCHDOG: Table = Table("agent.watchdog");

/// Pings with `ping` every `interval` while `prove` completes within the
/// interval, until `cancel`.
pub(super) async fn run<F, Fut>(
    interval: Duration,
    mut prove: F,
    mut ping: impl FnMut(),
    cancel: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let proof = tokio::select! {
            _ = cancel.cancelled() => return,
            proof = tokio::time::timeout(interval, prove()) => proof,
        };
        match proof {
            Ok(Ok(())) => ping(),
            Ok(Err(problem)) => {
                tracing::error!(%problem, "watchdog: the agent's progress check failed; not pinging systemd's watchdog");
            }
            Err(_) => tracing::error!(
                bound_seconds = interval.as_secs(),
                "watchdog: the blocking pool or the store did not answer in time; not pinging systemd's watchdog (it restarts a stuck agent)"
            ),
        }
    }
}

/// The agent's proof of progress: a no-op through the blocking pool, then a
/// store round trip.
pub(super) async fn progress(store: Store) -> Result<(), String> {
    tokio::task::spawn_blocking(|| ())
        .await
        .map_err(|e| format!("the blocking pool: {e}"))?;
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Err(error) = store
        .apply(vec![Write::put(WATCHDOG, "last", &stamp)])
        .await
    {
        tracing::warn!(%error, "watchdog: the store refused its write (it answered, so the agent is not stuck)");
        return Ok(());
    }
    store
        .get::<u64>(WATCHDOG, "last")
        .map(drop)
        .map_err(|e| format!("the store: {e}"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pings_only_while_progress_is_proven() {
        let stuck = Arc::new(AtomicBool::new(false));
        let pings = Arc::new(AtomicU32::new(0));
        let cancel = CancellationToken::new();
        let task = {
            let (stuck, pings) = (stuck.clone(), pings.clone());
            tokio::spawn(run(
                Duration::from_secs(15),
                move || {
                    let stuck = stuck.load(Ordering::SeqCst);
                    async move {
                        if stuck {
                            std::future::pending::<()>().await;
                        }
                        Ok(())
                    }
                },
                move || {
                    pings.fetch_add(1, Ordering::SeqCst);
                },
                cancel.clone(),
            ))
        };
        tokio::time::sleep(Duration::from_secs(50)).await;
        let before = pings.load(Ordering::SeqCst);
        assert_eq!(before, 4, "at 0, 15, 30 and 45 s");
        stuck.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(120)).await;
        // At most the check already under way when it got stuck.
        assert!(pings.load(Ordering::SeqCst) <= before + 1);
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_store_round_trip_is_progress() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(progress(store.clone()).await, Ok(()));
        assert!(store.get::<u64>(WATCHDOG, "last").unwrap().is_some());
    }
}

//! Whose turn it is to run reclaim steps that delete: one reclaim at a time
//! (two at once would race each other over the same containers, logs and
//! caches), and the automatic reclaim first. An automatic reclaim that asks
//! goes ahead of every requested one waiting, and a requested one that
//! runs gives its turn up at its next step ([`Turns::automatic_waiting`]),
//! so the automatic reclaim never waits for more than the one step in
//! progress. Dry runs delete nothing and take no turn.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct State {
    taken: bool,
    automatic_waiting: usize,
}

/// The turns of the reclaims that delete.
#[derive(Debug, Default)]
pub struct Turns {
    state: Mutex<State>,
    changed: Notify,
}

/// A reclaim's turn; the next one may go once it is dropped.
#[derive(Debug)]
pub struct Turn<'a> {
    turns: &'a Turns,
}

/// Counts an automatic reclaim as waiting while it is alive (also when its
/// wait is cancelled).
struct Waiting<'a>(&'a Turns);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().automatic_waiting -= 1;
        self.0.changed.notify_waiters();
    }
}

impl Turns {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Two plain fields, each changed in one statement.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the turn; `automatic` goes ahead of requested reclaims.
    pub async fn take(&self, automatic: bool) -> Turn<'_> {
        let _waiting = automatic.then(|| {
            self.lock().automatic_waiting += 1;
            Waiting(self)
        });
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the look, so that no release is missed.
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if !state.taken && (automatic || state.automatic_waiting == 0) {
                    state.taken = true;
                    return Turn { turns: self };
                }
            }
            notified.await;
        }
    }

    /// Whether an automatic reclaim waits for the turn: a requested one that
    /// runs gives it up at its next step.
    pub fn automatic_waiting(&self) -> bool {
        self.lock().automatic_waiting > 0
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.turns.lock().taken = false;
        self.turns.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_automatic_reclaim_goes_ahead_of_requested_ones() {
        let turns = Arc::new(Turns::default());
        let first = turns.take(false).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for (name, automatic) in [("api 1", false), ("api 2", false), ("automatic", true)] {
            let (turns, order) = (turns.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let _turn = turns.take(automatic).await;
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(turns.automatic_waiting());
        drop(first);
        for task in waiting {
            task.await.unwrap();
        }
        assert_eq!(order.lock().unwrap()[0], "automatic");
        assert!(!turns.automatic_waiting());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_automatic_wait_lets_the_others_go() {
        let turns = Turns::default();
        let held = turns.take(false).await;
        let gave_up = tokio::time::timeout(Duration::from_secs(1), turns.take(true)).await;
        assert!(gave_up.is_err());
        assert!(!turns.automatic_waiting());
        drop(held);
        let _next = turns.take(false).await;
    }
}

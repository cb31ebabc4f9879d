//! Adoption after an agent start: once the engine answers, the records are
//! matched with the containers carrying this instance's app label. A
//! running container of the current generation is adopted (never started
//! twice); an exited one is handled by the restart policy; a container that
//! vanished while the agent was down is not resurrected (the app ends
//! STOPPED, saying so); containers of older generations (a rolling replace
//! cut short) or of unknown apps (removed) are removed.

use std::collections::HashMap;
use std::time::Duration;

use super::manager::AppManager;
use super::{LABEL_APP, LABEL_APP_GENERATION, LABEL_APP_INSTANCE};
use crate::jobs::engine::EngineError;

/// The current container of an app, as the engine lists it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Found {
    /// Container id.
    pub(super) id: String,
    /// The engine's state ("running", "exited", "created", ...).
    pub(super) state: String,
}

/// Longest wait between attempts while the engine does not answer.
const MAX_RETRY: Duration = Duration::from_secs(10);

impl AppManager {
    /// Waits for the engine, reconciles once, then starts every app's
    /// supervisor.
    pub(super) async fn reconcile_when_engine_answers(self) {
        let mut engine_up = self.inner.deps.engine_up.clone();
        let mut retry = Duration::from_secs(1);
        loop {
            if *engine_up.borrow_and_update() {
                match self.reconcile().await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::warn!(%error, "cannot reconcile apps with the engine yet")
                    }
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                Ok(()) = engine_up.changed() => {}
                _ = tokio::time::sleep(retry) => {}
            }
        }
    }

    async fn reconcile(&self) -> Result<(), EngineError> {
        let engine = &self.inner.deps.engine;
        let listed = engine
            .list(LABEL_APP_INSTANCE, &self.inner.deps.instance_id)
            .await?;
        let mut by_app: HashMap<(String, String), Found> = HashMap::new();
        let mut leftovers = Vec::new();
        for container in listed {
            match (
                container.labels.get(LABEL_APP),
                container.labels.get(LABEL_APP_GENERATION),
            ) {
                (Some(app), Some(generation)) => {
                    by_app.insert(
                        (app.clone(), generation.clone()),
                        Found {
                            id: container.id,
                            state: container.state,
                        },
                    );
                }
                _ => leftovers.push(container.id),
            }
        }
        let handles: Vec<_> = self.apps().values().cloned().collect();
        let mut adopted = Vec::new();
        for handle in &handles {
            let (name, generation) = {
                let record = handle.record.borrow();
                (record.name().to_owned(), record.generation.to_string())
            };
            let found = by_app.remove(&(name, generation));
            adopted.push((handle.clone(), found));
        }
        // Older generations and apps that no longer exist.
        leftovers.extend(by_app.into_values().map(|f| f.id));
        for container in leftovers {
            if let Err(error) = engine.remove(&container).await {
                tracing::warn!(%container, %error, "cannot remove a leftover app container");
            }
        }
        let count = adopted.iter().filter(|(_, f)| f.is_some()).count();
        for (handle, found) in adopted {
            self.spawn_supervisor(&handle, found);
        }
        self.inner.reconciled.send_replace(true);
        // Deployed while this ran: not in the snapshot above (a supervisor
        // starts once, so the others are untouched).
        let late: Vec<_> = self.apps().values().cloned().collect();
        for handle in late {
            self.spawn_supervisor(&handle, None);
        }
        if count > 0 {
            tracing::info!(adopted = count, "reconciled apps with the engine");
        }
        Ok(())
    }
}

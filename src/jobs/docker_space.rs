//! [`DockerSpace`], the disk guard's view of the engine, implemented on
//! [`DockerEngine`] through bollard: where the engine keeps its data, this
//! instance's exited containers, and removing them. It sits
//! next to the engine (the trait is the disk guard's, in `disk::docker`), so
//! that the disk guard never reaches bollard.

use std::collections::HashMap;
use std::path::PathBuf;

use async_trait::async_trait;

use super::engine::{DockerEngine, EngineError};
use super::{LABEL_INSTANCE, LABEL_JOB};
use crate::disk::docker::{DockerSpace, ExitedContainer};

/// Runs one engine call with the engine's deadline, mapping errors.
async fn call<T>(
    engine: &DockerEngine,
    operation: &'static str,
    timeout: std::time::Duration,
    future: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(engine.map_error(operation, "", e).await),
        Err(_) => Err(EngineError::Api {
            operation,
            message: format!("no answer within {timeout:?}"),
        }),
    }
}

/// Deadline for engine calls made by the disk guard. Pruning images can
/// take a while on a large image store.
const ENGINE_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Deadline for asking the engine where its data lives: a quick call, and
/// each reclaim step asks it, so a hung engine must not hold the steps that
/// do not need it (logs, mount caches) for minutes.
const ENGINE_INFO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[async_trait]
impl DockerSpace for DockerEngine {
    async fn data_root(&self) -> Result<PathBuf, EngineError> {
        let client = self.client().await?;
        let info = call(self, "info", ENGINE_INFO_TIMEOUT, client.info()).await?;
        info.docker_root_dir
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .ok_or(EngineError::Api {
                operation: "info",
                message: "the engine did not report DockerRootDir".into(),
            })
    }

    async fn exited_containers(
        &self,
        instance_id: &str,
    ) -> Result<Vec<ExitedContainer>, EngineError> {
        use bollard::query_parameters::ListContainersOptionsBuilder;
        let client = self.client().await?;
        let filters: HashMap<&str, Vec<String>> = HashMap::from([
            ("label", vec![format!("{LABEL_INSTANCE}={instance_id}")]),
            ("status", vec!["exited".to_owned(), "dead".to_owned()]),
        ]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .size(true)
            .filters(&filters)
            .build();
        let list = call(
            self,
            "list containers",
            ENGINE_CALL_TIMEOUT,
            client.list_containers(Some(options)),
        )
        .await?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                Some(ExitedContainer {
                    job_id: c
                        .labels
                        .as_ref()
                        .and_then(|labels| labels.get(LABEL_JOB).cloned()),
                    size_bytes: c.size_rw.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    id: c.id?,
                })
            })
            .collect())
    }

    async fn remove_container(&self, id: &str) -> Result<(), EngineError> {
        use bollard::query_parameters::RemoveContainerOptions;
        let client = self.client().await?;
        call(
            self,
            "remove container",
            ENGINE_CALL_TIMEOUT,
            client.remove_container(id, Some(RemoveContainerOptions::default())),
        )
        .await
    }
}

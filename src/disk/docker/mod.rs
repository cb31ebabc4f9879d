//! The disk guard's narrow interface to the container engine
//! ([`DockerSpace`]: where the engine keeps its data, the agent's exited
//! containers) and the reclaim step built on it ([`steps`]:
//! "exited_containers"). The real
//! implementation sits next to the engine, in `jobs::docker_space`; a fake in
//! `disk::fake`.

pub mod steps;

use std::path::PathBuf;

use async_trait::async_trait;

use crate::jobs::engine::EngineError;

pub use steps::{ExitedContainers, JobFinished};

/// An exited container of this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitedContainer {
    /// Container id.
    pub id: String,
    /// The job it ran (its `io.instance-agent.job` label), if labelled.
    pub job_id: Option<String>,
    /// Bytes in its writable layer (freed by removing it).
    pub size_bytes: u64,
}

/// What the disk guard needs from the engine.
#[async_trait]
pub trait DockerSpace: Send + Sync + 'static {
    /// Where the engine keeps images and containers (`docker info`'s DockerRootDir).
    async fn data_root(&self) -> Result<PathBuf, EngineError>;
    /// Exited (or dead) containers labelled with `instance_id`.
    async fn exited_containers(
        &self,
        instance_id: &str,
    ) -> Result<Vec<ExitedContainer>, EngineError>;
    /// Removes one container (not its named volumes).
    async fn remove_container(&self, id: &str) -> Result<(), EngineError>;
}

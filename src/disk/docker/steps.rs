//! The reclaim step on the engine: "exited_containers". (The image steps,
//! "dangling_images" and "unused_images", live in `images::reclaim`: they
//! remove only images the agent pulled, never every untagged image on the
//! host.)
//!
//! Only containers labelled with this instance's id whose job has finished
//! are removed; containers without a job label, and every other container,
//! are never touched.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use super::{DockerSpace, ExitedContainer};
use crate::disk::reclaim::{Freed, ReclaimError, ReclaimStep, Removals};

/// Is the job with this id finished (so its container may go)? Supplied by
/// the job queue.
pub type JobFinished = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Reclaim step "exited_containers": removes this instance's exited
/// containers whose job has finished.
pub struct ExitedContainers {
    docker: Arc<dyn DockerSpace>,
    instance_id: String,
    job_finished: JobFinished,
}

impl ExitedContainers {
    /// The step for `instance_id`'s containers.
    pub fn new(docker: Arc<dyn DockerSpace>, instance_id: &str, job_finished: JobFinished) -> Self {
        Self {
            docker,
            instance_id: instance_id.to_owned(),
            job_finished,
        }
    }

    async fn removable(&self) -> Result<Vec<ExitedContainer>, ReclaimError> {
        Ok(self
            .docker
            .exited_containers(&self.instance_id)
            .await?
            .into_iter()
            .filter(|c| {
                c.job_id
                    .as_deref()
                    .is_some_and(|job| (self.job_finished)(job))
            })
            .collect())
    }
}

#[async_trait]
impl ReclaimStep for ExitedContainers {
    fn name(&self) -> &'static str {
        "exited_containers"
    }

    async fn estimate(&self) -> Result<Freed, ReclaimError> {
        let removable = self.removable().await?;
        Ok(removable.iter().map(|c| Freed::item(c.size_bytes)).sum())
    }

    async fn location(&self) -> Option<PathBuf> {
        self.docker.data_root().await.ok()
    }

    async fn run(&self) -> Result<Freed, ReclaimError> {
        let mut removals = Removals::default();
        for c in self.removable().await? {
            match self.docker.remove_container(&c.id).await {
                Ok(()) => {
                    tracing::info!(container = %c.id, job = ?c.job_id, bytes = c.size_bytes, "reclaim: removed exited job container");
                    removals.removed(c.size_bytes);
                }
                Err(e) => removals.failed(e),
            }
        }
        removals.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::fake::FakeDocker;

    fn container(id: &str, job: Option<&str>, size: u64) -> ExitedContainer {
        ExitedContainer {
            id: id.into(),
            job_id: job.map(Into::into),
            size_bytes: size,
        }
    }

    fn docker() -> Arc<FakeDocker> {
        let docker = Arc::new(FakeDocker::default());
        {
            let mut s = docker.state.lock().unwrap();
            s.containers = vec![
                ("me".into(), container("c1", Some("done"), 100)),
                ("me".into(), container("c2", Some("running"), 200)),
                ("me".into(), container("c3", None, 300)),
                ("other".into(), container("c4", Some("done"), 400)),
            ];
        }
        docker
    }

    fn finished_is_done() -> JobFinished {
        Arc::new(|job: &str| job == "done")
    }

    #[tokio::test]
    async fn only_finished_jobs_of_this_instance_are_removed() {
        let docker = docker();
        let step = ExitedContainers::new(docker.clone(), "me", finished_is_done());
        assert_eq!(
            step.estimate().await.unwrap(),
            Freed {
                bytes: 100,
                items: 1
            }
        );
        assert_eq!(
            docker.state.lock().unwrap().containers.len(),
            4,
            "estimate deletes nothing"
        );
        assert_eq!(step.run().await.unwrap().bytes, 100);
        let left: Vec<String> = docker
            .state
            .lock()
            .unwrap()
            .containers
            .iter()
            .map(|(_, c)| c.id.clone())
            .collect();
        assert_eq!(left, ["c2", "c3", "c4"]);
    }

    #[tokio::test]
    async fn nothing_is_removed_until_jobs_say_so() {
        let docker = docker();
        let step = ExitedContainers::new(docker.clone(), "me", Arc::new(|_: &str| false));
        assert_eq!(step.run().await.unwrap(), Freed::default());
        assert_eq!(docker.state.lock().unwrap().containers.len(), 4);
    }

    #[tokio::test]
    async fn a_failed_removal_keeps_what_was_freed() {
        let docker = docker();
        docker
            .state
            .lock()
            .unwrap()
            .containers
            .push(("me".into(), container("c5", Some("done"), 50)));
        docker.state.lock().unwrap().fail_removal = vec!["c1".into()];
        let step = ExitedContainers::new(docker.clone(), "me", finished_is_done());
        match step.run().await {
            Err(ReclaimError::Partial { freed, failed, .. }) => {
                assert_eq!(freed.bytes, 50);
                assert_eq!(failed, 1);
            }
            other => panic!("expected a partial failure, got {other:?}"),
        }
    }
}

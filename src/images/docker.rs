//! [`ImageEngine`] on the Docker engine through bollard: `POST
//! /images/create` with `X-Registry-Auth` for pulls, inspect, list and
//! remove (never forced), and the images that containers use. It reuses the
//! job queue's connection ([`DockerEngine`]), so that one client negotiates
//! the API version and reconnects after an engine restart.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use tokio_stream::StreamExt;

use super::engine::{ImageEngine, LocalImage, PullEvent, PullEvents, Removed};
use crate::jobs::RegistryAuth;
use crate::jobs::engine::{DockerEngine, EngineError};

/// Deadline of the quick calls (inspect, list, remove). A pull has no
/// deadline here: the images domain bounds it (`images.pull_timeout_seconds`).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Maps a bollard error of `operation` on `name` as the job queue's engine
/// does (which also drops a broken connection); its "no such" is an image
/// here.
async fn engine_error(
    engine: &DockerEngine,
    operation: &'static str,
    name: &str,
    error: bollard::errors::Error,
) -> EngineError {
    match engine.map_error(operation, name, error).await {
        EngineError::NotFound { name, .. } => EngineError::NotFound {
            what: "image",
            name,
        },
        other => other,
    }
}

/// A pull's error: the registry's or engine's message, or an engine that
/// went away mid-pull (the stream cannot reach the client to reset it; the
/// next call's transport error does).
fn pull_error(socket: &std::path::Path, error: bollard::errors::Error) -> EngineError {
    use bollard::errors::Error as E;
    match error {
        E::DockerResponseServerError { message, .. } => EngineError::Api {
            operation: "pull",
            message,
        },
        E::DockerStreamError { error } => EngineError::Api {
            operation: "pull",
            message: error,
        },
        other => EngineError::Unreachable {
            socket: socket.to_owned(),
            message: other.to_string(),
        },
    }
}

async fn bounded<T>(
    engine: &DockerEngine,
    operation: &'static str,
    name: &str,
    call: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(engine_error(engine, operation, name, error).await),
        Err(_) => Err(EngineError::Api {
            operation,
            message: format!("no answer within {CALL_TIMEOUT:?}"),
        }),
    }
}

fn credentials(
    auth: Option<&RegistryAuth>,
    registry: &str,
) -> Option<bollard::auth::DockerCredentials> {
    auth.map(|auth| bollard::auth::DockerCredentials {
        username: Some(auth.username.clone()),
        password: Some(auth.password.expose().clone()),
        serveraddress: Some(registry.to_owned()),
        ..Default::default()
    })
}

/// The registry part of an engine reference (`host:port/repo:tag`), or
/// Docker Hub's address.
fn registry_of(reference: &str) -> String {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first.to_owned(),
        _ => "https://index.docker.io/v1/".to_owned(),
    }
}

fn number(value: Option<i64>) -> u64 {
    value.and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
}

#[async_trait]
impl ImageEngine for DockerEngine {
    async fn pull(
        &self,
        reference: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<PullEvents, EngineError> {
        let client = self.client().await?;
        let options = bollard::query_parameters::CreateImageOptions {
            from_image: Some(reference.to_owned()),
            ..Default::default()
        };
        let credentials = credentials(auth, &registry_of(reference));
        let socket = self.socket().to_owned();
        let events = async_stream::stream! {
            // The client moves into the stream: the pull lives as long as it.
            let mut stream = client.create_image(Some(options), None, credentials);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(info) => {
                        let detail = info.progress_detail.unwrap_or_default();
                        yield Ok(PullEvent {
                            layer: info.id.unwrap_or_default(),
                            status: info.status.unwrap_or_default(),
                            current: number(detail.current),
                            total: number(detail.total),
                        });
                    }
                    Err(error) => {
                        yield Err(pull_error(&socket, error));
                        return;
                    }
                }
            }
        };
        Ok(Box::pin(events))
    }

    async fn inspect(&self, reference: &str) -> Result<Option<LocalImage>, EngineError> {
        let client = self.client().await?;
        match bounded(
            self,
            "inspect image",
            reference,
            client.inspect_image(reference),
        )
        .await
        {
            Ok(image) => Ok(Some(LocalImage {
                id: image.id.unwrap_or_default(),
                repo_tags: image.repo_tags.unwrap_or_default(),
                repo_digests: image.repo_digests.unwrap_or_default(),
                size_bytes: number(image.size),
            })),
            Err(EngineError::NotFound { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn list(&self) -> Result<Vec<LocalImage>, EngineError> {
        let client = self.client().await?;
        let options = bollard::query_parameters::ListImagesOptions {
            all: false,
            ..Default::default()
        };
        let images = bounded(self, "list images", "", client.list_images(Some(options))).await?;
        Ok(images
            .into_iter()
            .map(|i| LocalImage {
                id: i.id,
                repo_tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                repo_digests: i
                    .repo_digests
                    .into_iter()
                    .filter(|d| d != "<none>@<none>")
                    .collect(),
                size_bytes: u64::try_from(i.size).unwrap_or(0),
            })
            .collect())
    }

    async fn remove(&self, reference: &str) -> Result<Removed, EngineError> {
        let client = self.client().await?;
        let options = bollard::query_parameters::RemoveImageOptions {
            force: false,
            noprune: false,
            platforms: None,
        };
        let items = bounded(
            self,
            "remove image",
            reference,
            client.remove_image(reference, Some(options), None),
        )
        .await?;
        let deleted = items.iter().any(|i| i.deleted.is_some());
        Ok(Removed {
            items: items
                .into_iter()
                .filter_map(|i| i.untagged.or(i.deleted))
                .collect(),
            deleted,
        })
    }

    async fn in_use(&self) -> Result<HashSet<String>, EngineError> {
        let client = self.client().await?;
        let options = bollard::query_parameters::ListContainersOptions {
            all: true,
            ..Default::default()
        };
        let containers = bounded(
            self,
            "list containers",
            "",
            client.list_containers(Some(options)),
        )
        .await?;
        Ok(containers.into_iter().filter_map(|c| c.image_id).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_of_a_reference_gets_the_credential() {
        assert_eq!(registry_of("127.0.0.1:5443/team/env:1"), "127.0.0.1:5443");
        assert_eq!(registry_of("registry.example/env:1"), "registry.example");
        assert_eq!(
            registry_of("someone/private:1"),
            "https://index.docker.io/v1/"
        );
        assert_eq!(registry_of("busybox:latest"), "https://index.docker.io/v1/");
    }
}

//! One flight's task, from its slot to the image being local: wait for a
//! pull slot and while the disk guard holds admission, ask the registry
//! (credentials, manifest, sizes; retried while it does not answer), wait
//! until the image fits above the disk floor (reclaiming unused images
//! meanwhile), let the engine pull with progress, and record the outcome
//! for every job and caller that waited. An engine error is explained by
//! asking the registry itself, so that each failure has a clear reason.

use std::time::Duration;

use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::engine::LocalImage;
use super::progress::PullProgress;
use super::reference::ImageRef;
use super::registry::{Manifest, RegistryError};
use super::service::ImageService;
use super::space::Fit;
use super::state::Presence;
use super::{FailureKind, PullFailure};
use crate::jobs::engine::EngineError;
use crate::jobs::{PullPhase, RegistryAuth};
use crate::units::bytes;

/// How often a held or waiting pull looks again.
const POLL: Duration = Duration::from_secs(1);
/// Longest pause between tries of an unreachable registry or engine.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Reclaim again at most this often while a pull waits for space.
const RECLAIM_EVERY: Duration = Duration::from_secs(60);

/// The space a pull takes: the compressed layers as they download plus
/// their unpacked form, estimated at twice the compressed size (layers that
/// are local already are counted too: the estimate errs on the safe side).
pub fn needed_bytes(compressed: u64) -> u64 {
    compressed.saturating_mul(3)
}

/// How a flight ended.
enum Outcome {
    Done { image: LocalImage, digest: String },
    Failed(PullFailure),
    Cancelled(&'static str),
}

/// What an engine error means for the pull.
enum Verdict {
    /// Try again (before the deadline), with this reason meanwhile.
    Retry(String),
    /// The pull fails.
    Final(PullFailure),
}

fn failure(kind: FailureKind, reason: impl Into<String>) -> PullFailure {
    PullFailure {
        kind,
        reason: reason.into(),
    }
}

/// The failure a registry's answer is.
fn from_registry(error: RegistryError) -> PullFailure {
    let kind = match &error {
        RegistryError::NoCredentials { .. } | RegistryError::Refused { .. } => {
            FailureKind::Unauthorized
        }
        RegistryError::NotFound { .. } => FailureKind::NotFound,
        RegistryError::Untrusted { .. } => FailureKind::Untrusted,
        RegistryError::Unreachable { .. } => FailureKind::Unreachable,
        RegistryError::Protocol { .. } => FailureKind::Engine,
    };
    failure(kind, error.to_string())
}

impl ImageService {
    /// Runs flight `id` of `key` to its end.
    pub(super) async fn fly(
        self,
        key: String,
        image: ImageRef,
        id: u64,
        cancel: CancellationToken,
        slot: std::sync::Arc<tokio::sync::Notify>,
    ) {
        let Some(progress) = self
            .lock()
            .flights
            .get(&key)
            .filter(|f| f.id == id)
            .map(|f| f.progress.clone())
        else {
            return;
        };
        let outcome = tokio::select! {
            _ = cancel.cancelled() => Outcome::Cancelled("stopped: nobody needs the image any more"),
            _ = self.inner.shutdown.cancelled() => Outcome::Cancelled("stopped: the agent is stopping"),
            outcome = self.attempt(&key, id, &image, &progress, &slot) => outcome,
        };
        self.land(&key, id, &image, &progress, outcome).await;
    }

    fn set(progress: &tokio::sync::watch::Sender<PullProgress>, phase: PullPhase, reason: String) {
        progress.send_if_modified(|p| {
            let changed = p.view.phase != phase || p.view.reason != reason;
            p.view.phase = phase;
            p.view.reason = reason;
            changed
        });
    }

    fn has_slot(&self, key: &str, id: u64) -> bool {
        self.lock()
            .flights
            .get(key)
            .is_some_and(|f| f.id == id && f.started)
    }

    fn auth_for(&self, key: &str, id: u64, image: &ImageRef) -> Option<RegistryAuth> {
        let own = self
            .lock()
            .flights
            .get(key)
            .filter(|f| f.id == id)
            .and_then(|f| f.auth.clone());
        own.or_else(|| self.inner.credentials.for_image(image))
    }

    async fn attempt(
        &self,
        key: &str,
        id: u64,
        image: &ImageRef,
        progress: &tokio::sync::watch::Sender<PullProgress>,
        slot: &tokio::sync::Notify,
    ) -> Outcome {
        while !self.has_slot(key, id) {
            slot.notified().await;
        }
        while let Some(hold) = self.inner.space.held() {
            Self::set(progress, PullPhase::Held, format!("held: disk: {hold}"));
            tokio::time::sleep(POLL).await;
        }
        let auth = self.auth_for(key, id, image);
        let timeout = Duration::from_secs(self.config().pull_timeout_seconds.into());
        let mut deadline = tokio::time::Instant::now() + timeout;
        Self::set(progress, PullPhase::Resolving, String::new());
        let manifest = match self
            .manifest_until(image, auth.as_ref(), deadline, timeout, progress)
            .await
        {
            Ok(manifest) => manifest,
            Err(failure) => return Outcome::Failed(failure),
        };
        let need = manifest
            .as_ref()
            .map_or(0, |m| needed_bytes(m.compressed_bytes()));
        if let Some(manifest) = &manifest {
            progress.send_modify(|p| p.set_manifest(manifest, need));
        }
        match self.wait_for_space(need, progress).await {
            Ok(waited) => deadline += waited,
            Err(failure) => return Outcome::Failed(failure),
        }
        let reference = image.for_engine();
        let was_local = match self.inner.engine.inspect(&reference).await {
            Ok(found) => found.map(|i| i.id),
            Err(_) => None,
        };
        let mut backoff = Duration::from_secs(1);
        loop {
            Self::set(progress, PullPhase::Pulling, String::new());
            let pulled = tokio::time::timeout_at(
                deadline,
                self.pull_stream(&reference, auth.as_ref(), progress),
            )
            .await;
            let error = match pulled {
                Ok(Ok(())) => break,
                Ok(Err(error)) => error,
                Err(_) => {
                    return Outcome::Failed(failure(
                        FailureKind::TimedOut,
                        format!(
                            "the pull did not finish within {} s (images.pull_timeout_seconds)",
                            timeout.as_secs()
                        ),
                    ));
                }
            };
            match self.explain(image, auth.as_ref(), &error, deadline).await {
                Verdict::Final(failure) => return Outcome::Failed(failure),
                Verdict::Retry(reason) if tokio::time::Instant::now() + backoff < deadline => {
                    tracing::info!(image = %image, %reason, "pull failed; trying again");
                    Self::set(progress, PullPhase::Retrying, reason);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Verdict::Retry(reason) => {
                    return Outcome::Failed(failure(
                        FailureKind::Unreachable,
                        format!(
                            "{reason} (retried for {} s, images.pull_timeout_seconds)",
                            timeout.as_secs()
                        ),
                    ));
                }
            }
        }
        let found = match self.inner.engine.inspect(&reference).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                return Outcome::Failed(failure(
                    FailureKind::Engine,
                    format!("the engine pulled {reference} but has no such image"),
                ));
            }
            Err(error) => return Outcome::Failed(failure(FailureKind::Engine, error.to_string())),
        };
        let digest = match image.digest() {
            Some(digest) => format!("{}@{digest}", image.engine_repository()),
            None => image.digest_among(&found.repo_digests).unwrap_or_else(|| {
                manifest
                    .as_ref()
                    .filter(|m| !m.digest.is_empty())
                    .map_or_else(
                        || found.id.clone(),
                        |m| format!("{}@{}", image.engine_repository(), m.digest),
                    )
            }),
        };
        let was_local = was_local.as_deref() == Some(found.id.as_str());
        self.inner
            .records
            .pulled(&found, &reference, &digest, was_local)
            .await;
        Outcome::Done {
            image: found,
            digest,
        }
    }

    /// The registry's manifest, retried while it does not answer, until
    /// `deadline`. `Ok(None)`: the registry answered something the agent
    /// does not understand; the engine is left to try.
    async fn manifest_until(
        &self,
        image: &ImageRef,
        auth: Option<&RegistryAuth>,
        deadline: tokio::time::Instant,
        timeout: Duration,
        progress: &tokio::sync::watch::Sender<PullProgress>,
    ) -> Result<Option<Manifest>, PullFailure> {
        let mut backoff = Duration::from_secs(1);
        loop {
            let asked =
                tokio::time::timeout_at(deadline, self.inner.registry.manifest(image, auth)).await;
            match asked {
                Err(_) => {
                    return Err(failure(
                        FailureKind::TimedOut,
                        format!(
                            "registry {} did not answer within {} s (images.pull_timeout_seconds)",
                            image.registry(),
                            timeout.as_secs()
                        ),
                    ));
                }
                Ok(Ok(manifest)) => return Ok(Some(manifest)),
                Ok(Err(RegistryError::Protocol { registry, message })) => {
                    tracing::warn!(image = %image, %registry, %message, "cannot read the image's manifest; pulling without its sizes");
                    return Ok(None);
                }
                Ok(Err(error @ RegistryError::Unreachable { .. })) => {
                    if tokio::time::Instant::now() + backoff >= deadline {
                        return Err(failure(
                            FailureKind::Unreachable,
                            format!(
                                "{error} (retried for {} s, images.pull_timeout_seconds)",
                                timeout.as_secs()
                            ),
                        ));
                    }
                    Self::set(progress, PullPhase::Retrying, error.to_string());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    Self::set(progress, PullPhase::Resolving, String::new());
                }
                Ok(Err(error)) => return Err(from_registry(error)),
            }
        }
    }

    /// Waits until `need` bytes fit above the floor of the filesystem where
    /// images land, reclaiming unused images meanwhile; returns how long it
    /// waited. Fails when the image can never fit there.
    async fn wait_for_space(
        &self,
        need: u64,
        progress: &tokio::sync::watch::Sender<PullProgress>,
    ) -> Result<Duration, PullFailure> {
        let started = tokio::time::Instant::now();
        let mut reclaimed_at: Option<tokio::time::Instant> = None;
        loop {
            let Some(space) = self.inner.space.measure().await else {
                return Ok(started.elapsed());
            };
            match space.fit(need) {
                Fit::Fits => return Ok(started.elapsed()),
                Fit::Never(capacity) => {
                    let location = self.inner.space.location().await.unwrap_or_default();
                    return Err(failure(
                        FailureKind::NoSpace,
                        format!(
                            "image needs ~{} but the filesystem of {} holds only {} above its {} floor",
                            bytes(need),
                            location.display(),
                            bytes(capacity),
                            bytes(space.floor_bytes)
                        ),
                    ));
                }
                Fit::Short(_) => {
                    Self::set(
                        progress,
                        PullPhase::WaitingForDisk,
                        format!("waiting for disk space: image needs ~{}", bytes(need)),
                    );
                    if reclaimed_at.is_none_or(|at| at.elapsed() >= RECLAIM_EVERY) {
                        reclaimed_at = Some(tokio::time::Instant::now());
                        let freed = self.reclaim_unused(space.shortfall(need)).await;
                        tracing::info!(
                            freed = %bytes(freed.bytes),
                            images = freed.items,
                            need = %bytes(need),
                            "reclaimed unused images for a pull that waits for space"
                        );
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }

    /// Lets the engine pull, following its progress.
    async fn pull_stream(
        &self,
        reference: &str,
        auth: Option<&RegistryAuth>,
        progress: &tokio::sync::watch::Sender<PullProgress>,
    ) -> Result<(), EngineError> {
        let mut events = self.inner.engine.pull(reference, auth).await?;
        while let Some(event) = events.next().await {
            let event = event?;
            progress.send_modify(|p| p.apply(&event));
        }
        Ok(())
    }

    /// What an engine error of a pull means: the disk filling is final; any
    /// other failure is explained by asking the registry itself (the
    /// engine's words are often misleading), and only a registry or engine
    /// that does not answer is tried again.
    async fn explain(
        &self,
        image: &ImageRef,
        auth: Option<&RegistryAuth>,
        error: &EngineError,
        deadline: tokio::time::Instant,
    ) -> Verdict {
        let message = error.to_string();
        let lower = message.to_lowercase();
        if lower.contains("no space left on device") {
            return Verdict::Final(failure(
                FailureKind::DiskFull,
                format!("the disk filled up during the pull: {message}"),
            ));
        }
        if error.is_unreachable() {
            return Verdict::Retry(message);
        }
        let asked =
            tokio::time::timeout_at(deadline, self.inner.registry.manifest(image, auth)).await;
        match asked {
            Ok(Err(RegistryError::Unreachable {
                registry,
                message: why,
            })) => Verdict::Retry(format!("registry {registry} is unreachable: {why}")),
            Ok(Err(RegistryError::Protocol { .. })) | Ok(Ok(_)) | Err(_) => {
                let transient = [
                    "connection reset",
                    "connection refused",
                    "i/o timeout",
                    "tls handshake timeout",
                    "unexpected eof",
                    "broken pipe",
                ];
                if transient.iter().any(|t| lower.contains(t)) {
                    Verdict::Retry(message)
                } else {
                    Verdict::Final(failure(FailureKind::Engine, message))
                }
            }
            Ok(Err(error)) => Verdict::Final(from_registry(error)),
        }
    }

    /// Records how flight `id` of `key` ended, for every job and caller that
    /// waited on it, and gives its slot to the next.
    async fn land(
        &self,
        key: &str,
        id: u64,
        image: &ImageRef,
        progress: &tokio::sync::watch::Sender<PullProgress>,
        outcome: Outcome,
    ) {
        let max = self.max_pulls();
        {
            let mut state = self.lock();
            let flight = match state.flights.get(key) {
                Some(f) if f.id == id => state.flights.remove(key),
                _ => None,
            };
            let jobs: Vec<String> = flight
                .map(|f| f.jobs.into_iter().collect())
                .unwrap_or_default();
            match &outcome {
                Outcome::Done {
                    image: local,
                    digest,
                } => {
                    state
                        .local
                        .insert(key.to_owned(), Presence::Local(local.id.clone()));
                    state.pulled_for.extend(jobs);
                    progress.send_modify(|p| {
                        p.view.phase = PullPhase::Done;
                        p.view.reason = String::new();
                        p.digest = digest.clone();
                    });
                }
                Outcome::Failed(failure) => {
                    for job in jobs {
                        state.failed.insert(job, failure.reason.clone());
                    }
                    progress.send_modify(|p| {
                        p.view.phase = PullPhase::Failed;
                        p.view.reason = failure.reason.clone();
                        p.failure = Some(failure.kind);
                    });
                }
                Outcome::Cancelled(why) => progress.send_modify(|p| {
                    p.view.phase = PullPhase::Failed;
                    p.view.reason = (*why).to_owned();
                    p.failure = Some(FailureKind::Cancelled);
                }),
            }
            state.start_waiting(max);
        }
        match &outcome {
            Outcome::Done { digest, .. } => tracing::info!(image = %image, %digest, "image pulled"),
            Outcome::Failed(failure) => {
                tracing::warn!(image = %image, reason = %failure.reason, "image pull failed")
            }
            Outcome::Cancelled(why) => tracing::info!(image = %image, "image pull {why}"),
        }
        self.announce();
    }
}

//! The images domain's handle ([`ImageService`]): what the job queue asks
//! (its [`ImageProvider`] implementation: wants in queue order, an image's
//! state from memory, the digest before create), and what the API asks
//! (pull with progress, list, remove, credentials, the pulls in progress).
//!
//! Invariants:
//! - One flight per canonical reference: everyone who needs an image (jobs,
//!   `PullImage` callers) shares one pull and sees the same progress.
//! - At most `images.max_concurrent_pulls` flights hold a slot. Jobs' pulls
//!   start in the order of their wants (due jobs first, then the queue when
//!   `images.prefetch_queued`); `PullImage` callers wait for a slot.
//! - A flight that no job and no caller needs any more is cancelled.
//! - Nothing here calls into the job queue: it only announces changes.

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ImageError;
use super::config::{ImagesConfig, PullPolicy};
use super::credentials::CredentialStore;
use super::engine::ImageEngine;
use super::progress::PullProgress;
use super::records::Records;
use super::reference::ImageRef;
use super::registry::Registry;
use super::space::PullSpace;
use super::state::{Flight, Presence, State};
use crate::jobs::engine::EngineError;
use crate::jobs::{
    ImageProvider, ImageState, ImageWant, PullPhase, ResolveError, ResolvedImage, WantStage,
};
use crate::store::Store;

/// What the images domain needs, built by the daemon.
pub struct ImageParts {
    /// The container engine.
    pub engine: Arc<dyn ImageEngine>,
    /// Registries, asked directly.
    pub registry: Arc<dyn Registry>,
    /// Disk space where images land.
    pub space: Arc<dyn PullSpace>,
    /// Registry credentials.
    pub credentials: CredentialStore,
    /// The shared store (image records).
    pub store: Store,
    /// The live `[images]` section.
    pub config: watch::Receiver<ImagesConfig>,
    /// The live `jobs.keep_images` (never reclaimed).
    pub keep: watch::Receiver<Vec<String>>,
}

/// The images domain. Cheap to clone.
#[derive(Clone)]
pub struct ImageService {
    pub(super) inner: Arc<Inner>,
}

/// What every part of the service shares.
pub(super) struct Inner {
    pub(super) engine: Arc<dyn ImageEngine>,
    pub(super) registry: Arc<dyn Registry>,
    pub(super) space: Arc<dyn PullSpace>,
    pub(super) credentials: CredentialStore,
    pub(super) records: Records,
    pub(super) config: watch::Receiver<ImagesConfig>,
    pub(super) keep: watch::Receiver<Vec<String>>,
    state: Mutex<State>,
    /// Bumped when an image becomes ready or a pull ends.
    changes: watch::Sender<u64>,
    pub(super) shutdown: CancellationToken,
    pub(super) tasks: TaskTracker,
}

/// A `PullImage` caller's share of a flight: its progress, and (on drop)
/// the end of its need, which stops the pull when nobody else needs it.
pub struct PullWatch {
    /// The flight's progress; closed once the flight has ended (the last
    /// value is its outcome).
    pub progress: watch::Receiver<PullProgress>,
    service: ImageService,
    key: String,
    flight: u64,
}

impl Drop for PullWatch {
    fn drop(&mut self) {
        let mut state = self.service.lock();
        if let Some(flight) = state.flights.get_mut(&self.key)
            && flight.id == self.flight
        {
            flight.requests = flight.requests.saturating_sub(1);
            flight.announce_needers();
            if flight.requests == 0 && flight.jobs.is_empty() {
                flight.cancel.cancel();
                state.flights.remove(&self.key);
                let max = self.service.max_pulls();
                state.start_waiting(max);
            }
        }
    }
}

impl ImageService {
    /// The service; loads the image records. Nothing is pulled until asked.
    pub fn new(
        parts: ImageParts,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Self, ImageError> {
        let records = Records::load(parts.store).map_err(ImageError::Store)?;
        Ok(Self {
            inner: Arc::new(Inner {
                engine: parts.engine,
                registry: parts.registry,
                space: parts.space,
                credentials: parts.credentials,
                records,
                config: parts.config,
                keep: parts.keep,
                state: Mutex::new(State::default()),
                changes: watch::channel(0).0,
                shutdown,
                tasks,
            }),
        })
    }

    /// The state. Never held across an await.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves State consistent; a poisoned lock
        // is still safe to use.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn config(&self) -> ImagesConfig {
        self.inner.config.borrow().clone()
    }

    pub(super) fn max_pulls(&self) -> usize {
        self.inner.config.borrow().max_concurrent_pulls as usize
    }

    /// Tells the job queue to look again.
    pub(super) fn announce(&self) {
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A new flight for `image`, holding a slot when `started`; the caller
    /// inserts it and spawns its task.
    fn new_flight(state: &mut State, image: &ImageRef, started: bool, phase: PullPhase) -> Flight {
        state.next_flight += 1;
        let reason = if started {
            String::new()
        } else {
            "waiting for a pull slot (images.max_concurrent_pulls)".to_owned()
        };
        Flight {
            id: state.next_flight,
            image: image.clone(),
            progress: Arc::new(watch::channel(PullProgress::new(image.given(), phase, reason)).0),
            jobs: Default::default(),
            requests: 0,
            cancel: CancellationToken::new(),
            auth: None,
            started,
            slot: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Pulls `image` for a `PullImage` caller (joining a pull in flight).
    pub fn pull(&self, image: &str) -> Result<PullWatch, ImageError> {
        let image = ImageRef::parse(image)?;
        let key = image.canonical();
        let max = self.max_pulls();
        let mut spawn = None;
        let watch = {
            let mut state = self.lock();
            if !state.flights.contains_key(&key) {
                let started = state.running() < max && !state.any_waiting();
                let phase = if started {
                    PullPhase::Resolving
                } else {
                    PullPhase::Queued
                };
                let flight = Self::new_flight(&mut state, &image, started, phase);
                spawn = Some((flight.id, flight.cancel.clone(), flight.slot.clone()));
                state.flights.insert(key.clone(), flight);
            }
            let flight = state.flights.get_mut(&key).expect("inserted above");
            flight.requests += 1;
            flight.announce_needers();
            PullWatch {
                progress: flight.progress.subscribe(),
                service: self.clone(),
                key: key.clone(),
                flight: flight.id,
            }
        };
        if let Some((id, cancel, slot)) = spawn {
            self.spawn_flight(key, image, id, cancel, slot);
        }
        Ok(watch)
    }

    fn spawn_flight(
        &self,
        key: String,
        image: ImageRef,
        id: u64,
        cancel: CancellationToken,
        slot: Arc<tokio::sync::Notify>,
    ) {
        let service = self.clone();
        self.inner
            .tasks
            .spawn(async move { service.fly(key, image, id, cancel, slot).await });
    }

    /// Looks `image` up in the engine and notes whether it is local.
    fn spawn_check(&self, key: String, image: ImageRef) {
        let service = self.clone();
        self.inner.tasks.spawn(async move {
            let mut backoff = std::time::Duration::from_millis(500);
            loop {
                match service.inner.engine.inspect(&image.for_engine()).await {
                    Ok(found) => {
                        let presence = match found {
                            Some(local) => Presence::Local(local.id),
                            None => Presence::Absent,
                        };
                        service.lock().local.insert(key, presence);
                        service.announce();
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(image = %image, %error, "cannot look for an image yet");
                        tokio::select! {
                            _ = service.inner.shutdown.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
                    }
                }
            }
        });
    }

    /// The pulls in flight (and waiting), for `GetStatus` and `ListImages`.
    pub fn pulls(&self) -> Vec<PullProgress> {
        let state = self.lock();
        let mut pulls: Vec<PullProgress> = state
            .flights
            .values()
            .map(|f| f.progress.borrow().clone())
            .collect();
        pulls.sort_by(|a, b| a.image.cmp(&b.image));
        pulls
    }

    /// The local image of `parsed` as a container runs it (recorded as
    /// used); `None` when it is not local.
    pub(super) async fn run_local(
        &self,
        parsed: &ImageRef,
    ) -> Result<Option<ResolvedImage>, EngineError> {
        let Some(found) = self.inner.engine.inspect(&parsed.for_engine()).await? else {
            return Ok(None);
        };
        let digest = match parsed.digest() {
            Some(digest) => format!("{}@{digest}", parsed.engine_repository()),
            None => parsed
                .digest_among(&found.repo_digests)
                .unwrap_or_else(|| found.id.clone()),
        };
        // A digest names exactly one image; so does the id.
        let run = if digest.contains('@') {
            digest.clone()
        } else {
            found.id.clone()
        };
        self.inner.records.used(&found, &digest).await;
        Ok(Some(ResolvedImage { run, digest }))
    }

    /// Whether `job` must have its image pulled before it starts.
    fn needs_pull(state: &State, policy: PullPolicy, job: &str, key: &str) -> bool {
        match state.local.get(key) {
            Some(Presence::Absent) => true,
            Some(Presence::Local(_)) => {
                policy == PullPolicy::Always && !state.pulled_for.contains(job)
            }
            Some(Presence::Checking) | None => false,
        }
    }
}

#[async_trait]
impl ImageProvider for ImageService {
    fn want(&self, wants: Vec<ImageWant>) {
        let config = self.config();
        let max = config.max_concurrent_pulls as usize;
        let mut checks = Vec::new();
        let mut flights = Vec::new();
        // A reference seen for the first time may already be answered (its
        // image known to be local): the queue must look again at once, not
        // at its next timer.
        let mut newly_known = false;
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            let wanted: std::collections::HashSet<&str> =
                wants.iter().map(|w| w.image.as_str()).collect();
            state
                .refs
                .retain(|image, _| wanted.contains(image.as_str()));
            let jobs: std::collections::HashSet<&str> =
                wants.iter().map(|w| w.job.as_str()).collect();
            state.failed.retain(|job, _| jobs.contains(job.as_str()));
            state.pulled_for.retain(|job| jobs.contains(job.as_str()));
            state.wants = wants.clone();
            // Parse (cached) and look up what is not known yet.
            let mut keys = std::collections::HashMap::new();
            for want in &wants {
                newly_known |= !state.refs.contains_key(&want.image);
                match state.parsed(&want.image) {
                    Ok(image) => {
                        let key = image.canonical();
                        if want.stage != WantStage::Active && !state.local.contains_key(&key) {
                            state.local.insert(key.clone(), Presence::Checking);
                            checks.push((key.clone(), image));
                        }
                        keys.insert(want.job.clone(), key);
                    }
                    Err(reason) => {
                        state.failed.entry(want.job.clone()).or_insert(reason);
                    }
                }
            }
            // Release the jobs that no longer wait on a flight.
            let mut ended = Vec::new();
            for (key, flight) in state.flights.iter_mut() {
                let before = flight.jobs.len();
                flight
                    .jobs
                    .retain(|job| keys.get(job) == Some(key) && jobs.contains(job.as_str()));
                if flight.jobs.len() != before {
                    flight.announce_needers();
                }
                if flight.jobs.is_empty() && flight.requests == 0 {
                    ended.push(key.clone());
                }
            }
            for key in ended {
                if let Some(flight) = state.flights.remove(&key) {
                    tracing::info!(image = %flight.image, "pull stopped: nobody needs it any more");
                    flight.cancel.cancel();
                }
            }
            // Start or join pulls: due jobs first, then (prefetch) the queue.
            let order = wants.iter().filter(|w| w.stage == WantStage::Due).chain(
                wants
                    .iter()
                    .filter(|w| w.stage == WantStage::Queued && config.prefetch_queued),
            );
            for want in order {
                let Some(key) = keys.get(&want.job) else {
                    continue;
                };
                if state.failed.contains_key(&want.job)
                    || !Self::needs_pull(state, config.pull_policy, &want.job, key)
                {
                    continue;
                }
                if let Some(flight) = state.flights.get_mut(key) {
                    if flight.jobs.insert(want.job.clone()) {
                        flight.announce_needers();
                    }
                    continue;
                }
                if state.running() >= max || state.any_waiting() {
                    continue;
                }
                let Ok(image) = state.parsed(&want.image) else {
                    continue;
                };
                let mut flight = Self::new_flight(state, &image, true, PullPhase::Resolving);
                flight.jobs.insert(want.job.clone());
                flight.auth = want.auth.clone();
                flight.announce_needers();
                flights.push((
                    key.clone(),
                    image,
                    flight.id,
                    flight.cancel.clone(),
                    flight.slot.clone(),
                ));
                state.flights.insert(key.clone(), flight);
            }
            // Jobs behind a flight of their image join it even when not
            // their turn (single flight: the pull is there anyway).
            for want in wants.iter().filter(|w| w.stage != WantStage::Active) {
                if let Some(key) = keys.get(&want.job)
                    && let Some(flight) = state.flights.get_mut(key)
                    && !state.failed.contains_key(&want.job)
                    && flight.jobs.insert(want.job.clone())
                {
                    flight.announce_needers();
                }
            }
        }
        if newly_known {
            self.announce();
        }
        for (key, image) in checks {
            self.spawn_check(key, image);
        }
        for (key, image, id, cancel, slot) in flights {
            self.spawn_flight(key, image, id, cancel, slot);
        }
    }

    fn state(&self, job: &str, image: &str) -> ImageState {
        let policy = self.inner.config.borrow().pull_policy;
        let state = self.lock();
        if let Some(reason) = state.failed.get(job) {
            return ImageState::Failed(reason.clone());
        }
        let waiting =
            |phase, reason: &str| ImageState::Pulling(PullProgress::new(image, phase, reason).view);
        let key = match state.refs.get(image) {
            Some(Ok(image)) => image.canonical(),
            Some(Err(reason)) => return ImageState::Failed(reason.clone()),
            None => return waiting(PullPhase::Resolving, "looking for the image"),
        };
        match state.local.get(&key) {
            Some(Presence::Local(_))
                if policy == PullPolicy::IfNotPresent || state.pulled_for.contains(job) =>
            {
                return ImageState::Ready;
            }
            Some(Presence::Checking) | None => {
                return waiting(PullPhase::Resolving, "looking for the image");
            }
            _ => {}
        }
        match state.flights.get(&key) {
            Some(flight) => ImageState::Pulling(flight.progress.borrow().view.clone()),
            None => waiting(
                PullPhase::Queued,
                "waiting for a pull slot (images.max_concurrent_pulls)",
            ),
        }
    }

    async fn resolve(&self, _job: &str, image: &str) -> Result<ResolvedImage, ResolveError> {
        let parsed = ImageRef::parse(image).map_err(|e| ResolveError::Engine(e.to_string()))?;
        match self
            .run_local(&parsed)
            .await
            .map_err(|e| ResolveError::Engine(e.to_string()))?
        {
            Some(resolved) => Ok(resolved),
            None => {
                self.lock()
                    .local
                    .insert(parsed.canonical(), Presence::Absent);
                Err(ResolveError::Missing)
            }
        }
    }

    fn forget(&self, image: &str) {
        if let Ok(parsed) = ImageRef::parse(image) {
            self.lock().local.remove(&parsed.canonical());
        }
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }
}

//! Fakes of the images domain's outside world, for unit tests and fault
//! injection: an engine whose pulls follow a script (layers, a gate the test
//! opens, an error), a registry with scripted answers, and disk space the
//! test sets. Every call is counted, so a test asserts "one pull" instead
//! of sleeping.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;

use super::engine::{ImageEngine, LocalImage, PullEvent, PullEvents, Removed};
use super::reference::ImageRef;
use super::registry::{Layer, Manifest, Registry, RegistryError};
use super::space::{PullSpace, Space};
use crate::jobs::RegistryAuth;
use crate::jobs::engine::EngineError;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How the fake engine pulls one reference.
#[derive(Debug, Clone)]
pub struct PullScript {
    /// Layers: (short id, size).
    pub layers: Vec<(String, u64)>,
    /// The image it ends with (`Err`: the engine's error message).
    pub result: Result<LocalImage, String>,
    /// The pull waits after its first progress line until the test opens
    /// the gate ([`FakeImageEngine::open`]).
    pub gated: bool,
}

impl PullScript {
    /// A pull of `layers` layers of `size` bytes that gives image `id`
    /// tagged `reference`, with digest `repo@sha256:<id's hex>`.
    pub fn image(reference: &str, id: &str, layers: usize, size: u64) -> Self {
        let repo = reference
            .rsplit_once(':')
            .filter(|(_, tag)| !tag.contains('/'))
            .map_or(reference, |(repo, _)| repo);
        let hex = id.trim_start_matches("sha256:");
        Self {
            layers: (0..layers)
                .map(|i| (format!("{i:x}{}", &"000000000000"[..11]), size))
                .collect(),
            result: Ok(LocalImage {
                id: id.to_owned(),
                repo_tags: vec![reference.to_owned()],
                repo_digests: vec![format!("{repo}@sha256:{hex}")],
                size_bytes: size * layers as u64,
            }),
            gated: false,
        }
    }
}

#[derive(Default)]
struct EngineState {
    images: HashMap<String, LocalImage>,
    scripts: HashMap<String, PullScript>,
    gates: HashMap<String, watch::Sender<bool>>,
    pulls: HashMap<String, u32>,
    /// Pulls that ended (finished, failed, or dropped by the agent).
    ended: HashMap<String, u32>,
    in_use: HashSet<String>,
    down: bool,
    removed: Vec<String>,
    auths: Vec<Option<String>>,
    /// Bytes of the images deleted so far.
    deleted_bytes: u64,
}

/// A fake engine.
#[derive(Default)]
pub struct FakeImageEngine {
    state: Arc<Mutex<EngineState>>,
    changes: Arc<watch::Sender<u64>>,
}

/// Counts a pull's end when dropped (the agent dropping the stream too).
struct Ended {
    state: Arc<Mutex<EngineState>>,
    changes: Arc<watch::Sender<u64>>,
    reference: String,
}

impl Drop for Ended {
    fn drop(&mut self) {
        *lock(&self.state)
            .ended
            .entry(self.reference.clone())
            .or_default() += 1;
        self.changes.send_modify(|n| *n += 1);
    }
}

impl FakeImageEngine {
    /// An engine without images.
    pub fn new() -> Self {
        Self::default()
    }

    fn announce(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Changes at every call and every pull's end.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Puts an image in the engine.
    pub fn add(&self, image: LocalImage) {
        lock(&self.state).images.insert(image.id.clone(), image);
    }

    /// Says how `reference` pulls.
    pub fn script(&self, reference: &str, script: PullScript) {
        let mut state = lock(&self.state);
        state
            .gates
            .insert(reference.to_owned(), watch::channel(!script.gated).0);
        state.scripts.insert(reference.to_owned(), script);
    }

    /// Lets a gated pull of `reference` go on.
    pub fn open(&self, reference: &str) {
        if let Some(gate) = lock(&self.state).gates.get(reference) {
            gate.send_replace(true);
        }
    }

    /// Pulls of `reference` so far.
    pub fn pulls(&self, reference: &str) -> u32 {
        lock(&self.state).pulls.get(reference).copied().unwrap_or(0)
    }

    /// Pulls of `reference` that ended (or were dropped).
    pub fn ended(&self, reference: &str) -> u32 {
        lock(&self.state).ended.get(reference).copied().unwrap_or(0)
    }

    /// The user names the pulls were given, in order (`None`: no auth).
    pub fn auths(&self) -> Vec<Option<String>> {
        lock(&self.state).auths.clone()
    }

    /// Marks image `id` as used by a container.
    pub fn use_image(&self, id: &str) {
        lock(&self.state).in_use.insert(id.to_owned());
    }

    /// Whether the engine has an image tagged `reference` (or with that id).
    pub fn has(&self, reference: &str) -> bool {
        Self::find(&lock(&self.state), reference).is_some()
    }

    /// What `remove` was asked, in order.
    pub fn removed(&self) -> Vec<String> {
        lock(&self.state).removed.clone()
    }

    /// Makes every call fail as unreachable (or answer again).
    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
    }

    /// Bytes of the images deleted so far.
    pub fn deleted_bytes(&self) -> u64 {
        lock(&self.state).deleted_bytes
    }

    fn find(state: &EngineState, reference: &str) -> Option<LocalImage> {
        state
            .images
            .values()
            .find(|i| {
                i.id == reference
                    || i.repo_tags.iter().any(|t| t == reference)
                    || i.repo_digests.iter().any(|d| d == reference)
            })
            .cloned()
    }

    fn check(&self) -> Result<(), EngineError> {
        self.announce();
        if lock(&self.state).down {
            return Err(EngineError::Unreachable {
                socket: "/fake/docker.sock".into(),
                message: "fake engine is down".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ImageEngine for FakeImageEngine {
    async fn pull(
        &self,
        reference: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<PullEvents, EngineError> {
        self.check()?;
        let (script, mut gate) = {
            let mut state = lock(&self.state);
            *state.pulls.entry(reference.to_owned()).or_default() += 1;
            state.auths.push(auth.map(|a| a.username.clone()));
            let script = state.scripts.get(reference).cloned();
            let gate = state.gates.get(reference).map(|g| g.subscribe());
            (script, gate)
        };
        let Some(script) = script else {
            return Err(EngineError::Api {
                operation: "pull",
                message: format!("pull access denied for {reference}, repository does not exist"),
            });
        };
        let ended = Ended {
            state: self.state.clone(),
            changes: self.changes.clone(),
            reference: reference.to_owned(),
        };
        let state = self.state.clone();
        let stream = async_stream::stream! {
            let _ended = ended;
            for (id, _) in &script.layers {
                yield Ok(PullEvent { layer: id.clone(), status: "Pulling fs layer".into(), current: 0, total: 0 });
            }
            if let Some(gate) = gate.as_mut() {
                while !*gate.borrow_and_update() {
                    if gate.changed().await.is_err() {
                        break;
                    }
                }
            }
            for (id, size) in &script.layers {
                yield Ok(PullEvent { layer: id.clone(), status: "Downloading".into(), current: size / 2, total: *size });
                yield Ok(PullEvent { layer: id.clone(), status: "Pull complete".into(), current: 0, total: 0 });
            }
            match &script.result {
                Ok(image) => {
                    lock(&state).images.insert(image.id.clone(), image.clone());
                }
                Err(message) => {
                    yield Err(EngineError::Api { operation: "pull", message: message.clone() });
                }
            }
        };
        Ok(Box::pin(stream))
    }

    async fn inspect(&self, reference: &str) -> Result<Option<LocalImage>, EngineError> {
        self.check()?;
        Ok(Self::find(&lock(&self.state), reference))
    }

    async fn list(&self) -> Result<Vec<LocalImage>, EngineError> {
        self.check()?;
        let mut images: Vec<LocalImage> = lock(&self.state).images.values().cloned().collect();
        images.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(images)
    }

    async fn remove(&self, reference: &str) -> Result<Removed, EngineError> {
        self.check()?;
        let mut state = lock(&self.state);
        state.removed.push(reference.to_owned());
        let Some(image) = Self::find(&state, reference) else {
            return Err(EngineError::NotFound {
                what: "image",
                name: reference.to_owned(),
            });
        };
        if state.in_use.contains(&image.id) {
            return Err(EngineError::Api {
                operation: "remove image",
                message: format!("conflict: unable to remove {reference}: image is being used"),
            });
        }
        let entry = state.images.get_mut(&image.id).expect("found above");
        entry.repo_tags.retain(|t| t != reference);
        if entry.repo_tags.is_empty() {
            state.images.remove(&image.id);
            state.deleted_bytes += image.size_bytes;
            return Ok(Removed {
                items: vec![reference.to_owned(), image.id],
                deleted: true,
            });
        }
        Ok(Removed {
            items: vec![reference.to_owned()],
            deleted: false,
        })
    }

    async fn in_use(&self) -> Result<HashSet<String>, EngineError> {
        self.check()?;
        Ok(lock(&self.state).in_use.clone())
    }
}

/// A registry with scripted answers; an image without one is served with
/// an empty manifest.
#[derive(Default)]
pub struct FakeRegistry {
    answers: Mutex<HashMap<String, Result<Manifest, RegistryError>>>,
    calls: Mutex<Vec<(String, Option<String>)>>,
}

impl FakeRegistry {
    /// A registry that serves every image (without sizes).
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers for `image` (as given).
    pub fn answer(&self, image: &str, answer: Result<Manifest, RegistryError>) {
        lock(&self.answers).insert(image.to_owned(), answer);
    }

    /// A manifest of `layers` layers of `size` bytes.
    pub fn sized(layers: usize, size: u64) -> Manifest {
        Manifest {
            digest: "sha256:feed".into(),
            layers: (0..layers)
                .map(|i| Layer {
                    digest: format!("sha256:{i:x}{}", "0".repeat(63)),
                    size,
                })
                .collect(),
        }
    }

    /// The calls: (image, user name).
    pub fn calls(&self) -> Vec<(String, Option<String>)> {
        lock(&self.calls).clone()
    }
}

#[async_trait]
impl Registry for FakeRegistry {
    async fn manifest(
        &self,
        image: &ImageRef,
        auth: Option<&RegistryAuth>,
    ) -> Result<Manifest, RegistryError> {
        lock(&self.calls).push((image.given().to_owned(), auth.map(|a| a.username.clone())));
        lock(&self.answers)
            .get(image.given())
            .cloned()
            .unwrap_or_else(|| Ok(Manifest::default()))
    }
}

/// Disk space the test sets; `None` cannot be measured. Linked to a fake
/// engine, the images it deletes free their bytes here.
pub struct FakeSpace {
    /// The space now.
    pub space: Mutex<Option<Space>>,
    /// The disk guard's hold, if any.
    pub hold: Mutex<Option<String>>,
    engine: Mutex<Option<Arc<FakeImageEngine>>>,
}

impl Default for FakeSpace {
    fn default() -> Self {
        Self {
            space: Mutex::new(Some(Space {
                free_bytes: 100 << 30,
                total_bytes: 200 << 30,
                floor_bytes: 5 << 30,
                margin_bytes: 1 << 30,
            })),
            hold: Mutex::new(None),
            engine: Mutex::new(None),
        }
    }
}

impl FakeSpace {
    /// Sets the free bytes.
    pub fn set_free(&self, free: u64) {
        if let Some(space) = lock(&self.space).as_mut() {
            space.free_bytes = free;
        }
    }

    /// Counts the bytes `engine` deletes as freed here.
    pub fn link(&self, engine: Arc<FakeImageEngine>) {
        *lock(&self.engine) = Some(engine);
    }

    /// Holds (or releases) pulls as the disk guard would.
    pub fn set_hold(&self, hold: Option<&str>) {
        *lock(&self.hold) = hold.map(str::to_owned);
    }
}

#[async_trait]
impl PullSpace for FakeSpace {
    async fn location(&self) -> Option<PathBuf> {
        Some(PathBuf::from("/fake/docker"))
    }

    async fn measure(&self) -> Option<Space> {
        let freed = lock(&self.engine).as_ref().map_or(0, |e| e.deleted_bytes());
        lock(&self.space).map(|mut space| {
            space.free_bytes += freed;
            space
        })
    }

    fn held(&self) -> Option<String> {
        lock(&self.hold).clone()
    }
}

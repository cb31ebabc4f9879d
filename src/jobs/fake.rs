//! An in-memory container engine for unit tests: containers "run" until the
//! test makes them exit, every call is recorded (and announced, so that a
//! test awaits a call instead of sleeping), and the engine can be made
//! unreachable to inject faults.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::engine::{
    ContainerEngine, ContainerListing, ContainerSpec, ContainerStatus, EngineError, EngineVersion,
    OutputStreamBox,
};

#[derive(Debug, Clone)]
struct FakeContainer {
    spec: ContainerSpec,
    status: String,
    exit: watch::Sender<Option<i64>>,
    oom: bool,
}

/// A fake engine. All methods are safe to call from any task.
#[derive(Default)]
pub struct FakeEngine {
    containers: Mutex<HashMap<String, FakeContainer>>,
    calls: Mutex<Vec<String>>,
    /// Down: every call fails as unreachable, and waits in flight break
    /// (as the wait stream of a real engine does when it goes away).
    down: watch::Sender<bool>,
    hung: Mutex<bool>,
    /// `create` waits while true (a frozen engine), then answers.
    create_hung: watch::Sender<bool>,
    /// `create` fails as unreachable (as a timed-out create does).
    create_fails: Mutex<bool>,
    /// `remove` fails (the container stays).
    remove_fails: Mutex<bool>,
    next_id: Mutex<u64>,
    /// Bumped on every call and every change to a container.
    changes: watch::Sender<u64>,
    /// The most containers ever running at once.
    peak_running: Mutex<usize>,
}

impl FakeEngine {
    /// An empty engine that answers.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Changes whenever a call is made or a container changes, so that a
    /// test can wait for "the manager asked the engine for X" as an event.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The most containers that were ever running at the same time.
    pub fn peak_running(&self) -> usize {
        *Self::lock(&self.peak_running)
    }

    /// Makes every call fail as unreachable (or answer again).
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    /// Whether every call fails as unreachable.
    pub fn is_down(&self) -> bool {
        *self.down.borrow()
    }

    /// Makes `create` wait until set back (a create stuck in a frozen engine).
    pub fn set_create_hung(&self, hung: bool) {
        self.create_hung.send_replace(hung);
    }

    /// Makes `create` fail as unreachable (or work again).
    pub fn set_create_fails(&self, fails: bool) {
        *Self::lock(&self.create_fails) = fails;
    }

    /// Makes `remove` fail, leaving the container (or work again).
    pub fn set_remove_fails(&self, fails: bool) {
        *Self::lock(&self.remove_fails) = fails;
    }

    /// Makes `version` hang (a frozen engine) until set back.
    pub fn set_hung(&self, hung: bool) {
        *Self::lock(&self.hung) = hung;
    }

    /// Makes a running container exit with `code` (and `oom` if set).
    pub fn exit(&self, id: &str, code: i64, oom: bool) {
        if let Some(c) = Self::lock(&self.containers).get_mut(id) {
            c.status = "exited".into();
            c.oom = oom;
            c.exit.send_replace(Some(code));
        }
        self.changed();
    }

    /// Ids of containers currently running.
    pub fn running(&self) -> Vec<String> {
        Self::lock(&self.containers)
            .iter()
            .filter(|(_, c)| c.status == "running")
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Ids of all existing containers.
    pub fn existing(&self) -> Vec<String> {
        Self::lock(&self.containers).keys().cloned().collect()
    }

    /// The spec a container was created with.
    pub fn spec_of(&self, id: &str) -> Option<ContainerSpec> {
        Self::lock(&self.containers).get(id).map(|c| c.spec.clone())
    }

    /// Every call made, as "op id".
    pub fn calls(&self) -> Vec<String> {
        Self::lock(&self.calls).clone()
    }

    /// Adds a container as if left by an earlier agent.
    pub fn insert(&self, id: &str, spec: ContainerSpec, status: &str, exit: Option<i64>) {
        let (tx, _) = watch::channel(exit);
        Self::lock(&self.containers).insert(
            id.to_owned(),
            FakeContainer {
                spec,
                status: status.into(),
                exit: tx,
                oom: false,
            },
        );
        self.changed();
    }

    fn record(&self, call: String) -> Result<(), EngineError> {
        Self::lock(&self.calls).push(call);
        self.changed();
        if *self.down.borrow() {
            return Err(EngineError::Unreachable {
                socket: "/fake.sock".into(),
                message: "fake engine is down".into(),
            });
        }
        Ok(())
    }

    fn find(&self, id_or_name: &str) -> Option<String> {
        let containers = Self::lock(&self.containers);
        if containers.contains_key(id_or_name) {
            return Some(id_or_name.to_owned());
        }
        containers
            .iter()
            .find(|(_, c)| c.spec.name == id_or_name)
            .map(|(id, _)| id.clone())
    }
}

#[async_trait]
impl ContainerEngine for FakeEngine {
    async fn version(&self) -> Result<EngineVersion, EngineError> {
        self.record("version".into())?;
        while *Self::lock(&self.hung) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(EngineVersion {
            version: "fake".into(),
            api_version: "1.41".into(),
        })
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, EngineError> {
        self.record(format!("create {}", spec.name))?;
        let mut hung = self.create_hung.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = hung.wait_for(|hung| !*hung).await;
        if *Self::lock(&self.create_fails) {
            return Err(EngineError::Unreachable {
                socket: "/fake.sock".into(),
                message: "fake engine: create timed out".into(),
            });
        }
        if self.find(&spec.name).is_some() {
            return Err(EngineError::NameInUse(spec.name.clone()));
        }
        let id = {
            let mut n = Self::lock(&self.next_id);
            *n += 1;
            format!("c{n}")
        };
        self.insert(&id, spec.clone(), "created", None);
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), EngineError> {
        self.record(format!("start {id}"))?;
        let mut containers = Self::lock(&self.containers);
        match containers.get_mut(id) {
            Some(c) => {
                c.status = "running".into();
                let running = containers
                    .values()
                    .filter(|c| c.status == "running")
                    .count();
                let mut peak = Self::lock(&self.peak_running);
                *peak = (*peak).max(running);
                Ok(())
            }
            None => Err(EngineError::NotFound {
                what: "container",
                name: id.into(),
            }),
        }
    }

    async fn wait(&self, id: &str) -> Result<i64, EngineError> {
        self.record(format!("wait {id}"))?;
        let mut rx = match Self::lock(&self.containers).get(id) {
            Some(c) => c.exit.subscribe(),
            None => {
                return Err(EngineError::NotFound {
                    what: "container",
                    name: id.into(),
                });
            }
        };
        let mut down = self.down.subscribe();
        loop {
            if let Some(code) = *rx.borrow_and_update() {
                return Ok(code);
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    return Err(EngineError::NotFound {
                        what: "container",
                        name: id.into(),
                    });
                },
                _ = down.wait_for(|down| *down) => return Err(EngineError::Unreachable {
                    socket: "/fake.sock".into(),
                    message: "fake engine went away".into(),
                }),
            }
        }
    }

    async fn inspect(&self, id_or_name: &str) -> Result<Option<ContainerStatus>, EngineError> {
        self.record(format!("inspect {id_or_name}"))?;
        let Some(id) = self.find(id_or_name) else {
            return Ok(None);
        };
        let containers = Self::lock(&self.containers);
        let c = &containers[&id];
        Ok(Some(ContainerStatus {
            id: id.clone(),
            status: c.status.clone(),
            running: c.status == "running",
            exit_code: *c.exit.borrow(),
            oom_killed: c.oom,
            labels: c.spec.labels.clone(),
            error: String::new(),
        }))
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), EngineError> {
        self.record(format!("stop {id} grace={}s", grace.as_secs()))?;
        self.exit(id, 143, false);
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), EngineError> {
        self.record(format!("remove {id}"))?;
        if *Self::lock(&self.remove_fails) {
            return Err(EngineError::Api {
                operation: "remove",
                message: "fake engine: removal refused".into(),
            });
        }
        if let Some(c) = Self::lock(&self.containers).remove(id) {
            c.exit.send_replace(Some(137));
        }
        self.changed();
        Ok(())
    }

    async fn list(&self, label: &str, value: &str) -> Result<Vec<ContainerListing>, EngineError> {
        self.record(format!("list {label}={value}"))?;
        Ok(Self::lock(&self.containers)
            .iter()
            .filter(|(_, c)| c.spec.labels.get(label).map(String::as_str) == Some(value))
            .map(|(id, c)| ContainerListing {
                id: id.clone(),
                state: c.status.clone(),
                labels: c.spec.labels.clone(),
            })
            .collect())
    }

    async fn output(
        &self,
        id: &str,
        _since_nanos: i64,
        _follow: bool,
    ) -> Result<OutputStreamBox, EngineError> {
        self.record(format!("output {id}"))?;
        let rx = Self::lock(&self.containers)
            .get(id)
            .map(|c| c.exit.subscribe());
        let stream = async_stream::stream! {
            if let Some(mut rx) = rx {
                while rx.borrow_and_update().is_none() {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            }
            if false {
                yield Err(EngineError::Api { operation: "output", message: String::new() });
            }
        };
        Ok(Box::pin(stream))
    }
}

/// An images domain for unit tests of the job queue: the test says which
/// images are local (and as which digest) and which pulls failed; every
/// statement of wants is kept, so a test sees what the dispatcher asked
/// for and in which order.
#[derive(Default)]
pub struct FakeImages {
    state: Mutex<FakeImagesState>,
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct FakeImagesState {
    /// Local images by reference, with their digest.
    local: HashMap<String, String>,
    /// Failed pulls by image.
    failed: HashMap<String, String>,
    /// The wants of each pass that changed them.
    wants: Vec<Vec<super::job_images::ImageWant>>,
    /// Images the manager said were missing after all.
    forgotten: Vec<String>,
    /// Images that vanish between the dispatcher's look and the job's.
    vanishing: std::collections::HashSet<String>,
}

impl FakeImages {
    /// No image is local.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeImagesState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn announce(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Makes `image` local as `digest` (a pull finished).
    pub fn make_local(&self, image: &str, digest: &str) {
        self.lock().local.insert(image.into(), digest.into());
        self.announce();
    }

    /// Makes the pull of `image` fail with `reason`.
    pub fn fail(&self, image: &str, reason: &str) {
        self.lock().failed.insert(image.into(), reason.into());
        self.announce();
    }

    /// Makes `image` vanish once, after the dispatcher saw it local and
    /// before the job's task resolves it (removed behind the agent's back).
    pub fn vanish_before_create(&self, image: &str) {
        self.lock().vanishing.insert(image.into());
    }

    /// The latest wants.
    pub fn wants(&self) -> Vec<super::job_images::ImageWant> {
        self.lock().wants.last().cloned().unwrap_or_default()
    }

    /// Every statement of wants that changed them, in order.
    pub fn wants_history(&self) -> Vec<Vec<super::job_images::ImageWant>> {
        self.lock().wants.clone()
    }

    /// Images the manager found missing after all.
    pub fn forgotten(&self) -> Vec<String> {
        self.lock().forgotten.clone()
    }
}

#[async_trait]
impl super::job_images::ImageProvider for FakeImages {
    fn want(&self, wants: Vec<super::job_images::ImageWant>) {
        let mut state = self.lock();
        if state.wants.last() != Some(&wants) {
            state.wants.push(wants);
        }
    }

    fn state(&self, _job: &str, image: &str) -> super::job_images::ImageState {
        use super::job_images::{ImageState, PullPhase, PullView};
        let state = self.lock();
        if state.local.contains_key(image) {
            ImageState::Ready
        } else if let Some(reason) = state.failed.get(image) {
            ImageState::Failed(reason.clone())
        } else {
            ImageState::Pulling(PullView {
                phase: PullPhase::Pulling,
                reason: String::new(),
                bytes_done: 1 << 20,
                bytes_total: 4 << 20,
                layers_done: 1,
                layers_total: 4,
                needed_bytes: 12 << 20,
            })
        }
    }

    async fn resolve(
        &self,
        _job: &str,
        image: &str,
    ) -> Result<super::job_images::ResolvedImage, super::job_images::ResolveError> {
        let mut state = self.lock();
        if state.vanishing.remove(image) {
            state.local.remove(image);
        }
        match state.local.get(image) {
            Some(digest) => Ok(super::job_images::ResolvedImage {
                run: digest.clone(),
                digest: digest.clone(),
            }),
            None => Err(super::job_images::ResolveError::Missing),
        }
    }

    fn forget(&self, image: &str) {
        let mut state = self.lock();
        state.local.remove(image);
        state.forgotten.push(image.into());
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

//! Fakes of the disk guard's outside world, for unit tests and (with the
//! `test-util` feature) integration tests: a filesystem world whose numbers
//! the test sets and whose filesystems can hang ([`FakeProbe`], both the
//! in-agent and the isolated probe: its "helpers" are blocking threads, gone
//! when the hung call returns), an engine
//! with scripted containers and images ([`FakeDocker`]), and a reclaim step
//! with scripted results ([`FakeStep`]). Each records its calls.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::docker::{DanglingImage, DockerSpace, ExitedContainer};
use super::probe::{
    FsProbe, IsolatedProbe, PathSample, ProbeRun, SampleAnswer, SystemProbe, WalkAnswer,
    lexical_mount,
};
use super::reclaim::{Freed, ReclaimError, ReclaimStep};
use super::top::TopRequest;
use super::{FsStats, MountInfo};
use crate::jobs::engine::EngineError;

/// The fake probe's filesystems, shared by its clones.
#[derive(Default)]
struct World {
    /// path → device number.
    paths: BTreeMap<PathBuf, u64>,
    /// device number → (mount, stats).
    filesystems: BTreeMap<u64, (MountInfo, FsStats)>,
    /// Devices whose calls block until released.
    hung: BTreeMap<u64, bool>,
    /// Calls of `sample`, by path.
    calls: BTreeMap<PathBuf, u32>,
    /// Calls currently blocked.
    blocked: u32,
}

/// A fake [`FsProbe`]: paths map to filesystems whose numbers the test
/// sets, and a filesystem can be made to hang until released. Cheap to
/// clone; clones share the world.
#[derive(Clone, Default)]
pub struct FakeProbe {
    world: Arc<(Mutex<World>, Condvar)>,
}

impl FakeProbe {
    /// An empty world: every path is absent.
    pub fn new() -> Self {
        Self::default()
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a filesystem mounted at `mount_point` with device `dev`.
    pub fn add_fs(&self, dev: u64, mount_point: &str, stats: FsStats) {
        let mut world = self.world();
        world.filesystems.insert(
            dev,
            (
                MountInfo {
                    mount_point: mount_point.into(),
                    device: format!("fake{dev}"),
                    fs_type: "fakefs".into(),
                },
                stats,
            ),
        );
        world.paths.insert(mount_point.into(), dev);
    }

    /// Gives filesystem `dev` the type `fs_type` ("tmpfs", …).
    pub fn set_fs_type(&self, dev: u64, fs_type: &str) {
        if let Some((mount, _)) = self.world().filesystems.get_mut(&dev) {
            mount.fs_type = fs_type.into();
        }
    }

    /// Puts `path` on filesystem `dev`.
    pub fn add_path(&self, path: &str, dev: u64) {
        self.world().paths.insert(path.into(), dev);
    }

    /// Removes `path`: it becomes absent.
    pub fn remove_path(&self, path: &str) {
        self.world().paths.remove(Path::new(path));
    }

    /// Sets the free bytes of filesystem `dev`.
    pub fn set_free(&self, dev: u64, free_bytes: u64) {
        if let Some((_, stats)) = self.world().filesystems.get_mut(&dev) {
            stats.free_bytes = free_bytes;
        }
    }

    /// Sets the free inodes of filesystem `dev`.
    pub fn set_free_inodes(&self, dev: u64, free_inodes: u64) {
        if let Some((_, stats)) = self.world().filesystems.get_mut(&dev) {
            stats.free_inodes = free_inodes;
        }
    }

    /// Makes every call on filesystem `dev` block until [`Self::release`].
    pub fn hang(&self, dev: u64) {
        self.world().hung.insert(dev, true);
    }

    /// Unblocks filesystem `dev`.
    pub fn release(&self, dev: u64) {
        self.world().hung.remove(&dev);
        self.world.1.notify_all();
    }

    /// How many times `path` was sampled.
    pub fn calls(&self, path: &str) -> u32 {
        self.world()
            .calls
            .get(Path::new(path))
            .copied()
            .unwrap_or(0)
    }

    /// How many calls are blocked right now.
    pub fn blocked(&self) -> u32 {
        self.world().blocked
    }

    fn dev_of(&self, path: &Path) -> io::Result<u64> {
        let mut world = self.world();
        *world.calls.entry(path.to_owned()).or_default() += 1;
        let dev = world
            .paths
            .get(path)
            .copied()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        if world.hung.contains_key(&dev) {
            world.blocked += 1;
            let (lock, cvar) = &*self.world;
            drop(world);
            let mut world = lock.lock().unwrap_or_else(|p| p.into_inner());
            while world.hung.contains_key(&dev) {
                world = cvar.wait(world).unwrap_or_else(|p| p.into_inner());
            }
            world.blocked -= 1;
        }
        Ok(dev)
    }
}

impl FsProbe for FakeProbe {
    fn sample(&self, path: &Path) -> io::Result<PathSample> {
        let dev = self.dev_of(path)?;
        let world = self.world();
        let (_, stats) = world
            .filesystems
            .get(&dev)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(PathSample { dev, stats: *stats })
    }

    fn mount_of(&self, _path: &Path, dev: u64) -> io::Result<MountInfo> {
        let world = self.world();
        world
            .filesystems
            .get(&dev)
            .map(|(mount, _)| mount.clone())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}

impl IsolatedProbe for FakeProbe {
    fn sample(&self, paths: Vec<(PathBuf, bool)>, _timeout: Duration) -> ProbeRun<SampleAnswer> {
        sample_in_threads(self, paths)
    }

    fn walk(&self, request: TopRequest, _limit: Duration) -> ProbeRun<WalkAnswer> {
        walk_in_a_thread(request)
    }

    fn filesystem_of(&self, path: &Path) -> PathBuf {
        let world = self.world();
        world
            .filesystems
            .values()
            .map(|(mount, _)| &mount.mount_point)
            .filter(|m| path.starts_with(m))
            .max_by_key(|m| m.components().count())
            .cloned()
            .unwrap_or_else(|| PathBuf::from("/"))
    }
}

/// For unit tests, which cannot re-execute the agent's binary: the real
/// filesystems, probed in blocking threads instead of helper processes.
impl IsolatedProbe for SystemProbe {
    fn sample(&self, paths: Vec<(PathBuf, bool)>, _timeout: Duration) -> ProbeRun<SampleAnswer> {
        sample_in_threads(self, paths)
    }

    fn walk(&self, request: TopRequest, _limit: Duration) -> ProbeRun<WalkAnswer> {
        walk_in_a_thread(request)
    }

    fn filesystem_of(&self, path: &Path) -> PathBuf {
        lexical_mount(&crate::mountinfo::read().unwrap_or_default(), path)
    }
}

/// Each path sampled through `probe` in a blocking thread of its own; the
/// answers close once every thread has returned (a hung one: once it is
/// released), as a helper's would once it is gone.
fn sample_in_threads<P: FsProbe + Clone>(
    probe: &P,
    paths: Vec<(PathBuf, bool)>,
) -> ProbeRun<SampleAnswer> {
    let (tx, answers) = tokio::sync::mpsc::unbounded_channel();
    for (index, (path, want_mount)) in paths.into_iter().enumerate() {
        let (probe, tx) = (probe.clone(), tx.clone());
        tokio::task::spawn_blocking(move || {
            let outcome = super::probe::sample_with_mount(&probe, &path, want_mount);
            let _ = tx.send((index, outcome));
        });
    }
    ProbeRun {
        answers,
        kill: CancellationToken::new(),
    }
}

/// The real walk in a blocking thread.
fn walk_in_a_thread(request: TopRequest) -> ProbeRun<WalkAnswer> {
    let (tx, answers) = tokio::sync::mpsc::unbounded_channel();
    tokio::task::spawn_blocking(move || {
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let result = super::top::walk(&request, &cancel, |p| {
            let _ = tx.send(WalkAnswer::Progress(p));
        });
        let _ = tx.send(WalkAnswer::Done(result));
    });
    ProbeRun {
        answers,
        kill: CancellationToken::new(),
    }
}

/// The fake engine's contents.
#[derive(Default)]
pub struct FakeDockerState {
    /// Data root; `None` makes `data_root` fail as if unreachable.
    pub data_root: Option<PathBuf>,
    /// (instance id, container).
    pub containers: Vec<(String, ExitedContainer)>,
    /// Dangling images.
    pub images: Vec<DanglingImage>,
    /// Container ids whose removal fails.
    pub fail_removal: Vec<String>,
    /// Calls of `data_root`.
    pub data_root_calls: u32,
}

/// A fake [`DockerSpace`] with scripted containers and images.
#[derive(Default)]
pub struct FakeDocker {
    /// Its contents, for the test to arrange and inspect.
    pub state: Mutex<FakeDockerState>,
}

impl FakeDocker {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeDockerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn unreachable() -> EngineError {
    EngineError::Unreachable {
        socket: "/fake/docker.sock".into(),
        message: "fake engine is down".into(),
    }
}

#[async_trait]
impl DockerSpace for FakeDocker {
    async fn data_root(&self) -> Result<PathBuf, EngineError> {
        let mut state = self.lock();
        state.data_root_calls += 1;
        state.data_root.clone().ok_or_else(unreachable)
    }
    async fn exited_containers(
        &self,
        instance_id: &str,
    ) -> Result<Vec<ExitedContainer>, EngineError> {
        Ok(self
            .lock()
            .containers
            .iter()
            .filter(|(instance, _)| instance == instance_id)
            .map(|(_, c)| c.clone())
            .collect())
    }
    async fn remove_container(&self, id: &str) -> Result<(), EngineError> {
        let mut state = self.lock();
        if state.fail_removal.iter().any(|f| f == id) {
            return Err(EngineError::Api {
                operation: "remove container",
                message: format!("{id} is busy"),
            });
        }
        state.containers.retain(|(_, c)| c.id != id);
        Ok(())
    }
    async fn dangling_images(&self) -> Result<Vec<DanglingImage>, EngineError> {
        Ok(self.lock().images.clone())
    }
    async fn prune_dangling_images(&self) -> Result<Freed, EngineError> {
        let images = std::mem::take(&mut self.lock().images);
        Ok(images.iter().map(|i| Freed::item(i.size_bytes)).sum())
    }
}

/// A [`ReclaimStep`] that frees a fixed amount or fails, and counts its calls.
pub struct FakeStep {
    name: &'static str,
    freed: Freed,
    fail: bool,
    /// (estimates, runs).
    pub calls: Mutex<(u32, u32)>,
    /// Called on each run, e.g. to give the fake filesystem its space back.
    pub on_run: Box<dyn Fn() + Send + Sync>,
    /// Where it frees space.
    pub location: Option<PathBuf>,
    /// How long each estimate and run takes (tokio time).
    pub delay: Duration,
}

impl FakeStep {
    /// A step that frees `bytes` in one item.
    pub fn freeing(name: &'static str, bytes: u64) -> Self {
        Self {
            name,
            freed: Freed { bytes, items: 1 },
            fail: false,
            calls: Mutex::new((0, 0)),
            on_run: Box::new(|| {}),
            location: None,
            delay: Duration::ZERO,
        }
    }

    /// A step that always fails.
    pub fn failing(name: &'static str) -> Self {
        Self {
            fail: true,
            ..Self::freeing(name, 0)
        }
    }

    /// (estimates, runs) so far.
    pub fn calls(&self) -> (u32, u32) {
        *self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn result(&self) -> Result<Freed, ReclaimError> {
        if self.fail {
            Err(ReclaimError::Other(format!("{} broke", self.name).into()))
        } else {
            Ok(self.freed)
        }
    }
}

#[async_trait]
impl ReclaimStep for FakeStep {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn estimate(&self) -> Result<Freed, ReclaimError> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
        tokio::time::sleep(self.delay).await;
        self.result()
    }
    async fn run(&self) -> Result<Freed, ReclaimError> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).1 += 1;
        tokio::time::sleep(self.delay).await;
        (self.on_run)();
        self.result()
    }
    async fn location(&self) -> Option<PathBuf> {
        self.location.clone()
    }
}

//! Fakes for unit tests: an app engine (and its images) whose containers "run" until the test
//! makes them exit, and a prober whose answers the test sets per address.
//! Every call is counted on a watch channel, so a test awaits a change
//! instead of sleeping.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::engine::{AppContainer, AppEngine};
use super::images::{AppImage, AppImageError, AppImages};
use super::probe::{ProbeOutcome, ProbeTarget, Prober};
use crate::jobs::engine::{
    ContainerListing, ContainerStatus, EngineError, OutputFrame, OutputStream, OutputStreamBox,
};

#[derive(Debug, Clone)]
struct Container {
    spec: AppContainer,
    status: String,
    exit: watch::Sender<Option<i64>>,
    output: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fake engine for apps.
#[derive(Default)]
pub struct FakeAppEngine {
    containers: Mutex<HashMap<String, Container>>,
    images: Mutex<Vec<String>>,
    calls: Mutex<Vec<String>>,
    next_id: Mutex<u64>,
    changes: watch::Sender<u64>,
}

impl FakeAppEngine {
    /// An engine holding `images`.
    pub fn with_images(images: &[&str]) -> Self {
        let engine = Self::default();
        *lock(&engine.images) = images.iter().map(|s| (*s).to_owned()).collect();
        engine
    }

    fn call(&self, call: String) {
        lock(&self.calls).push(call);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Changes on every call and container change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Every call so far, as `"verb arg"`.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }

    /// Ids of running containers.
    pub fn running(&self) -> Vec<String> {
        lock(&self.containers)
            .iter()
            .filter(|(_, c)| c.status == "running")
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Ids of every container.
    pub fn existing(&self) -> Vec<String> {
        lock(&self.containers).keys().cloned().collect()
    }

    /// The create spec of container `id`.
    pub fn spec_of(&self, id: &str) -> Option<AppContainer> {
        lock(&self.containers).get(id).map(|c| c.spec.clone())
    }

    /// Makes container `id` exit with `code` after printing `output`.
    pub fn exit(&self, id: &str, code: i64, output: &str) {
        if let Some(c) = lock(&self.containers).get_mut(id) {
            c.status = "exited".into();
            c.output.push_str(output);
            c.exit.send_replace(Some(code));
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// Removes container `id` behind the agent's back.
    pub fn vanish(&self, id: &str) {
        lock(&self.containers).remove(id);
    }
}

#[async_trait]
impl AppImages for FakeAppEngine {
    async fn ensure(
        &self,
        image: &str,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<AppImage, AppImageError> {
        self.call(format!("image {image}"));
        progress(format!("looking for image {image}"));
        if lock(&self.images).iter().any(|i| i == image) {
            Ok(AppImage {
                run: image.to_owned(),
                digest: format!("sha256:{}", image.len()),
            })
        } else {
            Err(AppImageError::Failed(format!("no such image: {image}")))
        }
    }
}

#[async_trait]
impl AppEngine for FakeAppEngine {
    async fn ensure_network(&self, name: &str) -> Result<(), EngineError> {
        self.call(format!("network {name}"));
        Ok(())
    }

    async fn create(&self, spec: &AppContainer) -> Result<String, EngineError> {
        self.call(format!("create {}", spec.name));
        let mut containers = lock(&self.containers);
        if containers.values().any(|c| c.spec.name == spec.name) {
            return Err(EngineError::NameInUse(spec.name.clone()));
        }
        let mut next = lock(&self.next_id);
        *next += 1;
        let id = format!("c{next}");
        containers.insert(
            id.clone(),
            Container {
                spec: spec.clone(),
                status: "created".into(),
                exit: watch::channel(None).0,
                output: String::new(),
            },
        );
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), EngineError> {
        self.call(format!("start {id}"));
        match lock(&self.containers).get_mut(id) {
            Some(c) => {
                c.status = "running".into();
                Ok(())
            }
            None => Err(EngineError::NotFound {
                what: "container",
                name: id.to_owned(),
            }),
        }
    }

    async fn wait(&self, id: &str) -> Result<i64, EngineError> {
        let mut exit = match lock(&self.containers).get(id) {
            Some(c) => c.exit.subscribe(),
            None => {
                return Err(EngineError::NotFound {
                    what: "container",
                    name: id.to_owned(),
                });
            }
        };
        loop {
            if let Some(code) = *exit.borrow_and_update() {
                return Ok(code);
            }
            if exit.changed().await.is_err() {
                // Removed while waited on: as if killed.
                return Ok(137);
            }
        }
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerStatus>, EngineError> {
        Ok(lock(&self.containers).get(id).map(|c| ContainerStatus {
            id: id.to_owned(),
            status: c.status.clone(),
            running: c.status == "running",
            exit_code: *c.exit.borrow(),
            oom_killed: false,
            labels: c.spec.labels.clone(),
            error: String::new(),
        }))
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), EngineError> {
        self.call(format!("stop {id}"));
        if let Some(c) = lock(&self.containers).get_mut(id)
            && c.status == "running"
        {
            c.status = "exited".into();
            c.exit.send_replace(Some(143));
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), EngineError> {
        self.call(format!("remove {id}"));
        let mut containers = lock(&self.containers);
        let key = containers
            .iter()
            .find(|(cid, c)| cid.as_str() == id || c.spec.name == id)
            .map(|(cid, _)| cid.clone());
        if let Some(key) = key {
            containers.remove(&key);
        }
        Ok(())
    }

    async fn list(&self, label: &str, value: &str) -> Result<Vec<ContainerListing>, EngineError> {
        Ok(lock(&self.containers)
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
        let output = lock(&self.containers)
            .get(id)
            .map(|c| c.output.clone())
            .unwrap_or_default();
        let frame = OutputFrame {
            stream: OutputStream::Stdout,
            time_nanos: 1,
            data: output.into(),
        };
        Ok(Box::pin(tokio_stream::iter([Ok(frame)])))
    }
}

/// A prober answering what the test set for each address (refused when
/// nothing was set), counting probes.
#[derive(Default)]
pub struct FakeProber {
    answers: Mutex<HashMap<SocketAddr, ProbeOutcome>>,
    probes: watch::Sender<u64>,
}

impl FakeProber {
    /// Makes probes of `addr` answer `status` (healthy within 200-399).
    pub fn answer(&self, addr: SocketAddr, status: u32) {
        let healthy = (200..=399).contains(&status);
        lock(&self.answers).insert(
            addr,
            ProbeOutcome {
                healthy,
                status_code: Some(status),
                error: if healthy {
                    String::new()
                } else {
                    format!("status {status} outside 200-399")
                },
            },
        );
    }

    /// Makes probes of `addr` refused again.
    pub fn refuse(&self, addr: SocketAddr) {
        lock(&self.answers).remove(&addr);
    }

    /// Probes so far (changes on each).
    pub fn probes(&self) -> watch::Receiver<u64> {
        self.probes.subscribe()
    }
}

#[async_trait]
impl Prober for FakeProber {
    async fn probe(&self, target: &ProbeTarget, _timeout: Duration) -> ProbeOutcome {
        let addr = match target {
            ProbeTarget::Http { addr, .. } | ProbeTarget::Tcp { addr } => *addr,
        };
        self.probes.send_modify(|n| *n += 1);
        lock(&self.answers)
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| ProbeOutcome {
                healthy: false,
                status_code: None,
                error: format!("connection refused on {addr}"),
            })
    }
}

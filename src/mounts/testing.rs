//! The mounts domain's unit-test rig: the agent's shared parts
//! ([`crate::testing::Rig`]) plus the fake mounter and a service on them,
//! and the event waits the tests share. Test-only.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::MountsConfig;
use super::fake::FakeMounter;
use super::settings::MountSettings;
use super::spec::{Auth, MountSpec, Origin, SecretSource};
use super::{MountService, MountState, MountStatus};
use crate::events::{Delivery, EventBus, EventPayload, Subscription};
use crate::health::Health;
use crate::secret::Secret;
use crate::testing::Rig;

pub(super) const KEY: &str = "S3cr3tAccountKeyValue0123456789==";

/// One agent's mounts domain on the fake mounter; survives restarts of the
/// service (the dir, the store and the fake stay).
pub(super) struct World {
    /// Temp dir, store, events, health, cancel, tasks.
    pub agent: Rig,
    pub fake: Arc<FakeMounter>,
    pub service: MountService,
    pub config: MountsConfig,
}

impl World {
    pub fn new() -> Self {
        Self::with(Rig::new(), Arc::new(FakeMounter::new()))
    }

    pub fn with(agent: Rig, fake: Arc<FakeMounter>) -> Self {
        let base = agent.root.clone();
        std::fs::create_dir_all(base.join("mnt")).unwrap();
        let config = MountsConfig {
            allowed_roots: vec![base.join("mnt")],
            cache_root: base.join("cache"),
            health_interval_seconds: 10,
            // The test host has no instance user: mounts for jobs only.
            default_owner: "root".into(),
            ..MountsConfig::default()
        };
        let (_, interval) = watch::channel(Duration::from_secs(10));
        let service = MountService::new(
            MountSettings::new(
                &config,
                &agent.state_dir(),
                &base.join("run"),
                &base.join("logs"),
            ),
            fake.clone(),
            agent.store.clone(),
            agent.events.clone(),
            agent.health.clone(),
            crate::paths::offload::Offload::new(4),
            interval,
            agent.cancel.clone(),
            agent.tasks.clone(),
        );
        Self {
            agent,
            fake,
            service,
            config,
        }
    }

    pub fn base(&self) -> PathBuf {
        self.agent.root.clone()
    }

    pub fn spec(&self, name: &str) -> MountSpec {
        MountSpec {
            name: name.into(),
            account: "myacct".into(),
            container: "data".into(),
            mount_path: self.base().join("mnt").join(name),
            auth: Auth::AccountKey(SecretSource::Given(Secret::from_text(KEY))),
            read_only: false,
            cache_dir: PathBuf::new(),
            cache_max_bytes: 0,
            endpoint: String::new(),
            subdirectory: String::new(),
            origin: Origin::Api,
            owner: None,
        }
    }

    /// Whether no mount requested over the API is on record.
    pub fn no_request_recorded(&self) -> bool {
        self.agent
            .store
            .scan::<serde_json::Value>(super::registry::REQUESTED)
            .unwrap()
            .is_empty()
    }

    /// Stops the service's supervisors and waits for them.
    pub async fn stop(&self) {
        self.agent.cancel.cancel();
        self.agent.tasks.close();
        self.agent.tasks.wait().await;
    }

    /// Restarts the service on the same dir, store and fake (an agent
    /// restart): its events, health, stop token and tasks are new.
    pub async fn restart(self) -> Self {
        self.stop().await;
        let World {
            mut agent, fake, ..
        } = self;
        agent.events = EventBus::new(4096);
        agent.health = Health::new();
        agent.cancel = CancellationToken::new();
        agent.tasks = TaskTracker::new();
        Self::with(agent, fake)
    }
}

/// The states of mount events published so far, after `sub`'s position.
pub(super) fn states(sub: &mut Subscription) -> Vec<MountState> {
    let mut out = Vec::new();
    while let Some(Delivery::Event(e)) = sub.try_next() {
        if let EventPayload::Mount(s) = &e.payload {
            out.push(s.state);
        }
    }
    out
}

/// Waits for the next event on `sub` saying `name` became `state`, and
/// returns that status.
pub(super) async fn wait_for(sub: &mut Subscription, name: &str, state: MountState) -> MountStatus {
    let wait = async {
        loop {
            match sub.next().await {
                Some(Delivery::Event(e)) => {
                    if let EventPayload::Mount(s) = &e.payload
                        && s.name == name
                        && s.state == state
                    {
                        return s.clone();
                    }
                }
                Some(Delivery::Truncated { .. }) => {}
                None => panic!("event bus closed"),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(3600), wait).await {
        Ok(status) => status,
        Err(_) => panic!("{name} never became {state:?}"),
    }
}

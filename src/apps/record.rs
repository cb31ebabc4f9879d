//! An app's record (what the agent keeps in the store and answers with) and
//! its state machine:
//!
//! ```text
//! PENDING -> PULLING -> STARTING -> READY <-> UNHEALTHY
//!    ^                     |          |          |
//!    +---- BACKOFF <-------+----------+----------+   (exit or restart by policy)
//! any -> STOPPED (removed, exited under `never`/`on_failure` with 0)
//! any -> FAILED  (cannot ever start: image missing, port in use, ...)
//! ```
//!
//! Plain data: the rules of who moves an app on live in `supervisor.rs`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::spec::AppSpec;

/// Where an app is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AppState {
    /// Waiting to start (slots, a disk hold, a mount).
    Pending,
    /// Getting its image.
    Pulling,
    /// The container runs; not yet READY (startup).
    Starting,
    /// Healthy: `success_threshold` good probes in a row.
    Ready,
    /// `failure_threshold` bad probes in a row after READY (or the startup
    /// timeout passed).
    Unhealthy,
    /// Waiting before the next restart.
    Backoff,
    /// Not running and not restarted.
    Stopped,
    /// Cannot start (a reason says why).
    Failed,
}

impl AppState {
    /// The name used in events, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Pending => "pending",
            AppState::Pulling => "pulling",
            AppState::Starting => "starting",
            AppState::Ready => "ready",
            AppState::Unhealthy => "unhealthy",
            AppState::Backoff => "backoff",
            AppState::Stopped => "stopped",
            AppState::Failed => "failed",
        }
    }

    /// Every state, for metrics.
    pub const ALL: [AppState; 8] = [
        AppState::Pending,
        AppState::Pulling,
        AppState::Starting,
        AppState::Ready,
        AppState::Unhealthy,
        AppState::Backoff,
        AppState::Stopped,
        AppState::Failed,
    ];
}

/// What the last probe saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// When it ran.
    pub time: SystemTime,
    /// Healthy or not.
    pub healthy: bool,
    /// How long it took, in microseconds.
    pub latency_micros: u64,
    /// The HTTP status, when one came back.
    pub status_code: Option<u32>,
    /// What went wrong ("connection refused", "timed out after 2s",
    /// "status 404 outside 200-399"), empty when healthy.
    pub error: String,
}

/// An app as the agent keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    /// The accepted spec.
    pub spec: AppSpec,
    /// Where it is.
    pub state: AppState,
    /// Why it is there (a human sentence).
    pub reason: String,
    /// Host port per port name, as bound (a picked port is kept here across
    /// restarts of the app and of the agent).
    pub host_ports: BTreeMap<String, u32>,
    /// Restarts so far (not counting the first start or a RestartApp).
    pub restarts: u32,
    /// The last probe.
    pub last_probe: Option<ProbeResult>,
    /// The running container's id, if any.
    pub container_id: String,
    /// The image's id (digest) as the engine resolved it.
    pub image_digest: String,
    /// The last exit status of the container, if it exited.
    pub last_exit: Option<i64>,
    /// Deploy time.
    pub created: SystemTime,
    /// Last state change.
    pub updated: SystemTime,
    /// When the current container started.
    pub started: Option<SystemTime>,
    /// Set when RemoveApp was accepted; a removal cut short by an agent
    /// crash is finished at the next start, never undone.
    pub removing: bool,
    /// Generation of the spec (bumped by each changed deploy), part of the
    /// container name so that a rolling replace can run two at once.
    pub generation: u64,
}

impl AppRecord {
    /// A new app, PENDING.
    pub fn new(spec: AppSpec) -> Self {
        let now = SystemTime::now();
        Self {
            spec,
            state: AppState::Pending,
            reason: "deployed; waiting to start".into(),
            host_ports: BTreeMap::new(),
            restarts: 0,
            last_probe: None,
            container_id: String::new(),
            image_digest: String::new(),
            last_exit: None,
            created: now,
            updated: now,
            started: None,
            removing: false,
            generation: 1,
        }
    }

    /// The app's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Moves to `state` with `reason`; true when something changed.
    pub fn transition(&mut self, state: AppState, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        if self.state == state && self.reason == reason {
            return false;
        }
        self.state = state;
        self.reason = reason;
        self.updated = SystemTime::now();
        true
    }

    /// The endpoints: `http://IP:PORT` per port, and for an inference app
    /// the scoring route as `score`.
    pub fn endpoints(&self) -> Vec<(String, String)> {
        let mut endpoints = Vec::new();
        for port in &self.spec.ports {
            if let Some(host_port) = self.host_ports.get(&port.name) {
                let ip = if port.host_ip == "0.0.0.0" {
                    "127.0.0.1"
                } else {
                    &port.host_ip
                };
                endpoints.push((port.name.clone(), format!("http://{ip}:{host_port}")));
            }
        }
        if self.spec.inference.is_some()
            && let Some((_, base)) = endpoints.first().cloned()
        {
            endpoints.push((
                "score".into(),
                format!("{base}{}", super::spec::INFERENCE_SCORE_PATH),
            ));
        }
        endpoints
    }
}

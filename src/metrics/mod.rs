//! Prometheus metrics on a loopback HTTP address (`[metrics] listen`).
//!
//! Owns the registry and the `GET /metrics` server. It reads the domains and
//! never changes them: counters and histograms are fed by a task subscribed to
//! the [`EventBus`](crate::events::EventBus), gauges are refreshed from the job manager, the disk guard,
//! the mounts, the apps and `/proc/self` just before each scrape, and RPCs are counted
//! by a tower layer on the gRPC servers ([`RpcMetricsLayer`]). The
//! `[metrics]` section is in [`config`].
//!
//! Layout: `series` (the registry and every series), `follow` (the event
//! follower), `scrape` (scrape-time reads), `http` (the server), `rpc` (the
//! gRPC layer).

pub mod config;
mod follow;
mod http;
mod rpc;
mod scrape;
mod series;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::disk::DiskGuard;
use crate::jobs::JobManager;
use crate::mounts::MountService;

pub use http::{BindError, bind, serve};
pub use rpc::{RpcMetricsLayer, RpcMetricsService};

/// Where scrape-time gauges are read from. Absent in unit tests.
#[derive(Clone)]
pub struct Sources {
    /// Jobs by state, queue and slots.
    pub jobs: JobManager,
    /// Watched filesystems.
    pub disk: DiskGuard,
    /// Managed mounts.
    pub mounts: MountService,
    /// Apps by state and restarts.
    pub apps: crate::apps::AppManager,
}

/// The agent's metrics. Cheap to clone; shared by the event task, the RPC
/// layer and the HTTP server.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<series::Inner>,
}

impl Metrics {
    /// A registry with every series; `sources` feeds the scrape-time gauges.
    pub fn new(sources: Option<Sources>) -> Self {
        Self {
            inner: Arc::new(series::Inner::new(sources)),
        }
    }

    /// Records one health probe of `app` that took `seconds` (the apps'
    /// probe observer calls it).
    pub fn observe_probe(&self, app: &str, seconds: f64) {
        self.inner
            .app_probe_latency
            .get_or_create(&series::AppLabel {
                app: app.to_owned(),
            })
            .observe(seconds);
    }

    /// Refreshes the scrape-time gauges and renders the text format.
    pub fn render(&self) -> String {
        self.refresh();
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in
        // a label, and an empty reply is the honest answer to it.
        if prometheus_client::encoding::text::encode(&mut out, &self.inner.registry).is_err() {
            out.clear();
        }
        out
    }
}

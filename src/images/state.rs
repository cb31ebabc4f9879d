//! The images domain's in-memory state: the pulls in flight (one per
//! canonical reference: single flight), what is known of each wanted
//! image's presence, the jobs' latest wants, and each job's pull outcome.
//!
//! Plain data under the service's one lock: no I/O, no awaits. The rules
//! of who changes what live in `service.rs` (wants, API) and `pulls.rs`
//! (a flight's task).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::progress::PullProgress;
use super::reference::ImageRef;
use crate::jobs::{ImageWant, RegistryAuth};

/// What is known of an image's presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Presence {
    /// Being looked up.
    Checking,
    /// Not local.
    Absent,
    /// Local, as this image id.
    Local(String),
}

/// One pull, shared by everyone who needs the image.
pub(super) struct Flight {
    /// Tells this flight apart from a later one of the same image.
    pub(super) id: u64,
    /// The image as first asked for.
    pub(super) image: ImageRef,
    /// Its progress; every subscriber sees the same.
    pub(super) progress: Arc<watch::Sender<PullProgress>>,
    /// Jobs that wait for it.
    pub(super) jobs: BTreeSet<String>,
    /// `PullImage` callers that wait for it.
    pub(super) requests: usize,
    /// Fired when nobody needs it any more (or the agent stops).
    pub(super) cancel: CancellationToken,
    /// The first job's own credential, if it passed one.
    pub(super) auth: Option<RegistryAuth>,
    /// Holds one of the `images.max_concurrent_pulls` slots.
    pub(super) started: bool,
    /// Wakes its task when it gets a slot.
    pub(super) slot: Arc<tokio::sync::Notify>,
}

impl Flight {
    /// Who needs it, as progress reports name them.
    pub(super) fn needed_by(&self) -> Vec<String> {
        let mut needed: Vec<String> = self.jobs.iter().cloned().collect();
        if self.requests > 0 {
            needed.push("api".into());
        }
        needed
    }

    /// Publishes the needers in the progress.
    pub(super) fn announce_needers(&self) {
        let needed = self.needed_by();
        self.progress.send_if_modified(|p| {
            let changed = p.needed_by != needed;
            p.needed_by = needed;
            changed
        });
    }
}

/// Everything the service knows in memory, behind one lock.
#[derive(Default)]
pub(super) struct State {
    /// Pulls by canonical reference.
    pub(super) flights: HashMap<String, Flight>,
    /// Presence by canonical reference.
    pub(super) local: HashMap<String, Presence>,
    /// Parsed references of the images the jobs want (a reference that does
    /// not parse carries the reason).
    pub(super) refs: HashMap<String, Result<ImageRef, String>>,
    /// The jobs' latest wants.
    pub(super) wants: Vec<ImageWant>,
    /// Jobs whose pull failed, with the reason (until they stop wanting).
    pub(super) failed: HashMap<String, String>,
    /// Jobs whose own pull is done (`pull_policy = "always"`).
    pub(super) pulled_for: HashSet<String>,
    /// The next flight's id.
    pub(super) next_flight: u64,
}

impl State {
    /// The parsed reference of `image` (cached).
    pub(super) fn parsed(&mut self, image: &str) -> Result<ImageRef, String> {
        self.refs
            .entry(image.to_owned())
            .or_insert_with(|| ImageRef::parse(image).map_err(|e| e.to_string()))
            .clone()
    }

    /// Flights holding a slot.
    pub(super) fn running(&self) -> usize {
        self.flights.values().filter(|f| f.started).count()
    }

    /// Gives free slots to flights that wait for one (`PullImage` callers),
    /// oldest first.
    pub(super) fn start_waiting(&mut self, max: usize) {
        let free = max.saturating_sub(self.running());
        let mut waiting: Vec<&mut Flight> =
            self.flights.values_mut().filter(|f| !f.started).collect();
        waiting.sort_by_key(|f| f.id);
        for flight in waiting.into_iter().take(free) {
            flight.started = true;
            flight.slot.notify_one();
        }
    }

    /// Whether a flight waits for a slot.
    pub(super) fn any_waiting(&self) -> bool {
        self.flights.values().any(|f| !f.started)
    }

    /// The jobs whose wanted image's canonical reference passes `pick`.
    fn jobs_where(&self, pick: impl Fn(&str) -> bool) -> Vec<String> {
        self.wants
            .iter()
            .filter(|w| {
                self.refs
                    .get(&w.image)
                    .and_then(|r| r.as_ref().ok())
                    .is_some_and(|r| pick(&r.canonical()))
            })
            .map(|w| w.job.clone())
            .collect()
    }

    /// The jobs that want the image with canonical reference `key` (queued
    /// or started).
    pub(super) fn jobs_wanting(&self, key: &str) -> Vec<String> {
        self.jobs_where(|canonical| canonical == key)
    }

    /// The jobs that want image id `id` (by the presence of their image).
    pub(super) fn jobs_on_image(&self, id: &str) -> Vec<String> {
        let local = Presence::Local(id.to_owned());
        self.jobs_where(|canonical| self.local.get(canonical) == Some(&local))
    }
}

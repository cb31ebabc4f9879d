//! A pull's progress as everyone who needs the image sees it
//! ([`PullProgress`]), and how the engine's progress lines add up to it:
//! per layer, in bytes (the manifest's sizes when known, so the total is
//! right from the start) and in layers done.

use std::time::SystemTime;

use super::FailureKind;
use super::engine::PullEvent;
use super::registry::Manifest;
use crate::jobs::{PullPhase, PullView};

/// One layer of a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerProgress {
    /// Short id (12 hex digits).
    pub id: String,
    /// The engine's latest word for it.
    pub status: String,
    /// Compressed bytes downloaded.
    pub current: u64,
    /// Compressed size (0 while unknown).
    pub total: u64,
    /// Local.
    pub done: bool,
}

/// A pull, as its callers and the jobs waiting for it see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullProgress {
    /// The reference as first asked for.
    pub image: String,
    /// Phase, reason, bytes and layers.
    pub view: PullView,
    /// Each layer in the order the engine named them.
    pub layers: Vec<LayerProgress>,
    /// Once done: `repo@sha256:...` (or the image id).
    pub digest: String,
    /// Who needs it: job ids, and "api" for `PullImage` callers.
    pub needed_by: Vec<String>,
    /// When the pull began.
    pub started_at: SystemTime,
    /// Once failed: what kind of failure (for the API's status code).
    pub failure: Option<FailureKind>,
}

impl PullProgress {
    /// A pull of `image` that has not begun.
    pub fn new(image: &str, phase: PullPhase, reason: impl Into<String>) -> Self {
        Self {
            image: image.to_owned(),
            view: PullView {
                phase,
                reason: reason.into(),
                bytes_done: 0,
                bytes_total: 0,
                layers_done: 0,
                layers_total: 0,
                needed_bytes: 0,
            },
            layers: Vec::new(),
            digest: String::new(),
            needed_by: Vec::new(),
            started_at: SystemTime::now(),
            failure: None,
        }
    }

    /// Takes the layers and their sizes from the manifest.
    pub fn set_manifest(&mut self, manifest: &Manifest, needed_bytes: u64) {
        self.layers = manifest
            .layers
            .iter()
            .map(|l| LayerProgress {
                id: l.short_id().to_owned(),
                status: "Waiting".into(),
                current: 0,
                total: l.size,
                done: false,
            })
            .collect();
        self.view.needed_bytes = needed_bytes;
        self.tally();
    }

    /// Applies one line of the engine's progress.
    pub fn apply(&mut self, event: &PullEvent) {
        if event.layer.is_empty() || !is_layer_status(&event.status) {
            return;
        }
        let index = match self.layers.iter().position(|l| l.id == event.layer) {
            Some(index) => index,
            None => {
                self.layers.push(LayerProgress {
                    id: event.layer.clone(),
                    status: String::new(),
                    current: 0,
                    total: 0,
                    done: false,
                });
                self.layers.len() - 1
            }
        };
        let layer = &mut self.layers[index];
        layer.status = event.status.clone();
        match event.status.as_str() {
            "Downloading" => {
                layer.current = event.current;
                if event.total > 0 {
                    layer.total = event.total;
                }
            }
            "Verifying Checksum" | "Download complete" | "Extracting" => {
                layer.current = layer.total.max(layer.current);
            }
            "Pull complete" | "Already exists" => {
                layer.current = layer.total.max(layer.current);
                layer.done = true;
            }
            _ => {}
        }
        self.tally();
    }

    fn tally(&mut self) {
        let view = &mut self.view;
        view.layers_total = u32::try_from(self.layers.len()).unwrap_or(u32::MAX);
        view.layers_done =
            u32::try_from(self.layers.iter().filter(|l| l.done).count()).unwrap_or(u32::MAX);
        view.bytes_total = self.layers.iter().map(|l| l.total).sum();
        view.bytes_done = self
            .layers
            .iter()
            .map(|l| {
                if l.total > 0 {
                    l.current.min(l.total)
                } else {
                    l.current
                }
            })
            .sum();
    }
}

/// Whether a status line is about a layer (not "Pulling from x", "Digest:",
/// "Status: ...", which carry the repository or tag in their id).
fn is_layer_status(status: &str) -> bool {
    matches!(
        status,
        "Pulling fs layer"
            | "Waiting"
            | "Downloading"
            | "Verifying Checksum"
            | "Download complete"
            | "Extracting"
            | "Pull complete"
            | "Already exists"
            | "Retrying"
    ) || status.starts_with("Retrying in")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::registry::Layer;

    fn event(layer: &str, status: &str, current: u64, total: u64) -> PullEvent {
        PullEvent {
            layer: layer.into(),
            status: status.into(),
            current,
            total,
        }
    }

    #[test]
    fn engine_lines_add_up_per_layer_and_in_total() {
        let mut p = PullProgress::new("r/x:1", PullPhase::Pulling, "");
        p.set_manifest(
            &Manifest {
                digest: String::new(),
                layers: vec![
                    Layer {
                        digest: format!("sha256:aaaaaaaaaaaa{}", "0".repeat(52)),
                        size: 100,
                    },
                    Layer {
                        digest: format!("sha256:bbbbbbbbbbbb{}", "0".repeat(52)),
                        size: 300,
                    },
                ],
            },
            1200,
        );
        assert_eq!((p.view.bytes_total, p.view.layers_total), (400, 2));
        p.apply(&event("1", "Pulling from r/x", 0, 0));
        p.apply(&event("aaaaaaaaaaaa", "Pulling fs layer", 0, 0));
        p.apply(&event("bbbbbbbbbbbb", "Downloading", 150, 300));
        assert_eq!(p.view.bytes_done, 150);
        p.apply(&event("aaaaaaaaaaaa", "Already exists", 0, 0));
        assert_eq!((p.view.bytes_done, p.view.layers_done), (250, 1));
        p.apply(&event("bbbbbbbbbbbb", "Extracting", 10, 900));
        p.apply(&event("bbbbbbbbbbbb", "Pull complete", 0, 0));
        assert_eq!((p.view.bytes_done, p.view.layers_done), (400, 2));
        assert_eq!(p.layers.len(), 2, "the image line is not a layer");
        p.apply(&event("", "Digest: sha256:1", 0, 0));
        assert_eq!(p.view.needed_bytes, 1200);
    }

    #[test]
    fn without_a_manifest_layers_are_learnt_from_the_engine() {
        let mut p = PullProgress::new("r/x:1", PullPhase::Pulling, "");
        p.apply(&event("cccccccccccc", "Downloading", 10, 50));
        p.apply(&event("dddddddddddd", "Downloading", 5, 20));
        assert_eq!((p.view.bytes_done, p.view.bytes_total), (15, 70));
        assert_eq!(p.view.layers_total, 2);
    }
}

//! The disk guard's image steps, owned here because only this domain knows
//! which images the agent pulled:
//! - `dangling_images`: untagged images that the agent pulled (a tag it
//!   pulled again moved on) and no container uses;
//! - `unused_images`: images the agent pulled that no queued or running job
//!   needs, no pull is refreshing, `jobs.keep_images` does not protect and
//!   no container uses, least recently used first, until the floor plus the
//!   margin is back.
//!
//! Never an image the agent did not pull, never a reference someone else
//! added to one it did (such an image is the user's too and stays), never
//! forced.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::SystemTime;

use async_trait::async_trait;

use super::reference::ImageRef;
use super::service::ImageService;
use crate::disk::reclaim::{Freed, ReclaimError, ReclaimStep, Removals};
use crate::jobs::engine::EngineError;

/// An image a step may remove.
#[derive(Debug, Clone)]
struct Candidate {
    id: String,
    /// The references to remove (the agent's); none for a dangling image.
    references: Vec<String>,
    size: u64,
    last_used: Option<SystemTime>,
}

/// Whether `jobs.keep_images` protects an image with these tags and
/// digests: an entry naming a tag or digest protects exactly it, an entry
/// naming a repository protects all of its tags.
pub(super) fn kept(keep: &[String], names: &[String]) -> bool {
    keep.iter()
        .any(|entry| names.iter().any(|name| keep_matches(entry, name)))
}

fn keep_matches(entry: &str, name: &str) -> bool {
    let (Ok(wanted), Ok(have)) = (ImageRef::parse(entry), ImageRef::parse(name)) else {
        return entry == name;
    };
    let last = entry.rsplit('/').next().unwrap_or(entry);
    if last.contains(':') || last.contains('@') {
        wanted.canonical() == have.canonical()
    } else {
        wanted.registry() == have.registry() && wanted.repository() == have.repository()
    }
}

impl ImageService {
    /// The images the agent pulled that may go: `dangling` picks the
    /// untagged ones, else the tagged ones; least recently used first.
    async fn candidates(&self, dangling: bool) -> Result<Vec<Candidate>, ReclaimError> {
        let images = self.inner.engine.list().await?;
        let in_use: HashSet<String> = self.inner.engine.in_use().await?;
        let keep = self.inner.keep.borrow().clone();
        let mut candidates: Vec<Candidate> = images
            .into_iter()
            .filter(|image| image.repo_tags.is_empty() == dangling)
            .filter(|image| !in_use.contains(&image.id))
            .filter_map(|image| {
                let record = self.inner.records.get(&image.id)?;
                if !record.pulled_by_agent {
                    return None;
                }
                // A tag the agent did not pull makes the image the user's too.
                if image
                    .repo_tags
                    .iter()
                    .any(|tag| !record.references.contains(tag))
                {
                    return None;
                }
                let mut names = image.repo_tags.clone();
                names.extend(image.repo_digests.iter().cloned());
                if kept(&keep, &names) {
                    return None;
                }
                Some(Candidate {
                    references: image.repo_tags,
                    size: image.size_bytes,
                    last_used: record.last_used.or(record.pulled_at),
                    id: image.id,
                })
            })
            .collect();
        candidates.sort_by_key(|c| c.last_used);
        Ok(candidates)
    }

    /// Whether a job or a pull needs image `candidate` now.
    fn needed(&self, candidate: &Candidate) -> bool {
        let mut state = self.lock();
        if !state.jobs_on_image(&candidate.id).is_empty() {
            return true;
        }
        candidate.references.iter().any(|reference| {
            state.parsed(reference).is_ok_and(|r| {
                let key = r.canonical();
                state.flights.contains_key(&key) || !state.jobs_wanting(&key).is_empty()
            })
        })
    }

    /// Removes one candidate: its references (the image goes with the
    /// last), or the image itself when it has none. Returns the bytes freed.
    async fn remove_candidate(&self, candidate: &Candidate) -> Result<u64, EngineError> {
        let mut deleted = false;
        if candidate.references.is_empty() {
            deleted = self.inner.engine.remove(&candidate.id).await?.deleted;
        }
        for reference in &candidate.references {
            match self.inner.engine.remove(reference).await {
                Ok(removed) => deleted |= removed.deleted,
                Err(EngineError::NotFound { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        let reference = candidate.references.first().cloned().unwrap_or_default();
        self.gone(&candidate.id, &reference, deleted).await;
        if deleted {
            tracing::info!(image = %candidate.id, references = ?candidate.references, bytes = candidate.size, "reclaim: removed an image the agent pulled");
        }
        Ok(if deleted { candidate.size } else { 0 })
    }

    /// Whether removal goes on after `freed` bytes.
    async fn more(&self, until: Until, freed: u64) -> bool {
        match until {
            Until::All => true,
            Until::Freed(target) => freed < target,
            // True when it cannot be measured: the guard asked.
            Until::AboveFloor => self
                .inner
                .space
                .measure()
                .await
                .is_none_or(|space| space.shortfall(0) > 0),
        }
    }

    /// Removes candidates, least recently used first, until `until`.
    async fn remove_while(&self, candidates: Vec<Candidate>, until: Until) -> Removals {
        let mut removals = Removals::default();
        let mut freed = 0;
        for candidate in candidates {
            if !self.more(until, freed).await {
                break;
            }
            if self.needed(&candidate) {
                continue;
            }
            match self.remove_candidate(&candidate).await {
                Ok(bytes) => {
                    freed += bytes;
                    if bytes > 0 {
                        removals.removed(bytes);
                    }
                }
                // Taken into use since it was listed: not a failure.
                Err(EngineError::Api { message, .. }) if message.contains("conflict") => {}
                Err(error) => removals.failed(error),
            }
        }
        removals
    }

    /// Removes unused images the agent pulled until `target` bytes are
    /// freed or the space where images land needs no more (a pull waits for
    /// space). Best effort: failures are logged.
    pub(super) async fn reclaim_unused(&self, target: u64) -> Freed {
        let candidates = match self.candidates(false).await {
            Ok(candidates) => candidates,
            Err(error) => {
                tracing::warn!(%error, "cannot list the images to reclaim");
                return Freed::default();
            }
        };
        let removals = self.remove_while(candidates, Until::Freed(target)).await;
        match removals.finish() {
            Ok(freed) => freed,
            Err(ReclaimError::Partial { freed, first, .. }) => {
                tracing::warn!(error = %first, "some unused images could not be removed");
                freed
            }
            Err(error) => {
                tracing::warn!(%error, "cannot reclaim unused images");
                Freed::default()
            }
        }
    }
}

/// How far a removal goes.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// Every candidate.
    All,
    /// This many bytes freed.
    Freed(u64),
    /// The floor plus the margin back where images land.
    AboveFloor,
}

/// Reclaim step `dangling_images`: untagged images the agent pulled.
pub struct DanglingImages {
    images: ImageService,
}

impl DanglingImages {
    /// The step.
    pub fn new(images: ImageService) -> Self {
        Self { images }
    }
}

#[async_trait]
impl ReclaimStep for DanglingImages {
    fn name(&self) -> &'static str {
        "dangling_images"
    }

    async fn estimate(&self) -> Result<Freed, ReclaimError> {
        let candidates = self.images.candidates(true).await?;
        Ok(candidates.iter().map(|c| Freed::item(c.size)).sum())
    }

    async fn run(&self) -> Result<Freed, ReclaimError> {
        let candidates = self.images.candidates(true).await?;
        // Dangling images serve nobody: all go, not only what the floor needs.
        self.images
            .remove_while(candidates, Until::All)
            .await
            .finish()
    }

    async fn location(&self) -> Option<PathBuf> {
        self.images.inner.space.location().await
    }
}

/// Reclaim step `unused_images`: images the agent pulled that nothing needs.
pub struct UnusedImages {
    images: ImageService,
}

impl UnusedImages {
    /// The step.
    pub fn new(images: ImageService) -> Self {
        Self { images }
    }
}

#[async_trait]
impl ReclaimStep for UnusedImages {
    fn name(&self) -> &'static str {
        "unused_images"
    }

    async fn estimate(&self) -> Result<Freed, ReclaimError> {
        let images = &self.images;
        let candidates = images.candidates(false).await?;
        Ok(candidates
            .iter()
            .filter(|c| !images.needed(c))
            .map(|c| Freed::item(c.size))
            .sum())
    }

    async fn run(&self) -> Result<Freed, ReclaimError> {
        let images = &self.images;
        let candidates = images.candidates(false).await?;
        images
            .remove_while(candidates, Until::AboveFloor)
            .await
            .finish()
    }

    async fn location(&self) -> Option<PathBuf> {
        self.images.inner.space.location().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_entries_name_a_tag_a_digest_or_a_repository() {
        let names = ["registry.example/team/env:1".to_owned()];
        assert!(kept(&["registry.example/team/env".into()], &names));
        assert!(kept(&["registry.example/team/env:1".into()], &names));
        assert!(!kept(&["registry.example/team/env:2".into()], &names));
        assert!(!kept(&["registry.example/team/other".into()], &names));
        assert!(kept(&["busybox".into()], &["busybox:latest".into()]));
        assert!(!kept(&[], &names));
    }
}

//! How a job reaches storage: the narrow trait to the mounts domain
//! ([`MountResolver`]), and the three moments a job's mounts are looked at:
//! at submit (every managed mount known, every host path under an allowed
//! root), just before its container is created (each mount resolved to a
//! bind, or a reason to wait), and after it failed (which managed mounts
//! died under it).
//!
//! Knows nothing of the manager's state; must not touch the mounts domain's
//! internals (only the trait it implements).

use std::path::PathBuf;

use super::engine::Bind;
use super::spec::{self, JobMount, JobSpec, MountSource, SpecError};

/// How a job refers to a managed mount, as the mounts module answers.
#[derive(Debug, Clone, PartialEq)]
pub enum MountResolution {
    /// No mount with that name.
    Unknown,
    /// Known but not usable now (the job waits).
    Unavailable(String),
    /// Mounted at this host path.
    Ready(PathBuf),
}

/// Looks managed mounts up by name.
#[async_trait::async_trait]
pub trait MountResolver: Send + Sync + 'static {
    /// The mount's state as last seen. Must answer from memory (it is
    /// called while the scheduler holds its lock).
    fn resolve(&self, name: &str) -> MountResolution;

    /// Checks, just before a job's container is created, that the mount
    /// still answers: it may have gone stale since its last health check,
    /// and a job started on a dead mount fails at once (and the next one
    /// too) instead of waiting for the repair.
    async fn verify(&self, name: &str) -> MountResolution {
        self.resolve(name)
    }

    /// How many times the mount was repaired (remounted) so far; a change
    /// while a job ran means the job saw it die.
    fn repairs(&self, _name: &str) -> u32 {
        0
    }
}

/// A resolver for a build without managed mounts: every name is unknown.
pub struct NoManagedMounts;

impl MountResolver for NoManagedMounts {
    fn resolve(&self, _: &str) -> MountResolution {
        MountResolution::Unknown
    }
}

/// At submit: host paths must resolve under an allowed root; managed mounts
/// must exist (they need not be mounted yet: the job waits for them).
pub(super) async fn check(
    resolver: &dyn MountResolver,
    spec: &JobSpec,
    roots: &[PathBuf],
) -> Result<(), SpecError> {
    for (i, mount) in spec.mounts.iter().enumerate() {
        match &mount.source {
            MountSource::Managed(name) => {
                if resolver.resolve(name) == MountResolution::Unknown {
                    return Err(SpecError {
                        field: format!("mounts[{i}].managed"),
                        problem: format!("no managed mount named {name:?}"),
                    });
                }
            }
            MountSource::HostPath(path) => {
                let field = format!("mounts[{i}].host_path");
                let path = path.clone();
                let roots = roots.to_vec();
                tokio::task::spawn_blocking(move || spec::confine_host_path(&field, &path, &roots))
                    .await
                    .map_err(|e| SpecError {
                        field: format!("mounts[{i}].host_path"),
                        problem: format!("cannot be checked: {e}"),
                    })??;
            }
        }
    }
    Ok(())
}

/// Just before the container is created: each mount as a bind, managed
/// mounts checked once more (see [`MountResolver::verify`]) and host paths
/// resolved again (the tree may have changed since submit). `Err` is the
/// reason the job waits in the queue.
pub(super) async fn binds(
    resolver: &dyn MountResolver,
    mounts: &[JobMount],
    roots: &[PathBuf],
) -> Result<Vec<Bind>, String> {
    let mut binds = Vec::new();
    for (i, mount) in mounts.iter().enumerate() {
        let source = match &mount.source {
            MountSource::Managed(name) => match resolver.verify(name).await {
                MountResolution::Ready(path) => path,
                MountResolution::Unavailable(why) => {
                    return Err(format!("waiting for mount {name}: {why}"));
                }
                MountResolution::Unknown => {
                    return Err(format!("waiting: mount {name} is not known"));
                }
            },
            MountSource::HostPath(path) => {
                let (field, path, roots) = (
                    format!("mounts[{i}].host_path"),
                    path.clone(),
                    roots.to_vec(),
                );
                match tokio::task::spawn_blocking(move || {
                    spec::confine_host_path(&field, &path, &roots)
                })
                .await
                {
                    Ok(Ok(real)) => real,
                    Ok(Err(e)) => return Err(format!("waiting: {e}")),
                    Err(e) => return Err(format!("waiting: {e}")),
                }
            }
        };
        binds.push(Bind {
            source,
            target: mount.container_path.clone(),
            read_only: mount.read_only,
        });
    }
    Ok(binds)
}

/// The repair counts of a job's managed mounts, taken when it starts.
pub(super) fn repairs(resolver: &dyn MountResolver, spec: &JobSpec) -> Vec<(String, u32)> {
    spec.mounts
        .iter()
        .filter_map(|m| match &m.source {
            MountSource::Managed(name) => Some((name.clone(), resolver.repairs(name))),
            MountSource::HostPath(_) => None,
        })
        .collect()
}

/// For a job that failed: which of its managed mounts died under it (dead
/// now, or repaired since it started), so that its reason says why rather
/// than only an exit status. Checking a dead mount also wakes its repair.
pub(super) async fn deaths(
    resolver: &dyn MountResolver,
    repairs_at_start: &[(String, u32)],
) -> Vec<String> {
    let mut notes = Vec::new();
    for (name, before) in repairs_at_start {
        match resolver.verify(name).await {
            MountResolution::Ready(_) if resolver.repairs(name) == *before => {}
            MountResolution::Ready(_) => notes.push(format!(
                "mount {name} died and was repaired while the job ran"
            )),
            MountResolution::Unavailable(why) => {
                notes.push(format!("mount {name} died while the job ran: {why}"))
            }
            MountResolution::Unknown => {
                notes.push(format!("mount {name} was removed while the job ran"))
            }
        }
    }
    notes
}

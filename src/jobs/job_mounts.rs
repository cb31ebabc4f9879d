//! How a job reaches storage: the narrow trait to the mounts domain
//! ([`MountResolver`]), and the three moments a job's mounts are looked at:
//! at submit (every managed mount known, every host path under an allowed
//! root), just before its container is created (each mount resolved to a
//! bind, or a reason to wait), and after it failed (which managed mounts
//! died under it).
//!
//! A host path is opened once and held ([`crate::paths::held`]); Docker gets
//! its real path only when no user but root can change it or any of its
//! ancestors. Otherwise (a user's own directory) the held object is first
//! bind-mounted into the root-only staging dir (`<agent.runtime_dir>/
//! staging/jobs`, [`crate::paths::staging`]) and Docker binds that entry: a
//! symlink swapped in after the check cannot redirect the bind. The entries
//! (`<job id>.<attempt>.<index>`) go when the job ends or goes back to the
//! queue, and at start-up for jobs that no longer run ([`tidy_staged`]).
//!
//! Host paths are opened through the agent's shared [`Offload`] (one call at a
//! time per filesystem, [`HOST_PATH_TIMEOUT`] each, a capped number stuck): a
//! path on a filesystem that never answers costs one stuck thread, never the
//! whole blocking pool, and later jobs naming it are answered at once.
//!
//! Knows nothing of the manager's state; must not touch the mounts domain's
//! internals (only the trait it implements).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::engine::Bind;
use super::spec::{self, JobMount, JobSpec, MountSource, SpecError};
use crate::paths::held::Held;
use crate::paths::offload::{Offload, OffloadError};
use crate::paths::privileged::Privileged;
use crate::paths::staging::Staging;

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

/// How long opening (and staging) one host path may take.
pub const HOST_PATH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a spec's mounts are refused at submit.
#[derive(Debug)]
pub(super) enum Refusal {
    /// A rule is broken.
    Spec(SpecError),
    /// A host path's filesystem does not answer.
    Unanswered {
        /// `mounts[i].host_path`.
        field: String,
        /// Why.
        source: OffloadError,
    },
}

impl From<SpecError> for Refusal {
    fn from(error: SpecError) -> Self {
        Self::Spec(error)
    }
}

/// At submit: host paths must resolve under an allowed root; managed mounts
/// must exist (they need not be mounted yet: the job waits for them).
pub(super) async fn check(
    resolver: &dyn MountResolver,
    offload: &Offload,
    spec: &JobSpec,
    roots: &[PathBuf],
) -> Result<(), Refusal> {
    for (i, mount) in spec.mounts.iter().enumerate() {
        match &mount.source {
            MountSource::Managed(name) => {
                if resolver.resolve(name) == MountResolution::Unknown {
                    return Err(Refusal::Spec(SpecError {
                        field: format!("mounts[{i}].managed"),
                        problem: format!("no managed mount named {name:?}"),
                    }));
                }
            }
            MountSource::HostPath(path) => {
                let field = format!("mounts[{i}].host_path");
                let (name, held, roots) = (field.clone(), path.clone(), roots.to_vec());
                offload
                    .run(path, HOST_PATH_TIMEOUT, move || {
                        spec::confine_host_path(&name, &held, &roots).map(drop)
                    })
                    .await
                    .map_err(|source| Refusal::Unanswered { field, source })??;
            }
        }
    }
    Ok(())
}

/// Just before the container is created: each mount as a bind, managed
/// mounts checked once more (see [`MountResolver::verify`]) and host paths
/// opened again (the tree may have changed since submit) and handed over as
/// a path only root can change (staged when needed, see the module doc).
/// `Err` is the reason the job waits in the queue; entries staged by then
/// are for the caller to [`release`].
pub(super) async fn binds(
    resolver: &dyn MountResolver,
    offload: &Offload,
    job_id: &str,
    mounts: &[JobMount],
    roots: &[PathBuf],
    staging_dir: Option<&Path>,
) -> Result<Vec<Bind>, String> {
    let attempt = uuid::Uuid::new_v4().simple().to_string();
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
                let field = format!("mounts[{i}].host_path");
                let (name, held, roots) = (field.clone(), path.clone(), roots.to_vec());
                let entry = format!("{job_id}.{attempt}.{i}");
                let staging_dir = staging_dir.map(Path::to_owned);
                match offload
                    .run(path, HOST_PATH_TIMEOUT, move || {
                        let held = spec::confine_host_path(&name, &held, &roots)
                            .map_err(|e| e.to_string())?;
                        hand_over(&name, &held, &entry, staging_dir.as_deref())
                    })
                    .await
                {
                    Ok(Ok(source)) => source,
                    Ok(Err(e)) => return Err(format!("waiting: {e}")),
                    Err(e) => return Err(format!("waiting: {field}: {e}")),
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

/// The path Docker gets for a held host path: its own when only root can
/// change it, else a staging entry bound from the descriptor. Blocking.
fn hand_over(
    field: &str,
    held: &Held,
    entry: &str,
    staging_dir: Option<&Path>,
) -> Result<PathBuf, String> {
    let path = held.path().display();
    let who = held
        .changeable()
        .map_err(|e| format!("{field}: {path} cannot be checked: {e}"))?;
    let Some(who) = who else {
        return Ok(held.path().to_owned());
    };
    let Some(dir) = staging_dir else {
        return Err(format!(
            "{field}: {path} can be changed by a user other than root ({who}), \
             and this agent has no staging dir to bind it from"
        ));
    };
    Staging::prepare(dir)
        .and_then(|staging| Privileged::detect().bind(&staging, entry, held))
        .map_err(|e| {
            format!(
                "{field}: {path} can be changed by a user other than root ({who}) \
                 and cannot be staged: {e}"
            )
        })
}

/// Takes off a job's staging entries (every attempt's). Never fails: what
/// cannot go now is left for [`tidy_staged`] at the next start.
pub(super) async fn release(staging_dir: Option<&Path>, job_id: &str) {
    let Some(dir) = staging_dir.map(Path::to_owned) else {
        return;
    };
    let job = job_id.to_owned();
    let outcome = tokio::task::spawn_blocking(move || {
        if std::fs::symlink_metadata(&dir).is_err() {
            return Ok(());
        }
        let staging = Staging::prepare(&dir)?;
        let privileged = Privileged::detect();
        for name in staging.names()? {
            if job_of(&name) == Some(job.as_str()) {
                privileged.release(&staging, &name)?;
            }
        }
        Ok::<_, crate::paths::staging::StagingError>(())
    })
    .await;
    if let Ok(Err(error)) = outcome {
        tracing::warn!(job = job_id, %error, "cannot release the job's staged binds");
    }
}

/// At start-up: takes off the staging entries of every job that is not
/// `live` (starting or running): what a crash left behind.
pub(super) async fn tidy_staged(staging_dir: Option<&Path>, live: HashSet<String>) {
    let Some(dir) = staging_dir.map(Path::to_owned) else {
        return;
    };
    let outcome = tokio::task::spawn_blocking(move || {
        if std::fs::symlink_metadata(&dir).is_err() {
            return Ok(0);
        }
        let staging = Staging::prepare(&dir)?;
        let privileged = Privileged::detect();
        let mut released = 0;
        for name in staging.names()? {
            if !job_of(&name).is_some_and(|job| live.contains(job)) {
                privileged.release(&staging, &name)?;
                released += 1;
            }
        }
        Ok::<_, crate::paths::staging::StagingError>(released)
    })
    .await;
    match outcome {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(
            entries = n,
            "released staged binds of jobs that no longer run"
        ),
        Ok(Err(error)) => tracing::warn!(%error, "cannot tidy the staged binds of jobs"),
        Err(error) => tracing::warn!(%error, "cannot tidy the staged binds of jobs"),
    }
}

/// The job of a staging entry `<job id>.<attempt>.<index>` (ids may hold dots).
fn job_of(entry: &str) -> Option<&str> {
    entry.rsplitn(3, '.').nth(2)
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

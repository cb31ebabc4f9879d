//! One job's task, from the moment the dispatcher reserved its slots to
//! the removal of its container: record the intent, create and start the
//! container (or start or adopt the one recovery found), supervise it
//! (timeout, cancel, the engine going away), stop it, capture its output
//! ([`super::capture`]), and record the final state with its reason before
//! freeing the slots.
//!
//! Only this task moves a started job on (see the invariants in
//! [`super::manager`]); it goes back to the queue only while no container
//! exists.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::engine::{ContainerSpec, EngineError};
use super::job_images::ResolveError;
use super::job_mounts;
use super::manager::{JobManager, MAX_BACKOFF};
use super::record::{JobRecord, JobState};
use super::{LABEL_INSTANCE, LABEL_JOB};

/// Looks at a SIGKILLed, memory-limited container for the engine's OOM flag,
/// and how far apart (see `oom_killed`): 3 s in all, as 1 s was once too
/// short on a loaded machine (cgroup v1, Docker 20.10).
const OOM_LOOKS: u32 = 15;
const OOM_LOOK_INTERVAL: Duration = Duration::from_millis(200);
/// How long the final state waits for the output capture to drain.
const CAPTURE_DRAIN: Duration = Duration::from_secs(60);

/// How a job's task begins.
pub(super) enum Launch {
    /// Create and start a new container.
    Fresh,
    /// Start a container that was created but never started.
    StartExisting(String),
    /// Supervise a container that already ran or runs.
    Adopt(String),
}

/// How supervision ended.
enum Outcome {
    Exited(i64),
    Lost,
    ShuttingDown,
}

impl JobManager {
    /// Drives one job from its launch to its final state and the removal of
    /// its container.
    pub(super) async fn run(self, id: String, launch: Launch, cancel: CancellationToken) {
        let container = match launch {
            Launch::Fresh => match self.create_and_start(&id, &cancel).await {
                Some(container) => container,
                None => return,
            },
            Launch::StartExisting(container) => {
                if cancel.is_cancelled() || self.cancel_requested(&id) {
                    self.cancelled_before_start(&id, &container).await;
                    return;
                }
                if let Err(error) = self.inner.engine.start(&container).await {
                    self.fail_before_running(
                        &id,
                        &container,
                        format!("cannot start the container: {error}"),
                    )
                    .await;
                    return;
                }
                container
            }
            Launch::Adopt(container) => container,
        };
        let running = self.transition(&id, JobState::Running, "running", |r| {
            r.container_id = container.clone()
        });
        if let Some(record) = running {
            if !self.persist_until_done(&id).await {
                return;
            }
            self.publish(&record);
        }
        self.supervise(&id, &container, &cancel).await;
    }

    /// Records the intent, then creates and starts the container. `None`
    /// when the job ended or went back to the queue instead.
    async fn create_and_start(&self, id: &str, cancel: &CancellationToken) -> Option<String> {
        let image = self.get(id).ok()?.record.spec.image;
        // The digest is recorded with the intent, before the container
        // exists: what the job ran is known even if the agent dies next.
        let resolved = match self.inner.images.resolve(id, &image).await {
            Ok(resolved) => resolved,
            Err(ResolveError::Missing) => {
                self.inner.images.forget(&image);
                self.requeue(
                    id,
                    format!("waiting for image {image}: it is no longer local"),
                )
                .await;
                return None;
            }
            Err(ResolveError::Engine(error)) => {
                self.requeue(id, format!("waiting for the engine: {error}"))
                    .await;
                return None;
            }
        };
        let record = {
            let mut state = self.lock();
            let r = state.jobs.get_mut(id)?;
            r.image_digest = resolved.digest.clone();
            r.clone()
        };
        if let Err(error) = self.persist(id).await {
            tracing::warn!(job = id, %error, "cannot record the start; job goes back to the queue");
            self.requeue(id, format!("waiting: cannot record the start: {error}"))
                .await;
            return None;
        }
        self.publish(&record);
        let spec = match self.container_spec(&record, resolved.run).await {
            Ok(spec) => spec,
            Err(reason) => {
                self.requeue(id, reason).await;
                return None;
            }
        };
        if cancel.is_cancelled() {
            self.cancelled_before_start(id, "").await;
            return None;
        }
        let container = match self.inner.engine.create(&spec).await {
            Ok(container) => container,
            Err(EngineError::NameInUse(name)) => {
                // Left by an earlier run of this agent that crashed after
                // recording the intent: look at it instead of running twice.
                match self.inner.engine.inspect(&name).await {
                    Ok(Some(status)) if status.status == "created" => status.id,
                    // It already started: supervise it, never start it again.
                    Ok(Some(status)) => return Some(status.id),
                    Ok(None) | Err(_) => {
                        self.requeue(id, "waiting: container name in use, retrying".into())
                            .await;
                        return None;
                    }
                }
            }
            Err(error) if error.is_unreachable() => {
                self.requeue(id, format!("waiting for the engine: {error}"))
                    .await;
                return None;
            }
            Err(error) => {
                self.finish(
                    id,
                    "",
                    Some(JobState::Failed),
                    format!("cannot create the container: {error}"),
                    None,
                    false,
                )
                .await;
                return None;
            }
        };
        if cancel.is_cancelled() {
            // `finish` removes the never-started container, holding the
            // slots until it is gone.
            self.cancelled_before_start(id, &container).await;
            return None;
        }
        if let Err(error) = self.inner.engine.start(&container).await {
            if error.is_unreachable() {
                // Whether it started is unknown; a created container must be
                // started before it is waited for (the engine reports a
                // never-started container as exited with status 0).
                return self
                    .ensure_started(id, &container)
                    .await
                    .then_some(container);
            }
            self.fail_before_running(
                id,
                &container,
                format!("cannot start the container: {error}"),
            )
            .await;
            return None;
        }
        Some(container)
    }

    /// Starts `container` if the engine says it is only created, retrying
    /// while the engine is unreachable. False when the job ended instead.
    async fn ensure_started(&self, id: &str, container: &str) -> bool {
        let mut backoff = Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match self.inner.engine.inspect(container).await {
                Ok(Some(status)) if status.status == "created" => {
                    match self.inner.engine.start(container).await {
                        Ok(()) => return true,
                        Err(error) if error.is_unreachable() => continue,
                        Err(error) => {
                            self.fail_before_running(
                                id,
                                container,
                                format!("cannot start the container: {error}"),
                            )
                            .await;
                            return false;
                        }
                    }
                }
                Ok(Some(_)) => return true,
                Ok(None) => {
                    // Never started (it would carry our record otherwise), so
                    // it may be created again.
                    self.requeue(
                        id,
                        "waiting: the container vanished before it started".into(),
                    )
                    .await;
                    return false;
                }
                Err(_) => continue,
            }
        }
    }

    /// Whether a cancel was asked for the job (false for an unknown job).
    fn cancel_requested(&self, id: &str) -> bool {
        self.lock().jobs.get(id).is_some_and(|r| r.cancel_requested)
    }

    /// Ends a job that was asked to cancel before its container started;
    /// `container` (when not empty) was created and is removed.
    async fn cancelled_before_start(&self, id: &str, container: &str) {
        self.finish(
            id,
            container,
            Some(JobState::Cancelled),
            "cancelled before its container started".into(),
            None,
            false,
        )
        .await;
    }

    async fn fail_before_running(&self, id: &str, container: &str, reason: String) {
        self.finish(id, container, Some(JobState::Failed), reason, None, false)
            .await;
    }

    /// Puts a job that never got a container back in the queue, or ends it
    /// as cancelled when a cancel was asked for meanwhile (the request fired
    /// the launch's token, which the next launch would not carry).
    async fn requeue(&self, id: &str, reason: String) {
        // No container uses the staged binds of this attempt; the next one
        // opens and checks the paths again.
        job_mounts::release(self.inner.staging_dir.as_deref(), id).await;
        let record = {
            let mut state = self.lock();
            let Some(r) = state.jobs.get_mut(id) else {
                state.release(id);
                return;
            };
            if r.cancel_requested {
                None
            } else {
                if !r.transition(JobState::Queued, reason) {
                    state.release(id);
                    return;
                }
                let r = r.clone();
                state.release(id);
                state.enqueue(&r);
                Some(r)
            }
        };
        let Some(record) = record else {
            self.cancelled_before_start(id, "").await;
            return;
        };
        if let Err(error) = self.persist(id).await {
            // Harmless for durability: the store still says "starting" with
            // no container, which a restart re-queues too.
            tracing::warn!(job = id, %error, "cannot record the return to the queue");
        }
        self.publish(&record);
        // Let the cause (engine, store) settle before the next attempt.
        tokio::select! {
            _ = self.inner.shutdown.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => self.inner.wake.notify_one(),
        }
    }

    /// The container of `record`, created from `image` (the resolved digest).
    async fn container_spec(
        &self,
        record: &JobRecord,
        image: String,
    ) -> Result<ContainerSpec, String> {
        let s = &record.spec;
        let config = self.jobs_config();
        let binds = job_mounts::binds(
            self.inner.mounts.as_ref(),
            &self.inner.host_paths,
            &s.id,
            &s.mounts,
            &config.allowed_host_roots,
            self.inner.staging_dir.as_deref(),
        )
        .await?;
        let mut labels: HashMap<String, String> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_INSTANCE.into(), self.inner.instance_id.clone());
        labels.insert(LABEL_JOB.into(), s.id.clone());
        Ok(ContainerSpec {
            name: self.container_name(&s.id),
            image,
            command: s.command.clone(),
            env: s.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            working_dir: s.working_dir.clone(),
            labels,
            memory_bytes: s.memory_bytes,
            nano_cpus: u64::from(s.cpu_millis) * 1_000_000,
            pids_limit: config.pids_limit,
            network: s.network.clone(),
            binds,
            gpus: record.gpu_indices.clone(),
            log_max_bytes: config.log_max_bytes,
        })
    }

    /// Captures output, enforces the timeout, honours cancel, and records the
    /// end. Returns without recording anything when the agent shuts down:
    /// the container keeps running and the next start adopts it.
    async fn supervise(&self, id: &str, container: &str, cancel: &CancellationToken) {
        let capture = self
            .inner
            .tasks
            .spawn(self.clone().capture(id.to_owned(), container.to_owned()));
        let Some(record) = self.get(id).ok().map(|v| v.record) else {
            return;
        };
        let grace = Duration::from_secs(record.spec.kill_grace_seconds.into());
        let mut deadline = (record.spec.timeout_seconds > 0).then(|| {
            let limit = Duration::from_secs(record.spec.timeout_seconds.into());
            let ran = record
                .running_at
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .unwrap_or_default();
            tokio::time::Instant::now() + limit.saturating_sub(ran)
        });
        let repairs_at_start = job_mounts::repairs(self.inner.mounts.as_ref(), &record.spec);
        let mut ending: Option<(JobState, String)> = None;
        if record.cancel_requested {
            cancel.cancel();
        }
        let mut backoff = Duration::from_millis(200);
        let mut engine_went_away = false;
        let outcome = loop {
            let timed_out = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break Outcome::ShuttingDown,
                result = self.inner.engine.wait(container) => match result {
                    Ok(code) => break Outcome::Exited(code),
                    Err(EngineError::NotFound { .. }) => break Outcome::Lost,
                    Err(error) => {
                        engine_went_away |= error.is_unreachable();
                        tracing::debug!(job = id, %error, "waiting for the container failed; checking it");
                        tokio::select! {
                            _ = self.inner.shutdown.cancelled() => break Outcome::ShuttingDown,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        match self.inner.engine.inspect(container).await {
                            Ok(None) => break Outcome::Lost,
                            Ok(Some(s)) if !s.running && s.status != "created" => break Outcome::Exited(s.exit_code.unwrap_or(-1)),
                            _ => continue,
                        }
                    }
                },
                _ = timed_out, if ending.is_none() => {
                    deadline = None;
                    ending = Some((JobState::TimedOut, format!("killed after its {} s timeout", record.spec.timeout_seconds)));
                    self.stop(id, container, grace).await;
                }
                _ = cancel.cancelled(), if ending.is_none() => {
                    ending = Some((JobState::Cancelled, "cancelled".into()));
                    self.stop(id, container, grace).await;
                }
            }
        };
        let exit = match outcome {
            Outcome::ShuttingDown => return,
            Outcome::Lost => None,
            Outcome::Exited(code) => Some(code),
        };
        // The output stream ends with the container; let it drain so that
        // the log is complete when the final state is visible (bounded, in
        // case the engine keeps the stream open).
        if tokio::time::timeout(CAPTURE_DRAIN, capture).await.is_err() {
            tracing::warn!(
                job = id,
                "log capture did not finish within {CAPTURE_DRAIN:?} of exit"
            );
        }
        let oom = match exit {
            Some(code) => {
                self.oom_killed(container, code, record.spec.memory_bytes)
                    .await
            }
            None => false,
        };
        let (state, reason) = match (ending, exit) {
            (Some((state, reason)), _) => (Some(state), reason),
            (None, None) => (
                Some(JobState::Failed),
                "container lost: it disappeared while the job ran".into(),
            ),
            (None, Some(_)) if oom => (
                Some(JobState::Failed),
                format!(
                    "killed by the OOM killer (memory limit {} bytes)",
                    record.spec.memory_bytes
                ),
            ),
            (None, Some(0)) => (Some(JobState::Succeeded), "exited with status 0".into()),
            (None, Some(code)) => {
                let mut reason = exit_reason(code);
                if engine_went_away {
                    reason.push_str("; the Docker engine went away while the job ran");
                }
                for note in job_mounts::deaths(self.inner.mounts.as_ref(), &repairs_at_start).await
                {
                    reason = format!("{reason}; {note}");
                }
                (Some(JobState::Failed), reason)
            }
        };
        self.finish(id, container, state, reason, exit, oom).await;
    }

    /// Whether the kernel's OOM killer ended the container. The engine may
    /// learn of the OOM kill after the exit (seen with cgroup v1: a SIGKILL
    /// exit reported with `OOMKilled` false, true a moment later), so a
    /// SIGKILL exit of a memory-limited job is looked at a few more times.
    async fn oom_killed(&self, container: &str, code: i64, memory_limit: u64) -> bool {
        let may_be_late = code == 137 && memory_limit > 0;
        let looks = if may_be_late { OOM_LOOKS } else { 1 };
        for look in 0..looks {
            if look > 0 {
                tokio::time::sleep(OOM_LOOK_INTERVAL).await;
            }
            if matches!(self.inner.engine.inspect(container).await, Ok(Some(s)) if s.oom_killed) {
                return true;
            }
        }
        false
    }

    /// SIGTERM, then SIGKILL after the grace period, retried while the
    /// engine does not answer.
    async fn stop(&self, id: &str, container: &str, grace: Duration) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.inner.engine.stop(container, grace).await {
                Ok(()) | Err(EngineError::NotFound { .. }) => return,
                Err(error) => {
                    tracing::warn!(job = id, %error, "cannot stop the container; retrying");
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Records the final state, removes the container, frees the slots.
    async fn finish(
        &self,
        id: &str,
        container: &str,
        state: Option<JobState>,
        reason: String,
        exit: Option<i64>,
        oom: bool,
    ) {
        let Some(state) = state else { return };
        let record = self.transition(id, state, reason, |r| {
            r.exit_code = exit;
            r.oom_killed = oom;
            if !container.is_empty() {
                r.container_id = container.to_owned();
            }
        });
        if let Some(record) = &record {
            if !self.persist_until_done(id).await {
                return;
            }
            self.publish(record);
        }
        let keep = self.jobs_config().keep_containers;
        if !container.is_empty() && !keep {
            // The slots stay held until the container is gone, so a container
            // that still exists never counts outside the capacity.
            let mut backoff = Duration::from_millis(200);
            while let Err(error) = self.inner.engine.remove(container).await {
                tracing::warn!(job = id, %error, "cannot remove the container; retrying");
                tokio::select! {
                    _ = self.inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        job_mounts::release(self.inner.staging_dir.as_deref(), id).await;
        self.lock().release(id);
        self.inner.wake.notify_one();
    }

    fn container_name(&self, id: &str) -> String {
        let short: String = self.inner.instance_id.chars().take(12).collect();
        format!("ia-{short}-{id}")
    }
}

/// "exited with status N", naming the signal when the status is 128 + a
/// signal number (how a container killed by a signal reports its exit).
fn exit_reason(code: i64) -> String {
    let signal = (129..=128 + 64)
        .contains(&code)
        .then(|| nix::sys::signal::Signal::try_from((code - 128) as i32).ok())
        .flatten();
    match signal {
        Some(signal) => format!("exited with status {code} (killed by {signal})"),
        None => format!("exited with status {code}"),
    }
}

#[cfg(test)]
mod tests;

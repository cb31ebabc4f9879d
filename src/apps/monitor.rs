//! Watching a running container: its exit, and its health probes on the
//! spec's interval. During startup failures do not count and progress is
//! reported in the reason; READY after `success_threshold` good probes in
//! a row, UNHEALTHY after `failure_threshold` bad ones, and a startup that
//! outlasts `startup_timeout_seconds` is unhealthy too. Also the rolling
//! replace, which watches a second container until it is READY.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use tokio::time::{Instant, MissedTickBehavior};

use super::probe::ProbeTarget;
use super::record::{AppState, ProbeResult};
use super::spec::{AppSpec, Probe, RestartPolicy};
use super::supervisor::{
    End, LaunchError, Next, Phase, Supervisor, apply_spec, assign_ports, startup_window,
};

/// The probe target of `spec` with `host_ports`, if it has a probe.
fn target(spec: &AppSpec, host_ports: &BTreeMap<String, u32>) -> Option<ProbeTarget> {
    let addr = |port: &str| -> Option<SocketAddr> {
        let spec_port = spec.port(port)?;
        let host_port = u16::try_from(*host_ports.get(port)?).ok()?;
        let ip: IpAddr = match spec_port.host_ip.as_str() {
            "0.0.0.0" => IpAddr::from([127, 0, 0, 1]),
            "::" => IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1]),
            ip => ip.parse().ok()?,
        };
        Some(SocketAddr::new(ip, host_port))
    };
    match &spec.health.probe {
        Probe::None => None,
        Probe::Tcp { port } => Some(ProbeTarget::Tcp { addr: addr(port)? }),
        Probe::Http {
            port,
            path,
            status_min,
            status_max,
        } => Some(ProbeTarget::Http {
            addr: addr(port)?,
            path: path.clone(),
            min: *status_min,
            max: *status_max,
        }),
    }
}

impl Supervisor {
    /// Watches container `id` of the current record (`report`: probe
    /// results and state changes go to the record) or of a rolling
    /// replace's new spec (`report` false: it only ends at READY).
    pub(super) async fn monitor(&mut self, id: &str, phase: Phase, report: bool) -> End {
        let record = self.record();
        self.watch(id, &record.spec, &record.host_ports, phase, report, None)
            .await
    }

    /// Watches container `id` (see [`Self::monitor`]); `serving` is the old
    /// container of a rolling replace, whose exit is recorded meanwhile (the
    /// app then serves nothing until the new one is READY).
    async fn watch(
        &mut self,
        id: &str,
        spec: &AppSpec,
        host_ports: &BTreeMap<String, u32>,
        mut phase: Phase,
        report: bool,
        serving: Option<&str>,
    ) -> End {
        let engine = self.manager.inner.deps.engine.clone();
        let prober = self.manager.inner.deps.prober.clone();
        let health = spec.health.clone();
        let target = target(spec, host_ports);
        let restart_on_unhealthy = spec.restart != RestartPolicy::Never;
        if target.is_none() && matches!(phase, Phase::Startup(_)) {
            if !report {
                return End::Ready;
            }
            self.ready_since = Some(Instant::now());
            self.update(|r| r.transition(AppState::Ready, "running (no health check)"))
                .await;
            phase = Phase::Serving;
        }
        let interval = Duration::from_secs(health.interval().into());
        let timeout = Duration::from_secs(health.timeout().into());
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let (mut good, mut bad) = (0u32, 0u32);
        let mut wait = Box::pin(engine.wait(id));
        let mut serving_wait = serving.map(|old| Box::pin(engine.wait(old)));
        let mut serving_runs = serving.is_some();
        loop {
            let serving_exit = async {
                match serving_wait.as_mut() {
                    Some(wait) => wait.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.manager.inner.shutdown.cancelled() => return End::Shutdown,
                status = serving_exit, if serving_runs => {
                    serving_runs = false;
                    let code = status.unwrap_or(-1);
                    let generation = self.record().generation + 1;
                    self.update(|r| {
                        r.last_exit = Some(code);
                        r.transition(
                            AppState::Starting,
                            format!(
                                "the serving container exited with status {code} during the rolling replace; \
                                 generation {generation} is starting"
                            ),
                        )
                    })
                    .await;
                }
                command = self.mailbox.recv() => {
                    return command.map_or(End::Shutdown, End::Command);
                }
                status = &mut wait => match status {
                    Ok(code) => return End::Exited(code),
                    Err(error) => {
                        // The engine went away; the container may well run on.
                        tracing::warn!(container = %id, %error, "lost the wait on an app container");
                        tokio::select! {
                            _ = self.manager.inner.shutdown.cancelled() => return End::Shutdown,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        match engine.inspect(id).await {
                            Ok(Some(status)) if !status.running => {
                                return End::Exited(status.exit_code.unwrap_or(-1));
                            }
                            Ok(None) => return End::Exited(-1),
                            _ => wait = Box::pin(engine.wait(id)),
                        }
                    }
                },
                _ = ticker.tick(), if target.is_some() => {
                    let Some(target) = &target else { continue };
                    let began = Instant::now();
                    let outcome = prober.probe(target, timeout).await;
                    let latency = began.elapsed();
                    if let Some(observe) = &self.manager.inner.deps.probe_observer {
                        observe(&spec.name, latency.as_secs_f64());
                    }
                    if outcome.healthy {
                        good += 1;
                        bad = 0;
                    } else {
                        bad += 1;
                        good = 0;
                    }
                    let result = ProbeResult {
                        time: SystemTime::now(),
                        healthy: outcome.healthy,
                        latency_micros: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
                        status_code: outcome.status_code,
                        error: outcome.error.clone(),
                    };
                    let last = if outcome.healthy {
                        outcome.status_code.map_or("connected".to_owned(), |s| format!("status {s}"))
                    } else {
                        outcome.error.clone()
                    };
                    match phase {
                        Phase::Startup(deadline) => {
                            if good >= health.successes() {
                                if !report {
                                    return End::Ready;
                                }
                                self.ready_since = Some(Instant::now());
                                phase = Phase::Serving;
                                self.update(|r| {
                                    r.last_probe = Some(result);
                                    r.transition(AppState::Ready, format!("ready: {good} good probe(s) in a row ({last})"))
                                })
                                .await;
                            } else if Instant::now() >= deadline {
                                return End::Unhealthy(format!(
                                    "not ready within startup_timeout_seconds={} (last probe: {last})",
                                    health.startup()
                                ));
                            } else if report {
                                // Progress, in memory only: not a state change.
                                let waited = startup_window(spec).saturating_sub(deadline - Instant::now());
                                self.handle.record.send_modify(|r| {
                                    r.reason = format!(
                                        "starting: {}s of {}s startup; last probe: {last}",
                                        waited.as_secs(),
                                        health.startup()
                                    );
                                    r.last_probe = Some(result);
                                });
                            }
                        }
                        Phase::Serving => {
                            let state = self.record().state;
                            if state == AppState::Ready && bad >= health.failures() {
                                self.ready_since = None;
                                let reason = format!("{bad} probe(s) failed in a row (last: {last})");
                                self.update(|r| {
                                    r.last_probe = Some(result);
                                    r.transition(AppState::Unhealthy, reason.clone())
                                })
                                .await;
                                if restart_on_unhealthy {
                                    return End::Unhealthy(reason);
                                }
                            } else if state == AppState::Unhealthy && good >= health.successes() {
                                self.ready_since = Some(Instant::now());
                                self.update(|r| {
                                    r.last_probe = Some(result);
                                    r.transition(AppState::Ready, format!("healthy again ({last})"))
                                })
                                .await;
                            } else {
                                self.handle.record.send_modify(|r| r.last_probe = Some(result));
                            }
                        }
                    }
                }
            }
        }
    }

    /// A changed spec whose ports are all picked: the new container starts
    /// beside the old one and takes over once READY; if it never becomes
    /// READY, it is removed and the old one serves on.
    pub(super) async fn rolling_replace(&mut self, spec: AppSpec) -> Next {
        let record = self.record();
        let old = record.container_id.clone();
        let generation = record.generation + 1;
        let mut taken = self.ports_of_other_apps(record.name());
        taken.extend(record.host_ports.values().copied());
        let host_ports = match assign_ports(&spec, &BTreeMap::new(), &taken) {
            Ok(ports) => ports,
            Err(error) => return self.replace_failed(&old, None, error.to_string()).await,
        };
        self.update(|r| {
            r.reason = format!(
                "rolling replace: starting generation {generation} beside the old container"
            );
            true
        })
        .await;
        let (new, digest) = match self.launch(&spec, generation, host_ports.clone()).await {
            Ok(launched) => launched,
            Err(error) => {
                let reason = match error {
                    LaunchError::Fail(r) | LaunchError::Retry(r) => r,
                };
                return self.replace_failed(&old, None, reason).await;
            }
        };
        let deadline = Instant::now() + startup_window(&spec);
        match self
            .watch(
                &new,
                &spec,
                &host_ports,
                Phase::Startup(deadline),
                false,
                Some(&old),
            )
            .await
        {
            End::Ready => {
                self.update(|r| {
                    apply_spec(r, spec);
                    r.generation = generation;
                    r.host_ports = host_ports;
                    r.container_id = new.clone();
                    r.image_digest = digest;
                    r.started = Some(SystemTime::now());
                    r.transition(AppState::Ready, format!("rolling replace done: generation {generation} is ready; the old container is stopped"))
                })
                .await;
                let engine = self.manager.inner.deps.engine.clone();
                let grace = Duration::from_secs(self.manager.config().stop_grace_seconds.into());
                let _ = engine.stop(&old, grace).await;
                let _ = engine.remove(&old).await;
                self.ready_since = Some(Instant::now());
                Next::Monitor(new, Phase::Serving)
            }
            End::Exited(code) => {
                self.replace_failed(
                    &old,
                    Some(&new),
                    format!("the new container exited with status {code}"),
                )
                .await
            }
            End::Unhealthy(reason) => self.replace_failed(&old, Some(&new), reason).await,
            End::Command(command) => {
                let _ = self.manager.inner.deps.engine.remove(&new).await;
                Next::Command(command)
            }
            End::Shutdown => Next::Stop,
        }
    }

    async fn replace_failed(&mut self, old: &str, new: Option<&str>, reason: String) -> Next {
        if let Some(new) = new {
            let _ = self.manager.inner.deps.engine.remove(new).await;
        }
        self.update(|r| {
            r.reason = format!("rolling replace failed ({reason}); the old spec serves on");
            true
        })
        .await;
        Next::Monitor(old.to_owned(), Phase::Serving)
    }
}

//! Assembles the agent from its config and adapters and runs it: prepares the
//! directories, binds the listeners, tells systemd it is ready, runs the
//! background tasks, reloads config, and shuts down within a grace period.
//!
//! Owns the one cancellation token and the one task tracker of the process.
//! This file is the assembly and the run/shutdown sequence; `dirs` keeps the
//! state dir and the instance id, `background` the daemon's own loops (GPU
//! discovery, engine monitor, `STATUS=`, watchdog), `watchdog` the proof of
//! progress behind each watchdog ping, and the Unix socket is
//! bound by [`api::socket`].

mod activity;
mod background;
mod dirs;
mod watchdog;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::AdmissionGate;
use crate::api;
use crate::api::config::ApiConfig;
use crate::config::Config;
use crate::events::{EventBus, EventPayload};
use crate::health::Health;
use crate::host::HostFacts;
use crate::images::space::GuardSpace;
use crate::images::{CredentialStore, ImageParts, ImageService};
use crate::jobs::engine::ContainerEngine;
use crate::jobs::{JobManager, JobsDeps};
use crate::mounts::system::FuseMounter;
use crate::mounts::{MountService, MountSettings};
use crate::paths::offload::Offload;
use crate::reload::ConfigSource;
use crate::setup::SetupScripts;
use crate::status::StatusProvider;
use crate::store::Store;
use crate::systemd::Notifier;

/// The daemon failed to start or to stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A directory could not be prepared.
    #[error("cannot prepare {what} {path}: {source}")]
    Directory {
        /// Which directory (e.g. "state dir").
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control plane's TCP listener could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The TCP address.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The Unix socket could not be set up (another agent serves it, …).
    #[error(transparent)]
    Socket(#[from] api::socket::SocketError),
    /// The store could not be opened, for a reason outside the file (a
    /// damaged file is moved aside instead).
    #[error("cannot open the store: {0}")]
    Store(#[source] crate::store::StoreError),
    /// The job store could not be loaded.
    #[error("cannot load jobs: {0}")]
    Jobs(#[source] crate::jobs::JobError),
    /// The images domain could not start (its records or credentials).
    #[error("cannot start the images domain: {0}")]
    Images(#[source] crate::images::ImageError),
    /// The app records could not be loaded.
    #[error("cannot load apps: {0}")]
    Apps(#[source] crate::apps::AppError),
    /// The setup scripts' records could not be loaded.
    #[error("cannot load setup runs: {0}")]
    Setup(#[source] crate::setup::SetupError),
    /// The SSH policy could not be loaded.
    #[error("cannot load the SSH policy: {0}")]
    Access(#[source] crate::access::AccessError),
    /// The metrics listener could not be bound.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::BindError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Server(String),
    /// The control plane's TLS material is unusable.
    #[error("cannot set up TLS for the control plane: {0}")]
    Tls(#[source] api::tls::TlsError),
    /// Reading the host's facts (cores, memory) panicked.
    #[error("cannot read the host's facts: {0}")]
    HostFacts(String),
}

/// The outside world, as real implementations or test fakes.
pub struct Adapters {
    /// The container engine.
    pub engine: Arc<dyn ContainerEngine>,
    /// The container engine as the images domain uses it (pulls).
    pub image_engine: Arc<dyn crate::images::engine::ImageEngine>,
    /// Registries, as the agent asks them itself before a pull.
    pub registry: Arc<dyn crate::images::registry::Registry>,
    /// The container engine as apps use it (published ports, images).
    pub apps: Arc<dyn crate::apps::engine::AppEngine>,
    /// Apps' health probes.
    pub prober: Arc<dyn crate::apps::probe::Prober>,
    /// blobfuse2 processes, mountinfo, FUSE probes and fusermount3.
    pub mounter: Arc<dyn FuseMounter>,
    /// The engine as the disk guard sees it (data root, reclaimable data).
    pub disk_docker: Arc<dyn crate::disk::docker::DockerSpace>,
    /// The agent's own well-known filesystems as the disk guard sees them.
    pub disk_probe: Arc<dyn crate::disk::probe::FsProbe>,
    /// Paths that users or remote storage control, probed in helper
    /// processes (the disk guard, job binds).
    pub isolated_probe: Arc<dyn crate::disk::probe::IsolatedProbe>,
    /// Starts setup scripts.
    pub setup_runner: Arc<dyn crate::setup::ProcessRunner>,
    /// sshd, its units, its port and its sessions.
    pub ssh: Arc<dyn crate::access::SshHost>,
}

/// The agent, assembled but not yet running.
pub struct Daemon {
    config: Config,
    source: ConfigSource,
    adapters: Adapters,
}

impl Daemon {
    /// Assembles the agent. Nothing touches the system until [`Daemon::run`].
    pub fn new(config: Config, source: ConfigSource, adapters: Adapters) -> Self {
        Self {
            config,
            source,
            adapters,
        }
    }

    /// Runs until `shutdown` resolves, then stops within the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        let Daemon {
            config,
            source,
            adapters,
        } = self;
        let notifier = Notifier;
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();

        dirs::prepare_dir("state dir", &config.agent.state_dir, 0o700)?;
        let instance_id = dirs::instance_id(&config)?;
        let hangup = crate::reload::listen_hangup();
        // Read before anything binds: a bad key or CA stops the start.
        let tls = control_plane_tls(&config).await?;
        // Bound before the store is opened, so that a second agent is told
        // "already running" rather than "database locked".
        let unix = api::socket::bind(&config.agent.socket, &config.operator.group).await?;
        let tcp = match config.control_plane.addr() {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| DaemonError::Bind {
                            address: addr.to_string(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
        let store = Store::open(&config.agent.state_dir).map_err(DaemonError::Store)?;
        let admission = AdmissionGate::new();

        let health = Health::new();
        // Before the domains load: a damaged store is reported even if a
        // later step fails.
        let (state, message) = crate::store::condition(&store.damage(), &[]);
        health.set(crate::health::Subsystem::Store, state, message);
        let events = EventBus::new(config.events.backlog as usize);
        let (gpus_tx, gpus_rx) = watch::channel(Vec::new());
        let (gpus_discovered_tx, gpus_discovered_rx) = watch::channel(false);
        let (engine_up_tx, engine_up_rx) = watch::channel(false);
        // Reads /proc and /sys (cgroup files): off the runtime's threads.
        let mut host = tokio::task::spawn_blocking(HostFacts::discover)
            .await
            .map_err(|e| DaemonError::HostFacts(e.to_string()))?;
        host.supervision = format!(
            "setup scripts: {}; mounts: {}",
            adapters.setup_runner.describe(),
            adapters.mounter.describe()
        );
        // Caller-chosen paths (job binds, mount paths) are opened through
        // one offload: together they never hold more than a quarter of the
        // blocking pool, however many hung filesystems they name.
        let host_paths = Offload::new(crate::BLOCKING_THREADS / 4);
        let mounts = MountService::new(
            MountSettings::new(
                &config.mounts,
                &config.agent.state_dir,
                &config.agent.runtime_dir,
                &config.agent.logs_dir,
            ),
            adapters.mounter.clone(),
            store.clone(),
            events.clone(),
            health.clone(),
            host_paths.clone(),
            derive(&config_rx, |c| {
                Duration::from_secs(c.mounts.health_interval_seconds.into())
            }),
            cancel.clone(),
            tasks.clone(),
        );
        mounts.restore(&config.mounts.mount).await;

        let (images, image_space) = build_images(
            &config, &adapters, &store, &admission, &config_rx, &cancel, &tasks,
        )?;
        let jobs = JobManager::start(
            JobsDeps {
                engine: adapters.engine.clone(),
                store: store.clone(),
                events: events.clone(),
                admission: admission.clone(),
                mounts: Arc::new(mounts.clone()),
                images: Arc::new(images.clone()),
                logs_dir: config.agent.state_dir.join("job-logs"),
                staging_dir: Some(config.agent.runtime_dir.join("staging").join("jobs")),
                host_paths,
                instance_id: instance_id.clone(),
                usable_cores: host.usable_cores,
                memory_bytes: host.memory_total_bytes,
                gpus: gpus_rx.clone(),
                gpus_discovered: gpus_discovered_rx,
                engine_up: engine_up_rx.clone(),
                config: derive(&config_rx, |c| c.jobs.clone()),
            },
            cancel.clone(),
            tasks.clone(),
        )
        .map_err(DaemonError::Jobs)?;
        // Set once the metrics exist (they read the apps, the apps feed
        // them probe latencies).
        let probe_metrics: Arc<std::sync::OnceLock<crate::metrics::Metrics>> = Arc::default();
        let observer_metrics = probe_metrics.clone();
        let apps = crate::apps::AppManager::start(
            crate::apps::AppsDeps {
                engine: adapters.apps.clone(),
                images: Arc::new(images.clone()),
                prober: adapters.prober.clone(),
                store: store.clone(),
                events: events.clone(),
                admission: admission.clone(),
                mounts: Arc::new(mounts.clone()),
                slots: Arc::new(jobs.clone()),
                instance_id: instance_id.clone(),
                host: crate::apps::spec::HostLimits {
                    capacity: jobs.capacity(),
                    usable_cores: host.usable_cores,
                    gpus: u32::try_from(gpus_rx.borrow().len()).unwrap_or(0),
                },
                engine_up: engine_up_rx.clone(),
                config: derive(&config_rx, |c| c.apps.clone()),
                host_roots: derive(&config_rx, |c| c.jobs.allowed_host_roots.clone()),
                probe_observer: Some(Arc::new(move |app: &str, seconds: f64| {
                    if let Some(metrics) = observer_metrics.get() {
                        metrics.observe_probe(app, seconds);
                    }
                })),
            },
            cancel.clone(),
            tasks.clone(),
        )
        .map_err(DaemonError::Apps)?;
        let status = StatusProvider::new(
            &instance_id,
            host,
            gpus_rx,
            health.clone(),
            events.clone(),
            admission.clone(),
        )
        .with_jobs(jobs.clone());
        // Opened before serving: it holds the job queue until the creation
        // script has succeeded, and marks runs cut short by a crash.
        let setup = SetupScripts::open(
            crate::setup::Settings::new(
                &config.setup,
                &config.agent.logs_dir,
                &config.agent.runtime_dir,
                &hostname(),
            ),
            crate::setup::Wiring {
                store: store.clone(),
                events: events.clone(),
                health: health.clone(),
                admission: admission.clone(),
                runner: adapters.setup_runner.clone(),
                accounts: Arc::new(crate::setup::SystemAccounts),
            },
        )
        .map_err(DaemonError::Setup)?;

        // Touches sshd only when a policy was set (then at once: a policy
        // changed by hand is applied again).
        let access = crate::access::AccessService::new(
            crate::access::AccessSettings::new(&config.access),
            adapters.ssh.clone(),
            store.clone(),
            health.clone(),
        )
        .map_err(DaemonError::Access)?;

        // Activity and idle shutdown: samples the domains built above.
        let lifecycle = crate::lifecycle::LifecycleService::new(crate::lifecycle::LifecycleParts {
            config: derive(&config_rx, |c| c.lifecycle.clone()),
            sources: activity::sources(&config.lifecycle, &jobs, &setup, &access, &apps),
            store: store.clone(),
            events: events.clone(),
            stop: Arc::new(crate::lifecycle::CommandStop::new(derive(
                &config_rx,
                |c| c.lifecycle.stop_command.clone(),
            ))),
        });

        let (disk, disk_runner) = build_disk_guard(
            &config,
            &instance_id,
            &adapters,
            &store,
            &health,
            &events,
            &admission,
            &config_rx,
            &jobs,
            &mounts,
            &images,
        );
        image_space.set_guard(disk.clone());
        let metrics = match config.metrics.addr() {
            Some(addr) => {
                let listener = crate::metrics::bind(addr).await?;
                let metrics = crate::metrics::Metrics::new(Some(crate::metrics::Sources {
                    jobs: jobs.clone(),
                    disk: disk.clone(),
                    mounts: mounts.clone(),
                    apps: apps.clone(),
                }));
                let _ = probe_metrics.set(metrics.clone());
                // From the first event of this run: mounts restored and setup
                // runs found interrupted above have published already.
                tasks.spawn(
                    metrics
                        .clone()
                        .follow_events(events.subscribe(Some(0)), cancel.clone()),
                );
                tasks.spawn(crate::metrics::serve(
                    metrics.clone(),
                    listener,
                    config.metrics.max_connections,
                    tasks.clone(),
                    cancel.clone(),
                ));
                tracing::info!(%addr, "metrics at http://{addr}/metrics");
                Some(metrics)
            }
            None => None,
        };
        let rpc_metrics = crate::metrics::RpcMetricsLayer::new(metrics, api::is_served_method);
        tasks.spawn(background::watch_cache_dirs(
            mounts.clone(),
            disk.clone(),
            cancel.clone(),
        ));
        tasks.spawn(background::watch_store(
            store.clone(),
            jobs.clone(),
            health.clone(),
            cancel.clone(),
        ));

        let (routes, health_reporter) = api::routes(api::ApiParts {
            agent: api::agent::AgentApi::new(status.clone(), events.clone(), cancel.clone())
                .with_setup(setup.clone())
                .with_images(images.clone()),
            jobs: api::jobs::JobApi::new(jobs.clone()),
            images: api::images::ImageApi::new(images.clone(), cancel.clone()),
            apps: api::apps::AppApi::new(apps),
            mounts: api::mounts::MountApi::new(mounts),
            disk: api::disk::DiskApi::new(disk, cancel.clone()),
            setup: api::setup::SetupApi::new(setup.clone(), cancel.clone()),
            access: api::access::AccessApi::new(access.clone()),
            lifecycle: api::lifecycle::LifecycleApi::new(lifecycle.clone(), cancel.clone()),
            max_message_bytes: config.limits.max_message_bytes as usize,
        })
        .map_err(|e| DaemonError::Server(e.to_string()))?;
        for name in api::SERVICE_NAMES {
            health_reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;

        // Roles, grants and limits, live.
        let api_config = derive(&config_rx, |c| {
            Arc::new(ApiConfig {
                control_plane: c.control_plane.clone(),
                operator: c.operator.clone(),
                limits: c.limits.clone(),
            })
        });
        let guard = api::guard::GuardLayer::new(api_config.clone());
        let admission = api::listen::Admission::new(api_config);
        let streams = config.limits.max_concurrent_streams;
        let mut servers = Vec::new();
        let local = api::listen::unix(
            unix,
            admission.clone(),
            Arc::new(api::peer::SystemUsers),
            cancel.clone(),
        );
        servers.push(tokio::spawn(serve(
            routes.clone(),
            (guard.clone(), rpc_metrics.clone(), streams),
            local,
            cancel.clone(),
        )));
        match (tcp, tls) {
            (Some(tcp), Some(tls)) => {
                let names = config.control_plane.allowed_client_names.clone();
                let remote = api::listen::tls(tcp, tls, names, admission, cancel.clone());
                servers.push(tokio::spawn(serve(
                    routes,
                    (guard, rpc_metrics, streams),
                    remote,
                    cancel.clone(),
                )));
            }
            (Some(tcp), None) => {
                tracing::warn!(
                    addr = %config.control_plane.listen,
                    "control-plane listener is plaintext (insecure_plaintext = true): every local process \
                     that connects to it is admin; use only for local testing"
                );
                let remote = api::listen::plaintext(tcp, admission, cancel.clone());
                servers.push(tokio::spawn(serve(
                    routes,
                    (guard, rpc_metrics, streams),
                    remote,
                    cancel.clone(),
                )));
            }
            (None, _) => {}
        }

        notifier.ready(&status.status_line());
        events.publish(EventPayload::Agent { phase: "started" });
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            socket = %config.agent.socket.display(),
            instance_id = %instance_id,
            "instance-agent ready"
        );

        background::spawn_background(
            &tasks,
            &cancel,
            &adapters,
            &health,
            &status,
            &events,
            (gpus_tx, gpus_discovered_tx),
            engine_up_tx,
            config_rx,
            &store,
        );
        tasks.spawn(setup.run(cancel.clone()));
        access.start(&tasks, &cancel);
        lifecycle.start(&tasks, &cancel);
        // After "started": the first disk alerts follow it in the event log.
        disk_runner.start(&tasks, &cancel);
        tasks.spawn(crate::reload::run(
            source,
            config_tx,
            hangup,
            cancel.clone(),
        ));
        tasks.close();

        shutdown.await;
        tracing::info!("shutting down");
        notifier.stopping();
        events.publish(EventPayload::Agent { phase: "stopping" });
        // Every name a client may watch, not only the overall one: a
        // balancer checking "instance_agent.v1.JobService" must see it go.
        for name in api::SERVICE_NAMES.into_iter().chain([""]) {
            health_reporter
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        cancel.cancel();

        let grace = Duration::from_secs(config.agent.shutdown_grace_seconds.into());
        let drained = tokio::time::timeout(grace, async {
            for server in servers {
                match server.await {
                    Ok(Err(e)) => tracing::error!(error = %e, "server stopped with an error"),
                    Err(e) => tracing::error!(error = %e, "server task failed"),
                    Ok(Ok(())) => {}
                }
            }
            tasks.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                grace_seconds = grace.as_secs(),
                tasks_left = tasks.len(),
                "grace period over; stopping with tasks still running"
            );
        }
        let _ = std::fs::remove_file(&config.agent.socket);
        tracing::info!("stopped");
        Ok(())
    }
}

/// Builds the images domain: its credential store, its view of disk space
/// (on the disk guard, handed over once the guard is built), its records.
fn build_images(
    config: &Config,
    adapters: &Adapters,
    store: &Store,
    admission: &AdmissionGate,
    config_rx: &watch::Receiver<Arc<Config>>,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<(ImageService, Arc<GuardSpace>), DaemonError> {
    let credentials =
        CredentialStore::open(&config.images.credentials_path(&config.agent.state_dir))
            .map_err(DaemonError::Images)?;
    let space = Arc::new(GuardSpace::new(
        adapters.disk_probe.clone(),
        adapters.disk_docker.clone(),
        admission.clone(),
        derive(config_rx, |c| c.disk.clone()),
        config.images.space_check_override(),
    ));
    let images = ImageService::new(
        ImageParts {
            engine: adapters.image_engine.clone(),
            registry: adapters.registry.clone(),
            space: space.clone(),
            credentials,
            store: store.clone(),
            config: derive(config_rx, |c| c.images.clone()),
            keep: derive(config_rx, |c| c.jobs.keep_images.clone()),
        },
        cancel.clone(),
        tasks.clone(),
    )
    .map_err(DaemonError::Images)?;
    Ok((images, space))
}

/// Builds the disk guard with every reclaim step, in order: exited job
/// containers, dangling images the agent pulled, expired job logs, unused
/// images the agent pulled, mount caches, and the containers of unknown
/// origin (only when asked for).
#[allow(clippy::too_many_arguments)]
fn build_disk_guard(
    config: &Config,
    instance_id: &str,
    adapters: &Adapters,
    store: &Store,
    health: &Health,
    events: &EventBus,
    admission: &AdmissionGate,
    config_rx: &watch::Receiver<Arc<Config>>,
    jobs: &JobManager,
    mounts: &MountService,
    images: &ImageService,
) -> (crate::disk::DiskGuard, crate::disk::guard::DiskRunner) {
    let finished = jobs.clone();
    let job_finished: crate::disk::docker::JobFinished =
        Arc::new(move |job: &str| finished.is_finished(job));
    // The image steps are the images domain's: they remove only images the
    // agent pulled, never every untagged image on the host.
    let steps: Vec<Arc<dyn crate::disk::reclaim::ReclaimStep>> = vec![
        Arc::new(crate::disk::docker::ExitedContainers::new(
            adapters.disk_docker.clone(),
            instance_id,
            job_finished,
        )),
        Arc::new(crate::images::reclaim::DanglingImages::new(images.clone())),
        Arc::new(crate::jobs::reclaim::ExpiredJobLogs::new(
            jobs.clone(),
            config.agent.state_dir.clone(),
        )),
        Arc::new(crate::images::reclaim::UnusedImages::new(images.clone())),
        Arc::new(crate::mounts::reclaim::MountCaches::new(
            mounts.clone(),
            config.mounts.cache_root.clone(),
        )),
        // Only when a ReclaimSpace asks for it.
        Arc::new(crate::jobs::UnknownContainers::new(jobs.clone())),
    ];
    crate::disk::DiskGuard::new(crate::disk::DiskParts {
        config: derive(config_rx, |c| c.disk.clone()),
        state_dir: config.agent.state_dir.clone(),
        probe: adapters.disk_probe.clone(),
        isolated: adapters.isolated_probe.clone(),
        docker: adapters.disk_docker.clone(),
        steps,
        store: store.clone(),
        health: health.clone(),
        events: events.clone(),
        admission: admission.clone(),
    })
}

/// A watch channel of one value derived from the live config.
fn derive<T: Clone + PartialEq + Send + Sync + 'static>(
    config: &watch::Receiver<Arc<Config>>,
    pick: impl Fn(&Config) -> T + Send + 'static,
) -> watch::Receiver<T> {
    let (tx, rx) = watch::channel(pick(&config.borrow()));
    let mut config = config.clone();
    tokio::spawn(async move {
        while config.changed().await.is_ok() {
            let value = pick(&config.borrow_and_update());
            tx.send_if_modified(|current| {
                let changed = *current != value;
                *current = value;
                changed
            });
        }
    });
    rx
}

/// The host name, the default `CI_NAME` of setup scripts.
fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The control plane's TLS configuration, when it listens over TLS.
async fn control_plane_tls(
    config: &Config,
) -> Result<Option<Arc<tokio_rustls::rustls::ServerConfig>>, DaemonError> {
    if config.control_plane.listen.is_empty() || config.control_plane.insecure_plaintext {
        return Ok(None);
    }
    let cp = config.control_plane.clone();
    tokio::task::spawn_blocking(move || api::tls::server_config(&cp))
        .await
        .map_err(|e| DaemonError::Server(format!("TLS setup task failed: {e}")))?
        .map(Some)
        .map_err(DaemonError::Tls)
}

/// Serves the routes behind the guard on an identified incoming stream
/// until `cancel`; `layers` are the guard, the RPC metrics and
/// `limits.max_concurrent_streams`.
async fn serve<S>(
    routes: tonic::service::Routes,
    layers: (api::guard::GuardLayer, crate::metrics::RpcMetricsLayer, u32),
    incoming: api::listen::Incoming<S>,
    cancel: CancellationToken,
) -> Result<(), DaemonError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (guard, rpc_metrics, max_streams) = layers;
    // What h2 may buffer per connection before the guard reads it: small
    // windows (the request side of the contract is one small message), a
    // cap on streams and on header lists. The frame size is the one the
    // Unix socket's :authority shim splits header blocks for.
    tonic::transport::Server::builder()
        .max_concurrent_streams(max_streams)
        .initial_stream_window_size(api::HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(api::HTTP2_CONNECTION_WINDOW)
        .http2_max_header_list_size(api::HTTP2_MAX_HEADER_LIST)
        .max_frame_size(api::authority::MAX_FRAME_SIZE as u32)
        // Metrics outside the guard: calls it refuses are counted too.
        .layer(rpc_metrics)
        .layer(guard)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await
        .map_err(|e| DaemonError::Server(e.to_string()))
}

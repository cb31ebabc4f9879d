//! instance-agent: the on-node agent of a cloud ML compute instance.
//!
//! # Layout
//! - [`config`]: the config file: assembles the domains' sections, loads and
//!   parses it, reports errors with the key's line, live-reloadable keys.
//! - [`validate`]: field errors and the range checker every section uses.
//! - [`daemon`]: assembles everything, binds listeners, runs and stops it.
//!   (It lives beside `lib.rs` rather than in it so that the module tree stays
//!   readable at a glance.)
//! - [`reload`]: where the config came from, SIGHUP and file-watch reload.
//! - [`events`]: the sequenced event log behind `WatchEvents`.
//! - [`health`]: one condition per subsystem and the one-line summary.
//! - [`status`]: the `GetStatus` report, assembled from memory.
//! - [`host`]: CPU cores (cgroup-aware), memory, GPUs.
//! - [`store`]: the embedded crash-safe store (redb) shared by the domains.
//! - [`admission`]: holds on the job queue placed by disk guard and setup.
//! - [`systemd`]: the notify protocol (READY, STATUS, WATCHDOG, STOPPING).
//! - [`transient`]: transient services forked by PID 1 (`systemd-run`,
//!   `systemctl`), for setup scripts and blobfuse2 under systemd.
//! - `testing` (unit tests only): the shared rig of the domains' unit tests.
//! - [`units`]: byte sizes and durations for people (messages, config, CLI).
//! - [`jobs`]: the job queue: specs, states, slots, logs and the container engine.
//! - [`images`]: image pulls (credentials, single flight, prefetch, disk-aware),
//!   the agent's image records and the image reclaim steps.
//! - [`apps`]: long-running containers on loopback ports: health, restarts,
//!   the inference preset.
//! - [`mounts`]: blobfuse2 file share mounts, their health and repair.
//! - [`setup`]: creation, startup and ad-hoc scripts.
//! - [`disk`]: the disk guard: watched filesystems, alerts, reclaim.
//! - [`access`]: the SSH access policy (sshd's drop-in, keys, the listener)
//!   and the SSH sessions open now.
//! - [`lifecycle`]: activity (why the instance is not idle) and idle shutdown.
//! - [`paths`]: client-given paths: lexical rules, resolution, confinement.
//! - [`mountinfo`]: parsing the kernel's mount table (disk guard and mounts).
//! - [`secret`]: the redacting `Secret` wrapper and permission-checked secret files.
//! - [`api`]: the thin gRPC layer (protobuf ⇄ domain, error mapping), and in
//!   front of it the security of every call: peer identity (SO_PEERCRED,
//!   mutual TLS), roles, limits and the audit log.
//! - [`metrics`]: Prometheus text on a loopback HTTP address, fed by events,
//!   scrape-time reads and a gRPC layer.
//! - [`cli`]: the operator CLI, a gRPC client of the daemon.
//!
//! Flows: control plane / CLI → gRPC (Unix socket or TCP) → `api` → domain
//! modules → adapters (Docker, processes, FUSE, filesystems). Domain modules
//! publish to `events` and `health`; `api` and `systemd` read from them.

pub mod access;
pub mod admission;
pub mod api;
pub mod apps;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod disk;
pub mod events;
pub mod health;
pub mod host;
pub mod images;
pub mod jobs;
pub mod lifecycle;
pub mod metrics;
pub mod mountinfo;
pub mod mounts;
pub mod paths;
pub mod reload;
pub mod secret;
pub mod setup;
pub mod status;
pub mod store;
pub mod systemd;
#[cfg(test)]
pub(crate) mod testing;
pub mod transient;
pub mod units;
pub mod validate;

pub use daemon::{Adapters, Daemon, DaemonError};

/// Threads of the runtime's blocking pool. Work that may hang on a
/// caller-chosen path can take at most a quarter of them
/// ([`paths::offload`]); the rest stay for the store, peer identification
/// and the disk guard.
pub const BLOCKING_THREADS: usize = 16;
pub use reload::ConfigSource;

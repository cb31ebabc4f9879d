//! The narrow interface between the access domain and the system:
//! [`SshHost`]. sshd's checks (`sshd -t`, `sshd -T`), the listener's units
//! (state, start, stop, reload, mask, unmask, `daemon-reload`), a probe of
//! the port for an SSH banner, the sessions open now, and user lookups.
//! The real implementation is `system::SystemSsh`; a fake for tests sits in
//! `fake`. The files sshd reads are the domain's own business (`files`).

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::sessions::SshSession;
use super::sshd_config::Effective;

/// One of the listener's two units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unit {
    /// `access.service_unit` (`ssh.service`).
    Service,
    /// `access.socket_unit` (`ssh.socket`).
    Socket,
}

/// How sshd is started here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListenerKind {
    /// The service listens itself.
    Service,
    /// The socket listens and starts the service (socket activation).
    Socket,
}

impl ListenerKind {
    /// Lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Service => "service",
            ListenerKind::Socket => "socket",
        }
    }
}

/// A unit's state, as far as the agent needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnitState {
    /// The unit is known to systemd (loaded or masked).
    pub exists: bool,
    /// Active, activating or reloading.
    pub active: bool,
    /// Masked: nothing can start it.
    pub masked: bool,
    /// Enabled to start at boot.
    pub enabled: bool,
}

/// Both units of the listener.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListenerState {
    /// The service's state.
    pub service: UnitState,
    /// The socket's state.
    pub socket: UnitState,
}

impl ListenerState {
    /// One unit's state.
    pub fn unit(&self, unit: Unit) -> UnitState {
        match unit {
            Unit::Service => self.service,
            Unit::Socket => self.socket,
        }
    }

    /// How sshd is started: by the socket when it is enabled or listening.
    pub fn kind(&self) -> ListenerKind {
        if self.socket.exists && !self.socket.masked && (self.socket.enabled || self.socket.active)
        {
            ListenerKind::Socket
        } else {
            ListenerKind::Service
        }
    }
}

/// Something done to units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitAction {
    /// `systemctl start`.
    Start,
    /// `systemctl stop`.
    Stop,
    /// `systemctl reload` (sshd re-reads its config; sessions live on).
    Reload,
    /// `systemctl mask` (persistent: nothing can start it, not even a boot).
    Mask,
    /// `systemctl unmask`.
    Unmask,
}

impl UnitAction {
    /// The systemctl verb.
    pub fn verb(self) -> &'static str {
        match self {
            UnitAction::Start => "start",
            UnitAction::Stop => "stop",
            UnitAction::Reload => "reload",
            UnitAction::Mask => "mask",
            UnitAction::Unmask => "unmask",
        }
    }
}

/// The connection `sshd -T` evaluates `Match` blocks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The user logging in.
    pub user: String,
    /// The local port.
    pub port: u16,
}

/// The operations the access domain needs from the system. Errors are
/// what the tool said, for messages.
#[async_trait]
pub trait SshHost: Send + Sync + 'static {
    /// `sshd -t -f CONFIG`: whether sshd accepts the configuration.
    async fn check_config(&self, config: &Path) -> Result<(), String>;
    /// `sshd -T -f CONFIG -C …`: the settings sshd uses for `connection`.
    async fn effective(&self, config: &Path, connection: &Connection) -> Result<Effective, String>;
    /// sshd's version (`sshd -V`), or why it is unknown.
    async fn version(&self) -> String;
    /// The listener's units as systemd sees them.
    async fn listener(&self) -> Result<ListenerState, String>;
    /// Does `action` to `units`, in one systemctl call.
    async fn act(&self, action: UnitAction, units: &[Unit]) -> Result<(), String>;
    /// `systemctl daemon-reload` (after a unit's drop-in changed).
    async fn daemon_reload(&self) -> Result<(), String>;
    /// Connects to the loopback `port` and reads the server's first line
    /// within `timeout`: Ok with an SSH banner, else what was seen.
    async fn banner(&self, port: u16, timeout: Duration) -> Result<String, String>;
    /// The SSH sessions open now.
    async fn sessions(&self) -> Vec<SshSession>;
    /// Ends a session (SIGTERM to its sshd), by the pid `sessions` gave.
    async fn terminate(&self, pid: u32) -> Result<(), String>;
    /// Whether a user exists.
    async fn user_exists(&self, user: &str) -> Result<bool, String>;
    /// How sshd is driven here, for messages.
    fn describe(&self) -> String;
}

//! The systemd notify protocol: `READY=1` once the listeners are bound,
//! `STATUS=` with the one-line health summary, `WATCHDOG=1` at half of
//! `WatchdogSec`, and `STOPPING=1` on shutdown.
//!
//! Everything here is a no-op outside systemd (no `NOTIFY_SOCKET`), so the
//! binary runs the same anywhere.

use std::time::Duration;

use sd_notify::NotifyState;

/// Whether systemd is this machine's service manager: `/run/systemd/system`
/// exists (the test of `sd_booted(3)`). Then processes that must outlive the
/// agent (blobfuse2, setup scripts) go in a scope of their own, out of the
/// agent's cgroup, which systemd empties when the agent restarts.
pub fn booted() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

/// Talks to the service manager, if there is one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Notifier;

impl Notifier {
    /// Startup finished: the listeners are bound.
    pub fn ready(&self, status: &str) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// Replaces the status line shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        send(&[NotifyState::Status(status)]);
    }

    /// Shutdown started.
    pub fn stopping(&self) {
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// Tells the watchdog the agent is alive.
    pub fn watchdog(&self) {
        send(&[NotifyState::Watchdog]);
    }

    /// How often to ping the watchdog: half of `WatchdogSec`, as systemd
    /// recommends; `None` when the watchdog is off.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
    }
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        // Losing a notification is not fatal to the agent, but a lost READY=1
        // or WATCHDOG=1 gets it restarted, so say why.
        tracing::warn!(%error, "cannot notify systemd");
    }
}

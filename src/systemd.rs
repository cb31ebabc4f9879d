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
        send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
    }

    /// Replaces the status line shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        send(&[NotifyState::Status(&one_line(status))]);
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
        sd_notify::watchdog_enabled().map(ping_interval)
    }
}

/// Half of the watchdog timeout, as systemd recommends, so one late ping
/// does not get the agent killed.
fn ping_interval(watchdog_timeout: Duration) -> Duration {
    watchdog_timeout / 2
}

/// A `STATUS=` value must be one line: the protocol is newline-separated
/// `KEY=VALUE` assignments, so a newline in a condition's message would
/// end the status early and send the rest as a bogus assignment.
fn one_line(status: &str) -> String {
    status.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        // Losing a notification is not fatal to the agent, but a lost READY=1
        // or WATCHDOG=1 gets it restarted, so say why.
        tracing::warn!(%error, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_sent_as_one_line() {
        assert_eq!(
            one_line("disk FAILED: / is full\nREADY=1\r\n  more"),
            "disk FAILED: / is full READY=1 more"
        );
        assert_eq!(one_line("all ok"), "all ok");
    }

    #[test]
    fn watchdog_is_pinged_at_half_its_timeout() {
        assert_eq!(
            ping_interval(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        assert_eq!(
            ping_interval(Duration::from_micros(400_000)),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn notifications_outside_systemd_are_silent_no_ops() {
        // No NOTIFY_SOCKET in the test environment (cargo does not set it).
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            return;
        }
        let notifier = Notifier;
        notifier.ready("ok");
        notifier.status("ok");
        notifier.watchdog();
        notifier.stopping();
    }
}

//! SSH access: the policy the control plane sets (SSH on or off, the port,
//! the user and their keys, password authentication, TCP forwarding),
//! applied safely at any time, and the SSH sessions open now.
//!
//! # Layout
//! - [`AccessService`] (`service`): the handle: get and set the policy, list
//!   sessions (also for idle detection), the check at start and the periodic
//!   drift check, the `ssh` condition.
//! - `apply`: the state machine of a change: validate (`sshd -t` on a
//!   staged copy) → apply (files, then the listener: reload, never restart)
//!   → verify (an SSH banner on the port, `sshd -T` showing the policy) →
//!   roll back on any failure (the previous files and unit states).
//! - [`policy`]: the policy and its rules; [`keys`]: key lines with
//!   OpenSSH's grammar and their fingerprints.
//! - [`sshd_config`]: sshd's config language: the `Include` check, the
//!   drop-in, the staged main config, `sshd -T` read back.
//! - `fileset`: the files of a policy as one set (render, snapshot, write,
//!   restore, drift); `files`: directories and files through descriptors,
//!   written atomically.
//! - [`sessions`]: sessions from sshd's processes, utmp and logind.
//! - [`config`]: the `[access]` section; `settings`: the paths and names
//!   derived from it.
//!
//! The outside world (sshd, systemctl, the port, `/proc`) is reached only
//! through [`host::SshHost`]: [`system::SystemSsh`] is the real one, a
//! fake sits in [`fake`]. Knows nothing of gRPC.
//!
//! Files it writes: the drop-in (`access.drop_in`), one keys file per user
//! in `access.keys_dir` (only the policy's user has one), a staging copy
//! next to it for `sshd -t`, and for socket activation the socket unit's
//! drop-in `/etc/systemd/system/<socket_unit>.d/instance-agent.conf`.
//! Nothing is touched until a policy is set.

mod apply;
pub mod config;
mod files;
mod fileset;
pub mod host;
pub mod keys;
pub mod policy;
mod service;
pub mod sessions;
mod settings;
pub mod sshd_config;
pub mod system;

#[cfg(any(test, feature = "test-util"))]
pub mod fake;

#[cfg(test)]
mod tests;

pub use host::{ListenerKind, SshHost};
pub use policy::SshPolicy;
pub use service::{AccessService, PolicyView, SetOptions};
pub use sessions::SshSession;
pub use settings::AccessSettings;

/// A policy was refused, or applying it failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// A field of the policy breaks a rule (the key line, the port, no way in…).
    #[error("{field}: {problem}")]
    Invalid {
        /// The field, e.g. `authorized_keys[2]`.
        field: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
    /// The config forbids what the policy asks (password authentication).
    #[error("{field}: {problem}")]
    NotAllowed {
        /// The field.
        field: String,
        /// Why, naming the setting.
        problem: String,
    },
    /// The policy's user does not exist here.
    #[error("user: {user:?} does not exist on this instance, so SSH for it would leave no way in")]
    UnknownUser {
        /// The user.
        user: String,
    },
    /// sshd's configuration does not let the drop-in win (no `Include`, a
    /// `Match` or a keyword before it, an earlier drop-in); nothing changed.
    #[error("sshd's configuration does not let the agent's drop-in win, nothing was changed: {0}")]
    SshdConfig(String),
    /// `sshd -t` refused the configuration with the new drop-in; nothing changed.
    #[error("sshd -t refuses the configuration with the new policy, nothing was changed: {0}")]
    ConfigCheck(String),
    /// The system could not be read or prepared before anything changed
    /// (sshd or systemctl missing, a directory others may write).
    #[error("{what}: {message}")]
    Host {
        /// What was being done.
        what: &'static str,
        /// What went wrong.
        message: String,
    },
    /// Applying or verifying failed; the previous files and units are back.
    #[error("{cause}; rolled back to the previous SSH settings")]
    RolledBack {
        /// What failed.
        cause: String,
    },
    /// Applying failed and so did the rollback: SSH may be unreachable.
    #[error("{cause}; the rollback failed too, SSH may be unreachable: {rollback}")]
    RollbackFailed {
        /// What failed first.
        cause: String,
        /// What failed in the rollback.
        rollback: String,
    },
    /// The policy could not be recorded (it was rolled back).
    #[error("cannot record the SSH policy (rolled back): {0}")]
    Store(#[source] crate::store::StoreError),
}

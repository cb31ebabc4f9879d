//! The local Unix socket: bound once at start, owned by root and the
//! operator group with mode 0660, and told apart from a socket that another
//! running agent still answers on. The accept loop that identifies each
//! connection is in [`super::listen`].

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixListener;

/// The Unix socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Its directory could not be created.
    #[error("cannot prepare socket directory {path}: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be bound or given its mode.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The socket path.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another agent answers on the socket.
    #[error("another instance-agent is already listening on {0}; stop it first")]
    AlreadyRunning(PathBuf),
    /// The set-up did not finish in time.
    #[error("binding the Unix socket took over {} s (is the group lookup hanging?)", .0.as_secs())]
    TimedOut(Duration),
    /// The blocking set-up task panicked or was cancelled.
    #[error("Unix socket set-up task failed: {0}")]
    Task(String),
}

/// Longest the socket's set-up (a connect probe, a chmod, an NSS group
/// lookup that may ask LDAP) may take before the start fails.
const BIND_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the Unix socket off the runtime threads (see [`bind_blocking`]).
pub async fn bind(path: &Path, operator_group: &str) -> Result<UnixListener, SocketError> {
    let address = path.display().to_string();
    let (path, group) = (path.to_owned(), operator_group.to_owned());
    let task = tokio::task::spawn_blocking(move || bind_blocking(&path, &group));
    let listener = tokio::time::timeout(BIND_TIMEOUT, task)
        .await
        .map_err(|_| SocketError::TimedOut(BIND_TIMEOUT))?
        .map_err(|e| SocketError::Task(e.to_string()))??;
    UnixListener::from_std(listener).map_err(|source| SocketError::Bind { address, source })
}

/// Binds the Unix socket, owned by root and the operator group with mode
/// 0660 (root-only when the group does not exist). A socket file left by a
/// crashed agent is replaced; one that still answers belongs to a running agent.
/// Blocking: a connect probe, chmod, chown and an NSS lookup.
fn bind_blocking(
    path: &Path,
    operator_group: &str,
) -> Result<std::os::unix::net::UnixListener, SocketError> {
    let bind_err = |source| SocketError::Bind {
        address: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        // 0711: anyone may reach the socket by name, nobody may list the directory.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)
            .map_err(|source| SocketError::Directory {
                path: parent.to_owned(),
                source,
            })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::AlreadyRunning(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
    // Tokio takes it over on the runtime.
    listener.set_nonblocking(true).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    match nix::unistd::Group::from_name(operator_group) {
        Ok(Some(group)) => {
            // Only root may give a file away; an unprivileged agent (tests,
            // development) keeps its own group and says so.
            if let Err(error) = nix::unistd::chown(path, None, Some(group.gid)) {
                tracing::warn!(
                    socket = %path.display(),
                    group = operator_group,
                    %error,
                    "cannot give the socket to the operator group; operators cannot connect"
                );
            }
        }
        Ok(None) | Err(_) => tracing::warn!(
            socket = %path.display(),
            group = operator_group,
            "operator group does not exist: the socket is root-only (create the group or set operator.group)"
        ),
    }
    Ok(listener)
}

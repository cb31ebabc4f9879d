//! Connects to the daemon over its Unix socket, and turns "cannot connect"
//! into one line that names the path and the likely fix.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Where the daemon listens by default.
pub const DEFAULT_SOCKET: &str = "/run/instance-agent/agent.sock";

/// `--socket`, else `$INSTANCE_AGENT_SOCKET`, else the default.
pub fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("INSTANCE_AGENT_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| DEFAULT_SOCKET.into())
}

/// The daemon could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(String);

/// Opens a channel to the daemon, checking first that the socket answers so
/// the error can say why it does not.
pub async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    if let Err(error) = tokio::net::UnixStream::connect(socket).await {
        return Err(Unreachable(explain(socket, &error)).into());
    }
    let path = socket.to_owned();
    // The URI is required by the API but unused: the connector ignores it.
    let channel = Endpoint::try_from("http://instance-agent.local")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("cannot talk gRPC to {}", socket.display()))?;
    Ok(channel)
}

fn explain(socket: &Path, error: &std::io::Error) -> String {
    use std::io::ErrorKind;
    let path = socket.display();
    match error.kind() {
        ErrorKind::NotFound => format!(
            "instance-agent is not running: no socket at {path} (start it with `systemctl start instance-agent`, or pass --socket)"
        ),
        ErrorKind::ConnectionRefused => format!(
            "instance-agent is not running: {path} refuses connections (stale socket; start it with `systemctl start instance-agent`)"
        ),
        ErrorKind::PermissionDenied => format!(
            "permission denied on {path}: run as root or as a member of the group instance-operators"
        ),
        _ => format!("cannot connect to instance-agent at {path}: {error}"),
    }
}

/// When `error` is the agent closing the connection without answering —
/// what it does to a caller that is not root, not in `control_plane.uids`
/// and not in the operator group — one line saying so.
pub fn closed_by_agent(error: &anyhow::Error, socket: &Path) -> Option<String> {
    use std::io::ErrorKind;
    let status = error.downcast_ref::<tonic::Status>()?;
    if !matches!(
        status.code(),
        tonic::Code::Unknown | tonic::Code::Unavailable
    ) {
        return None;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    let mut closed = false;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            closed |= matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
            );
        }
        closed |= e.to_string().contains("connection closed");
        source = e.source();
    }
    closed.then(|| {
        format!(
            "the agent at {} closed the connection: only root, the uids in control_plane.uids and \
             members of the operator group (operator.group, default instance-operators) may use it",
            socket.display()
        )
    })
}

/// Exit status for "daemon unreachable" (sysexits.h EX_UNAVAILABLE).
pub const EX_UNAVAILABLE: u8 = 69;

/// Connects, or prints the one-line explanation and returns the exit code
/// when the daemon cannot be reached.
pub async fn connect_or_explain(socket: &Path) -> Result<Channel, std::process::ExitCode> {
    match connect(socket).await {
        Ok(channel) => Ok(channel),
        Err(error) => {
            eprintln!("instance-agent: {error:#}");
            Err(std::process::ExitCode::from(if error.is::<Unreachable>() {
                EX_UNAVAILABLE
            } else {
                1
            }))
        }
    }
}

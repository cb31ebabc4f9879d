//! Connects to the daemon over its Unix socket ("connect or explain"): one
//! classification of why the socket does not answer, one of why a call
//! failed ([`CallFailure`]: no answer in time, a refusal by the agent, the
//! agent closing the connection), the one line a command prints for each,
//! and the `--rpc-timeout` deadline itself (short for the diagnostics).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Where the daemon listens by default.
pub const DEFAULT_SOCKET: &str = "/run/instance-agent/agent.sock";

/// Default of `--rpc-timeout`: long enough for the slowest unary call
/// (`disk --reclaim` pruning Docker on a full disk), short enough that a
/// frozen agent does not hang the CLI forever.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(120);

/// Default of `--rpc-timeout` for the short diagnostics (`status`, the
/// daemon check of `doctor`): the agent answers them from memory, so an
/// operator hears within seconds that it does not.
pub const DIAGNOSTIC_TIMEOUT: Duration = Duration::from_secs(5);

/// The fix printed when the agent does not answer or closed the connection.
pub const SEE_SYSTEMCTL: &str =
    "see `systemctl status instance-agent` and `journalctl -u instance-agent`";

/// The deadline of unary calls (and of the connection handshake) for this
/// process, set once from `--rpc-timeout` before any command runs. A process
/// global rather than a parameter of every command: the CLI is one short
/// process, and each command's file stays untouched by it.
static RPC_TIMEOUT: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();

/// Sets the deadline of unary calls; `None` means none. Only the first call counts.
pub fn set_rpc_timeout(timeout: Option<Duration>) {
    let _ = RPC_TIMEOUT.set(timeout);
}

/// The deadline of unary calls for this process (`None`: none).
pub fn rpc_timeout() -> Option<Duration> {
    *RPC_TIMEOUT.get_or_init(|| Some(DEFAULT_RPC_TIMEOUT))
}

/// `--socket`, else `$INSTANCE_AGENT_SOCKET`, else the default.
pub fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("INSTANCE_AGENT_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| DEFAULT_SOCKET.into())
}

/// The daemon could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(String);

/// The socket answered [`reach`] and then refused the connection or was
/// gone: the agent went away in between (killed, crashed or restarting).
#[derive(Debug, thiserror::Error)]
#[error("the agent went away between two connections")]
struct WentAway;

/// Why the daemon's socket does not answer: one classification, which the
/// commands explain in one line ([`ConnectFailure::line`]) and `doctor` as
/// a problem and its fix ([`ConnectFailure::problem_and_fix`]).
#[derive(Debug)]
pub enum ConnectFailure {
    /// Something that is not a socket is at the path.
    NotASocket,
    /// Nothing is at the path.
    NoSocket,
    /// A socket nobody listens on: a stale one, left by an agent that died.
    Refused,
    /// The caller may not connect (not root, not in the operator group).
    PermissionDenied,
    /// The socket's backlog is full: the agent does not accept connections.
    Backlogged,
    /// Anything else.
    Other(std::io::Error),
}

impl ConnectFailure {
    /// `is_socket`: whether the path is a socket (`None` when it cannot be
    /// stat'ed).
    fn classify(error: std::io::Error, is_socket: Option<bool>) -> Self {
        use std::io::ErrorKind;
        // connect(2) on a regular file or a directory fails with ECONNREFUSED.
        if is_socket == Some(false) && error.kind() != ErrorKind::PermissionDenied {
            return Self::NotASocket;
        }
        match error.kind() {
            ErrorKind::NotFound => Self::NoSocket,
            ErrorKind::ConnectionRefused => Self::Refused,
            ErrorKind::PermissionDenied => Self::PermissionDenied,
            ErrorKind::WouldBlock => Self::Backlogged,
            _ => Self::Other(error),
        }
    }

    /// One line saying why `socket` cannot be reached and what to do.
    pub fn line(&self, socket: &Path) -> String {
        let path = socket.display();
        match self {
            Self::NotASocket => format!(
                "{path} is not a socket: pass the agent's socket with --socket (default {DEFAULT_SOCKET})"
            ),
            Self::NoSocket => format!(
                "instance-agent is not running: no socket at {path} (start it with `systemctl start instance-agent`, or pass --socket)"
            ),
            Self::Refused => format!(
                "instance-agent is not running: {path} refuses connections (stale socket; start it with `systemctl start instance-agent`)"
            ),
            Self::PermissionDenied => format!(
                "permission denied on {path}: run as root or as a member of the group instance-operators"
            ),
            Self::Backlogged => format!(
                "the agent at {path} does not accept connections (its backlog is full): it may be hung or overloaded; {SEE_SYSTEMCTL}"
            ),
            Self::Other(error) => format!("cannot connect to instance-agent at {path}: {error}"),
        }
    }

    /// What is wrong with `socket`, and the fix, as two sentences.
    pub fn problem_and_fix(&self, socket: &Path) -> (String, String) {
        let path = socket.display();
        let (problem, fix) = match self {
            Self::NotASocket => (
                format!("{path} is not a socket"),
                format!("pass the agent's socket with --socket (default {DEFAULT_SOCKET})"),
            ),
            Self::NoSocket => (
                format!("the agent is not running: no socket at {path}"),
                "start it: `systemctl start instance-agent` (or pass --socket)".to_owned(),
            ),
            Self::Refused => (
                format!("the agent is not running: {path} refuses connections (stale socket)"),
                "start it: `systemctl start instance-agent`".to_owned(),
            ),
            Self::PermissionDenied => (
                format!("permission denied on {path}"),
                "run as root or as a member of the group instance-operators".to_owned(),
            ),
            Self::Backlogged => (
                format!(
                    "the agent does not accept connections on {path} (its backlog is full): it may be hung or overloaded"
                ),
                SEE_SYSTEMCTL.to_owned(),
            ),
            Self::Other(error) => (
                format!("cannot connect to {path}: {error}"),
                "check --socket and that the agent runs: `systemctl status instance-agent`"
                    .to_owned(),
            ),
        };
        (problem, fix)
    }
}

/// Connects to `socket` once, without gRPC, to learn whether it answers and
/// why not.
pub async fn reach(socket: &Path) -> Result<(), ConnectFailure> {
    let Err(error) = tokio::net::UnixStream::connect(socket).await else {
        return Ok(());
    };
    let is_socket = tokio::fs::metadata(socket).await.ok().map(|meta| {
        use std::os::unix::fs::FileTypeExt;
        meta.file_type().is_socket()
    });
    Err(ConnectFailure::classify(error, is_socket))
}

/// Opens a channel to the daemon, checking first that the socket answers so
/// the error can say why it does not.
pub async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    if let Err(failure) = reach(socket).await {
        return Err(Unreachable(failure.line(socket)).into());
    }
    let path = socket.to_owned();
    // The URI is required by the API but unused: the connector ignores it.
    let mut endpoint = Endpoint::try_from("http://instance-agent.local")?;
    if let Some(timeout) = rpc_timeout() {
        // Covers a unary call until its reply, and a streaming call until
        // the stream starts: `-f`/`--watch` streams are not cut.
        endpoint = endpoint.timeout(timeout).connect_timeout(timeout);
    }
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|error| {
            let refused = std::error::Error::source(&error)
                .into_iter()
                .flat_map(|e| std::iter::successors(Some(e), |e| e.source()))
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|io| {
                    matches!(
                        io.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    )
                });
            if refused {
                anyhow::Error::new(WentAway)
            } else {
                anyhow::Error::new(error)
            }
        })
        .with_context(|| format!("cannot talk gRPC to {}", socket.display()))?;
    Ok(channel)
}

/// Exit status for "daemon unreachable" (sysexits.h EX_UNAVAILABLE).
pub const EX_UNAVAILABLE: u8 = 69;

/// "Connect or explain", for every command that talks to the daemon:
/// connects, then runs `command` on the channel. When the daemon cannot be
/// reached, prints why in one line and returns its [`exit_code`]. Errors of
/// the command itself are explained by [`explain`].
pub async fn with_channel<F, Fut>(socket: &Path, command: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(Channel) -> Fut,
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    match connect(socket).await {
        Ok(channel) => command(channel).await,
        Err(error) => {
            eprintln!("instance-agent: {}", explain(&error, socket));
            Ok(exit_code(&error))
        }
    }
}

/// The exit status of a command that failed with `error`: 69 when the
/// daemon is unavailable (the socket does not answer, or the agent closed
/// the connection: restarting or crashed), 1 otherwise (a refusal, a call
/// past its deadline, the socket answering but not with gRPC).
pub fn exit_code(error: &anyhow::Error) -> ExitCode {
    if error.is::<Unreachable>() || CallFailure::of(error) == Some(CallFailure::Closed) {
        ExitCode::from(EX_UNAVAILABLE)
    } else {
        ExitCode::FAILURE
    }
}

/// Why a call to the agent failed, for the failures a person needs told in
/// words.
#[derive(Debug, PartialEq, Eq)]
pub enum CallFailure {
    /// No answer within the deadline (`--rpc-timeout`).
    TimedOut,
    /// The agent refused this caller (PERMISSION_DENIED), with its words:
    /// a local user without a role, or a role that may not call this RPC.
    Refused(String),
    /// The connection was closed without an answer: the agent is
    /// restarting or crashed (a refusal would have said so).
    Closed,
}

impl CallFailure {
    /// The failure `error` is, if it is one of these.
    pub fn of(error: &anyhow::Error) -> Option<Self> {
        if error.chain().any(is_timeout) {
            return Some(Self::TimedOut);
        }
        if error.chain().any(|e| e.is::<WentAway>()) {
            return Some(Self::Closed);
        }
        match error.downcast_ref::<tonic::Status>() {
            Some(status) => Self::of_status(status),
            // The HTTP/2 handshake of `connect`: a transport error.
            None => is_closed(error.as_ref()).then_some(Self::Closed),
        }
    }

    /// The failure `status` is, if it is one of these.
    pub fn of_status(status: &tonic::Status) -> Option<Self> {
        if is_timeout(status) {
            return Some(Self::TimedOut);
        }
        match status.code() {
            tonic::Code::PermissionDenied => Some(Self::Refused(status.message().to_owned())),
            // CANCELLED: hyper's "connection closed" under a call in flight.
            tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
                if is_closed(status) =>
            {
                Some(Self::Closed)
            }
            _ => None,
        }
    }

    /// One line saying what happened on `socket` and what to do.
    pub fn line(&self, socket: &Path) -> String {
        let path = socket.display();
        match self {
            Self::TimedOut => format!(
                "the agent at {path} did not answer within {} s: it may be hung or overloaded ({SEE_SYSTEMCTL}), \
                 or the call needs longer (--rpc-timeout SECONDS, 0 for none)",
                rpc_timeout().map_or(0, |t| t.as_secs())
            ),
            Self::Refused(message) => format!("permission denied: {message}"),
            Self::Closed => format!(
                "the agent at {path} closed the connection (restarting or crashed?): {SEE_SYSTEMCTL}"
            ),
        }
    }
}

/// tonic reports its own deadline as CANCELLED "Timeout expired" (a call)
/// or as a transport error of the same text (the connection handshake).
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<tonic::Status>().map_or_else(
        || e.to_string().contains("Timeout expired"),
        |status| {
            status.code() == tonic::Code::Cancelled && status.message().contains("Timeout expired")
        },
    )
}

/// Whether `error` (a status or a transport error) comes from the
/// connection going away: the peer closed it (EOF, "connection closed"),
/// reset it, or was gone when the client wrote (EPIPE).
fn is_closed(error: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut source = Some(error);
    let mut closed = false;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            closed |= matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
            );
        }
        let text = e.to_string();
        closed |= text.contains("connection closed")
            || text.contains("connection reset")
            || text.contains("connection error");
        source = e.source();
    }
    closed
}

/// The one line a failed command prints: a call that got no answer in
/// time, a refusal and the agent closing the connection are said in words,
/// anything else as its chain of causes.
pub fn explain(error: &anyhow::Error, socket: &Path) -> String {
    CallFailure::of(error).map_or_else(|| format!("{error:#}"), |failure| failure.line(socket))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    fn explained(kind: ErrorKind, is_socket: Option<bool>) -> String {
        ConnectFailure::classify(Error::from(kind), is_socket).line(Path::new("/run/x.sock"))
    }

    #[test]
    fn each_failure_is_one_line_with_the_path_and_a_fix() {
        let missing = explained(ErrorKind::NotFound, None);
        assert!(
            missing.contains("not running: no socket at /run/x.sock"),
            "{missing}"
        );
        assert!(missing.contains("systemctl start"), "{missing}");
        let stale = explained(ErrorKind::ConnectionRefused, Some(true));
        assert!(
            stale.contains("/run/x.sock refuses connections (stale socket"),
            "{stale}"
        );
        let denied = explained(ErrorKind::PermissionDenied, Some(true));
        assert!(
            denied.contains("permission denied on /run/x.sock"),
            "{denied}"
        );
        assert!(denied.contains("instance-operators"), "{denied}");
        let other = explained(ErrorKind::TimedOut, None);
        assert!(
            other.starts_with("cannot connect to instance-agent at /run/x.sock"),
            "{other}"
        );
        for line in [missing, stale, denied, other] {
            assert_eq!(line.lines().count(), 1, "{line}");
        }
    }

    #[test]
    fn doctor_names_the_same_failure_with_its_fix() {
        let path = Path::new("/run/x.sock");
        for (kind, is_socket, says) in [
            (ErrorKind::NotFound, None, "no socket at"),
            (ErrorKind::ConnectionRefused, Some(true), "stale socket"),
            (ErrorKind::ConnectionRefused, Some(false), "is not a socket"),
            (
                ErrorKind::PermissionDenied,
                Some(false),
                "permission denied",
            ),
            (ErrorKind::TimedOut, None, "cannot connect"),
        ] {
            let failure = ConnectFailure::classify(Error::from(kind), is_socket);
            let (problem, fix) = failure.problem_and_fix(path);
            assert!(problem.contains("/run/x.sock"), "{problem}");
            assert!(problem.contains(says), "{kind:?}: {problem}");
            assert!(!fix.is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn a_deadline_is_reported_with_the_socket_and_the_flag() {
        let socket = Path::new("/run/x.sock");
        let status = tonic::Status::cancelled("Timeout expired");
        let msg = explain(&status.into(), socket);
        assert!(msg.contains("/run/x.sock did not answer within"), "{msg}");
        assert!(msg.contains("hung or overloaded"), "{msg}");
        assert!(msg.contains("systemctl status instance-agent"), "{msg}");
        assert!(msg.contains("--rpc-timeout"), "{msg}");
        let other = tonic::Status::cancelled("cancelled by the agent");
        assert_eq!(CallFailure::of(&other.into()), None);
    }

    #[test]
    fn a_refusal_and_a_close_are_told_apart() {
        let socket = Path::new("/run/x.sock");
        let refused = tonic::Status::permission_denied("uid 7 may not use instance-agent");
        assert_eq!(
            explain(&refused.into(), socket),
            "permission denied: uid 7 may not use instance-agent"
        );
        let closed = tonic::Status::unavailable("error trying to connect: connection closed");
        let line = explain(&closed.into(), socket);
        assert!(
            line.contains("closed the connection (restarting or crashed?)"),
            "{line}"
        );
        assert!(!line.contains("operator"), "{line}");
    }

    #[test]
    fn a_file_or_directory_at_the_path_is_not_a_socket() {
        // connect(2) on a regular file or a directory fails with ECONNREFUSED.
        let msg = explained(ErrorKind::ConnectionRefused, Some(false));
        assert!(msg.starts_with("/run/x.sock is not a socket"), "{msg}");
        assert!(!msg.contains("stale"), "{msg}");
    }

    #[tokio::test]
    async fn connect_names_a_regular_file_as_not_a_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("agent.sock");
        std::fs::write(&file, "").expect("write");
        for path in [file.as_path(), dir.path()] {
            let error = connect(path).await.expect_err("not a socket");
            assert!(error.is::<Unreachable>());
            assert!(error.to_string().contains("is not a socket"), "{error}");
        }
    }

    /// An agent on its way down accepts and closes: whether the close comes
    /// before the client wrote its preface (EPIPE), during the handshake or
    /// under the call, the line is the same.
    #[tokio::test]
    async fn a_close_at_any_point_is_reported_as_a_restarting_or_crashed_agent() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            for n in 0usize.. {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                if n % 2 == 1 {
                    let _ = stream.read(&mut [0u8; 64]).await;
                }
            }
        });
        for _ in 0..20 {
            let error = match connect(&path).await {
                Err(error) => error,
                Ok(channel) => {
                    crate::api::proto::agent_service_client::AgentServiceClient::new(channel)
                        .get_status(crate::api::proto::GetStatusRequest {})
                        .await
                        .expect_err("closed")
                        .into()
                }
            };
            assert_eq!(
                CallFailure::of(&error),
                Some(CallFailure::Closed),
                "{error:#}"
            );
        }
        server.abort();
    }
}

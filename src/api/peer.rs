//! Who is on the other end of a connection, decided once when it is
//! accepted: the Unix socket's peer credentials (SO_PEERCRED) and group
//! membership, or the control plane's verified certificate.
//!
//! Each accepted stream is wrapped in [`Authenticated`], whose connect info
//! ([`Peer`]) tonic puts into every request's extensions, where the guard
//! layer reads it. A connection whose peer has no role is closed before a
//! single byte of HTTP/2 is exchanged.

use std::ffi::CString;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::auth::Role;
use super::config::ApiConfig;

/// The caller of a connection, with its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// What it may do.
    pub role: Role,
    /// Who it is.
    pub who: Who,
}

/// Who made `request`, with its role, in words (for records of who asked).
pub fn caller<T>(request: &tonic::Request<T>) -> String {
    request
        .extensions()
        .get::<Peer>()
        .map(|peer| format!("{} ({})", peer.who, peer.role.name()))
        .unwrap_or_else(|| "unknown caller".into())
}

/// The identity behind a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// A local process on the Unix socket.
    Local {
        /// Its uid (SO_PEERCRED).
        uid: u32,
        /// The user name, when the uid has one.
        user: Option<String>,
        /// Its pid at connect time.
        pid: Option<i32>,
    },
    /// The control plane, by its verified client certificate.
    Certificate {
        /// Subject CN, else the first DNS SAN.
        name: String,
        /// Where it connects from.
        addr: SocketAddr,
    },
    /// A plaintext loopback client (`insecure_plaintext`, testing only).
    Plaintext {
        /// Where it connects from.
        addr: SocketAddr,
    },
}

impl Who {
    /// The key its limits are counted under: one bucket per uid, per
    /// certificate name, or per plaintext source address.
    pub fn limit_key(&self) -> String {
        match self {
            Who::Local { uid, .. } => format!("uid:{uid}"),
            Who::Certificate { name, .. } => format!("cert:{name}"),
            Who::Plaintext { addr } => format!("plaintext:{}", addr.ip()),
        }
    }
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Local {
                uid,
                user: Some(user),
                ..
            } => write!(f, "uid {uid} ({user})"),
            Who::Local {
                uid, user: None, ..
            } => write!(f, "uid {uid}"),
            Who::Certificate { name, addr } => write!(f, "certificate {name:?} from {addr}"),
            Who::Plaintext { addr } => write!(f, "plaintext client {addr}"),
        }
    }
}

/// The system's user and group database, behind a trait so role
/// resolution can be tested without creating users.
pub trait UserDirectory: Send + Sync {
    /// The user name of `uid`, if it has one.
    fn user_name(&self, uid: u32) -> Option<String>;
    /// Whether `uid` is a member of `group` (primary or supplementary).
    fn is_member(&self, uid: u32, group: &str) -> bool;
}

/// The real user database (NSS through libc). Blocking.
pub struct SystemUsers;

impl UserDirectory for SystemUsers {
    fn user_name(&self, uid: u32) -> Option<String> {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name)
    }

    fn is_member(&self, uid: u32, group: &str) -> bool {
        let Ok(Some(group)) = nix::unistd::Group::from_name(group) else {
            return false;
        };
        let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
            return false;
        };
        if user.gid == group.gid || group.mem.contains(&user.name) {
            return true;
        }
        // Also covers memberships that NSS sources other than /etc/group list.
        let Ok(name) = CString::new(user.name) else {
            return false;
        };
        nix::unistd::getgrouplist(&name, user.gid)
            .map(|groups| groups.contains(&group.gid))
            .unwrap_or(false)
    }
}

/// The role of a local uid: root and `control_plane.uids` are admin,
/// members of `operator.group` are operators, anyone else has none.
/// Blocking (it may query NSS).
pub fn local_peer(
    uid: u32,
    pid: Option<i32>,
    config: &ApiConfig,
    users: &dyn UserDirectory,
) -> Option<Peer> {
    let user = users.user_name(uid);
    let role = if uid == 0 || config.control_plane.uids.contains(&uid) {
        Role::Admin
    } else if users.is_member(uid, &config.operator.group) {
        Role::Operator
    } else {
        return None;
    };
    Some(Peer {
        role,
        who: Who::Local { uid, user, pid },
    })
}

/// A stream whose peer has been identified. tonic hands its [`Peer`] to
/// every request on it.
pub struct Authenticated<S> {
    stream: S,
    peer: Peer,
    /// Its place among the peer's connections, given back when it closes.
    _slot: Option<super::limits::ConnectionSlot>,
}

impl<S> Authenticated<S> {
    /// Wraps an accepted stream with its peer.
    pub fn new(stream: S, peer: Peer) -> Self {
        Self {
            stream,
            peer,
            _slot: None,
        }
    }

    /// Holds `slot` for as long as the connection lasts.
    pub fn with_slot(mut self, slot: super::limits::ConnectionSlot) -> Self {
        self._slot = Some(slot);
        self
    }
}

impl<S> tonic::transport::server::Connected for Authenticated<S> {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Authenticated<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Authenticated<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Users 1000 (alice, operator) and 1001 (bob, no group).
    pub(crate) struct FakeUsers;

    impl UserDirectory for FakeUsers {
        fn user_name(&self, uid: u32) -> Option<String> {
            match uid {
                0 => Some("root".into()),
                1000 => Some("alice".into()),
                1001 => Some("bob".into()),
                _ => None,
            }
        }
        fn is_member(&self, uid: u32, group: &str) -> bool {
            uid == 1000 && group == "instance-operators"
        }
    }

    #[test]
    fn roles_from_uid_and_group() {
        let mut config = ApiConfig::default();
        config.control_plane.uids = vec![1001];
        let root = local_peer(0, Some(1), &config, &FakeUsers).unwrap();
        assert_eq!(root.role, Role::Admin);
        let alice = local_peer(1000, None, &config, &FakeUsers).unwrap();
        assert_eq!(alice.role, Role::Operator);
        assert_eq!(alice.who.to_string(), "uid 1000 (alice)");
        let bob = local_peer(1001, None, &config, &FakeUsers).unwrap();
        assert_eq!(bob.role, Role::Admin, "listed in control_plane.uids");
        config.control_plane.uids.clear();
        assert!(local_peer(1001, None, &config, &FakeUsers).is_none());
        assert!(local_peer(4242, None, &config, &FakeUsers).is_none());
    }

    #[test]
    fn limit_keys_separate_peers() {
        let a = Who::Local {
            uid: 1,
            user: None,
            pid: Some(5),
        };
        let b = Who::Local {
            uid: 1,
            user: None,
            pid: Some(6),
        };
        assert_eq!(a.limit_key(), b.limit_key(), "same uid, same bucket");
        let c = Who::Certificate {
            name: "cp".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
        };
        assert_ne!(a.limit_key(), c.limit_key());
    }
}

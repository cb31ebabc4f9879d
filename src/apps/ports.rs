//! Host ports: picking a free one for `host_port = 0`, and telling, before
//! a container is created, that a fixed one is taken (and by whom, when the
//! user is another app). The engine's own refusal at start is the final
//! word (a port can be taken between the check and the start); this check
//! turns the common case into a clear error.

use std::net::{IpAddr, SocketAddr, TcpListener};

/// A port is not available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// Something listens on it.
    #[error("host port {ip}:{port} is already in use{}", user.as_ref().map(|u| format!(" by {u}")).unwrap_or_default())]
    InUse {
        /// Host address.
        ip: String,
        /// Port.
        port: u32,
        /// Who holds it, when known (another app).
        user: Option<String>,
    },
    /// No free port could be found or bound.
    #[error("cannot pick a free port on {ip}: {message}")]
    NoneFree {
        /// Host address.
        ip: String,
        /// Why.
        message: String,
    },
}

/// Binds `ip:port` and lets it go: Ok when nothing holds it now.
/// Blocking-free (a bind is immediate), so it may run on the runtime.
pub fn check_free(ip: &str, port: u32) -> Result<(), PortError> {
    let addr = socket_addr(ip, port)?;
    match TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(PortError::InUse {
            ip: ip.to_owned(),
            port,
            user: None,
        }),
        Err(e) => Err(PortError::NoneFree {
            ip: ip.to_owned(),
            message: e.to_string(),
        }),
    }
}

/// A port free on `ip` now (the kernel's choice from its ephemeral range),
/// avoiding `taken` (ports other apps hold, running or not).
pub fn pick_free(ip: &str, taken: &[u32]) -> Result<u32, PortError> {
    let addr = socket_addr(ip, 0)?;
    for _ in 0..32 {
        let listener = TcpListener::bind(addr).map_err(|e| PortError::NoneFree {
            ip: ip.to_owned(),
            message: e.to_string(),
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| PortError::NoneFree {
                ip: ip.to_owned(),
                message: e.to_string(),
            })?
            .port()
            .into();
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
    Err(PortError::NoneFree {
        ip: ip.to_owned(),
        message: "every port offered is held by another app".into(),
    })
}

fn socket_addr(ip: &str, port: u32) -> Result<SocketAddr, PortError> {
    let ip: IpAddr = ip.parse().map_err(|_| PortError::NoneFree {
        ip: ip.to_owned(),
        message: "not an IP address".into(),
    })?;
    let port = u16::try_from(port).map_err(|_| PortError::NoneFree {
        ip: ip.to_string(),
        message: format!("port {port} is out of range"),
    })?;
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_port_is_in_use_and_a_picked_one_is_free() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = u32::from(held.local_addr().unwrap().port());
        let error = check_free("127.0.0.1", port).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("host port 127.0.0.1:{port} is already in use")
        );
        let picked = pick_free("127.0.0.1", &[port]).unwrap();
        assert_ne!(picked, port);
        assert_eq!(check_free("127.0.0.1", picked), Ok(()));
    }
}

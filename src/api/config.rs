//! The sections the API layer owns: `[control_plane]` (the TCP listener and
//! the admin uids), `[operator]` (the local operators' group and grants) and
//! `[limits]` (bounds on every client): structs, defaults, ranges and
//! validation, and [`ApiConfig`], the three together as the guard and the
//! listeners read them live.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::validate::{self, FieldError, check_ranges};

/// `[control_plane]`: the TCP listener the control plane calls (mutual TLS),
/// and which local uids count as the control plane on the Unix socket.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// `ip:port` to listen on (host names are not resolved); off when empty.
    pub listen: String,
    /// The listener's certificate chain (PEM).
    pub tls_cert: PathBuf,
    /// The listener's private key (PEM); refused if group or others can read it.
    pub tls_key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to.
    pub client_ca: PathBuf,
    /// Client certificate names (subject CN or DNS SAN, ASCII case
    /// ignored) allowed; any name signed by `client_ca` when empty.
    pub allowed_client_names: Vec<String>,
    /// Local uids that are admin on the Unix socket (root always is).
    pub uids: Vec<u32>,
    /// Serve plain HTTP/2 without TLS. Allowed only on a loopback address.
    pub insecure_plaintext: bool,
}

/// `[operator]`: the local operators' group and what it may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OperatorConfig {
    /// Members of this group get the operator role on the Unix socket, which
    /// is owned by it (mode 0660).
    pub group: String,
    /// Let operators cancel jobs.
    pub allow_cancel_job: bool,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            group: "instance-operators".into(),
            allow_cancel_job: false,
        }
    }
}

/// `[limits]`: bounds applied to every client before any service runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request message, in bytes.
    pub max_message_bytes: u32,
    /// Streaming RPCs (WatchEvents, Stream*, Watch*) one peer may hold open.
    pub max_streams_per_peer: u32,
    /// Requests per second one peer may sustain (token bucket refill).
    pub requests_per_second_per_peer: u32,
    /// Requests one peer may send in a burst (token bucket size).
    pub request_burst_per_peer: u32,
    /// Connections one peer may hold open at once (both listeners).
    pub max_connections_per_peer: u32,
    /// Connections the agent serves at once, all peers and both listeners.
    pub max_connections: u32,
    /// Streams (calls) open at once on one HTTP/2 connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Bytes of request bodies one peer may have in the agent's buffers at
    /// once (received, not yet decoded).
    pub max_inflight_bytes_per_peer: u32,
    /// The same, all peers together.
    pub max_inflight_bytes: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            max_streams_per_peer: 32,
            requests_per_second_per_peer: 200,
            request_burst_per_peer: 400,
            max_connections_per_peer: 32,
            max_connections: 256,
            max_concurrent_streams: 64,
            max_inflight_bytes_per_peer: 8 << 20,
            max_inflight_bytes: 16 << 20,
        }
    }
}

/// The API's three sections, as the guard and the Unix listener read them
/// from the live config (roles, grants and limits change without a restart).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ApiConfig {
    /// `[control_plane]`.
    pub control_plane: ControlPlaneConfig,
    /// `[operator]`.
    pub operator: OperatorConfig,
    /// `[limits]`.
    pub limits: LimitsConfig,
}

impl ControlPlaneConfig {
    /// The TCP address, when the listener is configured.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }

    /// Checks the section; keys are relative to `[control_plane]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (i, name) in self.allowed_client_names.iter().enumerate() {
            if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
                return Err(FieldError::new(
                    format!("allowed_client_names[{i}]"),
                    format!("{name:?} must be 1 to 255 printable characters"),
                ));
            }
        }
        if self.listen.is_empty() {
            return Ok(());
        }
        let addr: SocketAddr = self.listen.parse().map_err(|_| {
            FieldError::new(
                "listen",
                format!(
                    "{:?} is not an IP address and port, e.g. 127.0.0.1:7443 or 0.0.0.0:7443 \
                     (host names are not resolved)",
                    self.listen
                ),
            )
        })?;
        let tls_files = [
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("client_ca", &self.client_ca),
        ];
        if self.insecure_plaintext {
            if !addr.ip().is_loopback() {
                return Err(FieldError::new(
                    "insecure_plaintext",
                    format!("plaintext is allowed only on a loopback address, not {addr}"),
                ));
            }
            if let Some((key, _)) = tls_files.iter().find(|(_, p)| !p.as_os_str().is_empty()) {
                return Err(FieldError::new(
                    *key,
                    "must be empty when insecure_plaintext = true (TLS and plaintext exclude each other)",
                ));
            }
            return Ok(());
        }
        for (key, file) in tls_files {
            if file.as_os_str().is_empty() {
                return Err(FieldError::new(
                    key,
                    "must be set when listen is set: the control plane is served only over \
                     mutual TLS (or set insecure_plaintext = true on a loopback address for testing)",
                ));
            }
            validate::absolute(key, file)?;
        }
        Ok(())
    }
}

impl OperatorConfig {
    /// Checks the section; keys are relative to `[operator]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        let group = &self.group;
        let valid = !group.is_empty()
            && group.len() <= 32
            && !group.starts_with('-')
            && group
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if valid {
            Ok(())
        } else {
            Err(FieldError::new(
                "group",
                format!("{group:?} is not a group name ([A-Za-z0-9_.-], at most 32)"),
            ))
        }
    }
}

impl LimitsConfig {
    /// Checks the section; keys are relative to `[limits]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_ranges(&[
            (
                "max_message_bytes",
                self.max_message_bytes.into(),
                16 << 10,
                256 << 20,
            ),
            (
                "max_streams_per_peer",
                self.max_streams_per_peer.into(),
                1,
                10_000,
            ),
            (
                "requests_per_second_per_peer",
                self.requests_per_second_per_peer.into(),
                1,
                1_000_000,
            ),
            (
                "request_burst_per_peer",
                self.request_burst_per_peer.into(),
                1,
                1_000_000,
            ),
            (
                "max_connections_per_peer",
                self.max_connections_per_peer.into(),
                1,
                10_000,
            ),
            ("max_connections", self.max_connections.into(), 1, 60_000),
            (
                "max_concurrent_streams",
                self.max_concurrent_streams.into(),
                1,
                10_000,
            ),
            (
                "max_inflight_bytes_per_peer",
                self.max_inflight_bytes_per_peer.into(),
                64 << 10,
                2 << 30,
            ),
            (
                "max_inflight_bytes",
                self.max_inflight_bytes.into(),
                64 << 10,
                2 << 30,
            ),
        ])?;
        // A peer must be able to send one message of the largest size.
        let message = u64::from(self.max_message_bytes) + 5;
        if u64::from(self.max_inflight_bytes_per_peer) < message {
            return Err(FieldError::new(
                "max_inflight_bytes_per_peer",
                format!(
                    "{} is below max_message_bytes + 5 = {message}: no peer could send the largest message",
                    self.max_inflight_bytes_per_peer
                ),
            ));
        }
        if self.max_inflight_bytes < self.max_inflight_bytes_per_peer {
            return Err(FieldError::new(
                "max_inflight_bytes",
                format!(
                    "{} is below max_inflight_bytes_per_peer = {}",
                    self.max_inflight_bytes, self.max_inflight_bytes_per_peer
                ),
            ));
        }
        if self.max_connections < self.max_connections_per_peer {
            return Err(FieldError::new(
                "max_connections",
                format!(
                    "{} is below max_connections_per_peer = {}",
                    self.max_connections, self.max_connections_per_peer
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control_plane(text: &str) -> Result<(), FieldError> {
        toml::from_str::<ControlPlaneConfig>(text)
            .expect("parses")
            .validate()
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(ControlPlaneConfig::default().validate(), Ok(()));
        assert_eq!(OperatorConfig::default().validate(), Ok(()));
        assert_eq!(LimitsConfig::default().validate(), Ok(()));
        assert_eq!(ControlPlaneConfig::default().addr(), None);
    }

    #[test]
    fn plaintext_tcp_only_on_loopback() {
        let ok = "listen = \"127.0.0.1:7443\"\ninsecure_plaintext = true\n";
        assert_eq!(control_plane(ok), Ok(()));
        let remote = "listen = \"0.0.0.0:7443\"\ninsecure_plaintext = true\n";
        let error = control_plane(remote).unwrap_err();
        assert!(error.problem.contains("loopback"), "{error:?}");
        let no_tls = "listen = \"127.0.0.1:7443\"\n";
        assert_eq!(control_plane(no_tls).unwrap_err().key, "tls_cert");
        let mixed = "listen = \"127.0.0.1:7443\"\ninsecure_plaintext = true\ntls_key = \"/k\"\n";
        assert_eq!(control_plane(mixed).unwrap_err().key, "tls_key");
    }

    #[test]
    fn control_plane_listen_is_an_ip_address_not_a_host_name() {
        let text = "listen = \"localhost:7443\"\ninsecure_plaintext = true\n";
        let error = control_plane(text).unwrap_err();
        assert_eq!(error.key, "listen");
        assert!(
            error.problem.contains("an IP address and port"),
            "{error:?}"
        );
        assert!(error.problem.contains("127.0.0.1:7443"), "{error:?}");
        assert!(
            error.problem.contains("host names are not resolved"),
            "{error:?}"
        );
    }

    #[test]
    fn tls_listener_needs_absolute_files() {
        let tls = "listen = \"0.0.0.0:7443\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\nclient_ca = \"/ca.pem\"\n";
        assert_eq!(control_plane(tls), Ok(()));
        let relative = tls.replace("/ca.pem", "ca.pem");
        assert_eq!(control_plane(&relative).unwrap_err().key, "client_ca");
    }

    #[test]
    fn limits_and_operator_group_are_checked() {
        let limits = LimitsConfig {
            max_message_bytes: 10,
            ..LimitsConfig::default()
        };
        assert_eq!(limits.validate().unwrap_err().key, "max_message_bytes");
        let limits = LimitsConfig {
            max_inflight_bytes_per_peer: 1 << 20,
            ..LimitsConfig::default()
        };
        let error = limits.validate().unwrap_err();
        assert_eq!(error.key, "max_inflight_bytes_per_peer");
        assert!(error.problem.contains("max_message_bytes"), "{error:?}");
        let limits = LimitsConfig {
            max_inflight_bytes: 1 << 20,
            max_inflight_bytes_per_peer: 1 << 20,
            max_message_bytes: 16 << 10,
            max_connections: 4,
            ..LimitsConfig::default()
        };
        assert_eq!(limits.validate().unwrap_err().key, "max_connections");
        let operator = OperatorConfig {
            group: "a b".into(),
            ..OperatorConfig::default()
        };
        assert_eq!(operator.validate().unwrap_err().key, "group");
    }
}

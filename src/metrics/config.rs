//! The `[metrics]` section: where the Prometheus endpoint listens, its
//! default and its validation (loopback only, or off).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::validate::{FieldError, check_ranges};

/// `[metrics]`: the Prometheus text endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Loopback host:port serving `GET /metrics`; off when empty.
    pub listen: String,
    /// Connections served at once; past it, a new one replaces the oldest
    /// that has not sent its request yet.
    pub max_connections: u32,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            max_connections: 16,
        }
    }
}

impl MetricsConfig {
    /// The listener's address, when metrics are on.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }

    /// Checks the section; keys are relative to `[metrics]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_ranges(&[("max_connections", self.max_connections.into(), 1, 1024)])?;
        let listen = &self.listen;
        if listen.is_empty() {
            return Ok(());
        }
        let addr: SocketAddr = listen.parse().map_err(|_| {
            FieldError::new(
                "listen",
                format!("{listen:?} is not an address of the form host:port (e.g. 127.0.0.1:9464)"),
            )
        })?;
        if !addr.ip().is_loopback() {
            return Err(FieldError::new(
                "listen",
                format!(
                    "{addr} is not a loopback address: metrics are served without TLS or auth, \
                     so only 127.0.0.1 or [::1] is allowed (empty turns them off)"
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(listen: &str) -> MetricsConfig {
        MetricsConfig {
            listen: listen.into(),
            ..MetricsConfig::default()
        }
    }

    #[test]
    fn metrics_only_on_loopback_or_off() {
        let default = MetricsConfig::default();
        assert_eq!(default.validate(), Ok(()));
        assert_eq!(
            default.addr(),
            Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        let off = listen("");
        assert_eq!(off.validate(), Ok(()));
        assert_eq!(off.addr(), None);
        assert_eq!(listen("[::1]:9464").validate(), Ok(()));
        for bad in ["0.0.0.0:9464", "10.0.0.1:9464", "localhost"] {
            assert_eq!(listen(bad).validate().unwrap_err().key, "listen", "{bad}");
        }
        let none = MetricsConfig {
            max_connections: 0,
            ..MetricsConfig::default()
        };
        assert_eq!(none.validate().unwrap_err().key, "max_connections");
    }
}

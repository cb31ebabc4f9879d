//! Mutual TLS for the control-plane listener: builds the rustls server
//! configuration from `[control_plane]` (TLS 1.2 and 1.3 only, a client
//! certificate required, verified against `client_ca` and, when
//! `allowed_client_names` is set, carrying one of them), and reads the
//! names of a verified client certificate.
//!
//! The private key is read through [`crate::secret::read_secret_file`], so a
//! key readable by group or others stops the agent at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

use super::config::ControlPlaneConfig;
use crate::secret::{SecretFileError, read_secret_file};

/// The TLS configuration could not be built. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate file cannot be read.
    #[error("control_plane.{key}: cannot read {path}: {source}")]
    Read {
        /// The config key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file is unreadable or too open.
    #[error("control_plane.tls_key: {0}")]
    Key(#[source] SecretFileError),
    /// A file holds no usable PEM object of the expected kind.
    #[error("control_plane.{key}: {path} holds no {what} in PEM form")]
    Empty {
        /// The config key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
    },
    /// rustls refused the material (mismatched key, bad CA, ...).
    #[error("control_plane: {what}: {source}")]
    Rustls {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The client CA bundle cannot be used as a verifier.
    #[error("control_plane.client_ca: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Builds the server configuration. Blocking (reads three files).
pub fn server_config(cp: &ControlPlaneConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs("tls_cert", &cp.tls_cert)?;
    let key_pem = read_secret_file(&cp.tls_key).map_err(TlsError::Key)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.expose()).map_err(|_| TlsError::Empty {
        key: "tls_key",
        path: cp.tls_key.clone(),
        what: "private key",
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs("client_ca", &cp.client_ca)? {
        roots.add(ca).map_err(|source| TlsError::Rustls {
            what: "client_ca certificate",
            source,
        })?;
    }
    let chain_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(TlsError::Verifier)?;
    let verifier = Arc::new(AllowedNamesVerifier {
        chain: chain_verifier,
        allowed: cp.allowed_client_names.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Rustls {
            what: "protocol versions",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            what: "tls_cert and tls_key",
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Verifies a client certificate's chain and dates (webpki, against
/// `client_ca`), then that it carries a name of `allowed_client_names`.
/// Checking the name inside the handshake makes a refused name fail it with
/// the TLS alert `access_denied`, which the client sees, rather than a
/// connection closed without a word after a successful handshake.
#[derive(Debug)]
struct AllowedNamesVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for AllowedNamesVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let names = certificate_names(end_entity);
        if allowed_name(&names, &self.allowed).is_none() {
            // The listener's span carries the client's address.
            tracing::warn!(
                target: "audit",
                ?names,
                "client certificate refused: none of its names is in control_plane.allowed_client_names"
            );
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The names a client certificate carries: its subject CNs, then its DNS
/// SANs. Empty when it cannot be parsed (rustls has verified it already).
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    names
}

/// The name a verified client is known by, if it is allowed: the first of
/// its names in `allowed` (any name, when `allowed` is empty). Compared
/// without regard to ASCII case, as DNS names are (RFC 4343); a CN holding a
/// host name is compared the same way.
pub fn allowed_name(names: &[String], allowed: &[String]) -> Option<String> {
    if allowed.is_empty() {
        return Some(
            names
                .first()
                .cloned()
                .unwrap_or_else(|| "<unnamed certificate>".into()),
        );
    }
    names
        .iter()
        .find(|n| allowed.iter().any(|a| a.eq_ignore_ascii_case(n)))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_cn_and_dns_san() {
        let mut params = rcgen::CertificateParams::new(vec!["cp.example".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "control-plane");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let names = certificate_names(cert.der());
        assert_eq!(names, vec!["control-plane", "cp.example"]);
        assert_eq!(
            allowed_name(&names, &["cp.example".into()]).as_deref(),
            Some("cp.example")
        );
        assert_eq!(allowed_name(&names, &["other".into()]), None);
        assert_eq!(allowed_name(&names, &[]).as_deref(), Some("control-plane"));
    }

    #[test]
    fn allowed_names_match_without_regard_to_case() {
        let names = vec!["Control-Plane".to_string(), "CP.Example".to_string()];
        assert_eq!(
            allowed_name(&names, &["cp.example".into()]).as_deref(),
            Some("CP.Example")
        );
        assert_eq!(
            allowed_name(&names, &["CONTROL-PLANE".into()]).as_deref(),
            Some("Control-Plane")
        );
        assert_eq!(allowed_name(&names, &["cp.example.org".into()]), None);
    }

    #[test]
    fn key_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let write = |name: &str, content: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let key_pem = key.serialize_pem();
        let cp = ControlPlaneConfig {
            tls_cert: write("cert.pem", &cert.pem(), 0o644),
            tls_key: write("key.pem", &key_pem, 0o644),
            client_ca: write("ca.pem", &cert.pem(), 0o644),
            ..Default::default()
        };
        let err = server_config(&cp).unwrap_err().to_string();
        assert!(err.contains("control_plane.tls_key"), "{err}");
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains(key_pem.lines().nth(1).unwrap()), "{err}");
        std::fs::set_permissions(&cp.tls_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        server_config(&cp).expect("a 0600 key is accepted");
    }
}

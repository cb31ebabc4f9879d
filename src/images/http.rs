//! [`Registry`] over HTTPS: the agent's own look at a registry before the
//! engine pulls. One connection per request (a pull asks three or four), a
//! deadline on each, TLS verified against the system's CA bundle plus the
//! engine's per-registry CAs (`/etc/docker/certs.d/<host:port>/*.crt`, read
//! at each request as the engine does), HTTP basic auth or the token flow
//! (`WWW-Authenticate: Bearer realm=...`).
//!
//! The certificate is verified also for the registries on 127.0.0.0/8 that
//! the engine treats as insecure: the agent never sends a credential to a
//! server it cannot verify. Plain HTTP is spoken only to a loopback
//! registry that does not speak TLS at all (as the engine does).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

use super::reference::ImageRef;
use super::registry::{
    Challenge, INDEX_TYPES, MANIFEST_TYPES, Manifest, ManifestBody, Registry, RegistryError,
    choose_platform, error_message, host_architecture, parse_challenge, parse_manifest,
};
use crate::jobs::RegistryAuth;

/// Where the engine keeps per-registry CAs.
pub const DOCKER_CERTS_DIR: &str = "/etc/docker/certs.d";
/// Debian's CA bundle.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Largest body read (manifests, tokens, error bodies).
const MAX_BODY: usize = 4 << 20;

/// The real registry client.
pub struct HttpRegistry {
    certs_dir: PathBuf,
    bundle: PathBuf,
    timeout: Duration,
}

impl Default for HttpRegistry {
    fn default() -> Self {
        Self {
            certs_dir: PathBuf::from(DOCKER_CERTS_DIR),
            bundle: PathBuf::from(SYSTEM_BUNDLE),
            timeout: Duration::from_secs(15),
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Where to connect.
#[derive(Debug, Clone)]
struct Target {
    tls: bool,
    /// Host without brackets, for the TCP connection and TLS.
    host: String,
    port: u16,
    /// `host[:port]` as the reference names it (the Host header, certs.d).
    authority: String,
}

/// Why a request got no answer.
enum Transport {
    /// The certificate did not verify.
    Untrusted(String),
    /// The server does not speak TLS.
    NotTls(String),
    /// Refused, unresolvable, timed out, reset.
    Unreachable(String),
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

fn split_authority(authority: &str, default_port: u16) -> (String, u16) {
    if let Some(rest) = authority.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (host.to_owned(), port.unwrap_or(default_port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
            (host.to_owned(), port.parse().unwrap_or(default_port))
        }
        _ => (authority.to_owned(), default_port),
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl HttpRegistry {
    /// The client with the engine's CA directory and the system bundle.
    pub fn new() -> Self {
        Self::default()
    }

    /// The CAs trusted for `authority`: the system bundle and the PEM files
    /// in its certs.d directory. Blocking.
    fn roots(certs_dir: &Path, bundle: &Path, authority: &str) -> rustls::RootCertStore {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let mut files = vec![bundle.to_owned()];
        if let Ok(entries) = std::fs::read_dir(certs_dir.join(authority)) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "crt") {
                    files.push(path);
                }
            }
        }
        for file in files {
            if let Ok(certs) = CertificateDer::pem_file_iter(&file) {
                for cert in certs.flatten() {
                    let _ = roots.add(cert);
                }
            }
        }
        roots
    }

    async fn connect(&self, target: &Target) -> Result<Box<dyn Io>, Transport> {
        let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| Transport::Unreachable(e.to_string()))?;
        if !target.tls {
            return Ok(Box::new(tcp));
        }
        let (certs_dir, bundle, authority) = (
            self.certs_dir.clone(),
            self.bundle.clone(),
            target.authority.clone(),
        );
        let roots =
            tokio::task::spawn_blocking(move || Self::roots(&certs_dir, &bundle, &authority))
                .await
                .map_err(|e| Transport::Unreachable(format!("reading the CAs failed: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Transport::Unreachable(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| Transport::Unreachable(format!("{}: {e}", target.host)))?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map(|tls| Box::new(tls) as Box<dyn Io>)
            .map_err(|e| {
                let tls = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .cloned();
                match tls {
                    Some(rustls::Error::InvalidCertificate(why)) => {
                        Transport::Untrusted(format!("{why:?}"))
                    }
                    Some(rustls::Error::InvalidMessage(why)) => {
                        Transport::NotTls(format!("{why:?}"))
                    }
                    Some(other) => Transport::Unreachable(other.to_string()),
                    None => Transport::Unreachable(e.to_string()),
                }
            })
    }

    /// One GET on a fresh connection, within the deadline.
    async fn get(
        &self,
        target: &Target,
        path: &str,
        headers: &[(&str, String)],
    ) -> Result<Reply, Transport> {
        let request = async {
            let io = self.connect(target).await?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| Transport::Unreachable(e.to_string()))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let mut builder = http::Request::get(path)
                .header(http::header::HOST, &target.authority)
                .header(
                    http::header::USER_AGENT,
                    concat!("instance-agent/", env!("CARGO_PKG_VERSION")),
                );
            for (name, value) in headers {
                builder = builder.header(*name, value);
            }
            let request = builder
                .body(http_body_util::Empty::<Bytes>::new())
                .map_err(|e| Transport::Unreachable(e.to_string()))?;
            let reply = sender
                .send_request(request)
                .await
                .map_err(|e| Transport::Unreachable(e.to_string()))?;
            let (parts, body) = reply.into_parts();
            let body = http_body_util::Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| Transport::Unreachable(e.to_string()))?
                .to_bytes();
            Ok(Reply {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, request)
            .await
            .unwrap_or_else(|_| {
                Err(Transport::Unreachable(format!(
                    "no answer within {:?}",
                    self.timeout
                )))
            })
    }

    /// `GET /v2/` over TLS (or plain HTTP for a loopback registry without
    /// TLS): the target to use and its answer.
    async fn base(&self, authority: &str) -> Result<(Target, Reply), RegistryError> {
        let (host, port) = split_authority(authority, 443);
        let mut target = Target {
            tls: true,
            host,
            port,
            authority: authority.to_owned(),
        };
        let registry = authority.to_owned();
        let fail = |transport: Transport| match transport {
            Transport::Untrusted(message) => RegistryError::Untrusted {
                registry: registry.clone(),
                message,
            },
            Transport::NotTls(message) => RegistryError::Protocol {
                registry: registry.clone(),
                message: format!("it does not speak TLS ({message})"),
            },
            Transport::Unreachable(message) => RegistryError::Unreachable {
                registry: registry.clone(),
                message,
            },
        };
        match self.get(&target, "/v2/", &[]).await {
            Ok(reply) => Ok((target, reply)),
            Err(Transport::NotTls(_)) if is_loopback(&target.host) => {
                target.tls = false;
                let reply = self.get(&target, "/v2/", &[]).await.map_err(fail)?;
                Ok((target, reply))
            }
            Err(other) => Err(fail(other)),
        }
    }

    /// The Authorization header for `image` after the `/v2/` answer.
    async fn authorize(
        &self,
        target: &Target,
        first: &Reply,
        image: &ImageRef,
        auth: Option<&RegistryAuth>,
    ) -> Result<Option<String>, RegistryError> {
        let registry = target.authority.clone();
        let basic = auth.map(|a| {
            let pair = format!("{}:{}", a.username, a.password.expose());
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        let refused = |message: String| match auth {
            Some(a) => RegistryError::Refused {
                registry: registry.clone(),
                username: a.username.clone(),
                message,
            },
            None => RegistryError::NoCredentials {
                registry: registry.clone(),
                message,
            },
        };
        match first.status {
            200 => Ok(None),
            401 => match parse_challenge(&first.header("www-authenticate")) {
                Some(Challenge::Basic) => {
                    let Some(basic) = basic else {
                        return Err(refused(error_message(&first.body)));
                    };
                    let check = self
                        .get(target, "/v2/", &[("authorization", basic.clone())])
                        .await
                        .map_err(|_| RegistryError::Unreachable {
                            registry: registry.clone(),
                            message: "the connection failed while checking the credentials".into(),
                        })?;
                    match check.status {
                        200 => Ok(Some(basic)),
                        _ => Err(refused(error_message(&check.body))),
                    }
                }
                Some(Challenge::Bearer { realm, service }) => self
                    .token(
                        &registry,
                        &realm,
                        service.as_deref(),
                        image,
                        basic,
                        &refused,
                    )
                    .await
                    .map(Some),
                None => Err(RegistryError::Protocol {
                    registry,
                    message: format!(
                        "an authentication scheme the agent does not speak: {:?}",
                        first.header("www-authenticate")
                    ),
                }),
            },
            status => Err(RegistryError::Protocol {
                registry,
                message: format!("GET /v2/ answered HTTP {status}"),
            }),
        }
    }

    /// A pull token from `realm` (the OCI token flow), asked with the basic
    /// credentials when there are some.
    async fn token(
        &self,
        registry: &str,
        realm: &str,
        service: Option<&str>,
        image: &ImageRef,
        basic: Option<String>,
        refused: &(dyn Fn(String) -> RegistryError + Sync),
    ) -> Result<String, RegistryError> {
        let protocol = |message: String| RegistryError::Protocol {
            registry: registry.to_owned(),
            message,
        };
        let uri: http::Uri = realm
            .parse()
            .map_err(|e| protocol(format!("token realm {realm:?}: {e}")))?;
        let authority = uri
            .authority()
            .ok_or_else(|| protocol(format!("token realm {realm:?} has no host")))?
            .to_string();
        let tls = uri.scheme_str() != Some("http");
        let (host, port) = split_authority(&authority, if tls { 443 } else { 80 });
        let target = Target {
            tls,
            host,
            port,
            authority,
        };
        let mut query = format!("scope=repository:{}:pull", image.repository());
        if let Some(service) = service {
            query = format!("service={service}&{query}");
        }
        let path = format!("{}?{query}", uri.path());
        let headers: Vec<(&str, String)> =
            basic.map(|b| ("authorization", b)).into_iter().collect();
        let reply = self
            .get(&target, &path, &headers)
            .await
            .map_err(|t| match t {
                Transport::Untrusted(message) => RegistryError::Untrusted {
                    registry: target.authority.clone(),
                    message,
                },
                Transport::NotTls(message) | Transport::Unreachable(message) => {
                    RegistryError::Unreachable {
                        registry: target.authority.clone(),
                        message,
                    }
                }
            })?;
        if matches!(reply.status, 401 | 403) {
            return Err(refused(error_message(&reply.body)));
        }
        if reply.status != 200 {
            return Err(protocol(format!(
                "the token endpoint answered HTTP {}",
                reply.status
            )));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            #[serde(default)]
            token: String,
            #[serde(default)]
            access_token: String,
        }
        let token: Token = serde_json::from_slice(&reply.body)
            .map_err(|e| protocol(format!("the token endpoint sent no token: {e}")))?;
        let token = if token.token.is_empty() {
            token.access_token
        } else {
            token.token
        };
        Ok(format!("Bearer {token}"))
    }

    /// One manifest GET, mapped to the registry's reasons.
    async fn fetch_manifest(
        &self,
        target: &Target,
        image: &ImageRef,
        reference: &str,
        authorization: Option<&str>,
        auth: Option<&RegistryAuth>,
    ) -> Result<Reply, RegistryError> {
        let registry = target.authority.clone();
        let accept = INDEX_TYPES
            .iter()
            .chain(MANIFEST_TYPES.iter())
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        let mut headers = vec![("accept", accept)];
        if let Some(authorization) = authorization {
            headers.push(("authorization", authorization.to_owned()));
        }
        let path = format!("/v2/{}/manifests/{reference}", image.repository());
        let reply =
            self.get(target, &path, &headers)
                .await
                .map_err(|_| RegistryError::Unreachable {
                    registry: registry.clone(),
                    message: "the connection failed while fetching the manifest".into(),
                })?;
        let message = error_message(&reply.body);
        match reply.status {
            200 => Ok(reply),
            401 | 403 => Err(match auth {
                Some(a) => RegistryError::Refused {
                    registry,
                    username: a.username.clone(),
                    message,
                },
                None => RegistryError::NoCredentials { registry, message },
            }),
            404 => Err(RegistryError::NotFound {
                registry,
                image: image.given().to_owned(),
                message,
            }),
            status => Err(RegistryError::Protocol {
                registry,
                message: format!("the manifest GET answered HTTP {status}: {message}"),
            }),
        }
    }
}

#[async_trait]
impl Registry for HttpRegistry {
    async fn manifest(
        &self,
        image: &ImageRef,
        auth: Option<&RegistryAuth>,
    ) -> Result<Manifest, RegistryError> {
        let (target, first) = self.base(image.api_host()).await?;
        let authorization = self.authorize(&target, &first, image, auth).await?;
        let protocol = |message: String| RegistryError::Protocol {
            registry: target.authority.clone(),
            message,
        };
        let mut reference = image.manifest_reference().to_owned();
        // An index leads to one more manifest (this platform's).
        for _ in 0..2 {
            let reply = self
                .fetch_manifest(&target, image, &reference, authorization.as_deref(), auth)
                .await?;
            let digest = reply.header("docker-content-digest");
            match parse_manifest(&reply.header("content-type"), &reply.body).map_err(protocol)? {
                ManifestBody::Image(layers) => {
                    return Ok(Manifest {
                        digest: if digest.is_empty() { reference } else { digest },
                        layers,
                    });
                }
                ManifestBody::Index(entries) => {
                    reference =
                        choose_platform(&entries, host_architecture()).ok_or_else(|| {
                            protocol(format!(
                                "the image has no linux/{} manifest",
                                host_architecture()
                            ))
                        })?;
                }
            }
        }
        Err(protocol("an index that points to another index".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(
            split_authority("127.0.0.1:5443", 443),
            ("127.0.0.1".into(), 5443)
        );
        assert_eq!(
            split_authority("registry.example", 443),
            ("registry.example".into(), 443)
        );
        assert_eq!(split_authority("[::1]:5000", 443), ("::1".into(), 5000));
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("::1"));
        assert!(is_loopback("localhost"));
        assert!(!is_loopback("10.0.0.1"));
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let image = ImageRef::parse(&format!("127.0.0.1:{port}/x/y:1")).unwrap();
        let error = HttpRegistry::new()
            .manifest(&image, None)
            .await
            .unwrap_err();
        assert!(
            matches!(error, RegistryError::Unreachable { .. }),
            "{error}"
        );
    }
}

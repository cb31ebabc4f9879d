//! What the agent asks a registry itself, before the engine pulls: whether
//! it answers, whether its TLS certificate is trusted, whether it wants
//! credentials and takes the ones the agent has, and the image's manifest
//! (its digest and the size of each layer, for the space check and the
//! progress totals). The engine's own errors are often misleading (for a
//! registry on 127.0.0.0/8 a missing credential shows as `connection reset
//! by peer`, from its plain-HTTP fallback); these answers are not.
//!
//! The trait ([`Registry`]) and the pure parts (challenges, error bodies,
//! manifests, platform choice) are here; the HTTP client is `http.rs`, a
//! fake `fake.rs`.

use async_trait::async_trait;
use serde::Deserialize;

use super::reference::ImageRef;
use crate::jobs::RegistryAuth;

/// Media types of a manifest list / index (one manifest per platform).
pub const INDEX_TYPES: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
];
/// Media types of an image manifest.
pub const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
];

/// A layer of an image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// `sha256:...`.
    pub digest: String,
    /// Compressed size in bytes.
    pub size: u64,
}

impl Layer {
    /// The short id the engine shows for it (12 hex digits).
    pub fn short_id(&self) -> &str {
        let hex = self
            .digest
            .split_once(':')
            .map_or(&*self.digest, |(_, h)| h);
        &hex[..hex.len().min(12)]
    }
}

/// An image's manifest, as far as a pull needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    /// The digest the registry serves it under (`sha256:...`), when it said.
    pub digest: String,
    /// Its layers, in order.
    pub layers: Vec<Layer>,
}

impl Manifest {
    /// Compressed bytes of all layers.
    pub fn compressed_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// Why the registry will not serve the image. Each names the registry and
/// carries the registry's own message where it sent one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry wants credentials and the agent has none for it.
    #[error(
        "registry {registry} requires credentials and none are set \
         (`instance-agent images login {registry}`, or the job's registry_auth){}",
        detail(message)
    )]
    NoCredentials {
        /// `host[:port]`.
        registry: String,
        /// What it said.
        message: String,
    },
    /// The registry refused the credentials (or denied the repository).
    #[error(
        "registry {registry} refused the credentials of user {username:?}{}",
        detail(message)
    )]
    Refused {
        /// `host[:port]`.
        registry: String,
        /// Whose.
        username: String,
        /// What it said.
        message: String,
    },
    /// No such repository, tag or digest.
    #[error("registry {registry} has no image {image}{}", detail(message))]
    NotFound {
        /// `host[:port]`.
        registry: String,
        /// The reference.
        image: String,
        /// What it said (e.g. "manifest unknown").
        message: String,
    },
    /// Its TLS certificate is not trusted.
    #[error(
        "the TLS certificate of registry {registry} is not trusted: {message} \
         (put its CA in /etc/docker/certs.d/{registry}/ca.crt)"
    )]
    Untrusted {
        /// `host[:port]`.
        registry: String,
        /// Why, as the TLS library says.
        message: String,
    },
    /// It does not answer (refused, unresolvable, timed out).
    #[error("registry {registry} is unreachable: {message}")]
    Unreachable {
        /// `host[:port]`.
        registry: String,
        /// What the connection saw.
        message: String,
    },
    /// It answered something the agent does not understand; the engine is
    /// left to try (and to say what is wrong).
    #[error("registry {registry} answered unexpectedly: {message}")]
    Protocol {
        /// `host[:port]`.
        registry: String,
        /// What it answered.
        message: String,
    },
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// A registry, as the images domain asks it.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// The manifest of `image` for this host's platform, asked with `auth`.
    async fn manifest(
        &self,
        image: &ImageRef,
        auth: Option<&RegistryAuth>,
    ) -> Result<Manifest, RegistryError>;
}

/// How a registry asks for credentials (`WWW-Authenticate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP basic auth.
    Basic,
    /// A token from `realm` (the OCI distribution token flow).
    Bearer {
        /// The token endpoint.
        realm: String,
        /// Its `service` parameter.
        service: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header; `None` for a scheme the agent does
/// not speak.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let param = |name: &str| -> Option<String> {
        let mut rest = params;
        while !rest.is_empty() {
            let (key, after) = rest.split_once('=')?;
            let key = key.trim().trim_start_matches(',').trim();
            let after = after.trim_start();
            let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (&after[..end], &after[end..])
            };
            if key.eq_ignore_ascii_case(name) {
                return Some(value.to_owned());
            }
            rest = next.trim_start_matches(',').trim_start();
        }
        None
    };
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: param("realm")?,
            service: param("service"),
        })
    } else {
        None
    }
}

/// The first message of a registry's JSON error body
/// (`{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}`),
/// else the body's first line.
pub fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(Deserialize)]
    struct ErrorItem {
        #[serde(default)]
        message: String,
        #[serde(default)]
        code: String,
    }
    if let Ok(errors) = serde_json::from_slice::<Errors>(body)
        && let Some(first) = errors.errors.into_iter().next()
    {
        return if first.message.is_empty() {
            first.code.to_lowercase()
        } else {
            first.message
        };
    }
    String::from_utf8_lossy(body)
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

/// A manifest body: an index (one entry per platform) or an image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestBody {
    /// Per-platform manifests: (digest, os, architecture, variant).
    Index(Vec<(String, String, String, String)>),
    /// An image manifest's layers.
    Image(Vec<Layer>),
}

/// Parses a manifest of `media_type` (the response's `Content-Type`, or the
/// body's own `mediaType`).
pub fn parse_manifest(media_type: &str, body: &[u8]) -> Result<ManifestBody, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Body {
        #[serde(default)]
        media_type: String,
        #[serde(default)]
        manifests: Vec<Entry>,
        #[serde(default)]
        layers: Vec<Descriptor>,
    }
    #[derive(Deserialize)]
    struct Entry {
        digest: String,
        #[serde(default)]
        platform: Platform,
    }
    #[derive(Deserialize, Default)]
    struct Platform {
        #[serde(default)]
        os: String,
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        variant: String,
    }
    #[derive(Deserialize)]
    struct Descriptor {
        digest: String,
        #[serde(default)]
        size: u64,
    }
    let parsed: Body =
        serde_json::from_slice(body).map_err(|e| format!("the manifest is not JSON: {e}"))?;
    let kind = media_type.split(';').next().unwrap_or_default().trim();
    let kind = if kind.is_empty() || kind == "application/json" {
        parsed.media_type.as_str()
    } else {
        kind
    };
    if INDEX_TYPES.contains(&kind) || (!parsed.manifests.is_empty() && parsed.layers.is_empty()) {
        return Ok(ManifestBody::Index(
            parsed
                .manifests
                .into_iter()
                .map(|m| {
                    (
                        m.digest,
                        m.platform.os,
                        m.platform.architecture,
                        m.platform.variant,
                    )
                })
                .collect(),
        ));
    }
    Ok(ManifestBody::Image(
        parsed
            .layers
            .into_iter()
            .map(|l| Layer {
                digest: l.digest,
                size: l.size,
            })
            .collect(),
    ))
}

/// The architecture name registries use for this host.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// The digest of the index entry for `linux`/`architecture`.
pub fn choose_platform(
    entries: &[(String, String, String, String)],
    architecture: &str,
) -> Option<String> {
    entries
        .iter()
        .find(|(_, os, arch, _)| os == "linux" && arch == architecture)
        .map(|(digest, ..)| digest.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_parsed() {
        assert_eq!(
            parse_challenge(r#"Basic realm="basic-realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:x:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
            })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn error_bodies_give_the_registrys_message() {
        assert_eq!(
            error_message(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":null}]}"#),
            "manifest unknown"
        );
        assert_eq!(
            error_message(b"404 page not found\nmore"),
            "404 page not found"
        );
    }

    #[test]
    fn an_index_leads_to_this_platforms_manifest() {
        let index = br#"{"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"digest":"sha256:arm","platform":{"os":"linux","architecture":"arm64"}},
            {"digest":"sha256:amd","platform":{"os":"linux","architecture":"amd64"}}]}"#;
        let ManifestBody::Index(entries) = parse_manifest("", index).unwrap() else {
            panic!("an index");
        };
        assert_eq!(
            choose_platform(&entries, "amd64"),
            Some("sha256:amd".into())
        );
        assert_eq!(choose_platform(&entries, "s390x"), None);
        let image = br#"{"schemaVersion":2,"layers":[
            {"digest":"sha256:ce785fbde5961b87966466c1664fdbb76d6d93dbe61d91db21b908ae8c0e5e35","size":2000821},
            {"digest":"sha256:0123456789abcdef","size":10}]}"#;
        let ManifestBody::Image(layers) = parse_manifest(
            "application/vnd.docker.distribution.manifest.v2+json",
            image,
        )
        .unwrap() else {
            panic!("an image manifest");
        };
        let manifest = Manifest {
            digest: String::new(),
            layers,
        };
        assert_eq!(manifest.compressed_bytes(), 2_000_831);
        assert_eq!(manifest.layers[0].short_id(), "ce785fbde596");
    }

    #[test]
    fn reasons_say_what_to_do_without_secrets() {
        let error = RegistryError::NoCredentials {
            registry: "127.0.0.1:5443".into(),
            message: "authentication required".into(),
        };
        assert!(
            error
                .to_string()
                .starts_with("registry 127.0.0.1:5443 requires credentials and none are set"),
            "{error}"
        );
    }
}

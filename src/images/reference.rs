//! Image references: parsing one (`registry:5000/team/env:1`,
//! `name@sha256:...`, `busybox`), the registry it comes from and the host
//! that serves it, and the canonical form that keys single flight (two
//! spellings of one image share one pull).

use std::fmt;

use super::ImageError;

/// Docker Hub as references name it.
const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API answers.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// As given by the caller.
    given: String,
    /// `host[:port]`; `docker.io` for Docker Hub.
    registry: String,
    /// `team/env`; `library/busybox` for an official Docker Hub image.
    repository: String,
    /// The tag, when the reference names one (`latest` when it names none).
    tag: Option<String>,
    /// `sha256:...`, when the reference names a digest.
    digest: Option<String>,
}

impl ImageRef {
    /// Parses `text`; the error names the field `image` and the problem.
    pub fn parse(text: &str) -> Result<Self, ImageError> {
        let invalid = |problem: String| ImageError::InvalidRequest {
            field: "image",
            problem,
        };
        if text.is_empty() {
            return Err(invalid("must not be empty".into()));
        }
        if text.len() > 1024 {
            return Err(invalid(format!(
                "is {} characters long: at most 1024",
                text.len()
            )));
        }
        let parsed = super::syntax::parse(text)
            .map_err(|e| invalid(format!("{text:?} is not a valid image reference: {e}")))?;
        let registry = parsed.registry;
        let digest = parsed.digest;
        // `repo:tag@sha256:...` runs the digest; the tag only names it.
        let tag = if digest.is_some() { None } else { parsed.tag };
        Ok(Self {
            given: text.to_owned(),
            registry,
            repository: parsed.repository,
            tag,
            digest,
        })
    }

    /// The reference as the caller wrote it.
    pub fn given(&self) -> &str {
        &self.given
    }

    /// `host[:port]` of the registry (`docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Where the registry's API answers (`registry-1.docker.io` for Docker
    /// Hub, else the registry itself).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// `team/env`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The digest the reference names, if it names one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// What to ask the registry's manifest endpoint for: the digest, or the
    /// tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The repository as the engine names it in `RepoDigests` and
    /// `RepoTags`: without `docker.io/` (and `library/`) for Docker Hub.
    pub fn engine_repository(&self) -> String {
        if self.registry == DOCKER_HUB {
            self.repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository)
                .to_owned()
        } else {
            format!("{}/{}", self.registry, self.repository)
        }
    }

    /// The canonical form: `registry/repository:tag` or
    /// `registry/repository@digest`. Two spellings of one image (`busybox`,
    /// `docker.io/library/busybox:latest`) have the same one.
    pub fn canonical(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => format!("{}/{}@{digest}", self.registry, self.repository),
            (None, Some(tag)) => format!("{}/{}:{tag}", self.registry, self.repository),
            (None, None) => format!("{}/{}:latest", self.registry, self.repository),
        }
    }

    /// What the engine is asked to pull: the reference as the engine spells
    /// it (`repo:tag` or `repo@digest`).
    pub fn for_engine(&self) -> String {
        let repository = self.engine_repository();
        match (&self.digest, &self.tag) {
            (Some(digest), _) => format!("{repository}@{digest}"),
            (None, Some(tag)) => format!("{repository}:{tag}"),
            (None, None) => format!("{repository}:latest"),
        }
    }

    /// The `repo@sha256:...` among an image's `RepoDigests` that belongs to
    /// this reference's repository.
    pub fn digest_among(&self, repo_digests: &[String]) -> Option<String> {
        let repository = self.engine_repository();
        repo_digests
            .iter()
            .find(|d| {
                d.split_once('@')
                    .is_some_and(|(repo, _)| repo == repository || repo == self.canonical_repo())
            })
            .cloned()
    }

    fn canonical_repo(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Whether a credential registered for `prefix` (`host[:port]` with an
    /// optional `/path`) applies to this image: the host is the same and the
    /// path, if any, is a whole-segment prefix of the repository.
    pub fn matches_credential(&self, prefix: &str) -> bool {
        let (host, path) = match prefix.split_once('/') {
            Some((host, path)) => (host, Some(path.trim_end_matches('/'))),
            None => (prefix, None),
        };
        let host = match host {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB,
            other => other,
        };
        if host != self.registry {
            return false;
        }
        match path {
            None | Some("") => true,
            Some(path) => {
                self.repository == path
                    || self
                        .repository
                        .strip_prefix(path)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.given)
    }
}

/// Checks the registry key of a credential (`host[:port][/path]`); returns
/// it in the form it is stored under (Docker Hub's aliases as `docker.io`,
/// no trailing slash).
pub fn credential_key(registry: &str) -> Result<String, ImageError> {
    let invalid = |problem: String| ImageError::InvalidRequest {
        field: "registry",
        problem,
    };
    let trimmed = registry.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(invalid(
            "must not be empty (a registry host, e.g. registry.example:5000)".into(),
        ));
    }
    if trimmed.len() > 512 {
        return Err(invalid(format!(
            "is {} characters long: at most 512",
            trimmed.len()
        )));
    }
    if trimmed.contains("://") {
        return Err(invalid(format!(
            "{trimmed:?}: give the host (and port), without a scheme"
        )));
    }
    let (host, path) = match trimmed.split_once('/') {
        Some((host, path)) => (host, Some(path)),
        None => (trimmed, None),
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c));
    if !host_ok {
        return Err(invalid(format!(
            "{host:?} is not a registry host ([A-Za-z0-9.-], an optional :port)"
        )));
    }
    if let Some(path) = path {
        let path_ok = path.split('/').all(|segment| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        });
        if !path_ok {
            return Err(invalid(format!(
                "{path:?} is not a repository path prefix (lowercase segments of [a-z0-9._-])"
            )));
        }
    }
    let host = match host {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB,
        other => other,
    };
    Ok(match path {
        Some(path) => format!("{host}/{path}"),
        None => host.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_image_share_a_canonical_form() {
        let a = ImageRef::parse("busybox").unwrap();
        let b = ImageRef::parse("docker.io/library/busybox:latest").unwrap();
        assert_eq!(a.canonical(), b.canonical());
        assert_eq!(a.canonical(), "docker.io/library/busybox:latest");
        assert_eq!(a.api_host(), "registry-1.docker.io");
        assert_eq!(a.for_engine(), "busybox:latest");
        let local = ImageRef::parse("127.0.0.1:5443/team/env:1").unwrap();
        assert_eq!(local.registry(), "127.0.0.1:5443");
        assert_eq!(local.repository(), "team/env");
        assert_eq!(local.manifest_reference(), "1");
        assert_eq!(local.for_engine(), "127.0.0.1:5443/team/env:1");
    }

    #[test]
    fn a_digest_reference_runs_the_digest() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("127.0.0.1:5443/team/env:1@{digest}")).unwrap();
        assert_eq!(r.digest(), Some(digest.as_str()));
        assert_eq!(r.manifest_reference(), digest);
        assert_eq!(r.for_engine(), format!("127.0.0.1:5443/team/env@{digest}"));
        let found = r.digest_among(&[
            format!("other/repo@{digest}"),
            format!("127.0.0.1:5443/team/env@{digest}"),
        ]);
        assert_eq!(found, Some(format!("127.0.0.1:5443/team/env@{digest}")));
    }

    #[test]
    fn bad_references_name_the_field() {
        for bad in ["", "a b", "x@sha256:short", "x:"] {
            let error = ImageRef::parse(bad).unwrap_err();
            assert!(
                matches!(error, ImageError::InvalidRequest { field: "image", .. }),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn credentials_match_by_host_and_whole_path_segments() {
        let r = ImageRef::parse("registry.example:5000/team/env:1").unwrap();
        assert!(r.matches_credential("registry.example:5000"));
        assert!(r.matches_credential("registry.example:5000/team"));
        assert!(r.matches_credential("registry.example:5000/team/env"));
        assert!(!r.matches_credential("registry.example:5000/te"));
        assert!(!r.matches_credential("registry.example:5001"));
        assert!(!r.matches_credential("registry.example"));
        let hub = ImageRef::parse("someone/private:2").unwrap();
        assert!(hub.matches_credential("docker.io"));
        assert!(hub.matches_credential("index.docker.io/someone"));
    }

    #[test]
    fn credential_keys_are_checked_and_tidied() {
        assert_eq!(
            credential_key("registry.example:5000/team/").unwrap(),
            "registry.example:5000/team"
        );
        assert_eq!(credential_key("index.docker.io").unwrap(), "docker.io");
        for bad in ["", "https://x", "a b", "host/UP", "host//x"] {
            assert!(credential_key(bad).is_err(), "{bad}");
        }
    }
}

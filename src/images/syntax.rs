//! The grammar of an image reference (`[host[:port]/]path[:tag][@digest]`,
//! as the OCI distribution spec and Docker's `reference` package write it),
//! checked by hand: no regex. The regex that `oci-spec` compiles for the same
//! grammar (its tag's `\w` is Unicode) took about 20 MB of heap while it was
//! built at the first job's submit, and the agent's RSS never came back from
//! it (issue 13's floods measured 33 → 63 MiB for the first queued jobs).
//!
//! Plain functions on `&str`; no I/O, no imports. [`super::reference`]
//! builds the canonical form on top; the jobs domain checks specs and
//! `jobs.keep_images` with it.

/// The longest repository path (`team/env`, `library/busybox`).
const MAX_REPOSITORY: usize = 255;
/// The longest tag.
const MAX_TAG: usize = 128;

/// A reference split into its parts, Docker Hub's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    /// `host[:port]`; `docker.io` when the reference names no registry.
    pub registry: String,
    /// `team/env`; `library/busybox` for an official Docker Hub image.
    pub repository: String,
    /// The tag; `latest` when the reference names neither a tag nor a digest.
    pub tag: Option<String>,
    /// `algorithm:hex`, when the reference names a digest.
    pub digest: Option<String>,
}

/// Splits and checks `text`; the error says which part breaks which rule.
pub fn parse(text: &str) -> Result<Parts, String> {
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    let (rest, digest) = match text.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (text, None),
    };
    // A colon after the last slash starts the tag; one before it is a port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        check_tag(tag)?;
    }
    if let Some(digest) = digest {
        check_digest(digest)?;
    }
    let (registry, path) = split_registry(name)?;
    for (i, component) in path.split('/').enumerate() {
        check_path_component(i, component)?;
    }
    let repository = if registry == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_owned()
    };
    if repository.len() > MAX_REPOSITORY {
        return Err(format!(
            "the repository is {} characters long: at most {MAX_REPOSITORY}",
            repository.len()
        ));
    }
    let tag = match (tag, digest) {
        (None, None) => Some("latest".to_owned()),
        (tag, _) => tag.map(str::to_owned),
    };
    Ok(Parts {
        registry,
        repository,
        tag,
        digest: digest.map(str::to_owned),
    })
}

/// The registry (Docker Hub when the first component does not look like a
/// host: no `.`, no `:`, not `localhost`) and the path after it.
fn split_registry(name: &str) -> Result<(String, &str), String> {
    let Some((first, path)) = name.split_once('/') else {
        return Ok(("docker.io".to_owned(), name));
    };
    if !(first.contains('.') || first.contains(':') || first == "localhost") {
        return Ok(("docker.io".to_owned(), name));
    }
    check_host(first)?;
    let registry = match first {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        other => other,
    };
    Ok((registry.to_owned(), path))
}

/// `domain-component ('.' domain-component)* (':' port)?`.
fn check_host(host: &str) -> Result<(), String> {
    let bad = || format!("the registry {host:?} is not a host name with an optional port");
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    let component_ok = |c: &str| {
        let bytes = c.as_bytes();
        !bytes.is_empty()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-'
    };
    if name.split('.').all(component_ok) {
        Ok(())
    } else {
        Err(bad())
    }
}

/// `[a-z0-9]+ (separator [a-z0-9]+)*`, a separator being `.`, `_`, `__` or
/// any run of `-`.
fn check_path_component(index: usize, component: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "path component {} ({component:?}) must be lowercase letters and digits, \
             joined by `.`, `_`, `__` or dashes",
            index + 1
        )
    };
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(bad());
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}` (ASCII, as Docker has it).
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_TAG
        && word(bytes[0])
        && bytes.iter().all(|b| word(*b) || *b == b'.' || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the tag {tag:?} must be 1 to {MAX_TAG} of [A-Za-z0-9_.-], not starting with `.` or `-`"
        ))
    }
}

/// `algorithm:hex` with a known algorithm and its length of hex digits.
fn check_digest(digest: &str) -> Result<(), String> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(format!("the digest {digest:?} must be `algorithm:hex`"));
    };
    let length = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        other => {
            return Err(format!(
                "the digest's algorithm {other:?} is not one of sha256, sha384, sha512"
            ));
        }
    };
    if hex.len() != length || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "the {algorithm} digest must be {length} hex digits, not {:?}",
            hex
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(text: &str) -> (String, String, Option<String>, Option<String>) {
        let p = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        (p.registry, p.repository, p.tag, p.digest)
    }

    #[test]
    fn docker_hub_defaults_are_filled_in() {
        assert_eq!(
            parts("busybox"),
            (
                "docker.io".into(),
                "library/busybox".into(),
                Some("latest".into()),
                None
            )
        );
        assert_eq!(
            parts("someone/private:2"),
            (
                "docker.io".into(),
                "someone/private".into(),
                Some("2".into()),
                None
            )
        );
        assert_eq!(parts("index.docker.io/library/busybox:1.36").0, "docker.io");
        assert_eq!(
            parts("instance-agent/busybox:test"),
            (
                "docker.io".into(),
                "instance-agent/busybox".into(),
                Some("test".into()),
                None
            )
        );
    }

    #[test]
    fn a_host_with_a_port_is_the_registry() {
        assert_eq!(
            parts("127.0.0.1:5443/team/env:1"),
            (
                "127.0.0.1:5443".into(),
                "team/env".into(),
                Some("1".into()),
                None
            )
        );
        assert_eq!(parts("localhost/x").0, "localhost");
        assert_eq!(parts("my-registry.example:5000/a/b/c").1, "a/b/c");
        // No slash: `localhost:5000` is the image `localhost`, tag 5000.
        assert_eq!(
            parts("localhost:5000"),
            (
                "docker.io".into(),
                "library/localhost".into(),
                Some("5000".into()),
                None
            )
        );
    }

    #[test]
    fn digests_are_checked_and_keep_the_tag_beside_them() {
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            parts(&format!("127.0.0.1:5443/team/env:1@{digest}")),
            (
                "127.0.0.1:5443".into(),
                "team/env".into(),
                Some("1".into()),
                Some(digest.clone())
            )
        );
        assert_eq!(parts(&format!("env@{digest}")).2, None);
        for bad in [
            "x@sha256:short".to_owned(),
            format!("x@md5:{}", "a".repeat(32)),
            format!("x@sha256:{}", "g".repeat(64)),
            "x@sha256".to_owned(),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn separators_follow_the_grammar() {
        for good in ["a.b", "a_b", "a__b", "a---b", "a-b.c_d", "0"] {
            assert!(parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a b",
            "x:",
            "A",
            "Team/env",
            "a..b",
            "a___b",
            "a.-b",
            "-a",
            "a-",
            "a//b",
            "a/",
            "/a",
            "a:b:c",
            "x:-1",
            "x:ü",
            "ü",
            "host.example:port/x",
            "bad_host.example/x",
            "-h.example/x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn lengths_are_bounded() {
        assert!(parse(&format!("x:{}", "t".repeat(128))).is_ok());
        assert!(parse(&format!("x:{}", "t".repeat(129))).is_err());
        assert!(parse(&format!("team/{}", "r".repeat(250))).is_ok());
        assert!(parse(&format!("team/{}", "r".repeat(251))).is_err());
    }
}

//! Secrets: a wrapper that keeps a value out of `Debug`, `Display` and
//! therefore out of logs, events and error messages, and the one way to read
//! a secret from a file (refused when the file is readable by anyone but its
//! owner, or owned by someone other than root or the agent).
//!
//! Holds the TLS private key and the storage account keys and SAS tokens of
//! the mounts module.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What `Debug` and `Display` print instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// A secret value. Its `Debug` and `Display` print `<redacted>`; the value is
/// reached only through [`Secret::expose`], so every use is visible in review.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret<T = String>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The value itself. Never log or format what this returns.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T: AsRef<[u8]>> Secret<T> {
    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_empty()
    }
}

impl Secret {
    /// Wraps a text secret (a key, a token) without the whitespace around it:
    /// the newline a file or a shell adds is never part of one.
    pub fn from_text(value: &str) -> Self {
        Self(value.trim().to_owned())
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

/// A secret file could not be used. Messages name the file and the fix,
/// never the content.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file cannot be opened or read.
    #[error("cannot read secret file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Group or others have some access to the file.
    #[error(
        "secret file {path} has mode {mode:04o}: it must not be accessible to group or others (chmod 600 {path})"
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file belongs to another user, who could change it.
    #[error("secret file {path} is owned by uid {owner}: it must be owned by root or uid {agent}")]
    WrongOwner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The agent's uid.
        agent: u32,
    },
    /// The file is larger than any key or token.
    #[error("secret file {path} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

/// The largest secret file read (keys, certificates chains, tokens).
pub const MAX_SECRET_FILE_BYTES: u64 = 1 << 20;

/// Reads a secret file after checking, on the opened file (so a swap after
/// the check cannot slip through), that only its owner may access it and that
/// the owner is root or the agent itself. Blocking.
pub fn read_secret_file(path: &Path) -> Result<Secret<Vec<u8>>, SecretFileError> {
    let read_err = |source| SecretFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let agent = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != agent {
        return Err(SecretFileError::WrongOwner {
            path: path.to_owned(),
            owner: meta.uid(),
            agent,
        });
    }
    if meta.len() > MAX_SECRET_FILE_BYTES {
        return Err(SecretFileError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
            limit: MAX_SECRET_FILE_BYTES,
        });
    }
    let mut content = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_SECRET_FILE_BYTES)
        .read_to_end(&mut content)
        .map_err(read_err)?;
    Ok(Secret::new(content))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("hunter2-very-secret".to_string());
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(format!("{secret}"), "<redacted>");
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Holder {
            key: Secret,
        }
        let shown = format!(
            "{:?}",
            Holder {
                key: secret.clone()
            }
        );
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(secret.expose(), "hunter2-very-secret");
    }

    #[test]
    fn text_secrets_lose_surrounding_whitespace() {
        let secret = Secret::from_text("  c2VjcmV0\n");
        assert_eq!(secret.expose(), "c2VjcmV0");
        assert!(!secret.is_empty());
        assert!(Secret::from_text(" \n").is_empty());
        assert!(Secret::new(Vec::<u8>::new()).is_empty());
    }

    #[test]
    fn open_files_are_refused_without_showing_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, b"PRIVATE-KEY-CONTENT").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o606] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = read_secret_file(&path).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, SecretFileError::TooOpen { .. }),
                "{mode:o}: {msg}"
            );
            assert!(msg.contains("chmod 600"), "{msg}");
            assert!(!msg.contains("PRIVATE-KEY-CONTENT"), "{msg}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let secret = read_secret_file(&path).unwrap();
        assert_eq!(secret.expose(), b"PRIVATE-KEY-CONTENT");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(read_secret_file(&path).is_ok());
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_secret_file(Path::new("/nonexistent/key.pem")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/key.pem"), "{err}");
    }
}

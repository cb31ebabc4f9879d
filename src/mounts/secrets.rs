//! Where secrets live, and scrubbing them out of text.
//!
//! An account key or SAS token given over the API must survive an agent
//! restart *and a reboot* (both restore API mounts), so it is kept in a 0600
//! file in a 0700 directory of the state dir (`<state_dir>/mounts/secrets/<name>`),
//! never in the store (whose records are readable with redb tooling and end
//! up in backups and bug reports) and never in the runtime dir alone (a
//! tmpfs, empty after a reboot). Encrypting it would need a key kept beside
//! it on the same disk, so file permissions are the real protection. The
//! rendered blobfuse2 config in the runtime dir (0600) holds it too, because
//! blobfuse2 reads it from there. A mount declared in config names its own
//! secret file, which is read at every attempt and must not be readable by
//! other users.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::secret::Secret;

/// The API secrets directory in a state dir.
pub fn secrets_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("mounts").join("secrets")
}

/// Writes `contents` to `path` with mode 0600, atomically (temp file + rename),
/// creating the parent directory with mode 0700. Blocking.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let tmp = temp_path(path);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// The temporary file [`write_private`] writes before its rename: a hidden
/// name (`.<file>.tmp`) in the same directory. Mount names never start with
/// a dot, so it cannot be another mount's file (`x.tmp` for `x` would be the
/// kept secret of a mount named `x.tmp`).
fn temp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".tmp");
    path.with_file_name(name)
}

/// Keeps an API mount's secret. Blocking.
pub fn store(state_dir: &Path, name: &str, secret: &Secret) -> std::io::Result<()> {
    write_private(
        &secrets_dir(state_dir).join(name),
        secret.expose().as_bytes(),
    )
}

/// Reads an API mount's kept secret. Blocking.
pub fn load_stored(state_dir: &Path, name: &str) -> std::io::Result<Secret> {
    let text = std::fs::read_to_string(secrets_dir(state_dir).join(name))?;
    Ok(Secret::from_text(&text))
}

/// Forgets an API mount's secret (absent is fine). Blocking.
pub fn forget(state_dir: &Path, name: &str) -> std::io::Result<()> {
    match std::fs::remove_file(secrets_dir(state_dir).join(name)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Reads a secret file named in config through the agent's one secret-file
/// rule ([`crate::secret::read_secret_file`]: only its owner, root or the
/// agent, may access it); refuses an empty one. Blocking.
pub fn load_file(path: &Path) -> Result<Secret, String> {
    let content = crate::secret::read_secret_file(path).map_err(|e| e.to_string())?;
    let text = std::str::from_utf8(content.expose())
        .map_err(|_| format!("secret file {} is not UTF-8 text", path.display()))?;
    let secret = Secret::from_text(text);
    if secret.is_empty() {
        return Err(format!("secret file {} is empty", path.display()));
    }
    Ok(secret)
}

/// Replaces every form of `secret` in `text` with `***`: the value itself,
/// its percent-encoded and -decoded forms and, for a SAS token, its
/// signature alone (tools often print a URL with the query re-encoded).
pub fn scrub(text: &str, secret: &Secret) -> String {
    let value = secret.expose();
    let mut candidates = vec![
        value.to_owned(),
        percent_decode(value),
        percent_encode(value),
    ];
    for pair in value.trim_start_matches('?').split('&') {
        if let Some(sig) = pair.strip_prefix("sig=") {
            candidates.push(sig.to_owned());
            candidates.push(percent_decode(sig));
            candidates.push(percent_encode(&percent_decode(sig)));
        }
    }
    // Longest first, so that a part never leaves the rest of a longer form.
    candidates.sort_by_key(|c| std::cmp::Reverse(c.len()));
    let mut out = text.to_owned();
    for candidate in candidates {
        // Very short values would scrub ordinary words; real keys and
        // signatures are tens of characters.
        if candidate.len() >= 8 {
            out = out.replace(&candidate, "***");
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn stored_secret_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let secret = Secret::from_text("a2V5a2V5a2V5");
        store(dir.path(), "data", &secret).unwrap();
        let path = secrets_dir(dir.path()).join("data");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(secrets_dir(dir.path()))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        assert_eq!(load_stored(dir.path(), "data").unwrap(), secret);
        forget(dir.path(), "data").unwrap();
        forget(dir.path(), "data").unwrap();
        assert!(load_stored(dir.path(), "data").is_err());
    }

    #[test]
    fn a_secret_written_never_touches_another_mounts_secret() {
        let dir = tempfile::tempdir().unwrap();
        let other = Secret::from_text("the-other-mounts-key");
        store(dir.path(), "x.tmp", &other).unwrap();
        store(dir.path(), "x", &Secret::from_text("this-mounts-key")).unwrap();
        assert_eq!(load_stored(dir.path(), "x.tmp").unwrap(), other);
        store(dir.path(), "a.b", &Secret::from_text("dotted-name-key")).unwrap();
        let names: Vec<String> = std::fs::read_dir(secrets_dir(dir.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(names, ["a.b", "x", "x.tmp"], "no temp file left behind");
    }

    #[test]
    fn world_readable_or_empty_secret_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "k3y-value\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_file(&path).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load_file(&path).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_file(&path).unwrap().expose(), "k3y-value");
        std::fs::write(&path, "\n").unwrap();
        assert!(load_file(&path).unwrap_err().contains("empty"));
    }

    #[test]
    fn scrubs_every_form() {
        let sas = Secret::from_text("?sv=2022-11-02&sr=c&sig=AbCd%2BEfGh%3D1234");
        let text = "GET https://a.blob.core.windows.net/c?sv=2022-11-02&sr=c&sig=AbCd%2BEfGh%3D1234: 403; \
                    sig AbCd+EfGh=1234; encoded %3Fsv%3D2022-11-02%26sr%3Dc%26sig%3DAbCd%252BEfGh%253D1234";
        let out = scrub(text, &sas);
        assert!(!out.contains("AbCd"), "{out}");
        assert!(out.contains("403"), "{out}");
        let key = Secret::from_text("bXlzZWNyZXRrZXk+/==");
        assert_eq!(
            scrub(
                "bad key bXlzZWNyZXRrZXk+/== or bXlzZWNyZXRrZXk%2B%2F%3D%3D",
                &key
            ),
            "bad key *** or ***"
        );
    }
}

//! The registry credential store: one JSON file, mode 0600, owned by root,
//! in a 0700 directory (by default in the state dir), read once at start
//! and rewritten whole (a new file, fsynced, renamed over the old one) at
//! each change. Credentials are matched to an image by registry host and
//! the longest path prefix, and are handed out only for that registry.
//!
//! The secret never leaves this module except as a [`RegistryAuth`] for a
//! pull: listing returns registries and user names only.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::ImageError;
use super::reference::{ImageRef, credential_key};
use crate::jobs::RegistryAuth;
use crate::secret::Secret;

/// Longest user name accepted.
const MAX_USERNAME: usize = 256;
/// Longest secret accepted (registry tokens can be long JWTs).
const MAX_SECRET: usize = 16 << 10;

/// A credential as listed: never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialInfo {
    /// `host[:port][/path]`.
    pub registry: String,
    /// The user name.
    pub username: String,
    /// When it was set.
    pub updated_at: SystemTime,
}

/// One entry of the file.
#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    username: String,
    secret: String,
    /// Seconds since the epoch.
    updated_at: u64,
}

/// The file's shape.
#[derive(Default, Serialize, Deserialize)]
struct File {
    registries: BTreeMap<String, Entry>,
}

/// The credential store. Cheap to clone.
#[derive(Clone)]
pub struct CredentialStore {
    path: Arc<PathBuf>,
    entries: Arc<Mutex<BTreeMap<String, Entry>>>,
    /// One rewrite at a time, in the order of the changes.
    writing: Arc<tokio::sync::Mutex<()>>,
}

impl CredentialStore {
    /// Opens the store at `path` (an absent file is an empty store). A file
    /// that group or others can read, or that another user owns, is refused
    /// (`crate::secret::read_secret_file`). Blocking.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let entries = match crate::secret::read_secret_file(path) {
            Ok(content) => {
                let file: File = serde_json::from_slice(content.expose()).map_err(|e| {
                    ImageError::Credentials(format!(
                        "{} is not a credential store: {e}",
                        path.display()
                    ))
                })?;
                file.registries
            }
            Err(crate::secret::SecretFileError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                BTreeMap::new()
            }
            Err(error) => return Err(ImageError::Credentials(error.to_string())),
        };
        Ok(Self {
            path: Arc::new(path.to_owned()),
            entries: Arc::new(Mutex::new(entries)),
            writing: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the credential of `registry`; returns it as listed.
    pub async fn set(
        &self,
        registry: &str,
        username: &str,
        secret: Secret,
    ) -> Result<CredentialInfo, ImageError> {
        let key = credential_key(registry)?;
        let invalid = |field, problem: String| ImageError::InvalidRequest { field, problem };
        if username.is_empty() || username.len() > MAX_USERNAME {
            return Err(invalid(
                "username",
                format!("must be 1 to {MAX_USERNAME} characters long"),
            ));
        }
        if username.chars().any(char::is_control) {
            return Err(invalid(
                "username",
                "must not contain control characters".into(),
            ));
        }
        let secret = secret.expose().trim().to_owned();
        if secret.is_empty() || secret.len() > MAX_SECRET {
            return Err(invalid(
                "secret",
                format!("must be 1 to {MAX_SECRET} bytes long"),
            ));
        }
        let now = SystemTime::now();
        let entry = Entry {
            username: username.to_owned(),
            secret,
            updated_at: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        };
        self.change(|entries| {
            entries.insert(key.clone(), entry);
        })
        .await?;
        Ok(CredentialInfo {
            registry: key,
            username: username.to_owned(),
            updated_at: now,
        })
    }

    /// Deletes the credential of `registry`; false when there was none.
    pub async fn delete(&self, registry: &str) -> Result<bool, ImageError> {
        let key = credential_key(registry)?;
        let mut existed = false;
        self.change(|entries| existed = entries.remove(&key).is_some())
            .await?;
        Ok(existed)
    }

    /// Registries and user names, sorted by registry.
    pub fn list(&self) -> Vec<CredentialInfo> {
        self.lock()
            .iter()
            .map(|(registry, entry)| CredentialInfo {
                registry: registry.clone(),
                username: entry.username.clone(),
                updated_at: SystemTime::UNIX_EPOCH + Duration::from_secs(entry.updated_at),
            })
            .collect()
    }

    /// The credential for `image`: the entry of its registry with the
    /// longest matching path prefix.
    pub fn for_image(&self, image: &ImageRef) -> Option<RegistryAuth> {
        self.lock()
            .iter()
            .filter(|(key, _)| image.matches_credential(key))
            .max_by_key(|(key, _)| key.len())
            .map(|(_, entry)| RegistryAuth {
                username: entry.username.clone(),
                password: Secret::new(entry.secret.clone()),
            })
    }

    /// Applies `edit` and rewrites the file; on a failed write the change is
    /// undone, so memory never holds what the file does not.
    async fn change(
        &self,
        edit: impl FnOnce(&mut BTreeMap<String, Entry>),
    ) -> Result<(), ImageError> {
        let _turn = self.writing.lock().await;
        let (before, after) = {
            let mut entries = self.lock();
            let before = entries.clone();
            edit(&mut entries);
            (before, entries.clone())
        };
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || write_store(&path, after))
            .await
            .map_err(|e| ImageError::Credentials(format!("write task failed: {e}")))
            .and_then(|r| r);
        if written.is_err() {
            *self.lock() = before;
        }
        written
    }
}

/// Writes the whole store to `path`: a fresh temp file (O_EXCL, 0600) in
/// the same 0700 directory, fsynced, renamed over the old file, and the
/// directory fsynced. Blocking.
fn write_store(path: &Path, registries: BTreeMap<String, Entry>) -> Result<(), ImageError> {
    let fail = |what: &str, e: std::io::Error| {
        ImageError::Credentials(format!("cannot {what} {}: {e}", path.display()))
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail("create the directory of", e))?;
    let bytes = serde_json::to_vec_pretty(&File { registries }).unwrap_or_default();
    // A unique name: never another file's (nor a leftover's).
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(error) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail("write", error));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn set_list_match_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images/credentials.json");
        let store = CredentialStore::open(&path).unwrap();
        store
            .set(
                "registry.example:5000",
                "ci",
                Secret::new("pw-general".into()),
            )
            .await
            .unwrap();
        store
            .set(
                "registry.example:5000/team/",
                "team",
                Secret::new("pw-team".into()),
            )
            .await
            .unwrap();
        let listed: Vec<(String, String)> = store
            .list()
            .into_iter()
            .map(|c| (c.registry, c.username))
            .collect();
        assert_eq!(
            listed,
            [
                ("registry.example:5000".into(), "ci".into()),
                ("registry.example:5000/team".into(), "team".into())
            ]
        );
        let team = ImageRef::parse("registry.example:5000/team/env:1").unwrap();
        let other = ImageRef::parse("registry.example:5000/other/env:1").unwrap();
        let elsewhere = ImageRef::parse("elsewhere.example/team/env:1").unwrap();
        assert_eq!(store.for_image(&team).unwrap().username, "team");
        assert_eq!(
            store.for_image(&other).unwrap().password.expose(),
            "pw-general"
        );
        assert_eq!(store.for_image(&elsewhere), None);

        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);

        assert!(store.delete("registry.example:5000/team").await.unwrap());
        assert!(!store.delete("registry.example:5000/team").await.unwrap());
        let reopened = CredentialStore::open(&path).unwrap();
        assert_eq!(reopened.for_image(&team).unwrap().username, "ci");
        assert_eq!(reopened.list().len(), 1);
    }

    #[tokio::test]
    async fn bad_fields_are_refused_and_secrets_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(&dir.path().join("c.json")).unwrap();
        for (registry, user, secret, field) in [
            ("", "u", "s", "registry"),
            ("r.example", "", "s", "username"),
            ("r.example", "u", " ", "secret"),
        ] {
            let error = store
                .set(registry, user, Secret::new(secret.into()))
                .await
                .unwrap_err();
            assert!(
                matches!(error, ImageError::InvalidRequest { field: f, .. } if f == field),
                "{error}"
            );
        }
        store
            .set("r.example", "u", Secret::new("hunter2-registry".into()))
            .await
            .unwrap();
        let shown = format!("{:?}", store.list());
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn a_readable_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, b"{\"registries\":{}}").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = CredentialStore::open(&path).err().expect("refused");
        assert!(error.to_string().contains("chmod 600"), "{error}");
    }
}

//! The files of a policy, as one set: what a policy renders (the drop-in,
//! the user's keys file, the socket unit's drop-in), the directories that
//! hold them (each opened once, through `files`), what they held before a
//! change (to roll back to), writing and restoring them, and comparing them
//! with a policy (drift). Blocking: call it from the blocking pool.

use super::files::Dir;
use super::host::ListenerKind;
use super::policy::CheckedPolicy;
use super::settings::AccessSettings;
use super::sshd_config::{self, file_name};

/// The socket unit's drop-in the agent writes.
pub(super) const SOCKET_DROP_IN: &str = "instance-agent.conf";

/// What the files must hold for a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rendered {
    /// The drop-in.
    pub drop_in: String,
    /// The user's keys file: (user, text); none when the policy has no user.
    pub keys: Option<(String, String)>,
    /// The socket unit's drop-in, for socket activation.
    pub socket: Option<String>,
}

/// The files of a policy.
pub(super) fn render(
    settings: &AccessSettings,
    policy: &CheckedPolicy,
    kind: ListenerKind,
) -> Rendered {
    let user = &policy.policy.user;
    Rendered {
        drop_in: sshd_config::render_drop_in(policy, &settings.config.keys_dir),
        keys: (!user.is_empty()).then(|| (user.clone(), sshd_config::render_keys(policy))),
        socket: (kind == ListenerKind::Socket)
            .then(|| sshd_config::render_socket_drop_in(policy.port)),
    }
}

/// What the files held before a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Snapshot {
    /// The drop-in.
    pub drop_in: Option<Vec<u8>>,
    /// The keys files, by user.
    pub keys: Vec<(String, Vec<u8>)>,
    /// The socket unit's drop-in.
    pub socket: Option<Vec<u8>>,
}

/// The directories of a change, each opened once.
pub(super) struct Dirs {
    /// The drop-in's directory.
    pub drop_in: Dir,
    /// The keys directory.
    pub keys: Dir,
    /// Where `sshd -t`'s staged copies go.
    pub staging: Dir,
    /// The socket unit's drop-in directory, when open.
    pub socket: Option<Dir>,
}

/// Keys files: regular files not starting with a dot (temporary files do).
fn key_files(dir: &Dir) -> std::io::Result<Vec<String>> {
    Ok(dir
        .names()?
        .into_iter()
        .filter(|n| !n.starts_with('.') && dir.is_file(n))
        .collect())
}

impl Dirs {
    /// Opens the directories; the agent's own are made when missing.
    pub(super) fn open(settings: &AccessSettings, kind: ListenerKind) -> std::io::Result<Dirs> {
        let config = &settings.config;
        let drop_in_dir = config.drop_in.parent().unwrap_or(std::path::Path::new("/"));
        let socket_dir = settings.socket_drop_in_dir();
        let socket = match kind {
            ListenerKind::Socket => Some(Dir::open(&socket_dir, Some(0o755))?),
            // Only to remove the agent's file from a former socket setup.
            ListenerKind::Service => Dir::open(&socket_dir, None).ok(),
        };
        Ok(Dirs {
            drop_in: Dir::open(drop_in_dir, None)?,
            keys: Dir::open(&config.keys_dir, Some(0o755))?,
            staging: Dir::open(&settings.staging_dir(), Some(0o700))?,
            socket,
        })
    }

    /// What the files hold now.
    pub(super) fn snapshot(&self, settings: &AccessSettings) -> std::io::Result<Snapshot> {
        let mut keys = Vec::new();
        for name in key_files(&self.keys)? {
            if let Some(contents) = self.keys.read(&name)? {
                keys.push((name, contents));
            }
        }
        Ok(Snapshot {
            drop_in: self.drop_in.read(&file_name(&settings.config.drop_in))?,
            keys,
            socket: match &self.socket {
                Some(dir) => dir.read(SOCKET_DROP_IN)?,
                None => None,
            },
        })
    }

    /// Brings the files to `rendered`: keys first, so that the drop-in
    /// never points at keys that are not there yet.
    pub(super) fn write(
        &self,
        settings: &AccessSettings,
        rendered: &Rendered,
    ) -> std::io::Result<()> {
        let keep = rendered.keys.as_ref().map(|(user, _)| user.as_str());
        if let Some((user, text)) = &rendered.keys {
            self.keys.write(user, text.as_bytes(), 0o644)?;
        }
        for name in key_files(&self.keys)? {
            if Some(name.as_str()) != keep {
                self.keys.remove(&name)?;
            }
        }
        self.drop_in.write(
            &file_name(&settings.config.drop_in),
            rendered.drop_in.as_bytes(),
            0o644,
        )?;
        self.write_socket(rendered.socket.as_deref().map(str::as_bytes))
    }

    fn write_socket(&self, contents: Option<&[u8]>) -> std::io::Result<()> {
        match (contents, &self.socket) {
            (Some(text), Some(dir)) => dir.write(SOCKET_DROP_IN, text, 0o644),
            (None, Some(dir)) => dir.remove(SOCKET_DROP_IN),
            (None, None) => Ok(()),
            (Some(_), None) => Err(std::io::Error::other(
                "the socket unit's drop-in directory is not open",
            )),
        }
    }

    /// Puts back what a snapshot held.
    pub(super) fn restore(
        &self,
        settings: &AccessSettings,
        snapshot: &Snapshot,
    ) -> std::io::Result<()> {
        for name in key_files(&self.keys)? {
            if !snapshot.keys.iter().any(|(n, _)| *n == name) {
                self.keys.remove(&name)?;
            }
        }
        for (name, contents) in &snapshot.keys {
            self.keys.write(name, contents, 0o644)?;
        }
        let name = file_name(&settings.config.drop_in);
        match &snapshot.drop_in {
            Some(contents) => self.drop_in.write(&name, contents, 0o644)?,
            None => self.drop_in.remove(&name)?,
        }
        self.write_socket(snapshot.socket.as_deref())
    }
}

/// Compares the files with what a policy renders: one line per file that
/// differs. Blocking.
pub(super) fn file_drift(
    settings: &AccessSettings,
    rendered: &Rendered,
    kind: ListenerKind,
) -> Vec<String> {
    let dirs = match Dirs::open(settings, kind) {
        Ok(dirs) => dirs,
        Err(e) => return vec![format!("cannot read the SSH files: {e}")],
    };
    let snapshot = match dirs.snapshot(settings) {
        Ok(snapshot) => snapshot,
        Err(e) => return vec![format!("cannot read the SSH files: {e}")],
    };
    let mut drift = Vec::new();
    if snapshot.drop_in.as_deref() != Some(rendered.drop_in.as_bytes()) {
        let what = if snapshot.drop_in.is_none() {
            "is missing"
        } else {
            "was changed"
        };
        drift.push(format!("{} {what}", settings.config.drop_in.display()));
    }
    for (name, contents) in &snapshot.keys {
        match &rendered.keys {
            Some((user, text)) if user == name => {
                if contents != text.as_bytes() {
                    drift.push(format!("{} was changed", dirs.keys.join(name).display()));
                }
            }
            _ => drift.push(format!(
                "{} is not the policy's",
                dirs.keys.join(name).display()
            )),
        }
    }
    if let Some((user, _)) = &rendered.keys
        && !snapshot.keys.iter().any(|(n, _)| n == user)
    {
        drift.push(format!("{} is missing", dirs.keys.join(user).display()));
    }
    if snapshot.socket.as_deref() != rendered.socket.as_deref().map(str::as_bytes) {
        drift.push(format!(
            "{} differs from the policy",
            settings.socket_drop_in_dir().join(SOCKET_DROP_IN).display()
        ));
    }
    drift
}

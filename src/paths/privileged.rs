//! Where staging operations ([`super::staging`]) run. Under systemd the
//! agent's unit has no mount capability and a mount namespace of its own
//! (`ProtectSystem=strict`), so a bind made by the agent would fail, and
//! would be invisible to Docker if it did not. There each operation runs as
//! a short transient service forked by PID 1 in the host's namespace: this
//! binary with [`HELPER_ARG`], which opens the path again itself, checks it
//! is the very object the agent checked (device and inode, which cannot be
//! reused while the agent holds it open) and acts through its own
//! descriptor, reading its own mountinfo (mount ids differ between
//! namespaces). Without systemd the agent does the same in its own process.
//!
//! Blocking (fork, exec, wait): call it from the blocking pool.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::held::Held;
use super::staging::{Staging, StagingError};
use crate::mountinfo;

/// The hidden first argument that runs one staging operation.
pub const HELPER_ARG: &str = "__staging";

/// How staging operations run on this host.
#[derive(Debug, Clone)]
pub enum Privileged {
    /// In the agent's own process (no systemd: the agent is in the host's
    /// mount namespace with its capabilities).
    InProcess,
    /// As a transient service of this binary, started by PID 1.
    Transient {
        /// `systemd-run` and `systemctl`.
        tools: crate::transient::Tools,
        /// This binary.
        exe: PathBuf,
    },
}

impl Privileged {
    /// As this host allows: through PID 1 under systemd, else in process.
    pub fn detect() -> Self {
        match std::env::current_exe() {
            Ok(exe) if crate::systemd::booted() => Self::Transient {
                tools: crate::transient::Tools::default(),
                exe,
            },
            _ => Self::InProcess,
        }
    }

    fn helper(
        &self,
        staging: &Staging,
        op: &[&std::ffi::OsStr],
    ) -> Option<Result<(), StagingError>> {
        let Self::Transient { tools, exe } = self else {
            return None;
        };
        let mut argv: Vec<OsString> = vec![exe.clone().into(), HELPER_ARG.into()];
        argv.push(staging.dir().as_os_str().to_owned());
        argv.extend(op.iter().map(|a| (*a).to_owned()));
        let failed = |message: String| StagingError::Io {
            path: staging.dir().to_owned(),
            action: "run the staging helper",
            source: std::io::Error::other(message),
        };
        Some(match tools.run_waiting("instance-agent staging", &argv) {
            Ok((true, _)) => Ok(()),
            Ok((false, message)) => Err(failed(message)),
            Err(e) => Err(failed(e.to_string())),
        })
    }

    /// [`Staging::bind`] of the held object.
    pub fn bind(
        &self,
        staging: &Staging,
        entry: &str,
        source: &Held,
    ) -> Result<PathBuf, StagingError> {
        let (dev, ino) = id_args(source);
        let op = [
            "bind".as_ref(),
            entry.as_ref(),
            source.path().as_os_str(),
            dev.as_ref(),
            ino.as_ref(),
        ];
        match self.helper(staging, &op) {
            Some(done) => done.map(|()| staging.path(entry)),
            None => staging.bind(entry, source),
        }
    }

    /// [`Staging::make_dir`], owned by `owner` (uid, gid) when given.
    pub fn make_dir(
        &self,
        staging: &Staging,
        entry: &str,
        owner: Option<(u32, u32)>,
    ) -> Result<PathBuf, StagingError> {
        let ids = owner.map(|(uid, gid)| (uid.to_string(), gid.to_string()));
        let mut op: Vec<&std::ffi::OsStr> = vec!["make-dir".as_ref(), entry.as_ref()];
        if let Some((uid, gid)) = &ids {
            op.extend([std::ffi::OsStr::new(uid), std::ffi::OsStr::new(gid)]);
        }
        match self.helper(staging, &op) {
            Some(done) => done.map(|()| staging.path(entry)),
            None => staging.make_dir(entry, owner),
        }
    }

    /// [`Staging::mirror`] onto the held directory.
    pub fn mirror(&self, staging: &Staging, entry: &str, onto: &Held) -> Result<(), StagingError> {
        let (dev, ino) = id_args(onto);
        let op = [
            "mirror".as_ref(),
            entry.as_ref(),
            onto.path().as_os_str(),
            dev.as_ref(),
            ino.as_ref(),
        ];
        match self.helper(staging, &op) {
            Some(done) => done,
            None => staging.mirror(entry, onto),
        }
    }

    /// [`Staging::mirrored`].
    pub fn mirrored(&self, staging: &Staging, entry: &str) -> Result<bool, StagingError> {
        match self.helper(staging, &["mirrored".as_ref(), entry.as_ref()]) {
            Some(Ok(())) => Ok(true),
            // The helper exits 1 both for "no" and for a failure; either
            // way the caller binds again, which replaces nothing wrongly.
            Some(Err(_)) => Ok(false),
            None => staging.mirrored(entry),
        }
    }

    /// [`Staging::unmirror`].
    pub fn unmirror(&self, staging: &Staging, entry: &str) -> Result<(), StagingError> {
        match self.helper(staging, &["unmirror".as_ref(), entry.as_ref()]) {
            Some(done) => done,
            None => staging.unmirror(entry),
        }
    }

    /// [`Staging::release`].
    pub fn release(&self, staging: &Staging, entry: &str) -> Result<(), StagingError> {
        match self.helper(staging, &["release".as_ref(), entry.as_ref()]) {
            Some(done) => done,
            None => staging.release(entry),
        }
    }

    /// Takes off, exactly ([`super::staging::unmount_exact`]), every mount
    /// at `path` of this source and type (a leftover of a managed mount).
    pub fn clear_path(
        &self,
        staging: &Staging,
        path: &Path,
        source: &str,
        fs_type: &str,
    ) -> Result<(), StagingError> {
        let op = [
            "clear-path".as_ref(),
            path.as_os_str(),
            source.as_ref(),
            fs_type.as_ref(),
        ];
        match self.helper(staging, &op) {
            Some(done) => done,
            None => clear_path(path, source, fs_type).map_err(|source| StagingError::Io {
                path: path.to_owned(),
                action: "take a leftover mount off",
                source,
            }),
        }
    }
}

fn id_args(held: &Held) -> (String, String) {
    let (dev, ino) = held.id();
    (dev.to_string(), ino.to_string())
}

fn clear_path(path: &Path, source: &str, fs_type: &str) -> std::io::Result<()> {
    let entries = mountinfo::read()?;
    for entry in entries
        .iter()
        .rev()
        .filter(|e| e.mount_point == path && e.source == source && e.fs_type == fs_type)
    {
        super::staging::unmount_exact(entry)?;
    }
    Ok(())
}

/// The helper: `HELPER_ARG STAGING OP ARGS...`; exit status 0 when done
/// (for `mirrored`: when mirrored), 1 with the reason on stderr otherwise.
pub fn helper_main(args: &[OsString]) -> ExitCode {
    match run_helper(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn run_helper(args: &[OsString]) -> Result<bool, String> {
    let arg = |i: usize| args.get(i).ok_or_else(|| format!("argument {i} missing"));
    let text = |i: usize| -> Result<String, String> {
        arg(i).map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned())
    };
    let staging = Staging::prepare(Path::new(arg(0)?)).map_err(|e| e.to_string())?;
    let op = text(1)?;
    let entry = text(2)?;
    // The object named must still be the one the agent checked.
    let held = |path_at: usize| -> Result<Held, String> {
        let path = Path::new(arg(path_at)?);
        let held = Held::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let dev: u64 = text(path_at + 1)?
            .parse()
            .map_err(|_| "bad device".to_owned())?;
        let ino: u64 = text(path_at + 2)?
            .parse()
            .map_err(|_| "bad inode".to_owned())?;
        if held.id() != (dev, ino) {
            return Err(format!(
                "{} is no longer the object that was checked",
                path.display()
            ));
        }
        Ok(held)
    };
    let done = match op.as_str() {
        "bind" => staging.bind(&entry, &held(3)?).map(|_| true),
        "make-dir" => {
            let owner = match (args.get(3), args.get(4)) {
                (Some(_), Some(_)) => Some((
                    text(3)?.parse().map_err(|_| "bad uid".to_owned())?,
                    text(4)?.parse().map_err(|_| "bad gid".to_owned())?,
                )),
                _ => None,
            };
            staging.make_dir(&entry, owner).map(|_| true)
        }
        "mirror" => staging.mirror(&entry, &held(3)?).map(|()| true),
        "mirrored" => staging.mirrored(&entry),
        "unmirror" => staging.unmirror(&entry).map(|()| true),
        "release" => staging.release(&entry).map(|()| true),
        "clear-path" => {
            return clear_path(Path::new(arg(2)?), &text(3)?, &text(4)?)
                .map(|()| true)
                .map_err(|e| e.to_string());
        }
        other => return Err(format!("unknown staging operation {other:?}")),
    };
    done.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helper_acts_only_on_the_object_the_agent_checked() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: staging binds need root");
            return;
        }
        crate::testing::private_mount_namespace();
        let base = tempfile::tempdir().unwrap();
        let base = base.path().canonicalize().unwrap();
        let staging_dir = base.join("staging");
        Staging::prepare(&staging_dir).unwrap();
        let data = base.join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("marker"), b"m").unwrap();
        let held = Held::open(&data).unwrap();
        let (dev, ino) = held.id();
        let args = |ino: u64| -> Vec<OsString> {
            [
                staging_dir.as_os_str(),
                "bind".as_ref(),
                "j.0".as_ref(),
                data.as_os_str(),
                dev.to_string().as_ref(),
                ino.to_string().as_ref(),
            ]
            .into_iter()
            .map(OsString::from)
            .collect()
        };
        // Swapped since the check: another inode at the path is refused.
        let refused = run_helper(&args(ino + 1)).unwrap_err();
        assert!(refused.contains("no longer the object"), "{refused}");
        assert!(!staging_dir.join("j.0").exists());
        assert!(run_helper(&args(ino)).unwrap());
        assert!(staging_dir.join("j.0/marker").exists());
        let release: Vec<OsString> = [staging_dir.as_os_str(), "release".as_ref(), "j.0".as_ref()]
            .into_iter()
            .map(OsString::from)
            .collect();
        assert!(run_helper(&release).unwrap());
        assert!(!staging_dir.join("j.0").exists());
        assert!(run_helper(&[staging_dir.into(), "nonsense".into(), "x".into()]).is_err());
    }
}

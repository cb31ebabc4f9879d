//! Resolving a checked [`RunRequest`] against this host into a [`Launch`].
//!
//! [`resolve`] looks at the filesystem and the user database (blocking;
//! called from `spawn_blocking`): at submission, to refuse a bad request with
//! a clear status, and again when the run starts, since files and users may
//! change while it waits.
//!
//! The interpreter comes from the script's `#!` line (parsed here as the
//! kernel would: the program, then at most one argument), else `/bin/bash`;
//! the agent starts the interpreter itself, so a script file needs no execute
//! bit. The environment is built from scratch (like sudo's `env_reset`), so
//! nothing of the agent's own environment (`NOTIFY_SOCKET`, `WATCHDOG_*`,
//! credentials given to the agent) reaches a script.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::accounts::{Account, Accounts};
use super::runner::{Launch, UserIds};
use super::{RUN_MARKER_ENV, RunRequest, ScriptSource, SetupError};

/// The interpreter of scripts without a `#!` line.
pub const DEFAULT_INTERPRETER: &str = "/bin/bash";
/// `PATH` of every script.
pub const SCRIPT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Variables passed on from the agent's own environment when set.
const PASSED_ENV: [&str; 8] = [
    "LANG",
    "TZ",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
];

/// What every run shares: the instance's `CI_*` variables, the variables
/// passed on from the agent, and how trees are stopped.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LaunchContext {
    /// `CI_*` and passed-on variables.
    pub base_env: Vec<(String, String)>,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Stop leftovers when a script exits.
    pub kill_leftovers: bool,
    /// Where inline scripts are written for their run.
    pub scripts_dir: PathBuf,
}

impl LaunchContext {
    /// The variables of [`PASSED_ENV`] set in this process's environment.
    pub fn passed_env() -> Vec<(String, String)> {
        PASSED_ENV
            .iter()
            .filter_map(|name| std::env::var(name).ok().map(|v| ((*name).to_owned(), v)))
            .collect()
    }
}

/// A request resolved against this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The process to start.
    pub launch: Launch,
    /// The inline script's file, to delete when the run ends.
    pub script_file: Option<PathBuf>,
    /// The user name it runs as.
    pub user_name: String,
}

/// Looks at the host: the script (existence, `#!` line), the user, the
/// working directory. With `materialize`, the run id, writes an inline script
/// to its file and returns the complete [`Launch`]. Blocking.
pub fn resolve(
    request: &RunRequest,
    accounts: &dyn Accounts,
    context: &LaunchContext,
    materialize: Option<&str>,
) -> Result<Resolved, SetupError> {
    let user_name = if request.run_as.is_empty() {
        "root"
    } else {
        request.run_as.as_str()
    };
    let account = match accounts.lookup(user_name) {
        Ok(Some(account)) => account,
        Ok(None) if request.run_as.is_empty() => Account::root(),
        Ok(None) => {
            return Err(SetupError::UnknownUser {
                user: request.run_as.clone(),
            });
        }
        Err(source) => {
            return Err(SetupError::UserLookup {
                user: user_name.to_owned(),
                source,
            });
        }
    };
    // Opened once and checked through the descriptor; its identity goes to
    // the supervisor, which enters only that very directory.
    let (working_dir, working_dir_id) = match &request.working_dir {
        Some(dir) => match held_dir(dir) {
            Some(held) => {
                // A script running as root enters the directory by name when
                // systemd starts it (WorkingDirectory=): only a directory no
                // other user can change, or swap, is used for it.
                if account.uid == 0
                    && let Ok(Some(who)) = held.changeable()
                {
                    return Err(SetupError::Invalid {
                        field: "working_dir",
                        problem: format!(
                            "{} can be changed by a user other than root ({who}); a script \
                             running as root gets only a directory that only root can change \
                             (or set run_as)",
                            dir.display()
                        ),
                    });
                }
                (dir.clone(), Some(held.id()))
            }
            None => return Err(SetupError::WorkingDirMissing { path: dir.clone() }),
        },
        None => match held_dir(&account.home) {
            Some(held) => (account.home.clone(), Some(held.id())),
            None => (
                PathBuf::from("/"),
                held_dir(Path::new("/")).map(|held| held.id()),
            ),
        },
    };

    let (first_line, script_path, script_file) = match &request.source {
        ScriptSource::Path(path) => {
            let first = read_first_line(path)?;
            (first, path.clone(), None)
        }
        ScriptSource::Inline(text) => {
            let first = text.lines().next().unwrap_or("").as_bytes().to_vec();
            match materialize {
                Some(run_id) => {
                    let file = write_inline(&context.scripts_dir, run_id, text, &account)?;
                    (first, file.clone(), Some(file))
                }
                None => (first, PathBuf::from("inline"), None),
            }
        }
    };
    let (program, interpreter_arg) = match parse_shebang(&first_line) {
        Some((program, arg)) => {
            if !program.is_file() {
                if let Some(file) = &script_file {
                    let _ = std::fs::remove_file(file);
                }
                return Err(SetupError::InterpreterMissing {
                    script: request.source.describe(),
                    interpreter: program,
                });
            }
            (program, arg)
        }
        None => (PathBuf::from(DEFAULT_INTERPRETER), None),
    };

    let mut args = Vec::with_capacity(request.args.len() + 2);
    args.extend(interpreter_arg);
    args.push(script_path.to_string_lossy().into_owned());
    args.extend(request.args.iter().cloned());

    let run_id = materialize.unwrap_or_default();
    let user = (account.uid != 0 || !request.run_as.is_empty()).then(|| UserIds {
        uid: account.uid,
        gid: account.gid,
        groups: account.groups.clone(),
    });
    Ok(Resolved {
        launch: Launch {
            run_id: run_id.to_owned(),
            program,
            args,
            env: environment(request, &account, context, run_id),
            working_dir,
            working_dir_id,
            user,
            kill_grace: context.kill_grace,
            kill_leftovers: context.kill_leftovers,
            timeout: request.timeout(),
        },
        script_file,
        user_name: account.name,
    })
}

/// The script's complete environment; later entries win.
fn environment(
    request: &RunRequest,
    account: &Account,
    context: &LaunchContext,
    run_id: &str,
) -> Vec<(String, String)> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), SCRIPT_PATH.to_owned());
    env.insert("LANG".to_owned(), "C.UTF-8".to_owned());
    for (k, v) in &context.base_env {
        env.insert(k.clone(), v.clone());
    }
    env.insert(
        "HOME".to_owned(),
        account.home.to_string_lossy().into_owned(),
    );
    env.insert("USER".to_owned(), account.name.clone());
    env.insert("LOGNAME".to_owned(), account.name.clone());
    env.insert(
        "SHELL".to_owned(),
        account.shell.to_string_lossy().into_owned(),
    );
    for (k, v) in &request.env {
        env.insert(k.clone(), v.clone());
    }
    env.insert(
        "INSTANCE_AGENT_SETUP_KIND".to_owned(),
        request.kind.name().to_owned(),
    );
    env.insert(RUN_MARKER_ENV.to_owned(), run_id.to_owned());
    env.into_iter().collect()
}

/// `dir` opened once, if it is a directory.
fn held_dir(dir: &Path) -> Option<crate::paths::held::Held> {
    crate::paths::held::Held::open(dir)
        .ok()
        .filter(|held| held.is_dir())
}

/// The first line of a script file (at most 256 bytes); checks that it is a
/// non-empty regular file. Opened once: the checks look at the open file
/// (`fstat`), not at whatever the path names by then. A FIFO or device is
/// opened non-blocking so that the open itself cannot hang.
fn read_first_line(path: &Path) -> Result<Vec<u8>, SetupError> {
    let unreadable = |source| SetupError::ScriptUnreadable {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(SetupError::NotAFile {
            path: path.to_owned(),
        });
    }
    // Like an inline script, a file of nothing but whitespace is empty. The
    // scan stops at the first other byte, so a real script costs one read.
    if meta.len() == 0 || is_blank(&mut file).map_err(unreadable)? {
        return Err(SetupError::EmptyScript {
            source_name: path.display().to_string(),
        });
    }
    let mut head = Vec::with_capacity(256);
    std::io::Seek::rewind(&mut file)
        .and_then(|()| file.take(256).read_to_end(&mut head))
        .map_err(unreadable)?;
    let end = memchr::memchr(b'\n', &head).unwrap_or(head.len());
    head.truncate(end);
    Ok(head)
}

/// Whether everything from the current position to the end is ASCII
/// whitespace (what `str::trim` removes from an inline script, for ASCII).
fn is_blank(file: &mut std::fs::File) -> std::io::Result<bool> {
    let mut buf = [0u8; 8192];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        if !buf[..n].iter().all(u8::is_ascii_whitespace) {
            return Ok(false);
        }
    }
}

/// Parses `#!program [one argument]` as Linux does.
pub fn parse_shebang(first_line: &[u8]) -> Option<(PathBuf, Option<String>)> {
    let rest = first_line.strip_prefix(b"#!")?;
    let text = String::from_utf8_lossy(rest);
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let (program, arg) = match text.split_once([' ', '\t']) {
        Some((program, arg)) => (
            program,
            Some(arg.trim().to_owned()).filter(|a| !a.is_empty()),
        ),
        None => (text, None),
    };
    Some((PathBuf::from(program), arg))
}

/// Where the inline script of a run is written.
pub fn inline_script_path(scripts_dir: &Path, run_id: &str) -> PathBuf {
    scripts_dir.join(format!("{run_id}.script"))
}

/// Writes an inline script to `<scripts_dir>/<run id>.script`, readable only
/// by the user it runs as.
fn write_inline(
    dir: &Path,
    run_id: &str,
    text: &str,
    account: &Account,
) -> Result<PathBuf, SetupError> {
    let path = inline_script_path(dir, run_id);
    let err = |source| SetupError::ScriptFile {
        path: path.clone(),
        source,
    };
    // 0711: a run_as user may reach its own script by name, not list others.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .map_err(err)?;
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&path)
        .map_err(err)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(err)?;
    std::os::unix::fs::fchown(&file, Some(account.uid), Some(account.gid)).map_err(err)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setup::fake::FakeAccounts;

    fn context(dir: &Path) -> LaunchContext {
        LaunchContext {
            base_env: vec![("CI_NAME".into(), "box".into())],
            kill_grace: Duration::from_secs(3),
            kill_leftovers: true,
            scripts_dir: dir.to_owned(),
        }
    }

    #[test]
    fn shebang_like_the_kernel() {
        assert_eq!(
            parse_shebang(b"#!/usr/bin/env python3"),
            Some(("/usr/bin/env".into(), Some("python3".into())))
        );
        assert_eq!(
            parse_shebang(b"#! /bin/bash -e -u"),
            Some(("/bin/bash".into(), Some("-e -u".into())))
        );
        assert_eq!(parse_shebang(b"#!/bin/sh"), Some(("/bin/sh".into(), None)));
        assert_eq!(parse_shebang(b"echo hi"), None);
        assert_eq!(parse_shebang(b"#!"), None);
    }

    #[test]
    fn inline_script_becomes_a_file_run_by_bash_with_args_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let req = RunRequest::adhoc(ScriptSource::Inline("echo hi\n".into()));
        let resolved = resolve(
            &req,
            &FakeAccounts::default(),
            &context(dir.path()),
            Some("r1"),
        )
        .expect("resolves");
        let file = dir.path().join("r1.script");
        assert_eq!(resolved.script_file.as_deref(), Some(file.as_path()));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "echo hi\n");
        let launch = resolved.launch;
        assert_eq!(launch.program, PathBuf::from(DEFAULT_INTERPRETER));
        assert_eq!(
            launch.args,
            vec![
                file.to_string_lossy().into_owned(),
                "a b".into(),
                "c".into()
            ]
        );
        assert_eq!(launch.user, None, "root stays root");
        let env: BTreeMap<_, _> = launch.env.into_iter().collect();
        assert_eq!(env["FOO"], "bar");
        assert_eq!(env["CI_NAME"], "box");
        assert_eq!(env[RUN_MARKER_ENV], "r1");
        assert_eq!(env["HOME"], "/root");
        assert!(!env.contains_key("NOTIFY_SOCKET"));
    }

    #[test]
    fn host_errors_are_specific() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let accounts = FakeAccounts::default();
        let missing = RunRequest::adhoc(ScriptSource::Path(dir.path().join("nope.sh")));
        assert!(matches!(
            resolve(&missing, &accounts, &ctx, None),
            Err(SetupError::ScriptUnreadable { .. })
        ));
        let empty_file = dir.path().join("empty.sh");
        std::fs::write(&empty_file, "").unwrap();
        assert!(matches!(
            resolve(
                &RunRequest::adhoc(ScriptSource::Path(empty_file)),
                &accounts,
                &ctx,
                None
            ),
            Err(SetupError::EmptyScript { .. })
        ));
        let blank_file = dir.path().join("blank.sh");
        std::fs::write(&blank_file, " \n\t\r\n").unwrap();
        assert!(matches!(
            resolve(
                &RunRequest::adhoc(ScriptSource::Path(blank_file)),
                &accounts,
                &ctx,
                None
            ),
            Err(SetupError::EmptyScript { .. })
        ));
        let mut someone = RunRequest::adhoc(ScriptSource::Inline("true".into()));
        someone.run_as = "ghost".into();
        assert!(matches!(
            resolve(&someone, &accounts, &ctx, None),
            Err(SetupError::UnknownUser { .. })
        ));
        let odd = RunRequest::adhoc(ScriptSource::Inline("#!/no/such/python\nprint(1)".into()));
        assert!(matches!(
            resolve(&odd, &accounts, &ctx, None),
            Err(SetupError::InterpreterMissing { .. })
        ));
        let mut nowhere = RunRequest::adhoc(ScriptSource::Inline("true".into()));
        nowhere.working_dir = Some(dir.path().join("missing"));
        assert!(matches!(
            resolve(&nowhere, &accounts, &ctx, None),
            Err(SetupError::WorkingDirMissing { .. })
        ));
    }

    #[test]
    fn the_script_and_working_dir_are_checked_through_one_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let accounts = FakeAccounts::default();
        // A FIFO is refused as not a file, without the open hanging on it.
        let fifo = dir.path().join("fifo.sh");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            resolve(
                &RunRequest::adhoc(ScriptSource::Path(fifo)),
                &accounts,
                &ctx,
                None
            ),
            Err(SetupError::NotAFile { .. })
        ));
        // The working dir's identity goes with the launch.
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let mut request = RunRequest::adhoc(ScriptSource::Inline("true".into()));
        request.working_dir = Some(work.clone());
        let resolved = resolve(&request, &accounts, &ctx, Some("r1")).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&work).unwrap();
        assert_eq!(
            resolved.launch.working_dir_id,
            Some((meta.dev(), meta.ino()))
        );
    }
}

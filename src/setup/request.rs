//! Checking a [`RunRequest`] and resolving it into a [`Launch`].
//!
//! [`check_shape`] needs no I/O and runs first. [`resolve`] looks at the
//! filesystem and the user database (blocking; called from `spawn_blocking`):
//! at submission, to refuse a bad request with a clear status, and again when
//! the run starts, since files and users may change while it waits.
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
use super::{MAX_SETUP_TIMEOUT_SECONDS, RUN_MARKER_ENV, RunRequest, ScriptSource, SetupError};
use crate::validate::is_env_name;

/// The interpreter of scripts without a `#!` line.
pub const DEFAULT_INTERPRETER: &str = "/bin/bash";
/// `PATH` of every script.
pub const SCRIPT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Variables the agent sets and a request may not override.
const RESERVED_ENV: [&str; 2] = [RUN_MARKER_ENV, "INSTANCE_AGENT_SETUP_KIND"];
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

/// The size limits of a request, from `[setup]`
/// ([`SetupConfig::request_limits`](super::config::SetupConfig::request_limits));
/// every message names its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// `setup.max_script_bytes`: the inline script.
    pub max_script_bytes: u64,
    /// `setup.max_args`: how many arguments.
    pub max_args: usize,
    /// `setup.max_arg_bytes`: one argument, or one variable's value.
    pub max_arg_bytes: usize,
    /// `setup.max_env_entries`: how many variables.
    pub max_env_entries: usize,
    /// `setup.max_env_bytes`: all variables (`NAME=value` each).
    pub max_env_bytes: usize,
}

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

/// Checks what needs no I/O: sizes, names, absolute paths without `..`, the
/// timeout, the shape of `run_as`. Config check runs it on declared scripts
/// too, so that what the API would refuse never reaches a start.
pub fn check_shape(request: &RunRequest, limits: &RequestLimits) -> Result<(), SetupError> {
    let max_script_bytes = limits.max_script_bytes;
    match &request.source {
        ScriptSource::Inline(text) => {
            if text.len() as u64 > max_script_bytes {
                return Err(SetupError::ScriptTooLarge {
                    size: text.len(),
                    limit: max_script_bytes,
                });
            }
            if text.trim().is_empty() {
                return Err(SetupError::EmptyScript {
                    source_name: "inline".into(),
                });
            }
            if text.contains('\0') {
                return Err(invalid("script", "must not contain NUL bytes".into()));
            }
        }
        ScriptSource::Path(path) => {
            if path.as_os_str().is_empty() {
                return Err(SetupError::NoScript);
            }
            crate::paths::normalise(path).map_err(|e| invalid("path", e.to_string()))?;
        }
    }
    if request.args.len() > limits.max_args {
        return Err(invalid(
            "args",
            format!(
                "{} arguments exceed the limit of {} (setup.max_args)",
                request.args.len(),
                limits.max_args
            ),
        ));
    }
    if request.args.iter().any(|a| a.contains('\0')) {
        return Err(invalid(
            "args",
            "arguments must not contain NUL bytes".into(),
        ));
    }
    if let Some((index, arg)) = request
        .args
        .iter()
        .enumerate()
        .find(|(_, a)| a.len() > limits.max_arg_bytes)
    {
        return Err(invalid(
            "args",
            format!(
                "argument {} is {} bytes: the limit is {} (setup.max_arg_bytes)",
                index + 1,
                arg.len(),
                limits.max_arg_bytes
            ),
        ));
    }
    if request.env.len() > limits.max_env_entries {
        return Err(invalid(
            "env",
            format!(
                "{} variables exceed the limit of {} (setup.max_env_entries)",
                request.env.len(),
                limits.max_env_entries
            ),
        ));
    }
    let env_bytes: usize = request.env.iter().map(|(k, v)| k.len() + v.len() + 1).sum();
    if env_bytes > limits.max_env_bytes {
        return Err(invalid(
            "env",
            format!(
                "{env_bytes} bytes exceed the limit of {} (setup.max_env_bytes)",
                limits.max_env_bytes
            ),
        ));
    }
    for (name, value) in &request.env {
        if !is_env_name(name) {
            return Err(invalid(
                "env",
                format!("{name:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"),
            ));
        }
        if RESERVED_ENV.contains(&name.as_str()) {
            return Err(invalid("env", format!("{name} is set by the agent")));
        }
        // The value itself is never echoed: it may be a secret.
        if value.contains('\0') {
            return Err(invalid(
                "env",
                format!("the value of {name} contains a NUL byte"),
            ));
        }
        if value.len() > limits.max_arg_bytes {
            return Err(invalid(
                "env",
                format!(
                    "the value of {name} is {} bytes: the limit is {} (setup.max_arg_bytes)",
                    value.len(),
                    limits.max_arg_bytes
                ),
            ));
        }
    }
    if let Some(timeout) = request.timeout
        && (timeout.is_zero() || timeout.as_secs() > MAX_SETUP_TIMEOUT_SECONDS)
    {
        return Err(invalid(
            "timeout_seconds",
            format!(
                "{} s is out of range: allowed 1 to {MAX_SETUP_TIMEOUT_SECONDS} (0 means 900)",
                timeout.as_secs()
            ),
        ));
    }
    if let Some(dir) = &request.working_dir {
        crate::paths::normalise(dir).map_err(|e| invalid("working_dir", e.to_string()))?;
    }
    if request.run_as.contains(['\0', '/', ':']) || request.run_as.len() > 256 {
        return Err(invalid(
            "run_as",
            format!("{:?} is not a user name", request.run_as),
        ));
    }
    Ok(())
}

fn invalid(field: &'static str, problem: String) -> SetupError {
    SetupError::Invalid { field, problem }
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
    let working_dir = match &request.working_dir {
        Some(dir) if dir.is_dir() => dir.clone(),
        Some(dir) => return Err(SetupError::WorkingDirMissing { path: dir.clone() }),
        None if account.home.is_dir() => account.home.clone(),
        None => PathBuf::from("/"),
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
            user,
            kill_grace: context.kill_grace,
            kill_leftovers: context.kill_leftovers,
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

/// The first line of a script file (at most 256 bytes); checks that it is a
/// non-empty regular file.
fn read_first_line(path: &Path) -> Result<Vec<u8>, SetupError> {
    let unreadable = |source| SetupError::ScriptUnreadable {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if !meta.is_file() {
        return Err(SetupError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
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
    use crate::setup::SetupKind;
    use crate::setup::fake::FakeAccounts;

    fn request(source: ScriptSource) -> RunRequest {
        RunRequest {
            kind: SetupKind::Adhoc,
            source,
            args: vec!["a b".into(), "c".into()],
            env: BTreeMap::from([("FOO".to_owned(), "bar".to_owned())]),
            timeout: None,
            run_as: String::new(),
            working_dir: None,
            idempotency_key: String::new(),
        }
    }

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

    /// Limits too wide to matter but for the script's size.
    fn limits(max_script_bytes: u64) -> RequestLimits {
        RequestLimits {
            max_script_bytes,
            max_args: 1024,
            max_arg_bytes: 128 << 10,
            max_env_entries: 1024,
            max_env_bytes: 1 << 20,
        }
    }

    fn refusal(request: &RunRequest, limits: &RequestLimits) -> (&'static str, String) {
        match check_shape(request, limits) {
            Err(SetupError::Invalid { field, problem }) => (field, problem),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn each_limit_is_set_in_config_and_named_when_hit() {
        let tight = RequestLimits {
            max_script_bytes: 100,
            max_args: 2,
            max_arg_bytes: 8,
            max_env_entries: 2,
            max_env_bytes: 12,
        };
        let mut args = request(ScriptSource::Inline("true".into()));
        args.env.clear();
        args.args = vec!["1".into(), "2".into(), "3".into()];
        let (field, problem) = refusal(&args, &tight);
        assert_eq!(field, "args");
        assert!(
            problem.contains("3 arguments exceed the limit of 2 (setup.max_args)"),
            "{problem}"
        );

        args.args = vec!["ok".into(), "123456789".into()];
        let (field, problem) = refusal(&args, &tight);
        assert_eq!(field, "args");
        assert!(
            problem.contains("argument 2 is 9 bytes: the limit is 8 (setup.max_arg_bytes)"),
            "{problem}"
        );

        let mut env = request(ScriptSource::Inline("true".into()));
        env.args.clear();
        env.env = BTreeMap::from([
            ("A".into(), "1".into()),
            ("B".into(), "2".into()),
            ("C".into(), "3".into()),
        ]);
        let (field, problem) = refusal(&env, &tight);
        assert_eq!(field, "env");
        assert!(
            problem.contains("3 variables exceed the limit of 2 (setup.max_env_entries)"),
            "{problem}"
        );

        env.env = BTreeMap::from([("A".into(), "123".into()), ("B".into(), "123456".into())]);
        let (field, problem) = refusal(&env, &tight);
        assert_eq!(field, "env");
        assert!(
            problem.contains("13 bytes exceed the limit of 12 (setup.max_env_bytes)"),
            "{problem}"
        );

        env.env = BTreeMap::from([("SECRET".into(), "hunter2hunter2".into())]);
        let roomy = RequestLimits {
            max_env_bytes: 100,
            ..tight
        };
        let (field, problem) = refusal(&env, &roomy);
        assert_eq!(field, "env");
        assert!(problem.contains("(setup.max_arg_bytes)"), "{problem}");
        assert!(
            !problem.contains("hunter2"),
            "a value is never echoed: {problem}"
        );
    }

    #[test]
    fn paths_with_parent_components_are_refused_naming_the_field() {
        let up = request(ScriptSource::Path("/opt/../etc/x".into()));
        let (field, problem) = refusal(&up, &limits(100));
        assert_eq!(field, "path");
        assert!(
            problem.contains("/opt/../etc/x") && problem.contains(".."),
            "{problem}"
        );
        let mut dir = request(ScriptSource::Inline("true".into()));
        dir.working_dir = Some("/srv/../root".into());
        let (field, _) = refusal(&dir, &limits(100));
        assert_eq!(field, "working_dir");
        let mut clean = request(ScriptSource::Path("/opt/./setup/x.sh".into()));
        clean.working_dir = Some("/srv/".into());
        check_shape(&clean, &limits(100)).expect("`.` and a trailing slash are harmless");
    }

    #[test]
    fn shape_errors_name_the_field() {
        let empty = request(ScriptSource::Inline("  \n".into()));
        assert!(matches!(
            check_shape(&empty, &limits(100)),
            Err(SetupError::EmptyScript { .. })
        ));
        let big = request(ScriptSource::Inline("x".repeat(101)));
        assert!(matches!(
            check_shape(&big, &limits(100)),
            Err(SetupError::ScriptTooLarge {
                size: 101,
                limit: 100
            })
        ));
        let relative = request(ScriptSource::Path("a.sh".into()));
        assert!(matches!(
            check_shape(&relative, &limits(100)),
            Err(SetupError::Invalid { field: "path", .. })
        ));
        let mut bad_env = request(ScriptSource::Inline("true".into()));
        bad_env.env.insert("1X".into(), "v".into());
        assert!(matches!(
            check_shape(&bad_env, &limits(100)),
            Err(SetupError::Invalid { field: "env", .. })
        ));
        let mut reserved = request(ScriptSource::Inline("true".into()));
        reserved.env.insert(RUN_MARKER_ENV.into(), "v".into());
        assert!(check_shape(&reserved, &limits(100)).is_err());
        let mut long = request(ScriptSource::Inline("true".into()));
        long.timeout = Some(Duration::from_secs(MAX_SETUP_TIMEOUT_SECONDS + 1));
        assert!(matches!(
            check_shape(&long, &limits(100)),
            Err(SetupError::Invalid {
                field: "timeout_seconds",
                ..
            })
        ));
    }

    #[test]
    fn inline_script_becomes_a_file_run_by_bash_with_args_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(ScriptSource::Inline("echo hi\n".into()));
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
        let missing = request(ScriptSource::Path(dir.path().join("nope.sh")));
        assert!(matches!(
            resolve(&missing, &accounts, &ctx, None),
            Err(SetupError::ScriptUnreadable { .. })
        ));
        let empty_file = dir.path().join("empty.sh");
        std::fs::write(&empty_file, "").unwrap();
        assert!(matches!(
            resolve(
                &request(ScriptSource::Path(empty_file)),
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
                &request(ScriptSource::Path(blank_file)),
                &accounts,
                &ctx,
                None
            ),
            Err(SetupError::EmptyScript { .. })
        ));
        let mut someone = request(ScriptSource::Inline("true".into()));
        someone.run_as = "ghost".into();
        assert!(matches!(
            resolve(&someone, &accounts, &ctx, None),
            Err(SetupError::UnknownUser { .. })
        ));
        let odd = request(ScriptSource::Inline("#!/no/such/python\nprint(1)".into()));
        assert!(matches!(
            resolve(&odd, &accounts, &ctx, None),
            Err(SetupError::InterpreterMissing { .. })
        ));
        let mut nowhere = request(ScriptSource::Inline("true".into()));
        nowhere.working_dir = Some(dir.path().join("missing"));
        assert!(matches!(
            resolve(&nowhere, &accounts, &ctx, None),
            Err(SetupError::WorkingDirMissing { .. })
        ));
    }
}

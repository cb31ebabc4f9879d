//! Checking the shape of a [`RunRequest`]: what needs no I/O (sizes, names,
//! absolute paths without `..`, the timeout, the shape of `run_as`), each
//! refusal naming its field and, for a size, its `[setup]` key.
//!
//! [`check_shape`] runs first, at submission and on every declared script at
//! config check (the same rules as the API); what the host has to say (the
//! script, the user, the working directory) is [`super::resolve`]'s.

use super::{MAX_SETUP_TIMEOUT_SECONDS, RUN_MARKER_ENV, RunRequest, ScriptSource, SetupError};
use crate::validate::is_env_name;

/// Variables the agent sets and a request may not override.
const RESERVED_ENV: [&str; 2] = [RUN_MARKER_ENV, "INSTANCE_AGENT_SETUP_KIND"];

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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;

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
        let mut args = RunRequest::adhoc(ScriptSource::Inline("true".into()));
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

        let mut env = RunRequest::adhoc(ScriptSource::Inline("true".into()));
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
        let up = RunRequest::adhoc(ScriptSource::Path("/opt/../etc/x".into()));
        let (field, problem) = refusal(&up, &limits(100));
        assert_eq!(field, "path");
        assert!(
            problem.contains("/opt/../etc/x") && problem.contains(".."),
            "{problem}"
        );
        let mut dir = RunRequest::adhoc(ScriptSource::Inline("true".into()));
        dir.working_dir = Some("/srv/../root".into());
        let (field, _) = refusal(&dir, &limits(100));
        assert_eq!(field, "working_dir");
        let mut clean = RunRequest::adhoc(ScriptSource::Path("/opt/./setup/x.sh".into()));
        clean.working_dir = Some("/srv/".into());
        check_shape(&clean, &limits(100)).expect("`.` and a trailing slash are harmless");
    }

    #[test]
    fn shape_errors_name_the_field() {
        let empty = RunRequest::adhoc(ScriptSource::Inline("  \n".into()));
        assert!(matches!(
            check_shape(&empty, &limits(100)),
            Err(SetupError::EmptyScript { .. })
        ));
        let big = RunRequest::adhoc(ScriptSource::Inline("x".repeat(101)));
        assert!(matches!(
            check_shape(&big, &limits(100)),
            Err(SetupError::ScriptTooLarge {
                size: 101,
                limit: 100
            })
        ));
        let relative = RunRequest::adhoc(ScriptSource::Path("a.sh".into()));
        assert!(matches!(
            check_shape(&relative, &limits(100)),
            Err(SetupError::Invalid { field: "path", .. })
        ));
        let mut bad_env = RunRequest::adhoc(ScriptSource::Inline("true".into()));
        bad_env.env.insert("1X".into(), "v".into());
        assert!(matches!(
            check_shape(&bad_env, &limits(100)),
            Err(SetupError::Invalid { field: "env", .. })
        ));
        let mut reserved = RunRequest::adhoc(ScriptSource::Inline("true".into()));
        reserved.env.insert(RUN_MARKER_ENV.into(), "v".into());
        assert!(check_shape(&reserved, &limits(100)).is_err());
        let mut long = RunRequest::adhoc(ScriptSource::Inline("true".into()));
        long.timeout = Some(Duration::from_secs(MAX_SETUP_TIMEOUT_SECONDS + 1));
        assert!(matches!(
            check_shape(&long, &limits(100)),
            Err(SetupError::Invalid {
                field: "timeout_seconds",
                ..
            })
        ));
    }
}

//! The `[setup]` section and its `[[setup.scripts]]` entries: structs,
//! defaults, ranges and validation. A declared script is also checked with
//! the rules of a request over the API ([`request::check_shape`]), so that
//! what the API would refuse never reaches a start.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::request::{self, RequestLimits};
use super::{
    DEFAULT_TIMEOUT, MAX_SETUP_TIMEOUT_SECONDS, RunRequest, ScriptSource, SetupError, SetupKind,
};
use crate::units::parse_duration;
use crate::validate::{self, FieldError, check_ranges, is_env_name};

/// `[setup]`: creation and startup scripts and how scripts are run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SetupConfig {
    /// Hold the job queue until the creation script has succeeded.
    pub gate_jobs: bool,
    /// Seconds between SIGTERM and SIGKILL when a script's tree is stopped.
    pub kill_grace_seconds: u32,
    /// Stop what a script left running when it exits.
    pub kill_leftovers: bool,
    /// Bytes of a run's log file kept from its start.
    pub log_head_bytes: u64,
    /// Bytes of a run's log kept from its end (also the memory held per running script).
    pub log_tail_bytes: u64,
    /// Lines kept in a run's `log_tail`.
    pub log_tail_lines: u32,
    /// Largest inline script accepted over the API.
    pub max_script_bytes: u64,
    /// Arguments of one script, at most.
    pub max_args: u32,
    /// Bytes of one argument or one environment value, at most.
    pub max_arg_bytes: u32,
    /// Environment variables of one request, at most.
    pub max_env_entries: u32,
    /// Bytes of one request's environment (`NAME=value` each), at most.
    pub max_env_bytes: u32,
    /// Runs accepted but not started yet, at most.
    pub max_pending_runs: u32,
    /// Finished runs kept (records and logs); the latest creation run is always kept.
    pub keep_runs: u32,
    /// `CI_NAME` for scripts; the host name when empty.
    pub ci_name: String,
    /// `CI_WORKSPACE` for scripts.
    pub ci_workspace: String,
    /// `CI_RESOURCE_GROUP` for scripts.
    pub ci_resource_group: String,
    /// `CI_LOCAL_UBUNTU_USER` for scripts.
    pub ci_local_ubuntu_user: String,
    /// Scripts declared here: at most one creation script, any number of startup scripts.
    pub scripts: Vec<SetupScriptConfig>,
}

impl Default for SetupConfig {
    fn default() -> Self {
        Self {
            gate_jobs: true,
            kill_grace_seconds: 10,
            kill_leftovers: true,
            log_head_bytes: 4 << 20,
            log_tail_bytes: 1 << 20,
            log_tail_lines: 20,
            max_script_bytes: 1 << 20,
            max_args: 1024,
            max_arg_bytes: 128 << 10,
            max_env_entries: 1024,
            max_env_bytes: 1 << 20,
            max_pending_runs: 32,
            keep_runs: 100,
            ci_name: String::new(),
            ci_workspace: String::new(),
            ci_resource_group: String::new(),
            ci_local_ubuntu_user: "azureuser".into(),
            scripts: Vec::new(),
        }
    }
}

/// When a configured script runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetupScriptKind {
    /// Once in the instance's life.
    Creation,
    /// At every agent start.
    Startup,
}

/// One `[[setup.scripts]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupScriptConfig {
    /// `creation` or `startup`.
    pub kind: SetupScriptKind,
    /// Absolute path of the script.
    pub path: PathBuf,
    /// Arguments, seen as $1, $2, ...
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A duration with suffix s, m, h or d (e.g. "15m").
    #[serde(default = "default_setup_timeout")]
    pub timeout: String,
    /// User to run as; root when empty.
    #[serde(default)]
    pub run_as: String,
    /// Working directory (absolute); the user's home when empty.
    #[serde(default)]
    pub working_dir: PathBuf,
}

fn default_setup_timeout() -> String {
    "15m".into()
}

impl SetupConfig {
    /// The size limits of a request, as set in this section.
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            max_script_bytes: self.max_script_bytes,
            max_args: self.max_args as usize,
            max_arg_bytes: self.max_arg_bytes as usize,
            max_env_entries: self.max_env_entries as usize,
            max_env_bytes: self.max_env_bytes as usize,
        }
    }

    /// Checks the section and every declared script; keys are relative to
    /// `[setup]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_ranges(&[
            ("kill_grace_seconds", self.kill_grace_seconds.into(), 1, 300),
            ("log_head_bytes", self.log_head_bytes, 4096, 1 << 30),
            ("log_tail_bytes", self.log_tail_bytes, 4096, 64 << 20),
            ("log_tail_lines", self.log_tail_lines.into(), 1, 1000),
            ("max_script_bytes", self.max_script_bytes, 1, 16 << 20),
            ("max_args", self.max_args.into(), 0, 65_536),
            // 128 KiB is the kernel's limit on one argument or variable
            // (MAX_ARG_STRLEN); beyond it exec fails.
            ("max_arg_bytes", self.max_arg_bytes.into(), 1, 128 << 10),
            ("max_env_entries", self.max_env_entries.into(), 0, 65_536),
            ("max_env_bytes", self.max_env_bytes.into(), 0, 16 << 20),
            ("max_pending_runs", self.max_pending_runs.into(), 1, 1000),
            ("keep_runs", self.keep_runs.into(), 1, 10_000),
        ])?;
        let creations = self
            .scripts
            .iter()
            .filter(|s| s.kind == SetupScriptKind::Creation)
            .count();
        if creations > 1 {
            return Err(FieldError::new(
                "scripts",
                format!("{creations} creation scripts are declared: at most one is allowed"),
            ));
        }
        let limits = self.request_limits();
        for (index, script) in self.scripts.iter().enumerate() {
            script
                .validate(&limits)
                .map_err(|error| error.within(&format!("scripts[{index}]")))?;
        }
        Ok(())
    }
}

impl SetupScriptConfig {
    /// The timeout; validated at load, so the fallback (15 minutes) is never used.
    pub fn timeout(&self) -> Duration {
        parse_duration(&self.timeout).unwrap_or(DEFAULT_TIMEOUT)
    }

    /// The request this entry makes when it runs (also what its validation
    /// judges it by).
    pub fn request(&self) -> RunRequest {
        RunRequest {
            kind: match self.kind {
                SetupScriptKind::Creation => SetupKind::Creation,
                SetupScriptKind::Startup => SetupKind::Startup,
            },
            source: ScriptSource::Path(self.path.clone()),
            args: self.args.clone(),
            env: self.env.clone().into_iter().collect(),
            timeout: Some(self.timeout()),
            run_as: self.run_as.clone(),
            working_dir: (!self.working_dir.as_os_str().is_empty())
                .then(|| self.working_dir.clone()),
            idempotency_key: String::new(),
        }
    }

    /// Checks one entry; keys are relative to the entry.
    fn validate(&self, limits: &RequestLimits) -> Result<(), FieldError> {
        validate::absolute("path", &self.path)?;
        match parse_duration(&self.timeout) {
            Some(d) if (1..=MAX_SETUP_TIMEOUT_SECONDS).contains(&d.as_secs()) => {}
            _ => {
                return Err(FieldError::new(
                    "timeout",
                    format!(
                        "{:?} must be a duration with suffix s, m, h or d (e.g. \"15m\"), \
                         from 1s to 7d",
                        self.timeout
                    ),
                ));
            }
        }
        if let Some(name) = self.env.keys().find(|name| !is_env_name(name)) {
            return Err(FieldError::new(
                "env",
                format!("{name:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"),
            ));
        }
        if !self.working_dir.as_os_str().is_empty() {
            validate::absolute("working_dir", &self.working_dir)?;
        }
        // What the API would refuse (reserved variables, `..` in a path,
        // a malformed user name, the size limits) is refused here too.
        request::check_shape(&self.request(), limits).map_err(|error| match error {
            SetupError::Invalid { field, problem } => FieldError::new(
                match field {
                    "timeout_seconds" => "timeout",
                    other => other,
                },
                problem,
            ),
            other => FieldError::new("path", other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> SetupConfig {
        toml::from_str(text).expect("parses")
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(SetupConfig::default().validate(), Ok(()));
    }

    #[test]
    fn setup_scripts_are_parsed_and_checked() {
        let ok = "[[scripts]]\nkind = \"creation\"\npath = \"/opt/a.sh\"\ntimeout = \"2h\"\n\
                  [[scripts]]\nkind = \"startup\"\npath = \"/opt/b.sh\"\nargs = [\"x\"]\n";
        let config = parse(ok);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.scripts.len(), 2);
        assert_eq!(config.scripts[0].timeout().as_secs(), 7200);
        assert_eq!(config.scripts[1].timeout().as_secs(), 900);

        let two = "[[scripts]]\nkind = \"creation\"\npath = \"/a\"\n\
                   [[scripts]]\nkind = \"creation\"\npath = \"/b\"\n";
        let error = parse(two).validate().unwrap_err();
        assert!(error.problem.contains("at most one"), "{error:?}");

        for (text, key) in [
            (
                "[[scripts]]\nkind = \"startup\"\npath = \"a.sh\"\n",
                "scripts[0].path",
            ),
            (
                "[[scripts]]\nkind = \"startup\"\npath = \"/a\"\ntimeout = \"15x\"\n",
                "scripts[0].timeout",
            ),
            (
                "[[scripts]]\nkind = \"startup\"\npath = \"/a\"\nenv = { \"1X\" = \"v\" }\n",
                "scripts[0].env",
            ),
        ] {
            assert_eq!(parse(text).validate().unwrap_err().key, key, "{text}");
        }
    }

    #[test]
    fn declared_scripts_are_refused_where_the_api_would_refuse_them() {
        let script = |extra: &str| {
            format!("[[scripts]]\nkind = \"startup\"\npath = \"/opt/a.sh\"\n{extra}\n")
        };
        for (extra, key, needle) in [
            (
                "run_as = \"no/such:user\"",
                "scripts[0].run_as",
                "not a user name",
            ),
            (
                "env = { INSTANCE_AGENT_SETUP_RUN = \"x\" }",
                "scripts[0].env",
                "set by the agent",
            ),
            (
                "working_dir = \"/opt/../etc\"",
                "scripts[0].working_dir",
                "..",
            ),
        ] {
            let error = parse(&script(extra)).validate().unwrap_err();
            assert!(
                error.key == key && error.problem.contains(needle),
                "{extra}: {error:?}"
            );
        }
        let dots = "[[scripts]]\nkind = \"startup\"\npath = \"/opt/../etc/x\"\n";
        let error = parse(dots).validate().unwrap_err();
        assert!(
            error.key == "scripts[0].path" && error.problem.contains(".."),
            "{error:?}"
        );

        let many_args = format!("max_args = 1\n{}", script("args = [\"a\", \"b\"]"));
        let error = parse(&many_args).validate().unwrap_err();
        assert!(
            error.key == "scripts[0].args" && error.problem.contains("setup.max_args"),
            "{error:?}"
        );
    }
}

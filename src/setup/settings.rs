//! [`Settings`]: what the setup domain runs with, derived once from the
//! `[setup]` section and the agent's dirs. `daemon.rs` builds it; the domain
//! never reads the whole config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::{SetupConfig, SetupScriptConfig};
use super::request::RequestLimits;
use super::resolve::LaunchContext;
use super::run_log::LogLimits;

/// The setup domain's settings, from `[setup]` and the agent's dirs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `<agent.logs_dir>/setup`.
    pub logs_dir: PathBuf,
    /// Log size limits.
    pub limits: LogLimits,
    /// `setup.max_script_bytes`, `max_args`, `max_arg_bytes`,
    /// `max_env_entries`, `max_env_bytes`.
    pub request_limits: RequestLimits,
    /// `setup.max_pending_runs`.
    pub max_pending: usize,
    /// `setup.keep_runs`.
    pub keep_runs: usize,
    /// `setup.gate_jobs`.
    pub gate_jobs: bool,
    /// Environment, grace, leftovers, where inline scripts go.
    pub launch: LaunchContext,
    /// `[[setup.scripts]]`.
    pub declared: Vec<SetupScriptConfig>,
}

impl Settings {
    /// Derives the settings from the section; `logs_dir` and `runtime_dir`
    /// are the agent's (`agent.logs_dir`, `agent.runtime_dir`), `hostname`
    /// is the default `CI_NAME`.
    pub fn new(setup: &SetupConfig, logs_dir: &Path, runtime_dir: &Path, hostname: &str) -> Self {
        let ci_name = if setup.ci_name.is_empty() {
            hostname.to_owned()
        } else {
            setup.ci_name.clone()
        };
        let mut base_env = LaunchContext::passed_env();
        base_env.extend([
            ("CI_NAME".to_owned(), ci_name),
            ("CI_WORKSPACE".to_owned(), setup.ci_workspace.clone()),
            (
                "CI_RESOURCE_GROUP".to_owned(),
                setup.ci_resource_group.clone(),
            ),
            (
                "CI_LOCAL_UBUNTU_USER".to_owned(),
                setup.ci_local_ubuntu_user.clone(),
            ),
        ]);
        Self {
            logs_dir: logs_dir.join("setup"),
            limits: LogLimits {
                head_bytes: setup.log_head_bytes,
                tail_bytes: setup.log_tail_bytes,
                tail_lines: setup.log_tail_lines as usize,
            },
            request_limits: setup.request_limits(),
            max_pending: setup.max_pending_runs as usize,
            keep_runs: setup.keep_runs as usize,
            gate_jobs: setup.gate_jobs,
            launch: LaunchContext {
                base_env,
                kill_grace: Duration::from_secs(setup.kill_grace_seconds.into()),
                kill_leftovers: setup.kill_leftovers,
                scripts_dir: runtime_dir.join("setup"),
            },
            declared: setup.scripts.clone(),
        }
    }

    /// The log file of a run.
    pub fn log_path(&self, run_id: &str) -> PathBuf {
        self.logs_dir.join(format!("{run_id}.log"))
    }
}

//! Transient services forked by PID 1, through `systemd-run` and
//! `systemctl`: the names, the command lines and the state read back. Setup
//! scripts ([`crate::setup`]) and blobfuse2 ([`crate::mounts`]) run this way
//! under systemd, so that they start with a clean execution environment
//! (not the agent's sandbox, namespaces, capabilities or seccomp filter),
//! live in cgroups of their own, are logged per unit, and survive an agent
//! restart by construction.
//!
//! Why the command-line tools and not `StartTransientUnit` over D-Bus (zbus):
//! no new dependency and no bus connection held by an idle agent (its RSS
//! does not move); a run or a mount starts a unit rarely, and the state is
//! read at most a few times a second while a script runs. The tools' own
//! D-Bus timeouts (25 s) bound every call; each call here adds its own.
//!
//! Everything here blocks (fork, exec, wait): call it from the blocking pool.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Deadline of one `systemd-run` or `systemctl` call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The programs, by name (found on `PATH`) or replaced in tests.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `systemd-run`.
    pub systemd_run: PathBuf,
    /// `systemctl`.
    pub systemctl: PathBuf,
}

impl Default for Tools {
    fn default() -> Self {
        Self {
            systemd_run: "systemd-run".into(),
            systemctl: "systemctl".into(),
        }
    }
}

/// Escapes `name` for use inside a unit name, as `systemd-escape` does: every
/// byte but ASCII letters, digits, `:`, `_` and a `.` that does not lead
/// becomes `\xNN`, so distinct names give distinct units.
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, byte) in name.bytes().enumerate() {
        let plain = byte.is_ascii_alphanumeric() || byte == b':' || byte == b'_';
        if plain || (byte == b'.' && i > 0) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// One argument of `ExecStart=` as PID 1 must see it: systemd 252 expands
/// `$NAME` and `${NAME}` in the command line of every unit, transient ones
/// included, and turns `$$` into `$`; so every `$` is doubled.
pub fn exec_arg(arg: &std::ffi::OsStr) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::with_capacity(arg.len());
    for &byte in arg.as_bytes() {
        out.push(byte);
        if byte == b'$' {
            out.push(b'$');
        }
    }
    OsString::from_vec(out)
}

/// A transient service to start.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    /// The unit's full name (`….service`).
    pub unit: String,
    /// `Description=`.
    pub description: String,
    /// Unit properties, `Key=Value` each (never a secret: they are on
    /// `systemd-run`'s command line, which every user can read).
    pub properties: Vec<String>,
    /// The command: program and arguments, as they should reach it.
    pub argv: Vec<OsString>,
    /// `--collect`: unload the unit once it is inactive or failed.
    pub collect: bool,
}

/// `systemd-run` could not start the unit.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `systemd-run` itself could not run.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It ran and failed; what it printed.
    #[error("systemd-run failed ({status}): {message}")]
    Failed {
        /// Its exit status.
        status: String,
        /// Its stderr, trimmed.
        message: String,
    },
}

impl Tools {
    /// `systemd-run --unit=… --property=… -- argv`. Returns once PID 1 has
    /// started the unit (with `Type=exec`: once the command was executed).
    pub fn start(&self, spec: &ServiceSpec) -> Result<(), StartError> {
        let mut command = Command::new(&self.systemd_run);
        command
            .arg("--quiet")
            .arg(format!("--unit={}", spec.unit))
            .arg(format!("--description={}", spec.description));
        if spec.collect {
            command.arg("--collect");
        }
        for property in &spec.properties {
            command.arg(format!("--property={property}"));
        }
        command
            .arg("--")
            .args(spec.argv.iter().map(|a| exec_arg(a)));
        let output = run(command).map_err(|source| StartError::Spawn {
            program: self.systemd_run.display().to_string(),
            source,
        })?;
        if output.status.success() {
            Ok(())
        } else {
            Err(StartError::Failed {
                status: output.status.to_string(),
                message: String::from_utf8_lossy(&output.stderr)
                    .trim()
                    .replace('\n', " | "),
            })
        }
    }

    /// `systemctl show UNIT --property=…`: the values by name (a unit that
    /// is not loaded has `LoadState=not-found`).
    pub fn show(
        &self,
        unit: &str,
        properties: &[&str],
    ) -> std::io::Result<HashMap<String, String>> {
        let mut command = Command::new(&self.systemctl);
        command
            .args(["show", unit])
            .arg(format!("--property={}", properties.join(",")));
        let output = run(command)?;
        if !output.status.success() {
            return Err(std::io::Error::other(format!(
                "systemctl show {unit}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// `systemctl ACTION [ARGS…] UNIT`; whether it succeeded (a unit that is
    /// already gone makes most actions fail, which callers expect).
    pub fn act(&self, action: &str, args: &[&str], unit: &str) -> bool {
        let mut command = Command::new(&self.systemctl);
        command.arg(action).args(args).arg(unit);
        run(command).is_ok_and(|output| output.status.success())
    }

    /// `systemctl ARGS…`: Ok, or what it printed on stderr (or why it
    /// could not run), for the caller's message.
    pub fn systemctl(&self, args: &[&str]) -> Result<(), String> {
        let mut command = Command::new(&self.systemctl);
        command.args(args);
        match run(command) {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(format!(
                "systemctl {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
                    .trim()
                    .replace('\n', " | ")
            )),
            Err(e) => Err(format!("cannot run systemctl {}: {e}", args.join(" "))),
        }
    }

    /// Runs `argv` as a transient service and waits for it
    /// (`systemd-run --wait --pipe`): for commands that must act in the
    /// host's mount namespace when the agent has its own (`fusermount3 -u`).
    /// Returns its exit status and stderr.
    pub fn run_waiting(
        &self,
        description: &str,
        argv: &[OsString],
    ) -> std::io::Result<(bool, String)> {
        let mut command = Command::new(&self.systemd_run);
        command
            .args(["--quiet", "--wait", "--pipe", "--collect"])
            .arg(format!("--description={description}"))
            .arg("--")
            .args(argv.iter().map(|a| exec_arg(a)));
        let output = run(command)?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

/// The state of a transient service, from `systemctl show`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceState {
    /// `LoadState`: `loaded`, or `not-found` once the unit is gone.
    pub load: String,
    /// `ActiveState`: `activating`, `active`, `deactivating`, `failed`, `inactive`.
    pub active: String,
    /// `SubState`: `running`, `exited`, …
    pub sub: String,
    /// `Result`: `success`, `exit-code`, `signal`, `timeout`, …
    pub result: String,
    /// `MainPID` (0 when none).
    pub main_pid: u32,
    /// How the main process ended, once it did: exit status or signal.
    pub main_exit: Option<MainExit>,
    /// `ControlGroup`: the unit's cgroup path.
    pub control_group: String,
}

/// How a service's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MainExit {
    /// It exited with this status.
    Code(i32),
    /// This signal ended it.
    Signal(i32),
}

/// The properties [`ServiceState`] is read from.
pub const STATE_PROPERTIES: &[&str] = &[
    "LoadState",
    "ActiveState",
    "SubState",
    "Result",
    "MainPID",
    "ExecMainPID",
    "ExecMainCode",
    "ExecMainStatus",
    "ExecMainExitTimestampMonotonic",
    "ControlGroup",
];

impl ServiceState {
    /// Reads the state out of `systemctl show`'s values.
    pub fn parse(values: &HashMap<String, String>) -> Self {
        let get = |key: &str| values.get(key).cloned().unwrap_or_default();
        let exited = get("ExecMainExitTimestampMonotonic")
            .parse::<u64>()
            .is_ok_and(|t| t > 0)
            && get("ExecMainPID").parse::<u32>().is_ok_and(|p| p > 0);
        let status = get("ExecMainStatus").parse::<i32>().unwrap_or(0);
        // ExecMainCode is a CLD_* code: 1 exited, 2 killed, 3 dumped.
        let main_exit = match get("ExecMainCode").as_str() {
            "1" if exited => Some(MainExit::Code(status)),
            "2" | "3" if exited => Some(MainExit::Signal(status)),
            _ => None,
        };
        Self {
            load: get("LoadState"),
            active: get("ActiveState"),
            sub: get("SubState"),
            result: get("Result"),
            main_pid: get("MainPID").parse().unwrap_or(0),
            main_exit,
            control_group: get("ControlGroup"),
        }
    }

    /// Whether the unit exists (loaded, in whatever state).
    pub fn loaded(&self) -> bool {
        self.load == "loaded"
    }

    /// Whether the unit has stopped: nothing of it runs any more.
    pub fn ended(&self) -> bool {
        !self.loaded() || self.active == "failed" || self.active == "inactive"
    }

    /// The pids in the unit's cgroup, read from the cgroup filesystem (the
    /// unified hierarchy, else systemd's named v1 hierarchy). Blocking.
    pub fn members(&self) -> Vec<i32> {
        if self.control_group.is_empty() {
            return Vec::new();
        }
        let relative = self.control_group.trim_start_matches('/');
        for root in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup/systemd",
        ] {
            let procs = std::path::Path::new(root)
                .join(relative)
                .join("cgroup.procs");
            if let Ok(text) = std::fs::read_to_string(procs) {
                return text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            }
        }
        Vec::new()
    }
}

impl Tools {
    /// The unit's state; a unit that cannot be asked about reads as gone
    /// only when systemctl says so, else the error is returned.
    pub fn state(&self, unit: &str) -> std::io::Result<ServiceState> {
        Ok(ServiceState::parse(&self.show(unit, STATE_PROPERTIES)?))
    }
}

/// Runs a command to its end with no stdin, within [`CALL_TIMEOUT`]
/// (killed after it).
fn run(command: Command) -> std::io::Result<std::process::Output> {
    run_bounded(command, CALL_TIMEOUT)
}

/// Runs a command to its end with no stdin, within `limit` (killed after
/// it), its stdout and stderr captured. Blocking.
pub fn run_bounded(mut command: Command, limit: Duration) -> std::io::Result<std::process::Output> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The agent's own notify socket is not theirs.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    let child = command.spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(result) => {
            let _ = waiter.join();
            result
        }
        Err(_) => {
            if let Ok(raw) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = waiter.join();
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("did not finish within {} s", limit.as_secs()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_is_systemd_escape() {
        assert_eq!(escape("data"), "data");
        assert_eq!(escape("my-data.v2_x"), "my\\x2ddata.v2_x");
        assert_eq!(escape(".x"), "\\x2ex");
        assert_ne!(escape("a-b"), escape("a_b"));
    }

    #[test]
    fn dollars_are_doubled_for_pid_1() {
        assert_eq!(
            exec_arg("a$HOME${X}$$".as_ref()),
            OsString::from("a$$HOME$${X}$$$$")
        );
        assert_eq!(exec_arg("plain".as_ref()), OsString::from("plain"));
    }

    #[test]
    fn state_reads_exit_codes_and_signals() {
        let values = |code: &str, status: &str, ts: &str| -> HashMap<String, String> {
            [
                ("LoadState", "loaded"),
                ("ActiveState", "failed"),
                ("SubState", "failed"),
                ("Result", "exit-code"),
                ("MainPID", "0"),
                ("ExecMainPID", "42"),
                ("ExecMainCode", code),
                ("ExecMainStatus", status),
                ("ExecMainExitTimestampMonotonic", ts),
                ("ControlGroup", ""),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        };
        let state = ServiceState::parse(&values("1", "3", "99"));
        assert_eq!(state.main_exit, Some(MainExit::Code(3)));
        assert!(state.ended());
        assert_eq!(
            ServiceState::parse(&values("2", "15", "99")).main_exit,
            Some(MainExit::Signal(15))
        );
        // Still running: no exit timestamp yet.
        assert_eq!(ServiceState::parse(&values("0", "0", "0")).main_exit, None);
        let gone = ServiceState::parse(
            &[("LoadState".to_owned(), "not-found".to_owned())]
                .into_iter()
                .collect(),
        );
        assert!(!gone.loaded() && gone.ended());
    }
}

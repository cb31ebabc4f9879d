//! The real [`SshHost`]: sshd run as the agent's child for its checks
//! (`sshd -t`, `sshd -T`, `sshd -V`; they read files and exit), the
//! listener's units driven with `systemctl` (PID 1 does the work, so the
//! agent's sandbox does not get in its way), a TCP probe of the loopback
//! port, and the sessions read from `/proc`, utmp and logind.
//!
//! sshd refuses even `-t` without its privilege separation directory
//! (`/run/sshd`), which systemd removes while the service is stopped; it is
//! then made the way `ssh.service` makes it (`RuntimeDirectory=`, kept), by
//! a short transient service, since `/run` is read-only to the agent.
//!
//! Without systemd (a container), reload is SIGHUP to the pid in
//! `/run/sshd.pid`, and SSH cannot be turned on or off.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;

use super::config::AccessConfig;
use super::host::{Connection, ListenerState, SshHost, Unit, UnitAction, UnitState};
use super::sessions::{self, SshSession};
use super::sshd_config::Effective;
use crate::transient::{Tools, run_bounded};

/// Deadline of one sshd check.
const SSHD_TIMEOUT: Duration = Duration::from_secs(30);

/// Where sshd writes its listener's pid (without systemd).
const PID_FILE: &str = "/run/sshd.pid";

/// The real system. Cheap to clone (each blocking call takes a copy).
#[derive(Debug, Clone)]
pub struct SystemSsh {
    sshd: PathBuf,
    service: String,
    socket: String,
    tools: Tools,
    systemd: bool,
}

impl SystemSsh {
    /// Drives the sshd and units that `[access]` names; under systemd when
    /// it runs (`/run/systemd/system` exists).
    pub fn new(config: &AccessConfig) -> Self {
        Self {
            sshd: config.sshd_path.clone(),
            service: config.service_unit.clone(),
            socket: config.socket_unit.clone(),
            tools: Tools::default(),
            systemd: Path::new("/run/systemd/system").exists(),
        }
    }

    fn unit_name(&self, unit: Unit) -> &str {
        match unit {
            Unit::Service => &self.service,
            Unit::Socket => &self.socket,
        }
    }

    /// Runs sshd with `args`; Ok(stdout) or its message. Makes a missing
    /// privilege separation directory and tries once more.
    fn sshd(&self, args: &[&str]) -> Result<String, String> {
        let mut made_dir = false;
        loop {
            let mut command = Command::new(&self.sshd);
            command.args(args);
            let output = run_bounded(command, SSHD_TIMEOUT)
                .map_err(|e| format!("cannot run {}: {e}", self.sshd.display()))?;
            if output.status.success() {
                return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
            }
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            let missing = stderr
                .lines()
                .find_map(|l| l.split("Missing privilege separation directory: ").nth(1))
                .map(|p| PathBuf::from(p.trim()));
            match missing {
                Some(dir) if !made_dir => {
                    self.make_privsep_dir(&dir)?;
                    made_dir = true;
                }
                _ => {
                    return Err(format!(
                        "sshd {} failed ({}): {}",
                        args.join(" "),
                        output.status,
                        stderr.replace('\n', " | ")
                    ));
                }
            }
        }
    }

    /// Makes sshd's privilege separation directory as its unit does.
    fn make_privsep_dir(&self, dir: &Path) -> Result<(), String> {
        let name = dir
            .strip_prefix("/run")
            .ok()
            .filter(|n| n.components().count() == 1)
            .map(|n| n.to_string_lossy().into_owned());
        match (self.systemd, name) {
            (true, Some(name)) => {
                let mut command = Command::new(&self.tools.systemd_run);
                command
                    .args(["--quiet", "--wait", "--collect"])
                    .arg("--description=instance-agent: sshd's privilege separation directory")
                    .arg(format!("--property=RuntimeDirectory={name}"))
                    .args([
                        "--property=RuntimeDirectoryMode=0755",
                        "--property=RuntimeDirectoryPreserve=yes",
                    ])
                    .args(["--", "/bin/true"]);
                let output = run_bounded(command, SSHD_TIMEOUT).map_err(|e| {
                    format!("cannot run systemd-run to make {}: {e}", dir.display())
                })?;
                if output.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "cannot make {}: {}",
                        dir.display(),
                        String::from_utf8_lossy(&output.stderr).trim()
                    ))
                }
            }
            _ => std::fs::DirBuilder::new()
                .mode(0o755)
                .create(dir)
                .map_err(|e| format!("cannot make {}: {e}", dir.display())),
        }
    }

    fn unit_state(&self, unit: Unit) -> Result<UnitState, String> {
        let name = self.unit_name(unit);
        let values = self
            .tools
            .show(name, &["LoadState", "ActiveState", "UnitFileState"])
            .map_err(|e| e.to_string())?;
        let get = |key: &str| values.get(key).map_or("", String::as_str);
        let masked = get("LoadState") == "masked" || get("UnitFileState").starts_with("masked");
        Ok(UnitState {
            exists: get("LoadState") == "loaded" || masked,
            active: matches!(get("ActiveState"), "active" | "activating" | "reloading"),
            masked,
            enabled: get("UnitFileState").starts_with("enabled"),
        })
    }

    /// The listener's pid from sshd's pid file, when that process lives.
    fn listener_pid() -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(PID_FILE)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            .is_ok()
            .then_some(pid)
    }
}

/// Runs blocking work off the runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("task failed: {e}"))?
}

#[async_trait]
impl SshHost for SystemSsh {
    async fn check_config(&self, config: &Path) -> Result<(), String> {
        let me = self.clone();
        let config = config.display().to_string();
        blocking(move || me.sshd(&["-t", "-f", &config]).map(drop)).await
    }

    async fn effective(&self, config: &Path, connection: &Connection) -> Result<Effective, String> {
        let me = self.clone();
        let config = config.display().to_string();
        let spec = format!(
            "user={},host=localhost,addr=127.0.0.1,laddr=127.0.0.1,lport={}",
            connection.user, connection.port
        );
        blocking(move || {
            me.sshd(&["-T", "-f", &config, "-C", &spec])
                .map(|out| Effective::parse(&out))
        })
        .await
    }

    async fn version(&self) -> String {
        let sshd = self.sshd.clone();
        blocking(move || {
            let mut command = Command::new(&sshd);
            command.arg("-V");
            let output = run_bounded(command, SSHD_TIMEOUT)
                .map_err(|e| format!("cannot run {}: {e}", sshd.display()))?;
            let text = String::from_utf8_lossy(&output.stderr).into_owned();
            text.lines()
                .find(|l| l.contains("OpenSSH"))
                .map(|l| l.trim().to_owned())
                .ok_or_else(|| format!("{} -V printed no version", sshd.display()))
        })
        .await
        .unwrap_or_else(|e| e)
    }

    async fn listener(&self) -> Result<ListenerState, String> {
        let me = self.clone();
        blocking(move || {
            if !me.systemd {
                return Ok(ListenerState {
                    service: UnitState {
                        exists: me.sshd.exists(),
                        active: SystemSsh::listener_pid().is_some(),
                        masked: false,
                        enabled: false,
                    },
                    socket: UnitState::default(),
                });
            }
            Ok(ListenerState {
                service: me.unit_state(Unit::Service)?,
                socket: me.unit_state(Unit::Socket)?,
            })
        })
        .await
    }

    async fn act(&self, action: UnitAction, units: &[Unit]) -> Result<(), String> {
        let me = self.clone();
        let units = units.to_vec();
        blocking(move || {
            if !me.systemd {
                return match (action, units.as_slice()) {
                    (UnitAction::Reload, [Unit::Service]) => {
                        let pid = SystemSsh::listener_pid()
                            .ok_or_else(|| format!("no sshd listener: {PID_FILE} names no live process"))?;
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
                            .map_err(|e| format!("SIGHUP to sshd {pid}: {e}"))
                    }
                    _ => Err(format!(
                        "cannot {} sshd without systemd: the agent turns SSH on and off only under systemd",
                        action.verb()
                    )),
                };
            }
            let mut args = vec![action.verb()];
            args.extend(units.iter().map(|&u| me.unit_name(u)));
            me.tools.systemctl(&args)
        })
        .await
    }

    async fn daemon_reload(&self) -> Result<(), String> {
        let me = self.clone();
        blocking(move || {
            if me.systemd {
                me.tools.systemctl(&["daemon-reload"])
            } else {
                Ok(())
            }
        })
        .await
    }

    async fn banner(&self, port: u16, timeout: Duration) -> Result<String, String> {
        let probe = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| format!("127.0.0.1:{port}: {e}"))?;
            let mut seen = Vec::with_capacity(256);
            let mut buffer = [0u8; 256];
            while !seen.contains(&b'\n') && seen.len() < 255 {
                let n = stream
                    .read(&mut buffer)
                    .await
                    .map_err(|e| format!("127.0.0.1:{port}: {e}"))?;
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buffer[..n]);
            }
            let line = String::from_utf8_lossy(&seen)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            if line.starts_with("SSH-2.0-") || line.starts_with("SSH-1.99-") {
                Ok(line)
            } else {
                Err(format!(
                    "127.0.0.1:{port} answered without an SSH banner: {line:?}"
                ))
            }
        };
        tokio::time::timeout(timeout, probe)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "127.0.0.1:{port} sent no SSH banner within {timeout:?}"
                ))
            })
    }

    async fn sessions(&self) -> Vec<SshSession> {
        tokio::task::spawn_blocking(|| sessions::scan(&sessions::Sources::host()))
            .await
            .unwrap_or_default()
    }

    async fn terminate(&self, pid: u32) -> Result<(), String> {
        blocking(move || {
            let proc = Path::new("/proc").join(pid.to_string());
            let title = std::fs::read(proc.join("cmdline")).unwrap_or_default();
            if sessions::session_title(&title).is_none() {
                return Err(format!("pid {pid} is not an sshd session (any more)"));
            }
            // The session's monitor (`sshd: USER [priv]`, its parent) ends
            // the whole connection; the child alone would leave it.
            let parent = std::fs::read_to_string(proc.join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()
                        .and_then(|r| r.split_whitespace().nth(1))
                        .map(str::to_owned)
                })
                .and_then(|p| p.parse::<u32>().ok());
            let target = parent
                .filter(|p| {
                    std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                        String::from_utf8_lossy(&c)
                            .trim_end_matches(['\0', ' '])
                            .ends_with("[priv]")
                    })
                })
                .unwrap_or(pid);
            let raw = i32::try_from(target).map_err(|_| format!("pid {target} is out of range"))?;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGTERM,
            )
            .map_err(|e| format!("SIGTERM to sshd {target}: {e}"))
        })
        .await
    }

    async fn user_exists(&self, user: &str) -> Result<bool, String> {
        let user = user.to_owned();
        blocking(move || {
            nix::unistd::User::from_name(&user)
                .map(|u| u.is_some())
                .map_err(|e| format!("cannot look up user {user:?}: {e}"))
        })
        .await
    }

    fn describe(&self) -> String {
        if self.systemd {
            format!("{} and {} under systemd", self.service, self.socket)
        } else {
            format!(
                "{} by its pid file (no systemd: reload only)",
                self.sshd.display()
            )
        }
    }
}

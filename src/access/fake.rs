//! A fake [`SshHost`] for unit tests: a pretend sshd that reads the
//! agent's drop-in (its `Port` and the values before its `Match` block) and
//! socket drop-in from the test's directories, units whose state the calls
//! change as systemd would, a port that answers with a banner where the
//! pretend listener listens, and failures a test can script. Every call is
//! recorded.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::host::{Connection, ListenerKind, ListenerState, SshHost, Unit, UnitAction, UnitState};
use super::sessions::SshSession;
use super::sshd_config::{Effective, directives};

#[derive(Debug, Default)]
struct State {
    service: UnitState,
    socket: UnitState,
    /// The port the pretend sshd answers on.
    listening: Option<u16>,
    /// Ports where something that is not sshd answers.
    occupied: BTreeSet<u16>,
    check_failures: VecDeque<String>,
    act_failures: Vec<(UnitAction, String)>,
    /// Values `sshd -T` shows whatever the files say.
    forced: BTreeMap<String, String>,
    users: BTreeSet<String>,
    sessions: Vec<SshSession>,
    calls: Vec<String>,
}

/// The fake host.
#[derive(Debug)]
pub struct FakeSsh {
    drop_in: PathBuf,
    socket_drop_in: PathBuf,
    state: Mutex<State>,
}

/// Reads the agent's drop-in as sshd would, for what the fake needs: the
/// first value of each keyword before any `Match`.
fn read_values(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut values = BTreeMap::new();
    for directive in directives(&text) {
        if directive.keyword == "match" {
            break;
        }
        values
            .entry(directive.keyword)
            .or_insert_with(|| directive.args.join(" "));
    }
    values
}

impl FakeSsh {
    /// sshd started the way `kind` says, running on port 22 with no drop-in;
    /// the user `azureuser` exists. `drop_in` and `socket_drop_in` are the
    /// files the agent under test writes.
    pub fn new(kind: ListenerKind, drop_in: &Path, socket_drop_in: &Path) -> Self {
        let unit = UnitState {
            exists: true,
            ..UnitState::default()
        };
        let running = UnitState {
            active: true,
            enabled: true,
            ..unit
        };
        let (service, socket) = match kind {
            ListenerKind::Service => (running, unit),
            ListenerKind::Socket => (unit, running),
        };
        Self {
            drop_in: drop_in.to_owned(),
            socket_drop_in: socket_drop_in.to_owned(),
            state: Mutex::new(State {
                service,
                socket,
                listening: Some(22),
                users: ["azureuser".to_owned()].into(),
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far, e.g. `reload ssh.service`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Forgets the calls so far.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The units now.
    pub fn units(&self) -> ListenerState {
        let state = self.lock();
        ListenerState {
            service: state.service,
            socket: state.socket,
        }
    }

    /// The port the pretend sshd answers on.
    pub fn listening(&self) -> Option<u16> {
        self.lock().listening
    }

    /// The next `sshd -t` fails with `message`.
    pub fn fail_next_check(&self, message: &str) {
        self.lock().check_failures.push_back(message.to_owned());
    }

    /// The next `action` (on any unit) fails with `message`.
    pub fn fail_next(&self, action: UnitAction, message: &str) {
        self.lock().act_failures.push((action, message.to_owned()));
    }

    /// Something other than sshd answers on `port` (no banner).
    pub fn occupy(&self, port: u16) {
        self.lock().occupied.insert(port);
    }

    /// `sshd -T` shows `value` for `keyword`, whatever the files say (as
    /// when another file wins).
    pub fn force_effective(&self, keyword: &str, value: &str) {
        self.lock()
            .forced
            .insert(keyword.to_owned(), value.to_owned());
    }

    /// A user that exists.
    pub fn add_user(&self, user: &str) {
        self.lock().users.insert(user.to_owned());
    }

    /// The sessions `sessions` lists.
    pub fn set_sessions(&self, sessions: Vec<SshSession>) {
        self.lock().sessions = sessions;
    }

    /// Changes a unit behind the agent's back (someone at the terminal).
    pub fn set_unit(&self, unit: Unit, state: UnitState) {
        let mut locked = self.lock();
        match unit {
            Unit::Service => locked.service = state,
            Unit::Socket => locked.socket = state,
        }
    }

    fn name(unit: Unit) -> &'static str {
        match unit {
            Unit::Service => "ssh.service",
            Unit::Socket => "ssh.socket",
        }
    }

    /// The port the listener binds: the drop-in's `Port` for the service
    /// alone, the socket drop-in's last `ListenStream=` under socket
    /// activation.
    fn port_of(&self, socket: bool) -> u16 {
        if socket {
            let text = std::fs::read_to_string(&self.socket_drop_in).unwrap_or_default();
            text.lines()
                .filter_map(|l| l.strip_prefix("ListenStream="))
                .filter_map(|p| p.trim().parse().ok())
                .next_back()
                .unwrap_or(22)
        } else {
            read_values(&self.drop_in)
                .get("port")
                .and_then(|p| p.parse().ok())
                .unwrap_or(22)
        }
    }
}

#[async_trait]
impl SshHost for FakeSsh {
    async fn check_config(&self, config: &Path) -> Result<(), String> {
        let mut state = self.lock();
        state.calls.push(format!("sshd -t {}", config.display()));
        match state.check_failures.pop_front() {
            Some(message) => Err(message),
            None => Ok(()),
        }
    }

    async fn effective(
        &self,
        _config: &Path,
        connection: &Connection,
    ) -> Result<Effective, String> {
        let mut values = read_values(&self.drop_in);
        let mut state = self.lock();
        state
            .calls
            .push(format!("sshd -T user={}", connection.user));
        for (key, value) in &state.forced {
            values.insert(key.clone(), value.clone());
        }
        let mut text = String::new();
        for (key, default) in [
            ("port", "22"),
            ("pubkeyauthentication", "yes"),
            (
                "authorizedkeysfile",
                ".ssh/authorized_keys .ssh/authorized_keys2",
            ),
            ("passwordauthentication", "yes"),
            ("kbdinteractiveauthentication", "no"),
            ("allowtcpforwarding", "yes"),
        ] {
            let value = values.get(key).map_or(default, String::as_str);
            text.push_str(&format!("{key} {value}\n"));
        }
        Ok(Effective::parse(&text))
    }

    async fn version(&self) -> String {
        "OpenSSH_9.2p1 (fake)".into()
    }

    async fn listener(&self) -> Result<ListenerState, String> {
        let mut state = self.lock();
        state.calls.push("listener".into());
        Ok(ListenerState {
            service: state.service,
            socket: state.socket,
        })
    }

    async fn act(&self, action: UnitAction, units: &[Unit]) -> Result<(), String> {
        let names: Vec<&str> = units.iter().map(|&u| Self::name(u)).collect();
        let service_port = self.port_of(false);
        let socket_port = self.port_of(true);
        let mut state = self.lock();
        state
            .calls
            .push(format!("{} {}", action.verb(), names.join(" ")));
        if let Some(i) = state.act_failures.iter().position(|(a, _)| *a == action) {
            return Err(state.act_failures.remove(i).1);
        }
        for &unit in units {
            let mut unit_state = match unit {
                Unit::Service => state.service,
                Unit::Socket => state.socket,
            };
            match action {
                UnitAction::Mask => unit_state.masked = true,
                UnitAction::Unmask => unit_state.masked = false,
                UnitAction::Start if unit_state.masked => {
                    return Err(format!(
                        "Failed to start {}: Unit {0} is masked.",
                        Self::name(unit)
                    ));
                }
                UnitAction::Start => unit_state.active = true,
                UnitAction::Stop => {
                    // A masked unit has lost its file and so `KillMode=process`:
                    // systemd kills its whole cgroup, sessions included.
                    if unit == Unit::Service && unit_state.masked && unit_state.active {
                        state.sessions.clear();
                    }
                    unit_state.active = false;
                }
                UnitAction::Reload if !unit_state.active => {
                    return Err(format!(
                        "{} is not active, cannot reload.",
                        Self::name(unit)
                    ));
                }
                UnitAction::Reload => {}
            }
            match unit {
                Unit::Service => state.service = unit_state,
                Unit::Socket => state.socket = unit_state,
            }
        }
        state.listening = if state.socket.active {
            Some(socket_port)
        } else if state.service.active {
            Some(service_port)
        } else {
            None
        };
        Ok(())
    }

    async fn daemon_reload(&self) -> Result<(), String> {
        self.lock().calls.push("daemon-reload".into());
        Ok(())
    }

    async fn banner(&self, port: u16, _timeout: Duration) -> Result<String, String> {
        let state = self.lock();
        if state.occupied.contains(&port) {
            Err(format!(
                "127.0.0.1:{port} answered without an SSH banner: \"\""
            ))
        } else if state.listening == Some(port) {
            Ok("SSH-2.0-OpenSSH_9.2p1 fake".into())
        } else {
            Err(format!("127.0.0.1:{port}: Connection refused"))
        }
    }

    async fn sessions(&self) -> Vec<SshSession> {
        self.lock().sessions.clone()
    }

    async fn terminate(&self, pid: u32) -> Result<(), String> {
        let mut state = self.lock();
        state.calls.push(format!("terminate {pid}"));
        state.sessions.retain(|s| s.pid != pid);
        Ok(())
    }

    async fn user_exists(&self, user: &str) -> Result<bool, String> {
        Ok(self.lock().users.contains(user))
    }

    fn describe(&self) -> String {
        "fake".into()
    }
}

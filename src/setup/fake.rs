//! Fakes of the setup domain's outside world: a process runner that plays
//! scripted behaviours on virtual time, and a user database.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::accounts::{Account, Accounts};
use super::runner::{Launch, OutputStream, ProcessRunner, Report, RunnerError, ScriptProcess};

/// How a fake script ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeEnd {
    /// Exits with this status after this long.
    Exit(i32, Duration),
    /// Is killed by this signal after this long.
    Signal(i32, Duration),
    /// Runs until stopped; with `ignores_term` it needs SIGKILL.
    Hang {
        /// Whether SIGTERM is ignored.
        ignores_term: bool,
    },
    /// Cannot be started.
    SpawnFails(String),
    /// The supervisor vanishes without a word after this long.
    SupervisorDies(Duration),
}

/// One scripted behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeScript {
    /// Bytes on stdout.
    pub stdout: Vec<u8>,
    /// Bytes on stderr.
    pub stderr: Vec<u8>,
    /// How it ends.
    pub end: FakeEnd,
    /// Processes left running after a normal exit.
    pub leftovers: u32,
}

impl FakeScript {
    /// Prints `stdout` and exits with `code` after `after`.
    pub fn exits(code: i32, after: Duration, stdout: &str) -> Self {
        Self {
            stdout: stdout.as_bytes().to_vec(),
            stderr: Vec::new(),
            end: FakeEnd::Exit(code, after),
            leftovers: 0,
        }
    }

    /// Runs until stopped.
    pub fn hangs(ignores_term: bool) -> Self {
        Self {
            stdout: Vec::new(),
            stderr: Vec::new(),
            end: FakeEnd::Hang { ignores_term },
            leftovers: 0,
        }
    }
}

#[derive(Default)]
struct RunnerLog {
    scripts: VecDeque<FakeScript>,
    launches: Vec<Launch>,
    orphan_sweeps: Vec<Vec<String>>,
    kills: usize,
}

/// Plays [`FakeScript`]s in order (a quick `exit 0` when none is queued)
/// and records every launch. Cheap to clone.
#[derive(Clone, Default)]
pub struct FakeRunner {
    log: Arc<Mutex<RunnerLog>>,
}

impl FakeRunner {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunnerLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the behaviour of the next started script.
    pub fn push(&self, script: FakeScript) {
        self.lock().scripts.push_back(script);
    }

    /// Every launch so far.
    pub fn launches(&self) -> Vec<Launch> {
        self.lock().launches.clone()
    }

    /// Every orphan sweep so far (run ids of each).
    pub fn orphan_sweeps(&self) -> Vec<Vec<String>> {
        self.lock().orphan_sweeps.clone()
    }

    /// How many times a process was force-killed.
    pub fn kills(&self) -> usize {
        self.lock().kills
    }
}

#[async_trait::async_trait]
impl ProcessRunner for FakeRunner {
    async fn start(&self, launch: Launch) -> Result<Box<dyn ScriptProcess>, RunnerError> {
        let grace = launch.kill_grace;
        let script = {
            let mut log = self.lock();
            log.launches.push(launch);
            log.scripts
                .pop_front()
                .unwrap_or_else(|| FakeScript::exits(0, Duration::from_millis(10), ""))
        };
        let output: (OutputStream, OutputStream) = (
            Box::new(std::io::Cursor::new(script.stdout.clone())),
            Box::new(std::io::Cursor::new(script.stderr.clone())),
        );
        Ok(Box::new(FakeProcess {
            runner: self.clone(),
            output: Some(output),
            started: Instant::now(),
            script,
            grace,
            phase: Phase::Start,
            stop_requested: false,
            queued: VecDeque::new(),
        }))
    }

    async fn kill_orphans(&self, run_ids: Vec<String>) -> usize {
        self.lock().orphan_sweeps.push(run_ids);
        0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Running,
    Stopping(Instant),
    Done,
}

struct FakeProcess {
    runner: FakeRunner,
    output: Option<(OutputStream, OutputStream)>,
    started: Instant,
    script: FakeScript,
    grace: Duration,
    phase: Phase,
    stop_requested: bool,
    queued: VecDeque<Report>,
}

impl FakeProcess {
    fn natural_end(&self) -> Option<Instant> {
        match self.script.end {
            FakeEnd::Exit(_, after)
            | FakeEnd::Signal(_, after)
            | FakeEnd::SupervisorDies(after) => Some(self.started + after),
            FakeEnd::Hang { .. } | FakeEnd::SpawnFails(_) => None,
        }
    }

    fn begin_stop(&mut self) {
        let ignores = matches!(self.script.end, FakeEnd::Hang { ignores_term: true });
        if ignores {
            self.phase = Phase::Stopping(Instant::now() + self.grace);
        } else {
            self.queued.push_back(Report::Exited {
                code: None,
                signal: Some(15),
            });
            self.queued.push_back(Report::Stopped {
                sigterm: 1,
                sigkill: 0,
                survivors: 0,
            });
            self.phase = Phase::Done;
        }
    }
}

#[async_trait::async_trait]
impl ScriptProcess for FakeProcess {
    fn take_output(&mut self) -> Option<(OutputStream, OutputStream)> {
        self.output.take()
    }

    async fn next_report(&mut self) -> Option<Report> {
        loop {
            if let Some(report) = self.queued.pop_front() {
                return Some(report);
            }
            match self.phase {
                Phase::Done => return None,
                Phase::Start => {
                    self.phase = Phase::Running;
                    if let FakeEnd::SpawnFails(message) = &self.script.end {
                        self.queued.push_back(Report::SpawnFailed {
                            message: message.clone(),
                        });
                        self.phase = Phase::Done;
                    } else {
                        self.queued.push_back(Report::Started { pid: 4242 });
                    }
                }
                Phase::Running if self.stop_requested => self.begin_stop(),
                Phase::Running => {
                    let end = self.natural_end();
                    match end {
                        Some(at) => tokio::time::sleep_until(at).await,
                        // Woken by terminate() through the caller's select.
                        None => std::future::pending::<()>().await,
                    }
                    match self.script.end {
                        FakeEnd::Exit(code, _) => self.queued.push_back(Report::Exited {
                            code: Some(code),
                            signal: None,
                        }),
                        FakeEnd::Signal(signal, _) => self.queued.push_back(Report::Exited {
                            code: None,
                            signal: Some(signal),
                        }),
                        _ => {}
                    }
                    if self.script.leftovers > 0 {
                        self.queued.push_back(Report::Stopped {
                            sigterm: self.script.leftovers,
                            sigkill: 0,
                            survivors: 0,
                        });
                    }
                    self.phase = Phase::Done;
                }
                Phase::Stopping(deadline) => {
                    tokio::time::sleep_until(deadline).await;
                    self.queued.push_back(Report::Exited {
                        code: None,
                        signal: Some(9),
                    });
                    self.queued.push_back(Report::Stopped {
                        sigterm: 1,
                        sigkill: 1,
                        survivors: 0,
                    });
                    self.phase = Phase::Done;
                }
            }
        }
    }

    fn terminate(&mut self) {
        self.stop_requested = true;
    }

    async fn kill(&mut self) -> usize {
        self.runner.lock().kills += 1;
        self.phase = Phase::Done;
        1
    }
}

/// A user database with root and whatever is added.
#[derive(Debug, Clone)]
pub struct FakeAccounts {
    users: HashMap<String, Account>,
}

impl Default for FakeAccounts {
    fn default() -> Self {
        let mut users = HashMap::new();
        users.insert("root".to_owned(), Account::root());
        Self { users }
    }
}

impl FakeAccounts {
    /// Adds a user.
    pub fn with(mut self, account: Account) -> Self {
        self.users.insert(account.name.clone(), account);
        self
    }
}

impl Accounts for FakeAccounts {
    fn lookup(&self, name: &str) -> std::io::Result<Option<Account>> {
        Ok(self.users.get(name).cloned())
    }
}

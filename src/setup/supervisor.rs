//! The script supervisor: a small synchronous program (the agent's binary
//! started with [`SUPERVISOR_ARG`]) that runs one script and contains its
//! whole process tree. See [`super::supervised_runner`] for why it exists
//! and [`super::runner`] for its protocol.
//!
//! It is single-threaded, so it may allocate and take locks between fork and
//! exec, and may reap with `waitpid(-1)`: it has no children but the
//! script's tree.
//!
//! Sequence: read the spec from stdin; become a child subreaper; block
//! SIGCHLD/SIGTERM/SIGINT/SIGHUP and read them from a signalfd; create the
//! run's cgroup if asked; start the script in a new session, with
//! `oom_score_adj` 0 (the agent's unit sets -500, which children would
//! otherwise inherit), in the cgroup, as its user; then wait for, in any
//! order, the script's exit (SIGCHLD), a stop request (SIGTERM) or the
//! agent's death (stdin closes). Stopping the tree: SIGTERM to every
//! descendant and every process of the cgroup, wait up to the grace period
//! while reaping, then SIGKILL (`cgroup.kill` too) until nothing is left.

use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::process_tree::{self, RunCgroup};
use super::runner::{Launch, Report, SupervisorSpec};

pub use super::runner::SUPERVISOR_ARG;

/// Largest spec accepted on stdin (the environment and args of one script).
const MAX_SPEC_BYTES: u64 = 16 << 20;
/// How long SIGKILL rounds go on before giving up on processes stuck in the
/// kernel (uninterruptible sleep).
const KILL_ROUNDS_FOR: Duration = Duration::from_secs(10);

/// Writes reports to fd 3.
struct Reporter(Option<std::fs::File>);

impl Reporter {
    fn send(&mut self, report: &Report) {
        let Some(file) = self.0.as_mut() else { return };
        let mut line = serde_json::to_vec(report).unwrap_or_default();
        line.push(b'\n');
        // EPIPE means the agent is gone; the lifeline handles that.
        if file.write_all(&line).is_err() {
            self.0 = None;
        }
    }
}

/// Runs the supervisor; the process exits with the returned code.
pub fn main() -> ExitCode {
    let mut reporter = Reporter(take_fd_3());
    match supervise(&mut reporter) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            reporter.send(&Report::SpawnFailed { message });
            ExitCode::FAILURE
        }
    }
}

/// fd 3 is the report pipe by protocol.
#[allow(unsafe_code)]
fn take_fd_3() -> Option<std::fs::File> {
    // Never adopt a descriptor that is not open.
    std::fs::symlink_metadata("/proc/self/fd/3").ok()?;
    // SAFETY: fd 3 is open (checked above) and, by the supervisor protocol,
    // was placed there by the agent for this process alone; nothing else in
    // this process owns or closes it.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    // The script must not inherit the report pipe.
    let _ = nix::fcntl::fcntl(
        fd.as_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Some(std::fs::File::from(fd))
}

fn supervise(reporter: &mut Reporter) -> Result<(), String> {
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    (&mut stdin)
        .take(MAX_SPEC_BYTES)
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the spec: {e}"))?;
    let spec: SupervisorSpec = serde_json::from_str(&line).map_err(|e| format!("bad spec: {e}"))?;
    drop(stdin);

    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("cannot become a child subreaper: {e}"))?;
    let mut signals = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        signals.add(signal);
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)
        .map_err(|e| format!("cannot block signals: {e}"))?;
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("cannot open a signalfd: {e}"))?;

    let working_dir = open_working_dir(&spec.launch)?;
    let cgroup = spec.cgroup.clone().map(RunCgroup::at);
    let procs = cgroup.as_ref().and_then(|cgroup| {
        match cgroup.create().and_then(|()| cgroup.open_procs()) {
            Ok(file) => Some(file),
            Err(error) => {
                reporter.send(&Report::Warning {
                    message: format!(
                        "no cgroup for this run ({}: {error}); relying on the process tree",
                        cgroup.dir().display()
                    ),
                });
                None
            }
        }
    });
    let cgroup = cgroup.filter(|_| procs.is_some());

    let child = match script_command(&spec.launch, procs.as_ref(), &working_dir).spawn() {
        Ok(child) => child,
        Err(error) => {
            if let Some(cgroup) = &cgroup {
                let _ = cgroup.remove();
            }
            return Err(format!(
                "cannot execute {}: {error}",
                spec.launch.program.display()
            ));
        }
    };
    drop(procs);
    let main_pid = child.id() as i32;
    reporter.send(&Report::Started { pid: child.id() });
    release_output_pipes();

    let mut tree = Tree {
        me: std::process::id() as i32,
        main_pid,
        main_done: false,
        cgroup,
        reporter,
    };
    let stdin_fd = std::io::stdin().as_fd().try_clone_to_owned().ok();
    let mut stop_requested = false;
    let mut agent_gone = false;
    while !tree.main_done && !stop_requested {
        let mut fds = vec![PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN)];
        if let Some(fd) = stdin_fd.as_ref() {
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
        }
        if let Err(error) = poll(&mut fds, PollTimeout::NONE) {
            if error != nix::errno::Errno::EINTR {
                return Err(format!("poll failed: {error}"));
            }
            continue;
        }
        let lifeline_ready = fds.get(1).is_some_and(|fd| {
            fd.revents().is_some_and(|r| {
                r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLIN)
            })
        });
        while let Ok(Some(info)) = signal_fd.read_signal() {
            if info.ssi_signo != Signal::SIGCHLD as u32 {
                stop_requested = true;
            }
        }
        tree.reap();
        if lifeline_ready && lifeline_is_closed(stdin_fd.as_ref()) {
            agent_gone = true;
            stop_requested = true;
        }
    }
    if stop_requested || spec.launch.kill_leftovers {
        let grace = if agent_gone {
            // Nobody waits for a report; be quick but still polite.
            spec.launch.kill_grace.min(Duration::from_secs(2))
        } else {
            spec.launch.kill_grace
        };
        let report = tree.stop(grace);
        let nothing = Report::Stopped {
            sigterm: 0,
            sigkill: 0,
            survivors: 0,
        };
        if stop_requested || report != nothing {
            tree.reporter.send(&report);
        }
    }
    if let Some(cgroup) = &tree.cgroup
        && cgroup.members().is_empty()
    {
        let _ = cgroup.remove();
    }
    drop(child);
    Ok(())
}

/// The working directory, opened once; refused when it is not the one the
/// agent checked (swapped since). The script enters it by this descriptor.
fn open_working_dir(launch: &Launch) -> Result<OwnedFd, String> {
    let dir = rustix::fs::open(
        &launch.working_dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| {
        format!(
            "cannot open the working dir {}: {e}",
            launch.working_dir.display()
        )
    })?;
    if let Some(id) = launch.working_dir_id {
        let stat = rustix::fs::fstat(&dir).map_err(|e| e.to_string())?;
        if (stat.st_dev, stat.st_ino) != id {
            return Err(format!(
                "the working dir {} is no longer the directory that was checked; not started",
                launch.working_dir.display()
            ));
        }
    }
    Ok(dir)
}

/// The script's command: interpreter, args, environment, new session,
/// `oom_score_adj` 0, cgroup, user, working dir (entered by descriptor).
#[allow(unsafe_code)]
fn script_command(
    launch: &Launch,
    cgroup_procs: Option<&std::fs::File>,
    working_dir: &OwnedFd,
) -> Command {
    let mut command = Command::new(&launch.program);
    let working_dir = working_dir.as_raw_fd();
    command
        .args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let procs_fd = cgroup_procs.map(|f| f.as_raw_fd());
    let user = launch.user.clone();
    // SAFETY: the supervisor is single-threaded, so after fork no other
    // thread can hold a lock (malloc's included) that the child would wait
    // on; the closure only makes system calls on descriptors that are open in
    // the parent until spawn returns (the cgroup file, the working dir), writes to /proc/self, and resets signal
    // dispositions to their defaults (no handler of ours runs in the child).
    unsafe {
        command.pre_exec(move || {
            // Signal masks and ignored signals survive exec: undo the
            // supervisor's blocked set and anything ignored by whoever
            // started the agent, so that SIGTERM reaches the script.
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            for signal in Signal::iterator() {
                if signal != Signal::SIGKILL && signal != Signal::SIGSTOP {
                    nix::libc::signal(signal as i32, nix::libc::SIG_DFL);
                }
            }
            nix::unistd::setsid()?;
            // The checked directory itself, whatever its path names now.
            if nix::libc::fchdir(working_dir) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Best effort: 0 is a raise from the unit's -500 (always allowed);
            // from a positive value it needs CAP_SYS_RESOURCE, and a script
            // must not fail to start over its OOM priority.
            let _ = std::fs::write("/proc/self/oom_score_adj", b"0");
            if let Some(fd) = procs_fd {
                // Joining before exec: the script's first instruction
                // already runs inside the run's cgroup.
                let n = nix::libc::write(fd, b"0".as_ptr().cast(), 1);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(user) = &user {
                let groups: Vec<nix::unistd::Gid> = user
                    .groups
                    .iter()
                    .map(|g| nix::unistd::Gid::from_raw(*g))
                    .collect();
                nix::unistd::setgroups(&groups)?;
                nix::unistd::setgid(nix::unistd::Gid::from_raw(user.gid))?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(user.uid))?;
            }
            Ok(())
        });
    }
    command
}

/// Points the supervisor's own stdout and stderr at /dev/null, so that the
/// agent sees the end of the script's output as soon as the script's
/// processes close theirs.
fn release_output_pipes() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
}

/// Whether the lifeline (stdin) has really closed: readable with no data.
fn lifeline_is_closed(stdin: Option<&OwnedFd>) -> bool {
    let Some(fd) = stdin else { return false };
    let mut buf = [0u8; 64];
    // Called only when poll says the descriptor is ready, so this does not
    // block. The agent never writes after the spec; stray bytes are dropped.
    match nix::unistd::read(fd, &mut buf) {
        Ok(0) => true,
        Ok(_) | Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => false,
        Err(_) => true,
    }
}

/// The script's process tree.
struct Tree<'a> {
    me: i32,
    main_pid: i32,
    main_done: bool,
    cgroup: Option<RunCgroup>,
    reporter: &'a mut Reporter,
}

impl Tree<'_> {
    /// Reaps every exited child; reports the main process's end.
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    if pid.as_raw() == self.main_pid {
                        self.main_exited(Some(code), None);
                    }
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    if pid.as_raw() == self.main_pid {
                        self.main_exited(None, Some(signal as i32));
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn main_exited(&mut self, code: Option<i32>, signal: Option<i32>) {
        if !self.main_done {
            self.main_done = true;
            self.reporter.send(&Report::Exited { code, signal });
        }
    }

    /// Every live process of the run: descendants and cgroup members.
    fn members(&self) -> Vec<i32> {
        let table = process_tree::process_table();
        let mut pids = process_tree::descendants(&table, self.me);
        if let Some(cgroup) = &self.cgroup {
            for pid in cgroup.members() {
                if !pids.contains(&pid) && pid != self.me {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// SIGTERM everything, wait up to `grace` while reaping, then SIGKILL
    /// until nothing is left.
    fn stop(&mut self, grace: Duration) -> Report {
        self.reap();
        let targets = self.members();
        let mut sigterm = 0;
        for pid in &targets {
            if process_tree::send(*pid, Signal::SIGTERM) {
                sigterm += 1;
            }
        }
        let deadline = Instant::now() + grace;
        let mut left = targets;
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            self.reap();
            left = self.members();
        }
        let mut killed = std::collections::HashSet::new();
        let give_up = Instant::now() + KILL_ROUNDS_FOR;
        while !left.is_empty() && Instant::now() < give_up {
            if let Some(cgroup) = &self.cgroup {
                cgroup.kill_all();
            }
            for pid in &left {
                if process_tree::send(*pid, Signal::SIGKILL) {
                    killed.insert(*pid);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
            self.reap();
            left = self.members();
        }
        self.reap();
        Report::Stopped {
            sigterm,
            sigkill: killed.len() as u32,
            survivors: left.len() as u32,
        }
    }
}

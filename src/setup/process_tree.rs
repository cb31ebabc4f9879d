//! Finding and signalling the processes of a run: the descendants of a
//! process (from `/proc/*/stat`), the processes carrying a run's environment
//! marker (from `/proc/*/environ`), and a dedicated cgroup v2 directory with
//! `cgroup.kill`.
//!
//! All blocking: used by the supervisor process, and by the agent from
//! `spawn_blocking`.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// One process as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessEntry {
    /// Its pid.
    pub pid: i32,
    /// Its parent.
    pub ppid: i32,
    /// Whether it has exited and waits to be reaped.
    pub zombie: bool,
}

/// Every process visible in `/proc`.
pub fn process_table() -> Vec<ProcessEntry> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name();
            let pid: i32 = name.to_str()?.parse().ok()?;
            let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
            parse_stat(pid, &stat)
        })
        .collect()
}

/// Parses the fields after the command name, which may itself contain
/// spaces and parentheses (hence the search for the last `)`).
fn parse_stat(pid: i32, stat: &[u8]) -> Option<ProcessEntry> {
    let close = stat.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(stat.get(close + 2..)?).ok()?;
    let mut fields = rest.split(' ');
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(ProcessEntry {
        pid,
        ppid,
        zombie: state == "Z" || state == "X",
    })
}

/// The live (not zombie) descendants of `root`, from a process table.
pub fn descendants(table: &[ProcessEntry], root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<&ProcessEntry>> = HashMap::new();
    for entry in table {
        children.entry(entry.ppid).or_default().push(entry);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    let mut seen = HashSet::from([root]);
    while let Some(pid) = stack.pop() {
        for child in children.get(&pid).into_iter().flatten() {
            if seen.insert(child.pid) {
                stack.push(child.pid);
                if !child.zombie {
                    out.push(child.pid);
                }
            }
        }
    }
    out
}

/// Processes whose environment holds exactly `NAME=value` for one of
/// `values`, except this process. Processes that cleared their environment
/// are not found: this is the last of three nets (the supervisor's process
/// tree and the cgroup come first).
pub fn processes_with_marker(name: &str, values: &[String]) -> Vec<i32> {
    let wanted: HashSet<Vec<u8>> = values
        .iter()
        .map(|v| format!("{name}={v}").into_bytes())
        .collect();
    let me = std::process::id() as i32;
    process_table()
        .into_iter()
        .filter(|p| p.pid != me && !p.zombie)
        .filter(|p| {
            std::fs::read(format!("/proc/{}/environ", p.pid))
                .map(|env| env.split(|b| *b == 0).any(|var| wanted.contains(var)))
                .unwrap_or(false)
        })
        .map(|p| p.pid)
        .collect()
}

/// Sends `signal` to `pid`; false when it is gone.
pub fn send(pid: i32, signal: Signal) -> bool {
    kill(Pid::from_raw(pid), signal).is_ok()
}

/// The cgroup v2 hierarchy to put scripts in when not under systemd: the
/// unified mount (`/sys/fs/cgroup` on a pure v2 host, `/sys/fs/cgroup/unified`
/// on a v1 hybrid one). `None` when there is none.
pub fn cgroup_v2_mount() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|dir| dir.join("cgroup.procs").exists() && dir.join("cgroup.controllers").exists())
}

/// The cgroup v2 directory of `pid` (its `0::` line of `/proc/<pid>/cgroup`
/// under the unified mount), when it is named `expected_name`: the check
/// keeps a caller from ever killing a cgroup it did not mean, such as the
/// agent's own when a scope was not created.
pub fn cgroup_v2_of(pid: u32, expected_name: &str) -> Option<RunCgroup> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let relative = unified_cgroup_path(&text)?;
    if Path::new(relative).file_name()? != expected_name {
        return None;
    }
    Some(RunCgroup::at(
        cgroup_v2_mount()?.join(relative.trim_start_matches('/')),
    ))
}

/// The path of the unified (v2) hierarchy's `0::` line in the text of
/// `/proc/<pid>/cgroup`.
fn unified_cgroup_path(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim)
        .filter(|path| path.starts_with('/'))
}

/// A cgroup v2 directory holding one run's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCgroup {
    dir: PathBuf,
}

impl RunCgroup {
    /// The cgroup at `dir` (which may not exist).
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Creates the directory (and its parent).
    pub fn create(&self) -> std::io::Result<()> {
        if let Some(parent) = self.dir.parent() {
            match std::fs::create_dir(parent) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        std::fs::create_dir(&self.dir)
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `cgroup.procs`, opened for writing: a process joins by writing `0`.
    pub fn open_procs(&self) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
    }

    /// The processes in it; empty when it does not exist.
    pub fn members(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// SIGKILLs every process in it at once (`cgroup.kill`, Linux 5.14+),
    /// else one by one. Returns how many were in it.
    pub fn kill_all(&self) -> usize {
        let members = self.members();
        if members.is_empty() {
            return 0;
        }
        let atomic = std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.kill"))
            .and_then(|mut f| f.write_all(b"1"))
            .is_ok();
        if !atomic {
            for pid in &members {
                send(*pid, Signal::SIGKILL);
            }
        }
        members.len()
    }

    /// Removes the directory if it exists and is empty.
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_dir(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_names() {
        let entry = parse_stat(42, b"42 (a b) c)) S 7 42 42 0 -1").unwrap();
        assert_eq!(
            entry,
            ProcessEntry {
                pid: 42,
                ppid: 7,
                zombie: false
            }
        );
        assert!(parse_stat(1, b"1 (x) Z 0").unwrap().zombie);
    }

    #[test]
    fn descendants_follow_the_tree_and_skip_zombies() {
        let p = |pid, ppid, zombie| ProcessEntry { pid, ppid, zombie };
        let table = [
            p(10, 1, false),
            p(11, 10, false),
            p(12, 11, false),
            p(13, 10, true),
            p(14, 13, false),
            p(20, 1, false),
        ];
        let mut found = descendants(&table, 10);
        found.sort();
        assert_eq!(found, vec![11, 12, 14]);
    }

    #[test]
    fn the_unified_line_of_proc_cgroup_names_the_scope() {
        let hybrid = "12:pids:/system.slice/x.scope\n1:name=systemd:/system.slice/x.scope\n0::/system.slice/instance-agent-setup-abc.scope\n";
        assert_eq!(
            unified_cgroup_path(hybrid),
            Some("/system.slice/instance-agent-setup-abc.scope")
        );
        assert_eq!(unified_cgroup_path("3:cpu:/\n"), None);
        // This test process is not in a scope of that name: never a target.
        assert_eq!(
            cgroup_v2_of(std::process::id(), "instance-agent-setup-none.scope"),
            None
        );
    }

    #[test]
    fn this_process_is_in_the_table_with_its_parent() {
        let me = std::process::id() as i32;
        let table = process_table();
        let entry = table.iter().find(|p| p.pid == me).expect("self listed");
        assert_eq!(entry.ppid, nix::unistd::getppid().as_raw());
    }
}

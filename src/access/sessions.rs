//! The SSH sessions open now, from three sources: sshd's own processes
//! (each authenticated connection has one titled `sshd: USER@TTY`, or
//! `sshd: USER@notty` without a terminal; `sshd-session:` from OpenSSH
//! 9.8), which say that a session exists; utmp (`USER_PROCESS` records,
//! written for sessions with a terminal), which says where it comes from;
//! and logind's session files (`/run/systemd/sessions/*`, present with
//! `pam_systemd`), which say it for sessions without a terminal too.
//!
//! The agent's sandbox gives it no `CAP_SYS_PTRACE`, so it cannot read
//! another process's sockets or environment: a session without a terminal
//! on a host without logind has no known address (empty).
//!
//! Blocking (reads `/proc`): call it from the blocking pool.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// One SSH session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSession {
    /// The user logged in.
    pub user: String,
    /// Where from (an address or a host name), empty when unknown.
    pub from: String,
    /// When its sshd process started.
    pub since: SystemTime,
    /// The pid of its sshd process (the one titled `sshd: USER@…`).
    pub pid: u32,
    /// Its terminals (`pts/0`), empty without one.
    pub tty: String,
    /// Where the address came from: `utmp`, `logind`, or `process` (none).
    pub source: &'static str,
}

/// Where to read: the real paths, or a test's.
#[derive(Debug, Clone)]
pub struct Sources<'a> {
    /// `/proc`.
    pub proc: &'a Path,
    /// `/run/utmp`.
    pub utmp: &'a Path,
    /// `/run/systemd/sessions`.
    pub logind: &'a Path,
}

impl Sources<'static> {
    /// The host's.
    pub fn host() -> Self {
        Self {
            proc: Path::new("/proc"),
            utmp: Path::new("/run/utmp"),
            logind: Path::new("/run/systemd/sessions"),
        }
    }
}

/// An sshd session process: `(user, tty)` from its title, or None for
/// anything else (the listener, `[priv]` monitors, pre-auth `[net]`).
pub fn session_title(cmdline: &[u8]) -> Option<(String, String)> {
    let title = String::from_utf8_lossy(cmdline);
    let title = title.trim_end_matches(['\0', ' ']).replace('\0', " ");
    let rest = title
        .strip_prefix("sshd: ")
        .or_else(|| title.strip_prefix("sshd-session: "))?;
    if rest.contains('[') || rest.starts_with('/') || rest.is_empty() {
        return None;
    }
    let (user, tty) = rest.split_once('@').unwrap_or((rest, ""));
    if user.is_empty() || user.contains(char::is_whitespace) {
        return None;
    }
    let tty = if tty == "notty" { "" } else { tty };
    Some((user.to_owned(), tty.trim().to_owned()))
}

/// One utmp record of a logged-in user: `(line, host)`. glibc's layout on
/// 64-bit Linux: 384 bytes, `ut_type` at 0, `ut_line[32]` at 8,
/// `ut_host[256]` at 76.
const UTMP_RECORD: usize = 384;
const USER_PROCESS: i16 = 7;

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The hosts of logged-in terminals in a utmp file, by terminal line.
pub fn utmp_hosts(data: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for record in data.chunks_exact(UTMP_RECORD) {
        let kind = i16::from_ne_bytes([record[0], record[1]]);
        if kind != USER_PROCESS {
            continue;
        }
        let line = c_string(&record[8..40]);
        let host = c_string(&record[76..332]);
        if !line.is_empty() && !host.is_empty() {
            out.insert(line, host);
        }
    }
    out
}

/// The remote hosts of logind's sshd sessions, by their leader pid (the
/// session's `[priv]` sshd, the parent of the one titled `USER@…`).
pub fn logind_hosts(files: &[String]) -> HashMap<u32, String> {
    let mut out = HashMap::new();
    for text in files {
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .unwrap_or_default()
                .to_owned()
        };
        if value("SERVICE") != "sshd" {
            continue;
        }
        if let (Ok(leader), host) = (value("LEADER").parse::<u32>(), value("REMOTE_HOST"))
            && !host.is_empty()
        {
            out.insert(leader, host);
        }
    }
    out
}

/// `(parent pid, start in clock ticks after boot)` from `/proc/PID/stat`.
fn stat_fields(stat: &str) -> Option<(u32, u64)> {
    // The name (field 2) is in parentheses and may hold anything.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    // After the name: state is field 3, ppid 4, starttime 22.
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

fn boot_time(proc: &Path) -> SystemTime {
    let seconds = std::fs::read_to_string(proc.join("stat"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
}

/// Every session open now, ordered by pid.
pub fn scan(sources: &Sources<'_>) -> Vec<SshSession> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)
        .unwrap_or(100) as u64;
    let booted = boot_time(sources.proc);
    let utmp = std::fs::read(sources.utmp)
        .map(|d| utmp_hosts(&d))
        .unwrap_or_default();
    let logind_files: Vec<String> = std::fs::read_dir(sources.logind)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect();
    let logind = logind_hosts(&logind_files);
    let mut sessions = Vec::new();
    for entry in std::fs::read_dir(sources.proc)
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Some((user, tty)) = std::fs::read(dir.join("cmdline"))
            .ok()
            .and_then(|c| session_title(&c))
        else {
            continue;
        };
        let Some((parent, start)) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| stat_fields(&s))
        else {
            continue;
        };
        let since = booted + Duration::from_millis(start * 1000 / ticks);
        let first_tty = tty.split(',').next().unwrap_or_default();
        let (from, source) = match (utmp.get(first_tty), logind.get(&parent)) {
            (Some(host), _) if !first_tty.is_empty() => (host.clone(), "utmp"),
            (_, Some(host)) => (host.clone(), "logind"),
            _ => (String::new(), "process"),
        };
        sessions.push(SshSession {
            user,
            from,
            since,
            pid,
            tty,
            source,
        });
    }
    sessions.sort_by_key(|s| s.pid);
    sessions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_authenticated_session_processes_count() {
        assert_eq!(
            session_title(b"sshd: azureuser@pts/0\0\0"),
            Some(("azureuser".into(), "pts/0".into()))
        );
        assert_eq!(
            session_title(b"sshd: bob@notty"),
            Some(("bob".into(), String::new()))
        );
        assert_eq!(
            session_title(b"sshd-session: bob@pts/1,pts/2"),
            Some(("bob".into(), "pts/1,pts/2".into()))
        );
        assert_eq!(
            session_title(b"sshd: carol"),
            Some(("carol".into(), String::new()))
        );
        for other in [
            &b"sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups"[..],
            b"sshd: azureuser [priv]",
            b"sshd: unknown [net]",
            b"sshd: [accepted]",
            b"/usr/sbin/sshd\0-D\0",
            b"bash",
            b"",
        ] {
            assert_eq!(
                session_title(other),
                None,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }

    fn utmp_record(kind: i16, line: &str, host: &str) -> Vec<u8> {
        let mut record = vec![0u8; UTMP_RECORD];
        record[..2].copy_from_slice(&kind.to_ne_bytes());
        record[8..8 + line.len()].copy_from_slice(line.as_bytes());
        record[76..76 + host.len()].copy_from_slice(host.as_bytes());
        record
    }

    #[test]
    fn utmp_gives_the_host_of_each_logged_in_terminal() {
        let mut data = utmp_record(USER_PROCESS, "pts/0", "10.1.2.3");
        data.extend(utmp_record(8, "pts/1", "10.9.9.9")); // DEAD_PROCESS
        data.extend(utmp_record(USER_PROCESS, "pts/2", ""));
        data.extend([1, 2, 3]); // a torn last record
        let hosts = utmp_hosts(&data);
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts["pts/0"], "10.1.2.3");
    }

    #[test]
    fn logind_gives_hosts_of_sshd_sessions_by_leader() {
        let files = vec![
            "# This is private data. Do not parse.\nUSER=1000\nREMOTE=1\nREMOTE_HOST=192.0.2.7\nSERVICE=sshd\nLEADER=4242\n".to_owned(),
            "SERVICE=login\nLEADER=1\nREMOTE_HOST=x\n".to_owned(),
        ];
        let hosts = logind_hosts(&files);
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[&4242], "192.0.2.7");
    }

    #[test]
    fn a_fake_proc_gives_sessions_with_their_addresses() {
        let root = tempfile::tempdir().unwrap();
        let proc = root.path().join("proc");
        std::fs::create_dir(&proc).unwrap();
        std::fs::write(proc.join("stat"), "cpu 1 2 3\nbtime 1700000000\n").unwrap();
        let process = |pid: u32, ppid: u32, title: &str| {
            let dir = proc.join(pid.to_string());
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("cmdline"), title).unwrap();
            let mut stat = format!("{pid} (sshd) S {ppid}");
            for _ in 0..17 {
                stat.push_str(" 0");
            }
            stat.push_str(" 500 0 0\n");
            std::fs::write(dir.join("stat"), stat).unwrap();
        };
        process(
            10,
            1,
            "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups",
        );
        process(20, 10, "sshd: alice [priv]");
        process(21, 20, "sshd: alice@pts/0");
        process(30, 10, "sshd: bob [priv]");
        process(31, 30, "sshd: bob@notty");
        process(40, 10, "sshd: carol [priv]");
        process(41, 40, "sshd: carol@notty");
        let utmp = root.path().join("utmp");
        std::fs::write(&utmp, utmp_record(USER_PROCESS, "pts/0", "10.0.0.1")).unwrap();
        let logind = root.path().join("sessions");
        std::fs::create_dir(&logind).unwrap();
        std::fs::write(
            logind.join("3"),
            "SERVICE=sshd\nLEADER=30\nREMOTE_HOST=10.0.0.2\n",
        )
        .unwrap();
        let sessions = scan(&Sources {
            proc: &proc,
            utmp: &utmp,
            logind: &logind,
        });
        let seen: Vec<(&str, &str, u32, &str, &str)> = sessions
            .iter()
            .map(|s| {
                (
                    s.user.as_str(),
                    s.from.as_str(),
                    s.pid,
                    s.tty.as_str(),
                    s.source,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("alice", "10.0.0.1", 21, "pts/0", "utmp"),
                ("bob", "10.0.0.2", 31, "", "logind"),
                ("carol", "", 41, "", "process"),
            ]
        );
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .unwrap()
            .unwrap() as u64;
        assert_eq!(
            sessions[0].since,
            SystemTime::UNIX_EPOCH
                + Duration::from_secs(1_700_000_000)
                + Duration::from_millis(500 * 1000 / ticks)
        );
    }
}

//! A site for tests of file share mounts: mount points, fake storage and
//! caches in a temp dir, agents configured to use the blobfuse2 stand-in
//! there, and a drop that kills every stand-in serving it and lazily
//! unmounts what is left, also when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;

use super::Agent;

/// The blobfuse2 stand-in built with the `test-util` feature.
pub fn standin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blobfuse2-standin"))
}

/// A directory with mount points, fake storage and caches; on drop it kills
/// every stand-in serving a path below it and lazily unmounts what is left.
pub struct Site {
    dir: tempfile::TempDir,
    /// `mounts.health_interval_seconds` of the agents it starts.
    pub health_interval_seconds: u32,
}

impl Site {
    pub fn new() -> Self {
        let site = Self {
            dir: tempfile::tempdir().expect("tempdir"),
            health_interval_seconds: 1,
        };
        for d in ["mnt", "storage/data", "storage/other", "cache"] {
            std::fs::create_dir_all(site.path().join(d)).expect("site dirs");
        }
        site
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().canonicalize().expect("canonical tempdir")
    }

    pub fn mnt(&self, name: &str) -> PathBuf {
        self.path().join("mnt").join(name)
    }

    pub fn storage(&self, container: &str) -> PathBuf {
        self.path().join("storage").join(container)
    }

    /// Config for an agent that uses the stand-in on this site.
    pub fn config(&self) -> String {
        format!(
            "[mounts]\nblobfuse2_path = {:?}\nallowed_roots = [{:?}]\ncache_root = {:?}\n\
             health_interval_seconds = {}\nhealth_timeout_seconds = 2\nbackoff_initial_seconds = 1\n\
             backoff_max_seconds = 2\nmount_timeout_seconds = 20\ndefault_owner = \"root\"\n",
            standin(),
            self.path().join("mnt"),
            self.path().join("cache"),
            self.health_interval_seconds,
        )
    }

    pub fn agent(&self) -> Agent {
        self.agent_with("")
    }

    pub fn agent_with(&self, extra: &str) -> Agent {
        Agent::builder()
            .config(&format!("{}{extra}", self.config()))
            .env(
                "STANDIN_STORAGE_ROOT",
                &self.path().join("storage").display().to_string(),
            )
            .start()
    }

    /// Starts a new agent on `agent`'s config, state and log (the old one
    /// is gone; nothing is killed), with this site's storage.
    pub fn restart(&self, agent: &mut Agent) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&agent.log_path)
            .expect("log");
        agent.child = Command::new(super::binary())
            .args(["serve", "--config"])
            .arg(&agent.config_path)
            .env("RUST_LOG", "info,instance_agent=debug")
            .env("STANDIN_STORAGE_ROOT", self.path().join("storage"))
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("restart the agent");
        agent.wait_ready(std::time::Duration::from_secs(20));
    }

    /// Stand-ins serving a path below this site.
    pub fn standins(&self) -> Vec<(u32, PathBuf)> {
        let root = self.path();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.len() > 2
                && args[0].ends_with("blobfuse2-standin")
                && Path::new(&args[2]).starts_with(&root)
            {
                found.push((pid, PathBuf::from(&args[2])));
            }
        }
        found
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for (pid, _) in self.standins() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        for mount in mounts_below(&self.path()) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&mount)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Mount points below `root`, from this process's mountinfo.
pub fn mounts_below(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect()
}

//! The agent's package installed in a booted container ([`Booted`]), for
//! tests/systemd_boot.rs: the config written for the test host, `systemctl`
//! and the agent's CLI run inside, jobs of the local test image that wait
//! for a file in the shared directory, the blobfuse2 stand-in, and the
//! clean-up of the job containers on the host's engine.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::nspawn::Booted;
use super::rootfs::{self, Rootfs};

/// The package's unit.
pub const UNIT: &str = "instance-agent.service";
/// The config file the unit's agent reads (the package's conffile).
pub const CONFIG: &str = "/etc/instance-agent/config.toml";
/// The local image the jobs run (scripts/prepare-host.sh builds it).
pub const IMAGE: &str = "instance-agent/busybox:test";

/// The unit's `TimeoutStopSec=`.
pub const TIMEOUT_STOP: Duration = Duration::from_secs(15);

/// A booted container with the package installed (enabled, not started)
/// and a config for the test host. On drop: the journal on failure, the
/// agent's journal kept for the secret sweep (scripts/check-test-logs.sh),
/// the container halted, then the job containers of this instance removed.
pub struct System {
    /// The container.
    pub booted: Booted,
    /// The agent's `agent.instance_id`, the label of its job containers.
    pub instance_id: String,
    /// The package installed.
    pub deb: &'static Path,
}

/// Instance ids are this and the container's name (`ia-<pid>-<n>`).
pub const INSTANCE_PREFIX: &str = "systemd-test-";

/// Removes the job containers of test processes that died before their
/// guards ran (killed): their jobs would otherwise wait forever.
fn remove_orphaned_job_containers() {
    let Ok(out) = Command::new("docker")
        .args(["ps", "-a", "--filter", "label=io.instance-agent.instance"])
        .args(["--format", "{{.Label \"io.instance-agent.instance\"}}"])
        .output()
    else {
        return;
    };
    let mut instances: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|id| id.strip_prefix(INSTANCE_PREFIX))
        .filter(|name| super::nspawn::dead_owner(name))
        .map(|name| format!("{INSTANCE_PREFIX}{name}"))
        .collect();
    instances.sort_unstable();
    instances.dedup();
    for instance in instances {
        super::remove_containers(&instance);
    }
}

fn required() -> bool {
    std::env::var("INSTANCE_AGENT_REQUIRE_SYSTEMD_TEST").as_deref() == Ok("1")
}

fn host_ready() -> bool {
    let tools = [
        "mmdebstrap",
        "systemd-nspawn",
        "nsenter",
        "setpriv",
        "docker",
    ];
    if !rootfs::host_supports(required(), &tools) || !super::deb::cargo_deb_available(required()) {
        return false;
    }
    let image = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        image || !required(),
        "{IMAGE} missing: run scripts/prepare-host.sh"
    );
    image
}

impl System {
    /// Boots, installs the package and writes the base config with `extra`
    /// TOML appended; None when the host cannot (the test is skipped).
    pub fn new(extra: &str) -> Option<System> {
        if !host_ready() {
            return None;
        }
        let rootfs = Rootfs::cached();
        let deb = super::deb::shared_deb();
        remove_orphaned_job_containers();
        let booted = Booted::boot(&rootfs);
        eprintln!(
            "[systemd_boot] {} booted in {:.2?}",
            booted.name(),
            booted.boot_time()
        );
        let system = System {
            instance_id: format!("{INSTANCE_PREFIX}{}", booted.name()),
            booted,
            deb,
        };
        system.booted.install_deb(deb, false);
        system.write_config(extra);
        Some(system)
    }

    /// Replaces the config file (the package's conffile, as an
    /// administrator edits it): the base settings plus `extra`.
    ///
    /// The base: a unique instance id (the label of this test's job
    /// containers on the shared engine); disk levels for the container's
    /// small filesystems (its `/` is a tmpfs overlay, `/tmp` a 2.4 GiB tmpfs:
    /// with the 5 GiB floor the agent would report itself failed); no
    /// automatic reclaim (it would prune the host engine's dangling images);
    /// jobs may mount the shared directory.
    pub fn write_config(&self, extra: &str) {
        let boot_dir = self.booted.shared().parent().expect("boot dir");
        let text = format!(
            "[agent]\ninstance_id = {:?}\nstatus_interval_seconds = 1\n\n\
             [disk]\ncritical_free_bytes = 67108864\nwarning_free_bytes = 134217728\n\
             clear_margin_bytes = 16777216\nauto_reclaim = false\n\n\
             [jobs]\nallowed_host_roots = [{:?}]\n{extra}",
            self.instance_id,
            boot_dir.display().to_string(),
        );
        self.booted.write(CONFIG, &text);
    }

    /// `systemctl show` of the unit: the properties asked for.
    pub fn show(&self, properties: &[&str]) -> HashMap<String, String> {
        let out = self.booted.ok(&[
            "systemctl",
            "show",
            "--property",
            &properties.join(","),
            UNIT,
        ]);
        out.lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    pub fn property(&self, name: &str) -> String {
        self.show(&[name]).remove(name).unwrap_or_default()
    }

    /// `systemctl ARGS instance-agent`; returns whether it succeeded and
    /// what it printed.
    pub fn systemctl(&self, args: &[&str]) -> (bool, String) {
        let mut all = vec!["systemctl"];
        all.extend_from_slice(args);
        all.push(UNIT);
        let out = self.booted.exec(&all);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    #[track_caller]
    pub fn systemctl_ok(&self, args: &[&str]) {
        let (ok, printed) = self.systemctl(args);
        assert!(ok, "systemctl {args:?} failed:\n{printed}");
    }

    /// The CLI inside, `--json`; parsed.
    #[track_caller]
    pub fn cli(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["instance-agent", "--json"];
        all.extend_from_slice(args);
        let out = self.booted.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// Submits a job of the test image that counts its starts in the shared
    /// directory (`<id>.runs`, written by the container itself) and runs
    /// until `<id>.go` appears there.
    pub fn submit_waiting_job(&self, id: &str) {
        let shared = self.booted.shared().display().to_string();
        let script = format!(
            "echo run >> /shared/{id}.runs; while [ ! -e /shared/{id}.go ]; do sleep 0.2; done"
        );
        self.booted.ok(&[
            "instance-agent",
            "jobs",
            "submit",
            "--id",
            id,
            "--image",
            IMAGE,
            "--network",
            "none",
            "-v",
            &format!("{shared}:/shared"),
            "--",
            "sh",
            "-c",
            &script,
        ]);
    }

    pub fn job(&self, id: &str) -> serde_json::Value {
        self.cli(&["jobs", "get", id])
    }

    /// Waits until job `id` is in `state` (e.g. `JOB_STATE_RUNNING`).
    #[track_caller]
    pub fn wait_job(&self, id: &str, state: &str) -> serde_json::Value {
        wait_for(
            &format!("job {id} {state}"),
            Duration::from_secs(60),
            || {
                let job = self.job(id);
                when(job["state"] == state, job.clone(), &job["state"])
            },
        )
    }

    /// Lets a job of [`System::submit_waiting_job`] finish.
    pub fn release(&self, name: &str) {
        std::fs::write(self.booted.shared().join(format!("{name}.go")), "").expect("go file");
    }

    /// How many times the job's container started.
    pub fn runs(&self, id: &str) -> usize {
        std::fs::read_to_string(self.booted.shared().join(format!("{id}.runs")))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// Whether the host's engine has the container running.
    pub fn container_running(&self, container: &str) -> bool {
        Command::new("docker")
            .args(["inspect", "--format", "{{.State.Running}}", container])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
    }

    /// Installs the blobfuse2 stand-in (a real FUSE mount of a local
    /// directory, built with the test-util feature) as
    /// `/usr/local/bin/blobfuse2`, serving `/srv/storage/<container>`, and a
    /// key file; false when it was not built.
    pub fn install_blobfuse2_standin(&self) -> bool {
        let Some(standin) = option_env!("CARGO_BIN_EXE_blobfuse2-standin") else {
            eprintln!("blobfuse2-standin not built (no test-util feature): no mount in this test");
            return false;
        };
        std::fs::copy(
            standin,
            self.booted.host_path("/usr/local/bin/blobfuse2-standin"),
        )
        .expect("copy the stand-in");
        self.booted.write(
            "/usr/local/bin/blobfuse2",
            "#!/bin/sh\nSTANDIN_STORAGE_ROOT=/srv/storage exec /usr/local/bin/blobfuse2-standin \"$@\"\n",
        );
        self.booted
            .ok(&["chmod", "0755", "/usr/local/bin/blobfuse2"]);
        self.booted
            .write("/srv/storage/data/hello.txt", "hello from storage\n");
        self.booted
            .write("/etc/instance-agent/data.key", "c3RhbmRpbi1rZXk=");
        self.booted
            .ok(&["chmod", "0600", "/etc/instance-agent/data.key"]);
        true
    }

    /// The managed mount `name` as `mounts list` shows it.
    /// `mounts list` exits 1 while a mount is not mounted, so its JSON is
    /// read whatever the exit status.
    pub fn mount(&self, name: &str) -> serde_json::Value {
        let out = self
            .booted
            .exec(&["instance-agent", "--json", "mounts", "list"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let list: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("mounts list: {e}: {text} {:?}", out.status));
        list["mounts"]
            .as_array()
            .and_then(|mounts| mounts.iter().find(|m| m["name"] == name).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Starts the unit (returns once READY=1 came, Type=notify) and checks
    /// it is active.
    pub fn start(&self) {
        self.systemctl_ok(&["start"]);
        assert_eq!(self.property("ActiveState"), "active");
    }
}

impl Drop for System {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.booted.print_diagnostics();
        }
        let kept = super::captured_dir();
        if std::fs::create_dir_all(&kept).is_ok() {
            let _ = std::fs::write(kept.join("agent.log"), self.booted.journal(Some(UNIT)));
        }
        let halt = self.booted.halt();
        eprintln!("[systemd_boot] halted in {halt:.2?}");
        super::remove_containers(&self.instance_id);
    }
}

/// Polls `probe` until it gives a value, failing after `limit` with what it
/// saw last (its `Err`).
#[track_caller]
pub fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}; last seen: {seen}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `Ok(value)` when `condition`, else the observation as the `Err`.
pub fn when<T>(condition: bool, value: T, seen: impl std::fmt::Debug) -> Result<T, String> {
    if condition {
        Ok(value)
    } else {
        Err(format!("{seen:?}"))
    }
}

//! Facts about the machine: usable CPU cores (cgroup quota and cpuset
//! applied), memory, GPUs, host name and kernel.
//!
//! Reads `/proc`, `/sys` and, for GPUs, `nvidia-smi`; everything here is
//! blocking and is called from `spawn_blocking` or once at start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A GPU seen on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpu {
    /// Driver index (what Docker device requests use).
    pub index: u32,
    /// Model name.
    pub name: String,
    /// Driver UUID, when known.
    pub uuid: String,
    /// Memory in bytes, when known.
    pub memory_bytes: u64,
}

/// Static facts, read once at start.
#[derive(Debug, Clone, PartialEq)]
pub struct HostFacts {
    /// Host name.
    pub hostname: String,
    /// Kernel release.
    pub kernel: String,
    /// Logical CPUs on the host.
    pub host_cpus: u32,
    /// CPU cores this process may use: the smaller of the affinity mask and
    /// the cgroup quota.
    pub usable_cores: f64,
    /// Total memory in bytes.
    pub memory_total_bytes: u64,
    /// GPUs found; empty when none.
    pub gpus: Vec<Gpu>,
    /// How setup scripts and blobfuse2 are started and supervised here,
    /// chosen at start: transient services under systemd, else the agent's
    /// children (set by the daemon from its adapters).
    pub supervision: String,
}

impl HostFacts {
    /// Reads the facts from this machine, all but GPUs (see [`discover_gpus`],
    /// which may take seconds and so runs after the agent is ready).
    pub fn discover() -> Self {
        let uname = nix::sys::utsname::uname().ok();
        let hostname = uname
            .as_ref()
            .map(|u| u.nodename().to_string_lossy().into_owned())
            .unwrap_or_default();
        let kernel = uname
            .as_ref()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let host_cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        Self {
            hostname,
            kernel,
            host_cpus: online_cpus().unwrap_or(host_cpus),
            usable_cores: usable_cores(),
            memory_total_bytes: memory().0,
            gpus: Vec::new(),
            supervision: String::new(),
        }
    }
}

/// Available memory in bytes, read now.
pub fn memory_available_bytes() -> u64 {
    memory().1
}

/// Total and available memory; zeros when the kernel does not say.
fn memory() -> (u64, u64) {
    match sysinfo::System::new() {
        Ok(mut system) => {
            system.refresh_memory();
            (system.total_memory(), system.available_memory())
        }
        Err(_) => (0, 0),
    }
}

fn online_cpus() -> Option<u32> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    count_cpu_list(text.trim())
}

/// Counts a kernel CPU list such as `0-3,8,10-11`.
fn count_cpu_list(list: &str) -> Option<u32> {
    let mut count = 0;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                count += b.checked_sub(a)? + 1;
            }
            None => {
                part.parse::<u32>().ok()?;
                count += 1;
            }
        }
    }
    Some(count)
}

/// The cores this process may use: the CPUs of its affinity mask (which
/// reflects the cpuset), capped by the cgroup CPU quota (v2 `cpu.max`, v1
/// `cfs_quota_us`) as a fraction. `available_parallelism` is not used: it
/// already applies the quota rounded down to whole cores, so a 1.5-core
/// quota would count as 1.
pub fn usable_cores() -> f64 {
    let affinity = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .ok()
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
                .count()
        });
    let affinity = affinity
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    let quota = cgroup_quota_cores(Path::new("/sys/fs/cgroup"), Path::new("/proc/self/cgroup"));
    cores_within(affinity, quota)
}

/// The cores of `affinity_cpus` CPUs under a quota of `quota` cores (kept
/// fractional), never less than a hundredth of a core.
fn cores_within(affinity_cpus: usize, quota: Option<f64>) -> f64 {
    let cpus = affinity_cpus.max(1) as f64;
    match quota {
        Some(quota) if quota < cpus => quota.max(0.01),
        _ => cpus,
    }
}

/// The CPU quota of this process's cgroup (and its ancestors) in cores, if any.
fn cgroup_quota_cores(cgroup_root: &Path, proc_cgroup: &Path) -> Option<f64> {
    let membership = std::fs::read_to_string(proc_cgroup).ok()?;
    let mut best: Option<f64> = None;
    let mut consider = |q: f64| best = Some(best.map_or(q, |b: f64| b.min(q)));
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            // cgroup v2: walk up from our cgroup; each level may cap us.
            for dir in ancestors(&cgroup_root.join(path), cgroup_root) {
                if let Some(q) = read_v2_quota(&dir.join("cpu.max")) {
                    consider(q);
                }
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            for mount in ["cpu,cpuacct", "cpu"] {
                let base = cgroup_root.join(mount);
                for dir in ancestors(&base.join(path), &base) {
                    if let Some(q) = read_v1_quota(&dir) {
                        consider(q);
                    }
                }
            }
        }
    }
    best
}

fn ancestors(start: &Path, root: &Path) -> Vec<PathBuf> {
    start
        .ancestors()
        .take_while(|p| p.starts_with(root))
        .map(Path::to_path_buf)
        .collect()
}

fn read_v2_quota(file: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut parts = text.split_whitespace();
    let quota = parts.next()?;
    let period: f64 = parts.next()?.parse().ok()?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    Some(quota.parse::<f64>().ok()? / period)
}

fn read_v1_quota(dir: &Path) -> Option<f64> {
    let quota: f64 = std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let period: f64 = std::fs::read_to_string(dir.join("cpu.cfs_period_us"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// GPUs from `nvidia-smi` when it answers (within 5 s), else from the
/// driver's `/proc/driver/nvidia/gpus` entries; empty when there are none.
pub fn discover_gpus() -> Vec<Gpu> {
    let from_smi = run_with_timeout(
        Command::new("nvidia-smi").args([
            "--query-gpu=index,name,uuid,memory.total",
            "--format=csv,noheader,nounits",
        ]),
        Duration::from_secs(5),
    )
    .map(|out| parse_nvidia_smi(&out))
    .unwrap_or_default();
    if !from_smi.is_empty() {
        return from_smi;
    }
    gpus_from_proc(Path::new("/proc/driver/nvidia/gpus"))
}

fn parse_nvidia_smi(output: &str) -> Vec<Gpu> {
    output
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() < 4 {
                return None;
            }
            Some(Gpu {
                index: f[0].parse().ok()?,
                name: f[1].to_owned(),
                uuid: f[2].to_owned(),
                memory_bytes: f[3].parse::<u64>().map(|mib| mib << 20).unwrap_or(0),
            })
        })
        .collect()
}

fn gpus_from_proc(dir: &Path) -> Vec<Gpu> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut bus_ids: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    // The driver numbers GPUs in PCI bus order.
    bus_ids.sort();
    bus_ids
        .iter()
        .enumerate()
        .map(|(index, path)| {
            let info = std::fs::read_to_string(path.join("information")).unwrap_or_default();
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim_start_matches(':').trim().to_owned())
                    .unwrap_or_default()
            };
            Gpu {
                index: index as u32,
                name: field("Model"),
                uuid: field("GPU UUID"),
                memory_bytes: 0,
            }
        })
        .collect()
}

/// Runs a command, returning its stdout when it exits 0 within `timeout`.
fn run_with_timeout(command: &mut Command, timeout: Duration) -> Option<String> {
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut()?, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0-3"), Some(4));
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("3-1"), None);
    }

    #[test]
    fn a_fractional_quota_stays_fractional() {
        assert_eq!(cores_within(4, Some(1.5)), 1.5);
        assert_eq!(cores_within(2, Some(3.0)), 2.0, "the cpuset caps the quota");
        assert_eq!(cores_within(8, None), 8.0);
        assert_eq!(cores_within(0, None), 1.0);
        // Capacity = floor(slots_per_core x usable cores), at least 1.
        use crate::jobs::scheduler::capacity;
        assert_eq!(capacity(0, 2, cores_within(4, Some(1.5))), 3);
        assert_eq!(capacity(0, 2, cores_within(4, Some(0.25))), 1);
        assert_eq!(capacity(0, 2, cores_within(4, Some(2.75))), 5);
    }

    #[test]
    fn v2_quota_is_read_from_the_tightest_ancestor() {
        let root = tempfile::tempdir().expect("tempdir");
        let leaf = root.path().join("system.slice/agent.service");
        std::fs::create_dir_all(&leaf).expect("mkdir");
        std::fs::write(root.path().join("system.slice/cpu.max"), "150000 100000\n").expect("write");
        std::fs::write(leaf.join("cpu.max"), "max 100000\n").expect("write");
        let proc = root.path().join("cgroup");
        std::fs::write(&proc, "0::/system.slice/agent.service\n").expect("write");
        assert_eq!(cgroup_quota_cores(root.path(), &proc), Some(1.5));
    }

    #[test]
    fn v1_quota_is_read() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("cpu,cpuacct/docker/abc");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("cpu.cfs_quota_us"), "50000\n").expect("write");
        std::fs::write(dir.join("cpu.cfs_period_us"), "100000\n").expect("write");
        let proc = root.path().join("cgroup");
        std::fs::write(&proc, "4:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n").expect("write");
        assert_eq!(cgroup_quota_cores(root.path(), &proc), Some(0.5));
    }

    #[test]
    fn no_quota_means_none() {
        let root = tempfile::tempdir().expect("tempdir");
        let proc = root.path().join("cgroup");
        std::fs::write(&proc, "0::/\n").expect("write");
        std::fs::write(root.path().join("cpu.max"), "max 100000\n").expect("write");
        assert_eq!(cgroup_quota_cores(root.path(), &proc), None);
    }

    #[test]
    fn nvidia_smi_output_is_parsed() {
        let out = "0, NVIDIA A100 80GB PCIe, GPU-1234, 81920\n1, NVIDIA A100 80GB PCIe, GPU-5678, 81920\n";
        let gpus = parse_nvidia_smi(out);
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[1].index, 1);
        assert_eq!(gpus[1].uuid, "GPU-5678");
        assert_eq!(gpus[0].memory_bytes, 81920 << 20);
    }

    #[test]
    fn proc_gpus_are_numbered_in_bus_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (bus, model) in [("0000:3b:00.0", "Tesla T4"), ("0000:00:1e.0", "Tesla V100")] {
            let d = dir.path().join(bus);
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(
                d.join("information"),
                format!("Model: \t\t {model}\nGPU UUID: \t GPU-{bus}\n"),
            )
            .expect("write");
        }
        let gpus = gpus_from_proc(dir.path());
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].name, "Tesla V100");
        assert_eq!(gpus[1].uuid, "GPU-0000:3b:00.0");
    }

    #[test]
    fn no_gpus_without_driver() {
        assert!(gpus_from_proc(Path::new("/nonexistent/nvidia")).is_empty());
    }
}

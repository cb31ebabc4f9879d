//! `instance-agent disk`: every watched filesystem like `df -h` with its
//! state and levels; `--top PATH` for the largest directories below PATH;
//! `--watch` to follow alerts; `--reclaim` to free space; `--add`/`--remove`
//! for extra watched paths.

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgGroup, Args};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::{format, output, states};
use crate::api::proto::{self, disk_service_client::DiskServiceClient};

/// `disk` options.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("action")
        .args(["top", "watch", "reclaim", "add", "remove"])
        .multiple(false)
))]
pub struct DiskArgs {
    /// List the largest directories below PATH (one filesystem, bounded in
    /// time), to see what to delete.
    #[arg(long, value_name = "PATH")]
    pub top: Option<PathBuf>,
    /// With --top: how many directories (1 to 1000).
    #[arg(long, default_value_t = 20, requires = "top")]
    pub limit: u32,
    /// With --top: give up after this many seconds (1 to 600).
    #[arg(long, default_value_t = 30, requires = "top")]
    pub timeout: u32,
    /// Follow alerts: the current state of every filesystem, then each change.
    #[arg(long)]
    pub watch: bool,
    /// Reclaim space: exited job containers, dangling images, expired job
    /// logs, mount caches; never user files.
    #[arg(long)]
    pub reclaim: bool,
    /// With --reclaim: only say what each step would free.
    #[arg(long, requires = "reclaim")]
    pub dry_run: bool,
    /// With --reclaim: run every step even when enough space is free.
    #[arg(long, requires = "reclaim")]
    pub all_steps: bool,
    /// With --reclaim: also stop and remove the containers of unknown origin
    /// (labelled with this instance, no job record owns them; see `status`),
    /// running ones included. Never done otherwise.
    #[arg(long, requires = "reclaim")]
    pub unknown_containers: bool,
    /// With --reclaim: reclaim for the filesystem holding PATH (default:
    /// every filesystem below its floor plus margin).
    #[arg(long, value_name = "PATH", requires = "reclaim")]
    pub path: Option<PathBuf>,
    /// Watch one more path (kept across restarts).
    #[arg(long, value_name = "PATH")]
    pub add: Option<PathBuf>,
    /// With --add: why, shown beside the path.
    #[arg(long, default_value = "", requires = "add")]
    pub reason: String,
    /// Stop watching a path added with --add.
    #[arg(long, value_name = "PATH")]
    pub remove: Option<PathBuf>,
}

/// Runs `disk`. Exits 1 when a filesystem is critical (plain `disk`).
pub async fn run(channel: Channel, json: bool, args: DiskArgs) -> anyhow::Result<ExitCode> {
    let mut client = DiskServiceClient::new(channel);
    if let Some(path) = args.top {
        return top(&mut client, json, path, args.limit, args.timeout).await;
    }
    if args.watch {
        return watch(&mut client, json).await;
    }
    if args.reclaim {
        let request = proto::ReclaimSpaceRequest {
            dry_run: args.dry_run,
            path: args
                .path
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            all_steps: args.all_steps,
            unknown_containers: args.unknown_containers,
        };
        let report = client.reclaim_space(request).await?.into_inner();
        output::reply(json, &report, render_reclaim)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(path) = args.add {
        client
            .add_watched_path(proto::AddWatchedPathRequest {
                path: path.display().to_string(),
                reason: args.reason,
            })
            .await?;
        println!("watching {}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(path) = args.remove {
        let removed = client
            .remove_watched_path(proto::RemoveWatchedPathRequest {
                path: path.display().to_string(),
            })
            .await?
            .into_inner()
            .removed;
        if removed {
            println!("no longer watching {}", path.display());
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!(
            "instance-agent: {} was not added with `disk --add`",
            path.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let usage = client
        .get_disk_usage(proto::GetDiskUsageRequest {})
        .await?
        .into_inner();
    output::reply(json, &usage, render_usage)?;
    let critical = usage
        .filesystems
        .iter()
        .any(|f| f.state() == proto::DiskState::Critical);
    Ok(if critical {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The `df -h`-like table.
fn render_usage(usage: &proto::GetDiskUsageResponse) -> String {
    let mut rows = vec![[
        "MOUNTED ON".to_owned(),
        "DEVICE".into(),
        "TYPE".into(),
        "SIZE".into(),
        "AVAIL".into(),
        "USE%".into(),
        "IFREE%".into(),
        "STATE".into(),
        "FLOOR".into(),
        "WARNING".into(),
        "WATCHED FOR".into(),
    ]];
    for fs in &usage.filesystems {
        let t = fs.thresholds.unwrap_or_default();
        let sampled = fs.total_bytes > 0;
        let used_percent = if sampled {
            let used = fs.total_bytes.saturating_sub(fs.free_bytes);
            format!("{:.0}%", used as f64 * 100.0 / fs.total_bytes as f64)
        } else {
            "-".into()
        };
        let inodes = if fs.total_inodes > 0 {
            format!(
                "{:.0}%",
                fs.free_inodes as f64 * 100.0 / fs.total_inodes as f64
            )
        } else {
            "-".into()
        };
        let why: Vec<String> = fs
            .paths
            .iter()
            .map(|p| format!("{} ({})", p.path, p.reasons.join(", ")))
            .collect();
        let mut mount = fs.mount_point.clone();
        if fs.guards_admission {
            mount.push('*');
        }
        rows.push([
            mount,
            fs.device.clone(),
            fs.fs_type.clone(),
            if sampled {
                format::bytes(fs.total_bytes)
            } else {
                "-".into()
            },
            if sampled {
                format::bytes(fs.free_bytes)
            } else {
                "-".into()
            },
            used_percent,
            inodes,
            states::disk(fs.state()).to_string(),
            format::bytes(t.critical_free_bytes),
            format::bytes(t.warning_free_bytes),
            why.join("; "),
        ]);
    }
    let mut out = table(&rows);
    let mut notes = Vec::new();
    if usage.filesystems.iter().any(|f| f.guards_admission) {
        notes.push("* holds the Docker data root or the state dir: while it is critical, queued jobs do not start".to_owned());
    }
    for fs in &usage.filesystems {
        if !fs.error.is_empty() {
            notes.push(format!("{}: {}", fs.mount_point, fs.error));
        }
    }
    for s in &usage.skipped {
        notes.push(format!(
            "skipped {} ({}): {}",
            s.path,
            s.reasons.join(", "),
            s.problem
        ));
    }
    if let Some(t) = usage.filesystems.first().and_then(|f| f.thresholds) {
        notes.push(format!(
            "a state improves once free space is {} above its level for {}s; alerts since start: {}",
            format::bytes(t.clear_margin_bytes),
            t.transition_seconds,
            usage.alerts_total
        ));
    }
    for note in notes {
        out.push_str(&note);
        out.push('\n');
    }
    out
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn render_reclaim(report: &proto::ReclaimSpaceResponse) -> String {
    let verb = if report.dry_run {
        "would free"
    } else {
        "freed"
    };
    let mut rows = vec![[
        "STEP".to_owned(),
        "RAN".into(),
        "ITEMS".into(),
        verb.to_uppercase(),
        "NOTE".into(),
    ]];
    for step in &report.steps {
        rows.push([
            step.name.clone(),
            if step.ran {
                "yes".into()
            } else {
                "skipped".into()
            },
            step.items.to_string(),
            format::bytes(step.bytes),
            if step.error.is_empty() {
                step.skipped_reason.clone()
            } else {
                step.error.clone()
            },
        ]);
    }
    let mut out = table(&rows);
    out.push_str(&format!(
        "total {verb}: {}\n",
        format::bytes(report.total_bytes)
    ));
    out
}

async fn watch(client: &mut DiskServiceClient<Channel>, json: bool) -> anyhow::Result<ExitCode> {
    let mut alerts = client
        .watch_disk_alerts(proto::WatchDiskAlertsRequest {})
        .await?
        .into_inner();
    let mut stdout = std::io::stdout();
    while let Some(alert) = alerts.next().await {
        let alert = alert?;
        if json {
            output::json_line(&mut stdout, &alert)?;
        } else {
            writeln!(
                stdout,
                "{}  {:<12} {} -> {}  {}",
                format::utc(alert.time.as_ref()),
                alert.mount_point,
                states::disk(alert.old_state()),
                states::disk(alert.new_state()),
                alert.message
            )?;
        }
        // Each alert as it arrives, even through a pipe.
        stdout.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn top(
    client: &mut DiskServiceClient<Channel>,
    json: bool,
    path: PathBuf,
    limit: u32,
    timeout: u32,
) -> anyhow::Result<ExitCode> {
    // The daemon walks its own view of the filesystem: send an absolute path.
    let path = if path.is_absolute() {
        path
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut updates = client
        .top_directories(proto::TopDirectoriesRequest {
            path: path.display().to_string(),
            limit,
            timeout_seconds: timeout,
            max_entries: 0,
        })
        .await?
        .into_inner();
    let terminal = std::io::stderr().is_terminal() && !json;
    let mut result = None;
    while let Some(update) = updates.next().await {
        match update?.update {
            Some(proto::top_directories_update::Update::Progress(p)) if terminal => {
                let mut current = p.current;
                if current.chars().count() > 60 {
                    let tail: String = current.chars().rev().take(57).collect();
                    current = format!("...{}", tail.chars().rev().collect::<String>());
                }
                eprint!(
                    "\r\x1b[2K{} entries, {}  {}",
                    p.entries,
                    format::bytes(p.bytes),
                    current
                );
            }
            Some(proto::top_directories_update::Update::Progress(_)) | None => {}
            Some(proto::top_directories_update::Update::Result(r)) => result = Some(r),
        }
    }
    if terminal {
        eprint!("\r\x1b[2K");
    }
    let Some(result) = result else {
        anyhow::bail!("the daemon ended the walk without a result");
    };
    output::reply(json, &result, render_top)?;
    if json {
        return Ok(ExitCode::SUCCESS);
    }
    if let Ok(usage) = client.get_disk_usage(proto::GetDiskUsageRequest {}).await
        && let Some(advice) = advice(&usage.into_inner(), &path)
    {
        println!("{advice}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The largest directories, then how much was walked and whether the walk
/// stopped early.
fn render_top(result: &proto::TopDirectoriesResult) -> String {
    let mut rows = vec![["SIZE".to_owned(), "DIRECTORY".into()]];
    for d in &result.directories {
        rows.push([format::bytes(d.bytes), d.path.clone()]);
    }
    let mut out = table(&rows);
    out.push_str(&format!(
        "{} in {} entries below {} ({:.1}s{}){}\n",
        format::bytes(result.total_bytes),
        result.entries,
        result.path,
        result.elapsed_seconds,
        if result.unreadable > 0 {
            format!(", {} unreadable", result.unreadable)
        } else {
            String::new()
        },
        if result.stopped.is_empty() {
            String::new()
        } else {
            format!(
                "; stopped early: {}, sizes are lower bounds",
                result.stopped
            )
        }
    ));
    out
}

/// How much to delete on PATH's filesystem to be back above the floor plus
/// the margin, when it is below.
fn advice(usage: &proto::GetDiskUsageResponse, path: &Path) -> Option<String> {
    let fs = usage
        .filesystems
        .iter()
        .filter(|f| path.starts_with(&f.mount_point))
        .max_by_key(|f| f.mount_point.len())?;
    let t = fs.thresholds?;
    let target = t.critical_free_bytes.saturating_add(t.clear_margin_bytes);
    (fs.free_bytes < target).then(|| {
        format!(
            "{} has {} free: delete at least {} to be back above the {} floor plus the {} margin",
            fs.mount_point,
            format::bytes(fs.free_bytes),
            format::bytes(target - fs.free_bytes),
            format::bytes(t.critical_free_bytes),
            format::bytes(t.clear_margin_bytes)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(mount: &str, free: u64) -> proto::FilesystemUsage {
        proto::FilesystemUsage {
            mount_point: mount.into(),
            device: "/dev/vda".into(),
            fs_type: "ext4".into(),
            total_bytes: 100 << 30,
            free_bytes: free,
            total_inodes: 1000,
            free_inodes: 500,
            state: proto::DiskState::Critical as i32,
            thresholds: Some(proto::DiskThresholds {
                critical_free_bytes: 5 << 30,
                warning_free_bytes: 10 << 30,
                clear_margin_bytes: 1 << 30,
                transition_seconds: 30,
                ..Default::default()
            }),
            guards_admission: true,
            paths: vec![proto::WatchedPath {
                path: mount.into(),
                reasons: vec!["root filesystem".into()],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn table_shows_state_levels_and_reasons() {
        let usage = proto::GetDiskUsageResponse {
            filesystems: vec![fs("/", 3 << 30)],
            skipped: vec![proto::SkippedPath {
                path: "/data".into(),
                reasons: vec!["disk.paths".into()],
                problem: "No such file or directory".into(),
            }],
            alerts_total: 4,
        };
        let out = render_usage(&usage);
        assert!(out.starts_with("MOUNTED ON"), "{out}");
        assert!(out.contains("/*"), "{out}");
        assert!(out.contains("CRITICAL"), "{out}");
        assert!(out.contains("5.0 GiB"), "{out}");
        assert!(out.contains("97%"), "{out}");
        assert!(out.contains("/ (root filesystem)"), "{out}");
        assert!(out.contains("skipped /data (disk.paths)"), "{out}");
        assert!(out.contains("alerts since start: 4"), "{out}");
    }

    #[test]
    fn advice_names_what_to_delete() {
        let usage = proto::GetDiskUsageResponse {
            filesystems: vec![fs("/", 3 << 30), fs("/mnt", 50 << 30)],
            ..Default::default()
        };
        let advice = advice(&usage, Path::new("/var/lib")).unwrap();
        assert!(advice.contains("delete at least 3.0 GiB"), "{advice}");
        assert_eq!(super::advice(&usage, Path::new("/mnt/x")), None);
    }
}

//! `instance-agent jobs submit|list|get|cancel|logs`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::progress::PullDisplay;
use super::{format, output, states};
use crate::api::proto::{self, job_service_client::JobServiceClient};

/// How often `jobs submit --wait` looks at a job whose image is pulled.
const PULL_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// `jobs` subcommands.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Queue a job: `jobs submit --image IMG -- CMD ARGS...`.
    Submit(Box<SubmitArgs>),
    /// List jobs, newest first.
    List {
        /// Only jobs in this state (queued, starting, running, succeeded, failed, cancelled, timed_out); repeatable.
        #[arg(long = "state", value_name = "STATE")]
        states: Vec<String>,
        /// Only jobs with this label (KEY=VALUE); repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show one job.
    Get {
        /// The job id.
        id: String,
    },
    /// Cancel a job (queued: removed from the queue; running: SIGTERM, then SIGKILL).
    Cancel {
        /// The job id.
        id: String,
    },
    /// Print a job's output (stdout to stdout, stderr to stderr).
    Logs {
        /// The job id.
        id: String,
        /// Keep printing new output until the job ends.
        #[arg(short, long)]
        follow: bool,
    },
}

/// `jobs submit` options.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Image reference; pulled (with the stored credential of its registry)
    /// when not on the instance.
    #[arg(long)]
    pub image: String,
    /// Job id for idempotent submission; generated when absent.
    #[arg(long)]
    pub id: Option<String>,
    /// Slots the job holds.
    #[arg(long, default_value_t = 1)]
    pub slots: u32,
    /// Memory limit, e.g. 512M or 2G (1024-based).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// CPU limit in thousandths of a core (1500 = 1.5 cores).
    #[arg(long, value_name = "MILLICORES")]
    pub cpu_millis: Option<u32>,
    /// GPUs for the job.
    #[arg(long, default_value_t = 0)]
    pub gpus: u32,
    /// Seconds from running to kill.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u32>,
    /// Seconds between SIGTERM and SIGKILL when the job is cancelled or
    /// times out; the configured `jobs.kill_grace_seconds` when absent.
    #[arg(long, value_name = "SECONDS")]
    pub kill_grace_seconds: Option<u32>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// Environment variable KEY=VALUE; repeatable.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Label KEY=VALUE; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Host path (`/host/path:/in/container[:ro]`) or managed mount
    /// (`mount:NAME:/in/container[:ro]`); repeatable.
    #[arg(long = "mount", short = 'v', value_name = "SPEC")]
    pub mounts: Vec<String>,
    /// Docker network (must be allowed by config); none by default.
    #[arg(long)]
    pub network: Option<String>,
    /// Working directory in the container.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Wait until the job ends (showing its image's pull, then its output)
    /// and exit with its status.
    #[arg(long)]
    pub wait: bool,
    /// The command to run (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Runs a `jobs` subcommand.
pub async fn run(command: JobsCommand, channel: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let mut jobs = JobServiceClient::new(channel);
    match command {
        JobsCommand::Submit(args) => {
            let wait = args.wait;
            let spec = spec_from_args(*args)?;
            let job = jobs
                .submit_job(proto::SubmitJobRequest { spec: Some(spec) })
                .await?
                .into_inner();
            if !wait {
                output::reply(json, &job, render_job)?;
                return Ok(ExitCode::SUCCESS);
            }
            let id = job.id.clone();
            wait_for_image(&mut jobs, job).await?;
            let mut logs = jobs
                .stream_job_logs(proto::StreamJobLogsRequest {
                    id: id.clone(),
                    follow: true,
                })
                .await?
                .into_inner();
            while let Some(chunk) = logs.next().await {
                write_chunk(&chunk?)?;
            }
            let job = jobs
                .get_job(proto::GetJobRequest { id })
                .await?
                .into_inner();
            output::reply(json, &job, render_job)?;
            Ok(exit_of(&job))
        }
        JobsCommand::List {
            states,
            labels,
            limit,
        } => {
            let states = states
                .iter()
                .map(|s| states::parse_job(s).map(|s| s as i32))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let labels = labels
                .iter()
                .map(|l| split_pair("--label", l))
                .collect::<anyhow::Result<_>>()?;
            let list = jobs
                .list_jobs(proto::ListJobsRequest {
                    states,
                    labels,
                    limit,
                })
                .await?
                .into_inner();
            output::reply(json, &list, |list| table(&list.jobs))?;
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Get { id } => {
            let job = jobs
                .get_job(proto::GetJobRequest { id })
                .await?
                .into_inner();
            output::reply(json, &job, render_job)?;
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Cancel { id } => {
            let job = jobs
                .cancel_job(proto::CancelJobRequest { id })
                .await?
                .into_inner();
            output::reply(json, &job, render_job)?;
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Logs { id, follow } => {
            let mut logs = jobs
                .stream_job_logs(proto::StreamJobLogsRequest { id, follow })
                .await?
                .into_inner();
            while let Some(chunk) = logs.next().await {
                let chunk = chunk?;
                if json {
                    output::json_line(&mut std::io::stdout(), &chunk)?;
                } else {
                    write_chunk(&chunk)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// While the job is queued for its image, shows the pull (a bar on a
/// terminal, lines otherwise), polling the job.
async fn wait_for_image(
    jobs: &mut JobServiceClient<Channel>,
    mut job: proto::Job,
) -> anyhow::Result<()> {
    let mut display: Option<PullDisplay> = None;
    while job.state() == proto::JobState::Queued {
        let Some(pull) = job.pull.as_ref() else {
            break;
        };
        display.get_or_insert_with(PullDisplay::new).show(pull);
        tokio::time::sleep(PULL_POLL).await;
        job = jobs
            .get_job(proto::GetJobRequest { id: job.id.clone() })
            .await?
            .into_inner();
    }
    if let Some(display) = display {
        let image = job.spec.clone().unwrap_or_default().image;
        display.finish(&match job.state() {
            proto::JobState::Queued | proto::JobState::Starting | proto::JobState::Running => {
                format!("image {image} is local")
            }
            _ => format!("image {image}: {}", job.reason),
        });
    }
    Ok(())
}

pub(super) fn write_chunk(chunk: &proto::LogChunk) -> anyhow::Result<()> {
    match chunk.stream() {
        proto::LogStream::Stdout | proto::LogStream::Unspecified => {
            let mut out = std::io::stdout().lock();
            out.write_all(&chunk.data)?;
            out.flush()?;
        }
        proto::LogStream::Stderr | proto::LogStream::Agent => {
            std::io::stderr().lock().write_all(&chunk.data)?;
        }
    }
    Ok(())
}

fn exit_of(job: &proto::Job) -> ExitCode {
    match job.state() {
        proto::JobState::Succeeded => ExitCode::SUCCESS,
        _ => ExitCode::from(u8::try_from(job.exit_code.unwrap_or(1)).unwrap_or(1).max(1)),
    }
}

fn spec_from_args(args: SubmitArgs) -> anyhow::Result<proto::JobSpec> {
    let env = args
        .env
        .iter()
        .map(|e| split_pair("--env", e))
        .collect::<anyhow::Result<_>>()?;
    let labels = args
        .labels
        .iter()
        .map(|l| split_pair("--label", l))
        .collect::<anyhow::Result<_>>()?;
    let mounts = args
        .mounts
        .iter()
        .map(|m| parse_mount(m))
        .collect::<anyhow::Result<_>>()?;
    let memory_bytes = match &args.memory {
        Some(size) => format::parse_size(size).with_context(|| format!("--memory {size:?}"))?,
        None => 0,
    };
    Ok(proto::JobSpec {
        id: args.id.unwrap_or_default(),
        image: args.image,
        command: args.command,
        env,
        working_dir: args.workdir.unwrap_or_default(),
        labels,
        slots: args.slots,
        memory_bytes,
        cpu_millis: args.cpu_millis.unwrap_or(0),
        gpus: args.gpus,
        mounts,
        timeout_seconds: args.timeout.unwrap_or(0),
        priority: args.priority,
        network: args.network.unwrap_or_default(),
        kill_grace_seconds: args.kill_grace_seconds.unwrap_or(0),
        registry_auth: None,
    })
}

pub(super) fn split_pair(flag: &str, text: &str) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
        None => bail!("{flag} {text:?}: expected KEY=VALUE"),
    }
}

pub(super) fn parse_mount(text: &str) -> anyhow::Result<proto::JobMount> {
    let (managed, rest) = match text.strip_prefix("mount:") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let mut parts: Vec<&str> = rest.split(':').collect();
    let read_only = match parts.last() {
        Some(&"ro") => {
            parts.pop();
            true
        }
        Some(&"rw") => {
            parts.pop();
            false
        }
        _ => false,
    };
    let [source, target] = parts.as_slice() else {
        bail!("--mount {text:?}: expected SOURCE:TARGET[:ro]");
    };
    Ok(proto::JobMount {
        source: Some(if managed {
            proto::job_mount::Source::Managed((*source).to_owned())
        } else {
            proto::job_mount::Source::HostPath((*source).to_owned())
        }),
        container_path: (*target).to_owned(),
        read_only,
    })
}

fn table(jobs: &[proto::Job]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:<10} {:>5} {:>4} {:<14} {:<24} REASON",
        "ID", "STATE", "SLOTS", "EXIT", "AGE", "COMMAND"
    );
    for job in jobs {
        let spec = job.spec.clone().unwrap_or_default();
        let mut command = spec.command.join(" ");
        if command.len() > 24 {
            command.truncate(21);
            command.push_str("...");
        }
        let _ = writeln!(
            out,
            "{:<34} {:<10} {:>5} {:>4} {:<14} {:<24} {}",
            job.id,
            states::job(job.state()),
            spec.slots,
            job.exit_code.map_or("-".into(), |c| c.to_string()),
            format::age(job.queued_at.as_ref()),
            command,
            job.reason
        );
    }
    out
}

/// One job, a field a line.
fn render_job(job: &proto::Job) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let spec = job.spec.clone().unwrap_or_default();
    let _ = writeln!(out, "job        {}", job.id);
    let _ = writeln!(
        out,
        "state      {}  ({})",
        states::job(job.state()),
        job.reason
    );
    if job.state() == proto::JobState::Queued {
        let _ = writeln!(out, "queue      position {}", job.queue_position);
    }
    let _ = writeln!(out, "image      {}", spec.image);
    if !job.image_digest.is_empty() {
        let _ = writeln!(out, "digest     {}", job.image_digest);
    }
    if let Some(pull) = &job.pull {
        let _ = writeln!(out, "pull       {}", super::images::pull_line(pull));
    }
    let _ = writeln!(out, "command    {}", spec.command.join(" "));
    let _ = writeln!(
        out,
        "slots      {}   gpus {}   priority {}",
        spec.slots, spec.gpus, spec.priority
    );
    if let Some(code) = job.exit_code {
        let _ = writeln!(
            out,
            "exit       {code}{}",
            if job.oom_killed { " (OOM killed)" } else { "" }
        );
    }
    let _ = writeln!(out, "queued     {}", format::age(job.queued_at.as_ref()));
    if job.running_at.is_some() {
        let _ = writeln!(out, "running    {}", format::age(job.running_at.as_ref()));
    }
    if job.finished_at.is_some() {
        let _ = writeln!(out, "finished   {}", format::age(job.finished_at.as_ref()));
    }
    if !job.container_id.is_empty() {
        let _ = writeln!(
            out,
            "container  {}",
            &job.container_id[..job.container_id.len().min(12)]
        );
    }
    out
}

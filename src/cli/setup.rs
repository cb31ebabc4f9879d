//! `instance-agent setup list|show|run|logs`: setup script runs and their logs.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::{format, output, states};
use crate::api::proto::{self, setup_service_client::SetupServiceClient};

/// `setup` subcommands.
#[derive(Debug, Subcommand)]
pub enum SetupCommand {
    /// List runs, newest first.
    List {
        /// Only runs of this kind (repeatable).
        #[arg(long, value_enum)]
        kind: Vec<KindArg>,
        /// At most this many runs.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show one run: state, exit code, message, log path and last lines.
    Show {
        /// The run id.
        id: String,
    },
    /// Run a script through the agent (logged, timed out, recorded).
    Run(RunArgs),
    /// Print a run's output (lossy UTF-8; the log file keeps the exact bytes).
    Logs {
        /// The run id.
        id: String,
        /// Keep printing until the run has ended.
        #[arg(short, long)]
        follow: bool,
        /// Prefix each line with the time the agent captured it.
        #[arg(short, long)]
        timestamps: bool,
    },
}

/// When a script runs.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    /// Once in the instance's life.
    Creation,
    /// At every agent start.
    Startup,
    /// On request.
    Adhoc,
}

impl KindArg {
    fn to_proto(self) -> proto::SetupKind {
        match self {
            KindArg::Creation => proto::SetupKind::Creation,
            KindArg::Startup => proto::SetupKind::Startup,
            KindArg::Adhoc => proto::SetupKind::Adhoc,
        }
    }
}

/// `setup run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Absolute path of a script on this instance.
    #[arg(value_name = "PATH", required_unless_present_any = ["command", "file"])]
    pub path: Option<PathBuf>,
    /// Inline script text instead of a path.
    #[arg(short = 'c', long, conflicts_with_all = ["path", "file"])]
    pub command: Option<String>,
    /// Send the content of this local file as an inline script.
    #[arg(long, value_name = "FILE", conflicts_with = "path")]
    pub file: Option<PathBuf>,
    /// When it runs.
    #[arg(long, value_enum, default_value_t = KindArg::Adhoc)]
    pub kind: KindArg,
    /// Timeout with suffix s, m, h or d [default: 15m].
    #[arg(long)]
    pub timeout: Option<String>,
    /// Run as this user instead of root.
    #[arg(long, value_name = "USER")]
    pub run_as: Option<String>,
    /// Working directory [default: the user's home].
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// Environment variable NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// A retry with the same key returns the same run.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Stream the output and exit with the script's exit status.
    #[arg(short, long)]
    pub follow: bool,
    /// Arguments for the script ($1, $2, ...), after `--`.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// Runs a `setup` subcommand.
pub async fn run(command: SetupCommand, channel: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = SetupServiceClient::new(channel);
    match command {
        SetupCommand::List { kind, limit } => {
            let reply = client
                .list_setup_runs(proto::ListSetupRunsRequest {
                    kinds: kind.iter().map(|k| k.to_proto() as i32).collect(),
                    limit,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::reply(json, &reply, |reply| render_list(&reply.runs))?;
            Ok(ExitCode::SUCCESS)
        }
        SetupCommand::Show { id } => {
            let run = client
                .get_setup_run(proto::GetSetupRunRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            output::reply(json, &run, render_run)?;
            Ok(ExitCode::SUCCESS)
        }
        SetupCommand::Run(args) => run_script(&mut client, args, json).await,
        SetupCommand::Logs {
            id,
            follow,
            timestamps,
        } => {
            print_logs(&mut client, &id, follow, timestamps, json).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(status.code()), status.message())
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::ResourceExhausted => "resource exhausted",
        tonic::Code::Unavailable => "unavailable",
        _ => "error",
    }
}

async fn run_script(
    client: &mut SetupServiceClient<Channel>,
    args: RunArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use proto::run_setup_script_request::Source;
    let source = match (args.path, args.command, args.file) {
        (Some(path), _, _) => Source::Path(path.to_string_lossy().into_owned()),
        (None, Some(text), _) => Source::Script(text),
        (None, None, Some(file)) => Source::Script(
            std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?,
        ),
        (None, None, None) => anyhow::bail!("give a script PATH, --command TEXT or --file FILE"),
    };
    let timeout_seconds = match &args.timeout {
        Some(text) => crate::units::parse_duration(text)
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
            .with_context(|| {
                format!("--timeout {text:?}: use a number with suffix s, m, h or d (e.g. 15m)")
            })?,
        None => 0,
    };
    let mut env = std::collections::HashMap::new();
    for pair in &args.env {
        let (name, value) = pair
            .split_once('=')
            .with_context(|| format!("--env {pair:?}: expected NAME=VALUE"))?;
        env.insert(name.to_owned(), value.to_owned());
    }
    let run = client
        .run_setup_script(proto::RunSetupScriptRequest {
            kind: args.kind.to_proto() as i32,
            source: Some(source),
            args: args.args,
            env,
            timeout_seconds,
            run_as: args.run_as.unwrap_or_default(),
            working_dir: args
                .workdir
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default(),
            idempotency_key: args.idempotency_key.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if !args.follow {
        output::reply(json, &run, |run| {
            format!("run {} {}\n", run.id, states::setup_run(run.state()))
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    if !json {
        eprintln!("run {} (log {})", run.id, run.log_path);
    }
    print_logs(client, &run.id, true, false, json).await?;
    let done = client
        .get_setup_run(proto::GetSetupRunRequest { id: run.id })
        .await
        .map_err(status_error)?
        .into_inner();
    // After the output, the outcome: as the last JSON line, or on stderr
    // so that stdout holds only the script's output.
    if json {
        output::json_line(&mut std::io::stdout(), &done)?;
    } else {
        eprintln!(
            "run {} {}: {}",
            done.id,
            states::setup_run(done.state()),
            done.message
        );
    }
    Ok(match (done.state(), done.exit_code) {
        (proto::SetupRunState::Succeeded, _) => ExitCode::SUCCESS,
        (_, Some(code)) if (1..=255).contains(&code) => ExitCode::from(code as u8),
        _ => ExitCode::FAILURE,
    })
}

async fn print_logs(
    client: &mut SetupServiceClient<Channel>,
    id: &str,
    follow: bool,
    timestamps: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut stream = client
        .stream_setup_logs(proto::StreamSetupLogsRequest {
            id: id.to_owned(),
            follow,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut at_line_start = true;
    let mut decoder = LossyUtf8::default();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(status_error)?;
        if json {
            output::json_line(&mut out, &chunk)?;
            continue;
        }
        let text = decoder.decode(chunk.stream, &chunk.data);
        if timestamps {
            let stamp = chunk
                .time
                .as_ref()
                .map(|t| {
                    let time = SystemTime::UNIX_EPOCH
                        + Duration::new(
                            u64::try_from(t.seconds).unwrap_or(0),
                            u32::try_from(t.nanos).unwrap_or(0),
                        );
                    chrono::DateTime::<chrono::Utc>::from(time)
                        .format("%H:%M:%S%.3f ")
                        .to_string()
                })
                .unwrap_or_default();
            for piece in text.split_inclusive('\n') {
                if at_line_start {
                    out.write_all(stamp.as_bytes())?;
                }
                out.write_all(piece.as_bytes())?;
                at_line_start = piece.ends_with('\n');
            }
        } else {
            out.write_all(text.as_bytes())?;
        }
        out.flush()?;
    }
    // A stream that ended inside a character shows it as U+FFFD.
    out.write_all(decoder.finish().as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Decodes each output stream's bytes lossily, carrying a character split
/// across two chunks over to the next chunk of the same stream, so that only
/// bytes that really are not UTF-8 show as U+FFFD.
#[derive(Debug, Default)]
struct LossyUtf8 {
    /// The unfinished character at the end of the last chunk, per stream.
    pending: std::collections::HashMap<i32, Vec<u8>>,
}

impl LossyUtf8 {
    fn decode(&mut self, stream: i32, data: &[u8]) -> String {
        let mut bytes = self.pending.remove(&stream).unwrap_or_default();
        bytes.extend_from_slice(data);
        let keep = incomplete_tail(&bytes);
        let tail = bytes.split_off(bytes.len() - keep);
        if !tail.is_empty() {
            self.pending.insert(stream, tail);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// What is still pending, lossily.
    fn finish(self) -> String {
        self.pending
            .values()
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
            .collect()
    }
}

/// How many bytes at the end of `bytes` begin a UTF-8 character that is not
/// complete yet (0 to 3).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead
        }
        let length = match byte {
            0xF0..=0xF7 => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        return if length > back { back } else { 0 };
    }
    0
}

fn duration_of(run: &proto::SetupRun) -> String {
    let (Some(start), Some(end)) = (&run.started_at, &run.finished_at) else {
        return "-".into();
    };
    let millis =
        (end.seconds - start.seconds) * 1000 + i64::from(end.nanos - start.nanos) / 1_000_000;
    format::duration(Duration::from_millis(u64::try_from(millis).unwrap_or(0)))
}

fn render_list(runs: &[proto::SetupRun]) -> String {
    use std::fmt::Write;
    if runs.is_empty() {
        return "no setup runs\n".into();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12}  {:<8}  {:<11}  {:>4}  {:<14}  {:<8}  SOURCE",
        "ID", "KIND", "STATE", "EXIT", "STARTED", "TOOK"
    );
    for run in runs {
        let exit = match (run.exit_code, run.signal) {
            (Some(code), _) => code.to_string(),
            (None, Some(signal)) => format!("s{signal}"),
            (None, None) => "-".into(),
        };
        let started = run
            .started_at
            .as_ref()
            .map_or_else(|| "-".into(), |t| format::age(Some(t)));
        let _ = writeln!(
            out,
            "{:<12}  {:<8}  {:<11}  {:>4}  {:<14}  {:<8}  {}",
            run.id,
            states::setup_kind(run.kind()),
            states::setup_run(run.state()),
            exit,
            started,
            duration_of(run),
            run.source
        );
    }
    out
}

fn render_run(run: &proto::SetupRun) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {} ({} script, attempt {})",
        run.id,
        states::setup_kind(run.kind()),
        run.attempt
    );
    let _ = writeln!(out, "  state     {}", states::setup_run(run.state()));
    if let Some(code) = run.exit_code {
        let _ = writeln!(out, "  exit      {code}");
    }
    if let Some(signal) = run.signal {
        let _ = writeln!(out, "  signal    {signal}");
    }
    let _ = writeln!(out, "  message   {}", run.message);
    let _ = writeln!(out, "  source    {}", run.source);
    let _ = writeln!(out, "  run as    {}", run.run_as);
    let _ = writeln!(
        out,
        "  started   {}   took {}",
        format::age(run.started_at.as_ref()),
        duration_of(run)
    );
    let _ = writeln!(out, "  log       {}", run.log_path);
    if !run.idempotency_key.is_empty() {
        let _ = writeln!(out, "  key       {}", run.idempotency_key);
    }
    if !run.log_tail.is_empty() {
        let _ = writeln!(out, "last lines");
        for line in &run.log_tail {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_across_chunks_is_shown_whole() {
        let text = "é€😀 done\n".as_bytes();
        // Every way of cutting it in two, on stdout (1), with stderr (2)
        // chunks in between that must not disturb the carry.
        for cut in 0..=text.len() {
            let mut decoder = LossyUtf8::default();
            let mut shown = decoder.decode(1, &text[..cut]);
            assert_eq!(decoder.decode(2, "ü".as_bytes()), "ü");
            shown.push_str(&decoder.decode(1, &text[cut..]));
            assert_eq!(shown, "é€😀 done\n", "cut at {cut}");
            assert_eq!(decoder.finish(), "");
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_still_show_as_replacement() {
        let mut decoder = LossyUtf8::default();
        assert_eq!(decoder.decode(1, b"a\xffb\n"), "a\u{FFFD}b\n");
        // A lead byte with nothing after it, then the stream ends.
        assert_eq!(decoder.decode(1, b"x\xe2\x82"), "x");
        assert_eq!(decoder.finish(), "\u{FFFD}");
    }
}

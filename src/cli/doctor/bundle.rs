//! The support bundle of `doctor --bundle FILE`: one tar.gz (mode 0600) with
//! everything support asks for first, and no secrets.
//!
//! Contents, under `instance-agent-bundle/`:
//! - `README.txt`: when, where and by which version it was made.
//! - `doctor.json`: the checks, as `doctor --json` prints them.
//! - `status.json`: GetStatus (protobuf JSON mapping).
//! - `events.json`: the event backlog (WatchEvents from sequence 0, read up
//!   to the status's last sequence without waiting for new events).
//! - `config.toml`: the config file with the values of secret-looking keys
//!   replaced.
//! - `agent.log`: the last 1000 lines of the agent's log (the journal under
//!   systemd, else `--log-file`).
//!
//! What could not be collected is replaced by a `<name>.txt` note saying why,
//! so the bundle is always written. Secrets: every value under a key that
//! looks secret (key, sas, token, password, secret, private, credential) is
//! replaced in the config, the status and the events, and so is every value
//! of an `env` table (jobs, setup scripts: the usual carrier of credentials,
//! under any name) and every setup `args` entry (visible in `ps`, yet a
//! credential is sometimes passed there); a config that does not parse is
//! left out entirely rather than risk quoting one. The file is created
//! exclusively and never through a symlink ([`create`]).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::agent::CALL_TIMEOUT;
use super::report::Report;
use crate::api::proto::{self, agent_service_client::AgentServiceClient};

/// What replaces a secret.
const REDACTED: &str = "<redacted>";
/// Lines of agent log kept.
const LOG_LINES: usize = 1000;
/// At most this much of a log file is read (its end).
const LOG_READ_BYTES: u64 = 8 << 20;
/// Top directory inside the archive.
const TOP: &str = "instance-agent-bundle";
/// How long to read the event backlog in total.
const EVENTS_TIMEOUT: Duration = Duration::from_secs(3);
/// Once this long passes without an event, the backlog is taken as drained
/// (only used when the status did not say how far it goes).
const EVENTS_IDLE: Duration = Duration::from_millis(300);

/// What the bundle is made from.
pub struct Inputs<'a> {
    /// The checks.
    pub report: &'a Report,
    /// A channel to the agent, when it answered.
    pub agent_channel: Option<Channel>,
    /// Its status, or why there is none.
    pub status: Result<&'a proto::GetStatusResponse, &'a str>,
    /// The config file to include.
    pub config_path: &'a Path,
    /// The agent's log file, when given.
    pub log_file: Option<&'a Path>,
    /// Whether the journal holds the agent's logs.
    pub under_systemd: bool,
}

/// Creates the bundle's file at `path`, mode 0600, with
/// `O_CREAT|O_EXCL|O_NOFOLLOW`: an existing file is refused, and so is a
/// symlink planted at the path (doctor often runs as root, the path may be
/// in a directory others can write). With `force` an existing entry is
/// unlinked first (a symlink itself, never its target) and the exclusive
/// create tried once more, so a name planted again in between still fails.
/// Done before the checks run, so that a refused path costs nothing.
pub fn create(path: &Path, force: bool) -> anyhow::Result<std::fs::File> {
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(path)
    };
    match open() {
        Ok(file) => Ok(file),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && force => {
            std::fs::remove_file(path).with_context(|| {
                format!("--force: cannot remove the existing {}", path.display())
            })?;
            open().with_context(|| format!("cannot create the bundle {}", path.display()))
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => anyhow::bail!(
            "the bundle {} already exists (a file or a link); choose a new name, or pass \
             --force to replace it",
            path.display()
        ),
        Err(error) => {
            Err(error).with_context(|| format!("cannot create the bundle {}", path.display()))
        }
    }
}

/// Writes the bundle into `file` (made by [`create`] at `path`); returns
/// the names of the entries.
pub async fn write(
    file: std::fs::File,
    path: &Path,
    inputs: Inputs<'_>,
) -> anyhow::Result<Vec<String>> {
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    entries.push(("README.txt".into(), readme(&inputs).into_bytes()));

    let mut report = serde_json::to_value(inputs.report)?;
    withhold_config_quotes(&mut report, inputs.report);
    entries.push(("doctor.json".into(), pretty(&report)?));

    match inputs.status {
        Ok(status) => {
            let mut value = serde_json::to_value(status)?;
            redact_json(&mut value);
            entries.push(("status.json".into(), pretty(&value)?));
        }
        Err(why) => entries.push(("status.txt".into(), note(&format!("no status: {why}")))),
    }

    match &inputs.agent_channel {
        Some(channel) => {
            let until = inputs.status.ok().map(|s| s.last_event_sequence);
            match recent_events(channel.clone(), until).await {
                Ok(mut events) => {
                    events.iter_mut().for_each(redact_json);
                    entries.push((
                        "events.json".into(),
                        pretty(&serde_json::Value::Array(events))?,
                    ));
                }
                Err(why) => entries.push(("events.txt".into(), note(&why))),
            }
        }
        None => entries.push((
            "events.txt".into(),
            note("no events: the agent is not reachable"),
        )),
    }

    match redacted_config(inputs.config_path) {
        Ok(text) => entries.push(("config.toml".into(), text.into_bytes())),
        Err(why) => entries.push(("config.txt".into(), note(&why))),
    }

    match agent_log(inputs.under_systemd, inputs.log_file).await {
        Ok(text) => entries.push(("agent.log".into(), text.into_bytes())),
        Err(why) => entries.push(("agent-log.txt".into(), note(&why))),
    }

    write_archive(file, path, &entries)?;
    Ok(entries.into_iter().map(|(name, _)| name).collect())
}

fn note(text: &str) -> Vec<u8> {
    format!("{text}\n").into_bytes()
}

fn pretty(value: &serde_json::Value) -> anyhow::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn readme(inputs: &Inputs<'_>) -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seconds = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "instance-agent support bundle\n\
         made by `instance-agent doctor --bundle` {} on host {host} at {seconds} (seconds since 1970, UTC)\n\
         config: {}\n\
         result of the checks: {:?}\n\n\
         doctor.json  the checks, as `doctor --json` prints them\n\
         status.json  GetStatus\n\
         events.json  the agent's event backlog (WatchEvents since 0)\n\
         config.toml  the config file, secret-looking values replaced by {REDACTED}\n\
         agent.log    the agent's last {LOG_LINES} log lines\n\
         A <name>.txt file instead of one of these says why it could not be collected.\n\
         Environment values (jobs, setup scripts), setup arguments and secret-looking fields are replaced by {REDACTED}.\n",
        env!("CARGO_PKG_VERSION"),
        inputs.config_path.display(),
        inputs.report.result,
    )
}

/// A config check's message may quote the file (a parse error shows the
/// offending text); the bundle keeps only that it failed.
fn withhold_config_quotes(report_json: &mut serde_json::Value, report: &Report) {
    let Some(checks) = report_json.get_mut("checks").and_then(|c| c.as_array_mut()) else {
        return;
    };
    for (json, check) in checks.iter_mut().zip(&report.checks) {
        if check.quotes_config {
            json["message"] = serde_json::Value::String(
                "the config file is not valid (message left out: it may quote the file)".into(),
            );
        }
    }
}

/// Reads the backlog: WatchEvents from sequence 0 until the event numbered
/// `until` (the status's last sequence), or until the stream is idle.
async fn recent_events(
    channel: Channel,
    until: Option<u64>,
) -> Result<Vec<serde_json::Value>, String> {
    let mut events = Vec::new();
    if until == Some(0) {
        return Ok(events);
    }
    let request = proto::WatchEventsRequest { since: Some(0) };
    let mut stream = tokio::time::timeout(
        CALL_TIMEOUT,
        AgentServiceClient::new(channel).watch_events(request),
    )
    .await
    .map_err(|_| format!("WatchEvents did not answer within {CALL_TIMEOUT:?}"))?
    .map_err(|e| format!("WatchEvents failed: {:?}: {}", e.code(), e.message()))?
    .into_inner();
    let deadline = tokio::time::Instant::now() + EVENTS_TIMEOUT;
    loop {
        let wait = match until {
            Some(_) => deadline.saturating_duration_since(tokio::time::Instant::now()),
            None => {
                EVENTS_IDLE.min(deadline.saturating_duration_since(tokio::time::Instant::now()))
            }
        };
        let event = match tokio::time::timeout(wait, stream.next()).await {
            Ok(Some(Ok(event))) => event,
            Ok(Some(Err(e))) => {
                return Err(format!(
                    "WatchEvents broke off after {} events: {:?}: {}",
                    events.len(),
                    e.code(),
                    e.message()
                ));
            }
            Ok(None) | Err(_) => break,
        };
        let sequence = event.sequence;
        events.push(serde_json::to_value(&event).map_err(|e| e.to_string())?);
        if until.is_some_and(|last| sequence >= last) {
            break;
        }
    }
    Ok(events)
}

/// Whether a field or key name suggests its value is a credential.
fn looks_secret(name: &str) -> bool {
    const WORDS: [&str; 9] = [
        "key",
        "sas",
        "token",
        "password",
        "passwd",
        "secret",
        "private",
        "credential",
        // A job's registry_auth (`registryAuth` in JSON).
        "registryauth",
    ];
    let name = name.to_ascii_lowercase();
    WORDS.iter().any(|w| name.contains(w))
}

/// Replaces secret-looking values in a JSON document: values of secret-looking
/// keys, every environment value, every setup argument, and strings that
/// carry a SAS signature.
fn redact_json(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                if looks_secret(key) {
                    blank_json(inner);
                } else if key == "env" {
                    if let Value::Object(env) = inner {
                        env.values_mut().for_each(blank_json);
                    }
                } else if key == "args" {
                    // Setup script arguments: a credential passed on a
                    // command line is still one.
                    blank_json(inner);
                } else {
                    redact_json(inner);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_json),
        Value::String(text) if carries_signature(text) => *text = REDACTED.into(),
        _ => {}
    }
}

fn blank_json(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        // An empty value says "not set", which is worth keeping.
        Value::String(s) if s.is_empty() => {}
        Value::Null | Value::Bool(_) => {}
        Value::Array(items) => items.iter_mut().for_each(blank_json),
        Value::Object(map) => map.values_mut().for_each(blank_json),
        other => *other = Value::String(REDACTED.into()),
    }
}

/// A URL with a SAS token (`sig=`) holds the credential itself.
fn carries_signature(text: &str) -> bool {
    text.to_ascii_lowercase().contains("sig=")
}

/// The config file with secret-looking values replaced; comments are lost
/// because the file is rewritten from its parsed form, which is what makes
/// multi-line strings safe to redact.
fn redacted_config(path: &Path) -> Result<String, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{} does not exist: the agent runs on defaults (`instance-agent config default`)",
                path.display()
            ));
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut table: toml::Table = text.parse().map_err(|_| {
        format!(
            "{} is not valid TOML; left out, since its text may hold secrets",
            path.display()
        )
    })?;
    redact_toml(&mut table);
    let body =
        toml::to_string(&table).map_err(|e| format!("cannot re-serialise the config: {e}"))?;
    Ok(format!(
        "# {} with secret-looking values replaced by {REDACTED} (comments dropped)\n{body}",
        path.display()
    ))
}

fn redact_toml(table: &mut toml::Table) {
    for (key, value) in table.iter_mut() {
        // `env` tables and `args` lists (setup scripts' environment and
        // arguments) carry credentials under any name.
        if looks_secret(key) || key == "env" || key == "args" {
            blank_toml(value);
        } else {
            match value {
                toml::Value::Table(inner) => redact_toml(inner),
                toml::Value::Array(items) => {
                    for item in items {
                        match item {
                            toml::Value::Table(inner) => redact_toml(inner),
                            toml::Value::String(s) if carries_signature(s) => {
                                *s = REDACTED.into();
                            }
                            _ => {}
                        }
                    }
                }
                toml::Value::String(s) if carries_signature(s) => *s = REDACTED.into(),
                _ => {}
            }
        }
    }
}

fn blank_toml(value: &mut toml::Value) {
    match value {
        toml::Value::String(s) if s.is_empty() => {}
        toml::Value::Boolean(_) => {}
        toml::Value::Array(items) => items.iter_mut().for_each(blank_toml),
        toml::Value::Table(inner) => inner.iter_mut().for_each(|(_, v)| blank_toml(v)),
        other => *other = toml::Value::String(REDACTED.into()),
    }
}

/// The agent's last log lines: the journal under systemd, else the log file.
async fn agent_log(under_systemd: bool, log_file: Option<&Path>) -> Result<String, String> {
    if under_systemd {
        let lines = LOG_LINES.to_string();
        let output = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new("journalctl")
                .args(["-u", "instance-agent.service", "-n", &lines])
                .args(["--no-pager", "-o", "short-iso-precise"])
                .output(),
        )
        .await
        .map_err(|_| "journalctl did not finish within 20 s".to_owned())?
        .map_err(|e| format!("cannot run journalctl: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "journalctl failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let Some(path) = log_file else {
        return Err("no agent logs: not under systemd, and no --log-file was given".to_owned());
    };
    log_tail(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The last [`LOG_LINES`] lines of a file, reading at most its last
/// [`LOG_READ_BYTES`].
fn log_tail(path: &Path) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    let start = length.saturating_sub(LOG_READ_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    // When reading from the middle of the file the first line is partial.
    let skip_partial = usize::from(start > 0);
    let first = lines.len().saturating_sub(LOG_LINES).max(skip_partial);
    let mut tail = lines.get(first..).unwrap_or_default().join("\n");
    tail.push('\n');
    Ok(tail)
}

fn write_archive(
    file: std::fs::File,
    path: &Path,
    entries: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let mtime = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let gzip = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut archive = tar::Builder::new(gzip);
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        archive
            .append_data(&mut header, format!("{TOP}/{name}"), data.as_slice())
            .with_context(|| format!("cannot write {name} into {}", path.display()))?;
    }
    let mut file = archive
        .into_inner()
        .and_then(flate2::write::GzEncoder::finish)
        .with_context(|| format!("cannot finish {}", path.display()))?;
    file.flush()?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests;

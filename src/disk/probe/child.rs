//! The probe helper: the agent's binary re-executed with [`PROBE_ARG`] to
//! look at paths that users or remote storage control, so that a call stuck
//! in a hung filesystem is stuck here and never in one of the agent's
//! threads (see [`super::helper`] for the agent's side).
//!
//! A small synchronous program. Commands (after [`PROBE_ARG`]):
//! - `sample (m|-) PATH ...`: `stat` + `statvfs` of each PATH (and, after
//!   `m`, where its filesystem is mounted), each in a thread of its own, so
//!   that one hung path does not hold the answers of the others; a
//!   [`Line::Sample`] per path as soon as it is known.
//! - `walk PATH LIMIT TIMEOUT_MS MAX_ENTRIES (UID|-)`: the `disk --top`
//!   walk of `disk::top::walk`, [`Line::Progress`] as it goes and one
//!   [`Line::Done`].
//!
//! It dies with the agent (`PR_SET_PDEATHSIG`), writes nothing but its lines
//! to stdout, and exits 0 once everything is answered (64 on a bad command
//! line). It changes nothing anywhere.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::wire::{Line, WireError};
use super::{Sampled, SystemProbe};
use crate::disk::top::{TopRequest, walk};

/// The hidden first argument that makes the binary the probe helper.
pub const PROBE_ARG: &str = "__probe-helper";

/// sysexits.h: command line usage error.
const EX_USAGE: u8 = 64;

/// Runs the helper; the process exits with the returned code.
pub fn main() -> ExitCode {
    // A helper outlives the agent only while the kernel holds it in a call.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let args: Vec<OsString> = std::env::args_os().skip(2).collect();
    let command = args.first().and_then(|a| a.to_str()).unwrap_or_default();
    let outcome = match command {
        "sample" => sample(&args[1..]),
        "walk" => walk_command(&args[1..]),
        _ => Err(format!("unknown command {command:?}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("instance-agent probe helper: {problem}");
            ExitCode::from(EX_USAGE)
        }
    }
}

/// Writes one line; a closed pipe means the agent stopped listening.
fn emit(line: &Line) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", line.encode())
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write to the agent: {e}"))
}

fn sample(args: &[OsString]) -> Result<(), String> {
    if !args.len().is_multiple_of(2) {
        return Err("sample takes pairs of (m|-) PATH".into());
    }
    let (tx, rx) = std::sync::mpsc::channel::<(usize, std::io::Result<Sampled>)>();
    let mut pending = 0;
    for (index, pair) in args.chunks(2).enumerate() {
        let want_mount = pair[0] == "m";
        let path = PathBuf::from(&pair[1]);
        let tx = tx.clone();
        let spawned = std::thread::Builder::new().spawn(move || {
            let probe = SystemProbe;
            let outcome = super::sample_with_mount(&probe, &path, want_mount);
            let _ = tx.send((index, outcome));
        });
        match spawned {
            Ok(_) => pending += 1,
            Err(error) => emit(&Line::Sample {
                index,
                result: Err(WireError::from(&error)),
            })?,
        }
    }
    drop(tx);
    for _ in 0..pending {
        let Ok((index, outcome)) = rx.recv() else {
            break;
        };
        emit(&Line::Sample {
            index,
            result: outcome.as_ref().map(Into::into).map_err(WireError::from),
        })?;
    }
    Ok(())
}

fn walk_command(args: &[OsString]) -> Result<(), String> {
    let [path, limit, timeout_ms, max_entries, as_uid] = args else {
        return Err("walk takes PATH LIMIT TIMEOUT_MS MAX_ENTRIES (UID|-)".into());
    };
    let number = |what: &str, value: &OsString| {
        value
            .to_str()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("{what}: not a number"))
    };
    let as_uid = match as_uid.to_str() {
        Some("-") => None,
        _ => Some(
            u32::try_from(number("uid", as_uid)?).map_err(|_| "uid: out of range".to_owned())?,
        ),
    };
    let request = TopRequest {
        path: PathBuf::from(path),
        limit: usize::try_from(number("limit", limit)?).unwrap_or(usize::MAX),
        timeout: Duration::from_millis(number("timeout", timeout_ms)?),
        max_entries: number("max entries", max_entries)?,
        as_uid,
    };
    // The agent kills the helper to stop it; nothing else cancels a walk.
    let cancel = Arc::new(AtomicBool::new(false));
    let mut broken = None;
    let result = walk(&request, &cancel, |progress| {
        if broken.is_none()
            && let Err(e) = emit(&Line::from(&progress))
        {
            broken = Some(e);
        }
    });
    if let Some(e) = broken {
        return Err(e);
    }
    emit(&Line::Done {
        result: result.as_ref().map(Into::into).map_err(WireError::from),
    })
}

/// The helper's command line for a batch sample.
pub fn sample_args(paths: &[(PathBuf, bool)]) -> Vec<OsString> {
    let mut args = vec![OsString::from(PROBE_ARG), "sample".into()];
    for (path, want_mount) in paths {
        args.push(if *want_mount { "m" } else { "-" }.into());
        args.push(path.clone().into_os_string());
    }
    args
}

/// The helper's command line for a walk.
pub fn walk_args(request: &TopRequest) -> Vec<OsString> {
    vec![
        PROBE_ARG.into(),
        "walk".into(),
        request.path.clone().into_os_string(),
        request.limit.to_string().into(),
        request.timeout.as_millis().to_string().into(),
        request.max_entries.to_string().into(),
        request
            .as_uid
            .map_or_else(|| "-".to_owned(), |uid| uid.to_string())
            .into(),
    ]
}

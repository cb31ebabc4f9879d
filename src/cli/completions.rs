//! `instance-agent completions SHELL`: shell completion scripts from the clap
//! definition, so they never drift from the real flags.

use std::io::Write;
use std::process::ExitCode;

use clap::CommandFactory;

use super::Cli;

/// sysexits.h: command line usage error.
const EX_USAGE: u8 = 64;

/// Prints the completion script for `shell` to stdout. A reader that stops
/// early (`completions bash | head`) ends the command quietly.
pub fn run(shell: clap_complete::Shell, json: bool) -> ExitCode {
    if json {
        eprintln!(
            "instance-agent: --json does not apply to `completions`: it prints a shell script"
        );
        return ExitCode::from(EX_USAGE);
    }
    match write_script(shell, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("instance-agent: cannot write the completion script: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Renders the script in memory first: `clap_complete::generate` panics on a
/// write error, which a closed pipe is.
fn write_script(shell: clap_complete::Shell, out: &mut impl Write) -> std::io::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "instance-agent", &mut script);
    out.write_all(&script)?;
    out.flush()
}

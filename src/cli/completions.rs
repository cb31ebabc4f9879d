//! `instance-agent completions SHELL`: shell completion scripts from the clap
//! definition, so they never drift from the real flags.

use clap::CommandFactory;

use super::Cli;

/// Prints the completion script for `shell` to stdout.
pub fn print(shell: clap_complete::Shell) {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "instance-agent",
        &mut std::io::stdout(),
    );
}

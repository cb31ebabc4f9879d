//! `instance-agent config default|check`: local, no daemon needed.

use std::process::ExitCode;

use super::ConfigCommand;
use crate::config::{Config, DEFAULT_CONFIG_TOML};

/// sysexits.h: configuration error.
const EX_CONFIG: u8 = 78;

/// Runs a config subcommand.
pub fn run(command: ConfigCommand) -> ExitCode {
    match command {
        ConfigCommand::Default => {
            print!("{DEFAULT_CONFIG_TOML}");
            ExitCode::SUCCESS
        }
        ConfigCommand::Check { file } => match Config::load(&file, true) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("instance-agent: {error}");
                ExitCode::from(EX_CONFIG)
            }
        },
    }
}

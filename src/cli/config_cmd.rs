//! `instance-agent config default|check`: local, no daemon needed.

use std::process::ExitCode;

use super::{ConfigCommand, output};
use crate::config::{Config, DEFAULT_CONFIG_TOML};

/// sysexits.h: configuration error.
const EX_CONFIG: u8 = 78;

/// Runs a config subcommand. With `json`, `default` prints the default
/// config as one JSON object (no comments: the TOML form has them) and
/// `check` prints `{"file", "ok"[, "error"]}` on stdout; exit codes are the
/// same either way.
pub fn run(command: ConfigCommand, json: bool) -> ExitCode {
    match command {
        ConfigCommand::Default => {
            match output::reply(json, &Config::default(), |_| DEFAULT_CONFIG_TOML.to_owned()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("instance-agent: cannot render the default config as JSON: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        ConfigCommand::Check { file } => {
            let result = Config::load(&file, true);
            if json {
                println!("{}", check_report(&file, &result));
            } else {
                match &result {
                    Ok(_) => println!("{}: ok", file.display()),
                    Err(error) => eprintln!("instance-agent: {error}"),
                }
            }
            if result.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EX_CONFIG)
            }
        }
    }
}

/// The `config check --json` object.
fn check_report(
    file: &std::path::Path,
    result: &Result<Config, crate::config::ConfigError>,
) -> serde_json::Value {
    match result {
        Ok(_) => serde_json::json!({ "file": file, "ok": true }),
        Err(error) => serde_json::json!({ "file": file, "ok": false, "error": error.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_report_says_ok_or_the_error() {
        let file = std::path::Path::new("/etc/x.toml");
        let ok = check_report(file, &Ok(Config::default()));
        assert_eq!(ok, serde_json::json!({"file": "/etc/x.toml", "ok": true}));
        let bad = check_report(file, &Config::parse("[jobs]\nslots_per_core = 0\n", file));
        assert_eq!(bad["ok"], false);
        assert!(
            bad["error"]
                .as_str()
                .is_some_and(|e| e.contains("jobs.slots_per_core")),
            "{bad}"
        );
    }
}

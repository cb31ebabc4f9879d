//! How a pull's progress is shown, the same way by `images pull` and
//! `jobs submit --wait`: a progress bar (bytes, layers, phase) on stderr
//! when it is a terminal, else a plain line when the phase changes and at
//! most every few seconds meanwhile, so that a log stays readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::{format, states};
use crate::api::proto;

/// Least time between two plain progress lines of one phase.
const LINE_EVERY: Duration = Duration::from_secs(2);

/// One pull on the screen.
pub struct PullDisplay {
    bar: Option<ProgressBar>,
    last_line: Option<(Instant, i32)>,
}

impl PullDisplay {
    /// A bar on a terminal, plain lines otherwise.
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            last_line: None,
        }
    }

    /// Shows the pull as it is now.
    pub fn show(&mut self, pull: &proto::PullProgress) {
        let phase = states::pull_phase(pull.phase());
        let mut message = format!(
            "{}/{} layers, {}",
            pull.layers_done,
            pull.layers_total,
            phase.plain()
        );
        if !pull.reason.is_empty() {
            message = format!("{message}: {}", pull.reason);
        }
        match &self.bar {
            Some(bar) => {
                bar.set_prefix(pull.image.clone());
                bar.set_length(pull.bytes_total.max(pull.bytes_done));
                bar.set_position(pull.bytes_done);
                bar.set_message(message);
            }
            None => {
                let due = match self.last_line {
                    None => true,
                    Some((at, phase)) => phase != pull.phase || at.elapsed() >= LINE_EVERY,
                };
                if due {
                    self.last_line = Some((Instant::now(), pull.phase));
                    eprintln!(
                        "pulling {}: {} of {}, {message}",
                        pull.image,
                        format::bytes(pull.bytes_done),
                        format::bytes(pull.bytes_total)
                    );
                }
            }
        }
    }

    /// Ends the display with one last line.
    pub fn finish(self, line: &str) {
        match self.bar {
            Some(bar) => bar.finish_with_message(line.to_owned()),
            None => eprintln!("{line}"),
        }
    }
}

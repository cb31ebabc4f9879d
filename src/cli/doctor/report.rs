//! What `doctor` prints and how it exits: each check's verdict, the report
//! (`--json` prints it as is; the bundle keeps it as `doctor.json`), the
//! human rendering, and the exit status of the worst verdict.

use serde::Serialize;

/// The outcome of one check, from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    /// Fine.
    Pass,
    /// Works, but needs attention or could not be checked.
    Warn,
    /// Broken.
    Fail,
}

impl Verdict {
    /// As printed at the start of a check's line.
    pub(super) fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }

    /// The exit status when this is the worst verdict.
    pub(super) fn exit_code(self) -> u8 {
        match self {
            Verdict::Pass => 0,
            Verdict::Warn => 1,
            Verdict::Fail => 2,
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked: daemon, config, docker, fuse, blobfuse2, disk,
    /// mounts, setup, store, socket, systemd.
    pub name: &'static str,
    /// The outcome.
    pub result: Verdict,
    /// What was found.
    pub message: String,
    /// One line saying what to do; empty on PASS.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
    /// The message may quote the config file (a parse error shows the
    /// offending text), so the bundle leaves it out.
    #[serde(skip)]
    pub(super) quotes_config: bool,
}

impl Check {
    /// A check that passed.
    pub(super) fn pass(name: &'static str, message: impl Into<String>) -> Self {
        Self::new(name, Verdict::Pass, message, "")
    }

    /// A check that needs attention, with its fix.
    pub(super) fn warn(
        name: &'static str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::new(name, Verdict::Warn, message, fix)
    }

    /// A check that failed, with its fix.
    pub(super) fn fail(
        name: &'static str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::new(name, Verdict::Fail, message, fix)
    }

    fn new(
        name: &'static str,
        result: Verdict,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name,
            result,
            message: message.into(),
            fix: fix.into(),
            quotes_config: false,
        }
    }
}

/// The JSON document `--json` prints (and the bundle's `doctor.json`).
#[derive(Debug, Serialize)]
pub struct Report {
    /// The worst result; it decides the exit status.
    pub result: Verdict,
    /// Checks in the order they ran.
    pub checks: Vec<Check>,
}

impl Report {
    /// The report of `checks`, in the order they ran; the worst decides.
    pub(super) fn new(checks: Vec<Check>) -> Self {
        Self {
            result: checks
                .iter()
                .map(|c| c.result)
                .max()
                .unwrap_or(Verdict::Pass),
            checks,
        }
    }
}

/// One line per check, its fix below a problem, then the counts.
pub(super) fn render(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let width = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0);
    for check in &report.checks {
        let _ = writeln!(
            out,
            "{}  {:<width$}  {}",
            check.result.label(),
            check.name,
            check.message
        );
        if !check.fix.is_empty() {
            let _ = writeln!(out, "      {:<width$}  fix: {}", "", check.fix);
        }
    }
    let count = |v| report.checks.iter().filter(|c| c.result == v).count();
    let _ = writeln!(
        out,
        "doctor: {} passed, {} warnings, {} failed",
        count(Verdict::Pass),
        count(Verdict::Warn),
        count(Verdict::Fail)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_result_decides_the_exit_status() {
        assert!(Verdict::Fail > Verdict::Warn && Verdict::Warn > Verdict::Pass);
        assert_eq!(Verdict::Pass.exit_code(), 0);
        assert_eq!(Verdict::Warn.exit_code(), 1);
        assert_eq!(Verdict::Fail.exit_code(), 2);
    }

    #[test]
    fn render_prints_the_fix_under_a_problem_only() {
        let report = Report {
            result: Verdict::Warn,
            checks: vec![
                Check::pass("daemon", "answers"),
                Check::warn("blobfuse2", "not found", "install it"),
            ],
        };
        let text = render(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "PASS  daemon     answers");
        assert_eq!(lines[1], "WARN  blobfuse2  not found");
        assert_eq!(lines[2], "                 fix: install it");
        assert_eq!(lines[3], "doctor: 1 passed, 1 warnings, 0 failed");
    }
}

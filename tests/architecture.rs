//! The architecture rules of `src/` (issue 12) hold: no import loop between
//! files, no domain folder importing the top-level config, no file over 800
//! lines. The rules and how they are read are in
//! `scripts/check-architecture.py`, which this runs.

use std::process::Command;

#[test]
fn src_has_no_import_loop_no_config_back_edge_and_no_overlong_file() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{repo}/scripts/check-architecture.py"))
        .arg(repo)
        .output()
        .expect("python3 runs (scripts/prepare-host.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "architecture rules broken:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 problem(s)"), "{stdout}");
}

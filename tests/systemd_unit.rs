//! The shipped unit passes `systemd-analyze verify` with no warnings.

#[test]
fn unit_verifies_cleanly() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed; skipping");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/systemd-check.sh");
    let out = std::process::Command::new(script)
        .output()
        .expect("run systemd-check.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verify: clean"), "{stdout}");
}

use super::*;

#[test]
fn secret_keys_and_job_env_are_redacted_in_json() {
    let mut value = serde_json::json!({
        "job": {"spec": {"env": {"HOME": "/root", "X": "hunter2"}, "command": ["true"],
                         "registryAuth": {"username": "robot", "password": "hunter2-registry"}}},
        "auth": {"sasToken": "sv=1&sig=abc", "accountKey": "k", "clientId": "id"},
        "endpoint": "https://a.blob.core.windows.net/?sv=2020&sig=abc",
        "keepContainers": true,
    });
    redact_json(&mut value);
    let text = value.to_string();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!text.contains("sig=abc"), "{text}");
    assert!(!text.contains("\"k\""), "{text}");
    assert_eq!(value["job"]["spec"]["env"]["HOME"], REDACTED);
    assert_eq!(value["job"]["spec"]["command"][0], "true");
    assert_eq!(value["auth"]["clientId"], "id");
    assert_eq!(value["keepContainers"], true);
}

#[test]
fn secret_keys_are_redacted_in_toml_at_any_depth() {
    let mut table: toml::Table = r#"
        [control_plane]
        listen = "127.0.0.1:7000"
        tls_private_key = "/etc/instance-agent/key.pem"
        [[mounts.mount]]
        name = "data"
        account_key = """
        multi
        line"""
        [[setup.scripts]]
        path = "/opt/setup.sh"
        args = ["--token", "hunter2-arg", ""]
        env = { CONNECTION_STRING = "hunter2-env" }
        [extra]
        api_token = "hunter2"
        password = 1234
        "#
    .parse()
    .expect("toml");
    redact_toml(&mut table);
    let text = toml::to_string(&table).expect("serialise");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!text.contains("multi"), "{text}");
    assert!(!text.contains("1234"), "{text}");
    assert!(!text.contains("key.pem"), "{text}");
    assert!(text.contains("127.0.0.1:7000"), "{text}");
    assert!(text.contains("name = \"data\""), "{text}");
    assert!(text.contains("/opt/setup.sh"), "{text}");
    let args = table["setup"]["scripts"][0]["args"]
        .as_array()
        .expect("args");
    assert_eq!(
        args.iter().map(|a| a.as_str().unwrap()).collect::<Vec<_>>(),
        [REDACTED, REDACTED, ""],
        "every argument replaced, their count and empty ones kept"
    );
}

#[test]
fn setup_args_are_redacted_in_json() {
    let mut value = serde_json::json!({
        "run": {"args": ["--password", "hunter2-arg"], "source": "/opt/s.sh"},
    });
    redact_json(&mut value);
    assert_eq!(
        value["run"]["args"],
        serde_json::json!([REDACTED, REDACTED])
    );
    assert_eq!(value["run"]["source"], "/opt/s.sh");
}

#[test]
fn the_bundle_file_is_created_exclusively_and_never_through_a_link() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bundle.tgz");
    drop(create(&path, false).expect("a new file"));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    std::fs::write(&path, b"kept").unwrap();
    let error = create(&path, false)
        .expect_err("an existing file")
        .to_string();
    assert!(
        error.contains("already exists") && error.contains("--force"),
        "{error}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"kept");
    drop(create(&path, true).expect("--force replaces it"));
    assert_eq!(std::fs::read(&path).unwrap(), b"");

    // A link planted at the path, to a file or to nowhere: refused, and
    // with --force the link is replaced, its target never written.
    let target = dir.path().join("target");
    std::fs::write(&target, b"victim").unwrap();
    let link = dir.path().join("link.tgz");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    create(&link, false).expect_err("a link to a file");
    let dangling = dir.path().join("dangling.tgz");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    create(&dangling, false).expect_err("a dangling link");
    assert!(!dir.path().join("nowhere").exists());
    drop(create(&link, true).expect("--force"));
    assert!(
        !std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"victim");
}

#[test]
fn a_config_that_does_not_parse_is_left_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "account_key = \"hunter2\n").expect("write");
    let why = redacted_config(&path).expect_err("must not parse");
    assert!(!why.contains("hunter2"), "{why}");
}

#[test]
fn log_tail_keeps_the_last_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.log");
    let text: String = (0..1500).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&path, text).expect("write");
    let tail = log_tail(&path).expect("tail");
    let lines: Vec<&str> = tail.lines().collect();
    assert_eq!(lines.len(), LOG_LINES);
    assert_eq!(lines[0], "line 500");
    assert_eq!(lines[LOG_LINES - 1], "line 1499");
}

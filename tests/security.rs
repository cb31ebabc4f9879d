//! Security against the real binary: mutual TLS on the control-plane
//! listener (certificates made here with rcgen), roles on the Unix socket
//! for real unprivileged users (created here, removed on drop), every limit
//! hit once, and no secret in the agent's log.

mod common;

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::certs::{Ca, write_file};
use common::users::userdb;
use common::{Agent, binary, uuid_like};
use instance_agent::api::proto::{
    self, agent_service_client::AgentServiceClient, disk_service_client::DiskServiceClient,
    job_service_client::JobServiceClient, mount_service_client::MountServiceClient,
    setup_service_client::SetupServiceClient,
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const IMAGE: &str = "instance-agent/busybox:test";

/// Fails if any of `secrets` appears in `log`.
fn assert_no_secrets(log: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !log.contains(secret),
            "a secret ({}…) appears in the agent's log:\n{log}",
            &secret[..secret.len().min(12)]
        );
    }
}

/// Waits until `check` holds for the agent's log.
fn wait_log(agent: &Agent, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = agent.log();
        if check(&log) {
            return log;
        }
        assert!(Instant::now() < deadline, "{what} never logged:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// --- certificates --------------------------------------------------------

/// Waits until the agent's TCP listener accepts (it is bound just after
/// the Unix socket, which is what `start` waits for).
fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The base64 body lines of a PEM key: what a leak would show. Registered
/// as test secrets for the suite-wide sweep of captured logs.
#[track_caller]
fn key_lines(pem: &str) -> Vec<&str> {
    let lines: Vec<&str> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 20)
        .collect();
    common::register_secrets(&lines);
    lines
}

/// Calls GetStatus over TLS on 127.0.0.1; `Err` carries the failure.
async fn tls_status(
    port: u16,
    server_ca: &str,
    identity: Option<&(String, String)>,
) -> Result<proto::GetStatusResponse, String> {
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    common::control_plane::tls_get_status(target, server_ca, identity, Duration::from_secs(10))
        .await
}

/// What a TLS 1.1-only client gets: `Some(true)` when it is refused,
/// `Some(false)` when it gets through, `None` when no tool can speak 1.1.
fn tls11_client_refused(port: u16, ca: &Path, cert: &Path, key: &Path) -> Option<bool> {
    let connect = format!("127.0.0.1:{port}");
    // SECLEVEL=0: OpenSSL 3 would otherwise refuse to offer TLS 1.1 at all,
    // and the test would prove nothing about the agent.
    let s_client = |version: &str| {
        Command::new("openssl")
            .args(["s_client", "-connect", &connect, version])
            .args(["-cipher", "DEFAULT:@SECLEVEL=0", "-servername", "localhost"])
            .arg("-CAfile")
            .arg(ca)
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(std::process::Stdio::null())
            .output()
    };
    if let Ok(old) = s_client("-tls1_1") {
        let control = s_client("-tls1_2").expect("openssl ran once already");
        let control_out = String::from_utf8_lossy(&control.stdout);
        assert!(
            control_out.contains("TLSv1.2"),
            "openssl could not reach the agent with TLS 1.2 either, so the TLS 1.1 check proves nothing:\n{control_out}\n{}",
            String::from_utf8_lossy(&control.stderr)
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&old.stdout),
            String::from_utf8_lossy(&old.stderr)
        );
        // A session is established when openssl reports a cipher; a refused
        // handshake shows "New, (NONE), Cipher is (NONE)" and an alert.
        let negotiated = text
            .lines()
            .any(|l| l.starts_with("New, ") && !l.contains("(NONE)"));
        return Some(!negotiated && !old.status.success());
    }
    let script = r#"
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1
ctx.maximum_version = ssl.TLSVersion.TLSv1_1
ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
ctx.load_cert_chain(sys.argv[3], sys.argv[4])
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            print("NEGOTIATED", tls.version())
except ssl.SSLError as e:
    print("REFUSED", e)
"#;
    let out = Command::new("python3")
        .args(["-c", script, "127.0.0.1", &port.to_string()])
        .arg(cert)
        .arg(key)
        .output()
        .ok()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.contains("REFUSED") {
        Some(true)
    } else if stdout.contains("NEGOTIATED") {
        Some(false)
    } else {
        None
    }
}

#[tokio::test]
async fn control_plane_needs_a_verified_allowed_client_certificate() {
    let pki = tempfile::tempdir().expect("tempdir");
    let server_ca = Ca::new("agent server CA");
    let client_ca = Ca::new("control plane CA");
    let other_ca = Ca::new("some other CA");
    let server = server_ca.leaf("agent", &["localhost"], false, false);
    let good = client_ca.leaf("control-plane", &["cp.example"], true, false);
    let by_san = client_ca.leaf("something-else", &["cp-2.example"], true, false);
    let foreign = other_ca.leaf("control-plane", &["cp.example"], true, false);
    let expired = client_ca.leaf("control-plane", &["cp.example"], true, true);
    let intruder = client_ca.leaf("intruder", &["intruder.example"], true, false);
    for (_, key) in [&server, &good, &by_san, &foreign, &expired, &intruder] {
        key_lines(key);
    }

    let cert_path = write_file(pki.path(), "server.pem", &server.0, 0o644);
    let key_path = write_file(pki.path(), "server.key", &server.1, 0o600);
    let ca_path = write_file(pki.path(), "client-ca.pem", &client_ca.pem(), 0o644);
    let server_ca_path = write_file(pki.path(), "server-ca.pem", &server_ca.pem(), 0o644);
    let good_cert = write_file(pki.path(), "good.pem", &good.0, 0o644);
    let good_key = write_file(pki.path(), "good.key", &good.1, 0o600);

    let port = free_port();
    let agent = Agent::builder()
        .config(&format!(
            "[control_plane]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = {cert_path:?}\n\
             tls_key = {key_path:?}\nclient_ca = {ca_path:?}\n\
             allowed_client_names = [\"control-plane\", \"cp-2.example\"]\n"
        ))
        .start();
    let server_ca_pem = server_ca.pem();
    wait_listening(port);

    let status = tls_status(port, &server_ca_pem, Some(&good))
        .await
        .expect("a good certificate works");
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    tls_status(port, &server_ca_pem, Some(&by_san))
        .await
        .expect("a DNS SAN in allowed_client_names works");

    // Each refusal fails the handshake with the TLS alert that says why; in
    // TLS 1.3 the client has finished its half by then, so the alert is
    // what its first call reads.
    for (case, identity, alert) in [
        ("no client certificate", None, "CertificateRequired"),
        ("another CA", Some(&foreign), "UnknownCA"),
        ("expired", Some(&expired), "CertificateExpired"),
        ("name not allowed", Some(&intruder), "AccessDenied"),
    ] {
        let error = tls_status(port, &server_ca_pem, identity)
            .await
            .expect_err(case);
        assert!(
            error.contains(&format!("received fatal alert: {alert}")),
            "{case}: expected the alert {alert}, got {error}"
        );
    }
    // Four refusals, plus the probe of wait_listening.
    wait_log(&agent, "the refusals", |log| {
        log.matches("control-plane connection refused").count() >= 5
            && log.contains("in control_plane.allowed_client_names")
    });

    // A verified client is admin: a mutation reaches the service, and is audited.
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&server_ca_pem))
        .domain_name("localhost")
        .identity(Identity::from_pem(&good.0, &good.1));
    tls = tls.clone();
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    let error = JobServiceClient::new(channel)
        .cancel_job(proto::CancelJobRequest {
            id: "no-such-job".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    let log = wait_log(&agent, "the audit line", |log| {
        log.contains("audit: /instance_agent.v1.JobService/CancelJob")
    });
    let line = log
        .lines()
        .find(|l| l.contains("audit: /instance_agent.v1.JobService/CancelJob"))
        .expect("audit line");
    assert!(line.contains("control-plane"), "{line}");
    assert!(line.contains("no-such-job"), "{line}");
    assert!(line.contains("NotFound"), "{line}");

    let failures_before = agent.log().matches("TLS handshake failed").count();
    match tls11_client_refused(port, &server_ca_path, &good_cert, &good_key) {
        Some(refused) => {
            assert!(refused, "a TLS 1.1 client got through");
            let log = wait_log(&agent, "the TLS 1.1 refusal", |log| {
                log.matches("TLS handshake failed").count() > failures_before
            });
            let line = log
                .lines()
                .rfind(|l| l.contains("TLS handshake failed"))
                .expect("refusal line");
            assert!(line.contains("incompatible"), "{line}");
        }
        None => eprintln!(
            "SKIPPED the TLS 1.1 check: neither openssl nor python3 can speak TLS 1.1 here"
        ),
    }

    let mut secrets = key_lines(&server.1);
    secrets.extend(key_lines(&good.1));
    assert_no_secrets(&agent.log(), &secrets);
}

#[test]
fn plaintext_only_on_loopback_and_key_must_be_private() {
    let pki = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("ca");
    let server = ca.leaf("agent", &["localhost"], false, false);
    key_lines(&server.1);
    let cert_path = write_file(pki.path(), "server.pem", &server.0, 0o644);
    let key_path = write_file(pki.path(), "server.key", &server.1, 0o640);
    let ca_path = write_file(pki.path(), "ca.pem", &ca.pem(), 0o644);
    let port = free_port();
    let mut agent = Agent::builder()
        .config(&format!(
            "[control_plane]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = {cert_path:?}\n\
             tls_key = {key_path:?}\nclient_ca = {ca_path:?}\n"
        ))
        .spawn();
    let status = agent
        .wait_exit(Duration::from_secs(20))
        .expect("agent exits");
    assert_eq!(
        status.code(),
        Some(78),
        "a bad key is a configuration error"
    );
    let log = agent.log();
    assert!(log.contains("control_plane.tls_key"), "{log}");
    assert!(log.contains("chmod 600"), "{log}");
    assert_no_secrets(&log, &key_lines(&server.1));

    let mut agent = Agent::builder()
        .config("[control_plane]\nlisten = \"0.0.0.0:7443\"\ninsecure_plaintext = true\n")
        .spawn();
    let status = agent
        .wait_exit(Duration::from_secs(20))
        .expect("agent exits");
    assert_eq!(status.code(), Some(78));
    assert!(agent.log().contains("loopback"), "{}", agent.log());

    let port = free_port();
    let agent = Agent::builder()
        .config(&format!(
            "[control_plane]\nlisten = \"127.0.0.1:{port}\"\ninsecure_plaintext = true\n"
        ))
        .start();
    wait_log(&agent, "the plaintext warning", |log| {
        log.contains("WARN") && log.contains("insecure_plaintext = true")
    });
}

// --- users ---------------------------------------------------------------

fn id_of(flag: &str, name: &str) -> u32 {
    let out = Command::new("id").args([flag, name]).output().expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

/// An operator group with one member and one user outside it; removed on drop.
struct TestUsers {
    group: String,
    gid: u32,
    operator: String,
    outsider: String,
}

impl TestUsers {
    fn create() -> Self {
        let tag = uuid_like();
        let tag = &tag[tag.len().saturating_sub(12)..];
        let users = TestUsers {
            group: format!("iag{tag}"),
            gid: 0,
            operator: format!("iao{tag}"),
            outsider: format!("iax{tag}"),
        };
        // Created one by one; Drop removes whatever exists.
        let mut users = users;
        userdb("groupadd", &[&users.group]);
        users.gid = group_gid(&users.group);
        userdb(
            "useradd",
            &[
                "-M",
                "-N",
                "-s",
                "/usr/sbin/nologin",
                "-G",
                &users.group,
                &users.operator,
            ],
        );
        userdb(
            "useradd",
            &["-M", "-N", "-s", "/usr/sbin/nologin", &users.outsider],
        );
        users
    }

    /// Runs `program args` as `user` with its groups.
    fn run_as(&self, user: &str, program: &Path, args: &[OsString]) -> Output {
        Command::new("setpriv")
            .arg(format!("--reuid={}", id_of("-u", user)))
            .arg(format!("--regid={}", id_of("-g", user)))
            .arg("--init-groups")
            .arg("--")
            .arg(program)
            .args(args)
            .env_remove("INSTANCE_AGENT_SOCKET")
            .output()
            .expect("setpriv")
    }
}

fn group_gid(name: &str) -> u32 {
    let out = Command::new("getent")
        .args(["group", name])
        .output()
        .expect("getent");
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .expect("gid")
}

impl Drop for TestUsers {
    fn drop(&mut self) {
        for user in [&self.operator, &self.outsider] {
            let _ = Command::new("userdel").arg(user).output();
        }
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

/// `path` if every user can run it, else a copy in `dir` that they can
/// (a worktree under a private home would not be reachable).
fn runnable_by_all(path: &Path, dir: &Path) -> PathBuf {
    let reachable = path.ancestors().skip(1).all(|d| {
        std::fs::metadata(d)
            .map(|m| m.mode() & 0o001 != 0)
            .unwrap_or(false)
    }) && std::fs::metadata(path)
        .map(|m| m.mode() & 0o005 == 0o005)
        .unwrap_or(false);
    if reachable {
        return path.to_owned();
    }
    let copy = dir.join(path.file_name().expect("file name"));
    std::fs::copy(path, &copy).expect("copy binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    copy
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

#[test]
fn unix_socket_roles_for_operators_and_outsiders() {
    let users = TestUsers::create();
    let agent = Agent::builder()
        .config(&format!(
            "[operator]\ngroup = {:?}\nallow_cancel_job = false\n",
            users.group
        ))
        .start();
    std::fs::set_permissions(agent.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod temp dir");
    let meta = std::fs::metadata(&agent.socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
    assert_eq!(meta.uid(), 0, "socket owner");
    assert_eq!(meta.gid(), users.gid, "socket group");

    let tools = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tools.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let cli = runnable_by_all(&binary(), tools.path());
    let socket = agent.socket.display().to_string();
    let as_operator = |args: &[&str]| {
        users.run_as(
            &users.operator,
            &cli,
            &os(&[&["--socket", &socket], args].concat()),
        )
    };

    // Reads work.
    let out = as_operator(&["status", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(env!("CARGO_PKG_VERSION")),
        "operator status: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_operator(&["jobs", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Mutations are refused naming the role and the RPC.
    for args in [
        &["jobs", "cancel", "some-job"][..],
        &["jobs", "submit", "--image", IMAGE, "--", "true"][..],
    ] {
        let out = as_operator(args);
        assert!(!out.status.success(), "{args:?} went through");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("PermissionDenied") || stderr.contains("permission"),
            "{stderr}"
        );
        assert!(stderr.contains("role operator"), "{stderr}");
    }

    // Something for every read to find: a finished job whose env carries a
    // credential (admin reads it, operators get "<redacted>") and a setup run.
    let env_secret = common::secret(&format!("OperatorMustNotSee{}", uuid_like()));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (job_id, run_id) = runtime.block_on(something_to_read(&agent, &env_secret));

    // The same user through the gRPC API: every read works, ReclaimSpace
    // only as a dry run, every other mutation is refused.
    let helper = runnable_by_all(&std::env::current_exe().expect("test binary"), tools.path());
    // `disk --top` walks as root but enters only what the operator may list.
    let listable = tools.path().join("listable");
    let private = tools.path().join("private");
    // Below `private`: a directory the operator could list, but cannot
    // reach (they may not search `private`).
    let hidden = private.join("hidden");
    for (dir, mode) in [(&listable, 0o755), (&private, 0o700), (&hidden, 0o755)] {
        std::fs::create_dir(dir).expect("mkdir");
        std::fs::write(dir.join("file"), b"data").expect("write");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", id_of("-u", &users.operator)))
        .arg(format!("--regid={}", id_of("-g", &users.operator)))
        .arg("--init-groups")
        .arg("--")
        .arg(&helper)
        .args([
            "operator_calls_over_grpc",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("IA_SECURITY_HELPER_SOCKET", &agent.socket)
        .env("IA_SECURITY_HELPER_JOB", &job_id)
        .env("IA_SECURITY_HELPER_SETUP_RUN", &run_id)
        .env("IA_SECURITY_HELPER_DIR", &listable)
        .env("IA_SECURITY_HELPER_PRIVATE_DIR", &private)
        .env("IA_SECURITY_HELPER_HIDDEN_DIR", &hidden)
        .output()
        .expect("helper");
    let helper_out = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "operator gRPC checks failed:\n{helper_out}"
    );
    assert!(helper_out.contains("1 passed"), "{helper_out}");
    for figure in helper_out
        .lines()
        .filter(|l| l.contains("unfinished 4 MiB"))
    {
        println!("{figure}");
    }
    assert!(
        !helper_out.contains(&env_secret),
        "the operator read a job's env value"
    );

    // Each refused mutation is audited with the uid and the result.
    let uid = id_of("-u", &users.operator);
    let log = wait_log(&agent, "audit lines", |log| {
        log.contains("audit: /instance_agent.v1.JobService/CancelJob")
            && log.contains("audit: /instance_agent.v1.DiskService/ReclaimSpace")
    });
    let line = log
        .lines()
        .find(|l| l.contains("audit: /instance_agent.v1.JobService/CancelJob"))
        .expect("audit line");
    assert!(line.contains(&format!("uid {uid}")), "{line}");
    assert!(line.contains("PermissionDenied"), "{line}");
    // Refused before its body was read: the line has no request fields.
    assert!(!line.contains("some-job"), "{line}");

    // A user outside the group: the socket's mode stops them...
    let as_outsider = |args: &[&str]| {
        users.run_as(
            &users.outsider,
            &cli,
            &os(&[&["--socket", &socket], args].concat()),
        )
    };
    let out = as_outsider(&["status"]);
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permission denied"), "{stderr}");
    // ...and were the socket opened to everyone, the agent itself refuses
    // them after reading their credentials, in words the CLI shows (never
    // as a closed connection, which means a crash or a restart).
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let out = as_outsider(&["status"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let outsider_uid = id_of("-u", &users.outsider);
    assert!(
        stderr.contains(&format!(
            "permission denied: uid {outsider_uid} may not use instance-agent"
        )),
        "{stderr}"
    );
    assert!(stderr.contains(&users.group), "{stderr}");
    assert!(!stderr.contains("closed the connection"), "{stderr}");
    let out = as_outsider(&["doctor", "--config", "/nonexistent/config.toml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("the agent refused this user"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_log(&agent, "the refused connection", |log| {
        log.contains(&format!("connection refused: uid {outsider_uid}"))
    });

    // operator.allow_cancel_job is live: granted, the same cancel reaches the service.
    let mut config = std::fs::read_to_string(&agent.config_path).expect("config");
    config = config.replace("allow_cancel_job = false", "allow_cancel_job = true");
    std::fs::write(&agent.config_path, config).expect("write config");
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_log(&agent, "the live reload", |log| {
        log.contains("applied live") && log.contains("operator.allow_cancel_job")
    });
    let out = as_operator(&["jobs", "cancel", "some-job"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("role operator"), "{stderr}");
    assert!(stderr.contains("no job"), "{stderr}");
}

/// As admin (root): a job with `HF_TOKEN = env_secret` run to its end and a
/// setup run; returns (job id, setup run id).
async fn something_to_read(agent: &Agent, env_secret: &str) -> (String, String) {
    let channel = agent.channel().await;
    let mut jobs = JobServiceClient::new(channel.clone());
    let mut job = spec(&["echo", "hello from the job"]);
    job.env.insert("HF_TOKEN".into(), env_secret.to_owned());
    let id = jobs
        .submit_job(proto::SubmitJobRequest { spec: Some(job) })
        .await
        .expect("submit")
        .into_inner()
        .id;
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let job = jobs
            .get_job(proto::GetJobRequest { id: id.clone() })
            .await
            .expect("get")
            .into_inner();
        if common::is_final(job.state()) {
            break job;
        }
        assert!(Instant::now() < deadline, "the job never ended: {job:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job.state(), proto::JobState::Succeeded, "{job:?}");
    assert_eq!(
        job.spec.expect("spec").env["HF_TOKEN"],
        env_secret,
        "admin reads env values"
    );
    let run = SetupServiceClient::new(channel)
        .run_setup_script(proto::RunSetupScriptRequest {
            source: Some(proto::run_setup_script_request::Source::Script(
                "#!/bin/sh\necho setup ran\n".into(),
            )),
            ..Default::default()
        })
        .await
        .expect("setup run")
        .into_inner();
    (id, run.id)
}

/// Asserts an operator's view of the job of `something_to_read`: its env
/// names, but no value.
fn assert_env_redacted(job: &proto::Job, what: &str) {
    let env = &job.spec.as_ref().expect("spec").env;
    assert_eq!(
        env.get("HF_TOKEN").map(String::as_str),
        Some("<redacted>"),
        "{what}: {env:?}"
    );
}

/// Run by `unix_socket_roles_for_operators_and_outsiders` as the operator
/// user (through setpriv); does nothing when run on its own.
#[tokio::test]
#[ignore = "run as an unprivileged operator by unix_socket_roles_for_operators_and_outsiders"]
async fn operator_calls_over_grpc() {
    let Some(socket) = std::env::var_os("IA_SECURITY_HELPER_SOCKET") else {
        return;
    };
    assert_ne!(nix::unistd::geteuid().as_raw(), 0, "must run unprivileged");
    let channel = common::connect(Path::new(&socket)).await;
    let denied = |result: Result<(), tonic::Status>, rpc: &str| {
        let status = result.expect_err(rpc);
        assert_eq!(status.code(), Code::PermissionDenied, "{rpc}: {status:?}");
        assert!(status.message().contains("role operator"), "{status:?}");
        assert!(status.message().contains(rpc), "{status:?}");
    };

    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let (job_id, run_id, dir) = (
        var("IA_SECURITY_HELPER_JOB"),
        var("IA_SECURITY_HELPER_SETUP_RUN"),
        var("IA_SECURITY_HELPER_DIR"),
    );
    let within = Duration::from_secs(20);

    // Every read RPC of the contract.
    AgentServiceClient::new(channel.clone())
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("GetStatus");
    let mut events = AgentServiceClient::new(channel.clone())
        .watch_events(proto::WatchEventsRequest { since: Some(0) })
        .await
        .expect("WatchEvents")
        .into_inner();
    let job_event = tokio::time::timeout(within, async {
        while let Some(event) = events.next().await {
            if let Some(proto::event::Kind::Job(e)) = event.expect("event").kind
                && let Some(job) = e.job.filter(|j| j.id == job_id)
            {
                return job;
            }
        }
        panic!("WatchEvents ended without the job's events");
    })
    .await
    .expect("the job's event in the backlog");
    assert_env_redacted(&job_event, "WatchEvents");

    let mut jobs = JobServiceClient::new(channel.clone());
    let listed = jobs
        .list_jobs(proto::ListJobsRequest::default())
        .await
        .expect("ListJobs")
        .into_inner();
    let job = listed
        .jobs
        .iter()
        .find(|j| j.id == job_id)
        .expect("ListJobs shows the job");
    assert_env_redacted(job, "ListJobs");
    let job = jobs
        .get_job(proto::GetJobRequest { id: job_id.clone() })
        .await
        .expect("GetJob")
        .into_inner();
    assert_env_redacted(&job, "GetJob");
    let logs: Vec<_> = jobs
        .stream_job_logs(proto::StreamJobLogsRequest {
            id: job_id.clone(),
            follow: false,
        })
        .await
        .expect("StreamJobLogs")
        .into_inner()
        .collect()
        .await;
    let text: String = logs
        .into_iter()
        .map(|chunk| String::from_utf8_lossy(&chunk.expect("log chunk").data).into_owned())
        .collect();
    assert!(text.contains("hello from the job"), "{text}");

    let mut disk = DiskServiceClient::new(channel.clone());
    disk.get_disk_usage(proto::GetDiskUsageRequest {})
        .await
        .expect("GetDiskUsage");
    let mut alerts = disk
        .watch_disk_alerts(proto::WatchDiskAlertsRequest {})
        .await
        .expect("WatchDiskAlerts")
        .into_inner();
    tokio::time::timeout(within, alerts.next())
        .await
        .expect("WatchDiskAlerts sends the current state first")
        .expect("a first message")
        .expect("an alert, not an error");
    for update in top_directories(&mut disk, dir).await {
        update.expect("TopDirectories update");
    }
    let private = var("IA_SECURITY_HELPER_PRIVATE_DIR");
    let refusal = top_directories(&mut disk, private)
        .await
        .into_iter()
        .find_map(Result::err)
        .expect("a directory the operator may not list is refused");
    assert_eq!(refusal.code(), tonic::Code::PermissionDenied, "{refusal:?}");
    // Every ancestor counts as the operator would see it: a listable
    // directory below one they may not search is refused too.
    let hidden = var("IA_SECURITY_HELPER_HIDDEN_DIR");
    let refusal = top_directories(&mut disk, hidden)
        .await
        .into_iter()
        .find_map(Result::err)
        .expect("a directory below one the operator may not search is refused");
    assert_eq!(refusal.code(), tonic::Code::PermissionDenied, "{refusal:?}");
    assert!(refusal.message().contains("search"), "{refusal:?}");

    MountServiceClient::new(channel.clone())
        .list_mounts(proto::ListMountsRequest {})
        .await
        .expect("ListMounts");

    let mut setup = SetupServiceClient::new(channel.clone());
    let runs = setup
        .list_setup_runs(proto::ListSetupRunsRequest::default())
        .await
        .expect("ListSetupRuns")
        .into_inner();
    assert!(runs.runs.iter().any(|r| r.id == run_id), "{runs:?}");
    let run = setup
        .get_setup_run(proto::GetSetupRunRequest { id: run_id.clone() })
        .await
        .expect("GetSetupRun")
        .into_inner();
    assert_eq!(run.id, run_id);
    let setup_logs: Vec<_> = setup
        .stream_setup_logs(proto::StreamSetupLogsRequest {
            id: run_id.clone(),
            follow: false,
        })
        .await
        .expect("StreamSetupLogs")
        .into_inner()
        .collect()
        .await;
    for chunk in setup_logs {
        chunk.expect("setup log chunk");
    }

    // ReclaimSpace: a dry run works, a real one is refused.
    disk.reclaim_space(proto::ReclaimSpaceRequest {
        dry_run: true,
        ..Default::default()
    })
    .await
    .expect("a dry-run ReclaimSpace works for operators");
    let real = disk
        .reclaim_space(proto::ReclaimSpaceRequest {
            dry_run: false,
            ..Default::default()
        })
        .await
        .map(drop);
    denied(real, "ReclaimSpace");

    denied(
        jobs.submit_job(proto::SubmitJobRequest {
            spec: Some(proto::JobSpec {
                image: IMAGE.into(),
                command: vec!["true".into()],
                ..Default::default()
            }),
        })
        .await
        .map(drop),
        "SubmitJob",
    );
    denied(
        jobs.cancel_job(proto::CancelJobRequest { id: "x".into() })
            .await
            .map(drop),
        "CancelJob",
    );
    denied(
        disk.add_watched_path(proto::AddWatchedPathRequest {
            path: "/tmp".into(),
            reason: "operator".into(),
        })
        .await
        .map(drop),
        "AddWatchedPath",
    );
    denied(
        disk.remove_watched_path(proto::RemoveWatchedPathRequest {
            path: "/tmp".into(),
        })
        .await
        .map(drop),
        "RemoveWatchedPath",
    );
    let mut mounts = MountServiceClient::new(channel.clone());
    denied(
        mounts
            .mount(proto::MountRequest {
                name: "m".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "Mount",
    );
    denied(
        mounts
            .unmount(proto::UnmountRequest { name: "m".into() })
            .await
            .map(drop),
        "Unmount",
    );
    denied(
        SetupServiceClient::new(channel.clone())
            .run_setup_script(proto::RunSetupScriptRequest::default())
            .await
            .map(drop),
        "RunSetupScript",
    );

    // Memory before authorization: a SubmitJob declaring a 4 MiB message
    // whose end never comes is refused from its method and caller at once,
    // not after its body (before: buffered until it ended or 30 s passed).
    let started = Instant::now();
    let status = unfinished_submit_job(Path::new(&socket)).await;
    let took = started.elapsed();
    println!("an operator's unfinished 4 MiB SubmitJob: grpc-status {status} in {took:?}");
    assert_eq!(status, "7", "PERMISSION_DENIED");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// Sends SubmitJob with a declared 4 MiB message and only its first 32 KiB,
/// keeping the stream open; returns the `grpc-status` of the answer (within
/// 10 s).
async fn unfinished_submit_job(socket: &Path) -> String {
    let io = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(io).await.expect("handshake");
    tokio::spawn(connection);
    let request = http::Request::post("http://localhost/instance_agent.v1.JobService/SubmitJob")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut body) = client
        .ready()
        .await
        .expect("ready")
        .send_request(request, false)
        .expect("send");
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(4u32 << 20).to_be_bytes());
    body.send_data(prefix.into(), false).expect("prefix");
    body.send_data(vec![b'x'; 32 << 10].into(), false)
        .expect("data");
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("answered before the body ended")
        .expect("a response");
    let status = response
        .headers()
        .get("grpc-status")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    drop(body);
    status.unwrap_or_else(|| format!("none in {response:?}"))
}

// --- limits --------------------------------------------------------------

fn spec(command: &[&str]) -> proto::JobSpec {
    proto::JobSpec {
        image: IMAGE.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn refused(
    jobs: &mut JobServiceClient<tonic::transport::Channel>,
    spec: proto::JobSpec,
) -> tonic::Status {
    jobs.submit_job(proto::SubmitJobRequest { spec: Some(spec) })
        .await
        .expect_err("over a limit")
}

fn assert_names(status: &tonic::Status, code: Code, limit: &str, value: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(limit),
        "{status:?} should name {limit}"
    );
    assert!(
        status.message().contains(value),
        "{status:?} should name {value}"
    );
}

#[tokio::test]
async fn each_limit_is_hit_once() {
    let agent = Agent::builder()
        .config(
            "[limits]\nmax_message_bytes = 65536\nmax_streams_per_peer = 2\n\
             [setup]\nmax_script_bytes = 4096\n\
             [jobs]\nslots = 1\nmax_queue = 1\nkill_grace_seconds = 1\nmax_env_entries = 2\n\
             max_env_bytes = 64\nmax_labels = 1\nmax_command_args = 3\nmax_command_bytes = 32\n",
        )
        .start();
    let channel = agent.channel().await;
    let mut jobs = JobServiceClient::new(channel.clone());

    let mut big = spec(&["true"]);
    big.labels.insert("big".into(), "x".repeat(100_000));
    let status = refused(&mut jobs, big).await;
    assert_names(
        &status,
        Code::ResourceExhausted,
        "limits.max_message_bytes",
        "65536",
    );

    let mut env = spec(&["true"]);
    for k in ["A", "B", "C"] {
        env.env.insert(k.into(), "1".into());
    }
    let status = refused(&mut jobs, env).await;
    assert_names(&status, Code::InvalidArgument, "jobs.max_env_entries", "2");

    let mut env = spec(&["true"]);
    env.env.insert("A".into(), "v".repeat(100));
    let status = refused(&mut jobs, env).await;
    assert_names(&status, Code::InvalidArgument, "jobs.max_env_bytes", "64");

    let mut labels = spec(&["true"]);
    labels.labels.insert("a".into(), "1".into());
    labels.labels.insert("b".into(), "2".into());
    let status = refused(&mut jobs, labels).await;
    assert_names(&status, Code::InvalidArgument, "jobs.max_labels", "1");

    let status = refused(&mut jobs, spec(&["echo", "a", "b", "c"])).await;
    assert_names(&status, Code::InvalidArgument, "jobs.max_command_args", "3");

    let status = refused(&mut jobs, spec(&["echo", &"y".repeat(40)])).await;
    assert_names(
        &status,
        Code::InvalidArgument,
        "jobs.max_command_bytes",
        "32",
    );

    // The inline setup script limit (the setup module's own).
    let status = SetupServiceClient::new(channel.clone())
        .run_setup_script(proto::RunSetupScriptRequest {
            source: Some(proto::run_setup_script_request::Source::Script(
                "#".repeat(5000),
            )),
            ..Default::default()
        })
        .await
        .expect_err("script over the limit");
    assert_names(
        &status,
        Code::InvalidArgument,
        "setup.max_script_bytes",
        "4096",
    );

    // Queue: one job holds the only slot, one waits, the next is refused.
    let first = jobs
        .submit_job(proto::SubmitJobRequest {
            spec: Some(spec(&["sleep", "60"])),
        })
        .await
        .expect("submit")
        .into_inner();
    // It leaves the queue once it is given the slot.
    let deadline = Instant::now() + Duration::from_secs(60);
    while jobs
        .get_job(proto::GetJobRequest {
            id: first.id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .state()
        == proto::JobState::Queued
    {
        assert!(
            Instant::now() < deadline,
            "the first job never left the queue"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    jobs.submit_job(proto::SubmitJobRequest {
        spec: Some(spec(&["sleep", "60"])),
    })
    .await
    .expect("submit the one that waits");
    let status = jobs
        .submit_job(proto::SubmitJobRequest {
            spec: Some(spec(&["sleep", "60"])),
        })
        .await
        .expect_err("the queue is full");
    assert_names(&status, Code::ResourceExhausted, "jobs.max_queue", "1");

    // Streams: two may be open, the third is refused; closing one frees it.
    let mut agent_api = AgentServiceClient::new(channel.clone());
    let first = agent_api
        .watch_events(proto::WatchEventsRequest::default())
        .await
        .expect("stream 1");
    let _second = agent_api
        .watch_events(proto::WatchEventsRequest::default())
        .await
        .expect("stream 2");
    let status = agent_api
        .watch_events(proto::WatchEventsRequest::default())
        .await
        .expect_err("stream 3");
    assert_names(
        &status,
        Code::ResourceExhausted,
        "limits.max_streams_per_peer",
        "2",
    );
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match agent_api
            .watch_events(proto::WatchEventsRequest::default())
            .await
        {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(
                    Instant::now() < deadline,
                    "the closed stream was never released"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn request_rate_per_peer_is_limited() {
    let agent = Agent::builder()
        .config("[limits]\nrequests_per_second_per_peer = 1\nrequest_burst_per_peer = 3\n")
        .start();
    let mut client = AgentServiceClient::new(agent.channel().await);
    let mut refusal = None;
    for _ in 0..50 {
        if let Err(status) = client.get_status(proto::GetStatusRequest {}).await {
            refusal = Some(status);
            break;
        }
    }
    let status = refusal.expect("50 calls in a row at 1 per second are refused at some point");
    assert_names(
        &status,
        Code::ResourceExhausted,
        "limits.requests_per_second_per_peer",
        "1",
    );
}

// --- secrets -------------------------------------------------------------

#[tokio::test]
async fn secrets_in_requests_never_reach_the_log() {
    let account_key = common::secret(&format!("AcctKey{}==", uuid_like()));
    let sas = common::secret(&format!("sv=2024&sig=Sas{}", uuid_like()));
    let env_secret = common::secret(&format!("EnvSecret{}", uuid_like()));
    let script_secret = common::secret(&format!("ScriptSecret{}", uuid_like()));
    let arg_secret = common::secret(&format!("ArgSecret{}", uuid_like()));
    let agent = Agent::builder().start();
    let channel = agent.channel().await;

    let mut job = spec(&["true"]);
    job.id = format!("secret-{}", uuid_like());
    let job_id = job.id.clone();
    job.env.insert("API_TOKEN".into(), env_secret.clone());
    let mut jobs = JobServiceClient::new(channel.clone());
    jobs.submit_job(proto::SubmitJobRequest { spec: Some(job) })
        .await
        .expect("submit");

    let mut mounts = MountServiceClient::new(channel.clone());
    for auth in [
        proto::mount_request::Auth::AccountKey(account_key.clone()),
        proto::mount_request::Auth::SasToken(sas.clone()),
    ] {
        // Whatever the answer (the mounts module may not be built in), the
        // request went through the guard and the audit log.
        let _ = mounts
            .mount(proto::MountRequest {
                name: "secret-test".into(),
                account: "acct".into(),
                container: "c".into(),
                mount_path: "/nonexistent/secret-test".into(),
                auth: Some(auth),
                ..Default::default()
            })
            .await;
    }
    let mut setup = SetupServiceClient::new(channel.clone());
    let run = setup
        .run_setup_script(proto::RunSetupScriptRequest {
            source: Some(proto::run_setup_script_request::Source::Script(format!(
                "#!/bin/sh\n: {script_secret}\n"
            ))),
            args: vec![arg_secret.clone()],
            ..Default::default()
        })
        .await;

    let log = wait_log(&agent, "the audit lines", |log| {
        log.contains("audit: /instance_agent.v1.JobService/SubmitJob")
            && log
                .matches("audit: /instance_agent.v1.MountService/Mount")
                .count()
                >= 2
            && log.contains("audit: /instance_agent.v1.SetupService/RunSetupScript")
    });
    assert!(log.contains("auth=key"), "{log}");
    assert!(log.contains("auth=sas"), "{log}");
    // The job's and the script's whole lives are in the log too: wait for
    // their ends and for the job's container to go.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = jobs
            .get_job(proto::GetJobRequest { id: job_id.clone() })
            .await
            .expect("get")
            .into_inner();
        let ran = match &run {
            Ok(run) => !matches!(
                setup
                    .get_setup_run(proto::GetSetupRunRequest {
                        id: run.get_ref().id.clone()
                    })
                    .await
                    .expect("get run")
                    .into_inner()
                    .state(),
                proto::SetupRunState::Pending | proto::SetupRunState::Running
            ),
            Err(_) => true,
        };
        if common::is_final(job.state())
            && ran
            && common::containers(&agent.instance_id, true).is_empty()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job or the script never ended: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_no_secrets(
        &agent.log(),
        &[&account_key, &sas, &env_secret, &script_secret, &arg_secret],
    );
}

// --- the suite-wide sweep of captured logs --------------------------------

#[test]
fn an_agent_keeps_its_log_and_logs_dir_after_the_test() {
    let agent = Agent::builder().start();
    let marker = common::secret(&format!("NotASecretMarker{}", uuid_like()));
    let logs = agent.path().join("logs/setup");
    std::fs::create_dir_all(&logs).expect("mkdir");
    std::fs::write(logs.join("probe.log"), "probe\n").expect("write");
    let kept = agent.captured.clone();
    let temp = agent.path().to_owned();
    drop(agent);
    assert!(!temp.exists(), "the temp dir is removed");
    let log = std::fs::read_to_string(kept.join("agent.log")).expect("kept agent log");
    assert!(log.contains("INFO"), "{log}");
    assert_eq!(
        std::fs::read_to_string(kept.join("logs/setup/probe.log")).expect("kept logs dir"),
        "probe\n"
    );
    let list = std::fs::read_to_string(common::test_logs_root().join("secrets.list"))
        .expect("secrets.list");
    let line = list
        .lines()
        .find(|l| l.ends_with(&format!("\t{marker}")))
        .expect("the registered secret is listed");
    assert!(line.starts_with("tests/security.rs:"), "{line}");
}

#[test]
fn the_log_sweep_names_file_and_secret_id_but_never_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = format!("SweepSecret{}", uuid_like());
    std::fs::write(
        dir.path().join("secrets.list"),
        format!("tests/x.rs:1:1 (x pid 1)\t{secret}\ntests/y.rs:2:2 (y pid 2)\tOtherSecret123\n"),
    )
    .expect("list");
    let agent_dir = dir.path().join("mounts-1-0/logs/mounts");
    std::fs::create_dir_all(&agent_dir).expect("mkdir");
    std::fs::write(dir.path().join("mounts-1-0/agent.log"), "clean\n").expect("log");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check-test-logs.sh");
    let run = || {
        Command::new(&script)
            .arg(dir.path())
            .output()
            .expect("run sweep")
    };

    let out = run();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("none of 2 test secrets in 1 captured files"),
        "{stdout}"
    );

    std::fs::write(
        agent_dir.join("data.out"),
        format!("auth failed: {secret}\n"),
    )
    .expect("leak");
    let out = run();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("mounts-1-0/logs/mounts/data.out"), "{text}");
    assert!(text.contains("tests/x.rs:1:1 (x pid 1)"), "{text}");
    assert!(!text.contains("tests/y.rs"), "{text}");
    assert!(
        !text.contains(&secret),
        "the sweep printed the secret: {text}"
    );
}

#[test]
fn the_cli_refuses_a_key_file_others_can_read() {
    let agent = Agent::builder().start();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = common::secret(&format!("CliKey{}==", uuid_like()));
    let mount = |auth_flag: &str, file: &str| {
        common::cli(
            &agent.socket,
            &[
                "mounts",
                "mount",
                "cli-secret",
                "--account",
                "acct",
                "--container",
                "c",
                "--path",
                "/nonexistent/cli-secret",
                auth_flag,
                file,
            ],
        )
    };
    for (flag, mode) in [
        ("--account-key-file", 0o644),
        ("--sas-token-file", 0o640),
        ("--account-key-file", 0o604),
    ] {
        let file = write_file(dir.path(), "key", &key, mode);
        let out = mount(flag, &file.display().to_string());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {mode:o} was accepted");
        assert!(stderr.contains(&file.display().to_string()), "{stderr}");
        assert!(stderr.contains(&format!("mode {mode:04o}")), "{stderr}");
        assert!(stderr.contains("chmod 600"), "{stderr}");
        assert!(!stderr.contains(&key), "the CLI printed the key");
    }
    assert!(
        !agent.log().contains("MountService/Mount"),
        "a refused file never reaches the agent:\n{}",
        agent.log()
    );

    // A 0600 file, and stdin, go through to the agent (which then refuses
    // the path; what matters here is that the secret was sent).
    let file = write_file(dir.path(), "key", &key, 0o600);
    let out = mount("--account-key-file", &file.display().to_string());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{out:?}"
    );
    let mut child = Command::new(binary())
        .arg("--socket")
        .arg(&agent.socket)
        .args([
            "mounts",
            "mount",
            "cli-secret",
            "--account",
            "acct",
            "--container",
            "c",
            "--path",
            "/nonexistent/cli-secret",
            "--sas-token-file",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cli");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{key}").expect("write the token");
    }
    child.wait_with_output().expect("cli ends");
    let log = wait_log(&agent, "both mounts audited", |log| {
        log.contains("auth=key") && log.contains("auth=sas")
    });
    assert_no_secrets(&log, &[&key]);
}

/// Every update of a `TopDirectories` walk of `path`.
async fn top_directories(
    disk: &mut DiskServiceClient<tonic::transport::Channel>,
    path: String,
) -> Vec<Result<proto::TopDirectoriesUpdate, tonic::Status>> {
    disk.top_directories(proto::TopDirectoriesRequest {
        path,
        limit: 5,
        ..Default::default()
    })
    .await
    .expect("TopDirectories")
    .into_inner()
    .collect()
    .await
}

//! Black-box tests of setup scripts: the real binary runs real bash scripts
//! under its real supervisor; results, logs, process trees, users and
//! restarts are checked from the outside (gRPC, CLI, /proc, the log files).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::events::{self, EventLog};
use common::{Agent, cli};
use instance_agent::api::proto::{
    self, agent_service_client::AgentServiceClient, run_setup_script_request::Source,
    setup_service_client::SetupServiceClient,
};
use nix::sys::signal::Signal;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

type Client = SetupServiceClient<Channel>;

fn inline(script: &str) -> proto::RunSetupScriptRequest {
    proto::RunSetupScriptRequest {
        source: Some(Source::Script(script.to_owned())),
        ..Default::default()
    }
}

async fn client(agent: &Agent) -> Client {
    SetupServiceClient::new(agent.channel().await)
}

async fn wait_for(
    client: &mut Client,
    id: &str,
    done: impl Fn(&proto::SetupRun) -> bool,
) -> proto::SetupRun {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let run = client
            .get_setup_run(proto::GetSetupRunRequest { id: id.into() })
            .await
            .expect("get run")
            .into_inner();
        if done(&run) {
            return run;
        }
        assert!(Instant::now() < deadline, "run never got there: {run:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn finished(client: &mut Client, id: &str) -> proto::SetupRun {
    wait_for(client, id, |r| {
        !matches!(
            r.state(),
            proto::SetupRunState::Pending | proto::SetupRunState::Running
        )
    })
    .await
}

async fn run_to_end(client: &mut Client, request: proto::RunSetupScriptRequest) -> proto::SetupRun {
    let run = client
        .run_setup_script(request)
        .await
        .expect("accepted")
        .into_inner();
    finished(client, &run.id).await
}

/// All of a run's output per stream, from StreamSetupLogs.
async fn output(client: &mut Client, id: &str) -> HashMap<proto::LogStream, Vec<u8>> {
    let mut stream = client
        .stream_setup_logs(proto::StreamSetupLogsRequest {
            id: id.into(),
            follow: false,
        })
        .await
        .expect("logs")
        .into_inner();
    let mut out: HashMap<proto::LogStream, Vec<u8>> = HashMap::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        out.entry(chunk.stream())
            .or_default()
            .extend_from_slice(&chunk.data);
    }
    out
}

fn stdout_of(out: &HashMap<proto::LogStream, Vec<u8>>) -> String {
    String::from_utf8_lossy(out.get(&proto::LogStream::Stdout).map_or(&[][..], |v| v)).into_owned()
}

/// A unique word to find a test's processes by in /proc, and a guard that
/// SIGKILLs whatever still carries it when the test ends, pass or fail.
struct Token(String);

impl Token {
    fn new(what: &str) -> Self {
        Token(format!("ia-{what}-{}", &uuid_like()[..10]))
    }

    /// Pids whose command line contains the token.
    fn processes(&self) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&self.0))
                    .unwrap_or(false)
            })
            .filter(|pid| {
                // Zombies are gone already; they only wait for their reaper.
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| {
                        !s.rsplit(')')
                            .next()
                            .unwrap_or("")
                            .trim_start()
                            .starts_with('Z')
                    })
                    .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn uuid_like() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("test setup")
            .as_nanos()
    )
    .chars()
    .rev()
    .collect()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("test setup");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

async fn status(agent: &Agent) -> proto::GetStatusResponse {
    AgentServiceClient::new(agent.channel().await)
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

fn setup_condition(status: &proto::GetStatusResponse) -> proto::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.r#type == "setup")
        .cloned()
        .expect("setup condition")
}

#[tokio::test]
async fn a_script_gets_its_args_env_and_ci_variables_but_not_the_agents_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let notify = std::os::unix::net::UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();
    let agent = Agent::builder()
        .config("[setup]\nci_name = \"box-1\"\nci_workspace = \"ws\"\nci_resource_group = \"rg\"\n")
        .env(
            "NOTIFY_SOCKET",
            dir.path().join("notify.sock").to_str().unwrap(),
        )
        .env("WATCHDOG_USEC", "60000000")
        .start();
    // The unit sets OOMScoreAdjust=-500, which children would inherit. This
    // container lacks CAP_SYS_RESOURCE to lower it, so raise it instead: the
    // script must get 0 either way.
    std::fs::write(format!("/proc/{}/oom_score_adj", agent.child.id()), "500").unwrap();
    let mut events = AgentServiceClient::new(agent.channel().await)
        .watch_events(proto::WatchEventsRequest { since: None })
        .await
        .unwrap()
        .into_inner();
    let mut c = client(&agent).await;
    let mut request = inline(concat!(
        "echo \"args=[$1][$2] n=$#\"\n",
        "echo \"foo=$FOO\"\n",
        "echo \"ci=$CI_NAME/$CI_WORKSPACE/$CI_RESOURCE_GROUP/$CI_LOCAL_UBUNTU_USER\"\n",
        "echo \"notify=${NOTIFY_SOCKET-unset} watchdog=${WATCHDOG_USEC-unset}\"\n",
        "echo \"oom=$(cat /proc/self/oom_score_adj)\"\n",
        "echo \"user=$(id -un) home=$HOME pwd=$(pwd)\"\n",
        "echo to-stderr >&2\n",
    ));
    request.args = vec!["a b".into(), "c".into()];
    request.env = HashMap::from([("FOO".to_owned(), "bar baz".to_owned())]);
    let run = run_to_end(&mut c, request).await;
    assert_eq!(run.state(), proto::SetupRunState::Succeeded, "{run:?}");
    assert_eq!(run.exit_code, Some(0));
    let out = output(&mut c, &run.id).await;
    let stdout = stdout_of(&out);
    assert!(stdout.contains("args=[a b][c] n=2"), "{stdout}");
    assert!(stdout.contains("foo=bar baz"), "{stdout}");
    assert!(stdout.contains("ci=box-1/ws/rg/azureuser"), "{stdout}");
    assert!(stdout.contains("notify=unset watchdog=unset"), "{stdout}");
    assert!(stdout.contains("oom=0"), "{stdout}");
    assert!(
        stdout.contains("user=root home=/root pwd=/root"),
        "{stdout}"
    );
    assert_eq!(out[&proto::LogStream::Stderr], b"to-stderr\n");
    let agent_lines = String::from_utf8_lossy(&out[&proto::LogStream::Agent]).into_owned();
    assert!(
        agent_lines.contains("exited with status 0"),
        "{agent_lines}"
    );
    assert!(
        run.log_tail.iter().any(|l| l == "to-stderr"),
        "{:?}",
        run.log_tail
    );

    // The log file: one timestamped record per line, under logs_dir/setup.
    let log_path = PathBuf::from(&run.log_path);
    assert!(log_path.starts_with(agent.path().join("logs/setup")));
    let log = std::fs::read_to_string(&log_path).unwrap();
    let line = log.lines().find(|l| l.contains("foo=bar baz")).unwrap();
    assert!(line.len() > 30 && &line[26..31] == "Z O f", "{line}");

    // Every state change was an event.
    let mut states = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !states.contains(&proto::SetupRunState::Succeeded) && Instant::now() < deadline {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event")
            .expect("stream open")
            .expect("event");
        if let Some(proto::event::Kind::Setup(setup)) = event.kind {
            let r = setup.run.unwrap();
            if r.id == run.id {
                states.push(r.state());
            }
        }
    }
    assert_eq!(
        states,
        vec![
            proto::SetupRunState::Pending,
            proto::SetupRunState::Running,
            proto::SetupRunState::Succeeded
        ]
    );
    drop(notify);
}

#[tokio::test]
async fn a_non_zero_exit_fails_with_its_code_and_last_lines() {
    let agent = Agent::builder().start();
    let mut c = client(&agent).await;
    let run = run_to_end(
        &mut c,
        inline("echo step one\necho 'E: Unable to locate package foo' >&2\nexit 7\n"),
    )
    .await;
    assert_eq!(run.state(), proto::SetupRunState::Failed);
    assert_eq!(run.exit_code, Some(7));
    assert_eq!(run.message, "exited with status 7");
    assert_eq!(
        run.log_tail,
        vec!["step one", "E: Unable to locate package foo"]
    );
}

#[tokio::test]
async fn at_the_timeout_no_process_of_the_script_survives() {
    let token = Token::new("tree");
    let t = &token.0;
    let agent = Agent::builder()
        .config("[setup]\nkill_grace_seconds = 1\n")
        .start();
    let mut c = client(&agent).await;
    let script = format!(
        r#"
sleep_as() {{ exec -a "{t}-$1" sleep 1000; }}
( sleep_as background ) &
nohup bash -c 'exec -a "{t}-nohup" sleep 1000' >/dev/null 2>&1 &
setsid bash -c 'exec -a "{t}-setsid" sleep 1000' &
setsid bash -c '( exec -a "{t}-double-fork" sleep 1000 ) & exit 0' &
( trap '' TERM; exec -a "{t}-ignores-term" sleep 1000 ) &
env -i bash -c 'exec -a "{t}-no-marker" sleep 1000' &
bash -c 'bash -c "exec -a {t}-orphan sleep 1000" & exit 0'
echo started
exec -a "{t}-main" sleep 1000
"#
    );
    let mut request = inline(&script);
    request.timeout_seconds = 3;
    let run = client_run(&mut c, request).await;
    // All of them are up before the timeout.
    let deadline = Instant::now() + Duration::from_secs(30);
    while token.processes().len() < 8 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        token.processes().len(),
        8,
        "the script did not start everything"
    );
    let cgroup = cgroup_of(token.processes()[0]);

    let run = finished(&mut c, &run.id).await;
    assert_eq!(run.state(), proto::SetupRunState::TimedOut, "{run:?}");
    assert!(run.message.contains("3 s timeout"), "{}", run.message);
    assert!(
        run.message.contains("SIGKILL"),
        "the TERM-ignoring one needed SIGKILL: {}",
        run.message
    );
    let survivors = token.processes();
    assert!(survivors.is_empty(), "survivors: {survivors:?}");
    let marked = processes_with_env(&format!("INSTANCE_AGENT_SETUP_RUN={}", run.id));
    assert!(marked.is_empty(), "marked survivors: {marked:?}");
    if let Some(dir) = cgroup {
        assert!(
            !dir.exists(),
            "the run's cgroup {} is removed",
            dir.display()
        );
    }
}

async fn client_run(c: &mut Client, request: proto::RunSetupScriptRequest) -> proto::SetupRun {
    c.run_setup_script(request)
        .await
        .expect("accepted")
        .into_inner()
}

/// The cgroup v2 directory of a process, when it is in one of ours.
fn cgroup_of(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    if !path.contains("instance-agent-setup") {
        return None;
    }
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(|root| PathBuf::from(format!("{root}{path}")))
        .find(|p| p.exists())
}

fn processes_with_env(entry: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|v| v == entry.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

#[tokio::test]
async fn a_script_is_contained_in_its_own_session_and_cgroup() {
    let agent = Agent::builder().start();
    let mut c = client(&agent).await;
    let run = run_to_end(
        &mut c,
        inline("ps -o sid=,pgid= -p $$\necho pid=$$\ngrep '^0::' /proc/self/cgroup || true\n"),
    )
    .await;
    let stdout = stdout_of(&output(&mut c, &run.id).await);
    let pid: i32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap();
    let ids: Vec<i32> = stdout
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(ids, vec![pid, pid], "session and group leader: {stdout}");
    if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists()
        && !Path::new("/run/systemd/system").exists()
    {
        assert!(
            stdout.contains(&format!("0::/instance-agent-setup/{}", run.id)),
            "{stdout}"
        );
    }
}

#[tokio::test]
async fn printing_100_mb_keeps_the_agent_small_and_the_log_capped() {
    let agent = Agent::builder().start();
    let mut c = client(&agent).await;
    let before = vm_hwm_kib(agent.child.id());
    let line = "0123456789".repeat(10);
    let script = format!(
        "yes '{}' | head -c 100000000\necho the-last-line\n",
        &line[..99]
    );
    let run = run_to_end(&mut c, inline(&script)).await;
    assert_eq!(run.state(), proto::SetupRunState::Succeeded, "{run:?}");
    let after = vm_hwm_kib(agent.child.id());
    eprintln!("agent VmHWM before {before} KiB, after 100 MB of output {after} KiB");
    assert!(
        after < before + 64 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB"
    );
    assert_eq!(
        run.log_tail.last().map(String::as_str),
        Some("the-last-line")
    );
    assert!(run.message.contains("log truncated"), "{}", run.message);
    let size = std::fs::metadata(&run.log_path).unwrap().len();
    // Defaults: 4 MiB head + 1 MiB tail, plus the agent's own lines.
    assert!(size <= (5 << 20) + 64 * 1024, "log is {size} bytes");
    let log = std::fs::read(&run.log_path).unwrap();
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("bytes of output dropped here"));
    assert!(text.contains(" O the-last-line\n"));
}

#[tokio::test]
async fn bytes_that_are_not_utf8_are_kept_exactly() {
    let agent = Agent::builder().start();
    let mut c = client(&agent).await;
    let run = run_to_end(
        &mut c,
        inline("printf 'a\\377\\376\\000b\\n'\nprintf 'no newline'"),
    )
    .await;
    let out = output(&mut c, &run.id).await;
    assert_eq!(
        out[&proto::LogStream::Stdout],
        b"a\xff\xfe\x00b\nno newline"
    );

    let shown = cli(&agent.socket, &["setup", "logs", &run.id]);
    assert!(shown.status.success());
    let text = String::from_utf8(shown.stdout).expect("the CLI prints valid UTF-8");
    assert!(text.contains("a\u{fffd}\u{fffd}\u{0}b\n"), "{text:?}");
}

#[tokio::test]
async fn logs_stream_live_while_the_script_runs() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let agent = Agent::builder().start();
    let mut c = client(&agent).await;
    let run = client_run(
        &mut c,
        inline(&format!(
            "echo tick-1\nwhile [ ! -e {} ]; do sleep 0.05; done\necho tick-2\n",
            go.display()
        )),
    )
    .await;
    let mut stream = c
        .stream_setup_logs(proto::StreamSetupLogsRequest {
            id: run.id.clone(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = String::new();
    while !seen.contains("tick-1") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("tick-1 arrives while the script waits")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    assert!(!seen.contains("tick-2"));
    std::fs::write(&go, "").unwrap();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the stream ends with the run")
    {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap().data));
    }
    assert!(seen.contains("tick-2"), "{seen}");
    assert!(seen.contains("exited with status 0"), "{seen}");
}

#[tokio::test]
async fn cli_logs_follow_prints_a_running_script_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let agent = Agent::builder().start();
    let mut c = client(&agent).await;
    let run = client_run(
        &mut c,
        inline(&format!(
            "echo tick-1\nwhile [ ! -e {} ]; do sleep 0.05; done\necho tick-2\n",
            go.display()
        )),
    )
    .await;
    let mut follower = Command::new(common::binary())
        .arg("--socket")
        .arg(&agent.socket)
        .args(["setup", "logs", "-f", &run.id])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cli starts");
    let stdout = follower.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the script's first line arrives while it waits");
        assert!(!line.contains("tick-2"), "{line}");
        if line == "tick-1" {
            break;
        }
    }
    assert!(
        follower.try_wait().unwrap().is_none(),
        "still following the running script"
    );
    std::fs::write(&go, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = follower.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = follower.kill();
            panic!("the follower did not end with the run");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    let rest: Vec<String> = lines_rx.try_iter().collect();
    assert!(status.success(), "{status:?}");
    assert!(rest.iter().any(|l| l == "tick-2"), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("exited with status 0")),
        "{rest:?}"
    );
}

/// A user and group made for one test, removed when it ends.
struct TestUser {
    name: String,
    group: String,
}

impl TestUser {
    fn create(home: &Path) -> Self {
        let suffix = &uuid_like()[..8];
        let user = TestUser {
            name: format!("iau{suffix}"),
            group: format!("iag{suffix}"),
        };
        let ok = |cmd: &mut Command| {
            let out = cmd.output().expect("run");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ok(Command::new("groupadd").arg(&user.group));
        ok(Command::new("useradd")
            .args(["-M", "-s", "/bin/bash", "-G", &user.group, "-d"])
            .arg(home)
            .arg(&user.name));
        std::fs::create_dir_all(home).expect("test setup");
        ok(Command::new("chown").arg(&user.name).arg(home));
        user
    }

    fn id(&self, flag: &str) -> String {
        let out = Command::new("id")
            .arg(flag)
            .arg(&self.name)
            .output()
            .expect("test setup");
        String::from_utf8(out.stdout)
            .expect("test setup")
            .trim()
            .to_owned()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

#[tokio::test]
async fn run_as_drops_to_the_user_with_its_groups_home_and_env() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let home = dir.path().join("home");
    let user = TestUser::create(&home);
    let agent = Agent::builder().start();
    let mut c = client(&agent).await;
    let mut request = inline(concat!(
        "echo \"uid=$(id -u) gid=$(id -g) groups=$(id -G)\"\n",
        "echo \"env=$HOME|$USER|$LOGNAME pwd=$(pwd)\"\n",
        "echo \"oom=$(cat /proc/self/oom_score_adj)\"\n",
        "touch \"$HOME/made-by-script\"\n",
        "cat /etc/shadow >/dev/null 2>&1 && echo shadow-readable || echo shadow-denied\n",
    ));
    request.run_as = user.name.clone();
    let run = run_to_end(&mut c, request).await;
    assert_eq!(run.state(), proto::SetupRunState::Succeeded, "{run:?}");
    assert_eq!(run.run_as, user.name);
    let stdout = stdout_of(&output(&mut c, &run.id).await);
    let groups = user.id("-G");
    assert!(
        stdout.contains(&format!(
            "uid={} gid={} groups={}",
            user.id("-u"),
            user.id("-g"),
            groups
        )),
        "{stdout} (expected groups {groups})"
    );
    assert!(
        groups.split(' ').count() >= 2,
        "a supplementary group: {groups}"
    );
    assert!(
        stdout.contains(&format!(
            "env={}|{}|{} pwd={}",
            home.display(),
            user.name,
            user.name,
            home.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("oom=0"), "{stdout}");
    assert!(stdout.contains("shadow-denied"), "{stdout}");
    let made = std::fs::metadata(home.join("made-by-script")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&made).to_string(),
        user.id("-u")
    );
}

fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("test setup");
    path
}

fn declared(kind: &str, path: &Path) -> String {
    format!("[[setup.scripts]]\nkind = \"{kind}\"\npath = {path:?}\ntimeout = \"2m\"\n")
}

async fn wait_for_runs(agent: &Agent, kind: proto::SetupKind, n: usize) -> Vec<proto::SetupRun> {
    let mut c = client(agent).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let runs = c
            .list_setup_runs(proto::ListSetupRunsRequest {
                kinds: vec![kind as i32],
                limit: 0,
            })
            .await
            .expect("list runs")
            .into_inner()
            .runs;
        let done = runs.iter().filter(|r| {
            !matches!(
                r.state(),
                proto::SetupRunState::Pending | proto::SetupRunState::Running
            )
        });
        if done.count() >= n {
            return runs;
        }
        assert!(
            Instant::now() < deadline,
            "{n} {kind:?} runs never finished: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn creation_runs_once_while_startup_runs_at_every_start() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("counter");
    let creation = write_script(
        dir.path(),
        "create.sh",
        &format!("#!/bin/bash\necho creation >> {}\n", counter.display()),
    );
    let startup = write_script(
        dir.path(),
        "start.sh",
        &format!("echo startup >> {}\n", counter.display()),
    );
    let mut agent = Agent::builder()
        .config(&declared("creation", &creation))
        .config(&declared("startup", &startup))
        .start();
    wait_for_runs(&agent, proto::SetupKind::Startup, 1).await;
    agent.signal(Signal::SIGTERM);
    agent.exited(Duration::from_secs(20)).await.expect("stops");
    agent.respawn();
    let startups = wait_for_runs(&agent, proto::SetupKind::Startup, 2).await;
    assert_eq!(startups.len(), 2);
    let creations = wait_for_runs(&agent, proto::SetupKind::Creation, 1).await;
    assert_eq!(creations.len(), 1, "{creations:?}");
    assert_eq!(creations[0].state(), proto::SetupRunState::Succeeded);
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap(),
        "creation\nstartup\nstartup\n"
    );
    let status = status(&agent).await;
    assert_eq!(status.slots.clone().unwrap().held_reason, "");
    let condition = setup_condition(&status);
    assert_eq!(
        condition.state(),
        proto::ConditionState::Ok,
        "{condition:?}"
    );

    let mut c = client(&agent).await;
    let mut again = inline("true");
    again.kind = proto::SetupKind::Creation as i32;
    let refused = c.run_setup_script(again).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("already succeeded"),
        "{}",
        refused.message()
    );
}

#[tokio::test]
async fn jobs_are_held_until_the_creation_script_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let creation = write_script(
        dir.path(),
        "create.sh",
        &format!("while [ ! -e {} ]; do sleep 0.05; done\n", go.display()),
    );
    let markers = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .config(&format!(
            "[jobs]\nallowed_host_roots = [{:?}]\n{}",
            markers.path(),
            declared("creation", &creation)
        ))
        .start();
    let running = status(&agent).await;
    let held = running.slots.clone().unwrap().held_reason;
    assert!(held.starts_with("setup: "), "{held}");
    assert!(held.contains("creation script"), "{held}");
    let condition = setup_condition(&running);
    assert_eq!(
        condition.state(),
        proto::ConditionState::Unknown,
        "{condition:?}"
    );
    // A job submitted now waits in the queue, saying why; its container
    // starts only after the script succeeded.
    let mut events = EventLog::from_now(&agent).await;
    let job_id = format!("gated-{}", uuid_like());
    let mut jobs = proto::job_service_client::JobServiceClient::new(agent.channel().await);
    jobs.submit_job(proto::SubmitJobRequest {
        spec: Some(common::marked_job(&job_id, "0", markers.path())),
    })
    .await
    .expect("accepted while held");
    let job = jobs
        .get_job(proto::GetJobRequest { id: job_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state(), proto::JobState::Queued, "{job:?}");
    assert!(
        job.reason
            .starts_with("held: setup: the creation script has not succeeded (run "),
        "{job:?}"
    );
    assert_eq!(common::runs(markers.path(), &job_id), 0);

    std::fs::write(&go, "").unwrap();
    events
        .until(
            "the creation script's success",
            Duration::from_secs(60),
            |e| {
                events::setup_run_in(
                    e,
                    proto::SetupKind::Creation,
                    proto::SetupRunState::Succeeded,
                )
            },
        )
        .await;
    assert_eq!(
        events.job_states(|id| id == job_id),
        [(job_id.clone(), proto::JobState::Queued)],
        "only queued before the script succeeded:\n{}",
        events.summary()
    );
    wait_for_runs(&agent, proto::SetupKind::Creation, 1).await;
    let done = status(&agent).await;
    assert_eq!(done.slots.clone().unwrap().held_reason, "");
    assert_eq!(setup_condition(&done).state(), proto::ConditionState::Ok);
    // Released: the job runs.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let job = jobs
            .get_job(proto::GetJobRequest { id: job_id.clone() })
            .await
            .unwrap()
            .into_inner();
        if common::is_final(job.state()) {
            assert_eq!(job.state(), proto::JobState::Succeeded, "{job:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the job never ran: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(common::runs(markers.path(), &job_id), 1);
}

#[tokio::test]
async fn a_failed_creation_script_fails_the_condition_with_its_exit_code_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let creation = write_script(
        dir.path(),
        "create.sh",
        "echo installing\nfor i in 1 2 3 4 5 6 7; do echo step $i; done\necho 'E: Unable to locate package cuda-99' >&2\nexit 100\n",
    );
    let agent = Agent::builder()
        .config(&declared("creation", &creation))
        .start();
    wait_for_runs(&agent, proto::SetupKind::Creation, 1).await;
    let status = status(&agent).await;
    let condition = setup_condition(&status);
    assert_eq!(condition.state(), proto::ConditionState::Failed);
    assert!(
        condition.message.contains("exited with status 100"),
        "{}",
        condition.message
    );
    assert!(
        condition
            .message
            .contains("Unable to locate package cuda-99"),
        "{}",
        condition.message
    );
    assert!(
        condition.message.contains(".log"),
        "names the log: {}",
        condition.message
    );
    assert!(status.slots.clone().unwrap().held_reason.contains("setup"));

    // The same facts as fields, for the control plane: more lines than the
    // condition's message quotes.
    let run = status.creation_run.clone().expect("the creation run");
    assert_eq!(run.state(), proto::SetupRunState::Failed);
    assert_eq!(run.exit_code, Some(100));
    assert!(run.log_tail.iter().any(|l| l == "installing"), "{run:?}");
    assert!(
        run.log_tail
            .iter()
            .any(|l| l.contains("Unable to locate package cuda-99")),
        "{run:?}"
    );
    assert!(Path::new(&run.log_path).is_file(), "{run:?}");
    let shown = cli(&agent.socket, &["status"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("creation script FAILED") && text.contains("exit code 100"),
        "{text}"
    );
    assert!(text.contains("| installing"), "{text}");
}

#[tokio::test]
async fn a_creation_run_cut_short_by_a_crash_is_interrupted_and_re_run_once() {
    let token = Token::new("crash");
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("first-attempt");
    let creation = write_script(
        dir.path(),
        "create.sh",
        &format!(
            "if [ ! -e {mark} ]; then touch {mark}; exec -a {t} sleep 1000; fi\necho second attempt\n",
            mark = mark.display(),
            t = token.0
        ),
    );
    let mut agent = Agent::builder()
        .config(&declared("creation", &creation))
        .start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while token.processes().is_empty() {
        assert!(Instant::now() < deadline, "first attempt never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.signal(Signal::SIGKILL);
    agent.wait_exit(Duration::from_secs(10)).expect("killed");
    // The supervisor notices that the agent is gone and stops the script.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !token.processes().is_empty() {
        assert!(Instant::now() < deadline, "the script outlived the agent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.respawn();
    let runs = wait_for_runs(&agent, proto::SetupKind::Creation, 2).await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    let (second, first) = (&runs[0], &runs[1]);
    assert_eq!(first.state(), proto::SetupRunState::Interrupted);
    assert!(first.message.contains("crashed"), "{}", first.message);
    assert_eq!(
        second.state(),
        proto::SetupRunState::Succeeded,
        "{second:?}"
    );
    assert_eq!(second.attempt, 2);
    assert!(
        second
            .message
            .contains(&format!("re-run after run {} was interrupted", first.id)),
        "{}",
        second.message
    );
    assert_eq!(
        setup_condition(&status(&agent).await).state(),
        proto::ConditionState::Ok
    );
}

#[tokio::test]
async fn an_idempotency_key_returns_the_run_already_made() {
    let agent = Agent::builder().start();
    let mut c = client(&agent).await;
    let mut request = inline("echo once");
    request.idempotency_key = "provision-42".into();
    let a = client_run(&mut c, request.clone()).await;
    let b = client_run(&mut c, request.clone()).await;
    assert_eq!(a.id, b.id);
    finished(&mut c, &a.id).await;
    let c2 = client_run(&mut c, request.clone()).await;
    assert_eq!(c2.id, a.id);
    assert_eq!(c2.state(), proto::SetupRunState::Succeeded);
    request.source = Some(Source::Script("echo other".into()));
    let conflict = c.run_setup_script(request).await.unwrap_err();
    assert_eq!(conflict.code(), tonic::Code::AlreadyExists);
    let runs = c
        .list_setup_runs(proto::ListSetupRunsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1);
}

#[tokio::test]
async fn bad_requests_get_a_clear_status() {
    let agent = Agent::builder().start();
    let mut c = client(&agent).await;
    let dir = tempfile::tempdir().unwrap();
    let blank = write_script(dir.path(), "blank.sh", "  \n\t\n");
    let cases: Vec<(proto::RunSetupScriptRequest, tonic::Code, &str)> = vec![
        (
            proto::RunSetupScriptRequest {
                source: Some(Source::Path(blank.display().to_string())),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "empty",
        ),
        (
            proto::RunSetupScriptRequest {
                source: Some(Source::Path("/opt/../etc/passwd".into())),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "`path`",
        ),
        (
            proto::RunSetupScriptRequest {
                source: Some(Source::Path("/no/such/script.sh".into())),
                ..Default::default()
            },
            tonic::Code::FailedPrecondition,
            "/no/such/script.sh",
        ),
        (
            proto::RunSetupScriptRequest {
                run_as: "no-such-user-xyz".into(),
                ..inline("id")
            },
            tonic::Code::FailedPrecondition,
            "no-such-user-xyz",
        ),
        (inline(""), tonic::Code::InvalidArgument, "empty"),
        (inline(" \n\t"), tonic::Code::InvalidArgument, "empty"),
        (
            proto::RunSetupScriptRequest::default(),
            tonic::Code::InvalidArgument,
            "required",
        ),
        (
            proto::RunSetupScriptRequest {
                source: Some(Source::Path("relative.sh".into())),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "absolute",
        ),
        (
            proto::RunSetupScriptRequest {
                env: HashMap::from([("BAD-NAME".to_owned(), "v".to_owned())]),
                ..inline("true")
            },
            tonic::Code::InvalidArgument,
            "BAD-NAME",
        ),
        (
            inline("#!/usr/bin/no-such-interpreter\nprint(1)\n"),
            tonic::Code::FailedPrecondition,
            "no-such-interpreter",
        ),
    ];
    for (request, code, needle) in cases {
        let error = c.run_setup_script(request.clone()).await.unwrap_err();
        assert_eq!(error.code(), code, "{request:?}: {}", error.message());
        assert!(error.message().contains(needle), "{}", error.message());
    }
    let none = c
        .get_setup_run(proto::GetSetupRunRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(none.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn cli_runs_lists_shows_and_prints_logs() {
    let agent = Agent::builder().start();
    let ok = cli(
        &agent.socket,
        &[
            "setup",
            "run",
            "-c",
            "echo from-cli $1",
            "--follow",
            "--",
            "arg1",
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("from-cli arg1"));

    let failed = cli(&agent.socket, &["setup", "run", "-c", "exit 4", "-f"]);
    assert_eq!(failed.status.code(), Some(4));

    let listed = cli(&agent.socket, &["setup", "list"]);
    let table = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        table.contains("succeeded") && table.contains("FAILED"),
        "{table}"
    );

    let json = cli(&agent.socket, &["--json", "setup", "list"]);
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    let runs = parsed["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    let first_id = runs[1]["id"].as_str().unwrap();

    let logs = cli(&agent.socket, &["setup", "logs", first_id]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("from-cli arg1"));
    let shown = cli(&agent.socket, &["setup", "show", first_id]);
    let text = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(
        text.contains("succeeded") && text.contains(".log"),
        "{text}"
    );

    let background = cli(&agent.socket, &["setup", "run", "-c", "true"]);
    assert!(String::from_utf8_lossy(&background.stdout).starts_with("run "));
}

#[tokio::test]
async fn stopping_the_agent_stops_the_script_and_records_it_interrupted() {
    let token = Token::new("stop");
    let mut agent = Agent::builder().start();
    let mut c = client(&agent).await;
    let run = client_run(&mut c, inline(&format!("exec -a {} sleep 1000", token.0))).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while token.processes().is_empty() {
        assert!(Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An open client connection holds the server's graceful stop: drop it,
    // and wait without blocking the runtime that closes it.
    drop(c);
    agent.signal(Signal::SIGTERM);
    let exit = agent
        .exited(Duration::from_secs(20))
        .await
        .expect("stops within its grace");
    assert!(exit.success(), "{exit}");
    assert!(
        token.processes().is_empty(),
        "the script outlived the agent"
    );
    agent.respawn();
    let mut c = client(&agent).await;
    let run = c
        .get_setup_run(proto::GetSetupRunRequest { id: run.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.state(), proto::SetupRunState::Interrupted);
    assert!(
        run.message.contains("agent stopped while"),
        "{}",
        run.message
    );
}

#[tokio::test]
async fn if_the_supervisor_dies_the_agent_still_kills_the_scripts_processes() {
    let token = Token::new("orphaned");
    let agent = Agent::builder().start();
    let mut c = client(&agent).await;
    let run = client_run(
        &mut c,
        inline(&format!(
            "( exec -a {t}-child sleep 1000 ) &\nexec -a {t}-main sleep 1000\n",
            t = token.0
        )),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while token.processes().len() < 2 {
        assert!(Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The main process's parent is the supervisor.
    let main = token
        .processes()
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("-main"))
                .unwrap_or(false)
        })
        .expect("main process");
    let stat = std::fs::read_to_string(format!("/proc/{main}/stat")).expect("stat");
    let supervisor: i32 = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|ppid| ppid.parse().ok())
        .expect("ppid");
    let cmdline = std::fs::read(format!("/proc/{supervisor}/cmdline")).expect("cmdline");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("__setup-supervisor"),
        "the script's parent is its supervisor"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(supervisor), Signal::SIGKILL)
        .expect("kill the supervisor");

    let run = finished(&mut c, &run.id).await;
    assert_eq!(run.state(), proto::SetupRunState::Failed, "{run:?}");
    assert!(run.message.contains("supervisor died"), "{}", run.message);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !token.processes().is_empty() {
        assert!(
            Instant::now() < deadline,
            "left running: {:?}",
            token.processes()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

mod systemd_scope {
    //! The `systemd-run --scope` path, driven with a fake `systemd-run`
    //! (the test host has no systemd): the runner is built with systemd
    //! containment forced and the real binary as the supervisor.

    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use instance_agent::setup::RUN_MARKER_ENV;
    use instance_agent::setup::runner::{Launch, ProcessRunner, Report, SUPERVISOR_ARG};
    use instance_agent::setup::supervised_runner::{Containment, SupervisedRunner};
    use tokio::io::AsyncReadExt;

    fn fake_systemd_run(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("systemd-run");
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).expect("test setup");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("test setup");
        path
    }

    fn launch(run_id: &str) -> Launch {
        Launch {
            run_id: run_id.into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hello from the script".into()],
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                (RUN_MARKER_ENV.into(), run_id.into()),
            ],
            working_dir: "/".into(),
            working_dir_id: None,
            user: None,
            kill_grace: Duration::from_secs(1),
            kill_leftovers: true,
            timeout: Duration::from_secs(60),
        }
    }

    /// Every report until the supervisor ends, and the script's stdout.
    async fn run(runner: &SupervisedRunner, run_id: &str) -> (Vec<Report>, String) {
        let mut process = runner.start(launch(run_id)).await.expect("started");
        let (mut stdout, _stderr) = process.take_output().expect("output");
        let reading = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text).await;
            text
        });
        let mut reports = Vec::new();
        let collect = async {
            while let Some(report) = process.next_report().await {
                reports.push(report);
            }
        };
        tokio::time::timeout(Duration::from_secs(60), collect)
            .await
            .expect("the supervisor ends");
        let text = tokio::time::timeout(Duration::from_secs(30), reading)
            .await
            .expect("output ends")
            .expect("output read");
        (reports, text)
    }

    #[tokio::test]
    async fn a_failing_systemd_run_falls_back_and_the_script_still_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let fake = fake_systemd_run(
            dir.path(),
            "echo 'Failed to connect to bus: No such file or directory' >&2\nexit 1\n",
        );
        let runner = SupervisedRunner::new(crate::common::binary(), Containment::SystemdScope)
            .with_systemd_run(fake);
        let id = format!("fb{}", &crate::uuid_like()[..10]);
        let (reports, stdout) = run(&runner, &id).await;
        match reports.first() {
            Some(Report::Warning { message }) => {
                assert!(message.contains("Failed to connect to bus"), "{message}");
                assert!(message.contains("own session"), "{message}");
            }
            other => panic!("the fallback is reported first: {other:?} in {reports:?}"),
        }
        assert!(
            matches!(reports.get(1), Some(Report::Started { .. })),
            "{reports:?}"
        );
        assert_script_succeeded(&reports, &stdout);
    }

    /// The test script ran to exit 0 and its output came through.
    fn assert_script_succeeded(reports: &[Report], stdout: &str) {
        assert!(
            reports.contains(&Report::Exited {
                code: Some(0),
                signal: None
            }),
            "{reports:?}"
        );
        assert_eq!(stdout, "hello from the script\n");
    }

    #[tokio::test]
    async fn systemd_run_gets_a_scope_per_run_and_execs_the_supervisor_with_its_pipes() {
        let dir = tempfile::tempdir().unwrap();
        let args_file = dir.path().join("args");
        let fake = fake_systemd_run(
            dir.path(),
            &format!(
                "printf '%s\\n' \"$@\" > {}\nwhile [ \"$1\" != -- ]; do shift; done\nshift\nexec \"$@\"\n",
                args_file.display()
            ),
        );
        let binary = crate::common::binary();
        let runner =
            SupervisedRunner::new(binary.clone(), Containment::SystemdScope).with_systemd_run(fake);
        let id = format!("sc{}", &crate::uuid_like()[..10]);
        let (reports, stdout) = run(&runner, &id).await;
        let args = std::fs::read_to_string(&args_file).unwrap();
        let expected = [
            "--scope".to_owned(),
            "--quiet".into(),
            "--collect".into(),
            format!("--unit=instance-agent-setup-{id}.scope"),
            "--description=instance-agent setup script".into(),
            "--property=KillMode=control-group".into(),
            "--".into(),
            binary.display().to_string(),
            SUPERVISOR_ARG.into(),
        ];
        assert_eq!(args.lines().collect::<Vec<_>>(), expected);
        // The spec (stdin) and the report pipe (fd 3) went through the exec.
        assert!(
            matches!(reports.first(), Some(Report::Started { .. })),
            "no fallback: {reports:?}"
        );
        assert_script_succeeded(&reports, &stdout);
    }
}

#[tokio::test]
async fn the_shebang_picks_the_interpreter_and_bash_runs_the_rest() {
    let agent = Agent::builder().start();
    let mut c = client(&agent).await;
    let exe = |out: &str| {
        let line = out.lines().last().unwrap_or_default().to_owned();
        std::fs::canonicalize(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    };

    let sh = run_to_end(
        &mut c,
        inline("#!/bin/sh\necho \"bash=${BASH_VERSION:-}\"\nreadlink /proc/$$/exe\n"),
    )
    .await;
    assert_eq!(sh.state(), proto::SetupRunState::Succeeded, "{sh:?}");
    let out = stdout_of(&output(&mut c, &sh.id).await);
    assert!(out.starts_with("bash=\n"), "{out}");
    assert_eq!(
        exe(&out),
        std::fs::canonicalize("/bin/sh").unwrap(),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = write_script(
        dir.path(),
        "plain.sh",
        "echo \"bash=${BASH_VERSION:-}\"\nreadlink /proc/$$/exe\n",
    );
    let plain = run_to_end(
        &mut c,
        proto::RunSetupScriptRequest {
            source: Some(Source::Path(file.display().to_string())),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(plain.state(), proto::SetupRunState::Succeeded, "{plain:?}");
    let out = stdout_of(&output(&mut c, &plain.id).await);
    assert!(
        out.starts_with("bash=5") || out.starts_with("bash=4"),
        "{out}"
    );
    assert_eq!(
        exe(&out),
        std::fs::canonicalize("/bin/bash").unwrap(),
        "{out}"
    );
}

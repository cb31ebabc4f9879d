//! Fault-injection suite: the real agent, the real Docker engine, real
//! filesystems and the real FUSE stand-in, each broken while jobs run, and
//! every job accounted for afterwards by what it left on the host (each job
//! appends one line to a marker file when its container starts, so a job
//! run twice shows two lines whatever the agent says).
//!
//! Not a libtest harness: `cargo test` builds it and runs nothing;
//! `scripts/chaos.sh [short|long]` runs it, alone, because it stops and
//! freezes the host's Docker engine. It prints one table row per scenario
//! (scenario, jobs submitted, completed exactly once, failed and reported,
//! lost, run twice, notes) and exits non-zero when a job was lost or run
//! twice, or a scenario missed its own promise.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::engine::{EngineGuard, freeze_engine, start_engine, stop_engine, thaw_engine};
use common::fs::{Filler, LoopExt4, MIB};
use common::fuse_site::Site;
use common::registry::{Kind, TestRegistry};
use common::{Agent, is_final, marked_job as marked, runs, try_connect};
use instance_agent::api::proto::{
    self, agent_service_client::AgentServiceClient, job_service_client::JobServiceClient,
    mount_service_client::MountServiceClient,
};
use tonic::Code;

/// Every RPC of the suite has this deadline, as a control plane would.
const RPC_DEADLINE: Duration = Duration::from_secs(2);
/// Seconds a long job sleeps: longer than dockerd's 10 s stop timeout, so
/// that stopping the engine kills it.
const LONG_JOB: &str = "30";
/// Submissions tried while the state filesystem is full, until one is
/// refused.
const MAX_SUBMISSIONS_WHILE_FULL: usize = 200;
/// Slots of every agent here: more jobs than slots, so that some queue.
const SLOTS: usize = 4;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Short,
    Long,
}

impl Mode {
    /// `short` for scripts/test.sh, `long` by hand.
    fn pick(&self, short: usize, long: usize) -> usize {
        match self {
            Mode::Short => short,
            Mode::Long => long,
        }
    }
}

type Scenario = fn(Mode) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome>>>;

/// Every scenario, by the name `scripts/chaos.sh MODE NAME` runs alone.
const SCENARIOS: [(&str, Scenario); 6] = [
    ("kill-9", |mode| Box::pin(kill_9_during_jobs(mode))),
    ("engine-restart", |mode| {
        Box::pin(engine_restart_mid_run(mode))
    }),
    ("state-full", |mode| Box::pin(state_filesystem_full(mode))),
    ("fuse-killed", |mode| Box::pin(fuse_standin_killed(mode))),
    ("engine-frozen", |mode| Box::pin(engine_frozen(mode))),
    ("pulls-kill-9", |mode| Box::pin(kill_9_during_pulls(mode))),
];

fn main() {
    let mode = match std::env::args().nth(1).as_deref() {
        Some("short") => Mode::Short,
        Some("long") => Mode::Long,
        _ => {
            // `cargo test` (no mode): the suite takes the engine away from
            // everything else, so it runs only when asked for.
            println!("chaos: not run; run scripts/chaos.sh [short|long]");
            return;
        }
    };
    let only = std::env::args().nth(2);
    if let Some(only) = &only
        && !SCENARIOS.iter().any(|(name, _)| name == only)
    {
        let names: Vec<&str> = SCENARIOS.iter().map(|(name, _)| *name).collect();
        eprintln!(
            "chaos: no scenario {only:?}; there are {}",
            names.join(", ")
        );
        std::process::exit(64);
    }
    let ok = {
        let _engine = EngineGuard;
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        runtime.block_on(async {
            println!("| scenario | submitted | completed exactly once | failed, reported | lost | run twice | notes |");
            println!("|---|---|---|---|---|---|---|");
            let mut ok = true;
            for (name, scenario) in SCENARIOS {
                if only.as_deref().is_some_and(|only| only != name) {
                    continue;
                }
                let outcome = scenario(mode).await;
                outcome.print();
                ok &= outcome.kept_promises();
            }
            ok
        })
    };
    if !ok {
        eprintln!("chaos: a scenario lost a job, ran one twice or broke its promise (see above)");
        std::process::exit(1);
    }
}

/// What became of a scenario's jobs, counted from the agent's records and
/// the marker files.
struct Outcome {
    scenario: String,
    submitted: usize,
    once: usize,
    failed: usize,
    lost: usize,
    twice: usize,
    /// Failures this scenario allows (jobs running when their engine or
    /// mount was taken away fail, and say so).
    failures_allowed: usize,
    notes: Vec<String>,
    /// A promise of the scenario that did not hold.
    broken: Vec<String>,
}

impl Outcome {
    fn print(&self) {
        let mut notes = self.notes.join("; ");
        for broken in &self.broken {
            notes.push_str(&format!("; BROKEN: {broken}"));
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            self.scenario, self.submitted, self.once, self.failed, self.lost, self.twice, notes
        );
    }

    fn kept_promises(&self) -> bool {
        self.lost == 0
            && self.twice == 0
            && self.failed <= self.failures_allowed
            && self.once + self.failed == self.submitted
            && self.broken.is_empty()
    }
}

fn jobs_config(markers: &Path) -> String {
    format!(
        "[jobs]\nslots = {SLOTS}\nkill_grace_seconds = 1\nallowed_host_roots = [{:?}]\n\
         [docker]\ncheck_interval_seconds = 1\n",
        markers.display().to_string()
    )
}

async fn jobs_client(socket: &Path) -> Option<JobServiceClient<tonic::transport::Channel>> {
    Some(JobServiceClient::new(try_connect(socket).await.ok()?))
}

/// Submits as a control plane does: the same id again after a transport
/// error or an unavailable agent (the id makes it idempotent), until the
/// agent acknowledges it or `give_up` passes. A refusal (e.g. the state
/// filesystem is full) is returned, not retried.
async fn submit(
    socket: &Path,
    spec: proto::JobSpec,
    give_up: Instant,
) -> Result<(), tonic::Status> {
    loop {
        let status = match jobs_client(socket).await {
            Some(mut client) => {
                let request = proto::SubmitJobRequest {
                    spec: Some(spec.clone()),
                };
                match tokio::time::timeout(RPC_DEADLINE * 5, client.submit_job(request)).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(status)) => status,
                    Err(_) => tonic::Status::deadline_exceeded("SubmitJob took over 10 s"),
                }
            }
            None => tonic::Status::unavailable("cannot connect"),
        };
        let retry = matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        );
        if !retry || Instant::now() > give_up {
            return Err(status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits each spec (see [`submit`]); the ids acknowledged.
async fn submit_all(
    socket: &Path,
    specs: impl Iterator<Item = proto::JobSpec>,
    give_up: Instant,
) -> Vec<String> {
    let mut acked = Vec::new();
    for spec in specs {
        let id = spec.id.clone();
        if submit(socket, spec, give_up).await.is_ok() {
            acked.push(id);
        }
    }
    acked
}

/// Waits for every acknowledged job to end (or `wait` to pass) and counts
/// what became of each.
async fn account(
    scenario: String,
    socket: &Path,
    markers: &Path,
    ids: &[String],
    wait: Duration,
) -> Outcome {
    let deadline = Instant::now() + wait;
    let mut outcome = Outcome {
        scenario,
        submitted: ids.len(),
        once: 0,
        failed: 0,
        lost: 0,
        twice: 0,
        failures_allowed: 0,
        notes: Vec::new(),
        broken: Vec::new(),
    };
    let mut reasons = Vec::new();
    for id in ids {
        let job = loop {
            let job = match jobs_client(socket).await {
                Some(mut c) => tokio::time::timeout(
                    RPC_DEADLINE,
                    c.get_job(proto::GetJobRequest { id: id.clone() }),
                )
                .await
                .ok()
                .map(|reply| reply.map(tonic::Response::into_inner)),
                None => None,
            };
            match job {
                Some(Ok(job)) if is_final(job.state()) => break Some(job),
                Some(Err(status)) if status.code() == Code::NotFound => break None,
                _ if Instant::now() > deadline => break None,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let runs = runs(markers, id);
        match job {
            _ if runs > 1 => outcome.twice += 1,
            Some(job) if job.state() == proto::JobState::Succeeded && runs == 1 => {
                outcome.once += 1
            }
            // It said it succeeded without running: as good as lost.
            Some(job) if job.state() == proto::JobState::Succeeded => outcome.lost += 1,
            Some(job) => {
                outcome.failed += 1;
                reasons.push(format!("{}: {}", id, job.reason));
            }
            None => outcome.lost += 1,
        }
    }
    if let Some(first) = reasons.first() {
        outcome.notes.push(format!("first failure {first}"));
    }
    outcome
}

/// A job's state, if the agent answers.
async fn job_state(socket: &Path, id: &str) -> Option<proto::JobState> {
    let mut c = jobs_client(socket).await?;
    let reply = tokio::time::timeout(
        RPC_DEADLINE,
        c.get_job(proto::GetJobRequest { id: id.into() }),
    )
    .await
    .ok()?
    .ok()?;
    Some(reply.into_inner().state())
}

/// Jobs running now, as the agent reports them.
async fn running(socket: &Path) -> usize {
    let Some(mut c) = jobs_client(socket).await else {
        return 0;
    };
    c.list_jobs(proto::ListJobsRequest {
        states: vec![proto::JobState::Running as i32],
        ..Default::default()
    })
    .await
    .map_or(0, |r| r.into_inner().jobs.len())
}

async fn wait_running(socket: &Path, at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while running(socket).await < at_least && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

/// `kill -9` of the agent again and again while a control plane submits
/// jobs and they run.
async fn kill_9_during_jobs(mode: Mode) -> Outcome {
    let (jobs, kills) = (mode.pick(40, 200), mode.pick(3, 10));
    let markers = tempfile::tempdir().expect("tempdir");
    let agent = Agent::builder()
        .config(&jobs_config(markers.path()))
        .start();
    let socket = agent.socket.clone();
    let started = Instant::now();
    // About 6 jobs a second end on 4 slots (README): spread the kills over
    // the expected run, the first one during the submissions.
    let every = Duration::from_millis((jobs as u64 * 1000 / 6 / kills as u64).max(500));
    let killer = std::thread::spawn(move || {
        let mut agent = agent;
        std::thread::sleep(Duration::from_millis(150));
        for _ in 0..kills {
            agent.crash_and_restart();
            std::thread::sleep(every);
        }
        agent
    });
    let give_up = Instant::now() + Duration::from_secs(120);
    let acked = submit_all(
        &socket,
        ids("kill9", 0..jobs)
            .iter()
            .map(|id| marked(id, "0.3", markers.path())),
        give_up,
    )
    .await;
    let agent = tokio::task::spawn_blocking(move || killer.join())
        .await
        .expect("join")
        .expect("killer thread");
    let mut outcome = account(
        format!("kill -9 of the agent ×{kills} during {jobs} jobs"),
        &socket,
        markers.path(),
        &acked,
        Duration::from_secs(300),
    )
    .await;
    if acked.len() < jobs {
        outcome.broken.push(format!(
            "{} submissions never acknowledged",
            jobs - acked.len()
        ));
    }
    outcome.notes.push(format!(
        "{kills} restarts in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    drop(agent);
    outcome
}

/// An agent with [`SLOTS`] slots, `jobs` marked jobs submitted to it (the
/// first `long` of them sleeping [`LONG_JOB`], the others `sleep`), and
/// `running` of them running: the start of the engine scenarios.
struct Busy {
    agent: Agent,
    markers: tempfile::TempDir,
    socket: std::path::PathBuf,
    acked: Vec<String>,
}

async fn busy_agent(prefix: &str, jobs: usize, sleep: &str, long: usize, running: usize) -> Busy {
    let markers = tempfile::tempdir().expect("tempdir");
    let agent = Agent::builder()
        .config(&jobs_config(markers.path()))
        .start();
    let socket = agent.socket.clone();
    let give_up = Instant::now() + Duration::from_secs(60);
    let acked = submit_all(
        &socket,
        ids(prefix, 0..jobs).iter().enumerate().map(|(i, id)| {
            let sleep = if i < long { LONG_JOB } else { sleep };
            marked(id, sleep, markers.path())
        }),
        give_up,
    )
    .await;
    wait_running(&socket, running).await;
    Busy {
        agent,
        markers,
        socket,
        acked,
    }
}

/// The Docker engine stopped and started again while jobs run and queue,
/// with submissions during the outage. dockerd stops its containers as it
/// goes (SIGTERM, SIGKILL after 10 s): the long jobs running then die with
/// it, and must fail and say so, never run again.
async fn engine_restart_mid_run(mode: Mode) -> Outcome {
    let (before, during) = (mode.pick(10, 40), mode.pick(4, 10));
    let Busy {
        agent,
        markers,
        socket,
        mut acked,
    } = busy_agent("restart", before, "2", SLOTS, SLOTS).await;
    let give_up = Instant::now() + Duration::from_secs(60);
    let running_at_stop = running(&socket).await;
    let down = Instant::now();
    tokio::task::spawn_blocking(stop_engine)
        .await
        .expect("stop engine");
    let mut broken = Vec::new();
    for id in ids("restart", before..before + during) {
        match submit(&socket, marked(&id, "1", markers.path()), give_up).await {
            Ok(()) => acked.push(id),
            Err(status) => broken.push(format!("submit while the engine is down: {status}")),
        }
    }
    tokio::task::spawn_blocking(start_engine)
        .await
        .expect("start engine");
    let outage = down.elapsed();
    let mut outcome = account(
        format!("Docker engine restarted mid-run ({before} jobs, {during} more during the outage)"),
        &socket,
        markers.path(),
        &acked,
        Duration::from_secs(300),
    )
    .await;
    // What ran when the engine went down is killed with it (the long jobs;
    // a short one may end within dockerd's stop timeout); nothing else.
    outcome.failures_allowed = running_at_stop;
    outcome.broken.extend(broken);
    outcome.notes.push(format!(
        "{running_at_stop} running at the stop; engine down {:.0} s",
        outage.as_secs_f64()
    ));
    drop(agent);
    outcome
}

/// The filesystem of the state dir filled to the last byte while jobs run;
/// the agent crashes and restarts while it is full; space comes back.
async fn state_filesystem_full(mode: Mode) -> Outcome {
    let before = mode.pick(8, 30);
    let markers = tempfile::tempdir().expect("tempdir");
    let ext4 = LoopExt4::new(128);
    let filler = Filler::new(&ext4.path);
    let config = format!(
        "{}[disk]\ninterval_ms = 500\ncritical_free_bytes = {}\nwarning_free_bytes = {}\n\
         clear_margin_bytes = {}\ntransition_seconds = 2\nreserve_bytes = {}\n",
        jobs_config(markers.path()),
        8 * MIB,
        16 * MIB,
        2 * MIB,
        4 * MIB,
    );
    let mut agent = Agent::builder()
        .config(&config)
        .state_dir(&ext4.path.join("state"))
        .start();
    let socket = agent.socket.clone();
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut acked = submit_all(
        &socket,
        ids("full", 0..before)
            .iter()
            .map(|id| marked(id, "1", markers.path())),
        give_up,
    )
    .await;
    wait_running(&socket, 2).await;
    tokio::task::spawn_blocking({
        let filler = Filler::new(&ext4.path);
        move || filler.fill_completely()
    })
    .await
    .expect("fill");
    let mut broken = Vec::new();
    // Submissions go on until the store has no room left: redb first uses
    // the free pages inside its own file.
    let mut refused = None;
    let mut accepted_while_full = 0;
    for id in ids("full", before..before + MAX_SUBMISSIONS_WHILE_FULL) {
        match submit(&socket, marked(&id, "0", markers.path()), give_up).await {
            Ok(()) => {
                acked.push(id);
                accepted_while_full += 1;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                // The message names the store file; the table needs the gist.
                let gist = status.message().split(": cannot write").next();
                refused = Some((id, gist.unwrap_or_default().to_owned()));
                break;
            }
            Err(status) => {
                broken.push(format!("submit on a full disk: {status}"));
                break;
            }
        }
    }
    if let Err(error) = answers_quickly(&socket).await {
        broken.push(format!("while full: {error}"));
    }
    let restarted = tokio::task::spawn_blocking(move || {
        agent.crash_and_restart();
        agent
    })
    .await;
    let agent = match restarted {
        Ok(agent) => Some(agent),
        Err(_) => {
            broken.push("the agent did not start again on a full state filesystem".into());
            None
        }
    };
    if let Err(error) = answers_quickly(&socket).await {
        broken.push(format!("after a restart while full: {error}"));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    filler.empty();
    let refusal = match refused {
        Some((id, message)) => {
            match submit(&socket, marked(&id, "0", markers.path()), give_up).await {
                Ok(()) => acked.push(id),
                Err(status) => broken.push(format!("submit after space came back: {status}")),
            }
            format!("then RESOURCE_EXHAUSTED ({message:?}), sent again once space came back")
        }
        None => format!("none refused within {MAX_SUBMISSIONS_WHILE_FULL}"),
    };
    let mut outcome = account(
        format!(
            "state filesystem 100 % full, agent killed while full ({before} jobs, more submitted while full)"
        ),
        &socket,
        markers.path(),
        &acked,
        Duration::from_secs(300),
    )
    .await;
    outcome.broken.extend(broken);
    outcome.notes.push(format!(
        "{accepted_while_full} accepted while full (free pages inside the store's file), {refusal}"
    ));
    drop(agent);
    drop(ext4);
    outcome
}

/// The blobfuse2 stand-in serving a mount that jobs read and write is
/// killed twice while they run.
async fn fuse_standin_killed(mode: Mode) -> Outcome {
    let jobs = mode.pick(16, 60);
    let markers = tempfile::tempdir().expect("tempdir");
    let site = Site::new();
    std::fs::write(site.storage("data").join("input.txt"), "input").expect("input");
    let agent = site.agent_with(&jobs_config(markers.path()));
    let socket = agent.socket.clone();
    let mut mounts = MountServiceClient::new(agent.channel().await);
    let mut broken = Vec::new();
    let request = proto::MountRequest {
        name: "data".into(),
        account: "myacct".into(),
        container: "data".into(),
        mount_path: site.mnt("data").display().to_string(),
        auth: Some(proto::mount_request::Auth::SasToken(
            "?sv=2022-11-02&sp=rwdl&sig=Y2hhb3M%3D".into(),
        )),
        ..Default::default()
    };
    let mut pid = match mounts.mount(request).await {
        Ok(info) => info.into_inner().pid,
        Err(status) => {
            broken.push(format!("mount: {status}"));
            0
        }
    };
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut acked = Vec::new();
    for id in ids("fuse", 0..jobs) {
        let mut spec = marked(&id, "0", markers.path());
        spec.command[2] = format!(
            "echo run >> /markers/{id}; cat /data/input.txt >/dev/null && sleep 0.5 && echo done > /data/out-{id}"
        );
        spec.mounts.push(proto::JobMount {
            source: Some(proto::job_mount::Source::Managed("data".into())),
            container_path: "/data".into(),
            read_only: false,
        });
        if submit(&socket, spec, give_up).await.is_ok() {
            acked.push(id);
        }
    }
    let mut kills = 0;
    for share in [3, 2] {
        // Kill when about a third, then two thirds, of the jobs have run.
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::fs::read_dir(markers.path()).map_or(0, Iterator::count) < jobs / share
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if pid != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            kills += 1;
        }
        // Wait for the repair: a new stand-in serves the mount.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let info = mounts
                .list_mounts(proto::ListMountsRequest {})
                .await
                .ok()
                .and_then(|r| r.into_inner().mounts.into_iter().find(|m| m.name == "data"));
            if let Some(info) =
                info.filter(|m| m.state() == proto::MountState::Mounted && m.pid != pid)
            {
                pid = info.pid;
                break;
            }
            if Instant::now() > deadline {
                broken.push("the mount was not repaired within 60 s".into());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut outcome = account(
        format!("FUSE stand-in killed ×{kills} under {jobs} jobs using the mount"),
        &socket,
        markers.path(),
        &acked,
        Duration::from_secs(300),
    )
    .await;
    // A job that had the dead mount in its container fails and says so: at
    // most the jobs holding slots at each kill, since every start checks the
    // mount first and waits while it is dead.
    outcome.failures_allowed = kills * SLOTS;
    let remounts = mounts
        .list_mounts(proto::ListMountsRequest {})
        .await
        .ok()
        .and_then(|r| r.into_inner().mounts.into_iter().find(|m| m.name == "data"))
        .map_or(0, |m| m.remount_count);
    outcome.notes.push(format!("{remounts} remounts"));
    outcome.broken.extend(broken);
    drop(agent);
    drop(site);
    outcome
}

/// Calls a few RPCs with the suite's deadline; the slowest latency.
async fn answers_quickly(socket: &Path) -> Result<Duration, String> {
    let channel = tokio::time::timeout(RPC_DEADLINE, try_connect(socket))
        .await
        .map_err(|_| "connect took over 2 s".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let mut slowest = Duration::ZERO;
    let mut agent = AgentServiceClient::new(channel.clone());
    let mut jobs = JobServiceClient::new(channel);
    let t = Instant::now();
    tokio::time::timeout(RPC_DEADLINE, agent.get_status(proto::GetStatusRequest {}))
        .await
        .map_err(|_| "GetStatus missed its 2 s deadline".to_owned())?
        .map_err(|s| format!("GetStatus: {s}"))?;
    slowest = slowest.max(t.elapsed());
    let t = Instant::now();
    tokio::time::timeout(
        RPC_DEADLINE,
        jobs.list_jobs(proto::ListJobsRequest::default()),
    )
    .await
    .map_err(|_| "ListJobs missed its 2 s deadline".to_owned())?
    .map_err(|s| format!("ListJobs: {s}"))?;
    slowest = slowest.max(t.elapsed());
    Ok(slowest)
}

/// dockerd frozen with SIGSTOP (hung, not dead) while jobs run; the agent
/// keeps answering within deadlines and takes new jobs; the engine thaws.
async fn engine_frozen(mode: Mode) -> Outcome {
    let (jobs, frozen_for) = (
        mode.pick(10, 40),
        Duration::from_secs(mode.pick(8, 30) as u64),
    );
    let Busy {
        agent,
        markers,
        socket,
        mut acked,
    } = busy_agent("frozen", jobs, "1", 0, 2).await;
    // A long job to cancel while the engine is frozen: the reply must not
    // wait for the engine; the stop happens once it thaws.
    let victim = "frozen-cancelled";
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut broken = Vec::new();
    if let Err(status) = submit(&socket, marked(victim, "120", markers.path()), give_up).await {
        broken.push(format!("submit {victim}: {status}"));
    }
    while job_state(&socket, victim).await != Some(proto::JobState::Running)
        && Instant::now() < give_up
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    freeze_engine();
    let frozen_at = Instant::now();
    let (mut calls, mut missed, mut slowest) = (0, 0, Duration::ZERO);
    let mut docker_seen = String::new();
    let mut during = 0;
    let t = Instant::now();
    calls += 1;
    let cancel = match try_connect(&socket).await {
        Ok(channel) => tokio::time::timeout(
            RPC_DEADLINE,
            JobServiceClient::new(channel)
                .cancel_job(proto::CancelJobRequest { id: victim.into() }),
        )
        .await
        .map_err(|_| "CancelJob missed its 2 s deadline".to_owned())
        .and_then(|reply| reply.map_err(|s| format!("CancelJob: {s}"))),
        Err(error) => Err(format!("connect: {error}")),
    };
    match cancel {
        Ok(_) => slowest = slowest.max(t.elapsed()),
        Err(error) => {
            missed += 1;
            broken.push(error);
        }
    }
    while frozen_at.elapsed() < frozen_for {
        calls += 2;
        match answers_quickly(&socket).await {
            Ok(latency) => slowest = slowest.max(latency),
            Err(error) => {
                missed += 1;
                broken.push(error);
            }
        }
        let id = format!("frozen-{}", jobs + during);
        let t = Instant::now();
        calls += 1;
        match submit(&socket, marked(&id, "1", markers.path()), Instant::now()).await {
            Ok(()) if t.elapsed() <= RPC_DEADLINE => {
                slowest = slowest.max(t.elapsed());
                acked.push(id);
                during += 1;
            }
            Ok(()) => {
                missed += 1;
                acked.push(id);
                during += 1;
            }
            Err(status) => {
                missed += 1;
                broken.push(format!("SubmitJob while frozen: {status}"));
            }
        }
        if let Ok(channel) = try_connect(&socket).await
            && let Ok(status) = AgentServiceClient::new(channel)
                .get_status(proto::GetStatusRequest {})
                .await
            && let Some(docker) = status
                .into_inner()
                .conditions
                .into_iter()
                .find(|c| c.r#type == "docker")
            && docker.state() != proto::ConditionState::Ok
        {
            docker_seen = docker.message;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    thaw_engine();
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim_state = loop {
        let state = job_state(&socket, victim).await;
        if state.is_some_and(is_final) || Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if victim_state != Some(proto::JobState::Cancelled) || runs(markers.path(), victim) != 1 {
        broken.push(format!(
            "the job cancelled while frozen ended {victim_state:?} after {} runs",
            runs(markers.path(), victim)
        ));
    }
    broken.truncate(3);
    let mut outcome = account(
        format!(
            "Docker engine frozen (SIGSTOP) {} s under {jobs} jobs, {during} submitted while frozen",
            frozen_for.as_secs()
        ),
        &socket,
        markers.path(),
        &acked,
        Duration::from_secs(300),
    )
    .await;
    outcome.notes.push(format!(
        "{} of {calls} RPCs (GetStatus, ListJobs, SubmitJob, one CancelJob) within the 2 s deadline while frozen, slowest {:.0} ms; the cancelled job ended cancelled after the thaw",
        calls - missed,
        slowest.as_secs_f64() * 1000.0
    ));
    if docker_seen.is_empty() {
        broken.push("the docker condition never left ok while the engine was frozen".into());
    } else {
        outcome
            .notes
            .push(format!("docker condition: {docker_seen:?}"));
    }
    outcome.broken.extend(broken);
    drop(agent);
    outcome
}

/// `kill -9` of the agent again and again while the images of its jobs are
/// pulled: every job's image is in a local registry (slowed down, so that
/// each kill cuts pulls in the middle) and none is on the instance yet. A
/// pull cut by a kill is asked for again after the restart; every job runs
/// exactly once.
async fn kill_9_during_pulls(mode: Mode) -> Outcome {
    let (images, per_image, kills) = (mode.pick(3, 8), mode.pick(2, 4), mode.pick(3, 8));
    let registry = TestRegistry::start(Kind::Plain);
    let pushed: Vec<_> = (0..images)
        .map(|i| registry.push(&format!("chaos{i}"), "1", 2, 8))
        .collect();
    // About 2 s per image on loopback: kills land in the middle of pulls.
    registry.throttle(8 * MIB);
    let markers = tempfile::tempdir().expect("tempdir");
    let agent = Agent::builder()
        .config(&jobs_config(markers.path()))
        .start();
    let socket = agent.socket.clone();
    let killer = std::thread::spawn(move || {
        let mut agent = agent;
        for _ in 0..kills {
            std::thread::sleep(Duration::from_millis(1500));
            agent.crash_and_restart();
        }
        agent
    });
    let give_up = Instant::now() + Duration::from_secs(120);
    let specs: Vec<proto::JobSpec> = ids("pulls", 0..images * per_image)
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut spec = marked(id, "0.3", markers.path());
            spec.image = pushed[i % images].reference.clone();
            spec
        })
        .collect();
    let acked = submit_all(&socket, specs.into_iter(), give_up).await;
    let agent = tokio::task::spawn_blocking(move || killer.join())
        .await
        .expect("join")
        .expect("killer thread");
    let mut outcome = account(
        format!(
            "kill -9 of the agent ×{kills} during pulls of {images} images for {} jobs",
            images * per_image
        ),
        &socket,
        markers.path(),
        &acked,
        Duration::from_secs(300),
    )
    .await;
    if acked.len() < images * per_image {
        outcome.broken.push(format!(
            "{} submissions never acknowledged",
            images * per_image - acked.len()
        ));
    }
    let fetches: usize = pushed
        .iter()
        .map(|p| registry.blob_fetches(&p.repository))
        .sum();
    outcome.notes.push(format!(
        "{fetches} blob fetches for {} blobs (cut pulls fetch again)",
        pushed.iter().map(|p| p.layers + 1).sum::<usize>()
    ));
    drop(agent);
    outcome
}

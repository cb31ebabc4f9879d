//! The metrics endpoint of the real binary: a job against the real Docker
//! engine and a GetStatus, then a scrape over plain HTTP.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Agent;
use instance_agent::api::proto;

/// A port that was free a moment ago (bound to port 0, read, released).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// `GET path` with a hand-written HTTP/1.1 request; returns (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// The value of the first sample line starting with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_shows_jobs_rpcs_disk_and_own_usage() {
    let port = free_port();
    let agent = Agent::builder()
        .config(&format!(
            "[jobs]\nslots = 2\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
        ))
        .start();

    let mut agent_client =
        proto::agent_service_client::AgentServiceClient::new(agent.channel().await);
    agent_client
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("GetStatus");

    let mut jobs = proto::job_service_client::JobServiceClient::new(agent.channel().await);
    let id = format!("metrics-{}", common::uuid_like());
    jobs.submit_job(proto::SubmitJobRequest {
        spec: Some(proto::JobSpec {
            id: id.clone(),
            image: "instance-agent/busybox:test".into(),
            command: vec!["true".into()],
            ..Default::default()
        }),
    })
    .await
    .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = jobs
            .get_job(proto::GetJobRequest { id: id.clone() })
            .await
            .expect("get")
            .into_inner();
        if job.state() == proto::JobState::Succeeded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job did not succeed: {job:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A NotFound, to see a non-zero code (a trailers-only reply).
    let missing = jobs
        .get_job(proto::GetJobRequest {
            id: "no-such-job".into(),
        })
        .await;
    assert_eq!(
        missing.expect_err("missing job").code(),
        tonic::Code::NotFound
    );

    // The event task counts the finished job shortly after it is published.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (status, text) = http_get(port, "/metrics");
        assert!(status.contains("200"), "{status}");
        if sample(
            &text,
            "instance_agent_jobs_finished_total{state=\"succeeded\"}",
        ) == Some(1.0)
            || Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    assert_eq!(
        sample(
            &text,
            "instance_agent_jobs_finished_total{state=\"succeeded\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "instance_agent_job_duration_seconds_count"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "instance_agent_jobs{state=\"succeeded\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "instance_agent_job_queue_depth"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "instance_agent_job_slots_capacity"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "instance_agent_rpcs_total{method=\"/instance_agent.v1.AgentService/GetStatus\",code=\"0\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "instance_agent_rpcs_total{method=\"/instance_agent.v1.JobService/GetJob\",code=\"5\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "instance_agent_rpc_duration_seconds_count{method=\"/instance_agent.v1.AgentService/GetStatus\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // The root filesystem is always watched; its free bytes are positive
    // once sampled, and exactly one state is current.
    let root_free = sample(&text, "instance_agent_disk_free_bytes{mount_point=\"/\"}");
    assert!(root_free.is_some_and(|b| b > 0.0), "{text}");
    let root_states: f64 = text
        .lines()
        .filter(|l| l.starts_with("instance_agent_disk_state{mount_point=\"/\","))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(root_states, 1.0, "{text}");
    let rss = sample(&text, "instance_agent_resident_memory_bytes").expect("rss");
    assert!(rss > 1_000_000.0 && rss < 4_000_000_000.0, "rss {rss}");
    let cpu = sample(&text, "instance_agent_cpu_seconds_total").expect("cpu");
    assert!(cpu > 0.0, "cpu {cpu}");

    let (status, _) = http_get(port, "/other");
    assert!(status.contains("404"), "{status}");
}

#[test]
fn non_loopback_listen_is_refused_naming_the_key() {
    let (code, stderr) = common::serve_refused("[metrics]\nlisten = \"0.0.0.0:9464\"\n");
    assert_eq!(code, Some(78));
    assert!(stderr.contains("metrics.listen"), "{stderr}");
    assert!(stderr.contains("loopback"), "{stderr}");
}

#[test]
fn busy_metrics_port_is_a_startup_error_naming_the_address() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let mut agent = Agent::builder()
        .config(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"))
        .spawn();
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .expect("exits on the bind error");
    assert!(!status.success());
    let log = agent.log();
    assert!(log.contains(&format!("127.0.0.1:{port}")), "{log}");
    assert!(log.contains("metrics.listen"), "{log}");
}

//! Floods against the real binary, each the attack of one finding of the
//! hardening issue, with the agent's RSS printed before and after (it must
//! stay under 64 MiB) and the answer times of the calls that must still
//! work meanwhile:
//!
//! - 5,000 idle connections to the metrics port, and connections that
//!   send their headers a byte at a time;
//! - request bodies sent slowly on many streams (memory before decoding);
//! - connections and health `Watch` streams past the per-peer caps;
//! - `ListJobs` with a huge `limit`;
//! - silent connections to the control-plane port from many loopback
//!   addresses while a known client connects.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::control_plane::{TlsControlPlane, listening, silent_connections};
use common::{Agent, free_port, rss_kib};
use instance_agent::api::proto::{self, agent_service_client::AgentServiceClient};
use tonic::Code;

/// The bound every flood must keep the agent under.
const RSS_LIMIT_KIB: u64 = 64 * 1024;

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The agent's RSS, sampled every 50 ms while `during` runs; returns its
/// result and the largest sample.
async fn peak_rss<T>(pid: u32, during: impl std::future::Future<Output = T>) -> (T, u64) {
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = rss_kib(pid);
            while !stop.is_cancelled() {
                peak = peak.max(rss_kib(pid));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak.max(rss_kib(pid))
        })
    };
    let result = during.await;
    stop.cancel();
    (result, sampler.await.expect("sampler"))
}

/// GetStatus on a new connection; its answer time.
async fn status_time(socket: &std::path::Path) -> Duration {
    let started = Instant::now();
    let channel = tokio::time::timeout(Duration::from_secs(10), common::try_connect(socket))
        .await
        .expect("connected within 10 s")
        .expect("connect");
    tokio::time::timeout(
        Duration::from_secs(10),
        AgentServiceClient::new(channel).get_status(proto::GetStatusRequest {}),
    )
    .await
    .expect("GetStatus answered within 10 s")
    .expect("GetStatus");
    started.elapsed()
}

/// Raises this process's soft open-file limit to its hard limit.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    hard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_metrics_connections_leave_scrapes_and_the_socket_working() {
    let hard = raise_nofile();
    assert!(
        hard >= 6000,
        "this test needs 6000 file descriptors, the hard limit is {hard}"
    );
    let port = free_port();
    let agent = Agent::builder()
        .config(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"))
        .start();
    let pid = agent.child.id();
    // The agent as systemd would start it outside the unit: 4096 files.
    common::run_ok(
        std::process::Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg("--nofile=4096:4096"),
    );
    listening(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let before = rss_kib(pid);

    // 5,000 connections that never send a byte.
    let started = Instant::now();
    let mut idle = Vec::new();
    let mut failed = 0;
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..5000 {
        // An agent out of descriptors stops accepting; its backlog fills and
        // connects hang: bounded, so that such an agent fails the test fast.
        if started.elapsed() > Duration::from_secs(60) {
            failed += 1;
            continue;
        }
        match tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            Ok(Ok(stream)) => idle.push(stream),
            Ok(Err(error)) => {
                failed += 1;
                *errors.entry(error.kind().to_string()).or_insert(0) += 1;
            }
            Err(_) => {
                failed += 1;
                *errors.entry("no answer in 500 ms".to_owned()).or_insert(0) += 1;
            }
        }
    }
    println!(
        "opened {} idle metrics connections in {:?} ({failed} failed: {errors:?})",
        idle.len(),
        started.elapsed()
    );

    // The flood is one (a connection still in the kernel's SYN retry when
    // the agent accepted late counts as failed); an agent out of
    // descriptors would leave thousands unaccepted.
    assert!(
        idle.len() >= 4900,
        "only {} connections opened: {errors:?}",
        idle.len()
    );

    // A scrape on a new connection is answered, and so is the gRPC socket.
    let scrape = Instant::now();
    let (status, text) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || common::http_get(port, "/metrics")),
    )
    .await
    .expect("a scrape answered within 10 s")
    .expect("scrape");
    let scrape = scrape.elapsed();
    assert!(status.contains("200"), "{status}");
    assert!(text.contains("instance_agent_"), "{text}");
    let grpc = status_time(&agent.socket).await;
    let after = rss_kib(pid);
    println!(
        "5000 idle metrics connections: scrape answered in {scrape:?}, GetStatus in {grpc:?}; \
         RSS {:.1} MiB before, {:.1} MiB after",
        mib(before),
        mib(after)
    );
    assert!(scrape < Duration::from_secs(5), "scrape took {scrape:?}");
    assert!(grpc < Duration::from_secs(2), "GetStatus took {grpc:?}");
    assert!(after < RSS_LIMIT_KIB, "RSS {after} KiB");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_connections_that_dribble_their_headers_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = free_port();
    let agent = Agent::builder()
        .config(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"))
        .start();
    let pid = agent.child.id();
    listening(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let before = rss_kib(pid);
    // Fewer than metrics.max_connections (16): none is replaced by a newer
    // one, so each must be closed by the header timeout itself.
    let started = Instant::now();
    let mut dribblers = Vec::new();
    for _ in 0..8 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        dribblers.push(tokio::spawn(async move {
            let opened = Instant::now();
            let request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
            stream.write_all(request).await.expect("request line");
            // One byte every 200 ms, never the end of the headers, until the
            // agent closes (a write fails or a read ends).
            let mut byte = [0u8; 1];
            loop {
                tokio::select! {
                    read = stream.read(&mut byte) => {
                        if matches!(read, Ok(0) | Err(_)) {
                            return opened.elapsed();
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        if stream.write_all(b"x").await.is_err() {
                            return opened.elapsed();
                        }
                    }
                }
                assert!(
                    opened.elapsed() < Duration::from_secs(20),
                    "a connection sending its headers slowly was never closed"
                );
            }
        }));
    }
    let scrape = Instant::now();
    let (status, _) = tokio::task::spawn_blocking(move || common::http_get(port, "/metrics"))
        .await
        .expect("scrape");
    let scrape = scrape.elapsed();
    assert!(status.contains("200"), "{status}");
    let mut closed_after = Vec::new();
    for dribbler in dribblers {
        closed_after.push(dribbler.await.expect("dribbler"));
    }
    let after = rss_kib(pid);
    println!(
        "8 metrics connections dribbling headers: closed after {:?} (max); a scrape meanwhile in {scrape:?}; \
         RSS {:.1} MiB before, {:.1} MiB after, {:?} in all",
        closed_after.iter().max(),
        mib(before),
        mib(after),
        started.elapsed()
    );
    for took in &closed_after {
        // metrics' header timeout is 5 s.
        assert!(*took < Duration::from_secs(8), "{closed_after:?}");
    }
    assert!(after < RSS_LIMIT_KIB);
}

/// Opens `streams` SubmitJob calls on each of `connections` HTTP/2
/// connections, each declaring a 4 MiB message and sending all of it but
/// the last 100 KiB, never ending. Returns the calls' statuses as they
/// end (the flood holds the rest open until `hold` is dropped).
async fn slow_bodies(
    socket: &std::path::Path,
    connections: usize,
    streams: usize,
    hold: tokio_util::sync::CancellationToken,
) -> tokio::sync::mpsc::UnboundedReceiver<Option<String>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    const DECLARED: usize = 4 << 20;
    let chunk = Bytes::from(vec![b'x'; 256 << 10]);
    for _ in 0..connections {
        let io = tokio::net::UnixStream::connect(socket)
            .await
            .expect("connect");
        let (client, connection) = h2::client::handshake(io).await.expect("handshake");
        tokio::spawn(connection);
        for _ in 0..streams {
            let request =
                http::Request::post("http://localhost/instance_agent.v1.JobService/SubmitJob")
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())
                    .expect("request");
            let mut client = client.clone().ready().await.expect("ready");
            let (response, mut send) = client.send_request(request, false).expect("send");
            let mut prefix = vec![0u8];
            prefix.extend_from_slice(&(DECLARED as u32).to_be_bytes());
            send.send_data(Bytes::from(prefix), false).expect("prefix");
            let mut sent = 0;
            while sent + chunk.len() < DECLARED - (100 << 10) {
                send.send_data(chunk.clone(), false).expect("data");
                sent += chunk.len();
            }
            let tx = tx.clone();
            let hold = hold.clone();
            tokio::spawn(async move {
                // Keeps the stream (and its unsent end) alive.
                let _send = send;
                tokio::select! {
                    _ = hold.cancelled() => {}
                    response = response => {
                        let code = response.ok().and_then(|r| {
                            r.headers().get("grpc-message").map(|m| {
                                String::from_utf8_lossy(m.as_bytes()).into_owned()
                            })
                        });
                        let _ = tx.send(code);
                        hold.cancelled().await;
                    }
                }
            });
        }
    }
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_bodies_cannot_fill_the_agents_memory() {
    let agent = Agent::builder().start();
    let pid = agent.child.id();
    let before = rss_kib(pid);
    let hold = tokio_util::sync::CancellationToken::new();
    // 8 connections x 16 streams x ~3.9 MiB: about 500 MiB if buffered.
    let ((mut refusals, answer), peak) = peak_rss(pid, async {
        let refusals = slow_bodies(&agent.socket, 8, 16, hold.clone()).await;
        // Let the bodies arrive, then ask on a new connection.
        tokio::time::sleep(Duration::from_secs(3)).await;
        (refusals, status_time(&agent.socket).await)
    })
    .await;
    hold.cancel();
    let mut messages = Vec::new();
    while let Ok(message) = refusals.try_recv() {
        messages.extend(message);
    }
    let after = rss_kib(pid);
    println!(
        "128 slow 4 MiB bodies: {} refused, GetStatus answered in {answer:?}; RSS {:.1} MiB before, \
         {:.1} MiB at the peak, {:.1} MiB after",
        messages.len(),
        mib(before),
        mib(peak),
        mib(after)
    );
    assert!(peak < RSS_LIMIT_KIB, "RSS peaked at {peak} KiB");
    assert!(answer < Duration::from_secs(2), "GetStatus took {answer:?}");
    assert!(
        messages
            .iter()
            .any(|m| m.contains("limits.max_inflight_bytes_per_peer")),
        "{messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_peer_are_capped_and_refused_in_words() {
    let agent = Agent::builder().start();
    let pid = agent.child.id();
    let before = rss_kib(pid);
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..100 {
        let channel = common::connect(&agent.socket).await;
        match AgentServiceClient::new(channel.clone())
            .get_status(proto::GetStatusRequest {})
            .await
        {
            Ok(_) => open.push(channel),
            Err(status) => refused.push(status),
        }
    }
    let answer = {
        drop(open.pop());
        // The freed place is given back when the agent sees it close.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let channel = common::connect(&agent.socket).await;
            let started = Instant::now();
            match AgentServiceClient::new(channel.clone())
                .get_status(proto::GetStatusRequest {})
                .await
            {
                Ok(_) => {
                    open.push(channel);
                    break started.elapsed();
                }
                Err(_) => {
                    assert!(
                        Instant::now() < deadline,
                        "the closed connection was never freed"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    let after = rss_kib(pid);
    println!(
        "100 connections: {} served, {} refused; RSS {:.1} MiB before, {:.1} MiB after",
        open.len(),
        refused.len(),
        mib(before),
        mib(after)
    );
    assert_eq!(open.len(), 32, "limits.max_connections_per_peer");
    assert_eq!(refused.len(), 68);
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains("limits.max_connections_per_peer = 32"),
            "{status:?}"
        );
    }
    assert!(answer < Duration::from_secs(2), "{answer:?}");
    assert!(after < RSS_LIMIT_KIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watch_and_reflection_streams_count_against_the_stream_cap() {
    let agent = Agent::builder().start();
    let pid = agent.child.id();
    let before = rss_kib(pid);
    let channel = common::connect(&agent.socket).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut watches = Vec::new();
    let mut refused = None;
    for _ in 0..200 {
        match health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            Ok(stream) => watches.push(stream),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let after = rss_kib(pid);
    println!(
        "health Watch streams: {} open before a refusal; RSS {:.1} MiB before, {:.1} MiB after",
        watches.len(),
        mib(before),
        mib(after)
    );
    let refused = refused.expect("refused past limits.max_streams_per_peer");
    assert_eq!(watches.len(), 32);
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("limits.max_streams_per_peer = 32"),
        "{refused:?}"
    );
    // A reflection stream is counted the same way.
    let reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter(vec![]))
            .await
            .expect_err("over the stream cap");
    assert_eq!(reflection.code(), Code::ResourceExhausted, "{reflection:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_jobs_answers_at_most_1000() {
    // No engine: jobs stay queued, so they are cheap to make.
    let agent = Agent::builder()
        .config(
            "[docker]\nsocket = \"/nonexistent/docker.sock\"\n\
             [limits]\nrequests_per_second_per_peer = 100000\nrequest_burst_per_peer = 100000\n",
        )
        .start();
    let pid = agent.child.id();
    let before = rss_kib(pid);
    let channel = agent.channel().await;
    let mut jobs = proto::job_service_client::JobServiceClient::new(channel);
    for _ in 0..1001 {
        jobs.submit_job(proto::SubmitJobRequest {
            spec: Some(proto::JobSpec {
                image: "instance-agent/busybox:test".into(),
                command: vec!["true".into()],
                ..Default::default()
            }),
        })
        .await
        .expect("submit");
    }
    let submitted = rss_kib(pid);
    let started = Instant::now();
    let listed = jobs
        .list_jobs(proto::ListJobsRequest {
            limit: 1_000_000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .jobs
        .len();
    let took = started.elapsed();
    let after = rss_kib(pid);
    println!(
        "ListJobs limit 1000000 over 1001 jobs: {listed} in {took:?}; RSS {:.1} MiB before the jobs, \
         {:.1} MiB before the list, {:.1} MiB after",
        mib(before),
        mib(submitted),
        mib(after)
    );
    assert_eq!(listed, 1000, "the documented maximum");
    // What the list itself may cost, and the whole with 1,001 queued jobs.
    // (Until the image reference stopped being parsed by a regex, the first
    // submit alone took RSS from 33 to about 60 MiB: `images::syntax`.)
    assert!(
        after.saturating_sub(submitted) < 8 * 1024,
        "the list grew RSS from {submitted} to {after} KiB"
    );
    assert!(after < RSS_LIMIT_KIB, "RSS {after} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_many_addresses_leave_room_for_the_control_plane() {
    raise_nofile();
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let port = free_port();
    let listen = if ipv6 {
        format!("[::]:{port}")
    } else {
        format!("127.0.0.1:{port}")
    };
    let control_plane = TlsControlPlane::start(&listen, port);
    let pid = control_plane.agent.child.id();
    let target = SocketAddr::from(([127, 0, 0, 1], port));
    let call = || control_plane.call(target);
    // Wait for the listener, then the control plane's first handshake.
    listening(target).await;
    call()
        .await
        .expect("the control plane connects before the flood");
    // A connection that says nothing is closed at the first-byte timeout
    // (2 s; before: the 10 s TLS handshake timeout).
    let silent_closed = {
        use tokio::io::AsyncReadExt;
        let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let opened = Instant::now();
        let _ = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut [0u8; 1]))
            .await
            .expect("a silent connection is closed within 20 s");
        opened.elapsed()
    };
    assert!(
        silent_closed >= Duration::from_millis(1500) && silent_closed < Duration::from_secs(4),
        "a silent connection was closed after {silent_closed:?}"
    );
    let before = rss_kib(pid);

    let stop = tokio_util::sync::CancellationToken::new();
    let mut sources: Vec<IpAddr> = (2..=17).map(|i| IpAddr::from([127, 0, 0, i])).collect();
    for source in &sources {
        silent_connections(*source, target, 8, stop.clone());
    }
    if ipv6 {
        sources.push("::1".parse().expect("ip"));
        silent_connections(
            "::1".parse().expect("ip"),
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            8,
            stop.clone(),
        );
    }
    // The flood holds every slot it can take.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut times = Vec::new();
    let (results, peak) = peak_rss(pid, async {
        let mut results = Vec::new();
        for _ in 0..5 {
            results.push(call().await);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        results
    })
    .await;
    stop.cancel();
    for result in results {
        times.push(result.expect("the known client is served during the flood"));
    }
    let after = rss_kib(pid);
    println!(
        "a silent connection closed after {silent_closed:?}; \
         {} silent connections from {} sources ({}): the known client's calls took {times:?}; \
         RSS {:.1} MiB before, {:.1} MiB at the peak, {:.1} MiB after",
        8 * sources.len(),
        sources.len(),
        if ipv6 {
            "127.0.0.2-17 and ::1"
        } else {
            "127.0.0.2-17"
        },
        mib(before),
        mib(peak),
        mib(after)
    );
    for time in &times {
        assert!(*time < Duration::from_secs(3), "{times:?}");
    }
    assert!(peak < RSS_LIMIT_KIB);
}

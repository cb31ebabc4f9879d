//! Silent connections to the control-plane port from many addresses of one
//! IPv6 /64 (one host is routinely given a whole /64, so addresses are free
//! to an attacker): the agent counts them as one source, so a client from
//! another network is still served at once. Runs in a network namespace of
//! its own (re-executed under `unshare --net`), where `fd00:1::/64` is
//! local and `fd00:2::1` is the agent's address.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use common::control_plane::{TlsControlPlane, listening, silent_connections};
use common::{free_port, rss_kib, run_ok};

const IN_NAMESPACE: &str = "IA_IPV6_FLOOD_IN_NAMESPACE";
const TEST: &str = "silent_connections_from_one_ipv6_64_count_as_one_source";

#[test]
fn silent_connections_from_one_ipv6_64_count_as_one_source() {
    if std::env::var_os(IN_NAMESPACE).is_none() {
        let out = Command::new("unshare")
            .args(["--net", "--"])
            .arg(std::env::current_exe().expect("test binary"))
            .args([TEST, "--exact", "--nocapture"])
            .env(IN_NAMESPACE, "1")
            .output()
            .expect("unshare");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "in its namespace:\n{printed}");
        assert!(printed.contains("1 passed"), "{printed}");
        for figure in printed.lines().filter(|l| l.contains("silent connections")) {
            println!("{figure}");
        }
        return;
    }
    for args in [
        &["link", "set", "lo", "up"][..],
        &["-6", "addr", "add", "fd00:2::1/128", "dev", "lo", "nodad"],
        &["-6", "route", "add", "local", "fd00:1::/64", "dev", "lo"],
    ] {
        run_ok(Command::new("ip").args(args));
    }
    // Any address of the local /64 may be a source.
    run_ok(Command::new("sysctl").args(["-qw", "net.ipv6.ip_nonlocal_bind=1"]));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(flood());
}

async fn flood() {
    let port = free_port();
    let control_plane = TlsControlPlane::start(&format!("[::]:{port}"), port);
    let pid = control_plane.agent.child.id();
    let target = SocketAddr::from(("fd00:2::1".parse::<Ipv6Addr>().expect("ip"), port));
    listening(target).await;
    let before = rss_kib(pid);
    // 64 addresses of one /64, one silent connection each: as many as all
    // pending-handshake slots, were each address its own source.
    let stop = tokio_util::sync::CancellationToken::new();
    for host in 1..=64u16 {
        let source = IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, host));
        silent_connections(source, target, 1, stop.clone());
    }
    // The flood holds every slot it can take.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A client the agent has never seen (from fd00:2::1, another /64).
    let mut times = Vec::new();
    for _ in 0..3 {
        times.push(control_plane.call(target).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.cancel();
    let after = rss_kib(pid);
    let times: Vec<Duration> = times
        .into_iter()
        .map(|t| t.expect("the new client is served during the flood"))
        .collect();
    println!(
        "64 silent connections from 64 addresses of fd00:1::/64: a new client's calls took {times:?}; \
         RSS {:.1} MiB before, {:.1} MiB after",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
    for time in &times {
        assert!(*time < Duration::from_secs(3), "{times:?}");
    }
    assert!(after < 64 * 1024, "RSS {after} KiB");
}

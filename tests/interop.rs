//! Stock gRPC clients against the real binary. grpcio ≥ 1.57, grpc-java and
//! grpc-swift send the Unix socket's path (URL-encoded) as `:authority`;
//! the requests here are those clients' frames, sent by hand (the Rust
//! clients refuse to send such an authority): on the Unix socket they are
//! answered, on the TCP listener h2's strict validation still refuses them.
//! `scripts/python-client-check.sh` runs a real grpcio client.

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::raw_h2::{RawH2, grpcio_authority};
use common::{Agent, free_port};
use instance_agent::api::proto;
use prost::Message;

const GET_STATUS: &str = "/instance_agent.v1.AgentService/GetStatus";

#[test]
fn a_grpcio_authority_is_answered_on_the_unix_socket() {
    let agent = Agent::builder().start();
    let stream = UnixStream::connect(&agent.socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let authority = grpcio_authority(&agent.socket);
    assert!(authority.contains("%2F"), "{authority}");
    let mut h2 = RawH2::handshake(stream).expect("handshake");
    // Three calls on one connection: the later ones refer to the client's
    // HPACK dynamic table, as grpcio's do.
    for stream_id in [1, 3, 5] {
        h2.call(stream_id, GET_STATUS, &authority, &[])
            .expect("send");
        let response = h2.response(stream_id).expect("a response");
        assert_eq!(
            response.reset, None,
            "stream {stream_id} was reset: {response:?}"
        );
        assert_eq!(response.header(":status"), Some("200"), "{response:?}");
        assert_eq!(response.header("grpc-status"), Some("0"), "{response:?}");
        let status = proto::GetStatusResponse::decode(RawH2::<UnixStream>::message(&response))
            .expect("a GetStatusResponse");
        assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    }
    // What HTTP/2 itself bounds: streams per connection, windows.
    let setting = |id: u16| {
        h2.server_settings
            .iter()
            .rev()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| *v)
    };
    assert_eq!(setting(0x3), Some(64), "SETTINGS_MAX_CONCURRENT_STREAMS");
    assert_eq!(
        setting(0x4),
        Some(64 * 1024),
        "SETTINGS_INITIAL_WINDOW_SIZE"
    );
    assert_eq!(
        setting(0x6),
        Some(16 * 1024),
        "SETTINGS_MAX_HEADER_LIST_SIZE"
    );
}

#[test]
fn the_tcp_listener_keeps_strict_authority_validation() {
    let port = free_port();
    let agent = Agent::builder()
        .config(&format!(
            "[control_plane]\nlisten = \"127.0.0.1:{port}\"\ninsecure_plaintext = true\n"
        ))
        .start();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(error) => {
                assert!(std::time::Instant::now() < deadline, "{error}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut h2 = RawH2::handshake(stream).expect("handshake");
    h2.call(1, GET_STATUS, &grpcio_authority(&agent.socket), &[])
        .expect("send");
    let refused = h2.response(1).expect("a response");
    assert_eq!(refused.reset, Some(0x1), "PROTOCOL_ERROR: {refused:?}");
    // A valid authority on the same connection is answered.
    h2.call(3, GET_STATUS, "localhost", &[]).expect("send");
    let answered = h2.response(3).expect("a response");
    assert_eq!(answered.header("grpc-status"), Some("0"), "{answered:?}");
}

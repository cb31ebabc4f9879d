//! The guard with a recording service behind it: roles, dry runs, limits,
//! streams and refusals before the body is read.
use super::*;
use crate::api::auth::Role;
use crate::api::peer::Who;
use std::sync::Mutex;
use tower::{Layer, Service, ServiceExt};

fn framed(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

fn request(path: &str, body: Bytes, peer: Option<Peer>) -> http::Request<Body> {
    let mut request = http::Request::builder()
        .uri(format!("http://agent{path}"))
        .header("content-type", "application/grpc")
        .body(Body::new(http_body_util::Full::new(body)))
        .unwrap();
    if let Some(peer) = peer {
        request.extensions_mut().insert(peer);
    }
    request
}

fn peer(role: Role, uid: u32) -> Peer {
    Peer {
        role,
        who: Who::Local {
            uid,
            user: None,
            pid: None,
        },
    }
}

type Seen = Arc<Mutex<Vec<(String, Bytes)>>>;

/// An inner service that records the bodies it was given and answers OK.
fn recording() -> (
    Seen,
    impl tower::Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let service = tower::service_fn(move |req: http::Request<Body>| {
        let seen = seen2.clone();
        async move {
            let path = req.uri().path().to_owned();
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            seen.lock().unwrap().push((path, bytes));
            let mut response = http::Response::new(Body::empty());
            response
                .headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("0"));
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    (seen, service)
}

fn layer(config: ApiConfig) -> GuardLayer {
    let (_tx, rx) = watch::channel(Arc::new(config));
    GuardLayer::new(rx)
}

async fn call<S>(
    guard: &mut Guard<S>,
    path: &str,
    body: Bytes,
    peer: Option<Peer>,
) -> http::Response<Body>
where
    S: tower::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let ready = guard.ready().await.expect("infallible");
    ready
        .call(request(path, body, peer))
        .await
        .expect("infallible")
}

async fn status_of(response: http::Response<Body>) -> Code {
    Status::from_header_map(response.headers())
        .map(|s| s.code())
        .unwrap_or(Code::Unknown)
}

#[tokio::test]
async fn operator_is_refused_mutations_and_real_reclaims() {
    let (seen, inner) = recording();
    let mut guard = layer(ApiConfig::default()).layer(inner);
    let operator = peer(Role::Operator, 1000);
    let cancel = framed(&proto::CancelJobRequest { id: "j".into() });
    let response = call(
        &mut guard,
        "/instance_agent.v1.JobService/CancelJob",
        cancel,
        Some(operator.clone()),
    )
    .await;
    assert_eq!(status_of(response).await, Code::PermissionDenied);

    let reclaim = "/instance_agent.v1.DiskService/ReclaimSpace";
    let real = framed(&proto::ReclaimSpaceRequest {
        dry_run: false,
        ..Default::default()
    });
    let response = call(&mut guard, reclaim, real, Some(operator.clone())).await;
    assert_eq!(status_of(response).await, Code::PermissionDenied);

    let dry = framed(&proto::ReclaimSpaceRequest {
        dry_run: true,
        ..Default::default()
    });
    let response = call(&mut guard, reclaim, dry.clone(), Some(operator.clone())).await;
    assert_eq!(status_of(response).await, Code::Ok);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "only the dry run reached the service");
    assert_eq!(seen[0], (reclaim.to_string(), dry), "body passed on intact");
}

#[tokio::test]
async fn a_refused_call_is_answered_without_reading_its_body() {
    let (seen, inner) = recording();
    let mut guard = layer(ApiConfig::default()).layer(inner);
    // A body that never ends: reading it would never return.
    let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(1);
    let body = Body::new(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let mut request = http::Request::builder()
        .uri("http://agent/instance_agent.v1.JobService/SubmitJob")
        .body(body)
        .unwrap();
    request.extensions_mut().insert(peer(Role::Operator, 1000));
    let ready = guard.ready().await.expect("infallible");
    let response = tokio::time::timeout(Duration::from_secs(5), ready.call(request))
        .await
        .expect("answered at once")
        .expect("infallible");
    assert_eq!(status_of(response).await, Code::PermissionDenied);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn health_watch_and_reflection_count_as_streams() {
    // A service whose reply has a body, as a stream's has (tonic drops
    // an empty one at once, and the slot with it).
    let inner = tower::service_fn(|_: http::Request<Body>| async {
        let mut response = http::Response::new(Body::new(http_body_util::Full::new(
            Bytes::from_static(b"message"),
        )));
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("0"));
        Ok::<_, std::convert::Infallible>(response)
    });
    let mut guard = layer(ApiConfig {
        limits: crate::api::config::LimitsConfig {
            max_streams_per_peer: 1,
            ..Default::default()
        },
        ..ApiConfig::default()
    })
    .layer(inner);
    let operator = Some(peer(Role::Operator, 1000));
    let first = call(
        &mut guard,
        "/grpc.health.v1.Health/Watch",
        Bytes::new(),
        operator.clone(),
    )
    .await;
    for path in [
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ] {
        let response = call(&mut guard, path, Bytes::new(), operator.clone()).await;
        assert_eq!(status_of(response).await, Code::ResourceExhausted, "{path}");
    }
    // Health Check is unary: not counted.
    let check = call(
        &mut guard,
        "/grpc.health.v1.Health/Check",
        Bytes::new(),
        operator.clone(),
    )
    .await;
    assert_eq!(status_of(check).await, Code::Ok);
    drop(first);
    let again = call(
        &mut guard,
        "/grpc.health.v1.Health/Watch",
        Bytes::new(),
        operator,
    )
    .await;
    assert_eq!(status_of(again).await, Code::Ok);
}

#[tokio::test]
async fn missing_peer_is_unauthenticated() {
    let (_seen, inner) = recording();
    let mut guard = layer(ApiConfig::default()).layer(inner);
    let response = call(
        &mut guard,
        "/instance_agent.v1.AgentService/GetStatus",
        Bytes::new(),
        None,
    )
    .await;
    assert_eq!(status_of(response).await, Code::Unauthenticated);
}

#[tokio::test]
async fn oversized_message_names_the_limit() {
    let (seen, inner) = recording();
    let mut guard = layer(ApiConfig {
        limits: crate::api::config::LimitsConfig {
            max_message_bytes: 16384,
            ..Default::default()
        },
        ..ApiConfig::default()
    })
    .layer(inner);
    let mut spec = proto::JobSpec::default();
    spec.labels.insert("big".into(), "x".repeat(20_000));
    let big = framed(&proto::SubmitJobRequest { spec: Some(spec) });
    let response = call(
        &mut guard,
        "/instance_agent.v1.JobService/SubmitJob",
        big,
        Some(peer(Role::Admin, 0)),
    )
    .await;
    let status = Status::from_header_map(response.headers()).unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .contains("limits.max_message_bytes = 16384"),
        "{status:?}"
    );
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn cancel_job_grant_applies() {
    let (_seen, inner) = recording();
    let mut guard = layer(ApiConfig {
        operator: crate::api::config::OperatorConfig {
            allow_cancel_job: true,
            ..Default::default()
        },
        ..ApiConfig::default()
    })
    .layer(inner);
    let response = call(
        &mut guard,
        "/instance_agent.v1.JobService/CancelJob",
        framed(&proto::CancelJobRequest { id: "j".into() }),
        Some(peer(Role::Operator, 1000)),
    )
    .await;
    assert_eq!(status_of(response).await, Code::Ok);
}

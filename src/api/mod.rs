//! The gRPC surface: converts protobuf to domain types and back, calls the
//! domain, and maps domain errors to status codes. Prost types never leave
//! this module (and the CLI, which is a client of it).
//!
//! The local Unix socket is bound by [`socket`]. Security sits in front of
//! the services: [`listen`] identifies each connection's peer ([`peer`],
//! [`tls`]), and the [`guard`] layer applies the per-peer [`limits`], the
//! [`auth`] table and the [`audit`] log to every call.

pub mod access;
pub mod agent;
pub mod apps;
pub mod audit;
pub mod auth;
pub mod authority;
pub mod config;
pub mod disk;
pub mod guard;
pub mod handshakes;
pub mod images;
pub mod jobs;
pub mod lifecycle;
pub mod limits;
pub mod listen;
pub mod metered;
pub mod mounts;
pub mod peer;
pub mod refusal;
pub mod setup;
pub mod socket;
pub mod tls;

use std::pin::Pin;
use std::time::SystemTime;

use tokio_stream::Stream;
use tonic::Status;
use tonic::service::Routes;

/// The generated protobuf types, clients and servers of `instance_agent.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("instance_agent.v1");
    include!(concat!(env!("OUT_DIR"), "/instance_agent.v1.serde.rs"));

    /// The encoded descriptor set of the whole contract, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/instance_agent_descriptor.bin"));
}

/// HTTP/2 flow-control window of one request stream: what a client may
/// send before the agent reads it.
pub const HTTP2_STREAM_WINDOW: u32 = 64 * 1024;
/// The same for a whole connection.
pub const HTTP2_CONNECTION_WINDOW: u32 = 256 * 1024;
/// Largest header list accepted (hyper's default, said here).
pub const HTTP2_MAX_HEADER_LIST: u32 = 16 * 1024;

/// The full names of the services, as reflection and health list them.
pub const SERVICE_NAMES: [&str; 9] = [
    "instance_agent.v1.AgentService",
    "instance_agent.v1.JobService",
    "instance_agent.v1.ImageService",
    "instance_agent.v1.AppService",
    "instance_agent.v1.DiskService",
    "instance_agent.v1.SetupService",
    "instance_agent.v1.MountService",
    "instance_agent.v1.AccessService",
    "instance_agent.v1.LifecycleService",
];

/// Whether `path` (`/package.Service/Method`) is a method these routes
/// serve. Anything else comes from a client and must not become a metric
/// label of its own.
pub fn is_served_method(path: &str) -> bool {
    auth::lookup(path).is_some() || auth::INFRASTRUCTURE_METHODS.contains(&path)
}

/// The reply of a server-streaming RPC: its messages, or the status that
/// ends it. Boxed, so that each service adapts whatever stream its domain
/// hands out.
pub type ReplyStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The reply of `StreamJobLogs` and `StreamSetupLogs`: both send captured
/// output as the same `LogChunk`.
pub type LogChunkStream = ReplyStream<proto::LogChunk>;

/// Converts a wall-clock time to a protobuf timestamp.
pub fn timestamp(time: SystemTime) -> pbjson_types::Timestamp {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since_epoch.subsec_nanos()).unwrap_or(0),
    }
}

/// Everything the services need, built by the daemon.
pub struct ApiParts {
    /// Status and events.
    pub agent: agent::AgentApi,
    /// Jobs.
    pub jobs: jobs::JobApi,
    /// Images and registry credentials.
    pub images: images::ImageApi,
    /// Apps.
    pub apps: apps::AppApi,
    /// File share mounts.
    pub mounts: mounts::MountApi,
    /// Setup scripts.
    pub setup: setup::SetupApi,
    /// The disk guard.
    pub disk: disk::DiskApi,
    /// SSH access.
    pub access: access::AccessApi,
    /// Activity and idle shutdown.
    pub lifecycle: lifecycle::LifecycleApi,
    /// `limits.max_message_bytes`: the largest request message each service decodes.
    pub max_message_bytes: usize,
}

/// Builds the routes of all services plus health and reflection, and returns
/// the health reporter so the daemon can mark services serving or not.
pub fn routes(
    parts: ApiParts,
) -> Result<(Routes, tonic_health::server::HealthReporter), tonic_reflection::server::Error> {
    use proto::access_service_server::AccessServiceServer;
    use proto::agent_service_server::AgentServiceServer;
    use proto::app_service_server::AppServiceServer;
    use proto::disk_service_server::DiskServiceServer;
    use proto::image_service_server::ImageServiceServer;
    use proto::job_service_server::JobServiceServer;
    use proto::lifecycle_service_server::LifecycleServiceServer;
    use proto::mount_service_server::MountServiceServer;
    use proto::setup_service_server::SetupServiceServer;

    let (reporter, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let max = parts.max_message_bytes;
    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AgentServiceServer::new(parts.agent).max_decoding_message_size(max))
        .add_service(JobServiceServer::new(parts.jobs).max_decoding_message_size(max))
        .add_service(ImageServiceServer::new(parts.images).max_decoding_message_size(max))
        .add_service(AppServiceServer::new(parts.apps).max_decoding_message_size(max))
        .add_service(DiskServiceServer::new(parts.disk).max_decoding_message_size(max))
        .add_service(SetupServiceServer::new(parts.setup).max_decoding_message_size(max))
        .add_service(MountServiceServer::new(parts.mounts).max_decoding_message_size(max))
        .add_service(AccessServiceServer::new(parts.access).max_decoding_message_size(max))
        .add_service(LifecycleServiceServer::new(parts.lifecycle).max_decoding_message_size(max));
    Ok((routes, reporter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_methods_are_the_contract_health_and_reflection() {
        for served in [
            "/instance_agent.v1.AgentService/GetStatus",
            "/instance_agent.v1.DiskService/ReclaimSpace",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(is_served_method(served), "{served}");
        }
        for other in [
            "/instance_agent.v1.AgentService/NoSuchMethod",
            "/x.Y/Z",
            "/grpc.health.v1.Health/Anything",
            "",
        ] {
            assert!(!is_served_method(other), "{other}");
        }
    }
}

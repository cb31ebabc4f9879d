//! Jobs: containerised work run through the local Docker engine.
//!
//! Owns the engine trait ([`engine::ContainerEngine`]) and its bollard
//! implementation, and the docker condition. Knows nothing of gRPC.

pub mod engine;
pub mod engine_monitor;

/// Label on every container the agent creates: the owning instance's id.
pub const LABEL_INSTANCE: &str = "io.instance-agent.instance";
/// Label on every container the agent creates: the job id.
pub const LABEL_JOB: &str = "io.instance-agent.job";

//! Jobs: containerised work run through the local Docker engine.
//!
//! Owns the engine trait ([`engine::ContainerEngine`]) and its bollard
//! implementation, and the docker condition. Knows nothing of gRPC.

pub mod engine;
pub mod engine_monitor;

//! Compiles the gRPC contract in `proto/` with protox (pure Rust, no protoc),
//! generates serde (proto3 JSON) impls for the CLI's `--json`, and writes the
//! descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/instance_agent/v1/common.proto",
        "proto/instance_agent/v1/images.proto",
        "proto/instance_agent/v1/jobs.proto",
        "proto/instance_agent/v1/apps.proto",
        "proto/instance_agent/v1/disk.proto",
        "proto/instance_agent/v1/setup.proto",
        "proto/instance_agent/v1/mounts.proto",
        "proto/instance_agent/v1/lifecycle.proto",
        "proto/instance_agent/v1/agent.proto",
        "proto/instance_agent/v1/access.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(files, ["proto"])?;
    let encoded = prost::Message::encode_to_vec(&descriptors);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("instance_agent_descriptor.bin"), &encoded)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .build(&[".instance_agent"])?;
    Ok(())
}

//! Job spec validation: any spec (JSON of the domain type) is either refused
//! with a field and a problem, or accepted with its limits kept, clean
//! absolute paths, and validation idempotent; it never panics.
#![no_main]

use instance_agent::config::JobsConfig;
use instance_agent::jobs::spec::{HostLimits, JobSpec, MountSource, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<JobSpec>(data) else {
        return;
    };
    let config = JobsConfig {
        allowed_host_roots: vec!["/home".into(), "/mnt".into()],
        allowed_networks: vec!["none".into(), "bridge".into()],
        ..JobsConfig::default()
    };
    let host = HostLimits {
        capacity: 8,
        usable_cores: 4.0,
        memory_bytes: 16 << 30,
        gpus: 2,
    };
    let accepted = match validate(spec, &config, host) {
        Ok(accepted) => accepted,
        Err(error) => {
            assert!(!error.field.is_empty(), "a refusal names its field: {error}");
            return;
        }
    };
    assert!(accepted.env.len() <= config.max_env_entries as usize);
    assert!(accepted.labels.len() <= config.max_labels as usize);
    assert!(accepted.command.len() <= config.max_command_args as usize);
    assert!(!accepted.command.is_empty());
    assert!(accepted.slots >= 1 && accepted.slots <= host.capacity);
    for mount in &accepted.mounts {
        assert!(instance_agent::paths::check_clean_absolute(mount.container_path.as_ref()).is_ok());
        if let MountSource::HostPath(path) = &mount.source {
            assert!(instance_agent::paths::check_clean_absolute(path).is_ok());
            assert!(
                config
                    .allowed_host_roots
                    .iter()
                    .any(|root| instance_agent::paths::is_under(path, root)),
                "{} accepted outside the roots",
                path.display()
            );
        }
    }
    let again = validate(accepted.clone(), &config, host).expect("an accepted spec stays accepted");
    assert_eq!(again, accepted, "validation is not idempotent");
});

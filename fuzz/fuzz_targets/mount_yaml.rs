//! Mount spec → blobfuse2 YAML: whatever the account, container, endpoint,
//! subdirectory, cache path and secret (fields of the input separated by NUL
//! bytes), the rendered YAML parses back to exactly the expected keys, every
//! value comes back unchanged in its place, and the secret appears nowhere
//! but under its own key; rendering never panics.
#![no_main]

use std::path::{Path, PathBuf};

use instance_agent::mounts::spec::SecretSource;
use instance_agent::mounts::{Auth, MountSpec, Origin, render::render};
use instance_agent::secret::Secret;
use libfuzzer_sys::fuzz_target;
use serde_norway::Value;

const LOG: &str = "/var/log/instance-agent/mounts/fuzz.log";

/// Every string in the document, with the path of keys that leads to it.
fn strings<'a>(value: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::String(s) => out.push((at, s)),
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, format!("{at}[{i}]"), out);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map {
                strings(v, format!("{at}.{}", k.as_str().unwrap_or("?")), out);
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut fields = data.split(|b| *b == 0).map(String::from_utf8_lossy);
    let mut next = || fields.next().map(|f| f.into_owned()).unwrap_or_default();
    let (account, container, endpoint, subdirectory, secret, cache, flags) =
        (next(), next(), next(), next(), next(), next(), next());
    let sas = flags.bytes().next().is_some_and(|b| b & 1 == 1);
    let read_only = flags.bytes().next().is_some_and(|b| b & 2 == 2);
    let given = Secret::from_text(&secret);
    let source = SecretSource::Given(given.clone());
    let spec = MountSpec {
        name: "fuzz".into(),
        account: account.clone(),
        container: container.clone(),
        mount_path: "/mnt/fuzz".into(),
        auth: if sas { Auth::SasToken(source) } else { Auth::AccountKey(source) },
        read_only,
        cache_dir: PathBuf::from(format!("/mnt/cache/{cache}")),
        cache_max_bytes: 1 << 30,
        endpoint: endpoint.clone(),
        subdirectory: subdirectory.clone(),
        origin: Origin::Api,
    };
    let yaml = render(&spec, Some(&given), Path::new(LOG));
    let parsed: Value = serde_norway::from_str(&yaml)
        .unwrap_or_else(|e| panic!("rendered YAML does not parse ({e}):\n{yaml}"));

    let mut keys: Vec<&str> = parsed
        .as_mapping()
        .expect("a mapping at the top")
        .keys()
        .filter_map(Value::as_str)
        .collect();
    keys.sort_unstable();
    let mut expected = vec![
        "allow-other", "attr_cache", "azstorage", "components", "file_cache", "libfuse", "logging",
    ];
    if read_only {
        expected.push("read-only");
    }
    expected.sort_unstable();
    assert_eq!(keys, expected, "top-level keys changed:\n{yaml}");

    let az = &parsed["azstorage"];
    assert_eq!(az["account-name"].as_str(), Some(account.as_str()));
    assert_eq!(az["container"].as_str(), Some(container.as_str()));
    if !endpoint.is_empty() {
        assert_eq!(az["endpoint"].as_str(), Some(endpoint.as_str()));
    }
    if !subdirectory.is_empty() {
        assert_eq!(az["subdirectory"].as_str(), Some(subdirectory.as_str()));
    }
    let secret_key = if sas { "sas" } else { "account-key" };
    assert_eq!(az[secret_key].as_str(), Some(given.expose().as_str()));
    assert_eq!(
        parsed["file_cache"]["path"].as_str(),
        spec.cache_dir.to_str()
    );

    // The secret shows up only under its key, unless another input field
    // carries the same text (then its presence there proves nothing).
    let secret = given.expose();
    let inputs = [&account, &container, &endpoint, &subdirectory, &cache];
    if secret.len() >= 4 && !inputs.iter().any(|f| f.contains(secret)) && !LOG.contains(secret) {
        let mut all = Vec::new();
        strings(&parsed, String::new(), &mut all);
        for (at, value) in all {
            if at != format!(".azstorage.{secret_key}") {
                assert!(!value.contains(secret), "the secret leaked into {at}:\n{yaml}");
            }
        }
    }
});

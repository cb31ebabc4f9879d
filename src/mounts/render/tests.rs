//! The rendered blobfuse2 config: its shape for each auth mode, and (a
//! property test) that any value comes back from the YAML unchanged.

use super::*;
use crate::mounts::spec::{ManagedIdentity, Origin, Owner, SecretSource};

fn spec(auth: Auth) -> MountSpec {
    MountSpec {
        name: "data".into(),
        account: "myacct".into(),
        container: "data".into(),
        mount_path: "/mnt/data".into(),
        auth,
        read_only: false,
        cache_dir: "/mnt/instance-agent/cache/data".into(),
        cache_max_bytes: 4 << 30,
        endpoint: String::new(),
        subdirectory: String::new(),
        origin: Origin::Api,
        owner: Some(Owner {
            uid: 1000,
            gid: 1001,
        }),
    }
}

const LOG: &str = "/var/log/instance-agent/mounts/data.log";

const HEAD: &str = "\
allow-other: false
allow-root: true
logging:
  type: base
  level: log_warning
  file-path: /var/log/instance-agent/mounts/data.log
components:
- libfuse
- file_cache
- attr_cache
- azstorage
libfuse:
  uid: 1000
  gid: 1001
  default-permission: 488
  attribute-expiration-sec: 120
  entry-expiration-sec: 120
  negative-entry-expiration-sec: 120
file_cache:
  path: /mnt/instance-agent/cache/data/blobfuse2
  timeout-sec: 120
  max-size-mb: 4096
  cleanup-on-start: true
  allow-non-empty-temp: true
attr_cache:
  timeout-sec: 120
";

#[test]
fn golden_account_key() {
    let key = Secret::from_text("bXlrZXk=+/x==");
    let s = spec(Auth::AccountKey(SecretSource::Given(key.clone())));
    let expected = format!(
        "{HEAD}azstorage:\n  type: block\n  account-name: myacct\n  container: data\n  mode: key\n  account-key: bXlrZXk=+/x==\n"
    );
    assert_eq!(render(&s, Some(&key), Path::new(LOG), 0o750), expected);
}

#[test]
fn golden_sas_read_only_with_endpoint_and_subdirectory() {
    let sas = Secret::from_text("?sv=2022-11-02&ss=b&sig=abc%2Bdef%3D");
    let mut s = spec(Auth::SasToken(SecretSource::Given(sas.clone())));
    s.read_only = true;
    s.endpoint = "https://myacct.blob.core.windows.net".into();
    s.subdirectory = "team/a".into();
    let expected = format!(
        "allow-other: false\nallow-root: true\nread-only: true\n{}azstorage:\n  type: block\n  account-name: myacct\n  container: data\n  endpoint: https://myacct.blob.core.windows.net\n  subdirectory: team/a\n  mode: sas\n  sas: ?sv=2022-11-02&ss=b&sig=abc%2Bdef%3D\n",
        HEAD.strip_prefix("allow-other: false\nallow-root: true\n")
            .unwrap()
    );
    assert_eq!(render(&s, Some(&sas), Path::new(LOG), 0o750), expected);
}

#[test]
fn a_jobs_only_mount_is_roots_without_allow_root_and_never_allow_other() {
    let mut s = spec(Auth::ManagedIdentity(ManagedIdentity::default()));
    s.owner = Some(Owner::ROOT);
    let yaml = render(&s, None, Path::new(LOG), 0o700);
    let parsed: serde_norway::Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(parsed["allow-other"].as_bool(), Some(false));
    assert!(parsed.get("allow-root").is_none(), "{yaml}");
    assert_eq!(parsed["libfuse"]["uid"].as_u64(), Some(0));
    assert_eq!(parsed["libfuse"]["gid"].as_u64(), Some(0));
    assert_eq!(
        parsed["libfuse"]["default-permission"].as_u64(),
        Some(0o700)
    );
}

#[test]
fn golden_managed_identity() {
    let system = spec(Auth::ManagedIdentity(ManagedIdentity::default()));
    assert_eq!(
        render(&system, None, Path::new(LOG), 0o750),
        format!(
            "{HEAD}azstorage:\n  type: block\n  account-name: myacct\n  container: data\n  mode: msi\n"
        )
    );
    let user = spec(Auth::ManagedIdentity(ManagedIdentity {
        client_id: "11111111-2222-3333-4444-555555555555".into(),
        ..Default::default()
    }));
    assert_eq!(
        render(&user, None, Path::new(LOG), 0o750),
        format!(
            "{HEAD}azstorage:\n  type: block\n  account-name: myacct\n  container: data\n  mode: msi\n  appid: 11111111-2222-3333-4444-555555555555\n"
        )
    );
}

#[test]
fn golden_managed_identity_by_resource_id_and_by_object_id() {
    let by_resource = spec(Auth::ManagedIdentity(ManagedIdentity {
            resource_id: "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1".into(),
            ..Default::default()
        }));
    assert_eq!(
        render(&by_resource, None, Path::new(LOG), 0o750),
        format!(
            "{HEAD}azstorage:\n  type: block\n  account-name: myacct\n  container: data\n  mode: msi\n  resid: /subscriptions/0000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1\n"
        )
    );
    let by_object = spec(Auth::ManagedIdentity(ManagedIdentity {
        object_id: "66666666-7777-8888-9999-000000000000".into(),
        ..Default::default()
    }));
    assert_eq!(
        render(&by_object, None, Path::new(LOG), 0o750),
        format!(
            "{HEAD}azstorage:\n  type: block\n  account-name: myacct\n  container: data\n  mode: msi\n  objid: 66666666-7777-8888-9999-000000000000\n"
        )
    );
}

#[test]
fn hostile_values_stay_values() {
    // A secret that looks like YAML must come back as the same string.
    let key = Secret::from_text("a: b\n- c # d");
    let s = spec(Auth::AccountKey(SecretSource::Given(key.clone())));
    let yaml = render(&s, Some(&key), Path::new(LOG), 0o750);
    let parsed: serde_norway::Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(
        parsed["azstorage"]["account-key"].as_str(),
        Some(key.expose().as_str())
    );
}

#[test]
fn cache_size_is_mebibytes_at_least_one() {
    assert_eq!(cache_megabytes(0), 1);
    assert_eq!(cache_megabytes(5 << 20), 5);
    assert_eq!(cache_megabytes((5 << 20) + 1), 5);
}

mod properties {
    //! Property test (proptest): whatever the values — YAML syntax,
    //! quotes, newlines, keywords like `null` or `true`, any Unicode —
    //! they come back from the rendered YAML as the same strings, in the
    //! same places, and add no key.
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,24}",
            "[:#\\-\n'\"{}\\[\\],&*!|>%@` ?~]{0,16}",
            Just("null".to_string()),
            Just("true".to_string()),
            Just("0x1F".to_string()),
            Just("---".to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn values_round_trip(
            account in text(),
            container in text(),
            endpoint in text(),
            subdirectory in text(),
            secret in text(),
            cache in text(),
            sas in any::<bool>(),
            read_only in any::<bool>(),
        ) {
            let given = Secret::from_text(&secret);
            let auth = if sas {
                Auth::SasToken(SecretSource::Given(given.clone()))
            } else {
                Auth::AccountKey(SecretSource::Given(given.clone()))
            };
            let mut s = spec(auth);
            s.account = account.clone();
            s.container = container.clone();
            s.endpoint = endpoint.clone();
            s.subdirectory = subdirectory.clone();
            s.read_only = read_only;
            s.cache_dir = format!("/mnt/cache/{cache}").into();
            let yaml = render(&s, Some(&given), Path::new(LOG), 0o750);
            let parsed: serde_norway::Value = serde_norway::from_str(&yaml)
                .map_err(|e| TestCaseError::fail(format!("{e}: {yaml}")))?;
            let mut keys: Vec<&str> = parsed
                .as_mapping()
                .expect("a mapping")
                .keys()
                .filter_map(|k| k.as_str())
                .collect();
            keys.sort_unstable();
            let mut expected = vec![
                "allow-other", "allow-root", "attr_cache", "azstorage", "components",
                "file_cache", "libfuse", "logging",
            ];
            if read_only {
                expected.push("read-only");
            }
            expected.sort_unstable();
            prop_assert_eq!(keys, expected);
            let az = &parsed["azstorage"];
            prop_assert_eq!(az["account-name"].as_str(), Some(account.as_str()));
            prop_assert_eq!(az["container"].as_str(), Some(container.as_str()));
            let (field, other) = if sas { ("sas", "account-key") } else { ("account-key", "sas") };
            // Secret::from_text trims what a file or a shell may add.
            prop_assert_eq!(az[field].as_str(), Some(given.expose().as_str()));
            prop_assert!(az.get(other).is_none());
            if !endpoint.is_empty() {
                prop_assert_eq!(az["endpoint"].as_str(), Some(endpoint.as_str()));
            }
            if !subdirectory.is_empty() {
                prop_assert_eq!(az["subdirectory"].as_str(), Some(subdirectory.as_str()));
            }
            let cache_dir = crate::mounts::cache::blobfuse2_dir(&s.cache_dir);
            prop_assert_eq!(parsed["file_cache"]["path"].as_str(), cache_dir.to_str());
            prop_assert_eq!(parsed["logging"]["file-path"].as_str(), Some(LOG));
        }
    }
}

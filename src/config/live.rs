//! Which keys change while the agent runs ([`LIVE_KEYS`]) and what a reload
//! changed ([`ConfigChanges`]), compared key by key on the flattened config.
//! Applying the live keys is `reload`'s business; a unit test there keeps the
//! two in step.

use std::collections::BTreeMap;

use super::Config;

/// Keys that take effect without a restart; every other key needs one.
/// A prefix ending in `.` covers a whole table.
pub(crate) const LIVE_KEYS: &[&str] = &[
    "agent.status_interval_seconds",
    "docker.check_interval_seconds",
    "events.backlog",
    "jobs.",
    "images.pull_policy",
    "images.max_concurrent_pulls",
    "images.pull_timeout_seconds",
    "images.prefetch_queued",
    "mounts.health_interval_seconds",
    "apps.allowed_host_ips",
    "apps.stop_grace_seconds",
    "apps.max_apps",
    "apps.log_tail_bytes",
    "disk.",
    "control_plane.uids",
    "operator.allow_cancel_job",
    "limits.max_streams_per_peer",
    "limits.requests_per_second_per_peer",
    "limits.request_burst_per_peer",
];

/// What a reload changed, split by whether it applies live.
#[derive(Debug, Default, PartialEq)]
pub struct ConfigChanges {
    /// Keys applied at once.
    pub live: Vec<String>,
    /// Keys that keep their old value until the agent restarts.
    pub need_restart: Vec<String>,
}

impl ConfigChanges {
    /// Compares two configs key by key.
    pub fn between(old: &Config, new: &Config) -> Self {
        let old = flatten(old);
        let new = flatten(new);
        let mut changes = ConfigChanges::default();
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        for key in keys {
            if old.get(key) == new.get(key) {
                continue;
            }
            if is_live(key) {
                changes.live.push(key.clone());
            } else {
                changes.need_restart.push(key.clone());
            }
        }
        changes
    }
}

/// Whether a dotted key (as [`flatten`] names it) takes effect without a restart.
pub(crate) fn is_live(key: &str) -> bool {
    LIVE_KEYS.iter().any(|live| {
        if let Some(table) = live.strip_suffix('.') {
            key.strip_prefix(table)
                .is_some_and(|rest| rest.starts_with('.'))
        } else {
            key == *live
        }
    })
}

/// Flattens a config into dotted keys with their TOML values, for diffing.
pub(crate) fn flatten(config: &Config) -> BTreeMap<String, toml::Value> {
    fn walk(prefix: &str, value: toml::Value, out: &mut BTreeMap<String, toml::Value>) {
        match value {
            toml::Value::Table(table) => {
                for (k, v) in table {
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other);
            }
        }
    }
    let mut out = BTreeMap::new();
    // A config always serialises: every field is a plain TOML type.
    if let Ok(value) = toml::Value::try_from(config) {
        walk("", value, &mut out);
    }
    out
}

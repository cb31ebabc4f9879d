//! Loading, parsing and the messages of the whole file: syntax and schema
//! errors with their line, section errors with the full key and its line,
//! overrides, the default file, and what a reload changes. Each section's own
//! rules are tested beside the section.

use std::path::{Path, PathBuf};

use super::live::flatten;
use super::messages::key_line;
use super::*;

fn p() -> &'static Path {
    Path::new("/etc/instance-agent/config.toml")
}

#[test]
fn default_file_matches_default_struct() {
    let parsed = Config::parse(DEFAULT_CONFIG_TOML, p()).expect("default config parses");
    assert_eq!(parsed, Config::default());
}

#[test]
fn default_file_mentions_every_key() {
    for key in flatten(&Config::default()).keys() {
        let leaf = key.rsplit('.').next().expect("key has a leaf");
        assert!(
            DEFAULT_CONFIG_TOML.contains(&format!("{leaf} =")),
            "default.toml does not document {key}"
        );
    }
}

#[test]
fn empty_file_is_all_defaults() {
    assert_eq!(Config::parse("", p()).expect("parses"), Config::default());
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let err = Config::parse("[agent]\nshutdown_grace_second = 3\n", p()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("shutdown_grace_second"), "{msg}");
    assert!(msg.contains("line 2"), "{msg}");
    assert!(msg.contains("config.toml"), "{msg}");
}

#[test]
fn out_of_range_value_names_key_and_limit() {
    let err = Config::parse("[agent]\nshutdown_grace_seconds = 0\n", p()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("agent.shutdown_grace_seconds"), "{msg}");
    assert!(msg.contains("1 to 300"), "{msg}");
}

#[test]
fn a_value_of_the_wrong_type_names_the_line_the_key_and_the_type_in_words() {
    let text = "[agent]\nstatus_interval_seconds = 5\n\n[jobs]\nslots_per_core = \"two\"\n";
    let msg = Config::parse(text, p()).unwrap_err().to_string();
    assert!(msg.contains(&p().display().to_string()), "{msg}");
    assert!(msg.contains("line 5"), "{msg}");
    assert!(msg.contains("`jobs.slots_per_core`"), "{msg}");
    assert!(msg.contains("expected a whole number"), "{msg}");
    assert!(msg.contains("\"two\""), "{msg}");
    assert!(!msg.contains("u32"), "{msg}");
}

#[test]
fn a_table_given_as_a_value_says_a_table_is_expected() {
    let msg = Config::parse("agent = 3\n", p()).unwrap_err().to_string();
    assert!(msg.contains(&p().display().to_string()), "{msg}");
    assert!(msg.contains("line 1"), "{msg}");
    assert!(msg.contains("`agent`"), "{msg}");
    assert!(msg.contains("expected a table"), "{msg}");
    assert!(!msg.contains("AgentConfig"), "{msg}");
}

#[test]
fn an_unknown_nested_key_is_named_in_full_with_the_allowed_keys() {
    let text = "[jobs]\nslots_per_core = 2\n\n[agent]\nsocketz = \"/tmp/x\"\n";
    let msg = Config::parse(text, p()).unwrap_err().to_string();
    assert!(msg.contains(&p().display().to_string()), "{msg}");
    assert!(msg.contains("line 5"), "{msg}");
    assert!(msg.contains("`agent.socketz`"), "{msg}");
    assert!(msg.contains("allowed: instance_id, socket"), "{msg}");
}

#[test]
fn an_out_of_range_value_names_its_line() {
    let text = "# comment\n[jobs]\nslots_per_core = 0\n";
    let msg = Config::parse(text, p()).unwrap_err().to_string();
    assert!(msg.contains("line 3: key `jobs.slots_per_core`"), "{msg}");
    assert!(msg.contains("allowed"), "{msg}");
    // A key of an array of tables is found too.
    assert_eq!(
        key_line("a = 1\n[[m]]\nx = 1\n[[m]]\nx = 2\n", "m[1].x"),
        Some(5)
    );
    assert_eq!(key_line("[jobs]\n", "jobs.slots_per_core"), None);
}

#[test]
fn changes_split_into_live_and_restart() {
    let old = Config::default();
    let mut new = old.clone();
    new.docker.check_interval_seconds = 3;
    new.agent.socket = PathBuf::from("/tmp/other.sock");
    let changes = ConfigChanges::between(&old, &new);
    assert_eq!(changes.live, vec!["docker.check_interval_seconds"]);
    assert_eq!(changes.need_restart, vec!["agent.socket"]);
}

#[test]
fn overrides_win_over_file() {
    let mut config = Config::default();
    config.apply(&Overrides {
        socket: Some("/tmp/a.sock".into()),
        state_dir: Some("/tmp/state".into()),
    });
    assert_eq!(config.agent.socket, PathBuf::from("/tmp/a.sock"));
    assert_eq!(config.agent.state_dir, PathBuf::from("/tmp/state"));
}

#[test]
fn state_dir_flag_moves_the_default_root_paths_under_it() {
    let state_dir = Overrides {
        socket: None,
        state_dir: Some("/tmp/s".into()),
    };
    let mut config = Config::default();
    let derived = config.apply(&state_dir);
    assert_eq!(
        derived,
        ["agent.logs_dir", "agent.runtime_dir", "mounts.cache_root"]
    );
    assert_eq!(config.agent.logs_dir, PathBuf::from("/tmp/s/logs"));
    assert_eq!(config.agent.runtime_dir, PathBuf::from("/tmp/s/run"));
    assert_eq!(config.mounts.cache_root, PathBuf::from("/tmp/s/cache"));
    config.validate(p()).expect("still valid");

    // Keys the file set keep the file's value.
    let mut config = Config::parse("[agent]\nlogs_dir = \"/srv/logs\"\n", p()).expect("parses");
    let derived = config.apply(&state_dir);
    assert_eq!(derived, ["agent.runtime_dir", "mounts.cache_root"]);
    assert_eq!(config.agent.logs_dir, PathBuf::from("/srv/logs"));

    // Without --state-dir nothing moves.
    let mut config = Config::default();
    assert!(config.apply(&Overrides::default()).is_empty());
    assert_eq!(config, Config::default());
}

#[test]
fn every_section_reports_its_full_key_and_its_line() {
    // One bad value per section: the section names the key relative to its
    // table, the top level adds the table, the file and the line.
    let mount = "[[mounts.mount]]\nname = \"data\"\naccount = \"myacct\"\ncontainer = \"data\"\n\
                 auth = \"msi\"\nmount_path = \"/etc/data\"\n";
    for (text, expected) in [
        (
            "[agent]\nstate_dir = \"state\"\n",
            "line 2: key `agent.state_dir`: state must be an absolute path",
        ),
        (
            "[docker]\nsocket = \"docker.sock\"\n",
            "line 2: key `docker.socket`: docker.sock must be an absolute path",
        ),
        (
            "[events]\nbacklog = 1\n",
            "line 2: key `events.backlog`: 1 is out of range: allowed 16 to 1000000",
        ),
        (
            "[jobs]\nallowed_networks = [\"none\", \"a b\"]\n",
            "line 2: key `jobs.allowed_networks[1]`: \"a b\" is not a Docker network name",
        ),
        (
            mount,
            "line 6: key `mounts.mount[0].mount_path`: /etc/data is outside the allowed roots",
        ),
        (
            "[mounts]\nallowed_roots = [\"/\"]\n",
            "key `mounts.allowed_roots / mounts.cache_root`: \"/\" is too wide",
        ),
        (
            "[[setup.scripts]]\nkind = \"startup\"\npath = \"a.sh\"\n",
            "line 3: key `setup.scripts[0].path`: a.sh must be an absolute path",
        ),
        (
            "[setup]\nmax_args = 1\n[[setup.scripts]]\nkind = \"startup\"\npath = \"/opt/a.sh\"\n\
             args = [\"a\", \"b\"]\n",
            "line 6: key `setup.scripts[0].args`: 2 arguments exceed the limit of 1 (setup.max_args)",
        ),
        (
            "[disk]\nwarning_free_bytes = 1\n",
            "line 2: key `disk.warning_free_bytes`: 1 is below critical_free_bytes",
        ),
        (
            "[disk.overrides.\"/mnt\"]\nwarning_free_inodes_percent = 100.5\n",
            "key `disk.overrides.\"/mnt\".warning_free_inodes_percent`: 100.5 is out of range: \
             allowed 0 to 100",
        ),
        (
            "[metrics]\nlisten = \"0.0.0.0:9464\"\n",
            "line 2: key `metrics.listen`: 0.0.0.0:9464 is not a loopback address",
        ),
        (
            "[control_plane]\nlisten = \"127.0.0.1:7443\"\n",
            "key `control_plane.tls_cert`: must be set when listen is set",
        ),
        (
            "[operator]\ngroup = \"a b\"\n",
            "line 2: key `operator.group`: \"a b\" is not a group name",
        ),
        (
            "[limits]\nmax_message_bytes = 10\n",
            "line 2: key `limits.max_message_bytes`: 10 is out of range: allowed 16384 to 268435456",
        ),
    ] {
        let msg = Config::parse(text, p()).unwrap_err().to_string();
        let prefix = format!("config {}: ", p().display());
        assert!(
            msg.starts_with(&format!("{prefix}{expected}")),
            "{text}\ngot:      {msg}\nexpected: {prefix}{expected}"
        );
    }
}

#[test]
fn flags_are_validated_as_the_file_is() {
    let mut config = Config::default();
    config.apply(&Overrides {
        socket: Some("agent.sock".into()),
        state_dir: None,
    });
    let msg = config
        .validate(Path::new("<command-line flags>"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        "config <command-line flags>: key `agent.socket`: agent.sock must be an absolute path"
    );
}

//! The manual keeps up with the code: every key of the default config
//! (`src/config/default.toml`, which a unit test keeps equal to the code's
//! defaults), every RPC of `proto/`, and every CLI subcommand and option must
//! be documented under `docs/`; every relative link of the README and the
//! docs must lead to a file (and a heading) that exists, and the README must
//! link every page of the manual. Reads files only: no daemon, no network.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The pages of `docs/`, sorted by path.
fn pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(Path::new(REPO).join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.expect("read docs/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    assert!(!pages.is_empty(), "docs/ holds no page");
    pages
}

/// Every page of `docs/`, one after the other.
fn manual() -> String {
    pages()
        .iter()
        .map(|p| read(p))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The dotted keys of the default config, including the keys of the
/// commented-out example tables: `jobs.slots`, `mounts.mount[].name`,
/// `setup.scripts[].kind`, `disk.overrides.<path>.critical_free_bytes`.
fn config_keys() -> BTreeSet<String> {
    let text = read(&Path::new(REPO).join("src/config/default.toml"));
    let mut table = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_start();
        let line = line.strip_prefix('#').unwrap_or(line).trim();
        if let Some(header) = line.strip_prefix('[') {
            let (name, array) = match header.strip_prefix('[') {
                Some(inner) => (inner.split("]]").next().unwrap_or_default(), true),
                None => (header.split(']').next().unwrap_or_default(), false),
            };
            // A quoted segment is a path chosen by the administrator.
            let name: Vec<&str> = name
                .split('.')
                .map(|part| {
                    if part.starts_with('"') {
                        "<path>"
                    } else {
                        part
                    }
                })
                .collect();
            table = name.join(".");
            if array {
                table.push_str("[]");
            }
            continue;
        }
        let Some((key, _)) = line.split_once(" = ") else {
            continue;
        };
        let is_key = !key.is_empty()
            && key.starts_with(|c: char| c.is_ascii_lowercase())
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if is_key && !table.is_empty() {
            keys.insert(format!("{table}.{key}"));
        }
    }
    keys
}

#[test]
fn every_config_key_is_documented() {
    let keys = config_keys();
    // The parser above must see the whole file, commented tables included.
    for expected in [
        "agent.socket",
        "jobs.slots_per_core",
        "mounts.mount[].secret_file",
        "setup.scripts[].timeout",
        "disk.overrides.<path>.clear_margin_bytes",
        "metrics.listen",
    ] {
        assert!(keys.contains(expected), "{expected} not found in {keys:?}");
    }
    let manual = manual();
    let missing: Vec<&String> = keys
        .iter()
        .filter(|key| !manual.contains(&format!("`{key}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "config keys of src/config/default.toml not documented (as `key`) under docs/: {missing:?}"
    );
}

/// `(service, rpc)` for every RPC of `proto/instance_agent/v1/`.
fn rpcs() -> Vec<(String, String)> {
    let dir = Path::new(REPO).join("proto/instance_agent/v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("proto dir")
        .map(|e| e.expect("read proto dir").path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    files.sort();
    let mut rpcs = Vec::new();
    for file in files {
        let mut service = String::new();
        for line in read(&file).lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.trim_end_matches('{').trim().to_owned();
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let name = rest.split('(').next().unwrap_or_default().trim();
                rpcs.push((service.clone(), name.to_owned()));
            }
        }
    }
    rpcs
}

#[test]
fn every_rpc_is_documented_in_the_api_page() {
    let rpcs = rpcs();
    assert!(rpcs.len() >= 20, "too few RPCs found: {rpcs:?}");
    let api = read(&Path::new(REPO).join("docs/api.md"));
    let missing: Vec<String> = rpcs
        .iter()
        .flat_map(|(service, rpc)| [service, rpc])
        .filter(|name| !api.contains(&format!("`{name}`")))
        .map(String::clone)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(
        missing.is_empty(),
        "services or RPCs of proto/ not in docs/api.md (as `Name`): {missing:?}"
    );
}

/// Every subcommand path (`jobs submit`) with the long options it takes.
fn commands(command: &clap::Command, prefix: &str, out: &mut Vec<(String, Vec<String>)>) {
    for sub in command.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        let path = format!("{prefix}{}", sub.get_name()).trim().to_owned();
        let longs = sub
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .filter(|long| !matches!(*long, "help" | "version"))
            .map(|long| format!("--{long}"))
            .collect();
        out.push((path.clone(), longs));
        commands(sub, &format!("{path} "), out);
    }
}

#[test]
fn every_cli_subcommand_and_option_is_documented() {
    let mut all = Vec::new();
    commands(&instance_agent::cli::Cli::command(), "", &mut all);
    assert!(all.iter().any(|(path, _)| path == "jobs submit"), "{all:?}");
    let cli = read(&Path::new(REPO).join("docs/cli.md"));
    let mut missing = Vec::new();
    for (path, longs) in &all {
        if !cli.contains(&format!("`{path}")) && !cli.contains(&format!("instance-agent {path}")) {
            missing.push(path.clone());
        }
        for long in longs {
            if !cli.contains(long.as_str()) {
                missing.push(format!("{path} {long}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "CLI subcommands or options not documented in docs/cli.md: {missing:?}"
    );
}

/// A heading's anchor as GitHub makes it: lower case, spaces to `-`,
/// punctuation other than `-` and `_` dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

/// The targets of the inline links `[text](target)` of a Markdown text.
fn links(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = markdown;
    while let Some(start) = rest.find("](") {
        rest = &rest[start + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
    }
    out
}

#[test]
fn relative_links_lead_to_files_and_headings_that_exist() {
    let mut files = pages();
    files.push(Path::new(REPO).join("README.md"));
    let mut broken = Vec::new();
    for file in &files {
        let text = read(file);
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") {
                continue;
            }
            let (target, fragment) = match link.split_once('#') {
                Some((target, fragment)) => (target, Some(fragment)),
                None => (link.as_str(), None),
            };
            let path = if target.is_empty() {
                file.clone()
            } else {
                file.parent().expect("a file has a dir").join(target)
            };
            if !path.exists() {
                broken.push(format!("{}: {link}", file.display()));
                continue;
            }
            if let Some(fragment) = fragment
                && path.extension().is_some_and(|e| e == "md")
                && !anchors(&read(&path)).contains(fragment)
            {
                broken.push(format!("{}: {link} (no such heading)", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}

#[test]
fn the_readme_links_every_page_of_the_manual() {
    let readme = read(&Path::new(REPO).join("README.md"));
    let unlinked: Vec<String> = pages()
        .iter()
        .map(|p| format!("docs/{}", p.file_name().expect("name").to_string_lossy()))
        .filter(|page| !readme.contains(&format!("]({page})")))
        .collect();
    assert!(
        unlinked.is_empty(),
        "pages not linked from README.md: {unlinked:?}"
    );
}

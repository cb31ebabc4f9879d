//! sshd's configuration language, as far as the agent needs it: reading
//! directives (first value wins, `Include`, `Match`), checking that the main
//! config reads the drop-in before any `Match` block and that nothing read
//! before the drop-in sets one of its keywords, rendering the drop-in, the
//! keys file and the socket drop-in, the staged main config `sshd -t` checks
//! before anything is applied, and reading `sshd -T` back.
//!
//! Pure functions on text; the files are read and written by `files`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::policy::CheckedPolicy;

/// The keywords the drop-in sets (lowercase, as `sshd -T` prints them).
pub const KEYWORDS: [&str; 6] = [
    "port",
    "pubkeyauthentication",
    "authorizedkeysfile",
    "passwordauthentication",
    "kbdinteractiveauthentication",
    "allowtcpforwarding",
];

/// One directive of a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// 1-based line.
    pub line: usize,
    /// The keyword, lowercase.
    pub keyword: String,
    /// Its arguments (double quotes removed).
    pub args: Vec<String>,
}

/// The directives of a file: blank lines and comments skipped, `Key=value`
/// and `Key value` both read, `#` starting a word ends the line.
pub fn directives(text: &str) -> Vec<Directive> {
    let mut out = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let split = line
            .find(|c: char| c.is_whitespace() || c == '=')
            .unwrap_or(line.len());
        let (keyword, rest) = line.split_at(split);
        let rest = rest.trim_start();
        let rest = rest.strip_prefix('=').unwrap_or(rest);
        out.push(Directive {
            line: index + 1,
            keyword: keyword.to_ascii_lowercase(),
            args: words(rest),
        });
    }
    out
}

/// Splits arguments on blanks, honouring double quotes; a word starting
/// with `#` ends the line.
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '#' if !quoted && !in_word => break,
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(current);
    }
    out
}

/// Where the main config reads the drop-in: the `Include` line and which
/// of its patterns matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncludeSite {
    /// 1-based line of the `Include`.
    pub line: usize,
    /// Index of the matching pattern among its arguments.
    pub arg: usize,
    /// The pattern's file-name part (e.g. `*.conf`).
    pub name_pattern: String,
}

/// Checks that `main` (the text of `main_path`) reads `drop_in` through an
/// `Include` before any `Match` block, and that no line before it sets a
/// keyword of the drop-in (it would win). Else why not, for the refusal.
pub fn check_main(main: &str, main_path: &Path, drop_in: &Path) -> Result<IncludeSite, String> {
    let ssh_dir = main_path.parent().unwrap_or(Path::new("/"));
    let dir = drop_in.parent().unwrap_or(Path::new("/"));
    let name = file_name(drop_in);
    let all = directives(main);
    let first_match = all.iter().find(|d| d.keyword == "match").map(|d| d.line);
    let mut site = None;
    for directive in all.iter().filter(|d| d.keyword == "include") {
        for (arg, pattern) in directive.args.iter().enumerate() {
            let pattern = ssh_dir.join(pattern);
            let (Some(pattern_dir), Some(name_pattern)) = (pattern.parent(), pattern.file_name())
            else {
                continue;
            };
            let name_pattern = name_pattern.to_string_lossy();
            if pattern_dir == dir && glob_match(&name_pattern, &name) {
                site = Some(IncludeSite {
                    line: directive.line,
                    arg,
                    name_pattern: name_pattern.into_owned(),
                });
                break;
            }
        }
        if site.is_some() {
            break;
        }
    }
    let main_shown = main_path.display();
    let Some(site) = site else {
        return Err(format!(
            "{main_shown} has no `Include` that reads {}: the agent does not edit the main file; add \
             `Include {}/*.conf` as its first line (Debian and Ubuntu ship it)",
            drop_in.display(),
            dir.display()
        ));
    };
    if let Some(line) = first_match.filter(|&m| m < site.line) {
        return Err(format!(
            "{main_shown} line {}: the `Include` of {} comes after the `Match` block of line {line}, so \
             the drop-in would apply only to what that block matches; move the `Include` above it",
            site.line,
            dir.display()
        ));
    }
    if let Some(early) = all
        .iter()
        .find(|d| d.line < site.line && KEYWORDS.contains(&d.keyword.as_str()))
    {
        return Err(format!(
            "{main_shown} line {} sets {} before the `Include` of line {}, so it wins over the drop-in \
             (in sshd the first value wins); move it below the `Include`",
            early.line, early.keyword, site.line
        ));
    }
    Ok(site)
}

/// Refuses a drop-in that sshd reads before the agent's and that sets one
/// of its keywords other than `Port` (ports add up, the others would win).
pub fn check_earlier(path: &Path, text: &str) -> Result<(), String> {
    match directives(text)
        .into_iter()
        .find(|d| d.keyword != "port" && KEYWORDS.contains(&d.keyword.as_str()))
    {
        Some(d) => Err(format!(
            "{} line {} sets {} and sshd reads it before the agent's drop-in, so it would win; \
             rename it to sort after the agent's file or remove the line",
            path.display(),
            d.line,
            d.keyword
        )),
        None => Ok(()),
    }
}

/// The file-name part of a path, as text.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// glob(3) on one file name: `*` and `?` as wildcards, every other byte
/// literal; a name starting with `.` is matched only by a pattern that does.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    if name.starts_with('.') && !pattern.starts_with('.') {
        return false;
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// The main config for `sshd -t`, with the drop-in's pattern replaced by the
/// files it would read once the change is applied (`reads`, in sshd's
/// order: the staged drop-in in place of the real one). Every other line is
/// left as it is; relative paths still resolve against sshd's own dir.
pub fn staged_main(main: &str, site: &IncludeSite, reads: &[PathBuf]) -> String {
    let mut out = String::with_capacity(main.len() + 256);
    for (index, line) in main.lines().enumerate() {
        if index + 1 == site.line {
            let mut args = directives(line)
                .into_iter()
                .next()
                .map(|d| d.args)
                .unwrap_or_default();
            let files: Vec<String> = reads.iter().map(|p| quoted(&p.to_string_lossy())).collect();
            if site.arg < args.len() {
                args.splice(site.arg..=site.arg, files);
            }
            if args.is_empty() {
                out.push_str("# (the drop-in's Include read no file)");
            } else {
                out.push_str("Include ");
                out.push_str(&args.join(" "));
            }
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

fn quoted(word: &str) -> String {
    if word.chars().any(char::is_whitespace) {
        format!("\"{word}\"")
    } else {
        word.to_owned()
    }
}

/// The `AuthorizedKeysFile` value: one file per user below `keys_dir`.
pub fn keys_file_pattern(keys_dir: &Path) -> String {
    format!("{}/%u", keys_dir.display())
}

fn yes(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

/// The values the drop-in sets, in its order (the port is global only).
fn settings(policy: &CheckedPolicy, keys_dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("PubkeyAuthentication", "yes".into()),
        ("AuthorizedKeysFile", keys_file_pattern(keys_dir)),
        (
            "PasswordAuthentication",
            yes(policy.policy.password_authentication).into(),
        ),
        // Passwords reach PAM through keyboard-interactive too: always off,
        // so that PasswordAuthentication alone decides.
        ("KbdInteractiveAuthentication", "no".into()),
        (
            "AllowTcpForwarding",
            yes(policy.policy.allow_tcp_forwarding).into(),
        ),
    ]
}

/// The drop-in: the values at the top level (first value wins over every
/// later file), then again in a `Match all` block, because a `Match` block
/// of a later file would otherwise override them for the connections it
/// matches; among `Match` blocks the first value wins too, and this one is
/// read first. An included file's `Match` ends at the end of that file.
pub fn render_drop_in(policy: &CheckedPolicy, keys_dir: &Path) -> String {
    let mut out = String::from(
        "# Written by instance-agent: the SSH access policy of the control plane.\n\
         # Do not edit: a change by hand is reported as drift and undone at the agent's next\n\
         # start. To take SSH back by hand, see /usr/share/doc/instance-agent/docs/access.md.\n",
    );
    out.push_str(&format!("Port {}\n", policy.port));
    let settings = settings(policy, keys_dir);
    for (keyword, value) in &settings {
        out.push_str(&format!("{keyword} {value}\n"));
    }
    out.push_str("\n# The same for every connection, over any later Match block.\nMatch all\n");
    for (keyword, value) in &settings {
        out.push_str(&format!("\t{keyword} {value}\n"));
    }
    out
}

/// The keys file of the policy's user.
pub fn render_keys(policy: &CheckedPolicy) -> String {
    let mut out = String::from(
        "# Written by instance-agent: the keys of the SSH access policy. Replaced at every change.\n",
    );
    for key in &policy.keys {
        out.push_str(&key.line);
        out.push('\n');
    }
    out
}

/// The socket unit's drop-in: listen on the policy's port only (an empty
/// `ListenStream=` first drops the packaged one).
pub fn render_socket_drop_in(port: u16) -> String {
    format!(
        "# Written by instance-agent: the SSH access policy's port for socket activation.\n\
         [Socket]\nListenStream=\nListenStream={port}\n"
    )
}

/// The settings `sshd -T` printed: keyword (lowercase) to its values, in
/// order (`port` may have several).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effective(pub BTreeMap<String, Vec<String>>);

impl Effective {
    /// Reads `sshd -T` output.
    pub fn parse(output: &str) -> Self {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in output.lines() {
            let mut parts = line.trim().splitn(2, ' ');
            let (Some(key), value) = (parts.next(), parts.next()) else {
                continue;
            };
            if key.is_empty() {
                continue;
            }
            map.entry(key.to_ascii_lowercase())
                .or_default()
                .push(value.unwrap_or_default().trim().to_owned());
        }
        Self(map)
    }

    /// The first value of a keyword (empty when absent).
    pub fn get(&self, keyword: &str) -> &str {
        self.0
            .get(keyword)
            .and_then(|v| v.first())
            .map_or("", String::as_str)
    }

    /// Every port sshd listens on.
    pub fn ports(&self) -> Vec<u16> {
        self.0
            .get("port")
            .map(|v| v.iter().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether a yes/no keyword is `yes`.
    pub fn is_yes(&self, keyword: &str) -> bool {
        self.get(keyword) == "yes"
    }
}

/// Where the effective settings differ from the policy: each says the
/// keyword, what sshd uses and what the policy wants. `strict` also lists
/// ports sshd listens on besides the policy's (another file's `Port`).
pub fn differences(
    effective: &Effective,
    policy: &CheckedPolicy,
    keys_dir: &Path,
    strict: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    let ports = effective.ports();
    if !ports.contains(&policy.port) {
        out.push(format!(
            "port: sshd uses {ports:?}, the policy wants {}",
            policy.port
        ));
    } else if strict && ports.len() > 1 {
        out.push(format!(
            "port: sshd also listens on {:?} (a Port line of another file)",
            ports
                .iter()
                .filter(|&&p| p != policy.port)
                .collect::<Vec<_>>()
        ));
    }
    for (keyword, wanted) in settings(policy, keys_dir) {
        let key = keyword.to_ascii_lowercase();
        let seen = effective.get(&key);
        if seen != wanted {
            out.push(format!(
                "{key}: sshd uses {:?}, the policy wants {wanted:?}",
                seen
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::keys::tests::ed25519;
    use crate::access::policy::{PolicyRules, SshPolicy};

    const DEBIAN_MAIN: &str = "# This is the sshd server system-wide configuration file.\n\
        \n\
        Include /etc/ssh/sshd_config.d/*.conf\n\
        \n\
        #Port 22\n\
        KbdInteractiveAuthentication no\n\
        UsePAM yes\n\
        Subsystem\tsftp\t/usr/lib/openssh/sftp-server\n\
        # Match User anoncvs\n";

    fn main_path() -> PathBuf {
        "/etc/ssh/sshd_config".into()
    }

    fn drop_in() -> PathBuf {
        "/etc/ssh/sshd_config.d/00-instance-agent.conf".into()
    }

    fn checked(password: bool, forwarding: bool) -> CheckedPolicy {
        SshPolicy {
            enabled: true,
            port: 2222,
            user: "azureuser".into(),
            authorized_keys: vec![ed25519(1, "a"), ed25519(2, "b")],
            password_authentication: password,
            allow_tcp_forwarding: forwarding,
        }
        .check(PolicyRules {
            allow_password_authentication: true,
            max_authorized_keys: 10,
        })
        .expect("valid")
    }

    #[test]
    fn directives_read_both_forms_quotes_and_comments() {
        let all = directives(
            "  Port=2222\nAuthorizedKeysFile \"/a b/%u\" .ssh/k # trailing\n# x\nMatch all\n",
        );
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].keyword, "port");
        assert_eq!(all[0].args, ["2222"]);
        assert_eq!(all[1].args, ["/a b/%u", ".ssh/k"]);
        assert_eq!(all[1].line, 2);
        assert_eq!(all[2].keyword, "match");
    }

    #[test]
    fn debians_main_config_includes_the_drop_in_first() {
        let site = check_main(DEBIAN_MAIN, &main_path(), &drop_in()).expect("fine");
        assert_eq!(site.line, 3);
        assert_eq!(site.name_pattern, "*.conf");
        // A relative pattern resolves against /etc/ssh, as sshd does.
        let relative = "Include sshd_config.d/*.conf\n";
        assert!(check_main(relative, &main_path(), &drop_in()).is_ok());
    }

    #[test]
    fn a_main_config_the_drop_in_cannot_win_in_is_refused_with_the_reason() {
        let none = "PasswordAuthentication no\n";
        assert!(
            check_main(none, &main_path(), &drop_in())
                .unwrap_err()
                .contains("has no `Include`")
        );
        let after = "Match User x\n  X11Forwarding no\nInclude /etc/ssh/sshd_config.d/*.conf\n";
        let error = check_main(after, &main_path(), &drop_in()).unwrap_err();
        assert!(
            error.contains("line 3") && error.contains("Match` block of line 1"),
            "{error}"
        );
        let early = "PasswordAuthentication yes\nInclude /etc/ssh/sshd_config.d/*.conf\n";
        let error = check_main(early, &main_path(), &drop_in()).unwrap_err();
        assert!(
            error.contains("line 1 sets passwordauthentication"),
            "{error}"
        );
        let other_dir = "Include /etc/ssh/other.d/*.conf\n";
        assert!(check_main(other_dir, &main_path(), &drop_in()).is_err());
    }

    #[test]
    fn an_earlier_drop_in_setting_a_keyword_is_refused_but_a_port_is_not() {
        let path = Path::new("/etc/ssh/sshd_config.d/000-early.conf");
        assert!(check_earlier(path, "Port 22\nX11Forwarding no\n").is_ok());
        let error = check_earlier(path, "# x\npasswordauthentication yes\n").unwrap_err();
        assert!(
            error.contains("000-early.conf line 2 sets passwordauthentication"),
            "{error}"
        );
    }

    #[test]
    fn glob_is_globs() {
        assert!(glob_match("*.conf", "00-instance-agent.conf"));
        assert!(!glob_match("*.conf", ".00-instance-agent.conf.tmp"));
        assert!(!glob_match("*.conf", "x.conf.bak"));
        assert!(glob_match("0?-*.conf", "00-a.conf"));
        assert!(glob_match(
            "00-instance-agent.conf",
            "00-instance-agent.conf"
        ));
    }

    #[test]
    fn the_staged_main_reads_the_staged_drop_in_in_place_of_the_real_one() {
        let site = check_main(DEBIAN_MAIN, &main_path(), &drop_in()).expect("fine");
        let reads = vec![
            PathBuf::from("/etc/ssh/instance-agent/staging/00-instance-agent.conf"),
            PathBuf::from("/etc/ssh/sshd_config.d/50-cloud-init.conf"),
        ];
        let staged = staged_main(DEBIAN_MAIN, &site, &reads);
        let lines: Vec<&str> = staged.lines().collect();
        assert_eq!(
            lines[2],
            "Include /etc/ssh/instance-agent/staging/00-instance-agent.conf /etc/ssh/sshd_config.d/50-cloud-init.conf"
        );
        assert_eq!(lines.len(), DEBIAN_MAIN.lines().count());
        assert_eq!(lines[7], "Subsystem\tsftp\t/usr/lib/openssh/sftp-server");
    }

    #[test]
    fn the_drop_in_sets_every_keyword_globally_and_in_match_all() {
        let text = render_drop_in(
            &checked(false, true),
            Path::new("/etc/ssh/instance-agent/authorized_keys"),
        );
        let all = directives(&text);
        let match_line = all
            .iter()
            .position(|d| d.keyword == "match")
            .expect("a Match block");
        assert_eq!(all[match_line].args, ["all"]);
        let global: Vec<&str> = all[..match_line]
            .iter()
            .map(|d| d.keyword.as_str())
            .collect();
        assert_eq!(global, KEYWORDS);
        let inside: Vec<&str> = all[match_line + 1..]
            .iter()
            .map(|d| d.keyword.as_str())
            .collect();
        assert_eq!(inside, &KEYWORDS[1..], "Port is global only");
        assert!(text.contains("PasswordAuthentication no\n"));
        assert!(text.contains("AllowTcpForwarding yes\n"));
        assert!(text.contains("AuthorizedKeysFile /etc/ssh/instance-agent/authorized_keys/%u\n"));
    }

    #[test]
    fn effective_settings_are_compared_with_the_policy() {
        let keys_dir = Path::new("/k");
        let policy = checked(false, false);
        let good = "port 2222\npubkeyauthentication yes\nauthorizedkeysfile /k/%u\n\
                    passwordauthentication no\nkbdinteractiveauthentication no\nallowtcpforwarding no\n";
        let effective = Effective::parse(good);
        assert_eq!(effective.ports(), [2222]);
        assert!(differences(&effective, &policy, keys_dir, true).is_empty());
        let two_ports = Effective::parse(&format!("port 22\n{good}"));
        assert!(differences(&two_ports, &policy, keys_dir, false).is_empty());
        assert_eq!(differences(&two_ports, &policy, keys_dir, true).len(), 1);
        let bad = Effective::parse(
            &good.replace("passwordauthentication no", "passwordauthentication yes"),
        );
        let found = differences(&bad, &policy, keys_dir, false);
        assert_eq!(
            found,
            ["passwordauthentication: sshd uses \"yes\", the policy wants \"no\""]
        );
        let wrong_port = Effective::parse(&good.replace("port 2222", "port 22"));
        assert!(
            differences(&wrong_port, &policy, keys_dir, false)[0]
                .starts_with("port: sshd uses [22]")
        );
    }

    #[test]
    fn keys_and_socket_files_hold_what_the_policy_says() {
        let policy = checked(false, false);
        let keys = render_keys(&policy);
        assert_eq!(
            keys.lines()
                .filter(|l| l.starts_with("ssh-ed25519 "))
                .count(),
            2
        );
        assert!(render_socket_drop_in(2222).ends_with("ListenStream=\nListenStream=2222\n"));
    }
}

//! `instance-agent access ssh show|enable|disable|keys` and `access
//! sessions`: the SSH policy and the open sessions through the
//! `AccessService` API. `enable`, `disable` and `keys` read the current
//! policy and send it back changed (the API replaces the whole policy);
//! key files are read here, one key per line, blank lines and `#` comments
//! skipped, and a refused key is named by its file and line.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use tonic::transport::Channel;

use super::{format, output, states};
use crate::api::proto::{self, access_service_client::AccessServiceClient};

/// `access` subcommands.
#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// The SSH policy: show, enable, disable, keys.
    #[command(subcommand)]
    Ssh(SshCommand),
    /// The SSH sessions open now.
    Sessions,
}

/// `access ssh` subcommands.
#[derive(Debug, Subcommand)]
pub enum SshCommand {
    /// The policy, what sshd uses (sshd -T) and whether they agree (exit 1 when not).
    Show,
    /// Turn SSH on, or change its settings; what is not given keeps the current policy's value.
    Enable(EnableArgs),
    /// Turn SSH off: its units are stopped and masked; open sessions live on.
    Disable {
        /// Also end the SSH sessions open now.
        #[arg(long)]
        terminate_sessions: bool,
    },
    /// List the authorized keys (fingerprints), or replace, add or remove keys.
    Keys(KeysArgs),
}

/// `access ssh enable` options.
#[derive(Debug, Args)]
pub struct EnableArgs {
    /// The port [default: the current policy's, else 22].
    #[arg(long)]
    pub port: Option<u32>,
    /// The user whose keys these are [default: the current policy's].
    #[arg(long)]
    pub user: Option<String>,
    /// Replace the keys with those of FILE (one per line; "-" for stdin); repeatable.
    #[arg(long = "key-file", value_name = "FILE")]
    pub key_files: Vec<PathBuf>,
    /// Password authentication (the agent refuses it unless access.allow_password_authentication).
    #[arg(long, value_name = "BOOL")]
    pub password_authentication: Option<bool>,
    /// sshd's AllowTcpForwarding.
    #[arg(long, value_name = "BOOL")]
    pub allow_tcp_forwarding: Option<bool>,
}

/// `access ssh keys` options; without one, lists the keys.
#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct KeysArgs {
    /// Replace every key with those of FILE ("-" for stdin).
    #[arg(long, value_name = "FILE")]
    pub set: Option<PathBuf>,
    /// Add the keys of FILE ("-" for stdin).
    #[arg(long, value_name = "FILE")]
    pub add: Option<PathBuf>,
    /// Remove the key with this fingerprint (SHA256:...); repeatable.
    #[arg(long, value_name = "FINGERPRINT")]
    pub remove: Vec<String>,
}

/// Key lines read from files, each with where it came from.
#[derive(Debug, Default)]
struct KeyLines {
    lines: Vec<String>,
    origins: Vec<String>,
}

impl KeyLines {
    fn read(&mut self, path: &Path) -> anyhow::Result<()> {
        let text = if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read keys from stdin")?;
            text
        } else {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?
        };
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            self.lines.push(line.to_owned());
            self.origins
                .push(format!("{} line {}", path.display(), number + 1));
        }
        Ok(())
    }

    /// The origin of the key a refusal names (`authorized_keys[N]`), given
    /// that these lines start at `offset` in the request.
    fn origin_of(&self, message: &str, offset: usize) -> Option<&str> {
        let index: usize = message
            .split("authorized_keys[")
            .nth(1)?
            .split(']')
            .next()?
            .parse()
            .ok()?;
        self.origins
            .get(index.checked_sub(offset)?)
            .map(String::as_str)
    }
}

/// Runs an `access` subcommand.
pub async fn run(command: AccessCommand, channel: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = AccessServiceClient::new(channel);
    match command {
        AccessCommand::Sessions => {
            let reply = client
                .list_sessions(proto::ListSessionsRequest {})
                .await?
                .into_inner();
            output::reply(json, &reply, |r| render_sessions(&r.sessions))?;
            Ok(ExitCode::SUCCESS)
        }
        AccessCommand::Ssh(SshCommand::Show) => {
            let status = get(&mut client).await?;
            output::reply(json, &status, render_status)?;
            Ok(if status.managed && !status.agrees {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        AccessCommand::Ssh(SshCommand::Enable(args)) => {
            let current = get(&mut client).await?.policy.unwrap_or_default();
            let mut keys = KeyLines::default();
            for file in &args.key_files {
                keys.read(file)?;
            }
            let policy = proto::SshPolicy {
                enabled: true,
                port: args.port.unwrap_or(current.port),
                user: args.user.unwrap_or(current.user),
                authorized_keys: if args.key_files.is_empty() {
                    current.authorized_keys
                } else {
                    keys.lines.clone()
                },
                password_authentication: args
                    .password_authentication
                    .unwrap_or(current.password_authentication),
                allow_tcp_forwarding: args
                    .allow_tcp_forwarding
                    .unwrap_or(current.allow_tcp_forwarding),
            };
            set(&mut client, policy, false, &keys, 0, json).await
        }
        AccessCommand::Ssh(SshCommand::Disable { terminate_sessions }) => {
            let policy = proto::SshPolicy {
                enabled: false,
                ..get(&mut client).await?.policy.unwrap_or_default()
            };
            set(
                &mut client,
                policy,
                terminate_sessions,
                &KeyLines::default(),
                0,
                json,
            )
            .await
        }
        AccessCommand::Ssh(SshCommand::Keys(args)) => {
            let status = get(&mut client).await?;
            let mut policy = status.policy.clone().unwrap_or_default();
            let mut keys = KeyLines::default();
            let offset = if let Some(file) = &args.set {
                keys.read(file)?;
                policy.authorized_keys = keys.lines.clone();
                0
            } else if let Some(file) = &args.add {
                keys.read(file)?;
                let offset = policy.authorized_keys.len();
                policy.authorized_keys.extend(keys.lines.iter().cloned());
                offset
            } else if !args.remove.is_empty() {
                let mut removed = Vec::new();
                for fingerprint in &args.remove {
                    let key = status
                        .keys
                        .iter()
                        .find(|k| &k.fingerprint == fingerprint)
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "no key of the policy has the fingerprint {fingerprint}"
                            )
                        })?;
                    removed.push(key.index as usize);
                }
                policy.authorized_keys = std::mem::take(&mut policy.authorized_keys)
                    .into_iter()
                    .enumerate()
                    .filter(|(index, _)| !removed.contains(index))
                    .map(|(_, line)| line)
                    .collect();
                0
            } else {
                output::reply(json, &status, |s| render_keys(&s.keys))?;
                return Ok(ExitCode::SUCCESS);
            };
            set(&mut client, policy, false, &keys, offset, json).await
        }
    }
}

async fn get(client: &mut AccessServiceClient<Channel>) -> anyhow::Result<proto::SshPolicyStatus> {
    Ok(client
        .get_ssh_policy(proto::GetSshPolicyRequest {})
        .await?
        .into_inner())
}

async fn set(
    client: &mut AccessServiceClient<Channel>,
    policy: proto::SshPolicy,
    terminate_sessions: bool,
    keys: &KeyLines,
    offset: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let request = proto::SetSshPolicyRequest {
        policy: Some(policy),
        terminate_sessions,
    };
    match client.set_ssh_policy(request).await {
        Ok(reply) => {
            output::reply(json, &reply.into_inner(), render_status)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => match keys.origin_of(status.message(), offset) {
            Some(origin) => {
                Err(anyhow::Error::new(status).context(format!("the key of {origin} is refused")))
            }
            None => Err(status.into()),
        },
    }
}

fn yes(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

fn render_status(s: &proto::SshPolicyStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let listener = states::ssh_listener(s.listener());
    match (&s.policy, s.managed) {
        (Some(p), true) if p.enabled => {
            let _ = writeln!(
                out,
                "SSH enabled on port {} for {} ({listener}); {}",
                p.port,
                p.user,
                if s.agrees {
                    "sshd agrees"
                } else {
                    "SSHD DOES NOT AGREE"
                }
            );
            let _ = writeln!(
                out,
                "password authentication {}, TCP forwarding {}",
                yes(p.password_authentication),
                yes(p.allow_tcp_forwarding)
            );
        }
        (Some(_), true) => {
            let _ = writeln!(
                out,
                "SSH disabled ({listener}); {}",
                if s.agrees {
                    "the units agree"
                } else {
                    "THE UNITS DO NOT AGREE"
                }
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "no SSH policy set: the agent leaves sshd as it is ({listener})"
            );
        }
    }
    if s.managed {
        out.push_str(&render_keys(&s.keys));
    }
    let units: Vec<String> = s
        .units
        .iter()
        .filter(|u| u.exists)
        .map(|u| {
            format!(
                "{} {}{}",
                u.name,
                if u.active { "active" } else { "inactive" },
                if u.masked { ", masked" } else { "" }
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "units: {}",
        if units.is_empty() {
            "none".into()
        } else {
            units.join("; ")
        }
    );
    if let Some(e) = &s.effective {
        if e.error.is_empty() {
            let _ = writeln!(
                out,
                "sshd -T: port {:?}, passwordauthentication {}, pubkeyauthentication {}, authorizedkeysfile {}, allowtcpforwarding {}",
                e.ports,
                yes(e.password_authentication),
                yes(e.pubkey_authentication),
                e.authorized_keys_file,
                e.allow_tcp_forwarding
            );
        } else {
            let _ = writeln!(out, "sshd -T: {}", e.error);
        }
    }
    if s.managed {
        let _ = writeln!(
            out,
            "applied {} ({}) by {}",
            format::utc(s.applied_at.as_ref()),
            format::age(s.applied_at.as_ref()),
            s.applied_by
        );
    }
    for (label, lines) in [("DIFFERENCE", &s.differences), ("DRIFT", &s.drift)] {
        for line in lines {
            let _ = writeln!(out, "{label}: {line}");
        }
    }
    if !s.last_error.is_empty() {
        let _ = writeln!(out, "last change failed: {}", s.last_error);
    }
    if !s.sshd_version.is_empty() {
        let _ = writeln!(out, "sshd: {}", s.sshd_version);
    }
    out
}

fn render_keys(keys: &[proto::AuthorizedKeyInfo]) -> String {
    use std::fmt::Write;
    let mut out = format!("keys ({}):\n", keys.len());
    for k in keys {
        let _ = writeln!(
            out,
            "  {:<3} {:<20} {} {}{}",
            k.index,
            k.r#type,
            k.fingerprint,
            k.comment,
            if k.options.is_empty() {
                String::new()
            } else {
                format!(" [options: {}]", k.options)
            }
        );
    }
    out
}

fn render_sessions(sessions: &[proto::SshSession]) -> String {
    use std::fmt::Write;
    if sessions.is_empty() {
        return "no SSH sessions\n".into();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<24} {:<14} {:<8} {:<10} SOURCE",
        "USER", "FROM", "SINCE", "PID", "TTY"
    );
    for s in sessions {
        let _ = writeln!(
            out,
            "{:<16} {:<24} {:<14} {:<8} {:<10} {}",
            s.user,
            if s.from_address.is_empty() {
                "-"
            } else {
                &s.from_address
            },
            format::age(s.since.as_ref()),
            s.pid,
            if s.tty.is_empty() { "-" } else { &s.tty },
            s.source
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_skip_blanks_and_comments_and_refusals_name_the_file_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(
            &file,
            "# team keys\n\nssh-ed25519 AAAA a\n  ssh-ed25519 BBBB b  \n",
        )
        .unwrap();
        let mut keys = KeyLines::default();
        keys.read(&file).unwrap();
        assert_eq!(keys.lines, ["ssh-ed25519 AAAA a", "ssh-ed25519 BBBB b"]);
        let origin = keys.origin_of("authorized_keys[1]: line 2 of the keys: ...", 0);
        assert_eq!(origin, Some(format!("{} line 4", file.display()).as_str()));
        assert_eq!(
            keys.origin_of("authorized_keys[3]: x", 2),
            Some(format!("{} line 4", file.display()).as_str())
        );
        assert_eq!(keys.origin_of("authorized_keys[0]: x", 2), None);
        assert_eq!(keys.origin_of("port: x", 0), None);
    }

    #[test]
    fn the_status_says_on_or_off_and_what_disagrees() {
        let status = proto::SshPolicyStatus {
            managed: true,
            policy: Some(proto::SshPolicy {
                enabled: true,
                port: 2222,
                user: "azureuser".into(),
                ..Default::default()
            }),
            agrees: false,
            drift: vec!["/etc/ssh/sshd_config.d/00-instance-agent.conf was changed".into()],
            ..Default::default()
        };
        let text = render_status(&status);
        assert!(
            text.starts_with("SSH enabled on port 2222 for azureuser"),
            "{text}"
        );
        assert!(text.contains("SSHD DOES NOT AGREE"), "{text}");
        assert!(
            text.contains("DRIFT: /etc/ssh/sshd_config.d/00-instance-agent.conf was changed"),
            "{text}"
        );
        let none = render_status(&proto::SshPolicyStatus::default());
        assert!(none.starts_with("no SSH policy set"), "{none}");
    }
}

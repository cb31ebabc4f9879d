//! The SSH policy: what the control plane asks for, and the rules a policy
//! must meet before anything touches sshd: a port, a user name that can
//! be a file name, every key line valid (refusals name the line), password
//! authentication only where `[access]` allows it, and never a policy that
//! enables SSH with no way in (no key and no password).

use serde::{Deserialize, Serialize};

use super::keys::{self, AuthorizedKey};

/// The port of a policy that gives none.
pub const DEFAULT_PORT: u32 = 22;

/// The longest user name (Linux `LOGIN_NAME_MAX` is 256; useradd takes 32).
const MAX_USER_BYTES: usize = 32;

/// SSH access as the control plane sets it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SshPolicy {
    /// Whether sshd listens at all.
    pub enabled: bool,
    /// The port sshd listens on; 0 means [`DEFAULT_PORT`].
    pub port: u32,
    /// The user whose keys these are; the only user with authorized keys.
    pub user: String,
    /// OpenSSH public key lines (`[options] type base64 [comment]`).
    pub authorized_keys: Vec<String>,
    /// Password authentication (only where `access.allow_password_authentication`).
    pub password_authentication: bool,
    /// `AllowTcpForwarding`.
    pub allow_tcp_forwarding: bool,
}

/// What the rules need from `[access]`.
#[derive(Debug, Clone, Copy)]
pub struct PolicyRules {
    /// `access.allow_password_authentication`.
    pub allow_password_authentication: bool,
    /// `access.max_authorized_keys`.
    pub max_authorized_keys: u32,
}

/// Why a policy is refused: the field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    /// The field, e.g. `authorized_keys[2]` or `port`.
    pub field: String,
    /// What is wrong and what is allowed.
    pub problem: String,
    /// Whether the config, not the request, forbids it (a setting could
    /// allow it).
    pub by_config: bool,
}

impl PolicyProblem {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
            by_config: false,
        }
    }
}

/// A policy that passed the rules, with its keys parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPolicy {
    /// The policy, its port filled in.
    pub policy: SshPolicy,
    /// The port.
    pub port: u16,
    /// Its keys, in order.
    pub keys: Vec<AuthorizedKey>,
}

impl SshPolicy {
    /// The port, [`DEFAULT_PORT`] for 0.
    pub fn effective_port(&self) -> u32 {
        if self.port == 0 {
            DEFAULT_PORT
        } else {
            self.port
        }
    }

    /// Checks the policy against the rules; the first problem found is the
    /// error.
    pub fn check(&self, rules: PolicyRules) -> Result<CheckedPolicy, PolicyProblem> {
        let port = u16::try_from(self.effective_port()).map_err(|_| {
            PolicyProblem::new(
                "port",
                format!("{} is out of range: allowed 1 to 65535", self.port),
            )
        })?;
        check_user(&self.user, self.enabled)?;
        let max = rules.max_authorized_keys as usize;
        if self.authorized_keys.len() > max {
            return Err(PolicyProblem::new(
                "authorized_keys",
                format!(
                    "{} keys: at most {max} (access.max_authorized_keys)",
                    self.authorized_keys.len()
                ),
            ));
        }
        let mut keys = Vec::with_capacity(self.authorized_keys.len());
        for (index, line) in self.authorized_keys.iter().enumerate() {
            let key = keys::parse(line).map_err(|problem| {
                PolicyProblem::new(
                    format!("authorized_keys[{index}]"),
                    format!("line {} of the keys: {problem}", index + 1),
                )
            })?;
            if let Some(first) = keys
                .iter()
                .position(|k: &AuthorizedKey| k.fingerprint == key.fingerprint)
            {
                return Err(PolicyProblem::new(
                    format!("authorized_keys[{index}]"),
                    format!(
                        "line {} of the keys is the key of line {} again ({})",
                        index + 1,
                        first + 1,
                        key.fingerprint
                    ),
                ));
            }
            keys.push(key);
        }
        if self.password_authentication && !rules.allow_password_authentication {
            return Err(PolicyProblem {
                field: "password_authentication".into(),
                problem: "password authentication is not allowed on this instance \
                          (access.allow_password_authentication = false)"
                    .into(),
                by_config: true,
            });
        }
        if self.enabled && keys.is_empty() && !self.password_authentication {
            return Err(PolicyProblem::new(
                "authorized_keys",
                "SSH enabled with no key and no password would leave no way in: give at least one key \
                 (or disable SSH)",
            ));
        }
        let mut policy = self.clone();
        policy.port = port.into();
        policy.authorized_keys = keys.iter().map(|k| k.line.clone()).collect();
        Ok(CheckedPolicy { policy, port, keys })
    }
}

/// A user name that can be an sshd `%u` and a file name: 1 to 32 of
/// `[A-Za-z0-9._-]`, not starting with `-` or `.`. Empty only when SSH is
/// disabled.
fn check_user(user: &str, enabled: bool) -> Result<(), PolicyProblem> {
    if user.is_empty() {
        return if enabled {
            Err(PolicyProblem::new(
                "user",
                "SSH enabled needs the user whose keys these are",
            ))
        } else {
            Ok(())
        };
    }
    let plain = user.len() <= MAX_USER_BYTES
        && !user.starts_with(['-', '.'])
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        Ok(())
    } else {
        Err(PolicyProblem::new(
            "user",
            format!(
                "{:?} is not a user name: 1 to {MAX_USER_BYTES} of [A-Za-z0-9._-], not starting with - or .",
                user.chars().take(40).collect::<String>()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::keys::tests::ed25519;

    const RULES: PolicyRules = PolicyRules {
        allow_password_authentication: false,
        max_authorized_keys: 3,
    };

    fn enabled(keys: &[String]) -> SshPolicy {
        SshPolicy {
            enabled: true,
            user: "azureuser".into(),
            authorized_keys: keys.to_vec(),
            ..SshPolicy::default()
        }
    }

    #[test]
    fn a_good_policy_gets_its_port_and_trimmed_keys() {
        let key = ed25519(1, "a");
        let checked = enabled(&[format!("  {key}\t")])
            .check(RULES)
            .expect("valid");
        assert_eq!(checked.port, 22);
        assert_eq!(checked.policy.port, 22);
        assert_eq!(checked.policy.authorized_keys, vec![key]);
        assert_eq!(checked.keys.len(), 1);
    }

    #[test]
    fn a_bad_key_is_refused_naming_its_line() {
        let problem = enabled(&[ed25519(1, ""), "ssh-ed25519 nope".into()])
            .check(RULES)
            .unwrap_err();
        assert_eq!(problem.field, "authorized_keys[1]");
        assert!(
            problem.problem.starts_with("line 2 of the keys: "),
            "{problem:?}"
        );
        let twice = enabled(&[ed25519(1, "x"), ed25519(1, "y")])
            .check(RULES)
            .unwrap_err();
        assert!(
            twice.problem.contains("the key of line 1 again"),
            "{twice:?}"
        );
        let many = enabled(&[
            ed25519(1, ""),
            ed25519(2, ""),
            ed25519(3, ""),
            ed25519(4, ""),
        ]);
        assert!(many.check(RULES).unwrap_err().problem.contains("at most 3"));
    }

    #[test]
    fn no_way_in_is_refused_but_disabled_is_fine() {
        let problem = enabled(&[]).check(RULES).unwrap_err();
        assert_eq!(problem.field, "authorized_keys");
        assert!(problem.problem.contains("no way in"), "{problem:?}");
        let off = SshPolicy::default();
        assert!(off.check(RULES).is_ok());
        // With passwords allowed, a password is a way in.
        let allowed = PolicyRules {
            allow_password_authentication: true,
            ..RULES
        };
        let password = SshPolicy {
            password_authentication: true,
            ..enabled(&[])
        };
        assert!(password.check(allowed).is_ok());
        let refused = password.check(RULES).unwrap_err();
        assert_eq!(refused.field, "password_authentication");
        assert!(refused.by_config);
    }

    #[test]
    fn port_and_user_are_checked() {
        let key = ed25519(1, "");
        let mut policy = enabled(&[key]);
        policy.port = 70000;
        assert_eq!(policy.check(RULES).unwrap_err().field, "port");
        policy.port = 2222;
        assert_eq!(policy.check(RULES).expect("valid").port, 2222);
        for bad in ["", "-x", ".x", "a b", "a/b", "a%u", &"u".repeat(33)] {
            policy.user = bad.into();
            assert_eq!(policy.check(RULES).unwrap_err().field, "user", "{bad:?}");
        }
        policy.user = "svc.user_1-a".into();
        assert!(policy.check(RULES).is_ok());
    }
}

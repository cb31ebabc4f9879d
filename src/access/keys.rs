//! Authorized key lines, checked with OpenSSH's grammar (sshd(8),
//! AUTHORIZED_KEYS FILE FORMAT): `[options] keytype base64 [comment]`.
//! The options are OpenSSH's own (comma-separated, values in double
//! quotes); the type is one sshd 9.x accepts; the base64 must decode to a
//! key blob whose embedded type is the line's and whose fields are complete
//! (an RSA modulus of at least 1024 bits, an Ed25519 key of 32 bytes, an
//! ECDSA point on the named curve's size). A line sshd would skip or
//! misread is refused here, with what is wrong, so that a policy never
//! holds a key that silently does not work.
//!
//! Also the one place that makes a key's fingerprint (`SHA256:…`, as
//! `ssh-keygen -l` prints it): logs and the audit show fingerprints, never
//! the key itself.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};

/// The longest key line accepted (sshd's largest public key is 16 KiB).
pub const MAX_LINE_BYTES: usize = 16 << 10;

/// The smallest RSA modulus sshd 9.x accepts (SSH_RSA_MINIMUM_MODULUS_SIZE).
const MIN_RSA_BITS: usize = 1024;

/// Options that take no value.
const FLAG_OPTIONS: &[&str] = &[
    "agent-forwarding",
    "cert-authority",
    "no-agent-forwarding",
    "no-port-forwarding",
    "no-pty",
    "no-touch-required",
    "no-user-rc",
    "no-x11-forwarding",
    "port-forwarding",
    "pty",
    "restrict",
    "touch-required",
    "user-rc",
    "verify-required",
    "x11-forwarding",
];

/// Options that take a value in double quotes.
const VALUE_OPTIONS: &[&str] = &[
    "command",
    "environment",
    "expiry-time",
    "from",
    "permitlisten",
    "permitopen",
    "principals",
    "tunnel",
];

/// A key line that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedKey {
    /// The line as it is written into the keys file (trimmed).
    pub line: String,
    /// The options before the type, as given (empty when none).
    pub options: String,
    /// The key type, e.g. `ssh-ed25519`.
    pub key_type: String,
    /// `SHA256:` and the unpadded base64 of the blob's SHA-256.
    pub fingerprint: String,
    /// The comment after the key (empty when none).
    pub comment: String,
}

/// What the blob of each accepted type holds after its type name.
#[derive(Debug, Clone, Copy)]
enum Layout {
    Ed25519 {
        security_key: bool,
    },
    Rsa,
    Ecdsa {
        curve: &'static str,
        point: usize,
        security_key: bool,
    },
}

fn layout(key_type: &str) -> Result<Layout, String> {
    Ok(match key_type {
        "ssh-ed25519" => Layout::Ed25519 {
            security_key: false,
        },
        "sk-ssh-ed25519@openssh.com" => Layout::Ed25519 { security_key: true },
        "ssh-rsa" => Layout::Rsa,
        "ecdsa-sha2-nistp256" => Layout::Ecdsa {
            curve: "nistp256",
            point: 65,
            security_key: false,
        },
        "ecdsa-sha2-nistp384" => Layout::Ecdsa {
            curve: "nistp384",
            point: 97,
            security_key: false,
        },
        "ecdsa-sha2-nistp521" => Layout::Ecdsa {
            curve: "nistp521",
            point: 133,
            security_key: false,
        },
        "sk-ecdsa-sha2-nistp256@openssh.com" => Layout::Ecdsa {
            curve: "nistp256",
            point: 65,
            security_key: true,
        },
        "ssh-dss" => {
            return Err(
                "ssh-dss (DSA) keys are disabled in OpenSSH since 7.0: use ssh-ed25519".into(),
            );
        }
        other if other.ends_with("-cert-v01@openssh.com") => {
            return Err(format!(
                "{other} is a certificate, not a key: authorize its CA's key with the cert-authority option"
            ));
        }
        other => return Err(format!("unknown key type {}", shown(other))),
    })
}

/// Whether `word` names a key type (accepted or not): a line starting with
/// one has no options.
fn looks_like_type(word: &str) -> bool {
    layout(word).is_ok() || word == "ssh-dss" || word.ends_with("-cert-v01@openssh.com")
}

/// A short, printable form of a piece of the line for messages.
fn shown(text: &str) -> String {
    let cut: String = text.chars().take(40).collect();
    if cut.len() < text.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// Checks one line; the error says what is wrong (the caller names the
/// line).
pub fn parse(line: &str) -> Result<AuthorizedKey, String> {
    if line.len() > MAX_LINE_BYTES {
        return Err(format!(
            "the line is {} bytes long: at most {MAX_LINE_BYTES}",
            line.len()
        ));
    }
    if let Some(bad) = line.chars().find(|c| matches!(c, '\n' | '\r' | '\0')) {
        return Err(format!("the line holds {bad:?}: one key per line"));
    }
    let line = line.trim_matches([' ', '\t']);
    if line.is_empty() {
        return Err("the line is empty".into());
    }
    if line.starts_with('#') {
        return Err("the line is a comment, not a key".into());
    }
    let first = line.split([' ', '\t']).next().unwrap_or_default();
    let (options, rest) = if looks_like_type(first) {
        ("", line)
    } else {
        let end = options_end(line)?;
        let (options, rest) = line.split_at(end);
        check_options(options)?;
        (options, rest.trim_start_matches([' ', '\t']))
    };
    let mut words = rest.splitn(3, [' ', '\t']);
    let key_type = words.next().unwrap_or_default();
    if key_type.is_empty() {
        return Err("options but no key after them".into());
    }
    let layout = layout(key_type)?;
    let encoded = words.next().unwrap_or_default();
    if encoded.is_empty() {
        return Err(format!("no base64 key after the type {key_type}"));
    }
    let blob = STANDARD
        .decode(encoded)
        .map_err(|e| format!("the key after {key_type} is not base64 ({e})"))?;
    check_blob(&blob, key_type, layout)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &blob);
    Ok(AuthorizedKey {
        line: line.to_owned(),
        options: options.to_owned(),
        key_type: key_type.to_owned(),
        fingerprint: format!("SHA256:{}", STANDARD_NO_PAD.encode(digest.as_ref())),
        comment: words.next().unwrap_or_default().trim().to_owned(),
    })
}

/// The fingerprint of a line, or `invalid` (for the audit log, which must
/// not quote a line it cannot parse).
pub fn fingerprint_or_invalid(line: &str) -> String {
    parse(line).map_or_else(|_| "invalid".to_owned(), |key| key.fingerprint)
}

/// Where the options end: the first blank outside double quotes.
fn options_end(line: &str) -> Result<usize, String> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => return Ok(i),
            _ => {}
        }
    }
    if quoted {
        Err("an option value's double quote is never closed".into())
    } else {
        Err(format!(
            "{} is neither a key type nor options followed by a key",
            shown(line)
        ))
    }
}

/// Checks each comma-separated option: a known name, and a value in double
/// quotes exactly for the options that take one.
fn check_options(options: &str) -> Result<(), String> {
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    let mut parts = Vec::new();
    for (i, c) in options.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&options[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&options[start..]);
    for part in parts {
        let (name, value) = match part.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (part, None),
        };
        let lower = name.to_ascii_lowercase();
        if FLAG_OPTIONS.contains(&lower.as_str()) {
            if value.is_some() {
                return Err(format!("option {name} takes no value"));
            }
        } else if VALUE_OPTIONS.contains(&lower.as_str()) {
            let quoted_value =
                value.is_some_and(|v| v.len() >= 2 && v.starts_with('"') && v.ends_with('"'));
            if !quoted_value {
                return Err(format!(
                    "option {name} needs a value in double quotes ({name}=\"...\")"
                ));
            }
        } else if name.is_empty() {
            return Err("an empty option (two commas, or a comma at an end)".into());
        } else {
            return Err(format!(
                "{} is neither a key type nor an option sshd knows",
                shown(name)
            ));
        }
    }
    Ok(())
}

/// Reads SSH wire strings (`uint32` length, bytes) off a blob.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn next(&mut self, what: &str) -> Result<&'a [u8], String> {
        let truncated = || format!("the key blob ends inside its {what}");
        let (len, rest) = self.rest.split_first_chunk::<4>().ok_or_else(truncated)?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return Err(truncated());
        }
        let (field, rest) = rest.split_at(len);
        self.rest = rest;
        Ok(field)
    }
}

/// Checks the blob's fields against the line's type.
fn check_blob(blob: &[u8], key_type: &str, layout: Layout) -> Result<(), String> {
    let mut fields = Fields { rest: blob };
    let embedded = fields.next("type name")?;
    if embedded != key_type.as_bytes() {
        return Err(format!(
            "the line says {key_type} but the key inside is {}",
            shown(&String::from_utf8_lossy(embedded))
        ));
    }
    match layout {
        Layout::Ed25519 { security_key } => {
            let key = fields.next("public key")?;
            if key.len() != 32 {
                return Err(format!(
                    "an Ed25519 key is 32 bytes, this one {}",
                    key.len()
                ));
            }
            if security_key {
                fields.next("application")?;
            }
        }
        Layout::Rsa => {
            let exponent = fields.next("exponent")?;
            if exponent.iter().all(|&b| b == 0) {
                return Err("the RSA exponent is zero".into());
            }
            let modulus = fields.next("modulus")?;
            let significant: &[u8] = match modulus.iter().position(|&b| b != 0) {
                Some(first) => &modulus[first..],
                None => &[],
            };
            let bits = significant.len() * 8
                - significant
                    .first()
                    .map_or(0, |b| b.leading_zeros() as usize);
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "the RSA modulus has {bits} bits: sshd refuses fewer than {MIN_RSA_BITS}"
                ));
            }
        }
        Layout::Ecdsa {
            curve,
            point,
            security_key,
        } => {
            let named = fields.next("curve name")?;
            if named != curve.as_bytes() {
                return Err(format!(
                    "{key_type} must name the curve {curve}, this key names {}",
                    shown(&String::from_utf8_lossy(named))
                ));
            }
            let q = fields.next("public point")?;
            if q.len() != point || q.first() != Some(&4) {
                return Err(format!(
                    "the {curve} point must be {point} bytes, uncompressed; this one is {} bytes",
                    q.len()
                ));
            }
            if security_key {
                fields.next("application")?;
            }
        }
    }
    if !fields.rest.is_empty() {
        return Err(format!(
            "{} bytes follow the key's last field",
            fields.rest.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Encodes SSH wire strings into a blob.
    pub(crate) fn blob(fields: &[&[u8]]) -> String {
        let mut out = Vec::new();
        for field in fields {
            out.extend_from_slice(&(field.len() as u32).to_be_bytes());
            out.extend_from_slice(field);
        }
        STANDARD.encode(out)
    }

    /// A well-formed Ed25519 line (the key bytes are `seed` repeated).
    pub(crate) fn ed25519(seed: u8, comment: &str) -> String {
        format!(
            "ssh-ed25519 {} {comment}",
            blob(&[b"ssh-ed25519", &[seed; 32]])
        )
        .trim_end()
        .to_owned()
    }

    #[test]
    fn real_lines_have_ssh_keygens_fingerprints() {
        // Made with `ssh-keygen` (OpenSSH 9.2); fingerprints as `ssh-keygen -l` prints them.
        let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC8ol+J/mG3vQbhy512jQo3QxQgNbIeZ9eaPJNPwIEDS alice@laptop";
        let key = parse(ed).expect("valid");
        assert_eq!(key.key_type, "ssh-ed25519");
        assert_eq!(key.comment, "alice@laptop");
        assert_eq!(key.options, "");
        assert_eq!(
            key.fingerprint,
            "SHA256:qQEZdaiI4cPVnhmfa02UVEeqa1aI6kSxm/auEuqKi58"
        );
        assert_eq!(fingerprint_or_invalid(ed), key.fingerprint);
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCWWwuy97ScVAiDaRuki+0jdI1pQfOP017RmAgXPT7cVZxioW4n/R//UfDMyBzm37kBlmQtaC7VyMIA0ObE/G/iVRstiQcp/adwKTGbq7tJ5NPQ4TUQN/iHPsbuGdCLEo1sE3j54Kuor8/ENbMzFljPdxngJat0z3MAhm+Jfh0zYzE2F8jx4aWGlqyFUktHc5vVZ/+Vd5kbLAMDe41Mtbs+UqNPuPVnGxQHrfCrp2ncw0o7CDM55zFqYAPMPSyMd9/k/Z4f3+h498tfQtyj0tVHVCWrVa+CtFXvRUOElwj8t9a4r9Z9MLmubSn1Zx4LQymYwu7Rw4D9fvlPJ0v3C24p r";
        assert_eq!(
            parse(rsa).expect("valid").fingerprint,
            "SHA256:2dOr72iJEfBcXEz7MA5JbR9GApwfMC+vStxoXXBI5pE"
        );
    }

    #[test]
    fn every_accepted_type_with_a_complete_blob_passes() {
        let mut modulus = vec![0u8];
        modulus.extend([0xc3; 256]);
        let q256: Vec<u8> = std::iter::once(4).chain([7; 64]).collect();
        let q384: Vec<u8> = std::iter::once(4).chain([7; 96]).collect();
        let lines = [
            ed25519(1, ""),
            format!("ssh-rsa {}", blob(&[b"ssh-rsa", &[1, 0, 1], &modulus])),
            format!(
                "ecdsa-sha2-nistp256 {} c",
                blob(&[b"ecdsa-sha2-nistp256", b"nistp256", &q256])
            ),
            format!(
                "ecdsa-sha2-nistp384 {}",
                blob(&[b"ecdsa-sha2-nistp384", b"nistp384", &q384])
            ),
            format!(
                "sk-ssh-ed25519@openssh.com {}",
                blob(&[b"sk-ssh-ed25519@openssh.com", &[2; 32], b"ssh:"])
            ),
            format!(
                "sk-ecdsa-sha2-nistp256@openssh.com {}",
                blob(&[
                    b"sk-ecdsa-sha2-nistp256@openssh.com",
                    b"nistp256",
                    &q256,
                    b"ssh:"
                ])
            ),
        ];
        for line in &lines {
            assert!(parse(line).is_ok(), "{line}: {:?}", parse(line));
        }
    }

    #[test]
    fn options_are_openssh_options() {
        let key = ed25519(3, "ci");
        for good in [
            "restrict",
            "no-pty,no-port-forwarding",
            "command=\"echo hi, there\",no-pty",
            "from=\"10.0.0.0/8,!10.0.0.1\"",
            "environment=\"A=\\\"b c\\\"\"",
            "NO-PTY",
        ] {
            let line = format!("{good} {key}");
            let parsed = parse(&line).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(parsed.options, good);
            assert_eq!(parsed.comment, "ci");
        }
        for (bad, says) in [
            ("no-such-option", "neither a key type nor an option"),
            ("command=echo", "double quotes"),
            ("no-pty=\"x\"", "takes no value"),
            ("no-pty,,restrict", "empty option"),
            ("command=\"never closed", "never closed"),
        ] {
            let error = parse(&format!("{bad} {key}")).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let ed = blob(&[b"ssh-ed25519", &[1; 32]]);
        let cases = [
            (String::new(), "empty"),
            ("   ".into(), "empty"),
            ("# a comment".into(), "comment"),
            (
                format!("ssh-ed25519 {ed}\nssh-ed25519 {ed}"),
                "one key per line",
            ),
            ("ssh-ed25519".into(), "no base64"),
            ("ssh-ed25519 !!!notbase64".into(), "not base64"),
            (
                format!("ssh-rsa {ed}"),
                "the line says ssh-rsa but the key inside is \"ssh-ed25519\"",
            ),
            (
                format!("ssh-ed25519 {}", blob(&[b"ssh-ed25519", &[1; 31]])),
                "32 bytes",
            ),
            (
                format!("ssh-ed25519 {}", blob(&[b"ssh-ed25519", &[1; 32], b"x"])),
                "follow the key",
            ),
            ("ssh-ed25519 AAAAC3Nz".into(), "ends inside"),
            (
                format!("ssh-rsa {}", blob(&[b"ssh-rsa", &[1, 0, 1], &[0xff; 64]])),
                "512 bits",
            ),
            (format!("ssh-dss {ed}"), "DSA"),
            (
                format!("ssh-ed25519-cert-v01@openssh.com {ed}"),
                "certificate",
            ),
            (
                format!("ssh-foo {ed}"),
                "\"ssh-foo\" is neither a key type nor an option",
            ),
            ("x".repeat(MAX_LINE_BYTES + 1), "at most"),
        ];
        for (line, says) in cases {
            let error = parse(&line).unwrap_err();
            assert!(error.contains(says), "{line:.60}: {error}");
        }
        assert_eq!(fingerprint_or_invalid("nonsense"), "invalid");
    }

    #[test]
    fn a_wrong_curve_is_refused() {
        let q: Vec<u8> = std::iter::once(4).chain([7; 64]).collect();
        let line = format!(
            "ecdsa-sha2-nistp256 {}",
            blob(&[b"ecdsa-sha2-nistp256", b"nistp384", &q])
        );
        assert!(
            parse(&line)
                .unwrap_err()
                .contains("must name the curve nistp256")
        );
    }
}

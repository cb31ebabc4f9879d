//! Field validation shared by every config section: the error a section
//! returns ([`FieldError`], its key relative to the section), one checker
//! for a table of ranges ([`check_ranges`]), and the field shapes that more
//! than one domain checks (absolute paths, environment variable names).
//!
//! A leaf: it knows nothing of files, lines or the top-level config. Each
//! domain's `config.rs` validates its section with a range table and its own
//! checks and returns a [`FieldError`]; `config` prefixes the section's table
//! and adds the file and the key's line.

use std::fmt::Display;
use std::path::Path;

/// A field of a section that is out of range or inconsistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted key relative to the section, e.g. `slots_per_core` or
    /// `mount[0].name`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub problem: String,
}

impl FieldError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// The same problem with the key placed inside `table` (`table.key`), for
    /// an entry validated on its own (`scripts[0]`) or a whole section.
    pub fn within(self, table: &str) -> Self {
        Self {
            key: format!("{table}.{}", self.key),
            problem: self.problem,
        }
    }
}

/// One row of a range table: the key, its value, and the smallest and
/// largest values allowed (both included).
pub type Range<'a> = (&'a str, u64, u64, u64);

/// Checks every row of a range table in order; the first value out of its
/// range is the error.
pub fn check_ranges(table: &[Range<'_>]) -> Result<(), FieldError> {
    for &(key, value, min, max) in table {
        if !(min..=max).contains(&value) {
            return Err(FieldError::new(key, out_of_range(value, min, max)));
        }
    }
    Ok(())
}

/// The message of a value outside `min..=max` (also for the ranges that are
/// not whole numbers).
pub fn out_of_range(value: impl Display, min: impl Display, max: impl Display) -> String {
    format!("{value} is out of range: allowed {min} to {max}")
}

/// Refuses a relative `path` for `key`.
pub fn absolute(key: &str, path: &Path) -> Result<(), FieldError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(FieldError::new(
            key,
            format!("{} must be an absolute path", path.display()),
        ))
    }
}

/// Whether `name` is a POSIX environment variable name
/// (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_row_out_of_range_is_the_error() {
        assert_eq!(
            check_ranges(&[("a", 1, 1, 2), ("b", 3, 1, 2)]).map_err(|e| e.key),
            Err("b".into())
        );
        let error = check_ranges(&[("a", 0, 1, 300), ("b", 9, 1, 2)]).unwrap_err();
        assert_eq!(
            error,
            FieldError::new("a", "0 is out of range: allowed 1 to 300")
        );
        assert!(check_ranges(&[("a", 1, 1, 1)]).is_ok());
    }

    #[test]
    fn within_places_the_key_in_its_table() {
        let error = FieldError::new("name", "x")
            .within("mount[0]")
            .within("mounts");
        assert_eq!(error.key, "mounts.mount[0].name");
    }

    #[test]
    fn env_names_are_posix_names() {
        for good in ["A", "_x", "PATH_2"] {
            assert!(is_env_name(good), "{good}");
        }
        for bad in ["", "1X", "A-B", "A=B", "é"] {
            assert!(!is_env_name(bad), "{bad}");
        }
    }
}

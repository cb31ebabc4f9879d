//! User lookup for `run_as`: uid, primary gid, supplementary groups and home.
//!
//! A narrow trait so that request validation can be tested without real
//! users; the real implementation asks NSS (getpwnam_r, getgrouplist), which
//! may block (LDAP, sssd) and is therefore called from `spawn_blocking`.

use std::ffi::CString;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A user a script can run as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Every group the user is in, the primary one included.
    pub groups: Vec<u32>,
    /// Home directory.
    pub home: PathBuf,
    /// Login shell.
    pub shell: PathBuf,
}

impl Account {
    /// Root as it is on every Linux host, for when the user database has no
    /// entry (and for fakes).
    pub fn root() -> Self {
        Self {
            name: "root".into(),
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: PathBuf::from("/root"),
            shell: PathBuf::from("/bin/sh"),
        }
    }
}

/// Looks users up by name.
pub trait Accounts: Send + Sync {
    /// The user named `name`; `Ok(None)` when there is none. Blocking.
    fn lookup(&self, name: &str) -> std::io::Result<Option<Account>>;
}

/// The system's user database.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemAccounts;

impl Accounts for SystemAccounts {
    fn lookup(&self, name: &str) -> std::io::Result<Option<Account>> {
        let Some(user) = nix::unistd::User::from_name(name).map_err(std::io::Error::from)? else {
            return Ok(None);
        };
        let c_name = CString::new(name)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in name"))?;
        let groups = nix::unistd::getgrouplist(&c_name, user.gid)
            .map_err(std::io::Error::from)?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(Some(Account {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups,
            home: user.dir,
            shell: user.shell,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_and_nobody_else_by_a_silly_name() {
        let root = SystemAccounts.lookup("root").unwrap().expect("root exists");
        assert_eq!(root.uid, 0);
        assert!(root.groups.contains(&0));
        assert_eq!(SystemAccounts.lookup("no-such-user-ia-test").unwrap(), None);
    }
}

//! Local users for tests: `useradd` on create, `userdel -r` on drop, so a
//! user is removed also when the test fails. Tests of other files may add
//! users at the same time, so each command is retried while the user
//! database is locked.

use std::process::Command;
use std::time::Duration;

/// Runs a user-database command, retrying while another process holds the
/// passwd/group lock (tests of other modules may add users in parallel).
pub fn userdb(program: &str, args: &[&str]) {
    for _ in 0..50 {
        let out = Command::new(program).args(args).output().expect(program);
        if out.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.contains("lock") {
            panic!("{program} {args:?}: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{program} {args:?}: the user database stayed locked");
}

/// One unprivileged user with a group of its own and no home; removed on drop.
pub struct TestUser {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
}

impl TestUser {
    /// Creates a user named `<prefix><unique tag>` (at most 16 characters).
    pub fn create(prefix: &str) -> Self {
        let tag = super::uuid_like();
        let keep = 16usize.saturating_sub(prefix.len());
        let name = format!("{prefix}{}", &tag[tag.len().saturating_sub(keep)..]);
        userdb("useradd", &["-M", "-U", "-s", "/usr/sbin/nologin", &name]);
        let user = nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .expect("the new user");
        Self {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }
    }

    /// Gives `path` (not following a symlink there) to this user.
    pub fn own(&self, path: &std::path::Path) {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            path,
            Some(nix::unistd::Uid::from_raw(self.uid)),
            Some(nix::unistd::Gid::from_raw(self.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .expect("chown to the test user");
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").args(["-r", &self.name]).output();
    }
}

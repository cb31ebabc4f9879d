//! A FUSE filesystem that never answers, for the tests that a hung
//! filesystem cannot wedge the agent: `hung-fuse MOUNT_PATH` mounts it,
//! answers the kernel's INIT, and then reads every request and answers none
//! of them. A process waiting for such an answer sits in the kernel beyond
//! the reach of SIGKILL (the request was read, so it can no longer be taken
//! back) until the connection ends: killing this program ends it, and
//! every waiter gets ENOTCONN. The mount stays until `umount -l`.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::ExitCode;

use fuser::{
    AccessFlags, FileHandle, Filesystem, INodeNo, MountOption, OpenFlags, ReplyAttr,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: hung-fuse MOUNT_PATH");
        return ExitCode::from(64);
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![MountOption::FSName("hung".into())];
    match fuser::Session::new(Hung, &path, &config).and_then(|s| s.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hung-fuse: {}: {error}", path.display());
            ExitCode::from(1)
        }
    }
}

/// Keeps every reply unanswered: a reply dropped would answer EIO.
fn never<T>(reply: T) {
    std::mem::forget(reply);
}

struct Hung;

impl Filesystem for Hung {
    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        never(reply);
    }

    fn getattr(&self, _req: &Request, _ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        never(reply);
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        never(reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        reply: ReplyDirectory,
    ) {
        never(reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        never(reply);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        never(reply);
    }
}

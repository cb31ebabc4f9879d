//! A stand-in for blobfuse2, for tests and the demo (blobfuse2 needs Azure
//! storage and is not in Debian). It takes blobfuse2's command line
//! (`mount PATH --config-file=CFG --foreground --disable-version-check=true`),
//! reads the same YAML config, fails the way blobfuse2 does on a bad config
//! (exit 1, `Error: <message>` on stderr), and really mounts a FUSE
//! filesystem (source `blobfuse2`, type `fuse`) serving the local directory
//! `$STANDIN_STORAGE_ROOT/<container>[/<subdirectory>]` read-write (or
//! read-only). If `$STANDIN_STORAGE_ROOT/<container>.credential` exists, the
//! account key or SAS must equal its content, else authentication fails with
//! blobfuse2's message, which (like the Azure SDK's) names the request URL,
//! SAS included. SIGTERM or SIGINT unmount and exit 0; `fusermount3 -u`
//! ends it too; SIGKILL leaves a stale mount (ENOTCONN), as with blobfuse2.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};
use serde_norway::Value;

#[path = "blobfuse2_standin/inodes.rs"]
mod inodes;
use inodes::Inodes;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("Error: {message}");
            ExitCode::from(1)
        }
    }
}

/// What the command line and the config say.
struct Settings {
    mount_path: PathBuf,
    storage: PathBuf,
    read_only: bool,
    allow_other: bool,
    allow_root: bool,
    shown: Shown,
    log_file: Option<PathBuf>,
    description: String,
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let settings = parse(&args)?;
    log(&settings, &format!("mounting {}", settings.description));
    let filesystem = Passthrough::new(settings.storage.clone(), settings.shown);
    let mut config = fuser::Config::default();
    config.mount_options = vec![MountOption::FSName("blobfuse2".into())];
    if settings.read_only {
        config.mount_options.push(MountOption::RO);
    }
    if settings.allow_other {
        config.acl = SessionACL::All;
    } else if settings.allow_root {
        config.acl = SessionACL::RootAndOwner;
    }
    config.n_threads = Some(2);
    // Signals are taken by one thread with sigwait, so that SIGTERM unmounts
    // cleanly instead of killing the process mid-request.
    let mut signals = nix::sys::signal::SigSet::empty();
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        signals.add(signal);
    }
    signals
        .thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    let mut session = fuser::Session::new(filesystem, &settings.mount_path, &config)
        .map_err(|e| format!("failed to mount {}: {e}", settings.mount_path.display()))?;
    let mut unmounter = session.unmount_callable();
    // Which mount is ours: after a lazy unmount (`fusermount3 -u -z`) the
    // path may hold nothing or another mount, which a signal must never
    // unmount. Read from mountinfo (a stat would wait for this very daemon).
    let ours = mounted_device(&settings.mount_path);
    let path = settings.mount_path.clone();
    let log_file = settings.log_file.clone();
    std::thread::spawn(move || {
        if signals.wait().is_ok() {
            if ours.is_some() && mounted_device(&path) == ours {
                let _ = unmounter.unmount();
            } else {
                // Detached: nothing to unmount; end the connection by exiting.
                log_to(&log_file, "signalled after a lazy unmount; exiting");
                std::process::exit(0);
            }
        }
    });
    let result = session.run();
    log(&settings, "unmounted; exiting");
    result.map_err(|e| format!("FUSE session failed: {e}"))
}

/// The device (major, minor) of the topmost mount at `path`, from mountinfo.
fn mounted_device(path: &Path) -> Option<(String, String)> {
    let escaped = path.display().to_string().replace(' ', "\\040");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let dev = fields.nth(2)?;
        let mount_point = fields.nth(1)?;
        let (major, minor) = dev.split_once(':')?;
        (mount_point == escaped).then(|| (major.to_owned(), minor.to_owned()))
    })
}

fn log(settings: &Settings, line: &str) {
    log_to(&settings.log_file, line);
}

fn log_to(log_file: &Option<PathBuf>, line: &str) {
    if let Some(path) = log_file {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(file, "blobfuse2-standin[{}]: {line}", std::process::id());
        }
    }
}

/// Checks arguments and config in blobfuse2's order, with its messages.
fn parse(args: &[String]) -> Result<Settings, String> {
    let mut rest = args.iter();
    if rest.next().map(String::as_str) != Some("mount") {
        return Err("only `mount PATH --config-file=CFG` is supported by the stand-in".into());
    }
    let mut mount_path = None;
    let mut config_file = None;
    let mut options = Vec::new();
    while let Some(arg) = rest.next() {
        if let Some(file) = arg.strip_prefix("--config-file=") {
            config_file = Some(PathBuf::from(file));
        } else if arg == "--config-file" {
            config_file = rest.next().map(PathBuf::from);
        } else if arg == "-o" {
            options.extend(rest.next().into_iter().flat_map(|o| o.split(',')));
        } else if arg == "--foreground"
            || arg.starts_with("--foreground=")
            || arg.starts_with("--disable-version-check")
        {
            // Always in the foreground; never checks for a newer version.
        } else if arg.starts_with('-') {
            return Err(format!("unknown flag: {arg}"));
        } else if mount_path.is_none() {
            mount_path = Some(PathBuf::from(arg));
        } else {
            return Err(format!("unexpected argument {arg}"));
        }
    }
    for option in &options {
        let name = option.split('=').next().unwrap_or_default();
        let valid = matches!(
            name,
            "allow_other" | "allow_root" | "ro" | "direct_io" | "nonempty"
        ) || (option.contains('=')
            && matches!(
                name,
                "attr_timeout" | "entry_timeout" | "negative_timeout" | "umask" | "uid" | "gid"
            ));
        if !valid {
            return Err(format!("invalid FUSE options. {option} is not supported"));
        }
    }
    let mount_path = mount_path.ok_or("mount path not provided")?;
    let config_file = config_file.ok_or("config file not provided")?;
    let text =
        std::fs::read_to_string(&config_file).map_err(|e| format!("invalid config file [{e}]"))?;
    let config: Value =
        serde_norway::from_str(&text).map_err(|e| format!("invalid config file [{e}]"))?;
    let text_of = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    let id = |key: &str| {
        config["libfuse"][key]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
    };
    let flag = |value: &Value| value.as_bool().unwrap_or(false);

    let meta = std::fs::metadata(&mount_path).map_err(|_| "mount directory does not exist")?;
    if !meta.is_dir() {
        return Err("mount directory does not exist".into());
    }
    let mount_path = mount_path
        .canonicalize()
        .map_err(|_| "mount directory does not exist")?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let escaped = mount_path.display().to_string().replace(' ', "\\040");
    if mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(escaped.as_str()))
    {
        return Err("directory is already mounted".into());
    }
    let allow_other = flag(&config["allow-other"]) || options.contains(&"allow_other");
    let nonempty = flag(&config["nonempty"]) || options.contains(&"nonempty");
    if !nonempty && !is_empty_dir(&mount_path) {
        return Err("mount directory is not empty".into());
    }

    let az = &config["azstorage"];
    let account = text_of(&az["account-name"]);
    if account.is_empty() {
        return Err("account name not provided".into());
    }
    let container = text_of(&az["container"]);
    if container.is_empty() {
        return Err("container name not provided".into());
    }
    let mode = text_of(&az["mode"]);
    let credential = match mode.as_str() {
        "key" => {
            let key = text_of(&az["account-key"]);
            if key.is_empty() {
                return Err("storage key not provided".into());
            }
            Some(key)
        }
        "sas" => {
            let sas = text_of(&az["sas"]);
            if sas.is_empty() {
                return Err("SAS key not provided".into());
            }
            Some(sas)
        }
        "msi" => None,
        _ => return Err("invalid auth mode".into()),
    };

    let cache = &config["file_cache"];
    let cache_path = PathBuf::from(text_of(&cache["path"]));
    if !cache_path.as_os_str().is_empty() {
        if cache_path == mount_path {
            return Err("tmp-path is same as mount path".into());
        }
        if !is_empty_dir(&cache_path) {
            if flag(&cache["cleanup-on-start"]) {
                let _ = std::fs::remove_dir_all(&cache_path);
            } else if !flag(&cache["allow-non-empty-temp"]) {
                return Err("config error in file_cache [temp directory not empty]".into());
            }
        }
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cache_path);
    }

    let endpoint = match text_of(&az["endpoint"]) {
        e if e.is_empty() => format!("https://{account}.blob.core.windows.net"),
        e => e,
    };
    let url = match (&mode[..], &credential) {
        ("sas", Some(sas)) => format!(
            "{endpoint}/{container}?restype=container&{}",
            sas.trim_start_matches('?')
        ),
        _ => format!("{endpoint}/{container}?restype=container"),
    };
    let auth_error = |detail: &str| {
        format!("failed to authenticate azstorage credentials with error [GET {url}: {detail}]")
    };
    let root = std::env::var_os("STANDIN_STORAGE_ROOT")
        .map(PathBuf::from)
        .ok_or_else(|| auth_error("STANDIN_STORAGE_ROOT is not set"))?;
    if let Ok(expected) = std::fs::read_to_string(root.join(format!("{container}.credential"))) {
        let given = credential.clone().unwrap_or_default();
        if expected.trim() != given.trim() {
            return Err(auth_error(
                "403 AuthenticationFailed: Server failed to authenticate the request",
            ));
        }
    }
    let mut storage = root.join(&container);
    if !storage.is_dir() {
        return Err(auth_error(
            "404 ContainerNotFound: The specified container does not exist",
        ));
    }
    let subdirectory = text_of(&az["subdirectory"]);
    if !subdirectory.is_empty() {
        storage.push(subdirectory);
        std::fs::create_dir_all(&storage).map_err(|e| format!("subdirectory: {e}"))?;
    }
    let logging = &config["logging"];
    let log_file = (text_of(&logging["type"]) == "base")
        .then(|| PathBuf::from(text_of(&logging["file-path"])))
        .filter(|p| !p.as_os_str().is_empty());
    Ok(Settings {
        mount_path,
        storage,
        read_only: flag(&config["read-only"]) || options.contains(&"ro"),
        allow_other,
        allow_root: flag(&config["allow-root"]) || options.contains(&"allow_root"),
        shown: Shown {
            uid: id("uid").unwrap_or_else(|| nix::unistd::getuid().as_raw()),
            gid: id("gid").unwrap_or_else(|| nix::unistd::getgid().as_raw()),
            perm: allow_other
                .then_some(0o777)
                .or_else(|| id("default-permission")),
        },
        log_file,
        description: format!("{account}/{container} ({mode})"),
    })
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

const TTL: Duration = Duration::from_secs(1);

/// What every inode shows (blobfuse2's `libfuse.uid`, `gid`, and mode).
#[derive(Clone, Copy)]
struct Shown {
    uid: u32,
    gid: u32,
    perm: Option<u32>,
}

/// Serves a local directory, read-write.
struct Passthrough {
    root: PathBuf,
    shown: Shown,
    inodes: Mutex<Inodes>,
    files: Mutex<HashMap<u64, File>>,
    next_handle: Mutex<u64>,
}

fn errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(nix::libc::EIO))
}

fn to_time(seconds: i64, nanos: i64) -> SystemTime {
    let nanos = u32::try_from(nanos).unwrap_or(0);
    match u64::try_from(seconds) {
        Ok(s) => UNIX_EPOCH + Duration::new(s, nanos),
        Err(_) => UNIX_EPOCH,
    }
}

impl Passthrough {
    fn new(root: PathBuf, shown: Shown) -> Self {
        let mut inodes = Inodes {
            next: 1,
            ..Inodes::default()
        };
        inodes.paths.insert(INodeNo::ROOT.0, PathBuf::new());
        inodes.numbers.insert(PathBuf::new(), INodeNo::ROOT.0);
        Self {
            root,
            shown,
            inodes: Mutex::new(inodes),
            files: Mutex::new(HashMap::new()),
            next_handle: Mutex::new(0),
        }
    }

    fn inodes(&self) -> std::sync::MutexGuard<'_, Inodes> {
        self.inodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<u64, File>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn relative(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.inodes()
            .paths
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.relative(parent)?.join(name))
    }

    fn attr(&self, relative: &Path) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(self.root.join(relative)).map_err(|e| errno(&e))?;
        let ino = self.inodes().number(relative);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size: meta.len(),
            blocks: meta.blocks(),
            atime: to_time(meta.atime(), meta.atime_nsec()),
            mtime: to_time(meta.mtime(), meta.mtime_nsec()),
            ctime: to_time(meta.ctime(), meta.ctime_nsec()),
            crtime: to_time(meta.ctime(), meta.ctime_nsec()),
            kind: FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile),
            perm: u16::try_from(self.shown.perm.unwrap_or(meta.mode()) & 0o7777).unwrap_or(0o644),
            nlink: u32::try_from(meta.nlink()).unwrap_or(1),
            uid: self.shown.uid,
            gid: self.shown.gid,
            rdev: u32::try_from(meta.rdev()).unwrap_or(0),
            blksize: 4096,
            flags: 0,
        })
    }

    fn remove(
        &self,
        parent: INodeNo,
        name: &OsStr,
        how: fn(&Path) -> std::io::Result<()>,
        reply: ReplyEmpty,
    ) {
        match self
            .child(parent, name)
            .and_then(|p| how(&self.root.join(p)).map_err(|e| errno(&e)))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn keep(&self, file: File) -> u64 {
        let mut next = self.next_handle.lock().unwrap_or_else(|p| p.into_inner());
        *next += 1;
        self.files().insert(*next, file);
        *next
    }
}

impl Filesystem for Passthrough {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> std::io::Result<()> {
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|p| self.attr(&p)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.relative(ino).and_then(|p| self.attr(&p)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = (|| {
            let relative = self.relative(ino)?;
            let path = self.root.join(&relative);
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| errno(&e))?;
            }
            if let Some(size) = size {
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(size))
                    .map_err(|e| errno(&e))?;
            }
            if let Some(mtime) = mtime
                && path.is_file()
            {
                let time = match mtime {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(time))
                    .map_err(|e| errno(&e))?;
            }
            self.attr(&relative)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.child(parent, name).and_then(|relative| {
            std::fs::DirBuilder::new()
                .mode(mode & !umask & 0o7777)
                .create(self.root.join(&relative))
                .map_err(|e| errno(&e))?;
            self.attr(&relative)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, |p| std::fs::remove_file(p), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, |p| std::fs::remove_dir(p), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            std::fs::rename(self.root.join(&from), self.root.join(&to)).map_err(|e| errno(&e))?;
            self.inodes().rename(&from, &to);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (read, write) = match flags.acc_mode() {
            OpenAccMode::O_RDONLY => (true, false),
            OpenAccMode::O_WRONLY => (false, true),
            OpenAccMode::O_RDWR => (true, true),
        };
        let result = self.relative(ino).and_then(|relative| {
            OpenOptions::new()
                .read(read)
                .write(write)
                .custom_flags(flags.0 & nix::libc::O_APPEND)
                .open(self.root.join(relative))
                .map_err(|e| errno(&e))
        });
        match result {
            Ok(file) => reply.opened(FileHandle(self.keep(file)), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.child(parent, name).and_then(|relative| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .custom_flags(
                    flags & (nix::libc::O_EXCL | nix::libc::O_TRUNC | nix::libc::O_APPEND),
                )
                .mode(mode & !umask & 0o7777)
                .open(self.root.join(&relative))
                .map_err(|e| errno(&e))?;
            Ok((self.attr(&relative)?, file))
        });
        match result {
            Ok((attr, file)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(self.keep(file)),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let files = self.files();
        let Some(file) = files.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let mut buffer = vec![0; size as usize];
        let mut filled = 0;
        while filled < buffer.len() {
            match file.read_at(&mut buffer[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buffer[..filled]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let files = self.files();
        let Some(file) = files.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        match file.write_all_at(data, offset) {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.files().get(&fh.0).map(File::sync_all) {
            Some(Err(e)) => reply.error(errno(&e)),
            _ => reply.ok(),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let relative = match self.relative(ino) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let entries = match std::fs::read_dir(self.root.join(&relative)) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut names: Vec<(std::ffi::OsString, FileType)> = entries
            .flatten()
            .map(|e| {
                let kind = e
                    .file_type()
                    .ok()
                    .and_then(FileType::from_std)
                    .unwrap_or(FileType::RegularFile);
                (e.file_name(), kind)
            })
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let mut all = vec![
            (
                INodeNo(ino.0),
                std::ffi::OsString::from("."),
                FileType::Directory,
            ),
            (
                INodeNo(ino.0),
                std::ffi::OsString::from(".."),
                FileType::Directory,
            ),
        ];
        for (name, kind) in names {
            let n = self.inodes().number(&relative.join(&name));
            all.push((INodeNo(n), name, kind));
        }
        for (i, (n, name, kind)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(n, (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(&self.root) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                u32::try_from(s.block_size()).unwrap_or(4096),
                255,
                u32::try_from(s.fragment_size()).unwrap_or(4096),
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }
}

//! The walk behind `instance-agent disk --top PATH`: the largest directories
//! below PATH, by allocated bytes (what `du -x` counts), staying on PATH's
//! filesystem, bounded in time and in entries, reporting progress as it goes.
//!
//! Blocking, and into trees that users control: [`walk`] runs in the probe
//! helper process (`disk::probe::child`), never in the agent's threads, at
//! most one per filesystem (`disk::probe::flights`), killed when it overruns.
//! Memory stays small whatever the tree: a depth-first walk keeps one frame
//! (one open directory) per level and a heap of the current top N. Reads only
//! metadata; never opens or changes a file.
//!
//! The daemon runs as root, but a walk asked for by an operator only goes
//! where that operator could go themselves: the start is reached one
//! component at a time from `/`, each directory on the way checked for the
//! operator's search permission (and the start for read and search), and
//! below it only the directories they could list are entered (owner, group
//! and mode bits), so `--top` shows no more of other users' trees than `du`
//! run by the operator would. The walk goes by descriptors: each directory
//! is opened from its parent's descriptor with `O_NOFOLLOW | O_DIRECTORY`,
//! checked on that descriptor, and read through it, never reopened by a
//! path after its check, so renames and symlinks swapped in meanwhile cannot
//! take it anywhere else.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Stat};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::DiskError;
use crate::paths::held::{self, Held};

/// What to walk and how far.
#[derive(Debug, Clone)]
pub struct TopRequest {
    /// The directory to start from.
    pub path: PathBuf,
    /// How many directories to report.
    pub limit: usize,
    /// How long the walk may take.
    pub timeout: Duration,
    /// How many entries it may examine.
    pub max_entries: u64,
    /// Walk with the permissions of this user (an operator) instead of
    /// root's; `None` for an admin.
    pub as_uid: Option<u32>,
}

/// The user whose permissions a walk honours.
struct Caller {
    uid: u32,
    gids: Vec<u32>,
}

impl Caller {
    /// Looks up the groups of `uid` (the user database may be slow: this
    /// runs on the walk's blocking thread). An unknown uid has no groups.
    fn lookup(uid: u32) -> Self {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten();
        let gids = user
            .and_then(|user| {
                let name = std::ffi::CString::new(user.name).ok()?;
                nix::unistd::getgrouplist(&name, user.gid).ok()
            })
            .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        Self { uid, gids }
    }

    /// The caller's permission bits (`rwx`, 0 to 7) on an object.
    fn bits(&self, stat: &Stat) -> u32 {
        if self.uid == 0 {
            return 0o7;
        }
        let mode = stat.st_mode;
        let bits = if stat.st_uid == self.uid {
            mode >> 6
        } else if self.gids.contains(&stat.st_gid) {
            mode >> 3
        } else {
            mode
        };
        bits & 0o7
    }

    /// Whether the caller may list `dir` (read and search permission).
    fn may_list(&self, dir: &Stat) -> bool {
        self.bits(dir) & 0o5 == 0o5
    }

    /// Whether the caller may look names up in `dir` (search permission).
    fn may_search(&self, dir: &Stat) -> bool {
        self.bits(dir) & 0o1 == 0o1
    }
}

/// How far a walk has got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopProgress {
    /// Entries examined.
    pub entries: u64,
    /// Bytes counted.
    pub bytes: u64,
    /// The directory being read.
    pub current: PathBuf,
}

/// A directory and the bytes below it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DirectorySize {
    /// Bytes allocated to it and everything below it on the same filesystem.
    pub bytes: u64,
    /// The directory.
    pub path: PathBuf,
}

/// The result of a walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopReport {
    /// Where the walk started.
    pub path: PathBuf,
    /// Bytes below it (complete or not).
    pub total_bytes: u64,
    /// Entries examined.
    pub entries: u64,
    /// Entries that could not be read (permission, vanished).
    pub unreadable: u64,
    /// The largest directories, largest first (the start included).
    pub directories: Vec<DirectorySize>,
    /// Why the walk stopped early, if it did; then the sizes are lower bounds.
    pub stopped: Option<String>,
    /// How long it took.
    pub elapsed: Duration,
}

struct Frame {
    path: PathBuf,
    entries: Dir,
    bytes: u64,
}

/// A directory opened for reading from its parent's descriptor, never
/// through a symlink.
fn open_child_dir(parent: &Dir, name: &OsStr) -> std::io::Result<(Dir, Stat)> {
    let fd = rustix::fs::openat(
        parent.fd()?,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOATIME,
        Mode::empty(),
    )
    .or_else(|e| {
        // O_NOATIME is refused (EPERM) on files root does not own in some
        // setups; it only spares an atime update.
        if e == rustix::io::Errno::PERM {
            rustix::fs::openat(
                parent.fd()?,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
        } else {
            Err(e)
        }
    })?;
    let stat = rustix::fs::fstat(&fd)?;
    Ok((Dir::new(fd)?, stat))
}

/// How often progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Walks `request.path`. `progress` is called about every 250 ms; `cancel`
/// stops the walk early (the caller gave up waiting). Errors only when the
/// start itself cannot be read.
pub fn walk(
    request: &TopRequest,
    cancel: &Arc<AtomicBool>,
    mut progress: impl FnMut(TopProgress),
) -> std::io::Result<TopReport> {
    let started = Instant::now();
    let deadline = started + request.timeout;
    let caller = request.as_uid.map(Caller::lookup);
    let denied = |what: String| {
        std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("uid {} may not {what}", request.as_uid.unwrap_or_default()),
        )
    };
    // The start as the caller reaches it: every directory on the way must
    // be searchable by them.
    let start = match &caller {
        None => Held::open(&request.path)?,
        Some(c) => {
            held::open_searching(&request.path, |dir| c.may_search(dir)).map_err(|e| match e {
                held::WalkError::Denied(dir) => denied(format!(
                    "search {} on the way to this directory",
                    dir.display()
                )),
                held::WalkError::Io { source, .. } => source,
            })?
        }
    };
    if !start.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "not a directory",
        ));
    }
    let may_list = |dir: &Stat| caller.as_ref().is_none_or(|c| c.may_list(dir));
    let dir = Dir::new(rustix::fs::openat(
        start.fd(),
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)?;
    let root = rustix::fs::fstat(dir.fd()?)?;
    if !may_list(&root) {
        return Err(denied("list this directory".into()));
    }
    let dev = root.st_dev;
    let mut top = TopHeap::new(request.limit);
    let mut seen_links: HashSet<(u64, u64)> = HashSet::new();
    let mut entries: u64 = 0;
    let mut unreadable: u64 = 0;
    let mut total: u64 = 0;
    let mut stopped = None;
    let mut last_progress = started;
    let mut stack = vec![Frame {
        path: request.path.clone(),
        entries: dir,
        bytes: allocated(&root),
    }];
    total += allocated(&root);

    while let Some(frame) = stack.last_mut() {
        if stopped.is_none() && entries.is_multiple_of(256) {
            let now = Instant::now();
            if cancel.load(Ordering::Relaxed) {
                stopped = Some("cancelled".to_owned());
            } else if now >= deadline {
                stopped = Some(format!(
                    "time limit of {}s reached",
                    request.timeout.as_secs()
                ));
            } else if now.duration_since(last_progress) >= PROGRESS_EVERY {
                last_progress = now;
                progress(TopProgress {
                    entries,
                    bytes: total,
                    current: frame.path.clone(),
                });
            }
        }
        if stopped.is_none() && entries >= request.max_entries {
            stopped = Some(format!("entry limit of {} reached", request.max_entries));
        }
        // When stopped, unwind: finish every open frame without reading more.
        let next = if stopped.is_some() {
            None
        } else {
            frame.entries.read()
        };
        let Some(entry) = next else {
            let Some(done) = stack.pop() else { break };
            if let Some(parent) = stack.last_mut() {
                parent.bytes += done.bytes;
            }
            top.push(DirectorySize {
                bytes: done.bytes,
                path: done.path,
            });
            continue;
        };
        let Ok(entry) = entry else {
            entries += 1;
            unreadable += 1;
            continue;
        };
        let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_owned();
        if name == "." || name == ".." {
            continue;
        }
        entries += 1;
        // lstat from the directory's own descriptor: symlinks are counted
        // as themselves, never followed.
        let Ok(meta) = frame
            .entries
            .fd()
            .and_then(|fd| rustix::fs::statat(fd, &name, AtFlags::SYMLINK_NOFOLLOW))
        else {
            unreadable += 1;
            continue;
        };
        if meta.st_dev != dev {
            // Another filesystem mounted below: not ours to count.
            continue;
        }
        let is_dir = FileType::from_raw_mode(meta.st_mode) == FileType::Directory;
        if meta.st_nlink > 1 && !is_dir && !seen_links.insert((meta.st_dev, meta.st_ino)) {
            continue;
        }
        let bytes = allocated(&meta);
        total += bytes;
        if is_dir && !may_list(&meta) {
            // Counted as an entry the caller cannot see into.
            unreadable += 1;
            frame_add(&mut stack, bytes);
        } else if is_dir {
            let path = frame.path.join(&name);
            // The directory read is the one just looked at (same inode, still
            // listable): anything swapped in meanwhile is not entered.
            match open_child_dir(&frame.entries, &name) {
                Ok((children, opened))
                    if (opened.st_dev, opened.st_ino) == (meta.st_dev, meta.st_ino)
                        && may_list(&opened) =>
                {
                    stack.push(Frame {
                        path,
                        entries: children,
                        bytes,
                    })
                }
                _ => {
                    unreadable += 1;
                    frame_add(&mut stack, bytes);
                }
            }
        } else {
            frame_add(&mut stack, bytes);
        }
    }
    Ok(TopReport {
        path: request.path.clone(),
        total_bytes: total,
        entries,
        unreadable,
        directories: top.into_sorted(),
        stopped,
        elapsed: started.elapsed(),
    })
}

fn frame_add(stack: &mut [Frame], bytes: u64) {
    if let Some(frame) = stack.last_mut() {
        frame.bytes += bytes;
    }
}

/// Bytes allocated on disk (`st_blocks` counts 512-byte units).
fn allocated(meta: &Stat) -> u64 {
    (meta.st_blocks as u64).saturating_mul(512)
}

/// The N largest directories seen so far.
struct TopHeap {
    limit: usize,
    heap: BinaryHeap<Reverse<DirectorySize>>,
}

impl TopHeap {
    fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            heap: BinaryHeap::new(),
        }
    }

    fn push(&mut self, dir: DirectorySize) {
        if self.heap.len() < self.limit {
            self.heap.push(Reverse(dir));
        } else if self.heap.peek().is_some_and(|smallest| dir > smallest.0) {
            self.heap.pop();
            self.heap.push(Reverse(dir));
        }
    }

    fn into_sorted(self) -> Vec<DirectorySize> {
        let mut dirs: Vec<DirectorySize> = self.heap.into_iter().map(|r| r.0).collect();
        dirs.sort_by(|a, b| b.cmp(a));
        dirs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn write(path: &Path, bytes: usize) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![1u8; bytes]).unwrap();
    }

    fn request(path: &Path) -> TopRequest {
        TopRequest {
            path: path.to_owned(),
            limit: 3,
            timeout: Duration::from_secs(30),
            max_entries: 1_000_000,
            as_uid: None,
        }
    }

    #[test]
    fn largest_directories_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(&root.join("big/a/file"), 3 << 20);
        write(&root.join("big/b/file"), 1 << 20);
        write(&root.join("small/file"), 64 << 10);
        let report = walk(&request(root), &Arc::new(AtomicBool::new(false)), |_| {}).unwrap();
        assert_eq!(report.stopped, None);
        let names: Vec<PathBuf> = report.directories.iter().map(|d| d.path.clone()).collect();
        assert_eq!(
            names,
            [root.to_owned(), root.join("big"), root.join("big/a")]
        );
        assert!(report.directories[2].bytes >= 3 << 20);
        assert!(report.total_bytes >= 4 << 20);
        assert_eq!(report.total_bytes, report.directories[0].bytes);
    }

    #[test]
    fn entry_limit_stops_early_with_partial_sizes() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..50 {
            write(&dir.path().join(format!("d{i}/f")), 4096);
        }
        let mut req = request(dir.path());
        req.max_entries = 10;
        let report = walk(&req, &Arc::new(AtomicBool::new(false)), |_| {}).unwrap();
        assert!(report.stopped.unwrap().contains("entry limit of 10"));
        assert!(report.entries <= 11);
    }

    #[test]
    fn an_operators_walk_enters_only_what_they_may_list() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        write(&root.join("open/file"), 1 << 20);
        write(&root.join("private/secret-name/file"), 4 << 20);
        std::fs::set_permissions(root.join("private"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        // A uid that owns nothing here and has no groups: "other" bits only.
        let mut req = request(root);
        req.as_uid = Some(4_000_321);
        let report = walk(&req, &Arc::new(AtomicBool::new(false)), |_| {}).unwrap();
        assert!(
            report
                .directories
                .iter()
                .all(|d| !d.path.starts_with(root.join("private/secret-name"))),
            "{report:?}"
        );
        assert_eq!(report.unreadable, 1, "{report:?}");
        assert!(report.total_bytes < 2 << 20, "{report:?}");
        // Root (an admin) sees it all.
        let report = walk(&request(root), &Arc::new(AtomicBool::new(false)), |_| {}).unwrap();
        assert!(report.total_bytes >= 5 << 20, "{report:?}");
        // A start the caller may not list is refused.
        let mut req = request(&root.join("private"));
        req.as_uid = Some(4_000_321);
        let error = walk(&req, &Arc::new(AtomicBool::new(false)), |_| {}).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
        // So is one they could list but cannot reach: an ancestor is closed.
        std::fs::set_permissions(
            root.join("private/secret-name"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let mut req = request(&root.join("private/secret-name"));
        req.as_uid = Some(4_000_321);
        let error = walk(&req, &Arc::new(AtomicBool::new(false)), |_| {}).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(error.to_string().contains("search"), "{error}");
        // Through a symlink the operator may follow, the real ancestors count too.
        std::os::unix::fs::symlink(root.join("private/secret-name"), root.join("open/link"))
            .unwrap();
        let mut req = request(&root.join("open/link"));
        req.as_uid = Some(4_000_321);
        let error = walk(&req, &Arc::new(AtomicBool::new(false)), |_| {}).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn time_limit_stops_the_walk_with_partial_sizes() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a/f"), 10);
        let mut req = request(dir.path());
        req.timeout = Duration::ZERO;
        let report = walk(&req, &Arc::new(AtomicBool::new(false)), |_| {}).unwrap();
        assert_eq!(report.stopped.as_deref(), Some("time limit of 0s reached"));
    }

    /// A tmpfs mounted for one test, unmounted even when it fails.
    struct TmpfsMount(PathBuf);

    impl Drop for TmpfsMount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn stays_on_the_filesystem_it_starts_on() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("here/file"), 1 << 20);
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &other,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=16m"),
        )
        .expect("mount a tmpfs");
        let _mounted = TmpfsMount(other.clone());
        write(&other.join("deep/file"), 8 << 20);
        let report = walk(
            &request(dir.path()),
            &Arc::new(AtomicBool::new(false)),
            |_| {},
        )
        .unwrap();
        assert_eq!(report.stopped, None);
        // The 8 MiB on the other filesystem are not counted, nor walked into.
        assert!(report.total_bytes < 4 << 20, "{report:?}");
        assert!(
            report
                .directories
                .iter()
                .all(|d| !d.path.starts_with(other.join("deep"))),
            "{report:?}"
        );
        assert_eq!(report.directories[1].path, dir.path().join("here"));
    }

    #[test]
    fn cancel_stops_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a/f"), 10);
        let report = walk(
            &request(dir.path()),
            &Arc::new(AtomicBool::new(true)),
            |_| {},
        )
        .unwrap();
        assert_eq!(report.stopped.as_deref(), Some("cancelled"));
    }

    #[test]
    fn hard_links_count_once() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a/f"), 1 << 20);
        std::fs::create_dir(dir.path().join("b")).unwrap();
        std::fs::hard_link(dir.path().join("a/f"), dir.path().join("b/f")).unwrap();
        let report = walk(
            &request(dir.path()),
            &Arc::new(AtomicBool::new(false)),
            |_| {},
        )
        .unwrap();
        assert!(report.total_bytes < 2 << 20, "{}", report.total_bytes);
    }
}

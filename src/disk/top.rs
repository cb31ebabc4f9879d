//! The walk behind `instance-agent disk --top PATH`: the largest directories
//! below PATH, by allocated bytes (what `du -x` counts), staying on PATH's
//! filesystem, bounded in time and in entries, reporting progress as it goes.
//!
//! Blocking: [`walk`] runs in `spawn_blocking`, and [`TopWalks`] runs at
//! most one at a time, bounded even when blocked inside one call on a hung
//! filesystem. Memory stays small whatever the tree: a depth-first walk keeps
//! one frame per level and a heap of the current top N. Reads only metadata;
//! never opens or changes a file.
//!
//! The daemon runs as root, but a walk asked for by an operator only enters
//! the directories that operator could list themselves (read and search
//! permission by owner, group and mode bits), so `--top` shows no more of
//! other users' trees than `du` run by the operator would.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::DiskError;

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

/// The walks of `disk --top`, one at a time, so that a walk stuck on a hung
/// filesystem cannot pile up threads.
#[derive(Debug, Default)]
pub struct TopWalks {
    busy: Arc<AtomicBool>,
}

impl TopWalks {
    /// Walks `request.path` off the runtime. Progress goes to `progress`
    /// (dropped when it is full). Fails with [`DiskError::Busy`] while
    /// another walk runs, and with [`DiskError::Timeout`] when the walk
    /// overruns its timeout by 5 s (blocked inside one call); dropping the
    /// future stops the walk too.
    pub async fn run(
        &self,
        request: TopRequest,
        progress: mpsc::Sender<TopProgress>,
    ) -> Result<TopReport, DiskError> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(DiskError::Busy);
        }
        let busy = self.busy.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        // A client that goes away drops this future: the walk stops too.
        let _stop_walk = CancelOnDrop(cancel.clone());
        let walk_cancel = cancel.clone();
        let walk_request = request.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let result = walk(&walk_request, &walk_cancel, |p| {
                let _ = progress.try_send(p);
            });
            busy.store(false, Ordering::Release);
            result
        });
        // The walk checks its own deadline between entries; this one covers
        // a walk blocked inside one call on a hung filesystem.
        let limit = request.timeout + Duration::from_secs(5);
        match tokio::time::timeout(limit, handle).await {
            Ok(Ok(Ok(report))) => Ok(report),
            Ok(Ok(Err(source))) => Err(DiskError::Path {
                path: request.path,
                source,
            }),
            Ok(Err(join)) => Err(DiskError::Path {
                path: request.path,
                source: std::io::Error::other(join.to_string()),
            }),
            Err(_) => {
                cancel.store(true, Ordering::Relaxed);
                Err(DiskError::Timeout {
                    path: request.path,
                    timeout: limit,
                })
            }
        }
    }
}

/// Sets its flag when dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
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

    /// Whether the caller may list `dir` (read and search permission).
    fn may_list(&self, dir: &std::fs::Metadata) -> bool {
        if self.uid == 0 {
            return true;
        }
        let mode = dir.mode();
        let bits = if dir.uid() == self.uid {
            mode >> 6
        } else if self.gids.contains(&dir.gid()) {
            mode >> 3
        } else {
            mode
        };
        bits & 0o5 == 0o5
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
    entries: std::fs::ReadDir,
    bytes: u64,
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
    let root = std::fs::symlink_metadata(&request.path)?;
    if !root.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "not a directory",
        ));
    }
    let caller = request.as_uid.map(Caller::lookup);
    let may_list = |dir: &std::fs::Metadata| caller.as_ref().is_none_or(|c| c.may_list(dir));
    if !may_list(&root) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "uid {} may not list this directory",
                request.as_uid.unwrap_or_default()
            ),
        ));
    }
    let dev = root.dev();
    let mut top = TopHeap::new(request.limit);
    let mut seen_links: HashSet<(u64, u64)> = HashSet::new();
    let mut entries: u64 = 0;
    let mut unreadable: u64 = 0;
    let mut total: u64 = 0;
    let mut stopped = None;
    let mut last_progress = started;
    let mut stack = vec![Frame {
        path: request.path.clone(),
        entries: std::fs::read_dir(&request.path)?,
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
            frame.entries.next()
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
        entries += 1;
        let Ok(entry) = entry else {
            unreadable += 1;
            continue;
        };
        let path = entry.path();
        // lstat: symlinks are counted as themselves, never followed.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            unreadable += 1;
            continue;
        };
        if meta.dev() != dev {
            // Another filesystem mounted below: not ours to count.
            continue;
        }
        if meta.nlink() > 1 && !meta.is_dir() && !seen_links.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let bytes = allocated(&meta);
        total += bytes;
        if meta.is_dir() && !may_list(&meta) {
            // Counted as an entry the caller cannot see into.
            unreadable += 1;
            frame_add(&mut stack, bytes);
        } else if meta.is_dir() {
            match std::fs::read_dir(&path) {
                Ok(children) => stack.push(Frame {
                    path,
                    entries: children,
                    bytes,
                }),
                Err(_) => {
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
fn allocated(meta: &std::fs::Metadata) -> u64 {
    meta.blocks().saturating_mul(512)
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

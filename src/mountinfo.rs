//! The kernel's mount table, `/proc/self/mountinfo`: parsed once here for the
//! disk guard (where the filesystem holding a path is mounted) and for mounts
//! (the only proof that a mount is up, and how an already-used mount path is
//! recognised). Reading it never touches a mounted filesystem, so a hung FUSE
//! mount cannot block it.

use std::path::{Path, PathBuf};

/// One line of mountinfo, the fields the agent needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id (what `statx` reports as `stx_mnt_id`).
    pub id: u64,
    /// The peer group it shares mount events with (`shared:N`), if any.
    pub peer_group: Option<u64>,
    /// Major and minor device numbers of the filesystem (what `st_dev` of a
    /// file on it holds).
    pub dev: (u64, u64),
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type, e.g. "fuse" or "ext4".
    pub fs_type: String,
    /// Source, e.g. "blobfuse2" or "/dev/sda1".
    pub source: String,
}

impl MountEntry {
    /// Whether this is a FUSE mount ("fuse" or "fuse.<subtype>").
    pub fn is_fuse(&self) -> bool {
        self.fs_type == "fuse" || self.fs_type.starts_with("fuse.")
    }
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// Reads the calling thread's mountinfo (`/proc/thread-self`: the same as
/// the process's in the agent, and right in a test thread that has a mount
/// namespace of its own). Blocking but never touches a mounted filesystem.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string(
        "/proc/thread-self/mountinfo",
    )?))
}

/// The topmost entry mounted exactly at `path`, if any.
pub fn find<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == path)
}

/// The mount point of the deepest mount in `table` that is a prefix of
/// `path`, by text alone (`/` when none is): which filesystem a path names
/// before anything is asked of it. Symlinks are not followed, so a link
/// into another filesystem counts as the filesystem it lives on.
pub fn lexical_mount(table: &[MountEntry], path: &Path) -> PathBuf {
    table
        .iter()
        .filter(|entry| path.starts_with(&entry.mount_point))
        .max_by_key(|entry| entry.mount_point.components().count())
        .map_or_else(|| PathBuf::from("/"), |entry| entry.mount_point.clone())
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // id parent major:minor root mount_point options [optional...] - type source super_options
    let (before, after) = line.split_once(" - ")?;
    let mut before = before.split(' ');
    let id = before.next()?.parse().ok()?;
    let (major, minor) = before.nth(1)?.split_once(':')?;
    let mount_point = before.nth(1)?;
    let peer_group = before
        .skip(1)
        .find_map(|field| field.strip_prefix("shared:")?.parse().ok());
    let mut after = after.split(' ');
    let fs_type = after.next()?;
    let source = after.next()?;
    Some(MountEntry {
        id,
        peer_group,
        dev: (major.parse().ok()?, minor.parse().ok()?),
        mount_point: PathBuf::from(unescape(mount_point)),
        fs_type: unescape(fs_type),
        source: unescape(source),
    })
}

/// Undoes the kernel's octal escapes (`\040` for space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
98 22 0:50 / /mnt/data rw,nosuid,nodev,relatime shared:60 - fuse blobfuse2 rw,user_id=0,group_id=0,allow_other
99 22 0:51 / /mnt/my\\040data rw,nosuid,nodev - fuse.sshfs host:/x rw
bad line
";

    #[test]
    fn parses_fields_and_escapes() {
        let entries = parse(SAMPLE);
        assert_eq!(entries.len(), 3);
        let data = find(&entries, Path::new("/mnt/data")).unwrap();
        assert_eq!(data.fs_type, "fuse");
        assert_eq!(data.dev, (0, 50));
        assert_eq!(data.source, "blobfuse2");
        assert_eq!((data.id, data.peer_group), (98, Some(60)));
        assert!(data.is_fuse());
        let spaced = find(&entries, Path::new("/mnt/my data")).unwrap();
        assert!(spaced.is_fuse());
        assert_eq!((spaced.id, spaced.peer_group), (99, None));
        assert!(!find(&entries, Path::new("/")).unwrap().is_fuse());
        assert!(find(&entries, Path::new("/mnt/dat")).is_none());
    }

    #[test]
    fn real_mountinfo_has_root() {
        let entries = read().unwrap();
        assert!(find(&entries, Path::new("/")).is_some());
    }
}

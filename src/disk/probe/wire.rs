//! What the probe helper ([`super::child`]) tells the agent
//! ([`super::helper`]): one JSON object per line on its stdout, written as
//! soon as each answer is known. Paths travel as text when they are UTF-8
//! and as bytes otherwise; errors as their OS error number when they have
//! one, so that "not found" is still not found on the agent's side.
//!
//! Plain data and its conversions; no I/O.

use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{PathSample, Sampled};
use crate::disk::top::{DirectorySize, TopProgress, TopReport};
use crate::disk::{FsStats, MountInfo};

/// One line of the helper's output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "line", rename_all = "snake_case")]
pub enum Line {
    /// The sample of the `index`-th path asked for.
    Sample {
        /// Which path.
        index: usize,
        /// What it found.
        result: Result<WireSampled, WireError>,
    },
    /// A walk's progress.
    Progress {
        /// Entries examined.
        entries: u64,
        /// Bytes counted.
        bytes: u64,
        /// The directory being read.
        current: WirePath,
    },
    /// A walk's end.
    Done {
        /// Its report, or why it could not start.
        result: Result<WireReport, WireError>,
    },
}

impl Line {
    /// The line as written, without its newline.
    pub fn encode(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A line as read; `None` for anything else (the helper writes nothing
    /// else to stdout, so that is a bug, logged by the caller).
    pub fn decode(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

/// A path: text when it is UTF-8, bytes otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WirePath {
    /// UTF-8.
    Text(String),
    /// Anything else.
    Bytes(Vec<u8>),
}

impl From<&Path> for WirePath {
    fn from(path: &Path) -> Self {
        match path.to_str() {
            Some(text) => Self::Text(text.to_owned()),
            None => Self::Bytes(path.as_os_str().as_bytes().to_vec()),
        }
    }
}

impl From<WirePath> for PathBuf {
    fn from(path: WirePath) -> Self {
        match path {
            WirePath::Text(text) => PathBuf::from(text),
            WirePath::Bytes(bytes) => PathBuf::from(std::ffi::OsString::from_vec(bytes)),
        }
    }
}

/// The kinds of error the agent tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireKind {
    /// `NotFound`.
    NotFound,
    /// `PermissionDenied`.
    PermissionDenied,
    /// `NotADirectory`.
    NotADirectory,
    /// Anything else.
    Other,
}

/// An I/O error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// The OS error number, when it is one.
    pub os: Option<i32>,
    /// Its kind, for errors without a number.
    pub kind: WireKind,
    /// Its message, for errors without a number.
    pub message: String,
}

impl From<&io::Error> for WireError {
    fn from(error: &io::Error) -> Self {
        let kind = match error.kind() {
            io::ErrorKind::NotFound => WireKind::NotFound,
            io::ErrorKind::PermissionDenied => WireKind::PermissionDenied,
            io::ErrorKind::NotADirectory => WireKind::NotADirectory,
            _ => WireKind::Other,
        };
        Self {
            os: error.raw_os_error(),
            kind,
            message: error.to_string(),
        }
    }
}

impl From<WireError> for io::Error {
    fn from(error: WireError) -> Self {
        if let Some(code) = error.os {
            return io::Error::from_raw_os_error(code);
        }
        let kind = match error.kind {
            WireKind::NotFound => io::ErrorKind::NotFound,
            WireKind::PermissionDenied => io::ErrorKind::PermissionDenied,
            WireKind::NotADirectory => io::ErrorKind::NotADirectory,
            WireKind::Other => io::ErrorKind::Other,
        };
        io::Error::new(kind, error.message)
    }
}

/// Where a filesystem is mounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMount {
    /// Its mount point.
    pub mount_point: WirePath,
    /// Its source.
    pub device: String,
    /// Its type.
    pub fs_type: String,
}

/// A sample of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSampled {
    /// `st_dev`.
    pub dev: u64,
    /// Space and inodes.
    pub total_bytes: u64,
    /// Free bytes (`df`'s Avail).
    pub free_bytes: u64,
    /// Inodes.
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
    /// Where its filesystem is mounted, when asked for and found.
    pub mount: Option<WireMount>,
}

impl From<&Sampled> for WireSampled {
    fn from((sample, mount): &Sampled) -> Self {
        let stats = sample.stats;
        Self {
            dev: sample.dev,
            total_bytes: stats.total_bytes,
            free_bytes: stats.free_bytes,
            total_inodes: stats.total_inodes,
            free_inodes: stats.free_inodes,
            mount: mount.as_ref().map(|m| WireMount {
                mount_point: m.mount_point.as_path().into(),
                device: m.device.clone(),
                fs_type: m.fs_type.clone(),
            }),
        }
    }
}

impl From<WireSampled> for Sampled {
    fn from(wire: WireSampled) -> Self {
        let sample = PathSample {
            dev: wire.dev,
            stats: FsStats {
                total_bytes: wire.total_bytes,
                free_bytes: wire.free_bytes,
                total_inodes: wire.total_inodes,
                free_inodes: wire.free_inodes,
            },
        };
        let mount = wire.mount.map(|m| MountInfo {
            mount_point: m.mount_point.into(),
            device: m.device,
            fs_type: m.fs_type,
        });
        (sample, mount)
    }
}

/// A walk's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireReport {
    /// Where it started.
    pub path: WirePath,
    /// Bytes below it.
    pub total_bytes: u64,
    /// Entries examined.
    pub entries: u64,
    /// Entries that could not be read.
    pub unreadable: u64,
    /// The largest directories, largest first: (bytes, path).
    pub directories: Vec<(u64, WirePath)>,
    /// Why it stopped early.
    pub stopped: Option<String>,
    /// How long it took.
    pub elapsed: Duration,
}

impl From<&TopReport> for WireReport {
    fn from(report: &TopReport) -> Self {
        Self {
            path: report.path.as_path().into(),
            total_bytes: report.total_bytes,
            entries: report.entries,
            unreadable: report.unreadable,
            directories: report
                .directories
                .iter()
                .map(|d| (d.bytes, d.path.as_path().into()))
                .collect(),
            stopped: report.stopped.clone(),
            elapsed: report.elapsed,
        }
    }
}

impl From<WireReport> for TopReport {
    fn from(wire: WireReport) -> Self {
        Self {
            path: wire.path.into(),
            total_bytes: wire.total_bytes,
            entries: wire.entries,
            unreadable: wire.unreadable,
            directories: wire
                .directories
                .into_iter()
                .map(|(bytes, path)| DirectorySize {
                    bytes,
                    path: path.into(),
                })
                .collect(),
            stopped: wire.stopped,
            elapsed: wire.elapsed,
        }
    }
}

impl From<&TopProgress> for Line {
    fn from(p: &TopProgress) -> Self {
        Line::Progress {
            entries: p.entries,
            bytes: p.bytes,
            current: p.current.as_path().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_survive_whatever_their_bytes() {
        for raw in [&b"/tmp/plain"[..], b"/tmp/caf\xc3\xa9", b"/tmp/\xff\xfe"] {
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(raw));
            let line = Line::Progress {
                entries: 1,
                bytes: 2,
                current: path.as_path().into(),
            };
            let Some(Line::Progress { current, .. }) = Line::decode(&line.encode()) else {
                panic!("decodes");
            };
            assert_eq!(PathBuf::from(current), path);
        }
    }

    #[test]
    fn errors_keep_their_kind() {
        let not_found = io::Error::from_raw_os_error(nix::libc::ENOENT);
        let back = io::Error::from(WireError::from(&not_found));
        assert_eq!(back.kind(), io::ErrorKind::NotFound);
        assert_eq!(back.raw_os_error(), Some(nix::libc::ENOENT));
        let custom = io::Error::new(io::ErrorKind::PermissionDenied, "uid 7 may not list it");
        let back = io::Error::from(WireError::from(&custom));
        assert_eq!(back.kind(), io::ErrorKind::PermissionDenied);
        assert!(back.to_string().contains("uid 7 may not list it"), "{back}");
    }

    #[test]
    fn a_sample_round_trips() {
        let sampled: Sampled = (
            PathSample {
                dev: 42,
                stats: FsStats {
                    total_bytes: 10,
                    free_bytes: 5,
                    total_inodes: 3,
                    free_inodes: 1,
                },
            },
            Some(MountInfo {
                mount_point: "/mnt".into(),
                device: "/dev/sdb1".into(),
                fs_type: "ext4".into(),
            }),
        );
        let line = Line::Sample {
            index: 3,
            result: Ok((&sampled).into()),
        };
        let Some(Line::Sample {
            index: 3,
            result: Ok(wire),
        }) = Line::decode(&line.encode())
        else {
            panic!("decodes");
        };
        assert_eq!(Sampled::from(wire), sampled);
    }
}

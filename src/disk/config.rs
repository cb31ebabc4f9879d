//! The `[disk]` section: the guard's levels, timings and extra paths, the
//! per-path overrides (`[disk.overrides."PATH"]`), the levels of
//! memory-backed filesystems (relative to their size), their defaults,
//! ranges and validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Thresholds;
use crate::validate::{self, FieldError, check_ranges, out_of_range};

const GIB: u64 = 1 << 30;

/// `[disk]`: the disk guard's levels, timings and extra paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskConfig {
    /// Milliseconds between samples of every watched filesystem.
    pub interval_ms: u32,
    /// Milliseconds a sample may take before its filesystem is reported unresponsive.
    pub sample_timeout_ms: u32,
    /// Free bytes below which a filesystem is critical (the recovery floor).
    pub critical_free_bytes: u64,
    /// Free bytes below which a filesystem is in warning.
    pub warning_free_bytes: u64,
    /// Free inodes, in percent of all inodes, below which a filesystem is critical.
    pub critical_free_inodes_percent: f64,
    /// Free inodes, in percent of all inodes, below which a filesystem is in warning.
    pub warning_free_inodes_percent: f64,
    /// Free bytes needed above a level before the state may improve.
    pub clear_margin_bytes: u64,
    /// Free inodes (percent) needed above a level before the state may improve.
    pub clear_margin_inodes_percent: f64,
    /// Seconds the improvement must hold before the state improves.
    pub transition_seconds: u32,
    /// On a memory-backed filesystem (tmpfs, ramfs) that no `paths` or
    /// `overrides` entry names: free space, in percent of its size, below
    /// which it is critical (instead of `critical_free_bytes`).
    pub memory_fs_critical_free_percent: f64,
    /// The same for warning (instead of `warning_free_bytes`).
    pub memory_fs_warning_free_percent: f64,
    /// The same for the margin (instead of `clear_margin_bytes`).
    pub memory_fs_clear_margin_percent: f64,
    /// Extra paths to watch, besides /, /tmp, /mnt, the Docker data root,
    /// the state dir and the mount caches.
    pub paths: Vec<PathBuf>,
    /// Levels for the filesystem holding a path, by path (each path is also watched).
    pub overrides: BTreeMap<String, DiskOverride>,
    /// Reclaim space by itself when a watched filesystem turns critical.
    pub auto_reclaim: bool,
    /// Bytes preallocated in the state dir and released when its filesystem
    /// turns critical, so that the agent's own writes still succeed; 0 turns it off.
    pub reserve_bytes: u64,
}

impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            sample_timeout_ms: 3000,
            critical_free_bytes: 5 * GIB,
            warning_free_bytes: 10 * GIB,
            critical_free_inodes_percent: 5.0,
            warning_free_inodes_percent: 10.0,
            clear_margin_bytes: GIB,
            clear_margin_inodes_percent: 1.0,
            transition_seconds: 30,
            memory_fs_critical_free_percent: 5.0,
            memory_fs_warning_free_percent: 10.0,
            memory_fs_clear_margin_percent: 1.0,
            paths: Vec::new(),
            overrides: BTreeMap::new(),
            auto_reclaim: true,
            reserve_bytes: 64 << 20,
        }
    }
}

/// `[disk.overrides."PATH"]`: levels for the filesystem holding PATH; an
/// absent key keeps the `[disk]` value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskOverride {
    /// Replaces `disk.critical_free_bytes`.
    pub critical_free_bytes: Option<u64>,
    /// Replaces `disk.warning_free_bytes`.
    pub warning_free_bytes: Option<u64>,
    /// Replaces `disk.critical_free_inodes_percent`.
    pub critical_free_inodes_percent: Option<f64>,
    /// Replaces `disk.warning_free_inodes_percent`.
    pub warning_free_inodes_percent: Option<f64>,
    /// Replaces `disk.clear_margin_bytes`.
    pub clear_margin_bytes: Option<u64>,
}

impl DiskConfig {
    /// Checks the section; keys are relative to `[disk]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_ranges(&[
            ("interval_ms", self.interval_ms.into(), 100, 60_000),
            (
                "sample_timeout_ms",
                self.sample_timeout_ms.into(),
                100,
                600_000,
            ),
            (
                "transition_seconds",
                self.transition_seconds.into(),
                0,
                3600,
            ),
            ("reserve_bytes", self.reserve_bytes, 0, GIB),
        ])?;
        for (key, p) in self
            .paths
            .iter()
            .map(|p| ("paths", p.as_path()))
            .chain(self.overrides.keys().map(|p| ("overrides", Path::new(p))))
        {
            validate::absolute(key, p)?;
            // Overrides are looked up by the tidy form of a watched path: a
            // key written otherwise would silently never apply.
            match crate::paths::normalise(p) {
                Err(error) => return Err(FieldError::new(key, error.to_string())),
                Ok(tidy) if key == "overrides" && tidy.as_os_str() != p.as_os_str() => {
                    return Err(FieldError::new(
                        key,
                        format!(
                            "{} must be written as {} (no trailing slash, `.` or `//`)",
                            p.display(),
                            tidy.display()
                        ),
                    ));
                }
                Ok(_) => {}
            }
        }
        // The levels as the guard applies them: `[disk]`'s, and each
        // override's on top of them.
        let levels = std::iter::once((String::new(), Thresholds::from_config(self))).chain(
            self.overrides.iter().map(|(p, o)| {
                (
                    format!("overrides.\"{p}\"."),
                    Thresholds::with_override(self, o),
                )
            }),
        );
        for (table, t) in levels {
            let (critical, warning) = (t.critical_free_bytes, t.warning_free_bytes);
            if warning < critical {
                return Err(FieldError::new(
                    format!("{table}warning_free_bytes"),
                    format!(
                        "{warning} is below critical_free_bytes ({critical}): the warning level must be at or above the floor"
                    ),
                ));
            }
            let critical_inodes = t.critical_free_inodes_percent;
            let warning_inodes = t.warning_free_inodes_percent;
            for (key, value) in [
                ("critical_free_inodes_percent", critical_inodes),
                ("warning_free_inodes_percent", warning_inodes),
            ] {
                percent(&format!("{table}{key}"), value)?;
            }
            if warning_inodes < critical_inodes {
                return Err(FieldError::new(
                    format!("{table}warning_free_inodes_percent"),
                    format!(
                        "{warning_inodes} is below critical_free_inodes_percent ({critical_inodes})"
                    ),
                ));
            }
        }
        percent(
            "clear_margin_inodes_percent",
            self.clear_margin_inodes_percent,
        )?;
        for (key, value) in [
            (
                "memory_fs_critical_free_percent",
                self.memory_fs_critical_free_percent,
            ),
            (
                "memory_fs_warning_free_percent",
                self.memory_fs_warning_free_percent,
            ),
            (
                "memory_fs_clear_margin_percent",
                self.memory_fs_clear_margin_percent,
            ),
        ] {
            percent(key, value)?;
        }
        if self.memory_fs_warning_free_percent < self.memory_fs_critical_free_percent {
            return Err(FieldError::new(
                "memory_fs_warning_free_percent",
                format!(
                    "{} is below memory_fs_critical_free_percent ({})",
                    self.memory_fs_warning_free_percent, self.memory_fs_critical_free_percent
                ),
            ));
        }
        Ok(())
    }

    /// Whether the config names `path` (in `paths` or `overrides`), so that
    /// its filesystem keeps the absolute levels even when memory-backed.
    fn names(&self, path: &Path) -> bool {
        self.paths.iter().any(|p| crate::paths::tidy(p) == path)
            || path
                .to_str()
                .is_some_and(|p| self.overrides.contains_key(p))
    }
}

/// Filesystem types held in memory: sized as a share of RAM, not like a
/// disk, so the absolute levels made for the OS disk do not fit them.
pub const MEMORY_FS_TYPES: [&str; 2] = ["tmpfs", "ramfs"];

/// The levels the section yields.
impl Thresholds {
    /// The `[disk]` levels, without per-path overrides.
    pub fn from_config(config: &DiskConfig) -> Self {
        Self {
            warning_free_bytes: config.warning_free_bytes,
            critical_free_bytes: config.critical_free_bytes,
            warning_free_inodes_percent: config.warning_free_inodes_percent,
            critical_free_inodes_percent: config.critical_free_inodes_percent,
            clear_margin_bytes: config.clear_margin_bytes,
            clear_margin_inodes_percent: config.clear_margin_inodes_percent,
            transition: Duration::from_secs(config.transition_seconds.into()),
        }
    }

    /// The `[disk]` levels with one override applied; a key the override
    /// leaves out keeps the `[disk]` value.
    pub fn with_override(config: &DiskConfig, o: &DiskOverride) -> Self {
        let base = Self::from_config(config);
        Self {
            critical_free_bytes: o.critical_free_bytes.unwrap_or(base.critical_free_bytes),
            warning_free_bytes: o.warning_free_bytes.unwrap_or(base.warning_free_bytes),
            critical_free_inodes_percent: o
                .critical_free_inodes_percent
                .unwrap_or(base.critical_free_inodes_percent),
            warning_free_inodes_percent: o
                .warning_free_inodes_percent
                .unwrap_or(base.warning_free_inodes_percent),
            clear_margin_bytes: o.clear_margin_bytes.unwrap_or(base.clear_margin_bytes),
            ..base
        }
    }

    /// The levels for a filesystem of type `fs_type`, `total_bytes` large
    /// once sampled, that holds `paths`: relative to its size when it is
    /// memory-backed and the config names none of its paths (a small tmpfs
    /// `/tmp` must not be held to the OS disk's 5 GiB floor), else those of
    /// [`Thresholds::for_paths`].
    pub fn for_filesystem<'a>(
        config: &DiskConfig,
        paths: impl IntoIterator<Item = &'a Path>,
        fs_type: &str,
        total_bytes: Option<u64>,
    ) -> Self {
        let paths: Vec<&Path> = paths.into_iter().collect();
        let absolute = Self::for_paths(config, paths.iter().copied());
        let memory = MEMORY_FS_TYPES.contains(&fs_type);
        match total_bytes {
            Some(total) if memory && !paths.iter().any(|p| config.names(p)) => {
                let share = |percent: f64| (total as f64 * percent / 100.0) as u64;
                Self {
                    critical_free_bytes: share(config.memory_fs_critical_free_percent),
                    warning_free_bytes: share(config.memory_fs_warning_free_percent),
                    clear_margin_bytes: share(config.memory_fs_clear_margin_percent),
                    ..absolute
                }
            }
            _ => absolute,
        }
    }

    /// The levels for a filesystem that holds `paths`: the `[disk]` levels
    /// with the overrides of those paths applied, the strictest winning.
    pub fn for_paths<'a>(config: &DiskConfig, paths: impl IntoIterator<Item = &'a Path>) -> Self {
        let mut overridden: Option<Self> = None;
        for path in paths {
            let Some(o) = path.to_str().and_then(|p| config.overrides.get(p)) else {
                continue;
            };
            let mine = Self::with_override(config, o);
            overridden = Some(match overridden {
                None => mine,
                Some(acc) => Self {
                    warning_free_bytes: acc.warning_free_bytes.max(mine.warning_free_bytes),
                    critical_free_bytes: acc.critical_free_bytes.max(mine.critical_free_bytes),
                    warning_free_inodes_percent: acc
                        .warning_free_inodes_percent
                        .max(mine.warning_free_inodes_percent),
                    critical_free_inodes_percent: acc
                        .critical_free_inodes_percent
                        .max(mine.critical_free_inodes_percent),
                    clear_margin_bytes: acc.clear_margin_bytes.max(mine.clear_margin_bytes),
                    ..acc
                },
            });
        }
        overridden.unwrap_or_else(|| Self::from_config(config))
    }
}

/// Refuses a percentage outside 0 to 100.
fn percent(key: &str, value: f64) -> Result<(), FieldError> {
    if (0.0..=100.0).contains(&value) {
        Ok(())
    } else {
        Err(FieldError::new(key, out_of_range(value, 0, 100)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> DiskConfig {
        toml::from_str(text).expect("parses")
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(DiskConfig::default().validate(), Ok(()));
    }

    #[test]
    fn disk_override_keys_must_be_tidy_paths() {
        let ok = "[overrides.\"/mnt\"]\ncritical_free_bytes = 1\n";
        assert_eq!(parse(ok).validate(), Ok(()));
        for bad in ["/mnt/", "/mnt//x", "/mnt/./x"] {
            let text = format!("[overrides.\"{bad}\"]\ncritical_free_bytes = 1\n");
            let error = parse(&text).validate().unwrap_err();
            assert_eq!(error.key, "overrides");
            assert!(error.problem.contains("must be written as"), "{error:?}");
        }
        let text = "[overrides.\"/mnt/../etc\"]\ncritical_free_bytes = 1\n";
        let error = parse(text).validate().unwrap_err();
        assert!(
            error.key == "overrides" && error.problem.contains(".."),
            "{error:?}"
        );
    }

    #[test]
    fn levels_are_checked_in_the_section_and_in_each_override() {
        let error = parse("warning_free_bytes = 1\n").validate().unwrap_err();
        assert_eq!(error.key, "warning_free_bytes");
        assert!(
            error.problem.contains("below critical_free_bytes"),
            "{error:?}"
        );
        let text = "[overrides.\"/mnt\"]\nwarning_free_inodes_percent = 100.5\n";
        let error = parse(text).validate().unwrap_err();
        assert_eq!(error.key, "overrides.\"/mnt\".warning_free_inodes_percent");
        assert_eq!(error.problem, "100.5 is out of range: allowed 0 to 100");
        let error = parse("interval_ms = 10\n").validate().unwrap_err();
        assert_eq!(error.problem, "10 is out of range: allowed 100 to 60000");
    }

    #[test]
    fn strictest_override_wins() {
        let mut config = DiskConfig::default();
        config.overrides.insert(
            "/a".into(),
            DiskOverride {
                critical_free_bytes: Some(1),
                ..Default::default()
            },
        );
        config.overrides.insert(
            "/b".into(),
            DiskOverride {
                critical_free_bytes: Some(7 << 30),
                ..Default::default()
            },
        );
        let none = Thresholds::for_paths(&config, [Path::new("/c")]);
        assert_eq!(none, Thresholds::from_config(&config));
        let one = Thresholds::for_paths(&config, [Path::new("/a")]);
        assert_eq!(one.critical_free_bytes, 1);
        let both = Thresholds::for_paths(&config, [Path::new("/a"), Path::new("/b")]);
        assert_eq!(both.critical_free_bytes, 7 << 30);
        assert_eq!(both.warning_free_bytes, 10 << 30);
    }

    #[test]
    fn a_memory_backed_filesystem_gets_levels_relative_to_its_size() {
        let config = DiskConfig::default();
        let tmp = [Path::new("/tmp")];
        let gib = 1u64 << 30;
        let small = Thresholds::for_filesystem(&config, tmp, "tmpfs", Some(2 * gib));
        assert_eq!(small.critical_free_bytes, 2 * gib / 20, "5 %");
        assert_eq!(small.warning_free_bytes, 2 * gib / 10, "10 %");
        assert_eq!(small.clear_margin_bytes, 2 * gib / 100, "1 %");
        assert_eq!(small.critical_free_inodes_percent, 5.0, "inodes as ever");
        // ramfs has no size: nothing to fall below.
        let ramfs = Thresholds::for_filesystem(&config, tmp, "ramfs", Some(0));
        assert_eq!(ramfs.critical_free_bytes, 0);
        // /tmp on the OS disk keeps the absolute floor; so does a tmpfs not
        // sampled yet.
        let disk = Thresholds::for_filesystem(&config, tmp, "ext4", Some(100 * gib));
        assert_eq!(disk, Thresholds::from_config(&config));
        let unsampled = Thresholds::for_filesystem(&config, tmp, "tmpfs", None);
        assert_eq!(unsampled, Thresholds::from_config(&config));
    }

    #[test]
    fn a_memory_backed_filesystem_named_in_the_config_keeps_absolute_levels() {
        let gib = 1u64 << 30;
        let mut config = DiskConfig::default();
        config.overrides.insert(
            "/tmp".into(),
            DiskOverride {
                critical_free_bytes: Some(gib),
                warning_free_bytes: Some(gib),
                ..Default::default()
            },
        );
        let t = Thresholds::for_filesystem(&config, [Path::new("/tmp")], "tmpfs", Some(2 * gib));
        assert_eq!(t.critical_free_bytes, gib);
        let mut config = DiskConfig::default();
        config.paths.push("/scratch/".into());
        let t = Thresholds::for_filesystem(&config, [Path::new("/scratch")], "tmpfs", Some(gib));
        assert_eq!(t, Thresholds::from_config(&config));
    }

    #[test]
    fn memory_levels_are_checked() {
        let error = parse("memory_fs_warning_free_percent = 2.0\n")
            .validate()
            .unwrap_err();
        assert_eq!(error.key, "memory_fs_warning_free_percent");
        let error = parse("memory_fs_critical_free_percent = 101.0\n")
            .validate()
            .unwrap_err();
        assert_eq!(error.key, "memory_fs_critical_free_percent");
    }
}

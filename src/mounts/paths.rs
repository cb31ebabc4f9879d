//! Where mounts and caches may go. A mount path must lie strictly below one of
//! `mounts.allowed_roots`; a cache dir strictly below `mounts.cache_root` or
//! an allowed root (the agent empties cache dirs, so an API caller must not be
//! able to point one at `/etc`). Paths are normalised lexically (`..` is
//! refused), then resolved through the symlinks of their existing ancestors,
//! so a link cannot lead out of the allowed roots. Neither may overlap the
//! agent's own directories.

use std::path::{Component, Path, PathBuf};

/// Lexically normalises an absolute path: drops `.` and repeated or trailing
/// slashes; refuses relative paths and `..`.
pub fn normalise(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err(format!("{} must be an absolute path", path.display()));
    }
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                return Err(format!("{} must not contain '..'", path.display()));
            }
            Component::Prefix(_) => {
                return Err(format!("{} is not a Unix path", path.display()));
            }
        }
    }
    Ok(out)
}

/// Resolves symlinks in the longest existing ancestor of a normalised path
/// and appends the rest. Blocking (it reads the filesystem).
pub fn resolve(path: &Path) -> Result<PathBuf, String> {
    let mut existing = path.to_owned();
    let mut rest = Vec::new();
    loop {
        match existing.symlink_metadata() {
            Ok(_) => break,
            Err(_) => {
                let Some(name) = existing.file_name() else {
                    break;
                };
                rest.push(name.to_owned());
                existing.pop();
            }
        }
    }
    let mut resolved = existing
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", existing.display()))?;
    for name in rest.into_iter().rev() {
        resolved.push(name);
    }
    Ok(resolved)
}

/// Whether `path` is strictly below `root` (component-wise).
pub fn strictly_below(path: &Path, root: &Path) -> bool {
    path != root && path.starts_with(root)
}

/// Whether one path contains the other (or they are equal).
pub fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The rules, with every root already normalised and resolved.
#[derive(Debug, Clone)]
pub struct PathRules {
    allowed_roots: Vec<PathBuf>,
    cache_root: PathBuf,
    agent_dirs: Vec<PathBuf>,
}

impl PathRules {
    /// Builds the rules. Roots that cannot be resolved are kept as written
    /// (they may be created later; a path below them is then checked as is).
    pub fn new(allowed_roots: &[PathBuf], cache_root: &Path, agent_dirs: &[PathBuf]) -> Self {
        let fix = |p: &Path| {
            normalise(p)
                .and_then(|n| resolve(&n))
                .unwrap_or_else(|_| p.to_owned())
        };
        Self {
            allowed_roots: allowed_roots.iter().map(|r| fix(r)).collect(),
            cache_root: fix(cache_root),
            agent_dirs: agent_dirs.iter().map(|d| fix(d)).collect(),
        }
    }

    /// The default cache dir of a mount.
    pub fn default_cache_dir(&self, name: &str) -> PathBuf {
        self.cache_root.join(name)
    }

    /// Checks and resolves a mount path. Blocking.
    pub fn mount_path(&self, path: &Path) -> Result<PathBuf, String> {
        let resolved = resolve(&normalise(path)?)?;
        if !self
            .allowed_roots
            .iter()
            .any(|root| strictly_below(&resolved, root))
        {
            return Err(format!(
                "{} is outside the allowed roots ({}); set mounts.allowed_roots to allow it",
                describe(path, &resolved),
                list(&self.allowed_roots)
            ));
        }
        self.directory_of_its_own(path, resolved)
    }

    /// Checks and resolves a cache dir. Blocking.
    pub fn cache_dir(&self, path: &Path) -> Result<PathBuf, String> {
        let resolved = resolve(&normalise(path)?)?;
        let allowed = strictly_below(&resolved, &self.cache_root)
            || self
                .allowed_roots
                .iter()
                .any(|root| strictly_below(&resolved, root));
        if !allowed {
            return Err(format!(
                "{} must be below mounts.cache_root ({}) or an allowed root ({}): the agent empties cache dirs",
                describe(path, &resolved),
                self.cache_root.display(),
                list(&self.allowed_roots)
            ));
        }
        self.directory_of_its_own(path, resolved)
    }

    /// A resolved path must be a directory (or not exist yet) and must not
    /// overlap the agent's own directories.
    fn directory_of_its_own(&self, path: &Path, resolved: PathBuf) -> Result<PathBuf, String> {
        if let Ok(meta) = resolved.symlink_metadata()
            && !meta.is_dir()
        {
            return Err(format!(
                "{} exists and is not a directory",
                resolved.display()
            ));
        }
        match self.agent_dirs.iter().find(|d| overlaps(&resolved, d)) {
            Some(dir) => Err(format!(
                "{} overlaps the agent's own directory {}",
                describe(path, &resolved),
                dir.display()
            )),
            None => Ok(resolved),
        }
    }
}

fn describe(asked: &Path, resolved: &Path) -> String {
    if asked == resolved {
        asked.display().to_string()
    } else {
        format!("{} (resolves to {})", asked.display(), resolved.display())
    }
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_refuses_dotdot() {
        assert_eq!(
            normalise(Path::new("/mnt//data/./x/")).unwrap(),
            PathBuf::from("/mnt/data/x")
        );
        assert!(
            normalise(Path::new("/mnt/../etc"))
                .unwrap_err()
                .contains("..")
        );
        assert!(normalise(Path::new("mnt/data")).is_err());
    }

    #[test]
    fn mount_paths_must_be_strictly_below_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mnt");
        std::fs::create_dir(&root).unwrap();
        let rules = PathRules::new(
            std::slice::from_ref(&root),
            &dir.path().join("cache"),
            &[dir.path().join("state")],
        );
        let root = root.canonicalize().unwrap();
        assert_eq!(
            rules.mount_path(&root.join("data")).unwrap(),
            root.join("data")
        );
        assert!(
            rules
                .mount_path(&root)
                .unwrap_err()
                .contains("outside the allowed roots")
        );
        assert!(
            rules
                .mount_path(Path::new("/etc/x"))
                .unwrap_err()
                .contains("outside")
        );
        // A root that is a prefix as a string but not as a path.
        let sibling = PathBuf::from(format!("{}x/data", root.display()));
        assert!(rules.mount_path(&sibling).is_err());
    }

    #[test]
    fn symlinks_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mnt");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let rules = PathRules::new(&[root], &dir.path().join("cache"), &[]);
        let err = rules
            .mount_path(&dir.path().join("mnt/link/data"))
            .unwrap_err();
        assert!(err.contains("resolves to"), "{err}");
    }

    #[test]
    fn cache_dirs_must_stay_in_cache_root_or_roots_and_off_agent_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let rules = PathRules::new(
            &[base.join("mnt")],
            &base.join("cache"),
            &[base.join("cache/state")],
        );
        assert!(rules.cache_dir(&base.join("cache/data")).is_ok());
        assert!(rules.cache_dir(&base.join("mnt/c")).is_ok());
        assert!(
            rules
                .cache_dir(Path::new("/etc"))
                .unwrap_err()
                .contains("empties")
        );
        assert!(rules.cache_dir(&base.join("cache")).is_err());
        assert!(
            rules
                .cache_dir(&base.join("cache/state/x"))
                .unwrap_err()
                .contains("overlaps")
        );
    }
}

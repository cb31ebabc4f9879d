//! Host paths that arrive from a client: the lexical rules, symlink
//! resolution and containment that jobs (bind mounts), mounts (mount points,
//! cache dirs) and the disk guard (watched paths, reclaim targets) share.
//!
//! [`confine`] accepts a path only when it is absolute, has no `.` or `..`
//! component and no NUL byte, and the object it leads to (opened once and
//! held, [`held::Held`]) lies under one of the allowed roots (themselves
//! resolved). Callers act through the held descriptor, or hand another
//! program a path only root can change ([`held::Held::changeable`],
//! [`staging`]), so a symlink swapped in later cannot redirect an already
//! checked path. [`normalise`] is the lighter
//! lexical rule for paths that are tidied rather than refused for a `.`, and
//! [`resolve_existing_prefix`] resolves a path that may not exist yet (a mount
//! point the agent will create). Resolution touches the filesystem (and may
//! hang on a dead network mount): call it from `spawn_blocking`.
//!
//! Owns no state and knows nothing of jobs, mounts or gRPC.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

pub mod held;
pub mod offload;
pub mod privileged;
pub mod staging;

use held::Held;

/// Looks a program name up in `PATH` as a shell would: the first
/// executable regular file of that name.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A path was refused. Every message names the path and the rule it broke.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// Not absolute.
    #[error("{} must be an absolute path", .0.display())]
    NotAbsolute(PathBuf),
    /// Has a `.` or `..` component.
    #[error("{} must not contain `..` or `.` components", .0.display())]
    DotComponent(PathBuf),
    /// Has a `..` component (where `.` is tidied away, see [`normalise`]).
    #[error("{} must not contain `..`", .0.display())]
    ParentDir(PathBuf),
    /// Has a NUL byte (the kernel would cut it there).
    #[error("{} must not contain a NUL byte", .0.display())]
    Nul(PathBuf),
    /// Does not exist or cannot be resolved.
    #[error("{} cannot be used: {source}", .path.display())]
    Unresolvable {
        /// The path as given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Resolves outside every allowed root.
    #[error("{} resolves to {}, outside the allowed roots {roots:?}", .path.display(), .resolved.display())]
    OutsideRoots {
        /// The path as given.
        path: PathBuf,
        /// Where it leads once symlinks are resolved.
        resolved: PathBuf,
        /// The allowed roots.
        roots: Vec<PathBuf>,
    },
}

/// Checks the lexical rules only: absolute, no `.`/`..`, no NUL. Pure.
pub fn check_clean_absolute(path: &Path) -> Result<(), PathError> {
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(PathError::Nul(path.to_owned()));
    }
    if !path.is_absolute() {
        return Err(PathError::NotAbsolute(path.to_owned()));
    }
    // `Path::components` silently drops interior `.`; look at the raw parts.
    let has_dot = path
        .as_os_str()
        .as_bytes()
        .split(|b| *b == b'/')
        .any(|part| part == b"." || part == b"..");
    if has_dot
        || path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(PathError::DotComponent(path.to_owned()));
    }
    Ok(())
}

/// Drops `.` components and repeated or trailing slashes (`/a//./b/` is
/// `/a/b`). Pure; keeps `..`, which only the filesystem can resolve.
pub fn tidy(path: &Path) -> PathBuf {
    path.components().collect()
}

/// Checks that `path` is absolute, without `..` and without a NUL byte, and
/// returns it tidied ([`tidy`]). Pure.
pub fn normalise(path: &Path) -> Result<PathBuf, PathError> {
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(PathError::Nul(path.to_owned()));
    }
    if !path.is_absolute() {
        return Err(PathError::NotAbsolute(path.to_owned()));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(PathError::ParentDir(path.to_owned()));
    }
    Ok(tidy(path))
}

/// Whether `path` is `root` or below it, compared component by component
/// (so `/mnt/ab` is not under `/mnt/a`). Pure; neither path is resolved.
pub fn is_under(path: &Path, root: &Path) -> bool {
    path.starts_with(root)
}

/// Whether `path` is below `root` and not `root` itself. Pure.
pub fn strictly_below(path: &Path, root: &Path) -> bool {
    path != root && is_under(path, root)
}

/// Whether one path contains the other (or they are equal). Pure.
pub fn overlaps(a: &Path, b: &Path) -> bool {
    is_under(a, b) || is_under(b, a)
}

/// Resolves the symlinks of the longest existing ancestor of `path` (which
/// should be [`normalise`]d) and appends the rest, so that a path that does
/// not exist yet is judged by where it would be created. Blocking.
pub fn resolve_existing_prefix(path: &Path) -> Result<PathBuf, PathError> {
    let mut existing = path.to_owned();
    let mut rest = Vec::new();
    while existing.symlink_metadata().is_err() {
        let Some(name) = existing.file_name() else {
            break;
        };
        rest.push(name.to_owned());
        existing.pop();
    }
    let mut resolved =
        std::fs::canonicalize(&existing).map_err(|source| PathError::Unresolvable {
            path: existing.clone(),
            source,
        })?;
    for name in rest.into_iter().rev() {
        resolved.push(name);
    }
    Ok(resolved)
}

/// Opens `path` once (following symlinks) and holds it if the object it
/// reached lies under one of `roots`. Roots that do not exist are skipped.
/// Blocking.
pub fn confine(path: &Path, roots: &[PathBuf]) -> Result<Held, PathError> {
    check_clean_absolute(path)?;
    let held = Held::open(path).map_err(|source| PathError::Unresolvable {
        path: path.to_owned(),
        source,
    })?;
    let inside = roots.iter().any(|root| {
        std::fs::canonicalize(root)
            .map(|real_root| is_under(held.path(), &real_root))
            .unwrap_or(false)
    });
    if inside {
        Ok(held)
    } else {
        Err(PathError::OutsideRoots {
            path: path.to_owned(),
            resolved: held.path().to_owned(),
            roots: roots.to_vec(),
        })
    }
}

/// A path from raw bytes (e.g. a fuzzer's input or a protobuf string).
pub fn from_bytes(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lexical_rules() {
        assert!(check_clean_absolute(Path::new("/home/a/b")).is_ok());
        for bad in [
            "home/a",
            "/home/../etc",
            "/home/./a",
            "/home/a/..",
            "/a/\0b",
            "",
        ] {
            assert!(
                check_clean_absolute(Path::new(bad)).is_err(),
                "{bad:?} should be refused"
            );
        }
        assert!(matches!(
            check_clean_absolute(Path::new("/x/../y")),
            Err(PathError::DotComponent(_))
        ));
    }

    #[test]
    fn normalise_tidies_and_refuses_dot_dot() {
        assert_eq!(
            normalise(Path::new("/mnt//data/./x/")).unwrap(),
            PathBuf::from("/mnt/data/x")
        );
        let err = normalise(Path::new("/mnt/../etc")).unwrap_err();
        assert!(matches!(err, PathError::ParentDir(_)), "{err}");
        assert!(err.to_string().contains("`..`"), "{err}");
        assert!(matches!(
            normalise(Path::new("mnt/data")),
            Err(PathError::NotAbsolute(_))
        ));
        assert!(matches!(
            normalise(Path::new("/a/\0b")),
            Err(PathError::Nul(_))
        ));
        assert_eq!(tidy(Path::new("/a//b/../c/")), PathBuf::from("/a/b/../c"));
    }

    #[test]
    fn under_is_by_component() {
        assert!(is_under(Path::new("/mnt/a/x"), Path::new("/mnt/a")));
        assert!(is_under(Path::new("/mnt/a"), Path::new("/mnt/a")));
        assert!(!is_under(Path::new("/mnt/ab"), Path::new("/mnt/a")));
        assert!(strictly_below(Path::new("/mnt/a/x"), Path::new("/mnt/a")));
        assert!(!strictly_below(Path::new("/mnt/a"), Path::new("/mnt/a")));
        assert!(overlaps(Path::new("/mnt"), Path::new("/mnt/a")));
        assert!(overlaps(Path::new("/mnt/a"), Path::new("/mnt")));
        assert!(!overlaps(Path::new("/mnt/a"), Path::new("/mnt/ab")));
    }

    #[test]
    fn a_missing_path_resolves_through_its_existing_ancestors() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("data")).unwrap();
        std::os::unix::fs::symlink(real.join("data"), real.join("link")).unwrap();
        assert_eq!(
            resolve_existing_prefix(&real.join("link/new/deeper")).unwrap(),
            real.join("data/new/deeper")
        );
        assert_eq!(resolve_existing_prefix(&real).unwrap(), real);
    }

    #[test]
    fn symlink_out_is_refused_and_symlink_in_resolved() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("out")).unwrap();
        std::fs::create_dir(root.path().join("data")).unwrap();
        std::os::unix::fs::symlink(root.path().join("data"), root.path().join("in")).unwrap();
        let roots = vec![root.path().to_owned()];
        let err = confine(&root.path().join("out"), &roots).unwrap_err();
        assert!(
            err.to_string().contains("outside the allowed roots"),
            "{err}"
        );
        let real = confine(&root.path().join("in"), &roots).unwrap();
        assert_eq!(
            real.path(),
            root.path().join("data").canonicalize().unwrap()
        );
        assert!(matches!(
            confine(&root.path().join("missing"), &roots),
            Err(PathError::Unresolvable { .. })
        ));
    }

    /// A tree with directories, a file and symlinks pointing inside, outside,
    /// to the parent, and in a loop.
    struct Tree {
        root: tempfile::TempDir,
        outside: tempfile::TempDir,
    }

    fn tree() -> Tree {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("a/file"), b"x").unwrap();
        std::fs::create_dir_all(outside.path().join("b")).unwrap();
        let link =
            |target: &Path, at: &str| std::os::unix::fs::symlink(target, r.join(at)).unwrap();
        link(outside.path(), "a/out");
        link(&r.join("a/b"), "in");
        link(Path::new(".."), "a/up");
        link(Path::new("../../.."), "a/b/far");
        link(&r.join("loop"), "loop");
        link(Path::new("/"), "slash");
        Tree { root, outside }
    }

    fn component() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "a", "b", "file", "out", "in", "up", "far", "loop", "slash", "..", ".", "", "c", "etc",
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the path, an accepted one resolves under the root, is
        /// what the kernel resolves it to, and never held `..` or `.`.
        #[test]
        fn accepted_paths_stay_under_the_root(parts in prop::collection::vec(component(), 0..6)) {
            let t = tree();
            let roots = vec![t.root.path().to_owned()];
            let real_root = t.root.path().canonicalize().unwrap();
            let mut raw = t.root.path().as_os_str().as_bytes().to_vec();
            for part in &parts {
                raw.push(b'/');
                raw.extend_from_slice(part.as_bytes());
            }
            let path = from_bytes(&raw);
            match confine(path, &roots) {
                Ok(held) => {
                    let resolved = held.path().to_owned();
                    prop_assert!(is_under(&resolved, &real_root), "{} escaped to {}", path.display(), resolved.display());
                    prop_assert_eq!(&resolved, &path.canonicalize().unwrap());
                    prop_assert!(!parts.iter().any(|p| *p == ".." || *p == "."));
                    prop_assert!(!is_under(&resolved, &t.outside.path().canonicalize().unwrap()));
                }
                Err(PathError::OutsideRoots { resolved, .. }) => {
                    prop_assert!(!is_under(&resolved, &real_root));
                }
                Err(_) => {}
            }
        }

        /// Any path with a `..` component is refused before the filesystem is asked.
        #[test]
        fn dot_dot_is_always_refused(prefix in "(/[a-z]{1,3}){0,3}", suffix in "(/[a-z]{1,3}){0,3}") {
            let path = format!("{prefix}/..{suffix}");
            prop_assert!(matches!(check_clean_absolute(Path::new(&path)), Err(PathError::DotComponent(_))));
            prop_assert!(confine(Path::new(&path), &[PathBuf::from("/")]).is_err());
        }

        /// Component-wise containment never confuses a sibling prefix.
        #[test]
        fn sibling_prefix_is_not_under(root in "/[a-z]{1,5}", extra in "[a-z]{1,5}") {
            let sibling = format!("{root}{extra}");
            prop_assert!(!is_under(Path::new(&sibling), Path::new(&root)));
            let child = format!("{root}/{extra}");
            prop_assert!(is_under(Path::new(&child), Path::new(&root)));
        }
    }
}

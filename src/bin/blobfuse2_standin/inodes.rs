//! The stand-in's inode numbers: one per path (relative to the storage
//! dir) seen so far, kept across renames.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Inode numbers of the paths (relative to the storage dir) seen so far.
#[derive(Default)]
pub struct Inodes {
    pub paths: HashMap<u64, PathBuf>,
    pub numbers: HashMap<PathBuf, u64>,
    pub next: u64,
}

impl Inodes {
    pub fn number(&mut self, path: &Path) -> u64 {
        if let Some(n) = self.numbers.get(path) {
            return *n;
        }
        self.next += 1;
        let n = self.next;
        self.paths.insert(n, path.to_owned());
        self.numbers.insert(path.to_owned(), n);
        n
    }

    pub fn rename(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, u64)> = self
            .numbers
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        for (old, n) in moved {
            let new = match old.strip_prefix(from) {
                Ok(rest) if rest.as_os_str().is_empty() => to.to_owned(),
                Ok(rest) => to.join(rest),
                Err(_) => continue,
            };
            self.numbers.remove(&old);
            self.numbers.insert(new.clone(), n);
            self.paths.insert(n, new);
        }
    }
}

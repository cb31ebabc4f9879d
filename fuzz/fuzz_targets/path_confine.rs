//! Path confinement: whatever bytes follow the root, a path accepted by
//! `paths::confine` resolves under the root, in a tree with symlinks that
//! point inside, outside, up, to `/` and in a loop.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use instance_agent::paths::{check_clean_absolute, confine, from_bytes, is_under};
use libfuzzer_sys::fuzz_target;

struct Tree {
    root: PathBuf,
    real_root: PathBuf,
}

fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("instance-agent-fuzz-{}", std::process::id()));
        let root = base.join("root");
        let outside = base.join("outside");
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(root.join("a/b")).expect("tree");
        std::fs::create_dir_all(outside.join("b")).expect("tree");
        std::fs::write(root.join("a/file"), b"x").expect("tree");
        let link = |target: &str, at: &str| {
            std::os::unix::fs::symlink(target, root.join(at)).expect("symlink")
        };
        link(outside.to_str().expect("utf-8 temp dir"), "a/out");
        link(root.join("a/b").to_str().expect("utf-8 temp dir"), "in");
        link("..", "a/up");
        link("../../..", "a/b/far");
        link(root.join("loop").to_str().expect("utf-8 temp dir"), "loop");
        link("/", "slash");
        let real_root = root.canonicalize().expect("root");
        Tree { root, real_root }
    })
}

fuzz_target!(|data: &[u8]| {
    // The lexical check alone must never panic, whatever the bytes.
    let _ = check_clean_absolute(from_bytes(data));

    let tree = tree();
    let mut raw = tree.root.as_os_str().as_encoded_bytes().to_vec();
    raw.push(b'/');
    raw.extend_from_slice(data);
    let path = from_bytes(&raw);
    if let Ok(resolved) = confine(path, std::slice::from_ref(&tree.root)) {
        assert!(
            is_under(&resolved, &tree.real_root),
            "{} escaped to {}",
            path.display(),
            resolved.display()
        );
        assert!(
            !data.split(|b| *b == b'/').any(|part| part == b".." || part == b"."),
            "a dot component was accepted: {}",
            path.display()
        );
    }
});

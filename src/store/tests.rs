use super::*;
use crate::health::ConditionState;

const T: Table = Table("test");

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Rec {
    n: u32,
}

#[tokio::test]
async fn put_get_scan_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.get::<Rec>(T, "a").unwrap(), None);
    assert!(store.scan::<Rec>(T).unwrap().is_empty());
    store
        .apply(vec![
            Write::put(T, "b", &Rec { n: 2 }),
            Write::put(T, "a", &Rec { n: 1 }),
        ])
        .await
        .unwrap();
    assert_eq!(store.get::<Rec>(T, "a").unwrap(), Some(Rec { n: 1 }));
    let all = store.scan::<Rec>(T).unwrap();
    assert_eq!(
        all.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    store
        .apply(vec![Write::Delete(T, "a".into())])
        .await
        .unwrap();
    assert_eq!(store.get::<Rec>(T, "a").unwrap(), None);
}

#[tokio::test]
async fn survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store
            .apply(vec![Write::put(T, "k", &Rec { n: 7 })])
            .await
            .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.get::<Rec>(T, "k").unwrap(), Some(Rec { n: 7 }));
}

const OTHER: Table = Table("other");

/// A store in `dir` with three records in `test` (the middle one, "b",
/// holding `marker`) and one in `other`, closed again.
fn seeded(dir: &Path, marker: u32) {
    let store = Store::open(dir).unwrap();
    store
        .apply_blocking(vec![
            Write::put(T, "a", &Rec { n: 1 }),
            Write::put(T, "b", &Rec { n: marker }),
            Write::put(T, "c", &Rec { n: 3 }),
            Write::put(OTHER, "x", &Rec { n: 4 }),
        ])
        .unwrap();
}

/// Replaces every occurrence of `from` in the file by `to` (same length);
/// returns how many there were.
fn patch(path: &Path, from: &[u8], to: &[u8]) -> usize {
    let mut bytes = std::fs::read(path).unwrap();
    let mut found = 0;
    let mut i = 0;
    while let Some(at) = bytes[i..].windows(from.len()).position(|w| w == from) {
        bytes[i + at..i + at + to.len()].copy_from_slice(to);
        found += 1;
        i += at + to.len();
    }
    std::fs::write(path, bytes).unwrap();
    found
}

fn moved_files(dir: &Path) -> Vec<PathBuf> {
    let mut moved: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("agent.redb.damaged-"))
        .collect();
    moved.sort();
    moved
}

#[test]
fn a_record_that_cannot_be_decoded_is_skipped_and_its_neighbours_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .apply_blocking(vec![
            Write::put(T, "a", &Rec { n: 1 }),
            Write::Put(T, "bad".into(), b"{\"n\": \"hunter2\"}".to_vec()),
            Write::put(T, "c", &Rec { n: 3 }),
        ])
        .unwrap();
    let all = store.scan::<Rec>(T).unwrap();
    assert_eq!(
        all.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["a", "c"]
    );
    assert_eq!(store.get::<Rec>(T, "bad").unwrap(), None);
    let damage = store.damage();
    assert_eq!(damage.skipped.len(), 1, "{damage:?}");
    assert_eq!(damage.skipped[0].table, "test");
    assert_eq!(damage.skipped[0].key, "bad");
    let (state, message) = condition(&damage, &[]);
    assert_eq!(state, ConditionState::Degraded);
    assert!(
        message.contains("test/bad (not of the expected shape"),
        "{message}"
    );
    assert!(
        !message.contains("hunter2"),
        "the record is quoted: {message}"
    );
    assert!(store.history_lost(T).is_some());
    assert!(store.history_lost(OTHER).is_none());
    // The next write of the key replaces it.
    store
        .apply_blocking(vec![Write::put(T, "bad", &Rec { n: 2 })])
        .unwrap();
    assert_eq!(store.get::<Rec>(T, "bad").unwrap(), Some(Rec { n: 2 }));
}

#[test]
fn a_flipped_byte_moves_the_file_aside_and_every_readable_record_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    seeded(dir.path(), 7_654_321);
    let path = dir.path().join("agent.redb");
    assert!(patch(&path, b"7654321", b"76x4321") > 0);

    let store = Store::open(dir.path()).unwrap();
    let moved = moved_files(dir.path());
    assert_eq!(moved.len(), 1, "{moved:?}");
    let all = store.scan::<Rec>(T).unwrap();
    assert_eq!(
        all.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["a", "c"],
        "the neighbours of the damaged record are back"
    );
    assert_eq!(store.scan::<Rec>(OTHER).unwrap().len(), 1);
    let damage = store.damage();
    assert_eq!(damage.skipped.len(), 1, "{damage:?}");
    assert_eq!(damage.skipped[0].key, "b");
    let (state, message) = condition(&damage, &[]);
    assert_eq!(state, ConditionState::Failed);
    assert!(message.contains("could not be opened"), "{message}");
    assert!(
        message.contains(&moved[0].display().to_string()),
        "{message}"
    );
    assert!(message.contains("4 records were copied back"), "{message}");
    assert!(message.contains("test/b"), "{message}");
    // Every record came back: nothing of the history is lost but "b".
    assert!(store.history_lost(OTHER).is_none(), "{damage:?}");
}

#[test]
fn a_truncated_file_is_moved_aside_and_the_store_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    seeded(dir.path(), 5);
    let path = dir.path().join("agent.redb");
    let length = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(length / 2)
        .unwrap();

    let store = Store::open(dir.path()).unwrap();
    let moved = moved_files(dir.path());
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(std::fs::metadata(&moved[0]).unwrap().len(), length / 2);
    let damage = store.damage();
    let (state, message) = condition(&damage, &[]);
    assert_eq!(state, ConditionState::Failed, "{message}");
    assert!(message.contains("moved to"), "{message}");
    assert!(store.history_lost(T).is_some());
    // Writes work on the new store.
    store
        .apply_blocking(vec![Write::put(T, "new", &Rec { n: 1 })])
        .unwrap();
    drop(store);

    // Reported again at every start while the damaged file is kept, but
    // the history is only lost at the start that moved it.
    let store = Store::open(dir.path()).unwrap();
    let (state, message) = condition(&store.damage(), &[]);
    assert_eq!(state, ConditionState::Failed);
    assert!(message.contains("by an earlier start"), "{message}");
    assert!(store.history_lost(T).is_none());
    assert_eq!(store.scan::<Rec>(T).unwrap().len(), 1);
    drop(store);

    std::fs::remove_file(&moved[0]).unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(condition(&store.damage(), &[]).0, ConditionState::Ok);
}

#[test]
fn a_file_that_is_not_a_store_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.redb"), vec![0x5a; 8192]).unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(moved_files(dir.path()).len(), 1);
    assert_eq!(condition(&store.damage(), &[]).0, ConditionState::Failed);
}

#[test]
fn a_deleted_store_is_told_from_a_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.damage().missing_since, None, "a first start");
    assert!(store.history_lost(T).is_none());
    drop(store);
    std::fs::remove_file(dir.path().join("agent.redb")).unwrap();

    let store = Store::open(dir.path()).unwrap();
    let damage = store.damage();
    assert!(damage.missing_since.is_some(), "{damage:?}");
    let (state, message) = condition(&damage, &[]);
    assert_eq!(state, ConditionState::Failed);
    assert!(message.contains("was missing at this start"), "{message}");
    assert!(store.history_lost(T).is_some());
    drop(store);

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(condition(&store.damage(), &[]).0, ConditionState::Ok);
}

#[test]
fn a_copy_that_never_finished_is_reported_and_not_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.redb");
    std::fs::write(&path, b"damaged").unwrap();
    let db = open::open_db(&path.with_file_name("new.redb")).unwrap();
    drop(db);
    // As left by an agent that crashed copying: the note says "started".
    std::fs::rename(
        &path,
        path.with_file_name("agent.redb.damaged-20260101T000000Z"),
    )
    .unwrap();
    std::fs::rename(path.with_file_name("new.redb"), &path).unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let (_, message) = condition(&store.damage(), &[]);
        assert!(message.contains("recorded nothing more"), "{message}");
    }
    let note = MovedNote {
        moved_at: 0,
        reason: "Corrupted".into(),
        salvage: Salvage::Started,
    };
    {
        let db = open::open_db(&path).unwrap();
        let write = db.begin_write().unwrap();
        write
            .open_table(Table("store.moved_aside").def())
            .unwrap()
            .insert(
                "agent.redb.damaged-20260101T000000Z",
                serde_json::to_vec(&note).unwrap().as_slice(),
            )
            .unwrap();
        write.commit().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let (state, message) = condition(&store.damage(), &[]);
    assert_eq!(state, ConditionState::Failed);
    assert!(message.contains("stopped the agent"), "{message}");
    assert_eq!(moved_files(dir.path()).len(), 1, "not moved again");
}

#[test]
fn unknown_containers_degrade_the_condition_and_are_named() {
    let damage = StoreDamage {
        path: "/s/agent.redb".into(),
        ..StoreDamage::default()
    };
    assert_eq!(
        condition(&damage, &[]),
        (ConditionState::Ok, "/s/agent.redb ok".into())
    );
    let (state, message) = condition(&damage, &["0123456789ab (job j1, running)".into()]);
    assert_eq!(state, ConditionState::Degraded);
    assert!(
        message.contains("0123456789ab (job j1, running)"),
        "{message}"
    );
    assert!(message.contains("--unknown-containers"), "{message}");
}

/// The file of a store that is still open, as an agent killed at this
/// point leaves it (every commit is fsynced; the clean close never ran),
/// copied into `crashed`.
fn crash_image(dir: &Path, crashed: &Path) {
    std::fs::copy(dir.join("agent.redb"), crashed.join("agent.redb")).unwrap();
}

#[test]
fn a_flipped_byte_after_a_crash_loses_that_record_only() {
    // The last commits touch another table, so both of redb's commit slots
    // share the leaf of `test` that the flip hits: redb's repair gives up.
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .apply_blocking(vec![
            Write::put(T, "a", &Rec { n: 1 }),
            Write::put(T, "b", &Rec { n: 7_654_321 }),
            Write::put(T, "c", &Rec { n: 3 }),
        ])
        .unwrap();
    for n in 0..2 {
        store
            .apply_blocking(vec![Write::put(OTHER, "x", &Rec { n })])
            .unwrap();
    }
    crash_image(dir.path(), crashed.path());
    drop(store);
    let path = crashed.path().join("agent.redb");
    assert!(patch(&path, b"7654321", b"76x4321") > 0);

    let store = Store::open(crashed.path()).unwrap();
    let moved = moved_files(crashed.path());
    assert_eq!(moved.len(), 1, "{moved:?}");
    let (_, message) = condition(&store.damage(), &[]);
    assert!(message.contains("4 records were copied back"), "{message}");
    let all = store.scan::<Rec>(T).unwrap();
    assert_eq!(
        all.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["a", "c"]
    );
    assert_eq!(
        store.scan::<Rec>(OTHER).unwrap(),
        [("x".to_owned(), Rec { n: 1 })]
    );
    let damage = store.damage();
    assert_eq!(damage.skipped.len(), 1, "{damage:?}");
    assert_eq!(damage.skipped[0].key, "b");
    assert!(
        !crashed.path().join("agent.redb.salvage").exists(),
        "the scratch copy is removed"
    );
}

#[test]
fn a_flipped_byte_after_a_start_that_wrote_nothing_is_salvaged_too() {
    // The integrity check at open commits without the allocator state; the
    // open records it, so a crash before any write leaves a salvageable file.
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    seeded(dir.path(), 7_654_321);
    let store = Store::open(dir.path()).unwrap();
    crash_image(dir.path(), crashed.path());
    drop(store);
    let path = crashed.path().join("agent.redb");
    assert!(patch(&path, b"7654321", b"76x4321") > 0);

    let store = Store::open(crashed.path()).unwrap();
    assert_eq!(moved_files(crashed.path()).len(), 1);
    let all = store.scan::<Rec>(T).unwrap();
    assert_eq!(
        all.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["a", "c"]
    );
    assert_eq!(store.scan::<Rec>(OTHER).unwrap().len(), 1);
    assert_eq!(store.damage().skipped.len(), 1);
}

#[test]
fn the_damaged_file_is_kept_as_it_was_found() {
    let dir = tempfile::tempdir().unwrap();
    seeded(dir.path(), 7_654_321);
    let path = dir.path().join("agent.redb");
    assert!(patch(&path, b"7654321", b"76x4321") > 0);
    let before = std::fs::read(&path).unwrap();

    let store = Store::open(dir.path()).unwrap();
    let moved = moved_files(dir.path());
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(
        std::fs::read(&moved[0]).unwrap() == before,
        "the salvage changed it"
    );
    assert_eq!(store.scan::<Rec>(T).unwrap().len(), 2);
}

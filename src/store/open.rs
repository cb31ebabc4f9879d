//! Opening the store so that damage never stops the agent: every page's
//! checksum is verified at open (a file altered outside redb is reported,
//! never trusted); a file that cannot be opened because of what is in it
//! (corrupted, truncated, an unknown format) is renamed to
//! `agent.redb.damaged-<time>`, an empty store is created in its place, and
//! every record still readable in the damaged file is copied back
//! ([`super::salvage`]). A note
//! in the new store (table `store.moved_aside`) records why and how the copy
//! went, so that the `store` condition can say so at every start for as long
//! as the damaged file is kept. A marker beside the store (`store-created`)
//! tells a deleted store from a first start.
//!
//! Failures that say nothing about the file's content (permissions, a full
//! or failing disk, another agent holding it) are returned as before: moving
//! a healthy store aside would lose it for nothing.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use redb::{ReadableDatabase, ReadableTable};

use super::damage::{MovedAside, MovedNote, Salvage, StoreDamage};
use super::salvage::{remove_scratch, salvage};
use super::{STORE_CACHE_BYTES, StoreError, Table, begin_write, classify};

/// The notes about moved-aside files, by the damaged file's name.
const MOVED_ASIDE: Table = Table("store.moved_aside");
/// Beside the store: the copy of a damaged file that the salvage reads.
const SCRATCH_SUFFIX: &str = ".salvage";
/// Beside the store: when the first store of this state dir was created.
const MARKER: &str = "store-created";

/// The database, opened, and what was found wrong on the way.
pub(super) struct Opened {
    pub db: redb::Database,
    pub damage: StoreDamage,
}

/// Opens `dir/<file>`, moving a damaged file aside (see the module doc).
pub(super) fn open_or_recover(dir: &Path, path: &Path) -> Result<Opened, StoreError> {
    let existed = std::fs::symlink_metadata(path).is_ok();
    let marker = dir.join(MARKER);
    let created = read_marker(&marker);
    let mut this_start = None;
    let scratch = PathBuf::from(format!("{}{SCRATCH_SUFFIX}", path.display()));
    // Left by a salvage that stopped the agent.
    remove_scratch(&scratch);
    let db = match open_db(path) {
        Ok(db) => db,
        // The check commits; on a full disk a plain open still serves reads
        // (and writes once space returns), as it did before the check.
        Err(error) if no_space(&error) => {
            tracing::warn!(store = %path.display(), %error, "the state filesystem is full: opening the store without checking it");
            redb::Database::builder()
                .set_cache_size(STORE_CACHE_BYTES)
                .create(path)
                .map_err(|e| classify(path, e.into()))?
        }
        Err(error) if damaged(&error) => {
            let reason = error.to_string();
            let moved = move_aside(path).map_err(|e| storage(path, e))?;
            tracing::error!(store = %path.display(), moved_to = %moved.display(), %reason,
                "the store cannot be opened: moved aside, starting with an empty store");
            let db = open_db(path).map_err(|e| classify(path, e.into()))?;
            let name = file_name(&moved);
            let mut note = MovedNote {
                moved_at: seconds(SystemTime::now()),
                reason,
                salvage: Salvage::Started,
            };
            // Recorded before the copy: a copy that crashes the agent is
            // then reported, and never tried again.
            put_note(&db, &name, &note).map_err(|e| classify(path, e))?;
            note.salvage = salvage(&moved, &scratch, &db);
            tracing::warn!(from = %moved.display(), salvage = ?note.salvage, "records copied back from the damaged store");
            put_note(&db, &name, &note).map_err(|e| classify(path, e))?;
            this_start = Some(name);
            db
        }
        Err(error) => return Err(classify(path, error.into())),
    };
    let mut damage = StoreDamage {
        path: path.to_owned(),
        ..StoreDamage::default()
    };
    if !existed && let Some(created) = created {
        tracing::error!(store = %path.display(), "the store is missing: starting with an empty store");
        damage.missing_since = Some(created);
    }
    if (!existed || created.is_none())
        && let Err(error) = write_marker(&marker)
    {
        tracing::warn!(marker = %marker.display(), %error, "cannot record the store's creation");
    }
    damage.moved = moved_files(&db, path, this_start.as_deref());
    Ok(Opened { db, damage })
}

/// Opens (or creates) the database, verifying every page, and records the
/// allocator state at once: the check's own commit does not, and a file
/// whose last commit lacks it could not be salvaged after a crash.
pub(super) fn open_db(path: &Path) -> Result<redb::Database, redb::DatabaseError> {
    // The working set is small (records are also held in memory by their
    // domains); redb's default cache would grow to 1 GiB.
    let db = redb::Database::builder()
        .set_cache_size(STORE_CACHE_BYTES)
        .set_check_integrity_on_open(true)
        .create(path)?;
    let recorded = begin_write(&db)
        .map_err(|e| match e {
            redb::TransactionError::Storage(e) => e,
            other => redb::StorageError::Io(std::io::Error::other(other.to_string())),
        })?
        .commit()
        .map_err(|e| match e {
            redb::CommitError::Storage(e) => e,
            other => redb::StorageError::Io(std::io::Error::other(other.to_string())),
        });
    recorded?;
    Ok(db)
}

fn no_space(error: &redb::DatabaseError) -> bool {
    matches!(error, redb::DatabaseError::Storage(redb::StorageError::Io(io))
        if io.raw_os_error() == Some(nix::libc::ENOSPC))
}

/// Whether an open failed because of what is in the file.
fn damaged(error: &redb::DatabaseError) -> bool {
    use redb::{DatabaseError, StorageError};
    match error {
        DatabaseError::Storage(StorageError::Corrupted(_)) | DatabaseError::UpgradeRequired(_) => {
            true
        }
        DatabaseError::Storage(StorageError::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
        ),
        _ => false,
    }
}

/// Renames `path` to `<path>.damaged-<UTC time>` (a free name) and makes
/// the rename durable. The state dir is root's alone, so the names cannot
/// be swapped under the agent.
fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = chrono::DateTime::<chrono::Utc>::from(SystemTime::now()).format("%Y%m%dT%H%M%SZ");
    let base = format!("{}.damaged-{stamp}", path.display());
    let mut target = PathBuf::from(&base);
    let mut n = 2;
    while std::fs::symlink_metadata(&target).is_ok() {
        target = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &target)?;
    sync_dir(path)?;
    Ok(target)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

fn put_note(db: &redb::Database, name: &str, note: &MovedNote) -> Result<(), redb::Error> {
    let bytes = serde_json::to_vec(note).unwrap_or_default();
    let write = begin_write(db)?;
    write
        .open_table(MOVED_ASIDE.def())?
        .insert(name, bytes.as_slice())?;
    write.commit()?;
    Ok(())
}

/// The moved-aside files still beside the store, with their notes; notes of
/// files the operator has deleted are dropped. Never fails: what cannot be
/// read is logged and left out.
fn moved_files(db: &redb::Database, path: &Path, this_start: Option<&str>) -> Vec<MovedAside> {
    let prefix = format!("{}.damaged-", file_name(path));
    let mut names: Vec<String> = match path.parent().map(std::fs::read_dir) {
        Some(Ok(entries)) => entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(&prefix))
            .collect(),
        _ => Vec::new(),
    };
    names.sort();
    let notes = match read_notes(db) {
        Ok(notes) => notes,
        Err(error) => {
            tracing::warn!(%error, "cannot read the notes about moved-aside stores");
            Vec::new()
        }
    };
    let gone: Vec<&str> = notes
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| !names.iter().any(|n| n == name))
        .collect();
    if !gone.is_empty()
        && let Err(error) = forget_notes(db, &gone)
    {
        tracing::warn!(%error, "cannot forget the notes about deleted stores");
    }
    names
        .into_iter()
        .map(|name| MovedAside {
            path: path.with_file_name(&name),
            this_start: this_start == Some(name.as_str()),
            note: notes
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, bytes)| serde_json::from_slice::<MovedNote>(bytes).ok()),
        })
        .collect()
}

fn read_notes(db: &redb::Database) -> Result<Vec<(String, Vec<u8>)>, redb::Error> {
    let read = db.begin_read()?;
    let table = match read.open_table(MOVED_ASIDE.def()) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(error) => return Err(error.into()),
    };
    let mut notes = Vec::new();
    for entry in table.iter()? {
        let (key, value) = entry?;
        notes.push((key.value().to_owned(), value.value().to_vec()));
    }
    Ok(notes)
}

fn forget_notes(db: &redb::Database, names: &[&str]) -> Result<(), redb::Error> {
    let write = begin_write(db)?;
    {
        let mut table = write.open_table(MOVED_ASIDE.def())?;
        for name in names {
            table.remove(*name)?;
        }
    }
    write.commit()?;
    Ok(())
}

fn read_marker(marker: &Path) -> Option<SystemTime> {
    let text = std::fs::read_to_string(marker).ok()?;
    let seconds: u64 = text.trim().parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

fn write_marker(marker: &Path) -> std::io::Result<()> {
    let tmp = marker.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(file, "{}", seconds(SystemTime::now()))?;
    file.sync_all()?;
    std::fs::rename(&tmp, marker)?;
    sync_dir(marker)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn storage(path: &Path, error: std::io::Error) -> StoreError {
    StoreError::Storage {
        path: path.to_owned(),
        detail: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(error: std::io::Error) -> redb::DatabaseError {
        redb::DatabaseError::Storage(redb::StorageError::Io(error))
    }

    #[test]
    fn only_errors_about_the_content_count_as_damage() {
        use std::io::{Error, ErrorKind};
        let enospc = io(Error::from_raw_os_error(nix::libc::ENOSPC));
        assert!(no_space(&enospc));
        assert!(!damaged(&enospc), "a full disk says nothing of the file");
        for outside in [
            io(Error::from_raw_os_error(nix::libc::EACCES)),
            io(Error::from_raw_os_error(nix::libc::EIO)),
            redb::DatabaseError::DatabaseAlreadyOpen,
        ] {
            assert!(!damaged(&outside), "{outside}");
            assert!(!no_space(&outside), "{outside}");
        }
        for content in [
            redb::DatabaseError::Storage(redb::StorageError::Corrupted("checksum".into())),
            io(Error::from(ErrorKind::UnexpectedEof)),
            io(Error::from(ErrorKind::InvalidData)),
        ] {
            assert!(damaged(&content), "{content}");
        }
    }
}

//! Copying back the records of a store file that could not be opened.
//!
//! redb's own repair verifies the checksum of every page and gives up on
//! the whole file when a page both commit slots share is altered, so one
//! flipped byte in a record would lose every record. The salvage reads the
//! damaged file as it is instead: a copy of it (the moved file stays as it
//! was found, for a bug report) is opened without the integrity check,
//! which needs the allocator state every commit records (see
//! [`super::begin_write`]), and each table is read from the last commit.
//! An altered value reads back altered: its domain finds that it cannot be
//! decoded, skips it and names it, and its neighbours load.
//!
//! Reading a file altered outside redb may make redb panic. In a build
//! that unwinds, the panic is caught and reported as a failed salvage; in
//! the release build (`panic = "abort"`) it stops the agent, and the note
//! written before the copy makes the next start report it and not try again.

use std::panic::AssertUnwindSafe;
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use super::damage::Salvage;
use super::{STORE_CACHE_BYTES, begin_write};

/// Tables of the store itself (`store.moved_aside`), never copied back from
/// a damaged file.
const OWN_PREFIX: &str = "store.";

/// Copies every record that can still be read from the damaged file at
/// `from` into `into`, table by table, through a scratch copy at `scratch`
/// (removed again), and says how it went.
pub(super) fn salvage(from: &Path, scratch: &Path, into: &redb::Database) -> Salvage {
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| read_back(from, scratch, into)))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Salvage::Failed {
                reason: format!("reading the damaged file stopped redb ({what})"),
            }
        });
    remove_scratch(scratch);
    outcome
}

/// Removes a scratch copy, a leftover of a salvage that stopped the agent
/// included; absent is fine.
pub(super) fn remove_scratch(scratch: &Path) {
    match std::fs::remove_file(scratch) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(scratch = %scratch.display(), %error, "cannot remove the salvage's scratch copy");
        }
    }
}

fn read_back(from: &Path, scratch: &Path, into: &redb::Database) -> Salvage {
    remove_scratch(scratch);
    let copied = match std::fs::copy(from, scratch) {
        Ok(_) => open_copy(scratch),
        Err(error) => Err(format!("cannot copy it to {} ({error})", scratch.display())),
    };
    let result = match copied {
        Ok(source) => copy_tables(&source, into),
        // Without a copy (no space for it) or without the allocator state
        // (a file last written by a clean close of an older agent is read
        // that way too), a read-only open reads a file that was closed
        // cleanly, without its checksums.
        Err(why) => match redb::Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .open_read_only(from)
        {
            Ok(source) => copy_tables(&source, into),
            Err(error) => {
                return Salvage::Failed {
                    reason: format!("{why}; read-only: {error}"),
                };
            }
        },
    };
    match result {
        Ok((copied, problems)) => Salvage::Done { copied, problems },
        Err(error) => Salvage::Failed {
            reason: error.to_string(),
        },
    }
}

/// Opens the scratch copy without the integrity check: with the allocator
/// state of its last commit, redb trusts the tree as it is on disk.
fn open_copy(scratch: &Path) -> Result<redb::Database, String> {
    redb::Database::builder()
        .set_cache_size(STORE_CACHE_BYTES)
        .open(scratch)
        .map_err(|error| error.to_string())
}

type Copied = (Vec<(String, u64)>, Vec<String>);

fn copy_tables(
    source: &impl ReadableDatabase,
    into: &redb::Database,
) -> Result<Copied, redb::Error> {
    let read = source.begin_read()?;
    let names: Vec<String> = read
        .list_tables()?
        .map(|t| t.name().to_owned())
        .filter(|name| !name.starts_with(OWN_PREFIX))
        .collect();
    let write = begin_write(into)?;
    let (mut copied, mut problems) = (Vec::new(), Vec::new());
    for name in names {
        let def: TableDefinition<&str, &[u8]> = TableDefinition::new(&name);
        let table = match read.open_table(def) {
            Ok(table) => table,
            Err(error) => {
                problems.push(format!("table {name} ({error})"));
                continue;
            }
        };
        let mut target = write.open_table(def)?;
        let mut count = 0;
        let entries = match table.iter() {
            Ok(entries) => entries,
            Err(error) => {
                problems.push(format!("table {name} ({error})"));
                continue;
            }
        };
        for entry in entries {
            match entry {
                Ok((key, value)) => {
                    target.insert(key.value(), value.value())?;
                    count += 1;
                }
                Err(error) => {
                    problems.push(format!("table {name} after {count} records ({error})"));
                    break;
                }
            }
        }
        copied.push((name, count));
    }
    write.commit()?;
    Ok((copied, problems))
}

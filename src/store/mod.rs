//! The embedded crash-safe store shared by the domains (redb, one file in the
//! state dir): job records and the queue, setup results, requested mounts.
//!
//! Each domain owns its tables (a [`Table`] name) and the shape of its values
//! (serde JSON, so records stay readable with `redb` tooling and evolve with
//! `#[serde(default)]`). Writes are fsynced transactions run off the async
//! runtime; a write that fails for lack of space says so, so that the API can
//! answer RESOURCE_EXHAUSTED while reads keep working.
//!
//! After a failed write redb refuses every later write ("previous I/O error")
//! until the database is opened again, so the store reopens it before the
//! next write: once space returns, writes succeed again by themselves.
//!
//! Every commit records redb's allocator state (quick repair, two-phase):
//! a file damaged after a crash can then still be read without redb's
//! repair, which refuses a file whose checksums do not match ([`salvage`]).
//!
//! Damage never stops the agent ([`open`]): a file that cannot be opened is
//! moved aside and its readable records copied into a new one; a record that
//! cannot be decoded is skipped by [`Store::scan`] (and reads as absent in
//! [`Store::get`]) without touching its neighbours. Both are kept in
//! [`StoreDamage`], which the daemon turns into the `store` condition
//! ([`damage`]).

mod damage;
mod open;
mod salvage;

pub use damage::{MovedAside, MovedNote, Salvage, SkippedRecord, StoreDamage, condition};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Page cache of the store.
const STORE_CACHE_BYTES: usize = 4 << 20;

/// Begins a write transaction whose commit records redb's allocator state
/// (quick repair, which also commits in two phases). Without it, a file
/// left by a crash can only be read after redb's repair, which verifies
/// every checksum and refuses the whole file for one altered byte: with it,
/// the salvage of a damaged file reads every record that is still there.
/// Costs a second fsync per commit.
fn begin_write(db: &redb::Database) -> Result<redb::WriteTransaction, redb::TransactionError> {
    let mut txn = db.begin_write()?;
    txn.set_quick_repair(true);
    Ok(txn)
}

/// A table: its name is its identity on disk, never reuse one for another shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table(pub &'static str);

impl Table {
    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(self.0)
    }
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The filesystem holding the store is full; nothing was written.
    #[error("the state filesystem is full: cannot write to {path} ({detail})")]
    NoSpace {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        detail: String,
    },
    /// Any other storage failure.
    #[error("store {path}: {detail}")]
    Storage {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        detail: String,
    },
}

/// One change in a batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// Insert or replace `key` with an encoded value.
    Put(Table, String, Vec<u8>),
    /// Remove `key` (absent is fine).
    Delete(Table, String),
}

impl Write {
    /// A put of any serialisable value.
    pub fn put(table: Table, key: impl Into<String>, value: &impl Serialize) -> Self {
        // Serialising plain data structs to JSON cannot fail: no maps with
        // non-string keys and no custom serialisers are used in records.
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        Write::Put(table, key.into(), bytes)
    }
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// `None` only while a reopen failed; the next write tries again.
    db: Arc<RwLock<Option<redb::Database>>>,
    /// Set when a write failed on I/O: redb then needs a reopen.
    needs_reopen: Arc<AtomicBool>,
    path: Arc<PathBuf>,
    /// What is known to be wrong with it; grows as records are skipped.
    damage: Arc<watch::Sender<StoreDamage>>,
}

impl Store {
    /// Opens (or creates) `dir/agent.redb`, every page checked; a file that
    /// cannot be opened for what is in it is moved aside and an empty store
    /// takes its place (see [`StoreDamage`]). Fails only for reasons outside
    /// the file (permissions, disk, another holder). Blocking: call before
    /// serving or from `spawn_blocking`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("agent.redb");
        let opened = open::open_or_recover(dir, &path)?;
        Ok(Self {
            db: Arc::new(RwLock::new(Some(opened.db))),
            needs_reopen: Arc::new(AtomicBool::new(false)),
            path: Arc::new(path),
            damage: Arc::new(watch::channel(opened.damage).0),
        })
    }

    /// What is known to be wrong with the store now.
    pub fn damage(&self) -> StoreDamage {
        self.damage.borrow().clone()
    }

    /// [`Store::damage`], changing as records are skipped.
    pub fn watch_damage(&self) -> watch::Receiver<StoreDamage> {
        self.damage.subscribe()
    }

    /// Why the records of `table` may be incomplete (see
    /// [`StoreDamage::history_lost`]).
    pub fn history_lost(&self, table: Table) -> Option<String> {
        self.damage.borrow().history_lost(table.0)
    }

    /// Runs one operation on the open database. Readers and writers share
    /// the lock; only a reopen takes it exclusively. An I/O error marks the
    /// database for a reopen before the next write.
    fn with_db<R>(
        &self,
        op: impl FnOnce(&redb::Database) -> Result<R, redb::Error>,
    ) -> Result<R, StoreError> {
        // Every holder only reads or swaps the whole value; a poisoned lock
        // still holds a consistent Option.
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let Some(db) = guard.as_ref() else {
            return Err(StoreError::Storage {
                path: self.path.to_path_buf(),
                detail: "the database is closed after an I/O error; the next write reopens it"
                    .into(),
            });
        };
        let result = op(db);
        if let Err(redb::Error::Io(_) | redb::Error::PreviousIo) = &result {
            self.needs_reopen.store(true, Ordering::Release);
        }
        result.map_err(|e| classify(&self.path, e))
    }

    /// Closes and reopens the database after a failed write (redb latches
    /// I/O errors). Runs before a write, never on the async runtime.
    fn reopen_if_needed(&self) -> Result<(), StoreError> {
        if !self.needs_reopen.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if !self.needs_reopen.load(Ordering::Acquire) {
            return Ok(());
        }
        // The old handle holds the file lock: it must be closed before the
        // file can be opened again.
        drop(slot.take());
        let db = redb::Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(self.path.as_path())
            .map_err(|e| classify(&self.path, e.into()))?;
        *slot = Some(db);
        self.needs_reopen.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), "store reopened after a failed write");
        Ok(())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies all writes in one durable transaction, off the async runtime.
    pub async fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.apply_blocking(writes))
            .await
            .map_err(|e| StoreError::Storage {
                path: self.path.to_path_buf(),
                detail: format!("write task failed: {e}"),
            })?
    }

    /// Applies all writes in one durable transaction, on this thread.
    pub fn apply_blocking(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.reopen_if_needed()?;
        self.with_db(|db| {
            let txn = begin_write(db)?;
            for write in &writes {
                match write {
                    Write::Put(table, key, value) => {
                        txn.open_table(table.def())?
                            .insert(key.as_str(), value.as_slice())?;
                    }
                    Write::Delete(table, key) => {
                        txn.open_table(table.def())?.remove(key.as_str())?;
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// One record. Reads are served from the page cache and do not fsync, so
    /// they run inline. A record that cannot be decoded reads as absent and
    /// is recorded as skipped.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let read = |db: &redb::Database| -> Result<Option<Vec<u8>>, redb::Error> {
            let txn = db.begin_read()?;
            let t = match txn.open_table(table.def()) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            Ok(t.get(key)?.map(|v| v.value().to_vec()))
        };
        Ok(self
            .with_db(read)?
            .and_then(|bytes| self.decode(table, key, &bytes)))
    }

    /// Every record of a table that can be decoded, in key order; the others
    /// are skipped (logged and recorded in [`StoreDamage`]), their neighbours
    /// kept.
    pub fn scan<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>, StoreError> {
        let read = |db: &redb::Database| -> Result<Vec<(String, Vec<u8>)>, redb::Error> {
            let txn = db.begin_read()?;
            let t = match txn.open_table(table.def()) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for entry in t.iter()? {
                let (k, v) = entry?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        };
        Ok(self
            .with_db(read)?
            .into_iter()
            .filter_map(|(k, v)| self.decode(table, &k, &v).map(|value| (k, value)))
            .collect())
    }

    /// Decodes a record; one that cannot be decoded is recorded as skipped
    /// (once per table and key) and gives `None`.
    fn decode<T: DeserializeOwned>(&self, table: Table, key: &str, bytes: &[u8]) -> Option<T> {
        match serde_json::from_slice(bytes) {
            Ok(value) => Some(value),
            Err(error) => {
                let detail = decode_problem(&error);
                self.damage.send_if_modified(|damage| {
                    if damage
                        .skipped
                        .iter()
                        .any(|s| s.table == table.0 && s.key == key)
                    {
                        return false;
                    }
                    tracing::error!(table = table.0, key, %detail, "a store record cannot be decoded: skipped");
                    damage.skipped.push(SkippedRecord {
                        table: table.0,
                        key: key.to_owned(),
                        detail: detail.clone(),
                    });
                    true
                });
                None
            }
        }
    }
}

/// Why a record cannot be decoded, without quoting it: serde's own message
/// may quote a value, and a record may hold a credential.
fn decode_problem(error: &serde_json::Error) -> String {
    let what = match error.classify() {
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Eof => "cut short",
        serde_json::error::Category::Data => "not of the expected shape",
        serde_json::error::Category::Io => "unreadable",
    };
    format!("{what} at line {} column {}", error.line(), error.column())
}

/// Tells "disk full" apart from other failures, since the API answers them
/// differently (RESOURCE_EXHAUSTED vs INTERNAL).
fn classify(path: &Path, error: redb::Error) -> StoreError {
    let no_space = match &error {
        redb::Error::Io(io) => {
            io.raw_os_error() == Some(nix::libc::ENOSPC)
                || io.kind() == std::io::ErrorKind::StorageFull
        }
        _ => false,
    } || error.to_string().contains("No space left");
    if no_space {
        StoreError::NoSpace {
            path: path.to_owned(),
            detail: error.to_string(),
        }
    } else {
        StoreError::Storage {
            path: path.to_owned(),
            detail: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests;

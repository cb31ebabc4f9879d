//! The agent's records of images, in the store (`images.records`, one per
//! image id): which images the agent itself pulled and under which
//! references (only those are ever reclaimed, and only those references
//! removed), and when a job last used each image (least recently used
//! first). An image that was already local when the agent pulled it stays
//! the user's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::engine::LocalImage;
use crate::store::{Store, StoreError, Table, Write};

/// Image records (JSON [`ImageRecord`]), keyed by image id.
pub const RECORDS: Table = Table("images.records");

/// What the agent knows of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The engine's image id (the key).
    pub id: String,
    /// The references the agent pulled it as (engine spelling).
    #[serde(default)]
    pub references: Vec<String>,
    /// Its registry digest (`repo@sha256:...`), when known.
    #[serde(default)]
    pub digest: String,
    /// Its size in bytes when last seen.
    #[serde(default)]
    pub size_bytes: u64,
    /// The agent pulled it (it was not local before): reclaimable.
    #[serde(default)]
    pub pulled_by_agent: bool,
    /// When the agent pulled it.
    #[serde(default)]
    pub pulled_at: Option<SystemTime>,
    /// When a job last started on it.
    #[serde(default)]
    pub last_used: Option<SystemTime>,
}

/// The records, in memory and in the store. Cheap to clone.
#[derive(Clone)]
pub struct Records {
    store: Store,
    map: Arc<Mutex<HashMap<String, ImageRecord>>>,
}

impl Records {
    /// Loads the records. A record that cannot be decoded is skipped and
    /// named in the store's condition (see `store::Store::scan`); the others
    /// load.
    pub fn load(store: Store) -> Result<Self, StoreError> {
        let map = store.scan::<ImageRecord>(RECORDS)?.into_iter().collect();
        Ok(Self {
            store,
            map: Arc::new(Mutex::new(map)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ImageRecord>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every record.
    pub fn all(&self) -> Vec<ImageRecord> {
        self.lock().values().cloned().collect()
    }

    /// The record of image `id`.
    pub fn get(&self, id: &str) -> Option<ImageRecord> {
        self.lock().get(id).cloned()
    }

    /// Notes a finished pull of `reference` that gave `image`;
    /// `was_local`: the same image was local before the pull (then the agent
    /// did not bring it, and it stays the user's unless the agent pulled it
    /// earlier).
    pub async fn pulled(&self, image: &LocalImage, reference: &str, digest: &str, was_local: bool) {
        let record = {
            let mut map = self.lock();
            let record = map.entry(image.id.clone()).or_insert_with(|| ImageRecord {
                id: image.id.clone(),
                references: Vec::new(),
                digest: String::new(),
                size_bytes: 0,
                pulled_by_agent: false,
                pulled_at: None,
                last_used: None,
            });
            if !was_local {
                record.pulled_by_agent = true;
                record.pulled_at = Some(SystemTime::now());
            }
            if record.pulled_by_agent && !record.references.iter().any(|r| r == reference) {
                record.references.push(reference.to_owned());
            }
            if !digest.is_empty() {
                record.digest = digest.to_owned();
            }
            record.size_bytes = image.size_bytes;
            record.clone()
        };
        self.save(record).await;
    }

    /// Notes that a job starts on image `id` now.
    pub async fn used(&self, image: &LocalImage, digest: &str) {
        let record = {
            let mut map = self.lock();
            let record = map.entry(image.id.clone()).or_insert_with(|| ImageRecord {
                id: image.id.clone(),
                references: Vec::new(),
                digest: digest.to_owned(),
                size_bytes: image.size_bytes,
                pulled_by_agent: false,
                pulled_at: None,
                last_used: None,
            });
            record.last_used = Some(SystemTime::now());
            record.size_bytes = image.size_bytes;
            record.clone()
        };
        self.save(record).await;
    }

    /// Forgets image `id` (it is gone).
    pub async fn forget(&self, id: &str) {
        if self.lock().remove(id).is_none() {
            return;
        }
        if let Err(error) = self
            .store
            .apply(vec![Write::Delete(RECORDS, id.to_owned())])
            .await
        {
            tracing::warn!(image = id, %error, "cannot forget an image record");
        }
    }

    /// Forgets one reference of image `id` (the agent removed it).
    pub async fn forget_reference(&self, id: &str, reference: &str) {
        let record = {
            let mut map = self.lock();
            let Some(record) = map.get_mut(id) else {
                return;
            };
            record.references.retain(|r| r != reference);
            record.clone()
        };
        self.save(record).await;
    }

    async fn save(&self, record: ImageRecord) {
        let key = record.id.clone();
        if let Err(error) = self
            .store
            .apply(vec![Write::put(RECORDS, key.clone(), &record)])
            .await
        {
            // The record lives on in memory; only a restart would lose it.
            tracing::warn!(image = %key, %error, "cannot save an image record");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rig;

    fn image(id: &str) -> LocalImage {
        LocalImage {
            id: id.into(),
            size_bytes: 10,
            ..LocalImage::default()
        }
    }

    #[tokio::test]
    async fn only_what_the_agent_brought_is_its_own_and_records_survive_a_restart() {
        let rig = Rig::new();
        let records = Records::load(rig.store.clone()).unwrap();
        records
            .pulled(&image("sha256:new"), "r/new:1", "r/new@sha256:1", false)
            .await;
        records
            .pulled(&image("sha256:old"), "r/old:1", "", true)
            .await;
        records.used(&image("sha256:old"), "").await;
        let again = Records::load(rig.store.clone()).unwrap();
        let new = again.get("sha256:new").unwrap();
        assert!(new.pulled_by_agent);
        assert_eq!(new.references, ["r/new:1"]);
        let old = again.get("sha256:old").unwrap();
        assert!(!old.pulled_by_agent);
        assert!(old.references.is_empty());
        assert!(old.last_used.is_some());
        again.forget_reference("sha256:new", "r/new:1").await;
        assert!(again.get("sha256:new").unwrap().references.is_empty());
        again.forget("sha256:new").await;
        assert!(
            Records::load(rig.store.clone())
                .unwrap()
                .get("sha256:new")
                .is_none()
        );
    }
}

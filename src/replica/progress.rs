//! What each replica holds of each database: the one place where per-(database, replica)
//! facts are recorded (the TXID the replica holds, when it last took an upload, its last
//! error) together with each replica's upload counters. The uploader records them inside
//! its per-replica loop ([`super::upload::Uploader`]); metrics and `walfs status` read
//! them. Updated once per upload attempt, never on a FUSE request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;

/// What one replica holds of one database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbReplicaProgress {
    /// The last TXID the replica holds (0: none known since the mount started; see
    /// [`ReplicaProgress::get`]).
    pub txid: u64,
    /// When the replica last took an upload of this database.
    pub last_upload: Option<SystemTime>,
    /// The last upload error of this database to this replica, cleared by the next
    /// upload that works.
    pub last_error: Option<String>,
}

/// One replica's counters, over every database.
#[derive(Debug, Default)]
pub struct ReplicaCounters {
    /// Objects uploaded (LTX files, level 0 and snapshots).
    pub uploads: AtomicU64,
    /// Upload attempts of a database that failed.
    pub upload_errors: AtomicU64,
    /// Bytes of the objects uploaded.
    pub upload_bytes: AtomicU64,
}

/// What each replica (by its index in the mount's list) holds of each database.
#[derive(Debug)]
pub struct ReplicaProgress {
    names: Vec<String>,
    counters: Vec<ReplicaCounters>,
    held: Mutex<BTreeMap<(PathBuf, usize), DbReplicaProgress>>,
}

impl ReplicaProgress {
    /// Progress of the replicas called `names` (credential-free, see
    /// [`super::store::ReplicaStore::name`]), in the uploader's order.
    pub fn new(names: Vec<String>) -> ReplicaProgress {
        ReplicaProgress {
            counters: names.iter().map(|_| ReplicaCounters::default()).collect(),
            names,
            held: Mutex::new(BTreeMap::new()),
        }
    }

    /// The replicas' names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The counters of replica `replica`.
    pub fn counters(&self, replica: usize) -> &ReplicaCounters {
        &self.counters[replica]
    }

    /// Replica `replica` now holds `db` up to `txid`: `files` objects of `bytes` bytes
    /// were uploaded.
    pub fn uploaded(&self, db: &Path, replica: usize, txid: u64, files: u64, bytes: u64) {
        let c = &self.counters[replica];
        c.uploads.fetch_add(files, Ordering::Relaxed);
        c.upload_bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut held = self.held.lock();
        let p = held.entry((db.to_path_buf(), replica)).or_default();
        p.txid = p.txid.max(txid);
        p.last_upload = Some(SystemTime::now());
        p.last_error = None;
    }

    /// An upload of `db` to replica `replica` failed with `error` (one line, without
    /// credentials: the store's errors never hold them).
    pub fn failed(&self, db: &Path, replica: usize, error: &str) {
        self.counters[replica]
            .upload_errors
            .fetch_add(1, Ordering::Relaxed);
        let mut held = self.held.lock();
        held.entry((db.to_path_buf(), replica))
            .or_default()
            .last_error = Some(error.to_string());
    }

    /// What replica `replica` holds of `db`, if anything was recorded since the mount
    /// started; `known` is what the mount knew at start (the staged state's uploaded TXID)
    /// and is the floor of the TXID returned.
    pub fn get(&self, db: &Path, replica: usize, known: u64) -> DbReplicaProgress {
        let mut p = self
            .held
            .lock()
            .get(&(db.to_path_buf(), replica))
            .cloned()
            .unwrap_or_default();
        p.txid = p.txid.max(known);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_per_database_and_replica() {
        let p = ReplicaProgress::new(vec!["file:///a".into(), "s3://b/p".into()]);
        let db = Path::new("app.db");
        assert_eq!(p.get(db, 0, 3).txid, 3, "the floor");
        p.uploaded(db, 0, 5, 2, 100);
        p.failed(db, 1, "connection refused");
        assert_eq!(p.get(db, 0, 3).txid, 5);
        assert!(p.get(db, 0, 0).last_upload.is_some());
        assert_eq!(p.get(db, 1, 0).txid, 0);
        assert_eq!(
            p.get(db, 1, 0).last_error.as_deref(),
            Some("connection refused")
        );
        p.uploaded(db, 1, 5, 1, 10);
        assert_eq!(p.get(db, 1, 0).last_error, None, "cleared by an upload");
        assert_eq!(p.counters(0).uploads.load(Ordering::Relaxed), 2);
        assert_eq!(p.counters(0).upload_bytes.load(Ordering::Relaxed), 100);
        assert_eq!(p.counters(1).upload_errors.load(Ordering::Relaxed), 1);
        assert_eq!(
            p.get(Path::new("other.db"), 0, 0),
            DbReplicaProgress::default()
        );
    }

    /// The names that label metrics carry no query parameters and no credentials.
    #[test]
    fn replica_names_are_credential_free() {
        use crate::replica::store::ReplicaStore;
        use crate::replica::url::ReplicaUrl;
        let dir = tempfile::tempdir().unwrap();
        let file = format!("file://{}", dir.path().display());
        let store = ReplicaStore::open(&ReplicaUrl::parse(&file).unwrap()).unwrap();
        assert_eq!(store.name(), file);
        for (url, name) in [
            (
                "s3://bucket/some/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1&forcePathStyle=true",
                "s3://bucket/some/prefix",
            ),
            ("s3://bucket?region=eu-west-1", "s3://bucket"),
        ] {
            let store = ReplicaStore::open(&ReplicaUrl::parse(url).unwrap()).unwrap();
            assert_eq!(store.name(), name);
        }
    }
}

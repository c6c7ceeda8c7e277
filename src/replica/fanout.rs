//! Fan-out: a mount's replicas are uploaded each on its own (an uploader and a maintenance
//! loop per replica, [`super::upload`], [`super::maintain`]), so that a failing or hanging
//! replica never delays the others. What they share is staging, and this file owns the
//! sharing:
//!
//! - what each replica holds of each database (its uploaded TXID), kept in memory and in
//!   `<staging>/<relpath>/replicas/<id>/uploaded`, so that a restart resumes each replica
//!   where it was rather than sending the faster ones again what they hold. A replica
//!   without that file (one added to the mount, or staging written by an older walfs) is
//!   unconfirmed: its uploader asks the replica once what it holds
//!   ([`Fanout::confirm`]), and a replica that lacks what staging already dropped gets a
//!   snapshot;
//! - what staging may drop: the staged batches and snapshots that every replica holds
//!   (the smallest uploaded TXID), and what synchronous commits are told (the same: a
//!   synchronous commit returns once every replica holds it);
//! - the databases newly staged for each replica (capture seals them once, for all);
//! - the deletion marker, dropped from staging once every replica has it;
//! - the request to restart a database's history from a snapshot when staged items
//!   cannot be uploaded.
//!
//! A replica's `<id>` is the first 16 hex digits of the BLAKE3 hash of its credential-free
//! name ([`super::store::ReplicaStore::name`]), so it follows the replica, not its place in
//! the `--replica` list. Local copies written before replicas were uploaded on their own
//! (one set, in `<relpath>/replica/`) become the first replica's.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::kept::KeptCopies;
use super::progress::ReplicaProgress;
use super::sync::SyncReplication;
use crate::staging::{Staged, Staging, StagingResult, KEPT_DIR, LEGACY_KEPT_DIR};

/// The file in a replica's directory of a database that says what the replica holds.
const UPLOADED_FILE: &str = "uploaded";

/// Asks capture to restart the history of a database (relative path) from a snapshot,
/// giving the reason; false if the database cannot be captured now.
pub type RestartHistory = Box<dyn Fn(&Path, &str) -> bool + Send + Sync>;

/// The directory name of the replica called `name` (credential-free) in each database's
/// staging directory.
pub fn replica_id(name: &str) -> String {
    blake3::hash(name.as_bytes()).to_hex()[..16].to_string()
}

/// What one replica holds of one database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    txid: u64,
    /// Known from the replica's own file or from an upload, not taken from the state.
    confirmed: bool,
}

/// What the replicas of one mount share (see the module comment).
pub struct Fanout {
    staging: Arc<Staging>,
    copies: Vec<KeptCopies>,
    progress: Arc<ReplicaProgress>,
    /// Per database, what each replica holds (loaded when first needed).
    held: Mutex<HashMap<PathBuf, Vec<Position>>>,
    /// Databases staged since each replica's uploader last asked.
    inboxes: Mutex<Vec<BTreeSet<PathBuf>>>,
    /// Per database, the deletion marker being sent and which replicas have it.
    markers: Mutex<HashMap<PathBuf, (String, Vec<bool>)>>,
    sync: OnceLock<Arc<SyncReplication>>,
    restart: OnceLock<RestartHistory>,
}

impl Fanout {
    /// The fan-out of the replicas called `names` (credential-free, in the mount's order)
    /// over `staging`. Moves local copies of an older walfs to the first replica.
    pub fn new(staging: Arc<Staging>, names: Vec<String>) -> StagingResult<Fanout> {
        let copies: Vec<KeptCopies> = names
            .iter()
            .map(|n| KeptCopies::new(staging.clone(), &replica_id(n)))
            .collect();
        if let Some(first) = copies.first() {
            for db in staging.databases()? {
                let legacy = staging.db_dir(&db)?.join(LEGACY_KEPT_DIR);
                let dir = first.replica_dir(&db)?;
                if legacy.is_dir() && !dir.exists() {
                    std::fs::create_dir_all(staging.db_dir(&db)?.join(KEPT_DIR))?;
                    std::fs::rename(&legacy, &dir)?;
                    tracing::info!(db = %db.display(), "local copies now belong to the first replica");
                }
            }
        }
        Ok(Fanout {
            inboxes: Mutex::new(vec![BTreeSet::new(); names.len()]),
            progress: Arc::new(ReplicaProgress::new(names)),
            staging,
            copies,
            held: Mutex::new(HashMap::new()),
            markers: Mutex::new(HashMap::new()),
            sync: OnceLock::new(),
            restart: OnceLock::new(),
        })
    }

    pub fn staging(&self) -> &Arc<Staging> {
        &self.staging
    }

    /// How many replicas there are.
    pub fn len(&self) -> usize {
        self.copies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// Replica `replica`'s local copies.
    pub fn copies(&self, replica: usize) -> &KeptCopies {
        &self.copies[replica]
    }

    /// What each replica holds of each database, and its counters.
    pub fn progress(&self) -> &Arc<ReplicaProgress> {
        &self.progress
    }

    /// Tells `sync` what every replica holds after each upload.
    pub fn set_sync(&self, sync: Arc<SyncReplication>) {
        let _ = self.sync.set(sync);
    }

    pub fn sync(&self) -> Option<&Arc<SyncReplication>> {
        self.sync.get()
    }

    /// Sets how to ask capture for a snapshot that supersedes staged items that can no
    /// longer be uploaded.
    pub fn set_restart(&self, restart: RestartHistory) {
        let _ = self.restart.set(restart);
    }

    /// Asks capture to restart `db`'s history from a snapshot; false if it cannot now.
    pub fn restart(&self, db: &Path, reason: &str) -> bool {
        self.restart.get().is_some_and(|r| r(db, reason))
    }

    /// The databases newly staged for replica `replica`: `fresh` seals what capture
    /// staged (once, for every replica), and what it returns joins each replica's inbox.
    pub fn take(&self, replica: usize, fresh: impl FnOnce() -> Vec<PathBuf>) -> Vec<PathBuf> {
        let mut inboxes = self.inboxes.lock();
        let new = fresh();
        for inbox in inboxes.iter_mut() {
            inbox.extend(new.iter().cloned());
        }
        std::mem::take(&mut inboxes[replica]).into_iter().collect()
    }

    /// The TXID replica `replica` holds of `db`: what it was last told, else what its file
    /// says, else what staging's state says every replica holds (unconfirmed, see
    /// [`Fanout::unconfirmed`]).
    pub fn held(&self, db: &Path, replica: usize) -> StagingResult<u64> {
        Ok(self.positions(db)?[replica].txid)
    }

    /// Whether what replica `replica` holds of `db` is only assumed (staging has no record
    /// of it, but its state says the replicas hold something): its uploader asks the
    /// replica ([`Fanout::confirm`]) before it uploads.
    pub fn unconfirmed(&self, db: &Path, replica: usize) -> StagingResult<bool> {
        Ok(!self.positions(db)?[replica].confirmed)
    }

    /// Replica `replica` holds `db` up to `txid`, as it says itself (it may be less than
    /// what staging kept: the replica then needs a snapshot, see [`Fanout::lacks_staged`]).
    pub fn confirm(&self, db: &Path, replica: usize, txid: u64) -> StagingResult<()> {
        self.positions(db)?;
        self.write_position(db, replica, txid)?;
        if let Some(h) = self.held.lock().get_mut(db) {
            h[replica] = Position {
                txid,
                confirmed: true,
            };
        }
        Ok(())
    }

    /// Whether replica `replica` lacks TXIDs of `db` that staging no longer holds (every
    /// other replica had them when staging dropped them): only a snapshot can bring it up
    /// to date.
    pub fn lacks_staged(&self, db: &Path, replica: usize) -> StagingResult<bool> {
        let floor = self.staging.state(db)?.map_or(0, |s| s.uploaded_txid);
        Ok(self.held(db, replica)? < floor)
    }

    fn positions(&self, db: &Path) -> StagingResult<Vec<Position>> {
        if let Some(h) = self.held.lock().get(db) {
            return Ok(h.clone());
        }
        let floor = self.staging.state(db)?.map_or(0, |s| s.uploaded_txid);
        let assumed = Position {
            txid: floor,
            confirmed: floor == 0,
        };
        let mut loaded = Vec::with_capacity(self.copies.len());
        for c in &self.copies {
            let file = c.replica_dir(db)?.join(UPLOADED_FILE);
            let position = match std::fs::read_to_string(&file) {
                Ok(text) => match parse_uploaded(&text) {
                    Some(txid) => Position {
                        txid,
                        confirmed: true,
                    },
                    None => {
                        tracing::warn!(file = %file.display(), "unreadable; the replica will be asked what it holds");
                        assumed
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => assumed,
                Err(e) => return Err(e.into()),
            };
            loaded.push(position);
        }
        Ok(self
            .held
            .lock()
            .entry(db.to_path_buf())
            .or_insert(loaded)
            .clone())
    }

    /// Replaces the position file (temporary file, rename), without fsync: it costs the
    /// upload round no flush. After a power loss it may be older than what the replica
    /// holds (the replica is sent some objects again) or unreadable (the replica is asked,
    /// [`Fanout::confirm`]); it is written only once the replica holds what it says.
    fn write_position(&self, db: &Path, replica: usize, txid: u64) -> StagingResult<()> {
        let dir = self.copies[replica].replica_dir(db)?;
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{UPLOADED_FILE}.tmp"));
        std::fs::write(&tmp, format!("txid {txid}\n"))?;
        std::fs::rename(&tmp, dir.join(UPLOADED_FILE))?;
        Ok(())
    }

    /// The sealed batches and snapshots of `db` that replica `replica` does not hold yet,
    /// in order ([`Staging::pending`]).
    pub fn pending(&self, db: &Path, replica: usize) -> StagingResult<Vec<Staged>> {
        let held = self.held(db, replica)?;
        let mut staged = self.staging.pending(db)?;
        staged.retain(|s| s.max_txid() > held);
        Ok(staged)
    }

    /// Replica `replica` now holds `db` up to `txid`: the synchronous commits that every
    /// replica now holds return. Fast (memory only); [`Fanout::record`] follows.
    pub fn holds(&self, db: &Path, replica: usize, txid: u64) -> StagingResult<()> {
        self.positions(db)?;
        let mut held = self.held.lock();
        let Some(h) = held.get_mut(db) else {
            return Ok(());
        };
        h[replica] = Position {
            txid: h[replica].txid.max(txid),
            confirmed: true,
        };
        // Under the lock, so that the reports reach `sync` in order.
        if let Some(sync) = self.sync.get() {
            sync.uploaded(db, min_held(h).unwrap_or(txid));
        }
        Ok(())
    }

    /// Records durably that replica `replica` holds `db` up to `txid`, and drops from
    /// staging what every replica holds.
    pub fn record(&self, db: &Path, replica: usize, txid: u64) -> StagingResult<()> {
        self.holds(db, replica, txid)?;
        self.write_position(db, replica, txid)?;
        let all = min_held(&self.positions(db)?).unwrap_or(txid);
        self.staging.mark_uploaded(db, all)?;
        Ok(())
    }

    /// Replica `replica` holds `db`'s deletion marker `content`: once every replica does,
    /// staging drops it.
    pub fn marker_sent(&self, db: &Path, replica: usize, content: &str) -> StagingResult<()> {
        let everywhere = {
            let mut markers = self.markers.lock();
            let entry = markers
                .entry(db.to_path_buf())
                .or_insert_with(|| (content.to_string(), vec![false; self.copies.len()]));
            if entry.0 != content {
                *entry = (content.to_string(), vec![false; self.copies.len()]);
            }
            entry.1[replica] = true;
            let all = entry.1.iter().all(|&b| b);
            if all {
                markers.remove(db);
            }
            all
        };
        if everywhere {
            self.staging.clear_deleted(db, Some(content))?;
            tracing::info!(db = %db.display(), "the replicas mark the database as deleted");
        }
        Ok(())
    }
}

fn min_held(positions: &[Position]) -> Option<u64> {
    positions.iter().map(|p| p.txid).min()
}

fn parse_uploaded(text: &str) -> Option<u64> {
    text.trim().strip_prefix("txid ")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::DbState;

    /// Staging keeps what one replica lacks while the other moves on; each replica's
    /// position survives a restart, and the legacy copies go to the first replica.
    #[test]
    fn staging_drops_only_what_every_replica_holds() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Arc::new(Staging::open(dir.path()).unwrap());
        let db = Path::new("app.db");
        staging
            .save_state(
                db,
                &DbState {
                    txid: 3,
                    uploaded_txid: 2,
                    ..DbState::default()
                },
            )
            .unwrap();
        let legacy = staging.db_dir(db).unwrap().join(LEGACY_KEPT_DIR).join("0");
        std::fs::create_dir_all(&legacy).unwrap();
        let names = vec!["file:///a".to_string(), "s3://b".to_string()];
        let fanout = Fanout::new(staging.clone(), names.clone()).unwrap();
        assert!(
            fanout.copies(0).kept_dir(db, 0).unwrap().is_dir(),
            "the legacy copies are the first replica's"
        );
        assert_eq!(fanout.held(db, 0).unwrap(), 2, "the state's floor");
        assert!(fanout.unconfirmed(db, 0).unwrap() && fanout.unconfirmed(db, 1).unwrap());
        fanout.record(db, 0, 5).unwrap();
        assert!(!fanout.unconfirmed(db, 0).unwrap(), "an upload confirms it");
        assert_eq!(fanout.held(db, 0).unwrap(), 5);
        assert_eq!(fanout.held(db, 1).unwrap(), 2);
        assert_eq!(staging.state(db).unwrap().unwrap().uploaded_txid, 2);
        fanout.record(db, 1, 4).unwrap();
        assert_eq!(staging.state(db).unwrap().unwrap().uploaded_txid, 4);

        let again = Fanout::new(staging.clone(), names.into_iter().rev().collect()).unwrap();
        assert_eq!(again.held(db, 0).unwrap(), 4, "by replica, not by place");
        assert_eq!(again.held(db, 1).unwrap(), 5);
        assert!(!again.unconfirmed(db, 0).unwrap());

        // A third replica, new to the mount: assumed to hold what all do, until it says
        // it holds less; it then lacks what staging dropped.
        let names = vec!["file:///a".into(), "s3://b".into(), "gs://c".into()];
        let third = Fanout::new(staging.clone(), names).unwrap();
        assert_eq!(third.held(db, 2).unwrap(), 4);
        assert!(third.unconfirmed(db, 2).unwrap());
        assert!(!third.lacks_staged(db, 2).unwrap());
        third.confirm(db, 2, 0).unwrap();
        assert!(!third.unconfirmed(db, 2).unwrap());
        assert!(third.lacks_staged(db, 2).unwrap(), "it needs a snapshot");
        third.record(db, 2, 7).unwrap();
        assert!(!third.lacks_staged(db, 2).unwrap());

        staging.mark_deleted(db, 5).unwrap();
        let marker = staging.deleted_marker(db).unwrap().unwrap();
        again.marker_sent(db, 1, &marker).unwrap();
        assert!(staging.deleted_marker(db).unwrap().is_some(), "one has it");
        again.marker_sent(db, 0, &marker).unwrap();
        assert!(
            staging.deleted_marker(db).unwrap().is_none(),
            "both have it"
        );
    }

    #[test]
    fn each_replica_gets_every_staged_database() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Arc::new(Staging::open(dir.path()).unwrap());
        let fanout = Fanout::new(staging, vec!["a".into(), "b".into()]).unwrap();
        let got = fanout.take(0, || vec![PathBuf::from("x.db")]);
        assert_eq!(got, vec![PathBuf::from("x.db")]);
        assert!(fanout.take(0, Vec::new).is_empty());
        let got = fanout.take(1, || vec![PathBuf::from("y.db")]);
        assert_eq!(got, vec![PathBuf::from("x.db"), PathBuf::from("y.db")]);
        assert_eq!(fanout.take(0, Vec::new), vec![PathBuf::from("y.db")]);
    }
}

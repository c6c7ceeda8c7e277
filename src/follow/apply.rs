//! The follower's applier: reads the replica and turns what it finds into versions of the
//! followed databases ([`super::versions`]) under the mount ([`super::namespace`]).
//!
//! This module owns [`Applier`]. At start it lists the replica's databases and restores
//! each (a verified restore, as `walfs restore` does). Then it polls the writer's change
//! feed (`crate::replica::feed`) with a conditional GET: unchanged, it costs one request
//! and no body; changed, it names the databases that moved, and only those are read. For
//! each, one LIST of level 0 finds the objects after the TXID the follower holds, and each
//! is applied as a new version, checked on the way: the follower keeps the content checksum
//! of its state (docs/FORMAT.md) and compares it with the writer's verification record of
//! the object's max TXID, which comes in the object's metadata on S3 (no extra request) or
//! beside it on a file replica; objects that carry LTX checksums (Litestream's) are
//! checked against those too, before and after. Only if level 0 no longer holds the next TXID (compacted away while the follower
//! was behind) are the other levels listed; only if nothing continues the follower's
//! state, or a checksum does not match, is the database restored afresh, as a new
//! generation that readers move to at their next transaction.
//!
//! Polling backs off while nothing changes: from `poll_min` after a change, doubling up to
//! `poll_max`. Without a feed (a replica written by Litestream, or by a walfs older than
//! the feed) every database's level 0 is listed at each poll instead, and the replica is
//! listed for new databases every [`RESCAN`]. With a feed, the replica is listed again
//! when the feed's epoch changes (a writer restarted: what it uploaded before its first
//! feed is in no feed), when the feed was read too late to trust, and every
//! [`FULL_RESCAN`] in any case: the feed is a hint, and a feed that a writer stopped
//! putting (or never put after its last upload) must not keep a follower stale for ever.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::runtime::Runtime;

use super::namespace::Namespace;
use super::versions::FollowedDb;
use crate::ltx::{DatabaseChecksum, LtxDecoder};
use crate::replica::error::{ReplicaError, StoreErrorKind};
use crate::replica::feed::{feed_key, parse_feed, FEED_WINDOW};
use crate::replica::record::{ChecksumRecord, RecordedChecksum, SidecarStore};
use crate::replica::store::{LtxObjectInfo, ReplicaStore};
use crate::restore::list::{deleted_state, read_deleted_marker};
use crate::restore::plan::{RestoreTarget, SNAPSHOT_LEVEL};
use crate::restore::{restore_replanning, RestoreError, RestoreResult};
use crate::sqlite::ContentChecksum;

/// How often a replica without a feed is listed for new databases.
pub const RESCAN: Duration = Duration::from_secs(30);

/// How often a replica with a feed is listed in full all the same (one LIST of the
/// databases and one of each database's level 0).
pub const FULL_RESCAN: Duration = Duration::from_secs(600);

/// What the follower holds of one database, for its metrics.
#[derive(Clone)]
pub struct FollowedStatus {
    pub txid: u64,
    /// When the state served was committed on the writer (its LTX timestamp).
    pub committed: SystemTime,
    pub db: Arc<FollowedDb>,
}

/// What the applier counts and holds, for the log and `--metrics-addr`.
#[derive(Default)]
pub struct FollowStats {
    /// Each database shown, by its path under the mount.
    pub databases: parking_lot::Mutex<std::collections::BTreeMap<String, FollowedStatus>>,
    /// When the replica last answered a poll.
    pub last_poll: parking_lot::Mutex<Option<SystemTime>>,
    /// Polls the replica failed to answer.
    pub poll_errors: AtomicU64,
    /// Versions published from level-0 (or compacted) objects.
    pub applied: AtomicU64,
    /// Databases restored afresh (at start, when new, or when they could not be followed).
    pub restored: AtomicU64,
    /// Feed reads that found it unchanged.
    pub unchanged_polls: AtomicU64,
}

/// One database the follower holds.
struct Followed {
    db: Arc<FollowedDb>,
    /// Where it is shown under the mount.
    shown: String,
    txid: u64,
    commit: u32,
    /// LTX's database checksum (CRC-64), for objects that carry one (Litestream's).
    checksum: DatabaseChecksum,
    /// walfs's content checksum (docs/FORMAT.md), for the writer's verification records.
    content: ContentChecksum,
}

/// Reads the replica and applies what is new.
pub struct Applier {
    rt: Runtime,
    store: ReplicaStore,
    sidecar: SidecarStore,
    ns: Arc<Namespace>,
    cache: PathBuf,
    /// The name a database at the replica's root is shown as.
    root_name: String,
    poll_min: Duration,
    poll_max: Duration,
    dbs: HashMap<String, Followed>,
    /// Databases whose last attempt failed: tried again at each poll.
    retry: BTreeSet<String>,
    next_dir: u64,
    stats: Arc<FollowStats>,
}

/// Why a database's state cannot be continued with an object.
enum Continue {
    /// It was applied.
    Applied,
    /// It does not continue the state (a checksum or the page size differs): restore.
    Diverged(String),
}

impl Applier {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: ReplicaStore,
        ns: Arc<Namespace>,
        cache: PathBuf,
        root_name: String,
        poll_min: Duration,
        poll_max: Duration,
        stats: Arc<FollowStats>,
    ) -> RestoreResult<Applier> {
        let rt = crate::restore::runtime()?;
        Ok(Applier {
            rt,
            sidecar: SidecarStore::new(store.clone()),
            store,
            ns,
            cache,
            root_name,
            poll_min,
            poll_max,
            dbs: HashMap::new(),
            retry: BTreeSet::new(),
            next_dir: 0,
            stats,
        })
    }

    /// Lists the replica and brings every database up to date; the databases that failed
    /// are tried again at the next poll. Fails if the replica cannot be listed, and, when
    /// `strict` (at start), if a database cannot be read with the keys given: that is not
    /// going to change by trying again.
    pub fn scan(&mut self, strict: bool) -> RestoreResult<()> {
        let listed = self.rt.block_on(self.store.list_databases())?;
        for db in &listed {
            match self.try_sync(db, None) {
                Err(e) if strict && is_key_error(&e) => return Err(e),
                Err(e) => self.failed(db, &e),
                Ok(_) => {}
            }
        }
        let gone: Vec<String> = self
            .dbs
            .keys()
            .filter(|d| !listed.contains(d))
            .cloned()
            .collect();
        for db in gone {
            tracing::info!(db = %self.shown(&db), "the database is gone from the replica; removed from the mount");
            self.remove(&db);
        }
        Ok(())
    }

    /// Polls until `stop`: the feed, or every database without one.
    pub fn run(&mut self, stop: &AtomicBool) {
        let key = feed_key(self.store.root());
        let mut etag: Option<String> = None;
        let mut last_read = Instant::now();
        let mut last_scan = Instant::now();
        let mut interval = self.poll_min;
        let mut last_error = String::new();
        let mut epoch: Option<u64> = None;
        while !stop.load(Ordering::Relaxed) {
            sleep_unless(stop, interval);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let mut changed = false;
            for db in std::mem::take(&mut self.retry) {
                changed |= self.sync(&db);
            }
            match self
                .rt
                .block_on(self.store.get_object_if_changed(&key, etag.as_deref()))
            {
                Ok(None) => {
                    self.stats.unchanged_polls.fetch_add(1, Ordering::Relaxed);
                    if last_scan.elapsed() >= FULL_RESCAN {
                        changed |= self.poll_all(&mut last_scan, true);
                    }
                    *self.stats.last_poll.lock() = Some(SystemTime::now());
                    last_read = Instant::now();
                    last_error.clear();
                }
                Ok(Some((body, tag))) => {
                    last_error.clear();
                    let feed = match parse_feed(&String::from_utf8_lossy(&body)) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::warn!("the replica's change feed {key} is malformed ({e}); listing the replica instead");
                            self.poll_all(&mut last_scan, true);
                            etag = tag;
                            continue;
                        }
                    };
                    // A new writer (its uploads before this feed are in none), or read
                    // too late (the feed may have dropped databases that changed).
                    let restarted = epoch.is_some_and(|e| e != feed.epoch);
                    epoch = Some(feed.epoch);
                    if restarted
                        || last_read.elapsed() > FEED_WINDOW / 2
                        || last_scan.elapsed() >= FULL_RESCAN
                    {
                        self.poll_all(&mut last_scan, true);
                    }
                    for e in &feed.entries {
                        self.follow_entry(&e.db, e.txid, e.deleted);
                    }
                    etag = tag;
                    *self.stats.last_poll.lock() = Some(SystemTime::now());
                    last_read = Instant::now();
                    changed = true;
                }
                Err(e) if e.is_not_found() => {
                    last_error.clear();
                    changed |= self.poll_all(&mut last_scan, false);
                    *self.stats.last_poll.lock() = Some(SystemTime::now());
                    last_read = Instant::now();
                }
                Err(e) => {
                    self.stats.poll_errors.fetch_add(1, Ordering::Relaxed);
                    let msg = format!("{e:#}");
                    if msg != last_error {
                        tracing::warn!("cannot read the replica ({msg}); the mount serves what it holds and tries again");
                        last_error = msg;
                    }
                }
            }
            interval = if changed {
                self.poll_min
            } else {
                (interval * 2).clamp(self.poll_min, self.poll_max)
            };
        }
    }

    /// Without a feed: reads every database's level 0, and lists the replica for new
    /// databases every [`RESCAN`] (or now, with `rescan`). True if anything changed.
    fn poll_all(&mut self, last_scan: &mut Instant, rescan: bool) -> bool {
        if rescan || last_scan.elapsed() >= RESCAN {
            *last_scan = Instant::now();
            let before = self.version_count();
            if let Err(e) = self.scan(false) {
                tracing::warn!("cannot list the replica: {e:#}; trying again");
            }
            return self.version_count() != before;
        }
        let dbs: Vec<String> = self.dbs.keys().cloned().collect();
        let mut changed = false;
        for db in dbs {
            changed |= self.sync(&db);
        }
        changed
    }

    fn version_count(&self) -> u64 {
        self.stats.applied.load(Ordering::Relaxed) + self.stats.restored.load(Ordering::Relaxed)
    }

    /// A feed entry: `db` is at `txid` in the replica, or was deleted there at it.
    fn follow_entry(&mut self, db: &str, txid: u64, deleted: bool) -> bool {
        let held = self.dbs.get(db).map(|f| f.txid);
        match (held, deleted) {
            (Some(h), true) if txid >= h => {
                tracing::info!(db = %self.shown(db), "the database was deleted on the writer; removed from the mount");
                self.remove(db);
                true
            }
            (None, true) => false,
            (Some(h), false) if txid <= h => false,
            _ => self.sync_to(db, Some(txid)),
        }
    }

    fn shown(&self, db: &str) -> String {
        if db.is_empty() {
            self.root_name.clone()
        } else {
            db.to_string()
        }
    }

    fn remove(&mut self, db: &str) {
        if let Some(f) = self.dbs.remove(db) {
            self.ns.remove(&f.shown);
            self.stats.databases.lock().remove(&f.shown);
        }
    }

    /// Brings `db` up to what the replica holds. True if a version was published or the
    /// database went; on failure it is tried again at the next poll.
    fn sync(&mut self, db: &str) -> bool {
        self.sync_to(db, None)
    }

    /// [`Applier::sync`], knowing (from the feed) that the replica holds `db` up to
    /// `hint`.
    fn sync_to(&mut self, db: &str, hint: Option<u64>) -> bool {
        match self.try_sync(db, hint) {
            Ok(changed) => changed,
            Err(e) => {
                self.failed(db, &e);
                false
            }
        }
    }

    /// [`Applier::sync_to`], with its error.
    fn try_sync(&mut self, db: &str, hint: Option<u64>) -> RestoreResult<bool> {
        let before = self.version_count();
        if self.dbs.contains_key(db) {
            self.catch_up(db, hint.unwrap_or(0))?;
        } else {
            self.restore(db, "it is new to the follower")?;
        }
        Ok(self.version_count() != before || !self.dbs.contains_key(db))
    }

    fn failed(&mut self, db: &str, e: &RestoreError) {
        tracing::warn!(db = %self.shown(db), "cannot follow the database: {e:#}; trying again at the next poll");
        self.retry.insert(db.to_string());
    }

    /// Applies the objects that continue `db`'s state up to what level 0 holds (and at
    /// least to `hint`, what the feed said): from level 0, else from any level but
    /// snapshots; restores afresh if none does.
    fn catch_up(&mut self, db: &str, hint: u64) -> RestoreResult<()> {
        let held = self.dbs[db].txid;
        let level0 = self.rt.block_on(self.store.list_ltx(db, 0))?;
        let newest = level0.iter().map(|o| o.max_txid).max().unwrap_or(0);
        let mut chain = continuation(&level0, held);
        let reach = chain.last().map_or(held, |o| o.max_txid);
        // Short of level 0's newest object, or of the feed's TXID: what follows the
        // follower's state was compacted out of level 0.
        if reach < newest.max(hint) {
            let all = self.rt.block_on(self.store.list_db_ltx(db))?;
            let newest = all.iter().map(|o| o.max_txid).max().unwrap_or(0);
            chain = continuation(
                &all.into_iter()
                    .filter(|o| o.level != SNAPSHOT_LEVEL)
                    .collect::<Vec<_>>(),
                held,
            );
            if chain.last().map_or(held, |o| o.max_txid) < newest {
                return self.restore(
                    db,
                    &format!(
                        "no object continues its TXID {held} (the replica's newest is {newest})"
                    ),
                );
            }
        }
        for obj in chain {
            match self.apply_object(db, &obj)? {
                Continue::Applied => {}
                Continue::Diverged(why) => return self.restore(db, &why),
            }
        }
        Ok(())
    }

    /// Applies one object on top of `db`'s latest version as the next version.
    fn apply_object(&mut self, db: &str, obj: &LtxObjectInfo) -> RestoreResult<Continue> {
        let (bytes, in_metadata) = self.rt.block_on(self.store.get_ltx_with_record(
            db,
            obj.level,
            obj.min_txid,
            obj.max_txid,
        ))?;
        // The writer's content checksum of the state after the object: in its metadata
        // (S3, Azure, GCS), or beside it (a file replica; a local read).
        let record = match in_metadata {
            Some(text) => Some(ChecksumRecord::parse(&text).map_err(|m| {
                RestoreError::Corrupt(format!(
                    "the verification record of object {} is malformed: {m}",
                    obj.key
                ))
            })?),
            None if !self.store.holds_records() => self
                .rt
                .block_on(self.sidecar.get_checksum_record(db, obj.max_txid, None))?
                .map(|(r, _)| r),
            None => None,
        };
        let corrupt = |e: &dyn std::fmt::Display| {
            RestoreError::Corrupt(format!("object {} is corrupt: {e}", obj.key))
        };
        let f = self.dbs.get_mut(db).expect("followed");
        let mut dec = LtxDecoder::new(&bytes[..]).map_err(|e| corrupt(&e))?;
        let h = *dec.header();
        if (h.min_txid, h.max_txid) != (obj.min_txid, obj.max_txid) {
            return Err(corrupt(&format!(
                "its header covers TXIDs {} to {}",
                h.min_txid, h.max_txid
            )));
        }
        if Some(h.page_size) != f.db.page_size() {
            return Ok(Continue::Diverged(format!(
                "object {} has page size {}",
                obj.key, h.page_size
            )));
        }
        if h.has_checksums()
            && h.min_txid == f.txid + 1
            && h.pre_apply_checksum != 0
            && h.pre_apply_checksum != f.checksum.value()
        {
            return Ok(Continue::Diverged(format!(
                "object {} starts from checksum {:016x}, the follower holds {:016x}",
                obj.key,
                h.pre_apply_checksum,
                f.checksum.value()
            )));
        }
        let mut checksum = f.checksum;
        let mut content = f.content;
        let mut pending = f.db.begin()?;
        let mut page = vec![0u8; h.page_size as usize];
        let mut old = vec![0u8; h.page_size as usize];
        let applied = (|| -> RestoreResult<()> {
            while let Some(pgno) = dec.read_page(&mut page).map_err(|e| corrupt(&e))? {
                if pgno <= f.commit {
                    f.db.read_latest_page(pgno, &mut old)?;
                    checksum.remove_page(pgno, &old);
                    content.add_page(pgno, &old);
                }
                checksum.add_page(pgno, &page);
                content.add_page(pgno, &page);
                f.db.write_page(&mut pending, pgno, &page)?;
            }
            let trailer = dec.finish().map_err(|e| corrupt(&e))?;
            // Pages past a shrunk end leave the checksum (those the object did not write).
            let written: BTreeSet<u32> = dec.index().iter().map(|e| e.pgno).collect();
            for pgno in h.commit.saturating_add(1)..=f.commit {
                if !written.contains(&pgno) {
                    f.db.read_latest_page(pgno, &mut old)?;
                    checksum.remove_page(pgno, &old);
                    content.add_page(pgno, &old);
                }
            }
            if let Some(r) = &record {
                let mine = match r.checksum {
                    RecordedChecksum::Content(_) => RecordedChecksum::Content(content),
                    RecordedChecksum::LegacyCrc64(_) => {
                        RecordedChecksum::LegacyCrc64(checksum.value())
                    }
                };
                if r.txid != h.max_txid
                    || (r.checksum, r.page_size, r.commit) != (mine, h.page_size, h.commit)
                {
                    return Err(RestoreError::Corrupt(format!(
                        "after object {} (TXID {}) the follower holds {mine} ({} pages), its verification record says TXID {} {} ({} pages)",
                        obj.key, h.max_txid, h.commit, r.txid, r.checksum, r.commit
                    )));
                }
            }
            if h.has_checksums()
                && trailer.post_apply_checksum != 0
                && trailer.post_apply_checksum != checksum.value()
            {
                return Err(RestoreError::Corrupt(format!(
                    "after object {} the follower's checksum is {:016x}, the object's {:016x}",
                    obj.key,
                    checksum.value(),
                    trailer.post_apply_checksum
                )));
            }
            Ok(())
        })();
        if let Err(e) = applied {
            f.db.abandon(pending);
            return match e {
                RestoreError::Corrupt(m) => Ok(Continue::Diverged(m)),
                e => Err(e),
            };
        }
        f.db.publish(pending, h.commit, h.max_txid)?;
        f.txid = h.max_txid;
        f.commit = h.commit;
        f.checksum = checksum;
        f.content = content;
        tracing::debug!(db = %f.shown, txid = h.max_txid, key = %obj.key, "applied");
        self.stats.applied.fetch_add(1, Ordering::Relaxed);
        if let Some(st) = self.stats.databases.lock().get_mut(&f.shown) {
            st.txid = h.max_txid;
            st.committed = timestamp_of(h.timestamp_ms);
        }
        Ok(Continue::Applied)
    }

    /// Restores `db` afresh at the replica's latest state, as a new generation (or removes
    /// it if the replica says it was deleted).
    fn restore(&mut self, db: &str, why: &str) -> RestoreResult<()> {
        let marker = self.rt.block_on(read_deleted_marker(&self.store, db))?;
        let objects = self.rt.block_on(self.store.list_db_ltx(db))?;
        let newest = objects.iter().map(|o| o.max_txid).max().unwrap_or(0);
        if objects.is_empty() || deleted_state(marker, newest).is_some() {
            self.remove(db);
            return Ok(());
        }
        let shown = self.shown(db);
        let target = match self.dbs.get(db) {
            Some(f) => f.db.clone(),
            None => {
                self.next_dir += 1;
                Arc::new(FollowedDb::new(self.cache.join(self.next_dir.to_string()))?)
            }
        };
        let out = target.base_path();
        let mut first = Some(objects);
        let outcome = restore_replanning(
            &self.rt,
            &self.store,
            &self.sidecar,
            db,
            RestoreTarget::Latest,
            &out,
            false,
            true,
            |_| match first.take() {
                Some(o) => Ok(o),
                None => Ok(self.rt.block_on(self.store.list_db_ltx(db))?),
            },
        );
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_file(&out);
                return Err(e);
            }
        };
        let checksum = DatabaseChecksum::from_reader(
            std::io::BufReader::new(File::open(&out)?),
            outcome.page_size,
        )
        .map_err(|e| RestoreError::Corrupt(format!("{e}")))?;
        target.install_base(&out, outcome.page_size, outcome.commit, outcome.txid)?;
        let known = self.dbs.contains_key(db);
        if known {
            tracing::info!(db = %shown, txid = outcome.txid, "restored afresh: {why}");
        } else {
            tracing::info!(db = %shown, txid = outcome.txid, pages = outcome.commit, "following");
            self.ns.insert(&shown, target.clone());
        }
        self.dbs.insert(
            db.to_string(),
            Followed {
                db: target,
                shown,
                txid: outcome.txid,
                commit: outcome.commit,
                checksum,
                content: outcome.checksum,
            },
        );
        self.stats.restored.fetch_add(1, Ordering::Relaxed);
        let status = FollowedStatus {
            txid: outcome.txid,
            committed: outcome.timestamp,
            db: self.dbs[db].db.clone(),
        };
        self.stats
            .databases
            .lock()
            .insert(self.dbs[db].shown.clone(), status);
        Ok(())
    }
}

/// Whether `e` is a key that is missing or wrong (or a tampered object): trying again
/// does not help.
fn is_key_error(e: &RestoreError) -> bool {
    match e {
        RestoreError::Store(s) | RestoreError::Replica(ReplicaError::Store(s)) => {
            matches!(
                s.kind(),
                StoreErrorKind::KeyNeeded | StoreErrorKind::Unauthentic
            )
        }
        RestoreError::Context { source, .. } => is_key_error(source),
        _ => false,
    }
}

/// The objects that take a database at `held` furthest, in order: each starts at or
/// before the TXID after the last and ends after it.
fn continuation(objects: &[LtxObjectInfo], held: u64) -> Vec<LtxObjectInfo> {
    let mut pos = held;
    let mut out = Vec::new();
    while let Some(best) = objects
        .iter()
        .filter(|o| o.min_txid <= pos + 1 && o.max_txid > pos)
        .max_by_key(|o| (o.max_txid, std::cmp::Reverse(o.size)))
    {
        pos = best.max_txid;
        out.push(best.clone());
    }
    out
}

/// An LTX timestamp (milliseconds since the epoch) as a time.
fn timestamp_of(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// Sleeps for `d`, waking early once `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(level: u8, min: u64, max: u64) -> LtxObjectInfo {
        LtxObjectInfo {
            level,
            min_txid: min,
            max_txid: max,
            size: 100 * (max - min + 1),
            timestamp: UNIX_EPOCH,
            key: format!("{level}/{min}-{max}"),
        }
    }

    #[test]
    fn the_continuation_takes_the_furthest_reaching_objects_in_order() {
        let objs = vec![
            obj(0, 1, 3),
            obj(0, 4, 4),
            obj(0, 5, 7),
            obj(1, 4, 6),
            obj(0, 9, 9),
        ];
        let c = continuation(&objs, 3);
        let got: Vec<(u64, u64)> = c.iter().map(|o| (o.min_txid, o.max_txid)).collect();
        // 4..6 reaches further than 4..4, then 5..7 overlaps it; 9 leaves a gap at 8.
        assert_eq!(got, vec![(4, 6), (5, 7)]);
        assert!(continuation(&objs, 9).is_empty());
        assert!(
            continuation(&[obj(0, 6, 8)], 3).is_empty(),
            "a gap is no continuation"
        );
    }
}

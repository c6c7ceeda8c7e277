//! Maintenance of a mount's replicas: compaction into levels 1 and up, snapshots at level
//! 9, and retention. One thread per replica, beside its uploader (replicas are uploaded
//! and maintained each on its own: [`super::fanout`]).
//!
//! It works from the local copies that staging keeps of every object uploaded to its
//! replica ([`KeptCopies::keep`]), so compaction and snapshots never GET from the store. It acts only
//! when something changed: the uploader tells it what it uploaded; each level is compacted
//! at its interval while the level below holds something new; a snapshot is built (the
//! previous snapshot merged with the objects since) once per snapshot interval for a
//! database that changed; retention runs after each change and at the moment the next
//! object expires. An idle database makes no request and wakes nothing. What the replica
//! holds is learnt from one LIST per database and replica, the first time retention needs
//! it, and then tracked in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

use super::compact::{
    compacted_away, compaction_inputs, covered_at_level, merge_ltx_consuming, snapshot_chain,
    superseded_by_snapshot, window_start, ObjId,
};
use super::error::{ReplicaError, ReplicaResult};
use super::kept::{read_header, KeepSource, Kept, KeptCopies};
use super::record::SidecarStore;
use super::retention::{plan_retention, RetentionPolicy};
use super::store::ReplicaStore;
use crate::ltx::ltx_object_name;

/// The snapshot level.
const SNAPSHOTS: u8 = 9;

/// How long a failed step waits before it is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// Maintenance settings of a mount: flags of `walfs mount` (each field's doc comment is its
/// `--help` text). The defaults are [`MaintenanceOptions::default`]'s.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct MaintenanceOptions {
    // Level `i + 1` is compacted every `compaction_intervals[i]` (at most 8 levels). The
    // path is spelt out so that clap takes the whole list from one value, not one per flag.
    /// How often each compaction level is built from the one below: level 1 every
    /// first interval, level 2 every second, ... (Litestream's default).
    #[arg(long, default_value = "30s,5m,1h", value_parser = crate::flags::durations)]
    pub compaction_intervals: std::vec::Vec<Duration>,
    /// How often a database that changed gets a full snapshot (level 9).
    #[arg(long, default_value = "24h", value_parser = crate::flags::duration)]
    pub snapshot_interval: Duration,
    /// How far back every moment stays restorable; older objects are deleted.
    #[arg(long, default_value = "24h", value_parser = crate::flags::duration)]
    pub retention: Duration,
    /// How long level-0 objects stay after level 1 covers them.
    #[arg(long, default_value = "5m", value_parser = crate::flags::duration)]
    pub l0_retention: Duration,
}

impl Default for MaintenanceOptions {
    fn default() -> Self {
        MaintenanceOptions {
            compaction_intervals: vec![
                Duration::from_secs(30),
                Duration::from_secs(300),
                Duration::from_secs(3600),
            ],
            snapshot_interval: Duration::from_secs(24 * 3600),
            retention: Duration::from_secs(24 * 3600),
            l0_retention: Duration::from_secs(300),
        }
    }
}

/// What maintenance knows of one database.
struct DbView {
    /// The local copies.
    local: BTreeMap<ObjId, Kept>,
    /// Per replica, what it holds and when each object was written; `None` until listed.
    remote: Option<Vec<BTreeMap<ObjId, SystemTime>>>,
    /// Objects uploaded before the listing (merged into it).
    unlisted: BTreeMap<ObjId, SystemTime>,
    /// When each level (1..) was last compacted.
    compacted_at: Vec<Instant>,
    /// When the last snapshot was taken.
    snapshot_at: SystemTime,
    /// When retention must look again (`None`: only after a change).
    retention_at: Option<SystemTime>,
    /// Something was uploaded since retention last looked.
    changed: bool,
    /// When a failed step may be tried again.
    retry_at: Option<Instant>,
    /// Objects whose copies went because a larger one of their level covers them; they
    /// still count the binary counter's ticks (tick markers: [`KeptCopies::ticks`]).
    ticked: BTreeSet<ObjId>,
}

impl DbView {
    fn top_level(&self, levels: usize) -> u8 {
        levels as u8
    }

    /// The local copies of levels 0 to 8.
    fn below_snapshots(&self) -> Vec<ObjId> {
        self.local
            .keys()
            .filter(|o| o.level < SNAPSHOTS)
            .copied()
            .collect()
    }

    fn latest_snapshot(&self) -> Option<&Kept> {
        self.local
            .values()
            .filter(|k| k.level == SNAPSHOTS && k.min_txid == 1)
            .max_by_key(|k| k.max_txid)
    }

    fn add_remote(&mut self, id: ObjId, at: SystemTime) {
        match &mut self.remote {
            Some(r) => {
                for m in r {
                    m.insert(id, at);
                }
            }
            None => {
                self.unlisted.insert(id, at);
            }
        }
        self.changed = true;
    }
}

/// Forgets the copies of `view` whose files are gone (consumed by a merge that failed:
/// [`Maintainer::merge_and_upload`]).
fn forget_dropped(view: &mut DbView) {
    view.local.retain(|_, k| k.path.exists());
}

fn id_of(k: &Kept) -> ObjId {
    ObjId::new(k.level, k.min_txid, k.max_txid)
}

fn ms_to_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// The maintenance loop of one mount.
pub struct Maintainer {
    copies: KeptCopies,
    replicas: Vec<ReplicaStore>,
    opts: MaintenanceOptions,
    runtime: tokio::runtime::Runtime,
    stop: AtomicBool,
    /// Objects the uploader kept, not yet taken in.
    inbox: Mutex<Vec<(PathBuf, Vec<Kept>)>>,
    /// Objects uploaded without a local copy.
    remote_only: Mutex<Vec<(PathBuf, ObjId, SystemTime)>>,
    wake: Condvar,
    views: Mutex<HashMap<PathBuf, DbView>>,
    stats: MaintenanceStats,
}

/// What maintenance did since the mount started (for metrics).
#[derive(Debug, Default)]
pub struct MaintenanceStats {
    /// Compactions uploaded (one merged object to every replica).
    pub compactions: AtomicU64,
    /// Snapshots uploaded.
    pub snapshots: AtomicU64,
    /// Objects deleted by retention (each replica's deletions count).
    pub retention_deletions: AtomicU64,
}

impl Maintainer {
    pub fn new(
        copies: KeptCopies,
        replicas: Vec<ReplicaStore>,
        opts: MaintenanceOptions,
    ) -> ReplicaResult<Maintainer> {
        if opts.compaction_intervals.len() > 8 {
            return Err(ReplicaError::Settings(
                "at most 8 compaction levels (levels 1 to 8) are possible",
            ));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Maintainer {
            copies,
            replicas,
            opts,
            runtime,
            stop: AtomicBool::new(false),
            inbox: Mutex::new(Vec::new()),
            remote_only: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            views: Mutex::new(HashMap::new()),
            stats: MaintenanceStats::default(),
        })
    }

    /// What maintenance did since the mount started.
    pub fn stats(&self) -> &MaintenanceStats {
        &self.stats
    }

    /// The uploader uploaded (and kept) these objects of `db`.
    pub fn uploaded(&self, db: &Path, kept: Vec<Kept>) {
        if kept.is_empty() {
            return;
        }
        self.inbox.lock().push((db.to_path_buf(), kept));
        self.wake.notify_all();
    }

    /// The uploader uploaded an object of `db` it could not keep a copy of: retention
    /// still tracks it, and the next snapshot fetches it.
    pub fn uploaded_without_copy(
        &self,
        db: &Path,
        level: u8,
        (min, max): (u64, u64),
        timestamp: SystemTime,
    ) {
        self.remote_only
            .lock()
            .push((db.to_path_buf(), ObjId::new(level, min, max), timestamp));
        self.wake.notify_all();
    }

    /// Asks [`Maintainer::run`] to return (after the step under way).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _g = self.inbox.lock();
        self.wake.notify_all();
    }

    fn new_view(&self, db: &Path) -> DbView {
        let local: BTreeMap<ObjId, Kept> = match self.copies.kept(db) {
            Ok(k) => k.into_iter().map(|k| (id_of(&k), k)).collect(),
            Err(e) => {
                tracing::warn!(db = %db.display(), "cannot read the local copies: {e}");
                BTreeMap::new()
            }
        };
        let snapshot_at = local
            .values()
            .filter(|k| k.level == SNAPSHOTS)
            .max_by_key(|k| k.max_txid)
            .and_then(|k| std::fs::metadata(&k.path).ok()?.modified().ok())
            .unwrap_or(UNIX_EPOCH);
        let ticked = match self.copies.ticks(db) {
            Ok(t) => t.into_iter().collect(),
            Err(e) => {
                tracing::warn!(db = %db.display(), "cannot read the tick markers: {e}");
                BTreeSet::new()
            }
        };
        DbView {
            ticked,
            local,
            remote: None,
            unlisted: BTreeMap::new(),
            compacted_at: vec![Instant::now(); self.opts.compaction_intervals.len()],
            snapshot_at,
            retention_at: None,
            changed: false,
            retry_at: None,
        }
    }

    /// Runs until [`Maintainer::shutdown`]. At start it picks up the local copies a
    /// previous run left (their compaction continues); it makes no request until there is
    /// something to do.
    pub fn run(&self) {
        {
            let mut views = self.views.lock();
            for db in self.copies.staging().databases().unwrap_or_default() {
                let v = self.new_view(&db);
                if !v.local.is_empty() {
                    views.insert(db, v);
                }
            }
        }
        loop {
            let next = self.step_all();
            let mut inbox = self.inbox.lock();
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            if inbox.is_empty() {
                match next {
                    Some(t) => {
                        let wait = t.duration_since(SystemTime::now()).unwrap_or_default();
                        self.wake.wait_for(&mut inbox, wait);
                    }
                    None => self.wake.wait(&mut inbox),
                }
            }
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
        }
    }

    /// Takes in the inbox, then does what is due for every database; returns when
    /// something will next be due (`None`: nothing until a change).
    fn step_all(&self) -> Option<SystemTime> {
        if !self.replicas.is_empty() && self.replicas.iter().all(ReplicaStore::lease_lost) {
            // Another mount maintains the replicas now.
            return None;
        }
        let inbox = std::mem::take(&mut *self.inbox.lock());
        let remote_only = std::mem::take(&mut *self.remote_only.lock());
        let mut views = self.views.lock();
        for (db, id, at) in remote_only {
            let view = views
                .entry(db.clone())
                .or_insert_with(|| self.new_view(&db));
            view.add_remote(id, at);
        }
        for (db, kept) in inbox {
            let view = views
                .entry(db.clone())
                .or_insert_with(|| self.new_view(&db));
            for k in kept {
                if k.level == SNAPSHOTS {
                    view.snapshot_at = SystemTime::now();
                }
                view.add_remote(id_of(&k), ms_to_time(k.timestamp_ms));
                view.local.insert(id_of(&k), k);
            }
        }
        let mut next: Option<SystemTime> = None;
        for (db, view) in views.iter_mut() {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            if let Some(t) = self.step(db, view) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        next
    }

    /// Does what is due for one database; returns when something will next be due.
    fn step(&self, db: &Path, view: &mut DbView) -> Option<SystemTime> {
        let now_i = Instant::now();
        let now = SystemTime::now();
        let at = |i: Instant| now + i.saturating_duration_since(now_i);
        // The uploader's binary counter may have covered copies since the last step.
        self.thin(db, view);
        if let Some(r) = view.retry_at {
            if r > now_i {
                return Some(at(r));
            }
            view.retry_at = None;
        }
        let mut next: Option<SystemTime> = None;
        let mut soonest = |t: SystemTime| next = Some(next.map_or(t, |n: SystemTime| n.min(t)));
        let levels = self.opts.compaction_intervals.len();
        let mut failed = false;
        for k in 1..=levels {
            let runs = self.runs(view, k as u8);
            if runs.is_empty() {
                continue;
            }
            let due = view.compacted_at[k - 1] + self.opts.compaction_intervals[k - 1];
            if due > now_i {
                soonest(at(due));
                continue;
            }
            view.compacted_at[k - 1] = now_i;
            for run in runs {
                if let Err(e) = self.compact(db, view, k as u8, &run) {
                    if !e.is_fenced() {
                        tracing::warn!(db = %db.display(), level = k, "compaction failed: {e:#}; retrying");
                    }
                    failed = true;
                    break;
                }
            }
            if failed {
                break;
            }
            // The level above may now have something new.
            if k < levels && !self.runs(view, k as u8 + 1).is_empty() {
                let due = view.compacted_at[k] + self.opts.compaction_intervals[k];
                soonest(at(due.max(now_i)));
            }
        }
        if !failed {
            if let Some(t) = self.maybe_snapshot(db, view, now) {
                soonest(t);
            }
            self.clean_local(db, view);
            match self.retention(db, view, now) {
                Ok(Some(t)) => soonest(t),
                Ok(None) => {}
                Err(e) => {
                    if !e.is_fenced() {
                        tracing::warn!(db = %db.display(), "retention failed: {e:#}; retrying");
                    }
                    failed = true;
                }
            }
        }
        if failed {
            view.retry_at = Some(now_i + RETRY);
            soonest(now + RETRY);
        }
        // Compaction may have covered copies of its own level, or moved a window's start.
        self.thin(db, view);
        next
    }

    /// The inputs of each object that compacting level `k` would write now (the level's
    /// own objects it absorbs, then a run of level `k - 1`; see [`compaction_inputs`]).
    fn runs(&self, view: &DbView, k: u8) -> Vec<Vec<ObjId>> {
        let local: Vec<ObjId> = view.local.keys().copied().collect();
        let ticked: Vec<ObjId> = view.ticked.iter().copied().collect();
        compaction_inputs(&local, &ticked, k, self.done(view, k))
    }

    /// Drops the copies (levels 0 to 8) that a larger kept copy of their level covers
    /// ([`covered_at_level`]), leaving a tick marker for each, and the tick markers that
    /// no longer count (at or below their level's window start). Compaction and snapshots
    /// take the covering copy instead; the binary counter counts the markers.
    fn thin(&self, db: &Path, view: &mut DbView) {
        let local: Vec<ObjId> = view.local.keys().copied().collect();
        let mut covered = BTreeSet::new();
        for w in local.iter().filter(|o| o.level < SNAPSHOTS) {
            covered.extend(covered_at_level(&local, *w));
        }
        for o in covered {
            let Some(k) = view.local.get(&o) else {
                continue;
            };
            match self.copies.drop_to_tick(db, o, &k.path) {
                Ok(()) => {
                    view.local.remove(&o);
                    view.ticked.insert(o);
                }
                Err(e) => {
                    tracing::warn!(db = %db.display(), "cannot drop a covered local copy: {e}");
                    return;
                }
            }
        }
        let local: Vec<ObjId> = view.local.keys().copied().collect();
        let stale: Vec<ObjId> = view
            .ticked
            .iter()
            .copied()
            .filter(|t| t.max <= window_start(&local, t.level))
            .collect();
        for t in stale {
            if let Err(e) = self.copies.drop_tick(db, t) {
                tracing::warn!(db = %db.display(), "cannot drop a tick marker: {e}");
                return;
            }
            view.ticked.remove(&t);
        }
    }

    /// The highest TXID level `k` already holds, locally or in a replica.
    fn done(&self, view: &DbView, k: u8) -> u64 {
        let mut done = view
            .local
            .keys()
            .filter(|o| o.level == k)
            .map(|o| o.max)
            .max()
            .unwrap_or(0);
        if let Some(r) = &view.remote {
            for m in r {
                if let Some(d) = m.keys().filter(|o| o.level == k).map(|o| o.max).max() {
                    done = done.max(d);
                }
            }
        }
        done
    }

    /// Merges `run` (local copies: level-`k` objects it absorbs, then level `k - 1`) into
    /// one object at level `k`, uploads it to every replica, keeps it and drops the
    /// level-`k - 1` copies it covers. The absorbed level-`k` copies become tick markers
    /// ([`Maintainer::thin`]): they still count the ticks of the level's window.
    fn compact(&self, db: &Path, view: &mut DbView, k: u8, run: &[ObjId]) -> ReplicaResult<()> {
        let inputs: Vec<&Kept> = run
            .iter()
            .map(|o| view.local.get(o).expect("runs come from the local copies"))
            .collect();
        let (min, max) = (run[0].min, run[run.len() - 1].max);
        let record = inputs[inputs.len() - 1].record;
        // Every input goes once the result is kept (the level below compacted away, the
        // level's own absorbed into it): large ones are freed as they are merged.
        let consume = vec![true; inputs.len()];
        let kept = self.merge_and_upload(db, k, (min, max), &inputs, &consume, false, record);
        let kept = kept.inspect_err(|_| forget_dropped(view))?;
        let local: Vec<ObjId> = view.local.keys().copied().collect();
        for o in compacted_away(&local, id_of(&kept)) {
            if let Some(input) = view.local.remove(&o) {
                self.copies.drop_kept(&input.path)?;
            }
        }
        self.stats.compactions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(db = %db.display(), level = k, min, max, inputs = run.len(), "compacted");
        view.add_remote(id_of(&kept), ms_to_time(kept.timestamp_ms));
        view.local.insert(id_of(&kept), kept);
        Ok(())
    }

    /// Merges `inputs` into one object at `level`, uploads it to every replica and keeps
    /// it. The inputs marked in `dropped_after` go once it is kept, and are freed while they
    /// are merged ([`merge_ltx_consuming`]), so that staging never holds a large database's
    /// copies twice. If the merge or an upload fails, the copies it freed are dropped
    /// (every replica holds their objects; a later snapshot fetches what it needs,
    /// [`Maintainer::fetch_missing_chain`]) and the caller forgets them
    /// ([`forget_dropped`]).
    #[allow(clippy::too_many_arguments)]
    fn merge_and_upload(
        &self,
        db: &Path,
        level: u8,
        (min, max): (u64, u64),
        inputs: &[&Kept],
        dropped_after: &[bool],
        snapshot: bool,
        record: Option<super::record::ChecksumRecord>,
    ) -> ReplicaResult<Kept> {
        let dir = self.copies.kept_dir(db, level)?;
        std::fs::create_dir_all(&dir)?;
        let out = dir.join(ltx_object_name(min, max));
        let paths: Vec<&Path> = inputs.iter().map(|k| k.path.as_path()).collect();
        let drop_consumed = |e: ReplicaError| {
            // A freed copy's header went with its first bytes.
            let gone: Vec<&&Path> = paths
                .iter()
                .zip(dropped_after)
                .filter(|(p, c)| **c && read_header(p).is_err())
                .map(|(p, _)| p)
                .collect();
            if !gone.is_empty() {
                tracing::warn!(db = %db.display(), level, min, max, "a failed merge freed {} local copies: they are dropped (the replica holds them)", gone.len());
                for p in gone {
                    if let Err(e) = self.copies.drop_kept(p) {
                        tracing::warn!(db = %db.display(), "cannot drop a local copy: {e}");
                    }
                }
            }
            e
        };
        let header =
            merge_ltx_consuming(&paths, dropped_after, &out, snapshot).map_err(drop_consumed)?;
        let ts = ms_to_time(header.timestamp_ms);
        let key = db.to_string_lossy();
        let sent = (|| -> ReplicaResult<()> {
            for replica in &self.replicas {
                let meta = record
                    .filter(|_| replica.holds_records())
                    .map(|r| r.encode().trim().to_string());
                self.runtime.block_on(replica.put_ltx_file(
                    &key,
                    level,
                    (min, max),
                    &out,
                    ts,
                    meta,
                ))?;
                // A file replica's record of `max` was written with the level-0 upload;
                // write it again in case that one is gone.
                if let Some(r) = record.filter(|_| !replica.holds_records()) {
                    let sidecar = SidecarStore::new(replica.clone());
                    self.runtime
                        .block_on(sidecar.put_checksum_record(&key, &r))?;
                }
            }
            Ok(())
        })();
        if let Err(e) = sent {
            let _ = self.copies.drop_kept(&out);
            return Err(drop_consumed(e));
        }
        self.copies
            .keep(db, level, (min, max), KeepSource::File(&out), record)
            .map_err(|e| drop_consumed(e.into()))
    }

    /// Builds and uploads a snapshot when one is due and the database changed since the
    /// last; returns when the next one is due.
    fn maybe_snapshot(&self, db: &Path, view: &mut DbView, now: SystemTime) -> Option<SystemTime> {
        let due = view.snapshot_at + self.opts.snapshot_interval;
        // Without a local snapshot, or with a local copy missing after it (one that could
        // not be kept), the missing objects are fetched once; else snapshots would stop
        // advancing and retention with them.
        let local_max = view
            .local
            .keys()
            .filter(|o| o.level < SNAPSHOTS)
            .map(|o| o.max)
            .max();
        // A history that starts at TXID 1 without a snapshot (a database that was empty
        // when capture began) is its own base: its first object applies to nothing.
        let reach = {
            let objs = view.below_snapshots();
            let from = view.latest_snapshot().map(|snap| snap.max_txid);
            snapshot_chain(&objs, from.unwrap_or(0))
                .last()
                .map(|o| o.max)
                .or(from)
        };
        if local_max.is_some_and(|m| reach.is_none_or(|r| r < m)) {
            if due > now {
                return Some(due);
            }
            match self.fetch_missing_chain(db, view) {
                Ok(n) => tracing::info!(
                    db = %db.display(),
                    objects = n,
                    "local copies missing: fetched the newest snapshot or the objects after it"
                ),
                Err(e) => {
                    tracing::warn!(db = %db.display(), "cannot fetch a snapshot to build on: {e:#}; retrying");
                    view.retry_at = Some(Instant::now() + RETRY);
                    return Some(now + RETRY);
                }
            }
        }
        let snap = view.latest_snapshot().cloned();
        // (Again: fetching may have added copies.)
        let objs = view.below_snapshots();
        let chain = snapshot_chain(&objs, snap.as_ref().map_or(0, |s| s.max_txid));
        if chain.is_empty() {
            return None;
        }
        if due > now {
            return Some(due);
        }
        let mut inputs: Vec<&Kept> = snap.iter().collect();
        inputs.extend(chain.iter().map(|o| &view.local[o]));
        let max = chain[chain.len() - 1].max;
        let record = inputs[inputs.len() - 1].record;
        // What [`Maintainer::clean_local`] drops once the new snapshot is kept.
        let mut local: Vec<ObjId> = view.local.keys().copied().collect();
        local.push(ObjId::new(SNAPSHOTS, 1, max));
        let dropped_after: Vec<bool> = inputs
            .iter()
            .map(|k| self.dropped_by_snapshot(view, &local, max, &id_of(k)))
            .collect();
        let made = self.merge_and_upload(
            db,
            SNAPSHOTS,
            (1, max),
            &inputs,
            &dropped_after,
            true,
            record,
        );
        match made {
            Ok(kept) => {
                self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                tracing::info!(db = %db.display(), txid = max, "snapshot taken");
                view.snapshot_at = now;
                view.add_remote(id_of(&kept), ms_to_time(kept.timestamp_ms));
                view.local.insert(id_of(&kept), kept);
                None
            }
            Err(e) => {
                if !e.is_fenced() {
                    tracing::warn!(db = %db.display(), "snapshot failed: {e:#}; retrying");
                }
                forget_dropped(view);
                view.retry_at = Some(Instant::now() + RETRY);
                Some(now + RETRY)
            }
        }
    }

    /// Drops the local copies no longer needed: older snapshots than the latest, and
    /// top-level objects the latest snapshot covers (lower levels go once compacted, or
    /// when they are a whole image, min TXID 1, that the snapshot repeats).
    fn clean_local(&self, db: &Path, view: &mut DbView) {
        let Some(snap) = view.latest_snapshot().map(id_of) else {
            return;
        };
        let local: Vec<ObjId> = view.local.keys().copied().collect();
        let gone: Vec<ObjId> = view
            .local
            .keys()
            .filter(|o| self.dropped_by_snapshot(view, &local, snap.max, o))
            .copied()
            .collect();
        for o in gone {
            if let Some(k) = view.local.remove(&o) {
                if let Err(e) = self.copies.drop_kept(&k.path) {
                    tracing::warn!(db = %db.display(), "cannot drop a local copy: {e}");
                }
            }
        }
    }

    /// Whether the copy of `o` is no longer needed once the snapshot up to `snap_max` is
    /// the latest (`local`: every copy, that snapshot's included): an older snapshot, a
    /// whole image it repeats, or a top-level object it covers (lower levels go once
    /// compacted).
    fn dropped_by_snapshot(
        &self,
        view: &DbView,
        local: &[ObjId],
        snap_max: u64,
        o: &ObjId,
    ) -> bool {
        let top = view.top_level(self.opts.compaction_intervals.len());
        (o.level == SNAPSHOTS && o.max < snap_max)
            || superseded_by_snapshot(local, o)
            || (o.level < SNAPSHOTS
                && o.max <= snap_max
                && (o.level == top || o.max <= self.done(view, o.level + 1)))
    }

    /// Lists what each replica holds of `db`, once per mount.
    fn ensure_listed(&self, db: &Path, view: &mut DbView) -> ReplicaResult<()> {
        if view.remote.is_some() {
            return Ok(());
        }
        let key = db.to_string_lossy();
        let mut all = Vec::new();
        for replica in &self.replicas {
            let listed = self.runtime.block_on(replica.list_db_ltx(&key))?;
            let mut m: BTreeMap<ObjId, SystemTime> = listed
                .into_iter()
                .map(|o| (ObjId::new(o.level, o.min_txid, o.max_txid), o.timestamp))
                .collect();
            m.extend(view.unlisted.iter().map(|(o, t)| (*o, *t)));
            all.push(m);
        }
        view.unlisted.clear();
        view.remote = Some(all);
        Ok(())
    }

    /// Fetches from the first replica the newest snapshot and the objects after it that
    /// walfs holds no local copy of (a staging written before maintenance existed, or one
    /// that lost them), so that snapshots can be built. Returns how many it fetched.
    fn fetch_missing_chain(&self, db: &Path, view: &mut DbView) -> ReplicaResult<usize> {
        self.ensure_listed(db, view)?;
        let Some(replica) = self.replicas.first() else {
            return Ok(0);
        };
        let remote = &view.remote.as_ref().expect("listed above")[0];
        let all: std::collections::BTreeSet<ObjId> =
            view.local.keys().chain(remote.keys()).copied().collect();
        let Some(snap) = all
            .iter()
            .filter(|o| o.level == SNAPSHOTS && o.min == 1)
            .max_by_key(|o| o.max)
            .copied()
        else {
            return Ok(0);
        };
        let objs: Vec<ObjId> = all
            .iter()
            .filter(|o| o.level < SNAPSHOTS)
            .copied()
            .collect();
        let key = db.to_string_lossy();
        let sidecar = SidecarStore::new(replica.clone());
        let mut fetched = 0;
        for o in std::iter::once(snap).chain(snapshot_chain(&objs, snap.max)) {
            if view.local.contains_key(&o) {
                continue;
            }
            let bytes = self
                .runtime
                .block_on(replica.get_ltx(&key, o.level, o.min, o.max))?;
            let info = super::store::LtxObjectInfo {
                level: o.level,
                min_txid: o.min,
                max_txid: o.max,
                size: bytes.len() as u64,
                timestamp: SystemTime::now(),
                key: replica.ltx_key(&key, o.level, o.min, o.max),
            };
            let record = self
                .runtime
                .block_on(sidecar.get_checksum_record(&key, o.max, Some(&info)))?
                .map(|(r, _)| r);
            let kept = self.copies.keep(
                db,
                o.level,
                (o.min, o.max),
                KeepSource::Bytes(&bytes),
                record,
            )?;
            view.local.insert(o, kept);
            fetched += 1;
        }
        Ok(fetched)
    }

    /// Deletes from every replica what retention no longer needs; returns when the next
    /// object expires.
    fn retention(
        &self,
        db: &Path,
        view: &mut DbView,
        now: SystemTime,
    ) -> ReplicaResult<Option<SystemTime>> {
        if !view.changed && view.retention_at.is_none_or(|t| t > now) {
            return Ok(view.retention_at);
        }
        let key = db.to_string_lossy();
        self.ensure_listed(db, view)?;
        let policy = RetentionPolicy {
            retention: self.opts.retention,
            l0_retention: self.opts.l0_retention,
        };
        let mut next: Option<SystemTime> = None;
        let remote = view.remote.as_mut().expect("listed above");
        for (replica, objects) in self.replicas.iter().zip(remote.iter_mut()) {
            let (delete, due) = plan_retention(objects, now, policy);
            for o in &delete {
                self.runtime
                    .block_on(replica.delete_ltx(&key, o.level, o.min, o.max))?;
                objects.remove(o);
                self.stats
                    .retention_deletions
                    .fetch_add(1, Ordering::Relaxed);
                // A file replica's record goes with the last object that ends at its TXID.
                if !replica.holds_records() && !objects.keys().any(|x| x.max == o.max) {
                    let sidecar = SidecarStore::new(replica.clone());
                    self.runtime
                        .block_on(replica.delete_object(&sidecar.record_key(&key, o.max)))?;
                }
            }
            if !delete.is_empty() {
                tracing::debug!(db = %db.display(), deleted = delete.len(), "retention");
            }
            if let Some(t) = due {
                next = Some(next.map_or(t, |n: SystemTime| n.min(t)));
            }
        }
        view.changed = false;
        view.retention_at = next;
        Ok(next)
    }
}

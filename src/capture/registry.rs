//! The registry of one mount's captures, keyed by path relative to the backing root: it
//! recognises databases by their header, routes each barrier to its database's capture,
//! and tells the uploader which databases have something new.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::eventfd::EventFd;
use parking_lot::Mutex;

use super::barrier::{Barrier, Step};
use super::{
    database_of, wal_path, CaptureError, CaptureEvent, CaptureResult, DatabaseCapture, RestartKind,
};
use crate::staging::{Staging, StagingResult};

/// Counters of one mount's capture.
#[derive(Debug, Default)]
pub struct CaptureStats {
    /// Batches and snapshots staged.
    pub staged: AtomicU64,
    /// Snapshots that restarted a database's history (a possible gap, or a state capture
    /// could not follow).
    pub heals: AtomicU64,
    /// Breaks after which a database waited for a consistent point to restart.
    pub waits: AtomicU64,
    /// Barriers at which staging could not make the transactions durable (each restarts
    /// its database's history from a snapshot; only a synchronous database with
    /// `--sync-timeout-action eio` returns EIO for it).
    pub failures: AtomicU64,
    /// Databases resumed from the checksums a clean stop saved, without reading them.
    pub quick_resumes: AtomicU64,
    /// Databases whose pending transactions were collapsed into one snapshot because
    /// staging passed `--max-staging` while the replica was behind (`budget.rs`).
    pub collapses: AtomicU64,
    /// Restarts of a database's history from a snapshot, by [`RestartKind`] (its index).
    pub restarts: [AtomicU64; 3],
}

type Slot = Arc<Mutex<Option<DatabaseCapture>>>;

/// Called when a database has something new staged (to wake the uploader).
pub type StagedNotify = Box<dyn Fn() + Send + Sync>;

/// The captures of one mount, keyed by path relative to the backing root.
pub struct Capture {
    pub(super) root: PathBuf,
    pub(super) staging: Arc<Staging>,
    pub(super) dbs: Mutex<HashMap<PathBuf, Slot>>,
    /// Databases with batches staged since they were last sealed.
    pub(super) dirty: Mutex<BTreeSet<PathBuf>>,
    pub(super) notify: Mutex<Option<StagedNotify>>,
    /// Databases whose history waits to restart from a snapshot (see
    /// [`Capture::retry_restarts`]).
    pub(super) restarting: Mutex<BTreeSet<PathBuf>>,
    /// When [`Capture::retry_restarts`] last logged a staging failure (at most once a
    /// minute: it retries every round).
    pub(super) retry_logged: Mutex<Option<Instant>>,
    /// Databases whose file went away (deleted, renamed over, no longer SQLite): when one
    /// is captured again, a changed content is a replacement, not a gap.
    pub(super) forgotten: Mutex<BTreeSet<PathBuf>>,
    /// Incremented whenever a database starts being captured.
    pub(super) generation: AtomicU64,
    pub(super) stats: CaptureStats,
    /// Databases whose `-wal` was fsynced outside a barrier, for the WAL watcher to read
    /// now; `wake` tells it (set when the watcher starts).
    pub(super) synced_wals: Mutex<BTreeSet<PathBuf>>,
    pub(super) wake: OnceLock<WatcherWake>,
    /// Databases whose `-wal` was fsynced outside a barrier since the last barrier on their
    /// files (see [`Capture::fsync_follows`]).
    pub(super) checkpointing: Mutex<BTreeSet<PathBuf>>,
    /// See [`Capture::set_hold_pages`].
    pub(super) hold_pages: AtomicBool,
    /// The last seal of a database failed (see [`Capture::retry_seals`]).
    seal_failing: AtomicBool,
    /// When [`Capture::retry_restarts`] last tried to start captures that could not start.
    last_open_retry: Mutex<Option<Instant>>,
}

/// How often a database whose capture could not start (staging failed) is tried again.
const OPEN_RETRY: Duration = Duration::from_secs(2);

/// How [`Capture::wal_synced`] wakes the WAL watcher: at most once per `interval`.
pub(crate) struct WatcherWake {
    pub fd: Arc<EventFd>,
    pub interval: Duration,
    pub last: Mutex<Option<Instant>>,
}

impl Capture {
    /// A registry for the mount whose backing root is `root`, staging into `staging`.
    pub fn new(root: impl Into<PathBuf>, staging: Arc<Staging>) -> Capture {
        Capture {
            root: root.into(),
            staging,
            dbs: Mutex::new(HashMap::new()),
            dirty: Mutex::new(BTreeSet::new()),
            notify: Mutex::new(None),
            restarting: Mutex::new(BTreeSet::new()),
            retry_logged: Mutex::new(None),
            forgotten: Mutex::new(BTreeSet::new()),
            generation: AtomicU64::new(0),
            stats: CaptureStats::default(),
            synced_wals: Mutex::new(BTreeSet::new()),
            wake: OnceLock::new(),
            checkpointing: Mutex::new(BTreeSet::new()),
            hold_pages: AtomicBool::new(true),
            seal_failing: AtomicBool::new(false),
            last_open_retry: Mutex::new(None),
        }
    }

    /// Whether WAL batches are held in memory between uploads (the default), so that a
    /// page changed by many batches is staged once per upload; off, each batch is written
    /// with its pages (for a sync interval of 0, where every batch is uploaded alone).
    /// Applies to databases captured from now on.
    pub fn set_hold_pages(&self, on: bool) {
        self.hold_pages.store(on, Ordering::Relaxed);
    }

    /// Sets how to wake the WAL watcher (see [`Capture::wal_synced`]).
    pub(crate) fn set_wake(&self, wake: WatcherWake) {
        let _ = self.wake.set(wake);
    }

    /// The `-wal` of `db` was fsynced outside a barrier: a checkpoint's first step, or a
    /// commit with `synchronous=FULL`. Wakes the WAL watcher to read it now, beside the
    /// checkpoint's backfill, so that the barrier that ends the checkpoint finds little
    /// left to read while the application waits. At most once per coalescing window:
    /// waking the watcher at every `synchronous=FULL` commit cost that writer 40%.
    pub fn wal_synced(&self, db: &Path) {
        {
            let mut checkpointing = self.checkpointing.lock();
            if !checkpointing.contains(db) {
                checkpointing.insert(db.to_path_buf());
            }
        }
        let Some(wake) = self.wake.get() else {
            return;
        };
        {
            let now = Instant::now();
            let mut last = wake.last.lock();
            if last.is_some_and(|t| now.duration_since(t) < wake.interval) {
                return;
            }
            *last = Some(now);
        }
        self.synced_wals.lock().insert(db.to_path_buf());
        let _ = wake.fd.write(1);
    }

    /// Whether the `-wal` of `db` was fsynced outside a barrier since the last barrier on
    /// its files: with `synchronous=NORMAL` or `FULL` a checkpoint fsyncs the `-wal` first
    /// and ends with a database fsync, which is then still to come.
    pub fn fsync_follows(&self, db: &Path) -> bool {
        self.checkpointing.lock().contains(db)
    }

    /// Takes the databases passed to [`Capture::wal_synced`] since the last call.
    pub(crate) fn take_synced_wals(&self) -> BTreeSet<PathBuf> {
        std::mem::take(&mut *self.synced_wals.lock())
    }

    /// Changes whenever a database starts being captured.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The backing root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Sets what to call when a database has something new staged.
    pub fn set_notify(&self, notify: StagedNotify) {
        *self.notify.lock() = Some(notify);
    }

    /// Takes the databases with something staged since the last call, and seals what each
    /// has staged (durable, ready for upload). A database whose seal fails stays in the set,
    /// its batches stay staged, and [`Capture::retry_seals`] wakes the uploader again for
    /// it; the failure is logged once until a seal works again.
    pub fn take_staged(&self) -> Vec<PathBuf> {
        let dirty = std::mem::take(&mut *self.dirty.lock());
        let mut out = Vec::with_capacity(dirty.len());
        let mut failed = false;
        for db in dirty {
            match self.seal(&db) {
                Ok(()) => out.push(db),
                Err(e) => {
                    if !self.seal_failing.swap(true, Ordering::Relaxed) {
                        tracing::error!(db = %db.display(), "cannot seal staged batches for upload: {e}; retrying (said once until it works)");
                    }
                    failed = true;
                    self.dirty.lock().insert(db);
                }
            }
        }
        if !failed && self.seal_failing.swap(false, Ordering::Relaxed) {
            tracing::info!("staged batches seal again; their upload resumes");
        }
        out
    }

    /// After a failed seal (a full staging disk), wakes the uploader so that the next round
    /// seals again: a database already waiting to be sealed is not announced again by
    /// new commits, and may have none. Called by the WAL watcher every tick.
    pub fn retry_seals(&self) {
        if self.seal_failing.load(Ordering::Relaxed) && !self.dirty.lock().is_empty() {
            if let Some(n) = self.notify.lock().as_ref() {
                n();
            }
        }
    }

    /// Seals the active segment of `db`, if it is captured.
    pub(super) fn seal(&self, db: &Path) -> StagingResult<()> {
        match self.slot(db, false) {
            Some(slot) => match slot.lock().as_mut() {
                Some(c) => c.seal(),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// After a start: every database with something staged that the replica may not hold
    /// is handed to the uploader at once, without waiting for a write. For a database that
    /// is not captured (its file is gone, or is not a database now), what it staged is
    /// sealed as it is; a file that is gone is marked deleted after its last staged TXID.
    pub fn resume_uploads(&self) {
        let staged = match self.staging.databases() {
            Ok(dbs) => dbs,
            Err(e) => {
                tracing::error!("cannot list the staged databases: {e}");
                return;
            }
        };
        for db in staged {
            let pending = match self.slot(&db, false) {
                Some(slot) => match slot.lock().as_ref() {
                    Some(c) => Ok(c.has_unsealed()),
                    None => self.seal_leftovers(&db),
                },
                None => self.seal_leftovers(&db),
            };
            match pending {
                Ok(true) => self.mark_staged(&db),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(db = %db.display(), "cannot seal what a previous run staged: {e}")
                }
            }
        }
    }

    /// Seals what an uncaptured database left in its active segment (page lists whose
    /// pages were held by a stopped process are cut: the files no longer hold them), and
    /// marks a database whose file is gone as deleted. True if it has anything to upload.
    fn seal_leftovers(&self, db: &Path) -> StagingResult<bool> {
        let mut segment = self.staging.open_segment(db)?;
        segment.abandon_listed()?;
        let sealed = segment.seal()?.is_some();
        let gone = !self.root.join(db).exists();
        if gone && self.staging.deleted_marker(db)?.is_none() {
            if let Some(txid) = self.staging.last_staged_txid(db)? {
                self.staging.mark_deleted(db, txid)?;
            }
        }
        Ok(sealed || !self.staging.pending(db)?.is_empty() || gone)
    }

    /// Restarts the history of `db` from a snapshot (now, or at its next consistent
    /// point), e.g. because what it staged can no longer be uploaded. False if `db` is not
    /// a database that can be captured now.
    pub fn restart_history(&self, db: &Path, reason: &str) -> bool {
        let reason = reason.to_string();
        let step = Step {
            registers: true,
            ..Step::BACKGROUND
        };
        let res = self.with_db(db, step, |c| {
            let mut events = Vec::new();
            c.begin_restart(reason, RestartKind::Upload, false, &mut events)?;
            Ok(events)
        });
        if let Err(e) = res {
            tracing::error!(db = %db.display(), "cannot stage a snapshot to restart the history: {e}");
        }
        self.is_captured(db)
    }

    /// Marks the history of `db` (if captured) to restart from a snapshot at a later step,
    /// without staging anything now (staging just failed). A database that is not captured
    /// (its capture could not start: staging failed) is started by
    /// [`Capture::retry_restarts`] instead.
    pub fn defer_restart(&self, db: &Path, reason: &str) {
        if let Some(slot) = self.slot(db, false) {
            if let Some(c) = slot.lock().as_mut() {
                c.defer_restart(reason.to_string(), RestartKind::Staging);
            }
        }
        self.note_restart(db, true);
    }

    /// Tries again the snapshots of databases whose history waits to restart (each at most
    /// every half second), so that a database restarts without waiting for a write, and
    /// starts the captures that could not start (every `OPEN_RETRY`, 2 s).
    pub fn retry_restarts(&self) {
        let waiting: Vec<PathBuf> = self.restarting.lock().iter().cloned().collect();
        let open_due = {
            let mut last = self.last_open_retry.lock();
            let due = last.is_none_or(|t| t.elapsed() >= OPEN_RETRY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        for db in waiting {
            // One whose capture could not start is started (registered) now, at most
            // every OPEN_RETRY: starting reads the whole database.
            let registers = !self.is_captured(&db);
            if registers && !open_due {
                continue;
            }
            let step = Step {
                registers,
                ..Step::BACKGROUND
            };
            let res = self.with_db(&db, step, |_| Ok(Vec::new()));
            if res.is_ok() && !self.is_captured(&db) {
                // Gone, or not a database now.
                self.note_restart(&db, false);
                continue;
            }
            if let Err(e) = res {
                let mut logged = self.retry_logged.lock();
                if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    *logged = Some(Instant::now());
                    tracing::warn!(db = %db.display(), "cannot stage the snapshot that restarts the history (retrying; said at most once a minute): {e}");
                }
            }
        }
    }

    /// A clean stop: seals every captured database.
    pub fn close_all(&self) {
        for db in self.databases() {
            let Some(slot) = self.slot(&db, false) else {
                continue;
            };
            let mut guard = slot.lock();
            if let Some(c) = guard.as_mut() {
                if let Err(e) = c.close() {
                    tracing::warn!(db = %db.display(), "cannot seal staged batches at stop: {e}");
                }
            }
        }
    }

    /// Reads every captured database's `-wal` once more (before an unmount's final flush).
    pub fn poll_all(&self) {
        for db in self.databases() {
            // A history waiting to restart tries its snapshot now, however recently it
            // tried: this is its last chance before the stop.
            if let Some(slot) = self.slot(&db, false) {
                if let Some(c) = slot.lock().as_mut() {
                    c.retry_restart_now();
                }
            }
            if let Err(e) = self.on(&wal_path(&db), Barrier::WalChanged) {
                tracing::error!(db = %db.display(), "final capture failed: {e}");
            }
            // Changes without a journal (MEMORY, OFF) not yet seen at a close.
            if let Err(e) = self.on(&db, Barrier::DbClosed) {
                tracing::error!(db = %db.display(), "final capture failed: {e}");
            }
        }
    }

    fn mark_staged(&self, db: &Path) {
        let first = self.dirty.lock().insert(db.to_path_buf());
        if first {
            if let Some(n) = self.notify.lock().as_ref() {
                n();
            }
        }
    }

    /// The staging area.
    pub fn staging(&self) -> &Arc<Staging> {
        &self.staging
    }

    /// The counters.
    pub fn stats(&self) -> &CaptureStats {
        &self.stats
    }

    /// The databases captured now.
    pub fn databases(&self) -> Vec<PathBuf> {
        // The slots are looked at after the registry's lock is released: a slot is held
        // for a whole capture step, and the registry must not wait for one.
        let slots: Vec<(PathBuf, Slot)> = self
            .dbs
            .lock()
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        let mut v: Vec<PathBuf> = slots
            .into_iter()
            .filter(|(_, s)| s.lock().is_some())
            .map(|(k, _)| k)
            .collect();
        v.sort();
        v
    }

    /// Whether `slot` is still the registry's slot of `db` (it is removed when the
    /// database goes; a step that waited for it must then look again).
    fn is_current(&self, db: &Path, slot: &Slot) -> bool {
        self.dbs
            .lock()
            .get(db)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
    }

    /// The last TXID staged for `db`, if it is captured (0: nothing staged yet).
    pub fn staged_txid(&self, db: &Path) -> Option<u64> {
        self.slot(db, false)
            .and_then(|s| s.lock().as_ref().map(|c| c.state().txid))
    }

    /// Whether `db` (relative) is being captured.
    pub fn is_captured(&self, db: &Path) -> bool {
        self.slot(db, false).is_some_and(|s| s.lock().is_some())
    }

    pub(super) fn slot(&self, db: &Path, create: bool) -> Option<Slot> {
        let mut dbs = self.dbs.lock();
        if let Some(s) = dbs.get(db) {
            return Some(s.clone());
        }
        if !create {
            return None;
        }
        let s: Slot = Arc::new(Mutex::new(None));
        dbs.insert(db.to_path_buf(), s.clone());
        Some(s)
    }

    /// Runs the capture step `f` on the database that `rel` belongs to (see
    /// [`DatabaseCapture::step`]) as `step` says, registering it first if the step
    /// registers and its file holds an SQLite header. Files of other kinds cost one
    /// 100-byte read. Only a staging failure is
    /// returned; the caller decides what the application sees.
    pub(super) fn with_db(
        &self,
        rel: &Path,
        step: Step,
        f: impl FnOnce(&mut DatabaseCapture) -> CaptureResult<Vec<CaptureEvent>>,
    ) -> StagingResult<Vec<CaptureEvent>> {
        let Some((db, _)) = database_of(rel) else {
            return Ok(Vec::new());
        };
        if !step.registers && !self.is_captured(&db) {
            return Ok(Vec::new());
        }
        // Two captures of one database must never exist: a slot that was removed while this
        // step waited for it (the database was deleted, and maybe registered again) is
        // looked up again.
        let mut f = Some(f);
        loop {
            let Some(slot) = self.slot(&db, false).or_else(|| {
                if super::is_database(&self.root.join(&db)) {
                    self.slot(&db, true)
                } else {
                    None
                }
            }) else {
                return Ok(Vec::new());
            };
            let mut guard = slot.lock();
            // Two captures of one database must never exist: a slot removed while this
            // step waited for it (the database went, and may have been registered again
            // since) is looked up again. Slots are removed only under their own lock.
            if !self.is_current(&db, &slot) {
                continue;
            }
            let f = f.take().expect("one step per call");
            let mut events = Vec::new();
            let mut removed = false;
            let res = (|| {
                if guard.is_none() {
                    let replaced = self.forgotten.lock().remove(&db);
                    let (c, ev) = DatabaseCapture::open(
                        self.staging.clone(),
                        &db,
                        &self.root.join(&db),
                        step.blocks_application,
                        replaced,
                        self.hold_pages.load(Ordering::Relaxed),
                    )?;
                    events.extend(ev);
                    if c.resumed_without_reading {
                        self.stats.quick_resumes.fetch_add(1, Ordering::Relaxed);
                    }
                    *guard = Some(c);
                    self.generation.fetch_add(1, Ordering::Relaxed);
                }
                let c = guard.as_mut().expect("capture was just opened");
                let stepped = c.step(step, &mut events, f);
                self.note_restart(&db, c.waits_for_restart());
                stepped?;
                if let Some(CaptureEvent::Gone { txid }) = events.last() {
                    let txid = *txid;
                    if let Some(mut c) = guard.take() {
                        removed = true;
                        c.seal()?;
                    }
                    if txid > 0 {
                        self.staging.mark_deleted(&db, txid)?;
                    }
                }
                Ok(())
            })();
            if removed {
                self.remove_slot(&db, &slot);
                self.forgotten.lock().insert(db.clone());
            }
            drop(guard);
            self.account(&db, &events);
            // A failed step may have staged part of its work.
            if res.is_err()
                || events.iter().any(|e| {
                    matches!(
                        e,
                        CaptureEvent::Staged { .. }
                            | CaptureEvent::Healed { .. }
                            | CaptureEvent::Gone { .. }
                    )
                })
            {
                self.mark_staged(&db);
            }
            return res.map(|()| events);
        }
    }

    /// Keeps the set of databases waiting to restart up to date.
    fn note_restart(&self, db: &Path, waiting: bool) {
        let mut set = self.restarting.lock();
        if waiting {
            if !set.contains(db) {
                set.insert(db.to_path_buf());
            }
        } else if !set.is_empty() {
            set.remove(db);
        }
    }

    fn account(&self, db: &Path, events: &[CaptureEvent]) {
        for e in events {
            match e {
                CaptureEvent::Staged { .. } => {
                    self.stats.staged.fetch_add(1, Ordering::Relaxed);
                }
                CaptureEvent::Healed {
                    txid,
                    reason,
                    waited,
                    kind,
                } => {
                    self.stats.staged.fetch_add(1, Ordering::Relaxed);
                    self.stats.heals.fetch_add(1, Ordering::Relaxed);
                    self.stats.restarts[*kind as usize].fetch_add(1, Ordering::Relaxed);
                    if *waited {
                        tracing::info!(db = %db.display(), txid, "capture restarted the history with a snapshot: {reason}");
                    } else {
                        tracing::warn!(db = %db.display(), txid, "capture healed with a snapshot: {reason}");
                    }
                }
                CaptureEvent::Waiting { reason } => {
                    self.stats.waits.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(db = %db.display(), "capture cannot follow the database ({reason}); its replica restarts from a snapshot at the next consistent point");
                }
                CaptureEvent::Gone { txid } => {
                    tracing::info!(db = %db.display(), txid, "the file is no longer an SQLite database; the replica keeps its history and marks it deleted");
                }
            }
        }
    }

    /// Catches up with the database that `rel` (a database file or its `-wal`, or the
    /// database of a `-journal`) belongs to at `barrier`: the one place where barriers
    /// are dispatched (see [`Barrier`] for what each one asks). Only a staging failure is
    /// returned; the caller decides what the application sees.
    pub fn on(&self, rel: &Path, barrier: Barrier) -> StagingResult<Vec<CaptureEvent>> {
        if barrier.ends_checkpoint() {
            if let Some((db, _)) = database_of(rel) {
                self.checkpointing.lock().remove(&db);
            }
        }
        self.with_db(rel, barrier.step(), |c| c.on(barrier))
    }

    /// `db` was unlinked or renamed away: what it staged stays for the uploader, and the
    /// replica marks it deleted after its last TXID. Never fails the removal: if staging
    /// cannot seal or record it, it says so, and the next start seals what is left.
    pub fn deleted(&self, db: &Path) {
        let Some(slot) = self.slot(db, false) else {
            return;
        };
        let mut guard = slot.lock();
        if let Some(mut c) = guard.take() {
            let sealed = c.seal().and_then(|()| match c.state().txid {
                0 => Ok(()),
                txid => self.staging.mark_deleted(db, txid).map(drop),
            });
            if let Err(e) = sealed {
                tracing::error!(db = %db.display(), "the database was removed, but staging cannot seal or mark it deleted ({e}); the next start retries");
            }
        }
        self.remove_slot(db, &slot);
        drop(guard);
        self.forgotten.lock().insert(db.to_path_buf());
        self.mark_staged(db);
    }

    /// Removes `slot` from the registry if it is still the slot of `db`. Call it holding
    /// the slot's lock (see [`Capture::with_db`]).
    fn remove_slot(&self, db: &Path, slot: &Slot) {
        let mut dbs = self.dbs.lock();
        if dbs.get(db).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            dbs.remove(db);
        }
        drop(dbs);
        self.note_restart(db, false);
    }

    /// The `-wal` of `db` is about to be removed (its commits were just read): see
    /// [`DatabaseCapture::on_wal_removing`]; then its open file is forgotten.
    pub(super) fn wal_removing(&self, db: &Path) {
        if let Some(slot) = self.slot(db, false) {
            if let Some(c) = slot.lock().as_mut() {
                if let Err(e) = c.on_wal_removing() {
                    let kind = match e {
                        CaptureError::Staging(_) => RestartKind::Staging,
                        _ => RestartKind::Follow,
                    };
                    c.defer_restart(e.to_string(), kind);
                    self.note_restart(db, true);
                }
                c.wal_replaced();
            }
        }
    }

    /// The `-wal` of `db` was created, or is about to be removed: forget its open file.
    pub(super) fn wal_replaced(&self, db: &Path) {
        if let Some(slot) = self.slot(db, false) {
            if let Some(c) = slot.lock().as_mut() {
                c.wal_replaced();
            }
        }
    }

    /// Stops capturing `db` (it was unlinked or renamed away). What it staged is sealed
    /// and stays for the uploader.
    pub fn forget(&self, db: &Path) {
        let Some(slot) = self.slot(db, false) else {
            return;
        };
        let mut guard = slot.lock();
        if let Some(c) = guard.as_mut() {
            if let Err(e) = c.seal() {
                tracing::error!(db = %db.display(), "cannot seal staged batches: {e}");
            }
        }
        self.remove_slot(db, &slot);
    }

    /// Stops capturing `db` because another file is about to replace it (a rename over
    /// it): when the new file is captured, its content continues the same history.
    pub fn replacing(&self, db: &Path) {
        self.forget(db);
        self.forgotten.lock().insert(db.to_path_buf());
    }
}

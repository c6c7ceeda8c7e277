//! The capture of one database file: its WAL tracker, per-page checksums and staging
//! segment, snapshots, the resume after a restart, and the restart of its history when
//! capture cannot follow the files.
//!
//! Every step ([`DatabaseCapture::step`]) either follows the files incrementally or, when
//! they are in a state that capture cannot follow (a [`CaptureError::CannotFollow`]: a new
//! page size, a log of another database, a file that is not a database for a moment,
//! commits that may have been missed), restarts the database's history: what was staged
//! before is made durable, and a snapshot with the next TXID is staged as soon as the files
//! read consistently, at this step or a later one. Until then nothing more is staged for
//! it, and the replica stays at the last TXID staged. The application never sees any of
//! this; only a failure of staging itself ([`CaptureError::Staging`]) leaves a step.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::barrier::{Barrier, Step};
use super::image::{Image, ImageSink, PageSink};
use super::{
    now_ms, open_optional, poll_wal, poll_wal_through, rollback, wal_path, CaptureError,
    CaptureEvent, CaptureResult, RestartKind,
};
use crate::sqlite::{
    lock_byte_page, page_hash, read_full, ContentChecksum, FrameHeader, FrameReader, PageHash,
    WalError, WalEvent, WalPosition, WalTracker, WalTransaction, WAL_FRAME_HEADER_SIZE,
};
use crate::staging::{
    BatchHeader, DbState, PageMerge, SavedSums, SegmentWriter, Staging, StagingResult,
};

/// How often a capture waiting to restart its history tries a snapshot (the first try is
/// at the break itself).
const RESTART_RETRY: Duration = Duration::from_millis(500);

/// The largest `-wal` whose commits a close, or a log that looks rewritten, reads again
/// (see [`DatabaseCapture::on_wal_closed`], [`DatabaseCapture::check_rewritten`]).
const REVALIDATE_LIMIT: u64 = 64 << 20;

/// How long a `-wal` must have been still before a poll that found nothing new looks for
/// frames rewritten behind its read position (a writer may be between a frame's header
/// and its page meanwhile).
const STILL: Duration = Duration::from_millis(20);

/// A `-wal`'s size and times: a write to it changes them.
pub(super) type WalStat = (u64, i64, i64, i64, i64);

fn wal_stat(m: &std::fs::Metadata) -> WalStat {
    use std::os::unix::fs::MetadataExt;
    (
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// What [`DatabaseCapture::read_image`] read.
pub(super) struct ImageRead {
    /// The tracker that read the WAL, at the position the image includes.
    pub tracker: WalTracker,
    pub page_size: u32,
    /// The size in pages.
    pub size: u32,
    /// The image took pages from a live rollback journal: it depends on the journal as
    /// much as on the database file.
    pub from_journal: bool,
    /// The database file's `stat` from before the read: what the image is known to match
    /// (a write racing the read moves the file past it, so a later check compares again).
    pub before: Option<rollback::Fingerprint>,
    /// The pages the image took from the WAL.
    pub log_pages: BTreeSet<u32>,
}

/// A restart of a database's history that waits for a consistent point.
#[derive(Debug, Clone)]
pub(super) struct Restart {
    /// Why capture could not follow the files.
    reason: String,
    /// What asked for the restart.
    kind: RestartKind,
    /// A [`CaptureEvent::Waiting`] was reported for this break.
    warned: bool,
    /// When a snapshot was last tried.
    tried: Option<Instant>,
}

/// The capture of one database file.
pub struct DatabaseCapture {
    pub(super) rel: PathBuf,
    pub(super) db_path: PathBuf,
    pub(super) wal_path: PathBuf,
    pub(super) staging: Arc<Staging>,
    /// The active segment batches are appended to.
    pub(super) segment: SegmentWriter,
    /// The open backing `-wal` (reopened after [`DatabaseCapture::wal_replaced`]).
    pub(super) wal_file: Option<File>,
    /// The inode of the `-wal` the last read found (a new file is a new log).
    pub(super) wal_ino: Option<u64>,
    /// The inode of the `-wal` file commits were last read from (from its log, or from one
    /// it held before a checkpoint truncated or restarted it), by a poll, a snapshot or a
    /// resume. At a barrier on that file the database file holds only checkpointed
    /// frames; a new `-wal` file says nothing of the database file until commits are read
    /// from it.
    pub(super) commits_read_from: Option<u64>,
    pub(super) tracker: WalTracker,
    /// What `stat` said of the `-wal` when it was last checked for frames rewritten
    /// behind the read position (see [`DatabaseCapture::check_rewritten`]).
    pub(super) wal_checked: Option<WalStat>,
    /// What the last poll read of the `-wal`: staged pages are taken from it.
    pub(super) frames: FrameReader,
    pub(super) state: DbState,
    pub(super) saved: Option<DbState>,
    /// The [`page_hash`] of each page (index `pgno - 1`); 0 for the lock page.
    pub(super) sums: Vec<PageHash>,
    /// The backing `-journal`.
    pub(super) journal_path: PathBuf,
    /// Pages the open rollback-journal transaction recorded, read at a database fsync;
    /// staged at the journal's invalidation.
    pub(super) pending: Option<rollback::PendingJournal>,
    /// The backing database file's `stat` when the staged state was last known to match it.
    pub(super) fingerprint: Option<rollback::Fingerprint>,
    /// This capture resumed from checksums saved at a clean stop, without reading the files.
    pub(super) resumed_without_reading: bool,
    /// WAL batches are held in memory and recorded as page lists (see "Held pages" in
    /// [`crate::staging::segment`]) rather than written with their pages.
    pub(super) hold_pages: bool,
    /// Set while the history waits to restart from a snapshot (see the module header).
    pub(super) restart: Option<Restart>,
    /// Set while a rollback journal's invalidation (its commit point) is captured: the
    /// journal may still be there (an unlink is captured before it happens), but it no
    /// longer holds the committed state, the database file does.
    pub(super) journal_committed: bool,
    /// The database file was written without a barrier before the rollback journal
    /// transaction now open began (see [`DatabaseCapture::on_journal_begins`]).
    pub(super) unseen_writes: bool,
    /// The beginning of the rollback journal transaction now open was seen (its journal
    /// created, or synced live). A journal that commits without it (kept from TRUNCATE or
    /// PERSIST mode, reused with `synchronous=OFF`, and unlinked at a switch to DELETE or
    /// WAL mode) lists only its own transaction's pages, not those of the commits made
    /// before it without a barrier.
    pub(super) journal_begin_seen: bool,
    /// The file replaced another (renamed over it) while a `-wal` was beside it: that log
    /// belongs to connections of the old file, whose checkpoints go into the old file.
    /// A restart of it is then no sign that this file holds the log's pages.
    pub(super) foreign_wal: bool,
    /// The pages staged from the log generation being read (after a snapshot or a
    /// resume: the pages the image took from it), or `None` if unknown (a resume without
    /// reading the files). When the log ends, the database file must hold their staged
    /// versions (see [`DatabaseCapture::check_log_checkpointed`]).
    pub(super) log_pages: Option<BTreeSet<u32>>,
}

impl DatabaseCapture {
    /// Starts capturing the database at `db_path` (a backing path), staged under `rel`.
    /// With no saved state, stages an initial snapshot. With a saved state, resumes where it
    /// stopped if the database still matches the saved checksum, and otherwise restarts
    /// the history with a snapshot (`replaced`: the file was replaced while not captured,
    /// e.g. renamed over; then the new content continues the history without a warning).
    /// Call it at a barrier if possible (`at_barrier`). Pages that a stopped capture held
    /// in memory are read back from the files with the state. `hold_pages`: see
    /// [`super::Capture::set_hold_pages`]. Only staging can make it fail: files that cannot
    /// be followed give a capture that waits for a consistent point.
    pub fn open(
        staging: Arc<Staging>,
        rel: &Path,
        db_path: &Path,
        at_barrier: bool,
        replaced: bool,
        hold_pages: bool,
    ) -> StagingResult<(DatabaseCapture, Vec<CaptureEvent>)> {
        let on_disk = staging.state(rel)?;
        // Batches staged after the state was last saved carry their own position.
        let saved = match (on_disk, staging.last_batch(rel)?) {
            (Some(st), Some(b)) if b.header.max_txid > st.txid => Some(DbState {
                txid: b.header.max_txid,
                page_size: b.header.page_size,
                commit: b.header.commit,
                checksum: b.post_checksum,
                wal: b.header.wal,
                uploaded_txid: st.uploaded_txid,
            }),
            (st, _) => st,
        };
        let dropped = staging.recover(rel, saved.map_or(0, |s| s.txid))?;
        if dropped > 0 {
            tracing::info!(
                db = %rel.display(),
                dropped,
                "staged files beyond the last complete batch were dropped; their transactions are read again from the WAL"
            );
        }
        let segment = staging.open_segment(rel)?;
        let mut c = DatabaseCapture {
            rel: rel.to_path_buf(),
            db_path: db_path.to_path_buf(),
            wal_path: wal_path(db_path),
            staging,
            segment,
            wal_file: None,
            wal_ino: None,
            wal_checked: None,
            commits_read_from: None,
            tracker: WalTracker::new(),
            frames: FrameReader::new(),
            state: DbState::default(),
            saved: None,
            sums: Vec::new(),
            journal_path: rollback::journal_path(db_path),
            pending: None,
            fingerprint: None,
            resumed_without_reading: false,
            hold_pages,
            restart: None,
            journal_committed: false,
            unseen_writes: false,
            journal_begin_seen: false,
            foreign_wal: false,
            log_pages: Some(BTreeSet::new()),
        };
        // The database exists (again): a deletion marker not yet uploaded is void.
        c.staging.clear_deleted(rel, None)?;
        let mut events = Vec::new();
        // What a crash left in the segment is made durable before any state that counts
        // it is saved.
        c.segment.sync()?;
        c.foreign_wal = replaced && std::fs::metadata(&c.wal_path).is_ok();
        let started = c.start(saved, on_disk, at_barrier, replaced, &mut events);
        c.settle(started, at_barrier, &mut events)?;
        Ok((c, events))
    }

    /// The first step of [`DatabaseCapture::open`]: the initial snapshot, or the resume
    /// from the state `saved` (`on_disk`: what the state file holds).
    fn start(
        &mut self,
        saved: Option<DbState>,
        on_disk: Option<DbState>,
        at_barrier: bool,
        replaced: bool,
        events: &mut Vec<CaptureEvent>,
    ) -> CaptureResult<()> {
        let Some(st) = saved else {
            // The first snapshot: if the files do not read consistently yet, the capture
            // waits for them (without trying again at once, as `settle` would).
            let e = match self.snapshot_inner(at_barrier, events) {
                Err(e @ (CaptureError::CannotFollow(_) | CaptureError::NoDatabase)) => e,
                other => return other,
            };
            let warned = matches!(e, CaptureError::CannotFollow(_));
            if warned {
                events.push(CaptureEvent::Waiting {
                    reason: e.to_string(),
                });
            }
            self.restart = Some(Restart {
                reason: e.to_string(),
                kind: RestartKind::Follow,
                warned,
                tried: Some(Instant::now()),
            });
            return Ok(());
        };
        self.state = st;
        // What the state file holds, which may be behind `st` (then the next save must
        // write it, or a later start would resume from the older state and hand out TXIDs
        // the replica already has).
        self.saved = on_disk;
        // Held pages can only be read back from the files (`resume`).
        let listed = self.segment.listed_run().map(|r| r.pages.len() as u32);
        let resumed = (listed.is_none() && self.resume_from_saved_sums()?) || self.resume()?;
        // Page lists whose pages could not be read back: the restart covers them.
        self.segment.abandon_listed()?;
        if let (Some(pages), Some((min_txid, max_txid))) = (listed, self.segment.held_txids()) {
            events.push(CaptureEvent::Staged {
                min_txid,
                max_txid,
                pages,
            });
        }
        match (resumed, replaced) {
            (true, _) => Ok(()),
            (false, true) => self.stage_replacement(events),
            (false, false) => Err(CaptureError::CannotFollow(
                "the database changed while it was not being captured".into(),
            )),
        }
    }

    /// Runs one capture step `f` as `step` says, unless the history waits to restart and
    /// the files are still not at a consistent point (see the module header). Only a
    /// staging failure is returned.
    pub(super) fn step(
        &mut self,
        step: Step,
        events: &mut Vec<CaptureEvent>,
        f: impl FnOnce(&mut Self) -> CaptureResult<Vec<CaptureEvent>>,
    ) -> StagingResult<()> {
        let barrier = step.blocks_application;
        if self.restart.is_some() && !self.try_restart(barrier, step.at_close, events)? {
            return Ok(());
        }
        let done = f(self).map(|ev| events.extend(ev));
        let settled = self.settle(done, barrier, events);
        self.journal_committed = false;
        settled
    }

    /// Turns the outcome of a step into what the caller sees: a state capture cannot
    /// follow restarts the history; a staging failure is returned.
    fn settle(
        &mut self,
        done: CaptureResult<()>,
        barrier: bool,
        events: &mut Vec<CaptureEvent>,
    ) -> StagingResult<()> {
        match done {
            Ok(()) => Ok(()),
            Err(CaptureError::Staging(e)) => Err(e),
            Err(e) => self.begin_restart(e.to_string(), RestartKind::Follow, barrier, events),
        }
    }

    /// Capture cannot follow the files (`reason`): what was staged before is made durable,
    /// and the history restarts from a snapshot, now if the files read consistently, else
    /// at a later step ([`DatabaseCapture::try_restart`]).
    pub(super) fn begin_restart(
        &mut self,
        reason: String,
        kind: RestartKind,
        barrier: bool,
        events: &mut Vec<CaptureEvent>,
    ) -> StagingResult<()> {
        if self.restart.is_none() {
            self.restart = Some(Restart {
                reason,
                kind,
                warned: false,
                tried: None,
            });
        }
        self.pending = None;
        self.segment.write_held()?;
        self.segment.sync()?;
        self.try_restart(barrier, false, events).map(drop)
    }

    /// Marks the history to restart from a snapshot at a later step (not before
    /// [`RESTART_RETRY`]: the operation under way must finish first), without staging
    /// anything now.
    pub(super) fn defer_restart(&mut self, reason: String, kind: RestartKind) {
        self.pending = None;
        if self.restart.is_none() {
            self.restart = Some(Restart {
                reason,
                kind,
                warned: false,
                tried: Some(Instant::now()),
            });
        }
    }

    /// Lets the next step try the restart's snapshot however recently it was tried.
    pub(super) fn retry_restart_now(&mut self) {
        if let Some(r) = &mut self.restart {
            r.tried = None;
        }
    }

    /// Whether the history waits to restart from a snapshot.
    pub fn waits_for_restart(&self) -> bool {
        self.restart.is_some()
    }

    /// Tries the snapshot that restarts the history (at most every [`RESTART_RETRY`]).
    /// True once it is taken; false while the files are not at a consistent point. A
    /// writer that closes a file that is no longer a database ends the capture
    /// ([`CaptureEvent::Gone`]).
    pub(super) fn try_restart(
        &mut self,
        barrier: bool,
        at_close: bool,
        events: &mut Vec<CaptureEvent>,
    ) -> StagingResult<bool> {
        if self.restart.is_none() {
            return Ok(true);
        }
        if at_close && !self.is_database() {
            events.push(CaptureEvent::Gone {
                txid: self.state.txid,
            });
            return Ok(false);
        }
        let r = self.restart.as_mut().expect("a restart is pending");
        if r.tried.is_some_and(|t| t.elapsed() < RESTART_RETRY) {
            return Ok(false);
        }
        r.tried = Some(Instant::now());
        match self.snapshot_inner(barrier, events) {
            Ok(()) => {
                let r = self.restart.take().expect("a restart was pending");
                events.push(CaptureEvent::Healed {
                    txid: self.state.txid,
                    reason: r.reason,
                    waited: r.warned,
                    kind: r.kind,
                });
                Ok(true)
            }
            Err(CaptureError::Staging(e)) => Err(e),
            // Not replicated until it is a database again; a close ends the capture.
            Err(CaptureError::NoDatabase) => Ok(false),
            Err(CaptureError::CannotFollow(why)) => {
                let r = self.restart.as_mut().expect("a restart was pending");
                if !r.warned {
                    r.warned = true;
                    let reason = match why == r.reason {
                        true => why,
                        false => format!("{}; the files do not read consistently: {why}", r.reason),
                    };
                    events.push(CaptureEvent::Waiting { reason });
                }
                Ok(false)
            }
        }
    }

    /// Whether the database file has an SQLite header now.
    fn is_database(&self) -> bool {
        super::is_database(&self.db_path)
    }

    /// The path relative to the backing root (the staging key).
    pub fn relative_path(&self) -> &Path {
        &self.rel
    }

    /// What has been staged so far.
    pub fn state(&self) -> &DbState {
        &self.state
    }

    /// The content checksum after the last staged TXID.
    pub fn checksum(&self) -> ContentChecksum {
        self.state.checksum
    }

    /// Catches up at `barrier`: the one place where a database's capture dispatches its
    /// barriers (see [`Barrier`]).
    pub fn on(&mut self, barrier: Barrier) -> CaptureResult<Vec<CaptureEvent>> {
        match barrier {
            Barrier::WalCatchUp => self.on_wal_barrier(false),
            Barrier::WalDurable => self.on_wal_barrier(true),
            Barrier::DbSyncing => self.on_db_syncing(),
            Barrier::DbSynced => self.on_db_synced(),
            Barrier::DbResized => self.on_db_changed(false),
            Barrier::DbClosed => self.on_db_changed(true),
            Barrier::Journal(j) => self.on_journal(j),
            Barrier::JournalCreated => {
                self.on_journal_begins();
                Ok(Vec::new())
            }
            Barrier::JournalClosed => {
                self.on_journal_closed();
                Ok(Vec::new())
            }
            Barrier::WalClosed => self.on_wal_closed(),
            Barrier::WalChanged => self.on_wal_changed(),
        }
    }

    /// Call while the application is blocked in an fsync of the database file. In WAL
    /// mode that ends a checkpoint: the WAL is caught up and what was staged made durable
    /// (then, as anywhere, a change to the database file made beside the log is staged).
    /// In rollback mode see [`DatabaseCapture::on_rollback_db_synced`].
    pub(super) fn on_db_synced(&mut self) -> CaptureResult<Vec<CaptureEvent>> {
        // (The header may already say WAL while the journal transaction that switches to
        // WAL mode commits.)
        if std::fs::metadata(&self.wal_path).is_ok() {
            let mut events = self.on_wal_barrier(true)?;
            events.extend(self.capture_beside_an_idle_wal(false)?);
            return Ok(events);
        }
        self.on_rollback_db_synced()
    }

    /// Call while the application is blocked in an fsync, ftruncate, unlink or rename of the
    /// database or its `-wal` (for removals: before the file goes). Stages every transaction
    /// committed since the last call. With `durable` (a barrier after which the `-wal` may
    /// no longer hold those frames: a database fsync, which ends a checkpoint's backfill,
    /// or a truncation, unlink or rename), also makes the staged batches and the state
    /// durable.
    pub(super) fn on_wal_barrier(&mut self, durable: bool) -> CaptureResult<Vec<CaptureEvent>> {
        self.capture(true, durable)
    }

    /// Call while the application is blocked in an fsync of the database file, before that
    /// fsync reaches the backing file. In WAL mode this ends a checkpoint's backfill: the
    /// commits not yet read are staged now, and the segment's fdatasync is started so that
    /// it overlaps with the database's (the `on_db_synced` that follows waits for it). In
    /// rollback mode this does nothing; `on_db_synced` does the work.
    pub(super) fn on_db_syncing(&mut self) -> CaptureResult<Vec<CaptureEvent>> {
        if std::fs::metadata(&self.wal_path).is_err() {
            return Ok(Vec::new());
        }
        let events = self.capture(true, false)?;
        self.segment.start_sync()?;
        Ok(events)
    }

    /// Call when the `-wal` is about to be removed, after its commits were read: see
    /// [`DatabaseCapture::check_log_checkpointed`]. An error asks the caller to restart
    /// the history once the log is gone.
    pub(super) fn on_wal_removing(&mut self) -> CaptureResult<()> {
        let Some(wal) = open_optional(&self.wal_path)? else {
            return Ok(());
        };
        // Only a log this capture read to its end says what the file must hold.
        let mut log = self.tracker.clone();
        if self.tracker.header().is_none() || !poll_wal(&mut log, Some(&wal), false)?.is_empty() {
            return Ok(());
        }
        self.check_log_checkpointed(None)
    }

    /// Call when the log generation being read ends (restarted, truncated, invalidated or
    /// removed) with all of its commits read. SQLite ends a log only after a checkpoint
    /// copied all of it into the database file, which then holds the staged version of
    /// every page staged from the log. If it does not (the `-wal` was replaced or cut by
    /// another program; the file was replaced, e.g. renamed over, while connections of
    /// the old one kept checkpointing into it), what SQLite reads now is not what was
    /// staged: a [`CaptureError::CannotFollow`] restarts the history. `next`: what the
    /// next log, now in the `-wal`, wrote as read (a checkpoint of it may have reached the
    /// file already); `None` while the `-wal` still holds the log that ends.
    fn check_log_checkpointed(&mut self, next: Option<&Rewritten>) -> CaptureResult<()> {
        let Some(pages) = self.log_pages.replace(BTreeSet::new()) else {
            return Ok(());
        };
        let Some(db) = open_optional(&self.db_path)? else {
            return Ok(());
        };
        let lock = lock_byte_page(self.state.page_size);
        let mut buf = vec![0u8; self.state.page_size as usize];
        let mut differ = Vec::new();
        for pgno in pages {
            if pgno > self.state.commit || pgno == lock || next.is_some_and(|n| n.covers(pgno)) {
                continue;
            }
            rollback::read_page(&db, pgno, &mut buf)?;
            if Some(&page_hash(pgno, &buf)) != self.sums.get(pgno as usize - 1) {
                differ.push(pgno);
            }
        }
        if differ.is_empty() {
            return Ok(());
        }
        // Commits of the next log read after the poll may have been checkpointed since.
        if let (Some(_), Some(wal)) = (next, open_optional(&self.wal_path)?) {
            let current = Rewritten::by(&poll_wal(&mut WalTracker::new(), Some(&wal), false)?);
            differ.retain(|&p| !current.covers(p));
        }
        if differ.is_empty() {
            return Ok(());
        }
        Err(CaptureError::CannotFollow(format!(
            "the WAL ended but the database file does not hold {} of its committed pages \
             (the WAL replaced or cut outside SQLite, or the file replaced meanwhile?)",
            differ.len()
        )))
    }

    /// Call when a handle of the backing `-wal` was closed. Reads what is new, as
    /// [`DatabaseCapture::on_wal_changed`] does, then checks that the commits already read
    /// still validate: a program other than SQLite may have written into the log (a
    /// corrupted checksum makes SQLite drop those frames, and its database with them).
    /// SQLite's own writers keep the log open, so this runs at their closes only.
    /// Logs past [`REVALIDATE_LIMIT`] are not read again (a checkpoint keeps a log far
    /// smaller unless the application turned it off).
    pub(super) fn on_wal_closed(&mut self) -> CaptureResult<Vec<CaptureEvent>> {
        let events = self.on_wal_changed()?;
        let (Some(pos), Some(_)) = (self.tracker.position(), self.tracker.header()) else {
            return Ok(events);
        };
        let Some(wal) = open_optional(&self.wal_path)? else {
            return Ok(events);
        };
        let stat = wal_stat(&wal.metadata()?);
        if stat.0 > REVALIDATE_LIMIT {
            return Ok(events);
        }
        self.wal_checked = Some(stat);
        self.check_committed_frames(&wal, pos)?;
        Ok(events)
    }

    /// Reads the log in `wal` again from its start: the commits read up to `pos` must
    /// still validate, or SQLite's readers stop before them and what was staged from
    /// beyond that point is not what SQLite reads. The chain must also still pass through
    /// `pos` itself, a commit ending there with the same checksum: frames written over
    /// committed ones from an earlier point can validate past `pos` (SQLite reported a
    /// commit as failed after its frames reached the log, e.g. when a full disk kept the
    /// `-shm` from growing, and its next writer wrote a longer transaction from the
    /// wal-index's end, over it). Then what was staged is not what SQLite reads either, and
    /// the tracker, whose chain breaks at `pos`, would never read the log again.
    fn check_committed_frames(&self, wal: &File, pos: WalPosition) -> CaptureResult<()> {
        let mut fresh = WalTracker::new();
        let events = poll_wal(&mut fresh, Some(wal), false)?;
        let passes_through = |p: &WalPosition| {
            *p == pos
                || pos == WalPosition::start(pos.header)
                || events
                    .iter()
                    .any(|e| matches!(e, WalEvent::Commit(t) if WalPosition::after(t) == pos))
        };
        let corrupt = match fresh.position() {
            Some(p) => p.header == pos.header && !passes_through(&p),
            // A header that no longer validates (an empty file is a checkpoint's truncation).
            None => wal.metadata()?.len() >= crate::sqlite::WAL_HEADER_SIZE as u64,
        };
        if corrupt {
            return Err(CaptureError::CannotFollow(
                "committed frames of the WAL no longer validate (written outside SQLite, or \
                 by a connection to a database file that was replaced?)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Called after a poll that found nothing new in `wal` (no commit, no frame of an
    /// open transaction). A connection whose view of the log is stale (one that holds a
    /// database file since replaced by a rename, beside the same `-wal` name, with
    /// `locking_mode=EXCLUSIVE`, which keeps its log index in its own memory) can write
    /// over committed frames already read. SQLite's readers then stop where the chain
    /// breaks, and the log's end looks like one that nothing follows. So when the file
    /// changed since it was last checked, has been still for [`STILL`], and nothing
    /// continues the log at its committed end (the file ends there, or a frame with this
    /// log's salts there does not validate), the log is read again from its start (up to
    /// [`REVALIDATE_LIMIT`]).
    fn check_rewritten(&mut self, wal: &File) -> CaptureResult<()> {
        let (Some(pos), Some(header)) = (self.tracker.position(), self.tracker.header()) else {
            return Ok(());
        };
        let m = wal.metadata()?;
        let stat = wal_stat(&m);
        if self.wal_checked == Some(stat) || stat.0 > REVALIDATE_LIMIT {
            return Ok(());
        }
        let still = m
            .modified()
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age >= STILL);
        if !still {
            return Ok(());
        }
        self.wal_checked = Some(stat);
        let suspicious = stat.0 <= pos.committed_end || {
            let mut fh = [0u8; WAL_FRAME_HEADER_SIZE];
            read_full(wal, pos.committed_end, &mut fh)?
                && FrameHeader::parse(&fh)
                    .is_ok_and(|f| (f.salt1, f.salt2) == (header.salt1, header.salt2))
        };
        if suspicious {
            self.check_committed_frames(wal, pos)?;
        }
        Ok(())
    }

    /// Call when the backing WAL changed between barriers (for the RPO).
    pub(super) fn on_wal_changed(&mut self) -> CaptureResult<Vec<CaptureEvent>> {
        self.capture(false, false)
    }

    /// Makes everything staged so far durable and seals the active segment for upload.
    pub fn seal(&mut self) -> StagingResult<()> {
        self.segment.seal()?;
        self.save()
    }

    /// Whether the active segment holds records not yet sealed for upload.
    pub fn has_unsealed(&self) -> bool {
        !self.segment.is_empty() || self.segment.held_txids().is_some()
    }

    /// Makes the staged batches durable (each records the WAL position after it).
    fn make_durable(&mut self) -> StagingResult<()> {
        self.segment.sync()
    }

    /// Stages a full snapshot of the current committed state now.
    pub fn snapshot(&mut self) -> CaptureResult<Vec<CaptureEvent>> {
        let mut events = Vec::new();
        self.snapshot_inner(false, &mut events)?;
        Ok(events)
    }

    fn save(&mut self) -> StagingResult<()> {
        if self.saved != Some(self.state) {
            self.staging.save_state(&self.rel, &self.state)?;
            self.saved = Some(self.state);
        }
        Ok(())
    }

    /// The tracker was just taken from the files as they are (a snapshot or a resume): the
    /// commits it has read, if any, were read from the `-wal` there now.
    fn note_wal_read(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let header = crate::sqlite::WAL_HEADER_SIZE as u64;
        self.commits_read_from = if self
            .tracker
            .position()
            .is_some_and(|p| p.committed_end > header)
        {
            std::fs::metadata(&self.wal_path).ok().map(|m| m.ino())
        } else {
            None
        };
    }

    /// The `-wal` file was created, unlinked or renamed: open it again next time.
    pub fn wal_replaced(&mut self) {
        self.wal_file = None;
    }

    fn capture(&mut self, barrier: bool, durable: bool) -> CaptureResult<Vec<CaptureEvent>> {
        use std::os::unix::fs::MetadataExt;
        // The open file, unless it was unlinked behind the observer's back (then a new
        // `-wal` may exist under the name).
        let cached = self
            .wal_file
            .take()
            .filter(|f| f.metadata().is_ok_and(|m| m.nlink() > 0));
        let wal = match cached {
            Some(f) => Some(f),
            None => open_optional(&self.wal_path)?,
        };
        let ino = wal
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.ino());
        let same_file = ino.is_some() && ino == self.wal_ino;
        let res = self.capture_from(wal.as_ref(), ino, barrier, durable, same_file);
        self.wal_file = wal;
        self.wal_ino = ino;
        res
    }

    fn capture_from(
        &mut self,
        wal: Option<&File>,
        ino: Option<u64>,
        barrier: bool,
        durable: bool,
        same_file: bool,
    ) -> CaptureResult<Vec<CaptureEvent>> {
        let mut events = Vec::new();
        // A log that begins where none was being read (the first, or one in a new file
        // after the last was deleted) may follow writes made to the database file in a
        // rollback journal mode without any barrier (`journal_mode=OFF` or `MEMORY` with
        // `synchronous=OFF`): those are staged first, from the file as it is before the
        // new log's first frame.
        let log_was_live = same_file && self.tracker.header().is_some();
        if self.wal_ino.is_some() && !same_file {
            // A new `-wal` file belongs to connections of this file.
            self.foreign_wal = false;
        }
        let mut tracker = self.tracker.clone();
        let polled = poll_wal_through(&mut tracker, wal, barrier, &mut self.frames)?;
        let found_nothing = polled.is_empty() && tracker.uncommitted_frames() == 0;
        // What the commits this poll found wrote (see `check_log_checkpointed`), if a log
        // ended.
        let ended = polled.iter().any(|ev| !matches!(ev, WalEvent::Commit(_)));
        let newer = if ended {
            Rewritten::by(&polled)
        } else {
            Rewritten::default()
        };
        let mut batch: Vec<WalTransaction> = Vec::new();
        let mut log_changed = false;
        for ev in polled {
            if !matches!(ev, WalEvent::Commit(_)) && !batch.is_empty() {
                events.push(self.stage_pending(wal, &mut batch)?);
            }
            match ev {
                // A switch from rollback-journal mode: the rollback commits were staged
                // (the header change to WAL is one), so the history simply continues.
                WalEvent::Started { header } => {
                    // Pages of a log that ended unseen: the comparison below looks at all.
                    self.log_pages = Some(BTreeSet::new());
                    if !log_was_live {
                        events.extend(self.capture_before_log(header, &newer)?);
                    }
                }
                WalEvent::Restarted {
                    new, continuity, ..
                } => {
                    self.make_durable()?;
                    log_changed = true;
                    if continuity.may_have_missed() {
                        return Err(CaptureError::CannotFollow(format!(
                            "the WAL was restarted, truncated or replaced before all of its \
                             commits were read (continuity {continuity:?}; synchronous=OFF?)"
                        )));
                    }
                    if self.foreign_wal {
                        return Err(CaptureError::CannotFollow(
                            "a WAL left by the database file this one replaced restarted \
                             (its checkpoints went into the other file)"
                                .into(),
                        ));
                    }
                    self.check_log_checkpointed(Some(&newer))?;
                    if !log_was_live {
                        events.extend(self.capture_before_log(new, &newer)?);
                    }
                }
                WalEvent::Truncated { continuity, .. }
                | WalEvent::Invalidated { continuity, .. } => {
                    // What was staged of the old log must not be lost: it is made durable
                    // before anything of the new one is staged (usually the barrier that
                    // ended the checkpoint already did, and this finds nothing to sync).
                    self.make_durable()?;
                    log_changed = true;
                    if continuity.may_have_missed() {
                        return Err(CaptureError::CannotFollow(format!(
                            "the WAL was restarted, truncated or replaced before all of its \
                             commits were read (continuity {continuity:?}; synchronous=OFF?)"
                        )));
                    }
                    self.check_log_checkpointed(Some(&newer))?;
                }
                WalEvent::Commit(txn) => {
                    self.commits_read_from = ino;
                    batch.push(txn);
                }
            }
        }
        if !batch.is_empty() {
            events.push(self.stage_pending(wal, &mut batch)?);
        }
        // Every page this poll validated is staged: the frames' buffer goes, so that an
        // idle database holds none.
        self.frames.release();
        self.tracker = tracker;
        self.state.wal = self.tracker.position();
        if let (true, Some(wal)) = (found_nothing, wal) {
            self.check_rewritten(wal)?;
        }
        if durable {
            self.make_durable()?;
        }
        // In WAL mode the database file is written by checkpoints only, of frames read
        // here: at such a barrier it holds the staged state. Without a `-wal`, or beside
        // one whose log had no commit read, it may have been written in a rollback
        // journal mode since (the header write that leaves WAL mode is one; a connection
        // still in MEMORY or OFF mode beside an empty `-wal` is another), which only a
        // comparison of the file can capture.
        // The tracker's position may be that of a log whose file is gone (a new, empty
        // `-wal` replaced it): commits must have been read from this file.
        let header = crate::sqlite::WAL_HEADER_SIZE as u64;
        let log_had_commits = ino.is_some()
            && self.commits_read_from == ino
            && self
                .tracker
                .position()
                .is_some_and(|p| p.committed_end > header);
        if (durable || log_changed) && wal.is_some() && log_had_commits {
            self.note_fingerprint();
        }
        Ok(events)
    }

    /// Stages `batch` (and empties it). If staging fails, the tracker is put back at the
    /// last staged transaction so that the rest is read again at the next call.
    fn stage_pending(
        &mut self,
        wal: Option<&File>,
        batch: &mut Vec<WalTransaction>,
    ) -> CaptureResult<CaptureEvent> {
        let txns = std::mem::take(batch);
        let Some(wal) = wal else {
            return Err(CaptureError::CannotFollow(
                "the WAL disappeared while it was read".into(),
            ));
        };
        let staged = self.stage_batch(wal, &txns);
        if let Err(CaptureError::Staging(_)) = &staged {
            // Nothing of this batch was staged: read it again next time, from after the
            // last batch staged (by this call or an earlier one).
            if let Some(pos) = self.state.wal {
                if self.tracker.position() != Some(pos) {
                    self.tracker = WalTracker::resume(pos);
                }
            }
        }
        staged
    }

    /// Stages the committed WAL transactions `txns` (consecutive, one log generation) as one
    /// batch with TXIDs `state.txid + 1 ..= state.txid + txns.len()`: the newest version of
    /// each page they wrote, read once from the WAL.
    fn stage_batch(&mut self, wal: &File, txns: &[WalTransaction]) -> CaptureResult<CaptureEvent> {
        let Some(last) = txns.last() else {
            return Err(CaptureError::CannotFollow("an empty WAL batch".into()));
        };
        let ps = last.header.page_size;
        if ps != self.state.page_size {
            return Err(CaptureError::CannotFollow(format!(
                "the WAL's page size {ps} differs from the {} staged so far",
                self.state.page_size
            )));
        }
        let old_size = self.sums.len() as u32;
        let lock = lock_byte_page(ps);
        let mut merge = PageMerge::new(Some(old_size));
        for (i, t) in txns.iter().enumerate() {
            merge.apply(t.db_size, t.pages.iter().map(|p| (p.pgno, (i, *p))));
        }
        let (mut commit, mut pages) = merge.finish(lock);
        let mut frame = vec![0u8; WAL_FRAME_HEADER_SIZE + ps as usize];
        // The size SQLite uses is its header's (page 1) when valid and not larger than the
        // commit's: a killed writer in `journal_mode=OFF` can leave pages past it, which
        // the pager then counts in the WAL's commits (`DbHeader::logical_size`). SQLite
        // writes page 1 whenever the size changes, so without page 1 the staged size
        // stands.
        match pages.get(&1) {
            Some(&at) => {
                let page1 = batch_page(&self.frames, &mut frame, wal, txns, at, ps)?;
                if let Ok(h) = crate::sqlite::DbHeader::parse(page1) {
                    commit = h.logical_size(commit);
                }
            }
            None if self.state.txid > 0 && commit > self.state.commit => {
                commit = self.state.commit;
            }
            None if commit < self.state.commit => {
                return Err(CaptureError::CannotFollow(
                    "the WAL shrinks the database below its header's size".into(),
                ));
            }
            None => {}
        }
        pages.retain(|&pgno, _| pgno <= commit);
        let header = BatchHeader {
            page_size: ps,
            commit,
            min_txid: self.state.txid + 1,
            max_txid: self.state.txid + txns.len() as u64,
            timestamp_ms: now_ms(),
            page_count: pages.len() as u32,
            wal: Some(WalPosition::after(last)),
        };
        let mut sum = self.checksum_cut_to(commit);
        let mut w = if self.hold_pages {
            self.segment.begin_held(header)?
        } else {
            self.segment.begin(header)?
        };
        let mut new_sums = Vec::with_capacity(pages.len());
        for (pgno, at) in pages {
            let buf = batch_page(&self.frames, &mut frame, wal, txns, at, ps)?;
            let c = page_hash(pgno, buf);
            w.add_page(pgno, buf, c)?;
            if let Some(&old) = self.sums.get(pgno as usize - 1) {
                sum.toggle(old);
            }
            sum.toggle(c);
            new_sums.push((pgno, c));
        }
        w.finish(sum)?;
        if let Some(log_pages) = &mut self.log_pages {
            log_pages.extend(new_sums.iter().map(|&(pgno, _)| pgno));
        }
        self.record_staged(&header, sum, new_sums);
        self.state.wal = Some(WalPosition::after(last));
        Ok(CaptureEvent::Staged {
            min_txid: header.min_txid,
            max_txid: header.max_txid,
            pages: header.page_count,
        })
    }

    /// The staged content checksum without the pages past `commit` (a shrink drops them).
    pub(super) fn checksum_cut_to(&self, commit: u32) -> ContentChecksum {
        let mut sum = self.state.checksum;
        for &old in self.sums.iter().skip(commit as usize) {
            sum.toggle(old);
        }
        sum
    }

    /// Records a batch just staged: the per-page checksums it changed (the database now has
    /// `header.commit` pages), and the state after it.
    pub(super) fn record_staged(
        &mut self,
        header: &BatchHeader,
        sum: ContentChecksum,
        new_sums: Vec<(u32, PageHash)>,
    ) {
        self.sums.resize(header.commit as usize, 0);
        for (pgno, c) in new_sums {
            self.sums[pgno as usize - 1] = c;
        }
        self.state.txid = header.max_txid;
        self.state.commit = header.commit;
        self.state.checksum = sum;
    }

    /// Reads the committed image of the database ([`Image::read`]), retrying while the WAL
    /// or the journal moves. Calls `sink` with each page; returns the tracker that read the
    /// WAL, the image's page size and size, or `None` if the files hold no SQLite database
    /// (with `upto`: none at that WAL position).
    pub(super) fn read_image(
        &mut self,
        barrier: bool,
        upto: Option<WalPosition>,
        sink: &mut dyn PageSink,
    ) -> CaptureResult<Option<ImageRead>> {
        for _ in 0..10 {
            let before = rollback::Fingerprint::of(&self.db_path);
            let Some(db) = open_optional(&self.db_path)? else {
                return Ok(None);
            };
            let wal = open_optional(&self.wal_path)?;
            let mut tracker = WalTracker::new();
            let mut txns = Vec::new();
            for ev in poll_wal(&mut tracker, wal.as_ref(), false)? {
                if let WalEvent::Commit(t) = ev {
                    txns.push(t);
                }
            }
            if let Some(pos) = upto {
                if tracker.header() != Some(pos.header) {
                    return Ok(None);
                }
                txns.retain(|t| t.end_offset <= pos.committed_end);
                if txns.last().map_or(32, |t| t.end_offset) != pos.committed_end {
                    return Ok(None);
                }
                tracker = WalTracker::resume(pos);
            }
            let journal = (!self.journal_committed).then_some(self.journal_path.as_path());
            let Some(image) = Image::read(&db, wal.as_ref(), &txns, journal)? else {
                return Ok(None);
            };
            let log_pages = image.overlay.keys().copied().collect();
            sink.start(image.page_size, image.size)?;
            if !image.walk(&db, wal.as_ref(), |pgno, data| sink.page(pgno, data))? {
                continue;
            }
            match &image.originals {
                Some(o) if !o.unchanged()? => continue,
                // A rollback transaction began while the file was read: its pages may
                // be in what was read.
                None if txns.is_empty()
                    && journal.is_some()
                    && rollback::Originals::open(&self.journal_path)?.is_some() =>
                {
                    continue
                }
                _ => {}
            }
            // Nothing may have moved while the database file was read.
            let wal2 = open_optional(&self.wal_path)?;
            let mut check = tracker.clone();
            if upto.is_none() && !poll_wal(&mut check, wal2.as_ref(), barrier)?.is_empty() {
                continue;
            }
            if upto.is_none() {
                tracker = check;
            }
            // Read after the file (a checkpoint records how far it backfills before it
            // copies a page), with no commit added to the log since it was read.
            if let (None, Some(pos)) = (upto, tracker.position()) {
                let h = pos.header;
                let frame = (WAL_FRAME_HEADER_SIZE as u64) + h.page_size as u64;
                let valid = pos.committed_end.saturating_sub(32) / frame;
                if let Some(ix) = wal_index(&self.db_path) {
                    if ix.salts == (h.salt1, h.salt2) && u64::from(ix.backfilled) > valid {
                        // (Commits added and checkpointed since the log was read: again.)
                        let wal3 = open_optional(&self.wal_path)?;
                        if !poll_wal(&mut tracker.clone(), wal3.as_ref(), false)?.is_empty() {
                            continue;
                        }
                        // SQLite's connections read committed frames past a break in the
                        // log's checksum chain, through the wal-index, and a checkpoint
                        // copied some into the file: the file with the log's valid part on
                        // top mixes page versions of different commits. The log's next
                        // restart (after a checkpoint of all of it) is consistent.
                        return Err(CaptureError::CannotFollow(format!(
                            "a checkpoint copied frames of the WAL up to frame {} into the \
                             database file, but its checksums validate only up to frame \
                             {valid} (the log was written outside SQLite?)",
                            ix.backfilled
                        )));
                    }
                }
            }
            return Ok(Some(ImageRead {
                tracker,
                page_size: image.page_size,
                size: image.size,
                from_journal: image.originals.is_some(),
                before,
                log_pages,
            }));
        }
        Err(CaptureError::CannotFollow(
            "the database kept changing while it was read for a snapshot".into(),
        ))
    }

    pub(super) fn snapshot_inner(
        &mut self,
        barrier: bool,
        events: &mut Vec<CaptureEvent>,
    ) -> CaptureResult<()> {
        // Never a TXID the replica may already hold.
        let txid = self.state.txid.max(self.state.uploaded_txid) + 1;
        // The batches before the snapshot are sealed first (held pages too: their TXIDs
        // come before the snapshot's). An upload that lists the snapshot then lists them,
        // and no segment holds batches from both sides of it, where the page size may
        // differ.
        self.segment.seal()?;
        let mut sink = ImageSink::new(Some((self.staging.clone(), self.rel.clone(), txid, None)));
        let got = self.read_image(barrier, None, &mut sink)?;
        let Some(ImageRead {
            tracker,
            page_size,
            size,
            from_journal,
            before,
            log_pages,
        }) = got
        else {
            return Err(CaptureError::NoDatabase);
        };
        let ImageSink {
            writer, sums, sum, ..
        } = sink;
        let writer = writer.and_then(|w| w.3);
        if size == 0 {
            // An empty database: nothing to stage yet.
            drop(writer);
        } else {
            let staged = writer.expect("writer was started").commit(sum)?;
            events.push(CaptureEvent::Staged {
                min_txid: staged.min_txid,
                max_txid: staged.max_txid,
                pages: size,
            });
            self.state.txid = txid;
        }
        self.tracker = tracker;
        self.note_wal_read();
        self.sums = sums;
        self.log_pages = Some(log_pages);
        self.pending = None;
        // An empty image stages nothing, so the history keeps its page size: the next
        // batch of another page size is then a snapshot, never a batch the replica could
        // not apply after the ones before.
        if size > 0 || self.state.txid == 0 {
            self.state.page_size = page_size;
        }
        self.state.commit = size;
        self.state.checksum = sum;
        self.state.wal = self.tracker.position();
        self.make_durable()?;
        // An image that took pages from a live journal changes when the journal does (a
        // commit or rollback invalidates it), with no write to the database file: the next
        // comparison must not be skipped on the file's `stat`.
        self.fingerprint = if from_journal { None } else { before };
        Ok(self.save()?)
    }

    /// A clean stop: seals what is staged and, if the database file is as the last durable
    /// capture point left it, saves the per-page checksums with a description of the files,
    /// so that the next start need not read the whole database to rebuild them.
    pub fn close(&mut self) -> StagingResult<()> {
        self.seal()?;
        // Checksums of a history that waits to restart describe no state of the files.
        if self.pending.is_none() && self.restart.is_none() && self.unchanged_since_capture() {
            if let Some(files) = self.files_description() {
                let saved = SavedSums {
                    txid: self.state.txid,
                    files,
                    sums: self.sums.clone(),
                };
                self.staging.save_sums(&self.rel, &saved)?;
            }
        }
        Ok(())
    }

    /// What the database file and its `-wal` look like now (identity, size, times), or
    /// `None` if the database cannot be examined. A write to either changes it.
    fn files_description(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let describe = |m: &std::fs::Metadata| {
            format!(
                "{}:{}:{}:{}.{}:{}.{}",
                m.dev(),
                m.ino(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec()
            )
        };
        let db = std::fs::metadata(&self.db_path).ok()?;
        let wal = match std::fs::metadata(&self.wal_path) {
            Ok(m) => describe(&m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => "none".to_string(),
            Err(_) => return None,
        };
        Some(format!(
            "db={} wal={wal} pos={:?}",
            describe(&db),
            self.state.wal
        ))
    }

    /// Resumes without reading the database: takes the per-page checksums a clean stop saved
    /// (they are used once), if the files are exactly as they were then and the checksums
    /// add up to the saved state's. False if there are none or they do not fit; then the
    /// files are read ([`DatabaseCapture::resume`]).
    fn resume_from_saved_sums(&mut self) -> CaptureResult<bool> {
        let Some(saved) = self.staging.take_sums(&self.rel)? else {
            return Ok(false);
        };
        let mut sum = ContentChecksum::EMPTY;
        for &c in &saved.sums {
            sum.toggle(c);
        }
        let fits = saved.txid == self.state.txid
            && saved.sums.len() == self.state.commit as usize
            && sum == self.state.checksum
            && self.files_description().as_deref() == Some(saved.files.as_str());
        if !fits {
            tracing::info!(db = %self.rel.display(), "the files changed since the last stop: reading the database to resume");
            return Ok(false);
        }
        // Where the tracker stood: at the saved position if the `-wal` still holds that
        // log; fresh if it holds no log (truncated or deleted after the last capture, as
        // a reader of the files would find it). Anything else reads the files.
        let mut hb = [0u8; crate::sqlite::WAL_HEADER_SIZE];
        let header = match open_optional(&self.wal_path)? {
            Some(wal) if read_full(&wal, 0, &mut hb)? => crate::sqlite::WalHeader::parse(&hb).ok(),
            _ => None,
        };
        // The pages of a log read before the stop are not known: its end is not checked.
        (self.tracker, self.log_pages) = match (self.state.wal, header) {
            (Some(pos), Some(h)) if pos.header == h => (WalTracker::resume(pos), None),
            (_, None) => (WalTracker::new(), Some(BTreeSet::new())),
            _ => return Ok(false),
        };
        self.state.wal = self.tracker.position();
        self.note_wal_read();
        self.sums = saved.sums;
        self.note_fingerprint();
        self.resumed_without_reading = true;
        tracing::debug!(db = %self.rel.display(), txid = self.state.txid, "resumed from the checksums saved at the last stop");
        Ok(true)
    }

    /// Rebuilds the per-page checksums from the files for a saved state. True if the files
    /// still hold exactly the saved state (at the saved WAL position, or with every commit
    /// in the WAL); then capture continues from there.
    fn resume(&mut self) -> CaptureResult<bool> {
        // Where the saved state may lie in the files: at the saved WAL position; or, when
        // the WAL was truncated or restarted since, in the database file alone (the new
        // WAL's commits then follow it); or with every commit in the WAL applied.
        let mut candidates = vec![];
        if let Some(pos) = self.state.wal {
            candidates.push(Some(pos));
        }
        if let Some(wal) = open_optional(&self.wal_path)? {
            let mut hb = [0u8; crate::sqlite::WAL_HEADER_SIZE];
            if read_full(&wal, 0, &mut hb)? {
                if let Ok(h) = crate::sqlite::WalHeader::parse(&hb) {
                    if self.state.wal.is_none_or(|p| p.header != h) {
                        candidates.push(Some(WalPosition::start(h)));
                    }
                }
            }
        }
        candidates.push(None);
        // Pages a stopped capture held are read back from the image that has the state.
        let listed = self
            .segment
            .listed_run()
            .filter(|r| r.last.max_txid == self.state.txid)
            .map(|r| r.pages.clone());
        for upto in candidates {
            let mut sink = ImageSink::new(None);
            sink.keep = listed.as_ref();
            // A candidate that does not read as a database is not where the state lies.
            let got = match self.read_image(false, upto, &mut sink) {
                Ok(got) => got,
                Err(CaptureError::Staging(e)) => return Err(e.into()),
                Err(_) => None,
            };
            let ImageSink {
                sums, sum, kept, ..
            } = sink;
            let Some(ImageRead {
                tracker,
                page_size,
                size,
                from_journal,
                before,
                log_pages,
            }) = got
            else {
                continue;
            };
            let expected = self.state.checksum;
            if page_size == self.state.page_size && size == self.state.commit && sum == expected {
                if listed.is_some() {
                    self.segment.adopt_listed(&kept)?;
                }
                self.tracker = tracker;
                self.note_wal_read();
                self.sums = sums;
                self.log_pages = Some(log_pages);
                self.state.wal = self.tracker.position();
                self.fingerprint = if from_journal { None } else { before };
                self.save()?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// What a run of WAL commits wrote: pages whose content in the database file may come from
/// them, once they are checkpointed.
#[derive(Default)]
pub(super) struct Rewritten {
    pages: BTreeSet<u32>,
    /// The smallest size, in pages, a commit left the database at (a checkpoint truncates
    /// the file to it).
    min_size: Option<u32>,
}

impl Rewritten {
    fn by(events: &[WalEvent]) -> Rewritten {
        let mut r = Rewritten::default();
        for ev in events {
            if let WalEvent::Commit(t) = ev {
                r.pages.extend(t.pages.iter().map(|p| p.pgno));
                r.min_size = Some(r.min_size.map_or(t.db_size, |s| s.min(t.db_size)));
            }
        }
        r
    }

    pub(super) fn covers(&self, pgno: u32) -> bool {
        self.pages.contains(&pgno) || self.min_size.is_some_and(|s| pgno > s)
    }
}

/// A page of a WAL batch: as the poll validated it (`frames`), read again from `wal` (and
/// verified) into `frame`, or zeros (`None`: a page the batch zeroed).
fn batch_page<'a>(
    frames: &'a FrameReader,
    frame: &'a mut [u8],
    wal: &File,
    txns: &[WalTransaction],
    at: Option<(usize, crate::sqlite::WalPage)>,
    ps: u32,
) -> CaptureResult<&'a [u8]> {
    let Some((i, p)) = at else {
        frame.fill(0);
        return Ok(&frame[WAL_FRAME_HEADER_SIZE..]);
    };
    if let Some(data) = frames.validated(&txns[i].header, p.data_offset, ps as usize) {
        return Ok(data);
    }
    match txns[i].read_frame_page(wal, &p, frame) {
        Ok(()) => Ok(&frame[WAL_FRAME_HEADER_SIZE..]),
        Err(WalError::FrameChanged { .. }) => Err(CaptureError::CannotFollow(
            "a committed WAL frame was overwritten before it was read".into(),
        )),
        Err(e) => Err(e.into()),
    }
}

/// What the wal-index in a database's `-shm` says of the log (if it holds a valid header:
/// both copies equal and initialised).
struct WalIndex {
    /// The log header's salts, which the index was built for.
    salts: (u32, u32),
    /// How far a checkpoint backfilled or started to (`nBackfill`,
    /// `nBackfillAttempted`), in frames.
    backfilled: u32,
}

/// Reads the wal-index header and checkpoint information of the database at `db_path`
/// (native byte order; the salts are the log header's bytes).
fn wal_index(db_path: &Path) -> Option<WalIndex> {
    let mut shm_path = db_path.as_os_str().to_owned();
    shm_path.push("-shm");
    let shm = File::open(PathBuf::from(shm_path)).ok()?;
    let mut hdr = [0u8; 132];
    if !read_full(&shm, 0, &mut hdr).ok()? {
        return None;
    }
    let (a, b) = (&hdr[..48], &hdr[48..96]);
    if a != b || a[12] != 1 {
        return None;
    }
    let ne = |o: usize| u32::from_ne_bytes(hdr[o..o + 4].try_into().unwrap());
    let be = |o: usize| u32::from_be_bytes(hdr[o..o + 4].try_into().unwrap());
    Some(WalIndex {
        salts: (be(32), be(36)),
        backfilled: ne(96).max(ne(128)),
    })
}

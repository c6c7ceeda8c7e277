//! Per-database capture of SQLite commits, at SQLite's barriers and between them;
//! FUSE-agnostic.
//!
//! This module owns the path from "a database's files changed or reached a barrier" to
//! "every transaction committed so far is staged":
//! - [`DatabaseCapture`]: one database (its backing path). It keeps a [`WalTracker`] on the
//!   backing `-wal`, the running [`ContentChecksum`] (blake3) and one hash per page
//!   (so each batch updates the checksum incrementally), and stages the committed WAL
//!   transactions each read finds as one batch (consecutive TXIDs, the newest version of
//!   each page, read once more from the backing `-wal` while it is in the page cache) in
//!   its staging segment. At the barriers after which the `-wal` may stop holding those
//!   frames, it makes the segment durable. When it cannot prove that no commit was missed
//!   (a WAL restart with continuity `Gap`/`Unknown`, typically `synchronous=OFF`), it heals
//!   with a full snapshot and says so ([`CaptureEvent::Healed`]). Pages of uncommitted or
//!   rolled-back transactions are never staged: the tracker yields committed transactions
//!   only.
//! - [`Capture`]: the registry of one mount, keyed by path relative to the backing root. It
//!   maps `x-wal` to `x`, recognises databases by their header, ignores other files, and
//!   tells the uploader which databases have something new ([`Capture::take_staged`]).
//! - [`CaptureObserver`]: the [`Observer`] that the FUSE layer calls; it routes database
//!   fsyncs and the ftruncate, unlink and rename of a database or its `-wal` to the
//!   registry, and fails the application's operation with EIO when staging fails.
//! - [`watch`]: reads a database's `-wal` within milliseconds of a change between barriers.
//!
//! - [`rollback`]: rollback-journal commits (DELETE, TRUNCATE, PERSIST) at the journal's
//!   invalidation, changes made without a journal (`journal_mode=MEMORY`/`OFF`) and writes
//!   outside SQLite's protocol (`cp`, `dd`, a rename over the database, truncation), found
//!   by comparing per-page checksums behind a cheap `stat` filter; deleted databases.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::eventfd::EventFd;
use parking_lot::Mutex;

use crate::fs::observer::{Node, Observer};
use crate::fs::{FsError, FsResult};
use crate::replica::ltx::{lock_pgno, LtxHeader};
use crate::sqlite::{
    page_hash, read_full, ContentChecksum, DbHeader, FileFormat, FrameReader, PageHash, WalError,
    WalEvent, WalPage, WalPosition, WalTracker, WalTransaction, DB_HEADER_SIZE,
    WAL_FRAME_HEADER_SIZE,
};
use crate::staging::{
    BatchHeader, DbState, HeldBatch, LtxWriter, PageMerge, SavedSums, SegmentWriter, Staging,
};

/// What a capture call did that the caller may want to log or count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureEvent {
    /// A transaction or snapshot was staged.
    Staged {
        min_txid: u64,
        max_txid: u64,
        pages: u32,
    },
    /// Committed frames may have been missed; a snapshot at `txid` restored exactness.
    Healed { txid: u64, reason: String },
    /// The database's commits cannot be captured (yet); the replica falls behind.
    Unsupported { reason: String },
    /// The file no longer holds an SQLite database (emptied, overwritten with something
    /// else): capture stops and the replica marks it deleted after `txid`.
    Gone { txid: u64 },
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The `-wal` path of a database path.
pub fn wal_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

/// Opens a file for reading, or `None` if it does not exist.
fn open_optional(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn wal_io(e: WalError) -> io::Error {
    match e {
        WalError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// Polls `tracker` on an optional WAL file (absent reads as empty).
fn poll_wal(
    tracker: &mut WalTracker,
    wal: Option<&File>,
    barrier: bool,
) -> io::Result<Vec<WalEvent>> {
    poll_wal_through(tracker, wal, barrier, &mut FrameReader::new())
}

/// [`poll_wal`], keeping the frames it validated in `frames`.
fn poll_wal_through(
    tracker: &mut WalTracker,
    wal: Option<&File>,
    barrier: bool,
    frames: &mut FrameReader,
) -> io::Result<Vec<WalEvent>> {
    let empty: &[u8] = &[];
    let r = match wal {
        Some(f) => tracker.poll_through(f, barrier, frames),
        None => tracker.poll_through(empty, barrier, frames),
    };
    r.map_err(wal_io)
}

/// Reads the database header of `file`, or `None` if it is not (yet) an SQLite database.
fn read_db_header(file: &File) -> io::Result<Option<DbHeader>> {
    let mut b = [0u8; DB_HEADER_SIZE];
    if !read_full(file, 0, &mut b)? {
        return Ok(None);
    }
    Ok(DbHeader::parse(&b).ok())
}

/// The committed database image as of the WAL transactions `txns` on top of `db`: its page
/// size, its size in pages and, per page, where its newest version lies.
struct Image<'a> {
    page_size: u32,
    size: u32,
    overlay: BTreeMap<u32, (&'a WalTransaction, WalPage)>,
    /// A live rollback journal (a transaction in progress, or hot after a crash): the
    /// committed content of the pages it recorded is their original in the journal.
    originals: Option<rollback::Originals>,
}

impl<'a> Image<'a> {
    fn new(header: &DbHeader, db_len: u64, txns: &'a [WalTransaction]) -> Image<'a> {
        let page_size = header.page_size;
        let mut size = header
            .valid_db_size()
            .unwrap_or((db_len / u64::from(page_size)) as u32);
        let mut overlay = BTreeMap::new();
        for t in txns {
            for p in &t.pages {
                overlay.insert(p.pgno, (t, *p));
            }
            size = t.db_size;
        }
        Image {
            page_size,
            size,
            overlay,
            originals: None,
        }
    }

    /// Calls `f` for every page from 1 to the size (but the lock page), in order.
    /// `Ok(false)` means a WAL frame changed under the read: retry.
    fn walk(
        &self,
        db: &File,
        wal: Option<&File>,
        mut f: impl FnMut(u32, &[u8]) -> io::Result<()>,
    ) -> io::Result<bool> {
        let ps = self.page_size as usize;
        let lock = lock_pgno(self.page_size);
        // One frame buffer: WAL pages are read with their frame header, database pages
        // into the page part.
        let mut frame = vec![0u8; WAL_FRAME_HEADER_SIZE + ps];
        for pgno in 1..=self.size {
            if pgno == lock {
                continue;
            }
            if let Some(o) = &self.originals {
                if let Some(rec) = o.record(pgno) {
                    let buf = &mut frame[WAL_FRAME_HEADER_SIZE..];
                    if !o.read(rec, buf)? {
                        return Ok(false);
                    }
                    f(pgno, buf)?;
                    continue;
                }
            }
            match (self.overlay.get(&pgno), wal) {
                (Some((t, p)), Some(wal)) => match t.read_frame_page(wal, p, &mut frame) {
                    Ok(()) => {}
                    Err(WalError::FrameChanged { .. }) => return Ok(false),
                    Err(e) => return Err(wal_io(e)),
                },
                (Some(_), None) => return Ok(false),
                (None, _) => {
                    let buf = &mut frame[WAL_FRAME_HEADER_SIZE..];
                    let off = u64::from(pgno - 1) * ps as u64;
                    if !read_full(db, off, buf)? {
                        // Past the end of the file: what SQLite reads there is zeros.
                        let n = db_len_from(db)?.saturating_sub(off).min(ps as u64) as usize;
                        read_full(db, off, &mut buf[..n])?;
                        buf[n..].fill(0);
                    }
                }
            }
            f(pgno, &frame[WAL_FRAME_HEADER_SIZE..])?;
        }
        Ok(true)
    }
}

fn db_len_from(f: &File) -> io::Result<u64> {
    Ok(f.metadata()?.len())
}

/// Receives the pages of a database image: computes per-page checksums and, for a
/// snapshot, writes them to a staged LTX file. `start` may be called again on a retry.
struct ImageSink<'a> {
    /// For a snapshot: the staging area, the key, the TXID and the file being written.
    writer: Option<(Arc<Staging>, PathBuf, u64, Option<LtxWriter>)>,
    sums: Vec<PageHash>,
    sum: ContentChecksum,
    /// Pages to keep a copy of (a listed run being read back), and the copies.
    keep: Option<&'a BTreeSet<u32>>,
    kept: HeldBatch,
}

impl ImageSink<'_> {
    fn new(writer: Option<(Arc<Staging>, PathBuf, u64, Option<LtxWriter>)>) -> Self {
        ImageSink {
            writer,
            sums: Vec::new(),
            sum: ContentChecksum::EMPTY,
            keep: None,
            kept: HeldBatch::default(),
        }
    }
}

/// Receives the pages of a database image, in order (`start` may be called again on a
/// retry).
trait PageSink {
    fn start(&mut self, page_size: u32, size: u32) -> io::Result<()>;
    fn page(&mut self, pgno: u32, data: &[u8]) -> io::Result<()>;
}

impl PageSink for ImageSink<'_> {
    fn start(&mut self, page_size: u32, size: u32) -> io::Result<()> {
        self.sums = vec![0; size as usize];
        self.sum = ContentChecksum::EMPTY;
        self.kept.clear();
        if let Some((staging, rel, txid, w)) = &mut self.writer {
            *w = None;
            if size > 0 {
                let h = LtxHeader::snapshot(page_size, size, *txid, now_ms());
                *w = Some(staging.begin_snapshot(rel, h)?);
            }
        }
        Ok(())
    }

    fn page(&mut self, pgno: u32, data: &[u8]) -> io::Result<()> {
        let c = page_hash(pgno, data);
        self.sums[pgno as usize - 1] = c;
        self.sum.toggle(c);
        if self.keep.is_some_and(|k| k.contains(&pgno)) {
            self.kept.add(pgno, c, data);
        }
        if let Some((_, _, _, Some(w))) = &mut self.writer {
            w.add_page(pgno, data)?;
        }
        Ok(())
    }
}

/// Why a transaction could not be staged.
enum StageError {
    /// The WAL changed under the read (a restart overwrote it): heal.
    WalChanged(String),
    Io(io::Error),
}

impl From<io::Error> for StageError {
    fn from(e: io::Error) -> Self {
        StageError::Io(e)
    }
}

/// The capture of one database file.
pub struct DatabaseCapture {
    rel: PathBuf,
    db_path: PathBuf,
    wal_path: PathBuf,
    staging: Arc<Staging>,
    /// The active segment batches are appended to.
    segment: SegmentWriter,
    /// The open backing `-wal` (reopened after [`DatabaseCapture::wal_replaced`]).
    wal_file: Option<File>,
    tracker: WalTracker,
    /// What the last poll read of the `-wal`: staged pages are taken from it.
    frames: FrameReader,
    state: DbState,
    saved: Option<DbState>,
    /// The [`page_hash`] of each page (index `pgno - 1`); 0 for the lock page.
    sums: Vec<PageHash>,
    /// The backing `-journal`.
    journal_path: PathBuf,
    /// Pages the open rollback-journal transaction recorded, read at a database fsync;
    /// staged at the journal's invalidation.
    pending: Option<rollback::PendingJournal>,
    /// The backing database file's `stat` when the staged state was last known to match it.
    fingerprint: Option<rollback::Fingerprint>,
    /// This capture resumed from checksums saved at a clean stop, without reading the files.
    resumed_without_reading: bool,
    /// WAL batches are held in memory and recorded as page lists (see "Held pages" in
    /// [`crate::staging::segment`]) rather than written with their pages.
    hold_pages: bool,
}

impl DatabaseCapture {
    /// Starts capturing the database at `db_path` (a backing path), staged under `rel`.
    /// With no saved state, stages an initial snapshot. With a saved state, resumes where it
    /// stopped if the database still matches the saved checksum, and otherwise heals with a
    /// snapshot (`replaced`: the file was replaced while not captured, e.g. renamed over;
    /// then the snapshot continues the history without a warning). Call it at a barrier
    /// if possible (`at_barrier`). Pages that a stopped capture held in memory are read
    /// back from the files with the state. `hold_pages`: see [`Capture::set_hold_pages`].
    pub fn open(
        staging: Arc<Staging>,
        rel: &Path,
        db_path: &Path,
        at_barrier: bool,
        replaced: bool,
        hold_pages: bool,
    ) -> io::Result<(DatabaseCapture, Vec<CaptureEvent>)> {
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
        };
        // The database exists (again): a deletion marker not yet uploaded is void.
        c.staging.clear_deleted(rel, None)?;
        let mut events = Vec::new();
        // What a crash left in the segment is made durable before any state that counts
        // it is saved.
        c.segment.sync()?;
        match saved {
            None => {
                c.snapshot_inner(at_barrier, &mut events)?;
            }
            Some(st) => {
                c.state = st;
                // What the state file holds, which may be behind `st` (then the next save
                // must write it, or a later start would resume from the older state and
                // hand out TXIDs the replica already has).
                c.saved = on_disk;
                // Held pages can only be read back from the files (`resume`).
                let listed = c.segment.listed_run().map(|r| r.pages.len() as u32);
                let resumed = (listed.is_none() && c.resume_from_saved_sums()?) || c.resume()?;
                // Page lists whose pages could not be read back: the heal covers them.
                c.segment.abandon_listed()?;
                if let (Some(pages), Some((min_txid, max_txid))) = (listed, c.segment.held_txids())
                {
                    events.push(CaptureEvent::Staged {
                        min_txid,
                        max_txid,
                        pages,
                    });
                }
                if !resumed {
                    if replaced {
                        c.stage_replacement(&mut events)?;
                    } else {
                        let reason = "the database changed while it was not being captured";
                        c.heal(reason, at_barrier, &mut events)?;
                    }
                }
            }
        }
        Ok((c, events))
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

    /// Call while the application is blocked in an fsync, ftruncate, unlink or rename of the
    /// database or its `-wal` (for removals: before the file goes). Stages every transaction
    /// committed since the last call. With `durable` (a barrier after which the `-wal` may
    /// no longer hold those frames: a database fsync, which ends a checkpoint's backfill,
    /// or a truncation, unlink or rename), also makes the staged batches and the state
    /// durable.
    pub fn on_wal_barrier(&mut self, durable: bool) -> io::Result<Vec<CaptureEvent>> {
        self.capture(true, durable)
    }

    /// Call while the application is blocked in an fsync of the database file, before that
    /// fsync reaches the backing file. In WAL mode this ends a checkpoint's backfill: the
    /// commits not yet read are staged now, and the segment's fdatasync is started so that
    /// it overlaps with the database's (the `on_db_synced` that follows waits for it). In
    /// rollback mode this does nothing; `on_db_synced` does the work.
    pub fn on_db_syncing(&mut self) -> io::Result<Vec<CaptureEvent>> {
        if std::fs::metadata(&self.wal_path).is_err() {
            return Ok(Vec::new());
        }
        let events = self.capture(true, false)?;
        self.segment.start_sync()?;
        Ok(events)
    }

    /// Call when the backing WAL changed between barriers (for the RPO).
    pub fn on_wal_changed(&mut self) -> io::Result<Vec<CaptureEvent>> {
        self.capture(false, false)
    }

    /// Makes everything staged so far durable and seals the active segment for upload.
    pub fn seal(&mut self) -> io::Result<()> {
        self.segment.seal()?;
        self.save()
    }

    /// Makes the staged batches durable (each records the WAL position after it).
    fn make_durable(&mut self) -> io::Result<()> {
        self.segment.sync()
    }

    /// Stages a full snapshot of the current committed state now.
    pub fn snapshot(&mut self) -> io::Result<Vec<CaptureEvent>> {
        let mut events = Vec::new();
        self.snapshot_inner(false, &mut events)?;
        Ok(events)
    }

    fn save(&mut self) -> io::Result<()> {
        if self.saved != Some(self.state) {
            self.staging.save_state(&self.rel, &self.state)?;
            self.saved = Some(self.state);
        }
        Ok(())
    }

    fn heal(
        &mut self,
        reason: &str,
        barrier: bool,
        events: &mut Vec<CaptureEvent>,
    ) -> io::Result<()> {
        self.snapshot_inner(barrier, events)?;
        events.push(CaptureEvent::Healed {
            txid: self.state.txid,
            reason: reason.to_string(),
        });
        Ok(())
    }

    /// The `-wal` file was created, unlinked or renamed: open it again next time.
    pub fn wal_replaced(&mut self) {
        self.wal_file = None;
    }

    fn capture(&mut self, barrier: bool, durable: bool) -> io::Result<Vec<CaptureEvent>> {
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
        let res = self.capture_from(wal.as_ref(), barrier, durable);
        self.wal_file = wal;
        res
    }

    fn capture_from(
        &mut self,
        wal: Option<&File>,
        barrier: bool,
        durable: bool,
    ) -> io::Result<Vec<CaptureEvent>> {
        let mut events = Vec::new();
        let mut tracker = self.tracker.clone();
        let polled = poll_wal_through(&mut tracker, wal, barrier, &mut self.frames)?;
        let mut heal: Option<String> = None;
        let mut batch: Vec<WalTransaction> = Vec::new();
        let mut log_changed = false;
        for ev in polled {
            if !matches!(ev, WalEvent::Commit(_)) && !batch.is_empty() {
                if let Err(reason) = self.stage_pending(wal, &mut batch, &mut events)? {
                    heal = Some(reason);
                    break;
                }
            }
            match ev {
                // A switch from rollback-journal mode: the rollback commits were staged
                // (the header change to WAL is one), so the history simply continues.
                WalEvent::Started { .. } => {}
                WalEvent::Restarted { continuity, .. }
                | WalEvent::Truncated { continuity, .. }
                | WalEvent::Invalidated { continuity, .. } => {
                    // What was staged of the old log must not be lost: it is made durable
                    // before anything of the new one is staged (usually the barrier that
                    // ended the checkpoint already did, and this finds nothing to sync).
                    self.make_durable()?;
                    log_changed = true;
                    if continuity.may_have_missed() {
                        heal = Some(format!(
                            "the WAL was restarted, truncated or replaced before all of its \
                             commits were read (continuity {continuity:?}; synchronous=OFF?)"
                        ));
                        break;
                    }
                }
                WalEvent::Commit(txn) => batch.push(txn),
            }
        }
        if heal.is_none() && !batch.is_empty() {
            if let Err(reason) = self.stage_pending(wal, &mut batch, &mut events)? {
                heal = Some(reason);
            }
        }
        match heal {
            Some(reason) => self.heal(&reason, barrier, &mut events)?,
            None => {
                self.tracker = tracker;
                self.state.wal = self.tracker.position();
                if durable {
                    self.make_durable()?;
                }
                if (durable || log_changed) && self.tracker.position().is_some() {
                    self.note_fingerprint();
                }
            }
        }
        Ok(events)
    }

    /// Stages `batch` (and empties it). On an I/O error, the tracker is put back at the
    /// last staged transaction so that the rest is read again at the next call. The inner
    /// `Err` asks for a heal.
    fn stage_pending(
        &mut self,
        wal: Option<&File>,
        batch: &mut Vec<WalTransaction>,
        events: &mut Vec<CaptureEvent>,
    ) -> io::Result<Result<(), String>> {
        let txns = std::mem::take(batch);
        let Some(wal) = wal else {
            return Ok(Err("the WAL disappeared while it was read".into()));
        };
        match self.stage_batch(wal, &txns) {
            Ok(ev) => {
                events.push(ev);
                Ok(Ok(()))
            }
            Err(StageError::WalChanged(reason)) => Ok(Err(reason)),
            Err(StageError::Io(e)) => {
                // Nothing of this batch was staged: read it again next time, from after
                // the last batch staged (by this call or an earlier one).
                if let Some(pos) = self.state.wal {
                    if self.tracker.position() != Some(pos) {
                        self.tracker = WalTracker::resume(pos);
                    }
                }
                Err(e)
            }
        }
    }

    /// Stages the committed WAL transactions `txns` (consecutive, one log generation) as one
    /// batch with TXIDs `state.txid + 1 ..= state.txid + txns.len()`: the newest version of
    /// each page they wrote, read once from the WAL.
    fn stage_batch(
        &mut self,
        wal: &File,
        txns: &[WalTransaction],
    ) -> Result<CaptureEvent, StageError> {
        let Some(last) = txns.last() else {
            return Err(StageError::Io(io::Error::other("empty batch")));
        };
        let ps = last.header.page_size;
        if ps != self.state.page_size {
            return Err(StageError::WalChanged(format!(
                "the WAL page size {ps} differs from the database's {}",
                self.state.page_size
            )));
        }
        let old_size = self.sums.len() as u32;
        let lock = lock_pgno(ps);
        let mut merge = PageMerge::new(Some(old_size));
        for (i, t) in txns.iter().enumerate() {
            merge.apply(t.db_size, t.pages.iter().map(|p| (p.pgno, (i, *p))));
        }
        let (commit, pages) = merge.finish(lock);
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
        let mut frame = vec![0u8; WAL_FRAME_HEADER_SIZE + ps as usize];
        let mut new_sums = Vec::with_capacity(pages.len());
        for (pgno, at) in pages {
            // The page as the poll validated it, or read again (and re-verified).
            let polled = at.and_then(|(i, p)| {
                self.frames
                    .validated(&txns[i].header, p.data_offset, ps as usize)
            });
            let buf = match (polled, at) {
                (Some(data), _) => data,
                (None, Some((i, p))) => match txns[i].read_frame_page(wal, &p, &mut frame) {
                    Ok(()) => &frame[WAL_FRAME_HEADER_SIZE..],
                    Err(WalError::FrameChanged { .. }) => {
                        return Err(StageError::WalChanged(
                            "a committed WAL frame was overwritten before it was read".into(),
                        ))
                    }
                    Err(e) => return Err(StageError::Io(wal_io(e))),
                },
                (None, None) => {
                    frame.fill(0);
                    &frame[WAL_FRAME_HEADER_SIZE..]
                }
            };
            let c = page_hash(pgno, buf);
            w.add_page(pgno, buf, c)?;
            if pgno <= commit {
                if let Some(&old) = self.sums.get(pgno as usize - 1) {
                    sum.toggle(old);
                }
            }
            sum.toggle(c);
            new_sums.push((pgno, c));
        }
        w.finish(sum)?;
        self.record_staged(&header, sum, new_sums);
        self.state.wal = Some(WalPosition::after(last));
        Ok(CaptureEvent::Staged {
            min_txid: header.min_txid,
            max_txid: header.max_txid,
            pages: header.page_count,
        })
    }

    /// The staged content checksum without the pages past `commit` (a shrink drops them).
    fn checksum_cut_to(&self, commit: u32) -> ContentChecksum {
        let mut sum = self.state.checksum;
        for &old in self.sums.iter().skip(commit as usize) {
            sum.toggle(old);
        }
        sum
    }

    /// Records a batch just staged: the per-page checksums it changed (the database now has
    /// `header.commit` pages), and the state after it.
    fn record_staged(
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

    /// Reads the database file plus its committed WAL frames, retrying while the WAL moves.
    /// Calls `f` with each page; returns the tracker that read the WAL, the image's page size
    /// and size, or `None` if the file is not an SQLite database.
    fn read_image(
        &mut self,
        barrier: bool,
        upto: Option<WalPosition>,
        sink: &mut dyn PageSink,
    ) -> io::Result<Option<(WalTracker, u32, u32, FileFormat)>> {
        for _ in 0..10 {
            let Some(db) = open_optional(&self.db_path)? else {
                return Ok(None);
            };
            let Some(header) = read_db_header(&db)? else {
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
            if let Some(t) = txns.first() {
                if t.header.page_size != header.page_size {
                    return Err(io::Error::other(format!(
                        "{}: WAL page size {} differs from the database's {}",
                        self.db_path.display(),
                        t.header.page_size,
                        header.page_size
                    )));
                }
            }
            let format = header.format().unwrap_or(FileFormat::Rollback);
            let mut image = Image::new(&header, db_len_from(&db)?, &txns);
            if txns.is_empty() {
                if let Some(o) = rollback::Originals::open(&self.journal_path, header.page_size)? {
                    image.size = o.initial_db_pages();
                    image.originals = Some(o);
                }
            }
            sink.start(image.page_size, image.size)?;
            if !image.walk(&db, wal.as_ref(), |pgno, data| sink.page(pgno, data))? {
                continue;
            }
            match &image.originals {
                Some(o) if !o.unchanged()? => continue,
                // A rollback transaction began while the file was read: its pages may
                // be in what was read.
                None if txns.is_empty()
                    && rollback::Originals::open(&self.journal_path, header.page_size)?
                        .is_some() =>
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
            return Ok(Some((tracker, image.page_size, image.size, format)));
        }
        Err(io::Error::other(format!(
            "{}: the database kept changing while it was read for a snapshot",
            self.db_path.display()
        )))
    }

    fn snapshot_inner(&mut self, barrier: bool, events: &mut Vec<CaptureEvent>) -> io::Result<()> {
        // Never a TXID the replica may already hold.
        let txid = self.state.txid.max(self.state.uploaded_txid) + 1;
        // Held pages go to the segment first: their TXIDs come before the snapshot's.
        self.segment.write_held()?;
        let mut sink = ImageSink::new(Some((self.staging.clone(), self.rel.clone(), txid, None)));
        let got = self.read_image(barrier, None, &mut sink)?;
        let Some((tracker, page_size, size, _)) = got else {
            return Err(io::Error::other(format!(
                "{} is not an SQLite database",
                self.db_path.display()
            )));
        };
        let ImageSink {
            writer, sums, sum, ..
        } = sink;
        let writer = writer.and_then(|w| w.3);
        if size == 0 {
            // An empty database: nothing to stage yet.
            drop(writer);
        } else {
            let staged = writer.expect("writer was started").commit()?;
            events.push(CaptureEvent::Staged {
                min_txid: staged.min_txid,
                max_txid: staged.max_txid,
                pages: size,
            });
            self.state.txid = txid;
        }
        self.tracker = tracker;
        self.sums = sums;
        self.pending = None;
        self.state.page_size = page_size;
        self.state.commit = size;
        self.state.checksum = sum;
        self.state.wal = self.tracker.position();
        self.make_durable()?;
        self.note_fingerprint();
        self.save()
    }

    /// A clean stop: seals what is staged and, if the database file is as the last durable
    /// capture point left it, saves the per-page checksums with a description of the files,
    /// so that the next start need not read the whole database to rebuild them.
    pub fn close(&mut self) -> io::Result<()> {
        self.seal()?;
        if self.pending.is_none() && self.unchanged_since_capture() {
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
    fn resume_from_saved_sums(&mut self) -> io::Result<bool> {
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
        self.tracker = match (self.state.wal, header) {
            (Some(pos), Some(h)) if pos.header == h => WalTracker::resume(pos),
            (_, None) => WalTracker::new(),
            _ => return Ok(false),
        };
        self.state.wal = self.tracker.position();
        self.sums = saved.sums;
        self.note_fingerprint();
        self.resumed_without_reading = true;
        tracing::debug!(db = %self.rel.display(), txid = self.state.txid, "resumed from the checksums saved at the last stop");
        Ok(true)
    }

    /// Rebuilds the per-page checksums from the files for a saved state. True if the files
    /// still hold exactly the saved state (at the saved WAL position, or with every commit
    /// in the WAL); then capture continues from there.
    fn resume(&mut self) -> io::Result<bool> {
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
            let got = self.read_image(false, upto, &mut sink)?;
            let ImageSink {
                sums, sum, kept, ..
            } = sink;
            let Some((tracker, page_size, size, _)) = got else {
                continue;
            };
            let expected = self.state.checksum;
            if page_size == self.state.page_size && size == self.state.commit && sum == expected {
                if listed.is_some() {
                    self.segment.adopt_listed(&kept)?;
                }
                self.tracker = tracker;
                self.sums = sums;
                self.state.wal = self.tracker.position();
                self.note_fingerprint();
                self.save()?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Counters of one mount's capture.
#[derive(Debug, Default)]
pub struct CaptureStats {
    /// Batches and snapshots staged.
    pub staged: AtomicU64,
    /// Snapshots taken to heal a possible gap.
    pub heals: AtomicU64,
    /// Capture failures returned to the application as EIO.
    pub failures: AtomicU64,
    /// Databases resumed from the checksums a clean stop saved, without reading them.
    pub quick_resumes: AtomicU64,
}

type Slot = Arc<Mutex<Option<DatabaseCapture>>>;

/// Called when a database has something new staged (to wake the uploader).
pub type StagedNotify = Box<dyn Fn() + Send + Sync>;

/// The captures of one mount, keyed by path relative to the backing root.
pub struct Capture {
    root: PathBuf,
    staging: Arc<Staging>,
    dbs: Mutex<HashMap<PathBuf, Slot>>,
    /// Databases with batches staged since they were last sealed.
    dirty: Mutex<BTreeSet<PathBuf>>,
    notify: Mutex<Option<StagedNotify>>,
    /// Databases whose file went away (deleted, renamed over, no longer SQLite): when one
    /// is captured again, a changed content is a replacement, not a gap.
    forgotten: Mutex<BTreeSet<PathBuf>>,
    /// Incremented whenever a database starts being captured.
    generation: AtomicU64,
    stats: CaptureStats,
    /// Databases whose `-wal` was fsynced outside a barrier, for the WAL watcher to read
    /// now; `wake` tells it (set when the watcher starts).
    synced_wals: Mutex<BTreeSet<PathBuf>>,
    wake: OnceLock<WatcherWake>,
    /// Databases whose `-wal` was fsynced outside a barrier since the last barrier on their
    /// files (see [`Capture::fsync_follows`]).
    checkpointing: Mutex<BTreeSet<PathBuf>>,
    /// See [`Capture::set_hold_pages`].
    hold_pages: AtomicBool,
}

/// How [`Capture::wal_synced`] wakes the WAL watcher: at most once per `interval`.
pub(crate) struct WatcherWake {
    pub fd: Arc<EventFd>,
    pub interval: Duration,
    pub last: Mutex<Option<Instant>>,
}

/// The database a file belongs to, by name: `x-wal` belongs to `x`; `-shm` and
/// `-journal` files are not captured through (None); anything else may be a database.
pub fn database_of(rel: &Path) -> Option<(PathBuf, bool)> {
    let name = rel.file_name()?.as_bytes();
    if let Some(base) = name.strip_suffix(b"-wal") {
        if base.is_empty() {
            return None;
        }
        let mut db = rel.to_path_buf();
        db.set_file_name(OsStr::from_bytes(base));
        return Some((db, true));
    }
    if name.ends_with(b"-shm") || name.ends_with(b"-journal") {
        return None;
    }
    Some((rel.to_path_buf(), false))
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
            forgotten: Mutex::new(BTreeSet::new()),
            generation: AtomicU64::new(0),
            stats: CaptureStats::default(),
            synced_wals: Mutex::new(BTreeSet::new()),
            wake: OnceLock::new(),
            checkpointing: Mutex::new(BTreeSet::new()),
            hold_pages: AtomicBool::new(true),
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
    /// has staged (durable, ready for upload). A database whose seal fails stays in the set
    /// and is logged; its batches stay staged.
    pub fn take_staged(&self) -> Vec<PathBuf> {
        let dirty = std::mem::take(&mut *self.dirty.lock());
        let mut out = Vec::with_capacity(dirty.len());
        for db in dirty {
            match self.seal(&db) {
                Ok(()) => out.push(db),
                Err(e) => {
                    tracing::error!(db = %db.display(), "cannot seal staged batches for upload: {e}");
                    self.dirty.lock().insert(db);
                }
            }
        }
        out
    }

    /// Seals the active segment of `db`, if it is captured.
    fn seal(&self, db: &Path) -> io::Result<()> {
        match self.slot(db, false) {
            Some(slot) => match slot.lock().as_mut() {
                Some(c) => c.seal(),
                None => Ok(()),
            },
            None => Ok(()),
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
            if let Err(e) = self.on_changed(&wal_path(&db)) {
                tracing::error!(db = %db.display(), "final capture failed: {e}");
            }
            // Changes without a journal (MEMORY, OFF) not yet seen at a close.
            if let Err(e) = self.on_db_changed(&db, true) {
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
        let mut v: Vec<PathBuf> = self
            .dbs
            .lock()
            .iter()
            .filter(|(_, s)| s.lock().is_some())
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// Whether `db` (relative) is being captured.
    pub fn is_captured(&self, db: &Path) -> bool {
        self.slot(db, false).is_some_and(|s| s.lock().is_some())
    }

    fn slot(&self, db: &Path, create: bool) -> Option<Slot> {
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

    /// Runs `f` on the capture of the database that `rel` belongs to, registering it first
    /// if its file holds an SQLite header (`register`). Files of other kinds cost one
    /// 100-byte read.
    fn with_db(
        &self,
        rel: &Path,
        register: bool,
        barrier: bool,
        f: impl FnOnce(&mut DatabaseCapture) -> io::Result<Vec<CaptureEvent>>,
    ) -> io::Result<Vec<CaptureEvent>> {
        let Some((db, _)) = database_of(rel) else {
            return Ok(Vec::new());
        };
        if !register && !self.is_captured(&db) {
            return Ok(Vec::new());
        }
        let Some(slot) = self.slot(&db, false).or_else(|| {
            let is_db = File::open(self.root.join(&db))
                .ok()
                .and_then(|f| read_db_header(&f).ok().flatten())
                .is_some();
            if is_db {
                self.slot(&db, true)
            } else {
                None
            }
        }) else {
            return Ok(Vec::new());
        };
        let mut guard = slot.lock();
        let mut events = Vec::new();
        let res = (|| {
            if guard.is_none() {
                let replaced = self.forgotten.lock().remove(&db);
                let (c, ev) = DatabaseCapture::open(
                    self.staging.clone(),
                    &db,
                    &self.root.join(&db),
                    barrier,
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
            events.extend(f(guard.as_mut().expect("capture was just opened"))?);
            if let Some(CaptureEvent::Gone { txid }) = events.last() {
                let txid = *txid;
                if let Some(mut c) = guard.take() {
                    c.seal()?;
                }
                if txid > 0 {
                    self.staging.mark_deleted(&db, txid)?;
                }
            }
            Ok(())
        })();
        let gone = guard.is_none();
        drop(guard);
        if gone {
            self.dbs.lock().remove(&db);
            self.forgotten.lock().insert(db.clone());
        }
        self.account(&db, &events, res.as_ref().err());
        if events.iter().any(|e| {
            matches!(
                e,
                CaptureEvent::Staged { .. }
                    | CaptureEvent::Healed { .. }
                    | CaptureEvent::Gone { .. }
            )
        }) {
            self.mark_staged(&db);
        }
        res.map(|()| events)
    }

    fn account(&self, db: &Path, events: &[CaptureEvent], err: Option<&io::Error>) {
        for e in events {
            match e {
                CaptureEvent::Staged { .. } => {
                    self.stats.staged.fetch_add(1, Ordering::Relaxed);
                }
                CaptureEvent::Healed { txid, reason } => {
                    self.stats.staged.fetch_add(1, Ordering::Relaxed);
                    self.stats.heals.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(db = %db.display(), txid, "capture healed with a snapshot: {reason}");
                }
                CaptureEvent::Unsupported { reason } => {
                    tracing::warn!(db = %db.display(), "replica falls behind: {reason}");
                }
                CaptureEvent::Gone { txid } => {
                    tracing::info!(db = %db.display(), txid, "the file is no longer an SQLite database; the replica keeps its history and marks it deleted");
                }
            }
        }
        if let Some(e) = err {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(db = %db.display(), "capture failed, failing the operation with EIO: {e}");
        }
    }

    /// A barrier (fsync, ftruncate, unlink, rename) on `rel` (a database or its `-wal`).
    /// `durable`: see [`DatabaseCapture::on_wal_barrier`].
    /// A database fsync also ends a rollback-journal transaction's writes (see
    /// [`DatabaseCapture::on_db_synced`]).
    pub fn on_barrier(&self, rel: &Path, durable: bool) -> io::Result<Vec<CaptureEvent>> {
        let target = database_of(rel);
        if let Some((db, _)) = &target {
            self.checkpointing.lock().remove(db);
        }
        match target {
            Some((_, false)) => self.with_db(rel, true, true, |c| c.on_db_synced()),
            _ => self.with_db(rel, true, true, |c| c.on_wal_barrier(durable)),
        }
    }

    /// The database file `rel` is about to be fsynced (see
    /// [`DatabaseCapture::on_db_syncing`]); only a database already captured.
    pub fn on_db_syncing(&self, rel: &Path) -> io::Result<Vec<CaptureEvent>> {
        self.with_db(rel, false, true, |c| c.on_db_syncing())
    }

    /// A barrier on the `-journal` of `db` (see [`DatabaseCapture::on_journal`]).
    pub fn on_journal(
        &self,
        db: &Path,
        barrier: rollback::JournalBarrier,
    ) -> io::Result<Vec<CaptureEvent>> {
        self.with_db(db, true, true, |c| c.on_journal(barrier))
    }

    /// The database file `rel` was truncated or extended, or written and closed, or
    /// renamed into place: stage whatever it now holds that the replica does not.
    /// `at_close`: a file that is no longer SQLite then stops being captured (during a
    /// truncation it may be about to be rewritten).
    pub fn on_db_changed(&self, rel: &Path, at_close: bool) -> io::Result<Vec<CaptureEvent>> {
        self.with_db(rel, true, !at_close, |c| c.on_db_changed(at_close))
    }

    /// `db` was unlinked or renamed away: what it staged stays for the uploader, and the
    /// replica marks it deleted after its last TXID.
    pub fn deleted(&self, db: &Path) -> io::Result<()> {
        let Some(slot) = self.slot(db, false) else {
            return Ok(());
        };
        let mut guard = slot.lock();
        if let Some(mut c) = guard.take() {
            c.seal()?;
            if c.state().txid > 0 {
                self.staging.mark_deleted(db, c.state().txid)?;
            }
        }
        drop(guard);
        self.dbs.lock().remove(db);
        self.forgotten.lock().insert(db.to_path_buf());
        self.mark_staged(db);
        Ok(())
    }

    /// The `-wal` of `db` was created, or is about to be removed: forget its open file.
    fn wal_replaced(&self, db: &Path) {
        if let Some(slot) = self.slot(db, false) {
            if let Some(c) = slot.lock().as_mut() {
                c.wal_replaced();
            }
        }
    }

    /// `rel` changed between barriers; only databases already captured are polled.
    pub fn on_changed(&self, rel: &Path) -> io::Result<Vec<CaptureEvent>> {
        self.with_db(rel, false, false, |c| c.on_wal_changed())
    }

    /// Stops capturing `db` (it was unlinked or renamed away). What it staged is sealed
    /// and stays for the uploader.
    pub fn forget(&self, db: &Path) {
        if let Err(e) = self.seal(db) {
            tracing::error!(db = %db.display(), "cannot seal staged batches: {e}");
        }
        self.dbs.lock().remove(db);
    }

    /// Stops capturing `db` because another file is about to replace it (a rename over
    /// it): when the new file is captured, its content continues the same history.
    pub fn replacing(&self, db: &Path) {
        self.forget(db);
        self.forgotten.lock().insert(db.to_path_buf());
    }
}

/// The observer that connects the FUSE layer to a [`Capture`].
pub struct CaptureObserver {
    capture: Arc<Capture>,
    stage_at_commit: bool,
}

impl CaptureObserver {
    /// Connects `capture`. A `-wal` fsync (each commit with `synchronous=FULL`, and a
    /// checkpoint's first step) is a capture barrier only with `stage_at_commit`; otherwise
    /// the WAL watcher reads those commits within milliseconds, beside the writer. That
    /// loses nothing: the frames stay in the `-wal` until a checkpoint has backfilled them
    /// all, which ends with an ftruncate and (unless `synchronous=OFF`) an fsync of the
    /// database file, and those are barriers at which the capture catches up (and, at the
    /// fsync, makes the staging durable) before SQLite may restart the log.
    pub fn new(capture: Arc<Capture>, stage_at_commit: bool) -> CaptureObserver {
        CaptureObserver {
            capture,
            stage_at_commit,
        }
    }

    pub fn capture(&self) -> &Arc<Capture> {
        &self.capture
    }

    fn barrier(&self, rel: io::Result<PathBuf>, durable: bool) -> FsResult<()> {
        let rel = rel.map_err(|_| FsError::EIO)?;
        self.capture
            .on_barrier(&rel, durable)
            .map(drop)
            .map_err(|_| FsError::EIO)
    }

    /// A removal or rename of `rel`: capture first; forget a database that goes away
    /// (`deleted`: and mark it deleted in the replica, unless another file replaces it).
    fn removing(&self, rel: &Path, deleted: bool) -> FsResult<()> {
        if let Some(db) = rollback::database_of_journal(rel) {
            // DELETE mode's commit point (and the end of a hot journal's rollback).
            return self
                .capture
                .on_journal(&db, rollback::JournalBarrier::Unlinking)
                .map(drop)
                .map_err(|_| FsError::EIO);
        }
        let Some((db, is_wal)) = database_of(rel) else {
            return Ok(());
        };
        if is_wal || self.capture.is_captured(&db) {
            self.capture
                .on_barrier(&wal_path(&db), true)
                .map_err(|_| FsError::EIO)?;
        }
        if is_wal {
            self.capture.wal_replaced(&db);
        } else if deleted {
            self.capture.deleted(&db).map_err(|_| FsError::EIO)?;
        } else {
            self.capture.replacing(&db);
        }
        Ok(())
    }

    /// The relative path of `file` and, for a `-journal`, its database.
    fn journal_of(file: &Node<'_>) -> Option<PathBuf> {
        file.relative_path()
            .ok()
            .and_then(|r| rollback::database_of_journal(&r))
    }
}

impl Observer for CaptureObserver {
    fn created(&self, dir: &Node<'_>, name: &OsStr, _file: &Node<'_>) -> FsResult<()> {
        // A new `-wal` announces a WAL-mode database; a new database file is empty and is
        // registered at its first barrier, once it has a header.
        if name.as_bytes().ends_with(b"-wal") {
            let rel = dir.relative_path().map(|d| d.join(name));
            if let Some((db, true)) = rel.as_deref().ok().and_then(database_of) {
                self.capture.wal_replaced(&db);
            }
            return self.barrier(rel, false);
        }
        Ok(())
    }

    fn syncing(&self, file: &Node<'_>) -> FsResult<()> {
        // A database fsync ends a checkpoint's backfill: stage the rest of the WAL now and
        // start making it durable beside the database's own fsync (`synced` waits for it).
        let Ok(rel) = file.relative_path() else {
            return Ok(());
        };
        match database_of(&rel) {
            Some((_, false)) => self
                .capture
                .on_db_syncing(&rel)
                .map(drop)
                .map_err(|_| FsError::EIO),
            _ => Ok(()),
        }
    }

    fn synced(&self, file: &Node<'_>) -> FsResult<()> {
        if let Some(db) = Self::journal_of(file) {
            // PERSIST mode's commit point: the zeroed header is synced.
            return self
                .capture
                .on_journal(&db, rollback::JournalBarrier::Synced)
                .map(drop)
                .map_err(|_| FsError::EIO);
        }
        // A `-wal` fsync (every commit with synchronous=FULL, and a checkpoint's first
        // step) leaves the frames in the WAL (see `new`); a database fsync ends a
        // checkpoint's backfill, after which the WAL may restart, so what was staged must
        // then be durable.
        let rel = file.relative_path();
        let is_wal = rel
            .as_ref()
            .ok()
            .and_then(|r| database_of(r))
            .is_some_and(|(_, is_wal)| is_wal);
        if is_wal && !self.stage_at_commit {
            if let Some((db, _)) = rel.as_ref().ok().and_then(|r| database_of(r)) {
                self.capture.wal_synced(&db);
            }
            return Ok(());
        }
        self.barrier(rel, !is_wal)
    }

    fn truncated(&self, file: &Node<'_>, _size: u64) -> FsResult<()> {
        if let Some(db) = Self::journal_of(file) {
            // TRUNCATE mode's commit point.
            return self
                .capture
                .on_journal(&db, rollback::JournalBarrier::Truncated)
                .map(drop)
                .map_err(|_| FsError::EIO);
        }
        let rel = file.relative_path().map_err(|_| FsError::EIO)?;
        match database_of(&rel) {
            // A checkpoint's truncation of the database (or one outside SQLite's
            // protocol, or a VACUUM's, whose journal commit stages it anyway). The WAL is
            // caught up first. It is not made durable here: the frames stay in the `-wal`
            // until the checkpoint's database fsync, which follows and makes the staging
            // durable beside its own (with synchronous=OFF there is none, and SQLite
            // itself promises no durability). When the checkpoint began with a `-wal`
            // fsync (synchronous=NORMAL or FULL), its database fsync is still to come
            // and reads everything this would: the truncation (SQLite's size hint grows
            // the file before the backfill) then costs the application nothing here.
            Some((db, false)) => {
                if self.capture.fsync_follows(&db) {
                    return Ok(());
                }
                self.barrier(Ok(wal_path(&db)), false)?;
                self.capture
                    .on_db_changed(&rel, false)
                    .map(drop)
                    .map_err(|_| FsError::EIO)
            }
            _ => self.barrier(Ok(rel), true),
        }
    }

    fn unlinking(&self, dir: &Node<'_>, name: &OsStr) -> FsResult<()> {
        let rel = dir.relative_path().map_err(|_| FsError::EIO)?.join(name);
        self.removing(&rel, true)
    }

    fn renaming(
        &self,
        dir: &Node<'_>,
        name: &OsStr,
        new_dir: &Node<'_>,
        new_name: &OsStr,
    ) -> FsResult<()> {
        let from = dir.relative_path().map_err(|_| FsError::EIO)?.join(name);
        let to = new_dir
            .relative_path()
            .map_err(|_| FsError::EIO)?
            .join(new_name);
        self.removing(&from, true)?;
        // A database renamed over is replaced: `renamed` registers the new file, whose
        // content continues the same history.
        self.removing(&to, false)
    }

    fn renamed(&self, new_dir: &Node<'_>, new_name: &OsStr) {
        let Ok(to) = new_dir.relative_path().map(|d| d.join(new_name)) else {
            return;
        };
        if let Some((_, false)) = database_of(&to) {
            if let Err(e) = self.capture.on_db_changed(&to, true) {
                tracing::error!(db = %to.display(), "cannot capture the file renamed into place: {e}");
            }
        }
    }

    fn released(&self, file: &Node<'_>, wrote: bool) {
        if !wrote {
            return;
        }
        let Ok(rel) = file.relative_path() else {
            return;
        };
        // A database written and closed: changes without a journal (MEMORY, OFF), and
        // writes outside SQLite's protocol (`cp`, `cat`, `dd`). A stat filter keeps this
        // cheap for programs that open and close per request.
        let res = match database_of(&rel) {
            Some((_, false)) => self.capture.on_db_changed(&rel, true),
            _ => self.capture.on_changed(&rel),
        };
        if let Err(e) = res {
            tracing::error!(file = %rel.display(), "capture at close failed: {e}");
        }
    }
}

pub mod rollback;
pub mod watch;

#[cfg(test)]
mod tests;

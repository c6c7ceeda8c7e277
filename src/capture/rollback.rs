//! Capture of databases that do not log through a WAL: rollback-journal commits, changes
//! made without any journal, and writes outside SQLite's protocol.
//!
//! This file owns:
//! - rollback-journal commits (DELETE, TRUNCATE, PERSIST). At the database fsync that
//!   SQLite makes before it invalidates the journal (the writer holds its EXCLUSIVE lock and
//!   the journal is intact), the journal's page list is remembered ([`PendingJournal`]). At
//!   the invalidation (unlink, truncation to 0, or the fsync of a zeroed header) those pages
//!   plus every page past the original size are read from the database file and staged as
//!   one batch (one TXID). Pages equal to what is staged already are left out, so a hot
//!   journal's rollback (which ends the same way) stages nothing;
//! - changes without a journal file (`journal_mode=MEMORY`/`OFF`) and writes outside SQLite's
//!   protocol (`cp`, `cat`, `dd`, a rename over the database, truncation): at a database
//!   fsync or close, if the file's `stat` ([`Fingerprint`]) moved since the last capture
//!   point, the whole file is compared with the per-page checksums, and the changed pages
//!   are staged as one batch, in the same TXID history (a wholesale replacement is a batch
//!   of every page; only a new page size needs a snapshot);
//! - [`Originals`]: a live journal as an overlay, so that a snapshot taken while a
//!   transaction is open, or while a hot journal waits for its rollback, holds the
//!   committed content only.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::database::{ImageRead, Rewritten};
use super::image::PageSink;
use super::{
    now_ms, open_optional, read_db_header, CaptureError, CaptureEvent, CaptureResult,
    DatabaseCapture,
};
use crate::sqlite::{
    changed_pages, header_state, lock_byte_page, page_hash, read_full, scan_journal,
    ContentChecksum, JournalError, JournalHeaderState, JournalReadMode, JournalRecord, JournalScan,
    PageHash, WalHeader, WalPosition, JOURNAL_HEADER_LEN,
};
use crate::staging::BatchHeader;

/// The `-journal` path of a database path.
pub fn journal_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-journal");
    PathBuf::from(s)
}

/// The database whose rollback journal `rel` is, by name (`x-journal` belongs to `x`).
pub fn database_of_journal(rel: &Path) -> Option<PathBuf> {
    let name = rel.file_name()?.as_bytes();
    let base = name.strip_suffix(b"-journal")?;
    if base.is_empty() {
        return None;
    }
    let mut db = rel.to_path_buf();
    db.set_file_name(std::ffi::OsStr::from_bytes(base));
    Some(db)
}

/// Which barrier reached a `-journal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalBarrier {
    /// An fsync (PERSIST mode commits with the fsync of the zeroed header).
    Synced,
    /// A truncation (TRUNCATE mode commits by truncating it to 0).
    Truncated,
    /// About to be unlinked (DELETE mode's commit); it can still be read.
    Unlinking,
}

/// What `stat` says of the backing database file; if it is unchanged since a capture
/// point, so is the content (every write moves mtime and ctime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    pub(super) fn of(path: &Path) -> Option<Fingerprint> {
        let m = std::fs::metadata(path).ok()?;
        Some(Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The pages an open rollback-journal transaction recorded.
#[derive(Debug, Clone, Default)]
pub struct PendingJournal {
    /// The database size in pages before the transaction.
    initial: u32,
    pages: BTreeSet<u32>,
    /// Freelist leaf pages before the transaction. SQLite reuses a freelist leaf without
    /// journaling it (its old content does not matter to SQLite: `PAGER_GET_NOCONTENT`),
    /// so a leaf that left the freelist may have changed although no record names it.
    free_leaves: BTreeSet<u32>,
    /// The page sizes the journal's headers gave: its page numbers count pages of that
    /// size, which is the database file's only if a connection's view of the file is
    /// current (one in `locking_mode=EXCLUSIVE` keeps writing pages of the old size into
    /// a file rewritten under it).
    page_sizes: BTreeSet<u32>,
}

/// The freelist leaf pages of a database whose page 1 is `page1`; `read` reads a trunk
/// page (false if it is past the end). Stops quietly on anything malformed: the result is
/// only a set of pages to look at.
fn freelist_leaves(
    page1: &[u8],
    size: u32,
    mut read: impl FnMut(u32, &mut [u8]) -> io::Result<bool>,
) -> io::Result<BTreeSet<u32>> {
    let mut leaves = BTreeSet::new();
    let mut trunk = crate::sqlite::be32(page1, 32);
    let total = crate::sqlite::be32(page1, 36);
    let mut buf = vec![0u8; page1.len()];
    let max_leaves = (page1.len() / 4).saturating_sub(2) as u32;
    let mut seen = BTreeSet::new();
    while trunk != 0 && trunk <= size && seen.insert(trunk) && seen.len() as u32 <= total {
        if !read(trunk, &mut buf)? {
            break;
        }
        let n = crate::sqlite::be32(&buf, 4).min(max_leaves);
        for i in 0..n as usize {
            let leaf = crate::sqlite::be32(&buf, 8 + 4 * i);
            if leaf >= 1 && leaf <= size {
                leaves.insert(leaf);
            }
        }
        trunk = crate::sqlite::be32(&buf, 0);
    }
    Ok(leaves)
}

/// Reads the journal as the writer that holds the lock knows it, or `None` if there is no
/// live journal: absent, empty, zeroed by a PERSIST commit, not a journal, or not synced
/// yet. SQLite writes a journal's first header with a zeroed magic, and the magic only
/// when it syncs the journal, before it writes any page of the database file (with
/// `synchronous=OFF` it writes the magic at once). So while the magic is zero the database
/// file holds the committed state, and SQLite never takes such a journal for hot (a killed
/// writer's leftover).
fn scan_live(path: &Path) -> io::Result<Option<(File, JournalScan)>> {
    scan_synced(path, JournalReadMode::Live)
}

/// Reads the journal as a rollback of it restores the database: only the records its
/// headers count. A writer syncs the journal (and counts its records) before it writes
/// any page they hold into the database file, so the records past the counts hold pages
/// the file still has unchanged; a rollback skips them, and after a `cp` over the file
/// its content there is what SQLite reads.
fn scan_rollback(path: &Path) -> io::Result<Option<(File, JournalScan)>> {
    scan_synced(path, JournalReadMode::Rollback)
}

fn scan_synced(path: &Path, mode: JournalReadMode) -> io::Result<Option<(File, JournalScan)>> {
    let Some(f) = open_optional(path)? else {
        return Ok(None);
    };
    match scan_journal(&f, mode) {
        Ok(scan) if !scan.header.synced => Ok(None),
        Ok(scan) => Ok(Some((f, scan))),
        Err(JournalError::Io(e)) => Err(e),
        Err(_) => Ok(None),
    }
}

/// A live journal's original pages, as an overlay on the database file.
pub struct Originals {
    file: File,
    scan: JournalScan,
    /// Per page, the index of its first record (the one a rollback restores).
    first: BTreeMap<u32, usize>,
    path: PathBuf,
}

impl Originals {
    /// The live journal at `path`, if there is one.
    pub fn open(path: &Path) -> io::Result<Option<Originals>> {
        let Some((file, scan)) = scan_rollback(path)? else {
            return Ok(None);
        };
        let mut first = BTreeMap::new();
        for (i, r) in scan.records.iter().enumerate() {
            if r.pgno <= scan.header.initial_db_pages {
                first.entry(r.pgno).or_insert(i);
            }
        }
        Ok(Some(Originals {
            file,
            scan,
            first,
            path: path.to_path_buf(),
        }))
    }

    /// The database size before the open transaction.
    pub fn initial_db_pages(&self) -> u32 {
        self.scan.header.initial_db_pages
    }

    /// The page size the journal records (a rollback restores the database with it).
    pub fn page_size(&self) -> u32 {
        self.scan.header.page_size
    }

    /// The original of page 1, if the journal recorded it.
    pub fn original_page1(&self) -> io::Result<Option<Vec<u8>>> {
        let Some(rec) = self.record(1) else {
            return Ok(None);
        };
        let mut page = vec![0u8; self.page_size() as usize];
        Ok(self.read(rec, &mut page)?.then_some(page))
    }

    /// The record holding the original of `pgno`, if the journal has one.
    pub fn record(&self, pgno: u32) -> Option<&JournalRecord> {
        self.first.get(&pgno).map(|&i| &self.scan.records[i])
    }

    /// Reads an original page; false if the journal changed under the read.
    pub fn read(&self, rec: &JournalRecord, buf: &mut [u8]) -> io::Result<bool> {
        match self.scan.read_original(&self.file, rec, buf) {
            Ok(()) => Ok(true),
            Err(JournalError::Io(e)) => Err(e),
            Err(_) => Ok(false),
        }
    }

    /// True if the journal still reads as it did (the transaction did not move on).
    pub fn unchanged(&self) -> io::Result<bool> {
        Ok(scan_rollback(&self.path)?.is_some_and(|(_, s)| s == self.scan))
    }
}

/// Per-page hashes of a database image, for a comparison.
struct SumSink {
    page_size: u32,
    sums: Vec<PageHash>,
}

impl PageSink for SumSink {
    fn start(&mut self, page_size: u32, size: u32) -> CaptureResult<()> {
        self.page_size = page_size;
        self.sums = vec![0; size as usize];
        Ok(())
    }

    fn page(&mut self, pgno: u32, data: &[u8]) -> CaptureResult<()> {
        self.sums[pgno as usize - 1] = page_hash(pgno, data);
        Ok(())
    }
}

/// Above this many bytes of changed pages, a batch reads its pages twice (checksums first,
/// then data) instead of holding them in memory.
const BUFFER_LIMIT: usize = 64 << 20;

/// Reads page `pgno` of `db` into `buf` (zeros past the end of the file).
pub(super) fn read_page(db: &File, pgno: u32, buf: &mut [u8]) -> io::Result<()> {
    let off = u64::from(pgno - 1) * buf.len() as u64;
    if !read_full(db, off, buf)? {
        let len = db.metadata()?.len();
        let n = len.saturating_sub(off).min(buf.len() as u64) as usize;
        buf.fill(0);
        read_full(db, off, &mut buf[..n])?;
    }
    Ok(())
}

impl DatabaseCapture {
    /// Records the database file's `stat` as matching the staged state.
    pub(super) fn note_fingerprint(&mut self) {
        self.fingerprint = Fingerprint::of(&self.db_path);
    }

    pub(super) fn unchanged_since_capture(&self) -> bool {
        self.fingerprint.is_some() && Fingerprint::of(&self.db_path) == self.fingerprint
    }

    /// Adds the pages of the live journal `scan` (read from `journal`) to the pending set,
    /// with the freelist leaves of the database before the transaction (page 1 and trunk
    /// pages as the journal recorded them, else as the database file holds them).
    fn remember(&mut self, journal: &File, scan: &JournalScan) -> io::Result<()> {
        let ps = scan.header.page_size as usize;
        let initial = scan.header.initial_db_pages;
        let mut first: BTreeMap<u32, &JournalRecord> = BTreeMap::new();
        for r in &scan.records {
            first.entry(r.pgno).or_insert(r);
        }
        let db = open_optional(&self.db_path)?;
        let mut read = |pgno: u32, buf: &mut [u8]| -> io::Result<bool> {
            if let Some(rec) = first.get(&pgno) {
                return match scan.read_original(journal, rec, buf) {
                    Ok(()) => Ok(true),
                    Err(JournalError::Io(e)) => Err(e),
                    Err(_) => Ok(false),
                };
            }
            match &db {
                Some(db) if pgno <= initial => {
                    read_page(db, pgno, buf)?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        };
        let mut page1 = vec![0u8; ps];
        let leaves = if initial > 0 && read(1, &mut page1)? {
            freelist_leaves(&page1, initial, &mut read)?
        } else {
            BTreeSet::new()
        };
        let p = self.pending.get_or_insert_with(|| PendingJournal {
            initial,
            ..PendingJournal::default()
        });
        p.initial = p.initial.min(initial);
        p.page_sizes.insert(scan.header.page_size);
        p.pages.extend(scan.records.iter().map(|r| r.pgno));
        p.free_leaves.extend(leaves);
        Ok(())
    }

    /// An fsync of the database file in rollback mode (no `-wal`; see
    /// [`DatabaseCapture::on_db_synced`]): remembers the pages of the open transaction's
    /// journal (the writer has written them all to the database and holds its lock);
    /// without a live journal (`journal_mode=MEMORY` or `OFF`: this fsync is the commit),
    /// stages what changed.
    pub(super) fn on_rollback_db_synced(&mut self) -> CaptureResult<Vec<CaptureEvent>> {
        // No WAL: nothing staged can depend on one, so the hot path makes no fsync of its
        // own here (see docs/FORMAT.md, Staging); and unless the WAL just went, nothing is
        // left to read from one.
        let mut events = if self.tracker.position().is_some() {
            self.on_wal_barrier(false)?
        } else {
            Vec::new()
        };
        match scan_live(&self.journal_path)? {
            Some((f, scan)) => self.remember(&f, &scan)?,
            None => events.extend(self.commit_journal()?),
        }
        Ok(events)
    }

    /// Call while the application is blocked in a barrier on the database's `-journal`
    /// (for an unlink: before it goes). At an invalidation (the journal unlinked, empty, or
    /// its header zeroed) the transaction is committed: its pages are staged.
    pub(super) fn on_journal(
        &mut self,
        barrier: JournalBarrier,
    ) -> CaptureResult<Vec<CaptureEvent>> {
        let committed = match barrier {
            JournalBarrier::Unlinking => {
                // With synchronous=OFF there was no database fsync: the journal still
                // lists the pages.
                if self.pending.is_none() {
                    if let Some((f, scan)) = scan_live(&self.journal_path)? {
                        if !self.journal_begin_seen {
                            // A journal kept from TRUNCATE or PERSIST mode: the commits
                            // made before this transaction without a barrier are not in
                            // its list.
                            self.unseen_writes = true;
                        }
                        self.remember(&f, &scan)?;
                    }
                }
                true
            }
            JournalBarrier::Synced | JournalBarrier::Truncated => {
                match open_optional(&self.journal_path)? {
                    None => true,
                    Some(f) => {
                        let mut b = [0u8; JOURNAL_HEADER_LEN];
                        let n = read_prefix(&f, &mut b)?;
                        matches!(
                            header_state(&b[..n]),
                            JournalHeaderState::Empty | JournalHeaderState::Zeroed
                        )
                    }
                }
            }
        };
        if !committed {
            // A live journal being synced: a transaction in TRUNCATE or PERSIST mode begins
            // (or spills). See `on_journal_begins`.
            self.on_journal_begins();
            return Ok(Vec::new());
        }
        if self.wal_holds_commits() {
            // A connection in a rollback mode beside others in WAL mode (a `-wal` that
            // appeared under a connection already open): what SQLite reads is the
            // database file with the WAL's frames on top, which a journal's page list
            // does not describe.
            self.pending = None;
            return Err(CaptureError::CannotFollow(
                "a rollback journal committed while the WAL holds commits (two journal modes \
                 at once)"
                    .into(),
            ));
        }
        self.commit_journal()
    }

    /// A rollback journal transaction begins (its journal is created, or synced live):
    /// the database file still holds the last committed state. If it moved since the last
    /// capture point, something wrote it without a barrier (`journal_mode=MEMORY` or `OFF`
    /// with `synchronous=OFF`, or a write outside SQLite), and the journal's page list at
    /// the commit will not cover that: the commit then compares the whole file instead.
    pub(super) fn on_journal_begins(&mut self) {
        self.journal_begin_seen = true;
        if Fingerprint::of(&self.db_path) != self.fingerprint {
            self.unseen_writes = true;
        }
    }

    /// A handle of the journal was closed. SQLite closes it when a transaction ends
    /// (outside `locking_mode=EXCLUSIVE`). If the journal is kept with no live transaction
    /// in it (TRUNCATE or PERSIST mode), that transaction committed, maybe without a
    /// barrier (`synchronous=OFF` in PERSIST mode: the commit zeroes the header with no
    /// fsync), and the next one will reuse the journal without creating it: its begin
    /// will not be seen (see `journal_begin_seen`). A journal that cannot be read counts
    /// as kept: the next commit then compares the whole file.
    pub(super) fn on_journal_closed(&mut self) {
        if !self.journal_begin_seen {
            return;
        }
        let kept = match open_optional(&self.journal_path) {
            Ok(None) => false,
            Ok(Some(f)) => {
                let mut b = [0u8; JOURNAL_HEADER_LEN];
                read_prefix(&f, &mut b).map_or(true, |n| {
                    matches!(
                        header_state(&b[..n]),
                        JournalHeaderState::Empty | JournalHeaderState::Zeroed
                    )
                })
            }
            Err(_) => true,
        };
        if kept {
            self.journal_begin_seen = false;
        }
    }

    /// A `-wal` that holds no commit (empty, a bare header, or not a log at all) adds
    /// nothing to what SQLite reads: the database file is the committed image, and a
    /// connection still in a rollback mode (`journal_mode=MEMORY` or `OFF`, opened before
    /// the `-wal` appeared) commits by writing it directly. So, as without a `-wal`, what
    /// changed in the file is staged.
    pub(super) fn capture_beside_an_idle_wal(
        &mut self,
        at_close: bool,
    ) -> CaptureResult<Vec<CaptureEvent>> {
        if self.wal_holds_commits() {
            return Ok(Vec::new());
        }
        self.capture_diff(at_close)
    }

    /// Whether the `-wal` holds frames of the log the tracker reads, with commits.
    fn wal_holds_commits(&self) -> bool {
        let header = crate::sqlite::WAL_HEADER_SIZE as u64;
        self.tracker
            .position()
            .is_some_and(|p| p.committed_end > header)
            && self.tracker.header().is_some()
            && std::fs::metadata(&self.wal_path).is_ok_and(|m| m.len() > header)
    }

    /// The database file changed outside a journal transaction: it was truncated or
    /// extended, or written and closed, or renamed into place ([`super::Barrier::DbResized`],
    /// [`super::Barrier::DbClosed`]); stage whatever it now holds that the replica does not.
    /// `at_close`: a file that is no longer SQLite then stops being captured (during a
    /// truncation it may be about to be rewritten).
    pub(super) fn on_db_changed(&mut self, at_close: bool) -> CaptureResult<Vec<CaptureEvent>> {
        if std::fs::metadata(&self.wal_path).is_ok() {
            let mut events = self.on_wal_changed()?;
            if at_close && self.wal_holds_commits() {
                self.check_written_outside_wal()?;
            }
            events.extend(self.capture_beside_an_idle_wal(at_close)?);
            return Ok(events);
        }
        self.capture_diff(at_close)
    }

    /// In WAL mode SQLite writes the database file only to checkpoint frames already read
    /// from the WAL. If the file moved since the last barrier that noted it (a checkpoint
    /// without an fsync moves it too), the whole committed image is compared with what is
    /// staged: a file written outside SQLite's protocol (`cp` over a database in WAL mode)
    /// differs, and its history restarts from a snapshot. Skipped if the WAL moved
    /// meanwhile (the next close looks again).
    fn check_written_outside_wal(&mut self) -> CaptureResult<()> {
        let before = Fingerprint::of(&self.db_path);
        if before.is_some() && before == self.fingerprint {
            return Ok(());
        }
        let mut sink = SumSink {
            page_size: 0,
            sums: Vec::new(),
        };
        let Some(ImageRead {
            tracker,
            page_size,
            size,
            ..
        }) = self.read_image(false, None, &mut sink)?
        else {
            return Ok(());
        };
        // A log with commits this capture has not read yet: the next close looks again.
        // (No log at all: the image is the file, which holds every staged commit.)
        if tracker.position().is_some() && tracker.position() != self.tracker.position() {
            return Ok(());
        }
        if page_size == self.state.page_size && size == self.state.commit && sink.sums == self.sums
        {
            self.fingerprint = before;
            return Ok(());
        }
        Err(CaptureError::CannotFollow(
            "the database file was written outside SQLite's WAL protocol (a copy over it?)".into(),
        ))
    }

    /// A commit point: stages the pending journal's pages, or, with none remembered,
    /// whatever changed.
    fn commit_journal(&mut self) -> CaptureResult<Vec<CaptureEvent>> {
        // Whatever this step reads from here (a snapshot after a page size change, a
        // comparison, the restart's snapshot if this fails), the journal no longer holds
        // the committed state. The step clears it when it ends.
        self.journal_committed = true;
        self.journal_begin_seen = false;
        match self.pending.take() {
            Some(p) => {
                let res = self.stage_journal_commit(&p);
                if res.is_err() {
                    // Read them again at the next commit point.
                    self.pending = Some(p);
                }
                res
            }
            None => self.capture_diff(false),
        }
    }

    fn stage_journal_commit(&mut self, p: &PendingJournal) -> CaptureResult<Vec<CaptureEvent>> {
        if std::mem::take(&mut self.unseen_writes) {
            // Writes before this transaction were not captured: compare the whole file.
            self.fingerprint = None;
            return self.capture_diff(false);
        }
        let Some(db) = open_optional(&self.db_path)? else {
            return Ok(Vec::new());
        };
        let Some(header) = read_db_header(&db)? else {
            // Rolled back to an empty file, or no longer SQLite: the next close decides.
            return Ok(Vec::new());
        };
        let ps = header.page_size;
        if self.state.txid > 0 && ps != self.state.page_size {
            let mut events = Vec::new();
            self.snapshot_replacement("the page size changed", &mut events)?;
            return Ok(events);
        }
        if p.page_sizes.iter().any(|&j| j != ps) {
            // The journal counts pages of another size than the file's header: its page
            // numbers do not name this file's pages. Compare the whole file.
            self.fingerprint = None;
            return self.capture_diff(false);
        }
        self.state.page_size = ps;
        let file_pages = (db.metadata()?.len() / u64::from(ps)) as u32;
        let size = header.valid_db_size().unwrap_or(file_pages);
        let floor = p.initial.min(self.sums.len() as u32);
        // Freelist leaves that left the freelist were reused, maybe without a record.
        let mut page1 = vec![0u8; ps as usize];
        read_page(&db, 1, &mut page1)?;
        let still_free = freelist_leaves(&page1, size, |pgno, buf| {
            read_page(&db, pgno, buf)?;
            Ok(true)
        })?;
        let reused = p.free_leaves.difference(&still_free).copied();
        let pages = changed_pages(p.pages.iter().copied().chain(reused), floor, size, ps);
        let events = self.stage_from_db(&db, ps, size, &pages)?;
        self.note_fingerprint();
        Ok(events)
    }

    /// Compares the database file with the staged state (behind the `stat` filter) and
    /// stages what differs. Beside a live journal (a transaction open, or hot after a
    /// crash) the committed image is the file with the journal rolled back: it equals the
    /// staged state unless something wrote the file outside SQLite's protocol.
    fn capture_diff(&mut self, at_close: bool) -> CaptureResult<Vec<CaptureEvent>> {
        self.capture_diff_at(at_close, None)
    }

    /// Stages what the database file holds that the replica does not, as it is before the
    /// log `header` begins (see [`DatabaseCapture::capture_from`]).
    /// `logged`: what the new log's commits read in the same poll wrote. A checkpoint may
    /// already have copied them into the file (a log read only after its checkpoint, when
    /// the writer closed before the watcher looked): those pages, and the size if page 1
    /// is among them, are not the file's state before the log, and are left to the log.
    pub(super) fn capture_before_log(
        &mut self,
        header: WalHeader,
        logged: &Rewritten,
    ) -> CaptureResult<Vec<CaptureEvent>> {
        if self.state.txid == 0 {
            return Ok(Vec::new());
        }
        self.capture_diff_at(false, Some((WalPosition::start(header), logged)))
    }

    /// [`DatabaseCapture::capture_diff`] of the image at the start of a log (see
    /// [`DatabaseCapture::capture_before_log`]), or of the whole committed image.
    fn capture_diff_at(
        &mut self,
        at_close: bool,
        before_log: Option<(WalPosition, &Rewritten)>,
    ) -> CaptureResult<Vec<CaptureEvent>> {
        let upto = before_log.as_ref().map(|(p, _)| *p);
        let logged = |pgno: u32| before_log.as_ref().is_some_and(|(_, r)| r.covers(pgno));
        // The `stat` from before the read is what the staged state is recorded to match:
        // a write racing the read (a close is reported after the program went on, maybe
        // to its next transaction) leaves the file different from it, so the next check
        // compares again instead of taking the file for captured.
        let before = Fingerprint::of(&self.db_path);
        if before.is_some() && before == self.fingerprint {
            return Ok(Vec::new());
        }
        let mut sink = SumSink {
            page_size: 0,
            sums: Vec::new(),
        };
        let Some(ImageRead {
            page_size,
            size,
            tracker,
            from_journal,
            ..
        }) = self.read_image(false, upto, &mut sink)?
        else {
            if at_close && self.state.txid > 0 {
                return Ok(vec![CaptureEvent::Gone {
                    txid: self.state.txid,
                }]);
            }
            return Ok(Vec::new());
        };
        let mut events = Vec::new();
        if self.state.txid > 0 && page_size != self.state.page_size {
            if upto.is_some() {
                // A snapshot now would include the new log's commits: restart instead.
                return Err(CaptureError::CannotFollow(
                    "the page size changed before a WAL began".into(),
                ));
            }
            self.snapshot_replacement("the page size changed", &mut events)?;
            return Ok(events);
        }
        let old = &self.sums;
        // The size is page 1's: the log's if its commits wrote page 1.
        let size = if logged(1) { old.len() as u32 } else { size };
        let changed: Vec<u32> = (1..=size)
            .filter(|&pgno| {
                let i = pgno as usize - 1;
                pgno != lock_byte_page(page_size) && !logged(pgno) && old.get(i) != sink.sums.get(i)
            })
            .collect();
        if changed.is_empty() && size as usize == old.len() {
            // With a live journal the file holds uncommitted pages: it is not the image.
            if before_log.is_none() && !from_journal {
                self.fingerprint = before;
            }
            return Ok(events);
        }
        if from_journal {
            // The committed image differs beside a live (or a killed writer's hot)
            // journal: the file was written outside SQLite's protocol (`cp` over it), and
            // what SQLite reads is that file with the journal rolled back. The changed
            // pages are partly in the journal: the whole image is staged.
            self.snapshot_replacement(
                "the database file changed beside a live rollback journal",
                &mut events,
            )?;
            return Ok(events);
        }
        // The changed pages are staged from the file: an image with WAL commits on top
        // (a file replaced beside a live `-wal`) is staged whole instead.
        let header = crate::sqlite::WAL_HEADER_SIZE as u64;
        if tracker.position().is_some_and(|p| p.committed_end > header) {
            self.snapshot_replacement("the database file changed beside its WAL", &mut events)?;
            return Ok(events);
        }
        let Some(db) = open_optional(&self.db_path)? else {
            return Ok(events);
        };
        self.state.page_size = page_size;
        events.extend(self.stage_from_db(&db, page_size, size, &changed)?);
        self.fingerprint = before;
        Ok(events)
    }

    /// The file was replaced while it was not captured (renamed over): stages every page
    /// of the new file as one batch after the last TXID (a snapshot if the page size
    /// changed), so the history continues.
    pub(super) fn stage_replacement(
        &mut self,
        events: &mut Vec<CaptureEvent>,
    ) -> CaptureResult<()> {
        let page_size = match open_optional(&self.db_path)? {
            Some(db) => read_db_header(&db)?.map(|h| h.page_size),
            None => None,
        };
        if self.state.txid > 0 && page_size != Some(self.state.page_size) {
            return self.snapshot_replacement("the database file was replaced", events);
        }
        tracing::info!(db = %self.rel.display(), "the database file was replaced: staging all of its pages (the TXID history continues)");
        self.sums.clear();
        self.state.commit = 0;
        self.state.checksum = ContentChecksum::EMPTY;
        self.fingerprint = None;
        events.extend(self.capture_diff(true)?);
        Ok(())
    }

    /// A new snapshot of the whole file, continuing the TXID history.
    pub(super) fn snapshot_replacement(
        &mut self,
        why: &str,
        events: &mut Vec<CaptureEvent>,
    ) -> CaptureResult<()> {
        tracing::info!(db = %self.rel.display(), "{why}: staging a snapshot (the TXID history continues)");
        self.snapshot_inner(true, events)
    }

    /// Stages `pages` of `db` (sorted; pages past the staged size included) as one batch
    /// that leaves the database `commit` pages long. Pages whose content equals what is
    /// staged are left out; if nothing changed, nothing is staged.
    fn stage_from_db(
        &mut self,
        db: &File,
        page_size: u32,
        commit: u32,
        pages: &[u32],
    ) -> CaptureResult<Vec<CaptureEvent>> {
        let ps = page_size as usize;
        let old_size = self.sums.len() as u32;
        let lock = lock_byte_page(page_size);
        let buffered = pages.len().saturating_mul(ps) <= BUFFER_LIMIT;
        let mut data = Vec::new();
        let mut page = vec![0u8; ps];
        // (pgno, page hash, offset in `data` when buffered)
        let mut keep: Vec<(u32, PageHash, usize)> = Vec::new();
        for &pgno in pages {
            if pgno == 0 || pgno > commit || pgno == lock {
                continue;
            }
            read_page(db, pgno, &mut page)?;
            let c = page_hash(pgno, &page);
            if pgno <= old_size && self.sums[pgno as usize - 1] == c {
                continue;
            }
            let at = data.len();
            if buffered {
                data.extend_from_slice(&page);
            }
            keep.push((pgno, c, at));
        }
        if keep.is_empty() {
            if commit == old_size {
                return Ok(Vec::new());
            }
            if commit > 0 {
                // Only a shrink: page 1 carries it.
                read_page(db, 1, &mut page)?;
                let c = page_hash(1, &page);
                keep.push((1, c, data.len()));
                data.extend_from_slice(&page);
            }
        }
        let header = BatchHeader {
            page_size,
            commit,
            min_txid: self.state.txid + 1,
            max_txid: self.state.txid + 1,
            timestamp_ms: now_ms(),
            page_count: keep.len() as u32,
            // Read from the database file, not from a WAL.
            wal: None,
        };
        let mut sum = self.checksum_cut_to(commit);
        let mut w = self.segment.begin(header)?;
        let mut new_sums = Vec::with_capacity(keep.len());
        for &(pgno, c, at) in &keep {
            let (buf, c) = if buffered || data.len() >= at + ps {
                (&data[at..at + ps], c)
            } else {
                read_page(db, pgno, &mut page)?;
                let c2 = page_hash(pgno, &page);
                (&page[..], c2)
            };
            w.add_page(pgno, buf, c)?;
            if pgno <= old_size {
                sum.toggle(self.sums[pgno as usize - 1]);
            }
            sum.toggle(c);
            new_sums.push((pgno, c));
        }
        w.finish(sum)?;
        self.record_staged(&header, sum, new_sums);
        Ok(vec![CaptureEvent::Staged {
            min_txid: header.min_txid,
            max_txid: header.max_txid,
            pages: header.page_count,
        }])
    }
}

/// Reads up to `buf.len()` bytes from the start of `f`; returns how many there were.
fn read_prefix(f: &File, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

//! The capture of one database file: its WAL tracker, per-page checksums and staging
//! segment, snapshots, and the resume after a restart.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::image::{db_len_from, Image, ImageSink, PageSink, StageError};
use super::{
    now_ms, open_optional, poll_wal, poll_wal_through, read_db_header, rollback, wal_io, wal_path,
    CaptureEvent,
};
use crate::replica::ltx::lock_pgno;
use crate::sqlite::{
    page_hash, read_full, ContentChecksum, FileFormat, FrameReader, PageHash, WalError, WalEvent,
    WalPosition, WalTracker, WalTransaction, WAL_FRAME_HEADER_SIZE,
};
use crate::staging::{BatchHeader, DbState, PageMerge, SavedSums, SegmentWriter, Staging};

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
    pub(super) tracker: WalTracker,
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

    /// Reads the database file plus its committed WAL frames, retrying while the WAL moves.
    /// Calls `f` with each page; returns the tracker that read the WAL, the image's page size
    /// and size, or `None` if the file is not an SQLite database.
    pub(super) fn read_image(
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

    pub(super) fn snapshot_inner(
        &mut self,
        barrier: bool,
        events: &mut Vec<CaptureEvent>,
    ) -> io::Result<()> {
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

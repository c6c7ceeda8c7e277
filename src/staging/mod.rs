//! The local staging area of one mount: captured transactions wait here until the replica
//! holds them.
//!
//! This module owns the staging directory and everything in it. Per database, keyed by its
//! path relative to the mount's backing root:
//!
//! ```text
//! <staging>/<relpath>/state                              the capture position (DbState)
//! <staging>/<relpath>/sums                               per-page checksums saved at a clean stop
//! <staging>/<relpath>/segments/active                    batches being appended (segment.rs)
//! <staging>/<relpath>/segments/<min>-<max>.seg           sealed batches, awaiting upload
//! <staging>/<relpath>/snapshots/<min>-<max>.ltx          snapshots (LTX), awaiting upload
//! <staging>/<relpath>/replicas/<id>/uploaded             what replica <id> holds
//! <staging>/<relpath>/replicas/<id>/<level>/<min>-<max>.ltx  its local copies of uploaded objects
//! <staging>/<relpath>/deleted                            deletion marker, awaiting upload
//! ```
//!
//! Durability follows SQLite's own: transaction batches are appended without fsync, because
//! the frames they hold stay in the backing `-wal` until a checkpoint, and a checkpoint is a
//! barrier at which the capture fsyncs its segment. Every batch records the WAL position it
//! was read up to, so the newest valid batch is where a restarted capture resumes; the
//! state file (temp file, fsync, rename, directory fsync) is written only at snapshots and
//! seals, and [`Staging::last_batch`] may be ahead of it. After a crash,
//! [`Staging::recover`] cuts off whatever is beyond the position resumed from (a torn
//! batch, a snapshot that was not committed), and the capture reads those transactions
//! again from the `-wal`. Snapshots are written durably at once. Sealing (before an
//! upload) makes a segment durable too, so the replica never holds a TXID that staging
//! could forget.
//!
//! Staging knows nothing about SQLite or the WAL beyond the position it stores, and it
//! never talks to the network. Every failure is a [`StagingError`]: an I/O error of the
//! staging directory (ENOSPC, EROFS, EACCES, ...), a staged file that fails its check, or a
//! bug; the caller fails the application's operation with EIO when it must.
//!
//! Snapshot LTX files are written without LTX database checksums (CRC-64) in their headers
//! unless [`Staging::set_checksums`] turns them on: Litestream 0.5 restores only files
//! without them. The content checksum ([`ContentChecksum`], blake3) is kept in the state
//! and in every batch either way.
//!
//! The state file is format 2 (content checksum `content`, 32 hex digits). A format-1 state
//! (written before walfs used blake3; its `checksum` was CRC-64) is read for its TXIDs and
//! WAL position only, with page size 0, so that it matches no database and the capture
//! heals with a fresh snapshot that continues the same history.

mod error;
mod held;
pub mod merge;
pub mod segment;

pub use error::{StagingError, StagingResult};
pub use held::HeldBatch;
pub use merge::PageMerge;
pub use segment::{Batch, BatchHeader, ListedRun, RecordKind, RecordWriter, SegmentWriter};

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::ltx::{ltx_object_name, parse_ltx_object_name, LtxEncoder, LtxHeader};
use crate::sqlite::{be128, ContentChecksum, PageHash, WalHeader, WalPosition, WAL_VERSION};

/// Name of the per-database state file.
const STATE_FILE: &str = "state";
/// Per-page checksums saved at a clean stop (see [`Staging::save_sums`]).
const SUMS_FILE: &str = "sums";
const SUMS_MAGIC: &[u8; 8] = b"WFSSUMS2";
/// The staged deletion marker of a database (see [`Staging::mark_deleted`]).
const DELETED_FILE: &str = "deleted";
/// Name of the segment being appended to.
const ACTIVE_SEGMENT: &str = "active";
/// First line of a state file: the format and its version.
const STATE_MAGIC: &str = "walfs-staging-state 2";
/// First line of a format-1 state file (CRC-64 checksum; see the module header).
const STATE_MAGIC_V1: &str = "walfs-staging-state 1";

/// The staging area of one mount.
#[derive(Debug)]
pub struct Staging {
    root: PathBuf,
    checksums: AtomicBool,
    /// Serialises state-file updates: capture saves its position while the uploader
    /// records what the replica holds, and neither may undo the other.
    state_lock: parking_lot::Mutex<()>,
}

/// What the capture of one database has staged so far; saved atomically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DbState {
    /// The last TXID staged (0: nothing yet).
    pub txid: u64,
    /// Page size of the database.
    pub page_size: u32,
    /// Database size in pages after `txid`.
    pub commit: u32,
    /// The content checksum of the database after `txid`.
    pub checksum: ContentChecksum,
    /// Where the WAL reader stood after `txid` (`None` if no WAL was seen).
    pub wal: Option<WalPosition>,
    /// The last TXID the replica is known to hold (0: none).
    pub uploaded_txid: u64,
}

/// A staged snapshot: an LTX file holding the whole database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedLtx {
    /// First TXID it covers (1 for a snapshot).
    pub min_txid: u64,
    /// Last TXID it covers.
    pub max_txid: u64,
    /// Where it lies.
    pub path: PathBuf,
    /// The content checksum of the database it holds (a snapshot's, from the sidecar
    /// written beside it: [`snapshot_sum_path`]), if known.
    pub content: Option<ContentChecksum>,
}

/// The sidecar beside a staged snapshot `ltx` that holds the content checksum of the
/// database it holds (`<name>.ltx.sum`, the checksum in hex), for the verification record
/// of its upload when capture has moved on by then.
pub fn snapshot_sum_path(ltx: &Path) -> PathBuf {
    let mut name = ltx.file_name().unwrap_or_default().to_os_string();
    name.push(".sum");
    ltx.with_file_name(name)
}

/// The TXID range of a staged snapshot's file or of its sidecar, from its name.
fn snapshot_file_range(name: &str) -> Option<(u64, u64)> {
    parse_ltx_object_name(name.strip_suffix(".sum").unwrap_or(name))
}

/// Reads a snapshot's content-checksum sidecar; `None` if missing or unreadable (the
/// upload then goes without a verification record, as a snapshot staged before sidecars
/// existed does).
fn read_snapshot_sum(ltx: &Path) -> Option<ContentChecksum> {
    let text = fs::read_to_string(snapshot_sum_path(ltx)).ok()?;
    u128::from_str_radix(text.trim(), 16)
        .ok()
        .map(ContentChecksum::from_value)
}

impl StagedLtx {
    /// A snapshot holds the whole database (minimum TXID 1).
    pub fn is_snapshot(&self) -> bool {
        self.min_txid == 1
    }
}

/// Something staged and ready for upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staged {
    Snapshot(StagedLtx),
    Batch(Batch),
}

impl Staged {
    pub fn min_txid(&self) -> u64 {
        match self {
            Staged::Snapshot(s) => s.min_txid,
            Staged::Batch(b) => b.header.min_txid,
        }
    }

    pub fn max_txid(&self) -> u64 {
        match self {
            Staged::Snapshot(s) => s.max_txid,
            Staged::Batch(b) => b.header.max_txid,
        }
    }
}

/// A file listed a moment ago that is gone now (removed once uploaded) counts as absent.
fn gone_is_none<T>(r: StagingResult<T>) -> StagingResult<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The directory inside a database's staging directory that holds, per replica, what the
/// replica holds and local copies of its objects (`crate::replica::kept`,
/// `crate::replica::fanout`); staging only leaves it alone.
pub const KEPT_DIR: &str = "replicas";

/// Where walfs before per-replica uploads kept the one set of local copies
/// (`crate::replica::fanout` moves it into [`KEPT_DIR`]); staging leaves it alone too.
pub const LEGACY_KEPT_DIR: &str = "replica";

/// Fsyncs a directory, so that renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically and durably (temp file, fsync, rename, dir fsync).
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let tmp = tmp_path(path);
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{}.tmp", name.unwrap_or_default()))
}

/// Lists a directory, treating a missing one as empty.
pub(crate) fn list_dir(dir: &Path) -> io::Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries.collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// A staged snapshot being written; [`LtxWriter::commit`] makes it durable, dropping it
/// without committing removes the temporary file.
pub struct LtxWriter {
    encoder: Option<LtxEncoder<BufWriter<File>>>,
    tmp: PathBuf,
    dest: PathBuf,
    header: LtxHeader,
}

impl LtxWriter {
    /// Adds one page (pages ascend; a snapshot holds every page but the lock page).
    pub fn add_page(&mut self, pgno: u32, data: &[u8]) -> StagingResult<()> {
        match &mut self.encoder {
            Some(e) => Ok(e.add_page(pgno, data)?),
            None => Err(StagingError::internal(
                "a page added after the snapshot was committed",
            )),
        }
    }

    /// The header being written.
    pub fn header(&self) -> &LtxHeader {
        &self.header
    }

    /// Finishes the file (with the post-apply LTX checksum of the pages written, if the
    /// header tracks checksums), fsyncs it, writes `content` (the content checksum of the
    /// pages) beside it, renames it into place and fsyncs the directory.
    pub fn commit(mut self, content: ContentChecksum) -> StagingResult<StagedLtx> {
        let mut enc = self
            .encoder
            .take()
            .ok_or_else(|| StagingError::internal("a snapshot committed twice"))?;
        let post = if self.header.has_checksums() {
            enc.snapshot_checksum().value()
        } else {
            0
        };
        enc.finish(post)?;
        let file = enc.into_inner().into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        // The sidecar first, so that a snapshot in place has its checksum beside it. It is
        // not fsynced: after a crash a lost or torn one only costs the upload its
        // verification record, and one left alone goes with the snapshot's range.
        fs::write(
            snapshot_sum_path(&self.dest),
            format!("{:032x}\n", content.value()),
        )?;
        fs::rename(&self.tmp, &self.dest)?;
        sync_dir(self.dest.parent().expect("staged file has a directory"))?;
        Ok(StagedLtx {
            min_txid: self.header.min_txid,
            max_txid: self.header.max_txid,
            path: self.dest.clone(),
            content: Some(content),
        })
    }
}

impl Drop for LtxWriter {
    fn drop(&mut self) {
        if self.encoder.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl Staging {
    /// Opens (creating if needed) the staging area at `dir`.
    pub fn open(dir: impl AsRef<Path>) -> StagingResult<Staging> {
        let root = dir.as_ref().to_path_buf();
        fs::create_dir_all(&root)?;
        Ok(Staging {
            root,
            checksums: AtomicBool::new(false),
            state_lock: parking_lot::Mutex::new(()),
        })
    }

    /// The staging directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether new snapshot files carry database checksums in their headers and trailers
    /// (default off, as Litestream 0.5 requires).
    pub fn set_checksums(&self, on: bool) {
        self.checksums.store(on, Ordering::Relaxed);
    }

    /// The staging directory of database `db` (a relative path without `..`).
    pub fn db_dir(&self, db: &Path) -> StagingResult<PathBuf> {
        if db.as_os_str().is_empty() || !db.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(StagingError::internal(format!(
                "database key {} is not a plain relative path",
                db.display()
            )));
        }
        Ok(self.root.join(db))
    }

    fn snapshot_dir(&self, db: &Path) -> StagingResult<PathBuf> {
        Ok(self.db_dir(db)?.join("snapshots"))
    }

    fn segment_dir(&self, db: &Path) -> StagingResult<PathBuf> {
        Ok(self.db_dir(db)?.join("segments"))
    }

    /// Starts writing a staged snapshot with `header` (checksums are stripped unless
    /// enabled). The file appears only on [`LtxWriter::commit`].
    pub fn begin_snapshot(&self, db: &Path, mut header: LtxHeader) -> StagingResult<LtxWriter> {
        if !self.checksums.load(Ordering::Relaxed) {
            header = header.without_checksums();
        }
        let dir = self.snapshot_dir(db)?;
        fs::create_dir_all(&dir)?;
        let dest = dir.join(ltx_object_name(header.min_txid, header.max_txid));
        let tmp = tmp_path(&dest);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let encoder = match LtxEncoder::new(BufWriter::with_capacity(256 * 1024, file), header) {
            Ok(e) => e,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e.into());
            }
        };
        Ok(LtxWriter {
            encoder: Some(encoder),
            tmp,
            dest,
            header,
        })
    }

    /// Stages a snapshot (TXIDs `1..=txid`) of `commit` pages, given in order (every page
    /// from 1 to `commit` except the lock page).
    pub fn stage_snapshot<I, B>(
        &self,
        db: &Path,
        pages: I,
        page_size: u32,
        commit: u32,
        txid: u64,
        timestamp_ms: i64,
    ) -> StagingResult<(StagedLtx, ContentChecksum)>
    where
        I: IntoIterator<Item = io::Result<(u32, B)>>,
        B: AsRef<[u8]>,
    {
        let header = LtxHeader::snapshot(page_size, commit, txid, timestamp_ms);
        let mut w = self.begin_snapshot(db, header)?;
        let mut sum = ContentChecksum::EMPTY;
        for page in pages {
            let (pgno, data) = page?;
            w.add_page(pgno, data.as_ref())?;
            sum.add_page(pgno, data.as_ref());
        }
        Ok((w.commit(sum)?, sum))
    }

    /// Opens the active segment of `db` for appending (call [`Staging::recover`] first).
    pub fn open_segment(&self, db: &Path) -> StagingResult<SegmentWriter> {
        let dir = self.segment_dir(db)?;
        fs::create_dir_all(&dir)?;
        SegmentWriter::open(&dir.join(ACTIVE_SEGMENT))
    }

    /// After a restart: forgets everything staged beyond `txid` (the last durable state),
    /// which the capture reads again, and stray temporary files. Returns how many batches
    /// and snapshots were dropped.
    pub fn recover(&self, db: &Path, txid: u64) -> StagingResult<usize> {
        let mut dropped = 0;
        let snapshots = self.snapshot_dir(db)?;
        for entry in list_dir(&snapshots)? {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let stale = match snapshot_file_range(&name) {
                Some((_, max)) => max > txid,
                None => name.starts_with('.') && name.ends_with(".tmp"),
            };
            if stale && gone_is_none(fs::remove_file(entry.path()).map_err(Into::into))?.is_some() {
                // A snapshot's checksum sidecar goes with it, uncounted.
                dropped += usize::from(!name.ends_with(".sum"));
            }
        }
        let segments = self.segment_dir(db)?;
        for entry in list_dir(&segments)? {
            // A sealed segment the uploader removed meanwhile was uploaded: it is skipped
            // wherever in its recovery that is found.
            let cut = gone_is_none(self.recover_segment(&entry, &segments, txid))?;
            dropped += cut.unwrap_or(0);
        }
        if dropped > 0 {
            sync_dir(&segments)?;
        }
        Ok(dropped)
    }

    /// [`Staging::recover`] for one segment file in `segments`: cuts what is beyond `txid`.
    /// Returns how many records went.
    fn recover_segment(
        &self,
        entry: &fs::DirEntry,
        segments: &Path,
        txid: u64,
    ) -> StagingResult<usize> {
        let path = entry.path();
        let (records, valid) = segment::read_segment(&path)?;
        let keep = records
            .iter()
            .take_while(|b| b.header.max_txid <= txid)
            .count();
        let keep_len = records.get(keep).map_or(valid, |b| b.offset);
        if keep_len != entry.metadata()?.len() {
            OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(keep_len)?;
        }
        let is_active = entry.file_name() == ACTIVE_SEGMENT;
        if !is_active {
            // A sealed segment cut short gets the name of what it still holds.
            match (records.first(), keep) {
                (_, 0) => fs::remove_file(&path)?,
                (Some(first), n) => {
                    let name =
                        segment::sealed_name(first.header.min_txid, records[n - 1].header.max_txid);
                    if entry.file_name().to_string_lossy() != name {
                        fs::rename(&path, segments.join(name))?;
                    }
                }
                (None, _) => {}
            }
        }
        Ok(records.len() - keep)
    }

    /// The newest staged batch of `db` (sealed or not), if any.
    pub fn last_batch(&self, db: &Path) -> StagingResult<Option<Batch>> {
        let mut last: Option<Batch> = None;
        for entry in list_dir(&self.segment_dir(db)?)? {
            let Some((records, _)) = gone_is_none(segment::read_segment(&entry.path()))? else {
                continue;
            };
            if let Some(b) = records.into_iter().last() {
                if last
                    .as_ref()
                    .is_none_or(|l| b.header.max_txid > l.header.max_txid)
                {
                    last = Some(b);
                }
            }
        }
        Ok(last)
    }

    /// At a start, before capture and upload run: removes the temporary files of uploads
    /// that a stopped process left in every database's staging directory.
    pub fn remove_temporaries(&self) -> StagingResult<usize> {
        let mut n = 0;
        for db in self.databases()? {
            for entry in list_dir(&self.db_dir(&db)?)? {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(".upload-") && name.ends_with(".tmp") {
                    fs::remove_file(entry.path())?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// The newest TXID staged for `db` (in its state, its segments or its snapshots), if
    /// any.
    pub fn last_staged_txid(&self, db: &Path) -> StagingResult<Option<u64>> {
        let mut last = self.state(db)?.map(|s| s.txid.max(s.uploaded_txid));
        if let Some(b) = self.last_batch(db)? {
            last = last.max(Some(b.header.max_txid));
        }
        for s in self.pending(db)? {
            last = last.max(Some(s.max_txid()));
        }
        Ok(last.filter(|&t| t > 0))
    }

    /// Sealed batches and snapshots not yet uploaded, by ascending maximum TXID (a
    /// snapshot before a batch that ends at the same TXID).
    pub fn pending(&self, db: &Path) -> StagingResult<Vec<Staged>> {
        let mut out = Vec::new();
        for entry in list_dir(&self.snapshot_dir(db)?)? {
            let name = entry.file_name();
            if let Some((min_txid, max_txid)) = name.to_str().and_then(parse_ltx_object_name) {
                out.push(Staged::Snapshot(StagedLtx {
                    min_txid,
                    max_txid,
                    content: read_snapshot_sum(&entry.path()),
                    path: entry.path(),
                }));
            }
        }
        for entry in list_dir(&self.segment_dir(db)?)? {
            let name = entry.file_name();
            if name.to_str().and_then(segment::parse_sealed_name).is_some() {
                // Page lists are superseded by the page-bearing record after them.
                let Some(records) = gone_is_none(segment::list_records(&entry.path()))? else {
                    continue;
                };
                out.extend(
                    records
                        .into_iter()
                        .filter(|b| b.kind == RecordKind::Pages)
                        .map(Staged::Batch),
                );
            }
        }
        out.sort_by_key(|s| (s.max_txid(), matches!(s, Staged::Batch(_)), s.min_txid()));
        Ok(out)
    }

    /// When (milliseconds since the Unix epoch) the oldest commit of `db` after
    /// `after_txid` was staged: the earliest timestamp among the snapshots, sealed segments
    /// and active segment that hold a TXID past it; `None` if nothing past it is staged.
    /// Reads record headers only; for metrics and `walfs status` (replication lag).
    pub fn oldest_after(&self, db: &Path, after_txid: u64) -> StagingResult<Option<i64>> {
        let mut oldest: Option<i64> = None;
        let mut note = |ts: i64| oldest = Some(oldest.map_or(ts, |o| o.min(ts)));
        for entry in list_dir(&self.snapshot_dir(db)?)? {
            let name = entry.file_name();
            let Some((_, max)) = name.to_str().and_then(parse_ltx_object_name) else {
                continue;
            };
            if max > after_txid {
                let mut hb = [0u8; crate::ltx::HEADER_SIZE];
                let read = File::open(entry.path())
                    .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut hb, 0));
                if let (Ok(()), Ok(h)) = (read, LtxHeader::from_bytes(&hb).map_err(drop)) {
                    note(h.timestamp_ms);
                }
            }
        }
        for entry in list_dir(&self.segment_dir(db)?)? {
            let name = entry.file_name();
            let sealed = name.to_str().and_then(segment::parse_sealed_name);
            if sealed.is_some_and(|(_, max)| max <= after_txid)
                || (sealed.is_none() && name != ACTIVE_SEGMENT)
            {
                continue;
            }
            let Some(records) = gone_is_none(segment::list_records(&entry.path()))? else {
                continue;
            };
            if let Some(b) = records.iter().find(|b| b.header.max_txid > after_txid) {
                note(b.header.timestamp_ms);
            }
        }
        Ok(oldest)
    }

    /// Every file of `db` that waits for upload, with its size in bytes: the segments
    /// (the active one too) and the snapshots, temporary files included; not the local
    /// copies of uploaded objects. One directory listing each, for bounded staging
    /// (`--max-staging`); a file removed meanwhile is left out.
    pub fn pending_files(&self, db: &Path) -> StagingResult<Vec<(PathBuf, u64)>> {
        let mut out = Vec::new();
        for dir in [self.snapshot_dir(db)?, self.segment_dir(db)?] {
            for entry in list_dir(&dir)? {
                if let Some(m) = gone_is_none(entry.metadata().map_err(Into::into))? {
                    if m.is_file() {
                        out.push((entry.path(), m.len()));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The replica holds everything up to `upto_txid`: deletes the sealed segments and
    /// snapshots it covers and records it in the state. Returns how many files went.
    pub fn mark_uploaded(&self, db: &Path, upto_txid: u64) -> StagingResult<usize> {
        let n = self.drop_staged(db, upto_txid)?;
        let _guard = self.state_lock.lock();
        if let Some(mut st) = self.state(db)? {
            if upto_txid > st.uploaded_txid {
                st.uploaded_txid = upto_txid;
                self.write_state(db, &st)?;
            }
        }
        Ok(n)
    }

    /// Deletes the sealed segments and snapshots that end at or before `upto_txid`.
    /// Returns how many files went.
    pub fn drop_staged(&self, db: &Path, upto_txid: u64) -> StagingResult<usize> {
        let mut n = 0;
        for dir in [self.snapshot_dir(db)?, self.segment_dir(db)?] {
            let mut removed = false;
            for entry in list_dir(&dir)? {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let range =
                    snapshot_file_range(&name).or_else(|| segment::parse_sealed_name(&name));
                if range.is_some_and(|(_, max)| max <= upto_txid) {
                    fs::remove_file(entry.path())?;
                    removed = true;
                    // A snapshot's checksum sidecar goes with it, uncounted.
                    n += usize::from(!name.ends_with(".sum"));
                }
            }
            if removed {
                sync_dir(&dir)?;
            }
        }
        Ok(n)
    }

    /// Every database with a saved state, as relative paths.
    pub fn databases(&self) -> StagingResult<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            for entry in list_dir(&self.root.join(&rel))? {
                if !entry.file_type()?.is_dir() {
                    continue;
                }
                let child = rel.join(entry.file_name());
                if entry.path().join(STATE_FILE).is_file() {
                    out.push(child.clone());
                }
                let name = entry.file_name();
                if name != "segments"
                    && name != "snapshots"
                    && name != KEPT_DIR
                    && name != LEGACY_KEPT_DIR
                {
                    stack.push(child);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Records that `db` was deleted (or stopped being an SQLite database) after `txid`:
    /// a small file `<db>/deleted` that the uploader turns into the replica's
    /// `<db>/walfs/deleted` marker once everything up to `txid` is uploaded. Returns the
    /// marker's content, one line: `txid=<%016x> deleted_at=<RFC3339 UTC>`.
    pub fn mark_deleted(&self, db: &Path, txid: u64) -> StagingResult<String> {
        let dir = self.db_dir(db)?;
        fs::create_dir_all(&dir)?;
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
        let line = format!("txid={txid:016x} deleted_at={now}\n");
        write_atomic(&dir.join(DELETED_FILE), line.as_bytes())?;
        Ok(line)
    }

    /// The staged deletion marker of `db` (see [`Staging::mark_deleted`]), if any.
    pub fn deleted_marker(&self, db: &Path) -> StagingResult<Option<String>> {
        match fs::read_to_string(self.db_dir(db)?.join(DELETED_FILE)) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the staged deletion marker of `db` (the database is back, or the marker was
    /// uploaded). With `only`, removes it only if it still holds that content.
    pub fn clear_deleted(&self, db: &Path, only: Option<&str>) -> StagingResult<()> {
        let path = self.db_dir(db)?.join(DELETED_FILE);
        if let Some(want) = only {
            if self.deleted_marker(db)?.as_deref() != Some(want) {
                return Ok(());
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The saved state of `db`, or `None` if it was never saved.
    pub fn state(&self, db: &Path) -> StagingResult<Option<DbState>> {
        let path = self.db_dir(db)?.join(STATE_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => parse_state(&text)
                .map(Some)
                .map_err(|what| StagingError::Corrupt { path, what }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Saves the state of `db` atomically and durably. The uploaded TXID never goes
    /// backwards: a concurrent [`Staging::mark_uploaded`] may have advanced it.
    pub fn save_state(&self, db: &Path, state: &DbState) -> StagingResult<()> {
        let _guard = self.state_lock.lock();
        let mut state = *state;
        if let Ok(Some(saved)) = self.state(db) {
            state.uploaded_txid = state.uploaded_txid.max(saved.uploaded_txid);
        }
        self.write_state(db, &state)
    }

    fn write_state(&self, db: &Path, state: &DbState) -> StagingResult<()> {
        let dir = self.db_dir(db)?;
        fs::create_dir_all(&dir)?;
        Ok(write_atomic(
            &dir.join(STATE_FILE),
            format_state(state).as_bytes(),
        )?)
    }
}

/// The per-page checksums of a database as of one staged TXID, saved at a clean stop, with
/// what the files looked like then. A start that finds the files unchanged takes them
/// instead of reading the whole database again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSums {
    pub txid: u64,
    /// An opaque description of the files (identity, size, times) at the stop.
    pub files: String,
    pub sums: Vec<PageHash>,
}

impl Staging {
    /// Saves `sums` for `db` (durably), replacing any saved before.
    pub fn save_sums(&self, db: &Path, saved: &SavedSums) -> StagingResult<()> {
        let dir = self.db_dir(db)?;
        fs::create_dir_all(&dir)?;
        let mut b = Vec::with_capacity(32 + saved.files.len() + 16 * saved.sums.len());
        b.extend_from_slice(SUMS_MAGIC);
        b.extend_from_slice(&saved.txid.to_be_bytes());
        b.extend_from_slice(&(saved.files.len() as u32).to_be_bytes());
        b.extend_from_slice(saved.files.as_bytes());
        b.extend_from_slice(&(saved.sums.len() as u64).to_be_bytes());
        for s in &saved.sums {
            b.extend_from_slice(&s.to_be_bytes());
        }
        let crc = crate::ltx::crc64(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        Ok(write_atomic(&dir.join(SUMS_FILE), &b)?)
    }

    /// Takes the saved sums of `db`: reads them and deletes the file (durably) before
    /// returning, so that they are used by one start at most. A damaged file counts as
    /// none.
    pub fn take_sums(&self, db: &Path) -> StagingResult<Option<SavedSums>> {
        let dir = self.db_dir(db)?;
        let path = dir.join(SUMS_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        fs::remove_file(&path)?;
        sync_dir(&dir)?;
        Ok(parse_sums(&bytes))
    }
}

fn parse_sums(b: &[u8]) -> Option<SavedSums> {
    let (body, crc) = b.split_at_checked(b.len().checked_sub(8)?)?;
    if crate::ltx::crc64(body) != u64::from_be_bytes(crc.try_into().ok()?) {
        return None;
    }
    let rest = body.strip_prefix(SUMS_MAGIC.as_slice())?;
    let (txid, rest) = rest.split_at_checked(8)?;
    let (flen, rest) = rest.split_at_checked(4)?;
    let flen = u32::from_be_bytes(flen.try_into().ok()?) as usize;
    let (files, rest) = rest.split_at_checked(flen)?;
    let (count, rest) = rest.split_at_checked(8)?;
    let count = usize::try_from(u64::from_be_bytes(count.try_into().ok()?)).ok()?;
    if rest.len() != count.checked_mul(16)? {
        return None;
    }
    Some(SavedSums {
        txid: u64::from_be_bytes(txid.try_into().ok()?),
        files: String::from_utf8(files.to_vec()).ok()?,
        sums: rest.chunks_exact(16).map(|c| be128(c, 0)).collect(),
    })
}

fn crc_of(text: &str) -> u64 {
    crate::ltx::crc64(text.as_bytes())
}

fn format_state(s: &DbState) -> String {
    let mut t = format!(
        "{STATE_MAGIC}\ntxid {}\npage_size {}\ncommit {}\ncontent {}\nuploaded_txid {}\n",
        s.txid, s.page_size, s.commit, s.checksum, s.uploaded_txid
    );
    if let Some(w) = &s.wal {
        let h = &w.header;
        t.push_str(&format!(
            "wal {} {} {} {} {} {} {} {} {} {}\n",
            u8::from(h.big_endian_checksum),
            h.page_size,
            h.checkpoint_seq,
            h.salt1,
            h.salt2,
            h.checksum[0],
            h.checksum[1],
            w.committed_end,
            w.checksum[0],
            w.checksum[1]
        ));
    }
    let crc = crc_of(&t);
    t.push_str(&format!("crc {crc:016x}\n"));
    t
}

fn parse_state(text: &str) -> Result<DbState, String> {
    let body_end = text
        .rfind("crc ")
        .ok_or_else(|| "no crc line".to_string())?;
    let (body, crc_line) = text.split_at(body_end);
    let stored = u64::from_str_radix(crc_line.trim_start_matches("crc ").trim(), 16)
        .map_err(|_| "bad crc line".to_string())?;
    if stored != crc_of(body) {
        return Err("crc mismatch".into());
    }
    let mut lines = body.lines();
    let v1 = match lines.next() {
        Some(STATE_MAGIC) => false,
        Some(STATE_MAGIC_V1) => true,
        _ => return Err("unknown format".into()),
    };
    let mut s = DbState::default();
    for line in lines {
        let mut it = line.split_ascii_whitespace();
        let key = it.next().unwrap_or_default();
        let vals: Vec<&str> = it.collect();
        let num = |i: usize| -> Result<u64, String> {
            vals.get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("bad value in {line:?}"))
        };
        let u32v = |i: usize| num(i).and_then(|v| u32::try_from(v).map_err(|e| e.to_string()));
        match key {
            "txid" => s.txid = num(0)?,
            "page_size" => s.page_size = u32v(0)?,
            "commit" => s.commit = u32v(0)?,
            "uploaded_txid" => s.uploaded_txid = num(0)?,
            "content" if !v1 => {
                s.checksum = vals
                    .first()
                    .and_then(|v| ContentChecksum::parse_hex(v))
                    .ok_or_else(|| format!("bad value in {line:?}"))?
            }
            "checksum" if v1 => {}
            "wal" => {
                if vals.len() != 10 {
                    return Err(format!("bad wal line {line:?}"));
                }
                let header = WalHeader {
                    big_endian_checksum: num(0)? != 0,
                    version: WAL_VERSION,
                    page_size: u32v(1)?,
                    checkpoint_seq: u32v(2)?,
                    salt1: u32v(3)?,
                    salt2: u32v(4)?,
                    checksum: [u32v(5)?, u32v(6)?],
                };
                s.wal = Some(WalPosition {
                    header,
                    committed_end: num(7)?,
                    checksum: [u32v(8)?, u32v(9)?],
                });
            }
            _ => return Err(format!("unknown key {key:?}")),
        }
    }
    if v1 {
        // Its CRC-64 checksum cannot be compared with blake3: match no database.
        s.page_size = 0;
    }
    Ok(s)
}

#[cfg(test)]
mod tests;

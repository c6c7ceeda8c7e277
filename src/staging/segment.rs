//! Segments: append-only files of captured transaction batches, the hot path's staging
//! format.
//!
//! A capture appends one record per batch of committed transactions to its database's
//! active segment with plain writes, no fsync: until a durable point, the same frames are
//! still in the backing `-wal`, which SQLite itself made durable, so a crash loses nothing
//! that cannot be read again. At a durable point the segment is fsynced
//! ([`SegmentWriter::sync`]), or its fsync is started on a helper thread so that it overlaps
//! with the application's own fsync ([`SegmentWriter::start_sync`]) and waited for at the
//! durable point; at an upload it is sealed ([`SegmentWriter::seal`]): fsynced and renamed to
//! `<min %016x>-<max %016x>.seg`.
//!
//! Pages are stored raw (the uploader compresses when it encodes LTX), so that an append
//! costs one copy and no compression on the application's barrier. A record:
//!
//! ```text
//! header  96 bytes  magic "WFSB", version 2, page size, commit (pages after max TXID),
//!                   min TXID, max TXID, timestamp (ms), page count, reserved, then the WAL
//!                   position read up to (flag, byte order, page size, checkpoint sequence,
//!                   salt-1, salt-2, header checksum ×2, committed end u64, chain ×2)
//!                   (all big-endian)
//! pages   count × (pgno u32 + page data), ascending pgno; an all-zero page is a page the
//!                   batch zeroed (the database shrank below it and grew again)
//! trailer 24 bytes  content checksum after max TXID (u128), CRC-64/GO-ISO of the record
//! ```
//!
//! The record CRC covers the header, each page's number and [`page_hash`] (which the
//! capture computes anyway for the content checksum), and the content checksum; a reader
//! recomputes the page hashes from the data. So every byte is verified, and the hot path
//! hashes each page once. Version 1 records (CRC-64 content checksum, 16-byte trailer) are
//! not read: they end a segment's valid prefix like a torn record, so their transactions
//! are read again from the WAL or healed with a snapshot.
//!
//! **Held pages.** A small batch appended with [`SegmentWriter::begin_held`] is not written
//! with its data. Its record is a *page list* (magic "WFSL", otherwise the same header and
//! trailer, then `count × pgno u32` instead of the pages; the CRC covers the header, the
//! page numbers and the content checksum), and the writer holds the newest content of
//! every page in memory (`held.rs`). Consecutive batches then share one copy of each
//! page: the content is written once, as one page-bearing record that covers every held
//! TXID, when the segment is sealed, before any other record, or when the holding grows past
//! its limit. The page lists are what make this safe:
//! - they are appended at once, so a crash of the process keeps them, and fsynced at the
//!   same durable points as page-bearing records;
//! - until the content is written, the pages they list are in the database's files, at the
//!   WAL position the last list records: a restarted capture that finds the files at that
//!   position (by the content checksum) reads them from there ([`SegmentWriter::listed_run`],
//!   [`SegmentWriter::adopt_listed`]); otherwise it heals with a snapshot, as for any gap.
//!
//! A page list is superseded by the page-bearing record that follows it, which starts at
//! the first held TXID: readers of sealed segments skip page lists ([`RecordKind`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::OnceLock;

use std::collections::BTreeSet;

use super::error::{StagingError, StagingResult};
use super::held::{Held, HeldBatch};
use crate::ltx::Crc64;
use crate::sqlite::{
    be128, be32, be64, page_hash, page_size_is_valid, ContentChecksum, PageHash, WalHeader,
    WalPosition, WAL_VERSION,
};

/// "WFSB": a record with its pages.
const RECORD_MAGIC: u32 = 0x5746_5342;
/// "WFSL": a page list (the pages are held in memory by the writer).
const LIST_MAGIC: u32 = 0x5746_534c;
const RECORD_VERSION: u32 = 2;
const HEADER_SIZE: usize = 96;
const TRAILER_SIZE: usize = 24;
/// Appends are flushed to the file in chunks of this size.
const FLUSH_AT: usize = 1 << 20;
/// The largest held batch buffer kept for reuse (per database: a mount of a thousand
/// databases keeps one each).
const SPARE_BATCH_BYTES: usize = 256 << 10;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// The batch's page numbers and data.
    Pages,
    /// The batch's page numbers only: their content was held in memory (see the module
    /// header) and is in a later [`RecordKind::Pages`] record, or in the database's files.
    PageList,
}

/// What one record covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub page_size: u32,
    /// Database size in pages after `max_txid`.
    pub commit: u32,
    pub min_txid: u64,
    pub max_txid: u64,
    /// Commit time of the newest transaction, ms since the Unix epoch.
    pub timestamp_ms: i64,
    pub page_count: u32,
    /// Where the WAL was read up to after `max_txid`: a restarted walfs resumes there.
    pub wal: Option<WalPosition>,
}

impl BatchHeader {
    fn encode(&self, kind: RecordKind) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        let magic = match kind {
            RecordKind::Pages => RECORD_MAGIC,
            RecordKind::PageList => LIST_MAGIC,
        };
        b[0..4].copy_from_slice(&magic.to_be_bytes());
        b[4..8].copy_from_slice(&RECORD_VERSION.to_be_bytes());
        b[8..12].copy_from_slice(&self.page_size.to_be_bytes());
        b[12..16].copy_from_slice(&self.commit.to_be_bytes());
        b[16..24].copy_from_slice(&self.min_txid.to_be_bytes());
        b[24..32].copy_from_slice(&self.max_txid.to_be_bytes());
        b[32..40].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        b[40..44].copy_from_slice(&self.page_count.to_be_bytes());
        if let Some(w) = &self.wal {
            let h = &w.header;
            let words = [
                1,
                u32::from(h.big_endian_checksum),
                h.page_size,
                h.checkpoint_seq,
                h.salt1,
                h.salt2,
                h.checksum[0],
                h.checksum[1],
            ];
            for (i, v) in words.iter().enumerate() {
                b[48 + 4 * i..52 + 4 * i].copy_from_slice(&v.to_be_bytes());
            }
            b[80..88].copy_from_slice(&w.committed_end.to_be_bytes());
            b[88..92].copy_from_slice(&w.checksum[0].to_be_bytes());
            b[92..96].copy_from_slice(&w.checksum[1].to_be_bytes());
        }
        b
    }

    fn decode(b: &[u8; HEADER_SIZE]) -> Option<(BatchHeader, RecordKind)> {
        let u32_at = |i: usize| be32(b, i);
        let u64_at = |i: usize| be64(b, i);
        let kind = match u32_at(0) {
            RECORD_MAGIC => RecordKind::Pages,
            LIST_MAGIC => RecordKind::PageList,
            _ => return None,
        };
        if u32_at(4) != RECORD_VERSION {
            return None;
        }
        let h = BatchHeader {
            page_size: u32_at(8),
            commit: u32_at(12),
            min_txid: u64_at(16),
            max_txid: u64_at(24),
            timestamp_ms: u64_at(32) as i64,
            page_count: u32_at(40),
            wal: (u32_at(48) == 1).then(|| WalPosition {
                header: WalHeader {
                    big_endian_checksum: u32_at(52) != 0,
                    version: WAL_VERSION,
                    page_size: u32_at(56),
                    checkpoint_seq: u32_at(60),
                    salt1: u32_at(64),
                    salt2: u32_at(68),
                    checksum: [u32_at(72), u32_at(76)],
                },
                committed_end: u64_at(80),
                checksum: [u32_at(88), u32_at(92)],
            }),
        };
        let sane = page_size_is_valid(h.page_size) && h.min_txid >= 1 && h.min_txid <= h.max_txid;
        sane.then_some((h, kind))
    }

    /// Length of the whole record of this kind.
    pub fn record_len(&self, kind: RecordKind) -> u64 {
        let per_page = match kind {
            RecordKind::Pages => 4 + u64::from(self.page_size),
            RecordKind::PageList => 4,
        };
        HEADER_SIZE as u64 + u64::from(self.page_count) * per_page + TRAILER_SIZE as u64
    }
}

/// One record of a segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub header: BatchHeader,
    pub kind: RecordKind,
    /// The content checksum of the database after `max_txid`.
    pub post_checksum: ContentChecksum,
    /// The segment file.
    pub path: PathBuf,
    /// Where the record starts in it.
    pub offset: u64,
}

impl Batch {
    fn has_pages(&self) -> StagingResult<()> {
        match self.kind {
            RecordKind::Pages => Ok(()),
            RecordKind::PageList => Err(StagingError::internal(format!(
                "{}: the record of TXIDs {}-{} lists pages without their data",
                self.path.display(),
                self.header.min_txid,
                self.header.max_txid
            ))),
        }
    }

    /// Reads the record's pages in order.
    pub fn read_pages(&self, mut f: impl FnMut(u32, &[u8]) -> io::Result<()>) -> StagingResult<()> {
        self.has_pages()?;
        let mut file = File::open(&self.path)?;
        io::Seek::seek(
            &mut file,
            io::SeekFrom::Start(self.offset + HEADER_SIZE as u64),
        )?;
        let mut r = BufReader::with_capacity(256 * 1024, file);
        let mut buf = vec![0u8; 4 + self.header.page_size as usize];
        for _ in 0..self.header.page_count {
            r.read_exact(&mut buf)?;
            let pgno = be32(&buf, 0);
            f(pgno, &buf[4..])?;
        }
        Ok(())
    }

    /// The page numbers in the record with the file offset of each page's data.
    pub fn page_offsets(&self) -> StagingResult<Vec<(u32, u64)>> {
        self.has_pages()?;
        let file = File::open(&self.path)?;
        let stride = 4 + u64::from(self.header.page_size);
        let base = self.offset + HEADER_SIZE as u64;
        let mut out = Vec::with_capacity(self.header.page_count as usize);
        let mut b = [0u8; 4];
        for i in 0..u64::from(self.header.page_count) {
            file.read_exact_at(&mut b, base + i * stride)?;
            out.push((u32::from_be_bytes(b), base + i * stride + 4));
        }
        Ok(out)
    }
}

/// Reads the valid records at the start of a segment file: stops at the first record that
/// is incomplete or fails its CRC. Returns them and the length of that valid prefix.
pub fn read_segment(path: &Path) -> StagingResult<(Vec<Batch>, u64)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(256 * 1024, file);
    let mut out = Vec::new();
    let mut offset = 0u64;
    let mut buf = Vec::new();
    while offset + (HEADER_SIZE + TRAILER_SIZE) as u64 <= len {
        let mut hb = [0u8; HEADER_SIZE];
        r.read_exact(&mut hb)?;
        let Some((header, kind)) = BatchHeader::decode(&hb) else {
            break;
        };
        let rec_len = header.record_len(kind);
        if offset + rec_len > len {
            break;
        }
        let mut digest = Crc64::new();
        digest.update(&hb);
        match kind {
            RecordKind::Pages => {
                buf.resize(4 + header.page_size as usize, 0);
                for _ in 0..header.page_count {
                    r.read_exact(&mut buf)?;
                    let pgno = be32(&buf, 0);
                    digest.update(&buf[..4]);
                    digest.update(&page_hash(pgno, &buf[4..]).to_be_bytes());
                }
            }
            RecordKind::PageList => {
                buf.resize(4 * header.page_count as usize, 0);
                r.read_exact(&mut buf)?;
                digest.update(&buf);
            }
        }
        let mut tb = [0u8; TRAILER_SIZE];
        r.read_exact(&mut tb)?;
        digest.update(&tb[..16]);
        if digest.finalize().to_be_bytes() != tb[16..24] {
            break;
        }
        out.push(Batch {
            header,
            kind,
            post_checksum: content_checksum_at(&tb),
            path: path.to_path_buf(),
            offset,
        });
        offset += rec_len;
    }
    Ok((out, offset))
}

/// The page numbers a page list record holds.
fn listed_pages(batch: &Batch) -> io::Result<Vec<u32>> {
    let mut b = vec![0u8; 4 * batch.header.page_count as usize];
    File::open(&batch.path)?.read_exact_at(&mut b, batch.offset + HEADER_SIZE as u64)?;
    Ok(b.chunks_exact(4).map(|c| be32(c, 0)).collect())
}

/// The content checksum in a record's trailer.
fn content_checksum_at(trailer: &[u8; TRAILER_SIZE]) -> ContentChecksum {
    ContentChecksum::from_value(be128(trailer, 0))
}

/// The records of a sealed segment, read from their headers and trailers alone (the
/// uploader's view: it reads each page it needs once, when it encodes). Page data is
/// verified against the record CRC by [`read_segment`], when a segment is recovered after a
/// restart; a page damaged in between is caught by restore's content checksum.
pub fn list_records(path: &Path) -> StagingResult<Vec<Batch>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut out = Vec::new();
    let mut offset = 0u64;
    while offset + (HEADER_SIZE + TRAILER_SIZE) as u64 <= len {
        let mut hb = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut hb, offset)?;
        let Some((header, kind)) = BatchHeader::decode(&hb) else {
            break;
        };
        let rec_len = header.record_len(kind);
        if offset + rec_len > len {
            break;
        }
        let mut tb = [0u8; TRAILER_SIZE];
        file.read_exact_at(&mut tb, offset + rec_len - TRAILER_SIZE as u64)?;
        out.push(Batch {
            header,
            kind,
            post_checksum: content_checksum_at(&tb),
            path: path.to_path_buf(),
            offset,
        });
        offset += rec_len;
    }
    Ok(out)
}

/// The name of a sealed segment.
pub fn sealed_name(min_txid: u64, max_txid: u64) -> String {
    format!("{min_txid:016x}-{max_txid:016x}.seg")
}

/// Parses [`sealed_name`].
pub fn parse_sealed_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".seg")?;
    let (a, b) = stem.split_once('-')?;
    if a.len() != 16 || b.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

/// The active segment of one database, appended to by its capture.
#[derive(Debug)]
pub struct SegmentWriter {
    path: PathBuf,
    file: File,
    len: u64,
    txids: Option<(u64, u64)>,
    unsynced: bool,
    /// An fdatasync started by [`start_sync`](Self::start_sync), not yet waited for.
    in_flight: Option<Receiver<io::Result<()>>>,
    /// The pages of the batches appended as page lists since the last page-bearing record.
    held: Option<Held>,
    /// Page lists at the end of the segment as it was opened, whose pages were held by a
    /// process that stopped without writing them (see [`listed_run`](Self::listed_run)).
    listed: Option<ListedRun>,
    /// The last held batch's buffers, to reuse.
    spare_batch: Option<HeldBatch>,
}

/// The page lists at the end of an active segment that no page-bearing record follows:
/// what a capture that stopped without sealing held in memory. Their pages are in the
/// database's files at the WAL position of the last one, if the files still hold that
/// state (its content checksum is `post_checksum`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRun {
    /// The first TXID of the run.
    pub min_txid: u64,
    /// The header of the run's last record (its TXID, size and WAL position).
    pub last: BatchHeader,
    /// The content checksum after the run.
    pub post_checksum: ContentChecksum,
    /// Every page the run changed that the database still has after it.
    pub pages: BTreeSet<u32>,
    /// Where the run starts in the file, and the TXIDs of the records before it.
    offset: u64,
    txids_before: Option<(u64, u64)>,
}

/// A segment's file descriptor to fdatasync, and where its result goes.
type SyncJob = (File, Sender<io::Result<()>>);

/// The thread that runs the fdatasyncs [`SegmentWriter::start_sync`] hands off: one for the
/// process, started at the first hand-off. Each job is a duplicate of a segment's file
/// descriptor and the channel its result goes back on.
fn background_syncer() -> &'static Sender<SyncJob> {
    static SYNCER: OnceLock<Sender<SyncJob>> = OnceLock::new();
    SYNCER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SyncJob>();
        std::thread::Builder::new()
            .name("walfs-segsync".into())
            .spawn(move || {
                for (file, done) in rx {
                    let _ = done.send(file.sync_data());
                }
            })
            .expect("cannot start the segment sync thread");
        tx
    })
}

/// The page lists that end `records` (after the last page-bearing record), if any.
fn trailing_run(records: &[Batch]) -> io::Result<Option<ListedRun>> {
    let first = records
        .iter()
        .rposition(|b| b.kind == RecordKind::Pages)
        .map_or(0, |i| i + 1);
    let run = &records[first..];
    let Some(last) = run.last() else {
        return Ok(None);
    };
    let mut pages = BTreeSet::new();
    for b in run {
        // A shrink drops the pages past the new end, as the held merge does.
        pages.split_off(&b.header.commit.saturating_add(1));
        pages.extend(listed_pages(b)?);
    }
    pages.split_off(&last.header.commit.saturating_add(1));
    Ok(Some(ListedRun {
        min_txid: run[0].header.min_txid,
        last: last.header,
        post_checksum: last.post_checksum,
        pages,
        offset: run[0].offset,
        txids_before: first
            .checked_sub(1)
            .map(|i| (records[0].header.min_txid, records[i].header.max_txid)),
    }))
}

impl SegmentWriter {
    /// Opens (creating) the active segment at `path`, keeping its valid records and
    /// cutting off anything after them (a record torn by a crash).
    pub fn open(path: &Path) -> StagingResult<SegmentWriter> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let (records, valid) = read_segment(path)?;
        if file.metadata()?.len() != valid {
            file.set_len(valid)?;
        }
        let txids = match (records.first(), records.last()) {
            (Some(a), Some(b)) => Some((a.header.min_txid, b.header.max_txid)),
            _ => None,
        };
        Ok(SegmentWriter {
            path: path.to_path_buf(),
            file,
            len: valid,
            txids,
            unsynced: valid > 0,
            in_flight: None,
            held: None,
            listed: trailing_run(&records)?,
            spare_batch: None,
        })
    }

    /// Whether the segment holds no record.
    pub fn is_empty(&self) -> bool {
        self.txids.is_none()
    }

    /// The TXIDs the segment covers.
    pub fn txids(&self) -> Option<(u64, u64)> {
        self.txids
    }

    /// Starts appending a record with its pages; it is written only by
    /// [`RecordWriter::finish`]. Held pages are written first (as their own record), so
    /// that records stay in TXID order.
    pub fn begin(&mut self, header: BatchHeader) -> StagingResult<RecordWriter<'_>> {
        self.write_held()?;
        Ok(self.record_writer(header, false))
    }

    /// Starts appending a batch whose pages are held in memory, merged with the held pages
    /// of the batches before it, and recorded as a page list (see the module header). A
    /// batch too large to hold, or one that does not continue the held ones, is written
    /// with its pages as [`begin`](Self::begin) does.
    pub fn begin_held(&mut self, header: BatchHeader) -> StagingResult<RecordWriter<'_>> {
        let bytes = u64::from(header.page_count) * u64::from(header.page_size);
        if let Some(h) = &self.held {
            if !h.continues_with(&header) || !h.can_take(bytes) {
                self.write_held()?;
            }
        }
        let hold = Held::may_start(bytes);
        if !hold {
            self.write_held()?;
        }
        Ok(self.record_writer(header, hold))
    }

    fn record_writer(&mut self, header: BatchHeader, hold: bool) -> RecordWriter<'_> {
        let mut digest = Crc64::new();
        let mut buf = Vec::new();
        let held = if hold {
            let mut batch = self.spare_batch.take().unwrap_or_default();
            batch.clear();
            Some(batch)
        } else {
            let hb = header.encode(RecordKind::Pages);
            digest.update(&hb);
            buf.reserve(
                (header.record_len(RecordKind::Pages) as usize)
                    .min(FLUSH_AT + 4 + header.page_size as usize),
            );
            buf.extend_from_slice(&hb);
            None
        };
        let start = self.len;
        RecordWriter {
            seg: self,
            header,
            digest,
            buf,
            start,
            flushed: 0,
            pages: 0,
            held,
            done: false,
        }
    }

    /// Writes the held pages as one record with their data (the TXIDs of every held batch),
    /// not yet durable. On failure they stay held.
    pub fn write_held(&mut self) -> StagingResult<()> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        let res = (|| {
            let mut w = self.record_writer(held.merged_header(), false);
            for (pgno, hash, data) in held.pages() {
                w.add_page(pgno, data, hash)?;
            }
            w.finish(held.post_checksum())
        })();
        if res.is_err() {
            self.held = Some(held);
        }
        res
    }

    /// The TXIDs whose pages are held in memory, if any.
    pub fn held_txids(&self) -> Option<(u64, u64)> {
        self.held.as_ref().map(|h| h.txids())
    }

    /// The page lists a process that stopped without sealing left at the end of the
    /// segment, until they are [adopted](Self::adopt_listed) or
    /// [abandoned](Self::abandon_listed).
    pub fn listed_run(&self) -> Option<&ListedRun> {
        self.listed.as_ref()
    }

    /// Holds the pages of the [listed run](Self::listed_run), read back from the database's
    /// files at its last WAL position: `pages` has the content and [`page_hash`] of every
    /// page it lists.
    pub fn adopt_listed(&mut self, pages: &HeldBatch) -> StagingResult<()> {
        let Some(run) = self.listed.take() else {
            return Err(StagingError::internal("no listed pages to adopt"));
        };
        if self.held.is_some() || !pages.pgnos().eq(run.pages.iter().copied()) {
            self.listed = Some(run);
            return Err(StagingError::internal(
                "the pages read back are not the listed ones",
            ));
        }
        self.held = Some(Held::adopt(
            run.min_txid,
            run.last,
            run.post_checksum,
            pages,
        ));
        Ok(())
    }

    /// Drops the [listed run](Self::listed_run) from the segment: its pages cannot be read
    /// back (the files moved past its state), and the capture heals with a snapshot.
    pub fn abandon_listed(&mut self) -> StagingResult<()> {
        let Some(run) = self.listed.take() else {
            return Ok(());
        };
        self.file.set_len(run.offset)?;
        self.len = run.offset;
        self.txids = run.txids_before;
        self.unsynced = true;
        Ok(())
    }

    /// Whether records were appended since the last fdatasync was started.
    #[cfg(test)]
    pub fn has_unsynced(&self) -> bool {
        self.unsynced
    }

    /// Starts making every record written so far durable (fdatasync) on the sync thread, so
    /// that it overlaps with whatever the caller does next; [`sync`](Self::sync) waits for it.
    /// Nothing is started while an earlier one is still running (`sync` covers the rest).
    pub fn start_sync(&mut self) -> StagingResult<()> {
        if !self.unsynced || self.in_flight.is_some() {
            return Ok(());
        }
        let file = self.file.try_clone()?;
        let (tx, rx) = mpsc::channel();
        if background_syncer().send((file, tx)).is_ok() {
            self.in_flight = Some(rx);
            self.unsynced = false;
        }
        Ok(())
    }

    /// Waits for the fdatasync [`start_sync`](Self::start_sync) started. If it failed, the
    /// records it covered count as unsynced again and its error is returned (a failed
    /// fsync is reported once, so it is not retried as if it had succeeded).
    fn wait_in_flight(&mut self) -> StagingResult<()> {
        let Some(rx) = self.in_flight.take() else {
            return Ok(());
        };
        let res = match rx.recv() {
            Ok(synced) => synced.map_err(StagingError::from),
            Err(_) => Err(StagingError::internal("the segment sync thread stopped")),
        };
        if res.is_err() {
            self.unsynced = true;
        }
        res
    }

    /// Makes every record durable (fdatasync). Held pages stay held: their page lists are
    /// what must be durable.
    pub fn sync(&mut self) -> StagingResult<()> {
        self.wait_in_flight()?;
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Writes the held pages, seals the segment into `dir` as `<min>-<max>.seg` (fsynced,
    /// renamed, the directory fsynced) and starts an empty one. Returns the sealed file, if
    /// it held anything.
    pub fn seal(&mut self) -> StagingResult<Option<PathBuf>> {
        self.write_held()?;
        let Some((min, max)) = self.txids else {
            return Ok(None);
        };
        self.wait_in_flight()?;
        self.file.sync_all()?;
        let dir = self.path.parent().expect("segment has a directory");
        let sealed = dir.join(sealed_name(min, max));
        fs::rename(&self.path, &sealed)?;
        let fresh = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)?;
        File::open(dir)?.sync_all()?;
        self.file = fresh;
        self.len = 0;
        self.txids = None;
        self.unsynced = false;
        self.listed = None;
        Ok(Some(sealed))
    }
}

/// One record being appended; dropping it unfinished cuts the file back.
pub struct RecordWriter<'a> {
    seg: &'a mut SegmentWriter,
    header: BatchHeader,
    digest: Crc64,
    buf: Vec<u8>,
    start: u64,
    flushed: u64,
    pages: u32,
    /// The batch's pages, when they are to be held rather than written.
    held: Option<HeldBatch>,
    done: bool,
}

impl RecordWriter<'_> {
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.seg
                .file
                .write_all_at(&self.buf, self.start + self.flushed)?;
            self.flushed += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Adds the next page (ascending page numbers, exactly `page_count` of them), with its
    /// [`page_hash`].
    pub fn add_page(&mut self, pgno: u32, data: &[u8], hash: PageHash) -> StagingResult<()> {
        if data.len() != self.header.page_size as usize || self.pages >= self.header.page_count {
            return Err(StagingError::internal(format!(
                "segment record: page {pgno} does not fit its header"
            )));
        }
        debug_assert_eq!(hash, page_hash(pgno, data));
        self.pages += 1;
        if let Some(held) = &mut self.held {
            held.add(pgno, hash, data);
            return Ok(());
        }
        let b = pgno.to_be_bytes();
        self.digest.update(&b);
        self.digest.update(&hash.to_be_bytes());
        self.buf.extend_from_slice(&b);
        self.buf.extend_from_slice(data);
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the trailer; the record is then part of the segment (not yet durable). A held
    /// batch writes its page list, and its pages join the held ones.
    pub fn finish(mut self, post_checksum: ContentChecksum) -> StagingResult<()> {
        if self.pages != self.header.page_count {
            return Err(StagingError::internal(format!(
                "segment record: {} pages written, {} announced",
                self.pages, self.header.page_count
            )));
        }
        if let Some(held) = &self.held {
            let hb = self.header.encode(RecordKind::PageList);
            self.digest.update(&hb);
            self.buf.extend_from_slice(&hb);
            for pgno in held.pgnos() {
                self.buf.extend_from_slice(&pgno.to_be_bytes());
            }
            self.digest.update(&self.buf[HEADER_SIZE..]);
        }
        let pc = post_checksum.value().to_be_bytes();
        self.digest.update(&pc);
        let digest = std::mem::take(&mut self.digest);
        let crc = digest.finalize();
        self.buf.extend_from_slice(&pc);
        self.buf.extend_from_slice(&crc.to_be_bytes());
        self.flush()?;
        self.done = true;
        let header = self.header;
        let seg = &mut *self.seg;
        seg.len = self.start + self.flushed;
        seg.txids = Some(match seg.txids {
            Some((min, _)) => (min, header.max_txid),
            None => (header.min_txid, header.max_txid),
        });
        seg.unsynced = true;
        if let Some(batch) = self.held.take() {
            match &mut seg.held {
                Some(h) => h.apply(&header, post_checksum, &batch),
                None => seg.held = Some(Held::start(&header, post_checksum, &batch)),
            }
            // Its buffers serve the next batch, unless a large batch grew them.
            if batch.capacity() <= SPARE_BATCH_BYTES {
                seg.spare_batch = Some(batch);
            }
        }
        Ok(())
    }
}

impl Drop for RecordWriter<'_> {
    fn drop(&mut self) {
        if !self.done && self.flushed > 0 {
            let _ = self.seg.file.set_len(self.start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(min: u64, max: u64, pages: u32) -> BatchHeader {
        BatchHeader {
            page_size: 512,
            commit: 10,
            min_txid: min,
            max_txid: max,
            timestamp_ms: 7,
            page_count: pages,
            wal: Some(WalPosition {
                header: WalHeader::new(false, 512, 1, 2, 3),
                committed_end: 32 + 3 * 536,
                checksum: [5, 6],
            }),
        }
    }

    fn add(r: &mut RecordWriter<'_>, pgno: u32, fill: u8) {
        let data = [fill; 512];
        r.add_page(pgno, &data, page_hash(pgno, &data)).unwrap();
    }

    #[test]
    fn append_read_tear_and_seal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("active");
        let mut w = SegmentWriter::open(&path).unwrap();
        assert!(w.is_empty());
        let mut r = w.begin(header(1, 3, 2)).unwrap();
        add(&mut r, 1, 1);
        add(&mut r, 4, 4);
        r.finish(ContentChecksum::from_value(99)).unwrap();
        // A record abandoned halfway leaves nothing.
        {
            let mut r = w.begin(header(4, 4, 3000)).unwrap();
            for p in 1..=2100 {
                add(&mut r, p, 9);
            }
        }
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            header(1, 3, 2).record_len(RecordKind::Pages)
        );
        let mut r = w.begin(header(4, 4, 1)).unwrap();
        add(&mut r, 2, 2);
        r.finish(ContentChecksum::from_value(100)).unwrap();
        let (recs, valid) = read_segment(&path).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(list_records(&path).unwrap(), recs);
        assert_eq!(recs[1].post_checksum, ContentChecksum::from_value(100));
        assert_eq!(recs[1].header, header(4, 4, 1));
        let mut seen = Vec::new();
        recs[0]
            .read_pages(|p, d| {
                seen.push((p, d[0]));
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, vec![(1, 1), (4, 4)]);
        let offs = recs[1].page_offsets().unwrap();
        assert_eq!(offs.len(), 1);
        let mut b = [0u8; 512];
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut b, offs[0].1)
            .unwrap();
        assert_eq!(b, [2u8; 512]);

        // A torn tail (a crash mid-append) is cut off at reopen; a flipped byte too.
        drop(w);
        let f = OpenOptions::new().append(true).open(&path).unwrap();
        io::Write::write_all(&mut &f, &header(5, 5, 1).encode(RecordKind::Pages)).unwrap();
        let mut w = SegmentWriter::open(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), valid);
        assert_eq!(w.txids(), Some((1, 4)));
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER_SIZE + 10] ^= 1;
        let corrupt = dir.path().join("corrupt");
        fs::write(&corrupt, &bytes).unwrap();
        assert_eq!(read_segment(&corrupt).unwrap().0.len(), 0);

        let sealed = w.seal().unwrap().unwrap();
        assert_eq!(
            sealed.file_name().unwrap().to_str().unwrap(),
            sealed_name(1, 4)
        );
        assert_eq!(parse_sealed_name(&sealed_name(1, 4)), Some((1, 4)));
        assert!(w.is_empty());
        assert_eq!(fs::metadata(&path).unwrap().len(), 0);
        assert_eq!(read_segment(&sealed).unwrap().0.len(), 2);
        assert_eq!(w.seal().unwrap(), None);
    }

    /// A sync started on the helper thread is waited for by `sync` and `seal`; records
    /// written while it runs stay unsynced until the next sync.
    #[test]
    fn background_sync_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("active");
        let mut w = SegmentWriter::open(&path).unwrap();
        w.start_sync().unwrap();
        assert!(w.in_flight.is_none(), "nothing to sync");
        let mut r = w.begin(header(1, 1, 1)).unwrap();
        add(&mut r, 1, 1);
        r.finish(ContentChecksum::from_value(1)).unwrap();
        w.start_sync().unwrap();
        assert!(w.in_flight.is_some() && !w.unsynced);
        let mut r = w.begin(header(2, 2, 1)).unwrap();
        add(&mut r, 2, 2);
        r.finish(ContentChecksum::from_value(2)).unwrap();
        assert!(w.unsynced);
        // A second start while one runs leaves the new record to `sync`.
        w.start_sync().unwrap();
        w.sync().unwrap();
        assert!(w.in_flight.is_none() && !w.unsynced);
        w.start_sync().unwrap();
        let mut r = w.begin(header(3, 3, 1)).unwrap();
        add(&mut r, 3, 3);
        r.finish(ContentChecksum::from_value(3)).unwrap();
        w.start_sync().unwrap();
        let sealed = w.seal().unwrap().unwrap();
        assert!(w.in_flight.is_none());
        assert_eq!(read_segment(&sealed).unwrap().0.len(), 3);
    }

    /// Held batches write page lists; their pages are merged in memory (newest version,
    /// pages past a shrink dropped) and written once, as one record of all their TXIDs,
    /// before the seal. Readers of the sealed segment see that record.
    #[test]
    fn held_batches_are_listed_then_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("active");
        let mut w = SegmentWriter::open(&path).unwrap();
        let held = |w: &mut SegmentWriter, min: u64, commit: u32, pages: &[(u32, u8)]| {
            let mut h = header(min, min, pages.len() as u32);
            h.commit = commit;
            let mut r = w.begin_held(h).unwrap();
            for &(p, fill) in pages {
                add(&mut r, p, fill);
            }
            r.finish(ContentChecksum::from_value(min.into())).unwrap();
        };
        held(&mut w, 1, 10, &[(1, 1), (9, 1), (10, 1)]);
        held(&mut w, 2, 10, &[(1, 2), (3, 2)]);
        // A shrink below page 9, then page 9 again (as the batch merge writes it).
        held(&mut w, 3, 8, &[(2, 3)]);
        held(&mut w, 4, 9, &[(9, 4)]);
        assert_eq!(w.held_txids(), Some((1, 4)));
        let (recs, len) = read_segment(&path).unwrap();
        assert_eq!(recs.len(), 4);
        assert!(recs.iter().all(|r| r.kind == RecordKind::PageList));
        assert!(
            recs[0].read_pages(|_, _| Ok(())).is_err(),
            "no data to read"
        );
        assert_eq!(
            len,
            4 * (HEADER_SIZE + TRAILER_SIZE) as u64 + 4 * 7,
            "page numbers only"
        );
        // A batch with its pages (e.g. a rollback commit) writes the held ones first.
        let mut r = w.begin(header(5, 5, 1)).unwrap();
        add(&mut r, 4, 5);
        r.finish(ContentChecksum::from_value(5)).unwrap();
        assert_eq!(w.held_txids(), None);
        let sealed = w.seal().unwrap().unwrap();
        let pages: Vec<Batch> = list_records(&sealed)
            .unwrap()
            .into_iter()
            .filter(|b| b.kind == RecordKind::Pages)
            .collect();
        assert_eq!(pages.len(), 2);
        let merged = &pages[0];
        assert_eq!(
            (
                merged.header.min_txid,
                merged.header.max_txid,
                merged.header.commit
            ),
            (1, 4, 9)
        );
        assert_eq!(merged.post_checksum, ContentChecksum::from_value(4));
        let mut seen = Vec::new();
        merged
            .read_pages(|p, d| {
                seen.push((p, d[0]));
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, vec![(1, 2), (2, 3), (3, 2), (9, 4)]);
        assert_eq!(
            read_segment(&sealed).unwrap().0.len(),
            6,
            "every record is valid"
        );
    }

    /// Page lists that no page-bearing record follows (a stopped process held their pages)
    /// are found at reopen: adopted with the pages read back, they are written at the seal;
    /// abandoned, they are cut off.
    #[test]
    fn a_trailing_run_of_page_lists_is_adopted_or_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("active");
        let mut w = SegmentWriter::open(&path).unwrap();
        let mut r = w.begin(header(1, 1, 1)).unwrap();
        add(&mut r, 1, 1);
        r.finish(ContentChecksum::from_value(1)).unwrap();
        for (txid, pages) in [(2u64, &[2u32, 5][..]), (3, &[5, 7][..])] {
            let mut r = w
                .begin_held(header(txid, txid, pages.len() as u32))
                .unwrap();
            for &p in pages {
                add(&mut r, p, txid as u8);
            }
            r.finish(ContentChecksum::from_value(txid.into())).unwrap();
        }
        let full_len = fs::metadata(&path).unwrap().len();
        drop(w);

        let copy = dir.path().join("copy");
        fs::copy(&path, &copy).unwrap();
        let mut w = SegmentWriter::open(&path).unwrap();
        let run = w.listed_run().unwrap().clone();
        assert_eq!((run.min_txid, run.last.max_txid), (2, 3));
        assert_eq!(run.post_checksum, ContentChecksum::from_value(3));
        assert_eq!(run.pages.iter().copied().collect::<Vec<_>>(), vec![2, 5, 7]);
        let mut wrong = HeldBatch::default();
        wrong.add(2, 0, &[0; 512]);
        assert!(w.adopt_listed(&wrong).is_err(), "not the listed pages");
        let mut back = HeldBatch::default();
        for p in [2u32, 5, 7] {
            let d = [p as u8 + 100; 512];
            back.add(p, page_hash(p, &d), &d);
        }
        w.adopt_listed(&back).unwrap();
        assert_eq!(w.held_txids(), Some((2, 3)));
        let sealed = w.seal().unwrap().unwrap();
        let recs = list_records(&sealed).unwrap();
        let last = recs.last().unwrap();
        assert_eq!(last.kind, RecordKind::Pages);
        assert_eq!((last.header.min_txid, last.header.max_txid), (2, 3));
        assert_eq!(last.header.page_count, 3);

        let mut w = SegmentWriter::open(&copy).unwrap();
        assert!(w.listed_run().is_some());
        w.abandon_listed().unwrap();
        assert_eq!(w.txids(), Some((1, 1)));
        assert!(fs::metadata(&copy).unwrap().len() < full_len);
        drop(w);
        let w = SegmentWriter::open(&copy).unwrap();
        assert!(w.listed_run().is_none());
        assert_eq!(read_segment(&copy).unwrap().0.len(), 1);
    }

    /// A batch larger than a segment may hold is written with its pages at once.
    #[test]
    fn a_batch_too_large_to_hold_is_written_with_its_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("active");
        let mut w = SegmentWriter::open(&path).unwrap();
        let n = (64 * 1024 * 1024 / 512 + 1) as u32;
        let mut h = header(1, 1, n);
        h.commit = n;
        let mut r = w.begin_held(h).unwrap();
        for p in 1..=n {
            add(&mut r, p, 1);
        }
        r.finish(ContentChecksum::from_value(1)).unwrap();
        assert_eq!(w.held_txids(), None);
        let recs = list_records(&path).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].kind, RecordKind::Pages);
    }
}

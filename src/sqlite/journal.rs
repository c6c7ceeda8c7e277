//! The SQLite rollback journal (`-journal` file): headers, page records, the journal
//! checksum, and the pages a rollback-mode commit changed (fileformat2.html §3; `pager.c`).
//!
//! This file owns:
//! - [`JournalHeader`] and [`header_state`] / [`is_hot_or_valid`]: what the first bytes of a
//!   journal say (valid, not yet synced, zeroed by a PERSIST commit, or garbage);
//! - [`journal_checksum`]: SQLite's `pager_cksum`, the record checksum;
//! - [`scan_journal`]: every page record across all segments, as SQLite's `pager_playback`
//!   would read them ([`JournalReadMode::Rollback`]) or as the live writer knows them
//!   ([`JournalReadMode::Live`]);
//! - [`changed_pages`]: journaled pages ∪ pages past the original size, for a commit.
//!
//! Format facts relied on (checked against `pager.c` of the bundled SQLite):
//! - A header is 28 bytes: magic `d9 d5 05 f9 20 a1 63 d7`, record count, checksum nonce,
//!   database size in pages before the transaction, sector size, page size (big-endian).
//!   It occupies a whole sector; records follow it.
//! - A record is the page number, the page's original content and a checksum:
//!   `nonce + page[page_size - 200] + page[page_size - 400] + ...` for every positive index.
//! - SQLite writes the header with the magic and record count *zeroed* and fills them in
//!   when it syncs the journal (before it writes any database page), unless it runs with
//!   synchronous=OFF (then magic and count 0xFFFFFFFF, "up to end of file", at once).
//! - Each time a cache spill syncs the journal mid-transaction, SQLite starts a new segment:
//!   a new header (new nonce) at the next sector boundary. Only the first header's sector
//!   and page size and original database size are used.
//! - Playback stops at a page number of 0, at the lock-byte page (which marks the
//!   super-journal record), at a bad checksum, or at a short read; records of pages past
//!   the original size are skipped without a checksum test.
//! - Commit = invalidation: unlink (DELETE), truncate to 0 (TRUNCATE), or zeroing the first
//!   28 bytes (PERSIST). SQLite calls a journal hot only if its first byte is non-zero.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::ops::Range;

use super::header::{lock_byte_page, page_size_is_valid};
use super::{be32, read_full, ReadAt};

/// The 8-byte magic at the start of every journal header.
pub const JOURNAL_MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];
/// Bytes of a journal header that carry data (the rest of its sector is padding).
pub const JOURNAL_HEADER_LEN: usize = 28;
/// Record count meaning "every whole record up to the end of the file" (no-sync mode).
pub const RECORD_COUNT_TO_EOF: u32 = 0xFFFF_FFFF;
/// SQLite's `MAX_SECTOR_SIZE`.
const MAX_SECTOR_SIZE: u32 = 0x10000;

/// Errors from journal parsing and reads.
#[derive(Debug)]
pub enum JournalError {
    /// The caller's [`ReadAt`] failed.
    Io(io::Error),
    /// Fewer than 28 bytes.
    TooShort { len: usize },
    /// The first bytes are not a journal header (for [`JournalReadMode::Rollback`], this
    /// includes a header whose magic is not written yet).
    BadMagic,
    /// All 28 header bytes are zero: a journal invalidated by a PERSIST commit.
    Zeroed,
    /// The sector size is not a power of two in 32..=65536.
    BadSectorSize(u32),
    /// The page size is not a power of two in 512..=65536 (0 was written by SQLite before
    /// 3.5.8 and is not supported).
    BadPageSize(u32),
    /// A buffer passed to [`JournalScan::read_original`] is not one page long.
    BufferSize { expected: usize, got: usize },
    /// A record no longer holds what was validated.
    RecordChanged { data_offset: u64 },
}

impl fmt::Display for JournalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JournalError::Io(e) => write!(f, "journal read failed: {e}"),
            JournalError::TooShort { len } => {
                write!(f, "not a rollback journal: {len} bytes, header needs 28")
            }
            JournalError::BadMagic => f.write_str("not a (synced) rollback journal: bad magic"),
            JournalError::Zeroed => f.write_str("rollback journal header is zeroed (committed)"),
            JournalError::BadSectorSize(s) => write!(f, "journal header has bad sector size {s}"),
            JournalError::BadPageSize(p) => write!(f, "journal header has bad page size {p}"),
            JournalError::BufferSize { expected, got } => {
                write!(f, "page buffer is {got} bytes, page size is {expected}")
            }
            JournalError::RecordChanged { data_offset } => write!(
                f,
                "journal record with page data at offset {data_offset} changed since it was read"
            ),
        }
    }
}

impl std::error::Error for JournalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            JournalError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for JournalError {
    fn from(e: io::Error) -> Self {
        JournalError::Io(e)
    }
}

/// SQLite's `pager_cksum`: the nonce plus every 200th byte of the page, counting down from
/// `page_size - 200` while the index is positive (so byte 0 is never included).
pub fn journal_checksum(nonce: u32, page: &[u8]) -> u32 {
    let mut sum = nonce;
    let mut i = page.len() as isize - 200;
    while i > 0 {
        sum = sum.wrapping_add(u32::from(page[i as usize]));
        i -= 200;
    }
    sum
}

/// The 28 meaningful bytes of a journal header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalHeader {
    /// False if the magic and record count are still zero: the writer has not synced this
    /// segment yet (the count is then unknown).
    pub synced: bool,
    /// Records following this header; [`RECORD_COUNT_TO_EOF`] means up to end of file.
    pub record_count: u32,
    /// Checksum nonce of this segment's records.
    pub nonce: u32,
    /// Database size in pages before the transaction.
    pub initial_db_pages: u32,
    /// Sector size of the writer: headers are this long and start on multiples of it.
    pub sector_size: u32,
    /// Database page size.
    pub page_size: u32,
}

impl JournalHeader {
    /// Parses a first journal header. A header with zeroed magic and count is accepted
    /// (`synced == false`) when `allow_unsynced`; sector and page size must be valid.
    pub fn parse(bytes: &[u8], allow_unsynced: bool) -> Result<JournalHeader, JournalError> {
        let h = JournalHeader::parse_fields(bytes, allow_unsynced)?;
        if !h.sector_size.is_power_of_two() || !(32..=MAX_SECTOR_SIZE).contains(&h.sector_size) {
            return Err(JournalError::BadSectorSize(h.sector_size));
        }
        if !page_size_is_valid(h.page_size) {
            return Err(JournalError::BadPageSize(h.page_size));
        }
        Ok(h)
    }

    /// Decodes the fields, checking only the magic (headers after the first are read like
    /// this by SQLite: their sector and page size fields are ignored).
    fn parse_fields(bytes: &[u8], allow_unsynced: bool) -> Result<JournalHeader, JournalError> {
        if bytes.len() < JOURNAL_HEADER_LEN {
            return Err(JournalError::TooShort { len: bytes.len() });
        }
        let synced = bytes[..8] == JOURNAL_MAGIC;
        if !synced {
            if bytes[..JOURNAL_HEADER_LEN].iter().all(|&b| b == 0) {
                return Err(JournalError::Zeroed);
            }
            if !(allow_unsynced && bytes[..12].iter().all(|&b| b == 0)) {
                return Err(JournalError::BadMagic);
            }
        }
        Ok(JournalHeader {
            synced,
            record_count: be32(bytes, 8),
            nonce: be32(bytes, 12),
            initial_db_pages: be32(bytes, 16),
            sector_size: be32(bytes, 20),
            page_size: be32(bytes, 24),
        })
    }

    /// The 28 bytes of this header (magic and count zeroed if not `synced`).
    pub fn encode(&self) -> [u8; JOURNAL_HEADER_LEN] {
        let mut b = [0u8; JOURNAL_HEADER_LEN];
        if self.synced {
            b[..8].copy_from_slice(&JOURNAL_MAGIC);
            b[8..12].copy_from_slice(&self.record_count.to_be_bytes());
        }
        b[12..16].copy_from_slice(&self.nonce.to_be_bytes());
        b[16..20].copy_from_slice(&self.initial_db_pages.to_be_bytes());
        b[20..24].copy_from_slice(&self.sector_size.to_be_bytes());
        b[24..28].copy_from_slice(&self.page_size.to_be_bytes());
        b
    }

    /// Size of one record: page number, page, checksum.
    pub fn record_size(&self) -> u64 {
        u64::from(self.page_size) + 8
    }
}

/// What the start of a journal file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalHeaderState {
    /// No bytes: a journal truncated by a TRUNCATE-mode commit (or just created).
    Empty,
    /// First byte zero and no plausible unsynced header: not hot. This is what a PERSIST
    /// commit leaves (it zeroes the 28 header bytes).
    Zeroed,
    /// Magic and count still zero, other fields set: a transaction that has not synced its
    /// journal yet, so it has not written the database either.
    Unsynced(JournalHeader),
    /// A valid header.
    Valid(JournalHeader),
    /// Non-zero first byte but not a valid header. SQLite would call the journal hot and
    /// then roll back nothing.
    Corrupt,
}

/// Classifies the first bytes of a journal (pass at least 28 bytes when available).
pub fn header_state(bytes: &[u8]) -> JournalHeaderState {
    if bytes.is_empty() {
        return JournalHeaderState::Empty;
    }
    match JournalHeader::parse(bytes, true) {
        Ok(h) if h.synced => JournalHeaderState::Valid(h),
        Ok(h) => JournalHeaderState::Unsynced(h),
        Err(_) if bytes[0] == 0 => JournalHeaderState::Zeroed,
        Err(_) => JournalHeaderState::Corrupt,
    }
}

/// SQLite's content test for a hot journal (`hasHotJournal`): the first byte is non-zero.
/// True for a valid header and for garbage; false for an empty file, a header zeroed by a
/// PERSIST commit, and a header not yet synced. (SQLite also requires that no connection
/// holds a RESERVED lock and that the database is not empty; that is the caller's part.)
pub fn is_hot_or_valid(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|&b| b != 0)
}

/// How to read the record counts of a journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalReadMode {
    /// As SQLite's hot-journal rollback does (`pager_playback(isHot = 1)`): every header
    /// must carry the magic, a count of 0 means no records. Use it to know what a crash
    /// recovery would restore.
    Rollback,
    /// As the writer that still holds the lock knows its journal: a header not yet synced
    /// (zeroed magic and count) or a count of 0 in the last segment means "records up to
    /// the end of the file". Use it while the writer holds its lock, e.g. at commit time,
    /// to learn every page the transaction touched. Reading past the writer's records can
    /// only add records of pages past the original size (they skip the checksum test), so
    /// the set of journaled pages may grow, never shrink.
    Live,
}

/// One page record of the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalRecord {
    /// Database page number.
    pub pgno: u32,
    /// Byte offset of the original page content in the journal.
    pub data_offset: u64,
    /// The record's stored checksum.
    pub checksum: u32,
    /// Index into [`JournalScan::segments`].
    pub segment: usize,
    /// False for pages past the original database size, which SQLite neither checks nor
    /// plays back.
    pub checksum_verified: bool,
}

/// One header and the records that follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSegment {
    /// Offset of the header (a multiple of the sector size).
    pub offset: u64,
    /// The header as read (for segments after the first, only the magic, count, nonce and
    /// size fields matter).
    pub header: JournalHeader,
    /// Indexes of this segment's records in [`JournalScan::records`].
    pub records: Range<usize>,
}

/// Why a scan ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalStop {
    /// The last segment's records were all read and the file has no room for another
    /// header (or, for a count to end of file, no room for another record).
    EndOfFile,
    /// The bytes where the next header would start are not a header.
    NoHeader { offset: u64 },
    /// A record is cut short by the end of the file.
    ShortRecord { offset: u64 },
    /// A record with page number 0.
    ZeroPage { offset: u64 },
    /// A record with the lock-byte page number: the super-journal name follows.
    SuperJournal { offset: u64 },
    /// A record whose checksum does not match (torn write, or stale data from an older
    /// transaction in a PERSIST journal).
    BadChecksum { offset: u64 },
}

/// The result of [`scan_journal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalScan {
    /// The first header: it fixes page size, sector size and the original database size.
    pub header: JournalHeader,
    /// Every segment read, in file order.
    pub segments: Vec<JournalSegment>,
    /// Every record read, in file order.
    pub records: Vec<JournalRecord>,
    /// Why the scan ended.
    pub stop: JournalStop,
}

impl JournalScan {
    /// The journaled page numbers, sorted and without duplicates.
    pub fn journaled_pages(&self) -> Vec<u32> {
        let set: BTreeSet<u32> = self.records.iter().map(|r| r.pgno).collect();
        set.into_iter().collect()
    }

    /// The pages a commit of this journal's transaction changed, for a database that has
    /// `new_db_pages` pages after the commit. See [`changed_pages`].
    pub fn changed_pages(&self, new_db_pages: u32) -> Vec<u32> {
        changed_pages(
            self.records.iter().map(|r| r.pgno),
            self.header.initial_db_pages,
            new_db_pages,
            self.header.page_size,
        )
    }

    /// Reads the original content of `record` into `buf` (one page long) and, for records
    /// whose checksum was verified, verifies it again.
    pub fn read_original<R: ReadAt + ?Sized>(
        &self,
        src: &R,
        record: &JournalRecord,
        buf: &mut [u8],
    ) -> Result<(), JournalError> {
        let expected = self.header.page_size as usize;
        if buf.len() != expected {
            return Err(JournalError::BufferSize {
                expected,
                got: buf.len(),
            });
        }
        let changed = JournalError::RecordChanged {
            data_offset: record.data_offset,
        };
        if !read_full(src, record.data_offset, buf)? {
            return Err(changed);
        }
        if record.checksum_verified {
            let Some(seg) = self.segments.get(record.segment) else {
                return Err(changed);
            };
            let mut ck = [0u8; 4];
            let at = record.data_offset + u64::from(self.header.page_size);
            if !read_full(src, at, &mut ck)?
                || u32::from_be_bytes(ck) != record.checksum
                || journal_checksum(seg.header.nonce, buf) != record.checksum
            {
                return Err(changed);
            }
        }
        Ok(())
    }
}

/// Offset of the next header at or after `offset`: SQLite's `journalHdrOffset`.
fn next_header_offset(offset: u64, sector: u64) -> Option<u64> {
    if offset == 0 {
        return Some(0);
    }
    ((offset - 1) / sector + 1).checked_mul(sector)
}

/// True if the source has at least `offset + 1` bytes.
fn has_byte<R: ReadAt + ?Sized>(src: &R, offset: u64) -> io::Result<bool> {
    read_full(src, offset, &mut [0u8; 1])
}

/// Reads every page record of a journal, across all its segments.
///
/// Fails only if the first header is unusable for `mode` (or on I/O errors); everything
/// after it is read until SQLite's playback would stop, and [`JournalScan::stop`] says why.
pub fn scan_journal<R: ReadAt + ?Sized>(
    src: &R,
    mode: JournalReadMode,
) -> Result<JournalScan, JournalError> {
    let live = mode == JournalReadMode::Live;
    let mut hbuf = [0u8; JOURNAL_HEADER_LEN];
    if !read_full(src, 0, &mut hbuf)? {
        let mut n = 0;
        while n < JOURNAL_HEADER_LEN && has_byte(src, n as u64)? {
            n += 1;
        }
        return Err(JournalError::TooShort { len: n });
    }
    let first = JournalHeader::parse(&hbuf, live)?;
    let sector = u64::from(first.sector_size);
    let record_size = first.record_size();
    let lock_page = lock_byte_page(first.page_size);
    let mut scan = JournalScan {
        header: first,
        segments: Vec::new(),
        records: Vec::new(),
        stop: JournalStop::EndOfFile,
    };
    let mut rec = vec![0u8; record_size as usize];
    let mut offset = 0u64;

    loop {
        // The header must fit, padding included (`readJournalHdr`).
        if !has_byte(src, offset.saturating_add(sector - 1))? {
            scan.stop = JournalStop::EndOfFile;
            return Ok(scan);
        }
        let header = if offset == 0 {
            first
        } else {
            if !read_full(src, offset, &mut hbuf)? {
                scan.stop = JournalStop::EndOfFile;
                return Ok(scan);
            }
            match JournalHeader::parse_fields(&hbuf, live) {
                Ok(h) if h.synced || h.initial_db_pages == first.initial_db_pages => h,
                _ => {
                    scan.stop = JournalStop::NoHeader { offset };
                    return Ok(scan);
                }
            }
        };
        let records_start = offset + sector;
        let to_eof = header.record_count == RECORD_COUNT_TO_EOF
            || (live
                && header.record_count == 0
                && !header_follows(src, records_start, first.initial_db_pages)?);
        // Unsynced headers (live mode only) have no count yet: up to the end of the file.
        let fill = !header.synced || to_eof;
        let count = if fill { u32::MAX } else { header.record_count };
        let seg_index = scan.segments.len();
        let first_record = scan.records.len();
        let mut at = records_start;
        let mut stop = None;
        let mut n = 0u32;
        while n < count {
            // Page number first, as pager_playback_one_page reads it: the super-journal
            // record that may end the journal is shorter than a page record.
            if !read_full(src, at, &mut rec[..4])? {
                let partial = has_byte(src, at)?;
                stop = Some(if fill && !partial {
                    JournalStop::EndOfFile
                } else {
                    JournalStop::ShortRecord { offset: at }
                });
                break;
            }
            let pgno = be32(&rec, 0);
            if pgno == 0 {
                stop = Some(JournalStop::ZeroPage { offset: at });
                break;
            }
            if pgno == lock_page {
                stop = Some(JournalStop::SuperJournal { offset: at });
                break;
            }
            if !read_full(src, at + 4, &mut rec[4..])? {
                stop = Some(JournalStop::ShortRecord { offset: at });
                break;
            }
            let page = &rec[4..4 + first.page_size as usize];
            let checksum = be32(&rec, 4 + first.page_size as usize);
            let verify = pgno <= first.initial_db_pages;
            if verify && journal_checksum(header.nonce, page) != checksum {
                stop = Some(JournalStop::BadChecksum { offset: at });
                break;
            }
            scan.records.push(JournalRecord {
                pgno,
                data_offset: at + 4,
                checksum,
                segment: seg_index,
                checksum_verified: verify,
            });
            n += 1;
            at += record_size;
        }
        scan.segments.push(JournalSegment {
            offset,
            header,
            records: first_record..scan.records.len(),
        });
        if let Some(stop) = stop {
            scan.stop = stop;
            return Ok(scan);
        }
        if fill {
            scan.stop = JournalStop::EndOfFile;
            return Ok(scan);
        }
        offset = match next_header_offset(at, sector) {
            Some(o) if o > offset => o,
            _ => {
                scan.stop = JournalStop::NoHeader { offset: at };
                return Ok(scan);
            }
        };
    }
}

/// In live mode, a synced segment with a count of 0 is either empty (another header
/// follows at the next sector) or the writer's last one (records follow).
fn header_follows<R: ReadAt + ?Sized>(src: &R, at: u64, initial: u32) -> io::Result<bool> {
    let mut b = [0u8; JOURNAL_HEADER_LEN];
    if !read_full(src, at, &mut b)? {
        return Ok(false);
    }
    Ok(match JournalHeader::parse_fields(&b, true) {
        Ok(h) => h.synced || h.initial_db_pages == initial,
        Err(_) => false,
    })
}

/// The pages a rollback-mode commit changed: every journaled page, plus every page past
/// the original size up to the new size, limited to the new size (pages past it are gone,
/// which the new size says) and without the lock-byte page (never written). Sorted.
pub fn changed_pages(
    journaled: impl IntoIterator<Item = u32>,
    initial_db_pages: u32,
    new_db_pages: u32,
    page_size: u32,
) -> Vec<u32> {
    let lock = lock_byte_page(page_size);
    let mut set: BTreeSet<u32> = journaled
        .into_iter()
        .filter(|&p| p >= 1 && p <= new_db_pages && p != lock)
        .collect();
    if new_db_pages > initial_db_pages {
        set.extend((initial_db_pages + 1..=new_db_pages).filter(|&p| p != lock));
    }
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::test_util::Rng;
    use crate::sqlite::DbHeader;
    use rusqlite::Connection;
    use std::path::{Path, PathBuf};

    fn journal_path(db: &Path) -> PathBuf {
        let mut s = db.as_os_str().to_owned();
        s.push("-journal");
        PathBuf::from(s)
    }

    fn page(image: &[u8], ps: usize, pgno: u32) -> &[u8] {
        let at = (pgno as usize - 1) * ps;
        &image[at..at + ps]
    }

    /// A rollback-mode database with some content.
    fn setup(path: &Path, ps: u32, mode: &str, rows: usize) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA page_size={ps}; PRAGMA journal_mode={mode};
             CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
             CREATE INDEX t_v ON t(v);"
        ))
        .unwrap();
        conn.execute_batch(&format!(
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<{rows})
             INSERT INTO t(v) SELECT randomblob(300 + n % 700) FROM c;"
        ))
        .unwrap();
        conn
    }

    /// Opens a write transaction that spills (small cache), touches page 1 (so the commit
    /// itself journals nothing new) and grows the database. Leaves it open.
    fn big_open_txn(conn: &Connection, rows: usize) {
        conn.execute_batch(&format!(
            "PRAGMA cache_size=10; BEGIN;
             UPDATE t SET v = randomblob(length(v)) WHERE id % 2 = 0;
             PRAGMA user_version = 42;
             WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<{rows})
             INSERT INTO t(v) SELECT randomblob(900) FROM c;"
        ))
        .unwrap();
    }

    /// SQLite's hot rollback, re-implemented over a scan: write the original pages back
    /// (first record of a page wins) and truncate to the original size.
    fn rollback(db: &mut Vec<u8>, journal: &[u8], scan: &JournalScan) {
        let ps = scan.header.page_size as usize;
        let mut buf = vec![0u8; ps];
        let mut done = BTreeSet::new();
        for r in &scan.records {
            if r.pgno > scan.header.initial_db_pages || !done.insert(r.pgno) {
                continue;
            }
            scan.read_original(journal, r, &mut buf).unwrap();
            let at = (r.pgno as usize - 1) * ps;
            if db.len() < at + ps {
                db.resize(at + ps, 0);
            }
            db[at..at + ps].copy_from_slice(&buf);
        }
        db.truncate(scan.header.initial_db_pages as usize * ps);
    }

    #[test]
    fn checksum_samples_every_200th_byte_from_the_end() {
        let mut p = vec![0u8; 512];
        p[312] = 5;
        p[112] = 7;
        p[0] = 100; // never sampled
        p[511] = 100;
        assert_eq!(journal_checksum(1, &p), 13);
        let mut q = vec![1u8; 4096];
        q[0] = 0;
        // 4096 - 200k > 0 for k = 1..=20
        assert_eq!(journal_checksum(0, &q), 20);
        assert_eq!(journal_checksum(u32::MAX, &q), 19);
        assert_eq!(journal_checksum(3, &[]), 3);
    }

    #[test]
    fn live_journal_matches_pre_transaction_pages_and_covers_the_commit() {
        for &(ps, rows, add) in &[
            (512u32, 400usize, 50usize),
            (4096, 600, 200),
            (65536, 4000, 300),
        ] {
            for mode in ["PERSIST", "DELETE"] {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("db");
                let conn = setup(&path, ps, mode, rows);
                let before = std::fs::read(&path).unwrap();
                let initial = DbHeader::parse(&before).unwrap().db_size_pages;
                big_open_txn(&conn, add);
                let journal = std::fs::read(journal_path(&path)).unwrap();

                assert!(is_hot_or_valid(&journal), "spilled, so synced: {ps} {mode}");
                let live = scan_journal(&journal, JournalReadMode::Live).unwrap();
                let hot = scan_journal(&journal, JournalReadMode::Rollback).unwrap();
                assert_eq!(live.header.page_size, ps);
                assert_eq!(live.header.initial_db_pages, initial);
                assert!(
                    live.segments.len() >= 2,
                    "{ps} {mode}: cache spills start segments"
                );
                assert!(live.segments.iter().all(|s| s.offset % 512 == 0));
                // Rollback sees the synced segments only; live sees a superset.
                assert!(hot.records.len() <= live.records.len());
                assert_eq!(hot.records[..], live.records[..hot.records.len()]);
                assert!(!live.segments.last().unwrap().header.synced);

                // Originals equal the database before the transaction.
                let mut buf = vec![0u8; ps as usize];
                for r in &live.records {
                    assert!(r.checksum_verified && r.pgno <= initial);
                    live.read_original(&journal, r, &mut buf).unwrap();
                    assert!(buf == page(&before, ps as usize, r.pgno), "page {}", r.pgno);
                }
                let journaled = live.journaled_pages();
                assert_eq!(journaled.len(), live.records.len(), "each page once");
                assert!(journaled.contains(&1));

                conn.execute_batch("COMMIT").unwrap();
                let after = std::fs::read(&path).unwrap();
                let new = DbHeader::parse(&after).unwrap().db_size_pages;
                assert!(new > initial);
                let changed = live.changed_pages(new);
                let psz = ps as usize;
                for pg in 1..=(after.len() / psz) as u32 {
                    let old = (pg <= initial).then(|| page(&before, psz, pg));
                    if old != Some(page(&after, psz, pg)) {
                        assert!(changed.binary_search(&pg).is_ok(), "page {pg} changed");
                    }
                }
                // After the commit: PERSIST zeroes the header, DELETE removes the file.
                match mode {
                    "PERSIST" => {
                        let j = std::fs::read(journal_path(&path)).unwrap();
                        assert_eq!(header_state(&j), JournalHeaderState::Zeroed);
                        assert!(!is_hot_or_valid(&j));
                        assert!(matches!(
                            scan_journal(&j, JournalReadMode::Live),
                            Err(JournalError::Zeroed)
                        ));
                    }
                    _ => assert!(!journal_path(&path).exists()),
                }
            }
        }
    }

    #[test]
    fn hot_rollback_matches_sqlite() {
        for &ps in &[512u32, 4096, 65536] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("db");
            let rows = if ps == 65536 { 4000 } else { 500 };
            let conn = setup(&path, ps, "DELETE", rows);
            let before = std::fs::read(&path).unwrap();
            big_open_txn(&conn, 100);
            // "Crash": copy the database and journal while the transaction is open.
            let journal = std::fs::read(journal_path(&path)).unwrap();
            let mut db = std::fs::read(&path).unwrap();
            assert!(db != before, "spilled pages reached the database file");
            let scan = scan_journal(&journal, JournalReadMode::Rollback).unwrap();
            assert!(matches!(
                scan.stop,
                JournalStop::NoHeader { .. } | JournalStop::EndOfFile
            ));

            let dir2 = tempfile::tempdir().unwrap();
            let p2 = dir2.path().join("db");
            std::fs::write(&p2, &db).unwrap();
            std::fs::write(journal_path(&p2), &journal).unwrap();
            let c2 = Connection::open(&p2).unwrap();
            let n: i64 = c2
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, rows as i64);
            drop(c2);
            let sqlite_rolled_back = std::fs::read(&p2).unwrap();

            rollback(&mut db, &journal, &scan);
            assert!(db == sqlite_rolled_back, "page size {ps}");
            assert!(db == before);
            conn.execute_batch("ROLLBACK").unwrap();
        }
    }

    #[test]
    fn unsynced_journal_is_not_hot_but_live_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = setup(&path, 4096, "DELETE", 50);
        let before = std::fs::read(&path).unwrap();
        conn.execute_batch("BEGIN; UPDATE t SET v = x'00' WHERE id = 7;")
            .unwrap();
        let journal = std::fs::read(journal_path(&path)).unwrap();
        assert!(matches!(
            header_state(&journal),
            JournalHeaderState::Unsynced(h) if h.page_size == 4096 && h.record_count == 0
        ));
        assert!(!is_hot_or_valid(&journal));
        assert!(matches!(
            scan_journal(&journal, JournalReadMode::Rollback),
            Err(JournalError::BadMagic)
        ));
        let live = scan_journal(&journal, JournalReadMode::Live).unwrap();
        assert!(!live.records.is_empty());
        assert_eq!(live.stop, JournalStop::EndOfFile);
        let mut buf = vec![0u8; 4096];
        for r in &live.records {
            live.read_original(&journal, r, &mut buf).unwrap();
            assert!(buf == page(&before, 4096, r.pgno));
        }
        // The database file is untouched before the journal is synced.
        assert!(std::fs::read(&path).unwrap() == before);
        conn.execute_batch("ROLLBACK").unwrap();
    }

    #[test]
    fn no_sync_journal_counts_to_end_of_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = setup(&path, 1024, "PERSIST", 300);
        conn.execute_batch("PRAGMA synchronous=OFF;").unwrap();
        let before = std::fs::read(&path).unwrap();
        big_open_txn(&conn, 30);
        let journal = std::fs::read(journal_path(&path)).unwrap();
        let JournalHeaderState::Valid(h) = header_state(&journal) else {
            panic!("no-sync journals get their magic at once");
        };
        assert_eq!(h.record_count, RECORD_COUNT_TO_EOF);
        for mode in [JournalReadMode::Rollback, JournalReadMode::Live] {
            let s = scan_journal(&journal, mode).unwrap();
            assert_eq!(s.segments.len(), 1, "no new segments without syncs");
            assert!(s.records.len() > 10);
            let mut buf = vec![0u8; 1024];
            // Past the transaction's records lie stale ones of earlier transactions (PERSIST
            // keeps the file); those fail their checksum or are past the original size.
            for r in s.records.iter().filter(|r| r.checksum_verified) {
                s.read_original(&journal, r, &mut buf).unwrap();
                assert!(buf == page(&before, 1024, r.pgno));
            }
        }
        conn.execute_batch("ROLLBACK").unwrap();
    }

    /// (synced, nonce, records as (pgno, fill byte)).
    type SyntheticSegment = (bool, u32, Vec<(u32, u8)>);

    /// Builds a journal by hand: segments of (nonce, records), synced or not.
    fn build(ps: u32, sector: u32, initial: u32, segments: &[SyntheticSegment]) -> Vec<u8> {
        let mut out = Vec::new();
        for (synced, nonce, recs) in segments {
            let at = next_header_offset(out.len() as u64, u64::from(sector)).unwrap() as usize;
            out.resize(at, 0);
            let h = JournalHeader {
                synced: *synced,
                record_count: recs.len() as u32,
                nonce: *nonce,
                initial_db_pages: initial,
                sector_size: sector,
                page_size: ps,
            };
            out.extend_from_slice(&h.encode());
            out.resize(at + sector as usize, 0);
            for &(pgno, fill) in recs {
                let page = vec![fill; ps as usize];
                out.extend_from_slice(&pgno.to_be_bytes());
                out.extend_from_slice(&page);
                out.extend_from_slice(&journal_checksum(*nonce, &page).to_be_bytes());
            }
        }
        out
    }

    #[test]
    fn synthetic_segments_counts_and_stops() {
        let j = build(
            512,
            512,
            10,
            &[
                (true, 7, vec![(1, 1), (2, 2)]),
                (true, 9, vec![]),
                (true, 11, vec![(3, 3), (20, 4)]),
            ],
        );
        for mode in [JournalReadMode::Rollback, JournalReadMode::Live] {
            let s = scan_journal(&j, mode).unwrap();
            assert_eq!(s.segments.len(), 3, "{mode:?}");
            let pg: Vec<u32> = s.records.iter().map(|r| r.pgno).collect();
            assert_eq!(pg, [1, 2, 3, 20]);
            assert!(!s.records[3].checksum_verified, "past the original size");
            assert_eq!(s.stop, JournalStop::EndOfFile);
            assert_eq!(s.segments[2].records, 2..4);
        }
        // A super-journal record (lock-byte page number) ends the records.
        let mut sj = build(512, 512, 10, &[(true, 7, vec![(1, 1)])]);
        sj[8..12].copy_from_slice(&2u32.to_be_bytes());
        let at = sj.len();
        sj.extend_from_slice(&lock_byte_page(512).to_be_bytes());
        sj.extend_from_slice(b"super-journal-name\0\0\0\0\0\0\0\0");
        let s = scan_journal(&sj, JournalReadMode::Rollback).unwrap();
        assert_eq!(s.records.len(), 1);
        assert_eq!(s.stop, JournalStop::SuperJournal { offset: at as u64 });
        // A bad checksum stops everything, as in SQLite.
        let mut bad = j.clone();
        bad[512 + 4 + 312] ^= 1;
        let s = scan_journal(&bad, JournalReadMode::Rollback).unwrap();
        assert!(s.records.is_empty());
        assert_eq!(s.stop, JournalStop::BadChecksum { offset: 512 });
        // A cut record.
        let s = scan_journal(&j[..j.len() - 3], JournalReadMode::Rollback).unwrap();
        assert_eq!(s.records.len(), 3);
        assert!(matches!(s.stop, JournalStop::ShortRecord { .. }));
        // Sector larger than a page, and an unsynced last segment in live mode.
        let j2 = build(
            512,
            4096,
            10,
            &[(true, 1, vec![(4, 4)]), (false, 2, vec![(5, 5), (6, 6)])],
        );
        let live = scan_journal(&j2, JournalReadMode::Live).unwrap();
        assert_eq!(live.journaled_pages(), [4, 5, 6]);
        assert_eq!(live.segments[1].offset, 8192);
        let hot = scan_journal(&j2, JournalReadMode::Rollback).unwrap();
        assert_eq!(hot.journaled_pages(), [4]);
        assert_eq!(hot.stop, JournalStop::NoHeader { offset: 8192 });
        // A header without its sector padding is not read (readJournalHdr).
        let s = scan_journal(&j2[..100], JournalReadMode::Rollback).unwrap();
        assert!(s.segments.is_empty());
    }

    #[test]
    fn changed_pages_rules() {
        // Journaled pages, plus growth, minus pages past the new end and the lock page.
        assert_eq!(changed_pages([1, 3, 9], 5, 8, 4096), [1, 3, 6, 7, 8]);
        assert_eq!(changed_pages([1, 3, 9], 10, 4, 4096), [1, 3]);
        let lock = lock_byte_page(65536);
        let got = changed_pages([1], lock - 2, lock + 1, 65536);
        assert_eq!(got, [1, lock - 1, lock + 1]);
        assert_eq!(
            changed_pages([], u32::MAX, u32::MAX, 512),
            Vec::<u32>::new()
        );
        assert_eq!(changed_pages([0, 1], 0, 1, 512), [1]);
    }

    #[test]
    fn header_states() {
        assert_eq!(header_state(&[]), JournalHeaderState::Empty);
        assert_eq!(header_state(&[0u8; 512]), JournalHeaderState::Zeroed);
        assert_eq!(header_state(&[0u8; 5]), JournalHeaderState::Zeroed);
        assert_eq!(
            header_state(b"garbage, not a journal at all!!"),
            JournalHeaderState::Corrupt
        );
        assert!(is_hot_or_valid(b"garbage"));
        assert!(!is_hot_or_valid(&[]));
        let mut h = build(4096, 512, 3, &[(true, 1, vec![])]);
        assert!(matches!(header_state(&h), JournalHeaderState::Valid(_)));
        h[20..24].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(header_state(&h), JournalHeaderState::Corrupt);
        assert!(matches!(
            JournalHeader::parse(&h, false),
            Err(JournalError::BadSectorSize(100))
        ));
        h[20..24].copy_from_slice(&512u32.to_be_bytes());
        h[24..28].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(
            JournalHeader::parse(&h, false),
            Err(JournalError::BadPageSize(0))
        ));
        assert!(matches!(
            scan_journal(&h[..20], JournalReadMode::Live),
            Err(JournalError::TooShort { len: 20 })
        ));
    }

    #[test]
    fn random_and_corrupt_input_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = setup(&path, 512, "DELETE", 200);
        big_open_txn(&conn, 20);
        let journal = std::fs::read(journal_path(&path)).unwrap();
        conn.execute_batch("ROLLBACK").unwrap();
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        for round in 0..600 {
            let mut bytes: Vec<u8> = match round % 3 {
                0 => (0..rng.below(3000)).map(|_| rng.next() as u8).collect(),
                1 => {
                    let mut b = JOURNAL_MAGIC.to_vec();
                    b.extend((0..rng.below(3000)).map(|_| rng.next() as u8));
                    if b.len() >= 28 && rng.below(2) == 0 {
                        b[20..24].copy_from_slice(&512u32.to_be_bytes());
                        b[24..28].copy_from_slice(&512u32.to_be_bytes());
                    }
                    b
                }
                _ => journal.clone(),
            };
            for _ in 0..rng.below(6) {
                if bytes.is_empty() {
                    break;
                }
                let i = rng.below(bytes.len() as u64) as usize;
                match rng.below(3) {
                    0 => bytes[i] ^= 1 << rng.below(8),
                    1 => bytes.truncate(i),
                    _ => bytes[i] = 0,
                }
            }
            let _ = header_state(&bytes);
            let _ = is_hot_or_valid(&bytes);
            for mode in [JournalReadMode::Rollback, JournalReadMode::Live] {
                if let Ok(s) = scan_journal(&bytes, mode) {
                    let mut buf = vec![0u8; s.header.page_size as usize];
                    for r in &s.records {
                        s.read_original(&bytes, r, &mut buf).unwrap();
                    }
                    let _ = s.changed_pages(rng.next() as u32 % 5000);
                }
            }
        }
    }
}

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

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::OnceLock;

use crate::replica::ltx::Crc64;
use crate::sqlite::{page_hash, ContentChecksum, PageHash, WalHeader, WalPosition, WAL_VERSION};

const RECORD_MAGIC: u32 = 0x5746_5342;
const RECORD_VERSION: u32 = 2;
const HEADER_SIZE: usize = 96;
const TRAILER_SIZE: usize = 24;
/// Appends are flushed to the file in chunks of this size.
const FLUSH_AT: usize = 1 << 20;

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
    fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_be_bytes());
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

    fn decode(b: &[u8; HEADER_SIZE]) -> Option<BatchHeader> {
        let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
        if u32_at(0) != RECORD_MAGIC || u32_at(4) != RECORD_VERSION {
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
        let sane = h.page_size.is_power_of_two()
            && (512..=65536).contains(&h.page_size)
            && h.min_txid >= 1
            && h.min_txid <= h.max_txid;
        sane.then_some(h)
    }

    /// Length of the whole record.
    pub fn record_len(&self) -> u64 {
        HEADER_SIZE as u64
            + u64::from(self.page_count) * (4 + u64::from(self.page_size))
            + TRAILER_SIZE as u64
    }
}

/// One record of a segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub header: BatchHeader,
    /// The content checksum of the database after `max_txid`.
    pub post_checksum: ContentChecksum,
    /// The segment file.
    pub path: PathBuf,
    /// Where the record starts in it.
    pub offset: u64,
}

impl Batch {
    /// Reads the record's pages in order.
    pub fn read_pages(&self, mut f: impl FnMut(u32, &[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut file = File::open(&self.path)?;
        io::Seek::seek(
            &mut file,
            io::SeekFrom::Start(self.offset + HEADER_SIZE as u64),
        )?;
        let mut r = BufReader::with_capacity(256 * 1024, file);
        let mut buf = vec![0u8; 4 + self.header.page_size as usize];
        for _ in 0..self.header.page_count {
            r.read_exact(&mut buf)?;
            let pgno = u32::from_be_bytes(buf[..4].try_into().unwrap());
            f(pgno, &buf[4..])?;
        }
        Ok(())
    }

    /// The page numbers in the record with the file offset of each page's data.
    pub fn page_offsets(&self) -> io::Result<Vec<(u32, u64)>> {
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
pub fn read_segment(path: &Path) -> io::Result<(Vec<Batch>, u64)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(256 * 1024, file);
    let mut out = Vec::new();
    let mut offset = 0u64;
    let mut buf = Vec::new();
    while offset + (HEADER_SIZE + TRAILER_SIZE) as u64 <= len {
        let mut hb = [0u8; HEADER_SIZE];
        r.read_exact(&mut hb)?;
        let Some(header) = BatchHeader::decode(&hb) else {
            break;
        };
        let rec_len = header.record_len();
        if offset + rec_len > len {
            break;
        }
        let mut digest = Crc64::new();
        digest.update(&hb);
        buf.resize(4 + header.page_size as usize, 0);
        for _ in 0..header.page_count {
            r.read_exact(&mut buf)?;
            let pgno = u32::from_be_bytes(buf[..4].try_into().unwrap());
            digest.update(&buf[..4]);
            digest.update(&page_hash(pgno, &buf[4..]).to_be_bytes());
        }
        let mut tb = [0u8; TRAILER_SIZE];
        r.read_exact(&mut tb)?;
        digest.update(&tb[..16]);
        if digest.finalize().to_be_bytes() != tb[16..24] {
            break;
        }
        out.push(Batch {
            header,
            post_checksum: content_checksum_at(&tb),
            path: path.to_path_buf(),
            offset,
        });
        offset += rec_len;
    }
    Ok((out, offset))
}

/// The content checksum in a record's trailer.
fn content_checksum_at(trailer: &[u8; TRAILER_SIZE]) -> ContentChecksum {
    ContentChecksum::from_value(u128::from_be_bytes(trailer[..16].try_into().unwrap()))
}

/// The records of a sealed segment, read from their headers and trailers alone (the
/// uploader's view: it reads each page it needs once, when it encodes). Page data is
/// verified against the record CRC by [`read_segment`], when a segment is recovered after a
/// restart; a page damaged in between is caught by restore's content checksum.
pub fn list_records(path: &Path) -> io::Result<Vec<Batch>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut out = Vec::new();
    let mut offset = 0u64;
    while offset + (HEADER_SIZE + TRAILER_SIZE) as u64 <= len {
        let mut hb = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut hb, offset)?;
        let Some(header) = BatchHeader::decode(&hb) else {
            break;
        };
        let rec_len = header.record_len();
        if offset + rec_len > len {
            break;
        }
        let mut tb = [0u8; TRAILER_SIZE];
        file.read_exact_at(&mut tb, offset + rec_len - TRAILER_SIZE as u64)?;
        out.push(Batch {
            header,
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

impl SegmentWriter {
    /// Opens (creating) the active segment at `path`, keeping its valid records and
    /// cutting off anything after them (a record torn by a crash).
    pub fn open(path: &Path) -> io::Result<SegmentWriter> {
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

    /// Starts appending a record; it is written only by [`RecordWriter::finish`].
    pub fn begin(&mut self, header: BatchHeader) -> RecordWriter<'_> {
        let mut digest = Crc64::new();
        let hb = header.encode();
        digest.update(&hb);
        let mut buf = Vec::with_capacity(
            (header.record_len() as usize).min(FLUSH_AT + 4 + header.page_size as usize),
        );
        buf.extend_from_slice(&hb);
        let start = self.len;
        RecordWriter {
            seg: self,
            header,
            digest,
            buf,
            start,
            flushed: 0,
            pages: 0,
            done: false,
        }
    }

    /// Whether records were appended since the last fdatasync was started.
    #[cfg(test)]
    pub fn has_unsynced(&self) -> bool {
        self.unsynced
    }

    /// Starts making every record written so far durable (fdatasync) on the sync thread, so
    /// that it overlaps with whatever the caller does next; [`sync`](Self::sync) waits for it.
    /// Nothing is started while an earlier one is still running (`sync` covers the rest).
    pub fn start_sync(&mut self) -> io::Result<()> {
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
    fn wait_in_flight(&mut self) -> io::Result<()> {
        let Some(rx) = self.in_flight.take() else {
            return Ok(());
        };
        let res = rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the segment sync thread stopped")));
        if res.is_err() {
            self.unsynced = true;
        }
        res
    }

    /// Makes every record durable (fdatasync).
    pub fn sync(&mut self) -> io::Result<()> {
        self.wait_in_flight()?;
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Seals the segment into `dir` as `<min>-<max>.seg` (fsynced, renamed, the directory
    /// fsynced) and starts an empty one. Returns the sealed file, if it held anything.
    pub fn seal(&mut self) -> io::Result<Option<PathBuf>> {
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
    pub fn add_page(&mut self, pgno: u32, data: &[u8], hash: PageHash) -> io::Result<()> {
        if data.len() != self.header.page_size as usize || self.pages >= self.header.page_count {
            return Err(io::Error::other(format!(
                "segment record: page {pgno} does not fit its header"
            )));
        }
        debug_assert_eq!(hash, page_hash(pgno, data));
        let b = pgno.to_be_bytes();
        self.digest.update(&b);
        self.digest.update(&hash.to_be_bytes());
        self.buf.extend_from_slice(&b);
        self.buf.extend_from_slice(data);
        self.pages += 1;
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the trailer; the record is then part of the segment (not yet durable).
    pub fn finish(mut self, post_checksum: ContentChecksum) -> io::Result<()> {
        if self.pages != self.header.page_count {
            return Err(io::Error::other(format!(
                "segment record: {} pages written, {} announced",
                self.pages, self.header.page_count
            )));
        }
        let pc = post_checksum.value().to_be_bytes();
        self.digest.update(&pc);
        let digest = std::mem::take(&mut self.digest);
        let crc = digest.finalize();
        self.buf.extend_from_slice(&pc);
        self.buf.extend_from_slice(&crc.to_be_bytes());
        self.flush()?;
        self.done = true;
        let seg = &mut *self.seg;
        seg.len = self.start + self.flushed;
        seg.txids = Some(match seg.txids {
            Some((min, _)) => (min, self.header.max_txid),
            None => (self.header.min_txid, self.header.max_txid),
        });
        seg.unsynced = true;
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
        let mut r = w.begin(header(1, 3, 2));
        add(&mut r, 1, 1);
        add(&mut r, 4, 4);
        r.finish(ContentChecksum::from_value(99)).unwrap();
        // A record abandoned halfway leaves nothing.
        {
            let mut r = w.begin(header(4, 4, 3000));
            for p in 1..=2100 {
                add(&mut r, p, 9);
            }
        }
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            header(1, 3, 2).record_len()
        );
        let mut r = w.begin(header(4, 4, 1));
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
        io::Write::write_all(&mut &f, &header(5, 5, 1).encode()).unwrap();
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
        let mut r = w.begin(header(1, 1, 1));
        add(&mut r, 1, 1);
        r.finish(ContentChecksum::from_value(1)).unwrap();
        w.start_sync().unwrap();
        assert!(w.in_flight.is_some() && !w.unsynced);
        let mut r = w.begin(header(2, 2, 1));
        add(&mut r, 2, 2);
        r.finish(ContentChecksum::from_value(2)).unwrap();
        assert!(w.unsynced);
        // A second start while one runs leaves the new record to `sync`.
        w.start_sync().unwrap();
        w.sync().unwrap();
        assert!(w.in_flight.is_none() && !w.unsynced);
        w.start_sync().unwrap();
        let mut r = w.begin(header(3, 3, 1));
        add(&mut r, 3, 3);
        r.finish(ContentChecksum::from_value(3)).unwrap();
        w.start_sync().unwrap();
        let sealed = w.seal().unwrap().unwrap();
        assert!(w.in_flight.is_none());
        assert_eq!(read_segment(&sealed).unwrap().0.len(), 3);
    }
}

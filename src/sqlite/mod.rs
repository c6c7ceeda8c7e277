//! SQLite's on-disk formats, as walfs needs them: the database header, the write-ahead log
//! (`-wal`) and the rollback journal (`-journal`).
//!
//! This file owns the module layout, the re-exports and the small I/O seam shared by the
//! parsers ([`ReadAt`]). Everything under `sqlite` is pure parsing: it never opens, locks,
//! writes or waits on a file, and it decides no policy. The caller chooses when to read
//! (for walfs: at SQLite's barriers) and what to do with the result.
//!
//! - [`header`]: the 100-byte database header, page-size rules, the lock-byte page.
//! - [`wal`]: WAL header and frames, SQLite's WAL checksum, and [`WalTracker`], an
//!   incremental reader that yields committed transactions only and reports restarts,
//!   truncations and gaps.
//! - [`journal`]: rollback-journal headers and records (across all segments), SQLite's
//!   journal checksum, and the set of pages a rollback-mode commit changed.
//! - [`content`]: the content checksum of a database image (blake3 per page, XOR-combined so
//!   that a transaction updates it), which walfs records and restores verify.
//!
//! Sources: sqlite.org/fileformat2.html, sqlite.org/walformat.html, and SQLite's `wal.c` and
//! `pager.c` (the amalgamation bundled by `libsqlite3-sys`). The functions cite what they
//! mirror.
//!
//! No parser here panics on any input: malformed bytes give an error or a documented stop.

pub mod content;
pub mod header;
pub mod journal;
pub mod wal;

use std::io;

pub use content::{database_pages, page_hash, ContentChecksum, PageHash};
pub use header::{
    is_sqlite, lock_byte_page, page_size_from_raw, page_size_is_valid, DbHeader, FileFormat,
    HeaderError, DB_HEADER_SIZE, MAX_PAGE_SIZE, MIN_PAGE_SIZE, PENDING_BYTE, SQLITE_MAGIC,
};
pub use journal::{
    changed_pages, header_state, is_hot_or_valid, journal_checksum, scan_journal, JournalError,
    JournalHeader, JournalHeaderState, JournalReadMode, JournalRecord, JournalScan, JournalSegment,
    JournalStop, JOURNAL_HEADER_LEN, JOURNAL_MAGIC, RECORD_COUNT_TO_EOF,
};
pub use wal::{
    wal_checksum, Continuity, FrameHeader, FrameReader, WalError, WalEvent, WalHeader, WalPage,
    WalPosition, WalTracker, WalTransaction, WAL_FRAME_HEADER_SIZE, WAL_HEADER_SIZE, WAL_MAGIC_BE,
    WAL_MAGIC_LE, WAL_VERSION,
};

/// Positional reads from a file-like source; the caller decides what the I/O is.
///
/// A read may return fewer bytes than asked (the parsers loop), and returns 0 at end of file.
/// Implemented for [`std::fs::File`] (`pread`), for byte slices and vectors (tests, buffers
/// already in memory), for references, and for closures through [`ReadAtFn`].
pub trait ReadAt {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at EOF).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read_at(offset, buf)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        if start >= self.len() {
            return Ok(0);
        }
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.as_slice().read_at(offset, buf)
    }
}

impl ReadAt for std::fs::File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
}

/// Adapts a closure `|offset, buf| -> io::Result<usize>` to [`ReadAt`].
pub struct ReadAtFn<F>(pub F);

impl<F: Fn(u64, &mut [u8]) -> io::Result<usize>> ReadAt for ReadAtFn<F> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        (self.0)(offset, buf)
    }
}

/// Fills `buf` from `offset`. Returns `Ok(false)` if the source ends before `buf` is full
/// (the content of `buf` is then unspecified), and retries interrupted reads.
pub fn read_full<R: ReadAt + ?Sized>(src: &R, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0usize;
    while done < buf.len() {
        let Some(at) = offset.checked_add(done as u64) else {
            return Ok(false);
        };
        match src.read_at(at, &mut buf[done..]) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n.min(buf.len() - done),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads a big-endian u16 at `at` in `b` (SQLite's and LTX's byte order). Callers check the
/// length first.
#[inline]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads a big-endian u32 at `at` in `b`. Callers check the length first.
#[inline]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a big-endian u64 at `at` in `b`. Callers check the length first.
#[inline]
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

/// Reads a big-endian u128 at `at` in `b`. Callers check the length first.
#[inline]
pub(crate) fn be128(b: &[u8], at: usize) -> u128 {
    let mut w = [0u8; 16];
    w.copy_from_slice(&b[at..at + 16]);
    u128::from_be_bytes(w)
}

/// Helpers shared by the unit tests of this module.
#[cfg(test)]
pub(crate) mod test_util {
    /// xorshift64*: a small deterministic generator for the robustness tests.
    pub(crate) struct Rng(pub u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub(crate) fn below(&mut self, n: u64) -> u64 {
            if n == 0 {
                0
            } else {
                self.next() % n
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_read_at_and_read_full() {
        let data: Vec<u8> = (0u8..10).collect();
        let mut buf = [0u8; 4];
        assert_eq!(data.read_at(8, &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], &[8, 9]);
        assert_eq!(data.read_at(10, &mut buf).unwrap(), 0);
        assert_eq!(data.read_at(u64::MAX, &mut buf).unwrap(), 0);
        assert!(read_full(&data, 6, &mut buf).unwrap());
        assert_eq!(buf, [6, 7, 8, 9]);
        assert!(!read_full(&data, 7, &mut buf).unwrap());
        assert!(!read_full(&data, u64::MAX, &mut buf).unwrap());
    }

    #[test]
    fn closure_source_with_short_reads() {
        let data: Vec<u8> = (0u8..100).collect();
        // Returns at most 3 bytes per call, like a pipe would.
        let src = ReadAtFn(|off: u64, buf: &mut [u8]| {
            let n = buf.len().min(3);
            data.read_at(off, &mut buf[..n])
        });
        let mut buf = [0u8; 10];
        assert!(read_full(&src, 50, &mut buf).unwrap());
        assert_eq!(buf[0], 50);
        assert_eq!(buf[9], 59);
    }
}

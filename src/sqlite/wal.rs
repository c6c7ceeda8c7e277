//! The SQLite write-ahead log (`-wal` file): header, frames, checksum, and an incremental
//! reader of committed transactions (walformat.html; `wal.c`).
//!
//! This file owns:
//! - [`WalHeader`] (32 bytes) and [`FrameHeader`] (24 bytes): decode, encode, validate;
//! - [`wal_checksum`]: SQLite's `walChecksumBytes`, in either byte order;
//! - [`WalTracker`]: a state machine that the caller feeds with a readable WAL (through
//!   [`ReadAt`]) as often as it likes. It yields committed transactions only, each once and
//!   in order, and reports WAL restarts, truncations and lost headers as distinct events,
//!   with a verdict ([`Continuity`]) on whether committed frames may have been missed.
//!
//! It never copies page data: transactions carry page offsets, and
//! [`WalTransaction::read_page`] reads one page into a caller buffer and re-verifies it.
//!
//! Format facts relied on (checked against `wal.c` of the bundled SQLite):
//! - The header checksum covers bytes 0..24. Each frame checksum continues the chain from the
//!   previous frame (the header's checksum for frame 1) over the frame header's bytes 0..8
//!   (page number, commit size) and then the page data. The salts are not checksummed; they
//!   must equal the header's.
//! - A frame is valid only if its salts match, its page number is non-zero and the chain
//!   matches. SQLite stops at the first invalid frame; the log ends at the last valid
//!   *commit* frame (commit size != 0) before it.
//! - Frames after the last commit belong to an open (or rolled-back) transaction. SQLite may
//!   overwrite their page data in place and write later frames with zeroed salts and
//!   checksums until the commit rewrites the chain (`walRewriteChecksums`). Committed frames
//!   never change until the log restarts.
//! - A restart rewrites the header with salt-1 incremented and a new random salt-2, then
//!   overwrites frames from offset 32 in order. The checkpoint sequence number written is a
//!   per-connection counter: it is not reliably the old value + 1.

use std::collections::BTreeMap;
use std::fmt;
use std::io;

use super::header::page_size_is_valid;
use super::{be32, read_full, ReadAt};

/// WAL magic whose checksums read the content as little-endian 32-bit words.
pub const WAL_MAGIC_LE: u32 = 0x377f_0682;
/// WAL magic whose checksums read the content as big-endian 32-bit words.
pub const WAL_MAGIC_BE: u32 = 0x377f_0683;
/// The only WAL format version (`WAL_MAX_VERSION`).
pub const WAL_VERSION: u32 = 3_007_000;
/// Size of the WAL header.
pub const WAL_HEADER_SIZE: usize = 32;
/// Size of a frame header; the page data follows it.
pub const WAL_FRAME_HEADER_SIZE: usize = 24;

/// Errors from WAL parsing and reads.
#[derive(Debug)]
pub enum WalError {
    /// The caller's [`ReadAt`] failed.
    Io(io::Error),
    /// Fewer bytes than the structure needs.
    TooShort { len: usize, need: usize },
    /// The magic is neither [`WAL_MAGIC_LE`] nor [`WAL_MAGIC_BE`].
    BadMagic(u32),
    /// The page size is not a power of two in 512..=65536.
    BadPageSize(u32),
    /// The header checksum does not match bytes 0..24.
    BadHeaderChecksum,
    /// The format version is not [`WAL_VERSION`] (SQLite refuses to open such a WAL).
    UnsupportedVersion(u32),
    /// A buffer passed to [`WalTransaction::read_page`] is not one page long.
    BufferSize { expected: usize, got: usize },
    /// A committed frame no longer holds what was validated (the log restarted or was
    /// truncated since the transaction was read, or the file was changed by someone else).
    FrameChanged { data_offset: u64 },
}

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalError::Io(e) => write!(f, "WAL read failed: {e}"),
            WalError::TooShort { len, need } => {
                write!(f, "WAL structure truncated: {len} bytes, need {need}")
            }
            WalError::BadMagic(m) => write!(f, "not a WAL file: magic {m:#010x}"),
            WalError::BadPageSize(p) => write!(f, "WAL header has invalid page size {p}"),
            WalError::BadHeaderChecksum => f.write_str("WAL header checksum mismatch"),
            WalError::UnsupportedVersion(v) => write!(f, "unsupported WAL format version {v}"),
            WalError::BufferSize { expected, got } => {
                write!(f, "page buffer is {got} bytes, page size is {expected}")
            }
            WalError::FrameChanged { data_offset } => write!(
                f,
                "WAL frame with page data at offset {data_offset} changed since it was validated"
            ),
        }
    }
}

impl std::error::Error for WalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WalError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for WalError {
    fn from(e: io::Error) -> Self {
        WalError::Io(e)
    }
}

/// SQLite's WAL checksum (`walChecksumBytes`): for each pair of 32-bit words `(x0, x1)`,
/// read in the given byte order, `s0 += x0 + s1; s1 += x1 + s0` (wrapping), starting from
/// `seed` (`[0, 0]` for the header). SQLite only checksums multiples of 8 bytes; a trailing
/// remainder of `data.len() % 8` bytes is ignored.
///
/// Following the chain means checksumming every frame the watcher reads, so this is the
/// capture's hottest loop. Word by word it is a chain of dependent additions; in blocks of
/// `BLOCK_PAIRS` pairs it becomes two dot products and a carry (see `BlockWeights`),
/// which the compiler vectorizes (with AVX2 where the CPU has it).
pub fn wal_checksum(big_endian: bool, data: &[u8], seed: [u32; 2]) -> [u32; 2] {
    let blocks = data.len() / BLOCK_BYTES * BLOCK_BYTES;
    let seed = checksum_blocks(big_endian, &data[..blocks], seed);
    if big_endian {
        checksum_pairs(&data[blocks..], seed, u32::from_be_bytes)
    } else {
        checksum_pairs(&data[blocks..], seed, u32::from_le_bytes)
    }
}

/// The word-by-word recurrence: the definition, used for what is left after whole blocks.
fn checksum_pairs(data: &[u8], seed: [u32; 2], word: impl Fn([u8; 4]) -> u32) -> [u32; 2] {
    let [mut s0, mut s1] = seed;
    for pair in data.chunks_exact(8) {
        let x0 = word([pair[0], pair[1], pair[2], pair[3]]);
        let x1 = word([pair[4], pair[5], pair[6], pair[7]]);
        s0 = s0.wrapping_add(x0).wrapping_add(s1);
        s1 = s1.wrapping_add(x1).wrapping_add(s0);
    }
    [s0, s1]
}

/// Word pairs per block of the blocked checksum; 256 bytes, which divides every page size.
const BLOCK_PAIRS: usize = 32;
const BLOCK_WORDS: usize = 2 * BLOCK_PAIRS;
const BLOCK_BYTES: usize = 4 * BLOCK_WORDS;

/// One pair step is linear: `(s0, s1) <- M (s0, s1) + (x0, x0 + x1)` with
/// `M = [[1, 1], [1, 2]]`, whose powers are Fibonacci numbers:
/// `M^j = [[F(2j-1), F(2j)], [F(2j), F(2j+1)]]`. So after a block of `n` pairs
/// `s0 = F(2n-1) s0 + F(2n) s1 + sum(w0[i] x[i])` and
/// `s1 = F(2n) s0 + F(2n+1) s1 + sum(w1[i] x[i])`, where pair `k` (with `m = n-1-k`) weighs
/// `x0` by `F(2m+1)` and `x1` by `F(2m)` in `s0`, and by `F(2m+2)` and `F(2m+1)` in `s1`.
/// Everything is modulo 2^32, as SQLite's additions are.
struct BlockWeights {
    w0: [u32; BLOCK_WORDS],
    w1: [u32; BLOCK_WORDS],
    /// `F(2n-1)`, `F(2n)`, `F(2n+1)`.
    carry: [u32; 3],
}

const fn fibonacci_mod_2_32() -> [u32; 2 * BLOCK_PAIRS + 2] {
    let mut f = [0u32; 2 * BLOCK_PAIRS + 2];
    f[1] = 1;
    let mut i = 2;
    while i < f.len() {
        f[i] = f[i - 1].wrapping_add(f[i - 2]);
        i += 1;
    }
    f
}

const WEIGHTS: BlockWeights = {
    let f = fibonacci_mod_2_32();
    let mut w0 = [0u32; BLOCK_WORDS];
    let mut w1 = [0u32; BLOCK_WORDS];
    let mut k = 0;
    while k < BLOCK_PAIRS {
        let m = BLOCK_PAIRS - 1 - k;
        w0[2 * k] = f[2 * m + 1];
        w0[2 * k + 1] = f[2 * m];
        w1[2 * k] = f[2 * m + 2];
        w1[2 * k + 1] = f[2 * m + 1];
        k += 1;
    }
    let n = BLOCK_PAIRS;
    BlockWeights {
        w0,
        w1,
        carry: [f[2 * n - 1], f[2 * n], f[2 * n + 1]],
    }
};

/// The checksum over `data` (whole blocks only), vectorized for the CPU it runs on.
fn checksum_blocks(big_endian: bool, data: &[u8], seed: [u32; 2]) -> [u32; 2] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the only requirement of a `target_feature` function is that the CPU
            // has the feature, which was just checked.
            return unsafe { checksum_blocks_avx2(big_endian, data, seed) };
        }
    }
    checksum_blocks_portable(big_endian, data, seed)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn checksum_blocks_avx2(big_endian: bool, data: &[u8], seed: [u32; 2]) -> [u32; 2] {
    checksum_blocks_portable(big_endian, data, seed)
}

#[inline(always)]
fn checksum_blocks_portable(big_endian: bool, data: &[u8], seed: [u32; 2]) -> [u32; 2] {
    if big_endian {
        blocks_in_order(data, seed, u32::from_be_bytes)
    } else {
        blocks_in_order(data, seed, u32::from_le_bytes)
    }
}

#[inline(always)]
fn blocks_in_order(data: &[u8], seed: [u32; 2], word: impl Fn([u8; 4]) -> u32) -> [u32; 2] {
    let w = &WEIGHTS;
    let [c0, c1, c2] = w.carry;
    let [mut s0, mut s1] = seed;
    for block in data.chunks_exact(BLOCK_BYTES) {
        let mut x = [0u32; BLOCK_WORDS];
        for (x, b) in x.iter_mut().zip(block.chunks_exact(4)) {
            *x = word([b[0], b[1], b[2], b[3]]);
        }
        let mut d0 = 0u32;
        let mut d1 = 0u32;
        for ((x, a), b) in x.iter().zip(&w.w0).zip(&w.w1) {
            d0 = d0.wrapping_add(a.wrapping_mul(*x));
            d1 = d1.wrapping_add(b.wrapping_mul(*x));
        }
        let n0 = c0
            .wrapping_mul(s0)
            .wrapping_add(c1.wrapping_mul(s1))
            .wrapping_add(d0);
        let n1 = c1
            .wrapping_mul(s0)
            .wrapping_add(c2.wrapping_mul(s1))
            .wrapping_add(d1);
        s0 = n0;
        s1 = n1;
    }
    [s0, s1]
}

/// The 32-byte WAL header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalHeader {
    /// Checksums read big-endian words (magic [`WAL_MAGIC_BE`]) rather than little-endian.
    pub big_endian_checksum: bool,
    /// Format version (always [`WAL_VERSION`] once parsed).
    pub version: u32,
    /// Database page size.
    pub page_size: u32,
    /// Checkpoint sequence number.
    pub checkpoint_seq: u32,
    /// Salt-1: incremented by every restart.
    pub salt1: u32,
    /// Salt-2: random, new at every restart.
    pub salt2: u32,
    /// Checksum over bytes 0..24; also the seed of frame 1's checksum.
    pub checksum: [u32; 2],
}

impl WalHeader {
    /// Builds a header and computes its checksum.
    pub fn new(
        big_endian_checksum: bool,
        page_size: u32,
        checkpoint_seq: u32,
        salt1: u32,
        salt2: u32,
    ) -> WalHeader {
        let mut h = WalHeader {
            big_endian_checksum,
            version: WAL_VERSION,
            page_size,
            checkpoint_seq,
            salt1,
            salt2,
            checksum: [0, 0],
        };
        let bytes = h.encode();
        h.checksum = wal_checksum(big_endian_checksum, &bytes[..24], [0, 0]);
        h
    }

    /// Parses and validates a header, in SQLite's order (`walIndexRecover`): magic and page
    /// size, then the checksum, then the version.
    pub fn parse(bytes: &[u8]) -> Result<WalHeader, WalError> {
        if bytes.len() < WAL_HEADER_SIZE {
            return Err(WalError::TooShort {
                len: bytes.len(),
                need: WAL_HEADER_SIZE,
            });
        }
        let magic = be32(bytes, 0);
        let big_endian_checksum = match magic {
            WAL_MAGIC_LE => false,
            WAL_MAGIC_BE => true,
            other => return Err(WalError::BadMagic(other)),
        };
        let page_size = be32(bytes, 8);
        if !page_size_is_valid(page_size) {
            return Err(WalError::BadPageSize(page_size));
        }
        let checksum = [be32(bytes, 24), be32(bytes, 28)];
        if wal_checksum(big_endian_checksum, &bytes[..24], [0, 0]) != checksum {
            return Err(WalError::BadHeaderChecksum);
        }
        let version = be32(bytes, 4);
        if version != WAL_VERSION {
            return Err(WalError::UnsupportedVersion(version));
        }
        Ok(WalHeader {
            big_endian_checksum,
            version,
            page_size,
            checkpoint_seq: be32(bytes, 12),
            salt1: be32(bytes, 16),
            salt2: be32(bytes, 20),
            checksum,
        })
    }

    /// The magic number for this header's checksum byte order.
    pub fn magic(&self) -> u32 {
        if self.big_endian_checksum {
            WAL_MAGIC_BE
        } else {
            WAL_MAGIC_LE
        }
    }

    /// The 32 bytes of this header, with the stored checksum.
    pub fn encode(&self) -> [u8; WAL_HEADER_SIZE] {
        let mut b = [0u8; WAL_HEADER_SIZE];
        for (i, v) in [
            self.magic(),
            self.version,
            self.page_size,
            self.checkpoint_seq,
            self.salt1,
            self.salt2,
            self.checksum[0],
            self.checksum[1],
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    /// Size of one frame: frame header plus page.
    pub fn frame_size(&self) -> u64 {
        WAL_FRAME_HEADER_SIZE as u64 + u64::from(self.page_size)
    }

    /// Byte offset of frame `n` (1-based, as in SQLite's `walFrameOffset`).
    pub fn frame_offset(&self, n: u32) -> u64 {
        WAL_HEADER_SIZE as u64 + u64::from(n.saturating_sub(1)) * self.frame_size()
    }

    /// Same log generation: every field equal (byte order, page size, sequence, salts,
    /// checksum). A restart always changes salt-1.
    fn same_log(&self, other: &WalHeader) -> bool {
        self == other
    }
}

/// The 24-byte header in front of every page in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Database page number (1-based, never 0 in a valid frame).
    pub pgno: u32,
    /// For a commit frame, the database size in pages after the commit; otherwise 0.
    pub commit_size: u32,
    /// Must equal the WAL header's salt-1.
    pub salt1: u32,
    /// Must equal the WAL header's salt-2.
    pub salt2: u32,
    /// Cumulative checksum through this frame.
    pub checksum: [u32; 2],
}

impl FrameHeader {
    /// Decodes the fields (no validation; see [`FrameHeader::verify`]).
    pub fn parse(bytes: &[u8]) -> Result<FrameHeader, WalError> {
        if bytes.len() < WAL_FRAME_HEADER_SIZE {
            return Err(WalError::TooShort {
                len: bytes.len(),
                need: WAL_FRAME_HEADER_SIZE,
            });
        }
        Ok(FrameHeader {
            pgno: be32(bytes, 0),
            commit_size: be32(bytes, 4),
            salt1: be32(bytes, 8),
            salt2: be32(bytes, 12),
            checksum: [be32(bytes, 16), be32(bytes, 20)],
        })
    }

    /// Builds the header of a frame holding `page` that follows a frame (or the WAL
    /// header) whose checksum is `prev`, as SQLite's `walEncodeFrame` does.
    pub fn new(
        header: &WalHeader,
        prev: [u32; 2],
        pgno: u32,
        commit_size: u32,
        page: &[u8],
    ) -> FrameHeader {
        let mut first = [0u8; 8];
        first[..4].copy_from_slice(&pgno.to_be_bytes());
        first[4..].copy_from_slice(&commit_size.to_be_bytes());
        let be = header.big_endian_checksum;
        let checksum = wal_checksum(be, page, wal_checksum(be, &first, prev));
        FrameHeader {
            pgno,
            commit_size,
            salt1: header.salt1,
            salt2: header.salt2,
            checksum,
        }
    }

    /// The 24 bytes of this frame header.
    pub fn encode(&self) -> [u8; WAL_FRAME_HEADER_SIZE] {
        let mut b = [0u8; WAL_FRAME_HEADER_SIZE];
        for (i, v) in [
            self.pgno,
            self.commit_size,
            self.salt1,
            self.salt2,
            self.checksum[0],
            self.checksum[1],
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    /// True for the last frame of a transaction.
    pub fn is_commit(&self) -> bool {
        self.commit_size != 0
    }

    /// SQLite's `walDecodeFrame`: checks salts, page number and the checksum chain from
    /// `prev` over this frame's `page`. Returns the new chain value if the frame is valid.
    pub fn verify(&self, header: &WalHeader, prev: [u32; 2], page: &[u8]) -> Option<[u32; 2]> {
        if self.salt1 != header.salt1 || self.salt2 != header.salt2 || self.pgno == 0 {
            return None;
        }
        if page.len() != header.page_size as usize {
            return None;
        }
        let expect = FrameHeader::new(header, prev, self.pgno, self.commit_size, page);
        (expect.checksum == self.checksum).then_some(self.checksum)
    }
}

/// One page of a committed transaction: where its newest version lies in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalPage {
    /// Database page number.
    pub pgno: u32,
    /// Byte offset of the page data (just past the frame header) in the WAL file.
    pub data_offset: u64,
    /// Checksum chain value before this frame.
    pub checksum_in: [u32; 2],
    /// Checksum stored in this frame's header.
    pub frame_checksum: [u32; 2],
}

/// A committed transaction read from the WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalTransaction {
    /// The WAL header the transaction was written under (salts, page size, byte order).
    pub header: WalHeader,
    /// Offset of the transaction's first frame.
    pub start_offset: u64,
    /// Offset just past its commit frame: where the next transaction starts.
    pub end_offset: u64,
    /// Database size in pages after the commit.
    pub db_size: u32,
    /// Number of frames, counting every version of a page that was written more than once.
    pub frame_count: u32,
    /// Checksum chain value after the commit frame.
    pub checksum: [u32; 2],
    /// The newest version of each page, sorted by page number. Pages beyond `db_size`
    /// (written by earlier spills of a transaction that then shrank the database) are left
    /// out: they are not part of the committed image.
    pub pages: Vec<WalPage>,
}

impl WalTransaction {
    /// Reads `page` into `buf` (exactly one page long), re-verified as by
    /// [`read_frame_page`](Self::read_frame_page).
    pub fn read_page<R: ReadAt + ?Sized>(
        &self,
        src: &R,
        page: &WalPage,
        buf: &mut [u8],
    ) -> Result<(), WalError> {
        let expected = self.header.page_size as usize;
        if buf.len() != expected {
            return Err(WalError::BufferSize {
                expected,
                got: buf.len(),
            });
        }
        let mut frame = vec![0u8; WAL_FRAME_HEADER_SIZE + expected];
        self.read_frame_page(src, page, &mut frame)?;
        buf.copy_from_slice(&frame[WAL_FRAME_HEADER_SIZE..]);
        Ok(())
    }

    /// Reads the frame of `page` in one read into `frame` (one frame long: frame header
    /// plus page; the page is `frame[24..]`) and re-verifies it: the frame header must still
    /// carry this log's salts and the validated checksum, and the checksum is recomputed
    /// over the data. A concurrent restart that overwrote the frame shows as a salt or
    /// checksum mismatch, so as [`WalError::FrameChanged`].
    pub fn read_frame_page<R: ReadAt + ?Sized>(
        &self,
        src: &R,
        page: &WalPage,
        frame: &mut [u8],
    ) -> Result<(), WalError> {
        let expected = WAL_FRAME_HEADER_SIZE + self.header.page_size as usize;
        if frame.len() != expected {
            return Err(WalError::BufferSize {
                expected,
                got: frame.len(),
            });
        }
        let changed = WalError::FrameChanged {
            data_offset: page.data_offset,
        };
        let Some(hdr_off) = page.data_offset.checked_sub(WAL_FRAME_HEADER_SIZE as u64) else {
            return Err(changed);
        };
        if !read_full(src, hdr_off, frame)? {
            return Err(changed);
        }
        let fh = FrameHeader::parse(&frame[..WAL_FRAME_HEADER_SIZE])?;
        if fh.pgno != page.pgno
            || fh.checksum != page.frame_checksum
            || fh
                .verify(
                    &self.header,
                    page.checksum_in,
                    &frame[WAL_FRAME_HEADER_SIZE..],
                )
                .is_none()
        {
            return Err(changed);
        }
        Ok(())
    }

    /// Offset of the commit frame (the transaction's last frame).
    pub fn commit_frame_offset(&self) -> u64 {
        self.end_offset - self.header.frame_size()
    }
}

/// Where a tracker stands in a log; persist it to resume after a restart of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalPosition {
    /// The header of the log generation being read.
    pub header: WalHeader,
    /// Offset just past the last committed frame read (32 if none yet).
    pub committed_end: u64,
    /// Checksum chain value at `committed_end`.
    pub checksum: [u32; 2],
}

impl WalPosition {
    /// The start of a log generation: no frame read yet.
    pub fn start(header: WalHeader) -> WalPosition {
        WalPosition {
            header,
            committed_end: WAL_HEADER_SIZE as u64,
            checksum: header.checksum,
        }
    }

    /// The position just after a transaction.
    pub fn after(txn: &WalTransaction) -> WalPosition {
        WalPosition {
            header: txn.header,
            committed_end: txn.end_offset,
            checksum: txn.checksum,
        }
    }
}

/// Whether every transaction committed in the previous log generation was yielded before
/// the change that an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// Proven from the file: the old log had no committed frame past the last one yielded.
    /// (The old log's last committed frame is still intact and the old chain ends right
    /// after it; or, after a lost header, the new log is the direct successor, salt-1 + 1.)
    Complete,
    /// Not provable from the file, but the old log was read to its end by a barrier poll
    /// ([`WalTracker::poll_barrier`]) and no later poll found a new commit in it. Under
    /// SQLite's protocol this means nothing was missed *if* the caller polls at every fsync
    /// of the WAL and synchronous is NORMAL or FULL (a restart or truncate only follows a
    /// checkpoint that fsyncs the WAL first). With synchronous=OFF it proves nothing.
    Drained,
    /// Proven: the old log holds at least one valid committed transaction that was never
    /// yielded. Heal from the database file (it holds those commits after a checkpoint).
    Gap,
    /// Cannot be decided: the old log's tail was overwritten or cut off.
    Unknown,
}

impl Continuity {
    /// True if committed transactions may have been missed (`Gap` or `Unknown`).
    pub fn may_have_missed(&self) -> bool {
        matches!(self, Continuity::Gap | Continuity::Unknown)
    }
}

/// What a [`WalTracker`] poll found, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalEvent {
    /// A fresh tracker found a valid header and starts reading this log from its first
    /// frame. Transactions already in the log follow as `Commit` events.
    Started { header: WalHeader },
    /// A committed transaction, yielded once.
    Commit(WalTransaction),
    /// The header changed: a new log generation (a restart after a checkpoint, or a WAL
    /// recreated after deletion). Its frames are read from offset 32.
    Restarted {
        old: WalHeader,
        new: WalHeader,
        continuity: Continuity,
    },
    /// The file is shorter than the end of the last committed frame yielded (including
    /// shorter than the header, e.g. `wal_checkpoint(TRUNCATE)` or a new empty file).
    Truncated {
        old: WalHeader,
        committed_end: u64,
        continuity: Continuity,
    },
    /// The file is long enough but its header no longer validates; SQLite would treat the
    /// log as empty.
    Invalidated {
        old: WalHeader,
        continuity: Continuity,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Gen {
    pos: WalPosition,
    /// A same-header shrink below `committed_end` was already reported.
    shrink_reported: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// No header seen yet.
    Fresh,
    /// Reading a log generation.
    Tracking(Gen),
    /// Had a generation, but the file is now too short or its header invalid.
    Lost(Gen),
}

enum HeaderRead {
    Absent,
    Invalid,
    Valid(WalHeader),
}

/// Incremental reader of a WAL file that yields committed transactions only.
///
/// Call [`poll`](Self::poll) whenever the WAL may have changed, and
/// [`poll_barrier`](Self::poll_barrier) when the application is blocked in an fsync,
/// ftruncate, unlink or rename of the database's files (nothing else can write meanwhile).
/// Each poll re-reads from the end of the last committed frame it yielded, with the
/// checksum chain saved there, so a transaction whose commit frame is not written yet is
/// read again, whole, once it commits; frames past the last valid commit are never yielded.
///
/// A poll that fails with an I/O error changes nothing; retry it.
#[derive(Debug, Clone)]
pub struct WalTracker {
    state: State,
    /// Since the end of the last barrier poll, no poll yielded a commit or a new generation.
    drained: bool,
    uncommitted_frames: u32,
}

impl Default for WalTracker {
    fn default() -> Self {
        WalTracker::new()
    }
}

impl WalTracker {
    /// A tracker that has seen nothing: its first poll yields every committed transaction
    /// already in the log.
    pub fn new() -> WalTracker {
        WalTracker {
            state: State::Fresh,
            drained: false,
            uncommitted_frames: 0,
        }
    }

    /// A tracker that continues from a saved position. If the log has restarted since, the
    /// first poll reports it with a continuity verdict.
    pub fn resume(pos: WalPosition) -> WalTracker {
        WalTracker {
            state: State::Tracking(Gen {
                pos,
                shrink_reported: false,
            }),
            drained: false,
            uncommitted_frames: 0,
        }
    }

    /// Forgets everything, as [`WalTracker::new`]. For a caller that knows the file was
    /// replaced after it consumed the old one (e.g. it polled at the unlink).
    pub fn reset(&mut self) {
        *self = WalTracker::new();
    }

    /// The position after the last committed transaction yielded, or the last known one if
    /// the header is currently lost. `None` before any header was seen.
    pub fn position(&self) -> Option<WalPosition> {
        match &self.state {
            State::Fresh => None,
            State::Tracking(g) | State::Lost(g) => Some(g.pos),
        }
    }

    /// The header of the generation being read (`None` if fresh or lost).
    pub fn header(&self) -> Option<WalHeader> {
        match &self.state {
            State::Tracking(g) => Some(g.pos.header),
            _ => None,
        }
    }

    /// Valid frames found after the last commit in the last poll (an open transaction, or
    /// leftovers of a rolled-back one).
    pub fn uncommitted_frames(&self) -> u32 {
        self.uncommitted_frames
    }

    /// Reads what changed since the last poll.
    pub fn poll<R: ReadAt + ?Sized>(&mut self, src: &R) -> Result<Vec<WalEvent>, WalError> {
        self.poll_inner(src, false, &mut FrameReader::new())
    }

    /// [`poll`](Self::poll) (or [`poll_barrier`](Self::poll_barrier) with `barrier`), reading
    /// through `frames`, which afterwards holds the frames this poll validated (see
    /// [`FrameReader::validated`]) until the next poll through it.
    pub fn poll_through<R: ReadAt + ?Sized>(
        &mut self,
        src: &R,
        barrier: bool,
        frames: &mut FrameReader,
    ) -> Result<Vec<WalEvent>, WalError> {
        frames.clear();
        self.poll_inner(src, barrier, frames)
    }

    /// Like [`poll`](Self::poll), for a moment when no writer can change the WAL (the
    /// application is blocked in a barrier such as fsync). It records that the current log
    /// was read to its end, which later restarts and truncations report as
    /// [`Continuity::Drained`] when the file alone cannot prove completeness.
    pub fn poll_barrier<R: ReadAt + ?Sized>(&mut self, src: &R) -> Result<Vec<WalEvent>, WalError> {
        self.poll_inner(src, true, &mut FrameReader::new())
    }

    fn poll_inner<R: ReadAt + ?Sized>(
        &mut self,
        src: &R,
        barrier: bool,
        reader: &mut FrameReader,
    ) -> Result<Vec<WalEvent>, WalError> {
        let mut events = Vec::new();
        let fallback = if self.drained {
            Continuity::Drained
        } else {
            Continuity::Unknown
        };
        let mut uncommitted = 0;
        let header = read_header(src)?;
        let state = match (self.state.clone(), header) {
            (State::Fresh, HeaderRead::Valid(h)) => {
                events.push(WalEvent::Started { header: h });
                self.scan_new(src, h, &mut events, &mut uncommitted, reader)?
            }
            (State::Fresh, _) => State::Fresh,
            (State::Tracking(mut g), HeaderRead::Valid(h)) if g.pos.header.same_log(&h) => {
                let end = g.pos.committed_end;
                let shrunk =
                    end > WAL_HEADER_SIZE as u64 && !read_full(src, end - 1, &mut [0u8; 1])?;
                if shrunk {
                    if !g.shrink_reported {
                        events.push(WalEvent::Truncated {
                            old: h,
                            committed_end: end,
                            continuity: fallback,
                        });
                        g.shrink_reported = true;
                    }
                } else {
                    g.shrink_reported = false;
                    uncommitted = scan(src, &mut g.pos, &mut events, reader)?;
                }
                State::Tracking(g)
            }
            (State::Tracking(g), HeaderRead::Valid(h)) => {
                let continuity = restart_continuity(src, &g.pos, &h, fallback)?;
                events.push(WalEvent::Restarted {
                    old: g.pos.header,
                    new: h,
                    continuity,
                });
                self.scan_new(src, h, &mut events, &mut uncommitted, reader)?
            }
            (State::Tracking(g), HeaderRead::Absent) => {
                events.push(WalEvent::Truncated {
                    old: g.pos.header,
                    committed_end: g.pos.committed_end,
                    continuity: fallback,
                });
                State::Lost(g)
            }
            (State::Tracking(g), HeaderRead::Invalid) => {
                events.push(WalEvent::Invalidated {
                    old: g.pos.header,
                    continuity: fallback,
                });
                State::Lost(g)
            }
            (State::Lost(mut g), HeaderRead::Valid(h)) if g.pos.header.same_log(&h) => {
                // The same generation came back (e.g. a torn header read): carry on.
                g.shrink_reported = false;
                uncommitted = scan(src, &mut g.pos, &mut events, reader)?;
                State::Tracking(g)
            }
            (State::Lost(g), HeaderRead::Valid(h)) => {
                // The loss was already reported; only intermediate generations are at stake.
                let continuity = if h.salt1 == g.pos.header.salt1.wrapping_add(1) {
                    Continuity::Complete
                } else {
                    fallback
                };
                events.push(WalEvent::Restarted {
                    old: g.pos.header,
                    new: h,
                    continuity,
                });
                self.scan_new(src, h, &mut events, &mut uncommitted, reader)?
            }
            (State::Lost(g), _) => State::Lost(g),
        };
        self.state = state;
        self.uncommitted_frames = uncommitted;
        if barrier {
            self.drained = true;
        } else if events.iter().any(|e| {
            matches!(
                e,
                WalEvent::Commit(_) | WalEvent::Started { .. } | WalEvent::Restarted { .. }
            )
        }) {
            self.drained = false;
        }
        Ok(events)
    }

    fn scan_new<R: ReadAt + ?Sized>(
        &self,
        src: &R,
        header: WalHeader,
        events: &mut Vec<WalEvent>,
        uncommitted: &mut u32,
        reader: &mut FrameReader,
    ) -> io::Result<State> {
        let mut g = Gen {
            pos: WalPosition::start(header),
            shrink_reported: false,
        };
        *uncommitted = scan(src, &mut g.pos, events, reader)?;
        Ok(State::Tracking(g))
    }
}

fn read_header<R: ReadAt + ?Sized>(src: &R) -> io::Result<HeaderRead> {
    let mut buf = [0u8; WAL_HEADER_SIZE];
    if !read_full(src, 0, &mut buf)? {
        return Ok(HeaderRead::Absent);
    }
    Ok(match WalHeader::parse(&buf) {
        Ok(h) => HeaderRead::Valid(h),
        Err(_) => HeaderRead::Invalid,
    })
}

/// Reads and validates the frame at `offset` continuing the chain `prev`. `buf` must be one
/// frame long. Returns the frame header and the new chain value, or `None` if the frame is
/// incomplete or invalid.
fn read_frame<R: ReadAt + ?Sized>(
    src: &R,
    header: &WalHeader,
    offset: u64,
    prev: [u32; 2],
    buf: &mut [u8],
) -> io::Result<Option<(FrameHeader, [u32; 2])>> {
    if !read_full(src, offset, buf)? {
        return Ok(None);
    }
    let Ok(frame) = FrameHeader::parse(buf) else {
        return Ok(None);
    };
    Ok(frame
        .verify(header, prev, &buf[WAL_FRAME_HEADER_SIZE..])
        .map(|ck| (frame, ck)))
}

/// Reads frames sequentially through a buffer of several frames, so that a long scan
/// costs one read per 256 KiB instead of one per frame. The first read covers four
/// frames and each further read doubles, so a scan that finds one new commit (a
/// `synchronous=FULL` barrier) does not read stale frames far past the end of the log.
///
/// The bytes a poll read stay in the buffer (up to `FrameReader::RETAIN`), so that the
/// caller can take the pages of the transactions it yielded from there
/// ([`FrameReader::validated`]) instead of reading them again. Once they are taken,
/// [`FrameReader::release`] frees the buffer: a mount of a thousand databases must not keep
/// one per database.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: u64,
    len: usize,
    chunk: usize,
    /// The log whose frames `buf` holds.
    log: Option<WalHeader>,
    /// End of the last frame that a scan of `log` validated and yielded as part of a commit.
    validated_end: u64,
}

impl FrameReader {
    const MAX_CHUNK: usize = 256 * 1024;
    /// The most a poll keeps; past it, the buffer starts again at the frame being read.
    const RETAIN: usize = 4 * 1024 * 1024;

    pub fn new() -> FrameReader {
        FrameReader::default()
    }

    fn clear(&mut self) {
        self.start = 0;
        self.len = 0;
        self.chunk = 0;
        self.log = None;
        self.validated_end = 0;
        if self.buf.capacity() > 2 * Self::RETAIN {
            self.buf = Vec::new();
        }
    }

    /// Frees the buffer (its bytes are read again when asked for): call it once the pages
    /// of a poll's transactions were taken. The next read starts again at a small chunk.
    pub fn release(&mut self) {
        self.buf = Vec::new();
        self.start = 0;
        self.len = 0;
        self.chunk = 0;
    }

    /// The `size` bytes at `offset`, or `None` if the file ends before.
    fn frame<R: ReadAt + ?Sized>(
        &mut self,
        src: &R,
        offset: u64,
        size: usize,
    ) -> io::Result<Option<&[u8]>> {
        let end = self.start + self.len as u64;
        let in_buf = offset >= self.start && offset + size as u64 <= end;
        if !in_buf {
            self.chunk = if self.chunk == 0 {
                4 * size
            } else {
                (2 * self.chunk).min(Self::MAX_CHUNK.max(size))
            };
            // Sequential reads append to what the buffer holds, up to RETAIN.
            let append = self.len > 0 && offset >= self.start && offset <= end;
            if !append || self.len + self.chunk > Self::RETAIN.max(self.chunk) {
                self.start = offset;
                self.len = 0;
            }
            let from = self.start + self.len as u64;
            let want = (offset + size as u64 - from) as usize;
            let target = self.len + self.chunk.max(want);
            if self.buf.len() < target {
                self.buf.resize(target, 0);
            }
            let mut got = 0;
            while self.len + got < target {
                let Some(at) = from.checked_add(got as u64) else {
                    break;
                };
                match src.read_at(at, &mut self.buf[self.len + got..target]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.len += got;
            if offset + size as u64 > self.start + self.len as u64 {
                return Ok(None);
            }
        }
        let at = (offset - self.start) as usize;
        Ok(Some(&self.buf[at..at + size]))
    }

    /// The page data at `data_offset` (`size` bytes) of `log` if the last poll through this
    /// reader validated it as part of a committed transaction and it is still in the buffer: the
    /// exact bytes its checksum chain covered, as [`WalTransaction::read_frame_page`] would
    /// read them while the log is unchanged.
    pub fn validated(&self, log: &WalHeader, data_offset: u64, size: usize) -> Option<&[u8]> {
        let end = data_offset.checked_add(size as u64)?;
        if self.log.as_ref() != Some(log)
            || data_offset < self.start
            || end > self.start + self.len as u64
            || end > self.validated_end
        {
            return None;
        }
        let at = (data_offset - self.start) as usize;
        Some(&self.buf[at..at + size])
    }
}

/// Validates the frame in `bytes` (one frame long) against the chain `prev`.
fn check_frame(
    header: &WalHeader,
    prev: [u32; 2],
    bytes: &[u8],
) -> Option<(FrameHeader, [u32; 2])> {
    let frame = FrameHeader::parse(bytes).ok()?;
    frame
        .verify(header, prev, &bytes[WAL_FRAME_HEADER_SIZE..])
        .map(|ck| (frame, ck))
}

fn frame_buf(header: &WalHeader) -> Vec<u8> {
    vec![0u8; WAL_FRAME_HEADER_SIZE + header.page_size as usize]
}

/// Reads committed transactions from `pos` on, pushes them, and advances `pos` past the
/// last one. Returns the number of valid frames after the last commit.
fn scan<R: ReadAt + ?Sized>(
    src: &R,
    pos: &mut WalPosition,
    events: &mut Vec<WalEvent>,
    reader: &mut FrameReader,
) -> io::Result<u32> {
    let header = pos.header;
    if reader.log != Some(header) {
        reader.clear();
        reader.log = Some(header);
    }
    let frame_size = header.frame_size() as usize;
    let mut offset = pos.committed_end;
    let mut chain = pos.checksum;
    let mut pages: BTreeMap<u32, WalPage> = BTreeMap::new();
    let mut frames = 0u32;
    while let Some((frame, next)) = reader
        .frame(src, offset, frame_size)?
        .and_then(|b| check_frame(&header, chain, b))
    {
        let Some(end) = offset.checked_add(header.frame_size()) else {
            break;
        };
        pages.insert(
            frame.pgno,
            WalPage {
                pgno: frame.pgno,
                data_offset: offset + WAL_FRAME_HEADER_SIZE as u64,
                checksum_in: chain,
                frame_checksum: next,
            },
        );
        frames += 1;
        chain = next;
        offset = end;
        if frame.is_commit() {
            let db_size = frame.commit_size;
            let txn = WalTransaction {
                header,
                start_offset: pos.committed_end,
                end_offset: end,
                db_size,
                frame_count: frames,
                checksum: chain,
                pages: std::mem::take(&mut pages)
                    .into_values()
                    .filter(|p| p.pgno <= db_size)
                    .collect(),
            };
            events.push(WalEvent::Commit(txn));
            pos.committed_end = end;
            pos.checksum = chain;
            reader.validated_end = end;
            frames = 0;
        }
    }
    Ok(frames)
}

/// The verdict for a header change seen while tracking `old`.
fn restart_continuity<R: ReadAt + ?Sized>(
    src: &R,
    old: &WalPosition,
    new: &WalHeader,
    fallback: Continuity,
) -> io::Result<Continuity> {
    let header = old.header;
    let mut buf = frame_buf(&header);
    // 1. Does the old chain continue past what we yielded, up to a commit frame? Old bytes
    //    cannot forge a valid continuation of the chain, so a commit found proves a gap.
    let mut offset = old.committed_end;
    let mut chain = old.checksum;
    while let Some((frame, next)) = read_frame(src, &header, offset, chain, &mut buf)? {
        if frame.is_commit() {
            return Ok(Continuity::Gap);
        }
        chain = next;
        match offset.checked_add(header.frame_size()) {
            Some(o) => offset = o,
            None => break,
        }
    }
    // 2. Only a direct successor (salt-1 + 1) rules out whole generations in between.
    if new.salt1 != header.salt1.wrapping_add(1) || old.committed_end <= WAL_HEADER_SIZE as u64 {
        return Ok(fallback);
    }
    // 3. Is the old log's last committed frame still there, read *after* the probe? The new
    //    generation overwrites frames in order from offset 32 and a truncation removes the
    //    tail, so an intact anchor means the probe above read old bytes: the old chain
    //    really ended there.
    let anchor = old.committed_end - header.frame_size();
    let mut fh = [0u8; WAL_FRAME_HEADER_SIZE];
    if read_full(src, anchor, &mut fh)? {
        let Ok(f) = FrameHeader::parse(&fh) else {
            return Ok(fallback);
        };
        if f.salt1 == header.salt1
            && f.salt2 == header.salt2
            && f.checksum == old.checksum
            && f.is_commit()
        {
            return Ok(Continuity::Complete);
        }
    }
    Ok(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::test_util::Rng;
    use rusqlite::Connection;
    use std::path::{Path, PathBuf};

    /// The blocked checksum equals the word-by-word definition for every length (whole
    /// blocks, a remainder, an odd tail SQLite ignores), both byte orders, any seed.
    #[test]
    fn blocked_checksum_equals_the_definition() {
        let definition = |big_endian: bool, data: &[u8], seed: [u32; 2]| {
            if big_endian {
                checksum_pairs(data, seed, u32::from_be_bytes)
            } else {
                checksum_pairs(data, seed, u32::from_le_bytes)
            }
        };
        let mut rng = Rng(7);
        for len in [0, 8, 16, 248, 256, 264, 512, 1000, 1024, 4096, 4104, 65536] {
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let blocks = &data[..len / BLOCK_BYTES * BLOCK_BYTES];
            for big_endian in [false, true] {
                for seed in [
                    [0, 0],
                    [rng.next() as u32, rng.next() as u32],
                    [u32::MAX; 2],
                ] {
                    assert_eq!(
                        wal_checksum(big_endian, &data, seed),
                        definition(big_endian, &data, seed),
                        "len {len} big_endian {big_endian} seed {seed:?}"
                    );
                    // The portable path too, whatever the CPU running the test has.
                    assert_eq!(
                        checksum_blocks_portable(big_endian, blocks, seed),
                        definition(big_endian, blocks, seed)
                    );
                }
            }
        }
    }

    fn wal_path(db: &Path) -> PathBuf {
        let mut s = db.as_os_str().to_owned();
        s.push("-wal");
        PathBuf::from(s)
    }

    /// A WAL-mode database with automatic checkpoints off. Returns the connection and the
    /// database bytes before any transaction reached the WAL.
    fn open_wal_db(path: &Path, page_size: u32) -> (Connection, Vec<u8>) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(&format!("PRAGMA page_size={page_size};"))
            .unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.execute_batch("PRAGMA wal_autocheckpoint=0; PRAGMA synchronous=NORMAL;")
            .unwrap();
        let base = std::fs::read(path).unwrap();
        (conn, base)
    }

    fn commits(events: &[WalEvent]) -> Vec<WalTransaction> {
        events
            .iter()
            .filter_map(|e| match e {
                WalEvent::Commit(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    /// Applies committed transactions to a database image, reading pages from `wal`.
    fn replay(image: &mut Vec<u8>, wal: &[u8], txns: &[WalTransaction]) {
        for t in txns {
            let ps = t.header.page_size as usize;
            let mut buf = vec![0u8; ps];
            for p in &t.pages {
                t.read_page(wal, p, &mut buf).unwrap();
                let at = (p.pgno as usize - 1) * ps;
                if image.len() < at + ps {
                    image.resize(at + ps, 0);
                }
                image[at..at + ps].copy_from_slice(&buf);
            }
            image.resize(t.db_size as usize * ps, 0);
        }
    }

    /// Checkpoints everything and returns the database file: what SQLite reads.
    fn checkpointed(conn: &Connection, path: &Path) -> Vec<u8> {
        let (busy, _, _): (i64, i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(busy, 0);
        std::fs::read(path).unwrap()
    }

    fn workload(conn: &Connection, rounds: usize) {
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB);")
            .unwrap();
        for i in 0..rounds {
            conn.execute(
                "INSERT INTO t(v) VALUES(randomblob(?1))",
                [(i * 997 % 5000 + 10) as i64],
            )
            .unwrap();
            if i % 3 == 0 {
                conn.execute(
                    "UPDATE t SET v = randomblob(300) WHERE id % 5 = ?1",
                    [(i % 5) as i64],
                )
                .unwrap();
            }
        }
    }

    /// A transaction that spills frames to the WAL and is rolled back: its valid frames
    /// stay on disk without a commit frame and must never be yielded.
    fn rolled_back_spill(conn: &Connection) {
        conn.execute_batch(
            "PRAGMA cache_size=10;
             BEGIN;
             WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<200)
             INSERT INTO t(v) SELECT randomblob(2000) FROM c;
             ROLLBACK;
             PRAGMA cache_size=-2000;",
        )
        .unwrap();
    }

    #[test]
    fn checksum_matches_known_values() {
        // The header checksum SQLite computes is verified by WalHeader::parse on real
        // files; here check the recurrence itself on a hand-computed case.
        let data = [1u8, 0, 0, 0, 2, 0, 0, 0];
        assert_eq!(wal_checksum(false, &data, [0, 0]), [1, 3]);
        let be = [0u8, 0, 0, 1, 0, 0, 0, 2];
        assert_eq!(wal_checksum(true, &be, [0, 0]), [1, 3]);
        // Two pairs: s0 = 1 + 3 + 3 = 7 ... with seed wrapping.
        assert_eq!(wal_checksum(false, &[data, data].concat(), [0, 0]), [5, 10]);
        assert_eq!(
            wal_checksum(false, &data, [u32::MAX, u32::MAX]),
            [u32::MAX, 0]
        );
        // Remainder bytes are ignored.
        assert_eq!(
            wal_checksum(false, &[1, 0, 0, 0, 2, 0, 0, 0, 9], [0, 0]),
            [1, 3]
        );
    }

    #[test]
    fn replay_reproduces_sqlite_for_page_sizes() {
        for &ps in &[512u32, 4096, 65536] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("db");
            let (conn, base) = open_wal_db(&path, ps);
            let rounds = if ps == 65536 { 12 } else { 40 };
            workload(&conn, rounds);
            rolled_back_spill(&conn);
            workload(&conn, 5);
            // A transaction that shrinks the database.
            conn.execute_batch("DELETE FROM t WHERE id > 3; VACUUM;")
                .unwrap();
            workload(&conn, 3);
            let wal = std::fs::read(wal_path(&path)).unwrap();

            let mut tracker = WalTracker::new();
            let events = tracker.poll(&wal).unwrap();
            assert!(matches!(events[0], WalEvent::Started { header } if header.page_size == ps));
            let txns = commits(&events);
            assert!(txns.len() >= rounds, "{} txns", txns.len());
            assert!(!txns[0].header.big_endian_checksum, "x86 writes LE magic");
            // Contiguous, and pages sorted and unique.
            for w in txns.windows(2) {
                assert_eq!(w[0].end_offset, w[1].start_offset);
            }
            for t in &txns {
                assert!(t.pages.windows(2).all(|w| w[0].pgno < w[1].pgno));
                assert!(t.pages.iter().all(|p| p.pgno <= t.db_size));
            }
            // A second poll finds nothing new.
            assert!(tracker.poll(&wal).unwrap().is_empty());

            let mut image = base.clone();
            replay(&mut image, &wal, &txns);
            let truth = checkpointed(&conn, &path);
            assert_eq!(image.len(), truth.len(), "page size {ps}");
            assert!(image == truth, "replayed image differs, page size {ps}");
        }
    }

    #[test]
    fn encode_roundtrips_real_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (conn, _) = open_wal_db(&path, 1024);
        workload(&conn, 10);
        let wal = std::fs::read(wal_path(&path)).unwrap();
        let h = WalHeader::parse(&wal).unwrap();
        assert_eq!(h.encode(), wal[..32]);
        assert_eq!(
            WalHeader::new(false, h.page_size, h.checkpoint_seq, h.salt1, h.salt2),
            h
        );
        let mut prev = h.checksum;
        let fs = h.frame_size() as usize;
        let mut off = 32;
        while off + fs <= wal.len() {
            let f = FrameHeader::parse(&wal[off..]).unwrap();
            let page = &wal[off + 24..off + fs];
            let Some(next) = f.verify(&h, prev, page) else {
                break;
            };
            let rebuilt = FrameHeader::new(&h, prev, f.pgno, f.commit_size, page);
            assert_eq!(rebuilt.encode(), wal[off..off + 24]);
            prev = next;
            off += fs;
        }
        assert!(off > 32 + 5 * fs);
    }

    /// Rewrites a WAL with the other checksum byte order, recomputing the whole chain.
    fn swap_byte_order(wal: &[u8]) -> Vec<u8> {
        let h = WalHeader::parse(wal).unwrap();
        let h2 = WalHeader::new(
            !h.big_endian_checksum,
            h.page_size,
            h.checkpoint_seq,
            h.salt1,
            h.salt2,
        );
        let mut out = h2.encode().to_vec();
        let fs = h.frame_size() as usize;
        let (mut prev, mut prev2) = (h.checksum, h2.checksum);
        let mut off = 32;
        while off + fs <= wal.len() {
            let f = FrameHeader::parse(&wal[off..]).unwrap();
            let page = &wal[off + 24..off + fs];
            let Some(next) = f.verify(&h, prev, page) else {
                break;
            };
            let f2 = FrameHeader::new(&h2, prev2, f.pgno, f.commit_size, page);
            out.extend_from_slice(&f2.encode());
            out.extend_from_slice(page);
            prev = next;
            prev2 = f2.checksum;
            off += fs;
        }
        out
    }

    #[test]
    fn big_endian_checksums_are_read_by_sqlite_and_by_us() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (conn, base) = open_wal_db(&path, 4096);
        workload(&conn, 30);
        let wal = std::fs::read(wal_path(&path)).unwrap();
        let be = swap_byte_order(&wal);
        assert_eq!(
            u32::from_be_bytes(be[..4].try_into().unwrap()),
            WAL_MAGIC_BE
        );

        let le_txns = commits(&WalTracker::new().poll(&wal).unwrap());
        let be_txns = commits(&WalTracker::new().poll(&be).unwrap());
        assert_eq!(le_txns.len(), be_txns.len());
        for (a, b) in le_txns.iter().zip(&be_txns) {
            assert_eq!(a.end_offset, b.end_offset);
            assert_eq!(a.db_size, b.db_size);
            let pa: Vec<_> = a.pages.iter().map(|p| (p.pgno, p.data_offset)).collect();
            let pb: Vec<_> = b.pages.iter().map(|p| (p.pgno, p.data_offset)).collect();
            assert_eq!(pa, pb);
        }
        let mut image = base.clone();
        replay(&mut image, &be, &be_txns);

        // SQLite itself recovers the big-endian WAL: open a copy of base + BE WAL.
        let dir2 = tempfile::tempdir().unwrap();
        let p2 = dir2.path().join("db");
        std::fs::write(&p2, &base).unwrap();
        std::fs::write(wal_path(&p2), &be).unwrap();
        let c2 = Connection::open(&p2).unwrap();
        let n2: i64 = c2
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, n2);
        let truth2 = checkpointed(&c2, &p2);
        let truth = checkpointed(&conn, &path);
        assert!(truth2 == truth);
        assert!(image == truth);
    }

    #[test]
    fn uncommitted_tail_is_never_yielded_and_is_reread_after_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (conn, base) = open_wal_db(&path, 4096);
        workload(&conn, 8);
        let mut tracker = WalTracker::new();
        let before = commits(
            &tracker
                .poll(&std::fs::read(wal_path(&path)).unwrap())
                .unwrap(),
        );
        let committed_end = tracker.position().unwrap().committed_end;

        // An open transaction that spills, then rewrites pages it already spilled (SQLite
        // overwrites those frames in place and recomputes checksums at commit).
        conn.execute_batch(
            "PRAGMA cache_size=10; BEGIN;
             WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<300)
             INSERT INTO t(v) SELECT randomblob(1500) FROM c;
             UPDATE t SET v = randomblob(1400) WHERE id % 7 = 0;",
        )
        .unwrap();
        let mid = std::fs::read(wal_path(&path)).unwrap();
        assert!(
            mid.len() as u64 > committed_end + 10 * 4120,
            "the transaction spilled"
        );
        assert!(tracker.poll(&mid).unwrap().is_empty());
        assert!(tracker.uncommitted_frames() > 0);
        assert_eq!(tracker.position().unwrap().committed_end, committed_end);
        // A fresh tracker on the mid-transaction copy sees only the earlier commits too.
        assert_eq!(commits(&WalTracker::new().poll(&mid).unwrap()), before);

        conn.execute_batch("COMMIT; PRAGMA cache_size=-2000;")
            .unwrap();
        let wal = std::fs::read(wal_path(&path)).unwrap();
        let after = commits(&tracker.poll(&wal).unwrap());
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].start_offset, committed_end);
        assert_eq!(tracker.uncommitted_frames(), 0);

        let mut image = base;
        replay(&mut image, &wal, &before);
        replay(&mut image, &wal, &after);
        assert!(image == checkpointed(&conn, &path));
    }

    /// A poll through a [`FrameReader`] leaves the bytes it validated there: each committed
    /// page is exactly what `read_frame_page` reads, frames of an open transaction are not
    /// offered, nor are frames of another log or beyond what the buffer retains.
    #[test]
    fn frames_a_poll_validated_are_offered_as_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (conn, _) = open_wal_db(&path, 4096);
        workload(&conn, 12);
        conn.execute_batch(
            "PRAGMA cache_size=10; BEGIN;
             WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<100)
             INSERT INTO t(v) SELECT randomblob(1500) FROM c;",
        )
        .unwrap();
        let wal = std::fs::read(wal_path(&path)).unwrap();
        let mut frames = FrameReader::new();
        let mut tracker = WalTracker::new();
        let txns = commits(&tracker.poll_through(&wal[..], false, &mut frames).unwrap());
        assert!(txns.len() >= 12);
        let committed_end = tracker.position().unwrap().committed_end;
        let mut frame = vec![0u8; WAL_FRAME_HEADER_SIZE + 4096];
        let mut offered = 0;
        for t in &txns {
            for p in &t.pages {
                t.read_frame_page(&wal[..], p, &mut frame).unwrap();
                let got = frames.validated(&t.header, p.data_offset, 4096);
                assert_eq!(
                    got,
                    Some(&frame[WAL_FRAME_HEADER_SIZE..]),
                    "page {}",
                    p.pgno
                );
                offered += 1;
            }
        }
        assert!(offered > 20);
        let h = txns[0].header;
        // The open transaction's spilled frames were read, but are not committed.
        assert!(wal.len() as u64 > committed_end + 4 * h.frame_size());
        assert_eq!(frames.validated(&h, committed_end + 24, 4096), None);
        // Another log's header, even for an offset that was validated.
        let other = WalHeader::new(h.big_endian_checksum, 4096, 0, h.salt1 + 1, 9);
        let first = txns[0].pages[0].data_offset;
        assert_eq!(frames.validated(&other, first, 4096), None);
        // The next poll starts afresh: nothing new, nothing offered.
        assert!(tracker
            .poll_through(&wal[..], false, &mut frames)
            .unwrap()
            .is_empty());
        assert_eq!(frames.validated(&h, first, 4096), None);

        // A log longer than the buffer retains: the first frames are no longer offered,
        // the last ones are.
        conn.execute_batch("COMMIT; PRAGMA cache_size=-2000;")
            .unwrap();
        conn.execute_batch(
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<2000)
             INSERT INTO t(v) SELECT randomblob(3000) FROM c;",
        )
        .unwrap();
        let wal = std::fs::read(wal_path(&path)).unwrap();
        assert!(wal.len() > 2 * FrameReader::RETAIN);
        let mut tracker = WalTracker::new();
        let txns = commits(&tracker.poll_through(&wal[..], false, &mut frames).unwrap());
        let last = txns.last().unwrap();
        let newest = last.pages.iter().map(|p| p.data_offset).max().unwrap();
        assert!(frames.validated(&h, newest, 4096).is_some());
        assert_eq!(frames.validated(&h, first, 4096), None);
    }

    #[test]
    fn incremental_prefixes_yield_the_same_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (conn, _) = open_wal_db(&path, 512);
        workload(&conn, 25);
        let wal = std::fs::read(wal_path(&path)).unwrap();
        let all = commits(&WalTracker::new().poll(&wal).unwrap());
        let fs = 512 + 24;
        let mut tracker = WalTracker::new();
        let mut got = Vec::new();
        let mut len = 0usize;
        let mut step = 0usize;
        while len < wal.len() {
            // Cut at frame boundaries, inside frame headers and inside page data.
            step += 1;
            len = (len + [fs, 7, fs - 7, 100, 3 * fs][step % 5]).min(wal.len());
            let events = tracker.poll(&wal[..len]).unwrap();
            for e in &events {
                match e {
                    WalEvent::Commit(t) => {
                        assert!(t.end_offset <= len as u64);
                        got.push(t.clone());
                    }
                    WalEvent::Started { .. } => assert!(got.is_empty()),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(got, all);
    }

    #[test]
    fn truncated_commit_frame_hides_its_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (conn, _) = open_wal_db(&path, 4096);
        workload(&conn, 6);
        let wal = std::fs::read(wal_path(&path)).unwrap();
        let all = commits(&WalTracker::new().poll(&wal).unwrap());
        let last = all.last().unwrap();
        let cut = last.commit_frame_offset() as usize;
        for end in [cut, cut + 24, cut + 100, last.end_offset as usize - 1] {
            let got = commits(&WalTracker::new().poll(&wal[..end].to_vec()).unwrap());
            assert_eq!(got, all[..all.len() - 1]);
        }
        // A corrupted byte in the commit frame's page stops the log before it.
        let mut bad = wal.clone();
        bad[last.end_offset as usize - 10] ^= 0x55;
        let got = commits(&WalTracker::new().poll(&bad).unwrap());
        assert_eq!(got, all[..all.len() - 1]);
        // And read_page notices the change in a page it already validated.
        let p = last.pages.last().unwrap();
        let mut bad2 = wal.clone();
        bad2[p.data_offset as usize + 1] ^= 1;
        let mut buf = vec![0u8; 4096];
        assert!(matches!(
            last.read_page(&bad2, p, &mut buf),
            Err(WalError::FrameChanged { .. })
        ));
        assert!(matches!(
            last.read_page(&wal, p, &mut buf[..100]),
            Err(WalError::BufferSize { .. })
        ));
        last.read_page(&wal, p, &mut buf).unwrap();
    }

    fn checkpoint(conn: &Connection, mode: &str) {
        let busy: i64 = conn
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 0);
    }

    #[test]
    fn restarts_and_truncation_with_continuity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (conn, base) = open_wal_db(&path, 4096);
        let mut all_txns = Vec::new();

        // Generation 1: several transactions.
        workload(&conn, 10);
        let v1 = std::fs::read(wal_path(&path)).unwrap();
        let g1 = commits(&WalTracker::new().poll(&v1).unwrap());
        let h1 = g1[0].header;

        let mut full = WalTracker::new(); // reads everything
        let mut barrier = WalTracker::new(); // reads everything at barriers
        let mut lagging = WalTracker::new(); // missed the last commit of generation 1
        all_txns.extend(commits(&full.poll(&v1).unwrap()));
        barrier.poll_barrier(&v1).unwrap();
        let cut = g1.last().unwrap().start_offset as usize;
        assert_eq!(
            commits(&lagging.poll(&v1[..cut].to_vec()).unwrap()).len(),
            g1.len() - 1
        );

        // Restart: checkpoint everything, then one small transaction rewrites the header.
        checkpoint(&conn, "RESTART");
        conn.execute("INSERT INTO t(v) VALUES(x'01')", []).unwrap();
        let v2 = std::fs::read(wal_path(&path)).unwrap();
        let h2 = WalHeader::parse(&v2).unwrap();
        assert_eq!(h2.salt1, h1.salt1.wrapping_add(1));
        assert_ne!(h2.salt2, h1.salt2);
        assert!(
            v2.len() == v1.len(),
            "old frames stay on disk after a restart"
        );

        let ev = full.poll(&v2).unwrap();
        assert_eq!(
            ev[0],
            WalEvent::Restarted {
                old: h1,
                new: h2,
                continuity: Continuity::Complete
            }
        );
        let g2 = commits(&ev);
        assert_eq!(g2.len(), 1);
        assert_eq!(g2[0].start_offset, 32);
        all_txns.extend(g2);

        let ev = lagging.poll(&v2).unwrap();
        assert!(matches!(
            ev[0],
            WalEvent::Restarted {
                continuity: Continuity::Gap,
                ..
            }
        ));
        assert_eq!(commits(&ev).len(), 1);

        // Generation 2 grows past where generation 1 ended: a tracker that last saw
        // generation 1 cannot prove anything from the file any more.
        workload(&conn, 30);
        let v3 = std::fs::read(wal_path(&path)).unwrap();
        assert!(
            commits(&WalTracker::new().poll(&v3).unwrap())
                .last()
                .unwrap()
                .end_offset
                > v1.len() as u64
        );
        let ev = WalTracker::resume(WalPosition::after(g1.last().unwrap()))
            .poll(&v3)
            .unwrap();
        assert!(matches!(
            ev[0],
            WalEvent::Restarted {
                continuity: Continuity::Unknown,
                ..
            }
        ));
        let ev = barrier.poll(&v3).unwrap();
        assert!(matches!(
            ev[0],
            WalEvent::Restarted {
                continuity: Continuity::Drained,
                ..
            }
        ));
        all_txns.extend(commits(&full.poll(&v3).unwrap()));

        // TRUNCATE: the file goes to zero bytes, then a new header (salt-1 + 1) appears.
        full.poll_barrier(&v3).unwrap();
        checkpoint(&conn, "TRUNCATE");
        let v4 = std::fs::read(wal_path(&path)).unwrap();
        assert!(v4.is_empty());
        let ev = full.poll(&v4).unwrap();
        assert!(matches!(
            ev[..],
            [WalEvent::Truncated {
                continuity: Continuity::Drained,
                ..
            }]
        ));
        assert!(full.poll(&v4).unwrap().is_empty(), "reported once");
        workload(&conn, 3);
        let v5 = std::fs::read(wal_path(&path)).unwrap();
        let ev = full.poll(&v5).unwrap();
        assert!(matches!(
            ev[0],
            WalEvent::Restarted {
                continuity: Continuity::Complete,
                ..
            }
        ));
        all_txns.extend(commits(&ev));

        // Replaying every generation's transactions in order gives SQLite's database. The
        // pages of each generation must be read from that generation's file copy.
        let mut image = base;
        for (wal, range) in [(&v1, 0..g1.len()), (&v2, g1.len()..g1.len() + 1)] {
            replay(&mut image, wal, &all_txns[range]);
        }
        let n3 = all_txns.len() - g1.len() - 1 - commits(&ev).len();
        replay(&mut image, &v3, &all_txns[g1.len() + 1..g1.len() + 1 + n3]);
        replay(&mut image, &v5, &all_txns[g1.len() + 1 + n3..]);
        assert!(image == checkpointed(&conn, &path));

        // Pages of generation 1 can no longer be read from the restarted file.
        let t = &g1[0];
        let mut buf = vec![0u8; 4096];
        assert!(matches!(
            t.read_page(&v3, &t.pages[0], &mut buf),
            Err(WalError::FrameChanged { .. })
        ));
    }

    #[test]
    fn same_header_shrink_and_invalid_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (conn, _) = open_wal_db(&path, 4096);
        workload(&conn, 5);
        let wal = std::fs::read(wal_path(&path)).unwrap();
        let mut tr = WalTracker::new();
        let n = commits(&tr.poll(&wal).unwrap()).len();
        let end = tr.position().unwrap().committed_end as usize;

        let short = wal[..end - 4096].to_vec();
        assert!(matches!(
            tr.poll(&short).unwrap()[..],
            [WalEvent::Truncated {
                continuity: Continuity::Unknown,
                ..
            }]
        ));
        assert!(tr.poll(&short).unwrap().is_empty());
        // It grows back with the same content: nothing is yielded twice.
        assert!(tr.poll(&wal).unwrap().is_empty());

        let mut garbled = wal.clone();
        garbled[20] ^= 1; // salt-2: header checksum fails
        assert!(matches!(
            tr.poll(&garbled).unwrap()[..],
            [WalEvent::Invalidated { .. }]
        ));
        assert!(tr.header().is_none());
        // The same header comes back (a torn read): carry on without re-yielding.
        assert!(tr.poll(&wal).unwrap().is_empty());
        assert!(tr.header().is_some());
        assert!(n > 0);

        // An empty or missing header on a fresh tracker is simply nothing yet.
        assert!(WalTracker::new().poll(&Vec::new()).unwrap().is_empty());
        assert!(WalTracker::new().poll(&garbled).unwrap().is_empty());
    }

    #[test]
    fn io_errors_leave_the_tracker_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (conn, _) = open_wal_db(&path, 4096);
        workload(&conn, 5);
        let wal = std::fs::read(wal_path(&path)).unwrap();
        let fail_after = std::cell::Cell::new(3usize);
        let flaky = crate::sqlite::ReadAtFn(|off: u64, buf: &mut [u8]| {
            if fail_after.get() == 0 {
                return Err(io::Error::other("boom"));
            }
            fail_after.set(fail_after.get() - 1);
            wal.read_at(off, buf)
        });
        let mut tr = WalTracker::new();
        assert!(matches!(tr.poll(&flaky), Err(WalError::Io(_))));
        assert_eq!(tr.position(), None);
        let all = commits(&tr.poll(&wal).unwrap());
        assert_eq!(
            all.len(),
            commits(&WalTracker::new().poll(&wal).unwrap()).len()
        );
    }

    #[test]
    fn header_parse_errors() {
        let h = WalHeader::new(false, 4096, 0, 1, 2);
        let b = h.encode();
        assert_eq!(WalHeader::parse(&b).unwrap(), h);
        assert!(matches!(
            WalHeader::parse(&b[..31]),
            Err(WalError::TooShort { len: 31, need: 32 })
        ));
        let mut m = b;
        m[3] = 0x84;
        assert!(matches!(
            WalHeader::parse(&m),
            Err(WalError::BadMagic(0x377f0684))
        ));
        let mut p = b;
        p[8..12].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(
            WalHeader::parse(&p),
            Err(WalError::BadPageSize(1000))
        ));
        let mut c = b;
        c[13] ^= 1;
        assert!(matches!(
            WalHeader::parse(&c),
            Err(WalError::BadHeaderChecksum)
        ));
        let v = WalHeader {
            version: 3007001,
            ..h
        };
        let mut vb = v.encode();
        let ck = wal_checksum(false, &vb[..24], [0, 0]);
        vb[24..28].copy_from_slice(&ck[0].to_be_bytes());
        vb[28..32].copy_from_slice(&ck[1].to_be_bytes());
        assert!(matches!(
            WalHeader::parse(&vb),
            Err(WalError::UnsupportedVersion(3007001))
        ));
        assert_eq!(h.frame_offset(1), 32);
        assert_eq!(h.frame_offset(3), 32 + 2 * 4120);
    }

    #[test]
    fn random_and_corrupt_input_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (conn, _) = open_wal_db(&path, 512);
        workload(&conn, 15);
        let wal = std::fs::read(wal_path(&path)).unwrap();
        let good = commits(&WalTracker::new().poll(&wal).unwrap());
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for round in 0..400 {
            let mut bytes = match round % 4 {
                0 => (0..rng.below(5000)).map(|_| rng.next() as u8).collect(),
                1 => {
                    // A valid header followed by random frames.
                    let h = WalHeader::new(rng.next() & 1 == 1, 512, 0, 7, 9);
                    let mut b = h.encode().to_vec();
                    b.extend((0..rng.below(4000)).map(|_| rng.next() as u8));
                    b
                }
                _ => wal.clone(),
            };
            // Flip, truncate or zero some bytes.
            for _ in 0..rng.below(8) {
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
            let mut tr = WalTracker::new();
            for _ in 0..2 {
                let events = tr.poll(&bytes).unwrap();
                for t in commits(&events) {
                    // Whatever is yielded re-verifies against the same bytes, and is a
                    // prefix of the good log when it came from it.
                    let mut buf = vec![0u8; t.header.page_size as usize];
                    for p in &t.pages {
                        t.read_page(&bytes, p, &mut buf).unwrap();
                    }
                }
            }
            let got = commits(&WalTracker::new().poll(&bytes).unwrap());
            if round % 4 >= 2 && !got.is_empty() && got[0].header == good[0].header {
                for (a, b) in got.iter().zip(&good) {
                    assert_eq!(a.end_offset, b.end_offset);
                }
            }
            // Raw parsers on arbitrary slices.
            let _ = WalHeader::parse(&bytes);
            let _ = FrameHeader::parse(&bytes);
        }
    }
}

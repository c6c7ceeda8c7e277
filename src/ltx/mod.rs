//! The LTX file format, beside [`crate::sqlite`]: this module owns LTX's layout, its
//! checksums and its object names. It opens no files: it reads and writes through the
//! caller's `Read` and `Write`. SQLite's facts (valid page sizes, the lock page) are
//! `sqlite`'s, used here.
//!
//! - `header.rs`: the header, the trailer, the page index entry, the page order of snapshots;
//! - `checksum.rs`: CRC-64/GO-ISO ([`Crc64`]) and the [`DatabaseChecksum`];
//! - `encode.rs` and `decode.rs`: the streaming [`LtxEncoder`] and [`LtxDecoder`];
//! - `name.rs`: object names (`%016x-%016x.ltx`); `error.rs`: [`LtxError`].
//!
//! LTX version 3: the file format of Litestream 0.5 replicas (github.com/superfly/ltx,
//! whose README is the specification; written here from it, not ported).
//!
//! An LTX file holds the pages that one or more transactions changed:
//!
//! 1. A 100-byte header (all integers big-endian): magic `LTX1`, flags, page size, commit
//!    (database size in pages after the file is applied), minimum and maximum TXID,
//!    timestamp (milliseconds since the Unix epoch), pre-apply database checksum, WAL offset,
//!    WAL size, WAL salts, node ID, and 20 reserved zero bytes.
//! 2. The page block, in ascending page order. Each frame is a 6-byte page header (page
//!    number `u32`, flags `u16`; this encoder always sets [`PAGE_FLAG_SIZE`]), a 4-byte
//!    compressed size, and the page compressed as one LZ4 *block*. Older writers (ltx 0.5.0
//!    and 0.5.1, used by Litestream 0.5.0 to 0.5.15) set no page flags and stored an LZ4
//!    *frame* without a size prefix; the decoder reads both. A page header of six zero bytes
//!    ends the block.
//! 3. The page index: for each page, three unsigned LEB128 varints (page number, absolute
//!    offset of its frame, frame size including header and size prefix), a zero varint, then
//!    the byte size of those varints as a big-endian `u64`.
//! 4. A 16-byte trailer: the post-apply database checksum, then the file checksum.
//!
//! Checksums are CRC-64 with the ISO polynomial as Go's `hash/crc64` computes it
//! (CRC-64/GO-ISO: reflected, initial value and final XOR all ones), and every stored
//! checksum has bit 63 ([`CHECKSUM_FLAG`]) set so that it is never zero. The file checksum
//! covers the header, each page header and size prefix, the *decompressed* page data, the
//! end-of-block header, the page index and the post-apply checksum. The database checksum
//! (see [`DatabaseChecksum`]) is the XOR over pages of CRC(page number ‖ page data), flag set,
//! skipping the lock page. A file whose minimum TXID is 1 is a snapshot: it holds every
//! page from 1 to commit except the lock page, and its pre-apply checksum is zero. With
//! [`HEADER_FLAG_NO_CHECKSUM`] set, both database checksums are zero; Litestream 0.5 writes
//! every file that way and its restore requires it (see `tests/ltx_interop.rs`).
//!
//! LTX files carry no version field: versions 2 and 3 share the magic. This module reads
//! and writes version 3 only.

mod checksum;
mod decode;
mod encode;
mod error;
mod header;
mod name;
#[cfg(test)]
mod tests;

pub use checksum::{crc64, Crc64, DatabaseChecksum};
pub use decode::{decode, LtxDecoder, LtxFile, LtxPage, LtxPages};
pub use encode::LtxEncoder;
pub use error::LtxError;
pub use header::{LtxHeader, LtxTrailer, PageIndexEntry};
pub use name::{ltx_object_name, parse_ltx_object_name};

/// The first four bytes of every LTX file.
pub const MAGIC: &[u8; 4] = b"LTX1";
/// The format version this module reads and writes (not stored in the file).
pub const VERSION: u32 = 3;
/// Size of the file header.
pub const HEADER_SIZE: usize = 100;
/// Size of a page header (page number and flags).
pub const PAGE_HEADER_SIZE: usize = 6;
/// Size of the compressed-size prefix that follows a page header with [`PAGE_FLAG_SIZE`].
pub const PAGE_SIZE_PREFIX_SIZE: usize = 4;
/// Size of the trailer (post-apply checksum and file checksum).
pub const TRAILER_SIZE: usize = 16;
/// Header flag: the file tracks no database checksums (both are zero).
pub const HEADER_FLAG_NO_CHECKSUM: u32 = 1 << 1;
/// Page-header flag: a 4-byte compressed size follows and the data is an LZ4 block.
pub const PAGE_FLAG_SIZE: u16 = 1 << 0;
/// Bit 63, set in every stored checksum so that a real checksum is never zero.
pub const CHECKSUM_FLAG: u64 = 1 << 63;

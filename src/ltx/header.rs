//! The LTX header and trailer, the page index entry, and the page order of snapshots.

use super::{CHECKSUM_FLAG, HEADER_FLAG_NO_CHECKSUM, HEADER_SIZE, MAGIC, TRAILER_SIZE};
use crate::sqlite::{be32, be64, lock_byte_page, page_size_is_valid};

/// The header of an LTX file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LtxHeader {
    /// Header flags; only [`HEADER_FLAG_NO_CHECKSUM`] is defined.
    pub flags: u32,
    /// Database page size in bytes.
    pub page_size: u32,
    /// Database size in pages after the file is applied.
    pub commit: u32,
    /// First transaction ID the file covers (1 for a snapshot).
    pub min_txid: u64,
    /// Last transaction ID the file covers.
    pub max_txid: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Database checksum before the file is applied; zero for snapshots and without checksums.
    pub pre_apply_checksum: u64,
    /// Offset in the source WAL of the frames copied; zero if not from a WAL.
    pub wal_offset: i64,
    /// Size of the WAL segment copied; zero if not from a WAL.
    pub wal_size: i64,
    /// WAL header salt 1; zero if not from a WAL or after compaction.
    pub wal_salt1: u32,
    /// WAL header salt 2; zero if not from a WAL or after compaction.
    pub wal_salt2: u32,
    /// ID of the node that wrote the file; zero if unset.
    pub node_id: u64,
}

impl LtxHeader {
    /// A snapshot header (TXIDs `1..=max_txid`, checksums tracked).
    pub fn snapshot(page_size: u32, commit: u32, max_txid: u64, timestamp_ms: i64) -> Self {
        LtxHeader {
            page_size,
            commit,
            min_txid: 1,
            max_txid,
            timestamp_ms,
            ..LtxHeader::default()
        }
    }

    /// An incremental header (TXIDs `min_txid..=max_txid`, checksums tracked).
    pub fn incremental(
        page_size: u32,
        commit: u32,
        min_txid: u64,
        max_txid: u64,
        timestamp_ms: i64,
        pre_apply_checksum: u64,
    ) -> Self {
        LtxHeader {
            page_size,
            commit,
            min_txid,
            max_txid,
            timestamp_ms,
            pre_apply_checksum,
            ..LtxHeader::default()
        }
    }

    /// This header with database checksum tracking turned off, as Litestream 0.5 writes
    /// every file: sets [`HEADER_FLAG_NO_CHECKSUM`] and zeroes the pre-apply checksum.
    pub fn without_checksums(mut self) -> Self {
        self.flags |= HEADER_FLAG_NO_CHECKSUM;
        self.pre_apply_checksum = 0;
        self
    }

    /// Whether the file is a snapshot (minimum TXID 1): it holds every page.
    pub fn is_snapshot(&self) -> bool {
        self.min_txid == 1
    }

    /// Whether the file tracks database checksums ([`HEADER_FLAG_NO_CHECKSUM`] is clear).
    pub fn has_checksums(&self) -> bool {
        self.flags & HEADER_FLAG_NO_CHECKSUM == 0
    }

    /// The lock page for this header's page size.
    pub fn lock_pgno(&self) -> u32 {
        lock_byte_page(self.page_size)
    }

    /// Checks the header against the format's rules; the error says which rule it breaks.
    pub fn validate(&self) -> Result<(), String> {
        if self.flags & !HEADER_FLAG_NO_CHECKSUM != 0 {
            return Err(format!("unknown header flags 0x{:08x}", self.flags));
        }
        if !page_size_is_valid(self.page_size) {
            return Err(format!("invalid page size {}", self.page_size));
        }
        if self.min_txid == 0 {
            return Err("minimum TXID is zero".into());
        }
        if self.max_txid == 0 {
            return Err("maximum TXID is zero".into());
        }
        if self.min_txid > self.max_txid {
            return Err(format!(
                "minimum TXID {} is above maximum TXID {}",
                self.min_txid, self.max_txid
            ));
        }
        if self.wal_offset < 0 {
            return Err(format!("negative WAL offset {}", self.wal_offset));
        }
        if self.wal_size < 0 {
            return Err(format!("negative WAL size {}", self.wal_size));
        }
        if (self.wal_salt1 != 0 || self.wal_salt2 != 0) && self.wal_offset == 0 {
            return Err("WAL salts are set but the WAL offset is zero".into());
        }
        if self.wal_offset == 0 && self.wal_size != 0 {
            return Err("WAL size is set but the WAL offset is zero".into());
        }
        if self.is_snapshot() {
            if self.pre_apply_checksum != 0 {
                return Err("a snapshot's pre-apply checksum must be zero".into());
            }
        } else if !self.has_checksums() {
            if self.pre_apply_checksum != 0 {
                return Err("pre-apply checksum is set but checksums are off".into());
            }
        } else if self.pre_apply_checksum == 0 {
            return Err("pre-apply checksum is missing on a non-snapshot file".into());
        } else if self.pre_apply_checksum & CHECKSUM_FLAG == 0 {
            return Err(format!(
                "pre-apply checksum {:016x} lacks the flag bit",
                self.pre_apply_checksum
            ));
        }
        Ok(())
    }

    /// The header's 100 bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..12].copy_from_slice(&self.page_size.to_be_bytes());
        b[12..16].copy_from_slice(&self.commit.to_be_bytes());
        b[16..24].copy_from_slice(&self.min_txid.to_be_bytes());
        b[24..32].copy_from_slice(&self.max_txid.to_be_bytes());
        b[32..40].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        b[40..48].copy_from_slice(&self.pre_apply_checksum.to_be_bytes());
        b[48..56].copy_from_slice(&self.wal_offset.to_be_bytes());
        b[56..64].copy_from_slice(&self.wal_size.to_be_bytes());
        b[64..68].copy_from_slice(&self.wal_salt1.to_be_bytes());
        b[68..72].copy_from_slice(&self.wal_salt2.to_be_bytes());
        b[72..80].copy_from_slice(&self.node_id.to_be_bytes());
        b
    }

    /// Parses 100 header bytes. Checks only the magic; call [`LtxHeader::validate`] too.
    /// The 20 reserved bytes are ignored (the file checksum covers them).
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Result<Self, String> {
        if &b[0..4] != MAGIC {
            return Err(format!("bad magic {:02x?}, expected \"LTX1\"", &b[0..4]));
        }
        let u32_at = |i: usize| be32(b, i);
        let u64_at = |i: usize| be64(b, i);
        Ok(LtxHeader {
            flags: u32_at(4),
            page_size: u32_at(8),
            commit: u32_at(12),
            min_txid: u64_at(16),
            max_txid: u64_at(24),
            timestamp_ms: u64_at(32) as i64,
            pre_apply_checksum: u64_at(40),
            wal_offset: u64_at(48) as i64,
            wal_size: u64_at(56) as i64,
            wal_salt1: u32_at(64),
            wal_salt2: u32_at(68),
            node_id: u64_at(72),
        })
    }
}

/// The trailer of an LTX file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LtxTrailer {
    /// Database checksum after the file is applied; zero without checksums.
    pub post_apply_checksum: u64,
    /// CRC-64 of the file's logical content, with [`CHECKSUM_FLAG`] set.
    pub file_checksum: u64,
}

impl LtxTrailer {
    /// The trailer's 16 bytes.
    pub fn to_bytes(&self) -> [u8; TRAILER_SIZE] {
        let mut b = [0u8; TRAILER_SIZE];
        b[0..8].copy_from_slice(&self.post_apply_checksum.to_be_bytes());
        b[8..16].copy_from_slice(&self.file_checksum.to_be_bytes());
        b
    }

    /// Parses 16 trailer bytes.
    pub fn from_bytes(b: &[u8; TRAILER_SIZE]) -> Self {
        LtxTrailer {
            post_apply_checksum: be64(b, 0),
            file_checksum: be64(b, 8),
        }
    }
}

/// Checks a post-apply checksum against the header's checksum mode.
pub(super) fn check_post_apply(header: &LtxHeader, post_apply_checksum: u64) -> Result<(), String> {
    if !header.has_checksums() {
        if post_apply_checksum != 0 {
            return Err(format!(
                "post-apply checksum {post_apply_checksum:016x} is set but checksums are off"
            ));
        }
    } else if post_apply_checksum == 0 {
        return Err("post-apply checksum is missing".into());
    } else if post_apply_checksum & CHECKSUM_FLAG == 0 {
        return Err(format!(
            "post-apply checksum {post_apply_checksum:016x} lacks the flag bit"
        ));
    }
    Ok(())
}

/// One entry of the page index: where a page's frame lies in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageIndexEntry {
    /// Page number.
    pub pgno: u32,
    /// Offset of the frame (its page header) from the start of the file.
    pub offset: u64,
    /// Size of the frame: page header, size prefix and compressed data.
    pub size: u64,
}

/// The page that a snapshot must hold after `prev` (0 before the first page).
pub(super) fn next_snapshot_pgno(prev: u32, lock: u32) -> u32 {
    let next = prev + 1;
    if next == lock {
        next + 1
    } else {
        next
    }
}

/// The last page that a snapshot of `commit` pages holds (0 if it holds none). A `lock` of
/// 0 (an invalid page size's) is no page.
pub(super) fn last_snapshot_pgno(commit: u32, lock: u32) -> u32 {
    if commit == lock && lock != 0 {
        commit - 1
    } else {
        commit
    }
}

pub(super) fn push_uvarint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::{DatabaseChecksum, LtxDecoder, LtxEncoder};

    #[test]
    fn header_layout_matches_the_spec() {
        let h = LtxHeader {
            flags: HEADER_FLAG_NO_CHECKSUM,
            page_size: 4096,
            commit: 0x0102_0304,
            min_txid: 0x1111_1111_1111_1111,
            max_txid: 0x2222_2222_2222_2222,
            timestamp_ms: 0x3333_3333_3333_3333,
            pre_apply_checksum: 0,
            wal_offset: 0x4444_4444_4444_4444,
            wal_size: 0x5555_5555_5555_5555,
            wal_salt1: 0x6666_6666,
            wal_salt2: 0x7777_7777,
            node_id: 0x8888_8888_8888_8888,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..4], b"LTX1");
        assert_eq!(b[4..8], [0, 0, 0, 2]);
        assert_eq!(b[8..12], [0, 0, 0x10, 0]);
        assert_eq!(b[12..16], [1, 2, 3, 4]);
        assert_eq!(b[16..24], [0x11; 8]);
        assert_eq!(b[24..32], [0x22; 8]);
        assert_eq!(b[32..40], [0x33; 8]);
        assert_eq!(b[40..48], [0; 8]);
        assert_eq!(b[48..56], [0x44; 8]);
        assert_eq!(b[56..64], [0x55; 8]);
        assert_eq!(b[64..68], [0x66; 4]);
        assert_eq!(b[68..72], [0x77; 4]);
        assert_eq!(b[72..80], [0x88; 8]);
        assert_eq!(b[80..100], [0; 20]);
        assert_eq!(LtxHeader::from_bytes(&b).unwrap(), h);
        let t = LtxTrailer {
            post_apply_checksum: 0x8000_0000_0000_0001,
            file_checksum: 0x8000_0000_0000_0002,
        };
        assert_eq!(LtxTrailer::from_bytes(&t.to_bytes()), t);
    }

    #[test]
    fn header_rules() {
        let ok = LtxHeader::snapshot(4096, 1, 1, 0);
        assert!(ok.validate().is_ok());
        let bad = [
            LtxHeader { flags: 1, ..ok },
            LtxHeader {
                page_size: 1000,
                ..ok
            },
            LtxHeader {
                page_size: 256,
                ..ok
            },
            LtxHeader {
                page_size: 131072,
                ..ok
            },
            LtxHeader { max_txid: 0, ..ok },
            LtxHeader { min_txid: 0, ..ok },
            LtxHeader {
                min_txid: 3,
                max_txid: 2,
                pre_apply_checksum: CHECKSUM_FLAG,
                ..ok
            },
            LtxHeader {
                pre_apply_checksum: CHECKSUM_FLAG,
                ..ok
            },
            LtxHeader { wal_salt1: 1, ..ok },
            LtxHeader { wal_size: 1, ..ok },
            LtxHeader {
                wal_offset: -1,
                ..ok
            },
            LtxHeader::incremental(4096, 1, 2, 2, 0, 0),
            LtxHeader::incremental(4096, 1, 2, 2, 0, 5),
            LtxHeader {
                pre_apply_checksum: CHECKSUM_FLAG,
                ..LtxHeader::incremental(4096, 1, 2, 2, 0, 0).without_checksums()
            },
        ];
        for h in bad {
            assert!(h.validate().is_err(), "{h:?} should be invalid");
            let mut b = h.to_bytes();
            assert!(LtxEncoder::new(Vec::new(), h).is_err());
            // The decoder rejects it at byte 0, naming the header.
            b[0..4].copy_from_slice(MAGIC);
            let err = LtxDecoder::new(&b[..]).err().unwrap();
            assert!(err.to_string().contains("invalid header"), "{err}");
        }
        assert!(LtxHeader::incremental(4096, 1, 2, 2, 0, CHECKSUM_FLAG | 7)
            .validate()
            .is_ok());
        assert!(LtxHeader::incremental(4096, 1, 2, 9, 0, 0)
            .without_checksums()
            .validate()
            .is_ok());
        let mut b = ok.to_bytes();
        b[3] = b'2';
        let err = LtxDecoder::new(&b[..]).err().unwrap();
        assert!(err.to_string().contains("bad magic"), "{err}");
    }

    #[test]
    fn lock_page_numbers() {
        assert_eq!(lock_byte_page(512), 2_097_153);
        assert_eq!(lock_byte_page(4096), 262_145);
        assert_eq!(lock_byte_page(65536), 16_385);
        // Snapshot sequencing skips it.
        assert_eq!(next_snapshot_pgno(0, 5), 1);
        assert_eq!(next_snapshot_pgno(4, 5), 6);
        assert_eq!(next_snapshot_pgno(6, 5), 7);
        assert_eq!(last_snapshot_pgno(5, 5), 4);
        assert_eq!(last_snapshot_pgno(6, 5), 6);
        assert_eq!(last_snapshot_pgno(0, 5), 0);
    }

    /// Page size 0 is never valid (the rule is `crate::sqlite`'s), and its lock page is 0,
    /// no page: nothing that skips the lock page panics or skips a real page.
    #[test]
    fn page_size_zero_is_invalid_and_has_no_lock_page() {
        let h = LtxHeader {
            page_size: 0,
            ..LtxHeader::snapshot(4096, 1, 1, 0)
        };
        assert_eq!(h.validate(), Err("invalid page size 0".to_string()));
        assert!(LtxDecoder::new(&h.to_bytes()[..]).is_err());
        assert!(LtxEncoder::new(Vec::new(), h).is_err());
        assert_eq!(h.lock_pgno(), 0);
        assert_eq!(next_snapshot_pgno(0, 0), 1);
        assert_eq!(last_snapshot_pgno(0, 0), 0);
        assert_eq!(last_snapshot_pgno(3, 0), 3);
        // An empty page is not taken for the lock page: it counts.
        let mut sum = DatabaseChecksum::EMPTY;
        sum.add_page(1, &[]);
        assert_ne!(sum, DatabaseChecksum::EMPTY);
        assert!(DatabaseChecksum::of_database(&[], 0).is_err());
        assert!(DatabaseChecksum::from_reader(&[][..], 0).is_err());
    }
}

//! The LTX encoder.

use std::io::Write;

use super::header::{check_post_apply, last_snapshot_pgno, next_snapshot_pgno, push_uvarint};
use super::{
    Crc64, DatabaseChecksum, LtxError, LtxHeader, LtxTrailer, PageIndexEntry, CHECKSUM_FLAG,
    HEADER_SIZE, PAGE_FLAG_SIZE, PAGE_HEADER_SIZE, PAGE_SIZE_PREFIX_SIZE,
};

/// Writes one LTX file, page by page.
///
/// Pages go in ascending page-number order; a snapshot must add every page from 1 to the
/// commit size except the lock page. [`LtxEncoder::finish`] writes the page index and the
/// trailer. Each page is written with one `write_all` call.
pub struct LtxEncoder<W: Write> {
    writer: W,
    header: LtxHeader,
    hash: Crc64,
    offset: u64,
    prev_pgno: u32,
    index: Vec<PageIndexEntry>,
    frame: Vec<u8>,
    snapshot_checksum: DatabaseChecksum,
    trailer: Option<LtxTrailer>,
    poisoned: bool,
}

impl<W: Write> LtxEncoder<W> {
    /// Checks `header` and writes it.
    pub fn new(mut writer: W, header: LtxHeader) -> Result<Self, LtxError> {
        header
            .validate()
            .map_err(|m| LtxError::Usage(format!("invalid header: {m}")))?;
        let bytes = header.to_bytes();
        writer.write_all(&bytes)?;
        let mut hash = Crc64::new();
        hash.update(&bytes);
        Ok(LtxEncoder {
            writer,
            header,
            hash,
            offset: HEADER_SIZE as u64,
            prev_pgno: 0,
            index: Vec::new(),
            frame: Vec::new(),
            snapshot_checksum: DatabaseChecksum::EMPTY,
            trailer: None,
            poisoned: false,
        })
    }

    /// The header being written.
    pub fn header(&self) -> &LtxHeader {
        &self.header
    }

    /// Pages added so far.
    pub fn page_count(&self) -> usize {
        self.index.len()
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Where each page added so far lies in the file.
    pub fn index(&self) -> &[PageIndexEntry] {
        &self.index
    }

    fn check_usable(&self) -> Result<(), LtxError> {
        if self.poisoned {
            Err(LtxError::Usage(
                "the encoder failed earlier; its output is incomplete".into(),
            ))
        } else if self.trailer.is_some() {
            Err(LtxError::Usage("the encoder is already finished".into()))
        } else {
            Ok(())
        }
    }

    /// Refuses a page that cannot come next in this file.
    fn check_page(&self, pgno: u32, data: &[u8]) -> Result<(), LtxError> {
        self.check_usable()?;
        let h = &self.header;
        if data.len() != h.page_size as usize {
            return Err(LtxError::Usage(format!(
                "page {pgno} has {} bytes, the page size is {}",
                data.len(),
                h.page_size
            )));
        }
        if pgno == 0 {
            return Err(LtxError::Usage("page number 0 does not exist".into()));
        }
        if pgno > h.commit {
            return Err(LtxError::Usage(format!(
                "page {pgno} is beyond the commit size of {} pages",
                h.commit
            )));
        }
        let lock = h.lock_pgno();
        if pgno == lock {
            return Err(LtxError::Usage(format!(
                "page {pgno} is the lock page, which LTX files never hold"
            )));
        }
        if h.is_snapshot() {
            let expected = next_snapshot_pgno(self.prev_pgno, lock);
            if pgno != expected {
                return Err(LtxError::Usage(format!(
                    "a snapshot holds every page in order: expected page {expected}, got {pgno}"
                )));
            }
        } else if pgno <= self.prev_pgno {
            return Err(LtxError::Usage(format!(
                "pages must ascend: page {pgno} after page {}",
                self.prev_pgno
            )));
        }
        Ok(())
    }

    /// Compresses and writes page `pgno`, whose `data` is exactly one page.
    pub fn add_page(&mut self, pgno: u32, data: &[u8]) -> Result<(), LtxError> {
        self.check_page(pgno, data)?;
        let prefix = PAGE_HEADER_SIZE + PAGE_SIZE_PREFIX_SIZE;
        self.frame.clear();
        self.frame.resize(
            prefix + lz4_flex::block::get_maximum_output_size(data.len()),
            0,
        );
        let n = lz4_flex::block::compress_into(data, &mut self.frame[prefix..])
            .map_err(|e| LtxError::Usage(format!("LZ4 compression of page {pgno} failed: {e}")))?;
        self.frame.truncate(prefix + n);
        self.write_frame(pgno, data)
    }

    /// Writes page `pgno` as [`LtxEncoder::add_page`] does, but with `block`, the LZ4 block
    /// that another LTX file stores for this very `data` ([`LtxDecoder::last_block`]),
    /// instead of compressing it again: merges copy pages at the speed of a checksum.
    ///
    /// [`LtxDecoder::last_block`]: super::LtxDecoder::last_block
    pub fn add_page_with_block(
        &mut self,
        pgno: u32,
        data: &[u8],
        block: &[u8],
    ) -> Result<(), LtxError> {
        self.check_page(pgno, data)?;
        let prefix = PAGE_HEADER_SIZE + PAGE_SIZE_PREFIX_SIZE;
        self.frame.clear();
        self.frame.resize(prefix, 0);
        self.frame.extend_from_slice(block);
        self.write_frame(pgno, data)
    }

    /// Writes `self.frame` (its prefix still to fill, then the LZ4 block of `data`).
    fn write_frame(&mut self, pgno: u32, data: &[u8]) -> Result<(), LtxError> {
        let prefix = PAGE_HEADER_SIZE + PAGE_SIZE_PREFIX_SIZE;
        let n = self.frame.len() - prefix;
        self.frame[0..4].copy_from_slice(&pgno.to_be_bytes());
        self.frame[4..6].copy_from_slice(&PAGE_FLAG_SIZE.to_be_bytes());
        self.frame[6..10].copy_from_slice(&(n as u32).to_be_bytes());

        self.poisoned = true;
        self.writer.write_all(&self.frame)?;
        self.poisoned = false;
        self.hash.update(&self.frame[..prefix]);
        self.hash.update(data);
        if self.header.is_snapshot() && self.header.has_checksums() {
            self.snapshot_checksum.add_page(pgno, data);
        }
        self.index.push(PageIndexEntry {
            pgno,
            offset: self.offset,
            size: self.frame.len() as u64,
        });
        self.offset += self.frame.len() as u64;
        self.prev_pgno = pgno;
        Ok(())
    }

    /// For a snapshot whose header tracks checksums: the LTX database checksum of the pages
    /// added so far (what [`LtxEncoder::finish`] needs once every page is in).
    pub fn snapshot_checksum(&self) -> DatabaseChecksum {
        self.snapshot_checksum
    }

    /// Ends the page block, writes the page index and the trailer, and flushes the writer.
    ///
    /// `post_apply_checksum` is the database checksum after this file is applied
    /// ([`DatabaseChecksum::value`]), or zero if the header turned checksums off. For a
    /// snapshot it must match the pages written.
    pub fn finish(&mut self, post_apply_checksum: u64) -> Result<LtxTrailer, LtxError> {
        self.check_usable()?;
        let h = self.header;
        if h.is_snapshot() {
            let last = last_snapshot_pgno(h.commit, h.lock_pgno());
            if self.prev_pgno != last {
                return Err(LtxError::Usage(format!(
                    "the snapshot ends at page {} but the commit size needs pages up to {last}",
                    self.prev_pgno
                )));
            }
        }
        check_post_apply(&h, post_apply_checksum).map_err(LtxError::Usage)?;
        if h.has_checksums() {
            if h.commit == 0 && post_apply_checksum != DatabaseChecksum::EMPTY.value() {
                return Err(LtxError::Usage(
                    "an empty database's post-apply checksum must be DatabaseChecksum::EMPTY"
                        .into(),
                ));
            }
            if h.is_snapshot() && post_apply_checksum != self.snapshot_checksum.value() {
                return Err(LtxError::Usage(format!(
                    "post-apply checksum {post_apply_checksum:016x} does not match the snapshot's pages ({:016x})",
                    self.snapshot_checksum.value()
                )));
            }
        }

        let mut tail = vec![0u8; PAGE_HEADER_SIZE];
        let index_start = tail.len();
        for e in &self.index {
            push_uvarint(&mut tail, u64::from(e.pgno));
            push_uvarint(&mut tail, e.offset);
            push_uvarint(&mut tail, e.size);
        }
        push_uvarint(&mut tail, 0);
        let index_len = (tail.len() - index_start) as u64;
        tail.extend_from_slice(&index_len.to_be_bytes());
        tail.extend_from_slice(&post_apply_checksum.to_be_bytes());
        self.hash.update(&tail);
        let digest = std::mem::take(&mut self.hash);
        let trailer = LtxTrailer {
            post_apply_checksum,
            file_checksum: digest.finalize() | CHECKSUM_FLAG,
        };
        tail.extend_from_slice(&trailer.file_checksum.to_be_bytes());

        self.poisoned = true;
        self.writer.write_all(&tail)?;
        self.writer.flush()?;
        self.poisoned = false;
        self.offset += tail.len() as u64;
        self.trailer = Some(trailer);
        Ok(trailer)
    }

    /// The trailer, once [`LtxEncoder::finish`] has succeeded.
    pub fn trailer(&self) -> Option<LtxTrailer> {
        self.trailer
    }

    /// The writer.
    pub fn get_ref(&self) -> &W {
        &self.writer
    }

    /// Gives back the writer.
    pub fn into_inner(self) -> W {
        self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::decode;
    use crate::ltx::tests::db_checksum;
    use crate::sqlite::lock_byte_page;

    #[test]
    fn encoder_rules() {
        let ps = 512usize;
        let page = vec![7u8; ps];
        let snap = LtxHeader::snapshot(512, 3, 1, 0);
        let mut e = LtxEncoder::new(Vec::new(), snap).unwrap();
        assert!(e.add_page(2, &page).is_err(), "a snapshot starts at page 1");
        e.add_page(1, &page).unwrap();
        assert!(e.add_page(3, &page).is_err(), "a snapshot has no gaps");
        assert!(e.add_page(2, &page[1..]).is_err(), "short page");
        e.add_page(2, &page).unwrap();
        assert!(
            e.finish(CHECKSUM_FLAG | 1).is_err(),
            "snapshot missing page 3"
        );
        e.add_page(3, &page).unwrap();
        assert!(e.add_page(4, &page).is_err(), "beyond commit");
        let pages: Vec<(u32, Vec<u8>)> = (1..=3).map(|p| (p, page.clone())).collect();
        assert!(e.finish(0).is_err(), "post-apply checksum required");
        assert!(e.finish(1).is_err(), "post-apply checksum needs its flag");
        assert!(
            e.finish(CHECKSUM_FLAG | 1).is_err(),
            "wrong snapshot checksum"
        );
        e.finish(db_checksum(&pages)).unwrap();
        assert!(e.add_page(3, &page).is_err(), "finished");
        assert!(e.finish(db_checksum(&pages)).is_err(), "finished twice");

        let inc = LtxHeader::incremental(512, 10, 4, 4, 0, CHECKSUM_FLAG | 3);
        let mut e = LtxEncoder::new(Vec::new(), inc).unwrap();
        assert!(e.add_page(0, &page).is_err());
        e.add_page(5, &page).unwrap();
        assert!(e.add_page(5, &page).is_err(), "pages ascend");
        assert!(e.add_page(4, &page).is_err(), "pages ascend");
        e.add_page(9, &page).unwrap();
        assert!(e.finish(0).is_err());
        e.finish(CHECKSUM_FLAG | 12345).unwrap();

        // Without checksums the post-apply checksum must be zero.
        let mut e = LtxEncoder::new(Vec::new(), inc.without_checksums()).unwrap();
        e.add_page(1, &page).unwrap();
        assert!(e.finish(CHECKSUM_FLAG | 1).is_err());
        e.finish(0).unwrap();

        // The lock page is never encoded; an incremental file may straddle it.
        let ps = 65536usize;
        let lock = lock_byte_page(65536);
        let big = vec![1u8; ps];
        let h = LtxHeader::incremental(65536, lock + 5, 2, 2, 0, CHECKSUM_FLAG).without_checksums();
        let mut e = LtxEncoder::new(Vec::new(), h).unwrap();
        e.add_page(lock - 1, &big).unwrap();
        let err = e.add_page(lock, &big).unwrap_err();
        assert!(err.to_string().contains("lock page"), "{err}");
        e.add_page(lock + 1, &big).unwrap();
        e.finish(0).unwrap();
        let f = decode(&e.into_inner()[..]).unwrap();
        assert_eq!(
            f.pages.iter().map(|p| p.pgno).collect::<Vec<_>>(),
            vec![lock - 1, lock + 1]
        );
    }
}

//! Held pages: the newest content of every page that a segment's held batches changed,
//! kept in memory until the segment writes it as one record (see "Held pages" in
//! [`super::segment`]), and the process-wide budget for them.
//!
//! Consecutive batches of a busy database change the same pages again and again (an index
//! leaf, the table's last page): holding them merges those versions in memory, so staging
//! writes each page once per upload instead of once per batch. The budget bounds what a
//! mount holds however many databases it has; a batch that does not fit is written with its
//! pages, as if nothing were held.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::segment::BatchHeader;
use crate::sqlite::{ContentChecksum, PageHash};

/// The most one segment holds before it writes its held pages.
const HOLD_PER_SEGMENT: u64 = 64 * 1024 * 1024;
/// The most the whole process holds.
const HOLD_TOTAL: u64 = 256 * 1024 * 1024;

/// Bytes of page data held by every segment of the process.
static HELD_BYTES: AtomicU64 = AtomicU64::new(0);

/// The pages of one batch, gathered before its page list is written (or read back to be
/// held again, [`super::SegmentWriter::adopt_listed`]), in ascending page order.
#[derive(Debug, Default)]
pub struct HeldBatch {
    pages: Vec<(u32, PageHash)>,
    data: Vec<u8>,
}

impl HeldBatch {
    /// Empties the batch, keeping its allocation.
    pub fn clear(&mut self) {
        self.pages.clear();
        self.data.clear();
    }

    pub fn add(&mut self, pgno: u32, hash: PageHash, data: &[u8]) {
        self.pages.push((pgno, hash));
        self.data.extend_from_slice(data);
    }

    /// The bytes its page buffer holds allocated.
    pub fn capacity(&self) -> usize {
        self.data.capacity()
    }

    /// The batch's page numbers, in the order they were added.
    pub fn pgnos(&self) -> impl Iterator<Item = u32> + '_ {
        self.pages.iter().map(|p| p.0)
    }

    fn page(&self, i: usize) -> &[u8] {
        let ps = self.data.len() / self.pages.len();
        &self.data[i * ps..(i + 1) * ps]
    }
}

/// The merged pages of consecutive held batches, in one buffer of page slots.
#[derive(Debug)]
pub(crate) struct Held {
    min_txid: u64,
    /// The newest batch's header: its TXID, the database's size after it, its WAL position.
    last: BatchHeader,
    post_checksum: ContentChecksum,
    /// Each held page's hash and slot in `slots`.
    pages: BTreeMap<u32, (PageHash, usize)>,
    slots: Vec<u8>,
    /// Slots of pages a shrink dropped, to reuse.
    free: Vec<usize>,
    /// What `slots` counts in [`HELD_BYTES`].
    bytes: u64,
}

impl Held {
    /// Whether a batch of `bytes` may be held at all, with what the process holds.
    pub fn may_start(bytes: u64) -> bool {
        bytes <= HOLD_PER_SEGMENT && HELD_BYTES.load(Ordering::Relaxed) + bytes <= HOLD_TOTAL
    }

    /// Holds the first batch.
    pub fn start(header: &BatchHeader, post: ContentChecksum, batch: &HeldBatch) -> Held {
        let mut h = Held {
            min_txid: header.min_txid,
            last: *header,
            post_checksum: post,
            pages: BTreeMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            bytes: 0,
        };
        h.apply(header, post, batch);
        h
    }

    /// Holds pages read back for TXIDs `min_txid ..= last.max_txid` (after a restart).
    pub fn adopt(
        min_txid: u64,
        last: BatchHeader,
        post: ContentChecksum,
        pages: &HeldBatch,
    ) -> Held {
        let mut h = Held::start(&last, post, pages);
        h.min_txid = min_txid;
        h
    }

    /// Whether `header` is the batch right after the held ones, with the same page size.
    pub fn continues_with(&self, header: &BatchHeader) -> bool {
        header.page_size == self.last.page_size && header.min_txid == self.last.max_txid + 1
    }

    /// Whether `bytes` more may be held here (they may replace held pages; this counts them
    /// as new).
    pub fn can_take(&self, bytes: u64) -> bool {
        self.bytes + bytes <= HOLD_PER_SEGMENT
            && HELD_BYTES.load(Ordering::Relaxed) + bytes <= HOLD_TOTAL
    }

    /// Merges the next batch in: the database is resized to its size (pages past it go),
    /// then its pages replace the held versions.
    pub fn apply(&mut self, header: &BatchHeader, post: ContentChecksum, batch: &HeldBatch) {
        let ps = header.page_size as usize;
        for (_, (_, slot)) in self.pages.split_off(&header.commit.saturating_add(1)) {
            self.free.push(slot);
        }
        for (i, &(pgno, hash)) in batch.pages.iter().enumerate() {
            let slot = match self.pages.get(&pgno) {
                Some(&(_, slot)) => slot,
                None => match self.free.pop() {
                    Some(slot) => slot,
                    None => {
                        self.slots.resize(self.slots.len() + ps, 0);
                        self.slots.len() / ps - 1
                    }
                },
            };
            self.slots[slot * ps..(slot + 1) * ps].copy_from_slice(batch.page(i));
            self.pages.insert(pgno, (hash, slot));
        }
        self.last = *header;
        self.post_checksum = post;
        self.account();
    }

    fn account(&mut self) {
        let bytes = self.slots.len() as u64;
        if bytes >= self.bytes {
            HELD_BYTES.fetch_add(bytes - self.bytes, Ordering::Relaxed);
        } else {
            HELD_BYTES.fetch_sub(self.bytes - bytes, Ordering::Relaxed);
        }
        self.bytes = bytes;
    }

    /// The TXIDs held.
    pub fn txids(&self) -> (u64, u64) {
        (self.min_txid, self.last.max_txid)
    }

    /// The header of the one record that writes every held page.
    pub fn merged_header(&self) -> BatchHeader {
        BatchHeader {
            min_txid: self.min_txid,
            page_count: self.pages.len() as u32,
            ..self.last
        }
    }

    pub fn post_checksum(&self) -> ContentChecksum {
        self.post_checksum
    }

    /// The held pages in ascending order, with their hashes.
    pub fn pages(&self) -> impl Iterator<Item = (u32, PageHash, &[u8])> + '_ {
        let ps = self.last.page_size as usize;
        self.pages
            .iter()
            .map(move |(&p, &(h, slot))| (p, h, &self.slots[slot * ps..(slot + 1) * ps]))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

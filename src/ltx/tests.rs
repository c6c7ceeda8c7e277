//! Round trips through the encoder and decoder, and helpers shared by the module's tests.

use super::header::push_uvarint;
use super::*;
use crate::sqlite::{MAX_PAGE_SIZE, MIN_PAGE_SIZE};

/// A small deterministic generator (xorshift64*), so tests need no extra crates.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A page mixing compressible runs, text-like and random bytes.
    pub(super) fn page(&mut self, size: usize) -> Vec<u8> {
        let mut p = vec![0u8; size];
        match self.below(4) {
            0 => {}
            1 => p.iter_mut().for_each(|b| *b = self.next() as u8),
            _ => {
                let mut i = 0;
                while i < size {
                    let run = (self.below(64) + 1) as usize;
                    let v = if self.below(2) == 0 {
                        self.next() as u8
                    } else {
                        b'a' + (self.below(26) as u8)
                    };
                    for b in p[i..(i + run).min(size)].iter_mut() {
                        *b = v;
                    }
                    i += run;
                }
            }
        }
        p
    }
}

pub(super) fn encode(header: LtxHeader, pages: &[(u32, Vec<u8>)], post: u64) -> Vec<u8> {
    let mut enc = LtxEncoder::new(Vec::new(), header).unwrap();
    for (pgno, data) in pages {
        enc.add_page(*pgno, data).unwrap();
    }
    enc.finish(post).unwrap();
    enc.into_inner()
}

pub(super) fn db_checksum(pages: &[(u32, Vec<u8>)]) -> u64 {
    let mut c = DatabaseChecksum::EMPTY;
    for (pgno, data) in pages {
        c.add_page(*pgno, data);
    }
    c.value()
}

/// Builds a file from raw frames, bypassing the encoder's rules, with a correct index
/// and file checksum, so tests can reach the decoder's own checks.
pub(super) fn raw_file(
    header: &LtxHeader,
    frames: &[(u32, u16, Vec<u8>, Vec<u8>)],
    post: u64,
) -> Vec<u8> {
    // Each frame: pgno, flags, stored payload, decompressed data (hashed).
    let mut out = header.to_bytes().to_vec();
    let mut hash = Crc64::new();
    hash.update(&out);
    let mut index = Vec::new();
    for (pgno, flags, payload, data) in frames {
        let off = out.len() as u64;
        let mut prefix = pgno.to_be_bytes().to_vec();
        prefix.extend_from_slice(&flags.to_be_bytes());
        if flags & PAGE_FLAG_SIZE != 0 {
            prefix.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        }
        hash.update(&prefix);
        hash.update(data);
        out.extend_from_slice(&prefix);
        out.extend_from_slice(payload);
        index.push((*pgno, off, out.len() as u64 - off));
    }
    let mut tail = vec![0u8; PAGE_HEADER_SIZE];
    let start = tail.len();
    for (p, o, s) in index {
        push_uvarint(&mut tail, u64::from(p));
        push_uvarint(&mut tail, o);
        push_uvarint(&mut tail, s);
    }
    push_uvarint(&mut tail, 0);
    let n = (tail.len() - start) as u64;
    tail.extend_from_slice(&n.to_be_bytes());
    tail.extend_from_slice(&post.to_be_bytes());
    hash.update(&tail);
    tail.extend_from_slice(&(hash.finalize() | CHECKSUM_FLAG).to_be_bytes());
    out.extend_from_slice(&tail);
    out
}

pub(super) fn block_frame(pgno: u32, data: &[u8]) -> (u32, u16, Vec<u8>, Vec<u8>) {
    (
        pgno,
        PAGE_FLAG_SIZE,
        lz4_flex::block::compress(data),
        data.to_vec(),
    )
}

#[test]
fn round_trip_every_page_size() {
    let mut rng = Rng(0x1234_5678);
    let mut size = MIN_PAGE_SIZE;
    while size <= MAX_PAGE_SIZE {
        let ps = size as usize;
        let commit = 7u32;
        let pages: Vec<(u32, Vec<u8>)> = (1..=commit).map(|p| (p, rng.page(ps))).collect();
        let post = db_checksum(&pages);

        // Snapshot with checksums.
        let h = LtxHeader {
            wal_offset: 32,
            wal_size: 4096,
            wal_salt1: 9,
            wal_salt2: 10,
            node_id: 77,
            ..LtxHeader::snapshot(size, commit, 5, 1_700_000_000_123)
        };
        let bytes = encode(h, &pages, post);
        let f = decode(&bytes[..]).unwrap();
        assert_eq!(f.header, h);
        assert_eq!(f.trailer.post_apply_checksum, post);
        assert_eq!(f.pages.len(), pages.len());
        for (got, (pgno, data)) in f.pages.iter().zip(&pages) {
            assert_eq!(got.pgno, *pgno);
            assert_eq!(&got.data, data);
        }
        assert_eq!(f.index.len(), pages.len());
        assert_eq!(f.index[0].offset, HEADER_SIZE as u64);
        for e in &f.index {
            let fr = &bytes[e.offset as usize..(e.offset + e.size) as usize];
            assert_eq!(u32::from_be_bytes(fr[0..4].try_into().unwrap()), e.pgno);
            assert_eq!(
                u16::from_be_bytes(fr[4..6].try_into().unwrap()),
                PAGE_FLAG_SIZE
            );
            assert_eq!(
                u32::from_be_bytes(fr[6..10].try_into().unwrap()) as u64,
                e.size - 10
            );
        }

        // Incremental without checksums: a sparse set of pages.
        let h2 = LtxHeader::incremental(size, commit + 3, 6, 8, 42, 0).without_checksums();
        let sparse: Vec<(u32, Vec<u8>)> = [2u32, 5, 9, 10]
            .iter()
            .map(|&p| (p, rng.page(ps)))
            .collect();
        let bytes2 = encode(h2, &sparse, 0);
        let f2 = decode(&bytes2[..]).unwrap();
        assert_eq!(f2.header, h2);
        assert_eq!(f2.trailer.post_apply_checksum, 0);
        let got: Vec<(u32, Vec<u8>)> = f2.pages.into_iter().map(|p| (p.pgno, p.data)).collect();
        assert_eq!(got, sparse);

        size *= 2;
    }
}

#[test]
fn streaming_decoder_and_finish_drains() {
    let mut rng = Rng(99);
    let pages: Vec<(u32, Vec<u8>)> = (1..=5).map(|p| (p, rng.page(1024))).collect();
    let bytes = encode(
        LtxHeader::snapshot(1024, 5, 3, 0),
        &pages,
        db_checksum(&pages),
    );
    let mut dec = LtxDecoder::new(&bytes[..]).unwrap();
    let mut buf = vec![0u8; 1024];
    assert_eq!(dec.read_page(&mut buf).unwrap(), Some(1));
    assert_eq!(buf, pages[0].1);
    // finish() reads the rest and verifies everything.
    let t = dec.finish().unwrap();
    assert_eq!(t.post_apply_checksum, db_checksum(&pages));
    assert_eq!(dec.index().len(), 5);
    assert_eq!(dec.read_page(&mut buf).unwrap(), None);
    assert_eq!(dec.finish().unwrap(), t);
    // Wrong buffer size is a usage error.
    let mut dec = LtxDecoder::new(&bytes[..]).unwrap();
    assert!(matches!(
        dec.read_page(&mut [0u8; 10]),
        Err(LtxError::Usage(_))
    ));
}

#[test]
fn empty_files() {
    // A snapshot of an empty database and an incremental file with no pages.
    let bytes = encode(
        LtxHeader::snapshot(4096, 0, 1, 0),
        &[],
        DatabaseChecksum::EMPTY.value(),
    );
    let f = decode(&bytes[..]).unwrap();
    assert!(f.pages.is_empty());
    assert_eq!(
        bytes.len(),
        HEADER_SIZE + PAGE_HEADER_SIZE + 1 + 8 + TRAILER_SIZE
    );
    let h = LtxHeader::incremental(4096, 3, 2, 2, 0, CHECKSUM_FLAG | 5);
    let f = decode(&encode(h, &[], CHECKSUM_FLAG | 5)[..]).unwrap();
    assert!(f.pages.is_empty());
    let mut enc = LtxEncoder::new(Vec::new(), LtxHeader::snapshot(4096, 0, 1, 0)).unwrap();
    assert!(enc.finish(CHECKSUM_FLAG | 1).is_err());
}

#[test]
fn every_corruption_is_an_error_or_harmless() {
    // Flip each bit pattern at every byte of small files: the decoder must never panic
    // and never return different content. LZ4 payloads are not hashed directly (the
    // spec hashes decompressed data), so a flip there that decodes to the same page is
    // harmless; every other flip must be an error.
    let mut rng = Rng(3);
    let pages: Vec<(u32, Vec<u8>)> = (1..=3).map(|p| (p, rng.page(512))).collect();
    let files = [
        encode(
            LtxHeader::snapshot(512, 3, 4, 1234),
            &pages,
            db_checksum(&pages),
        ),
        encode(
            LtxHeader::incremental(512, 9, 5, 6, 1, CHECKSUM_FLAG | 99).without_checksums(),
            &[(2, pages[0].1.clone()), (8, pages[1].1.clone())],
            0,
        ),
    ];
    for bytes in &files {
        let good = decode(&bytes[..]).unwrap();
        let mut payload = vec![false; bytes.len()];
        for e in &good.index {
            for b in payload
                .iter_mut()
                .skip(e.offset as usize + 10)
                .take(e.size as usize - 10)
            {
                *b = true;
            }
        }
        let mut harmless = 0;
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= mask;
                match decode(&bad[..]) {
                    Err(_) => {}
                    Ok(f) => {
                        assert!(payload[i], "flip 0x{mask:02x} at byte {i} went unnoticed");
                        assert_eq!(f, good, "flip at byte {i} changed the content silently");
                        harmless += 1;
                    }
                }
            }
        }
        assert!(harmless < bytes.len() / 4, "{harmless} harmless flips");
        // Every truncation and any trailing data are errors.
        for n in 0..bytes.len() {
            let err = decode(&bytes[..n]).unwrap_err();
            assert!(matches!(err, LtxError::Truncated { .. }), "at {n}: {err}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        let err = decode(&longer[..]).unwrap_err();
        assert!(err.to_string().contains("after its trailer"), "{err}");
    }
}

#[test]
fn snapshot_then_incrementals_rebuild_the_database() {
    // Track a database through transactions, writing a snapshot and then one
    // incremental file per transaction with chained checksums, and rebuild it.
    let ps = 4096usize;
    let mut rng = Rng(2024);
    let mut db: Vec<Vec<u8>> = (0..10).map(|_| rng.page(ps)).collect();
    let mut sum = DatabaseChecksum::of_database(&db.concat(), ps as u32).unwrap();
    let snapshot_pages: Vec<(u32, Vec<u8>)> = db
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u32 + 1, p.clone()))
        .collect();
    let mut files = vec![encode(
        LtxHeader::snapshot(ps as u32, db.len() as u32, 1, 0),
        &snapshot_pages,
        sum.value(),
    )];
    for txid in 2..=6u64 {
        let pre = sum;
        let mut changed = std::collections::BTreeMap::new();
        for _ in 0..3 {
            // Change a page, or append one.
            let i = rng.below(db.len() as u64 + 1) as usize;
            let new = rng.page(ps);
            if i < db.len() {
                sum.replace_page(i as u32 + 1, &db[i], &new);
                db[i] = new.clone();
            } else {
                sum.add_page(i as u32 + 1, &new);
                db.push(new.clone());
            }
            changed.insert(i as u32 + 1, new);
        }
        let pages: Vec<(u32, Vec<u8>)> = changed.into_iter().collect();
        files.push(encode(
            LtxHeader::incremental(ps as u32, db.len() as u32, txid, txid, 0, pre.value()),
            &pages,
            sum.value(),
        ));
    }
    // Replay: checksums chain from one file to the next.
    let mut image: Vec<u8> = Vec::new();
    let mut prev_post = 0u64;
    for bytes in &files {
        let f = decode(&bytes[..]).unwrap();
        assert_eq!(
            f.header.pre_apply_checksum,
            if f.header.is_snapshot() { 0 } else { prev_post }
        );
        image.resize(f.header.commit as usize * ps, 0);
        for p in f.pages {
            let at = (p.pgno as usize - 1) * ps;
            image[at..at + ps].copy_from_slice(&p.data);
        }
        assert_eq!(
            DatabaseChecksum::of_database(&image, ps as u32)
                .unwrap()
                .value(),
            f.trailer.post_apply_checksum
        );
        prev_post = f.trailer.post_apply_checksum;
    }
    assert_eq!(image, db.concat());
}

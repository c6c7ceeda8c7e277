//! The content checksum of a database image: the blake3 checksum walfs keeps for every
//! database, records for every uploaded TXID, and checks every restore against
//! (docs/FORMAT.md, "Content checksum").
//!
//! Each page contributes its [`page_hash`]: the first 128 bits of
//! `blake3_keyed(key = blake3(page data), message = page number as big-endian u32)`. Hashing
//! the page alone first keeps the 4 KiB hash on blake3's fast whole-chunk path; keying the
//! second, one-block hash with it binds the page to its number, so two pages that trade
//! places change the sum. The database checksum is the XOR of every page's contribution,
//! skipping the lock page (which SQLite never uses and LTX files never hold); an empty
//! database's is zero. XOR is its own inverse, so a transaction updates the checksum with
//! its changed pages only: each page's old contribution out, its new one in, and the
//! pages past a shrunk size out.
//!
//! This is not the LTX "database checksum" (CRC-64, [`crate::ltx::DatabaseChecksum`]),
//! which Litestream's files carry and restore still checks when it is present.

use std::fmt;
use std::io;

use super::header::{lock_byte_page, page_size_is_valid};

/// One page's contribution to a [`ContentChecksum`].
pub type PageHash = u128;

/// The content checksum of a whole database (see the module header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ContentChecksum(u128);

/// Page `pgno`'s contribution: 128 bits of `blake3_keyed(blake3(data), pgno)`.
pub fn page_hash(pgno: u32, data: &[u8]) -> PageHash {
    let key = blake3::hash(data);
    let h = blake3::keyed_hash(key.as_bytes(), &pgno.to_be_bytes());
    u128::from_be_bytes(h.as_bytes()[..16].try_into().expect("16 bytes"))
}

impl ContentChecksum {
    /// The checksum of a database with no pages.
    pub const EMPTY: ContentChecksum = ContentChecksum(0);

    /// Resumes from a stored value.
    pub fn from_value(value: u128) -> Self {
        ContentChecksum(value)
    }

    /// The value to store.
    pub fn value(self) -> u128 {
        self.0
    }

    /// Adds (or, equally, removes) one page's [`page_hash`]. The caller skips the lock page.
    pub fn toggle(&mut self, page_hash: PageHash) {
        self.0 ^= page_hash;
    }

    /// Adds a page (`data.len()` is the page size). The lock page is ignored.
    pub fn add_page(&mut self, pgno: u32, data: &[u8]) {
        if pgno != lock_byte_page(data.len() as u32) {
            self.toggle(page_hash(pgno, data));
        }
    }

    /// The checksum of a whole database image of `page_size`-byte pages.
    pub fn of_database(db: &[u8], page_size: u32) -> io::Result<Self> {
        let mut sum = ContentChecksum::EMPTY;
        for (pgno, page) in database_pages(db, page_size)? {
            sum.add_page(pgno, page);
        }
        Ok(sum)
    }

    /// Parses the 32 hex digits [`fmt::Display`] writes.
    pub fn parse_hex(text: &str) -> Option<Self> {
        if text.len() != 32 {
            return None;
        }
        u128::from_str_radix(text, 16).ok().map(ContentChecksum)
    }
}

/// The pages of a whole database image with their numbers; an error if `page_size` is not
/// a SQLite page size or the image is not a whole number of pages.
pub fn database_pages(db: &[u8], page_size: u32) -> io::Result<impl Iterator<Item = (u32, &[u8])>> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    if !page_size_is_valid(page_size) {
        return Err(invalid(format!("invalid page size {page_size}")));
    }
    if !db.len().is_multiple_of(page_size as usize) {
        return Err(invalid(format!(
            "database of {} bytes is not a whole number of {page_size}-byte pages",
            db.len()
        )));
    }
    Ok((1u32..).zip(db.chunks_exact(page_size as usize)))
}

/// 32 lowercase hex digits.
impl fmt::Display for ContentChecksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8, size: usize) -> Vec<u8> {
        (0..size)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn the_page_hash_is_blake3_keyed_by_the_page_over_its_number() {
        let data = page(1, 4096);
        let key = blake3::hash(&data);
        let mut h = blake3::Hasher::new_keyed(key.as_bytes());
        h.update(&7u32.to_be_bytes());
        let want = u128::from_be_bytes(h.finalize().as_bytes()[..16].try_into().unwrap());
        assert_eq!(page_hash(7, &data), want);
        assert_ne!(page_hash(7, &data), page_hash(8, &data));
    }

    #[test]
    fn updates_per_page_equal_a_full_rehash() {
        let ps = 512usize;
        let mut db: Vec<u8> = (0..6).flat_map(|i| page(i, ps)).collect();
        let mut sum = ContentChecksum::of_database(&db, ps as u32).unwrap();
        // Page 3 changes, page 6 is cut off.
        let old3 = db[2 * ps..3 * ps].to_vec();
        let new3 = page(99, ps);
        db[2 * ps..3 * ps].copy_from_slice(&new3);
        sum.toggle(page_hash(3, &old3));
        sum.toggle(page_hash(3, &new3));
        sum.toggle(page_hash(6, &db[5 * ps..]));
        db.truncate(5 * ps);
        assert_eq!(sum, ContentChecksum::of_database(&db, ps as u32).unwrap());
        assert_eq!(
            ContentChecksum::of_database(&[], 4096).unwrap(),
            ContentChecksum::EMPTY
        );
    }

    #[test]
    fn pages_that_trade_places_change_the_checksum() {
        let (a, b) = (page(1, 1024), page(2, 1024));
        let ab: Vec<u8> = [a.clone(), b.clone()].concat();
        let ba: Vec<u8> = [b, a].concat();
        assert_ne!(
            ContentChecksum::of_database(&ab, 1024).unwrap(),
            ContentChecksum::of_database(&ba, 1024).unwrap()
        );
    }

    #[test]
    fn the_lock_page_is_skipped() {
        let ps = 65536u32;
        let lock = lock_byte_page(ps);
        let mut sum = ContentChecksum::EMPTY;
        sum.add_page(lock, &page(5, ps as usize));
        assert_eq!(sum, ContentChecksum::EMPTY);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(ContentChecksum::of_database(&[0u8; 1000], 512).is_err());
        assert!(ContentChecksum::of_database(&[0u8; 1024], 1000).is_err());
        let s = ContentChecksum::from_value(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(ContentChecksum::parse_hex(&s.to_string()), Some(s));
        assert_eq!(ContentChecksum::parse_hex("12"), None);
        assert_eq!(ContentChecksum::parse_hex(&"g".repeat(32)), None);
    }
}

//! The SQLite database header: the first 100 bytes of a database file (fileformat2.html §1.3).
//!
//! This file owns: the magic string, page-size decoding and validation, the read/write
//! format versions (rollback vs WAL), the file-change counter, the in-header database size,
//! and the lock-byte page. Parsing never panics; non-SQLite input gives a [`HeaderError`].

use std::fmt;

use super::be32;

/// The 16-byte magic at offset 0 of every SQLite database.
pub const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";
/// Size of the database header in bytes.
pub const DB_HEADER_SIZE: usize = 100;
/// Byte offset of the lock-byte page: SQLite's `PENDING_BYTE` (1 GiB). The page holding it
/// is never written by SQLite, journaled, or put in the WAL.
pub const PENDING_BYTE: u64 = 0x4000_0000;
/// Smallest SQLite page size.
pub const MIN_PAGE_SIZE: u32 = 512;
/// Largest SQLite page size.
pub const MAX_PAGE_SIZE: u32 = 65536;

/// The journal family the header's format versions announce (bytes 18 and 19).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// Both versions are 1: legacy rollback journal (DELETE, TRUNCATE, PERSIST, ...).
    Rollback,
    /// Both versions are 2: write-ahead log.
    Wal,
}

/// Why bytes are not a usable SQLite database header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than 100 bytes (an empty file is a valid *new* database, but has no header).
    TooShort { len: usize },
    /// The first 16 bytes are not `"SQLite format 3\0"`.
    BadMagic,
    /// The page-size field (raw big-endian u16 at offset 16) is not a power of two in
    /// 512..=32768, or 1 (meaning 65536).
    BadPageSize { raw: u16 },
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::TooShort { len } => {
                write!(f, "not an SQLite database: {len} bytes, header needs 100")
            }
            HeaderError::BadMagic => f.write_str("not an SQLite database: bad magic string"),
            HeaderError::BadPageSize { raw } => {
                write!(f, "corrupt SQLite header: invalid page size field {raw}")
            }
        }
    }
}

impl std::error::Error for HeaderError {}

/// The decoded fields of the 100-byte database header that walfs uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbHeader {
    /// Page size in bytes (512..=65536, a power of two).
    pub page_size: u32,
    /// File format write version (offset 18): 1 = rollback, 2 = WAL.
    pub write_version: u8,
    /// File format read version (offset 19): 1 = rollback, 2 = WAL.
    pub read_version: u8,
    /// Bytes reserved at the end of each page (offset 20), e.g. for encryption extensions.
    pub reserved_space: u8,
    /// File change counter (offset 24). In rollback mode it grows on every commit; in WAL
    /// mode SQLite does not bump it per transaction (the wal-index detects changes), so it
    /// is not a commit counter there.
    pub change_counter: u32,
    /// In-header database size in pages (offset 28); see [`DbHeader::valid_db_size`].
    pub db_size_pages: u32,
    /// First freelist trunk page (offset 32), 0 if none.
    pub freelist_trunk: u32,
    /// Number of freelist pages (offset 36).
    pub freelist_count: u32,
    /// Schema cookie (offset 40).
    pub schema_cookie: u32,
    /// Text encoding (offset 56): 1 UTF-8, 2 UTF-16le, 3 UTF-16be (0 in an unset header).
    pub text_encoding: u32,
    /// `PRAGMA user_version` (offset 60).
    pub user_version: u32,
    /// Version-valid-for number (offset 92): the change counter when `db_size_pages` and the
    /// SQLite version number were last written.
    pub version_valid_for: u32,
    /// `SQLITE_VERSION_NUMBER` of the library that last wrote the file (offset 96).
    pub sqlite_version: u32,
}

/// Decodes the raw page-size field: 1 means 65536, otherwise a power of two in 512..=32768.
pub fn page_size_from_raw(raw: u16) -> Option<u32> {
    let size = if raw == 1 { 65536 } else { u32::from(raw) };
    page_size_is_valid(size).then_some(size)
}

/// True if `size` is a page size SQLite accepts: a power of two from 512 to 65536.
pub fn page_size_is_valid(size: u32) -> bool {
    (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&size) && size.is_power_of_two()
}

/// The 1-based number of the lock-byte page for `page_size`: the page that contains byte
/// offset 1 GiB (`PENDING_BYTE / page_size + 1`). SQLite never writes it; a database only
/// reaches it beyond 1 GiB. Never panics: for a zero page size (never valid, see
/// [`page_size_is_valid`]) it returns 0, which is no page, since pages count from 1.
pub fn lock_byte_page(page_size: u32) -> u32 {
    if page_size == 0 {
        return 0;
    }
    (PENDING_BYTE / u64::from(page_size) + 1) as u32
}

/// True if `bytes` start with a valid SQLite database header (magic and page size).
pub fn is_sqlite(bytes: &[u8]) -> bool {
    DbHeader::parse(bytes).is_ok()
}

impl DbHeader {
    /// Parses the header from the start of `bytes` (at least 100 bytes; more are ignored).
    pub fn parse(bytes: &[u8]) -> Result<DbHeader, HeaderError> {
        if bytes.len() < DB_HEADER_SIZE {
            return Err(HeaderError::TooShort { len: bytes.len() });
        }
        if &bytes[..16] != SQLITE_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let raw = u16::from_be_bytes([bytes[16], bytes[17]]);
        let page_size = page_size_from_raw(raw).ok_or(HeaderError::BadPageSize { raw })?;
        Ok(DbHeader {
            page_size,
            write_version: bytes[18],
            read_version: bytes[19],
            reserved_space: bytes[20],
            change_counter: be32(bytes, 24),
            db_size_pages: be32(bytes, 28),
            freelist_trunk: be32(bytes, 32),
            freelist_count: be32(bytes, 36),
            schema_cookie: be32(bytes, 40),
            text_encoding: be32(bytes, 56),
            user_version: be32(bytes, 60),
            version_valid_for: be32(bytes, 92),
            sqlite_version: be32(bytes, 96),
        })
    }

    /// The journal family announced by bytes 18/19, or `None` if they disagree or hold a
    /// version this code does not know (a newer SQLite may define more).
    pub fn format(&self) -> Option<FileFormat> {
        match (self.write_version, self.read_version) {
            (1, 1) => Some(FileFormat::Rollback),
            (2, 2) => Some(FileFormat::Wal),
            _ => None,
        }
    }

    /// True if bytes 18 and 19 both say WAL.
    pub fn is_wal(&self) -> bool {
        self.format() == Some(FileFormat::Wal)
    }

    /// The in-header database size, if SQLite would trust it: non-zero and written by the
    /// same transaction as the change counter (`version_valid_for == change_counter`).
    /// Files last written by SQLite before 3.7.0 fail this; then the size is the file size
    /// divided by the page size.
    pub fn valid_db_size(&self) -> Option<u32> {
        (self.db_size_pages != 0 && self.version_valid_for == self.change_counter)
            .then_some(self.db_size_pages)
    }

    /// The size in pages SQLite uses for this database when its file (or its WAL's last
    /// commit) holds `physical` pages: the in-header size when it is valid and not larger
    /// (pages past it are ignored; a killed writer in `journal_mode=OFF` can leave them),
    /// else `physical`.
    pub fn logical_size(&self, physical: u32) -> u32 {
        self.valid_db_size()
            .filter(|&n| n <= physical)
            .unwrap_or(physical)
    }

    /// The lock-byte page number for this database's page size.
    pub fn lock_byte_page(&self) -> u32 {
        lock_byte_page(self.page_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn make_db(dir: &std::path::Path, page_size: u32, wal: bool) -> std::path::PathBuf {
        let path = dir.join(format!("h{page_size}{wal}.db"));
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!("PRAGMA page_size={page_size};"))
            .unwrap();
        if wal {
            let mode: String = conn
                .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        }
        conn.execute_batch(
            "CREATE TABLE t(x); INSERT INTO t VALUES(randomblob(3000)); PRAGMA user_version=7;",
        )
        .unwrap();
        if wal {
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .unwrap();
        }
        drop(conn);
        path
    }

    #[test]
    fn real_headers_rollback_and_wal() {
        let dir = tempfile::tempdir().unwrap();
        for &page_size in &[512u32, 1024, 4096, 32768, 65536] {
            for &wal in &[false, true] {
                let path = make_db(dir.path(), page_size, wal);
                let bytes = std::fs::read(&path).unwrap();
                assert!(is_sqlite(&bytes));
                let h = DbHeader::parse(&bytes).unwrap();
                assert_eq!(h.page_size, page_size);
                assert_eq!(
                    h.format(),
                    Some(if wal {
                        FileFormat::Wal
                    } else {
                        FileFormat::Rollback
                    })
                );
                assert_eq!(h.is_wal(), wal);
                assert_eq!(h.user_version, 7);
                assert_eq!(h.text_encoding, 1);
                assert_eq!(
                    h.valid_db_size(),
                    Some((bytes.len() / page_size as usize) as u32)
                );
                assert_eq!(h.sqlite_version, rusqlite::version_number() as u32);
                if page_size == 65536 {
                    assert_eq!(u16::from_be_bytes([bytes[16], bytes[17]]), 1);
                }
            }
        }
    }

    #[test]
    fn change_counter_counts_rollback_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cc.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t(x);").unwrap();
        let before = DbHeader::parse(&std::fs::read(&path).unwrap())
            .unwrap()
            .change_counter;
        for i in 0..5 {
            conn.execute("INSERT INTO t VALUES(?1)", [i]).unwrap();
        }
        let after = DbHeader::parse(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(after.change_counter, before + 5);
        assert_eq!(after.version_valid_for, after.change_counter);
    }

    #[test]
    fn lock_byte_pages() {
        assert_eq!(lock_byte_page(512), 2_097_153);
        assert_eq!(lock_byte_page(4096), 262_145);
        assert_eq!(lock_byte_page(65536), 16_385);
        assert_eq!(lock_byte_page(0), 0);
        // The page really contains byte 1 GiB.
        for ps in [512u64, 1024, 4096, 65536] {
            let pg = u64::from(lock_byte_page(ps as u32));
            assert!((pg - 1) * ps <= PENDING_BYTE && PENDING_BYTE < pg * ps);
        }
    }

    /// 0 is never a page size, and no page size makes the lock page panic; the lock page of
    /// 0 is 0, no page at all, so a caller that skips it skips nothing.
    #[test]
    fn invalid_page_sizes_have_a_lock_page_number_without_panicking() {
        assert!(!page_size_is_valid(0));
        assert_eq!(lock_byte_page(0), 0);
        for ps in [1u32, 3, 511, 513, 1000, 65535, 65537, u32::MAX] {
            assert!(!page_size_is_valid(ps), "{ps}");
            assert!(lock_byte_page(ps) >= 1, "{ps}");
        }
        assert!(page_size_is_valid(MIN_PAGE_SIZE) && page_size_is_valid(MAX_PAGE_SIZE));
    }

    #[test]
    fn page_size_rules() {
        assert_eq!(page_size_from_raw(1), Some(65536));
        assert_eq!(page_size_from_raw(512), Some(512));
        assert_eq!(page_size_from_raw(32768), Some(32768));
        for bad in [0u16, 2, 256, 513, 1000, 3072, 65535] {
            assert_eq!(page_size_from_raw(bad), None, "{bad}");
        }
        assert!(page_size_is_valid(65536));
        assert!(!page_size_is_valid(131072));
        assert!(!page_size_is_valid(0));
    }

    #[test]
    fn non_sqlite_input_is_an_error() {
        assert_eq!(DbHeader::parse(b""), Err(HeaderError::TooShort { len: 0 }));
        assert_eq!(
            DbHeader::parse(SQLITE_MAGIC),
            Err(HeaderError::TooShort { len: 16 })
        );
        assert_eq!(DbHeader::parse(&[0u8; 100]), Err(HeaderError::BadMagic));
        let mut h = [0u8; 100];
        h[..16].copy_from_slice(SQLITE_MAGIC);
        h[16] = 0x03; // 768: not a power of two
        assert_eq!(
            DbHeader::parse(&h),
            Err(HeaderError::BadPageSize { raw: 768 })
        );
        assert!(!is_sqlite(&h));
        h[16] = 0x10; // 4096
        h[17] = 0;
        assert!(is_sqlite(&h));
        let e = DbHeader::parse(&[0u8; 100]).unwrap_err();
        assert!(e.to_string().contains("not an SQLite database"));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = crate::sqlite::test_util::Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..20_000 {
            let len = (rng.next() % 140) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if i % 2 == 0 && b.len() >= 16 {
                b[..16].copy_from_slice(SQLITE_MAGIC);
            }
            let _ = DbHeader::parse(&b).map(|h| (h.format(), h.valid_db_size()));
            let _ = is_sqlite(&b);
        }
    }
}

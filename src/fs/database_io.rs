//! How the kernel serves the data of a file that holds an SQLite database
//! (`--database-io`): kernel passthrough or the kernel page cache, and, for `auto`, the
//! choice between them from what the file's last open period cost in round trips.
//!
//! The trade (docs/BENCHMARKS.md): with passthrough, each read invalidates the FUSE
//! inode's atime, so SQLite's `fstat` at the start of every transaction of a
//! rollback-journal database is a `getattr` round trip. In the page cache a read
//! transaction costs nothing, but each page SQLite writes is a `write` round trip. A
//! WAL-mode database pays no round trip per read transaction with passthrough, and its
//! checkpoints would write pages through walfs, so it always keeps passthrough.
//!
//! The kernel fixes a file's mode while any handle of it is open, so the choice is made
//! when a file is opened with no other handle open, and it uses what the previous open
//! period (first open to last close) of the same file counted.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::sqlite::header::{DbHeader, FileFormat, SQLITE_MAGIC};

/// `--database-io`: how files that hold an SQLite database are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DatabaseIo {
    /// Like every other file: kernel passthrough.
    Passthrough,
    /// Every database file through the kernel page cache.
    Cached,
    /// Per file, whichever cost fewer round trips in the file's last open period.
    #[default]
    Auto,
}

/// What the first bytes of a file say about it, for the choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Not an SQLite database (or unreadable through this descriptor, or empty).
    Other,
    /// An SQLite database in a rollback-journal mode.
    RollbackDatabase,
    /// An SQLite database in WAL mode.
    WalDatabase,
}

impl FileKind {
    /// Classifies a file from its first 100 bytes (fewer if the file is shorter).
    /// Only the magic string is required: a database whose header is cut short or
    /// damaged is still SQLite's to judge, and it is served like a database.
    pub fn of_header(bytes: &[u8]) -> FileKind {
        if !bytes.starts_with(SQLITE_MAGIC) {
            return FileKind::Other;
        }
        match DbHeader::parse(bytes).ok().and_then(|h| h.format()) {
            Some(FileFormat::Wal) => FileKind::WalDatabase,
            _ => FileKind::RollbackDatabase,
        }
    }

    pub fn is_database(self) -> bool {
        self != FileKind::Other
    }
}

/// Requests counted on one file during its current open period. Counted for every
/// regular file (three relaxed atomic adds); only databases are ever judged by them.
#[derive(Default)]
pub struct UseCounters {
    getattrs: AtomicU64,
    syncs: AtomicU64,
    writes: AtomicU64,
}

impl UseCounters {
    pub fn getattr(&self) {
        self.getattrs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sync(&self) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far, and zero for the next period.
    fn take(&self) -> Counts {
        Counts {
            getattrs: self.getattrs.swap(0, Ordering::Relaxed),
            syncs: self.syncs.swap(0, Ordering::Relaxed),
            writes: self.writes.swap(0, Ordering::Relaxed),
        }
    }
}

/// One open period's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    /// `getattr` requests: with passthrough, about one per transaction.
    pub getattrs: u64,
    /// `fsync` requests of the database: about one per write transaction.
    pub syncs: u64,
    /// `write` requests: with the page cache, one per page SQLite writes.
    pub writes: u64,
}

/// A period with fewer requests than this says too little to change the choice.
pub const MIN_EVIDENCE: u64 = 64;

/// Pages a small write transaction writes to the database (a table leaf, an index leaf
/// and page 1), assumed until a page-cache period has measured it.
const DEFAULT_PAGES_PER_COMMIT: f64 = 3.0;

/// What `auto` has learned about one file, kept while walfs knows the file.
#[derive(Debug, Default, Clone)]
pub struct UseHistory {
    /// How the current (or last) open period was served: `Some(true)` for the page cache.
    period_cached: Option<bool>,
    /// Read transactions per write transaction, from the last passthrough period.
    reads_per_commit: Option<f64>,
    /// Page writes per write transaction, from the last page-cache period.
    pages_per_commit: Option<f64>,
    /// The choice the last informative period pointed to.
    prefer_cached: Option<bool>,
}

impl UseHistory {
    /// Ends the last open period (its counts are taken from `counters`), learns from
    /// it, and chooses the mode of the period that starts now: `true` for the page cache.
    /// `read_only` says how the opening handle was opened; with nothing learned yet, a
    /// read-only open takes the page cache (it writes nothing itself) and a read-write
    /// open keeps passthrough.
    pub fn begin_period(&mut self, counters: &UseCounters, read_only: bool) -> bool {
        let counts = counters.take();
        if let Some(cached) = self.period_cached {
            self.learn(cached, counts);
        }
        let cached = self.prefer_cached.unwrap_or(read_only);
        self.period_cached = Some(cached);
        cached
    }

    /// Starts a period that was not chosen by `auto` (a file that is not a database, or a
    /// mode fixed by the options): its counts are dropped when it ends.
    pub fn begin_unjudged_period(&mut self, counters: &UseCounters) {
        if let Some(cached) = self.period_cached.take() {
            self.learn(cached, counters.take());
        } else {
            counters.take();
        }
    }

    fn learn(&mut self, cached: bool, c: Counts) {
        if c.getattrs + c.syncs + c.writes < MIN_EVIDENCE {
            return;
        }
        let commits = c.syncs as f64;
        if cached {
            // Cost: the page writes. Saved: each commit's getattr and the read
            // transactions that the last passthrough period saw per commit.
            if c.syncs > 0 {
                self.pages_per_commit = Some(c.writes as f64 / commits);
            }
            let reads = self.reads_per_commit.unwrap_or(0.0);
            let saved = commits * (1.0 + reads);
            self.prefer_cached = Some(c.writes as f64 <= saved);
            // Reads are invisible in the cache, so the mix last measured with
            // passthrough is trusted less after each period that wrote: a database that
            // has turned write-heavy goes back to passthrough within a few periods, where
            // the mix is measured again.
            if c.writes > 0 {
                self.reads_per_commit = Some(reads / 2.0);
            }
        } else {
            // Cost: a getattr per transaction. The page cache would cost the pages of
            // each commit instead.
            self.reads_per_commit =
                Some(c.getattrs.saturating_sub(c.syncs) as f64 / commits.max(1.0));
            let pages = self.pages_per_commit.unwrap_or(DEFAULT_PAGES_PER_COMMIT);
            self.prefer_cached = Some(c.getattrs as f64 > commits * pages);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn period(h: &mut UseHistory, c: &UseCounters, read_only: bool, n: Counts) -> bool {
        let mode = h.begin_period(c, read_only);
        c.getattrs.store(n.getattrs, Ordering::Relaxed);
        c.syncs.store(n.syncs, Ordering::Relaxed);
        c.writes.store(n.writes, Ordering::Relaxed);
        mode
    }

    fn counts(getattrs: u64, syncs: u64, writes: u64) -> Counts {
        Counts {
            getattrs,
            syncs,
            writes,
        }
    }

    #[test]
    fn with_nothing_learned_read_only_opens_take_the_cache() {
        let c = UseCounters::default();
        assert!(UseHistory::default().begin_period(&c, true));
        assert!(!UseHistory::default().begin_period(&c, false));
    }

    #[test]
    fn a_read_mostly_database_moves_to_the_cache_and_stays() {
        let (mut h, c) = (UseHistory::default(), UseCounters::default());
        // Passthrough: 10,000 transactions, 100 of them commits.
        assert!(!period(&mut h, &c, false, counts(10_000, 100, 0)));
        // The cache: 100 commits of 4 pages cost 400 writes and save 10,000 getattrs.
        assert!(period(&mut h, &c, false, counts(0, 100, 400)));
        assert!(h.begin_period(&c, false));
    }

    #[test]
    fn a_write_heavy_database_keeps_passthrough() {
        let (mut h, c) = (UseHistory::default(), UseCounters::default());
        // One getattr per commit (DELETE journal, one writer): 1,000 < 3 x 1,000.
        assert!(!period(&mut h, &c, false, counts(1_000, 1_000, 0)));
        assert!(
            !h.begin_period(&c, true),
            "write-heavy history beats read-only"
        );
    }

    #[test]
    fn a_cached_period_that_writes_more_than_it_saves_goes_back_to_passthrough() {
        let (mut h, c) = (UseHistory::default(), UseCounters::default());
        // Opened read-only first: the cache, then a writer joins and writes 5 pages per
        // commit with no reads measured.
        assert!(period(&mut h, &c, true, counts(0, 200, 1_000)));
        assert!(!h.begin_period(&c, true));
    }

    #[test]
    fn a_mix_that_turned_write_heavy_is_measured_again() {
        let (mut h, c) = (UseHistory::default(), UseCounters::default());
        // Measured with passthrough: 20 reads per commit.
        assert!(!period(&mut h, &c, false, counts(2_100, 100, 0)));
        // Then only commits, 4 pages each: the trusted mix halves each period, 20, 10,
        // 5: the cache still looks cheaper for four periods, then not.
        let mut modes = Vec::new();
        for _ in 0..5 {
            modes.push(period(&mut h, &c, false, counts(0, 100, 400)));
        }
        assert_eq!(modes, [true, true, true, true, false]);
    }

    #[test]
    fn small_periods_change_nothing() {
        let (mut h, c) = (UseHistory::default(), UseCounters::default());
        assert!(!period(&mut h, &c, false, counts(10_000, 10, 0)));
        assert!(period(&mut h, &c, false, counts(10, 10, 30)));
        assert!(
            h.begin_period(&c, false),
            "a quiet cached period keeps the cache"
        );
    }

    #[test]
    fn file_kinds() {
        let mut header = [0u8; 100];
        header[..16].copy_from_slice(crate::sqlite::header::SQLITE_MAGIC);
        header[16..18].copy_from_slice(&4096u16.to_be_bytes());
        header[18] = 1;
        header[19] = 1;
        assert_eq!(FileKind::of_header(&header), FileKind::RollbackDatabase);
        header[18] = 2;
        header[19] = 2;
        assert_eq!(FileKind::of_header(&header), FileKind::WalDatabase);
        assert_eq!(
            FileKind::of_header(&header[..16]),
            FileKind::RollbackDatabase
        );
        assert_eq!(FileKind::of_header(&header[..15]), FileKind::Other);
        assert_eq!(FileKind::of_header(b""), FileKind::Other);
        assert_eq!(FileKind::of_header(&[7u8; 100]), FileKind::Other);
    }
}

//! Per-database capture of SQLite commits, at SQLite's barriers and between them;
//! FUSE-agnostic.
//!
//! This module owns the path from "a database's files changed or reached a barrier" to
//! "every transaction committed so far is staged":
//! - [`DatabaseCapture`] (`database.rs`): one database (its backing path). It keeps a [`WalTracker`] on the
//!   backing `-wal`, the running [`ContentChecksum`](crate::sqlite::ContentChecksum) (blake3) and one hash per page
//!   (so each batch updates the checksum incrementally), and stages the committed WAL
//!   transactions each read finds as one batch (consecutive TXIDs, the newest version of
//!   each page, read once more from the backing `-wal` while it is in the page cache) in
//!   its staging segment. At the barriers after which the `-wal` may stop holding those
//!   frames, it makes the segment durable. When it cannot prove that no commit was missed
//!   (a WAL restart with continuity `Gap`/`Unknown`, typically `synchronous=OFF`), it heals
//!   with a full snapshot and says so ([`CaptureEvent::Healed`]). Pages of uncommitted or
//!   rolled-back transactions are never staged: the tracker yields committed transactions
//!   only.
//! - [`Capture`] (`registry.rs`): the registry of one mount, keyed by path relative to the backing root. It
//!   maps `x-wal` to `x`, recognises databases by their header, ignores other files, and
//!   tells the uploader which databases have something new ([`Capture::take_staged`]).
//! - [`CaptureObserver`] (`observer.rs`): the [`Observer`](crate::fs::Observer) that the FUSE layer calls; it turns
//!   fsyncs, truncations, unlinks, renames and closes of a database's files into
//!   [`Barrier`]s (`barrier.rs`) for the registry ([`Capture::on`] dispatches them); when
//!   staging fails there it lets the operation go on and restarts that database's history
//!   from a snapshot (only synchronous replication with `--sync-timeout-action eio` fails
//!   the operation).
//! - `image.rs`: a database's committed image as SQLite reads it (the database file, its
//!   committed WAL frames, a live journal's original pages), for snapshots and comparisons.
//! - [`watch`]: reads a database's `-wal` within milliseconds of a change between barriers.
//! - [`StagingBudget`] (`budget.rs`): bounded staging (`--max-staging`): while the replica
//!   is behind and what waits for upload passes the bound, each database's pending
//!   transactions are collapsed into one snapshot ([`Capture::collapse_pending`]).
//!
//! - [`rollback`]: rollback-journal commits (DELETE, TRUNCATE, PERSIST) at the journal's
//!   invalidation, changes made without a journal (`journal_mode=MEMORY`/`OFF`) and writes
//!   outside SQLite's protocol (`cp`, `dd`, a rename over the database, truncation), found
//!   by comparing per-page checksums behind a cheap `stat` filter; deleted databases.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::sqlite::{
    read_full, DbHeader, FrameReader, WalError, WalEvent, WalTracker, DB_HEADER_SIZE,
};
use crate::staging::StagingError;

mod barrier;
mod budget;
mod database;
mod image;
mod observer;
mod registry;
pub mod rollback;
pub mod watch;

pub use barrier::Barrier;
pub use budget::StagingBudget;
pub use database::DatabaseCapture;
pub use observer::{CaptureObserver, CommitWaiter};
pub(crate) use registry::WatcherWake;
pub use registry::{Capture, CaptureStats, StagedNotify};

/// What a capture call did that the caller may want to log or count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureEvent {
    /// A transaction or snapshot was staged.
    Staged {
        min_txid: u64,
        max_txid: u64,
        pages: u32,
    },
    /// Capture could not follow the database incrementally (`reason`); a snapshot at
    /// `txid` restarted its history. `waited`: no consistent point was found at once, and
    /// a [`CaptureEvent::Waiting`] said so before.
    Healed {
        txid: u64,
        reason: String,
        waited: bool,
        kind: RestartKind,
    },
    /// Capture cannot follow the database (`reason`), and its files are not at a
    /// consistent point yet: the replica stays at the last TXID staged until a snapshot
    /// restarts the history. Reported once per break.
    Waiting { reason: String },
    /// The file no longer holds an SQLite database (emptied, overwritten with something
    /// else): capture stops and the replica marks it deleted after `txid`.
    Gone { txid: u64 },
}

/// What started a database's history afresh from a snapshot (a label of the
/// `walfs_capture_restarts_total` metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartKind {
    /// Capture could not follow the files (a WAL restarted, truncated or replaced before
    /// it was read, a page size change, a database changed while not captured, ...).
    Follow,
    /// Staging failed (a full disk); the snapshot follows once it works again.
    Staging,
    /// The uploader found staged transactions it can never upload.
    Upload,
}

impl RestartKind {
    pub const ALL: [RestartKind; 3] = [
        RestartKind::Follow,
        RestartKind::Staging,
        RestartKind::Upload,
    ];

    /// The label: `follow`, `staging` or `upload`.
    pub fn name(self) -> &'static str {
        match self {
            RestartKind::Follow => "follow",
            RestartKind::Staging => "staging",
            RestartKind::Upload => "upload",
        }
    }
}

/// Why a capture step could not do its work.
#[derive(Debug)]
pub enum CaptureError {
    /// Staging could not record or make durable what was captured (a full disk, an I/O
    /// error in the staging directory). The only capture failure an application may see,
    /// as EIO, and only at a barrier whose transactions must be durable.
    Staging(StagingError),
    /// The database's files are in a state capture cannot follow incrementally (a page size
    /// change, a log of another database, a file that is not (yet) a database, commits
    /// that may have been missed), or could not be read. Never seen by the application:
    /// the database's history restarts from a snapshot at the next consistent point.
    CannotFollow(String),
    /// The files hold no SQLite database at the moment (empty, or not SQLite), where a
    /// snapshot was needed: like [`CaptureError::CannotFollow`], but not worth a warning,
    /// since such a file is simply not replicated until it becomes a database again.
    NoDatabase,
}

/// The result of a capture step.
pub type CaptureResult<T> = Result<T, CaptureError>;

impl From<StagingError> for CaptureError {
    fn from(e: StagingError) -> CaptureError {
        CaptureError::Staging(e)
    }
}

/// An I/O error outside staging is a failure to read the database's own files.
impl From<io::Error> for CaptureError {
    fn from(e: io::Error) -> CaptureError {
        CaptureError::CannotFollow(format!("reading the database's files failed: {e}"))
    }
}

impl From<WalError> for CaptureError {
    fn from(e: WalError) -> CaptureError {
        match e {
            WalError::Io(e) => e.into(),
            other => CaptureError::CannotFollow(format!("the WAL cannot be read: {other}")),
        }
    }
}

impl std::fmt::Display for CaptureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaptureError::Staging(e) => e.fmt(f),
            CaptureError::CannotFollow(reason) => f.write_str(reason),
            CaptureError::NoDatabase => f.write_str("the file holds no SQLite database now"),
        }
    }
}

impl std::error::Error for CaptureError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CaptureError::Staging(e) => Some(e),
            CaptureError::CannotFollow(_) | CaptureError::NoDatabase => None,
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The `-wal` path of a database path.
pub fn wal_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

/// Opens a file for reading, or `None` if it does not exist.
fn open_optional(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Polls `tracker` on an optional WAL file (absent reads as empty).
fn poll_wal(
    tracker: &mut WalTracker,
    wal: Option<&File>,
    barrier: bool,
) -> CaptureResult<Vec<WalEvent>> {
    poll_wal_through(tracker, wal, barrier, &mut FrameReader::new())
}

/// [`poll_wal`], keeping the frames it validated in `frames`.
fn poll_wal_through(
    tracker: &mut WalTracker,
    wal: Option<&File>,
    barrier: bool,
    frames: &mut FrameReader,
) -> CaptureResult<Vec<WalEvent>> {
    let empty: &[u8] = &[];
    let r = match wal {
        Some(f) => tracker.poll_through(f, barrier, frames),
        None => tracker.poll_through(empty, barrier, frames),
    };
    Ok(r?)
}

/// Reads the database header of `file`, or `None` if it is not (yet) an SQLite database.
fn read_db_header(file: &File) -> io::Result<Option<DbHeader>> {
    let mut b = [0u8; DB_HEADER_SIZE];
    if !read_full(file, 0, &mut b)? {
        return Ok(None);
    }
    Ok(DbHeader::parse(&b).ok())
}

/// Whether SQLite would read an SQLite database at `db` (a backing path): its file has an
/// SQLite header, or it is not empty and its `-wal` holds a committed page 1 that is one
/// (SQLite reads page 1 from the log first). Files of other kinds cost one 100-byte read
/// (and one of the `-wal`, if there is one beside a file without a header).
pub fn is_database(db: &Path) -> bool {
    let Ok(Some(file)) = open_optional(db) else {
        return false;
    };
    if read_db_header(&file).ok().flatten().is_some() {
        return true;
    }
    if file.metadata().map_or(true, |m| m.len() == 0) {
        return false;
    }
    let Ok(Some(wal)) = open_optional(&wal_path(db)) else {
        return false;
    };
    let mut tracker = WalTracker::new();
    let Ok(events) = poll_wal(&mut tracker, Some(&wal), false) else {
        return false;
    };
    let page1 = events.iter().rev().find_map(|e| match e {
        WalEvent::Commit(t) => t.pages.iter().rev().find(|p| p.pgno == 1).map(|p| (t, *p)),
        _ => None,
    });
    let Some((t, p)) = page1 else {
        return false;
    };
    let mut frame = vec![0u8; crate::sqlite::WAL_FRAME_HEADER_SIZE + t.header.page_size as usize];
    t.read_frame_page(&wal, &p, &mut frame).is_ok()
        && DbHeader::parse(&frame[crate::sqlite::WAL_FRAME_HEADER_SIZE..]).is_ok()
}

/// The database a file belongs to, by name: `x-wal` belongs to `x`; `-shm` and
/// `-journal` files are not captured through (None); anything else may be a database.
pub fn database_of(rel: &Path) -> Option<(PathBuf, bool)> {
    let name = rel.file_name()?.as_bytes();
    if let Some(base) = name.strip_suffix(b"-wal") {
        if base.is_empty() {
            return None;
        }
        let mut db = rel.to_path_buf();
        db.set_file_name(OsStr::from_bytes(base));
        return Some((db, true));
    }
    if name.ends_with(b"-shm") || name.ends_with(b"-journal") {
        return None;
    }
    Some((rel.to_path_buf(), false))
}

#[cfg(test)]
mod tests;

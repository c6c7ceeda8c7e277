//! The [`Observer`] that connects the FUSE layer to a mount's [`Capture`]: it routes each
//! barrier on a database's files to the registry, and decides what an application sees
//! when capture fails.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{database_of, rollback, wal_path, Capture};
use crate::fs::observer::{Node, Observer};
use crate::fs::{FsError, FsResult};

/// The observer that connects the FUSE layer to a [`Capture`].
pub struct CaptureObserver {
    capture: Arc<Capture>,
    stage_at_commit: bool,
}

impl CaptureObserver {
    /// Connects `capture`. A `-wal` fsync (each commit with `synchronous=FULL`, and a
    /// checkpoint's first step) is a capture barrier only with `stage_at_commit`; otherwise
    /// the WAL watcher reads those commits within milliseconds, beside the writer. That
    /// loses nothing: the frames stay in the `-wal` until a checkpoint has backfilled them
    /// all, which ends with an ftruncate and (unless `synchronous=OFF`) an fsync of the
    /// database file, and those are barriers at which the capture catches up (and, at the
    /// fsync, makes the staging durable) before SQLite may restart the log.
    pub fn new(capture: Arc<Capture>, stage_at_commit: bool) -> CaptureObserver {
        CaptureObserver {
            capture,
            stage_at_commit,
        }
    }

    pub fn capture(&self) -> &Arc<Capture> {
        &self.capture
    }

    fn barrier(&self, rel: io::Result<PathBuf>, durable: bool) -> FsResult<()> {
        let rel = rel.map_err(|_| FsError::EIO)?;
        self.capture
            .on_barrier(&rel, durable)
            .map(drop)
            .map_err(|_| FsError::EIO)
    }

    /// A removal or rename of `rel`: capture first; forget a database that goes away
    /// (`deleted`: and mark it deleted in the replica, unless another file replaces it).
    fn removing(&self, rel: &Path, deleted: bool) -> FsResult<()> {
        if let Some(db) = rollback::database_of_journal(rel) {
            // DELETE mode's commit point (and the end of a hot journal's rollback).
            return self
                .capture
                .on_journal(&db, rollback::JournalBarrier::Unlinking)
                .map(drop)
                .map_err(|_| FsError::EIO);
        }
        let Some((db, is_wal)) = database_of(rel) else {
            return Ok(());
        };
        if is_wal || self.capture.is_captured(&db) {
            self.capture
                .on_barrier(&wal_path(&db), true)
                .map_err(|_| FsError::EIO)?;
        }
        if is_wal {
            self.capture.wal_replaced(&db);
        } else if deleted {
            self.capture.deleted(&db).map_err(|_| FsError::EIO)?;
        } else {
            self.capture.replacing(&db);
        }
        Ok(())
    }

    /// The relative path of `file` and, for a `-journal`, its database.
    fn journal_of(file: &Node<'_>) -> Option<PathBuf> {
        file.relative_path()
            .ok()
            .and_then(|r| rollback::database_of_journal(&r))
    }
}

impl Observer for CaptureObserver {
    fn created(&self, dir: &Node<'_>, name: &OsStr, _file: &Node<'_>) -> FsResult<()> {
        // A new `-wal` announces a WAL-mode database; a new database file is empty and is
        // registered at its first barrier, once it has a header.
        if name.as_bytes().ends_with(b"-wal") {
            let rel = dir.relative_path().map(|d| d.join(name));
            if let Some((db, true)) = rel.as_deref().ok().and_then(database_of) {
                self.capture.wal_replaced(&db);
            }
            return self.barrier(rel, false);
        }
        Ok(())
    }

    fn syncing(&self, file: &Node<'_>) -> FsResult<()> {
        // A database fsync ends a checkpoint's backfill: stage the rest of the WAL now and
        // start making it durable beside the database's own fsync (`synced` waits for it).
        let Ok(rel) = file.relative_path() else {
            return Ok(());
        };
        match database_of(&rel) {
            Some((_, false)) => self
                .capture
                .on_db_syncing(&rel)
                .map(drop)
                .map_err(|_| FsError::EIO),
            _ => Ok(()),
        }
    }

    fn synced(&self, file: &Node<'_>) -> FsResult<()> {
        if let Some(db) = Self::journal_of(file) {
            // PERSIST mode's commit point: the zeroed header is synced.
            return self
                .capture
                .on_journal(&db, rollback::JournalBarrier::Synced)
                .map(drop)
                .map_err(|_| FsError::EIO);
        }
        // A `-wal` fsync (every commit with synchronous=FULL, and a checkpoint's first
        // step) leaves the frames in the WAL (see `new`); a database fsync ends a
        // checkpoint's backfill, after which the WAL may restart, so what was staged must
        // then be durable.
        let rel = file.relative_path();
        let is_wal = rel
            .as_ref()
            .ok()
            .and_then(|r| database_of(r))
            .is_some_and(|(_, is_wal)| is_wal);
        if is_wal && !self.stage_at_commit {
            if let Some((db, _)) = rel.as_ref().ok().and_then(|r| database_of(r)) {
                self.capture.wal_synced(&db);
            }
            return Ok(());
        }
        self.barrier(rel, !is_wal)
    }

    fn truncated(&self, file: &Node<'_>, _size: u64) -> FsResult<()> {
        if let Some(db) = Self::journal_of(file) {
            // TRUNCATE mode's commit point.
            return self
                .capture
                .on_journal(&db, rollback::JournalBarrier::Truncated)
                .map(drop)
                .map_err(|_| FsError::EIO);
        }
        let rel = file.relative_path().map_err(|_| FsError::EIO)?;
        match database_of(&rel) {
            // A checkpoint's truncation of the database (or one outside SQLite's
            // protocol, or a VACUUM's, whose journal commit stages it anyway). The WAL is
            // caught up first. It is not made durable here: the frames stay in the `-wal`
            // until the checkpoint's database fsync, which follows and makes the staging
            // durable beside its own (with synchronous=OFF there is none, and SQLite
            // itself promises no durability). When the checkpoint began with a `-wal`
            // fsync (synchronous=NORMAL or FULL), its database fsync is still to come
            // and reads everything this would: the truncation (SQLite's size hint grows
            // the file before the backfill) then costs the application nothing here.
            Some((db, false)) => {
                if self.capture.fsync_follows(&db) {
                    return Ok(());
                }
                self.barrier(Ok(wal_path(&db)), false)?;
                self.capture
                    .on_db_changed(&rel, false)
                    .map(drop)
                    .map_err(|_| FsError::EIO)
            }
            _ => self.barrier(Ok(rel), true),
        }
    }

    fn unlinking(&self, dir: &Node<'_>, name: &OsStr) -> FsResult<()> {
        let rel = dir.relative_path().map_err(|_| FsError::EIO)?.join(name);
        self.removing(&rel, true)
    }

    fn renaming(
        &self,
        dir: &Node<'_>,
        name: &OsStr,
        new_dir: &Node<'_>,
        new_name: &OsStr,
    ) -> FsResult<()> {
        let from = dir.relative_path().map_err(|_| FsError::EIO)?.join(name);
        let to = new_dir
            .relative_path()
            .map_err(|_| FsError::EIO)?
            .join(new_name);
        self.removing(&from, true)?;
        // A database renamed over is replaced: `renamed` registers the new file, whose
        // content continues the same history.
        self.removing(&to, false)
    }

    fn renamed(&self, new_dir: &Node<'_>, new_name: &OsStr) {
        let Ok(to) = new_dir.relative_path().map(|d| d.join(new_name)) else {
            return;
        };
        if let Some((_, false)) = database_of(&to) {
            if let Err(e) = self.capture.on_db_changed(&to, true) {
                tracing::error!(db = %to.display(), "cannot capture the file renamed into place: {e}");
            }
        }
    }

    fn released(&self, file: &Node<'_>, wrote: bool) {
        if !wrote {
            return;
        }
        let Ok(rel) = file.relative_path() else {
            return;
        };
        // A database written and closed: changes without a journal (MEMORY, OFF), and
        // writes outside SQLite's protocol (`cp`, `cat`, `dd`). A stat filter keeps this
        // cheap for programs that open and close per request.
        let res = match database_of(&rel) {
            Some((_, false)) => self.capture.on_db_changed(&rel, true),
            _ => self.capture.on_changed(&rel),
        };
        if let Err(e) = res {
            tracing::error!(file = %rel.display(), "capture at close failed: {e}");
        }
    }
}

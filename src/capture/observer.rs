//! The [`Observer`] that connects the FUSE layer to a mount's [`Capture`]: it routes each
//! barrier on a database's files to the registry, and decides what an application sees
//! when staging fails there.
//!
//! The contract (docs/SEMANTICS.md, "Replication never changes what the application
//! sees"): a state that capture cannot follow never reaches the application (the registry
//! restarts that database's history instead), and neither does a staging failure (a full
//! disk, an I/O error in the staging directory). When staging cannot make a barrier's
//! transactions durable (an fsync of the database, a `-wal` truncation, a rollback
//! journal's commit by truncation or fsync), the barrier goes on, walfs logs an ERROR with
//! the cause, and the database's history restarts from a snapshot once staging works again
//! (the watcher retries it), so the replica catches up even when the application writes no
//! more; the same holds at a barrier that no barrier may follow (a close, a rename, a
//! removal). A creation, unlink or rename is never refused.
//!
//! With synchronous replication of a database (`crate::replica::sync`), each barrier that
//! makes a commit durable then waits until the replica holds it; only
//! `--sync-timeout-action eio` lets that wait fail the barrier (an fsync, a truncation, or
//! the unlink of a DELETE-mode journal), and with it a staging failure at such a barrier
//! fails it too: its commit cannot reach the replica.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::rollback::{self, JournalBarrier};
use super::{database_of, wal_path, Barrier, Capture, CaptureEvent};
use crate::fs::observer::{Node, Observer};
use crate::fs::{FsError, FsResult};
use crate::staging::StagingResult;

/// What synchronous commits wait with: the replica's side of synchronous replication
/// (`crate::replica::sync`, wired by `crate::replicate`).
pub trait CommitWaiter: Send + Sync {
    /// Whether commits of `db` (relative to the backing root) wait for the replica.
    fn applies_to(&self, db: &Path) -> bool;
    /// Waits until every replica holds `db` up to `txid`; `known_uploaded` reads what
    /// staging records the replica to hold. False: the barrier fails with EIO (already
    /// logged).
    fn wait(&self, db: &Path, txid: u64, known_uploaded: &dyn Fn() -> Option<u64>) -> bool;
    /// Whether a commit that cannot be replicated fails with EIO (`--sync-timeout-action
    /// eio`) rather than returning unreplicated.
    fn fails_commits(&self) -> bool;
}

/// The observer that connects the FUSE layer to a [`Capture`].
pub struct CaptureObserver {
    capture: Arc<Capture>,
    stage_at_commit: bool,
    sync: Option<Arc<dyn CommitWaiter>>,
    /// When a staging failure at a durable barrier was last logged, per database: a
    /// writer on a full disk meets one at every fsync, and one line a minute says it.
    failure_logged: parking_lot::Mutex<std::collections::HashMap<PathBuf, std::time::Instant>>,
}

/// How often a staging failure at the durable barriers of one database is logged.
const FAILURE_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl CaptureObserver {
    /// Connects `capture`. A `-wal` fsync (each commit with `synchronous=FULL`, and a
    /// checkpoint's first step) is a capture barrier only with `stage_at_commit`; otherwise
    /// the WAL watcher reads those commits within milliseconds, beside the writer. That
    /// loses nothing: the frames stay in the `-wal` until a checkpoint has backfilled them
    /// all, which ends with an ftruncate and (unless `synchronous=OFF`) an fsync of the
    /// database file, and those are barriers at which the capture catches up (and, at the
    /// fsync, makes the staging durable) before SQLite may restart the log. With `sync`,
    /// the databases it applies to stage at every `-wal` fsync, and their durable
    /// barriers wait for the replica.
    pub fn new(
        capture: Arc<Capture>,
        stage_at_commit: bool,
        sync: Option<Arc<dyn CommitWaiter>>,
    ) -> CaptureObserver {
        CaptureObserver {
            capture,
            stage_at_commit,
            sync,
            failure_logged: parking_lot::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Whether commits of `db` wait for the replica.
    fn is_sync(&self, db: &Path) -> bool {
        self.sync.as_ref().is_some_and(|w| w.applies_to(db))
    }

    /// After a barrier of `db` made its commits durable locally (`res` is the barrier's
    /// result): with synchronous replication of `db`, waits until the replica holds what
    /// capture staged. Fails only with `--sync-timeout-action eio`, after the timeout
    /// (logged once by the wait).
    fn replicated(&self, db: &Path, res: FsResult<()>) -> FsResult<()> {
        res?;
        let Some(waiter) = self.sync.as_ref().filter(|w| w.applies_to(db)) else {
            return Ok(());
        };
        let Some(txid) = self.capture.staged_txid(db).filter(|&t| t > 0) else {
            return Ok(());
        };
        let known_uploaded = || {
            let state = self.capture.staging().state(db).ok().flatten();
            state.map(|s| s.uploaded_txid).filter(|&t| t > 0)
        };
        if waiter.wait(db, txid, &known_uploaded) {
            Ok(())
        } else {
            Err(FsError::eio_logged())
        }
    }

    pub fn capture(&self) -> &Arc<Capture> {
        &self.capture
    }

    /// A barrier whose transactions must be durable before `op` on `rel` (a file of `db`)
    /// returns. A staging failure does not fail it: it is logged with its cause, and the
    /// history of `db` restarts from a snapshot once staging works again. Only a database
    /// replicated synchronously with `--sync-timeout-action eio` fails it with EIO (its
    /// commit cannot reach the replica), logged here.
    fn durable(
        &self,
        op: &str,
        rel: &Path,
        db: &Path,
        res: StagingResult<Vec<CaptureEvent>>,
    ) -> FsResult<()> {
        let Err(e) = res else {
            return Ok(());
        };
        self.capture
            .stats()
            .failures
            .fetch_add(1, Ordering::Relaxed);
        if self
            .sync
            .as_ref()
            .is_some_and(|w| w.applies_to(db) && w.fails_commits())
        {
            tracing::error!(
                file = %rel.display(),
                "{op} fails with EIO: staging cannot make the captured transactions durable ({e}), so the commit cannot reach the replica (--sync-timeout-action eio); {}",
                e.hint()
            );
            return Err(FsError::eio_logged());
        }
        let due = {
            let mut logged = self.failure_logged.lock();
            let now = std::time::Instant::now();
            let due = logged
                .get(db)
                .is_none_or(|t| now.duration_since(*t) >= FAILURE_LOG_EVERY);
            if due {
                logged.insert(db.to_path_buf(), now);
            }
            due
        };
        if due {
            tracing::error!(
                file = %rel.display(),
                "staging cannot make the captured transactions durable at {op} ({e}); the {op} goes on, and the replica of {} restarts from a snapshot once staging works again (said at most once a minute): {}",
                db.display(),
                e.hint()
            );
        }
        self.restart_later(op, rel, &e);
        Ok(())
    }

    /// A point where capture catches up but nothing has to be durable yet, and a barrier
    /// follows (the fsync after a checkpoint's first step, a journal's commit): a staging
    /// failure is logged, and that barrier stages the same transactions.
    fn lenient(&self, op: &str, rel: &Path, res: StagingResult<Vec<CaptureEvent>>) {
        if let Err(e) = res {
            tracing::warn!(file = %rel.display(), "staging failed at {op} ({e}); the next barrier retries");
        }
    }

    /// A close or rename, after which no barrier may follow: a staging failure is logged,
    /// and the database restarts from a snapshot once staging works again.
    fn closing(&self, op: &str, rel: &Path, res: StagingResult<Vec<CaptureEvent>>) {
        if let Err(e) = res {
            tracing::warn!(file = %rel.display(), "staging failed at {op} ({e}); the replica restarts from a snapshot once staging works again");
            self.restart_later(op, rel, &e);
        }
    }

    /// After staging failed at a barrier of `rel`: its database's history restarts from a
    /// snapshot of what SQLite reads once staging works again (the watcher retries it), so
    /// that the replica catches up even if no barrier follows (a writer that closed, a
    /// MEMORY or OFF journal whose only barriers failed).
    fn restart_later(&self, op: &str, rel: &Path, e: &crate::staging::StagingError) {
        let db = rollback::database_of_journal(rel).or_else(|| database_of(rel).map(|(db, _)| db));
        if let Some(db) = db {
            self.capture.defer_restart(
                &db,
                &format!("staging failed at {op} of {}: {e}", rel.display()),
            );
        }
    }

    /// A removal or rename, which is never refused: if staging fails, the history of `db`
    /// restarts from a snapshot once staging works again.
    fn unrefused(&self, op: &str, rel: &Path, db: &Path, res: StagingResult<Vec<CaptureEvent>>) {
        if let Err(e) = res {
            tracing::error!(
                file = %rel.display(),
                "staging failed at {op} ({e}); the {op} goes on, and the replica of {} restarts from a snapshot once staging works again",
                db.display()
            );
            self.capture.defer_restart(
                db,
                &format!("staging failed at {op} of {}: {e}", rel.display()),
            );
        }
    }

    /// The path of `node` relative to the backing root, if it can be found (a file
    /// removed behind walfs's back may have none); without it there is nothing to capture.
    fn relative(node: &Node<'_>) -> Option<PathBuf> {
        node.relative_path().ok()
    }

    /// A removal or rename of `rel`: capture first; forget a database that goes away
    /// (`deleted`: and mark it deleted in the replica, unless another file replaces it).
    /// Fails only the unlink of a journal whose commit synchronous replication could not
    /// replicate (see [`CaptureObserver::replicated`]).
    fn removing(&self, op: &str, rel: &Path, deleted: bool) -> FsResult<()> {
        if let Some(db) = rollback::database_of_journal(rel) {
            // DELETE mode's commit point (and the end of a hot journal's rollback).
            let res = self
                .capture
                .on(&db, Barrier::Journal(JournalBarrier::Unlinking));
            self.unrefused(op, rel, &db, res);
            if op == "unlink" {
                return self.replicated(&db, Ok(()));
            }
            return Ok(());
        }
        let Some((db, is_wal)) = database_of(rel) else {
            return Ok(());
        };
        if is_wal || self.capture.is_captured(&db) {
            let res = self.capture.on(&wal_path(&db), Barrier::WalDurable);
            self.unrefused(op, rel, &db, res);
        }
        if is_wal {
            self.capture.wal_removing(&db);
        } else if deleted {
            self.capture.deleted(&db);
        } else {
            self.capture.replacing(&db);
        }
        Ok(())
    }
}

impl Observer for CaptureObserver {
    fn created(&self, dir: &Node<'_>, name: &OsStr, _file: &Node<'_>) {
        // A new `-journal` begins a rollback journal transaction.
        if name.as_bytes().ends_with(b"-journal") {
            let rel = Self::relative(dir).map(|d| d.join(name));
            if let Some(db) = rel.as_deref().and_then(rollback::database_of_journal) {
                let res = self.capture.on(&db, Barrier::JournalCreated);
                self.lenient("create", &db, res);
            }
            return;
        }
        // A new `-wal` announces a WAL-mode database; a new database file is empty and is
        // registered at its first barrier, once it has a header.
        if !name.as_bytes().ends_with(b"-wal") {
            return;
        }
        let Some(rel) = Self::relative(dir).map(|d| d.join(name)) else {
            return;
        };
        if let Some((db, true)) = database_of(&rel) {
            self.capture.wal_replaced(&db);
        }
        let res = self.capture.on(&rel, Barrier::WalCatchUp);
        self.lenient("create", &rel, res);
    }

    fn syncing(&self, file: &Node<'_>) {
        // A database fsync ends a checkpoint's backfill: stage the rest of the WAL now and
        // start making it durable beside the database's own fsync (`synced` waits for it,
        // and fails the fsync if staging still fails then).
        let Some(rel) = Self::relative(file) else {
            return;
        };
        if let Some((_, false)) = database_of(&rel) {
            let res = self.capture.on(&rel, Barrier::DbSyncing);
            self.lenient("fsync", &rel, res);
        }
    }

    fn synced(&self, file: &Node<'_>) -> FsResult<()> {
        let Some(rel) = Self::relative(file) else {
            return Ok(());
        };
        if let Some(db) = rollback::database_of_journal(&rel) {
            // PERSIST mode's commit point: the zeroed header is synced.
            let res = self
                .capture
                .on(&db, Barrier::Journal(JournalBarrier::Synced));
            return self.replicated(&db, self.durable("fsync", &rel, &db, res));
        }
        let Some((db, is_wal)) = database_of(&rel) else {
            return Ok(());
        };
        // A `-wal` fsync (every commit with synchronous=FULL, and a checkpoint's first
        // step) leaves the frames in the WAL (see `new`); a database fsync ends a
        // checkpoint's backfill, after which the WAL may restart, so what was staged must
        // then be durable.
        if is_wal && !self.stage_at_commit && !self.is_sync(&db) {
            self.capture.wal_synced(&db);
            return Ok(());
        }
        let barrier = if is_wal {
            Barrier::WalCatchUp
        } else {
            Barrier::DbSynced
        };
        let res = self.capture.on(&rel, barrier);
        self.replicated(&db, self.durable("fsync", &rel, &db, res))
    }

    fn truncated(&self, file: &Node<'_>, _size: u64) -> FsResult<()> {
        let Some(rel) = Self::relative(file) else {
            return Ok(());
        };
        if let Some(db) = rollback::database_of_journal(&rel) {
            // TRUNCATE mode's commit point.
            let res = self
                .capture
                .on(&db, Barrier::Journal(JournalBarrier::Truncated));
            return self.replicated(&db, self.durable("truncate", &rel, &db, res));
        }
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
                let res = self.capture.on(&wal_path(&db), Barrier::WalCatchUp);
                self.lenient("truncate", &rel, res);
                let res = self.capture.on(&rel, Barrier::DbResized);
                self.lenient("truncate", &rel, res);
                Ok(())
            }
            // The `-wal` is truncated: the frames it held go, so what was staged of them
            // must be durable.
            Some((db, true)) => {
                let res = self.capture.on(&rel, Barrier::WalDurable);
                self.replicated(&db, self.durable("truncate", &rel, &db, res))
            }
            None => Ok(()),
        }
    }

    fn unlinking(&self, dir: &Node<'_>, name: &OsStr) -> FsResult<()> {
        match Self::relative(dir).map(|d| d.join(name)) {
            Some(rel) => self.removing("unlink", &rel, true),
            None => Ok(()),
        }
    }

    fn renaming(&self, dir: &Node<'_>, name: &OsStr, new_dir: &Node<'_>, new_name: &OsStr) {
        if let Some(from) = Self::relative(dir).map(|d| d.join(name)) {
            let _ = self.removing("rename", &from, true);
        }
        // A database renamed over is replaced: `renamed` registers the new file, whose
        // content continues the same history.
        if let Some(to) = Self::relative(new_dir).map(|d| d.join(new_name)) {
            let _ = self.removing("rename", &to, false);
        }
    }

    fn renamed(&self, new_dir: &Node<'_>, new_name: &OsStr) {
        let Some(to) = Self::relative(new_dir).map(|d| d.join(new_name)) else {
            return;
        };
        if let Some((_, false)) = database_of(&to) {
            let res = self.capture.on(&to, Barrier::DbClosed);
            self.closing("rename", &to, res);
        }
    }

    fn released(&self, file: &Node<'_>, wrote: bool) {
        if !wrote {
            return;
        }
        let Some(rel) = Self::relative(file) else {
            return;
        };
        if let Some(db) = rollback::database_of_journal(&rel) {
            let res = self.capture.on(&db, Barrier::JournalClosed);
            self.closing("close", &db, res);
            return;
        }
        // A database written and closed: changes without a journal (MEMORY, OFF), and
        // writes outside SQLite's protocol (`cp`, `cat`, `dd`). A stat filter keeps this
        // cheap for programs that open and close per request.
        let res = match database_of(&rel) {
            Some((_, false)) => self.capture.on(&rel, Barrier::DbClosed),
            Some((_, true)) => self.capture.on(&rel, Barrier::WalClosed),
            None => Ok(Vec::new()),
        };
        self.closing("close", &rel, res);
    }
}

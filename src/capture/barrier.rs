//! The events at which capture catches up with a database, as the FUSE layer reports them
//! ([`Barrier`]), and what each one asks of a capture step. `observer.rs` turns FUSE
//! operations into barriers; the registry dispatches each one in one place
//! ([`Capture::on`](super::Capture::on)), and so does the database's capture
//! ([`DatabaseCapture::on`](super::DatabaseCapture::on)).

use super::rollback::JournalBarrier;

/// A point at which capture catches up with one database. The path that comes with it is
/// the database file's or its `-wal`'s, relative to the backing root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barrier {
    /// The `-wal` is read up to here, and its frames stay in it: it was just created, or
    /// fsynced with `--stage-at-commit`, or a checkpoint truncated the database.
    WalCatchUp,
    /// The `-wal` may lose its frames after this (it is truncated, unlinked or renamed, or
    /// the database goes): read up to here, and make what was staged durable.
    WalDurable,
    /// The database file is about to be fsynced: in WAL mode a checkpoint's end, whose
    /// staging starts to become durable beside the database's own fsync.
    DbSyncing,
    /// The database file was fsynced: a checkpoint's end in WAL mode; in rollback mode the
    /// end of a transaction's writes, or the commit itself when there is no journal.
    DbSynced,
    /// The database file was truncated or extended outside a checkpoint (or by one that
    /// no database fsync follows).
    DbResized,
    /// The database file was written and closed, or renamed into place.
    DbClosed,
    /// A barrier on the database's `-journal`: a rollback-journal commit point.
    Journal(JournalBarrier),
    /// A `-journal` was created: a rollback transaction begins.
    JournalCreated,
    /// A handle of the `-journal` that wrote was closed.
    JournalClosed,
    /// A handle of the `-wal` that wrote was closed.
    WalClosed,
    /// The `-wal` changed between barriers (the WAL watcher saw it).
    WalChanged,
}

/// How one capture step runs: what a [`Barrier`] asks, or what the daemon asks of its own
/// steps (a restart of a history, retried in the background).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Step {
    /// A database that capture does not follow yet is registered, if its file holds an
    /// SQLite header (otherwise the step concerns databases already captured only).
    pub registers: bool,
    /// The application is blocked in a barrier on the database's files, so a history
    /// waiting to restart may restart here.
    pub blocks_application: bool,
    /// A writer just closed the database file (or renamed it into place): a file that is
    /// no longer SQLite then stops being captured.
    pub at_close: bool,
}

impl Step {
    /// A step of the daemon's own, for databases already captured, with no application
    /// waiting.
    pub(super) const BACKGROUND: Step = Step {
        registers: false,
        blocks_application: false,
        at_close: false,
    };
}

impl Barrier {
    /// How a capture step runs at this barrier.
    pub(super) fn step(self) -> Step {
        Step {
            registers: !matches!(
                self,
                Barrier::DbSyncing | Barrier::JournalCreated | Barrier::JournalClosed
            ),
            blocks_application: matches!(
                self,
                Barrier::WalCatchUp
                    | Barrier::WalDurable
                    | Barrier::DbSyncing
                    | Barrier::DbSynced
                    | Barrier::DbResized
                    | Barrier::Journal(_)
                    | Barrier::JournalCreated
            ),
            at_close: self == Barrier::DbClosed,
        }
    }

    /// Whether this barrier ends a checkpoint that the registry may be tracking.
    pub(super) fn ends_checkpoint(self) -> bool {
        matches!(
            self,
            Barrier::WalCatchUp | Barrier::WalDurable | Barrier::DbSynced
        )
    }
}

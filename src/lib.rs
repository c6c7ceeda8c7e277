//! walfs: a FUSE filesystem that mirrors a backing directory so that any unmodified SQLite
//! program under the mountpoint can be replicated and restored.
//!
//! Data flows one way through the modules:
//! - `fs`: the FUSE layer, a passthrough mirror with a hook at SQLite's barriers;
//! - `sqlite`: SQLite's on-disk formats (database header, WAL, rollback journal);
//! - `replica`: the replica format (LTX) and, later, its object layout, upload,
//!   compaction and retention;
//! - `mount`: the `walfs mount` lifecycle (checks, session, signals).

pub mod fs;
pub mod mount;
pub mod replica;
pub mod sqlite;

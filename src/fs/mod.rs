//! The FUSE layer: a mirror of a backing directory that passes every operation through,
//! with kernel passthrough for file data. `filesystem` holds the logic, `fuse` adapts it to
//! `fuser`, `observer` is the hook where per-database capture attaches, and `database_io`
//! chooses how database files are served, and `inode`, `sys`, `error`, `metrics` and
//! `log_filter` support them.

pub mod database_io;
pub mod error;
pub mod filesystem;
pub mod fuse;
pub mod inode;
pub mod log_filter;
pub mod metrics;
pub mod observer;
pub mod sys;

pub use database_io::DatabaseIo;
pub use error::{FsError, FsResult};
pub use filesystem::{FsConfig, IoMode, PassthroughFs};
pub use observer::{NoObserver, Observer};

//! The hook through which per-database capture watches the filesystem. The FUSE layer knows
//! nothing about SQLite or replication: at SQLite's barriers (fsync, truncate, unlink, rename)
//! and at create and close, it calls an `Observer` before replying to the kernel. An observer
//! that cannot make a barrier's captured transactions durable returns an error from
//! [`Observer::synced`] or [`Observer::truncated`], and the application's operation fails
//! with it (EIO) instead of the replica silently diverging; nothing else can fail.

use std::cell::OnceCell;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};

use super::error::FsResult;
use super::inode::Inode;

/// A file or directory under the mount, as the observer sees it during one operation.
pub struct Node<'a> {
    pub(super) inode: &'a Inode,
    pub(super) root: &'a Path,
    /// The path found by the first [`Node::backing_path`] of this operation (a readlink of
    /// `/proc/self/fd`, a few µs that an fsync's two hooks would otherwise pay twice).
    pub(super) path: OnceCell<PathBuf>,
    /// The mount's rename/unlink generation when the operation began.
    pub(super) generation: u64,
}

impl Node<'_> {
    /// The node's current absolute path in the backing directory. It follows renames through
    /// the mount at once, and renames made directly in the backing directory within a
    /// second.
    pub fn backing_path(&self) -> io::Result<PathBuf> {
        if let Some(p) = self.path.get() {
            return Ok(p.clone());
        }
        let p = self
            .inode
            .cached_path(self.generation, || super::sys::fd_path(self.inode.fd()))?;
        Ok(self.path.get_or_init(|| p).clone())
    }

    /// The node's current path relative to the backing root (empty for the root).
    pub fn relative_path(&self) -> io::Result<PathBuf> {
        let abs = self.backing_path()?;
        Ok(abs.strip_prefix(self.root).unwrap_or(&abs).to_path_buf())
    }

    /// The FUSE node id.
    pub fn nodeid(&self) -> u64 {
        self.inode.nodeid
    }
}

/// Called by the filesystem at barriers, after the backing operation (or just before it, for
/// removals and [`Observer::syncing`]) and before the reply. Every method defaults to doing
/// nothing. Only [`Observer::synced`], [`Observer::truncated`] and [`Observer::unlinking`]
/// can fail the application's operation (a barrier whose captured transactions cannot be
/// made durable, or, with synchronous replication, replicated); a creation or rename is
/// never refused for the observer's sake, which the types say.
pub trait Observer: Send + Sync + 'static {
    /// A regular file was created (or opened with O_CREAT) in `dir`.
    fn created(&self, _dir: &Node<'_>, _name: &OsStr, _file: &Node<'_>) {}
    /// `fsync`/`fdatasync` on `file` is about to reach the backing file; work the observer
    /// starts here overlaps with it. [`Observer::synced`] follows if it succeeds.
    fn syncing(&self, _file: &Node<'_>) {}
    /// `fsync`/`fdatasync` on `file` reached the backing file.
    fn synced(&self, _file: &Node<'_>) -> FsResult<()> {
        Ok(())
    }
    /// `file` was truncated (or extended) to `size` bytes.
    fn truncated(&self, _file: &Node<'_>, _size: u64) -> FsResult<()> {
        Ok(())
    }
    /// `name` in `dir` is about to be unlinked; it can still be read. An error fails the
    /// unlink, which is then not made.
    fn unlinking(&self, _dir: &Node<'_>, _name: &OsStr) -> FsResult<()> {
        Ok(())
    }
    /// `name` in `dir` is about to be renamed to `new_name` in `new_dir`.
    fn renaming(&self, _dir: &Node<'_>, _name: &OsStr, _new_dir: &Node<'_>, _new_name: &OsStr) {}
    /// A rename to `new_name` in `new_dir` succeeded (after [`Observer::renaming`]).
    fn renamed(&self, _new_dir: &Node<'_>, _new_name: &OsStr) {}
    /// The last reference to an open of `file` went away; `wrote` says whether the
    /// handle was opened for writing.
    fn released(&self, _file: &Node<'_>, _wrote: bool) {}
}

/// The observer of a plain mirror: watches nothing.
pub struct NoObserver;

impl Observer for NoObserver {}

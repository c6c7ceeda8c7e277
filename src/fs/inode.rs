//! The inode table: which backing file each FUSE node id stands for, and how many lookups
//! the kernel holds on it. Each node keeps an `O_PATH` descriptor of its backing file, so it
//! follows renames and hard links without walfs tracking paths. Node ids are the backing
//! inode numbers where they can be (so `stat` shows the same `st_ino` as the backing
//! directory), and synthetic ids for files on other devices.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use fuser::BackingId;
use parking_lot::{Mutex, RwLock};

use super::database_io::{UseCounters, UseHistory};
use super::error::{FsError, FsResult};

/// The FUSE node id of the mount's root.
pub const ROOT_ID: u64 = 1;

/// Synthetic node ids start here, far above real inode numbers.
const SYNTHETIC_BASE: u64 = 1 << 62;

/// A backing file's identity: device and inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
}

impl FileKey {
    pub fn of(st: &libc::stat) -> FileKey {
        FileKey {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// One node the kernel knows about.
pub struct Inode {
    pub nodeid: u64,
    pub key: FileKey,
    /// File type bits (`S_IFMT`) of the backing file.
    pub kind: u32,
    fd: OwnedFd,
    /// Lookups the kernel holds; changed only under the table's write lock.
    lookups: AtomicU64,
    /// How the kernel serves the data of this file's open handles.
    pub io: Mutex<OpenIo>,
    /// Requests that `--database-io auto` weighs, counted in the current open period.
    pub usage: UseCounters,
    /// The backing path last read for this node (see [`Inode::cached_path`]).
    path: Mutex<Option<CachedPath>>,
}

/// How the open handles of one file have their data served. The kernel refuses to mix
/// passthrough and page-cache opens of one inode (the open fails with `EIO`), so the first
/// open decides and later opens follow it until every handle is closed.
#[derive(Default)]
pub struct OpenIo {
    /// The kernel passthrough registration shared by the open handles, while they use it.
    pub backing: Weak<BackingId>,
    /// Open handles served through the kernel page cache (reads and writes reach walfs).
    pub cached: u32,
    /// The backing file as the last page-cache handle left it: while it still looks the
    /// same, the kernel's cached pages of the file are current and the next open keeps them.
    pub cache_stamp: Option<Stamp>,
    /// What `--database-io auto` learned from the file's earlier open periods.
    pub history: UseHistory,
}

/// What changes when a file's content changes: size, modification and change times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub fn of(st: &libc::stat) -> Stamp {
        Stamp {
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// A path read from `/proc/self/fd`, with the namespace generation it was read under.
struct CachedPath {
    generation: u64,
    read_at: Instant,
    path: PathBuf,
}

/// How long a cached path is trusted without a rename or unlink through the mount: renames
/// made directly in the backing directory are seen within this time, as names and
/// attributes are (`--cache-ttl`).
const PATH_TTL: Duration = Duration::from_secs(1);

impl Inode {
    /// The `O_PATH` descriptor of the backing file.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn is_regular(&self) -> bool {
        self.kind == libc::S_IFREG
    }

    /// The node's backing path, read with `readlink` of its descriptor in `/proc/self/fd`
    /// (several µs, on every fsync of a busy database) unless it was read at the same
    /// `generation` of the mount's namespace (see [`PathGeneration`]) less than a second
    /// ago.
    pub fn cached_path(
        &self,
        generation: u64,
        read: impl FnOnce() -> std::io::Result<PathBuf>,
    ) -> std::io::Result<PathBuf> {
        if let Some(c) = &*self.path.lock() {
            if c.generation == generation && c.read_at.elapsed() < PATH_TTL {
                return Ok(c.path.clone());
            }
        }
        let read_at = Instant::now();
        let path = read()?;
        *self.path.lock() = Some(CachedPath {
            generation,
            read_at,
            path: path.clone(),
        });
        Ok(path)
    }
}

/// Counts renames and removals through the mount, the operations that change the path of
/// a file already known. A path read under one value stays right until the counter moves
/// (it moves after the backing operation, so a path read before that carries the older
/// value).
#[derive(Default)]
pub struct PathGeneration(AtomicU64);

impl PathGeneration {
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Call after a rename, unlink or rmdir reached the backing directory.
    pub fn changed(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
struct Tables {
    by_id: HashMap<u64, Arc<Inode>>,
    by_key: HashMap<FileKey, u64>,
}

pub struct InodeTable {
    root_dev: u64,
    tables: RwLock<Tables>,
    next_synthetic: AtomicU64,
}

impl InodeTable {
    /// A table holding only the root, whose `O_PATH` descriptor is `root_fd`.
    pub fn new(root_fd: OwnedFd, root_stat: &libc::stat) -> InodeTable {
        let key = FileKey::of(root_stat);
        let root = Arc::new(Inode {
            nodeid: ROOT_ID,
            key,
            kind: root_stat.st_mode & libc::S_IFMT,
            fd: root_fd,
            lookups: AtomicU64::new(u64::MAX / 2),
            io: Mutex::new(OpenIo::default()),
            usage: UseCounters::default(),
            path: Mutex::new(None),
        });
        let mut tables = Tables::default();
        tables.by_id.insert(ROOT_ID, root);
        tables.by_key.insert(key, ROOT_ID);
        InodeTable {
            root_dev: key.dev,
            tables: RwLock::new(tables),
            next_synthetic: AtomicU64::new(SYNTHETIC_BASE),
        }
    }

    pub fn get(&self, nodeid: u64) -> FsResult<Arc<Inode>> {
        self.tables
            .read()
            .by_id
            .get(&nodeid)
            .cloned()
            .ok_or(FsError::ESTALE)
    }

    pub fn root(&self) -> Arc<Inode> {
        self.get(ROOT_ID).expect("the root is never forgotten")
    }

    /// The node id a directory entry with inode number `ino` shows, as `readdir` reports it.
    pub fn id_for_listing(&self, ino: u64) -> u64 {
        let root = self.root();
        if ino == root.key.ino {
            ROOT_ID
        } else {
            ino
        }
    }

    /// Records one kernel lookup of the backing file behind `fd` (with stat `st`), adding a
    /// node for it if the kernel did not know it yet. `fd` is dropped if a node exists.
    pub fn lookup_of(&self, fd: OwnedFd, st: &libc::stat) -> Arc<Inode> {
        let key = FileKey::of(st);
        let mut tables = self.tables.write();
        if let Some(id) = tables.by_key.get(&key) {
            let inode = tables.by_id[id].clone();
            inode.lookups.fetch_add(1, Ordering::Relaxed);
            return inode;
        }
        let nodeid = if key.dev == self.root_dev
            && key.ino > ROOT_ID
            && key.ino < SYNTHETIC_BASE
            && !tables.by_id.contains_key(&key.ino)
        {
            key.ino
        } else {
            self.next_synthetic.fetch_add(1, Ordering::Relaxed)
        };
        let inode = Arc::new(Inode {
            nodeid,
            key,
            kind: st.st_mode & libc::S_IFMT,
            fd,
            lookups: AtomicU64::new(1),
            io: Mutex::new(OpenIo::default()),
            usage: UseCounters::default(),
            path: Mutex::new(None),
        });
        tables.by_id.insert(nodeid, inode.clone());
        tables.by_key.insert(key, nodeid);
        inode
    }

    /// The kernel dropped `count` lookups of `nodeid`; the node goes when none remain.
    pub fn forget(&self, nodeid: u64, count: u64) {
        if nodeid == ROOT_ID {
            return;
        }
        let removed = {
            let mut tables = self.tables.write();
            let Some(inode) = tables.by_id.get(&nodeid) else {
                return;
            };
            let left = inode.lookups.load(Ordering::Relaxed).saturating_sub(count);
            inode.lookups.store(left, Ordering::Relaxed);
            if left > 0 {
                return;
            }
            let key = inode.key;
            if tables.by_key.get(&key) == Some(&nodeid) {
                tables.by_key.remove(&key);
            }
            tables.by_id.remove(&nodeid)
        };
        // Closing the last descriptor of an unlinked file frees it in the backing
        // filesystem, which can take a while: never under the table lock.
        drop(removed);
    }

    /// Number of nodes the kernel holds, the root included (never zero).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.tables.read().by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A cached path is reused only under the same generation; a rename or unlink through
    /// the mount (the generation moving) or a failed read makes the next call read again.
    #[test]
    fn cached_path_follows_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let fd: OwnedFd = std::fs::File::open(dir.path()).unwrap().into();
        let st = super::super::sys::fstat(fd.as_fd()).unwrap();
        let table = InodeTable::new(fd, &st);
        let root = table.get(ROOT_ID).unwrap();
        let names = PathGeneration::default();
        let reads = Cell::new(0);
        let read = |p: &str| {
            reads.set(reads.get() + 1);
            Ok(PathBuf::from(p))
        };
        let g = names.current();
        assert_eq!(
            root.cached_path(g, || read("/a")).unwrap(),
            PathBuf::from("/a")
        );
        assert_eq!(
            root.cached_path(g, || read("/b")).unwrap(),
            PathBuf::from("/a")
        );
        assert_eq!(reads.get(), 1);
        names.changed();
        let g = names.current();
        assert_eq!(
            root.cached_path(g, || read("/b")).unwrap(),
            PathBuf::from("/b")
        );
        assert_eq!(reads.get(), 2);
        assert!(root
            .cached_path(g + 1, || Err(std::io::Error::other("gone")))
            .is_err());
        assert_eq!(
            root.cached_path(g, || read("/c")).unwrap(),
            PathBuf::from("/b")
        );
    }
}

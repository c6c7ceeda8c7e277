//! What a follower mount shows: a read-only tree of the replica's databases, the files
//! open on it, and the POSIX read locks SQLite readers take on them.
//!
//! This module owns [`Namespace`]. The databases come and go as the applier
//! (`super::apply`) finds them in the replica or finds their deletion markers; a file that
//! is open when its database goes keeps serving what it served. Inode numbers are never
//! reused.
//!
//! Each open file reads one version of its database ([`super::versions`]), its *pin*,
//! which moves to the latest version only where a read transaction of SQLite starts:
//! - when the file's process takes SQLite's shared lock through it (the mount asks the
//!   kernel to forward POSIX locks, `FUSE_POSIX_LOCKS`);
//! - when SQLite reads the 16 bytes at offset 24 (the file change counter and what follows
//!   it), which each connection does as its transaction starts, after its shared lock and
//!   a `stat` of the file; this covers a second connection of a process whose shared lock
//!   another connection already holds, which takes no lock of its own. It does not move
//!   to a version larger than that `stat` said (a version published in between): SQLite
//!   would take the file for corrupt;
//! - at the file's first read.
//!
//! A pin is dropped when its process releases its shared lock (no connection of it is in a
//! read transaction), or when the file is closed. So a read transaction sees one state,
//! however many versions arrive during it, and nothing older is kept than an open
//! transaction needs. The mount is read-only, so no one asks for a write lock (the kernel
//! refuses one on a read-only descriptor before it reaches walfs).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::versions::FollowedDb;

/// The inode of the mount's root directory.
pub const ROOT_INO: u64 = 1;

/// The first byte of SQLite's shared-lock range (`SHARED_FIRST`, after the pending and
/// reserved bytes at 1 GiB): a lock owner holding a read lock over it is inside a read
/// transaction.
pub const SHARED_FIRST: u64 = 0x4000_0002;

/// The read SQLite's pager makes as a read transaction starts (`sqlite3PagerSharedLock`):
/// the 16 bytes at offset 24 (change counter, size, freelist), to tell whether its cache
/// is still valid.
const TRANSACTION_START_READ: (u64, u32) = (24, 16);

/// What a node is.
#[derive(Clone)]
pub enum Node {
    Dir,
    Db(Arc<FollowedDb>),
}

struct Entry {
    node: Node,
    parent: u64,
    name: String,
    children: BTreeMap<String, u64>,
}

/// An open file.
struct Handle {
    ino: u64,
    db: Arc<FollowedDb>,
}

/// A directory entry: (inode, name, is a directory).
pub type DirEntry = (u64, String, bool);

/// The read locks of one owner on one file, as inclusive byte ranges.
type Ranges = Vec<(u64, u64)>;

/// The tree, the open files and the locks.
pub struct Namespace {
    tree: RwLock<Tree>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// (inode, lock owner) → its read locks.
    locks: Mutex<HashMap<(u64, u64), Ranges>>,
    /// File handle → the lock owner (process) that last read or locked through it.
    fh_owner: Mutex<HashMap<u64, u64>>,
    /// (inode, thread) → the size the thread's last `stat` of the file answered.
    stat_sizes: Mutex<HashMap<(u64, u32), u64>>,
}

struct Tree {
    entries: HashMap<u64, Entry>,
    next_ino: u64,
}

impl Default for Namespace {
    fn default() -> Self {
        Self::new()
    }
}

impl Namespace {
    pub fn new() -> Namespace {
        let mut entries = HashMap::new();
        entries.insert(
            ROOT_INO,
            Entry {
                node: Node::Dir,
                parent: ROOT_INO,
                name: String::new(),
                children: BTreeMap::new(),
            },
        );
        Namespace {
            tree: RwLock::new(Tree {
                entries,
                next_ino: ROOT_INO + 1,
            }),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            locks: Mutex::new(HashMap::new()),
            fh_owner: Mutex::new(HashMap::new()),
            stat_sizes: Mutex::new(HashMap::new()),
        }
    }

    /// Thread `tid` was told that file `ino` has `size` bytes (a `stat`).
    pub fn stat_answered(&self, ino: u64, tid: u32, size: u64) {
        let mut m = self.stat_sizes.lock();
        // Threads that stat without reading leave theirs behind: keep it bounded.
        if m.len() >= 4096 {
            m.clear();
        }
        m.insert((ino, tid), size);
    }

    /// Shows `db` at `path` (`a/b.db`), creating its directories.
    pub fn insert(&self, path: &str, db: Arc<FollowedDb>) {
        let mut t = self.tree.write();
        let mut parent = ROOT_INO;
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let existing = t.entries[&parent].children.get(*part).copied();
            let ino = match existing {
                Some(ino) if !last => ino,
                _ => {
                    let ino = t.next_ino;
                    t.next_ino += 1;
                    let node = if last {
                        Node::Db(db.clone())
                    } else {
                        Node::Dir
                    };
                    if let Some(old) = existing {
                        t.entries.remove(&old);
                    }
                    t.entries.insert(
                        ino,
                        Entry {
                            node,
                            parent,
                            name: part.to_string(),
                            children: BTreeMap::new(),
                        },
                    );
                    if let Some(p) = t.entries.get_mut(&parent) {
                        p.children.insert(part.to_string(), ino);
                    }
                    ino
                }
            };
            parent = ino;
        }
    }

    /// Hides the database at `path`, and the directories it leaves empty.
    pub fn remove(&self, path: &str) {
        let mut t = self.tree.write();
        let Some(mut ino) = Self::resolve(&t, path) else {
            return;
        };
        while ino != ROOT_INO {
            let Some(e) = t.entries.get(&ino) else { break };
            if !e.children.is_empty() {
                break;
            }
            let (parent, name) = (e.parent, e.name.clone());
            t.entries.remove(&ino);
            if let Some(p) = t.entries.get_mut(&parent) {
                p.children.remove(&name);
            }
            ino = parent;
        }
    }

    fn resolve(t: &Tree, path: &str) -> Option<u64> {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = *t.entries.get(&ino)?.children.get(part)?;
        }
        Some(ino)
    }

    /// The node named `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &str) -> Option<(u64, Node)> {
        let t = self.tree.read();
        let ino = *t.entries.get(&parent)?.children.get(name)?;
        Some((ino, t.entries.get(&ino)?.node.clone()))
    }

    /// The node of inode `ino`, if it is still shown.
    pub fn node(&self, ino: u64) -> Option<Node> {
        self.tree.read().entries.get(&ino).map(|e| e.node.clone())
    }

    /// The database an open file reads, whether or not it is still shown.
    pub fn handle_db(&self, fh: u64) -> Option<Arc<FollowedDb>> {
        self.handles.lock().get(&fh).map(|h| h.db.clone())
    }

    /// The parent of directory `ino`, and its entries after `.` and `..`.
    pub fn children(&self, ino: u64) -> Option<(u64, Vec<DirEntry>)> {
        let t = self.tree.read();
        let e = t.entries.get(&ino)?;
        let list = e
            .children
            .iter()
            .map(|(name, c)| {
                let dir = matches!(t.entries.get(c).map(|x| &x.node), Some(Node::Dir));
                (*c, name.clone(), dir)
            })
            .collect();
        Some((e.parent, list))
    }

    /// Opens database `ino`; the file handle.
    pub fn open(&self, ino: u64) -> Option<u64> {
        let Node::Db(db) = self.node(ino)? else {
            return None;
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle { ino, db });
        Some(fh)
    }

    /// Closes a file handle.
    pub fn release(&self, fh: u64) {
        if let Some(h) = self.handles.lock().remove(&fh) {
            h.db.unpin(fh);
        }
        self.fh_owner.lock().remove(&fh);
    }

    /// Reads through file handle `fh` (of process `owner`, when the kernel says; by thread
    /// `tid`) as it sees the file: at its pin, which moves to the latest version where a
    /// transaction starts (see the module documentation), but not to a version larger than
    /// the thread's `stat` just said.
    pub fn read(
        &self,
        fh: u64,
        owner: Option<u64>,
        tid: u32,
        offset: u64,
        size: u32,
    ) -> Option<std::io::Result<Vec<u8>>> {
        let (ino, db) = self
            .handles
            .lock()
            .get(&fh)
            .map(|h| (h.ino, h.db.clone()))?;
        if let Some(o) = owner {
            self.fh_owner.lock().insert(fh, o);
        }
        if (offset, size) == TRANSACTION_START_READ {
            let said = self.stat_sizes.lock().remove(&(ino, tid));
            db.pin_within(fh, said);
        } else {
            db.pin_if_unpinned(fh, || self.stat_sizes.lock().get(&(ino, tid)).copied());
        }
        Some(db.read(Some(fh), offset, size))
    }

    /// Applies a lock request (`F_RDLCK` or `F_UNLCK` over `start..=end`) of `owner`
    /// through `fh`. Taking SQLite's shared lock moves `fh`'s pin to the latest version;
    /// releasing it unpins every file of the owner on that database.
    pub fn set_lock(&self, fh: u64, owner: u64, start: u64, end: u64, lock: bool) -> bool {
        let Some((ino, db)) = self.handles.lock().get(&fh).map(|h| (h.ino, h.db.clone())) else {
            return false;
        };
        self.fh_owner.lock().insert(fh, owner);
        let (before, after) = {
            let mut locks = self.locks.lock();
            let ranges = locks.entry((ino, owner)).or_default();
            let before = covers(ranges, SHARED_FIRST);
            if lock {
                ranges.push((start, end));
            } else {
                *ranges = subtract(ranges, start, end);
            }
            let after = covers(ranges, SHARED_FIRST);
            if ranges.is_empty() {
                locks.remove(&(ino, owner));
            }
            (before, after)
        };
        match (before, after) {
            (false, true) => db.pin(fh),
            (true, false) => self.unpin_owner(ino, &db, owner),
            _ => {}
        }
        true
    }

    /// Unpins every open file of `owner` on database `ino`: none of its connections is in
    /// a read transaction.
    fn unpin_owner(&self, ino: u64, db: &FollowedDb, owner: u64) {
        let fhs: Vec<u64> = {
            let handles = self.handles.lock();
            let owners = self.fh_owner.lock();
            owners
                .iter()
                .filter(|(fh, o)| **o == owner && handles.get(fh).is_some_and(|h| h.ino == ino))
                .map(|(fh, _)| *fh)
                .collect()
        };
        for fh in fhs {
            db.unpin(fh);
        }
    }

    /// Drops every lock `owner` holds on the file of `fh` (POSIX: closing any descriptor
    /// of a file releases the process's locks on it).
    pub fn drop_locks(&self, fh: u64, owner: u64) {
        let Some((ino, db)) = self.handles.lock().get(&fh).map(|h| (h.ino, h.db.clone())) else {
            return;
        };
        let held = self.locks.lock().remove(&(ino, owner));
        if held.is_some_and(|r| covers(&r, SHARED_FIRST)) {
            self.unpin_owner(ino, &db, owner);
        }
    }

    /// Another owner's read lock overlapping `start..=end` of the file of `fh`, for
    /// `F_GETLK` of a write lock.
    pub fn conflicting_read_lock(
        &self,
        fh: u64,
        owner: u64,
        start: u64,
        end: u64,
    ) -> Option<(u64, u64)> {
        let ino = self.handles.lock().get(&fh)?.ino;
        let locks = self.locks.lock();
        locks
            .iter()
            .filter(|((i, o), _)| *i == ino && *o != owner)
            .flat_map(|(_, r)| r.iter())
            .find(|(s, e)| *s <= end && start <= *e)
            .copied()
    }
}

fn covers(ranges: &[(u64, u64)], byte: u64) -> bool {
    ranges.iter().any(|(s, e)| *s <= byte && byte <= *e)
}

/// `ranges` without `start..=end`.
fn subtract(ranges: &[(u64, u64)], start: u64, end: u64) -> Ranges {
    let mut out = Vec::new();
    for &(s, e) in ranges {
        if e < start || s > end {
            out.push((s, e));
            continue;
        }
        if s < start {
            out.push((s, start - 1));
        }
        if e > end {
            out.push((end + 1, e));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(dir: &std::path::Path, name: &str) -> Arc<FollowedDb> {
        let db = FollowedDb::new(dir.join(name)).unwrap();
        let path = db.base_path();
        std::fs::write(&path, vec![7u8; 1024]).unwrap();
        db.install_base(&path, 512, 2, 1).unwrap();
        Arc::new(db)
    }

    #[test]
    fn databases_appear_in_directories_and_go_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Namespace::new();
        ns.insert("a/b/c.db", db(dir.path(), "1"));
        ns.insert("top.db", db(dir.path(), "2"));
        let (a, _) = ns.lookup(ROOT_INO, "a").unwrap();
        let (b, _) = ns.lookup(a, "b").unwrap();
        let (c, node) = ns.lookup(b, "c.db").unwrap();
        assert!(matches!(node, Node::Db(_)));
        let fh = ns.open(c).unwrap();
        ns.remove("a/b/c.db");
        assert!(ns.lookup(ROOT_INO, "a").is_none(), "empty directories stay");
        assert!(ns.lookup(ROOT_INO, "top.db").is_some());
        // The open file still reads.
        assert_eq!(ns.read(fh, None, 1, 0, 16).unwrap().unwrap().len(), 16);
    }

    #[test]
    fn the_shared_lock_pins_the_files_of_its_process_until_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Namespace::new();
        let d = db(dir.path(), "1");
        ns.insert("x.db", d.clone());
        let (ino, _) = ns.lookup(ROOT_INO, "x.db").unwrap();
        let fh = ns.open(ino).unwrap();
        // SQLite: pending byte, then the shared range, then the pending byte released.
        ns.set_lock(fh, 9, 0x4000_0000, 0x4000_0000, true);
        assert_eq!(d.pinned(), (0, 0));
        ns.set_lock(fh, 9, SHARED_FIRST, SHARED_FIRST + 509, true);
        ns.set_lock(fh, 9, 0x4000_0000, 0x4000_0000, false);
        assert_eq!(d.pinned(), (1, 1));
        // A second connection of the process reads without a lock of its own: pinned at
        // its first read, moved at its transaction's start read.
        let fh2 = ns.open(ino).unwrap();
        ns.read(fh2, Some(9), 1, 0, 100).unwrap().unwrap();
        assert_eq!(d.pinned(), (2, 1));
        assert_eq!(
            ns.conflicting_read_lock(fh, 3, 0, u64::MAX),
            Some((SHARED_FIRST, SHARED_FIRST + 509))
        );
        // Unlock of the whole file: no connection of the process reads any more.
        ns.set_lock(fh, 9, 0, u64::MAX, false);
        assert_eq!(d.pinned(), (0, 0));
        // A close drops the locks too.
        ns.set_lock(fh, 9, SHARED_FIRST, SHARED_FIRST + 509, true);
        ns.drop_locks(fh, 9);
        assert_eq!(d.pinned(), (0, 0));
    }
}

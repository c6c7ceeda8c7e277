//! The follower's FUSE adapter: turns each `fuser` request into a call on the
//! [`Namespace`] and its result into the reply. It negotiates the kernel connection (POSIX
//! lock forwarding on, so that the follower sees SQLite's read locks) and opens every
//! database with direct I/O, so that each read reaches the version its reader is pinned
//! to rather than a page cache shared by all versions.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    IoctlFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLock, ReplyOpen, ReplyXattr, Request,
};

use super::namespace::{Namespace, Node, ROOT_INO};

/// Names and attributes are not cached by the kernel: sizes change with each version, and
/// databases come and go. (Caching a database's attributes, with the cache dropped before
/// each growth, made readers under concurrent updates see a malformed database in
/// `tests/follow.rs`: not understood yet, so not done.)
const TTL: Duration = Duration::ZERO;

/// How long the kernel may remember that a `-journal`, `-wal` or `-shm` file does not
/// exist: SQLite looks for them at every read transaction, and a follower never has them.
const COMPANION_TTL: Duration = Duration::from_secs(60);

/// Whether `name` is a companion file of a database, which a follower never shows.
fn is_companion(name: &str) -> bool {
    ["-journal", "-wal", "-shm"]
        .iter()
        .any(|s| name.ends_with(s))
}

pub struct FollowFuse {
    ns: Arc<Namespace>,
    uid: u32,
    gid: u32,
}

impl FollowFuse {
    pub fn new(ns: Arc<Namespace>) -> FollowFuse {
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FollowFuse { ns, uid, gid }
    }

    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        let (kind, perm, size, nlink) = match node {
            Node::Dir => (FileType::Directory, 0o555, 0, 2),
            Node::Db(db) => (FileType::RegularFile, 0o444, db.size(), 1),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for FollowFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        config
            .add_capabilities(InitFlags::FUSE_POSIX_LOCKS)
            .map_err(|_| {
                std::io::Error::other(
                    "the kernel does not forward POSIX locks to FUSE; a follower needs them to give readers consistent snapshots",
                )
            })?;
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match self.ns.lookup(parent.0, name) {
            Some((ino, node)) => reply.entry(&TTL, &self.attr(ino, &node), Generation(0)),
            // A negative entry (inode 0) the kernel keeps: no lookup of it for a while.
            None if is_companion(name) => {
                let mut attr = self.attr(0, &Node::Dir);
                attr.ino = INodeNo(0);
                reply.entry(&COMPANION_TTL, &attr, Generation(0))
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // An open file whose database went keeps its attributes.
        let node = self
            .ns
            .node(ino.0)
            .or_else(|| fh.and_then(|f| self.ns.handle_db(f.0)).map(Node::Db));
        match node {
            Some(node) => {
                let attr = self.attr(ino.0, &node);
                if let Node::Db(_) = node {
                    self.ns.stat_answered(ino.0, req.pid(), attr.size);
                }
                reply.attr(&TTL, &attr)
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.ns.node(ino.0) {
            Some(Node::Dir) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
            Some(Node::Db(_)) => match self.ns.open(ino.0) {
                Some(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
                None => reply.error(Errno::ENOENT),
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self
            .ns
            .read(fh.0, lock_owner.map(|o| o.0), req.pid(), offset, size)
        {
            Some(Ok(data)) => reply.data(&data),
            Some(Err(e)) => {
                tracing::error!("a follower read fails with EIO: {e}");
                reply.error(Errno::EIO)
            }
            None => reply.error(Errno::EBADF),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.ns.drop_locks(fh.0, lock_owner.0);
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(o) = lock_owner {
            self.ns.drop_locks(fh.0, o.0);
        }
        self.ns.release(fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some((parent, children)) = self.ns.children(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut all = vec![
            (ino.0, ".".to_string(), true),
            (
                if ino.0 == ROOT_INO { ROOT_INO } else { parent },
                "..".to_string(),
                true,
            ),
        ];
        all.extend(children);
        for (i, (child, name, dir)) in all.into_iter().enumerate().skip(offset as usize) {
            let kind = if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    /// No ioctl is served (SQLite probes for batch-atomic writes, F2FS's): ENOTTY, as on
    /// most filesystems, without fuser's "not implemented" warning.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    /// Databases under a follower carry no extended attributes.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        // Read locks never conflict with each other; a write lock would conflict with
        // another owner's read lock.
        let conflict = (typ == libc::F_WRLCK)
            .then(|| {
                self.ns
                    .conflicting_read_lock(fh.0, lock_owner.0, start, end)
            })
            .flatten();
        match conflict {
            Some((s, e)) => reply.locked(s, e, libc::F_RDLCK, 0),
            None => reply.locked(start, end, libc::F_UNLCK, 0),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        _sleep: bool,
        reply: ReplyEmpty,
    ) {
        let lock = match typ {
            libc::F_RDLCK => true,
            libc::F_UNLCK => false,
            // The mount is read-only.
            _ => return reply.error(Errno::EBADF),
        };
        if self.ns.set_lock(fh.0, lock_owner.0, start, end, lock) {
            reply.ok();
        } else {
            reply.error(Errno::EBADF);
        }
    }
}

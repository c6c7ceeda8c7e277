//! `PassthroughFs`: the logic of the mirror, with no FUSE plumbing. Every operation is a
//! method that takes plain values and returns `FsResult`, so tests reach it without a mount.
//! Each call is served by the matching system call on the backing directory, so results
//! and errors are the backing filesystem's own. Regular files are opened for kernel
//! passthrough when the kernel allows it: reads, writes and mmap then never reach walfs;
//! the barriers (fsync, truncate, unlink, rename) still do, and are reported to the
//! `Observer`.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{BackingId, FileAttr, FileType, TimeOrNow};
use parking_lot::{Mutex, RwLock};

use super::database_io::{DatabaseIo, FileKind};
use super::error::{FsError, FsResult};
use super::inode::{Inode, InodeTable, PathGeneration, Stamp};
use super::observer::{Node, Observer};
use super::sys;
use crate::sqlite::header::DB_HEADER_SIZE;

/// How regular files are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// Kernel passthrough: data I/O goes straight to the backing file.
    Passthrough,
    /// Every read and write is a request to walfs, served from its own descriptor, with
    /// the kernel page cache kept between opens.
    PageCache,
}

/// Settings of a `PassthroughFs`.
#[derive(Debug, Clone)]
pub struct FsConfig {
    pub read_only: bool,
    pub io_mode: IoMode,
    /// How long the kernel may cache names, attributes and absent names. Changes made
    /// through the mount are always seen at once; this only delays changes made to the
    /// backing directory behind walfs's back.
    pub cache_ttl: Duration,
    /// How files that hold an SQLite database are served while passthrough is on (see
    /// `PassthroughFs::data_path` and [`DatabaseIo`]).
    pub database_io: DatabaseIo,
}

/// Who is calling, for operations that create files.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Attribute changes requested by `setattr`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

/// A successful open.
pub struct Opened {
    pub fh: u64,
    /// Present when the kernel should serve this handle's I/O from the backing file.
    pub passthrough: Option<Arc<BackingId>>,
    /// Without passthrough: the kernel's cached pages of the file are current (opens of
    /// it are still open, or the file has not changed since the last one closed), so the
    /// kernel may keep them (`FOPEN_KEEP_CACHE`).
    pub keep_cache: bool,
}

/// How the kernel serves a new open's data (see `PassthroughFs::data_path`).
enum DataPath {
    Passthrough(Arc<BackingId>),
    Cached { keep_cache: bool },
}

/// Registers a backing descriptor for kernel passthrough (a `ReplyOpen::open_backing`).
pub type BackingRegistrar<'a> = &'a dyn Fn(BorrowedFd<'_>) -> std::io::Result<BackingId>;

/// An open regular file.
struct Handle {
    fd: OwnedFd,
    inode: Arc<Inode>,
    writable: bool,
    /// Served through the page cache (counted in the inode's `OpenIo::cached`).
    cached: bool,
    /// Keeps the kernel's passthrough registration alive while the handle is open.
    _passthrough: Option<Arc<BackingId>>,
}

/// An open directory.
struct DirHandle {
    fd: Mutex<OwnedFd>,
}

pub struct PassthroughFs {
    root_path: PathBuf,
    config: FsConfig,
    inodes: InodeTable,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    dirs: RwLock<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    passthrough: AtomicBool,
    observer: Arc<dyn Observer>,
    /// Moves at every rename and removal, so that cached node paths are read again.
    names: PathGeneration,
    daemon_uid: u32,
    daemon_gid: u32,
}

impl PassthroughFs {
    /// Mirrors the directory `root`.
    pub fn new(
        root: &Path,
        config: FsConfig,
        observer: Arc<dyn Observer>,
    ) -> std::io::Result<PassthroughFs> {
        let root_path = std::fs::canonicalize(root)?;
        let root_c = sys::cstr(root_path.as_os_str())?;
        let fd = sys::openat(None, &root_c, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let st = sys::fstat(fd.as_fd())?;
        Ok(PassthroughFs {
            root_path,
            passthrough: AtomicBool::new(config.io_mode == IoMode::Passthrough),
            config,
            inodes: InodeTable::new(fd, &st),
            handles: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            observer,
            names: PathGeneration::default(),
            // SAFETY: these calls cannot fail.
            daemon_uid: unsafe { libc::geteuid() },
            daemon_gid: unsafe { libc::getegid() },
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    /// Whether regular files are currently opened for kernel passthrough.
    pub fn passthrough_enabled(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Turns kernel passthrough off for every later open (the kernel refused it).
    pub fn disable_passthrough(&self) {
        self.passthrough.store(false, Ordering::Relaxed);
    }

    /// Number of nodes the kernel currently holds, the root included.
    pub fn node_count(&self) -> usize {
        self.inodes.len()
    }

    fn node<'a>(&'a self, inode: &'a Inode) -> Node<'a> {
        Node {
            inode,
            root: &self.root_path,
            path: Default::default(),
            generation: self.names.current(),
        }
    }

    fn check_writable(&self) -> FsResult<()> {
        if self.config.read_only {
            Err(FsError::EROFS)
        } else {
            Ok(())
        }
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        self.handles.read().get(&fh).cloned().ok_or(FsError::EBADF)
    }

    fn dir_handle(&self, fh: u64) -> FsResult<Arc<DirHandle>> {
        self.dirs.read().get(&fh).cloned().ok_or(FsError::EBADF)
    }

    /// Runs `f` with this thread's file-system identity set to the caller's, so files are
    /// created with the caller's owner and group and the backing filesystem's own rules.
    /// An unprivileged daemon cannot switch identity; its files are then owned by the user
    /// running walfs, as on any FUSE filesystem mounted by that user.
    fn as_caller<T>(&self, caller: Caller, f: impl FnOnce() -> FsResult<T>) -> FsResult<T> {
        let same = caller.uid == self.daemon_uid && caller.gid == self.daemon_gid;
        if same || self.daemon_uid != 0 {
            return f();
        }
        let groups = sys::process_groups(caller.pid);
        let _identity = sys::CallerIdentity::assume(caller.uid, caller.gid, &groups)?;
        f()
    }

    pub fn attr_of(&self, inode: &Inode, st: &libc::stat) -> FileAttr {
        stat_to_attr(inode.nodeid, st)
    }

    fn fresh_attr(&self, inode: &Inode) -> FsResult<FileAttr> {
        let st = sys::fstat(inode.fd())?;
        Ok(self.attr_of(inode, &st))
    }

    /// Adds a lookup of `name` in `parent` and returns the node with its attributes.
    fn lookup_child(&self, parent: &Inode, name: &CStr) -> FsResult<(Arc<Inode>, FileAttr)> {
        let fd = sys::open_path(parent.fd(), name)?;
        let st = sys::fstat(fd.as_fd())?;
        let inode = self.inodes.lookup_of(fd, &st);
        let attr = self.attr_of(&inode, &st);
        Ok((inode, attr))
    }

    // ---- names -------------------------------------------------------------------------

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<FileAttr> {
        let parent = self.inodes.get(parent)?;
        let name = sys::cstr(name)?;
        self.lookup_child(&parent, &name).map(|(_, attr)| attr)
    }

    pub fn forget(&self, nodeid: u64, count: u64) {
        self.inodes.forget(nodeid, count);
    }

    pub fn getattr(&self, nodeid: u64, fh: Option<u64>) -> FsResult<FileAttr> {
        let inode = self.inodes.get(nodeid)?;
        inode.usage.getattr();
        if let Some(handle) = fh.and_then(|fh| self.handle(fh).ok()) {
            let st = sys::fstat(handle.fd.as_fd())?;
            return Ok(self.attr_of(&inode, &st));
        }
        self.fresh_attr(&inode)
    }

    pub fn setattr(
        &self,
        caller: Caller,
        nodeid: u64,
        fh: Option<u64>,
        set: SetAttr,
    ) -> FsResult<FileAttr> {
        self.check_writable()?;
        let inode = self.inodes.get(nodeid)?;
        let handle = fh.and_then(|fh| self.handle(fh).ok());
        if set.uid.is_some() || set.gid.is_some() {
            sys::fchownat_fd(
                inode.fd(),
                set.uid.unwrap_or(u32::MAX),
                set.gid.unwrap_or(u32::MAX),
            )?;
        }
        if let Some(mode) = set.mode {
            match &handle {
                Some(h) => sys::fchmod(h.fd.as_fd(), mode & 0o7777)?,
                None => sys::chmod_path(&sys::proc_path(inode.fd()), mode & 0o7777)?,
            }
        }
        if let Some(size) = set.size {
            match &handle {
                Some(h) if h.writable => sys::ftruncate(h.fd.as_fd(), size)?,
                _ => sys::truncate_path(&sys::proc_path(inode.fd()), size)?,
            }
            // walfs truncates with its own privileges, which keep the bits; an
            // unprivileged caller's truncate(2) clears them on the bare disk.
            if caller.uid != 0 && inode.is_regular() {
                drop_set_id_bits(inode.fd(), caller)?;
            }
            self.observer.truncated(&self.node(&inode), size)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            sys::utimens(
                inode.fd(),
                true,
                set.atime.map(to_timespec),
                set.mtime.map(to_timespec),
            )?;
        }
        self.fresh_attr(&inode)
    }

    pub fn readlink(&self, nodeid: u64) -> FsResult<OsString> {
        let inode = self.inodes.get(nodeid)?;
        Ok(sys::readlink_fd(inode.fd())?)
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> FsResult<FileAttr> {
        self.check_writable()?;
        let parent = self.inodes.get(parent)?;
        let name = sys::cstr(name)?;
        self.as_caller(caller, || {
            Ok(sys::mknodat(parent.fd(), &name, mode, rdev as u64)?)
        })?;
        self.lookup_child(&parent, &name).map(|(_, attr)| attr)
    }

    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> FsResult<FileAttr> {
        self.check_writable()?;
        let parent = self.inodes.get(parent)?;
        let name = sys::cstr(name)?;
        self.as_caller(caller, || Ok(sys::mkdirat(parent.fd(), &name, mode)?))?;
        self.lookup_child(&parent, &name).map(|(_, attr)| attr)
    }

    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        target: &Path,
    ) -> FsResult<FileAttr> {
        self.check_writable()?;
        let parent = self.inodes.get(parent)?;
        let name = sys::cstr(name)?;
        let target = sys::cstr(target.as_os_str())?;
        self.as_caller(caller, || Ok(sys::symlinkat(&target, parent.fd(), &name)?))?;
        self.lookup_child(&parent, &name).map(|(_, attr)| attr)
    }

    pub fn link(&self, nodeid: u64, new_parent: u64, new_name: &OsStr) -> FsResult<FileAttr> {
        self.check_writable()?;
        let inode = self.inodes.get(nodeid)?;
        let new_parent = self.inodes.get(new_parent)?;
        let new_name = sys::cstr(new_name)?;
        sys::link_fd(inode.fd(), new_parent.fd(), &new_name)?;
        self.lookup_child(&new_parent, &new_name)
            .map(|(_, attr)| attr)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let parent = self.inodes.get(parent)?;
        self.observer.unlinking(&self.node(&parent), name)?;
        let res = sys::unlinkat(parent.fd(), &sys::cstr(name)?, 0);
        self.names.changed();
        Ok(res?)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let parent = self.inodes.get(parent)?;
        let res = sys::unlinkat(parent.fd(), &sys::cstr(name)?, libc::AT_REMOVEDIR);
        self.names.changed();
        Ok(res?)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        self.check_writable()?;
        let parent = self.inodes.get(parent)?;
        let new_parent = self.inodes.get(new_parent)?;
        self.observer
            .renaming(&self.node(&parent), name, &self.node(&new_parent), new_name);
        let res = sys::renameat2(
            parent.fd(),
            &sys::cstr(name)?,
            new_parent.fd(),
            &sys::cstr(new_name)?,
            flags,
        );
        self.names.changed();
        res?;
        self.observer.renamed(&self.node(&new_parent), new_name);
        Ok(())
    }

    // ---- files -------------------------------------------------------------------------

    /// Decides how the kernel serves the data of a new open `fd` of `inode`, and registers
    /// it: kernel passthrough (one registration per inode, shared by all its open
    /// handles, as the kernel requires) or the page cache. An inode with open
    /// handles keeps their mode. Otherwise a file that holds an SQLite database may go
    /// through the page cache, as `--database-io` says (`database_io.rs`): read
    /// transactions then cost no round trip (with passthrough, every read invalidates the
    /// inode's atime, and SQLite's `fstat` at the start of the next transaction asks walfs
    /// for it), and each page written costs one.
    fn data_path(
        &self,
        inode: &Inode,
        fd: BorrowedFd<'_>,
        flags: i32,
        register: Option<BackingRegistrar<'_>>,
    ) -> DataPath {
        if !inode.is_regular() {
            return DataPath::Cached { keep_cache: true };
        }
        let mut io = inode.io.lock();
        if let Some(id) = io.backing.upgrade() {
            return DataPath::Passthrough(id);
        }
        let cached = io.cached > 0 || !self.passthrough_enabled() || {
            // The first open of a new open period.
            let kind = file_kind(fd);
            match self.config.database_io {
                DatabaseIo::Passthrough => {
                    io.history.begin_unjudged_period(&inode.usage);
                    false
                }
                DatabaseIo::Cached => {
                    io.history.begin_unjudged_period(&inode.usage);
                    kind.is_database()
                }
                DatabaseIo::Auto if kind == FileKind::RollbackDatabase => {
                    let read_only = flags & libc::O_ACCMODE == libc::O_RDONLY;
                    let cached = io.history.begin_period(&inode.usage, read_only);
                    tracing::debug!(
                        nodeid = inode.nodeid,
                        cached,
                        history = ?io.history,
                        "database-io auto"
                    );
                    cached
                }
                DatabaseIo::Auto => {
                    io.history.begin_unjudged_period(&inode.usage);
                    false
                }
            }
        };
        if !cached {
            if let Some(register) = register {
                match register(fd) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        io.backing = Arc::downgrade(&id);
                        return DataPath::Passthrough(id);
                    }
                    Err(e) => {
                        if self.passthrough.swap(false, Ordering::Relaxed) {
                            tracing::warn!(
                                "kernel passthrough refused ({e}); passthrough is off, serving file I/O through walfs"
                            );
                        }
                    }
                }
            }
        }
        // The first page-cache open keeps the kernel's pages only if the file has not
        // changed since the last one closed (passthrough writes, or writes in BACKING
        // directly, do not reach those pages).
        let keep_cache = io.cached > 0
            || io
                .cache_stamp
                .is_some_and(|stamp| sys::fstat(fd).is_ok_and(|st| Stamp::of(&st) == stamp));
        io.cached += 1;
        DataPath::Cached { keep_cache }
    }

    fn add_handle(
        &self,
        inode: Arc<Inode>,
        fd: OwnedFd,
        flags: i32,
        register: Option<BackingRegistrar<'_>>,
    ) -> Opened {
        let (passthrough, keep_cache) = match self.data_path(&inode, fd.as_fd(), flags, register) {
            DataPath::Passthrough(id) => (Some(id), false),
            DataPath::Cached { keep_cache } => (None, keep_cache),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let handle = Arc::new(Handle {
            cached: inode.is_regular() && passthrough.is_none(),
            fd,
            inode,
            writable,
            _passthrough: passthrough.clone(),
        });
        self.handles.write().insert(fh, handle);
        Opened {
            fh,
            passthrough,
            keep_cache,
        }
    }

    pub fn open(
        &self,
        caller: Caller,
        nodeid: u64,
        flags: i32,
        register: Option<BackingRegistrar<'_>>,
    ) -> FsResult<Opened> {
        let writing = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writing {
            self.check_writable()?;
        }
        let inode = self.inodes.get(nodeid)?;
        let fd = sys::reopen(inode.fd(), own_flags(&inode, flags))?;
        if writing && caller.uid != 0 && inode.is_regular() {
            drop_set_id_bits(fd.as_fd(), caller)?;
        }
        if flags & libc::O_TRUNC != 0 && inode.is_regular() {
            self.observer.truncated(&self.node(&inode), 0)?;
        }
        Ok(self.add_handle(inode, fd, flags, register))
    }

    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        register: Option<BackingRegistrar<'_>>,
    ) -> FsResult<(FileAttr, Opened)> {
        self.check_writable()?;
        let parent = self.inodes.get(parent)?;
        let cname = sys::cstr(name)?;
        let fd = self.as_caller(caller, || {
            Ok(sys::openat(
                Some(parent.fd()),
                &cname,
                own_file_flags(flags | libc::O_CREAT) & !libc::O_NOCTTY,
                mode,
            )?)
        })?;
        // The O_PATH handle comes from the open file itself, so a concurrent rename
        // cannot make it name another file.
        let path_fd = sys::reopen_path(fd.as_fd())?;
        let st = sys::fstat(path_fd.as_fd())?;
        let inode = self.inodes.lookup_of(path_fd, &st);
        let attr = self.attr_of(&inode, &st);
        self.observer
            .created(&self.node(&parent), name, &self.node(&inode));
        let opened = self.add_handle(inode, fd, flags, register);
        Ok((attr, opened))
    }

    /// Reads through walfs's own descriptor (page-cache mode only).
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let handle = self.handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let n = sys::pread(handle.fd.as_fd(), &mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Writes through walfs's own descriptor (page-cache mode only).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.check_writable()?;
        let handle = self.handle(fh)?;
        handle.inode.usage.write();
        let n = sys::pwrite(handle.fd.as_fd(), data, offset)?;
        Ok(n as u32)
    }

    pub fn release(&self, fh: u64) {
        let handle = self.handles.write().remove(&fh);
        if let Some(handle) = handle {
            if handle.cached {
                let mut io = handle.inode.io.lock();
                io.cached -= 1;
                if io.cached == 0 {
                    io.cache_stamp = sys::fstat(handle.fd.as_fd()).ok().map(|st| Stamp::of(&st));
                }
            }
            self.observer
                .released(&self.node(&handle.inode), handle.writable);
        }
    }

    pub fn fsync(&self, nodeid: u64, fh: u64, datasync: bool) -> FsResult<()> {
        let inode = self.inodes.get(nodeid)?;
        inode.usage.sync();
        let node = self.node(&inode);
        self.observer.syncing(&node);
        match self.handle(fh) {
            Ok(h) => sys::fsync(h.fd.as_fd(), datasync)?,
            Err(_) => {
                let fd = sys::reopen(inode.fd(), libc::O_RDONLY)?;
                sys::fsync(fd.as_fd(), datasync)?;
            }
        }
        self.observer.synced(&node)
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        self.check_writable()?;
        let handle = self.handle(fh)?;
        sys::fallocate(handle.fd.as_fd(), mode, offset, length)?;
        if mode & (libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE) == 0 {
            let size = sys::fstat(handle.fd.as_fd())?.st_size as u64;
            self.observer.truncated(&self.node(&handle.inode), size)?;
        }
        Ok(())
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let handle = self.handle(fh)?;
        Ok(sys::lseek(handle.fd.as_fd(), offset, whence)?)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
        flags: u32,
    ) -> FsResult<u32> {
        self.check_writable()?;
        let input = self.handle(fh_in)?;
        let output = self.handle(fh_out)?;
        let n = sys::copy_file_range(
            input.fd.as_fd(),
            offset_in,
            output.fd.as_fd(),
            offset_out,
            len.min(u32::MAX as u64 & !0xfff),
            flags,
        )?;
        Ok(n as u32)
    }

    // ---- directories -------------------------------------------------------------------

    pub fn opendir(&self, nodeid: u64, flags: i32) -> FsResult<u64> {
        let inode = self.inodes.get(nodeid)?;
        let fd = sys::reopen(
            inode.fd(),
            (flags & !libc::O_ACCMODE) | libc::O_RDONLY | libc::O_DIRECTORY,
        )?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs
            .write()
            .insert(fh, Arc::new(DirHandle { fd: Mutex::new(fd) }));
        Ok(fh)
    }

    /// Entries of directory `nodeid` from `offset` on: `(node id, next offset, type,
    /// name)`. Uses the handle from `opendir` if there is one; without one (the kernel
    /// skips opendir when walfs declines it) the directory is opened for this call.
    pub fn readdir(
        &self,
        nodeid: u64,
        fh: u64,
        offset: i64,
    ) -> FsResult<Vec<(u64, i64, FileType, OsString)>> {
        let entries = match self.dir_handle(fh) {
            Ok(dir) => sys::read_dir_at(dir.fd.lock().as_fd(), offset)?,
            Err(_) => {
                let fd = self.open_dir_fd(nodeid)?;
                sys::read_dir_at(fd.as_fd(), offset)?
            }
        };
        Ok(entries
            .into_iter()
            .map(|e| {
                (
                    self.inodes.id_for_listing(e.ino),
                    e.next_offset,
                    dirent_type(e.kind),
                    e.name,
                )
            })
            .collect())
    }

    fn open_dir_fd(&self, nodeid: u64) -> FsResult<OwnedFd> {
        let inode = self.inodes.get(nodeid)?;
        Ok(sys::reopen(inode.fd(), libc::O_RDONLY | libc::O_DIRECTORY)?)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.write().remove(&fh);
    }

    pub fn fsyncdir(&self, nodeid: u64, fh: u64, datasync: bool) -> FsResult<()> {
        match self.dir_handle(fh) {
            Ok(dir) => Ok(sys::fsync(dir.fd.lock().as_fd(), datasync)?),
            Err(_) => Ok(sys::fsync(self.open_dir_fd(nodeid)?.as_fd(), datasync)?),
        }
    }

    pub fn statfs(&self, nodeid: u64) -> FsResult<libc::statvfs> {
        let inode = self.inodes.get(nodeid)?;
        Ok(sys::fstatvfs(inode.fd())?)
    }

    // ---- extended attributes -----------------------------------------------------------

    pub fn setxattr(&self, nodeid: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        self.check_writable()?;
        let inode = self.inodes.get(nodeid)?;
        Ok(sys::setxattr(
            &sys::proc_path(inode.fd()),
            &sys::cstr(name)?,
            value,
            flags,
        )?)
    }

    /// With `size` 0 returns a buffer of the value's length filled with zeros, for the
    /// size query; otherwise the value (ERANGE if it does not fit).
    pub fn getxattr(&self, nodeid: u64, name: &OsStr, size: u32) -> FsResult<Vec<u8>> {
        let inode = self.inodes.get(nodeid)?;
        let path = sys::proc_path(inode.fd());
        let name = sys::cstr(name)?;
        let mut buf = vec![0u8; size as usize];
        let n = sys::getxattr(&path, &name, &mut buf)?;
        buf.resize(n, 0);
        Ok(buf)
    }

    pub fn listxattr(&self, nodeid: u64, size: u32) -> FsResult<Vec<u8>> {
        let inode = self.inodes.get(nodeid)?;
        let mut buf = vec![0u8; size as usize];
        let n = sys::listxattr(&sys::proc_path(inode.fd()), &mut buf)?;
        buf.resize(n, 0);
        Ok(buf)
    }

    pub fn removexattr(&self, nodeid: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let inode = self.inodes.get(nodeid)?;
        Ok(sys::removexattr(
            &sys::proc_path(inode.fd()),
            &sys::cstr(name)?,
        )?)
    }
}

/// Open flags for walfs's own descriptor of `inode`. On a regular file it never has
/// O_DIRECT (the kernel sends requests with buffers and offsets of any alignment) nor
/// O_APPEND (the kernel puts appends at the end itself and sends that offset, and pages
/// written back from a shared mapping must land where they belong). With passthrough, the
/// kernel opens the backing file itself, with the caller's flags.
fn own_flags(inode: &Inode, flags: i32) -> i32 {
    if inode.is_regular() {
        own_file_flags(flags)
    } else {
        flags
    }
}

/// What the file open as `fd` holds, from its first 100 bytes (one read; a write-only
/// `fd` reads as not a database).
fn file_kind(fd: BorrowedFd<'_>) -> FileKind {
    let mut header = [0u8; DB_HEADER_SIZE];
    match sys::pread(fd, &mut header, 0) {
        Ok(n) => FileKind::of_header(&header[..n]),
        Err(_) => FileKind::Other,
    }
}

/// [`own_flags`] of a regular file.
fn own_file_flags(flags: i32) -> i32 {
    flags & !(libc::O_DIRECT | libc::O_APPEND)
}

fn to_timespec(t: TimeOrNow) -> libc::timespec {
    match t {
        TimeOrNow::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        TimeOrNow::SpecificTime(t) => {
            let (sec, nsec) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let mut sec = -(d.as_secs() as i64);
                    let mut nsec = d.subsec_nanos() as i64;
                    if nsec > 0 {
                        sec -= 1;
                        nsec = 1_000_000_000 - nsec;
                    }
                    (sec, nsec)
                }
            };
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            }
        }
    }
}

fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs((-sec) as u64) + Duration::from_nanos(nsec as u64)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn dirent_type(t: u8) -> FileType {
    match t {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// The FUSE attributes of a backing file, under node id `nodeid`.
pub fn stat_to_attr(nodeid: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: fuser::INodeNo(nodeid),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// Writes and truncations by an unprivileged user clear a file's set-user-ID and
/// set-group-ID bits ([`set_id_bits_a_write_clears`]), but walfs writes and truncates with
/// its own privileges, and passthrough writes never reach it: the bits are cleared when
/// such a user truncates the file, or opens it for writing (on the bare disk, at its first
/// write). `fd` may be an `O_PATH` descriptor.
fn drop_set_id_bits(fd: BorrowedFd<'_>, caller: Caller) -> FsResult<()> {
    let st = sys::fstat(fd)?;
    let kill = set_id_bits_a_write_clears(&st, caller);
    if kill != 0 {
        sys::chmod_path(&sys::proc_path(fd), st.st_mode & 0o7777 & !kill)?;
    }
    Ok(())
}

/// The bits an unprivileged write or truncate by `caller` clears from a file (`st`):
/// set-user-ID always; set-group-ID when the file is group-executable or the caller is
/// not in the file's group (the kernel's `setattr_should_drop_suidgid`).
fn set_id_bits_a_write_clears(st: &libc::stat, caller: Caller) -> u32 {
    let mode = st.st_mode;
    let mut kill = mode & libc::S_ISUID;
    if mode & libc::S_ISGID != 0 {
        let in_group =
            || caller.gid == st.st_gid || sys::process_groups(caller.pid).contains(&st.st_gid);
        if mode & libc::S_IXGRP != 0 || !in_group() {
            kill |= libc::S_ISGID;
        }
    }
    kill
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::inode::ROOT_ID;
    use crate::fs::observer::NoObserver;
    use std::sync::Mutex as StdMutex;

    fn fs_over(dir: &Path, observer: Arc<dyn Observer>) -> PassthroughFs {
        let config = FsConfig {
            read_only: false,
            io_mode: IoMode::PageCache,
            cache_ttl: Duration::from_secs(1),
            database_io: DatabaseIo::Cached,
        };
        PassthroughFs::new(dir, config, observer).unwrap()
    }

    fn me() -> Caller {
        // SAFETY: plain getters.
        unsafe {
            Caller {
                uid: libc::geteuid(),
                gid: libc::getegid(),
                pid: std::process::id(),
            }
        }
    }

    #[derive(Default)]
    struct Recorder(StdMutex<Vec<String>>);

    impl Observer for Recorder {
        fn synced(&self, file: &Node<'_>) -> FsResult<()> {
            let p = file.relative_path().unwrap();
            if p.ends_with("refuse") {
                return Err(FsError::EIO);
            }
            self.0.lock().unwrap().push(format!("sync {}", p.display()));
            Ok(())
        }
        fn truncated(&self, file: &Node<'_>, size: u64) -> FsResult<()> {
            let p = file.relative_path().unwrap();
            self.0
                .lock()
                .unwrap()
                .push(format!("truncate {} {size}", p.display()));
            Ok(())
        }
        fn unlinking(&self, dir: &Node<'_>, name: &OsStr) -> FsResult<()> {
            let p = dir.relative_path().unwrap().join(name);
            self.0
                .lock()
                .unwrap()
                .push(format!("unlink {}", p.display()));
            Ok(())
        }
    }

    #[test]
    fn create_write_read_without_a_mount() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fs_over(dir.path(), Arc::new(NoObserver));
        let (attr, opened) = fs
            .create(
                me(),
                ROOT_ID,
                OsStr::new("a.txt"),
                0o644,
                libc::O_RDWR,
                None,
            )
            .unwrap();
        assert!(opened.passthrough.is_none());
        assert_eq!(fs.write(opened.fh, 0, b"hello").unwrap(), 5);
        assert_eq!(fs.read(opened.fh, 1, 10).unwrap(), b"ello");
        fs.release(opened.fh);
        assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"hello");
        let st = std::fs::metadata(dir.path().join("a.txt")).unwrap();
        assert_eq!(attr.ino.0, std::os::unix::fs::MetadataExt::ino(&st));
        assert_eq!(fs.lookup(ROOT_ID, OsStr::new("nope")), Err(FsError::ENOENT));
    }

    #[test]
    fn barriers_reach_the_observer_with_paths_that_follow_renames() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Arc::new(Recorder::default());
        let fs = fs_over(dir.path(), rec.clone());
        let sub = fs.mkdir(me(), ROOT_ID, OsStr::new("sub"), 0o755).unwrap();
        let (attr, opened) = fs
            .create(
                me(),
                sub.ino.0,
                OsStr::new("x.db"),
                0o644,
                libc::O_RDWR,
                None,
            )
            .unwrap();
        fs.fsync(attr.ino.0, opened.fh, false).unwrap();
        fs.rename(
            sub.ino.0,
            OsStr::new("x.db"),
            ROOT_ID,
            OsStr::new("y.db"),
            0,
        )
        .unwrap();
        fs.setattr(
            me(),
            attr.ino.0,
            Some(opened.fh),
            SetAttr {
                size: Some(7),
                ..Default::default()
            },
        )
        .unwrap();
        fs.release(opened.fh);
        fs.unlink(ROOT_ID, OsStr::new("y.db")).unwrap();
        // An observer that cannot make a barrier durable fails it; a removal it cannot
        // refuse.
        let (r, ro) = fs
            .create(
                me(),
                ROOT_ID,
                OsStr::new("refuse"),
                0o644,
                libc::O_RDWR,
                None,
            )
            .unwrap();
        assert_eq!(fs.fsync(r.ino.0, ro.fh, false), Err(FsError::EIO));
        fs.release(ro.fh);
        fs.unlink(ROOT_ID, OsStr::new("refuse")).unwrap();
        assert!(!dir.path().join("refuse").exists());
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![
                "sync sub/x.db",
                "truncate y.db 7",
                "unlink y.db",
                "unlink refuse"
            ]
        );
    }

    #[test]
    fn forget_drops_nodes_and_hard_links_share_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"1").unwrap();
        let fs = fs_over(dir.path(), Arc::new(NoObserver));
        let a = fs.lookup(ROOT_ID, OsStr::new("f")).unwrap();
        let b = fs.link(a.ino.0, ROOT_ID, OsStr::new("g")).unwrap();
        assert_eq!(a.ino, b.ino);
        assert_eq!(b.nlink, 2);
        assert_eq!(fs.node_count(), 2);
        fs.forget(a.ino.0, 2);
        assert_eq!(fs.node_count(), 1);
        assert_eq!(fs.getattr(a.ino.0, None), Err(FsError::ESTALE));
    }

    #[test]
    fn read_only_refuses_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"1").unwrap();
        let config = FsConfig {
            read_only: true,
            io_mode: IoMode::PageCache,
            cache_ttl: Duration::from_secs(1),
            database_io: DatabaseIo::Cached,
        };
        let fs = PassthroughFs::new(dir.path(), config, Arc::new(NoObserver)).unwrap();
        let f = fs.lookup(ROOT_ID, OsStr::new("f")).unwrap();
        assert_eq!(
            fs.unlink(ROOT_ID, OsStr::new("f")).err(),
            Some(FsError::EROFS)
        );
        assert_eq!(
            fs.open(me(), f.ino.0, libc::O_RDWR, None).err(),
            Some(FsError::EROFS)
        );
        assert!(fs.open(me(), f.ino.0, libc::O_RDONLY, None).is_ok());
    }
}

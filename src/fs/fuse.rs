//! The FUSE adapter: turns each `fuser` request into one call on `PassthroughFs` and its
//! result into the reply. It holds no logic of its own beyond three things: negotiating the
//! kernel connection (passthrough, no POSIX lock forwarding, no writeback cache), a
//! tracing span and a metric for every operation, and mapping `FsError` to an errno, here
//! and nowhere else.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::error::{FsError, FsResult};
use super::filesystem::{stat_to_attr, Caller, Opened, PassthroughFs, SetAttr};
use super::metrics::{Metrics, Op};

/// Statfs magic of overlayfs: files on it are already one level of stacking deep.
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

pub struct FuseAdapter {
    fs: Arc<PassthroughFs>,
    metrics: Arc<Metrics>,
    /// The kernel agreed to skip opendir/releasedir when walfs declines opendir.
    no_opendir: bool,
}

impl FuseAdapter {
    pub fn new(fs: Arc<PassthroughFs>, metrics: Arc<Metrics>) -> FuseAdapter {
        FuseAdapter {
            fs,
            metrics,
            no_opendir: false,
        }
    }

    fn ttl(&self) -> Duration {
        self.fs.config().cache_ttl
    }

    /// Runs one operation inside its span and records its metric.
    fn run<T>(&self, op: Op, f: impl FnOnce() -> FsResult<T>) -> FsResult<T> {
        let _span = tracing::trace_span!("fuse", op = op.name()).entered();
        let start = Instant::now();
        let result = f();
        self.metrics.record(op, result.is_ok(), start.elapsed());
        if let Err(e) = &result {
            if e.needs_log() {
                // An EIO reaches the application: said once, with its cause.
                tracing::error!(
                    op = op.name(),
                    "{} fails with EIO: {}",
                    op.name(),
                    e.cause().unwrap_or("no cause recorded")
                );
            } else {
                tracing::trace!(op = op.name(), errno = e.errno(), "failed");
            }
        }
        result
    }

    fn reply_entry(&self, reply: ReplyEntry, result: FsResult<FileAttr>) {
        match result {
            Ok(attr) => reply.entry(&self.ttl(), &attr, Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// The one place an `FsError` becomes the errno the kernel returns to the application.
fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno())
}

/// fuser 0.18 decodes a time before 1970, `secs < 0` plus `nsecs`, as `-(|secs| + nsecs)`
/// (its `system_time_from_time`); this undoes that, so `utimensat` before 1970 with
/// nanoseconds sets the time asked for.
fn pre_epoch_fixed(t: TimeOrNow) -> TimeOrNow {
    match t {
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(_) => t,
            Err(e) => {
                let d = e.duration();
                TimeOrNow::SpecificTime(
                    UNIX_EPOCH - Duration::from_secs(d.as_secs())
                        + Duration::from_nanos(d.subsec_nanos() as u64),
                )
            }
        },
        TimeOrNow::Now => t,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

/// Flags for an open reply: no flush on close (walfs buffers nothing), and in page-cache
/// mode the kernel keeps the file's cached pages when they are current.
fn open_flags(opened: &Opened) -> FopenFlags {
    if opened.passthrough.is_none() && opened.keep_cache {
        FopenFlags::FOPEN_NOFLUSH | FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::FOPEN_NOFLUSH
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Lock forwarding (FUSE_POSIX_LOCKS, FUSE_FLOCK_LOCKS) and the writeback cache are
        // never requested: the kernel keeps SQLite's locks itself, and every write reaches
        // the backing file before write() returns.
        // HANDLE_KILLPRIV_V2 makes walfs responsible for clearing set-user-ID bits on
        // write, and in exchange lets the kernel mark the superblock SB_NOSEC, so it skips
        // the `security.capability` query (a round trip) on writes for as long as the
        // inode's attributes stay valid (each attribute refresh clears the flag again).
        // FUSE_ATOMIC_O_TRUNC is not requested: with it the kernel passes O_TRUNC in the
        // open and walfs truncated the file before the kernel checked ETXTBSY, so an
        // O_TRUNC open of a running executable failed but emptied the file anyway. Without
        // it the kernel checks first and then truncates with a setattr.
        let wanted = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        if let Err(missing) = config.add_capabilities(wanted) {
            let _ = config.add_capabilities(wanted - missing);
        }
        // Directories need no open handle: declining opendir saves two round trips each
        // time SQLite opens a directory to fsync it (every transaction in DELETE mode).
        self.no_opendir = config
            .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_ok();
        if self.fs.passthrough_enabled() {
            // Files on overlayfs (a container's own filesystem) are already stacked once.
            let on_overlay =
                super::sys::fs_type(self.fs.root_path()) == Some(OVERLAYFS_SUPER_MAGIC);
            let depth = if on_overlay { 2 } else { 1 };
            let passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(depth).is_ok();
            if passthrough {
                tracing::info!("kernel passthrough on: file data I/O bypasses walfs");
            } else {
                self.fs.disable_passthrough();
                tracing::warn!(
                    "the kernel does not offer FUSE passthrough; serving file I/O through walfs (slower)"
                );
            }
        } else {
            tracing::warn!("passthrough is off; serving file I/O through walfs (slower)");
        }
        if self.fs.passthrough_enabled() {
            // Only database files opened with `--database-io cached` use the page
            // cache, and their writes all go through walfs. FUSE_AUTO_INVAL_DATA would drop a file's whole cache at every
            // attribute refresh after a write (its mtime moved), and without
            // FUSE_EXPLICIT_INVAL_DATA every size change would too: a read-mostly
            // database would lose its cache at each commit. A change made in BACKING
            // directly is seen at the next open after the file's handles all closed
            // (`PassthroughFs::data_path`).
            let _ = config.add_capabilities(InitFlags::FUSE_EXPLICIT_INVAL_DATA);
        } else {
            // Every file in the page cache: drop cached pages when a file's mtime or
            // size changed behind walfs's back (in BACKING directly), as the cache TTL
            // promises.
            let _ = config.add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        tracing::info!(requests = %self.metrics.summary(), "unmounted");
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.run(Op::lookup, || self.fs.lookup(parent.0, name)) {
            Ok(attr) => reply.entry(&self.ttl(), &attr, Generation(0)),
            // A node id of 0 with a TTL is a cached negative entry: the kernel stops asking
            // for names that do not exist (SQLite's -journal, -wal) until one is created.
            Err(e) if e.errno() == libc::ENOENT => {
                // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
                let zero: libc::stat = unsafe { std::mem::zeroed() };
                reply.entry(&self.ttl(), &stat_to_attr(0, &zero), Generation(0));
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _ = self.run(Op::forget, || {
            self.fs.forget(ino.0, nlookup);
            Ok(())
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.run(Op::getattr, || self.fs.getattr(ino.0, fh.map(|f| f.0))) {
            Ok(attr) => reply.attr(&self.ttl(), &attr),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(pre_epoch_fixed),
            mtime: mtime.map(pre_epoch_fixed),
        };
        match self.run(Op::setattr, || {
            self.fs.setattr(caller(req), ino.0, fh.map(|f| f.0), set)
        }) {
            Ok(attr) => reply.attr(&self.ttl(), &attr),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        use std::os::unix::ffi::OsStrExt;
        match self.run(Op::readlink, || self.fs.readlink(ino.0)) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let result = self.run(Op::mknod, || {
            self.fs.mknod(caller(req), parent.0, name, mode, rdev)
        });
        self.reply_entry(reply, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.run(Op::mkdir, || {
            self.fs.mkdir(caller(req), parent.0, name, mode)
        });
        self.reply_entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.run(Op::unlink, || self.fs.unlink(parent.0, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.run(Op::rmdir, || self.fs.rmdir(parent.0, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = self.run(Op::symlink, || {
            self.fs.symlink(caller(req), parent.0, link_name, target)
        });
        self.reply_entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.run(Op::rename, || {
            self.fs
                .rename(parent.0, name, newparent.0, newname, flags.bits())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let result = self.run(Op::link, || self.fs.link(ino.0, newparent.0, newname));
        self.reply_entry(reply, result);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let register = |fd: std::os::fd::BorrowedFd<'_>| reply.open_backing(fd);
        let result = self.run(Op::open, || {
            self.fs.open(caller(req), ino.0, flags.0, Some(&register))
        });
        match result {
            Ok(opened) => match &opened.passthrough {
                Some(id) => {
                    reply.opened_passthrough(FileHandle(opened.fh), open_flags(&opened), id)
                }
                None => reply.opened(FileHandle(opened.fh), open_flags(&opened)),
            },
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.run(Op::read, || self.fs.read(fh.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.run(Op::write, || self.fs.write(fh.0, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _ = self.run(Op::flush, || Ok(()));
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _ = self.run(Op::release, || {
            self.fs.release(fh.0);
            Ok(())
        });
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.run(Op::fsync, || self.fs.fsync(ino.0, fh.0, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.no_opendir {
            // ENOSYS here tells the kernel to stop sending opendir and releasedir.
            let _ = self.run(Op::opendir, || Ok(()));
            return reply.error(Errno::ENOSYS);
        }
        match self.run(Op::opendir, || self.fs.opendir(ino.0, flags.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut offset = offset as i64;
        loop {
            let batch = match self.run(Op::readdir, || self.fs.readdir(ino.0, fh.0, offset)) {
                Ok(batch) => batch,
                Err(e) => return reply.error(errno(e)),
            };
            if batch.is_empty() {
                break;
            }
            for (id, next, kind, name) in batch {
                if reply.add(INodeNo(id), next as u64, kind, &name) {
                    return reply.ok();
                }
                offset = next;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _ = self.run(Op::releasedir, || {
            self.fs.releasedir(fh.0);
            Ok(())
        });
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.run(Op::fsyncdir, || self.fs.fsyncdir(ino.0, fh.0, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.run(Op::statfs, || self.fs.statfs(ino.0)) {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self.run(Op::setxattr, || self.fs.setxattr(ino.0, name, value, flags)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.run(Op::getxattr, || self.fs.getxattr(ino.0, name, size)) {
            Ok(value) if size == 0 => reply.size(value.len() as u32),
            Ok(value) => reply.data(&value),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.run(Op::listxattr, || self.fs.listxattr(ino.0, size)) {
            Ok(list) if size == 0 => reply.size(list.len() as u32),
            Ok(list) => reply.data(&list),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.run(Op::removexattr, || self.fs.removexattr(ino.0, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let register = |fd: std::os::fd::BorrowedFd<'_>| reply.open_backing(fd);
        let result = self.run(Op::create, || {
            self.fs
                .create(caller(req), parent.0, name, mode, flags, Some(&register))
        });
        match result {
            Ok((attr, opened)) => match &opened.passthrough {
                Some(id) => reply.created_passthrough(
                    &self.ttl(),
                    &attr,
                    Generation(0),
                    FileHandle(opened.fh),
                    open_flags(&opened),
                    id,
                ),
                None => reply.created(
                    &self.ttl(),
                    &attr,
                    Generation(0),
                    FileHandle(opened.fh),
                    open_flags(&opened),
                ),
            },
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.run(Op::fallocate, || {
            self.fs.fallocate(fh.0, offset, length, mode)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.run(Op::lseek, || self.fs.lseek(fh.0, offset, whence)) {
            Ok(pos) => reply.offset(pos),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self.run(Op::copy_file_range, || {
            self.fs.copy_file_range(
                fh_in.0,
                offset_in,
                fh_out.0,
                offset_out,
                len,
                flags.bits() as u32,
            )
        }) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// ioctls are not forwarded (docs/SEMANTICS.md): every one fails with ENOTTY, the
    /// answer of a file that has no such control, as ext4 gives for `isatty()` (TCGETS) on
    /// a regular file. Quietly: programs call `isatty()` on every file they open.
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
        let _ = self.run(Op::ioctl, || Err::<(), _>(FsError::ENOTTY));
        reply.error(Errno::ENOTTY);
    }
}

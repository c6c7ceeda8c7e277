//! File operations through a real walfs mount, each checked against the backing directory
//! (same bytes; same mode, size, nlink, uid/gid and st_ino; the same mtime where a test sets
//! it) and, for errors and semantics, against the same operations on a bare temporary
//! directory on the same kind of file system (same errno, same resulting tree).
//!
//! Covered: nested directories and readdir with file types (odd names too); a directory of
//! 2000 entries (readdir continuation, telldir/seekdir); create, write, read, O_APPEND,
//! O_TRUNC, O_EXCL, O_SYNC, O_DIRECT, fsync, copy_file_range, a 64 MiB file and a sparse
//! file past 4 GiB; files that existed in the backing directory before the mount; symlinks
//! and hard links; rename (within and across directories, over a file, RENAME_NOREPLACE,
//! RENAME_EXCHANGE); unlink and rmdir; truncate; fallocate (plain, KEEP_SIZE, PUNCH_HOLE,
//! ZERO_RANGE, SEEK_DATA/SEEK_HOLE); chmod, chown, access; utimensat with nanoseconds (also
//! before 1970); user.* extended attributes; statvfs; MAP_SHARED mmap (also of an O_APPEND
//! descriptor); reading an unlinked open file; creation modes under the caller's umask; and
//! a --read-only mount. Every test runs twice, with kernel passthrough and with
//! --no-passthrough (the page-cache fallback), each on its own mount.

mod common;

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Mount;

const PASSTHROUGH: &[&str] = &[];
const PAGE_CACHE: &[&str] = &["--no-passthrough"];

// ---- small system-call wrappers ----------------------------------------------------------

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: valid NUL-terminated paths.
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

fn truncate_path(p: &Path, len: i64) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: valid path.
    cvt(unsafe { libc::truncate(c.as_ptr(), len) })
}

fn fallocate(f: &File, mode: i32, offset: i64, len: i64) -> io::Result<()> {
    // SAFETY: plain integers on an open descriptor.
    cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, offset, len) })
}

fn lseek(f: &File, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain integers on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

fn utimensat(p: &Path, atime: libc::timespec, mtime: libc::timespec, flags: i32) -> io::Result<()> {
    let c = cpath(p);
    let times = [atime, mtime];
    // SAFETY: valid path and two timespecs.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) })
}

fn futimens(f: &File, atime: libc::timespec, mtime: libc::timespec) -> io::Result<()> {
    let times = [atime, mtime];
    // SAFETY: two valid timespecs.
    cvt(unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) })
}

fn mkfifo(p: &Path, mode: u32) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: valid path.
    cvt(unsafe { libc::mkfifo(c.as_ptr(), mode) })
}

fn mknod_regular(p: &Path, mode: u32) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: valid path.
    cvt(unsafe { libc::mknod(c.as_ptr(), libc::S_IFREG | mode, 0) })
}

fn access(p: &Path, how: i32) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: valid path.
    cvt(unsafe { libc::access(c.as_ptr(), how) })
}

fn copy_file_range(
    from: &File,
    off_in: i64,
    to: &File,
    off_out: i64,
    len: usize,
) -> io::Result<usize> {
    let (mut a, mut b) = (off_in, off_out);
    // SAFETY: valid descriptors and offset pointers for the duration of the call.
    cvt_size(unsafe {
        libc::copy_file_range(from.as_raw_fd(), &mut a, to.as_raw_fd(), &mut b, len, 0)
    })
}

fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid strings and slice.
    cvt(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid strings and slice.
    cvt(unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// getxattr with a buffer of `size` bytes (0: ask the size only, returned as zeros).
fn getxattr_sized(p: &Path, name: &str, size: usize) -> io::Result<Vec<u8>> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; size];
    // SAFETY: valid strings; the buffer is writable for its length.
    let got = cvt_size(unsafe {
        libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.resize(got, 0);
    Ok(buf)
}

fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let size = getxattr_sized(p, name, 0)?.len();
    getxattr_sized(p, name, size.max(1))
}

fn listxattr_sized(p: &Path, size: usize) -> io::Result<Vec<u8>> {
    let c = cpath(p);
    let mut buf = vec![0u8; size];
    // SAFETY: valid string; the buffer is writable for its length.
    let got =
        cvt_size(unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.resize(got, 0);
    Ok(buf)
}

/// Sorted names of the extended attributes of `p` (not following a symlink).
fn listxattr(p: &Path) -> io::Result<Vec<OsString>> {
    let size = listxattr_sized(p, 0)?.len();
    let raw = listxattr_sized(p, size.max(1))?;
    let mut names: Vec<OsString> = raw
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| OsStr::from_bytes(s).to_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid strings.
    cvt(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) })
}

fn statvfs(p: &Path) -> libc::statvfs {
    let c = cpath(p);
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: valid path and out-pointer.
    cvt(unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) }).unwrap();
    // SAFETY: statvfs succeeded.
    unsafe { st.assume_init() }
}

fn open_flags(f: &File) -> i32 {
    // SAFETY: plain integers on an open descriptor.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) }
}

/// A 4096-aligned heap buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len, 4096).unwrap()
    }

    fn new(len: usize) -> Aligned {
        // SAFETY: a non-zero size and a valid alignment.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) };
        assert!(!ptr.is_null());
        Aligned { ptr, len }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is `len` bytes and owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr, Self::layout(self.len)) }
    }
}

fn pwrite_raw(f: &File, buf: &[u8], offset: i64) -> io::Result<usize> {
    // SAFETY: the slice is readable for its length.
    cvt_size(unsafe { libc::pwrite(f.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) })
}

fn pread_raw(f: &File, buf: &mut [u8], offset: i64) -> io::Result<usize> {
    // SAFETY: the slice is writable for its length.
    cvt_size(unsafe { libc::pread(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) })
}

/// A MAP_SHARED mapping of a whole file.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(f: &File, len: usize, prot: i32) -> Map {
        // SAFETY: a fresh mapping of an open descriptor; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        Map {
            ptr: ptr.cast(),
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes long and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn sync(&self) {
        // SAFETY: the whole mapping.
        cvt(unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) }).unwrap();
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Deterministic content: every 8-byte word holds a mix of its own absolute offset, so a
/// block written or read at the wrong place shows.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    let start = offset & !7;
    let mut out = Vec::with_capacity(len + 16);
    let mut pos = start;
    while out.len() < len + (offset - start) as usize {
        let v = pos.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5bd1_e995_1234_5678;
        out.extend_from_slice(&v.to_le_bytes());
        pos += 8;
    }
    out.drain(..(offset - start) as usize);
    out.truncate(len);
    out
}

// ---- comparing ---------------------------------------------------------------------------

fn errno_of<T: Debug>(what: &str, r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("{what}: expected a failure, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: not an OS error: {e}")),
    }
}

fn errname(e: i32) -> String {
    format!("{} ({})", e, io::Error::from_raw_os_error(e))
}

/// Attributes that must be identical through the mount and in the backing directory.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Meta {
    mode: u32,
    size: u64,
    nlink: u64,
    uid: u32,
    gid: u32,
    ino: u64,
}

fn meta_of(md: &fs::Metadata) -> Meta {
    Meta {
        mode: md.mode(),
        size: md.size(),
        nlink: md.nlink(),
        uid: md.uid(),
        gid: md.gid(),
        ino: md.ino(),
    }
}

fn lmeta(p: &Path) -> Meta {
    meta_of(&fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display())))
}

/// lstat of `rel` through the mount and in the backing directory must agree.
fn assert_same_meta(m: &Mount, rel: &str) {
    let (a, b) = (lmeta(&m.path(rel)), lmeta(&m.backing_path(rel)));
    assert_eq!(
        a, b,
        "{rel}: attributes through walfs differ from the backing file"
    );
}

fn mtime_ns(md: &fs::Metadata) -> (i64, i64) {
    (md.mtime(), md.mtime_nsec())
}

fn atime_ns(md: &fs::Metadata) -> (i64, i64) {
    (md.atime(), md.atime_nsec())
}

/// One directory entry as `readdir` gives it: name, type (from d_type) and d_ino.
type Listed = (OsString, fs::FileType, u64);

fn listing(dir: &Path) -> Vec<Listed> {
    let mut v: Vec<Listed> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), e.file_type().unwrap(), e.ino())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[derive(Clone, Copy, PartialEq)]
enum Compare {
    /// Through the mount against the backing directory: the same files, so inode numbers
    /// match too.
    Backing,
    /// Through the mount against a bare directory where the same operations ran.
    Bare,
}

/// Recursively compares two trees: listings (names, d_type, and d_ino against the backing
/// directory), attributes, file contents, symlink targets and extended attributes; with
/// `mtimes`, also modification times to the nanosecond.
fn assert_same_tree(mnt: &Path, other: &Path, how: Compare, mtimes: bool) {
    let (a, b) = (listing(mnt), listing(other));
    let strip = |v: &[Listed]| -> Vec<(OsString, fs::FileType)> {
        v.iter().map(|(n, t, _)| (n.clone(), *t)).collect()
    };
    assert_eq!(
        strip(&a),
        strip(&b),
        "listing of {} differs from {}",
        mnt.display(),
        other.display()
    );
    for ((name, kind, ino_a), (_, _, ino_b)) in a.iter().zip(&b) {
        let (pa, pb) = (mnt.join(name), other.join(name));
        let (ma, mb) = (
            fs::symlink_metadata(&pa).unwrap(),
            fs::symlink_metadata(&pb).unwrap(),
        );
        let (mut xa, mut xb) = (meta_of(&ma), meta_of(&mb));
        if how == Compare::Backing {
            assert_eq!(ino_a, ino_b, "d_ino of {}", pa.display());
            assert_eq!(*ino_a, xa.ino, "d_ino and st_ino of {}", pa.display());
        } else {
            xa.ino = 0;
            xb.ino = 0;
        }
        assert_eq!(xa, xb, "attributes of {} vs {}", pa.display(), pb.display());
        if mtimes {
            assert_eq!(mtime_ns(&ma), mtime_ns(&mb), "mtime of {}", pa.display());
        }
        assert_eq!(
            listxattr(&pa).unwrap(),
            listxattr(&pb).unwrap(),
            "xattr names of {}",
            pa.display()
        );
        if kind.is_file() {
            assert!(
                fs::read(&pa).unwrap() == fs::read(&pb).unwrap(),
                "contents of {} differ from {}",
                pa.display(),
                pb.display()
            );
            for n in listxattr(&pa).unwrap() {
                let n = n.to_str().unwrap();
                assert_eq!(getxattr(&pa, n).unwrap(), getxattr(&pb, n).unwrap());
            }
        } else if kind.is_symlink() {
            assert_eq!(fs::read_link(&pa).unwrap(), fs::read_link(&pb).unwrap());
        } else if kind.is_dir() {
            assert_same_tree(&pa, &pb, how, mtimes);
        }
    }
}

/// The mount's whole tree against its backing directory (the root's inode number aside).
fn assert_mirrors_backing(m: &Mount) {
    let (mut a, mut b) = (lmeta(&m.mountpoint), lmeta(&m.backing));
    a.ino = 0;
    b.ino = 0;
    assert_eq!(a, b, "attributes of the mount's root");
    assert_same_tree(&m.mountpoint, &m.backing, Compare::Backing, false);
}

/// Where a script runs: a bare directory or the mount.
struct Ctx {
    root: PathBuf,
    label: &'static str,
}

impl Ctx {
    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn ok<T>(&self, what: &str, r: io::Result<T>) -> T {
        r.unwrap_or_else(|e| panic!("{what} on the {}: {e}", self.label))
    }

    /// `r` must fail with `expected`.
    fn fails<T: Debug>(&self, what: &str, expected: i32, r: io::Result<T>) {
        let got = errno_of(&format!("{what} on the {}", self.label), r);
        assert_eq!(
            errname(got),
            errname(expected),
            "{what} on the {}",
            self.label
        );
    }
}

/// Runs `script` on a bare temporary directory and then on the mount; their results must
/// be equal, the trees they leave must match, and the mount must mirror its backing
/// directory.
fn on_both<R: PartialEq + Debug>(m: &Mount, script: impl Fn(&Ctx) -> R) -> R {
    let bare = tempfile::Builder::new()
        .prefix("walfs-bare-")
        .tempdir()
        .unwrap();
    let bare_root = bare.path().join("root");
    fs::create_dir(&bare_root).unwrap();
    let expected = script(&Ctx {
        root: bare_root.clone(),
        label: "bare directory",
    });
    let got = script(&Ctx {
        root: m.mountpoint.clone(),
        label: "walfs mount",
    });
    assert_eq!(
        got, expected,
        "results through walfs differ from a bare directory"
    );
    assert_same_tree(&m.mountpoint, &bare_root, Compare::Bare, false);
    assert_mirrors_backing(m);
    got
}

/// Stops the daemon; it must exit cleanly without logging an error, and in passthrough mode
/// without having fallen back from kernel passthrough.
fn finish(mut m: Mount, args: &[&str]) {
    let log = m.stop();
    assert!(!log.contains("ERROR"), "walfs logged an error:\n{log}");
    if !args.contains(&"--no-passthrough") {
        assert!(
            !log.contains("passthrough"),
            "kernel passthrough was not in use:\n{log}"
        );
    }
}

// ---- directories -------------------------------------------------------------------------

fn nested_directories(args: &[&str]) {
    let m = Mount::with_args(args);
    on_both(&m, |c| {
        let mut dir = c.root.clone();
        for depth in 0..16 {
            dir = dir.join(format!("level {depth} ü"));
            c.ok("mkdir", fs::create_dir(&dir));
            c.ok(
                "write",
                fs::write(dir.join("file"), format!("depth {depth}")),
            );
            c.ok(
                "symlink",
                std::os::unix::fs::symlink("file", dir.join("link")),
            );
            c.ok("mkfifo", mkfifo(&dir.join("fifo"), 0o640));
            c.ok("mkdir empty", fs::create_dir(dir.join("empty")));
            c.ok("mknod regular", mknod_regular(&dir.join("node"), 0o604));
        }
        c.ok("create_dir_all", fs::create_dir_all(c.p("a/b/c/d/e/f/g/h")));
        c.ok(
            "write deep",
            fs::write(c.p("a/b/c/d/e/f/g/h/leaf"), b"leaf"),
        );
        // Names need not be UTF-8, and may hold any byte but '/' and NUL.
        let odd = OsStr::from_bytes(b"bytes \xff\xfe\n\t\x01 end");
        c.ok("odd name", fs::write(c.root.join(odd), b"odd"));
        c.ok(
            "odd dir",
            fs::create_dir(c.root.join(OsStr::from_bytes(b"dir\x80"))),
        );
        let long = "n".repeat(255);
        c.ok("255-byte name", fs::write(c.p(&long), b"x"));
        let too_long = "n".repeat(256);
        c.fails(
            "256-byte name",
            libc::ENAMETOOLONG,
            fs::write(c.p(&too_long), b"x"),
        );
        c.fails("mkdir existing", libc::EEXIST, fs::create_dir(c.p("a/b")));
        c.fails(
            "mkdir under a file",
            libc::ENOTDIR,
            fs::create_dir(c.p("a/b/c/d/e/f/g/h/leaf/x")),
        );
        c.fails(
            "mkdir missing parent",
            libc::ENOENT,
            fs::create_dir(c.p("nope/x")),
        );
        c.fails(
            "read_dir of a file",
            libc::ENOTDIR,
            fs::read_dir(c.p(&long)),
        );
        // Types straight from readdir (d_type), without a stat.
        let kinds: Vec<(String, bool, bool, bool)> = listing(&dir)
            .into_iter()
            .map(|(n, t, _)| {
                use std::os::unix::fs::FileTypeExt;
                (
                    n.into_string().unwrap(),
                    t.is_dir(),
                    t.is_symlink(),
                    t.is_fifo(),
                )
            })
            .collect();
        kinds
    });
    // A directory's nlink counts its subdirectories.
    assert_same_meta(&m, "a/b/c");
    assert_eq!(lmeta(&m.path("level 0 ü")).nlink, 4);
    finish(m, args);
}

fn large_directory(args: &[&str]) {
    let m = Mount::with_args(args);
    let big = m.path("big");
    fs::create_dir(&big).unwrap();
    let name = |i: usize| format!("entry-{i:05}-{}", "x".repeat(i % 60));
    for i in 0..2000 {
        let p = big.join(name(i));
        match i % 10 {
            0 => fs::create_dir(&p).unwrap(),
            1 => std::os::unix::fs::symlink(name(i - 1), &p).unwrap(),
            _ => fs::write(&p, i.to_string()).unwrap(),
        }
    }
    let listed = listing(&big);
    assert_eq!(
        listed.len(),
        2000,
        "readdir through walfs lost or repeated entries"
    );
    assert_eq!(listed, listing(&m.backing_path("big")));
    assert_eq!(listed.iter().filter(|(_, t, _)| t.is_dir()).count(), 200);
    assert_eq!(
        listed.iter().filter(|(_, t, _)| t.is_symlink()).count(),
        200
    );
    assert_mirrors_backing(&m);

    // telldir / seekdir / rewinddir: positions walfs hands out must lead back to the same
    // entries, in the middle of a directory several reads long.
    let c = cpath(&big);
    // SAFETY: libc directory stream calls on a stream opened here and closed at the end;
    // each dirent pointer is read before the next readdir.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(!d.is_null(), "opendir: {}", io::Error::last_os_error());
        let next = |d: *mut libc::DIR| -> Option<Vec<u8>> {
            let e = libc::readdir(d);
            (!e.is_null()).then(|| CStr::from_ptr((*e).d_name.as_ptr()).to_bytes().to_vec())
        };
        let mut all = Vec::new();
        for _ in 0..1200 {
            all.push(next(d).unwrap());
        }
        let pos = libc::telldir(d);
        let after: Vec<Vec<u8>> = (0..50).map(|_| next(d).unwrap()).collect();
        while let Some(n) = next(d) {
            all.push(n);
        }
        libc::seekdir(d, pos);
        let again: Vec<Vec<u8>> = (0..50).map(|_| next(d).unwrap()).collect();
        assert_eq!(after, again, "seekdir to a telldir position");
        libc::rewinddir(d);
        let mut count = 0;
        while next(d).is_some() {
            count += 1;
        }
        assert_eq!(count, 2002, "entries after rewinddir (with . and ..)");
        libc::closedir(d);
        all.extend(after);
        all.sort();
        all.dedup();
        assert_eq!(
            all.len(),
            2002,
            "one pass with telldir saw every entry once"
        );
    }

    // Remove every other entry and list again.
    for (i, (n, t, _)) in listed.iter().enumerate() {
        if i % 2 == 0 {
            if t.is_dir() {
                fs::remove_dir(big.join(n)).unwrap();
            } else {
                fs::remove_file(big.join(n)).unwrap();
            }
        }
    }
    let left = listing(&big);
    assert_eq!(left.len(), 1000);
    assert_eq!(left, listing(&m.backing_path("big")));
    finish(m, args);
}

// ---- regular files -----------------------------------------------------------------------

fn write_read_append(args: &[&str]) {
    let m = Mount::with_args(args);
    on_both(&m, |c| {
        let f = c.p("f");
        c.ok("write", fs::write(&f, b"hello world"));
        let mut out = Vec::new();
        out.push(c.ok("read", fs::read(&f)));
        {
            let mut a = c.ok("open append", OpenOptions::new().append(true).open(&f));
            c.ok("append", a.write_all(b" and more"));
            // A positioned write on an O_APPEND descriptor still appends (Linux).
            c.ok("pwrite append", a.write_at(b"!", 0));
            let mut rw = c.ok(
                "open rw",
                OpenOptions::new().read(true).write(true).open(&f),
            );
            c.ok("overwrite", rw.write_all(b"J"));
            c.ok("seek", rw.seek(SeekFrom::Start(6)));
            let mut buf = [0u8; 5];
            c.ok("read at 6", rw.read_exact(&mut buf));
            out.push(buf.to_vec());
            c.ok("append again", a.write_all(b"?"));
            let mut s = Vec::new();
            c.ok("read to end", rw.read_to_end(&mut s));
            out.push(s);
            // Reads past the end.
            let mut buf = [0u8; 16];
            out.push(vec![c.ok("read past end", rw.read_at(&mut buf, 1000)) as u8]);
            let mut ro = c.ok("open ro", File::open(&f));
            c.fails("write on read-only fd", libc::EBADF, ro.write_all(b"x"));
            let mut wo = c.ok("open wo", OpenOptions::new().write(true).open(&f));
            let mut b = [0u8; 1];
            c.fails("read on write-only fd", libc::EBADF, wo.read(&mut b));
            c.ok("write at offset", wo.write_at(b"WORLD", 6));
        }
        {
            let f = c.ok("open", OpenOptions::new().read(true).write(true).open(&f));
            c.ok("fsync", f.sync_all());
            let mut sync = c.ok(
                "open O_SYNC",
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_SYNC | libc::O_DSYNC)
                    .open(c.p("f")),
            );
            c.ok("write O_SYNC", sync.write_all(b"J"));
            c.ok("fdatasync", f.sync_data());
            c.ok(
                "fsync a directory",
                File::open(&c.root).and_then(|d| d.sync_all()),
            );
            // copy_file_range into a second file, at offsets.
            let g = c.ok(
                "create",
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(c.p("copy")),
            );
            c.ok("write", g.write_all_at(b"0123456789", 0));
            let n = c.ok("copy_file_range", copy_file_range(&f, 6, &g, 2, 5));
            out.push(vec![n as u8]);
            let n = c.ok(
                "copy_file_range at the end",
                copy_file_range(&f, 1000, &g, 0, 5),
            );
            out.push(vec![n as u8]);
            c.fails(
                "copy_file_range to a read-only fd",
                libc::EBADF,
                copy_file_range(&f, 0, &c.ok("open", File::open(c.p("copy"))), 0, 5),
            );
        }
        out.push(c.ok("read copy", fs::read(c.p("copy"))));
        // A write far past the end leaves a hole of zeros.
        {
            let g = c.ok("create", File::create(c.p("sparse")));
            c.ok("write past end", g.write_all_at(b"end", 100_000));
        }
        out.push(c.ok("read back", fs::read(&f)));
        let sparse = c.ok("read sparse", fs::read(c.p("sparse")));
        out.push(vec![u8::from(sparse[..100_000].iter().all(|&b| b == 0))]);
        out.push(sparse[100_000..].to_vec());
        out
    });
    assert_eq!(
        fs::read(m.backing_path("f")).unwrap(),
        b"Jello WORLD and more!?"
    );
    assert_same_meta(&m, "f");
    assert_same_meta(&m, "sparse");
    finish(m, args);
}

fn trunc_and_excl(args: &[&str]) {
    let m = Mount::with_args(args);
    on_both(&m, |c| {
        let f = c.p("f");
        c.ok("write", fs::write(&f, pattern(0, 10_000)));
        let mut out = Vec::new();
        // A descriptor opened before the truncation must not see stale cached data.
        let early = c.ok("open", File::open(&f));
        let mut buf = vec![0u8; 10_000];
        c.ok("read", early.read_exact_at(&mut buf, 0));
        {
            let mut t = c.ok(
                "O_TRUNC",
                OpenOptions::new().write(true).truncate(true).open(&f),
            );
            out.push(c.ok("size after O_TRUNC", t.metadata()).len());
            c.ok("write", t.write_all(b"abc"));
        }
        let mut buf = vec![0u8; 100];
        let n = c.ok("read after truncation", early.read_at(&mut buf, 0));
        out.push(n as u64);
        out.push(buf[..n].iter().map(|&b| b as u64).sum());
        // O_TRUNC on a read-only open of a file is allowed and truncates.
        c.ok("write", fs::write(c.p("g"), b"0123456789"));
        drop(
            c.ok(
                "O_RDONLY|O_TRUNC",
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_TRUNC)
                    .open(c.p("g")),
            ),
        );
        out.push(c.ok("stat", fs::metadata(c.p("g"))).len());
        // A running executable cannot be opened for writing, nor truncated by O_TRUNC, and
        // the failed open leaves it intact (with FUSE_ATOMIC_O_TRUNC the daemon truncated
        // it before the kernel's ETXTBSY check, and the program died of SIGBUS).
        let exe = c.p("exe");
        c.ok("copy sleep", fs::copy("/usr/bin/sleep", &exe));
        c.ok(
            "chmod 755",
            fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)),
        );
        let exe_len = c.ok("stat exe", fs::metadata(&exe)).len();
        let mut running = c.ok(
            "run exe",
            std::process::Command::new(&exe).arg("30").spawn(),
        );
        c.fails(
            "O_RDONLY|O_TRUNC on a running executable",
            libc::ETXTBSY,
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_TRUNC)
                .open(&exe),
        );
        c.fails(
            "O_WRONLY on a running executable",
            libc::ETXTBSY,
            OpenOptions::new().write(true).open(&exe),
        );
        out.push(u64::from(
            c.ok("still running", running.try_wait()).is_none(),
        ));
        out.push(u64::from(
            c.ok("stat exe", fs::metadata(&exe)).len() == exe_len,
        ));
        c.ok("kill exe", running.kill());
        c.ok("wait exe", running.wait());
        c.fails(
            "O_EXCL on an existing file",
            libc::EEXIST,
            OpenOptions::new().write(true).create_new(true).open(&f),
        );
        c.ok(
            "symlink",
            std::os::unix::fs::symlink("nowhere", c.p("dangling")),
        );
        c.fails(
            "O_EXCL on a dangling symlink",
            libc::EEXIST,
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(c.p("dangling")),
        );
        c.fails(
            "O_EXCL on a directory",
            libc::EEXIST,
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&c.root),
        );
        {
            let mut n = c.ok(
                "O_EXCL new",
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o640)
                    .open(c.p("new")),
            );
            c.ok("write", n.write_all(b"new"));
        }
        c.fails("open missing", libc::ENOENT, File::open(c.p("missing")));
        c.fails(
            "open a directory for writing",
            libc::EISDIR,
            OpenOptions::new().write(true).open(&c.root),
        );
        c.fails(
            "O_DIRECTORY on a file",
            libc::ENOTDIR,
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY)
                .open(&f),
        );
        out
    });
    assert_eq!(fs::read(m.backing_path("f")).unwrap(), b"abc");
    assert_eq!(lmeta(&m.path("new")).mode & 0o7777, 0o640);
    finish(m, args);
}

fn o_direct(args: &[&str]) {
    let m = Mount::with_args(args);
    on_both(&m, |c| {
        let f = c.p("direct");
        let mut buf = Aligned::new(3 * 4096);
        buf.bytes().copy_from_slice(&pattern(0, 3 * 4096));
        let file = c.ok(
            "open O_DIRECT",
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(&f),
        );
        assert_ne!(
            open_flags(&file) & libc::O_DIRECT,
            0,
            "O_DIRECT dropped on the {}",
            c.label
        );
        assert_eq!(
            c.ok("O_DIRECT write", pwrite_raw(&file, buf.bytes(), 0)),
            3 * 4096
        );
        buf.bytes()[..4096].copy_from_slice(&pattern(1 << 20, 4096));
        assert_eq!(
            c.ok(
                "O_DIRECT write at 8 KiB",
                pwrite_raw(&file, &buf.bytes()[..4096], 8192)
            ),
            4096
        );
        let mut back = Aligned::new(4 * 4096);
        let n = c.ok("O_DIRECT read", pread_raw(&file, back.bytes(), 0));
        assert_eq!(n, 3 * 4096, "O_DIRECT read length on the {}", c.label);
        let mut expected = pattern(0, 8192);
        expected.extend(pattern(1 << 20, 4096));
        assert!(
            back.bytes()[..n] == expected[..],
            "O_DIRECT data on the {}",
            c.label
        );
        let n = c.ok(
            "O_DIRECT read at 4 KiB",
            pread_raw(&file, back.bytes(), 4096),
        );
        assert_eq!(n, 2 * 4096);
        assert!(back.bytes()[..n] == expected[4096..]);
        // A buffered reader sees what O_DIRECT wrote.
        let plain = c.ok("read", fs::read(&f));
        assert!(
            plain == expected,
            "buffered read after O_DIRECT on the {}",
            c.label
        );
        // And O_DIRECT sees what a buffered writer wrote.
        c.ok(
            "buffered write",
            c.ok("open", OpenOptions::new().write(true).open(&f))
                .write_all_at(b"buffered", 4096),
        );
        let n = c.ok("O_DIRECT read", pread_raw(&file, back.bytes(), 4096));
        assert_eq!(n, 2 * 4096);
        assert_eq!(
            &back.bytes()[..8],
            b"buffered",
            "O_DIRECT read after a buffered write on the {}",
            c.label
        );
    });
    finish(m, args);
}

/// O_DIRECT through kernel passthrough reaches the backing file as O_DIRECT: an unaligned
/// transfer fails as it does on the backing file system.
#[test]
fn o_direct_unaligned_fails_like_the_backing_fs() {
    let m = Mount::with_args(PASSTHROUGH);
    on_both(&m, |c| {
        let f = c.p("direct");
        c.ok("write", fs::write(&f, pattern(0, 8192)));
        let file = c.ok(
            "open O_DIRECT",
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&f),
        );
        let mut buf = Aligned::new(8192);
        c.fails(
            "unaligned O_DIRECT read",
            libc::EINVAL,
            pread_raw(&file, &mut buf.bytes()[1..4097], 0),
        );
        c.fails(
            "O_DIRECT read at an odd offset",
            libc::EINVAL,
            pread_raw(&file, &mut buf.bytes()[..4096], 7),
        );
    });
    finish(m, PASSTHROUGH);
}

fn large_file(args: &[&str]) {
    let m = Mount::with_args(args);
    const SIZE: usize = 64 << 20;
    let data = pattern(0, SIZE);
    let path = m.path("large");
    {
        let mut f = File::create(&path).unwrap();
        // Uneven write sizes, so requests straddle pages.
        let mut pos = 0;
        let mut step = 1_000_003;
        while pos < SIZE {
            let end = (pos + step).min(SIZE);
            f.write_all(&data[pos..end]).unwrap();
            pos = end;
            step = if step == 1_000_003 {
                131_072
            } else {
                1_000_003
            };
        }
        f.sync_all().unwrap();
    }
    assert_same_meta(&m, "large");
    assert_eq!(lmeta(&path).size, SIZE as u64);
    {
        let mut f = File::open(&path).unwrap();
        let mut buf = vec![0u8; 777_777];
        let mut pos = 0;
        while pos < SIZE {
            let n = f.read(&mut buf).unwrap();
            assert!(n > 0, "early end of file at {pos}");
            assert!(
                buf[..n] == data[pos..pos + n],
                "data through walfs differs at {pos}..{}",
                pos + n
            );
            pos += n;
        }
        assert_eq!(f.read(&mut buf).unwrap(), 0);
    }
    assert!(
        fs::read(m.backing_path("large")).unwrap() == data,
        "backing file differs"
    );
    drop(data);

    // 64-bit offsets: a sparse file past 4 GiB.
    let far = (5u64 << 30) + 12345;
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.path("far"))
            .unwrap();
        f.write_all_at(&pattern(far, 10_000), far).unwrap();
        let mut buf = vec![0u8; 10_000];
        f.read_exact_at(&mut buf, far).unwrap();
        assert!(buf == pattern(far, 10_000));
        let mut zeros = vec![1u8; 4096];
        f.read_exact_at(&mut zeros, 1 << 32).unwrap();
        assert!(zeros.iter().all(|&b| b == 0));
    }
    assert_same_meta(&m, "far");
    assert_eq!(lmeta(&m.path("far")).size, far + 10_000);
    let b = File::open(m.backing_path("far")).unwrap();
    let mut buf = vec![0u8; 10_000];
    b.read_exact_at(&mut buf, far).unwrap();
    assert!(buf == pattern(far, 10_000));
    finish(m, args);
}

/// Files, links and attributes made in the backing directory before the mount are all seen
/// as they are, and can then be changed through it.
fn preexisting_files(args: &[&str]) {
    let mut m = Mount::with_args(args);
    m.stop();
    let b = |rel: &str| m.backing_path(rel);
    fs::create_dir_all(b("d1/d2/d3")).unwrap();
    fs::write(b("empty"), b"").unwrap();
    fs::write(b("small"), b"small file").unwrap();
    fs::write(b("d1/d2/d3/big"), pattern(0, 3_000_000)).unwrap();
    fs::write(b("d1/mode"), b"m").unwrap();
    fs::set_permissions(b("d1/mode"), fs::Permissions::from_mode(0o4751)).unwrap();
    fs::write(b("d1/owned"), b"o").unwrap();
    std::os::unix::fs::chown(b("d1/owned"), Some(65534), Some(65534)).unwrap();
    fs::hard_link(b("small"), b("d1/d2/small-link")).unwrap();
    std::os::unix::fs::symlink("../small", b("d1/sym")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", b("d1/dangling")).unwrap();
    mkfifo(&b("d1/fifo"), 0o600).unwrap();
    setxattr(&b("small"), "user.origin", b"backing", 0).unwrap();
    setxattr(&b("d1"), "user.dir", b"yes", 0).unwrap();
    // Explicit times, leaves first so directories keep theirs.
    let mut all: Vec<PathBuf> = Vec::new();
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), out);
            }
            out.push(e.path());
        }
    }
    walk(&m.backing, &mut all);
    for (i, p) in all.iter().enumerate() {
        let t = ts(1_600_000_000 + i as i64 * 1000, 123_456_789 + i as i64);
        utimensat(p, t, t, libc::AT_SYMLINK_NOFOLLOW).unwrap();
    }
    m.start(args);

    assert_same_tree(&m.mountpoint, &m.backing, Compare::Backing, true);
    assert_eq!(fs::read(m.path("d1/sym")).unwrap(), b"small file");
    assert_eq!(lmeta(&m.path("small")).nlink, 2);
    assert_eq!(
        lmeta(&m.path("small")).ino,
        lmeta(&m.path("d1/d2/small-link")).ino
    );
    assert_eq!(lmeta(&m.path("d1/mode")).mode, libc::S_IFREG | 0o4751);
    assert_eq!(lmeta(&m.path("d1/owned")).uid, 65534);
    assert_eq!(
        getxattr(&m.path("small"), "user.origin").unwrap(),
        b"backing"
    );

    // Now change them through the mount.
    {
        let mut f = OpenOptions::new()
            .append(true)
            .open(m.path("small"))
            .unwrap();
        f.write_all(b" appended").unwrap();
    }
    let big = m.path("d1/d2/d3/big");
    OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .write_all_at(b"PATCH", 1_000_000)
        .unwrap();
    fs::rename(m.path("d1/d2/d3"), m.path("d3moved")).unwrap();
    fs::remove_file(m.path("d1/fifo")).unwrap();
    assert_eq!(
        fs::read(m.path("d1/d2/small-link")).unwrap(),
        b"small file appended"
    );
    let mut expected = pattern(0, 3_000_000);
    expected[1_000_000..1_000_005].copy_from_slice(b"PATCH");
    assert!(fs::read(m.backing_path("d3moved/big")).unwrap() == expected);
    assert_mirrors_backing(&m);
    finish(m, args);
}

// ---- links -------------------------------------------------------------------------------

fn symlinks(args: &[&str]) {
    let m = Mount::with_args(args);
    on_both(&m, |c| {
        use std::os::unix::fs::symlink;
        let mut out: Vec<String> = Vec::new();
        c.ok("mkdir", fs::create_dir(c.p("dir")));
        c.ok("write", fs::write(c.p("dir/target"), b"target data"));
        c.ok("symlink", symlink("dir/target", c.p("rel")));
        c.ok(
            "symlink",
            symlink("/walfs-test/no/such/absolute/target", c.p("abs")),
        );
        c.ok("symlink to dir", symlink("dir", c.p("dirlink")));
        c.ok("chain", symlink("rel", c.p("chain")));
        c.ok("dangling", symlink("missing-target", c.p("dangling")));
        c.ok("loop a", symlink("loop-b", c.p("loop-a")));
        c.ok("loop b", symlink("loop-a", c.p("loop-b")));
        let long_target = "t/".repeat(2000) + "end";
        c.ok("long target", symlink(&long_target, c.p("long")));
        for l in ["rel", "chain", "dangling", "dirlink", "long"] {
            out.push(
                c.ok("readlink", fs::read_link(c.p(l)))
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        assert_eq!(
            c.ok("readlink abs", fs::read_link(c.p("abs"))),
            Path::new("/walfs-test/no/such/absolute/target")
        );
        c.fails("stat abs", libc::ENOENT, fs::metadata(c.p("abs")));
        for l in ["rel", "chain"] {
            let lst = c.ok("lstat", fs::symlink_metadata(c.p(l)));
            assert!(lst.file_type().is_symlink());
            assert_eq!(lst.mode() & 0o777, 0o777);
            assert_eq!(
                lst.len(),
                fs::read_link(c.p(l)).unwrap().as_os_str().len() as u64
            );
            let st = c.ok("stat", fs::metadata(c.p(l)));
            assert_eq!(
                meta_of(&st),
                lmeta(&c.p("dir/target")),
                "stat follows {l} on the {}",
                c.label
            );
            out.push(String::from_utf8(c.ok("read via link", fs::read(c.p(l)))).unwrap());
        }
        assert!(c.ok("stat dirlink", fs::metadata(c.p("dirlink"))).is_dir());
        out.push(format!(
            "{:?}",
            listing(&c.p("dirlink"))
                .into_iter()
                .map(|e| e.0)
                .collect::<Vec<_>>()
        ));
        c.fails("stat dangling", libc::ENOENT, fs::metadata(c.p("dangling")));
        c.fails("stat loop", libc::ELOOP, fs::metadata(c.p("loop-a")));
        c.fails(
            "readlink of a file",
            libc::EINVAL,
            fs::read_link(c.p("dir/target")),
        );
        c.fails(
            "O_NOFOLLOW on a symlink",
            libc::ELOOP,
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(c.p("rel")),
        );
        c.fails(
            "symlink over an existing name",
            libc::EEXIST,
            symlink("x", c.p("rel")),
        );
        // O_CREAT through a dangling symlink creates its target.
        c.ok(
            "create through dangling",
            fs::write(c.p("dangling"), b"made"),
        );
        out.push(String::from_utf8(c.ok("read", fs::read(c.p("missing-target")))).unwrap());
        // lchown changes the link, not its target.
        c.ok(
            "lchown",
            std::os::unix::fs::lchown(c.p("rel"), Some(65534), Some(65534)),
        );
        out.push(format!("{:?}", lmeta(&c.p("rel")).uid));
        out.push(format!("{:?}", lmeta(&c.p("dir/target")).uid));
        // A hard link to a symlink (link(2) does not follow).
        c.ok(
            "hard link to symlink",
            fs::hard_link(c.p("rel"), c.p("rel2")),
        );
        assert!(lmeta(&c.p("rel2")).mode & libc::S_IFMT == libc::S_IFLNK);
        out.push(format!("{}", lmeta(&c.p("rel")).nlink));
        c.ok("unlink symlink", fs::remove_file(c.p("chain")));
        c.ok("target stays", fs::metadata(c.p("dir/target")));
        out
    });
    assert_eq!(lmeta(&m.path("rel")).ino, lmeta(&m.path("rel2")).ino);
    finish(m, args);
}

fn hard_links(args: &[&str]) {
    let m = Mount::with_args(args);
    on_both(&m, |c| {
        let mut out = Vec::new();
        c.ok("mkdir", fs::create_dir(c.p("sub")));
        c.ok("write", fs::write(c.p("f"), b"one"));
        c.ok("link", fs::hard_link(c.p("f"), c.p("g")));
        c.ok("link across dirs", fs::hard_link(c.p("f"), c.p("sub/h")));
        for n in ["f", "g", "sub/h"] {
            out.push(lmeta(&c.p(n)).nlink);
        }
        let ino = lmeta(&c.p("f")).ino;
        assert_eq!(
            lmeta(&c.p("g")).ino,
            ino,
            "hard links share an inode on the {}",
            c.label
        );
        assert_eq!(lmeta(&c.p("sub/h")).ino, ino);
        // Written through one name, read through another, also from an open descriptor.
        let early = c.ok("open", File::open(c.p("sub/h")));
        c.ok(
            "write via g",
            OpenOptions::new()
                .write(true)
                .open(c.p("g"))
                .and_then(|mut f| f.write_all(b"TWO")),
        );
        let mut s = String::new();
        c.ok("read", (&early).read_to_string(&mut s));
        out.push(s.len() as u64);
        assert_eq!(s, "TWO");
        c.ok("unlink f", fs::remove_file(c.p("f")));
        out.push(lmeta(&c.p("g")).nlink);
        out.push(c.ok("fstat", early.metadata()).nlink());
        // Renaming one hard link onto another of the same file changes nothing.
        c.ok("rename onto own link", fs::rename(c.p("g"), c.p("sub/h")));
        c.ok("both names stay", fs::metadata(c.p("g")));
        out.push(lmeta(&c.p("sub/h")).nlink);
        c.fails(
            "link over existing",
            libc::EEXIST,
            fs::hard_link(c.p("g"), c.p("sub/h")),
        );
        c.fails(
            "link missing",
            libc::ENOENT,
            fs::hard_link(c.p("f"), c.p("x")),
        );
        c.fails(
            "link a directory",
            libc::EPERM,
            fs::hard_link(c.p("sub"), c.p("subdir-link")),
        );
        c.ok("unlink g", fs::remove_file(c.p("g")));
        out.push(lmeta(&c.p("sub/h")).nlink);
        out
    });
    assert_eq!(fs::read(m.backing_path("sub/h")).unwrap(), b"TWO");
    finish(m, args);
}

// ---- rename ------------------------------------------------------------------------------

fn renames(args: &[&str]) {
    let m = Mount::with_args(args);
    on_both(&m, |c| {
        let mut out: Vec<String> = Vec::new();
        for d in ["a", "b", "a/sub", "a/sub/deep", "full", "empty"] {
            c.ok("mkdir", fs::create_dir(c.p(d)));
        }
        c.ok("write", fs::write(c.p("a/f1"), b"1"));
        c.ok("write", fs::write(c.p("a/f2"), b"22"));
        c.ok("write", fs::write(c.p("b/g"), b"ggg"));
        c.ok("write", fs::write(c.p("a/sub/deep/x"), b"x"));
        c.ok("write", fs::write(c.p("full/y"), b"y"));
        let ino_f1 = lmeta(&c.p("a/f1")).ino;
        let ino_f2 = lmeta(&c.p("a/f2")).ino;
        // An open descriptor follows its file through renames.
        let mut open_f1 = c.ok(
            "open",
            OpenOptions::new().read(true).write(true).open(c.p("a/f1")),
        );

        c.ok("rename within", fs::rename(c.p("a/f1"), c.p("a/f1r")));
        c.fails("old name gone", libc::ENOENT, fs::metadata(c.p("a/f1")));
        c.ok("rename across", fs::rename(c.p("a/f1r"), c.p("b/f1x")));
        assert_eq!(
            lmeta(&c.p("b/f1x")).ino,
            ino_f1,
            "rename keeps the inode on the {}",
            c.label
        );
        c.ok("write via open fd", open_f1.write_all(b"+"));
        out.push(String::from_utf8(c.ok("read", fs::read(c.p("b/f1x")))).unwrap());

        // Over an existing file: the target name now has the source's inode and data.
        let old_g = c.ok("open old target", File::open(c.p("b/g")));
        c.ok("rename over", fs::rename(c.p("a/f2"), c.p("b/g")));
        assert_eq!(lmeta(&c.p("b/g")).ino, ino_f2);
        out.push(String::from_utf8(c.ok("read", fs::read(c.p("b/g")))).unwrap());
        let mut s = String::new();
        c.ok(
            "read replaced file via its fd",
            (&old_g).read_to_string(&mut s),
        );
        out.push(s);
        out.push(c.ok("fstat replaced", old_g.metadata()).nlink().to_string());

        // A directory across directories: parents' link counts follow.
        c.ok("rename dir", fs::rename(c.p("a/sub"), c.p("b/sub")));
        out.push(format!(
            "{} {}",
            lmeta(&c.p("a")).nlink,
            lmeta(&c.p("b")).nlink
        ));
        out.push(String::from_utf8(c.ok("read moved", fs::read(c.p("b/sub/deep/x")))).unwrap());
        // Over an empty directory works; over a non-empty one does not.
        c.ok("dir over empty dir", fs::rename(c.p("b/sub"), c.p("empty")));
        c.fails(
            "dir over non-empty dir",
            libc::ENOTEMPTY,
            fs::rename(c.p("empty"), c.p("full")),
        );
        c.fails(
            "file over dir",
            libc::EISDIR,
            fs::rename(c.p("b/g"), c.p("full")),
        );
        c.fails(
            "dir over file",
            libc::ENOTDIR,
            fs::rename(c.p("full"), c.p("b/g")),
        );
        c.fails(
            "dir into itself",
            libc::EINVAL,
            fs::rename(c.p("empty"), c.p("empty/deep/in")),
        );
        c.fails(
            "missing source",
            libc::ENOENT,
            fs::rename(c.p("nope"), c.p("b/nope")),
        );
        c.fails(
            "missing target dir",
            libc::ENOENT,
            fs::rename(c.p("b/g"), c.p("nodir/g")),
        );
        c.ok("rename to itself", fs::rename(c.p("b/g"), c.p("b/g")));

        // renameat2 flags.
        c.fails(
            "RENAME_NOREPLACE over a file",
            libc::EEXIST,
            renameat2(&c.p("b/g"), &c.p("b/f1x"), libc::RENAME_NOREPLACE),
        );
        c.ok(
            "RENAME_NOREPLACE to a free name",
            renameat2(&c.p("b/g"), &c.p("b/g2"), libc::RENAME_NOREPLACE),
        );
        c.ok(
            "RENAME_EXCHANGE",
            renameat2(&c.p("b/g2"), &c.p("b/f1x"), libc::RENAME_EXCHANGE),
        );
        assert_eq!(
            lmeta(&c.p("b/g2")).ino,
            ino_f1,
            "RENAME_EXCHANGE swaps inodes on the {}",
            c.label
        );
        assert_eq!(lmeta(&c.p("b/f1x")).ino, ino_f2);
        out.push(String::from_utf8(c.ok("read", fs::read(c.p("b/g2")))).unwrap());
        out.push(String::from_utf8(c.ok("read", fs::read(c.p("b/f1x")))).unwrap());
        c.ok(
            "RENAME_EXCHANGE file and dir across dirs",
            renameat2(&c.p("b/g2"), &c.p("full"), libc::RENAME_EXCHANGE),
        );
        assert!(lmeta(&c.p("b/g2")).mode & libc::S_IFMT == libc::S_IFDIR);
        out.push(String::from_utf8(c.ok("read", fs::read(c.p("b/g2/y")))).unwrap());
        out.push(String::from_utf8(c.ok("read", fs::read(c.p("full")))).unwrap());
        c.fails(
            "RENAME_EXCHANGE with a missing target",
            libc::ENOENT,
            renameat2(&c.p("full"), &c.p("b/none"), libc::RENAME_EXCHANGE),
        );
        c.fails(
            "RENAME_NOREPLACE|RENAME_EXCHANGE",
            libc::EINVAL,
            renameat2(
                &c.p("full"),
                &c.p("b/f1x"),
                libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE,
            ),
        );
        out.push(format!(
            "{} {} {}",
            lmeta(&c.root).nlink,
            lmeta(&c.p("a")).nlink,
            lmeta(&c.p("b")).nlink
        ));
        out
    });
    finish(m, args);
}

// ---- removal and sizes -------------------------------------------------------------------

fn unlink_rmdir(args: &[&str]) {
    let m = Mount::with_args(args);
    on_both(&m, |c| {
        c.ok("mkdir", fs::create_dir_all(c.p("d/e")));
        c.ok("write", fs::write(c.p("d/f"), b"f"));
        c.ok("write", fs::write(c.p("top"), b"t"));
        c.fails("rmdir non-empty", libc::ENOTEMPTY, fs::remove_dir(c.p("d")));
        c.fails("rmdir a file", libc::ENOTDIR, fs::remove_dir(c.p("top")));
        c.fails(
            "unlink a directory",
            libc::EISDIR,
            fs::remove_file(c.p("d/e")),
        );
        c.fails("unlink missing", libc::ENOENT, fs::remove_file(c.p("nope")));
        c.fails("rmdir missing", libc::ENOENT, fs::remove_dir(c.p("nope")));
        c.fails("rmdir .", libc::EINVAL, fs::remove_dir(c.p("d/.")));
        c.ok("unlink", fs::remove_file(c.p("d/f")));
        c.fails("stat unlinked", libc::ENOENT, fs::metadata(c.p("d/f")));
        c.ok("rmdir", fs::remove_dir(c.p("d/e")));
        let nlink = lmeta(&c.p("d")).nlink;
        c.ok("rmdir", fs::remove_dir(c.p("d")));
        c.fails("stat removed dir", libc::ENOENT, fs::metadata(c.p("d")));
        // The name can be used again at once, as another type.
        c.ok("recreate", fs::write(c.p("d"), b"now a file"));
        c.ok(
            "mkdir over old file name",
            fs::remove_file(c.p("top")).and_then(|_| fs::create_dir(c.p("top"))),
        );
        (nlink, lmeta(&c.root).nlink)
    });
    finish(m, args);
}

fn unlink_open_file(args: &[&str]) {
    let m = Mount::with_args(args);
    let path = m.path("doomed");
    fs::write(&path, pattern(0, 20_000)).unwrap();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let ro = File::open(&path).unwrap();
    fs::remove_file(&path).unwrap();
    assert_eq!(errno_of("stat", fs::metadata(&path)), libc::ENOENT);
    assert_eq!(
        errno_of("stat backing", fs::metadata(m.backing_path("doomed"))),
        libc::ENOENT
    );
    assert!(listing(&m.mountpoint).is_empty());
    let mut buf = vec![0u8; 20_000];
    ro.read_exact_at(&mut buf, 0).unwrap();
    assert!(
        buf == pattern(0, 20_000),
        "an unlinked file is still readable"
    );
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(b"still writable").unwrap();
    let mut tail = [0u8; 14];
    ro.read_exact_at(&mut tail, 20_000).unwrap();
    assert_eq!(&tail, b"still writable");
    let st = f.metadata().unwrap();
    assert_eq!(st.nlink(), 0);
    assert_eq!(st.len(), 20_014);
    f.set_len(100).unwrap();
    assert_eq!(ro.metadata().unwrap().len(), 100);
    // The name is free for a new file while the old one is open.
    fs::write(&path, b"new").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new");
    ro.read_exact_at(&mut buf[..100], 0).unwrap();
    assert!(buf[..100] == pattern(0, 100));
    assert_ne!(lmeta(&path).ino, ro.metadata().unwrap().ino());
    assert_same_meta(&m, "doomed");
    drop((f, ro));
    finish(m, args);
}

fn truncate(args: &[&str]) {
    let m = Mount::with_args(args);
    on_both(&m, |c| {
        let p = c.p("t");
        c.ok("write", fs::write(&p, pattern(0, 5000)));
        let mut out = Vec::new();
        {
            let f = c.ok("open", OpenOptions::new().read(true).write(true).open(&p));
            c.ok("grow", f.set_len(100_000));
            out.push(c.ok("fstat", f.metadata()).len());
            let mut buf = vec![1u8; 100_000];
            c.ok("read", f.read_exact_at(&mut buf, 0));
            assert!(buf[..5000] == pattern(0, 5000) && buf[5000..].iter().all(|&b| b == 0));
            c.ok("shrink", f.set_len(10));
            out.push(c.ok("fstat", f.metadata()).len());
            let mut rest = Vec::new();
            c.ok("read", (&f).read_to_end(&mut rest));
            out.push(rest.len() as u64);
        }
        c.ok("truncate(2) grow", truncate_path(&p, 65_536 + 3));
        out.push(lmeta(&p).size);
        c.ok("truncate(2) shrink", truncate_path(&p, 7));
        out.push(lmeta(&p).size);
        out.push(c.ok("read", fs::read(&p)).iter().map(|&b| b as u64).sum());
        c.ok("truncate(2) to zero", truncate_path(&p, 0));
        out.push(lmeta(&p).size);
        let ro = c.ok("open ro", File::open(&p));
        c.fails("ftruncate on a read-only fd", libc::EINVAL, ro.set_len(5));
        c.fails("truncate(2) negative", libc::EINVAL, truncate_path(&p, -1));
        c.fails(
            "truncate(2) a directory",
            libc::EISDIR,
            truncate_path(&c.root, 0),
        );
        c.fails(
            "truncate(2) missing",
            libc::ENOENT,
            truncate_path(&c.p("nope"), 0),
        );
        out
    });
    assert_eq!(lmeta(&m.path("t")).size, 0);
    finish(m, args);
}

fn fallocate_ops(args: &[&str]) {
    let m = Mount::with_args(args);
    let results = on_both(&m, |c| {
        let p = c.p("fa");
        c.ok("write", fs::write(&p, vec![b'x'; 16384]));
        let f = c.ok("open", OpenOptions::new().read(true).write(true).open(&p));
        let mut out: Vec<i64> = Vec::new();
        c.ok("fallocate grow", fallocate(&f, 0, 0, 32768));
        out.push(c.ok("fstat", f.metadata()).len() as i64);
        out.push(lmeta(&p).size as i64);
        c.ok(
            "fallocate KEEP_SIZE",
            fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 32768, 1 << 20),
        );
        out.push(lmeta(&p).size as i64);
        let blocks = c.ok("stat", fs::metadata(&p)).blocks();
        out.push(i64::from(blocks >= (32768 + (1 << 20)) / 512));
        c.ok(
            "PUNCH_HOLE",
            fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                4096,
                8192,
            ),
        );
        out.push(lmeta(&p).size as i64);
        let mut buf = vec![0u8; 16384];
        c.ok("read", f.read_exact_at(&mut buf, 0));
        assert!(
            buf[..4096].iter().all(|&b| b == b'x'),
            "before the hole on the {}",
            c.label
        );
        assert!(
            buf[4096..12288].iter().all(|&b| b == 0),
            "the hole reads as zeros on the {}",
            c.label
        );
        assert!(
            buf[12288..].iter().all(|&b| b == b'x'),
            "after the hole on the {}",
            c.label
        );
        out.push(c.ok("SEEK_HOLE", lseek(&f, 0, libc::SEEK_HOLE)));
        out.push(c.ok("SEEK_DATA", lseek(&f, 4096, libc::SEEK_DATA)));
        // ZERO_RANGE past the end grows the file, and zeroes data in place.
        c.ok(
            "ZERO_RANGE",
            fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 14000, 40000),
        );
        out.push(lmeta(&p).size as i64);
        let mut buf = vec![1u8; 54000];
        c.ok("read", f.read_exact_at(&mut buf, 0));
        assert!(
            buf[14000..].iter().all(|&b| b == 0),
            "ZERO_RANGE on the {}",
            c.label
        );
        assert!(buf[12288..14000].iter().all(|&b| b == b'x'));
        c.fails(
            "SEEK_DATA past the end",
            libc::ENXIO,
            lseek(&f, 1 << 30, libc::SEEK_DATA),
        );
        c.fails(
            "PUNCH_HOLE without KEEP_SIZE",
            libc::EOPNOTSUPP,
            fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096),
        );
        c.fails(
            "fallocate zero length",
            libc::EINVAL,
            fallocate(&f, 0, 0, 0),
        );
        let ro = c.ok("open ro", File::open(&p));
        c.fails(
            "fallocate on a read-only fd",
            libc::EBADF,
            fallocate(&ro, 0, 0, 4096),
        );
        out
    });
    assert_eq!(results[0], 32768);
    let (a, b) = (
        fs::metadata(m.path("fa")).unwrap(),
        fs::metadata(m.backing_path("fa")).unwrap(),
    );
    assert_eq!(a.blocks(), b.blocks(), "st_blocks through walfs");
    finish(m, args);
}

// ---- attributes --------------------------------------------------------------------------

fn chmod_chown(args: &[&str]) {
    let m = Mount::with_args(args);
    on_both(&m, |c| {
        let mut out = Vec::new();
        let f = c.p("f");
        c.ok("write", fs::write(&f, b"x"));
        c.ok("mkdir", fs::create_dir(c.p("d")));
        for mode in [0o600, 0o4755, 0o2750, 0o000, 0o777] {
            c.ok(
                "chmod",
                fs::set_permissions(&f, fs::Permissions::from_mode(mode)),
            );
            out.push(lmeta(&f).mode);
        }
        c.ok(
            "chmod dir sticky",
            fs::set_permissions(c.p("d"), fs::Permissions::from_mode(0o1777)),
        );
        out.push(lmeta(&c.p("d")).mode);
        c.ok(
            "chmod via fd",
            c.ok("open", File::open(&f))
                .set_permissions(fs::Permissions::from_mode(0o640)),
        );
        out.push(lmeta(&f).mode);
        c.ok(
            "chown",
            std::os::unix::fs::chown(&f, Some(65534), Some(65534)),
        );
        let md = lmeta(&f);
        out.extend([md.uid, md.gid, md.mode]);
        c.ok(
            "chown gid only",
            std::os::unix::fs::chown(&f, None, Some(0)),
        );
        let md = lmeta(&f);
        out.extend([md.uid, md.gid]);
        // chown of a set-user-ID executable clears the bit.
        c.ok(
            "chmod",
            fs::set_permissions(&f, fs::Permissions::from_mode(0o6755)),
        );
        c.ok("chown", std::os::unix::fs::chown(&f, Some(65534), None));
        out.push(lmeta(&f).mode);
        c.ok(
            "fchown",
            std::os::unix::fs::fchown(c.ok("open", File::open(c.p("d"))), Some(65534), Some(65534)),
        );
        let md = lmeta(&c.p("d"));
        out.extend([md.uid, md.gid, md.mode]);
        c.ok(
            "chmod",
            fs::set_permissions(&f, fs::Permissions::from_mode(0o644)),
        );
        c.ok("access R_OK|W_OK", access(&f, libc::R_OK | libc::W_OK));
        c.fails(
            "access X_OK without x bits",
            libc::EACCES,
            access(&f, libc::X_OK),
        );
        c.fails(
            "access missing",
            libc::ENOENT,
            access(&c.p("nope"), libc::F_OK),
        );
        c.fails(
            "chmod missing",
            libc::ENOENT,
            fs::set_permissions(c.p("nope"), fs::Permissions::from_mode(0o600)),
        );
        out
    });
    assert_same_meta(&m, "f");
    assert_same_meta(&m, "d");
    assert_eq!(lmeta(&m.path("d")).uid, 65534);
    finish(m, args);
}

/// Runs `op` (raw syscalls only) in a forked child that has become user and group 65534
/// (nobody), and returns its result.
fn as_nobody(op: impl Fn() -> libc::c_int) -> io::Result<()> {
    // SAFETY: after fork the child makes only async-signal-safe calls (setgroups,
    // setresgid, setresuid, the op's syscalls, _exit) and never returns.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(65534, 65534, 65534) != 0
                || libc::setresuid(65534, 65534, 65534) != 0
            {
                libc::_exit(255);
            }
            let code = if op() == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::_exit(code);
        }
    }
    let mut status = 0;
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        255 => panic!("the child could not become user 65534"),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Lets other users reach `dir`: every ancestor gets search permission for others.
fn searchable_by_others(dir: &Path) {
    for a in dir.ancestors() {
        let mode = lmeta(a).mode;
        if mode & 0o001 == 0 {
            fs::set_permissions(a, fs::Permissions::from_mode((mode & 0o7777) | 0o011)).unwrap();
        }
    }
}

/// An unprivileged user's truncate(2) clears set-user-ID, and set-group-ID on a
/// group-executable file, as on the bare disk; walfs truncates with its own privileges,
/// which would keep them. Root's truncate keeps them.
fn unprivileged_truncate(args: &[&str]) {
    let m = Mount::with_args(&[&["--allow-other"], args].concat());
    on_both(&m, |c| {
        searchable_by_others(&c.root);
        let f = c.p("f");
        let path = cpath(&f);
        let mut out = Vec::new();
        for mode in [0o6777, 0o2757, 0o2747, 0o4766, 0o666] {
            c.ok("write", fs::write(&f, b"hello"));
            c.ok(
                "chmod",
                fs::set_permissions(&f, fs::Permissions::from_mode(mode)),
            );
            // SAFETY: a valid path.
            c.ok(
                "truncate as nobody",
                as_nobody(|| unsafe { libc::truncate(path.as_ptr(), 2) }),
            );
            out.push(lmeta(&f).mode);
            c.ok(
                "chmod",
                fs::set_permissions(&f, fs::Permissions::from_mode(mode)),
            );
            c.ok("truncate as root", truncate_path(&f, 1));
            out.push(lmeta(&f).mode);
        }
        c.ok(
            "chmod",
            fs::set_permissions(&f, fs::Permissions::from_mode(0o4700)),
        );
        c.fails(
            "truncate of another's file",
            libc::EACCES,
            // SAFETY: a valid path.
            as_nobody(|| unsafe { libc::truncate(path.as_ptr(), 0) }),
        );
        out.push(lmeta(&f).mode);
        out
    });
    assert_same_meta(&m, "f");
    finish(m, args);
}

fn utimens(args: &[&str]) {
    let m = Mount::with_args(args);
    let f = m.path("f");
    fs::write(&f, b"x").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    std::os::unix::fs::symlink("f", m.path("l")).unwrap();
    let both = |rel: &str| {
        let a = fs::symlink_metadata(m.path(rel)).unwrap();
        let b = fs::symlink_metadata(m.backing_path(rel)).unwrap();
        assert_eq!(
            (atime_ns(&a), mtime_ns(&a)),
            (atime_ns(&b), mtime_ns(&b)),
            "{rel}: times through walfs differ from the backing file"
        );
        (atime_ns(&a), mtime_ns(&a))
    };

    utimensat(
        &f,
        ts(1_000_000_000, 123_456_789),
        ts(1_500_000_000, 987_654_321),
        0,
    )
    .unwrap();
    assert_eq!(
        both("f"),
        ((1_000_000_000, 123_456_789), (1_500_000_000, 987_654_321))
    );
    // UTIME_OMIT leaves one of them alone.
    utimensat(&f, ts(0, libc::UTIME_OMIT), ts(1_600_000_000, 1), 0).unwrap();
    assert_eq!(
        both("f"),
        ((1_000_000_000, 123_456_789), (1_600_000_000, 1))
    );
    {
        let file = OpenOptions::new().write(true).open(&f).unwrap();
        futimens(
            &file,
            ts(1_700_000_000, 999_999_999),
            ts(0, libc::UTIME_OMIT),
        )
        .unwrap();
    }
    assert_eq!(
        both("f"),
        ((1_700_000_000, 999_999_999), (1_600_000_000, 1))
    );
    // Before 1970, with nanoseconds.
    utimensat(&f, ts(-1_000_000, 5), ts(-86_400, 999_999_999), 0).unwrap();
    assert_eq!(both("f"), ((-1_000_000, 5), (-86_400, 999_999_999)));
    // UTIME_NOW.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    utimensat(&f, ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_NOW), 0).unwrap();
    let (a, mt) = both("f");
    assert!(a.0 >= before - 1 && mt.0 >= before - 1 && a.0 <= before + 5);
    // A symlink itself, and a directory.
    let target_times = both("f");
    utimensat(
        &m.path("l"),
        ts(1_234_567_890, 42),
        ts(1_234_567_891, 43),
        libc::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    assert_eq!(both("l"), ((1_234_567_890, 42), (1_234_567_891, 43)));
    assert_eq!(both("f"), target_times, "lutimes changed the target");
    utimensat(&m.path("d"), ts(1, 1), ts(2, 2), 0).unwrap();
    assert_eq!(both("d"), ((1, 1), (2, 2)));
    // Through a symlink (following it).
    utimensat(&m.path("l"), ts(3, 3), ts(4, 4), 0).unwrap();
    assert_eq!(both("f"), ((3, 3), (4, 4)));
    assert_eq!(
        errno_of(
            "utimensat missing",
            utimensat(&m.path("nope"), ts(1, 1), ts(1, 1), 0)
        ),
        libc::ENOENT
    );
    assert_eq!(
        errno_of(
            "utimensat bad nsec",
            utimensat(&f, ts(1, 1_000_000_000), ts(1, 1), 0)
        ),
        libc::EINVAL
    );
    finish(m, args);
}

fn xattrs(args: &[&str]) {
    let m = Mount::with_args(args);
    on_both(&m, |c| {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let f = c.p("f");
        c.ok("write", fs::write(&f, b"x"));
        c.ok("mkdir", fs::create_dir(c.p("d")));
        c.ok("symlink", std::os::unix::fs::symlink("f", c.p("l")));
        let binary: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        for target in [f.clone(), c.p("d")] {
            c.ok("setxattr", setxattr(&target, "user.alpha", b"first", 0));
            c.ok(
                "setxattr binary",
                setxattr(&target, "user.binary", &binary, 0),
            );
            c.ok("setxattr empty", setxattr(&target, "user.empty", b"", 0));
            c.ok(
                "setxattr replace",
                setxattr(&target, "user.alpha", b"second", libc::XATTR_REPLACE),
            );
            c.fails(
                "XATTR_CREATE existing",
                libc::EEXIST,
                setxattr(&target, "user.alpha", b"x", libc::XATTR_CREATE),
            );
            c.fails(
                "XATTR_REPLACE missing",
                libc::ENODATA,
                setxattr(&target, "user.none", b"x", libc::XATTR_REPLACE),
            );
            out.push(c.ok("getxattr", getxattr(&target, "user.alpha")));
            out.push(c.ok("getxattr binary", getxattr(&target, "user.binary")));
            out.push(c.ok("getxattr empty", getxattr(&target, "user.empty")));
            out.push(vec![c
                .ok("size query", getxattr_sized(&target, "user.binary", 0))
                .len() as u8]);
            c.fails(
                "getxattr missing",
                libc::ENODATA,
                getxattr_sized(&target, "user.missing", 64),
            );
            c.fails(
                "getxattr small buffer",
                libc::ERANGE,
                getxattr_sized(&target, "user.binary", 10),
            );
            c.fails(
                "listxattr small buffer",
                libc::ERANGE,
                listxattr_sized(&target, 5),
            );
            let names = c.ok("listxattr", listxattr(&target));
            out.push(names.join(OsStr::new(",")).into_encoded_bytes());
            c.ok("removexattr", removexattr(&target, "user.alpha"));
            c.fails(
                "removexattr missing",
                libc::ENODATA,
                removexattr(&target, "user.alpha"),
            );
            c.fails(
                "getxattr removed",
                libc::ENODATA,
                getxattr_sized(&target, "user.alpha", 64),
            );
            let names = c.ok("listxattr", listxattr(&target));
            out.push(names.join(OsStr::new(",")).into_encoded_bytes());
        }
        c.fails(
            "user.* on a symlink",
            libc::EPERM,
            lsetxattr(&c.p("l"), "user.x", b"v", 0),
        );
        // Through a symlink (following it) reaches the file.
        out.push(c.ok("getxattr via symlink", getxattr(&c.p("l"), "user.binary")));
        c.fails(
            "unknown namespace",
            libc::EOPNOTSUPP,
            setxattr(&f, "bogus.x", b"v", 0),
        );
        c.fails(
            "getxattr on missing file",
            libc::ENOENT,
            getxattr_sized(&c.p("nope"), "user.a", 8),
        );
        out
    });
    assert_eq!(getxattr(&m.backing_path("f"), "user.empty").unwrap(), b"");
    assert_eq!(
        listxattr(&m.backing_path("d")).unwrap(),
        vec![OsString::from("user.binary"), OsString::from("user.empty")]
    );
    finish(m, args);
}

fn statfs(args: &[&str]) {
    let m = Mount::with_args(args);
    fs::create_dir(m.path("sub")).unwrap();
    let (a, b) = (statvfs(&m.path("sub")), statvfs(&m.backing));
    assert_eq!(a.f_bsize, b.f_bsize, "f_bsize");
    assert_eq!(a.f_frsize, b.f_frsize, "f_frsize");
    assert_eq!(a.f_blocks, b.f_blocks, "f_blocks");
    assert_eq!(a.f_files, b.f_files, "f_files");
    assert_eq!(a.f_namemax, b.f_namemax, "f_namemax");
    // Free space is the backing file system's (give or take what others use meanwhile).
    let close = |x: u64, y: u64| x.abs_diff(y) <= y / 100 + 1024;
    assert!(
        close(a.f_bfree, b.f_bfree),
        "f_bfree {} vs {}",
        a.f_bfree,
        b.f_bfree
    );
    assert!(
        close(a.f_bavail, b.f_bavail),
        "f_bavail {} vs {}",
        a.f_bavail,
        b.f_bavail
    );
    assert!(
        close(a.f_ffree, b.f_ffree),
        "f_ffree {} vs {}",
        a.f_ffree,
        b.f_ffree
    );
    finish(m, args);
}

// ---- mmap --------------------------------------------------------------------------------

fn mmap_shared(args: &[&str]) {
    let m = Mount::with_args(args);
    const LEN: usize = 3 * 4096;
    let path = m.path("mapped");
    fs::write(&path, pattern(0, LEN)).unwrap();
    let mut expected = pattern(0, LEN);
    {
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let reader = File::open(&path).unwrap();
        let mut map = Map::new(&rw, LEN, libc::PROT_READ | libc::PROT_WRITE);
        assert!(map.bytes()[..] == expected[..], "mapping shows the file");
        map.bytes_mut()[100..110].copy_from_slice(b"via mmap 1");
        map.bytes_mut()[2 * 4096 + 5..2 * 4096 + 15].copy_from_slice(b"via mmap 2");
        expected[100..110].copy_from_slice(b"via mmap 1");
        expected[2 * 4096 + 5..2 * 4096 + 15].copy_from_slice(b"via mmap 2");
        // Another descriptor's read(2) sees the stores at once.
        let mut buf = vec![0u8; LEN];
        reader.read_exact_at(&mut buf, 0).unwrap();
        assert!(
            buf == expected,
            "read(2) from another fd after stores to the mapping"
        );
        // A second mapping, through another descriptor, sees them too.
        let other = File::open(&path).unwrap();
        let map2 = Map::new(&other, LEN, libc::PROT_READ);
        assert!(map2.bytes()[..] == expected[..], "a second mapping");
        // A write(2) shows in the mapping.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"via write", 4096)
            .unwrap();
        expected[4096..4105].copy_from_slice(b"via write");
        assert!(
            map.bytes()[..] == expected[..],
            "a write(2) shows in the mapping"
        );
        map.sync();
        let backing = fs::read(m.backing_path("mapped")).unwrap();
        assert!(backing == expected, "the backing file after msync");
    }
    assert!(fs::read(&path).unwrap() == expected);
    assert_same_meta(&m, "mapped");

    // Written-back pages land where they were mapped, even from an O_APPEND descriptor.
    let log = m.path("log");
    fs::write(&log, vec![b'a'; 8192]).unwrap();
    {
        // An O_APPEND descriptor (as fopen "a+" gives) mapped MAP_SHARED: stores to the
        // mapping go where they were made, appends go to the end.
        let mut app = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut map = Map::new(&app, 8192, libc::PROT_READ | libc::PROT_WRITE);
        map.bytes_mut()[..5].copy_from_slice(b"HELLO");
        map.sync();
        app.write_all(b"tail").unwrap();
        map.bytes_mut()[8000..8003].copy_from_slice(b"END");
        drop(map);
    }
    let mut want = vec![b'a'; 8192];
    want[..5].copy_from_slice(b"HELLO");
    want[8000..8003].copy_from_slice(b"END");
    want.extend_from_slice(b"tail");
    let got = fs::read(m.backing_path("log")).unwrap();
    assert_eq!(
        got.len(),
        want.len(),
        "size of the backing file after mmap writeback and an append"
    );
    assert!(
        got == want,
        "mmap writeback through walfs went to the wrong place"
    );
    assert!(fs::read(&log).unwrap() == want);
    assert_same_meta(&m, "log");
    finish(m, args);
}

// ---- creation modes, read-only, passthrough ----------------------------------------------

/// Files are created with the mode the caller asked for under the caller's umask, whatever
/// the daemon's own umask is.
fn creation_modes(args: &[&str]) {
    let m = Mount::with_args(args);
    let script = "umask 000 && mkdir d0 && : > f0 && mkfifo p0 && \
                  umask 027 && mkdir d27 && : > f27 && mkfifo p27 && \
                  umask 000 && ln -s f0 l0";
    on_both(&m, |c| {
        let status = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&c.root)
            .status()
            .unwrap();
        assert!(status.success(), "sh on the {}", c.label);
        ["d0", "f0", "p0", "d27", "f27", "p27", "l0"]
            .map(|n| format!("{n} {:o}", lmeta(&c.p(n)).mode))
    });
    let modes = [("d0", 0o777), ("f0", 0o666), ("d27", 0o750), ("f27", 0o640)];
    for (n, want) in modes {
        assert_eq!(lmeta(&m.path(n)).mode & 0o7777, want, "mode of {n}");
    }
    finish(m, args);
}

fn read_only(args: &[&str]) {
    let mut m = Mount::with_args(args);
    m.stop();
    fs::create_dir(m.backing_path("d")).unwrap();
    fs::write(m.backing_path("d/f"), pattern(0, 50_000)).unwrap();
    std::os::unix::fs::symlink("d/f", m.backing_path("l")).unwrap();
    setxattr(&m.backing_path("d/f"), "user.k", b"v", 0).unwrap();
    let mut ro_args = args.to_vec();
    ro_args.push("--read-only");
    m.start(&ro_args);

    assert_same_tree(&m.mountpoint, &m.backing, Compare::Backing, false);
    let f = m.path("d/f");
    assert!(fs::read(&f).unwrap() == pattern(0, 50_000));
    assert!(fs::read(m.path("l")).unwrap() == pattern(0, 50_000));
    assert_eq!(getxattr(&f, "user.k").unwrap(), b"v");
    {
        let file = File::open(&f).unwrap();
        let map = Map::new(&file, 8192, libc::PROT_READ);
        assert!(map.bytes()[..] == pattern(0, 8192)[..]);
    }
    let erofs = |what: &str, r: io::Result<()>| {
        assert_eq!(errname(errno_of(what, r)), errname(libc::EROFS), "{what}");
    };
    assert!(access(&f, libc::R_OK).is_ok());
    erofs("access W_OK", access(&f, libc::W_OK));
    erofs(
        "open for writing",
        OpenOptions::new().write(true).open(&f).map(drop),
    );
    erofs(
        "O_TRUNC",
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_TRUNC)
            .open(&f)
            .map(drop),
    );
    erofs("create", File::create(m.path("new")).map(drop));
    erofs("mkdir", fs::create_dir(m.path("newdir")));
    erofs("mkfifo", mkfifo(&m.path("fifo"), 0o600));
    erofs("symlink", std::os::unix::fs::symlink("x", m.path("sl")));
    erofs("link", fs::hard_link(&f, m.path("hl")));
    erofs("unlink", fs::remove_file(&f));
    erofs("rmdir", fs::remove_dir(m.path("d")));
    erofs("rename", fs::rename(&f, m.path("d/g")));
    erofs(
        "chmod",
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)),
    );
    erofs("chown", std::os::unix::fs::chown(&f, Some(65534), None));
    erofs("truncate", truncate_path(&f, 0));
    erofs("utimensat", utimensat(&f, ts(1, 1), ts(1, 1), 0));
    erofs("setxattr", setxattr(&f, "user.k", b"w", 0));
    erofs("removexattr", removexattr(&f, "user.k"));
    {
        let file = File::open(&f).unwrap();
        // SAFETY: a mapping request that must fail; nothing is mapped on failure.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_eq!(
            p,
            libc::MAP_FAILED,
            "a writable shared mapping of a read-only descriptor"
        );
    }
    assert_same_tree(&m.mountpoint, &m.backing, Compare::Backing, false);
    assert_eq!(getxattr(&m.backing_path("d/f"), "user.k").unwrap(), b"v");
    finish(m, args);
}

/// With passthrough, reads go straight to the backing file: a change made there behind
/// walfs's back shows at once through a descriptor opened before it.
#[test]
fn passthrough_reads_reach_the_backing_file() {
    let m = Mount::with_args(PASSTHROUGH);
    let path = m.path("p");
    fs::write(&path, b"before").unwrap();
    let f = File::open(&path).unwrap();
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"before");
    OpenOptions::new()
        .write(true)
        .open(m.backing_path("p"))
        .unwrap()
        .write_all_at(b"AFTER!", 0)
        .unwrap();
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(
        &buf, b"AFTER!",
        "read did not go through kernel passthrough"
    );
    drop(f);
    finish(m, PASSTHROUGH);
}

/// Every scenario, once with kernel passthrough and once with --no-passthrough.
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod passthrough {
            $( #[test] fn $name() { super::$name(super::PASSTHROUGH) } )*
        }
        mod page_cache {
            $( #[test] fn $name() { super::$name(super::PAGE_CACHE) } )*
        }
    };
}

both_modes!(
    nested_directories,
    large_directory,
    write_read_append,
    trunc_and_excl,
    o_direct,
    large_file,
    preexisting_files,
    symlinks,
    hard_links,
    renames,
    unlink_rmdir,
    unlink_open_file,
    truncate,
    fallocate_ops,
    chmod_chown,
    unprivileged_truncate,
    utimens,
    xattrs,
    statfs,
    mmap_shared,
    creation_modes,
    read_only,
);

//! Thin, safe wrappers over the Linux system calls the passthrough filesystem makes on the
//! backing directory. All of walfs's `unsafe` for file-system calls lives here: each call
//! takes Rust-owned buffers and descriptors, and turns `-1` into the caller's `errno`.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

pub type Result<T> = std::result::Result<T, io::Error>;

fn check(ret: libc::c_int) -> Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

pub fn cstr(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `/proc/self/fd/N`: reopens or addresses the file behind an `O_PATH` descriptor.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

const EMPTY: &CStr = c"";

pub fn openat(dir: Option<BorrowedFd<'_>>, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `name` is a valid NUL-terminated string; on success the kernel returns a new
    // descriptor that nothing else owns.
    let fd = check(unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `name` in `dir` as an `O_PATH` handle, not following a final symlink.
pub fn open_path(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd> {
    openat(Some(dir), name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Opens the file behind an `O_PATH` handle for I/O with the given open flags.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> Result<OwnedFd> {
    let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW);
    openat(None, &proc_path(fd), flags, 0)
}

/// A new `O_PATH` handle for the file behind an open (or `O_PATH`) descriptor.
pub fn reopen_path(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    openat(None, &proc_path(fd), libc::O_PATH, 0)
}

pub fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is a valid out-pointer; AT_EMPTY_PATH stats the descriptor itself.
    check(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: valid string and out-pointer.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> Result<()> {
    // SAFETY: valid string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> Result<()> {
    // SAFETY: valid string.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    // SAFETY: valid strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// Creates a hard link to the file behind an `O_PATH` handle.
pub fn link_fd(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    let src = proc_path(fd);
    // SAFETY: valid strings; AT_SYMLINK_FOLLOW resolves the /proc magic link to the file.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            src.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> Result<()> {
    // SAFETY: valid string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
    flags: u32,
) -> Result<()> {
    // SAFETY: valid strings.
    check(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            oldname.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn readlink_fd(fd: BorrowedFd<'_>) -> Result<OsString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is writable for its length; an empty path reads the link the fd names.
    let n = check_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(OsString::from_vec(buf))
}

/// The absolute backing path an `O_PATH` handle currently points at.
pub fn fd_path(fd: BorrowedFd<'_>) -> Result<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

pub fn fchownat_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> Result<()> {
    // SAFETY: plain integers; AT_EMPTY_PATH changes the file the descriptor names.
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn chmod_path(path: &CStr, mode: u32) -> Result<()> {
    // SAFETY: valid string.
    check(unsafe { libc::chmod(path.as_ptr(), mode) }).map(drop)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> Result<()> {
    // SAFETY: plain integers.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> Result<()> {
    // SAFETY: plain integers.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }).map(drop)
}

pub fn truncate_path(path: &CStr, size: u64) -> Result<()> {
    // SAFETY: valid string.
    check(unsafe { libc::truncate(path.as_ptr(), size as libc::off_t) }).map(drop)
}

/// Sets access and modification times. `None` leaves a time unchanged (UTIME_OMIT).
/// `fd` is an open file, or an `O_PATH` handle when `path_only` is set.
pub fn utimens(
    fd: BorrowedFd<'_>,
    path_only: bool,
    atime: Option<libc::timespec>,
    mtime: Option<libc::timespec>,
) -> Result<()> {
    let omit = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_OMIT,
    };
    let times = [atime.unwrap_or(omit), mtime.unwrap_or(omit)];
    // SAFETY: `times` points at two valid timespecs; the path (if any) is valid.
    check(unsafe {
        if path_only {
            libc::utimensat(
                fd.as_raw_fd(),
                EMPTY.as_ptr(),
                times.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        } else {
            libc::futimens(fd.as_raw_fd(), times.as_ptr())
        }
    })
    .map(drop)
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> Result<()> {
    // SAFETY: plain integer.
    check(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> Result<()> {
    // SAFETY: plain integers.
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(drop)
}

pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> Result<i64> {
    // SAFETY: plain integers.
    let ret = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the slice is writable for the length passed.
        let n = check_size(unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        })?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> Result<usize> {
    // SAFETY: the slice is readable for the length passed. With O_APPEND, Linux's pwrite
    // appends, which is what the kernel asked for.
    check_size(unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    })
}

pub fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: u64,
    fd_out: BorrowedFd<'_>,
    off_out: u64,
    len: u64,
    flags: u32,
) -> Result<usize> {
    let mut off_in = off_in as libc::loff_t;
    let mut off_out = off_out as libc::loff_t;
    // SAFETY: offsets are valid in/out pointers for the duration of the call.
    check_size(unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            &mut off_in,
            fd_out.as_raw_fd(),
            &mut off_out,
            len as usize,
            flags,
        )
    })
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> Result<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: valid out-pointer.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

/// Extended-attribute calls address the file by its `/proc/self/fd` path; `O_PATH`
/// descriptors do not support the `f*xattr` calls.
pub fn getxattr(path: &CStr, name: &CStr, buf: &mut [u8]) -> Result<usize> {
    // SAFETY: valid strings; `buf` writable for its length (a zero length asks the size).
    check_size(unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

pub fn setxattr(path: &CStr, name: &CStr, value: &[u8], flags: i32) -> Result<()> {
    // SAFETY: valid strings and slice.
    check(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn listxattr(path: &CStr, buf: &mut [u8]) -> Result<usize> {
    // SAFETY: valid string; `buf` writable for its length.
    check_size(unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn removexattr(path: &CStr, name: &CStr) -> Result<()> {
    // SAFETY: valid strings.
    check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}

/// One entry of a directory read with `getdents64`.
pub struct DirEntry {
    pub ino: u64,
    /// Opaque position of the entry after this one, for `lseek` on the directory.
    pub next_offset: i64,
    pub kind: u8,
    pub name: OsString,
}

/// Reads the next batch of entries from an open directory descriptor, starting at `offset`.
pub fn read_dir_at(fd: BorrowedFd<'_>, offset: i64) -> Result<Vec<DirEntry>> {
    lseek(fd, offset, libc::SEEK_SET)?;
    let mut buf = vec![0u8; 32 * 1024];
    // SAFETY: `buf` is writable for its length; getdents64 fills it with whole records.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    /// `N` bytes of `b` from `at` (the loop checks the record's length first).
    fn bytes_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
        let mut w = [0u8; N];
        w.copy_from_slice(&b[at..at + N]);
        w
    }
    let mut out = Vec::new();
    let mut pos = 0usize;
    let n = n as usize;
    // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
    while pos + 19 <= n {
        let ino = u64::from_ne_bytes(bytes_at(&buf, pos));
        let off = i64::from_ne_bytes(bytes_at(&buf, pos + 8));
        let reclen = u16::from_ne_bytes(bytes_at(&buf, pos + 16)) as usize;
        if reclen < 19 || pos + reclen > n {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "getdents64 returned a malformed record",
            ));
        }
        let kind = buf[pos + 18];
        let name_bytes = &buf[pos + 19..pos + reclen];
        let len = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        out.push(DirEntry {
            ino,
            next_offset: off,
            kind,
            name: OsStr::from_bytes(&name_bytes[..len]).to_owned(),
        });
        pos += reclen;
    }
    Ok(out)
}

/// Switches this thread's file-system identity to a caller's, for calls that create files
/// (so ownership, set-group-ID directories and permission checks are the kernel's own).
/// Linux keeps fsuid, fsgid and supplementary groups per thread when set with raw syscalls.
pub struct CallerIdentity {
    saved_groups: Vec<libc::gid_t>,
}

impl CallerIdentity {
    /// Takes the caller's identity, or fails with `EPERM` if the kernel did not switch
    /// it (the thread then keeps the daemon's own: files are never created as the daemon
    /// for a caller by mistake).
    pub fn assume(uid: u32, gid: u32, groups: &[libc::gid_t]) -> Result<CallerIdentity> {
        // SAFETY: getgroups with a zero length only returns the count.
        let count = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let mut saved = vec![0; count.max(0) as usize];
        // SAFETY: `saved` has room for `count` groups.
        let got = unsafe { libc::getgroups(saved.len() as i32, saved.as_mut_ptr()) };
        saved.truncate(got.max(0) as usize);
        let guard = CallerIdentity {
            saved_groups: saved,
        };
        // SAFETY: raw syscalls change only this thread's credentials (unlike glibc's
        // setgroups, which broadcasts to every thread). The guard restores them on drop,
        // also when this returns an error.
        if unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        set_fs_id(libc::SYS_setfsgid, gid)?;
        set_fs_id(libc::SYS_setfsuid, uid)?;
        Ok(guard)
    }
}

/// `setfsuid` or `setfsgid` (`call`) to `id`, checked. Neither reports an error: each
/// returns the previous value. Called again with -1, which is never a valid id and so
/// changes nothing, it returns the current one.
fn set_fs_id(call: libc::c_long, id: u32) -> Result<()> {
    // SAFETY: the calls change only this thread's file-system identity.
    let now = unsafe {
        libc::syscall(call, id);
        libc::syscall(call, u32::MAX)
    };
    if now as u32 == id {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

impl Drop for CallerIdentity {
    fn drop(&mut self) {
        // SAFETY: as in `assume`: thread-local credential changes back to the daemon's own.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let restored = set_fs_id(libc::SYS_setfsuid, uid)
            .and_then(|()| set_fs_id(libc::SYS_setfsgid, gid))
            .and_then(|()| {
                // SAFETY: `saved_groups` is the list `getgroups` returned.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_setgroups,
                        self.saved_groups.len(),
                        self.saved_groups.as_ptr(),
                    )
                };
                if rc < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
        if let Err(e) = restored {
            // Nothing can be undone here; what this thread creates next would not be
            // owned as it should be. This is a bug or a broken kernel, not a user error.
            tracing::error!(
                "cannot restore walfs's own file-system identity after acting for a caller ({e}); this is a bug in walfs: please report it"
            );
        }
    }
}

/// Supplementary groups of a process, from `/proc/PID/status`.
pub fn process_groups(pid: u32) -> Vec<libc::gid_t> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The `f_type` magic of the filesystem holding `path`.
pub fn fs_type(path: &std::path::Path) -> Option<i64> {
    let c = cstr(path.as_os_str()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: valid path string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: initialised by the successful statfs.
    Some(unsafe { st.assume_init() }.f_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's file-system user and group ids.
    fn fs_ids() -> (u32, u32) {
        // SAFETY: -1 changes nothing; the calls only return the current values.
        unsafe {
            (
                libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32,
                libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32,
            )
        }
    }

    /// Drops `CAP_SETUID` from this thread's effective capabilities (capabilities are per
    /// thread in Linux; a non-root thread has none to drop).
    fn drop_cap_setuid() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_SETUID: u32 = 7;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget and capset with a version 3 header take two data structs; pid 0
        // is this thread.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                0
            );
            data[0].effective &= !(1 << CAP_SETUID);
            assert_eq!(libc::syscall(libc::SYS_capset, &header, data.as_ptr()), 0);
        }
    }

    #[test]
    fn a_caller_identity_the_kernel_refuses_fails_and_keeps_the_daemons() {
        std::thread::spawn(|| {
            drop_cap_setuid();
            let before = fs_ids();
            // SAFETY: getgroups with a zero length only returns the count.
            let count = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
            let mut groups = vec![0; count.max(0) as usize];
            // SAFETY: `groups` has room for `count` groups.
            let got = unsafe { libc::getgroups(groups.len() as i32, groups.as_mut_ptr()) };
            groups.truncate(got.max(0) as usize);
            // As root without CAP_SETUID, setgroups and setfsgid succeed and setfsuid
            // silently does nothing; without root, setgroups already fails.
            let res = CallerIdentity::assume(before.0 + 4321, before.1, &groups);
            let err = res.err().expect("the switch must fail without CAP_SETUID");
            assert_eq!(err.raw_os_error(), Some(libc::EPERM));
            assert_eq!(fs_ids(), before, "the thread keeps the daemon's identity");
        })
        .join()
        .unwrap();
    }
}

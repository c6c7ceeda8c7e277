//! Test support shared by the unit tests of several modules (compiled only for tests).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A small tmpfs mounted at a directory for the life of the value: a filesystem that
/// fills up (ENOSPC) or can be made read-only (EROFS) on demand. Needs root.
pub struct Tmpfs {
    path: PathBuf,
}

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in test paths")
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (such as `"1m"`) at the existing directory `path`.
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        // SAFETY: plain getter.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test mounts a tmpfs: run it as root"
        );
        let fstype = CString::new("tmpfs").unwrap();
        let opts = CString::new(format!("size={size}")).unwrap();
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                c_path(path).as_ptr(),
                fstype.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", io::Error::last_os_error());
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Remounts it read-only.
    pub fn make_read_only(&self) {
        let fstype = CString::new("tmpfs").unwrap();
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                c_path(&self.path).as_ptr(),
                fstype.as_ptr(),
                libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "remount ro: {}", io::Error::last_os_error());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // SAFETY: a valid path string.
        unsafe { libc::umount2(c_path(&self.path).as_ptr(), libc::MNT_DETACH) };
    }
}

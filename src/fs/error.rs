//! The one error type of the filesystem layer. Every operation returns `FsError`, and the
//! FUSE adapter turns it into the errno the kernel sees, in one place.

use std::io;

/// An operation failed with this errno. For passthrough operations it is the backing
/// filesystem's own errno, unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsError(pub i32);

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub const EIO: FsError = FsError(libc::EIO);
    pub const ENOENT: FsError = FsError(libc::ENOENT);
    pub const EBADF: FsError = FsError(libc::EBADF);
    pub const EROFS: FsError = FsError(libc::EROFS);

    pub fn errno(self) -> i32 {
        self.0
    }
}

impl From<io::Error> for FsError {
    fn from(e: io::Error) -> FsError {
        FsError(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl std::fmt::Display for FsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for FsError {}

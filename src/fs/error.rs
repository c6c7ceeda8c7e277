//! The one error type of the filesystem layer. Every operation returns `FsError`, and the
//! FUSE adapter turns it into the errno the kernel sees, in one place (`fuse.rs`), where
//! an EIO that reaches the application is also logged once with its cause.

use std::fmt;
use std::io;

/// An operation failed with this errno. For passthrough operations it is the backing
/// filesystem's own errno, unchanged. An EIO carries its cause, for the one log line the
/// FUSE adapter writes when it reaches the application (unless the code that failed the
/// operation already logged it, with more context).
#[derive(Debug, Clone)]
pub struct FsError {
    errno: i32,
    cause: Option<String>,
    logged: bool,
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub const EIO: FsError = FsError::new(libc::EIO);
    pub const ENOENT: FsError = FsError::new(libc::ENOENT);
    pub const EBADF: FsError = FsError::new(libc::EBADF);
    pub const EROFS: FsError = FsError::new(libc::EROFS);
    pub const ESTALE: FsError = FsError::new(libc::ESTALE);
    pub const ENOTTY: FsError = FsError::new(libc::ENOTTY);

    /// The errno `errno`, with no cause to report.
    pub const fn new(errno: i32) -> FsError {
        FsError {
            errno,
            cause: None,
            logged: false,
        }
    }

    /// An EIO whose cause the caller has already logged (with the operation's context).
    pub fn eio_logged() -> FsError {
        FsError {
            logged: true,
            ..FsError::EIO
        }
    }

    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// What caused the error, when known.
    pub fn cause(&self) -> Option<&str> {
        self.cause.as_deref()
    }

    /// Whether this error still needs its log line (an EIO not logged yet).
    pub fn needs_log(&self) -> bool {
        self.errno == libc::EIO && !self.logged
    }
}

/// Errors compare by errno: the cause is for the log.
impl PartialEq for FsError {
    fn eq(&self, other: &FsError) -> bool {
        self.errno == other.errno
    }
}

impl Eq for FsError {}

/// The backing filesystem's errno; an error without one (walfs's own) is an EIO whose
/// cause is kept.
impl From<io::Error> for FsError {
    fn from(e: io::Error) -> FsError {
        match e.raw_os_error() {
            Some(libc::EIO) => FsError {
                cause: Some(format!("the backing filesystem: {e}")),
                ..FsError::EIO
            },
            Some(errno) => FsError::new(errno),
            None => FsError {
                cause: Some(e.to_string()),
                ..FsError::EIO
            },
        }
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.errno))?;
        if let Some(c) = &self.cause {
            write!(f, " ({c})")?;
        }
        Ok(())
    }
}

impl std::error::Error for FsError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_without_an_errno_is_an_eio_that_keeps_its_cause() {
        let e = FsError::from(io::Error::other("staging is full"));
        assert_eq!(e, FsError::EIO);
        assert!(e.needs_log());
        assert_eq!(e.cause(), Some("staging is full"));
        let e = FsError::from(io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(!e.needs_log());
        assert!(!FsError::eio_logged().needs_log());
    }
}

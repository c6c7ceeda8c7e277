//! The one error type of the staging area. Staging only ever fails because its own
//! directory cannot be written, read or made durable (a full disk, a read-only or failing
//! filesystem), so the error is an I/O error; its type tells the layers above that it came
//! from staging and not from the files being captured. Capture turns it into the single
//! failure an application may see (EIO at a barrier whose transactions must be durable).

use std::fmt;
use std::io;

/// An I/O failure in the staging directory.
#[derive(Debug)]
pub struct StagingError(io::Error);

/// The result of a staging operation.
pub type StagingResult<T> = Result<T, StagingError>;

impl StagingError {
    /// The underlying I/O error.
    pub fn io(&self) -> &io::Error {
        &self.0
    }

    /// The OS error number, if the failure came from a system call.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.0.raw_os_error()
    }

    /// The kind of the underlying I/O error.
    pub fn kind(&self) -> io::ErrorKind {
        self.0.kind()
    }
}

impl From<io::Error> for StagingError {
    fn from(e: io::Error) -> StagingError {
        StagingError(e)
    }
}

impl From<StagingError> for io::Error {
    fn from(e: StagingError) -> io::Error {
        e.0
    }
}

impl fmt::Display for StagingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "staging: {}", self.0)
    }
}

impl std::error::Error for StagingError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

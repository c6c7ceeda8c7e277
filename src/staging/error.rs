//! The one error type of the staging area. Staging fails because its own directory cannot
//! be written, read or made durable (a full disk, a read-only or failing filesystem), because
//! a staged file does not hold what staging wrote there, or because a caller broke one of its
//! rules (a bug in walfs). Its type tells the layers above that the failure came from staging
//! and not from the files being captured. Capture turns any of them into the single failure
//! an application may see (EIO at a barrier whose transactions must be durable).

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::ltx::LtxError;

/// A failure of the staging area.
#[derive(Debug)]
pub enum StagingError {
    /// The staging directory could not be read, written or made durable.
    Io(io::Error),
    /// A staged file does not hold what staging wrote (a state file that fails its check).
    Corrupt { path: PathBuf, what: String },
    /// A staged snapshot could not be encoded (anything but an I/O failure: pages out of
    /// order, a page of the wrong size).
    Ltx(LtxError),
    /// A bug in walfs, not a problem of the disk: a caller broke one of staging's rules, or
    /// its sync thread stopped.
    Internal(String),
}

/// The result of a staging operation.
pub type StagingResult<T> = Result<T, StagingError>;

impl StagingError {
    /// A bug in walfs (see [`StagingError::Internal`]).
    pub(crate) fn internal(what: impl Into<String>) -> StagingError {
        StagingError::Internal(what.into())
    }

    /// What the operator can do about it, for the one line that reports it.
    pub fn hint(&self) -> &'static str {
        match self {
            StagingError::Io(_) => "free space or fix the staging directory",
            StagingError::Corrupt { .. } => "check the disk that holds the staging directory",
            StagingError::Ltx(_) | StagingError::Internal(_) => {
                "this is a bug in walfs: please report it with this log"
            }
        }
    }

    /// The OS error number, if the failure came from a system call.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StagingError::Io(e) => e.raw_os_error(),
            _ => None,
        }
    }

    /// The kind of the failure, as an I/O error kind: a staged file that fails its check is
    /// `InvalidData`, a bug `InvalidInput`.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            StagingError::Io(e) => e.kind(),
            StagingError::Corrupt { .. } => io::ErrorKind::InvalidData,
            StagingError::Ltx(_) | StagingError::Internal(_) => io::ErrorKind::InvalidInput,
        }
    }
}

impl From<io::Error> for StagingError {
    fn from(e: io::Error) -> StagingError {
        StagingError::Io(e)
    }
}

impl From<LtxError> for StagingError {
    fn from(e: LtxError) -> StagingError {
        match e {
            LtxError::Io(e) => StagingError::Io(e),
            other => StagingError::Ltx(other),
        }
    }
}

impl fmt::Display for StagingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StagingError::Io(e) => write!(f, "staging: {e}"),
            StagingError::Corrupt { path, what } => {
                write!(f, "staging: corrupt {}: {what}", path.display())
            }
            StagingError::Ltx(e) => write!(f, "staging: a snapshot cannot be encoded: {e}"),
            StagingError::Internal(what) => write!(f, "staging: {what} (a bug in walfs)"),
        }
    }
}

impl std::error::Error for StagingError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // Io and Ltx print their error's text already: the chain goes on with its source.
        match self {
            StagingError::Io(e) => e.source(),
            StagingError::Ltx(e) => e.source(),
            StagingError::Corrupt { .. } | StagingError::Internal(_) => None,
        }
    }
}

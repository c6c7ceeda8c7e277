//! The errors of the replica layer: [`StoreError`] (the store and URL: one line that names
//! the object or URL and says what to do, and its [`StoreErrorKind`] for callers that branch
//! on it), and [`ReplicaError`] (upload, maintenance, verification records), which wraps it
//! and the errors of the layers below.

use std::error::Error;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::ltx::LtxError;
use crate::staging::StagingError;

/// What kind of failure a [`StoreError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The replica URL or its settings are malformed.
    InvalidUrl,
    /// A database path or object key is not valid in the layout.
    InvalidPath,
    /// The object does not exist.
    NotFound,
    /// A request to the store failed (after retries).
    Request,
    /// A write was not sent: this mount's lease on the replica lapsed or was taken over.
    Fenced,
    /// The object is encrypted with a key that was not given (no key, or only others).
    KeyNeeded,
    /// The object failed authentication (changed, cut short or moved after it was
    /// written), is not an encrypted object this walfs reads, or is plaintext where a key
    /// was given (`super::crypt`).
    Unauthentic,
}

/// A one-line error that names the object or URL and says what to do, and keeps the error
/// that caused it, if any.
///
/// The message already quotes the cause, so [`Error::source`] does not return it again: a
/// report that prints the source chain (`{:#}` in `walfs`'s `main`, joined by ": ") would
/// print the cause twice. Code that inspects the cause gets it from [`StoreError::cause`].
#[derive(Debug, Clone)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    cause: Option<Arc<dyn Error + Send + Sync>>,
}

impl StoreError {
    pub(super) fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        // Errors are one line: flatten any multi-line source text.
        let message = message.into().replace(['\n', '\r'], " ");
        StoreError {
            kind,
            message,
            cause: None,
        }
    }

    pub(super) fn url(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::InvalidUrl, message)
    }

    /// This error, caused by `cause` (which its message quotes).
    pub(super) fn caused_by(mut self, cause: impl Error + Send + Sync + 'static) -> Self {
        self.cause = Some(Arc::new(cause));
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// Whether the object did not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind == StoreErrorKind::NotFound
    }

    /// The error that caused this one (an `object_store::Error`, `std::io::Error`,
    /// `url::ParseError`, ...), if any; its text is already in this error's message.
    pub fn cause(&self) -> Option<&(dyn Error + Send + Sync + 'static)> {
        self.cause.as_deref()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// `source()` is `None`: the message quotes the cause (see [`StoreError`]).
impl Error for StoreError {}

/// What fails above the store: an upload, a maintenance step (compaction, snapshot,
/// retention), reading or writing a verification record or deletion marker, an LTX merge.
///
/// The wrapping variants (`Store`, `Staging`, `Ltx`, `Io`) are transparent: they print as
/// the error they wrap and `source()` is that error's own source, so a report that prints
/// the chain (`{:#}`) shows the wrapped error once, as it would unwrapped. Match on the
/// variant to get the wrapped error itself.
#[derive(Debug)]
pub enum ReplicaError {
    /// A request to the store failed.
    Store(StoreError),
    /// The staging directory failed.
    Staging(StagingError),
    /// An LTX file could not be encoded or decoded.
    Ltx(LtxError),
    /// A local file (a staged item, a local copy, a merge's output) failed.
    Io(io::Error),
    /// The LTX file at `path` could not be read or written: the message is the path and
    /// the LTX error (whose text it quotes, so `source()` is `None`; the error is the
    /// field).
    LtxFile { path: PathBuf, error: LtxError },
    /// A staged file cannot be uploaded as it is.
    StagedUnreadable { path: PathBuf, reason: String },
    /// What the replica holds, or what was given to merge, is malformed: a verification
    /// record or deletion marker, an LTX header, LTX files that do not fit together. The
    /// message names the object.
    Invalid(String),
    /// Staged transactions that could not be uploaded, and that no snapshot can supersede,
    /// were dropped (logged with the reason).
    StagedDropped,
    /// Staged transactions that cannot be uploaded wait for a snapshot to supersede them.
    AwaitingSnapshot,
    /// Settings the replica cannot honour.
    Settings(&'static str),
}

/// The result of a replica operation above the store.
pub type ReplicaResult<T> = Result<T, ReplicaError>;

impl ReplicaError {
    /// A write that was not sent because this mount's lease on the replica lapsed or was
    /// lost (`super::lease`): retried once the lease is renewed, and not worth a warning.
    pub fn is_fenced(&self) -> bool {
        matches!(self, ReplicaError::Store(e) if e.kind() == StoreErrorKind::Fenced)
    }

    /// The kind of the underlying I/O error, for the variants that have one.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            ReplicaError::Io(e) => Some(e.kind()),
            ReplicaError::Staging(e) => Some(e.kind()),
            _ => None,
        }
    }
}

impl fmt::Display for ReplicaError {
    /// One line; with `{:#}`, followed by each cause (`source()`), joined by ": ".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaError::Store(e) => write!(f, "{e}")?,
            ReplicaError::Staging(e) => write!(f, "{e}")?,
            ReplicaError::Ltx(e) => write!(f, "{e}")?,
            ReplicaError::Io(e) => write!(f, "{e}")?,
            ReplicaError::LtxFile { path, error } => match error {
                LtxError::Io(e) => write!(f, "{}: {e}", path.display())?,
                other => write!(f, "{}: {other}", path.display())?,
            },
            ReplicaError::StagedUnreadable { path, reason } => {
                write!(f, "staged file {} is unreadable: {reason}", path.display())?
            }
            ReplicaError::Invalid(m) => f.write_str(m)?,
            ReplicaError::StagedDropped => f.write_str("staged transactions were dropped")?,
            ReplicaError::AwaitingSnapshot => f.write_str(
                "waiting for a snapshot to supersede staged transactions that cannot be uploaded",
            )?,
            ReplicaError::Settings(m) => f.write_str(m)?,
        }
        if f.alternate() {
            write_causes(f, self)?;
        }
        Ok(())
    }
}

/// Writes the causes of `e` (its `source()` chain, `e` itself excluded), each after ": ":
/// what `{:#}` adds to an error's own line, in this crate's error types as in `main`'s
/// report.
pub fn write_causes(f: &mut fmt::Formatter<'_>, e: &dyn Error) -> fmt::Result {
    let mut next = e.source();
    while let Some(cause) = next {
        write!(f, ": {cause}")?;
        next = cause.source();
    }
    Ok(())
}

impl Error for ReplicaError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            ReplicaError::Store(e) => e.source(),
            ReplicaError::Staging(e) => e.source(),
            ReplicaError::Ltx(e) => e.source(),
            ReplicaError::Io(e) => e.source(),
            _ => None,
        }
    }
}

impl From<StoreError> for ReplicaError {
    fn from(e: StoreError) -> Self {
        ReplicaError::Store(e)
    }
}

impl From<StagingError> for ReplicaError {
    fn from(e: StagingError) -> Self {
        ReplicaError::Staging(e)
    }
}

impl From<LtxError> for ReplicaError {
    fn from(e: LtxError) -> Self {
        ReplicaError::Ltx(e)
    }
}

impl From<io::Error> for ReplicaError {
    fn from(e: io::Error) -> Self {
        ReplicaError::Io(e)
    }
}

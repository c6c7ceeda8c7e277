//! The errors of a replica's store and URL: [`StoreError`], one line that names the object
//! or URL and says what to do, and its [`StoreErrorKind`] for callers that branch on it.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

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
}

/// A one-line error that names the object or URL and says what to do, and keeps the error
/// that caused it, if any.
///
/// The message already quotes the cause, so [`Error::source`] does not return it again: a
/// report that prints the source chain (anyhow's `{:#}`, as `walfs` prints errors) would
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

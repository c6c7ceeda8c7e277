//! The errors of a replica's store and URL: [`StoreError`], one line that names the object
//! or URL and says what to do, and its [`StoreErrorKind`] for callers that branch on it.

use std::fmt;

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

/// A one-line error that names the object or URL and says what to do.
#[derive(Debug, Clone)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
}

impl StoreError {
    pub(super) fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        // Errors are one line: flatten any multi-line source text.
        let message = message.into().replace(['\n', '\r'], " ");
        StoreError { kind, message }
    }

    pub(super) fn url(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::InvalidUrl, message)
    }

    /// The kind of failure.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// Whether the object did not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind == StoreErrorKind::NotFound
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {}

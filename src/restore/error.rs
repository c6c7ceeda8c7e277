//! The error of restores, listing and the restore drill: [`RestoreError`].

use std::error::Error;
use std::fmt;
use std::io;

use crate::replica::error::{write_causes, ReplicaError, StoreError};

use super::plan::PlanError;

/// Why a restore, `walfs list` or `walfs verify` failed. Each message is one line.
///
/// The wrapping variants (`Plan`, `Replica`, `Store`, `Io`, `Sqlite`) are transparent: they
/// print as the error they wrap and `source()` is that error's own source, so a report that
/// prints the chain (`{:#}`, as `walfs` prints errors) shows the wrapped error once. A
/// [`RestoreError::Context`] prints only its own text and returns what it wraps from
/// `source()`: `{:#}` prints "context: cause".
#[derive(Debug)]
pub enum RestoreError {
    /// The database cannot be restored at the requested point.
    Plan(PlanError),
    /// Reading a verification record, deletion marker or LTX header failed.
    Replica(ReplicaError),
    /// A request to the store failed.
    Store(StoreError),
    /// A local file (the output, its temporary file, its directory) failed.
    Io(io::Error),
    /// SQLite failed to open or check the restored file.
    Sqlite(rusqlite::Error),
    /// The arguments do not fit the replica (both `--txid` and `--timestamp`, no such
    /// database, several databases where one is needed, ...); the message says what to pass.
    Usage(String),
    /// The output cannot be written (it exists, is a directory, ...).
    Output(String),
    /// The replica does not verify: a corrupt object, a checksum or header that does not
    /// match, `PRAGMA integrity_check` failing, a malformed marker.
    Corrupt(String),
    /// Some of several databases or checks failed; the message counts them and quotes them.
    Incomplete(String),
    /// `what` failed because of `source`.
    Context {
        what: String,
        source: Box<RestoreError>,
    },
}

/// The result of a restore, listing or drill step.
pub type RestoreResult<T> = Result<T, RestoreError>;

impl fmt::Display for RestoreError {
    /// One line; with `{:#}`, followed by each cause (`source()`), joined by ": ".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestoreError::Plan(e) => write!(f, "{e}")?,
            RestoreError::Replica(e) => write!(f, "{e}")?,
            RestoreError::Store(e) => write!(f, "{e}")?,
            RestoreError::Io(e) => write!(f, "{e}")?,
            RestoreError::Sqlite(e) => write!(f, "{e}")?,
            RestoreError::Usage(m)
            | RestoreError::Output(m)
            | RestoreError::Corrupt(m)
            | RestoreError::Incomplete(m) => f.write_str(m)?,
            RestoreError::Context { what, .. } => f.write_str(what)?,
        }
        if f.alternate() {
            write_causes(f, self)?;
        }
        Ok(())
    }
}

impl RestoreError {
    /// Whether this failed because an object that a listing named was gone when it was
    /// read: a live writer's compaction or retention removed it meanwhile. Planning again
    /// from a new listing can succeed.
    pub fn object_vanished(&self) -> bool {
        match self {
            RestoreError::Store(e) | RestoreError::Replica(ReplicaError::Store(e)) => {
                e.is_not_found()
            }
            RestoreError::Context { source, .. } => source.object_vanished(),
            _ => false,
        }
    }
}

impl Error for RestoreError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            RestoreError::Plan(e) => e.source(),
            RestoreError::Replica(e) => e.source(),
            RestoreError::Store(e) => e.source(),
            RestoreError::Io(e) => e.source(),
            RestoreError::Sqlite(e) => e.source(),
            RestoreError::Context { source, .. } => Some(source.as_ref()),
            RestoreError::Usage(_)
            | RestoreError::Output(_)
            | RestoreError::Corrupt(_)
            | RestoreError::Incomplete(_) => None,
        }
    }
}

impl From<PlanError> for RestoreError {
    fn from(e: PlanError) -> Self {
        RestoreError::Plan(e)
    }
}

impl From<ReplicaError> for RestoreError {
    fn from(e: ReplicaError) -> Self {
        RestoreError::Replica(e)
    }
}

impl From<StoreError> for RestoreError {
    fn from(e: StoreError) -> Self {
        RestoreError::Store(e)
    }
}

impl From<io::Error> for RestoreError {
    fn from(e: io::Error) -> Self {
        RestoreError::Io(e)
    }
}

impl From<rusqlite::Error> for RestoreError {
    fn from(e: rusqlite::Error) -> Self {
        RestoreError::Sqlite(e)
    }
}

/// Adds what was being done to an error, as [`RestoreError::Context`].
pub(crate) trait Context<T> {
    fn context(self, what: &str) -> RestoreResult<T>;
    fn with_context(self, what: impl FnOnce() -> String) -> RestoreResult<T>;
}

impl<T, E: Into<RestoreError>> Context<T> for Result<T, E> {
    fn context(self, what: &str) -> RestoreResult<T> {
        self.with_context(|| what.to_string())
    }

    fn with_context(self, what: impl FnOnce() -> String) -> RestoreResult<T> {
        self.map_err(|e| RestoreError::Context {
            what: what(),
            source: Box::new(e.into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{:#}` (the chain joined by ": ", as `walfs` prints errors) shows a context and its cause once
    /// each, and a transparent variant as the error it wraps.
    #[test]
    fn chains_print_each_cause_once() {
        fn chain(e: &dyn Error) -> String {
            let mut s = e.to_string();
            let mut next = e.source();
            while let Some(c) = next {
                s.push_str(&format!(": {c}"));
                next = c.source();
            }
            s
        }
        let io = || io::Error::new(io::ErrorKind::NotFound, "gone");
        let e: RestoreResult<()> = Err(io()).context("cannot create /x");
        let e = e.unwrap_err();
        assert_eq!(e.to_string(), "cannot create /x");
        assert_eq!(chain(&e), "cannot create /x: gone");
        assert_eq!(format!("{e:#}"), "cannot create /x: gone");
        let e = RestoreError::Context {
            what: "cannot list a.db".into(),
            source: Box::new(e),
        };
        assert_eq!(format!("{e:#}"), "cannot list a.db: cannot create /x: gone");
        assert_eq!(format!("{e}"), "cannot list a.db");
        let e = RestoreError::from(io());
        assert_eq!(chain(&e), "gone");
        let e = RestoreError::Usage("pass --db".into());
        assert_eq!(chain(&e), "pass --db");
    }
}

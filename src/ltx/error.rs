//! The error type of LTX encoding and decoding.

use std::fmt;
use std::io;

/// What went wrong while encoding or decoding an LTX file.
#[derive(Debug)]
pub enum LtxError {
    /// The underlying reader or writer failed.
    Io(io::Error),
    /// The input ended inside `section`, which starts at byte `offset`.
    Truncated { section: &'static str, offset: u64 },
    /// The file breaks the format at or near byte `offset`.
    Corrupt { offset: u64, message: String },
    /// The file checksum in the trailer does not match the content.
    FileChecksumMismatch { stored: u64, computed: u64 },
    /// A snapshot's post-apply checksum does not match its pages.
    PostApplyChecksumMismatch { stored: u64, computed: u64 },
    /// The caller asked the encoder or decoder for something the format does not allow.
    Usage(String),
}

impl fmt::Display for LtxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LtxError::Io(e) => write!(f, "LTX I/O error: {e}"),
            LtxError::Truncated { section, offset } => write!(
                f,
                "LTX file is truncated: it ends inside the {section} that starts at byte {offset}"
            ),
            LtxError::Corrupt { offset, message } => {
                write!(f, "corrupt LTX file at byte {offset}: {message}")
            }
            LtxError::FileChecksumMismatch { stored, computed } => write!(
                f,
                "corrupt LTX file: file checksum mismatch (trailer has {stored:016x}, content gives {computed:016x})"
            ),
            LtxError::PostApplyChecksumMismatch { stored, computed } => write!(
                f,
                "corrupt LTX snapshot: post-apply checksum in the trailer ({stored:016x}) does not match its pages ({computed:016x})"
            ),
            LtxError::Usage(message) => write!(f, "invalid LTX use: {message}"),
        }
    }
}

impl std::error::Error for LtxError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LtxError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for LtxError {
    fn from(e: io::Error) -> Self {
        LtxError::Io(e)
    }
}

pub(super) fn corrupt(offset: u64, message: impl Into<String>) -> LtxError {
    LtxError::Corrupt {
        offset,
        message: message.into(),
    }
}

//! The replica: its object layout and store, upload, compaction and retention (the LTX
//! format itself is [`crate::ltx`]).

pub mod compact;
pub mod error;
pub mod kept;
pub mod layout;
pub mod maintain;
pub mod record;
pub mod retention;
pub mod store;
pub mod timestamp;
pub mod upload;
pub mod url;

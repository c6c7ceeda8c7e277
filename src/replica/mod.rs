//! The replica: its URL, object layout and store, upload, compaction and retention (the LTX
//! format itself is [`crate::ltx`]).
//!
//! The store, one idea a file: [`url`] (where a replica lives), [`layout`] (the key of each
//! object), [`store`] (put, get, head, list, delete), [`error`] (what fails) and
//! [`timestamp`] (the RFC 3339 times objects carry); [`lease`] keeps one writer per
//! replica; [`crypt`] encrypts what the store writes (`--encryption-key-file`); [`sync`] makes a commit wait until the replica holds it
//! (`--sync-replication`); [`fanout`] lets each replica upload on its own; [`feed`] tells followers what changed.

pub mod compact;
pub mod crypt;
pub mod error;
pub mod fanout;
pub mod feed;
pub mod kept;
pub mod layout;
pub mod lease;
pub mod maintain;
pub mod progress;
pub mod record;
pub mod retention;
pub mod store;
pub mod sync;
pub mod timestamp;
pub mod upload;
pub mod url;

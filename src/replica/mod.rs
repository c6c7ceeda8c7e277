//! The replica: LTX encoding, object layout, upload, compaction and retention.

pub mod compact;
pub mod ltx;
pub mod maintain;
pub mod record;
pub mod retention;
pub mod store;
pub mod upload;

#[cfg(test)]
mod ltx_interop_tests;

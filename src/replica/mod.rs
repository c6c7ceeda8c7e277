//! The replica: LTX encoding, object layout, upload, compaction and retention.

pub mod ltx;
pub mod record;
pub mod store;
pub mod upload;

#[cfg(test)]
mod ltx_interop_tests;

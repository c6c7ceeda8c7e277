//! The replica: LTX encoding, object layout, upload, compaction and retention.

pub mod ltx;

#[cfg(test)]
mod ltx_interop_tests;

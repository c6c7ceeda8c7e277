//! walfs: a FUSE filesystem that mirrors a backing directory so that any unmodified SQLite
//! program under the mountpoint can be replicated and restored.
//!
//! Data flows one way through the modules:
//! - `fs`: the FUSE layer, a passthrough mirror with a hook at SQLite's barriers;
//! - `sqlite`: SQLite's on-disk formats (database header, WAL, rollback journal);
//! - `ltx`: the LTX file format of Litestream 0.5 replicas;
//! - `capture`: per-database capture of commits at SQLite's barriers, FUSE-agnostic;
//! - `staging`: the durable local staging area where captured transactions wait, as LTX
//!   files, for upload;
//! - `replica`: the replica's object store (file://, s3://, abs://, gs://, in Litestream 0.5's
//!   layout), upload, compaction and retention;
//! - `replicate`: capture, staging and upload wired together for one mount;
//! - `restore`: restore plans, verified restores and listing;
//! - `mount`: the `walfs mount` lifecycle (checks, session, signals);
//! - `ready`: readiness (systemd's READY=1 and STOPPING=1, `--ready-file`, `walfs wait`);
//! - `run`: `walfs run`, the container entrypoint (restore if empty, mount, run a command);
//! - `follow`: `walfs follow`, a read-only mount of a replica on another host (the flow
//!   reversed: replica → versions of each database → a FUSE adapter of its own);
//! - `config`: the `walfs mount --config` file, turned into arguments before clap parses;
//! - `observe`: a running mount's metrics endpoint (`--metrics-addr`) and status socket
//!   (`walfs status`);
//! - `flags`: the parsers of command-line values (durations, seconds, TXIDs) that the
//!   option structs of the other modules name in their clap attributes.
//!
//! Imports go one way, down these layers (`layering.rs` checks it): `testing` (test
//! helpers) and `flags` → `sqlite` → `ltx` → `fs` and `staging` → `capture` (an `fs`
//! observer that writes into staging) and `replica` (which uploads from staging) →
//! `restore`. Modules of one layer do not import each other. `replicate`, `mount`, `ready`,
//! `run`, `follow`, `config`, `main` and the binaries wire them together and may import
//! anything.

pub mod capture;
pub mod config;
pub mod flags;
pub mod follow;
pub mod fs;
#[cfg(test)]
mod layering;
pub mod ltx;
pub mod mount;
pub mod observe;
pub mod ready;
pub mod replica;
pub mod replicate;
pub mod restore;
pub mod run;
pub mod sqlite;
pub mod staging;
#[cfg(test)]
pub(crate) mod testing;

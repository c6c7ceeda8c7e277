//! Restores and listing: rebuild databases from a replica (walfs's or Litestream 0.5's
//! layout), verified against the writer's content checksums and `PRAGMA integrity_check`
//! before they are renamed into place (docs/FORMAT.md, "Verification records").
//!
//! - `plan`: which LTX objects, in which order, rebuild a database at a TXID or time;
//! - `apply`: downloading, applying and verifying a plan into a temporary file, then the
//!   atomic rename;
//! - `record`: re-exported from `replica`, where the uploader writes it: the verification
//!   record (per-TXID checksum sidecar objects) and access to non-LTX objects;
//! - `command`: `walfs restore` for one database or a whole replica ([`restore_command`]);
//! - `list`: `walfs list` ([`list_command`]);
//! - `verify`: `walfs verify`, the restore drill ([`verify_command`]);
//! - `error`: what fails ([`RestoreError`]).

pub mod apply;
mod command;
pub mod error;
pub mod list;
pub mod plan;
pub mod verify;
pub use crate::replica::record;

pub use command::{
    list_objects, open_replica, replanning, restore_command, restore_outcomes, restore_replanning,
    runtime, RestoreArgs, REPLANS,
};
pub use error::{RestoreError, RestoreResult};
pub use list::{list_command, ListArgs};
pub use verify::{verify_command, VerifyArgs};

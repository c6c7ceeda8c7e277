//! Observing a running mount: the view of its state taken when asked ([`MountView`]: each
//! database's TXID, what each replica holds of it, lag, pending bytes), the Prometheus
//! endpoint of `--metrics-addr` ([`metrics`]) and the status socket that `walfs status`
//! asks ([`status`]); a follower's metrics ([`follower`]). Nothing here runs on a FUSE request: gauges are computed at scrape
//! time from the capture registry, staging and the replicas' progress.

pub mod follower;
pub mod metrics;
pub mod status;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::capture::Capture;
use crate::fs::metrics::Metrics;
use crate::replica::fanout::Fanout;
use crate::replica::maintain::Maintainer;
use crate::replica::sync::SyncReplication;

/// What a mount exposes to metrics and `walfs status`.
#[derive(Clone)]
pub struct MountView {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    /// The FUSE layer's per-operation counters.
    pub fs: Arc<Metrics>,
    /// `None` for a mount without replicas.
    pub replication: Option<ReplicationView>,
}

/// The parts of a mount's replication that are observed.
#[derive(Clone)]
pub struct ReplicationView {
    pub capture: Arc<Capture>,
    /// What each replica holds, and its counters.
    pub fanout: Arc<Fanout>,
    /// Each replica's maintenance loop, in the mount's order.
    pub maintainers: Vec<Arc<Maintainer>>,
    /// `None` unless some database replicates synchronously.
    pub sync: Option<Arc<SyncReplication>>,
}

/// The status of a mount, as the status socket sends it (JSON) and `walfs status` prints
/// it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    /// The replicas' credential-free names; empty for a mount without replicas.
    pub replicas: Vec<String>,
    /// Bytes of every file in the staging directory (waiting uploads and the local copies
    /// of uploaded objects).
    pub staging_bytes: u64,
    pub databases: Vec<DatabaseStatus>,
}

/// One database of a [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatabaseStatus {
    /// The database's path relative to the backing directory.
    pub path: PathBuf,
    /// The last TXID captured (staged).
    pub txid: u64,
    /// Bytes staged for it that wait for upload.
    pub pending_bytes: u64,
    pub replicas: Vec<ReplicaStatus>,
}

/// What one replica holds of one database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaStatus {
    pub replica: String,
    /// The last TXID the replica holds.
    pub txid: u64,
    /// The age in seconds of the oldest commit the replica does not hold yet; 0 when it
    /// holds every commit.
    pub lag_seconds: f64,
    /// When the replica last took an upload of the database (RFC 3339), if it did since
    /// the mount started.
    pub last_upload: Option<String>,
    /// The last upload error, cleared by the next upload that works.
    pub last_error: Option<String>,
}

impl Status {
    /// The largest lag of any database in any replica, in seconds.
    pub fn max_lag(&self) -> f64 {
        self.databases
            .iter()
            .flat_map(|d| &d.replicas)
            .map(|r| r.lag_seconds)
            .fold(0.0, f64::max)
    }
}

impl MountView {
    /// The status now: reads the capture registry, the staging directory (record headers
    /// and file sizes, no page data) and the replicas' progress.
    pub fn status(&self) -> Status {
        let Some(r) = &self.replication else {
            return Status {
                backing: self.backing.clone(),
                mountpoint: self.mountpoint.clone(),
                replicas: Vec::new(),
                staging_bytes: 0,
                databases: Vec::new(),
            };
        };
        let staging = r.capture.staging();
        let mut dbs: BTreeSet<PathBuf> = r.capture.databases().into_iter().collect();
        dbs.extend(staging.databases().unwrap_or_default());
        let now_ms = millis(SystemTime::now());
        let progress = r.fanout.progress();
        let names = progress.names();
        let databases = dbs
            .into_iter()
            .map(|db| {
                let state = staging.state(&db).ok().flatten();
                let known = state.map_or(0, |s| s.uploaded_txid);
                let txid = r
                    .capture
                    .staged_txid(&db)
                    .or_else(|| staging.last_staged_txid(&db).ok().flatten())
                    .unwrap_or(0);
                let pending_bytes = staging
                    .pending_files(&db)
                    .map(|f| f.iter().map(|(_, n)| n).sum())
                    .unwrap_or(0);
                let replicas = names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        let held = r.fanout.held(&db, i).unwrap_or(known);
                        let p = progress.get(&db, i, held);
                        let lag_ms = if p.txid >= txid {
                            0
                        } else {
                            staging
                                .oldest_after(&db, p.txid)
                                .ok()
                                .flatten()
                                .map_or(0, |ts| (now_ms - ts).max(0))
                        };
                        ReplicaStatus {
                            replica: name.clone(),
                            txid: p.txid,
                            lag_seconds: lag_ms as f64 / 1000.0,
                            last_upload: p.last_upload.map(rfc3339),
                            last_error: p.last_error,
                        }
                    })
                    .collect();
                DatabaseStatus {
                    path: db,
                    txid,
                    pending_bytes,
                    replicas,
                }
            })
            .collect();
        Status {
            backing: self.backing.clone(),
            mountpoint: self.mountpoint.clone(),
            replicas: names.to_vec(),
            staging_bytes: dir_bytes(staging.root()),
            databases,
        }
    }
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The bytes of every regular file under `dir` (files removed meanwhile are left out).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => total += entry.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

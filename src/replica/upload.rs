//! Upload: moves what capture staged to every replica, once per sync interval. Each round
//! merges a database's staged transactions into one level-0 LTX file (one PUT per
//! database per interval, however many commits it holds), or uploads its newest snapshot
//! to level 9, and only then tells staging they are safe to drop. A database with nothing
//! staged costs no request at all. A failing replica is retried with backoff while staging
//! keeps everything.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::ltx::{decode, LtxEncoder, LtxHeader};
use super::record::{ChecksumRecord, SidecarStore};
use super::store::ReplicaStore;
use crate::staging::{StagedLtx, Staging};

/// Level of new transactions, and of snapshots, in Litestream's layout.
const LEVEL_TRANSACTIONS: u8 = 0;
const LEVEL_SNAPSHOTS: u8 = 9;

/// The longest wait between retries of a failing replica.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One upload to send: a snapshot or a merged run of transactions.
struct Upload {
    level: u8,
    min_txid: u64,
    max_txid: u64,
    bytes: Bytes,
    timestamp: SystemTime,
}

/// Builds what to upload for one database's staged files (ascending by TXID): the
/// transactions before the first snapshot merged into one file (they continue what the
/// replica holds, so point-in-time restore keeps them), the newest snapshot, then every
/// transaction after it merged into one file. Anything between two snapshots is
/// superseded by the newer one; a snapshot marks a possible gap, so nothing is merged
/// across one.
fn plan_uploads(staged: &[StagedLtx]) -> std::io::Result<Vec<Upload>> {
    let (Some(first), Some(i)) = (
        staged.iter().position(StagedLtx::is_snapshot),
        staged.iter().rposition(StagedLtx::is_snapshot),
    ) else {
        return Ok(vec![merge_transactions(staged)?]);
    };
    let mut uploads = Vec::new();
    if first > 0 {
        uploads.push(merge_transactions(&staged[..first])?);
    }
    let s = &staged[i];
    let bytes = std::fs::read(&s.path)?;
    let header = decode(bytes.as_slice())
        .map_err(|e| invalid_staged(&s.path, e))?
        .header;
    uploads.push(Upload {
        level: LEVEL_SNAPSHOTS,
        min_txid: s.min_txid,
        max_txid: s.max_txid,
        bytes: Bytes::from(bytes),
        timestamp: millis_to_time(header.timestamp_ms),
    });
    if i + 1 < staged.len() {
        uploads.push(merge_transactions(&staged[i + 1..])?);
    }
    Ok(uploads)
}

/// Merges consecutive staged transactions into one LTX file: the newest version of each
/// page, the last commit size, the TXID range of them all.
fn merge_transactions(files: &[StagedLtx]) -> std::io::Result<Upload> {
    let mut pages: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let mut last: Option<LtxHeader> = None;
    for f in files {
        let ltx = decode(File::open(&f.path)?).map_err(|e| invalid_staged(&f.path, e))?;
        for p in ltx.pages {
            pages.insert(p.pgno, p.data);
        }
        last = Some(ltx.header);
    }
    let last = last.expect("at least one file");
    let (min_txid, max_txid) = (files[0].min_txid, last.max_txid);
    if files.len() == 1 {
        let bytes = std::fs::read(&files[0].path)?;
        return Ok(Upload {
            level: LEVEL_TRANSACTIONS,
            min_txid,
            max_txid,
            bytes: Bytes::from(bytes),
            timestamp: millis_to_time(last.timestamp_ms),
        });
    }
    pages.retain(|&pgno, _| pgno <= last.commit);
    let header = LtxHeader::incremental(
        last.page_size,
        last.commit,
        min_txid,
        max_txid,
        last.timestamp_ms,
        0,
    )
    .without_checksums();
    let mut enc = LtxEncoder::new(Vec::new(), header).map_err(std::io::Error::other)?;
    for (pgno, data) in &pages {
        enc.add_page(*pgno, data).map_err(std::io::Error::other)?;
    }
    enc.finish(0).map_err(std::io::Error::other)?;
    Ok(Upload {
        level: LEVEL_TRANSACTIONS,
        min_txid,
        max_txid,
        bytes: Bytes::from(enc.into_inner()),
        timestamp: millis_to_time(last.timestamp_ms),
    })
}

fn invalid_staged(path: &Path, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("staged file {} is unreadable: {e}", path.display()),
    )
}

fn millis_to_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// The uploader of one mount.
pub struct Uploader {
    staging: Arc<Staging>,
    replicas: Vec<ReplicaStore>,
    runtime: tokio::runtime::Runtime,
    stop: AtomicBool,
    wake: (Mutex<bool>, Condvar),
}

impl Uploader {
    pub fn new(staging: Arc<Staging>, replicas: Vec<ReplicaStore>) -> std::io::Result<Uploader> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Uploader {
            staging,
            replicas,
            runtime,
            stop: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
        })
    }

    /// Uploads everything staged for the databases in `dbs`; returns how many databases
    /// are still behind (their upload failed and will be retried).
    pub fn upload_round(&self, dbs: &[PathBuf]) -> usize {
        let mut behind = 0;
        for db in dbs {
            if let Err(e) = self.upload_database(db) {
                behind += 1;
                tracing::warn!(db = %db.display(), "replica is behind: {e}; retrying");
            }
        }
        behind
    }

    fn upload_database(&self, db: &Path) -> anyhow::Result<()> {
        let staged = self.staging.pending(db)?;
        if staged.is_empty() {
            return Ok(());
        }
        let uploads = plan_uploads(&staged)?;
        let key = db.to_string_lossy();
        for replica in &self.replicas {
            for u in &uploads {
                self.runtime.block_on(replica.put_ltx(
                    &key,
                    u.level,
                    u.min_txid,
                    u.max_txid,
                    u.bytes.clone(),
                    u.timestamp,
                ))?;
            }
        }
        let max = staged.last().map_or(0, |s| s.max_txid);
        // The verification record restore checks against: the database checksum after
        // `max`, known when capture's saved state is at `max` (else the next round writes
        // one).
        if let Some(state) = self.staging.state(db)?.filter(|st| st.txid == max) {
            let record = ChecksumRecord {
                txid: max,
                checksum: state.checksum,
                page_size: state.page_size,
                commit: state.commit,
            };
            for replica in &self.replicas {
                let sidecar = SidecarStore::new(replica.clone());
                self.runtime
                    .block_on(sidecar.put_checksum_record(&key, &record))?;
            }
        }
        self.staging.mark_uploaded(db, max)?;
        tracing::debug!(db = %db.display(), txid = max, files = staged.len(), "uploaded");
        Ok(())
    }

    /// Runs rounds every `interval` until `shutdown`, taking the databases to upload from
    /// `databases` each round. Backs off (up to 30 s) while a replica fails.
    pub fn run(&self, interval: Duration, databases: impl Fn() -> Vec<PathBuf>) {
        let mut backoff = interval;
        loop {
            let stopping = self.wait(backoff);
            let behind = self.upload_round(&databases());
            backoff = if behind == 0 {
                interval
            } else {
                (backoff * 2).clamp(Duration::from_millis(100), MAX_BACKOFF)
            };
            if stopping {
                return;
            }
        }
    }

    /// Sleeps up to `d`; true once shutdown was asked for.
    fn wait(&self, d: Duration) -> bool {
        let (lock, cvar) = &self.wake;
        let mut woken = lock.lock();
        if !*woken {
            cvar.wait_for(&mut woken, d);
        }
        *woken = false;
        self.stop.load(Ordering::Relaxed)
    }

    /// Asks `run` to do one last round and return.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let (lock, cvar) = &self.wake;
        *lock.lock() = true;
        cvar.notify_all();
    }

    /// Uploads what is staged, retrying until `deadline`; true if nothing is left behind.
    pub fn flush(&self, dbs: &[PathBuf], deadline: Instant) -> bool {
        loop {
            if self.upload_round(dbs) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

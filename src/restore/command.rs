//! `walfs restore`: restores one database, or every database of a replica into a
//! directory, and reports how each was verified.
//!
//! This file owns [`RestoreArgs`], [`restore_command`] and the helpers shared with `list`
//! ([`open_replica`], [`runtime`], [`list_objects`]).
//!
//! What is restored depends on the URL and `db`:
//! - `db` given: that database, to the file `output`;
//! - the URL holds a single database (its `ltx/` is directly under the URL): it, to the
//!   file `output`;
//! - the URL is a mount's replica root: every database, to `output/<relative path>`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tokio::runtime::Runtime;

use crate::replica::crypt::EncryptionArgs;
use crate::replica::layout::Layout;
use crate::replica::store::{LtxObjectInfo, ReplicaStore};
use crate::replica::timestamp::format_rfc3339_nano;
use crate::replica::url::ReplicaUrl;

use super::apply::{check_output, restore_database, ChecksumCheck, RestoreOutcome};
use super::error::{Context, RestoreError, RestoreResult};
use super::plan::{db_label, plan, restorable_txids, PlanError, RestoreTarget, MAX_LEVEL};
use super::record::SidecarStore;

/// The arguments of `walfs restore` (each field's doc comment is its `--help` text).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RestoreArgs {
    // The replica URL (`file:///dir`, `s3://bucket/prefix?...`, `abs://...`, `gs://...`).
    /// A mount's replica root, or one database's replica (as Litestream lays it out).
    pub url: String,
    /// The database file to create; a directory when restoring a whole replica.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Restore only this database (its path relative to the replica root).
    #[arg(long)]
    pub db: Option<String>,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    // Default: the latest.
    /// Restore exactly this transaction, in decimal (42) or in hex: Litestream's 16 digits,
    /// zero-padded so starting with 0 (000000000000002a), or after 0x (0x2a). Any other
    /// number is decimal.
    #[arg(long, value_parser = crate::flags::txid)]
    pub txid: Option<u64>,
    /// Restore the newest state committed at or before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub timestamp: Option<SystemTime>,
    /// Write the restore even if PRAGMA integrity_check fails (the content checksum is
    /// still checked): to salvage a database that was already corrupt when it was
    /// replicated, e.g. with sqlite3's .recover.
    #[arg(long)]
    pub no_integrity_check: bool,
    // The keys of an encrypted replica.
    #[command(flatten)]
    pub encryption: EncryptionArgs,
}

/// An RFC 3339 time such as 2026-11-22T05:00:00Z (`--timestamp`).
fn parse_time(s: &str) -> Result<SystemTime, String> {
    crate::replica::timestamp::parse_rfc3339(s)
        .ok_or_else(|| format!("{s:?} is not an RFC 3339 time such as 2026-11-22T05:00:00Z"))
}

/// A current-thread runtime for the store's requests.
pub fn runtime() -> RestoreResult<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the I/O runtime")
}

/// Parses `url` and opens its store and sidecar handle, decrypting with the keys
/// `encryption` names. A file replica must exist (opening the store would create it).
pub fn open_replica(
    url: &str,
    encryption: &EncryptionArgs,
) -> RestoreResult<(ReplicaUrl, ReplicaStore, SidecarStore)> {
    let keyring = encryption.keyring().map_err(RestoreError::Usage)?;
    let url = ReplicaUrl::parse(url)?;
    if let ReplicaUrl::File(f) = &url {
        if !f.dir.is_dir() {
            return Err(RestoreError::Usage(format!(
                "replica directory {} does not exist; check the replica URL",
                f.dir.display()
            )));
        }
    }
    let store = ReplicaStore::open(&url)?.with_keyring(keyring);
    let sidecar = SidecarStore::new(store.clone());
    Ok((url, store, sidecar))
}

/// Every LTX object of `db` at levels 0 to 9.
pub fn list_objects(
    rt: &Runtime,
    store: &ReplicaStore,
    db: &str,
) -> RestoreResult<Vec<LtxObjectInfo>> {
    let mut out = Vec::new();
    for level in 0..=MAX_LEVEL {
        out.extend(rt.block_on(store.list_ltx(db, level))?);
    }
    Ok(out)
}

fn describe(o: &RestoreOutcome) -> String {
    let check = match (&o.checksum_check, &o.integrity_failure) {
        (ChecksumCheck::Recorded, None) => {
            "content checksum matches the writer's record; integrity_check ok".to_string()
        }
        (ChecksumCheck::NotRecorded, None) => "the content checksum was not recorded by the \
             writer (e.g. Litestream wrote the replica): verified with integrity_check only (ok)"
            .to_string(),
        (recorded, Some(e)) => format!(
            "{}; integrity_check FAILED, written anyway (--no-integrity-check): {e}",
            match recorded {
                ChecksumCheck::Recorded => "content checksum matches the writer's record",
                ChecksumCheck::NotRecorded => "the content checksum was not recorded by the writer",
            }
        ),
    };
    format!(
        "restored {} at TXID {} ({}) to {}: {} pages of {} bytes from {} objects ({} bytes); {check}",
        db_label(&o.db),
        o.txid,
        format_rfc3339_nano(o.timestamp),
        o.output.display(),
        o.commit,
        o.page_size,
        o.objects,
        o.bytes
    )
}

struct Ctx {
    rt: Runtime,
    store: ReplicaStore,
    sidecar: SidecarStore,
    target: RestoreTarget,
    force: bool,
    integrity_check: bool,
}

/// Resolves a timestamp target to a TXID with the commit times of the objects. A listing
/// dates S3 objects by Last-Modified (upload time, in whole seconds), which can fall on
/// either side of the target for a commit near it; the `litestream-timestamp` metadata
/// holds the commit time. Commit times grow with the TXID, so a binary search over the
/// restorable TXIDs finds the newest one committed at or before `time` with about
/// log2(TXIDs) HEAD requests. File replicas are dated by mtime, the commit time, already.
/// Returns the TXID and its commit time.
pub fn resolve_timestamp(
    rt: &Runtime,
    store: &ReplicaStore,
    db: &str,
    objects: &[LtxObjectInfo],
    time: SystemTime,
) -> RestoreResult<Option<(u64, SystemTime)>> {
    let txids: Vec<u64> = restorable_txids(objects).into_keys().collect();
    let mut cache = std::collections::HashMap::new();
    let mut commit_time = |i: usize| -> RestoreResult<SystemTime> {
        let txid = txids[i];
        if let Some(t) = cache.get(&txid) {
            return Ok(*t);
        }
        let o = objects
            .iter()
            .filter(|o| o.max_txid == txid)
            .min_by_key(|o| o.level)
            .ok_or_else(|| RestoreError::Corrupt(format!("no object ends at TXID {txid}")))?;
        let t = rt
            .block_on(store.head_ltx(db, o.level, o.min_txid, o.max_txid))?
            .timestamp;
        cache.insert(txid, t);
        Ok(t)
    };
    // The first index committed after `time` (a partition point).
    let (mut lo, mut hi) = (0usize, txids.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if commit_time(mid)? <= time {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    match lo.checked_sub(1) {
        Some(i) => Ok(Some((txids[i], commit_time(i)?))),
        None if txids.is_empty() => Ok(None),
        None => {
            let oldest_time = commit_time(0)?;
            Err(PlanError::NothingBefore {
                db: db.to_string(),
                time,
                oldest: txids[0],
                oldest_time,
            }
            .into())
        }
    }
}

impl Ctx {
    fn restore_one(&self, db: &str, out: &Path) -> RestoreResult<RestoreOutcome> {
        restore_replanning(
            &self.rt,
            &self.store,
            &self.sidecar,
            db,
            self.target,
            out,
            self.force,
            self.integrity_check,
            |_| list_objects(&self.rt, &self.store, db),
        )
    }
}

/// How many times a restore plans again when objects it planned on disappeared.
pub const REPLANS: u32 = 5;

/// Runs `attempt` (numbered from 0) until it succeeds, fails for another reason than an
/// object that disappeared between a listing and its read (a live writer's compaction or
/// retention removes objects: a restore or drill against production must not fail
/// because of that), or has planned [`REPLANS`] times more; then one error that says so.
pub fn replanning<T>(
    db: &str,
    mut attempt: impl FnMut(u32) -> RestoreResult<T>,
) -> RestoreResult<T> {
    let mut n = 0;
    loop {
        match attempt(n) {
            Err(e) if e.object_vanished() && n < REPLANS => {
                n += 1;
                tracing::warn!(
                    "{}: an object was removed while the restore read it (a live writer compacted, or its retention ran): {e}; planning again ({n} of {REPLANS})",
                    db_label(db)
                );
                std::thread::sleep(std::time::Duration::from_millis(100 * u64::from(n)));
            }
            Err(e) if e.object_vanished() => {
                return Err(RestoreError::Context {
                    what: format!(
                        "objects of {} were removed while they were read, {} plans in a row: \
                         the writer's retention removes them faster than a restore reads them; \
                         retry, or lengthen its --l0-retention",
                        db_label(db),
                        REPLANS + 1
                    ),
                    source: Box::new(e),
                })
            }
            r => return r,
        }
    }
}

/// Restores `db` at `target` into `out` from the objects `list(attempt)` returns, resolving
/// a time to a TXID with their commit times; plans again with a new listing when objects
/// disappeared meanwhile ([`replanning`]). Without `integrity_check`, a restore that
/// fails `PRAGMA integrity_check` is written anyway (said in its outcome).
#[allow(clippy::too_many_arguments)]
pub fn restore_replanning(
    rt: &Runtime,
    store: &ReplicaStore,
    sidecar: &SidecarStore,
    db: &str,
    target: RestoreTarget,
    out: &Path,
    force: bool,
    integrity_check: bool,
    mut list: impl FnMut(u32) -> RestoreResult<Vec<LtxObjectInfo>>,
) -> RestoreResult<RestoreOutcome> {
    replanning(db, |attempt| {
        let objects = list(attempt)?;
        let mut target = target;
        let mut resolved_time = None;
        if let (RestoreTarget::Timestamp(time), Layout::S3) = (target, store.layout()) {
            if let Some((txid, t)) = resolve_timestamp(rt, store, db, &objects, time)? {
                target = RestoreTarget::Txid(txid);
                resolved_time = Some(t);
            }
        }
        let mut p = plan(db, &objects, target, |a, b| store.ltx_key(db, 0, a, b))?;
        if let Some(t) = resolved_time {
            p.timestamp = t;
        }
        restore_database(rt, store, sidecar, &p, out, force, integrity_check, true)
    })
}

/// `walfs restore` (see the module documentation). Prints one line per restored database
/// to stderr.
pub fn restore_command(args: &RestoreArgs) -> RestoreResult<()> {
    restore_outcomes(args).map(drop)
}

/// [`restore_command`], returning what was restored.
pub fn restore_outcomes(args: &RestoreArgs) -> RestoreResult<Vec<RestoreOutcome>> {
    let usage = |m: String| Err(RestoreError::Usage(m));
    let target = match (args.txid, args.timestamp) {
        (Some(_), Some(_)) => return usage("pass --txid or --timestamp, not both".into()),
        (Some(t), None) => RestoreTarget::Txid(t),
        (None, Some(t)) => RestoreTarget::Timestamp(t),
        (None, None) => RestoreTarget::Latest,
    };
    let (url, store, sidecar) = open_replica(&args.url, &args.encryption)?;
    let ctx = Ctx {
        rt: runtime()?,
        store,
        sidecar,
        target,
        force: args.force,
        integrity_check: !args.no_integrity_check,
    };
    if let Some(db) = &args.db {
        let o = ctx.restore_one(db, &args.output)?;
        eprintln!("{}", describe(&o));
        return Ok(vec![o]);
    }
    let dbs = ctx.rt.block_on(ctx.store.list_databases())?;
    if dbs.is_empty() {
        return usage(format!(
            "replica {url} holds no databases: nothing to restore"
        ));
    }
    if dbs.len() == 1 && dbs[0].is_empty() {
        let o = ctx.restore_one("", &args.output)?;
        eprintln!("{}", describe(&o));
        return Ok(vec![o]);
    }
    if dbs.iter().any(|d| d.is_empty()) {
        return usage(format!(
            "replica {url} holds a database at its root and {} below it; pass --db to choose one \
             (\"\" for the one at the root)",
            dbs.len() - 1
        ));
    }
    if args.txid.is_some() {
        return usage(format!(
            "--txid names a transaction of one database, and replica {url} holds {}; pass --db \
             with it",
            dbs.len()
        ));
    }
    let out = &args.output;
    match std::fs::symlink_metadata(out) {
        Ok(m) if !m.is_dir() => {
            return Err(RestoreError::Output(format!(
                "replica {url} holds {} databases, so the output must be a directory, and {} is not one",
                dbs.len(),
                out.display()
            )))
        }
        _ => {}
    }
    // Refuse before restoring anything.
    let conflicts: Vec<String> = dbs
        .iter()
        .filter_map(|db| check_output(&out.join(db), args.force).err())
        .map(|e| e.to_string())
        .collect();
    if let Some(first) = conflicts.first() {
        return Err(RestoreError::Output(format!(
            "{first}{}",
            if conflicts.len() > 1 {
                format!(" (and {} more outputs)", conflicts.len() - 1)
            } else {
                String::new()
            }
        )));
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut failures = Vec::new();
    let mut restored = Vec::new();
    for db in &dbs {
        match ctx.restore_one(db, &out.join(db)) {
            Ok(o) => {
                eprintln!("{}", describe(&o));
                restored.push(o);
            }
            Err(e) => {
                eprintln!("cannot restore {db}: {e:#}");
                failures.push(format!("{db}: {e:#}"));
            }
        }
    }
    if !failures.is_empty() {
        return Err(RestoreError::Incomplete(format!(
            "{} of {} databases were not restored: {}",
            failures.len(),
            dbs.len(),
            failures.join("; ")
        )));
    }
    Ok(restored)
}

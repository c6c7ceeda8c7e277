//! `walfs verify`: a restore drill. For each database (or one), restores the latest state
//! and a random earlier restorable TXID into a temporary directory, checks the content
//! checksum against the writer's verification record and `PRAGMA integrity_check` (both
//! done by [`restore_database`]), prints one line per check and fails if any check failed.
//! It only reads the replica.
//!
//! This file owns [`VerifyArgs`] and [`verify_command`].

use std::path::PathBuf;
use std::time::SystemTime;

use crate::replica::timestamp::format_rfc3339_nano;

use super::apply::{restore_database, ChecksumCheck};
use super::command::{list_objects, open_replica, replanning, runtime};
use super::error::{Context, RestoreError, RestoreResult};
use super::plan::{db_label, plan, restorable_txids, RestoreTarget};

/// The arguments of `walfs verify` (each field's doc comment is its `--help` text).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct VerifyArgs {
    // The replica URL.
    pub url: String,
    /// Verify only this database (its path relative to the replica root).
    #[arg(long)]
    pub db: Option<String>,
    // Default: from the clock; printed.
    /// Seed of the random choice of the earlier TXID, to repeat a drill.
    #[arg(long)]
    pub seed: Option<u64>,
    // The keys of an encrypted replica.
    #[command(flatten)]
    pub encryption: crate::replica::crypt::EncryptionArgs,
}

/// SplitMix64: a small, reproducible generator for the choice of the earlier TXID.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Picks a restorable TXID below `latest` from `txids` (sorted), or None if there is none.
pub fn pick_earlier(txids: &[u64], latest: u64, state: &mut u64) -> Option<u64> {
    let earlier: Vec<u64> = txids.iter().copied().filter(|t| *t < latest).collect();
    if earlier.is_empty() {
        return None;
    }
    Some(earlier[(splitmix64(state) % earlier.len() as u64) as usize])
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> RestoreResult<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "walfs-verify-{}-{:x}",
            std::process::id(),
            nanos & 0xffff_ffff
        ));
        std::fs::create_dir(&p)
            .with_context(|| format!("cannot create the temporary directory {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `walfs verify` (see the module documentation). Prints to stdout; the error counts the
/// failed checks and repeats the first.
pub fn verify_command(args: &VerifyArgs) -> RestoreResult<()> {
    let (url, store, sidecar) = open_replica(&args.url, &args.encryption)?;
    let rt = runtime()?;
    let dbs = match &args.db {
        Some(db) => vec![db.clone()],
        None => rt.block_on(store.list_databases())?,
    };
    if dbs.is_empty() {
        return Err(RestoreError::Usage(format!(
            "replica {url} holds no databases: nothing to verify"
        )));
    }
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    println!("verifying {} database(s) of {url} (seed {seed})", dbs.len());
    let mut state = seed;
    let tmp = TempDir::new()?;
    let mut checks = 0usize;
    let mut failures: Vec<String> = Vec::new();
    for (i, db) in dbs.iter().enumerate() {
        let label = db_label(db);
        let objects = match list_objects(&rt, &store, db) {
            Ok(o) => o,
            Err(e) => {
                let msg = format!("{label}: cannot list objects: {e:#}");
                println!("{msg}: FAILED");
                failures.push(msg);
                continue;
            }
        };
        let reach = restorable_txids(&objects);
        let txids: Vec<u64> = reach.keys().copied().collect();
        let latest = objects.iter().map(|o| o.max_txid).max().unwrap_or(0);
        let mut targets = vec![("latest", RestoreTarget::Latest)];
        if let Some(t) = pick_earlier(&txids, latest, &mut state) {
            targets.push(("earlier", RestoreTarget::Txid(t)));
        }
        for (j, (what, target)) in targets.into_iter().enumerate() {
            checks += 1;
            let out = tmp.0.join(format!("{i}-{j}.db"));
            // A live writer may remove objects of this listing meanwhile: plan again
            // from a new one. An earlier TXID that is no longer restorable then gives way
            // to the next one that is.
            let result = replanning(db, |attempt| {
                let fresh;
                let (objects, target) = if attempt == 0 {
                    (&objects, target)
                } else {
                    fresh = list_objects(&rt, &store, db)?;
                    let target = match target {
                        RestoreTarget::Txid(t) => restorable_txids(&fresh)
                            .range(t..)
                            .next()
                            .map_or(RestoreTarget::Latest, |(&t, _)| RestoreTarget::Txid(t)),
                        other => other,
                    };
                    (&fresh, target)
                };
                let p = plan(db, objects, target, |a, b| store.ltx_key(db, 0, a, b))?;
                // A bar per restore, on a terminal only (stdout keeps the report).
                restore_database(&rt, &store, &sidecar, &p, &out, false, true, true)
            });
            let _ = std::fs::remove_file(&out);
            match result {
                Ok(o) => println!(
                    "{label} {what} TXID {} ({}): {} objects, {} bytes read: ok ({})",
                    o.txid,
                    format_rfc3339_nano(o.timestamp),
                    o.objects,
                    o.bytes,
                    match o.checksum_check {
                        ChecksumCheck::Recorded =>
                            "checksum matches the verification record, integrity_check ok",
                        ChecksumCheck::NotRecorded =>
                            "no verification record (not written by walfs), integrity_check ok",
                    }
                ),
                Err(e) => {
                    let target = match target {
                        RestoreTarget::Txid(t) => format!("TXID {t}"),
                        _ => format!("TXID {latest}"),
                    };
                    let msg = format!("{label} {what} {target}: FAILED: {e:#}");
                    println!("{msg}");
                    failures.push(msg);
                }
            }
        }
    }
    if let Some(first) = failures.first() {
        return Err(RestoreError::Incomplete(format!(
            "{} of {checks} checks failed; first: {first}; repeat with --seed {seed}",
            failures.len()
        )));
    }
    println!("all {checks} checks passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_earlier_is_reproducible_and_below_latest() {
        let txids: Vec<u64> = (1..=20).collect();
        let (mut a, mut b) = (7u64, 7u64);
        for _ in 0..50 {
            let x = pick_earlier(&txids, 20, &mut a).unwrap();
            assert_eq!(Some(x), pick_earlier(&txids, 20, &mut b));
            assert!((1..20).contains(&x));
        }
        assert_eq!(pick_earlier(&[5], 5, &mut a), None);
    }
}

//! `walfs list`: what a replica holds, per database.
//!
//! This file owns [`ListArgs`], [`list_command`] and [`DatabaseSummary`].
//!
//! One line per database: its relative path (`.` for a database at the replica root), its
//! latest TXID, that TXID's time (RFC 3339, from the LTX header) and its size (commit ×
//! page size, from the latest object's 100-byte header). With `db`, also the restorable
//! range (oldest and newest TXID with their times) and the objects per level.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use tokio::runtime::Runtime;

use crate::replica::store::{format_rfc3339_nano, LtxObjectInfo, ReplicaStore};

use super::command::{list_objects, open_replica, runtime};
use super::plan::{db_label, restorable_txids};
use super::record::SidecarStore;

/// The arguments of `walfs list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListArgs {
    /// The replica URL.
    pub url: String,
    /// Show the details of this database only.
    pub db: Option<String>,
}

/// What the replica holds of one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseSummary {
    /// Path relative to the replica root ("" at the root).
    pub db: String,
    /// The latest TXID of any object.
    pub latest_txid: u64,
    /// When it was written (the LTX header's timestamp).
    pub latest_time: SystemTime,
    /// Database size in bytes after it.
    pub size: u64,
    /// Restorable TXIDs: (oldest, its time), (newest, its time); None if nothing restores.
    pub restorable: Option<((u64, SystemTime), (u64, SystemTime))>,
    /// Per level: (objects, bytes).
    pub levels: BTreeMap<u8, (usize, u64)>,
}

/// Summarizes `db` (one LIST per level and one 100-byte GET).
pub fn summarize(
    rt: &Runtime,
    store: &ReplicaStore,
    sidecar: &SidecarStore,
    db: &str,
) -> anyhow::Result<DatabaseSummary> {
    let objects = list_objects(rt, store, db)?;
    let Some(latest) = objects
        .iter()
        .max_by_key(|o| (o.max_txid, std::cmp::Reverse(o.level)))
    else {
        bail!("replica holds no LTX objects for {}", db_label(db));
    };
    let h = rt.block_on(sidecar.ltx_header(&latest.key))?;
    let reach = restorable_txids(&objects);
    let restorable = match (reach.iter().next(), reach.iter().next_back()) {
        (Some((a, ta)), Some((b, tb))) => Some(((*a, *ta), (*b, *tb))),
        _ => None,
    };
    let mut levels = BTreeMap::new();
    for o in &objects {
        let e: &mut (usize, u64) = levels.entry(o.level).or_default();
        e.0 += 1;
        e.1 += o.size;
    }
    Ok(DatabaseSummary {
        db: db.to_string(),
        latest_txid: latest.max_txid,
        latest_time: ltx_time(h.timestamp_ms, latest),
        size: u64::from(h.commit) * u64::from(h.page_size),
        restorable,
        levels,
    })
}

fn ltx_time(ms: i64, o: &LtxObjectInfo) -> SystemTime {
    if ms > 0 {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        o.timestamp
    }
}

fn shown_path(db: &str) -> &str {
    if db.is_empty() {
        "."
    } else {
        db
    }
}

/// `walfs list` (see the module documentation); prints to stdout.
pub fn list_command(args: &ListArgs) -> anyhow::Result<()> {
    let (url, store, sidecar) = open_replica(&args.url)?;
    let rt = runtime()?;
    let mut out = std::io::stdout().lock();
    if let Some(db) = &args.db {
        let s = summarize(&rt, &store, &sidecar, db)?;
        writeln!(out, "{}", shown_path(&s.db))?;
        writeln!(
            out,
            "  latest TXID {} at {}, {} bytes",
            s.latest_txid,
            format_rfc3339_nano(s.latest_time),
            s.size
        )?;
        match s.restorable {
            Some(((a, ta), (b, tb))) => writeln!(
                out,
                "  restorable TXIDs {a} ({}) to {b} ({})",
                format_rfc3339_nano(ta),
                format_rfc3339_nano(tb)
            )?,
            None => writeln!(out, "  nothing restorable (no snapshot)")?,
        }
        for (level, (n, bytes)) in &s.levels {
            writeln!(
                out,
                "  level {level}: {n} object{}, {bytes} bytes",
                if *n == 1 { "" } else { "s" }
            )?;
        }
        return Ok(());
    }
    let dbs = rt.block_on(store.list_databases())?;
    if dbs.is_empty() {
        writeln!(out, "replica {url} holds no databases")?;
        return Ok(());
    }
    let mut rows = vec![[
        "DATABASE".to_string(),
        "TXID".to_string(),
        "TIME".to_string(),
        "SIZE".to_string(),
    ]];
    for db in &dbs {
        let s = summarize(&rt, &store, &sidecar, db)
            .with_context(|| format!("cannot list {}", db_label(db)))?;
        rows.push([
            shown_path(db).to_string(),
            s.latest_txid.to_string(),
            format_rfc3339_nano(s.latest_time),
            s.size.to_string(),
        ]);
    }
    let mut widths = [0usize; 4];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in &rows {
        writeln!(
            out,
            "{:<w0$}  {:>w1$}  {:<w2$}  {:>w3$}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        )?;
    }
    Ok(())
}

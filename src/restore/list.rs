//! `walfs list`: what a replica holds, per database.
//!
//! This file owns [`ListArgs`], [`list_command`] and [`DatabaseSummary`].
//!
//! One line per database: its relative path (`.` for a database at the replica root), its
//! latest TXID, that TXID's time (RFC 3339, from the LTX header) and its size (commit ×
//! page size, from the latest object's 100-byte header). With `db`, also the restorable
//! range (oldest and newest TXID with their times) and the objects per level (count, TXID
//! range, bytes).
//!
//! A database that was deleted through the mount has the object
//! `<db>/walfs/deleted` under the replica root, one line
//! `txid=<%016x> deleted_at=<RFC 3339 UTC>`; it is shown as deleted if that TXID is at or
//! past the newest object's max TXID (otherwise the database was re-created since).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

use tokio::runtime::Runtime;

use crate::replica::layout::Layout;
use crate::replica::store::{LtxObjectInfo, ReplicaStore};
use crate::replica::timestamp::{format_rfc3339_nano, parse_rfc3339};

use super::command::{list_objects, open_replica, runtime};
use super::error::{Context, RestoreError, RestoreResult};
use super::plan::{db_label, restorable_txids};
use super::record::SidecarStore;

/// The arguments of `walfs list` (each field's doc comment is its `--help` text).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ListArgs {
    // The replica URL.
    pub url: String,
    /// Show the restorable range and objects of this database.
    #[arg(long)]
    pub db: Option<String>,
    // The keys of an encrypted replica.
    #[command(flatten)]
    pub encryption: crate::replica::crypt::EncryptionArgs,
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
    /// Per level: objects, bytes, min and max TXID.
    pub levels: BTreeMap<u8, LevelSummary>,
    /// When the database was deleted, if it is deleted (see the module documentation).
    pub deleted: Option<DeletedMarker>,
}

/// The objects of one level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LevelSummary {
    pub objects: usize,
    pub bytes: u64,
    pub min_txid: u64,
    pub max_txid: u64,
}

/// The content of a `<db>/walfs/deleted` marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeletedMarker {
    /// The database's last TXID when it was deleted.
    pub txid: u64,
    /// When it was deleted.
    pub deleted_at: SystemTime,
}

/// The key of `db`'s deletion marker, relative to the bucket (S3, prefix `root`) or the
/// replica directory (file, `root` is "").
pub fn deleted_marker_key(root: &str, db: &str) -> String {
    [root, db, "walfs/deleted"]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/")
}

/// Parses a marker's line `txid=<%016x> deleted_at=<RFC 3339>`.
pub fn parse_deleted_marker(text: &str) -> Result<DeletedMarker, String> {
    let (mut txid, mut at) = (None, None);
    for field in text.split_whitespace() {
        match field.split_once('=') {
            Some(("txid", v)) => {
                txid = Some(u64::from_str_radix(v, 16).map_err(|_| format!("bad txid {v:?}"))?)
            }
            Some(("deleted_at", v)) => {
                at = Some(parse_rfc3339(v).ok_or_else(|| format!("bad deleted_at {v:?}"))?)
            }
            _ => {}
        }
    }
    Ok(DeletedMarker {
        txid: txid.ok_or("no txid field")?,
        deleted_at: at.ok_or("no deleted_at field")?,
    })
}

/// The marker counts only if no object was written after it (else the database was
/// re-created).
pub fn deleted_state(marker: Option<DeletedMarker>, latest_txid: u64) -> Option<DeletedMarker> {
    marker.filter(|m| m.txid >= latest_txid)
}

pub async fn read_deleted_marker(
    store: &ReplicaStore,
    db: &str,
) -> RestoreResult<Option<DeletedMarker>> {
    let key = deleted_marker_key(store.root(), db);
    match store.get_object(&key).await {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b);
            parse_deleted_marker(&text).map(Some).map_err(|m| {
                RestoreError::Corrupt(format!(
                    "deletion marker {}/{key} is malformed: {m}",
                    store.base()
                ))
            })
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Summarizes `db` (one LIST per level, one 100-byte GET, one GET of the deletion marker,
/// and on S3 two HEADs for the commit times of the restorable range).
pub fn summarize(
    rt: &Runtime,
    store: &ReplicaStore,
    sidecar: &SidecarStore,
    db: &str,
) -> RestoreResult<DatabaseSummary> {
    let objects = list_objects(rt, store, db)?;
    let Some(latest) = objects
        .iter()
        .max_by_key(|o| (o.max_txid, std::cmp::Reverse(o.level)))
    else {
        return Err(RestoreError::Usage(format!(
            "replica holds no LTX objects for {}",
            db_label(db)
        )));
    };
    let h = rt.block_on(sidecar.ltx_header(db, latest))?;
    let reach = restorable_txids(&objects);
    let restorable = match (reach.iter().next(), reach.iter().next_back()) {
        (Some((a, ta)), Some((b, tb))) => Some((
            (*a, commit_time(rt, store, db, &objects, *a, *ta)?),
            (*b, commit_time(rt, store, db, &objects, *b, *tb)?),
        )),
        _ => None,
    };
    let mut levels: BTreeMap<u8, LevelSummary> = BTreeMap::new();
    for o in &objects {
        let e = levels.entry(o.level).or_insert(LevelSummary {
            min_txid: u64::MAX,
            ..Default::default()
        });
        e.objects += 1;
        e.bytes += o.size;
        e.min_txid = e.min_txid.min(o.min_txid);
        e.max_txid = e.max_txid.max(o.max_txid);
    }
    let deleted = deleted_state(
        rt.block_on(read_deleted_marker(store, db))?,
        latest.max_txid,
    );
    Ok(DatabaseSummary {
        db: db.to_string(),
        latest_txid: latest.max_txid,
        latest_time: ltx_time(h.timestamp_ms, latest),
        size: u64::from(h.commit) * u64::from(h.page_size),
        restorable,
        levels,
        deleted,
    })
}

/// The commit time of `txid`: a listing dates S3 objects by Last-Modified (upload time, in
/// whole seconds), so on S3 one HEAD reads the `litestream-timestamp` metadata of an object
/// ending at it. File replicas are dated by mtime, the commit time, already.
fn commit_time(
    rt: &Runtime,
    store: &ReplicaStore,
    db: &str,
    objects: &[LtxObjectInfo],
    txid: u64,
    listed: SystemTime,
) -> RestoreResult<SystemTime> {
    if store.layout() != Layout::S3 {
        return Ok(listed);
    }
    let Some(o) = objects
        .iter()
        .filter(|o| o.max_txid == txid)
        .min_by_key(|o| o.level)
    else {
        return Ok(listed);
    };
    Ok(rt
        .block_on(store.head_ltx(db, o.level, o.min_txid, o.max_txid))?
        .timestamp)
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
pub fn list_command(args: &ListArgs) -> RestoreResult<()> {
    let (url, store, sidecar) = open_replica(&args.url, &args.encryption)?;
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
        if let Some(d) = s.deleted {
            writeln!(
                out,
                "  deleted at {} (after TXID {})",
                format_rfc3339_nano(d.deleted_at),
                d.txid
            )?;
        }
        match s.restorable {
            Some(((a, ta), (b, tb))) => {
                writeln!(
                    out,
                    "  oldest restorable: TXID {a} at {}",
                    format_rfc3339_nano(ta)
                )?;
                writeln!(
                    out,
                    "  newest restorable: TXID {b} at {}",
                    format_rfc3339_nano(tb)
                )?;
            }
            None => writeln!(out, "  nothing restorable (no snapshot)")?,
        }
        for (level, l) in &s.levels {
            writeln!(
                out,
                "  level {level}: {} object{}, TXIDs {} to {}, {} bytes",
                l.objects,
                if l.objects == 1 { "" } else { "s" },
                l.min_txid,
                l.max_txid,
                l.bytes
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
        "STATE".to_string(),
    ]];
    for db in &dbs {
        let s = summarize(&rt, &store, &sidecar, db)
            .with_context(|| format!("cannot list {}", db_label(db)))?;
        rows.push([
            shown_path(db).to_string(),
            s.latest_txid.to_string(),
            format_rfc3339_nano(s.latest_time),
            s.size.to_string(),
            match s.deleted {
                Some(d) => format!("deleted at {}", format_rfc3339_nano(d.deleted_at)),
                None => "live".to_string(),
            },
        ]);
    }
    let mut widths = [0usize; 5];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in &rows {
        writeln!(
            out,
            "{:<w0$}  {:>w1$}  {:<w2$}  {:>w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::url::ReplicaUrl;

    #[test]
    fn deleted_marker_parses_and_counts_only_if_newest() {
        let m = parse_deleted_marker("txid=000000000000002a deleted_at=2026-11-22T10:00:00Z\n")
            .unwrap();
        assert_eq!(m.txid, 42);
        assert_eq!(
            format_rfc3339_nano(m.deleted_at),
            format_rfc3339_nano(parse_rfc3339("2026-11-22T10:00:00Z").unwrap())
        );
        assert_eq!(deleted_state(Some(m), 42), Some(m));
        assert_eq!(deleted_state(Some(m), 41), Some(m));
        // Objects past the marker: re-created.
        assert_eq!(deleted_state(Some(m), 43), None);
        assert!(parse_deleted_marker("txid=zz deleted_at=2026-11-22T10:00:00Z").is_err());
        assert!(parse_deleted_marker("deleted_at=2026-11-22T10:00:00Z").is_err());
        assert_eq!(deleted_marker_key("", "a/b.db"), "a/b.db/walfs/deleted");
        assert_eq!(deleted_marker_key("p/q", ""), "p/q/walfs/deleted");
    }

    /// A hand-made replica: a snapshot, two level-0 objects, and a marker.
    #[test]
    fn summary_shows_levels_range_and_deletion() {
        use crate::ltx::{LtxEncoder, LtxHeader};
        let dir = tempfile::tempdir().unwrap();
        let url = ReplicaUrl::parse(&format!("file://{}", dir.path().display())).unwrap();
        let store = ReplicaStore::open(&url).unwrap();
        assert_eq!(store.layout(), Layout::File);
        let rt = runtime().unwrap();
        let page = vec![0u8; 4096];
        let put = |min: u64, max: u64, level: u8| {
            let h = if min == 1 {
                LtxHeader::snapshot(4096, 1, max, 1000 * max as i64)
            } else {
                LtxHeader::incremental(4096, 1, min, max, 1000 * max as i64, 0)
            };
            let mut enc = LtxEncoder::new(Vec::new(), h.without_checksums()).unwrap();
            enc.add_page(1, &page).unwrap();
            enc.finish(0).unwrap();
            let bytes = bytes::Bytes::from(enc.into_inner());
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + max);
            rt.block_on(store.put_ltx("a.db", level, min, max, bytes, at))
                .unwrap();
        };
        put(1, 1, 0);
        put(2, 2, 0);
        put(3, 3, 0);
        put(1, 2, 9);
        let sidecar = SidecarStore::new(store.clone());
        let s = summarize(&rt, &store, &sidecar, "a.db").unwrap();
        assert_eq!(s.latest_txid, 3);
        assert_eq!(s.deleted, None);
        assert_eq!(s.restorable.map(|((a, _), (b, _))| (a, b)), Some((1, 3)));
        let l0 = s.levels[&0];
        assert_eq!((l0.objects, l0.min_txid, l0.max_txid), (3, 1, 3));
        let l9 = s.levels[&9];
        assert_eq!((l9.objects, l9.min_txid, l9.max_txid), (1, 1, 2));
        std::fs::create_dir_all(dir.path().join("a.db/walfs")).unwrap();
        std::fs::write(
            dir.path().join("a.db/walfs/deleted"),
            "txid=0000000000000003 deleted_at=2026-11-22T10:00:00Z\n",
        )
        .unwrap();
        let s = summarize(&rt, &store, &sidecar, "a.db").unwrap();
        assert_eq!(s.deleted.map(|d| d.txid), Some(3));
        put(4, 4, 0);
        let s = summarize(&rt, &store, &sidecar, "a.db").unwrap();
        assert_eq!(s.deleted, None, "re-created after the marker");
    }
}

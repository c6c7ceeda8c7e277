//! Exact commit times for a point-in-time restore from S3.
//!
//! A LIST dates S3 objects by Last-Modified: the time of the upload or compaction, which is
//! later than the commit time the object holds (its `litestream-timestamp` metadata) by up
//! to a sync interval, or by much more after an outage; moto even keeps it in whole
//! seconds. A restore to a moment must never return a state committed after that moment,
//! so before a timestamp restore is planned, the objects around the moment are dated by
//! their metadata. Commit times grow with the TXID, so a binary search over the objects in
//! TXID order needs about log2(n) HEAD requests. File replicas need none: an object's mtime
//! is its commit time.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio::runtime::Runtime;

use crate::replica::store::{Layout, LtxObjectInfo, ReplicaStore};

/// Makes the timestamps of `objects` (one database's) exact where they decide which TXID is
/// the newest committed at or before `time`: afterwards every object ending at or below
/// that TXID is dated at or before `time`, the ones ending at it with their exact commit
/// time, and every later object after `time`. Returns the number of HEAD requests made.
pub fn date_objects_around(
    rt: &Runtime,
    store: &ReplicaStore,
    db: &str,
    objects: &mut [LtxObjectInfo],
    time: SystemTime,
) -> anyhow::Result<usize> {
    if store.layout() == Layout::File || objects.is_empty() {
        return Ok(0);
    }
    // One object per distinct max TXID, in TXID order (they all share its commit time).
    let mut by_max: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, o) in objects.iter().enumerate() {
        by_max
            .entry(o.max_txid)
            .and_modify(|j| {
                if o.level < objects[*j].level {
                    *j = i
                }
            })
            .or_insert(i);
    }
    let ends: Vec<(u64, usize)> = by_max.into_iter().collect();
    let mut exact: BTreeMap<u64, SystemTime> = BTreeMap::new();
    let mut heads = 0usize;
    let mut date =
        |k: usize, exact: &mut BTreeMap<u64, SystemTime>| -> anyhow::Result<SystemTime> {
            let (txid, i) = ends[k];
            if let Some(t) = exact.get(&txid) {
                return Ok(*t);
            }
            let o = &objects[i];
            let info = rt.block_on(store.head_ltx(db, o.level, o.min_txid, o.max_txid))?;
            heads += 1;
            exact.insert(txid, info.timestamp);
            Ok(info.timestamp)
        };
    // The first end committed after `time`.
    let (mut lo, mut hi) = (0usize, ends.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if date(mid, &mut exact)? <= time {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let boundary = ends.get(lo).map(|(txid, _)| *txid);
    let after = time + Duration::from_nanos(1);
    for o in objects.iter_mut() {
        o.timestamp = match (exact.get(&o.max_txid), boundary) {
            (Some(t), _) => *t,
            (None, Some(b)) if o.max_txid >= b => o.timestamp.max(after),
            _ => o.timestamp.min(time),
        };
    }
    Ok(heads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::store::ReplicaUrl;

    fn obj(level: u8, min: u64, max: u64, t: SystemTime) -> LtxObjectInfo {
        LtxObjectInfo {
            level,
            min_txid: min,
            max_txid: max,
            size: 1,
            timestamp: t,
            key: String::new(),
        }
    }

    #[test]
    fn file_replicas_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let url = ReplicaUrl::parse(&format!("file://{}", dir.path().display())).unwrap();
        let store = ReplicaStore::open(&url).unwrap();
        let rt = crate::restore::runtime().unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let mut objects = vec![obj(9, 1, 1, t), obj(0, 2, 2, t + Duration::from_secs(5))];
        let before = objects.clone();
        let heads = date_objects_around(&rt, &store, "db", &mut objects, t).unwrap();
        assert_eq!(heads, 0);
        assert_eq!(objects, before);
    }
}

//! Restore plans: which LTX objects of one database, applied in which order, rebuild it at a
//! target TXID. Pure logic over a listing; no I/O.
//!
//! This file owns [`plan`], [`RestoreTarget`], [`RestorePlan`], [`PlanError`] and
//! [`restorable_txids`].
//!
//! An LTX object holds, for the TXIDs `min..=max` it covers, the final image of every page
//! those transactions changed, and the database size after `max`. Applying it to the
//! database as of any TXID `p` with `min - 1 <= p < max` therefore gives the database as of
//! `max` (pages changed in the overlap are rewritten with the same values). An object whose
//! min TXID is 1 is a full snapshot and applies to anything, including nothing. This is what
//! lets a plan use Litestream's compacted files, which overlap the snapshot and each other.
//!
//! The planner starts from nothing (TXID 0) and repeatedly takes the applicable object that
//! reaches furthest without passing the target: the first step is thus the newest snapshot
//! at or below the target (level 9, or any other object starting at TXID 1), then
//! contiguous or overlapping files of levels 0 to 8. Taking the furthest reach is optimal:
//! any object applicable after a shorter step is applicable after the longest one too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::SystemTime;

use crate::replica::store::LtxObjectInfo;
use crate::replica::timestamp::format_rfc3339_nano;

/// The level that holds snapshots.
pub const SNAPSHOT_LEVEL: u8 = 9;
/// The highest level a restore reads (0 to 9).
pub const MAX_LEVEL: u8 = 9;

/// What state to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreTarget {
    /// The latest TXID the replica holds.
    Latest,
    /// Exactly this TXID.
    Txid(u64),
    /// The newest TXID whose object timestamp is at or before this time.
    Timestamp(SystemTime),
}

/// The objects to apply, in order, to rebuild one database at `txid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    /// The database path relative to the replica root ("" for a database at the root).
    pub db: String,
    /// The TXID the database will be at.
    pub txid: u64,
    /// When `txid` was written: the earliest timestamp of an object ending at it.
    pub timestamp: SystemTime,
    /// The objects to apply, in order; the first is a snapshot (min TXID 1).
    pub objects: Vec<LtxObjectInfo>,
}

impl RestorePlan {
    /// Total bytes to download.
    pub fn bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }
}

/// Why a database cannot be restored at the requested point. Each message is one line that
/// names the database and says what is possible instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// No object starts at TXID 1.
    NoSnapshot { db: String },
    /// The target TXID is older than the oldest snapshot.
    BeforeOldest {
        db: String,
        target: u64,
        oldest: u64,
        oldest_time: SystemTime,
    },
    /// The target TXID is newer than anything in the replica.
    AfterLatest {
        db: String,
        target: u64,
        latest: u64,
    },
    /// No restorable TXID was written at or before the requested time.
    NothingBefore {
        db: String,
        time: SystemTime,
        oldest: u64,
        oldest_time: SystemTime,
    },
    /// The chain of objects breaks: after `from`, the next object starts at `to`.
    Gap {
        db: String,
        from: u64,
        to: u64,
        missing_key: String,
    },
    /// The target lies strictly inside a compacted object (the finer objects are gone).
    InsideObject {
        db: String,
        target: u64,
        key: String,
        min: u64,
        max: u64,
        below: Option<u64>,
        above: Option<u64>,
    },
}

/// How messages name a database.
pub fn db_label(db: &str) -> String {
    if db.is_empty() {
        "the database at the replica root".to_string()
    } else {
        db.to_string()
    }
}

fn nearest(below: Option<u64>, above: Option<u64>) -> String {
    match (below, above) {
        (Some(b), Some(a)) => format!("the nearest restorable TXIDs are {b} and {a}"),
        (Some(b), None) => format!("the nearest restorable TXID is {b}"),
        (None, Some(a)) => format!("the nearest restorable TXID is {a}"),
        (None, None) => "no TXID is restorable".to_string(),
    }
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::NoSnapshot { db } => write!(
                f,
                "replica has no snapshot for {}: nothing to restore",
                db_label(db)
            ),
            PlanError::BeforeOldest {
                db,
                target,
                oldest,
                oldest_time,
            } => write!(
                f,
                "TXID {target} of {} is before the oldest restorable TXID {oldest} (at {}); \
                 pass a TXID from {oldest} on",
                db_label(db),
                format_rfc3339_nano(*oldest_time)
            ),
            PlanError::AfterLatest { db, target, latest } => write!(
                f,
                "TXID {target} of {} is after the newest TXID {latest} in the replica; \
                 pass a TXID up to {latest}",
                db_label(db)
            ),
            PlanError::NothingBefore {
                db,
                time,
                oldest,
                oldest_time,
            } => write!(
                f,
                "{} has no restorable TXID at or before {}; the oldest restorable is TXID \
                 {oldest} at {}",
                db_label(db),
                format_rfc3339_nano(*time),
                format_rfc3339_nano(*oldest_time)
            ),
            PlanError::Gap {
                db,
                from,
                to,
                missing_key,
            } => write!(
                f,
                "cannot restore {}: TXIDs jump from {from} to {to}: object {missing_key} is missing",
                db_label(db)
            ),
            PlanError::InsideObject {
                db,
                target,
                key,
                min,
                max,
                below,
                above,
            } => write!(
                f,
                "TXID {target} of {} cannot be restored exactly: it lies inside the compacted \
                 object {key} (TXIDs {min} to {max}); {}",
                db_label(db),
                nearest(*below, *above)
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// Every TXID the objects can rebuild the database at (0, the empty start, excluded),
/// each with its time: the earliest timestamp of an object ending at it.
pub fn restorable_txids(objects: &[LtxObjectInfo]) -> BTreeMap<u64, SystemTime> {
    let mut by_max: Vec<&LtxObjectInfo> = usable(objects).collect();
    by_max.sort_by_key(|o| o.max_txid);
    let mut reach = BTreeSet::from([0u64]);
    let mut out = BTreeMap::new();
    for o in by_max {
        // Positions below o.max are final: every object ending below was processed.
        if reach.range(o.min_txid - 1..o.max_txid).next().is_some() {
            reach.insert(o.max_txid);
            out.entry(o.max_txid)
                .and_modify(|t: &mut SystemTime| *t = (*t).min(o.timestamp))
                .or_insert(o.timestamp);
        }
    }
    // An object ending at a reachable TXID may be unusable itself but still dates it.
    for o in usable(objects) {
        if let Some(t) = out.get_mut(&o.max_txid) {
            *t = (*t).min(o.timestamp);
        }
    }
    out
}

fn usable(objects: &[LtxObjectInfo]) -> impl Iterator<Item = &LtxObjectInfo> {
    objects
        .iter()
        .filter(|o| o.level <= MAX_LEVEL && o.min_txid >= 1 && o.min_txid <= o.max_txid)
}

/// Plans the restore of `db` from its objects at levels 0 to 9 (any order). `key_of(min,
/// max)` names the level-0 object that would cover a gap, for error messages.
pub fn plan(
    db: &str,
    objects: &[LtxObjectInfo],
    target: RestoreTarget,
    key_of: impl Fn(u64, u64) -> String,
) -> Result<RestorePlan, PlanError> {
    let objs: Vec<&LtxObjectInfo> = usable(objects).collect();
    let db_s = db.to_string();
    let Some(oldest) = objs
        .iter()
        .filter(|o| o.min_txid == 1)
        .map(|o| o.max_txid)
        .min()
    else {
        return Err(PlanError::NoSnapshot { db: db_s });
    };
    let latest = objs.iter().map(|o| o.max_txid).max().unwrap_or(0);
    let restorable = restorable_txids(objects);

    let target_txid = match target {
        RestoreTarget::Latest => latest,
        RestoreTarget::Txid(t) => {
            if t > latest {
                return Err(PlanError::AfterLatest {
                    db: db_s,
                    target: t,
                    latest,
                });
            }
            if t < oldest {
                return Err(PlanError::BeforeOldest {
                    db: db_s,
                    target: t,
                    oldest,
                    oldest_time: restorable
                        .get(&oldest)
                        .copied()
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
            t
        }
        RestoreTarget::Timestamp(time) => {
            match restorable.iter().rev().find(|(_, t)| **t <= time) {
                Some((txid, _)) => *txid,
                None => {
                    let (oldest, oldest_time) = restorable
                        .iter()
                        .next()
                        .map(|(a, b)| (*a, *b))
                        .unwrap_or((oldest, SystemTime::UNIX_EPOCH));
                    return Err(PlanError::NothingBefore {
                        db: db_s,
                        time,
                        oldest,
                        oldest_time,
                    });
                }
            }
        }
    };

    let mut pos = 0u64;
    let mut steps: Vec<LtxObjectInfo> = Vec::new();
    while pos < target_txid {
        let best = objs
            .iter()
            .filter(|o| o.min_txid <= pos + 1 && o.max_txid > pos && o.max_txid <= target_txid)
            .min_by(|a, b| {
                // Furthest reach first; then the smaller download; then the higher level.
                b.max_txid
                    .cmp(&a.max_txid)
                    .then(a.size.cmp(&b.size))
                    .then(b.level.cmp(&a.level))
                    .then(a.key.cmp(&b.key))
            });
        match best {
            Some(o) => {
                steps.push((*o).clone());
                pos = o.max_txid;
            }
            None => {
                if let Some(o) = objs
                    .iter()
                    .filter(|o| o.min_txid <= pos + 1 && o.max_txid > target_txid)
                    .min_by_key(|o| (o.max_txid, o.level))
                {
                    return Err(PlanError::InsideObject {
                        db: db_s,
                        target: target_txid,
                        key: o.key.clone(),
                        min: o.min_txid,
                        max: o.max_txid,
                        below: restorable.range(..target_txid).next_back().map(|(t, _)| *t),
                        above: restorable.range(target_txid + 1..).next().map(|(t, _)| *t),
                    });
                }
                let to = objs
                    .iter()
                    .filter(|o| o.min_txid > pos + 1)
                    .map(|o| o.min_txid)
                    .min()
                    .unwrap_or(target_txid + 1);
                return Err(PlanError::Gap {
                    db: db_s,
                    from: pos,
                    to,
                    missing_key: key_of(pos + 1, to - 1),
                });
            }
        }
    }
    let timestamp = restorable
        .get(&target_txid)
        .copied()
        .or_else(|| steps.last().map(|o| o.timestamp))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok(RestorePlan {
        db: db_s,
        txid: target_txid,
        timestamp,
        objects: steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::layout::Layout;
    use std::time::Duration;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    /// An object at `level` covering `min..=max`, written at second `max` (size 10, or
    /// 1000 for a snapshot).
    fn obj(level: u8, min: u64, max: u64) -> LtxObjectInfo {
        LtxObjectInfo {
            level,
            min_txid: min,
            max_txid: max,
            size: if min == 1 { 1000 } else { 10 },
            timestamp: t(max),
            key: Layout::File.ltx_key("", "db", level, min, max),
        }
    }

    fn key_of(min: u64, max: u64) -> String {
        Layout::File.ltx_key("", "db", 0, min, max)
    }

    fn steps(p: &RestorePlan) -> Vec<(u8, u64, u64)> {
        p.objects
            .iter()
            .map(|o| (o.level, o.min_txid, o.max_txid))
            .collect()
    }

    fn run(objs: &[LtxObjectInfo], target: RestoreTarget) -> Result<RestorePlan, PlanError> {
        plan("db", objs, target, key_of)
    }

    #[test]
    fn snapshot_then_level0_to_latest() {
        let mut objs = vec![obj(9, 1, 3)];
        objs.extend((1..=6).map(|i| obj(0, i, i)));
        let p = run(&objs, RestoreTarget::Latest).unwrap();
        assert_eq!(p.txid, 6);
        assert_eq!(steps(&p), vec![(9, 1, 3), (0, 4, 4), (0, 5, 5), (0, 6, 6)]);
        assert_eq!(p.timestamp, t(6));
        assert_eq!(p.bytes(), 1030);
    }

    #[test]
    fn level0_snapshot_suffices_without_level9() {
        // Litestream's first L0 file is 1-1 (the whole database); walfs heals with L0
        // snapshots 1-N.
        let objs = vec![
            obj(0, 1, 1),
            obj(0, 2, 2),
            obj(0, 3, 3),
            obj(0, 1, 4),
            obj(0, 5, 5),
        ];
        let p = run(&objs, RestoreTarget::Latest).unwrap();
        assert_eq!(steps(&p), vec![(0, 1, 4), (0, 5, 5)]);
        let p = run(&objs, RestoreTarget::Txid(3)).unwrap();
        assert_eq!(steps(&p), vec![(0, 1, 1), (0, 2, 2), (0, 3, 3)]);
    }

    #[test]
    fn prefers_compacted_files_and_newest_snapshot_below_target() {
        // Litestream: L9 snapshots, L1 compactions of L0, L0 still held for the tail.
        let mut objs = vec![obj(9, 1, 4), obj(9, 1, 12)];
        objs.extend([obj(1, 1, 4), obj(1, 5, 8), obj(1, 9, 12), obj(1, 13, 16)]);
        objs.extend((9..=18).map(|i| obj(0, i, i)));
        let p = run(&objs, RestoreTarget::Latest).unwrap();
        assert_eq!(
            steps(&p),
            vec![(9, 1, 12), (1, 13, 16), (0, 17, 17), (0, 18, 18)]
        );
        let p = run(&objs, RestoreTarget::Txid(10)).unwrap();
        assert_eq!(
            steps(&p),
            vec![(9, 1, 4), (1, 5, 8), (0, 9, 9), (0, 10, 10)]
        );
        let p = run(&objs, RestoreTarget::Txid(12)).unwrap();
        assert_eq!(steps(&p), vec![(9, 1, 12)]);
    }

    #[test]
    fn overlapping_compacted_files_are_followed() {
        // Litestream's L1 files overlap the snapshot and each other (compaction windows
        // that restart from an earlier TXID).
        let objs = vec![
            obj(9, 1, 10),
            obj(1, 5, 14),
            obj(1, 12, 20),
            obj(2, 8, 18),
            obj(0, 21, 21),
        ];
        let p = run(&objs, RestoreTarget::Latest).unwrap();
        assert_eq!(
            steps(&p),
            vec![(9, 1, 10), (2, 8, 18), (1, 12, 20), (0, 21, 21)]
        );
        let p = run(&objs, RestoreTarget::Txid(14)).unwrap();
        assert_eq!(steps(&p), vec![(9, 1, 10), (1, 5, 14)]);
    }

    #[test]
    fn no_snapshot() {
        let objs = vec![obj(0, 2, 2), obj(0, 3, 3)];
        let e = run(&objs, RestoreTarget::Latest).unwrap_err();
        assert_eq!(
            e.to_string(),
            "replica has no snapshot for db: nothing to restore"
        );
        let e = plan("", &[], RestoreTarget::Latest, key_of).unwrap_err();
        assert!(matches!(e, PlanError::NoSnapshot { .. }), "{e}");
        assert!(e.to_string().contains("replica root"), "{e}");
    }

    #[test]
    fn gap_names_the_missing_object() {
        let objs = vec![obj(9, 1, 3), obj(0, 4, 4), obj(0, 7, 7), obj(0, 8, 8)];
        let e = run(&objs, RestoreTarget::Latest).unwrap_err();
        assert_eq!(
            e,
            PlanError::Gap {
                db: "db".into(),
                from: 4,
                to: 7,
                missing_key: key_of(5, 6),
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("TXIDs jump from 4 to 7: object db/ltx/0/0000000000000005-0000000000000006.ltx is missing"),
            "{msg}"
        );
        // Below the gap is fine.
        assert_eq!(run(&objs, RestoreTarget::Txid(4)).unwrap().txid, 4);
    }

    #[test]
    fn target_bounds() {
        let objs = vec![obj(9, 1, 5), obj(0, 6, 6), obj(0, 7, 7)];
        let e = run(&objs, RestoreTarget::Txid(3)).unwrap_err();
        assert_eq!(
            e,
            PlanError::BeforeOldest {
                db: "db".into(),
                target: 3,
                oldest: 5,
                oldest_time: t(5),
            }
        );
        assert!(
            e.to_string().contains(&format!(
                "oldest restorable TXID 5 (at {})",
                format_rfc3339_nano(t(5))
            )),
            "{e}"
        );
        let e = run(&objs, RestoreTarget::Txid(8)).unwrap_err();
        assert!(matches!(e, PlanError::AfterLatest { latest: 7, .. }), "{e}");
        assert_eq!(run(&objs, RestoreTarget::Txid(5)).unwrap().objects.len(), 1);
    }

    #[test]
    fn target_inside_a_compaction() {
        // The L0 files of 6-9 were removed after compaction into L1 6-10.
        let objs = vec![obj(9, 1, 5), obj(1, 6, 10), obj(0, 10, 10), obj(0, 11, 11)];
        let e = run(&objs, RestoreTarget::Txid(8)).unwrap_err();
        match &e {
            PlanError::InsideObject {
                min,
                max,
                below,
                above,
                ..
            } => {
                assert_eq!((*min, *max, *below, *above), (6, 10, Some(5), Some(10)));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string()
                .contains("nearest restorable TXIDs are 5 and 10"),
            "{e}"
        );
        assert_eq!(
            steps(&run(&objs, RestoreTarget::Latest).unwrap()),
            vec![(9, 1, 5), (1, 6, 10), (0, 11, 11)]
        );
    }

    #[test]
    fn timestamp_selects_newest_txid_at_or_before() {
        let mut objs = vec![obj(9, 1, 3)];
        objs.extend((4..=8).map(|i| obj(0, i, i)));
        // A compaction written later than its inputs does not date them later.
        let mut c = obj(1, 4, 8);
        c.timestamp = t(100);
        objs.push(c);
        let p = run(&objs, RestoreTarget::Timestamp(t(6))).unwrap();
        assert_eq!(p.txid, 6);
        assert_eq!(p.timestamp, t(6));
        let p = run(
            &objs,
            RestoreTarget::Timestamp(t(6) + Duration::from_millis(999)),
        )
        .unwrap();
        assert_eq!(p.txid, 6);
        let p = run(&objs, RestoreTarget::Timestamp(t(1000))).unwrap();
        assert_eq!(p.txid, 8);
        assert_eq!(steps(&p), vec![(9, 1, 3), (1, 4, 8)]);
        let e = run(&objs, RestoreTarget::Timestamp(t(2))).unwrap_err();
        assert!(
            matches!(e, PlanError::NothingBefore { oldest: 3, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("oldest restorable is TXID 3"), "{e}");
    }

    #[test]
    fn restorable_txids_follow_reachability() {
        let objs = vec![
            obj(9, 1, 3),
            obj(0, 4, 4),
            obj(0, 6, 6),
            obj(1, 4, 7),
            obj(0, 9, 9),
        ];
        let r: Vec<u64> = restorable_txids(&objs).keys().copied().collect();
        assert_eq!(r, vec![3, 4, 7]);
    }

    #[test]
    fn ignores_malformed_and_out_of_range_levels() {
        let mut bad = obj(10, 1, 50);
        bad.key = "x".into();
        let objs = vec![obj(9, 1, 2), bad, obj(0, 3, 3)];
        let p = run(&objs, RestoreTarget::Latest).unwrap();
        assert_eq!(p.txid, 3);
    }

    /// A day with the default settings (an upload a second, levels at 30 s, 5 min and 1 h,
    /// a daily snapshot), written with the replica's maintenance rules
    /// (`crate::replica::compact`); every restore target is counted with this planner.
    #[test]
    fn a_restore_to_any_moment_of_a_day_needs_at_most_fifteen_objects() {
        use crate::replica::compact::{
            absorbed_by_next, compacted_away, compaction_inputs, window_start, ObjId,
        };
        use std::time::UNIX_EPOCH;
        let o = ObjId::new;

        const DAY: u64 = 86_400;
        let intervals = [30u64, 300, 3600];
        // A history's first upload overlaps its first snapshot, as capture stages them.
        let mut local = vec![o(9, 1, 1), o(0, 1, 1)];
        let mut remote = local.clone();
        let done = |remote: &[ObjId], k: u8| {
            remote
                .iter()
                .filter(|x| x.level == k)
                .map(|x| x.max)
                .max()
                .unwrap_or(0)
        };
        for t in 2..=DAY + 1 {
            let l0: Vec<ObjId> = local.iter().copied().filter(|x| x.level == 0).collect();
            let absorbed = absorbed_by_next(&l0, &[], window_start(&local, 0), t - 1);
            let new = o(0, absorbed.first().map_or(t, |a| a.min), t);
            local.push(new);
            remote.push(new);
            for (i, every) in intervals.iter().enumerate() {
                let k = i as u8 + 1;
                if (t - 1) % every != 0 {
                    continue;
                }
                for inputs in compaction_inputs(&local, &[], k, done(&remote, k)) {
                    let written = o(k, inputs[0].min, inputs[inputs.len() - 1].max);
                    let gone = compacted_away(&local, written);
                    local.retain(|x| !gone.contains(x));
                    local.push(written);
                    remote.push(written);
                }
            }
            assert!(local.len() < 120, "{} local copies at {t}", local.len());
        }
        let infos: Vec<LtxObjectInfo> = remote
            .iter()
            .map(|x| LtxObjectInfo {
                level: x.level,
                min_txid: x.min,
                max_txid: x.max,
                size: x.max - x.min + 1,
                timestamp: UNIX_EPOCH + Duration::from_secs(x.max),
                key: format!("{}/{}-{}", x.level, x.min, x.max),
            })
            .collect();
        // Restore's planner over every target is quadratic in a day's objects: count with
        // the same rule (from TXID 0, the furthest reach not past the target) over objects
        // sorted by max TXID, and check that against the planner on some targets.
        let mut by_max = remote.clone();
        by_max.sort_by_key(|x| std::cmp::Reverse(x.max));
        let greedy = |with_l0: bool, t: u64| {
            let (mut pos, mut n) = (0, 0);
            while pos < t {
                let start = by_max.partition_point(|x| x.max > t);
                let best = by_max[start..]
                    .iter()
                    .take_while(|x| x.max > pos)
                    .find(|x| x.min <= pos + 1 && (with_l0 || x.level > 0))
                    .expect("every target is restorable");
                pos = best.max;
                n += 1;
            }
            n
        };
        let without_l0: Vec<LtxObjectInfo> =
            infos.iter().filter(|x| x.level > 0).cloned().collect();
        let planned = |objs: &[LtxObjectInfo], t: u64| {
            plan("db", objs, RestoreTarget::Txid(t), |a, b| {
                format!("{a}-{b}")
            })
            .unwrap()
            .objects
            .len()
        };
        for t in [DAY + 1, DAY - 1, DAY - 1800, DAY - 3599] {
            assert_eq!(planned(&infos, t), greedy(true, t), "at {t}");
        }
        for t in [31, 3601 + 30 * 7, 43_201 - 30, DAY - 3599 - 30 * 11] {
            assert_eq!(planned(&without_l0, t), greedy(false, t), "at {t}");
        }
        let (mut worst, mut sum, mut n) = (0, 0, 0);
        // Every moment of the last hour (level 0 is still there), and every level-1
        // boundary of the day (level 0 is gone after its retention).
        for t in (DAY - 3599..=DAY + 1).chain((31..=DAY).step_by(30)) {
            let c = greedy(t > DAY - 3600, t);
            worst = worst.max(c);
            sum += c;
            n += 1;
        }
        let plain_worst = 1 + 23 + 11 + 9 + 29;
        // What the counters cost: the uploads each object carries (one TXID per upload).
        let carried = |k: u8| {
            let objs: Vec<&ObjId> = remote.iter().filter(|x| x.level == k).collect();
            let ticks: u64 = objs.iter().map(|x| x.max - x.min + 1).sum();
            let plain: u64 = match k {
                0 => objs.len() as u64,
                _ => intervals[k as usize - 1] * objs.len() as u64,
            };
            ticks as f64 / plain as f64
        };
        eprintln!(
            "restore plans over a day: at most {worst} objects, {:.1} on average \
             (Litestream's layout: up to {plain_worst}); {} objects in the replica; \
             each object carries {:.2} (level 0), {:.2}, {:.2}, {:.2} times what a \
             plain one would",
            sum as f64 / n as f64,
            remote.len(),
            carried(0),
            carried(1),
            carried(2),
            carried(3)
        );
        assert!(worst <= 15, "a restore needs {worst} objects");
    }
}

//! Retention: which objects of a replica may go, and when the next one may. Pure planning
//! over what one replica holds for one database; the maintenance loop
//! (`super::maintain`) deletes.
//!
//! The rule keeps every moment of the last `retention` restorable, and always the latest
//! state:
//! - snapshots (level 9): every snapshot taken inside the window, and the newest one taken
//!   before it (moments at the window's start restore from it); older ones go;
//! - levels 0 to 8: what ends at or below the oldest snapshot kept goes once that snapshot
//!   is at or before the window's start (no restore inside the window starts below it);
//!   until then the moments before it are inside the window and restore from below it;
//!   a whole image (min TXID 1) that ends where a kept snapshot ends goes at once (the
//!   snapshot restores the same);
//! - level 0 also goes `l0_retention` after it was compacted into level 1 (a level-1 object
//!   spans its TXIDs), as Litestream 0.5 does (5 minutes there): restores inside the window
//!   then land on level-1 boundaries, never on a state committed after the moment asked
//!   for.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::compact::ObjId;

/// The snapshot level.
const SNAPSHOTS: u8 = 9;

/// Retention settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Every moment this far back stays restorable.
    pub retention: Duration,
    /// How long a level-0 object stays after a level-1 object covers it.
    pub l0_retention: Duration,
}

/// What may be deleted now from `objects` (each with its timestamp), and when the next
/// object becomes deletable if nothing else changes (`None`: never).
pub fn plan_retention(
    objects: &BTreeMap<ObjId, SystemTime>,
    now: SystemTime,
    policy: RetentionPolicy,
) -> (Vec<ObjId>, Option<SystemTime>) {
    let mut delete = Vec::new();
    let mut next: Option<SystemTime> = None;
    let mut soonest = |t: SystemTime| {
        next = Some(next.map_or(t, |n: SystemTime| n.min(t)));
    };
    let window_start = now
        .checked_sub(policy.retention)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut snaps: Vec<(ObjId, SystemTime)> = objects
        .iter()
        .filter(|(o, _)| o.level == SNAPSHOTS && o.min == 1)
        .map(|(o, t)| (*o, *t))
        .collect();
    snaps.sort_by_key(|(o, t)| (o.max, *t));
    // The oldest snapshot kept: the newest one taken at or before the window's start, else
    // the oldest. Snapshot `i` goes once snapshot `i + 1` is older than the window.
    let mut oldest_kept = 0;
    for i in 0..snaps.len().saturating_sub(1) {
        let newer = snaps[i + 1].1;
        if newer <= window_start {
            oldest_kept = i + 1;
        } else {
            soonest(newer + policy.retention);
            break;
        }
    }
    delete.extend(snaps[..oldest_kept].iter().map(|(o, _)| *o));
    // A whole image (min TXID 1: a history's first upload) that ends where a kept
    // snapshot ends restores nothing the snapshot does not.
    let snapshot_ends: Vec<u64> = snaps[oldest_kept..].iter().map(|(o, _)| o.max).collect();
    let repeats_a_snapshot = |o: &ObjId| o.min == 1 && snapshot_ends.contains(&o.max);
    // Below the oldest snapshot kept nothing is needed once that snapshot is at or before
    // the window's start. While it is inside the window, the moments before it (a
    // history's first TXIDs, or those before a snapshot that started the history afresh)
    // still restore from what lies below it.
    let floor = match snaps.get(oldest_kept) {
        Some((o, t)) if *t <= window_start => Some(o.max),
        Some((o, t)) => {
            if objects
                .keys()
                .any(|x| x.level < SNAPSHOTS && x.max <= o.max && !repeats_a_snapshot(x))
            {
                soonest(*t + policy.retention);
            }
            None
        }
        None => None,
    };
    let level1: Vec<&ObjId> = objects.keys().filter(|o| o.level == 1).collect();
    let compacted = |o: &ObjId| level1.iter().any(|l| l.min <= o.min && o.max <= l.max);
    for (o, t) in objects {
        if o.level == SNAPSHOTS {
            continue;
        }
        if floor.is_some_and(|f| o.max <= f) || repeats_a_snapshot(o) {
            delete.push(*o);
        } else if o.level == 0 && compacted(o) {
            let due = *t + policy.l0_retention;
            if due <= now {
                delete.push(*o);
            } else {
                soonest(due);
            }
        }
    }
    delete.sort();
    (delete, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    const POLICY: RetentionPolicy = RetentionPolicy {
        retention: Duration::from_secs(100),
        l0_retention: Duration::from_secs(10),
    };

    fn o(level: u8, min: u64, max: u64) -> ObjId {
        ObjId::new(level, min, max)
    }

    #[test]
    fn keeps_the_window_and_the_snapshot_before_it() {
        let objects = BTreeMap::from([
            (o(9, 1, 10), at(0)),
            (o(1, 1, 5), at(0)),
            (o(1, 6, 10), at(1)),
            (o(9, 1, 20), at(50)),
            (o(1, 11, 20), at(50)),
            (o(9, 1, 30), at(120)),
            (o(1, 21, 30), at(120)),
            (o(1, 31, 35), at(190)),
        ]);
        // At 200 the window starts at 100: the snapshot at 50 restores the moments from
        // 100 to 120; the one at 0 and what ends below 20 go.
        let (del, next) = plan_retention(&objects, at(200), POLICY);
        assert_eq!(
            del,
            vec![o(1, 1, 5), o(1, 6, 10), o(1, 11, 20), o(9, 1, 10)]
        );
        assert_eq!(
            next,
            Some(at(220)),
            "the snapshot at 50 goes when 120 leaves"
        );
        // Early on nothing goes: the moments before the oldest snapshot are in the window.
        let (del, next) = plan_retention(&objects, at(60), POLICY);
        assert!(del.is_empty(), "{del:?}");
        assert_eq!(
            next,
            Some(at(100)),
            "the snapshot at 0 leaves the window at 100"
        );
        // Once the oldest snapshot is at the window's start, what it holds goes.
        let (del, next) = plan_retention(&objects, at(100), POLICY);
        assert_eq!(del, vec![o(1, 1, 5), o(1, 6, 10)]);
        assert_eq!(next, Some(at(150)));
    }

    /// Fuzz seed 0xabcd5, sequence 393: a history's first TXIDs uploaded at level 0, then a
    /// snapshot that started the history afresh (another database moved over it). The
    /// TXIDs before the snapshot are inside the window and must stay restorable.
    #[test]
    fn the_history_before_the_first_snapshot_stays_while_it_is_in_the_window() {
        let objects = BTreeMap::from([
            (o(0, 1, 1), at(0)),
            (o(0, 2, 2), at(1)),
            (o(0, 3, 4), at(2)),
            (o(9, 1, 5), at(3)),
            (o(0, 6, 6), at(4)),
        ]);
        let (del, next) = plan_retention(&objects, at(5), POLICY);
        assert!(del.is_empty(), "{del:?}");
        assert_eq!(next, Some(at(103)));
        let (del, next) = plan_retention(&objects, at(103), POLICY);
        assert_eq!(del, vec![o(0, 1, 1), o(0, 2, 2), o(0, 3, 4)]);
        assert_eq!(next, None);
    }

    #[test]
    fn a_whole_image_that_repeats_a_snapshot_goes_at_once() {
        // A new database's first upload repeats the snapshot capture took of it; an
        // incremental object that ends at a snapshot stays like any other.
        let objects = BTreeMap::from([
            (o(9, 1, 3), at(0)),
            (o(0, 1, 3), at(0)),
            (o(0, 4, 4), at(1)),
            (o(9, 1, 6), at(2)),
            (o(0, 5, 6), at(2)),
            (o(0, 7, 7), at(3)),
        ]);
        let (del, next) = plan_retention(&objects, at(4), POLICY);
        assert_eq!(del, vec![o(0, 1, 3)]);
        assert_eq!(
            next,
            Some(at(102)),
            "the snapshot at 0 goes when the one at 2 leaves the window"
        );
        // Alone, it goes before the snapshot leaves the window, and nothing is due.
        let alone = BTreeMap::from([(o(9, 1, 3), at(0)), (o(0, 1, 3), at(0))]);
        assert_eq!(
            plan_retention(&alone, at(1), POLICY),
            (vec![o(0, 1, 3)], None)
        );
    }

    #[test]
    fn the_latest_snapshot_always_stays() {
        let objects = BTreeMap::from([(o(9, 1, 10), at(0)), (o(0, 11, 11), at(1))]);
        let (del, next) = plan_retention(&objects, at(10_000), POLICY);
        assert!(del.is_empty());
        assert_eq!(
            next, None,
            "nothing ever becomes deletable: an idle replica rests"
        );
    }

    #[test]
    fn level_0_goes_after_compaction_and_its_own_retention() {
        let objects = BTreeMap::from([
            (o(9, 1, 10), at(0)),
            (o(0, 11, 11), at(1)),
            (o(0, 12, 12), at(5)),
            (o(0, 13, 13), at(6)),
            (o(1, 11, 12), at(5)),
        ]);
        let (del, next) = plan_retention(&objects, at(12), POLICY);
        assert_eq!(del, vec![o(0, 11, 11)]);
        assert_eq!(next, Some(at(15)), "12 goes at 15; 13 is not compacted yet");
        let (del, next) = plan_retention(&objects, at(30), POLICY);
        assert_eq!(del, vec![o(0, 11, 11), o(0, 12, 12)]);
        assert_eq!(next, None);
    }
}

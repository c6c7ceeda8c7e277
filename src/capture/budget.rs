//! Bounded staging (`walfs mount --max-staging SIZE`): while the replica is behind (an
//! outage, a lease held elsewhere), everything capture stages waits in the staging
//! directory, and a long outage would fill its disk. [`StagingBudget::check`] keeps what
//! waits for upload near the bound without ever blocking or failing the application and
//! without dropping a committed state silently: once the pending files pass `SIZE`, each
//! captured database whose pending files are at least twice as large as a snapshot of it
//! (its size in pages) has them collapsed into one snapshot of its current committed state
//! ([`Capture::collapse_pending`]), with the next TXID; the pending batches and snapshots
//! it supersedes are deleted. The factor of two keeps a bound smaller than the snapshots
//! from rewriting every database at every round: a database is snapshotted again only
//! after it has staged about one snapshot's worth since, so the snapshots cost at most
//! about as much I/O as the commits they replace. The replica's history goes on from the
//! snapshot: a restore of the latest state, or of any TXID the replica held or that comes
//! after the snapshot, is exact; the TXIDs between can no longer be restored.
//!
//! The check runs on the uploader's thread at the start of each upload round, after the
//! round's seal (so never beside an upload that reads the files it deletes), at most every
//! [`MIN_CHECK_GAP`]. It lists each staged database's `segments/` and `snapshots/` (one
//! directory listing each) and reads the state file of a database it may collapse. It acts
//! only while the replica is behind, which it sees in staging itself: a pending file that
//! was already pending at the previous check outlived a whole upload round, and the
//! replica counts as behind once that has held for [`OUTAGE_GRACE`] (a round that renews a
//! lapsed lease first is not an outage). A healthy replica empties staging every round,
//! so a burst larger than the bound is uploaded as it is, with every point in time.
//!
//! It says so once per outage: one WARN at the first collapse, with the TXIDs that can no
//! longer be restored, and one if what is left still exceeds the bound (it is kept: it is
//! the latest state). Every collapse is counted in
//! [`CaptureStats::collapses`](super::CaptureStats).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::barrier::Step;
use super::{Capture, CaptureEvent};
use crate::flags::format_size;
use crate::staging::StagingResult;

/// Checks run at most this often (upload rounds follow every batch with a sync interval
/// of 0).
pub const MIN_CHECK_GAP: Duration = Duration::from_millis(250);

/// How long pending files must keep outliving upload rounds before the replica counts as
/// behind.
pub const OUTAGE_GRACE: Duration = Duration::from_secs(1);

/// The bound on one mount's staged data that waits for upload.
pub struct StagingBudget {
    max: u64,
    state: Mutex<BudgetState>,
}

#[derive(Default)]
struct BudgetState {
    last_check: Option<Instant>,
    /// The pending files (not the active segments) found at the last check.
    seen: HashSet<PathBuf>,
    /// Since when every check found pending files of the check before.
    behind_since: Option<Instant>,
    /// The collapse of this outage was logged.
    warned_collapse: bool,
    /// That even the snapshots exceed the bound was logged in this outage.
    warned_over: bool,
}

/// What one database has pending.
struct Pending {
    db: PathBuf,
    bytes: u64,
    files: Vec<(PathBuf, u64)>,
}

/// One database's collapse, for the log line.
struct Collapsed {
    db: PathBuf,
    /// The first TXID that can no longer be restored (the replica held the one before).
    from: u64,
    /// The snapshot's TXID.
    snapshot: u64,
}

/// Whether a pending file outlives upload rounds when the replica is behind (the active
/// segment is rewritten under one name; a temporary file is short-lived).
fn is_durable_item(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy());
    name.is_some_and(|n| n != "active" && !n.starts_with('.'))
}

impl StagingBudget {
    /// A bound of `max` bytes.
    pub fn new(max: u64) -> StagingBudget {
        StagingBudget {
            max,
            state: Mutex::new(BudgetState::default()),
        }
    }

    /// The bound in bytes.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Measures what waits for upload in `capture`'s staging and, if it passes the bound
    /// while the replica is behind, collapses what it can (see the module header). Returns
    /// the databases collapsed: each has a new snapshot to upload. Never fails: a staging
    /// error is logged (at debug: the next check tries again) and skips that database.
    pub fn check(&self, capture: &Capture) -> Vec<PathBuf> {
        let mut st = self.state.lock();
        let now = Instant::now();
        if st
            .last_check
            .is_some_and(|t| now.duration_since(t) < MIN_CHECK_GAP)
        {
            return Vec::new();
        }
        st.last_check = Some(now);
        let pending = match measure(capture) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!("cannot measure staging for --max-staging: {e}");
                return Vec::new();
            }
        };
        let seen: HashSet<PathBuf> = pending
            .iter()
            .flat_map(|p| p.files.iter().map(|(f, _)| f))
            .filter(|f| is_durable_item(f))
            .cloned()
            .collect();
        let behind = seen.iter().any(|f| st.seen.contains(f));
        st.seen = seen;
        if !behind {
            // The replica took everything the last check saw: any outage is over.
            st.behind_since = None;
            st.warned_collapse = false;
            st.warned_over = false;
            return Vec::new();
        }
        if now.duration_since(*st.behind_since.get_or_insert(now)) < OUTAGE_GRACE {
            return Vec::new();
        }
        let total: u64 = pending.iter().map(|p| p.bytes).sum();
        if total <= self.max {
            return Vec::new();
        }
        let mut collapsed = Vec::new();
        for p in &pending {
            match self.collapse_if_worth_it(capture, p) {
                Ok(Some(c)) => collapsed.push(c),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(db = %p.db.display(), "cannot collapse the pending transactions for --max-staging: {e}")
                }
            }
        }
        // What waits now, and the files the next check must find again to see the
        // replica still behind (the new snapshots among them).
        let after = measure(capture).unwrap_or_default();
        let after_total: u64 = after.iter().map(|p| p.bytes).sum();
        st.seen = after
            .iter()
            .flat_map(|p| p.files.iter().map(|(f, _)| f))
            .filter(|f| is_durable_item(f))
            .cloned()
            .collect();
        if !collapsed.is_empty() {
            capture
                .stats()
                .collapses
                .fetch_add(collapsed.len() as u64, Ordering::Relaxed);
            if std::mem::replace(&mut st.warned_collapse, true) {
                tracing::debug!(
                    databases = collapsed.len(),
                    before = total,
                    after = after_total,
                    "staging collapsed again for --max-staging"
                );
            } else {
                tracing::warn!(
                    "{}",
                    collapse_line(self.max, total, after_total, &collapsed)
                );
            }
        }
        if after_total > self.max && !std::mem::replace(&mut st.warned_over, true) {
            tracing::warn!(
                "staging holds {} waiting for the replica, more than --max-staging {}, though no database has more than about two snapshots' worth pending; walfs keeps it (the latest state of every database) until the replica is back; bring the replica back, or raise --max-staging above twice the databases' size",
                format_size(after_total),
                format_size(self.max)
            );
        }
        collapsed.into_iter().map(|c| c.db).collect()
    }

    /// Collapses the pending files of `p` if they are at least twice as large as a
    /// snapshot of the database (by its size in pages, uncompressed) and are not already
    /// one snapshot.
    fn collapse_if_worth_it(
        &self,
        capture: &Capture,
        p: &Pending,
    ) -> StagingResult<Option<Collapsed>> {
        let staging = capture.staging();
        if !capture.is_captured(&p.db) {
            return Ok(None);
        }
        let Some(state) = staging.state(&p.db)? else {
            return Ok(None);
        };
        let snapshot = u64::from(state.page_size) * u64::from(state.commit);
        let items: Vec<&(PathBuf, u64)> = p.files.iter().filter(|(_, len)| *len > 0).collect();
        let one_snapshot = items.len() == 1 && items[0].0.extension().is_some_and(|e| e == "ltx");
        if p.bytes < 2 * snapshot || one_snapshot {
            return Ok(None);
        }
        Ok(capture.collapse_pending(&p.db)?.map(|txid| Collapsed {
            db: p.db.clone(),
            from: state.uploaded_txid + 1,
            snapshot: txid,
        }))
    }
}

/// What waits for upload, per staged database.
fn measure(capture: &Capture) -> StagingResult<Vec<Pending>> {
    let staging = capture.staging();
    let mut out = Vec::new();
    for db in staging.databases()? {
        let files = staging.pending_files(&db)?;
        let bytes = files.iter().map(|(_, len)| len).sum();
        out.push(Pending { db, bytes, files });
    }
    Ok(out)
}

/// The one WARN line of an outage's first collapse.
fn collapse_line(max: u64, before: u64, after: u64, collapsed: &[Collapsed]) -> String {
    let mut spans = String::new();
    for (i, c) in collapsed.iter().enumerate() {
        if i == 5 {
            let _ = write!(spans, ", and {} more", collapsed.len() - 5);
            break;
        }
        if i > 0 {
            spans.push_str(", ");
        }
        let _ = match c.snapshot.saturating_sub(1) {
            last if last >= c.from => write!(
                spans,
                "{}: TXIDs {}-{} into the snapshot at TXID {}",
                c.db.display(),
                c.from,
                last,
                c.snapshot
            ),
            _ => write!(
                spans,
                "{}: the snapshot at TXID {}",
                c.db.display(),
                c.snapshot
            ),
        };
    }
    format!(
        "staging reached --max-staging {} ({} waiting) while the replica is behind (unreachable, or its lease is held elsewhere); collapsed the pending transactions of {} database{} into one snapshot each, now {} waiting ({spans}); points in time inside those TXID spans can no longer be restored, the latest state can; until the replica catches up, further collapses are counted (collapses=) but not logged; bring the replica back, or raise --max-staging",
        format_size(max),
        format_size(before),
        collapsed.len(),
        if collapsed.len() == 1 { "" } else { "s" },
        format_size(after),
    )
}

impl Capture {
    /// Collapses what `db` has pending into one snapshot of its current committed state
    /// (the next TXID) and deletes the pending batches and snapshots before it. `None` if
    /// no snapshot was staged (the database is not captured, is empty, or waits for a
    /// consistent point to restart its history). The snapshot's step seals the active
    /// segment first, so no batch after the snapshot is deleted.
    pub fn collapse_pending(&self, db: &Path) -> StagingResult<Option<u64>> {
        let events = self.with_db(db, Step::BACKGROUND, |c| c.snapshot())?;
        let Some(txid) = events
            .iter()
            .filter_map(|e| match e {
                CaptureEvent::Staged {
                    min_txid: 1,
                    max_txid,
                    ..
                } => Some(*max_txid),
                _ => None,
            })
            .max()
        else {
            return Ok(None);
        };
        self.staging.drop_staged(db, txid - 1)?;
        Ok(Some(txid))
    }
}

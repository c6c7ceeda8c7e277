//! Synchronous replication (`--sync-replication`, `--sync-database`): what a commit's
//! durability barrier waits for, so that a commit that returns is already in every replica
//! (RPO 0).
//!
//! This file owns [`SyncOptions`] (the flags), [`SyncReplication`] (which databases wait,
//! the TXID each replica is known to hold, the waiting itself, and what happens when the
//! replica does not answer in time) and [`SyncStats`].
//!
//! How a commit waits: capture stages it at the barrier (the `-wal` fsync under
//! `synchronous=FULL`, the journal's invalidation in rollback modes, a database fsync), and
//! the barrier then asks [`SyncReplication::wait`] for its TXID. The waiter wakes the
//! uploader at once (no sync interval), and sleeps until the uploader reports, through
//! [`SyncReplication::uploaded`], that every replica holds that TXID. Each replica's
//! uploader is one thread, so the commits that arrive while an upload is under way share
//! the next one (group commit).
//!
//! When the replica does not confirm within `--sync-timeout`, `--sync-timeout-action` says
//! what the application sees: `degrade` (the default) lets the commit return, logs one
//! error line, counts it, and lets the database's later commits return without waiting
//! until the replica has caught up; `eio` fails the barrier with EIO (SQLite reports an
//! I/O error and the commit is not acknowledged), and fails the barriers after it at once
//! until the replica has caught up. Either way the commit stays staged and is uploaded
//! when the replica answers again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Synchronous replication settings of a mount: flags of `walfs mount` (each field's doc
/// comment is its `--help` text).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct SyncOptions {
    /// Replicate every database synchronously: a commit returns once every replica holds
    /// it (WAL mode needs synchronous=FULL for this per commit; rollback-journal modes
    /// wait at the journal's invalidation).
    #[arg(long)]
    pub sync_replication: bool,
    /// Replicate the databases whose path under the mount matches PATTERN synchronously
    /// (`*` matches within one path component: `tenants/*.db`). May be repeated.
    #[arg(long = "sync-database", value_name = "PATTERN")]
    pub sync_databases: Vec<String>,
    /// How long a synchronous commit waits for the replica before --sync-timeout-action
    /// applies.
    #[arg(long, default_value = "10s", value_parser = crate::flags::duration)]
    pub sync_timeout: Duration,
    /// What a synchronous commit does when the replica has not confirmed it within
    /// --sync-timeout.
    #[arg(long, value_enum, default_value_t = SyncTimeoutAction::Degrade)]
    pub sync_timeout_action: SyncTimeoutAction,
}

impl Default for SyncOptions {
    fn default() -> SyncOptions {
        SyncOptions {
            sync_replication: false,
            sync_databases: Vec::new(),
            sync_timeout: Duration::from_secs(10),
            sync_timeout_action: SyncTimeoutAction::Degrade,
        }
    }
}

impl SyncOptions {
    /// Whether any database is replicated synchronously.
    pub fn enabled(&self) -> bool {
        self.sync_replication || !self.sync_databases.is_empty()
    }
}

/// `--sync-timeout-action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncTimeoutAction {
    /// The commit returns; the database replicates asynchronously (logged, counted) until
    /// the replica has caught up.
    Degrade,
    /// The commit fails with EIO, and so do the database's commits after it until the
    /// replica has caught up.
    Eio,
}

/// Why a synchronous commit did not wait for the replica, for the barrier to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Every replica holds the commit.
    Replicated,
    /// The replica did not confirm in time and the database replicates asynchronously
    /// for now: the commit returns.
    Degraded,
    /// The replica did not confirm in time and the action is `eio`: the barrier fails.
    Failed,
}

/// Counters of synchronous replication (logged at unmount).
#[derive(Debug, Default)]
pub struct SyncStats {
    /// Barriers that waited for an upload (not counting those whose commit the replica
    /// already held).
    pub waits: AtomicU64,
    /// Upload rounds that sent something while synchronous replication was on: with
    /// fewer rounds than waits, commits shared uploads.
    pub rounds: AtomicU64,
    /// Microseconds spent waiting, over all barriers that waited (timeouts included).
    pub waited_us: AtomicU64,
    /// Times a database's synchronous replication timed out (each degrade or EIO period
    /// counts once).
    pub timeouts: AtomicU64,
    /// Barriers that returned without the replica holding their commit, while degraded.
    pub degraded_commits: AtomicU64,
    /// Barriers failed with EIO.
    pub failed_commits: AtomicU64,
}

/// What is known of one database.
#[derive(Debug, Default)]
struct DbSync {
    /// The last TXID every replica holds (`None`: not known yet this mount).
    uploaded: Option<u64>,
    /// The highest TXID a barrier waited for.
    wanted: u64,
    /// Since when the database has not waited (timed out, not caught up since).
    degraded_since: Option<Instant>,
}

/// The synchronous replication of one mount.
pub struct SyncReplication {
    options: SyncOptions,
    dbs: Mutex<HashMap<PathBuf, DbSync>>,
    changed: Condvar,
    stats: SyncStats,
}

impl SyncReplication {
    pub fn new(options: SyncOptions) -> SyncReplication {
        SyncReplication {
            options,
            dbs: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            stats: SyncStats::default(),
        }
    }

    /// Whether commits of `db` (a path relative to the backing root) wait for the replica.
    pub fn applies_to(&self, db: &Path) -> bool {
        self.options.sync_replication
            || self
                .options
                .sync_databases
                .iter()
                .any(|p| path_matches(p, db))
    }

    pub fn stats(&self) -> &SyncStats {
        &self.stats
    }

    /// Whether a commit that cannot be replicated fails (`--sync-timeout-action eio`)
    /// rather than returning unreplicated.
    pub fn fails_commits(&self) -> bool {
        self.options.sync_timeout_action == SyncTimeoutAction::Eio
    }

    /// The uploaders report that every replica holds `db` up to `txid` (each replica's
    /// uploads of one database are made in order, and the fan-out reports the smallest
    /// TXID the replicas hold under one lock, so the last report is the newest). It records the entry even if no commit waits, so that a later wait never
    /// reads an older TXID from staging instead.
    /// Wakes the commits waiting for it; a degraded database whose replica has caught up
    /// waits again from its next commit.
    pub fn uploaded(&self, db: &Path, txid: u64) {
        let mut dbs = self.dbs.lock();
        let s = dbs.entry(db.to_path_buf()).or_default();
        s.uploaded = Some(txid);
        if let Some(since) = s.degraded_since {
            if txid >= s.wanted {
                s.degraded_since = None;
                tracing::warn!(
                    db = %db.display(),
                    txid,
                    after = ?since.elapsed(),
                    "synchronous replication resumed: the replica has caught up, and commits wait for it again"
                );
            }
        }
        self.changed.notify_all();
    }

    /// A barrier of `db` made `txid` durable locally: waits until every replica holds it,
    /// or until the timeout. `known_uploaded` reads what staging records the replica to
    /// hold, for a database not uploaded yet this mount (a database uploaded since has an
    /// entry, which is used instead); `kick` wakes the uploader.
    pub fn wait(
        &self,
        db: &Path,
        txid: u64,
        known_uploaded: impl FnOnce() -> Option<u64>,
        kick: impl Fn(),
    ) -> SyncOutcome {
        let start = Instant::now();
        let mut dbs = self.dbs.lock();
        if !dbs.contains_key(db) {
            let uploaded = known_uploaded();
            dbs.insert(
                db.to_path_buf(),
                DbSync {
                    uploaded,
                    ..DbSync::default()
                },
            );
        }
        let s = dbs.get_mut(db).expect("inserted above");
        s.wanted = s.wanted.max(txid);
        if s.uploaded.is_some_and(|u| u >= txid) {
            return SyncOutcome::Replicated;
        }
        if s.degraded_since.is_some() {
            return self.not_replicated();
        }
        self.stats.waits.fetch_add(1, Ordering::Relaxed);
        kick();
        let deadline = start + self.options.sync_timeout;
        loop {
            let s = dbs.get(db).expect("entries are never removed");
            if s.uploaded.is_some_and(|u| u >= txid) {
                self.stats
                    .waited_us
                    .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
                return SyncOutcome::Replicated;
            }
            if s.degraded_since.is_some() {
                // Another commit of this database timed out while this one waited.
                return self.not_replicated();
            }
            if self.changed.wait_until(&mut dbs, deadline).timed_out() {
                self.stats
                    .waited_us
                    .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
                let s = dbs.get_mut(db).expect("entries are never removed");
                if s.uploaded.is_some_and(|u| u >= txid) {
                    return SyncOutcome::Replicated;
                }
                s.degraded_since = Some(Instant::now());
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                let held = s
                    .uploaded
                    .map_or("nothing known yet".to_string(), |u| format!("TXID {u}"));
                let timeout = self.options.sync_timeout;
                match self.options.sync_timeout_action {
                    SyncTimeoutAction::Degrade => tracing::error!(
                        db = %db.display(),
                        "synchronous replication degraded to asynchronous: the replica has not confirmed TXID {txid} within --sync-timeout {timeout:?} (it holds {held}); commits return without waiting until it catches up (the upload errors above say why; staged commits are kept and uploaded then)"
                    ),
                    SyncTimeoutAction::Eio => tracing::error!(
                        db = %db.display(),
                        "synchronous replication failed: the replica has not confirmed TXID {txid} within --sync-timeout {timeout:?} (it holds {held}); this commit and the database's commits after it fail with EIO until the replica catches up (the upload errors above say why; use --sync-timeout-action degrade to keep writing)"
                    ),
                }
                return self.not_replicated();
            }
        }
    }

    fn not_replicated(&self) -> SyncOutcome {
        match self.options.sync_timeout_action {
            SyncTimeoutAction::Degrade => {
                self.stats.degraded_commits.fetch_add(1, Ordering::Relaxed);
                SyncOutcome::Degraded
            }
            SyncTimeoutAction::Eio => {
                self.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
                SyncOutcome::Failed
            }
        }
    }

    /// Whether a commit of some database is waiting for the replica (the uploader then
    /// retries a failing replica sooner).
    pub fn has_waiters(&self) -> bool {
        let dbs = self.dbs.lock();
        dbs.values().any(|s| {
            s.degraded_since.is_none() && s.uploaded.map_or(s.wanted > 0, |u| u < s.wanted)
        })
    }
}

/// Whether `path` matches `pattern`, component by component: `*` in a pattern component
/// matches any run of characters within one component.
pub fn path_matches(pattern: &str, path: &Path) -> bool {
    let pattern: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let path: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    pattern.len() == path.len()
        && pattern
            .iter()
            .zip(&path)
            .all(|(p, s)| component_matches(p.as_bytes(), s.as_bytes()))
}

fn component_matches(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| component_matches(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && component_matches(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn options(action: SyncTimeoutAction, timeout_ms: u64) -> SyncOptions {
        SyncOptions {
            sync_replication: true,
            sync_timeout: Duration::from_millis(timeout_ms),
            sync_timeout_action: action,
            ..SyncOptions::default()
        }
    }

    #[test]
    fn patterns_match_within_components() {
        let m = |p: &str, s: &str| path_matches(p, Path::new(s));
        assert!(m("app.db", "app.db"));
        assert!(m("/app.db", "app.db"));
        assert!(m("tenants/*.db", "tenants/a.db"));
        assert!(!m("tenants/*.db", "tenants/x/a.db"));
        assert!(!m("*.db", "tenants/a.db"));
        assert!(m("*/*.db", "tenants/a.db"));
        assert!(m("a*b*c", "aXbYc"));
        assert!(!m("a*b*c", "aXbY"));
        assert!(!m("app.db", "app.db2"));
        let s = SyncReplication::new(SyncOptions {
            sync_databases: vec!["orders.db".into()],
            ..SyncOptions::default()
        });
        assert!(s.applies_to(Path::new("orders.db")));
        assert!(!s.applies_to(Path::new("cache.db")));
        assert!(!SyncReplication::new(SyncOptions::default()).applies_to(Path::new("x.db")));
    }

    #[test]
    fn a_commit_waits_until_the_uploader_reports_it() {
        let s = Arc::new(SyncReplication::new(options(SyncTimeoutAction::Eio, 5_000)));
        let db = Path::new("a.db");
        let uploader = {
            let s = s.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                s.uploaded(Path::new("a.db"), 6);
                std::thread::sleep(Duration::from_millis(100));
                s.uploaded(Path::new("a.db"), 7);
            })
        };
        let kicked = AtomicU64::new(0);
        let start = Instant::now();
        let out = s.wait(
            db,
            7,
            || Some(5),
            || {
                kicked.fetch_add(1, Ordering::Relaxed);
            },
        );
        assert_eq!(out, SyncOutcome::Replicated);
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert_eq!(kicked.load(Ordering::Relaxed), 1);
        uploader.join().unwrap();
        // Already held: no wait, no kick.
        assert_eq!(
            s.wait(db, 7, || None, || panic!("no kick")),
            SyncOutcome::Replicated
        );
        assert!(!s.has_waiters());
    }

    #[test]
    fn a_timeout_degrades_until_the_replica_catches_up() {
        let s = SyncReplication::new(options(SyncTimeoutAction::Degrade, 50));
        let db = Path::new("a.db");
        assert_eq!(s.wait(db, 3, || Some(1), || {}), SyncOutcome::Degraded);
        // Degraded: later commits return at once.
        let start = Instant::now();
        assert_eq!(s.wait(db, 4, || None, || {}), SyncOutcome::Degraded);
        assert!(start.elapsed() < Duration::from_millis(40));
        // Caught up to TXID 3 only: still degraded (4 was wanted).
        s.uploaded(db, 3);
        assert_eq!(s.wait(db, 5, || None, || {}), SyncOutcome::Degraded);
        s.uploaded(db, 5);
        assert_eq!(s.wait(db, 5, || None, || {}), SyncOutcome::Replicated);
        // Waiting again: a new timeout is a new degrade.
        assert_eq!(s.wait(db, 6, || None, || {}), SyncOutcome::Degraded);
        assert_eq!(s.stats().timeouts.load(Ordering::Relaxed), 2);
        assert_eq!(s.stats().degraded_commits.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn with_eio_a_timeout_fails_the_commit_and_the_next_ones() {
        let s = SyncReplication::new(options(SyncTimeoutAction::Eio, 50));
        let db = Path::new("a.db");
        assert_eq!(s.wait(db, 2, || None, || {}), SyncOutcome::Failed);
        assert_eq!(s.wait(db, 3, || None, || {}), SyncOutcome::Failed);
        s.uploaded(db, 3);
        assert_eq!(s.wait(db, 3, || None, || {}), SyncOutcome::Replicated);
        assert_eq!(s.stats().failed_commits.load(Ordering::Relaxed), 2);
        // Another database is not affected by this one's timeout.
        let other = Path::new("b.db");
        assert_eq!(s.wait(other, 1, || Some(1), || {}), SyncOutcome::Replicated);
    }
}

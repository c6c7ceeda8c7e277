//! The Prometheus metrics of a follower (`walfs follow --metrics-addr`): what it holds of
//! each database, when the replica last answered, what it applied and restored, its
//! readers, its requests and its memory. docs/OPERATIONS.md lists every series.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use super::metrics::{family, rss_family};
use crate::follow::apply::FollowStats;
use crate::replica::store::ReplicaStore;

/// Reads a follower's state at each scrape.
pub struct FollowerCollector {
    pub stats: Arc<FollowStats>,
    pub store: ReplicaStore,
}

impl std::fmt::Debug for FollowerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FollowerCollector")
    }
}

fn seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl prometheus_client::collector::Collector for FollowerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let dbs = self.stats.databases.lock().clone();
        let db = |name: &String| vec![("db", name.clone())];
        family(
            &mut enc,
            "walfs_follower_txid",
            "The TXID of the state the follower serves of each database.",
            Gauge,
            dbs.iter().map(|(n, s)| (db(n), s.txid)),
        )?;
        family(
            &mut enc,
            "walfs_follower_commit_timestamp_seconds",
            "When the writer committed the state the follower serves of each database.",
            Gauge,
            dbs.iter().map(|(n, s)| (db(n), seconds(s.committed))),
        )?;
        family(
            &mut enc,
            "walfs_follower_readers",
            "Open files of each database that read a pinned state (their read transaction's).",
            Gauge,
            dbs.iter().map(|(n, s)| (db(n), s.db.pinned().0 as u64)),
        )?;
        family(
            &mut enc,
            "walfs_follower_last_poll_timestamp_seconds",
            "When the replica last answered the follower's poll.",
            Gauge,
            [(vec![], self.stats.last_poll.lock().map_or(0.0, seconds))],
        )?;
        family(
            &mut enc,
            "walfs_follower_applied",
            "Objects applied as new versions.",
            Counter,
            [(vec![], self.stats.applied.load(Ordering::Relaxed))],
        )?;
        family(
            &mut enc,
            "walfs_follower_restores",
            "Databases restored afresh (at start, new, or when they could not be followed).",
            Counter,
            [(vec![], self.stats.restored.load(Ordering::Relaxed))],
        )?;
        family(
            &mut enc,
            "walfs_follower_poll_errors",
            "Polls the replica did not answer.",
            Counter,
            [(vec![], self.stats.poll_errors.load(Ordering::Relaxed))],
        )?;
        let r = self.store.requests();
        family(
            &mut enc,
            "walfs_follower_requests",
            "Requests the follower made to the replica, by kind.",
            Counter,
            [
                ("get", r.get),
                ("list", r.list),
                ("head", r.head),
                ("put", r.put),
                ("delete", r.delete),
            ]
            .map(|(k, v)| (vec![("kind", k.to_string())], v)),
        )?;
        rss_family(&mut enc)
    }
}

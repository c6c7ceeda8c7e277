//! The change feed: one small object per replica, `<prefix>/.walfs-feed`, that says which
//! databases the writer uploaded to lately and up to which TXID, so that a follower
//! (`walfs follow`) learns what changed with one conditional GET, whatever the number of
//! databases, instead of listing each of them.
//!
//! This module owns the feed's format ([`FeedEntry`], [`parse_feed`], [`encode_feed`]) and
//! the writer's side of it ([`FeedWriter`]): each uploader notes the databases a round
//! uploaded, and the feed's thread puts it once after the round (one PUT per round that
//! uploaded anything, whatever the number of databases in it; an idle mount puts
//! nothing).
//!
//! The feed lists every database changed in the last [`FEED_WINDOW`], not only those of the
//! last round, so a follower that polls less often than the writer uploads still sees
//! them all. Each writer start picks a new random epoch: a follower that sees the epoch
//! change, or that has not read the feed for longer than the window, lists the replica
//! again instead of trusting the feed. The feed is a hint, never the record: the LTX
//! objects are. It is encrypted like every other body when the replica is.
//!
//! ```text
//! walfs-feed 1
//! epoch 9f86d081884c7d65
//! seq 42
//! 0000000000000017 app.db
//! 0000000000000003 tenants/a.db
//! deleted 0000000000000009 old.db
//! ```
//!
//! A `deleted` line says the writer uploaded the database's deletion marker at that TXID.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::error::StoreError;
use super::store::ReplicaStore;

/// The name of the feed object beside the replica's databases (and its lease).
pub const FEED_NAME: &str = ".walfs-feed";

/// How long a database stays in the feed after its last upload.
pub const FEED_WINDOW: Duration = Duration::from_secs(60);

/// The key of the feed of a replica whose databases live under `root`.
pub fn feed_key(root: &str) -> String {
    match root.trim_matches('/') {
        "" => FEED_NAME.to_string(),
        r => format!("{r}/{FEED_NAME}"),
    }
}

/// One database in the feed: its path in the replica and the TXID the replica holds, or
/// at which it was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEntry {
    pub db: String,
    pub txid: u64,
    pub deleted: bool,
}

/// A parsed feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feed {
    /// Random per writer start.
    pub epoch: u64,
    /// Counts the feed's puts within the epoch.
    pub seq: u64,
    pub entries: Vec<FeedEntry>,
}

/// The feed's text.
pub fn encode_feed(feed: &Feed) -> String {
    let mut s = format!(
        "walfs-feed 1\nepoch {:016x}\nseq {}\n",
        feed.epoch, feed.seq
    );
    for e in &feed.entries {
        let mark = if e.deleted { "deleted " } else { "" };
        s.push_str(&format!("{mark}{:016x} {}\n", e.txid, e.db));
    }
    s
}

/// Parses a feed; the error says which line is wrong.
pub fn parse_feed(text: &str) -> Result<Feed, String> {
    let mut lines = text.lines();
    if lines.next() != Some("walfs-feed 1") {
        return Err("it does not start with `walfs-feed 1`".into());
    }
    let field = |line: Option<&str>, name: &str| -> Result<String, String> {
        line.and_then(|l| l.strip_prefix(name))
            .and_then(|l| l.strip_prefix(' '))
            .map(str::to_string)
            .ok_or_else(|| format!("its `{name}` line is missing"))
    };
    let epoch = u64::from_str_radix(&field(lines.next(), "epoch")?, 16)
        .map_err(|e| format!("its epoch is not hex: {e}"))?;
    let seq = field(lines.next(), "seq")?
        .parse::<u64>()
        .map_err(|e| format!("its seq is not a number: {e}"))?;
    let mut entries = Vec::new();
    for line in lines {
        let (deleted, rest) = match line.strip_prefix("deleted ") {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let (txid, db) = rest
            .split_once(' ')
            .ok_or_else(|| format!("line {line:?} is not `<txid> <database>`"))?;
        let txid = u64::from_str_radix(txid, 16)
            .map_err(|e| format!("line {line:?} has no hex TXID: {e}"))?;
        entries.push(FeedEntry {
            db: db.to_string(),
            txid,
            deleted,
        });
    }
    Ok(Feed {
        epoch,
        seq,
        entries,
    })
}

/// The writer's side: what was uploaded lately, put by a thread of its own after each
/// round that uploaded, so that an upload round (and a synchronous commit waiting for the
/// next one) never waits for the feed's PUT. Puts that fail are retried with backoff
/// while something is noted; [`FeedWriter::flush`] puts synchronously (at unmount).
pub struct FeedWriter {
    shared: Arc<Shared>,
}

struct Shared {
    /// A store with a client of its own: a connection made on one runtime is driven only
    /// while that runtime runs, so the feed never shares the uploader's.
    store: ReplicaStore,
    /// Every put runs on it, from the feed's thread or from [`FeedWriter::flush`].
    rt: tokio::runtime::Runtime,
    key: String,
    epoch: u64,
    state: Mutex<WriterState>,
    wake: Condvar,
    /// Held for a whole put, so that puts go out in the order of their `seq`.
    putting: Mutex<()>,
}

#[derive(Default)]
struct WriterState {
    seq: u64,
    /// Database → (TXID, deleted, when noted).
    recent: BTreeMap<String, (u64, bool, Instant)>,
    /// Noted since the last successful put.
    dirty: bool,
    /// When the last successful put started (what was noted before it is in a feed).
    last_put: Option<Instant>,
    stop: bool,
}

/// The longest wait between retries of a failing put.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl FeedWriter {
    /// The feed of `store` (opened for the feed alone: its HTTP client and runtime are its
    /// own, see `Shared::store`), with its putting thread.
    pub fn start(store: ReplicaStore) -> std::io::Result<FeedWriter> {
        let mut b = [0u8; 8];
        // Without randomness the epoch only needs to differ from the last start's.
        if getrandom::fill(&mut b).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            b = (u64::from(std::process::id()) ^ nanos).to_le_bytes();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            key: feed_key(store.root()),
            store,
            rt,
            epoch: u64::from_le_bytes(b),
            state: Mutex::new(WriterState::default()),
            wake: Condvar::new(),
            putting: Mutex::new(()),
        });
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("walfs-feed".into())
            .spawn(move || s.run());
        spawned?;
        Ok(FeedWriter { shared })
    }

    /// `db` was uploaded up to `txid`. A deletion noted at `txid` or later stays.
    pub fn note(&self, db: &str, txid: u64) {
        let mut st = self.shared.state.lock();
        if matches!(st.recent.get(db), Some((t, true, _)) if *t >= txid) {
            return;
        }
        st.recent
            .insert(db.to_string(), (txid, false, Instant::now()));
        st.dirty = true;
    }

    /// `db`'s deletion marker was uploaded; the database was at `txid`.
    pub fn note_deleted(&self, db: &str, txid: u64) {
        let mut st = self.shared.state.lock();
        st.recent
            .insert(db.to_string(), (txid, true, Instant::now()));
        st.dirty = true;
    }

    /// Wakes the thread to put what was noted (after a round).
    pub fn publish(&self) {
        self.shared.wake.notify_all();
    }

    /// Puts what was noted now (at unmount, after the last round), unless a put is under
    /// way for longer than `wait` (a hanging replica: the feed is a hint, and an unmount
    /// must not wait for it).
    pub fn flush(&self, wait: Duration) {
        if let Err(e) = self.shared.put(Some(wait)) {
            tracing::debug!("cannot put the change feed: {e:#}");
        }
    }
}

impl Drop for FeedWriter {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.wake.notify_all();
    }
}

impl Shared {
    /// The feed to put now, if anything was noted since the last put.
    fn next(&self) -> Option<Feed> {
        let mut st = self.state.lock();
        if !st.dirty {
            return None;
        }
        // An entry stays for the window after it was first put: while puts fail it is
        // kept, however long that lasts.
        let put_ok = st.last_put;
        st.recent
            .retain(|_, (_, _, at)| at.elapsed() <= FEED_WINDOW || put_ok.is_none_or(|p| *at >= p));
        st.seq += 1;
        st.dirty = false;
        let entries = st
            .recent
            .iter()
            .map(|(db, (txid, deleted, _))| FeedEntry {
                db: db.clone(),
                txid: *txid,
                deleted: *deleted,
            })
            .collect();
        Some(Feed {
            epoch: self.epoch,
            seq: st.seq,
            entries,
        })
    }

    /// Puts the feed if anything was noted since the last put; on failure it stays noted.
    /// With `wait`, gives up if another put holds the feed longer than that.
    fn put(&self, wait: Option<Duration>) -> Result<(), StoreError> {
        let _order = match wait {
            None => self.putting.lock(),
            Some(w) => match self.putting.try_lock_for(w) {
                Some(g) => g,
                None => return Ok(()),
            },
        };
        let Some(feed) = self.next() else {
            return Ok(());
        };
        let started = Instant::now();
        let res = self.rt.block_on(
            self.store
                .put_object(&self.key, Bytes::from(encode_feed(&feed))),
        );
        let mut st = self.state.lock();
        match res {
            Ok(()) => st.last_put = Some(started),
            Err(_) => st.dirty = true,
        }
        res
    }

    /// The thread: puts whenever something is noted, until the writer is dropped.
    fn run(&self) {
        let mut backoff = Duration::ZERO;
        loop {
            {
                let mut st = self.state.lock();
                while !st.stop && !st.dirty {
                    self.wake.wait(&mut st);
                }
                if st.stop {
                    return;
                }
            }
            match self.put(None) {
                Ok(()) => backoff = Duration::ZERO,
                Err(e) => {
                    // A hint only: followers list the replica once it is stale.
                    tracing::debug!(replica = %self.store.name(), "cannot put the change feed: {e:#}");
                    backoff = (backoff * 2).clamp(Duration::from_millis(200), MAX_BACKOFF);
                    let mut st = self.state.lock();
                    if !st.stop {
                        self.wake.wait_for(&mut st, backoff);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feed_round_trips_with_a_database_at_the_root() {
        let feed = Feed {
            epoch: 0x9f86_d081_884c_7d65,
            seq: 42,
            entries: vec![
                FeedEntry {
                    db: String::new(),
                    txid: 3,
                    deleted: false,
                },
                FeedEntry {
                    db: "tenants/a b.db".into(),
                    txid: 0x17,
                    deleted: false,
                },
                FeedEntry {
                    db: "old.db".into(),
                    txid: 9,
                    deleted: true,
                },
            ],
        };
        let text = encode_feed(&feed);
        assert!(
            text.contains("\n0000000000000017 tenants/a b.db\n"),
            "{text}"
        );
        assert!(
            text.contains("\ndeleted 0000000000000009 old.db\n"),
            "{text}"
        );
        assert_eq!(parse_feed(&text).unwrap(), feed);
    }

    #[test]
    fn a_malformed_feed_names_what_is_wrong() {
        assert!(parse_feed("nope").unwrap_err().contains("walfs-feed 1"));
        let e = parse_feed("walfs-feed 1\nepoch zz\nseq 1\n").unwrap_err();
        assert!(e.contains("epoch"), "{e}");
        let e = parse_feed("walfs-feed 1\nepoch 01\nseq 1\nxyz\n").unwrap_err();
        assert!(e.contains("xyz"), "{e}");
    }

    /// The feed writer of a file replica in `dir`.
    fn writer_in(dir: &std::path::Path) -> FeedWriter {
        let url =
            crate::replica::url::ReplicaUrl::parse(&format!("file://{}", dir.display())).unwrap();
        FeedWriter::start(ReplicaStore::open(&url).unwrap()).unwrap()
    }

    #[test]
    fn a_deletion_stays_in_the_feed_until_the_database_moves_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer_in(dir.path());
        // Noted without waking the thread: `next` sees it.
        w.note("a.db", 5);
        w.note_deleted("a.db", 5);
        w.note("a.db", 5);
        assert!(w.shared.next().unwrap().entries[0].deleted);
        assert!(w.shared.next().is_none(), "nothing new was noted");
        w.note("a.db", 6);
        let f = w.shared.next().unwrap();
        assert_eq!(
            (f.entries[0].txid, f.entries[0].deleted, f.seq),
            (6, false, 2)
        );
    }

    #[test]
    fn the_thread_puts_what_a_round_noted() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer_in(dir.path());
        w.note("x.db", 3);
        w.publish();
        let path = dir.path().join(FEED_NAME);
        let start = Instant::now();
        while !path.exists() {
            assert!(start.elapsed() < Duration::from_secs(5), "no feed put");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        let feed = parse_feed(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(feed.entries.len(), 1);
        assert_eq!((feed.entries[0].txid, feed.seq), (3, 1));
    }

    #[test]
    fn the_feed_key_sits_beside_the_databases() {
        assert_eq!(feed_key(""), ".walfs-feed");
        assert_eq!(feed_key("/p/q/"), "p/q/.walfs-feed");
    }
}

//! Upload: moves what capture staged to one replica (each replica has an uploader of its
//! own, [`super::fanout`], so that one failing replica never delays another). It waits
//! until a database has
//! something staged, gives further commits one sync interval to join, then merges each
//! database's sealed batches into one level-0 LTX file (one PUT per database per interval,
//! however many commits it holds), or uploads its newest snapshot to level 9, and only then
//! tells the fan-out, which drops from staging what every replica holds. Each uploaded
//! object is kept in staging as a local copy for this replica's maintenance loop
//! (compaction, snapshots), which it tells. With a sync
//! interval of 0, every batch is uploaded as its own file, so every captured commit stays
//! restorable. A database with nothing staged costs no request at all, and an idle mount
//! makes none. A failing replica is retried with backoff while staging keeps everything
//! (up to `--max-staging`, past which capture collapses it into snapshots: `capture/budget.rs`).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::compact::{absorbed_by_next, merge_ltx, window_start, ObjId};
use super::error::{ReplicaError, ReplicaResult};
use super::fanout::Fanout;
use super::feed::{feed_key, FeedWriter};
use super::kept::{KeepSource, KeptCopies};
use super::maintain::Maintainer;
use super::record::{ChecksumRecord, RecordedChecksum, SidecarStore};
use super::store::ReplicaStore;
use crate::ltx::{LtxEncoder, LtxHeader, HEADER_SIZE};
use crate::sqlite::lock_byte_page;
use crate::staging::{Batch, PageMerge, Staged, Staging};

/// Level of new transactions, and of snapshots, in Litestream's layout.
const LEVEL_TRANSACTIONS: u8 = 0;
const LEVEL_SNAPSHOTS: u8 = 9;

/// How many databases one upload round sends at once.
const PARALLEL_UPLOADS: usize = 8;

/// The longest wait between retries of a failing replica.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How soon a round that waited for the replica's lease is tried again.
const LEASE_RETRY: Duration = Duration::from_millis(500);

/// The longest wait between retries of a failing replica while a synchronous commit waits
/// for it (`super::sync`): its timeout, not the backoff, decides how long it waits.
const MAX_SYNC_BACKOFF: Duration = Duration::from_secs(1);

/// The largest object that level 0's binary counter makes by merging earlier copies into
/// an upload ([`Uploader::absorb`]): larger merges are left to compaction.
const ABSORB_LIMIT: u64 = 16 << 20;

/// How many bytes uploaded make a round give freed memory back to the system.
const RELEASE_AFTER: u64 = 16 << 20;

/// Gives the memory that large transactions' pages were staged and encoded in back to the
/// system once they are uploaded. glibc keeps freed memory in the arena of each thread that
/// used it (capture runs on FUSE worker threads, uploads on their own): after an 860 MiB
/// burst, 30 to 55 MiB of it stayed resident at rest, varying with which threads did the
/// work. Called after upload rounds that sent [`RELEASE_AFTER`] bytes or more, so an idle
/// or lightly written mount never calls it.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it takes each arena's lock while it
    // returns that arena's free pages, so other threads may allocate meanwhile.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One upload to send: a snapshot or a merged run of transactions.
struct Upload {
    level: u8,
    min_txid: u64,
    max_txid: u64,
    body: Body,
    timestamp: SystemTime,
    /// The verification record of `max_txid`, when known.
    record: Option<ChecksumRecord>,
}

/// Where an upload's LTX bytes are.
enum Body {
    Bytes(Bytes),
    /// A staged snapshot file; streamed.
    Staged(PathBuf),
    /// A large merge written to a temporary file; streamed, then deleted.
    Temp(PathBuf),
}

/// Where one replica's uploader writes temporary files of a database: in its staging
/// directory (where [`Staging::remove_temporaries`] finds what a crash left), named after
/// the replica, so that two replicas' uploaders never write one file.
struct TempFiles {
    dir: PathBuf,
    replica_id: String,
}

impl TempFiles {
    /// `.upload-<replica id>-<what>.tmp`.
    fn path(&self, what: &str) -> PathBuf {
        self.dir
            .join(format!(".upload-{}-{what}.tmp", self.replica_id))
    }
}

/// Merges whose pages exceed this are encoded into a temporary file rather than memory.
const IN_MEMORY_MERGE: u64 = 32 * 1024 * 1024;

/// Builds what to upload for one database's staged items (ascending by TXID): the
/// batches before the first snapshot merged into one file (they continue what the
/// replica holds, so point-in-time restore keeps them; `skip_before`: they cannot be read,
/// and the snapshot supersedes them), the newest snapshot, then every batch after it
/// merged into one file. Anything between two snapshots is superseded by the newer one; a
/// snapshot marks a possible gap, so nothing is merged across one. Without `merge`, every
/// batch is its own file.
fn plan_uploads(
    staged: &[Staged],
    merge: bool,
    skip_before: bool,
    tmp: &TempFiles,
) -> ReplicaResult<Vec<Upload>> {
    let is_snapshot = |s: &Staged| matches!(s, Staged::Snapshot(_));
    let (before, snapshot, after) = match (
        staged.iter().position(is_snapshot),
        staged.iter().rposition(is_snapshot),
    ) {
        (Some(first), Some(last)) => (&staged[..first], Some(&staged[last]), &staged[last + 1..]),
        _ => (staged, None, &staged[..0]),
    };
    let mut uploads = Vec::new();
    if !(skip_before && snapshot.is_some()) {
        push_batches(&mut uploads, before, merge, tmp)?;
    }
    if let Some(Staged::Snapshot(s)) = snapshot {
        let mut hb = [0u8; HEADER_SIZE];
        File::open(&s.path)?.read_exact_at(&mut hb, 0)?;
        let header = LtxHeader::from_bytes(&hb).map_err(|e| invalid_staged(&s.path, e))?;
        uploads.push(Upload {
            level: LEVEL_SNAPSHOTS,
            min_txid: s.min_txid,
            max_txid: s.max_txid,
            body: Body::Staged(s.path.clone()),
            timestamp: millis_to_time(header.timestamp_ms),
            record: s.content.map(|c| ChecksumRecord {
                txid: s.max_txid,
                checksum: RecordedChecksum::Content(c),
                page_size: header.page_size,
                commit: header.commit,
            }),
        });
    }
    push_batches(&mut uploads, after, merge, tmp)?;
    Ok(uploads)
}

/// Adds the batches among `items` to `uploads`: merged into one file, or one file each.
/// Large merges are written to temporary files (`tmp`).
fn push_batches(
    uploads: &mut Vec<Upload>,
    items: &[Staged],
    merge: bool,
    tmp: &TempFiles,
) -> ReplicaResult<()> {
    let batches: Vec<&Batch> = items
        .iter()
        .filter_map(|s| match s {
            Staged::Batch(b) => Some(b),
            Staged::Snapshot(_) => None,
        })
        .collect();
    if batches.is_empty() {
        return Ok(());
    }
    if merge {
        uploads.push(merge_batches(&batches, tmp)?);
    } else {
        for b in batches {
            uploads.push(merge_batches(&[b], tmp)?);
        }
    }
    Ok(())
}

/// Encodes consecutive staged batches as one LTX file: the newest version of each page
/// (read once from the segments), the last commit size, the TXID range of them all. In
/// memory, or in a temporary file (`tmp`) when it would be large.
fn merge_batches(batches: &[&Batch], tmp: &TempFiles) -> ReplicaResult<Upload> {
    let (first, last) = (batches[0], batches[batches.len() - 1]);
    let page_size = last.header.page_size;
    let mut merge = PageMerge::new(None);
    for (i, b) in batches.iter().enumerate() {
        if b.header.page_size != page_size {
            return Err(invalid_staged(
                &b.path,
                format!(
                    "page size changed between batches (TXIDs {}-{}: {}, TXIDs {}-{}: {})",
                    b.header.min_txid,
                    b.header.max_txid,
                    b.header.page_size,
                    last.header.min_txid,
                    last.header.max_txid,
                    page_size
                ),
            ));
        }
        let offsets = b.page_offsets()?;
        merge.apply(
            b.header.commit,
            offsets.into_iter().map(|(pgno, off)| (pgno, (i, off))),
        );
    }
    let (commit, pages) = merge.finish(lock_byte_page(page_size));
    let header = LtxHeader::incremental(
        page_size,
        commit,
        first.header.min_txid,
        last.header.max_txid,
        last.header.timestamp_ms,
        0,
    )
    .without_checksums();
    let raw = pages.len() as u64 * u64::from(page_size);
    if raw <= IN_MEMORY_MERGE {
        let bytes = encode_pages(batches, header, pages, Vec::new())?;
        return Ok(Upload {
            level: LEVEL_TRANSACTIONS,
            min_txid: first.header.min_txid,
            max_txid: last.header.max_txid,
            body: Body::Bytes(Bytes::from(bytes)),
            timestamp: millis_to_time(last.header.timestamp_ms),
            record: Some(record_of(last)),
        });
    }
    let tmp = tmp.path(&format!(
        "{:016x}-{:016x}.ltx",
        first.header.min_txid, last.header.max_txid
    ));
    let out = std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    let out = encode_pages(batches, header, pages, out)?;
    out.into_inner().map_err(|e| e.into_error())?;
    Ok(Upload {
        level: LEVEL_TRANSACTIONS,
        min_txid: first.header.min_txid,
        max_txid: last.header.max_txid,
        body: Body::Temp(tmp),
        timestamp: millis_to_time(last.header.timestamp_ms),
        record: Some(record_of(last)),
    })
}

/// The verification record of a batch's max TXID.
fn record_of(b: &Batch) -> ChecksumRecord {
    ChecksumRecord {
        txid: b.header.max_txid,
        checksum: RecordedChecksum::Content(b.post_checksum),
        page_size: b.header.page_size,
        commit: b.header.commit,
    }
}

/// Writes `pages` (located in `batches`' segments; `None` is a zero page) as an LTX file
/// with `header` to `out`.
fn encode_pages<W: std::io::Write>(
    batches: &[&Batch],
    header: LtxHeader,
    pages: std::collections::BTreeMap<u32, Option<(usize, u64)>>,
    out: W,
) -> ReplicaResult<W> {
    let mut files: HashMap<&Path, File> = HashMap::new();
    let mut enc = LtxEncoder::new(out, header)?;
    let mut buf = vec![0u8; header.page_size as usize];
    for (pgno, at) in pages {
        match at {
            Some((i, off)) => {
                let path = batches[i].path.as_path();
                let file = match files.get(path) {
                    Some(f) => f,
                    None => files.entry(path).or_insert(File::open(path)?),
                };
                file.read_exact_at(&mut buf, off)?;
            }
            None => buf.fill(0),
        }
        enc.add_page(pgno, &buf)?;
    }
    enc.finish(0)?;
    Ok(enc.into_inner())
}

fn invalid_staged(path: &Path, e: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::StagedUnreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn millis_to_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// The uploader of one replica of a mount.
pub struct Uploader {
    staging: Arc<Staging>,
    fanout: Arc<Fanout>,
    /// The replica's place in the mount's list (and in the fan-out).
    index: usize,
    replica: ReplicaStore,
    copies: KeptCopies,
    runtime: tokio::runtime::Runtime,
    stop: AtomicBool,
    /// Set by [`Uploader::notify`]: something new is staged.
    wake: (Mutex<bool>, Condvar),
    /// Uploads that completed, for tests and metrics.
    uploaded: std::sync::atomic::AtomicU64,
    /// Bytes uploaded since memory was last given back ([`release_freed_memory`]).
    uploaded_bytes: std::sync::atomic::AtomicU64,
    /// Told what was uploaded (compaction, snapshots, retention).
    maintainer: std::sync::OnceLock<Arc<Maintainer>>,
    /// Databases whose staged items cannot be uploaded, waiting for a snapshot to supersede
    /// them (each is reported once).
    unreadable: Mutex<BTreeSet<PathBuf>>,
    /// The last round found the replica's lease lapsed (`super::lease`).
    waited_for_lease: AtomicBool,
    /// Set by [`Uploader::upload_now`]: a commit waits for the next round, which starts
    /// without waiting for the sync interval.
    urgent: AtomicBool,
    /// Tells followers which databases a round uploaded (one PUT per round); none with
    /// `--no-follower-feed`.
    feed: Option<FeedWriter>,
    /// Without a feed: whether a feed an earlier writer left is deleted.
    stale_feed_gone: AtomicBool,
}

/// Whether an error reading or encoding staged items is permanent: the items cannot be
/// uploaded as they are (unreadable, inconsistent, not valid LTX), rather than waiting for
/// room or permission in the staging directory.
fn cannot_be_uploaded(e: &ReplicaError) -> bool {
    use std::io::ErrorKind::*;
    let Some(kind) = e.io_kind() else {
        return true;
    };
    !matches!(
        kind,
        StorageFull
            | QuotaExceeded
            | ReadOnlyFilesystem
            | PermissionDenied
            | OutOfMemory
            | Interrupted
            | WouldBlock
            | TimedOut
    )
}

impl Uploader {
    /// The uploader of replica `index` of `fanout`, which is `replica`; with `feed` (the
    /// same replica opened again, for a client of its own), it keeps the replica's change
    /// feed (`super::feed`).
    pub fn new(
        fanout: Arc<Fanout>,
        index: usize,
        replica: ReplicaStore,
        feed: Option<ReplicaStore>,
    ) -> std::io::Result<Uploader> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let feed = feed.map(FeedWriter::start).transpose()?;
        Ok(Uploader {
            staging: fanout.staging().clone(),
            copies: fanout.copies(index).clone(),
            fanout,
            index,
            replica,
            runtime,
            stop: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            uploaded: std::sync::atomic::AtomicU64::new(0),
            uploaded_bytes: std::sync::atomic::AtomicU64::new(0),
            maintainer: std::sync::OnceLock::new(),
            unreadable: Mutex::new(BTreeSet::new()),
            waited_for_lease: AtomicBool::new(false),
            urgent: AtomicBool::new(false),
            feed,
            stale_feed_gone: AtomicBool::new(false),
        })
    }

    /// Tells `m` about every upload from now on.
    pub fn set_maintainer(&self, m: Arc<Maintainer>) {
        let _ = self.maintainer.set(m);
    }

    /// The replica uploaded to.
    pub fn replica(&self) -> &ReplicaStore {
        &self.replica
    }

    /// How many LTX files were uploaded so far.
    pub fn uploaded_files(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }

    /// Uploads everything sealed for the databases in `dbs`; returns those still behind
    /// (their upload failed and will be retried).
    pub fn upload_round(&self, dbs: &BTreeSet<PathBuf>, merge: bool) -> BTreeSet<PathBuf> {
        if self.replica.lease_lost() {
            // Another mount writes the replica now (the lease said so, once): what is
            // staged stays, unsent and unlogged.
            return dbs.clone();
        }
        // Databases are uploaded side by side (each database's objects in order), so that
        // the commits waiting in one round, on different databases, wait for one upload
        // time rather than the sum of them. The threads share the uploader's runtime.
        let queue = Mutex::new(dbs.iter());
        let behind = Mutex::new(BTreeSet::new());
        let sent = Mutex::new(Vec::new());
        let work = || {
            while let Some(db) = queue.lock().next() {
                let result = self.upload_database(db, merge);
                if let Ok(true) = result {
                    sent.lock().push(db.clone());
                }
                if let Err(e) = result {
                    behind.lock().insert(db.clone());
                    if e.is_fenced() {
                        self.waited_for_lease.store(true, Ordering::Relaxed);
                        tracing::debug!(db = %db.display(), "waiting for the lease: {e:#}");
                    } else {
                        tracing::warn!(db = %db.display(), replica = %self.replica.name(), "replica is behind: {e:#}; retrying");
                    }
                }
            }
        };
        let workers = dbs.len().min(PARALLEL_UPLOADS);
        if workers <= 1 {
            work();
        } else {
            std::thread::scope(|scope| {
                for _ in 1..workers {
                    scope.spawn(work);
                }
                work();
            });
        }
        self.publish_feed(&sent.into_inner());
        behind.into_inner()
    }

    /// Tells followers what the round uploaded: the feed's thread puts it (`super::feed`;
    /// one PUT, only if the round uploaded anything).
    fn publish_feed(&self, sent: &[PathBuf]) {
        if sent.is_empty() {
            return;
        }
        let Some(feed) = self.feed.as_ref() else {
            // With `--no-follower-feed`, a feed that an earlier writer left would keep
            // followers on stale hints: it goes at the first round that uploads.
            if !self.stale_feed_gone.swap(true, Ordering::Relaxed) {
                let key = feed_key(self.replica.root());
                if let Err(e) = self.runtime.block_on(self.replica.delete_object(&key)) {
                    tracing::debug!("cannot delete an earlier writer's change feed: {e:#}");
                    self.stale_feed_gone.store(false, Ordering::Relaxed);
                }
            }
            return;
        };
        for db in sent {
            if let Ok(txid) = self.fanout.held(db, self.index) {
                feed.note(&db.to_string_lossy(), txid);
            }
        }
        feed.publish();
    }

    /// Uploads what `db` has staged for this replica, and its deletion marker; true if it
    /// put anything.
    fn upload_database(&self, db: &Path, merge: bool) -> ReplicaResult<bool> {
        if self.fanout.unconfirmed(db, self.index)? {
            self.confirm(db)?;
        }
        let staged = self.fanout.pending(db, self.index)?;
        let mut uploads = if self.fanout.lacks_staged(db, self.index)? {
            self.plan_from_snapshot(db, &staged, merge)?
        } else if staged.is_empty() {
            return self.upload_deleted_marker(db);
        } else {
            self.plan(db, &staged, merge)?
        };
        let Some(last) = staged.last() else {
            return Ok(false);
        };
        let max = last.max_txid();
        // A snapshot's record, when staging has no sidecar for it (staged by an older
        // walfs): capture's state has it while it is still at that TXID.
        let state = self.staging.state(db)?;
        for u in uploads.iter_mut().filter(|u| u.record.is_none()) {
            u.record = state
                .filter(|st| st.txid == u.max_txid)
                .map(|st| ChecksumRecord {
                    txid: st.txid,
                    checksum: RecordedChecksum::Content(st.checksum),
                    page_size: st.page_size,
                    commit: st.commit,
                });
        }
        // The first level-0 object continues level 0's binary counter (see
        // `absorbed_by_next`): it may take in the newest level-0 objects of the window.
        if let Some(u) = uploads.iter_mut().find(|u| u.level == LEVEL_TRANSACTIONS) {
            if let Err(e) = self.absorb(db, u) {
                tracing::debug!(db = %db.display(), "level-0 object uploaded alone: {e}");
            }
        }
        let key = db.to_string_lossy();
        let replica = &self.replica;
        let mut bytes = 0;
        let sent = (|| -> ReplicaResult<()> {
            // On S3 the record rides in the object's metadata (one PUT per object); a file
            // replica keeps it as a file beside the object.
            let in_metadata = replica.holds_records();
            for u in &uploads {
                let txids = (u.min_txid, u.max_txid);
                let meta = u
                    .record
                    .filter(|_| in_metadata)
                    .map(|r| r.encode().trim().to_string());
                let info = match &u.body {
                    Body::Bytes(b) => self.runtime.block_on(replica.put_ltx_with_record(
                        &key,
                        u.level,
                        txids,
                        b.clone(),
                        u.timestamp,
                        meta,
                    ))?,
                    Body::Staged(f) | Body::Temp(f) => self.runtime.block_on(
                        replica.put_ltx_file(&key, u.level, txids, f, u.timestamp, meta),
                    )?,
                };
                bytes += info.size;
                if let Some(record) = u.record.filter(|_| !in_metadata) {
                    let sidecar = SidecarStore::new(replica.clone());
                    self.runtime
                        .block_on(sidecar.put_checksum_record(&key, &record))?;
                }
            }
            Ok(())
        })();
        let progress = self.fanout.progress();
        if let Err(e) = sent {
            if !e.is_fenced() {
                progress.failed(db, self.index, &format!("{e:#}"));
            }
            for u in &uploads {
                if let Body::Temp(f) = &u.body {
                    let _ = std::fs::remove_file(f);
                }
            }
            return Err(e);
        }
        progress.uploaded(db, self.index, max, uploads.len() as u64, bytes);
        self.uploaded_bytes.fetch_add(bytes, Ordering::Relaxed);
        // The replica holds it: the commits waiting for it (once every replica holds it)
        // return now, without waiting for the bookkeeping below.
        self.fanout.holds(db, self.index, max)?;
        // Keep a local copy of each object for compaction and snapshots; a copy that
        // cannot be kept only costs compaction that object (the replica holds it).
        let mut kept = Vec::new();
        for u in &uploads {
            let source = match &u.body {
                Body::Bytes(b) => KeepSource::Bytes(b),
                // Other replicas may still need it; staging drops it once they hold it.
                Body::Staged(f) => KeepSource::Linked(f),
                Body::Temp(f) => KeepSource::File(f),
            };
            match self
                .copies
                .keep(db, u.level, (u.min_txid, u.max_txid), source, u.record)
            {
                Ok(k) => kept.push(k),
                Err(e) => {
                    tracing::warn!(db = %db.display(), "cannot keep a local copy of an upload: {e}");
                    if let Some(m) = self.maintainer.get() {
                        m.uploaded_without_copy(db, u.level, (u.min_txid, u.max_txid), u.timestamp);
                    }
                    if let Body::Temp(f) = &u.body {
                        let _ = std::fs::remove_file(f);
                    }
                }
            }
        }
        self.fanout.record(db, self.index, max)?;
        if let Some(m) = self.maintainer.get() {
            m.uploaded(db, kept);
        }
        self.uploaded
            .fetch_add(uploads.len() as u64, Ordering::Relaxed);
        tracing::debug!(db = %db.display(), replica = %replica.name(), txid = max, files = uploads.len(), "uploaded");
        self.upload_deleted_marker(db).map(|_| true)
    }

    /// Where this uploader writes temporary files of `db`.
    fn temp_files(&self, db: &Path) -> ReplicaResult<TempFiles> {
        Ok(TempFiles {
            dir: self.staging.db_dir(db)?,
            replica_id: self.copies.replica_id().to_string(),
        })
    }

    /// Asks the replica what it holds of `db` (one LIST), for a replica that staging has
    /// no record of ([`Fanout::unconfirmed`]).
    fn confirm(&self, db: &Path) -> ReplicaResult<()> {
        let key = db.to_string_lossy();
        let listed = self.runtime.block_on(self.replica.list_db_ltx(&key));
        let objects = listed.map_err(ReplicaError::from).inspect_err(|e| {
            if !e.is_fenced() {
                let e = format!("cannot list what the replica holds: {e}");
                self.fanout.progress().failed(db, self.index, &e);
            }
        })?;
        let newest = objects.iter().map(|o| o.max_txid).max().unwrap_or(0);
        let assumed = self.fanout.held(db, self.index)?;
        self.fanout.confirm(db, self.index, newest)?;
        if newest < assumed {
            tracing::warn!(db = %db.display(), replica = %self.replica.name(), "the replica holds the database only up to TXID {newest}, while the others hold it up to {assumed} (a replica new to this mount?): it gets a snapshot");
        }
        Ok(())
    }

    /// Plans the uploads of `db` to a replica that lacks TXIDs staging no longer holds
    /// ([`Fanout::lacks_staged`]): the newest staged snapshot and what follows it. Without
    /// a staged snapshot, capture is asked for one (logged once) and the upload waits.
    fn plan_from_snapshot(
        &self,
        db: &Path,
        staged: &[Staged],
        merge: bool,
    ) -> ReplicaResult<Vec<Upload>> {
        if staged.iter().any(|s| matches!(s, Staged::Snapshot(_))) {
            self.unreadable.lock().remove(db);
            return plan_uploads(staged, merge, true, &self.temp_files(db)?);
        }
        let reason = format!(
            "replica {} lacks TXIDs that staging no longer holds",
            self.replica.name()
        );
        let restarted = self.fanout.restart(db, &reason);
        if self.unreadable.lock().insert(db.to_path_buf()) && !restarted {
            tracing::warn!(db = %db.display(), "{reason}, and the database cannot be captured for a snapshot now; it gets one at its next write");
        }
        Err(ReplicaError::AwaitingSnapshot)
    }

    /// Plans the uploads of `db`'s staged items. Items that cannot be read or do not fit
    /// together are never retried forever: a snapshot staged after them supersedes them,
    /// and without one, capture is asked to stage one (the next round uploads it). Each
    /// such case is logged once.
    fn plan(&self, db: &Path, staged: &[Staged], merge: bool) -> ReplicaResult<Vec<Upload>> {
        let tmp = self.temp_files(db)?;
        let e = match plan_uploads(staged, merge, false, &tmp) {
            Ok(u) => {
                self.unreadable.lock().remove(db);
                return Ok(u);
            }
            Err(e) if cannot_be_uploaded(&e) => e,
            Err(e) => return Err(e),
        };
        let first = self.unreadable.lock().insert(db.to_path_buf());
        let snapshot = staged.iter().rev().find_map(|s| match s {
            Staged::Snapshot(s) => Some(s.max_txid),
            Staged::Batch(_) => None,
        });
        if let Some(txid) = snapshot {
            if let Ok(u) = plan_uploads(staged, merge, true, &tmp) {
                tracing::warn!(db = %db.display(), "staged transactions cannot be uploaded ({e}); the snapshot at TXID {txid} supersedes them");
                self.unreadable.lock().remove(db);
                return Ok(u);
            }
        }
        let reason = format!("its staged transactions cannot be uploaded ({e})");
        let restarted = self.fanout.restart(db, &reason);
        if !restarted {
            // Nothing can supersede them: drop them rather than retry forever.
            let upto = staged.last().map_or(0, |s| s.max_txid());
            self.staging.drop_staged(db, upto)?;
            self.unreadable.lock().remove(db);
            tracing::error!(db = %db.display(), "staged transactions up to TXID {upto} cannot be uploaded ({e}) and the database cannot be captured for a snapshot now; they are dropped, and the replica keeps what it holds");
            return Err(ReplicaError::StagedDropped);
        }
        if first {
            tracing::warn!(db = %db.display(), "staged transactions cannot be uploaded ({e}); a new snapshot will supersede them");
        }
        Err(ReplicaError::AwaitingSnapshot)
    }

    /// Makes `u` (a level-0 upload) the next object of level 0's binary counter: merges
    /// into it, from the local copies, the level-0 objects that [`absorbed_by_next`] picks.
    /// On any error `u` is left as it was (one tick alone is always correct); a copy that
    /// the maintenance loop dropped meanwhile is such an error.
    fn absorb(&self, db: &Path, u: &mut Upload) -> ReplicaResult<()> {
        let copies: HashMap<ObjId, PathBuf> = self.copies.kept_names(db)?.into_iter().collect();
        let ids: Vec<ObjId> = copies.keys().copied().collect();
        let level0: Vec<ObjId> = ids.iter().copied().filter(|o| o.level == 0).collect();
        let ticked: Vec<ObjId> = self
            .copies
            .ticks(db)?
            .into_iter()
            .filter(|o| o.level == 0)
            .collect();
        let absorbed = absorbed_by_next(&level0, &ticked, window_start(&ids, 0), u.min_txid - 1);
        if absorbed.is_empty() {
            return Ok(());
        }
        // A large merge is left to the maintenance loop's compaction, which frees its inputs
        // as it reads them: merged here, the copies and the tick would be on disk twice
        // until the upload is kept.
        let mut size = match &u.body {
            Body::Bytes(b) => b.len() as u64,
            Body::Temp(f) | Body::Staged(f) => std::fs::metadata(f)?.len(),
        };
        for o in &absorbed {
            size += std::fs::metadata(&copies[o])?.len();
        }
        if size > ABSORB_LIMIT {
            return Ok(());
        }
        let tmp = self.temp_files(db)?;
        let name =
            |min: u64, what: &str| tmp.path(&format!("{min:016x}-{:016x}.{what}", u.max_txid));
        // The new tick as a file: a small upload is in memory, a large one in a temporary
        // file already (level-0 uploads are never staged snapshots).
        let (tick, written) = match &u.body {
            Body::Bytes(b) => {
                let p = name(u.min_txid, "tick");
                std::fs::write(&p, b)?;
                (p, true)
            }
            Body::Temp(f) => (f.clone(), false),
            Body::Staged(_) => return Ok(()),
        };
        let mut inputs: Vec<&Path> = absorbed.iter().map(|o| copies[o].as_path()).collect();
        inputs.push(&tick);
        let out = name(absorbed[0].min, "merged");
        let merged = merge_ltx(&inputs, &out, false);
        // The tick's own file is no longer needed once merged, or if it was written here.
        if written || merged.is_ok() {
            let _ = std::fs::remove_file(&tick);
        }
        merged?;
        u.body = Body::Temp(out);
        u.min_txid = absorbed[0].min;
        Ok(())
    }

    /// Puts the deletion marker capture staged for `db` (once the replica holds its last
    /// TXID); staging drops it once every replica has it. True if it put it.
    fn upload_deleted_marker(&self, db: &Path) -> ReplicaResult<bool> {
        let Some(content) = self.staging.deleted_marker(db)? else {
            return Ok(false);
        };
        if !self.fanout.pending(db, self.index)?.is_empty() {
            return Ok(false);
        }
        let key = db.to_string_lossy();
        let sidecar = SidecarStore::new(self.replica.clone());
        self.runtime
            .block_on(sidecar.put_deleted_marker(&key, &content))?;
        self.fanout.marker_sent(db, self.index, &content)?;
        if let Some(feed) = &self.feed {
            feed.note_deleted(&key, self.fanout.held(db, self.index).unwrap_or(0));
        }
        Ok(true)
    }

    /// Runs until [`Uploader::shutdown`]: waits for [`Uploader::notify`], lets one
    /// `interval` pass so that further commits join the upload, then uploads what `take`
    /// returns (the databases with newly sealed batches) plus what is still behind. A
    /// failing replica is retried with backoff (up to 30 s). At start it uploads whatever a
    /// previous run left staged.
    pub fn run(&self, interval: Duration, take: impl Fn() -> Vec<PathBuf>) {
        let merge = !interval.is_zero();
        let mut behind: BTreeSet<PathBuf> = match self.staging.databases() {
            Ok(dbs) => dbs.into_iter().collect(),
            Err(e) => {
                tracing::error!("cannot list staged databases: {e}");
                BTreeSet::new()
            }
        };
        let mut backoff = Duration::ZERO;
        loop {
            let mut stopping = if behind.is_empty() {
                self.wait_until(None, true)
            } else {
                self.wait_until(Some(Instant::now() + backoff), true)
            };
            if !stopping && !interval.is_zero() && !self.urgent.load(Ordering::Relaxed) {
                stopping = self.wait_until(Some(Instant::now() + interval), false);
            }
            self.urgent.store(false, Ordering::Relaxed);
            let mut dbs = std::mem::take(&mut behind);
            dbs.extend(take());
            behind = self.upload_round(&dbs, merge);
            if self.uploaded_bytes.load(Ordering::Relaxed) >= RELEASE_AFTER {
                self.uploaded_bytes.store(0, Ordering::Relaxed);
                release_freed_memory();
            }
            if let Some(sync) = self
                .fanout
                .sync()
                .filter(|_| !dbs.is_empty() && self.index == 0)
            {
                sync.stats().rounds.fetch_add(1, Ordering::Relaxed);
            }
            backoff = if behind.is_empty() {
                Duration::ZERO
            } else if self.waited_for_lease.swap(false, Ordering::Relaxed) {
                // Not a failing store: the lease had lapsed (an idle mount's, or one taken
                // late), and the attempt asked for its renewal. Try again as soon as that
                // can have happened, not after a backoff that could outlast each renewal.
                LEASE_RETRY
            } else if self.fanout.sync().is_some_and(|s| s.has_waiters()) {
                (backoff * 2).clamp(Duration::from_millis(100), MAX_SYNC_BACKOFF)
            } else {
                (backoff * 2).clamp(Duration::from_millis(200), MAX_BACKOFF)
            };
            if stopping {
                // The last round's feed goes out before the mount lets go of the replica.
                self.flush_feed();
                return;
            }
        }
    }

    /// Sleeps until `deadline` (forever if `None`), or until notified if `on_notify`, or
    /// until [`Uploader::upload_now`]. True once shutdown was asked for.
    fn wait_until(&self, deadline: Option<Instant>, on_notify: bool) -> bool {
        let (lock, cvar) = &self.wake;
        let mut notified = lock.lock();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return true;
            }
            if self.urgent.load(Ordering::Relaxed) {
                *notified = false;
                return false;
            }
            if on_notify && *notified {
                *notified = false;
                return false;
            }
            match deadline {
                Some(d) => {
                    if Instant::now() >= d || cvar.wait_until(&mut notified, d).timed_out() {
                        return self.stop.load(Ordering::Relaxed);
                    }
                }
                None => cvar.wait(&mut notified),
            }
        }
    }

    /// Something new is staged: wakes [`Uploader::run`].
    pub fn notify(&self) {
        let (lock, cvar) = &self.wake;
        *lock.lock() = true;
        cvar.notify_all();
    }

    /// A commit waits for the replica: starts the next round now (after the one under
    /// way), without the sync interval or a failing replica's backoff.
    pub fn upload_now(&self) {
        let (lock, cvar) = &self.wake;
        let mut notified = lock.lock();
        *notified = true;
        self.urgent.store(true, Ordering::Relaxed);
        cvar.notify_all();
    }

    /// Asks `run` to do one last round and return.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _guard = self.wake.0.lock();
        self.wake.1.notify_all();
    }

    /// Puts the change feed now, if anything is noted in it (waiting at most a second for
    /// a put under way).
    fn flush_feed(&self) {
        if let Some(feed) = &self.feed {
            feed.flush(Duration::from_secs(1));
        }
    }

    /// Uploads what is staged, retrying until `deadline`; true if nothing is left behind.
    pub fn flush(&self, dbs: &[PathBuf], merge: bool, deadline: Instant) -> bool {
        let mut left: BTreeSet<PathBuf> = dbs.iter().cloned().collect();
        loop {
            left = self.upload_round(&left, merge);
            if left.is_empty() || Instant::now() >= deadline {
                self.flush_feed();
                return left.is_empty();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::store::StoreTuning;
    use crate::replica::url::ReplicaUrl;
    use crate::sqlite::{page_hash, ContentChecksum};
    use crate::staging::{BatchHeader, DbState};

    /// The uploader of a mount with the one replica `store`.
    fn one_replica(staging: &Arc<Staging>, store: ReplicaStore) -> Uploader {
        let fanout = Fanout::new(staging.clone(), vec![store.name()]).unwrap();
        Uploader::new(Arc::new(fanout), 0, store, None).unwrap()
    }

    /// Appends a one-page batch of `page_size` bytes with TXID `txid` to `db`'s segment.
    fn stage_batch(staging: &Staging, db: &Path, page_size: u32, txid: u64) {
        let mut seg = staging.open_segment(db).unwrap();
        let header = BatchHeader {
            page_size,
            commit: 1,
            min_txid: txid,
            max_txid: txid,
            timestamp_ms: 1000,
            page_count: 1,
            wal: None,
        };
        let page = vec![txid as u8; page_size as usize];
        let mut w = seg.begin(header).unwrap();
        w.add_page(1, &page, page_hash(1, &page)).unwrap();
        let mut sum = ContentChecksum::EMPTY;
        sum.add_page(1, &page);
        w.finish(sum).unwrap();
        seg.seal().unwrap();
    }

    /// A staged snapshot carries its content checksum: its upload has a verification
    /// record even when capture has moved past its TXID by then (`walfs verify` and
    /// restores check it), and the record matches the pages.
    #[test]
    fn a_snapshot_uploaded_after_capture_moved_on_has_its_verification_record() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Arc::new(Staging::open(dir.path().join("staging")).unwrap());
        let db = Path::new("app.db");
        let pages: Vec<Vec<u8>> = (1..=3u8).map(|i| vec![i; 1024]).collect();
        let (_, sum) = staging
            .stage_snapshot(
                db,
                pages
                    .iter()
                    .enumerate()
                    .map(|(i, p)| Ok::<_, std::io::Error>((i as u32 + 1, p))),
                1024,
                3,
                4,
                2000,
            )
            .unwrap();
        // Capture is at TXID 6 now: its state holds another checksum.
        staging
            .save_state(
                db,
                &DbState {
                    txid: 6,
                    page_size: 1024,
                    commit: 3,
                    ..DbState::default()
                },
            )
            .unwrap();
        let url = format!("file://{}", dir.path().join("replica").display());
        let store =
            ReplicaStore::open_with(&ReplicaUrl::parse(&url).unwrap(), &StoreTuning::default())
                .unwrap();
        let uploader = one_replica(&staging, store.clone());
        let dbs: BTreeSet<PathBuf> = [db.to_path_buf()].into();
        assert!(uploader.upload_round(&dbs, true).is_empty());
        let sidecar = SidecarStore::new(store);
        let (record, _) = uploader
            .runtime
            .block_on(sidecar.get_checksum_record("app.db", 4, None))
            .unwrap()
            .expect("the snapshot's verification record");
        assert_eq!(record.txid, 4);
        assert_eq!(record.checksum, RecordedChecksum::Content(sum));
        assert_eq!((record.page_size, record.commit), (1024, 3));
        assert!(
            staging.pending_files(db).unwrap().is_empty(),
            "the snapshot and its sidecar went with the upload"
        );
    }

    /// Staged batches that can never be uploaded together (their page sizes differ, as a
    /// capture bug or a damaged staging directory could leave them) are not retried
    /// forever: capture is asked once for a snapshot, which supersedes them, and the next
    /// round uploads it.
    #[test]
    fn staged_items_that_cannot_be_uploaded_are_superseded_by_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Arc::new(Staging::open(dir.path().join("staging")).unwrap());
        let db = Path::new("app.db");
        staging
            .save_state(
                db,
                &DbState {
                    txid: 2,
                    page_size: 1024,
                    commit: 1,
                    ..DbState::default()
                },
            )
            .unwrap();
        stage_batch(&staging, db, 512, 1);
        stage_batch(&staging, db, 1024, 2);
        let url = format!("file://{}", dir.path().join("replica").display());
        let store =
            ReplicaStore::open_with(&ReplicaUrl::parse(&url).unwrap(), &StoreTuning::default())
                .unwrap();
        let uploader = one_replica(&staging, store);
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        {
            let (staging, asked) = (staging.clone(), asked.clone());
            uploader.fanout.set_restart(Box::new(move |db, reason| {
                assert!(reason.contains("page size"), "{reason}");
                asked.fetch_add(1, Ordering::Relaxed);
                let page = vec![9u8; 1024];
                staging
                    .stage_snapshot(db, [Ok::<_, std::io::Error>((1, &page))], 1024, 1, 3, 2000)
                    .unwrap();
                true
            }));
        }
        let dbs: BTreeSet<PathBuf> = [db.to_path_buf()].into();
        assert_eq!(uploader.upload_round(&dbs, true), dbs, "first round waits");
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        assert!(
            uploader.upload_round(&dbs, true).is_empty(),
            "the snapshot goes up"
        );
        assert_eq!(asked.load(Ordering::Relaxed), 1, "asked once");
        assert!(
            staging.pending(db).unwrap().is_empty(),
            "nothing left to retry"
        );
        let snapshot = dir
            .path()
            .join("replica/app.db/ltx/9/0000000000000001-0000000000000003.ltx");
        assert!(snapshot.is_file(), "{} is missing", snapshot.display());
    }
}

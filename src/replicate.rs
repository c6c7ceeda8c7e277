//! Replication of one mount: wires capture (at the FUSE barriers), staging and upload
//! together. At start it finds the databases already in the backing directory and stages
//! their initial snapshots; while mounted each replica's uploader sends what capture staged
//! every sync interval, and its maintenance loop compacts, snapshots and applies
//! retention, each replica on its own (`replica::fanout`); at unmount it flushes what is
//! pending within a bounded time. With `--sync-replication`, the
//! barriers of the databases it names wait for the uploader (`SyncCommits`); with
//! `--max-staging`, each upload round first checks the staging budget.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::fmt;
use std::io;

use crate::capture::watch::WalWatcher;
use crate::capture::{database_of, Barrier, Capture, CaptureObserver, CommitWaiter, StagingBudget};
use crate::fs::Observer;
use crate::replica::crypt::EncryptionArgs;
use crate::replica::error::{write_causes, ReplicaError, StoreError};
use crate::replica::fanout::Fanout;
use crate::replica::lease::{Lease, LeaseError};
use crate::replica::maintain::{Maintainer, MaintenanceOptions};
use crate::replica::store::{ReplicaStore, StoreTuning};
use crate::replica::sync::{SyncOptions, SyncOutcome, SyncReplication};
use crate::replica::upload::Uploader;
use crate::replica::url::ReplicaUrl;
use crate::restore::apply::bytes_bar;
use crate::staging::{Staging, StagingError};

/// The mount's uploads retry briefly inside the client and then leave it to the uploader's
/// own backoff, so that a failing store is reported ("replica is behind") within seconds,
/// not minutes.
const UPLOAD_TUNING: StoreTuning = StoreTuning {
    max_retries: 3,
    retry_timeout: Duration::from_secs(15),
    init_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_secs(2),
    connect_timeout: Duration::from_secs(5),
    request_timeout: Duration::from_secs(300),
};

/// How long unmount waits for a maintenance step under way.
const MAINTENANCE_STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// How long unmount waits for pending uploads before giving up (and saying so).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long WAL changes between barriers wait to be read (merged into one batch). Short,
/// so that the capture runs beside a busy writer rather than at its next checkpoint, where
/// the writer would wait for it.
const WATCH_COALESCE: Duration = Duration::from_millis(5);

/// Replication settings of a mount: flags of `walfs mount` (each field's doc comment is its
/// `--help` text).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ReplicationOptions {
    /// Stream every database's commits to this replica: file:///abs/dir,
    /// s3://bucket/prefix?endpoint=...&region=...&forcePathStyle=true,
    /// abs://ACCOUNT@CONTAINER/prefix or gs://bucket/prefix. May be repeated.
    #[arg(long = "replica", value_name = "URL")]
    pub replicas: Vec<String>,
    /// Where captured transactions wait for upload (default: /var/lib/walfs/staging/...
    /// for root). Must not be inside BACKING.
    #[arg(long)]
    pub staging_dir: Option<PathBuf>,
    /// How often staged transactions are uploaded: 1s, 500ms, 0 (each commit at once).
    #[arg(long, default_value = "1s", value_parser = crate::flags::duration)]
    pub sync_interval: Duration,
    // Capture at every `-wal` fsync before replying (see [`CaptureObserver::new`]).
    /// Stage each commit before its WAL fsync returns (synchronous=FULL), instead of
    /// within milliseconds after. Slower; the replica's RPO is the same, since the
    /// upload is asynchronous either way.
    #[arg(long)]
    pub stage_at_commit: bool,
    /// Take over a replica whose lease another mount holds once that lease has expired
    /// (one mount writes a replica at a time; a crashed mount of this host is taken over
    /// without it).
    #[arg(long)]
    pub takeover: bool,
    /// Do not put the change feed (`.walfs-feed`) after each upload round. It costs one
    /// PUT per round (not per database) and lets followers (`walfs follow`) learn what
    /// changed with one GET; without it they list every database at each poll.
    #[arg(long)]
    pub no_follower_feed: bool,
    /// How long an S3 replica's lease lasts without renewal (renewed every sixth of it;
    /// this mount stops writing the replica after half of it without a renewal).
    #[arg(long, default_value = "30s", value_parser = crate::flags::duration)]
    pub lease_ttl: Duration,
    /// Bound what waits for upload in staging: when a replica outage makes it larger than
    /// SIZE (512M, 1G, 4MiB, ...), each database's pending transactions are collapsed
    /// into one snapshot of its latest state (points in time inside them are lost).
    /// Default: unbounded.
    #[arg(long, value_name = "SIZE", value_parser = crate::flags::size)]
    pub max_staging: Option<u64>,
    // Synchronous replication.
    #[command(flatten)]
    pub sync: SyncOptions,
    // Compaction, snapshots and retention.
    #[command(flatten)]
    pub maintenance: MaintenanceOptions,
    // Encryption at rest.
    #[command(flatten)]
    pub encryption: EncryptionArgs,
}

pub struct Replication {
    capture: Arc<Capture>,
    stage_at_commit: bool,
    fanout: Arc<Fanout>,
    /// One per replica, in the mount's order.
    uploaders: Vec<Arc<Uploader>>,
    /// One per replica, in the mount's order.
    maintainers: Vec<Arc<Maintainer>>,
    /// `None` unless some database replicates synchronously.
    sync: Option<Arc<SyncReplication>>,
    merge: bool,
    threads: Vec<JoinHandle<()>>,
    maintenance_threads: Vec<JoinHandle<()>>,
    watcher: Option<WalWatcher>,
    /// Renew the replicas' leases (one thread each) until told to stop, then give them up.
    lease_threads: Vec<(JoinHandle<()>, std::sync::mpsc::Sender<()>)>,
}

/// Why replication could not start.
///
/// `Store`, `Replica` and `Io` are transparent (they print as the error they wrap, and
/// `source()` is its source); the other variants that wrap an error print only their own
/// text and return it from `source()`, so `{:#}` prints "what: cause".
#[derive(Debug)]
pub enum ReplicationError {
    /// A `--replica` URL is malformed (the source says how).
    ReplicaUrl(StoreError),
    /// A replica's store cannot be opened.
    Store(StoreError),
    /// The uploader or maintenance loop cannot be set up.
    Replica(ReplicaError),
    /// A thread or runtime cannot be started.
    Io(io::Error),
    /// The staging directory lies inside the backing directory.
    StagingInsideBacking(PathBuf),
    /// Staging failed while `what`.
    Staging { what: String, source: StagingError },
    /// The backing directory cannot be watched for WAL changes.
    Watch(io::Error),
    /// A replica's lease is held by another mount, or cannot be taken.
    Lease(LeaseError),
    /// An encryption key file (or variable) is missing, malformed or weak: the message.
    Encryption(String),
}

/// The result of starting replication.
pub type ReplicationResult<T> = Result<T, ReplicationError>;

impl fmt::Display for ReplicationError {
    /// One line; with `{:#}`, followed by each cause, joined by ": ".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicationError::ReplicaUrl(_) => f.write_str("--replica")?,
            ReplicationError::Store(e) => write!(f, "{e}")?,
            ReplicationError::Replica(e) => write!(f, "{e}")?,
            ReplicationError::Io(e) => write!(f, "{e}")?,
            ReplicationError::StagingInsideBacking(dir) => write!(
                f,
                "staging directory {} is inside the backing directory; put it elsewhere (--staging-dir)",
                dir.display()
            )?,
            ReplicationError::Staging { what, .. } => f.write_str(what)?,
            ReplicationError::Watch(_) => {
                f.write_str("cannot watch the backing directory for WAL changes (inotify)")?
            }
            ReplicationError::Lease(e) => write!(f, "{e}")?,
            ReplicationError::Encryption(m) => f.write_str(m)?,
        }
        if f.alternate() {
            write_causes(f, self)?;
        }
        Ok(())
    }
}

impl std::error::Error for ReplicationError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReplicationError::ReplicaUrl(e) => Some(e),
            ReplicationError::Store(e) => e.source(),
            ReplicationError::Replica(e) => e.source(),
            ReplicationError::Io(e) => e.source(),
            ReplicationError::StagingInsideBacking(_) => None,
            ReplicationError::Staging { source, .. } => Some(source),
            ReplicationError::Watch(e) => Some(e),
            ReplicationError::Lease(LeaseError::Store(e)) => e.source(),
            ReplicationError::Lease(LeaseError::Io { source, .. }) => Some(source),
            ReplicationError::Lease(LeaseError::Held(_) | LeaseError::Encryption(_)) => None,
            ReplicationError::Encryption(_) => None,
        }
    }
}

impl From<StoreError> for ReplicationError {
    fn from(e: StoreError) -> Self {
        ReplicationError::Store(e)
    }
}

impl From<ReplicaError> for ReplicationError {
    fn from(e: ReplicaError) -> Self {
        ReplicationError::Replica(e)
    }
}

impl From<io::Error> for ReplicationError {
    fn from(e: io::Error) -> Self {
        ReplicationError::Io(e)
    }
}

impl Replication {
    /// Takes each replica's lease for the mount at `mountpoint` (refusing if another
    /// mount holds one), opens the replicas and staging, stages snapshots of the databases
    /// already in `backing`, and starts the uploader.
    pub fn start(
        backing: &Path,
        mountpoint: &Path,
        opts: &ReplicationOptions,
    ) -> ReplicationResult<Replication> {
        // Keys first: a bad key file stops the mount before any request.
        let keyring = opts
            .encryption
            .keyring()
            .map_err(ReplicationError::Encryption)?;
        if let Some(ring) = &keyring {
            tracing::info!(
                "encrypting what is written to the replicas with key id {}{}",
                ring.current().id(),
                match ring.ids().len() {
                    1 => String::new(),
                    n => format!(" ({} older keys decrypt only)", n - 1),
                }
            );
        }
        // One writer per replica: each lease is taken before anything is written.
        let mut replicas = Vec::new();
        let mut leases = Vec::new();
        let mut fences = Vec::new();
        for url in &opts.replicas {
            // Each lease is renewed on a thread and runtime of its own, so that a hanging
            // replica never delays another's renewal.
            let lease_rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let parsed = ReplicaUrl::parse(url).map_err(ReplicationError::ReplicaUrl)?;
            let store =
                ReplicaStore::open_with(&parsed, &UPLOAD_TUNING)?.with_keyring(keyring.clone());
            // The lease gets a client of its own, as maintenance does: a connection made
            // on one runtime is driven only while that runtime runs.
            let lease = Lease::acquire(
                &lease_rt,
                &parsed,
                &ReplicaStore::open_with(&parsed, &UPLOAD_TUNING)?.with_keyring(keyring.clone()),
                mountpoint,
                opts.lease_ttl,
                opts.takeover,
            )
            .map_err(ReplicationError::Lease)?;
            replicas.push(store.fenced(lease.fence()));
            fences.push(lease.fence());
            leases.push((lease_rt, lease));
        }
        // Renewed from now on: staging what the databases hold may take longer than a
        // lease lasts.
        let lease_threads = leases
            .into_iter()
            .map(|(rt, lease)| spawn_lease_thread(rt, lease))
            .collect::<io::Result<Vec<_>>>()?;
        let dir = staging_dir(backing, opts);
        if dir.starts_with(backing) {
            return Err(ReplicationError::StagingInsideBacking(dir));
        }
        let staging = Arc::new(Staging::open(&dir).map_err(|e| ReplicationError::Staging {
            what: format!(
                "cannot use staging directory {}; give a writable one with --staging-dir",
                dir.display()
            ),
            source: e,
        })?);
        staging
            .remove_temporaries()
            .map_err(|e| ReplicationError::Staging {
                what: "cannot clean the staging directory".into(),
                source: e,
            })?;
        let capture = Arc::new(Capture::new(backing, staging.clone()));
        // With a sync interval of 0 every batch is uploaded alone: nothing to merge.
        capture.set_hold_pages(!opts.sync_interval.is_zero());
        let fanout = Arc::new(
            Fanout::new(staging, replicas.iter().map(ReplicaStore::name).collect()).map_err(
                |e| ReplicationError::Staging {
                    what: "cannot read the staging directory".into(),
                    source: e,
                },
            )?,
        );
        // Each replica has an uploader and a maintenance loop of its own, so that a
        // failing one never delays another. The maintenance loop gets clients of its own:
        // a connection made on the uploader's runtime is driven only while that runtime
        // runs.
        let mut uploaders = Vec::new();
        let mut maintainers = Vec::new();
        for (i, ((url, fence), store)) in
            opts.replicas.iter().zip(&fences).zip(&replicas).enumerate()
        {
            let parsed = ReplicaUrl::parse(url).map_err(ReplicationError::ReplicaUrl)?;
            let maintainer = Arc::new(Maintainer::new(
                fanout.copies(i).clone(),
                vec![ReplicaStore::open_with(&parsed, &UPLOAD_TUNING)?
                    .with_keyring(keyring.clone())
                    .fenced(fence.clone())],
                opts.maintenance.clone(),
            )?);
            // The change feed is put on a thread and runtime of its own, with a client of
            // its own too.
            let feed = if opts.no_follower_feed {
                None
            } else {
                Some(
                    ReplicaStore::open_with(&parsed, &UPLOAD_TUNING)?
                        .with_keyring(keyring.clone())
                        .fenced(fence.clone()),
                )
            };
            let uploader = Arc::new(Uploader::new(fanout.clone(), i, store.clone(), feed)?);
            uploader.set_maintainer(maintainer.clone());
            uploaders.push(uploader);
            maintainers.push(maintainer);
        }
        let sync = (opts.sync.enabled() && !opts.replicas.is_empty())
            .then(|| Arc::new(SyncReplication::new(opts.sync.clone())));
        if let Some(sync) = &sync {
            fanout.set_sync(sync.clone());
        }
        {
            let uploaders = uploaders.clone();
            capture.set_notify(Box::new(move || uploaders.iter().for_each(|u| u.notify())));
        }
        {
            // Weak: the capture already holds the uploaders (its notify).
            let capture = Arc::downgrade(&capture);
            fanout.set_restart(Box::new(move |db, reason| {
                capture
                    .upgrade()
                    .is_some_and(|c| c.restart_history(db, reason))
            }));
        }
        continue_replica_histories(backing, &capture, &replicas)?;
        let found = stage_existing_databases(backing, &capture);
        // What a previous run staged (a crash may have left it unsealed) goes up now.
        capture.resume_uploads();
        tracing::info!(
            staging = %dir.display(),
            replicas = opts.replicas.len(),
            databases = found,
            "replication on"
        );
        // Bounded staging is checked at each round's seal (capture/budget.rs), which any
        // replica's uploader may start: what it seals goes to every replica.
        let budget = Arc::new(opts.max_staging.map(StagingBudget::new));
        let mut threads = Vec::new();
        for (i, uploader) in uploaders.iter().enumerate() {
            let (uploader, capture, fanout, budget) = (
                uploader.clone(),
                capture.clone(),
                fanout.clone(),
                budget.clone(),
            );
            let interval = opts.sync_interval;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("walfs-upload-{i}"))
                    .spawn(move || {
                        uploader.run(interval, || {
                            fanout.take(i, || {
                                let mut dbs = capture.take_staged();
                                if let Some(b) = budget.as_ref() {
                                    dbs.extend(b.check(&capture));
                                }
                                dbs
                            })
                        })
                    })?,
            );
        }
        let mut maintenance_threads = Vec::new();
        for (i, maintainer) in maintainers.iter().enumerate() {
            let maintainer = maintainer.clone();
            maintenance_threads.push(
                std::thread::Builder::new()
                    .name(format!("walfs-maintain-{i}"))
                    .spawn(move || maintainer.run())?,
            );
        }
        let watcher =
            WalWatcher::start(capture.clone(), WATCH_COALESCE).map_err(ReplicationError::Watch)?;
        Ok(Replication {
            capture,
            stage_at_commit: opts.stage_at_commit,
            fanout,
            uploaders,
            maintainers,
            sync,
            merge: !opts.sync_interval.is_zero(),
            threads,
            maintenance_threads,
            watcher: Some(watcher),
            lease_threads,
        })
    }

    /// What metrics and `walfs status` read of this replication.
    pub fn view(&self) -> crate::observe::ReplicationView {
        crate::observe::ReplicationView {
            capture: self.capture.clone(),
            fanout: self.fanout.clone(),
            maintainers: self.maintainers.clone(),
            sync: self.sync.clone(),
        }
    }

    /// The observer the FUSE layer calls at barriers.
    pub fn observer(&self) -> Arc<dyn Observer> {
        let sync = self.sync.as_ref().map(|replication| {
            Arc::new(SyncCommits {
                replication: replication.clone(),
                uploaders: self.uploaders.clone(),
            }) as Arc<dyn CommitWaiter>
        });
        Arc::new(CaptureObserver::new(
            self.capture.clone(),
            self.stage_at_commit,
            sync,
        ))
    }

    /// Stops the uploader after one last round, then retries what is still pending until
    /// the flush timeout. Returns false (and logs why) if the replica is left behind.
    pub fn stop(mut self) -> bool {
        if let Some(w) = self.watcher.take() {
            w.stop();
        }
        // Compaction and retention resume from the local copies at the next mount. A step
        // under way (a request to a slow store) is not waited for long.
        self.maintainers.iter().for_each(|m| m.shutdown());
        let deadline = Instant::now() + MAINTENANCE_STOP_TIMEOUT;
        for t in std::mem::take(&mut self.maintenance_threads) {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!(
                    "maintenance is still busy at unmount; it resumes at the next mount"
                );
            }
        }
        // Each uploader ends its round under way (one to a hanging replica may not end
        // in time: it is left to the exit, and its replica is behind), then flushes on its
        // own thread: a failing replica does not use up the others' time.
        self.uploaders.iter().for_each(|u| u.shutdown());
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let rounds: Vec<JoinHandle<()>> = std::mem::take(&mut self.threads);
        while rounds.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Commits made since the last WAL event, then everything sealed.
        self.capture.poll_all();
        let mut dbs = self.capture.take_staged();
        self.capture.close_all();
        dbs.extend(self.capture.staging().databases().unwrap_or_default());
        dbs.sort();
        dbs.dedup();
        let dbs = Arc::new(dbs);
        let mut behind = Vec::new();
        let mut flushes = Vec::new();
        for (round, u) in rounds.into_iter().zip(&self.uploaders) {
            let name = u.replica().name();
            if !round.is_finished() {
                behind.push(name);
                continue;
            }
            let _ = round.join();
            let (u, dbs, merge) = (u.clone(), dbs.clone(), self.merge);
            let flush = std::thread::Builder::new()
                .name("walfs-flush".into())
                .spawn(move || u.flush(&dbs, merge, deadline));
            match flush {
                Ok(t) => flushes.push((name, t)),
                Err(e) => {
                    tracing::error!(replica = %name, "cannot start the last upload: {e}");
                    behind.push(name);
                }
            }
        }
        for (name, flush) in flushes {
            while !flush.is_finished() && Instant::now() < deadline + Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !(flush.is_finished() && flush.join().unwrap_or(false)) {
                behind.push(name);
            }
        }
        let done = behind.is_empty();
        let stats = self.capture.stats();
        tracing::info!(
            staged = stats.staged.load(Ordering::Relaxed),
            heals = stats.heals.load(Ordering::Relaxed),
            waits = stats.waits.load(Ordering::Relaxed),
            failures = stats.failures.load(Ordering::Relaxed),
            quick_resumes = stats.quick_resumes.load(Ordering::Relaxed),
            collapses = stats.collapses.load(Ordering::Relaxed),
            "capture stopped"
        );
        if let Some(sync) = &self.sync {
            let s = sync.stats();
            let waits = s.waits.load(Ordering::Relaxed);
            tracing::info!(
                waits,
                rounds = s.rounds.load(Ordering::Relaxed),
                mean_wait_us = s.waited_us.load(Ordering::Relaxed) / waits.max(1),
                timeouts = s.timeouts.load(Ordering::Relaxed),
                degraded_commits = s.degraded_commits.load(Ordering::Relaxed),
                failed_commits = s.failed_commits.load(Ordering::Relaxed),
                "synchronous replication stopped"
            );
        }
        if !done {
            tracing::error!(
                replicas = %behind.join(", "),
                "the replica is behind: staged transactions could not be uploaded before exit; they stay in staging and are uploaded at the next mount"
            );
        }
        // Each lease is given up; one of a replica that is behind (failing or hanging) is
        // not waited for: it expires.
        for (_, stop) in &self.lease_threads {
            let _ = stop.send(());
        }
        let deadline = Instant::now() + MAINTENANCE_STOP_TIMEOUT;
        let leases = std::mem::take(&mut self.lease_threads);
        for ((thread, _), u) in leases.into_iter().zip(&self.uploaders) {
            let wait_until = if behind.contains(&u.replica().name()) {
                Instant::now()
            } else {
                deadline
            };
            while !thread.is_finished() && Instant::now() < wait_until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
        done
    }
}

/// Synchronous commits wait for the uploaders: capture's [`CommitWaiter`], wired.
struct SyncCommits {
    replication: Arc<SyncReplication>,
    uploaders: Vec<Arc<Uploader>>,
}

impl CommitWaiter for SyncCommits {
    fn applies_to(&self, db: &Path) -> bool {
        self.replication.applies_to(db)
    }

    fn fails_commits(&self) -> bool {
        self.replication.fails_commits()
    }

    fn wait(&self, db: &Path, txid: u64, known_uploaded: &dyn Fn() -> Option<u64>) -> bool {
        let outcome = self.replication.wait(db, txid, known_uploaded, || {
            self.uploaders.iter().for_each(|u| u.upload_now())
        });
        outcome != SyncOutcome::Failed
    }
}

/// Ticks an S3 lease (renewed while its replica is written) until told to stop (or the
/// replication is dropped), then gives it up.
fn spawn_lease_thread(
    rt: tokio::runtime::Runtime,
    lease: Lease,
) -> io::Result<(JoinHandle<()>, std::sync::mpsc::Sender<()>)> {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let every = lease.tick_every().unwrap_or(Duration::from_secs(3600));
    let thread = std::thread::Builder::new()
        .name("walfs-lease".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every)
            {
                rt.block_on(lease.tick());
            }
            rt.block_on(lease.release());
        })?;
    Ok((thread, stop))
}

/// The staging directory of a mount of `backing` (canonical): `--staging-dir`, or the
/// default.
pub fn staging_dir(backing: &Path, opts: &ReplicationOptions) -> PathBuf {
    match &opts.staging_dir {
        Some(d) => d.clone(),
        None => default_staging_dir(backing),
    }
}

/// `/var/lib/walfs/staging/<backing path>` for root, else under `$XDG_STATE_HOME` (or
/// `~/.local/state`).
fn default_staging_dir(backing: &Path) -> PathBuf {
    let name = backing
        .to_string_lossy()
        .trim_start_matches('/')
        .replace('/', "%");
    // SAFETY: plain getter.
    let base = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/walfs/staging")
    } else {
        std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
            .unwrap_or_else(|| PathBuf::from("/tmp"))
            .join("walfs/staging")
    };
    base.join(name)
}

/// Below this many bytes in the backing directory, the mount's first snapshots show no
/// progress bar: they take a moment.
const INITIAL_BAR_BYTES: u64 = 64 << 20;

/// Registers every SQLite database under `backing` (by header) and stages what it holds. A
/// staging failure (a full staging disk) does not keep the mount from starting: that
/// database is logged once and captured at its next barrier, from a snapshot if need be,
/// once staging has room.
/// Every regular file under `backing` (relative paths, not following symbolic links), with
/// its size.
fn backing_files(backing: &Path) -> Vec<(PathBuf, u64)> {
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries = match std::fs::read_dir(backing.join(&rel)) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %rel.display(), "cannot scan for databases: {e}");
                continue;
            }
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let child = rel.join(entry.file_name());
            if kind.is_dir() {
                stack.push(child);
            } else if kind.is_file() {
                files.push((child, entry.metadata().map_or(0, |m| m.len())));
            }
        }
    }
    files
}

/// The databases in `backing` that staging knows nothing of (what SQLite would read as
/// one, `capture::is_database`): each may have a history in a replica that its capture must continue.
fn databases_unknown_to_staging(backing: &Path, staging: &Staging) -> Vec<PathBuf> {
    backing_files(backing)
        .into_iter()
        .filter_map(|(rel, _)| match database_of(&rel) {
            Some((db, false)) => Some(db),
            _ => None,
        })
        .filter(|db| matches!(staging.state(db), Ok(None)))
        .filter(|db| crate::capture::is_database(&backing.join(db)))
        .collect()
}

/// For `db`, which staging knows nothing of, while a replica may hold its history (the
/// staging directory was lost or is new: a container whose staging is not on a volume, a
/// move to another host): records in staging that the replica holds that history up to
/// its newest TXID (with its verification record, when there is one). Capture then
/// continues that history: it resumes at once if the database still is the replica's
/// newest state, and otherwise snapshots it at the next TXID. Without this the database
/// would start a second history at TXID 1 beside the first, a restore of the latest
/// state would return the old one, and object names could collide. True if a replica
/// holds a history of it; an error if a replica cannot be listed (after its client's
/// retries) or staging cannot record it.
fn continue_replica_history(
    rt: &tokio::runtime::Runtime,
    staging: &Staging,
    replicas: &[ReplicaStore],
    db: &Path,
) -> Result<bool, String> {
    let key = db.to_string_lossy();
    // The newest TXID any replica holds, and that replica's object of it.
    let mut newest: Option<(u64, &ReplicaStore, crate::replica::store::LtxObjectInfo)> = None;
    for replica in replicas {
        let objects = rt
            .block_on(replica.list_db_ltx(&key))
            .map_err(|e| format!("cannot list replica {}: {e}", replica.name()))?;
        if let Some(o) = objects.into_iter().max_by_key(|o| o.max_txid) {
            if newest.as_ref().is_none_or(|(t, _, _)| o.max_txid > *t) {
                newest = Some((o.max_txid, replica, o));
            }
        }
    }
    let Some((txid, replica, object)) = newest else {
        return Ok(false);
    };
    let sidecar = crate::replica::record::SidecarStore::new(replica.clone());
    let record = rt
        .block_on(sidecar.get_checksum_record(&key, txid, Some(&object)))
        .ok()
        .flatten()
        .map(|(r, _)| r);
    let mut state = crate::staging::DbState {
        txid,
        uploaded_txid: txid,
        ..Default::default()
    };
    if let Some(r) = record.filter(|r| r.txid == txid) {
        if let crate::replica::record::RecordedChecksum::Content(c) = r.checksum {
            (state.page_size, state.commit, state.checksum) = (r.page_size, r.commit, c);
        }
    }
    staging
        .save_state(db, &state)
        .map_err(|e| format!("cannot record it in staging: {e}; {}", e.hint()))?;
    tracing::warn!(
        db = %db.display(),
        txid,
        "staging holds nothing of the database, but the replica holds its history up to this TXID: the history continues there (from a snapshot at the next TXID unless the database is still that state)"
    );
    Ok(true)
}

/// Continues the replicas' histories of the databases staging knows nothing of
/// ([`continue_replica_history`]). If a replica does not answer (after its client's
/// retries), the databases not yet resolved start new histories, as they would without
/// this, and one ERROR says so: holding them back from capture would let synchronous
/// commits return unreplicated. The replica is not asked again for each of them, so that
/// the mount does not wait a retry period per database.
fn continue_replica_histories(
    backing: &Path,
    capture: &Arc<Capture>,
    replicas: &[ReplicaStore],
) -> ReplicationResult<()> {
    if replicas.is_empty() {
        return Ok(());
    }
    let candidates = databases_unknown_to_staging(backing, capture.staging());
    if candidates.is_empty() {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for (i, db) in candidates.iter().enumerate() {
        if let Err(e) = continue_replica_history(&rt, capture.staging(), replicas, db) {
            tracing::error!(
                db = %db.display(),
                "cannot learn the replica's history of databases that staging knows nothing of ({e}); {} of them start new histories at TXID 1, and if the replica holds older ones a restore of the latest state may return those: restore with --timestamp, or start walfs with the previous staging directory",
                candidates.len() - i
            );
            break;
        }
    }
    Ok(())
}

fn stage_existing_databases(backing: &Path, capture: &Capture) -> usize {
    let files = backing_files(backing);
    // Reading large databases for their first snapshots takes a while: on a terminal, a
    // progress bar says how far it got.
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    let bar = (total >= INITIAL_BAR_BYTES)
        .then(|| bytes_bar(total, "staging the databases' snapshots".into()))
        .flatten();
    let mut found = 0;
    for (child, len) in files {
        // As at an fsync: what a database or its `-wal` holds is staged.
        let barrier = match database_of(&child) {
            Some((_, true)) => Barrier::WalDurable,
            _ => Barrier::DbSynced,
        };
        if let Err(e) = capture.on(&child, barrier) {
            let db = database_of(&child).map_or(child.clone(), |(db, _)| db);
            tracing::error!(
                file = %child.display(),
                "cannot stage what the database holds at the start ({e}); the mount starts anyway, and the database is captured at its next write once staging works ({})",
                e.hint()
            );
            capture.defer_restart(&db, &format!("staging failed at the start: {e}"));
        }
        if capture.is_captured(&child) {
            found += 1;
        }
        if let Some(b) = &bar {
            b.inc(len);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    found
}

//! `walfs follow URL MOUNTPOINT`: a read-only mount, on any host, of every database a
//! replica holds, kept at the writer's latest uploaded state.
//!
//! The data flows the other way from a writer's mount: the replica is read by the
//! applier ([`apply`]), whose new states become versions of each database ([`versions`]),
//! which the FUSE adapter ([`fuse`]) serves from a tree of the databases, their open files
//! and their readers' locks ([`namespace`]). Unmodified SQLite readers under the mount see
//! one committed state per read transaction: the state that was latest when the
//! transaction took its shared lock.
//!
//! This module owns the command: its arguments, the checks before mounting, the first
//! restore of every database, and the session's life until SIGINT or SIGTERM.

pub mod apply;
pub mod fuse;
pub mod namespace;
pub mod versions;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{MountOption, SessionACL};

use crate::mount::{
    check_empty, check_fuse_device, check_mountpoint, mount_failed, raise_open_file_limit,
    unmount_on_signal, MountControl, MountError, MountResult, Serving,
};
use crate::observe::follower::FollowerCollector;
use crate::observe::metrics::MetricsEndpoint;
use crate::ready::Readiness;
use crate::replica::crypt::EncryptionArgs;
use apply::{Applier, FollowStats};
use namespace::Namespace;

/// The shortest wait between two polls (after a change).
pub const POLL_MIN: Duration = Duration::from_millis(200);

/// `walfs follow`'s arguments (each field's doc comment is its `--help` text).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct FollowArgs {
    /// The replica to follow, as given to the writer's `--replica` (s3://, file://, abs://,
    /// gs://).
    pub url: String,
    /// An empty directory where the databases appear, read-only.
    pub mountpoint: PathBuf,
    /// The longest wait between two polls of the replica, reached while nothing changes
    /// (after a change it polls every 200 ms). A new commit shows within about this long
    /// after the writer uploaded it.
    #[arg(long, default_value = "1s", value_parser = crate::flags::duration)]
    pub poll_interval: Duration,
    /// Where the follower keeps its copies of the databases: a new or empty directory, or
    /// one a follower used before (emptied at start and at stop). Default:
    /// /var/cache/walfs/follow/ID as root, else ~/.cache/walfs/follow/ID, where ID
    /// names the mountpoint.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The name under the mount of a database whose objects sit at the URL itself (the
    /// replica of one database, as Litestream writes one).
    #[arg(long, default_value = "db", value_name = "NAME")]
    pub root_name: String,
    /// Let users other than the one running walfs read the mount.
    #[arg(long)]
    pub allow_other: bool,
    /// Mount even if MOUNTPOINT is not empty (its files are hidden while mounted).
    #[arg(long)]
    pub allow_nonempty: bool,
    /// FUSE worker threads (1 to 256).
    #[arg(long, default_value_t = 4,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub threads: usize,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (each database's TXID and
    /// commit time, the last poll, requests, readers). Default: off.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// Once every database is restored and the mount serves, write this file (it holds
    /// the mountpoint); removed when walfs starts to stop.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    #[command(flatten)]
    pub encryption: EncryptionArgs,
}

/// The default cache directory of a follower mounted at `mountpoint`.
fn default_cache_dir(mountpoint: &Path) -> PathBuf {
    let id = blake3::hash(mountpoint.as_os_str().as_encoded_bytes()).to_hex();
    // SAFETY: plain getter.
    let root = unsafe { libc::geteuid() } == 0;
    let base = match std::env::var_os("HOME") {
        Some(home) if !root => PathBuf::from(home).join(".cache/walfs/follow"),
        _ => PathBuf::from("/var/cache/walfs/follow"),
    };
    base.join(&id.as_str()[..16])
}

/// The file that marks a directory as a follower's cache, locked while a follower uses it.
const CACHE_MARKER: &str = ".walfs-follow-cache";

/// Makes `cache` this follower's, empty: a new or empty directory, or one a follower used
/// before (it holds [`CACHE_MARKER`]); never a directory of other files (a mistyped
/// `--cache-dir` must not delete them), nor one another follower uses (its marker is
/// locked). The returned lock is held until the follower stops.
fn take_cache_dir(cache: &Path) -> MountResult<nix::fcntl::Flock<std::fs::File>> {
    let error = |what: &str| {
        let what = format!("cannot {what} cache directory {}", cache.display());
        move |source| MountError::Context { what, source }
    };
    std::fs::create_dir_all(cache).map_err(error("create"))?;
    let marker = cache.join(CACHE_MARKER);
    let others = std::fs::read_dir(cache)
        .map_err(error("read"))?
        .flatten()
        .any(|e| e.file_name() != CACHE_MARKER);
    if others && !marker.exists() {
        return Err(MountError::Setup(format!(
            "cache directory {} holds files that are not a follower's cache; give a new or empty directory with --cache-dir",
            cache.display()
        )));
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&marker)
        .map_err(error("create a marker in"))?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| {
            MountError::Setup(format!(
                "cache directory {} is in use by another walfs follow; give each follower its own --cache-dir",
                cache.display()
            ))
        })?;
    empty_cache_dir(cache);
    Ok(lock)
}

/// Deletes what a follower keeps in `cache` (not the directory, nor its marker).
fn empty_cache_dir(cache: &Path) {
    for e in std::fs::read_dir(cache).into_iter().flatten().flatten() {
        if e.file_name() == CACHE_MARKER {
            continue;
        }
        let p = e.path();
        let gone = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
            _ => std::fs::remove_file(&p),
        };
        if let Err(err) = gone {
            tracing::warn!(path = %p.display(), "cannot delete from the follower's cache: {err}");
        }
    }
}

/// Runs `walfs follow` until SIGINT or SIGTERM.
pub fn follow_command(args: &FollowArgs) -> MountResult<()> {
    let mountpoint = check_mountpoint(&args.mountpoint)?;
    check_empty(&mountpoint, args.allow_nonempty)?;
    check_fuse_device()?;
    raise_open_file_limit();
    if args.poll_interval < POLL_MIN {
        return Err(MountError::Setup(format!(
            "--poll-interval {:?} is shorter than the {POLL_MIN:?} between polls after a change; give at least 200ms",
            args.poll_interval
        )));
    }
    // Bound before anything starts: a bad address is a one-line error.
    let metrics_endpoint = match &args.metrics_addr {
        Some(addr) => Some(MetricsEndpoint::bind(addr).map_err(MountError::Setup)?),
        None => None,
    };
    let (_, store, _) = crate::restore::open_replica(&args.url, &args.encryption)
        .map_err(|e| MountError::Setup(format!("{e:#}")))?;
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| default_cache_dir(&mountpoint));
    if cache.starts_with(&mountpoint) {
        return Err(MountError::Setup(format!(
            "cache directory {} is inside mountpoint {}; put it elsewhere",
            cache.display(),
            mountpoint.display()
        )));
    }
    let _cache_lock = take_cache_dir(&cache)?;

    let ns = Arc::new(Namespace::new());
    let stats = Arc::new(FollowStats::default());
    let mut applier = Applier::new(
        store.clone(),
        ns.clone(),
        cache.clone(),
        args.root_name.clone(),
        POLL_MIN,
        args.poll_interval,
        stats.clone(),
    )
    .map_err(|e| MountError::Setup(format!("{e:#}")))?;
    let start = Instant::now();
    applier
        .scan(true)
        .map_err(|e| MountError::Setup(format!("cannot follow replica {}: {e:#}", store.name())))?;
    tracing::info!(
        replica = %store.name(),
        restored = stats.restored.load(Ordering::Relaxed),
        seconds = start.elapsed().as_secs_f64(),
        "the follower holds the replica's databases"
    );

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("walfs:follow:{}", store.name())),
        MountOption::Subtype("walfs".into()),
        MountOption::DefaultPermissions,
        MountOption::RO,
    ];
    config.acl = if args.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(args.threads);
    config.clone_fd = true;
    let mut session = fuser::Session::new(fuse::FollowFuse::new(ns), &mountpoint, &config)
        .map_err(|e| mount_failed(e, &mountpoint))?;
    tracing::info!(replica = %store.name(), mountpoint = %mountpoint.display(), "following");

    let metrics_server = match metrics_endpoint {
        Some(e) => Some(
            e.serve_collector(Box::new(FollowerCollector {
                stats: stats.clone(),
                store: store.clone(),
            }))
            .map_err(|source| MountError::Context {
                what: "cannot start the metrics server".into(),
                source,
            })?,
        ),
        None => None,
    };
    let readiness = Arc::new(Readiness::new(args.ready_file.clone()));
    let control = MountControl::new(
        session.unmount_callable(),
        mountpoint.clone(),
        readiness.clone(),
    );
    unmount_on_signal(control, mountpoint.clone())?;
    let ended = Arc::new(AtomicBool::new(false));
    let serving = Serving::new(mountpoint.clone(), ended.clone(), readiness.clone());
    std::thread::Builder::new()
        .name("walfs-ready".into())
        .spawn(move || {
            serving.wait();
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    // An applier that panicked would leave the mount serving a state that no longer
    // follows the replica: the follower unmounts and exits non-zero instead.
    let applier_failed = Arc::new(AtomicBool::new(false));
    let applier_thread = {
        let stop = stop.clone();
        let failed = applier_failed.clone();
        std::thread::Builder::new()
            .name("walfs-follow".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| applier.run(&stop));
                if std::panic::catch_unwind(run).is_err() {
                    failed.store(true, Ordering::SeqCst);
                    tracing::error!(
                        "the follower stopped applying the replica (the panic above); unmounting"
                    );
                    let _ = signal_hook::low_level::raise(signal_hook::consts::SIGTERM);
                }
            })?
    };

    let served = match session.run() {
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
        r => r.map_err(|source| MountError::Context {
            what: "FUSE session failed".into(),
            source,
        }),
    };
    ended.store(true, Ordering::SeqCst);
    readiness.stopping();
    stop.store(true, Ordering::SeqCst);
    let _ = applier_thread.join();
    if let Some(s) = metrics_server {
        s.stop();
    }
    empty_cache_dir(&cache);
    served?;
    if applier_failed.load(Ordering::SeqCst) {
        return Err(MountError::Setup(
            "the follower stopped applying the replica (see the log above); start walfs follow again".into(),
        ));
    }
    tracing::info!(
        applied = stats.applied.load(Ordering::Relaxed),
        restored = stats.restored.load(Ordering::Relaxed),
        "walfs follow stopped"
    );
    Ok(())
}

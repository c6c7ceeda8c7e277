//! `walfs mount`: the checks that turn a bad set-up into a one-line error before anything is
//! mounted, the cleaning of a stale mount left by a killed daemon, the FUSE session itself,
//! and a clean unmount on SIGINT or SIGTERM.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuser::{MountOption, SessionACL};

use crate::fs::fuse::FuseAdapter;
use crate::fs::metrics::Metrics;
use crate::fs::{FsConfig, IoMode, NoObserver, Observer, PassthroughFs};
use crate::observe::metrics::MetricsEndpoint;
use crate::observe::status::{socket_path, StatusServer};
use crate::observe::MountView;
use crate::ready::{answers, is_walfs_mount, unescape_mountinfo, Readiness};
use crate::replica::error::write_causes;
use crate::replicate::{Replication, ReplicationError, ReplicationOptions};

pub use crate::fs::DatabaseIo;

/// What `walfs mount` was asked to do: its arguments (each field's doc comment is its
/// `--help` text), less `--config`, which `main` reads.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct MountOptions {
    /// The directory that holds the data.
    pub backing: PathBuf,
    /// An empty directory where the mirror appears.
    pub mountpoint: PathBuf,
    /// Let users other than the one running walfs use the mount.
    #[arg(long)]
    pub allow_other: bool,
    /// Mount read-only.
    #[arg(long)]
    pub read_only: bool,
    /// FUSE worker threads (1 to 256).
    #[arg(long, default_value_t = 4,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub threads: usize,
    // Even with passthrough asked for, the daemon uses it only if it may (CAP_SYS_ADMIN).
    /// Serve file data through walfs instead of kernel passthrough (slower; for
    /// debugging and for comparison).
    #[arg(long)]
    pub no_passthrough: bool,
    /// How files holding an SQLite database are served: `passthrough` (like every
    /// other file), `cached` (through the kernel page cache: read transactions cost no
    /// request to walfs, each page write costs one), or `auto`: per rollback-journal
    /// database, whichever cost fewer requests the last time it was open (WAL-mode
    /// databases keep passthrough; docs/SEMANTICS.md).
    #[arg(long, value_enum, default_value_t = DatabaseIo::Auto)]
    pub database_io: DatabaseIo,
    /// Seconds the kernel may cache names and attributes. Changes made through the mount
    /// are always seen at once; this bounds how long a change made directly in BACKING
    /// can go unseen.
    #[arg(long, default_value = "1", value_parser = crate::flags::seconds)]
    pub cache_ttl: Duration,
    /// Mount even if MOUNTPOINT is not empty (its files are hidden while mounted).
    #[arg(long)]
    pub allow_nonempty: bool,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9090).
    /// Default: off.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// Once the mount serves, write this file (atomically; it holds the mountpoint), and
    /// remove it when walfs starts to stop. With $NOTIFY_SOCKET set (systemd
    /// Type=notify), walfs also sends READY=1 and STOPPING=1.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    // Replicas to stream every database's commits to (none: a plain mirror).
    #[command(flatten)]
    pub replication: ReplicationOptions,
}

/// Mounts and serves until unmounted (by a signal or `fusermount3 -u`).
pub fn run(opts: &MountOptions) -> MountResult<()> {
    serve(opts, None)
}

/// What runs alongside a mount (`walfs run`): called on a thread of its own as soon as
/// the mount is made, with the means to unmount it and to wait until it serves. With a
/// supervisor, the mount leaves SIGINT and SIGTERM to it.
pub type Supervisor = Box<dyn FnOnce(MountControl, Serving) + Send>;

/// Waits until a mount serves, and then tells others (systemd, the ready file).
pub struct Serving {
    mountpoint: PathBuf,
    ended: Arc<AtomicBool>,
    readiness: Arc<Readiness>,
}

impl Serving {
    /// Waits for the mount at `mountpoint` until `ended`.
    pub fn new(mountpoint: PathBuf, ended: Arc<AtomicBool>, readiness: Arc<Readiness>) -> Serving {
        Serving {
            mountpoint,
            ended,
            readiness,
        }
    }

    /// Waits until the mount answers a request (a stat that bypasses the attribute cache,
    /// which blocks until the session serves), then sends `READY=1` and writes the ready
    /// file; false if the session ended first.
    pub fn wait(&self) -> bool {
        while !self.ended.load(Ordering::SeqCst) {
            if answers(&self.mountpoint) && is_walfs_mount(&self.mountpoint) {
                if self.ended.load(Ordering::SeqCst) {
                    break;
                }
                self.readiness.ready(&self.mountpoint);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// Unmounts a mount that [`serve`] serves, so that `serve` returns.
pub struct MountControl {
    unmounter: fuser::SessionUnmounter,
    mountpoint: PathBuf,
    readiness: Arc<Readiness>,
    umask: libc::mode_t,
}

impl MountControl {
    /// The control of a session mounted at `mountpoint` (by `serve`, or by `walfs
    /// follow`).
    pub fn new(
        unmounter: fuser::SessionUnmounter,
        mountpoint: PathBuf,
        readiness: Arc<Readiness>,
    ) -> MountControl {
        // Read from /proc, not by setting it and back, which would race with threads
        // creating files.
        let umask = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| libc::mode_t::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022);
        MountControl {
            unmounter,
            mountpoint,
            readiness,
            umask,
        }
    }

    /// The umask walfs was started with (the daemon runs with 0; a command it starts
    /// should get this one back).
    pub fn umask(&self) -> libc::mode_t {
        self.umask
    }

    /// The canonical mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts: tells systemd STOPPING=1 and removes the ready file, then unmounts,
    /// retrying for `grace` while files are open under the mount, and detaches it lazily
    /// after that (the session ends when the last of them is closed).
    pub fn unmount(mut self, grace: Duration) {
        self.readiness.stopping();
        let start = std::time::Instant::now();
        loop {
            match self.unmounter.unmount() {
                Ok(()) => return,
                Err(_) if !is_mountpoint(&self.mountpoint) => return,
                Err(e) if start.elapsed() >= grace => {
                    tracing::warn!(
                        "cannot unmount {} ({e}): files are still open under it; detaching it lazily",
                        self.mountpoint.display()
                    );
                    let _ = detach(&self.mountpoint);
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

/// Mounts and serves until unmounted. Once the mount answers a request it is ready:
/// `READY=1` to `$NOTIFY_SOCKET` and the `--ready-file` ([`Serving::wait`], which the
/// `supervisor`, if any, calls). Without a supervisor SIGINT and SIGTERM unmount.
pub fn serve(opts: &MountOptions, supervisor: Option<Supervisor>) -> MountResult<()> {
    let (backing, mountpoint) = preflight(opts)?;
    // Bound before anything starts: a bad address or a port in use is a one-line error.
    let metrics_endpoint = match &opts.metrics_addr {
        Some(addr) => Some(MetricsEndpoint::bind(addr).map_err(MountError::Setup)?),
        None => None,
    };
    raise_open_file_limit();
    // The kernel applies the caller's umask before a create request reaches walfs; the
    // daemon's own umask must not mask the mode a second time.
    // SAFETY: umask cannot fail.
    let umask = unsafe { libc::umask(0) };

    let io_mode = if opts.no_passthrough {
        IoMode::PageCache
    } else if has_cap_sys_admin() {
        IoMode::Passthrough
    } else {
        tracing::warn!(
            "no CAP_SYS_ADMIN: kernel passthrough is off and file I/O goes through walfs (slower); run as root or grant CAP_SYS_ADMIN for native speed"
        );
        IoMode::PageCache
    };
    let config = FsConfig {
        read_only: opts.read_only,
        io_mode,
        cache_ttl: opts.cache_ttl,
        database_io: opts.database_io,
    };
    let replication = if opts.replication.replicas.is_empty() {
        None
    } else {
        Some(Replication::start(
            &backing,
            &mountpoint,
            &opts.replication,
        )?)
    };
    let observer: Arc<dyn Observer> = match &replication {
        Some(r) => r.observer(),
        None => Arc::new(NoObserver),
    };
    let fs = Arc::new(PassthroughFs::new(&backing, config, observer).map_err(|e| {
        MountError::Context {
            what: format!("cannot open backing directory {}", backing.display()),
            source: e,
        }
    })?);
    let metrics = Arc::new(Metrics::default());
    let view = MountView {
        backing: backing.clone(),
        mountpoint: mountpoint.clone(),
        fs: metrics.clone(),
        replication: replication.as_ref().map(Replication::view),
    };

    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = vec![
        MountOption::FSName(format!("walfs:{}", backing.display())),
        MountOption::Subtype("walfs".into()),
        // The kernel checks permissions against the backing file's attributes, as the
        // backing filesystem would.
        MountOption::DefaultPermissions,
        if opts.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    fuse_config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuse_config.n_threads = Some(opts.threads);
    fuse_config.clone_fd = true;

    let mut session = fuser::Session::new(
        FuseAdapter::new(fs.clone(), metrics),
        &mountpoint,
        &fuse_config,
    )
    .map_err(|e| mount_failed(e, &mountpoint))?;
    tracing::info!(
        backing = %backing.display(),
        mountpoint = %mountpoint.display(),
        passthrough = fs.passthrough_enabled(),
        threads = opts.threads,
        "mounted"
    );
    let metrics_server = match metrics_endpoint {
        Some(e) => Some(e.serve(view.clone()).map_err(|e| MountError::Context {
            what: "cannot start the metrics server".into(),
            source: e,
        })?),
        None => None,
    };
    // `walfs status` asks here; a mount that cannot listen still serves its files.
    let status_server = match StatusServer::start(view) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                socket = %socket_path(&mountpoint).display(),
                "cannot listen for `walfs status`: {e}; the mount goes on without it"
            );
            None
        }
    };
    let readiness = Arc::new(Readiness::new(opts.ready_file.clone()));
    let ended = Arc::new(AtomicBool::new(false));
    let control = MountControl {
        unmounter: session.unmount_callable(),
        mountpoint: mountpoint.clone(),
        readiness: readiness.clone(),
        umask,
    };
    let supervisor = match supervisor {
        None => {
            unmount_on_signal(control, mountpoint.clone())?;
            None
        }
        Some(s) => Some((s, control)),
    };
    let serving = Serving {
        mountpoint: mountpoint.clone(),
        ended: ended.clone(),
        readiness: readiness.clone(),
    };
    std::thread::Builder::new()
        .name("walfs-ready".into())
        .spawn(move || match supervisor {
            Some((s, control)) => s(control, serving),
            None => {
                serving.wait();
            }
        })?;
    let served = match session.run() {
        // The kernel ended the connection (an unmount, ours on a signal or `fusermount3
        // -u`, or an abort): a read in flight may see ECONNABORTED instead of the ENODEV
        // that fuser takes for the end. Either way fuser has unmounted what was left.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            tracing::debug!("the kernel aborted the FUSE connection");
            Ok(())
        }
        r => r.map_err(|e| MountError::Context {
            what: "FUSE session failed".into(),
            source: e,
        }),
    };
    ended.store(true, Ordering::SeqCst);
    readiness.stopping();
    if let Some(s) = status_server {
        s.stop();
    }
    if let Some(s) = metrics_server {
        s.stop();
    }
    if let Some(r) = replication {
        r.stop();
    }
    served?;
    tracing::info!(mountpoint = %mountpoint.display(), "walfs stopped");
    Ok(())
}

/// Why `walfs mount` failed.
///
/// `Replication` and `Io` are transparent (they print as the error they wrap, and
/// `source()` is its source); `Context` prints only its own text and returns the error it
/// wraps from `source()`, so `{:#}` prints "what: cause".
#[derive(Debug)]
pub enum MountError {
    /// The set-up is wrong: a one-line message that says what to do.
    Setup(String),
    /// Replication could not start.
    Replication(ReplicationError),
    /// An I/O error with nothing to add (resolving a path, reading a directory, ...).
    Io(io::Error),
    /// `what` failed because of `source`.
    Context { what: String, source: io::Error },
}

/// The result of a step of `walfs mount`.
pub type MountResult<T> = Result<T, MountError>;

impl fmt::Display for MountError {
    /// One line; with `{:#}`, followed by each cause, joined by ": ".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MountError::Setup(m) => f.write_str(m)?,
            MountError::Replication(e) => write!(f, "{e}")?,
            MountError::Io(e) => write!(f, "{e}")?,
            MountError::Context { what, .. } => f.write_str(what)?,
        }
        if f.alternate() {
            write_causes(f, self)?;
        }
        Ok(())
    }
}

impl std::error::Error for MountError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MountError::Setup(_) => None,
            MountError::Replication(e) => e.source(),
            MountError::Io(e) => e.source(),
            MountError::Context { source, .. } => Some(source),
        }
    }
}

impl From<ReplicationError> for MountError {
    fn from(e: ReplicationError) -> Self {
        MountError::Replication(e)
    }
}

impl From<io::Error> for MountError {
    fn from(e: io::Error) -> Self {
        MountError::Io(e)
    }
}

/// Validates the set-up and returns the canonical backing directory and mountpoint.
fn preflight(opts: &MountOptions) -> MountResult<(PathBuf, PathBuf)> {
    if opts.replication.sync.enabled() && opts.replication.replicas.is_empty() {
        return Err(MountError::Setup(
            "--sync-replication and --sync-database make commits wait for a replica, and none is given; add --replica URL".into(),
        ));
    }
    if !opts.replication.encryption.encryption_key_files.is_empty()
        && opts.replication.replicas.is_empty()
    {
        return Err(MountError::Setup(
            "--encryption-key-file encrypts what is written to a replica, and none is given; add --replica URL".into(),
        ));
    }
    let backing = &opts.backing;
    match std::fs::metadata(backing) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(MountError::Setup(format!(
                "backing path {} is not a directory; give the directory that holds your data",
                backing.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::Setup(format!(
                "backing directory {} does not exist; create it first (mkdir -p {})",
                backing.display(),
                backing.display()
            )))
        }
        Err(e) => {
            return Err(MountError::Setup(format!(
                "cannot use backing directory {}: {e}",
                backing.display()
            )))
        }
    }
    let backing = std::fs::canonicalize(backing)?;
    let mountpoint = check_mountpoint(&opts.mountpoint)?;

    if mountpoint.starts_with(&backing) {
        return Err(MountError::Setup(format!(
            "mountpoint {} is inside backing directory {}; that would loop: put the mountpoint elsewhere",
            mountpoint.display(),
            backing.display()
        )));
    }
    if backing.starts_with(&mountpoint) {
        return Err(MountError::Setup(format!(
            "backing directory {} is inside mountpoint {}; that would loop: put the backing directory elsewhere",
            backing.display(),
            mountpoint.display()
        )));
    }
    check_empty(&mountpoint, opts.allow_nonempty)?;
    check_fuse_device()?;
    Ok((backing, mountpoint))
}

/// Checks that `mountpoint` can be mounted on (an existing directory, not mounted),
/// cleaning a stale mount a dead daemon left; its canonical path.
pub fn check_mountpoint(mountpoint: &Path) -> MountResult<PathBuf> {
    let mountpoint = absolute(mountpoint)?;
    match std::fs::metadata(&mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            clean_stale_mount(&mountpoint)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::Setup(format!(
                "mountpoint {} does not exist; create it first (mkdir -p {})",
                mountpoint.display(),
                mountpoint.display()
            )))
        }
        Err(e) => {
            return Err(MountError::Setup(format!(
                "cannot use mountpoint {}: {e}",
                mountpoint.display()
            )))
        }
        Ok(m) if !m.is_dir() => {
            return Err(MountError::Setup(format!(
                "mountpoint {} is not a directory; give an empty directory",
                mountpoint.display()
            )))
        }
        Ok(_) => {
            // A mount whose daemon died a moment ago still answers stat from the kernel's
            // attribute cache (for up to --cache-ttl): only a fresh GETATTR tells.
            if is_mountpoint(&mountpoint) && is_dead_fuse_mount(&mountpoint) {
                clean_stale_mount(&mountpoint)?;
            } else if is_mountpoint(&mountpoint) {
                return Err(MountError::Setup(format!(
                    "mountpoint {} is already mounted; unmount it first (fusermount3 -u {})",
                    mountpoint.display(),
                    mountpoint.display()
                )));
            }
        }
    }
    Ok(std::fs::canonicalize(&mountpoint)?)
}

/// Checks that a mount on `mountpoint` would hide nothing, unless `allow_nonempty`.
pub fn check_empty(mountpoint: &Path, allow_nonempty: bool) -> MountResult<()> {
    if !allow_nonempty && std::fs::read_dir(mountpoint)?.next().is_some() {
        return Err(MountError::Setup(format!(
            "mountpoint {} is busy: it is not empty and the mount would hide its files; empty it or pass --allow-nonempty",
            mountpoint.display()
        )));
    }
    Ok(())
}

/// Checks that this process can make a FUSE mount: `/dev/fuse`, and `fusermount3` or root.
pub fn check_fuse_device() -> MountResult<()> {
    match std::fs::metadata("/dev/fuse") {
        Ok(m) if m.file_type().is_char_device() => {}
        _ => {
            return Err(MountError::Setup(
                "/dev/fuse is missing: install the fuse3 package (apt-get install fuse3) and load the module (modprobe fuse); in Docker pass --device /dev/fuse --cap-add SYS_ADMIN"
                    .into(),
            ))
        }
    }
    // SAFETY: plain getter.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && find_in_path("fusermount3").is_none() {
        return Err(MountError::Setup(
            "fusermount3 not found: install the fuse3 package (apt-get install fuse3), or run walfs as root"
                .into(),
        ));
    }
    // SAFETY: valid C string; access() only reads it.
    if !root && unsafe { libc::access(c"/dev/fuse".as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
        return Err(MountError::Setup(
            "/dev/fuse is not accessible to this user: make it mode 0666 (the fuse3 default: chmod 0666 /dev/fuse), or run walfs as root"
                .into(),
        ));
    }
    Ok(())
}

/// `path` made absolute without resolving its last component (which may be a dead mount).
fn absolute(path: &Path) -> MountResult<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => match std::fs::canonicalize(parent) {
            Ok(p) => Ok(p.join(name)),
            Err(_) => Ok(abs),
        },
        _ => Ok(abs),
    }
}

/// True if `path` is the mountpoint of some mount in this namespace.
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .map(|p| Path::new(&unescape_mountinfo(p)) == path)
            .unwrap_or(false)
    })
}

/// True if `path` is a FUSE mount whose daemon is gone: a stat that bypasses the attribute
/// cache (`AT_STATX_FORCE_SYNC`) fails with ENOTCONN.
fn is_dead_fuse_mount(path: &Path) -> bool {
    let Ok(c) = crate::fs::sys::cstr(path.as_os_str()) else {
        return false;
    };
    // SAFETY: an all-zero statx is a valid out buffer.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid path string and out buffer.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_TYPE,
            &mut buf,
        )
    };
    r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

/// Detaches a mount whose daemon died ("transport endpoint is not connected").
fn clean_stale_mount(mountpoint: &Path) -> MountResult<()> {
    tracing::warn!(
        mountpoint = %mountpoint.display(),
        "found a stale mount left by a daemon that died; cleaning it"
    );
    if detach(mountpoint).is_err() {
        let status = std::process::Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(mountpoint)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            return Err(MountError::Setup(format!(
                "mountpoint {} holds a stale mount that walfs cannot remove; run: fusermount3 -uz {}",
                mountpoint.display(),
                mountpoint.display()
            )));
        }
    }
    Ok(())
}

fn detach(mountpoint: &Path) -> io::Result<()> {
    let c = crate::fs::sys::cstr(mountpoint.as_os_str())?;
    // SAFETY: valid path string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The one-line error of a mount the kernel refused.
pub fn mount_failed(e: io::Error, mountpoint: &Path) -> MountError {
    MountError::Setup(match e.raw_os_error() {
        Some(libc::EBUSY) => format!(
            "mountpoint {} is busy; stop what is using it, or pick another directory",
            mountpoint.display()
        ),
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "not permitted to mount at {}: run as root, or install fuse3 so fusermount3 can mount for you ({e})",
            mountpoint.display()
        ),
        _ => format!("cannot mount at {}: {e}", mountpoint.display()),
    })
}

/// On SIGINT or SIGTERM: unmount, so the session ends and the process exits 0. If the
/// mount is still there a few seconds later (files held open under it, or an unmount that
/// did not take), detach it lazily and exit anyway.
pub fn unmount_on_signal(control: MountControl, mountpoint: PathBuf) -> MountResult<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("walfs-signals".into())
        .spawn(move || {
            let Some(sig) = signals.forever().next() else {
                return;
            };
            tracing::info!(signal = sig, "unmounting");
            let MountControl {
                mut unmounter,
                readiness,
                ..
            } = control;
            readiness.stopping();
            if let Err(e) = unmounter.unmount() {
                tracing::warn!("unmount failed ({e}): files are still open under the mountpoint");
            }
            // The session ends, and the process with it, once the kernel lets go. Still
            // here after the grace period means it did not.
            std::thread::sleep(Duration::from_secs(3));
            if !is_mountpoint(&mountpoint) {
                // Unmounted: the main thread is finishing (flushing uploads, say).
                return;
            }
            tracing::warn!("the mount did not go away; detaching it lazily and exiting");
            if detach(&mountpoint).is_err() {
                let _ = std::process::Command::new("fusermount3")
                    .args(["-u", "-z"])
                    .arg(&mountpoint)
                    .status();
            }
            tracing::info!("walfs stopped");
            std::process::exit(0);
        })?;
    Ok(())
}

fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Each node the kernel knows holds one descriptor (a follower's database two, more while
/// old versions are read); allow as many as the hard limit.
pub fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer, then the same struct back in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
    })
}

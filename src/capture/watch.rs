//! Capture between SQLite's barriers: watches the backing directories of captured
//! databases with inotify and reads a database's `-wal` when it changed.
//!
//! With `synchronous=NORMAL`, commits are not fsynced, so the next barrier may be a
//! checkpoint minutes later. Passthrough writes raise modify events on the backing files;
//! the watcher collects them, lets them coalesce for a short window (the kernel merges
//! repeated events while they wait), and then polls each changed database once. Idle
//! databases cost nothing: no timer polls them.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use super::{database_of, wal_path, Capture};

/// How often the watcher looks for newly captured databases' directories and for a stop.
const TICK: Duration = Duration::from_millis(200);

/// The WAL watcher of one mount.
pub struct WalWatcher {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl WalWatcher {
    /// Starts watching for `capture`; changed databases are polled at most once per
    /// `coalesce`.
    pub fn start(capture: Arc<Capture>, coalesce: Duration) -> std::io::Result<WalWatcher> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("walfs-watch".into())
                .spawn(move || Watch::new(capture, inotify, coalesce).run(&stop))?
        };
        Ok(WalWatcher { stop, thread })
    }

    /// Stops the watcher and waits for it.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

struct Watch {
    capture: Arc<Capture>,
    inotify: Inotify,
    coalesce: Duration,
    /// Watched directories (relative to the backing root) by descriptor.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// The registry generation the watches were last brought up to date with.
    generation: u64,
    /// The databases captured as of that generation.
    known: BTreeSet<PathBuf>,
}

impl Watch {
    fn new(capture: Arc<Capture>, inotify: Inotify, coalesce: Duration) -> Watch {
        Watch {
            capture,
            inotify,
            coalesce,
            dirs: HashMap::new(),
            generation: u64::MAX,
            known: BTreeSet::new(),
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut changed = BTreeSet::new();
        while !stop.load(Ordering::Relaxed) {
            // A database registered since the last round may have committed before its
            // directory was watched (no event came for that): read it once now.
            changed.extend(self.update_watches());
            if !changed.is_empty() {
                self.poll_changed(&mut changed);
            }
            let ready = {
                let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
                let timeout =
                    PollTimeout::try_from(TICK.as_millis() as i32).unwrap_or(PollTimeout::MAX);
                poll(&mut fds, timeout).unwrap_or(0)
            };
            if ready == 0 {
                continue;
            }
            // Let the writes of this burst arrive (and merge), then read them all.
            std::thread::sleep(self.coalesce);
            self.drain(&mut changed);
            self.poll_changed(&mut changed);
        }
    }

    /// Reads the `-wal` of each database in `changed`, and empties it.
    fn poll_changed(&self, changed: &mut BTreeSet<PathBuf>) {
        for db in std::mem::take(changed) {
            if let Err(e) = self.capture.on_changed(&wal_path(&db)) {
                tracing::warn!(db = %db.display(), "capture between barriers failed (the next barrier retries): {e}");
            }
        }
    }

    /// Reads the queued events into `changed` (databases whose `-wal` was modified).
    fn drain(&mut self, changed: &mut BTreeSet<PathBuf>) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(ev) => ev,
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(e) => {
                    tracing::warn!("reading inotify events failed: {e}");
                    return;
                }
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The directory went away; watch it again if it comes back.
                    self.dirs.remove(&ev.wd);
                    self.generation = u64::MAX;
                    continue;
                }
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events were lost: poll every captured database.
                    changed.extend(self.capture.databases());
                    continue;
                }
                let (Some(dir), Some(name)) = (self.dirs.get(&ev.wd), ev.name.as_ref()) else {
                    continue;
                };
                if !name.as_bytes().ends_with(b"-wal") {
                    continue;
                }
                if let Some((db, true)) = database_of(&dir.join(name)) {
                    changed.insert(db);
                }
            }
        }
    }

    /// Watches the directory of every captured database (once per registry change).
    /// Returns the databases captured since the last change.
    fn update_watches(&mut self) -> BTreeSet<PathBuf> {
        let generation = self.capture.generation();
        if generation == self.generation {
            return BTreeSet::new();
        }
        self.generation = generation;
        let dbs: BTreeSet<PathBuf> = self.capture.databases().into_iter().collect();
        let new: BTreeSet<PathBuf> = dbs.difference(&self.known).cloned().collect();
        let wanted: BTreeSet<PathBuf> = dbs
            .iter()
            .map(|db| db.parent().map(PathBuf::from).unwrap_or_default())
            .collect();
        self.known = dbs;
        let watched: BTreeSet<PathBuf> = self.dirs.values().cloned().collect();
        for dir in wanted.difference(&watched) {
            let path = self.capture.root().join(dir);
            match self.inotify.add_watch(&path, AddWatchFlags::IN_MODIFY) {
                Ok(wd) => {
                    self.dirs.insert(wd, dir.clone());
                }
                Err(e) => tracing::warn!(
                    dir = %path.display(),
                    "cannot watch for WAL changes ({e}); commits there are captured at SQLite's barriers only"
                ),
            }
        }
        new
    }
}

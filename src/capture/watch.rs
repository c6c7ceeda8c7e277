//! Capture between SQLite's barriers: watches the backing directories of captured
//! databases with inotify and reads a database's `-wal` when it changed.
//!
//! With `synchronous=NORMAL`, commits are not fsynced, so the next barrier may be a
//! checkpoint minutes later. Passthrough writes raise modify events on the backing files;
//! the watcher collects them, lets them coalesce for a short window (the kernel merges
//! repeated events while they wait), and then polls each changed database once.
//!
//! Every modify event costs the writing application a little (the kernel builds and
//! queues it inside the write: about 6% of a small-transaction writer's time). So once a
//! directory's databases are being written, the watcher stops asking for modify events
//! there and polls those databases every coalescing window instead, until they have had
//! no new commit for `QUIET`; then it asks for the events again and polls once more, so
//! that a commit made in between is not missed. Idle databases cost nothing: no timer
//! polls them.
//!
//! Each round also retries the snapshot of any database whose history waits to restart
//! ([`Capture::retry_restarts`]), so that one restarts once its files read consistently,
//! and wakes the uploader for databases whose staged batches could not be sealed
//! ([`Capture::retry_seals`]).
//!
//! A `-wal` fsync outside a barrier (most often a checkpoint's first step) wakes the
//! watcher at once, at most once per window. It reads that WAL beside the checkpoint's
//! backfill, so that the database fsync that ends the checkpoint finds little left to read
//! while the application waits.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use parking_lot::Mutex;

use super::{database_of, wal_path, Barrier, Capture, CaptureEvent, WatcherWake};

/// How often the watcher looks for newly captured databases' directories and for a stop.
const TICK: Duration = Duration::from_millis(200);

/// How long a directory's databases are polled without a new commit before the watcher
/// goes back to modify events for it.
const QUIET: Duration = Duration::from_millis(100);

/// The events asked for on a directory whose databases are being polled: none that a
/// write raises (a watch needs at least one event).
const POLLING_MASK: AddWatchFlags = AddWatchFlags::IN_DELETE_SELF;

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
        let wake = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        capture.set_wake(WatcherWake {
            fd: wake.clone(),
            interval: coalesce,
            last: Mutex::new(None),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("walfs-watch".into())
                .spawn(move || Watch::new(capture, inotify, wake, coalesce).run(&stop))?
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
    /// Signalled by [`Capture::wal_synced`].
    wake: Arc<EventFd>,
    coalesce: Duration,
    /// Watched directories (relative to the backing root) by descriptor.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// Directories whose databases are polled instead of raising modify events, with the
    /// number of polls in a row that found no new commit.
    polling: HashMap<WatchDescriptor, u32>,
    /// The registry generation the watches were last brought up to date with.
    generation: u64,
    /// The databases captured as of that generation.
    known: BTreeSet<PathBuf>,
}

impl Watch {
    fn new(
        capture: Arc<Capture>,
        inotify: Inotify,
        wake: Arc<EventFd>,
        coalesce: Duration,
    ) -> Watch {
        Watch {
            capture,
            inotify,
            wake,
            coalesce,
            dirs: HashMap::new(),
            polling: HashMap::new(),
            generation: u64::MAX,
            known: BTreeSet::new(),
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut changed = BTreeSet::new();
        let quiet_polls = (QUIET.as_millis() / self.coalesce.as_millis().max(1)).max(1) as u32;
        while !stop.load(Ordering::Relaxed) {
            // A database registered since the last round may have committed before its
            // directory was watched (no event came for that): read it once now.
            changed.extend(self.update_watches());
            if !changed.is_empty() {
                self.poll_changed(&mut changed);
            }
            // Databases whose history waits to restart from a snapshot: try again, so that
            // they restart without waiting for a write.
            self.capture.retry_restarts();
            // Databases whose staged batches could not be sealed for upload: again.
            self.capture.retry_seals();
            let wait = if self.polling.is_empty() {
                TICK
            } else {
                self.coalesce
            };
            let (events, woken) = {
                let mut fds = [
                    PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
                ];
                let timeout =
                    PollTimeout::try_from(wait.as_millis() as i32).unwrap_or(PollTimeout::MAX);
                if poll(&mut fds, timeout).unwrap_or(0) > 0 {
                    let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
                    (ready(&fds[0]), ready(&fds[1]))
                } else {
                    (false, false)
                }
            };
            if woken {
                // A `-wal` was fsynced (a checkpoint is starting): read it now, and start
                // making it durable while the checkpoint backfills.
                let _ = self.wake.read();
                for db in self.capture.take_synced_wals() {
                    changed.remove(&db);
                    self.read(&db);
                }
                self.poll_changed(&mut changed);
                if !events {
                    continue;
                }
            }
            if events {
                // Let the writes of this burst arrive (and merge), then read them all.
                std::thread::sleep(self.coalesce);
                for wd in self.drain(&mut changed) {
                    self.start_polling(wd);
                }
            }
            self.poll_polling(&mut changed, quiet_polls);
            self.poll_changed(&mut changed);
        }
    }

    /// Stops modify events on the directory `wd`: its databases are polled from now on.
    fn start_polling(&mut self, wd: WatchDescriptor) {
        if self.polling.contains_key(&wd) {
            return;
        }
        let Some(dir) = self.dirs.get(&wd) else {
            return;
        };
        let path = self.capture.root().join(dir);
        // A different descriptor means the directory was renamed or replaced: leave it
        // to modify events until the next registry update.
        if self.inotify.add_watch(&path, POLLING_MASK).ok() == Some(wd) {
            self.polling.insert(wd, 0);
        }
    }

    /// Polls the databases of every polled directory (those read here leave `changed`);
    /// a directory quiet for `quiet_polls` polls in a row raises modify events again, and
    /// its databases go into `changed` to be read once more after that.
    fn poll_polling(&mut self, changed: &mut BTreeSet<PathBuf>, quiet_polls: u32) {
        let wds: Vec<WatchDescriptor> = self.polling.keys().copied().collect();
        for wd in wds {
            let Some(dir) = self.dirs.get(&wd).cloned() else {
                self.polling.remove(&wd);
                continue;
            };
            let mut committed = false;
            for db in self.databases_in(&dir) {
                changed.remove(&db);
                committed |= self.read(&db);
            }
            let quiet = self.polling.entry(wd).or_insert(0);
            *quiet = if committed { 0 } else { *quiet + 1 };
            if *quiet < quiet_polls {
                continue;
            }
            self.polling.remove(&wd);
            let path = self.capture.root().join(&dir);
            if let Err(e) = self.inotify.add_watch(&path, AddWatchFlags::IN_MODIFY) {
                tracing::warn!(dir = %path.display(), "cannot watch for WAL changes again ({e}); commits there are captured at SQLite's barriers only");
            }
            // A commit after the last poll raised no event: read once more.
            changed.extend(self.databases_in(&dir));
        }
    }

    /// The captured databases directly in `dir`.
    fn databases_in(&self, dir: &Path) -> Vec<PathBuf> {
        self.known
            .iter()
            .filter(|db| db.parent().unwrap_or(Path::new("")) == dir)
            .cloned()
            .collect()
    }

    /// Reads the `-wal` of `db`; true if that staged something.
    fn read(&self, db: &Path) -> bool {
        match self.capture.on(&wal_path(db), Barrier::WalChanged) {
            Ok(events) => events
                .iter()
                .any(|e| !matches!(e, CaptureEvent::Waiting { .. })),
            Err(e) => {
                tracing::warn!(db = %db.display(), "capture between barriers failed (the next barrier retries): {e}");
                false
            }
        }
    }

    /// Reads the `-wal` of each database in `changed`, and empties it.
    fn poll_changed(&self, changed: &mut BTreeSet<PathBuf>) {
        for db in std::mem::take(changed) {
            self.read(&db);
        }
    }

    /// Reads the queued events into `changed` (databases whose `-wal` was modified).
    /// Returns the directories those databases are in.
    fn drain(&mut self, changed: &mut BTreeSet<PathBuf>) -> BTreeSet<WatchDescriptor> {
        let mut written = BTreeSet::new();
        loop {
            let events = match self.inotify.read_events() {
                Ok(ev) => ev,
                Err(nix::errno::Errno::EAGAIN) => return written,
                Err(e) => {
                    tracing::warn!("reading inotify events failed: {e}");
                    return written;
                }
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The directory went away; watch it again if it comes back.
                    self.dirs.remove(&ev.wd);
                    self.polling.remove(&ev.wd);
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
                    written.insert(ev.wd);
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

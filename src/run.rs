//! `walfs run`: the container entrypoint. This file owns [`run_command`] and [`RunError`]:
//! restore BACKING from the replica if it holds no database and the replica holds some
//! (Litestream's `restore -if-db-not-exists -if-replica-exists`), mount, start the command
//! once the mount serves, forward SIGTERM, SIGINT and SIGHUP to it, and when it exits
//! unmount (which uploads what is pending) and exit with its status (Litestream's
//! `replicate -exec`).

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::mount::{serve, MountControl, MountError, MountOptions, Serving};
use crate::replica::crypt::EncryptionArgs;
use crate::replica::error::write_causes;
use crate::replica::url::ReplicaUrl;
use crate::replicate::staging_dir;
use crate::restore::apply::RestoreOutcome;
use crate::restore::{open_replica, restore_outcomes, runtime, RestoreArgs, RestoreError};
use crate::sqlite::is_sqlite;
use crate::staging::{DbState, Staging};

/// How long the command has to exit after SIGTERM when the mount went away under it,
/// before SIGKILL; and how long an unmount waits for files still open under the mount.
const GRACE: Duration = Duration::from_secs(10);

/// Why `walfs run` failed (the command's own exit status is not an error).
///
/// `Mount` and `Restore` are transparent (they print as the error they wrap); `Command`
/// prints its own text and returns the I/O error from `source()`.
#[derive(Debug)]
pub enum RunError {
    /// The set-up is wrong, or the mount went away under the command: one line that says
    /// what to do.
    Setup(String),
    /// Mounting or serving failed.
    Mount(MountError),
    /// The restore before the mount failed.
    Restore(RestoreError),
    /// The command could not be started (or signals could not be taken over).
    Command { what: String, source: io::Error },
}

/// The result of a step of `walfs run`.
pub type RunResult<T> = Result<T, RunError>;

impl fmt::Display for RunError {
    /// One line; with `{:#}`, followed by each cause, joined by ": ".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Setup(m) => f.write_str(m)?,
            RunError::Mount(e) => write!(f, "{e}")?,
            RunError::Restore(e) => write!(f, "{e}")?,
            RunError::Command { what, .. } => f.write_str(what)?,
        }
        if f.alternate() {
            write_causes(f, self)?;
        }
        Ok(())
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RunError::Setup(_) => None,
            RunError::Mount(e) => e.source(),
            RunError::Restore(e) => e.source(),
            RunError::Command { source, .. } => Some(source),
        }
    }
}

impl From<MountError> for RunError {
    fn from(e: MountError) -> Self {
        RunError::Mount(e)
    }
}

impl From<RestoreError> for RunError {
    fn from(e: RestoreError) -> Self {
        RunError::Restore(e)
    }
}

/// The command's life, shared by the signal thread, the thread that runs it, and the
/// main thread.
#[derive(Default)]
struct Child {
    state: Mutex<ChildState>,
    changed: Condvar,
}

#[derive(Default)]
struct ChildState {
    /// The command's process, while it runs.
    pid: Option<libc::pid_t>,
    /// A signal that came before the command started: it is not started.
    early_signal: Option<i32>,
    /// The means to unmount, until the command starts (a signal before then unmounts).
    control: Option<MountControl>,
    /// How the command ended.
    status: Option<ExitStatus>,
    /// Why the command could not be started.
    spawn_error: Option<io::Error>,
}

impl Child {
    /// Forwards `sig` to the command; before it starts, remembers `sig` (so that it never
    /// starts) and unmounts if mounted.
    fn signal(&self, sig: i32) {
        let mut s = self.state.lock();
        match s.pid {
            Some(pid) => {
                tracing::info!(signal = sig, pid, "forwarding the signal to the command");
                // SAFETY: kill has no memory effects; `pid` is our child, not yet reaped
                // (the status is recorded under this lock right after the reap).
                unsafe { libc::kill(pid, sig) };
            }
            None if s.status.is_none() && s.early_signal.is_none() => {
                tracing::info!(signal = sig, "signal before the command started: stopping");
                s.early_signal = Some(sig);
                let control = s.control.take();
                drop(s);
                if let Some(c) = control {
                    c.unmount(GRACE);
                }
            }
            None => {}
        }
    }

    /// Waits until the command ended, for at most `limit`; whether it did.
    fn wait_ended(&self, limit: Duration) -> bool {
        let mut s = self.state.lock();
        let deadline = std::time::Instant::now() + limit;
        while s.pid.is_some() {
            if self.changed.wait_until(&mut s, deadline).timed_out() {
                return s.pid.is_none();
            }
        }
        true
    }
}

/// `walfs run` (see the module documentation): returns the exit status to leave with,
/// the command's (128 + N if a signal N killed it).
pub fn run_command(opts: &MountOptions, command: &[OsString]) -> RunResult<u8> {
    let Some(program) = command.first() else {
        return Err(RunError::Setup(
            "give the command to run after --: walfs run BACKING MOUNTPOINT -- CMD ARGS...".into(),
        ));
    };
    let name = program.to_string_lossy().into_owned();
    // From here on SIGTERM, SIGINT and SIGHUP are the command's: forwarded, or, before it
    // starts, a reason not to start it.
    let child = Arc::new(Child::default());
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|e| {
            RunError::Command {
                what: "cannot take over SIGTERM, SIGINT and SIGHUP".into(),
                source: e,
            }
        })?;
    let signal_handle = signals.handle();
    {
        let child = child.clone();
        std::thread::Builder::new()
            .name("walfs-forward".into())
            .spawn(move || {
                for sig in signals.forever() {
                    child.signal(sig);
                }
            })
            .map_err(|e| RunError::Command {
                what: "cannot start the signal thread".into(),
                source: e,
            })?;
    }

    restore_if_empty(opts)?;
    if let Some(sig) = child.state.lock().early_signal {
        signal_handle.close();
        return Ok(128u8.saturating_add(sig as u8));
    }

    let supervised = {
        let (child, command) = (child.clone(), command.to_vec());
        Box::new(move |control: MountControl, serving: Serving| {
            supervise(control, serving, &command, &child)
        })
    };
    let served = serve(opts, Some(supervised));
    signal_handle.close();

    // The mount is gone. If the command still runs, the mount went away under it.
    let stopped = child.state.lock().pid.is_some();
    if stopped {
        stop_command(&child);
    }
    served?;
    let s = child.state.lock();
    if let Some(e) = s.spawn_error.as_ref() {
        return Err(RunError::Command {
            what: format!("cannot start the command {name:?}"),
            source: io::Error::new(e.kind(), e.to_string()),
        });
    }
    if stopped {
        return Err(RunError::Setup(format!(
            "the mount at {} went away while the command ran (unmounted from outside, or its FUSE session ended), so the command was stopped; see the log above",
            opts.mountpoint.display()
        )));
    }
    match (s.status, s.early_signal) {
        (Some(status), _) => Ok(exit_code(status)),
        (None, Some(sig)) => Ok(128u8.saturating_add(sig as u8)),
        (None, None) => Err(RunError::Setup(format!(
            "the mount at {} went away before it served, so the command was not started; see the log above",
            opts.mountpoint.display()
        ))),
    }
}

/// The exit status of a shell for a command that ended with `status`.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
        (None, None) => 1,
    }
}

/// Runs on a thread of its own once mounted: waits until the mount serves, starts the
/// command (unless a signal came first), waits for it, then unmounts.
fn supervise(control: MountControl, serving: Serving, command: &[OsString], child: &Child) {
    let umask = control.umask();
    child.state.lock().control = Some(control);
    if !serving.wait() {
        return;
    }
    let started = {
        let mut s = child.state.lock();
        if s.early_signal.is_some() {
            return;
        }
        let mut cmd = std::process::Command::new(&command[0]);
        cmd.args(&command[1..]);
        // SAFETY: umask is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(umask);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(c) => {
                // Only the program: its arguments may hold secrets.
                tracing::info!(pid = c.id(), program = ?command[0], "started the command");
                s.pid = Some(c.id() as libc::pid_t);
                Some(c)
            }
            Err(e) => {
                tracing::error!("cannot start the command {:?}: {e}", command[0]);
                s.spawn_error = Some(e);
                None
            }
        }
    };
    if let Some(mut c) = started {
        let status = c.wait();
        let mut s = child.state.lock();
        s.pid = None;
        match status {
            Ok(status) => {
                tracing::info!(%status, "the command exited; uploading what is pending and unmounting");
                s.status = Some(status);
            }
            Err(e) => {
                tracing::error!("cannot wait for the command: {e}");
                s.status = Some(ExitStatus::from_raw(1 << 8));
            }
        }
        child.changed.notify_all();
    }
    let control = child.state.lock().control.take();
    if let Some(c) = control {
        c.unmount(GRACE);
    }
}

/// The mount went away while the command runs: SIGTERM, then SIGKILL after [`GRACE`].
fn stop_command(child: &Child) {
    tracing::error!("the mount went away while the command runs: stopping it");
    child.signal(SIGTERM);
    if !child.wait_ended(GRACE) {
        child.signal(libc::SIGKILL);
        child.wait_ended(GRACE);
    }
}

/// Restores every database of a replica into BACKING if BACKING holds none and a replica
/// holds some: the first replica that answers and holds databases, in `--replica` order
/// (a replica that cannot be listed is skipped, with a WARN, so that a second replica
/// covers an outage of the first); otherwise logs why not.
fn restore_if_empty(opts: &MountOptions) -> RunResult<()> {
    if opts.replication.replicas.is_empty() {
        tracing::info!("no --replica: nothing to restore from");
        return Ok(());
    }
    let backing = &opts.backing;
    if !backing.is_dir() {
        // The mount's checks say what to do.
        return Ok(());
    }
    if let Some(db) = find_database(backing).map_err(|e| RunError::Command {
        what: format!("cannot read backing directory {}", backing.display()),
        source: e,
    })? {
        tracing::info!(
            "backing directory {} already holds databases ({} ...): no restore",
            backing.display(),
            db.display()
        );
        return Ok(());
    }
    let mut first_error = None;
    for url in &opts.replication.replicas {
        match databases_of(url, &opts.replication.encryption) {
            Ok(Some(dbs)) => {
                tracing::info!(
                    "backing directory {} holds no database: restoring {} from replica {}",
                    backing.display(),
                    dbs,
                    ReplicaUrl::parse(url).map_err(RestoreError::from)?
                );
                let restored = restore_outcomes(&RestoreArgs {
                    url: url.clone(),
                    output: backing.clone(),
                    db: None,
                    force: false,
                    txid: None,
                    timestamp: None,
                    no_integrity_check: false,
                    encryption: opts.replication.encryption.clone(),
                })?;
                return continue_history(opts, &restored);
            }
            Ok(None) => {}
            Err(e @ RunError::Setup(_)) => return Err(e),
            Err(e) => {
                let more = opts.replication.replicas.len() > 1;
                if more {
                    tracing::warn!("{e}; trying the next replica");
                }
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        // No replica could say whether it holds databases.
        Some(e) if opts.replication.replicas.len() == 1 => Err(e),
        Some(e) => Err(RunError::Setup(format!(
            "a replica cannot be read ({e}) and no other holds databases to restore: check the replicas, or start with a database in BACKING"
        ))),
        None => {
            match opts.replication.replicas.as_slice() {
                [one] => tracing::info!(
                    "replica {} holds no databases yet: nothing to restore",
                    ReplicaUrl::parse(one).map_err(RestoreError::from)?
                ),
                all => tracing::info!(
                    "none of the {} replicas holds databases yet: nothing to restore",
                    all.len()
                ),
            }
            Ok(())
        }
    }
}

/// How many databases the replica at `url` holds (`None`: none, or it does not exist yet);
/// an error if it cannot be listed or is not a mount's replica.
fn databases_of(url: &str, encryption: &EncryptionArgs) -> RunResult<Option<usize>> {
    let parsed = ReplicaUrl::parse(url).map_err(RestoreError::from)?;
    if let ReplicaUrl::File(f) = &parsed {
        if !f.dir.is_dir() {
            return Ok(None);
        }
    }
    let (_, store, _) = open_replica(url, encryption)?;
    let dbs = runtime()?
        .block_on(store.list_databases())
        .map_err(RestoreError::from)?;
    if dbs.iter().any(String::is_empty) {
        return Err(RunError::Setup(format!(
            "replica {parsed} holds a single database at its root, not a mount's replica: restore it with walfs restore -o BACKING/NAME.db first"
        )));
    }
    Ok((!dbs.is_empty()).then_some(dbs.len()))
}

/// Tells staging that each restored database is the replica's state at the restored
/// TXID, so that the mount continues the replica's history (its next commit gets the next
/// TXID) instead of starting a new one at TXID 1 next to it. Capture checks the file
/// against this state when it starts, and snapshots it (at a TXID after the replica's) if
/// it differs.
fn continue_history(opts: &MountOptions, restored: &[RestoreOutcome]) -> RunResult<()> {
    let backing = std::fs::canonicalize(&opts.backing).map_err(|e| RunError::Command {
        what: format!("cannot resolve {}", opts.backing.display()),
        source: e,
    })?;
    let dir = staging_dir(&backing, &opts.replication);
    let staging_failed = |e: &dyn fmt::Display| {
        RunError::Setup(format!(
            "cannot record the restored state in staging directory {}: {e}; give a writable one with --staging-dir",
            dir.display()
        ))
    };
    let staging = Staging::open(&dir).map_err(|e| staging_failed(&e))?;
    for o in restored {
        let rel = Path::new(&o.db);
        if staging
            .state(rel)
            .map_err(|e| staging_failed(&e))?
            .is_some()
        {
            // Staging already follows this database (a kept staging directory with a lost
            // backing): capture reconciles the two when it starts.
            continue;
        }
        let state = DbState {
            txid: o.txid,
            page_size: o.page_size,
            commit: o.commit,
            checksum: o.checksum,
            wal: None,
            uploaded_txid: o.txid,
        };
        staging
            .save_state(rel, &state)
            .map_err(|e| staging_failed(&e))?;
    }
    Ok(())
}

/// The first SQLite database (by its header) under `dir`, not following symbolic links.
fn find_database(dir: &Path) -> io::Result<Option<PathBuf>> {
    use std::io::Read;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                let mut head = [0u8; 100];
                let Ok(mut f) = std::fs::File::open(entry.path()) else {
                    continue;
                };
                if f.read_exact(&mut head).is_ok() && is_sqlite(&head) {
                    return Ok(Some(entry.path()));
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_as_a_shell_reports_them() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        // Killed by SIGTERM (15): 143.
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
    }

    #[test]
    fn finds_a_database_below_other_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_database(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join("notes.txt"), b"not a database at all").unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        assert_eq!(find_database(dir.path()).unwrap(), None);
        let db = dir.path().join("a/b/app.db");
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE t(x)")
            .unwrap();
        assert_eq!(find_database(dir.path()).unwrap(), Some(db));
    }
}

//! The status socket of a running mount and `walfs status`. The mount listens on a Unix
//! socket whose path follows from the mountpoint alone ([`socket_path`]: in `/run/walfs`
//! for root, else in `$XDG_RUNTIME_DIR/walfs`; the directory is 0700 and the socket
//! 0600), so that `walfs status MOUNTPOINT` finds it whatever `--staging-dir` says, and a
//! mount without replicas (no staging directory) answers too. A client writes `status\n`
//! and reads one JSON [`Status`]; the connection then closes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{MountView, Status};

/// Socket paths must fit `sockaddr_un` (108 bytes with its NUL); longer names are hashed.
const MAX_SOCKET_PATH: usize = 100;

/// How long `walfs status` waits for the mount's answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit code of `walfs status` when some replica is behind longer than `--max-lag`.
pub const EXIT_BEHIND: u8 = 1;
/// Exit code of `walfs status` when no walfs mount answers at the path.
pub const EXIT_NOT_RUNNING: u8 = 3;

/// The directory of the status sockets: `/run/walfs` for root, else
/// `$XDG_RUNTIME_DIR/walfs` (or `/tmp/walfs-UID`).
pub fn socket_dir() -> PathBuf {
    // SAFETY: plain getter.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/walfs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("walfs"),
        _ => PathBuf::from(format!("/tmp/walfs-{uid}")),
    }
}

/// The status socket of the mount at `mountpoint` (canonical): its path with `/` turned
/// into `%`, or a hash of it when that would be too long for a socket address.
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let dir = socket_dir();
    let name = format!(
        "{}.sock",
        mountpoint
            .to_string_lossy()
            .trim_start_matches('/')
            .replace('/', "%")
    );
    if dir.as_os_str().len() + 1 + name.len() <= MAX_SOCKET_PATH {
        return dir.join(name);
    }
    let hash = blake3::hash(mountpoint.as_os_str().as_encoded_bytes());
    dir.join(format!("{}.sock", &hash.to_hex()[..32]))
}

/// The status socket of a running mount; [`StatusServer::stop`] removes it.
pub struct StatusServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StatusServer {
    /// Listens at [`socket_path`] of the view's mountpoint and answers from `view`. A
    /// socket left by a mount that died is replaced.
    pub fn start(view: MountView) -> std::io::Result<StatusServer> {
        let path = socket_path(&view.mountpoint);
        let dir = path.parent().expect("a socket path has a directory");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        // Only its owner may reach the sockets, whatever the directory was created with.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("walfs-status".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        if let Ok(conn) = conn {
                            if let Err(e) = answer(conn, &view) {
                                tracing::debug!("status request failed: {e}");
                            }
                        }
                    }
                })?
        };
        Ok(StatusServer {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops answering and removes the socket.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn answer(conn: UnixStream, view: &MountView) -> std::io::Result<()> {
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let mut out = &conn;
    if line.trim() == "status" {
        let json = serde_json::to_string(&view.status()).map_err(std::io::Error::other)?;
        out.write_all(json.as_bytes())?;
        out.write_all(b"\n")?;
    } else {
        out.write_all(b"{\"error\":\"unknown request; send status\"}\n")?;
    }
    Ok(())
}

/// Why `walfs status` got no status.
#[derive(Debug)]
pub struct NotRunning(pub String);

/// Asks the mount at `mountpoint` for its status.
pub fn query(mountpoint: &Path) -> Result<Status, NotRunning> {
    let canonical = std::fs::canonicalize(mountpoint).map_err(|e| {
        NotRunning(format!(
            "{}: {e}; give the mountpoint of a running walfs mount",
            mountpoint.display()
        ))
    })?;
    let path = socket_path(&canonical);
    let not_running = |why: String| {
        NotRunning(format!(
            "no walfs mount answers at {} ({why}); is `walfs mount` running there?",
            canonical.display()
        ))
    };
    let conn = UnixStream::connect(&path)
        .map_err(|e| not_running(format!("status socket {}: {e}", path.display())))?;
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(CLIENT_TIMEOUT)))
        .map_err(|e| not_running(e.to_string()))?;
    (&conn)
        .write_all(b"status\n")
        .map_err(|e| not_running(format!("cannot ask: {e}")))?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .map_err(|e| not_running(format!("no answer: {e}")))?;
    serde_json::from_str(&line).map_err(|e| not_running(format!("a bad answer: {e}")))
}

/// The human table of `walfs status`.
pub fn table(status: &Status) -> String {
    let mut out = format!(
        "walfs mount {} (backing {})\n",
        status.mountpoint.display(),
        status.backing.display()
    );
    if status.replicas.is_empty() {
        out.push_str("no replicas: nothing is replicated\n");
        return out;
    }
    out.push_str(&format!("staging: {} bytes\n", status.staging_bytes));
    let mut rows = vec![[
        "DATABASE".to_string(),
        "TXID".into(),
        "PENDING".into(),
        "REPLICA".into(),
        "REPLICA TXID".into(),
        "LAG".into(),
        "LAST UPLOAD".into(),
        "LAST ERROR".into(),
    ]];
    for d in &status.databases {
        for r in &d.replicas {
            rows.push([
                d.path.display().to_string(),
                d.txid.to_string(),
                d.pending_bytes.to_string(),
                r.replica.clone(),
                r.txid.to_string(),
                format!("{:.1}s", r.lag_seconds),
                r.last_upload.clone().unwrap_or_else(|| "-".into()),
                r.last_error.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
    }
    if status.databases.is_empty() {
        out.push_str("no databases yet\n");
        return out;
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_fit_and_differ() {
        let a = socket_path(Path::new("/mnt/data"));
        assert!(a.ends_with("mnt%data.sock"), "{}", a.display());
        let long = PathBuf::from(format!("/{}", "x".repeat(200)));
        let b = socket_path(&long);
        assert!(b.as_os_str().len() <= MAX_SOCKET_PATH, "{}", b.display());
        assert_ne!(
            b,
            socket_path(&PathBuf::from(format!("/{}", "y".repeat(200))))
        );
    }
}

//! Readiness: telling others that a mount serves. This file owns [`Readiness`] (systemd's
//! `sd_notify` protocol on `$NOTIFY_SOCKET`, `READY=1` and `STOPPING=1`, and the
//! `--ready-file`), [`answers`] and [`is_walfs_mount`] (the checks that a path is a serving
//! walfs mount), and `walfs wait` ([`WaitArgs`], [`wait_command`]).

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The environment variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (e.g. `READY=1`) to the socket that `$NOTIFY_SOCKET` names, if set: a
/// path, or an abstract name written `@name`. Returns whether it was sent.
pub fn sd_notify(state: &str) -> io::Result<bool> {
    let Some(name) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let addr = notify_addr(Path::new(&name))?;
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

fn notify_addr(name: &Path) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    match name.as_os_str().as_bytes() {
        [b'@', rest @ ..] => SocketAddr::from_abstract_name(rest),
        [] => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is empty",
        )),
        _ => SocketAddr::from_pathname(name),
    }
}

/// The readiness of one mount: `READY=1` and the ready file once it serves, `STOPPING=1`
/// and the file's removal once it starts to stop (each once). Dropping it removes the file.
#[derive(Debug)]
pub struct Readiness {
    ready_file: Option<PathBuf>,
    ready: AtomicBool,
    stopping: AtomicBool,
    /// Serialises writing and removing the file.
    lock: Mutex<()>,
}

impl Readiness {
    /// Readiness that writes `ready_file`, if given, once ready.
    pub fn new(ready_file: Option<PathBuf>) -> Readiness {
        Readiness {
            ready_file,
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            lock: Mutex::new(()),
        }
    }

    /// The mount serves: tell systemd and write the ready file (atomically: a temporary
    /// file renamed into place). Does nothing once stopping.
    pub fn ready(&self, mountpoint: &Path) {
        let _g = self.lock.lock();
        if self.stopping.load(Ordering::SeqCst) || self.ready.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(path) = &self.ready_file {
            if let Err(e) = write_atomically(path, format!("{}\n", mountpoint.display())) {
                tracing::warn!("cannot write the ready file {}: {e}", path.display());
            }
        }
        notify_logged("READY=1");
        tracing::info!(mountpoint = %mountpoint.display(), "ready");
    }

    /// The mount starts to stop: tell systemd and remove the ready file.
    pub fn stopping(&self) {
        let _g = self.lock.lock();
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        self.remove_file();
        notify_logged("STOPPING=1");
    }

    fn remove_file(&self) {
        if let Some(path) = &self.ready_file {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    tracing::warn!("cannot remove the ready file {}: {e}", path.display())
                }
                _ => {}
            }
        }
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        if self.ready.load(Ordering::SeqCst) {
            self.remove_file();
        }
    }
}

fn notify_logged(state: &str) {
    match sd_notify(state) {
        Ok(true) => tracing::debug!("told systemd {state}"),
        Ok(false) => {}
        Err(e) => tracing::warn!("cannot send {state} to $NOTIFY_SOCKET: {e}"),
    }
}

/// Writes `text` to `path` through a temporary file in the same directory and a rename, so
/// that a reader sees the whole file or none.
fn write_atomically(path: &Path, text: String) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// True if a stat of `path` that bypasses the kernel's attribute cache
/// (`AT_STATX_FORCE_SYNC`) succeeds: on a FUSE mount, the daemon answered a request.
pub fn answers(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statx is a valid out buffer.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid path string and out buffer.
    unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_TYPE,
            &mut buf,
        ) == 0
    }
}

/// True if `/proc/self/mountinfo` shows a walfs mount at `path` (an absolute path without
/// symbolic links): type `fuse.walfs` (mounted through fusermount3), or type `fuse` with
/// a source `walfs:BACKING` (mounted by root directly, which sets no subtype).
pub fn is_walfs_mount(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| walfs_mount_in(&info, path))
}

/// True if the mountinfo text `info` shows a walfs mount at `path`.
fn walfs_mount_in(info: &str, path: &Path) -> bool {
    info.lines().any(|line| {
        // "id parent major:minor root mountpoint options [optional...] - fstype source ..."
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            return false;
        };
        let at = left.split(' ').nth(4).map(unescape_mountinfo);
        let mut fields = right.split(' ');
        let (fstype, source) = (fields.next(), fields.next().unwrap_or(""));
        at.as_deref().map(Path::new) == Some(path)
            && match fstype {
                Some("fuse.walfs") => true,
                Some("fuse") => source.starts_with("walfs:"),
                _ => false,
            }
    })
}

/// A mountinfo field with its octal escapes (`\040` for a space, ...) decoded.
pub fn unescape_mountinfo(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The arguments of `walfs wait` (each field's doc comment is its `--help` text).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct WaitArgs {
    /// The mountpoint of a `walfs mount` (or `walfs run`) to wait for.
    pub mountpoint: PathBuf,
    /// Give up after this long (e.g. 30s, 2m) and exit non-zero.
    #[arg(long, default_value = "30s", value_parser = crate::flags::duration)]
    pub timeout: Duration,
}

/// `walfs wait`: returns once `args.mountpoint` is a walfs mount that answers a stat, or an
/// error of one line that says what to check once the timeout passed.
pub fn wait_command(args: &WaitArgs) -> Result<(), String> {
    let start = Instant::now();
    let mut seen_mount = false;
    loop {
        // Resolved each time: the path may appear after we start.
        let path = std::fs::canonicalize(&args.mountpoint).unwrap_or(args.mountpoint.clone());
        if is_walfs_mount(&path) {
            seen_mount = true;
            if answers(&path) {
                return Ok(());
            }
        }
        if start.elapsed() >= args.timeout {
            let what = if seen_mount {
                "is a walfs mount that does not answer (its daemon is stuck or gone; check its log, or clean it with fusermount3 -uz)"
            } else {
                "is not a walfs mount: check that `walfs mount` (or `walfs run`) was started with this mountpoint and look at its log"
            };
            return Err(format!(
                "{} is not ready after {:?}: it {what}",
                args.mountpoint.display(),
                args.timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abstract_and_path_notify_addresses() {
        use std::os::linux::net::SocketAddrExt;
        let a = notify_addr(Path::new("@walfs/test")).unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"walfs/test"[..]));
        let p = notify_addr(Path::new("/run/systemd/notify")).unwrap();
        assert_eq!(p.as_pathname(), Some(Path::new("/run/systemd/notify")));
        assert!(notify_addr(Path::new("")).is_err());
    }

    #[test]
    fn ready_file_is_written_once_and_removed_on_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ready");
        let r = Readiness::new(Some(file.clone()));
        assert!(!file.exists());
        r.ready(Path::new("/mnt/x"));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "/mnt/x\n");
        // Only the file is left: the temporary one was renamed.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        r.stopping();
        assert!(!file.exists());
        // Not ready again once stopping.
        r.ready(Path::new("/mnt/x"));
        assert!(!file.exists());
    }

    #[test]
    fn walfs_mounts_in_mountinfo() {
        let info = "61 27 0:55 / /tmp/a\\040b rw,nosuid - fuse walfs:/srv/data rw,user_id=0\n\
                    62 27 0:56 / /mnt/user rw - fuse.walfs walfs:/home/u/d rw\n\
                    63 27 0:57 / /mnt/other rw - fuse sshfs#host: rw\n\
                    64 27 0:58 / /mnt/tmp rw - tmpfs walfs:/x rw\n";
        assert!(walfs_mount_in(info, Path::new("/tmp/a b")));
        assert!(walfs_mount_in(info, Path::new("/mnt/user")));
        assert!(!walfs_mount_in(info, Path::new("/mnt/other")));
        assert!(!walfs_mount_in(info, Path::new("/mnt/tmp")));
        assert!(!walfs_mount_in(info, Path::new("/mnt")));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}

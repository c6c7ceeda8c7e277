//! Shared harness for the integration tests: builds on the `walfs` binary that cargo
//! builds for integration tests, mounts a real FUSE filesystem over a temporary backing
//! directory, and unmounts it on drop. A test that cannot mount panics: FUSE tests never
//! skip.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const WALFS: &str = env!("CARGO_BIN_EXE_walfs");

/// A running `walfs mount` over a temporary backing directory.
pub struct Mount {
    pub root: tempfile::TempDir,
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub child: Option<Child>,
}

impl Mount {
    /// Mounts a fresh, empty backing directory.
    pub fn new() -> Mount {
        Mount::with_args(&[])
    }

    /// Mounts a fresh backing directory with extra `walfs mount` arguments.
    pub fn with_args(args: &[&str]) -> Mount {
        let root = tempfile::Builder::new()
            .prefix("walfs-test-")
            .tempdir()
            .expect("create temp dir");
        let backing = root.path().join("backing");
        let mountpoint = root.path().join("mnt");
        std::fs::create_dir(&backing).unwrap();
        std::fs::create_dir(&mountpoint).unwrap();
        let mut m = Mount {
            root,
            backing,
            mountpoint,
            child: None,
        };
        m.start(args);
        m
    }

    /// Starts (or restarts) the daemon on the same backing directory and mountpoint.
    pub fn start(&mut self, args: &[&str]) {
        let child = Command::new(WALFS)
            .arg("mount")
            .arg(&self.backing)
            .arg(&self.mountpoint)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn walfs");
        self.child = Some(child);
        wait_mounted(&self.mountpoint, self.child.as_mut().unwrap());
    }

    /// Path of `rel` under the mountpoint.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// Path of `rel` in the backing directory.
    pub fn backing_path(&self, rel: &str) -> PathBuf {
        self.backing.join(rel)
    }

    /// Sends SIGTERM and waits for a clean exit; returns the daemon's stderr.
    pub fn stop(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return String::new();
        };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(&mut child, Duration::from_secs(15))
            .expect("walfs did not exit within 15 s of SIGTERM");
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).ok();
        assert!(status.success(), "walfs exited with {status}: {err}");
        assert!(!is_mounted(&self.mountpoint), "still mounted after SIGTERM");
        err
    }

    /// Kills the daemon with SIGKILL, leaving a stale mount behind.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
                child.kill().ok();
                child.wait().ok();
            }
        }
        if is_mounted(&self.mountpoint) {
            Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status()
                .ok();
        }
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// True if `path` is a mountpoint in this mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(|p| Path::new(&unescape_mount_path(p)) == canon)
            .unwrap_or(false)
    })
}

fn unescape_mount_path(p: &str) -> String {
    p.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Waits until `mountpoint` is a FUSE mount served by `child`; panics (never skips) if the
/// daemon exits or the mount does not appear.
pub fn wait_mounted(mountpoint: &Path, child: &mut Child) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            panic!("walfs mount exited with {status} before mounting: {err}");
        }
        if is_mounted(mountpoint) && std::fs::metadata(mountpoint).is_ok() {
            return;
        }
        if start.elapsed() > Duration::from_secs(20) {
            panic!("walfs did not mount {} within 20 s", mountpoint.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the `sqlite3` CLI on `db` with `sql` on stdin (batch mode, stop at the first error).
pub fn run_sqlite3(db: &Path, sql: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new("sqlite3")
        .arg("-batch")
        .arg("-bail")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sqlite3 (apt-get install sqlite3)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Runs the `sqlite3` CLI on `db` with `sql` on stdin and returns stdout; panics on failure.
pub fn sqlite3(db: &Path, sql: &str) -> String {
    let out = run_sqlite3(db, sql);
    assert!(
        out.status.success(),
        "sqlite3 {} failed: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A tool that `scripts/test` installs: `$env_var` if set, else `cache_rel` under
/// `$XDG_CACHE_HOME/walfs` (or `~/.cache/walfs`). Panics, never skips, if it is missing.
pub fn installed_tool(env_var: &str, cache_rel: &str) -> PathBuf {
    let path = match std::env::var_os(env_var) {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .expect("neither XDG_CACHE_HOME nor HOME is set")
            .join("walfs")
            .join(cache_rel),
    };
    assert!(
        path.is_file(),
        "{} not found: run scripts/test, which installs it, or set {env_var}",
        path.display()
    );
    path
}

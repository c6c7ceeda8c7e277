//! Shared harness for the integration tests: builds on the `walfs` binary that cargo
//! builds for integration tests, mounts a real FUSE filesystem over a temporary backing
//! directory, and unmounts it on drop. A test that cannot mount panics: FUSE tests never
//! skip.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod azurite;
pub mod fake_gcs;
pub mod fault_proxy;
pub mod scrape;

pub const WALFS: &str = env!("CARGO_BIN_EXE_walfs");

/// A running `walfs mount` over a temporary backing directory.
pub struct Mount {
    pub root: tempfile::TempDir,
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub child: Option<Child>,
    /// Extra environment of the daemon (for every start).
    env: Vec<(String, String)>,
    /// The daemon's stderr, when collected in the background (see [`Mount::with_env`]).
    log: Option<Arc<Mutex<Vec<u8>>>>,
    log_thread: Option<JoinHandle<()>>,
}

impl Mount {
    /// Mounts a fresh, empty backing directory.
    pub fn new() -> Mount {
        Mount::with_args(&[])
    }

    /// Mounts a fresh backing directory with extra `walfs mount` arguments.
    pub fn with_args(args: &[&str]) -> Mount {
        Mount::create(args, &[], false)
    }

    /// Mounts a fresh backing directory with extra arguments and extra environment for the
    /// daemon. Its stderr is collected in the background (so a daemon that logs a lot never
    /// blocks on a full pipe); [`Mount::log`] reads it, and `child.stderr` stays empty.
    pub fn with_env(args: &[&str], env: &[(&str, &str)]) -> Mount {
        Mount::create(args, env, true)
    }

    /// A fresh backing directory and mountpoint, not mounted yet (e.g. to mount a small
    /// tmpfs on the backing directory first); [`Mount::start`] mounts it, with its stderr
    /// collected as with [`Mount::with_env`].
    pub fn prepare(env: &[(&str, &str)]) -> Mount {
        Mount::create_unstarted(env, true)
    }

    fn create(args: &[&str], env: &[(&str, &str)], collect_log: bool) -> Mount {
        let mut m = Mount::create_unstarted(env, collect_log);
        m.start(args);
        m
    }

    fn create_unstarted(env: &[(&str, &str)], collect_log: bool) -> Mount {
        let root = tempfile::Builder::new()
            .prefix("walfs-test-")
            .tempdir()
            .expect("create temp dir");
        let backing = root.path().join("backing");
        let mountpoint = root.path().join("mnt");
        std::fs::create_dir(&backing).unwrap();
        std::fs::create_dir(&mountpoint).unwrap();
        Mount {
            root,
            backing,
            mountpoint,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: collect_log.then(Default::default),
            log_thread: None,
        }
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
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn walfs");
        self.child = Some(child);
        let Some(log) = self.log.clone() else {
            wait_mounted(&self.mountpoint, self.child.as_mut().unwrap());
            return;
        };
        if let Some(t) = self.log_thread.take() {
            t.join().ok();
        }
        let mut pipe = self.child.as_mut().unwrap().stderr.take().unwrap();
        self.log_thread = Some(std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        }));
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.log_thread.take().unwrap().join().ok();
                panic!(
                    "walfs mount exited with {status} before mounting: {}",
                    self.log()
                );
            }
            if is_mounted(&self.mountpoint) && answers(&self.mountpoint) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "walfs did not mount {} within 20 s: {}",
                self.mountpoint.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the daemon wrote to stderr so far (all its starts), when collected in the
    /// background ([`Mount::with_env`]); else empty.
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .map(|l| String::from_utf8_lossy(&l.lock().unwrap()).into_owned())
            .unwrap_or_default()
    }

    /// The collected log once `ready` holds for it, or as it is after `timeout` (a reader
    /// thread collects the daemon's stderr, so a line written just now may not be in
    /// [`Mount::log`] yet).
    #[allow(dead_code)]
    pub fn log_when(&self, timeout: Duration, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if ready(&log) || Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's stderr up to now: the collected log, or what the pipe holds once the
    /// daemon has exited.
    pub fn take_stderr(&mut self, child: &mut Child) -> String {
        if let Some(mut pipe) = child.stderr.take() {
            let mut err = String::new();
            pipe.read_to_string(&mut err).ok();
            return err;
        }
        if let Some(t) = self.log_thread.take() {
            t.join().ok();
        }
        self.log()
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
        let Some(status) = wait_timeout(&mut child, Duration::from_secs(15)) else {
            child.kill().ok();
            child.wait().ok();
            panic!(
                "walfs did not exit within 15 s of SIGTERM: {}",
                self.take_stderr(&mut child)
            );
        };
        let err = self.take_stderr(&mut child);
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
        end_daemon(self.child.take(), &self.mountpoint);
    }
}

/// Ends a walfs daemon a test left running (SIGTERM, SIGKILL after 10 s) and detaches
/// its mount if it is still there.
pub fn end_daemon(child: Option<Child>, mountpoint: &Path) {
    if let Some(mut child) = child {
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        if wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
            child.kill().ok();
            child.wait().ok();
        }
    }
    if is_mounted(mountpoint) {
        Command::new("umount")
            .arg("-l")
            .arg(mountpoint)
            .status()
            .ok();
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

/// True if a stat of `path` that bypasses the kernel's attribute cache succeeds: a FUSE
/// mount whose daemon died still answers a plain stat from the cache for a moment.
pub fn answers(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
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
        if is_mounted(mountpoint) && answers(mountpoint) {
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

/// The `litestream` binary (0.5.17) that `scripts/test` installs.
pub fn litestream() -> PathBuf {
    installed_tool("LITESTREAM", "venv/bin/litestream")
}

/// Runs `litestream restore -o OUT URL` (a `file://` or `s3://` URL of one database's
/// replica), with `env` added; panics with its log if it fails. `AWS_CA_BUNDLE` is removed
/// from its environment: with it set, litestream fails against a plain-HTTP endpoint.
pub fn litestream_restore(url: &str, out: &Path, env: &[(&str, &str)]) {
    let o = Command::new(litestream())
        .arg("restore")
        .arg("-o")
        .arg(out)
        .arg(url)
        .env_remove("AWS_CA_BUNDLE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "litestream restore {url} failed: {}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
}

/// Runs `walfs restore ARGS` with `env` added, requires success, and returns its stderr.
pub fn walfs_restore_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let o = Command::new(WALFS)
        .arg("restore")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "walfs restore {args:?} failed: {err}");
    err
}

/// Runs `walfs restore ARGS`, requires success, and returns its stderr.
pub fn walfs_restore(args: &[&str]) -> String {
    walfs_restore_env(args, &[])
}

/// The page size recorded in a database file's header.
fn header_page_size(path: &Path) -> usize {
    let mut h = [0u8; 100];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut h))
        .unwrap_or_else(|e| panic!("cannot read the header of {}: {e}", path.display()));
    assert_eq!(
        &h[..16],
        b"SQLite format 3\0",
        "{} is not an SQLite database",
        path.display()
    );
    match u16::from_be_bytes([h[16], h[17]]) {
        1 => 65536,
        n => n as usize,
    }
}

/// Asserts that database file `restored` holds exactly the pages of `source` (compared
/// page by page, streaming, so it suits databases of gigabytes) and passes
/// `PRAGMA integrity_check`. On a difference the message names the differing pages and
/// shows sqldiff's view of it.
pub fn assert_same_database(source: &Path, restored: &Path) {
    let page_size = header_page_size(source);
    let (len_a, len_b) = (
        std::fs::metadata(source).unwrap().len(),
        std::fs::metadata(restored).unwrap().len(),
    );
    let mut differing = Vec::new();
    let mut count = 0u64;
    {
        let mut a =
            std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(source).unwrap());
        let mut b =
            std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(restored).unwrap());
        let (mut pa, mut pb) = (vec![0u8; page_size], vec![0u8; page_size]);
        let pages = len_a.min(len_b) / page_size as u64;
        for pgno in 1..=pages {
            a.read_exact(&mut pa).unwrap();
            b.read_exact(&mut pb).unwrap();
            if pa != pb {
                count += 1;
                if differing.len() < 20 {
                    differing.push(pgno);
                }
            }
        }
        // A partial page at the end (never in a valid database) is compared too.
        let (mut ta, mut tb) = (Vec::new(), Vec::new());
        a.read_to_end(&mut ta).unwrap();
        b.read_to_end(&mut tb).unwrap();
        if len_a == len_b && ta != tb {
            count += 1;
            differing.push(pages + 1);
        }
    }
    if len_a != len_b || count > 0 {
        let diff = Command::new("sqldiff")
            .arg(source)
            .arg(restored)
            .output()
            .map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                s.chars().take(4000).collect::<String>()
            })
            .unwrap_or_else(|e| format!("(sqldiff did not run: {e})"));
        panic!(
            "{} ({len_a} bytes) and {} ({len_b} bytes) differ: {count} of the common pages \
             (page size {page_size}) differ, first {differing:?}; sqldiff says:\n{diff}",
            source.display(),
            restored.display()
        );
    }
    assert_eq!(
        sqlite3(restored, "PRAGMA integrity_check;"),
        "ok\n",
        "integrity_check of {}",
        restored.display()
    );
}

/// The S3 bucket the tests' moto_server holds.
pub const BUCKET: &str = "walfs-test";

/// A raw HTTP/1.1 request to 127.0.0.1:port; returns (status, headers, body). moto does not
/// check signatures, so unsigned requests do for bucket setup and independent checks.
pub fn http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of HTTP headers"))?;
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, head, buf[split + 4..].to_vec()))
}

/// `moto_server` (PyPI `moto[server]`), from `$MOTO_SERVER` or the venv scripts/test makes.
pub fn moto_server_path() -> PathBuf {
    installed_tool("MOTO_SERVER", "venv/bin/moto_server")
}

/// A running moto_server on a free port of 127.0.0.1, holding bucket [`BUCKET`]; killed on
/// drop. Its log (one line per request it served) is kept, so tests can count the requests
/// it received.
pub struct Moto {
    child: Child,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl Moto {
    pub fn start() -> Moto {
        let bin = moto_server_path();
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut moto = Moto { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, ..)) = http(port, "GET", "/") {
                break;
            }
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("moto_server exited with {status}: {}", moto.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on port {port} within 60 s: {}",
                moto.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let (status, head, _) = http(port, "PUT", &format!("/{BUCKET}")).unwrap();
        assert_eq!(status, 200, "create bucket: {head}");
        moto
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// The requests the server has answered so far, as logged: `"METHOD /path HTTP/1.1"`.
    pub fn requests(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter_map(|l| {
                let start = l.find("] \"")? + 3;
                let rest = &l[start..];
                let end = rest.find(" HTTP/")?;
                Some(rest[..end].to_string())
            })
            .collect()
    }

    /// Waits until the server has answered no new request for `quiet`; returns the number
    /// of requests then. Fails after `limit`, showing the last requests.
    pub fn wait_settled(&self, quiet: Duration, limit: Duration) -> usize {
        let start = Instant::now();
        let mut n = self.requests().len();
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.requests().len();
            if now != n {
                n = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return n;
            }
            assert!(
                start.elapsed() < limit,
                "requests did not settle within {limit:?}: {:?}",
                &self.requests()[n.saturating_sub(20)..]
            );
        }
    }

    /// The `s3://` URL of `prefix` in the bucket, served by this server at `port` (the
    /// server's own port, or a proxy's), with Litestream's query keys.
    pub fn s3_url_via(&self, port: u16, prefix: &str) -> String {
        format!(
            "s3://{BUCKET}/{prefix}?endpoint=http://127.0.0.1:{port}&region=us-east-1&forcePathStyle=true"
        )
    }

    /// The `s3://` URL of `prefix` in the bucket on this server.
    pub fn s3_url(&self, prefix: &str) -> String {
        self.s3_url_via(self.port, prefix)
    }

    /// The [`ReplicaUrl`](walfs::replica::url::ReplicaUrl) of `prefix` on this server,
    /// with [`S3_ENV`]'s credentials.
    pub fn replica_url(&self, prefix: &str) -> walfs::replica::url::ReplicaUrl {
        walfs::replica::url::ReplicaUrl::parse_with_env(&self.s3_url(prefix), |k| {
            S3_ENV
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        })
        .unwrap()
    }

    /// Runs a Python `script` with boto3 from moto_server's venv, an S3 client independent
    /// of walfs's that signs its requests (moto refuses unsigned reads of objects). The
    /// script finds `boto3`, `json`, `sys` imported and `s3` a client of this server.
    pub fn boto3(&self, script: &str) -> std::process::Output {
        let python = moto_server_path().with_file_name("python3");
        let prelude = format!(
            "import boto3, json, sys\n\
             s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', region_name='us-east-1', \
             aws_access_key_id='testing', aws_secret_access_key='testing')\n",
            self.port
        );
        Command::new(&python)
            .arg("-c")
            .arg(prelude + script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()))
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Forwards 127.0.0.1:`on` to 127.0.0.1:`port` from now on: a store that nothing answered
/// for on `on` "comes back" (with `Moto::s3_url_via(on, ...)`).
pub fn forward(on: u16, port: u16) {
    let listener = TcpListener::bind(("127.0.0.1", on)).unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else {
                continue;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut c, mut s) = (client, server);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c, &mut s);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().unwrap().port()
}

/// Dummy credentials for moto, as a child's environment.
pub const S3_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
];

/// `args` as the `&str`s that [`Mount`] and `Command` take.
pub fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// What a test that replicates to S3 starts from: a moto server, a replica prefix in its
/// bucket, and a temporary directory that holds the staging directory and the files the
/// test writes (restores, copies).
pub struct S3Fixture {
    pub moto: Moto,
    pub prefix: String,
    pub dir: tempfile::TempDir,
}

impl S3Fixture {
    pub fn new(prefix: &str) -> S3Fixture {
        S3Fixture {
            moto: Moto::start(),
            prefix: prefix.into(),
            dir: tempfile::Builder::new()
                .prefix("walfs-s3-test-")
                .tempdir()
                .unwrap(),
        }
    }

    /// The replica root URL, straight to moto.
    pub fn url(&self) -> String {
        self.moto.s3_url(&self.prefix)
    }

    /// The URL of `db`'s own replica (what `litestream restore` takes).
    pub fn db_url(&self, db: &str) -> String {
        self.moto.s3_url(&format!("{}/{db}", self.prefix))
    }

    pub fn staging(&self) -> PathBuf {
        self.dir.path().join("staging")
    }

    /// `walfs mount` arguments replicating to `url` (a URL of this fixture's replica, e.g.
    /// through a proxy), staging in this fixture's directory, then `extra`.
    pub fn args_to(&self, url: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--replica".into(),
            url.into(),
            "--staging-dir".into(),
            self.staging().display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// `walfs mount` arguments replicating to [`S3Fixture::url`], then `extra`.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        self.args_to(&self.url(), extra)
    }

    /// A fresh mount replicating to this replica, with moto's credentials and its log
    /// collected.
    pub fn mount(&self, extra: &[&str]) -> Mount {
        Mount::with_env(&as_strs(&self.args(extra)), S3_ENV)
    }

    /// Starts `m` again (stopped or killed) with [`S3Fixture::args`]`(extra)`.
    pub fn restart(&self, m: &mut Mount, extra: &[&str]) {
        m.start(&as_strs(&self.args(extra)));
    }

    /// Path `name` under the fixture's `out` directory, its parent created.
    pub fn out(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("out").join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        p
    }

    /// `walfs restore URL --db DB -o out(NAME) EXTRA...` into a fresh file: the file and
    /// walfs's report (stderr), or the report if it failed.
    pub fn try_restore(
        &self,
        db: &str,
        name: &str,
        extra: &[&str],
    ) -> Result<(PathBuf, String), String> {
        let out = self.out(name);
        let _ = std::fs::remove_file(&out);
        let o = Command::new(WALFS)
            .args(["restore", &self.url(), "--db", db, "-o"])
            .arg(&out)
            .args(extra)
            .envs(S3_ENV.iter().copied())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        if o.status.success() {
            Ok((out, log))
        } else {
            Err(log)
        }
    }

    /// [`S3Fixture::try_restore`], required to succeed and to be verified against the
    /// writer's checksum record. Returns the file and walfs's report.
    pub fn restore(&self, db: &str, name: &str, extra: &[&str]) -> (PathBuf, String) {
        let (out, log) = self
            .try_restore(db, name, extra)
            .unwrap_or_else(|log| panic!("walfs restore of {db} {extra:?} failed: {log}"));
        assert!(
            log.contains("content checksum matches the writer's record"),
            "restore of {db} {extra:?} was not verified against the recorded checksum: {log}"
        );
        (out, log)
    }

    /// Stops the mount (its last uploads done), restores `db`'s latest state verified and
    /// requires it equal to the backing file.
    pub fn stop_and_restore_latest(&self, m: &mut Mount, db: &str) {
        m.stop();
        let (out, _) = self.restore(db, "latest.db", &[]);
        assert_same_database(&m.backing_path(db), &out);
    }

    /// Every key under `db`'s replica, read with unsigned LISTs straight from moto.
    pub fn keys(&self, db: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = format!("/{BUCKET}?list-type=2&prefix={}/{db}/", self.prefix);
            if let Some(t) = &token {
                q.push_str(&format!("&continuation-token={t}"));
            }
            let (status, head, body) = http(self.moto.port, "GET", &q).unwrap();
            assert_eq!(status, 200, "LIST: {head}");
            let body = String::from_utf8_lossy(&body).into_owned();
            for part in body.split("<Key>").skip(1) {
                keys.push(part[..part.find("</Key>").unwrap()].to_string());
            }
            token = body
                .split("<NextContinuationToken>")
                .nth(1)
                .map(|s| s[..s.find("</NextContinuationToken>").unwrap()].to_string());
            if token.is_none() {
                return keys;
            }
        }
    }

    /// The LTX objects of `db` in the bucket, as (level, min, max), sorted; read with
    /// unsigned LISTs straight from moto.
    pub fn objects(&self, db: &str) -> Vec<(u8, u64, u64)> {
        let mut out = Vec::new();
        for key in self.keys(db) {
            let mut segs = key.rsplit('/');
            let name = segs.next().unwrap();
            let level = segs.next().unwrap();
            let Some(name) = name.strip_suffix(".ltx") else {
                continue;
            };
            let Some((a, b)) = name.split_once('-') else {
                continue;
            };
            out.push((
                u8::from_str_radix(level, 16).unwrap(),
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            ));
        }
        out.sort();
        out
    }
}

/// What SQLite itself reads from the database at `db` (a path in a backing directory):
/// the database file with its `-wal` applied or its hot `-journal` rolled back, as one
/// file in `out_dir` (copies are opened, so the originals are left alone). `None` if the
/// files hold no database with any page (absent, empty, or not SQLite).
pub fn sqlite_view(db: &Path, out_dir: &Path) -> Option<PathBuf> {
    let name = db.file_name().unwrap().to_string_lossy().into_owned();
    let out = out_dir.join(&name);
    std::fs::create_dir_all(out_dir).unwrap();
    for suffix in ["", "-wal", "-journal", "-shm"] {
        let _ = std::fs::remove_file(out_dir.join(format!("{name}{suffix}")));
    }
    let len = std::fs::metadata(db).ok()?.len();
    if len == 0 {
        return None;
    }
    std::fs::copy(db, &out).unwrap();
    for suffix in ["-wal", "-journal"] {
        let mut side = db.as_os_str().to_owned();
        side.push(suffix);
        if std::path::Path::new(&side).exists() {
            std::fs::copy(&side, out_dir.join(format!("{name}{suffix}"))).unwrap();
        }
    }
    {
        let c = rusqlite::Connection::open(&out).ok()?;
        // The first read rolls a hot journal back (or recovers the WAL); the checkpoint
        // moves every committed WAL frame into the file.
        c.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })
        .ok()?;
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .ok()?;
    }
    let h = std::fs::read(&out).ok()?;
    (h.len() >= 100 && &h[..16] == b"SQLite format 3\0").then_some(out)
}

/// Restores `rel` from `url` until it equals SQLite's view of the backing database, for
/// up to `limit`; returns the restore log.
pub fn assert_replica_follows(
    url: &str,
    env: &[(&str, &str)],
    m: &Mount,
    rel: &str,
    limit: Duration,
) -> String {
    let scratch = tempfile::tempdir().unwrap();
    let expected = sqlite_view(&m.backing_path(rel), &scratch.path().join("expected"))
        .unwrap_or_else(|| panic!("{rel} holds no database"));
    let out = scratch.path().join("restored.db");
    let deadline = Instant::now() + limit;
    loop {
        let _ = std::fs::remove_file(&out);
        let o = Command::new(WALFS)
            .args(["restore", url, "--db", rel, "-o"])
            .arg(&out)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        if o.status.success() && std::fs::read(&out).unwrap() == std::fs::read(&expected).unwrap() {
            assert_same_database(&expected, &out);
            return log;
        }
        if Instant::now() > deadline {
            if o.status.success() {
                assert_same_database(&expected, &out);
            }
            panic!(
                "{rel}: the replica does not equal the live database after {limit:?}: {log}\ndaemon log:\n{}",
                m.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The TXID a `walfs restore` log reports ("restored X at TXID N ...").
pub fn restored_txid(log: &str) -> u64 {
    let at = log.find(" at TXID ").expect("restore log names the TXID") + 9;
    log[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A small deterministic generator (splitmix64), for seeded, reproducible tests.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A small tmpfs mounted at a directory for the life of the value (a disk to fill). Needs
/// root, as every test here does (FUSE).
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as tmpfs's `size=` option: `1m`, `64m`) at `path`.
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        use std::os::unix::ffi::OsStrExt;
        let c = |s: &[u8]| std::ffi::CString::new(s).expect("no NUL");
        let (fstype, target) = (c(b"tmpfs"), c(path.as_os_str().as_bytes()));
        let opts = c(format!("size={size}").as_bytes());
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount a tmpfs at {} (run as root): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt;
        let target = std::ffi::CString::new(self.0.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

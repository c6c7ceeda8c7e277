//! The life of a mount: SIGTERM and SIGINT unmount and exit 0 (even with files held open),
//! `fusermount3 -u` ends the daemon, a stale mount left by `kill -9` is cleaned by the next
//! mount, and every bad set-up gets its one-line error and a non-zero exit.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{is_mounted, wait_timeout, Mount, WALFS};

fn walfs(args: &[&str]) -> Output {
    Command::new(WALFS)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run walfs")
}

/// Runs `walfs mount` expecting a refusal; returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = walfs(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "walfs {args:?} should fail, got: {err}"
    );
    assert_eq!(out.status.code(), Some(1), "exit code for {args:?}: {err}");
    let line = err.lines().last().unwrap_or_default();
    assert!(
        line.starts_with("walfs: error: "),
        "one error line, got: {err}"
    );
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn sigterm_unmounts_and_exits_zero() {
    let mut m = Mount::new();
    std::fs::write(m.path("f"), b"data").unwrap();
    let start = Instant::now();
    m.stop();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(std::fs::read(m.backing_path("f")).unwrap(), b"data");
}

#[test]
fn sigint_unmounts_and_exits_zero() {
    let mut m = Mount::new();
    let mut child = m.child.take().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_timeout(&mut child, Duration::from_secs(5)).expect("exit after SIGINT");
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&m.mountpoint));
}

#[test]
fn sigterm_with_an_open_file_still_exits_promptly() {
    let mut m = Mount::new();
    let held = std::fs::File::create(m.path("held")).unwrap();
    let mut child = m.child.take().unwrap();
    let start = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_timeout(&mut child, Duration::from_secs(8)).expect("exit while busy");
    assert!(status.success(), "{status}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(!is_mounted(&m.mountpoint), "busy mount must be detached");
    drop(held);
}

#[test]
fn fusermount_unmount_ends_the_daemon() {
    let mut m = Mount::new();
    let status = Command::new("fusermount3")
        .arg("-u")
        .arg(&m.mountpoint)
        .status()
        .expect("run fusermount3 (apt-get install fuse3)");
    assert!(status.success());
    let mut child = m.child.take().unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(5)).expect("daemon exits");
    assert!(status.success(), "{status}");
}

#[test]
fn an_aborted_connection_ends_the_daemon_and_leaves_no_stale_mount() {
    // The FUSE control filesystem lets root abort a connection (a hung-mount rescue): the
    // daemon must end, not hang, and leave the mountpoint usable for the next mount.
    use std::os::unix::fs::MetadataExt;
    let ctl = Path::new("/sys/fs/fuse/connections");
    let mounted_here = !walfs::mount::is_mountpoint(ctl);
    if mounted_here {
        let status = Command::new("mount")
            .args(["-t", "fusectl", "fusectl"])
            .arg(ctl)
            .status()
            .expect("run mount");
        assert!(status.success(), "cannot mount the FUSE control filesystem");
    }
    let mut m = Mount::new();
    std::fs::write(m.path("before"), b"x").unwrap();
    let dev = std::fs::metadata(&m.mountpoint).unwrap().dev();
    // The kernel names the connection by its own dev_t: major << 20 | minor.
    let conn = (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev));
    let aborted = std::fs::write(ctl.join(conn.to_string()).join("abort"), "1");
    let mut child = m.child.take().unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(10));
    if mounted_here {
        Command::new("umount").arg(ctl).status().ok();
    }
    aborted.unwrap();
    let status = status.expect("the daemon did not end after the abort");
    let err = m.take_stderr(&mut child);
    assert!(status.success(), "{status}: {err}");
    assert!(
        !is_mounted(&m.mountpoint),
        "the aborted mount was left stale"
    );
    m.start(&[]);
    assert_eq!(std::fs::read(m.path("before")).unwrap(), b"x");
    m.stop();
}

#[test]
fn stale_mount_after_kill_9_is_cleaned_by_the_next_mount() {
    let mut m = Mount::new();
    std::fs::write(m.path("kept"), b"before the crash").unwrap();
    m.kill9();
    let err = std::fs::metadata(&m.mountpoint).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOTCONN),
        "expected a stale mount"
    );
    m.start(&[]);
    assert_eq!(std::fs::read(m.path("kept")).unwrap(), b"before the crash");
    let log = m.stop();
    assert!(log.contains("stale mount"), "log: {log}");
}

#[test]
fn stale_mount_is_cleaned_while_the_kernel_still_caches_its_attributes() {
    // Right after kill -9 a plain stat of the mountpoint still succeeds from the kernel's
    // attribute cache (for up to --cache-ttl): a remount at once must still see the mount
    // is dead, not refuse it as "already mounted".
    let mut m = Mount::with_args(&["--cache-ttl", "30"]);
    std::fs::write(m.path("kept"), b"before the crash").unwrap();
    std::fs::metadata(&m.mountpoint).unwrap();
    m.kill9();
    assert!(
        std::fs::metadata(&m.mountpoint).is_ok(),
        "expected the dead mount's attributes to be cached"
    );
    assert!(!common::answers(&m.mountpoint), "expected a stale mount");
    m.start(&["--cache-ttl", "30"]);
    assert_eq!(std::fs::read(m.path("kept")).unwrap(), b"before the crash");
    let log = m.stop();
    assert!(log.contains("stale mount"), "log: {log}");
}

#[test]
fn bad_backing_and_mountpoint_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    let file = dir.path().join("file");
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    std::fs::write(&file, b"x").unwrap();
    let missing = dir.path().join("missing");

    let err = refused(&["mount", s(&missing), s(&mnt)]);
    assert!(
        err.contains("does not exist") && err.contains("mkdir -p"),
        "{err}"
    );
    let err = refused(&["mount", s(&file), s(&mnt)]);
    assert!(err.contains("not a directory"), "{err}");
    let err = refused(&["mount", s(&backing), s(&missing)]);
    assert!(
        err.contains("mountpoint") && err.contains("does not exist"),
        "{err}"
    );
    let err = refused(&["mount", s(&backing), s(&file)]);
    assert!(err.contains("not a directory"), "{err}");

    // A mountpoint inside the backing directory, and the reverse, would loop.
    let inner = backing.join("inner");
    std::fs::create_dir(&inner).unwrap();
    let err = refused(&["mount", s(&backing), s(&inner)]);
    assert!(
        err.contains("inside backing") && err.contains("loop"),
        "{err}"
    );
    let err = refused(&["mount", s(dir.path()), s(&mnt)]);
    assert!(
        err.contains("inside mountpoint") || err.contains("inside backing"),
        "{err}"
    );
    let nested_backing = mnt.join("data");
    std::fs::create_dir(&nested_backing).unwrap();
    let err = refused(&["mount", s(&nested_backing), s(&mnt)]);
    assert!(
        err.contains("inside mountpoint") && err.contains("loop"),
        "{err}"
    );
    std::fs::remove_dir(&nested_backing).unwrap();

    // Synchronous replication without a replica to wait for.
    for flag in [&["--sync-replication"][..], &["--sync-database", "a.db"]] {
        let mut args = vec!["mount", s(&backing), s(&mnt)];
        args.extend(flag);
        let err = refused(&args);
        assert!(
            err.contains("none is given") && err.contains("--replica"),
            "{err}"
        );
    }

    // A non-empty mountpoint would hide its files.
    std::fs::write(mnt.join("x"), b"x").unwrap();
    let err = refused(&["mount", s(&backing), s(&mnt)]);
    assert!(
        err.contains("busy") && err.contains("--allow-nonempty"),
        "{err}"
    );
}

#[test]
fn an_already_mounted_mountpoint_is_refused() {
    let m = Mount::new();
    let other = tempfile::tempdir().unwrap();
    let err = refused(&["mount", s(other.path()), s(&m.mountpoint)]);
    assert!(
        err.contains("already mounted") && err.contains("fusermount3 -u"),
        "{err}"
    );
    // The first mount is unharmed.
    std::fs::write(m.path("still"), b"ok").unwrap();
    assert_eq!(std::fs::read(m.backing_path("still")).unwrap(), b"ok");
}

#[test]
fn missing_dev_fuse_names_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("b");
    let mnt = dir.path().join("m");
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    // A private mount namespace whose /dev has no fuse device.
    let script = format!(
        "mount -t tmpfs none /dev && exec {WALFS} mount {} {}",
        s(&backing),
        s(&mnt)
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("run unshare (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/dev/fuse") && err.contains("apt-get install fuse3"),
        "{err}"
    );
}

#[test]
fn missing_fusermount3_names_the_package_for_unprivileged_users() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("b");
    let mnt = dir.path().join("m");
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    for p in [dir.path(), &backing, &mnt] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "env",
            "PATH=/nonexistent",
        ])
        .arg(WALFS)
        .args(["mount", s(&backing), s(&mnt)])
        .output()
        .expect("run setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("fusermount3 not found") && err.contains("fuse3"),
        "{err}"
    );
}

#[test]
fn read_only_and_threads_options_are_honoured() {
    let mut m = Mount::with_args(&["--read-only", "--threads", "1"]);
    let err = std::fs::write(m.path("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    m.stop();
}

#[test]
fn without_cap_sys_admin_it_serves_through_the_page_cache_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("b");
    let mnt = dir.path().join("m");
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for p in [&backing, &mnt] {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    }
    // An unprivileged user mounts through the setuid fusermount3, as on a desktop, where
    // /dev/fuse is mode 0666 (udev's default; this machine may have it 0600).
    let _dev_fuse = DevFuseOpenToAll::new();
    let child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(WALFS)
        .args(["mount", s(&backing), s(&mnt)])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run setpriv (util-linux)");
    let mut child = KillOnDrop(child);
    let child = &mut child.0;
    // Root cannot stat another user's FUSE mount without allow_other: watch mountinfo.
    let start = Instant::now();
    while !is_mounted(&mnt) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "walfs exited before mounting"
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "walfs did not mount"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sqlite3",
        ])
        .arg(mnt.join("app.db"))
        .arg("PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (42);")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_timeout(child, Duration::from_secs(10)).expect("exits on SIGTERM");
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(!is_mounted(&mnt));
    assert!(log.contains("passthrough is off"), "log: {log}");
    let out = common::sqlite3(
        &backing.join("app.db"),
        "SELECT x FROM t; PRAGMA integrity_check;",
    );
    assert_eq!(out, "42\nok\n");
    let meta = std::fs::metadata(backing.join("app.db")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);
}

/// Makes /dev/fuse mode 0666 (the fuse3 package's udev default) for the life of the value.
struct DevFuseOpenToAll(u32);

impl DevFuseOpenToAll {
    fn new() -> DevFuseOpenToAll {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata("/dev/fuse").unwrap().permissions().mode();
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666)).unwrap();
        DevFuseOpenToAll(mode)
    }
}

impl Drop for DevFuseOpenToAll {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(self.0));
    }
}

/// Kills a daemon that a failed assertion would otherwise leave mounted.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

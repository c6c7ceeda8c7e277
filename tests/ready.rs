//! Readiness with real processes: systemd's notify protocol on a socket the test binds
//! (READY=1 once the mount answers, STOPPING=1 on SIGTERM), `--ready-file`, and
//! `walfs wait`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{answers, is_mounted, wait_timeout, WALFS};

/// `walfs mount BACKING MNT ARGS` started with `env`, stderr to a file-less pipe drained
/// at the end; not waited for.
fn spawn_mount(root: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Child {
    Command::new(WALFS)
        .arg("mount")
        .arg(root.join("backing"))
        .arg(root.join("mnt"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn walfs mount")
}

fn dirs() -> tempfile::TempDir {
    let root = tempfile::Builder::new()
        .prefix("walfs-ready-")
        .tempdir()
        .unwrap();
    std::fs::create_dir(root.path().join("backing")).unwrap();
    std::fs::create_dir(root.path().join("mnt")).unwrap();
    root
}

/// Receives one datagram within `limit`, or None.
fn recv(sock: &UnixDatagram, limit: Duration) -> Option<String> {
    sock.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 256];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(_) => None,
    }
}

fn sigterm_and_wait(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_timeout(child, Duration::from_secs(20)).unwrap_or_else(|| {
        child.kill().ok();
        panic!("walfs did not exit within 20 s of SIGTERM");
    })
}

fn check_notify(sock: &UnixDatagram, notify_socket: &std::ffi::OsStr) {
    let root = dirs();
    let mnt = root.path().join("mnt");
    let mut child = spawn_mount(root.path(), &[], &[("NOTIFY_SOCKET", notify_socket)]);
    let ready = recv(sock, Duration::from_secs(20));
    // At the moment READY=1 arrives the mount is there and answers a request.
    let (mounted, answered) = (is_mounted(&mnt), answers(&mnt));
    assert_eq!(ready.as_deref(), Some("READY=1"));
    assert!(
        mounted && answered,
        "READY=1 before the mount served: mounted {mounted}, answered {answered}"
    );
    // Nothing else while it serves.
    assert_eq!(recv(sock, Duration::from_millis(300)), None);
    std::fs::write(mnt.join("f"), b"x").unwrap();
    let status = sigterm_and_wait(&mut child);
    assert!(status.success(), "walfs exited with {status}");
    assert_eq!(
        recv(sock, Duration::from_secs(5)).as_deref(),
        Some("STOPPING=1")
    );
    assert_eq!(
        recv(sock, Duration::from_millis(200)),
        None,
        "one STOPPING=1"
    );
    assert!(!is_mounted(&mnt));
}

/// A socket at a path: READY=1 only once the mount answers, then STOPPING=1 on SIGTERM.
#[test]
fn notify_socket_path_gets_ready_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    check_notify(&sock, path.as_os_str());
}

/// An abstract socket (`@name`), as systemd may give.
#[test]
fn notify_socket_abstract_name() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("walfs-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    check_notify(&sock, std::ffi::OsStr::new(&format!("@{name}")));
}

/// `--ready-file` appears once the mount answers, holding the mountpoint, and goes away
/// when walfs stops.
#[test]
fn ready_file_appears_and_disappears() {
    let root = dirs();
    let mnt = root.path().join("mnt");
    let file = root.path().join("state/ready");
    std::fs::create_dir(root.path().join("state")).unwrap();
    let mut child = spawn_mount(root.path(), &["--ready-file", file.to_str().unwrap()], &[]);
    let start = Instant::now();
    while !file.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no ready file");
        assert!(child.try_wait().unwrap().is_none(), "walfs exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(is_mounted(&mnt) && answers(&mnt));
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        text.trim_end(),
        std::fs::canonicalize(&mnt).unwrap().to_str().unwrap()
    );
    let status = sigterm_and_wait(&mut child);
    assert!(status.success());
    assert!(!file.exists(), "ready file left after stop");
    // Nothing else was left next to it (the temporary file was renamed).
    assert_eq!(
        std::fs::read_dir(root.path().join("state"))
            .unwrap()
            .count(),
        0
    );
}

fn wait_cmd(path: &Path, timeout: &str) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new(WALFS)
        .arg("wait")
        .arg(path)
        .args(["--timeout", timeout])
        .output()
        .unwrap();
    (out, start.elapsed())
}

/// `walfs wait` succeeds on a live mount (also when started before the mount), and fails
/// after its timeout, with one line, on a plain directory.
#[test]
fn wait_succeeds_on_a_mount_and_times_out_on_a_directory() {
    let root = dirs();
    let mnt = root.path().join("mnt");
    // A plain directory: fails after the timeout, with one line saying what to check.
    let (out, took) = wait_cmd(&mnt, "1s");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(took >= Duration::from_secs(1), "gave up after {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("is not ready after 1s") && err.contains("is not a walfs mount"),
        "{err}"
    );
    // Started before the mount: returns once it serves.
    let waiter = Command::new(WALFS)
        .arg("wait")
        .arg(&mnt)
        .args(["--timeout", "30s"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut child = spawn_mount(root.path(), &[], &[]);
    let out = waiter.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mnt) && answers(&mnt));
    // And at once on a live mount.
    let (out, took) = wait_cmd(&mnt, "5s");
    assert!(out.status.success());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(sigterm_and_wait(&mut child).success());
}

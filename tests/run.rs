//! `walfs run`, the container entrypoint, with real processes: a real FUSE mount, a real
//! `sh` running `sqlite3` against the mountpoint as the command, and a file:// replica.
//! First boot restores from the replica, a restart with the backing kept does not, a
//! SIGTERM reaches the command and its last commit reaches the replica, and the command's
//! exit status becomes walfs's.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_same_database, is_mounted, sqlite3, wait_timeout, S3Fixture, S3_ENV, WALFS};

/// A backing directory, mountpoint and staging directory for one `walfs run`, and the
/// replica they share with other boxes.
struct Box_ {
    _root: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    staging: PathBuf,
}

impl Box_ {
    fn new() -> Box_ {
        let root = tempfile::Builder::new()
            .prefix("walfs-run-")
            .tempdir()
            .unwrap();
        let (backing, mnt) = (root.path().join("backing"), root.path().join("mnt"));
        std::fs::create_dir(&backing).unwrap();
        std::fs::create_dir(&mnt).unwrap();
        Box_ {
            staging: root.path().join("staging"),
            _root: root,
            backing,
            mnt,
        }
    }

    /// `walfs run BACKING MNT --replica URL --staging-dir S -- sh -c SCRIPT`, started;
    /// `$MNT` in the script is the mountpoint.
    fn spawn(&self, replica: &Path, script: &str) -> Child {
        self.spawn_url(&format!("file://{}", replica.display()), &[], script)
    }

    /// As [`Box_::spawn`], replicating to `url`, with `env` added.
    fn spawn_url(&self, url: &str, env: &[(&str, &str)], script: &str) -> Child {
        self.spawn_urls(&[url], env, script)
    }

    /// As [`Box_::spawn`], replicating to every one of `urls`, with `env` added.
    fn spawn_urls(&self, urls: &[&str], env: &[(&str, &str)], script: &str) -> Child {
        Command::new(WALFS)
            .arg("run")
            .arg(&self.backing)
            .arg(&self.mnt)
            .args(urls.iter().flat_map(|u| ["--replica", u]))
            .envs(env.iter().copied())
            .arg("--staging-dir")
            .arg(&self.staging)
            .args(["--sync-interval", "100ms", "--", "sh", "-c", script])
            .env("MNT", &self.mnt)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn walfs run")
    }

    /// Runs `walfs run ... -- sh -c SCRIPT` to its end (at most 60 s).
    fn run(&self, replica: &Path, script: &str) -> Output {
        self.finish(self.spawn(replica, script))
    }

    /// Waits for a `walfs run` to end (at most 60 s) and returns its output.
    fn finish(&self, mut child: Child) -> Output {
        let status = wait_timeout(&mut child, Duration::from_secs(60));
        if status.is_none() {
            child.kill().ok();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            status.is_some(),
            "walfs run did not exit within 60 s: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!is_mounted(&self.mnt), "still mounted after walfs run");
        out
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out.sort();
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Restores the replica's `app.db` (latest) with `walfs restore` into `dir`.
fn restore_latest(replica: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("restored.db");
    let o = Command::new(WALFS)
        .args(["restore", &format!("file://{}", replica.display())])
        .args(["--db", "app.db", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "walfs restore: {}", text(&o.stderr));
    out
}

/// No progress bar, cursor movement or colour when stderr is not a terminal.
fn assert_plain(stderr: &str) {
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "control characters on a stderr that is not a terminal: {stderr:?}"
    );
}

/// First boot from an empty backing restores the replica, and the command sees the rows;
/// the restored database equals the source page for page. A restart with the backing kept
/// restores nothing, finds its data, and its new writes reach the replica.
#[test]
fn first_boot_restores_and_a_restart_keeps_the_backing() {
    let replica_dir = tempfile::tempdir().unwrap();
    let replica = replica_dir.path().join("replica");
    let source = Box_::new();
    // Boot 0: nothing anywhere. The command creates the database.
    let out = source.run(
        &replica,
        r#"sqlite3 "$MNT/app.db" "PRAGMA journal_mode=wal; CREATE TABLE t(x INTEGER, pad TEXT);
           WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 2000)
           INSERT INTO t SELECT i, randomblob(300) FROM n;" >/dev/null"#,
    );
    let log = text(&out.stderr);
    assert!(out.status.success(), "boot 0: {log}");
    assert!(
        log.contains("holds no databases yet: nothing to restore"),
        "{log}"
    );
    let expect = sqlite3(
        &source.backing.join("app.db"),
        "SELECT count(*), sum(x) FROM t;",
    );
    assert_eq!(expect.trim(), "2000|2001000");

    // Boot 1: a new box with an empty backing restores, then the command reads.
    let fresh = Box_::new();
    let out = fresh.run(
        &replica,
        r#"sqlite3 "$MNT/app.db" "SELECT count(*), sum(x) FROM t;""#,
    );
    let log = text(&out.stderr);
    assert!(out.status.success(), "boot 1: {log}");
    assert!(log.contains("holds no database: restoring 1"), "{log}");
    assert!(log.contains("integrity_check ok"), "{log}");
    assert_eq!(text(&out.stdout), expect, "{log}");
    assert_plain(&log);
    assert_same_database(
        &source.backing.join("app.db"),
        &fresh.backing.join("app.db"),
    );

    // Boot 2: the same box again; the backing is kept, so no restore. New writes. Boot 1
    // continued the replica's history (TXIDs after boot 0's): a new history from TXID 1
    // next to the old one would leave boot 0's TXIDs as the latest, and the restore below
    // would miss the new row.
    let out = fresh.run(
        &replica,
        r#"sqlite3 "$MNT/app.db" "SELECT count(*) FROM t; INSERT INTO t VALUES (5000, 'new');""#,
    );
    let log = text(&out.stderr);
    assert!(out.status.success(), "boot 2: {log}");
    assert!(log.contains("already holds databases"), "{log}");
    assert!(!log.contains("restored app.db"), "{log}");
    assert_eq!(text(&out.stdout), "2000\n", "{log}");
    let restored = restore_latest(&replica, replica_dir.path());
    assert_eq!(
        sqlite3(&restored, "SELECT count(*), sum(x) FROM t;").trim(),
        "2001|2006000",
        "{log}\n{:?}",
        walk(&replica)
    );
    assert_same_database(&fresh.backing.join("app.db"), &restored);
}

/// First boot from an S3 replica that `walfs mount` wrote (moto): the command sees the
/// restored rows, and the restored database equals the source.
#[test]
fn first_boot_restores_from_s3() {
    let s3 = S3Fixture::new("run-first-boot");
    let mut m = s3.mount(&[]);
    sqlite3(
        &m.path("app.db"),
        "PRAGMA journal_mode=wal; CREATE TABLE t(x INTEGER);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 300)
         INSERT INTO t SELECT i FROM n;",
    );
    m.stop();
    let expect = sqlite3(&m.backing_path("app.db"), "SELECT count(*), sum(x) FROM t;");
    assert_eq!(expect.trim(), "300|45150");
    let fresh = Box_::new();
    let out = fresh.finish(fresh.spawn_url(
        &s3.url(),
        S3_ENV,
        r#"sqlite3 "$MNT/app.db" "SELECT count(*), sum(x) FROM t;""#,
    ));
    let log = text(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("holds no database: restoring 1"), "{log}");
    assert_eq!(text(&out.stdout), expect, "{log}");
    assert_same_database(&m.backing_path("app.db"), &fresh.backing.join("app.db"));
}

/// First boot with two replicas whose first cannot be reached (nothing listens at its
/// endpoint): the second one, which holds the databases, is restored from, with a WARN
/// that names why the first was skipped.
#[test]
fn first_boot_restores_from_the_second_replica_when_the_first_is_down() {
    let replica_dir = tempfile::tempdir().unwrap();
    let replica = replica_dir.path().join("replica");
    let source = Box_::new();
    let out = source.run(
        &replica,
        r#"sqlite3 "$MNT/app.db" "PRAGMA journal_mode=wal; CREATE TABLE t(x);
           INSERT INTO t VALUES (1), (2), (3);""#,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let down = format!(
        "s3://walfs-test/down?endpoint=http://127.0.0.1:{}&region=us-east-1&forcePathStyle=true",
        common::free_port()
    );
    let file = format!("file://{}", replica.display());
    let fresh = Box_::new();
    let out = fresh.finish(fresh.spawn_urls(
        &[&down, &file],
        S3_ENV,
        r#"sqlite3 "$MNT/app.db" "SELECT sum(x) FROM t;""#,
    ));
    let log = text(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("trying the next replica"), "{log}");
    assert!(
        log.contains(&format!("restoring 1 from replica {file}")),
        "{log}"
    );
    assert_eq!(text(&out.stdout), "6\n", "{log}");
    assert_same_database(
        &source.backing.join("app.db"),
        &fresh.backing.join("app.db"),
    );
}

/// SIGTERM to `walfs run` reaches the command, which traps it, commits once more and
/// exits 7: walfs exits 7, and that last commit is in the replica.
#[test]
fn sigterm_reaches_the_command_and_its_last_commit_is_replicated() {
    let replica_dir = tempfile::tempdir().unwrap();
    let replica = replica_dir.path().join("replica");
    let b = Box_::new();
    let mut child = b.spawn(
        &replica,
        r#"sqlite3 "$MNT/app.db" "PRAGMA journal_mode=wal; CREATE TABLE t(x);" >/dev/null
           trap 'sqlite3 "$MNT/app.db" "INSERT INTO t VALUES (42);"; exit 7' TERM
           touch "$MNT/started"
           while true; do sleep 0.05; done"#,
    );
    let start = Instant::now();
    while !b.backing.join("started").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the command did not start"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "walfs run exited early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_timeout(&mut child, Duration::from_secs(30));
    if status.is_none() {
        child.kill().ok();
    }
    let out = child.wait_with_output().unwrap();
    let log = text(&out.stderr);
    assert_eq!(status.and_then(|s| s.code()), Some(7), "{log}");
    assert!(log.contains("forwarding the signal"), "{log}");
    assert!(!is_mounted(&b.mnt));
    let restored = restore_latest(&replica, replica_dir.path());
    assert_eq!(sqlite3(&restored, "SELECT x FROM t;").trim(), "42");
}

/// The command's exit status is walfs's: an exit code as is, a signal N as 128 + N.
#[test]
fn command_exit_status_is_propagated() {
    let replica_dir = tempfile::tempdir().unwrap();
    let replica = replica_dir.path().join("replica");
    let b = Box_::new();
    let out = b.run(&replica, "exit 3");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let out = b.run(&replica, "kill -KILL $$");
    assert_eq!(out.status.code(), Some(128 + 9), "{}", text(&out.stderr));
    // The command gets walfs's umask back (the daemon itself runs with 0).
    let out = Command::new("sh")
        .args(["-c", "umask 027; exec \"$0\" \"$@\"", WALFS, "run"])
        .arg(&b.backing)
        .arg(&b.mnt)
        .args(["--", "sh", "-c"])
        .arg(format!(
            "test -d '{}' && test \"$(umask)\" = 0027 && exit 0; umask; exit 1",
            b.mnt.display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // A command that cannot be started: an error of one line, non-zero.
    let o = Command::new(WALFS)
        .arg("run")
        .arg(&b.backing)
        .arg(&b.mnt)
        .args(["--", "/nonexistent/program"])
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("walfs: error: cannot start the command \"/nonexistent/program\""),
        "{err}"
    );
    assert!(!is_mounted(&b.mnt));
}

/// The mount going away under the command (an unmount from outside) stops the command,
/// and walfs exits non-zero with one line that says so.
#[test]
fn mount_going_away_stops_the_command() {
    let replica_dir = tempfile::tempdir().unwrap();
    let replica = replica_dir.path().join("replica");
    let b = Box_::new();
    let mut child = b.spawn(
        &replica,
        r#"touch "$MNT/started"; cd /; while true; do sleep 0.05; done"#,
    );
    let start = Instant::now();
    while !b.backing.join("started").exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "not started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let u = Command::new("fusermount3").arg("-u").arg(&b.mnt).status();
    let u = match u {
        Ok(s) if s.success() => s,
        _ => Command::new("umount").arg(&b.mnt).status().unwrap(),
    };
    assert!(u.success(), "cannot unmount from outside");
    let status = wait_timeout(&mut child, Duration::from_secs(30));
    if status.is_none() {
        child.kill().ok();
    }
    let out = child.wait_with_output().unwrap();
    let log = text(&out.stderr);
    let status = status.expect("walfs run did not exit after the mount went away");
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("walfs: error: the mount at")
            && log.contains("went away while the command ran"),
        "{log}"
    );
}

/// The strings of a JSON array of strings such as the Dockerfile's exec form
/// (`["a", "b"]`); no escapes other than `\"` are expected there.
fn json_strings(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('[').trim_end_matches(']');
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut s = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => s.extend(chars.next()),
                '"' => break,
                c => s.push(c),
            }
        }
        out.push(s);
    }
    out
}

/// The Dockerfile's ENTRYPOINT (with its default CMD, and with docs/docker-compose.yml's
/// command) is a working `walfs run` command line: run here on the host with the
/// container's paths mapped to temporary directories, the replica to a file:// one, and
/// the app to a shell that checks the mount and the ready file.
#[test]
fn dockerfile_entrypoint_and_compose_command_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let exec_form = |keyword: &str| {
        let line = dockerfile
            .lines()
            .find(|l| l.starts_with(keyword))
            .unwrap_or_else(|| panic!("no {keyword} in the Dockerfile"));
        json_strings(&line[keyword.len()..])
    };
    let entrypoint = exec_form("ENTRYPOINT ");
    let cmd = exec_form("CMD ");
    assert_eq!(entrypoint[..2], ["walfs", "run"]);
    let compose = std::fs::read_to_string(root.join("docs/docker-compose.yml")).unwrap();
    let command: Vec<String> = compose
        .lines()
        .skip_while(|l| l.trim() != "command:")
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- "))
        .map(|v| v.trim_matches('"').to_string())
        .collect();
    assert!(command.contains(&"--".to_string()), "{command:?}");

    let b = Box_::new();
    let replica_dir = tempfile::tempdir().unwrap();
    let ready = replica_dir.path().join("walfs.ready");
    let replica = format!("file://{}", replica_dir.path().join("replica").display());
    let map = |a: &str| -> String {
        match a {
            "/data" => b.backing.display().to_string(),
            "/app-data" => b.mnt.display().to_string(),
            "/var/lib/walfs/staging" => b.staging.display().to_string(),
            "/run/walfs.ready" => ready.display().to_string(),
            a if a.starts_with("s3://") => replica.clone(),
            a => a.to_string(),
        }
    };
    let run = |args: Vec<String>| -> Output {
        Command::new(WALFS)
            .args(args[1..].iter().map(|a| map(a)))
            .env("READY", &ready)
            .output()
            .unwrap()
    };
    // The default CMD: a one-line usage message, exit 2.
    let out = run(entrypoint.iter().chain(&cmd).cloned().collect());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("give the replica and the app"));
    // The compose command, with its app replaced: the mount serves and the ready file is
    // there while the app runs.
    let dash = command.iter().position(|a| a == "--").unwrap();
    let mut args: Vec<String> = entrypoint
        .iter()
        .chain(&command[..=dash])
        .cloned()
        .collect();
    args.extend(
        [
            "sh",
            "-c",
            r#"test -f "$READY" && grep -q "$(cat "$READY")" /proc/self/mountinfo && exit 5"#,
        ]
        .map(String::from),
    );
    let out = run(args);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(!ready.exists());
    assert!(!is_mounted(&b.mnt));
}

/// `walfs restore` and `walfs verify` draw a progress bar on a terminal (a pseudo-terminal
/// from `script`), and print nothing of it when stderr is a pipe.
#[test]
fn progress_bars_only_on_a_terminal() {
    let replica_dir = tempfile::tempdir().unwrap();
    let replica = replica_dir.path().join("replica");
    let b = Box_::new();
    let out = b.run(
        &replica,
        r#"sqlite3 "$MNT/app.db" "PRAGMA journal_mode=wal; CREATE TABLE t(x);
           WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 5000)
           INSERT INTO t SELECT randomblob(500) FROM n;" >/dev/null"#,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let url = format!("file://{}", replica.display());
    let dir = replica_dir.path();
    let restore = |name: &str| -> Vec<String> {
        ["restore", &url, "--db", "app.db", "-o"]
            .into_iter()
            .map(String::from)
            .chain([dir.join(name).display().to_string()])
            .collect()
    };
    let verify: Vec<String> = vec!["verify".into(), url.clone()];
    for args in [restore("piped.db"), verify.clone()] {
        let o = Command::new(WALFS).args(&args).output().unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert_plain(&text(&o.stderr));
    }
    for (args, label) in [
        (restore("tty.db"), "restoring app.db"),
        (verify, "restoring app.db"),
    ] {
        let line = std::iter::once(WALFS.to_string())
            .chain(args)
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let o = Command::new("script")
            .args(["-q", "-e", "-c", &line, "/dev/null"])
            .env("TERM", "xterm")
            .output()
            .expect("script (util-linux)");
        let shown = text(&o.stdout);
        assert!(o.status.success(), "{shown}");
        assert!(
            shown.contains(label) && (shown.contains('\r') || shown.contains('\x1b')),
            "no progress bar on a terminal: {shown:?}"
        );
    }
}

/// The mount's first snapshots of 64 MiB or more of databases show a progress bar on a
/// terminal, and nothing of it on a pipe.
#[test]
fn first_snapshot_progress_bar_only_on_a_terminal() {
    let replica_dir = tempfile::tempdir().unwrap();
    let b = Box_::new();
    sqlite3(
        &b.backing.join("big.db"),
        "PRAGMA journal_mode=wal; CREATE TABLE t(b BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 80)
         INSERT INTO t SELECT randomblob(1 << 20) FROM n;",
    );
    assert!(std::fs::metadata(b.backing.join("big.db")).unwrap().len() >= 80 << 20);
    let args = |n: usize| -> Vec<String> {
        let mut a: Vec<String> = vec![WALFS.into(), "run".into()];
        a.extend([&b.backing, &b.mnt].map(|p| p.display().to_string()));
        a.push("--replica".into());
        a.push(format!(
            "file://{}",
            replica_dir.path().join(format!("r{n}")).display()
        ));
        a.push("--staging-dir".into());
        a.push(
            replica_dir
                .path()
                .join(format!("s{n}"))
                .display()
                .to_string(),
        );
        a.extend(["--", "true"].map(String::from));
        a
    };
    let piped = args(0);
    let o = Command::new(&piped[0]).args(&piped[1..]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_plain(&text(&o.stderr));
    let line = args(1)
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let o = Command::new("script")
        .args(["-q", "-e", "-c", &line, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .expect("script (util-linux)");
    let shown = text(&o.stdout);
    assert!(o.status.success(), "{shown}");
    assert!(
        shown.contains("staging the databases' snapshots"),
        "no progress bar on a terminal: {shown:?}"
    );
}

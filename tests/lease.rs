//! One writer per replica: real `walfs mount`s on one moto bucket (S3 API on 127.0.0.1) and
//! on one `file://` replica. A second mount is refused with a line that names the holder; a
//! crashed mount of this host is taken over at its restart; another host's lease needs
//! `--takeover`, and only once it has expired; a mount whose lease was taken over stops
//! writing the replica (fencing) while its application goes on.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{as_strs, wait_timeout, Mount, S3Fixture, BUCKET, S3_ENV, WALFS};

/// A short lease: renewed every 0.5 s, writes fenced 1.5 s after the last renewal.
const TTL: &[&str] = &["--lease-ttl", "3s", "--sync-interval", "100ms"];

/// Runs `walfs mount` on fresh directories with `args`, expecting it to refuse to start;
/// returns what it printed.
fn refused_mount(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dir.path().join("b"), dir.path().join("m"));
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(WALFS)
        .arg("mount")
        .arg(&backing)
        .arg(&mnt)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    if status.is_none() {
        child.kill().ok();
        child.wait().ok();
        Command::new("umount").arg("-l").arg(&mnt).status().ok();
        panic!("a second mount of the same replica started");
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.unwrap().success(), "{err}");
    err
}

/// The lease object's text, as boto3 reads it from moto.
fn lease_text(f: &S3Fixture) -> String {
    let o = f.moto.boto3(&format!(
        "print(s3.get_object(Bucket='{BUCKET}', Key='{}/.walfs-lease')['Body'].read().decode())",
        f.prefix
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Writes a lease of another host into the replica, expiring `expires_in` seconds from
/// now (negative: already expired).
fn foreign_lease(f: &S3Fixture, expires_in: i64) {
    let o = f.moto.boto3(&format!(
        "import datetime\n\
         now = datetime.datetime.now(datetime.timezone.utc)\n\
         fmt = lambda t: t.strftime('%Y-%m-%dT%H:%M:%S.%fZ')\n\
         body = 'walfs-lease 1\\nhost other-host\\npid 4242\\nmount /srv/other\\nsince ' + fmt(now - datetime.timedelta(hours=1)) + '\\nexpires ' + fmt(now + datetime.timedelta(seconds={expires_in})) + '\\n'\n\
         s3.put_object(Bucket='{BUCKET}', Key='{}/.walfs-lease', Body=body.encode())",
        f.prefix
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn commit(m: &Mount, db: &str, n: usize) {
    let sql = format!(
        "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(x); {}",
        "INSERT INTO t VALUES (randomblob(100));".repeat(n)
    );
    common::sqlite3(&m.path(db), &sql);
}

/// The keys of `db`'s objects once there are some and they have not changed for a second.
fn stable_keys(f: &S3Fixture, db: &str) -> Vec<String> {
    let start = std::time::Instant::now();
    let mut last = f.keys(db);
    let mut since = std::time::Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = f.keys(db);
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        } else if !now.is_empty() && since.elapsed() >= Duration::from_secs(1) {
            return now;
        }
        // The uploader backs off up to 30 s while a store does not answer.
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{db}'s objects did not settle"
        );
    }
}

fn host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes.
    assert_eq!(
        unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) },
        0
    );
    let end = buf.iter().position(|&b| b == 0).unwrap();
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[test]
fn a_second_mount_of_an_s3_replica_is_refused_and_a_crashed_one_is_taken_over() {
    let f = S3Fixture::new("lease");
    let mut m = f.mount(TTL);
    commit(&m, "app.db", 10);
    let pid = m.child.as_ref().unwrap().id();
    let text = lease_text(&f);
    assert!(text.contains(&format!("pid {pid}")), "{text}");

    // Another mount, with its own staging, on the same replica.
    let other_staging = f.dir.path().join("other-staging");
    let mut args = vec!["--replica".to_string(), f.url(), "--staging-dir".into()];
    args.push(other_staging.display().to_string());
    args.extend(TTL.iter().map(|s| s.to_string()));
    let err = refused_mount(&as_strs(&args), S3_ENV);
    eprintln!("{err}");
    assert!(err.contains("is in use by another mount"), "{err}");
    for part in [
        format!("host {}", host()),
        format!("pid {pid}"),
        format!("mount {}", m.mountpoint.display()),
        "since ".to_string(),
    ] {
        assert!(err.contains(&part), "the holder ({part}) is named: {err}");
    }
    assert_eq!(
        err.trim().lines().filter(|l| l.contains("error")).count(),
        1,
        "{err}"
    );

    // kill -9: the lease stays, but its process is gone, so the restart takes it over.
    m.kill9();
    f.restart(&mut m, TTL);
    commit(&m, "app.db", 10);
    let new_pid = m.child.as_ref().unwrap().id();
    assert!(lease_text(&f).contains(&format!("pid {new_pid}")));
    f.stop_and_restore_latest(&mut m, "app.db");
    // A clean stop gives the lease up, and another mount then starts without --takeover.
    assert!(lease_text(&f).contains("released 1"), "{}", lease_text(&f));
    let other = Mount::with_env(&as_strs(&args), S3_ENV);
    commit(&other, "other.db", 1);
    drop(other);
}

#[test]
fn another_hosts_lease_needs_takeover_once_expired_and_a_fenced_mount_stops_writing() {
    let f = S3Fixture::new("fence");
    // A live lease of another host: refused, --takeover or not.
    foreign_lease(&f, 3600);
    let base = |extra: &[&str]| {
        let mut a = vec![
            "--replica".to_string(),
            f.url(),
            "--staging-dir".into(),
            f.staging().display().to_string(),
        ];
        a.extend(TTL.iter().chain(extra).map(|s| s.to_string()));
        a
    };
    for extra in [&[][..], &["--takeover"][..]] {
        let err = refused_mount(&as_strs(&base(extra)), S3_ENV);
        assert!(
            err.contains("host other-host, pid 4242, mount /srv/other")
                && err.contains("once its lease has expired start this one with --takeover"),
            "{extra:?}: {err}"
        );
    }
    // Expired: still refused without --takeover, taken with it.
    foreign_lease(&f, -60);
    let err = refused_mount(&as_strs(&base(&[])), S3_ENV);
    assert!(
        err.contains("it has expired: start this mount with --takeover"),
        "{err}"
    );
    let mut m = Mount::with_env(&as_strs(&base(&["--takeover"])), S3_ENV);
    commit(&m, "app.db", 5);
    assert!(lease_text(&f).contains(&format!("host {}", host())));
    common::sqlite3(&m.path("app.db"), "PRAGMA wal_checkpoint(TRUNCATE);");
    // Settled: the lease renewals go on, so wait for the database's objects to stop
    // changing instead of for a quiet server.
    let before = stable_keys(&f, "app.db");

    // Another mount takes the lease over (written behind this one's back): this mount's
    // next renewal finds it changed, and it stops writing the replica. Its application
    // goes on.
    foreign_lease(&f, 3600);
    std::thread::sleep(Duration::from_secs(2));
    commit(&m, "app.db", 20);
    common::sqlite3(&m.path("app.db"), "PRAGMA wal_checkpoint(TRUNCATE);");
    commit(&m, "new.db", 5);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(f.keys("app.db"), before, "a fenced mount uploaded");
    assert!(
        f.keys("new.db").is_empty(),
        "a fenced mount uploaded a new database"
    );
    let rows = common::sqlite3(&m.path("app.db"), "SELECT count(*) FROM t;");
    assert_eq!(rows.trim(), "25");
    let log = m.stop();
    assert!(
        log.contains("lost the replica's lease to another mount (host other-host"),
        "{log}"
    );
    // The stop left the other mount's lease alone.
    assert!(lease_text(&f).contains("host other-host"));
}

#[test]
fn a_second_mount_of_a_file_replica_is_refused_until_the_first_stops() {
    let dir = tempfile::tempdir().unwrap();
    let replica = format!("file://{}", dir.path().join("replica").display());
    let staging = |n: &str| dir.path().join(n).display().to_string();
    let args = |n: &str| {
        vec![
            "--replica".to_string(),
            replica.clone(),
            "--staging-dir".into(),
            staging(n),
        ]
    };
    let m = Mount::with_env(&as_strs(&args("s1")), &[]);
    commit(&m, "app.db", 5);
    let pid = m.child.as_ref().unwrap().id();
    let err = refused_mount(&as_strs(&args("s2")), &[]);
    assert!(
        err.contains("is in use by another mount")
            && err.contains(&format!("pid {pid}"))
            && err.contains(&format!("mount {}", m.mountpoint.display())),
        "{err}"
    );
    drop(m);
    let m2 = Mount::with_env(&as_strs(&args("s2")), &[]);
    commit(&m2, "app.db", 5);
    assert!(Path::new(&dir.path().join("replica/.walfs-lease")).exists());
}

/// A store that cannot be reached at the start does not keep the application from its
/// data: the mount starts, captures into staging, takes the lease once the store
/// answers, and uploads then.
#[test]
fn an_unreachable_store_at_the_start_is_leased_once_it_answers() {
    let f = S3Fixture::new("late");
    let port = common::free_port();
    let url = f.moto.s3_url_via(port, &f.prefix);
    let mut m = Mount::with_env(&as_strs(&f.args_to(&url, TTL)), S3_ENV);
    commit(&m, "app.db", 10);
    std::thread::sleep(Duration::from_secs(1));
    assert!(f.keys("app.db").is_empty());
    common::forward(port, f.moto.port);
    let start = std::time::Instant::now();
    while f.keys("app.db").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nothing uploaded once the store answered: {}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stable_keys(&f, "app.db");
    assert!(lease_text(&f).contains(&format!("pid {}", m.child.as_ref().unwrap().id())));
    commit(&m, "app.db", 10);
    let log = m.log();
    assert!(
        log.contains("cannot reach the replica to take its lease"),
        "{log}"
    );
    f.stop_and_restore_latest(&mut m, "app.db");
}

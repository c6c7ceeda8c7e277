//! Follower mounts (`walfs follow`), with real parts: a writer `walfs mount` and a follower
//! `walfs follow` on one moto bucket, `sqlite3` and SQLite connections reading through the
//! follower while the writer commits.
//!
//! What is asserted: rows committed through the writer are read through the follower
//! within the lag bound (p99 ≤ 2 s from the commit, which includes the writer's sync
//! interval and upload); readers running during the updates never see a torn state (an
//! invariant over many pages holds in every read, and a read transaction sees one state
//! from its first statement to its last); new databases appear and deleted ones go; the
//! follower's copy equals a verified restore page by page; an idle follower costs only
//! conditional GETs of the change feed; an encrypted replica needs its key; a follower
//! that fell behind catches up through compacted levels, and one whose copy is damaged
//! restores it afresh; a replica without a feed (`--no-follower-feed`, or written by
//! Litestream) is followed by listing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::scrape::Scrape;
use common::{
    as_strs, assert_same_database, is_mounted, sqlite3, wait_timeout, Mount, S3Fixture, BUCKET,
    S3_ENV, WALFS,
};
use rusqlite::{Connection, OpenFlags};

/// A running `walfs follow` of a replica at a fresh mountpoint.
struct Follower {
    dir: tempfile::TempDir,
    mountpoint: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Follower {
    /// Starts `walfs follow URL` with `extra` arguments and waits until it is ready (every
    /// database restored and the mount serving).
    fn start(url: &str, extra: &[&str], env: &[(&str, &str)]) -> Follower {
        let dir = tempfile::Builder::new()
            .prefix("walfs-follow-test-")
            .tempdir()
            .unwrap();
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        let ready = dir.path().join("ready");
        let log = dir.path().join("log");
        let own_cache = dir.path().join("cache");
        let cache = if extra.contains(&"--cache-dir") {
            vec![]
        } else {
            vec!["--cache-dir".as_ref(), own_cache.as_os_str()]
        };
        let child = Command::new(WALFS)
            .args(["follow", url])
            .arg(&mountpoint)
            .args(cache)
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .envs(S3_ENV.iter().copied())
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn walfs follow");
        let mut f = Follower {
            dir,
            mountpoint,
            child: Some(child),
            log,
        };
        let start = Instant::now();
        while !ready.exists() {
            if let Some(status) = f.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("walfs follow exited with {status}: {}", f.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "walfs follow was not ready within 30 s: {}",
                f.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(is_mounted(&f.mountpoint), "ready but not mounted");
        f
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, a clean exit, and no mount left.
    fn stop(&mut self) -> String {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(&mut child, Duration::from_secs(15))
            .unwrap_or_else(|| panic!("walfs follow did not exit: {}", self.log()));
        assert!(
            status.success(),
            "walfs follow exited with {status}: {}",
            self.log()
        );
        assert!(!is_mounted(&self.mountpoint));
        self.log()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        common::end_daemon(self.child.take(), &self.mountpoint);
    }
}

fn open_writer(path: &Path) -> Connection {
    let c = Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
        .unwrap();
    c
}

fn open_reader(path: &Path) -> Connection {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

/// Waits until `path` exists under the follower (a database the writer created).
fn wait_for_file(path: &Path, limit: Duration) -> Duration {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < limit,
            "{} did not appear within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// The TXID in `walfs restore`'s report ("restored app.db at TXID 42 (...)").
fn restore_txid(report: &str) -> u64 {
    let at = report.find(" at TXID ").expect(report) + " at TXID ".len();
    report[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The value at quantile `q` of `v`.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// A copy of the follower's file with the header fields the follower rewrites
/// (docs/SEMANTICS.md: journal mode bytes 18-19, change counter 24-27, version-valid-for
/// 92-95) taken from `reference`, so that the rest compares page by page.
fn follower_copy_with_header_of(follower_file: &Path, reference: &Path, out: &Path) {
    let mut bytes = std::fs::read(follower_file).unwrap();
    let r = std::fs::read(reference).unwrap();
    for range in [18..20, 24..28, 92..96] {
        bytes[range.clone()].copy_from_slice(&r[range]);
    }
    std::fs::write(out, bytes).unwrap();
}

#[test]
fn rows_committed_on_the_writer_are_read_through_the_follower_within_the_bound() {
    let r = S3Fixture::new("follow-lag");
    let mut w = r.mount(&["--sync-interval", "100ms"]);
    let c = open_writer(&w.path("app.db"));
    c.execute_batch("CREATE TABLE t(i INTEGER PRIMARY KEY, at INTEGER, pad BLOB);")
        .unwrap();
    c.execute("INSERT INTO t VALUES (0, 0, randomblob(3000))", [])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let port = common::free_port();
    let mut f = Follower::start(
        &r.url(),
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
        &[],
    );
    let db = f.path("app.db");
    assert_eq!(sqlite3(&db, "SELECT count(*) FROM t;"), "1\n");

    // One long-lived reader connection polls for each row: it must see new versions
    // without reopening (its page cache is dropped when the version changes).
    let reader = open_reader(&db);
    let mut lags = Vec::new();
    for i in 1..=60i64 {
        let committed = Instant::now();
        c.execute(
            "INSERT INTO t VALUES (?1, ?1, randomblob(3000))",
            rusqlite::params![i],
        )
        .unwrap();
        loop {
            let max: i64 = reader
                .query_row("SELECT max(i) FROM t", [], |r| r.get(0))
                .unwrap();
            if max >= i {
                break;
            }
            assert!(
                committed.elapsed() < Duration::from_secs(20),
                "row {i} not visible through the follower after 20 s: {}",
                f.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        lags.push(committed.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(150));
    }
    let p50 = quantile(&mut lags, 0.5);
    let p99 = quantile(&mut lags, 0.99);
    let max = quantile(&mut lags, 1.0);
    eprintln!(
        "commit → visible through the follower: p50 {p50:.3} s, p99 {p99:.3} s, max {max:.3} s"
    );
    assert!(p99 <= 2.0, "p99 lag {p99:.3} s > 2 s (p50 {p50:.3} s)");

    // sqlite3 through the follower sees what the writer has.
    assert_eq!(
        sqlite3(&db, "SELECT count(*), sum(at) FROM t;"),
        sqlite3(&w.path("app.db"), "SELECT count(*), sum(at) FROM t;")
    );
    assert_eq!(sqlite3(&db, "PRAGMA integrity_check;"), "ok\n");
    drop(reader);
    drop(c);
    w.stop();

    // Once the writer is done, the follower's file equals a verified restore page by
    // page, but for the header fields it serves rewritten.
    std::thread::sleep(Duration::from_secs(2));
    let (restored, _) = r.restore("app.db", "app.db", &[]);
    let copy = r.out("follower-copy.db");
    follower_copy_with_header_of(&db, &restored, &copy);
    assert_same_database(&restored, &copy);
    let head = std::fs::read(&db).unwrap();
    assert_eq!(&head[18..20], &[1, 1], "served in rollback-journal mode");

    // Its metrics say which TXID it serves: the one the restore verified.
    let txid = restore_txid(&r.restore("app.db", "again.db", &[]).1);
    let m = Scrape::take(port);
    assert_eq!(
        m.must("walfs_follower_txid", &["db=\"app.db\""]),
        txid as f64,
        "{m}"
    );
    let polled = m.must("walfs_follower_last_poll_timestamp_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(now - polled < 5.0, "last poll {polled}, now {now}");
    assert!(m.must("walfs_follower_applied_total", &[]) >= 60.0, "{m}");
    assert_eq!(
        m.must("walfs_follower_readers", &["db=\"app.db\""]),
        0.0,
        "{m}"
    );

    // Read-only: no write, no journal, no WAL.
    let err = Connection::open(&db)
        .and_then(|c| c.execute("INSERT INTO t VALUES (999, 0, NULL)", []))
        .unwrap_err();
    assert!(err.to_string().contains("readonly"), "{err}");
    assert!(std::fs::File::create(f.path("new.db")).is_err());
    let log = f.stop();
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn readers_during_updates_never_see_a_torn_state() {
    const ACCOUNTS: i64 = 200;
    let r = S3Fixture::new("follow-consistency");
    let mut w = r.mount(&["--sync-interval", "50ms"]);
    let c = open_writer(&w.path("bank.db"));
    // Each account row is ~1 KiB, so the table spans ~60 pages and a transfer between two
    // random accounts usually changes two pages far apart, plus the log and the counter.
    c.execute_batch(
        "CREATE TABLE account(id INTEGER PRIMARY KEY, balance INTEGER, pad BLOB);
         CREATE TABLE log(n INTEGER PRIMARY KEY, src INTEGER, dst INTEGER);
         CREATE TABLE meta(k TEXT PRIMARY KEY, n INTEGER);
         INSERT INTO meta VALUES ('n', 0);",
    )
    .unwrap();
    for id in 0..ACCOUNTS {
        c.execute(
            "INSERT INTO account VALUES (?1, 1000, randomblob(1000))",
            [id],
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let f = Follower::start(&r.url(), &["--poll-interval", "300ms"], &[]);
    let db = f.path("bank.db");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0i64;
            let mut x = 12345u64;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let src = ((x >> 33) % ACCOUNTS as u64) as i64;
                let dst = ((x >> 13) % ACCOUNTS as u64) as i64;
                let amount = ((x >> 5) % 50) as i64;
                n += 1;
                c.execute_batch(&format!(
                    "BEGIN;
                     UPDATE account SET balance = balance - {amount}, pad = randomblob(1000) WHERE id = {src};
                     UPDATE account SET balance = balance + {amount}, pad = randomblob(1000) WHERE id = {dst};
                     INSERT INTO log VALUES ({n}, {src}, {dst});
                     UPDATE meta SET n = {n};
                     COMMIT;"
                ))
                .unwrap();
                std::thread::sleep(Duration::from_millis(15));
            }
            n
        })
    };

    // Readers: connections held open across many transactions, each transaction reading
    // the counter, sleeping while versions arrive, then checking every invariant.
    let checks = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..4)
        .map(|k| {
            let (db, stop, checks) = (db.clone(), stop.clone(), checks.clone());
            std::thread::spawn(move || {
                let c = open_reader(&db);
                let mut seen = std::collections::BTreeSet::new();
                while !stop.load(Ordering::Relaxed) {
                    c.execute_batch("BEGIN").unwrap();
                    let n1: i64 = c.query_row("SELECT n FROM meta", [], |r| r.get(0)).unwrap();
                    std::thread::sleep(Duration::from_millis(40 + 20 * k));
                    let (sum, count): (i64, i64) = c
                        .query_row("SELECT sum(balance), count(*) FROM account", [], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                        .unwrap();
                    let logged: i64 = c
                        .query_row("SELECT count(*) FROM log", [], |r| r.get(0))
                        .unwrap();
                    let n2: i64 = c.query_row("SELECT n FROM meta", [], |r| r.get(0)).unwrap();
                    c.execute_batch("COMMIT").unwrap();
                    assert_eq!(n1, n2, "the counter changed inside one read transaction");
                    assert_eq!(sum, ACCOUNTS * 1000, "money appeared or vanished at n={n1}");
                    assert_eq!(count, ACCOUNTS);
                    assert_eq!(logged, n1, "log and counter disagree");
                    seen.insert(n1);
                    checks.fetch_add(1, Ordering::Relaxed);
                }
                seen.len()
            })
        })
        .collect();
    // And whole-file checks by separate sqlite3 processes, in autocommit mode.
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut cli_checks = 0;
    while Instant::now() < deadline {
        let out = sqlite3(
            &db,
            "PRAGMA quick_check; SELECT sum(balance) FROM account; SELECT (SELECT count(*) FROM log) = (SELECT n FROM meta);",
        );
        assert_eq!(
            out,
            format!("ok\n{}\n1\n", ACCOUNTS * 1000),
            "sqlite3 saw {out}"
        );
        cli_checks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    let distinct: Vec<usize> = readers.into_iter().map(|h| h.join().unwrap()).collect();
    eprintln!(
        "{written} transfers written; {} reader transactions and {cli_checks} sqlite3 checks, all consistent; distinct states per reader {distinct:?}",
        checks.load(Ordering::Relaxed)
    );
    assert!(written > 200, "only {written} transfers");
    // The readers saw the database move: many states, not one.
    assert!(
        distinct.iter().all(|d| *d >= 10),
        "readers saw too few states: {distinct:?}: {}",
        f.log()
    );
    w.stop();
}

#[test]
fn databases_appear_and_go_with_the_writer_and_an_idle_follower_only_reads_the_feed() {
    let r = S3Fixture::new("follow-namespace");
    let mut w = r.mount(&["--sync-interval", "100ms"]);
    sqlite3(
        &w.path("a.db"),
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1);",
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut f = Follower::start(&r.url(), &[], &[]);
    assert_eq!(sqlite3(&f.path("a.db"), "SELECT x FROM t;"), "1\n");

    // A new database in a directory, and a rollback-journal one, appear.
    std::fs::create_dir_all(w.path("tenants")).unwrap();
    sqlite3(
        &w.path("tenants/b.db"),
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (2);",
    );
    sqlite3(
        &w.path("c.db"),
        "CREATE TABLE t(x); INSERT INTO t VALUES (3);",
    );
    let took = wait_for_file(&f.path("tenants/b.db"), Duration::from_secs(10));
    wait_for_file(&f.path("c.db"), Duration::from_secs(10));
    eprintln!("a new database appeared through the follower after {took:?}");
    assert_eq!(sqlite3(&f.path("tenants/b.db"), "SELECT x FROM t;"), "2\n");
    assert_eq!(sqlite3(&f.path("c.db"), "SELECT x FROM t;"), "3\n");
    let mut names: Vec<String> = std::fs::read_dir(&f.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a.db", "c.db", "tenants"]);

    // Idle: the follower makes only conditional GETs of the feed, backing off to its
    // poll interval (1 s): no LIST, no GET of an object.
    // (The follower's polls never let moto's log settle: wait out the writer's uploads.)
    std::thread::sleep(Duration::from_secs(4));
    let settled = r.moto.requests().len();
    std::thread::sleep(Duration::from_secs(6));
    let idle = r.moto.requests()[settled..].to_vec();
    assert!(
        // (moto colours some lines: the method may follow an escape sequence.)
        idle.iter()
            .all(|q| q.contains("GET /") && q.ends_with("/.walfs-feed")),
        "an idle follower made other requests: {idle:?}"
    );
    assert!(
        (3..=8).contains(&idle.len()),
        "{} feed reads in 6 s idle: {idle:?}",
        idle.len()
    );

    // A database deleted on the writer goes from the follower.
    std::fs::remove_file(w.path("tenants/b.db")).unwrap();
    let start = Instant::now();
    while f.path("tenants/b.db").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "tenants/b.db still under the follower: {}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!f.path("tenants").exists(), "its empty directory stays");
    assert!(f.path("a.db").exists());

    // A writer restart (a new feed epoch) goes on being followed.
    w.stop();
    r.restart(&mut w, &["--sync-interval", "100ms"]);
    sqlite3(&w.path("a.db"), "INSERT INTO t VALUES (4);");
    let start = Instant::now();
    while sqlite3(&f.path("a.db"), "SELECT count(*) FROM t;") != "2\n" {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the commit after the writer's restart did not arrive: {}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    w.stop();
    f.stop();
}

#[test]
fn an_encrypted_replica_is_followed_with_its_key_and_refused_without() {
    let r = S3Fixture::new("follow-encrypted");
    let key = r.dir.path().join("key");
    let bytes: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    std::fs::write(&key, bytes).unwrap();
    let key_s = key.display().to_string();
    let mut w = Mount::with_env(
        &as_strs(&r.args(&["--sync-interval", "100ms", "--encryption-key-file", &key_s])),
        S3_ENV,
    );
    sqlite3(
        &w.path("s.db"),
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES ('secret');",
    );
    std::thread::sleep(Duration::from_millis(800));

    // Without the key: one line that names the key needed.
    let line = refused(
        &r.url(),
        &r.dir.path().join("nokey"),
        &r.dir.path().join("nokey-cache"),
    );
    assert!(
        line.starts_with("walfs: error:") && line.contains("key"),
        "{line}"
    );

    let mut f = Follower::start(&r.url(), &["--encryption-key-file", &key_s], &[]);
    assert_eq!(sqlite3(&f.path("s.db"), "SELECT x FROM t;"), "secret\n");
    sqlite3(&w.path("s.db"), "INSERT INTO t VALUES ('more');");
    let start = Instant::now();
    while sqlite3(&f.path("s.db"), "SELECT count(*) FROM t;") != "2\n" {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", f.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    f.stop();
    w.stop();
}

/// `walfs follow URL MNT --cache-dir CACHE` expected to refuse to start: its last line.
fn refused(url: &str, mnt: &Path, cache: &Path) -> String {
    std::fs::create_dir_all(mnt).unwrap();
    let mut child = Command::new(WALFS)
        .args(["follow", url])
        .arg(mnt)
        .arg("--cache-dir")
        .arg(cache)
        .envs(S3_ENV.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(30)).expect("it exits");
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(!is_mounted(mnt));
    err.lines().last().unwrap_or("").to_string()
}

#[test]
fn a_cache_dir_of_other_files_or_of_another_follower_is_refused() {
    let r = S3Fixture::new("follow-cache");
    let mut w = r.mount(&["--sync-interval", "100ms"]);
    sqlite3(
        &w.path("a.db"),
        "CREATE TABLE t(x); INSERT INTO t VALUES (1);",
    );
    std::thread::sleep(Duration::from_millis(800));
    // A mistyped --cache-dir that holds other files: refused, and its files stay.
    let other = r.dir.path().join("home");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let line = refused(&r.url(), &r.dir.path().join("m1"), &other);
    assert!(
        line.starts_with("walfs: error:") && line.contains("--cache-dir"),
        "{line}"
    );
    assert_eq!(
        std::fs::read_to_string(other.join("notes.txt")).unwrap(),
        "mine"
    );
    // Another follower's cache, while it runs: refused, and that follower still serves.
    let mut f = Follower::start(&r.url(), &[], &[]);
    let line = refused(
        &r.url(),
        &r.dir.path().join("m2"),
        &f.dir.path().join("cache"),
    );
    assert!(line.contains("in use by another walfs follow"), "{line}");
    assert_eq!(sqlite3(&f.path("a.db"), "SELECT x FROM t;"), "1\n");
    // Once it stopped, the cache is a follower's: taken again (and emptied).
    f.stop();
    let mut g = Follower::start(
        &r.url(),
        &[
            "--cache-dir",
            &f.dir.path().join("cache").display().to_string(),
        ],
        &[],
    );
    assert_eq!(sqlite3(&g.path("a.db"), "SELECT x FROM t;"), "1\n");
    g.stop();
    w.stop();
}

/// Waits until `sql` through the follower prints `want`.
fn wait_for_answer(f: &Follower, db: &str, sql: &str, want: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let o = common::run_sqlite3(&f.path(db), sql);
        if o.status.success() && String::from_utf8_lossy(&o.stdout) == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{db} did not answer {want:?} to {sql} within {limit:?} (it said {:?} {:?}): {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            f.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_writer_without_the_feed_is_followed_by_listing_each_database() {
    let r = S3Fixture::new("follow-nofeed");
    // A feed an earlier writer left: trusted, it would hide every later commit.
    let o = r.moto.boto3(&format!(
        "s3.put_object(Bucket='{BUCKET}', Key='follow-nofeed/.walfs-feed', \
         Body=b'walfs-feed 1\\nepoch 1\\nseq 1\\n')"
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stale_put = r.moto.requests().len();
    let mut w = r.mount(&["--sync-interval", "100ms", "--no-follower-feed"]);
    sqlite3(
        &w.path("a.db"),
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1);",
    );
    std::thread::sleep(Duration::from_millis(800));
    let o = r.moto.boto3(&format!(
        "keys = s3.list_objects_v2(Bucket='{BUCKET}', Prefix='follow-nofeed/').get('Contents', [])\n\
         print(any(k['Key'].endswith('/.walfs-feed') for k in keys))"
    ));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "False",
        "the earlier writer's feed is still there: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let f = Follower::start(&r.url(), &["--poll-interval", "500ms"], &[]);
    sqlite3(&w.path("a.db"), "INSERT INTO t VALUES (2);");
    let took = wait_for_answer(
        &f,
        "a.db",
        "SELECT count(*) FROM t;",
        "2\n",
        Duration::from_secs(10),
    );
    eprintln!("without a feed, a commit showed after {took:?}");
    assert!(
        !r.moto.requests()[stale_put..]
            .iter()
            .any(|q| q.contains("PUT ") && q.ends_with("/.walfs-feed")),
        "--no-follower-feed put the feed"
    );
    // What it costs while idle: one LIST of level 0 (and one GET finding no feed) per poll.
    std::thread::sleep(Duration::from_secs(3));
    let before = r.moto.requests().len();
    std::thread::sleep(Duration::from_secs(5));
    let idle = r.moto.requests()[before..].to_vec();
    let lists = idle.iter().filter(|q| q.contains("list-type=2")).count();
    assert!((6..=14).contains(&lists), "{lists} LISTs in 5 s: {idle:?}");
    w.stop();
}

#[test]
fn a_follower_that_fell_behind_catches_up_from_compacted_levels_and_a_damaged_copy_is_restored_afresh(
) {
    let r = S3Fixture::new("follow-behind");
    // Level 0 is compacted into level 1 every second and kept for a second only.
    let args = [
        "--sync-interval",
        "100ms",
        "--compaction-intervals",
        "1s,10s",
        "--l0-retention",
        "1s",
    ];
    let mut w = r.mount(&args);
    let c = open_writer(&w.path("app.db"));
    c.execute_batch("CREATE TABLE t(i INTEGER PRIMARY KEY, v BLOB);")
        .unwrap();
    for i in 0..20 {
        c.execute("INSERT INTO t VALUES (?1, randomblob(2000))", [i])
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(800));
    let mut f = Follower::start(&r.url(), &[], &[]);
    wait_for_answer(
        &f,
        "app.db",
        "SELECT count(*) FROM t;",
        "20\n",
        Duration::from_secs(10),
    );

    // The follower stops (SIGSTOP) while the writer commits and compacts level 0 away.
    let pid = f.child.as_ref().unwrap().id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    for i in 20..60 {
        c.execute("INSERT INTO t VALUES (?1, randomblob(2000))", [i])
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(4));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_for_answer(
        &f,
        "app.db",
        "SELECT count(*) FROM t;",
        "60\n",
        Duration::from_secs(15),
    );
    let log = f.log();
    assert!(
        !log.contains("restored afresh"),
        "it restored instead of catching up from the compacted levels: {log}"
    );

    // Its copy is damaged on disk: the next object's checksum does not match what it
    // holds, and it restores the database afresh, saying why.
    let cache = f.dir.path().join("cache");
    let base = std::fs::read_dir(cache.join("1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("base-")
        })
        .expect("a base file");
    let mut bytes = std::fs::read(&base).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0xff;
    std::fs::write(&base, bytes).unwrap();
    c.execute("UPDATE t SET v = randomblob(2000)", []).unwrap();
    let log_has = |s: &str| {
        let start = Instant::now();
        while !f.log().contains(s) {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "no {s:?}: {}",
                f.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    log_has("restored afresh");
    let log = f.log();
    assert!(
        log.contains("its verification record says"),
        "the restore was not for the checksum: {log}"
    );
    drop(c);
    w.stop();
    std::thread::sleep(Duration::from_secs(2));
    let (restored, _) = r.restore("app.db", "app.db", &[]);
    let copy = r.out("follower-copy.db");
    follower_copy_with_header_of(&f.path("app.db"), &restored, &copy);
    assert_same_database(&restored, &copy);
    f.stop();
}

#[test]
fn a_replica_written_by_litestream_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let rep = dir.path().join("rep");
    sqlite3(
        &db,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);",
    );
    let mut ls = Command::new(common::litestream())
        .arg("replicate")
        .arg(&db)
        .arg(format!("file://{}", rep.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn litestream");
    let start = Instant::now();
    while !rep.join("ltx").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "litestream wrote nothing"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    // A database at the replica's root, shown under --root-name; no feed: polled.
    let f = Follower::start(
        &format!("file://{}", rep.display()),
        &["--root-name", "app.db", "--poll-interval", "500ms"],
        &[],
    );
    wait_for_answer(
        &f,
        "app.db",
        "SELECT count(*) FROM t;",
        "2\n",
        Duration::from_secs(10),
    );
    let c = open_writer(&db);
    for i in 3..=40 {
        c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
    }
    wait_for_answer(
        &f,
        "app.db",
        "SELECT count(*), sum(x) FROM t;",
        "40|820\n",
        Duration::from_secs(20),
    );
    assert_eq!(
        sqlite3(&f.path("app.db"), "PRAGMA integrity_check;"),
        "ok\n"
    );
    let log = f.log();
    assert!(!log.contains("restored afresh"), "{log}");
    drop(c);
    ls.kill().ok();
    ls.wait().ok();
}

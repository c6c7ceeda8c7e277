//! Capture never changes what the application sees, and never stops replicating (issue 17),
//! on a real mount with a replica on:
//! - states that SQLite accepts but capture cannot follow incrementally (a `-wal` of another
//!   page size, a database file that is empty or zeroed for a moment beside a `-wal` or a
//!   hot journal) give the application exactly what the bare directory gives, and the
//!   replica restarts from a snapshot that equals what SQLite reads;
//! - `isatty()` on a file in the mount is ENOTTY, and quiet;
//! - a daemon killed under a writer leaves no database unreplicated: after the next mount,
//!   with no further write, every replica equals its live database within seconds.

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_replica_follows, assert_same_database, restored_txid, sqlite_view, Mount, Rng,
    S3Fixture, S3_ENV,
};
use rusqlite::Connection;

/// A mount replicating to `replica` (a `file://` URL), staging in `dir/staging`, its log
/// collected. (The tests that replicate to S3 use [`S3Fixture`].)
fn mount(dir: &Path, replica: &str, sync_interval: &str) -> Mount {
    let staging = dir.join("staging").display().to_string();
    Mount::with_env(
        &[
            "--replica",
            replica,
            "--staging-dir",
            &staging,
            "--sync-interval",
            sync_interval,
        ],
        &[],
    )
}

/// Runs `f` on a connection to `path` and reports what the application saw, as text: the
/// rows, or the error.
fn seen<T: std::fmt::Debug>(
    path: &Path,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> String {
    let c = match Connection::open(path) {
        Ok(c) => c,
        Err(e) => return format!("open: {e}"),
    };
    let out = match f(&c) {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("error: {e}"),
    };
    match c.close() {
        Ok(()) => out,
        Err((_, e)) => format!("{out}; close: {e}"),
    }
}

fn names(c: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare("SELECT name FROM sqlite_master ORDER BY name")?;
    let rows = st.query_map([], |r| r.get(0))?;
    rows.collect()
}

/// The files of `dir` with their sizes (`-shm` left out: its size depends on nothing the
/// application sees), sorted.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .filter(|(n, _)| !n.ends_with("-shm"))
        .collect();
    out.sort();
    out
}

/// The committed `-wal` of a database with `page_size`-byte pages, page 1 included, as
/// another program would leave it: the WAL bytes of a temporary database with table
/// `foreign` and one row, copied while its connection is still open.
fn foreign_wal(page_size: u32) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("other.db");
    let c = Connection::open(&p).unwrap();
    c.execute_batch(&format!(
        "PRAGMA page_size={page_size}; PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
         CREATE TABLE foreign_t(x); INSERT INTO foreign_t VALUES ('from another database');"
    ))
    .unwrap();
    let wal = std::fs::read(dir.path().join("other.db-wal")).unwrap();
    drop(c);
    wal
}

/// Asserts that the daemon failed no operation and never got stuck.
fn assert_no_failure(log: &str) {
    for bad in [
        "fails with EIO",
        "failing the operation",
        "is unreadable",
        "panicked",
        "Not Implemented",
    ] {
        assert!(!log.contains(bad), "the daemon logged {bad:?}:\n{log}");
    }
}

/// A `-wal` whose page size differs from the database file's (SQLite accepts it: page 1
/// comes from the log) works through the mount exactly as on the bare directory, the
/// database can be deleted, and its replica restarts with a snapshot equal to what SQLite
/// reads. Before issue 17 the checkpoint's fsync and then the unlink got EIO, and the
/// uploader retried an unreadable staged file forever.
#[test]
fn a_wal_of_another_page_size_fails_nothing_and_the_replica_follows() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("replica").display());
    let m = mount(dir.path(), &url, "100ms");
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let wal = foreign_wal(512);
    let run = |d: &Path| -> Vec<String> {
        let db = d.join("b.db");
        let mut seen_by_app = vec![seen(&db, |c| {
            c.execute_batch(
                "PRAGMA page_size=1024; PRAGMA journal_mode=WAL;
                 CREATE TABLE u(y); INSERT INTO u VALUES ('b');",
            )?;
            names(c)
        })];
        std::fs::write(d.join("b.db-wal"), &wal).unwrap();
        seen_by_app.push(seen(&db, |c| {
            let before = names(c)?;
            c.execute(
                "INSERT INTO foreign_t VALUES ('written through SQLite')",
                [],
            )?;
            let ck: (i64, i64, i64) = c.query_row("PRAGMA wal_checkpoint", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            Ok((before, ck))
        }));
        seen_by_app.push(seen(&db, |c| {
            c.execute("INSERT INTO foreign_t VALUES ('later')", [])?;
            let n: i64 = c.query_row("SELECT count(*) FROM foreign_t", [], |r| r.get(0))?;
            let ps: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            Ok((n, ps))
        }));
        seen_by_app.push(format!("{:?}", listing(d)));
        seen_by_app
    };
    let on_plain = run(&plain);
    let on_mount = run(&m.mountpoint);
    assert_eq!(
        on_mount, on_plain,
        "the mount behaved unlike the bare directory"
    );
    assert_eq!(
        std::fs::read(m.backing_path("b.db")).unwrap(),
        std::fs::read(plain.join("b.db")).unwrap()
    );
    // The replica holds what SQLite reads: the log's database, page size 512.
    let log = assert_replica_follows(&url, &[], &m, "b.db", Duration::from_secs(10));
    assert!(log.contains("content checksum matches"), "{log}");
    // It goes on following: a write after the restart is replicated as well.
    seen(&m.path("b.db"), |c| {
        c.execute("DELETE FROM foreign_t WHERE x = 'later'", [])
    });
    assert_replica_follows(&url, &[], &m, "b.db", Duration::from_secs(10));
    std::fs::remove_file(m.path("b.db")).expect("a database must always be deletable");
    let mut m = m;
    let log = m.stop();
    assert_no_failure(&log);
    assert!(
        log.contains("capture healed with a snapshot") && log.contains("page size"),
        "the restart must be logged with its reason: {log}"
    );
}

/// Restores `rel` from `url` (at `txid`, or the latest) into `out`; the TXID restored,
/// or the restore's error output.
fn restore_at(url: &str, rel: &str, out: &Path, txid: Option<u64>) -> Result<u64, String> {
    let _ = std::fs::remove_file(out);
    let mut cmd = Command::new(common::WALFS);
    cmd.args(["restore", url, "--db", rel, "-o"]).arg(out);
    if let Some(t) = txid {
        cmd.args(["--txid", &t.to_string()]);
    }
    let o = cmd.output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    if o.status.success() {
        Ok(restored_txid(&log))
    } else {
        Err(log)
    }
}

/// The moments before a break stay restorable: a database's first TXIDs, uploaded at
/// level 0 in the same round as the snapshot of another database moved over it (the
/// history starts afresh), still restore after retention ran. Found by fuzz seed
/// 0xabcd5, sequence 393: retention deleted everything below the oldest snapshot as soon
/// as it was uploaded, though those moments were inside the retention window.
#[test]
fn the_moments_before_a_break_stay_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("replica").display());
    // A sync interval longer than the writes below: the first round uploads the commits
    // and the snapshot of the break together, so no snapshot of the first history exists.
    let m = mount(dir.path(), &url, "3s");
    let scratch = tempfile::tempdir().unwrap();
    let c = Connection::open(m.path("c.db")).unwrap();
    c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x);")
        .unwrap();
    for i in 0..3 {
        c.execute("INSERT INTO t VALUES (?1)", [format!("row {i}")])
            .unwrap();
    }
    drop(c);
    let before = sqlite_view(&m.backing_path("c.db"), &scratch.path().join("before"))
        .expect("c.db is a database");
    // Another database (another page size, rollback mode) moved over it: a break.
    let other = Connection::open(m.path("other.tmp")).unwrap();
    other
        .execute_batch(
            "PRAGMA page_size=1024; CREATE TABLE moved(y); INSERT INTO moved VALUES ('moved');",
        )
        .unwrap();
    drop(other);
    std::fs::rename(m.path("other.tmp"), m.path("c.db")).unwrap();
    assert_replica_follows(&url, &[], &m, "c.db", Duration::from_secs(15));
    // Retention runs after each upload; give it a moment.
    std::thread::sleep(Duration::from_secs(1));
    // The snapshot of the break ends at TXID n; n - 1 is the last commit before it.
    let snapshots: Vec<String> = std::fs::read_dir(dir.path().join("replica/c.db/ltx/9"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        snapshots.len(),
        1,
        "one snapshot, the break's: {snapshots:?}"
    );
    let n = u64::from_str_radix(&snapshots[0][17..33], 16).unwrap();
    let out = scratch.path().join("restored.db");
    match restore_at(&url, "c.db", &out, Some(n - 1)) {
        Ok(got) => {
            assert_eq!(got, n - 1);
            assert_same_database(&before, &out);
        }
        Err(e) => panic!(
            "TXID {}, before the break, no longer restores: {e}\n{}",
            n - 1,
            m.log()
        ),
    }
    let mut m = m;
    assert_no_failure(&m.stop());
}

/// A connection in `locking_mode=EXCLUSIVE` keeps writing pages of the size it knows into
/// a database file that another program rewrote in place with another page size (SQLite
/// does not look again while it holds the lock). Its journal then counts pages of the old
/// size, which name other bytes of the new file: capture compares the whole file instead,
/// and the replica holds the file's bytes. Found by fuzz seed 0xd00d5, sequence 392.
#[test]
fn a_journal_of_another_page_size_than_the_file_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("replica").display());
    let mut m = mount(dir.path(), &url, "100ms");
    let scratch = tempfile::tempdir().unwrap();
    // Another database, of page size 32768, as its bytes.
    let other = scratch.path().join("other.db");
    {
        let c = Connection::open(&other).unwrap();
        c.execute_batch(
            "PRAGMA page_size=32768; CREATE TABLE o(x); INSERT INTO o VALUES (randomblob(40000));",
        )
        .unwrap();
    }
    let other = std::fs::read(&other).unwrap();
    let a = Connection::open(m.path("a.db")).unwrap();
    a.execute_batch(
        "PRAGMA page_size=2048; PRAGMA journal_mode=DELETE; PRAGMA locking_mode=EXCLUSIVE;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);",
    )
    .unwrap();
    for _ in 0..12 {
        a.execute("INSERT INTO t(v) VALUES (randomblob(1500))", [])
            .unwrap();
    }
    // Rewritten in place (same inode) while `a` holds its exclusive lock.
    std::fs::write(m.path("a.db"), &other).unwrap();
    // Updates of the same size: in exclusive mode SQLite leaves page 1 (and so the new
    // header) alone, and writes 2048-byte pages into the 32768-byte pages of the file.
    for id in [3, 7, 11] {
        a.execute("UPDATE t SET v = randomblob(1500) WHERE id = ?1", [id])
            .unwrap();
    }
    drop(a);
    let live = sqlite_view(&m.backing_path("a.db"), &scratch.path().join("live"))
        .expect("SQLite reads a database");
    let live = std::fs::read(live).unwrap();
    assert_eq!(&live[16..18], &[0x80, 0], "the header still says 32768");
    let out = scratch.path().join("restored.db");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let restored = restore_at(&url, "a.db", &out, None).map(|_| std::fs::read(&out).unwrap());
        if restored.as_ref().is_ok_and(|r| *r == live) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica does not hold what SQLite reads ({}):\n{}",
            match &restored {
                Ok(r) => format!(
                    "{} bytes restored, {} live; first difference at byte {:?}",
                    r.len(),
                    live.len(),
                    r.iter().zip(&live).position(|(x, y)| x != y)
                ),
                Err(e) => e.clone(),
            },
            m.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_no_failure(&m.stop());
}

/// A database file that is momentarily not a database (emptied beside a `-wal` that the
/// next opener deletes; zeroed beside a hot journal that the next opener rolls back) works
/// through the mount exactly as on the bare directory, and the replica ends equal to what
/// SQLite reads. Before issue 17 the application's reads failed with "disk I/O error"
/// and the unlink with EIO.
#[test]
fn a_database_that_is_not_sqlite_for_a_moment_fails_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("replica").display());
    let m = mount(dir.path(), &url, "100ms");
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let wal = foreign_wal(512);
    let run = |d: &Path| -> Vec<String> {
        let mut out = Vec::new();
        // An empty database file beside a WAL: SQLite deletes the WAL and sees an empty
        // database.
        let z = d.join("z.db");
        out.push(seen(&z, |c| {
            c.execute_batch(
                "PRAGMA journal_mode=WAL; CREATE TABLE u(y); INSERT INTO u VALUES ('z');",
            )
        }));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&z)
            .unwrap()
            .set_len(0)
            .unwrap();
        std::fs::write(d.join("z.db-wal"), &wal).unwrap();
        out.push(seen(&z, names));
        out.push(seen(&z, |c| {
            c.execute_batch("CREATE TABLE v(z); INSERT INTO v VALUES (1);")?;
            names(c)
        }));
        // A zeroed header beside a hot journal: the next opener rolls the journal back.
        let r = d.join("r.db");
        out.push(seen(&r, |c| {
            c.execute_batch(
                "CREATE TABLE t(x); INSERT INTO t VALUES (randomblob(100));
                 PRAGMA cache_size=2; BEGIN;",
            )?;
            for _ in 0..60 {
                c.execute("INSERT INTO t VALUES (randomblob(600))", [])?;
            }
            // A crash here: the journal is hot and the file holds spilled pages.
            let journal = std::fs::read(d.join("r.db-journal")).unwrap();
            let file = std::fs::read(&r).unwrap();
            c.execute_batch("ROLLBACK")?;
            std::fs::write(d.join("r.db-journal"), &journal).unwrap();
            let mut zeroed = file;
            zeroed[..100].fill(0);
            std::fs::write(&r, &zeroed).unwrap();
            Ok(())
        }));
        out.push(seen(&r, |c| {
            let n: i64 = c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?;
            c.execute("INSERT INTO t VALUES (randomblob(10))", [])?;
            Ok(n)
        }));
        out.push(format!("{:?}", listing(d)));
        out.push(format!(
            "{:?}",
            std::fs::remove_file(&z).map_err(|e| e.to_string())
        ));
        out
    };
    let on_plain = run(&plain);
    let on_mount = run(&m.mountpoint);
    assert_eq!(
        on_mount, on_plain,
        "the mount behaved unlike the bare directory"
    );
    let log = assert_replica_follows(&url, &[], &m, "r.db", Duration::from_secs(10));
    assert!(log.contains("content checksum matches"), "{log}");
    let mut m = m;
    assert_no_failure(&m.stop());
}

/// `isatty()` on a file in the mount answers "not a terminal" (ENOTTY) as on ext4, and
/// the daemon logs nothing about it (it logged a warning per call before issue 17).
#[test]
fn isatty_is_enotty_and_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("replica").display());
    let mut m = mount(dir.path(), &url, "100ms");
    let f = std::fs::File::create(m.path("plain.txt")).unwrap();
    for _ in 0..20 {
        // SAFETY: a valid open descriptor.
        assert_eq!(unsafe { libc::isatty(f.as_raw_fd()) }, 0);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOTTY)
        );
    }
    drop(f);
    let log = m.stop();
    assert_no_failure(&log);
    assert!(!log.contains("ioctl"), "{log}");
}

/// A writer process on the mount: `sqlite3` inserting in a loop, one transaction each.
fn spawn_writer(db: &Path, mode: &str, synchronous: &str) -> Child {
    let mut sql = format!(
        "PRAGMA journal_mode={mode}; PRAGMA synchronous={synchronous};
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB);\n"
    );
    for i in 0..20_000 {
        sql.push_str(&format!(
            "INSERT INTO t(v) VALUES (randomblob({}));\n",
            50 + (i * 37) % 3000
        ));
        if i % 500 == 499 {
            sql.push_str("DELETE FROM t WHERE id % 3 = 0;\n");
        }
    }
    let mut child = Command::new("sqlite3")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sqlite3");
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(sql.as_bytes());
    });
    child
}

fn kill_all(children: &mut Vec<Child>) {
    for c in children.iter_mut() {
        let _ = c.kill();
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
    children.clear();
}

/// A new rollback-journal database written when walfs is killed (the writer dies with it)
/// is replicated after the next mount without any further write. Before issue 17 its
/// first batch waited in the active segment until the next write, forever if none came.
#[test]
fn a_database_written_when_walfs_is_killed_is_replicated_after_the_next_mount() {
    let f = S3Fixture::new("killed");
    // A sync interval longer than the writer's life: nothing is uploaded before the kill.
    let args = ["--sync-interval", "3s"];
    let mut m = f.mount(&args);
    let mut writers = vec![spawn_writer(&m.path("new.db"), "DELETE", "FULL")];
    std::thread::sleep(Duration::from_millis(1000));
    m.kill9();
    kill_all(&mut writers);
    f.restart(&mut m, &args);
    // No write: the staged batch and the current state reach the replica within one sync
    // interval.
    let log = assert_replica_follows(&f.url(), S3_ENV, &m, "new.db", Duration::from_secs(8));
    assert!(restored_txid(&log) >= 1);
    assert_no_failure(&m.stop());
}

/// walfs is killed (SIGKILL) at random moments while WAL and rollback-journal writers run
/// (the writers die with the mount), and mounted again with no further write: every
/// database's replica equals its live state (what SQLite reads from the backing files,
/// a hot journal rolled back) within a few seconds, round after round, on one replica.
#[test]
fn killed_and_remounted_under_writers_every_replica_equals_its_database() {
    let seed: u64 = std::env::var("WALFS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(17);
    let rounds: usize = std::env::var("WALFS_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    eprintln!("crash-restart: seed {seed}, {rounds} rounds (WALFS_CRASH_SEED, WALFS_CRASH_ROUNDS)");
    let mut rng = Rng(seed);
    let f = S3Fixture::new("crash");
    let url = f.url();
    let args = ["--sync-interval", "500ms"];
    let mut m = f.mount(&args);
    let dbs: [(&str, &str, &str); 5] = [
        ("wal-normal.db", "WAL", "NORMAL"),
        ("wal-full.db", "WAL", "FULL"),
        ("delete.db", "DELETE", "FULL"),
        ("truncate.db", "TRUNCATE", "NORMAL"),
        ("sub/persist.db", "PERSIST", "FULL"),
    ];
    std::fs::create_dir_all(m.path("sub")).unwrap();
    for round in 0..rounds {
        let mut writers: Vec<Child> = dbs
            .iter()
            .map(|(rel, mode, sync)| spawn_writer(&m.path(rel), mode, sync))
            .collect();
        let wait = 200 + rng.below(1800) as u64;
        std::thread::sleep(Duration::from_millis(wait));
        m.kill9();
        kill_all(&mut writers);
        f.restart(&mut m, &args);
        for (rel, ..) in dbs {
            if sqlite_view(&m.backing_path(rel), &f.dir.path().join("probe")).is_none() {
                continue;
            }
            assert_replica_follows(&url, S3_ENV, &m, rel, Duration::from_secs(8));
        }
        eprintln!("crash-restart round {round}: killed after {wait} ms, every replica equal");
    }
    assert_no_failure(&m.stop());
}

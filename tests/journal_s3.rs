//! Rollback-journal databases and writes outside SQLite's protocol, replicated to S3 end to
//! end (issue 4): real SQLite programs (rusqlite and `sqlite3` CLI processes) write under a
//! real `walfs mount --replica s3://...` that replicates to a real `moto_server` on
//! 127.0.0.1. `walfs restore` must then give back databases whose pages equal the backing
//! files', verified against walfs's checksum record, that pass `PRAGMA integrity_check`.
//!
//! Covered: every journal mode (DELETE, TRUNCATE, PERSIST, MEMORY, OFF) with synchronous
//! FULL, NORMAL and OFF, large multi-segment journals and `journal_size_limit`; switches between
//! DELETE and WAL in both directions; writers SIGKILLed mid-transaction (the replica equals
//! the rolled-back database every time); `cp`, `cat`, `dd`, `mv` over a database (VACUUM INTO
//! then rename), `.restore`, truncation, deletion, files that stop or start being SQLite;
//! a whole-replica restore into a directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_same_database, restored_txid, sqlite3, Mount, S3Fixture, BUCKET, S3_ENV};
use rusqlite::Connection;

/// The mount of every test here: uploads every 100 ms, and a log that shows captures.
const MOUNT: &[&str] = &[
    "--sync-interval",
    "100ms",
    "--log-level",
    "walfs=debug,walfs::fs=info",
];

/// A verified restore of `rel`'s latest state into `out(rel)` (see [`S3Fixture::restore`]).
fn restore_db(r: &S3Fixture, rel: &str) -> PathBuf {
    r.restore(rel, rel, &[]).0
}

/// Waits up to `limit` for the deletion marker of `rel`.
fn wait_deleted_marker(r: &S3Fixture, rel: &str, limit: Duration, m: &Mount) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(text) = deleted_marker(r, rel) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{rel}: no deletion marker after {limit:?}; keys: {:?}; log: {}",
            r.keys(rel),
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The replica's deletion marker of `rel`, if any: fetched with a signed GET by boto3
/// (moto refuses unsigned reads of objects).
fn deleted_marker(r: &S3Fixture, rel: &str) -> Option<String> {
    let key = format!("{}/{rel}/walfs/deleted", r.prefix);
    let out = r.moto.boto3(&format!(
        "try:\n    sys.stdout.write(s3.get_object(Bucket='{BUCKET}',Key='{key}')['Body'].read().decode())\n\
         except s3.exceptions.NoSuchKey:\n    sys.exit(3)\n"
    ));
    match out.status.code() {
        Some(0) => Some(String::from_utf8(out.stdout).unwrap()),
        Some(3) => None,
        _ => panic!(
            "boto3 GET of {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn open(path: &Path) -> Connection {
    let c =
        Connection::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    c
}

/// Opens `path` in rollback-journal `mode` with `synchronous`.
fn open_mode(path: &Path, mode: &str, synchronous: &str) -> Connection {
    let c = open(path);
    let got: String = c
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        got,
        mode.to_lowercase(),
        "journal_mode of {}",
        path.display()
    );
    c.execute_batch(&format!(
        "PRAGMA synchronous={synchronous};
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB, w TEXT);
         CREATE INDEX IF NOT EXISTS t_w ON t(w);"
    ))
    .unwrap();
    c
}

/// Small commits, updates, deletes, growth, shrink; `seed` varies the sizes.
fn churn(c: &Connection, txns: usize, seed: u64) {
    for i in 0..txns as u64 {
        let n = (i * 7919 + seed * 104_729) % 2000 + 20;
        match i % 6 {
            0..=2 => {
                c.execute(
                    "INSERT INTO t(v, w) VALUES(randomblob(?1), hex(randomblob(8)))",
                    [n as i64],
                )
                .unwrap();
            }
            3 => {
                c.execute(
                    "UPDATE t SET v = randomblob(?1) WHERE id % 5 = ?2",
                    [n as i64, (i % 5) as i64],
                )
                .unwrap();
            }
            4 => {
                c.execute_batch(
                    "BEGIN; INSERT INTO t(v, w) SELECT randomblob(300), w FROM t LIMIT 20;
                     DELETE FROM t WHERE id % 7 = 0; COMMIT;",
                )
                .unwrap();
            }
            _ => {
                c.execute("DELETE FROM t WHERE id % 11 = ?1", [(i % 11) as i64])
                    .unwrap();
            }
        }
    }
}

/// A transaction larger than the page cache: SQLite spills, syncing the journal and
/// starting a new journal segment each time.
fn big_transaction(c: &Connection, rows: usize) {
    c.execute_batch(&format!(
        "PRAGMA cache_size=20; BEGIN;
         UPDATE t SET v = randomblob(length(v) + 10);
         WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM s WHERE n<{rows})
         INSERT INTO t(v, w) SELECT randomblob(900), hex(randomblob(16)) FROM s;
         COMMIT; PRAGMA cache_size=-2000;"
    ))
    .unwrap();
}

/// Runs `sqlite3 db sql` as a separate process (opens, writes, closes).
fn sqlite3_proc(db: &Path, sql: &str) {
    let out = common::run_sqlite3(db, sql);
    assert!(
        out.status.success(),
        "sqlite3 {}: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Restores `rel` until it equals the backing file (the upload runs every 100 ms); panics
/// with the last difference after `limit`.
///
/// A restore that could not be verified is retried (the replica may be mid-upload: a
/// snapshot's record is known only while the capture is still at its TXID), and so is one
/// that failed (e.g. nothing uploaded yet).
fn assert_replicated_soon(r: &S3Fixture, m: &Mount, rel: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    let backing = m.backing_path(rel);
    loop {
        match r.try_restore(rel, rel, &[]) {
            Ok((out, log)) => {
                let verified = log.contains("content checksum matches the writer's record");
                let same = std::fs::read(&backing).unwrap() == std::fs::read(&out).unwrap();
                if same && verified {
                    assert_same_database(&backing, &out);
                    return;
                }
                if Instant::now() > deadline {
                    assert_same_database(&backing, &out);
                    panic!("{rel}: the restore was not verified: {}", m.log());
                }
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "{rel}: restore failed: {e}; log: {}",
                m.log()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_no_heals(m: &Mount) {
    let log = m.log();
    assert!(!log.contains("capture healed"), "unexpected heal: {log}");
    assert!(!log.contains("capture failed"), "capture failure: {log}");
}

#[test]
fn every_journal_mode_with_every_synchronous_level() {
    let r = S3Fixture::new("modes");
    let mut m = r.mount(MOUNT);
    let mut rels = Vec::new();
    for mode in ["DELETE", "TRUNCATE", "PERSIST", "MEMORY", "OFF"] {
        // synchronous=OFF makes no barrier at the commits of some modes: those are
        // captured when the connection closes, and checked only after it.
        for sync in ["FULL", "NORMAL", "OFF"] {
            let rel = format!("{}-{}.db", mode.to_lowercase(), sync.to_lowercase());
            let path = m.path(&rel);
            {
                let c = open_mode(&path, mode, sync);
                churn(&c, 60, rel.len() as u64);
                big_transaction(&c, 3000);
                // Captured at the commits themselves, while the connection stays open.
                if sync != "OFF" || mode == "DELETE" {
                    assert_replicated_soon(&r, &m, &rel, Duration::from_secs(10));
                }
                if mode == "PERSIST" || mode == "TRUNCATE" {
                    // The journal is kept, and cut back to the limit after each commit.
                    c.execute_batch("PRAGMA journal_size_limit=8192;").unwrap();
                    big_transaction(&c, 1000);
                }
                churn(&c, 20, 3);
                c.execute_batch("VACUUM;").unwrap();
                churn(&c, 10, 5);
            }
            // Programs that open and close per statement.
            for i in 0..15 {
                sqlite3_proc(
                    &path,
                    &format!(
                        "PRAGMA journal_mode={mode}; PRAGMA synchronous={sync};
                         INSERT INTO t(v, w) VALUES(randomblob({}), 'cli');",
                        100 + i * 250
                    ),
                );
            }
            rels.push(rel);
        }
    }
    m.stop();
    assert_no_heals(&m);
    for rel in &rels {
        let out = restore_db(&r, rel);
        assert_same_database(&m.backing_path(rel), &out);
    }
}

#[test]
fn journal_mode_switches_keep_one_history() {
    let r = S3Fixture::new("switch");
    let mut m = r.mount(MOUNT);
    let path = m.path("switch.db");
    let mut txids = Vec::new();
    let mut copies = Vec::new();
    let c = open_mode(&path, "DELETE", "FULL");
    for (i, mode) in ["WAL", "DELETE", "WAL", "TRUNCATE", "WAL", "PERSIST"]
        .iter()
        .enumerate()
    {
        churn(&c, 25, i as u64);
        let got: String = c
            .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(got, mode.to_lowercase());
        churn(&c, 25, i as u64 + 10);
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
        // The state after this round, for a point-in-time restore later.
        let snap = r.out(&format!("round{i}.db"));
        let _ = std::fs::remove_file(&snap);
        c.execute("VACUUM INTO ?1", [snap.to_str().unwrap()])
            .unwrap();
        copies.push(snap);
        std::thread::sleep(Duration::from_millis(400));
        let log = r.restore("switch.db", "now.db", &[]).1;
        txids.push(restored_txid(&log));
    }
    drop(c);
    m.stop();
    assert_no_heals(&m);
    assert!(
        !m.log().contains("staging a snapshot"),
        "a mode switch took a snapshot: {}",
        m.log()
    );
    assert!(
        txids.windows(2).all(|w| w[0] < w[1]),
        "TXIDs grow: {txids:?}"
    );
    let out = restore_db(&r, "switch.db");
    assert_same_database(&m.backing_path("switch.db"), &out);
    // Every round's state is still reachable in the one history.
    for (txid, copy) in txids.iter().zip(&copies) {
        let (at, _) = r.restore(
            "switch.db",
            &format!("at-{txid}.db"),
            &["--txid", &txid.to_string()],
        );
        assert_eq!(
            sqlite3(&at, "SELECT count(*), sum(length(v)) FROM t;"),
            sqlite3(copy, "SELECT count(*), sum(length(v)) FROM t;"),
            "TXID {txid}"
        );
    }
}

#[test]
fn writers_killed_mid_transaction_never_reach_the_replica() {
    let r = S3Fixture::new("kill");
    let m = r.mount(MOUNT);
    let modes = ["DELETE", "TRUNCATE", "PERSIST"];
    for mode in modes {
        let rel = format!("kill-{}.db", mode.to_lowercase());
        let c = open_mode(&m.path(&rel), mode, "FULL");
        churn(&c, 30, 1);
    }
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut hot_rounds = 0;
    for round in 0..24 {
        let mode = modes[round % 3];
        let rel = format!("kill-{}.db", mode.to_lowercase());
        let path = m.path(&rel);
        let committed = r.out(&format!("committed-{round}.db"));
        std::fs::copy(m.backing_path(&rel), &committed).unwrap();
        // A large transaction that spills into the database file, killed at a random
        // point (sometimes before, sometimes after its pages reach the file).
        let mut child = Command::new("sqlite3")
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            writeln!(
                stdin,
                "PRAGMA journal_mode={mode}; PRAGMA cache_size=10; BEGIN;
                 UPDATE t SET v = randomblob(length(v));
                 WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM s WHERE n<{})
                 INSERT INTO t(v, w) SELECT randomblob(1000), 'killed' FROM s;
                 UPDATE t SET w = 'killed' WHERE id % 3 = 0;
                 COMMIT;",
                2000 + rand(20_000)
            )
            .unwrap();
        }
        std::thread::sleep(Duration::from_millis(5 + rand(150)));
        let _ = child.kill();
        child.wait().unwrap();
        // Killed mid-transaction (the journal is hot): its pages may be in the database
        // file, but the replica must still hold the committed state, also after the
        // killed process's files were closed.
        let journal = m.backing_path(&format!("{rel}-journal"));
        let hot = std::fs::read(&journal).is_ok_and(|b| b.first().is_some_and(|&x| x != 0));
        if hot {
            hot_rounds += 1;
            std::thread::sleep(Duration::from_millis(300));
            assert_same_database(&committed, &restore_db(&r, &rel));
        }
        // The next opener rolls the hot journal back (or finds it committed).
        let c = open(&path);
        let _: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        c.execute(
            "INSERT INTO t(v, w) VALUES(randomblob(?1), 'after')",
            [(round * 37 % 900 + 50) as i64],
        )
        .unwrap();
        drop(c);
        assert_replicated_soon(&r, &m, &rel, Duration::from_secs(10));
        assert_eq!(
            sqlite3(&m.path(&rel), "PRAGMA integrity_check;"),
            "ok\n",
            "round {round}"
        );
    }
    assert!(
        hot_rounds >= 12,
        "only {hot_rounds} of 24 writers were killed mid-transaction"
    );
    assert_no_heals(&m);
}

/// A database with some content made outside the mount.
fn make_db(path: &Path, rows: usize, page_size: u32) {
    let _ = std::fs::remove_file(path);
    let c = open(path);
    c.execute_batch(&format!(
        "PRAGMA page_size={page_size}; CREATE TABLE other(id INTEGER PRIMARY KEY, x BLOB);
         WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM s WHERE n<{rows})
         INSERT INTO other(x) SELECT randomblob(700) FROM s;"
    ))
    .unwrap();
}

fn run(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn writes_outside_sqlites_protocol_leave_the_replica_equal_to_the_file() {
    let r = S3Fixture::new("outside");
    let mut m = r.mount(MOUNT);
    let other = r.out("src/other.db");
    make_db(&other, 300, 4096);
    let other_small = r.out("src/small.db");
    make_db(&other_small, 20, 1024);
    let names = [
        "cp.db",
        "cat.db",
        "dd.db",
        "mv.db",
        "restore.db",
        "trunc.db",
        "rm.db",
        "text.db",
    ];
    let mut before = Vec::new();
    for (i, rel) in names.iter().enumerate() {
        let c = open_mode(&m.path(rel), "DELETE", "FULL");
        churn(&c, 30, i as u64);
        drop(c);
        let copy = r.out(&format!("before/{rel}"));
        std::fs::copy(m.backing_path(rel), &copy).unwrap();
        before.push(copy);
    }
    std::thread::sleep(Duration::from_millis(500));
    let before_txid: Vec<u64> = names
        .iter()
        .map(|rel| restored_txid(&r.restore(rel, "probe.db", &[]).1))
        .collect();
    let p = |rel: &str| m.path(rel).display().to_string();
    run(&format!("cp {} {}", other.display(), p("cp.db")));
    run(&format!("cat {} > {}", other_small.display(), p("cat.db")));
    run(&format!(
        "dd if={} of={} bs=4096 status=none",
        other.display(),
        p("dd.db")
    ));
    // VACUUM INTO a new file, then rename it over the live database.
    sqlite3_proc(
        &m.path("mv.db"),
        &format!(
            "INSERT INTO t(v) VALUES(randomblob(5000)); VACUUM INTO '{}';",
            p("mv-tmp.db")
        ),
    );
    run(&format!("mv {} {}", p("mv-tmp.db"), p("mv.db")));
    sqlite3_proc(
        &m.path("restore.db"),
        &format!(".restore {}", other.display()),
    );
    // Emptied: an empty file is not an SQLite database yet; then SQLite writes it anew.
    run(&format!("truncate -s 0 {}", p("trunc.db")));
    let trunc_marker = wait_deleted_marker(&r, "trunc.db", Duration::from_secs(10), &m);
    sqlite3_proc(
        &m.path("trunc.db"),
        "CREATE TABLE fresh(a); INSERT INTO fresh VALUES(42);",
    );
    // Deleted; and a file that stops being SQLite.
    run(&format!("rm {}", p("rm.db")));
    run(&format!("echo 'just text now' > {}", p("text.db")));
    // A file that starts being SQLite (copied in).
    run(&format!("cp {} {}", other_small.display(), p("new.db")));
    // A database copied in over an open-and-close program's database: no error for it.
    sqlite3_proc(&m.path("cp.db"), "SELECT count(*) FROM other;");
    std::thread::sleep(Duration::from_millis(600));
    m.stop();
    assert_no_heals(&m);

    for rel in [
        "cp.db",
        "cat.db",
        "dd.db",
        "mv.db",
        "restore.db",
        "trunc.db",
        "new.db",
    ] {
        let out = restore_db(&r, rel);
        assert_same_database(&m.backing_path(rel), &out);
    }
    // The TXID history continued: the state before each replacement is still there.
    for (i, rel) in names.iter().enumerate() {
        if matches!(*rel, "rm.db" | "text.db") {
            continue;
        }
        let (at, _) = r.restore(
            rel,
            &format!("at/{rel}"),
            &["--txid", &before_txid[i].to_string()],
        );
        assert_same_database(&before[i], &at);
        let now = restored_txid(&r.restore(rel, "probe.db", &[]).1);
        assert!(
            now > before_txid[i],
            "{rel}: {now} after {}",
            before_txid[i]
        );
    }
    // Deleted, and no longer SQLite: the replica keeps the last state and says so.
    for (i, rel) in names.iter().enumerate() {
        if !matches!(*rel, "rm.db" | "text.db") {
            continue;
        }
        let marker = deleted_marker(&r, rel).unwrap_or_else(|| panic!("{rel}: no marker"));
        assert!(
            marker.starts_with(&format!("txid={:016x} deleted_at=", before_txid[i]))
                && marker.ends_with("Z\n"),
            "{rel}: {marker}"
        );
        let out = restore_db(&r, rel);
        assert_same_database(&before[i], &out);
    }
    // The truncated database came back: its marker is superseded by higher TXIDs.
    assert!(
        trunc_marker.starts_with(&format!("txid={:016x}", before_txid[5])),
        "{trunc_marker}"
    );
    assert!(!m.log().contains(" ERROR "), "{}", m.log());
}

#[test]
fn whole_replica_restore_into_a_directory() {
    let r = S3Fixture::new("whole");
    let mut m = r.mount(MOUNT);
    let rels = ["a.db", "x/b.db", "x/y/c.db", "x/y/z/d.db", "e.db"];
    let modes = ["DELETE", "TRUNCATE", "PERSIST", "MEMORY", "WAL"];
    for (i, rel) in rels.iter().enumerate() {
        let path = m.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let c = open_mode(&path, modes[i], if i % 2 == 0 { "FULL" } else { "NORMAL" });
        churn(&c, 40, i as u64);
    }
    m.stop();
    assert_no_heals(&m);
    let out = r.out("all");
    let log = common::walfs_restore_env(&[&r.url(), "-o", out.to_str().unwrap()], S3_ENV);
    assert_eq!(
        log.matches("content checksum matches the writer's record")
            .count(),
        rels.len(),
        "{log}"
    );
    for rel in rels {
        assert_same_database(&m.backing_path(rel), &out.join(rel));
    }
}

//! Replication to S3 end to end: real SQLite programs (rusqlite and `sqlite3` CLI
//! processes) write under a real `walfs mount --replica s3://...`, replicating to a real
//! `moto_server` on 127.0.0.1 that each test starts on a free port (and kills when it ends).
//! After the workload the mount is stopped (SIGTERM: walfs flushes what is pending) and
//! `walfs restore` (and in one test `litestream restore`) must give back a database whose
//! pages equal the backing file's, verified against walfs's checksum record, that passes
//! `PRAGMA integrity_check`.
//!
//! The workloads are the ones issue 3 lists: many small transactions, transactions that
//! spill the page cache, every checkpoint mode mid-workload, `wal_autocheckpoint` settings,
//! VACUUM, growth and shrink, page sizes, a database crossing 1 GiB, nested directories
//! with many databases, concurrent writer processes, kill -9 of walfs, an idle mount, an
//! unreachable S3 server, and Litestream reading the replica.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{as_strs, assert_same_database, sqlite3, Mount, S3Fixture, S3_ENV};
use rusqlite::Connection;

/// The `-wal` path of a database path.
fn wal_of(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

/// Asserts the backing database is whole (no WAL frames left beside it), restores it from
/// the replica and asserts the restored database equals it page by page.
fn assert_replicated(r: &S3Fixture, m: &Mount, rel: &str) {
    let backing = m.backing_path(rel);
    let wal = wal_of(&backing);
    assert!(
        std::fs::metadata(&wal)
            .map(|md| md.len() == 0)
            .unwrap_or(true),
        "{} still holds frames: the backing file is not the whole database",
        wal.display()
    );
    let (out, _) = r.restore(rel, rel, &[]);
    assert_same_database(&backing, &out);
}

// ---------------------------------------------------------------------------------------------
// SQLite workloads
// ---------------------------------------------------------------------------------------------

/// Opens `path` with a generous busy timeout.
fn open(path: &Path) -> Connection {
    let c =
        Connection::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    c
}

/// Opens `path`, switches it to WAL mode with `synchronous`, and creates the test table.
fn open_wal(path: &Path, synchronous: &str) -> Connection {
    open_wal_with(path, "", synchronous)
}

/// Like [`open_wal`], running `setup` first (pragmas that must precede the first write,
/// such as `page_size` or `auto_vacuum`).
fn open_wal_with(path: &Path, setup: &str, synchronous: &str) -> Connection {
    let c = open(path);
    c.execute_batch(setup).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal", "{} did not switch to WAL", path.display());
    c.execute_batch(&format!(
        "PRAGMA synchronous={synchronous};
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, k TEXT, v BLOB);
         CREATE INDEX IF NOT EXISTS t_k ON t(k);"
    ))
    .unwrap();
    c
}

/// A small deterministic generator, so workloads vary without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// `txns` transactions of mixed kinds on table `t`: single-row inserts of varied sizes,
/// multi-row transactions, updates, deletes, and rolled-back transactions.
fn churn(c: &Connection, txns: usize, seed: u64) {
    let mut rng = Rng(seed);
    for n in 0..txns {
        let r = rng.next();
        let size = 10 + rng.next() % 3000;
        let k = format!("s{seed}-{n}");
        match r % 10 {
            0..=5 => {
                c.execute(
                    "INSERT INTO t(k, v) VALUES (?1, randomblob(?2))",
                    (&k, size),
                )
                .unwrap();
            }
            6 => {
                c.execute_batch("BEGIN").unwrap();
                for i in 0..20 {
                    c.execute(
                        "INSERT INTO t(k, v) VALUES (?1, randomblob(?2))",
                        (format!("{k}-{i}"), 10 + (size * i) % 2000),
                    )
                    .unwrap();
                }
                c.execute_batch("COMMIT").unwrap();
            }
            7 => {
                c.execute(
                    "UPDATE t SET v = randomblob(?1) WHERE id % 7 = ?2",
                    (size % 500 + 1, r % 7),
                )
                .unwrap();
            }
            8 => {
                c.execute(
                    "DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 5)",
                    [],
                )
                .unwrap();
            }
            _ => {
                c.execute_batch("BEGIN").unwrap();
                c.execute(
                    "INSERT INTO t(k, v) VALUES ('rolled-back', randomblob(?1))",
                    [size],
                )
                .unwrap();
                c.execute_batch("ROLLBACK").unwrap();
            }
        }
    }
}

fn count(c: &Connection, sql: &str) -> i64 {
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn page_count(c: &Connection) -> i64 {
    count(c, "PRAGMA page_count")
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The workloads
// ---------------------------------------------------------------------------------------------

#[test]
fn many_small_transactions_with_synchronous_normal_and_full() {
    let r = S3Fixture::new("small");
    let mut m = r.mount(&["--sync-interval", "200ms"]);
    std::thread::scope(|s| {
        for sync in ["NORMAL", "FULL"] {
            let path = m.path(&format!("{}.db", sync.to_lowercase()));
            s.spawn(move || {
                let c = open_wal(&path, sync);
                for i in 0..2000u64 {
                    c.execute(
                        "INSERT INTO t(k, v) VALUES (?1, randomblob(?2))",
                        (format!("row-{i}"), 20 + (i * 37) % 400),
                    )
                    .unwrap_or_else(|e| panic!("{sync}: insert {i} failed: {e}"));
                }
                assert_eq!(count(&c, "SELECT count(*) FROM t"), 2000);
            });
        }
    });
    m.stop();
    for rel in ["normal.db", "full.db"] {
        assert_replicated(&r, &m, rel);
        assert_eq!(sqlite3(&r.out(rel), "SELECT count(*) FROM t;"), "2000\n");
    }
}

#[test]
fn large_transactions_that_spill_the_page_cache() {
    let r = S3Fixture::new("spill");
    let mut m = r.mount(&["--sync-interval", "200ms"]);
    let path = m.path("big.db");
    let c = open_wal(&path, "NORMAL");
    // 50 pages of cache: every large transaction spills dirty pages into the WAL before
    // its commit frame exists.
    c.execute_batch("PRAGMA cache_size=50;").unwrap();

    // 1. One committed transaction of about 40 MB, rewritten within itself (pages spilled
    //    and then changed again in the same transaction).
    c.execute_batch("BEGIN").unwrap();
    for i in 0..10_000u64 {
        c.execute(
            "INSERT INTO t(k, v) VALUES (?1, randomblob(4000))",
            [format!("{:08}", (i * 7919) % 10_000)],
        )
        .unwrap();
    }
    c.execute("UPDATE t SET v = randomblob(3900) WHERE id % 3 = 0", [])
        .unwrap();
    c.execute_batch("COMMIT").unwrap();
    let wal_after_commit = file_len(&wal_of(&m.backing_path("big.db")));
    assert!(
        wal_after_commit > 30 << 20,
        "the big transaction should have gone through the WAL ({wal_after_commit} bytes)"
    );

    // 2. A transaction that spills about 20 MB and is rolled back: none of its pages may
    //    reach the replica.
    c.execute_batch("BEGIN").unwrap();
    for i in 0..5_000u64 {
        c.execute(
            "INSERT INTO t(k, v) VALUES (?1, randomblob(4000))",
            [format!("rolled-back-{i}")],
        )
        .unwrap();
    }
    c.execute("DELETE FROM t WHERE id % 5 = 0", []).unwrap();
    c.execute_batch("ROLLBACK").unwrap();

    // 3. Small commits after it, then another large one that deletes and rewrites.
    churn(&c, 50, 1);
    c.execute_batch(
        "BEGIN;
         DELETE FROM t WHERE id % 4 = 1;
         UPDATE t SET v = randomblob(4500) WHERE id % 4 = 2;
         COMMIT;",
    )
    .unwrap();
    let rows = count(&c, "SELECT count(*) FROM t");
    drop(c);
    m.stop();
    assert_replicated(&r, &m, "big.db");
    let out = r.out("big.db");
    assert_eq!(
        sqlite3(&out, "SELECT count(*) FROM t;"),
        format!("{rows}\n")
    );
    assert_eq!(
        sqlite3(&out, "SELECT count(*) FROM t WHERE k LIKE 'rolled-back%';"),
        "0\n"
    );
}

#[test]
fn every_checkpoint_mode_in_the_middle_of_a_workload() {
    let r = S3Fixture::new("checkpoints");
    let mut m = r.mount(&["--sync-interval", "200ms"]);
    for (n, mode) in ["PASSIVE", "FULL", "RESTART", "TRUNCATE"]
        .into_iter()
        .enumerate()
    {
        let rel = format!("{}.db", mode.to_lowercase());
        let path = m.path(&rel);
        // synchronous=NORMAL and no automatic checkpoints: commits are not fsynced, so the
        // checkpoints issued here are the only barriers until the last close.
        let c = open_wal(&path, "NORMAL");
        c.execute_batch("PRAGMA wal_autocheckpoint=0;").unwrap();
        for round in 0..3u64 {
            churn(&c, 80, 10 * n as u64 + round);
            // A reader holds an old snapshot across the PASSIVE checkpoint, so that one
            // backfills only part of the WAL.
            let reader = (mode == "PASSIVE" && round == 1).then(|| {
                let rd = open(&path);
                rd.execute_batch("BEGIN").unwrap();
                count(&rd, "SELECT count(*) FROM t");
                churn(&c, 30, 100 + round);
                rd
            });
            // The checkpoint comes from another process, while this connection stays open
            // and keeps writing afterwards.
            let res = sqlite3(
                &path,
                &format!(".timeout 20000\nPRAGMA wal_checkpoint({mode});"),
            );
            let fields: Vec<i64> = res.trim().split('|').map(|f| f.parse().unwrap()).collect();
            assert_eq!(fields.len(), 3, "{mode}: {res}");
            assert_eq!(fields[0], 0, "{mode} checkpoint was blocked: {res}");
            if reader.is_some() {
                assert!(
                    fields[2] < fields[1],
                    "the reader should have kept the PASSIVE checkpoint partial: {res}"
                );
            } else if mode == "TRUNCATE" {
                assert_eq!(file_len(&wal_of(&m.backing_path(&rel))), 0, "{res}");
            } else {
                assert_eq!(fields[1], fields[2], "{mode} did not backfill all: {res}");
            }
            churn(&c, 80, 1000 + 10 * n as u64 + round);
            drop(reader);
        }
    }
    m.stop();
    for mode in ["passive", "full", "restart", "truncate"] {
        assert_replicated(&r, &m, &format!("{mode}.db"));
    }
}

#[test]
fn wal_autocheckpoint_0_10_and_default() {
    let r = S3Fixture::new("autocheckpoint");
    let mut m = r.mount(&["--sync-interval", "200ms"]);
    let mut wal_sizes = Vec::new();
    for (rel, setting) in [
        ("auto0.db", Some(0)),
        ("auto10.db", Some(10)),
        ("autodefault.db", None),
    ] {
        let c = open_wal(&m.path(rel), "NORMAL");
        if let Some(n) = setting {
            c.execute_batch(&format!("PRAGMA wal_autocheckpoint={n};"))
                .unwrap();
        }
        churn(&c, 700, 7);
        wal_sizes.push(file_len(&wal_of(&m.backing_path(rel))));
        drop(c);
    }
    // The settings took effect: no checkpoint leaves the largest WAL, one every 10 pages
    // the smallest.
    assert!(
        wal_sizes[0] > wal_sizes[2] && wal_sizes[2] > wal_sizes[1],
        "WAL sizes (0, 10, default): {wal_sizes:?}"
    );
    assert!(wal_sizes[0] > 1000 * 4096, "{wal_sizes:?}");
    m.stop();
    for rel in ["auto0.db", "auto10.db", "autodefault.db"] {
        assert_replicated(&r, &m, rel);
    }
}

#[test]
fn vacuum_growth_and_shrink() {
    let r = S3Fixture::new("vacuum");
    let mut m = r.mount(&["--sync-interval", "200ms"]);

    // VACUUM, then growth and a shrink by deleting most rows and VACUUM.
    let c = open_wal(&m.path("vacuum.db"), "NORMAL");
    for batch in 0..40u64 {
        let tx = c.unchecked_transaction().unwrap();
        for i in 0..100u64 {
            tx.execute(
                "INSERT INTO t(k, v) VALUES (?1, randomblob(2000))",
                [format!("{batch}-{i}")],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    c.execute_batch("DELETE FROM t WHERE id % 2 = 0; VACUUM;")
        .unwrap();
    churn(&c, 50, 5);
    let peak = page_count(&c);
    c.execute_batch("DELETE FROM t WHERE id % 10 != 0;")
        .unwrap();
    c.execute_batch("VACUUM;").unwrap();
    let shrunk = page_count(&c);
    assert!(
        shrunk * 4 < peak,
        "VACUUM should have shrunk the database: {peak} -> {shrunk} pages"
    );
    churn(&c, 50, 6);
    drop(c);

    // Growth and shrink without VACUUM: auto_vacuum truncates the file at each commit
    // (FULL) or when asked (INCREMENTAL).
    for (rel, mode) in [("autovac.db", "FULL"), ("incvac.db", "INCREMENTAL")] {
        let path = m.path(rel);
        let c = open_wal_with(&path, &format!("PRAGMA auto_vacuum={mode};"), "FULL");
        assert_eq!(
            count(&c, "PRAGMA auto_vacuum"),
            if mode == "FULL" { 1 } else { 2 }
        );
        for batch in 0..20u64 {
            let tx = c.unchecked_transaction().unwrap();
            for i in 0..100u64 {
                tx.execute(
                    "INSERT INTO t(k, v) VALUES (?1, randomblob(1500))",
                    [format!("{batch}-{i}")],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let peak = page_count(&c);
        c.execute_batch("DELETE FROM t WHERE id % 8 != 0;").unwrap();
        if mode == "INCREMENTAL" {
            // Each step frees one page and yields a row: run it to the end.
            let mut st = c.prepare("PRAGMA incremental_vacuum").unwrap();
            let mut rows = st.query([]).unwrap();
            while rows.next().unwrap().is_some() {}
        }
        let shrunk = page_count(&c);
        assert!(
            shrunk * 3 < peak,
            "{rel}: auto_vacuum={mode} should have shrunk it: {peak} -> {shrunk} pages"
        );
        churn(&c, 30, 8);
        drop(c);
    }
    m.stop();
    for rel in ["vacuum.db", "autovac.db", "incvac.db"] {
        assert_replicated(&r, &m, rel);
    }
}

#[test]
fn page_sizes_512_4096_and_65536() {
    let r = S3Fixture::new("pagesizes");
    let mut m = r.mount(&["--sync-interval", "200ms"]);
    for ps in [512u32, 4096, 65536] {
        let path = m.path(&format!("p{ps}.db"));
        let c = open_wal_with(&path, &format!("PRAGMA page_size={ps};"), "NORMAL");
        assert_eq!(count(&c, "PRAGMA page_size"), ps as i64);
        churn(&c, 150, ps as u64);
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        churn(&c, 150, ps as u64 + 1);
        drop(c);
    }
    m.stop();
    for ps in [512u32, 4096, 65536] {
        let rel = format!("p{ps}.db");
        assert_replicated(&r, &m, &rel);
        assert_eq!(
            sqlite3(&r.out(&rel), "PRAGMA page_size;"),
            format!("{ps}\n")
        );
    }
}

#[test]
fn database_crossing_1_gib_over_the_lock_byte_page() {
    const GIB: i64 = 1 << 30;
    const PAGE: i64 = 65536;
    let r = S3Fixture::new("gib");
    let mut m = r.mount(&["--sync-interval", "500ms"]);
    let path = m.path("huge.db");
    let c = open_wal_with(&path, "PRAGMA page_size=65536;", "NORMAL");
    assert_eq!(count(&c, "PRAGMA page_size"), PAGE);
    c.execute_batch("CREATE TABLE big(id INTEGER PRIMARY KEY, b BLOB);")
        .unwrap();
    // 32 MiB of zeros per transaction (cheap to compress and hash), and random rows in
    // between, so that pages on both sides of the lock-byte page hold real content.
    let mut n = 0;
    while page_count(&c) * PAGE < GIB + GIB / 10 {
        c.execute_batch(&format!(
            "BEGIN;
             INSERT INTO big(b) VALUES (zeroblob(33554432));
             INSERT INTO t(k, v) VALUES ('r{n}', randomblob(200000));
             COMMIT;"
        ))
        .unwrap();
        n += 1;
    }
    // Rewrite rows below and above the lock-byte page, and free some space in the middle.
    c.execute_batch(
        "UPDATE t SET v = randomblob(150000) WHERE id % 3 = 0;
         DELETE FROM big WHERE id = 5;
         INSERT INTO t(k, v) VALUES ('after', randomblob(500000));",
    )
    .unwrap();
    let pages = page_count(&c);
    let lock_page = GIB / PAGE + 1;
    assert!(pages > lock_page + 100, "{pages} pages");
    drop(c);
    m.stop();
    assert!(file_len(&m.backing_path("huge.db")) as i64 > GIB + GIB / 10);
    assert_replicated(&r, &m, "huge.db");
}

#[test]
fn nested_directories_and_many_databases_restore_as_a_whole() {
    let r = S3Fixture::new("many");
    let rels: Vec<String> = (0..20)
        .map(|i| {
            let dirs = ["a", "b", "c", "d", "e"];
            let mut p: Vec<&str> = dirs[..i % 6].to_vec();
            let name = format!("db{i}.db");
            p.push(&name);
            p.join("/")
        })
        .collect();
    let mut m = r.mount(&["--sync-interval", "200ms"]);
    // Five databases exist before the mount (they get an initial snapshot); the others
    // are created through it.
    m.stop();
    for rel in &rels[..5] {
        let path = m.backing_path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let c = open_wal(&path, "NORMAL");
        churn(&c, 20, 77);
    }
    std::fs::write(m.backing_path("a/notes.txt"), b"not a database").unwrap();
    std::fs::write(m.backing_path("a/b/fake.db"), b"not SQLite either").unwrap();
    r.restart(&mut m, &["--sync-interval", "200ms"]);
    std::thread::scope(|s| {
        for chunk in rels.chunks(5) {
            let m = &m;
            s.spawn(move || {
                for (j, rel) in chunk.iter().enumerate() {
                    let path = m.path(rel);
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    let c = open_wal(&path, if j % 2 == 0 { "NORMAL" } else { "FULL" });
                    churn(&c, 40, j as u64);
                }
            });
        }
    });
    m.stop();

    let out = r.out("all");
    let log = common::walfs_restore_env(&[&r.url(), "-o", out.to_str().unwrap()], S3_ENV);
    assert_eq!(
        log.matches("content checksum matches the writer's record")
            .count(),
        rels.len(),
        "every database verified against its checksum record: {log}"
    );
    let mut restored = BTreeSet::new();
    let mut stack = vec![out.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(&out).unwrap().display().to_string();
                restored.insert(rel);
            }
        }
    }
    assert_eq!(
        restored,
        rels.iter().cloned().collect::<BTreeSet<_>>(),
        "the restore holds exactly the databases"
    );
    for rel in &rels {
        assert!(!wal_of(&m.backing_path(rel)).exists(), "{rel}");
        assert_same_database(&m.backing_path(rel), &out.join(rel));
    }
}

#[test]
fn two_writer_processes_at_once() {
    let r = S3Fixture::new("writers");
    let mut m = r.mount(&["--sync-interval", "200ms"]);
    let path = m.path("shared.db");
    drop(open_wal(&path, "NORMAL"));
    // Two sqlite3 processes insert at once, one with synchronous=NORMAL, one FULL; each
    // mixes single-row commits and multi-row transactions.
    let writers: Vec<Child> = [("a", "NORMAL"), ("b", "FULL")]
        .iter()
        .map(|(name, sync)| {
            let mut sql = format!(".timeout 30000\nPRAGMA synchronous={sync};\n");
            for i in 0..600 {
                if i % 10 == 9 {
                    sql.push_str("BEGIN IMMEDIATE;\n");
                    for j in 0..5 {
                        sql.push_str(&format!(
                            "INSERT INTO t(k, v) VALUES ('{name}', randomblob({}));\n",
                            100 + j * 50
                        ));
                    }
                    sql.push_str("COMMIT;\n");
                } else {
                    sql.push_str(&format!(
                        "INSERT INTO t(k, v) VALUES ('{name}', randomblob({}));\n",
                        50 + i % 700
                    ));
                }
            }
            spawn_sqlite3(&path, &sql)
        })
        .collect();
    for w in writers {
        let out = w.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a writer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    m.stop();
    assert_replicated(&r, &m, "shared.db");
    let expected = 540 + 60 * 5;
    assert_eq!(
        sqlite3(
            &r.out("shared.db"),
            "SELECT k, count(*) FROM t GROUP BY k ORDER BY k;"
        ),
        format!("a|{expected}\nb|{expected}\n")
    );
}

/// Starts the `sqlite3` CLI on `db` with `sql` (written to a file, fed as stdin).
fn spawn_sqlite3(db: &Path, sql: &str) -> Child {
    let mut script = tempfile::NamedTempFile::new().unwrap();
    script.write_all(sql.as_bytes()).unwrap();
    Command::new("sqlite3")
        .arg("-batch")
        .arg("-bail")
        .arg(db)
        .stdin(std::fs::File::open(script.path()).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sqlite3")
}

#[test]
fn kill_9_of_walfs_mid_load_then_remount_loses_nothing_committed() {
    let r = S3Fixture::new("crash");
    let args = ["--sync-interval", "200ms"];
    let mut m = r.mount(&args);
    let dbs = [("normal.db", "NORMAL"), ("full.db", "FULL")];
    for (rel, sync) in dbs {
        drop(open_wal(&m.path(rel), sync));
    }
    // Writers that would run for minutes: single-row commits, and every 50th a larger
    // transaction that spills to the WAL before it commits.
    let mut writers: Vec<Child> = dbs
        .iter()
        .map(|(rel, sync)| {
            let mut sql =
                format!(".timeout 30000\nPRAGMA synchronous={sync};\nPRAGMA cache_size=20;\n");
            for i in 0..100_000 {
                if i % 50 == 49 {
                    sql.push_str(&format!(
                        "BEGIN; INSERT INTO t(k, v) SELECT 'big{i}', randomblob(3000) \
                         FROM (WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM n \
                         WHERE x < 200) SELECT x FROM n); COMMIT;\n"
                    ));
                } else {
                    sql.push_str(&format!(
                        "INSERT INTO t(k, v) VALUES ('w{i}', randomblob({}));\n",
                        50 + i % 500
                    ));
                }
            }
            spawn_sqlite3(&m.path(rel), &sql)
        })
        .collect();
    // Wait until both are well into their load (read through the mount, by another
    // process), then kill the daemon.
    let start = Instant::now();
    for (rel, _) in dbs {
        loop {
            let out = common::run_sqlite3(&m.path(rel), ".timeout 5000\nSELECT count(*) FROM t;");
            let n: i64 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0);
            if n >= 1500 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the writer of {rel} made no progress ({n} rows)"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    m.kill9();
    // The writers get errors from the dead mount (or, for data that passes through the
    // kernel, keep going for a moment); then they crash too.
    std::thread::sleep(Duration::from_millis(500));
    for w in &mut writers {
        w.kill().ok();
        w.wait().ok();
    }
    assert!(
        common::is_mounted(&m.mountpoint),
        "kill -9 leaves a stale mount"
    );
    // What the crash left (the WAL's size, in frames): commits that are only in the WAL,
    // which no barrier announced to walfs.
    let wal_frames: Vec<u64> = dbs
        .iter()
        .map(|(rel, _)| file_len(&wal_of(&m.backing_path(rel))).saturating_sub(32) / (4096 + 24))
        .collect();
    assert!(
        wal_frames.iter().all(|&n| n > 0),
        "the crash left no WAL frames: {wal_frames:?}"
    );

    // Remount the same backing with the same replica and staging; it reconciles what the
    // backing files hold with what it had staged and uploaded. Nothing opens the databases
    // through the mount: what is in their WAL must be picked up on its own.
    r.restart(&mut m, &args);
    std::thread::sleep(Duration::from_secs(2));
    m.stop();

    // Open the backing databases natively: SQLite recovers their WAL, and the last close
    // checkpoints it into the database file. That is everything SQLite committed.
    for (rel, _) in dbs {
        let backing = m.backing_path(rel);
        let rows = sqlite3(&backing, "PRAGMA integrity_check; SELECT count(*) FROM t;");
        let n: i64 = rows.lines().nth(1).unwrap().parse().unwrap();
        assert_eq!(rows.lines().next(), Some("ok"), "{rel}: {rows}");
        assert!(n >= 1500, "{rel} holds {n} rows");
        assert!(!wal_of(&backing).exists(), "{rel}: the WAL is still there");
        let (out, _) = r.restore(rel, rel, &[]);
        assert_same_database(&backing, &out);
    }

    // The replica goes on from there: a further mount replicates new commits on top.
    r.restart(&mut m, &args);
    for (rel, sync) in dbs {
        let c = open_wal(&m.path(rel), sync);
        churn(&c, 100, 42);
    }
    m.stop();
    for (rel, _) in dbs {
        assert_replicated(&r, &m, rel);
    }
}

#[test]
fn idle_mount_makes_zero_requests_over_10_s() {
    let r = S3Fixture::new("idle");
    // Short compaction intervals, so that the compactions the writes cause are done
    // before the idle window, which then covers the maintenance loop too.
    let mut m = r.mount(&[
        "--sync-interval",
        "200ms",
        "--compaction-intervals",
        "500ms,1s",
    ]);
    let before_writes = r.moto.requests().len();
    let open_conn = open_wal(&m.path("open.db"), "FULL");
    churn(&open_conn, 100, 1);
    {
        let c = open_wal(&m.path("closed.db"), "NORMAL");
        churn(&c, 100, 2);
    }
    // The counter sees the uploads of the write phase.
    let settled = r
        .moto
        .wait_settled(Duration::from_secs(3), Duration::from_secs(60));
    let puts = r.moto.requests()[before_writes..]
        .iter()
        .filter(|q| q.starts_with("PUT "))
        .count();
    assert!(puts > 0, "no PUT counted during the write phase");
    // Idle: one connection stays open on one database, the other is closed.
    std::thread::sleep(Duration::from_secs(10));
    let during = r.moto.requests()[settled..].to_vec();
    assert_eq!(
        during,
        Vec::<String>::new(),
        "an idle mount made requests over 10 s"
    );
    // Still alive: one more commit is uploaded.
    open_conn
        .execute("INSERT INTO t(k, v) VALUES ('late', randomblob(100))", [])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !r.moto.requests()[settled..]
        .iter()
        .any(|q| q.starts_with("PUT "))
    {
        assert!(
            Instant::now() < deadline,
            "the commit after the idle window was not uploaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(open_conn);
    m.stop();
    assert_replicated(&r, &m, "open.db");
    assert_replicated(&r, &m, "closed.db");
}

/// A TCP proxy on 127.0.0.1 in front of a server, which can make the server unreachable:
/// while down it cuts every connection it relays and drops each new one at once.
struct Gate {
    port: u16,
    up: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Gate {
    fn new(upstream: u16) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let done = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let thread = {
            let (up, done, conns) = (up.clone(), done.clone(), conns.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if done.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    if !up.load(Ordering::SeqCst) {
                        client.shutdown(Shutdown::Both).ok();
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        continue;
                    };
                    let mut held = conns.lock().unwrap();
                    held.push(client.try_clone().unwrap());
                    held.push(server.try_clone().unwrap());
                    for (mut from, mut to) in [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ] {
                        std::thread::spawn(move || {
                            std::io::copy(&mut from, &mut to).ok();
                            to.shutdown(Shutdown::Write).ok();
                        });
                    }
                }
            })
        };
        Gate {
            port,
            up,
            done,
            conns,
            thread: Some(thread),
        }
    }

    /// Makes the server unreachable: cuts the open connections, drops new ones.
    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.shutdown(Shutdown::Both).ok();
        }
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        self.down();
        TcpStream::connect(("127.0.0.1", self.port)).ok();
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

#[test]
fn unreachable_s3_app_keeps_working_and_the_replica_catches_up() {
    let r = S3Fixture::new("outage");
    let gate = Gate::new(r.moto.port);
    let url = r.moto.s3_url_via(gate.port, &r.prefix);
    let args = r.args_to(&url, &["--sync-interval", "200ms"]);
    let mut m = Mount::with_env(&as_strs(&args), S3_ENV);
    let path = m.path("app.db");
    let c = open_wal(&path, "FULL");
    churn(&c, 100, 1);
    r.moto
        .wait_settled(Duration::from_secs(2), Duration::from_secs(60));
    assert!(
        r.moto.requests().iter().any(|q| q.starts_with("PUT ")),
        "nothing was uploaded before the outage"
    );

    // S3 becomes unreachable. The application keeps committing, and no commit waits on
    // the network.
    gate.down();
    let during_outage = r.moto.requests().len();
    let outage = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..400u64 {
        let t = Instant::now();
        c.execute(
            "INSERT INTO t(k, v) VALUES (?1, randomblob(?2))",
            (format!("outage-{i}"), 100 + i % 900),
        )
        .unwrap_or_else(|e| panic!("commit {i} failed while S3 was unreachable: {e}"));
        slowest = slowest.max(t.elapsed());
    }
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    churn(&c, 100, 2);
    let rows = count(&c, "SELECT count(*) FROM t");
    drop(c);
    assert!(
        slowest < Duration::from_secs(2),
        "a commit took {slowest:?} while S3 was unreachable"
    );
    // Stay down until walfs reports the replica behind. It does once the S3 client has
    // spent its retries (10, with randomised exponential backoff of up to 15 s each, all
    // within 180 s), so that can take a while.
    while !m.log().contains("replica is behind") {
        assert!(
            outage.elapsed() < Duration::from_secs(200),
            "walfs did not report the unreachable replica within 200 s: {}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "walfs reported the replica behind {:?} into the outage",
        outage.elapsed()
    );
    assert_eq!(
        r.moto.requests().len(),
        during_outage,
        "requests reached the server through the outage"
    );

    // S3 is back: the replica catches up while still mounted.
    gate.up();
    let back = Instant::now();
    let backing = m.backing_path("app.db");
    loop {
        let last = match r.try_restore("app.db", "probe.db", &[]) {
            Ok((probe, log)) => {
                if std::fs::read(&probe).unwrap() == std::fs::read(&backing).unwrap() {
                    break;
                }
                log
            }
            Err(log) => log,
        };
        assert!(
            back.elapsed() < Duration::from_secs(120),
            "the replica did not catch up within 120 s of S3 coming back; last restore: {last}\n\
             walfs log:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("caught up {:?} after S3 came back", back.elapsed());
    m.stop();
    assert_replicated(&r, &m, "app.db");
    assert_eq!(
        sqlite3(&r.out("app.db"), "SELECT count(*) FROM t;"),
        format!("{rows}\n")
    );
}

#[test]
fn litestream_restores_the_s3_replica() {
    let r = S3Fixture::new("interop");
    let rel = "app/data/main.db";
    let mut m = r.mount(&["--sync-interval", "200ms"]);
    std::fs::create_dir_all(m.path("app/data")).unwrap();
    let c = open_wal(&m.path(rel), "NORMAL");
    churn(&c, 200, 1);
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    churn(&c, 200, 2);
    c.execute_batch("DELETE FROM t WHERE id % 3 = 0; VACUUM;")
        .unwrap();
    churn(&c, 100, 3);
    drop(c);
    m.stop();
    // A second mount over the same data continues the replica.
    r.restart(&mut m, &["--sync-interval", "200ms"]);
    let c = open_wal(&m.path(rel), "FULL");
    churn(&c, 100, 4);
    drop(c);
    m.stop();

    let theirs = r.out("litestream.db");
    common::litestream_restore(&r.db_url(rel), &theirs, S3_ENV);
    assert_same_database(&m.backing_path(rel), &theirs);
    assert_replicated(&r, &m, rel);
}

/// A restore to a moment returns the state committed at that moment, not the one uploaded
/// by then: S3 dates objects by upload time (moto in whole seconds), so walfs reads the
/// commit time from the objects' metadata around the moment.
#[test]
fn timestamp_restore_returns_the_state_committed_at_that_moment() {
    let r = S3Fixture::new("pitr-times");
    let mut m = r.mount(&["--sync-interval", "0"]);
    let c = open_wal(&m.path("t.db"), "NORMAL");
    // The watcher picks up a new database's directory within its 200 ms tick (it then
    // reads what was committed before); from then on each commit is read within ms.
    std::thread::sleep(Duration::from_millis(500));
    // Commit i holds i rows; `between[i]` is a moment after commit i and before commit i + 1.
    let mut between = Vec::new();
    for i in 1..=8 {
        c.execute("INSERT INTO t(k, v) VALUES (?1, randomblob(100))", [i])
            .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        between.push((i, std::time::SystemTime::now()));
        std::thread::sleep(Duration::from_millis(150));
    }
    r.moto
        .wait_settled(Duration::from_secs(2), Duration::from_secs(60));
    for (rows, at) in between {
        let out = r.out(&format!("t-{rows}.db"));
        let at_s = walfs::replica::timestamp::format_rfc3339_nano(at);
        let log = common::walfs_restore_env(
            &[
                &r.url(),
                "--db",
                "t.db",
                "--timestamp",
                &at_s,
                "-o",
                out.to_str().unwrap(),
            ],
            S3_ENV,
        );
        let restored = open(&out);
        let got: i64 = restored
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap_or(-1);
        assert_eq!(
            got,
            rows,
            "restore to {at_s} (after commit {rows}, before commit {}): {log}",
            rows + 1
        );
    }
    drop(c);
    m.stop();
}

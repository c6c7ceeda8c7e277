//! SQLite under concurrency on a real walfs mount, with and without kernel passthrough.
//!
//! - WAL: two writer processes (the system `sqlite3` CLI and this test binary re-executed as
//!   a rusqlite writer) and a reader thread at once, so cross-process fcntl locks and the
//!   shared, mmapped `-shm` are exercised through the mount; the reader checks snapshot
//!   invariants inside read transactions.
//! - DELETE, TRUNCATE and PERSIST rollback journals: the same two writer processes and reader.
//! - WAL with `locking_mode=EXCLUSIVE` (as Prisma uses): many transactions, a second process
//!   gets SQLITE_BUSY while the lock is held, checkpoint, close, reopen and verify; both with
//!   the heap wal-index (no `-shm`) and with an existing `-shm`.
//! - Crash consistency: a writer process SIGKILLed mid-workload six times over (WAL and
//!   DELETE), twice inside a large uncommitted transaction that has already spilled to the
//!   database file and hot journal, or to the WAL; after each kill every commit it
//!   acknowledged on stdout is present, no partial transaction is visible, and
//!   `integrity_check` is ok.
//! - The concurrency and crash cases run both with kernel passthrough and with
//!   `--no-passthrough` (page-cache mode, where the `-shm` mmap goes through the FUSE page
//!   cache).
//!
//! Every test ends the same way: close everything, read every file through the mount,
//! unmount, and require the backing files to be byte-for-byte what the mount served, and the
//! backing database to pass `integrity_check` read directly.
//!
//! Writer processes are this test binary re-executed into the ignored `child_process_entry`
//! (with `--ignored --exact` and the `WALFS_SQLITE_CHILD` environment variable).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::Mount;
use rusqlite::Connection;

/// Transactions each writer commits in the concurrency tests.
const TXNS: u64 = 500;
const BUSY_TIMEOUT: Duration = Duration::from_secs(20);
const CHILD_ENV: &str = "WALFS_SQLITE_CHILD";
/// Mount arguments that serve database files through the kernel page cache.
const CACHED: &[&str] = &["--database-io", "cached"];
/// Mount arguments that serve database files in passthrough, like every other file.
const PASSTHROUGH: &[&str] = &["--database-io", "passthrough"];

// ---------------------------------------------------------------------------------------
// Deterministic row contents, shared by every writer and by the checks.

fn row_val(writer: i64, seq: i64) -> i64 {
    (writer * 1_000_003 + seq * 7_919) % 100_000
}

fn row_pad(writer: i64, seq: i64) -> Vec<u8> {
    let len = 40 + ((seq * 37 + writer * 11) % 400) as usize;
    (0..len)
        .map(|i| (i as i64 * 31 + seq * 7 + writer) as u8)
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const SCHEMA: &str = "
    CREATE TABLE t(
        id INTEGER PRIMARY KEY,
        writer INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        val INTEGER NOT NULL,
        pad BLOB NOT NULL,
        UNIQUE(writer, seq)
    );
    CREATE INDEX t_val ON t(val);
    CREATE TABLE totals(writer INTEGER PRIMARY KEY, n INTEGER NOT NULL, s INTEGER NOT NULL);
    INSERT INTO totals VALUES (1, 0, 0), (2, 0, 0);
";

fn open(db: &Path, journal: &str) -> Connection {
    let conn = Connection::open(db).unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    conn.busy_timeout(BUSY_TIMEOUT).unwrap();
    let mode: String = conn
        .query_row(&format!("PRAGMA journal_mode={journal}"), [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        mode,
        journal.to_lowercase(),
        "journal_mode of {}",
        db.display()
    );
    conn
}

fn create_db(db: &Path, journal: &str) {
    let conn = open(db, journal);
    conn.execute_batch(SCHEMA).unwrap();
}

/// Commits `rows` rows for `writer` starting after `seq0` in one IMMEDIATE transaction,
/// keeping `totals` in step (the invariant readers check).
fn commit_rows(conn: &mut Connection, writer: i64, seq0: i64, rows: i64) {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    let mut sum = 0;
    {
        let mut ins = tx
            .prepare_cached("INSERT INTO t(writer, seq, val, pad) VALUES (?1, ?2, ?3, ?4)")
            .unwrap();
        for seq in seq0 + 1..=seq0 + rows {
            let val = row_val(writer, seq);
            sum += val;
            ins.execute(rusqlite::params![writer, seq, val, row_pad(writer, seq)])
                .unwrap();
        }
    }
    tx.execute(
        "UPDATE totals SET n = n + ?2, s = s + ?3 WHERE writer = ?1",
        rusqlite::params![writer, rows, sum],
    )
    .unwrap();
    tx.commit().unwrap();
}

/// Checks, inside one read transaction, that `t` and `totals` agree for both writers and
/// that each writer's rows are exactly seq 1..=n. Returns each writer's n.
fn check_snapshot(conn: &Connection) -> [i64; 2] {
    conn.execute_batch("BEGIN").unwrap();
    let mut ns = [0; 2];
    for w in 1..=2i64 {
        let (n, s): (i64, i64) = conn
            .query_row("SELECT n, s FROM totals WHERE writer = ?1", [w], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        let (count, max_seq, sum): (i64, i64, i64) = conn
            .query_row(
                "SELECT count(*), coalesce(max(seq), 0), coalesce(sum(val), 0)
                 FROM t WHERE writer = ?1",
                [w],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            (count, max_seq, sum),
            (n, n, s),
            "writer {w}: rows (count, max seq, sum) disagree with totals (n, n, s) in one snapshot"
        );
        ns[(w - 1) as usize] = n;
    }
    let total: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(total, ns[0] + ns[1], "total rows vs totals");
    conn.execute_batch("COMMIT").unwrap();
    ns
}

/// Every row of `writer` is present with exactly the contents written, seq 1..=n.
fn verify_rows(conn: &Connection, writer: i64, n: i64) {
    let mut stmt = conn
        .prepare("SELECT seq, val, pad FROM t WHERE writer = ?1 ORDER BY seq")
        .unwrap();
    let rows: Vec<(i64, i64, Vec<u8>)> = stmt
        .query_map([writer], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len() as i64, n, "writer {writer}: row count");
    for (i, (seq, val, pad)) in rows.iter().enumerate() {
        let want = i as i64 + 1;
        assert_eq!(*seq, want, "writer {writer}: seq gap");
        assert_eq!(
            *val,
            row_val(writer, want),
            "writer {writer} seq {want}: val"
        );
        assert!(
            *pad == row_pad(writer, want),
            "writer {writer} seq {want}: pad differs"
        );
    }
}

fn integrity_check(conn: &Connection) {
    let res: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(res, vec!["ok".to_string()], "integrity_check");
}

// ---------------------------------------------------------------------------------------
// Child processes.

/// A child process that is SIGKILLed if the test panics before waiting for it.
struct Proc {
    child: Option<Child>,
    name: String,
}

impl Proc {
    fn wait_ok(mut self, limit: Duration) -> String {
        let child = self.child.take().unwrap();
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output()).ok());
        let out = match rx.recv_timeout(limit) {
            Ok(out) => out.unwrap(),
            Err(_) => {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!("{} did not finish within {limit:?}", self.name);
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{} failed with {}: stdout: {stdout}\nstderr: {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

/// This test binary re-executed as a rusqlite writer (see `child_writer`).
/// With `stall_after`, after that many transactions it starts one large transaction that
/// spills dirty pages to disk, prints `in-transaction`, and waits to be killed.
fn spawn_rust_writer(
    db: &Path,
    journal: &str,
    writer: i64,
    txns: u64,
    rows: i64,
    stall_after: Option<u64>,
) -> Proc {
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry",
            "--ignored",
            "--nocapture",
            "-q",
        ])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, "writer")
        .env("WALFS_SQLITE_DB", db)
        .env("WALFS_SQLITE_JOURNAL", journal)
        .env("WALFS_SQLITE_WRITER", writer.to_string())
        .env("WALFS_SQLITE_TXNS", txns.to_string())
        .env("WALFS_SQLITE_ROWS", rows.to_string())
        .env(
            "WALFS_SQLITE_STALL_AFTER",
            stall_after.map(|n| n.to_string()).unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("re-exec test binary");
    Proc {
        child: Some(child),
        name: format!("rusqlite writer {writer} ({journal})"),
    }
}

/// The system `sqlite3` CLI (a different SQLite build) committing `txns` one-row
/// transactions for `writer`.
fn spawn_cli_writer(db: &Path, journal: &str, writer: i64, txns: u64) -> Proc {
    let mut script = format!(
        ".timeout {}\nPRAGMA journal_mode={journal};\n",
        BUSY_TIMEOUT.as_millis()
    );
    for seq in 1..=txns as i64 {
        let val = row_val(writer, seq);
        script.push_str(&format!(
            "BEGIN IMMEDIATE;\n\
             INSERT INTO t(writer, seq, val, pad) VALUES ({writer}, {seq}, {val}, X'{}');\n\
             UPDATE totals SET n = n + 1, s = s + {val} WHERE writer = {writer};\n\
             COMMIT;\n",
            hex(&row_pad(writer, seq))
        ));
    }
    let mut child = Command::new("sqlite3")
        .args(["-batch", "-bail"])
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sqlite3 (apt-get install sqlite3)");
    let mut stdin = child.stdin.take().unwrap();
    // Fed from a thread so a large script cannot dead-lock against the child's output.
    std::thread::spawn(move || {
        stdin.write_all(script.as_bytes()).ok();
    });
    Proc {
        child: Some(child),
        name: format!("sqlite3 CLI writer {writer} ({journal})"),
    }
}

/// Runs the `sqlite3` CLI expecting failure; returns its stderr.
fn sqlite3_fails(db: &Path, sql: &str) -> String {
    let out = common::run_sqlite3(db, sql);
    assert!(
        !out.status.success(),
        "sqlite3 should have failed on {sql:?}; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Entry point of the re-executed writer processes, not a test of its own: ignored in a
/// normal run, and selected with `--ignored --exact` by `spawn_rust_writer`.
#[test]
#[ignore = "entry point of the writer processes the other tests start"]
fn child_process_entry() {
    match std::env::var(CHILD_ENV).as_deref() {
        Ok("writer") => child_writer(),
        other => panic!("child_process_entry runs only as a writer process, not {other:?}"),
    }
}

/// Commits `WALFS_SQLITE_TXNS` transactions (0: until killed) of `WALFS_SQLITE_ROWS` rows
/// each, continuing after the writer's highest seq, and prints `committed <seq>` for every
/// row once its transaction has committed. See `spawn_rust_writer` for the stall.
fn child_writer() {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let db = PathBuf::from(env("WALFS_SQLITE_DB"));
    let journal = env("WALFS_SQLITE_JOURNAL");
    let writer: i64 = env("WALFS_SQLITE_WRITER").parse().unwrap();
    let txns: u64 = env("WALFS_SQLITE_TXNS").parse().unwrap();
    let rows: i64 = env("WALFS_SQLITE_ROWS").parse().unwrap();
    let stall_after: Option<u64> = env("WALFS_SQLITE_STALL_AFTER").parse().ok();
    let mut conn = open(&db, &journal);
    let mut seq: i64 = conn
        .query_row(
            "SELECT coalesce(max(seq), 0) FROM t WHERE writer = ?1",
            [writer],
            |r| r.get(0),
        )
        .unwrap();
    let mut out = std::io::stdout().lock();
    let mut done = 0;
    while txns == 0 || done < txns {
        if stall_after == Some(done) {
            // A transaction far larger than the page cache: SQLite writes pages to the
            // database file (rollback journal, leaving a hot journal) or uncommitted frames
            // to the WAL before it commits. The parent kills us in the middle of it.
            conn.execute_batch("PRAGMA cache_size=10").unwrap();
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .unwrap();
            for s in seq + 1..=seq + 2_000 {
                tx.execute(
                    "INSERT INTO t(writer, seq, val, pad) VALUES (?1, ?2, ?3, ?4)",
                    rusqlite::params![writer, s, row_val(writer, s), row_pad(writer, s)],
                )
                .unwrap();
            }
            tx.execute("UPDATE totals SET n = n + 2000 WHERE writer = ?1", [writer])
                .unwrap();
            writeln!(out, "in-transaction").unwrap();
            out.flush().unwrap();
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        commit_rows(&mut conn, writer, seq, rows);
        for s in seq + 1..=seq + rows {
            writeln!(out, "committed {s}").unwrap();
        }
        out.flush().unwrap();
        seq += rows;
        done += 1;
    }
    drop(conn);
}

// ---------------------------------------------------------------------------------------
// End-of-test check: what the mount served is what the backing directory holds.

fn read_dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            assert!(
                e.file_type().unwrap().is_file(),
                "unexpected {:?}",
                e.path()
            );
            let name = e.file_name().into_string().unwrap();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// Call with every connection closed: checkpoints any WAL, reads every file through the
/// mount, unmounts, and requires the backing files to be byte-identical and the backing
/// database to pass `integrity_check` on its own. Also checks that a mount without
/// `--no-passthrough` really ran with kernel passthrough.
fn finish(mut m: Mount, db: &str, mount_args: &[&str]) {
    {
        let conn = Connection::open(m.path(db)).unwrap();
        conn.busy_timeout(BUSY_TIMEOUT).unwrap();
        integrity_check(&conn);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        if mode == "wal" {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                assert_eq!(r.get::<_, i64>(0)?, 0, "checkpoint busy");
                Ok(())
            })
            .unwrap();
        }
    }
    let through_mount = read_dir_files(&m.mountpoint);
    assert!(
        through_mount.contains_key(db),
        "{db} missing from the mount"
    );
    let log = m.stop();
    if !mount_args.contains(&"--no-passthrough") {
        // Every fallback to serving I/O through the daemon warns that it is "slower".
        assert!(
            !log.contains("slower"),
            "kernel passthrough was expected to be on: {log}"
        );
    }
    let backing = read_dir_files(&m.backing);
    assert_eq!(
        through_mount.keys().collect::<Vec<_>>(),
        backing.keys().collect::<Vec<_>>(),
        "file names through the mount vs backing"
    );
    for (name, bytes) in &through_mount {
        let b = &backing[name];
        if bytes != b {
            let at = bytes.iter().zip(b.iter()).position(|(x, y)| x != y);
            panic!(
                "{name}: mount served {} bytes, backing has {}; first difference at {at:?}",
                bytes.len(),
                b.len()
            );
        }
    }
    let out = common::sqlite3(&m.backing_path(db), "PRAGMA integrity_check;");
    assert_eq!(out.trim(), "ok", "integrity_check of the backing file");
}

// ---------------------------------------------------------------------------------------
// 1, 2, 5: two writer processes and a reader thread.

struct ReaderStats {
    reads: u64,
    partial: u64,
}

fn concurrent_writers(journal: &str, mount_args: &[&str]) {
    let start = Instant::now();
    let m = Mount::with_args(mount_args);
    let db = m.path("c.db");
    create_db(&db, journal);

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (db, journal, stop) = (db.clone(), journal.to_string(), stop.clone());
        std::thread::spawn(move || {
            let conn = open(&db, &journal);
            let mut stats = ReaderStats {
                reads: 0,
                partial: 0,
            };
            let mut last = [0i64; 2];
            loop {
                let finished = stop.load(Ordering::Acquire);
                let ns = check_snapshot(&conn);
                for w in 0..2 {
                    assert!(ns[w] >= last[w], "writer {} went backwards", w + 1);
                }
                last = ns;
                stats.reads += 1;
                if ns.iter().any(|&n| n > 0 && n < TXNS as i64) {
                    stats.partial += 1;
                }
                if finished {
                    assert_eq!(last, [TXNS as i64; 2], "reader's final snapshot");
                    return stats;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let cli = spawn_cli_writer(&db, journal, 1, TXNS);
    let rust = spawn_rust_writer(&db, journal, 2, TXNS, 1, None);
    let limit = Duration::from_secs(60);
    let cli_out = cli.wait_ok(limit);
    assert!(
        cli_out.trim() == journal.to_lowercase(),
        "CLI output: {cli_out}"
    );
    let committed = rust
        .wait_ok(limit)
        .lines()
        .filter(|l| l.starts_with("committed "))
        .count();
    assert_eq!(committed as u64, TXNS, "rusqlite writer acknowledgements");
    stop.store(true, Ordering::Release);
    let stats = reader.join().expect("reader thread");
    assert!(stats.reads > 0);
    if journal == "WAL" {
        // WAL readers never wait for writers, so they must have seen work in progress.
        assert!(stats.partial > 0, "reader never overlapped the writers");
    }

    {
        let conn = open(&db, journal);
        assert_eq!(check_snapshot(&conn), [TXNS as i64; 2]);
        verify_rows(&conn, 1, TXNS as i64);
        verify_rows(&conn, 2, TXNS as i64);
        integrity_check(&conn);
    }
    eprintln!(
        "{journal} {mount_args:?}: {} reads ({} mid-write) in {:?}",
        stats.reads,
        stats.partial,
        start.elapsed()
    );
    finish(m, "c.db", mount_args);
}

#[test]
fn wal_two_writer_processes_and_a_reader() {
    concurrent_writers("WAL", &[]);
}

#[test]
fn wal_two_writer_processes_and_a_reader_database_cached() {
    concurrent_writers("WAL", CACHED);
}

#[test]
fn wal_two_writer_processes_and_a_reader_no_passthrough() {
    concurrent_writers("WAL", &["--no-passthrough"]);
}

#[test]
fn delete_journal_two_writer_processes() {
    concurrent_writers("DELETE", &[]);
}

#[test]
fn delete_journal_two_writer_processes_database_cached() {
    concurrent_writers("DELETE", CACHED);
}

#[test]
fn delete_journal_two_writer_processes_no_passthrough() {
    concurrent_writers("DELETE", &["--no-passthrough"]);
}

#[test]
fn truncate_journal_two_writer_processes() {
    concurrent_writers("TRUNCATE", &[]);
}

#[test]
fn truncate_journal_two_writer_processes_no_passthrough() {
    concurrent_writers("TRUNCATE", &["--no-passthrough"]);
}

#[test]
fn persist_journal_two_writer_processes() {
    concurrent_writers("PERSIST", &[]);
}

#[test]
fn persist_journal_two_writer_processes_no_passthrough() {
    concurrent_writers("PERSIST", &["--no-passthrough"]);
}

// ---------------------------------------------------------------------------------------
// 3: WAL with locking_mode=EXCLUSIVE.

/// A second process must get "database is locked" (SQLITE_BUSY) both reading and writing.
fn assert_locked_out(db: &Path) {
    for sql in [
        "SELECT count(*) FROM t;",
        "INSERT INTO totals VALUES (9, 0, 0);",
    ] {
        let err = sqlite3_fails(db, sql);
        // "(5)" is the CLI's report of the result code: SQLITE_BUSY.
        assert!(
            err.contains("database is locked (5)"),
            "{sql}: expected SQLITE_BUSY, got: {err}"
        );
    }
}

fn exclusive_wal(shm_first: bool) {
    let m = Mount::new();
    let db = m.path("x.db");
    create_db(&db, "WAL");
    let txns = 400i64;
    {
        let mut conn = Connection::open(&db).unwrap();
        if shm_first {
            // Read in shared mode first, so the wal-index lives in the mmapped -shm and the
            // connection then upgrades to holding it exclusively.
            let n: i64 = conn
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 0);
            assert!(m.path("x.db-shm").exists(), "-shm should exist");
        }
        // Before the first read this keeps the wal-index in heap memory (no -shm at all).
        let mode: String = conn
            .query_row("PRAGMA locking_mode=EXCLUSIVE", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "exclusive");
        for i in 0..txns {
            commit_rows(&mut conn, 1, i, 1);
            if i == 0 {
                if !shm_first {
                    assert!(
                        !m.path("x.db-shm").exists(),
                        "exclusive WAL should not use a -shm file"
                    );
                }
                assert_locked_out(&db);
            }
        }
        // Still held after many commits (exclusive mode never drops the lock).
        assert_locked_out(&db);
        let busy: i64 = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 0, "checkpoint in exclusive mode");
        assert_eq!(
            std::fs::metadata(m.path("x.db-wal")).unwrap().len(),
            0,
            "WAL truncated by the checkpoint"
        );
        assert_locked_out(&db);
        // A few more commits after the checkpoint, left in the WAL for close to fold in.
        for i in txns..txns + 10 {
            commit_rows(&mut conn, 1, i, 1);
        }
        assert_eq!(check_snapshot(&conn), [txns + 10, 0]);
    }
    // Closed: another process gets in at once (the CLI does not wait: no .timeout).
    let out = common::sqlite3(&db, "SELECT n FROM totals WHERE writer = 1;");
    assert_eq!(out.trim(), (txns + 10).to_string());
    {
        // Reopen, in exclusive mode again, and verify everything.
        let conn = Connection::open(&db).unwrap();
        conn.execute_batch("PRAGMA locking_mode=EXCLUSIVE").unwrap();
        assert_eq!(check_snapshot(&conn), [txns + 10, 0]);
        verify_rows(&conn, 1, txns + 10);
        integrity_check(&conn);
        assert_locked_out(&db);
    }
    finish(m, "x.db", &[]);
}

#[test]
fn wal_exclusive_locking_mode() {
    exclusive_wal(false);
}

#[test]
fn wal_exclusive_locking_mode_after_shm() {
    exclusive_wal(true);
}

// ---------------------------------------------------------------------------------------
// 6: a writer SIGKILLed mid-workload.

#[derive(Debug, Clone, Copy)]
enum Kill {
    /// SIGKILL once this many rows are acknowledged, after a pause of this many µs.
    AfterRows(u64, u64),
    /// SIGKILL in the middle of a large transaction begun after this many transactions.
    InTransaction(u64),
}

fn crash_writer(journal: &str, mount_args: &[&str]) {
    let m = Mount::with_args(mount_args);
    let db = m.path("k.db");
    create_db(&db, journal);
    let mut acknowledged = BTreeSet::new();
    // Kill after different numbers of acknowledged rows, with and without a pause, so the
    // kill lands at different points; and twice in the middle of a large transaction that
    // has already written to the database file or the WAL.
    let rounds = [
        Kill::AfterRows(40, 0),
        Kill::AfterRows(136, 700),
        Kill::InTransaction(12),
        Kill::AfterRows(88, 2_300),
        Kill::InTransaction(30),
        Kill::AfterRows(200, 0),
    ];
    for (round, kill) in rounds.into_iter().enumerate() {
        let stall = match kill {
            Kill::InTransaction(after) => Some(after),
            Kill::AfterRows(..) => None,
        };
        let mut p = spawn_rust_writer(&db, journal, 1, 0, 8, stall);
        let stdout = p.child.as_mut().unwrap().stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let lines = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                if let Some(s) = line.strip_prefix("committed ") {
                    tx.send(Some(s.parse::<i64>().unwrap())).ok();
                } else if line == "in-transaction" {
                    tx.send(None).ok();
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = 0;
        loop {
            match kill {
                Kill::AfterRows(after, _) if seen >= after => break,
                _ => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Some(s)) => {
                    acknowledged.insert(s);
                    seen += 1;
                }
                Ok(None) => break,
                Err(_) => panic!("round {round}: writer stuck after {seen} rows"),
            }
        }
        let mut child = p.child.take().unwrap();
        match kill {
            Kill::AfterRows(_, pause_us) => {
                std::thread::sleep(Duration::from_micros(pause_us));
            }
            Kill::InTransaction(_) => {
                // The uncommitted transaction has reached the files recovery must undo.
                let side = if journal == "WAL" {
                    "k.db-wal"
                } else {
                    "k.db-journal"
                };
                let len = std::fs::metadata(m.path(side)).map(|md| md.len());
                assert!(
                    matches!(len, Ok(l) if l > 0),
                    "round {round}: {side} should hold the open transaction: {len:?}"
                );
            }
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "round {round}: writer should have died by SIGKILL, got {status}"
        );
        lines.join().unwrap();
        acknowledged.extend(rx.try_iter().flatten());

        // Recover through the mount: every acknowledged row is there, commits are atomic.
        let conn = open(&db, journal);
        integrity_check(&conn);
        let [n, _] = check_snapshot(&conn);
        let max_ack = *acknowledged.last().unwrap();
        assert!(
            n >= max_ack,
            "round {round}: {n} rows present, {max_ack} acknowledged"
        );
        if let Kill::InTransaction(_) = kill {
            assert_eq!(
                n, max_ack,
                "round {round}: killed transaction not rolled back"
            );
        }
        assert_eq!(n % 8, 0, "round {round}: partial transaction visible");
        verify_rows(&conn, 1, n);
        let present: BTreeSet<i64> = (1..=n).collect();
        assert!(acknowledged.is_subset(&present));
        eprintln!(
            "{journal} {mount_args:?} crash round {round} ({kill:?}): \
             {max_ack} acknowledged, {n} present"
        );
    }
    finish(m, "k.db", mount_args);
}

#[test]
fn wal_writer_killed_mid_workload() {
    crash_writer("WAL", &[]);
}

#[test]
fn wal_writer_killed_mid_workload_no_passthrough() {
    crash_writer("WAL", &["--no-passthrough"]);
}

#[test]
fn wal_writer_killed_mid_workload_database_cached() {
    crash_writer("WAL", CACHED);
}

#[test]
fn delete_journal_writer_killed_mid_workload() {
    crash_writer("DELETE", &[]);
}

#[test]
fn delete_journal_writer_killed_mid_workload_no_passthrough() {
    crash_writer("DELETE", &["--no-passthrough"]);
}

// ---------------------------------------------------------------------------------------
// Journal modes without a journal file: MEMORY and OFF.

fn journal_in_memory_or_off(journal: &str) {
    let m = Mount::new();
    let db = m.path("nojournal.db");
    create_db(&db, journal);
    let mut conn = open(&db, journal);
    for i in 0..200 {
        commit_rows(&mut conn, 1, i * 3, 3);
    }
    verify_rows(&conn, 1, 600);
    integrity_check(&conn);
    drop(conn);
    finish(m, "nojournal.db", &[]);
}

#[test]
fn memory_journal_mode() {
    journal_in_memory_or_off("MEMORY");
}

#[test]
fn off_journal_mode() {
    journal_in_memory_or_off("OFF");
}

// ---------------------------------------------------------------------------------------
// Database files in the kernel page cache (`--database-io cached`).

/// The count of `op` requests in the summary walfs logs at unmount
/// (`requests=lookup=21/7us getattr=118/1us ...`).
fn requests(log: &str, op: &str) -> u64 {
    let summary = log
        .lines()
        .find_map(|l| l.split_once("requests=").map(|(_, s)| s))
        .unwrap_or_else(|| panic!("no request summary in the log: {log}"));
    summary
        .split_whitespace()
        .find_map(|field| {
            let (name, rest) = field.split_once('=')?;
            (name == op).then(|| rest.split('/').next().unwrap().parse().unwrap())
        })
        .unwrap_or(0)
}

/// Point reads, one read transaction each, on a database of `rows` rows.
fn point_reads(conn: &Connection, rows: i64, n: i64) {
    for i in 0..n {
        let id = (i * 7_919) % rows + 1;
        let got: i64 = conn
            .query_row("SELECT val FROM t WHERE id = ?1", [id], |r| r.get(0))
            .unwrap();
        assert!(got >= 0);
    }
}

/// Round trips of read transactions: with the database in the page cache a read
/// transaction reaches walfs for nothing (no `getattr` for SQLite's `fstat`, and a
/// commit keeps the cached pages); in passthrough every read invalidates the atime and
/// the next transaction's `fstat` asks walfs.
fn read_transactions(journal: &str, mount_args: &[&str]) -> (u64, u64) {
    const ROWS: i64 = 2_000;
    const READS: i64 = 3_000;
    // The request summary is logged at unmount, at level info.
    let mut m = Mount::with_env(mount_args, &[("RUST_LOG", "info")]);
    let db = m.path("r.db");
    create_db(&db, journal);
    {
        let mut conn = open(&db, journal);
        commit_rows(&mut conn, 1, 0, ROWS);
    }
    let conn = open(&db, journal);
    conn.execute_batch("PRAGMA cache_size=5; PRAGMA mmap_size=0;")
        .unwrap();
    point_reads(&conn, ROWS, READS);
    // A commit between reads must not cost the cache.
    let mut writer = open(&db, journal);
    commit_rows(&mut writer, 2, 0, 1);
    drop(writer);
    point_reads(&conn, ROWS, READS);
    drop(conn);
    let log = m.stop();
    (requests(&log, "getattr"), requests(&log, "read"))
}

#[test]
fn read_transactions_on_a_cached_database_make_no_round_trip() {
    for journal in ["DELETE", "WAL"] {
        let (getattrs, reads) = read_transactions(journal, CACHED);
        eprintln!("{journal}: {getattrs} getattr and {reads} read requests");
        // The setup and the writer's transactions make a few hundred at most; 6,000 read
        // transactions would make 6,000 more.
        assert!(getattrs < 300, "{journal}: {getattrs} getattr requests");
        // The database is about 1.3 MB: reading it once is a few hundred requests.
        assert!(reads < 500, "{journal}: {reads} read requests");
    }
    // The control: the same in passthrough pays a getattr per read transaction.
    let (getattrs, _) = read_transactions("DELETE", PASSTHROUGH);
    eprintln!("passthrough: {getattrs} getattr requests");
    assert!(
        getattrs >= 6_000,
        "passthrough: {getattrs} getattr requests"
    );
}

/// `--database-io auto`, the default: each open period of a rollback-journal database
/// (first open to last close) is served the way that cost fewer round trips in the
/// period before it. `periods` run one after another on one mount, each on its own
/// connection; returns the mount's getattr and write request counts.
fn auto_periods(periods: &[(&str, i64)]) -> (u64, u64) {
    const ROWS: i64 = 2_000;
    let mut m = Mount::with_env(&[], &[("RUST_LOG", "info")]);
    let db = m.path("auto.db");
    create_db(&db, "DELETE");
    {
        let mut conn = open(&db, "DELETE");
        commit_rows(&mut conn, 1, 0, ROWS);
    }
    let mut seq = 0;
    for &(what, n) in periods {
        let mut conn = match what {
            "read-only" => {
                Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                    .unwrap()
            }
            _ => open(&db, "DELETE"),
        };
        conn.execute_batch("PRAGMA cache_size=5; PRAGMA mmap_size=0;")
            .unwrap();
        if what == "commits" {
            for _ in 0..n {
                commit_rows(&mut conn, 2, seq, 1);
                seq += 1;
            }
        } else {
            point_reads(&conn, ROWS, n);
        }
        drop(conn);
        // The kernel sends RELEASE asynchronously: close returns before walfs has seen
        // it, and an open that arrives first joins the open period (and its mode), as
        // the kernel requires. Give the release time to land so that each connection
        // starts a period of its own.
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let log = m.stop();
    (requests(&log, "getattr"), requests(&log, "write"))
}

#[test]
fn auto_database_io_serves_each_database_the_cheaper_way() {
    // Read-mostly, opened read-write: the first period pays a getattr per read
    // transaction (nothing is known yet), the next two read from the cache.
    let (getattrs, writes) = auto_periods(&[("read", 3_000), ("read", 3_000), ("read", 3_000)]);
    eprintln!("read-mostly: {getattrs} getattr and {writes} write requests");
    assert!(
        (3_000..4_500).contains(&getattrs),
        "read-mostly: {getattrs} getattr requests (one period of 3,000 read transactions in passthrough, then none)"
    );
    // Opened read-only with nothing known: the cache from the start.
    let (getattrs, _) = auto_periods(&[("read-only", 3_000)]);
    eprintln!("read-only: {getattrs} getattr requests");
    assert!(getattrs < 500, "read-only: {getattrs} getattr requests");
    // Write-heavy: 300 one-row commits in passthrough (no write reaches walfs), and the
    // read period after them keeps passthrough too (its 3,000 getattrs), because the
    // commits would have cost more page writes than the getattrs they saved.
    let (getattrs, writes) = auto_periods(&[("commits", 300), ("read", 3_000)]);
    eprintln!("write-heavy: {getattrs} getattr and {writes} write requests");
    assert!(writes < 50, "write-heavy: {writes} write requests");
    assert!(
        getattrs >= 3_300,
        "write-heavy: {getattrs} getattr requests"
    );
    // A WAL-mode database always keeps passthrough: its read transactions cost no round
    // trip there, and its checkpoints would write pages through walfs.
    let mut m = Mount::with_env(&[], &[("RUST_LOG", "info")]);
    let db = m.path("wal.db");
    create_db(&db, "WAL");
    for period in 0..3 {
        let mut conn = open(&db, "WAL");
        for i in 0..200 {
            commit_rows(&mut conn, 1, period * 200 + i, 1);
        }
    }
    let writes = requests(&m.stop(), "write");
    assert!(writes < 50, "WAL: {writes} write requests");
}

/// The kernel keeps a database's cached pages between opens only while the backing file
/// is as the last close left it: a change made in BACKING directly, or through a
/// passthrough open of the same file, is seen by the next open.
#[test]
fn a_database_changed_behind_the_cache_is_read_fresh_at_the_next_open() {
    let m = Mount::with_args(CACHED);
    let db = m.path("s.db");
    create_db(&db, "DELETE");
    let count = |conn: &Connection| -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    };
    {
        let mut conn = open(&db, "DELETE");
        commit_rows(&mut conn, 1, 0, 10);
        assert_eq!(count(&conn), 10);
    }
    // Written in BACKING directly, while no handle is open through the mount.
    let backing = common::sqlite3(
        &m.backing_path("s.db"),
        "INSERT INTO t(writer, seq, val, pad) VALUES (9, 1, 1, x'00'); SELECT count(*) FROM t;",
    );
    assert_eq!(backing.trim(), "11");
    let conn = open(&db, "DELETE");
    assert_eq!(
        count(&conn),
        11,
        "the change in BACKING is seen through the mount"
    );
    integrity_check(&conn);
    drop(conn);
    // A write-only open is served in passthrough (its data cannot be read to recognise
    // the database); what it writes must not be hidden by the cached pages either.
    let page1 = std::fs::read(m.backing_path("s.db")).unwrap()[..100].to_vec();
    let mut page1_changed = page1.clone();
    page1_changed[24..28].copy_from_slice(&0x7777_7777u32.to_be_bytes()); // change counter
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
        f.write_all_at(&page1_changed[24..28], 24).unwrap();
    }
    let through = std::fs::read(&db).unwrap();
    assert_eq!(&through[24..28], &page1_changed[24..28]);
    finish(m, "s.db", CACHED);
}

/// The kernel refuses to mix passthrough and page-cache opens of one file (the open fails
/// with EIO): a file opened while it was not yet a database keeps passthrough for every
/// open until all are closed, and the next open of the database uses the cache.
#[test]
fn a_file_that_becomes_a_database_while_open_keeps_its_mode() {
    let m = Mount::with_args(CACHED);
    let db = m.path("n.db");
    let held = std::fs::File::create(&db).unwrap();
    create_db(&db, "DELETE");
    {
        let mut conn = open(&db, "DELETE");
        commit_rows(&mut conn, 1, 0, 50);
        // A second, read-only open of the file, now a database, while the first is held.
        let ro =
            Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let n: i64 = ro
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 50);
    }
    drop(held);
    let mut conn = open(&db, "DELETE");
    commit_rows(&mut conn, 1, 50, 50);
    integrity_check(&conn);
    drop(conn);
    finish(m, "n.db", CACHED);
}

//! Synchronous replication (`--sync-replication`), on real mounts replicating to moto (the
//! S3 API on 127.0.0.1), with writers on their own SQLite connections: a commit that
//! returns is in the replica (RPO 0) even when walfs is killed and its staging directory
//! is lost; concurrent commits share uploads; a replica that does not answer within
//! `--sync-timeout` degrades the database to asynchronous replication (or fails its
//! commits with EIO, as asked) until it has caught up, and nothing committed is lost.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{as_strs, Mount, S3Fixture, S3_ENV};
use rusqlite::Connection;

/// Opens `db` through the mount in `mode` with synchronous=FULL (a WAL commit's fsync is
/// its durability barrier, and so the barrier that waits for the replica).
fn open(db: &Path, mode: &str) -> Connection {
    let c = Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row(&format!("PRAGMA journal_mode={mode}"), [], |_| Ok(()))
        .unwrap();
    c.execute_batch("PRAGMA synchronous=FULL;").unwrap();
    c
}

fn create(db: &Path, mode: &str) {
    open(db, mode)
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS t(writer INTEGER, seq INTEGER, pad BLOB, PRIMARY KEY(writer, seq));",
        )
        .unwrap();
}

fn insert(c: &Connection, writer: i64, seq: i64) -> rusqlite::Result<usize> {
    c.execute(
        "INSERT INTO t(writer, seq, pad) VALUES (?1, ?2, randomblob(300))",
        (writer, seq),
    )
}

/// The rows of `db` (a plain file), by writer: their seqs, sorted.
fn rows(db: &Path) -> BTreeMap<i64, Vec<i64>> {
    let c = Connection::open(db).unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok", "{}", db.display());
    let mut out: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut st = c
        .prepare("SELECT writer, seq FROM t ORDER BY writer, seq")
        .unwrap();
    let it = st
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .unwrap();
    for row in it {
        let (w, s) = row.unwrap();
        out.entry(w).or_default().push(s);
    }
    out
}

/// Writers committing one row at a time on `db` until `stop` (or an error: walfs was
/// killed); each acknowledged seq is recorded only after its commit returned.
fn writers(
    db: &Path,
    mode: &str,
    ids: std::ops::Range<i64>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<(i64, Vec<i64>)>> {
    ids.map(|w| {
        let (db, mode, stop) = (db.to_path_buf(), mode.to_string(), stop.clone());
        std::thread::spawn(move || {
            let c = open(&db, &mode);
            let mut acked = Vec::new();
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                if insert(&c, w, seq).is_err() {
                    break;
                }
                acked.push(seq);
                seq += 1;
            }
            (w, acked)
        })
    })
    .collect()
}

/// The restore of `db` from the replica holds every acknowledged seq, and each writer's
/// rows form one run from 0 (a committed state: at most the commits in flight when walfs
/// died come on top of the acknowledged ones). Returns the commits checked.
fn assert_holds(restored: &Path, acked: &[(i64, Vec<i64>)]) -> usize {
    let got = rows(restored);
    let mut checked = 0;
    for (w, seqs) in acked {
        let have = got.get(w).cloned().unwrap_or_default();
        let expected_prefix: Vec<i64> = (0..have.len() as i64).collect();
        assert_eq!(have, expected_prefix, "writer {w}: not one run from 0");
        assert!(
            have.len() >= seqs.len(),
            "writer {w}: {} acknowledged commits, the replica holds {} (RPO 0 broken)",
            seqs.len(),
            have.len()
        );
        checked += seqs.len();
    }
    checked
}

#[test]
fn every_acknowledged_commit_is_in_the_replica_after_kill_9_and_lost_staging() {
    let f = S3Fixture::new("rpo0");
    let mut m = f.mount(&["--sync-replication"]);
    let (wal, del) = (m.path("w.db"), m.path("d.db"));
    create(&wal, "WAL");
    create(&del, "DELETE");
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = writers(&wal, "WAL", 0..3, &stop);
    handles.extend(writers(&del, "DELETE", 10..12, &stop));
    std::thread::sleep(Duration::from_secs(4));
    // walfs dies under the writers, and its staging directory is lost with it.
    m.kill9();
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<(i64, Vec<i64>)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    std::fs::remove_dir_all(f.staging()).unwrap();
    let (wal_acked, del_acked): (Vec<_>, Vec<_>) = acked.into_iter().partition(|(w, _)| *w < 10);
    let mut checked = 0;
    for (db, acked) in [("w.db", &wal_acked), ("d.db", &del_acked)] {
        let (restored, _) = f
            .try_restore(db, db, &[])
            .unwrap_or_else(|e| panic!("restore of {db}: {e}"));
        checked += assert_holds(&restored, acked);
    }
    eprintln!("{checked} acknowledged commits checked in the replica");
    assert!(checked > 40, "too few commits to prove anything: {checked}");
}

/// The value of `field=` in the log line that contains `line`.
fn log_field(log: &str, line: &str, field: &str) -> u64 {
    let l = log
        .lines()
        .find(|l| l.contains(line))
        .unwrap_or_else(|| panic!("no {line:?} in the log: {log}"));
    let at = l.find(&format!("{field}=")).unwrap() + field.len() + 1;
    l[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Commits on different databases that wait at the same time share upload rounds (SQLite
/// itself serialises the commits of one database: each holds the write lock through its
/// barrier).
#[test]
fn concurrent_commits_share_upload_rounds() {
    let f = S3Fixture::new("group");
    let env: Vec<(&str, &str)> = S3_ENV
        .iter()
        .copied()
        .chain([("RUST_LOG", "info")])
        .collect();
    let mut m = Mount::with_env(&as_strs(&f.args(&["--sync-replication"])), &env);
    let names: Vec<String> = (0..6).map(|i| format!("g{i}.db")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for (i, name) in names.iter().enumerate() {
        create(&m.path(name), "WAL");
        handles.extend(writers(&m.path(name), "WAL", i as i64..i as i64 + 1, &stop));
    }
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    let commits: usize = handles.into_iter().map(|h| h.join().unwrap().1.len()).sum();
    let log = m.stop();
    let waits = log_field(&log, "synchronous replication stopped", "waits");
    let rounds = log_field(&log, "synchronous replication stopped", "rounds");
    eprintln!("{commits} commits on 6 databases: {waits} waited, in {rounds} upload rounds");
    assert!(commits > 30, "{commits} commits");
    assert!(
        waits as usize >= commits,
        "{waits} waits for {commits} commits"
    );
    assert!(
        rounds * 2 <= waits,
        "{rounds} upload rounds for {waits} waiting commits: uploads are not shared"
    );
    for name in &names {
        let (out, _) = f.restore(name, name, &[]);
        common::assert_same_database(&m.backing_path(name), &out);
    }
}

/// Waits until `m`'s log contains `what`.
fn wait_log(m: &Mount, what: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !m.log().contains(what) {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in the log within {limit:?}: {}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One database per journal mode behind a replica that does not answer yet, with
/// `action`: the first commit of each waits `--sync-timeout`, then (degrade) commits
/// return at once or (eio) fail at once; once the replica answers and has caught up,
/// commits wait for it again; at the end the replica equals each database.
fn unanswered_replica(action: &str) {
    let f = S3Fixture::new(action);
    let port = common::free_port();
    let url = f.moto.s3_url_via(port, &f.prefix);
    let metrics_port = common::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let args = f.args_to(
        &url,
        &[
            "--sync-replication",
            "--sync-timeout",
            "1s",
            "--sync-timeout-action",
            action,
            "--metrics-addr",
            &metrics_addr,
        ],
    );
    // One counter of the mount's metrics (`--metrics-addr`).
    let metric = |name: &str| -> u64 {
        let (status, _, body) = common::http(metrics_port, "GET", "/metrics").expect("scrape");
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
            .parse::<f64>()
            .unwrap() as u64
    };
    // The databases exist before the replica is on.
    let mut m = Mount::with_env(&[], S3_ENV);
    let modes = [("w.db", "WAL"), ("d.db", "DELETE")];
    for (name, mode) in modes {
        create(&m.path(name), mode);
    }
    m.stop();
    m.start(&as_strs(&args));
    let conns: Vec<Connection> = modes
        .iter()
        .map(|(name, mode)| open(&m.path(name), mode))
        .collect();
    let start = Instant::now();
    let mut failed = 0;
    for (i, c) in conns.iter().enumerate() {
        for seq in 0..20 {
            match insert(c, i as i64, seq) {
                Ok(_) => {}
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::SystemIoFailure =>
                {
                    failed += 1
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    let took = start.elapsed();
    let log = m.log();
    match action {
        "degrade" => {
            assert_eq!(failed, 0, "degrade: no commit fails");
            assert!(
                log.contains("synchronous replication degraded to asynchronous"),
                "{log}"
            );
        }
        _ => {
            assert_eq!(
                failed, 40,
                "eio: every commit fails while the replica is behind"
            );
            assert!(log.contains("synchronous replication failed"), "{log}");
        }
    }
    // The metrics say so: at least one timeout (one per database), and the commits that
    // returned unreplicated or failed.
    assert!(metric("walfs_sync_timeouts_total") >= 1);
    assert!(metric("walfs_sync_waits_total") >= 1);
    match action {
        "degrade" => {
            assert!(metric("walfs_sync_degraded_commits_total") >= 38);
            assert_eq!(metric("walfs_sync_failed_commits_total"), 0);
        }
        // Counted per barrier: a DELETE-mode commit that fails may fail two (the
        // journal's fsync, then its unlink as SQLite rolls back).
        _ => assert!(metric("walfs_sync_failed_commits_total") >= 40),
    }
    // Waiting for the timeout each, they would take 40 s.
    assert!(
        took < Duration::from_secs(10),
        "commits after the timeout do not wait: 40 took {took:?}"
    );
    assert!(
        took >= Duration::from_secs(1),
        "the first commits waited: {took:?}"
    );
    // The replica answers: it catches up, and commits wait for it again.
    common::forward(port, f.moto.port);
    wait_log(
        &m,
        "synchronous replication resumed",
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_secs(1));
    for (i, c) in conns.iter().enumerate() {
        insert(c, i as i64, 100).expect("a commit once the replica has caught up");
    }
    drop(conns);
    // RPO 0 again: those commits are in the replica without staging.
    m.kill9();
    std::fs::remove_dir_all(f.staging()).unwrap();
    for (i, (name, _)) in modes.iter().enumerate() {
        let (out, _) = f
            .try_restore(name, &format!("killed-{name}"), &[])
            .unwrap_or_else(|e| panic!("restore of {name}: {e}"));
        let got = rows(&out);
        assert!(
            got.get(&(i as i64)).is_some_and(|s| s.contains(&100)),
            "{name}: the commit made after the replica caught up is not in it: {got:?}"
        );
        // And the replica equals the database (nothing was lost while it was behind).
        let live = rows(&m.backing_path(name));
        assert_eq!(got, live, "{name}: replica and database differ");
    }
}

#[test]
fn a_replica_that_does_not_answer_degrades_to_async_until_it_catches_up() {
    unanswered_replica("degrade");
}

#[test]
fn with_eio_a_replica_that_does_not_answer_fails_commits_until_it_catches_up() {
    unanswered_replica("eio");
}

/// Only the databases named by `--sync-database` wait.
#[test]
fn sync_database_patterns_choose_which_databases_wait() {
    let f = S3Fixture::new("pattern");
    let port = common::free_port();
    let url = f.moto.s3_url_via(port, &f.prefix);
    let args = f.args_to(
        &url,
        &["--sync-database", "sync/*.db", "--sync-timeout", "3s"],
    );
    let mut m = Mount::with_env(&as_strs(&args), S3_ENV);
    std::fs::create_dir(m.path("sync")).unwrap();
    let (a, b) = (m.path("async.db"), m.path("sync/s.db"));
    let start = Instant::now();
    create(&a, "WAL");
    let unsynced = start.elapsed();
    let start = Instant::now();
    create(&b, "WAL");
    let synced = start.elapsed();
    assert!(
        unsynced < Duration::from_secs(2),
        "async.db waited: {unsynced:?}"
    );
    assert!(
        synced >= Duration::from_secs(3),
        "sync/s.db did not wait for the replica: {synced:?}"
    );
    common::forward(port, f.moto.port);
    m.stop();
    for name in ["async.db", "sync/s.db"] {
        let (out, _) = f.restore(name, name, &[]);
        common::assert_same_database(&m.backing_path(name), &out);
    }
}

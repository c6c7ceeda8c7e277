//! A full staging disk, on a real mount with a replica (one of the bad inputs the project
//! promises to survive): the application sees no error, walfs says once what to do,
//! nothing committed is lost, and once there is room again the replica restarts from a
//! snapshot and equals the database.
//!
//! (This was a unit test of capture; it needs root for its 1 MiB tmpfs, and `cargo test
//! --lib` needs none, so it runs here, through the mount.)

mod common;

use std::time::Duration;

use common::{assert_replica_follows, Mount, Tmpfs};
use rusqlite::Connection;

/// Fills the filesystem of `dir` with a file `filler`, written in pieces of `chunk`
/// bytes (less than a piece stays free); returns its path.
fn fill(dir: &std::path::Path, chunk: usize) -> std::path::PathBuf {
    let filler = dir.join("filler");
    let mut out = std::fs::File::create(&filler).unwrap();
    let piece = vec![7u8; chunk];
    while std::io::Write::write_all(&mut out, &piece).is_ok() {}
    filler
}

#[test]
fn a_full_staging_disk_fails_no_operation_and_the_replica_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let _tmpfs = Tmpfs::mount(&staging, "1m");
    let url = format!("file://{}", dir.path().join("replica").display());
    let staging_arg = staging.display().to_string();
    let mut m = Mount::with_env(
        &[
            "--replica",
            &url,
            "--staging-dir",
            &staging_arg,
            "--sync-interval",
            "100ms",
        ],
        &[],
    );
    let c = Connection::open(m.path("app.db")).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=0;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
         INSERT INTO t(v) VALUES (randomblob(3000));",
    )
    .unwrap();
    assert_replica_follows(&url, &[], &m, "app.db", Duration::from_secs(15));

    // Fill the staging filesystem.
    let filler = fill(&staging, 64 * 1024);
    // The commit succeeds (a `-wal` fsync does not wait for capture), and so does the
    // checkpoint, whose database fsync would have made it durable in staging: the
    // application never sees staging's failure.
    c.execute("INSERT INTO t(v) VALUES (randomblob(20000))", [])
        .unwrap();
    let busy: i64 = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .expect("a full staging disk must not fail the checkpoint");
    assert_eq!(busy, 0);
    c.execute("INSERT INTO t(v) VALUES (randomblob(30000))", [])
        .unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    })
    .expect("nor a later one");
    let log = m.log_when(Duration::from_secs(5), |l| {
        l.contains("restarts from a snapshot")
    });
    assert!(
        log.contains("staging cannot make the captured transactions durable at fsync")
            && log.contains("restarts from a snapshot once staging works again")
            && log.contains("free space or fix the staging directory"),
        "the failure must be logged with what to do: {log}"
    );
    assert!(!log.contains("fails with EIO"), "{log}");
    assert_eq!(
        log.matches("staging cannot make the captured transactions durable")
            .count(),
        1,
        "two failed checkpoints, one line: {log}"
    );
    // Nothing committed is lost: the rows are there.
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 3);

    // Room again: without another write, the history restarts from a snapshot and the
    // replica equals the database.
    std::fs::remove_file(&filler).unwrap();
    assert_replica_follows(&url, &[], &m, "app.db", Duration::from_secs(15));
    let log = m.log_when(Duration::from_secs(5), |l| l.contains("capture healed"));
    assert!(
        log.contains("capture healed with a snapshot: staging failed at fsync"),
        "{log}"
    );
    // And it follows the next commits one by one.
    c.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
        .unwrap();
    assert_replica_follows(&url, &[], &m, "app.db", Duration::from_secs(15));
    drop(c);
    let log = m.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// The one exception the operator chooses: with `--sync-replication
/// --sync-timeout-action eio`, a commit whose transactions staging cannot record cannot
/// reach the replica either, so it fails with EIO (logged with the reason), and once there
/// is room commits succeed and reach the replica again.
#[test]
fn a_full_staging_disk_fails_a_synchronous_commit_only_with_sync_timeout_action_eio() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let _tmpfs = Tmpfs::mount(&staging, "1m");
    let url = format!("file://{}", dir.path().join("replica").display());
    let staging_arg = staging.display().to_string();
    let mut m = Mount::with_env(
        &[
            "--replica",
            &url,
            "--staging-dir",
            &staging_arg,
            "--sync-replication",
            "--sync-timeout-action",
            "eio",
            "--sync-timeout",
            "2s",
        ],
        &[],
    );
    let c = Connection::open(m.path("app.db")).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
         INSERT INTO t(v) VALUES (randomblob(3000));",
    )
    .unwrap();
    let filler = fill(&staging, 64 * 1024);
    let e = c
        .execute("INSERT INTO t(v) VALUES (randomblob(200000))", [])
        .expect_err("a synchronous commit that cannot be staged must fail with eio");
    assert!(e.to_string().contains("disk I/O error"), "{e}");
    // Staging fails at the commit's `-wal` fsync, or (the batch held in memory) at its
    // seal for upload, and the wait for the replica times out.
    let failed = |log: &str| {
        log.contains("so the commit cannot reach the replica (--sync-timeout-action eio)")
            || log.contains("synchronous replication failed: the replica has not confirmed")
    };
    let log = m.log_when(Duration::from_secs(5), failed);
    assert!(failed(&log), "{log}");
    std::fs::remove_file(&filler).unwrap();
    // SQLite may report the failed fsync once more while it recovers; then commits work.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while c
        .execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
        .is_err()
    {
        assert!(std::time::Instant::now() < deadline, "commits keep failing");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_replica_follows(&url, &[], &m, "app.db", Duration::from_secs(15));
    drop(c);
    let log = m.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// A staging disk that is full when walfs starts does not keep the application from its
/// data: the mount starts (one ERROR says why the database is not captured yet), the
/// database is read and written through it, and once there is room the capture starts by
/// itself, without another write, and the replica equals the database.
#[test]
fn a_full_staging_disk_at_the_start_does_not_keep_the_mount_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let _tmpfs = Tmpfs::mount(&staging, "8m");
    let url = format!("file://{}", dir.path().join("replica").display());
    let staging_arg = staging.display().to_string();
    // Full, but for a few KiB.
    let filler = fill(&staging, 64 * 1024);
    let args = [
        "--replica",
        &url,
        "--staging-dir",
        &staging_arg,
        "--sync-interval",
        "100ms",
    ];
    // A database of 2 MiB in BACKING: its first snapshot cannot fit.
    let mut m = Mount::prepare(&[]);
    {
        let c = Connection::open(m.backing_path("big.db")).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500)
             INSERT INTO t(v) SELECT randomblob(4000) FROM n;
             PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
    }
    m.start(&args);
    let said = |log: &str| {
        log.contains("cannot stage what the database holds at the start")
            && log.contains("the mount starts anyway")
    };
    let log = m.log_when(Duration::from_secs(5), said);
    assert!(said(&log), "{log}");
    let c = Connection::open(m.path("big.db")).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 500);
    drop(c);
    // Room again: the capture starts without another write.
    std::fs::remove_file(&filler).unwrap();
    assert_replica_follows(&url, &[], &m, "big.db", Duration::from_secs(30));
    let log = m.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// A full backing disk can fail a WAL commit after all of its frames reached the `-wal`:
/// SQLite writes the frames, then cannot grow the `-shm` for their wal-index entries
/// (SQLITE_IOERR_SHMSIZE, "disk I/O error"), so the commit fails although its frames
/// validate, and capture reads it. The next writer starts again at the wal-index's end
/// and writes a longer transaction over it. Capture must notice that what it read is no
/// longer in the log (the log validates past its end, with other frames) and restart from
/// what SQLite reads: the replica catches up (found by the torture suite: the replica
/// stayed behind for good, taking itself for caught up).
#[test]
fn a_commit_failed_by_a_full_backing_disk_and_written_over_is_not_replicated() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("replica").display());
    let mut m = Mount::prepare(&[]);
    let _tmpfs = Tmpfs::mount(&m.backing, "40m");
    m.start(&["--replica", &url, "--sync-interval", "100ms"]);
    let c = Connection::open(m.path("app.db")).unwrap();
    c.execute_batch(
        "PRAGMA page_size=4096; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         PRAGMA wal_autocheckpoint=0; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);",
    )
    .unwrap();
    // A log just short of the first wal-index block (4062 frames): the next commit that
    // crosses it must grow the `-shm`.
    let wal = m.backing_path("app.db-wal");
    let frames = || (std::fs::metadata(&wal).unwrap().len() - 32) / (24 + 4096);
    while frames() < 4040 {
        c.execute("INSERT INTO t(v) VALUES (randomblob(3000))", [])
            .unwrap();
    }
    let shm = std::fs::metadata(m.backing_path("app.db-shm"))
        .unwrap()
        .len();
    assert_eq!(shm, 32 * 1024, "one wal-index block");
    // The backing disk full but for room for the next commit's frames.
    let filler = fill(&m.backing, 4096);
    {
        let out = std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .unwrap();
        let len = out.metadata().unwrap().len();
        out.set_len(len - 40 * 4096).unwrap();
    }
    let before = frames();
    let e = c
        .execute_batch(
            "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 36)
             INSERT INTO t(v) SELECT randomblob(3000) FROM n; COMMIT;",
        )
        .expect_err("the -shm cannot grow");
    assert!(e.to_string().contains("disk I/O error"), "{e}");
    let _ = c.execute_batch("ROLLBACK");
    assert!(
        frames() > before,
        "the failed commit's frames are in the log"
    );
    // Capture reads the failed commit meanwhile.
    std::thread::sleep(Duration::from_millis(500));
    // Room again: a longer commit is written over the failed one.
    std::fs::remove_file(&filler).unwrap();
    c.execute_batch(
        "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 80)
         INSERT INTO t(v) SELECT randomblob(3000) FROM n; COMMIT;",
    )
    .unwrap();
    assert_replica_follows(&url, &[], &m, "app.db", Duration::from_secs(15));
    drop(c);
    let log = m.stop();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("capture healed with a snapshot"), "{log}");
}

//! Replication end to end on a real mount: SQLite programs write under a `walfs mount
//! --replica file://...`, the mount is stopped, and the replica must restore, with the
//! `litestream` 0.5.17 binary as an independent reader, to a database identical to the
//! backing file (sqldiff empty, pages equal, integrity_check ok).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_same_database, sqlite3, walfs_restore, Mount};

/// Restores `replica` (one database's replica directory) with litestream into `out`.
fn litestream_restore(replica: &Path, out: &Path) {
    common::litestream_restore(&format!("file://{}", replica.display()), out, &[]);
}

/// `walfs mount` arguments replicating to `dir/replica`, staging in `dir/staging`.
fn replica_args(dir: &Path, sync_interval: &str) -> Vec<String> {
    vec![
        "--replica".into(),
        format!("file://{}", dir.join("replica").display()),
        "--staging-dir".into(),
        dir.join("staging").display().to_string(),
        "--sync-interval".into(),
        sync_interval.into(),
    ]
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A mount replicating to a file:// replica in `dir` (kept alive by the caller), with the
/// replica's path.
fn replicated_mount(dir: &tempfile::TempDir, sync_interval: &str) -> (Mount, PathBuf) {
    let args = replica_args(dir.path(), sync_interval);
    (
        Mount::with_args(&as_strs(&args)),
        dir.path().join("replica"),
    )
}

#[test]
fn wal_commits_reach_the_replica_and_litestream_restores_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, replica) = replicated_mount(&dir, "200ms");
    std::fs::create_dir_all(m.path("data/nested")).unwrap();
    let db = m.path("data/nested/app.db");
    sqlite3(
        &db,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB);
         CREATE INDEX t_v ON t(v);",
    );
    // Several processes, synchronous=FULL, a checkpoint in the middle, growth and shrink.
    for round in 0..6 {
        let mut sql = String::from("PRAGMA synchronous=FULL;");
        for i in 0..20 {
            sql.push_str(&format!(
                "INSERT INTO t(v, b) VALUES ('r{round}-{i}', randomblob({}));",
                100 + i * 37
            ));
        }
        sqlite3(&db, &sql);
        if round == 2 {
            sqlite3(&db, "PRAGMA wal_checkpoint(TRUNCATE);");
        }
        if round == 4 {
            sqlite3(
                &db,
                "PRAGMA synchronous=FULL; DELETE FROM t WHERE id % 3 = 0; VACUUM;",
            );
        }
    }
    let live = m.path("data/nested/app.db");
    assert_eq!(sqlite3(&live, "PRAGMA integrity_check;"), "ok\n");
    m.stop();

    let out = m.root.path().join("restored.db");
    litestream_restore(&replica.join("data/nested/app.db"), &out);
    // The last connection checkpointed and removed the WAL, so the backing file is the
    // whole database.
    assert!(!m.backing_path("data/nested/app.db-wal").exists());
    assert_same_database(&m.backing_path("data/nested/app.db"), &out);

    // walfs restore of the whole replica root, verified against walfs's checksum record.
    let all = m.root.path().join("all");
    let log = walfs_restore(&[
        &format!("file://{}", replica.display()),
        "-o",
        all.to_str().unwrap(),
    ]);
    assert!(
        log.contains("content checksum matches the writer's record"),
        "restore did not verify the recorded checksum: {log}"
    );
    assert_same_database(
        &m.backing_path("data/nested/app.db"),
        &all.join("data/nested/app.db"),
    );
}

#[test]
fn databases_present_before_the_mount_get_an_initial_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, replica) = replicated_mount(&dir, "200ms");
    m.stop();
    let db = m.backing_path("before.db");
    sqlite3(
        &db,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1), (2), (3);",
    );
    std::fs::write(m.backing_path("notes.db"), b"not a database at all").unwrap();
    m.start(&as_strs(&replica_args(dir.path(), "200ms")));
    sqlite3(
        &m.path("before.db"),
        "PRAGMA synchronous=FULL; INSERT INTO t VALUES (4);",
    );
    m.stop();
    let out = m.root.path().join("restored.db");
    litestream_restore(&replica.join("before.db"), &out);
    assert_same_database(&m.backing_path("before.db"), &out);
    assert!(
        !replica.join("notes.db").exists(),
        "a non-SQLite file named *.db must not be replicated"
    );
}

#[test]
fn commits_racing_the_uploader_are_all_replicated() {
    // A sync interval of 0 keeps the uploader marking uploads while capture stages the
    // next commits: the two must never fail an fsync or lose a position.
    let dir = tempfile::tempdir().unwrap();
    let (mut m, replica) = replicated_mount(&dir, "0");
    {
        let conn = rusqlite::Connection::open(m.path("busy.db")).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);",
        )
        .unwrap();
        for i in 0..400 {
            conn.execute("INSERT INTO t(v) VALUES (randomblob(?1))", [50 + i % 300])
                .expect("a commit failed while the uploader ran");
        }
    }
    m.stop();
    let out = m.root.path().join("restored.db");
    litestream_restore(&replica.join("busy.db"), &out);
    assert_same_database(&m.backing_path("busy.db"), &out);
    assert_eq!(sqlite3(&out, "SELECT count(*) FROM t;"), "400\n");
    let mine = m.root.path().join("walfs-restored.db");
    let log = walfs_restore(&[
        &format!("file://{}", replica.display()),
        "--db",
        "busy.db",
        "-o",
        mine.to_str().unwrap(),
    ]);
    assert!(log.contains("content checksum matches"), "{log}");
    assert_same_database(&m.backing_path("busy.db"), &mine);
}

/// Many WAL restarts under load, in both synchronous modes, with the default capture (the
/// WAL watcher reads commits beside the writer; the checkpoint's database barriers catch
/// up): no commit may be missed, so the capture never heals with a snapshot, and the
/// replica restores to the live database. The same with `--stage-at-commit`.
#[test]
fn frequent_restarts_never_miss_a_commit() {
    use rusqlite::Connection;
    for strict in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = replica_args(dir.path(), "100ms");
        if strict {
            args.push("--stage-at-commit".into());
        }
        let mut m = Mount::with_env(&as_strs(&args), &[]);
        for sync in ["NORMAL", "FULL"] {
            let db = m.path(&format!("{sync}.db"));
            let c = Connection::open(&db).unwrap();
            c.execute_batch(&format!(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync};
                 PRAGMA wal_autocheckpoint=10;
                 CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);"
            ))
            .unwrap();
            for i in 0..1500 {
                c.execute("INSERT INTO t(v) VALUES(randomblob(?1))", [100 + i % 3000])
                    .unwrap();
                if i % 300 == 0 {
                    c.execute_batch("DELETE FROM t WHERE id % 4 = 0;").unwrap();
                }
            }
        }
        let log = m.stop();
        assert!(!log.contains("healed"), "strict={strict}: {log}");
        for sync in ["NORMAL", "FULL"] {
            let out = m.root.path().join(format!("{sync}-restored.db"));
            walfs_restore(&[
                &format!("file://{}", dir.path().join("replica").display()),
                "--db",
                &format!("{sync}.db"),
                "-o",
                out.to_str().unwrap(),
            ]);
            assert_same_database(&m.backing_path(&format!("{sync}.db")), &out);
        }
    }
}

/// A database that is corrupt in its own right (a page overwritten outside SQLite) is
/// replicated as it is. `walfs restore` refuses to write it, with one line that says what
/// to do; with `--no-integrity-check` it writes it, says so, and the file equals the
/// database, for salvage.
#[test]
fn a_corrupt_database_restores_only_with_no_integrity_check() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, replica) = replicated_mount(&dir, "100ms");
    let db = m.path("app.db");
    sqlite3(
        &db,
        "PRAGMA journal_mode=DELETE; PRAGMA page_size=1024; CREATE TABLE t(x);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400)
         INSERT INTO t SELECT randomblob(300) FROM n;",
    );
    // Garbage over page 2 (the table's root, an interior page) past its header, through
    // the mount: capture stages it at the close, as it does any write outside SQLite.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
        f.write_all_at(&[0xa5; 1012], 1024 + 12).unwrap();
    }
    let check = common::run_sqlite3(&db, "PRAGMA integrity_check;");
    assert_ne!(check.stdout, b"ok\n", "the database must be corrupt");
    m.stop();
    let url = format!("file://{}", replica.display());
    let out = m.root.path().join("restored.db");
    let o = std::process::Command::new(common::WALFS)
        .args(["restore", &url, "--db", "app.db", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("fails PRAGMA integrity_check")
            && err
                .contains("restore an earlier --txid or --timestamp, or pass --no-integrity-check"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!out.exists());
    let log = walfs_restore(&[
        &url,
        "--db",
        "app.db",
        "-o",
        out.to_str().unwrap(),
        "--no-integrity-check",
    ]);
    assert!(
        log.contains(
            "content checksum matches the writer's record; integrity_check FAILED, written anyway"
        ),
        "{log}"
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(m.backing_path("app.db")).unwrap(),
        "the salvage restore must equal the database"
    );
}

/// A mount whose staging directory is lost (a container whose staging is not on a volume,
/// a move to another host) while the backing directory is kept continues each database's
/// history in the replica rather than starting a second one at TXID 1 beside it, whose
/// older TXIDs would make "the latest state" the old one. An unchanged database resumes
/// without a snapshot; one changed meanwhile is snapshotted at the next TXID. Either way
/// the restore equals the database.
#[test]
fn a_lost_staging_directory_continues_the_replicas_history() {
    let dir = tempfile::tempdir().unwrap();
    let args = replica_args(dir.path(), "100ms");
    let mut m = Mount::with_args(&as_strs(&args));
    for db in ["same.db", "changed.db"] {
        sqlite3(
            &m.path(db),
            "PRAGMA journal_mode=WAL; CREATE TABLE t(x);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50)
             INSERT INTO t SELECT i FROM n;",
        );
        for i in 0..20 {
            sqlite3(&m.path(db), &format!("INSERT INTO t VALUES ({i});"));
        }
    }
    m.stop();
    let url = format!("file://{}", dir.path().join("replica").display());
    let newest = |db: &str| -> u64 {
        let o = std::process::Command::new(common::WALFS)
            .args(["list", &url, "--db", db])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        // "newest TXID N ..." as `walfs list --db` prints the restorable range.
        let after = text
            .split("newest")
            .nth(1)
            .unwrap_or_else(|| panic!("no newest TXID in: {text}"));
        let digits: String = after
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().unwrap_or_else(|_| panic!("{text}"))
    };
    let before = (newest("same.db"), newest("changed.db"));
    let snapshots = |db: &str| {
        std::fs::read_dir(dir.path().join("replica").join(db).join("ltx/9"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let snapshots_before = (snapshots("same.db"), snapshots("changed.db"));
    // Staging is lost; changed.db changes while nothing is mounted.
    std::fs::remove_dir_all(dir.path().join("staging")).unwrap();
    sqlite3(
        &m.backing_path("changed.db"),
        "DELETE FROM t WHERE x % 3 = 0; PRAGMA wal_checkpoint(TRUNCATE);",
    );
    m.start(&as_strs(&args));
    for db in ["same.db", "changed.db"] {
        sqlite3(&m.path(db), "INSERT INTO t VALUES (1000);");
    }
    let log = m.stop();
    assert!(
        log.contains("the replica holds its history up to this TXID"),
        "{log}"
    );
    for (db, was) in [("same.db", before.0), ("changed.db", before.1)] {
        let now = newest(db);
        assert!(
            now > was,
            "{db}: the history must go on past TXID {was}, not restart (now {now})"
        );
        let out = m.root.path().join(format!("restored-{db}"));
        let log = walfs_restore(&[&url, "--db", db, "-o", out.to_str().unwrap()]);
        assert!(
            log.contains("content checksum matches the writer's record"),
            "{log}"
        );
        assert_same_database(&m.backing_path(db), &out);
    }
    // The unchanged database resumed without a snapshot; the changed one got one more,
    // at the next TXID.
    assert_eq!(
        snapshots("same.db"),
        snapshots_before.0,
        "same.db must resume without a snapshot"
    );
    assert_eq!(
        snapshots("changed.db"),
        snapshots_before.1 + 1,
        "changed.db is snapshotted at the next TXID"
    );
}

/// A replica added to a mount that already replicated elsewhere gets each database from a
/// snapshot on its own, without a write (the old replica's staged history was dropped once
/// it held it), and both restore to the live database. The old replica is not sent again
/// what it holds.
#[test]
fn a_replica_added_to_the_mount_gets_a_snapshot_without_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let args = replica_args(dir.path(), "100ms");
    let mut m = Mount::with_args(&as_strs(&args));
    sqlite3(
        &m.path("app.db"),
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500)
         INSERT INTO t SELECT randomblob(300) FROM n;",
    );
    for i in 0..10 {
        sqlite3(&m.path("app.db"), &format!("INSERT INTO t VALUES ({i});"));
    }
    m.stop();
    let old = dir.path().join("replica");
    let new = dir.path().join("second");
    let objects = |replica: &Path| -> Vec<String> {
        let mut names = Vec::new();
        for level in std::fs::read_dir(replica.join("app.db/ltx"))
            .map(|d| d.flatten().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            for f in std::fs::read_dir(level.path()).unwrap().flatten() {
                names.push(format!(
                    "{}/{}",
                    level.file_name().to_string_lossy(),
                    f.file_name().to_string_lossy()
                ));
            }
        }
        names.sort();
        names
    };
    let old_before = objects(&old);
    assert!(!old_before.is_empty());
    let mut both = args.clone();
    both.extend(["--replica".into(), format!("file://{}", new.display())]);
    m.start(&as_strs(&both));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while objects(&new).iter().all(|o| !o.starts_with("9/")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the added replica got no snapshot within 20 s: {:?}",
            objects(&new)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    sqlite3(&m.path("app.db"), "INSERT INTO t VALUES ('after');");
    m.stop();
    // "level/<min>-<max>.ltx": the max TXID.
    let max_txid = |o: &String| {
        let max = o.rsplit('-').next().unwrap().trim_end_matches(".ltx");
        u64::from_str_radix(max, 16).unwrap()
    };
    let held = old_before.iter().map(max_txid).max().unwrap();
    let resent: Vec<String> = objects(&old)
        .into_iter()
        .filter(|o| !old_before.contains(o) && o.starts_with("0/") && max_txid(o) <= held)
        .collect();
    assert!(
        resent.is_empty(),
        "the old replica was sent again what it held (up to TXID {held}): {resent:?}"
    );
    for (name, replica) in [("old", &old), ("new", &new)] {
        let out = m.root.path().join(format!("restored-{name}.db"));
        let url = format!("file://{}", replica.display());
        walfs_restore(&[&url, "--db", "app.db", "-o", out.to_str().unwrap()]);
        assert_same_database(&m.backing_path("app.db"), &out);
    }
}

//! Capture tests with real SQLite on a plain directory: the barrier methods are called
//! exactly where the FUSE layer will call them. Each test rebuilds the database from the
//! staged snapshots and batches, compares it page by page with the live database, and
//! checks every recorded content checksum (and the LTX checksum of each snapshot).

use std::fs;
use std::path::Path;

use rusqlite::Connection;

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::ltx::{decode, DatabaseChecksum};
use crate::sqlite::ContentChecksum;
use crate::staging::Staged;
use crate::staging::Staging;

struct Fixture {
    _dir: tempfile::TempDir,
    capture: Capture,
    db: PathBuf,
    rel: PathBuf,
    wal_rel: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("sub")).unwrap();
    let staging = Arc::new(Staging::open(dir.path().join("staging")).unwrap());
    staging.set_checksums(true);
    Fixture {
        capture: Capture::new(&root, staging),
        db: root.join("sub/app.db"),
        rel: PathBuf::from("sub/app.db"),
        wal_rel: PathBuf::from("sub/app.db-wal"),
        _dir: dir,
    }
}

fn open_db(path: &Path, page_size: u32, sync: &str, autockpt: u32) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(&format!("PRAGMA page_size={page_size};"))
        .unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    conn.execute_batch(&format!(
        "PRAGMA synchronous={sync}; PRAGMA wal_autocheckpoint={autockpt};
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB);"
    ))
    .unwrap();
    conn
}

fn checkpoint(conn: &Connection, mode: &str) {
    let busy: i64 = conn
        .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get(0))
        .unwrap();
    assert_eq!(busy, 0, "{mode}");
}

/// Seals what is staged and counts the staged items (snapshots and batches).
fn staged_count(f: &Fixture) -> usize {
    f.capture.seal(&f.rel).unwrap();
    f.capture.staging().pending(&f.rel).unwrap().len()
}

/// The checksum a staged item ends with: a snapshot's LTX post-apply checksum (CRC-64) or a
/// batch's content checksum (blake3).
enum Post {
    Ltx(u64),
    Content(ContentChecksum),
}

/// Rebuilds the database from the staged snapshots and batches, in TXID order, checking
/// that TXIDs are contiguous and every post-apply checksum against the image.
fn rebuild(f: &Fixture) -> Vec<u8> {
    f.capture.seal(&f.rel).unwrap();
    let staging = f.capture.staging();
    let mut image: Vec<u8> = Vec::new();
    let mut last = 0u64;
    for s in staging.pending(&f.rel).unwrap() {
        let (page_size, commit, post, pages) = match &s {
            Staged::Snapshot(snap) => {
                let file = decode(File::open(&snap.path).unwrap()).unwrap();
                let h = file.header;
                assert!(h.has_checksums());
                assert!(h.is_snapshot());
                assert!(h.max_txid > last, "snapshot {} after {last}", h.max_txid);
                image.clear();
                let pages: Vec<(u32, Vec<u8>)> =
                    file.pages.into_iter().map(|p| (p.pgno, p.data)).collect();
                (
                    h.page_size,
                    h.commit,
                    Post::Ltx(file.trailer.post_apply_checksum),
                    pages,
                )
            }
            Staged::Batch(b) => {
                assert_eq!(b.header.min_txid, last + 1, "TXIDs are contiguous");
                let mut pages = Vec::new();
                b.read_pages(|pgno, data| {
                    pages.push((pgno, data.to_vec()));
                    Ok(())
                })
                .unwrap();
                (
                    b.header.page_size,
                    b.header.commit,
                    Post::Content(b.post_checksum),
                    pages,
                )
            }
        };
        last = s.max_txid();
        let ps = page_size as usize;
        image.resize(image.len().min(commit as usize * ps), 0);
        for (pgno, data) in &pages {
            let at = (*pgno as usize - 1) * ps;
            if image.len() < at + ps {
                image.resize(at + ps, 0);
            }
            image[at..at + ps].copy_from_slice(data);
        }
        image.resize(commit as usize * ps, 0);
        match post {
            Post::Ltx(c) => assert_eq!(
                c,
                DatabaseChecksum::of_database(&image, page_size)
                    .unwrap()
                    .value(),
                "TXID {last}"
            ),
            Post::Content(c) => assert_eq!(
                c,
                ContentChecksum::of_database(&image, page_size).unwrap(),
                "TXID {last}"
            ),
        }
    }
    image
}

/// Checkpoints everything (with the barriers the checkpoint makes), then compares.
fn assert_replica_matches(f: &Fixture, conn: &Connection) {
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    checkpoint(conn, "TRUNCATE");
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert!(ev.is_empty(), "{ev:?}");
    let live = fs::read(&f.db).unwrap();
    let ps: u32 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    let image = rebuild(f);
    assert_eq!(image.len(), live.len());
    for (i, (a, b)) in image
        .chunks(ps as usize)
        .zip(live.chunks(ps as usize))
        .enumerate()
    {
        assert!(a == b, "page {} differs", i + 1);
    }
    let slot = f.capture.slot(&f.rel, false).unwrap();
    let guard = slot.lock();
    let c = guard.as_ref().unwrap();
    assert_eq!(
        c.checksum(),
        ContentChecksum::of_database(&live, ps).unwrap()
    );
    assert_eq!(
        f.capture.staging().state(&f.rel).unwrap().unwrap(),
        *c.state()
    );
}

fn heals(events: &[CaptureEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, CaptureEvent::Healed { .. }))
        .count()
}

/// The next barrier on the `-wal` stages exactly the TXID ranges `expected`, healing nothing.
fn barrier_stages(f: &Fixture, expected: &[(u64, u64)]) {
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(heals(&ev), 0, "{ev:?}");
    let want: Vec<_> = expected.iter().copied().map(Some).collect();
    assert_eq!(staged_txids(&ev), want);
}

/// The TXID range of each event, `None` for an event that staged nothing.
fn staged_txids(events: &[CaptureEvent]) -> Vec<Option<(u64, u64)>> {
    events
        .iter()
        .map(|e| match e {
            CaptureEvent::Staged {
                min_txid, max_txid, ..
            } => Some((*min_txid, *max_txid)),
            _ => None,
        })
        .collect()
}

/// synchronous=FULL: a barrier after every commit (its WAL fsync) and around every
/// checkpoint, in every checkpoint mode, with growth, shrink and VACUUM.
fn full_sync_workload(page_size: u32, autockpt: u32) {
    let f = fixture();
    let conn = open_db(&f.db, page_size, "FULL", autockpt);
    // Registration through the -wal name takes the initial snapshot.
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert!(
        matches!(ev[0], CaptureEvent::Staged { min_txid: 1, .. }),
        "{ev:?}"
    );
    assert!(f.capture.is_captured(&f.rel));
    let modes = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"];
    let blob = (page_size as usize * 3 / 2).min(20_000);
    for i in 0..40usize {
        conn.execute(
            "INSERT INTO t(v) VALUES(randomblob(?1))",
            [(i * 997 % blob + 10) as i64],
        )
        .unwrap();
        let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
        assert_eq!(heals(&ev), 0, "{ev:?}");
        if i % 4 == 0 {
            conn.execute(
                "UPDATE t SET v = randomblob(200) WHERE id % 3 = ?1",
                [(i % 3) as i64],
            )
            .unwrap();
            f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
        }
        if i % 7 == 6 {
            f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap(); // the checkpoint's WAL fsync
            checkpoint(&conn, modes[(i / 7) % 4]);
            let ev = f.capture.on(&f.rel, Barrier::DbSynced).unwrap(); // its database fsync
            assert_eq!(heals(&ev), 0, "{ev:?}");
        }
        if i == 20 {
            // Growth, then shrink.
            conn.execute_batch(
                "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<60)
                 INSERT INTO t(v) SELECT randomblob(1500) FROM c;",
            )
            .unwrap();
            f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
            conn.execute_batch("DELETE FROM t WHERE id % 2 = 0;")
                .unwrap();
            f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
            conn.execute_batch("VACUUM;").unwrap();
            let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
            assert_eq!(heals(&ev), 0, "{ev:?}");
        }
    }
    assert_eq!(f.capture.stats().heals.load(Ordering::Relaxed), 0);
    assert_replica_matches(&f, &conn);
    // The last connection closes: checkpoint and unlink of the WAL, a barrier before it.
    drop(conn);
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert!(ev.is_empty(), "{ev:?}");
    assert!(!f.db.with_file_name("app.db-wal").exists());
    let conn = open_db(&f.db, page_size, "FULL", autockpt);
    conn.execute("INSERT INTO t(v) VALUES(x'0102')", [])
        .unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(heals(&ev), 0, "{ev:?}");
    assert_replica_matches(&f, &conn);
}

#[test]
fn full_sync_512_no_autocheckpoint() {
    full_sync_workload(512, 0);
}

#[test]
fn full_sync_4096_autocheckpoint_10() {
    full_sync_workload(4096, 10);
}

#[test]
fn full_sync_65536_autocheckpoint_10() {
    full_sync_workload(65536, 10);
}

#[test]
fn full_sync_4096_no_autocheckpoint() {
    full_sync_workload(4096, 0);
}

/// A transaction that spills frames into the WAL and rolls back is never staged, even
/// when a barrier runs while its frames are there.
#[test]
fn rolled_back_transaction_is_never_staged() {
    let f = fixture();
    let conn = open_db(&f.db, 4096, "FULL", 0);
    conn.execute("INSERT INTO t(v) VALUES(randomblob(100))", [])
        .unwrap();
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    let before = staged_count(&f);
    conn.execute_batch(
        "PRAGMA cache_size=10; BEGIN;
         WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<300)
         INSERT INTO t(v) SELECT randomblob(2000) FROM c;",
    )
    .unwrap();
    let wal_len = fs::metadata(f.db.with_file_name("app.db-wal"))
        .unwrap()
        .len();
    assert!(wal_len > 100 * 4096, "the transaction spilled into the WAL");
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert!(ev.is_empty(), "{ev:?}");
    conn.execute_batch("ROLLBACK; PRAGMA cache_size=-2000;")
        .unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert!(ev.is_empty(), "{ev:?}");
    assert_eq!(staged_count(&f), before);
    // A later commit overwrites the rolled-back frames.
    conn.execute("INSERT INTO t(v) VALUES(randomblob(5000))", [])
        .unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_replica_matches(&f, &conn);
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 2);
}

/// synchronous=OFF: no barrier for commits or the checkpoint; the restart is only seen
/// afterwards, with frames never read. The capture heals with a snapshot and says so.
#[test]
fn synchronous_off_missed_restart_heals() {
    let f = fixture();
    let conn = open_db(&f.db, 4096, "OFF", 0);
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap(); // registration (at the WAL's creation)
    for _ in 0..5 {
        conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
            .unwrap();
        f.capture.on_wal_changed_for_test(&f.wal_rel);
    }
    // Missed: commits, a checkpoint and a restart, then one small commit.
    for _ in 0..10 {
        conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
            .unwrap();
    }
    checkpoint(&conn, "RESTART");
    conn.execute("INSERT INTO t(v) VALUES(x'01')", []).unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(heals(&ev), 1, "{ev:?}");
    let CaptureEvent::Healed { reason, .. } = ev
        .iter()
        .find(|e| heals(std::slice::from_ref(e)) == 1)
        .unwrap()
    else {
        unreachable!()
    };
    assert!(reason.contains("synchronous=OFF"), "{reason}");
    assert_eq!(f.capture.stats().heals.load(Ordering::Relaxed), 1);
    assert_eq!(restarts(&f), [1, 0, 0], "counted as `follow`");
    // Capture continues incrementally after the heal.
    conn.execute("INSERT INTO t(v) VALUES(x'02')", []).unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(heals(&ev), 0, "{ev:?}");
    assert_replica_matches(&f, &conn);
    // The uploader asks for a restart (staged items it cannot upload): counted as such.
    assert!(f.capture.restart_history(&f.rel, "a test"));
    assert_eq!(restarts(&f), [1, 0, 1], "counted as `upload`");
    assert_replica_matches(&f, &conn);
}

/// The history restarts counted so far, by [`RestartKind`] (follow, staging, upload).
fn restarts(f: &Fixture) -> [u64; 3] {
    let s = f.capture.stats();
    [
        crate::capture::RestartKind::Follow,
        crate::capture::RestartKind::Staging,
        crate::capture::RestartKind::Upload,
    ]
    .map(|k| s.restarts[k as usize].load(Ordering::Relaxed))
}

/// A writer that opens a new `-wal`, commits and checkpoints before capture reads the log
/// (the watcher was late, the close's checkpoint fsync is the first barrier): the file
/// already holds the log's pages, which are not barrier-less writes made before the log.
/// The commit is staged once, as one TXID.
#[test]
fn a_log_read_after_its_checkpoint_is_staged_once() {
    let f = fixture();
    let conn = open_db(&f.db, 4096, "NORMAL", 0);
    conn.execute("INSERT INTO t(v) VALUES(randomblob(100))", [])
        .unwrap();
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    drop(conn); // checkpoints and deletes the -wal
    f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
    let before = staged_count(&f);
    let conn = open_db(&f.db, 4096, "NORMAL", 0);
    insert_rows(&conn, 40, 500);
    checkpoint(&conn, "PASSIVE");
    let ev = f.capture.on(&f.rel, Barrier::DbSyncing).unwrap();
    assert_eq!(ev.len(), 1, "one commit, one batch: {ev:?}");
    assert!(
        matches!(ev[0], CaptureEvent::Staged { min_txid, max_txid, .. } if min_txid == max_txid),
        "{ev:?}"
    );
    assert_eq!(staged_count(&f), before + 1);
    assert_replica_matches(&f, &conn);
}

/// Reads between barriers hold their pages in memory and append page lists only; the
/// checkpoint's database fsync makes those lists durable; the seal writes each held page
/// once, however many batches changed it.
#[test]
fn held_pages_are_listed_between_barriers_and_written_once_at_the_seal() {
    let f = fixture();
    let conn = open_db(&f.db, 4096, "NORMAL", 0);
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    f.capture.seal(&f.rel).unwrap();
    let active = f
        .capture
        .staging()
        .db_dir(&f.rel)
        .unwrap()
        .join("segments/active");
    let unsynced = || {
        let slot = f.capture.slot(&f.rel, false).unwrap();
        let guard = slot.lock();
        guard.as_ref().unwrap().segment.has_unsynced()
    };
    conn.execute("INSERT INTO t(id, v) VALUES(1, randomblob(100))", [])
        .unwrap();
    // Twenty batches, each rewriting the same row: the same few pages every time.
    for i in 0..20 {
        conn.execute("UPDATE t SET v = randomblob(?1) WHERE id = 1", [100 + i])
            .unwrap();
        f.capture.on_wal_changed_for_test(&f.wal_rel);
    }
    let (records, _) = crate::staging::segment::read_segment(&active).unwrap();
    assert_eq!(records.len(), 20, "one page list per batch");
    assert!(records
        .iter()
        .all(|r| r.kind == crate::staging::RecordKind::PageList));
    let data_bytes = fs::metadata(&active).unwrap().len();
    assert!(data_bytes < 20 * 512, "page lists only: {data_bytes} bytes");
    assert!(unsynced(), "a read between barriers must not sync");
    // The checkpoint's database fsync, as the FUSE layer reports it.
    checkpoint(&conn, "PASSIVE");
    let ev = f.capture.on(&f.rel, Barrier::DbSyncing).unwrap();
    assert!(ev.is_empty(), "nothing left to read: {ev:?}");
    f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
    assert!(
        !unsynced(),
        "the checkpoint's barrier makes the page lists durable"
    );
    // The seal writes every held page once: the union of what the batches changed.
    f.capture.seal(&f.rel).unwrap();
    let pending = f.capture.staging().pending(&f.rel).unwrap();
    let Some(Staged::Batch(b)) = pending.last() else {
        panic!("{pending:?}");
    };
    assert_eq!(b.kind, crate::staging::RecordKind::Pages);
    assert_eq!(b.header.max_txid - b.header.min_txid, 20);
    assert!(b.header.page_count <= 3, "{:?}", b.header);
    assert_replica_matches(&f, &conn);
}

impl Capture {
    fn on_wal_changed_for_test(&self, rel: &Path) {
        let ev = self.on(rel, Barrier::WalChanged).unwrap();
        assert_eq!(heals(&ev), 0, "{ev:?}");
    }
}

/// A restart of walfs resumes from the saved state without a snapshot when the files still
/// match it, and heals when the database changed behind its back.
#[test]
fn resume_after_restart_of_the_capture() {
    let f = fixture();
    let conn = open_db(&f.db, 4096, "FULL", 0);
    for _ in 0..5 {
        conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
            .unwrap();
        f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    }
    let staged = staged_count(&f);
    // walfs stops; the app commits more (still in the same WAL generation).
    f.capture.forget(&f.rel);
    for _ in 0..3 {
        conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
            .unwrap();
    }
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(heals(&ev), 0, "{ev:?}");
    assert_eq!(
        staged_count(&f),
        staged + 1,
        "the three commits made while walfs was stopped are one batch: {ev:?}"
    );
    assert_replica_matches(&f, &conn);

    // Stopped again; now a checkpoint and restart hide the new commits from the WAL.
    f.capture.forget(&f.rel);
    for _ in 0..3 {
        conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
            .unwrap();
    }
    checkpoint(&conn, "TRUNCATE");
    conn.execute("INSERT INTO t(v) VALUES(x'01')", []).unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(heals(&ev), 1, "{ev:?}");
    assert_replica_matches(&f, &conn);

    // Idle restart: nothing staged.
    f.capture.forget(&f.rel);
    let n = staged_count(&f);
    let ev = f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
    assert!(ev.is_empty(), "{ev:?}");
    assert_eq!(staged_count(&f), n);
}

#[test]
fn clean_restart_resumes_from_saved_checksums_without_reading() {
    let f = fixture();
    let quick = || f.capture.stats().quick_resumes.load(Ordering::Relaxed);
    let conn = open_db(&f.db, 4096, "NORMAL", 0);
    for _ in 0..20 {
        conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
            .unwrap();
    }
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_replica_matches(&f, &conn);

    // A clean stop saves the checksums; the next start takes them, and capture goes on
    // from the saved WAL position (the WAL still holds every commit).
    f.capture.close_all();
    f.capture.forget(&f.rel);
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(heals(&ev), 0, "{ev:?}");
    assert_eq!(
        quick(),
        1,
        "the start read the database instead of using the saved sums"
    );
    for _ in 0..5 {
        conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
            .unwrap();
    }
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_replica_matches(&f, &conn);

    // The saved sums serve one start only: a stop without close (a crash) reads again.
    f.capture.forget(&f.rel);
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(quick(), 1);
    assert_replica_matches(&f, &conn);

    // A change while walfs is stopped (a checkpoint writes the database file, then more
    // commits) voids them: the start reads the files and finds the state by its checksum.
    f.capture.close_all();
    f.capture.forget(&f.rel);
    checkpoint(&conn, "PASSIVE");
    conn.execute("INSERT INTO t(v) VALUES(x'02')", []).unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(heals(&ev), 0, "{ev:?}");
    assert_eq!(
        quick(),
        1,
        "saved sums were used although the files changed"
    );
    assert_replica_matches(&f, &conn);
}

#[test]
fn registry_names_and_non_sqlite_files() {
    let f = fixture();
    assert_eq!(
        database_of(Path::new("a/x.db-wal")),
        Some((PathBuf::from("a/x.db"), true))
    );
    assert_eq!(
        database_of(Path::new("x.db")),
        Some((PathBuf::from("x.db"), false))
    );
    assert_eq!(database_of(Path::new("x.db-shm")), None);
    assert_eq!(database_of(Path::new("x.db-journal")), None);
    assert_eq!(
        rollback::database_of_journal(Path::new("a/x.db-journal")),
        Some(PathBuf::from("a/x.db"))
    );
    assert_eq!(rollback::database_of_journal(Path::new("-journal")), None);
    assert_eq!(rollback::database_of_journal(Path::new("x.db")), None);
    assert_eq!(database_of(Path::new("-wal")), None);

    let root = f.db.parent().unwrap().parent().unwrap().to_path_buf();
    fs::write(
        root.join("notes.db"),
        b"just some text, not a database at all",
    )
    .unwrap();
    fs::write(root.join("notes.db-wal"), b"nor is this").unwrap();
    assert!(f
        .capture
        .on(Path::new("notes.db"), Barrier::DbSynced)
        .unwrap()
        .is_empty());
    assert!(f
        .capture
        .on(Path::new("notes.db-wal"), Barrier::WalDurable)
        .unwrap()
        .is_empty());
    assert!(f
        .capture
        .on(Path::new("missing.db"), Barrier::DbSynced)
        .unwrap()
        .is_empty());
    assert!(f.capture.databases().is_empty());
    assert!(f
        .capture
        .staging()
        .pending(Path::new("notes.db"))
        .unwrap()
        .is_empty());

    // A rollback-journal database is registered and snapshotted; nothing is unsupported.
    let conn = Connection::open(root.join("r.db")).unwrap();
    conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES(1);")
        .unwrap();
    let ev = f.capture.on(Path::new("r.db"), Barrier::DbSynced).unwrap();
    assert!(
        matches!(ev[..], [CaptureEvent::Staged { min_txid: 1, .. }]),
        "{ev:?}"
    );
    assert_eq!(f.capture.databases(), vec![PathBuf::from("r.db")]);
}

/// A crash of the daemon keeps the batches it appended (the page cache survives it), and
/// the capture resumes after the newest one. A power loss can lose the batches appended
/// since the last durable point: at the next start they are read again from the WAL, with
/// the same TXIDs, and nothing is missing.
#[test]
fn crash_and_power_loss_resume_without_gaps() {
    let f = fixture();
    let conn = open_db(&f.db, 4096, "FULL", 0);
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    let durable = f.capture.staging().state(&f.rel).unwrap().unwrap().txid;
    let commit = || {
        conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
            .unwrap();
    };
    for _ in 0..4 {
        commit();
        f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    }
    // The WAL fsyncs wrote no state (they are not durable points).
    assert_eq!(
        f.capture.staging().state(&f.rel).unwrap().unwrap().txid,
        durable
    );
    // Power loss: the unsynced batches (all but the snapshot's) never reached the disk.
    f.capture.dbs.lock().remove(&f.rel);
    let active = f
        .capture
        .staging()
        .db_dir(&f.rel)
        .unwrap()
        .join("segments/active");
    let (records, _) = crate::staging::segment::read_segment(&active).unwrap();
    let cut = records
        .iter()
        .find(|b| b.header.min_txid > durable)
        .unwrap()
        .offset;
    fs::OpenOptions::new()
        .write(true)
        .open(&active)
        .unwrap()
        .set_len(cut)
        .unwrap();
    commit();
    barrier_stages(&f, &[(durable + 1, durable + 5)]);

    // The daemon dies: its in-memory capture is gone, unsealed, with the pages it held.
    // The next start reads them back from the files (their page lists are in the
    // segment), then resumes after the newest batch.
    f.capture.dbs.lock().remove(&f.rel);
    commit();
    barrier_stages(
        &f,
        &[(durable + 1, durable + 5), (durable + 6, durable + 6)],
    );
    assert_replica_matches(&f, &conn);
}

/// A crash loses the pages the capture held in memory. Their page lists were made durable
/// by the checkpoint's barrier, after which the WAL restarted: the next start finds them in
/// the database file (checked against the content checksum the last list recorded) and
/// holds them again, with their TXIDs, and nothing heals.
#[test]
fn held_pages_are_read_back_from_the_database_after_a_crash() {
    let f = fixture();
    let conn = open_db(&f.db, 4096, "NORMAL", 0);
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    let durable = f.capture.staging().state(&f.rel).unwrap().unwrap().txid;
    for _ in 0..6 {
        conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
            .unwrap();
        f.capture.on_wal_changed_for_test(&f.wal_rel);
    }
    // The checkpoint, with the barriers the FUSE layer reports; the WAL then restarts.
    checkpoint(&conn, "RESTART");
    f.capture.on(&f.rel, Barrier::DbSyncing).unwrap();
    f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
    // The daemon dies (nothing sealed); the application commits on (a new WAL
    // generation), and the next start reads the database.
    f.capture.dbs.lock().remove(&f.rel);
    conn.execute("INSERT INTO t(v) VALUES(randomblob(500))", [])
        .unwrap();
    barrier_stages(
        &f,
        &[(durable + 1, durable + 6), (durable + 7, durable + 7)],
    );
    assert_replica_matches(&f, &conn);
}

/// Held pages that cannot be read back (the database moved past the state their page
/// lists recorded while walfs was down) are healed with a snapshot, and their page lists
/// are cut from the segment.
#[test]
fn held_pages_that_cannot_be_read_back_heal() {
    let f = fixture();
    let conn = open_db(&f.db, 4096, "NORMAL", 0);
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    for _ in 0..4 {
        conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
            .unwrap();
        f.capture.on_wal_changed_for_test(&f.wal_rel);
    }
    f.capture.dbs.lock().remove(&f.rel);
    // Without walfs: more commits, checkpointed into the database, and the WAL restarted.
    for _ in 0..3 {
        conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
            .unwrap();
    }
    checkpoint(&conn, "TRUNCATE");
    conn.execute("INSERT INTO t(v) VALUES(x'01')", []).unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(heals(&ev), 1, "{ev:?}");
    let active = f
        .capture
        .staging()
        .db_dir(&f.rel)
        .unwrap()
        .join("segments/active");
    let (records, _) = crate::staging::segment::read_segment(&active).unwrap();
    assert!(records.is_empty(), "{records:?}");
    assert_replica_matches(&f, &conn);
}

/// After a crash, the capture resumes from its newest staged batch, which may be ahead of
/// the state file. Sealing must then write the state, or the next start would resume from
/// the older state and reuse TXIDs the replica already holds (seen as a replica that
/// restored to a different database after kill -9, remount and remount).
#[test]
fn state_adopted_from_batches_is_saved_at_the_next_seal() {
    let f = fixture();
    let conn = open_db(&f.db, 4096, "FULL", 0);
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    let durable = f.capture.staging().state(&f.rel).unwrap().unwrap().txid;
    for _ in 0..3 {
        conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
            .unwrap();
        f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    }
    // Crash, restart with nothing new to read (the held pages are read back), seal and
    // upload.
    f.capture.dbs.lock().remove(&f.rel);
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(staged_txids(&ev), [Some((durable + 1, durable + 3))]);
    f.capture.seal(&f.rel).unwrap();
    let st = f.capture.staging().state(&f.rel).unwrap().unwrap();
    assert_eq!(st.txid, durable + 3, "the sealed state is on disk");
    f.capture.staging().mark_uploaded(&f.rel, st.txid).unwrap();
    // Another restart continues after it, with new TXIDs.
    f.capture.dbs.lock().remove(&f.rel);
    conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
        .unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert!(
        matches!(ev[..], [CaptureEvent::Staged { min_txid, .. }] if min_txid == durable + 4),
        "{ev:?}"
    );
}

// ---- rollback-journal and journal-less capture (rollback.rs) ------------------------------

/// A rollback-mode database in `mode` with a table.
fn open_rollback(path: &Path, mode: &str) -> Connection {
    let conn = Connection::open(path).unwrap();
    let got: String = conn
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .unwrap();
    assert_eq!(got, mode.to_lowercase());
    conn.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB);")
        .unwrap();
    conn
}

/// Inserts `rows` rows of `size` random bytes into table `t`, in one transaction.
fn insert_rows(conn: &Connection, rows: u32, size: u32) {
    conn.execute_batch(&format!(
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<{rows})
         INSERT INTO t(v) SELECT randomblob({size}) FROM c;"
    ))
    .unwrap();
}

/// Compares the staged history with the live database file (no WAL in these modes).
fn assert_rollback_replica_matches(f: &Fixture) {
    let live = fs::read(&f.db).unwrap();
    let image = rebuild(f);
    assert_eq!(image.len(), live.len(), "database size");
    assert!(image == live, "the staged history differs from the file");
}

/// The barriers of one rollback transaction, as the FUSE layer calls them: the database
/// fsync while the writer holds its lock (the journal lists every page it changed), then
/// the invalidation. `body` runs inside BEGIN..COMMIT.
fn journal_txn(f: &Fixture, conn: &Connection, body: &str, barrier: rollback::JournalBarrier) {
    conn.execute_batch(&format!("BEGIN IMMEDIATE; {body}"))
        .unwrap();
    f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
    conn.execute_batch("COMMIT").unwrap();
    f.capture.on(&f.rel, Barrier::Journal(barrier)).unwrap();
}

#[test]
fn rollback_journal_commits_are_staged_at_the_invalidation() {
    for (mode, barrier) in [
        ("DELETE", rollback::JournalBarrier::Unlinking),
        ("TRUNCATE", rollback::JournalBarrier::Truncated),
        ("PERSIST", rollback::JournalBarrier::Synced),
    ] {
        let f = fixture();
        let conn = open_rollback(&f.db, mode);
        conn.execute("INSERT INTO t(v) VALUES(randomblob(100))", [])
            .unwrap();
        let ev = f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
        assert!(!ev.is_empty(), "{mode}: registered with a snapshot");
        let before = staged_count(&f);
        for i in 0..12 {
            let body = match i % 4 {
                0 => "INSERT INTO t(v) VALUES(randomblob(3000));".to_string(),
                1 => "UPDATE t SET v = randomblob(length(v)) WHERE id % 2 = 0;".to_string(),
                // A spill: more pages than the cache holds.
                2 => "PRAGMA cache_size=5; WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL \
                      SELECT n+1 FROM c WHERE n<200) INSERT INTO t(v) SELECT randomblob(700) \
                      FROM c;"
                    .to_string(),
                _ => "DELETE FROM t WHERE id % 3 = 0;".to_string(),
            };
            journal_txn(&f, &conn, &body, barrier);
        }
        // VACUUM shrinks the file through the journal too.
        conn.execute_batch("VACUUM").unwrap();
        f.capture.on(&f.rel, Barrier::Journal(barrier)).unwrap();
        assert_eq!(
            staged_count(&f),
            before + 12 + 1,
            "{mode}: one TXID per commit"
        );
        assert_rollback_replica_matches(&f);
        assert_eq!(f.capture.stats().heals.load(Ordering::Relaxed), 0, "{mode}");
    }
}

/// A database in journal `mode` with `synchronous=OFF`, 50 rows in `t` and an empty
/// table `u`, for the kept-journal tests.
fn kept_journal_db(f: &Fixture, mode: &str) -> Connection {
    let conn = open_rollback(&f.db, mode);
    conn.execute_batch(
        "PRAGMA synchronous=OFF; CREATE TABLE u(id INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<50)
         INSERT INTO t(v) SELECT randomblob(700) FROM c;",
    )
    .unwrap();
    conn
}

/// A transaction that spills (its journal live while the file holds its pages) and
/// commits; then, as at a switch to DELETE or WAL mode, the journal's unlink finds it
/// still live beside the committed file. The replica must equal the file.
fn commit_through_a_kept_journal_unlinked_live(f: &Fixture, conn: &Connection) {
    conn.execute_batch(
        "PRAGMA cache_size=2; BEGIN; UPDATE t SET v = randomblob(700) WHERE id = 7;",
    )
    .unwrap();
    conn.execute_batch("UPDATE t SET v = randomblob(700) WHERE id = 40;")
        .unwrap();
    let journal = rollback::journal_path(&f.db);
    let live = fs::read(&journal).unwrap();
    conn.execute_batch("COMMIT").unwrap();
    fs::write(&journal, &live).unwrap();
    f.capture
        .on(
            &f.rel,
            Barrier::Journal(rollback::JournalBarrier::Unlinking),
        )
        .unwrap();
    fs::remove_file(&journal).unwrap();
    assert_rollback_replica_matches(f);
}

/// `synchronous=OFF` in PERSIST mode: commits are plain writes (the kept journal is
/// neither created nor synced), and a switch to DELETE or WAL mode commits the next
/// transaction by unlinking that journal, which lists only its own pages. The commits
/// before it must not be lost.
#[test]
fn a_kept_journal_unlinked_without_a_seen_begin_compares_the_whole_file() {
    let f = fixture();
    let conn = kept_journal_db(&f, "PERSIST");
    f.capture
        .on(&f.rel, Barrier::Journal(rollback::JournalBarrier::Synced))
        .unwrap();
    assert_rollback_replica_matches(&f);
    // A commit with no barrier at all: pages of table u only.
    conn.execute("INSERT INTO u(v) VALUES(randomblob(3000))", [])
        .unwrap();
    commit_through_a_kept_journal_unlinked_live(&f, &conn);
}

/// The same with the kept journal created by a transaction walfs saw begin: that
/// transaction commits without a barrier (PERSIST zeroes the header, no fsync) and closes
/// the journal; the next one reuses it unseen. The close says the begin seen is spent.
#[test]
fn a_kept_journal_closed_after_a_silent_commit_spends_the_seen_begin() {
    let f = fixture();
    let conn = kept_journal_db(&f, "DELETE");
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    assert_rollback_replica_matches(&f);
    let got: String = conn
        .query_row("PRAGMA journal_mode=PERSIST", [], |r| r.get(0))
        .unwrap();
    assert_eq!(got, "persist");
    // The first PERSIST transaction creates the journal (seen), commits silently and
    // closes it.
    f.capture.on(&f.rel, Barrier::JournalCreated).unwrap();
    conn.execute("INSERT INTO u(v) VALUES(randomblob(3000))", [])
        .unwrap();
    f.capture.on(&f.rel, Barrier::JournalClosed).unwrap();
    // The next one reuses the journal.
    commit_through_a_kept_journal_unlinked_live(&f, &conn);
}

/// A killed writer leaves a hot journal; then a `cp` of another database over the file
/// (same page size). What SQLite reads is the copy with the journal rolled back onto it,
/// and the replica must hold that, without waiting for a connection to roll it back.
#[test]
fn a_file_copied_over_beside_a_hot_journal_is_staged_as_sqlite_reads_it() {
    let f = fixture();
    let conn = open_rollback(&f.db, "DELETE");
    insert_rows(&conn, 60, 500);
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    assert_rollback_replica_matches(&f);
    // The killed writer: its transaction's file and journal, as it left them. With
    // `synchronous=OFF` the journal's header is final from the start (with FULL, whether
    // it was synced yet, and so hot, varied between runs of the whole suite).
    conn.execute_batch(
        "PRAGMA synchronous=OFF; PRAGMA cache_size=2; BEGIN;
         UPDATE t SET v = randomblob(500) WHERE id % 4 = 1;",
    )
    .unwrap();
    let journal = rollback::journal_path(&f.db);
    let (hot_db, hot_journal) = (fs::read(&f.db).unwrap(), fs::read(&journal).unwrap());
    drop(conn);
    fs::write(&f.db, &hot_db).unwrap();
    fs::write(&journal, &hot_journal).unwrap();
    // Another database of the same page size, copied over the file.
    let other = f.db.with_file_name("other.db");
    let c = open_rollback(&other, "DELETE");
    insert_rows(&c, 90, 450);
    drop(c);
    fs::copy(&other, &f.db).unwrap();
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    let view = sqlite_view(&f);
    assert!(
        view != fs::read(&f.db).unwrap(),
        "the journal changes what SQLite reads"
    );
    let r = rebuild(&f);
    assert!(r == view, "the replica differs from what SQLite reads");
    assert_eq!(f.capture.stats().heals.load(Ordering::Relaxed), 0);
}

/// A connection in MEMORY mode, opened before an empty `-wal` appeared (another
/// connection's switch to WAL mode that wrote nothing yet), commits by writing the
/// database file and syncing it: with no commit in the `-wal`, the file is what SQLite
/// reads, and the commit must be staged at that fsync.
#[test]
fn a_commit_written_to_the_file_beside_an_empty_wal_is_staged() {
    let f = fixture();
    let conn = open_rollback(&f.db, "MEMORY");
    conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
        .unwrap();
    f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
    assert_rollback_replica_matches(&f);
    fs::write(f.db.with_file_name("app.db-wal"), b"").unwrap();
    conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
        .unwrap();
    assert_eq!(
        fs::metadata(f.db.with_file_name("app.db-wal"))
            .unwrap()
            .len(),
        0,
        "the commit went to the database file"
    );
    f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
    assert!(rebuild(&f) == sqlite_view(&f), "the commit was not staged");
    assert_eq!(f.capture.stats().heals.load(Ordering::Relaxed), 0);
}

/// A file longer than its database (pages a writer killed in MEMORY or OFF mode spilled
/// past the end, which SQLite ignores), first seen while a transaction is live: the
/// journal's original size counts the file's pages, the header says the database's size,
/// and SQLite reads the header's.
#[test]
fn a_snapshot_beside_a_live_journal_has_the_headers_size() {
    let f = fixture();
    let conn = open_rollback(&f.db, "DELETE");
    insert_rows(&conn, 60, 500);
    let committed = fs::read(&f.db).unwrap();
    let mut longer = committed.clone();
    longer.extend(std::iter::repeat_n(0x5a, 5 * 4096));
    fs::write(&f.db, &longer).unwrap();
    // synchronous=OFF: SQLite writes the journal's header (its magic) at once, not only
    // when it syncs the journal before spilling a page, which cache pressure decides (and
    // the page cache's pressure depends on other connections in the process, such as
    // other tests').
    conn.execute_batch(
        "PRAGMA synchronous=OFF; PRAGMA cache_size=2; BEGIN;
         UPDATE t SET v = randomblob(500) WHERE id % 4 = 1;",
    )
    .unwrap();
    let o = rollback::Originals::open(&rollback::journal_path(&f.db))
        .unwrap()
        .expect("a live journal");
    assert_eq!(o.initial_db_pages() as usize, longer.len() / 4096);
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    assert!(
        rebuild(&f) == committed,
        "the snapshot is not the committed database"
    );
}

/// Capture has read a `-wal` header (a log that then went), a connection in MEMORY mode
/// with `synchronous=OFF` commits into the file (no barrier), and an empty `-wal` appears
/// (another connection's switch to WAL mode; its checkpoint truncates it, a barrier). The
/// `-wal` holds no commit, so that barrier does not show that the file holds only
/// checkpointed frames: the close after it must still compare the file.
#[test]
fn a_barrier_on_an_empty_wal_does_not_take_the_file_for_captured() {
    let f = fixture();
    let wal_mode = open_db(&f.db, 4096, "FULL", 0);
    wal_mode
        .execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
        .unwrap();
    f.capture.on(&f.wal_rel, Barrier::WalDurable).unwrap();
    let got: String = wal_mode
        .query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))
        .unwrap();
    assert_eq!(got, "delete");
    drop(wal_mode);
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    assert_rollback_replica_matches(&f);
    // A `-wal` with a valid header and no commit comes and goes (a program wrote one):
    // capture has read its header.
    let wal = f.db.with_file_name("app.db-wal");
    let header = crate::sqlite::WalHeader::new(false, 4096, 0, 7, 9).encode();
    fs::write(&wal, [&header[..], &[0xab; 4096 + 24]].concat()).unwrap();
    f.capture.on(&f.wal_rel, Barrier::WalDurable).unwrap();
    fs::remove_file(&wal).unwrap();
    let memory = open_rollback(&f.db, "MEMORY");
    memory.execute_batch("PRAGMA synchronous=OFF").unwrap();
    insert_rows(&memory, 20, 700);
    fs::write(&wal, b"").unwrap();
    f.capture.on(&f.wal_rel, Barrier::WalDurable).unwrap();
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    assert!(
        rebuild(&f) == sqlite_view(&f),
        "the commits were not staged"
    );
}

/// A snapshot seals the batches staged before it, so that an upload that lists the snapshot
/// lists them too, and no segment holds batches from both sides of a snapshot (the page
/// size may differ across it). Fuzz seed 0xbeef5, sequence 533: the uploader listed a
/// snapshot while the batch before it was still in the active segment, uploaded the
/// snapshot, and later found that batch sealed with one of the new page size.
#[test]
fn a_snapshot_seals_the_batches_staged_before_it() {
    let f = fixture();
    let conn = open_rollback(&f.db, "DELETE");
    insert_rows(&conn, 10, 500);
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    assert!(staged_count(&f) > 0);
    // A batch in the active segment, then a snapshot (the page size changes).
    insert_rows(&conn, 5, 500);
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    conn.execute_batch("PRAGMA page_size=8192; VACUUM;")
        .unwrap();
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    // Listed as an uploader lists them, without sealing first.
    let pending = f.capture.staging().pending(&f.rel).unwrap();
    let snapshot = pending
        .iter()
        .rposition(|s| matches!(s, Staged::Snapshot(_)))
        .expect("the page size change staged a snapshot");
    let before = pending[snapshot].max_txid() - 1;
    assert!(
        pending[..snapshot].iter().any(|s| s.max_txid() == before),
        "the batch before the snapshot (TXID {before}) is not sealed: {pending:?}"
    );
    insert_rows(&conn, 5, 500);
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    assert_rollback_replica_matches(&f);
}

#[test]
fn open_transaction_and_rollback_stage_nothing_uncommitted() {
    let f = fixture();
    let conn = open_rollback(&f.db, "DELETE");
    insert_rows(&conn, 100, 500);
    let committed = fs::read(&f.db).unwrap();
    // A transaction that spills into the database file and is still open: the file holds
    // uncommitted pages and the journal their originals.
    conn.execute_batch(
        "PRAGMA cache_size=5; BEGIN; UPDATE t SET v = randomblob(900);
         WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<100)
         INSERT INTO t(v) SELECT randomblob(900) FROM c;",
    )
    .unwrap();
    assert_ne!(
        fs::read(&f.db).unwrap(),
        committed,
        "the spill reached the file"
    );
    // Registered now (a database fsync): the snapshot holds the committed content only.
    f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
    assert_eq!(rebuild(&f), committed);
    // A close of some handle meanwhile stages nothing either.
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    assert_eq!(rebuild(&f), committed);
    let n = staged_count(&f);
    conn.execute_batch("ROLLBACK").unwrap();
    // The rollback ends like a commit (the journal goes): nothing changed, nothing staged.
    f.capture
        .on(
            &f.rel,
            Barrier::Journal(rollback::JournalBarrier::Unlinking),
        )
        .unwrap();
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    assert_eq!(staged_count(&f), n);
    assert_rollback_replica_matches(&f);
}

#[test]
fn memory_and_off_modes_are_staged_at_fsync_or_close() {
    for mode in ["MEMORY", "OFF"] {
        let f = fixture();
        let conn = open_rollback(&f.db, mode);
        f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
        for i in 0..10 {
            conn.execute("INSERT INTO t(v) VALUES(randomblob(?1))", [200 + i * 300])
                .unwrap();
            // Alternately the commit's fsync and a close.
            if i % 2 == 0 {
                f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
            } else {
                f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
            }
            assert_rollback_replica_matches(&f);
        }
        // Nothing changed: the stat filter stages nothing and reads nothing.
        let n = staged_count(&f);
        assert!(f.capture.on(&f.rel, Barrier::DbClosed).unwrap().is_empty());
        assert_eq!(staged_count(&f), n, "{mode}");
    }
}

#[test]
fn a_file_that_stops_being_sqlite_is_marked_deleted() {
    let f = fixture();
    let conn = open_rollback(&f.db, "DELETE");
    conn.execute("INSERT INTO t(v) VALUES(1)", []).unwrap();
    drop(conn);
    f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
    let txid = f.capture.staging().state(&f.rel).unwrap().unwrap().txid;
    fs::write(&f.db, b"plain text now").unwrap();
    let ev = f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    assert_eq!(ev, vec![CaptureEvent::Gone { txid }]);
    assert!(!f.capture.is_captured(&f.rel));
    let marker = f.capture.staging().deleted_marker(&f.rel).unwrap().unwrap();
    assert!(
        marker.starts_with(&format!("txid={txid:016x} deleted_at=")),
        "{marker}"
    );
    // It becomes SQLite again: the history continues and the marker goes.
    fs::remove_file(&f.db).unwrap();
    let conn = open_rollback(&f.db, "DELETE");
    conn.execute("INSERT INTO t(v) VALUES(2)", []).unwrap();
    f.capture.on(&f.rel, Barrier::DbClosed).unwrap();
    assert!(f
        .capture
        .staging()
        .deleted_marker(&f.rel)
        .unwrap()
        .is_none());
    assert_rollback_replica_matches(&f);
    assert!(f.capture.staging().state(&f.rel).unwrap().unwrap().txid > txid);
}

#[test]
fn reused_freelist_leaves_are_staged_although_not_journaled() {
    let f = fixture();
    let conn = open_rollback(&f.db, "DELETE");
    insert_rows(&conn, 400, 3000);
    f.capture.on(&f.rel, Barrier::DbSynced).unwrap();
    let barrier = rollback::JournalBarrier::Unlinking;
    // Frees hundreds of pages: most become freelist leaves.
    journal_txn(&f, &conn, "DELETE FROM t WHERE id % 4 != 0;", barrier);
    let free: i64 = conn
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .unwrap();
    assert!(free > 100, "{free}");
    // New rows reuse them; SQLite journals none of the reused leaves.
    for _ in 0..5 {
        journal_txn(
            &f,
            &conn,
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n<30)
             INSERT INTO t(v) SELECT randomblob(3000) FROM c;",
            barrier,
        );
        assert_rollback_replica_matches(&f);
    }
}

/// What SQLite reads from the fixture's database: its files copied aside, opened (a hot
/// journal is rolled back, the WAL recovered) and checkpointed into one file.
fn sqlite_view(f: &Fixture) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("view.db");
    fs::copy(&f.db, &copy).unwrap();
    for suffix in ["-wal", "-journal"] {
        let mut side = f.db.as_os_str().to_owned();
        side.push(suffix);
        if Path::new(&side).exists() {
            fs::copy(&side, dir.path().join(format!("view.db{suffix}"))).unwrap();
        }
    }
    let c = Connection::open(&copy).unwrap();
    // The first read rolls a hot journal back (or recovers the WAL) before it reads page
    // 1, so it counts even if the content it reads is malformed.
    let read = c.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    });
    if read.is_ok() {
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    drop(c);
    fs::read(&copy).unwrap()
}

/// The `-wal` of a `page_size` database whose first transaction created table `other`, as
/// another program would leave it. With `without_page1`, the log holds only a later
/// transaction that changed page 2 (SQLite does not rewrite page 1 in WAL mode unless the
/// schema or the size changes).
fn foreign_wal(page_size: u32, without_page1: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("other.db");
    let c = Connection::open(&p).unwrap();
    c.execute_batch(&format!(
        "PRAGMA page_size={page_size}; PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
         CREATE TABLE other(x); INSERT INTO other VALUES ('first');"
    ))
    .unwrap();
    if without_page1 {
        checkpoint(&c, "TRUNCATE");
        c.execute("UPDATE other SET x = 'second'", []).unwrap();
    }
    let wal = fs::read(dir.path().join("other.db-wal")).unwrap();
    drop(c);
    wal
}

fn waits(events: &[CaptureEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, CaptureEvent::Waiting { .. }))
        .count()
}

/// A `-wal` of another page size that holds page 1 is what SQLite reads (page 1, and so the
/// page size, come from the log): capture cannot follow it incrementally, so it restarts
/// the history with a snapshot at once, and the staged history rebuilds to SQLite's view.
#[test]
fn a_wal_of_another_page_size_restarts_the_history_at_once() {
    let f = fixture();
    let conn = open_db(&f.db, 1024, "FULL", 0);
    conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
        .unwrap();
    f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    drop(conn);
    f.capture.on(&f.wal_rel, Barrier::WalDurable).unwrap();
    fs::write(f.db.with_file_name("app.db-wal"), foreign_wal(512, false)).unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!((heals(&ev), waits(&ev)), (1, 0), "{ev:?}");
    assert!(
        matches!(&ev.last(), Some(CaptureEvent::Healed { reason, waited: false, .. }) if reason.contains("page size")),
        "{ev:?}"
    );
    assert_eq!(rebuild(&f), sqlite_view(&f));
    // SQLite itself carries on from there: the next commits follow incrementally.
    let conn = Connection::open(&f.db).unwrap();
    conn.execute("INSERT INTO other VALUES ('through SQLite')", [])
        .unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!((heals(&ev), waits(&ev), ev.len()), (0, 0, 1), "{ev:?}");
    assert_eq!(rebuild(&f), sqlite_view(&f));
}

/// A `-wal` of another page size without page 1 is not something SQLite can read
/// consistently (its checkpoint reports corruption): capture waits, staging nothing and
/// failing nothing, reports it once, and restarts the history once the log is gone.
#[test]
fn a_wal_that_no_reader_can_follow_waits_for_a_consistent_point() {
    let f = fixture();
    let conn = open_db(&f.db, 1024, "FULL", 0);
    conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
        .unwrap();
    drop(conn);
    f.capture.on(&f.wal_rel, Barrier::WalDurable).unwrap();
    let before = rebuild(&f);
    let wal = f.db.with_file_name("app.db-wal");
    fs::write(&wal, foreign_wal(512, true)).unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!((heals(&ev), waits(&ev)), (0, 1), "{ev:?}");
    // Later steps stay quiet while nothing changes, and stage nothing.
    std::thread::sleep(Duration::from_millis(600));
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert!(ev.is_empty(), "{ev:?}");
    assert_eq!(rebuild(&f), before);
    assert_eq!(f.capture.restarting.lock().len(), 1);
    // The log goes (a user removes it): the next try restarts the history, without a
    // barrier on the database.
    fs::remove_file(&wal).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    f.capture.retry_restarts();
    assert!(f.capture.restarting.lock().is_empty());
    assert_eq!(rebuild(&f), sqlite_view(&f));
}

/// An empty database file beside a `-wal` (the next opener deletes that log) and a zeroed
/// database file beside a hot journal (the next opener rolls it back) are states capture
/// waits through or reads as SQLite would, and the history ends equal to SQLite's view.
#[test]
fn a_database_file_that_is_not_a_database_for_a_moment_fails_nothing() {
    let f = fixture();
    let conn = open_db(&f.db, 4096, "FULL", 0);
    conn.execute("INSERT INTO t(v) VALUES(randomblob(5000))", [])
        .unwrap();
    drop(conn);
    f.capture.on(&f.wal_rel, Barrier::WalDurable).unwrap();
    // Emptied, with a foreign log beside it.
    fs::OpenOptions::new()
        .write(true)
        .open(&f.db)
        .unwrap()
        .set_len(0)
        .unwrap();
    fs::write(f.db.with_file_name("app.db-wal"), foreign_wal(4096, false)).unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(heals(&ev), 0, "{ev:?}");
    // SQLite's next opener deletes the log and writes a new database.
    let conn = Connection::open(&f.db).unwrap();
    conn.execute_batch("CREATE TABLE n(x); INSERT INTO n VALUES (1);")
        .unwrap();
    drop(conn);
    std::thread::sleep(Duration::from_millis(600));
    f.capture.on(&f.rel, Barrier::DbResized).unwrap();
    f.capture.retry_restarts();
    assert!(f.capture.restarting.lock().is_empty());
    assert_eq!(rebuild(&f), sqlite_view(&f));
}

/// A `-wal` whose commits were never checkpointed, cut by another program (rewritten with
/// a fresh header and no frames): SQLite now reads the database file alone, so the
/// history restarts from it, although every commit of the old log had been read.
#[test]
fn a_log_cut_before_its_checkpoint_restarts_from_the_database_file() {
    let f = fixture();
    let conn = open_db(&f.db, 4096, "FULL", 0);
    conn.execute("INSERT INTO t(v) VALUES(randomblob(3000))", [])
        .unwrap();
    drop(conn);
    f.capture.on(&f.wal_rel, Barrier::WalDurable).unwrap();
    let conn = open_db(&f.db, 4096, "FULL", 0);
    conn.execute("INSERT INTO t(v) VALUES(randomblob(9000))", [])
        .unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(heals(&ev), 0, "{ev:?}");
    drop(conn);
    let wal = f.db.with_file_name("app.db-wal");
    assert!(
        fs::metadata(&wal).is_err(),
        "the last close removed the log"
    );
    let conn = open_db(&f.db, 4096, "FULL", 0);
    conn.execute("INSERT INTO t(v) VALUES(randomblob(5000))", [])
        .unwrap();
    conn.execute("UPDATE t SET v = randomblob(100) WHERE id = 1", [])
        .unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert_eq!(heals(&ev), 0, "{ev:?}");
    assert_eq!(rebuild(&f), sqlite_view(&f));
    // Another program truncates the log and writes the header of a log of its own.
    let header = foreign_wal(4096, false)[..32].to_vec();
    fs::write(&wal, header).unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalCatchUp).unwrap();
    assert!(
        matches!(&ev.last(), Some(CaptureEvent::Healed { reason, .. }) if reason.contains("does not hold")),
        "{ev:?}"
    );
    drop(conn);
    assert_eq!(rebuild(&f), sqlite_view(&f));
}

/// Committed frames rewritten behind the read position, with the file's length unchanged
/// and no close of the `-wal` (a connection that holds a database file since replaced,
/// in `locking_mode=EXCLUSIVE`, writes over the log: fuzz seed 0x7a11e7, sequence 202):
/// once the log has been still for a moment, the next poll that finds nothing new reads
/// it again, and the history restarts from what SQLite reads.
#[test]
fn frames_rewritten_behind_the_read_position_heal_without_a_close() {
    use std::os::unix::fs::FileExt;
    let f = fixture();
    let conn = open_db(&f.db, 4096, "NORMAL", 0);
    for _ in 0..4 {
        conn.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
            .unwrap();
    }
    let ev = f.capture.on(&f.wal_rel, Barrier::WalChanged).unwrap();
    assert!(!staged_txids(&ev).is_empty(), "{ev:?}");
    // The page of the log's second frame changes: its checksum no longer validates, so
    // SQLite's readers stop before it.
    let wal = fs::OpenOptions::new()
        .write(true)
        .open(f.db.with_file_name("app.db-wal"))
        .unwrap();
    let offset = 32 + (24 + 4096) + 24 + 100;
    wal.write_all_at(&[0x5a], offset).unwrap();
    std::thread::sleep(Duration::from_millis(40));
    let ev = f.capture.on(&f.wal_rel, Barrier::WalChanged).unwrap();
    assert_eq!(heals(&ev), 1, "{ev:?}");
    // Still and checked: the next poll reads nothing again.
    let ev = f.capture.on(&f.wal_rel, Barrier::WalChanged).unwrap();
    assert!(ev.is_empty(), "{ev:?}");
}

/// A commit whose frames all reached the `-wal` but which SQLite then reported as failed
/// (on a full disk the `-shm` cannot grow for its wal-index entries: SQLITE_IOERR_SHMSIZE,
/// after the commit frame is written) is read, since its frames validate. SQLite's next
/// writer starts again where the wal-index ends, and writes a longer transaction over it:
/// the log's chain now passes over the failed commit's end with other frames. Capture must
/// see that what it read is gone (though the log now validates past that end), and restart
/// from what SQLite reads.
#[test]
fn a_failed_commit_overwritten_by_a_longer_one_heals() {
    use std::os::unix::fs::FileExt;
    let f = fixture();
    let conn = open_db(&f.db, 4096, "NORMAL", 0);
    conn.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
        .unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalChanged).unwrap();
    assert_eq!(staged_txids(&ev), vec![Some((1, 1))], "{ev:?}");
    // The files as the failed commit finds them, set aside.
    let side = tempfile::tempdir().unwrap();
    let side_db = side.path().join("app.db");
    fs::copy(&f.db, &side_db).unwrap();
    let wal_path = f.db.with_file_name("app.db-wal");
    fs::copy(&wal_path, side.path().join("app.db-wal")).unwrap();
    // The commit that fails (here: succeeds, and is read).
    conn.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
        .unwrap();
    let ev = f.capture.on(&f.wal_rel, Barrier::WalChanged).unwrap();
    assert_eq!(staged_txids(&ev), vec![Some((2, 2))], "{ev:?}");
    // The next writer, from the wal-index's end (before the failed commit): a longer
    // transaction, written over the failed one in place.
    let other = open_db(&side_db, 4096, "NORMAL", 0);
    other
        .execute("INSERT INTO t(v) VALUES (randomblob(20000))", [])
        .unwrap();
    let rewritten = fs::read(side.path().join("app.db-wal")).unwrap();
    let wal = fs::OpenOptions::new().write(true).open(&wal_path).unwrap();
    wal.write_all_at(&rewritten, 0).unwrap();
    drop(wal);
    std::thread::sleep(Duration::from_millis(40));
    let mut healed = 0;
    for _ in 0..3 {
        let ev = f.capture.on(&f.wal_rel, Barrier::WalChanged).unwrap();
        healed += heals(&ev);
        std::thread::sleep(Duration::from_millis(40));
    }
    assert_eq!(healed, 1);
    assert_eq!(rebuild(&f), sqlite_view(&f));
    drop((conn, other));
}

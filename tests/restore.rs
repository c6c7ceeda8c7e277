//! `walfs restore` and `walfs list` against file replicas built by hand: a real SQLite
//! database is changed step by step, each step's changed pages become one LTX object (the
//! first a level-9 snapshot), and each step's checksum a verification record. Restores must
//! reproduce every step byte for byte, and refuse corrupt, incomplete or mismatching
//! replicas without leaving anything at the output path.
//!
//! The interop test runs the real `litestream replicate` (from `$LITESTREAM`, else
//! `$HOME/.cache/walfs/venv/bin/litestream`, which scripts/test installs; without it the test
//! fails, never skips) and restores what it wrote.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rusqlite::Connection;
use walfs::ltx::{DatabaseChecksum, LtxEncoder, LtxHeader};
use walfs::replica::store::ReplicaStore;
use walfs::replica::url::ReplicaUrl;
use walfs::restore::apply::integrity_check;
use walfs::restore::list::summarize;
use walfs::restore::record::{ChecksumRecord, RecordedChecksum, SidecarStore};
use walfs::restore::{list_command, open_replica, restore_command, runtime, ListArgs, RestoreArgs};
use walfs::sqlite::ContentChecksum;

const PS: usize = 1024;

fn t(txid: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + txid * 10)
}

/// A hand-built replica of one or more databases, with every state they went through.
struct Replica {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    url: String,
    /// Per database: the image after each TXID (index = TXID; index 0 unused).
    states: Vec<(String, Vec<Vec<u8>>)>,
}

fn changes(step: u64) -> String {
    // A row source of n rows (the bundled SQLite has no generate_series).
    let rows = |n: u32| {
        format!("(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) SELECT x FROM c)")
    };
    match step {
        1 => format!(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); CREATE INDEX tv ON t(v); \
             INSERT INTO t(v) SELECT hex(randomblob(100)) FROM {};",
            rows(60)
        ),
        2 => format!(
            "INSERT INTO t(v) SELECT hex(randomblob(200)) FROM {};",
            rows(40)
        ),
        3 => "UPDATE t SET v = 'x' || v WHERE id % 3 = 0;".into(),
        // Shrink: the file loses pages.
        4 => "DELETE FROM t WHERE id > 30; VACUUM;".into(),
        5 => format!(
            "INSERT INTO t(v) SELECT hex(randomblob(300)) FROM {};",
            rows(20)
        ),
        n => format!("INSERT INTO t(v) VALUES ('step {n}');"),
    }
}

fn ltx(header: LtxHeader, pages: &[(u32, &[u8])]) -> Bytes {
    let mut enc = LtxEncoder::new(Vec::new(), header.without_checksums()).unwrap();
    for (pgno, data) in pages {
        enc.add_page(*pgno, data).unwrap();
    }
    enc.finish(0).unwrap();
    Bytes::from(enc.into_inner())
}

impl Replica {
    /// One database at the replica root, TXIDs 1 to 6.
    fn single() -> Replica {
        Replica::build(&[""], 6)
    }

    fn build(dbs: &[&str], steps: u64) -> Replica {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("replica");
        std::fs::create_dir(&dir).unwrap();
        let url = format!("file://{}", dir.display());
        let rurl = ReplicaUrl::parse(&url).unwrap();
        let store = ReplicaStore::open(&rurl).unwrap();
        let sidecar = SidecarStore::open(&rurl).unwrap();
        let rt = runtime().unwrap();
        let mut states = Vec::new();
        for (n, db) in dbs.iter().enumerate() {
            let src = tmp.path().join(format!("src{n}.db"));
            let conn = Connection::open(&src).unwrap();
            conn.execute_batch(&format!(
                "PRAGMA page_size={PS}; PRAGMA journal_mode=DELETE;"
            ))
            .unwrap();
            let mut images = vec![Vec::new()];
            for txid in 1..=steps {
                conn.execute_batch(&changes(txid)).unwrap();
                let image = std::fs::read(&src).unwrap();
                assert_eq!(image.len() % PS, 0);
                let commit = (image.len() / PS) as u32;
                let prev: &[u8] = &images[txid as usize - 1];
                let (level, header) = if txid == 1 {
                    (9, LtxHeader::snapshot(PS as u32, commit, 1, 0))
                } else {
                    (
                        0,
                        LtxHeader::incremental(PS as u32, commit, txid, txid, 0, 0),
                    )
                };
                let header = LtxHeader {
                    timestamp_ms: t(txid)
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as i64,
                    ..header
                };
                let pages: Vec<(u32, &[u8])> = image
                    .chunks(PS)
                    .enumerate()
                    .filter(|(i, p)| txid == 1 || prev.get(i * PS..(i + 1) * PS) != Some(*p))
                    .map(|(i, p)| (i as u32 + 1, p))
                    .collect();
                let body = ltx(header, &pages);
                rt.block_on(store.put_ltx(db, level, header.min_txid, txid, body, t(txid)))
                    .unwrap();
                // Odd TXIDs get records as walfs wrote them before it used blake3
                // (CRC-64), even ones blake3 records: restore checks both.
                let checksum = if txid % 2 == 1 {
                    RecordedChecksum::LegacyCrc64(
                        DatabaseChecksum::of_database(&image, PS as u32)
                            .unwrap()
                            .value(),
                    )
                } else {
                    RecordedChecksum::Content(
                        ContentChecksum::of_database(&image, PS as u32).unwrap(),
                    )
                };
                let record = ChecksumRecord {
                    txid,
                    checksum,
                    page_size: PS as u32,
                    commit,
                };
                rt.block_on(sidecar.put_checksum_record(db, &record))
                    .unwrap();
                images.push(image);
            }
            states.push((db.to_string(), images));
        }
        Replica {
            _tmp: tmp,
            dir,
            url,
            states,
        }
    }

    fn state(&self, txid: u64) -> &[u8] {
        &self.states[0].1[txid as usize]
    }

    fn out(&self, name: &str) -> PathBuf {
        self._tmp.path().join(name)
    }

    fn args(&self, out: &Path) -> RestoreArgs {
        RestoreArgs {
            url: self.url.clone(),
            output: out.to_path_buf(),
            db: None,
            force: false,
            txid: None,
            timestamp: None,
            no_integrity_check: false,
            encryption: Default::default(),
        }
    }

    fn l0(&self, txid: u64) -> PathBuf {
        self.dir.join(format!("ltx/0/{txid:016x}-{txid:016x}.ltx"))
    }
}

/// Nothing but `keep` in the directory (no temporary files left behind).
fn assert_only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "replica" && !n.starts_with("src"))
        .collect();
    names.sort();
    assert_eq!(names, keep, "in {}", dir.display());
}

#[test]
fn latest_restore_equals_the_source() {
    let r = Replica::single();
    let out = r.out("out.db");
    restore_command(&r.args(&out)).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), r.state(6));
    // The states really differ, including a shrink.
    assert!(r.state(4).len() < r.state(3).len());
    integrity_check(&out).unwrap();
    let n: i64 = Connection::open(&out)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
        .unwrap();
    assert_eq!(n, 51);
    assert_only(r._tmp.path(), &["out.db"]);
}

#[test]
fn txid_restores_each_earlier_state_exactly() {
    let r = Replica::single();
    for txid in 1..=6 {
        let out = r.out(&format!("at{txid}.db"));
        let mut a = r.args(&out);
        a.txid = Some(txid);
        restore_command(&a).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), r.state(txid), "TXID {txid}");
    }
    let mut a = r.args(&r.out("x.db"));
    a.txid = Some(7);
    let e = restore_command(&a).unwrap_err().to_string();
    assert!(e.contains("after the newest TXID 6"), "{e}");
    a.txid = Some(0);
    let e = restore_command(&a).unwrap_err().to_string();
    assert!(e.contains("oldest restorable TXID 1"), "{e}");
}

#[test]
fn timestamp_restores_the_newest_state_at_or_before() {
    let r = Replica::single();
    let out = r.out("ts.db");
    let mut a = r.args(&out);
    a.timestamp = Some(t(3) + Duration::from_secs(5));
    restore_command(&a).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), r.state(3));
    a.timestamp = Some(t(0));
    a.output = r.out("ts0.db");
    let e = restore_command(&a).unwrap_err().to_string();
    assert!(e.contains("no restorable TXID at or before"), "{e}");
}

#[test]
fn corrupt_object_is_named_and_nothing_is_written() {
    let r = Replica::single();
    let path = r.l0(3);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let out = r.out("out.db");
    let e = format!("{:#}", restore_command(&r.args(&out)).unwrap_err());
    assert!(
        e.contains("ltx/0/0000000000000003-0000000000000003.ltx") && e.contains("corrupt"),
        "{e}"
    );
    assert!(!out.exists());
    assert_only(r._tmp.path(), &[]);
    // States before the corrupt object still restore.
    let mut a = r.args(&out);
    a.txid = Some(2);
    restore_command(&a).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), r.state(2));
}

#[test]
fn missing_middle_object_is_a_gap() {
    let r = Replica::single();
    std::fs::remove_file(r.l0(3)).unwrap();
    let out = r.out("out.db");
    let e = restore_command(&r.args(&out)).unwrap_err().to_string();
    assert!(
        e.contains(
            "TXIDs jump from 2 to 4: object ltx/0/0000000000000003-0000000000000003.ltx is missing"
        ),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn existing_output_is_refused_without_force() {
    let r = Replica::single();
    let out = r.out("out.db");
    std::fs::write(&out, b"precious").unwrap();
    let wal = r.out("out.db-wal");
    std::fs::write(&wal, b"stale wal").unwrap();
    let e = restore_command(&r.args(&out)).unwrap_err().to_string();
    assert!(e.contains("exists; pass --force to replace it"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let mut a = r.args(&out);
    a.force = true;
    restore_command(&a).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), r.state(6));
    // A stale WAL would be applied to the new database by SQLite: it is gone.
    assert!(!wal.exists());
    // A directory is never replaced.
    let d = r.out("adir");
    std::fs::create_dir(&d).unwrap();
    let mut a = r.args(&d);
    a.force = true;
    a.db = Some(String::new());
    let e = restore_command(&a).unwrap_err().to_string();
    assert!(e.contains("is a directory"), "{e}");
}

#[test]
fn verification_record_mismatch_is_an_error() {
    let r = Replica::single();
    let rec = r.dir.join("walfs/checksums/0000000000000006");
    let text = std::fs::read_to_string(&rec).unwrap();
    let mut parsed = ChecksumRecord::parse(&text).unwrap();
    let RecordedChecksum::Content(c) = parsed.checksum else {
        panic!("TXID 6 has a blake3 record: {text}")
    };
    parsed.checksum = RecordedChecksum::Content(ContentChecksum::from_value(c.value() ^ 1));
    std::fs::write(&rec, parsed.encode()).unwrap();
    let out = r.out("out.db");
    let e = restore_command(&r.args(&out)).unwrap_err().to_string();
    assert!(e.contains("does not match its verification record"), "{e}");
    assert!(e.contains("walfs/checksums/0000000000000006"), "{e}");
    assert!(e.contains("recorded blake3="), "{e}");
    assert!(!out.exists());
    assert_only(r._tmp.path(), &[]);
    // A record from before blake3 (CRC-64) is checked too.
    let rec5 = r.dir.join("walfs/checksums/0000000000000005");
    let mut parsed = ChecksumRecord::parse(&std::fs::read_to_string(&rec5).unwrap()).unwrap();
    let RecordedChecksum::LegacyCrc64(c) = parsed.checksum else {
        panic!("TXID 5 has a CRC-64 record")
    };
    let mut a = r.args(&out);
    a.txid = Some(5);
    restore_command(&a).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), r.state(5));
    std::fs::remove_file(&out).unwrap();
    parsed.checksum = RecordedChecksum::LegacyCrc64(c ^ 1);
    std::fs::write(&rec5, parsed.encode()).unwrap();
    let e = restore_command(&a).unwrap_err().to_string();
    assert!(e.contains("does not match its verification record"), "{e}");
    assert!(e.contains("recorded checksum="), "{e}");
    assert!(!out.exists());
    // Without a record, integrity_check alone vouches for the content.
    std::fs::remove_file(&rec).unwrap();
    restore_command(&r.args(&out)).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), r.state(6));
}

#[test]
fn content_that_fails_integrity_check_is_refused() {
    // A well-formed LTX object that breaks the database: garbage over its last page, with
    // no verification record to catch it first.
    let r = Replica::single();
    let image = r.state(6);
    let commit = (image.len() / PS) as u32;
    let garbage = vec![0x5au8; PS];
    let h = LtxHeader::incremental(PS as u32, commit, 7, 7, 0, 0);
    let body = ltx(h, &[(commit, &garbage)]);
    let rurl = ReplicaUrl::parse(&r.url).unwrap();
    let store = ReplicaStore::open(&rurl).unwrap();
    runtime()
        .unwrap()
        .block_on(store.put_ltx("", 0, 7, 7, body, t(7)))
        .unwrap();
    let out = r.out("out.db");
    let e = restore_command(&r.args(&out)).unwrap_err().to_string();
    assert!(e.contains("integrity_check"), "{e}");
    assert!(!out.exists());
    assert_only(r._tmp.path(), &[]);
}

#[test]
fn whole_replica_restores_every_database() {
    let r = Replica::build(&["a.db", "sub/dir/b.db"], 4);
    let out = r.out("restored");
    restore_command(&r.args(&out)).unwrap();
    for (db, images) in &r.states {
        assert_eq!(std::fs::read(out.join(db)).unwrap(), images[4], "{db}");
    }
    // Again: every output exists, so nothing is touched without --force.
    let e = restore_command(&r.args(&out)).unwrap_err().to_string();
    assert!(e.contains("exists; pass --force"), "{e}");
    // --txid needs --db; with it, one database goes to OUT.
    let mut a = r.args(&r.out("b2.db"));
    a.txid = Some(2);
    let e = restore_command(&a).unwrap_err().to_string();
    assert!(e.contains("pass --db"), "{e}");
    a.db = Some("sub/dir/b.db".into());
    restore_command(&a).unwrap();
    assert_eq!(std::fs::read(r.out("b2.db")).unwrap(), r.states[1].1[2]);

    // Listing.
    let (_, store, sidecar) = open_replica(&r.url, &Default::default()).unwrap();
    let rt = runtime().unwrap();
    let s = summarize(&rt, &store, &sidecar, "sub/dir/b.db").unwrap();
    assert_eq!(s.latest_txid, 4);
    assert_eq!(s.latest_time, t(4));
    assert_eq!(s.size, r.states[1].1[4].len() as u64);
    assert_eq!(s.restorable, Some(((1, t(1)), (4, t(4)))));
    assert_eq!(s.levels.get(&0).map(|l| l.objects), Some(3));
    assert_eq!(s.levels.get(&9).map(|l| l.objects), Some(1));
    list_command(&ListArgs {
        url: r.url.clone(),
        db: None,
        encryption: Default::default(),
    })
    .unwrap();
    list_command(&ListArgs {
        url: r.url.clone(),
        db: Some("a.db".into()),
        encryption: Default::default(),
    })
    .unwrap();
}

#[test]
fn missing_replica_and_empty_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let args = RestoreArgs {
        url: format!("file://{}/nope", tmp.path().display()),
        output: tmp.path().join("o.db"),
        db: None,
        force: false,
        txid: None,
        timestamp: None,
        no_integrity_check: false,
        encryption: Default::default(),
    };
    let e = restore_command(&args).unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
    assert!(!tmp.path().join("nope").exists());
    let args = RestoreArgs {
        url: format!("file://{}", tmp.path().display()),
        ..args
    };
    let e = restore_command(&args).unwrap_err().to_string();
    assert!(e.contains("holds no databases"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Interop with the real litestream
// ---------------------------------------------------------------------------------------------

fn pages(b: &[u8]) -> Vec<&[u8]> {
    b.chunks(PS).collect()
}

#[test]
fn restores_a_replica_written_by_litestream() {
    let litestream = common::litestream();
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.db");
    let replica = tmp.path().join("replica");
    let url = format!("file://{}", replica.display());

    let conn = Connection::open(&db).unwrap();
    conn.execute_batch(&format!(
        "PRAGMA page_size={PS}; PRAGMA journal_mode=WAL; \
         CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);"
    ))
    .unwrap();
    let mut child = Command::new(&litestream)
        .arg("replicate")
        .arg(&db)
        .arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(4) {
        conn.execute(
            "INSERT INTO t(v) VALUES (hex(randomblob(?1)))",
            [50 + (i % 7) * 100],
        )
        .unwrap();
        if i % 10 == 9 {
            conn.execute("DELETE FROM t WHERE id % 5 = 0", []).unwrap();
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(40));
    }
    // Let it sync the last commits (its interval is 1 s), then stop it.
    std::thread::sleep(Duration::from_secs(3));
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("litestream did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(
        replica.join("ltx").is_dir(),
        "litestream wrote no replica; its log:\n{log}"
    );

    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(conn);
    let source = std::fs::read(&db).unwrap();

    let ours = tmp.path().join("ours.db");
    restore_command(&RestoreArgs {
        url: url.clone(),
        output: ours.clone(),
        db: None,
        force: false,
        txid: None,
        timestamp: None,
        no_integrity_check: false,
        encryption: Default::default(),
    })
    .unwrap_or_else(|e| panic!("restore failed: {e:#}; litestream log:\n{log}"));
    let theirs = tmp.path().join("theirs.db");
    let st = Command::new(&litestream)
        .arg("restore")
        .arg("-o")
        .arg(&theirs)
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "litestream restore failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );

    let ours_b = std::fs::read(&ours).unwrap();
    let theirs_b = std::fs::read(&theirs).unwrap();
    let (s, o, l) = (pages(&source), pages(&ours_b), pages(&theirs_b));
    assert_eq!(
        o.len(),
        l.len(),
        "walfs and litestream restores differ in size"
    );
    for (n, (a, b)) in o.iter().zip(&l).enumerate() {
        assert!(
            a == b,
            "page {} differs between walfs and litestream restores",
            n + 1
        );
    }
    assert_eq!(
        o.len(),
        s.len(),
        "restored {} pages, the source has {}; litestream log:\n{log}",
        o.len(),
        s.len()
    );
    for (n, (a, b)) in o.iter().zip(&s).enumerate() {
        assert!(a == b, "page {} differs from the source", n + 1);
    }
    integrity_check(&ours).unwrap();
}

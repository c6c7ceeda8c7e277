//! Point-in-time restore, `walfs list --db` and `walfs verify` end to end: `sqlite3`
//! processes write under a real `walfs mount --replica s3://... --sync-interval 0`
//! replicating to a real `moto_server` on 127.0.0.1. After each step the test keeps a copy
//! of the database as it was live (every `sqlite3` process checkpoints the WAL into the
//! file when it exits) and the replica's TXID for it; restores to those TXIDs and moments
//! must equal the copies page by page.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use common::{assert_same_database, sqlite3, Moto, Mount, S3Fixture, S3_ENV, WALFS};
use walfs::replica::timestamp::format_rfc3339_nano;

/// The shared S3 fixture (prefix `pitr`) and a mount that uploads each commit at once
/// (`--sync-interval 0`).
struct Pitr {
    mount: Mount,
    s3: S3Fixture,
}

impl Pitr {
    fn new() -> Pitr {
        let s3 = S3Fixture::new("pitr");
        let mount = s3.mount(&["--sync-interval", "0"]);
        Pitr { mount, s3 }
    }

    /// Runs one `sqlite3` process on `rel` under the mount, waits until the replica holds
    /// a newer TXID, and returns that TXID and a copy of the database as it is now live.
    fn step(&self, rel: &str, sql: &str, prev: u64, name: &str) -> (u64, PathBuf) {
        sqlite3(&self.mount.path(rel), sql);
        let txid = wait_txid_above(&self.s3.url(), rel, prev);
        let copy = self.s3.out(name);
        std::fs::copy(self.mount.backing_path(rel), &copy).unwrap();
        (txid, copy)
    }
}

fn walfs(args: &[&str]) -> Output {
    Command::new(WALFS)
        .args(args)
        .envs(S3_ENV.iter().copied())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The latest TXID `walfs list URL --db rel` shows (0 if the replica holds none yet).
fn latest_txid(url: &str, rel: &str) -> u64 {
    let o = walfs(&["list", url, "--db", rel]);
    if !o.status.success() {
        return 0;
    }
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.lines()
        .find_map(|l| l.trim().strip_prefix("latest TXID "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no latest TXID in {out}"))
}

/// Waits (up to 30 s) until the replica's latest TXID of `rel` passes `prev`.
fn wait_txid_above(url: &str, rel: &str, prev: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = latest_txid(url, rel);
        if t > prev {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "the replica of {rel} did not pass TXID {prev} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn rfc3339(t: SystemTime) -> String {
    format_rfc3339_nano(t)
}

/// A moment strictly between two steps: sleeps past the upload of the step before, takes
/// the time, and sleeps again so the next commit is clearly later (S3 dates objects in
/// whole seconds).
fn moment() -> SystemTime {
    std::thread::sleep(Duration::from_millis(1200));
    let t = SystemTime::now();
    std::thread::sleep(Duration::from_millis(1200));
    t
}

#[test]
fn timestamp_restores_before_and_after_an_accidental_delete() {
    let before_history = SystemTime::now() - Duration::from_secs(5);
    let f = Pitr::new();
    let db = "app.db";
    let (t1, _) = f.step(
        db,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);",
        0,
        "s1.db",
    );
    let (t2, good) = f.step(
        db,
        "INSERT INTO t(v) SELECT printf('row %d', value) FROM generate_series(1, 500);",
        t1,
        "good.db",
    );
    let before_delete = moment();
    let (t3, emptied) = f.step(db, "DELETE FROM t;", t2, "emptied.db");
    let after_delete = moment();
    // A moment right before a commit that is uploaded within the same second: S3 dates the
    // listing in whole seconds of the upload, so only the commit time tells them apart.
    let just_before = SystemTime::now();
    let (_t4, _) = f.step(db, "INSERT INTO t(v) VALUES ('later');", t3, "later.db");
    let (out, _) = f.s3.restore(
        db,
        "just-before.db",
        &["--timestamp", &rfc3339(just_before)],
    );
    assert_same_database(&emptied, &out);

    let (out, _) = f.s3.restore(
        db,
        "at-before.db",
        &["--timestamp", &rfc3339(before_delete)],
    );
    assert_same_database(&good, &out);
    assert_eq!(sqlite3(&out, "SELECT count(*) FROM t;"), "500\n");

    let (out, _) =
        f.s3.restore(db, "at-after.db", &["--timestamp", &rfc3339(after_delete)]);
    assert_same_database(&emptied, &out);
    assert_eq!(sqlite3(&out, "SELECT count(*) FROM t;"), "0\n");

    // Before the replica's history: a one-line error naming the oldest moment and TXID.
    let out = f.s3.out("too-early.db");
    let o = walfs(&[
        "restore",
        &f.s3.url(),
        "--db",
        db,
        "-o",
        out.to_str().unwrap(),
        "--timestamp",
        &rfc3339(before_history),
    ]);
    assert!(!o.status.success(), "restore before history succeeded");
    let err = text(&o);
    assert!(
        err.contains("has no restorable TXID at or before")
            && err.contains("the oldest restorable is TXID 1 at 20"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!out.exists());
}

#[test]
fn every_commit_restores_by_txid_and_list_shows_the_range() {
    let f = Pitr::new();
    let db = "sub/data.db";
    std::fs::create_dir(f.mount.path("sub")).unwrap();
    let mut states = Vec::new();
    let (mut prev, c) = f.step(
        db,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);",
        0,
        "c0.db",
    );
    states.push((prev, c));
    for i in 1..=5 {
        let sql = match i {
            3 => "UPDATE t SET v = randomblob(300) WHERE id % 2 = 0;".to_string(),
            4 => "DELETE FROM t WHERE id % 3 = 0;".to_string(),
            _ => format!(
                "INSERT INTO t(v) SELECT randomblob(200 * {i}) FROM generate_series(1, 40);"
            ),
        };
        let (t, c) = f.step(db, &sql, prev, &format!("c{i}.db"));
        states.push((t, c));
        prev = t;
    }
    let txids: Vec<u64> = states.iter().map(|(t, _)| *t).collect();
    let mut sorted = txids.clone();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        txids.len(),
        "each commit has its own TXID: {txids:?}"
    );
    for (t, copy) in &states {
        let (out, _) =
            f.s3.restore(db, &format!("r{t}.db"), &["--txid", &t.to_string()]);
        assert_same_database(copy, &out);
    }

    // A TXID that does not exist yet names the newest.
    let newest = *txids.last().unwrap();
    let out = f.s3.out("future.db");
    let o = walfs(&[
        "restore",
        &f.s3.url(),
        "--db",
        db,
        "-o",
        out.to_str().unwrap(),
        "--txid",
        &(newest + 10).to_string(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&format!("after the newest TXID {newest}")),
        "{}",
        text(&o)
    );

    // `walfs list --db`: the range and the objects by level.
    let o = walfs(&["list", &f.s3.url(), "--db", db]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("  oldest restorable: TXID 1 at 20"), "{out}");
    assert!(
        out.contains(&format!("  newest restorable: TXID {newest} at 20")),
        "{out}"
    );
    // sync-interval 0: the first TXID as a snapshot, then one level-0 object per commit
    // (level 0's binary counter makes some of them span the ones before; the first
    // upload, TXID 1, is among them when it was kept before the snapshot was).
    let level = |n: u8| {
        out.lines()
            .find(|l| l.trim_start().starts_with(&format!("level {n}:")))
            .unwrap_or_else(|| panic!("no level {n} line: {out}"))
            .to_string()
    };
    assert!(level(9).contains("1 object, TXIDs 1 to 1,"), "{out}");
    assert!(
        (1..=2).any(|from| level(0).contains(&format!(
            "{} objects, TXIDs {from} to {newest},",
            newest - 1
        ))),
        "{out}"
    );
    // The range's moments are commit times: the newest is the latest TXID's.
    let latest_line = out.lines().find(|l| l.contains("latest TXID")).unwrap();
    let latest_at = latest_line
        .split(" at ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    assert!(
        out.contains(&format!(
            "newest restorable: TXID {newest} at {latest_at}\n"
        )),
        "{out}"
    );
    // The overview lists it as live.
    let o = walfs(&["list", &f.s3.url()]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let row = out
        .lines()
        .find(|l| l.starts_with(db))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.trim_end().ends_with("live"), "{out}");
}

/// The requests that write or delete, from moto's log.
fn writes(moto: &Moto) -> usize {
    moto.requests()
        .iter()
        .filter(|r| r.starts_with("PUT") || r.starts_with("POST") || r.starts_with("DELETE"))
        .count()
}

#[test]
fn verify_passes_then_names_a_corrupted_object() {
    let mut f = Pitr::new();
    let mut prev = 0;
    for (i, sql) in [
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);",
        "INSERT INTO t(v) SELECT randomblob(500) FROM generate_series(1, 200);",
        "UPDATE t SET v = randomblob(100) WHERE id < 50;",
        "INSERT INTO t(v) VALUES (randomblob(10));",
    ]
    .iter()
    .enumerate()
    {
        prev = f.step("a.db", sql, prev, &format!("a{i}.db")).0;
    }
    f.step(
        "b.db",
        "PRAGMA journal_mode=WAL; CREATE TABLE u(x); INSERT INTO u VALUES (1);",
        0,
        "b.db",
    );
    f.mount.stop();

    let before = writes(&f.s3.moto);
    let o = walfs(&["verify", &f.s3.url(), "--seed", "7"]);
    let out = text(&o);
    assert!(o.status.success(), "verify of a good replica failed: {out}");
    assert!(out.contains("all 4 checks passed"), "{out}");
    assert_eq!(out.matches(": ok (checksum matches").count(), 4, "{out}");
    assert!(out.contains("a.db latest TXID"), "{out}");
    assert!(out.contains("a.db earlier TXID"), "{out}");
    // The same seed picks the same earlier TXID.
    let again = text(&walfs(&["verify", &f.s3.url(), "--seed", "7"]));
    let pick = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("a.db earlier TXID"))
            .map(|l| l.split(" (").next().unwrap().to_string())
    };
    assert_eq!(pick(&out), pick(&again));
    assert_eq!(writes(&f.s3.moto), before, "verify wrote to the replica");

    // Corrupt every object a restore of a.db can start from (min TXID 1: the snapshot, and
    // level-0 objects that level 0's binary counter merged with the first upload when it
    // was kept before the snapshot): flip bytes in their middle.
    let rt = walfs::restore::runtime().unwrap();
    let url = f.s3.moto.replica_url(&f.s3.prefix);
    let store = walfs::replica::store::ReplicaStore::open(&url).unwrap();
    let objects = walfs::restore::list_objects(&rt, &store, "a.db").unwrap();
    let bases: Vec<String> = objects
        .iter()
        .filter(|o| o.min_txid == 1)
        .map(|o| o.key.clone())
        .collect();
    assert!(!bases.is_empty(), "no snapshot: {objects:?}");
    for key in &bases {
        let mut bytes = rt.block_on(store.get_object(key)).unwrap().to_vec();
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 16] {
            *b ^= 0x5a;
        }
        rt.block_on(store.put_object(key, bytes.into())).unwrap();
    }

    let o = walfs(&["verify", &f.s3.url(), "--db", "a.db", "--seed", "7"]);
    let out = text(&o);
    assert!(
        !o.status.success(),
        "verify passed a corrupted replica: {out}"
    );
    assert!(
        bases
            .iter()
            .any(|k| out.contains(&format!("object {k} is corrupt"))),
        "no corrupted object ({bases:?}) is named: {out}"
    );
    assert!(out.contains("FAILED"), "{out}");
    // The other database still verifies.
    let o = walfs(&["verify", &f.s3.url(), "--db", "b.db"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn mount_takes_its_settings_from_a_config_file() {
    let f = S3Fixture::new("cfg");
    let url = f.url();
    let config = f.out("walfs.toml");
    std::fs::write(
        &config,
        format!(
            "replica = [{url:?}]\nstaging-dir = {:?}\nsync-interval = \"0\"\nthreads = 2\n",
            f.staging().display().to_string()
        ),
    )
    .unwrap();
    let mount = Mount::with_env(&["--config", config.to_str().unwrap()], S3_ENV);
    sqlite3(
        &mount.path("c.db"),
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (42);",
    );
    // Replicated (the replica URL came from the file) at once (sync-interval 0 too).
    let txid = wait_txid_above(&url, "c.db", 0);
    let copy = f.out("copy.db");
    std::fs::copy(mount.backing_path("c.db"), &copy).unwrap();
    let out = f.out("restored.db");
    let o = walfs(&[
        "restore",
        &url,
        "--db",
        "c.db",
        "-o",
        out.to_str().unwrap(),
        "--txid",
        &txid.to_string(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_database(&copy, &out);

    // An unknown key is refused before anything is mounted, naming the key.
    std::fs::write(&config, "sync_interval = \"1s\"\n").unwrap();
    let o = Command::new(WALFS)
        .args(["mount", "/nonexistent-b", "/nonexistent-m", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        err.starts_with("walfs: error: config file ")
            && err.contains("unknown setting \"sync_interval\""),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

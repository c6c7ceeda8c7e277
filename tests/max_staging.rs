//! Bounded staging (`--max-staging`), on real mounts with real `sqlite3` writer processes
//! and a moto S3 replica: during an outage (the replica's port answers nothing until the
//! test forwards it to moto) the writers see no error, the staging directory stays near
//! the bound because each database's pending transactions collapse into one snapshot,
//! walfs says so once, and once the store answers the replica catches up: the restore
//! equals the live database page by page and `walfs verify` passes. Without an outage
//! nothing collapses, however small the bound.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{as_strs, assert_same_database, Mount, S3Fixture, S3_ENV, WALFS};

/// Rows in each database; each holds a 4000-byte blob (one page), so a database is about
/// 0.8 MiB however much is written into it.
const ROWS: u32 = 200;

/// Creates `db` through the mount in `mode` with [`ROWS`] rows.
fn create(m: &Mount, db: &str, mode: &str) {
    common::sqlite3(
        &m.path(db),
        &format!(
            "PRAGMA journal_mode={mode}; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
             INSERT INTO t(v) SELECT randomblob(4000) FROM generate_series(1, {ROWS});"
        ),
    );
}

/// Starts a `sqlite3 -bail` process on `db` (through the mount) that commits `commits`
/// transactions, each rewriting one row's blob, paced at about 10 commits per 50 ms.
/// Returns a thread that feeds it and yields its exit status and stderr.
fn writer(
    m: &Mount,
    db: &str,
    pragmas: &str,
    commits: u32,
    seed: u64,
) -> std::thread::JoinHandle<(std::process::ExitStatus, String)> {
    let mut child = Command::new("sqlite3")
        .arg("-bail")
        .arg(m.path(db))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sqlite3");
    let pragmas = pragmas.to_string();
    std::thread::spawn(move || {
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{pragmas}").unwrap();
        let mut rng = common::Rng(seed);
        for i in 0..commits {
            let id = 1 + rng.below(ROWS as usize);
            writeln!(stdin, "UPDATE t SET v = randomblob(4000) WHERE id = {id};").unwrap();
            if i % 10 == 9 {
                stdin.flush().unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        writeln!(stdin, ".quit").unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
}

/// Bytes of every file under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        match e.metadata() {
            Ok(md) if md.is_dir() => total += tree_bytes(&e.path()),
            Ok(md) => total += md.len(),
            Err(_) => {}
        }
    }
    total
}

/// Files under `dir` that wait for upload: sealed segments and staged snapshots.
fn pending_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(pending_files(&path));
            continue;
        }
        let parent = path
            .parent()
            .and_then(|p| p.file_name())
            .unwrap_or_default();
        let name = e.file_name().to_string_lossy().into_owned();
        if (parent == "segments" && name != "active") || parent == "snapshots" {
            out.push(path.display().to_string());
        }
    }
    out
}

/// The value of `key=` in the stop summary line (`capture stopped ...`).
fn stop_counter(log: &str, key: &str) -> u64 {
    let line = log
        .lines()
        .rfind(|l| l.contains("capture stopped"))
        .unwrap_or_else(|| panic!("no stop summary in the log: {log}"));
    let at = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line}"));
    line[at + key.len() + 1..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// `walfs verify URL` (S3 credentials), which must pass.
fn verify(url: &str) -> String {
    let o = Command::new(WALFS)
        .args(["verify", url])
        .envs(S3_ENV.iter().copied())
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "walfs verify failed: {out}");
    out
}

const DBS: [(&str, &str, &str); 2] = [
    ("wal.db", "WAL", "PRAGMA synchronous=NORMAL;"),
    ("delete.db", "DELETE", "PRAGMA synchronous=FULL;"),
];

/// What [`outage`] saw while the replica could not be reached.
struct Outage {
    f: S3Fixture,
    m: Mount,
    /// The log up to the end of the outage.
    log: String,
    /// The staging directory's largest size while the writers ran, and after them.
    peak: u64,
    settled: u64,
    /// The sizes of the database files (a snapshot of each is about as large).
    snapshots: u64,
}

/// Mounts with an S3 replica whose port answers nothing and `--max-staging max`, runs a
/// writer of `commits` transactions on each of [`DBS`] (which must see no error) while
/// sampling the staging directory's size, then makes the store answer and waits until
/// staging holds nothing more to upload.
fn outage(max: &str, commits: u32) -> Outage {
    let f = S3Fixture::new("bounded");
    let port = common::free_port();
    let url = f.moto.s3_url_via(port, &f.prefix);
    let args = f.args_to(
        &url,
        &[
            "--max-staging",
            max,
            "--sync-interval",
            "200ms",
            "--lease-ttl",
            "3s",
        ],
    );
    let mut env = S3_ENV.to_vec();
    env.push(("RUST_LOG", "info"));
    let m = Mount::with_env(&as_strs(&args), &env);
    for (db, mode, _) in DBS {
        create(&m, db, mode);
    }
    let staging = f.staging();
    let before = tree_bytes(&staging);
    let writers: Vec<_> = DBS
        .iter()
        .enumerate()
        .map(|(i, (db, _, pragmas))| writer(&m, db, pragmas, commits, 7 + i as u64))
        .collect();
    let (mut peak, mut samples) = (0u64, 0u32);
    while !writers.iter().all(|w| w.is_finished()) {
        peak = peak.max(tree_bytes(&staging));
        samples += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    for (w, (db, _, _)) in writers.into_iter().zip(DBS) {
        let (status, err) = w.join().unwrap();
        assert!(
            status.success() && err.is_empty(),
            "{db} writer: {status} {err}"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    peak = peak.max(tree_bytes(&staging));
    let settled = tree_bytes(&staging);
    let snapshots: u64 = DBS
        .iter()
        .map(|(db, _, _)| std::fs::metadata(m.backing_path(db)).unwrap().len())
        .sum();
    eprintln!(
        "--max-staging {max}, {commits} commits of a 4000-byte row per database: staging \
         {before} bytes at the start, peak {peak} ({samples} samples), {settled} after the \
         writers; databases {snapshots}"
    );
    let log = m.log();
    for line in log.lines().filter(|l| l.contains("max-staging")) {
        eprintln!("{line}");
    }
    assert!(!log.contains("ERROR"), "{log}");

    // The store answers: the replica catches up from the snapshots.
    common::forward(port, f.moto.port);
    let start = Instant::now();
    while !pending_files(&staging).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the replica did not catch up: {:?} {}",
            pending_files(&staging),
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Outage {
        f,
        m,
        log,
        peak,
        settled,
        snapshots,
    }
}

/// Stops the mount; each database restores equal to the live one, and `walfs verify`
/// passes. Returns the stop summary's `collapses`.
fn stop_and_check(o: &mut Outage) -> u64 {
    let log = o.m.stop();
    let collapses = stop_counter(&log, "collapses");
    eprintln!("collapses={collapses}");
    for (db, _, _) in DBS {
        let (out, _) = o.f.restore(db, &format!("latest-{db}"), &[]);
        assert_same_database(&o.m.backing_path(db), &out);
    }
    // The latest state of each, and an earlier TXID where one is still restorable (a
    // database collapsed at the end of the outage has only its snapshot, the latest).
    let report = verify(&o.f.url());
    for (db, _, _) in DBS {
        assert!(report.contains(&format!("{db} latest TXID")), "{report}");
    }
    assert!(!report.contains("FAILED"), "{report}");
    collapses
}

#[test]
fn a_long_outage_collapses_staging_into_snapshots_and_the_replica_catches_up() {
    const MAX: u64 = 4 << 20;
    // About 23 MiB of pages committed while the replica cannot be reached.
    let mut o = outage("4MiB", 3000);
    let (log, snapshots) = (&o.log, o.snapshots);
    // The bound, one snapshot per database, and what one upload round stages.
    assert!(
        o.peak <= MAX + snapshots + (3 << 20),
        "staging reached {} bytes, bound {MAX} + {snapshots} + slack: {log}",
        o.peak
    );
    assert!(
        o.settled <= MAX + snapshots,
        "staging holds {} bytes after the writers: {log}",
        o.settled
    );
    assert_eq!(
        log.matches("staging reached --max-staging 4 MiB").count(),
        1,
        "said once: {log}"
    );
    let line = log.lines().find(|l| l.contains("staging reached")).unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("can no longer be restored"), "{line}");
    assert!(
        !log.contains("more than --max-staging"),
        "two snapshots fit in 4 MiB: {log}"
    );
    assert!(stop_and_check(&mut o) >= 2);
    // The documented cost: a TXID inside a collapsed span cannot be restored, and the
    // restore says from where on it can.
    let err =
        o.f.try_restore("wal.db", "inside.db", &["--txid", "2"])
            .expect_err("TXID 2 was collapsed away");
    assert!(err.contains("before the oldest restorable TXID"), "{err}");
}

/// A bound smaller than one snapshot of each database: the snapshots are kept (they are
/// the latest state), and walfs says so once.
#[test]
fn snapshots_larger_than_the_bound_are_kept() {
    const MAX: u64 = 1 << 20;
    let mut o = outage("1M", 800);
    let log = &o.log;
    assert_eq!(
        log.matches("staging reached --max-staging").count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("more than --max-staging 1 MiB").count(),
        1,
        "said once: {log}"
    );
    // Less than two snapshots' worth per database, and the state files.
    assert!(
        o.settled <= 2 * o.snapshots + (256 << 10),
        "staging holds {} bytes after the writers: {log}",
        o.settled
    );
    assert!(o.settled > MAX, "{}", o.settled);
    assert!(stop_and_check(&mut o) >= 2);
}

#[test]
fn without_an_outage_nothing_collapses() {
    let f = S3Fixture::new("unbounded");
    let mut env = S3_ENV.to_vec();
    env.push(("RUST_LOG", "info"));
    let args = f.args(&["--max-staging", "64K", "--sync-interval", "200ms"]);
    let mut m = Mount::with_env(&as_strs(&args), &env);
    for (db, mode, _) in DBS {
        create(&m, db, mode);
    }
    let writers: Vec<_> = DBS
        .iter()
        .enumerate()
        .map(|(i, (db, _, pragmas))| writer(&m, db, pragmas, 1000, 11 + i as u64))
        .collect();
    for (w, (db, _, _)) in writers.into_iter().zip(DBS) {
        let (status, err) = w.join().unwrap();
        assert!(
            status.success() && err.is_empty(),
            "{db} writer: {status} {err}"
        );
    }
    let log = m.stop();
    assert!(!log.contains("staging reached"), "{log}");
    assert_eq!(stop_counter(&log, "collapses"), 0, "{log}");
    for (db, _, _) in DBS {
        let (out, _) = f.restore(db, &format!("latest-{db}"), &[]);
        assert_same_database(&m.backing_path(db), &out);
    }
    verify(&f.url());
}

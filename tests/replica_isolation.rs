//! Each replica on its own: a mount with two S3 replicas (one `moto_server`, two prefixes),
//! where replica A is reached through the fault proxy and replica B directly. While A
//! fails (its connections reset) or hangs (its requests never answered), `sqlite3` keeps
//! committing through the FUSE mount, and B must keep up as if A were not there: its lag
//! (`walfs_replication_lag_seconds`) stays under 2 s at every sample and its TXID follows
//! the database's, while A's lag grows (and, when it fails, its upload errors rise);
//! `walfs status` says so. Once A heals, both catch up, and after a clean unmount a restore
//! from each replica alone equals the live database page by page.
//!
//! A is the first `--replica`: an uploader that walks the replicas in order and stops at
//! the first failure holds B back entirely.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::fault_proxy::{Fault, FaultHandle, FaultProxy};
use common::scrape::{json, status, wait_for, Scrape};
use common::{as_strs, assert_same_database, free_port, sqlite3, Mount, S3Fixture, S3_ENV, WALFS};

/// The sync interval of the mount.
const SYNC_INTERVAL: &str = "200ms";
/// How long replica A fails while the writer commits.
const OUTAGE: Duration = Duration::from_secs(12);
/// B's samples start this long into the outage (the round under way when A starts
/// failing may be slowed by it).
const GRACE: Duration = Duration::from_secs(1);
/// How often B's lag is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// The most B may lag at any sample.
const MAX_B_LAG: f64 = 2.0;
/// B's TXID at each sample is at least the database's TXID this long before.
const B_FOLLOWS_WITHIN: Duration = Duration::from_secs(1);
/// The least A must lag by the end of the outage.
const MIN_A_LAG: f64 = 3.0;
/// How long both replicas have to catch up once A heals.
const CATCH_UP: Duration = Duration::from_secs(30);

/// The status of replica `name` of the only database in a `walfs status --json`.
fn replica_status<'a>(j: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    j["databases"][0]["replicas"]
        .as_array()
        .unwrap_or_else(|| panic!("no replicas in {j}"))
        .iter()
        .find(|r| r["replica"] == name)
        .unwrap_or_else(|| panic!("no replica {name} in {j}"))
}

/// One `sqlite3` process that commits one row every `every` through the mount, until
/// [`Writer::stop`].
struct Writer {
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    child: Option<Child>,
}

impl Writer {
    fn start(db: &Path, every: Duration) -> Writer {
        let mut child = Command::new("sqlite3")
            .arg("-batch")
            .arg("-bail")
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sqlite3 (apt-get install sqlite3)");
        let mut stdin: ChildStdin = child.stdin.take().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), commits.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let n = c.load(Ordering::SeqCst);
                let sql = format!("INSERT INTO t(v) VALUES (randomblob(2000) || '{n}');\n");
                if stdin
                    .write_all(sql.as_bytes())
                    .and_then(|()| stdin.flush())
                    .is_err()
                {
                    // sqlite3 exited (-bail): `stop` reports why.
                    return;
                }
                c.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(every);
            }
            // Dropping stdin ends sqlite3, which checkpoints as it closes.
        });
        Writer {
            stop,
            commits,
            thread: Some(thread),
            child: Some(child),
        }
    }

    /// Stops writing, waits for sqlite3 to exit (it must succeed); returns the commits sent.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "the writing sqlite3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.commits.load(Ordering::SeqCst)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

/// Heals the proxy when dropped: declared after the mount, it is dropped first, so that a
/// failing test does not leave the daemon's unmount waiting for a hung replica.
struct HealOnDrop(FaultHandle);

impl Drop for HealOnDrop {
    fn drop(&mut self) {
        self.0.set(Fault::Pass);
    }
}

/// One sample taken during the outage.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Since the fault was set.
    at: Duration,
    db_txid: f64,
    a_txid: f64,
    a_lag: f64,
    a_errors: f64,
    b_txid: f64,
    b_lag: f64,
}

/// `walfs restore URL --db DB -o OUT` (credentials of moto), verified against the writer's
/// checksum record; returns walfs's report.
fn restore_from(url: &str, db: &str, out: &Path) -> String {
    let _ = std::fs::remove_file(out);
    let o = Command::new(WALFS)
        .args(["restore", url, "--db", db, "-o"])
        .arg(out)
        .envs(S3_ENV.iter().copied())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "walfs restore {url} failed: {log}");
    assert!(
        log.contains("content checksum matches the writer's record"),
        "restore from {url} was not verified against the recorded checksum: {log}"
    );
    log
}

/// The scenario, with replica A under `fault` for [`OUTAGE`]. `errors`: A's failures are
/// errors (a reset connection) rather than requests that never end (a hang).
fn replica_b_keeps_up_while_a(fault: Fault, errors: bool) {
    let r = S3Fixture::new("a");
    let proxy = FaultProxy::start(r.moto.port);
    let url_a = r.moto.s3_url_via(proxy.port, "a");
    let url_b = r.moto.s3_url("b");
    let (name_a, name_b) = ("s3://walfs-test/a", "s3://walfs-test/b");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let args = r.args_to(
        &url_a,
        &[
            "--replica",
            &url_b,
            "--metrics-addr",
            &addr,
            "--sync-interval",
            SYNC_INTERVAL,
            // No lease renewal falls in the outage (an expired lease would fence A's
            // writes: a wait for the lease, not a failing store).
            "--lease-ttl",
            "300s",
        ],
    );
    let mut m = Mount::with_env(&as_strs(&args), S3_ENV);
    let heal = HealOnDrop(proxy.handle());
    let db = "db=\"app.db\"";
    let (rep_a, rep_b) = (
        format!("replica=\"{name_a}\""),
        format!("replica=\"{name_b}\""),
    );
    let (rep_a, rep_b) = (rep_a.as_str(), rep_b.as_str());
    let held = |s: &Scrape| {
        let txid = s.get("walfs_database_txid", &[db]).unwrap_or(0.0);
        (
            txid,
            s.get("walfs_replica_txid", &[db, rep_a]).unwrap_or(-1.0),
            s.get("walfs_replica_txid", &[db, rep_b]).unwrap_or(-1.0),
        )
    };

    // Both replicas hold the first rows.
    let dbp = m.path("app.db");
    sqlite3(
        &dbp,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);",
    );
    let rows: String = (0..5)
        .map(|i| format!("INSERT INTO t(v) VALUES (randomblob(3000) || 'first {i}');\n"))
        .collect();
    sqlite3(&dbp, &rows);
    let first = wait_for(
        port,
        Duration::from_secs(30),
        "both replicas hold it",
        |s| {
            let (txid, a, b) = held(s);
            txid > 0.0 && a == txid && b == txid
        },
    );
    let errors_before = first.must("walfs_upload_errors_total", &[rep_a]);
    assert_eq!(
        first.must("walfs_upload_errors_total", &[rep_b]),
        0.0,
        "{first}"
    );

    // A fails while a writer commits every 150 ms; B is sampled every 250 ms.
    let writer = Writer::start(&dbp, Duration::from_millis(150));
    std::thread::sleep(Duration::from_millis(500));
    heal.0.set(fault);
    let outage = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    while outage.elapsed() < OUTAGE {
        std::thread::sleep(SAMPLE_EVERY);
        let s = Scrape::take(port);
        samples.push(Sample {
            at: outage.elapsed(),
            db_txid: s.must("walfs_database_txid", &[db]),
            a_txid: s.must("walfs_replica_txid", &[db, rep_a]),
            a_lag: s.must("walfs_replication_lag_seconds", &[db, rep_a]),
            a_errors: s.must("walfs_upload_errors_total", &[rep_a]),
            b_txid: s.must("walfs_replica_txid", &[db, rep_b]),
            b_lag: s.must("walfs_replication_lag_seconds", &[db, rep_b]),
        });
    }
    let commits = writer.stop();
    let writes_done = outage.elapsed();

    let counted: Vec<&Sample> = samples.iter().filter(|s| s.at >= GRACE).collect();
    let worst = counted
        .iter()
        .copied()
        .max_by(|x, y| x.b_lag.total_cmp(&y.b_lag))
        .copied()
        .expect("samples taken");
    let last = *samples.last().unwrap();
    println!(
        "{fault:?} of replica A for {writes_done:.1?}: {commits} commits, {} samples of B after \
         the first {GRACE:?}; B's maximum lag {:.3} s (at {:.2?}); at the end: database TXID \
         {}, B TXID {} (lag {:.3} s), A TXID {} (lag {:.3} s, upload errors {} -> {})",
        counted.len(),
        worst.b_lag,
        worst.at,
        last.db_txid,
        last.b_txid,
        last.b_lag,
        last.a_txid,
        last.a_lag,
        errors_before,
        last.a_errors
    );
    let table: String = samples
        .iter()
        .map(|s| {
            format!(
                "  {:>6.2?}  db {:>4}  B {:>4} lag {:>6.3}  A {:>4} lag {:>6.3} errors {}\n",
                s.at, s.db_txid, s.b_txid, s.b_lag, s.a_txid, s.a_lag, s.a_errors
            )
        })
        .collect();
    println!("samples (since the fault):\n{table}");

    // B is not held back: its lag stays under 2 s at every sample...
    assert!(
        worst.b_lag < MAX_B_LAG,
        "replica B lagged {:.3} s at {:.2?} into A's {fault:?} (limit {MAX_B_LAG} s; \
         B TXID {} of {}): replica A's fault stalls replica B\nsamples:\n{table}",
        worst.b_lag,
        worst.at,
        worst.b_txid,
        worst.db_txid
    );
    // ...its TXID follows the database's...
    for s in &counted {
        let Some(before) = samples
            .iter()
            .rev()
            .find(|p| p.at + B_FOLLOWS_WITHIN <= s.at)
        else {
            continue;
        };
        assert!(
            s.b_txid >= before.db_txid,
            "at {:.2?}, replica B holds TXID {} but the database was at {} already at {:.2?}\n\
             samples:\n{table}",
            s.at,
            s.b_txid,
            before.db_txid,
            before.at
        );
    }
    let b_start = counted.first().unwrap().b_txid;
    assert!(
        last.b_txid > b_start,
        "replica B did not advance during the outage ({b_start} -> {})\nsamples:\n{table}",
        last.b_txid
    );
    // ...and it holds the last commit soon after the writes stop, A still failing.
    let b_done = wait_for(
        port,
        Duration::from_secs(2),
        "B holds the last commit while A fails",
        |s| {
            let (txid, _, b) = held(s);
            b == txid && s.get("walfs_replication_lag_seconds", &[db, rep_b]) == Some(0.0)
        },
    );
    // A is behind, and the longer the outage the more.
    let a_lag = b_done.must("walfs_replication_lag_seconds", &[db, rep_a]);
    let (txid, a_txid, _) = held(&b_done);
    assert!(a_lag >= MIN_A_LAG, "A lags only {a_lag} s:\n{b_done}");
    assert!(a_txid < txid, "A holds every commit:\n{b_done}");
    let a_errors = b_done.must("walfs_upload_errors_total", &[rep_a]);
    if errors {
        assert!(
            a_errors > errors_before,
            "A's upload errors did not rise ({errors_before} -> {a_errors}):\n{b_done}"
        );
    }
    assert_eq!(
        b_done.must("walfs_upload_errors_total", &[rep_b]),
        0.0,
        "{b_done}"
    );
    // `walfs status` says the same: A behind (with its error), B caught up.
    let behind = status(&m.mountpoint, &["--json", "--max-lag", "2s"]);
    assert_eq!(behind.status.code(), Some(1), "{behind:?}");
    let j = json(&behind);
    let (a, b) = (replica_status(&j, name_a), replica_status(&j, name_b));
    let db_txid = j["databases"][0]["txid"].as_u64().unwrap();
    assert!(a["lag_seconds"].as_f64().unwrap() >= MIN_A_LAG, "{j}");
    assert!(a["txid"].as_u64().unwrap() < db_txid, "{j}");
    if errors {
        assert!(a["last_error"].is_string(), "{j}");
    }
    assert_eq!(b["txid"].as_u64(), Some(db_txid), "{j}");
    assert_eq!(b["lag_seconds"].as_f64(), Some(0.0), "{j}");
    assert!(b["last_error"].is_null(), "{j}");
    println!(
        "walfs status during the outage: A {} (lag {} s, last_error {}), B {} (lag {} s), \
         database {db_txid}",
        a["txid"], a["lag_seconds"], a["last_error"], b["txid"], b["lag_seconds"]
    );

    // A heals: both catch up.
    heal.0.set(Fault::Pass);
    let healed = Instant::now();
    let caught_up = wait_for(port, CATCH_UP, "both replicas catch up", |s| {
        let (txid, a, b) = held(s);
        a == txid
            && b == txid
            && s.get("walfs_replication_lag_seconds", &[db, rep_a]) == Some(0.0)
            && s.get("walfs_replication_lag_seconds", &[db, rep_b]) == Some(0.0)
    });
    let (final_txid, ..) = held(&caught_up);
    println!(
        "both replicas at TXID {final_txid} {:.1?} after A healed",
        healed.elapsed()
    );
    let ok = status(&m.mountpoint, &["--json", "--max-lag", "2s"]);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert!(
        replica_status(&json(&ok), name_a)["last_error"].is_null(),
        "{ok:?}"
    );

    // A clean unmount; each replica alone restores the live database.
    drop(heal);
    m.stop();
    let live = m.backing_path("app.db");
    for (name, url) in [(name_a, r.moto.s3_url("a")), (name_b, r.moto.s3_url("b"))] {
        let out = r.out(&format!("{}.db", &name[name.len() - 1..]));
        let log = restore_from(&url, "app.db", &out);
        assert_same_database(&live, &out);
        println!(
            "restored from {name} at TXID {}",
            common::restored_txid(&log)
        );
    }
}

/// Replica A's connections are reset (an outage): B keeps up, A's errors rise.
#[test]
fn a_failing_replica_does_not_stall_the_other() {
    replica_b_keeps_up_while_a(Fault::Down, true);
}

/// Replica A takes requests and never answers: B keeps up.
#[test]
fn a_hanging_replica_does_not_stall_the_other() {
    replica_b_keeps_up_while_a(Fault::Hang, false);
}

/// An unmount while replica A hangs: the daemon exits within its flush bound (it does not
/// wait for A's hung requests), B holds every commit, and the line that says a replica is
/// behind names A. The next mount, with A healed, brings A up to date from staging.
#[test]
fn an_unmount_while_a_replica_hangs_ends_in_time_and_the_next_mount_catches_it_up() {
    let r = S3Fixture::new("a");
    let proxy = FaultProxy::start(r.moto.port);
    let url_a = r.moto.s3_url_via(proxy.port, "a");
    let url_b = r.moto.s3_url("b");
    let args = r.args_to(
        &url_a,
        &["--replica", &url_b, "--sync-interval", SYNC_INTERVAL],
    );
    let mut m = Mount::with_env(&as_strs(&args), S3_ENV);
    let heal = HealOnDrop(proxy.handle());
    let dbp = m.path("app.db");
    sqlite3(
        &dbp,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
         INSERT INTO t(v) VALUES (randomblob(5000));",
    );
    proxy.set(Fault::Hang);
    for i in 0..20 {
        sqlite3(
            &dbp,
            &format!("INSERT INTO t(v) VALUES (randomblob(2000) || 'hung {i}');"),
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopping = Instant::now();
    let log = m.stop();
    let took = stopping.elapsed();
    println!("unmount with A hanging took {took:.1?}");
    assert!(
        took < Duration::from_secs(14),
        "the unmount waited for the hanging replica: {took:?}\n{log}"
    );
    let behind = log
        .lines()
        .find(|l| l.contains("the replica is behind: staged transactions could not be uploaded"))
        .unwrap_or_else(|| panic!("no line says a replica is behind:\n{log}"));
    assert!(
        behind.contains("s3://walfs-test/a") && !behind.contains("s3://walfs-test/b"),
        "{behind}"
    );
    let live = m.backing_path("app.db");
    let out_b = r.out("b.db");
    restore_from(&url_b, "app.db", &out_b);
    assert_same_database(&live, &out_b);

    // Healed: the next mount uploads to A what staging kept for it, without a write.
    drop(heal);
    proxy.set(Fault::Pass);
    m.start(&as_strs(&args));
    let out_a = r.out("a.db");
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let _ = std::fs::remove_file(&out_a);
        let o = Command::new(WALFS)
            .args(["restore", &r.moto.s3_url("a"), "--db", "app.db", "-o"])
            .arg(&out_a)
            .envs(S3_ENV.iter().copied())
            .output()
            .unwrap();
        if o.status.success() && std::fs::read(&out_a).ok() == std::fs::read(&live).ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A did not catch up within {CATCH_UP:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    m.stop();
    assert_same_database(&live, &out_a);
}

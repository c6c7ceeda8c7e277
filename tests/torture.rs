//! The torture suite (issue 20): seeded, reproducible rounds of random SQLite workloads
//! on a real mount replicating to moto (through a fault-injecting proxy) or to a
//! `file://` directory, with faults, then the oracle on the restore.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fault_proxy::{Fault, FaultProxy};
use common::{assert_same_database, http, sqlite_view, Moto, Mount, Rng, Tmpfs, S3_ENV};

/// The proxy forwards, delays, answers 503, hangs until switched back, resets, and refuses
/// during an outage, counting every request.
#[test]
fn fault_proxy_injects_each_fault() {
    let moto = Moto::start();
    let p = FaultProxy::start(moto.port);
    assert_eq!(http(p.port, "GET", "/").unwrap().0, 200);
    p.set(Fault::Delay(Duration::from_millis(200)));
    let t = std::time::Instant::now();
    assert_eq!(http(p.port, "GET", "/").unwrap().0, 200);
    assert!(t.elapsed() >= Duration::from_millis(200));
    p.set(Fault::Status503);
    let (status, head, body) = http(p.port, "GET", "/").unwrap();
    assert_eq!(status, 503, "{head}");
    assert!(String::from_utf8_lossy(&body).contains("<Code>SlowDown</Code>"));
    p.set(Fault::Reset);
    assert!(
        http(p.port, "GET", "/").is_err(),
        "a reset request must fail"
    );
    p.set(Fault::Down);
    assert!(
        http(p.port, "GET", "/").is_err(),
        "a request during an outage must fail"
    );
    p.set(Fault::Hang);
    let port = p.port;
    let hung = std::thread::spawn(move || http(port, "GET", "/"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!hung.is_finished(), "a hung request must not be answered");
    p.set(Fault::Pass);
    assert!(
        hung.join().unwrap().is_err(),
        "switching to Pass breaks a hung request"
    );
    assert_eq!(http(p.port, "GET", "/").unwrap().0, 200);
    // Seven requests; the one during the outage was refused before its head was read.
    assert_eq!(p.requests(), 6);
}

// ---------------------------------------------------------------------------------------
// The writer process: this test binary run again with `WALFS_TW_*` set (see
// `spawn_writer`). It inserts rows (writer, seq) into `t`, and appends `a FIRST LAST` to its
// log only after the COMMIT of seqs FIRST..=LAST returned; every error it sees is logged as
// `E <epoch ms> <op>: <error>`, after which it reopens the database and goes on.
// ---------------------------------------------------------------------------------------

fn env_str(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"))
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn open_writer(db: &str, mode: &str, sync: &str) -> rusqlite::Result<rusqlite::Connection> {
    let c = rusqlite::Connection::open(db)?;
    c.busy_timeout(Duration::from_secs(30))?;
    let got: String = c.query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))?;
    if !got.eq_ignore_ascii_case(mode) {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode is {got}, not {mode}"
        )));
    }
    c.execute_batch(&format!("PRAGMA synchronous={sync}"))?;
    Ok(c)
}

/// Not a test: the body of a writer process (a no-op unless `WALFS_TW_DB` is set).
#[test]
fn torture_writer_process() {
    let Ok(db) = std::env::var("WALFS_TW_DB") else {
        return;
    };
    let id: i64 = env_str("WALFS_TW_ID").parse().unwrap();
    let mode = env_str("WALFS_TW_MODE");
    let sync = env_str("WALFS_TW_SYNC");
    let deadline: u64 = env_str("WALFS_TW_DEADLINE").parse().unwrap();
    let mut rng = Rng(env_str("WALFS_TW_SEED").parse().unwrap());
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env_str("WALFS_TW_LOG"))
        .unwrap();
    let wal = mode.eq_ignore_ascii_case("WAL");
    let mut seq: i64 = 0;
    let mut conn: Option<rusqlite::Connection> = None;
    while epoch_ms() < deadline {
        let c = match conn.take() {
            Some(c) => c,
            None => match open_writer(&db, &mode, &sync) {
                Ok(c) => c,
                Err(e) => {
                    log.write_all(format!("E {} open: {e}\n", epoch_ms()).as_bytes())
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        let roll = rng.below(1000);
        let (op, res): (&str, rusqlite::Result<Option<(i64, i64)>>) = if roll < 820 {
            let k = 1 + rng.below(4) as i64;
            let first = seq;
            seq += k;
            let sizes: Vec<i64> = (0..k)
                .map(|_| {
                    if rng.below(20) == 0 {
                        3000 + rng.below(6000) as i64
                    } else {
                        8 + rng.below(500) as i64
                    }
                })
                .collect();
            let junk = rng.below(3) == 0;
            let r = (|| {
                c.execute_batch("BEGIN IMMEDIATE")?;
                for (i, size) in sizes.iter().enumerate() {
                    c.execute(
                        "INSERT INTO t(w, seq, v) VALUES (?1, ?2, randomblob(?3))",
                        (id, first + i as i64, size),
                    )?;
                }
                if junk {
                    c.execute("INSERT INTO junk(v) VALUES (randomblob(700))", [])?;
                }
                c.execute_batch("COMMIT")?;
                Ok(Some((first, seq - 1)))
            })();
            ("commit", r)
        } else if roll < 900 {
            let m = 2 + rng.below(5);
            let r = c
                .execute(&format!("DELETE FROM junk WHERE id % {m} = 0"), [])
                .map(|_| None);
            ("delete junk", r)
        } else if roll < 980 && wal {
            let kind = ["PASSIVE", "RESTART", "TRUNCATE"][rng.below(3)];
            let r = c
                .query_row(&format!("PRAGMA wal_checkpoint({kind})"), [], |_| Ok(()))
                .map(|_| None);
            ("checkpoint", r)
        } else if roll < 990 && (wal || roll >= 980) {
            let sql = if !wal && rng.below(2) == 0 {
                format!("PRAGMA page_size={}; VACUUM;", 512usize << rng.below(8))
            } else {
                "VACUUM;".to_string()
            };
            ("vacuum", c.execute_batch(&sql).map(|_| None))
        } else {
            let r = c
                .query_row("SELECT count(*) FROM t WHERE w = ?1", [id], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|_| None);
            ("read", r)
        };
        match res {
            Ok(Some((a, b))) => {
                log.write_all(format!("a {a} {b}\n").as_bytes()).unwrap();
                conn = Some(c);
            }
            Ok(None) => conn = Some(c),
            Err(e) => {
                let line = format!(
                    "E {} {op}: {}\n",
                    epoch_ms(),
                    e.to_string().replace('\n', " ")
                );
                log.write_all(line.as_bytes()).unwrap();
                drop(c);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(6) as u64));
    }
}

// ---------------------------------------------------------------------------------------
// The rounds.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    KillWalfs,
    KillWriter,
    S3_503,
    S3Hang,
    S3Reset,
    S3Outage,
    FullStaging,
    FullBacking,
    GarbageWal,
}

const KINDS: [(Kind, &str); 9] = [
    (Kind::KillWalfs, "kill_walfs"),
    (Kind::KillWriter, "kill_writer"),
    (Kind::S3_503, "s3_503"),
    (Kind::S3Hang, "s3_hang"),
    (Kind::S3Reset, "s3_reset"),
    (Kind::S3Outage, "s3_outage"),
    (Kind::FullStaging, "full_staging"),
    (Kind::FullBacking, "full_backing"),
    (Kind::GarbageWal, "garbage_wal"),
];

#[derive(Debug)]
struct DbPlan {
    name: String,
    mode: &'static str,
    sync: &'static str,
    page_size: usize,
    writers: usize,
}

/// A period in which writers may see errors: `allowed` substrings (any error if empty),
/// limited to the writers of database `db` if given.
struct Window {
    start: u64,
    end: u64,
    allowed: &'static [&'static str],
    db: Option<String>,
}

struct Writer {
    child: Child,
    db: usize,
    log: PathBuf,
}

#[derive(Default)]
struct Totals {
    rounds: usize,
    faults: BTreeMap<&'static str, usize>,
    commits_checked: usize,
    rows_checked: usize,
    /// Rounds with `--sync-replication`, and the acknowledged commits they checked in the
    /// replica after `kill -9` and the loss of staging (RPO 0).
    sync_rounds: usize,
    sync_commits_checked: usize,
    losses: usize,
    /// Acknowledged rows that SQLite itself no longer holds (hostile `-wal` writes only).
    sqlite_lost: usize,
    /// Databases that SQLite itself reads as corrupt after hostile `-wal` writes.
    sqlite_corrupt: usize,
    expected_errors: usize,
    unexpected_errors: Vec<String>,
    failures: Vec<String>,
}

/// Where one round keeps its files, and its replica's URL: through the fault proxy for the
/// mount, straight to moto for the restores (or one `file://` directory for both).
struct RoundDirs {
    dir: PathBuf,
    logs: PathBuf,
    staging: PathBuf,
    out: PathBuf,
    mount_url: String,
    url: String,
}

impl Suite {
    /// Creates round `name`'s directories, with an S3 replica if `s3`.
    fn round_dirs(&self, name: &str, s3: bool) -> RoundDirs {
        let rdir = self.dir.path().join(name);
        let (logs, staging, out) = (rdir.join("logs"), rdir.join("staging"), rdir.join("out"));
        for d in [&logs, &staging, &out] {
            std::fs::create_dir_all(d).unwrap();
        }
        let prefix = format!("torture/{name}");
        let (mount_url, url) = if s3 {
            (
                self.moto.s3_url_via(self.proxy.port, &prefix),
                self.moto.s3_url(&prefix),
            )
        } else {
            let u = format!("file://{}", rdir.join("replica").display());
            (u.clone(), u)
        };
        RoundDirs {
            dir: rdir,
            logs,
            staging,
            out,
            mount_url,
            url,
        }
    }
}

struct Suite {
    moto: Moto,
    proxy: FaultProxy,
    long: bool,
    dir: tempfile::TempDir,
    writer_ids: i64,
}

fn spawn_writer(
    suite: &mut Suite,
    db: &DbPlan,
    idx: usize,
    m: &Mount,
    logs: &Path,
    deadline: u64,
    rng: &mut Rng,
) -> Writer {
    suite.writer_ids += 1;
    let id = suite.writer_ids;
    let log = logs.join(format!("w{id}.log"));
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "torture_writer_process",
            "--nocapture",
            "--quiet",
        ])
        .env("WALFS_TW_DB", m.path(&db.name))
        .env("WALFS_TW_ID", id.to_string())
        .env("WALFS_TW_MODE", db.mode)
        .env("WALFS_TW_SYNC", db.sync)
        .env("WALFS_TW_DEADLINE", deadline.to_string())
        .env("WALFS_TW_SEED", rng.next().to_string())
        .env("WALFS_TW_LOG", &log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn a writer process");
    Writer {
        child,
        db: idx,
        log,
    }
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Fills the filesystem holding `dir` with a file until it is full; returns the file.
/// Creates each planned database through the mount, in its page size and journal mode.
fn create_databases(m: &Mount, dbs: &[DbPlan]) {
    for d in dbs {
        let c = rusqlite::Connection::open(m.path(&d.name)).unwrap();
        c.execute_batch(&format!(
            "PRAGMA page_size={}; PRAGMA journal_mode={}; \
             CREATE TABLE t(w INTEGER, seq INTEGER, v BLOB, PRIMARY KEY(w, seq)); \
             CREATE TABLE junk(id INTEGER PRIMARY KEY, v BLOB);",
            d.page_size, d.mode
        ))
        .unwrap();
    }
}

fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("torture-filler");
    let mut out = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    while out.write_all(&chunk).is_ok() {}
    let small = [0x5au8; 512];
    while out.write_all(&small).is_ok() {}
    filler
}

/// The (writer, seq) rows of table `t` of database file `path`.
fn rows(path: &Path) -> rusqlite::Result<HashSet<(i64, i64)>> {
    let c =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut st = c.prepare("SELECT w, seq FROM t")?;
    let out = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<HashSet<_>>>();
    out
}

fn integrity_ok(path: &Path) -> bool {
    let out = common::run_sqlite3(path, "PRAGMA integrity_check;");
    out.status.success() && out.stdout == b"ok\n"
}

/// Restores `db` from `url` until the file equals `expected`, for up to `limit`; `Err` with
/// the last restore log if it never does. `corrupt`: `expected` itself fails
/// `integrity_check` (a hostile write reached the database), so the restore is written
/// despite the check (`--no-integrity-check`), and must equal it all the same.
fn catch_up(
    url: &str,
    db: &str,
    expected: &Path,
    out: &Path,
    limit: Duration,
    corrupt: bool,
) -> Result<(), String> {
    let want = std::fs::read(expected).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        let _ = std::fs::remove_file(out);
        let o = Command::new(common::WALFS)
            .args(["restore", url, "--db", db, "-o"])
            .arg(out)
            .args(corrupt.then_some("--no-integrity-check"))
            .envs(S3_ENV.iter().copied())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        if o.status.success() && std::fs::read(out).map(|b| b == want).unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(log);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
    xs[rng.below(xs.len())]
}

fn run_round(suite: &mut Suite, n: usize, round_seed: u64, totals: &mut Totals) {
    let mut rng = Rng(round_seed);
    let s3 = rng.below(10) < 7;
    let dbs: Vec<DbPlan> = (0..1 + rng.below(3))
        .map(|i| DbPlan {
            name: if i == 2 {
                format!("sub/db{i}.db")
            } else {
                format!("db{i}.db")
            },
            mode: pick(&mut rng, &["WAL", "WAL", "DELETE", "TRUNCATE", "PERSIST"]),
            sync: pick(&mut rng, &["NORMAL", "FULL"]),
            page_size: 512 << rng.below(8),
            writers: 1 + rng.below(3),
        })
        .collect();
    // One round in four (by its seed) turns its first database to MEMORY or OFF, the
    // journal modes in which SQLite itself cannot roll back a transaction that a killed
    // process or a failed write interrupts: those rounds take no kill and no full backing
    // disk, whose damage would be SQLite's, not the replica's.
    let mut dbs = dbs;
    let mut journalless = Rng(round_seed ^ 0x6e6f_6a72_6e6c);
    if journalless.below(4) == 0 {
        dbs[0].mode = pick(&mut journalless, &["MEMORY", "OFF"]);
    }
    let any_wal = dbs.iter().any(|d| d.mode == "WAL");
    let no_rollback = dbs.iter().any(|d| matches!(d.mode, "MEMORY" | "OFF"));
    let mut kinds: Vec<Kind> = if no_rollback {
        vec![Kind::FullStaging]
    } else {
        vec![
            Kind::KillWalfs,
            Kind::KillWriter,
            Kind::FullStaging,
            Kind::FullBacking,
        ]
    };
    if s3 {
        kinds.extend([Kind::S3_503, Kind::S3Hang, Kind::S3Reset, Kind::S3Outage]);
    }
    if any_wal {
        kinds.push(Kind::GarbageWal);
    }
    let mut faults: Vec<Kind> = (0..1 + rng.below(3))
        .map(|_| pick(&mut rng, &kinds))
        .collect();
    let outage = if suite.long {
        Duration::from_secs(60)
    } else {
        Duration::from_millis(2000 + rng.below(3000) as u64)
    };
    let mut secs = 5 + rng.below(6) as u64;
    if suite.long {
        secs += 10 + rng.below(20) as u64;
    }
    if faults.contains(&Kind::S3Outage) {
        secs += outage.as_secs();
    }
    // Fault times, in ms after the writers start, in order.
    let mut times: Vec<u64> = faults
        .iter()
        .map(|_| 500 + rng.below((secs * 1000 - 2500) as usize) as u64)
        .collect();
    times.sort();
    let sync_interval = pick(&mut rng, &["100ms", "500ms", "1s"]);
    eprintln!(
        "torture round {n}: round seed {round_seed}, {} replica, sync interval {sync_interval}, \
         {secs} s, faults {faults:?} at {times:?} ms, databases {dbs:?}",
        if s3 { "s3" } else { "file" }
    );

    let RoundDirs {
        dir: rdir,
        logs,
        staging,
        out,
        mount_url,
        url,
    } = suite.round_dirs(&format!("r{n}"), s3);
    // Big enough that mostly the FullStaging fault fills staging (a full staging disk
    // fails no operation of the application in any case). Staging holds what waits
    // for upload and the local copies of what was uploaded (for compaction, kept for
    // --l0-retention): writers at full speed fill 64 MiB in 9 s (VACUUMs that change the
    // page size stage snapshots), and 512 MiB in about 30 s of a long round.
    let staging_tmpfs = Tmpfs::mount(&staging, if suite.long { "3g" } else { "512m" });
    let mut m = Mount::prepare(S3_ENV);
    // Long rounds write for up to 80 s: their databases and WALs outgrow 256 MiB, and an
    // unplanned full backing disk is not the round's fault (FullBacking fills it on purpose).
    let backing_tmpfs = Tmpfs::mount(&m.backing, if suite.long { "2g" } else { "256m" });
    let args: Vec<String> = vec![
        "--replica".into(),
        mount_url,
        "--staging-dir".into(),
        staging.display().to_string(),
        "--sync-interval".into(),
        sync_interval.into(),
    ];
    let args = common::as_strs(&args);
    m.start(&args);
    std::fs::create_dir_all(m.path("sub")).unwrap();
    create_databases(&m, &dbs);

    let start = Instant::now();
    let deadline = epoch_ms() + secs * 1000;
    let mut writers: Vec<Writer> = Vec::new();
    for (i, d) in dbs.iter().enumerate() {
        for _ in 0..d.writers {
            writers.push(spawn_writer(suite, d, i, &m, &logs, deadline, &mut rng));
        }
    }
    let mut windows: Vec<Window> = Vec::new();
    let mut garbage: HashSet<usize> = HashSet::new();
    let mut done: Vec<Kind> = Vec::new();
    for (&kind, &at) in faults.iter().zip(&times) {
        if let Some(wait) = Duration::from_millis(at).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let t0 = epoch_ms();
        let hold = Duration::from_millis(800 + rng.below(2200) as u64);
        match kind {
            Kind::KillWalfs => {
                m.kill9();
                for w in writers.iter_mut() {
                    kill9(&mut w.child);
                }
                std::thread::sleep(Duration::from_millis(rng.below(300) as u64));
                m.start(&args);
                windows.push(Window {
                    start: t0,
                    end: epoch_ms() + 500,
                    allowed: &[],
                    db: None,
                });
                let old: Vec<usize> = writers.iter().map(|w| w.db).collect();
                for i in old {
                    let w = spawn_writer(suite, &dbs[i], i, &m, &logs, deadline, &mut rng);
                    writers.push(w);
                }
            }
            Kind::KillWriter => {
                let live: Vec<usize> = (0..writers.len())
                    .filter(|&i| writers[i].child.try_wait().unwrap().is_none())
                    .collect();
                if live.is_empty() {
                    continue;
                }
                let i = pick(&mut rng, &live);
                kill9(&mut writers[i].child);
                let db = writers[i].db;
                let w = spawn_writer(suite, &dbs[db], db, &m, &logs, deadline, &mut rng);
                writers.push(w);
            }
            Kind::S3_503 | Kind::S3Hang | Kind::S3Reset | Kind::S3Outage => {
                let (fault, hold) = match kind {
                    Kind::S3_503 => (Fault::Status503, hold),
                    Kind::S3Hang => (Fault::Hang, hold),
                    Kind::S3Reset => (Fault::Reset, hold),
                    _ => (Fault::Down, outage),
                };
                suite.proxy.set(fault);
                std::thread::sleep(hold);
                suite.proxy.set(Fault::Pass);
            }
            Kind::FullStaging | Kind::FullBacking => {
                let dir = if kind == Kind::FullStaging {
                    &staging
                } else {
                    &m.backing
                };
                let filler = fill(dir);
                std::thread::sleep(hold);
                std::fs::remove_file(&filler).unwrap();
                // A full staging disk fails no operation of the application (its
                // database's history restarts from a snapshot instead); a full backing disk
                // fails what SQLite itself fails.
                if kind == Kind::FullBacking {
                    windows.push(Window {
                        start: t0,
                        end: epoch_ms() + 1000,
                        allowed: &["database or disk is full", "disk I/O error"],
                        db: None,
                    });
                }
            }
            Kind::GarbageWal => {
                let wal_dbs: Vec<usize> =
                    (0..dbs.len()).filter(|&i| dbs[i].mode == "WAL").collect();
                let i = pick(&mut rng, &wal_dbs);
                let wal = m.path(&format!("{}-wal", dbs[i].name));
                let len = std::fs::metadata(&wal).map(|md| md.len()).unwrap_or(0);
                if len == 0 {
                    continue;
                }
                // Inside the log (over committed frames), or past its end.
                let offset = if rng.below(4) == 0 {
                    len + rng.below(4096) as u64
                } else {
                    rng.below(len as usize) as u64
                };
                let bytes: Vec<u8> = (0..1 + rng.below(300)).map(|_| rng.next() as u8).collect();
                let src = rdir.join("garbage");
                std::fs::write(&src, &bytes).unwrap();
                let st = Command::new("dd")
                    .arg(format!("if={}", src.display()))
                    .arg(format!("of={}", wal.display()))
                    .args(["bs=1", "conv=notrunc", "status=none"])
                    .arg(format!("seek={offset}"))
                    .status()
                    .unwrap();
                assert!(st.success(), "dd into {} failed", wal.display());
                eprintln!(
                    "torture round {n}: {} garbage bytes written at {offset} into {} ({len} bytes)",
                    bytes.len(),
                    wal.display()
                );
                garbage.insert(i);
                windows.push(Window {
                    start: t0,
                    end: u64::MAX,
                    allowed: &[],
                    db: Some(dbs[i].name.clone()),
                });
            }
        }
        done.push(kind);
    }
    faults = done;
    // The writers stop at the deadline.
    let limit = Instant::now() + Duration::from_secs(secs + 90);
    for w in writers.iter_mut() {
        loop {
            if w.child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > limit {
                kill9(&mut w.child);
                totals
                    .failures
                    .push(format!("round {n}: a writer of {} hung", dbs[w.db].name));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    suite.proxy.set(Fault::Pass);

    // Capture catches up, then a clean stop.
    let probe = rdir.join("probe");
    // After the last fault, uploads resume within their backoff (at most about twice the
    // fault's length): every database's replica must equal it within this, all together.
    let catch_limit = Duration::from_secs(if suite.long { 150 } else { 45 });
    let catch_deadline = Instant::now() + catch_limit;
    for (i, d) in dbs.iter().enumerate() {
        let Some(view) = sqlite_view(&m.backing_path(&d.name), &probe) else {
            totals
                .failures
                .push(format!("round {n}: {} holds no database", d.name));
            continue;
        };
        // Garbage that SQLite's checkpoint copied into the database file corrupts the
        // database itself; its replica must then hold the same corrupt pages.
        let corrupt = garbage.contains(&i) && !integrity_ok(&view);
        let left = catch_deadline.saturating_duration_since(Instant::now());
        if let Err(log) = catch_up(
            &url,
            &d.name,
            &view,
            &out.join("catch-up.db"),
            left,
            corrupt,
        ) {
            totals.failures.push(format!(
                "round {n}: the replica of {} did not catch up within {catch_limit:?}: {log}\n\
                 daemon log:\n{}",
                d.name,
                m.log()
            ));
        }
    }
    let log = m.stop();
    if log.contains("panicked") {
        totals
            .failures
            .push(format!("round {n}: walfs panicked: {log}"));
    }

    // The oracle.
    let mut acked_total = 0;
    for (i, d) in dbs.iter().enumerate() {
        let Some(live) = sqlite_view(&m.backing_path(&d.name), &rdir.join(format!("live{i}")))
        else {
            continue;
        };
        let live_ok = integrity_ok(&live);
        let restored = out.join(format!("restored{i}.db"));
        let o = Command::new(common::WALFS)
            .args(["restore", &url, "--db", &d.name, "-o"])
            .arg(&restored)
            .args((!live_ok).then_some("--no-integrity-check"))
            .envs(S3_ENV.iter().copied())
            .output()
            .unwrap();
        let rlog = String::from_utf8_lossy(&o.stderr).into_owned();
        if !o.status.success() || !rlog.contains("content checksum matches the writer's record") {
            totals.failures.push(format!(
                "round {n}: restore of {} failed or was not verified: {rlog}",
                d.name
            ));
            continue;
        }
        if live_ok {
            // A difference is recorded (with the daemon's log), so that the round's other
            // findings are reported too.
            let same = std::panic::catch_unwind(|| assert_same_database(&live, &restored));
            if let Err(e) = same {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_default()
                    .chars()
                    .take(1500)
                    .collect::<String>();
                let log = m.log();
                totals.failures.push(format!(
                    "round {n} (round seed {round_seed}): the restore of {} after a clean stop \
                     differs from the live database: {msg}\ndaemon log (tail):\n{}",
                    d.name,
                    &log[log.len().saturating_sub(4000)..]
                ));
            }
        } else {
            assert!(
                garbage.contains(&i),
                "round {n}: the live {} is corrupt without hostile writes",
                d.name
            );
            totals.sqlite_corrupt += 1;
            assert!(
                std::fs::read(&live).unwrap() == std::fs::read(&restored).unwrap(),
                "round {n}: the restore of {} differs from the live database",
                d.name
            );
        }
        let live_rows = rows(&live);
        let restored_rows = rows(&restored);
        for w in writers.iter().filter(|w| w.db == i) {
            let text = std::fs::read_to_string(&w.log).unwrap_or_default();
            let id: i64 = w
                .log
                .file_stem()
                .unwrap()
                .to_str()
                .unwrap()
                .trim_start_matches('w')
                .parse()
                .unwrap();
            for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
                let line = line.trim_end();
                if let Some(rest) = line.strip_prefix("a ") {
                    let (a, b) = rest.split_once(' ').unwrap();
                    let (a, b): (i64, i64) = (a.parse().unwrap(), b.parse().unwrap());
                    totals.commits_checked += 1;
                    acked_total += 1;
                    for seq in a..=b {
                        totals.rows_checked += 1;
                        let in_live = live_rows.as_ref().map(|r| r.contains(&(id, seq)));
                        let in_restored = restored_rows.as_ref().map(|r| r.contains(&(id, seq)));
                        match (in_live, in_restored) {
                            (Ok(true), Ok(true)) => {}
                            (Ok(true), _) => {
                                totals.losses += 1;
                                totals.failures.push(format!(
                                    "round {n}: {} row ({id}, {seq}) is live but not in the restore",
                                    d.name
                                ));
                            }
                            _ if garbage.contains(&i) => totals.sqlite_lost += 1,
                            _ => {
                                totals.losses += 1;
                                totals.failures.push(format!(
                                    "round {n}: {} lost acknowledged row ({id}, {seq}) on the live \
                                     database (no hostile write)",
                                    d.name
                                ));
                            }
                        }
                    }
                } else if let Some(rest) = line.strip_prefix("E ") {
                    let (ms, msg) = rest.split_once(' ').unwrap();
                    let ms: u64 = ms.parse().unwrap();
                    let expected = windows.iter().any(|win| {
                        ms >= win.start
                            && ms <= win.end
                            && win.db.as_ref().is_none_or(|x| *x == d.name)
                            && (win.allowed.is_empty()
                                || win.allowed.iter().any(|a| msg.contains(a)))
                    });
                    if expected {
                        totals.expected_errors += 1;
                    } else {
                        totals
                            .unexpected_errors
                            .push(format!("round {n}: writer {id} of {}: {msg}", d.name));
                    }
                }
            }
        }
    }
    for k in &faults {
        let name = KINDS.iter().find(|(x, _)| x == k).unwrap().1;
        *totals.faults.entry(name).or_default() += 1;
    }
    totals.rounds += 1;
    eprintln!(
        "torture round {n}: done in {:.1} s, {acked_total} acknowledged commits checked",
        start.elapsed().as_secs_f64()
    );
    drop(m);
    drop(backing_tmpfs);
    drop(staging_tmpfs);
}

fn env_num(k: &str) -> Option<f64> {
    std::env::var(k).ok().and_then(|s| s.parse().ok())
}

/// Seeded rounds of random workloads and faults; every acknowledged commit must be in the
/// restore, which must equal the live database. `WALFS_TORTURE_SEED`,
/// `WALFS_TORTURE_MINUTES` (default 3.5; 10 or more is the long mode, with 60 s outages),
/// `WALFS_TORTURE_ROUNDS` (a fixed number of rounds instead), `WALFS_TORTURE_ROUND_SEED`
/// (replays the round of that seed, as printed, in every round).
#[test]
fn torture() {
    let seed: u64 = env_num("WALFS_TORTURE_SEED")
        .map(|s| s as u64)
        .unwrap_or(20);
    let seed = std::env::var("WALFS_TORTURE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(seed);
    let minutes = env_num("WALFS_TORTURE_MINUTES").unwrap_or(3.5);
    let rounds = env_num("WALFS_TORTURE_ROUNDS").map(|r| r as usize);
    let long = minutes >= 10.0;
    eprintln!(
        "torture: seed={seed} minutes={minutes} rounds={rounds:?} long={long} \
         (replay with WALFS_TORTURE_SEED={seed})"
    );
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port);
    let mut suite = Suite {
        moto,
        proxy,
        long,
        dir: tempfile::Builder::new()
            .prefix("walfs-torture-")
            .tempdir()
            .unwrap(),
        writer_ids: 0,
    };
    let mut master = Rng(seed);
    let mut totals = Totals::default();
    let start = Instant::now();
    let budget = Duration::from_secs_f64(minutes * 60.0);
    // A round takes about 20 s (up to 90 s in the long mode): none starts after that much
    // of the budget is left.
    let reserve = Duration::from_secs(if long { 90 } else { 20 });
    for n in 0.. {
        match rounds {
            Some(r) if n >= r => break,
            None if start.elapsed() + reserve > budget && n > 0 => break,
            _ => {}
        }
        let mut round_seed = master.next();
        if let Some(r) = env_num("WALFS_TORTURE_ROUND_SEED") {
            round_seed = std::env::var("WALFS_TORTURE_ROUND_SEED")
                .unwrap()
                .parse()
                .unwrap_or(r as u64);
        }
        // One round in four (by its seed) replicates synchronously: RPO 0 under kill -9,
        // the loss of staging and S3 faults.
        if Rng(round_seed ^ 0x5eed_5eed).below(4) == 0 {
            let (checked, fault) = sync_replication_round(&mut suite, n, round_seed);
            totals.rounds += 1;
            totals.sync_rounds += 1;
            totals.sync_commits_checked += checked;
            totals.commits_checked += checked;
            *totals.faults.entry("kill_walfs").or_default() += 1;
            if let Some(k) = fault {
                *totals.faults.entry(k).or_default() += 1;
            }
        } else {
            run_round(&mut suite, n, round_seed, &mut totals);
        }
    }
    let faults = KINDS
        .iter()
        .map(|(_, k)| format!("{k}:{}", totals.faults.get(k).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!(
        "torture: seed={seed} rounds={} faults={{{faults}}} commits_checked={} rows_checked={} \
         sync_rounds={} sync_commits_checked={} sqlite_lost={} sqlite_corrupt={} \
         expected_errors={} unexpected_errors={} losses={} wall={:.0}s",
        totals.rounds,
        totals.commits_checked,
        totals.rows_checked,
        totals.sync_rounds,
        totals.sync_commits_checked,
        totals.sqlite_lost,
        totals.sqlite_corrupt,
        totals.expected_errors,
        totals.unexpected_errors.len(),
        totals.losses,
        start.elapsed().as_secs_f64()
    );
    assert!(
        totals.failures.is_empty() && totals.unexpected_errors.is_empty(),
        "torture seed {seed}: {} failures:\n{}\nwriters saw {} errors outside the faults that \
         allow them:\n{}",
        totals.failures.len(),
        totals.failures.join("\n"),
        totals.unexpected_errors.len(),
        totals.unexpected_errors.join("\n")
    );
    assert_eq!(
        totals.losses, 0,
        "torture seed {seed}: acknowledged commits lost"
    );
    assert!(totals.commits_checked > 0, "no commit was checked");
}

/// The acknowledged commits `(first, last)` in a writer's log (complete lines only).
fn acked(log: &Path) -> Vec<(i64, i64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("a "))
        .map(|rest| {
            let (a, b) = rest.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect()
}

/// The synchronous-replication variant (RPO 0): writers commit with `synchronous=FULL` on a
/// mount with `--sync-replication --sync-timeout-action eio`; on an S3 replica, a window of
/// 503s, resets or a hang may come first (a commit that outlasts `--sync-timeout` then
/// fails, and is not acknowledged); walfs is killed with `kill -9` at a random moment and
/// its staging directory deleted; a restore straight from the replica must then hold every
/// acknowledged commit, and pass `integrity_check`. Returns the commits checked and the
/// S3 fault injected, if any.
fn sync_replication_round(
    suite: &mut Suite,
    n: usize,
    round_seed: u64,
) -> (usize, Option<&'static str>) {
    let mut rng = Rng(round_seed);
    let s3 = rng.below(10) < 7;
    let dbs: Vec<DbPlan> = (0..1 + rng.below(3))
        .map(|i| DbPlan {
            name: format!("db{i}.db"),
            mode: pick(&mut rng, &["WAL", "DELETE", "TRUNCATE", "PERSIST"]),
            sync: "FULL",
            page_size: 512 << rng.below(8),
            writers: 1 + rng.below(3),
        })
        .collect();
    let kill_at = Duration::from_millis(1000 + rng.below(4000) as u64);
    // An S3 fault window inside the writes, before the kill.
    let fault = (s3 && rng.below(3) > 0).then(|| {
        let (kind, fault) = pick(
            &mut rng,
            &[
                ("s3_503", Fault::Status503),
                ("s3_reset", Fault::Reset),
                ("s3_hang", Fault::Hang),
            ],
        );
        let at = Duration::from_millis(rng.below(kill_at.as_millis() as usize / 2) as u64);
        let for_ = Duration::from_millis(200 + rng.below(3000) as u64);
        (kind, fault, at, for_)
    });
    eprintln!(
        "torture sync round {n}: round seed {round_seed}, {} replica, kill -9 at {kill_at:?}, \
         fault {:?}, databases {dbs:?}",
        if s3 { "s3" } else { "file" },
        fault.as_ref().map(|(k, _, at, d)| (k, at, d))
    );
    let RoundDirs {
        logs,
        staging,
        out,
        mount_url,
        url,
        ..
    } = suite.round_dirs(&format!("sync{n}"), s3);
    let args: Vec<String> = vec![
        "--replica".into(),
        mount_url,
        "--staging-dir".into(),
        staging.display().to_string(),
        "--sync-replication".into(),
        "--sync-timeout".into(),
        "2s".into(),
        "--sync-timeout-action".into(),
        "eio".into(),
    ];
    let mut m = Mount::with_env(&common::as_strs(&args), S3_ENV);
    create_databases(&m, &dbs);
    let deadline = epoch_ms() + 60_000;
    let mut writers: Vec<Writer> = Vec::new();
    for (i, d) in dbs.iter().enumerate() {
        for _ in 0..d.writers {
            writers.push(spawn_writer(suite, d, i, &m, &logs, deadline, &mut rng));
        }
    }
    let injector = fault.as_ref().map(|(_, f, at, for_)| {
        let (handle, f, at, for_) = (suite.proxy.handle(), *f, *at, *for_);
        std::thread::spawn(move || {
            std::thread::sleep(at);
            handle.set(f);
            std::thread::sleep(for_);
            handle.set(Fault::Pass);
        })
    });
    std::thread::sleep(kill_at);
    m.kill9();
    for w in writers.iter_mut() {
        kill9(&mut w.child);
    }
    if let Some(t) = injector {
        t.join().unwrap();
    }
    std::fs::remove_dir_all(&staging).unwrap();
    let mut checked = 0;
    for (i, d) in dbs.iter().enumerate() {
        let restored = out.join(format!("restored{i}.db"));
        let o = Command::new(common::WALFS)
            .args(["restore", &url, "--db", &d.name, "-o"])
            .arg(&restored)
            .envs(S3_ENV.iter().copied())
            .output()
            .unwrap();
        let rlog = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success(),
            "sync round {n}: restore of {} failed: {rlog}",
            d.name
        );
        assert!(
            integrity_ok(&restored),
            "sync round {n}: {} is corrupt",
            d.name
        );
        let have = rows(&restored).unwrap();
        for w in writers.iter().filter(|w| w.db == i) {
            let id: i64 = w.log.file_stem().unwrap().to_str().unwrap()[1..]
                .parse()
                .unwrap();
            for (a, b) in acked(&w.log) {
                checked += 1;
                for seq in a..=b {
                    assert!(
                        have.contains(&(id, seq)),
                        "sync round {n} (round seed {round_seed}): acknowledged row ({id}, {seq}) \
                         of {} is not in the replica after kill -9 and the loss of staging",
                        d.name
                    );
                }
            }
        }
    }
    drop(m);
    (checked, fault.map(|(k, ..)| k))
}

/// RPO 0 with `--sync-replication`: see [`sync_replication_round`].
#[test]
fn torture_sync_replication() {
    let seed: u64 = std::env::var("WALFS_TORTURE_SEED")
        .ok()
        .map(|s| s.parse().expect("WALFS_TORTURE_SEED is a number"))
        .unwrap_or(20);
    let rounds = env_num("WALFS_TORTURE_ROUNDS").map_or(4, |r| r as usize);
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port);
    let mut suite = Suite {
        moto,
        proxy,
        long: false,
        dir: tempfile::Builder::new()
            .prefix("walfs-torture-")
            .tempdir()
            .unwrap(),
        writer_ids: 0,
    };
    let mut master = Rng(seed);
    let mut checked = 0;
    for n in 0..rounds {
        checked += sync_replication_round(&mut suite, n, master.next()).0;
    }
    eprintln!("torture sync: seed={seed} rounds={rounds} commits_checked={checked} losses=0");
    assert!(checked > 0, "no commit was checked");
}

//! walfs-bench: the workload driver used by `scripts/bench`.
//!
//! This file owns the benchmark workloads only; it knows nothing about
//! walfs itself. Every subcommand operates on a plain directory (`--dir`),
//! which `scripts/bench` points at a native directory, a walfs mount, a
//! bindfs mount, ... so the same workload can be compared across targets.
//! Each subcommand prints exactly one line of JSON on stdout.
//!
//! Subcommands:
//! - `write`: small SQLite write transactions (one INSERT of a random key and
//!   a ~100-byte blob per transaction) for a fixed time, with a chosen
//!   journal mode and synchronous level; starts from an empty database.
//! - `prepare-read`: builds `read.db` (page_size 4096) of roughly `--mib` MiB.
//! - `read`: random point lookups by rowid on `read.db` with a tiny SQLite
//!   cache and mmap disabled, so every lookup goes to the filesystem
//!   (served from the OS page cache after a warm-up pass).
//! - `seq`: sequential 1 MiB writes + fsync of a large file, then a cold
//!   sequential read after dropping the page cache (writes `1` to
//!   `/proc/sys/vm/drop_caches`, falling back to `posix_fadvise(DONTNEED)`
//!   when that is not permitted; the JSON says which was used).
//!
//! For the replication benchmark (a replicator such as `walfs mount --replica` or
//! `litestream replicate` watches the database), the database is created first with
//! `init` so the replicator can attach to it before the timed part starts:
//! - `init`: a fresh database in WAL mode with the schema of `write`, `lag-write` or
//!   `burst`; `write --existing` then writes into it instead of recreating it.
//! - `lag-write`: paced commits (`--rate` per second for `--seconds`; a writer that falls
//!   behind stops at the end of the time), each row holding its sequence number; the
//!   wall-clock time at which each COMMIT returned is written to `--times` as
//!   `seq,unix_ns` lines, so the caller can match commits with replica objects.
//! - `burst`: writes `--mib` MiB as fast as possible in transactions of `--tx-kib` KiB
//!   and reports the size of the `-wal` file right after the last commit (connection
//!   still open) and the largest size seen after any commit.
//! - `prepare-restore`: builds a database of about `--mib` MiB of random blobs in WAL
//!   mode (the source of the restore-time benchmark).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rusqlite::{params, Connection, OpenFlags};

#[derive(Parser)]
#[command(
    name = "walfs-bench",
    about = "SQLite and file I/O workloads for benchmarking walfs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Journal {
    Wal,
    Delete,
    Truncate,
    Persist,
}

impl Journal {
    fn pragma(self) -> &'static str {
        match self {
            Journal::Wal => "WAL",
            Journal::Delete => "DELETE",
            Journal::Truncate => "TRUNCATE",
            Journal::Persist => "PERSIST",
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Schema {
    /// `t(id, k, v)` with an index on k (the `write` workload).
    Write,
    /// `lag(seq, v)` (the `lag-write` workload).
    Lag,
    /// `b(id, v)` (the `burst` workload).
    Burst,
}

impl Schema {
    fn sql(self) -> &'static str {
        match self {
            Schema::Write => WRITE_SCHEMA,
            Schema::Lag => "CREATE TABLE lag(seq INTEGER PRIMARY KEY, v BLOB);",
            Schema::Burst => "CREATE TABLE b(id INTEGER PRIMARY KEY, v BLOB);",
        }
    }
}

const WRITE_SCHEMA: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v BLOB);
     CREATE INDEX t_k ON t(k);";

#[derive(Clone, Copy, ValueEnum)]
enum Sync {
    Normal,
    Full,
}

impl Sync {
    fn pragma(self) -> &'static str {
        match self {
            Sync::Normal => "NORMAL",
            Sync::Full => "FULL",
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Small write transactions for a fixed time on a fresh DIR/bench.db.
    Write {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_enum)]
        journal: Journal,
        #[arg(long, value_enum)]
        sync: Sync,
        #[arg(long)]
        seconds: f64,
        /// Writer threads, each with its own connection (BEGIN IMMEDIATE).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Database file name in DIR.
        #[arg(long, default_value = "bench.db")]
        db: String,
        /// Write into an existing database made by `init --schema write` instead of
        /// recreating it.
        #[arg(long)]
        existing: bool,
    },
    /// Create a fresh DIR/DB (removing an old one) with the schema of a workload.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        db: String,
        #[arg(long, value_enum)]
        schema: Schema,
        #[arg(long, value_enum, default_value = "wal")]
        journal: Journal,
    },
    /// Paced single-row commits on DIR/DB (made by `init --schema lag`).
    LagWrite {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        db: String,
        /// Commits per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long)]
        seconds: f64,
        #[arg(long, value_enum, default_value = "normal")]
        sync: Sync,
        /// Seconds to keep the connection open, idle, after the last commit (closing it
        /// checkpoints and deletes the WAL, which a replicator may see as a barrier).
        #[arg(long, default_value_t = 0.0)]
        hold: f64,
        /// Where to write `seq,unix_ns` (COMMIT returned) per commit.
        #[arg(long)]
        times: PathBuf,
    },
    /// Write MIB MiB as fast as possible into DIR/DB (made by `init --schema burst`) and
    /// report the size of its -wal.
    Burst {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        db: String,
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Payload per transaction, in KiB (rows of 1000-byte random blobs).
        #[arg(long, default_value_t = 64)]
        tx_kib: u64,
        #[arg(long, value_enum, default_value = "normal")]
        sync: Sync,
    },
    /// Build DIR/DB of about MIB MiB of random blobs (table r), in WAL mode.
    PrepareRestore {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "restore.db")]
        db: String,
        #[arg(long, default_value_t = 1024)]
        mib: u64,
    },
    /// Build DIR/read.db of about MIB MiB (skipped if already built to that size).
    PrepareRead {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Rebuild even if a matching read.db already exists.
        #[arg(long)]
        force: bool,
    },
    /// Random rowid point lookups on DIR/read.db for a fixed time.
    Read {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seconds: f64,
        /// Skip the sequential warm-up pass that loads read.db into the page cache.
        #[arg(long)]
        no_warmup: bool,
    },
    /// Sequential write (1 MiB writes + fsync) then cold sequential read of DIR/seq.bin.
    Seq {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1024)]
        mib: u64,
    },
}

/// Bytes per row payload in read.db: about 3 rows per 4 KiB page, all stored
/// locally in the leaf (no overflow pages), so a lookup touches one leaf.
const READ_ROW_BYTES: u64 = 1200;
const ROWS_PER_PAGE: u64 = 3;
const BLOB_BYTES: usize = 100;
const MIB: u64 = 1024 * 1024;

/// xorshift64*: good enough for picking keys, no extra dependency.
struct Rng(u64);

impl Rng {
    fn new(salt: u64) -> Self {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut s = t ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(std::process::id());
        if s == 0 {
            s = 0x2545_F491_4F6C_DD1D;
        }
        Rng(s)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Write {
            dir,
            journal,
            sync,
            seconds,
            threads,
            db,
            existing,
        } => cmd_write(&dir.join(db), journal, sync, seconds, threads, existing),
        Cmd::Init {
            dir,
            db,
            schema,
            journal,
        } => cmd_init(&dir.join(db), schema, journal),
        Cmd::LagWrite {
            dir,
            db,
            rate,
            seconds,
            sync,
            hold,
            times,
        } => cmd_lag_write(&dir.join(db), rate, seconds, sync, hold, &times),
        Cmd::Burst {
            dir,
            db,
            mib,
            tx_kib,
            sync,
        } => cmd_burst(&dir.join(db), mib, tx_kib, sync),
        Cmd::PrepareRestore { dir, db, mib } => cmd_prepare_restore(&dir.join(db), mib),
        Cmd::PrepareRead { dir, mib, force } => cmd_prepare_read(&dir, mib, force),
        Cmd::Read {
            dir,
            seconds,
            no_warmup,
        } => cmd_read(&dir, seconds, !no_warmup),
        Cmd::Seq { dir, mib } => cmd_seq(&dir, mib),
    }
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn remove_db(db: &Path) -> Result<()> {
    remove_if_exists(db)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        remove_if_exists(&with_suffix(db, suffix))?;
    }
    Ok(())
}

fn seconds_duration(seconds: f64) -> Result<Duration> {
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("--seconds must be a positive number");
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn open_writer(db: &Path, journal: Journal, sync: Sync) -> Result<Connection> {
    let conn = Connection::open(db).with_context(|| format!("opening {}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let mode: String = conn.query_row(
        &format!("PRAGMA journal_mode={}", journal.pragma()),
        [],
        |r| r.get(0),
    )?;
    if !mode.eq_ignore_ascii_case(journal.pragma()) {
        bail!(
            "journal_mode={} was not accepted (got {mode})",
            journal.pragma()
        );
    }
    conn.execute_batch(&format!("PRAGMA synchronous={};", sync.pragma()))?;
    Ok(conn)
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let idx = ((sorted_us.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted_us[idx]) / 1000.0
}

fn cmd_write(
    db: &Path,
    journal: Journal,
    sync: Sync,
    seconds: f64,
    threads: usize,
    existing: bool,
) -> Result<()> {
    let duration = seconds_duration(seconds)?;
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let db = db.to_path_buf();
    let rows_before: i64 = if existing {
        let conn = open_writer(&db, journal, sync)?;
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .with_context(|| format!("{} has no table t; run init --schema write", db.display()))?
    } else {
        remove_db(&db)?;
        let conn = open_writer(&db, journal, sync)?;
        conn.execute_batch(WRITE_SCHEMA)?;
        0
    };

    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(threads);
    for i in 0..threads {
        let db = db.clone();
        let stop = Arc::clone(&stop);
        handles.push(std::thread::spawn(move || -> Result<Vec<u32>> {
            let conn = open_writer(&db, journal, sync)?;
            let mut rng = Rng::new(i as u64 + 1);
            let mut blob = [0u8; BLOB_BYTES];
            let mut lat_us = Vec::with_capacity(1 << 16);
            let mut begin = conn.prepare("BEGIN IMMEDIATE")?;
            let mut insert = conn.prepare("INSERT INTO t(k, v) VALUES (?1, ?2)")?;
            let mut commit = conn.prepare("COMMIT")?;
            while !stop.load(Ordering::Relaxed) && start.elapsed() < duration {
                rng.fill(&mut blob);
                let k = (rng.next() >> 1) as i64;
                let t0 = Instant::now();
                begin.execute([])?;
                insert.execute(params![k, &blob[..]])?;
                commit.execute([])?;
                lat_us.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            Ok(lat_us)
        }));
    }
    let mut lat_us = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => lat_us.extend(v),
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                first_err.get_or_insert(e);
            }
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                first_err.get_or_insert(anyhow::anyhow!("writer thread panicked"));
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(e) = first_err {
        return Err(e);
    }
    // Sanity check: every committed transaction is visible.
    let conn = Connection::open(&db)?;
    let rows: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?;
    let rows = rows - rows_before;
    if rows as usize != lat_us.len() {
        bail!(
            "committed {} transactions but found {rows} rows",
            lat_us.len()
        );
    }
    drop(conn);
    lat_us.sort_unstable();
    let tx = lat_us.len();
    println!(
        "{{\"tx_per_s\": {:.1}, \"tx\": {}, \"seconds\": {:.3}, \"threads\": {}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}}}",
        tx as f64 / elapsed,
        tx,
        elapsed,
        threads,
        percentile_ms(&lat_us, 0.50),
        percentile_ms(&lat_us, 0.99)
    );
    Ok(())
}

/// Returns the row count of an existing, complete read.db of the requested size.
fn existing_read_db(db: &Path, rows_wanted: i64) -> Option<i64> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).ok()?;
    let rows: i64 = conn
        .query_row("SELECT rows FROM meta", [], |r| r.get(0))
        .ok()?;
    (page_size == 4096 && rows == rows_wanted).then_some(rows)
}

fn cmd_prepare_read(dir: &Path, mib: u64, force: bool) -> Result<()> {
    if mib == 0 {
        bail!("--mib must be at least 1");
    }
    let db = dir.join("read.db");
    // Three rows fill a 4 KiB leaf page, so this yields about `mib` MiB.
    let rows = (mib * MIB / 4096 * ROWS_PER_PAGE) as i64;
    let start = Instant::now();
    let reused = !force && existing_read_db(&db, rows).is_some();
    if !reused {
        remove_db(&db)?;
        let conn = Connection::open(&db).with_context(|| format!("creating {}", db.display()))?;
        conn.execute_batch(&format!(
            "PRAGMA page_size=4096;
             PRAGMA journal_mode=OFF;
             PRAGMA synchronous=OFF;
             BEGIN;
             CREATE TABLE r(id INTEGER PRIMARY KEY, v BLOB);
             WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows})
               INSERT INTO r(id, v) SELECT x, randomblob({READ_ROW_BYTES}) FROM c;
             CREATE TABLE meta(rows INTEGER);
             INSERT INTO meta(rows) VALUES ({rows});
             COMMIT;"
        ))?;
        drop(conn);
        // Make it durable so later workloads do not pay for its writeback.
        File::open(&db)?.sync_all()?;
    }
    let bytes = fs::metadata(&db)?.len();
    println!(
        "{{\"rows\": {rows}, \"bytes\": {bytes}, \"reused\": {reused}, \"seconds\": {:.3}}}",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_read(dir: &Path, seconds: f64, warmup: bool) -> Result<()> {
    let duration = seconds_duration(seconds)?;
    let db = dir.join("read.db");
    if warmup {
        // Load the whole file into the page cache (through this filesystem),
        // so we measure per-read overhead and not the disk.
        let mut f = File::open(&db).with_context(|| format!("opening {}", db.display()))?;
        let mut buf = vec![0u8; MIB as usize];
        while f.read(&mut buf)? > 0 {}
    }
    let conn = Connection::open_with_flags(
        &db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", db.display()))?;
    conn.execute_batch("PRAGMA cache_size=-64; PRAGMA mmap_size=0;")?;
    let rows: i64 = conn
        .query_row("SELECT rows FROM meta", [], |r| r.get(0))
        .context("read.db is missing its meta table; run prepare-read first")?;
    let mut stmt = conn.prepare("SELECT v FROM r WHERE id = ?1")?;
    let mut rng = Rng::new(0xdead_beef);
    let mut reads: u64 = 0;
    let mut bytes: u64 = 0;
    let start = Instant::now();
    loop {
        // Check the clock every 64 lookups; a lookup is a few microseconds.
        for _ in 0..64 {
            let id = (rng.next() % rows as u64) as i64 + 1;
            let len = stmt.query_row([id], |r| {
                Ok(r.get_ref(0)?.as_blob().map(<[u8]>::len).unwrap_or(0))
            })?;
            bytes += len as u64;
            reads += 1;
        }
        if start.elapsed() >= duration {
            break;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if bytes != reads * READ_ROW_BYTES {
        bail!("read {bytes} payload bytes from {reads} lookups; read.db looks corrupt");
    }
    println!(
        "{{\"reads_per_s\": {:.1}, \"reads\": {reads}, \"seconds\": {elapsed:.3}}}",
        reads as f64 / elapsed
    );
    Ok(())
}

/// Drop the page cache for `path`: globally via /proc/sys/vm/drop_caches if we
/// may (this also drops a FUSE target's backing file, which fadvise on the
/// mounted file would not), else per file with posix_fadvise(DONTNEED).
fn drop_cache(path: &Path) -> Result<&'static str> {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let f = File::open(path)?;
    // SAFETY: valid fd for the lifetime of `f`; offset/len 0 means whole file.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!(
            "posix_fadvise(DONTNEED) failed: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    match OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .and_then(|mut d| d.write_all(b"1\n"))
    {
        Ok(()) => Ok("drop_caches"),
        Err(_) => Ok("fadvise"),
    }
}

fn cmd_seq(dir: &Path, mib: u64) -> Result<()> {
    if mib == 0 {
        bail!("--mib must be at least 1");
    }
    let path = dir.join("seq.bin");
    remove_if_exists(&path)?;
    let result = seq_inner(&path, mib);
    let cleanup = remove_if_exists(&path);
    let (w, r, how) = result?;
    cleanup?;
    println!("{{\"write_mib_s\": {w:.1}, \"read_mib_s\": {r:.1}, \"mib\": {mib}, \"cache_drop\": \"{how}\"}}");
    Ok(())
}

fn seq_inner(path: &Path, mib: u64) -> Result<(f64, f64, &'static str)> {
    let mut buf = vec![0u8; MIB as usize];
    Rng::new(7).fill(&mut buf);

    let start = Instant::now();
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    for i in 0..mib {
        // Vary the content a little so nothing can dedupe identical blocks.
        buf[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    drop(f);
    let write_mib_s = mib as f64 / start.elapsed().as_secs_f64();

    let how = drop_cache(path)?;

    let start = Instant::now();
    let mut f = File::open(path)?;
    let mut total: u64 = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let read_mib_s = mib as f64 / start.elapsed().as_secs_f64();
    if total != mib * MIB {
        bail!("read back {total} bytes, expected {}", mib * MIB);
    }
    Ok((write_mib_s, read_mib_s, how))
}

fn cmd_init(db: &Path, schema: Schema, journal: Journal) -> Result<()> {
    remove_db(db)?;
    let conn = open_writer(db, journal, Sync::Normal)?;
    conn.execute_batch(schema.sql())?;
    drop(conn);
    println!("{{\"db\": {:?}}}", db.display().to_string());
    Ok(())
}

fn unix_ns(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn cmd_lag_write(
    db: &Path,
    rate: f64,
    seconds: f64,
    sync: Sync,
    hold: f64,
    times: &Path,
) -> Result<()> {
    let duration = seconds_duration(seconds)?;
    if !(rate.is_finite() && rate > 0.0) {
        bail!("--rate must be a positive number");
    }
    if !(hold.is_finite() && hold >= 0.0) {
        bail!("--hold must be zero or more");
    }
    let conn = open_writer(db, Journal::Wal, sync)?;
    let first_seq: i64 = conn
        .query_row("SELECT coalesce(max(seq), 0) + 1 FROM lag", [], |r| {
            r.get(0)
        })
        .with_context(|| format!("{} has no table lag; run init --schema lag", db.display()))?;
    let mut begin = conn.prepare("BEGIN IMMEDIATE")?;
    let mut insert = conn.prepare("INSERT INTO lag(seq, v) VALUES (?1, ?2)")?;
    let mut commit = conn.prepare("COMMIT")?;
    let mut rng = Rng::new(3);
    let mut blob = [0u8; BLOB_BYTES];
    let mut committed: Vec<(i64, u128)> = Vec::new();
    let mut lat_us = Vec::new();
    let mut late_max = Duration::ZERO;
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    for i in 0u32.. {
        let due = period * i;
        // Stop at the end of the schedule, or at the end of the time if the writer fell
        // behind (the JSON then shows a lower rate and a large late_max_ms).
        if due >= duration || start.elapsed() >= duration {
            break;
        }
        let now = start.elapsed();
        if now < due {
            std::thread::sleep(due - now);
        } else {
            late_max = late_max.max(now - due);
        }
        let seq = first_seq + i64::from(i);
        rng.fill(&mut blob);
        let t0 = Instant::now();
        begin.execute([])?;
        insert.execute(params![seq, &blob[..]])?;
        commit.execute([])?;
        let done = SystemTime::now();
        lat_us.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        committed.push((seq, unix_ns(done)));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut out = String::with_capacity(committed.len() * 32);
    for (seq, ns) in &committed {
        out.push_str(&format!("{seq},{ns}\n"));
    }
    fs::write(times, out).with_context(|| format!("writing {}", times.display()))?;
    if hold > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(hold));
    }
    drop((begin, insert, commit));
    drop(conn);
    lat_us.sort_unstable();
    let n = committed.len();
    println!(
        "{{\"commits\": {n}, \"rate\": {:.1}, \"seconds\": {elapsed:.3}, \"first_seq\": {first_seq}, \
         \"last_seq\": {}, \"late_max_ms\": {:.3}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}}}",
        n as f64 / elapsed,
        first_seq + n as i64 - 1,
        late_max.as_secs_f64() * 1000.0,
        percentile_ms(&lat_us, 0.50),
        percentile_ms(&lat_us, 0.99)
    );
    Ok(())
}

/// Size of a file, 0 if it does not exist.
fn file_len(p: &Path) -> Result<u64> {
    match fs::metadata(p) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("stat {}", p.display())),
    }
}

fn cmd_burst(db: &Path, mib: u64, tx_kib: u64, sync: Sync) -> Result<()> {
    const ROW_BYTES: u64 = 1000;
    if mib == 0 || tx_kib == 0 {
        bail!("--mib and --tx-kib must be at least 1");
    }
    let wal = with_suffix(db, "-wal");
    let conn = open_writer(db, Journal::Wal, sync)?;
    conn.query_row("SELECT count(*) FROM b", [], |r| r.get::<_, i64>(0))
        .with_context(|| format!("{} has no table b; run init --schema burst", db.display()))?;
    let rows_total = (mib * MIB).div_ceil(ROW_BYTES);
    let rows_per_tx = (tx_kib * 1024 / ROW_BYTES).max(1);
    let mut insert = conn.prepare("INSERT INTO b(v) VALUES (?1)")?;
    let mut rng = Rng::new(11);
    let mut blob = [0u8; ROW_BYTES as usize];
    let mut wal_max = 0u64;
    let mut written = 0u64;
    let mut tx = 0u64;
    let start = Instant::now();
    while written < rows_total {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let n = rows_per_tx.min(rows_total - written);
        for _ in 0..n {
            rng.fill(&mut blob);
            insert.execute([&blob[..]])?;
        }
        conn.execute_batch("COMMIT")?;
        written += n;
        tx += 1;
        wal_max = wal_max.max(file_len(&wal)?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Measured with the connection still open: closing it checkpoints and deletes the WAL.
    let wal_end = file_len(&wal)?;
    let db_bytes = file_len(db)?;
    drop(insert);
    drop(conn);
    println!(
        "{{\"wal_bytes_end\": {wal_end}, \"wal_bytes_max\": {wal_max}, \"db_bytes\": {db_bytes}, \
         \"mib_per_s\": {:.1}, \"tx\": {tx}, \"seconds\": {elapsed:.3}}}",
        (written * ROW_BYTES) as f64 / MIB as f64 / elapsed
    );
    Ok(())
}

fn cmd_prepare_restore(db: &Path, mib: u64) -> Result<()> {
    if mib == 0 {
        bail!("--mib must be at least 1");
    }
    let rows = (mib * MIB / 4096 * ROWS_PER_PAGE) as i64;
    let start = Instant::now();
    remove_db(db)?;
    let conn = Connection::open(db).with_context(|| format!("creating {}", db.display()))?;
    conn.execute_batch(&format!(
        "PRAGMA page_size=4096;
         PRAGMA journal_mode=OFF;
         PRAGMA synchronous=OFF;
         BEGIN;
         CREATE TABLE r(id INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows})
           INSERT INTO r(id, v) SELECT x, randomblob({READ_ROW_BYTES}) FROM c;
         COMMIT;"
    ))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("journal_mode=WAL was not accepted (got {mode})");
    }
    drop(conn);
    File::open(db)?.sync_all()?;
    println!(
        "{{\"rows\": {rows}, \"bytes\": {}, \"seconds\": {:.3}}}",
        file_len(db)?,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

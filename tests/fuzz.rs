//! A seeded, reproducible differential fuzzer: random sequences of SQLite operations, run
//! through several connections held by several worker processes, on two sides at once:
//! a plain temporary directory, and a real `walfs mount --replica file://...`. Every
//! outcome must be identical on both sides: rows, SQLite's extended error codes and
//! messages, each connection's transaction state, and the listing of the directory (every
//! name and size, `-shm` files excepted). Any difference is a mismatch.
//!
//! The operations (step kinds, see [`KINDS`]): opening (with a journal mode, synchronous
//! level, tables), closing and reopening connections; INSERT/UPDATE/DELETE of random text
//! and blobs, multi-statement transactions committed or rolled back, transactions left
//! open for later steps (BEGIN, BEGIN IMMEDIATE/EXCLUSIVE, savepoints); SELECT (ORDER BY)
//! and `integrity_check`; `page_size` + VACUUM; all six journal modes; synchronous
//! OFF/NORMAL/FULL; `locking_mode` EXCLUSIVE/NORMAL; the four `wal_checkpoint` modes;
//! `wal_autocheckpoint`; ATTACH with cross-database transactions; a writer killed with
//! SIGKILL mid-transaction after spilling past a 10-page cache. And writes outside SQLite,
//! made by the driver itself on each side's directory: a database deleted and recreated
//! with another page size; `mv` and `cp` of another database over one (that connections
//! may have open); truncation to 0 bytes; hand-written `-wal` files (another database's
//! WAL of another page size, valid frames under another WAL's salts, a valid header with
//! garbage frames, another database's WAL of the same page size), written while no
//! connection has the database open, then opened.
//!
//! Quiet points (every 10 to 25 steps, and at the end): open transactions are committed or
//! rolled back, and the databases that a `synchronous=OFF` connection has open are closed
//! (in some modes such commits are captured at the close only). Then, for each database
//! SQLite sees as valid and non-empty on the plain side: the main file on the mount's
//! backing directory must be byte-identical to the plain one, the two must give the same
//! committed image ([`expected_image`]), and `walfs restore` must reach that image within
//! 15 s; its TXID is recorded. At the end of a sequence the workers quit, walfs stops, the
//! latest restore must equal the final image, every recorded TXID must restore (`--txid`)
//! to its image, and walfs must have logged no error, EIO or panic (checked after every
//! step too, since a failed capture at a close is not reported to the application).
//!
//! `fuzz_regressions` replays, with their own seeds, the sequences in which the fuzzer found
//! a replica bug ([`REGRESSIONS`]), so that each stays covered whatever the default run's
//! range.
//!
//! Knobs (environment):
//! - `WALFS_FUZZ_SEED` (decimal or 0x-hex; default a fixed seed, so CI runs are
//!   reproducible), `WALFS_FUZZ_SEQUENCES` (default 60), `WALFS_FUZZ_STEPS` (per sequence,
//!   default 120), `WALFS_FUZZ_FIRST` (index of the first sequence: a sequence replays
//!   alone), `WALFS_FUZZ_MAX_MISMATCHES` (stop after that many, default 5; 0: never),
//!   `WALFS_FUZZ_SKIP` (comma-separated step kinds not to generate, to look past a known
//!   failure), `WALFS_FUZZ_VERBOSE=1` (print every step, its outcomes and the files),
//!   `WALFS_FUZZ_LOG_DIR` (write each sequence's whole daemon log there; `RUST_LOG` sets
//!   its level).
//! - A mismatch names the seed, the sequence, the step number, the step and what differed,
//!   with the command line that replays it. The SQLite side of a replay is exact; walfs's
//!   own timing (uploads every 100 ms) can make a replica problem show at another step,
//!   or not at all, so the sequence's staging and replica directories are kept (the path
//!   is printed) for inspection.
//! - The default run takes about 2.5 minutes on 2 cores when nothing mismatches.
//!
//! Determinism: the driver sends one command to one connection at a time and waits for its
//! answer; `busy_timeout` is 0, so a lock conflict is `SQLITE_BUSY` at once on both sides.
//! SQLite writes the same database bytes and the same file sizes for the same statements;
//! its random parts (WAL salts, the rollback journal's checksum nonce, the name of a
//! super-journal) change contents, never sizes, and only the sizes of `-wal` and `-journal`
//! files are compared (a super-journal's random name is masked). Files the driver writes
//! (hand-made WALs, databases) are made once, in a scratch directory, and the same bytes
//! are written on both sides. Statements never use `randomblob()`: all data are literals
//! from the PRNG (splitmix64).
//!
//! Worker processes: the test binary re-executes itself with `WALFS_FUZZ_WORKER=1` and
//! runs only `fuzz_worker`, which serves a line protocol on stdin/stdout (protocol lines
//! carry a unique prefix; libtest's own output is ignored). Each side has [`WORKERS`]
//! workers of [`SLOTS`] connections each, started with the side's directory as their
//! working directory, so every path (and every message) is relative.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Mount, Rng};
use rusqlite::types::ValueRef;
use rusqlite::Connection;

/// Marks the worker's protocol lines on its stdout (libtest prints there too).
const PREFIX: &str = "@@walfs-fuzz@@ ";
/// Set in a worker's environment: `fuzz_worker` then serves the protocol.
const WORKER_ENV: &str = "WALFS_FUZZ_WORKER";
const WORKERS: usize = 3;
const SLOTS: usize = 2;
/// The databases the sequences work on.
const DBS: [&str; 3] = ["a.db", "b.db", "sub/c.db"];
const MODES: [&str; 6] = ["DELETE", "TRUNCATE", "PERSIST", "MEMORY", "WAL", "OFF"];
const PAGE_SIZES: [usize; 8] = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536];
/// The kinds of steps (names for `WALFS_FUZZ_SKIP`) and their weights.
const KINDS: [(&str, usize); 23] = [
    ("open", 7),
    ("reopen", 4),
    ("close", 3),
    ("create", 5),
    ("write", 22),
    ("transaction", 8),
    ("begin", 5),
    ("end", 12),
    ("select", 8),
    ("integrity_check", 3),
    ("page_size", 3),
    ("journal_mode", 7),
    ("synchronous", 3),
    ("locking_mode", 2),
    ("checkpoint", 5),
    ("autocheckpoint", 2),
    ("recreate", 2),
    ("mv", 2),
    ("cp", 2),
    ("truncate", 1),
    ("wal", 4),
    ("attach", 3),
    ("kill", 2),
];
const DEFAULT_SEED: u64 = 0x5741_4c46_5346_555a; // "WALFSFUZ"
/// How long a restore may lag behind a quiet point (uploads run every 100 ms).
const RESTORE_PATIENCE: Duration = Duration::from_secs(15);
/// How long a worker may take to answer one command.
const WORKER_PATIENCE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// PRNG (splitmix64) and configuration

/// What the fuzzer draws from [`Rng`].
trait Draw {
    fn next(&mut self) -> u64;
    fn below(&mut self, n: usize) -> usize;

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// An SQL blob literal of `n` random bytes.
    fn blob(&mut self, n: usize) -> String {
        format!("x'{}'", hex(&self.bytes(n)))
    }

    /// Random letters and digits (no quotes), for SQL text literals.
    fn text(&mut self, n: usize) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        (0..n)
            .map(|_| ALPHABET[self.below(ALPHABET.len())] as char)
            .collect()
    }

    /// The size of a random value: mostly small, some over a page, a few of many pages.
    fn value_size(&mut self) -> usize {
        match self.below(100) {
            0..=69 => self.range(0, 300),
            70..=94 => self.range(300, 2500),
            _ => self.range(2500, 12000),
        }
    }
}

impl Draw for Rng {
    fn next(&mut self) -> u64 {
        Rng::next(self)
    }

    fn below(&mut self, n: usize) -> usize {
        Rng::below(self, n)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Config {
    seed: u64,
    first: u64,
    sequences: u64,
    steps: usize,
    /// Stop after this many mismatches (0: never), so that a failing run stays short.
    max_mismatches: usize,
    verbose: bool,
    /// Step kinds not to generate (`WALFS_FUZZ_SKIP`, comma-separated), to look past a
    /// known failure.
    skip: Vec<String>,
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{name}={v:?}: {e}"))
        }
        Err(_) => default,
    }
}

impl Config {
    fn from_env() -> Config {
        let cfg = Config {
            seed: env_u64("WALFS_FUZZ_SEED", DEFAULT_SEED),
            first: env_u64("WALFS_FUZZ_FIRST", 0),
            sequences: env_u64("WALFS_FUZZ_SEQUENCES", 60),
            steps: env_u64("WALFS_FUZZ_STEPS", 120) as usize,
            max_mismatches: env_u64("WALFS_FUZZ_MAX_MISMATCHES", 5) as usize,
            verbose: std::env::var_os("WALFS_FUZZ_VERBOSE").is_some_and(|v| v != "0"),
            skip: std::env::var("WALFS_FUZZ_SKIP")
                .unwrap_or_default()
                .split(',')
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect(),
        };
        for k in &cfg.skip {
            assert!(
                KINDS.iter().any(|(name, _)| name == k),
                "WALFS_FUZZ_SKIP: unknown step kind {k:?}; the kinds: {:?}",
                KINDS.iter().map(|k| k.0).collect::<Vec<_>>()
            );
        }
        cfg
    }

    /// The seed of sequence `index`: each sequence can be replayed alone.
    fn sequence_seed(&self, index: u64) -> u64 {
        Rng(self.seed ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03)).next()
    }

    fn replay(&self, index: u64) -> String {
        let skip = if self.skip.is_empty() {
            String::new()
        } else {
            format!("WALFS_FUZZ_SKIP={} ", self.skip.join(","))
        };
        format!(
            "WALFS_FUZZ_SEED={:#x} WALFS_FUZZ_FIRST={index} WALFS_FUZZ_SEQUENCES=1 \
             WALFS_FUZZ_STEPS={} {skip}cargo test --test fuzz -- --nocapture",
            self.seed, self.steps
        )
    }
}

// ---------------------------------------------------------------------------------------
// The line protocol

/// Escapes a protocol field: no tab, newline or backslash is left bare.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(c) => out.push(c),
            None => out.push('\\'),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The worker process

/// The worker: returns at once in a normal test run; serves the protocol when started by
/// the driver. Commands (tab-separated fields): `open SLOT PATH`, `exec SLOT SQL` (a batch;
/// a statement that returns rows is stepped once), `query SLOT SQL` (one statement, all
/// rows), `attach SLOT PATH SQL` (ATTACH PATH AS aux, the batch, a ROLLBACK if a
/// transaction is left open, DETACH), `close SLOT`, `quit`. Every answer starts with the
/// state of each slot: `-` no connection, `a` autocommit, `t` in a transaction.
#[test]
fn fuzz_worker() {
    if std::env::var_os(WORKER_ENV).is_none() {
        return;
    }
    let cwd = std::env::current_dir().unwrap().display().to_string();
    let mut conns: Vec<Option<Connection>> = (0..SLOTS).map(|_| None).collect();
    let say = |text: &str, conns: &[Option<Connection>]| {
        let state: String = conns
            .iter()
            .map(|c| match c {
                None => '-',
                Some(c) if c.is_autocommit() => 'a',
                Some(_) => 't',
            })
            .collect();
        let text = escape(&text.replace(&cwd, "$DIR"));
        let mut out = std::io::stdout().lock();
        // A newline first: libtest may have left "test fuzz_worker ... " on the line.
        writeln!(out, "\n{PREFIX}{state} {text}").unwrap();
        out.flush().unwrap();
    };
    say("ready", &conns);
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let f: Vec<String> = line.split('\t').map(unescape).collect();
        if f[0] == "quit" {
            break;
        }
        let slot = f
            .get(1)
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&s| s < SLOTS);
        let Some(slot) = slot else {
            say(&format!("bad command {line:?}"), &conns);
            continue;
        };
        let text = match (f[0].as_str(), &conns[slot]) {
            ("open", None) => match Connection::open(&f[2]) {
                Ok(c) => {
                    // rusqlite's default busy timeout is 5 s: conflicts must fail at once.
                    c.busy_timeout(Duration::ZERO).unwrap();
                    conns[slot] = Some(c);
                    "ok".to_string()
                }
                Err(e) => render_err(&e),
            },
            ("close", Some(_)) => match conns[slot].take().unwrap().close() {
                Ok(()) => "ok".to_string(),
                Err((c, e)) => {
                    drop(c);
                    render_err(&e)
                }
            },
            ("exec", Some(c)) => match c.execute_batch(&f[2]) {
                Ok(()) => "ok".to_string(),
                Err(e) => render_err(&e),
            },
            ("query", Some(c)) => match run_query(c, &f[2]) {
                Ok(rows) => render_rows(&rows),
                Err(e) => render_err(&e),
            },
            ("attach", Some(c)) => {
                let mut parts = vec![match c.execute("ATTACH ?1 AS aux", [&f[2]]) {
                    Ok(_) => "ok".to_string(),
                    Err(e) => render_err(&e),
                }];
                parts.push(match c.execute_batch(&f[3]) {
                    Ok(()) => "ok".to_string(),
                    Err(e) => render_err(&e),
                });
                if !c.is_autocommit() {
                    parts.push(match c.execute_batch("ROLLBACK") {
                        Ok(()) => "rollback ok".to_string(),
                        Err(e) => format!("rollback {}", render_err(&e)),
                    });
                }
                parts.push(match c.execute_batch("DETACH aux") {
                    Ok(()) => "detach ok".to_string(),
                    Err(e) => format!("detach {}", render_err(&e)),
                });
                parts.join("; ")
            }
            (cmd, c) => format!("bad command {cmd} on slot {slot} (open: {})", c.is_some()),
        };
        say(&text, &conns);
    }
}

fn render_err(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(f, msg) => format!(
            "err {} {}",
            f.extended_code,
            msg.clone().unwrap_or_else(|| f.to_string())
        ),
        other => format!("err ? {other}"),
    }
}

fn run_query(c: &Connection, sql: &str) -> rusqlite::Result<Vec<Vec<String>>> {
    let mut stmt = c.prepare(sql)?;
    let n = stmt.column_count();
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(
            (0..n)
                .map(|i| match r.get_ref(i) {
                    Ok(ValueRef::Null) => "NULL".to_string(),
                    Ok(ValueRef::Integer(v)) => v.to_string(),
                    Ok(ValueRef::Real(v)) => format!("{v:?}"),
                    Ok(ValueRef::Text(t)) => format!("'{}'", String::from_utf8_lossy(t)),
                    Ok(ValueRef::Blob(b)) => format!("x'{}'", hex(b)),
                    Err(e) => format!("?{e}"),
                })
                .collect(),
        );
    }
    Ok(out)
}

/// Rows as text: verbatim when short, else their count, a CRC-64 of all of them, and the
/// start (the comparison stays exact).
fn render_rows(rows: &[Vec<String>]) -> String {
    let all = rows
        .iter()
        .map(|r| r.join(","))
        .collect::<Vec<_>>()
        .join(" | ");
    if all.len() <= 600 {
        return format!("{} rows: {all}", rows.len());
    }
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182).checksum(all.as_bytes());
    let head: String = all.chars().take(300).collect();
    format!("{} rows, crc64 {crc:016x}: {head}...", rows.len())
}

// ---------------------------------------------------------------------------------------
// The driver's handle on a worker

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Worker {
    fn spawn(dir: &Path) -> Worker {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "fuzz_worker", "--nocapture", "--test-threads=1"])
            .env(WORKER_ENV, "1")
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a fuzz worker");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find(PREFIX) {
                    if tx.send(line[at + PREFIX.len()..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        let stdin = child.stdin.take().unwrap();
        let mut w = Worker {
            child,
            stdin,
            lines: rx,
        };
        let hello = w.receive();
        assert!(
            hello.as_deref().is_ok_and(|h| h.ends_with(" ready")),
            "a fuzz worker in {} did not start: {hello:?}",
            dir.display()
        );
        w
    }

    fn receive(&mut self) -> Result<String, String> {
        match self.lines.recv_timeout(WORKER_PATIENCE) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "no answer within {WORKER_PATIENCE:?} (the worker hangs)"
            )),
            Err(RecvTimeoutError::Disconnected) => {
                Err(format!("the worker exited ({:?})", self.child.try_wait()))
            }
        }
    }

    fn call(&mut self, fields: &[&str]) -> Result<String, String> {
        let line = fields
            .iter()
            .map(|f| escape(f))
            .collect::<Vec<_>>()
            .join("\t");
        writeln!(self.stdin, "{line}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| format!("cannot write to the worker: {e}"))?;
        self.receive()
    }

    /// SIGKILL (this process's own child, by its id) and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the worker to exit (its connections close normally); kills it if it does not.
    fn quit(&mut self) {
        let _ = writeln!(self.stdin, "quit").and_then(|_| self.stdin.flush());
        if common::wait_timeout(&mut self.child, Duration::from_secs(30)).is_none() {
            self.kill();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------
// Steps

/// One operation of a step, done identically on each side.
#[derive(Clone)]
enum Action {
    Open {
        w: usize,
        s: usize,
        db: String,
    },
    Close {
        w: usize,
        s: usize,
    },
    Exec {
        w: usize,
        s: usize,
        sql: String,
    },
    Query {
        w: usize,
        s: usize,
        sql: String,
    },
    Attach {
        w: usize,
        s: usize,
        db: String,
        sql: String,
    },
    /// SIGKILL worker `w` and start a fresh one in its place.
    Kill {
        w: usize,
    },
    Unlink {
        rel: String,
    },
    /// Writes `bytes` to `rel` as `cp` does (open with O_TRUNC, write, close).
    Write {
        rel: String,
        what: String,
        bytes: Arc<Vec<u8>>,
    },
    /// `cp from to` within the side's directory.
    Copy {
        from: String,
        to: String,
    },
    /// `mv from to`: rename(2).
    Rename {
        from: String,
        to: String,
    },
    /// Empties `rel`: with ftruncate, or with an O_TRUNC open.
    Truncate {
        rel: String,
        set_len: bool,
    },
}

fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...({} chars)", &s[..cut], s.len())
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Open { w, s, db } => write!(f, "w{w}.{s} open {db}"),
            Action::Close { w, s } => write!(f, "w{w}.{s} close"),
            Action::Exec { w, s, sql } => write!(f, "w{w}.{s} exec {}", shorten(sql, 240)),
            Action::Query { w, s, sql } => write!(f, "w{w}.{s} query {}", shorten(sql, 240)),
            Action::Attach { w, s, db, sql } => {
                write!(f, "w{w}.{s} attach {db} AS aux: {}", shorten(sql, 240))
            }
            Action::Kill { w } => write!(f, "kill -9 w{w} (and start a new w{w})"),
            Action::Unlink { rel } => write!(f, "rm {rel}"),
            Action::Write { rel, what, bytes } => {
                write!(f, "write {rel} ({what}, {} bytes)", bytes.len())
            }
            Action::Copy { from, to } => write!(f, "cp {from} {to}"),
            Action::Rename { from, to } => write!(f, "mv {from} {to}"),
            Action::Truncate { rel, set_len } => write!(
                f,
                "truncate {rel} to 0 ({})",
                if *set_len {
                    "ftruncate"
                } else {
                    "O_TRUNC open"
                }
            ),
        }
    }
}

struct Step {
    what: String,
    actions: Vec<Action>,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.what)?;
        for (i, a) in self.actions.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "[{i}] {a}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// A side: a directory and its workers

struct Side {
    dir: PathBuf,
    workers: Vec<Worker>,
}

fn io_outcome(r: std::io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".to_string(),
        Err(e) => match e.raw_os_error() {
            Some(n) => format!("errno {n} ({})", std::io::Error::from_raw_os_error(n)),
            None => format!("error {e}"),
        },
    }
}

impl Side {
    fn new(dir: PathBuf) -> Side {
        let workers = (0..WORKERS).map(|_| Worker::spawn(&dir)).collect();
        Side { dir, workers }
    }

    fn run(&mut self, step: &Step) -> Vec<String> {
        step.actions.iter().map(|a| self.apply(a)).collect()
    }

    fn call(&mut self, w: usize, fields: &[&str]) -> String {
        match self.workers[w].call(fields) {
            Ok(answer) => answer,
            Err(e) => format!("!worker w{w}: {e}"),
        }
    }

    fn apply(&mut self, a: &Action) -> String {
        let p = |rel: &str| self.dir.join(rel);
        match a {
            Action::Open { w, s, db } => self.call(*w, &["open", &s.to_string(), db]),
            Action::Close { w, s } => self.call(*w, &["close", &s.to_string()]),
            Action::Exec { w, s, sql } => self.call(*w, &["exec", &s.to_string(), sql]),
            Action::Query { w, s, sql } => self.call(*w, &["query", &s.to_string(), sql]),
            Action::Attach { w, s, db, sql } => self.call(*w, &["attach", &s.to_string(), db, sql]),
            Action::Kill { w } => {
                self.workers[*w].kill();
                self.workers[*w] = Worker::spawn(&self.dir);
                "killed".to_string()
            }
            Action::Unlink { rel } => io_outcome(std::fs::remove_file(p(rel))),
            Action::Write { rel, bytes, .. } => io_outcome((|| {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(p(rel))?;
                f.write_all(bytes)
            })()),
            Action::Copy { from, to } => io_outcome(std::fs::copy(p(from), p(to)).map(|_| ())),
            Action::Rename { from, to } => io_outcome(std::fs::rename(p(from), p(to))),
            Action::Truncate { rel, set_len } => io_outcome((|| {
                if *set_len {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(p(rel))?
                        .set_len(0)
                } else {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(p(rel))
                        .map(|_| ())
                }
            })()),
        }
    }

    /// Every file and directory under the side's directory with its size, sorted; `-shm`
    /// files are left out (their size is the wal-index's business, not SQLite's data).
    fn listing(&self) -> String {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            let rd = match std::fs::read_dir(dir) {
                Ok(rd) => rd,
                Err(e) => {
                    out.push(format!("{}: cannot list: {e}", dir.display()));
                    return;
                }
            };
            for e in rd {
                let e = match e {
                    Ok(e) => e,
                    Err(err) => {
                        out.push(format!("cannot read an entry: {err}"));
                        continue;
                    }
                };
                let path = e.path();
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                if rel.ends_with("-shm") {
                    continue;
                }
                match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {
                        out.push(format!("{rel}/"));
                        walk(root, &path, out);
                    }
                    Ok(m) => out.push(format!("{}={}", normalize_name(&rel), m.len())),
                    Err(err) => out.push(format!("{rel}=error {err}")),
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.dir, &self.dir, &mut out);
        out.sort();
        out.join(" ")
    }

    /// Quits every worker (their connections close normally).
    fn quit(&mut self) {
        for w in &mut self.workers {
            w.quit();
        }
    }
}

/// A super-journal (`X-mjXXXXXXXX`, of a transaction over attached rollback-journal
/// databases) has a random name; it exists only while such a commit runs (or after one
/// failed), so only its presence and size are compared.
fn normalize_name(rel: &str) -> String {
    if let Some(at) = rel.rfind("-mj") {
        let tail = &rel[at + 3..];
        if tail.len() == 8 && tail.chars().all(|c| c.is_ascii_hexdigit()) {
            return format!("{}-mjXXXXXXXX", &rel[..at]);
        }
    }
    rel.to_string()
}

// ---------------------------------------------------------------------------------------
// The driver's model of the connections (from the plain side's answers)

#[derive(Clone)]
struct ConnModel {
    db: String,
    in_txn: bool,
    /// `synchronous=OFF` was set on it since it was opened: commits in some modes are then
    /// captured only when it closes (docs/SEMANTICS.md), so quiet points close it.
    sync_off: bool,
    /// It reported journal mode OFF since it was opened.
    off: bool,
}

struct Model {
    conns: Vec<Vec<Option<ConnModel>>>,
    /// Databases that may hold a hot journal (a writer was killed; cleared once the plain
    /// side's `-journal` no longer starts with the journal magic). A connection in journal
    /// mode OFF does not roll a hot journal back: it commits on top of the killed writer's
    /// pages, and the next connection in any other mode rolls the journal back over that
    /// commit (SQLite 3.50: pager.c opens a hot journal only if the mode is not OFF). What
    /// is committed is then undefined, so the generator never lets an OFF connection use
    /// such a database (see [`Generator::mode_for`] and the kill step).
    hot: std::collections::BTreeSet<String>,
}

impl Model {
    fn new() -> Model {
        Model {
            conns: vec![vec![None; SLOTS]; WORKERS],
            hot: Default::default(),
        }
    }

    fn all(&self) -> Vec<(usize, usize, &ConnModel)> {
        let mut out = Vec::new();
        for (w, slots) in self.conns.iter().enumerate() {
            for (s, c) in slots.iter().enumerate() {
                if let Some(c) = c {
                    out.push((w, s, c));
                }
            }
        }
        out
    }

    fn open(&self) -> Vec<(usize, usize)> {
        self.all().into_iter().map(|(w, s, _)| (w, s)).collect()
    }

    fn free(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (w, slots) in self.conns.iter().enumerate() {
            for (s, c) in slots.iter().enumerate() {
                if c.is_none() {
                    out.push((w, s));
                }
            }
        }
        out
    }

    fn of_db(&self, db: &str) -> Vec<(usize, usize)> {
        self.all()
            .into_iter()
            .filter(|(_, _, c)| c.db == db)
            .map(|(w, s, _)| (w, s))
            .collect()
    }

    /// Applies a step's actions with their plain-side outcomes.
    fn update(&mut self, step: &Step, outcomes: &[String]) {
        for (a, out) in step.actions.iter().zip(outcomes) {
            let w = match a {
                Action::Open { w, s, db } => {
                    if out.split_once(' ').is_some_and(|(_, t)| t == "ok") {
                        self.conns[*w][*s] = Some(ConnModel {
                            db: db.clone(),
                            in_txn: false,
                            sync_off: false,
                            off: false,
                        });
                    }
                    *w
                }
                Action::Exec { w, s, sql } | Action::Query { w, s, sql } => {
                    if let Some(c) = &mut self.conns[*w][*s] {
                        c.sync_off |= sql.contains("synchronous=OFF");
                        c.off |= sql.starts_with("PRAGMA journal_mode") && out.ends_with("'off'");
                    }
                    *w
                }
                Action::Close { w, .. } | Action::Attach { w, .. } => *w,
                Action::Kill { w } => {
                    for c in self.conns[*w].iter().flatten() {
                        self.hot.insert(c.db.clone());
                    }
                    self.conns[*w] = vec![None; SLOTS];
                    continue;
                }
                _ => continue,
            };
            // Every answer starts with the state of the worker's slots.
            let state = out.split(' ').next().unwrap_or("");
            if state.len() != SLOTS {
                continue;
            }
            for (s, ch) in state.chars().enumerate() {
                match ch {
                    '-' => self.conns[w][s] = None,
                    'a' | 't' => {
                        let c = self.conns[w][s].get_or_insert_with(|| ConnModel {
                            db: "?".into(),
                            in_txn: false,
                            sync_off: false,
                            off: false,
                        });
                        c.in_txn = ch == 't';
                    }
                    _ => {}
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Step generation

const CREATE_T1: &str = "CREATE TABLE IF NOT EXISTS t1(id INTEGER PRIMARY KEY, k TEXT, v BLOB)";
const CREATE_T2: &str = "CREATE TABLE IF NOT EXISTS t2(id INTEGER PRIMARY KEY, k TEXT, v BLOB); \
                         CREATE INDEX IF NOT EXISTS t2_k ON t2(k)";

fn table(rng: &mut Rng) -> &'static str {
    if rng.chance(60) {
        "t1"
    } else {
        "t2"
    }
}

fn insert_sql(rng: &mut Rng, table: &str) -> String {
    let rows = rng.range(1, 8);
    let values: Vec<String> = (0..rows)
        .map(|_| {
            let k = rng.range(0, 40);
            let v = rng.value_size();
            format!("('{}', {})", rng.text(k), rng.blob(v))
        })
        .collect();
    format!("INSERT INTO {table}(k, v) VALUES {}", values.join(", "))
}

fn update_sql(rng: &mut Rng, table: &str) -> String {
    let m = rng.range(2, 7);
    let r = rng.below(m);
    match rng.below(3) {
        0 => {
            let v = rng.value_size();
            format!(
                "UPDATE {table} SET v = {} WHERE id % {m} = {r}",
                rng.blob(v)
            )
        }
        1 => format!(
            "UPDATE {table} SET k = k || '{}' WHERE id % {m} = {r}",
            rng.text(3)
        ),
        _ => {
            let v = rng.value_size();
            format!(
                "UPDATE {table} SET v = {}, k = '{}' WHERE id = (SELECT max(id) FROM {table})",
                rng.blob(v),
                rng.text(8)
            )
        }
    }
}

fn delete_sql(rng: &mut Rng, table: &str) -> String {
    match rng.below(3) {
        0 => {
            let m = rng.range(2, 9);
            format!("DELETE FROM {table} WHERE id % {m} = {}", rng.below(m))
        }
        1 => format!(
            "DELETE FROM {table} WHERE id > (SELECT max(id) FROM {table}) - {}",
            rng.range(1, 5)
        ),
        _ => format!(
            "DELETE FROM {table} WHERE length(v) > {}",
            rng.range(200, 6000)
        ),
    }
}

fn write_sql(rng: &mut Rng) -> String {
    let t = table(rng);
    match rng.below(10) {
        0..=5 => insert_sql(rng, t),
        6..=7 => update_sql(rng, t),
        _ => delete_sql(rng, t),
    }
}

fn select_sql(rng: &mut Rng) -> String {
    let t = table(rng);
    match rng.below(4) {
        0 => format!("SELECT id, k, v FROM {t} ORDER BY id"),
        1 => format!("SELECT count(*), sum(length(v)), max(id), total(length(k)) FROM {t}"),
        2 => format!("SELECT k, length(v) FROM {t} ORDER BY k, id LIMIT 20"),
        _ => "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY name".to_string(),
    }
}

/// A transaction that writes far more than a 10-page cache holds, left open: its pages
/// spill into the `-wal`, or into the journal and the database file. Deterministic data.
fn spilling_sql(rng: &mut Rng) -> String {
    let rows = rng.range(300, 1200);
    let len = rng.range(500, 1500);
    let mul = rng.range(3, 99_991);
    format!(
        "PRAGMA cache_size=10; BEGIN IMMEDIATE; {CREATE_T1}; UPDATE t1 SET k = k || 'u'; \
         WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM s WHERE n<{rows}) \
         INSERT INTO t1(k, v) SELECT 'spill' || n, CAST(printf('%0{len}d', n * {mul}) AS BLOB) FROM s"
    )
}

/// Databases, WAL files and foreign files the driver makes in its scratch directory (once
/// per step; the same bytes are then written on both sides).
struct Scratch {
    dir: PathBuf,
    n: usize,
}

impl Scratch {
    fn path(&mut self, name: &str) -> PathBuf {
        self.n += 1;
        self.dir.join(format!("{}-{name}", self.n))
    }

    fn fill(rng: &mut Rng, c: &Connection, txns: usize) {
        c.execute_batch(&format!("{CREATE_T1}; {CREATE_T2}"))
            .unwrap();
        for _ in 0..txns {
            let t = table(rng);
            c.execute_batch(&insert_sql(rng, t)).unwrap();
        }
    }

    /// A database of `page_size` with some rows, in WAL mode (header bytes 18/19 = 2) or
    /// rollback mode.
    fn database(&mut self, rng: &mut Rng, page_size: usize, wal: bool) -> Vec<u8> {
        let p = self.path("src.db");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(&format!(
                "PRAGMA page_size={page_size}; PRAGMA journal_mode={};",
                if wal { "WAL" } else { "DELETE" }
            ))
            .unwrap();
            let txns = rng.range(1, 6);
            Scratch::fill(rng, &c, txns);
        }
        std::fs::read(&p).unwrap()
    }

    /// The `-wal` of a database of `page_size` (autocheckpoint off), read while its
    /// connection is still open: valid committed frames.
    fn wal(&mut self, rng: &mut Rng, page_size: usize) -> Vec<u8> {
        let p = self.path("walsrc.db");
        let c = Connection::open(&p).unwrap();
        c.execute_batch(&format!(
            "PRAGMA page_size={page_size}; PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;"
        ))
        .unwrap();
        let txns = rng.range(1, 5);
        Scratch::fill(rng, &c, txns);
        let mut wal = p.into_os_string();
        wal.push("-wal");
        let bytes = std::fs::read(&wal).unwrap();
        drop(c);
        bytes
    }
}

/// True if `path` is a rollback journal whose header is intact (not deleted, truncated or
/// zeroed): hot, unless a writer holds its lock.
fn journal_is_live(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|_| magic == [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7])
}

/// The page size in a database file's header, if it is an SQLite database.
fn page_size_of(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < 100 || &bytes[..16] != b"SQLite format 3\0" {
        return None;
    }
    match u16::from_be_bytes([bytes[16], bytes[17]]) {
        1 => Some(65536),
        n if n >= 512 && n.is_power_of_two() => Some(n as usize),
        _ => None,
    }
}

fn file_page_size(path: &Path) -> Option<usize> {
    use std::io::Read;
    let mut h = [0u8; 100];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut h))
        .ok()?;
    page_size_of(&h)
}

struct Generator<'a> {
    skip: &'a [String],
    rng: &'a mut Rng,
    model: &'a Model,
    plain: &'a Path,
    scratch: &'a mut Scratch,
}

impl Generator<'_> {
    fn any_conn(&mut self) -> Option<(usize, usize)> {
        let open = self.model.open();
        if open.is_empty() {
            None
        } else {
            Some(self.rng.pick(&open))
        }
    }

    /// `mode`, except OFF on a database that may hold a hot journal (DELETE instead; see
    /// [`Model::hot`]).
    fn mode_for(&self, db: &str, mode: &'static str) -> &'static str {
        if mode == "OFF" && self.model.hot.contains(db) {
            "DELETE"
        } else {
            mode
        }
    }

    /// A slot for a new connection: a free one, else one closed by `acts`.
    fn slot_for_open(&mut self, acts: &mut Vec<Action>) -> (usize, usize) {
        let free = self.model.free();
        if !free.is_empty() {
            return self.rng.pick(&free);
        }
        let (w, s) = self.any_conn().unwrap();
        acts.push(Action::Close { w, s });
        (w, s)
    }

    fn open_actions(&mut self, w: usize, s: usize, db: &str, acts: &mut Vec<Action>) {
        acts.push(Action::Open {
            w,
            s,
            db: db.to_string(),
        });
        if self.rng.chance(40) {
            let mode = self.rng.pick(&MODES);
            let mode = self.mode_for(db, mode);
            acts.push(Action::Query {
                w,
                s,
                sql: format!("PRAGMA journal_mode={mode}"),
            });
        }
        if self.rng.chance(25) {
            let sync = self.rng.pick(&["OFF", "NORMAL", "FULL"]);
            acts.push(Action::Exec {
                w,
                s,
                sql: format!("PRAGMA synchronous={sync}"),
            });
        }
        if self.rng.chance(60) {
            acts.push(Action::Exec {
                w,
                s,
                sql: format!("{CREATE_T1}; {CREATE_T2}"),
            });
        }
    }

    /// Closes every connection of `db` (no connection may have it open for what follows).
    fn close_db(&self, db: &str, acts: &mut Vec<Action>) -> Vec<(usize, usize)> {
        let conns = self.model.of_db(db);
        for &(w, s) in &conns {
            acts.push(Action::Close { w, s });
        }
        conns
    }

    /// Mostly (70%), brings `db` to a clean state before an outside write: its connections
    /// close, and one connection opens it and leaves WAL mode (rolling back a hot journal,
    /// checkpointing and deleting the WAL) and closes again. Without this, the stale
    /// journals and WALs of earlier steps make most outside writes corrupt the database
    /// (deterministically, but the replica checks then have little left to check).
    fn settle(&mut self, db: &str, acts: &mut Vec<Action>) -> Vec<(usize, usize)> {
        let mut closed = self.close_db(db, acts);
        if self.rng.chance(70) {
            let (w, s) = match closed.first() {
                Some(&slot) => slot,
                None => {
                    let slot = self.slot_for_open(acts);
                    closed.push(slot);
                    slot
                }
            };
            acts.push(Action::Open {
                w,
                s,
                db: db.into(),
            });
            acts.push(Action::Query {
                w,
                s,
                sql: "PRAGMA journal_mode=DELETE".into(),
            });
            acts.push(Action::Close { w, s });
        }
        closed
    }

    fn step(&mut self) -> Step {
        if self.model.open().is_empty() {
            return self.open_step("open");
        }
        let in_txn = self.model.all().iter().any(|(_, _, c)| c.in_txn);
        let kinds: Vec<(&str, usize)> = KINDS
            .iter()
            .filter(|(k, _)| !self.skip.iter().any(|s| s == k))
            .filter(|(k, _)| *k != "end" || in_txn)
            .copied()
            .collect();
        if kinds.is_empty() {
            return self.open_step("open");
        }
        let total: usize = kinds.iter().map(|k| k.1).sum();
        let mut r = self.rng.below(total);
        let mut kind = kinds[0].0;
        for &(k, weight) in &kinds {
            if r < weight {
                kind = k;
                break;
            }
            r -= weight;
        }
        match kind {
            "open" => self.open_step("open"),
            "reopen" => {
                let (w, s) = self.any_conn().unwrap();
                let db = self.model.conns[w][s].as_ref().unwrap().db.clone();
                let mut acts = vec![Action::Close { w, s }];
                self.open_actions(w, s, &db, &mut acts);
                Step {
                    what: "reopen".into(),
                    actions: acts,
                }
            }
            "recreate" => self.recreate_step(),
            "mv" | "cp" => self.replace_step(kind),
            "truncate" => {
                let db = self.rng.pick(&DBS);
                Step {
                    what: "truncate".into(),
                    actions: vec![Action::Truncate {
                        rel: db.into(),
                        set_len: self.rng.chance(50),
                    }],
                }
            }
            "wal" => self.wal_step(),
            "kill" => self.kill_step(),
            _ => self.conn_step(kind),
        }
    }

    fn open_step(&mut self, what: &str) -> Step {
        let mut acts = Vec::new();
        let (w, s) = self.slot_for_open(&mut acts);
        let db = self.rng.pick(&DBS);
        self.open_actions(w, s, db, &mut acts);
        Step {
            what: what.into(),
            actions: acts,
        }
    }

    /// A step on one open connection.
    fn conn_step(&mut self, kind: &str) -> Step {
        let with_txn = |want: bool| -> Vec<(usize, usize)> {
            self.model
                .all()
                .into_iter()
                .filter(|(_, _, c)| c.in_txn == want)
                .map(|(w, s, _)| (w, s))
                .collect()
        };
        let candidates = match kind {
            "end" => with_txn(true),
            // Mostly on a connection that can begin one (else: an error, compared too).
            "begin" | "transaction" if self.rng.chance(85) => with_txn(false),
            _ => Vec::new(),
        };
        let (w, s) = if candidates.is_empty() {
            self.any_conn().unwrap()
        } else {
            self.rng.pick(&candidates)
        };
        let rng = &mut *self.rng;
        let exec = |sql: String| Action::Exec { w, s, sql };
        let query = |sql: String| Action::Query { w, s, sql };
        let actions = match kind {
            "close" => vec![Action::Close { w, s }],
            "create" => vec![exec(format!("{CREATE_T1}; {CREATE_T2}"))],
            "write" => vec![exec(write_sql(rng))],
            "transaction" => {
                let n = rng.range(2, 6);
                let body: Vec<String> = (0..n).map(|_| write_sql(rng)).collect();
                let kind = rng.pick(&["", " IMMEDIATE", " EXCLUSIVE"]);
                let end = if rng.chance(70) { "COMMIT" } else { "ROLLBACK" };
                vec![exec(format!("BEGIN{kind}; {}; {end}", body.join("; ")))]
            }
            "begin" => {
                // A transaction left open: a read, or writes, for later steps to meet.
                let kind = rng.pick(&["", " IMMEDIATE", " EXCLUSIVE"]);
                let body = if rng.chance(30) {
                    select_sql(rng)
                } else {
                    write_sql(rng)
                };
                vec![exec(format!("BEGIN{kind}; {body}"))]
            }
            "end" => match rng.below(5) {
                0 => vec![exec("ROLLBACK".into())],
                1 => vec![exec(format!(
                    "SAVEPOINT sp; {}; ROLLBACK TO sp; RELEASE sp; COMMIT",
                    write_sql(rng)
                ))],
                2 => vec![exec(format!("{}; COMMIT", write_sql(rng)))],
                _ => vec![exec("COMMIT".into())],
            },
            "select" => vec![query(select_sql(rng))],
            "integrity_check" => vec![query("PRAGMA integrity_check".into())],
            "page_size" => {
                let ps = rng.pick(&PAGE_SIZES);
                vec![
                    exec(format!("PRAGMA page_size={ps}; VACUUM")),
                    query("PRAGMA page_size".into()),
                ]
            }
            "journal_mode" => {
                let mode = rng.pick(&MODES);
                let db = &self.model.conns[w][s].as_ref().unwrap().db;
                let mode = if mode == "OFF" && self.model.hot.contains(db) {
                    "DELETE"
                } else {
                    mode
                };
                vec![query(format!("PRAGMA journal_mode={mode}"))]
            }
            "synchronous" => {
                let sync = rng.pick(&["OFF", "NORMAL", "FULL"]);
                vec![
                    exec(format!("PRAGMA synchronous={sync}")),
                    query("PRAGMA synchronous".into()),
                ]
            }
            "locking_mode" => {
                let mode = if rng.chance(50) {
                    "EXCLUSIVE"
                } else {
                    "NORMAL"
                };
                let mut a = vec![query(format!("PRAGMA locking_mode={mode}"))];
                if rng.chance(50) {
                    // The lock is taken (or given up) at the next access.
                    a.push(query("SELECT count(*) FROM sqlite_schema".into()));
                }
                a
            }
            "checkpoint" => {
                let mode = rng.pick(&["PASSIVE", "FULL", "RESTART", "TRUNCATE"]);
                vec![query(format!("PRAGMA wal_checkpoint({mode})"))]
            }
            "autocheckpoint" => {
                let n = rng.pick(&[0, 1, 3, 10, 100, 1000]);
                vec![query(format!("PRAGMA wal_autocheckpoint={n}"))]
            }
            "attach" => {
                let me = self.model.conns[w][s].as_ref().unwrap().db.clone();
                let others: Vec<&str> = DBS.iter().copied().filter(|d| *d != me).collect();
                let other = rng.pick(&others);
                let sql = match rng.below(3) {
                    0 => format!(
                        "BEGIN; {CREATE_T1}; CREATE TABLE IF NOT EXISTS aux.t1(id INTEGER PRIMARY KEY, k TEXT, v BLOB); \
                         INSERT INTO main.t1(k, v) SELECT k, v FROM aux.t1 ORDER BY id LIMIT {}; \
                         {}; COMMIT",
                        rng.range(1, 30),
                        insert_sql(rng, "aux.t1")
                    ),
                    1 => format!(
                        "INSERT INTO aux.t1(k, v) SELECT k, v FROM main.t1 WHERE id % {} = 0",
                        rng.range(2, 5)
                    ),
                    _ => format!(
                        "BEGIN; DELETE FROM aux.t1 WHERE id % 3 = 1; {}; ROLLBACK",
                        insert_sql(rng, "main.t1")
                    ),
                };
                vec![Action::Attach {
                    w,
                    s,
                    db: other.into(),
                    sql,
                }]
            }
            other => panic!("unknown step kind {other}"),
        };
        Step {
            what: kind.into(),
            actions,
        }
    }

    /// Deletes a database (its connections closed first) and creates it anew at the same
    /// path with another page size.
    fn recreate_step(&mut self) -> Step {
        let db = self.rng.pick(&DBS);
        let mut acts = Vec::new();
        let closed = self.close_db(db, &mut acts);
        for suffix in ["", "-wal", "-journal"] {
            acts.push(Action::Unlink {
                rel: format!("{db}{suffix}"),
            });
        }
        let (w, s) = match closed.first() {
            Some(&slot) => slot,
            None => self.slot_for_open(&mut acts),
        };
        let ps = self.rng.pick(&PAGE_SIZES);
        let mode = self.rng.pick(&MODES);
        acts.push(Action::Open {
            w,
            s,
            db: db.into(),
        });
        acts.push(Action::Exec {
            w,
            s,
            sql: format!("PRAGMA page_size={ps}"),
        });
        acts.push(Action::Query {
            w,
            s,
            sql: format!("PRAGMA journal_mode={mode}"),
        });
        let t = table(self.rng);
        acts.push(Action::Exec {
            w,
            s,
            sql: format!("{CREATE_T1}; {CREATE_T2}; {}", insert_sql(self.rng, t)),
        });
        Step {
            what: format!("recreate {db} with page size {ps}"),
            actions: acts,
        }
    }

    /// `mv` or `cp` of another database over one (that connections may have open): a
    /// database the driver made, or the main file of another database of the set.
    fn replace_step(&mut self, kind: &str) -> Step {
        let db = self.rng.pick(&DBS);
        let others: Vec<&str> = DBS.iter().copied().filter(|d| *d != db).collect();
        let other = self.rng.pick(&others);
        let made = self.rng.chance(60);
        let target = if kind == "mv" { "mv.tmp" } else { db };
        let mut acts = Vec::new();
        if self.rng.chance(60) {
            self.settle(db, &mut acts);
        }
        if made {
            let ps = self.rng.pick(&PAGE_SIZES);
            let wal = self.rng.chance(50);
            let bytes = self.scratch.database(self.rng, ps, wal);
            acts.push(Action::Write {
                rel: target.into(),
                what: format!(
                    "a database of page size {ps} in {} mode",
                    if wal { "WAL" } else { "rollback" }
                ),
                bytes: Arc::new(bytes),
            });
        } else {
            acts.push(Action::Copy {
                from: other.into(),
                to: target.into(),
            });
        }
        if kind == "mv" {
            acts.push(Action::Rename {
                from: "mv.tmp".into(),
                to: db.into(),
            });
        }
        Step {
            what: format!("{kind} over {db}"),
            actions: acts,
        }
    }

    /// A hand-written `-wal` for a database no connection has open; then (mostly) a
    /// connection opens it.
    fn wal_step(&mut self) -> Step {
        let db = self.rng.pick(&DBS);
        let mut acts = Vec::new();
        let closed = if self.rng.chance(60) {
            self.settle(db, &mut acts)
        } else {
            self.close_db(db, &mut acts)
        };
        // The page size of the database as it will be once its connections are closed (a
        // last close checkpoints, which does not change it).
        let ps = file_page_size(&self.plain.join(db)).unwrap_or(4096);
        let (what, bytes) = match self.rng.below(4) {
            0 => {
                let others: Vec<usize> = PAGE_SIZES.iter().copied().filter(|&p| p != ps).collect();
                let other = self.rng.pick(&others);
                (
                    format!("the -wal of another database of page size {other}"),
                    self.scratch.wal(self.rng, other),
                )
            }
            1 => {
                // Valid frames, under the header (salts, checksum) of another WAL: no
                // frame matches the header's salts.
                let frames = self.scratch.wal(self.rng, ps);
                let other = self.scratch.wal(self.rng, ps);
                let mut bytes = other[..32].to_vec();
                bytes.extend_from_slice(&frames[32..]);
                (
                    format!("frames of page size {ps} under the salts of another WAL"),
                    bytes,
                )
            }
            2 => {
                let wal = self.scratch.wal(self.rng, ps);
                let frames = self.rng.range(1, 4);
                let mut bytes = wal[..32].to_vec();
                bytes.extend(self.rng.bytes(frames * (24 + ps)));
                (
                    format!("a valid header of page size {ps}, then {frames} garbage frames"),
                    bytes,
                )
            }
            _ => (
                format!("the -wal of another database of the same page size {ps}"),
                self.scratch.wal(self.rng, ps),
            ),
        };
        acts.push(Action::Write {
            rel: format!("{db}-wal"),
            what: what.clone(),
            bytes: Arc::new(bytes),
        });
        if self.rng.chance(75) {
            let (w, s) = match closed.first() {
                Some(&slot) => slot,
                None => self.slot_for_open(&mut acts),
            };
            acts.push(Action::Open {
                w,
                s,
                db: db.into(),
            });
            let sql = match self.rng.below(3) {
                0 => "PRAGMA integrity_check".to_string(),
                1 => "SELECT count(*) FROM t1".to_string(),
                _ => "SELECT type, name, tbl_name FROM sqlite_schema ORDER BY name".to_string(),
            };
            acts.push(Action::Query { w, s, sql });
        }
        Step {
            what: format!("hand-written {db}-wal: {what}"),
            actions: acts,
        }
    }

    /// A worker writes a transaction that spills past a 10-page cache, leaves it open, and
    /// is killed with SIGKILL once it answered.
    fn kill_step(&mut self) -> Step {
        let w = self.rng.below(WORKERS);
        let mut acts = Vec::new();
        let open: Vec<usize> = (0..SLOTS)
            .filter(|&s| self.model.conns[w][s].is_some())
            .collect();
        let s = if !open.is_empty() && self.rng.chance(70) {
            self.rng.pick(&open)
        } else {
            let s = self.rng.below(SLOTS);
            if self.model.conns[w][s].is_some() {
                acts.push(Action::Close { w, s });
            }
            let db = self.rng.pick(&DBS);
            acts.push(Action::Open {
                w,
                s,
                db: db.into(),
            });
            s
        };
        acts.push(Action::Exec {
            w,
            s,
            sql: spilling_sql(self.rng),
        });
        acts.push(Action::Kill { w });
        // The databases the killed worker had open may now hold a hot journal. One that a
        // connection in journal mode OFF has open is recovered at once by a new connection
        // (see [`Model::hot`]).
        let mut dbs: Vec<String> = (0..SLOTS)
            .filter_map(|slot| self.model.conns[w][slot].as_ref().map(|c| c.db.clone()))
            .collect();
        for a in &acts {
            if let Action::Open { db, .. } = a {
                dbs.push(db.clone());
            }
        }
        dbs.sort();
        dbs.dedup();
        for db in dbs {
            let off_elsewhere = self
                .model
                .all()
                .iter()
                .any(|(ow, _, c)| *ow != w && c.db == db && c.off);
            if off_elsewhere {
                acts.push(Action::Open {
                    w,
                    s: 0,
                    db: db.clone(),
                });
                acts.push(Action::Query {
                    w,
                    s: 0,
                    sql: "SELECT count(*) FROM sqlite_schema".into(),
                });
                acts.push(Action::Close { w, s: 0 });
            }
        }
        Step {
            what: "kill -9 a writer mid-transaction".into(),
            actions: acts,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Expected images and restores

/// What a database name holds, as SQLite would see it.
#[derive(PartialEq)]
enum Image {
    /// The committed database: the main file once SQLite has recovered it (a hot journal
    /// rolled back, the WAL's committed frames checkpointed).
    Valid(Vec<u8>),
    /// Not a valid, non-empty database (absent, empty, garbage, corrupt), and why.
    Skip(String),
}

/// The committed image of `rel` in `dir`: its main file, `-wal` and `-journal` (never the
/// `-shm`) are copied into a fresh scratch directory, where SQLite opens the copy (rolling
/// back a hot journal, recovering the WAL's committed frames), checkpoints it with
/// TRUNCATE and closes it; the image is then the main file's first N pages, N being the
/// database size SQLite uses: the header's page count (offset 28) when it is valid (not 0,
/// and the change counter at offset 24 equals the version-valid-for number at offset 92),
/// else the file's size in pages (btree.c, lockBtree), counting a partial last page as a
/// page, read as zeros past the end of the file (the pager rounds up: a file whose length
/// is not a multiple of the page size, as a checkpoint of a log of a smaller page size
/// leaves it, has `PRAGMA page_count` pages). The file can be longer than that:
/// a writer killed mid-transaction in journal mode OFF or MEMORY leaves the pages it
/// spilled past the end, which SQLite ignores (and overwrites or truncates later); they
/// are not part of the database, and a restore rightly holds N pages.
///
/// Header bytes 18/19 (1 = rollback, 2 = WAL) are kept exactly as SQLite leaves them: a
/// checkpoint copies the WAL's pages verbatim (page 1 of a WAL database says 2/2, of a
/// rollback database 1/1), and changing the journal mode here would rewrite them. A WAL
/// restore applies the same page 1, so the comparison with the replica is exact, bytes
/// 18/19 included. The image is not defined (and the database is skipped, counted) when
/// SQLite cannot read the copy, its `integrity_check` fails (walfs restore refuses such
/// content by design), or its WAL cannot be checkpointed away.
fn expected_image(dir: &Path, rel: &str, scratch: &mut Scratch) -> Image {
    let src = dir.join(rel);
    match std::fs::metadata(&src) {
        Err(_) => return Image::Skip("absent".into()),
        Ok(m) if m.len() == 0 => return Image::Skip("empty".into()),
        Ok(_) => {}
    }
    let work = scratch.path("image");
    std::fs::create_dir_all(&work).unwrap();
    let db = work.join("x.db");
    if let Err(e) = std::fs::copy(&src, &db) {
        return Image::Skip(format!("cannot copy: {e}"));
    }
    for suffix in ["-wal", "-journal"] {
        let from = dir.join(format!("{rel}{suffix}"));
        if from.exists() {
            if let Err(e) = std::fs::copy(&from, work.join(format!("x.db{suffix}"))) {
                return Image::Skip(format!("cannot copy {suffix}: {e}"));
            }
        }
    }
    let checked = (|| -> rusqlite::Result<String> {
        let c = Connection::open(&db)?;
        c.busy_timeout(Duration::ZERO)?;
        c.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
            r.get::<_, i64>(0)
        })?;
        let busy: i64 = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        let ic: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        c.close().map_err(|(_, e)| e)?;
        Ok(if busy != 0 {
            format!("checkpoint busy ({busy})")
        } else {
            ic
        })
    })();
    match checked {
        Err(e) => return Image::Skip(format!("SQLite cannot read it: {e}")),
        Ok(ic) if ic != "ok" => return Image::Skip(format!("integrity_check: {ic}")),
        Ok(_) => {}
    }
    if std::fs::metadata(work.join("x.db-wal")).is_ok_and(|m| m.len() > 0) {
        return Image::Skip("its WAL was not checkpointed away".into());
    }
    let mut bytes = std::fs::read(&db).unwrap();
    let _ = std::fs::remove_dir_all(&work);
    if bytes.is_empty() {
        return Image::Skip("empty once recovered".into());
    }
    let Some(ps) = page_size_of(&bytes) else {
        return Image::Skip("no valid header once recovered".into());
    };
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let in_header = be32(28);
    let file_pages = bytes.len().div_ceil(ps);
    let pages = if in_header != 0 && be32(24) == be32(92) {
        in_header.min(file_pages)
    } else {
        file_pages
    };
    bytes.resize(pages * ps, 0);
    Image::Valid(bytes)
}

/// How a restore `got` differs from the expected image `want`, if it does: sizes and
/// differing pages. Every byte is compared, except the contents of the pages that are
/// freelist leaves in `want` (the freelist itself, its trunk pages and the header's count,
/// is compared exactly). Those contents are not part of the database, and SQLite does not
/// journal a freelist leaf it reuses: after a transaction that spilled into such a page
/// was rolled back (ROLLBACK, or a killed writer's hot journal), the live file's free page
/// holds that transaction's uncommitted bytes, which a replica must not hold (walfs
/// captures only committed pages). No expected image can define them, so they are left
/// out; the count of such pages is reported.
fn image_diff(want: &[u8], got: &[u8], ignored: &mut u64) -> Option<String> {
    if want == got {
        return None;
    }
    let ps = page_size_of(want).unwrap_or(4096);
    let free_leaves: Vec<usize> = freelist(want, ps)
        .into_iter()
        .filter(|(_, trunk)| !trunk)
        .map(|(p, _)| p)
        .collect();
    if want.len() == got.len() {
        let mut skipped = 0;
        let rest_equal = (0..want.len() / ps).all(|i| {
            let same = want[i * ps..(i + 1) * ps] == got[i * ps..(i + 1) * ps];
            if !same && free_leaves.contains(&(i + 1)) {
                skipped += 1;
                return true;
            }
            same
        });
        if rest_equal {
            *ignored += skipped;
            return None;
        }
    }
    page_diff(want, got)
}

/// How `got` differs from `want` (None if equal): sizes and differing pages.
fn page_diff(want: &[u8], got: &[u8]) -> Option<String> {
    if want == got {
        return None;
    }
    let ps = page_size_of(want).unwrap_or(4096);
    let pages = want.len().min(got.len()) / ps;
    let differing: Vec<usize> = (0..pages)
        .filter(|&i| want[i * ps..(i + 1) * ps] != got[i * ps..(i + 1) * ps])
        .map(|i| i + 1)
        .collect();
    let mut s = format!(
        "expected {} bytes ({} pages of {ps}), restored {} bytes (page size in its header: {:?}); \
         {} of the {pages} common pages differ: {:?}",
        want.len(),
        want.len() / ps,
        got.len(),
        page_size_of(got),
        differing.len(),
        &differing[..differing.len().min(20)]
    );
    let free = freelist(want, ps);
    let kinds: Vec<String> = differing
        .iter()
        .take(8)
        .map(|&pg| {
            let (a, b) = (&want[(pg - 1) * ps..pg * ps], &got[(pg - 1) * ps..pg * ps]);
            let off = if pg == 1 { 100 } else { 0 };
            let bytes = a.iter().zip(b).filter(|(x, y)| x != y).count();
            let role = match free.iter().find(|(p, _)| *p == pg) {
                Some((_, true)) => "freelist trunk",
                Some((_, false)) => "freelist leaf",
                None => "in use or overflow",
            };
            format!(
                "page {pg}: {role}, type byte expected {:#04x} restored {:#04x}, {bytes} bytes differ",
                a[off], b[off]
            )
        })
        .collect();
    s.push_str(&format!("; {}", kinds.join("; ")));
    if differing.first() == Some(&1) {
        let offsets: Vec<String> = (0..ps)
            .filter(|&i| want[i] != got[i])
            .take(12)
            .map(|i| format!("{i}: {} vs {}", want[i], got[i]))
            .collect();
        s.push_str(&format!(
            "; page 1 differs at byte offsets (expected vs restored) [{}] (18/19: 1 = rollback, \
             2 = WAL; 24-27: change counter; 28-31: page count; 92-95: version-valid-for)",
            offsets.join(", ")
        ));
    }
    Some(s)
}

/// The freelist pages of a database image: (page, is a trunk page).
fn freelist(db: &[u8], ps: usize) -> Vec<(usize, bool)> {
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let pages = db.len() / ps;
    let mut out = Vec::new();
    if page_size_of(db) != Some(ps) {
        return out;
    }
    let mut trunk = be32(db, 32);
    while trunk != 0 && trunk <= pages && out.len() < pages {
        out.push((trunk, true));
        let page = &db[(trunk - 1) * ps..trunk * ps];
        let n = be32(page, 4).min((ps - 8) / 4);
        for i in 0..n {
            out.push((be32(page, 8 + 4 * i), false));
        }
        trunk = be32(page, 0);
    }
    out
}

/// The TXID a restore log reports ("restored X at TXID N ...").
fn restored_txid(log: &str) -> Option<u64> {
    let at = log.find(" at TXID ")? + 9;
    log[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// `walfs restore URL --db REL -o OUT [--txid N]`: the restored bytes and TXID, or the
/// error.
fn restore(url: &str, rel: &str, out: &Path, txid: Option<u64>) -> Result<(Vec<u8>, u64), String> {
    let _ = std::fs::remove_file(out);
    let mut cmd = Command::new(common::WALFS);
    cmd.args(["restore", url, "--db", rel, "-o"]).arg(out);
    if let Some(t) = txid {
        cmd.args(["--txid", &t.to_string()]);
    }
    let o = cmd
        .output()
        .map_err(|e| format!("cannot run walfs restore: {e}"))?;
    let log = String::from_utf8_lossy(&o.stderr).trim().to_string();
    if !o.status.success() {
        return Err(format!("walfs restore failed: {log}"));
    }
    let txid = restored_txid(&log).ok_or_else(|| format!("no TXID in the restore log: {log}"))?;
    let bytes = std::fs::read(out).map_err(|e| format!("cannot read the restored file: {e}"))?;
    Ok((bytes, txid))
}

// ---------------------------------------------------------------------------------------
// Sequences

#[derive(Default)]
struct Stats {
    sequences: u64,
    steps: u64,
    quiet_points: u64,
    /// Restores that matched a quiet point's image.
    quiet_restores: u64,
    /// Point-in-time restores (`--txid`) checked at the ends of sequences.
    restores_checked: u64,
    /// Databases skipped at a quiet point (not valid on the plain side).
    skipped: u64,
    /// Why they were skipped (the reason's first words), with counts.
    skip_reasons: std::collections::BTreeMap<String, u64>,
    /// Freelist leaf pages whose (undefined) contents differed, not compared.
    free_leaves: u64,
    mismatches: Vec<String>,
}

struct Record {
    rel: String,
    txid: u64,
    image: Arc<Vec<u8>>,
}

struct Sequence<'a> {
    cfg: &'a Config,
    index: u64,
    seed: u64,
    rng: Rng,
    // Dropped in this order (on a panic): the workers, the mount, then the directories
    // (plain side, replica, staging, scratch).
    plain: Side,
    walfs: Side,
    mount: Mount,
    tmp: tempfile::TempDir,
    model: Model,
    scratch: Scratch,
    step_no: usize,
    records: Vec<Record>,
    /// How much of the daemon's log was checked for errors (whole lines).
    log_seen: usize,
    /// The last steps, shortened, for the report of a mismatch.
    recent: std::collections::VecDeque<String>,
}

/// A mismatch: what differed, at which step (the sequence is abandoned after it).
struct Failure {
    step: String,
    what: String,
}

impl Sequence<'_> {
    fn url(&self) -> String {
        format!("file://{}", self.tmp.path().join("replica").display())
    }

    fn describe(&self, f: &Failure) -> String {
        let recent: Vec<&str> = self.recent.iter().map(String::as_str).collect();
        format!(
            "seed {:#x}, sequence {} (its seed {:#x}), step {}: {}\n  step: {}\n  what: {}\n  \
             replay: {}\n  the last steps (WALFS_FUZZ_VERBOSE=1 shows all, with outcomes):\n    \
             {}\n  daemon log (warnings and errors):\n{}",
            self.cfg.seed,
            self.index,
            self.seed,
            self.step_no,
            f.what.lines().next().unwrap_or(""),
            f.step,
            f.what,
            self.cfg.replay(self.index),
            recent.join("\n    "),
            log_excerpt(&self.mount.log())
        )
    }

    /// Runs `step` on both sides at once and compares the outcomes and the listings.
    fn run(&mut self, step: Step, stats: &mut Stats) -> Result<(), Failure> {
        self.step_no += 1;
        stats.steps += 1;
        if self.recent.len() == 8 {
            self.recent.pop_front();
        }
        self.recent.push_back(format!(
            "step {}: {}",
            self.step_no,
            shorten(&step.to_string(), 400)
        ));
        let (plain_out, walfs_out) = std::thread::scope(|sc| {
            let plain = &mut self.plain;
            let step = &step;
            let h = sc.spawn(move || plain.run(step));
            let b = self.walfs.run(step);
            (h.join().expect("the plain side's thread panicked"), b)
        });
        let (plain_ls, walfs_ls) = (self.plain.listing(), self.walfs.listing());
        if self.cfg.verbose {
            eprintln!("fuzz: seq {} step {}: {step}", self.index, self.step_no);
            for (i, o) in plain_out.iter().enumerate() {
                eprintln!("      [{i}] {}", shorten(o, 300));
            }
            eprintln!("      files: {plain_ls}");
        }
        let fail = |what: String| Failure {
            step: step.to_string(),
            what,
        };
        for (i, (a, b)) in plain_out.iter().zip(&walfs_out).enumerate() {
            if a != b || a.contains("!worker") {
                return Err(fail(format!(
                    "action [{i}] {} answered differently:\n    plain: {a}\n    walfs: {b}\n    \
                     files plain: {plain_ls}\n    files walfs: {walfs_ls}",
                    step.actions[i]
                )));
            }
        }
        if plain_ls != walfs_ls {
            return Err(fail(format!(
                "the directory listings differ:\n    plain: {plain_ls}\n    walfs: {walfs_ls}"
            )));
        }
        self.model.update(&step, &plain_out);
        let plain = &self.plain.dir;
        self.model
            .hot
            .retain(|db| journal_is_live(&plain.join(format!("{db}-journal"))));
        // An error inside walfs that SQLite did not see (a close's EIO is not reported to
        // the application) is a mismatch too. Captures at a close run after the close
        // returned, so an error may show up a step late: "during or just after".
        let log = self.mount.log();
        let upto = log.rfind('\n').map_or(0, |i| i + 1).max(self.log_seen);
        let bad = bad_log_lines(&log[self.log_seen..upto]);
        self.log_seen = upto;
        if !bad.is_empty() {
            return Err(fail(format!(
                "walfs logged {} error line(s) during or just after this step, although SQLite's \
                 outcomes matched:\n    {}",
                bad.len(),
                bad[..bad.len().min(20)].join("\n    ")
            )));
        }
        Ok(())
    }

    /// Ends every open transaction (COMMIT or ROLLBACK, then ROLLBACK of what is left) and
    /// closes every connection of a database that a connection with `synchronous=OFF` has
    /// open: without fsyncs, commits in PERSIST, MEMORY and OFF mode (and in exclusive
    /// locking mode) are captured only when the database is closed (docs/SEMANTICS.md).
    fn quiesce(&mut self, stats: &mut Stats) -> Result<(), Failure> {
        for round in 0..3 {
            let mut actions = Vec::new();
            let unsynced: Vec<String> = self
                .model
                .all()
                .iter()
                .filter(|(_, _, c)| c.sync_off)
                .map(|(_, _, c)| c.db.clone())
                .collect();
            for (w, s, c) in self.model.all() {
                if c.in_txn {
                    let sql = if round == 0 && self.rng.chance(50) {
                        "COMMIT"
                    } else {
                        "ROLLBACK"
                    };
                    actions.push(Action::Exec {
                        w,
                        s,
                        sql: sql.into(),
                    });
                }
                if round > 0 && unsynced.contains(&c.db) {
                    actions.push(Action::Close { w, s });
                }
            }
            if actions.is_empty() {
                if round > 0 {
                    return Ok(());
                }
                continue;
            }
            self.run(
                Step {
                    what: "quiet point".into(),
                    actions,
                },
                stats,
            )?;
        }
        if let Some((w, s, _)) = self.model.all().into_iter().find(|(_, _, c)| c.in_txn) {
            panic!(
                "harness: w{w}.{s} is still in a transaction after ROLLBACK (sequence {}, step {})",
                self.index, self.step_no
            );
        }
        Ok(())
    }

    /// The replica checks of a quiet point: for each database, the expected image on the
    /// plain side equals the one from the mount's backing files, and a restore reaches it
    /// within [`RESTORE_PATIENCE`]; the TXID is recorded.
    fn check_replica(&mut self, stats: &mut Stats) -> Result<(), Failure> {
        stats.quiet_points += 1;
        let url = self.url();
        let out = self.tmp.path().join("restored.db");
        for rel in DBS {
            let fail = |what: String| Failure {
                step: format!("replica check of {rel} at a quiet point"),
                what,
            };
            // Transparency: the main files are byte-identical (only the WAL's salts and the
            // journal's nonce are random, and those are not in the main file).
            let raw_plain = std::fs::read(self.plain.dir.join(rel)).ok();
            let raw_backing = std::fs::read(self.mount.backing.join(rel)).ok();
            if raw_plain != raw_backing {
                let detail = match (&raw_plain, &raw_backing) {
                    (Some(a), Some(b)) => page_diff(a, b).unwrap_or_default(),
                    (a, b) => format!("present: plain {}, backing {}", a.is_some(), b.is_some()),
                };
                return Err(fail(format!(
                    "the backing file {rel} differs from the plain side's: {detail}"
                )));
            }
            let want = expected_image(&self.plain.dir, rel, &mut self.scratch);
            let backing = expected_image(&self.mount.backing, rel, &mut self.scratch);
            if want != backing {
                let describe = |i: &Image| match i {
                    Image::Valid(b) => format!("a valid database of {} bytes", b.len()),
                    Image::Skip(why) => format!("no database ({why})"),
                };
                let detail = match (&want, &backing) {
                    (Image::Valid(a), Image::Valid(b)) => page_diff(a, b).unwrap_or_default(),
                    _ => String::new(),
                };
                return Err(fail(format!(
                    "the backing files of {rel} are not what the plain side holds: plain {}, \
                     backing {} {detail}",
                    describe(&want),
                    describe(&backing)
                )));
            }
            let want = match want {
                Image::Valid(b) => b,
                Image::Skip(why) => {
                    stats.skipped += 1;
                    let class = why
                        .split([':', '('])
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string();
                    *stats.skip_reasons.entry(class).or_default() += 1;
                    if self.cfg.verbose {
                        eprintln!("fuzz: seq {} quiet point: {rel} skipped: {why}", self.index);
                    }
                    continue;
                }
            };
            let deadline = Instant::now() + RESTORE_PATIENCE;
            loop {
                let got = restore(&url, rel, &out, None);
                let last = match &got {
                    Ok((bytes, txid)) => match image_diff(&want, bytes, &mut stats.free_leaves) {
                        None => {
                            stats.quiet_restores += 1;
                            if !self.records.iter().any(|r| r.rel == rel && r.txid == *txid) {
                                self.records.push(Record {
                                    rel: rel.into(),
                                    txid: *txid,
                                    image: Arc::new(want),
                                });
                            }
                            break;
                        }
                        Some(d) => format!("the restore (TXID {txid}) differs: {d}"),
                    },
                    Err(e) => e.clone(),
                };
                if Instant::now() > deadline {
                    let hint = self.after_hot_rollback(rel, &want, &url, &out);
                    return Err(fail(format!(
                        "{rel}: the replica did not reach the committed image within \
                         {RESTORE_PATIENCE:?}; last: {last}{hint}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// For the report of a replica mismatch while `rel` has a hot journal (a killed
    /// writer's): rolls the journal back on both sides (as the next opener would; the
    /// sequence ends with this mismatch anyway) and says whether the replica then reaches
    /// the committed image.
    fn after_hot_rollback(&self, rel: &str, want: &[u8], url: &str, out: &Path) -> String {
        if !journal_is_live(&self.plain.dir.join(format!("{rel}-journal"))) {
            return String::new();
        }
        for dir in [&self.plain.dir, &self.walfs.dir] {
            let rolled = Connection::open(dir.join(rel)).and_then(|c| {
                c.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
                    r.get::<_, i64>(0)
                })
            });
            if let Err(e) = rolled {
                return format!(" (a hot journal was present; rolling it back failed: {e})");
            }
        }
        let start = Instant::now();
        while start.elapsed() < RESTORE_PATIENCE {
            if let Ok((bytes, txid)) = restore(url, rel, out, None) {
                if image_diff(want, &bytes, &mut 0).is_none() {
                    return format!(
                        " (a killed writer's hot journal was present: once the driver rolled \
                         it back, the replica reached the committed image in {:.1} s, at TXID \
                         {txid})",
                        start.elapsed().as_secs_f64()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        " (a killed writer's hot journal was present; the replica still differs after the \
         driver rolled it back)"
            .to_string()
    }

    fn steps(&mut self, stats: &mut Stats) -> Result<(), Failure> {
        let mut next_quiet = self.rng.range(10, 25);
        for i in 0..self.cfg.steps {
            let step = Generator {
                skip: &self.cfg.skip,
                rng: &mut self.rng,
                model: &self.model,
                plain: &self.plain.dir,
                scratch: &mut self.scratch,
            }
            .step();
            self.run(step, stats)?;
            if i + 1 == next_quiet || i + 1 == self.cfg.steps {
                self.quiesce(stats)?;
                self.check_replica(stats)?;
                next_quiet += self.rng.range(10, 25);
            }
        }
        Ok(())
    }

    /// After the workers quit and the daemon stopped: the replica holds the final state of
    /// every database, and every recorded TXID restores to its image.
    fn final_checks(&mut self, stats: &mut Stats) -> Result<(), Failure> {
        let url = self.url();
        let out = self.tmp.path().join("restored.db");
        for rel in DBS {
            let fail = |what: String| Failure {
                step: format!("final check of {rel} after the workers quit and walfs stopped"),
                what,
            };
            let want = expected_image(&self.plain.dir, rel, &mut self.scratch);
            let backing = expected_image(&self.mount.backing, rel, &mut self.scratch);
            if want != backing {
                return Err(fail(format!(
                    "{rel}: the backing files differ from the plain side's after the workers quit"
                )));
            }
            if let Image::Valid(want) = want {
                match restore(&url, rel, &out, None) {
                    Ok((bytes, txid)) => {
                        if let Some(d) = image_diff(&want, &bytes, &mut stats.free_leaves) {
                            return Err(fail(format!(
                                "{rel}: the latest restore (TXID {txid}) after the stop differs: {d}"
                            )));
                        }
                    }
                    Err(e) => return Err(fail(format!("{rel}: {e}"))),
                }
            }
        }
        for r in &self.records {
            stats.restores_checked += 1;
            let result = restore(&url, &r.rel, &out, Some(r.txid));
            let problem = match result {
                Ok((bytes, txid)) if txid == r.txid => {
                    image_diff(&r.image, &bytes, &mut stats.free_leaves)
                }
                Ok((_, txid)) => Some(format!("asked for TXID {}, got {txid}", r.txid)),
                Err(e) => Some(e),
            };
            if let Some(p) = problem {
                return Err(Failure {
                    step: format!("point-in-time restore of {} at TXID {}", r.rel, r.txid),
                    what: format!("{}: {p}", r.rel),
                });
            }
        }
        Ok(())
    }
}

/// The WARN/ERROR lines of a daemon log (the last 60).
fn log_excerpt(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
        .collect();
    let from = lines.len().saturating_sub(60);
    let mut s = String::new();
    for l in &lines[from..] {
        s.push_str("    ");
        s.push_str(&shorten(l, 600));
        s.push('\n');
    }
    if s.is_empty() {
        s.push_str("    (none)\n");
    }
    s
}

/// Log lines that mean walfs failed: an error, an EIO, a panic. (WARNs such as a capture
/// healed with a snapshot, or a history restarted, are allowed.)
fn bad_log_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains(" ERROR ")
                || l.contains("EIO")
                || l.contains("failing the operation")
                || l.contains("panicked")
        })
        .map(|l| shorten(l, 600))
        .collect()
}

fn run_sequence(cfg: &Config, index: u64, stats: &mut Stats) {
    let seed = cfg.sequence_seed(index);
    let mismatches_before = stats.mismatches.len();
    let tmp = tempfile::Builder::new()
        .prefix("walfs-fuzz-")
        .tempdir()
        .unwrap();
    let plain_dir = tmp.path().join("plain");
    let scratch_dir = tmp.path().join("scratch");
    std::fs::create_dir_all(plain_dir.join("sub")).unwrap();
    std::fs::create_dir_all(&scratch_dir).unwrap();
    let args = [
        "--replica".to_string(),
        format!("file://{}", tmp.path().join("replica").display()),
        "--staging-dir".to_string(),
        tmp.path().join("staging").display().to_string(),
        "--sync-interval".to_string(),
        "100ms".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mount = Mount::with_env(&args, &[]);
    std::fs::create_dir_all(mount.path("sub")).unwrap();
    let mut seq = Sequence {
        cfg,
        index,
        seed,
        rng: Rng(seed),
        plain: Side::new(plain_dir),
        walfs: Side::new(mount.mountpoint.clone()),
        tmp,
        mount,
        model: Model::new(),
        scratch: Scratch {
            dir: scratch_dir,
            n: 0,
        },
        step_no: 0,
        records: Vec::new(),
        log_seen: 0,
        recent: Default::default(),
    };
    stats.sequences += 1;
    let started = Instant::now();
    let mut failure = seq.steps(stats).err();
    if let Some(f) = &failure {
        stats.mismatches.push(seq.describe(f));
    }
    // The workers quit (closing their connections normally), then walfs stops.
    seq.plain.quit();
    seq.walfs.quit();
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| seq.mount.stop()));
    let log = match stopped {
        Ok(log) => log,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            if failure.is_none() {
                let f = Failure {
                    step: "stopping walfs".into(),
                    what: format!("walfs did not stop cleanly: {}", shorten(&msg, 3000)),
                };
                stats.mismatches.push(seq.describe(&f));
                failure = Some(f);
            }
            seq.mount.log()
        }
    };
    if let Some(dir) = std::env::var_os("WALFS_FUZZ_LOG_DIR") {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(Path::new(&dir).join(format!("seq-{index}.log")), &log);
    }
    if failure.is_none() {
        if let Err(f) = seq.final_checks(stats) {
            stats.mismatches.push(seq.describe(&f));
            failure = Some(f);
        }
    }
    let bad = bad_log_lines(&log[seq.log_seen.min(log.len())..]);
    if failure.is_none() && !bad.is_empty() {
        let f = Failure {
            step: "the daemon's log".into(),
            what: format!(
                "walfs logged {} error line(s) after the last step (as the workers quit or walfs \
                 stopped), although every outcome matched:\n    {}",
                bad.len(),
                bad[..bad.len().min(20)].join("\n    ")
            ),
        };
        stats.mismatches.push(seq.describe(&f));
        failure = Some(f);
    }
    for m in &stats.mismatches[mismatches_before..] {
        eprintln!("fuzz: MISMATCH: {m}");
    }
    if failure.is_some() {
        // A mismatch that depends on timing may not replay: what walfs staged and
        // uploaded is kept for inspection (`staging/`, `replica/`, and the plain side).
        let kept = std::mem::replace(&mut seq.tmp, tempfile::tempdir().unwrap()).keep();
        eprintln!(
            "fuzz: sequence {index}: its staging and replica directories are kept in {}",
            kept.display()
        );
    }
    eprintln!(
        "fuzz: sequence {index} (seed {seed:#x}): {} steps in {:.1} s, {} records, {}",
        seq.step_no,
        started.elapsed().as_secs_f64(),
        seq.records.len(),
        match &failure {
            None => "ok".to_string(),
            Some(f) => format!(
                "MISMATCH at step {}: {}",
                seq.step_no,
                f.what.lines().next().unwrap_or("")
            ),
        }
    );
}

#[test]
fn fuzz() {
    if std::env::var_os(WORKER_ENV).is_some() {
        return;
    }
    let cfg = Config::from_env();
    eprintln!(
        "fuzz: seed {:#x}, sequences {}..{}, {} steps each (WALFS_FUZZ_SEED, WALFS_FUZZ_FIRST, \
         WALFS_FUZZ_SEQUENCES, WALFS_FUZZ_STEPS)",
        cfg.seed,
        cfg.first,
        cfg.first + cfg.sequences,
        cfg.steps
    );
    let mut stats = Stats::default();
    let started = Instant::now();
    for index in cfg.first..cfg.first + cfg.sequences {
        run_sequence(&cfg, index, &mut stats);
        if cfg.max_mismatches > 0 && stats.mismatches.len() >= cfg.max_mismatches {
            eprintln!(
                "fuzz: stopping after {} mismatches (WALFS_FUZZ_MAX_MISMATCHES)",
                stats.mismatches.len()
            );
            break;
        }
    }
    eprintln!(
        "fuzz: {} quiet points, {} restores matched their image, {} databases skipped as not \
         valid, {} freelist leaf pages with other (undefined) contents, {:.1} s",
        stats.quiet_points,
        stats.quiet_restores,
        stats.skipped,
        stats.free_leaves,
        started.elapsed().as_secs_f64()
    );
    if !stats.skip_reasons.is_empty() {
        eprintln!("fuzz: skipped as not valid: {:?}", stats.skip_reasons);
    }
    eprintln!(
        "fuzz: seed {:#x}, {} sequences, {} steps, {} restores checked, {} mismatches",
        cfg.seed,
        stats.sequences,
        stats.steps,
        stats.restores_checked,
        stats.mismatches.len()
    );
    if let Some(first) = stats.mismatches.first() {
        for (i, m) in stats.mismatches.iter().enumerate().skip(1) {
            eprintln!(
                "fuzz: mismatch {}: {}",
                i + 1,
                m.lines().next().unwrap_or("")
            );
        }
        panic!(
            "{} mismatch(es); the first: {first}",
            stats.mismatches.len()
        );
    }
}

/// The sequences in which the fuzzer found a replica bug (each fixed): every one runs in CI
/// whatever the default seed's range covers, and must give no mismatch.
const REGRESSIONS: &[(u64, &[u64])] = &[
    (DEFAULT_SEED, &[0, 2, 5, 7, 8, 23, 33, 35, 53, 54]),
    (7, &[0, 10, 12, 14, 26, 32, 37]),
    (11, &[6]),
    (12, &[1, 31]),
    (14, &[19]),
    (23, &[18]),
    (36, &[10]),
    (45, &[7, 24]),
    (99, &[14]),
    (0x5eed17, &[841]),
    (0xc0ffee, &[745]),
    (0xbeef5, &[203]),
    (0xabcd5, &[377]),
    (0x7a11e7, &[202]),
    (0xd00d5, &[392]),
];

#[test]
fn fuzz_regressions() {
    if std::env::var_os(WORKER_ENV).is_some() {
        return;
    }
    let mut stats = Stats::default();
    for &(seed, indices) in REGRESSIONS {
        for &index in indices {
            let cfg = Config {
                seed,
                first: index,
                sequences: 1,
                steps: 120,
                max_mismatches: 0,
                verbose: false,
                skip: Vec::new(),
            };
            run_sequence(&cfg, index, &mut stats);
        }
    }
    eprintln!(
        "fuzz regressions: {} sequences, {} steps, {} restores checked, {} mismatches",
        stats.sequences,
        stats.steps,
        stats.restores_checked,
        stats.mismatches.len()
    );
    assert!(
        stats.mismatches.is_empty(),
        "{} mismatch(es):\n{}",
        stats.mismatches.len(),
        stats.mismatches.join("\n")
    );
}

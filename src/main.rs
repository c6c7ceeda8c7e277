//! The `walfs` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "walfs",
    version,
    about = "A FUSE filesystem that replicates unmodified SQLite programs"
)]
struct Cli {
    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter such as
    /// walfs=debug). Overrides RUST_LOG.
    #[arg(long, global = true)]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

/// How files holding an SQLite database are served (`--database-io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DatabaseIo {
    Cached,
    Passthrough,
}

#[derive(Subcommand)]
enum Command {
    /// Mirror BACKING at MOUNTPOINT, in the foreground, until unmounted (SIGINT, SIGTERM or
    /// fusermount3 -u).
    Mount {
        /// The directory that holds the data.
        backing: PathBuf,
        /// An empty directory where the mirror appears.
        mountpoint: PathBuf,
        /// Let users other than the one running walfs use the mount.
        #[arg(long)]
        allow_other: bool,
        /// Mount read-only.
        #[arg(long)]
        read_only: bool,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Serve file data through walfs instead of kernel passthrough (slower; for
        /// debugging and for comparison).
        #[arg(long)]
        no_passthrough: bool,
        /// How files holding an SQLite database are served: `passthrough` (like every
        /// other file) or `cached` (through the kernel page cache: read transactions cost
        /// no request to walfs, each page write costs one; for read-mostly databases).
        #[arg(long, value_enum, default_value_t = DatabaseIo::Passthrough)]
        database_io: DatabaseIo,
        /// Seconds the kernel may cache names and attributes. Changes made through the mount
        /// are always seen at once; this bounds how long a change made directly in BACKING
        /// can go unseen.
        #[arg(long, default_value = "1", value_parser = parse_seconds)]
        cache_ttl: Duration,
        /// Mount even if MOUNTPOINT is not empty (its files are hidden while mounted).
        #[arg(long)]
        allow_nonempty: bool,
        /// Stream every database's commits to this replica: file:///abs/dir or
        /// s3://bucket/prefix?endpoint=...&region=...&forcePathStyle=true. May be repeated.
        #[arg(long = "replica", value_name = "URL")]
        replicas: Vec<String>,
        /// Where captured transactions wait for upload (default: /var/lib/walfs/staging/...
        /// for root). Must not be inside BACKING.
        #[arg(long)]
        staging_dir: Option<PathBuf>,
        /// How often staged transactions are uploaded: 1s, 500ms, 0 (each commit at once).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        sync_interval: Duration,
        /// Stage each commit before its WAL fsync returns (synchronous=FULL), instead of
        /// within milliseconds after. Slower; the replica's RPO is the same, since the
        /// upload is asynchronous either way.
        #[arg(long)]
        stage_at_commit: bool,
        /// How often each compaction level is built from the one below: level 1 every
        /// first interval, level 2 every second, ... (Litestream's default).
        #[arg(long, default_value = "30s,5m,1h", value_parser = parse_durations)]
        compaction_intervals: Intervals,
        /// How often a database that changed gets a full snapshot (level 9).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        snapshot_interval: Duration,
        /// How far back every moment stays restorable; older objects are deleted.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        retention: Duration,
        /// How long level-0 objects stay after level 1 covers them.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        l0_retention: Duration,
        /// Read settings from this TOML file: its keys are the long flags of `walfs mount`
        /// and `backing`/`mountpoint` (e.g. sync-interval = "1s", replica = ["s3://..."],
        /// allow-other = true). Flags on the command line override it.
        #[arg(long, value_name = "FILE", env = "WALFS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Restore databases from a replica, verified (content checksum where the writer
    /// recorded one, and PRAGMA integrity_check), written atomically.
    Restore {
        /// A mount's replica root, or one database's replica (as Litestream lays it out).
        url: String,
        /// The database file to create; a directory when restoring a whole replica.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Restore only this database (its path relative to the replica root).
        #[arg(long)]
        db: Option<String>,
        /// Replace an existing output.
        #[arg(long)]
        force: bool,
        /// Restore exactly this transaction, in decimal (42) or in hex: Litestream's 16
        /// digits, zero-padded so starting with 0 (000000000000002a), or after 0x (0x2a).
        /// Any other number is decimal.
        #[arg(long, value_parser = parse_txid)]
        txid: Option<u64>,
        /// Restore the newest state committed at or before this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        timestamp: Option<SystemTime>,
    },
    /// List the databases in a replica with their latest TXID, time and size.
    List {
        url: String,
        /// Show the restorable range and objects of this database.
        #[arg(long)]
        db: Option<String>,
    },
    /// Restore drill: restore the latest state and a random earlier TXID of each database
    /// into a temporary directory, check the content checksum and PRAGMA integrity_check,
    /// and report. Only reads the replica. Exits non-zero on any problem.
    Verify {
        url: String,
        /// Verify only this database (its path relative to the replica root).
        #[arg(long)]
        db: Option<String>,
        /// Seed of the random choice of the earlier TXID, to repeat a drill.
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> ExitCode {
    let argv = match walfs::config::expand_config(
        &Cli::command(),
        "mount",
        std::env::args_os().collect(),
        |k| std::env::var_os(k),
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("walfs: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    init_logging(cli.log_level.as_deref());
    let result = match cli.command {
        Command::Mount {
            backing,
            mountpoint,
            allow_other,
            read_only,
            threads,
            no_passthrough,
            database_io,
            cache_ttl,
            allow_nonempty,
            replicas,
            staging_dir,
            sync_interval,
            stage_at_commit,
            compaction_intervals,
            snapshot_interval,
            retention,
            l0_retention,
            config: _,
        } => walfs::mount::run(&walfs::mount::MountOptions {
            backing,
            mountpoint,
            allow_other,
            read_only,
            threads,
            passthrough: !no_passthrough,
            cache_databases: database_io == DatabaseIo::Cached,
            cache_ttl,
            allow_nonempty,
            replication: walfs::replicate::ReplicationOptions {
                replicas,
                staging_dir,
                sync_interval,
                stage_at_commit,
                maintenance: walfs::replica::maintain::MaintenanceOptions {
                    compaction_intervals: compaction_intervals.0,
                    snapshot_interval,
                    retention,
                    l0_retention,
                },
            },
        }),
        Command::Restore {
            url,
            output,
            db,
            force,
            txid,
            timestamp,
        } => walfs::restore::restore_command(&walfs::restore::RestoreArgs {
            url,
            output,
            db,
            force,
            txid,
            timestamp,
        }),
        Command::List { url, db } => {
            walfs::restore::list_command(&walfs::restore::ListArgs { url, db })
        }
        Command::Verify { url, db, seed } => {
            walfs::restore::verify_command(&walfs::restore::VerifyArgs { url, db, seed })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walfs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A TXID, in one of three spellings that cannot be mistaken for each other:
/// - decimal: `42`, `1234567890123456`;
/// - Litestream's: exactly 16 hex digits, zero-padded, so starting with `0`:
///   `000000000000002a`;
/// - hex after `0x`: `0x2a`.
///
/// A 16-digit number that does not start with `0` is decimal.
fn parse_txid(s: &str) -> Result<u64, String> {
    let hex = |h: &str| {
        (!h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(h, 16).ok())
            .flatten()
    };
    let parsed = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        hex(h)
    } else if s.len() == 16 && s.starts_with('0') {
        // Litestream's spelling, even when every digit is a decimal one.
        hex(s)
    } else if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    };
    parsed.ok_or_else(|| {
        format!(
            "{s:?} is not a TXID: give a decimal number, Litestream's 16 hex digits \
             (zero-padded, e.g. 000000000000002a) or hex after 0x (e.g. 0x2a)"
        )
    })
}

/// An RFC 3339 time such as 2026-11-22T05:00:00Z.
fn parse_time(s: &str) -> Result<SystemTime, String> {
    walfs::replica::timestamp::parse_rfc3339(s)
        .ok_or_else(|| format!("{s:?} is not an RFC 3339 time such as 2026-11-22T05:00:00Z"))
}

/// `1s`, `500ms`, `2m`, or a bare number of seconds.
/// Compaction intervals, one per level from 1.
#[derive(Clone, Debug)]
struct Intervals(Vec<Duration>);

fn parse_durations(s: &str) -> Result<Intervals, String> {
    let v = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(parse_duration)
        .collect::<Result<Vec<_>, _>>()?;
    if v.len() > 8 {
        return Err(format!("{s:?}: at most 8 levels; give e.g. 30s,5m,1h"));
    }
    if v.iter().any(|d| d.is_zero()) {
        return Err(format!(
            "{s:?}: each interval must be above zero; give e.g. 30s,5m,1h"
        ));
    }
    Ok(Intervals(v))
}

/// The longest duration a flag takes, in seconds (about 31 years): long enough for any
/// setting, short enough that adding it to a clock reading cannot overflow.
const MAX_SECONDS: u64 = 1_000_000_000;

/// A number of seconds, fractions allowed, from 0 to [`MAX_SECONDS`] (`--cache-ttl`).
fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|n| (0.0..=MAX_SECONDS as f64).contains(n))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a number of seconds from 0 to {MAX_SECONDS}"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let not_a_duration = || format!("{s:?} is not a duration: use e.g. 1s, 500ms or 2m");
    // The first letter starts the unit, so `inf` and `NaN` never reach the number; a
    // huge one (`99999999999999999999s`) does, and is refused below.
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| !n.is_nan())
        .ok_or_else(not_a_duration)?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s, m or h")),
    };
    if secs < 0.0 {
        return Err(format!("{s:?} must be zero or more"));
    }
    if secs > MAX_SECONDS as f64 {
        return Err(format!(
            "{s:?} is too long: at most {MAX_SECONDS}s (about 31 years)"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn init_logging(level: Option<&str>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        .with(walfs::fs::log_filter::StaleReplyFilter)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag of the real `walfs mount` works in a config file.
    #[test]
    fn config_file_reaches_every_mount_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walfs.toml");
        std::fs::write(
            &path,
            r#"
backing = "/srv/data"
mountpoint = "/mnt/data"
allow-other = true
read-only = false
threads = 2
cache-ttl = 0.5
replica = ["s3://bucket/prefix?region=eu-west-1", "file:///backup/walfs"]
staging-dir = "/var/lib/walfs/staging"
sync-interval = "250ms"
stage-at-commit = true
"#,
        )
        .unwrap();
        let argv = walfs::config::expand_config(
            &Cli::command(),
            "mount",
            ["walfs", "mount", "--config", path.to_str().unwrap()]
                .map(std::ffi::OsString::from)
                .to_vec(),
            |_| None,
        )
        .unwrap();
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Mount {
            backing,
            mountpoint,
            allow_other,
            read_only,
            threads,
            cache_ttl,
            replicas,
            staging_dir,
            sync_interval,
            stage_at_commit,
            ..
        } = cli.command
        else {
            panic!("not a mount");
        };
        assert_eq!(backing, PathBuf::from("/srv/data"));
        assert_eq!(mountpoint, PathBuf::from("/mnt/data"));
        assert!(allow_other && !read_only && stage_at_commit);
        assert_eq!((threads, cache_ttl), (2, Duration::from_millis(500)));
        assert_eq!(replicas.len(), 2);
        assert_eq!(staging_dir, Some(PathBuf::from("/var/lib/walfs/staging")));
        assert_eq!(sync_interval, Duration::from_millis(250));
    }

    #[test]
    fn txid_spellings() {
        // Decimal, including a 16-digit number that does not start with 0.
        assert_eq!(parse_txid("0"), Ok(0));
        assert_eq!(parse_txid("42"), Ok(42));
        assert_eq!(parse_txid("1234567890123456"), Ok(1_234_567_890_123_456));
        assert_eq!(parse_txid("9999999999999999"), Ok(9_999_999_999_999_999));
        assert_eq!(parse_txid("18446744073709551615"), Ok(u64::MAX));
        // Litestream's 16 hex digits, zero-padded, with or without letters.
        assert_eq!(parse_txid("000000000000002a"), Ok(42));
        assert_eq!(parse_txid("000000000000002A"), Ok(42));
        assert_eq!(parse_txid("0000000000000010"), Ok(16));
        assert_eq!(parse_txid("0fffffffffffffff"), Ok(u64::MAX >> 4));
        // Hex after 0x, any length up to 16 digits.
        assert_eq!(parse_txid("0x2a"), Ok(42));
        assert_eq!(parse_txid("0X2A"), Ok(42));
        assert_eq!(parse_txid("0xffffffffffffffff"), Ok(u64::MAX));
        assert_eq!(parse_txid("0x000000000000002a"), Ok(42));
    }

    #[test]
    fn txid_rejections() {
        for bad in [
            "",
            "2a",
            "-1",
            "+42",
            " 42",
            "4.2",
            "0x",
            "0x-1",
            "0x+2a",
            "0xg",
            "0x10000000000000000",
            "18446744073709551616",
            // 16 hex digits that do not start with 0 are not Litestream's spelling.
            "a00000000000002a",
            "100000000000002a",
            // 15 or 17 characters with a hex letter.
            "00000000000002a",
            "0000000000000002a",
        ] {
            let e = parse_txid(bad).unwrap_err();
            assert!(e.starts_with(&format!("{bad:?} is not a TXID")), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn seconds_in_range() {
        assert_eq!(parse_seconds("0"), Ok(Duration::ZERO));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_seconds("1e9"), Ok(Duration::from_secs(MAX_SECONDS)));
        for bad in [
            "inf", "-inf", "infinity", "NaN", "nan", "-1", "-0.5", "1e10", "1e300", "", "1s", "x",
        ] {
            assert_eq!(
                parse_seconds(bad),
                Err(format!(
                    "{bad:?} is not a number of seconds from 0 to 1000000000"
                ))
            );
        }
    }

    #[test]
    fn durations_in_range() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(
            parse_duration("1000000000s"),
            Ok(Duration::from_secs(MAX_SECONDS))
        );
        for bad in [
            "inf", "infinity", "NaN", "nan", "infs", "nanms", "x", "", "ms",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("is not a duration"), "{bad}: {e}");
        }
        assert_eq!(
            parse_duration("-1s"),
            Err("\"-1s\" must be zero or more".into())
        );
        assert_eq!(
            parse_duration("-inf"),
            Err("\"-inf\" is not a duration: use e.g. 1s, 500ms or 2m".into())
        );
        for big in ["1000000001", "99999999999999999999999s", "300000h"] {
            assert_eq!(
                parse_duration(big),
                Err(format!(
                    "{big:?} is too long: at most 1000000000s (about 31 years)"
                ))
            );
        }
        assert_eq!(
            parse_duration("2d"),
            Err("\"2d\": unknown unit \"d\"; use ms, s, m or h".into())
        );
        assert_eq!(
            parse_durations("30s, 5m,1h").map(|i| i.0),
            Ok(vec![
                Duration::from_secs(30),
                Duration::from_secs(300),
                Duration::from_secs(3600)
            ])
        );
        assert!(parse_durations("1s,0").unwrap_err().contains("above zero"));
        assert!(parse_durations("1,2,3,4,5,6,7,8,9")
            .unwrap_err()
            .contains("at most 8"));
        assert!(parse_durations("1s,9999999999")
            .unwrap_err()
            .contains("too long"));
    }
}
